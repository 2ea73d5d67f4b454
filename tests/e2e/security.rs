//! Authentication, the time window and body encryption, end to end.

use crate::helpers::*;
use cardflow_gateway::client::Credentials;

fn with_header(
    mut req: cardflow_gateway::client::SignedRequest,
    name: &str,
    value: &str,
) -> cardflow_gateway::client::SignedRequest {
    for h in req.headers.iter_mut() {
        if h.0 == name {
            h.1 = value.to_string();
        }
    }
    req
}

#[tokio::test]
async fn a_wrong_signing_secret_fails_authentication_and_moves_nothing() {
    let sys = shared();
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(1_000), CardSpec::prepaid(0)]).await;
    let creds = Credentials { signing_secret: "not-the-secret".into(), ..credentials() };
    let req = sign_with(
        &creds,
        "POST",
        "/api/v1/transfer/balance",
        m.body(0, 1, Some(1)).to_string().as_bytes(),
        None,
        false,
    );

    let reply = sys.send(&req, &[]).await;

    assert_eq!((reply.status, reply.code(), reply.message()), (401, "000_001", "Authentication failed."));
    assert_eq!(balance(&pool, m.card(0)).await, dec(1_000));
}

#[tokio::test]
async fn an_unknown_access_key_fails_authentication() {
    let sys = shared();
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(1_000), CardSpec::prepaid(0)]).await;
    let req = with_header(sign_post(&m.body(0, 1, Some(1)), None, false), "X-KM-Access-Key", &"X".repeat(40));
    let reply = sys.send(&req, &[]).await;
    assert_eq!((reply.status, reply.code()), (401, "000_001"));
    assert_eq!(balance(&pool, m.card(0)).await, dec(1_000));
}

#[tokio::test]
async fn a_request_signed_for_another_body_fails_authentication() {
    let sys = shared();
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(1_000), CardSpec::prepaid(0)]).await;
    let mut req = sign_post(&m.body(0, 1, Some(1)), None, false);
    req.body = m.body(0, 1, Some(999)).to_string().into_bytes();

    let reply = sys.send(&req, &[]).await;

    assert_eq!((reply.status, reply.code()), (401, "000_001"));
    assert_eq!(balance(&pool, m.card(0)).await, dec(1_000));
}

#[tokio::test]
async fn a_request_signed_for_another_path_fails_authentication() {
    let sys = shared();
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(1_000), CardSpec::prepaid(0)]).await;
    let body = m.body(0, 1, Some(1)).to_string();
    let mut req = sign_with(&credentials(), "POST", "/api/v1/transfer/other", body.as_bytes(), None, false);
    req.path = "/api/v1/transfer/balance".into();
    let reply = sys.send(&req, &[]).await;
    assert_eq!((reply.status, reply.code()), (401, "000_001"));
    assert_eq!(balance(&pool, m.card(0)).await, dec(1_000));
}

#[tokio::test]
async fn a_request_time_outside_the_window_is_refused() {
    let sys = shared();
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(1_000), CardSpec::prepaid(0)]).await;
    let body = m.body(0, 1, Some(1)).to_string();
    let old = chrono::Utc::now() - chrono::Duration::seconds(301);
    let req = cardflow_gateway::client::sign(
        &credentials(),
        cardflow_gateway::client::SignOptions {
            method: "POST",
            path: "/api/v1/transfer/balance",
            body: body.as_bytes(),
            encrypt: false,
            correlation_id: None,
            time_zone: cardflow_domain::ClientTimeZone::parse("UTC").unwrap(),
            now: old,
        },
    );
    let reply = sys.send(&req, &[]).await;
    assert_eq!(
        (reply.status, reply.code(), reply.message()),
        (401, "000_006", "Request time is out of the allowed window.")
    );
    assert_eq!(balance(&pool, m.card(0)).await, dec(1_000));
}

#[tokio::test]
async fn a_missing_header_is_named() {
    let sys = shared();
    let mut req = sign_post(&serde_json::json!({}), None, false);
    req.headers.retain(|h| h.0 != "X-KM-Tran-Token");
    let reply = sys.send(&req, &[]).await;
    assert_eq!(
        (reply.status, reply.code(), reply.message()),
        (400, "000_003", "Missing required values. X-KM-Tran-Token")
    );
}

