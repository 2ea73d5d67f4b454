//! Matching results back to the requests that wait for them.
//!
//! Each gateway instance owns one partition of `transfer.results` and reads it by
//! assignment, not through a consumer group, so a reply reaches only the gateway
//! that waits for it. A request registers before its command is published, so a
//! result that arrives quickly cannot be missed.

use cardflow_bus::rdkafka::consumer::{Consumer, StreamConsumer};
use cardflow_bus::rdkafka::message::Message;
use cardflow_bus::rdkafka::{Offset, TopicPartitionList};
use cardflow_bus::{BusConfig, BusError};
use cardflow_domain::TransferResult;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

type Key = (String, String);

/// Requests waiting for their result, by `(asp_id, correlation_id)`. Several
/// requests may wait on one key: a client retrying before the first answer, or
/// one reusing the id with a different body, which must not be told the first
/// body's result; each waiter keeps the fingerprint of the body it sent.
#[derive(Default)]
pub struct ReplyRouter {
    waiting: Mutex<Waiting>,
    ready: AtomicBool,
}

#[derive(Default)]
struct Waiting {
    by_key: HashMap<Key, Vec<(String, oneshot::Sender<TransferResult>)>>,
    /// The senders in `by_key`, kept as they come and go. Summed on every register
    /// and every drop instead, the gauge cost O(waiting) under the lock each time:
    /// quadratic in the very incident (a stalled worker, thousands of requests
    /// waiting out their deadline) when the gateway most needs its CPU.
    count: usize,
}

impl Waiting {
    fn publish_count(&self) {
        cardflow_telemetry::Metrics::global().waiting_requests.set(self.count as i64);
    }
}

/// A request's wait for its result. Dropping it, whatever the reason (the result
/// came, the deadline passed, the publish failed, the client went away and axum
/// dropped the handler), takes the request off the router, so no waiter outlives
/// its request even when its result never comes.
pub struct Waiter {
    rx: Option<oneshot::Receiver<TransferResult>>,
    router: Arc<ReplyRouter>,
    key: Key,
}

impl std::future::Future for Waiter {
    type Output = Result<TransferResult, oneshot::error::RecvError>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        std::pin::Pin::new(self.rx.as_mut().expect("a waiter holds its receiver until dropped")).poll(cx)
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        // Close the receiver first: `forget` keeps only senders whose receiver lives.
        drop(self.rx.take());
        self.router.forget(&self.key);
    }
}

impl ReplyRouter {
    pub fn register(self: &Arc<Self>, asp_id: &str, correlation_id: &str, fingerprint: &str) -> Waiter {
        let (tx, rx) = oneshot::channel();
        let key = (asp_id.to_string(), correlation_id.to_string());
        let mut w = self.waiting.lock().unwrap();
        w.by_key.entry(key.clone()).or_default().push((fingerprint.to_string(), tx));
        w.count += 1;
        w.publish_count();
        Waiter { rx: Some(rx), router: self.clone(), key }
    }

    /// Drops the waiters of `key` whose requests are gone.
    fn forget(&self, key: &Key) {
        let mut w = self.waiting.lock().unwrap();
        let Some(list) = w.by_key.get_mut(key) else {
            // Delivered: `deliver` took the key's last waiters and counted them out.
            return;
        };
        let before = list.len();
        list.retain(|(_, s)| !s.is_closed());
        let gone = before - list.len();
        if list.is_empty() {
            w.by_key.remove(key);
        }
        w.count -= gone;
        w.publish_count();
    }

    /// How many requests wait for a result.
    pub fn waiting(&self) -> usize {
        self.waiting.lock().unwrap().count
    }

