//! Identifiers that arrive from clients. Each parses once at the edge and is valid
//! from then on; a parse error names what was wrong so the gateway can answer with
//! the field.

use serde::{Deserialize, Serialize};
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("wrong length")]
    Length,
    #[error("wrong format")]
    Format,
    #[error("out of range")]
    Range,
}

fn exact_ascii(s: &str, len: usize, ok: impl Fn(u8) -> bool) -> Result<(), IdError> {
    if s.len() != len {
        return Err(IdError::Length);
    }
    if !s.bytes().all(ok) {
        return Err(IdError::Format);
    }
    Ok(())
}

fn id_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

macro_rules! text_id {
    ($(#[$doc:meta])* $name:ident, $len:expr, $ok:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub const LEN: usize = $len;

            pub fn parse(s: &str) -> Result<Self, IdError> {
                exact_ascii(s, $len, $ok)?;
                Ok(Self(s.to_string()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                Self::parse(&s)
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

text_id!(
    /// `X-KM-User-AspId`: the service provider, 15 characters.
    AspId, 15, id_char
);
text_id!(
    /// `X-KM-Access-Key`: one API key of an ASP, 40 characters.
    AccessKey, 40, id_char
);
text_id!(
    /// `X-KM-Crypto-Key-Id`: the data key an ASP encrypts bodies with, 32 characters.
    CryptoKeyId, 32, id_char
);

/// `X-KM-Tran-Token`: `v1` and 64 lowercase hex digits (an HMAC-SHA256).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TranToken(String);

impl TranToken {
    pub const LEN: usize = 66;

    pub fn parse(s: &str) -> Result<Self, IdError> {
        if s.len() != Self::LEN {
            return Err(IdError::Length);
        }
        let (version, mac) = s.split_at(2);
        if version != "v1" || !mac.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(IdError::Format);
        }
        Ok(Self(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The 32 MAC bytes behind the version prefix.
    pub fn mac(&self) -> Vec<u8> {
        hex::decode(&self.0[2..]).expect("validated at parse")
    }
}

/// An affiliate (the company that owns card products), as stored.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AffiliateId(pub String);

impl fmt::Display for AffiliateId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// `X-KM-Correlation-Id`: `yyMMddHHmiSS-xxxxxxx`, a real date and time followed by
/// seven hex digits. Together with the AspId it names one request forever.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CorrelationId(String);

impl CorrelationId {
    pub const LEN: usize = 20;

    pub fn parse(s: &str) -> Result<Self, IdError> {
        if s.len() != Self::LEN {
            return Err(IdError::Length);
        }
        let b = s.as_bytes();
        let digits = b[..12].iter().all(u8::is_ascii_digit);
        let hex = b[13..].iter().all(u8::is_ascii_hexdigit);
        if !digits || b[12] != b'-' || !hex {
            return Err(IdError::Format);
        }
        crate::time_zone::parse_wall_clock(&s[..12], "%y%m%d%H%M%S").ok_or(IdError::Format)?;
        Ok(Self(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for CorrelationId {
    type Error = IdError;
    fn try_from(s: String) -> Result<Self, IdError> {
        Self::parse(&s)
    }
}

impl From<CorrelationId> for String {
    fn from(v: CorrelationId) -> String {
        v.0
    }
}

impl fmt::Display for CorrelationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A member's user id: an integer 1..=9999999999999999999. That is more than `i64`
/// holds, so it is a `u64` here and `NUMERIC(19,0)` in Postgres.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct UserId(u64);

impl UserId {
    pub const MAX: u64 = 9_999_999_999_999_999_999;

    pub fn new(v: u64) -> Result<Self, IdError> {
        if (1..=Self::MAX).contains(&v) {
            Ok(Self(v))
        } else {
            Err(IdError::Range)
        }
    }

    /// Parses the decimal text of a JSON number exactly: digits only, no sign,
    /// fraction or exponent, never through a float.
    pub fn parse(text: &str) -> Result<Self, IdError> {
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(IdError::Format);
        }
        // Longer than 20 digits cannot be in range; avoid overflow in the parse.
        if text.len() > 20 {
            return Err(IdError::Range);
        }
        let v: u64 = text.parse().map_err(|_| IdError::Range)?;
        Self::new(v)
    }

    pub fn get(self) -> u64 {
        self.0
    }
}

impl TryFrom<u64> for UserId {
    type Error = IdError;
    fn try_from(v: u64) -> Result<Self, IdError> {
        Self::new(v)
    }
}

impl From<UserId> for u64 {
    fn from(v: UserId) -> u64 {
        v.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn correlation_id_with_a_real_time_and_hex_suffix_parses() {
        assert!(CorrelationId::parse("241124153000-0a1B2c3").is_ok());
    }

    #[test]
    fn correlation_id_with_an_impossible_date_is_rejected() {
        assert_eq!(CorrelationId::parse("241332153000-0a1b2c3"), Err(IdError::Format));
        assert_eq!(CorrelationId::parse("240230120000-0000000"), Err(IdError::Format));
        assert_eq!(CorrelationId::parse("241124250000-0000000"), Err(IdError::Format));
    }

    #[test]
    fn correlation_id_at_second_sixty_is_rejected() {
        assert!(CorrelationId::parse("241124153059-0000000").is_ok());
        assert_eq!(CorrelationId::parse("241124153060-0000000"), Err(IdError::Format));
    }

    #[test]
    fn correlation_id_with_a_non_hex_suffix_is_rejected() {
        assert_eq!(CorrelationId::parse("241124153000-0a1b2cg"), Err(IdError::Format));
        assert_eq!(CorrelationId::parse("241124153000_0a1b2c3"), Err(IdError::Format));
    }

    #[test]
    fn correlation_id_of_the_wrong_length_is_rejected() {
        assert_eq!(CorrelationId::parse("241124153000-0a1b2c"), Err(IdError::Length));
    }

    #[test]
    fn user_id_reaches_nineteen_nines() {
        assert_eq!(UserId::parse("9999999999999999999").unwrap().get(), UserId::MAX);
        assert_eq!(UserId::parse("10000000000000000000"), Err(IdError::Range));
        assert_eq!(UserId::parse("0"), Err(IdError::Range));
        assert_eq!(UserId::parse("1.0"), Err(IdError::Format));
        assert_eq!(UserId::parse("-1"), Err(IdError::Format));
        assert_eq!(UserId::parse("1e3"), Err(IdError::Format));
        assert_eq!(UserId::parse("99999999999999999999999"), Err(IdError::Range));
    }

    #[test]
    fn tran_token_is_v1_and_lowercase_hex() {
        let ok = format!("v1{}", "ab".repeat(32));
        assert!(TranToken::parse(&ok).is_ok());
        assert_eq!(TranToken::parse(&format!("v2{}", "ab".repeat(32))), Err(IdError::Format));
        assert_eq!(TranToken::parse(&format!("v1{}", "AB".repeat(32))), Err(IdError::Format));
        assert_eq!(TranToken::parse("v1ab"), Err(IdError::Length));
    }

    #[test]
    fn asp_id_must_be_exactly_fifteen_characters() {
        assert!(AspId::parse("DEMOASP00000001").is_ok());
        assert_eq!(AspId::parse("DEMOASP0000001"), Err(IdError::Length));
        assert_eq!(AspId::parse("DEMOASP 0000001"), Err(IdError::Format));
    }

    proptest! {
        #[test]
        fn every_user_id_in_range_round_trips_through_text(v in 1u64..=UserId::MAX) {
            prop_assert_eq!(UserId::parse(&v.to_string()).unwrap().get(), v);
        }

        #[test]
        fn every_user_id_above_range_is_rejected(v in (UserId::MAX + 1)..=u64::MAX) {
            prop_assert_eq!(UserId::parse(&v.to_string()), Err(IdError::Range));
        }
    }
}
