//! Loading reference data and cards from a JSON fixture (`cardflow seed`). The
//! shape is a contract: tests, examples and outside tools write it.
//!
//! Seeding is an upsert. Once the ledger has moved a card's money, the ledger is
//! the truth about it: a re-seed (every `make run` re-seeds the demo data) updates
//! the card's status, product, expiry and limit but keeps its member, balance,
//! opening balance and total loaded, so no money is created, destroyed or handed
//! to someone else without a ledger entry, and the audit keeps holding.
//!
//! Credentials are the same kind of truth: an access key's status changes only
//! when the fixture names one (a key an operator disabled stays disabled through
//! a re-seed that does not say otherwise), and a key never moves to another ASP.

use crate::credentials::hash_access_key;
use crate::LedgerError;
use base64::Engine;
use cardflow_domain::{AccessKey, AspId, CardNo, CardStatus, CryptoKeyId, ProductKind, UserId};
use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::Decimal;
use serde::Deserialize;
use sqlx::PgPool;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Fixture {
    #[serde(default)]
    pub affiliates: Vec<Affiliate>,
    #[serde(default)]
    pub asps: Vec<Asp>,
    #[serde(default)]
    pub products: Vec<Product>,
    #[serde(default)]
    pub members: Vec<Member>,
    #[serde(default)]
    pub cards: Vec<Card>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Affiliate {
    pub affiliate_id: String,
    pub name: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Asp {
    pub asp_id: String,
    pub affiliate_id: String,
    #[serde(default)]
    pub require_encryption: bool,
    #[serde(default)]
    pub access_keys: Vec<AccessKeyEntry>,
    #[serde(default)]
    pub crypto_keys: Vec<CryptoKeyEntry>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AccessKeyEntry {
    pub access_key: String,
    pub signing_secret: String,
    /// `ACTIVE` (default) or `DISABLED`.
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CryptoKeyEntry {
    pub key_id: String,
    pub key: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Product {
    pub product_id: String,
    pub owner_affiliate_id: String,
    pub kind: ProductKind,
    pub collection_allowed: bool,
    pub max_balance: Decimal,
    pub min_usage_rate: Option<Decimal>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Member {
    pub user_id: UserId,
    pub affiliate_id: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Card {
    pub card_no: CardNo,
    pub user_id: UserId,
    pub product_id: String,
    pub status: CardStatus,
    pub balance: Decimal,
    pub total_loaded: Decimal,
    pub expires_on: NaiveDate,
    pub max_balance: Option<Decimal>,
}

fn bad(what: impl Into<String>) -> LedgerError {
    LedgerError::Fixture(what.into())
}

impl Fixture {
    pub fn from_json(text: &str) -> Result<Self, LedgerError> {
        let f: Fixture = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        f.validate()?;
        Ok(f)
    }

    fn validate(&self) -> Result<(), LedgerError> {
        for a in &self.asps {
            AspId::parse(&a.asp_id).map_err(|e| bad(format!("aspId {:?}: {e}", a.asp_id)))?;
            for k in &a.access_keys {
                AccessKey::parse(&k.access_key).map_err(|e| bad(format!("accessKey of {}: {e}", a.asp_id)))?;
                if let Some(s) = &k.status {
                    if s != "ACTIVE" && s != "DISABLED" {
                        return Err(bad(format!("accessKey status {s:?}")));
                    }
                }
            }
            for k in &a.crypto_keys {
                CryptoKeyId::parse(&k.key_id).map_err(|e| bad(format!("keyId {:?}: {e}", k.key_id)))?;
                decode_key(&k.key).map_err(|e| bad(format!("key {:?}: {e}", k.key_id)))?;
            }
        }
        for p in &self.products {
            if !is_whole_money(p.max_balance) {
                return Err(bad(format!("product {}: maxBalance is not a whole, non-negative amount", p.product_id)));
            }
            if p.min_usage_rate.is_some_and(|r| r.is_sign_negative() || r > Decimal::ONE) {
                return Err(bad(format!("product {}: minUsageRate is not a share in 0..1", p.product_id)));
            }
        }
        for c in &self.cards {
            // The API moves whole amounts only: a fraction on a card could never be
            // moved but by a whole-balance transfer, which would then move it too.
            let money =
                [("balance", Some(c.balance)), ("totalLoaded", Some(c.total_loaded)), ("maxBalance", c.max_balance)];
            if let Some((field, _)) = money.iter().find(|(_, v)| v.is_some_and(|v| !is_whole_money(v))) {
                return Err(bad(format!("card {}: {field} is not a whole, non-negative amount", c.card_no.masked())));
            }
            // A card holds no more than was loaded onto it (what it received counts as
            // loaded): otherwise its usage rate is negative and a gift card could
            // never be collected.
            if c.total_loaded < c.balance {
                return Err(bad(format!("card {}: totalLoaded is below its balance", c.card_no.masked())));
            }
        }
        Ok(())
    }

    /// Upserts everything in one transaction.
    pub async fn load(&self, pool: &PgPool) -> Result<(), LedgerError> {
        let mut tx = pool.begin().await?;
        for a in &self.affiliates {
            sqlx::query("INSERT INTO affiliates (affiliate_id, name) VALUES ($1, $2) ON CONFLICT (affiliate_id) DO UPDATE SET name = EXCLUDED.name")
                .bind(&a.affiliate_id)
                .bind(&a.name)
                .execute(&mut *tx)
                .await?;
        }
        for a in &self.asps {
            sqlx::query(
                "INSERT INTO asps (asp_id, affiliate_id, require_encryption) VALUES ($1, $2, $3)
                 ON CONFLICT (asp_id) DO UPDATE SET affiliate_id = EXCLUDED.affiliate_id, require_encryption = EXCLUDED.require_encryption",
            )
            .bind(&a.asp_id)
            .bind(&a.affiliate_id)
            .bind(a.require_encryption)
            .execute(&mut *tx)
            .await?;
            for k in &a.access_keys {
                let stored = sqlx::query_scalar::<_, i32>(
                    "INSERT INTO access_keys (key_hash, asp_id, signing_secret, status, expires_at)
                     VALUES ($1, $2, $3, COALESCE($4, 'ACTIVE'), $5)
                     ON CONFLICT (key_hash) DO UPDATE SET signing_secret = EXCLUDED.signing_secret,
                         status = COALESCE($4, access_keys.status), expires_at = EXCLUDED.expires_at
                     WHERE access_keys.asp_id = EXCLUDED.asp_id
                     RETURNING 1",
                )
                .bind(hash_access_key(&k.access_key))
                .bind(&a.asp_id)
                .bind(&k.signing_secret)
                .bind(k.status.as_deref())
                .bind(k.expires_at)
                .fetch_optional(&mut *tx)
                .await?;
                if stored.is_none() {
                    // The key is half of a credential: its start is enough to find it.
                    let start: String = k.access_key.chars().take(8).collect();
                    return Err(bad(format!("accessKey {start}...: it belongs to another ASP, not {}", a.asp_id)));
                }
            }
            for k in &a.crypto_keys {
                let stored = sqlx::query_scalar::<_, i32>(
                    "INSERT INTO crypto_keys (key_id, asp_id, key_material) VALUES ($1, $2, $3)
                     ON CONFLICT (key_id) DO UPDATE SET key_material = EXCLUDED.key_material
                     WHERE crypto_keys.asp_id = EXCLUDED.asp_id
                     RETURNING 1",
                )
                .bind(&k.key_id)
                .bind(&a.asp_id)
                .bind(decode_key(&k.key).map_err(bad)?)
                .fetch_optional(&mut *tx)
                .await?;
                if stored.is_none() {
                    return Err(bad(format!("keyId {}: it belongs to another ASP, not {}", k.key_id, a.asp_id)));
                }
            }
        }
        for p in &self.products {
            sqlx::query(
                "INSERT INTO products (product_id, owner_affiliate_id, kind, collection_allowed, max_balance, min_usage_rate)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (product_id) DO UPDATE SET owner_affiliate_id = EXCLUDED.owner_affiliate_id, kind = EXCLUDED.kind,
                     collection_allowed = EXCLUDED.collection_allowed, max_balance = EXCLUDED.max_balance,
                     min_usage_rate = EXCLUDED.min_usage_rate",
            )
            .bind(&p.product_id)
            .bind(&p.owner_affiliate_id)
            .bind(p.kind.as_str())
            .bind(p.collection_allowed)
            .bind(p.max_balance)
            .bind(p.min_usage_rate)
            .execute(&mut *tx)
            .await?;
        }
        for m in &self.members {
            sqlx::query(
                "INSERT INTO members (user_id, affiliate_id) VALUES ($1, $2)
                 ON CONFLICT (user_id) DO UPDATE SET affiliate_id = EXCLUDED.affiliate_id",
            )
            .bind(Decimal::from(m.user_id.get()))
            .bind(&m.affiliate_id)
            .execute(&mut *tx)
            .await?;
        }
        for c in &self.cards {
            let kept_ledger_balance: bool = sqlx::query_scalar(
                "INSERT INTO cards (card_no, user_id, product_id, status, balance, opening_balance, total_loaded, expires_on, max_balance)
                 VALUES ($1, $2, $3, $4, $5, $5, $6, $7, $8)
                 ON CONFLICT (card_no) DO UPDATE SET product_id = EXCLUDED.product_id,
                     user_id = CASE WHEN cards.sequence = 0 THEN EXCLUDED.user_id ELSE cards.user_id END,
                     status = EXCLUDED.status, expires_on = EXCLUDED.expires_on, max_balance = EXCLUDED.max_balance,
                     balance = CASE WHEN cards.sequence = 0 THEN EXCLUDED.balance ELSE cards.balance END,
                     opening_balance = CASE WHEN cards.sequence = 0 THEN EXCLUDED.balance ELSE cards.opening_balance END,
                     total_loaded = CASE WHEN cards.sequence = 0 THEN EXCLUDED.total_loaded ELSE cards.total_loaded END,
                     updated_at = now()
                 RETURNING sequence > 0",
            )
            .bind(c.card_no.as_str())
            .bind(Decimal::from(c.user_id.get()))
            .bind(&c.product_id)
            .bind(c.status.as_str())
            .bind(c.balance)
            .bind(c.total_loaded)
            .bind(c.expires_on)
            .bind(c.max_balance)
            .fetch_one(&mut *tx)
            .await?;
            if kept_ledger_balance {
                tracing::warn!(
                    card_no = c.card_no.masked(),
                    "the card has ledger entries: its member and balance stay as the ledger left them, not as the fixture says"
                );
            }
        }
        tx.commit().await?;
        Ok(())
    }
}

fn is_whole_money(v: Decimal) -> bool {
    !v.is_sign_negative() && v.fract().is_zero()
}

fn decode_key(b64: &str) -> Result<Vec<u8>, String> {
    let key = base64::engine::general_purpose::STANDARD.decode(b64).map_err(|e| e.to_string())?;
    if key.len() != 32 {
        return Err(format!("a data key is 32 bytes, this one is {}", key.len()));
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_fixture_shape_parses() {
        let text = include_str!("../../../fixtures/demo.json");
        let f = Fixture::from_json(text).unwrap();
        assert!(!f.cards.is_empty());
    }

    fn with_card(card: &str) -> String {
        format!(
            r#"{{"cards":[{{"cardNo":"9410000000000001","userId":1001,"productId":"P","status":"ACTIVE",
                "expiresOn":"2030-12-31",{card}}}]}}"#
        )
    }

    #[test]
    fn a_card_with_whole_money_and_no_more_than_it_was_loaded_is_taken() {
        let text = with_card(r#""balance":300,"totalLoaded":1000,"maxBalance":2000"#);
        assert!(Fixture::from_json(&text).is_ok());
    }

    #[test]
    fn a_card_with_a_fraction_or_negative_money_is_refused_naming_the_field() {
        for (card, field) in [
            // A fraction as a JSON number does not even parse; as a string it does.
            (r#""balance":"100.5","totalLoaded":1000,"maxBalance":null"#, "balance"),
            (r#""balance":100,"totalLoaded":"1000.25","maxBalance":null"#, "totalLoaded"),
            (r#""balance":100,"totalLoaded":1000,"maxBalance":-1"#, "maxBalance"),
            (r#""balance":-1,"totalLoaded":1000,"maxBalance":null"#, "balance"),
        ] {
            let e = Fixture::from_json(&with_card(card)).unwrap_err().to_string();
            assert!(e.contains(field) && e.contains("not a whole"), "{card}: {e}");
        }
    }

    #[test]
    fn a_card_holding_more_than_was_loaded_onto_it_is_refused() {
        let e = Fixture::from_json(&with_card(r#""balance":1000,"totalLoaded":0,"maxBalance":null"#)).unwrap_err();
        assert!(e.to_string().contains("totalLoaded is below its balance"), "{e}");
    }

    #[test]
    fn a_product_with_a_usage_rate_outside_0_to_1_is_refused() {
        let text = r#"{"products":[{"productId":"G","ownerAffiliateId":"A","kind":"GIFT","collectionAllowed":true,
            "maxBalance":2000000,"minUsageRate":60}]}"#;
        assert!(Fixture::from_json(text).unwrap_err().to_string().contains("minUsageRate"));
    }

    #[test]
    fn an_access_key_of_the_wrong_length_is_refused() {
        let text = r#"{"asps":[{"aspId":"DEMOASP00000001","affiliateId":"A","accessKeys":[{"accessKey":"short","signingSecret":"s"}]}]}"#;
        assert!(Fixture::from_json(text).is_err());
    }
}
