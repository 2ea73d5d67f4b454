//! The walking skeleton: a transfer travels gateway → Kafka → worker → ledger →
//! outbox → relay → reply, and the money and events show it.

use crate::helpers::*;
use cardflow_domain::command::SCHEMA_VERSION;
use cardflow_domain::{
    AspId, CardNo, CorrelationId, Money, ReplyAddress, ResultCode, TransferCommand, TransferRequest, UserId,
};
use serde_json::{json, Value};
use std::time::Duration;

#[tokio::test]
async fn a_transfer_over_http_moves_the_money_and_announces_both_balances() {
    let sys = shared();
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(50_000), CardSpec::prepaid(10_000)]).await;

    let reply = sys.transfer(&m.body(0, 1, Some(30_000))).await;

    assert_eq!(reply.status, 200, "{:?}", reply.json);
    assert_eq!(reply.code(), "000_000");
    assert_eq!(reply.message(), "Success.");
    assert_eq!(reply.amount(), Some(dec(30_000)));
    assert!(reply.header("x-km-correlation-id").is_some());
    assert_eq!(balance(&pool, m.card(0)).await, dec(20_000));
    assert_eq!(balance(&pool, m.card(1)).await, dec(40_000));
    assert_eq!(entries(&pool, m.card(0)).await, vec![("DEBIT".into(), dec(30_000), dec(20_000), 1)]);
    assert_eq!(entries(&pool, m.card(1)).await, vec![("CREDIT".into(), dec(30_000), dec(40_000), 1)]);

    let cards = [m.card(0).to_string(), m.card(1).to_string()];
    let events =
        read_topic(&sys.bus, &sys.bus.topics.card_balance, sys.bus.partitions, Duration::from_secs(20), |seen| {
            cards.iter().all(|c| seen.iter().any(|(k, _, _)| k == c))
        })
        .await;
    let mine: Vec<&Value> = events.iter().filter(|(k, _, _)| cards.contains(k)).map(|(_, v, _)| v).collect();
    assert_eq!(mine.len(), 2, "one event per card: {mine:?}");
    let of = |card: &str| mine.iter().find(|e| e["cardNo"] == card).unwrap();
    assert_eq!(of(m.card(0))["delta"], "-30000");
    assert_eq!(of(m.card(0))["balanceAfter"], "20000");
    assert_eq!(of(m.card(0))["sequence"], 1);
    assert_eq!(of(m.card(1))["delta"], "30000");
    assert_eq!(of(m.card(1))["balanceAfter"], "40000");
    assert_eq!(of(m.card(1))["userId"].as_u64(), Some(m.user_id));
}

#[tokio::test]
async fn a_null_amount_transfers_the_whole_balance() {
    let sys = shared();
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(12_345), CardSpec::prepaid(5)]).await;
    let mut body = m.body(0, 1, None);
    body["amount"] = Value::Null;

    let reply = sys.transfer(&body).await;

    assert_eq!((reply.status, reply.code()), (200, "000_000"));
    assert_eq!(reply.amount(), Some(dec(12_345)));
    assert_eq!(balance(&pool, m.card(0)).await, dec(0));
    assert_eq!(balance(&pool, m.card(1)).await, dec(12_350));
}

#[tokio::test]
async fn a_zero_amount_transfers_the_whole_balance() {
    let sys = shared();
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(777), CardSpec::prepaid(0)]).await;

    let reply = sys.transfer(&m.body(0, 1, Some(0))).await;

    assert_eq!((reply.status, reply.code()), (200, "000_000"));
    assert_eq!(reply.amount(), Some(dec(777)));
    assert_eq!(balance(&pool, m.card(1)).await, dec(777));
}

#[tokio::test]
async fn insufficient_balance_is_refused_and_moves_nothing() {
    let sys = shared();
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(100), CardSpec::prepaid(0)]).await;

    let reply = sys.transfer(&m.body(0, 1, Some(101))).await;

    assert_eq!((reply.status, reply.code()), (400, "005_018"));
    assert_eq!(reply.message(), "There is not enough balance to transfer.");
    assert_eq!(reply.json.get("amount"), None);
    assert_eq!(balance(&pool, m.card(0)).await, dec(100));
    assert!(entries(&pool, m.card(0)).await.is_empty());
}

#[tokio::test]
async fn a_transfer_to_the_same_card_is_refused_and_moves_nothing() {
    let sys = shared();
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(100)]).await;

    let reply = sys.transfer(&m.body(0, 0, Some(10))).await;

    assert_eq!((reply.status, reply.code()), (400, "017_003"));
    assert_eq!(reply.message(), "Value transfer between same card.");
    assert_eq!(balance(&pool, m.card(0)).await, dec(100));
}

