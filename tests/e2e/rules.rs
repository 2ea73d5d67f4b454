//! Every rule of the spec, end to end: one case per result code, each asserting the
//! HTTP status, code and message, and that nothing moved.

use crate::helpers::*;
use serde_json::{json, Value};

struct Case {
    name: &'static str,
    cards: Vec<CardSpec>,
    body: fn(&Member) -> Value,
    status: u16,
    code: &'static str,
    message: &'static str,
}

fn card(product: &'static str, status: &'static str, balance: i64) -> CardSpec {
    CardSpec { product, status, balance, ..CardSpec::prepaid(balance) }
}

fn without(mut v: Value, field: &str) -> Value {
    v.as_object_mut().unwrap().remove(field);
    v
}

fn with(mut v: Value, field: &str, value: Value) -> Value {
    v[field] = value;
    v
}

fn cases() -> Vec<Case> {
    let two = || vec![CardSpec::prepaid(1_000), CardSpec::prepaid(0)];
    vec![
        Case {
            name: "missing toCardNo",
            cards: two(),
            body: |m| without(m.body(0, 1, Some(1)), "toCardNo"),
            status: 400,
            code: "000_003",
            message: "Missing required values. toCardNo",
        },
        Case {
            name: "absent amount (null asks for the whole balance; a missing key is a mistake)",
            cards: two(),
            body: |m| without(m.body(0, 1, Some(1)), "amount"),
            status: 400,
            code: "000_003",
            message: "Missing required values. amount",
        },
        Case {
            name: "null userId",
            cards: two(),
            body: |m| with(m.body(0, 1, Some(1)), "userId", Value::Null),
            status: 400,
            code: "000_003",
            message: "Missing required values. userId",
        },
        Case {
            name: "card number of 15 digits",
            cards: two(),
            body: |m| with(m.body(0, 1, Some(1)), "fromCardNo", json!("941000000000001")),
            status: 400,
            code: "000_004",
            message: "Invalid value. fromCardNo",
        },
        Case {
            name: "fractional amount",
            cards: two(),
            body: |m| with(m.body(0, 1, Some(1)), "amount", json!(1.5)),
            status: 400,
            code: "000_004",
            message: "Invalid value. amount",
        },
        Case {
            name: "negative amount",
            cards: two(),
            body: |m| with(m.body(0, 1, Some(1)), "amount", json!(-1)),
            status: 400,
            code: "000_004",
            message: "Invalid value. amount",
        },
        Case {
            name: "amount over the maximum",
            cards: two(),
            body: |m| with(m.body(0, 1, Some(1)), "amount", json!(1_000_000_000_000u64)),
            status: 400,
            code: "000_004",
            message: "Invalid value. amount",
        },
        Case {
            name: "userId as a string",
            cards: two(),
            body: |m| with(m.body(0, 1, Some(1)), "userId", json!(m.user_id.to_string())),
            status: 400,
            code: "000_004",
            message: "Invalid value. userId",
        },
        Case {
            name: "body that is not an object",
            cards: two(),
            body: |_| json!([1, 2, 3]),
            status: 400,
            code: "000_005",
            message: "Malformed request body.",
        },
        Case {
            name: "same card",
            cards: two(),
            body: |m| m.body(0, 0, Some(1)),
            status: 400,
            code: "017_003",
            message: "Value transfer between same card.",
        },
        Case {
            name: "sending card unknown",
            cards: two(),
            body: |m| with(m.body(0, 1, Some(1)), "fromCardNo", json!("0000000000000000")),
            status: 400,
            code: "017_011",
            message: "Card not found or not registered to the member. fromCardNo",
        },
        Case {
            name: "cards of another member",
            cards: two(),
            body: |m| with(m.body(0, 1, Some(1)), "userId", json!(m.user_id + 1)),
            status: 400,
            code: "017_011",
            message: "Card not found or not registered to the member. fromCardNo",
        },
        Case {
            name: "receiving card unknown",
            cards: two(),
            body: |m| with(m.body(0, 1, Some(1)), "toCardNo", json!("0000000000000000")),
            status: 400,
            code: "017_011",
            message: "Card not found or not registered to the member. toCardNo",
        },
        Case {
            name: "gift card not active",
            cards: vec![
                CardSpec { total_loaded: Some(10_000), ..card("GIFT-60", "SUSPENDED", 1_000) },
                CardSpec::prepaid(0),
            ],
            body: |m| m.body(0, 1, None),
            status: 400,
            code: "017_007",
            message: "Gift card status is not active.",
        },
        Case {
            name: "gift card expired",
            cards: vec![
                CardSpec::prepaid(1_000),
                CardSpec { expires_on: "2020-01-01", ..card("GIFT-60", "ACTIVE", 0) },
            ],
            body: |m| m.body(0, 1, None),
            status: 400,
            code: "017_008",
            message: "Gift card is over expiration date.",
        },
        Case {
            name: "prepaid card lost",
            cards: vec![card("PREPAID", "LOST", 1_000), CardSpec::prepaid(0)],
            body: |m| m.body(0, 1, None),
            status: 400,
            code: "017_010",
            message: "Card status not allowed.",
        },
        Case {
            name: "prepaid card expired",
            cards: vec![CardSpec { expires_on: "2020-01-01", ..CardSpec::prepaid(1_000) }, CardSpec::prepaid(0)],
            body: |m| m.body(0, 1, None),
            status: 400,
            code: "017_010",
            message: "Card status not allowed.",
        },
        Case {
            name: "owner affiliate missing",
            cards: vec![CardSpec::prepaid(1_000), card("NO-OWNER", "ACTIVE", 0)],
            body: |m| m.body(0, 1, None),
            status: 400,
            code: "017_006",
            message: "Owner affiliate not found.",
        },
        Case {
            name: "product of another affiliate",
            cards: vec![card("OTHER-OWNER", "ACTIVE", 1_000), CardSpec::prepaid(0)],
            body: |m| m.body(0, 1, None),
            status: 400,
            code: "017_004",
            message: "Input affiliateId is not same as owner affiliateId.",
        },
        Case {
            name: "product without collection",
            cards: vec![card("NO-COLLECT", "ACTIVE", 1_000), CardSpec::prepaid(0)],
            body: |m| m.body(0, 1, None),
            status: 400,
            code: "017_005",
            message: "Product is not allowed collection.",
        },
        Case {
            name: "gift card used too little",
            cards: vec![CardSpec { total_loaded: Some(1_000), ..card("GIFT-60", "ACTIVE", 500) }, CardSpec::prepaid(0)],
            body: |m| m.body(0, 1, None),
            status: 400,
            code: "017_009",
            message: "Invalid balance usage percentage.",
        },
        Case {
            name: "zero balance",
            cards: vec![CardSpec::prepaid(0), CardSpec::prepaid(0)],
            body: |m| m.body(0, 1, None),
            status: 400,
            code: "005_017",
            message: "Possible collection balance is zero.",
        },
        Case {
            name: "more than the balance",
            cards: two(),
            body: |m| m.body(0, 1, Some(1_001)),
            status: 400,
            code: "005_018",
            message: "There is not enough balance to transfer.",
        },
        Case {
            name: "receiver over its own maximum",
            cards: vec![CardSpec::prepaid(1_000), CardSpec { max_balance: Some(1_000), ..CardSpec::prepaid(900) }],
            body: |m| m.body(0, 1, Some(200)),
            status: 400,
            code: "017_001",
            message: "Balance is over the max.",
        },
        Case {
            name: "receiver over its product's maximum",
            cards: vec![CardSpec::prepaid(1_000), CardSpec::prepaid(999_900)],
            body: |m| m.body(0, 1, Some(101)),
            status: 400,
            code: "017_001",
            message: "Balance is over the max.",
        },
    ]
}

