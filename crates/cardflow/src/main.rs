//! `cardflow`: one binary, one subcommand per role or tool.

mod bench;
mod chart;
mod config;
mod cpu;
mod events;
mod sign;

use anyhow::Context;
use cardflow_ledger::Fixture;
use cardflow_telemetry::Metrics;
use clap::{Parser, Subcommand};
use config::{DatabaseArgs, GatewayArgs, KafkaArgs, MetricsArgs, RelayArgs, WorkerArgs};
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

// Every role allocates per message (JSON, sqlx buffers, rdkafka copies) and the
// worker builds megabyte outbox rows per batch; glibc's allocator showed a few per
// cent of the worker's time in `make bench` (free, consolidation, page faults from
// returning large buffers to the kernel). mimalloc keeps and reuses them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "cardflow", version, about = "Card balance transfers: gateway, worker, relay and tools")]
struct Cli {
    /// `json` for one JSON object per log line; `text` for people.
    #[arg(long, env = "LOG_FORMAT", value_enum, ignore_case = true, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// The HTTP API.
    Gateway {
        #[command(flatten)]
        db: DatabaseArgs,
        #[command(flatten)]
        kafka: KafkaArgs,
        #[command(flatten)]
        gateway: GatewayArgs,
    },
    /// Applies transfer commands to the ledger.
    Worker {
        #[command(flatten)]
        db: DatabaseArgs,
        #[command(flatten)]
        kafka: KafkaArgs,
        #[command(flatten)]
        worker: WorkerArgs,
        #[command(flatten)]
        metrics: MetricsArgs,
    },
    /// Publishes the outbox.
    Relay {
        #[command(flatten)]
        db: DatabaseArgs,
        #[command(flatten)]
        kafka: KafkaArgs,
        #[command(flatten)]
        relay: RelayArgs,
        #[command(flatten)]
        metrics: MetricsArgs,
    },
    /// Gateway, worker and relay in one process.
    All {
        #[command(flatten)]
        db: DatabaseArgs,
        #[command(flatten)]
        kafka: KafkaArgs,
        #[command(flatten)]
        gateway: GatewayArgs,
        #[command(flatten)]
        worker: WorkerArgs,
        #[command(flatten)]
        relay: RelayArgs,
    },
    /// Applies the database migrations.
    Migrate {
        #[command(flatten)]
        db: DatabaseArgs,
    },
    /// Creates the Kafka topics that do not exist yet.
    Topics {
        #[command(flatten)]
        kafka: KafkaArgs,
    },
    /// Upserts reference data and cards from a JSON fixture.
    Seed {
        #[command(flatten)]
        db: DatabaseArgs,
        #[arg(long)]
        file: std::path::PathBuf,
    },
    /// Checks the ledger's invariants; exits 1 naming each failing card.
    Audit {
        #[command(flatten)]
        db: DatabaseArgs,
    },
    /// Prints a signed request (a curl command or headers), or decrypts a response.
    Sign(sign::SignArgs),
    /// Republishes a card's card.balance events from the ledger (same event ids).
    Replay {
        #[command(flatten)]
        db: DatabaseArgs,
        #[command(flatten)]
        kafka: KafkaArgs,
        #[arg(long)]
        card: String,
        #[arg(long, default_value_t = 1)]
        from_seq: i64,
    },
    /// Measures throughput and latency of a system it starts itself.
    Bench {
        #[command(flatten)]
        db: DatabaseArgs,
        #[command(flatten)]
        kafka: KafkaArgs,
        #[command(flatten)]
        bench: bench::BenchArgs,
    },
    /// Prints a topic's events as they arrive, for people debugging.
    Tail {
        #[command(flatten)]
        kafka: KafkaArgs,
        /// A topic: card.balance, transfer.events, transfer.results, transfer.commands(.dlq), or a full name.
        topic: String,
        #[arg(long)]
        from_beginning: bool,
        /// Stop after this many messages.
        #[arg(long)]
        limit: Option<usize>,
    },
}

