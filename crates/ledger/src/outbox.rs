//! The transactional outbox: one row per worker transaction, holding every message
//! that transaction announces in the order they must go out. The relay reads rows
//! in id order and marks a row published once the broker has acknowledged all of
//! its messages (or refused one for good: that one is parked, see [`park`]).
//! Inserting fires `NOTIFY cardflow_outbox` (a statement trigger), which wakes the
//! relay.
//!
//! One row per transaction rather than per message: `make bench` measured the
//! per-message rows (four inserts and four updates per transfer) as the largest
//! share of the database's time after the ledger entries themselves.

use crate::LedgerError;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sqlx::{PgPool, Postgres, Row, Transaction};
use std::collections::BTreeMap;

pub const NOTIFY_CHANNEL: &str = "cardflow_outbox";

/// One message to publish. The payload is JSON and is stored as it will be sent.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutboxMessage {
    pub topic: String,
    /// Set for replies, which go to the partition the waiting gateway reads; keyed
    /// events leave it to the partitioner.
    pub partition: Option<i32>,
    pub key: String,
    pub headers: BTreeMap<String, String>,
    pub payload: Box<RawValue>,
}

impl OutboxMessage {
    /// A reply to a waiting gateway, as opposed to an event for consumers.
    pub fn is_reply(&self) -> bool {
        self.partition.is_some()
    }
}

/// A message on its way into the outbox, its payload still a value: the batch
/// transaction serializes a whole row of these on a blocking thread while its other
/// statements run in Postgres (see [`prepare`]). It serializes exactly as an
/// [`OutboxMessage`] with the same content, which is how the relay reads it back.
#[derive(Debug, Clone, Serialize)]
pub struct Announcement<P: Serialize> {
    pub topic: String,
    pub partition: Option<i32>,
    pub key: String,
    pub headers: EventHeaders,
    pub payload: P,
}

/// The headers every message the ledger announces carries: `content-type`,
/// `schema-version` and, when the command brought one, `traceparent` (in that
/// order, as an [`OutboxMessage`]'s sorted map has them).
#[derive(Debug, Clone)]
pub struct EventHeaders {
    pub traceparent: Option<String>,
}

impl Serialize for EventHeaders {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(2 + usize::from(self.traceparent.is_some())))?;
        map.serialize_entry("content-type", "application/json")?;
        map.serialize_entry("schema-version", &cardflow_domain::command::SCHEMA_VERSION.to_string())?;
        if let Some(tp) = &self.traceparent {
            map.serialize_entry("traceparent", tp)?;
        }
        map.end()
    }
}

/// One transaction's messages, serialized as the row's `messages` text.
#[derive(Debug)]
pub struct PreparedRow {
    text: String,
    count: usize,
}

pub fn prepare<P: Serialize>(messages: &[Announcement<P>]) -> PreparedRow {
    PreparedRow { text: serde_json::to_string(messages).expect("outbox messages serialize"), count: messages.len() }
}

/// An unpublished row as the relay reads it.
#[derive(Debug)]
pub struct OutboxRow {
    pub id: i64,
    pub messages: Vec<OutboxMessage>,
}

/// Writes the messages of one transaction as one row; none, no row.
pub async fn insert(tx: &mut Transaction<'_, Postgres>, row: PreparedRow) -> Result<(), LedgerError> {
    if row.count == 0 {
        return Ok(());
    }
    sqlx::query("INSERT INTO outbox (messages, message_count) VALUES ($1, $2)")
        .bind(row.text)
        .bind(row.count as i32)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// The oldest unpublished rows, in id order: as many as hold fewer than
/// `messages` messages before the last one (so always at least one row).
pub async fn unpublished(pool: &PgPool, messages: i64) -> Result<Vec<OutboxRow>, LedgerError> {
    let rows = sqlx::query(
        "SELECT o.id, o.messages
         FROM (SELECT id, sum(message_count) OVER (ORDER BY id) - message_count AS before
               FROM outbox WHERE published_at IS NULL ORDER BY id LIMIT 1000) w
         JOIN outbox o ON o.id = w.id
         WHERE w.before < $1
         ORDER BY o.id",
    )
    .bind(messages)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            let id: i64 = r.try_get("id")?;
            let text: &str = r.try_get("messages")?;
            let messages = serde_json::from_str(text)
                .map_err(|e| LedgerError::Corrupt(format!("outbox row {id} does not decode: {e}")))?;
            Ok(OutboxRow { id, messages })
        })
        .collect()
}

pub async fn mark_published(pool: &PgPool, ids: &[i64]) -> Result<(), LedgerError> {
    sqlx::query("UPDATE outbox SET published_at = now() WHERE id = ANY($1)").bind(ids).execute(pool).await?;
    Ok(())
}

/// A message the broker refused for good, with where it sat and why.
#[derive(Debug, Clone)]
pub struct ParkedMessage {
    pub outbox_id: i64,
    pub position: i32,
    pub message: OutboxMessage,
    pub reason: String,
}

