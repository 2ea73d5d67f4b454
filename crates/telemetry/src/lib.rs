//! What an on-call engineer sees: structured logs (text for people, JSON for
//! machines), OpenTelemetry traces (`traces`), and the Prometheus metrics every
//! role exposes at `/metrics`.
//!
//! All series are declared here, in one struct, so their names, labels and units
//! are reviewed together and the dashboard and alert rules have one place to look.
//! This crate owns no business logic and must not depend on the other crates.

use axum::http::header::CONTENT_TYPE;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use std::sync::{Arc, OnceLock};
use tracing_subscriber::{fmt, EnvFilter};

pub mod traces;

pub use traces::{continue_trace, exporting, link, traceparent_of};

/// Keeps trace export running; dropping it flushes the spans not yet sent.
#[must_use = "dropping the guard stops trace export"]
pub struct Telemetry {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

/// What keeps telemetry from starting.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// A `RUST_LOG` that does not parse would otherwise fall back to the default
    /// filter, and the engineer who set it would not see the logs they asked for.
    #[error("RUST_LOG={value:?} is not a log filter: {reason}")]
    LogFilter { value: String, reason: String },
}

const DEFAULT_LOG_FILTER: &str = "info,sqlx=warn,rdkafka=warn,tower_http=warn";

/// The log filter `RUST_LOG` names, or the default when it is unset or empty.
pub fn log_filter(rust_log: Option<&str>) -> Result<EnvFilter, TelemetryError> {
    match rust_log.map(str::trim).filter(|v| !v.is_empty()) {
        Some(v) => EnvFilter::builder()
            .parse(v)
            .map_err(|e| TelemetryError::LogFilter { value: v.to_string(), reason: e.to_string() }),
        None => Ok(EnvFilter::new(DEFAULT_LOG_FILTER)),
    }
}

/// Installs the global `tracing` subscriber: logs (`LOG_FORMAT=json` gives one JSON
/// object per line; `RUST_LOG` filters, default `info`) and, when
/// `OTEL_EXPORTER_OTLP_ENDPOINT` is set, trace export for `service`.
pub fn init(json: bool, service: &str) -> Result<Telemetry, TelemetryError> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let filter = log_filter(std::env::var("RUST_LOG").ok().as_deref())?;
    let logs = if json {
        fmt::layer().json().flatten_event(true).with_target(false).with_filter(filter).boxed()
    } else {
        fmt::layer().with_target(false).with_filter(filter).boxed()
    };
    let (provider, trouble) = match traces::provider(service) {
        Ok(p) => (p, None),
        Err(e) => (None, Some(e)),
    };
    // Spans are exported at info and above whatever RUST_LOG says of the logs.
    let otel = provider.as_ref().map(|p| traces::layer(p).with_filter(tracing_subscriber::filter::LevelFilter::INFO));
    let _ = tracing_subscriber::registry().with(logs).with(otel).try_init();
    if let Some(e) = trouble {
        tracing::warn!(error = %e, "trace export could not start; running without it");
    } else if provider.is_some() {
        tracing::info!(service, "exporting traces over OTLP");
    }
    Ok(Telemetry { provider })
}

const LATENCY_BUCKETS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Every series cardflow exports. Roles update the ones they own.
pub struct Metrics {
    pub registry: Registry,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    pub auth_failures: IntCounterVec,
    pub reply_wait: Histogram,
    pub reply_fallbacks: IntCounter,
    pub waiting_requests: IntGauge,
    pub commands_published: IntCounter,
    pub db_group_size: HistogramVec,
    pub commands_applied: IntCounterVec,
    pub batch_size: Histogram,
    pub batch_duration: Histogram,
    pub batch_failures: IntCounter,
    pub batches_in_flight: IntGauge,
    pub batches_beside_another: IntCounter,
    pub consumer_lag: IntGaugeVec,
    pub dlq_messages: IntCounter,
    pub outbox_backlog: IntGauge,
    pub outbox_oldest_age: Gauge,
    pub relay_published: IntCounterVec,
    pub relay_parked: IntCounterVec,
    pub relay_publish_duration: Histogram,
    pub relay_active: IntGauge,
    pub audit_violations: IntGauge,
    pub audit_last_run: Gauge,
    pub build_info: IntGaugeVec,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    r.register(Box::new(c.clone())).expect("metric names are unique");
    c
}

