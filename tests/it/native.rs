//! The native module (libtxmesh.so) in real Envoy: it loads with its ABI
//! version matched, refuses what it cannot run with a clear error, and its
//! Prometheus output is the wasm filter's. The filters' behaviour itself runs
//! through `tests/it/security.rs` (authz), `tests/it/metrics.rs` and
//! `tests/it/router.rs` on both hosts (`TXMESH_HOST=native`).
//!
//! On another Envoy than 1.40 (`make test-matrix` sets `ENVOY_BIN`), the
//! load test checks the opposite: a clean refusal, not a crash.

use serde_json::json;
use std::collections::BTreeMap;
use txmesh_tests::envoy::original_dst_cluster;
use txmesh_tests::{Client, Filter, Sidecar, Upstream};

fn envoy_minor() -> String {
    let out = std::process::Command::new(txmesh_tests::envoy_bin())
        .arg("--version")
        .output()
        .expect("envoy --version");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    // ".../1.40.0/Clean/RELEASE/..."
    text.split('/')
        .find(|p| p.matches('.').count() == 2 && p.starts_with("1."))
        .map(|v| v.rsplit_once('.').map_or(v, |(mm, _)| mm).to_string())
        .unwrap_or_else(|| panic!("no version in {text:?}"))
}

fn policy() -> serde_json::Value {
    json!({"default": "allow", "rules": [{"name": "no-admin", "action": "deny", "paths": ["/admin/"]}]})
}

#[test]
fn the_module_loads_with_its_abi_matched_or_refuses_cleanly() {
    txmesh_tests::native_module();
    let app = Upstream::start();
    let minor = envoy_minor();
    let mut filter = Filter::native("authz", policy());
    // Before 1.39 Envoy's DynamicModuleConfig has no `metrics_namespace`:
    // it would refuse the config before opening the module, and the
    // module's own version probe would go untested.
    let older = minor
        .strip_prefix("1.")
        .and_then(|m| m.parse::<u32>().ok())
        .is_some_and(|m| m < 39);
    if older {
        if let Some(c) = filter.0["typed_config"]["dynamic_module_config"].as_object_mut() {
            c.remove("metrics_namespace");
        }
    }
    let started = Sidecar::new("payment")
        .app(&app)
        .inbound_filter(filter)
        .try_start();
    if minor == "1.40" {
        let envoy = started.unwrap_or_else(|log| panic!("the module must load on 1.40:\n{log}"));
        let log = envoy.log();
        assert!(
            log.contains("Dynamic module ABI version v0.2.0 matched"),
            "{log}"
        );
        assert!(!log.contains("deprecated"), "{log}");
        assert!(
            log.contains("txmesh native filter \"authz\" configured"),
            "{log}"
        );
        let r = Client::new().must("GET", &envoy.inbound_url("/admin/x"), &[], b"");
        assert_eq!(r.status, 403);
    } else {
        let log = started
            .err()
            .unwrap_or_else(|| panic!("Envoy {minor} must refuse a module built for 1.40"));
        assert!(
            log.contains("envoy exited with exit status: 1"),
            "a crash, not a refusal:\n{log}"
        );
        // Refused by the module's version probe (1.39 has every callback
        // it links against), or already by the loader: older Envoys lack
        // some of them, and Envoy reports the failed dlopen.
        let why = log
            .lines()
            .find(|l| {
                l.contains("libtxmesh.so: this module is built for Envoy 1.40")
                    || l.contains("Failed to load dynamic module")
            })
            .unwrap_or_else(|| panic!("no refusal in the log:\n{log}"));
        // For `make test-matrix`'s table.
        println!("refused by: {why}");
    }
}

