//! Shared test helpers: the real stack (Postgres and a Kafka-protocol broker, from
//! `DATABASE_URL` and `KAFKA_BROKERS`, which `make test` provides), a fresh
//! database and topic prefix per system, and the real `cardflow` binary spawned as
//! child processes. One shared system serves every test of this binary; tests that
//! need to stop or restart roles spawn systems of their own.
//!
//! Children read a pipe on standard input and exit when it closes, so nothing
//! outlives the test binary.

use cardflow_bus::rdkafka::consumer::{Consumer, StreamConsumer};
use cardflow_bus::rdkafka::message::Message;
use cardflow_bus::rdkafka::producer::{FutureProducer, FutureRecord};
use cardflow_bus::rdkafka::util::Timeout;
use cardflow_bus::rdkafka::{Offset, TopicPartitionList};
use cardflow_bus::{BusConfig, Topics};
use cardflow_gateway::client::{self, Credentials, SignOptions, SignedRequest};
use cardflow_ledger::Fixture;
use rust_decimal::Decimal;
use serde_json::{json, Value};
use sqlx::PgPool;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub const ASP_ID: &str = "E2EASP000000001";
pub const ACCESS_KEY: &str = "E2EACCESSKEY0000000000000000000000000001";
pub const SIGNING_SECRET: &str = "e2e-signing-secret";
pub const CRYPTO_KEY_ID: &str = "E2ECRYPTOKEY00000000000000000001";
pub const CRYPTO_KEY: [u8; 32] = [42u8; 32];
/// A second ASP of the same affiliate that requires encrypted bodies.
pub const ASP_ID_2: &str = "E2EASP000000002";
pub const ACCESS_KEY_2: &str = "E2EACCESSKEY0000000000000000000000000002";
/// A third ASP of the same affiliate, plain bodies, for "an ASP sees only its own requests".
pub const ASP_ID_3: &str = "E2EASP000000003";
pub const ACCESS_KEY_3: &str = "E2EACCESSKEY0000000000000000000000000003";
pub const DISABLED_KEY: &str = "E2EACCESSKEY00000000000000000000DISABLED";
pub const EXPIRED_KEY: &str = "E2EACCESSKEY000000000000000000000EXPIRED";
pub const AFFILIATE: &str = "AFE2E0000001";
pub const OTHER_AFFILIATE: &str = "AFE2E0000002";
/// A product owner that is not an affiliate on record.
pub const MISSING_AFFILIATE: &str = "AFE2E0000404";

fn env(name: &str) -> String {
    std::env::var(name)
        .unwrap_or_else(|_| panic!("{name} is not set: run the tests through `make test`, which starts the stack"))
}

pub fn credentials() -> Credentials {
    Credentials {
        asp_id: ASP_ID.into(),
        access_key: ACCESS_KEY.into(),
        signing_secret: SIGNING_SECRET.into(),
        crypto_key: Some((CRYPTO_KEY_ID.into(), CRYPTO_KEY)),
    }
}