#[tokio::test]
async fn a_header_sent_twice_is_an_invalid_value_and_moves_nothing() {
    let sys = shared();
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(1_000), CardSpec::prepaid(0)]).await;
    let req = sign_post(&m.body(0, 1, Some(100)), None, false);

    let reply = sys.send(&req, &[("X-KM-Correlation-Id", &fresh_correlation_id())]).await;

    assert_eq!((reply.status, reply.code(), reply.message()), (400, "000_004", "Invalid value. X-KM-Correlation-Id"));
    assert_eq!(balance(&pool, m.card(0)).await, dec(1_000));
}

#[tokio::test]
async fn an_encrypted_request_gets_an_encrypted_answer() {
    let sys = shared();
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(1_000), CardSpec::prepaid(0)]).await;

    let reply = sys.send(&sign_post(&m.body(0, 1, Some(250)), None, true), &[]).await;

    assert_eq!(reply.header("x-km-crypto-key-id"), Some(CRYPTO_KEY_ID));
    assert!(reply.raw.contains("encData") && !reply.raw.contains("000_000"), "the wire shows only ciphertext");
    assert_eq!((reply.status, reply.code()), (200, "000_000"));
    assert_eq!(reply.amount(), Some(dec(250)));
}

#[tokio::test]
async fn an_encrypted_rejection_is_encrypted_too() {
    let sys = shared();
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(10), CardSpec::prepaid(0)]).await;

    let reply = sys.send(&sign_post(&m.body(0, 1, Some(250)), None, true), &[]).await;

    assert_eq!(reply.header("x-km-crypto-key-id"), Some(CRYPTO_KEY_ID));
    assert_eq!((reply.status, reply.code()), (400, "005_018"));
}

#[tokio::test]
async fn a_body_that_does_not_decrypt_is_000_007() {
    let sys = shared();
    let creds = credentials();
    let mut req = sign_post(&serde_json::json!({}), None, true);
    // Re-sign a tampered envelope so only the decryption can fail.
    let tampered = br#"{"encData":"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}"#;
    let cid = req.correlation_id.clone();
    req = sign_with(&creds, "POST", "/api/v1/transfer/balance", tampered, Some(cid), false);
    req.headers.insert(3, ("X-KM-Crypto-Key-Id".into(), CRYPTO_KEY_ID.into()));

    let reply = sys.send(&req, &[]).await;

    assert_eq!((reply.status, reply.code(), reply.message()), (400, "000_007", "Decryption failed."));
}

#[tokio::test]
async fn an_oversized_body_is_refused_before_parsing() {
    let sys = shared();
    let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(17 * 1024));
    let req = sign_with(&credentials(), "POST", "/api/v1/transfer/balance", big.as_bytes(), None, false);
    let reply = sys.send(&req, &[]).await;
    assert_eq!((reply.status, reply.code()), (413, "000_005"));
}

#[tokio::test]
async fn a_body_that_gives_the_amount_twice_is_refused_and_moves_nothing() {
    let sys = shared();
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(1_000), CardSpec::prepaid(0)]).await;
    let body = format!(
        r#"{{"userId": {}, "fromCardNo": "{}", "toCardNo": "{}", "amount": 1, "amount": 1000}}"#,
        m.user_id,
        m.card(0),
        m.card(1)
    );
    let req = sign_with(&credentials(), "POST", "/api/v1/transfer/balance", body.as_bytes(), None, false);

    let reply = sys.send(&req, &[]).await;

    assert_eq!((reply.status, reply.code(), reply.message()), (400, "000_005", "Malformed request body. amount"));
    assert_eq!(balance(&pool, m.card(0)).await, dec(1_000));
}

fn key_creds(asp_id: &str, access_key: &str) -> Credentials {
    Credentials { asp_id: asp_id.into(), access_key: access_key.into(), ..credentials() }
}

async fn send_as(sys: &System, creds: &Credentials, body: &serde_json::Value) -> Reply {
    let req = sign_with(creds, "POST", "/api/v1/transfer/balance", body.to_string().as_bytes(), None, false);
    sys.send(&req, &[]).await
}

#[tokio::test]
async fn a_disabled_or_expired_access_key_fails_authentication() {
    let sys = shared();
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(1_000), CardSpec::prepaid(0)]).await;
    for key in [DISABLED_KEY, EXPIRED_KEY] {
        let reply = send_as(sys, &key_creds(ASP_ID, key), &m.body(0, 1, Some(1))).await;
        assert_eq!((reply.status, reply.code()), (401, "000_001"), "{key}");
    }
    assert_eq!(balance(&pool, m.card(0)).await, dec(1_000));
}

