//! Applying a batch of transfer commands in ONE transaction.
//!
//! 1. Read the transfers already stored under the batch's `(asp_id,
//!    correlation_id)` keys: those commands are repeats and get the stored result.
//! 2. Lock every card the new commands touch, in card-number order, so that two
//!    workers never wait on each other in a cycle.
//! 3. Decide and apply the commands in offset order in memory: a later command sees
//!    the balances the earlier ones left.
//! 4. Write the decided transfers (in key order), the cards and the ledger entries
//!    in one statement, then the batch's one outbox row, and commit.
//!
//! The caller commits Kafka offsets only after this returns, so a crash anywhere
//! repeats the batch; a repeated command finds its stored transfer and moves no
//! money. Two workers can hold the same key only while a partition moves between
//! them: the second one's insert then meets the unique key, the batch fails with
//! [`LedgerError::KeyTaken`] and its retry reads the first one's result. A transfer
//! row is written once, decided: an earlier version claimed keys with a PENDING row
//! and updated it, which `make bench` showed as a second write per transfer.

use crate::outbox::{Announcement, EventHeaders};
use crate::transfers::StoredTransfer;
use crate::LedgerError;
use cardflow_domain::command::{BALANCE_CHANGED, SCHEMA_VERSION, TRANSFER_COMPLETED, TRANSFER_REJECTED};
use cardflow_domain::rules::{apply, Posting};
use cardflow_domain::{
    AffiliateId, BalanceEvent, CardNo, CardStatus, CardView, Decision, Money, ProductKind, ResultCode, TransferCommand,
    TransferContext, TransferEvent, TransferOutcome, TransferResult, UserId,
};
use chrono::{DateTime, NaiveDate, SubsecRound, Utc};
use rust_decimal::Decimal;
use sqlx::{PgPool, Postgres, Row, Transaction};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;
use tracing::Instrument;
use uuid::Uuid;

/// Where the outbox sends what a batch announces. The physical topic names come
/// from the worker's configuration; the ledger only stores them.
#[derive(Debug, Clone)]
pub struct OutboxTopics {
    pub card_balance: String,
    pub transfer_events: String,
}

/// A command as the worker polled it, with the trace context it arrived with.
#[derive(Debug, Clone)]
pub struct IncomingCommand {
    pub command: TransferCommand,
    pub traceparent: Option<String>,
}

/// What became of each command of a batch, in offset order.
#[derive(Debug, Default)]
pub struct BatchReport {
    /// One per command, but for those in `unrecorded`.
    pub results: Vec<AppliedResult>,
    /// True when the batch transaction failed and its commands were applied one
    /// at a time instead.
    pub split: bool,
    /// Commands (by batch position) that failed and whose `017_002` could not be
    /// stored either, with the error: the ledger holds nothing of them, so the
    /// caller must keep them elsewhere (the dead-letter topic) before it moves on.
    pub unrecorded: Vec<(usize, String)>,
}

#[derive(Debug, Clone)]
pub struct AppliedResult {
    pub result: TransferResult,
    /// True when the request had been seen before (a redelivery or a retry).
    pub repeat: bool,
}

type Key = (String, String);

fn key_of(c: &TransferCommand) -> Key {
    (c.asp_id.to_string(), c.correlation_id.to_string())
}

/// What a message of a batch announces. Kept as a value until the batch's outbox
/// row is serialized, off the transaction's path (see [`apply_batch`]).
#[derive(Debug, Clone, serde::Serialize)]
#[serde(untagged)]
enum Announced {
    Reply(TransferResult),
    Transfer(TransferEvent),
    Balance(BalanceEvent),
}

fn headers(traceparent: &Option<String>) -> EventHeaders {
    EventHeaders { traceparent: traceparent.clone() }
}

/// The reply to the waiting gateway; none when no gateway waits.
fn reply(incoming: &IncomingCommand, result: &TransferResult) -> Option<Announcement<Announced>> {
    if !incoming.command.awaits_reply {
        return None;
    }
    let reply = &incoming.command.reply_to;
    Some(Announcement {
        topic: reply.topic.clone(),
        partition: Some(reply.partition),
        key: incoming.command.correlation_id.to_string(),
        headers: headers(&incoming.traceparent),
        payload: Announced::Reply(TransferResult {
            request_fingerprint: Some(incoming.command.fingerprint.clone()),
            ..result.clone()
        }),
    })
}

