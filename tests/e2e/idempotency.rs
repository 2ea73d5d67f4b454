//! `(AspId, X-KM-Correlation-Id)` names a request forever: repeats get the first
//! answer and move no money; a reused id with another body is refused.

use crate::helpers::*;

#[tokio::test]
async fn the_same_request_again_gets_the_first_result_and_moves_money_once() {
    let sys = shared();
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(1_000), CardSpec::prepaid(0)]).await;
    let cid = fresh_correlation_id();
    let body = m.body(0, 1, Some(300));

    let first = sys.send(&sign_post(&body, Some(cid.clone()), false), &[]).await;
    let second = sys.send(&sign_post(&body, Some(cid.clone()), false), &[]).await;

    assert_eq!((first.status, first.code()), (200, "000_000"));
    assert_eq!(second.json, first.json);
    assert_eq!(balance(&pool, m.card(0)).await, dec(700));
    assert_eq!(entries(&pool, m.card(0)).await.len(), 1);
}

#[tokio::test]
async fn concurrent_repeats_of_one_request_move_money_once() {
    let sys = shared();
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(1_000), CardSpec::prepaid(0)]).await;
    let cid = fresh_correlation_id();
    let body = m.body(0, 1, Some(250));

    let replies = futures::future::join_all((0..10).map(|_| {
        let req = sign_post(&body, Some(cid.clone()), false);
        async move { sys.send(&req, &[]).await }
    }))
    .await;

    for r in &replies {
        assert_eq!((r.status, r.code()), (200, "000_000"), "{:?}", r.json);
        assert_eq!(r.amount(), Some(dec(250)));
    }
    assert_eq!(balance(&pool, m.card(0)).await, dec(750));
    assert_eq!(entries(&pool, m.card(1)).await.len(), 1);
}

#[tokio::test]
async fn a_reused_correlation_id_with_another_body_is_refused_and_moves_nothing() {
    let sys = shared();
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(1_000), CardSpec::prepaid(0)]).await;
    let cid = fresh_correlation_id();
    let first = sys.send(&sign_post(&m.body(0, 1, Some(100)), Some(cid.clone()), false), &[]).await;
    assert_eq!(first.code(), "000_000");

    let other = sys.send(&sign_post(&m.body(0, 1, Some(200)), Some(cid), false), &[]).await;

    assert_eq!((other.status, other.code()), (409, "000_008"));
    assert_eq!(other.message(), "Correlation id already used with a different request.");
    assert_eq!(balance(&pool, m.card(0)).await, dec(900));
}

/// Both bodies reach the gateway before either is recorded, so both are published
/// and both wait on one correlation id. The body the worker decides first moves its
/// money; the other must hear `000_008`, not the first body's result.
#[tokio::test]
async fn two_bodies_sent_at_once_under_a_new_correlation_id_get_one_success_and_one_000_008() {
    let sys = shared();
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(100_000), CardSpec::prepaid(0)]).await;
    let mut moved = 0;
    for _ in 0..10 {
        let cid = fresh_correlation_id();
        let (a, b) = (m.body(0, 1, Some(100)), m.body(0, 1, Some(200)));
        let (signed_a, signed_b) = (sign_post(&a, Some(cid.clone()), false), sign_post(&b, Some(cid), false));

        let (reply_a, reply_b) = tokio::join!(sys.send(&signed_a, &[]), sys.send(&signed_b, &[]));

        let answers = [(100, &reply_a), (200, &reply_b)];
        let won: Vec<_> = answers.iter().filter(|(_, r)| r.code() == "000_000").collect();
        assert_eq!(won.len(), 1, "one body wins: {:?} / {:?}", reply_a.json, reply_b.json);
        let (amount, winner) = won[0];
        assert_eq!(winner.amount(), Some(dec(*amount)), "the winner hears its own amount");
        let lost = answers.iter().find(|(_, r)| r.code() != "000_000").unwrap().1;
        assert_eq!((lost.status, lost.code()), (409, "000_008"), "{:?}", lost.json);
        moved += amount;
    }
    assert_eq!(balance(&pool, m.card(1)).await, dec(moved), "only the winners moved money");
    assert_eq!(entries(&pool, m.card(1)).await.len(), 10);
}

