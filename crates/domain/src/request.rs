//! The body of `POST /api/v1/transfer/balance`, parsed from JSON exactly as the spec
//! and the result-code table say: a missing or null required field is `000_003` (an
//! absent `amount` too: the spec marks it required, and null is its one way of
//! asking for the whole balance), a
//! value of the wrong type, length, format or range is `000_004`, a body that is not
//! a JSON object is `000_005`. Fields are checked in the spec's order, so the first
//! bad field is the one named.

use crate::{CardNo, Money, ResultCode, UserId};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TransferRequest {
    pub user_id: UserId,
    pub from_card_no: CardNo,
    pub to_card_no: CardNo,
    /// `None` (null) and zero both mean "the whole balance".
    pub amount: Option<Money>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} {}", code.code(), code.message_with(field.as_deref()))]
pub struct RequestError {
    pub code: ResultCode,
    pub field: Option<String>,
}

impl RequestError {
    pub fn missing(field: &str) -> Self {
        Self { code: ResultCode::MissingRequiredValue, field: Some(field.to_string()) }
    }
    pub fn invalid(field: &str) -> Self {
        Self { code: ResultCode::InvalidValue, field: Some(field.to_string()) }
    }
    pub fn malformed() -> Self {
        Self { code: ResultCode::MalformedBody, field: None }
    }
}

/// The body's fields, in the spec's order.
const FIELDS: [&str; 4] = ["userId", "fromCardNo", "toCardNo", "amount"];

/// A JSON object's members as written, repeats included. serde_json's own map
/// keeps the last of a repeated key, so `{"amount": 1, "amount": 1000}` would move
/// 1000 while a proxy, a log or the client's own code that reads the first sees 1;
/// the body is signed as bytes, so only refusing it leaves no doubt what was asked.
struct Members(Vec<(String, Value)>);

impl<'de> Deserialize<'de> for Members {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ObjectVisitor;
        impl<'de> serde::de::Visitor<'de> for ObjectVisitor {
            type Value = Members;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Members, A::Error> {
                let mut members = Vec::with_capacity(map.size_hint().unwrap_or(4));
                while let Some(member) = map.next_entry::<String, Value>()? {
                    members.push(member);
                }
                Ok(Members(members))
            }
        }
        d.deserialize_map(ObjectVisitor)
    }
}

fn required<'a>(obj: &'a serde_json::Map<String, Value>, field: &str) -> Result<&'a Value, RequestError> {
    match obj.get(field) {
        None | Some(Value::Null) => Err(RequestError::missing(field)),
        Some(v) => Ok(v),
    }
}

fn card_no(obj: &serde_json::Map<String, Value>, field: &str) -> Result<CardNo, RequestError> {
    match required(obj, field)? {
        Value::String(s) => CardNo::parse(s).map_err(|_| RequestError::invalid(field)),
        _ => Err(RequestError::invalid(field)),
    }
}

impl TransferRequest {
    /// Parses raw body bytes. Unknown extra fields are ignored; a field given twice
    /// makes the body malformed (see [`Members`]).
    pub fn from_json_bytes(body: &[u8]) -> Result<Self, RequestError> {
        let Members(members) = serde_json::from_slice(body).map_err(|_| RequestError::malformed())?;
        let mut obj = serde_json::Map::with_capacity(members.len());
        for (name, value) in members {
            if obj.contains_key(&name) {
                // Named only when it is one of ours: the message must not echo
                // whatever a client put in a key.
                let known = FIELDS.contains(&name.as_str());
                return Err(RequestError { field: known.then_some(name), ..RequestError::malformed() });
            }
            obj.insert(name, value);
        }
        Self::from_json(&Value::Object(obj))
    }

    pub fn from_json(value: &Value) -> Result<Self, RequestError> {
        let obj = value.as_object().ok_or_else(RequestError::malformed)?;
        let user_id = match required(obj, "userId")? {
            Value::Number(n) => UserId::parse(&n.to_string()).map_err(|_| RequestError::invalid("userId"))?,
            _ => return Err(RequestError::invalid("userId")),
        };
        let from_card_no = card_no(obj, "fromCardNo")?;
        let to_card_no = card_no(obj, "toCardNo")?;
        // An absent amount is not read as null: a misspelt key (`Amount`,
        // `ammount`) would otherwise move the whole balance of a client that meant
        // to move a part of it.
        let amount = match obj.get("amount") {
            None => return Err(RequestError::missing("amount")),
            Some(Value::Null) => None,
            Some(Value::Number(n)) => {
                Some(Money::parse_request_amount(&n.to_string()).map_err(|_| RequestError::invalid("amount"))?)
            }
            Some(_) => return Err(RequestError::invalid("amount")),
        };
        Ok(TransferRequest { user_id, from_card_no, to_card_no, amount })
    }