fn rejection(
    cmd: &TransferCommand,
    transfer_id: Uuid,
    code: ResultCode,
    field: Option<&str>,
    now: DateTime<Utc>,
) -> TransferResult {
    TransferResult {
        schema_version: SCHEMA_VERSION,
        asp_id: cmd.asp_id.clone(),
        correlation_id: cmd.correlation_id.clone(),
        transfer_id: Some(transfer_id),
        outcome: TransferOutcome::Rejected,
        code: code.code().to_string(),
        message: code.message_with(field),
        amount: None,
        decided_at: now,
        request_fingerprint: None,
    }
}

/// The answer to a command whose key another request owns: the owner's result,
/// addressed to this command, when it is the same request; `000_008` otherwise.
fn answer_from(
    cmd: &TransferCommand,
    owner_fingerprint: &str,
    owner_result: &TransferResult,
    now: DateTime<Utc>,
) -> TransferResult {
    if owner_fingerprint == cmd.fingerprint {
        TransferResult {
            asp_id: cmd.asp_id.clone(),
            correlation_id: cmd.correlation_id.clone(),
            ..owner_result.clone()
        }
    } else {
        let mut r = rejection(cmd, Uuid::nil(), ResultCode::CorrelationIdReused, None, now);
        r.transfer_id = None;
        r
    }
}

fn answer_repeat(cmd: &TransferCommand, stored: &StoredTransfer) -> TransferResult {
    answer_from(cmd, &stored.fingerprint, &stored.result(cmd), Utc::now())
}

/// Decides one new request against the locked cards and gathers its writes.
#[allow(clippy::too_many_arguments)]
fn decide_one(
    index: usize,
    incoming: &IncomingCommand,
    transfer_id: Uuid,
    cards: &mut BTreeMap<CardNo, CardView>,
    affiliates: &HashMap<String, AffiliateId>,
    today: NaiveDate,
    now: DateTime<Utc>,
    topics: &OutboxTopics,
    writes: &mut Writes,
) -> TransferResult {
    let cmd = &incoming.command;
    let ctx = TransferContext { caller_affiliate: affiliates.get(cmd.asp_id.as_str()).cloned(), today };
    let req = &cmd.request;
    let decision = cardflow_domain::decide(req, cards.get(&req.from_card_no), cards.get(&req.to_card_no), &ctx);
    let result = match decision {
        Decision::Reject { code, field } => rejection(cmd, transfer_id, code, field, now),
        Decision::Apply { amount } => {
            let mut from = cards.remove(&req.from_card_no).expect("decided cards are loaded");
            let mut to = cards.remove(&req.to_card_no).expect("decided cards are loaded");
            let (debit, credit) = apply(&mut from, &mut to, amount);
            cards.insert(from.card_no.clone(), from);
            cards.insert(to.card_no.clone(), to);
            writes.posting(incoming, transfer_id, debit, now, topics);
            writes.posting(incoming, transfer_id, credit, now, topics);
            TransferResult {
                schema_version: SCHEMA_VERSION,
                asp_id: cmd.asp_id.clone(),
                correlation_id: cmd.correlation_id.clone(),
                transfer_id: Some(transfer_id),
                outcome: TransferOutcome::Completed,
                code: ResultCode::Success.code().to_string(),
                message: ResultCode::Success.message().to_string(),
                amount: Some(amount),
                decided_at: now,
                request_fingerprint: None,
            }
        }
    };
    writes.decided(index, incoming, &result, topics);
    result
}

fn transfer_event(cmd: &TransferCommand, result: &TransferResult) -> TransferEvent {
    TransferEvent {
        schema_version: SCHEMA_VERSION,
        event_id: result.transfer_id.expect("decided transfers have an id"),
        event_type: match result.outcome {
            TransferOutcome::Completed => TRANSFER_COMPLETED,
            TransferOutcome::Rejected => TRANSFER_REJECTED,
        }
        .to_string(),
        occurred_at: result.decided_at,
        transfer_id: result.transfer_id.expect("decided transfers have an id"),
        asp_id: cmd.asp_id.clone(),
        correlation_id: cmd.correlation_id.clone(),
        user_id: cmd.request.user_id,
        from_card_no: cmd.request.from_card_no.clone(),
        to_card_no: cmd.request.to_card_no.clone(),
        requested_amount: cmd.request.amount,
        amount: result.amount,
        code: result.code.clone(),
        message: result.message.clone(),
    }
}

