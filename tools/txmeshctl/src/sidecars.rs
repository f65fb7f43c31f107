//! The sidecars' status endpoints.

use serde_json::Value;
use std::time::Duration;

/// `GET <sidecar>/txmesh/txns...` on every sidecar; unreachable ones are
/// reported on stderr, the rest still answer.
pub(crate) fn from_sidecars(sidecars: &[String], path: &str) -> Vec<(String, Value)> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(3)))
        .build()
        .into();
    let mut out = Vec::new();
    for s in sidecars {
        let url = format!("{}{path}", s.trim_end_matches('/'));
        match agent.get(&url).call() {
            Ok(mut r) => {
                let text = r.body_mut().read_to_string().unwrap_or_default();
                match serde_json::from_str::<Value>(&text) {
                    Ok(v) if r.status() == 200 => out.push((s.clone(), v)),
                    _ => eprintln!("txmeshctl: sidecar {s} answered {} to {path}: {text}", r.status()),
                }
            }
            Err(e) => eprintln!(
                "txmeshctl: cannot reach sidecar {s} ({e}); check the address (--sidecar / TXMESH_SIDECARS: a sidecar's plain status listener, :15008 for order in `make up`)"
            ),
        }
    }
    out
}