pub fn command(
    m: &Member,
    from: usize,
    to: usize,
    amount: Option<u64>,
    reply_partition: i32,
    sys: &System,
) -> TransferCommand {
    let request = TransferRequest {
        user_id: UserId::new(m.user_id).unwrap(),
        from_card_no: CardNo::parse(m.card(from)).unwrap(),
        to_card_no: CardNo::parse(m.card(to)).unwrap(),
        amount: amount.map(Money::from_units),
    };
    TransferCommand {
        schema_version: SCHEMA_VERSION,
        asp_id: AspId::parse(ASP_ID).unwrap(),
        correlation_id: CorrelationId::parse(&fresh_correlation_id()).unwrap(),
        fingerprint: request.fingerprint(),
        request,
        reply_to: ReplyAddress { topic: sys.bus.topics.results.clone(), partition: reply_partition },
        awaits_reply: true,
        submitted_at: chrono::Utc::now(),
    }
}

/// The results for `ids` on the reply partition their commands named: a reply goes
/// to the partition of the gateway that waits, and nowhere else.
pub async fn results_for(sys: &System, partition: i32, ids: &[String], count: usize) -> Vec<Value> {
    let all = read_partitions(&sys.bus, &sys.bus.topics.results, &[partition], Duration::from_secs(30), |seen| {
        seen.iter().filter(|(k, _, _)| ids.contains(k)).count() >= count
    })
    .await;
    all.into_iter().filter(|(k, _, _)| ids.contains(k)).map(|(_, v, _)| v).collect()
}

#[tokio::test]
async fn the_same_command_delivered_twice_moves_the_money_once_and_answers_both() {
    let sys = shared();
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(1_000), CardSpec::prepaid(0)]).await;
    // Partition 3 of the results topic is read by no gateway: the test reads it.
    let cmd = command(&m, 0, 1, Some(400), 3, sys);
    let payload = serde_json::to_vec(&cmd).unwrap();

    produce(&sys.bus, &sys.bus.topics.commands, m.card(0), &payload, None).await;
    produce(&sys.bus, &sys.bus.topics.commands, m.card(0), &payload, None).await;

    let results = results_for(sys, 3, &[cmd.correlation_id.to_string()], 2).await;
    assert_eq!(results.len(), 2, "both deliveries are answered: {results:?}");
    for r in &results {
        assert_eq!(r["code"], "000_000");
        assert_eq!(r["amount"], "400");
    }
    assert_eq!(results[0]["transferId"], results[1]["transferId"]);
    assert_eq!(balance(&pool, m.card(0)).await, dec(600));
    assert_eq!(balance(&pool, m.card(1)).await, dec(400));
    assert_eq!(entries(&pool, m.card(0)).await.len(), 1);
}

#[tokio::test]
async fn a_batch_applies_its_commands_in_offset_order() {
    // No worker yet: the commands wait in Kafka and the first poll takes them all.
    let sys = System::start(Roles { gateway: false, workers: 0, relay: true, ..Roles::default() });
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(1_000), CardSpec::prepaid(0)]).await;
    let cmds = [
        command(&m, 0, 1, Some(600), 1, &sys),
        command(&m, 0, 1, Some(600), 1, &sys),
        command(&m, 0, 1, None, 1, &sys),
    ];
    for c in &cmds {
        produce(&sys.bus, &sys.bus.topics.commands, m.card(0), &serde_json::to_vec(c).unwrap(), None).await;
    }

    sys.spawn("worker", &[]);

    let ids: Vec<String> = cmds.iter().map(|c| c.correlation_id.to_string()).collect();
    let results = results_for(&sys, 1, &ids, 3).await;
    let by_id = |i: usize| results.iter().find(|r| r["correlationId"] == ids[i].as_str()).unwrap();
    assert_eq!((by_id(0)["code"].as_str(), by_id(0)["amount"].as_str()), (Some("000_000"), Some("600")));
    assert_eq!(by_id(1)["code"], "005_018", "the second sees the first's balance");
    assert_eq!((by_id(2)["code"].as_str(), by_id(2)["amount"].as_str()), (Some("000_000"), Some("400")));
    assert_eq!(balance(&pool, m.card(0)).await, dec(0));
    assert_eq!(balance(&pool, m.card(1)).await, dec(1_000));
    let seqs: Vec<i64> = entries(&pool, m.card(1)).await.iter().map(|e| e.3).collect();
    assert_eq!(seqs, vec![1, 2]);
}

