#!/usr/bin/env bash
# Installs what the test suite needs beyond the Rust toolchain, when it is missing:
# redis-server, redis-cli and redis-sentinel (Debian packages redis-server, redis-tools,
# redis-sentinel) for the fleet-mode tests, which start their own servers and sentinels on free
# loopback ports.
set -euo pipefail

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || need+=(redis-tools)
command -v redis-sentinel >/dev/null 2>&1 || need+=(redis-sentinel)
[ ${#need[@]} -eq 0 ] && exit 0

sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
echo "installing ${need[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# The packages may start a system-wide server on 6379 and a sentinel on 26379; the tests never
# use them.
command -v redis-server >/dev/null
command -v redis-sentinel >/dev/null
