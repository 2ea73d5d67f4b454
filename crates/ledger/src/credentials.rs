//! What the gateway needs to authenticate a caller: access keys (looked up by the
//! SHA-256 of the key, never stored in clear), signing secrets and data keys.

use crate::LedgerError;
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use sqlx::{PgPool, Row};

/// The SHA-256 of an access key, as stored.
pub fn hash_access_key(access_key: &str) -> String {
    hex::encode(Sha256::digest(access_key.as_bytes()))
}

#[derive(Clone)]
pub struct AccessKeyRecord {
    pub asp_id: String,
    pub affiliate_id: String,
    pub signing_secret: String,
    pub active: bool,
    pub expires_at: Option<DateTime<Utc>>,
    pub require_encryption: bool,
}

/// Without the signing secret: a record that reaches a log must not carry it.
impl std::fmt::Debug for AccessKeyRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessKeyRecord")
            .field("asp_id", &self.asp_id)
            .field("affiliate_id", &self.affiliate_id)
            .field("signing_secret", &"***")
            .field("active", &self.active)
            .field("expires_at", &self.expires_at)
            .field("require_encryption", &self.require_encryption)
            .finish()
    }
}

impl AccessKeyRecord {
    pub fn usable_at(&self, now: DateTime<Utc>) -> bool {
        self.active && self.expires_at.is_none_or(|e| e > now)
    }
}

pub async fn access_key(pool: &PgPool, access_key: &str) -> Result<Option<AccessKeyRecord>, LedgerError> {
    let row = sqlx::query(
        "SELECT k.asp_id, a.affiliate_id, k.signing_secret, k.status = 'ACTIVE' AS active, k.expires_at, a.require_encryption
         FROM access_keys k JOIN asps a ON a.asp_id = k.asp_id WHERE k.key_hash = $1",
    )
    .bind(hash_access_key(access_key))
    .fetch_optional(pool)
    .await?;
    row.map(|r| {
        Ok(AccessKeyRecord {
            asp_id: r.try_get("asp_id")?,
            affiliate_id: r.try_get("affiliate_id")?,
            signing_secret: r.try_get("signing_secret")?,
            active: r.try_get("active")?,
            expires_at: r.try_get("expires_at")?,
            require_encryption: r.try_get("require_encryption")?,
        })
    })
    .transpose()
    .map_err(|e: sqlx::Error| e.into())
}

#[derive(Clone)]
pub struct CryptoKeyRecord {
    pub asp_id: String,
    pub key: [u8; 32],
    pub active: bool,
}

impl std::fmt::Debug for CryptoKeyRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CryptoKeyRecord").field("asp_id", &self.asp_id).field("key", &"***").finish()
    }
}

pub async fn crypto_key(pool: &PgPool, key_id: &str) -> Result<Option<CryptoKeyRecord>, LedgerError> {
    let row =
        sqlx::query("SELECT asp_id, key_material, status = 'ACTIVE' AS active FROM crypto_keys WHERE key_id = $1")
            .bind(key_id)
            .fetch_optional(pool)
            .await?;
    row.map(|r| {
        let material: Vec<u8> = r.try_get("key_material")?;
        let key: [u8; 32] =
            material.try_into().map_err(|_| LedgerError::Corrupt(format!("crypto key {key_id} is not 32 bytes")))?;
        Ok(CryptoKeyRecord { asp_id: r.try_get("asp_id")?, key, active: r.try_get("active")? })
    })
    .transpose()
}
