//! The worker's loop: poll a batch of commands, apply it in one transaction, then
//! commit the offsets. Commands it cannot apply go to the dead-letter topic with the
//! reason in a header, and the loop moves on; one that still names its request is
//! answered `017_002` as well, so that its caller is not left pending for good. Which
//! commands form the next batch, and when a second batch may run beside the first, is
//! [`crate::schedule`]; what a rebalance takes away from it, [`crate::ownership`].

use crate::ownership::{Applying, Generation, Ownership};
use crate::schedule::{self, Waiting};
use crate::WorkerError;
use cardflow_bus::headers as h;
use cardflow_bus::rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use cardflow_bus::rdkafka::error::KafkaResult;
use cardflow_bus::rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use cardflow_bus::rdkafka::producer::{FutureProducer, FutureRecord};
use cardflow_bus::rdkafka::util::Timeout;
use cardflow_bus::rdkafka::{ClientContext, Offset, TopicPartitionList};
use cardflow_bus::BusConfig;
use cardflow_domain::command::SCHEMA_VERSION;
use cardflow_domain::TransferCommand;
use cardflow_ledger::batch::{apply_resilient, record_failure, IncomingCommand, RetryPolicy};
use cardflow_ledger::OutboxTopics;
use cardflow_telemetry::Metrics;
use sqlx::PgPool;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub group_id: String,
    /// Most commands applied in one transaction.
    pub max_batch: usize,
    /// How long to keep collecting after the first command of a batch arrived.
    pub batch_linger: Duration,
    /// The platform's time zone: a card expires at the end of its `expiresOn` there.
    pub platform_tz: chrono_tz::Tz,
    pub retry: RetryPolicy,
    /// Batch transactions in flight at once; more than one only while a full
    /// batch waits (see [`crate::schedule`]). At least 1.
    pub max_in_flight: usize,
}

enum Polled {
    /// A command to apply, with its message, which goes to the dead-letter topic
    /// if the ledger can store nothing of it.
    Command(IncomingCommand, OwnedMessage),
    /// A message this worker will not apply. `answer` is the command when it still
    /// reads as one: its request is then answered `017_002` (stored, so a later
    /// redrive from the dead-letter topic is a repeat and moves no money) instead
    /// of staying pending for good. A message that does not decode names no request.
    Poison { message: OwnedMessage, reason: String, answer: Option<IncomingCommand> },
}

fn decode(msg: OwnedMessage) -> Polled {
    let payload = msg.payload().unwrap_or_default();
    let command = match serde_json::from_slice::<TransferCommand>(payload) {
        Ok(cmd) => cmd,
        Err(e) => return Polled::Poison { message: msg, reason: format!("undecodable command: {e}"), answer: None },
    };
    // The version first: a later release may fingerprint its requests another way,
    // and its caller is still owed the answer documented for a version this worker
    // does not read (`017_002`). Stored with the fingerprint sent; one Postgres
    // cannot store is given up on when it is answered.
    let refusal = if command.schema_version != SCHEMA_VERSION {
        Some(format!("unsupported schema version {}", command.schema_version))
    } else if command.fingerprint != command.request.fingerprint() {
        // Stored with the transfer and compared on every repeat, so it must be the
        // request's own: a gateway always sends that, and anything else (a made-up
        // value, a string Postgres cannot store) could never be recorded or answered.
        let reason = "fingerprint does not match the request".to_string();
        return Polled::Poison { message: msg, reason, answer: None };
    } else if command.request.amount.is_some_and(|a| !a.is_request_amount()) {
        Some("amount is not a whole number in 0..999999999999".to_string())
    } else {
        None
    };
    let traceparent = msg.headers().and_then(|hs| {
        hs.iter()
            .find(|x| x.key == h::TRACEPARENT)
            .and_then(|x| x.value)
            .and_then(|v| std::str::from_utf8(v).ok())
            .map(str::to_string)
    });
    let incoming = IncomingCommand { command, traceparent };
    match refusal {
        None => Polled::Command(incoming, msg),
        Some(reason) => Polled::Poison { message: msg, reason, answer: Some(incoming) },
    }
}

