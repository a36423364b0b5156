#!/usr/bin/env bash
# Load benchmark: keygate against nginx and HAProxy doing the same key check, and against the
# upstream directly, on the traffic a gateway gets, in one run, alternating, several rounds:
#
#   keepalive   HTTP/1.1 keep-alive from wrk, plain HTTP and TLS
#   latency     HTTP/1.1 keep-alive at one fixed request rate for every target (h2load), plain
#               HTTP and TLS: latency compared at equal load
#   h2          HTTP/2 over TLS from h2load, many streams on each connection (browsers)
#   handshakes  a new TLS connection for every request, TLS 1.3 and 1.2, session resumption off
#               and on (new visitors; examples/handshakes.rs)
#   uploads     16 MiB bodies streamed through to an upstream that reads them all (curl)
#
# Every target reports its rate, p50/p99, CPU time per request (or per MiB) and peak RSS during
# the run; the summary gives keygate's ratios to nginx, to HAProxy and to the better of the two.
# See docs/benchmarks.md for what is measured and how to read it.
#
#   benches/load/run.sh                                  # every workload, about 25 minutes here
#   WORKLOADS="h2 handshakes" ROUNDS=5 benches/load/run.sh
#
# Environment [default]:
#   WORKLOADS          workloads to run, in this order ["keepalive latency h2 handshakes uploads"]
#   ROUNDS             rounds; each runs every selected workload on every target once [3]
#   DURATION           seconds of each keepalive, latency, h2 and uploads run [10]
#   TARGETS            targets to measure, from: direct nginx keygate haproxy keygate100k base
#                      [all that are set up]; each workload skips those it does not apply to
#   KEYS               keys in every gateway's store [1000]
#   LARGE_KEYS         keys of keygate100k, a second keygate with a larger store, measured in
#                      keepalive only [100000; 0: no keygate100k]
#   KEYGATE_BIN        a keygate binary to measure instead of building this tree's
#   BASE_BIN           another keygate build (e.g. an older commit), measured in every workload
#                      as target "base" with the same 1,000-key store, so a change is judged by
#                      the ratio keygate/base
#   PROFILE            instead of measuring, record keygate with `perf record -g` under one load
#                      and print the hottest functions (installs linux-perf when missing): http or
#                      tls (keepalive), h2, handshakes (the first HANDSHAKE_MODES entry), uploads
#                      (the first UPLOAD_PROTOCOLS entry)
# keepalive (wrk, benches/load/keys.lua: every request with the next key of the store):
#   PROTOCOLS          ["http tls"]
#   CONNECTIONS        wrk connections [50]
#   THREADS            wrk threads [2]
# latency (h2load --h1 at a fixed rate, the same POST with one key per run, as in h2; the clients
# start 1 ms apart, so their request timers do not all fire at once):
#   LATENCY_PROTOCOLS  ["http tls"]
#   LATENCY_RATE       requests per second offered to every target, split evenly over the
#                      clients; below every target's capacity [20000]
#   LATENCY_CLIENTS    connections [50]
# h2 (h2load over TLS, ALPN h2; one key for a whole run: the round's, the same for every target):
#   H2_CLIENTS         connections [20]
#   H2_STREAMS         concurrent streams on each connection [10]
#   H2_THREADS         h2load threads [1]
# handshakes (examples/handshakes.rs: one POST per connection, with `Connection: close`):
#   HANDSHAKE_MODES    TLS version and resumption of each run, from: 1.3-new 1.3-resumed 1.2-new
#                      1.2-resumed [all four]; "new": the client never offers a session, so every
#                      handshake is a full one; "resumed": each client offers the session its
#                      previous connection ended with
#   HANDSHAKE_CLIENTS  concurrent connections [16]
#   HANDSHAKE_DURATION seconds of each run [5]
# uploads (curl, `Expect:` off; the upstream relays them to benches/load/sink.py, which reads
# every byte before it answers; one key for a whole run, as in h2):
#   UPLOAD_PROTOCOLS   from: tls (HTTP/1.1 over TLS), h2 (HTTP/2 over TLS), http ["tls h2"]
#   UPLOAD_CLIENTS     uploading connections in parallel [3]
#   UPLOAD_IN_A_ROW    uploads on each connection before it is closed and another opened [5]
#   UPLOAD_MIB         size of each body in MiB [16]
#
# Everything listens on 127.0.0.1, ports are bound by the kernel, and every process started here
# is stopped by PID on exit. Missing tools are installed from Debian (nginx, haproxy, wrk,
# nghttp2-client for h2load, curl).
set -euo pipefail

WORKLOADS=${WORKLOADS:-"keepalive latency h2 handshakes uploads"}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
KEYS=${KEYS:-1000}
LARGE_KEYS=${LARGE_KEYS:-100000}
PROTOCOLS=${PROTOCOLS:-"http tls"}
CONNECTIONS=${CONNECTIONS:-50}
THREADS=${THREADS:-2}
LATENCY_PROTOCOLS=${LATENCY_PROTOCOLS:-"http tls"}
LATENCY_RATE=${LATENCY_RATE:-20000}
LATENCY_CLIENTS=${LATENCY_CLIENTS:-50}
H2_CLIENTS=${H2_CLIENTS:-20}
H2_STREAMS=${H2_STREAMS:-10}
H2_THREADS=${H2_THREADS:-1}
HANDSHAKE_MODES=${HANDSHAKE_MODES:-"1.3-new 1.3-resumed 1.2-new 1.2-resumed"}
HANDSHAKE_CLIENTS=${HANDSHAKE_CLIENTS:-16}
HANDSHAKE_DURATION=${HANDSHAKE_DURATION:-5}
UPLOAD_PROTOCOLS=${UPLOAD_PROTOCOLS:-"tls h2"}
UPLOAD_CLIENTS=${UPLOAD_CLIENTS:-3}
UPLOAD_IN_A_ROW=${UPLOAD_IN_A_ROW:-5}
UPLOAD_MIB=${UPLOAD_MIB:-16}
ORIGIN="https://app.example.com"

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)

