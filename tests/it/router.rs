//! txmesh_router.wasm on real Envoy, real etcd and real upstream servers:
//! registry watch, strategies, zone preference, ejection, the header hand-off
//! to ORIGINAL_DST and override_host, metrics.

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use txmesh_tests::envoy::{original_dst_cluster, override_host_cluster, Envoy};
use txmesh_tests::{Client, Etcd, Filter, Reply, Sidecar, Upstream};

mod common;

const HDR: &str = "x-txmesh-endpoint";

fn router_cfg(services: Value) -> Value {
    json!({"poll_interval_ms": 200, "services": services})
}

/// A client-side Envoy with the router on its outbound listener and one
/// ORIGINAL_DST cluster per service.
fn sidecar(etcd: &Etcd, cfg: Value, services: &[&str]) -> Envoy {
    let mut s = Sidecar::new("client")
        .etcd(etcd)
        .outbound_filter(Filter::router(cfg));
    for svc in services {
        s = s.route_cluster(original_dst_cluster(svc, HDR));
    }
    s.start()
}

/// Sends `n` requests to `service` through `envoy`; every one must succeed.
fn send(c: &Client, envoy: &Envoy, service: &str, n: usize, headers: &[(&str, &str)]) {
    for _ in 0..n {
        let mut h = vec![("host", service)];
        h.extend_from_slice(headers);
        let r = c.must("GET", &envoy.outbound_url("/x"), &h, b"");
        assert_eq!(r.status, 200, "{}", r.text());
    }
}

fn served(ups: &[Upstream]) -> Vec<usize> {
    ups.iter().map(|u| u.requests().len()).collect()
}

/// Waits until every one of `ups` has been routed to at least once, sending
/// requests meanwhile (the registry is read every 200 ms).
fn wait_routed(c: &Client, envoy: &Envoy, service: &str, ups: &[&Upstream], secs: u64) {
    txmesh_tests::wait_for(secs, "traffic to the registered instances", || {
        let _ = c.request(
            "GET",
            &envoy.outbound_url("/warm"),
            &[("host", service)],
            b"",
        );
        ups.iter().all(|u| !u.requests().is_empty()).then_some(())
    });
}

/// Waits until a burst of `n` requests to `payment` is served exactly as
/// `expected` (per upstream), sending a fresh burst each time: the router's view has
/// caught up with a change (a registry update, an ejection's end).
/// Returns how long that took.
fn wait_served(
    c: &Client,
    envoy: &Envoy,
    ups: &[Upstream],
    n: usize,
    expected: &[usize],
    secs: u64,
) -> Duration {
    let t = Instant::now();
    let mut last = Vec::new();
    let what = format!("{n} requests served as {expected:?}");
    txmesh_tests::wait_for(secs, &what, || {
        reset(ups);
        for _ in 0..n {
            let _ = c.request(
                "GET",
                &envoy.outbound_url("/x"),
                &[("host", "payment")],
                b"",
            );
        }
        last = served(ups);
        (last == expected).then_some(())
    });
    t.elapsed()
}

fn reset(ups: &[Upstream]) {
    for u in ups {
        u.clear();
    }
}

