//! `cardflow replay` and `cardflow tail`: tools for the people who consume events.

use anyhow::{bail, Context};
use cardflow_bus::headers as h;
use cardflow_bus::rdkafka::consumer::{Consumer, StreamConsumer};
use cardflow_bus::rdkafka::message::{Headers, Message};
use cardflow_bus::rdkafka::producer::{FutureProducer, FutureRecord};
use cardflow_bus::rdkafka::util::Timeout;
use cardflow_bus::rdkafka::{Offset, TopicPartitionList};
use cardflow_bus::BusConfig;
use std::time::Duration;

/// Republishes a card's balance events from the ledger, with their original ids.
pub async fn replay(pool: &sqlx::PgPool, bus: &BusConfig, card_no: &str, from_sequence: i64) -> anyhow::Result<usize> {
    cardflow_domain::CardNo::parse(card_no).context("--card is a 16-digit card number")?;
    let events = cardflow_ledger::events::balance_events(pool, card_no, from_sequence).await?;
    let producer: FutureProducer = bus.producer(5)?;
    // A replay is an operation of its own: its events carry its trace context, not
    // the original transfers' (those traces ended long ago).
    let span = tracing::info_span!("replay", otel.kind = "producer", card_no);
    let traceparent = cardflow_telemetry::traceparent_of(&span).unwrap_or_else(h::new_traceparent);
    for event in &events {
        let payload = serde_json::to_string(event)?;
        let headers = h::build([
            (h::TRACEPARENT, traceparent.as_str()),
            (h::CONTENT_TYPE, "application/json"),
            (h::SCHEMA_VERSION, "1"),
            ("replayed", "true"),
        ]);
        let record = FutureRecord::to(&bus.topics.card_balance).key(card_no).payload(&payload).headers(headers);
        producer.send(record, Timeout::After(Duration::from_secs(10))).await.map_err(|(e, _)| e)?;
    }
    Ok(events.len())
}

/// Resolves `card.balance` and friends to their prefixed names; other names pass.
fn physical(bus: &BusConfig, topic: &str) -> String {
    let t = &bus.topics;
    match topic {
        "transfer.commands" => t.commands.clone(),
        "transfer.results" => t.results.clone(),
        "card.balance" => t.card_balance.clone(),
        "transfer.events" => t.transfer_events.clone(),
        "transfer.commands.dlq" => t.dlq.clone(),
        other => other.to_string(),
    }
}

/// Prints a topic's messages as they arrive (or from the beginning), one per line.
pub async fn tail(bus: &BusConfig, topic: &str, from_beginning: bool, limit: Option<usize>) -> anyhow::Result<()> {
    let topic = physical(bus, topic);
    let consumer: StreamConsumer = bus.assigned_consumer()?;
    let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(10))?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default();
    if partitions.is_empty() {
        bail!("topic {topic} does not exist");
    }
    let mut tpl = TopicPartitionList::new();
    for p in &partitions {
        let offset = if from_beginning {
            Offset::Beginning
        } else {
            Offset::Offset(consumer.fetch_watermarks(&topic, *p, Duration::from_secs(10))?.1)
        };
        tpl.add_partition_offset(&topic, *p, offset)?;
    }
    consumer.assign(&tpl)?;
    eprintln!(
        "tailing {topic} ({} partitions){}; Ctrl-C stops",
        partitions.len(),
        if from_beginning { " from the beginning" } else { "" }
    );
    let mut printed = 0;
    while limit.is_none_or(|l| printed < l) {
        let m = tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            m = consumer.recv() => m?,
        };
        let key = m.key().map(|k| String::from_utf8_lossy(k).into_owned()).unwrap_or_default();
        let headers: Vec<String> = m
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|x| format!("{}={}", x.key, x.value.map(String::from_utf8_lossy).unwrap_or_default()))
                    .collect()
            })
            .unwrap_or_default();
        let payload = m.payload().map(String::from_utf8_lossy).unwrap_or_default();
        let pretty = serde_json::from_str::<serde_json::Value>(&payload)
            .ok()
            .and_then(|v| serde_json::to_string_pretty(&v).ok())
            .unwrap_or_else(|| payload.into_owned());
        println!("── {}[{}]@{}  key={}  {}\n{}", m.topic(), m.partition(), m.offset(), key, headers.join(" "), pretty);
        printed += 1;
    }
    Ok(())
}
