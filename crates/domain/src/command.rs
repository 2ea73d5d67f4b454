//! What travels on Kafka: the transfer command, its result, and the events
//! downstream consumers build on. Every message carries a schema version so that
//! consumers can refuse what they do not understand instead of misreading it.
//! Amounts travel as decimal strings: no consumer has to trust a float.

use crate::{AspId, CardNo, CorrelationId, Money, ResultCode, TransferRequest, UserId};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

pub const SCHEMA_VERSION: u32 = 1;

/// Where the gateway that waits for a result reads: one partition of the results
/// topic, owned by that gateway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplyAddress {
    pub topic: String,
    pub partition: i32,
}

/// A request to move balance, as the gateway publishes it (key: [`TransferCommand::key`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TransferCommand {
    pub schema_version: u32,
    pub asp_id: AspId,
    pub correlation_id: CorrelationId,
    pub request: TransferRequest,
    /// `TransferRequest::fingerprint`, so a reused correlation id can be told apart.
    pub fingerprint: String,
    pub reply_to: ReplyAddress,
    /// Whether a gateway waits for the reply. A request sent with `Prefer:
    /// respond-async` is answered `202` at once and its result read by status
    /// query, so its command asks for no reply: one message less per transfer on
    /// the broker and in the outbox. Absent (a gateway older than the field) means
    /// a reply is wanted.
    #[serde(default = "reply_awaited")]
    pub awaits_reply: bool,
    pub submitted_at: DateTime<Utc>,
}

fn reply_awaited() -> bool {
    true
}

impl TransferCommand {
    /// The command's Kafka key: the member's user id. A transfer moves money
    /// between two cards of one member (the rules reject any other), so every
    /// command that can touch a card shares its partition, and workers that own
    /// different partitions lock different cards. Keyed by the from card, a
    /// member's cards were spread over several partitions and two transactions in
    /// flight kept waiting for each other's card locks.
    pub fn key(&self) -> String {
        self.request.user_id.to_string()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TransferOutcome {
    Completed,
    Rejected,
}

/// The answer to one command (key: correlation id), sent to the command's reply
/// address. A repeated command gets the stored result of the first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TransferResult {
    pub schema_version: u32,
    pub asp_id: AspId,
    pub correlation_id: CorrelationId,
    /// The transfer this result decided; absent for `000_008`, which decides nothing.
    pub transfer_id: Option<Uuid>,
    pub outcome: TransferOutcome,
    pub code: String,
    pub message: String,
    /// The amount moved; present on success only.
    pub amount: Option<Money>,
    pub decided_at: DateTime<Utc>,
    /// On a reply, the fingerprint of the command it answers. Two requests under one
    /// correlation id with different bodies (a client reusing an id) can wait on the
    /// same gateway at once; the fingerprint lets each be handed only its own
    /// answer, the owner its result and the other its `000_008`. Absent on a reply
    /// from a worker older than the field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_fingerprint: Option<String>,
}

impl TransferResult {
    pub fn result_code(&self) -> ResultCode {
        ResultCode::from_code(&self.code).unwrap_or(ResultCode::TransferFailed)
    }
}

/// One balance change of one card (topic `card.balance`, key: card number). The
/// per-card `sequence` has no gaps, so a consumer can detect a lost or repeated
/// event; `eventId` is stable across replays.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct BalanceEvent {
    pub schema_version: u32,
    pub event_id: Uuid,
    #[serde(rename = "type")]
    pub event_type: String,
    pub occurred_at: DateTime<Utc>,
    pub card_no: CardNo,
    pub user_id: UserId,
    pub transfer_id: Uuid,
    pub correlation_id: CorrelationId,
    #[serde(with = "rust_decimal::serde::str")]
    pub delta: Decimal,
    pub balance_after: Money,
    pub sequence: i64,
}

pub const BALANCE_CHANGED: &str = "card.balance.changed";

