//! The audit: checks the ledger's invariants over every card and transfer. Each
//! failing check names the card (or transfer) so an operator can look at it.
//!
//! - a card's balance equals its opening balance plus its entries;
//! - its entries are numbered 1..n without gaps, n being the card's sequence;
//! - each entry's balance-after follows from the previous one, the last equals the
//!   balance, none is negative, and the balance is within the card's limit;
//! - every completed transfer has exactly one debit on its sending card and one
//!   credit on its receiving card, both of the transfer's amount; other transfers
//!   have no entries.

use crate::LedgerError;
use sqlx::{PgPool, Row};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub subject: String,
    pub rule: &'static str,
    pub detail: String,
}

impl Violation {
    /// The subject as a log line may show it: a card by its last four digits.
    /// `cardflow audit`, run by a person, names it in full.
    pub fn masked_subject(&self) -> String {
        match self.subject.strip_prefix("card ").map(cardflow_domain::CardNo::parse) {
            Some(Ok(card)) => format!("card {}", card.masked()),
            _ => self.subject.clone(),
        }
    }
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {} ({})", self.subject, self.rule, self.detail)
    }
}

#[derive(Debug, Clone, Default)]
pub struct AuditReport {
    pub cards: i64,
    pub transfers: i64,
    pub entries: i64,
    pub violations: Vec<Violation>,
}

impl AuditReport {
    pub fn passed(&self) -> bool {
        self.violations.is_empty()
    }
}

const CHECKS: [(&str, &str); 7] = [
    (
        "balance = opening balance + entries",
        "SELECT 'card ' || c.card_no, format('balance %s, opening %s, entries %s', c.balance, c.opening_balance, COALESCE(e.net, 0))
         FROM cards c LEFT JOIN (
             SELECT card_no, sum(CASE side WHEN 'CREDIT' THEN amount ELSE -amount END) AS net FROM ledger_entries GROUP BY card_no
         ) e ON e.card_no = c.card_no
         WHERE c.balance <> c.opening_balance + COALESCE(e.net, 0)",
    ),
    (
        "entries numbered 1..sequence without gaps",
        "SELECT 'card ' || c.card_no, format('sequence %s, %s entries numbered %s..%s', c.sequence, COALESCE(e.n, 0), e.lo, e.hi)
         FROM cards c LEFT JOIN (
             SELECT card_no, count(*) AS n, min(sequence) AS lo, max(sequence) AS hi FROM ledger_entries GROUP BY card_no
         ) e ON e.card_no = c.card_no
         WHERE COALESCE(e.n, 0) <> c.sequence OR (e.n > 0 AND (e.lo <> 1 OR e.hi <> c.sequence))",
    ),
    (
        "each balance-after follows from the previous",
        "SELECT 'card ' || card_no, format('entry %s: balance after %s, previous %s, %s %s', sequence, balance_after, prev, side, amount)
         FROM (
             SELECT e.*, lag(balance_after) OVER (PARTITION BY card_no ORDER BY sequence) AS prev
             FROM ledger_entries e
         ) x
         WHERE prev IS NOT NULL AND balance_after <> prev + CASE side WHEN 'CREDIT' THEN amount ELSE -amount END",
    ),
    (
        "last balance-after equals the balance",
        "SELECT 'card ' || c.card_no, format('balance %s, last entry %s', c.balance, e.balance_after)
         FROM cards c JOIN ledger_entries e ON e.card_no = c.card_no AND e.sequence = c.sequence
         WHERE e.balance_after <> c.balance",
    ),
    (
        "balance within the card's limit",
        "SELECT 'card ' || c.card_no, format('balance %s, limit %s', c.balance, COALESCE(c.max_balance, p.max_balance))
         FROM cards c JOIN products p ON p.product_id = c.product_id
         WHERE c.balance < 0 OR c.balance > COALESCE(c.max_balance, p.max_balance)",
    ),
    (
        // `IS NOT TRUE`, not `NOT`: a side with no entries at all leaves its terms
        // NULL, and `NOT NULL` would let exactly the worst case through.
        "completed transfers have one debit and one credit of their amount",
        "SELECT 'transfer ' || t.transfer_id || ' (' || t.correlation_id || ')',
                format('status %s, amount %s, debits %s on %s, credits %s on %s', t.status, t.amount, d.n, d.card, c.n, c.card)
         FROM transfers t
         LEFT JOIN (SELECT transfer_id, count(*) n, sum(amount) amt, min(card_no) card FROM ledger_entries WHERE side = 'DEBIT' GROUP BY transfer_id) d
              ON d.transfer_id = t.transfer_id
         LEFT JOIN (SELECT transfer_id, count(*) n, sum(amount) amt, min(card_no) card FROM ledger_entries WHERE side = 'CREDIT' GROUP BY transfer_id) c
              ON c.transfer_id = t.transfer_id
         WHERE (t.status = 'COMPLETED' AND (d.n = 1 AND c.n = 1 AND d.amt = t.amount AND c.amt = t.amount
                                            AND d.card = t.from_card_no AND c.card = t.to_card_no) IS NOT TRUE)
            OR (t.status <> 'COMPLETED' AND (d.n IS NOT NULL OR c.n IS NOT NULL))",
    ),
    (
        // The table has no foreign keys (they cost the worker two row locks per
        // entry), so the audit checks what they would have.
        "every entry belongs to a stored transfer and card",
        "SELECT 'entry ' || e.entry_id, format('card %s, transfer %s', e.card_no, e.transfer_id)
         FROM ledger_entries e
         LEFT JOIN cards c ON c.card_no = e.card_no
         LEFT JOIN transfers t ON t.transfer_id = e.transfer_id
         WHERE c.card_no IS NULL OR t.transfer_id IS NULL",
    ),
];

pub async fn run(pool: &PgPool) -> Result<AuditReport, LedgerError> {
    let mut tx = pool.begin().await?;
    // One snapshot for every check, so a running system cannot make them disagree.
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY").execute(&mut *tx).await?;
    let counts = sqlx::query(
        "SELECT (SELECT count(*) FROM cards), (SELECT count(*) FROM transfers), (SELECT count(*) FROM ledger_entries)",
    )
    .fetch_one(&mut *tx)
    .await?;
    let mut report = AuditReport {
        cards: counts.try_get(0)?,
        transfers: counts.try_get(1)?,
        entries: counts.try_get(2)?,
        violations: Vec::new(),
    };
    for (rule, sql) in CHECKS {
        for row in sqlx::query(sql).fetch_all(&mut *tx).await? {
            report.violations.push(Violation { subject: row.try_get(0)?, rule, detail: row.try_get(1)? });
        }
    }
    tx.commit().await?;
    Ok(report)
}

/// The sum of all card balances, for conservation checks.
pub async fn total_balance(pool: &PgPool) -> Result<rust_decimal::Decimal, LedgerError> {
    Ok(sqlx::query_scalar("SELECT COALESCE(sum(balance), 0) FROM cards").fetch_one(pool).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_logged_violation_shows_only_the_cards_last_four_digits() {
        let v = |subject: &str| Violation { subject: subject.into(), rule: "r", detail: "d".into() };
        assert_eq!(v("card 9410000000000001").masked_subject(), "card ************0001");
        assert_eq!(v("transfer 0193").masked_subject(), "transfer 0193");
    }
}