/// The submission row keeps whichever body's row landed first, which need not be
/// the body the worker applies first (here A was published and its row lost).
/// Only the ledger knows which body won, so until it decides a retry of either is
/// published and waits: A's client must not hear `000_008`, "nothing moved", while
/// A's money moves.
#[tokio::test]
async fn a_retry_is_not_refused_on_another_bodys_submission_before_the_ledger_decides() {
    let sys = System::start(Roles { workers: 0, reply_deadline_ms: 30_000, ..Roles::default() });
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(1_000), CardSpec::prepaid(0)]).await;
    let a = crate::transfer::command(&m, 0, 1, Some(100), 0, &sys);
    let cid = a.correlation_id.to_string();
    produce(&sys.bus, &sys.bus.topics.commands, &m.user_id.to_string(), &serde_json::to_vec(&a).unwrap(), None).await;
    let b = sign_post(&m.body(0, 1, Some(200)), Some(cid.clone()), false);
    assert_eq!(sys.send(&b, &[("Prefer", "respond-async")]).await.status, 202);

    let a_again = sign_post(&m.body(0, 1, Some(100)), Some(cid.clone()), false);
    let (retry, ()) = tokio::join!(sys.send(&a_again, &[]), async {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        sys.spawn("worker", &[]);
    });

    assert_eq!((retry.status, retry.code(), retry.amount()), (200, "000_000", Some(dec(100))), "{:?}", retry.json);
    assert_eq!(balance(&pool, m.card(1)).await, dec(100), "A moved, B did not");
}

/// Polls a `202`'s `Location` until it answers something other than pending.
async fn decided(sys: &System, location: &str) -> Reply {
    eventually(std::time::Duration::from_secs(30), "a decided answer", || async {
        let r = sys.get(location).await;
        (r.status != 202).then_some(r)
    })
    .await
}

/// Two bodies under one id may each be told `202`; the ledger decides whichever
/// comes first. Each `Location` answers for its own body: the winner's result, and
/// `000_008` for the other, never the winner's result under the other's name.
#[tokio::test]
async fn the_location_of_each_of_two_bodies_under_one_id_answers_for_its_own_body() {
    let sys = System::start(Roles { workers: 0, ..Roles::default() });
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(1_000), CardSpec::prepaid(0)]).await;
    let cid = fresh_correlation_id();
    let (a, b) = (m.body(0, 1, Some(100)), m.body(0, 1, Some(200)));
    for body in [&a, &b] {
        let reply = sys.send(&sign_post(body, Some(cid.clone()), false), &[("Prefer", "respond-async")]).await;
        assert_eq!((reply.status, reply.header("location")), (202, Some(location_of(&cid, body).as_str())));
    }

    sys.spawn("worker", &[]);

    let (a_answer, b_answer) =
        (decided(&sys, &location_of(&cid, &a)).await, decided(&sys, &location_of(&cid, &b)).await);
    assert_eq!(
        (a_answer.status, a_answer.code(), a_answer.amount()),
        (200, "000_000", Some(dec(100))),
        "{:?}",
        a_answer.json
    );
    assert_eq!((b_answer.status, b_answer.code(), b_answer.amount()), (409, "000_008", None), "{:?}", b_answer.json);
    assert_eq!(sys.status(&cid).await.amount(), Some(dec(100)), "the id alone answers for the body decided");
    assert_eq!(balance(&pool, m.card(1)).await, dec(100), "A moved, B did not");
}

