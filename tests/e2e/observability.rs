//! What an SRE scrapes: every role's `/metrics` carries the key series with
//! plausible values after some transfers, and the health endpoints answer.

use crate::helpers::*;
use std::time::Duration;

/// The value of the first sample whose name and labels start with `prefix`.
fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find(|l| l.starts_with(prefix))?.rsplit(' ').next()?.parse().ok()
}

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
    let lag = eventually(Duration::from_secs(15), "the consumer lag gauge", || async {
        let text = sys.metrics("worker").await;
        text.contains("cardflow_worker_consumer_lag_messages{")
            .then(|| sum_of(&text, "cardflow_worker_consumer_lag_messages"))
    })
    .await;
    assert_eq!(lag, 0.0, "everything consumed");

    let relay = sys.metrics("relay").await;
    assert_eq!(sample(&relay, "cardflow_relay_active"), Some(1.0));
    // 4 results + 4 transfer events + 6 balance events.
    assert_eq!(sum_of(&relay, "cardflow_relay_published_total"), 14.0);
    let backlog = eventually(Duration::from_secs(15), "the backlog gauge", || async {
        let text = sys.metrics("relay").await;
        sample(&text, "cardflow_outbox_backlog_rows").filter(|v| *v == 0.0)
    })
    .await;
    assert_eq!(backlog, 0.0);
    let relay = sys.metrics("relay").await;
    assert!(sample(&relay, "cardflow_audit_last_run_timestamp_seconds").unwrap() > 1.7e9, "the relay audited");
    assert_eq!(sample(&relay, "cardflow_audit_violations"), Some(0.0));
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

#[tokio::test]
async fn a_tiny_bench_run_reports_every_figure_and_passes_its_audit() {
    let json = std::env::temp_dir().join(format!("cardflow-bench-{}.json", std::process::id()));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cardflow"))
        .args(["bench", "--quick", "--pgbench-seconds", "1", "--drain-commands", "200", "--json"])
        .arg(&json)
        .env("DATABASE_URL", std::env::var("DATABASE_URL").unwrap())
        .env("KAFKA_BROKERS", std::env::var("KAFKA_BROKERS").unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bench failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let figures: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    for field in
        ["pgbench_tps", "drain_tps", "async_tps", "sync_p99_ms", "drain_vs_pgbench_ratio", "async_vs_pgbench_ratio"]
    {
        assert!(figures[field].as_f64().is_some_and(|v| v > 0.0), "{field} = {}", figures[field]);
    }
    assert_eq!(figures["audit_passed"], true);
    assert_eq!(figures["conserved"], true);
}
