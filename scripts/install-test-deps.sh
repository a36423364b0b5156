#!/usr/bin/env bash
# Installs what the test suite needs beyond the Rust toolchain, when it is missing:
# - redis-server, redis-cli and redis-sentinel (Debian packages redis-server, redis-tools,
#   redis-sentinel) for the fleet-mode tests, which start their own servers and sentinels on
#   free loopback ports;
# - Chromium (Debian package chromium) for the browser CORS test (tests/browser.rs);
# - a Python virtualenv with Django, Django REST Framework and gunicorn from PyPI
#   (contrib/django/tests/requirements.txt) for tests/django.rs, at $KEYGATE_TEST_VENV or
#   target/test-venv (never committed);
# - curl and nghttp (Debian packages curl, nghttp2-client) for tests/clients.rs, the real clients
#   every answer is checked with.
# - curl and python3 (python3 -m http.server) for tests/docs.rs, which runs the README's
#   quickstart as written.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || need+=(redis-tools)
command -v redis-sentinel >/dev/null 2>&1 || need+=(redis-sentinel)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v nghttp >/dev/null 2>&1 || need+=(nghttp2-client)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v python3 >/dev/null 2>&1 || need+=(python3)
# Debian's python3 makes virtualenvs only with python3-venv.
if command -v python3 >/dev/null 2>&1 && ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
    need+=(python3-venv)
fi

if [ ${#need[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    echo "installing ${need[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    # The packages may start a system-wide server on 6379 and a sentinel on 26379; the tests
    # never use them.
    command -v redis-server >/dev/null
    command -v redis-sentinel >/dev/null
    command -v chromium >/dev/null
    command -v nghttp >/dev/null
fi

venv="${KEYGATE_TEST_VENV:-$root/target/test-venv}"
requirements="$root/contrib/django/tests/requirements.txt"
if [ ! -x "$venv/bin/python" ]; then
    echo "creating the Django test virtualenv in $venv"
    python3 -m venv "$venv"
fi
# Quiet and quick when everything is already there (pip then asks no index).
"$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$requirements"
