//! Who is calling, and may they? Header formats, access keys, the transaction
//! token, the time window and the data key of an encrypted body.
//!
//! Failures say no more than their code's message: which part of a token or which
//! key was wrong is logged (with the correlation id), never answered.

use crate::crypto::TokenInput;
use crate::error::ApiError;
use axum::http::HeaderMap;
use cardflow_domain::{AccessKey, AspId, ClientTimeZone, CorrelationId, CryptoKeyId, ResultCode, TranToken};
use cardflow_ledger::{credentials, AccessKeyRecord, CryptoKeyRecord};
use chrono::{NaiveDateTime, TimeZone, Utc};
use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub const ASP_ID: &str = "X-KM-User-AspId";
pub const CORRELATION_ID: &str = "X-KM-Correlation-Id";
pub const ACCESS_KEY: &str = "X-KM-Access-Key";
pub const CRYPTO_KEY_ID: &str = "X-KM-Crypto-Key-Id";
pub const TRAN_TOKEN: &str = "X-KM-Tran-Token";
pub const TRAN_TIME: &str = "X-KM-Tran-Time";
pub const TIME_ZONE: &str = "X-KM-Time-Zone";

/// The spec's request headers, each parsed to its type.
#[derive(Debug, Clone)]
pub struct RequestHeaders {
    pub asp_id: AspId,
    pub correlation_id: CorrelationId,
    pub access_key: AccessKey,
    pub crypto_key_id: Option<CryptoKeyId>,
    pub tran_token: TranToken,
    pub tran_time: NaiveDateTime,
    pub tran_time_text: String,
    pub time_zone: ClientTimeZone,
}

/// A header sent twice is an invalid value, as a body field given twice is: a proxy,
/// a log or the signer may read the other copy, and what is signed, checked and
/// echoed must be one value.
fn header<'a>(h: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    let mut values = h.get_all(name).iter();
    let (first, second) = (values.next(), values.next());
    if second.is_some() {
        return Err(ApiError::invalid(name));
    }
    match first {
        None => Ok(None),
        Some(v) => match v.to_str() {
            Ok("") => Ok(None),
            Ok(s) => Ok(Some(s)),
            Err(_) => Err(ApiError::invalid(name)),
        },
    }
}

fn required<'a>(h: &'a HeaderMap, name: &str) -> Result<&'a str, ApiError> {
    header(h, name)?.ok_or_else(|| ApiError::missing(name))
}

/// `YYYYMMDDHH24MISS`: 14 digits, a real date and time.
pub fn parse_tran_time(s: &str) -> Option<NaiveDateTime> {
    if s.len() != 14 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    cardflow_domain::parse_wall_clock(s, "%Y%m%d%H%M%S")
}

/// Parses the headers in the spec's order; the first missing or malformed one is
/// the one named.
pub fn parse_headers(h: &HeaderMap) -> Result<RequestHeaders, ApiError> {
    let asp_id = AspId::parse(required(h, ASP_ID)?).map_err(|_| ApiError::invalid(ASP_ID))?;
    let correlation_id =
        CorrelationId::parse(required(h, CORRELATION_ID)?).map_err(|_| ApiError::invalid(CORRELATION_ID))?;
    let access_key = AccessKey::parse(required(h, ACCESS_KEY)?).map_err(|_| ApiError::invalid(ACCESS_KEY))?;
    let crypto_key_id = header(h, CRYPTO_KEY_ID)?
        .map(|s| CryptoKeyId::parse(s).map_err(|_| ApiError::invalid(CRYPTO_KEY_ID)))
        .transpose()?;
    let tran_token = TranToken::parse(required(h, TRAN_TOKEN)?).map_err(|_| ApiError::invalid(TRAN_TOKEN))?;
    let tran_time_text = required(h, TRAN_TIME)?.to_string();
    let tran_time = parse_tran_time(&tran_time_text).ok_or_else(|| ApiError::invalid(TRAN_TIME))?;
    let time_zone = ClientTimeZone::parse(required(h, TIME_ZONE)?).ok_or_else(|| ApiError::invalid(TIME_ZONE))?;
    Ok(RequestHeaders {
        asp_id,
        correlation_id,
        access_key,
        crypto_key_id,
        tran_token,
        tran_time,
        tran_time_text,
        time_zone,
    })
}

/// An authenticated caller.
#[derive(Clone)]
pub struct Caller {
    pub asp_id: AspId,
    pub correlation_id: CorrelationId,
    /// The data key when the request is encrypted; the response is encrypted too.
    pub crypto: Option<(CryptoKeyId, [u8; 32])>,
}

/// Without the data key: a caller that reaches a log must not carry it.
impl std::fmt::Debug for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Caller")
            .field("asp_id", &self.asp_id)
            .field("correlation_id", &self.correlation_id)
            .field("crypto_key_id", &self.crypto.as_ref().map(|(id, _)| id))
            .finish()
    }
}

/// Bounds each of the key caches.
const CACHED_KEYS: usize = 100_000;

