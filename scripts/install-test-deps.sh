#!/usr/bin/env bash
# Installs what the test suite needs beyond the Rust toolchain, when it is missing:
# redis-server and redis-cli (Debian packages redis-server, redis-tools) for the fleet-mode tests,
# which start their own servers on free loopback ports; curl and nghttp (curl, nghttp2-client) for
# tests/clients.rs, the real clients every answer is checked with; curl and python3 for
# tests/docs.rs, which runs the README's quickstart as written (python3 -m http.server is its
# example backend).
set -euo pipefail

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || need+=(redis-tools)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v nghttp >/dev/null 2>&1 || need+=(nghttp2-client)
python3 -c 'import http.server' >/dev/null 2>&1 || need+=(python3)
[ ${#need[@]} -eq 0 ] && exit 0

sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
echo "installing ${need[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# The package may start a system-wide server on 6379; the tests never use it.
command -v redis-server >/dev/null
command -v curl >/dev/null
command -v nghttp >/dev/null
python3 -c 'import http.server'
