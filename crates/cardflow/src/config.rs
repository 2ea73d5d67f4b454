//! Configuration: one typed struct per role, read from environment variables (or
//! the same-named flags) with local defaults, printed at start with secrets masked.

use cardflow_bus::{BusConfig, Topics};
use cardflow_gateway::GatewayConfig;
use cardflow_ledger::batch::RetryPolicy;
use cardflow_worker::{RelayConfig, WorkerConfig};
use clap::Args;
use std::net::SocketAddr;
use std::time::Duration;

#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// PostgreSQL connection URL.
    /// Its value is never shown by `--help` (it may hold a password).
    #[arg(
        long,
        env = "DATABASE_URL",
        hide_env_values = true,
        default_value = "postgres://postgres@127.0.0.1:5432/cardflow"
    )]
    pub database_url: String,
}

impl DatabaseArgs {
    /// The URL with any password replaced, for logs.
    pub fn masked(&self) -> String {
        mask_url(&self.database_url)
    }
}

/// A connection URL for logs: the password of `user:password@` and of a
/// `password=` query parameter (libpq accepts either) replaced by `***`.
pub fn mask_url(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let mut out = match (base.find("://"), base.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &base[s + 3..at];
            match userinfo.find(':') {
                Some(c) => format!("{}{}:***{}", &base[..s + 3], &userinfo[..c], &base[at..]),
                None => base.to_string(),
            }
        }
        _ => base.to_string(),
    };
    if let Some(q) = query {
        let params: Vec<String> = q
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => kv.to_string(),
            })
            .collect();
        out.push('?');
        out.push_str(&params.join("&"));
    }
    out
}

#[derive(Debug, Clone, Args)]
pub struct KafkaArgs {
    /// Bootstrap brokers, comma separated.
    #[arg(long, env = "KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub kafka_brokers: String,
    /// Prefix of every topic name (lets several systems share a cluster).
    #[arg(long, env = "KAFKA_TOPIC_PREFIX", default_value = "")]
    pub kafka_topic_prefix: String,
    /// Partitions of transfer.commands, card.balance and transfer.events when created.
    #[arg(long, env = "KAFKA_PARTITIONS", default_value_t = 8, value_parser = clap::value_parser!(i32).range(1..))]
    pub kafka_partitions: i32,
    /// Partitions of transfer.results when created: at least the number of gateways.
    #[arg(long, env = "KAFKA_REPLY_PARTITIONS", default_value_t = 4, value_parser = clap::value_parser!(i32).range(1..))]
    pub kafka_reply_partitions: i32,
    #[arg(long, env = "KAFKA_REPLICATION", default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..))]
    pub kafka_replication: i32,
    /// Longest time the broker may hold an empty fetch (latency against broker CPU).
    #[arg(long, env = "KAFKA_FETCH_WAIT_MS", default_value_t = cardflow_bus::DEFAULT_FETCH_WAIT_MS)]
    pub kafka_fetch_wait_ms: u32,
}

