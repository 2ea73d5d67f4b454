//! Balance events rebuilt from the ledger, for `cardflow replay`: a downstream
//! consumer that lost data or starts fresh gets the very events it would have had,
//! with the same event ids (the ledger entry ids), so it can deduplicate.

use crate::LedgerError;
use cardflow_domain::command::{BALANCE_CHANGED, SCHEMA_VERSION};
use cardflow_domain::{BalanceEvent, CardNo, CorrelationId, Money, UserId};
use rust_decimal::Decimal;
use sqlx::{PgPool, Row};

/// A card's balance events with sequence ≥ `from_sequence`, in sequence order.
pub async fn balance_events(
    pool: &PgPool,
    card_no: &str,
    from_sequence: i64,
) -> Result<Vec<BalanceEvent>, LedgerError> {
    let rows = sqlx::query(
        "SELECT e.entry_id, e.created_at, e.card_no, e.user_id::text AS user_id, e.transfer_id, t.correlation_id,
                CASE e.side WHEN 'DEBIT' THEN -e.amount ELSE e.amount END AS delta, e.balance_after, e.sequence
         FROM ledger_entries e JOIN transfers t ON t.transfer_id = e.transfer_id
         WHERE e.card_no = $1 AND e.sequence >= $2 ORDER BY e.sequence",
    )
    .bind(card_no)
    .bind(from_sequence)
    .fetch_all(pool)
    .await?;
    let corrupt = |what: &str| LedgerError::Corrupt(format!("ledger entry of {card_no}: {what}"));
    rows.iter()
        .map(|r| {
            let user: String = r.try_get("user_id")?;
            let correlation: String = r.try_get("correlation_id")?;
            let card: String = r.try_get("card_no")?;
            Ok(BalanceEvent {
                schema_version: SCHEMA_VERSION,
                event_id: r.try_get("entry_id")?,
                event_type: BALANCE_CHANGED.to_string(),
                occurred_at: r.try_get("created_at")?,
                card_no: CardNo::parse(&card).map_err(|_| corrupt("card_no"))?,
                user_id: user.parse().ok().and_then(|u| UserId::new(u).ok()).ok_or_else(|| corrupt("user_id"))?,
                transfer_id: r.try_get("transfer_id")?,
                correlation_id: CorrelationId::parse(&correlation).map_err(|_| corrupt("correlation_id"))?,
                delta: r.try_get::<Decimal, _>("delta")?.normalize(),
                balance_after: Money::new(r.try_get("balance_after")?).map_err(|_| corrupt("balance_after"))?,
                sequence: r.try_get("sequence")?,
            })
        })
        .collect()
}
