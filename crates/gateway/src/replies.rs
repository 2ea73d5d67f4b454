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
/// requests may wait on one key (a client retrying before the first answer).
#[derive(Default)]
pub struct ReplyRouter {
    waiting: Mutex<HashMap<Key, Vec<oneshot::Sender<TransferResult>>>>,
    ready: AtomicBool,
}

impl ReplyRouter {
    pub fn register(&self, asp_id: &str, correlation_id: &str) -> oneshot::Receiver<TransferResult> {
        let (tx, rx) = oneshot::channel();
        let mut w = self.waiting.lock().unwrap();
        w.entry((asp_id.to_string(), correlation_id.to_string())).or_default().push(tx);
        cardflow_telemetry::Metrics::global().waiting_requests.set(w.values().map(Vec::len).sum::<usize>() as i64);
        rx
    }

    /// Drops waiters whose requests gave up (deadline passed or client gone).
    pub fn forget(&self, asp_id: &str, correlation_id: &str) {
        let mut w = self.waiting.lock().unwrap();
        let key = (asp_id.to_string(), correlation_id.to_string());
        if let Some(list) = w.get_mut(&key) {
            list.retain(|s| !s.is_closed());
            if list.is_empty() {
                w.remove(&key);
            }
        }
        cardflow_telemetry::Metrics::global().waiting_requests.set(w.values().map(Vec::len).sum::<usize>() as i64);
    }

    pub fn deliver(&self, result: TransferResult) {
        let key = (result.asp_id.to_string(), result.correlation_id.to_string());
        let waiters = self.waiting.lock().unwrap().remove(&key);
        for w in waiters.into_iter().flatten() {
            let _ = w.send(result.clone());
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

/// Assigns the gateway's reply partition at its current end and delivers every
/// result read from it. Runs until the process ends.
pub async fn run_reply_consumer(bus: BusConfig, partition: i32, router: Arc<ReplyRouter>) -> Result<(), BusError> {
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