impl Command {
    /// The role's name, for logs and the traces' service name.
    fn role(&self) -> &'static str {
        match self {
            Command::Gateway { .. } => "gateway",
            Command::Worker { .. } => "worker",
            Command::Relay { .. } => "relay",
            Command::All { .. } => "all",
            Command::Migrate { .. } => "migrate",
            Command::Topics { .. } => "topics",
            Command::Seed { .. } => "seed",
            Command::Audit { .. } => "audit",
            Command::Sign(_) => "sign",
            Command::Replay { .. } => "replay",
            Command::Bench { .. } => "bench",
            Command::Tail { .. } => "tail",
        }
    }
}

fn shutdown_token() -> CancellationToken {
    let token = CancellationToken::new();
    // A supervisor (the test harness, a process manager) can tie our life to a pipe:
    // when it closes our standard input, we shut down cleanly.
    if std::env::var("CARDFLOW_EXIT_ON_STDIN_EOF").is_ok_and(|v| v == "1") {
        let t = token.clone();
        tokio::spawn(async move {
            use tokio::io::AsyncReadExt;
            let mut stdin = tokio::io::stdin();
            let mut buf = [0u8; 64];
            while matches!(stdin.read(&mut buf).await, Ok(n) if n > 0) {}
            tracing::info!("standard input closed; shutting down");
            t.cancel();
        });
    }
    let t = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("signal handler");
            tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutting down");
        t.cancel();
    });
    token
}

fn print_config(role: &str, lines: &[(&str, String)]) {
    let mut text = format!("cardflow {} {role} configuration:", env!("CARGO_PKG_VERSION"));
    for (k, v) in lines {
        text.push_str(&format!("\n  {k:<24} {v}"));
    }
    tracing::info!("{text}");
    Metrics::global().build_info.with_label_values(&[env!("CARGO_PKG_VERSION"), role]).set(1);
}

fn common_lines(db: &DatabaseArgs, kafka: &KafkaArgs) -> Vec<(&'static str, String)> {
    vec![
        ("DATABASE_URL", db.masked()),
        ("KAFKA_BROKERS", kafka.kafka_brokers.clone()),
        ("KAFKA_TOPIC_PREFIX", format!("{:?}", kafka.kafka_topic_prefix)),
        ("KAFKA_PARTITIONS", kafka.kafka_partitions.to_string()),
        ("KAFKA_REPLY_PARTITIONS", kafka.kafka_reply_partitions.to_string()),
        ("KAFKA_FETCH_WAIT_MS", kafka.kafka_fetch_wait_ms.to_string()),
    ]
}

fn gateway_lines(g: &GatewayArgs) -> Vec<(&'static str, String)> {
    vec![
        ("HTTP_ADDR", g.http_addr.to_string()),
        ("GATEWAY_REPLY_PARTITION", g.reply_partition.to_string()),
        ("REPLY_DEADLINE_MS", g.reply_deadline_ms.to_string()),
        ("TRAN_TIME_WINDOW_SECS", g.tran_time_window_secs.to_string()),
        ("KEY_CACHE_TTL_SECS", g.key_cache_ttl_secs.to_string()),
        ("RATE_LIMIT_PER_ASP", if g.rate_limit_per_asp == 0 { "off".into() } else { g.rate_limit_per_asp.to_string() }),
    ]
}

fn worker_lines(w: &WorkerArgs) -> Vec<(&'static str, String)> {
    vec![
        ("WORKER_GROUP_ID", w.worker_group_id.clone()),
        ("WORKER_MAX_BATCH", w.worker_max_batch.to_string()),
        ("WORKER_BATCH_LINGER_MS", w.worker_batch_linger_ms.to_string()),
        ("WORKER_BATCHES_IN_FLIGHT", w.worker_batches_in_flight.to_string()),
        ("WORKER_DB_POOL", w.worker_db_pool.to_string()),
        ("PLATFORM_TIME_ZONE", w.platform_time_zone.to_string()),
    ]
}

