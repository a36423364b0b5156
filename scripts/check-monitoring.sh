#!/usr/bin/env bash
# Checks keygate's monitoring with the real tools (issue: metrics checked by Prometheus itself):
#
#   1. promtool check config / check rules / test rules on deploy/prometheus/, and the Grafana
#      dashboard's queries parse as PromQL;
#   2. end to end: a real upstream (python3 -m http.server), the real gateway binary with a
#      temporary config, real requests (valid and wrong keys) with curl over TLS, then
#      `promtool check metrics` on the admin listener's /metrics, then a real Prometheus server
#      that scrapes the gateway every second and must return keygate_requests_total and the
#      auth-failure counter through its HTTP API.
#
# Usage (from anywhere; CI runs it after `cargo test` has built target/debug/keygate):
#   scripts/check-monitoring.sh
#   KEYGATE_BIN=target/release/keygate scripts/check-monitoring.sh
#   CHECK_MONITORING_KEEP=1 scripts/check-monitoring.sh   # keep the temp dir (logs, /metrics)
#
# Installs what it needs when missing, from Debian packages (like scripts/install-test-deps.sh):
# promtool and prometheus (package `prometheus`), python3, curl. Everything listens on free
# loopback ports; every process started here is stopped by PID on exit; every wait is bounded.
set -euo pipefail

