#!/usr/bin/env bash
# Checks what deploy/ ships, and the API's OpenAPI document, without building or
# starting anything:
#
#   1. alert rules: `promtool check rules` and their unit tests (`promtool test rules`)
#   2. the Prometheus config: `promtool check config`
#   3. the Grafana dashboard: valid JSON; every metric defined in
#      crates/telemetry/src/lib.rs is on some panel; every panel query parses
#   4. metric names used by the alerts and the dashboard all exist in telemetry
#   5. every YAML file under deploy/ parses
#   6. the Kubernetes manifests: structure, probes, resources, scrape annotations,
#      `kubectl kustomize` and `kubernetes-validate --strict` where installed
#   7. the compose file: `docker compose config -q` where docker compose works
#   8. docs/openapi.json: `openapi-spec-validator` (PyPI), installed with pip into a
#      cached venv when missing; skipped when python3, its venv or the network is not
#      there. That the file is what the code builds is a unit test's job (openapi.rs).
#
# promtool is installed when missing: the Debian package `prometheus` is fetched
# with apt-get and only its promtool is unpacked into a cache directory, so no
# Prometheus service gets installed or started (apt-get update needs root or sudo).
#
# Usage: scripts/check-deploy.sh
set -euo pipefail
cd "$(dirname "$0")/.."

TELEMETRY=crates/telemetry/src/lib.rs
DASHBOARD=deploy/grafana/dashboards/cardflow.json
ALERTS=deploy/prometheus/alerts.yml
ALERT_TESTS=deploy/prometheus/alerts_test.yml
PROM_CONFIG=deploy/prometheus/prometheus.yml
COMPOSE=deploy/docker-compose.yml
K8S=deploy/k8s
OPENAPI=docs/openapi.json
OPENAPI_VALIDATOR="openapi-spec-validator==0.9.0"

passed=0
failed=0
skipped=0
failures=()
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

PY=""
if command -v python3 >/dev/null 2>&1; then PY=python3; fi
HAVE_YAML=0
if [ -n "$PY" ] && "$PY" -c 'import yaml' >/dev/null 2>&1; then HAVE_YAML=1; fi

# run NAME FUNCTION: one check; its output is indented; failures are collected.
run() {
  local name="$1" fn="$2" rc=0
  echo "== $name"
  "$fn" >"$WORK/out" 2>&1 || rc=$?
  sed 's/^/   /' "$WORK/out"
  case "$rc" in
    0) passed=$((passed + 1)); echo "   ok" ;;
    77) skipped=$((skipped + 1)) ;;
    *) failed=$((failed + 1)); failures+=("$name"); echo "   FAILED" ;;
  esac
}

# A check that cannot run here says why and returns 77: `skip "reason"; return`.
skip() { echo "skipping $1"; return 77; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo -n "$@"
  else echo "need root or sudo for: $*" >&2; return 1
  fi
}

# ------------------------------------------------------------------ promtool
PROMTOOL=""
find_promtool() {
  local cache="${XDG_CACHE_HOME:-$HOME/.cache}/cardflow/promtool"
  if command -v promtool >/dev/null 2>&1; then PROMTOOL="$(command -v promtool)"; return 0; fi
  if [ -x "$cache/usr/bin/promtool" ]; then PROMTOOL="$cache/usr/bin/promtool"; return 0; fi
  command -v apt-get >/dev/null 2>&1 || { echo "promtool is missing and apt-get is not available" >&2; return 1; }
  echo "installing promtool from the Debian package 'prometheus' into $cache" >&2
  local dl="$WORK/deb"
  mkdir -p "$dl" "$cache"
  if ! (cd "$dl" && apt-get download -qq prometheus >/dev/null 2>&1); then
    as_root apt-get update -qq >/dev/null || return 1
    (cd "$dl" && apt-get download -qq prometheus >/dev/null) || return 1
  fi
  dpkg-deb -x "$dl"/prometheus_*.deb "$dl/x" || return 1
  install -D -m 0755 "$dl/x/usr/bin/promtool" "$cache/usr/bin/promtool" || return 1
  PROMTOOL="$cache/usr/bin/promtool"
}