# shellcheck source=benches/load/common.sh
. "$here/common.sh"

fail() { echo "$*" >&2; exit 1; }
selected() { [[ " $WORKLOADS " == *" $1 "* ]]; } # workload
for w in $WORKLOADS; do
    case $w in keepalive | latency | h2 | handshakes | uploads) ;; *) fail "WORKLOADS: unknown workload '$w' (expected keepalive, latency, h2, handshakes or uploads)" ;; esac
done
for m in $HANDSHAKE_MODES; do
    case $m in 1.3-new | 1.3-resumed | 1.2-new | 1.2-resumed) ;; *) fail "HANDSHAKE_MODES: unknown mode '$m' (expected 1.3-new, 1.3-resumed, 1.2-new or 1.2-resumed)" ;; esac
done
for p in $UPLOAD_PROTOCOLS; do
    case $p in tls | h2 | http) ;; *) fail "UPLOAD_PROTOCOLS: unknown protocol '$p' (expected tls, h2 or http)" ;; esac
done
for v in PROTOCOLS LATENCY_PROTOCOLS; do
    for p in ${!v}; do
        case $p in tls | http) ;; *) fail "$v: unknown protocol '$p' (expected http or tls)" ;; esac
    done
done
for v in ROUNDS DURATION KEYS CONNECTIONS THREADS LATENCY_RATE LATENCY_CLIENTS H2_CLIENTS H2_STREAMS H2_THREADS HANDSHAKE_CLIENTS \
    HANDSHAKE_DURATION UPLOAD_CLIENTS UPLOAD_IN_A_ROW UPLOAD_MIB; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || fail "$v: '${!v}' is not a whole number above 0"
done
[ "$LATENCY_RATE" -ge "$LATENCY_CLIENTS" ] || fail "LATENCY_RATE: $LATENCY_RATE is under one request per second for each of the $LATENCY_CLIENTS clients"
[[ $LARGE_KEYS =~ ^[0-9]+$ ]] || fail "LARGE_KEYS: '$LARGE_KEYS' is not a whole number (0: no keygate100k)"
# keygate100k is measured in keepalive only: without it, its store is not built.
selected keepalive || LARGE_KEYS=0

# In this order, keygate runs next to both peers; the order is reversed every other round.
all_targets=(direct nginx keygate haproxy)
[ "$LARGE_KEYS" -gt 0 ] && all_targets+=(keygate100k)
[ -n "${BASE_BIN:-}" ] && all_targets+=(base)
targets=("${all_targets[@]}")
[ -n "${TARGETS:-}" ] && read -r -a targets <<<"$TARGETS"
for t in "${targets[@]}"; do
    [[ " ${all_targets[*]} " == *" $t "* ]] ||
        fail "TARGETS: '$t' is not set up in this run (set up: ${all_targets[*]})"
done
targeted() { [[ " ${targets[*]} " == *" $1 "* ]]; } # target
# Only the targets measured are started (and the large store built only for keygate100k).
targeted keygate100k || LARGE_KEYS=0

tools=(nginx:nginx haproxy:haproxy wrk:wrk curl:curl)
{ selected h2 || selected latency; } && tools+=(h2load:nghttp2-client)
install_missing "${tools[@]}"
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
HAPROXY=$(command -v haproxy || echo /usr/sbin/haproxy)

if [ -n "${KEYGATE_BIN:-}" ]; then
    KEYGATE=$KEYGATE_BIN # another build, e.g. an older commit, to compare in the same setup
else
    echo "building keygate (release)" >&2
    (cd "$root" && cargo build --release --quiet --bin keygate)
    KEYGATE="$root/target/release/keygate"
fi
if selected handshakes; then
    echo "building the new-connection client (examples/handshakes.rs)" >&2
    (cd "$root" && cargo build --release --quiet --example handshakes)
    HANDSHAKES="$root/target/release/examples/handshakes"
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/keygate-load.XXXXXX")
mkdir -p "$work/tmp"
pids=()    # servers, stopped at exit
clients=() # load clients running in the background, stopped at exit if still running
cleanup() {
    for pid in "${clients[@]}" "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${clients[@]}" "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Ports: bound together by the kernel, then released for the servers to take.
read -r UP_HTTP UP_TLS NG_HTTP NG_TLS KG_HTTP KG_TLS KG_ADMIN KL_HTTP KL_TLS KL_ADMIN \
    KB_HTTP KB_TLS KB_ADMIN HA_HTTP HA_TLS SINK < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(16)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])')

CERT="$work/cert.pem"
KEY="$work/key.pem"
user_line=""
[ "$(id -u)" -eq 0 ] && user_line="user root;"

