#!/usr/bin/env bash
# Regression guard for the authentication hot path, cheap enough for CI and immune to a noisy
# machine: counts instructions with `valgrind --tool=callgrind` (repeatable, unlike time) for each
# case of examples/hotpath.rs, per request, and compares them with benches/hotpath-baseline.txt.
#
#   scripts/check-hotpath.sh            # check; fails when a case exceeds its baseline + TOLERANCE %
#   scripts/check-hotpath.sh --update   # rewrite the baseline from this machine's counts
#
# TOLERANCE (percent, default 10) allows for the moka cache's occasional housekeeping and for
# hash seeds, which move counts by a few percent between runs.
set -euo pipefail
cd "$(dirname "$0")/.."

TOLERANCE=${TOLERANCE:-10}
ITERATIONS=${ITERATIONS:-20000}
BASELINE=benches/hotpath-baseline.txt

if ! command -v valgrind >/dev/null; then
    echo "installing valgrind (Debian package)" >&2
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get install -y -qq valgrind >/dev/null 2>&1 ||
        { $sudo apt-get update -qq >/dev/null && $sudo apt-get install -y -qq valgrind >/dev/null; }
fi

cargo build --release --quiet --example hotpath
probe=target/release/examples/hotpath
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

instructions() { # case n -> total instructions of the run
    valgrind --tool=callgrind --toggle-collect='*hotpath*measured*' --callgrind-out-file="$out/cg" \
        "$probe" "$1" "$2" >/dev/null 2>"$out/log" ||
        { cat "$out/log" >&2; exit 1; }
    sed -n 's/^summary: \([0-9]*\).*/\1/p' "$out/cg" | grep . || echo 0
}

cases=(sha256 reject_malformed cache_hit cache_miss_negative)
declare -A measured
for c in "${cases[@]}"; do
    base=$(instructions "$c" 0)
    full=$(instructions "$c" "$ITERATIONS")
    if [ "$full" -le 0 ]; then
        echo "callgrind counted nothing for $c: is examples/hotpath.rs's measured() still there?" >&2
        exit 1
    fi
    measured[$c]=$(((full - base) / ITERATIONS))
done

if [ "${1:-}" = "--update" ]; then
    {
        echo "# Instructions per request on the authentication hot path (scripts/check-hotpath.sh)."
        echo "# Regenerate with: scripts/check-hotpath.sh --update"
        for c in "${cases[@]}"; do echo "$c ${measured[$c]}"; done
    } >"$BASELINE"
    cat "$BASELINE"
    exit 0
fi

failed=0
printf '%-22s %12s %12s %8s\n' case baseline measured change
for c in "${cases[@]}"; do
    want=$(awk -v c="$c" '$1 == c {print $2}' "$BASELINE")
    got=${measured[$c]}
    if [ -z "$want" ]; then
        echo "$c: no baseline in $BASELINE (run with --update)" >&2
        failed=1
        continue
    fi
    change=$(awk -v a="$got" -v b="$want" 'BEGIN {printf "%+.1f%%", (a - b) * 100 / b}')
    printf '%-22s %12d %12d %8s\n' "$c" "$want" "$got" "$change"
    if [ "$got" -gt $((want + want * TOLERANCE / 100)) ]; then
        echo "  regression: $c costs more than $TOLERANCE% over its baseline" >&2
        failed=1
    elif [ "$got" -lt $((want - want * TOLERANCE / 100)) ]; then
        echo "  $c is more than $TOLERANCE% cheaper than its baseline: update it (--update)" >&2
    fi
done
exit "$failed"
