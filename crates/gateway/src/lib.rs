//! The HTTP face of cardflow: `POST /api/v1/transfer/balance` and its status query.
//!
//! The gateway checks everything it can without the ledger (header and body
//! formats, authentication, decryption), answers a request it has seen from the
//! ledger, publishes a transfer command keyed by member (`userId`), records the
//! submission once Kafka acknowledged it, and waits for the result on its own
//! reply partition until a deadline; past it, the client gets `202` and a
//! `Location` to poll. It never decides a transfer and never writes money: that is
//! the worker's job, in one place, so there is one truth about every balance.

pub mod auth;
pub mod client;
pub mod crypto;
pub mod error;
pub mod openapi;
pub mod replies;
pub mod submissions;

use crate::auth::{parse_headers, Authenticator, Caller, CORRELATION_ID, CRYPTO_KEY_ID};
use crate::error::{body_json, ApiError};
use crate::replies::ReplyRouter;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use cardflow_bus::headers as h;
use cardflow_bus::rdkafka::producer::{FutureProducer, FutureRecord};
use cardflow_bus::rdkafka::util::Timeout;
use cardflow_bus::BusConfig;
use cardflow_domain::command::SCHEMA_VERSION;
use cardflow_domain::request::{is_status_token, status_token};
use cardflow_domain::{ReplyAddress, ResultCode, TransferCommand, TransferRequest, TransferResult};
use cardflow_ledger::transfers::{self, RequestKey, Submission};
use cardflow_telemetry::Metrics;
use sqlx::PgPool;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument;

pub const TRANSFER_PATH: &str = "/api/v1/transfer/balance";
/// The status query's parameter that names the body ([`status_token`]).
pub const STATUS_TOKEN_PARAM: &str = "request";

/// The gateway's settings (see the README's configuration table).
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub http_addr: SocketAddr,
    /// The partition of `transfer.results` this instance reads; unique per instance.
    pub reply_partition: i32,
    /// How long a synchronous request waits for its result before answering 202.
    pub reply_deadline: Duration,
    /// Allowed distance between `X-KM-Tran-Time` and the server clock.
    pub time_window_secs: i64,
    /// How long a looked-up key is trusted before it is read again.
    pub key_cache_ttl: Duration,
    pub max_body_bytes: usize,
    /// How long the producer of synchronous requests' commands waits to fill a batch.
    pub producer_linger_ms: u32,
    /// The same for commands of `Prefer: respond-async` requests, whose callers do
    /// not wait for the result: a longer wait makes fewer, larger produce batches.
    pub async_producer_linger_ms: u32,
    /// Requests per second each ASP may send; `None` is no limit.
    pub rate_limit_per_asp: Option<std::num::NonZeroU32>,
}

type AspLimiter = governor::DefaultKeyedRateLimiter<String>;

pub struct App {
    pub config: GatewayConfig,
    pub pool: PgPool,
    pub bus: BusConfig,
    /// Publishes the commands of requests that wait for their result.
    pub producer: FutureProducer,
    /// Publishes the commands of `respond-async` requests (see `async_producer_linger_ms`).
    pub async_producer: FutureProducer,
    pub replies: Arc<ReplyRouter>,
    pub submissions: submissions::SubmissionBook,
    pub auth: Authenticator,
    broker: cardflow_bus::BrokerProbe,
    limiter: Option<AspLimiter>,
}

/// Builds the gateway and starts its reply consumer.
pub async fn build(config: GatewayConfig, pool: PgPool, bus: BusConfig) -> Result<Arc<App>, cardflow_bus::BusError> {
    let producer = bus.producer(config.producer_linger_ms)?;
    let async_producer = bus.producer(config.async_producer_linger_ms)?;
    let broker = cardflow_bus::BrokerProbe::new(&bus)?;
    // A gateway reading a partition that does not exist would answer every
    // synchronous request 202 after the whole deadline, its replies parked by the
    // relay: refuse to start instead.
    broker.check_partition(&bus.topics.results, config.reply_partition).await?;
    let replies = Arc::new(ReplyRouter::default());
    tokio::spawn(replies::keep_reading_replies(bus.clone(), config.reply_partition, replies.clone()));
    let auth = Authenticator::new(pool.clone(), config.key_cache_ttl, config.time_window_secs);
    let limiter = config.rate_limit_per_asp.map(|rate| governor::RateLimiter::keyed(governor::Quota::per_second(rate)));
    let submissions = submissions::SubmissionBook::start(pool.clone());
    Ok(Arc::new(App { config, pool, bus, producer, async_producer, replies, submissions, auth, broker, limiter }))
}