render() { # template output NAME http tls admin
    sed -e "s|@WORK@|$work|g" -e "s|@CERT@|$CERT|g" -e "s|@KEY@|$KEY|g" -e "s|@USER@|$user_line|g" \
        -e "s|@UP_HTTP@|$UP_HTTP|g" -e "s|@UP_TLS@|$UP_TLS|g" -e "s|@NG_HTTP@|$NG_HTTP|g" \
        -e "s|@NG_TLS@|$NG_TLS|g" -e "s|@MAP@|$work/small.nginx.map|g" -e "s|@NAME@|$3|g" \
        -e "s|@HA_HTTP@|$HA_HTTP|g" -e "s|@HA_TLS@|$HA_TLS|g" -e "s|@HAMAP@|$work/small.haproxy.map|g" \
        -e "s|@SINK@|$SINK|g" \
        -e "s|@KG_HTTP@|$4|g" -e "s|@KG_TLS@|$5|g" -e "s|@KG_ADMIN@|$6|g" "$here/$1" >"$work/$2"
}

echo "generating $KEYS keys$([ "$LARGE_KEYS" -gt 0 ] && echo " and $LARGE_KEYS keys")" >&2
python3 "$here/keys.py" "$KEYS" "$work/small"
[ "$LARGE_KEYS" -gt 0 ] && python3 "$here/keys.py" "$LARGE_KEYS" "$work/large"
printf '%s' '{"video_url":"https://media.example/clip.mp4","preset":"720p"}' >"$work/body.json"

small_pid="" large_pid="" base_pid="" # set by start_keygate
start_keygate() { # name http tls admin [binary]
    local bin=${5:-$KEYGATE} keys=small
    [ "$1" = large ] && keys=large
    render keygate.toml.in "$1.toml" "$1" "$2" "$3" "$4"
    "$bin" --config "$work/$1.toml" keys import "$work/$keys.export.json" >/dev/null
    "$bin" --config "$work/$1.toml" serve >"$work/$1.log" 2>&1 &
    pids+=($!)
    printf -v "${1}_pid" '%s' "$!"
    wait_port "$2"
}

# The first keygate generates the development certificate (ECDSA P-256) every server uses: it
# runs even when not measured.
start_keygate small "$KG_HTTP" "$KG_TLS" "$KG_ADMIN"
[ "$LARGE_KEYS" -gt 0 ] && start_keygate large "$KL_HTTP" "$KL_TLS" "$KL_ADMIN"
targeted base && start_keygate base "$KB_HTTP" "$KB_TLS" "$KB_ADMIN" "$BASE_BIN"
small_idle_kib=$(awk '/VmRSS/ {print $2}' "/proc/$small_pid/status")

python3 "$here/sink.py" "$SINK" 2>>"$work/sink.log" &
pids+=($!)
render upstream.conf.in upstream.conf x 0 0 0
render nginx-gateway.conf.in nginx.conf x 0 0 0
render haproxy-gateway.cfg.in haproxy.cfg x 0 0 0
cat "$CERT" "$KEY" >"$work/haproxy.pem" # HAProxy reads the certificate and its key from one file
"$NGINX" -p "$work" -c "$work/upstream.conf" -g 'daemon off;' 2>>"$work/upstream-error.log" &
pids+=($!)
upstream_pid=$!
if targeted nginx; then
    "$NGINX" -p "$work" -c "$work/nginx.conf" -g 'daemon off;' 2>>"$work/nginx-error.log" &
    pids+=($!)
    nginx_pid=$!
fi
if targeted haproxy; then
    # HAProxy's access log is its standard output (see haproxy-gateway.cfg.in).
    "$HAPROXY" -f "$work/haproxy.cfg" >"$work/haproxy-access.log" 2>>"$work/haproxy-error.log" &
    pids+=($!)
    haproxy_pid=$!
fi
wait_port "$SINK"
wait_port "$UP_HTTP"
targeted nginx && wait_port "$NG_HTTP"
targeted haproxy && wait_port "$HA_HTTP"

url() { # target protocol(http|tls)
    local port
    case "$1-$2" in
        direct-http) port=$UP_HTTP ;; direct-tls) port=$UP_TLS ;;
        nginx-http) port=$NG_HTTP ;; nginx-tls) port=$NG_TLS ;;
        haproxy-http) port=$HA_HTTP ;; haproxy-tls) port=$HA_TLS ;;
        keygate-http) port=$KG_HTTP ;; keygate-tls) port=$KG_TLS ;;
        keygate100k-http) port=$KL_HTTP ;; keygate100k-tls) port=$KL_TLS ;;
        base-http) port=$KB_HTTP ;; base-tls) port=$KB_TLS ;;
    esac
    if [ "$2" = tls ]; then echo "https://localhost:$port"; else echo "http://127.0.0.1:$port"; fi
}
pid_of() { # target -> the process whose CPU time and memory are that target's (nginx: master and workers)
    case "$1" in
        direct) echo "$upstream_pid" ;; nginx) echo "$nginx_pid" ;; haproxy) echo "$haproxy_pid" ;;
        keygate) echo "$small_pid" ;; keygate100k) echo "$large_pid" ;; base) echo "$base_pid" ;;
    esac
}
tree() { echo "$1"; cat "/proc/$1/task/"*/children 2>/dev/null || true; } # pid -> it and its children
cpu_ticks() { # pid -> user+system clock ticks of it and its children so far
    local total=0 p
    for p in $(tree "$1"); do
        total=$((total + $(awk '{print $14 + $15}' "/proc/$p/stat")))
    done
    echo "$total"
}
# Peak RSS during one run: the kernel's high-water mark (VmHWM), reset to the current RSS before
# the run (`5` into clear_refs); for nginx, the sum over master and workers.
reset_peak() { local p; for p in $(tree "$1"); do echo 5 >"/proc/$p/clear_refs" 2>/dev/null || true; done; }
peak_kib() {
    local total=0 p
    for p in $(tree "$1"); do total=$((total + $(awk '/VmHWM/ {print $2}' "/proc/$p/status"))); done
    echo "$total"
}
keys_for() { if [ "$1" = keygate100k ]; then echo "$work/large.keys"; else echo "$work/small.keys"; fi; }
round_key() { sed -n "$(( ($1 - 1) % KEYS + 1 ))p" "$work/small.keys"; } # round -> that round's key