check_rules() {
  "$PROMTOOL" check rules "$ALERTS" || return 1
  "$PROMTOOL" test rules "$ALERT_TESTS" || return 1
}

check_prom_config() {
  "$PROMTOOL" check config "$PROM_CONFIG"
}

# ----------------------------------------------------------------- dashboard
telemetry_metrics() {
  grep -o '"cardflow_[a-z0-9_]*"' "$TELEMETRY" | tr -d '"' | sort -u
}

check_dashboard() {
  [ -n "$PY" ] || { echo "python3 is needed to parse the dashboard" >&2; return 1; }
  "$PY" -m json.tool "$DASHBOARD" >/dev/null || { echo "$DASHBOARD is not valid JSON" >&2; return 1; }
  local metrics missing=() m n=0
  metrics="$(telemetry_metrics)"
  [ -n "$metrics" ] || { echo "no cardflow_* metric names found in $TELEMETRY" >&2; return 1; }
  for m in $metrics; do
    n=$((n + 1))
    # The name itself, or a histogram's _bucket/_sum/_count, as a whole word.
    grep -Eq "(^|[^a-zA-Z0-9_])${m}(_bucket|_sum|_count)?([^a-zA-Z0-9_]|$)" "$DASHBOARD" || missing+=("$m")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "metrics of $TELEMETRY on no dashboard panel:" >&2
    printf '  %s\n' "${missing[@]}" >&2
    return 1
  fi
  echo "all $n metrics of $TELEMETRY appear in $DASHBOARD"
  # Every panel query must parse: promtool checks them as recording rules, with
  # Grafana's interval variables replaced by a fixed range.
  "$PY" - "$DASHBOARD" "$WORK/dashboard_rules.yml" "$WORK/dashboard_queries.txt" <<'PYEOF' || return 1
import json, sys
dash = json.load(open(sys.argv[1]))
exprs = []
def walk(panels):
    for p in panels:
        for t in p.get("targets", []):
            if t.get("expr"):
                exprs.append((p.get("title", "?"), t["expr"]))
        walk(p.get("panels", []))
walk(dash.get("panels", []))
if not exprs:
    sys.exit("the dashboard has no queries")
with open(sys.argv[2], "w") as f, open(sys.argv[3], "w") as index:
    f.write("groups:\n  - name: dashboard\n    rules:\n")
    for i, (title, e) in enumerate(exprs):
        index.write(f"dashboard:query_{i} panel {title!r}: {e}\n")
        for var in ("$__rate_interval", "$__interval", "$__range"):
            e = e.replace(var, "5m")
        f.write(f"      - record: dashboard:query_{i}\n        expr: {json.dumps(e)}\n")
print(f"{len(exprs)} panel queries")
PYEOF
  if ! "$PROMTOOL" check rules "$WORK/dashboard_rules.yml" >"$WORK/promql.out" 2>&1; then
    echo "panel queries that do not parse:" >&2
    grep -o 'dashboard:query_[0-9]*' "$WORK/promql.out" | sort -u | while read -r q; do
      grep "^$q " "$WORK/dashboard_queries.txt" >&2
    done
    grep -i 'error' "$WORK/promql.out" >&2
    return 1
  fi
  echo "all panel queries parse"
}

# Names used in alerts and dashboard that telemetry does not define are typos:
# PromQL would silently return nothing.
check_metric_names() {
  local defined used unknown=() u base
  defined="$(telemetry_metrics)"
  used="$(cat "$ALERTS" "$DASHBOARD" | grep -o 'cardflow_[a-z0-9_]*' | sort -u)"
  for u in $used; do
    base="$u"
    case "$u" in *_bucket | *_sum | *_count) base="${u%_*}" ;; esac
    grep -qx "$u" <<<"$defined" || grep -qx "$base" <<<"$defined" || unknown+=("$u")
  done
  if [ "${#unknown[@]}" -gt 0 ]; then
    echo "names used in $ALERTS or $DASHBOARD but not defined in $TELEMETRY:" >&2
    printf '  %s\n' "${unknown[@]}" >&2
    return 1
  fi
  echo "$(wc -w <<<"$used") distinct cardflow_* names used, all defined"
}

