//! OpenTelemetry traces. One trace follows a transfer from the gateway's HTTP span
//! through the Kafka produce, the worker's apply (inside its batch span, with the
//! database statements), the relay's publish and back to the gateway's reply. The
//! W3C `traceparent` carries the context across Kafka, in message headers.
//!
//! Export is on only when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (OTLP over HTTP,
//! protobuf; the exporter reads the standard `OTEL_*` variables). Off, no exporter
//! runs, no OpenTelemetry layer is installed, and spans made only for export are
//! not made at all (`exporting()`): the `traceparent` a request arrived with is
//! passed on unchanged, so a tracing proxy in front still sees one trace.

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use tracing_opentelemetry::OpenTelemetrySpanExt;

static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether spans are exported. Roles skip spans that exist only for the trace
/// (one per outbox row, one per reply) when they are not.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// The tracer provider when `OTEL_EXPORTER_OTLP_ENDPOINT` is set. `service` names
/// the role unless `OTEL_SERVICE_NAME` says otherwise.
pub(crate) fn provider(service: &str) -> Result<Option<SdkTracerProvider>, String> {
    if std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT").map_or(true, |v| v.trim().is_empty()) {
        return Ok(None);
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder().with_http().build().map_err(|e| e.to_string())?;
    let resource = if std::env::var("OTEL_SERVICE_NAME").is_ok() {
        Resource::builder().build()
    } else {
        Resource::builder().with_service_name(service.to_string()).build()
    };
    let provider = SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    EXPORTING.store(true, Ordering::Relaxed);
    Ok(Some(provider))
}

pub(crate) fn layer<S>(provider: &SdkTracerProvider) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_opentelemetry::layer().with_tracer(provider.tracer("cardflow"))
}

/// Makes `span` a child of the remote context in `traceparent`, when exporting and
/// the value is a valid W3C trace context.
pub fn continue_trace(span: &tracing::Span, traceparent: Option<&str>) {
    if !exporting() {
        return;
    }
    if let Some(tp) = traceparent {
        let carrier = HashMap::from([("traceparent".to_string(), tp.to_string())]);
        let cx = TraceContextPropagator::new().extract(&carrier);
        if cx.span().span_context().is_valid() {
            let _ = span.set_parent(cx);
        }
    }
}

/// Records that `span` was caused by (or caused) the work in `other`: a batch span
/// and the transfers it applied belong to different traces.
pub fn link(span: &tracing::Span, other: &tracing::Span) {
    if !exporting() {
        return;
    }
    let cx = other.context();
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        span.add_link(sc);
    }
}

/// The W3C `traceparent` naming `span`, to send downstream; `None` when not
/// exporting (the caller then passes on what it received).
pub fn traceparent_of(span: &tracing::Span) -> Option<String> {
    if !exporting() {
        return None;
    }
    let mut carrier: HashMap<String, String> = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    carrier.remove("traceparent")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_an_endpoint_nothing_is_exported_and_context_passes_through() {
        // The test process has no OTEL_EXPORTER_OTLP_ENDPOINT.
        assert!(provider("test").unwrap().is_none());
        assert!(!exporting());
        let span = tracing::info_span!("s");
        continue_trace(&span, Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"));
        assert_eq!(traceparent_of(&span), None);
    }
}
