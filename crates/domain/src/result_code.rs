//! The one table of result codes. The HTTP layer, the worker, the README and the
//! OpenAPI document all read from here, so a code can never mean two things.

use serde::{Deserialize, Serialize};

/// Every answer cardflow gives, with its HTTP status and message.
///
/// The first block is the spec's; the second block names the spec's test-data cases
/// that the spec gives no code for, and the errors every real API needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ResultCode {
    Success,
    MissingRequiredValue,
    CollectionBalanceZero,
    InsufficientBalance,
    BalanceOverMax,
    TransferFailed,
    SameCard,
    AffiliateMismatch,
    CollectionNotAllowed,
    OwnerAffiliateNotFound,
    GiftCardNotActive,
    GiftCardExpired,
    UsageRateTooLow,
    CardStatusNotAllowed,
    CardNotFound,
    InvalidValue,
    MalformedBody,
    AuthenticationFailed,
    RequestTimeOutOfWindow,
    DecryptionFailed,
    CorrelationIdReused,
    Pending,
    ServiceUnavailable,
    TooManyRequests,
    NotFound,
    PayloadTooLarge,
    NoSuchEndpoint,
    MethodNotAllowed,
}

impl ResultCode {
    pub const ALL: [ResultCode; 28] = [
        ResultCode::Success,
        ResultCode::MissingRequiredValue,
        ResultCode::CollectionBalanceZero,
        ResultCode::InsufficientBalance,
        ResultCode::BalanceOverMax,
        ResultCode::TransferFailed,
        ResultCode::SameCard,
        ResultCode::AffiliateMismatch,
        ResultCode::CollectionNotAllowed,
        ResultCode::OwnerAffiliateNotFound,
        ResultCode::GiftCardNotActive,
        ResultCode::GiftCardExpired,
        ResultCode::UsageRateTooLow,
        ResultCode::CardStatusNotAllowed,
        ResultCode::CardNotFound,
        ResultCode::InvalidValue,
        ResultCode::MalformedBody,
        ResultCode::AuthenticationFailed,
        ResultCode::RequestTimeOutOfWindow,
        ResultCode::DecryptionFailed,
        ResultCode::CorrelationIdReused,
        ResultCode::Pending,
        ResultCode::ServiceUnavailable,
        ResultCode::TooManyRequests,
        ResultCode::NotFound,
        ResultCode::PayloadTooLarge,
        ResultCode::NoSuchEndpoint,
        ResultCode::MethodNotAllowed,
    ];

