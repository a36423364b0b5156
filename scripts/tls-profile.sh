#!/usr/bin/env bash
# Checks the TLS configuration keygate serves against Mozilla's "intermediate" profile with
# sslyze (PyPI): TLS 1.0/1.1 and SSL refused, no weak suites, forward secrecy, no compression,
# secure renegotiation. Starts the real gateway on a free loopback port with a generated
# development certificate; the certificate itself (self-signed, long-lived) cannot pass
# Mozilla's certificate checks, so those two findings are reported and tolerated, anything else
# fails the script.
#
#   scripts/tls-profile.sh                  # uses target/debug/keygate
#   KEYGATE_BIN=target/release/keygate scripts/tls-profile.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bin="${KEYGATE_BIN:-target/debug/keygate}"
[ -x "$bin" ] || { echo "tls-profile: $bin not found (cargo build first)" >&2; exit 1; }
python3 -c 'import sslyze' 2>/dev/null || python3 -m pip install -q sslyze

tmp="$(mktemp -d)"
pid=""
cleanup() {
    [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
    rm -rf "$tmp"
}
trap cleanup EXIT

port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
cat > "$tmp/gateway.toml" <<TOML
[server]
https_listen = "127.0.0.1:$port"
http_listen = ""
admin_listen = ""
[tls]
cert = "$tmp/cert.pem"
key = "$tmp/key.pem"
generate_dev_cert = true
[store]
path = "$tmp/keygate.db"
TOML
env -u KEYGATE_CONFIG "$bin" --config "$tmp/gateway.toml" serve > "$tmp/gateway.log" 2>&1 &
pid=$!
for _ in $(seq 1 100); do
    grep -q "keygate listening" "$tmp/gateway.log" 2>/dev/null && break
    sleep 0.1
done
grep -q "keygate listening" "$tmp/gateway.log" || { cat "$tmp/gateway.log"; exit 1; }

set +e
timeout 180 python3 -m sslyze --mozilla_config=intermediate "127.0.0.1:$port" > "$tmp/sslyze.txt" 2>&1
set -e
sed -n '/SSL 2.0 Cipher Suites/,$p' "$tmp/sslyze.txt" | grep -v '^\s*$' | cut -c1-120

# Findings after "Not compliant." other than the development certificate's own are failures.
other="$(sed -n '/Not compliant/,$p' "$tmp/sslyze.txt" | grep -E '^\s+\* ' \
    | grep -vE 'certificate_path_validation|maximum_certificate_lifespan' || true)"
grep -q "COMPLIANCE AGAINST TLS CONFIGURATION" "$tmp/sslyze.txt" || { echo "tls-profile: sslyze did not finish" >&2; exit 1; }
if [ -n "$other" ]; then
    echo "tls-profile: FAILED: $other" >&2
    exit 1
fi
echo "tls-profile: OK (protocols and cipher suites meet Mozilla intermediate; the self-signed development certificate's own findings are expected)"