/// A transfer that completed or was rejected (topic `transfer.events`, key:
/// `fromCardNo`), for audit and analytics.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TransferEvent {
    pub schema_version: u32,
    pub event_id: Uuid,
    #[serde(rename = "type")]
    pub event_type: String,
    pub occurred_at: DateTime<Utc>,
    pub transfer_id: Uuid,
    pub asp_id: AspId,
    pub correlation_id: CorrelationId,
    pub user_id: UserId,
    pub from_card_no: CardNo,
    pub to_card_no: CardNo,
    pub requested_amount: Option<Money>,
    pub amount: Option<Money>,
    pub code: String,
    pub message: String,
}

pub const TRANSFER_COMPLETED: &str = "transfer.completed";
pub const TRANSFER_REJECTED: &str = "transfer.rejected";

#[cfg(test)]
mod tests {
    use super::*;

    fn command(user_id: u64, from: &str, to: &str) -> TransferCommand {
        TransferCommand {
            schema_version: SCHEMA_VERSION,
            asp_id: AspId::parse("DEMOASP00000001").unwrap(),
            correlation_id: CorrelationId::parse("261124153000-00000a1").unwrap(),
            request: TransferRequest {
                user_id: UserId::new(user_id).unwrap(),
                from_card_no: CardNo::parse(from).unwrap(),
                to_card_no: CardNo::parse(to).unwrap(),
                amount: Some(Money::from_units(1)),
            },
            fingerprint: "f".into(),
            reply_to: ReplyAddress { topic: "transfer.results".into(), partition: 0 },
            awaits_reply: true,
            submitted_at: Utc::now(),
        }
    }

    #[test]
    fn a_command_round_trips_through_json_with_the_largest_user_id() {
        let mut cmd = command(UserId::MAX, "9410000000000001", "9410000000000002");
        cmd.request.amount = Some(Money::from_units(999_999_999_999));
        cmd.reply_to.partition = 3;
        cmd.awaits_reply = false;
        let json = serde_json::to_string(&cmd).unwrap();
        assert!(json.contains("9999999999999999999"));
        assert!(json.contains("\"999999999999\""), "amounts travel as strings: {json}");
        let back: TransferCommand = serde_json::from_str(&json).unwrap();
        assert_eq!(back, cmd);
    }

    #[test]
    fn a_command_is_keyed_by_its_member() {
        assert_eq!(command(UserId::MAX, "9410000000000001", "9410000000000002").key(), "9999999999999999999");
    }

    #[test]
    fn commands_of_one_member_share_a_key_whichever_cards_they_name() {
        let debit = command(1001, "9410000000000001", "9410000000000002");
        let credit = command(1001, "9410000000000002", "9410000000000001");
        assert_eq!(debit.key(), credit.key());
    }

    #[test]
    fn a_command_that_does_not_say_whether_a_reply_is_awaited_gets_one() {
        let json = r#"{"schemaVersion":1,"aspId":"DEMOASP00000001","correlationId":"261124153000-00000a1",
          "request":{"userId":1,"fromCardNo":"9410000000000001","toCardNo":"9410000000000002","amount":null},
          "fingerprint":"f","replyTo":{"topic":"t","partition":0},"submittedAt":"2026-11-24T00:00:00Z"}"#;
        assert!(serde_json::from_str::<TransferCommand>(json).unwrap().awaits_reply);
    }

    #[test]
    fn a_command_with_a_bad_card_number_does_not_decode() {
        let json = r#"{"schemaVersion":1,"aspId":"DEMOASP00000001","correlationId":"261124153000-00000a1",
          "request":{"userId":1,"fromCardNo":"12","toCardNo":"9410000000000002","amount":null},
          "fingerprint":"f","replyTo":{"topic":"t","partition":0},"submittedAt":"2026-11-24T00:00:00Z"}"#;
        assert!(serde_json::from_str::<TransferCommand>(json).is_err());
    }
}