impl KafkaArgs {
    pub fn bus(&self) -> BusConfig {
        BusConfig {
            brokers: self.kafka_brokers.clone(),
            topics: Topics::with_prefix(&self.kafka_topic_prefix),
            partitions: self.kafka_partitions,
            reply_partitions: self.kafka_reply_partitions,
            replication: self.kafka_replication,
            fetch_wait_ms: self.kafka_fetch_wait_ms,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct GatewayArgs {
    /// Where the HTTP API (and /metrics, /healthz, /readyz) listens.
    #[arg(long, env = "HTTP_ADDR", default_value = "127.0.0.1:8080")]
    pub http_addr: SocketAddr,
    /// The partition of transfer.results this gateway reads; unique per gateway.
    #[arg(long, env = "GATEWAY_REPLY_PARTITION", default_value_t = 0, value_parser = clap::value_parser!(i32).range(0..))]
    pub reply_partition: i32,
    /// How long a synchronous request waits for its result before answering 202.
    #[arg(long, env = "REPLY_DEADLINE_MS", default_value_t = 3000)]
    pub reply_deadline_ms: u64,
    /// Allowed distance between X-KM-Tran-Time and the server clock (1 s to a day).
    #[arg(long, env = "TRAN_TIME_WINDOW_SECS", default_value_t = 300, value_parser = clap::value_parser!(i64).range(1..=86_400))]
    pub tran_time_window_secs: i64,
    /// How long a looked-up access or data key is trusted; a disabled key stops
    /// working within this time.
    #[arg(long, env = "KEY_CACHE_TTL_SECS", default_value_t = 10)]
    pub key_cache_ttl_secs: u64,
    #[arg(long, env = "GATEWAY_DB_POOL", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    pub gateway_db_pool: u32,
    #[arg(long, env = "GATEWAY_LINGER_MS", default_value_t = 1)]
    pub gateway_linger_ms: u32,
    /// The linger of `respond-async` commands: their callers only wait for Kafka's
    /// acknowledgement, so batching them costs little and saves the broker work.
    #[arg(long, env = "GATEWAY_ASYNC_LINGER_MS", default_value_t = 10)]
    pub gateway_async_linger_ms: u32,
    /// Requests per second each ASP may send (a token bucket); 0 is no limit.
    #[arg(long, env = "RATE_LIMIT_PER_ASP", default_value_t = 0)]
    pub rate_limit_per_asp: u32,
}

impl GatewayArgs {
    pub fn config(&self) -> GatewayConfig {
        GatewayConfig {
            http_addr: self.http_addr,
            reply_partition: self.reply_partition,
            reply_deadline: Duration::from_millis(self.reply_deadline_ms),
            time_window_secs: self.tran_time_window_secs,
            key_cache_ttl: Duration::from_secs(self.key_cache_ttl_secs),
            max_body_bytes: 16 * 1024,
            producer_linger_ms: self.gateway_linger_ms,
            async_producer_linger_ms: self.gateway_async_linger_ms,
            rate_limit_per_asp: std::num::NonZeroU32::new(self.rate_limit_per_asp),
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    #[arg(long, env = "WORKER_GROUP_ID", default_value = "cardflow-worker")]
    pub worker_group_id: String,
    /// Most commands applied in one transaction (1 to 100000).
    #[arg(long, env = "WORKER_MAX_BATCH", default_value_t = 2000, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=100_000))]
    pub worker_max_batch: usize,
    /// How long to gather a batch after its first command.
    #[arg(long, env = "WORKER_BATCH_LINGER_MS", default_value_t = 2)]
    pub worker_batch_linger_ms: u64,
    /// The platform's time zone, in which cards expire.
    #[arg(long, env = "PLATFORM_TIME_ZONE", default_value = "Asia/Seoul")]
    pub platform_time_zone: chrono_tz::Tz,
    #[arg(long, env = "WORKER_DB_POOL", default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    pub worker_db_pool: u32,
    /// Batch transactions in flight at once: a second one starts only when a
    /// full batch waits on partitions the first does not hold (a backlog). At
    /// most `WORKER_DB_POOL`.
    #[arg(long, env = "WORKER_BATCHES_IN_FLIGHT", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub worker_batches_in_flight: u16,
}

impl WorkerArgs {
    pub fn config(&self) -> WorkerConfig {
        WorkerConfig {
            group_id: self.worker_group_id.clone(),
            max_batch: self.worker_max_batch,
            batch_linger: Duration::from_millis(self.worker_batch_linger_ms),
            platform_tz: self.platform_time_zone,
            retry: RetryPolicy::default(),
            max_in_flight: self.worker_batches_in_flight as usize,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct RelayArgs {
    /// Messages published per round, in whole outbox rows (at least 1: a round
    /// always takes at least one row, however many messages it holds).
    #[arg(long, env = "RELAY_BATCH", default_value_t = 4000, value_parser = clap::value_parser!(i64).range(1..))]
    pub relay_batch: i64,
    /// How often the relay looks at the outbox without a notification.
    #[arg(long, env = "RELAY_SWEEP_MS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..))]
    pub relay_sweep_ms: u64,
    /// How long published outbox rows are kept.
    #[arg(long, env = "RELAY_RETAIN_SECS", default_value_t = 3600)]
    pub relay_retain_secs: u64,
    #[arg(long, env = "RELAY_LINGER_MS", default_value_t = 1)]
    pub relay_linger_ms: u32,
    /// How often the active relay audits the ledger (metrics cardflow_audit_*); at
    /// least 10 s, as each audit reads the whole ledger.
    #[arg(long, env = "AUDIT_INTERVAL_SECS", default_value_t = 300, value_parser = clap::value_parser!(u64).range(10..))]
    pub audit_interval_secs: u64,
}

impl RelayArgs {
    pub fn config(&self) -> RelayConfig {
        RelayConfig {
            batch: self.relay_batch,
            sweep_interval: Duration::from_millis(self.relay_sweep_ms),
            retain_published: Duration::from_secs(self.relay_retain_secs),
            producer_linger_ms: self.relay_linger_ms,
            audit_interval: Duration::from_secs(self.audit_interval_secs),
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct MetricsArgs {
    /// Where /metrics, /healthz and /readyz listen for roles without the HTTP API.
    #[arg(long, env = "METRICS_ADDR", default_value = "127.0.0.1:9091")]
    pub metrics_addr: SocketAddr,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_masked_in_urls() {
        assert_eq!(mask_url("postgres://u:secret@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(mask_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(mask_url("postgres://h/db"), "postgres://h/db");
    }

    #[test]
    fn a_password_given_as_a_query_parameter_is_masked() {
        assert_eq!(
            mask_url("postgres://u@h/db?sslmode=require&password=s3cret&x=1"),
            "postgres://u@h/db?sslmode=require&password=***&x=1"
        );
        assert_eq!(mask_url("postgres://u:a@h/db?PASSWORD=b"), "postgres://u:***@h/db?PASSWORD=***");
    }
}