async fn dead_letter(
    producer: &FutureProducer,
    dlq: &str,
    message: &OwnedMessage,
    reason: &str,
) -> Result<(), WorkerError> {
    let mut headers = OwnedHeaders::new();
    if let Some(orig) = message.headers() {
        for x in orig.iter() {
            headers = headers.insert(Header { key: x.key, value: x.value });
        }
    }
    let partition = message.partition().to_string();
    let offset = message.offset().to_string();
    headers = headers
        .insert(Header { key: h::DLQ_REASON, value: Some(reason.as_bytes()) })
        .insert(Header { key: "dlq-source-topic", value: Some(message.topic().as_bytes()) })
        .insert(Header { key: "dlq-source-partition", value: Some(partition.as_bytes()) })
        .insert(Header { key: "dlq-source-offset", value: Some(offset.as_bytes()) });
    let mut record: FutureRecord<[u8], [u8]> = FutureRecord::to(dlq).headers(headers);
    if let Some(k) = message.key() {
        record = record.key(k);
    }
    if let Some(p) = message.payload() {
        record = record.payload(p);
    }
    producer.send(record, Timeout::After(Duration::from_secs(10))).await.map_err(|(e, _)| WorkerError::Kafka(e))?;
    Metrics::global().dlq_messages.inc();
    tracing::warn!(
        reason,
        partition = message.partition(),
        offset = message.offset(),
        "command sent to the dead-letter topic"
    );
    Ok(())
}

/// The longest a revoke waits for the batches applying its partitions. Past it
/// (the database away) those batches commit nothing for them; a rebalance that
/// waits longer would keep the group from working for everyone.
const REVOKE_WAIT: Duration = Duration::from_secs(10);

/// The commands consumer's callbacks: see [`crate::ownership`].
pub struct WorkerContext {
    ownership: Arc<Ownership>,
}

impl ClientContext for WorkerContext {}

impl ConsumerContext for WorkerContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(revoked) = rebalance else {
            return;
        };
        let partitions: Vec<i32> = revoked.elements().iter().map(|e| e.partition()).collect();
        let revoke = || self.ownership.revoke(&partitions, REVOKE_WAIT);
        // The callback runs inside `recv`, on a runtime thread: hand that thread's
        // other tasks (the batches being waited for among them) to another first.
        let released = match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
            Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(revoke),
            _ => revoke(),
        };
        if released {
            tracing::info!(?partitions, "partitions revoked");
        } else {
            tracing::warn!(?partitions, wait = ?REVOKE_WAIT, "partitions revoked while a batch still applies them; its offsets for them will not be committed");
        }
    }
}

type CommandConsumer = StreamConsumer<WorkerContext>;

/// Receives messages on a task of its own, so that the next batch gathers while
/// the current one is in the database: under load a batch is whatever arrived
/// during the last transaction (up to `max_batch`), without waiting for a linger.
/// `make bench` measured the serial poll-then-apply loop at half the drain rate.
fn spawn_receiver(
    consumer: Arc<CommandConsumer>,
    ownership: Arc<Ownership>,
    capacity: usize,
    shutdown: CancellationToken,
) -> mpsc::Receiver<KafkaResult<(Generation, OwnedMessage)>> {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    tokio::spawn(async move {
        loop {
            let polled = tokio::select! {
                _ = shutdown.cancelled() => return,
                // Tagged after `recv` returns: a revoke it ran makes only earlier
                // messages stale.
                m = consumer.recv() => m.map(|m| (ownership.generation(), m.detach())),
            };
            if tx.send(polled).await.is_err() {
                return;
            }
        }
    });
    rx
}