/// Sets messages aside that the broker refused for good, with the reason, so that
/// the rest of their row and the rows behind it go out. A row published again after
/// a crash parks the same message once.
pub async fn park(pool: &PgPool, parked: &[ParkedMessage]) -> Result<(), LedgerError> {
    let ids: Vec<i64> = parked.iter().map(|p| p.outbox_id).collect();
    let positions: Vec<i32> = parked.iter().map(|p| p.position).collect();
    let topics: Vec<&str> = parked.iter().map(|p| p.message.topic.as_str()).collect();
    let partitions: Vec<Option<i32>> = parked.iter().map(|p| p.message.partition).collect();
    let keys: Vec<&str> = parked.iter().map(|p| p.message.key.as_str()).collect();
    let payloads: Vec<&str> = parked.iter().map(|p| p.message.payload.get()).collect();
    let headers: Vec<serde_json::Value> =
        parked.iter().map(|p| serde_json::to_value(&p.message.headers).expect("headers serialize")).collect();
    let reasons: Vec<&str> = parked.iter().map(|p| p.reason.as_str()).collect();
    sqlx::query(
        "INSERT INTO outbox_parked (outbox_id, position, topic, partition, message_key, payload, headers, reason)
         SELECT * FROM unnest($1::bigint[], $2::int[], $3::text[], $4::int[], $5::text[], $6::text[], $7::jsonb[], $8::text[])
         ON CONFLICT (outbox_id, position) DO NOTHING",
    )
    .bind(&ids)
    .bind(&positions)
    .bind(&topics)
    .bind(&partitions)
    .bind(&keys)
    .bind(&payloads)
    .bind(&headers)
    .bind(&reasons)
    .execute(pool)
    .await?;
    Ok(())
}

/// How many messages wait and how old the oldest is, for the backlog metrics.
pub async fn backlog(pool: &PgPool) -> Result<(i64, f64), LedgerError> {
    let row = sqlx::query(
        "SELECT COALESCE(sum(message_count), 0)::bigint,
                COALESCE(EXTRACT(EPOCH FROM now() - min(created_at))::float8, 0)
         FROM outbox WHERE published_at IS NULL",
    )
    .fetch_one(pool)
    .await?;
    Ok((row.try_get(0)?, row.try_get(1)?))
}

/// The purge's statement; `$1` is the retention in seconds. Public so that a test
/// can look at its plan.
pub const PURGE_PUBLISHED: &str = "DELETE FROM outbox WHERE published_at < now() - make_interval(secs => $1)";

/// Deletes rows published longer ago than `older_than_secs`; the ledger, not the
/// outbox, is the record (replay reads the ledger). Parked messages stay in
/// `outbox_parked` for inspection. Reads the `outbox_published` index, not the
/// whole outbox.
pub async fn purge_published(pool: &PgPool, older_than_secs: i64) -> Result<u64, LedgerError> {
    let r = sqlx::query(PURGE_PUBLISHED).bind(older_than_secs as f64).execute(pool).await?;
    Ok(r.rows_affected())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_announcement_reads_back_as_the_outbox_message_the_relay_publishes() {
        let announced = [
            Announcement {
                topic: "card.balance".to_string(),
                partition: None,
                key: "9410000000000001".to_string(),
                headers: EventHeaders {
                    traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
                },
                payload: serde_json::json!({"cardNo": "9410000000000001", "delta": "-100"}),
            },
            Announcement {
                topic: "transfer.results".to_string(),
                partition: Some(3),
                key: "corr-1".to_string(),
                headers: EventHeaders { traceparent: None },
                payload: serde_json::json!({"code": "000_000"}),
            },
        ];
        let row = prepare(&announced);
        assert_eq!(row.count, 2);
        let read: Vec<OutboxMessage> = serde_json::from_str(&row.text).unwrap();
        assert_eq!(read.len(), 2);
        assert_eq!(
            (read[0].topic.as_str(), read[0].partition, read[0].key.as_str()),
            ("card.balance", None, "9410000000000001")
        );
        assert_eq!(
            read[0].headers,
            BTreeMap::from([
                ("content-type".to_string(), "application/json".to_string()),
                ("schema-version".to_string(), cardflow_domain::command::SCHEMA_VERSION.to_string()),
                ("traceparent".to_string(), "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_string()),
            ])
        );
        assert_eq!(read[0].payload.get(), r#"{"cardNo":"9410000000000001","delta":"-100"}"#);
        assert_eq!(
            (read[1].topic.as_str(), read[1].partition, read[1].key.as_str()),
            ("transfer.results", Some(3), "corr-1")
        );
        assert_eq!(read[1].headers.len(), 2, "no traceparent header without a trace");
        assert_eq!(read[1].payload.get(), r#"{"code":"000_000"}"#);
    }
}
