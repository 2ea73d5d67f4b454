//! The gateway's two database calls per transfer request — "what is known of this
//! request?" before publishing and "it was published" after — made in groups.
//!
//! Why: `make bench` found the gateway's time going to round trips, not to work.
//! Each query is a send, a wake-up of the connection's task and of the request's,
//! and a Postgres backend woken for one row; at a few thousand requests a second
//! that was most of the gateway's CPU and a fifth of Postgres'. Here each request
//! queues its key and waits; a collector takes whatever is queued (up to
//! [`MAX_GROUP`]) as soon as a statement slot is free ([`GROUPS_IN_FLIGHT`]) and
//! runs one statement for all of it. Under light load a group is one request and
//! nothing waits for company; under heavy load groups grow by themselves, because
//! requests queue while the slot is busy.
//!
//! What each caller sees is what it saw with a query of its own: its own answer,
//! or an error when the group's statement failed.

use crate::error::ApiError;
use cardflow_ledger::transfers::{self, RequestKey, Submission};
use cardflow_ledger::LedgerError;
use sqlx::PgPool;
use std::future::Future;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, Semaphore};

/// Most requests in one statement: a few milliseconds of a busy gateway.
pub const MAX_GROUP: usize = 256;
/// Statements of one kind running at once. One: with an index probe per key a
/// statement takes well under a millisecond, and a second slot only made groups
/// smaller (async end to end 3848 and 4206/s with two, 4320 and 4440/s with one).
pub const GROUPS_IN_FLIGHT: usize = 1;

type Waiter<O> = oneshot::Sender<Result<O, ApiError>>;

/// Queues requests for one kind of statement.
struct Grouper<O> {
    queue: mpsc::Sender<(RequestKey, Waiter<O>)>,
}

impl<O: Send + 'static> Grouper<O> {
    fn start<F, Fut>(pool: PgPool, what: &'static str, run: F) -> Self
    where
        F: Fn(PgPool, Vec<RequestKey>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<O>, LedgerError>> + Send + 'static,
    {
        let (queue, rx) = mpsc::channel(MAX_GROUP * GROUPS_IN_FLIGHT * 4);
        tokio::spawn(collect(rx, pool, what, Arc::new(run)));
        Grouper { queue }
    }

    async fn ask(&self, key: RequestKey) -> Result<O, ApiError> {
        let (tx, rx) = oneshot::channel();
        self.queue.send((key, tx)).await.map_err(|_| ApiError::unavailable())?;
        rx.await.unwrap_or_else(|_| Err(ApiError::unavailable()))
    }
}

async fn collect<O, F, Fut>(
    mut rx: mpsc::Receiver<(RequestKey, Waiter<O>)>,
    pool: PgPool,
    what: &'static str,
    run: Arc<F>,
) where
    O: Send + 'static,
    F: Fn(PgPool, Vec<RequestKey>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Vec<O>, LedgerError>> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(GROUPS_IN_FLIGHT));
    loop {
        // The slot first: while all are busy, requests queue and the next group grows.
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let Some(first) = rx.recv().await else { return };
        let mut group = vec![first];
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(next) => group.push(next),
                Err(_) => break,
            }
        }
        let (pool, run) = (pool.clone(), run.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let (keys, waiters): (Vec<RequestKey>, Vec<Waiter<O>>) = group.into_iter().unzip();
            let n = keys.len();
            cardflow_telemetry::Metrics::global().db_group_size.with_label_values(&[what]).observe(n as f64);
            match run(pool, keys).await {
                // Both statements answer every key or fail (`lookup_many` checks
                // its count); a waiter left without an answer would get 503 anyway.
                Ok(answers) => {
                    for (waiter, answer) in waiters.into_iter().zip(answers) {
                        let _ = waiter.send(Ok(answer));
                    }
                }
                Err(e) => {
                    // The one mapping of a database failure to what a client sees
                    // (and its log line), named with the statement and group.
                    let _group = tracing::error_span!("grouped statement", statement = what, requests = n).entered();
                    let e = ApiError::from(e);
                    for waiter in waiters {
                        let _ = waiter.send(Err(e.clone()));
                    }
                }
            }
        });
    }
}

/// The gateway's view of the `submissions` and `transfers` tables, grouped.
pub struct SubmissionBook {
    lookups: Grouper<Submission>,
    records: Grouper<()>,
}

impl SubmissionBook {
    /// Starts the collectors; call inside a Tokio runtime.
    pub fn start(pool: PgPool) -> Self {
        SubmissionBook {
            lookups: Grouper::start(pool.clone(), "lookup", |pool, keys| async move {
                transfers::lookup_many(&pool, &keys).await
            }),
            records: Grouper::start(pool, "record", |pool, keys| async move {
                let n = keys.len();
                transfers::record_submissions(&pool, &keys).await.map(|()| vec![(); n])
            }),
        }
    }

    /// What is known of a request before it is published ([`transfers::lookup_many`]).
    pub async fn lookup(&self, key: RequestKey) -> Result<Submission, ApiError> {
        self.lookups.ask(key).await
    }

    /// Records that a command was published ([`transfers::record_submissions`]).
    pub async fn record(&self, key: RequestKey) -> Result<(), ApiError> {
        self.records.ask(key).await
    }
}
