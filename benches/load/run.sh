#!/usr/bin/env bash
# Load benchmark: keygate against nginx doing the same key check, and against the upstream
# directly, over plain HTTP/1.1 keep-alive and over TLS, in one run, alternating, several rounds.
# See docs/benchmarks.md for what is measured and how to read it.
#
#   benches/load/run.sh                      # defaults below
#   ROUNDS=5 DURATION=15 benches/load/run.sh
#
# Environment: ROUNDS (3), DURATION seconds per wrk run (10), CONNECTIONS (50), THREADS (wrk, 2),
# KEYS in the stores (1000), LARGE_KEYS for a second keygate with a larger store (100000; 0: skip),
# TARGETS (all; e.g. "keygate nginx" to skip the rest), PROTOCOLS ("http tls"),
# KEYGATE_BIN (a keygate binary to measure instead of building this tree's),
# BASE_BIN (another keygate build, e.g. an older commit, measured in the same run as target "base"
# with the same 1,000-key store, so a change is judged by the ratio keygate/base),
# PROFILE (http or tls: instead of measuring, record keygate with `perf record -g` under that load
# and print the hottest functions; installs linux-perf when missing).
#
# Everything listens on 127.0.0.1 and every process started here is stopped by PID on exit.
set -euo pipefail

ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-50}
THREADS=${THREADS:-2}
KEYS=${KEYS:-1000}
LARGE_KEYS=${LARGE_KEYS:-100000}
PROTOCOLS=${PROTOCOLS:-"http tls"}
ORIGIN="https://app.example.com"

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)

# shellcheck source=benches/load/common.sh
. "$here/common.sh"
install_missing nginx:nginx wrk:wrk
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

if [ -n "${KEYGATE_BIN:-}" ]; then
    KEYGATE=$KEYGATE_BIN # another build, e.g. an older commit, to compare in the same setup
else
    echo "building keygate (release)" >&2
    (cd "$root" && cargo build --release --quiet --bin keygate)
    KEYGATE="$root/target/release/keygate"
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/keygate-load.XXXXXX")
mkdir -p "$work/tmp"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Ports: bound together by the kernel, then released for the servers to take.
read -r UP_HTTP UP_TLS NG_HTTP NG_TLS KG_HTTP KG_TLS KG_ADMIN KL_HTTP KL_TLS KL_ADMIN \
    KB_HTTP KB_TLS KB_ADMIN < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(13)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])')

CERT="$work/cert.pem"
KEY="$work/key.pem"
user_line=""
[ "$(id -u)" -eq 0 ] && user_line="user root;"

render() { # template output NAME
    sed -e "s|@WORK@|$work|g" -e "s|@CERT@|$CERT|g" -e "s|@KEY@|$KEY|g" -e "s|@USER@|$user_line|g" \
        -e "s|@UP_HTTP@|$UP_HTTP|g" -e "s|@UP_TLS@|$UP_TLS|g" -e "s|@NG_HTTP@|$NG_HTTP|g" \
        -e "s|@NG_TLS@|$NG_TLS|g" -e "s|@MAP@|$work/small.nginx.map|g" -e "s|@NAME@|$3|g" \
        -e "s|@KG_HTTP@|$4|g" -e "s|@KG_TLS@|$5|g" -e "s|@KG_ADMIN@|$6|g" "$here/$1" >"$work/$2"
}


echo "generating $KEYS keys${LARGE_KEYS:+ and $LARGE_KEYS keys}" >&2
python3 "$here/keys.py" "$KEYS" "$work/small"
[ "$LARGE_KEYS" -gt 0 ] && python3 "$here/keys.py" "$LARGE_KEYS" "$work/large"

start_keygate() { # name http tls admin [binary]
    local bin=${5:-$KEYGATE} keys=small
    [ "$1" = large ] && keys=large
    render keygate.toml.in "$1.toml" "$1" "$2" "$3" "$4"
    "$bin" --config "$work/$1.toml" keys import "$work/$keys.export.json" >/dev/null
    "$bin" --config "$work/$1.toml" serve >"$work/$1.log" 2>&1 &
    pids+=($!)
    eval "${1}_pid=$!"
    wait_port "$2"
}

start_keygate small "$KG_HTTP" "$KG_TLS" "$KG_ADMIN"
[ "$LARGE_KEYS" -gt 0 ] && start_keygate large "$KL_HTTP" "$KL_TLS" "$KL_ADMIN"
[ -n "${BASE_BIN:-}" ] && start_keygate base "$KB_HTTP" "$KB_TLS" "$KB_ADMIN" "$BASE_BIN"
small_idle_kib=$(awk '/VmRSS/ {print $2}' "/proc/$small_pid/status")

