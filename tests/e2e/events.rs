//! What downstream consumers get: one `card.balance` event per card per transfer,
//! gap-free per-card sequences matching the ledger, events that validate against
//! the published schemas, and replays equal to the originals.

use crate::helpers::*;
use serde_json::Value;
use std::collections::HashMap;
use std::time::Duration;

fn validator(file: &str) -> jsonschema::Validator {
    let path = format!("{}/../../docs/schemas/{file}", env!("CARGO_MANIFEST_DIR"));
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    jsonschema::validator_for(&schema).expect("the schema compiles")
}

fn assert_valid(v: &jsonschema::Validator, event: &Value) {
    let errors: Vec<String> = v.iter_errors(event).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{event} does not validate: {errors:?}");
}

async fn transfers_among(sys: &System, m: &Member, n: usize) {
    for i in 0..n {
        let (from, to) = (i % m.cards.len(), (i + 1) % m.cards.len());
        let r = sys.transfer(&m.body(from, to, Some(10 + i as i64))).await;
        assert_eq!(r.code(), "000_000", "{:?}", r.json);
    }
}

async fn card_events(sys: &System, m: &Member, expected: usize) -> Vec<TopicMessage> {
    let all = read_topic(&sys.bus, &sys.bus.topics.card_balance, sys.bus.partitions, Duration::from_secs(30), |seen| {
        seen.iter().filter(|(k, _, _)| m.cards.contains(k)).count() >= expected
    })
    .await;
    all.into_iter().filter(|(k, _, _)| m.cards.contains(k)).collect()
}

#[tokio::test]
async fn each_card_sees_gap_free_sequences_that_match_the_ledger_and_the_schema() {
    let sys = shared();
    let pool = sys.pool().await;
    let m =
        seed_member(&pool, &[CardSpec::prepaid(10_000), CardSpec::prepaid(10_000), CardSpec::prepaid(10_000)]).await;
    transfers_among(sys, &m, 12).await;

    let events = card_events(sys, &m, 24).await;

    let schema = validator("card.balance.v1.json");
    let mut per_card: HashMap<&str, Vec<&Value>> = HashMap::new();
    for (key, event, headers) in &events {
        assert_valid(&schema, event);
        assert_eq!(event["cardNo"], key.as_str(), "keyed by card");
        assert!(headers.iter().any(|(k, v)| k == "traceparent" && v.starts_with("00-")));
        per_card.entry(key.as_str()).or_default().push(event);
    }
    for card in &m.cards {
        let seen = &per_card[card.as_str()];
        let sequences: Vec<i64> = seen.iter().map(|e| e["sequence"].as_i64().unwrap()).collect();
        assert_eq!(sequences, (1..=8).collect::<Vec<_>>(), "card {card}: in order, no gaps or repeats");
        let ledger: Vec<String> = entries(&pool, card).await.iter().map(|e| e.2.to_string()).collect();
        let announced: Vec<String> = seen.iter().map(|e| e["balanceAfter"].as_str().unwrap().to_string()).collect();
        assert_eq!(announced, ledger, "card {card}: balance-after values match the ledger");
    }
}

#[tokio::test]
async fn transfer_events_validate_against_their_schema() {
    let sys = shared();
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(100), CardSpec::prepaid(0)]).await;
    assert_eq!(sys.transfer(&m.body(0, 1, Some(40))).await.code(), "000_000");
    assert_eq!(sys.transfer(&m.body(0, 1, Some(400))).await.code(), "005_018");

    let all =
        read_topic(&sys.bus, &sys.bus.topics.transfer_events, sys.bus.partitions, Duration::from_secs(30), |seen| {
            seen.iter().filter(|(k, _, _)| k == m.card(0)).count() >= 2
        })
        .await;

    let schema = validator("transfer.events.v1.json");
    let mine: Vec<&Value> = all.iter().filter(|(k, _, _)| k == m.card(0)).map(|(_, v, _)| v).collect();
    assert_eq!(mine.len(), 2);
    for e in &mine {
        assert_valid(&schema, e);
    }
    assert_eq!(mine[0]["type"], "transfer.completed");
    assert_eq!(mine[1]["type"], "transfer.rejected");
    assert_eq!(mine[1]["code"], "005_018");
}

