#!/usr/bin/env bash
# Builds keygate with profile-guided optimisation (PGO) and prints the binary's path.
#
# An instrumented build serves the load benchmark for about a minute (benches/load/run.sh with
# one short round of four workloads: HTTP/1.1 keep-alive over plain HTTP and TLS, HTTP/2, new TLS
# connections, 16 MiB uploads; the fifth, latency, runs keep-alive's code and is left out). The
# release build is then compiled with the profile it recorded, so the code those requests run is
# laid out and inlined for them. The source and the release profile are the same as
# `cargo build --release`; only the compiler's choices differ.
# What it saves is in docs/benchmarks.md (Levers).
#
#   scripts/build-pgo.sh                                    # about 10 minutes on 2 cores
#   KEYGATE_BIN=$(scripts/build-pgo.sh) benches/load/run.sh  # measure it
#
# Builds under target/pgo/ (the instrumented build, the profiles, the optimised build), so
# target/release/ is left as it is. Needs the toolchain's llvm-profdata (rustup's llvm-tools
# component, added when missing) and what run.sh installs (nginx, HAProxy, wrk, h2load, curl).
# Everything it starts listens on 127.0.0.1 and is stopped by run.sh on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=$root/target/pgo

host=$(rustc -vV | sed -n 's/^host: //p')
profdata="$(rustc --print sysroot)/lib/rustlib/$host/bin/llvm-profdata"
if [ ! -x "$profdata" ]; then
    echo "build-pgo: adding rustup's llvm-tools component (llvm-profdata)" >&2
    rustup component add llvm-tools >&2
fi
[ -x "$profdata" ] || { echo "build-pgo: $profdata not found" >&2; exit 1; }

# Compiler flags go through CARGO_ENCODED_RUSTFLAGS (separated by 0x1f), which cargo does not
# split at spaces: the repository's path may contain them.
echo "build-pgo: instrumented build (target/pgo/generate)" >&2
CARGO_ENCODED_RUSTFLAGS="-Cprofile-generate=$out/profiles" \
    cargo build --release --locked --quiet --bin keygate --target-dir "$out/generate" >&2
# The build scripts were instrumented too and left profiles of their own: only the gateway's
# count.
rm -rf "$out/profiles"
mkdir -p "$out/profiles"

echo "build-pgo: recording a profile under the load benchmark" >&2
LLVM_PROFILE_FILE="$out/profiles/keygate-%p-%m.profraw" \
    KEYGATE_BIN="$out/generate/release/keygate" WORKLOADS="keepalive h2 handshakes uploads" \
    TARGETS=keygate ROUNDS=1 DURATION=5 \
    HANDSHAKE_DURATION=3 LARGE_KEYS=0 benches/load/run.sh >&2
compgen -G "$out/profiles/*.profraw" >/dev/null ||
    { echo "build-pgo: the instrumented gateway wrote no profile" >&2; exit 1; }
"$profdata" merge -o "$out/keygate.profdata" "$out/profiles"

echo "build-pgo: optimised build (target/pgo/use)" >&2
CARGO_ENCODED_RUSTFLAGS="-Cprofile-use=$out/keygate.profdata"$'\x1f'"-Cllvm-args=-pgo-warn-missing-function=false" \
    cargo build --release --locked --quiet --bin keygate --target-dir "$out/use" >&2
echo "$out/use/release/keygate"
