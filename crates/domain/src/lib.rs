//! The language of cardflow: card numbers, members, money, correlation ids, the
//! result-code table, transfer commands and events, and the rules that decide a
//! transfer.
//!
//! Everything here is a function of values. This crate must never touch Kafka,
//! Postgres, HTTP or the clock: callers pass "today" and the cards they loaded, so
//! every rule can be tested exhaustively without a running system. Types parse at
//! the edge (`CardNo::parse`, `UserId::parse`, ...) and are valid once built.

pub mod card;
pub mod command;
pub mod ids;
pub mod money;
pub mod request;
pub mod result_code;
pub mod rules;
pub mod time_zone;

pub use card::{CardNo, CardStatus, ProductKind};
pub use command::{BalanceEvent, ReplyAddress, TransferCommand, TransferEvent, TransferOutcome, TransferResult};
pub use ids::{AccessKey, AffiliateId, AspId, CorrelationId, CryptoKeyId, TranToken, UserId};
pub use money::Money;
pub use request::{RequestError, TransferRequest};
pub use result_code::ResultCode;
pub use rules::{decide, CardView, Decision, TransferContext};
pub use time_zone::{parse_wall_clock, ClientTimeZone};