/// Reference data every system gets: affiliates, the test ASP with its keys, and
/// the products the rules need.
fn base_fixture() -> Value {
    json!({
        "affiliates": [
            {"affiliateId": AFFILIATE, "name": "E2E Affiliate"},
            {"affiliateId": OTHER_AFFILIATE, "name": "Other"}
        ],
        "asps": [{
            "aspId": ASP_ID, "affiliateId": AFFILIATE,
            "accessKeys": [
                {"accessKey": ACCESS_KEY, "signingSecret": SIGNING_SECRET},
                {"accessKey": DISABLED_KEY, "signingSecret": SIGNING_SECRET, "status": "DISABLED"},
                {"accessKey": EXPIRED_KEY, "signingSecret": SIGNING_SECRET, "expiresAt": "2020-01-01T00:00:00Z"}
            ],
            "cryptoKeys": [{"keyId": CRYPTO_KEY_ID, "key": base64_key(&CRYPTO_KEY)}]
        }, {
            "aspId": ASP_ID_2, "affiliateId": AFFILIATE, "requireEncryption": true,
            "accessKeys": [{"accessKey": ACCESS_KEY_2, "signingSecret": SIGNING_SECRET}]
        }, {
            "aspId": ASP_ID_3, "affiliateId": AFFILIATE,
            "accessKeys": [{"accessKey": ACCESS_KEY_3, "signingSecret": SIGNING_SECRET}]
        }],
        "products": [
            {"productId": "PREPAID", "ownerAffiliateId": AFFILIATE, "kind": "PREPAID", "collectionAllowed": true, "maxBalance": 1000000, "minUsageRate": null},
            {"productId": "GIFT-60", "ownerAffiliateId": AFFILIATE, "kind": "GIFT", "collectionAllowed": true, "maxBalance": 1000000, "minUsageRate": "0.6"},
            {"productId": "NO-COLLECT", "ownerAffiliateId": AFFILIATE, "kind": "PREPAID", "collectionAllowed": false, "maxBalance": 1000000, "minUsageRate": null},
            {"productId": "OTHER-OWNER", "ownerAffiliateId": OTHER_AFFILIATE, "kind": "PREPAID", "collectionAllowed": true, "maxBalance": 1000000, "minUsageRate": null},
            {"productId": "NO-OWNER", "ownerAffiliateId": MISSING_AFFILIATE, "kind": "PREPAID", "collectionAllowed": true, "maxBalance": 1000000, "minUsageRate": null}
        ]
    })
}

pub fn base64_key(k: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(k)
}

/// Runs async setup from inside a test's runtime, on a runtime of its own.
pub fn block_on<F: std::future::Future + Send + 'static>(f: F) -> F::Output
where
    F::Output: Send,
{
    std::thread::spawn(move || tokio::runtime::Runtime::new().unwrap().block_on(f)).join().expect("setup thread")
}

