//! The relay publishes the outbox. One relay is active at a time: it holds a
//! Postgres advisory lock on a connection of its own, and standbys wait for it.
//! A `NOTIFY` from the outbox trigger wakes it; a periodic sweep covers a lost
//! notification. A row holds every message of one worker transaction. Rows go out
//! in id order, a row's messages in their order, and a row is marked published
//! only after the broker acknowledged all of them, so a crash republishes
//! (consumers deduplicate by event id and sequence) but never loses or reorders a
//! key's messages.

use crate::WorkerError;
use cardflow_bus::rdkafka::error::{KafkaError, RDKafkaErrorCode};
use cardflow_bus::rdkafka::message::{Header, OwnedHeaders};
use cardflow_bus::rdkafka::producer::{FutureProducer, FutureRecord};
use cardflow_bus::rdkafka::util::Timeout;
use cardflow_bus::BusConfig;
use cardflow_ledger::outbox::{self, OutboxMessage, OutboxRow, ParkedMessage, NOTIFY_CHANNEL};
use cardflow_telemetry::Metrics;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
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
    pub producer_linger_ms: u32,
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

impl Producers {
    /// Drops what a round left queued: with `message.timeout.ms` 0 librdkafka would
    /// otherwise send it whenever the broker answers again, after the lock (and
    /// the rows) passed to another relay, or to this one again, which queues the
    /// rows anew. Messages already on the wire may still land; consumers
    /// deduplicate those by event id and sequence.
    fn abandon_round(&self) {
        use cardflow_bus::rdkafka::producer::{Producer, PurgeConfig};
        self.events.purge(PurgeConfig::default().queue().inflight());
        self.replies.purge(PurgeConfig::default().queue().inflight());
    }
}

/// Publishes the rows' messages concurrently (the idempotent producer keeps
/// per-partition order) and keeps the longest prefix of rows that the broker
/// acknowledged or refused for good. Rows from the first transient failure on
/// are retried next round, whole: a duplicate is better than a reorder.
async fn publish(producers: &Producers, rows: &[OutboxRow]) -> Published {
    let messages: Vec<(&OutboxRow, usize, &OutboxMessage)> =
        rows.iter().flat_map(|row| row.messages.iter().enumerate().map(move |(i, m)| (row, i, m))).collect();
    // When traces are exported, each message's publish is a span in the trace of
    // the transfer that wrote it, and the message carries that span's context.
    let spans: Vec<Option<tracing::Span>> = messages
        .iter()
        .map(|(_, _, message)| {
            cardflow_telemetry::exporting().then(|| {
                let span = tracing::info_span!(
                    "relay.publish",
                    otel.name = format!("{} publish", message.topic),
                    otel.kind = "producer",
                    messaging.destination.name = message.topic.as_str(),
                );
                cardflow_telemetry::continue_trace(&span, message.headers.get("traceparent").map(String::as_str));
                span
            })
        })
        .collect();
    let traceparents: Vec<Option<String>> =
        spans.iter().map(|s| s.as_ref().and_then(cardflow_telemetry::traceparent_of)).collect();
    let sends = messages.iter().zip(&traceparents).zip(spans).map(|(((_, _, message), traceparent), span)| {
        let mut record = FutureRecord::to(&message.topic)
            .key(&message.key)
            .payload(message.payload.get())
            .headers(record_headers(message, traceparent.as_deref()));
        if let Some(p) = message.partition {
            record = record.partition(p);
        }
        let producer = if message.is_reply() { &producers.replies } else { &producers.events };
        let delivery = producer.send(record, Timeout::After(Duration::from_secs(10)));
        async move {
            let delivered = delivery.await;
            // Each message's span ends with its own acknowledgement, not the round's.
            drop(span);
            delivered
        }
    });
    let results = futures::future::join_all(sends).await;
    let metrics = Metrics::global();
    let mut out = Published { done: Vec::with_capacity(rows.len()), ..Published::default() };
    let mut results = messages.iter().zip(results).peekable();
    while let Some(((row, position, message), result)) = results.next() {
        match result {
            Ok(_) => metrics.relay_published.with_label_values(&[&message.topic]).inc(),
            Err((e, _)) if refused_for_good(&e) => {
                tracing::error!(error = %e, outbox_id = row.id, position, topic = message.topic, "the broker refuses this message for good; parked");
                metrics.relay_parked.with_label_values(&[&message.topic]).inc();
                out.parked.push(ParkedMessage {
                    outbox_id: row.id,
                    position: *position as i32,
                    message: (*message).clone(),
                    reason: e.to_string(),
                });
            }
            Err((e, _)) => {
                tracing::warn!(error = %e, outbox_id = row.id, topic = message.topic, "publish failed; will retry");
                out.stopped = true;
                break;
            }
        }
        let row_ends = results.peek().is_none_or(|((next, _, _), _)| next.id != row.id);
        if row_ends {
            out.done.push(row.id);
        }
    }
    out
}

