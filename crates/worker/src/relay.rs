//! The relay publishes the outbox. One relay is active at a time: it holds a
//! Postgres advisory lock on a connection of its own, and standbys wait for it.
//! A `NOTIFY` from the outbox trigger wakes it; a periodic sweep covers a lost
//! notification. A row holds every message of one worker transaction. Rows go out
//! in id order, a row's messages in their order, and a row is marked published
//! only after the broker acknowledged all of them, so a crash republishes
//! (consumers deduplicate by event id and sequence) but never loses or reorders a
//! key's messages.
//!
//! Rounds overlap: a round's messages are handed to the producers at once, and the
//! relay reads and sends the next round while the broker acknowledges the last
//! (up to `rounds_in_flight`). Waiting for every acknowledgement before reading
//! again made a reply committed during a round wait for the whole round, events
//! included, and tied the events' linger to the replies' latency. Rounds settle in
//! the order they were sent, so "marked published" still covers a prefix: rows
//! behind a transient failure are sent again whole, even those acknowledged.

use crate::WorkerError;
use cardflow_bus::rdkafka::error::{KafkaError, RDKafkaErrorCode};
use cardflow_bus::rdkafka::message::{Header, OwnedHeaders};
use cardflow_bus::rdkafka::producer::{FutureProducer, FutureRecord};
use cardflow_bus::BusConfig;
use cardflow_ledger::outbox::{self, OutboxMessage, OutboxRow, ParkedMessage, NOTIFY_CHANNEL};
use cardflow_telemetry::Metrics;
use futures::stream::{FuturesOrdered, StreamExt};
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// An arbitrary constant naming the relay's advisory lock.
const RELAY_LOCK: i64 = 0x6361_7264_666c_6f77; // "cardflow"

#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// Messages read and published per round, in whole outbox rows (a row holds
    /// one worker transaction's messages).
    pub batch: i64,
    /// How often to look without a notification.
    pub sweep_interval: Duration,
    /// Published rows older than this are deleted.
    pub retain_published: Duration,
    /// `linger.ms` of the replies' producer: a gateway's request waits for them.
    pub producer_linger_ms: u32,
    /// `linger.ms` of the events' producer: no one waits for them, and fewer,
    /// larger batches cost the broker less.
    pub events_linger_ms: u32,
    /// Rounds sent and not yet acknowledged, at most; 1 waits for each round's
    /// acknowledgements before reading the next.
    pub rounds_in_flight: usize,
    /// How often the active relay runs the ledger audit for the audit metrics.
    pub audit_interval: Duration,
}

/// The message's headers; `traceparent`, when given, replaces the stored one.
fn record_headers(message: &OutboxMessage, traceparent: Option<&str>) -> OwnedHeaders {
    let mut headers = OwnedHeaders::new();
    for (k, v) in &message.headers {
        let value = match (k.as_str(), traceparent) {
            ("traceparent", Some(tp)) => tp,
            _ => v.as_str(),
        };
        headers = headers.insert(Header { key: k, value: Some(value.as_bytes()) });
    }
    headers
}

/// Whether the broker will refuse this message however often it is sent: retrying
/// such a row would stop every row behind it.
fn refused_for_good(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::UnknownPartition
                | RDKafkaErrorCode::MessageSizeTooLarge
                | RDKafkaErrorCode::InvalidMessage
                | RDKafkaErrorCode::InvalidRecord
        )
    )
}

/// What one round of publishing achieved.
#[derive(Default)]
struct Published {
    /// Rows whose every message the broker acknowledged or refused for good.
    done: Vec<i64>,
    /// Messages refused for good, with the reason.
    parked: Vec<ParkedMessage>,
    /// A transient failure stopped the round; the rest is retried.
    stopped: bool,
}

/// The relay's producers. Replies have a connection of their own: sent with the
/// round's events, a reply shared one produce request with every partition the
/// round touched (up to 17 at 8 partitions a topic), which is acknowledged once
/// all of them are stored (Tansu stores them one after another). A gateway's
/// request waits for the reply; no one waits for the events.
struct Producers {
    events: FutureProducer,
    replies: FutureProducer,
}

