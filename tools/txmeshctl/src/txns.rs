//! `txns`, `txn <id>`, `txn abort <id>`.

use crate::common::*;
use crate::etcd::Etcd;
use crate::sidecars::from_sidecars;
use crate::{Cli, Output, State};
use serde_json::{json, Value};
use std::time::Duration;
use txmesh_core::txn::config::TxnConfig;
use txmesh_core::txn::etcd::{CasResult, Decision, Outcome};

pub(crate) fn txns(cli: &Cli, state: Option<State>, since: Duration) -> Res<()> {
    let mut items: Vec<Value> = Vec::new();
    if matches!(state, None | Some(State::Committed) | Some(State::Aborted)) {
        let etcd = Etcd::new(&cli.etcd);
        let cutoff = now_ms().saturating_sub(since.as_millis() as u64);
        for (_, v, _) in etcd.list("txmesh/decisions/")? {
            let Ok(d) = serde_json::from_slice::<Value>(&v) else {
                continue;
            };
            let outcome = d["outcome"].as_str().unwrap_or("?");
            let t = d["time_ms"].as_u64().unwrap_or(0);
            let want = match state {
                Some(State::Committed) => outcome == "committed",
                Some(State::Aborted) => outcome == "aborted",
                _ => true,
            };
            if want && t >= cutoff {
                items.push(json!({"txn": d["txn"], "state": outcome, "time_ms": t,
                    "participants": d["participants"], "reason": d["reason"], "coordinator": d["coordinator"],
                    "refused_by": d["refused_by"], "detail": d["detail"]}));
            }
        }
    }
    if matches!(
        state,
        None | Some(State::InDoubt) | Some(State::Stuck) | Some(State::Active)
    ) {
        let q = match state {
            Some(State::InDoubt) => "in-doubt",
            Some(State::Stuck) => "stuck",
            Some(State::Active) => "active",
            _ => "all",
        };
        for (sc, v) in from_sidecars(&cli.sidecars, &format!("/txmesh/txns?state={q}")) {
            for t in v["txns"].as_array().cloned().unwrap_or_default() {
                let st = if t["stuck"].as_bool() == Some(true) {
                    "stuck"
                } else if t["in_doubt"].as_bool() == Some(true) {
                    "in-doubt"
                } else {
                    "active"
                };
                items.push(
                    json!({"txn": t["txn"], "state": st, "node": v["node"], "sidecar": sc,
                    "role": t["role"], "phase": t["phase"], "deadline_ms": t["deadline_ms"],
                    "participants": t["participants"]}),
                );
            }
        }
    }
    items.sort_by_key(|i| {
        std::cmp::Reverse(
            i["time_ms"]
                .as_u64()
                .or(i["deadline_ms"].as_u64())
                .unwrap_or(0),
        )
    });
    if cli.output == Output::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(&items).unwrap_or_default()
        );
        return Ok(());
    }
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|i| {
            let parts = i["participants"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .collect::<Vec<_>>()
                        .join(",")
                })
                .unwrap_or_default();
            let when = i["time_ms"].as_u64().map(ago).unwrap_or_else(|| {
                format!(
                    "deadline {}",
                    i["deadline_ms"].as_u64().map(ago).unwrap_or_default()
                )
            });
            let where_ = i["coordinator"]
                .as_str()
                .or(i["node"].as_str())
                .unwrap_or("")
                .to_string();
            vec![
                i["txn"].as_str().unwrap_or("").to_string(),
                i["state"].as_str().unwrap_or("").to_string(),
                match (i["reason"].as_str(), i["refused_by"].as_str()) {
                    (Some(r), Some(who)) => {
                        format!("{r} ({who}: {})", i["detail"].as_str().unwrap_or("-"))
                    }
                    (Some(r), None) => r.to_string(),
                    (None, _) => i["phase"].as_str().unwrap_or("").to_string(),
                },
                where_,
                when,
                parts,
            ]
        })
        .collect();
    print_table(
        &[
            "TXN",
            "STATE",
            "REASON/PHASE",
            "COORDINATOR/NODE",
            "WHEN",
            "PARTICIPANTS",
        ],
        &rows,
    );
    Ok(())
}

