//! While the broker does not answer: the relay's outbox gauges keep telling the
//! truth (their alert is how anyone hears of the outage), a relay that loses its
//! lock mid-round stands by instead of publishing on, and everything goes out once
//! the broker is back. Each test pauses a broker of its own.

use crate::helpers::*;
use cardflow_ledger::outbox::{self, Announcement, EventHeaders};
use serde_json::json;
use sqlx::PgPool;
use std::time::Duration;

fn relay_only() -> Roles {
    Roles { gateway: false, workers: 0, relay: true, ..Roles::default() }
}

async fn relay_is_active(sys: &System) {
    eventually(Duration::from_secs(30), "the relay active", || async {
        (metric(&sys.try_metrics("relay").await?, "cardflow_relay_active") == Some(1.0)).then_some(())
    })
    .await;
}

/// An unpublished row, as a worker's batch leaves one.
async fn unpublished_row(sys: &System, pool: &PgPool, key: &str) {
    let mut tx = pool.begin().await.unwrap();
    let row = outbox::prepare(&[Announcement {
        topic: sys.bus.topics.transfer_events.clone(),
        partition: None,
        key: key.to_string(),
        headers: EventHeaders { traceparent: None },
        payload: json!({ "outage": key }),
    }]);
    outbox::insert(&mut tx, row).await.unwrap();
    tx.commit().await.unwrap();
}

/// The backend holding the relay's advisory lock in this system's database.
async fn lock_holder(pool: &PgPool) -> Option<i32> {
    sqlx::query_scalar(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .fetch_optional(pool)
    .await
    .unwrap()
}

/// A relay-only system on a broker of its own, the relay active, then the broker
/// paused and an unpublished row keyed `key` written: the relay's round waits.
async fn an_unpublished_row_behind_a_paused_broker(key: &str) -> (PrivateBroker, System, PgPool) {
    let broker = PrivateBroker::start();
    let sys = System::start_on(relay_only(), &broker.brokers);
    relay_is_active(&sys).await;
    let pool = sys.pool().await;
    broker.pause();
    unpublished_row(&sys, &pool, key).await;
    (broker, sys, pool)
}

#[tokio::test]
async fn the_outbox_age_keeps_growing_while_the_broker_does_not_answer() {
    let (broker, sys, _pool) = an_unpublished_row_behind_a_paused_broker("outage-age").await;
    eventually(Duration::from_secs(40), "the outbox age gauge past 8 s", || async {
        let age = metric(&sys.try_metrics("relay").await?, "cardflow_outbox_oldest_age_seconds")?;
        (age >= 8.0).then_some(())
    })
    .await;

    broker.resume();
    eventually(Duration::from_secs(60), "the row published and the outbox gauges back to zero", || async {
        let text = sys.try_metrics("relay").await?;
        let backlog = metric(&text, "cardflow_outbox_backlog_messages")?;
        let age = metric(&text, "cardflow_outbox_oldest_age_seconds")?;
        (backlog == 0.0 && age == 0.0).then_some(())
    })
    .await;
    let published =
        read_topic(&sys.bus, &sys.bus.topics.transfer_events, sys.bus.partitions, Duration::from_secs(20), |m| {
            !m.is_empty()
        })
        .await;
    assert!(!published.is_empty(), "the row's message reached transfer.events");
    sys.stop(None);
}

#[tokio::test]
async fn a_relay_that_loses_its_lock_while_the_broker_hangs_stands_by_and_takes_it_again() {
    let (broker, sys, pool) = an_unpublished_row_behind_a_paused_broker("outage-lock").await;
    // The relay reads the row at once (the outbox notifies) and waits on the broker.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let holder = lock_holder(&pool).await.expect("the relay holds its lock");
    sqlx::query("SELECT pg_terminate_backend($1)").bind(holder).execute(&pool).await.unwrap();

    // Only a relay that noticed, mid-round, that it had lost the lock takes it again.
    eventually(Duration::from_secs(30), "the relay holding its lock on a new connection", || async {
        lock_holder(&pool).await.filter(|pid| *pid != holder)
    })
    .await;
    broker.resume();
    sys.stop(None);
}
