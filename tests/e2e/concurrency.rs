//! Many clients, several workers, hot cards, duplicates and restarts: money is
//! conserved, the audit passes, and no correlation id moves money twice.

use crate::helpers::*;
use futures::StreamExt;
use rust_decimal::Decimal;
use serde_json::Value;
use std::collections::HashMap;
use std::time::Duration;

async fn final_answer(sys: &System, cid: &str, reply: Reply) -> Reply {
    if reply.status != 202 {
        return reply;
    }
    eventually(Duration::from_secs(60), "a final status", || async {
        let r = sys.status(cid).await;
        (r.status != 202).then_some(r)
    })
    .await
}

fn audit(sys: &System) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_cardflow"))
        .arg("audit")
        .env("DATABASE_URL", &sys.database_url)
        .output()
        .unwrap()
}

/// Runs `cardflow audit`, which must fail (exit 1); what it printed.
fn failed_audit(sys: &System) -> String {
    let out = audit(sys);
    assert_eq!(out.status.code(), Some(1));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_transfers_with_duplicates_conserve_money_across_two_workers() {
    let sys = System::start(Roles { workers: 2, reply_deadline_ms: 20_000, ..Roles::default() });
    let pool = sys.pool().await;
    let mut members = Vec::new();
    for _ in 0..3 {
        members.push(
            seed_member(
                &pool,
                &[
                    CardSpec::prepaid(100_000),
                    CardSpec::prepaid(100_000),
                    CardSpec::prepaid(100_000),
                    CardSpec::prepaid(100_000),
                ],
            )
            .await,
        );
    }
    let total_before = cardflow_ledger::audit::total_balance(&pool).await.unwrap();

    // 400 requests; card 0 of each member is hot; about one in eight repeats an
    // earlier request exactly (same correlation id and body).
    let mut requests: Vec<(String, Value)> = Vec::new();
    for i in 0..400u64 {
        if i > 10 && rand::random::<u8>().is_multiple_of(8) {
            let earlier = requests[rand::random::<usize>() % requests.len()].clone();
            requests.push(earlier);
            continue;
        }
        let m = &members[rand::random::<usize>() % members.len()];
        let from = if rand::random::<bool>() { 0 } else { 1 + rand::random::<usize>() % 3 };
        let to = if from == 0 { 1 + rand::random::<usize>() % 3 } else { 0 };
        let amount = if rand::random::<u8>().is_multiple_of(20) {
            None
        } else {
            Some(1 + (rand::random::<u64>() % 5_000) as i64)
        };
        requests.push((fresh_correlation_id(), m.body(from, to, amount)));
    }

    let sys_ref = &sys;
    let answers: Vec<(String, Reply)> = futures::stream::iter(requests.clone())
        .map(|(cid, body)| async move {
            let reply = sys_ref.send(&sign_post(&body, Some(cid.clone()), false), &[]).await;
            let reply = final_answer(sys_ref, &cid, reply).await;
            (cid, reply)
        })
        .buffer_unordered(32)
        .collect()
        .await;

    let mut by_cid: HashMap<String, Vec<&Reply>> = HashMap::new();
    for (cid, r) in &answers {
        assert!(r.status == 200 || r.status == 400, "unexpected answer {} {:?}", r.status, r.json);
        by_cid.entry(cid.clone()).or_default().push(r);
    }
    let mut moved_by_answers = Decimal::ZERO;
    for (cid, replies) in &by_cid {
        assert!(replies.iter().all(|r| r.json == replies[0].json), "{cid}: answers disagree: {replies:?}");
        if replies[0].code() == "000_000" {
            moved_by_answers += replies[0].amount().unwrap();
        }
    }
    let debits: Vec<(String, i64, Decimal)> = sqlx::query_as(
        "SELECT t.correlation_id, count(*), sum(e.amount) FROM ledger_entries e JOIN transfers t USING (transfer_id)
         WHERE e.side = 'DEBIT' GROUP BY t.correlation_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(debits.iter().all(|(_, n, _)| *n == 1), "a correlation id moved money twice");
    let moved_in_ledger: Decimal = debits.iter().map(|d| d.2).sum();
    assert_eq!(moved_in_ledger, moved_by_answers, "the ledger moved what the answers said");
    assert_eq!(cardflow_ledger::audit::total_balance(&pool).await.unwrap(), total_before);
    let out = audit(&sys);
    assert!(out.status.success(), "audit failed:\n{}", String::from_utf8_lossy(&out.stdout));
}

#[tokio::test]
async fn a_request_repeated_after_the_whole_system_restarted_gets_the_stored_result() {
    let sys = System::start(Roles::default());
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(1_000), CardSpec::prepaid(0)]).await;
    let cid = fresh_correlation_id();
    let body = m.body(0, 1, Some(600));
    let first = sys.send(&sign_post(&body, Some(cid.clone()), false), &[]).await;
    assert_eq!(first.code(), "000_000");

    sys.stop(None);
    sys.start_roles(&Roles::default());
    let again = sys.send(&sign_post(&body, Some(cid), false), &[]).await;

    assert_eq!(again.json, first.json);
    assert_eq!(balance(&pool, m.card(0)).await, dec(400));
    assert_eq!(entries(&pool, m.card(0)).await.len(), 1);
}