#[test]
fn weighted_90_10_round_robin_even_and_forged_header_ignored() {
    let etcd = Etcd::start();
    let pay: Vec<Upstream> = (0..2).map(|_| Upstream::start()).collect();
    let inv: Vec<Upstream> = (0..3).map(|_| Upstream::start()).collect();
    let rogue = Upstream::start();
    etcd.register(
        "payment",
        pay[0].addr(),
        json!({"weight": 90, "version": "v1"}),
        0,
    );
    etcd.register(
        "payment",
        pay[1].addr(),
        json!({"weight": 10, "version": "v2"}),
        0,
    );
    for u in &inv {
        etcd.register("inventory", u.addr(), json!({}), 0);
    }
    let envoy = sidecar(
        &etcd,
        router_cfg(json!({
            "payment": {"strategy": "weighted"},
            "inventory": {"strategy": "round_robin"},
        })),
        &["payment", "inventory"],
    );
    let c = Client::keep_alive();
    wait_routed(&c, &envoy, "payment", &[&pay[0], &pay[1]], 10);
    wait_routed(&c, &envoy, "inventory", &[&inv[0], &inv[1], &inv[2]], 10);
    reset(&pay);
    reset(&inv);
    let before = envoy.scrape();

    // A forged pick is overwritten: the rogue server never sees a request.
    let forged = rogue.addr().to_string();
    send(&c, &envoy, "payment", 2000, &[(HDR, &forged)]);
    send(&c, &envoy, "inventory", 2001, &[(HDR, &forged)]);
    assert_eq!(rogue.requests().len(), 0);

    let p = served(&pay);
    let share = p[0] as f64 / 2000.0 * 100.0;
    assert!((87.0..=93.0).contains(&share), "90/10 split came out {p:?}");
    assert_eq!(p[0] + p[1], 2000);
    let i = served(&inv);
    for n in &i {
        assert!(
            (653..=681).contains(n),
            "round robin within ±2% of 667: {i:?}"
        );
    }
    // The app never sees the routing header's forged value.
    assert!(pay[0]
        .requests()
        .iter()
        .all(|r| r.header(HDR).as_deref() != Some(forged.as_str())));

    // Per-endpoint metrics with real labels, exact.
    let after = envoy.scrape_until("router requests counted", |s| {
        s.sum("txmesh_router_requests_total", &[("service", "payment")])
            - before.sum("txmesh_router_requests_total", &[("service", "payment")])
            == 2000.0
    });
    for (u, n) in pay.iter().zip(&p) {
        let l = [
            ("service", "payment"),
            ("endpoint", &*u.addr().to_string()),
            ("zone", "none"),
        ];
        let d = |m: &str| after.sum(m, &l) - before.sum(m, &l);
        assert_eq!(d("txmesh_router_picks_total"), *n as f64);
        assert_eq!(d("txmesh_router_requests_total"), *n as f64);
        assert_eq!(d("txmesh_router_errors_total"), 0.0);
    }
    assert_eq!(
        after.sum("txmesh_router_endpoints", &[("service", "inventory")]),
        3.0
    );
}

#[test]
fn instances_join_and_leave_by_lease_within_two_seconds() {
    let etcd = Etcd::start();
    let ups: Vec<Upstream> = (0..3).map(|_| Upstream::start()).collect();
    let lease1 = etcd.lease_grant(60);
    etcd.register("payment", ups[0].addr(), json!({}), lease1);
    let envoy = sidecar(
        &etcd,
        router_cfg(json!({"payment": {"strategy": "round_robin"}})),
        &["payment"],
    );
    let c = Client::keep_alive();
    wait_routed(&c, &envoy, "payment", &[&ups[0]], 10);

    // Joins: traffic within 2 s.
    let lease2 = etcd.lease_grant(60);
    etcd.register("payment", ups[1].addr(), json!({}), lease2);
    let t = Instant::now();
    wait_routed(&c, &envoy, "payment", &[&ups[1]], 2);
    println!("joined after {:?}", t.elapsed());

    // Revoked: no traffic within 2 s.
    etcd.lease_revoke(lease1);
    let left = wait_served(&c, &envoy, &ups, 20, &[0, 20, 0], 10);
    println!("left after {left:?}");
    assert!(left < Duration::from_secs(3), "left after {left:?}");

    // Expired: a 2 s lease nobody keeps alive.
    let short = etcd.lease_grant(2);
    etcd.register("payment", ups[2].addr(), json!({}), short);
    wait_routed(&c, &envoy, "payment", &[&ups[2]], 2);
    let key = txmesh_tests::etcd::registry_key("payment", ups[2].addr());
    txmesh_tests::wait_for(15, "the lease to expire", || {
        etcd.get(&key).is_none().then_some(())
    });
    wait_served(&c, &envoy, &ups, 20, &[0, 20, 0], 10);

    // The last instance leaves: a clear 503.
    etcd.lease_revoke(lease2);
    let r = txmesh_tests::wait_for(10, "a 503 once nobody is registered", || {
        let r = c.must(
            "GET",
            &envoy.outbound_url("/x"),
            &[("host", "payment")],
            b"",
        );
        (r.status == 503).then_some(r)
    });
    assert_eq!(
        r.json(),
        json!({"error": "no endpoints", "service": "payment"})
    );
    assert_eq!(r.header("x-txmesh-router"), Some("no-endpoint"));
}