/// The same when the gateway saw nothing of the first body (its submission row
/// was lost, or had not landed): the second is new to it, and its `Location` must
/// still not answer with the first body's result.
#[tokio::test]
async fn a_location_does_not_answer_with_the_result_of_a_body_the_gateway_never_saw() {
    let sys = System::start(Roles { workers: 0, ..Roles::default() });
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(1_000), CardSpec::prepaid(0)]).await;
    let a = crate::transfer::command(&m, 0, 1, Some(100), 0, &sys);
    let cid = a.correlation_id.to_string();
    produce(&sys.bus, &sys.bus.topics.commands, &m.user_id.to_string(), &serde_json::to_vec(&a).unwrap(), None).await;
    let b = m.body(0, 1, Some(200));
    let reply = sys.send(&sign_post(&b, Some(cid.clone()), false), &[("Prefer", "respond-async")]).await;
    assert_eq!(reply.status, 202);

    sys.spawn("worker", &[]);

    let b_answer = decided(&sys, reply.header("location").unwrap()).await;
    assert_eq!((b_answer.status, b_answer.code()), (409, "000_008"), "{:?}", b_answer.json);
    assert_eq!(balance(&pool, m.card(1)).await, dec(100), "A moved, B did not");
}

#[tokio::test]
async fn a_repeated_rejection_stays_a_rejection_after_the_balance_changed() {
    let sys = shared();
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(100), CardSpec::prepaid(0), CardSpec::prepaid(1_000)]).await;
    let cid = fresh_correlation_id();
    let body = m.body(0, 1, Some(500));
    let first = sys.send(&sign_post(&body, Some(cid.clone()), false), &[]).await;
    assert_eq!(first.code(), "005_018");
    // Now the card could pay.
    assert_eq!(sys.transfer(&m.body(2, 0, Some(900))).await.code(), "000_000");

    let again = sys.send(&sign_post(&body, Some(cid), false), &[]).await;

    assert_eq!((again.status, again.code()), (400, "005_018"));
    assert_eq!(balance(&pool, m.card(0)).await, dec(1_000));
}

#[tokio::test]
async fn null_and_zero_amounts_are_the_same_request() {
    let sys = shared();
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(500), CardSpec::prepaid(0)]).await;
    let cid = fresh_correlation_id();
    let first = sys.send(&sign_post(&m.body(0, 1, None), Some(cid.clone()), false), &[]).await;

    let again = sys.send(&sign_post(&m.body(0, 1, Some(0)), Some(cid), false), &[]).await;

    assert_eq!(first.code(), "000_000");
    assert_eq!(again.json, first.json);
    assert_eq!(balance(&pool, m.card(1)).await, dec(500));
}

/// The gateway asks Postgres about requests in groups; a burst lands in shared
/// statements, and each request must still get its own answer.
#[tokio::test]
async fn a_burst_of_repeats_conflicts_and_new_requests_gets_each_its_own_answer() {
    let sys = shared();
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(10_000), CardSpec::prepaid(0)]).await;
    let decided = fresh_correlation_id();
    let decided_body = m.body(0, 1, Some(100));
    assert_eq!(sys.send(&sign_post(&decided_body, Some(decided.clone()), false), &[]).await.code(), "000_000");

    let mut requests = Vec::new();
    for i in 0..30 {
        let (req, expect) = match i % 3 {
            0 => (sign_post(&decided_body, Some(decided.clone()), false), "000_000"),
            1 => (sign_post(&m.body(0, 1, Some(7)), Some(decided.clone()), false), "000_008"),
            _ => (sign_post(&m.body(0, 1, Some(10)), None, false), "000_000"),
        };
        requests.push((req, expect));
    }
    let replies = futures::future::join_all(requests.iter().map(|(req, _)| sys.send(req, &[]))).await;

    for ((_, expect), reply) in requests.iter().zip(&replies) {
        assert_eq!(reply.code(), *expect, "{:?}", reply.json);
    }
    // The first transfer and the ten new ones; no repeat or conflict moved money.
    assert_eq!(balance(&pool, m.card(0)).await, dec(10_000 - 100 - 10 * 10));
    assert_eq!(entries(&pool, m.card(1)).await.len(), 11);
}
