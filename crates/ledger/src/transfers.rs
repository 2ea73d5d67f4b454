//! The read model of requests: what was asked under `(asp_id, correlation_id)` and
//! what was answered. The gateway reads it to answer repeats and status queries.

use crate::LedgerError;
use cardflow_domain::command::SCHEMA_VERSION;
use cardflow_domain::{AspId, CorrelationId, Money, ResultCode, TransferCommand, TransferOutcome, TransferResult};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use sqlx::{PgExecutor, Row};
use std::collections::HashMap;
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredTransfer {
    pub transfer_id: Uuid,
    pub asp_id: String,
    pub correlation_id: String,
    pub fingerprint: String,
    pub status: String,
    pub code: Option<String>,
    pub message: Option<String>,
    pub amount: Option<Decimal>,
    pub decided_at: Option<DateTime<Utc>>,
}

impl StoredTransfer {
    pub fn is_decided(&self) -> bool {
        self.status != "PENDING" && self.code.is_some()
    }

    pub fn result_code(&self) -> ResultCode {
        self.code.as_deref().and_then(ResultCode::from_code).unwrap_or(ResultCode::TransferFailed)
    }

    /// The stored answer, addressed as the given command asked.
    pub fn result(&self, cmd: &TransferCommand) -> TransferResult {
        self.result_for(cmd.asp_id.clone(), cmd.correlation_id.clone())
    }

    pub fn result_for(&self, asp_id: AspId, correlation_id: CorrelationId) -> TransferResult {
        let code = self.result_code();
        TransferResult {
            schema_version: SCHEMA_VERSION,
            asp_id,
            correlation_id,
            transfer_id: Some(self.transfer_id),
            outcome: if code.is_success() { TransferOutcome::Completed } else { TransferOutcome::Rejected },
            code: code.code().to_string(),
            message: self.message.clone().unwrap_or_else(|| code.message().to_string()),
            amount: self.amount.and_then(|a| Money::new(a).ok()),
            decided_at: self.decided_at.unwrap_or_else(Utc::now),
            request_fingerprint: None,
        }
    }
}

const COLUMNS: &str =
    "transfer_id, asp_id, correlation_id, fingerprint, status, result_code, result_message, amount, decided_at";

fn from_row(r: &sqlx::postgres::PgRow) -> Result<StoredTransfer, sqlx::Error> {
    Ok(StoredTransfer {
        transfer_id: r.try_get("transfer_id")?,
        asp_id: r.try_get("asp_id")?,
        correlation_id: r.try_get("correlation_id")?,
        fingerprint: r.try_get("fingerprint")?,
        status: r.try_get("status")?,
        code: r.try_get("result_code")?,
        message: r.try_get("result_message")?,
        amount: r.try_get("amount")?,
        decided_at: r.try_get("decided_at")?,
    })
}

pub async fn find_many<'e>(
    db: impl PgExecutor<'e>,
    keys: &[(String, String)],
) -> Result<HashMap<(String, String), StoredTransfer>, LedgerError> {
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let asps: Vec<&str> = keys.iter().map(|k| k.0.as_str()).collect();
    let corrs: Vec<&str> = keys.iter().map(|k| k.1.as_str()).collect();
    // `LATERAL … LIMIT 1` makes every key one probe of the unique index where a
    // plain join over `unnest` chose a hash join over a scan of `transfers`. It does
    // not survive a generic plan made while the table was empty (a scan inside the
    // lateral), and the worker's connections keep cached plans
    // ([`crate::connect_with_cached_plans`]): so this statement is not prepared
    // and kept but planned on every call, at the price of one round trip more.
    let rows = sqlx::query(&format!(
        "SELECT t.* FROM unnest($1::text[], $2::text[]) AS k(asp_id, correlation_id)
         CROSS JOIN LATERAL (SELECT {COLUMNS} FROM transfers
                             WHERE transfers.asp_id = k.asp_id AND transfers.correlation_id = k.correlation_id
                             LIMIT 1) t"
    ))
    .persistent(false)
    .bind(&asps)
    .bind(&corrs)
    .fetch_all(db)
    .await?;
    let mut out = HashMap::new();
    for r in &rows {
        let t = from_row(r)?;
        out.insert((t.asp_id.clone(), t.correlation_id.clone()), t);
    }
    Ok(out)
}