    /// The amount asked for, with "whole balance" as zero.
    pub fn requested_amount(&self) -> Money {
        self.amount.unwrap_or(Money::ZERO)
    }

    /// A fingerprint of what the request asks for. The same correlation id with a
    /// different fingerprint is a different request (`000_008`). Null and zero amounts
    /// ask for the same thing, so they hash alike.
    pub fn fingerprint(&self) -> String {
        let canonical =
            format!("v1|{}|{}|{}|{}", self.user_id, self.from_card_no, self.to_card_no, self.requested_amount());
        hex::encode(Sha256::digest(canonical.as_bytes()))
    }
}

/// The length of a [`status_token`]: 32 lowercase hex digits.
pub const STATUS_TOKEN_LEN: usize = 32;

/// The token a `202`'s `Location` carries (`?request=`) to name one body under its
/// correlation id. A correlation id may be sent with two bodies at once, and the
/// ledger decides whichever comes first, so the id alone cannot say whose result a
/// poller is owed: with the token, a status query answers `000_008` once another
/// body's transfer was decided under the id. Derived from the fingerprint rather
/// than the fingerprint itself, which stays out of URLs (they are logged in more
/// places than bodies are).
pub fn status_token(fingerprint: &str) -> String {
    let digest = Sha256::digest(format!("status|{fingerprint}").as_bytes());
    hex::encode(&digest[..STATUS_TOKEN_LEN / 2])
}

