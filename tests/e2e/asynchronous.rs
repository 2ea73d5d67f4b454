//! Sync over async: the deadline fallback, `Prefer: respond-async`, and the status
//! query that answers the final result.

use crate::helpers::*;
use std::time::{Duration, Instant};

#[tokio::test]
async fn past_the_deadline_the_answer_is_202_and_the_command_is_applied_later() {
    let sys = System::start(Roles { workers: 0, reply_deadline_ms: 1_000, ..Roles::default() });
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(1_000), CardSpec::prepaid(0)]).await;
    let cid = fresh_correlation_id();

    let started = Instant::now();
    let reply = sys.send(&sign_post(&m.body(0, 1, Some(300)), Some(cid.clone()), false), &[]).await;

    assert!(started.elapsed() < Duration::from_millis(2_500), "answered within the deadline");
    assert_eq!((reply.status, reply.code()), (202, "000_009"));
    assert_eq!(reply.json["status"], "PENDING");
    assert_eq!(reply.header("location"), Some(location_of(&cid, &m.body(0, 1, Some(300))).as_str()));
    assert_eq!(sys.status(&cid).await.status, 202);
    let waiting = metric(&sys.metrics("gateway").await, "cardflow_reply_waiting_requests ");
    assert_eq!(waiting, Some(0.0), "a request that answered 202 no longer waits");

    sys.spawn("worker", &[]);

    let done = eventually(Duration::from_secs(60), "the transfer to be applied", || async {
        let r = sys.status(&cid).await;
        (r.status == 200).then_some(r)
    })
    .await;
    assert_eq!((done.code(), done.amount()), ("000_000", Some(dec(300))));
    assert_eq!(balance(&pool, m.card(0)).await, dec(700));
    assert_eq!(entries(&pool, m.card(0)).await.len(), 1);
}

#[tokio::test]
async fn respond_async_answers_202_at_once_and_the_status_query_gives_the_result() {
    let sys = shared();
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(1_000), CardSpec::prepaid(0)]).await;
    let req = sign_post(&m.body(0, 1, Some(100)), None, false);

    let reply = sys.send(&req, &[("Prefer", "respond-async")]).await;

    assert_eq!((reply.status, reply.code()), (202, "000_009"));
    let done = eventually(Duration::from_secs(30), "the result", || async {
        let r = sys.status(&req.correlation_id).await;
        (r.status == 200).then_some(r)
    })
    .await;
    assert_eq!(done.amount(), Some(dec(100)));
}

#[tokio::test]
async fn a_request_sent_with_respond_async_gets_no_reply_message_and_its_status_query_gives_the_result() {
    let sys = shared();
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(1_000), CardSpec::prepaid(0)]).await;
    let not_awaited = sign_post(&m.body(0, 1, Some(100)), None, false);
    let awaited = sign_post(&m.body(0, 1, Some(200)), None, false);

    assert_eq!(sys.send(&not_awaited, &[("Prefer", "respond-async")]).await.status, 202);
    // Same sending card, so the same command partition: applied after the first,
    // its reply comes after any reply the first could have had.
    assert_eq!(sys.send(&awaited, &[]).await.code(), "000_000");

    let replies = read_partitions(&sys.bus, &sys.bus.topics.results, &[0], Duration::from_secs(30), |seen| {
        seen.iter().any(|(k, _, _)| *k == awaited.correlation_id)
    })
    .await;
    assert!(replies.iter().any(|(k, _, _)| *k == awaited.correlation_id), "the awaited reply arrived");
    assert!(!replies.iter().any(|(k, _, _)| *k == not_awaited.correlation_id), "no reply for the 202 request");
    let status = sys.status(&not_awaited.correlation_id).await;
    assert_eq!((status.status, status.code(), status.amount()), (200, "000_000", Some(dec(100))));
}

#[tokio::test]
async fn a_status_query_for_an_unknown_request_is_404() {
    let sys = shared();
    let reply = sys.status(&fresh_correlation_id()).await;
    assert_eq!((reply.status, reply.code()), (404, "000_012"));
}

#[tokio::test]
async fn a_status_query_whose_path_is_not_text_is_an_invalid_correlation_id() {
    let reply = shared().status("%FF%FE").await;
    assert_eq!((reply.status, reply.code(), reply.message()), (400, "000_004", "Invalid value. correlationId"));
}

#[tokio::test]
async fn a_status_query_whose_request_token_is_malformed_is_an_invalid_request() {
    for query in ["request=ABC", "request=0&request=1", &format!("request={}", "0".repeat(33))] {
        let reply = shared().get(&format!("/api/v1/transfer/balance/261124153000-0000001?{query}")).await;
        assert_eq!(
            (reply.status, reply.code(), reply.message()),
            (400, "000_004", "Invalid value. request"),
            "{query}"
        );
    }
}

