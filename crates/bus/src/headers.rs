//! The header codec: what travels beside a payload. Headers carry what tools and
//! proxies need without parsing the payload: the W3C `traceparent`, the content
//! type, the schema version, the correlation id and, on commands, the reply address.

use rdkafka::message::{BorrowedHeaders, Header, Headers, OwnedHeaders};

pub const TRACEPARENT: &str = "traceparent";
pub const CONTENT_TYPE: &str = "content-type";
pub const SCHEMA_VERSION: &str = "schema-version";
pub const CORRELATION_ID: &str = "correlation-id";
pub const REPLY_TOPIC: &str = "reply-topic";
pub const REPLY_PARTITION: &str = "reply-partition";
pub const DLQ_REASON: &str = "dlq-reason";

/// Builds headers from name/value pairs.
pub fn build<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> OwnedHeaders {
    pairs.into_iter().fold(OwnedHeaders::new(), |h, (k, v)| h.insert(Header { key: k, value: Some(v.as_bytes()) }))
}

/// The value of a header as text, if present and UTF-8.
pub fn get<'a>(headers: Option<&'a BorrowedHeaders>, name: &str) -> Option<&'a str> {
    headers?.iter().find(|h| h.key == name).and_then(|h| h.value).and_then(|v| std::str::from_utf8(v).ok())
}

/// A fresh W3C trace context for a request that arrived without one.
pub fn new_traceparent() -> String {
    format!("00-{:032x}-{:016x}-01", rand::random::<u128>(), rand::random::<u64>())
}

/// Whether a `traceparent` value is well formed (version 00).
pub fn valid_traceparent(tp: &str) -> bool {
    let parts: Vec<&str> = tp.split('-').collect();
    parts.len() == 4
        && parts[0] == "00"
        && parts[1].len() == 32
        && parts[2].len() == 16
        && parts[3].len() == 2
        && parts.iter().all(|p| p.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
        && parts[1] != "0".repeat(32)
        && parts[2] != "0".repeat(16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_traceparent_is_valid() {
        assert!(valid_traceparent(&new_traceparent()));
    }

    #[test]
    fn malformed_traceparents_are_refused() {
        assert!(!valid_traceparent("00-abc-def-01"));
        assert!(!valid_traceparent(&format!("00-{}-{}-01", "0".repeat(32), "1".repeat(16))));
        assert!(!valid_traceparent(&format!("00-{}-{}-01", "A".repeat(32), "1".repeat(16))));
    }
}