#[tokio::test]
async fn an_access_key_of_another_asp_fails_authentication() {
    let sys = shared();
    let reply = send_as(sys, &key_creds(ASP_ID_2, ACCESS_KEY), &serde_json::json!({})).await;
    assert_eq!((reply.status, reply.code()), (401, "000_001"));
}

#[tokio::test]
async fn an_asp_that_requires_encryption_refuses_a_plain_body() {
    let sys = shared();
    let creds = Credentials { crypto_key: None, ..key_creds(ASP_ID_2, ACCESS_KEY_2) };
    let reply = send_as(sys, &creds, &serde_json::json!({})).await;
    assert_eq!(
        (reply.status, reply.code(), reply.message()),
        (400, "000_003", "Missing required values. X-KM-Crypto-Key-Id")
    );
}

#[tokio::test]
async fn a_data_key_of_another_asp_is_000_007() {
    let sys = shared();
    let creds = key_creds(ASP_ID_2, ACCESS_KEY_2);
    let req = sign_with(&creds, "POST", "/api/v1/transfer/balance", b"{}", None, true);
    let reply = sys.send(&req, &[]).await;
    assert_eq!((reply.status, reply.code()), (400, "000_007"));
}

#[tokio::test]
async fn a_data_key_that_does_not_exist_is_000_007_and_moves_nothing() {
    let sys = shared();
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(1_000), CardSpec::prepaid(0)]).await;
    let creds =
        Credentials { crypto_key: Some(("NOSUCHKEY".repeat(4)[..32].to_string(), CRYPTO_KEY)), ..credentials() };
    let body = m.body(0, 1, Some(1)).to_string();
    let req = sign_with(&creds, "POST", "/api/v1/transfer/balance", body.as_bytes(), None, true);
    let reply = sys.send(&req, &[]).await;
    assert_eq!((reply.status, reply.code(), reply.message()), (400, "000_007", "Decryption failed."));
    assert_eq!(balance(&pool, m.card(0)).await, dec(1_000));
}

#[tokio::test]
async fn an_envelope_that_is_not_base64_is_000_007() {
    let sys = shared();
    let cid = fresh_correlation_id();
    let mut req = sign_with(
        &credentials(),
        "POST",
        "/api/v1/transfer/balance",
        br#"{"encData":"%%%not base64%%%"}"#,
        Some(cid),
        false,
    );
    req.headers.insert(3, ("X-KM-Crypto-Key-Id".into(), CRYPTO_KEY_ID.into()));
    let reply = sys.send(&req, &[]).await;
    assert_eq!((reply.status, reply.code()), (400, "000_007"));
}

#[tokio::test]
async fn a_replayed_request_is_answered_with_the_first_result_and_not_applied_twice() {
    let sys = shared();
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(1_000), CardSpec::prepaid(0)]).await;
    let captured = sign_post(&m.body(0, 1, Some(400)), None, false);

    let first = sys.send(&captured, &[]).await;
    let replayed = sys.send(&captured, &[]).await;

    assert_eq!((first.status, first.code()), (200, "000_000"));
    assert_eq!(replayed.json, first.json);
    assert_eq!(balance(&pool, m.card(0)).await, dec(600));
}

#[tokio::test]
async fn rotated_keys_both_work_and_a_disabled_one_fails_after_the_cache_ttl() {
    let sys = System::start(Roles { gateway_env: vec![("KEY_CACHE_TTL_SECS", "1".into())], ..Roles::default() });
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(1_000), CardSpec::prepaid(0)]).await;
    let new_key = "E2EACCESSKEY000000000000000000000ROTATED";
    let fixture = serde_json::json!({"asps": [{"aspId": ASP_ID, "affiliateId": AFFILIATE,
        "accessKeys": [{"accessKey": new_key, "signingSecret": "rotated-secret"}]}]});
    cardflow_ledger::Fixture::from_json(&fixture.to_string()).unwrap().load(&pool).await.unwrap();
    let rotated = Credentials { signing_secret: "rotated-secret".into(), ..key_creds(ASP_ID, new_key) };

    assert_eq!(send_as(&sys, &credentials(), &m.body(0, 1, Some(1))).await.code(), "000_000");
    assert_eq!(send_as(&sys, &rotated, &m.body(0, 1, Some(1))).await.code(), "000_000");

    sqlx::query("UPDATE access_keys SET status = 'DISABLED' WHERE key_hash = $1")
        .bind(cardflow_ledger::credentials::hash_access_key(ACCESS_KEY))
        .execute(&pool)
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;

    let old = send_as(&sys, &credentials(), &m.body(0, 1, Some(1))).await;
    assert_eq!((old.status, old.code()), (401, "000_001"));
    assert_eq!(send_as(&sys, &rotated, &m.body(0, 1, Some(1))).await.code(), "000_000");
    assert_eq!(balance(&pool, m.card(0)).await, dec(997));
}