pub fn router(app: Arc<App>) -> Router {
    let ready_app = app.clone();
    Router::new()
        .route(TRANSFER_PATH, post(post_transfer))
        .route(&format!("{TRANSFER_PATH}/{{correlation_id}}"), get(get_transfer))
        .route(openapi::PATH, get(openapi::serve))
        .with_state(app)
        .merge(cardflow_telemetry::router(move || {
            let app = ready_app.clone();
            async move {
                if !cardflow_ledger::ping(&app.pool).await {
                    return Err("database unreachable".to_string());
                }
                if !app.replies.is_ready() {
                    return Err("reply consumer not assigned".to_string());
                }
                if !app.broker.reachable().await {
                    return Err("broker unreachable".to_string());
                }
                Ok(())
            }
        }))
        // After every route: the 405 fallback covers only the routes registered so far.
        .fallback(no_such_endpoint)
        .method_not_allowed_fallback(method_not_allowed)
}

/// A path the gateway does not serve, or a method its path does not take, is
/// answered from the table like every other error, not with an empty body (axum
/// adds the `Allow` header to the 405).
async fn no_such_endpoint(headers: HeaderMap) -> Response {
    unrouted(ResultCode::NoSuchEndpoint, &headers)
}

async fn method_not_allowed(headers: HeaderMap) -> Response {
    unrouted(ResultCode::MethodNotAllowed, &headers)
}

fn unrouted(code: ResultCode, headers: &HeaderMap) -> Response {
    let answer = Answer::of_error(&ApiError::new(code));
    record("unrouted", &answer, Instant::now());
    answer.into_response(echo_correlation_id(headers).as_deref(), None)
}

/// Serves until `shutdown` resolves, then finishes the requests in flight.
pub async fn serve(
    app: Arc<App>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(app.config.http_addr).await?;
    tracing::info!(addr = %app.config.http_addr, "gateway listening");
    axum::serve(listener, router(app)).with_graceful_shutdown(shutdown).await
}

/// An answer on its way out: plain JSON, or encrypted with the caller's data key.
struct Answer {
    status: StatusCode,
    body: String,
    code: ResultCode,
    location: Option<String>,
    retry_after: Option<u64>,
}

impl Answer {
    fn of_error(e: &ApiError) -> Self {
        Answer {
            status: StatusCode::from_u16(e.code.http_status()).unwrap_or(StatusCode::BAD_REQUEST),
            body: body_json(e.code, &e.message(), None),
            code: e.code,
            location: None,
            retry_after: e.retry_after,
        }
    }

    fn of_result(r: &TransferResult) -> Self {
        let code = r.result_code();
        Answer {
            status: StatusCode::from_u16(code.http_status()).unwrap_or(StatusCode::BAD_REQUEST),
            body: body_json(code, &r.message, r.amount.map(|a| a.get())),
            code,
            location: None,
            retry_after: None,
        }
    }

    /// `202`, with the status query of the request as its `Location`: of the body
    /// the token names, when one does.
    fn pending(correlation_id: &str, token: Option<&str>) -> Self {
        let code = ResultCode::Pending;
        let location = match token {
            Some(t) => format!("{TRANSFER_PATH}/{correlation_id}?{STATUS_TOKEN_PARAM}={t}"),
            None => format!("{TRANSFER_PATH}/{correlation_id}"),
        };
        Answer {
            status: StatusCode::ACCEPTED,
            body: body_json(code, code.message(), None),
            code,
            location: Some(location),
            retry_after: Some(1),
        }
    }