/// Everything a batch will write, gathered in memory first.
#[derive(Default)]
struct Writes {
    entries: Vec<(Uuid, Uuid, Posting)>,
    /// New transfers: the batch position of the command and its result.
    decided: Vec<(usize, TransferResult)>,
    outbox: Vec<Announcement<Announced>>,
}

impl Writes {
    fn decided(&mut self, index: usize, incoming: &IncomingCommand, result: &TransferResult, topics: &OutboxTopics) {
        self.outbox.push(Announcement {
            topic: topics.transfer_events.clone(),
            partition: None,
            key: incoming.command.request.from_card_no.to_string(),
            headers: headers(&incoming.traceparent),
            payload: Announced::Transfer(transfer_event(&incoming.command, result)),
        });
        self.decided.push((index, result.clone()));
    }

    fn posting(
        &mut self,
        incoming: &IncomingCommand,
        transfer_id: Uuid,
        posting: Posting,
        now: DateTime<Utc>,
        topics: &OutboxTopics,
    ) {
        let entry_id = Uuid::now_v7();
        let event = BalanceEvent {
            schema_version: SCHEMA_VERSION,
            event_id: entry_id,
            event_type: BALANCE_CHANGED.to_string(),
            occurred_at: now,
            card_no: posting.card_no.clone(),
            user_id: posting.user_id,
            transfer_id,
            correlation_id: incoming.command.correlation_id.clone(),
            delta: posting.delta,
            balance_after: posting.balance_after,
            sequence: posting.sequence,
        };
        self.outbox.push(Announcement {
            topic: topics.card_balance.clone(),
            partition: None,
            key: posting.card_no.to_string(),
            headers: headers(&incoming.traceparent),
            payload: Announced::Balance(event),
        });
        self.entries.push((entry_id, transfer_id, posting));
    }
}

/// A span for one statement of the batch transaction, a child of the batch span.
fn db_span(operation: &'static str) -> tracing::Span {
    tracing::info_span!("db", otel.name = operation, otel.kind = "client", db.system.name = "postgresql")
}

