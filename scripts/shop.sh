#!/usr/bin/env bash
# The shop stack on loopback: etcd, the three services, their sidecar Envoys
# and the ingress Envoy.
#
#   scripts/shop.sh up      start what is not running (keeps the data), return when ready
#   scripts/shop.sh down    stop everything (pid files in .txmesh/run/)
#   scripts/shop.sh clean   down, then remove the data (.txmesh/data/)
#   scripts/shop.sh demo    fresh data, up, run the checkout scenario, print results, down
#   scripts/shop.sh status  what runs
#
# Environment: TXMESH_INGRESS_PORT (default 10000); DEMO_ARGS for demo
# (default "--checkouts 200 --concurrency 8"); TXMESH_PORT_OFFSET shifts every
# port (tests use it to run the stack on free ports); TXMESH_HOME moves
# .txmesh/ (run/ and data/); TXMESH_SKIP_BUILD=1 with SHOP_BIN/DEMO_BIN uses
# binaries built elsewhere (tests). PAYMENT_INSTANCES / INVENTORY_INSTANCES
# (default 1, at most 9) start more instances of a service: instance k listens
# on the first one's ports + 10·(k-1) and shares its database; every instance
# registers itself in etcd and order's sidecar routes among them.
# TXMESH_PROMETHEUS=1 also starts a Prometheus (Debian package) on 9090
# scraping every Envoy (deploy/prometheus.yml). TXMESH_HOST=native runs authz
# and metrics from the native module libtxmesh.so instead of wasm
# (envoy/native/, docs/native.md).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
HOME_DIR=${TXMESH_HOME:-$ROOT/.txmesh}
RUN=$HOME_DIR/run
DATA=$HOME_DIR/data
OFF=${TXMESH_PORT_OFFSET:-0}
ENVOY=${ENVOY_BIN:-$ROOT/.venv/bin/envoy}
ETCD=${ETCD_BIN:-etcd}
BIN=$ROOT/target/bench-native
SHOP_BIN=${SHOP_BIN:-$BIN/shop}
DEMO_BIN=${DEMO_BIN:-$BIN/shop-demo}
HOST=${TXMESH_HOST:-wasm}
case "$HOST" in
  wasm|native) ;;
  *) printf '[shop] ERROR: TXMESH_HOST must be wasm or native, got %s\n' "$HOST"; exit 2 ;;
esac
# Where the sidecars find libtxmesh.so (TXMESH_HOST=native).
export ENVOY_DYNAMIC_MODULES_SEARCH_PATH=${ENVOY_DYNAMIC_MODULES_SEARCH_PATH:-$ROOT/target/native}

p() { echo $(( $1 + OFF )); }
INGRESS_PORT=${TXMESH_INGRESS_PORT:-$(p 10000)}
say() { printf '[shop] %s\n' "$*"; }