impl Metrics {
    fn new() -> Self {
        let r = Registry::new();
        let hist = |name: &str, help: &str, buckets: Vec<f64>| HistogramOpts::new(name, help).buckets(buckets);
        Metrics {
            http_requests: reg(
                &r,
                IntCounterVec::new(
                    Opts::new("cardflow_http_requests_total", "HTTP requests by route, status and result code"),
                    &["route", "status", "code"],
                )
                .unwrap(),
            ),
            http_duration: reg(
                &r,
                HistogramVec::new(
                    hist("cardflow_http_request_duration_seconds", "HTTP request latency", LATENCY_BUCKETS.to_vec()),
                    &["route"],
                )
                .unwrap(),
            ),
            auth_failures: reg(
                &r,
                IntCounterVec::new(
                    Opts::new("cardflow_auth_failures_total", "Requests refused by authentication, by code"),
                    &["code"],
                )
                .unwrap(),
            ),
            reply_wait: reg(
                &r,
                Histogram::with_opts(hist(
                    "cardflow_reply_wait_seconds",
                    "Time from publishing a command to its result reaching the gateway",
                    LATENCY_BUCKETS.to_vec(),
                ))
                .unwrap(),
            ),
            reply_fallbacks: reg(
                &r,
                IntCounter::new(
                    "cardflow_reply_deadline_fallbacks_total",
                    "Synchronous requests answered 202 because the deadline passed",
                )
                .unwrap(),
            ),
            waiting_requests: reg(
                &r,
                IntGauge::new("cardflow_reply_waiting_requests", "Requests waiting for their result").unwrap(),
            ),
            commands_published: reg(
                &r,
                IntCounter::new("cardflow_commands_published_total", "Transfer commands acknowledged by Kafka")
                    .unwrap(),
            ),
            db_group_size: reg(
                &r,
                HistogramVec::new(
                    hist(
                        "cardflow_gateway_db_group_size",
                        "Requests served by one grouped gateway statement, by statement",
                        vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0],
                    ),
                    &["statement"],
                )
                .unwrap(),
            ),
            commands_applied: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "cardflow_commands_applied_total",
                        "Commands the worker decided, by result code and whether they were repeats",
                    ),
                    &["code", "repeat"],
                )
                .unwrap(),
            ),
            batch_size: reg(
                &r,
                Histogram::with_opts(hist(
                    "cardflow_worker_batch_size",
                    "Commands per applied batch",
                    // Up to WORKER_MAX_BATCH's default (2000) and beyond, so a full batch
                    // is not read as 1000.
                    vec![1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0, 5000.0],
                ))
                .unwrap(),
            ),
            batch_duration: reg(
                &r,
                Histogram::with_opts(hist(
                    "cardflow_worker_batch_duration_seconds",
                    "Time to apply one batch in Postgres",
                    LATENCY_BUCKETS.to_vec(),
                ))
                .unwrap(),
            ),
            batch_failures: reg(
                &r,
                IntCounter::new(
                    "cardflow_worker_batch_failures_total",
                    "Batch transactions that failed: retried while the database is unreachable, or split into single commands",
                )
                .unwrap(),
            ),
            batches_in_flight: reg(
                &r,
                IntGauge::new("cardflow_worker_batches_in_flight", "Batch transactions being applied now").unwrap(),
            ),
            batches_beside_another: reg(
                &r,
                IntCounter::new(
                    "cardflow_worker_batches_beside_another_total",
                    "Batches started while another was in flight: the worker was behind by a full batch",
                )
                .unwrap(),
            ),
            consumer_lag: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "cardflow_worker_consumer_lag_messages",
                        "Messages behind the high watermark, per partition",
                    ),
                    &["partition"],
                )
                .unwrap(),
            ),
            dlq_messages: reg(
                &r,
                IntCounter::new("cardflow_worker_dlq_messages_total", "Commands sent to the dead-letter topic")
                    .unwrap(),
            ),
            outbox_backlog: reg(
                &r,
                IntGauge::new("cardflow_outbox_backlog_messages", "Outbox messages not yet published").unwrap(),
            ),
            outbox_oldest_age: reg(
                &r,
                Gauge::new("cardflow_outbox_oldest_age_seconds", "Age of the oldest unpublished outbox row").unwrap(),
            ),
            relay_published: reg(
                &r,
                IntCounterVec::new(
                    Opts::new("cardflow_relay_published_total", "Outbox messages published, by topic"),
                    &["topic"],
                )
                .unwrap(),
            ),
            relay_parked: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "cardflow_relay_parked_total",
                        "Outbox rows the broker refused for good and the relay set aside, by topic",
                    ),
                    &["topic"],
                )
                .unwrap(),
            ),
            relay_publish_duration: reg(
                &r,
                Histogram::with_opts(hist(
                    "cardflow_relay_publish_duration_seconds",
                    "Time to publish one outbox sweep until acknowledged",
                    LATENCY_BUCKETS.to_vec(),
                ))
                .unwrap(),
            ),
            relay_active: reg(
                &r,
                IntGauge::new("cardflow_relay_active", "1 while this process holds the relay lock").unwrap(),
            ),
            audit_violations: reg(
                &r,
                IntGauge::new("cardflow_audit_violations", "Invariant violations found by the last audit").unwrap(),
            ),
            audit_last_run: reg(
                &r,
                Gauge::new("cardflow_audit_last_run_timestamp_seconds", "When the last audit finished").unwrap(),
            ),
            build_info: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new("cardflow_build_info", "Version of the running binary"),
                    &["version", "role"],
                )
                .unwrap(),
            ),
            registry: r,
        }
    }

    /// The process-wide metrics.
    pub fn global() -> &'static Metrics {
        static METRICS: OnceLock<Metrics> = OnceLock::new();
        METRICS.get_or_init(Metrics::new)
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut buf).expect("text encoding cannot fail");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }
}

