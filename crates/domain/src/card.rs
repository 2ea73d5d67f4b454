//! Cards and card products as the rules see them.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// A card number: exactly 16 ASCII digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CardNo(String);

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a card number is exactly 16 digits")]
pub struct CardNoError;

impl CardNo {
    pub const LEN: usize = 16;

    pub fn parse(s: &str) -> Result<Self, CardNoError> {
        if s.len() == Self::LEN && s.bytes().all(|b| b.is_ascii_digit()) {
            Ok(Self(s.to_string()))
        } else {
            Err(CardNoError)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The last four digits, the only part that belongs in a log line.
    pub fn masked(&self) -> String {
        format!("************{}", &self.0[12..])
    }
}

impl TryFrom<String> for CardNo {
    type Error = CardNoError;
    fn try_from(s: String) -> Result<Self, CardNoError> {
        Self::parse(&s)
    }
}

impl From<CardNo> for String {
    fn from(v: CardNo) -> String {
        v.0
    }
}

impl fmt::Display for CardNo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CardStatus {
    Active,
    Inactive,
    Suspended,
    Lost,
    Expired,
    Terminated,
}

impl CardStatus {
    pub const ALL: [CardStatus; 6] = [
        CardStatus::Active,
        CardStatus::Inactive,
        CardStatus::Suspended,
        CardStatus::Lost,
        CardStatus::Expired,
        CardStatus::Terminated,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CardStatus::Active => "ACTIVE",
            CardStatus::Inactive => "INACTIVE",
            CardStatus::Suspended => "SUSPENDED",
            CardStatus::Lost => "LOST",
            CardStatus::Expired => "EXPIRED",
            CardStatus::Terminated => "TERMINATED",
        }
    }
}

impl FromStr for CardStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL.into_iter().find(|c| c.as_str() == s).ok_or_else(|| format!("unknown card status {s:?}"))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ProductKind {
    Prepaid,
    Gift,
}

impl ProductKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProductKind::Prepaid => "PREPAID",
            ProductKind::Gift => "GIFT",
        }
    }
}

impl FromStr for ProductKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "PREPAID" => Ok(ProductKind::Prepaid),
            "GIFT" => Ok(ProductKind::Gift),
            _ => Err(format!("unknown product kind {s:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn card_number_is_sixteen_digits() {
        assert!(CardNo::parse("9410000000000001").is_ok());
        assert!(CardNo::parse("941000000000001").is_err());
        assert!(CardNo::parse("94100000000000012").is_err());
        assert!(CardNo::parse("941000000000000a").is_err());
        assert!(CardNo::parse("９４１0000000000001").is_err());
    }

    #[test]
    fn masked_card_shows_only_the_last_four() {
        assert_eq!(CardNo::parse("9410000000001234").unwrap().masked(), "************1234");
    }

    #[test]
    fn statuses_round_trip() {
        for s in CardStatus::ALL {
            assert_eq!(s.as_str().parse::<CardStatus>().unwrap(), s);
        }
    }
}