fn relay_lines(r: &RelayArgs) -> Vec<(&'static str, String)> {
    vec![
        ("RELAY_BATCH", r.relay_batch.to_string()),
        ("RELAY_LINGER_MS", r.relay_linger_ms.to_string()),
        ("RELAY_SWEEP_MS", r.relay_sweep_ms.to_string()),
        ("RELAY_RETAIN_SECS", r.relay_retain_secs.to_string()),
        ("AUDIT_INTERVAL_SECS", r.audit_interval_secs.to_string()),
    ]
}

/// Binds the metrics address before the role starts: a role whose `/metrics` and
/// probes cannot listen (another process has the port) must not run unseen.
async fn bind_metrics(addr: std::net::SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding METRICS_ADDR {addr}"))?;
    tracing::info!(%addr, "metrics listening");
    Ok(listener)
}

/// `/metrics`, `/healthz` and `/readyz` (database and broker) of a worker or relay.
async fn serve_metrics(
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
    pool: sqlx::PgPool,
    bus: cardflow_bus::BusConfig,
) -> anyhow::Result<()> {
    let broker = cardflow_bus::BrokerProbe::new(&bus)?;
    let router = cardflow_telemetry::router(move || {
        let (pool, broker) = (pool.clone(), broker.clone());
        async move {
            if !cardflow_ledger::ping(&pool).await {
                return Err("database unreachable".to_string());
            }
            if !broker.reachable().await {
                return Err("broker unreachable".to_string());
            }
            Ok(())
        }
    });
    axum::serve(listener, router).with_graceful_shutdown(async move { shutdown.cancelled().await }).await?;
    Ok(())
}

