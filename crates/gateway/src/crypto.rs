//! The transaction token and body encryption, shared by the server (to check) and
//! by clients (`cardflow sign`, tests, the bench) to produce. One implementation,
//! so client and server cannot drift apart.
//!
//! Token: `"v1"` + lowercase hex HMAC-SHA256, keyed with the access key's signing
//! secret, over `METHOD\nPATH\nAspId\nCorrelationId\nTranTime\nTimeZone\nhex(SHA-256(raw body))`.
//! Body encryption: `{"encData": base64(12-byte nonce ‖ ciphertext ‖ 16-byte tag)}`,
//! AES-256-GCM with the ASP's data key.

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// What the transaction token signs.
#[derive(Debug, Clone, Copy)]
pub struct TokenInput<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub asp_id: &'a str,
    pub correlation_id: &'a str,
    pub tran_time: &'a str,
    pub time_zone: &'a str,
    pub body: &'a [u8],
}

impl TokenInput<'_> {
    pub fn canonical(&self) -> String {
        format!(
            "{}\n{}\n{}\n{}\n{}\n{}\n{}",
            self.method,
            self.path,
            self.asp_id,
            self.correlation_id,
            self.tran_time,
            self.time_zone,
            hex::encode(Sha256::digest(self.body))
        )
    }

    fn mac(&self, secret: &str) -> HmacSha256 {
        let mut mac = <HmacSha256 as Mac>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
        mac.update(self.canonical().as_bytes());
        mac
    }

    /// The `X-KM-Tran-Token` a client sends.
    pub fn sign(&self, secret: &str) -> String {
        format!("v1{}", hex::encode(self.mac(secret).finalize().into_bytes()))
    }

    /// Checks a presented MAC in constant time.
    pub fn verify(&self, secret: &str, presented_mac: &[u8]) -> bool {
        self.mac(secret).verify_slice(presented_mac).is_ok()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("decryption failed")]
pub struct DecryptError;

/// Encrypts `plaintext` with a fresh random nonce into the `encData` text.
pub fn encrypt(key: &[u8; 32], plaintext: &[u8]) -> String {
    encrypt_with_nonce(key, &rand::random::<[u8; 12]>(), plaintext)
}

/// Encrypts with a given nonce. Only for test vectors: a nonce must never repeat
/// under one key.
pub fn encrypt_with_nonce(key: &[u8; 32], nonce: &[u8; 12], plaintext: &[u8]) -> String {
    let cipher = Aes256Gcm::new(key.into());
    let sealed = cipher.encrypt(Nonce::from_slice(nonce), plaintext).expect("AES-GCM encrypts any length we accept");
    let mut out = Vec::with_capacity(12 + sealed.len());
    out.extend_from_slice(nonce);
    out.extend_from_slice(&sealed);
    B64.encode(out)
}

pub fn decrypt(key: &[u8; 32], enc_data: &str) -> Result<Vec<u8>, DecryptError> {
    let raw = B64.decode(enc_data).map_err(|_| DecryptError)?;
    if raw.len() < 12 + 16 {
        return Err(DecryptError);
    }
    let (nonce, sealed) = raw.split_at(12);
    Aes256Gcm::new(key.into()).decrypt(Nonce::from_slice(nonce), sealed).map_err(|_| DecryptError)
}

/// Wraps ciphertext as the JSON envelope.
pub fn envelope(enc_data: &str) -> String {
    serde_json::json!({ "encData": enc_data }).to_string()
}

/// An envelope body. Derived, so that `encData` given twice is refused (serde's
/// derive does, a `Value` keeps the last): readers of a repeated key disagree on
/// which ciphertext was sent.
#[derive(serde::Deserialize)]
struct Envelope {
    #[serde(rename = "encData")]
    enc_data: String,
}

/// Reads `encData` from an envelope body.
pub fn open_envelope(key: &[u8; 32], body: &[u8]) -> Result<Vec<u8>, DecryptError> {
    let envelope: Envelope = serde_json::from_slice(body).map_err(|_| DecryptError)?;
    decrypt(key, &envelope.enc_data)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The test vector printed in the README: client authors check against it.
    pub const VECTOR_SECRET: &str = "demo-signing-secret-change-me";

    fn vector_input() -> TokenInput<'static> {
        TokenInput {
            method: "POST",
            path: "/api/v1/transfer/balance",
            asp_id: "DEMOASP00000001",
            correlation_id: "261124153000-00000a1",
            tran_time: "20261124153000",
            time_zone: "KST",
            body: br#"{"userId":1001,"fromCardNo":"9410000000000001","toCardNo":"9410000000000002","amount":30000}"#,
        }
    }

    #[test]
    fn the_readme_token_vector_holds() {
        let token = vector_input().sign(VECTOR_SECRET);
        assert_eq!(token, include_str!("../../../docs/vectors/token.txt").trim());
        assert_eq!(token.len(), 66);
    }

    #[test]
    fn the_readme_encryption_vector_holds() {
        let key: [u8; 32] = core::array::from_fn(|i| i as u8);
        let nonce: [u8; 12] = core::array::from_fn(|i| (0xa0 + i) as u8);
        let enc = encrypt_with_nonce(&key, &nonce, vector_input().body);
        assert_eq!(enc, include_str!("../../../docs/vectors/encdata.txt").trim());
        assert_eq!(decrypt(&key, &enc).unwrap(), vector_input().body);
    }

    #[test]
    fn a_token_verifies_only_its_own_input() {
        let input = vector_input();
        let token = input.sign(VECTOR_SECRET);
        let mac = hex::decode(&token[2..]).unwrap();
        assert!(input.verify(VECTOR_SECRET, &mac));
        assert!(!input.verify("other-secret", &mac));
        let other_path = TokenInput { path: "/api/v1/transfer/other", ..input };
        assert!(!other_path.verify(VECTOR_SECRET, &mac));
        let other_body = TokenInput { body: b"{}", ..input };
        assert!(!other_body.verify(VECTOR_SECRET, &mac));
    }

    #[test]
    fn a_tampered_ciphertext_does_not_decrypt() {
        let key = [7u8; 32];
        let enc = encrypt(&key, b"hello");
        let mut raw = B64.decode(&enc).unwrap();
        let last = raw.len() - 1;
        raw[last] ^= 1;
        assert_eq!(decrypt(&key, &B64.encode(raw)), Err(DecryptError));
        assert_eq!(decrypt(&[8u8; 32], &enc), Err(DecryptError));
        assert_eq!(decrypt(&key, "not base64!"), Err(DecryptError));
    }

    #[test]
    fn an_envelope_opens_and_one_with_encdata_twice_does_not() {
        let key = [7u8; 32];
        let (first, second) = (encrypt(&key, b"first"), encrypt(&key, b"second"));
        let once = format!(r#"{{"encData": "{first}"}}"#);
        let twice = format!(r#"{{"encData": "{first}", "encData": "{second}"}}"#);
        assert_eq!(open_envelope(&key, once.as_bytes()), Ok(b"first".to_vec()));
        assert_eq!(open_envelope(&key, twice.as_bytes()), Err(DecryptError));
    }
}
