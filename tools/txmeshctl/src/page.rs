//! `serve`: the transactions page and its JSON.

use crate::common::*;
use crate::etcd::Etcd;
use crate::sidecars::from_sidecars;
use crate::Cli;
use serde_json::{json, Value};

pub(crate) const PAGE: &str = include_str!("page.html");

/// The page's data: the 100 newest decisions (with how long each took) and
/// what the sidecars hold in doubt.
pub(crate) fn page_data(cli: &Cli) -> Res<Value> {
    let etcd = Etcd::new(&cli.etcd);
    let mut decided: Vec<Value> = etcd
        .list("txmesh/decisions/")?
        .into_iter()
        .filter_map(|(_, v, _)| serde_json::from_slice::<Value>(&v).ok())
        .map(|mut d| {
            if let (Some(t), Some(b)) = (d["time_ms"].as_u64(), d["begun_ms"].as_u64()) {
                d["took_ms"] = json!(t.saturating_sub(b));
            }
            d
        })
        .collect();
    decided.sort_by_key(|d| std::cmp::Reverse(d["time_ms"].as_u64().unwrap_or(0)));
    decided.truncate(100);
    let in_doubt: Vec<Value> = from_sidecars(&cli.sidecars, "/txmesh/txns?state=in-doubt")
        .into_iter()
        .flat_map(|(_, v)| {
            let node = v["node"].clone();
            v["txns"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(move |mut t| {
                    t["node"] = node.clone();
                    t
                })
        })
        .collect();
    let now = now_ms();
    let summary = summary(&decided, in_doubt.len(), now, SUMMARY_WINDOW_MS);
    Ok(json!({"generated_ms": now, "decided": decided, "in_doubt": in_doubt, "summary": summary}))
}

/// The window the page's summary covers.
const SUMMARY_WINDOW_MS: u64 = 15 * 60 * 1000;

/// Outcomes over the last `window_ms` of `decided` (records, newest first):
/// commits, aborts by reason and by the participant that refused, how many
/// are in doubt now, and percentiles of the time from begin to decision.
pub(crate) fn summary(decided: &[Value], in_doubt: usize, now: u64, window_ms: u64) -> Value {
    let recent: Vec<&Value> = decided
        .iter()
        .filter(|d| d["time_ms"].as_u64().is_some_and(|t| t + window_ms >= now))
        .collect();
    let count = |outcome: &str| recent.iter().filter(|d| d["outcome"] == outcome).count();
    let mut by_reason = std::collections::BTreeMap::<String, u64>::new();
    let mut by_participant = std::collections::BTreeMap::<String, u64>::new();
    for d in recent.iter().filter(|d| d["outcome"] == "aborted") {
        let reason = d["reason"].as_str().unwrap_or("?").to_string();
        *by_reason.entry(reason).or_default() += 1;
        if let Some(who) = d["refused_by"].as_str() {
            *by_participant.entry(who.to_string()).or_default() += 1;
        }
    }
    let mut took: Vec<u64> = recent
        .iter()
        .filter_map(|d| d["took_ms"].as_u64())
        .collect();
    took.sort_unstable();
    // Nearest rank: the smallest value with at least p% of them at or below.
    let pct = |p: usize| -> Value {
        match took.len() {
            0 => Value::Null,
            n => json!(took[(n * p).div_ceil(100).clamp(1, n) - 1]),
        }
    };
    json!({
        "window_s": window_ms / 1000,
        "committed": count("committed"),
        "aborted": count("aborted"),
        "aborted_by_reason": by_reason,
        "aborted_by_participant": by_participant,
        "in_doubt": in_doubt,
        "took_ms": {"n": took.len(), "p50": pct(50), "p90": pct(90), "p99": pct(99), "max": took.last()},
    })
}

pub(crate) fn serve(cli: &Cli, listen: &str) -> Res<()> {
    let server = tiny_http::Server::http(listen).map_err(|e| {
        Fail(format!(
            "cannot listen on {listen}: {e} (use --listen HOST:PORT)"
        ))
    })?;
    eprintln!(
        "txmeshctl: the transactions page on http://{listen}/ (data: /api/txns); Ctrl-C to stop"
    );
    for req in server.incoming_requests() {
        let path = req.url().split('?').next().unwrap_or("/").to_string();
        let (status, ctype, body) = match (req.method(), path.as_str()) {
            (tiny_http::Method::Get, "/" | "/index.html") => {
                (200, "text/html; charset=utf-8", PAGE.to_string())
            }
            (tiny_http::Method::Get, "/api/txns") => match page_data(cli) {
                Ok(v) => (200, "application/json", v.to_string()),
                Err(Fail(e)) => (503, "application/json", json!({"error": e}).to_string()),
            },
            (tiny_http::Method::Get, _) => (404, "text/plain", "not found\n".to_string()),
            _ => (405, "text/plain", "GET only\n".to_string()),
        };
        let mut resp = tiny_http::Response::from_string(body).with_status_code(status);
        for (k, v) in [("content-type", ctype), ("cache-control", "no-store")] {
            if let Ok(h) = tiny_http::Header::from_bytes(k, v) {
                resp.add_header(h);
            }
        }
        // A client that went away is its own problem, not the server's.
        let _ = req.respond(resp);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_summary_counts_outcomes_reasons_and_percentiles() {
        let now = 1_000_000;
        let d = |outcome: &str, reason: &str, who: Option<&str>, at: u64, took: u64| {
            let mut v =
                json!({"outcome": outcome, "reason": reason, "time_ms": at, "took_ms": took});
            if let Some(w) = who {
                v["refused_by"] = json!(w);
            }
            v
        };
        let mut decided: Vec<Value> = (1..=98)
            .map(|i| d("committed", "ok", None, now - i, i))
            .collect();
        decided.push(d("aborted", "vote_abort", Some("payment"), now - 5, 200));
        decided.push(d("aborted", "timeout", None, now - 6, 300));
        // Outside the window: not counted.
        decided.push(d(
            "aborted",
            "vote_abort",
            Some("inventory"),
            now - 20_000,
            1,
        ));
        let s = summary(&decided, 2, now, 10_000);
        assert_eq!(
            (s["committed"].clone(), s["aborted"].clone()),
            (json!(98), json!(2))
        );
        assert_eq!(
            s["aborted_by_reason"],
            json!({"timeout": 1, "vote_abort": 1})
        );
        assert_eq!(s["aborted_by_participant"], json!({"payment": 1}));
        assert_eq!(s["in_doubt"], json!(2));
        let t = &s["took_ms"];
        assert_eq!(
            (t["n"].clone(), t["p50"].clone(), t["max"].clone()),
            (json!(100), json!(50), json!(300))
        );
        assert_eq!(t["p99"], json!(200));
        assert_eq!(summary(&[], 0, now, 10_000)["took_ms"]["p50"], Value::Null);
    }
}