/// Runs a role (a future not yet started) while its metrics server serves on
/// `addr`, bound first. If the server stops first (it only stops on its own by
/// failing), the role is shut down cleanly and the process exits with an error,
/// so a supervisor restarts it rather than leaving it unseen.
async fn alongside_metrics(
    addr: std::net::SocketAddr,
    pool: &sqlx::PgPool,
    bus: &cardflow_bus::BusConfig,
    shutdown: CancellationToken,
    role: impl std::future::Future<Output = Result<(), cardflow_worker::WorkerError>>,
) -> anyhow::Result<()> {
    let listener = bind_metrics(addr).await?;
    let metrics = tokio::spawn(serve_metrics(listener, shutdown.clone(), pool.clone(), bus.clone()));
    tokio::pin!(role);
    tokio::select! {
        ended = &mut role => Ok(ended?),
        served = metrics => {
            let asked = shutdown.is_cancelled();
            shutdown.cancel();
            role.await?;
            match served {
                Ok(Ok(())) if asked => Ok(()),
                Ok(Ok(())) => anyhow::bail!("the metrics server stopped"),
                Ok(Err(e)) => Err(e.context("the metrics server failed")),
                Err(e) => anyhow::bail!("the metrics server panicked: {e}"),
            }
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Migrate { db } => {
            let pool = cardflow_ledger::connect(&db.database_url, 2).await?;
            cardflow_ledger::migrate(&pool).await?;
            println!("migrations applied to {}", db.masked());
        }
        Command::Topics { kafka } => {
            let bus = kafka.bus();
            bus.ensure_topics().await?;
            println!("topics ready: {}", bus.topics.all().join(", "));
        }
        Command::Seed { db, file } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let fixture = Fixture::from_json(&text)?;
            let pool = cardflow_ledger::connect(&db.database_url, 2).await?;
            fixture.load(&pool).await?;
            println!(
                "seeded {} affiliates, {} ASPs, {} products, {} members, {} cards from {}",
                fixture.affiliates.len(),
                fixture.asps.len(),
                fixture.products.len(),
                fixture.members.len(),
                fixture.cards.len(),
                file.display()
            );
        }
        Command::Audit { db } => {
            let pool = cardflow_ledger::connect(&db.database_url, 2).await?;
            let report = cardflow_ledger::audit::run(&pool).await?;
            println!(
                "audited {} cards, {} transfers, {} ledger entries",
                report.cards, report.transfers, report.entries
            );
            if !report.passed() {
                for v in &report.violations {
                    println!("VIOLATION {v}");
                }
                println!("audit FAILED: {} violation(s)", report.violations.len());
                return Ok(ExitCode::from(1));
            }
            println!("audit passed");
        }
        Command::Sign(args) => return sign::run(args),
        Command::Replay { db, kafka, card, from_seq } => {
            let pool = cardflow_ledger::connect(&db.database_url, 2).await?;
            let n = events::replay(&pool, &kafka.bus(), &card, from_seq).await?;
            println!("republished {n} card.balance event(s) of card {card} from sequence {from_seq}");
        }
        Command::Bench { db, kafka, bench } => {
            return bench::run(bench, &db.database_url, &kafka.bus()).await;
        }
        Command::Tail { kafka, topic, from_beginning, limit } => {
            events::tail(&kafka.bus(), &topic, from_beginning, limit).await?;
        }
        Command::Gateway { db, kafka, gateway } => {
            let mut lines = common_lines(&db, &kafka);
            lines.extend(gateway_lines(&gateway));
            print_config("gateway", &lines);
            let shutdown = shutdown_token();
            let bus = kafka.bus();
            bus.ensure_topics().await?;
            let pool = cardflow_ledger::connect(&db.database_url, gateway.gateway_db_pool).await?;
            let app = cardflow_gateway::build(gateway.config(), pool, bus).await?;
            cardflow_gateway::serve(app, async move { shutdown.cancelled().await }).await?;
        }
        Command::Worker { db, kafka, worker, metrics } => {
            let mut lines = common_lines(&db, &kafka);
            lines.extend(worker_lines(&worker));
            lines.push(("METRICS_ADDR", metrics.metrics_addr.to_string()));
            print_config("worker", &lines);
            let shutdown = shutdown_token();
            let bus = kafka.bus();
            bus.ensure_topics().await?;
            let pool = cardflow_ledger::connect_with_cached_plans(&db.database_url, worker.worker_db_pool).await?;
            let role = cardflow_worker::run_worker(worker.config(), pool.clone(), bus.clone(), shutdown.clone());
            alongside_metrics(metrics.metrics_addr, &pool, &bus, shutdown, role).await?;
        }
        Command::Relay { db, kafka, relay, metrics } => {
            let mut lines = common_lines(&db, &kafka);
            lines.extend(relay_lines(&relay));
            lines.push(("METRICS_ADDR", metrics.metrics_addr.to_string()));
            print_config("relay", &lines);
            let shutdown = shutdown_token();
            let bus = kafka.bus();
            bus.ensure_topics().await?;
            let pool = cardflow_ledger::connect(&db.database_url, 4).await?;
            let role = cardflow_worker::run_relay(relay.config(), pool.clone(), bus.clone(), shutdown.clone());
            alongside_metrics(metrics.metrics_addr, &pool, &bus, shutdown, role).await?;
        }
        Command::All { db, kafka, gateway, worker, relay } => {
            let mut lines = common_lines(&db, &kafka);
            lines.extend(gateway_lines(&gateway));
            lines.extend(worker_lines(&worker));
            lines.extend(relay_lines(&relay));
            print_config("all", &lines);
            let shutdown = shutdown_token();
            let bus = kafka.bus();
            bus.ensure_topics().await?;
            let worker_pool =
                cardflow_ledger::connect_with_cached_plans(&db.database_url, worker.worker_db_pool).await?;
            let relay_pool = cardflow_ledger::connect(&db.database_url, 4).await?;
            let gateway_pool = cardflow_ledger::connect(&db.database_url, gateway.gateway_db_pool).await?;
            let mut worker_task =
                tokio::spawn(cardflow_worker::run_worker(worker.config(), worker_pool, bus.clone(), shutdown.clone()));
            let mut relay_task =
                tokio::spawn(cardflow_worker::run_relay(relay.config(), relay_pool, bus.clone(), shutdown.clone()));
            let app = cardflow_gateway::build(gateway.config(), gateway_pool, bus).await?;
            let s = shutdown.clone();
            let serve = cardflow_gateway::serve(app, async move { s.cancelled().await });
            // One process, one fate: if a role dies, stop the others and exit with an
            // error so the supervisor restarts the whole process.
            tokio::select! {
                served = serve => {
                    served?;
                    shutdown.cancel();
                    worker_task.await??;
                    relay_task.await??;
                }
                ended = &mut worker_task => {
                    if !shutdown.is_cancelled() {
                        shutdown.cancel();
                        anyhow::bail!("the worker stopped: {:?}", ended.map(|r| r.map_err(|e| e.to_string())));
                    }
                }
                ended = &mut relay_task => {
                    if !shutdown.is_cancelled() {
                        shutdown.cancel();
                        anyhow::bail!("the relay stopped: {:?}", ended.map(|r| r.map_err(|e| e.to_string())));
                    }
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("the tokio runtime");
    let code = runtime.block_on(async move {
        let _telemetry = match cardflow_telemetry::init(
            cli.log_format == LogFormat::Json,
            &format!("cardflow-{}", cli.command.role()),
        ) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        };
        match run(cli).await {
            Ok(code) => code,
            Err(e) => {
                tracing::error!("{e:#}");
                eprintln!("error: {e:#}");
                ExitCode::from(2)
            }
        }
    });
    // Everything the role owed is done by now. What may still run is a blocking
    // read of standard input (CARDFLOW_EXIT_ON_STDIN_EOF), which never ends by
    // itself: waiting for it kept a role that failed to start from exiting.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    code
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parses(args: &[&str]) -> bool {
        Cli::try_parse_from(std::iter::once("cardflow").chain(args.iter().copied())).is_ok()
    }

    #[test]
    fn the_defaults_parse_for_every_role() {
        assert!(parses(&["gateway"]) && parses(&["worker"]) && parses(&["relay"]) && parses(&["all"]));
    }

    #[test]
    fn a_relay_batch_of_zero_is_refused() {
        assert!(!parses(&["relay", "--relay-batch", "0"]));
        assert!(parses(&["relay", "--relay-batch", "1"]));
    }

    #[test]
    fn an_audit_interval_under_ten_seconds_is_refused() {
        assert!(!parses(&["relay", "--audit-interval-secs", "0"]));
        assert!(parses(&["relay", "--audit-interval-secs", "10"]));
    }

    #[test]
    fn a_worker_batch_of_zero_is_refused() {
        assert!(!parses(&["worker", "--worker-max-batch", "0"]));
    }

    #[test]
    fn a_tran_time_window_that_is_not_positive_is_refused() {
        assert!(!parses(&["gateway", "--tran-time-window-secs", "-5"]));
        assert!(!parses(&["gateway", "--tran-time-window-secs", "0"]));
    }

    #[test]
    fn pools_and_partitions_of_zero_are_refused() {
        assert!(!parses(&["gateway", "--gateway-db-pool", "0"]));
        assert!(!parses(&["worker", "--worker-db-pool", "0"]));
        assert!(!parses(&["topics", "--kafka-partitions", "0"]));
        assert!(!parses(&["gateway", "--reply-partition", "-1"]));
    }

    #[test]
    fn the_log_format_is_text_or_json_in_any_case_and_nothing_else() {
        assert!(parses(&["--log-format", "JSON", "worker"]));
        assert!(parses(&["--log-format", "text", "worker"]));
        assert!(!parses(&["--log-format", "jsn", "worker"]));
    }

    #[test]
    fn help_never_shows_the_database_urls_value() {
        let cli = Cli::command();
        for role in cli.get_subcommands() {
            for arg in role.get_arguments().filter(|a| a.get_id() == "database_url") {
                assert!(arg.is_hide_env_values_set(), "{} shows DATABASE_URL's value in --help", role.get_name());
            }
        }
    }
}
