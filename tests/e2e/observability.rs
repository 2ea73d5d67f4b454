//! What an SRE scrapes: every role's `/metrics` carries the key series with
//! plausible values after some transfers, and the health endpoints answer.

use crate::helpers::*;
use std::time::Duration;

use crate::helpers::metric as sample;

fn sum_of(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && (l[name.len()..].starts_with('{') || l[name.len()..].starts_with(' ')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn every_role_exposes_the_key_series_with_plausible_values() {
    let sys = System::start(Roles::default());
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(1_000), CardSpec::prepaid(0)]).await;
    for _ in 0..3 {
        assert_eq!(sys.transfer(&m.body(0, 1, Some(10))).await.code(), "000_000");
    }
    assert_eq!(sys.transfer(&m.body(0, 1, Some(10_000))).await.code(), "005_018");

    let gateway = sys.metrics("gateway").await;
    assert_eq!(
        sample(&gateway, r#"cardflow_http_requests_total{code="000_000",route="transfer",status="200"}"#),
        Some(3.0)
    );
    assert_eq!(
        sample(&gateway, r#"cardflow_http_requests_total{code="005_018",route="transfer",status="400"}"#),
        Some(1.0)
    );
    assert_eq!(sample(&gateway, r#"cardflow_http_request_duration_seconds_count{route="transfer"}"#), Some(4.0));
    assert_eq!(sample(&gateway, "cardflow_reply_wait_seconds_count"), Some(4.0));
    assert_eq!(sample(&gateway, "cardflow_commands_published_total"), Some(4.0));
    assert_eq!(sample(&gateway, "cardflow_reply_deadline_fallbacks_total"), Some(0.0));
    assert!(gateway.contains(r#"cardflow_build_info{role="gateway""#));

    let worker = sys.metrics("worker").await;
    assert_eq!(sample(&worker, r#"cardflow_commands_applied_total{code="000_000",repeat="false"}"#), Some(3.0));
    assert_eq!(sample(&worker, r#"cardflow_commands_applied_total{code="005_018",repeat="false"}"#), Some(1.0));
    let batches = sample(&worker, "cardflow_worker_batch_size_count").unwrap();
    assert!((1.0..=4.0).contains(&batches), "batches: {batches}");
    assert_eq!(sample(&worker, "cardflow_worker_batch_size_sum"), Some(4.0));
    assert!(sample(&worker, "cardflow_worker_batch_duration_seconds_sum").unwrap() > 0.0);
    assert_eq!(sample(&worker, "cardflow_worker_dlq_messages_total"), Some(0.0));
    // Lag is what the group has not committed; the last batch's commit may land
    // just after its result does.
    eventually(Duration::from_secs(15), "the consumer lag gauge at 0, everything consumed", || async {
        let text = sys.metrics("worker").await;
        (text.contains("cardflow_worker_consumer_lag_messages{")
            && sum_of(&text, "cardflow_worker_consumer_lag_messages") == 0.0)
            .then_some(())
    })
    .await;

    let relay = sys.metrics("relay").await;
    assert_eq!(sample(&relay, "cardflow_relay_active"), Some(1.0));
    // 4 results + 4 transfer events + 6 balance events.
    assert_eq!(sum_of(&relay, "cardflow_relay_published_total"), 14.0);
    let backlog = eventually(Duration::from_secs(15), "the backlog gauge", || async {
        let text = sys.metrics("relay").await;
        sample(&text, "cardflow_outbox_backlog_messages").filter(|v| *v == 0.0)
    })
    .await;
    assert_eq!(backlog, 0.0);
    let relay = sys.metrics("relay").await;
    assert!(sample(&relay, "cardflow_audit_last_run_timestamp_seconds").unwrap() > 1.7e9, "the relay audited");
    assert_eq!(sample(&relay, "cardflow_audit_violations"), Some(0.0));
}

fn lag_lines(text: &str) -> usize {
    text.lines().filter(|l| l.starts_with("cardflow_worker_consumer_lag_messages{")).count()
}

#[tokio::test]
async fn a_restarted_worker_reports_no_lag_on_partitions_already_consumed() {
    let sys = System::start(Roles::default());
    let pool = sys.pool().await;
    for _ in 0..3 {
        let m = seed_member(&pool, &[CardSpec::prepaid(100), CardSpec::prepaid(0)]).await;
        assert_eq!(sys.transfer(&m.body(0, 1, Some(10))).await.code(), "000_000");
    }
    sys.stop(Some("worker"));
    sys.spawn("worker", &[]);

    // Nothing new arrives, so the new worker reads nothing: every partition it
    // owns is committed to its end.
    let text = eventually(Duration::from_secs(30), "the new worker's lag on all four partitions", || async {
        let text = sys.try_metrics("worker").await?;
        (lag_lines(&text) == 4).then_some(text)
    })
    .await;
    assert_eq!(sum_of(&text, "cardflow_worker_consumer_lag_messages"), 0.0, "{text}");
    sys.stop(None);
}

#[test]
fn a_worker_whose_metrics_address_is_taken_refuses_to_start() {
    let sys = shared();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, stderr) = sys
        .run_to_exit("worker", &[("METRICS_ADDR", addr.clone())], Duration::from_secs(30))
        .expect("the worker exits instead of running without /metrics and its probes");
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains(&format!("binding METRICS_ADDR {addr}")), "{stderr}");
}

#[test]
fn a_relay_with_an_invalid_rust_log_refuses_to_start_naming_it() {
    let sys = shared();
    let (code, stderr) = sys
        .run_to_exit("relay", &[("RUST_LOG", "info,sqlx=loud".to_string())], Duration::from_secs(30))
        .expect("the relay exits");
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("RUST_LOG=\"info,sqlx=loud\""), "{stderr}");
}

#[tokio::test]
async fn health_and_readiness_answer() {
    let sys = shared();
    let client = reqwest::Client::new();
    for path in ["/healthz", "/readyz"] {
        let r = client.get(format!("http://127.0.0.1:{}{path}", sys.http_port)).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200, "{path}");
    }
}

/// Runs `cardflow bench --quick` with `args` on the test stack; its table and the
/// figures it wrote with `--json`. The run must pass.
fn quick_bench(name: &str, args: &[&str]) -> (String, serde_json::Value) {
    let json = std::env::temp_dir().join(format!("cardflow-bench-{name}-{}.json", std::process::id()));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cardflow"))
        .args(["bench", "--quick"])
        .args(args)
        .arg("--json")
        .arg(&json)
        .env("DATABASE_URL", std::env::var("DATABASE_URL").unwrap())
        .env("KAFKA_BROKERS", std::env::var("KAFKA_BROKERS").unwrap())
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "bench failed:\n{table}\n{}", String::from_utf8_lossy(&out.stderr));
    (table, serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap())
}

/// One `--quick --mode async` run with a one-second pgbench, shared by the tests
/// that read its reference and CPU figures: the run is the same for each, and
/// takes most of a test's time.
fn quick_async_bench() -> &'static (String, serde_json::Value) {
    static RUN: std::sync::OnceLock<(String, serde_json::Value)> = std::sync::OnceLock::new();
    RUN.get_or_init(|| quick_bench("async", &["--mode", "async", "--pgbench-seconds", "1", "--drain-commands", "200"]))
}

#[tokio::test]
async fn a_tiny_bench_run_reports_every_figure_and_passes_its_audit() {
    let (_, figures) = quick_bench("all", &["--pgbench-seconds", "1", "--drain-commands", "200"]);
    for field in [
        "pgbench_tps",
        "drain_tps",
        "async_tps",
        "sync_p99_ms",
        "sync_max_p99_ms",
        "drain_vs_pgbench_ratio",
        "async_vs_pgbench_ratio",
        "ledger_tps",
        "ledger_vs_pgbench_ratio",
        "drain_vs_ledger_ratio",
    ] {
        assert!(figures[field].as_f64().is_some_and(|v| v > 0.0), "{field} = {}", figures[field]);
    }
    let half_runs = figures["sync_half_runs_p99_ms"].as_array().expect("the p99 of each half-rate run");
    assert_eq!(half_runs.len(), 2, "--quick runs the half rate twice");
    assert_eq!(figures["sync_p99_ms"], figures["sync_half_p99_ms"], "issue 7's p99 is at half the maximum");
    for phase in ["sync_max", "sync_half", "async_submit", "hot"] {
        assert_eq!(figures[format!("{phase}_failures")], 0, "{phase}");
    }
    assert_eq!(figures["audit_passed"], true);
    assert_eq!(figures["conserved"], true);
}

#[tokio::test]
async fn a_bench_run_writes_null_for_the_figures_it_did_not_measure() {
    let (table, figures) = quick_bench("sync", &["--mode", "sync", "--pgbench-seconds", "0"]);
    for field in [
        "pgbench_tps",
        "async_tps",
        "drain_tps",
        "ledger_tps",
        "drain_vs_pgbench_ratio",
        "async_vs_pgbench_ratio",
        "drain_vs_ledger_ratio",
        "async_submit_p99_ms",
        "async_cpu_us",
        "drain_cpu_us",
        "ledger_cpu_us",
        "pgbench_cpu_us",
    ] {
        assert!(figures[field].is_null(), "{field} was not measured but reads {}", figures[field]);
    }
    assert!(figures["sync_p99_ms"].as_f64().is_some_and(|v| v > 0.0), "the sync phase ran");
    assert!(table.lines().any(|l| l.starts_with("worker drain") && l.ends_with("not run")), "{table}");
}

#[tokio::test]
async fn pgbench_runs_before_the_async_phase_and_after_the_ledger_and_the_ratios_use_their_mean() {
    let (table, figures) = quick_async_bench();
    let runs: Vec<f64> =
        figures["pgbench_runs_tps"].as_array().expect("each pgbench run").iter().map(|v| v.as_f64().unwrap()).collect();
    assert_eq!(runs.len(), 2, "{runs:?}");
    assert!(runs.iter().all(|t| *t > 0.0), "{runs:?}");
    let mean = (runs[0] + runs[1]) / 2.0;
    assert!((figures["pgbench_tps"].as_f64().unwrap() - mean).abs() < 1e-6, "{}", figures["pgbench_tps"]);
    let drain_ratio = figures["drain_tps"].as_f64().unwrap() / mean;
    assert!((figures["drain_vs_pgbench_ratio"].as_f64().unwrap() - drain_ratio).abs() < 1e-9);
    assert!(table.lines().any(|l| l.starts_with("  before async, after the ledger")), "{table}");
}

#[tokio::test]
async fn a_bench_run_reports_what_each_operation_cost_the_whole_machine_in_cpu() {
    let (table, figures) = quick_async_bench();
    for phase in ["async", "drain", "ledger", "pgbench"] {
        let us = figures[format!("{phase}_cpu_us")].as_f64();
        assert!(us.is_some_and(|v| v > 0.0), "{phase}_cpu_us = {us:?}");
        for share in ["kernel", "busy", "steal"] {
            let pct = figures[format!("{phase}_cpu_{share}_pct")].as_f64();
            assert!(pct.is_some_and(|v| (0.0..=100.0).contains(&v)), "{phase}_cpu_{share}_pct = {pct:?}");
        }
    }
    assert!(table.lines().any(|l| l.starts_with("CPU of the whole machine")), "{table}");
    assert!(table.lines().any(|l| l.trim_start().starts_with("pgbench (per transaction)")), "{table}");
}

/// A minimal OTLP/HTTP trace receiver: every span POSTed to `/v1/traces`, as
/// (service name, span name, trace id, span id, parent span id).
type ReceivedSpan = (String, String, Vec<u8>, Vec<u8>, Vec<u8>);

async fn otlp_receiver() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<ReceivedSpan>>>) {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message;
    let spans = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let sink = sink.clone();
            async move {
                let req = ExportTraceServiceRequest::decode(body).expect("an OTLP protobuf trace export");
                let mut out = sink.lock().unwrap();
                for rs in req.resource_spans {
                    let service = rs
                        .resource
                        .iter()
                        .flat_map(|r| r.attributes.iter())
                        .find(|kv| kv.key == "service.name")
                        .and_then(|kv| kv.value.as_ref())
                        .map(|v| format!("{:?}", v.value))
                        .unwrap_or_default();
                    for ss in rs.scope_spans {
                        for s in ss.spans {
                            out.push((service.clone(), s.name, s.trace_id, s.span_id, s.parent_span_id));
                        }
                    }
                }
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (port, spans)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_follows_a_transfer_from_the_gateway_through_worker_and_relay_back() {
    let (port, spans) = otlp_receiver().await;
    let env = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://127.0.0.1:{port}")),
        ("OTEL_BSP_SCHEDULE_DELAY", "100".to_string()),
    ];
    let sys = System::start(Roles { env, ..Roles::default() });
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(1_000), CardSpec::prepaid(0)]).await;
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let req = sign_post(&m.body(0, 1, Some(10)), None, false);
    let reply = sys.send(&req, &[("traceparent", &format!("00-{caller_trace}-00f067aa0ba902b7-01"))]).await;
    assert_eq!(reply.code(), "000_000");

    let http = "POST /api/v1/transfer/balance";
    let wanted = [http, "transfer.commands publish", "transfer.apply", "transfer.results receive"];
    let trace = hex_decode(caller_trace);
    let in_trace = eventually(Duration::from_secs(30), "the transfer's spans from every role", || async {
        let got = spans.lock().unwrap().clone();
        let mine: Vec<ReceivedSpan> = got.into_iter().filter(|s| s.2 == trace).collect();
        let relayed = mine.iter().any(|s| s.1.ends_with("transfer.results publish"));
        (relayed && wanted.iter().all(|w| mine.iter().any(|s| s.1 == *w))).then_some(mine)
    })
    .await;
    let service_of = |name: &str| in_trace.iter().find(|s| s.1 == name).unwrap().0.clone();
    assert!(service_of(http).contains("cardflow-gateway"));
    assert!(service_of("transfer.apply").contains("cardflow-worker"));
    let relay_publish = in_trace.iter().find(|s| s.1.ends_with("transfer.results publish")).unwrap();
    assert!(relay_publish.0.contains("cardflow-relay"));
    // Each hop is the child of the one before it.
    let id_of = |name: &str| in_trace.iter().find(|s| s.1 == name).unwrap().3.clone();
    let parent_of = |name: &str| in_trace.iter().find(|s| s.1 == name).unwrap().4.clone();
    assert_eq!(parent_of(http), hex_decode("00f067aa0ba902b7"), "continues the caller's trace");
    assert_eq!(parent_of("transfer.commands publish"), id_of(http));
    assert_eq!(parent_of("transfer.apply"), id_of("transfer.commands publish"));
    assert_eq!(relay_publish.4, id_of("transfer.apply"), "the relay publishes as a child of the apply");
    assert_eq!(parent_of("transfer.results receive"), relay_publish.3, "the reply closes the loop at the gateway");
    let batch_statements =
        spans.lock().unwrap().iter().filter(|s| s.1 == "lock cards and read callers" || s.1 == "commit").count();
    assert!(batch_statements >= 2, "the batch's database statements are spans");
}

fn hex_decode(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}