#[tokio::test]
async fn every_rule_answers_its_code_and_moves_nothing() {
    let sys = shared();
    let pool = sys.pool().await;
    let mut failures = Vec::new();
    for case in cases() {
        let m = seed_member(&pool, &case.cards).await;
        let before: Vec<_> = futures::future::join_all(m.cards.iter().map(|c| balance(&pool, c))).await;
        let reply = sys.transfer(&(case.body)(&m)).await;
        let after: Vec<_> = futures::future::join_all(m.cards.iter().map(|c| balance(&pool, c))).await;
        let got = (reply.status, reply.code().to_string(), reply.message().to_string());
        let want = (case.status, case.code.to_string(), case.message.to_string());
        if got != want || before != after {
            failures.push(format!("{}: got {got:?}, want {want:?}, balances {before:?} -> {after:?}", case.name));
        }
    }
    assert!(failures.is_empty(), "failing cases:\n{}", failures.join("\n"));
}

#[tokio::test]
async fn a_gift_card_used_enough_may_be_collected() {
    let sys = shared();
    let pool = sys.pool().await;
    let m = seed_member(
        &pool,
        &[CardSpec { total_loaded: Some(1_000), ..card("GIFT-60", "ACTIVE", 400) }, CardSpec::prepaid(0)],
    )
    .await;

    let reply = sys.transfer(&m.body(0, 1, None)).await;

    assert_eq!((reply.status, reply.code()), (200, "000_000"));
    assert_eq!(reply.amount(), Some(dec(400)));
}