# The gateway binary: $KEYGATE_BIN (relative to the caller's directory), else the debug build.
if [ -n "${KEYGATE_BIN:-}" ]; then
    case "$KEYGATE_BIN" in
        /*) bin="$KEYGATE_BIN" ;;
        *) bin="$PWD/$KEYGATE_BIN" ;;
    esac
else
    bin=""
fi
cd "$(dirname "$0")/.."
repo="$PWD"
[ -n "$bin" ] || bin="$repo/target/debug/keygate"

# The caller's KEYGATE_* and CORS_ALLOWED_ORIGINS variables would override the temporary
# config (and KEYGATE_CONFIG pick another file): clear them for everything started here.
while IFS= read -r var; do
    unset "$var"
done < <(compgen -e | grep -E '^(KEYGATE_|CORS_ALLOWED_ORIGINS$)' || true)

log() { printf '== %s\n' "$*"; }
fail() {
    printf 'check-monitoring: FAILED: %s\n' "$*" >&2
    exit 1
}

[ -x "$bin" ] || fail "gateway binary $bin not found (run cargo build, or set KEYGATE_BIN)"

# ---- tools: promtool, prometheus, python3, curl (Debian packages, installed when missing) --------

# PIDs of running processes named prometheus (from /proc: no procps needed).
prometheus_pids() {
    local d
    for d in /proc/[0-9]*; do
        [ "$(cat "$d/comm" 2>/dev/null)" = prometheus ] && echo "${d#/proc/}"
    done
    return 0
}

need=()
{ command -v promtool && command -v prometheus; } >/dev/null 2>&1 || need+=(prometheus)
command -v python3 >/dev/null 2>&1 || need+=(python3)
command -v curl >/dev/null 2>&1 || need+=(curl ca-certificates)
if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]} (the Debian package prometheus includes promtool)"
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    before=" $(prometheus_pids | tr '\n' ' ') "
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    # The package may start a system-wide Prometheus (on :9090); this script never uses it.
    for pid in $(prometheus_pids); do
        case "$before" in
            *" $pid "*) ;;
            *)
                echo "stopping the Prometheus service the package started (pid $pid)"
                $sudo kill "$pid" 2>/dev/null || true
                ;;
        esac
    done
    for tool in promtool prometheus python3 curl; do
        command -v "$tool" >/dev/null 2>&1 || fail "$tool still missing after apt-get install"
    done
fi
promtool --version 2>&1 | head -n 1

# ---- static checks ------------------------------------------------------------------------------

log "promtool check config deploy/prometheus/prometheus.yml"
promtool check config deploy/prometheus/prometheus.yml
log "promtool check rules deploy/prometheus/alerts.yml"
promtool check rules deploy/prometheus/alerts.yml
log "promtool test rules deploy/prometheus/alerts_test.yml"
promtool test rules deploy/prometheus/alerts_test.yml

tmp="$(mktemp -d "${TMPDIR:-/tmp}/keygate-monitoring.XXXXXX")"
pids=()
stop_all() {
    local status=$?
    local pid i
    for pid in "${pids[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        # Bounded: 10 s each (keygate drains, Prometheus writes its head block), then SIGKILL.
        for ((i = 0; i < 100; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [ "$status" -ne 0 ]; then
        local f
        for f in "$tmp"/*.log; do
            [ -f "$f" ] || continue
            echo "---- last lines of $(basename "$f")" >&2
            tail -n 20 "$f" >&2
        done
    fi
    if [ -n "${CHECK_MONITORING_KEEP:-}" ]; then
        echo "kept $tmp (gateway.toml, keygate.log, metrics.txt, prometheus.log)" >&2
    else
        rm -rf "$tmp"
    fi
    exit "$status"
}
trap stop_all EXIT
trap 'exit 130' INT TERM

log "Grafana dashboard: valid JSON, every query parses as PromQL"
python3 - deploy/grafana/keygate.json "$tmp/dashboard-rules.yml" <<'PY'
import json, sys
src, out = sys.argv[1], sys.argv[2]
with open(src) as f:
    dash = json.load(f)
exprs = []
def walk(panels):
    for p in panels:
        walk(p.get("panels", []))
        for t in p.get("targets", []):
            if t.get("expr"):
                exprs.append((p.get("title", "?"), t["expr"]))
walk(dash.get("panels", []))
if not exprs:
    sys.exit("no queries found in the dashboard")
subst = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h",
         "${instance:regex}": ".*", "$instance": ".*", "$job": "keygate"}
with open(out, "w") as f:
    f.write("groups:\n  - name: dashboard\n    rules:\n")
    for i, (title, expr) in enumerate(exprs):
        for k, v in subst.items():
            expr = expr.replace(k, v)
        if "$" in expr:
            sys.exit(f"panel {title!r}: unknown variable in {expr!r}")
        f.write(f"      - record: dashboard:query_{i}\n        expr: {json.dumps(expr)}\n")
print(f"{len(exprs)} queries")
PY
promtool check rules "$tmp/dashboard-rules.yml"

# ---- end to end ---------------------------------------------------------------------------------

# Free loopback ports: bound together so they are distinct, then released.
read -r p_https p_http p_admin p_upstream p_prom < <(python3 - <<'PY'
import socket
socks = []
for _ in range(5):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
)

# Wait (bounded) until a URL answers 2xx; fails early if the process died.
wait_http() {
    local what=$1 url=$2 pid=$3 i
    for ((i = 0; i < 150; i++)); do
        kill -0 "$pid" 2>/dev/null || fail "$what exited during start-up"
        curl -fsS --noproxy '*' -o /dev/null --max-time 1 "$url" 2>/dev/null && return 0
        sleep 0.2
    done
    fail "$what did not answer $url within 30 s"
}

log "upstream: python3 -m http.server on 127.0.0.1:$p_upstream"
mkdir -p "$tmp/www"
echo "hello from the upstream" >"$tmp/www/index.html"
python3 -m http.server "$p_upstream" --bind 127.0.0.1 --directory "$tmp/www" >"$tmp/upstream.log" 2>&1 &
pids+=($!)
wait_http upstream "http://127.0.0.1:$p_upstream/" "${pids[-1]}"

log "gateway: $bin (https :$p_https, http :$p_http, admin :$p_admin)"
cat >"$tmp/gateway.toml" <<EOF
[server]
https_listen = "127.0.0.1:$p_https"
http_listen = "127.0.0.1:$p_http"
admin_listen = "127.0.0.1:$p_admin"
public_host = "localhost"
shutdown_grace = "5s"

[tls]
cert = "$tmp/certs/dev-cert.pem"
key = "$tmp/certs/dev-key.pem"
generate_dev_cert = true

[upstream]
url = "http://127.0.0.1:$p_upstream"

[store]
backend = "sqlite"
path = "$tmp/keygate.db"
poll_interval = "100ms"

[logging]
format = "json"
level = "info"
EOF
kg() { "$bin" --config "$tmp/gateway.toml" "$@"; }
kg check-config >/dev/null 2>>"$tmp/cli.log" || fail "keygate check-config rejected the temporary config"
# Started directly (not through the kg function, which would run in a subshell): $! is the
# gateway's own PID, so the EXIT trap stops the gateway itself.
"$bin" --config "$tmp/gateway.toml" serve >"$tmp/keygate.log" 2>&1 &
gateway_pid=$!
pids+=("$gateway_pid")
wait_http gateway "http://127.0.0.1:$p_admin/readyz" "$gateway_pid"

key="$(kg keys create --name monitoring-check 2>>"$tmp/cli.log")"
# A well-formed key (valid checksum) that is not in the store: created, then deleted.
# Presenting it is an "unknown" authentication failure, not a "malformed" one.
wrong_key="$(kg keys create --name monitoring-deleted 2>>"$tmp/cli.log")"
kg keys delete monitoring-deleted >/dev/null 2>>"$tmp/cli.log"
[ -n "$key" ] && [ -n "$wrong_key" ] || fail "keygate keys create printed no key"

base="https://localhost:$p_https"
gw_curl() {
    curl -sS --noproxy '*' --max-time 10 --cacert "$tmp/certs/dev-cert.pem" \
        --resolve "localhost:$p_https:127.0.0.1" -o /dev/null -w '%{http_code}' "$@"
}
expect() {
    local want=$1 got
    shift
    got="$(gw_curl "$@")" || fail "curl $* failed"
    [ "$got" = "$want" ] || fail "expected $want, got $got for: curl $*"
}

good=4
bad=5
log "requests: $good with a valid key, $bad with a wrong (deleted) key, 1 without a key, 1 malformed"
for ((i = 0; i < good - 1; i++)); do
    expect 200 -H "X-API-Key: $key" "$base/"
done
expect 200 -H "Authorization: Bearer $key" "$base/index.html"
for ((i = 0; i < bad; i++)); do
    expect 401 -H "X-API-Key: $wrong_key" "$base/"
done
expect 401 "$base/"
expect 401 -H "X-API-Key: sk_not-a-real-key" "$base/"
expect 200 "$base/health/api-auth/"

metrics="$(curl -fsS --noproxy '*' --max-time 5 "http://127.0.0.1:$p_admin/metrics")" \
    || fail "GET /metrics on the admin listener failed"
printf '%s\n' "$metrics" >"$tmp/metrics.txt"
unknown_now="$(awk '$1 == "keygate_auth_decisions_total{reason=\"unknown\"}" { print $2 }' "$tmp/metrics.txt")"
[ "${unknown_now:-0}" = "$bad" ] \
    || fail "/metrics has keygate_auth_decisions_total{reason=\"unknown\"} ${unknown_now:-missing}, expected $bad"

# The served certificate's expiry (notAfter). The generated development certificate is valid for
# a long time, so a value in the past is a bug; 0 means the gauge was never set.
expiry="$(awk '$1 == "keygate_tls_certificate_expiry_timestamp_seconds" { print $2 }' "$tmp/metrics.txt")"
if [ -z "$expiry" ]; then
    fail "/metrics has no keygate_tls_certificate_expiry_timestamp_seconds"
elif python3 -c 'import sys; sys.exit(0 if float(sys.argv[1]) == 0 else 1)' "$expiry"; then
    fail "keygate_tls_certificate_expiry_timestamp_seconds is 0 (never set)"
else
    days="$(python3 -c 'import sys, time; print(int((float(sys.argv[1]) - time.time()) // 86400))' "$expiry")"
    [ "$days" -ge 0 ] || fail "keygate_tls_certificate_expiry_timestamp_seconds ($expiry) is in the past"
    echo "served certificate expires in $days days"
fi

log "promtool check metrics (admin listener /metrics)"
# Lint findings (missing HELP, names without a unit...) make promtool exit non-zero: shown, fatal.
if ! promtool check metrics <"$tmp/metrics.txt"; then
    fail "promtool check metrics reported problems in keygate's /metrics"
fi

# The key itself must appear in no log line and no metric (only its id and name may).
for f in "$tmp/keygate.log" "$tmp/metrics.txt"; do
    if grep -qF -e "$key" -e "$wrong_key" "$f"; then
        fail "an API key appears in $(basename "$f")"
    fi
done

log "prometheus: 127.0.0.1:$p_prom, scraping 127.0.0.1:$p_admin every 1s, with alerts.yml loaded"
cat >"$tmp/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - $repo/deploy/prometheus/alerts.yml
scrape_configs:
  - job_name: keygate
    metrics_path: /metrics
    static_configs:
      - targets: ["127.0.0.1:$p_admin"]
EOF
prometheus --config.file="$tmp/prometheus.yml" --storage.tsdb.path="$tmp/tsdb" \
    --web.listen-address="127.0.0.1:$p_prom" >"$tmp/prometheus.log" 2>&1 &
prom_pid=$!
pids+=("$prom_pid")
prom="http://127.0.0.1:$p_prom"
wait_http prometheus "$prom/-/ready" "$prom_pid"

# Instant query through the HTTP API; prints the number of series and the first value ("-" if none).
query() {
    curl -fsS --noproxy '*' --max-time 5 "$prom/api/v1/query" --data-urlencode "query=$1" \
        | python3 -c '
import json, sys
r = json.load(sys.stdin)
if r.get("status") != "success":
    sys.exit("query failed: %s" % r)
res = r["data"]["result"]
print(len(res), res[0]["value"][1] if res else "-")'
}

log "waiting (at most 30 s) for Prometheus to have scraped the gateway"
ok=""
for ((i = 0; i < 60; i++)); do
    kill -0 "$prom_pid" 2>/dev/null || fail "prometheus exited"
    read -r n_series _ < <(query 'keygate_requests_total' || echo "0 -")
    read -r _ unknown < <(query 'sum(keygate_auth_decisions_total{reason="unknown"})' || echo "0 -")
    if [ "${n_series:-0}" -gt 0 ] && [ "$unknown" != "-" ] \
        && python3 -c 'import sys; sys.exit(0 if float(sys.argv[1]) >= float(sys.argv[2]) else 1)' "$unknown" "$bad"; then
        ok=1
        break
    fi
    sleep 0.5
done
[ -n "$ok" ] || fail "Prometheus did not return keygate_requests_total series and sum(keygate_auth_decisions_total{reason=\"unknown\"}) >= $bad within 30 s (last: ${n_series:-0} series, unknown=${unknown:-none})"
echo "keygate_requests_total: $n_series series; sum(keygate_auth_decisions_total{reason=\"unknown\"}) = $unknown (sent $bad)"

read -r _ up < <(query 'up{job="keygate"}')
[ "$up" = "1" ] || fail "up{job=\"keygate\"} is $up, expected 1"
rules="$(curl -fsS --noproxy '*' --max-time 5 "$prom/api/v1/rules" | python3 -c '
import json, sys
r = json.load(sys.stdin)
print(sum(len(g["rules"]) for g in r["data"]["groups"] if g["name"] == "keygate"))')"
[ "$rules" -ge 9 ] || fail "Prometheus loaded $rules rules of group keygate, expected at least 9"
echo "up{job=\"keygate\"} = 1; $rules alerting rules of group keygate loaded"

log "check-monitoring: OK"