pub(crate) fn txn_show(cli: &Cli, id: &str) -> Res<()> {
    valid_id(id)?;
    let etcd = Etcd::new(&cli.etcd);
    let decision = etcd
        .get(&format!("txmesh/decisions/{id}"))?
        .and_then(|v| serde_json::from_slice::<Value>(&v).ok());
    let pending: Vec<Value> = etcd
        .list("txmesh/pending/")?
        .into_iter()
        .filter(|(k, _, _)| k.ends_with(&format!("/{id}")))
        .filter_map(|(_, v, _)| serde_json::from_slice(&v).ok())
        .collect();
    let held: Vec<Value> = from_sidecars(&cli.sidecars, &format!("/txmesh/txns/{id}"))
        .into_iter()
        .map(|(sc, v)| json!({"sidecar": sc, "outcome": v["outcome"]}))
        .collect();
    let outcome = decision
        .as_ref()
        .and_then(|d| d["outcome"].as_str())
        .map(str::to_string)
        .unwrap_or_else(|| "undecided".to_string());
    let view = json!({"txn": id, "outcome": outcome, "decision": decision, "pending_phase2": pending, "sidecars": held});
    if cli.output == Output::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(&view).unwrap_or_default()
        );
        return Ok(());
    }
    println!("txn          {id}");
    println!("outcome      {outcome}");
    if let Some(d) = &decision {
        println!("reason       {}", d["reason"].as_str().unwrap_or("-"));
        if let Some(who) = d["refused_by"].as_str() {
            println!(
                "refused by   {who}: {}",
                d["detail"].as_str().unwrap_or("-")
            );
        }
        println!(
            "trace id     {}",
            d["trace"]
                .as_str()
                .unwrap_or("- (the request had no traceparent)")
        );
        println!("decided by   {}", d["coordinator"].as_str().unwrap_or("-"));
        if let Some(t) = d["time_ms"].as_u64() {
            println!("decided at   {} ({})", local_time(t), ago(t));
            if let Some(b) = d["begun_ms"].as_u64() {
                println!(
                    "took         {} ms from begin to decision",
                    t.saturating_sub(b)
                );
            }
        }
        let parts: Vec<&str> = d["participants"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        println!(
            "participants {}",
            if parts.is_empty() {
                "-".to_string()
            } else {
                parts.join(", ")
            }
        );
    } else {
        println!("             no decision in etcd: still running, or aborted by presumption (never prepared)");
    }
    for p in &pending {
        let targets: Vec<String> = p["targets"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|t| {
                        format!(
                            "{}={}",
                            t["name"].as_str().unwrap_or("?"),
                            t["vote"].as_str().unwrap_or("?")
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        println!(
            "phase 2      unfinished; acknowledgements: {}",
            targets.join(", ")
        );
    }
    if pending.is_empty() && decision.is_some() {
        println!(
            "phase 2      no unfinished work recorded (acknowledged, or never needed a retry)"
        );
    }
    for h in &held {
        println!(
            "sidecar      {} says {}",
            h["sidecar"].as_str().unwrap_or(""),
            h["outcome"].as_str().unwrap_or("?")
        );
    }
    Ok(())
}

pub(crate) fn txn_abort(cli: &Cli, id: &str) -> Res<()> {
    let txn = valid_id(id)?;
    let etcd = Etcd::new(&cli.etcd);
    let d = Decision {
        txn,
        outcome: Outcome::Aborted,
        participants: Vec::new(),
        coordinator: "txmeshctl".into(),
        time_ms: now_ms(),
        reason: "operator".into(),
        trace: String::new(),
        begun_ms: 0,
        refused_by: None,
    };
    // Under the default retention's lease, as a sidecar would write it
    // (granted here if no sidecar has yet: the ID is the bucket's).
    let retention = TxnConfig::default_retention();
    let lease = retention.lease_at(d.time_ms);
    etcd.0
        .ensure_lease(lease, retention.ttl_s())
        .map_err(|e| etcd.fail(e))?;
    let existing = match etcd.0.create_decision(&d, Some(lease)) {
        Ok(CasResult::Created) => None,
        Ok(CasResult::Exists(v)) => Some(v),
        Err(e) => return Err(etcd.fail(e)),
    };
    if existing.is_none() {
        if cli.output == Output::Json {
            println!(
                "{}",
                json!({"txn": id, "outcome": "aborted", "changed": true})
            );
        } else {
            println!("aborted {id}: the decision is in etcd; participants past their deadline obey it (in-doubt ones resolve within their grace period)");
        }
        return Ok(());
    }
    let d: Value = existing
        .and_then(|v| serde_json::from_slice(&v).ok())
        .unwrap_or(Value::Null);
    let outcome = d["outcome"].as_str().unwrap_or("?");
    let when = d["time_ms"].as_u64().map(ago).unwrap_or_default();
    Err(Fail(format!(
        "refused: {id} is already decided: {outcome} ({when}, by {}). A decision is final; txmeshctl only aborts undecided transactions.",
        d["coordinator"].as_str().unwrap_or("?")
    )))
}
