//! `cardflow bench`: brings up a system of its own (a fresh database and topic
//! prefix, gateway, worker and relay as child processes of this binary), drives it
//! with signed HTTP requests, and prints throughput and latency beside what the same
//! Postgres does with pgbench and what the broker's round trip costs. After the run it
//! audits the ledger and checks conservation: a run that breaks an invariant fails.

use crate::cpu::{CpuCost, CpuReading};
use anyhow::{bail, Context};
use cardflow_bus::rdkafka::consumer::{Consumer, StreamConsumer};
use cardflow_bus::rdkafka::producer::{FutureProducer, FutureRecord};
use cardflow_bus::rdkafka::util::Timeout;
use cardflow_bus::rdkafka::{Offset, TopicPartitionList};
use cardflow_bus::{BusConfig, Topics};
use cardflow_domain::command::SCHEMA_VERSION;
use cardflow_domain::{
    AspId, CardNo, ClientTimeZone, CorrelationId, Money, ReplyAddress, TransferCommand, TransferRequest, UserId,
};
use cardflow_gateway::client::{self, Credentials, SignOptions};
use cardflow_ledger::batch::{apply_batch, IncomingCommand};
use clap::Args;
use hdrhistogram::Histogram;
use rand::Rng;
use rand_distr::Distribution;
use serde_json::json;
use sqlx::PgPool;
use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const ASP: &str = "BENCHASP0000001";
const ACCESS_KEY: &str = "BENCHACCESSKEY00000000000000000000000001";
const SECRET: &str = "bench-secret";
const AFFILIATE: &str = "AFBENCH00001";
const FIRST_USER: u64 = 3_000_000_000;

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Concurrent clients of the load generator (closed loop).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Concurrent clients of the async phase. An async request is answered once
    /// Kafka has the command, so a backend keeps more of them in flight; 256 keep
    /// the gateway's statement groups and produce batches full (async end to end
    /// 8996 against 7241/s at 128, 8 partitions; docs/bench/history.md).
    #[arg(long, default_value_t = 256)]
    async_concurrency: usize,
    /// Seconds per measured phase.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    members: u64,
    /// At least 2, since a transfer moves money between two cards of one member;
    /// at most 100, since a card number holds the member times 100 plus the card.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(2..=100))]
    cards_per_member: u64,
    /// `uniform` or `zipf` (hot members).
    #[arg(long, default_value = "zipf")]
    skew: String,
    /// Commands pre-loaded for the worker drain measurement.
    #[arg(long, default_value_t = 100_000)]
    drain_commands: u64,
    /// The workers' `WORKER_MAX_BATCH`, and the commands per transaction of the
    /// ledger ceiling.
    #[arg(long, env = "WORKER_MAX_BATCH", default_value_t = 2000, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=100_000))]
    ledger_batch: usize,
    /// The workers' `WORKER_BATCHES_IN_FLIGHT`; the ledger ceiling runs as many
    /// transactions at once, as a worker that is behind by full batches does.
    #[arg(long, env = "WORKER_BATCHES_IN_FLIGHT", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    batches_in_flight: u16,
    /// pgbench run length in seconds (0 skips the reference). It runs just before
    /// the async phase and again after the ledger ceiling (once, at the end, in a
    /// sync-only run), and the ratios are against the mean of its runs.
    #[arg(long, default_value_t = 15)]
    pgbench_seconds: u64,
    /// Partitions of the bench's topics: at least `--workers`. Beyond the workers
    /// that read them, partitions cost the local Tansu, which lists every batch a
    /// partition ever stored on each fetch; too few leave the worker's second
    /// batch without partitions to take. Async end to end 9895 and 9949/s at 2,
    /// 9642 and 9609/s at 4, 8996/s at 8; drain 23372/s at 2, 26317 and 26324/s
    /// at 4, 27380/s at 8 (docs/bench/history.md). Production sizes
    /// `KAFKA_PARTITIONS` for its workers (8 in `deploy/`).
    #[arg(long, default_value_t = 4)]
    partitions: i32,
    /// Worker processes.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Write every figure as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Tiny numbers, for a smoke run: caps the duration (2 s), members (20), drain
    /// commands (500), pgbench seconds (2) and clients (8); smaller ones given stay.
    #[arg(long)]
    quick: bool,
    /// Offered load (transfers/s) of the sync and async phases, open loop; without
    /// it they run closed loop (each client sends its next request on an answer).
    #[arg(long)]
    rate: Option<f64>,
    /// Phases to run: `all`; `sync` (sync, half rate, hot card, sweep); `async`
    /// (async end to end, worker drain, ledger ceiling).
    #[arg(long, default_value = "all", value_parser = ["all", "sync", "async"])]
    mode: String,
    /// Measure sync latency at 10% … 110% of the sync maximum and draw the chart.
    #[arg(long)]
    sweep: bool,
    /// Phases at half the sync maximum, each on a system of its own; their
    /// latencies are reported as one histogram. A p99 over one 10-second phase
    /// rests on about 50 requests, and a few stalls of a shared 2-core box move it
    /// by half from one run to the next.
    #[arg(long, default_value_t = 3)]
    half_runs: usize,
    /// Seconds per sweep step.
    #[arg(long, default_value_t = 5)]
    sweep_seconds: u64,
    /// A shell command that starts an empty broker and prints its address as the
    /// last line of its output, run before every phase that uses Kafka (`make
    /// bench` passes `scripts/stack.sh bench-broker`). Without it every phase uses
    /// `KAFKA_BROKERS`. Why: Tansu clones and serializes its whole metadata (every
    /// topic, every producer's sequences) for each batch an idempotent producer
    /// sends, so each phase's topics and producers made every later phase slower:
    /// on one broker the third of three half-rate runs had the worst p99 in seven
    /// full runs of eight, and an empty broker per phase took their merged p99
    /// from 73.3 and 77.7 ms to 60.9 and 58.4 ms. Given twice, the last one holds,
    /// so that `make bench BENCH_ARGS="--broker-per-phase …"` replaces the Makefile's.
    #[arg(long, overrides_with = "broker_per_phase")]
    broker_per_phase: Option<String>,
    /// Where `--sweep` writes its chart (PNG).
    #[arg(long, default_value = "target/bench/latency-vs-load.png")]
    chart: std::path::PathBuf,
}

struct Roles {
    children: Vec<(String, Child, Option<std::process::ChildStdin>)>,
}

