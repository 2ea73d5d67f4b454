//! Everything cardflow knows about Kafka: the topic names, how producers and
//! consumers are configured, and how correlation ids, reply addresses and trace
//! context travel in message headers.
//!
//! Settings live here, in one place, because their interplay is subtle: commands
//! are produced idempotently with `acks=all` so a retry cannot reorder or duplicate
//! them; consumers never auto-commit, because the worker commits offsets only after
//! its database transaction. This crate must not know about Postgres, HTTP or the
//! meaning of a transfer: payloads are bytes here.

pub mod headers;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::FutureProducer;
use std::time::Duration;

pub use rdkafka;

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("creating topic {topic}: {code}")]
    CreateTopic { topic: String, code: RDKafkaErrorCode },
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("partition {partition} of {topic} does not exist: the topic has {partitions}")]
    NoSuchPartition { topic: String, partition: i32, partitions: i32 },
}

/// The physical names of cardflow's topics. A prefix lets several systems (or test
/// runs) share one cluster without seeing each other's messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    pub commands: String,
    pub results: String,
    pub card_balance: String,
    pub transfer_events: String,
    pub dlq: String,
}

impl Topics {
    pub fn with_prefix(prefix: &str) -> Self {
        Topics {
            commands: format!("{prefix}transfer.commands"),
            results: format!("{prefix}transfer.results"),
            card_balance: format!("{prefix}card.balance"),
            transfer_events: format!("{prefix}transfer.events"),
            dlq: format!("{prefix}transfer.commands.dlq"),
        }
    }

    pub fn all(&self) -> [&str; 5] {
        [&self.commands, &self.results, &self.card_balance, &self.transfer_events, &self.dlq]
    }
}

/// How to reach the cluster and how wide the topics are.
#[derive(Debug, Clone)]
pub struct BusConfig {
    pub brokers: String,
    pub topics: Topics,
    /// Partitions of `transfer.commands`, `card.balance` and `transfer.events`:
    /// the ceiling on worker parallelism.
    pub partitions: i32,
    /// Partitions of `transfer.results`: one per gateway instance at most.
    pub reply_partitions: i32,
    pub replication: i32,
    /// How long the broker may hold a fetch that has no data. Every idle consumer
    /// sends 1000/this fetches a second. Apache Kafka answers a fetch as soon as
    /// data arrives, so there this only bounds idle polling; Tansu 0.6 holds every
    /// fetch for the whole wait, data or not, so on the local stack every hop of a
    /// synchronous transfer costs 1 to 2 waits.
    pub fetch_wait_ms: u32,
}

/// The default of `KAFKA_FETCH_WAIT_MS`, chosen for the local Tansu: at 2 ms sync
/// p50 at half the maximum was 31 and 34 ms against 45 and 41 ms at 5 ms, and async
/// and drain throughput did not change (`make bench`, docs/bench/history.md).
pub const DEFAULT_FETCH_WAIT_MS: u32 = 2;

impl BusConfig {
    fn base(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("client.id", "cardflow")
            .set("socket.keepalive.enable", "true")
            .set("topic.metadata.refresh.interval.ms", "10000");
        c
    }

    /// An idempotent producer: `acks=all`, retries that cannot duplicate or reorder,
    /// and a murmur2 partitioner so keys land where Java clients would put them. A
    /// message not delivered within 30 s fails.
    pub fn producer(&self, linger_ms: u32) -> Result<FutureProducer, BusError> {
        Ok(self.idempotent(linger_ms).set("message.timeout.ms", "30000").create()?)
    }

    /// An idempotent producer whose messages never time out: each is retried until
    /// the broker stores it or refuses it for good, for a caller (the relay) that
    /// must keep a partition's order across an outage. A message that times out in
    /// librdkafka's queue is skipped, and the ones queued behind it are written
    /// (its "message timeout considerations"): the caller's retry then writes the
    /// skipped one after its successors, and a card's balance events arrive out of
    /// order.
    pub fn ordered_producer(&self, linger_ms: u32) -> Result<FutureProducer, BusError> {
        Ok(self.idempotent(linger_ms).set("message.timeout.ms", "0").create()?)
    }

    fn idempotent(&self, linger_ms: u32) -> ClientConfig {
        let mut c = self.base();
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("max.in.flight.requests.per.connection", "5")
            .set("linger.ms", linger_ms.to_string())
            .set("compression.type", "none")
            .set("partitioner", "murmur2_random");
        c
    }

