//! Building signed (and optionally encrypted) requests, for anyone who calls the
//! API: `cardflow sign`, the bench, the tests. It is the client half of
//! [`crate::crypto`], kept beside the server half so they cannot disagree.

use crate::auth::{ACCESS_KEY, ASP_ID, CORRELATION_ID, CRYPTO_KEY_ID, TIME_ZONE, TRAN_TIME, TRAN_TOKEN};
use crate::crypto::{self, TokenInput};
use cardflow_domain::ClientTimeZone;
use chrono::{DateTime, Utc};

/// What a client holds: its ASP, one access key with its signing secret, and
/// optionally a data key for encrypted bodies.
#[derive(Clone)]
pub struct Credentials {
    pub asp_id: String,
    pub access_key: String,
    pub signing_secret: String,
    pub crypto_key: Option<(String, [u8; 32])>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("asp_id", &self.asp_id)
            .field("access_key", &format_args!("{}***", self.access_key.chars().take(6).collect::<String>()))
            .field("signing_secret", &"***")
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct SignedRequest {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    /// The body as sent: the plain JSON, or the encrypted envelope.
    pub body: Vec<u8>,
    pub correlation_id: String,
}

/// A correlation id for now: `yyMMddHHmiSS-` and 7 random hex digits.
pub fn fresh_correlation_id(now: DateTime<Utc>, tz: ClientTimeZone) -> String {
    correlation_id(now, tz, rand::random::<u32>())
}

/// The correlation id of `now` in `tz` with `serial`'s low 28 bits as its seven hex
/// digits: for a client that numbers its requests instead of drawing them.
pub fn correlation_id(now: DateTime<Utc>, tz: ClientTimeZone, serial: u32) -> String {
    format!("{}-{:07x}", now.with_timezone(&tz.offset()).format("%y%m%d%H%M%S"), serial & 0x0fff_ffff)
}

pub struct SignOptions<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub body: &'a [u8],
    pub encrypt: bool,
    pub correlation_id: Option<String>,
    pub time_zone: ClientTimeZone,
    pub now: DateTime<Utc>,
}

pub fn sign(creds: &Credentials, o: SignOptions<'_>) -> SignedRequest {
    let correlation_id = o.correlation_id.unwrap_or_else(|| fresh_correlation_id(o.now, o.time_zone));
    let tran_time = o.now.with_timezone(&o.time_zone.offset()).format("%Y%m%d%H%M%S").to_string();
    // A request without a body (a status query) stays without one: it names the data
    // key so that its answer is encrypted, and is signed over the empty body.
    let (body, key_id) = match (&creds.crypto_key, o.encrypt) {
        (Some((id, _)), true) if o.body.is_empty() => (Vec::new(), Some(id.clone())),
        (Some((id, key)), true) => (crypto::envelope(&crypto::encrypt(key, o.body)).into_bytes(), Some(id.clone())),
        _ => (o.body.to_vec(), None),
    };
    let token = TokenInput {
        method: o.method,
        // The path as the server reads it: without the query (a status query's
        // `?request=` from a `Location`).
        path: o.path.split_once('?').map_or(o.path, |(path, _)| path),
        asp_id: &creds.asp_id,
        correlation_id: &correlation_id,
        tran_time: &tran_time,
        time_zone: o.time_zone.name,
        body: &body,
    }
    .sign(&creds.signing_secret);
    let mut headers = vec![
        (ASP_ID.to_string(), creds.asp_id.clone()),
        (CORRELATION_ID.to_string(), correlation_id.clone()),
        (ACCESS_KEY.to_string(), creds.access_key.clone()),
        (TRAN_TOKEN.to_string(), token),
        (TRAN_TIME.to_string(), tran_time),
        (TIME_ZONE.to_string(), o.time_zone.name.to_string()),
    ];
    if let Some(id) = key_id {
        headers.insert(3, (CRYPTO_KEY_ID.to_string(), id));
    }
    SignedRequest { method: o.method.to_string(), path: o.path.to_string(), headers, body, correlation_id }
}

/// Quotes a string for a POSIX shell.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

impl SignedRequest {
    pub fn curl(&self, base_url: &str) -> String {
        let mut out = format!("curl -sS -i -X {} {}", self.method, sh_quote(&format!("{base_url}{}", self.path)));
        for (k, v) in &self.headers {
            out.push_str(&format!(" \\\n  -H {}", sh_quote(&format!("{k}: {v}"))));
        }
        if !self.body.is_empty() {
            out.push_str(" \\\n  -H 'Content-Type: application/json'");
            out.push_str(&format!(" \\\n  --data-binary {}", sh_quote(&String::from_utf8_lossy(&self.body))));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(access_key: &str) -> Credentials {
        Credentials {
            asp_id: "DEMOASP00000001".into(),
            access_key: access_key.into(),
            signing_secret: "secret".into(),
            crypto_key: Some(("DEMOCRYPTOKEY0000000000000000001".into(), [7u8; 32])),
        }
    }

    fn options<'a>(method: &'a str, body: &'a [u8]) -> SignOptions<'a> {
        SignOptions {
            method,
            path: "/api/v1/transfer/balance/261124153000-0000001",
            body,
            encrypt: true,
            correlation_id: None,
            time_zone: ClientTimeZone::parse("KST").unwrap(),
            now: Utc::now(),
        }
    }

    #[test]
    fn an_encrypted_status_query_sends_no_body_but_names_the_data_key() {
        let signed = sign(&creds("DEMOACCESSKEY000000000000000000000000001"), options("GET", b""));
        assert!(signed.body.is_empty());
        assert!(signed.headers.iter().any(|(k, _)| k == CRYPTO_KEY_ID));
        assert!(!signed.curl("http://x").contains("--data-binary"));
    }

    #[test]
    fn a_status_query_from_a_location_is_sent_with_its_query_and_signed_without_it() {
        let path = "/api/v1/transfer/balance/261124153000-0000001";
        let located = format!("{path}?request={}", "0".repeat(32));
        let signed = |p: &str| {
            let mut o = options("GET", b"");
            (o.path, o.correlation_id) = (p, Some("261124153000-0000001".into()));
            o.now = "2026-11-24T06:30:00Z".parse().unwrap();
            sign(&creds("DEMOACCESSKEY000000000000000000000000001"), o)
        };
        let (with_query, without) = (signed(&located), signed(path));
        assert_eq!(with_query.path, located);
        let token = |r: &SignedRequest| r.headers.iter().find(|(k, _)| k == TRAN_TOKEN).unwrap().1.clone();
        assert_eq!(token(&with_query), token(&without), "the server verifies the path alone");
    }

    #[test]
    fn an_encrypted_transfer_sends_the_envelope() {
        let signed = sign(&creds("DEMOACCESSKEY000000000000000000000000001"), options("POST", b"{}"));
        assert!(String::from_utf8(signed.body).unwrap().starts_with("{\"encData\":"));
    }

    #[test]
    fn credentials_debug_hides_the_secret_and_survives_any_access_key() {
        let shown = format!("{:?}", creds("é".repeat(20).as_str()));
        assert!(shown.contains("éééééé***") && !shown.contains("secret\""), "{shown}");
    }
}
