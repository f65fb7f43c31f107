//! The harness itself: processes die with their guards, servers do what they
//! are told, etcd answers, parallel Envoys do not clash.

use serde_json::json;
use std::time::{Duration, Instant};
use txmesh_tests::{Client, Etcd, Filter, Reply, Sidecar, Upstream};

fn alive(pid: u32) -> bool {
    // Signal 0: existence check. A zombie would still count, but the guard reaps.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

#[test]
fn upstream_does_what_the_request_asks() {
    let up = Upstream::start();
    let c = Client::new();
    let url = format!("http://{}/x?y=1", up.addr());
    let t = Instant::now();
    let r = c.must(
        "POST",
        &url,
        &[
            ("x-test-status", "418"),
            ("x-test-delay-ms", "120"),
            ("x-test-body-size", "1000"),
        ],
        b"hello",
    );
    assert!(t.elapsed() >= Duration::from_millis(120));
    assert_eq!(r.status, 418);
    assert_eq!(r.body, vec![b'x'; 1000]);
    let reqs = up.requests_to("/x");
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].method, "POST");
    assert_eq!(reqs[0].path, "/x?y=1");
    assert_eq!(reqs[0].body, b"hello");

    up.set_handler(|_| Reply::status(201).json(json!({"vote": "commit"})));
    let r = c.must("POST", &url, &[], b"");
    assert_eq!(r.status, 201);
    assert_eq!(r.json()["vote"], "commit");
    assert_eq!(up.count(), 2);
}

#[test]
fn envoys_start_in_parallel_and_die_with_their_guard() {
    let app = Upstream::start();
    let (a, b) = std::thread::scope(|s| {
        let h1 = s.spawn(|| {
            Sidecar::new("p1")
                .app(&app)
                .concurrency(1)
                .start()
                .guard
                .pid()
        });
        let h2 = s.spawn(|| {
            Sidecar::new("p2")
                .app(&app)
                .concurrency(1)
                .start()
                .guard
                .pid()
        });
        (h1.join().unwrap(), h2.join().unwrap())
    });
    // Each Envoy was dropped at the end of its thread: both are gone.
    assert_ne!(a, b);
    assert!(!alive(a) && !alive(b));

    let e = Sidecar::new("p3")
        .app(&app)
        .filter(Filter::metrics(json!({})))
        .start();
    let r = Client::new().must("GET", &e.inbound_url("/hi"), &[], b"");
    assert_eq!(r.status, 200);
    let pid = e.guard.pid();
    assert!(alive(pid));
    drop(e);
    assert!(!alive(pid));
}

#[test]
fn envoy_is_killed_when_the_test_panics() {
    let app = Upstream::start();
    let pid = std::sync::Mutex::new(0u32);
    let result = std::panic::catch_unwind(|| {
        let e = Sidecar::new("doomed").app(&app).concurrency(1).start();
        *pid.lock().unwrap() = e.guard.pid();
        panic!("test failure while envoy runs");
    });
    assert!(result.is_err());
    let pid = *pid.lock().unwrap();
    assert!(pid > 0);
    assert!(!alive(pid), "envoy {pid} survived a panicking test");
}

#[test]
fn etcd_starts_and_answers() {
    let etcd = Etcd::start();
    assert_eq!(etcd.get("txmesh/x"), None);
    etcd.put("txmesh/x", "1");
    etcd.put("txmesh/y", "2");
    etcd.put("other", "3");
    assert_eq!(etcd.get("txmesh/x").as_deref(), Some("1"));
    assert_eq!(
        etcd.list("txmesh/"),
        vec![
            ("txmesh/x".into(), "1".into()),
            ("txmesh/y".into(), "2".into())
        ]
    );
    let pid = etcd.guard.pid();
    drop(etcd);
    assert!(!alive(pid));
}

#[test]
fn an_etcd_cluster_keeps_its_data_across_member_restarts() {
    let mut c = txmesh_tests::EtcdCluster::start(3);
    c.any().put("txmesh/decisions/a", "1");
    for i in 0..3 {
        c.kill(i);
        // Two members keep quorum: writes go on (after an election, if the
        // leader was killed).
        let alive = &c.members[(i + 1) % 3];
        alive.put_retrying(&format!("txmesh/decisions/k{i}"), "x");
        c.restart(i);
    }
    let all = c.any().list("txmesh/decisions/");
    assert_eq!(all.len(), 4, "{all:?}");
    for m in &c.members {
        txmesh_tests::wait_for(30, "member caught up", || {
            (m.list("txmesh/decisions/").len() == 4).then_some(())
        });
    }
}
