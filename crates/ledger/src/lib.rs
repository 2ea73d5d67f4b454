//! The ledger owns every row of money in Postgres: cards and their balances, the
//! transfers that moved them, the double-entry ledger entries, and the outbox that
//! announces each change. It applies a whole batch of transfer commands in one
//! transaction (see [`batch`]) so that a crash can repeat work but never money.
//!
//! It decides nothing itself: the rules live in `cardflow-domain` and are called
//! with the cards this crate loads and locks. It must not talk to Kafka or HTTP;
//! what it wants published it writes to the outbox, for the relay.

pub mod audit;
pub mod batch;
pub mod credentials;
pub mod events;
pub mod fixture;
pub mod outbox;
pub mod transfers;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use std::str::FromStr;
use std::time::Duration;

pub use audit::{AuditReport, Violation};
pub use batch::{BatchReport, OutboxTopics};
pub use credentials::{AccessKeyRecord, CryptoKeyRecord};
pub use fixture::Fixture;
pub use outbox::OutboxRow;
pub use transfers::StoredTransfer;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("fixture: {0}")]
    Fixture(String),
    #[error("stored data is inconsistent: {0}")]
    Corrupt(String),
    /// The task serializing a batch's outbox row did not finish (it panicked).
    #[error("preparing the outbox row: {0}")]
    OutboxRow(String),
    /// Another worker stored some of the batch's requests while this one decided
    /// them (a partition moving between workers); a retry answers them as repeats.
    #[error("{taken} request(s) of the batch were stored by another worker meanwhile")]
    KeyTaken { taken: u64 },
}

impl LedgerError {
    /// Errors that a later attempt may not meet: lost connections, deadlocks and
    /// serialization failures. Anything else is a fault in the data or the code.
    pub fn is_transient(&self) -> bool {
        match self {
            LedgerError::Database(e) => match e {
                sqlx::Error::Io(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed
                | sqlx::Error::Protocol(_) => true,
                sqlx::Error::Database(db) => matches!(
                    db.code().as_deref(),
                    Some("40001") | Some("40P01") | Some("57P01") | Some("57P03") | Some("53300")
                ),
                _ => false,
            },
            LedgerError::KeyTaken { .. } => true,
            _ => false,
        }
    }
}

/// Opens a pool whose connections plan every statement for the tables as they
/// are now, never from a cached generic plan: the gateway's, the relay's and the
/// tools'. `max_connections` is per role: the worker wants few, long
/// transactions; the gateway many short reads.
///
/// A generic plan made while `transfers`, `submissions` or the outbox was vacuumed
/// empty scans the table, and a pooled connection keeps it as the table grows
/// until the next `ANALYZE` (autovacuum: a minute or more away). `make bench`
/// saw async fall from 7000–9000/s to 1400–2200/s, five Postgres backends busy
/// in the gateway's lookups and the worker's read of repeats, whenever its
/// `VACUUM` ran before the first transfer; a deployment vacuumed before its first
/// transfer would do the same. These roles' statements run once per group of
/// requests or per relay round, so planning each costs little.
pub async fn connect(database_url: &str, max_connections: u32) -> Result<PgPool, LedgerError> {
    pool(database_url, max_connections, "force_custom_plan").await
}

/// Opens a pool for the worker, which keeps Postgres's plan cache: planning its
/// batch statements (the card lock and the set-based write) on every batch cost
/// about a tenth of the sync maximum in `make bench`, where batches hold a few
/// commands. Its one read of a table that starts empty, the read of repeats
/// ([`transfers::find_many`]), is never a cached statement instead.
pub async fn connect_with_cached_plans(database_url: &str, max_connections: u32) -> Result<PgPool, LedgerError> {
    pool(database_url, max_connections, "auto").await
}

async fn pool(database_url: &str, max_connections: u32, plan_cache_mode: &str) -> Result<PgPool, LedgerError> {
    let options = PgConnectOptions::from_str(database_url)?
        .application_name("cardflow")
        .options([("plan_cache_mode", plan_cache_mode)]);
    // sqlx pings every connection it hands out by default: a second round trip per
    // query on the gateway's hot path. Only a connection idle long enough for a
    // firewall or a server restart to have dropped it is checked first.
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for < Duration::from_secs(10) {
                    return Ok(true);
                }
                use sqlx::Connection;
                Ok(conn.ping().await.is_ok())
            })
        })
        .connect_with(options)
        .await?;
    Ok(pool)
}

pub async fn migrate(pool: &PgPool) -> Result<(), LedgerError> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// Whether the database answers, for readiness probes.
pub async fn ping(pool: &PgPool) -> bool {
    sqlx::query("SELECT 1").execute(pool).await.is_ok()
}
