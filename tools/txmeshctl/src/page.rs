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
    Ok(json!({"generated_ms": now_ms(), "decided": decided, "in_doubt": in_doubt}))
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