/// The registry's own stats are exact: one update per generation the poller
/// published (each logged once), no error, and the endpoints gauge follows
/// the table. On the native host these are recorded by the main thread's
/// poller (config-level stats), so a wrong call shows here.
#[test]
fn registry_updates_and_the_endpoints_gauge_are_exact() {
    let etcd = Etcd::start();
    let ups: Vec<Upstream> = (0..3).map(|_| Upstream::start()).collect();
    etcd.register("payment", ups[0].addr(), json!({}), 0);
    etcd.register("payment", ups[1].addr(), json!({}), 0);
    let envoy = sidecar(
        &etcd,
        router_cfg(json!({"payment": {"strategy": "round_robin"}})),
        &["payment"],
    );
    let c = Client::keep_alive();
    wait_routed(&c, &envoy, "payment", &[&ups[0], &ups[1]], 10);
    let stats = |generations: usize, endpoints: f64| {
        let what = format!("{generations} registry update(s), {endpoints} endpoints");
        txmesh_tests::wait_for(10, &what, || {
            let s = envoy.scrape();
            let got = (
                s.sum("txmesh_router_registry_updates_total", &[]),
                s.sum("txmesh_router_endpoints", &[("service", "payment")]),
            );
            (got == (generations as f64, endpoints)).then_some(())
        });
        let log = envoy.log();
        assert_eq!(
            log.matches("registry generation ").count(),
            generations,
            "{log}"
        );
        assert_eq!(
            envoy
                .scrape()
                .sum("txmesh_router_registry_errors_total", &[]),
            0.0
        );
    };
    stats(1, 2.0);
    etcd.register("payment", ups[2].addr(), json!({}), 0);
    wait_routed(&c, &envoy, "payment", &[&ups[2]], 10);
    stats(2, 3.0);
}

#[test]
fn zone_preference_stays_local_and_spills_over_on_ejection() {
    let etcd = Etcd::start();
    let ups: Vec<Upstream> = (0..3).map(|_| Upstream::start()).collect();
    etcd.register("payment", ups[0].addr(), json!({"zone": "z1"}), 0);
    etcd.register("payment", ups[1].addr(), json!({"zone": "z1"}), 0);
    etcd.register("payment", ups[2].addr(), json!({"zone": "z2"}), 0);
    let mut cfg = router_cfg(json!({"payment": {
        "strategy": "round_robin",
        "zone_preference": true,
        "outlier": {"consecutive_failures": 2, "max_ejection_percent": 100, "base_ejection_ms": 60000},
    }}));
    cfg["local_zone"] = json!("z1");
    let envoy = sidecar(&etcd, cfg, &["payment"]);
    let c = Client::keep_alive();
    wait_routed(&c, &envoy, "payment", &[&ups[0], &ups[1]], 10);
    reset(&ups);
    send(&c, &envoy, "payment", 100, &[]);
    assert_eq!(served(&ups), vec![50, 50, 0]);

    // The local zone fails: both ejected after two failures each, then z2.
    for u in &ups[..2] {
        u.set_handler(|_| Reply::status(503));
    }
    reset(&ups);
    let mut codes = BTreeMap::new();
    for _ in 0..4 {
        let r = c.must(
            "GET",
            &envoy.outbound_url("/x"),
            &[("host", "payment")],
            b"",
        );
        *codes.entry(r.status).or_insert(0) += 1;
    }
    assert_eq!(codes, BTreeMap::from([(503, 4)]));
    send(&c, &envoy, "payment", 30, &[]);
    assert_eq!(served(&ups), vec![2, 2, 30]);
    envoy.scrape_counts(&[
        (
            "txmesh_router_ejections_total",
            &[("service", "payment"), ("zone", "z1")],
            2.0,
        ),
        (
            "txmesh_router_picks_total",
            &[("service", "payment"), ("zone", "z2")],
            30.0,
        ),
    ]);
}