# ---------------------------------------------------------------------- YAML
check_yaml() {
  [ "$HAVE_YAML" = 1 ] || { skip "YAML parse: python3 with PyYAML is not available"; return; }
  find deploy -type f \( -name '*.yml' -o -name '*.yaml' \) -print0 | sort -z |
    xargs -0 "$PY" -c '
import sys, yaml
bad = 0
for path in sys.argv[1:]:
    try:
        docs = [d for d in yaml.safe_load_all(open(path)) if d is not None]
        print(f"{path}: {len(docs)} document(s)")
    except yaml.YAMLError as e:
        bad += 1
        print(f"{path}: {e}", file=sys.stderr)
sys.exit(1 if bad else 0)
'
}

check_k8s() {
  [ "$HAVE_YAML" = 1 ] || { skip "Kubernetes manifests: python3 with PyYAML is not available"; return; }
  "$PY" - "$K8S" <<'PYEOF' || return 1
import glob, os, sys, yaml
root = sys.argv[1]
errors, count = [], 0
def err(where, msg):
    errors.append(f"{where}: {msg}")
for path in sorted(glob.glob(os.path.join(root, "*.yaml"))):
    if os.path.basename(path) == "kustomization.yaml":
        continue
    for doc in yaml.safe_load_all(open(path)):
        if doc is None:
            continue
        count += 1
        kind, meta = doc.get("kind"), doc.get("metadata") or {}
        where = f"{os.path.basename(path)} {kind}/{meta.get('name')}"
        if not doc.get("apiVersion") or not kind or not meta.get("name"):
            err(where, "apiVersion, kind and metadata.name are required")
            continue
        if kind != "Namespace" and meta.get("namespace") != "cardflow":
            err(where, "metadata.namespace must be cardflow")
        if kind in ("Deployment", "StatefulSet", "Job"):
            template = doc["spec"]["template"]
        elif kind == "CronJob":
            template = doc["spec"]["jobTemplate"]["spec"]["template"]
        else:
            continue
        pod = template["spec"]
        for c in pod.get("containers", []):
            cw = f"{where} container {c.get('name')}"
            if not c.get("image"):
                err(cw, "no image")
            res = c.get("resources") or {}
            for part in ("requests", "limits"):
                if not {"cpu", "memory"} <= set((res.get(part) or {})):
                    err(cw, f"resources.{part} needs cpu and memory")
            sc = c.get("securityContext") or {}
            if sc.get("allowPrivilegeEscalation") is not False:
                err(cw, "securityContext.allowPrivilegeEscalation must be false")
        if not (pod.get("securityContext") or {}).get("runAsNonRoot"):
            err(where, "pod securityContext.runAsNonRoot must be true")
        if kind in ("Deployment", "StatefulSet"):
            labels = template["metadata"].get("labels") or {}
            sel = doc["spec"]["selector"]["matchLabels"]
            if any(labels.get(k) != v for k, v in sel.items()):
                err(where, "selector.matchLabels does not match the pod template's labels")
            ann = template["metadata"].get("annotations") or {}
            ports = {p["containerPort"] for c in pod["containers"] for p in c.get("ports", [])}
            if ann.get("prometheus.io/scrape") != "true" or int(ann.get("prometheus.io/port", 0)) not in ports:
                err(where, "needs prometheus.io/scrape \"true\" and a prometheus.io/port that is a containerPort")
            for c in pod["containers"]:
                live = ((c.get("livenessProbe") or {}).get("httpGet") or {}).get("path")
                ready = ((c.get("readinessProbe") or {}).get("httpGet") or {}).get("path")
                if live != "/healthz" or ready != "/readyz":
                    err(f"{where} container {c['name']}", "liveness must GET /healthz and readiness /readyz")
        if kind == "StatefulSet" and meta["name"] == "gateway":
            cmd = " ".join(pod["containers"][0].get("command", []))
            if "GATEWAY_REPLY_PARTITION=${HOSTNAME##*-}" not in cmd:
                err(where, "the gateway must take GATEWAY_REPLY_PARTITION from its pod ordinal")
for e in errors:
    print(e, file=sys.stderr)
print(f"{count} Kubernetes objects checked")
sys.exit(1 if errors else 0)
PYEOF
  if command -v kubectl >/dev/null 2>&1; then
    kubectl kustomize "$K8S" >"$WORK/k8s.yaml" || return 1
    echo "kubectl kustomize: $(grep -c '^kind:' "$WORK/k8s.yaml") objects rendered"
  else
    echo "kubectl not installed: kustomization not rendered"
  fi
  if command -v kubernetes-validate >/dev/null 2>&1; then
    find "$K8S" -name '*.yaml' ! -name kustomization.yaml -print0 | sort -z |
      xargs -0 kubernetes-validate --strict --quiet || return 1
    echo "kubernetes-validate --strict: schemas ok"
  else
    echo "kubernetes-validate not installed: schemas not checked (pip install kubernetes-validate)"
  fi
}