    fn into_response(self, correlation_id: Option<&str>, caller: Option<&Caller>) -> Response {
        let mut headers = HeaderMap::new();
        headers.insert(axum::http::header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(c) = correlation_id.and_then(|c| HeaderValue::from_str(c).ok()) {
            headers.insert(CORRELATION_ID, c);
        }
        if let Some(l) = self.location.and_then(|l| HeaderValue::from_str(&l).ok()) {
            headers.insert(axum::http::header::LOCATION, l);
        }
        if let Some(secs) = self.retry_after {
            headers.insert(axum::http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        let body = match caller.and_then(|c| c.crypto.as_ref()) {
            Some((key_id, key)) => {
                headers.insert(CRYPTO_KEY_ID, HeaderValue::from_str(key_id.as_str()).expect("key ids are ASCII"));
                crypto::envelope(&crypto::encrypt(key, self.body.as_bytes()))
            }
            None => self.body,
        };
        (self.status, headers, body).into_response()
    }
}

fn record(route: &str, answer: &Answer, started: Instant) {
    let m = Metrics::global();
    m.http_requests.with_label_values(&[route, answer.status.as_str(), answer.code.code()]).inc();
    m.http_duration.with_label_values(&[route]).observe(started.elapsed().as_secs_f64());
}

/// The span of one HTTP request: the root of the transfer's trace, or a child of
/// the caller's `traceparent`. Every log line inside it carries its fields.
fn request_span(method: &str, route: &str, headers: &HeaderMap) -> tracing::Span {
    let span = tracing::info_span!(
        "http.request",
        otel.name = format!("{method} {route}"),
        otel.kind = "server",
        http.request.method = method,
        http.route = route,
        correlation_id = tracing::field::Empty,
        asp_id = tracing::field::Empty,
        transfer_id = tracing::field::Empty,
        code = tracing::field::Empty,
    );
    cardflow_telemetry::continue_trace(&span, incoming_traceparent(headers));
    span
}

fn incoming_traceparent(headers: &HeaderMap) -> Option<&str> {
    headers.get(h::TRACEPARENT).and_then(|v| v.to_str().ok()).filter(|tp| h::valid_traceparent(tp))
}

/// Names the authenticated caller on the request span.
fn name_caller(caller: &Caller) {
    let span = tracing::Span::current();
    span.record("correlation_id", caller.correlation_id.as_str());
    span.record("asp_id", caller.asp_id.as_str());
}

/// The correlation id to echo: the header as sent, when it is printable and short.
fn echo_correlation_id(headers: &HeaderMap) -> Option<String> {
    headers.get(CORRELATION_ID).and_then(|v| v.to_str().ok()).filter(|s| s.len() <= 64).map(str::to_string)
}

fn wants_async(headers: &HeaderMap) -> bool {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim().eq_ignore_ascii_case("respond-async"))
}

async fn read_body(body: Body, limit: usize) -> Result<axum::body::Bytes, ApiError> {
    axum::body::to_bytes(body, limit).await.map_err(|_| ApiError::new(ResultCode::PayloadTooLarge))
}

/// Whether a request carries a body to open. A status query signs an empty body
/// and has nothing to decrypt, but its answer is still encrypted for a caller
/// that names a data key.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RequestBody {
    Sealed,
    Empty,
}

/// Authenticates a request and opens its body.
async fn admit(
    app: &App,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    raw: &[u8],
    body: RequestBody,
) -> Result<(Caller, Vec<u8>), (ApiError, Option<Caller>)> {
    let parsed = parse_headers(headers).map_err(|e| (e, None))?;
    let caller = app.auth.authenticate(method.as_str(), uri.path(), &parsed, raw).await.map_err(|e| (e, None))?;
    let plain = match &caller.crypto {
        None => raw.to_vec(),
        Some(_) if body == RequestBody::Empty => Vec::new(),
        Some((_, key)) => match crypto::open_envelope(key, raw) {
            Ok(p) => p,
            Err(_) => {
                tracing::warn!(correlation_id = %caller.correlation_id, "body did not decrypt");
                Metrics::global().auth_failures.with_label_values(&[ResultCode::DecryptionFailed.code()]).inc();
                // The key is known and the caller authenticated: answer encrypted.
                return Err((ApiError::new(ResultCode::DecryptionFailed), Some(caller)));
            }
        },
    };
    Ok((caller, plain))
}

async fn post_transfer(
    State(app): State<Arc<App>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let echo = echo_correlation_id(&headers);
    let span = request_span("POST", TRANSFER_PATH, &headers);
    let (answer, caller) = match transfer(&app, &method, &uri, &headers, body, started).instrument(span.clone()).await {
        Ok((answer, caller)) => (answer, Some(caller)),
        Err((e, caller)) => (Answer::of_error(&e), caller),
    };
    span.record("code", answer.code.code());
    record("transfer", &answer, started);
    answer.into_response(echo.as_deref(), caller.as_ref())
}

async fn transfer(
    app: &App,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Body,
    started: Instant,
) -> Result<(Answer, Caller), (ApiError, Option<Caller>)> {
    let raw = read_body(body, app.config.max_body_bytes).await.map_err(|e| (e, None))?;
    let (caller, plain) = admit(app, method, uri, headers, &raw, RequestBody::Sealed).await?;
    name_caller(&caller);
    let fail = |e: ApiError| (e, Some(caller.clone()));
    within_rate(app, &caller).map_err(fail)?;
    let request = TransferRequest::from_json_bytes(&plain).map_err(|e| fail(e.into()))?;
    let fingerprint = request.fingerprint();
    let (asp, corr) = (caller.asp_id.as_str(), caller.correlation_id.as_str());

    let key =
        RequestKey { asp_id: asp.to_string(), correlation_id: corr.to_string(), fingerprint: fingerprint.clone() };
    let known = app.submissions.lookup(key.clone()).instrument(tracing::info_span!("lookup request")).await;
    match known.map_err(fail)? {
        Submission::Conflict => return Err(fail(ApiError::new(ResultCode::CorrelationIdReused))),
        Submission::Decided(stored) => {
            return Ok((
                Answer::of_result(&stored.result_for(caller.asp_id.clone(), caller.correlation_id.clone())),
                caller,
            ))
        }
        Submission::New | Submission::InFlight => {}
    }

    let publish_span = tracing::info_span!("transfer.commands publish", otel.kind = "producer");
    // Exported traces continue from the produce span; otherwise the context the
    // request arrived with travels on unchanged.
    let traceparent = cardflow_telemetry::traceparent_of(&publish_span)
        .unwrap_or_else(|| incoming_traceparent(headers).map(str::to_string).unwrap_or_else(h::new_traceparent));
    let command = TransferCommand {
        schema_version: SCHEMA_VERSION,
        asp_id: caller.asp_id.clone(),
        correlation_id: caller.correlation_id.clone(),
        request,
        fingerprint,
        reply_to: ReplyAddress { topic: app.bus.topics.results.clone(), partition: app.config.reply_partition },
        awaits_reply: !wants_async(headers),
        submitted_at: chrono::Utc::now(),
    };
    // Registered before publishing, so a fast reply cannot be missed.
    let reply = command.awaits_reply.then(|| app.replies.register(asp, corr, &command.fingerprint));
    if let Err(e) = publish(app, &command, &traceparent).instrument(publish_span).await {
        tracing::error!(error = %e, "publishing the command failed");
        return Err(fail(ApiError::unavailable()));
    }
    let published_at = Instant::now();
    if let Err(e) = app.submissions.record(key).instrument(tracing::info_span!("record submission")).await {
        // The command is on its way; only a status query before it is applied
        // would miss this row, and it answers 404 rather than lying.
        tracing::warn!(error = %e, "recording the submission failed");
    }
    // The `Location` of a `202` names this body, not only the id (see `status_token`).
    let pending = || Answer::pending(corr, Some(&status_token(&command.fingerprint)));
    let Some(reply) = reply else {
        return Ok((pending(), caller));
    };
    let remaining = app.config.reply_deadline.saturating_sub(started.elapsed());
    match tokio::time::timeout(remaining, reply).await {
        Ok(Ok(result)) => {
            Metrics::global().reply_wait.observe(published_at.elapsed().as_secs_f64());
            if let Some(id) = result.transfer_id {
                tracing::Span::current().record("transfer_id", tracing::field::display(id));
            }
            Ok((Answer::of_result(&result), caller))
        }
        _ => {
            Metrics::global().reply_fallbacks.inc();
            tracing::info!("deadline passed; answering 202");
            Ok((pending(), caller))
        }
    }
}

/// The per-ASP rate limit (a token bucket refilled at the configured rate).
fn within_rate(app: &App, caller: &Caller) -> Result<(), ApiError> {
    let Some(limiter) = &app.limiter else {
        return Ok(());
    };
    match limiter.check_key(&caller.asp_id.to_string()) {
        Ok(()) => Ok(()),
        Err(not_until) => {
            use governor::clock::{Clock, DefaultClock};
            let wait = not_until.wait_time_from(DefaultClock::default().now());
            tracing::info!(correlation_id = %caller.correlation_id, asp_id = %caller.asp_id, "rate limited");
            Err(ApiError {
                code: ResultCode::TooManyRequests,
                field: None,
                retry_after: Some(wait.as_secs_f64().ceil().max(1.0) as u64),
            })
        }
    }
}

async fn publish(app: &App, command: &TransferCommand, traceparent: &str) -> Result<(), String> {
    let payload = serde_json::to_vec(command).map_err(|e| e.to_string())?;
    let key = command.key();
    let partition = command.reply_to.partition.to_string();
    let headers = h::build([
        (h::TRACEPARENT, traceparent),
        (h::CONTENT_TYPE, "application/json"),
        (h::SCHEMA_VERSION, "1"),
        (h::CORRELATION_ID, command.correlation_id.as_str()),
        (h::REPLY_TOPIC, command.reply_to.topic.as_str()),
        (h::REPLY_PARTITION, partition.as_str()),
    ]);
    let record = FutureRecord::to(&app.bus.topics.commands).key(&key).payload(&payload).headers(headers);
    // Per card, order across the two producers does not matter: two requests
    // in flight at once have no order to keep.
    let producer = if command.awaits_reply { &app.producer } else { &app.async_producer };
    producer.send(record, Timeout::After(Duration::from_secs(5))).await.map_err(|(e, _)| e.to_string())?;
    Metrics::global().commands_published.inc();
    Ok(())
}

async fn get_transfer(
    State(app): State<Arc<App>>,
    // A segment that does not percent-decode to text is answered like any other
    // invalid correlation id (JSON, the result-code table), not with axum's
    // plain-text rejection.
    target: Result<Path<String>, axum::extract::rejection::PathRejection>,
    query: Result<Query<StatusQuery>, axum::extract::rejection::QueryRejection>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let echo = echo_correlation_id(&headers);
    let span = request_span("GET", "/api/v1/transfer/balance/{correlationId}", &headers);
    let target = target.map(|Path(t)| t).unwrap_or_default();
    // A query that does not parse (the parameter given twice) is answered like a
    // malformed token, after authentication.
    let token = query.map(|Query(q)| q.request).map_err(|_| ());
    let (answer, caller) =
        match status(&app, &target, token, &method, &uri, &headers, body).instrument(span.clone()).await {
            Ok((answer, caller)) => (answer, Some(caller)),
            Err((e, caller)) => (Answer::of_error(&e), caller),
        };
    span.record("code", answer.code.code());
    record("transfer_status", &answer, started);
    answer.into_response(echo.as_deref(), caller.as_ref())
}

/// The status query's parameters; others are ignored.
#[derive(serde::Deserialize)]
struct StatusQuery {
    request: Option<String>,
}

async fn status(
    app: &App,
    target: &str,
    token: Result<Option<String>, ()>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Body,
) -> Result<(Answer, Caller), (ApiError, Option<Caller>)> {
    let raw = read_body(body, app.config.max_body_bytes).await.map_err(|e| (e, None))?;
    let (caller, _) = admit(app, method, uri, headers, &raw, RequestBody::Empty).await?;
    name_caller(&caller);
    let fail = |e: ApiError| (e, Some(caller.clone()));
    within_rate(app, &caller).map_err(fail)?;
    let target = cardflow_domain::CorrelationId::parse(target).map_err(|_| fail(ApiError::invalid("correlationId")))?;
    let token = match token {
        Ok(t) if t.as_deref().is_none_or(is_status_token) => t,
        _ => return Err(fail(ApiError::invalid(STATUS_TOKEN_PARAM))),
    };
    // An ASP sees only its own requests: the key includes the caller's AspId.
    match transfers::status(&app.pool, caller.asp_id.as_str(), target.as_str()).await.map_err(|e| fail(e.into()))? {
        // The id was decided for another body than the one the token names.
        Some(Submission::Decided(stored))
            if token.as_ref().is_some_and(|t| *t != status_token(&stored.fingerprint)) =>
        {
            Err(fail(ApiError::new(ResultCode::CorrelationIdReused)))
        }
        Some(Submission::Decided(stored)) => {
            let result = stored.result_for(caller.asp_id.clone(), target);
            Ok((Answer::of_result(&result), caller))
        }
        Some(_) => Ok((Answer::pending(target.as_str(), token.as_deref()), caller)),
        None => Err(fail(ApiError::new(ResultCode::NotFound))),
    }
}