#[test]
fn a_failing_endpoint_is_ejected_and_comes_back() {
    let etcd = Etcd::start();
    let ups: Vec<Upstream> = (0..3).map(|_| Upstream::start()).collect();
    for u in &ups {
        etcd.register("payment", u.addr(), json!({}), 0);
    }
    let envoy = sidecar(
        &etcd,
        router_cfg(json!({"payment": {
            "strategy": "round_robin",
            "outlier": {"consecutive_failures": 3, "base_ejection_ms": 2000},
        }})),
        &["payment"],
    );
    let c = Client::keep_alive();
    wait_routed(&c, &envoy, "payment", &[&ups[0], &ups[1], &ups[2]], 10);
    ups[0].set_handler(|_| Reply::status(503));
    reset(&ups);
    let mut failures = 0;
    for _ in 0..60 {
        let r = c.must(
            "GET",
            &envoy.outbound_url("/x"),
            &[("host", "payment")],
            b"",
        );
        if r.status == 503 {
            failures += 1;
        }
    }
    // Exactly the configured failures reach it, then nothing.
    assert_eq!(failures, 3);
    assert_eq!(served(&ups)[0], 3);
    let l = [
        ("service", "payment"),
        ("endpoint", &*ups[0].addr().to_string()),
    ];
    envoy.scrape_counts(&[
        ("txmesh_router_ejections_total", &l, 1.0),
        ("txmesh_router_errors_total", &l, 3.0),
    ]);
    assert!(envoy.log().contains(&format!(
        "ejected payment endpoint {} for 2000 ms (ejection 1 in a row) after 3 consecutive failures",
        ups[0].addr()
    )));

    // Healthy again; after its ejection time it gets its share back.
    ups[0].set_handler(|_| Reply::ok());
    let back = wait_served(&c, &envoy, &ups, 30, &[10, 10, 10], 10);
    println!("back in rotation {back:?} after it recovered (ejected for 2 s)");
}

#[test]
fn an_unreachable_endpoint_is_ejected_on_connect_failures() {
    let etcd = Etcd::start();
    let up = Upstream::start();
    // Nothing listens on the second address.
    let dead: SocketAddr = format!("127.0.0.1:{}", txmesh_tests::ports::free_port())
        .parse()
        .unwrap();
    etcd.register("payment", up.addr(), json!({}), 0);
    etcd.register("payment", dead, json!({}), 0);
    let envoy = sidecar(
        &etcd,
        router_cfg(json!({"payment": {
            "strategy": "round_robin",
            "outlier": {"consecutive_failures": 2},
        }})),
        &["payment"],
    );
    let c = Client::keep_alive();
    wait_routed(&c, &envoy, "payment", &[&up], 10);
    let mut codes = BTreeMap::new();
    for _ in 0..30 {
        let r = c.must(
            "GET",
            &envoy.outbound_url("/x"),
            &[("host", "payment")],
            b"",
        );
        *codes.entry(r.status).or_insert(0) += 1;
    }
    // At most the two failures that eject it (one may have happened while warming up).
    assert!(codes.get(&503).copied().unwrap_or(0) <= 2, "{codes:?}");
    let l = [("service", "payment"), ("endpoint", &*dead.to_string())];
    envoy.scrape_counts(&[
        ("txmesh_router_ejections_total", &l, 1.0),
        ("txmesh_router_errors_total", &l, 2.0),
    ]);
}