#[tokio::test]
async fn over_the_asp_rate_limit_the_answer_is_429_with_retry_after() {
    let sys = System::start(Roles { gateway_env: vec![("RATE_LIMIT_PER_ASP", "2".into())], ..Roles::default() });
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(1_000), CardSpec::prepaid(0)]).await;

    let replies = futures::future::join_all((0..10).map(|_| {
        let (sys, body) = (&sys, m.body(0, 1, Some(1)));
        async move { send_as(sys, &credentials(), &body).await }
    }))
    .await;

    let limited: Vec<&Reply> = replies.iter().filter(|r| r.status == 429).collect();
    let applied = replies.iter().filter(|r| r.code() == "000_000").count();
    assert!(!limited.is_empty(), "some requests are limited");
    assert!(limited.iter().all(|r| r.code() == "000_011" && r.header("retry-after").is_some()));
    assert_eq!(applied + limited.len(), 10);
    assert_eq!(balance(&pool, m.card(0)).await, dec(1_000 - applied as i64));
}

async fn access_key_status(pool: &sqlx::PgPool, key: &str) -> String {
    sqlx::query_scalar("SELECT status FROM access_keys WHERE key_hash = $1")
        .bind(cardflow_ledger::credentials::hash_access_key(key))
        .fetch_one(pool)
        .await
        .unwrap()
}

fn seed_access_key(key: &str, asp_id: &str, status: Option<&str>) -> cardflow_ledger::Fixture {
    let mut entry = serde_json::json!({"accessKey": key, "signingSecret": "seeded-secret"});
    if let Some(s) = status {
        entry["status"] = s.into();
    }
    let fixture = serde_json::json!({"asps": [{"aspId": asp_id, "affiliateId": AFFILIATE, "accessKeys": [entry]}]});
    cardflow_ledger::Fixture::from_json(&fixture.to_string()).unwrap()
}

fn fresh_access_key() -> String {
    format!("E2EACCESSKEYSEED{:024}", unique())
}

#[tokio::test]
async fn a_re_seed_that_names_no_status_leaves_a_disabled_access_key_disabled() {
    let pool = shared().pool().await;
    let key = fresh_access_key();
    seed_access_key(&key, ASP_ID, None).load(&pool).await.unwrap();
    sqlx::query("UPDATE access_keys SET status = 'DISABLED' WHERE key_hash = $1")
        .bind(cardflow_ledger::credentials::hash_access_key(&key))
        .execute(&pool)
        .await
        .unwrap();

    seed_access_key(&key, ASP_ID, None).load(&pool).await.unwrap();
    assert_eq!(access_key_status(&pool, &key).await, "DISABLED");
    seed_access_key(&key, ASP_ID, Some("ACTIVE")).load(&pool).await.unwrap();
    assert_eq!(access_key_status(&pool, &key).await, "ACTIVE", "a fixture that names the status sets it");
}

#[tokio::test]
async fn a_seed_cannot_move_an_access_key_to_another_asp() {
    let pool = shared().pool().await;
    let key = fresh_access_key();
    seed_access_key(&key, ASP_ID, None).load(&pool).await.unwrap();

    let e = seed_access_key(&key, ASP_ID_3, None).load(&pool).await.unwrap_err().to_string();
    assert!(e.contains("belongs to another ASP"), "{e}");
    let owner: String = sqlx::query_scalar("SELECT asp_id FROM access_keys WHERE key_hash = $1")
        .bind(cardflow_ledger::credentials::hash_access_key(&key))
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(owner, ASP_ID);
}