#[tokio::test]
async fn a_replay_republishes_the_same_events() {
    let sys = shared();
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(10_000), CardSpec::prepaid(10_000)]).await;
    transfers_among(sys, &m, 4).await;
    let originals = card_events(sys, &m, 8).await;

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cardflow"))
        .args(["replay", "--card", m.card(0), "--from-seq", "2"])
        .env("DATABASE_URL", &sys.database_url)
        .env("KAFKA_BROKERS", &sys.bus.brokers)
        .env("KAFKA_TOPIC_PREFIX", sys.bus.topics.commands.trim_end_matches("transfer.commands"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let after = card_events(sys, &m, 11).await;
    let of_card = |evs: &[TopicMessage]| -> Vec<Value> {
        evs.iter().filter(|(k, _, _)| k == m.card(0)).map(|(_, v, _)| v.clone()).collect()
    };
    let original = of_card(&originals);
    let replayed: Vec<Value> = of_card(&after).split_off(original.len());
    assert_eq!(replayed.len(), 3, "sequences 2, 3 and 4");
    assert_eq!(replayed, original[1..].to_vec(), "same ids, same content");
}

#[tokio::test]
async fn commands_and_results_validate_against_their_schemas() {
    let sys = shared();
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(100), CardSpec::prepaid(0)]).await;
    let ok = sign_post(&m.body(0, 1, Some(40)), None, false);
    let rejected = sign_post(&m.body(0, 1, Some(400)), None, false);
    assert_eq!(sys.send(&ok, &[]).await.code(), "000_000");
    assert_eq!(sys.send(&rejected, &[]).await.code(), "005_018");
    let ids = [ok.correlation_id.clone(), rejected.correlation_id.clone()];

    let commands =
        read_topic(&sys.bus, &sys.bus.topics.commands, sys.bus.partitions, Duration::from_secs(30), |seen| {
            seen.iter().filter(|(k, _, _)| *k == m.user_id.to_string()).count() >= 2
        })
        .await;
    let results =
        read_topic(&sys.bus, &sys.bus.topics.results, sys.bus.reply_partitions, Duration::from_secs(30), |seen| {
            seen.iter().filter(|(k, _, _)| ids.contains(k)).count() >= 2
        })
        .await;

    let command_schema = validator("transfer.commands.v1.json");
    let mine: Vec<&Value> =
        commands.iter().filter(|(k, _, _)| *k == m.user_id.to_string()).map(|(_, v, _)| v).collect();
    assert_eq!(mine.len(), 2);
    mine.iter().for_each(|c| assert_valid(&command_schema, c));
    let result_schema = validator("transfer.results.v1.json");
    let mine: Vec<&Value> = results.iter().filter(|(k, _, _)| ids.contains(k)).map(|(_, v, _)| v).collect();
    assert_eq!(mine.len(), 2);
    mine.iter().for_each(|r| assert_valid(&result_schema, r));
}

#[tokio::test]
async fn commands_are_keyed_by_member_whichever_card_they_debit() {
    let sys = shared();
    let pool = sys.pool().await;
    let m = seed_member(&pool, &[CardSpec::prepaid(100), CardSpec::prepaid(100)]).await;
    let there = sign_post(&m.body(0, 1, Some(10)), None, false);
    let back = sign_post(&m.body(1, 0, Some(10)), None, false);
    assert_eq!(sys.send(&there, &[]).await.code(), "000_000");
    assert_eq!(sys.send(&back, &[]).await.code(), "000_000");
    let ids = [there.correlation_id.clone(), back.correlation_id.clone()];
    let mine = |seen: &[TopicMessage]| -> Vec<TopicMessage> {
        seen.iter()
            .filter(|(_, v, _)| ids.iter().any(|id| v["correlationId"] == Value::String(id.clone())))
            .cloned()
            .collect()
    };
    let commands =
        read_topic(&sys.bus, &sys.bus.topics.commands, sys.bus.partitions, Duration::from_secs(30), |seen| {
            mine(seen).len() >= 2
        })
        .await;
    let keys: Vec<String> = mine(&commands).into_iter().map(|(k, _, _)| k).collect();
    assert_eq!(keys, vec![m.user_id.to_string(), m.user_id.to_string()]);
}

#[tokio::test]
async fn a_backlog_published_over_many_relay_rounds_keeps_each_cards_sequence_gap_free_and_in_order() {
    // One transfer per outbox row and two rows per relay round: the relay starts
    // on forty rows and works through them twenty rounds in a row.
    let sys =
        System::start(Roles { relay: false, env: vec![("WORKER_MAX_BATCH", "1".to_string())], ..Roles::default() });
    let pool = sys.pool().await;
    let mut members = Vec::new();
    for _ in 0..4 {
        members.push(
            seed_member(&pool, &[CardSpec::prepaid(10_000), CardSpec::prepaid(10_000), CardSpec::prepaid(10_000)])
                .await,
        );
    }
    let transfers = 10;
    for m in &members {
        for i in 0..transfers {
            let req = sign_post(&m.body(i % 3, (i + 1) % 3, Some(10 + i as i64)), None, false);
            let reply = sys.send(&req, &[("Prefer", "respond-async")]).await;
            assert_eq!(reply.status, 202, "{:?}", reply.json);
        }
    }
    let rows = members.len() * transfers;
    eventually(Duration::from_secs(60), "every transfer applied, its row waiting in the outbox", || async {
        let waiting: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
            .fetch_one(&pool)
            .await
            .unwrap();
        (waiting as usize >= rows).then_some(())
    })
    .await;

    sys.spawn("relay", &[("RELAY_BATCH", "4".to_string())]);
    eventually(Duration::from_secs(60), "the outbox published", || async {
        let waiting: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
            .fetch_one(&pool)
            .await
            .unwrap();
        (waiting == 0).then_some(())
    })
    .await;

    let cards: Vec<&String> = members.iter().flat_map(|m| &m.cards).collect();
    let expected: usize = 2 * rows;
    // The topic is this system's own and every row is published, so all its events
    // are stored: read them all (the read ends when nothing more comes) and expect
    // exactly one per card and transfer. Tansu's high watermarks cannot count them:
    // they fall short of the messages stored once a batch holds several.
    let events =
        read_topic(&sys.bus, &sys.bus.topics.card_balance, sys.bus.partitions, Duration::from_secs(8), |seen| {
            seen.len() > expected
        })
        .await;
    assert_eq!(events.len(), expected, "each balance event published once");
    let mut per_card: HashMap<&str, Vec<i64>> = HashMap::new();
    for (key, event, _) in &events {
        if cards.contains(&key) {
            per_card.entry(key.as_str()).or_default().push(event["sequence"].as_i64().unwrap());
        }
    }
    for card in cards {
        let n = entries(&pool, card).await.len() as i64;
        assert_eq!(per_card[card.as_str()], (1..=n).collect::<Vec<_>>(), "card {card}: in order, once each");
    }
}