    /// Hands a result to the requests it answers: those that sent the body it was
    /// decided for. A result without a fingerprint (from an older worker) goes to
    /// every request under its key, as before the field.
    pub fn deliver(&self, result: TransferResult) {
        let key = (result.asp_id.to_string(), result.correlation_id.to_string());
        let answered = {
            let mut w = self.waiting.lock().unwrap();
            let Some(list) = w.by_key.get_mut(&key) else {
                return;
            };
            let answered: Vec<_> = match result.request_fingerprint.as_deref() {
                None => std::mem::take(list),
                Some(f) => list.extract_if(.., |(sent, _)| sent == f).collect(),
            };
            if list.is_empty() {
                w.by_key.remove(&key);
            }
            w.count -= answered.len();
            w.publish_count();
            answered
        };
        for (_, w) in answered {
            let _ = w.send(result.clone());
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

/// Runs the reply consumer for the life of the process, starting it again when it
/// cannot start (the broker unreachable for the ten seconds its high watermark may
/// take, say, just after the topics were checked). Given up, the gateway would go
/// on publishing commands and answer every synchronous request `202` after the
/// whole deadline, for good; retried, it only stays not ready (`/ready`) until the
/// broker answers.
pub async fn keep_reading_replies(bus: BusConfig, partition: i32, router: Arc<ReplyRouter>) {
    let mut pause = Duration::from_millis(500);
    loop {
        if let Err(e) = run_reply_consumer(bus.clone(), partition, router.clone()).await {
            tracing::error!(error = %e, retry_in_ms = pause.as_millis() as u64, "reply consumer could not start");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(10));
        }
    }
}

/// Assigns the gateway's reply partition at its current end and delivers every
/// result read from it. Returns only when it cannot start.
async fn run_reply_consumer(bus: BusConfig, partition: i32, router: Arc<ReplyRouter>) -> Result<(), BusError> {
    let consumer: StreamConsumer = bus.assigned_consumer()?;
    let topic = bus.topics.results.clone();
    // Start at the high watermark read now, not at "end" resolved later: a result
    // written between the two would otherwise be skipped.
    let (_, high) = {
        let c = &consumer;
        let t = topic.clone();
        tokio::task::block_in_place(|| c.fetch_watermarks(&t, partition, Duration::from_secs(10)))?
    };
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, partition, Offset::Offset(high))?;
    consumer.assign(&tpl)?;
    router.ready.store(true, Ordering::Relaxed);
    tracing::info!(topic, partition, offset = high, "reading replies");
    loop {
        match consumer.recv().await {
            Ok(msg) => {
                let Some(payload) = msg.payload() else {
                    continue;
                };
                match serde_json::from_slice::<TransferResult>(payload) {
                    Ok(result) if cardflow_telemetry::exporting() => {
                        // The last hop of the transfer's trace: the relay's publish is its parent.
                        let span = tracing::info_span!(
                            "transfer.results receive",
                            otel.kind = "consumer",
                            correlation_id = result.correlation_id.as_str()
                        );
                        cardflow_telemetry::continue_trace(
                            &span,
                            cardflow_bus::headers::get(msg.headers(), cardflow_bus::headers::TRACEPARENT),
                        );
                        let _in_span = span.enter();
                        router.deliver(result);
                    }
                    Ok(result) => router.deliver(result),
                    Err(e) => {
                        tracing::warn!(error = %e, offset = msg.offset(), "unreadable reply skipped")
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "reply consumer error");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cardflow_domain::{AspId, CorrelationId, TransferOutcome};

    fn result(corr: &str) -> TransferResult {
        TransferResult { request_fingerprint: Some("fa".into()), ..result_of_an_older_worker(corr) }
    }

    fn result_of_an_older_worker(corr: &str) -> TransferResult {
        TransferResult {
            schema_version: 1,
            asp_id: AspId::parse("DEMOASP00000001").unwrap(),
            correlation_id: CorrelationId::parse(corr).unwrap(),
            transfer_id: None,
            outcome: TransferOutcome::Completed,
            code: "000_000".into(),
            message: "Success.".into(),
            amount: None,
            decided_at: chrono::Utc::now(),
            request_fingerprint: None,
        }
    }

    #[tokio::test]
    async fn a_result_reaches_only_the_requests_that_sent_the_body_it_answers() {
        let router = Arc::new(ReplyRouter::default());
        let owner = router.register("DEMOASP00000001", "261124153000-00000a1", "fa");
        let mut reused = router.register("DEMOASP00000001", "261124153000-00000a1", "fb");
        router.deliver(result("261124153000-00000a1"));
        assert_eq!(owner.await.unwrap().code, "000_000");
        assert!(futures::poll!(&mut reused).is_pending(), "the other body's request still waits for its own answer");
        assert_eq!(router.waiting(), 1);
        let mut conflict = result("261124153000-00000a1");
        conflict.code = "000_008".into();
        conflict.request_fingerprint = Some("fb".into());
        router.deliver(conflict);
        assert_eq!(reused.await.unwrap().code, "000_008");
        assert_eq!(router.waiting(), 0);
    }

    #[tokio::test]
    async fn a_result_without_a_fingerprint_reaches_every_waiter_of_its_request() {
        let router = Arc::new(ReplyRouter::default());
        let (a, b) = (
            router.register("DEMOASP00000001", "261124153000-00000a1", "fa"),
            router.register("DEMOASP00000001", "261124153000-00000a1", "fb"),
        );
        router.deliver(result_of_an_older_worker("261124153000-00000a1"));
        assert_eq!(a.await.unwrap().code, "000_000");
        assert_eq!(b.await.unwrap().code, "000_000");
        assert_eq!(router.waiting(), 0);
    }

    #[tokio::test]
    async fn a_delivered_result_reaches_every_retry_of_its_request() {
        let router = Arc::new(ReplyRouter::default());
        let (a, b) = (
            router.register("DEMOASP00000001", "261124153000-00000a1", "fa"),
            router.register("DEMOASP00000001", "261124153000-00000a1", "fa"),
        );
        router.deliver(result("261124153000-00000a1"));
        assert_eq!(a.await.unwrap().code, "000_000");
        assert_eq!(b.await.unwrap().code, "000_000");
        assert_eq!(router.waiting(), 0);
    }

    #[test]
    fn a_waiter_that_gives_up_leaves_nothing_behind() {
        let router = Arc::new(ReplyRouter::default());
        let kept = router.register("DEMOASP00000001", "261124153000-00000a1", "fa");
        drop(router.register("DEMOASP00000001", "261124153000-00000a1", "fa"));
        drop(router.register("DEMOASP00000001", "261124153000-00000b2", "fb"));
        assert_eq!(router.waiting(), 1, "only the request still waiting");
        drop(kept);
        assert_eq!(router.waiting(), 0);
    }

    #[tokio::test]
    async fn a_delivered_request_leaves_the_count_once_and_others_stay_counted() {
        let router = Arc::new(ReplyRouter::default());
        let others: Vec<Waiter> =
            (0..50).map(|i| router.register("DEMOASP00000001", &format!("261124153000-{i:07x}"), "f")).collect();
        let (a, b) = (
            router.register("DEMOASP00000001", "261124153000-00000a1", "fa"),
            router.register("DEMOASP00000001", "261124153000-00000a1", "fa"),
        );
        assert_eq!(router.waiting(), 52);
        router.deliver(result("261124153000-00000a1"));
        assert_eq!(router.waiting(), 50, "both waiters of the delivered request");
        assert_eq!(a.await.unwrap().code, "000_000");
        assert_eq!(b.await.unwrap().code, "000_000");
        assert_eq!(router.waiting(), 50, "dropping a delivered waiter counts it out only once");
        drop(others);
        assert_eq!(router.waiting(), 0);
    }
}