    /// The code as clients see it, e.g. `005_018`.
    pub fn code(self) -> &'static str {
        use ResultCode::*;
        match self {
            Success => "000_000",
            MissingRequiredValue => "000_003",
            CollectionBalanceZero => "005_017",
            InsufficientBalance => "005_018",
            BalanceOverMax => "017_001",
            TransferFailed => "017_002",
            SameCard => "017_003",
            AffiliateMismatch => "017_004",
            CollectionNotAllowed => "017_005",
            OwnerAffiliateNotFound => "017_006",
            GiftCardNotActive => "017_007",
            GiftCardExpired => "017_008",
            UsageRateTooLow => "017_009",
            CardStatusNotAllowed => "017_010",
            CardNotFound => "017_011",
            InvalidValue => "000_004",
            MalformedBody => "000_005",
            AuthenticationFailed => "000_001",
            RequestTimeOutOfWindow => "000_006",
            DecryptionFailed => "000_007",
            CorrelationIdReused => "000_008",
            Pending => "000_009",
            ServiceUnavailable => "000_010",
            TooManyRequests => "000_011",
            NotFound => "000_012",
            PayloadTooLarge => "000_005",
            NoSuchEndpoint => "000_013",
            MethodNotAllowed => "000_014",
        }
    }

    pub fn http_status(self) -> u16 {
        use ResultCode::*;
        match self {
            Success => 200,
            Pending => 202,
            AuthenticationFailed | RequestTimeOutOfWindow => 401,
            NotFound | NoSuchEndpoint => 404,
            MethodNotAllowed => 405,
            CorrelationIdReused => 409,
            PayloadTooLarge => 413,
            TooManyRequests => 429,
            ServiceUnavailable => 503,
            _ => 400,
        }
    }

    /// The fixed part of the message; `000_003`, `000_004` and `017_011` append the
    /// field name after a space.
    pub fn message(self) -> &'static str {
        use ResultCode::*;
        match self {
            Success => "Success.",
            MissingRequiredValue => "Missing required values.",
            CollectionBalanceZero => "Possible collection balance is zero.",
            InsufficientBalance => "There is not enough balance to transfer.",
            BalanceOverMax => "Balance is over the max.",
            TransferFailed => "Failed to balance transfer.",
            SameCard => "Value transfer between same card.",
            AffiliateMismatch => "Input affiliateId is not same as owner affiliateId.",
            CollectionNotAllowed => "Product is not allowed collection.",
            OwnerAffiliateNotFound => "Owner affiliate not found.",
            GiftCardNotActive => "Gift card status is not active.",
            GiftCardExpired => "Gift card is over expiration date.",
            UsageRateTooLow => "Invalid balance usage percentage.",
            CardStatusNotAllowed => "Card status not allowed.",
            CardNotFound => "Card not found or not registered to the member.",
            InvalidValue => "Invalid value.",
            MalformedBody => "Malformed request body.",
            AuthenticationFailed => "Authentication failed.",
            RequestTimeOutOfWindow => "Request time is out of the allowed window.",
            DecryptionFailed => "Decryption failed.",
            CorrelationIdReused => "Correlation id already used with a different request.",
            Pending => "Accepted; the result is pending.",
            ServiceUnavailable => "Service temporarily unavailable.",
            TooManyRequests => "Too many requests.",
            NotFound => "No request with this correlation id.",
            PayloadTooLarge => "Malformed request body.",
            NoSuchEndpoint => "No such endpoint.",
            MethodNotAllowed => "Method not allowed.",
        }
    }

    /// The message with the offending field appended, as the spec shows it:
    /// `Missing required values. toCardNo`.
    pub fn message_with(self, field: Option<&str>) -> String {
        match field {
            Some(f) => format!("{} {}", self.message(), f),
            None => self.message().to_string(),
        }
    }

    pub fn from_code(code: &str) -> Option<ResultCode> {
        // 000_005 is shared by a malformed and an oversized body; the plain one wins.
        Self::ALL.into_iter().filter(|c| *c != ResultCode::PayloadTooLarge).find(|c| c.code() == code)
    }

    pub fn is_success(self) -> bool {
        self == ResultCode::Success
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn every_code_but_the_oversized_body_is_unique() {
        let codes: Vec<_> =
            ResultCode::ALL.iter().filter(|c| **c != ResultCode::PayloadTooLarge).map(|c| c.code()).collect();
        let unique: HashSet<_> = codes.iter().collect();
        assert_eq!(codes.len(), unique.len());
    }

    #[test]
    fn codes_round_trip_through_their_text() {
        for c in ResultCode::ALL {
            if c != ResultCode::PayloadTooLarge {
                assert_eq!(ResultCode::from_code(c.code()), Some(c));
            }
        }
    }

    #[test]
    fn message_with_a_field_matches_the_spec_example() {
        assert_eq!(
            ResultCode::MissingRequiredValue.message_with(Some("toCardNo")),
            "Missing required values. toCardNo"
        );
    }

    #[test]
    fn the_readme_lists_every_code_with_its_status_and_message() {
        let readme = include_str!("../../../README.md");
        for c in ResultCode::ALL.into_iter().filter(|c| *c != ResultCode::PayloadTooLarge) {
            let row = format!("| {} | {} | {}", c.code(), c.http_status(), c.message());
            assert!(readme.contains(&row), "README lacks the row {row:?}");
        }
    }

    #[test]
    fn only_success_is_200() {
        for c in ResultCode::ALL {
            assert_eq!(c.http_status() == 200, c == ResultCode::Success);
        }
    }
}
