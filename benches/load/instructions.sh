#!/usr/bin/env bash
# Whole-request cost in instructions: each keygate binary given is run under callgrind behind the
# load benchmark's upstream, warmed up, then driven by wrk for SECONDS; the user-space
# instructions it executed in that window, divided by the requests wrk completed, is printed.
# Unlike req/s on a shared machine, the figure moves by about 2% between runs, so two builds can be
# compared one after the other. See docs/benchmarks.md.
#
#   benches/load/instructions.sh target/release/keygate /path/to/older/keygate
#   benches/load/instructions.sh target/release/keygate nginx
#
# The word `nginx` in place of a binary measures the load benchmark's nginx peer (the same key
# check, headers, access log and upstream keep-alive; one worker process, no master) the same way.
#
# Environment: PROTOCOL (http or tls; default http), SECONDS_MEASURED (10), KEEP (a directory: the
# callgrind profiles are copied there, for callgrind_annotate), SIMULATE=1 (callgrind also
# simulates the caches and branch predictors, and prints per request the instruction-cache misses
# (I1), data-cache misses (D1), last-level misses (LL) and mispredicted branches: what instruction
# counts leave out. Slower; the simulated caches are the host's sizes, the figures a model's).
# Everything listens on 127.0.0.1; every process started here is stopped by PID on exit.
set -euo pipefail

[ $# -gt 0 ] || { echo "usage: $0 KEYGATE_BINARY..." >&2; exit 2; }
PROTOCOL=${PROTOCOL:-http}
SECONDS_MEASURED=${SECONDS_MEASURED:-10}
ORIGIN="https://app.example.com"
SIM_OPTS=()
[ "${SIMULATE:-0}" = 1 ] && SIM_OPTS=(--cache-sim=yes --branch-sim=yes)
here=$(cd "$(dirname "$0")" && pwd)

# shellcheck source=benches/load/common.sh
. "$here/common.sh"
install_missing nginx:nginx wrk:wrk valgrind:valgrind openssl:openssl
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

work=$(mktemp -d "${TMPDIR:-/tmp}/keygate-instructions.XXXXXX")
mkdir -p "$work/tmp"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    [ -n "${KEEP_WORK:-}" ] && cp -r "$work" "$KEEP_WORK"
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# SINK: the upstream's upload relay target; nothing listens there, as no upload is made here.
read -r UP_HTTP UP_TLS KG_HTTP KG_TLS KG_ADMIN NG_HTTP NG_TLS SINK < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(8)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])')
user_line=""
[ "$(id -u)" -eq 0 ] && user_line="user root;"

render() { # template output
    sed -e "s|@WORK@|$work|g" -e "s|@CERT@|$work/cert.pem|g" -e "s|@KEY@|$work/key.pem|g" \
        -e "s|@USER@|$user_line|g" -e "s|@UP_HTTP@|$UP_HTTP|g" -e "s|@UP_TLS@|$UP_TLS|g" \
        -e "s|@NAME@|keygate|g" -e "s|@KG_HTTP@|$KG_HTTP|g" -e "s|@KG_TLS@|$KG_TLS|g" \
        -e "s|@KG_ADMIN@|$KG_ADMIN|g" -e "s|@NG_HTTP@|$NG_HTTP|g" -e "s|@NG_TLS@|$NG_TLS|g" \
        -e "s|@MAP@|$work/small.nginx.map|g" -e "s|@SINK@|$SINK|g" "$here/$1" >"$work/$2"
}

python3 "$here/keys.py" 1000 "$work/small" >/dev/null
render keygate.toml.in keygate.toml
render upstream.conf.in upstream.conf
sed -i '/ssl/d' "$work/upstream.conf" # keygate reaches its upstream over HTTP only
"$NGINX" -p "$work" -c "$work/upstream.conf" -g 'daemon off;' 2>>"$work/upstream-error.log" &
pids+=($!)
wait_port "$UP_HTTP"

