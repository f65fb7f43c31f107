#!/usr/bin/env bash
# Runs `envoy --mode validate` on every Envoy config in envoy/ (from the repo
# root, so relative wasm paths resolve).
set -euo pipefail
cd "$(dirname "$0")/.."
envoy="${ENVOY_BIN:-.venv/bin/envoy}"
# The sidecar configs name the demo certificates: make sure they exist.
scripts/certs.sh order payment inventory ingress >/dev/null
status=0
# envoy/native/ loads libtxmesh.so (make build-native) from here.
export ENVOY_DYNAMIC_MODULES_SEARCH_PATH=${ENVOY_DYNAMIC_MODULES_SEARCH_PATH:-target/native}
for f in envoy/*.yaml envoy/*.json envoy/native/*.yaml; do
  [ -f "$f" ] || continue
  case "$(basename "$f")" in docker-compose*) continue ;; esac
  if out=$("$envoy" --mode validate -c "$f" -l error --base-id "$((RANDOM + 20000))" 2>&1); then
    printf '[validate] %-40s ok\n' "$f"
  else
    printf '[validate] %-40s FAILED\n%s\n' "$f" "$out"
    status=1
  fi
done
exit $status