# Alive, and not a zombie (a killed process whose parent has not reaped it).
running() {
  [ -f "$RUN/$1.pid" ] || return 1
  local pid state; pid=$(cat "$RUN/$1.pid")
  [ -r "/proc/$pid/stat" ] || return 1
  state=$(sed -E 's/^[0-9]+ \(.*\) ([A-Za-z]).*/\1/' "/proc/$pid/stat")
  [ "$state" != Z ]
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {  # name port
  for _ in $(seq 1 150); do
    port_open "$2" && return 0
    if ! running "$1"; then break; fi
    sleep 0.2
  done
  say "ERROR: $1 is not listening on 127.0.0.1:$2; last lines of $RUN/$1.log:"
  tail -n 20 "$RUN/$1.log" 2>/dev/null | sed 's/^/    /' || true
  exit 1
}

start() {  # name port command...
  local name=$1 port=$2; shift 2
  if running "$name"; then
    say "$name already running (pid $(cat "$RUN/$name.pid"))"
    return
  fi
  if port_open "$port"; then
    say "ERROR: port $port (for $name) is taken by another process"
    exit 1
  fi
  # setsid: its own session and process group. A small sh stays its parent:
  # Envoy asks the kernel for SIGTERM when its parent exits, so it must not
  # be the child of this short-lived script. The pid file names the process
  # that serves (what an operator kills to try a crash); the pgid file its
  # group (the sh's pid), which `down` stops whatever died first.
  rm -f "$RUN/$name.pid" "$RUN/$name.pgid"
  setsid sh -c 'echo $$ >"$0.pgid"; "$@" & echo $! >"$0.pid"; wait $!' "$RUN/$name" "$@" \
    >>"$RUN/$name.log" 2>&1 </dev/null &
  for _ in $(seq 1 50); do [ -s "$RUN/$name.pid" ] && break; sleep 0.02; done
  wait_port "$name" "$port"
  say "$name up on 127.0.0.1:$port (pid $(cat "$RUN/$name.pid"), log $RUN/$name.log)"
}

# The Envoy configs of this stack, from the one generator of envoy/*.yaml
# (scripts/dev/gen-sidecar-configs.py), with this stack's ports, certificate
# directory and instances, into $RUN.
configs() {
  local n
  for n in "${PAYMENT_INSTANCES:-1}" "${INVENTORY_INSTANCES:-1}"; do
    if ! [[ "$n" =~ ^[1-9]$ ]]; then
      say "ERROR: PAYMENT_INSTANCES and INVENTORY_INSTANCES must be 1 to 9, got '$n'"; exit 2
    fi
  done
  python3 scripts/dev/gen-sidecar-configs.py --host "$HOST" --out "$RUN" --offset "$OFF" --ingress-port "$INGRESS_PORT" \
    --certs "$HOME_DIR/certs" --instances "payment=${PAYMENT_INSTANCES:-1},inventory=${INVENTORY_INSTANCES:-1}"
}

# Instances 1..n of a participant service, each with its sidecar:
# instance k uses app port + 10(k-1) and sidecar ports + 10(k-1).
instances() {  # service app_port admin_port n
  local svc=$1 app=$2 admin=$3 n=$4
  for k in $(seq 1 "$n"); do
    local d=$(( (k - 1) * 10 )) name=$svc
    [ "$k" = 1 ] || name="$svc-$k"
    local cfg=$RUN/$name-sidecar.yaml
    start "$name" "$(p $((app + d)))" "$SHOP_BIN" "$svc" --port "$(p $((app + d)))" --db "$DATA/$svc.db" \
      --sidecar-inbound "$(p $((admin + 6 + d)))" --sidecar-status "$(p $((admin + 8 + d)))" \
      --register "http://127.0.0.1:$(p 2379)"
    start "$name-sidecar" "$(p $((admin + 6 + d)))" "$ENVOY" -c "$cfg" \
      --base-id "$(p $((admin + d)))" --concurrency 2 -l info
  done
}

# A real Prometheus scraping every Envoy's admin /stats/prometheus
# (deploy/prometheus.yml, with the current ports and instances).
prometheus_up() {
  command -v "${PROMETHEUS_BIN:-prometheus}" >/dev/null || {
    say "ERROR: prometheus not found: install the Debian package prometheus (scripts/setup.sh --prometheus)"; exit 1; }
  local cfg=$RUN/prometheus.yml
  {
    echo "# rendered by scripts/shop.sh from deploy/prometheus.yml"
    echo "global: {scrape_interval: 2s, evaluation_interval: 2s}"
    echo "scrape_configs:"
    echo "- job_name: txmesh"
    echo "  metrics_path: /stats/prometheus"
    echo "  static_configs:"
    echo "  - {targets: [\"127.0.0.1:$(p 9901)\"], labels: {sidecar: ingress}}"
    echo "  - {targets: [\"127.0.0.1:$(p 15000)\"], labels: {sidecar: order}}"
    for k in $(seq 1 "${PAYMENT_INSTANCES:-1}"); do
      echo "  - {targets: [\"127.0.0.1:$(p $((15100 + (k - 1) * 10)))\"], labels: {sidecar: payment-$k}}"
    done
    for k in $(seq 1 "${INVENTORY_INSTANCES:-1}"); do
      echo "  - {targets: [\"127.0.0.1:$(p $((15200 + (k - 1) * 10)))\"], labels: {sidecar: inventory-$k}}"
    done
  } >"$cfg"
  start prometheus "$(p 9090)" "${PROMETHEUS_BIN:-prometheus}" --config.file="$cfg" \
    --storage.tsdb.path="$DATA/prometheus" --web.listen-address="127.0.0.1:$(p 9090)" --log.level=warn
  say "Prometheus: http://127.0.0.1:$(p 9090) (try the query txmesh_requests_total; Grafana: deploy/grafana/)"
}

build() {
  [ "${TXMESH_SKIP_BUILD:-0}" = 1 ] && return 0
  scripts/setup.sh
  say "building the filters (release wasm) and the shop (profile bench-native)..."
  scripts/build-wasm.sh txmesh-metrics txmesh-txn txmesh-router txmesh-authz >/dev/null
  if [ "$HOST" = native ]; then
    say "building the native module (profile native): target/native/libtxmesh.so"
    cargo build --quiet --profile native -p txmesh-native
  fi
  cargo build --quiet --profile bench-native -p txmesh-shop
}

up() {
  build
  mkdir -p "$RUN" "$DATA"
  configs
  start etcd "$(p 2379)" "$ETCD" --name shop --data-dir "$DATA/etcd" \
    --listen-client-urls "http://127.0.0.1:$(p 2379)" --advertise-client-urls "http://127.0.0.1:$(p 2379)" \
    --listen-peer-urls "http://127.0.0.1:$(p 2380)" --initial-advertise-peer-urls "http://127.0.0.1:$(p 2380)" \
    --initial-cluster "shop=http://127.0.0.1:$(p 2380)" --log-level warn --logger zap \
    --auto-compaction-mode periodic --auto-compaction-retention 1h --quota-backend-bytes 2147483648
  # Identities (mTLS between the sidecars): re-created when missing or expiring.
  scripts/certs.sh --out "$HOME_DIR/certs" order payment inventory ingress | sed 's/^/  /'
  local reg="http://127.0.0.1:$(p 2379)"
  start order "$(p 18080)" "$SHOP_BIN" order --port "$(p 18080)" --db "$DATA/order.db" \
    --sidecar-inbound "$(p 15006)" --sidecar-outbound "$(p 15001)" --sidecar-status "$(p 15008)" --register "$reg"
  start order-sidecar "$(p 15006)" "$ENVOY" -c "$RUN/order-sidecar.yaml" \
    --base-id "$(p 15000)" --concurrency 2 -l info
  instances payment 18081 15100 "${PAYMENT_INSTANCES:-1}"
  instances inventory 18082 15200 "${INVENTORY_INSTANCES:-1}"
  start ingress "$INGRESS_PORT" "$ENVOY" -c "$RUN/ingress.yaml" --base-id "$(p 9901)" --concurrency 2 -l info
  if [ "${TXMESH_PROMETHEUS:-0}" = 1 ]; then prometheus_up; fi
  cat <<EOF
[shop] ready. Public API: http://127.0.0.1:$INGRESS_PORT
         curl -s -XPOST localhost:$INGRESS_PORT/checkout -d '{"customer":"alice","sku":"widget","qty":1}'
         curl -s localhost:$INGRESS_PORT/accounts/alice    curl -s localhost:$INGRESS_PORT/stock/widget
       admins (Prometheus: /stats/prometheus): ingress :$(p 9901), order :$(p 15000), payment :$(p 15100), inventory :$(p 15200)
       stop: make down (data kept) or make clean (data removed); logs: $RUN/<name>.log
EOF
}

# Whether any process of group $1 is alive.
group_alive() { [ -n "$1" ] && kill -0 -- "-$1" 2>/dev/null; }

# Stops service $1: its process group (the sh and the service, even if one
# of them died first), then the service itself (it may have been orphaned
# out of the group by hand), TERM then KILL.
stop_one() {
  local name=$1 pid pgid
  pid=$(cat "$RUN/$name.pid" 2>/dev/null || true)
  pgid=$(cat "$RUN/$name.pgid" 2>/dev/null || true)
  local alive=0
  if group_alive "$pgid" || { [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; }; then alive=1; fi
  if [ "$alive" = 1 ]; then
    [ -n "$pgid" ] && kill -TERM -- "-$pgid" 2>/dev/null || true
    [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do
      group_alive "$pgid" || { [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; } || break
      sleep 0.1
    done
    [ -n "$pgid" ] && kill -KILL -- "-$pgid" 2>/dev/null || true
    [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null || true
    say "$name stopped (pid ${pid:-?})"
  fi
  rm -f "$RUN/$name.pid" "$RUN/$name.pgid"
}

down() {
  local any=0 names=""
  # etcd last: the services revoke their registry leases on the way out.
  for f in "$RUN"/*.pid "$RUN"/*.pgid; do
    [ -f "$f" ] || continue
    local n; n=$(basename "$f"); n=${n%.pid}; n=${n%.pgid}
    [ "$n" = etcd ] && continue
    case " $names " in *" $n "*) ;; *) names+=" $n" ;; esac
  done
  if [ -f "$RUN/etcd.pid" ] || [ -f "$RUN/etcd.pgid" ]; then names+=" etcd"; fi
  for name in $names; do
    any=1
    stop_one "$name"
  done
  [ "$any" = 1 ] || say "nothing running"
}

status() {
  local names="etcd order payment inventory order-sidecar payment-sidecar inventory-sidecar ingress"
  for f in "$RUN"/*.pid; do
    [ -f "$f" ] || continue
    local n; n=$(basename "$f" .pid)
    case " $names " in *" $n "*) ;; *) names+=" $n" ;; esac
  done
  for name in $names; do
    if running "$name"; then say "$name: running (pid $(cat "$RUN/$name.pid"))"; else say "$name: stopped"; fi
  done
}

demo() {
  down >/dev/null
  rm -rf "$DATA"
  trap 'say "stopping the stack"; down >/dev/null' EXIT
  up
  local rc=0
  # shellcheck disable=SC2086
  "$DEMO_BIN" --ingress "http://127.0.0.1:$INGRESS_PORT" --data "$DATA" \
    --admin "http://127.0.0.1:$(p 15000)" ${DEMO_ARGS:---checkouts 200 --concurrency 8} || rc=$?
  return $rc
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  clean) down; rm -rf "$DATA"; say "data removed" ;;
  demo) demo ;;
  status) status ;;
  *) echo "usage: scripts/shop.sh up|down|clean|demo|status" >&2; exit 2 ;;
esac