/// The transfer of a row that left-joined `transfers`, if the join found one.
fn transfer_of(r: &sqlx::postgres::PgRow) -> Result<Option<StoredTransfer>, sqlx::Error> {
    match r.try_get::<Option<Uuid>, _>("transfer_id")? {
        Some(_) => Ok(Some(from_row(r)?)),
        None => Ok(None),
    }
}

/// The request's transfer, if one is stored, and the fingerprint it was submitted
/// with, if a gateway recorded it, in one round trip for both tables (a status
/// query).
async fn read_request(
    pool: &sqlx::PgPool,
    asp_id: &str,
    correlation_id: &str,
) -> Result<(Option<StoredTransfer>, Option<String>), LedgerError> {
    let row = sqlx::query(&format!(
        "SELECT {COLUMNS},
                (SELECT fingerprint FROM submissions WHERE asp_id = $1 AND correlation_id = $2) AS submitted_fingerprint
         FROM (SELECT 1) AS k
         LEFT JOIN transfers ON transfers.asp_id = $1 AND transfers.correlation_id = $2"
    ))
    .bind(asp_id)
    .bind(correlation_id)
    .fetch_one(pool)
    .await?;
    Ok((transfer_of(&row)?, row.try_get("submitted_fingerprint")?))
}

/// What is known of a request when it arrives at a gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Submission {
    /// First time this key is seen: publish it.
    New,
    /// Published before and not decided yet: publish again (the worker answers a
    /// repeat from the stored result; a lost earlier publish is healed this way).
    InFlight,
    /// Seen before and decided: answer the stored result.
    Decided(StoredTransfer),
    /// Stored by the ledger with a different request: `000_008`.
    Conflict,
}

/// A request as the gateway asks about it or records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestKey {
    pub asp_id: String,
    pub correlation_id: String,
    pub fingerprint: String,
}

/// What is known of each request before it is published, in one round trip; the
/// answers are in the order of `requests`, and a key asked twice is answered
/// twice. Read-only: a submission is recorded only after Kafka acknowledged the
/// command ([`record_submissions`]), so a gateway that dies before publishing
/// leaves no "pending" that never ends. One index probe per key and table, as in
/// [`find_many`].
pub async fn lookup_many(pool: &sqlx::PgPool, requests: &[RequestKey]) -> Result<Vec<Submission>, LedgerError> {
    if requests.is_empty() {
        return Ok(Vec::new());
    }
    let asps: Vec<&str> = requests.iter().map(|r| r.asp_id.as_str()).collect();
    let corrs: Vec<&str> = requests.iter().map(|r| r.correlation_id.as_str()).collect();
    let rows = sqlx::query(&format!(
        "SELECT k.i, t.*, s.fingerprint AS submitted_fingerprint
         FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS k(asp_id, correlation_id, i)
         LEFT JOIN LATERAL (SELECT {COLUMNS} FROM transfers
                            WHERE transfers.asp_id = k.asp_id AND transfers.correlation_id = k.correlation_id
                            LIMIT 1) t ON true
         LEFT JOIN LATERAL (SELECT fingerprint FROM submissions
                            WHERE submissions.asp_id = k.asp_id AND submissions.correlation_id = k.correlation_id
                            LIMIT 1) s ON true"
    ))
    .bind(&asps)
    .bind(&corrs)
    .fetch_all(pool)
    .await?;
    let mut answers: Vec<Option<Submission>> = vec![None; requests.len()];
    for r in &rows {
        let i = r.try_get::<i64, _>("i")? as usize;
        let transfer = transfer_of(r)?;
        let slot = answers
            .get_mut(i.wrapping_sub(1))
            .ok_or_else(|| LedgerError::Corrupt(format!("lookup answered for request {i} of {}", requests.len())))?;
        *slot = Some(judge(transfer, r.try_get("submitted_fingerprint")?, &requests[i - 1].fingerprint));
    }
    answers
        .into_iter()
        .enumerate()
        .map(|(i, a)| a.ok_or_else(|| LedgerError::Corrupt(format!("lookup did not answer request {}", i + 1))))
        .collect()
}

