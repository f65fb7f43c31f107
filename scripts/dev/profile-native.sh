#!/usr/bin/env bash
# Where a native filter's microseconds go: bench-filters' native rows under
# `perf record`, then per worker thread the share of its cycles spent in
# libtxmesh.so's hooks and in the ABI callbacks they make (BENCHMARKS.md,
# "The native tier"). Needs perf (linux-perf) and root (or perf_event_paranoid <= 1).
#   scripts/dev/profile-native.sh [seconds per config]
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-10}
out=target/profile-native
mkdir -p "$out"
command -v perf >/dev/null || { echo "perf is not installed (apt-get install linux-perf)"; exit 2; }
# Symbols for the module (the native profile strips them).
CARGO_PROFILE_NATIVE_STRIP=false CARGO_PROFILE_NATIVE_DEBUG=1 \
  cargo build --quiet --profile native -p txmesh-native
cargo build --quiet --profile bench-native -p txmesh-tests --bin bench-filters
BENCH_ONLY="native (libtxmesh" ./target/bench-native/bench-filters "$secs" 16 1 1 >"$out/bench.log" 2>&1 &
bench=$!
perf_pid=
cleanup() {
  [ -n "$perf_pid" ] && kill -INT "$perf_pid" 2>/dev/null || true
  kill "$bench" 2>/dev/null || true
}
trap cleanup EXIT
for _ in $(seq 1 600); do
  [ "$(pgrep -fc 'envoy-n(metrics|authz|router)-' || true)" -ge 3 ] && break
  sleep 0.2
done
pids=$(pgrep -f 'envoy-n(metrics|authz|router)-' | paste -sd, -)
declare -A names
for p in ${pids//,/ }; do
  names[$p]=$(tr '\0' ' ' </proc/"$p"/cmdline | grep -o 'envoy-n[a-z]*' | head -1 || true)
done
perf record -F 1999 -g -p "$pids" -o "$out/perf.data" >"$out/perf.log" 2>&1 &
perf_pid=$!
wait "$bench" || true
kill -INT "$perf_pid" 2>/dev/null || true
wait "$perf_pid" 2>/dev/null || true
perf_pid=
tail -6 "$out/bench.log"
for p in ${pids//,/ }; do
  for t in $(perf report -i "$out/perf.data" --pid "$p" --no-children -g none --sort pid --stdio 2>/dev/null \
      | grep -o '[0-9]*:wrk:worker' | cut -d: -f1 | sort -u); do
    total=$(perf report -i "$out/perf.data" --no-children -g none --sort pid --stdio 2>/dev/null \
      | grep " $t:wrk" | grep -Eo '[0-9.]+%' | head -1)
    echo
    echo "== ${names[$p]#envoy-} (Envoy $p, worker thread $t: $total of all samples); share of all samples with callees:"
    perf report -i "$out/perf.data" --tid "$t" --children -g none --sort sym --stdio 2>/dev/null \
      | grep -E 'envoy_dynamic_module|txmesh' | head -8
  done
done