#[tokio::test]
async fn a_transfer_that_cannot_be_applied_is_answered_017_002_and_recorded() {
    let sys = shared();
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(1_000), CardSpec::prepaid(0)]).await;
    // Fault injection in the real database: writing this card's entries fails.
    let trigger = format!("fail_{}", m.card(1));
    sqlx::query(&format!(
        "CREATE FUNCTION {trigger}() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN IF NEW.card_no = '{}' THEN RAISE EXCEPTION 'injected fault'; END IF; RETURN NEW; END $$",
        m.card(1)
    ))
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(&format!(
        "CREATE TRIGGER {trigger} BEFORE INSERT ON ledger_entries FOR EACH ROW EXECUTE FUNCTION {trigger}()"
    ))
    .execute(&pool)
    .await
    .unwrap();
    let cid = fresh_correlation_id();
    let body = m.body(0, 1, Some(100));

    let reply = sys.send(&sign_post(&body, Some(cid.clone()), false), &[]).await;
    sqlx::query(&format!("DROP TRIGGER {trigger} ON ledger_entries")).execute(&pool).await.unwrap();

    assert_eq!((reply.status, reply.code(), reply.message()), (400, "017_002", "Failed to balance transfer."));
    assert_eq!(balance(&pool, m.card(0)).await, dec(1_000));
    let failures = metric(&sys.metrics("worker").await, "cardflow_worker_batch_failures_total ");
    assert!(failures.is_some_and(|n| n >= 1.0), "the failed batch is counted: {failures:?}");
    // Recorded: the same request later gets the same answer, even though it would now succeed.
    let again = sys.send(&sign_post(&body, Some(cid), false), &[]).await;
    assert_eq!((again.status, again.code()), (400, "017_002"));
    assert_eq!(balance(&pool, m.card(0)).await, dec(1_000));
}

#[tokio::test]
async fn the_largest_user_id_works_end_to_end() {
    let sys = shared();
    let pool = sys.pool().await;
    let m =
        seed_member_with_id(&pool, 9_999_999_999_999_999_999, &[CardSpec::prepaid(500), CardSpec::prepaid(0)]).await;
    let body: Value = serde_json::from_str(&format!(
        r#"{{"userId": 9999999999999999999, "fromCardNo": "{}", "toCardNo": "{}", "amount": 200}}"#,
        m.card(0),
        m.card(1)
    ))
    .unwrap();

    let reply = sys.transfer(&body).await;

    assert_eq!((reply.status, reply.code()), (200, "000_000"), "{:?}", reply.json);
    let stored: String = sqlx::query_scalar("SELECT user_id::text FROM ledger_entries WHERE card_no = $1")
        .bind(m.card(0))
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(stored, "9999999999999999999");
}