/// What a request is, given what is stored under its key.
fn judge(transfer: Option<StoredTransfer>, submitted: Option<String>, fingerprint: &str) -> Submission {
    if let Some(t) = transfer {
        return if t.fingerprint != fingerprint {
            Submission::Conflict
        } else if t.is_decided() {
            Submission::Decided(t)
        } else {
            Submission::InFlight
        };
    }
    // A submission row with another body is not the truth about which body won:
    // it is whichever row landed first, while the worker applies whichever
    // command comes first on the partition. Both are published; the worker answers
    // the loser `000_008` under its own fingerprint.
    match submitted {
        None => Submission::New,
        Some(_) => Submission::InFlight,
    }
}

/// Records that commands were published, for status queries on any gateway, in
/// one statement. Rows are written in key order, so two groups that share a key (a
/// client's retry landing in both) wait for each other instead of deadlocking.
pub async fn record_submissions(pool: &sqlx::PgPool, requests: &[RequestKey]) -> Result<(), LedgerError> {
    let mut rows: Vec<&RequestKey> = requests.iter().collect();
    rows.sort_by(|a, b| (&a.asp_id, &a.correlation_id).cmp(&(&b.asp_id, &b.correlation_id)));
    rows.dedup_by(|a, b| a.asp_id == b.asp_id && a.correlation_id == b.correlation_id);
    if rows.is_empty() {
        return Ok(());
    }
    let asps: Vec<&str> = rows.iter().map(|r| r.asp_id.as_str()).collect();
    let corrs: Vec<&str> = rows.iter().map(|r| r.correlation_id.as_str()).collect();
    let fingerprints: Vec<&str> = rows.iter().map(|r| r.fingerprint.as_str()).collect();
    sqlx::query(
        "INSERT INTO submissions (asp_id, correlation_id, fingerprint)
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[])
         ON CONFLICT (asp_id, correlation_id) DO NOTHING",
    )
    .bind(&asps)
    .bind(&corrs)
    .bind(&fingerprints)
    .execute(pool)
    .await?;
    Ok(())
}

/// What a status query finds.
pub async fn status(
    pool: &sqlx::PgPool,
    asp_id: &str,
    correlation_id: &str,
) -> Result<Option<Submission>, LedgerError> {
    let (transfer, submitted) = read_request(pool, asp_id, correlation_id).await?;
    if let Some(t) = transfer.filter(StoredTransfer::is_decided) {
        return Ok(Some(Submission::Decided(t)));
    }
    Ok(submitted.map(|_| Submission::InFlight))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(fingerprint: &str, status: &str, code: Option<&str>) -> StoredTransfer {
        StoredTransfer {
            transfer_id: Uuid::nil(),
            asp_id: "ASP".into(),
            correlation_id: "C1".into(),
            fingerprint: fingerprint.into(),
            status: status.into(),
            code: code.map(str::to_string),
            message: None,
            amount: None,
            decided_at: None,
        }
    }

    #[test]
    fn a_request_nobody_has_seen_is_new() {
        assert_eq!(judge(None, None, "f"), Submission::New);
    }

    #[test]
    fn a_recorded_submission_with_the_same_body_is_in_flight() {
        assert_eq!(judge(None, Some("f".into()), "f"), Submission::InFlight);
    }

    #[test]
    fn a_recorded_submission_with_another_body_is_in_flight_until_the_ledger_decides() {
        assert_eq!(judge(None, Some("g".into()), "f"), Submission::InFlight);
    }

    #[test]
    fn a_decided_transfer_with_the_same_body_is_answered_from_the_ledger() {
        let t = stored("f", "COMPLETED", Some("000_000"));
        assert_eq!(judge(Some(t.clone()), Some("f".into()), "f"), Submission::Decided(t));
    }

    #[test]
    fn a_stored_transfer_with_another_body_is_a_conflict_whatever_the_submission_says() {
        let t = stored("g", "COMPLETED", Some("000_000"));
        assert_eq!(judge(Some(t), Some("f".into()), "f"), Submission::Conflict);
    }

    #[test]
    fn a_pending_transfer_is_in_flight() {
        assert_eq!(judge(Some(stored("f", "PENDING", None)), None, "f"), Submission::InFlight);
    }
}