/// A round on its way: every row it read, and when it was sent.
struct Round {
    ids: Vec<i64>,
    started: Instant,
    published: Published,
}

type Settling = Pin<Box<dyn Future<Output = Round> + Send>>;

/// Hands every message of the rows to the producers now, in order (the
/// idempotent producer keeps each partition's order from here on, across
/// rounds), and returns the round's settlement: the longest prefix of rows that
/// the broker acknowledged or refused for good. Rows from the first transient
/// failure on are retried, whole: a duplicate is better than a reorder.
fn send_round(producers: &Producers, rows: Vec<OutboxRow>) -> Settling {
    let started = Instant::now();
    let mut deliveries = Vec::with_capacity(rows.iter().map(|r| r.messages.len()).sum());
    for (row_index, row) in rows.iter().enumerate() {
        for (position, message) in row.messages.iter().enumerate() {
            // When traces are exported, each message's publish is a span in the
            // trace of the transfer that wrote it, and the message carries that
            // span's context.
            let span = cardflow_telemetry::exporting().then(|| {
                let span = tracing::info_span!(
                    "relay.publish",
                    otel.name = format!("{} publish", message.topic),
                    otel.kind = "producer",
                    messaging.destination.name = message.topic.as_str(),
                );
                cardflow_telemetry::continue_trace(&span, message.headers.get("traceparent").map(String::as_str));
                span
            });
            let traceparent = span.as_ref().and_then(cardflow_telemetry::traceparent_of);
            let mut record = FutureRecord::to(&message.topic)
                .key(&message.key)
                .payload(message.payload.get())
                .headers(record_headers(message, traceparent.as_deref()));
            if let Some(p) = message.partition {
                record = record.partition(p);
            }
            let producer = if message.is_reply() { &producers.replies } else { &producers.events };
            // `send_result` enqueues now or says why not: `send` would enqueue
            // only when first polled and retry a full queue later, after messages
            // behind it. A full queue is a transient failure like any other.
            let delivery = producer.send_result(record).map_err(|(e, _)| e);
            deliveries.push(async move {
                let delivered = match delivery {
                    Ok(delivery) => match delivery.await {
                        Ok(Ok(_)) => Ok(()),
                        Ok(Err((e, _))) => Err(e),
                        Err(_canceled) => Err(KafkaError::Canceled),
                    },
                    Err(e) => Err(e),
                };
                // Each message's span ends with its own acknowledgement, not the round's.
                drop(span);
                (row_index, position, delivered)
            });
        }
    }
    Box::pin(async move {
        let results = futures::future::join_all(deliveries).await;
        let ids = rows.iter().map(|r| r.id).collect();
        Round { ids, started, published: settle(&rows, results) }
    })
}