pub async fn run_worker(
    config: WorkerConfig,
    pool: PgPool,
    bus: BusConfig,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    let max_in_flight = config.max_in_flight.max(1);
    // Each batch holds a connection for its whole transaction; fewer connections
    // than batches in flight would have them time out waiting for one another.
    if (pool.options().get_max_connections() as usize) < max_in_flight {
        return Err(WorkerError::Config(format!(
            "WORKER_DB_POOL ({}) must be at least WORKER_BATCHES_IN_FLIGHT ({max_in_flight})",
            pool.options().get_max_connections()
        )));
    }
    let ownership = Arc::new(Ownership::default());
    let consumer: Arc<CommandConsumer> =
        Arc::new(bus.group_consumer(&config.group_id, WorkerContext { ownership: ownership.clone() })?);
    consumer.subscribe(&[&bus.topics.commands])?;
    let applier = Arc::new(Applier {
        dlq_producer: bus.producer(0)?,
        dlq: bus.topics.dlq.clone(),
        topics: OutboxTopics {
            card_balance: bus.topics.card_balance.clone(),
            transfer_events: bus.topics.transfer_events.clone(),
        },
        consumer: consumer.clone(),
        pool,
        config: config.clone(),
    });
    tokio::spawn(report_lag(consumer.clone(), shutdown.clone()));
    tracing::info!(group = config.group_id, topic = bus.topics.commands, max_in_flight, "worker consuming");

    let metrics = Metrics::global();
    let max_batch = config.max_batch.max(1);
    let mut received = spawn_receiver(consumer, ownership.clone(), max_batch, shutdown.clone());
    let mut waiting: Waiting<(Generation, OwnedMessage)> = Waiting::default();
    let mut busy: BTreeSet<i32> = BTreeSet::new();
    let mut in_flight: JoinSet<(Vec<i32>, Result<(), WorkerError>)> = JoinSet::new();
    let mut linger_until: Option<tokio::time::Instant> = None;
    let mut receiving = true;
    let mut outcome = Ok(());
    loop {
        let stopping = shutdown.is_cancelled() || outcome.is_err();
        // Read once a turn: both whether a batch starts and whether to receive need it.
        let free = waiting.free(&busy);
        if !stopping {
            if free > 0 && in_flight.is_empty() && linger_until.is_none() {
                linger_until = Some(tokio::time::Instant::now() + config.batch_linger);
            }
            let lingered = linger_until.is_some_and(|t| tokio::time::Instant::now() >= t);
            if schedule::starts_now(in_flight.len(), max_in_flight, free, max_batch, lingered) {
                let (partitions, messages) = waiting.take(&busy, max_batch);
                linger_until = None;
                let (applying, messages) = ownership.start_batch(messages, |m| m.partition());
                if messages.is_empty() {
                    continue;
                }
                busy.extend(&partitions);
                if !in_flight.is_empty() {
                    metrics.batches_beside_another.inc();
                }
                metrics.batches_in_flight.set(in_flight.len() as i64 + 1);
                let applier = applier.clone();
                let shutdown = shutdown.clone();
                in_flight.spawn(async move {
                    let applied = applier.apply(messages, &applying, &shutdown).await;
                    drop(applying);
                    (partitions, applied)
                });
                continue;
            }
        } else if in_flight.is_empty() {
            break;
        }
        // Set only while no batch is in flight (a batch start clears it).
        let linger = linger_until.filter(|_| !stopping);
        let receives_now = schedule::receives_now(free, waiting.len(), max_batch, max_in_flight);
        tokio::select! {
            Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                match done {
                    Ok((partitions, result)) => {
                        for p in partitions {
                            busy.remove(&p);
                        }
                        metrics.batches_in_flight.set(in_flight.len() as i64);
                        if let Err(e) = result {
                            outcome = Err(e);
                        }
                    }
                    // A batch task that panicked: stop, and let the commands be
                    // delivered again to whoever runs next.
                    Err(e) => outcome = Err(WorkerError::Batch(e.to_string())),
                }
            }
            polled = received.recv(), if receiving && !stopping && receives_now => {
                match polled {
                    Some(Ok((generation, m))) => waiting.push(m.partition(), (generation, m)),
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "consumer error");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    None => receiving = false,
                }
            }
            _ = tokio::time::sleep_until(linger.unwrap_or_else(tokio::time::Instant::now)), if linger.is_some() => {}
            _ = shutdown.cancelled(), if !stopping => {}
            else => break,
        }
    }
    tracing::info!("worker stopped");
    outcome
}

/// What every batch of a worker shares.
struct Applier {
    consumer: Arc<CommandConsumer>,
    pool: PgPool,
    config: WorkerConfig,
    topics: OutboxTopics,
    dlq_producer: FutureProducer,
    dlq: String,
}