/// `/metrics` and `/healthz`, to merge into a role's router. `ready` answers
/// `/readyz`.
pub fn router<F, Fut>(ready: F) -> Router
where
    F: Fn() -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    let ready = Arc::new(ready);
    Router::new()
        .route(
            "/metrics",
            get(|| async { ([(CONTENT_TYPE, "text/plain; version=0.0.4")], Metrics::global().render()) }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.clone();
                async move {
                    match ready().await {
                        Ok(()) => (axum::http::StatusCode::OK, "ready".to_string()).into_response(),
                        Err(why) => (axum::http::StatusCode::SERVICE_UNAVAILABLE, why).into_response(),
                    }
                }
            }),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unset_or_empty_rust_log_gives_the_default_filter() {
        assert_eq!(log_filter(None).unwrap().to_string(), EnvFilter::new(DEFAULT_LOG_FILTER).to_string());
        assert_eq!(log_filter(Some("  ")).unwrap().to_string(), EnvFilter::new(DEFAULT_LOG_FILTER).to_string());
    }

    #[test]
    fn a_valid_rust_log_is_the_filter() {
        assert_eq!(log_filter(Some("debug,sqlx=warn")).unwrap().to_string(), "sqlx=warn,debug");
    }

    #[test]
    fn a_rust_log_that_does_not_parse_is_refused_naming_it() {
        let e = log_filter(Some("info,sqlx=loud")).unwrap_err();
        assert!(e.to_string().contains("RUST_LOG=\"info,sqlx=loud\""), "{e}");
    }
}