for bin in "$@"; do
    if [ "$bin" = nginx ]; then
        if [ ! -f "$work/cert.pem" ]; then
            openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
                -subj /CN=localhost -keyout "$work/key.pem" -out "$work/cert.pem" 2>/dev/null
        fi
        render nginx-gateway.conf.in nginx.conf
        sed -i 's/^worker_processes .*/worker_processes 1; master_process off;/' "$work/nginx.conf"
        valgrind --tool=callgrind --callgrind-out-file="$work/cg.%p" "${SIM_OPTS[@]}" \
            "$NGINX" -p "$work" -c "$work/nginx.conf" -g 'daemon off;' >"$work/nginx.log" 2>&1 &
        port_http=$NG_HTTP port_tls=$NG_TLS startup=600 # its big key map takes minutes here
    else
        rm -f "$work"/keygate.db*
        "$bin" --config "$work/keygate.toml" keys import "$work/small.export.json" >/dev/null
        # No usage flush inside the window: it writes one row per key used (every 5 s by
        # default), which at valgrind's few thousand requests a second would be counted against
        # each request about forty times over.
        KEYGATE_STORE_USAGE_FLUSH_INTERVAL=1h valgrind --tool=callgrind \
            --callgrind-out-file="$work/cg.%p" "${SIM_OPTS[@]}" \
            "$bin" --config "$work/keygate.toml" serve >"$work/keygate.log" 2>&1 &
        port_http=$KG_HTTP port_tls=$KG_TLS startup=60 # valgrind starts slowly
    fi
    vg=$!
    pids+=("$vg")
    wait_port "$port_http" "$startup"
    if [ "$PROTOCOL" = tls ]; then url="https://localhost:$port_tls"; else url="http://127.0.0.1:$port_http"; fi
    # Warm up: every key cached, the upstream pools open.
    wrk -t1 -c8 -d8s -s "$here/keys.lua" "$url" -- "$work/small.keys" "$ORIGIN" >/dev/null 2>&1
    callgrind_control --zero "$vg" >/dev/null 2>&1
    result=$(wrk -t1 -c8 -d"${SECONDS_MEASURED}s" -s "$here/keys.lua" "$url" -- \
        "$work/small.keys" "$ORIGIN" 2>&1 | grep '^RESULT')
    callgrind_control --dump "$vg" >/dev/null 2>&1
    sleep 1
    requests=${result##*requests=}
    bad=${result##*bad=}
    bad=${bad%% *}
    instructions=$(grep -h '^summary:\|^totals:' "$work/cg.$vg".* | awk '{print $2}' | sort -n | tail -1)
    printf '%s (%s): %d requests, %d instructions per request%s\n' "$bin" "$PROTOCOL" "$requests" \
        "$((instructions / requests))" "$([ "$bad" -gt 0 ] && echo ", $bad errors: void")"
    if [ ${#SIM_OPTS[@]} -gt 0 ]; then
        # The events line names the columns of the totals line, in the profile's order.
        python3 - "$requests" "$work/cg.$vg".* <<'PY'
import sys
requests, files = int(sys.argv[1]), sys.argv[2:]
best = None
for f in files:
    events = totals = None
    for line in open(f, errors="replace"):
        if line.startswith("events:"):
            events = line.split()[1:]
        elif line.startswith(("summary:", "totals:")):
            totals = [int(x) for x in line.split()[1:]]
    if events and totals and (best is None or totals[0] > best[1][0]):
        best = (events, totals)
e = dict(zip(*best))
per = lambda *names: sum(e.get(n, 0) for n in names) / requests
print("  per request: I1 misses %.0f, D1 misses %.0f, LL misses %.0f, branches mispredicted %.0f of %.0f"
      % (per("I1mr"), per("D1mr", "D1mw"), per("ILmr", "DLmr", "DLmw"), per("Bcm", "Bim"), per("Bc", "Bi")))
PY
    fi
    [ -n "${KEEP:-}" ] && mkdir -p "$KEEP" && cp "$work/cg.$vg".* "$KEEP/"
    kill "$vg"
    wait "$vg" 2>/dev/null || true
    rm -f "$work/cg.$vg"*
done