#[test]
fn peak_ewma_starves_a_slow_endpoint_round_robin_does_not() {
    let etcd = Etcd::start();
    let ups: Vec<Upstream> = (0..5)
        .map(|i| {
            Upstream::with(move |_| {
                Reply::ok().delay(Duration::from_millis(if i == 0 { 50 } else { 0 }))
            })
        })
        .collect();
    for u in &ups {
        etcd.register("payment", u.addr(), json!({}), 0);
        etcd.register("inventory", u.addr(), json!({}), 0);
    }
    let envoy = sidecar(
        &etcd,
        router_cfg(json!({
            "payment": {"strategy": "peak_ewma"},
            "inventory": {"strategy": "round_robin"},
        })),
        &["payment", "inventory"],
    );
    let c = Client::keep_alive();
    envoy.wait_outbound_ok(&c, "payment");
    reset(&ups);
    send(&c, &envoy, "payment", 400, &[]);
    let ewma = served(&ups);
    reset(&ups);
    send(&c, &envoy, "inventory", 400, &[]);
    let rr = served(&ups);
    println!("peak_ewma {ewma:?}, round_robin {rr:?}");
    assert_eq!(rr, vec![80; 5]);
    assert!(ewma[0] <= 8, "slow endpoint got {} of 400", ewma[0]);
    let s = envoy.scrape();
    let slow = s.sum(
        "txmesh_router_ewma_latency_milliseconds",
        &[
            ("service", "inventory"),
            ("endpoint", &*ups[0].addr().to_string()),
        ],
    );
    assert!(slow >= 40.0, "ewma of the slow endpoint: {slow}");
}

#[test]
fn override_host_cluster_and_registry_outage() {
    let mut etcd = Etcd::start();
    let ups: Vec<Upstream> = (0..2).map(|_| Upstream::start()).collect();
    for u in &ups {
        etcd.register("payment", u.addr(), json!({}), 0);
    }
    let addrs: Vec<SocketAddr> = ups.iter().map(Upstream::addr).collect();
    let envoy = Sidecar::new("client")
        .etcd(&etcd)
        .outbound_filter(Filter::router(router_cfg(
            json!({"payment": {"strategy": "round_robin"}}),
        )))
        .route_cluster(override_host_cluster("payment", &addrs, HDR))
        .start();
    let c = Client::keep_alive();
    wait_routed(&c, &envoy, "payment", &[&ups[0], &ups[1]], 10);
    reset(&ups);
    send(&c, &envoy, "payment", 40, &[(HDR, "10.9.9.9:1")]);
    assert_eq!(served(&ups), vec![20, 20]);

    // etcd goes away: the last table keeps routing; the outage is counted and logged once.
    etcd.stop();
    txmesh_tests::wait_for(10, "the registry outage counted", || {
        (envoy
            .scrape()
            .sum("txmesh_router_registry_errors_total", &[])
            >= 2.0)
            .then_some(())
    });
    reset(&ups);
    send(&c, &envoy, "payment", 10, &[]);
    assert_eq!(served(&ups), vec![5, 5]);
    let s = envoy.scrape();
    assert!(s.sum("txmesh_router_registry_errors_total", &[]) >= 2.0);
    let log = envoy.log();
    assert_eq!(
        log.matches("registry unreachable").count(),
        1,
        "logged once per outage:\n{log}"
    );
    assert!(log.contains("keeping the last table: 2 endpoints"), "{log}");
}

/// A registry that hangs (etcd stopped with SIGSTOP, connections open but
/// no answer) costs each poll its deadline, never the poller: reads keep
/// failing on time and the last table keeps routing; once etcd answers
/// again the next change is picked up. On the native host the deadline is
/// enforced from the main thread's tick.
#[test]
fn a_hung_registry_costs_each_poll_its_deadline_and_no_more() {
    let etcd = Etcd::start();
    let ups: Vec<Upstream> = (0..2).map(|_| Upstream::start()).collect();
    etcd.register("payment", ups[0].addr(), json!({}), 0);
    let mut cfg = router_cfg(json!({"payment": {"strategy": "round_robin"}}));
    cfg["poll_timeout_ms"] = json!(300);
    let envoy = sidecar(&etcd, cfg, &["payment"]);
    let c = Client::keep_alive();
    wait_routed(&c, &envoy, "payment", &[&ups[0]], 10);
    etcd.guard.signal(libc::SIGSTOP);
    let errors = || {
        envoy
            .scrape()
            .sum("txmesh_router_registry_errors_total", &[])
    };
    // Several failed reads: each poll ended at its deadline and the next
    // one started (every 200 ms + 300 ms).
    let t = Instant::now();
    txmesh_tests::wait_for(10, "three failed registry reads", || {
        (errors() >= 3.0).then_some(())
    });
    println!("three failed reads {:?} into the stall", t.elapsed());
    reset(&ups);
    send(&c, &envoy, "payment", 5, &[]);
    assert_eq!(served(&ups), vec![5, 0], "the last table routes");
    etcd.guard.signal(libc::SIGCONT);
    etcd.register("payment", ups[1].addr(), json!({}), 0);
    wait_routed(&c, &envoy, "payment", &[&ups[1]], 10);
    let log = envoy.log();
    assert_eq!(log.matches("registry unreachable").count(), 1, "{log}");
    assert!(log.contains("registry reachable again"), "{log}");
}