/// Looked-up keys, found and not found, each for `ttl`. Keys not found are kept
/// apart: a flood of made-up keys (each costs a database read, and is cached so
/// that a repeat does not) can only ever clear the other made-up keys, never evict
/// the real callers' keys and send their requests to the database.
struct KeyCache<T> {
    found: HashMap<String, (Instant, T)>,
    not_found: HashMap<String, Instant>,
}

impl<T: Clone> KeyCache<T> {
    fn new() -> Self {
        KeyCache { found: HashMap::new(), not_found: HashMap::new() }
    }

    /// `Some(lookup)` when a lookup younger than `ttl` is cached.
    fn get(&self, key: &str, ttl: Duration) -> Option<Option<T>> {
        if let Some((at, value)) = self.found.get(key) {
            if at.elapsed() < ttl {
                return Some(Some(value.clone()));
            }
        }
        match self.not_found.get(key) {
            Some(at) if at.elapsed() < ttl => Some(None),
            _ => None,
        }
    }

    fn put(&mut self, key: &str, value: Option<T>) {
        let now = Instant::now();
        match value {
            Some(v) => {
                self.not_found.remove(key);
                if self.found.len() >= CACHED_KEYS && !self.found.contains_key(key) {
                    self.found.clear();
                }
                self.found.insert(key.to_string(), (now, v));
            }
            None => {
                self.found.remove(key);
                if self.not_found.len() >= CACHED_KEYS {
                    self.not_found.clear();
                }
                self.not_found.insert(key.to_string(), now);
            }
        }
    }
}

/// Looks up keys with a short-lived cache, so that a key change (rotation, a
/// disabled key) takes effect within `ttl` without a database read per request.
pub struct Authenticator {
    pool: PgPool,
    ttl: Duration,
    window: chrono::Duration,
    access_keys: Mutex<KeyCache<AccessKeyRecord>>,
    crypto_keys: Mutex<KeyCache<CryptoKeyRecord>>,
}

fn fail(code: ResultCode, why: &str, h: &RequestHeaders) -> ApiError {
    tracing::warn!(correlation_id = %h.correlation_id, asp_id = %h.asp_id, code = code.code(), why, "request refused");
    cardflow_telemetry::Metrics::global().auth_failures.with_label_values(&[code.code()]).inc();
    ApiError::new(code)
}

impl Authenticator {
    pub fn new(pool: PgPool, ttl: Duration, window_secs: i64) -> Self {
        Authenticator {
            pool,
            ttl,
            window: chrono::Duration::seconds(window_secs),
            access_keys: Mutex::new(KeyCache::new()),
            crypto_keys: Mutex::new(KeyCache::new()),
        }
    }

    /// `key` from `cache`, or from `lookup` (a database read, run only on a miss).
    async fn cached<T: Clone>(
        &self,
        cache: &Mutex<KeyCache<T>>,
        key: &str,
        lookup: impl std::future::Future<Output = Result<Option<T>, cardflow_ledger::LedgerError>>,
    ) -> Result<Option<T>, ApiError> {
        if let Some(cached) = cache.lock().unwrap().get(key, self.ttl) {
            return Ok(cached);
        }
        let value = lookup.await?;
        cache.lock().unwrap().put(key, value.clone());
        Ok(value)
    }

    async fn access_key(&self, key: &str) -> Result<Option<AccessKeyRecord>, ApiError> {
        self.cached(&self.access_keys, key, credentials::access_key(&self.pool, key)).await
    }

    async fn crypto_key(&self, key_id: &str) -> Result<Option<CryptoKeyRecord>, ApiError> {
        self.cached(&self.crypto_keys, key_id, credentials::crypto_key(&self.pool, key_id)).await
    }