/// Applies one batch in one transaction. See the module documentation.
pub async fn apply_batch(
    pool: &PgPool,
    batch: &[IncomingCommand],
    topics: &OutboxTopics,
    today: NaiveDate,
) -> Result<BatchReport, LedgerError> {
    let mut tx = pool.begin().await?;
    // Microseconds, as Postgres stores them: replayed events must equal the originals.
    let now = Utc::now().trunc_subsecs(6);

    // 1. Within the batch the first occurrence of a key is the request; later ones
    //    are repeats of it. A key stored before is a repeat everywhere in the batch.
    let mut first: HashMap<Key, usize> = HashMap::new();
    for (i, c) in batch.iter().enumerate() {
        first.entry(key_of(&c.command)).or_insert(i);
    }
    let keys: Vec<Key> = first.keys().cloned().collect();
    let stored = crate::transfers::find_many(&mut *tx, &keys).instrument(db_span("read repeats")).await?;

    // 2. Lock the cards of the new requests, in card-number order.
    let mut card_nos: Vec<String> = Vec::new();
    for (k, i) in &first {
        if !stored.contains_key(k) {
            let r = &batch[*i].command.request;
            card_nos.push(r.from_card_no.to_string());
            card_nos.push(r.to_card_no.to_string());
        }
    }
    card_nos.sort();
    card_nos.dedup();
    let asp_ids: Vec<String> = first.keys().map(|(asp, _)| asp.clone()).collect::<HashSet<_>>().into_iter().collect();
    let (mut cards, affiliates) =
        lock_cards(&mut tx, &card_nos, &asp_ids).instrument(db_span("lock cards and read callers")).await?;
    let original_sequences: HashMap<CardNo, i64> = cards.iter().map(|(k, v)| (k.clone(), v.sequence)).collect();

    // 3. Decide in offset order. `owners` holds, per key, the fingerprint of the
    //    request that owns it and that request's result; every other occurrence of
    //    the key is answered from it.
    let mut writes = Writes::default();
    let mut owners: HashMap<Key, (String, TransferResult)> =
        stored.iter().map(|(k, s)| (k.clone(), (s.fingerprint.clone(), s.result(&batch[first[k]].command)))).collect();
    let mut report = BatchReport::default();
    for (i, incoming) in batch.iter().enumerate() {
        let cmd = &incoming.command;
        let key = key_of(cmd);
        let decides = first[&key] == i && !stored.contains_key(&key);
        let (result, repeat) = if decides {
            let result =
                decide_one(i, incoming, Uuid::now_v7(), &mut cards, &affiliates, today, now, topics, &mut writes);
            owners.insert(key, (cmd.fingerprint.clone(), result.clone()));
            (result, false)
        } else {
            let (fingerprint, owner_result) = owners
                .get(&key)
                .ok_or_else(|| LedgerError::Corrupt(format!("owner of {} vanished", cmd.correlation_id)))?;
            (answer_from(cmd, fingerprint, owner_result, now), true)
        };
        writes.outbox.extend(reply(incoming, &result));
        report.results.push(AppliedResult { result, repeat });
    }

    // 4. Set-based writes: transfers, cards and ledger entries in one statement
    //    (no foreign keys order them), then the outbox row. That row (megabytes of
    //    JSON for a large batch) is serialized on a blocking thread meanwhile, so
    //    that this CPU work overlaps Postgres's instead of holding the cards' locks
    //    longer: `make bench` showed the worker and its backend taking turns, each
    //    idle while the other worked.
    let announcements = std::mem::take(&mut writes.outbox);
    let outbox_row = tokio::task::spawn_blocking(move || crate::outbox::prepare(&announcements));
    let touched: Vec<&CardView> =
        cards.values().filter(|c| original_sequences.get(&c.card_no) != Some(&c.sequence)).collect();
    write_decisions(&mut tx, batch, &mut writes.decided, &touched, &writes.entries, now)
        .instrument(db_span("write transfers, cards and ledger entries"))
        .await?;
    let outbox_row = outbox_row.await.map_err(|e| LedgerError::OutboxRow(e.to_string()))?;
    crate::outbox::insert(&mut tx, outbox_row).instrument(db_span("write outbox")).await?;
    tx.commit().instrument(db_span("commit")).await?;
    Ok(report)
}