#[tokio::test]
async fn a_reply_the_broker_refuses_for_good_is_parked_and_later_messages_still_flow() {
    let sys = shared();
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(1_000), CardSpec::prepaid(0)]).await;
    // The results topic has 4 partitions: a reply to partition 99 can never be sent.
    let lost = command(&m, 0, 1, Some(100), 99, sys);
    let later = command(&m, 0, 1, Some(200), 3, sys);
    for c in [&lost, &later] {
        produce(&sys.bus, &sys.bus.topics.commands, m.card(0), &serde_json::to_vec(c).unwrap(), None).await;
    }

    let results = results_for(sys, 3, &[later.correlation_id.to_string()], 1).await;
    assert_eq!(results[0]["code"], "000_000", "the later reply was not held up");
    let reason: String = eventually(Duration::from_secs(30), "the parked row", || async {
        sqlx::query_scalar::<_, Option<String>>(
            "SELECT reason FROM outbox_parked WHERE message_key = $1 AND partition = 99",
        )
        .bind(lost.correlation_id.as_str())
        .fetch_optional(&pool)
        .await
        .unwrap()
        .flatten()
    })
    .await;
    assert!(!reason.is_empty());
    assert_eq!(balance(&pool, m.card(0)).await, dec(700), "both transfers were applied");
}

#[test]
fn a_gateway_told_to_read_a_reply_partition_that_does_not_exist_refuses_to_start() {
    let sys = shared();
    let missing = sys.bus.reply_partitions;
    let mut gateway = std::process::Command::new(env!("CARGO_BIN_EXE_cardflow"))
        .arg("gateway")
        .env("DATABASE_URL", &sys.database_url)
        .env("KAFKA_BROKERS", &sys.bus.brokers)
        .env("KAFKA_TOPIC_PREFIX", sys.bus.topics.commands.trim_end_matches("transfer.commands"))
        .env("KAFKA_PARTITIONS", sys.bus.partitions.to_string())
        .env("KAFKA_REPLY_PARTITIONS", sys.bus.reply_partitions.to_string())
        .env("GATEWAY_REPLY_PARTITION", missing.to_string())
        .env("HTTP_ADDR", "127.0.0.1:0")
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while gateway.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            gateway.kill().unwrap();
            panic!("the gateway started on partition {missing}, which does not exist");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = gateway.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(said.contains(&format!("partition {missing} of {} does not exist", sys.bus.topics.results)), "{said}");
}

#[tokio::test]
async fn repeats_inside_one_batch_are_answered_from_the_first_and_a_changed_body_is_000_008() {
    // No worker yet: the commands wait in Kafka and the first poll takes them together.
    let sys = System::start(Roles { gateway: false, workers: 0, relay: true, ..Roles::default() });
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(1_000), CardSpec::prepaid(0)]).await;
    let first = command(&m, 0, 1, Some(300), 1, &sys);
    let mut changed = first.clone();
    changed.request.amount = Some(Money::from_units(301));
    changed.fingerprint = changed.request.fingerprint();
    for c in [&first, &first, &changed] {
        produce(&sys.bus, &sys.bus.topics.commands, m.card(0), &serde_json::to_vec(c).unwrap(), None).await;
    }

    sys.spawn("worker", &[]);

    let results = results_for(&sys, 1, &[first.correlation_id.to_string()], 3).await;
    let codes: Vec<&str> = results.iter().map(|r| r["code"].as_str().unwrap()).collect();
    assert_eq!(codes.iter().filter(|c| **c == "000_000").count(), 2, "{codes:?}");
    assert_eq!(codes.iter().filter(|c| **c == "000_008").count(), 1, "{codes:?}");
    for r in &results {
        let answered = if r["code"] == "000_008" { &changed } else { &first };
        assert_eq!(r["requestFingerprint"], answered.fingerprint.as_str(), "each reply names the body it answers");
    }
    assert_eq!(balance(&pool, m.card(0)).await, dec(700), "the money moved once");
    assert_eq!(entries(&pool, m.card(0)).await.len(), 1);
}

