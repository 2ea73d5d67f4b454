//! Money is a `rust_decimal::Decimal` from the HTTP body to the `NUMERIC` column.
//! No float ever holds an amount: request amounts are parsed from the JSON number's
//! text, and wire formats carry amounts as decimal strings or exact JSON numbers.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::ops::{Add, Sub};

/// A non-negative amount of money in the card's currency unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(try_from = "Decimal", into = "Decimal")]
pub struct Money(Decimal);

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("money cannot be negative")]
    Negative,
    #[error("an amount is a whole number of digits")]
    Format,
    #[error("amount out of range")]
    Range,
}

impl Money {
    pub const ZERO: Money = Money(Decimal::ZERO);
    /// The largest amount a request may name (spec: 0..999999999999).
    pub const MAX_REQUEST_AMOUNT: i64 = 999_999_999_999;

    pub fn new(d: Decimal) -> Result<Self, MoneyError> {
        if d.is_sign_negative() && !d.is_zero() {
            Err(MoneyError::Negative)
        } else {
            Ok(Money(d.normalize()))
        }
    }

    pub fn from_units(units: u64) -> Self {
        Money(Decimal::from(units))
    }

    /// Parses a request amount from the exact text of a JSON number: digits only
    /// (no sign, fraction or exponent) and at most 999999999999.
    pub fn parse_request_amount(text: &str) -> Result<Self, MoneyError> {
        if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
            return Err(MoneyError::Format);
        }
        if text.len() > 12 {
            return Err(MoneyError::Range);
        }
        let v: i64 = text.parse().map_err(|_| MoneyError::Range)?;
        if v > Self::MAX_REQUEST_AMOUNT {
            return Err(MoneyError::Range);
        }
        Ok(Money(Decimal::from(v)))
    }

    /// Whether a request may name this amount: whole and at most
    /// `MAX_REQUEST_AMOUNT`. The gateway parses only such amounts; the worker checks
    /// again because anyone who can write to the commands topic bypasses the gateway.
    pub fn is_request_amount(self) -> bool {
        self.0.fract().is_zero() && self.0 <= Decimal::from(Self::MAX_REQUEST_AMOUNT)
    }

    pub fn get(self) -> Decimal {
        self.0
    }

    pub fn is_zero(self) -> bool {
        self.0.is_zero()
    }

    /// `self - other`, or `None` when that would be negative.
    pub fn checked_sub(self, other: Money) -> Option<Money> {
        let d = self.0.checked_sub(other.0)?;
        Money::new(d).ok()
    }
}

impl TryFrom<Decimal> for Money {
    type Error = MoneyError;
    fn try_from(d: Decimal) -> Result<Self, MoneyError> {
        Money::new(d)
    }
}

impl From<Money> for Decimal {
    fn from(m: Money) -> Decimal {
        m.0
    }
}

impl Add for Money {
    type Output = Money;
    fn add(self, rhs: Money) -> Money {
        Money(self.0 + rhs.0)
    }
}

impl Sub for Money {
    type Output = Decimal;
    /// The signed difference; use `checked_sub` to stay within `Money`.
    fn sub(self, rhs: Money) -> Decimal {
        self.0 - rhs.0
    }
}

impl fmt::Display for Money {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn only_whole_amounts_up_to_the_maximum_are_request_amounts() {
        let m = |s: &str| Money::new(s.parse().unwrap()).unwrap();
        assert!(m("0").is_request_amount());
        assert!(m("999999999999").is_request_amount());
        assert!(m("100.000").is_request_amount(), "trailing zeros are still whole");
        assert!(!m("1000000000000").is_request_amount());
        assert!(!m("0.5").is_request_amount());
    }

    #[test]
    fn request_amount_accepts_zero_and_the_maximum() {
        assert_eq!(Money::parse_request_amount("0").unwrap(), Money::ZERO);
        assert_eq!(Money::parse_request_amount("999999999999").unwrap(), Money::from_units(999_999_999_999));
    }

    #[test]
    fn request_amount_rejects_fractions_signs_exponents_and_overflow() {
        for bad in ["1.5", "1.0", "-1", "1e3", "", "1000000000000", "+5"] {
            assert!(Money::parse_request_amount(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn money_cannot_be_negative() {
        assert_eq!(Money::new(Decimal::from(-1)), Err(MoneyError::Negative));
        assert_eq!(Money::from_units(1).checked_sub(Money::from_units(2)), None);
    }

    proptest! {
        #[test]
        fn request_amounts_parse_exactly(v in 0i64..=Money::MAX_REQUEST_AMOUNT) {
            prop_assert_eq!(Money::parse_request_amount(&v.to_string()).unwrap().get(), Decimal::from(v));
        }
    }
}