#[tokio::test]
async fn a_status_query_of_a_rejection_answers_like_the_post() {
    let sys = shared();
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(10), CardSpec::prepaid(0)]).await;
    let req = sign_post(&m.body(0, 1, Some(100)), None, false);
    let posted = sys.send(&req, &[]).await;

    let queried = sys.status(&req.correlation_id).await;

    assert_eq!((queried.status, &queried.json), (posted.status, &posted.json));
    assert_eq!(queried.code(), "005_018");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_a_gateway_dies_with_requests_waiting_they_are_applied_and_another_gateway_answers() {
    // No worker: the requests wait; gateway A holds them and dies.
    let sys = System::start(Roles { workers: 0, reply_deadline_ms: 30_000, ..Roles::default() });
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(1_000), CardSpec::prepaid(0)]).await;
    let requests: Vec<_> = (0..5).map(|_| sign_post(&m.body(0, 1, Some(100)), None, false)).collect();
    let waiting: Vec<_> = requests
        .iter()
        .cloned()
        .map(|req| {
            let port = sys.http_port;
            let client = reqwest::Client::new();
            tokio::spawn(async move {
                let mut b = client.post(format!("http://127.0.0.1:{port}{}", req.path)).body(req.body.clone());
                for (k, v) in &req.headers {
                    b = b.header(k, v);
                }
                b.send().await.map(|r| r.status().as_u16())
            })
        })
        .collect();
    eventually(Duration::from_secs(20), "all requests submitted", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM submissions").fetch_one(&pool).await.unwrap();
        (n == 5).then_some(())
    })
    .await;

    sys.kill(Some("gateway"));
    let other_again = sys.spawn_gateway(1);
    sys.spawn("worker", &[]);

    for w in waiting {
        assert!(w.await.unwrap().is_err(), "the dead gateway's clients lost their connection");
    }
    for req in &requests {
        let done = eventually(Duration::from_secs(60), "the result on another gateway", || async {
            let status = sign_with(
                &credentials(),
                "GET",
                &format!("/api/v1/transfer/balance/{}", req.correlation_id),
                b"",
                None,
                false,
            );
            let r = sys.send_to(other_again, &status, &[]).await;
            (r.status == 200).then_some(r)
        })
        .await;
        assert_eq!(done.code(), "000_000");
    }
    assert_eq!(balance(&pool, m.card(0)).await, dec(500));
    assert_eq!(entries(&pool, m.card(0)).await.len(), 5);
}

#[tokio::test]
async fn a_poison_command_goes_to_the_dead_letter_topic_and_later_commands_still_apply() {
    let sys = shared();
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(1_000), CardSpec::prepaid(0)]).await;
    let poison = format!("not a command {}", fresh_correlation_id());

    produce(&sys.bus, &sys.bus.topics.commands, m.card(0), poison.as_bytes(), None).await;
    let reply = sys.transfer(&m.body(0, 1, Some(10))).await;

    assert_eq!((reply.status, reply.code()), (200, "000_000"));
    let reason = dead_letter_reason(sys, m.card(0)).await;
    assert!(reason.starts_with("undecodable command"), "reason header: {reason:?}");
    let counted = metric(&sys.metrics("worker").await, "cardflow_worker_dlq_messages_total ");
    assert!(counted.is_some_and(|n| n >= 1.0), "the dead letter is counted: {counted:?}");
}

#[tokio::test]
async fn a_command_with_an_amount_no_request_may_name_is_dead_lettered_answered_017_002_and_moves_nothing() {
    let sys = shared();
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(1_000), CardSpec::prepaid(0)]).await;
    // Written straight to the topic, past the gateway's validation.
    let command = crate::transfer::command(&m, 0, 1, Some(1), 3, sys);
    let mut cmd = serde_json::to_value(&command).unwrap();
    cmd["request"]["amount"] = serde_json::json!("0.5");
    // The fingerprint of what it names, as a writer that knows the format would send.
    let forged: cardflow_domain::TransferCommand = serde_json::from_value(cmd.clone()).unwrap();
    cmd["fingerprint"] = serde_json::json!(forged.request.fingerprint());
    produce(&sys.bus, &sys.bus.topics.commands, m.card(0), cmd.to_string().as_bytes(), None).await;

    let reason = dead_letter_reason(sys, m.card(0)).await;
    assert!(reason.contains("amount"), "reason header: {reason:?}");
    let cid = command.correlation_id.to_string();
    let answer = eventually(Duration::from_secs(30), "a stored answer", || async {
        let r = sys.status(&cid).await;
        (r.status != 404).then_some(r)
    })
    .await;
    assert_eq!((answer.status, answer.code()), (400, "017_002"));
    assert_eq!(balance(&pool, m.card(0)).await, dec(1_000));
}

/// Only a writer that bypasses the gateway can send a fingerprint that is not the
/// request's; one Postgres cannot even store (a NUL) once kept the worker retrying
/// its batch, and the member's partition behind it, for ever.
#[tokio::test]
async fn a_command_whose_fingerprint_is_not_its_requests_is_dead_lettered_and_the_members_next_transfer_applies() {
    let sys = shared();
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(1_000), CardSpec::prepaid(0)]).await;
    let command = crate::transfer::command(&m, 0, 1, Some(100), 3, sys);
    let mut forged = serde_json::to_value(&command).unwrap();
    forged["fingerprint"] = serde_json::json!("\u{0}");
    let member = m.user_id.to_string();
    produce(&sys.bus, &sys.bus.topics.commands, &member, forged.to_string().as_bytes(), None).await;

    let reply = sys.transfer(&m.body(0, 1, Some(10))).await;

    assert_eq!((reply.status, reply.code()), (200, "000_000"));
    assert_eq!(dead_letter_reason(sys, &member).await, "fingerprint does not match the request");
    assert_eq!(balance(&pool, m.card(0)).await, dec(990));
    assert_eq!(sys.status(&command.correlation_id.to_string()).await.status, 404, "nothing is stored under it");
}

