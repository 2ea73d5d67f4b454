#!/usr/bin/env bash
# Local dependency stack for cardflow: PostgreSQL + a Kafka-compatible broker (Tansu).
#
#   scripts/stack.sh up      start (or reuse) everything, write .stack/env
#   scripts/stack.sh down    stop only what `up` started, remove .stack/env
#   scripts/stack.sh status  show what is running
#   scripts/stack.sh bench-broker       start a fresh broker for one bench run, print its address
#   scripts/stack.sh bench-broker-down  stop it
#
# Then:  . .stack/env   (exports DATABASE_URL, KAFKA_BROKERS and TANSU_BIN)
#
# External services: set DATABASE_URL and/or KAFKA_BROKERS before `up` and the
# corresponding local service is not started. Tansu is installed either way: the
# end-to-end outage tests start (and pause) a broker of their own from TANSU_BIN.
set -euo pipefail

# Everything below uses paths relative to the repo root.
cd "$(dirname "$0")/.."
ROOT="$PWD"
STACK="$ROOT/.stack"

PG_DIR="$STACK/pg"
PG_DATA="$PG_DIR/data"
PG_SOCK="$PG_DIR/sock"
PG_LOG="$PG_DIR/log"
PG_PORT_FILE="$PG_DIR/port"
PG_URL_FILE="$PG_DIR/url"
PG_DB=cardflow
PG_SUPERUSER=postgres
PG_OS_USER=postgres # initdb/postgres refuse to run as root

TANSU_VERSION=0.6.0
# Version is part of the default path so bumping TANSU_VERSION reinstalls.
TANSU_HOME="${TANSU_HOME:-/opt/tansu-$TANSU_VERSION}"
TANSU_BIN="${TANSU_BIN:-$TANSU_HOME/bin/tansu}"
TANSU_PID="$STACK/tansu.pid"
TANSU_LOG="$STACK/tansu.log"
TANSU_PORT_FILE="$STACK/tansu.port"
TANSU_URL_FILE="$STACK/tansu.brokers"

# mask_urls: stdin to stdout with the password of `user:password@` and of a
# `password=` parameter replaced by ***, so an external DATABASE_URL's password
# never reaches a terminal or a CI log.
mask_urls() {
    sed -E 's#(://[^:/@[:space:]]*):[^@/[:space:]]*@#\1:***@#g; s#([?&][Pp][Aa][Ss][Ss][Ww][Oo][Rr][Dd]=)[^&[:space:]]*#\1***#g'
}

ENV_FILE="$STACK/env"

# First ports tried; we scan upwards from here. Deliberately not 5432/9092,
# which a system PostgreSQL / Kafka may already own.
PG_PORT_BASE=55432
TANSU_PORT_BASE=19092