/// Writes a batch's decisions in one statement, one round trip instead of three:
/// the decided transfers in key order (two workers inserting the same keys then
/// wait on each other in one order, never in a cycle), the cards they moved and
/// their ledger entries. A key someone else stored since step 1 fails the batch
/// with [`LedgerError::KeyTaken`], so that its retry answers it as a repeat; the
/// statement's other writes go with the rolled-back transaction. At a few commands
/// a batch (sync load) the round trips were most of a batch's time, and a batch
/// that takes longer keeps the commands behind it waiting.
async fn write_decisions(
    tx: &mut Transaction<'_, Postgres>,
    batch: &[IncomingCommand],
    decided: &mut [(usize, TransferResult)],
    cards: &[&CardView],
    entries: &[(Uuid, Uuid, Posting)],
    now: DateTime<Utc>,
) -> Result<(), LedgerError> {
    if decided.is_empty() && cards.is_empty() && entries.is_empty() {
        return Ok(());
    }
    let key = |i: usize| (batch[i].command.asp_id.as_str(), batch[i].command.correlation_id.as_str());
    decided.sort_by(|a, b| key(a.0).cmp(&key(b.0)));
    let commands = || decided.iter().map(|(i, _)| &batch[*i].command);
    let results = || decided.iter().map(|(_, r)| r);
    let ids: Vec<Uuid> = results().map(|r| r.transfer_id.expect("decided transfers have an id")).collect();
    let asp: Vec<&str> = commands().map(|c| c.asp_id.as_str()).collect();
    let corr: Vec<&str> = commands().map(|c| c.correlation_id.as_str()).collect();
    let fp: Vec<&str> = commands().map(|c| c.fingerprint.as_str()).collect();
    let user: Vec<Decimal> = commands().map(|c| Decimal::from(c.request.user_id.get())).collect();
    let from: Vec<String> = commands().map(|c| c.request.from_card_no.to_string()).collect();
    let to: Vec<String> = commands().map(|c| c.request.to_card_no.to_string()).collect();
    let requested: Vec<Option<Decimal>> = commands().map(|c| c.request.amount.map(Money::get)).collect();
    let submitted: Vec<DateTime<Utc>> = commands().map(|c| c.submitted_at).collect();
    let status: Vec<&str> = results()
        .map(|r| match r.outcome {
            TransferOutcome::Completed => "COMPLETED",
            TransferOutcome::Rejected => "REJECTED",
        })
        .collect();
    let code: Vec<&str> = results().map(|r| r.code.as_str()).collect();
    let message: Vec<&str> = results().map(|r| r.message.as_str()).collect();
    let amount: Vec<Option<Decimal>> = results().map(|r| r.amount.map(Money::get)).collect();
    let at: Vec<DateTime<Utc>> = results().map(|r| r.decided_at).collect();

    let card_nos: Vec<String> = cards.iter().map(|c| c.card_no.to_string()).collect();
    let balances: Vec<Decimal> = cards.iter().map(|c| c.balance.get()).collect();
    let loaded: Vec<Decimal> = cards.iter().map(|c| c.total_loaded.get()).collect();
    let card_seqs: Vec<i64> = cards.iter().map(|c| c.sequence).collect();

    let entry_ids: Vec<Uuid> = entries.iter().map(|e| e.0).collect();
    let entry_transfers: Vec<Uuid> = entries.iter().map(|e| e.1).collect();
    let entry_cards: Vec<String> = entries.iter().map(|e| e.2.card_no.to_string()).collect();
    let entry_users: Vec<Decimal> = entries.iter().map(|e| Decimal::from(e.2.user_id.get())).collect();
    let sides: Vec<&str> =
        entries.iter().map(|e| if e.2.delta.is_sign_negative() { "DEBIT" } else { "CREDIT" }).collect();
    let entry_amounts: Vec<Decimal> = entries.iter().map(|e| e.2.delta.abs()).collect();
    let after: Vec<Decimal> = entries.iter().map(|e| e.2.balance_after.get()).collect();
    let entry_seqs: Vec<i64> = entries.iter().map(|e| e.2.sequence).collect();

    // Data-modifying CTEs all run, referenced or not, on one snapshot; none of the
    // three reads what another writes.
    let inserted: i64 = sqlx::query_scalar(
        "WITH new_transfers AS (
             INSERT INTO transfers (transfer_id, asp_id, correlation_id, fingerprint, user_id, from_card_no, to_card_no,
                                    requested_amount, submitted_at, status, result_code, result_message, amount, decided_at)
             SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::numeric[], $6::text[], $7::text[],
                                  $8::numeric[], $9::timestamptz[], $10::text[], $11::text[], $12::text[], $13::numeric[],
                                  $14::timestamptz[])
             ON CONFLICT (asp_id, correlation_id) DO NOTHING
             RETURNING 1
         ), moved_cards AS (
             UPDATE cards c SET balance = v.balance, total_loaded = v.total_loaded, sequence = v.sequence, updated_at = now()
             FROM unnest($15::text[], $16::numeric[], $17::numeric[], $18::bigint[]) AS v(card_no, balance, total_loaded, sequence)
             WHERE c.card_no = v.card_no
         ), new_entries AS (
             INSERT INTO ledger_entries (entry_id, transfer_id, card_no, user_id, side, amount, balance_after, sequence, created_at)
             SELECT *, $27 FROM unnest($19::uuid[], $20::uuid[], $21::text[], $22::numeric[], $23::text[], $24::numeric[],
                                       $25::numeric[], $26::bigint[])
         )
         SELECT count(*) FROM new_transfers",
    )
    .bind(&ids)
    .bind(&asp)
    .bind(&corr)
    .bind(&fp)
    .bind(&user)
    .bind(&from)
    .bind(&to)
    .bind(&requested)
    .bind(&submitted)
    .bind(&status)
    .bind(&code)
    .bind(&message)
    .bind(&amount)
    .bind(&at)
    .bind(&card_nos)
    .bind(&balances)
    .bind(&loaded)
    .bind(&card_seqs)
    .bind(&entry_ids)
    .bind(&entry_transfers)
    .bind(&entry_cards)
    .bind(&entry_users)
    .bind(&sides)
    .bind(&entry_amounts)
    .bind(&after)
    .bind(&entry_seqs)
    .bind(now)
    .fetch_one(&mut **tx)
    .await?;
    let wanted = decided.len() as u64;
    let inserted = inserted as u64;
    if inserted != wanted {
        return Err(LedgerError::KeyTaken { taken: wanted - inserted });
    }
    Ok(())
}