/// A gateway of a later release may write a version this worker does not read: the
/// command is kept in the dead-letter topic, and its caller is told it failed rather
/// than left pending. Redriven later, it is a repeat of a request already answered.
/// Writes a command of schema version 2, changed by `edit`, as a gateway of a later
/// release would; its answers go to results partition 3, which no gateway reads.
async fn produce_later_version(
    sys: &System,
    m: &Member,
    edit: impl FnOnce(&mut serde_json::Value),
) -> cardflow_domain::TransferCommand {
    let command = crate::transfer::command(m, 0, 1, Some(100), 3, sys);
    let mut later = serde_json::to_value(&command).unwrap();
    later["schemaVersion"] = serde_json::json!(2);
    edit(&mut later);
    produce(&sys.bus, &sys.bus.topics.commands, m.card(0), later.to_string().as_bytes(), None).await;
    command
}

#[tokio::test]
async fn a_command_of_an_unknown_schema_version_is_dead_lettered_answered_017_002_and_a_redrive_moves_nothing() {
    let sys = shared();
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(1_000), CardSpec::prepaid(0)]).await;
    let command = produce_later_version(sys, &m, |_| {}).await;
    let cid = command.correlation_id.to_string();

    let reason = dead_letter_reason(sys, m.card(0)).await;
    assert_eq!(reason, "unsupported schema version 2");
    let results = crate::transfer::results_for(sys, 3, std::slice::from_ref(&cid), 1).await;
    assert_eq!(results[0]["code"], "017_002", "the waiting caller hears it failed");

    produce(&sys.bus, &sys.bus.topics.commands, m.card(0), &serde_json::to_vec(&command).unwrap(), None).await;

    let results = crate::transfer::results_for(sys, 3, std::slice::from_ref(&cid), 2).await;
    assert!(results.iter().all(|r| r["code"] == "017_002"), "{results:?}");
    assert_eq!(sys.status(&cid).await.code(), "017_002");
    assert_eq!(balance(&pool, m.card(0)).await, dec(1_000));
}

/// A later release may also fingerprint its requests another way. The version is
/// judged first, so its caller hears the documented `017_002` rather than nothing.
#[tokio::test]
async fn a_command_of_an_unknown_schema_version_is_answered_017_002_whatever_its_fingerprint() {
    let sys = shared();
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(1_000), CardSpec::prepaid(0)]).await;
    let command =
        produce_later_version(sys, &m, |c| c["fingerprint"] = serde_json::json!("v2:fingerprinted-another-way")).await;
    let cid = command.correlation_id.to_string();

    assert_eq!(dead_letter_reason(sys, m.card(0)).await, "unsupported schema version 2");
    let results = crate::transfer::results_for(sys, 3, std::slice::from_ref(&cid), 1).await;
    assert_eq!(results[0]["code"], "017_002", "the waiting caller hears it failed");
    assert_eq!(balance(&pool, m.card(0)).await, dec(1_000));
}

#[tokio::test]
async fn an_encrypted_status_query_answers_the_result_encrypted() {
    let sys = shared();
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(1_000), CardSpec::prepaid(0)]).await;
    let post = sign_post(&m.body(0, 1, Some(120)), None, true);
    assert_eq!(sys.send(&post, &[]).await.code(), "000_000");

    let path = format!("/api/v1/transfer/balance/{}", post.correlation_id);
    let reply = sys.send(&sign_with(&credentials(), "GET", &path, b"", None, true), &[]).await;

    assert_eq!(reply.header("x-km-crypto-key-id"), Some(CRYPTO_KEY_ID));
    assert!(reply.raw.contains("encData") && !reply.raw.contains("000_000"), "the wire shows only ciphertext");
    assert_eq!((reply.status, reply.code(), reply.amount()), (200, "000_000", Some(dec(120))));
}

#[tokio::test]
async fn an_asp_cannot_see_another_asps_request() {
    let sys = shared();
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(1_000), CardSpec::prepaid(0)]).await;
    let post = sign_post(&m.body(0, 1, Some(10)), None, false);
    assert_eq!(sys.send(&post, &[]).await.code(), "000_000");

    let other = cardflow_gateway::client::Credentials {
        asp_id: ASP_ID_3.into(),
        access_key: ACCESS_KEY_3.into(),
        signing_secret: SIGNING_SECRET.into(),
        crypto_key: None,
    };
    let path = format!("/api/v1/transfer/balance/{}", post.correlation_id);
    let reply = sys.send(&sign_with(&other, "GET", &path, b"", None, false), &[]).await;

    assert_eq!((reply.status, reply.code()), (404, "000_012"));
}
