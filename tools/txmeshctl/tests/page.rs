//! The transactions page (`txmeshctl serve`) opened in headless Chromium
//! after real transactions: the rendered DOM shows each one, its outcome,
//! the trace id and one latency bar per transaction.

mod common;

use std::process::Command;
use txmesh_tests::process::ChildGuard;
use txmesh_tests::Client;

fn chromium() -> String {
    std::env::var("CHROMIUM_BIN").unwrap_or_else(|_| "chromium".to_string())
}

#[test]
fn the_page_shows_recent_transactions_in_headless_chromium() {
    let stack = common::Stack::start();
    let (etcd, order_sc) = (&stack.etcd, &stack.order_sc);
    let c = Client::new();
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut ids = Vec::new();
    for i in 0..5 {
        let tp = format!("00-{trace}-00f067aa0ba902b7-01");
        let h: Vec<(&str, &str)> = if i == 0 {
            vec![("traceparent", tp.as_str())]
        } else {
            vec![]
        };
        let r = c.must("POST", &order_sc.inbound_url("/checkout"), &h, b"{}");
        assert_eq!(r.status, 200, "{}", r.text());
        ids.push(r.header("x-txmesh-txn").unwrap().to_string());
    }

    let port = txmesh_tests::ports::free_port();
    let dir = txmesh_tests::scratch_dir("txmeshctl-serve");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_txmeshctl"));
    cmd.args(["--etcd", &etcd.url(), "--sidecar"])
        .arg(stack.sidecars().join(","))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")]);
    let _serve = ChildGuard::spawn("txmeshctl-serve", cmd, &dir, vec![]);
    let url = format!("http://127.0.0.1:{port}/");
    txmesh_tests::wait_for(10, "txmeshctl serve", || {
        c.get(&format!("{url}api/txns"))
            .ok()
            .filter(|r| r.status == 200)
    });
    let api = c.must("GET", &format!("{url}api/txns"), &[], b"").json();
    assert_eq!(api["decided"].as_array().unwrap().len(), 5, "{api}");
    assert!(api["decided"][0]["took_ms"].as_u64().is_some(), "{api}");

    let out = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--virtual-time-budget=5000",
            "--dump-dom",
        ])
        .arg(&url)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}): scripts/setup.sh installs the Debian package chromium",
                chromium()
            )
        });
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(dom.contains("txmesh transactions"), "{dom}");
    for id in &ids {
        assert!(dom.contains(id.as_str()), "{id} not on the page:\n{dom}");
    }
    assert_eq!(
        dom.matches(r#"<td class="committed">committed</td>"#)
            .count(),
        5,
        "{dom}"
    );
    assert_eq!(
        dom.matches(r#"class="bar""#).count(),
        5,
        "one latency bar per transaction:\n{dom}"
    );
    assert!(dom.contains(trace), "{dom}");
    assert!(dom.contains(r#"<span id="n-doubt">0</span>"#), "{dom}");
    assert!(dom.contains(r#"<span id="n-recent">5</span>"#), "{dom}");
    assert!(dom.contains("updated "), "{dom}");
}