    /// Checks key, token, time window and data key. `body` is the raw body as sent.
    pub async fn authenticate(
        &self,
        method: &str,
        path: &str,
        h: &RequestHeaders,
        body: &[u8],
    ) -> Result<Caller, ApiError> {
        let now = Utc::now();
        let record = self.access_key(h.access_key.as_str()).await?;
        let record = match record {
            None => return Err(fail(ResultCode::AuthenticationFailed, "unknown access key", h)),
            Some(r) if r.asp_id != h.asp_id.as_str() => {
                return Err(fail(ResultCode::AuthenticationFailed, "access key of another ASP", h))
            }
            Some(r) if !r.usable_at(now) => {
                return Err(fail(ResultCode::AuthenticationFailed, "access key disabled or expired", h))
            }
            Some(r) => r,
        };
        let input = TokenInput {
            method,
            path,
            asp_id: h.asp_id.as_str(),
            correlation_id: h.correlation_id.as_str(),
            tran_time: &h.tran_time_text,
            time_zone: h.time_zone.name,
            body,
        };
        if !input.verify(&record.signing_secret, &h.tran_token.mac()) {
            return Err(fail(ResultCode::AuthenticationFailed, "token mismatch", h));
        }
        let sent = h.time_zone.offset().from_local_datetime(&h.tran_time).single().map(|t| t.with_timezone(&Utc));
        match sent {
            Some(t) if (now - t).abs() <= self.window => {}
            _ => return Err(fail(ResultCode::RequestTimeOutOfWindow, "tran time outside the window", h)),
        }
        let crypto = match &h.crypto_key_id {
            None if record.require_encryption => {
                tracing::warn!(correlation_id = %h.correlation_id, asp_id = %h.asp_id, "request refused: the ASP requires encryption");
                cardflow_telemetry::Metrics::global()
                    .auth_failures
                    .with_label_values(&[ResultCode::MissingRequiredValue.code()])
                    .inc();
                return Err(ApiError::missing(CRYPTO_KEY_ID));
            }
            None => None,
            Some(id) => match self.crypto_key(id.as_str()).await? {
                Some(k) if k.asp_id == h.asp_id.as_str() && k.active => Some((id.clone(), k.key)),
                _ => return Err(fail(ResultCode::DecryptionFailed, "unknown data key", h)),
            },
        };
        Ok(Caller { asp_id: h.asp_id.clone(), correlation_id: h.correlation_id.clone(), crypto })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(ASP_ID, HeaderValue::from_static("DEMOASP00000001"));
        h.insert(CORRELATION_ID, HeaderValue::from_static("261124153000-00000a1"));
        h.insert(ACCESS_KEY, HeaderValue::from_static("DEMOACCESSKEY000000000000000000000000001"));
        h.insert(TRAN_TOKEN, HeaderValue::from_str(&format!("v1{}", "0".repeat(64))).unwrap());
        h.insert(TRAN_TIME, HeaderValue::from_static("20261124153000"));
        h.insert(TIME_ZONE, HeaderValue::from_static("KST"));
        h
    }

    #[test]
    fn complete_headers_parse() {
        let h = parse_headers(&headers()).unwrap();
        assert_eq!(h.asp_id.as_str(), "DEMOASP00000001");
        assert!(h.crypto_key_id.is_none());
    }

    #[test]
    fn each_missing_header_is_named_in_spec_order() {
        for name in [ASP_ID, CORRELATION_ID, ACCESS_KEY, TRAN_TOKEN, TRAN_TIME, TIME_ZONE] {
            let mut h = headers();
            h.remove(name);
            assert_eq!(parse_headers(&h).unwrap_err(), ApiError::missing(name));
        }
    }

    #[test]
    fn a_header_of_the_wrong_length_is_an_invalid_value() {
        for (name, bad) in [
            (ASP_ID, "DEMOASP0000001"),
            (CORRELATION_ID, "261124153000-00000a"),
            (ACCESS_KEY, "short"),
            (CRYPTO_KEY_ID, "abc"),
            (TRAN_TOKEN, "v1abc"),
            (TRAN_TIME, "2026112415300"),
            (TRAN_TIME, "20261324153000"),
            (TIME_ZONE, "XYZ"),
        ] {
            let mut h = headers();
            h.insert(name, HeaderValue::from_static(bad));
            assert_eq!(parse_headers(&h).unwrap_err(), ApiError::invalid(name), "{name}");
        }
    }

    #[test]
    fn a_header_sent_twice_is_an_invalid_value() {
        for name in [ASP_ID, CORRELATION_ID, ACCESS_KEY, CRYPTO_KEY_ID, TRAN_TOKEN, TRAN_TIME, TIME_ZONE] {
            let mut h = headers();
            let value = h.get(name).cloned().unwrap_or(HeaderValue::from_static("E2ECRYPTOKEY00000000000000000001"));
            h.append(name, value.clone());
            h.append(name, value);
            assert_eq!(parse_headers(&h).unwrap_err(), ApiError::invalid(name), "{name}");
        }
    }

    #[test]
    fn second_sixty_is_not_a_tran_time() {
        assert!(parse_tran_time("20261124153059").is_some());
        assert!(parse_tran_time("20261124153060").is_none());
    }

    #[test]
    fn a_flood_of_unknown_keys_never_evicts_a_known_one() {
        let mut cache = KeyCache::new();
        let ttl = Duration::from_secs(60);
        cache.put("known", Some(7));
        for i in 0..CACHED_KEYS + 10 {
            cache.put(&format!("made-up-{i}"), None);
        }
        assert_eq!(cache.get("known", ttl), Some(Some(7)));
        assert!(cache.not_found.len() <= CACHED_KEYS);
    }

    #[test]
    fn a_key_not_found_is_cached_as_not_found_until_it_is_found() {
        let mut cache = KeyCache::new();
        let ttl = Duration::from_secs(60);
        assert_eq!(cache.get("k", ttl), None);
        cache.put("k", None::<i32>);
        assert_eq!(cache.get("k", ttl), Some(None));
        cache.put("k", Some(1));
        assert_eq!(cache.get("k", ttl), Some(Some(1)));
        assert_eq!(cache.get("k", Duration::ZERO), None, "an entry older than the ttl is looked up again");
    }
}