#[test]
fn a_bad_filter_name_is_refused_with_the_names_there_are() {
    txmesh_tests::native_module();
    let app = Upstream::start();
    let refused = |name: &str| {
        Sidecar::new("payment")
            .app(&app)
            .inbound_filter(Filter::native(name, json!({})))
            .try_start()
            .err()
            .unwrap_or_else(|| panic!("Envoy must refuse filter_name {name:?}"))
    };
    let log = refused("authorisation");
    assert!(
        log.contains("txmesh native filter \"authorisation\": unknown filter_name"),
        "{log}"
    );
    assert!(
        log.contains(r#"the module provides "authz", "metrics", "router""#),
        "{log}"
    );
}

/// The recorded series of these names: "name {labels}" -> value (the wasm
/// filters also show defined series at 0; the native ones do not).
fn recorded(scrape: &txmesh_tests::Scrape, names: &[&str]) -> BTreeMap<String, f64> {
    names
        .iter()
        .flat_map(|n| scrape.find(n, &[]))
        .filter(|s| s.value > 0.0)
        .map(|s| (format!("{} {:?}", s.name, s.labels), s.value))
        .collect()
}

/// Starts a sidecar with `filter`, sends `requests` (path, status the app
/// answers), waits until each of `names` sums to one count per request, and
/// returns those series as Prometheus shows them: "name {labels}" -> value
/// (recorded series only: the wasm filter also shows defined ones at 0).
fn series_after(
    app: &Upstream,
    filter: Filter,
    requests: &[(&str, &str)],
    names: &[&str],
) -> BTreeMap<String, f64> {
    let envoy = Sidecar::new("payment")
        .app(app)
        .inbound_filter(filter)
        .start();
    let c = Client::new();
    for (path, status) in requests {
        c.request(
            "GET",
            &envoy.inbound_url(path),
            &[("x-test-status", status)],
            b"",
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }
    let mut seen = BTreeMap::new();
    txmesh_tests::wait_for(10, "every request counted", || {
        let scrape = envoy.scrape();
        seen = recorded(&scrape, names);
        names
            .iter()
            .all(|n| scrape.sum(n, &[]) == requests.len() as f64)
            .then_some(())
    });
    seen
}

#[test]
fn the_metrics_filters_prometheus_output_is_the_wasm_filters() {
    txmesh_tests::native_module();
    txmesh_tests::wasm("txmesh_metrics");
    let app = Upstream::start();
    let requests = [("/x", "200"), ("/x", "200"), ("/x", "404"), ("/x", "503")];
    let names = [
        "txmesh_requests_total",
        "txmesh_request_duration_milliseconds_count",
    ];
    // The native filter is told the workload the wasm filter reads from the
    // node metadata.
    let wasm = series_after(
        &app,
        Filter::wasm("txmesh_metrics", json!({})),
        &requests,
        &names,
    );
    let native = series_after(
        &app,
        Filter::native("metrics", json!({"workload": "payment"})),
        &requests,
        &names,
    );
    assert_eq!(native, wasm);
    assert_eq!(wasm.len(), 6, "{wasm:#?}");
}

#[test]
fn prometheus_names_and_labels_are_the_wasm_filters() {
    txmesh_tests::native_module();
    txmesh_tests::wasm("txmesh_authz");
    let app = Upstream::start();
    let requests = [
        ("/a", "200"),
        ("/b", "200"),
        ("/admin/x", "200"),
        ("/admin/y", "200"),
        ("/admin/z", "200"),
    ];
    let names = ["txmesh_authz_decisions_total"];
    let wasm = series_after(
        &app,
        Filter::wasm("txmesh_authz", policy()),
        &requests,
        &names,
    );
    let native = series_after(&app, Filter::native("authz", policy()), &requests, &names);
    assert_eq!(native, wasm);
    assert_eq!(wasm.len(), 2, "{wasm:?}");
}

/// The router's series after `extra` requests to `payment` once it routes:
/// "name {labels}" -> value, recorded series only. One worker and round
/// robin, so both hosts pick the same endpoints (`ups`, registered in the
/// registry) in the same order.
fn router_series(ups: &[Upstream], filter: Filter, extra: usize) -> BTreeMap<String, f64> {
    let etcd = txmesh_tests::Etcd::start();
    for u in ups {
        etcd.register("payment", u.addr(), json!({}), 0);
    }
    let envoy = Sidecar::new("client")
        .concurrency(1)
        .etcd(&etcd)
        .outbound_filter(filter)
        .route_cluster(original_dst_cluster("payment", "x-txmesh-endpoint"))
        .start();
    let c = Client::new();
    // Until the registry is read the router answers 503 (counted apart).
    envoy.wait_outbound_ok(&c, "payment");
    for _ in 0..extra {
        let r = c.must(
            "GET",
            &envoy.outbound_url("/x"),
            &[("host", "payment")],
            b"",
        );
        assert_eq!(r.status, 200);
    }
    let served = (extra + 1) as f64;
    let names = [
        "txmesh_router_picks_total",
        "txmesh_router_requests_total",
        "txmesh_router_endpoints",
        "txmesh_router_registry_updates_total",
    ];
    let mut seen = BTreeMap::new();
    txmesh_tests::wait_for(10, "every routed request recorded", || {
        let scrape = envoy.scrape();
        seen = recorded(&scrape, &names);
        (scrape.sum("txmesh_router_requests_total", &[]) == served).then_some(())
    });
    seen
}

#[test]
fn the_routers_prometheus_output_is_the_wasm_routers() {
    txmesh_tests::native_module();
    txmesh_tests::wasm("txmesh_router");
    let cfg =
        json!({"poll_interval_ms": 200, "services": {"payment": {"strategy": "round_robin"}}});
    let ups: Vec<Upstream> = (0..2).map(|_| Upstream::start()).collect();
    let wasm = router_series(&ups, Filter::wasm("txmesh_router", cfg.clone()), 9);
    let native = router_series(&ups, Filter::native("router", cfg), 9);
    assert_eq!(native, wasm);
    // Two endpoints x (picks, requests) + the endpoints gauge + one update.
    assert_eq!(wasm.len(), 6, "{wasm:#?}");
}

/// Envoy shutting down destroys the router's config while its tick thread
/// may be committing to the config's scheduler: the module stops and joins
/// that thread before the scheduler goes. A clean exit (status 0, no crash
/// report) after traffic and ticks.
#[test]
fn envoy_with_the_native_router_shuts_down_cleanly() {
    txmesh_tests::native_module();
    let etcd = txmesh_tests::Etcd::start();
    let up = Upstream::start();
    etcd.register("payment", up.addr(), json!({}), 0);
    let cfg =
        json!({"poll_interval_ms": 100, "services": {"payment": {"strategy": "round_robin"}}});
    let mut envoy = Sidecar::new("client")
        .etcd(&etcd)
        .outbound_filter(Filter::native("router", cfg))
        .route_cluster(original_dst_cluster("payment", "x-txmesh-endpoint"))
        .start();
    envoy.wait_outbound_ok(&Client::new(), "payment");
    envoy.guard.signal(libc::SIGTERM);
    let status = envoy
        .guard
        .wait_exit(20)
        .unwrap_or_else(|| panic!("Envoy did not exit:\n{}", envoy.log()));
    let log = envoy.log();
    assert!(status.success(), "{status}:\n{log}");
    assert!(!log.contains("Caught "), "{log}");
    // The config was destroyed, its tick thread joined, its scheduler deleted.
    assert!(
        log.contains("txmesh native filter \"router\": tick stopped"),
        "{log}"
    );
}