impl Applier {
    /// Decodes, applies and commits one batch. Retries while the database is
    /// unreachable, until shutdown.
    async fn apply(
        &self,
        messages: Vec<OwnedMessage>,
        applying: &Applying,
        shutdown: &CancellationToken,
    ) -> Result<(), WorkerError> {
        let (config, pool, topics) = (&self.config, &self.pool, &self.topics);
        let metrics = Metrics::global();
        let mut offsets: BTreeMap<(String, i32), i64> = BTreeMap::new();
        let mut commands = Vec::with_capacity(messages.len());
        let mut command_messages = Vec::with_capacity(messages.len());
        let mut refused = Vec::new();
        for m in messages {
            let slot = offsets.entry((m.topic().to_string(), m.partition())).or_insert(m.offset());
            *slot = (*slot).max(m.offset());
            match decode(m) {
                Polled::Command(c, message) => {
                    commands.push(c);
                    command_messages.push(message);
                }
                Polled::Poison { message, reason, answer } => {
                    // Without the DLQ copy the offset must not move: retry until Kafka takes it.
                    while let Err(e) = dead_letter(&self.dlq_producer, &self.dlq, &message, &reason).await {
                        tracing::error!(error = %e, "dead-lettering failed; retrying");
                        if !pause_before_retry(shutdown).await {
                            return Ok(());
                        }
                    }
                    refused.extend(answer);
                }
            }
        }
        if !commands.is_empty() {
            let started = Instant::now();
            let batch_span = tracing::info_span!("worker.batch", otel.kind = "internal", batch_size = commands.len());
            let apply_spans = trace_commands(&mut commands, &batch_span);
            loop {
                let today = chrono::Utc::now().with_timezone(&config.platform_tz).date_naive();
                match apply_resilient(pool, &commands, topics, today, config.retry).instrument(batch_span.clone()).await
                {
                    Ok(report) => {
                        if report.split {
                            metrics.batch_failures.inc();
                        }
                        metrics.batch_size.observe(commands.len() as f64);
                        metrics.batch_duration.observe(started.elapsed().as_secs_f64());
                        let unrecorded: BTreeSet<usize> = report.unrecorded.iter().map(|(i, _)| *i).collect();
                        let recorded = (0..commands.len()).filter(|i| !unrecorded.contains(i));
                        for (i, r) in recorded.zip(report.results.iter()) {
                            let repeat = if r.repeat { "true" } else { "false" };
                            metrics.commands_applied.with_label_values(&[&r.result.code, repeat]).inc();
                            if let Some(span) = apply_spans.get(i) {
                                if let Some(id) = r.result.transfer_id {
                                    span.record("transfer_id", tracing::field::display(id));
                                }
                                span.record("code", r.result.code.as_str());
                            }
                            tracing::debug!(
                                correlation_id = %r.result.correlation_id,
                                asp_id = %r.result.asp_id,
                                transfer_id = ?r.result.transfer_id,
                                code = r.result.code,
                                repeat = r.repeat,
                                "decided"
                            );
                        }
                        // The ledger holds nothing of these: the offsets move only
                        // once the dead-letter topic does.
                        for (i, reason) in &report.unrecorded {
                            while let Err(e) =
                                dead_letter(&self.dlq_producer, &self.dlq, &command_messages[*i], reason).await
                            {
                                tracing::error!(error = %e, "dead-lettering failed; retrying");
                                if !pause_before_retry(shutdown).await {
                                    return Ok(());
                                }
                            }
                        }
                        break;
                    }
                    Err(e) => {
                        // A temporary failure (the database unreachable, a deadlock):
                        // nothing of it was recorded. Keep the batch and its offsets
                        // and try again.
                        metrics.batch_failures.inc();
                        tracing::error!(error = %e, "database unavailable; retrying the batch");
                        if !pause_before_retry(shutdown).await {
                            return Ok(());
                        }
                    }
                }
            }
        }

        // The offsets move only once the refused requests are answered too: a
        // redelivery dead-letters them again and finds the answers stored. After the
        // batch, so that a message this worker cannot apply never takes the key of
        // a command it can.
        for incoming in &refused {
            loop {
                match record_failure(pool, incoming, topics).await {
                    Ok(r) => {
                        metrics.commands_applied.with_label_values(&[&r.result.code, &r.repeat.to_string()]).inc();
                        break;
                    }
                    // The message is on the dead-letter topic already, which is
                    // where an operator finds it; retrying an answer the database
                    // refuses for good would stop this worker's partitions.
                    Err(e) if !e.is_transient() => {
                        tracing::error!(error = %e, correlation_id = %incoming.command.correlation_id, "a dead-lettered command cannot be answered; it stays pending");
                        break;
                    }
                    Err(e) => {
                        tracing::error!(error = %e, correlation_id = %incoming.command.correlation_id, "answering a dead-lettered command failed; retrying");
                        if !pause_before_retry(shutdown).await {
                            return Ok(());
                        }
                    }
                }
            }
        }

        // Not the partitions revoked since, unless their revoke still waits for
        // this batch: the new owner's commits must not be overtaken by older ones.
        applying.commit_owned(offsets.keys().map(|(_, p)| *p), |owned| -> Result<(), WorkerError> {
            let mut tpl = TopicPartitionList::new();
            for ((topic, partition), offset) in &offsets {
                if owned.contains(partition) {
                    tpl.add_partition_offset(topic, *partition, Offset::Offset(offset + 1))?;
                }
            }
            if tpl.count() == 0 {
                return Ok(());
            }
            // Async is enough: a commit lost here only means a redelivery, which the
            // ledger answers from the stored result. A batch commits only its own
            // partitions, which no other batch in flight holds. It also only queues
            // the request, as it must under the revoke's lock.
            if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
                tracing::warn!(error = %e, "offset commit failed; the batch may be redelivered");
            }
            Ok(())
        })
    }
}

