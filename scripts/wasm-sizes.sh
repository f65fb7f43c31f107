#!/usr/bin/env bash
# Prints each release .wasm with its size and fails if one is over the budget.
set -euo pipefail
cd "$(dirname "$0")/.."
# 320 KiB since issue 20 (gRPC participants: prost and the gRPC call path,
# +12 KiB in the txn filter), raised with what a bigger module costs an
# Envoy measured: BENCHMARKS.md, "What the txn filter's size costs".
budget_kib=${WASM_BUDGET_KIB:-320}
dir="${CARGO_TARGET_DIR:-target}/wasm32-wasip1/release"
status=0
found=0
for w in "$dir"/txmesh_*.wasm; do
  [ -f "$w" ] || continue
  found=1
  bytes=$(stat -c %s "$w")
  kib=$(( (bytes + 1023) / 1024 ))
  if [ "$kib" -gt "$budget_kib" ]; then
    printf '[size]  %-24s %7d bytes (%3d KiB)  OVER the %d KiB budget\n' "$(basename "$w")" "$bytes" "$kib" "$budget_kib"
    status=1
  else
    printf '[size]  %-24s %7d bytes (%3d KiB)  ok (budget %d KiB)\n' "$(basename "$w")" "$bytes" "$kib" "$budget_kib"
  fi
done
[ "$found" = 1 ] || { echo "[size]  no wasm in $dir: run make build"; exit 1; }
exit $status