#[tokio::test]
async fn the_audit_names_a_card_whose_balance_does_not_match_its_entries() {
    let sys = System::start(Roles { gateway: false, workers: 0, relay: false, ..Roles::default() });
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(1_000)]).await;
    assert!(audit(&sys).status.success());

    sqlx::query("UPDATE cards SET balance = balance + 1 WHERE card_no = $1")
        .bind(m.card(0))
        .execute(&pool)
        .await
        .unwrap();

    assert!(failed_audit(&sys).contains(m.card(0)));
}

#[tokio::test]
async fn the_audit_names_a_completed_transfer_that_lost_its_credit_entry() {
    let sys = System::start(Roles::default());
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(1_000), CardSpec::prepaid(0)]).await;
    assert_eq!(sys.transfer(&m.body(0, 1, Some(300))).await.code(), "000_000");
    assert!(audit(&sys).status.success());
    let transfer: uuid::Uuid = sqlx::query_scalar("SELECT transfer_id FROM transfers WHERE from_card_no = $1")
        .bind(m.card(0))
        .fetch_one(&pool)
        .await
        .unwrap();

    // The credit and the card's balance both undone, so that every per-card check
    // still holds: only the transfer's own check can see it.
    sqlx::query(
        "WITH gone AS (DELETE FROM ledger_entries WHERE transfer_id = $1 AND side = 'CREDIT' RETURNING card_no, amount)
         UPDATE cards c SET balance = c.balance - gone.amount, sequence = c.sequence - 1 FROM gone WHERE c.card_no = gone.card_no",
    )
    .bind(transfer)
    .execute(&pool)
    .await
    .unwrap();

    let report = failed_audit(&sys);
    assert!(report.contains(&format!("transfer {transfer}")), "{report}");
    assert!(report.contains("completed transfers have one debit and one credit of their amount"), "{report}");
    assert!(report.contains("audit FAILED: 1 violation(s)"), "nothing else is named: {report}");
}

#[tokio::test]
async fn the_audit_names_a_ledger_entry_whose_transfer_does_not_exist() {
    let sys = System::start(Roles { gateway: false, workers: 0, relay: false, ..Roles::default() });
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(1_000)]).await;
    let orphan = uuid::Uuid::now_v7();

    sqlx::query(
        "INSERT INTO ledger_entries (entry_id, transfer_id, card_no, user_id, side, amount, balance_after, sequence)
         SELECT $1, $1, card_no, user_id, 'CREDIT', 1, balance + 1, sequence + 1 FROM cards WHERE card_no = $2",
    )
    .bind(orphan)
    .bind(m.card(0))
    .execute(&pool)
    .await
    .unwrap();

    let report = failed_audit(&sys);
    assert!(report.contains(&format!("entry {orphan}: every entry belongs to a stored transfer and card")), "{report}");
}