render upstream.conf.in upstream.conf x 0 0 0
render nginx-gateway.conf.in nginx.conf x 0 0 0
"$NGINX" -p "$work" -c "$work/upstream.conf" -g 'daemon off;' 2>>"$work/upstream-error.log" &
pids+=($!)
upstream_pid=$!
"$NGINX" -p "$work" -c "$work/nginx.conf" -g 'daemon off;' 2>>"$work/nginx-error.log" &
pids+=($!)
nginx_pid=$!
wait_port "$UP_HTTP"
wait_port "$NG_HTTP"

url() { # target protocol
    local port
    case "$1-$2" in
        direct-http) port=$UP_HTTP ;; direct-tls) port=$UP_TLS ;;
        nginx-http) port=$NG_HTTP ;; nginx-tls) port=$NG_TLS ;;
        keygate-http) port=$KG_HTTP ;; keygate-tls) port=$KG_TLS ;;
        keygate100k-http) port=$KL_HTTP ;; keygate100k-tls) port=$KL_TLS ;;
        base-http) port=$KB_HTTP ;; base-tls) port=$KB_TLS ;;
    esac
    if [ "$2" = tls ]; then echo "https://localhost:$port"; else echo "http://127.0.0.1:$port"; fi
}
pid_of() { # target -> the process whose CPU time is that target's (nginx: master and workers)
    case "$1" in
        direct) echo "$upstream_pid" ;; nginx) echo "$nginx_pid" ;; keygate) echo "$small_pid" ;;
        keygate100k) echo "$large_pid" ;; base) echo "$base_pid" ;;
    esac
}
cpu_ticks() { # pid -> user+system clock ticks of it and its children so far
    local total=0 p
    for p in "$1" $(cat "/proc/$1/task/"*/children 2>/dev/null); do
        total=$((total + $(awk '{print $14 + $15}' "/proc/$p/stat")))
    done
    echo "$total"
}
keys_for() { if [ "$1" = keygate100k ]; then echo "$work/large.keys"; else echo "$work/small.keys"; fi; }

run_wrk() { # target protocol seconds -> "rps p50 p99 bad cpu_us_per_request"
    local out before after pid
    pid=$(pid_of "$1")
    before=$(cpu_ticks "$pid")
    out=$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"${3}s" --timeout 5s -s "$here/keys.lua" \
        "$(url "$1" "$2")" -- "$(keys_for "$1")" "$ORIGIN" 2>&1)
    after=$(cpu_ticks "$pid")
    echo "$out" | sed -n 's/^RESULT rps=\([0-9.]*\) p50_us=\([0-9]*\) p99_us=\([0-9]*\) bad=\([0-9]*\) requests=\([0-9]*\)/\1 \2 \3 \4 \5/p' |
        awk -v t="$((after - before))" -v hz="$(getconf CLK_TCK)" \
            '{ printf "%s %s %s %s %.1f\n", $1, $2, $3, $4, ($5 > 0 ? t * 1e6 / hz / $5 : 0) }'
}

# Every gateway must answer a key from its store with 200 (and an unknown key with 401) before
# anything is timed: a gateway that refuses quickly would otherwise look fast.
status_of() { # url key -> HTTP status of a POST with that key
    python3 - "$1" "$2" <<'PY'
import ssl, sys, urllib.error, urllib.request
ctx = ssl.create_default_context()
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
req = urllib.request.Request(sys.argv[1], data=b"{}", headers={"X-API-Key": sys.argv[2]})
try:
    print(urllib.request.urlopen(req, context=ctx).status)
except urllib.error.HTTPError as e:
    print(e.code)
PY
}
check_answers() { # target
    local key code
    key=$(head -1 "$(keys_for "$1")")
    for proto in $PROTOCOLS; do
        code=$(status_of "$(url "$1" "$proto")/api/v1/video/process/" "$key")
        [ "$code" = 200 ] || { echo "$1 over $proto answered $code to a valid key" >&2; exit 1; }
        [ "$1" = direct ] && continue
        code=$(status_of "$(url "$1" "$proto")/api/v1/video/process/" "sk_$(printf '0%.0s' $(seq 46))")
        [ "$code" = 401 ] || { echo "$1 over $proto answered $code to an unknown key" >&2; exit 1; }
    done
}

