//! `services`: the registry.

use crate::common::*;
use crate::etcd::Etcd;
use crate::{Cli, Output};
use serde_json::{json, Value};
use txmesh_core::router::registry::{entry_key, DEFAULT_PREFIX};

pub(crate) fn services(cli: &Cli, name: Option<&str>) -> Res<()> {
    let etcd = Etcd::new(&cli.etcd);
    let prefix = match name {
        Some(n) => entry_key(DEFAULT_PREFIX, n, ""),
        None => DEFAULT_PREFIX.to_string(),
    };
    let mut items = Vec::new();
    for (key, value, lease) in etcd.list(&prefix)? {
        let v: Value = serde_json::from_slice(&value).unwrap_or(Value::Null);
        let service = key
            .trim_start_matches(DEFAULT_PREFIX)
            .split('/')
            .next()
            .unwrap_or("")
            .to_string();
        let ttl = if lease != 0 {
            etcd.0.lease_ttl(lease).map_err(|e| etcd.fail(e))?
        } else {
            None
        };
        items.push(json!({"service": service, "address": v["address"], "zone": v["zone"], "weight": v["weight"].as_u64().unwrap_or(1),
            "version": v["version"], "lease": lease, "ttl_s": ttl}));
    }
    if cli.output == Output::Json {
        println!(
            "{}",
            serde_json::to_string_pretty(&items).unwrap_or_default()
        );
        return Ok(());
    }
    if items.is_empty() {
        println!("no instances registered under {prefix}");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|i| {
            vec![
                i["service"].as_str().unwrap_or("").to_string(),
                i["address"].as_str().unwrap_or("?").to_string(),
                i["zone"].as_str().unwrap_or("-").to_string(),
                i["weight"].to_string(),
                i["version"].as_str().unwrap_or("-").to_string(),
                match i["ttl_s"].as_i64() {
                    Some(t) => format!("{t}s"),
                    None => "no lease".to_string(),
                },
            ]
        })
        .collect();
    print_table(
        &[
            "SERVICE",
            "ADDRESS",
            "ZONE",
            "WEIGHT",
            "VERSION",
            "LEASE TTL",
        ],
        &rows,
    );
    Ok(())
}