/// Which roles to start, and how.
#[derive(Debug, Clone)]
pub struct Roles {
    pub gateway: bool,
    pub workers: usize,
    pub relay: bool,
    pub reply_deadline_ms: u64,
    /// Extra environment for the gateway, e.g. a short key cache.
    pub gateway_env: Vec<(&'static str, String)>,
    /// Extra environment for every role, e.g. where to export traces.
    pub env: Vec<(&'static str, String)>,
}

impl Default for Roles {
    fn default() -> Self {
        Roles {
            gateway: true,
            workers: 1,
            relay: true,
            reply_deadline_ms: 10_000,
            gateway_env: Vec::new(),
            env: Vec::new(),
        }
    }
}

pub struct Process {
    /// Where a worker or relay serves `/metrics`.
    pub metrics_port: u16,
    pub child: Child,
    stdin: Option<ChildStdin>,
}

/// A running cardflow: its own database, topic prefix and processes.
pub struct System {
    pub database_url: String,
    pub bus: BusConfig,
    pub http_port: u16,
    pub processes: Mutex<Vec<(String, Process)>>,
    /// Replaced when processes are killed, so no pooled connection to a dead
    /// gateway is reused.
    client: Mutex<reqwest::Client>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl System {
    /// A new database and topic prefix, migrated and seeded, with `roles` running.
    pub fn start(roles: Roles) -> System {
        System::start_on(roles, &env("KAFKA_BROKERS"))
    }

    /// As `start`, on the broker at `brokers` (e.g. a [`PrivateBroker`]).
    pub fn start_on(roles: Roles, brokers: &str) -> System {
        let tag = format!("{}_{:08x}", std::process::id(), rand::random::<u32>());
        let admin_url = env("DATABASE_URL");
        let db_name = format!("cardflow_e2e_{tag}");
        let database_url = replace_db(&admin_url, &db_name);
        let bus = BusConfig {
            brokers: brokers.to_string(),
            topics: Topics::with_prefix(&format!("e2e-{tag}-")),
            partitions: 4,
            reply_partitions: 4,
            replication: 1,
            fetch_wait_ms: cardflow_bus::DEFAULT_FETCH_WAIT_MS,
        };
        {
            let (admin_url, database_url, bus) = (admin_url.clone(), database_url.clone(), bus.clone());
            block_on(async move {
                let admin = cardflow_ledger::connect(&admin_url, 1).await.expect("admin connection");
                sqlx::query(&format!("CREATE DATABASE \"{db_name}\"")).execute(&admin).await.expect("create database");
                let pool = cardflow_ledger::connect(&database_url, 2).await.unwrap();
                cardflow_ledger::migrate(&pool).await.unwrap();
                Fixture::from_json(&base_fixture().to_string()).unwrap().load(&pool).await.unwrap();
                bus.ensure_topics().await.expect("topics");
            });
        }
        let system = System {
            database_url,
            bus,
            http_port: free_port(),
            processes: Mutex::new(Vec::new()),
            client: Mutex::new(new_client()),
        };
        system.start_roles(&roles);
        system
    }

    pub fn start_roles(&self, roles: &Roles) {
        if roles.gateway {
            let mut env = vec![("REPLY_DEADLINE_MS", roles.reply_deadline_ms.to_string())];
            env.extend(roles.gateway_env.iter().cloned());
            env.extend(roles.env.iter().cloned());
            self.spawn("gateway", &env);
        }
        for _ in 0..roles.workers {
            self.spawn("worker", &roles.env);
        }
        if roles.relay {
            self.spawn("relay", &roles.env);
        }
        if roles.gateway {
            self.wait_ready();
        }
    }

    /// Spawns one role of the real binary.
    pub fn spawn(&self, role: &str, extra: &[(&str, String)]) {
        let metrics_port = free_port();
        let mut cmd = self.command(role, metrics_port, extra);
        let mut child = cmd.spawn().expect("spawning cardflow");
        let stdin = child.stdin.take().unwrap();
        self.processes.lock().unwrap().push((role.to_string(), Process { metrics_port, child, stdin: Some(stdin) }));
    }

    /// Runs one role that is expected to refuse to start: its exit status and
    /// standard error, or `None` if it was still running after `within` (and was
    /// then killed).
    pub fn run_to_exit(&self, role: &str, extra: &[(&str, String)], within: Duration) -> Option<(i32, String)> {
        let mut cmd = self.command(role, free_port(), extra);
        cmd.stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawning cardflow");
        let _stdin = child.stdin.take();
        let deadline = Instant::now() + within;
        while child.try_wait().expect("waiting for cardflow").is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output().expect("cardflow's output");
        Some((out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned()))
    }

    fn command(&self, role: &str, metrics_port: u16, extra: &[(&str, String)]) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cardflow"));
        cmd.arg(role)
            .env("DATABASE_URL", &self.database_url)
            .env("KAFKA_BROKERS", &self.bus.brokers)
            .env("KAFKA_TOPIC_PREFIX", self.bus.topics.commands.trim_end_matches("transfer.commands"))
            .env("KAFKA_PARTITIONS", self.bus.partitions.to_string())
            .env("KAFKA_REPLY_PARTITIONS", self.bus.reply_partitions.to_string())
            .env("HTTP_ADDR", format!("127.0.0.1:{}", self.http_port))
            .env("METRICS_ADDR", format!("127.0.0.1:{metrics_port}"))
            .env("WORKER_GROUP_ID", format!("{}worker", self.bus.topics.commands.trim_end_matches("transfer.commands")))
            .env("CARDFLOW_EXIT_ON_STDIN_EOF", "1")
            .env("RUST_LOG", std::env::var("E2E_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (k, v) in extra {
            cmd.env(k, v);
        }
        cmd
    }

    /// Stops every process of a role (all roles with `None`): closes their standard
    /// input, which makes them shut down cleanly, and kills what is still running
    /// after ten seconds.
    pub fn stop(&self, role: Option<&str>) {
        let gone = self.take(role);
        for (_, mut p) in gone {
            drop(p.stdin.take());
            let deadline = Instant::now() + Duration::from_secs(10);
            while p.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }

    fn take(&self, role: Option<&str>) -> Vec<(String, Process)> {
        let mut procs = self.processes.lock().unwrap();
        let (gone, kept): (Vec<_>, Vec<_>) = procs.drain(..).partition(|(r, _)| role.is_none_or(|x| x == r));
        *procs = kept;
        *self.client.lock().unwrap() = new_client();
        gone
    }

    pub fn wait_ready(&self) {
        wait_ready_at(self.http_port);
    }

    /// Starts another gateway reading reply partition `partition` on a port of its
    /// own; returns the port.
    pub fn spawn_gateway(&self, partition: i32) -> u16 {
        let port = free_port();
        self.spawn(
            "gateway",
            &[("HTTP_ADDR", format!("127.0.0.1:{port}")), ("GATEWAY_REPLY_PARTITION", partition.to_string())],
        );
        wait_ready_at(port);
        port
    }

    /// Sends to the gateway on `port`.
    pub async fn send_to(&self, port: u16, req: &SignedRequest, extra_headers: &[(&str, &str)]) -> Reply {
        let client = self.client.lock().unwrap().clone();
        let url = format!("http://127.0.0.1:{port}{}", req.path);
        let mut b = client.request(req.method.parse().unwrap(), url);
        for (k, v) in &req.headers {
            b = b.header(k, v);
        }
        for (k, v) in extra_headers {
            b = b.header(*k, *v);
        }
        if !req.body.is_empty() {
            b = b.header("content-type", "application/json").body(req.body.clone());
        }
        Reply::read(b.send().await.expect("HTTP request")).await
    }

    /// `metrics`, or `None` while the role is not listening yet.
    pub async fn try_metrics(&self, role: &str) -> Option<String> {
        let port = self.processes.lock().unwrap().iter().find(|(r, _)| r == role).map(|(_, p)| p.metrics_port)?;
        let client = self.client.lock().unwrap().clone();
        client.get(format!("http://127.0.0.1:{port}/metrics")).send().await.ok()?.text().await.ok()
    }

    /// The `/metrics` text of the first process of a role (the gateway serves it on
    /// its HTTP port).
    pub async fn metrics(&self, role: &str) -> String {
        let port = if role == "gateway" {
            self.http_port
        } else {
            self.processes.lock().unwrap().iter().find(|(r, _)| r == role).map(|(_, p)| p.metrics_port).unwrap()
        };
        let client = self.client.lock().unwrap().clone();
        client.get(format!("http://127.0.0.1:{port}/metrics")).send().await.unwrap().text().await.unwrap()
    }

    /// Kills every process of a role at once, as a crash would.
    pub fn kill(&self, role: Option<&str>) {
        for (_, mut p) in self.take(role) {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
    }
}

/// A Tansu broker of one test's own, which the test can pause (`SIGSTOP`) to stand
/// for an outage: the broker stops answering but keeps its connections, as a hung
/// or partitioned broker does, and the shared broker is left alone.
pub struct PrivateBroker {
    child: Child,
    pub brokers: String,
}

impl PrivateBroker {
    pub fn start() -> PrivateBroker {
        let bin = std::env::var("TANSU_BIN").expect(
            "TANSU_BIN: the outage tests start a Tansu of their own; `scripts/stack.sh up` installs it and \
             writes TANSU_BIN to .stack/env",
        );
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(bin)
            .args(["broker", "--storage-engine", "memory://tansu/", "--listener-url", &url])
            .args(["--advertised-listener-url", &url])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting tansu");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "the private tansu did not listen on {port}");
            std::thread::sleep(Duration::from_millis(100));
        }
        PrivateBroker { child, brokers: format!("127.0.0.1:{port}") }
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill").args([signal, &self.child.id().to_string()]).status().expect("kill");
        assert!(status.success(), "kill {signal} tansu");
    }

    /// The broker stops answering (its process is stopped).
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_ready_at(port: u16) {
    {
        let url = format!("http://127.0.0.1:{port}/readyz");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(resp) = blocking_get(&url) {
                if resp == 200 {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "gateway did not become ready");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl System {
    pub async fn pool(&self) -> PgPool {
        cardflow_ledger::connect(&self.database_url, 4).await.unwrap()
    }

    /// Signs and sends a request; returns status, headers and the body as JSON
    /// (decrypted when the response is encrypted).
    pub async fn send(&self, req: &SignedRequest, extra_headers: &[(&str, &str)]) -> Reply {
        self.send_to(self.http_port, req, extra_headers).await
    }

    /// POSTs a transfer body, signed with the test ASP's credentials.
    pub async fn transfer(&self, body: &Value) -> Reply {
        self.send(&sign_post(body, None, false), &[]).await
    }

    /// GETs the status of a transfer.
    pub async fn status(&self, correlation_id: &str) -> Reply {
        self.get(&format!("/api/v1/transfer/balance/{correlation_id}")).await
    }

    /// A signed `GET` of `path`, which may carry a query (a `202`'s `Location`).
    pub async fn get(&self, path: &str) -> Reply {
        self.send(&sign_with(&credentials(), "GET", path, b"", None, false), &[]).await
    }
}

/// The `Location` a `202` gives for `body` sent under `correlation_id`.
pub fn location_of(correlation_id: &str, body: &Value) -> String {
    let fingerprint = cardflow_domain::TransferRequest::from_json(body).unwrap().fingerprint();
    let token = cardflow_domain::request::status_token(&fingerprint);
    format!("/api/v1/transfer/balance/{correlation_id}?request={token}")
}

fn new_client() -> reqwest::Client {
    // No pooled connections: tests run on runtimes of their own, and a connection
    // made on one dies with it.
    reqwest::Client::builder().timeout(Duration::from_secs(30)).pool_max_idle_per_host(0).build().unwrap()
}

/// A tiny blocking GET for readiness polling outside any runtime; the status code.
fn blocking_get(url: &str) -> std::io::Result<u16> {
    use std::io::{Read, Write};
    let rest = url.trim_start_matches("http://");
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut s = std::net::TcpStream::connect(host)?;
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    write!(s, "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    Ok(buf.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0))
}

pub fn replace_db(url: &str, db: &str) -> String {
    let (base, query) = url.split_once('?').map(|(b, q)| (b, Some(q))).unwrap_or((url, None));
    let cut = base.rfind('/').expect("a database URL has a path");
    let mut out = format!("{}/{db}", &base[..cut]);
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub raw: String,
    pub json: Value,
}

impl Reply {
    async fn read(resp: reqwest::Response) -> Reply {
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let raw = resp.text().await.unwrap();
        let mut json: Value = serde_json::from_str(&raw).unwrap_or(Value::Null);
        if headers.contains_key("x-km-crypto-key-id") {
            let plain =
                cardflow_gateway::crypto::open_envelope(&CRYPTO_KEY, raw.as_bytes()).expect("response decrypts");
            json = serde_json::from_slice(&plain).unwrap();
        }
        Reply { status, headers, raw, json }
    }

    pub fn code(&self) -> &str {
        self.json["code"].as_str().unwrap_or("")
    }

    pub fn message(&self) -> &str {
        self.json["message"].as_str().unwrap_or("")
    }

    pub fn amount(&self) -> Option<Decimal> {
        self.json.get("amount").and_then(|a| a.as_number()).map(|n| n.to_string().parse().unwrap())
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

pub fn sign_with(
    creds: &Credentials,
    method: &str,
    path: &str,
    body: &[u8],
    correlation_id: Option<String>,
    encrypt: bool,
) -> SignedRequest {
    client::sign(
        creds,
        SignOptions {
            method,
            path,
            body,
            encrypt,
            correlation_id,
            time_zone: cardflow_domain::ClientTimeZone::parse("KST").unwrap(),
            now: chrono::Utc::now(),
        },
    )
}

pub fn sign_post(body: &Value, correlation_id: Option<String>, encrypt: bool) -> SignedRequest {
    sign_with(&credentials(), "POST", "/api/v1/transfer/balance", body.to_string().as_bytes(), correlation_id, encrypt)
}

/// A correlation id nobody has used.
pub fn fresh_correlation_id() -> String {
    client::fresh_correlation_id(chrono::Utc::now(), cardflow_domain::ClientTimeZone::parse("KST").unwrap())
}

/// Card numbers and user ids unique to this process, so tests sharing a system
/// never touch each other's cards.
pub fn unique() -> u64 {
    static NEXT: OnceLock<AtomicU64> = OnceLock::new();
    NEXT.get_or_init(|| AtomicU64::new((rand::random::<u64>() % 1_000_000) * 1_000_000)).fetch_add(1, Ordering::Relaxed)
}

/// A card to seed.
#[derive(Debug, Clone)]
pub struct CardSpec {
    pub product: &'static str,
    pub status: &'static str,
    pub balance: i64,
    pub total_loaded: Option<i64>,
    pub expires_on: &'static str,
    pub max_balance: Option<i64>,
}

impl CardSpec {
    pub fn prepaid(balance: i64) -> Self {
        CardSpec {
            product: "PREPAID",
            status: "ACTIVE",
            balance,
            total_loaded: None,
            expires_on: "2099-12-31",
            max_balance: None,
        }
    }
}

/// A member with cards, seeded into a system.
#[derive(Debug, Clone)]
pub struct Member {
    pub user_id: u64,
    pub cards: Vec<String>,
}

impl Member {
    pub fn card(&self, i: usize) -> &str {
        &self.cards[i]
    }

    pub fn body(&self, from: usize, to: usize, amount: Option<i64>) -> Value {
        // `None` is a null amount, the whole balance: the key itself is required.
        json!({"userId": self.user_id, "fromCardNo": self.cards[from], "toCardNo": self.cards[to], "amount": amount})
    }
}

pub async fn seed_member(pool: &PgPool, cards: &[CardSpec]) -> Member {
    let user_id = 1_000_000_000 + unique();
    seed_member_with_id(pool, user_id, cards).await
}

pub async fn seed_member_with_id(pool: &PgPool, user_id: u64, cards: &[CardSpec]) -> Member {
    let cards_json: Vec<Value> = cards
        .iter()
        .map(|c| {
            let no = format!("{:016}", 5_000_000_000_000_000u64 + unique());
            json!({
                "cardNo": no, "userId": user_id, "productId": c.product, "status": c.status,
                "balance": c.balance, "totalLoaded": c.total_loaded.unwrap_or(c.balance),
                "expiresOn": c.expires_on, "maxBalance": c.max_balance
            })
        })
        .collect();
    let fixture = json!({"members": [{"userId": user_id, "affiliateId": AFFILIATE}], "cards": cards_json});
    Fixture::from_json(&fixture.to_string()).unwrap().load(pool).await.unwrap();
    Member { user_id, cards: cards_json.iter().map(|c| c["cardNo"].as_str().unwrap().to_string()).collect() }
}

pub async fn balance(pool: &PgPool, card: &str) -> Decimal {
    sqlx::query_scalar("SELECT balance FROM cards WHERE card_no = $1").bind(card).fetch_one(pool).await.unwrap()
}

/// (side, amount, balance_after, sequence) of a card's entries, in sequence order.
pub async fn entries(pool: &PgPool, card: &str) -> Vec<(String, Decimal, Decimal, i64)> {
    sqlx::query_as(
        "SELECT side, amount, balance_after, sequence FROM ledger_entries WHERE card_no = $1 ORDER BY sequence",
    )
    .bind(card)
    .fetch_all(pool)
    .await
    .unwrap()
}

pub fn dec(v: i64) -> Decimal {
    Decimal::from(v)
}

/// A message as read by the tests: key, JSON payload, headers.
pub type TopicMessage = (String, Value, Vec<(String, String)>);

/// Reads a topic from the start (all partitions) until `done` says enough or the
/// timeout passes; returns (key, payload, headers) of every message read.
pub async fn read_topic(
    bus: &BusConfig,
    topic: &str,
    partitions: i32,
    timeout: Duration,
    done: impl FnMut(&[TopicMessage]) -> bool,
) -> Vec<TopicMessage> {
    read_partitions(bus, topic, &(0..partitions).collect::<Vec<_>>(), timeout, done).await
}

/// Like `read_topic`, for the named partitions only.
pub async fn read_partitions(
    bus: &BusConfig,
    topic: &str,
    partitions: &[i32],
    timeout: Duration,
    mut done: impl FnMut(&[TopicMessage]) -> bool,
) -> Vec<TopicMessage> {
    let consumer: StreamConsumer = bus.assigned_consumer().unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        tpl.add_partition_offset(topic, *p, Offset::Beginning).unwrap();
    }
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while !done(&out) {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(Ok(m)) => {
                use cardflow_bus::rdkafka::message::Headers;
                let key = m.key().map(|k| String::from_utf8_lossy(k).to_string()).unwrap_or_default();
                let value: Value = m.payload().and_then(|p| serde_json::from_slice(p).ok()).unwrap_or(Value::Null);
                let headers = m
                    .headers()
                    .map(|hs| {
                        hs.iter()
                            .map(|x| {
                                (
                                    x.key.to_string(),
                                    x.value.map(|v| String::from_utf8_lossy(v).to_string()).unwrap_or_default(),
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                out.push((key, value, headers));
            }
            Ok(Err(e)) => panic!("consumer error: {e}"),
            Err(_) => break,
        }
    }
    out
}

/// Publishes raw bytes to a topic, as a client bypassing the gateway would.
pub async fn produce(bus: &BusConfig, topic: &str, key: &str, payload: &[u8], partition: Option<i32>) {
    let producer: FutureProducer = bus.producer(0).unwrap();
    let mut record = FutureRecord::to(topic).key(key).payload(payload);
    if let Some(p) = partition {
        record = record.partition(p);
    }
    producer.send(record, Timeout::After(Duration::from_secs(10))).await.map_err(|(e, _)| e).unwrap();
}

/// Polls until `f` returns `Some`, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The system every test of this binary shares.
pub fn shared() -> &'static System {
    static SYSTEM: OnceLock<System> = OnceLock::new();
    SYSTEM.get_or_init(|| System::start(Roles::default()))
}

/// The value of the first sample in a `/metrics` text whose name and labels start
/// with `prefix`.
pub fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find(|l| l.starts_with(prefix))?.rsplit(' ').next()?.parse().ok()
}

/// The `dlq-reason` of the dead letter keyed `key`, waiting for it to arrive.
pub async fn dead_letter_reason(sys: &System, key: &str) -> String {
    let dead = read_topic(&sys.bus, &sys.bus.topics.dlq, 1, Duration::from_secs(20), |seen| {
        seen.iter().any(|(k, _, _)| k == key)
    })
    .await;
    let (_, _, headers) = dead.iter().find(|(k, _, _)| k == key).expect("the command is dead-lettered");
    headers.iter().find(|(k, _)| k == "dlq-reason").map(|(_, v)| v.clone()).unwrap_or_default()
}