/// Loads and locks cards with what the rules need of their products and owners,
/// and reads the callers' affiliates in the same statement: one round trip fewer
/// in every batch, which at a few commands a batch (sync load) is a round trip of
/// about seven. `ORDER BY` before `FOR UPDATE` makes Postgres lock in card-number
/// order; `MATERIALIZED` keeps the locking query as written.
pub(crate) async fn lock_cards(
    tx: &mut Transaction<'_, Postgres>,
    card_nos: &[String],
    asp_ids: &[String],
) -> Result<(BTreeMap<CardNo, CardView>, HashMap<String, AffiliateId>), LedgerError> {
    if card_nos.is_empty() {
        return Ok((BTreeMap::new(), HashMap::new()));
    }
    // The callers' row always comes back, cards or none: the rules need the
    // caller's affiliate to answer a transfer between unknown cards too.
    let rows = sqlx::query(
        "WITH locked AS MATERIALIZED (
             SELECT c.card_no, c.user_id::text AS user_id, c.status, c.expires_on, c.balance, c.total_loaded,
                    COALESCE(c.max_balance, p.max_balance) AS max_balance, p.kind, p.owner_affiliate_id,
                    (a.affiliate_id IS NOT NULL) AS owner_exists, p.collection_allowed, p.min_usage_rate, c.sequence
             FROM cards c
             JOIN products p ON p.product_id = c.product_id
             LEFT JOIN affiliates a ON a.affiliate_id = p.owner_affiliate_id
             WHERE c.card_no = ANY($1)
             ORDER BY c.card_no
             FOR UPDATE OF c
         ), callers AS (
             SELECT array_agg(asp_id) AS asp_ids, array_agg(affiliate_id) AS affiliate_ids
             FROM asps WHERE asp_id = ANY($2)
         )
         SELECT callers.asp_ids, callers.affiliate_ids, locked.*
         FROM callers LEFT JOIN locked ON true
         ORDER BY locked.card_no",
    )
    .bind(card_nos)
    .bind(asp_ids)
    .fetch_all(&mut **tx)
    .await?;
    let mut cards = BTreeMap::new();
    let mut affiliates = HashMap::new();
    for (i, row) in rows.iter().enumerate() {
        if i == 0 {
            let asp_ids: Option<Vec<String>> = row.try_get("asp_ids")?;
            let affiliate_ids: Option<Vec<String>> = row.try_get("affiliate_ids")?;
            let pairs = asp_ids.unwrap_or_default().into_iter().zip(affiliate_ids.unwrap_or_default());
            affiliates = pairs.map(|(asp, affiliate)| (asp, AffiliateId(affiliate))).collect();
        }
        if row.try_get::<Option<String>, _>("card_no")?.is_some() {
            let card = card_view(row)?;
            cards.insert(card.card_no.clone(), card);
        }
    }
    Ok((cards, affiliates))
}

fn corrupt(what: impl std::fmt::Display) -> LedgerError {
    LedgerError::Corrupt(what.to_string())
}

fn money(row: &sqlx::postgres::PgRow, col: &str) -> Result<Money, LedgerError> {
    Money::new(row.try_get::<Decimal, _>(col)?).map_err(|e| corrupt(format!("{col}: {e}")))
}

fn card_view(row: &sqlx::postgres::PgRow) -> Result<CardView, LedgerError> {
    let card_no: String = row.try_get("card_no")?;
    let user_id: String = row.try_get("user_id")?;
    let status: String = row.try_get("status")?;
    let kind: String = row.try_get("kind")?;
    Ok(CardView {
        card_no: CardNo::parse(&card_no).map_err(corrupt)?,
        user_id: user_id.parse::<u64>().ok().and_then(|u| UserId::new(u).ok()).ok_or_else(|| corrupt("user_id"))?,
        status: status.parse::<CardStatus>().map_err(corrupt)?,
        expires_on: row.try_get("expires_on")?,
        balance: money(row, "balance")?,
        total_loaded: money(row, "total_loaded")?,
        max_balance: money(row, "max_balance")?,
        kind: kind.parse::<ProductKind>().map_err(corrupt)?,
        owner_affiliate: AffiliateId(row.try_get("owner_affiliate_id")?),
        owner_affiliate_exists: row.try_get("owner_exists")?,
        collection_allowed: row.try_get("collection_allowed")?,
        min_usage_rate: row.try_get("min_usage_rate")?,
        sequence: row.try_get("sequence")?,
    })
}