/// The longest prefix of the rows whose messages were all acknowledged or
/// refused for good; `results` are in the rows' order.
fn settle(rows: &[OutboxRow], results: Vec<(usize, usize, Result<(), KafkaError>)>) -> Published {
    let metrics = Metrics::global();
    let mut out = Published { done: Vec::with_capacity(rows.len()), ..Published::default() };
    let mut results = results.into_iter().peekable();
    while let Some((row_index, position, result)) = results.next() {
        let row = &rows[row_index];
        let message = &row.messages[position];
        match result {
            Ok(()) => metrics.relay_published.with_label_values(&[&message.topic]).inc(),
            Err(e) if refused_for_good(&e) => {
                tracing::error!(error = %e, outbox_id = row.id, position, topic = message.topic, "the broker refuses this message for good; parked");
                metrics.relay_parked.with_label_values(&[&message.topic]).inc();
                out.parked.push(ParkedMessage {
                    outbox_id: row.id,
                    position: position as i32,
                    message: message.clone(),
                    reason: e.to_string(),
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, outbox_id = row.id, topic = message.topic, "publish failed; will retry");
                out.stopped = true;
                break;
            }
        }
        let row_ends = results.peek().is_none_or(|(next, _, _)| *next != row_index);
        if row_ends {
            out.done.push(row.id);
        }
    }
    out
}

/// Records a settled round: parked messages first, then the rows as published.
/// Retries the database until it answers, as the rows were sent.
async fn record(pool: &PgPool, published: &Published) {
    if !published.parked.is_empty() {
        while let Err(e) = outbox::park(pool, &published.parked).await {
            tracing::warn!(error = %e, "parking outbox messages failed; retrying");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    if !published.done.is_empty() {
        while let Err(e) = outbox::mark_published(pool, &published.done).await {
            tracing::warn!(error = %e, "marking published failed; retrying");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

pub async fn run_relay(
    config: RelayConfig,
    pool: PgPool,
    bus: BusConfig,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    let producers =
        Producers { events: bus.producer(config.events_linger_ms)?, replies: bus.producer(config.producer_linger_ms)? };
    let metrics = Metrics::global();
    'standby: loop {
        // The lock lives as long as this connection: if it breaks, Postgres frees the
        // lock and a standby takes over.
        let mut lock_conn = loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            match pool.acquire().await {
                Ok(mut conn) => {
                    let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                        .bind(RELAY_LOCK)
                        .fetch_one(&mut *conn)
                        .await?;
                    if got {
                        break conn.detach();
                    }
                }
                Err(e) => tracing::warn!(error = %e, "relay cannot reach the database"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        };
        metrics.relay_active.set(1);
        tracing::info!("relay active");
        let mut listener = PgListener::connect_with(&pool).await?;
        listener.listen(NOTIFY_CHANNEL).await?;
        let mut last_housekeeping = Instant::now() - Duration::from_secs(3600);
        let mut last_audit: Option<Instant> = None;
        // Rounds sent and not yet settled, oldest first, and the rows they hold:
        // the next read skips those rows (ids are not commit order, so "after the
        // last id sent" would skip a row committed late with a lower id).
        let mut in_flight: FuturesOrdered<Settling> = FuturesOrdered::new();
        let mut sent: Vec<i64> = Vec::new();
        // A round stopped on a transient failure: read nothing until every round
        // sent after it has settled, then start again from the oldest unpublished row.
        let mut failing = false;
        // Whether the outbox may hold rows not yet sent: after a notification, a
        // sweep, a full read or a failure.
        let mut look = true;
        metrics.relay_rounds_in_flight.set(0);
        loop {
            if shutdown.is_cancelled() {
                // Let the rounds sent settle, so that a clean stop republishes nothing.
                while let Some(round) = in_flight.next().await {
                    if !failing {
                        record(&pool, &round.published).await;
                        failing = round.published.stopped;
                    }
                }
                metrics.relay_rounds_in_flight.set(0);
                metrics.relay_active.set(0);
                return Ok(());
            }
            if last_housekeeping.elapsed() > Duration::from_secs(5) {
                use sqlx::Connection;
                if lock_conn.ping().await.is_err() {
                    // Rounds in flight are dropped unrecorded: the next active
                    // relay sends their rows again.
                    tracing::warn!("relay lost its lock connection; standing by");
                    metrics.relay_rounds_in_flight.set(0);
                    metrics.relay_active.set(0);
                    continue 'standby;
                }
                if let Ok((rows, age)) = outbox::backlog(&pool).await {
                    metrics.outbox_backlog.set(rows);
                    metrics.outbox_oldest_age.set(age);
                }
                if let Err(e) = outbox::purge_published(&pool, config.retain_published.as_secs() as i64).await {
                    tracing::warn!(error = %e, "outbox purge failed");
                }
                last_housekeeping = Instant::now();
            }
            // The active relay also audits the ledger now and then, so the audit
            // metrics (and their alert) reflect a recent check.
            if last_audit.is_none_or(|t| t.elapsed() > config.audit_interval) {
                last_audit = Some(Instant::now());
                let pool = pool.clone();
                tokio::spawn(async move {
                    match cardflow_ledger::audit::run(&pool).await {
                        Ok(report) => {
                            let m = Metrics::global();
                            m.audit_violations.set(report.violations.len() as i64);
                            m.audit_last_run.set(chrono::Utc::now().timestamp() as f64);
                            for v in &report.violations {
                                tracing::error!(
                                    subject = v.masked_subject(),
                                    rule = v.rule,
                                    "audit violation; `cardflow audit` names it in full"
                                );
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "audit failed to run"),
                    }
                });
            }
            let may_send = !failing && in_flight.len() < config.rounds_in_flight;
            if may_send && look {
                match outbox::unpublished(&pool, config.batch, &sent).await {
                    Ok(read) => {
                        look = read.full;
                        if !read.rows.is_empty() {
                            sent.extend(read.rows.iter().map(|r| r.id));
                            in_flight.push_back(send_round(&producers, read.rows));
                            metrics.relay_rounds_in_flight.set(in_flight.len() as i64);
                            continue;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "reading the outbox failed");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                }
            }
            tokio::select! {
                // Settling first: it frees a place for the next round.
                biased;
                Some(round) = in_flight.next(), if !in_flight.is_empty() => {
                    metrics.relay_rounds_in_flight.set(in_flight.len() as i64);
                    metrics.relay_publish_duration.observe(round.started.elapsed().as_secs_f64());
                    sent.retain(|id| !round.ids.contains(id));
                    if !failing {
                        record(&pool, &round.published).await;
                        failing = round.published.stopped;
                    }
                    if failing && in_flight.is_empty() {
                        // A transient failure: give the broker a moment before the retry.
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        failing = false;
                        look = true;
                    }
                }
                _ = shutdown.cancelled() => {}
                n = listener.recv(), if may_send => {
                    if let Err(e) = n {
                        tracing::warn!(error = %e, "outbox listener failed; sweeping");
                    }
                    look = true;
                }
                _ = tokio::time::sleep(config.sweep_interval), if may_send => look = true,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64, messages: usize) -> OutboxRow {
        let message = |i: usize| OutboxMessage {
            topic: "card.balance".into(),
            partition: None,
            key: format!("card-{id}-{i}"),
            headers: Default::default(),
            payload: serde_json::value::RawValue::from_string("{}".into()).unwrap(),
        };
        OutboxRow { id, messages: (0..messages).map(message).collect() }
    }

    fn acknowledged(row_index: usize, position: usize) -> (usize, usize, Result<(), KafkaError>) {
        (row_index, position, Ok(()))
    }

    fn failed(row_index: usize, position: usize, code: RDKafkaErrorCode) -> (usize, usize, Result<(), KafkaError>) {
        (row_index, position, Err(KafkaError::MessageProduction(code)))
    }

    #[test]
    fn a_round_acknowledged_in_full_marks_every_row() {
        let rows = [row(7, 2), row(9, 1)];
        let out = settle(&rows, vec![acknowledged(0, 0), acknowledged(0, 1), acknowledged(1, 0)]);
        assert_eq!(out.done, vec![7, 9]);
        assert!(out.parked.is_empty());
        assert!(!out.stopped);
    }

    #[test]
    fn a_transient_failure_stops_the_round_before_its_row_even_if_later_rows_were_acknowledged() {
        let rows = [row(1, 1), row(2, 2), row(3, 1)];
        let results = vec![
            acknowledged(0, 0),
            acknowledged(1, 0),
            failed(1, 1, RDKafkaErrorCode::MessageTimedOut),
            acknowledged(2, 0),
        ];
        let out = settle(&rows, results);
        assert_eq!(out.done, vec![1], "row 2 and everything behind it go again");
        assert!(out.stopped);
    }

    #[test]
    fn a_message_refused_for_good_is_parked_and_its_row_still_counts_as_published() {
        let rows = [row(4, 2), row(5, 1)];
        let results = vec![acknowledged(0, 0), failed(0, 1, RDKafkaErrorCode::MessageSizeTooLarge), acknowledged(1, 0)];
        let out = settle(&rows, results);
        assert_eq!(out.done, vec![4, 5]);
        assert_eq!(out.parked.len(), 1);
        assert_eq!((out.parked[0].outbox_id, out.parked[0].position), (4, 1));
        assert!(!out.stopped);
    }
}