# In this order, each target a ratio compares keygate with (nginx, the larger store) runs next to it.
targets=(direct nginx keygate)
[ "$LARGE_KEYS" -gt 0 ] && targets+=(keygate100k)
[ -n "${BASE_BIN:-}" ] && targets+=(base)
[ -n "${TARGETS:-}" ] && read -r -a targets <<<"$TARGETS"
for t in "${targets[@]}"; do check_answers "$t"; done

metric() { # admin-port metric-name -> the sum of that metric's series
    python3 - "http://127.0.0.1:$1/metrics" "$2" <<'PY'
import sys, urllib.request
text = urllib.request.urlopen(sys.argv[1]).read().decode()
print(int(sum(float(l.split()[-1]) for l in text.splitlines() if l.split("{")[0].split()[0:1] == [sys.argv[2]])))
PY
}
lookups() { metric "$1" keygate_cache_misses_total; } # store lookups so far
lapses() { metric "$1" keygate_change_feed_lapses_total; } # change feed lapses so far
cache_entries() { metric "$1" keygate_cache_entries; } # keys in keygate's cache


echo "warming up (caches, upstream pools)" >&2
for t in "${targets[@]}"; do
    for p in $PROTOCOLS; do run_wrk "$t" "$p" 3 >/dev/null; done
done
# The large store is measured warm, as in steady state: every key cached (at most 2 min), and in
# the workers' copies.
if [[ " ${targets[*]} " == *" keygate100k "* ]]; then
    for _ in $(seq 1 40); do
        [ "$(cache_entries "$KL_ADMIN")" -ge "$LARGE_KEYS" ] && break
        run_wrk keygate100k http 3 >/dev/null
    done
    # A key read from the store enters a worker's own copy at that worker's next request for it.
    for _ in 1 2 3; do run_wrk keygate100k http 3 >/dev/null; done
fi
small_lookups_before=$(lookups "$KG_ADMIN")
large_lookups_before=0
[ "$LARGE_KEYS" -gt 0 ] && large_lookups_before=$(lookups "$KL_ADMIN")
small_lapses_before=$(lapses "$KG_ADMIN")
large_lapses_before=0
[ "$LARGE_KEYS" -gt 0 ] && large_lapses_before=$(lapses "$KL_ADMIN")

if [ -n "${PROFILE:-}" ]; then
    command -v perf >/dev/null || { [ "$(id -u)" -eq 0 ] && apt-get install -y -qq linux-perf >/dev/null 2>&1; } || true
    run_wrk keygate "$PROFILE" "$((DURATION + 2))" >/dev/null &
    wrk_pid=$!
    sleep 1
    perf record -F 1999 -g --call-graph dwarf,16384 -o "$work/perf.data" -p "$small_pid" -- sleep "$DURATION" 2>/dev/null >/dev/null
    wait "$wrk_pid"
    perf report -i "$work/perf.data" --no-children --percent-limit 0.7 --stdio -g none 2>/dev/null | grep -v '^$' | head -60
    out="$root/target/perf-$PROFILE.data"
    cp "$work/perf.data" "$out" && echo "perf data kept in $out" >&2
    exit 0
fi

results="$work/results"
: >"$results"
echo "measuring: $ROUNDS rounds x ${#targets[@]} targets x ($PROTOCOLS), ${DURATION}s each, wrk -t$THREADS -c$CONNECTIONS" >&2
for round in $(seq 1 "$ROUNDS"); do
    order=("${targets[@]}")
    # Alternate the order so no target always runs first (or last) in a round.
    if [ $((round % 2)) -eq 0 ]; then
        order=()
        for ((i = ${#targets[@]} - 1; i >= 0; i--)); do order+=("${targets[i]}"); done
    fi
    # One protocol at a time, so the targets a ratio compares run back to back.
    for p in $PROTOCOLS; do
        for t in "${order[@]}"; do
            read -r rps p50 p99 bad cpu < <(run_wrk "$t" "$p" "$DURATION")
            echo "$round $t $p $rps $p50 $p99 $bad $cpu" >>"$results"
            printf '  round %d  %-12s %-4s %10.0f req/s  p50 %6d us  p99 %6d us  cpu %5.1f us/req  errors %s\n' \
                "$round" "$t" "$p" "$rps" "$p50" "$p99" "$cpu" "$bad" >&2
        done
    done
done

hwm() { awk '/VmHWM/ {print $2}' "/proc/$1/status"; }
tree_hwm() { # pid and its children, KiB
    local total
    total=$(hwm "$1")
    for c in $(cat "/proc/$1/task/"*/children 2>/dev/null); do total=$((total + $(hwm "$c"))); done
    echo "$total"
}
small_lookups=$(( $(lookups "$KG_ADMIN") - small_lookups_before ))
large_lookups=0
[ "$LARGE_KEYS" -gt 0 ] && large_lookups=$(( $(lookups "$KL_ADMIN") - large_lookups_before ))
small_lapses=$(( $(lapses "$KG_ADMIN") - small_lapses_before ))
large_lapses=0
[ "$LARGE_KEYS" -gt 0 ] && large_lapses=$(( $(lapses "$KL_ADMIN") - large_lapses_before ))

python3 - "$results" "$small_idle_kib" "$(hwm "$small_pid")" "$(tree_hwm "$nginx_pid")" \
    "$small_lookups" "$large_lookups" "$( [ "$LARGE_KEYS" -gt 0 ] && hwm "$large_pid" || echo 0)" <<'PY'
import statistics, sys
from collections import defaultdict
path, idle, kg_hwm, ng_hwm, small_lookups, large_lookups, large_hwm = sys.argv[1:]
runs = defaultdict(list)
for line in open(path):
    r, t, p, rps, p50, p99, bad, cpu = line.split()
    runs[(t, p)].append((float(rps), int(p50), int(p99), int(bad), float(cpu)))
med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v),
           statistics.median(x[2] for x in v), sum(x[3] for x in v),
           statistics.median(x[4] for x in v)) for k, v in runs.items()}
