#!/usr/bin/env bash
# Builds the release wasm filters and shrinks each with binaryen's wasm-opt -Oz
# (installed by scripts/setup.sh under .txmesh/tools/). Artifacts:
#   target/wasm32-wasip1/release/txmesh_<name>.wasm
# Usage: scripts/build-wasm.sh <cargo package>...
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -gt 0 ] || { echo "usage: scripts/build-wasm.sh <cargo package>... (e.g. txmesh-txn; make build builds them all)" >&2; exit 2; }
dir="${CARGO_TARGET_DIR:-target}/wasm32-wasip1/release"
args=()
for p in "$@"; do args+=(-p "$p"); done
cargo build --quiet --release --target wasm32-wasip1 "${args[@]}"

opt=".txmesh/tools/node_modules/.bin/wasm-opt"
# The features rustc enables by default for wasm32-wasip1 (the stripped
# artifact carries no target_features section for wasm-opt to detect).
features=(--enable-bulk-memory --enable-sign-ext --enable-mutable-globals
          --enable-nontrapping-float-to-int --enable-multivalue --enable-reference-types)
for p in "$@"; do
  w="$dir/${p//-/_}.wasm"
  [ -f "$w" ] || { echo "[build] missing $w" >&2; exit 1; }
  if [ -x "$opt" ]; then
    before=$(stat -c %s "$w")
    "$opt" -Oz --strip-debug --strip-producers "${features[@]}" "$w" -o "$w.opt" >/dev/null
    mv "$w.opt" "$w"
    printf '[build] %-24s %7d -> %7d bytes (wasm-opt -Oz)\n' "$(basename "$w")" "$before" "$(stat -c %s "$w")"
  else
    printf '[build] %-24s %7d bytes (wasm-opt not installed: run scripts/setup.sh)\n' "$(basename "$w")" "$(stat -c %s "$w")"
  fi
done