# Each runner: variant target seconds round -> "rate p50_us p99_us bad units extra", where units
# are what the CPU time is divided by (requests, or MiB) and extra is workload-specific ("-": none).

run_keepalive() { # wrk over HTTP/1.1 keep-alive; variant: http or tls
    wrk -t"$THREADS" -c"$CONNECTIONS" -d"${3}s" --timeout 5s -s "$here/keys.lua" \
        "$(url "$2" "$1")" -- "$(keys_for "$2")" "$ORIGIN" 2>&1 |
        sed -n 's/^RESULT rps=\([0-9.]*\) p50_us=\([0-9]*\) p99_us=\([0-9]*\) bad=\([0-9]*\) requests=\([0-9]*\)/\1 \2 \3 \4 \5 -/p'
}

# h2load's figures -> "rate p50 p99 bad requests -"; void unless the run spoke the protocol given.
# h2load prints no percentiles: they come from its per-request log (start, status, latency).
h2load_figures() { # protocol (h2 or http/1.1)
    python3 - "$1" "$work/h2load.out" "$work/h2load.log" <<'PY'
import os, re, sys
proto, out = sys.argv[1], open(sys.argv[2]).read()
rate = re.search(r"finished in [0-9.]+m?s, ([0-9.]+) req/s", out)
failed = re.search(r"requests: \d+ total, \d+ started, \d+ done, \d+ succeeded, (\d+) failed", out)
if not (rate and failed and os.path.exists(sys.argv[3])) or f"Application protocol: {proto}\n" not in out:
    print("0 0 0 1 0 -")  # not a run of that protocol: void
    sys.exit()
lat, bad = [], int(failed.group(1))
for line in open(sys.argv[3]):
    _, status, us = line.split()
    if int(status) < 0:
        continue  # a failed stream, counted in "failed"
    if not 200 <= int(status) < 300:
        bad += 1
    lat.append(int(us))
lat.sort()
p = lambda q: lat[min(len(lat) - 1, int(len(lat) * q))] if lat else 0
print(rate.group(1), p(0.5), p(0.99), bad, len(lat), "-")
PY
}

# h2load POSTing the benchmark's JSON with one key, its output and per-request log in $work.
h2load_post() { # base-url key h2load-options...
    local base=$1 key=$2
    shift 2
    rm -f "$work/h2load.log"
    h2load "$@" -d "$work/body.json" \
        -H "x-api-key: $key" -H "origin: $ORIGIN" -H "content-type: application/json" \
        -H "user-agent: keygate-load/1" --log-file="$work/h2load.log" \
        "$base/api/v1/video/process/" >"$work/h2load.out" 2>&1 || true
}

run_h2() { # h2load over TLS with ALPN h2; variant: tls
    h2load_post "$(url "$2" tls)" "$(round_key "$4")" -t"$H2_THREADS" -c"$H2_CLIENTS" -m"$H2_STREAMS" -D "$3"
    h2load_figures h2
}

# The offered rate: LATENCY_RATE split evenly over the clients (h2load's --rps is per client).
LATENCY_PER_CLIENT=$((LATENCY_RATE / LATENCY_CLIENTS))
LATENCY_OFFERED=$((LATENCY_PER_CLIENT * LATENCY_CLIENTS))
run_latency() { # h2load over HTTP/1.1 at LATENCY_OFFERED req/s; variant: http or tls
    # -r1 every 1ms: the clients start 1 ms apart, so each client's request timer fires at its own
    # moment (started together, their requests would arrive in bursts, and p50 would measure the
    # burst). -n instead of -D, which -r excludes: the run's requests at the offered rate.
    h2load_post "$(url "$2" "$1")" "$(round_key "$4")" --h1 -t1 -c"$LATENCY_CLIENTS" -r1 \
        --rate-period=1ms --rps="$LATENCY_PER_CLIENT" -n "$((LATENCY_OFFERED * $3))"
    h2load_figures http/1.1
}

run_handshakes() { # examples/handshakes.rs; variant: 1.3-new, 1.3-resumed, 1.2-new, 1.2-resumed
    local resume=off
    [ "${1#*-}" = resumed ] && resume=on
    "$HANDSHAKES" "$(url "$2" tls)/api/v1/video/process/" "$(keys_for "$2")" \
        "$ORIGIN" --tls "${1%-*}" --resume "$resume" --clients "$HANDSHAKE_CLIENTS" --seconds "$3" |
        awk '/^RESULT/ { for (i = 2; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
            printf "%s %s %s %s %s %.3f\n", v["rps"], v["p50_us"], v["p99_us"], v["bad"], v["requests"] + v["late"],
                (v["requests"] > 0 ? v["resumed"] / v["requests"] : 0) }'
}

