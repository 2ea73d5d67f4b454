# cardflow — the commands a newcomer needs. `make help` lists them.
#
# The local stack (PostgreSQL and a Kafka-compatible broker) is started on demand
# by scripts/stack.sh unless DATABASE_URL / KAFKA_BROKERS are given.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
CARGO ?= cargo
BIN := target/debug/cardflow
RELEASE_BIN := target/release/cardflow
BENCH_ARGS ?=

.PHONY: help stack stack-down build run test lint unit e2e deploy-check bench clean

help:
	@echo "make run        start the whole system locally with demo data (foreground)"
	@echo "make test       formatting, lints, unit tests, deploy/ checks and end-to-end tests"
	@echo "make bench      throughput and latency figures (BENCH_ARGS passed through)"
	@echo "make stack      start PostgreSQL and the broker in the background"
	@echo "make stack-down stop what 'make stack' started"

stack:
	@scripts/stack.sh up
	@$(CARGO) build -q -p cardflow
	@. .stack/env && $(BIN) topics

stack-down:
	@scripts/stack.sh down

build:
	$(CARGO) build --workspace

run: stack build
	@. .stack/env && $(BIN) migrate && $(BIN) seed --file fixtures/demo.json && $(BIN) topics
	@. .stack/env; $(BIN) all & pid=$$!; trap 'kill $$pid 2>/dev/null' INT TERM EXIT; \
	  until curl -sf http://127.0.0.1:8080/readyz >/dev/null; do \
	    kill -0 $$pid 2>/dev/null || { echo "cardflow failed to start"; exit 1; }; sleep 0.3; done; \
	  echo; echo "cardflow is up on http://127.0.0.1:8080. Try this in another terminal (the signature is valid"; \
	  echo "for 5 minutes; '$(BIN) sign --body ...' makes a fresh one, --encrypt an encrypted one):"; echo; \
	  $(BIN) sign --body '{"userId":1001,"fromCardNo":"9410000000000001","toCardNo":"9410000000000002","amount":1000}'; \
	  echo; echo "Ctrl-C stops it."; wait $$pid

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

unit:
	$(CARGO) test --workspace --lib --bins

e2e: stack
	@. .stack/env && $(CARGO) test -p cardflow --test e2e

deploy-check:
	@scripts/check-deploy.sh

test: lint unit deploy-check e2e

# A fresh broker per run and per phase (scripts/stack.sh bench-broker): see README, Performance.
# A --broker-per-phase in BENCH_ARGS comes last, so it replaces this one.
bench: stack
	$(CARGO) build --release -p cardflow
	@. .stack/env && brokers=$$(scripts/stack.sh bench-broker) && \
	  trap 'scripts/stack.sh bench-broker-down' EXIT && \
	  KAFKA_BROKERS=$$brokers $(RELEASE_BIN) bench --broker-per-phase 'scripts/stack.sh bench-broker' $(BENCH_ARGS)

clean: stack-down
	$(CARGO) clean