#[tokio::test]
async fn re_seeding_a_card_the_ledger_moved_keeps_its_ledger_balance_and_the_audit_passes() {
    let sys = System::start(Roles::default());
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(1_000), CardSpec::prepaid(0)]).await;
    assert_eq!(sys.transfer(&m.body(0, 1, Some(300))).await.code(), "000_000");

    // The same fixture again, as every `make run` does, but with a new expiry.
    let card = |no: &str, balance: i64| {
        serde_json::json!({"cardNo": no, "userId": m.user_id, "productId": "PREPAID", "status": "ACTIVE",
                           "balance": balance, "totalLoaded": balance, "expiresOn": "2098-01-01", "maxBalance": null})
    };
    let again = serde_json::json!({"cards": [card(m.card(0), 1_000), card(m.card(1), 0)]});
    cardflow_ledger::Fixture::from_json(&again.to_string()).unwrap().load(&pool).await.unwrap();

    assert_eq!((balance(&pool, m.card(0)).await, balance(&pool, m.card(1)).await), (dec(700), dec(300)));
    let expiry: chrono::NaiveDate = sqlx::query_scalar("SELECT expires_on FROM cards WHERE card_no = $1")
        .bind(m.card(0))
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(expiry.to_string(), "2098-01-01", "attributes other than money are updated");
    let out = audit(&sys);
    assert!(out.status.success(), "audit failed:\n{}", String::from_utf8_lossy(&out.stdout));
}

#[tokio::test]
async fn re_seeding_a_card_the_ledger_moved_with_another_member_keeps_its_member() {
    let sys = shared();
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(1_000), CardSpec::prepaid(0)]).await;
    let other = seed_member(&pool, &[CardSpec::prepaid(0)]).await;
    assert_eq!(sys.transfer(&m.body(0, 1, Some(300))).await.code(), "000_000");

    let card = serde_json::json!({"cardNo": m.card(0), "userId": other.user_id, "productId": "PREPAID",
        "status": "ACTIVE", "balance": 1_000, "totalLoaded": 1_000, "expiresOn": "2098-01-01", "maxBalance": null});
    cardflow_ledger::Fixture::from_json(&serde_json::json!({"cards": [card]}).to_string())
        .unwrap()
        .load(&pool)
        .await
        .unwrap();

    let owner: Decimal = sqlx::query_scalar("SELECT user_id FROM cards WHERE card_no = $1")
        .bind(m.card(0))
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(owner, Decimal::from(m.user_id), "the card's money stays with the member the ledger knows");
    assert_eq!(balance(&pool, m.card(0)).await, dec(700));
}

/// A worker that starts behind by many full batches runs two transactions at
/// once. Each member's transfers alternate direction with the whole balance, so
/// any one applied out of order would be rejected for want of money.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backlog_applied_two_batches_at_a_time_keeps_each_members_order_and_conserves_money() {
    let env = vec![("WORKER_MAX_BATCH", "10".to_string()), ("WORKER_BATCHES_IN_FLIGHT", "2".to_string())];
    let sys = System::start(Roles { workers: 0, env: env.clone(), ..Roles::default() });
    let pool = sys.pool().await;
    let mut members = Vec::new();
    for _ in 0..8 {
        members.push(seed_member(&pool, &[CardSpec::prepaid(500), CardSpec::prepaid(0)]).await);
    }
    let total_before = cardflow_ledger::audit::total_balance(&pool).await.unwrap();

    // With no worker running, each member's 30 transfers are accepted in order.
    let sys_ref = &sys;
    let accepted: Vec<Vec<String>> = futures::future::join_all(members.iter().map(|m| async move {
        let mut ids = Vec::new();
        for i in 0..30 {
            let (from, to) = if i % 2 == 0 { (0, 1) } else { (1, 0) };
            let req = sign_post(&m.body(from, to, Some(500)), None, false);
            let reply = sys_ref.send(&req, &[("Prefer", "respond-async")]).await;
            assert_eq!(reply.status, 202, "{:?}", reply.json);
            ids.push(req.correlation_id.clone());
        }
        ids
    }))
    .await;

    sys.spawn("worker", &env);
    for ids in &accepted {
        for id in ids {
            let reply = final_answer(&sys, id, sys.status(id).await).await;
            assert_eq!(reply.code(), "000_000", "{id} was applied out of its member's order: {:?}", reply.json);
        }
    }
    for m in &members {
        assert_eq!(balance(&pool, m.card(0)).await, dec(500));
        assert_eq!(balance(&pool, m.card(1)).await, dec(0));
    }
    let beside = metric(&sys.metrics("worker").await, "cardflow_worker_batches_beside_another_total ");
    assert!(beside.unwrap_or(0.0) > 0.0, "no batch ran beside another");
    assert_eq!(cardflow_ledger::audit::total_balance(&pool).await.unwrap(), total_before);
    let out = audit(&sys);
    assert!(out.status.success(), "audit failed:\n{}", String::from_utf8_lossy(&out.stdout));
}