/// What the active relay does every few seconds besides publishing: checks it
/// still holds the lock, refreshes the outbox gauges, purges old published rows
/// and, every `audit_interval`, starts a ledger audit.
struct Housekeeping {
    last: Option<Instant>,
    last_audit: Option<Instant>,
    /// Set while an audit runs: on a large ledger one may outlast the interval,
    /// and audits must not pile up on the primary.
    auditing: Arc<AtomicBool>,
}

/// The lock connection broke: Postgres has freed the lock and a standby may hold it.
struct LockLost;

const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(5);

impl Housekeeping {
    fn new() -> Self {
        Housekeeping { last: None, last_audit: None, auditing: Arc::new(AtomicBool::new(false)) }
    }

    /// A new activation does its housekeeping and an audit at once (unless an
    /// audit from before still runs: then the next housekeeping starts it).
    fn activated(&mut self) {
        self.last = None;
        self.last_audit = None;
    }

    fn next_due(&self) -> tokio::time::Instant {
        match self.last {
            Some(t) => tokio::time::Instant::from_std(t + HOUSEKEEPING_EVERY),
            None => tokio::time::Instant::now(),
        }
    }

    fn due(&self) -> bool {
        self.next_due() <= tokio::time::Instant::now()
    }

    async fn run(
        &mut self,
        lock_conn: &mut sqlx::PgConnection,
        pool: &PgPool,
        config: &RelayConfig,
    ) -> Result<(), LockLost> {
        use sqlx::Connection;
        // Each step is bounded: a half-open lock connection must not hold the relay
        // (or its shutdown) for minutes, and a ping that cannot answer in time is
        // as good as lost. `last` is stamped after, so a slow database gets a
        // full interval of rest between rounds of housekeeping.
        let bound = HOUSEKEEPING_EVERY;
        let pinged = tokio::time::timeout(bound, lock_conn.ping()).await;
        if !matches!(pinged, Ok(Ok(()))) {
            self.last = Some(Instant::now());
            return Err(LockLost);
        }
        let metrics = Metrics::global();
        if let Ok(Ok((rows, age))) = tokio::time::timeout(bound, outbox::backlog(pool)).await {
            metrics.outbox_backlog.set(rows);
            metrics.outbox_oldest_age.set(age);
        }
        let retain = config.retain_published.as_secs() as i64;
        match tokio::time::timeout(bound, outbox::purge_published(pool, retain)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "outbox purge failed"),
            Err(_) => tracing::warn!("outbox purge took over {bound:?}; trying again later"),
        }
        // The active relay also audits the ledger now and then, so the audit
        // metrics (and their alerts) reflect a recent check.
        let audit_due = self.last_audit.is_none_or(|t| t.elapsed() >= config.audit_interval);
        if audit_due && !self.auditing.swap(true, Ordering::AcqRel) {
            self.last_audit = Some(Instant::now());
            let (pool, auditing) = (pool.clone(), self.auditing.clone());
            tokio::spawn(async move {
                match cardflow_ledger::audit::run(&pool).await {
                    // A relay that stood down meanwhile no longer reports the audit.
                    Ok(_) if Metrics::global().relay_active.get() != 1 => {}
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
                    // CardflowAuditStale fires when audits keep failing.
                    Err(e) => tracing::warn!(error = %e, "audit failed to run"),
                }
                auditing.store(false, Ordering::Release);
            });
        }
        self.last = Some(Instant::now());
        Ok(())
    }
}