/// After a failed attempt at something a batch's offsets wait for (its dead
/// letters, its transaction, its refused requests' answers): false once shutdown
/// has come, which leaves the batch uncommitted, to be delivered again; otherwise
/// true, after a second's pause.
async fn pause_before_retry(shutdown: &CancellationToken) -> bool {
    if shutdown.is_cancelled() {
        return false;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    true
}

/// When traces are exported: one span per command, a child of the gateway's
/// produce span and linked to the batch span it was applied in, whose context
/// replaces the command's `traceparent` so the outbox rows (and the relay's
/// publish) continue the transfer's trace. Nothing when traces are off.
fn trace_commands(commands: &mut [IncomingCommand], batch: &tracing::Span) -> Vec<tracing::Span> {
    if !cardflow_telemetry::exporting() {
        return Vec::new();
    }
    commands
        .iter_mut()
        .map(|c| {
            let span = tracing::info_span!(
                "transfer.apply",
                otel.kind = "consumer",
                correlation_id = c.command.correlation_id.as_str(),
                asp_id = c.command.asp_id.as_str(),
                transfer_id = tracing::field::Empty,
                code = tracing::field::Empty,
            );
            cardflow_telemetry::continue_trace(&span, c.traceparent.as_deref());
            cardflow_telemetry::link(&span, batch);
            if let Some(tp) = cardflow_telemetry::traceparent_of(&span) {
                c.traceparent = Some(tp);
            }
            span
        })
        .collect()
}

/// Messages in a partition the group has not committed. With no commit yet the
/// group starts from the earliest retained message (`auto.offset.reset`).
fn lag_of(committed: Offset, low: i64, high: i64) -> i64 {
    match committed {
        Offset::Offset(p) => (high - p.max(low)).max(0),
        _ => (high - low).max(0),
    }
}

async fn report_lag(consumer: Arc<CommandConsumer>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
        let c = consumer.clone();
        let lags = tokio::task::spawn_blocking(move || {
            // Lag is what the group has not committed, the figure Kafka's own tools
            // show: a worker commits a batch only once it is applied, so commands
            // fetched but still waiting count. The fetch position would not do: it
            // is unset on a partition nothing was read from since it was assigned,
            // which made an idle partition report its whole history after a restart.
            // A failed lookup (a slow coordinator, just when lag is high) keeps the
            // last figures: an empty report would wipe them and restart the lag
            // alert's `for`.
            let mut out = Vec::new();
            let Ok(committed) = c.committed(Duration::from_secs(2)) else {
                return None;
            };
            for e in committed.elements() {
                if let Ok((low, high)) = c.fetch_watermarks(e.topic(), e.partition(), Duration::from_secs(2)) {
                    out.push((e.partition(), lag_of(e.offset(), low, high)));
                }
            }
            Some(out)
        })
        .await
        .ok()
        .flatten();
        let Some(lags) = lags else {
            continue;
        };
        let gauge = &Metrics::global().consumer_lag;
        // Only partitions this worker owns now: a partition lost in a rebalance
        // must not keep reporting its last lag.
        gauge.reset();
        for (partition, lag) in lags {
            gauge.with_label_values(&[&partition.to_string()]).set(lag);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_committed_to_its_end_has_no_lag() {
        assert_eq!(lag_of(Offset::Offset(120), 0, 120), 0);
    }

    #[test]
    fn lag_counts_the_messages_after_the_committed_offset() {
        assert_eq!(lag_of(Offset::Offset(100), 0, 120), 20);
    }

    #[test]
    fn a_partition_never_committed_lags_by_what_it_retains() {
        assert_eq!(lag_of(Offset::Invalid, 40, 120), 80);
    }

    #[test]
    fn a_commit_older_than_what_is_retained_counts_only_retained_messages() {
        assert_eq!(lag_of(Offset::Offset(10), 40, 120), 80);
    }
}