log() { printf '[stack] %s\n' "$*"; }
die() { printf '[stack] ERROR: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- helpers ---

# Run as root directly, otherwise via sudo (developer laptops).
as_root() {
    if [[ $EUID -eq 0 ]]; then "$@"
    elif command -v sudo >/dev/null; then sudo "$@"
    else die "need root for: $*"
    fi
}

apt_install() {
    log "installing via apt: $*"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# Run a command as the PostgreSQL OS user when we are root (initdb refuses
# root); as a normal user just run it as ourselves. cd first so the target
# user never trips over an unreadable cwd.
as_pg_user() {
    if [[ $EUID -eq 0 ]]; then
        (cd "$PG_DIR" && runuser -u "$PG_OS_USER" -- "$@")
    else
        (cd "$PG_DIR" && "$@")
    fi
}

# True if something accepts TCP connections on 127.0.0.1:$1.
port_answers() {
    timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

# True if the port is taken (listening on any address).
port_in_use() {
    if command -v ss >/dev/null; then
        [[ -n "$(ss -Hltn "sport = :$1" 2>/dev/null)" ]]
    else
        port_answers "$1"
    fi
}

# pick_port BASE [PREFERRED]: PREFERRED if free (keeps URLs stable across
# down/up), else the first free port >= BASE.
pick_port() {
    local base=$1 preferred=${2:-} p
    if [[ -n "$preferred" ]] && ! port_in_use "$preferred"; then
        echo "$preferred"; return
    fi
    for ((p = base; p < base + 200; p++)); do
        port_in_use "$p" || { echo "$p"; return; }
    done
    die "no free port in $base..$((base + 199))"
}

# True if pid file $1 names a live process whose command line contains $2.
pid_alive() {
    local pid
    [[ -s "$1" ]] || return 1
    pid=$(<"$1")
    [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
    # Guard against pid reuse: the process must still be what we started.
    [[ "$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null)" == *"$2"* ]]
}

# ------------------------------------------------------------- PostgreSQL ---

# Locate real server binaries. /usr/local/bin/{initdb,pg_ctl} may be wrappers
# or symlinks, so we look for a directory that holds initdb+pg_ctl+postgres
# together. Prefer the version an existing data dir was created with.
find_pg_bin() {
    local want="" d
    [[ -f "$PG_DATA/PG_VERSION" ]] && want=$(<"$PG_DATA/PG_VERSION")
    local candidates=()
    [[ -n "$want" ]] && candidates+=("/usr/lib/postgresql/$want/bin")
    # Debian layout, newest major first.
    while IFS= read -r d; do candidates+=("$d"); done < <(
        printf '%s\n' /usr/lib/postgresql/*/bin | grep -v '\*' | sort -t/ -k5,5 -V -r)
    command -v pg_config >/dev/null && candidates+=("$(pg_config --bindir 2>/dev/null || true)")
    command -v initdb >/dev/null && candidates+=("$(dirname "$(readlink -f "$(command -v initdb)")")")
    for d in "${candidates[@]}"; do
        [[ -n "$d" && -x "$d/initdb" && -x "$d/pg_ctl" && -x "$d/postgres" ]] && { echo "$d"; return 0; }
    done
    return 1
}

find_psql() {
    if [[ -n "${PG_BIN:-}" && -x "$PG_BIN/psql" ]]; then echo "$PG_BIN/psql"
    elif command -v psql >/dev/null; then command -v psql
    else return 1
    fi
}

ensure_psql() {
    PSQL=$(find_psql) || { apt_install postgresql-client; PSQL=$(find_psql) || die "psql not found after install"; }
}

# Create the postgres OS user if the server package did not (e.g. binaries
# copied in by hand).
ensure_pg_os_user() {
    [[ $EUID -eq 0 ]] || return 0
    id -u "$PG_OS_USER" >/dev/null 2>&1 && return 0
    log "creating system user $PG_OS_USER"
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$PG_OS_USER"
}

local_pg_running() {
    [[ -n "${PG_BIN:-}" && -f "$PG_DATA/PG_VERSION" ]] &&
        as_pg_user "$PG_BIN/pg_ctl" -D "$PG_DATA" status >/dev/null 2>&1
}

# Port of the running postmaster (line 4 of postmaster.pid).
running_pg_port() { sed -n 4p "$PG_DATA/postmaster.pid" 2>/dev/null; }

# Major version of the selected binaries ("postgres (PostgreSQL) 15.20" -> 15).
pg_major() { "$PG_BIN/postgres" -V | awk '{print $3}' | cut -d. -f1; }

pg_url() { echo "postgres://$PG_SUPERUSER@127.0.0.1:$1/$PG_DB"; }

init_pg_cluster() {
    log "initdb $PG_DATA"
    as_pg_user "$PG_BIN/initdb" -D "$PG_DATA" -U "$PG_SUPERUSER" -A trust \
        -E UTF8 --locale=C.UTF-8 --no-sync >"$PG_DIR/initdb.log" 2>&1 ||
        { cat "$PG_DIR/initdb.log" >&2; die "initdb failed"; }

    # Unix socket paths are capped at ~107 bytes; fall back to TCP only.
    local sockdirs="'$PG_SOCK'"
    if (( ${#PG_SOCK} > 90 )); then
        log "repo path too long for a unix socket; TCP only"
        sockdirs="''"
    fi
    # Throwaway test cluster: durability off for speed, enough connections
    # for parallel test binaries. The port is passed at start time instead.
    cat >>"$PG_DATA/postgresql.conf" <<EOF

# --- added by scripts/stack.sh ---
listen_addresses = '127.0.0.1'
unix_socket_directories = $sockdirs
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 200
shared_buffers = 256MB
EOF
}

pg_up() {
    # External database: just check that it answers.
    if [[ -n "${DATABASE_URL:-}" ]]; then
        ensure_psql
        "$PSQL" -X "$DATABASE_URL" -qtAc 'select 1' >/dev/null ||
            die "DATABASE_URL is set but does not answer: $(mask_urls <<<"$DATABASE_URL")"
        log "postgres: using external DATABASE_URL (answers)"
        return
    fi

    if ! PG_BIN=$(find_pg_bin); then
        apt_install postgresql postgresql-client
        PG_BIN=$(find_pg_bin) || die "PostgreSQL server binaries not found after install"
    fi
    ensure_psql
    ensure_pg_os_user

    mkdir -p "$PG_DIR"
    if [[ $EUID -eq 0 ]]; then
        chmod 755 "$STACK"
        chown "$PG_OS_USER:" "$PG_DIR"
        # The postgres user must be able to reach .stack/pg through every parent.
        runuser -u "$PG_OS_USER" -- test -x "$PG_DIR" ||
            die "user $PG_OS_USER cannot reach $PG_DIR (a parent dir lacks o+x); move the repo or chmod o+x its parents"
    fi

    # Data dir from another major version cannot be started: it is
    # throwaway, so recreate it.
    if [[ -f "$PG_DATA/PG_VERSION" && "$(<"$PG_DATA/PG_VERSION")" != "$(pg_major)" ]]; then
        log "postgres: data dir is version $(<"$PG_DATA/PG_VERSION"), binaries are not; recreating"
        as_pg_user "$PG_BIN/pg_ctl" -D "$PG_DATA" stop -m immediate >/dev/null 2>&1 || true
        rm -rf "$PG_DATA"
    fi

    local port
    if local_pg_running; then
        port=$(running_pg_port)
        log "postgres: reusing running cluster on 127.0.0.1:$port"
    else
        [[ -f "$PG_DATA/PG_VERSION" ]] || init_pg_cluster
        port=$(pick_port "$PG_PORT_BASE" "$(cat "$PG_PORT_FILE" 2>/dev/null || true)")
        mkdir -p "$PG_SOCK"
        [[ $EUID -eq 0 ]] && chown "$PG_OS_USER:" "$PG_SOCK"
        log "postgres: starting $("$PG_BIN/postgres" -V | awk '{print $3}') on 127.0.0.1:$port (log: ${PG_LOG#"$ROOT"/})"
        as_pg_user "$PG_BIN/pg_ctl" -D "$PG_DATA" -l "$PG_LOG" -w -t 60 -o "-p $port" start >/dev/null ||
            { tail -n 30 "$PG_LOG" >&2 || true; die "pg_ctl start failed"; }
    fi
    echo "$port" >"$PG_PORT_FILE"

    # Trust auth + superuser `postgres`, so tests can CREATE DATABASE.
    local admin="postgres://$PG_SUPERUSER@127.0.0.1:$port/postgres"
    "$PSQL" -X "$admin" -qtAc 'select 1' >/dev/null || die "postgres on port $port does not answer"
    if [[ "$("$PSQL" -X "$admin" -qtAc "select 1 from pg_database where datname = '$PG_DB'")" != 1 ]]; then
        "$PSQL" -X "$admin" -qc "create database $PG_DB" || die "could not create database $PG_DB"
        log "postgres: created database $PG_DB"
    fi
    DATABASE_URL=$(pg_url "$port")
    echo "$DATABASE_URL" >"$PG_URL_FILE"
}

pg_down() {
    PG_BIN=$(find_pg_bin) || { log "postgres: no server binaries, nothing to stop"; return; }
    if local_pg_running; then
        as_pg_user "$PG_BIN/pg_ctl" -D "$PG_DATA" -w -m fast stop >/dev/null
        log "postgres: stopped"
    else
        log "postgres: not running"
    fi
}

# ------------------------------------------------------------------ Tansu ---

ensure_tansu() {
    if [[ -x "$TANSU_BIN" ]] && [[ "$("$TANSU_BIN" --version 2>/dev/null)" == "tansu $TANSU_VERSION" ]]; then
        return
    fi
    command -v cargo >/dev/null || die "$TANSU_BIN missing and cargo not on PATH"
    log "installing tansu $TANSU_VERSION into $TANSU_HOME (cargo install, takes a while)"
    # --force: replace a binary of a different version under a custom TANSU_HOME.
    as_root_if_needed cargo install tansu --locked --force --version "$TANSU_VERSION" \
        --features dynostore --root "$TANSU_HOME"
}

# /opt usually needs root; a user-writable TANSU_HOME does not.
as_root_if_needed() {
    local parent=$TANSU_HOME
    while [[ ! -e "$parent" ]]; do parent=$(dirname "$parent"); done
    if [[ -w "$parent" ]]; then "$@"; else as_root env "PATH=$PATH" "$@"; fi
}

tansu_up() {
    if [[ -n "${KAFKA_BROKERS:-}" ]]; then
        log "kafka: using external KAFKA_BROKERS=$KAFKA_BROKERS"
        return
    fi
    mkdir -p "$STACK"

    local port
    if pid_alive "$TANSU_PID" tansu && port=$(cat "$TANSU_PORT_FILE" 2>/dev/null) && port_answers "$port"; then
        log "kafka: reusing tansu (pid $(<"$TANSU_PID")) on 127.0.0.1:$port"
    else
        # A live-but-unresponsive tansu is killed; a stale pid file is dropped.
        tansu_stop quiet
        ensure_tansu
        port=$(pick_port "$TANSU_PORT_BASE" "$(cat "$TANSU_PORT_FILE" 2>/dev/null || true)")
        log "kafka: starting tansu $TANSU_VERSION on 127.0.0.1:$port (log: ${TANSU_LOG#"$ROOT"/})"
        # setsid detaches it from our session/Ctrl-C; setsid may fork, so the
        # inner shell writes its own pid and then execs tansu (same pid).
        # shellcheck disable=SC2016 # $$/$0/$@ are for the inner sh
        nohup setsid sh -c 'echo $$ >"$0"; exec "$@"' "$TANSU_PID" \
            "$TANSU_BIN" broker \
            --storage-engine memory://tansu/ \
            --listener-url "tcp://127.0.0.1:$port" \
            --advertised-listener-url "tcp://127.0.0.1:$port" \
            >"$TANSU_LOG" 2>&1 </dev/null &
        echo "$port" >"$TANSU_PORT_FILE"

        local i
        for ((i = 0; i < 150; i++)); do
            port_answers "$port" && break
            # Wait for the pid file, then bail out early if tansu died.
            if (( i > 5 )) && ! pid_alive "$TANSU_PID" tansu; then
                tail -n 30 "$TANSU_LOG" >&2 || true
                die "tansu exited during startup"
            fi
            sleep 0.2
        done
        port_answers "$port" || { tail -n 30 "$TANSU_LOG" >&2 || true; die "tansu did not open port $port within 30s"; }
    fi
    KAFKA_BROKERS="127.0.0.1:$port"
    echo "$KAFKA_BROKERS" >"$TANSU_URL_FILE"
}

# tansu_stop [quiet]: TERM, wait up to 10s, then KILL.
tansu_stop() {
    if pid_alive "$TANSU_PID" tansu; then
        local pid i
        pid=$(<"$TANSU_PID")
        kill "$pid" 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        if kill -0 "$pid" 2>/dev/null; then kill -9 "$pid" 2>/dev/null || true; fi
        log "kafka: stopped tansu (pid $pid)"
    elif [[ "${1:-}" != quiet ]]; then
        log "kafka: tansu not running"
    fi
    rm -f "$TANSU_PID"
}

# ------------------------------------------------------------- commands ---

# If the caller has sourced a previous .stack/env, DATABASE_URL/KAFKA_BROKERS
# point at *our* services; that must not count as "external", otherwise
# `down; up` would try to reuse a dead URL instead of restarting.
forget_own_env() {
    if [[ -n "${DATABASE_URL:-}" && -f "$PG_URL_FILE" && "$DATABASE_URL" == "$(<"$PG_URL_FILE")" ]]; then
        unset DATABASE_URL
    fi
    if [[ -n "${KAFKA_BROKERS:-}" && -f "$TANSU_URL_FILE" && "$KAFKA_BROKERS" == "$(<"$TANSU_URL_FILE")" ]]; then
        unset KAFKA_BROKERS
    fi
}

cmd_up() {
    mkdir -p "$STACK"
    forget_own_env
    pg_up
    tansu_up
    ensure_tansu
    # Only these variables; no RUST_LOG or other defaults.
    {
        printf 'export DATABASE_URL=%q\n' "$DATABASE_URL"
        printf 'export KAFKA_BROKERS=%q\n' "$KAFKA_BROKERS"
        printf 'export TANSU_BIN=%q\n' "$TANSU_BIN"
    } >"$ENV_FILE"
    log "wrote ${ENV_FILE#"$ROOT"/}:"
    mask_urls <"$ENV_FILE"
}

# `make bench` measures against a broker of its own, started empty for every run:
# Tansu's memory engine lists every stored batch of a partition on each fetch, so
# it slows as it fills, and a run's figures would depend on how many runs (and
# test suites) the shared broker had seen before (README, Performance).
use_bench_broker() {
    TANSU_PID="$STACK/bench-tansu.pid"
    TANSU_LOG="$STACK/bench-tansu.log"
    TANSU_PORT_FILE="$STACK/bench-tansu.port"
    TANSU_URL_FILE="$STACK/bench-tansu.brokers"
    TANSU_PORT_BASE=19192
}

cmd_bench_broker() {
    mkdir -p "$STACK"
    forget_own_env
    # An external broker (KAFKA_BROKERS) is used as it is.
    if [[ -z "${KAFKA_BROKERS:-}" ]]; then
        use_bench_broker
        tansu_stop quiet
        tansu_up >&2
    fi
    echo "$KAFKA_BROKERS"
}

cmd_bench_broker_down() {
    use_bench_broker
    tansu_stop quiet
}

cmd_down() {
    (cmd_bench_broker_down)
    tansu_stop
    pg_down
    # The *.url/brokers records are kept on purpose: see forget_own_env.
    rm -f "$ENV_FILE"
    log "removed ${ENV_FILE#"$ROOT"/}"
}

cmd_status() {
    PG_BIN=$(find_pg_bin 2>/dev/null) || PG_BIN=""
    if local_pg_running; then
        echo "postgres: running, pid $(head -n1 "$PG_DATA/postmaster.pid"), 127.0.0.1:$(running_pg_port), data ${PG_DATA#"$ROOT"/}"
    elif [[ -f "$PG_DATA/PG_VERSION" ]]; then
        echo "postgres: stopped (cluster exists in ${PG_DATA#"$ROOT"/})"
    else
        echo "postgres: no local cluster"
    fi
    if pid_alive "$TANSU_PID" tansu; then
        local port
        port=$(cat "$TANSU_PORT_FILE" 2>/dev/null || echo '?')
        if port_answers "$port"; then
            echo "kafka:    tansu running, pid $(<"$TANSU_PID"), 127.0.0.1:$port"
        else
            echo "kafka:    tansu pid $(<"$TANSU_PID") alive but port $port not answering"
        fi
    else
        echo "kafka:    tansu not running"
    fi
    if [[ -f "$ENV_FILE" ]]; then
        echo "${ENV_FILE#"$ROOT"/}:"
        mask_urls <"$ENV_FILE" | sed 's/^/  /'
    else
        echo "${ENV_FILE#"$ROOT"/}: absent"
    fi
}

case "${1:-}" in
    up) cmd_up ;;
    down) cmd_down ;;
    status) cmd_status ;;
    bench-broker) cmd_bench_broker ;;
    bench-broker-down) cmd_bench_broker_down ;;
    *) echo "usage: $0 up|down|status|bench-broker|bench-broker-down" >&2; exit 2 ;;
esac