/// A relay that stops being the active one stops reporting the outbox and the
/// audit: the alerts take the largest value across relays, and a standby's old
/// figures would hold them up (or keep them firing) after the new relay's differ.
fn stand_down() {
    let m = Metrics::global();
    m.relay_active.set(0);
    m.outbox_backlog.set(0);
    m.outbox_oldest_age.set(0.0);
    m.audit_violations.set(0);
}

pub async fn run_relay(
    config: RelayConfig,
    pool: PgPool,
    bus: BusConfig,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    let producers = Producers {
        events: bus.ordered_producer(config.producer_linger_ms)?,
        replies: bus.ordered_producer(config.producer_linger_ms)?,
    };
    let metrics = Metrics::global();
    // One for the process, not per activation: an audit started before a lock flap
    // must still keep the next activation from starting another beside it.
    let mut housekeeping = Housekeeping::new();
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
        housekeeping.activated();
        loop {
            if shutdown.is_cancelled() {
                stand_down();
                return Ok(());
            }
            if housekeeping.due() && housekeeping.run(&mut lock_conn, &pool, &config).await.is_err() {
                tracing::warn!("relay lost its lock connection; standing by");
                stand_down();
                continue 'standby;
            }
            let rows = match outbox::unpublished(&pool, config.batch).await {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the outbox failed");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            if !rows.is_empty() {
                let started = Instant::now();
                // Deliveries wait for the broker however long it takes (see
                // `ordered_producer`); a shutdown leaves the rows unmarked for the
                // next relay, which republishes them. Housekeeping goes on while a
                // round waits: the outbox gauges must grow during a broker outage
                // (their alert is how anyone hears of it), and a relay whose lock
                // is gone must stop publishing.
                let publishing = publish(&producers, &rows);
                tokio::pin!(publishing);
                let published = loop {
                    tokio::select! {
                        published = &mut publishing => break published,
                        _ = shutdown.cancelled() => {
                            stand_down();
                            return Ok(());
                        }
                        _ = tokio::time::sleep_until(housekeeping.next_due()) => {
                            if housekeeping.run(&mut lock_conn, &pool, &config).await.is_err() {
                                tracing::warn!(
                                    rows = rows.len(),
                                    "relay lost its lock connection during a round; leaving its rows to the next relay"
                                );
                                producers.abandon_round();
                                stand_down();
                                continue 'standby;
                            }
                        }
                    }
                };
                metrics.relay_publish_duration.observe(started.elapsed().as_secs_f64());
                // Parked messages are recorded before their row counts as handled.
                if !published.parked.is_empty() {
                    while let Err(e) = outbox::park(&pool, &published.parked).await {
                        tracing::warn!(error = %e, "parking outbox messages failed; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
                if !published.done.is_empty() {
                    while let Err(e) = outbox::mark_published(&pool, &published.done).await {
                        tracing::warn!(error = %e, "marking published failed; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
                if published.stopped {
                    // A transient failure: give the broker a moment before the retry.
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                continue; // more may be waiting; an empty read ends the burst
            }
            tokio::select! {
                _ = shutdown.cancelled() => {}
                n = listener.recv() => {
                    if let Err(e) = n {
                        tracing::warn!(error = %e, "outbox listener failed; sweeping");
                    }
                }
                _ = tokio::time::sleep(config.sweep_interval) => {}
            }
        }
    }
}