# ------------------------------------------------------------------- compose
check_compose() {
  local why
  if ! command -v docker >/dev/null 2>&1; then
    skip "compose check: docker is not installed"; return
  fi
  if ! why="$(docker compose version 2>&1)"; then
    skip "compose check: 'docker compose version' failed: $(head -n1 <<<"$why")"; return
  fi
  echo "$why"
  docker compose -f "$COMPOSE" config -q
}

# ------------------------------------------------------------------- OpenAPI
check_openapi() {
  [ -n "$PY" ] || { skip "OpenAPI document: python3 is not available"; return; }
  local venv="${XDG_CACHE_HOME:-$HOME/.cache}/cardflow/openapi-venv"
  local validator="$venv/bin/openapi-spec-validator"
  if [ ! -x "$validator" ]; then
    echo "installing $OPENAPI_VALIDATOR into $venv"
    rm -rf "$venv"
    if ! "$PY" -m venv "$venv" >"$WORK/venv.out" 2>&1; then
      rm -rf "$venv"
      skip "OpenAPI document: '$PY -m venv' failed (Debian: python3-venv): $(tail -n1 "$WORK/venv.out")"; return
    fi
    if ! "$venv/bin/pip" install -q --disable-pip-version-check "$OPENAPI_VALIDATOR" >"$WORK/pip.out" 2>&1; then
      # A half-installed venv would be taken for a working one next time.
      rm -rf "$venv"
      skip "OpenAPI document: pip could not install $OPENAPI_VALIDATOR: $(tail -n1 "$WORK/pip.out")"; return
    fi
  fi
  "$validator" "$OPENAPI"
}

# ----------------------------------------------------------------------- run
if find_promtool; then
  echo "promtool: $PROMTOOL ($("$PROMTOOL" --version 2>&1 | head -n1))"
  run "alert rules and their tests" check_rules
  run "prometheus config" check_prom_config
  run "grafana dashboard" check_dashboard
else
  failed=$((failed + 1)); failures+=("promtool install")
fi
run "metric names in alerts and dashboard" check_metric_names
run "YAML syntax" check_yaml
run "kubernetes manifests" check_k8s
run "docker compose" check_compose
run "OpenAPI document" check_openapi

echo
if [ "$failed" -gt 0 ]; then
  printf 'failed: %s\n' "${failures[@]}"
fi
echo "check-deploy: $passed passed, $failed failed, $skipped skipped"
[ "$failed" -eq 0 ]