impl Drop for Roles {
    fn drop(&mut self) {
        for (_, child, stdin) in self.children.iter_mut() {
            drop(stdin.take());
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

struct Env {
    database_url: String,
    bus: BusConfig,
    http_port: u16,
    group: String,
    broker_per_phase: Option<String>,
    batches_in_flight: u16,
    max_batch: usize,
}

impl Env {
    /// The same database and broker, with topics, a consumer group and a port of
    /// its own.
    fn topics_for(&self, phase: &str) -> Env {
        let prefix = self.bus.topics.commands.trim_end_matches("transfer.commands");
        Env {
            database_url: self.database_url.clone(),
            bus: BusConfig { topics: Topics::with_prefix(&format!("{prefix}{phase}-")), ..self.bus.clone() },
            http_port: free_port(),
            group: format!("{}-{phase}", self.group),
            broker_per_phase: self.broker_per_phase.clone(),
            batches_in_flight: self.batches_in_flight,
            max_batch: self.max_batch,
        }
    }

    /// As [`Env::topics_for`], and with `--broker-per-phase`, on an empty broker.
    fn phase(&self, phase: &str) -> anyhow::Result<Env> {
        let mut env = self.topics_for(phase);
        if let Some(command) = &self.broker_per_phase {
            env.bus.brokers = fresh_broker(command)?;
        }
        Ok(env)
    }
}

/// Runs `--broker-per-phase` and returns the address it printed last.
fn fresh_broker(command: &str) -> anyhow::Result<String> {
    // Without KAFKA_BROKERS: the stack script would take it for an external broker
    // and start nothing.
    let out =
        Command::new("sh").arg("-c").arg(command).env_remove("KAFKA_BROKERS").stderr(Stdio::inherit()).output()?;
    if !out.status.success() {
        bail!("--broker-per-phase `{command}` failed: {}", out.status);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    match stdout.lines().map(str::trim).rfind(|l| !l.is_empty()) {
        Some(address) => Ok(address.to_string()),
        None => bail!("--broker-per-phase `{command}` printed no broker address"),
    }
}

/// Marks as published the outbox rows that earlier phases' relays left behind.
/// A phase's roles are killed when it ends, so the rows its relay had not yet
/// marked stay unpublished, addressed to that phase's topics. With a broker per
/// phase those topics are gone: the next phase's relay would read those rows first
/// and wait for a broker that cannot take them (30 s a round, then again),
/// holding up every reply behind them. No one reads an ended phase's topics.
async fn set_aside_earlier_phases_outbox(env: &Env) -> anyhow::Result<()> {
    let pool = cardflow_ledger::connect(&env.database_url, 1).await?;
    let set_aside = sqlx::query("UPDATE outbox SET published_at = now() WHERE published_at IS NULL")
        .execute(&pool)
        .await?
        .rows_affected();
    pool.close().await;
    if set_aside > 0 {
        eprintln!("bench: {set_aside} outbox rows of earlier phases set aside as published (their phase has ended)");
    }
    Ok(())
}

/// Starts a gateway, a relay and `workers` workers for one phase on topics of its
/// own, and warms them up (connections, the consumer group, the key cache).
///
/// Why topics of its own: Tansu's memory engine lists every batch ever stored in a
/// partition on each fetch, so its cost per fetch grows with the partition's
/// history, and one phase would slow the next (a sweep run after the other phases
/// on shared topics measured p50 151 ms at 649/s, against 36 ms at 866/s at the
/// start). Apache Kafka finds an offset through its index whatever the history.
async fn start_phase(base: &Env, phase: &str, workers: usize, picker: &Picker) -> anyhow::Result<(Env, Roles)> {
    let env = base.phase(phase)?;
    env.bus.ensure_topics().await?;
    set_aside_earlier_phases_outbox(&env).await?;
    let mut roles = Roles { children: Vec::new() };
    spawn(&env, &mut roles, "gateway")?;
    spawn(&env, &mut roles, "relay")?;
    for _ in 0..workers {
        spawn(&env, &mut roles, "worker")?;
    }
    wait_ready(env.http_port).await?;
    load(env.http_port, picker.clone(), 4, Duration::from_secs(2), false, None).await;
    Ok((env, roles))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The environment of a role the bench starts. Each setting the bench takes is set
/// here, not left to the environment the roles inherit: a setting given to the bench
/// as a flag would otherwise change the bench and its JSON but not the roles.
fn role_env(env: &Env, metrics_port: u16) -> Vec<(&'static str, String)> {
    vec![
        ("DATABASE_URL", env.database_url.clone()),
        ("KAFKA_BROKERS", env.bus.brokers.clone()),
        ("KAFKA_TOPIC_PREFIX", env.bus.topics.commands.trim_end_matches("transfer.commands").to_string()),
        ("KAFKA_PARTITIONS", env.bus.partitions.to_string()),
        ("KAFKA_REPLY_PARTITIONS", env.bus.reply_partitions.to_string()),
        ("KAFKA_REPLICATION", env.bus.replication.to_string()),
        ("KAFKA_FETCH_WAIT_MS", env.bus.fetch_wait_ms.to_string()),
        ("HTTP_ADDR", format!("127.0.0.1:{}", env.http_port)),
        ("METRICS_ADDR", format!("127.0.0.1:{metrics_port}")),
        ("WORKER_GROUP_ID", env.group.clone()),
        ("WORKER_MAX_BATCH", env.max_batch.to_string()),
        ("WORKER_BATCHES_IN_FLIGHT", env.batches_in_flight.to_string()),
        ("REPLY_DEADLINE_MS", "30000".to_string()),
        ("GATEWAY_DB_POOL", "32".to_string()),
        ("CARDFLOW_EXIT_ON_STDIN_EOF", "1".to_string()),
        ("RUST_LOG", "warn".to_string()),
    ]
}

/// Starts `role` as a child process; returns the port of its `/metrics`.
fn spawn(env: &Env, roles: &mut Roles, role: &str) -> anyhow::Result<u16> {
    let metrics_port = free_port();
    let mut child = Command::new(std::env::current_exe()?)
        .arg(role)
        .envs(role_env(env, metrics_port))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?;
    let stdin = child.stdin.take();
    roles.children.push((role.to_string(), child, stdin));
    Ok(metrics_port)
}

async fn wait_ready(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Ok(r) = reqwest::get(format!("http://127.0.0.1:{port}/readyz")).await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bail!("the gateway did not become ready")
}

fn replace_db(url: &str, db: &str) -> String {
    let (base, query) = url.split_once('?').map(|(b, q)| (b, Some(q))).unwrap_or((url, None));
    let cut = base.rfind('/').unwrap_or(base.len());
    format!("{}/{db}{}", &base[..cut], query.map(|q| format!("?{q}")).unwrap_or_default())
}

async fn seed(pool: &PgPool, members: u64, cards: u64) -> anyhow::Result<()> {
    let fixture = json!({
        "affiliates": [{"affiliateId": AFFILIATE, "name": "Bench"}],
        "asps": [{"aspId": ASP, "affiliateId": AFFILIATE, "accessKeys": [{"accessKey": ACCESS_KEY, "signingSecret": SECRET}]}],
        "products": [{"productId": "BENCH", "ownerAffiliateId": AFFILIATE, "kind": "PREPAID", "collectionAllowed": true,
                      "maxBalance": 1_000_000_000_000u64, "minUsageRate": null}]
    });
    cardflow_ledger::Fixture::from_json(&fixture.to_string())?.load(pool).await?;
    sqlx::query("INSERT INTO members (user_id, affiliate_id) SELECT $1 + g, $2 FROM generate_series(0, $3 - 1) g")
        .bind(rust_decimal::Decimal::from(FIRST_USER))
        .bind(AFFILIATE)
        .bind(members as i64)
        .execute(pool)
        .await?;
    sqlx::query(
        "INSERT INTO cards (card_no, user_id, product_id, status, balance, opening_balance, total_loaded, expires_on)
         SELECT lpad((7000000000000000 + m * 100 + c)::text, 16, '0'), $1 + m, 'BENCH', 'ACTIVE', 10000000, 10000000, 10000000, '2099-12-31'
         FROM generate_series(0, $2 - 1) m, generate_series(0, $3 - 1) c",
    )
    .bind(rust_decimal::Decimal::from(FIRST_USER))
    .bind(members as i64)
    .bind(cards as i64)
    .execute(pool)
    .await?;
    Ok(())
}

fn card_no(member: u64, card: u64) -> String {
    format!("{:016}", 7_000_000_000_000_000u64 + member * 100 + card)
}

/// Which member and cards the next transfer touches.
#[derive(Clone)]
enum Picker {
    Uniform {
        members: u64,
        cards: u64,
    },
    Zipf {
        dist: rand_distr::Zipf<f64>,
        cards: u64,
    },
    /// Every transfer touches card 0 of member 0.
    HotCard {
        cards: u64,
    },
}

impl Picker {
    fn pick(&self, rng: &mut impl Rng) -> (u64, u64, u64) {
        let (member, cards) = match self {
            Picker::Uniform { members, cards } => (rng.gen_range(0..*members), *cards),
            Picker::Zipf { dist, cards } => (dist.sample(rng) as u64 - 1, *cards),
            Picker::HotCard { cards } => {
                let other = rng.gen_range(1..*cards);
                return if rng.gen_bool(0.5) { (0, 0, other) } else { (0, other, 0) };
            }
        };
        let from = rng.gen_range(0..cards);
        let to = (from + rng.gen_range(1..cards)) % cards;
        (member, from, to)
    }
}

/// A correlation id no other request of this run has. Random ids (7 hex digits a
/// second) collide by the birthday bound at bench rates, and a collision is a
/// `000_008` that no transfer row records, which the bench would wait for forever.
fn unique_correlation_id() -> String {
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let serial = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    client::correlation_id(chrono::Utc::now(), ClientTimeZone::parse("UTC").unwrap(), serial)
}

fn body(member: u64, from: u64, to: u64, amount: u64) -> String {
    format!(
        r#"{{"userId":{},"fromCardNo":"{}","toCardNo":"{}","amount":{amount}}}"#,
        FIRST_USER + member,
        card_no(member, from),
        card_no(member, to)
    )
}

/// Latencies in microseconds, 1 µs to 60 s, three significant digits. One
/// constructor, so that histograms of different phases can be merged.
fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// The table's row of the half-rate phase, under which each run's p99 is printed.
const HALF_ROW: &str = "sync at half the max rate";

/// Whether an answer counts in a phase's throughput and latencies: the ledger
/// decided it (a transfer, or a rejection by a business rule), or, in the async
/// phase, Kafka accepted it (`202`). Anything else is a failure: the system did not
/// do the work, and an overloaded gateway answers `503` or `429` faster than it
/// transfers, so counting those would flatter both figures.
fn counts(code: &str, asynchronous: bool) -> bool {
    use cardflow_domain::ResultCode::*;
    match cardflow_domain::ResultCode::from_code(code) {
        Some(
            Success
            | CollectionBalanceZero
            | InsufficientBalance
            | BalanceOverMax
            | SameCard
            | AffiliateMismatch
            | CollectionNotAllowed
            | OwnerAffiliateNotFound
            | GiftCardNotActive
            | GiftCardExpired
            | UsageRateTooLow
            | CardStatusNotAllowed
            | CardNotFound,
        ) => true,
        Some(Pending) => asynchronous,
        // `017_002` is the worker giving up on a command it could not apply.
        Some(
            TransferFailed
            | MissingRequiredValue
            | InvalidValue
            | MalformedBody
            | AuthenticationFailed
            | RequestTimeOutOfWindow
            | DecryptionFailed
            | CorrelationIdReused
            | ServiceUnavailable
            | TooManyRequests
            | NotFound
            | PayloadTooLarge
            | NoSuchEndpoint
            | MethodNotAllowed,
        )
        | None => false,
    }
}

#[derive(Default)]
struct LoadResult {
    /// Answers that [`counts`] admits: the throughput and the latencies are theirs.
    counted: u64,
    /// Every answer by result code, failures included.
    codes: BTreeMap<String, u64>,
    /// The answers [`counts`] refuses, by result code.
    failed: BTreeMap<String, u64>,
    /// Requests that got no answer (a refused or broken connection).
    errors: u64,
    elapsed: Duration,
    latency_us: Option<Histogram<u64>>,
}

impl LoadResult {
    fn record(&mut self, code: String, latency: Duration, asynchronous: bool) {
        if counts(&code, asynchronous) {
            self.counted += 1;
            if let Some(h) = self.latency_us.as_mut() {
                h.saturating_record(latency.as_micros() as u64);
            }
        } else {
            *self.failed.entry(code.clone()).or_default() += 1;
        }
        *self.codes.entry(code).or_default() += 1;
    }
    fn failures(&self) -> u64 {
        self.failed.values().sum::<u64>() + self.errors
    }
    /// The failures by kind, for a message: `000_010: 2, no answer: 1`.
    fn failure_kinds(&self) -> String {
        let mut each: Vec<String> = self.failed.iter().map(|(code, n)| format!("{code}: {n}")).collect();
        if self.errors > 0 {
            each.push(format!("no answer: {}", self.errors));
        }
        each.join(", ")
    }
    fn tps(&self) -> f64 {
        self.counted as f64 / self.elapsed.as_secs_f64()
    }
    /// `None` when no answer counted (or the phase did not run): an empty
    /// histogram's 0 would read as a measurement.
    fn pct_ms(&self, q: f64) -> Option<f64> {
        self.measured_latencies().map(|h| h.value_at_quantile(q) as f64 / 1000.0)
    }
    fn max_ms(&self) -> Option<f64> {
        self.measured_latencies().map(|h| h.max() as f64 / 1000.0)
    }
    fn measured_latencies(&self) -> Option<&Histogram<u64>> {
        self.latency_us.as_ref().filter(|h| !h.is_empty())
    }
    /// Two results as one (two clients', two runs'): counts add up, latencies share one histogram.
    fn merge(mut self, other: LoadResult) -> LoadResult {
        self.counted += other.counted;
        for (code, n) in other.codes {
            *self.codes.entry(code).or_default() += n;
        }
        for (code, n) in other.failed {
            *self.failed.entry(code).or_default() += n;
        }
        self.errors += other.errors;
        self.elapsed += other.elapsed;
        self.latency_us = match (self.latency_us, other.latency_us) {
            (Some(mut a), Some(b)) => {
                a.add(&b).expect("the load generator's histograms share their bounds");
                Some(a)
            }
            (a, b) => a.or(b),
        };
        self
    }
}

/// Drives the gateway for `duration` with `concurrency` clients. With `rate`, each
/// client paces itself so that together they offer about `rate` requests per second.
///
/// Each client holds one HTTP/1.1 connection of its own (hyper's connection API,
/// no pool) and keeps its own histogram and counts, merged at the end. The load
/// generator shares the two cores with what it measures; with reqwest and shared
/// counters it took a third of a core at 8600 requests/s, time the system under
/// test did not get.
async fn load(
    port: u16,
    picker: Picker,
    concurrency: usize,
    duration: Duration,
    asynchronous: bool,
    rate: Option<f64>,
) -> LoadResult {
    let creds = Arc::new(Credentials {
        asp_id: ASP.into(),
        access_key: ACCESS_KEY.into(),
        signing_secret: SECRET.into(),
        crypto_key: None,
    });
    let started = Instant::now();
    let until = started + duration;
    let time_zone = ClientTimeZone::parse("UTC").expect("UTC is a time zone");
    let per_client_interval = rate.map(|r| Duration::from_secs_f64(concurrency as f64 / r));
    let clients: Vec<_> = (0..concurrency)
        .map(|_| {
            let client = LoadClient { port, creds: creds.clone(), time_zone, picker: picker.clone(), asynchronous };
            tokio::spawn(client.run(until, per_client_interval))
        })
        .collect();
    let mut total = LoadResult::default();
    for client in futures::future::join_all(clients).await {
        total = total.merge(client.unwrap_or_default());
    }
    total.elapsed = started.elapsed();
    total
}

/// One client of the load generator: a connection, its own counts.
struct LoadClient {
    port: u16,
    creds: Arc<Credentials>,
    time_zone: ClientTimeZone,
    picker: Picker,
    asynchronous: bool,
}

type Connection = hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>;

/// The part of an answer the load generator counts.
#[derive(serde::Deserialize)]
struct Answered<'a> {
    #[serde(borrow)]
    code: Option<std::borrow::Cow<'a, str>>,
}

impl LoadClient {
    async fn connect(&self) -> Option<Connection> {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await.ok()?;
        let (sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.ok()?;
        tokio::spawn(connection);
        Some(sender)
    }

    fn request(&self) -> hyper::Request<http_body_util::Full<bytes::Bytes>> {
        let (m, f, t, amount) = {
            let mut rng = rand::thread_rng();
            let (m, f, t) = self.picker.pick(&mut rng);
            (m, f, t, rng.gen_range(1..=100))
        };
        let raw = body(m, f, t, amount);
        let signed = client::sign(
            &self.creds,
            SignOptions {
                method: "POST",
                path: cardflow_gateway::TRANSFER_PATH,
                body: raw.as_bytes(),
                encrypt: false,
                correlation_id: Some(unique_correlation_id()),
                time_zone: self.time_zone,
                now: chrono::Utc::now(),
            },
        );
        let mut req = hyper::Request::post(cardflow_gateway::TRANSFER_PATH)
            .header(hyper::header::HOST, "127.0.0.1")
            .header(hyper::header::CONTENT_TYPE, "application/json");
        for (k, v) in signed.headers {
            req = req.header(k, v);
        }
        if self.asynchronous {
            req = req.header("prefer", "respond-async");
        }
        req.body(http_body_util::Full::new(bytes::Bytes::from(signed.body))).expect("a well-formed request")
    }

    /// Sends one request and reads its answer's result code.
    async fn send(&self, connection: &mut Connection) -> Result<String, hyper::Error> {
        use http_body_util::BodyExt;
        connection.ready().await?;
        let answer = connection.send_request(self.request()).await?;
        let body = answer.into_body().collect().await?.to_bytes();
        Ok(serde_json::from_slice::<Answered>(&body)
            .ok()
            .and_then(|a| a.code.map(|c| c.into_owned()))
            .unwrap_or_else(|| "unreadable".into()))
    }

    async fn run(self, until: Instant, per_client_interval: Option<Duration>) -> LoadResult {
        let mut result = LoadResult { latency_us: Some(latency_histogram()), ..LoadResult::default() };
        let mut connection = None;
        let mut next = Instant::now();
        while Instant::now() < until {
            // A paced request's latency counts from when it was due, not from
            // when a client that fell behind got to send it: otherwise a slow
            // system would hide its queueing (coordinated omission).
            let mut due = None;
            if let Some(iv) = per_client_interval {
                let jitter = rand::thread_rng().gen_range(0.5..1.5);
                next += iv.mul_f64(jitter);
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    tokio::time::sleep(wait).await;
                }
                due = Some(next);
            }
            let sent = due.unwrap_or_else(Instant::now);
            if connection.is_none() {
                connection = self.connect().await;
            }
            let outcome = match connection.as_mut() {
                Some(c) => self.send(c).await.ok(),
                None => None,
            };
            match outcome {
                Some(code) => result.record(code, sent.elapsed(), self.asynchronous),
                None => {
                    // A refused or broken connection: counted, and the next request
                    // opens a new one (after a pause, so a down gateway is not spun on).
                    result.errors += 1;
                    connection = None;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
        result
    }
}

/// How far the worker group has applied the commands topic, and how much was
/// produced to it. The worker commits a batch's offsets only after the batch's
/// transaction committed, so the committed offsets count applied commands. Asking
/// the broker, not the database, keeps the measuring off the measured database: a
/// `count(*)` of transfers every few milliseconds cost it a third of a core.
struct Progress {
    consumer: cardflow_bus::rdkafka::consumer::BaseConsumer,
    topic: String,
    partitions: i32,
}

impl Progress {
    fn new(env: &Env) -> anyhow::Result<Progress> {
        Ok(Progress {
            consumer: env.bus.group_consumer(&env.group, cardflow_bus::rdkafka::consumer::DefaultConsumerContext)?,
            topic: env.bus.topics.commands.clone(),
            partitions: env.bus.partitions,
        })
    }

    fn partitions(&self) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for p in 0..self.partitions {
            tpl.add_partition(&self.topic, p);
        }
        tpl
    }

    /// Commands applied: the group's committed offsets, summed.
    fn applied(&self) -> anyhow::Result<i64> {
        let committed = self.consumer.committed_offsets(self.partitions(), Duration::from_secs(10))?;
        Ok(committed
            .elements()
            .iter()
            .map(|e| match e.offset() {
                Offset::Offset(o) => o,
                _ => 0,
            })
            .sum())
    }

    /// Commands produced: the high watermarks, summed.
    fn produced(&self) -> anyhow::Result<i64> {
        let mut sum = 0;
        for p in 0..self.partitions {
            sum += self.consumer.fetch_watermarks(&self.topic, p, Duration::from_secs(10))?.1;
        }
        Ok(sum)
    }

    /// Waits until `target` commands are applied; returns when they were.
    async fn wait_applied(&self, target: i64, timeout: Duration) -> anyhow::Result<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            let n = self.applied()?;
            if n >= target {
                return Ok(Instant::now());
            }
            if Instant::now() > deadline {
                bail!("only {n} of {target} commands were applied in {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Polls `began` every 10 ms until it says the work has begun, and returns the time
/// of the poll before, with the machine's CPU reading then. The work began after
/// that poll started, so a slow or failed poll moves the start earlier, and the rate
/// timed from it lower, never higher.
async fn start_of_work<F, Fut>(mut began: F, timeout: Duration) -> anyhow::Result<(Instant, Option<CpuReading>)>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    let mut before = (Instant::now(), CpuReading::now());
    loop {
        let polled = (Instant::now(), CpuReading::now());
        if began().await {
            return Ok(before);
        }
        before = polled;
        if Instant::now() > deadline {
            bail!("the work did not begin within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Whether a worker's `/metrics` text shows that it has begun a batch. The gauge of
/// batches in flight rises as a batch starts; the batch size histogram's count,
/// read too, rises as one ends, for a batch that began and ended between two polls.
fn batch_began(metrics: &str) -> bool {
    let value =
        |name: &str| metrics.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok());
    ["cardflow_worker_batches_in_flight", "cardflow_worker_batch_size_count"]
        .into_iter()
        .any(|name| value(name).is_some_and(|v| v > 0.0))
}

/// [`batch_began`] of the worker whose `/metrics` listens on `port`; a worker not
/// listening yet has not begun.
async fn worker_batch_began(http: &reqwest::Client, port: u16) -> bool {
    match http.get(format!("http://127.0.0.1:{port}/metrics")).send().await {
        Ok(answer) => answer.text().await.is_ok_and(|text| batch_began(&text)),
        Err(_) => false,
    }
}

/// Found before the first phase, so that a machine without pgbench fails the run at
/// once rather than after minutes of phases.
fn pgbench_bin() -> anyhow::Result<String> {
    ["/usr/bin/pgbench"]
        .into_iter()
        .map(str::to_string)
        .chain(
            std::fs::read_dir("/usr/lib/postgresql")
                .into_iter()
                .flatten()
                .flatten()
                .map(|d| d.path().join("bin/pgbench").display().to_string()),
        )
        .find(|p| std::path::Path::new(p).exists())
        .context("pgbench not found (Debian: postgresql-client / postgresql); --pgbench-seconds 0 runs without it")
}

/// One pgbench run: its transactions per second and what each cost the machine
/// (the timed run only, not the initialisation).
fn pgbench(bin: &str, database_url: &str, seconds: u64) -> anyhow::Result<(f64, Option<CpuCost>)> {
    let init = Command::new(bin).args(["-i", "-q", "-s", "8", database_url]).output()?;
    if !init.status.success() {
        bail!("pgbench -i failed: {}", String::from_utf8_lossy(&init.stderr));
    }
    let cpu = CpuReading::now();
    let run =
        Command::new(bin).args(["-c", "8", "-j", "2", "-T", &seconds.to_string(), "-n", database_url]).output()?;
    let out = String::from_utf8_lossy(&run.stdout);
    // A failed run can still print a tps line, of the transactions before it failed.
    if !run.status.success() {
        bail!("pgbench failed ({}): {}", run.status, String::from_utf8_lossy(&run.stderr));
    }
    let tps = pgbench_tps(&out).with_context(|| format!("no tps line in pgbench output:\n{out}"))?;
    let transactions = out
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|rest| rest.split('/').next()?.trim().parse().ok())
        .unwrap_or(tps * seconds as f64);
    Ok((tps, cpu.and_then(|c| c.cost_of(transactions))))
}

/// pgbench's transactions per second without the time its clients took to
/// connect. PostgreSQL 13 and before print two lines, `including connections
/// establishing` and then `excluding …`; 14 and later one, `(without initial
/// connection time)`.
fn pgbench_tps(out: &str) -> Option<f64> {
    out.lines()
        .filter_map(|l| l.strip_prefix("tps = "))
        .find(|rest| !rest.contains("including"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// pgbench on a database of its own, dropped whether or not it ran, so that a failed
/// run leaves no tables behind. The bench's own database is vacuumed and
/// checkpointed first: an autovacuum of what the phases before wrote would
/// otherwise share the cores with pgbench and flatter every ratio.
async fn reference(
    bin: &str,
    admin: &PgPool,
    bench: &PgPool,
    database_url: &str,
    tag: &str,
    seconds: u64,
) -> anyhow::Result<(f64, Option<CpuCost>)> {
    sqlx::raw_sql("VACUUM (ANALYZE)").execute(bench).await?;
    // CHECKPOINT needs a superuser or pg_checkpoint; without it pgbench still runs.
    if let Err(e) = sqlx::raw_sql("CHECKPOINT").execute(admin).await {
        eprintln!("bench: no CHECKPOINT before pgbench ({e})");
    }
    let pgdb = format!("cardflow_pgbench_{tag}");
    sqlx::query(&format!("CREATE DATABASE \"{pgdb}\"")).execute(admin).await?;
    eprintln!("bench: pgbench TPC-B-like -c 8 -j 2 -T {seconds} …");
    let url = replace_db(database_url, &pgdb);
    let bin = bin.to_string();
    let tps = tokio::task::spawn_blocking(move || pgbench(&bin, &url, seconds)).await?;
    sqlx::query(&format!("DROP DATABASE \"{pgdb}\"")).execute(admin).await?;
    tps
}

async fn broker_round_trip(bus: &BusConfig, samples: usize) -> anyhow::Result<(f64, f64)> {
    let topic = bus.topics.dlq.replace("transfer.commands.dlq", "bench.rtt");
    let admin_bus = BusConfig { topics: Topics { commands: topic.clone(), ..bus.topics.clone() }, ..bus.clone() };
    admin_bus.ensure_topics().await?;
    let producer: FutureProducer = bus.producer(0)?;
    let consumer: StreamConsumer = bus.assigned_consumer()?;
    let (_, high) = consumer.fetch_watermarks(&topic, 0, Duration::from_secs(10))?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 0, Offset::Offset(high))?;
    consumer.assign(&tpl)?;
    let mut hist = latency_histogram();
    // The first round trip also pays for the connections, the topic's metadata and
    // the consumer's first fetch, up to a second on Tansu: a warm-up, not a sample
    // (with `--quick`'s 20 samples it was the p99).
    for i in 0..=samples {
        let started = Instant::now();
        let payload = i.to_string();
        producer
            .send(
                FutureRecord::to(&topic).key("k").payload(&payload).partition(0),
                Timeout::After(Duration::from_secs(10)),
            )
            .await
            .map_err(|(e, _)| e)?;
        tokio::time::timeout(Duration::from_secs(10), consumer.recv()).await??;
        if i > 0 {
            hist.saturating_record(started.elapsed().as_micros() as u64);
        }
    }
    Ok((hist.value_at_quantile(0.5) as f64 / 1000.0, hist.value_at_quantile(0.99) as f64 / 1000.0))
}

/// A transfer command between two cards of one member, as a waiting gateway
/// would publish it (so the drain and the ledger ceiling count the reply's cost).
fn command(env: &Env, picker: &Picker) -> anyhow::Result<TransferCommand> {
    let (m, f, t) = picker.pick(&mut rand::thread_rng());
    let request = TransferRequest {
        user_id: UserId::new(FIRST_USER + m)?,
        from_card_no: CardNo::parse(&card_no(m, f))?,
        to_card_no: CardNo::parse(&card_no(m, t))?,
        amount: Some(Money::from_units(rand::thread_rng().gen_range(1..=100))),
    };
    Ok(TransferCommand {
        schema_version: SCHEMA_VERSION,
        asp_id: AspId::parse(ASP)?,
        correlation_id: CorrelationId::parse(&unique_correlation_id())?,
        fingerprint: request.fingerprint(),
        request,
        reply_to: ReplyAddress { topic: env.bus.topics.results.clone(), partition: env.bus.reply_partitions - 1 },
        awaits_reply: true,
        submitted_at: chrono::Utc::now(),
    })
}

/// The ledger's own ceiling: the worker's batch transaction
/// ([`cardflow_ledger::batch::apply_batch`]) called back to back with commands
/// already in memory, in batches of `batch`, `in_flight` transactions at once.
/// The commands are shared among them by member, so no two lock the same card,
/// as with a worker that is behind (its batches in flight hold different
/// partitions of the member key). No broker, no decoding, no relay: what the
/// drain would reach if Kafka and the rest cost nothing, and so how much of the
/// gap to pgbench is the ledger's own work. Its outbox rows stay unpublished (no
/// relay runs after it) and go with the bench database.
async fn ledger_ceiling(
    env: &Env,
    picker: &Picker,
    commands: u64,
    batch: usize,
    in_flight: u16,
) -> anyhow::Result<(f64, Option<CpuCost>)> {
    let env = &env.topics_for("ledger");
    let topics = cardflow_ledger::OutboxTopics {
        card_balance: env.bus.topics.card_balance.clone(),
        transfer_events: env.bus.topics.transfer_events.clone(),
    };
    let lanes = u64::from(in_flight.max(1));
    let mut per_lane: Vec<Vec<IncomingCommand>> = vec![Vec::new(); lanes as usize];
    for _ in 0..commands {
        let command = command(env, picker)?;
        per_lane[(command.request.user_id.get() % lanes) as usize].push(IncomingCommand { command, traceparent: None });
    }
    let today = chrono::Utc::now().date_naive();
    // The worker's pool, with the worker's plan cache.
    let pool = cardflow_ledger::connect_with_cached_plans(&env.database_url, lanes as u32).await?;
    let cpu = CpuReading::now();
    let started = Instant::now();
    // A task per lane, as the worker runs them: their Rust work runs side by side too.
    let runs = per_lane.into_iter().map(|lane| {
        let (pool, topics) = (pool.clone(), topics.clone());
        tokio::spawn(async move {
            for chunk in lane.chunks(batch.max(1)) {
                let report = apply_batch(&pool, chunk, &topics, today).await?;
                if let Some(r) = report.results.iter().find(|r| r.repeat) {
                    bail!("ledger ceiling: {} was answered as a repeat", r.result.correlation_id);
                }
            }
            Ok(())
        })
    });
    for run in futures::future::join_all(runs).await {
        run??;
    }
    let elapsed = started.elapsed();
    let cost = cpu.and_then(|c| c.cost_of(commands as f64));
    pool.close().await;
    Ok((commands as f64 / elapsed.as_secs_f64().max(0.001), cost))
}

/// Pre-loads `commands` into a commands topic no worker reads yet, then starts a
/// worker on it and times how fast it applies them. The drain uses topics and a
/// consumer group of its own, so no running worker has to leave or join a group.
///
/// The time runs from the last poll of the worker's `/metrics` (every 10 ms) before
/// it showed a batch begun, to the poll of the group's committed offsets that found
/// every command applied. So the first batch's transaction is inside it: timed from
/// the first commit, as it once was, up to 2000 counted commands were applied before
/// the clock started, which flattered the rate, most of all in a short run. Outside
/// it are the worker's start-up and its joining the consumer group, which are
/// start-up, not work, and the fetch that gives its first batch something to start
/// on (one broker round trip).
async fn drain(env: &Env, picker: &Picker, commands: u64) -> anyhow::Result<(f64, Option<CpuCost>)> {
    let env = &env.phase("drain")?;
    env.bus.ensure_topics().await?;
    let producer: FutureProducer = env.bus.producer(5)?;
    let progress = Progress::new(env)?;
    let mut sends = Vec::new();
    for _ in 0..commands {
        let cmd = command(env, picker)?;
        let payload = serde_json::to_vec(&cmd)?;
        let key = cmd.key();
        let producer = producer.clone();
        let topic = env.bus.topics.commands.clone();
        sends.push(async move {
            producer
                .send(FutureRecord::to(&topic).key(&key).payload(&payload), Timeout::After(Duration::from_secs(30)))
                .await
                .map_err(|(e, _)| e)
        });
        if sends.len() >= 2_000 {
            for r in futures::future::join_all(std::mem::take(&mut sends)).await {
                r?;
            }
        }
    }
    for r in futures::future::join_all(sends).await {
        r?;
    }
    eprintln!("bench: {commands} commands pre-loaded; starting a worker on them");
    let mut roles = Roles { children: Vec::new() };
    let metrics_port = spawn(env, &mut roles, "worker")?;
    let http = reqwest::Client::builder().timeout(Duration::from_secs(1)).build()?;
    let (first, cpu) = start_of_work(|| worker_batch_began(&http, metrics_port), Duration::from_secs(120))
        .await
        .context("the drain's worker began no batch")?;
    let last = progress.wait_applied(commands as i64, Duration::from_secs(600)).await?;
    let cost = cpu.and_then(|c| c.cost_of(commands as f64));
    Ok((commands as f64 / (last - first).as_secs_f64().max(0.001), cost))
}

pub async fn run(args: BenchArgs, database_url: &str, kafka: &BusConfig) -> anyhow::Result<std::process::ExitCode> {
    let mut a = args.clone();
    if a.partitions < 1 || (a.partitions as usize) < a.workers {
        bail!(
            "--partitions ({}) must be at least 1 and at least --workers ({}): a worker without a partition idles",
            a.partitions,
            a.workers
        );
    }
    // `--quick` caps the numbers rather than setting them, so that a smaller one
    // given beside it (`--pgbench-seconds 0`: no reference) still holds.
    if a.quick {
        a.duration = a.duration.min(2);
        a.members = a.members.min(20);
        a.drain_commands = a.drain_commands.min(500);
        a.pgbench_seconds = a.pgbench_seconds.min(2);
        a.concurrency = a.concurrency.min(8);
        a.async_concurrency = a.async_concurrency.min(8);
        a.half_runs = a.half_runs.min(2);
    }
    let pgbench_bin = if a.pgbench_seconds > 0 { Some(pgbench_bin()?) } else { None };
    let tag = format!("{}_{:06x}", chrono::Utc::now().format("%H%M%S"), rand::random::<u32>() & 0xffffff);
    let db = format!("cardflow_bench_{tag}");
    let admin = cardflow_ledger::connect(database_url, 1).await?;
    sqlx::query(&format!("CREATE DATABASE \"{db}\"")).execute(&admin).await?;
    let env = Env {
        database_url: replace_db(database_url, &db),
        bus: BusConfig {
            topics: Topics::with_prefix(&format!("bench-{tag}-")),
            partitions: a.partitions,
            reply_partitions: 4,
            replication: 1,
            ..kafka.clone()
        },
        http_port: free_port(),
        group: format!("bench-{tag}-worker"),
        broker_per_phase: a.broker_per_phase.clone(),
        batches_in_flight: a.batches_in_flight,
        max_batch: a.ledger_batch,
    };
    let pool = cardflow_ledger::connect(&env.database_url, 4).await?;
    cardflow_ledger::migrate(&pool).await?;
    seed(&pool, a.members, a.cards_per_member).await?;
    env.bus.ensure_topics().await?;
    let total_before = cardflow_ledger::audit::total_balance(&pool).await?;
    eprintln!("bench: database {db}, topics bench-{tag}-*, {} members × {} cards", a.members, a.cards_per_member);

    let mut figures = serde_json::Map::new();
    // pgbench brackets the phases it is compared with rather than running once at
    // the start: a shared machine's speed drifts over a run of several minutes, and
    // a reference measured long before the async phase and the drain made their
    // ratios say as much about the drift as about cardflow.
    // Each pgbench run: its tps and what a transaction cost the machine.
    let mut references: Vec<(f64, Option<CpuCost>)> = Vec::new();
    let (mut async_cpu, mut drain_cpu, mut ledger_cpu) = (None, None, None);

    let (rtt_p50, rtt_p99) = broker_round_trip(&env.bus, if a.quick { 20 } else { 300 }).await?;
    figures.insert("broker_rtt_p50_ms".into(), json!(rtt_p50));
    figures.insert("broker_rtt_p99_ms".into(), json!(rtt_p99));

    let picker = match a.skew.as_str() {
        "uniform" => Picker::Uniform { members: a.members, cards: a.cards_per_member },
        "zipf" => Picker::Zipf { dist: rand_distr::Zipf::new(a.members, 1.1)?, cards: a.cards_per_member },
        other => bail!("unknown --skew {other}: uniform or zipf"),
    };
    let d = Duration::from_secs(a.duration);

    let (run_sync, run_async) = (a.mode != "async", a.mode != "sync");
    let loop_kind = match a.rate {
        Some(r) => format!("open loop at {r:.0}/s"),
        None => "closed loop".to_string(),
    };
    let (mut sync, mut sync_half, mut asynchronous, mut hot) = Default::default();
    let (mut half_rate, mut async_tps, mut drain_tps, mut ledger_tps) = (0.0, 0.0, 0.0, 0.0);
    let mut sweep = Vec::new();
    let mut half_run_p99s: Vec<Option<f64>> = Vec::new();
    if run_sync {
        let (phase, roles) = start_phase(&env, "sync", a.workers, &picker).await?;
        eprintln!("bench: sync, {loop_kind}, {} clients …", a.concurrency);
        sync = load(phase.http_port, picker.clone(), a.concurrency, d, false, a.rate).await;
        drop(roles);
        // The maximum is what the ledger decided per second: the half rate and the
        // sweep's steps are fractions of work done, not of refusals answered.
        half_rate = (sync.tps() / 2.0).max(1.0);
        for run in 0..a.half_runs.max(1) {
            let (phase, roles) = start_phase(&env, &format!("half{run}"), a.workers, &picker).await?;
            eprintln!(
                "bench: sync at half the maximum ({half_rate:.0}/s), run {} of {} …",
                run + 1,
                a.half_runs.max(1)
            );
            let r = load(phase.http_port, picker.clone(), a.concurrency, d, false, Some(half_rate)).await;
            drop(roles);
            half_run_p99s.push(r.pct_ms(0.99));
            sync_half = LoadResult::merge(sync_half, r);
        }
        if a.sweep {
            for (step_no, fraction) in [0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.1].into_iter().enumerate() {
                let offered = (sync.tps() * fraction).max(1.0);
                let (phase, _roles) = start_phase(&env, &format!("sweep{step_no}"), a.workers, &picker).await?;
                eprintln!("bench: sweep, sync offered {offered:.0}/s …");
                let step = Duration::from_secs(a.sweep_seconds);
                let r = load(phase.http_port, picker.clone(), a.concurrency * 2, step, false, Some(offered)).await;
                sweep.push(crate::chart::SweepPoint {
                    offered_tps: offered,
                    achieved_tps: r.tps(),
                    p50_ms: r.pct_ms(0.5),
                    p90_ms: r.pct_ms(0.9),
                    p99_ms: r.pct_ms(0.99),
                    p999_ms: r.pct_ms(0.999),
                    failures: r.failures(),
                });
            }
        }
        let (phase, _roles) = start_phase(&env, "hot", a.workers, &picker).await?;
        eprintln!("bench: hot card, every transfer touches one card …");
        hot = load(phase.http_port, Picker::HotCard { cards: a.cards_per_member }, a.concurrency, d, false, None).await;
    }
    if run_async {
        if let Some(bin) = pgbench_bin.as_deref() {
            references.push(reference(bin, &admin, &pool, database_url, &tag, a.pgbench_seconds).await?);
        }
        let (phase, roles) = start_phase(&env, "async", a.workers, &picker).await?;
        eprintln!("bench: async (Prefer: respond-async), {loop_kind} …");
        let progress = Progress::new(&phase)?;
        let cpu = CpuReading::now();
        let started = Instant::now();
        asynchronous = load(phase.http_port, picker.clone(), a.async_concurrency, d, true, a.rate).await;
        let accepted = *asynchronous.codes.get("000_009").unwrap_or(&0) as i64;
        let produced = progress.produced()?;
        let applied_at = progress.wait_applied(produced, Duration::from_secs(600)).await?;
        async_tps = accepted as f64 / (applied_at - started).as_secs_f64();
        async_cpu = cpu.and_then(|c| c.cost_of(accepted as f64));
        // Its consumer must not outlive the phase's broker (`--broker-per-phase`).
        drop(progress);

        eprintln!("bench: worker drain of {} pre-loaded commands …", a.drain_commands);
        drop(roles);
        (drain_tps, drain_cpu) = drain(&env, &picker, a.drain_commands).await?;
        eprintln!("bench: ledger ceiling, {} commands through the batch transaction alone …", a.drain_commands);
        (ledger_tps, ledger_cpu) =
            ledger_ceiling(&env, &picker, a.drain_commands, a.ledger_batch, a.batches_in_flight).await?;
    }
    if let Some(bin) = pgbench_bin.as_deref() {
        references.push(reference(bin, &admin, &pool, database_url, &tag, a.pgbench_seconds).await?);
    }
    let deadlocks: i64 =
        sqlx::query_scalar("SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()")
            .fetch_one(&pool)
            .await?;
    let sync_row = format!("sync ({loop_kind}{})", if a.rate.is_some() { "" } else { ", max" });
    // The phases whose figures rest on every request being done: a failure there
    // fails the run. The sweep's steps past the maximum may shed load, so its
    // failures are reported, not held against the run.
    let failed = failed_phases(&[
        (sync_row.as_str(), &sync),
        (HALF_ROW, &sync_half),
        ("async submit", &asynchronous),
        ("hot card", &hot),
    ]);

    let report = cardflow_ledger::audit::run(&pool).await?;
    let total_after = cardflow_ledger::audit::total_balance(&pool).await?;
    let conserved = total_after == total_before;

    // What this run measured, decided once for the table and the JSON: a figure it
    // did not measure is `not run` in one and null in the other, never a 0 that
    // would read as a measurement to whatever compares runs.
    let measured = |value: f64, ran: bool| ran.then_some(value);
    let pgbench_runs: Vec<f64> = references.iter().map(|(tps, _)| *tps).collect();
    let pgbench_cpu: Vec<CpuCost> = references.iter().filter_map(|(_, cpu)| *cpu).collect();
    let pgbench = (!pgbench_runs.is_empty()).then(|| pgbench_runs.iter().sum::<f64>() / pgbench_runs.len() as f64);
    let async_applied = measured(async_tps, run_async);
    let drain = measured(drain_tps, run_async);
    let ledger = measured(ledger_tps, run_async);
    let vs_pgbench = |x: Option<f64>| Some(x? / pgbench?);
    let drain_vs_ledger = drain.zip(ledger.filter(|l| *l > 0.0)).map(|(d, l)| d / l);
    figures.insert("pgbench_tps".into(), json!(pgbench));
    figures.insert("pgbench_runs_tps".into(), json!(pgbench_runs));
    for (name, r) in [("sync_max", &sync), ("sync_half", &sync_half), ("async_submit", &asynchronous), ("hot", &hot)] {
        let ran = r.latency_us.is_some();
        figures.insert(format!("{name}_tps"), json!(measured(r.tps(), ran)));
        for (q, label) in [(0.5, "p50"), (0.9, "p90"), (0.99, "p99"), (0.999, "p999")] {
            figures.insert(format!("{name}_{label}_ms"), json!(r.pct_ms(q)));
        }
        figures.insert(format!("{name}_max_ms"), json!(r.max_ms()));
        figures.insert(format!("{name}_codes"), json!(r.codes));
        figures.insert(format!("{name}_errors"), json!(r.errors));
        figures.insert(format!("{name}_failures"), json!(ran.then_some(r.failures())));
    }
    // Issue 7's target: the sync p99 at half the maximum.
    figures.insert("sync_p99_ms".into(), json!(sync_half.pct_ms(0.99)));
    figures.insert("async_tps".into(), json!(async_applied));
    figures.insert("drain_tps".into(), json!(drain));
    figures.insert("drain_vs_pgbench_ratio".into(), json!(vs_pgbench(drain)));
    figures.insert("async_vs_pgbench_ratio".into(), json!(vs_pgbench(async_applied)));
    figures.insert("ledger_tps".into(), json!(ledger));
    figures.insert("ledger_vs_pgbench_ratio".into(), json!(vs_pgbench(ledger)));
    figures.insert("drain_vs_ledger_ratio".into(), json!(drain_vs_ledger));
    let cpu_rows = [
        ("async", "async applied (per transfer)", async_cpu),
        ("drain", "worker drain (per command)", drain_cpu),
        ("ledger", "ledger ceiling (per command)", ledger_cpu),
        ("pgbench", "pgbench (per transaction)", crate::cpu::mean(&pgbench_cpu)),
    ];
    for (name, _, cost) in &cpu_rows {
        figures.insert(format!("{name}_cpu_us"), json!(cost.map(|c| c.us_per_op)));
        figures.insert(format!("{name}_cpu_kernel_pct"), json!(cost.map(|c| c.kernel_pct)));
        figures.insert(format!("{name}_cpu_busy_pct"), json!(cost.map(|c| c.busy_pct)));
        figures.insert(format!("{name}_cpu_steal_pct"), json!(cost.map(|c| c.steal_pct)));
    }
    figures.insert("sync_half_rate".into(), json!(measured(half_rate, run_sync)));
    figures.insert("sync_half_runs_p99_ms".into(), json!(half_run_p99s));
    figures.insert("audit_passed".into(), json!(report.passed()));
    figures.insert("conserved".into(), json!(conserved));
    figures.insert("concurrency".into(), json!(a.concurrency));
    figures.insert("async_concurrency".into(), json!(a.async_concurrency));
    figures.insert("workers".into(), json!(a.workers));
    figures.insert("partitions".into(), json!(a.partitions));
    figures.insert("batches_in_flight".into(), json!(a.batches_in_flight));
    figures.insert("worker_max_batch".into(), json!(a.ledger_batch));
    figures.insert("skew".into(), json!(a.skew));
    figures.insert("mode".into(), json!(a.mode));
    figures.insert("fetch_wait_ms".into(), json!(kafka.fetch_wait_ms));
    figures.insert("rate".into(), json!(a.rate));
    figures.insert("broker_per_phase".into(), json!(a.broker_per_phase.is_some()));
    figures.insert("deadlocks".into(), json!(deadlocks));
    if !sweep.is_empty() {
        figures.insert("sweep".into(), json!(sweep));
        let title =
            format!("cardflow sync latency against offered load ({} clients, {} skew)", a.concurrency * 2, a.skew);
        crate::chart::draw(&a.chart, &title, &sweep)?;
    }

    println!();
    println!(
        "cardflow bench ({} s phases, {} clients sync, {} async, {} skew, {} worker(s), {} partitions, {} batches in flight, {})",
        a.duration,
        a.concurrency,
        a.async_concurrency,
        a.skew,
        a.workers,
        a.partitions,
        a.batches_in_flight,
        if a.broker_per_phase.is_some() { "an empty broker per phase" } else { "one broker" }
    );
    println!(
        "{:<34} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "phase", "tps", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms", "failures"
    );
    for (name, r) in [
        (sync_row.as_str(), &sync),
        (HALF_ROW, &sync_half),
        ("async submit (202)", &asynchronous),
        ("hot card (sync)", &hot),
    ] {
        // A phase this mode did not run has no row (its figures would be NaN).
        if r.latency_us.is_none() {
            continue;
        }
        println!(
            "{name:<34} {:>10.0} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            r.tps(),
            ms(r.pct_ms(0.5)),
            ms(r.pct_ms(0.9)),
            ms(r.pct_ms(0.99)),
            ms(r.pct_ms(0.999)),
            ms(r.max_ms()),
            r.failures()
        );
        if name == HALF_ROW && half_run_p99s.len() > 1 {
            let each: Vec<String> = half_run_p99s.iter().map(|p| ms(*p)).collect();
            println!("{:<34} {:>10} {}", "  p99 of each of its runs (ms)", "", each.join(", "));
        }
    }
    let shown = |value: Option<f64>, decimals: usize| match value {
        Some(v) => format!("{v:.decimals$}"),
        None => "not run".to_string(),
    };
    println!("{:<34} {:>10}", "async applied end to end", shown(async_applied, 0));
    println!("{:<34} {:>10}", "worker drain (commands/s)", shown(drain, 0));
    println!("{:<34} {:>10}", "ledger ceiling (commands/s)", shown(ledger, 0));
    println!("{:<34} {:>10}", "pgbench TPC-B -c 8 -j 2 (tps)", shown(pgbench, 0));
    if pgbench_runs.len() > 1 {
        let each: Vec<String> = pgbench_runs.iter().map(|t| format!("{t:.0}")).collect();
        println!("{:<34} {:>10} {}", "  before async, after the ledger", "", each.join(", "));
    }
    println!("{:<34} {:>10}", "drain / pgbench", shown(vs_pgbench(drain), 2));
    println!("{:<34} {:>10}", "async applied / pgbench", shown(vs_pgbench(async_applied), 2));
    println!("{:<34} {:>10}", "ledger ceiling / pgbench", shown(vs_pgbench(ledger), 2));
    println!("{:<34} {:>10.1} / {:.1}", "broker round trip p50 / p99 (ms)", rtt_p50, rtt_p99);
    if cpu_rows.iter().any(|(_, _, c)| c.is_some()) {
        println!(
            "{:<34} {:>10} {:>9} {:>9} {:>9}",
            "CPU of the whole machine", "µs per op", "kernel %", "busy %", "steal %"
        );
        for (_, label, cost) in &cpu_rows {
            match cost {
                Some(c) => println!(
                    "  {label:<32} {:>10.1} {:>9.0} {:>9.0} {:>9.1}",
                    c.us_per_op, c.kernel_pct, c.busy_pct, c.steal_pct
                ),
                None => println!("  {label:<32} {:>10}", "not run"),
            }
        }
    }
    println!(
        "result codes (sync): {:?}; hot card: {:?}; transport errors: {}",
        sync.codes,
        hot.codes,
        sync.errors + hot.errors
    );
    if !sweep.is_empty() {
        println!();
        println!(
            "{:<34} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "sweep: offered tps", "achieved", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "failures"
        );
        for p in &sweep {
            println!(
                "{:<34.0} {:>10.0} {:>9} {:>9} {:>9} {:>9} {:>9}",
                p.offered_tps,
                p.achieved_tps,
                ms(p.p50_ms),
                ms(p.p90_ms),
                ms(p.p99_ms),
                ms(p.p999_ms),
                p.failures
            );
        }
        println!("chart: {} (open it in any image viewer)", a.chart.display());
    }
    println!("deadlocks: {deadlocks}");
    println!("audit: {}; money conserved: {conserved}", if report.passed() { "passed" } else { "FAILED" });
    if let Some(path) = &a.json {
        std::fs::write(path, serde_json::to_string_pretty(&serde_json::Value::Object(figures))?)?;
        println!("figures written to {}", path.display());
    }
    if !report.passed() || !conserved {
        for v in &report.violations {
            eprintln!("VIOLATION {v}");
        }
        eprintln!("bench FAILED: the ledger's invariants do not hold; database {db} kept for inspection");
        return Ok(std::process::ExitCode::from(1));
    }
    if deadlocks > 0 || !failed.is_empty() {
        for phase in &failed {
            eprintln!("bench FAILED: {phase}");
        }
        eprintln!("bench FAILED: {deadlocks} deadlock(s), {} phase(s) with failures; database {db} kept", failed.len());
        return Ok(std::process::ExitCode::from(1));
    }
    // A passing run's database holds nothing worth its disk (each run writes
    // hundreds of megabytes of ledger, outbox and WAL).
    pool.close().await;
    sqlx::query(&format!("DROP DATABASE IF EXISTS \"{db}\" WITH (FORCE)")).execute(&admin).await?;
    Ok(std::process::ExitCode::SUCCESS)
}

/// A latency for the table: `n/a` where no answer counted.
fn ms(value: Option<f64>) -> String {
    value.map_or_else(|| "n/a".to_string(), |v| format!("{v:.1}"))
}

/// A line for each phase with failures, naming the phase and its failures by code.
fn failed_phases(phases: &[(&str, &LoadResult)]) -> Vec<String> {
    phases
        .iter()
        .filter(|(_, r)| r.failures() > 0)
        .map(|(name, r)| format!("{name}: {} failure(s) ({})", r.failures(), r.failure_kinds()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// A sync phase's result: an answer with `code` for each latency, over 10 seconds.
    fn result(code: &str, errors: u64, latencies_ms: &[u64]) -> LoadResult {
        let mut r = LoadResult { latency_us: Some(latency_histogram()), errors, ..LoadResult::default() };
        for ms in latencies_ms {
            r.record(code.to_string(), Duration::from_millis(*ms), false);
        }
        r.elapsed = Duration::from_secs(10);
        r
    }

    #[test]
    fn merged_half_rate_runs_count_every_request_once() {
        let merged = LoadResult::merge(result("000_000", 1, &[10, 20, 30]), result("000_000", 0, &[40, 50]));
        assert_eq!(merged.counted, 5);
        assert_eq!(merged.codes["000_000"], 5);
        assert_eq!(merged.errors, 1);
        assert_eq!(merged.elapsed, Duration::from_secs(20));
        assert_eq!(merged.latency_us.as_ref().unwrap().len(), 5);
        assert_eq!(merged.tps(), 0.25);
    }

    #[test]
    fn merged_percentiles_come_from_all_runs_not_from_either() {
        let calm = result("000_000", 0, &[10; 99]);
        let stalled = result("000_000", 0, &[500]);
        let merged = LoadResult::merge(calm, stalled);
        assert!((merged.pct_ms(0.5).unwrap() - 10.0).abs() < 0.1);
        assert!((merged.max_ms().unwrap() - 500.0).abs() < 1.0);
    }

    #[test]
    fn merging_into_an_empty_result_keeps_the_other() {
        let merged = LoadResult::merge(LoadResult::default(), result("000_000", 0, &[5, 5, 5, 5]));
        assert_eq!(merged.counted, 4);
        assert!((merged.pct_ms(0.99).unwrap() - 5.0).abs() < 0.1);
    }

    #[test]
    fn merged_runs_keep_each_runs_failures() {
        let merged = LoadResult::merge(result("000_010", 1, &[1, 1]), result("000_010", 0, &[1]));
        assert_eq!(merged.failed["000_010"], 3);
        assert_eq!(merged.failures(), 4);
    }

    #[test]
    fn a_transfer_and_a_business_rule_rejection_are_decided_answers() {
        for code in ["000_000", "005_017", "005_018", "017_001", "017_003", "017_011"] {
            assert!(counts(code, false), "{code}");
        }
    }

    #[test]
    fn answers_the_ledger_did_not_decide_are_failures() {
        for code in ["017_002", "000_010", "000_011", "000_001", "000_008", "000_004", "unreadable"] {
            assert!(!counts(code, false), "{code}");
            assert!(!counts(code, true), "{code}");
        }
    }

    #[test]
    fn a_202_counts_only_in_the_async_phase() {
        assert!(counts("000_009", true));
        assert!(!counts("000_009", false));
    }

    #[test]
    fn a_failed_answer_is_counted_by_code_but_not_in_throughput_or_latency() {
        let mut r = result("000_000", 0, &[10, 10]);
        r.record("000_010".to_string(), Duration::from_millis(1), false);
        assert_eq!(r.codes["000_010"], 1);
        assert_eq!(r.failed["000_010"], 1);
        assert_eq!(r.counted, 2);
        assert_eq!(r.tps(), 0.2);
        assert_eq!(r.latency_us.as_ref().unwrap().len(), 2);
    }

    #[test]
    fn requests_without_an_answer_are_failures() {
        assert_eq!(result("000_000", 3, &[10]).failures(), 3);
    }

    #[test]
    fn a_phase_where_every_request_failed_has_no_percentiles() {
        let r = result("000_010", 2, &[1, 1, 1]);
        assert_eq!(r.pct_ms(0.99), None);
        assert_eq!(r.max_ms(), None);
        assert_eq!(r.tps(), 0.0);
    }

    #[test]
    fn a_phase_that_did_not_run_has_no_percentiles() {
        assert_eq!(LoadResult::default().pct_ms(0.5), None);
    }

    #[test]
    fn only_phases_with_failures_are_named_with_their_counts_by_kind() {
        let clean = result("000_000", 0, &[10]);
        let shed = result("000_010", 1, &[1, 1]);
        let failed = failed_phases(&[("sync", &clean), ("async submit", &shed)]);
        assert_eq!(failed, ["async submit: 3 failure(s) (000_010: 2, no answer: 1)"]);
    }

    #[test]
    fn the_tps_without_connection_time_is_read_from_postgres_13_and_before() {
        let out = "number of transactions actually processed: 30000\n\
                   tps = 2980.123 (including connections establishing)\n\
                   tps = 3001.456 (excluding connections establishing)\n";
        assert_eq!(pgbench_tps(out), Some(3001.456));
    }

    #[test]
    fn the_tps_without_connection_time_is_read_from_postgres_14_and_later() {
        let out = "initial connection time = 4.321 ms\ntps = 4570.987654 (without initial connection time)\n";
        assert_eq!(pgbench_tps(out), Some(4570.987654));
    }

    #[test]
    fn pgbench_output_without_a_tps_line_has_no_tps() {
        assert_eq!(pgbench_tps("pgbench: error: connection to server failed\n"), None);
    }

    #[test]
    fn a_worker_that_has_not_begun_a_batch_shows_none_in_its_metrics() {
        let idle = "# TYPE cardflow_worker_batches_in_flight gauge\ncardflow_worker_batches_in_flight 0\n\
                    cardflow_worker_batch_size_sum 0\ncardflow_worker_batch_size_count 0\n";
        assert!(!batch_began(idle));
    }

    #[test]
    fn a_batch_in_flight_shows_that_the_work_began() {
        assert!(batch_began("cardflow_worker_batches_in_flight 1\ncardflow_worker_batch_size_count 0\n"));
    }

    #[test]
    fn a_batch_that_began_and_ended_between_two_polls_shows_in_the_batch_count() {
        assert!(batch_began("cardflow_worker_batches_in_flight 0\ncardflow_worker_batch_size_count 1\n"));
    }

    #[tokio::test]
    async fn the_work_starts_at_the_last_poll_that_saw_it_not_begun() {
        let mut polls = Vec::new();
        let (start, _) = start_of_work(
            || {
                polls.push(Instant::now());
                let began = polls.len() == 3;
                async move { began }
            },
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert!(polls[0] < start && start <= polls[1], "{start:?} not within the second poll: {polls:?}");
    }

    #[tokio::test]
    async fn work_that_never_begins_is_an_error_not_a_figure() {
        assert!(start_of_work(|| async { false }, Duration::from_millis(50)).await.is_err());
    }

    fn env() -> Env {
        Env {
            database_url: "postgres://db/bench".into(),
            bus: BusConfig {
                brokers: "broker:9092".into(),
                topics: Topics::with_prefix("bench-x-"),
                partitions: 3,
                reply_partitions: 4,
                replication: 1,
                fetch_wait_ms: 5,
            },
            http_port: 8080,
            group: "bench-x-worker".into(),
            broker_per_phase: None,
            batches_in_flight: 3,
            max_batch: 500,
        }
    }

    #[test]
    fn the_roles_run_with_the_settings_the_bench_records() {
        let vars: BTreeMap<&str, String> = role_env(&env(), 9100).into_iter().collect();
        assert_eq!(vars["KAFKA_FETCH_WAIT_MS"], "5");
        assert_eq!(vars["WORKER_MAX_BATCH"], "500");
        assert_eq!(vars["WORKER_BATCHES_IN_FLIGHT"], "3");
        assert_eq!(vars["KAFKA_PARTITIONS"], "3");
        assert_eq!(vars["KAFKA_REPLY_PARTITIONS"], "4");
        assert_eq!(vars["KAFKA_TOPIC_PREFIX"], "bench-x-");
        assert_eq!(vars["METRICS_ADDR"], "127.0.0.1:9100");
    }

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    #[test]
    fn one_card_per_member_is_refused_since_a_transfer_needs_two() {
        assert!(Cli::try_parse_from(["bench", "--cards-per-member", "1"]).is_err());
        assert_eq!(Cli::try_parse_from(["bench", "--cards-per-member", "2"]).unwrap().bench.cards_per_member, 2);
    }

    #[test]
    fn a_second_broker_per_phase_replaces_the_first() {
        let cli = Cli::try_parse_from(["bench", "--broker-per-phase", "make's", "--broker-per-phase", "mine"]).unwrap();
        assert_eq!(cli.bench.broker_per_phase.as_deref(), Some("mine"));
    }
}