sink_bytes() { curl -s "http://127.0.0.1:$SINK/bytes"; }
run_uploads() { # curl; variant: tls, h2 or http
    local flags=(--http1.1) proto=tls base size i start before after pairs=()
    case $1 in h2) flags=(--http2) ;; http) proto=http ;; esac
    base=$(url "$2" "$proto")
    size=$((UPLOAD_MIB * 1048576))
    for ((i = 0; i < UPLOAD_IN_A_ROW; i++)); do
        pairs+=(-T "$work/upload.bin" -o /dev/null "$base/api/v1/video/upload/")
    done
    before=$(sink_bytes)
    start=$(date +%s%N)
    local deadline=$((start + $3 * 1000000000)) loops=()
    for ((i = 0; i < UPLOAD_CLIENTS; i++)); do
        # One curl: UPLOAD_IN_A_ROW uploads on one connection; again until the time is up.
        while [ "$(date +%s%N)" -lt "$deadline" ]; do
            curl -sk "${flags[@]}" -X POST -H "Expect:" -H "X-API-Key: $(round_key "$4")" \
                -H "Origin: $ORIGIN" -H "Content-Type: application/octet-stream" \
                -H "User-Agent: keygate-load/1" -w '%{http_code} %{time_total} %{size_upload}\n' \
                "${pairs[@]}" || true
        done >"$work/uploads.$i" &
        loops+=($!)
    done
    clients=("${loops[@]}")
    wait "${loops[@]}"
    clients=()
    local end
    end=$(date +%s%N)
    after=$(sink_bytes)
    python3 - "$size" "$((end - start))" "$((after - before))" "$work"/uploads.* <<'PY'
import sys
size, elapsed_ns, sunk = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
lat, bad = [], 0
for path in sys.argv[4:]:
    for line in open(path):
        code, seconds, sent = line.split()
        if code.startswith("2") and int(float(sent)) == size:
            lat.append(int(float(seconds) * 1e6))
        else:
            bad += 1
# The sink must have read every byte of every upload the client saw succeed.
if sunk != len(lat) * size:
    bad += 1
lat.sort()
p = lambda q: lat[min(len(lat) - 1, int(len(lat) * q))] if lat else 0
mib = len(lat) * size / 1048576
print(f"{mib / (elapsed_ns / 1e9):.1f} {p(0.5)} {p(0.99)} {bad} {mib:.0f} -")
PY
    rm -f "$work"/uploads.*
}

metrics() { # admin-port metric-name... -> the sum of each metric's series, in one line
    python3 - "http://127.0.0.1:$1/metrics" "${@:2}" <<'PY'
import sys, urllib.request
text = urllib.request.urlopen(sys.argv[1]).read().decode()
def total(name):
    return int(sum(float(l.split()[-1]) for l in text.splitlines() if l.split("{")[0].split()[0:1] == [name]))
print(*(total(name) for name in sys.argv[2:]))
PY
}
cache_entries() { metrics "$1" keygate_cache_entries; } # keys in keygate's cache
counters() { # admin-port -> a keygate's store lookups and change feed lapses so far
    metrics "$1" keygate_cache_misses_total keygate_change_feed_lapses_total
}
admin_of() { # target -> its admin port, for keygate's targets
    case "$1" in keygate) echo "$KG_ADMIN" ;; keygate100k) echo "$KL_ADMIN" ;; base) echo "$KB_ADMIN" ;; esac
}

# One measured run: the runner's figures, with the target's CPU time per unit and peak RSS (and,
# for keygate's targets, its store lookups and change feed lapses).
# The runner runs in this shell (not in a command substitution), so the load clients it leaves in
# the background are in `clients` for the exit trap.
measure() { # workload variant target seconds round -> "rate p50 p99 bad cpu_us_per_unit peak_kib extra lookups lapses"
    local pid admin before after out peak counted=("-" "-") counted_before
    pid=$(pid_of "$3")
    admin=$(admin_of "$3")
    # A keygate's counters are read outside the CPU time measured.
    [ -n "$admin" ] && read -r -a counted_before < <(counters "$admin")
    reset_peak "$pid"
    before=$(cpu_ticks "$pid")
    "run_$1" "$2" "$3" "$4" "$5" >"$work/run.out"
    after=$(cpu_ticks "$pid")
    peak=$(peak_kib "$pid")
    if [ -n "$admin" ]; then
        read -r -a counted < <(counters "$admin")
        counted=($((counted[0] - counted_before[0])) $((counted[1] - counted_before[1])))
    fi
    out=$(cat "$work/run.out")
    [ -n "$out" ] || out="0 0 0 1 0 -" # the client printed nothing: void
    echo "$out" | awk -v t="$((after - before))" -v hz="$(getconf CLK_TCK)" -v peak="$peak" -v counted="${counted[*]}" \
        '{ printf "%s %s %s %s %.1f %s %s %s\n", $1, $2, $3, $4, ($5 > 0 ? t * 1e6 / hz / $5 : 0), peak, $6, counted }'
}

targets_of() { # workload -> the selected targets it applies to, in order
    local t
    for t in "${targets[@]}"; do
        case "$1-$t" in
            h2-keygate100k | latency-keygate100k | handshakes-direct | handshakes-keygate100k | uploads-keygate100k) ;;
            *) echo "$t" ;;
        esac
    done
}
variants_of() { # workload
    case $1 in
        keepalive) echo "$PROTOCOLS" ;; latency) echo "$LATENCY_PROTOCOLS" ;; h2) echo tls ;;
        handshakes) echo "$HANDSHAKE_MODES" ;; uploads) echo "$UPLOAD_PROTOCOLS" ;;
    esac
}

