//! The two background roles: the worker, which applies transfer commands to the
//! ledger a batch per transaction, and the relay, which publishes the outbox.
//!
//! Both sit between Kafka and Postgres and own the order of the two commits: the
//! worker commits Kafka offsets only after Postgres committed the batch; the relay
//! marks outbox rows published only after Kafka acknowledged them. Either can crash
//! anywhere and the system repeats work, never money. Neither decides a transfer:
//! the rules live in `cardflow-domain`, the SQL in `cardflow-ledger`.

pub mod consumer;
pub mod ownership;
pub mod relay;
pub mod schedule;

pub use consumer::{run_worker, WorkerConfig};
pub use relay::{run_relay, RelayConfig};

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Bus(#[from] cardflow_bus::BusError),
    #[error(transparent)]
    Kafka(#[from] cardflow_bus::rdkafka::error::KafkaError),
    #[error(transparent)]
    Ledger(#[from] cardflow_ledger::LedgerError),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error("worker configuration: {0}")]
    Config(String),
    #[error("a batch task failed: {0}")]
    Batch(String),
}