/// Records a command that could not be applied for a reason that is not the
/// caller's as `017_002`, in its own transaction, and queues its answer. A repeat
/// of an already decided request gets the stored result instead.
pub async fn record_failure(
    pool: &PgPool,
    incoming: &IncomingCommand,
    topics: &OutboxTopics,
) -> Result<AppliedResult, LedgerError> {
    let cmd = &incoming.command;
    let key = key_of(cmd);
    let mut tx = pool.begin().await?;
    let stored = crate::transfers::find_many(&mut *tx, std::slice::from_ref(&key)).await?;
    let mut writes = Writes::default();
    let applied = match stored.get(&key) {
        Some(s) => AppliedResult { result: answer_repeat(cmd, s), repeat: true },
        None => {
            let now = Utc::now().trunc_subsecs(6);
            let result = rejection(cmd, Uuid::now_v7(), ResultCode::TransferFailed, None, now);
            writes.decided(0, incoming, &result, topics);
            write_decisions(&mut tx, std::slice::from_ref(incoming), &mut writes.decided, &[], &[], now).await?;
            AppliedResult { result, repeat: false }
        }
    };
    writes.outbox.extend(reply(incoming, &applied.result));
    crate::outbox::insert(&mut tx, crate::outbox::prepare(&writes.outbox)).await?;
    tx.commit().await?;
    Ok(applied)
}

/// How hard to try before a command is answered `017_002`.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { attempts: 3, backoff: Duration::from_millis(50) }
    }
}

async fn with_retries<T, F, Fut>(policy: RetryPolicy, mut f: F) -> Result<T, LedgerError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, LedgerError>>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) if attempt < policy.attempts => {
                tracing::warn!(error = %e, attempt, "batch attempt failed; retrying");
                tokio::time::sleep(policy.backoff * attempt).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Applies a batch, retrying it whole; if it keeps failing, applies its commands
/// one at a time so that one bad command cannot hold up the others, and records a
/// command that still fails for good as `017_002`. A temporary failure (a lost
/// connection, a deadlock) makes this return an error instead, also for a single
/// command: `017_002` is final, and a transfer that would succeed a second later
/// must not be refused for ever. After an error the caller must not commit the
/// offsets; the commands already committed are repeats when the batch comes again.
pub async fn apply_resilient(
    pool: &PgPool,
    batch: &[IncomingCommand],
    topics: &OutboxTopics,
    today: NaiveDate,
    policy: RetryPolicy,
) -> Result<BatchReport, LedgerError> {
    let whole = with_retries(policy, || apply_batch(pool, batch, topics, today)).await;
    let err = match whole {
        Ok(report) => return Ok(report),
        Err(e) => e,
    };
    if err.is_transient() && !crate::ping(pool).await {
        return Err(err);
    }
    tracing::error!(error = %err, size = batch.len(), "batch failed; applying its commands one at a time");
    let mut report = BatchReport { split: true, ..BatchReport::default() };
    for (index, incoming) in batch.iter().enumerate() {
        let single = std::slice::from_ref(incoming);
        let error = match with_retries(policy, || apply_batch(pool, single, topics, today)).await {
            Ok(mut r) => {
                report.results.append(&mut r.results);
                continue;
            }
            Err(e) if e.is_transient() => return Err(e),
            Err(e) => e,
        };
        tracing::error!(error = %error, correlation_id = %incoming.command.correlation_id, "command failed; answering 017_002");
        match with_retries(policy, || record_failure(pool, incoming, topics)).await {
            Ok(r) => report.results.push(r),
            Err(e) if e.is_transient() => return Err(e),
            Err(e) => {
                tracing::error!(error = %e, correlation_id = %incoming.command.correlation_id, "017_002 could not be stored either");
                report.unrecorded.push((index, format!("{error}; its 017_002 could not be stored: {e}")));
            }
        }
    }
    Ok(report)
}