    /// A consumer in a group (the workers): manual offset commits only.
    pub fn group_consumer<
        C: rdkafka::consumer::ConsumerContext + 'static,
        T: rdkafka::config::FromClientConfigAndContext<C>,
    >(
        &self,
        group: &str,
        context: C,
    ) -> Result<T, BusError> {
        Ok(self
            .base()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "1000")
            .set("fetch.wait.max.ms", self.fetch_wait_ms.to_string())
            .set("fetch.min.bytes", "1")
            .set("partition.assignment.strategy", "range")
            .create_with_context(context)?)
    }

    /// A consumer that is assigned partitions explicitly and joins no group (the
    /// gateway's reply reader, `tail`, tests).
    pub fn assigned_consumer<T: rdkafka::config::FromClientConfig>(&self) -> Result<T, BusError> {
        let group = format!("cardflow-assigned-{:016x}", rand::random::<u64>());
        Ok(self
            .base()
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", self.fetch_wait_ms.to_string())
            .set("fetch.min.bytes", "1")
            .create()?)
    }

    /// Creates the topics that do not exist yet; existing ones are left as they are.
    pub async fn ensure_topics(&self) -> Result<(), BusError> {
        let admin: AdminClient<DefaultClientContext> = self.base().create()?;
        let specs: Vec<(&str, i32)> = vec![
            (&self.topics.commands, self.partitions),
            (&self.topics.results, self.reply_partitions),
            (&self.topics.card_balance, self.partitions),
            (&self.topics.transfer_events, self.partitions),
            (&self.topics.dlq, 1),
        ];
        let new: Vec<NewTopic> =
            specs.iter().map(|(name, p)| NewTopic::new(name, *p, TopicReplication::Fixed(self.replication))).collect();
        let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
        for result in admin.create_topics(new.iter(), &opts).await? {
            match result {
                Ok(_) => {}
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => return Err(BusError::CreateTopic { topic, code }),
            }
        }
        // Metadata reaches every broker a little after creation; wait until the
        // topics are visible so the first produce does not fail.
        let probe: BaseConsumer = self.assigned_consumer()?;
        for name in self.topics.all() {
            let deadline = std::time::Instant::now() + Duration::from_secs(15);
            loop {
                let visible = probe
                    .fetch_metadata(Some(name), Duration::from_secs(2))
                    .map(|m| {
                        m.topics().iter().any(|t| t.name() == name && t.error().is_none() && !t.partitions().is_empty())
                    })
                    .unwrap_or(false);
                if visible {
                    break;
                }
                if std::time::Instant::now() > deadline {
                    return Err(BusError::Timeout(format!("topic {name} did not appear")));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok(())
    }
}

/// Answers readiness probes: whether the cluster answers a metadata request; and,
/// at start, whether a partition exists. One client made at start serves every
/// probe (a client per probe would cost threads and connections on every call).
#[derive(Clone)]
pub struct BrokerProbe {
    client: std::sync::Arc<BaseConsumer>,
    topic: String,
}

impl BrokerProbe {
    pub fn new(bus: &BusConfig) -> Result<Self, BusError> {
        Ok(BrokerProbe { client: std::sync::Arc::new(bus.assigned_consumer()?), topic: bus.topics.commands.clone() })
    }

    /// Fails unless `partition` is one of `topic`'s partitions, as the cluster
    /// reports them now.
    pub async fn check_partition(&self, topic: &str, partition: i32) -> Result<(), BusError> {
        let (probe, name) = (self.clone(), topic.to_string());
        let metadata =
            tokio::task::spawn_blocking(move || probe.client.fetch_metadata(Some(&name), Duration::from_secs(10)))
                .await
                .map_err(|e| BusError::Timeout(format!("reading the metadata of {topic}: {e}")))??;
        let partitions =
            metadata.topics().iter().find(|t| t.name() == topic).map_or(0, |t| t.partitions().len() as i32);
        if (0..partitions).contains(&partition) {
            Ok(())
        } else {
            Err(BusError::NoSuchPartition { topic: topic.to_string(), partition, partitions })
        }
    }

    pub async fn reachable(&self) -> bool {
        let probe = self.clone();
        tokio::task::spawn_blocking(move || {
            probe.client.fetch_metadata(Some(&probe.topic), Duration::from_secs(2)).is_ok()
        })
        .await
        .unwrap_or(false)
    }
}
