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
        // The last one is refused by payment (an abort with a record).
        if i == 4 {
            stack
                .payment
                .set_vote(txmesh_tests::Vote::No("insufficient_funds".into()));
        }
        let tp = format!("00-{trace}-00f067aa0ba902b7-01");
        let h: Vec<(&str, &str)> = if i == 0 {
            vec![("traceparent", tp.as_str())]
        } else {
            vec![]
        };
        let r = c.must("POST", &order_sc.inbound_url("/checkout"), &h, b"{}");
        assert_eq!(r.status, if i == 4 { 409 } else { 200 }, "{}", r.text());
        ids.push(r.header("x-txmesh-txn").unwrap().to_string());
    }
    txmesh_tests::wait_for(10, "the abort's record", || {
        (etcd.count("txmesh/decisions/") == 5).then_some(())
    });

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
    // Every one took measurable time, the abort included.
    for d in api["decided"].as_array().unwrap() {
        assert!(d["took_ms"].as_u64().is_some(), "{d}");
    }
    let sm = &api["summary"];
    assert_eq!(
        (sm["committed"].as_u64(), sm["aborted"].as_u64()),
        (Some(4), Some(1)),
        "{sm}"
    );
    assert_eq!(
        sm["aborted_by_participant"],
        serde_json::json!({"payment": 1}),
        "{sm}"
    );
    assert_eq!(sm["took_ms"]["n"], 5, "{sm}");

    let out = headless(&["--dump-dom"], &url);
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(dom.contains("txmesh transactions"), "{dom}");
    for id in &ids {
        assert!(dom.contains(id.as_str()), "{id} not on the page:\n{dom}");
    }
    assert_eq!(
        dom.matches(r#"<td class="committed">committed</td>"#)
            .count(),
        4,
        "{dom}"
    );
    assert!(
        dom.contains("vote_abort (payment: insufficient_funds)"),
        "{dom}"
    );
    assert_eq!(
        dom.matches(r#"class="bar""#).count(),
        5,
        "one latency bar per transaction:\n{dom}"
    );
    // The summary, the plot's axes (ticks, unit, direction) and percentiles.
    assert!(
        dom.contains(r#"<td id="s-committed" class="committed">4</td>"#),
        "{dom}"
    );
    assert!(
        dom.contains(r#"<td id="s-participants">payment 1</td>"#),
        "{dom}"
    );
    assert!(dom.contains(r#"<td id="s-took">p50 "#), "{dom}");
    assert_eq!(dom.matches(r#"class="axis-line""#).count(), 2, "{dom}");
    assert!(dom.contains("5 transactions, oldest → newest"), "{dom}");
    assert!(
        dom.contains(r#"class="pct""#) && dom.contains(">p99 "),
        "{dom}"
    );
    assert!(dom.contains(trace), "{dom}");
    assert!(dom.contains(r#"<span id="n-doubt">0</span>"#), "{dom}");
    assert!(dom.contains(r#"<span id="n-recent">5</span>"#), "{dom}");
    assert!(dom.contains("updated "), "{dom}");

    // A screenshot for people to look at: target/txmesh-page.png.
    let png = txmesh_tests::workspace_root().join("target/txmesh-page.png");
    let shot = headless(
        &[
            "--window-size=1000,1000",
            &format!("--screenshot={}", png.display()),
        ],
        &url,
    );
    assert!(
        shot.status.success(),
        "{}",
        String::from_utf8_lossy(&shot.stderr)
    );
    assert!(
        std::fs::metadata(&png).is_ok_and(|m| m.len() > 10_000),
        "no screenshot at {}",
        png.display()
    );
}

/// Headless Chromium on `url` with `extra` flags, after 5 s of virtual time
/// (the page's first refresh).
fn headless(extra: &[&str], url: &str) -> std::process::Output {
    Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--virtual-time-budget=5000",
        ])
        .args(extra)
        .arg(url)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}): scripts/setup.sh installs the Debian package chromium",
                chromium()
            )
        })
}