# Every gateway must answer a key from its store with 200 (and an unknown key with 401) before
# anything is timed, in every protocol it is measured in: a gateway that refuses quickly would
# otherwise look fast.
UNKNOWN_KEY="sk_$(printf '0%.0s' $(seq 46))"
status_of() { # url key -> HTTP status of a POST with that key (HTTP/1.1)
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
h2_status_of() { # url key -> "status http-version" of a POST over HTTP/2
    curl -sk --http2 -o /dev/null -w '%{http_code} %{http_version}' -X POST -d '{}' -H "X-API-Key: $2" "$1" || true
}
check_answers() { # target
    local key code proto protocols=$PROTOCOLS
    selected latency && protocols=$(echo "$PROTOCOLS $LATENCY_PROTOCOLS" | tr ' ' '\n' | sort -u)
    key=$(head -1 "$(keys_for "$1")")
    for proto in $protocols; do
        code=$(status_of "$(url "$1" "$proto")/api/v1/video/process/" "$key")
        [ "$code" = 200 ] || fail "$1 over $proto answered $code to a valid key"
        [ "$1" = direct ] && continue
        code=$(status_of "$(url "$1" "$proto")/api/v1/video/process/" "$UNKNOWN_KEY")
        [ "$code" = 401 ] || fail "$1 over $proto answered $code to an unknown key"
    done
    if selected h2 && [[ " $(targets_of h2 | tr '\n' ' ') " == *" $1 "* ]]; then
        code=$(h2_status_of "$(url "$1" tls)/api/v1/video/process/" "$key")
        [ "$code" = "200 2" ] || fail "$1 over HTTP/2 answered '$code' to a valid key (expected '200 2')"
        if [ "$1" != direct ]; then
            code=$(h2_status_of "$(url "$1" tls)/api/v1/video/process/" "$UNKNOWN_KEY")
            [ "$code" = "401 2" ] || fail "$1 over HTTP/2 answered '$code' to an unknown key (expected '401 2')"
        fi
    fi
}
# A handshake mode must do what it says on every target: the TLS version asked for (checked by
# handshakes.rs), no resumption in "new", and in "resumed" the server resuming the handshakes
# where a session is offered (all but each client's first): a gateway that does not resume would
# otherwise be measured on full handshakes. 90% leaves room for a server's session cache evicting
# under load; the summary prints each run's share.
check_handshakes() { # target
    local mode result requests resumed bad resume ciphers=""
    for mode in $HANDSHAKE_MODES; do
        resume=off
        [ "${mode#*-}" = resumed ] && resume=on
        result=$("$HANDSHAKES" "$(url "$1" tls)/api/v1/video/process/" \
            "$(keys_for "$1")" "$ORIGIN" --tls "${mode%-*}" --resume "$resume" \
            --clients "$HANDSHAKE_CLIENTS" --seconds 1 | grep '^RESULT' || true)
        requests=$(echo "$result" | sed -n 's/.* requests=\([0-9]*\).*/\1/p')
        resumed=$(echo "$result" | sed -n 's/.* resumed=\([0-9]*\).*/\1/p')
        bad=$(echo "$result" | sed -n 's/.* bad=\([0-9]*\).*/\1/p')
        if [ "${bad:-1}" != 0 ] || [ "${requests:-0}" -eq 0 ]; then
            fail "$1 in handshake mode $mode: ${requests:-0} responses and ${bad:-no} errors (connection errors, another TLS version or non-2xx answers)"
        fi
        if [ "$resume" = off ]; then
            [ "$resumed" -eq 0 ] || fail "$1 resumed $resumed sessions in mode $mode, where the client offers none"
        else
            [ $((resumed * 10)) -ge $(((requests - HANDSHAKE_CLIENTS) * 9)) ] ||
                fail "$1 resumed $resumed of $requests handshakes in mode $mode ($HANDSHAKE_CLIENTS of them full by design)"
        fi
        ciphers="$ciphers $mode:${result##*ciphers=}"
    done
    echo "  $1 chose:$ciphers" >&2
}
# An upload must reach the upstream whole, through every target and protocol.
check_uploads() { # target
    local proto flags base before after code
    for proto in $UPLOAD_PROTOCOLS; do
        flags=(--http1.1)
        base=$(url "$1" tls)
        [ "$proto" = h2 ] && flags=(--http2)
        [ "$proto" = http ] && base=$(url "$1" http)
        before=$(sink_bytes)
        code=$(curl -sk "${flags[@]}" -X POST -H "Expect:" -H "X-API-Key: $(head -1 "$work/small.keys")" \
            -T "$work/upload.bin" -o /dev/null -w '%{http_code}' "$base/api/v1/video/upload/" || true)
        after=$(sink_bytes)
        if [ "$code" != 200 ] || [ $((after - before)) -ne $((UPLOAD_MIB * 1048576)) ]; then
            fail "$1: an upload over $proto got $code and the upstream read $((after - before)) of $((UPLOAD_MIB * 1048576)) bytes"
        fi
    done
}

selected uploads && head -c "$((UPLOAD_MIB * 1048576))" /dev/urandom >"$work/upload.bin"
for t in "${targets[@]}"; do check_answers "$t"; done
if selected handshakes; then
    echo "checking the handshake modes; cipher suites:" >&2
    for t in $(targets_of handshakes); do check_handshakes "$t"; done
fi
if selected uploads; then
    for t in $(targets_of uploads); do check_uploads "$t"; done
fi

echo "warming up (caches, upstream pools)" >&2
for t in "${targets[@]}"; do
    for p in $PROTOCOLS; do run_keepalive "$p" "$t" 3 >/dev/null; done
done
# The large store is measured warm, as in steady state: every key cached (at most 2 min), and in
# the workers' copies.
if [[ " ${targets[*]} " == *" keygate100k "* ]]; then
    for _ in $(seq 1 40); do
        [ "$(cache_entries "$KL_ADMIN")" -ge "$LARGE_KEYS" ] && break
        run_keepalive http keygate100k 3 >/dev/null
    done
    # A key read from the store enters a worker's own copy at that worker's next request for it.
    for _ in 1 2 3; do run_keepalive http keygate100k 3 >/dev/null; done
fi

if [ -n "${PROFILE:-}" ]; then
    case $PROFILE in
        http | tls) workload=keepalive variant=$PROFILE ;;
        h2) workload=h2 variant=tls ;;
        handshakes) workload=handshakes variant=${HANDSHAKE_MODES%% *} ;;
        uploads) workload=uploads variant=${UPLOAD_PROTOCOLS%% *} ;;
        *) fail "PROFILE: unknown load '$PROFILE' (expected http, tls, h2, handshakes or uploads)" ;;
    esac
    command -v perf >/dev/null || { [ "$(id -u)" -eq 0 ] && apt-get install -y -qq linux-perf >/dev/null 2>&1; } || true
    "run_$workload" "$variant" keygate "$((DURATION + 2))" 1 >/dev/null &
    load_pid=$!
    clients=("$load_pid")
    sleep 1
    perf record -F 1999 -g --call-graph dwarf,16384 -o "$work/perf.data" -p "$small_pid" -- sleep "$DURATION" 2>/dev/null >/dev/null
    wait "$load_pid"
    clients=()
    perf report -i "$work/perf.data" --no-children --percent-limit 0.7 --stdio -g none 2>/dev/null | grep -v '^$' | head -60
    out="$root/target/perf-$PROFILE.data"
    cp "$work/perf.data" "$out" && echo "perf data kept in $out" >&2
    exit 0
