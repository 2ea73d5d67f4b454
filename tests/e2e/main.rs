//! End-to-end tests: the real `cardflow` binary against a real PostgreSQL and a
//! real Kafka-protocol broker. Each module is one area of behaviour; each test is
//! one behaviour, named after it.

mod helpers;

mod asynchronous;
mod concurrency;
mod events;
mod idempotency;
mod observability;
mod outage;
mod rules;
mod security;
mod transfer;