protos = sorted({p for _, p in med}, key=lambda p: p != "http")
print("\nmedians over rounds:")
print(f"{'target':<12} {'proto':<5} {'req/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'cpu us/req':>11} {'errors':>7}")
for (t, p), (rps, p50, p99, bad, cpu) in sorted(med.items(), key=lambda kv: (protos.index(kv[0][1]), kv[0][0])):
    print(f"{t:<12} {p:<5} {rps:>10.0f} {p50/1000:>8.2f} {p99/1000:>8.2f} {cpu:>11.1f} {bad:>7}")
print("\nratios (medians):")
for p in protos:
    k, n, d, l = med.get(("keygate", p)), med.get(("nginx", p)), med.get(("direct", p)), med.get(("keygate100k", p))
    b = med.get(("base", p))
    parts = []
    if k and n: parts.append(f"keygate/nginx req/s {k[0]/n[0]:.2f}  p99 {k[2]/n[2]:.2f}  cpu/req {k[4]/n[4]:.2f}")
    if k and b: parts.append(f"keygate/base req/s {k[0]/b[0]:.2f}  p99 {k[2]/b[2]:.2f}  cpu/req {k[4]/b[4]:.2f}")
    if k and d: parts.append(f"keygate/direct {k[0]/d[0]:.2f}")
    if n and d: parts.append(f"nginx/direct {n[0]/d[0]:.2f}")
    if k and l: parts.append(f"100k-keys/1k-keys {l[0]/k[0]:.3f}")
    print(f"  {p:<5} " + "   ".join(parts))
# Each round's ratio pairs two targets measured minutes apart on the same machine: their spread
# shows how much of a median's distance from 1.0 this machine's noise can explain.
by_round = {(r, t, p): float(rps) for r, t, p, rps, *_ in (l.split() for l in open(path))}
rounds = sorted({r for r, _, _ in by_round}, key=int)
print("\nper-round req/s ratios (min / median / max, rounds at or above 1.0):")
for num, den in (("keygate", "nginx"), ("keygate", "base"), ("keygate100k", "keygate")):
    for p in protos:
        rs = [by_round[(r, num, p)] / by_round[(r, den, p)] for r in rounds
              if (r, num, p) in by_round and (r, den, p) in by_round and by_round[(r, den, p)] > 0]
        if rs:
            print(f"  {num}/{den} {p:<5} {min(rs):.2f} / {statistics.median(rs):.2f} / {max(rs):.2f}"
                  f"   {sum(x >= 1.0 for x in rs)} of {len(rs)}")
total = sum(x[0] for (t, _), v in runs.items() if t == "keygate" for x in v)
print("\nmemory: keygate idle RSS %.1f MiB, keygate peak RSS %.1f MiB, nginx peak RSS (master+workers) %.1f MiB"
      % (int(idle)/1024, int(kg_hwm)/1024, int(ng_hwm)/1024))
if int(large_hwm):
    print("        keygate with the large store: peak RSS %.1f MiB" % (int(large_hwm)/1024))
print(f"store lookups while measuring: keygate {small_lookups}, keygate100k {large_lookups}")
bad = sum(v[3] for v in med.values())
if bad:
    print(f"WARNING: {bad} errors or non-2xx responses: the affected figures are void")
PY
echo "change feed lapses while measuring: keygate $small_lapses, keygate100k $large_lapses"