fi

seconds_of() { if [ "$1" = handshakes ]; then echo "$HANDSHAKE_DURATION"; else echo "$DURATION"; fi; }
units_of() { # workload -> "rate-unit cpu-unit"
    case $1 in handshakes) echo "hs/s us/hs" ;; uploads) echo "MiB/s us/MiB" ;; *) echo "req/s us/req" ;; esac
}
results="$work/results"
: >"$results"
echo "measuring: $ROUNDS rounds of ($WORKLOADS) on (${targets[*]})" >&2
for round in $(seq 1 "$ROUNDS"); do
    for w in $WORKLOADS; do
        mapfile -t order < <(targets_of "$w")
        # Alternate the order so no target always runs first (or last) in a round.
        if [ $((round % 2)) -eq 0 ]; then
            reversed=()
            for ((i = ${#order[@]} - 1; i >= 0; i--)); do reversed+=("${order[i]}"); done
            order=("${reversed[@]}")
        fi
        # One variant at a time, so the targets a ratio compares run back to back.
        for v in $(variants_of "$w"); do
            for t in "${order[@]}"; do
                measure "$w" "$v" "$t" "$(seconds_of "$w")" "$round" >"$work/measure.out"
                read -r rate p50 p99 bad cpu peak extra lookups lapses <"$work/measure.out"
                read -r rate_unit cpu_unit < <(units_of "$w")
                echo "$w $v $round $t $rate $p50 $p99 $bad $cpu $peak $extra $lookups $lapses" >>"$results"
                printf '  round %d  %-10s %-11s %-11s %10.1f %-5s  p50 %8.2f ms  p99 %8.2f ms  cpu %8.1f %-6s  peak %6.1f MiB  errors %s%s%s\n' \
                    "$round" "$w" "$v" "$t" "$rate" "$rate_unit" "$(awk -v x="$p50" 'BEGIN { print x / 1000 }')" \
                    "$(awk -v x="$p99" 'BEGIN { print x / 1000 }')" "$cpu" "$cpu_unit" \
                    "$(awk -v x="$peak" 'BEGIN { print x / 1024 }')" "$bad" \
                    "$([ "$extra" != - ] && echo "  resumed $extra")" \
                    "$([ "$lookups" != - ] && echo "  store lookups $lookups  feed lapses $lapses")" >&2
            done
        done
    done
done

python3 - "$results" "$small_idle_kib" \
    "$LATENCY_OFFERED" \
    "HTTP/1.1 keep-alive, wrk -t$THREADS -c$CONNECTIONS, ${DURATION}s runs, a key per request" \
    "HTTP/1.1 keep-alive at $LATENCY_OFFERED req/s offered to every target, h2load -c$LATENCY_CLIENTS, ${DURATION}s runs, one key per run" \
    "HTTP/2 over TLS, h2load -t$H2_THREADS -c$H2_CLIENTS -m$H2_STREAMS, ${DURATION}s runs, one key per run" \
    "a new TLS connection per request, $HANDSHAKE_CLIENTS at a time, ${HANDSHAKE_DURATION}s runs" \
    "$UPLOAD_MIB MiB bodies, $UPLOAD_CLIENTS connections x $UPLOAD_IN_A_ROW in a row, ${DURATION}s runs" <<'PY'
import statistics, sys
from collections import defaultdict

path, idle, offered = sys.argv[1:4]
clients = dict(zip(("keepalive", "latency", "h2", "handshakes", "uploads"), sys.argv[4:9]))
units = {"keepalive": ("req/s", "us/req"), "latency": ("req/s", "us/req"), "h2": ("req/s", "us/req"),
         "handshakes": ("hs/s", "us/hs"), "uploads": ("MiB/s", "us/MiB")}
runs = defaultdict(dict)  # (workload, variant, target) -> round -> figures
counted = defaultdict(list)  # keygate's targets -> [(store lookups, feed lapses, measurement)]
order = []
for line in open(path):
    w, v, r, t, rate, p50, p99, bad, cpu, peak, extra, lookups, lapses = line.split()
    if (w, v) not in order:
        order.append((w, v))
    if lookups != "-":
        counted[t].append((int(lookups), int(lapses), f"{w} {v} round {r}"))
    runs[(w, v, t)][int(r)] = dict(rate=float(rate), p50=int(p50), p99=int(p99), bad=int(bad),
                                   cpu=float(cpu), peak=int(peak), extra=None if extra == "-" else float(extra))

def med(w, v, t, k):
    xs = [x[k] for x in runs.get((w, v, t), {}).values()]
    return statistics.median(xs) if xs else None

better = {"rate": max, "p99": min, "cpu": min}  # which of two peers is the better one, per figure

def ratio_line(w, v, num, den):
    """num/den for rate, p99 and CPU: medians over rounds, then per round min / median / max.
    den may be "best": per figure, the better of nginx and HAProxy (in each round, for the rounds)."""
    parts = []
    for k, label in (("rate", units[w][0]), ("p99", "p99"), ("cpu", "cpu")):
        def value(t, r=None):
            if t != "best":
                x = runs.get((w, v, t), {})
                return (x[r][k] if r in x else None) if r is not None else med(w, v, t, k)
            peers = [y for y in (value("nginx", r), value("haproxy", r)) if y is not None]
            return better[k](peers) if peers else None
        a, b = value(num), value(den)
        if not a or not b:
            continue
        per_round = []
        for r in sorted(runs.get((w, v, num), {})):
            x, y = value(num, r), value(den, r)
            if x and y:
                per_round.append(x / y)
        spread = ""
        if per_round:
            spread = f" ({min(per_round):.2f}/{statistics.median(per_round):.2f}/{max(per_round):.2f}"
            if k == "rate":
                spread += f", {sum(x >= 1.0 for x in per_round)} of {len(per_round)} >= 1"
            spread += ")"
        parts.append(f"{label} {a / b:.2f}{spread}")
    return f"    {num + '/' + den:<20} " + "  ".join(parts) if parts else None

voided = []
for w in dict.fromkeys(w for w, _ in order):
    rate_unit, cpu_unit = units[w]
    print(f"\n{w}: {clients[w]}; medians over rounds")
    print(f"  {'target':<12} {'variant':<12} {rate_unit:>10} {'p50 ms':>8} {'p99 ms':>8} {'cpu ' + cpu_unit:>11} {'peak MiB':>9} {'errors':>7}"
          + ("  resumed" if w == "handshakes" else ""))
    for (w2, v) in order:
        if w2 != w:
            continue
        for t in ("direct", "nginx", "haproxy", "keygate", "keygate100k", "base"):
            if (w, v, t) not in runs:
                continue
            rs = runs[(w, v, t)].values()
            bad = sum(x["bad"] for x in rs)
            peak = max(x["peak"] for x in rs)
            line = (f"  {t:<12} {v:<12} {med(w, v, t, 'rate'):>10.1f} {med(w, v, t, 'p50') / 1000:>8.2f} "
                    f"{med(w, v, t, 'p99') / 1000:>8.2f} {med(w, v, t, 'cpu'):>11.1f} {peak / 1024:>9.1f} {bad:>7}")
            if w == "handshakes":
                share = med(w, v, t, "extra")
                line += f"  {share * 100:6.1f}%"
                if v.endswith("-resumed") and share < 0.95:
                    voided.append(f"{t} resumed only {share * 100:.1f}% of the handshakes in {v}")
            print(line)
            # Latencies are compared at one load: a target that fell behind the offered rate was
            # measured at another (h2load times each request from when it is sent, not due).
            if w == "latency" and med(w, v, t, "rate") < 0.95 * int(offered):
                voided.append(f"{t} latency {v}: {med(w, v, t, 'rate'):.0f} of the {offered} req/s offered")
            if bad:
                voided.append(f"{t} {w} {v}: {bad} errors or non-2xx responses")
    print(f"  ratios: medians over rounds (per round min/median/max); {rate_unit} higher is better, p99 and cpu lower")
    for (w2, v) in order:
        if w2 != w:
            continue
        print(f"  {v}")
        for num, den in (("keygate", "nginx"), ("keygate", "haproxy"), ("keygate", "best"),
                         ("keygate", "base"), ("keygate100k", "keygate"), ("keygate", "direct"),
                         ("nginx", "direct"), ("haproxy", "direct")):
            line = ratio_line(w, v, num, den)
            if line:
                print(line)

print("\nbest: per figure, the better of nginx and HAProxy (in each round for the per-round ratios)")
print(f"memory: keygate idle RSS {int(idle) / 1024:.1f} MiB")
for i, what in enumerate(("store lookups", "change feed lapses")):
    for t, xs in counted.items():
        where = ", ".join(f"{x[2]}: {x[i]}" for x in xs if x[i])
        print(f"{what} while measuring: {t} {sum(x[i] for x in xs)}" + (f" ({where})" if where else ""))
for v in voided:
    print(f"WARNING: {v}: the affected figures are void")
PY
# Every gateway logs each request (keygate's log also holds its few start-up lines; nginx flushes
# its 64 KiB buffer at exit, so its last lines are not counted here).
lines() { if [ -f "$1" ]; then wc -l <"$1"; else echo "not run"; fi; } # file -> its lines
echo "access log lines: nginx $(lines "$work/nginx-access.log"), haproxy $(lines "$work/haproxy-access.log"), keygate $(lines "$work/small.log")"