/// A statement prepared while `transfers` was vacuumed empty (a new deployment, or
/// `make bench`'s `VACUUM` before its first transfer) must still probe the unique
/// index once the table has grown: a cached generic plan scanned it, every key of
/// every lookup, until the next `ANALYZE`.
#[tokio::test]
async fn a_lookup_prepared_while_transfers_was_empty_probes_its_index_once_the_table_has_grown() {
    let sys = System::start(Roles { gateway: false, workers: 0, relay: false, ..Roles::default() });
    let pool = sys.pool().await;
    let mut conn = pool.acquire().await.unwrap();
    sqlx::raw_sql("VACUUM (ANALYZE) transfers").execute(&mut *conn).await.unwrap();
    sqlx::raw_sql(
        "PREPARE lookup(text[], text[]) AS
         SELECT t.transfer_id FROM unnest($1, $2) AS k(asp_id, correlation_id)
         CROSS JOIN LATERAL (SELECT transfer_id FROM transfers
                             WHERE transfers.asp_id = k.asp_id AND transfers.correlation_id = k.correlation_id
                             LIMIT 1) t",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    // Postgres considers a generic plan from the sixth execution on.
    for _ in 0..8 {
        sqlx::raw_sql("EXECUTE lookup('{ASP000000000001}', '{nobody}')").execute(&mut *conn).await.unwrap();
    }
    sqlx::raw_sql(
        "INSERT INTO transfers (transfer_id, asp_id, correlation_id, fingerprint, user_id, from_card_no, to_card_no,
                                status, submitted_at)
         SELECT gen_random_uuid(), 'ASP000000000001', 'grown-' || g, 'f', 1, '1', '2', 'COMPLETED', now()
         FROM generate_series(1, 50000) g",
    )
    .execute(&mut *conn)
    .await
    .unwrap();
    let plan: Vec<String> =
        sqlx::query_scalar("EXPLAIN (COSTS OFF) EXECUTE lookup('{ASP000000000001}', '{grown-49999}')")
            .fetch_all(&mut *conn)
            .await
            .unwrap();
    let plan = plan.join("\n");
    assert!(plan.contains("Index Scan"), "the lookup scans the table:\n{plan}");
    assert!(!plan.contains("Seq Scan"), "the lookup scans the table:\n{plan}");
}

/// The worker keeps Postgres's plan cache for its batch statements, so its one
/// read of a table that starts empty, the read of repeats, must never become a
/// cached statement whose plan was made while `transfers` was empty.
#[tokio::test]
async fn the_workers_read_of_repeats_is_planned_on_every_call_never_cached() {
    let sys = System::start(Roles { gateway: false, workers: 0, relay: false, ..Roles::default() });
    let pool = cardflow_ledger::connect_with_cached_plans(&sys.database_url, 1).await.unwrap();
    let mut conn = pool.acquire().await.unwrap();
    let keys = vec![("ASP000000000001".to_string(), "nobody".to_string())];
    for _ in 0..8 {
        let found = cardflow_ledger::transfers::find_many(&mut *conn, &keys).await.unwrap();
        assert!(found.is_empty());
    }
    let cached: Vec<String> =
        sqlx::query_scalar("SELECT statement FROM pg_prepared_statements WHERE statement LIKE '%FROM transfers%'")
            .persistent(false)
            .fetch_all(&mut *conn)
            .await
            .unwrap();
    assert!(cached.is_empty(), "the read of repeats is a cached statement: {cached:?}");
}