/// Whether `text` has the form of a [`status_token`].
pub fn is_status_token(text: &str) -> bool {
    text.len() == STATUS_TOKEN_LEN && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_status_token_names_one_body_in_the_form_it_is_checked_in() {
        let r = parse(body()).unwrap();
        let token = status_token(&r.fingerprint());
        assert!(is_status_token(&token), "{token}");
        assert_eq!(token, status_token(&r.fingerprint()), "the same body, the same token");
        let other = parse(
            json!({"userId": 1001, "fromCardNo": "9410000000000001", "toCardNo": "9410000000000002", "amount": 30001}),
        )
        .unwrap();
        assert_ne!(token, status_token(&other.fingerprint()));
        assert_ne!(token, r.fingerprint()[..STATUS_TOKEN_LEN], "the fingerprint itself stays out of the URL");
    }

    #[test]
    fn only_32_lowercase_hex_digits_are_a_status_token() {
        assert!(is_status_token(&"0123456789abcdef".repeat(2)));
        for bad in ["", "0123", &"0123456789ABCDEF".repeat(2), &"0123456789abcdef".repeat(3), &"g".repeat(32)] {
            assert!(!is_status_token(bad), "{bad:?}");
        }
    }

    fn parse(v: Value) -> Result<TransferRequest, RequestError> {
        TransferRequest::from_json(&v)
    }

    fn body() -> Value {
        json!({"userId": 1001, "fromCardNo": "9410000000000001", "toCardNo": "9410000000000002", "amount": 30000})
    }

    #[test]
    fn a_complete_body_parses() {
        let r = parse(body()).unwrap();
        assert_eq!(r.user_id.get(), 1001);
        assert_eq!(r.amount, Some(Money::from_units(30000)));
    }

    #[test]
    fn each_missing_or_null_required_field_is_named() {
        for field in ["userId", "fromCardNo", "toCardNo"] {
            let mut b = body();
            b.as_object_mut().unwrap().remove(field);
            assert_eq!(parse(b).unwrap_err(), RequestError::missing(field));
            let mut b = body();
            b[field] = Value::Null;
            assert_eq!(parse(b).unwrap_err(), RequestError::missing(field));
        }
    }

    #[test]
    fn the_first_missing_field_in_spec_order_is_named() {
        assert_eq!(parse(json!({})).unwrap_err(), RequestError::missing("userId"));
        assert_eq!(parse(json!({"userId": 1})).unwrap_err(), RequestError::missing("fromCardNo"));
    }

    #[test]
    fn a_null_amount_asks_for_the_whole_balance() {
        let mut b = body();
        b["amount"] = Value::Null;
        assert_eq!(parse(b).unwrap().amount, None);
    }

    #[test]
    fn an_absent_amount_is_missing_not_the_whole_balance() {
        let mut absent = body();
        absent.as_object_mut().unwrap().remove("amount");
        let mut misspelt = absent.clone();
        misspelt["Amount"] = json!(100);
        for b in [absent, misspelt] {
            assert_eq!(parse(b).unwrap_err(), RequestError::missing("amount"));
        }
    }

    #[test]
    fn wrong_types_and_ranges_are_invalid_values() {
        let cases = [
            ("userId", json!("1001")),
            ("userId", json!(0)),
            ("userId", json!(-5)),
            ("userId", json!(1.5)),
            ("userId", serde_json::from_str::<Value>("10000000000000000000").unwrap()),
            ("fromCardNo", json!(9410000000000001u64)),
            ("fromCardNo", json!("941000000000001")),
            ("toCardNo", json!("94100000000000xx")),
            ("amount", json!("100")),
            ("amount", json!(-1)),
            ("amount", json!(1.5)),
            ("amount", json!(1000000000000u64)),
            ("amount", json!(true)),
        ];
        for (field, value) in cases {
            let mut b = body();
            b[field] = value.clone();
            assert_eq!(parse(b).unwrap_err(), RequestError::invalid(field), "{field} = {value}");
        }
    }

    #[test]
    fn the_largest_user_id_parses_exactly() {
        let raw =
            br#"{"userId": 9999999999999999999, "fromCardNo": "9410000000000001", "toCardNo": "9410000000000002", "amount": null}"#;
        assert_eq!(TransferRequest::from_json_bytes(raw).unwrap().user_id.get(), UserId::MAX);
    }

    #[test]
    fn a_body_that_is_not_an_object_is_malformed() {
        for raw in [&b"[1,2]"[..], b"\"x\"", b"{", b"", b"null"] {
            assert_eq!(TransferRequest::from_json_bytes(raw).unwrap_err(), RequestError::malformed());
        }
    }

    #[test]
    fn a_field_given_twice_makes_the_body_malformed_and_is_named() {
        let raw = br#"{"userId": 1001, "fromCardNo": "9410000000000001", "toCardNo": "9410000000000002",
                       "amount": 1, "amount": 1000}"#;
        let err = TransferRequest::from_json_bytes(raw).unwrap_err();
        assert_eq!(err.code, ResultCode::MalformedBody);
        assert_eq!(err.field.as_deref(), Some("amount"));
    }

    #[test]
    fn an_unknown_field_given_twice_makes_the_body_malformed_without_echoing_it() {
        let raw = br#"{"userId": 1001, "fromCardNo": "9410000000000001", "toCardNo": "9410000000000002",
                       "<script>": 1, "<script>": 2}"#;
        assert_eq!(TransferRequest::from_json_bytes(raw).unwrap_err(), RequestError::malformed());
    }

    fn a_value() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![
            Just("null".to_string()),
            Just("true".to_string()),
            Just("0".to_string()),
            "-?[1-9][0-9]{0,20}(\\.[0-9]{1,3})?",
            "\"[0-9]{0,17}\"",
            Just("[]".to_string()),
            Just("{\"userId\": 1}".to_string()),
        ]
    }

    proptest::proptest! {
        #[test]
        fn a_body_without_a_repeated_field_parses_as_its_json_value_does(
            members in proptest::collection::vec(
                (proptest::sample::select(vec!["userId", "fromCardNo", "toCardNo", "amount", "memo"]), a_value()),
                0..6,
            )
        ) {
            let mut seen = std::collections::HashSet::new();
            let members: Vec<_> = members.into_iter().filter(|(name, _)| seen.insert(*name)).collect();
            let raw = format!(
                "{{{}}}",
                members.iter().map(|(name, value)| format!("\"{name}\": {value}")).collect::<Vec<_>>().join(", ")
            );
            let value: Value = serde_json::from_str(&raw).unwrap();
            proptest::prop_assert_eq!(TransferRequest::from_json_bytes(raw.as_bytes()), parse(value), "{}", raw);
        }
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let mut b = body();
        b["memo"] = json!("hi");
        assert!(parse(b).is_ok());
    }

    #[test]
    fn null_and_zero_amounts_have_the_same_fingerprint() {
        let mut a = parse(body()).unwrap();
        a.amount = None;
        let mut b = a.clone();
        b.amount = Some(Money::ZERO);
        assert_eq!(a.fingerprint(), b.fingerprint());
        let mut c = a.clone();
        c.amount = Some(Money::from_units(1));
        assert_ne!(a.fingerprint(), c.fingerprint());
    }
}