#[test]
fn bad_router_config_is_refused_with_the_field() {
    let etcd = Etcd::start();
    let cfg = json!({"services": {"payment": {"strategy": "fastest"}}});
    let err = Sidecar::new("client")
        .etcd(&etcd)
        .outbound_filter(Filter::router(cfg))
        .route_cluster(original_dst_cluster("payment", HDR))
        .try_start()
        .err()
        .expect("Envoy must refuse the config");
    assert!(
        err.contains("invalid plugin configuration at `services.payment.strategy`: unknown variant `fastest`"),
        "{err}"
    );
}

/// Two payment instances behind the router: every participant instance gets
/// prepare and commit for exactly the transactions it worked on (the txn
/// filter pins control calls to the routed instance).
#[test]
fn transactions_follow_the_routed_instance() {
    use std::sync::{Arc, RwLock};
    use txmesh_tests::{Downstream, TxnApp, Vote};
    let etcd = Etcd::start();
    let p1 = TxnApp::start("payment", Vote::Commit);
    let p2 = TxnApp::start("payment", Vote::Commit);
    let inv = TxnApp::start("inventory", Vote::Commit);
    let p1_sc = common::sidecar("payment", &p1, etcd.addr()).start();
    let p2_sc = common::sidecar("payment", &p2, etcd.addr()).start();
    let inv_sc = common::sidecar("inventory", &inv, etcd.addr()).start();
    for sc in [&p1_sc, &p2_sc] {
        etcd.register("payment", sc.inbound_addr(), json!({}), 0);
    }
    let calls = Arc::new(RwLock::new(Vec::new()));
    let order = TxnApp::calling("order", Vote::Commit, calls.clone());
    let txn = Filter::txn(common::txn_cfg("order"));
    let order_sc = Sidecar::new("order")
        .app(&order.server)
        .etcd(&etcd)
        .inbound_filter(txn.clone())
        .outbound_filter(Filter::router(router_cfg(
            json!({"payment": {"strategy": "round_robin"}}),
        )))
        .outbound_filter(txn)
        .route_cluster(original_dst_cluster("payment", HDR))
        .route("inventory", &[inv_sc.inbound_addr()])
        .start();
    *calls.write().unwrap() = Downstream::each(&["payment", "inventory"], order_sc.ports.outbound);
    let c = Client::new();
    let checkout = || {
        c.must(
            "POST",
            &order_sc.inbound_url("/checkout"),
            &[("content-type", "application/json")],
            b"{}",
        )
    };
    txmesh_tests::wait_for(10, "the router to know payment", || {
        (checkout().status == 200).then_some(())
    });
    for _ in 0..20 {
        let r = checkout();
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(r.header("x-txmesh-outcome"), Some("committed"));
    }
    // Phase 2 runs after the answer: wait for the commits.
    txmesh_tests::wait_for(10, "every commit", || {
        let all: Vec<_> = p1
            .records()
            .into_values()
            .chain(p2.records().into_values())
            .collect();
        all.iter()
            .all(|r| r.commits > 0 || r.business == 0)
            .then_some(())
    });
    let (r1, r2) = (p1.records(), p2.records());
    assert!(
        r1.len() >= 10 && r2.len() >= 10,
        "{} / {}",
        r1.len(),
        r2.len()
    );
    for (txn, rec) in r1.iter().chain(r2.iter()) {
        assert_eq!(
            (rec.business, rec.prepares, rec.commits, rec.aborts),
            (1, 1, 1, 0),
            "txn {txn} on one payment instance: {rec:?}"
        );
    }
    assert!(r1.keys().all(|t| !r2.contains_key(t)));
}
