//! `X-KM-Time-Zone`: the client names the zone its `X-KM-Tran-Time` is written in.
//! Only fixed-offset abbreviations are accepted, so a clock reading never depends on
//! daylight-saving tables the client and server might disagree about.

use chrono::{FixedOffset, NaiveDateTime, Timelike};

/// A real date and time written in `format` (correlation ids, `X-KM-Tran-Time`).
/// chrono reads second 60 as a leap second; no clock a client stamps with says
/// that, so it is refused here for every caller.
pub fn parse_wall_clock(s: &str, format: &str) -> Option<NaiveDateTime> {
    NaiveDateTime::parse_from_str(s, format).ok().filter(|t| t.nanosecond() < 1_000_000_000)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientTimeZone {
    pub name: &'static str,
    offset_seconds: i32,
}

/// The documented set of time-zone abbreviations and their UTC offsets.
pub const SUPPORTED: [(&str, i32); 16] = [
    ("UTC", 0),
    ("GMT", 0),
    ("KST", 9 * 3600),
    ("JST", 9 * 3600),
    ("HKT", 8 * 3600),
    ("SGT", 8 * 3600),
    ("PHT", 8 * 3600),
    ("ICT", 7 * 3600),
    ("WIB", 7 * 3600),
    ("IST", 5 * 3600 + 1800),
    ("CET", 3600),
    ("EET", 2 * 3600),
    ("EST", -5 * 3600),
    ("EDT", -4 * 3600),
    ("PST", -8 * 3600),
    ("PDT", -7 * 3600),
];

impl ClientTimeZone {
    pub fn parse(s: &str) -> Option<Self> {
        SUPPORTED
            .iter()
            .find(|(n, _)| *n == s)
            .map(|(name, offset_seconds)| ClientTimeZone { name, offset_seconds: *offset_seconds })
    }

    pub fn offset(self) -> FixedOffset {
        FixedOffset::east_opt(self.offset_seconds).expect("offsets in the table are valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kst_is_nine_hours_ahead() {
        assert_eq!(ClientTimeZone::parse("KST").unwrap().offset().local_minus_utc(), 9 * 3600);
    }

    #[test]
    fn unknown_and_lowercase_zones_are_rejected() {
        assert!(ClientTimeZone::parse("XYZ").is_none());
        assert!(ClientTimeZone::parse("utc").is_none());
    }
}
