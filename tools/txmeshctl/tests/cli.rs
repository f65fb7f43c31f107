//! txmeshctl against a running stack: etcd, two sidecars with the txn
//! filter, participant apps.

mod common;

use serde_json::{json, Value};
use std::process::Command;
use txmesh_tests::Client;

fn ctl(etcd: &str, sidecars: &[String], args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_txmeshctl"))
        .arg("--etcd")
        .arg(etcd)
        .arg("--sidecar")
        .arg(sidecars.join(","))
        .args(args)
        .env_remove("TXMESH_ETCD")
        .env_remove("TXMESH_SIDECARS")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A stack with one committed checkout (its phase 2 finished), carrying a
/// trace id.
fn committed_checkout() -> (common::Stack, String) {
    let stack = common::Stack::start();
    let r = Client::new().must(
        "POST",
        &stack.order_sc.inbound_url("/checkout"),
        &[("traceparent", &format!("00-{TRACE}-00f067aa0ba902b7-01"))],
        b"{}",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let id = r.header("x-txmesh-txn").unwrap().to_string();
    txmesh_tests::wait_for(10, "payment commits", || {
        (stack.payment.record(&id).commits == 1).then_some(())
    });
    (stack, id)
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

/// The line of a table that starts with `id`.
fn line_of<'a>(out: &'a str, id: &str) -> &'a str {
    out.lines()
        .find(|l| l.starts_with(id))
        .unwrap_or_else(|| panic!("no line for {id} in:\n{out}"))
}

/// A run that exits `want` and says `what` on stderr.
fn says((code, _, err): (i32, String, String), want: i32, what: &str) {
    assert_eq!(code, want, "{err}");
    assert!(err.contains(what), "{err}");
}

#[test]
fn txns_lists_decisions_and_what_sidecars_hold() {
    let (stack, id) = committed_checkout();
    let (url, sidecars) = (stack.etcd.url(), stack.sidecars());
    // As a table and as JSON.
    let (code, out, err) = ctl(&url, &sidecars, &["txns"]);
    assert_eq!(code, 0, "{err}");
    let line = line_of(&out, &id);
    assert!(
        line.contains("committed") && line.contains("order"),
        "{line}"
    );
    assert!(out.starts_with("TXN "), "{out}");
    let (code, out, _) = ctl(
        &url,
        &sidecars,
        &["txns", "--state", "committed", "--output", "json"],
    );
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    let list = v.as_array().unwrap();
    assert_eq!(list.len(), 1, "{out}");
    assert_eq!(list[0]["txn"], json!(id));
    assert_eq!(list[0]["state"], json!("committed"));
    let (_, out, _) = ctl(
        &url,
        &sidecars,
        &["txns", "--state", "aborted", "--output", "json"],
    );
    assert_eq!(serde_json::from_str::<Value>(&out).unwrap(), json!([]));
    // Until the root's phase 2 is over it lists the transaction in doubt
    // (decided, acknowledgements outstanding); then nothing is.
    txmesh_tests::wait_for(10, "phase 2 to finish", || {
        let (code, out, _) = ctl(&url, &sidecars, &["txns", "--state", "in-doubt"]);
        (code == 0 && out.lines().count() == 1).then_some(())
    });
    // A sidecar down: named, the others still answer.
    let r = ctl(
        &url,
        &["http://127.0.0.1:1".to_string()],
        &["txns", "--state", "active"],
    );
    says(r, 0, "cannot reach sidecar http://127.0.0.1:1");
}

#[test]
fn txn_shows_one_transaction() {
    let (stack, id) = committed_checkout();
    let (url, sidecars) = (stack.etcd.url(), stack.sidecars());
    let (code, out, err) = ctl(&url, &sidecars, &["txn", &id]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("outcome      committed"), "{out}");
    assert!(out.contains("decided by   order"), "{out}");
    assert!(out.contains(&format!("trace id     {TRACE}")), "{out}");
    let (_, out, _) = ctl(&url, &sidecars, &["txn", &id, "--output", "json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["outcome"], json!("committed"));
    assert_eq!(v["decision"]["txn"], json!(id));
    assert_eq!(v["decision"]["trace"], json!(TRACE));
}

#[test]
fn txn_abort_aborts_only_undecided_transactions() {
    let (stack, id) = committed_checkout();
    let (url, sidecars, etcd) = (stack.etcd.url(), stack.sidecars(), &stack.etcd);
    let r = ctl(&url, &sidecars, &["txn", "abort", &id]);
    says(
        r,
        2,
        &format!("refused: {id} is already decided: committed"),
    );
    assert_eq!(
        serde_json::from_str::<Value>(&etcd.get(&format!("txmesh/decisions/{id}")).unwrap())
            .unwrap()["outcome"],
        json!("committed")
    );
    let other = "00000000000000000000000000000abc";
    let (code, out, err) = ctl(&url, &sidecars, &["txn", "abort", other]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with(&format!("aborted {other}")), "{out}");
    let d: Value =
        serde_json::from_str(&etcd.get(&format!("txmesh/decisions/{other}")).unwrap()).unwrap();
    assert_eq!(
        (d["outcome"].as_str(), d["coordinator"].as_str()),
        (Some("aborted"), Some("txmeshctl"))
    );
    // Under the default retention's lease, like a sidecar's abort record.
    let leased = etcd
        .client()
        .list(&format!("txmesh/decisions/{other}"))
        .unwrap();
    let retention = txmesh_core::txn::config::TxnConfig::default_retention();
    let decided_at = d["time_ms"].as_u64().unwrap();
    assert_eq!(leased.len(), 1);
    assert_eq!(
        leased[0].lease as u64,
        retention.lease_at(decided_at),
        "{leased:?}"
    );
    let r = ctl(&url, &sidecars, &["txn", "abort", "nothex"]);
    says(r, 2, "is not a transaction id");
}

#[test]
fn services_lists_the_registry_and_names_an_unreachable_etcd() {
    let mut stack = common::Stack::start();
    let (url, sidecars) = (stack.etcd.url(), stack.sidecars());
    let etcd = &stack.etcd;
    let lease = etcd.lease_grant(30);
    etcd.put_leased(
        "txmesh/services/payment/127.0.0.1:15106",
        r#"{"address":"127.0.0.1:15106","zone":"z1","weight":90,"version":"v2"}"#,
        lease,
    );
    etcd.put(
        "txmesh/services/inventory/127.0.0.1:15206",
        r#"{"address":"127.0.0.1:15206"}"#,
    );
    let (code, out, err) = ctl(&url, &sidecars, &["services"]);
    assert_eq!(code, 0, "{err}");
    let row = out
        .lines()
        .find(|l| l.starts_with("payment"))
        .unwrap_or_else(|| panic!("{out}"));
    let cols: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        &cols[..5],
        &["payment", "127.0.0.1:15106", "z1", "90", "v2"],
        "{row}"
    );
    let ttl: i64 = cols[5].trim_end_matches('s').parse().unwrap();
    assert!((1..=30).contains(&ttl), "{row}");
    assert!(out.contains("no lease"), "{out}");
    let (_, out, _) = ctl(
        &url,
        &sidecars,
        &["services", "payment", "--output", "json"],
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["zone"], json!("z1"));
    // etcd down: a clear error, exit 2.
    stack.etcd.stop();
    let r = ctl(&url, &sidecars, &["services"]);
    says(r.clone(), 2, &format!("cannot reach etcd at {url}"));
    says(r, 2, "--etcd or TXMESH_ETCD");
}

#[test]
fn top_shows_live_rates() {
    let stack = common::Stack::start();
    let (url, sidecars) = (stack.etcd.url(), stack.sidecars());
    let order_sc = &stack.order_sc;
    let admin = format!("http://127.0.0.1:{}", order_sc.ports.admin);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (code, out, err) = std::thread::scope(|sc| {
        sc.spawn(|| {
            let c = Client::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = c.request("POST", &order_sc.inbound_url("/checkout"), &[], b"{}");
            }
        });
        let r = ctl(
            &url,
            &sidecars,
            &[
                "top",
                "--admin",
                &admin,
                "--iterations",
                "2",
                "--interval",
                "1",
                "--output",
                "json",
            ],
        );
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        r
    });
    assert_eq!(code, 0, "{err}");
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{out}");
    let last = &lines[1][0];
    assert_eq!(last["admin"], json!(admin));
    // (requests come from the metrics filter, which this stack does not run)
    assert_eq!(last["requests_per_s"], json!(0.0), "{last}");
    assert!(last["commits_per_s"].as_f64().unwrap() > 0.0, "{last}");
    assert_eq!(last["aborts_per_s"], json!(0.0), "{last}");
    let r = ctl(
        &url,
        &sidecars,
        &["top", "--admin", "http://127.0.0.1:1", "--iterations", "1"],
    );
    says(r, 2, "cannot reach any Envoy admin (http://127.0.0.1:1)");
}

#[test]
fn help_has_examples() {
    let out = Command::new(env!("CARGO_BIN_EXE_txmeshctl"))
        .arg("--help")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(text.contains("txmeshctl txn abort"), "{text}");
    assert!(text.contains("--output"), "{text}");
}

#[test]
fn gate_prints_the_matcher_for_a_txn_config_and_names_config_errors() {
    let dir = std::env::temp_dir().join(format!("txmeshctl-gate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("txn.json");
    let config = r#"{"begin":[{"method":"POST","path_prefix":"/checkout"}],"node":"order"}"#;
    std::fs::write(&good, config).unwrap();
    let (code, out, err) = ctl("http://127.0.0.1:1", &[], &["gate", good.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let printed: Value = serde_json::from_str(&out).unwrap();
    let want = txmesh_core::txn::config::TxnConfig::parse(config.as_bytes())
        .unwrap()
        .gate_matcher();
    assert_eq!(printed, want);
    let bad = dir.join("bad.json");
    std::fs::write(&bad, r#"{"begin":[{"methd":"POST","path_prefix":"/x"}]}"#).unwrap();
    let (code, out, err) = ctl("http://127.0.0.1:1", &[], &["gate", bad.to_str().unwrap()]);
    assert_eq!((code, out.as_str()), (2, ""));
    assert!(
        err.contains("invalid txn filter config at `begin[0].methd`: unknown field `methd`"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// An abort a participant caused: the record names it and its reason, and
/// `txn` / `txns` show them, with the decision's time as a local time.
#[test]
fn a_refused_transaction_names_who_said_no() {
    let stack = common::Stack::start();
    let sidecars = stack.sidecars();
    stack
        .payment
        .set_vote(txmesh_tests::Vote::No("insufficient_funds".into()));
    let r = Client::new().must("POST", &stack.order_sc.inbound_url("/checkout"), &[], b"{}");
    assert_eq!(r.status, 409, "{}", r.text());
    let id = r.header("x-txmesh-txn").unwrap().to_string();
    let url = stack.etcd.url();
    // The abort record is written as phase 2 begins (the order app may be prepared).
    let record: Value = txmesh_tests::wait_for(10, "the abort record", || {
        stack
            .etcd
            .get(&format!("txmesh/decisions/{id}"))
            .and_then(|v| serde_json::from_str(&v).ok())
    });
    assert_eq!(
        (&record["reason"], &record["refused_by"], &record["detail"]),
        (
            &json!("vote_abort"),
            &json!("payment"),
            &json!("insufficient_funds")
        )
    );

    let (code, out, err) = ctl(&url, &sidecars, &["txn", &id]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("outcome      aborted"), "{out}");
    assert!(out.contains("reason       vote_abort"), "{out}");
    assert!(
        out.contains("refused by   payment: insufficient_funds"),
        "{out}"
    );
    let decided = out
        .lines()
        .find_map(|l| l.strip_prefix("decided at   "))
        .unwrap_or_else(|| panic!("{out}"));
    // e.g. "2026-12-02 04:05:03.123 +00:00 (0s ago)"
    let year = decided.get(..4).and_then(|y| y.parse::<u32>().ok());
    assert!(year.is_some_and(|y| y >= 2024), "{decided}");
    assert!(decided.ends_with("ago)"), "{decided}");

    let (code, out, err) = ctl(&url, &sidecars, &["txns", "--state", "aborted"]);
    assert_eq!(code, 0, "{err}");
    let line = line_of(&out, &id);
    assert!(
        line.contains("vote_abort (payment: insufficient_funds)"),
        "{line}"
    );
}
