//! The Grafana dashboard against a real Prometheus: start the shop stack with
//! Prometheus (scripts/shop.sh, as `make up PROMETHEUS=1`), run checkouts, then run every PromQL expression of
//! deploy/grafana/txmesh-dashboard.json and require data from each — no panel
//! is empty or misspelled.

mod shopsh;

use serde_json::Value;
use shopsh::{free_offset, root, ShopStack};

fn query(c: &txmesh_tests::Client, prom: &str, expr: &str) -> Vec<Value> {
    let url = format!("{prom}/api/v1/query?query={}", urlencode(expr));
    let r = c.must("GET", &url, &[], b"");
    assert_eq!(r.status, 200, "{expr}: {}", r.text());
    let v = r.json();
    assert_eq!(v["status"], "success", "{expr}: {v}");
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn every_dashboard_panel_has_data_from_a_real_prometheus() {
    txmesh_tests::wasm("txmesh_router");
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("deploy/grafana/txmesh-dashboard.json")).unwrap(),
    )
    .unwrap();
    let exprs: Vec<(String, String)> = dash["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap_or("?").to_string();
            p["targets"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |t| (title.clone(), t["expr"].as_str().unwrap_or("").to_string()))
        })
        .collect();
    assert!(exprs.len() >= 12, "{exprs:?}");

    let s = ShopStack {
        home: txmesh_tests::scratch_dir("shop-dashboard"),
        off: free_offset(),
        prometheus: true,
    };
    let (ok, text) = s.run(&["up"]);
    assert!(ok, "{text}");
    assert!(text.contains("Prometheus: http://127.0.0.1:"), "{text}");
    let prom = format!("http://127.0.0.1:{}", 9090 + s.off);
    let c = txmesh_tests::Client::new();
    // Traffic over several scrapes (2 s), so rates and quantiles have data.
    for _ in 0..3 {
        s.demo("40");
        std::thread::sleep(std::time::Duration::from_secs(2));
    }
    // Every Envoy is a healthy scrape target.
    let up = query(&c, &prom, "up{job=\"txmesh\"}");
    assert_eq!(up.len(), 4, "{up:?}");
    assert!(up.iter().all(|r| r["value"][1] == "1"), "{up:?}");
    let mut empty = Vec::new();
    for (title, expr) in &exprs {
        // Up to 20 s for data; a panel still empty then is reported with
        // every other empty one below.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let got = loop {
            let r = query(&c, &prom, expr);
            if !r.is_empty() || std::time::Instant::now() > deadline {
                break r;
            }
            std::thread::sleep(std::time::Duration::from_millis(250));
        };
        if got.is_empty() {
            empty.push(title.clone());
        }
    }
    assert!(empty.is_empty(), "panels without data: {empty:?}");
}