#[tokio::test]
async fn a_request_another_worker_stores_while_this_one_decides_it_is_answered_as_a_repeat_and_moves_no_money() {
    use cardflow_ledger::batch::{apply_resilient, IncomingCommand, RetryPolicy};
    let sys = System::start(Roles { gateway: false, workers: 0, relay: false, ..Roles::default() });
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(1_000), CardSpec::prepaid(0)]).await;
    let cmd = command(&m, 0, 1, Some(100), 0, &sys);
    // The other worker (a partition moving between two) has stored the request in
    // a transaction it has not committed yet: this worker cannot see it and decides.
    let mut other = pool.begin().await.unwrap();
    sqlx::query(
        "INSERT INTO transfers (transfer_id, asp_id, correlation_id, fingerprint, user_id, from_card_no, to_card_no,
                                requested_amount, submitted_at, status, result_code, result_message, decided_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, 100, now(), 'REJECTED', '017_002', 'decided by the other worker', now())",
    )
    .bind(uuid::Uuid::now_v7())
    .bind(cmd.asp_id.as_str())
    .bind(cmd.correlation_id.as_str())
    .bind(&cmd.fingerprint)
    .bind(rust_decimal::Decimal::from(m.user_id))
    .bind(m.card(0))
    .bind(m.card(1))
    .execute(&mut *other)
    .await
    .unwrap();

    let applying = {
        let pool = pool.clone();
        let batch = vec![IncomingCommand { command: cmd.clone(), traceparent: None }];
        let topics = cardflow_ledger::OutboxTopics {
            card_balance: sys.bus.topics.card_balance.clone(),
            transfer_events: sys.bus.topics.transfer_events.clone(),
        };
        let today = chrono::Utc::now().date_naive();
        tokio::spawn(async move { apply_resilient(&pool, &batch, &topics, today, RetryPolicy::default()).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    other.commit().await.unwrap();
    let report = applying.await.unwrap().unwrap();

    assert!(report.results[0].repeat, "answered as a repeat");
    assert_eq!(report.results[0].result.code, "017_002", "with the other worker's result");
    assert_eq!(balance(&pool, m.card(0)).await, dec(1_000));
    assert!(entries(&pool, m.card(0)).await.is_empty(), "no money moved");
}

/// Published rows this test writes itself: no messages for the relay to send.
async fn published_outbox_row(pool: &sqlx::PgPool, created_ago: &str, published_ago: &str) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO outbox (messages, message_count, created_at, published_at)
         VALUES ('[]', 1, now() - $1::interval, now() - $2::interval) RETURNING id",
    )
    .bind(created_ago)
    .bind(published_ago)
    .fetch_one(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn the_outbox_purge_deletes_rows_published_before_the_retention_and_keeps_later_ones() {
    let sys = shared();
    let pool = sys.pool().await;
    let old = published_outbox_row(&pool, "3 hours", "2 hours").await;
    // Written long ago, published only now (say, after a broker outage): kept.
    let late = published_outbox_row(&pool, "3 hours", "0 seconds").await;
    cardflow_ledger::outbox::purge_published(&pool, 3600).await.unwrap();
    let left: Vec<i64> = sqlx::query_scalar("SELECT id FROM outbox WHERE id = ANY($1)")
        .bind(vec![old, late])
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(left, vec![late]);
}

#[tokio::test]
async fn the_outbox_purge_can_read_an_index_instead_of_the_whole_outbox() {
    let sys = shared();
    let pool = sys.pool().await;
    let mut conn = pool.acquire().await.unwrap();
    // With sequential scans priced out, the plan shows whether an index serves the purge.
    sqlx::query("SET enable_seqscan = off").execute(&mut *conn).await.unwrap();
    let plan: Vec<String> = sqlx::query_scalar(&format!("EXPLAIN {}", cardflow_ledger::outbox::PURGE_PUBLISHED))
        .bind(3600.0_f64)
        .fetch_all(&mut *conn)
        .await
        .unwrap();
    sqlx::query("RESET enable_seqscan").execute(&mut *conn).await.unwrap();
    assert!(plan.iter().any(|line| line.contains("outbox_published")), "{plan:#?}");
}

#[tokio::test]
async fn the_openapi_document_is_served_without_credentials_with_the_whole_result_code_table() {
    let sys = shared();
    let r = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{}/api/v1/openapi.json", sys.http_port))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    let document: Value = r.json().await.unwrap();
    let table: Vec<Value> = ResultCode::ALL
        .iter()
        .map(|c| json!({"code": c.code(), "httpStatus": c.http_status(), "message": c.message()}))
        .collect();
    assert_eq!(document["x-result-codes"], Value::Array(table));
}

#[tokio::test]
async fn a_path_the_gateway_does_not_serve_is_answered_000_013_in_json() {
    let sys = shared();
    let req = sign_with(&credentials(), "POST", "/api/v1/transfer/balances", b"{}", None, false);

    let reply = sys.send(&req, &[]).await;

    assert_eq!((reply.status, reply.code(), reply.message()), (404, "000_013", "No such endpoint."));
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert_eq!(reply.header("x-km-correlation-id"), Some(req.correlation_id.as_str()));
}

#[tokio::test]
async fn a_method_the_path_does_not_take_is_answered_000_014_in_json_with_allow() {
    let sys = shared();
    let req = sign_with(&credentials(), "PUT", "/api/v1/transfer/balance", b"{}", None, false);

    let reply = sys.send(&req, &[]).await;

    assert_eq!((reply.status, reply.code(), reply.message()), (405, "000_014", "Method not allowed."));
    assert_eq!(reply.header("content-type"), Some("application/json"));
    assert_eq!(reply.header("allow"), Some("POST"));
}
