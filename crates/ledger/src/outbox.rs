//! The transactional outbox: rows written in the transaction of the change they
//! announce, read by the relay in id order, marked published once the broker has
//! acknowledged them. Inserting fires `NOTIFY cardflow_outbox` (a statement
//! trigger), which wakes the relay.

use crate::LedgerError;
use chrono::{DateTime, Utc};
use sqlx::{PgPool, Postgres, Row, Transaction};

pub const NOTIFY_CHANNEL: &str = "cardflow_outbox";

#[derive(Debug, Clone)]
pub struct NewOutboxRow {
    pub topic: String,
    /// Set for replies, which go to the partition the waiting gateway reads; keyed
    /// events leave it to the partitioner.
    pub partition: Option<i32>,
    pub key: String,
    pub payload: String,
    pub headers: serde_json::Value,
}

#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub id: i64,
    pub topic: String,
    pub partition: Option<i32>,
    pub key: String,
    pub payload: String,
    pub headers: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

pub async fn insert(tx: &mut Transaction<'_, Postgres>, rows: &[NewOutboxRow]) -> Result<(), LedgerError> {
    if rows.is_empty() {
        return Ok(());
    }
    let topics: Vec<&str> = rows.iter().map(|r| r.topic.as_str()).collect();
    let partitions: Vec<Option<i32>> = rows.iter().map(|r| r.partition).collect();
    let keys: Vec<&str> = rows.iter().map(|r| r.key.as_str()).collect();
    let payloads: Vec<&str> = rows.iter().map(|r| r.payload.as_str()).collect();
    let headers: Vec<&serde_json::Value> = rows.iter().map(|r| &r.headers).collect();
    sqlx::query(
        "INSERT INTO outbox (topic, partition, message_key, payload, headers)
         SELECT * FROM unnest($1::text[], $2::int[], $3::text[], $4::text[], $5::jsonb[])",
    )
    .bind(&topics)
    .bind(&partitions)
    .bind(&keys)
    .bind(&payloads)
    .bind(&headers)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The oldest unpublished rows, in id order.
pub async fn unpublished(pool: &PgPool, limit: i64) -> Result<Vec<OutboxRow>, LedgerError> {
    let rows = sqlx::query(
        "SELECT id, topic, partition, message_key, payload, headers, created_at
         FROM outbox WHERE published_at IS NULL ORDER BY id LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(OutboxRow {
                id: r.try_get("id")?,
                topic: r.try_get("topic")?,
                partition: r.try_get("partition")?,
                key: r.try_get("message_key")?,
                payload: r.try_get("payload")?,
                headers: r.try_get("headers")?,
                created_at: r.try_get("created_at")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .map_err(Into::into)
}

pub async fn mark_published(pool: &PgPool, ids: &[i64]) -> Result<(), LedgerError> {
    sqlx::query("UPDATE outbox SET published_at = now() WHERE id = ANY($1)").bind(ids).execute(pool).await?;
    Ok(())
}

/// Sets rows aside that the broker refused for good, with the reason. They count as
/// handled, so the rows behind them go out, and are kept by the purge.
pub async fn park(pool: &PgPool, parked: &[(i64, String)]) -> Result<(), LedgerError> {
    let ids: Vec<i64> = parked.iter().map(|(id, _)| *id).collect();
    let reasons: Vec<&str> = parked.iter().map(|(_, r)| r.as_str()).collect();
    sqlx::query(
        "UPDATE outbox SET published_at = now(), parked_reason = p.reason
         FROM unnest($1::bigint[], $2::text[]) AS p(id, reason) WHERE outbox.id = p.id",
    )
    .bind(&ids)
    .bind(&reasons)
    .execute(pool)
    .await?;
    Ok(())
}

/// How many rows wait and how old the oldest is, for the backlog metrics.
pub async fn backlog(pool: &PgPool) -> Result<(i64, f64), LedgerError> {
    let row = sqlx::query(
        "SELECT count(*), COALESCE(EXTRACT(EPOCH FROM now() - min(created_at))::float8, 0)
         FROM outbox WHERE published_at IS NULL",
    )
    .fetch_one(pool)
    .await?;
    Ok((row.try_get(0)?, row.try_get(1)?))
}

/// Deletes rows published longer ago than `older_than_secs`; the ledger, not the
/// outbox, is the record (replay reads the ledger).
pub async fn purge_published(pool: &PgPool, older_than_secs: i64) -> Result<u64, LedgerError> {
    let r = sqlx::query(
        "DELETE FROM outbox WHERE published_at < now() - make_interval(secs => $1) AND parked_reason IS NULL",
    )
    .bind(older_than_secs as f64)
    .execute(pool)
    .await?;
    Ok(r.rows_affected())
}
