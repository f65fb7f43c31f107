//! The service registry in etcd and its process-wide copy in shared data.
//!
//! An instance registers under `<prefix><service>/<address>` with JSON
//! `{"address": "ip:port", "zone": "z1", "weight": 10, "version": "v2",
//! "metadata": {...}}` attached to a lease it keeps alive (docs/router.md).
//!
//! The elected poller turns each registry read into a [`Table`]: every
//! endpoint gets a *slot*, a small integer naming its shared-data stats key.
//! Slots of endpoints that stay keep their number; slots of endpoints that
//! left are reused, so the set of shared-data keys stays bounded by
//! `max_endpoints` however often instances come and go.

use crate::labels::is_clean_value;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

/// Highest weight accepted from the registry.
pub const MAX_WEIGHT: u32 = 10_000;

/// Where instances register unless the router's config says otherwise
/// (`registry_prefix`).
pub const DEFAULT_PREFIX: &str = "txmesh/services/";

/// The registry key of `service`'s instance at `address`, under `prefix`.
pub fn entry_key(prefix: &str, service: &str, address: &str) -> String {
    format!("{prefix}{service}/{address}")
}

/// One registered instance, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub service: String,
    pub address: String,
    /// Empty when the instance gave none.
    pub zone: String,
    /// 0 drains the instance: it gets no new requests.
    pub weight: u32,
}

#[derive(Deserialize)]
struct RecordJson {
    address: String,
    #[serde(default)]
    zone: Option<String>,
    #[serde(default)]
    weight: Option<u32>,
    #[serde(default)]
    #[allow(dead_code)]
    version: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    #[allow(dead_code)]
    metadata: Option<serde::de::IgnoredAny>,
}

/// Reads one registry entry. The key names the service; the value's
/// `address` must be `ip:port` and match the key's last segment.
pub fn parse_record(prefix: &str, key: &[u8], value: &[u8]) -> Result<Record, String> {
    let key = std::str::from_utf8(key).map_err(|_| "key is not UTF-8".to_string())?;
    let rest = key
        .strip_prefix(prefix)
        .ok_or_else(|| format!("{key}: not under {prefix}"))?;
    let (service, key_addr) = rest
        .split_once('/')
        .ok_or_else(|| format!("{key}: expected {prefix}<service>/<address>"))?;
    if !is_clean_value(service) || service.contains('/') {
        return Err(format!("{key}: invalid service name {service:?}"));
    }
    let r: RecordJson =
        serde_json::from_slice(value).map_err(|e| format!("{key}: invalid JSON value: {e}"))?;
    let addr: SocketAddr = r
        .address
        .parse()
        .map_err(|_| format!("{key}: address {:?} is not ip:port", r.address))?;
    let address = addr.to_string();
    if key_addr != r.address && key_addr != address {
        return Err(format!(
            "{key}: address {:?} differs from the key's {key_addr:?}",
            r.address
        ));
    }
    let zone = match r.zone {
        None => String::new(),
        Some(z) if z.is_empty() => z,
        Some(z) if is_clean_value(&z) => z,
        Some(z) => return Err(format!("{key}: invalid zone {z:?}")),
    };
    let weight = r.weight.unwrap_or(1);
    if weight > MAX_WEIGHT {
        return Err(format!("{key}: weight {weight} above {MAX_WEIGHT}"));
    }
    Ok(Record {
        service: service.to_string(),
        address,
        zone,
        weight,
    })
}

/// One endpoint of the published table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub slot: u32,
    pub service: String,
    pub address: String,
    pub zone: String,
    pub weight: u32,
}

impl Endpoint {
    /// The identity kept in the slot's stats record (`service/address`).
    pub fn id(&self) -> String {
        format!("{}/{}", self.service, self.address)
    }
}

/// The registry as published in shared data: a generation and the endpoints,
/// sorted by service then address.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Table {
    pub generation: u64,
    pub endpoints: Vec<Endpoint>,
}

impl Table {
    /// Text form: `gen\n` then `slot\tservice\taddress\tzone\tweight\n` per
    /// endpoint (every field is validated free of tabs and newlines).
    pub fn encode(&self) -> String {
        let mut out = format!("{}\n", self.generation);
        for e in &self.endpoints {
            out.push_str(&format!(
                "{}\t{}\t{}\t{}\t{}\n",
                e.slot, e.service, e.address, e.zone, e.weight
            ));
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(bytes).ok()?;
        let mut lines = text.lines();
        let generation = lines.next()?.parse().ok()?;
        let mut endpoints = Vec::new();
        for line in lines {
            let mut f = line.split('\t');
            let slot = f.next()?.parse().ok()?;
            let service = f.next()?.to_string();
            let address = f.next()?.to_string();
            let zone = f.next()?.to_string();
            let weight = f.next()?.parse().ok()?;
            endpoints.push(Endpoint {
                slot,
                service,
                address,
                zone,
                weight,
            });
        }
        Some(Self {
            generation,
            endpoints,
        })
    }

    /// The next table from a registry read: endpoints already in `self` keep
    /// their slot, new ones take the lowest free slot below `max_slots`.
    /// Returns the table and how many records found no slot. The generation
    /// moves on only when something changed.
    pub fn next(&self, records: &[Record], max_slots: u32) -> (Table, usize) {
        let old: BTreeMap<(&str, &str), u32> = self
            .endpoints
            .iter()
            .map(|e| ((e.service.as_str(), e.address.as_str()), e.slot))
            .collect();
        let mut sorted: Vec<&Record> = records.iter().collect();
        sorted.sort_by(|a, b| (&a.service, &a.address).cmp(&(&b.service, &b.address)));
        sorted.dedup_by(|a, b| a.service == b.service && a.address == b.address);
        let mut used: BTreeSet<u32> = sorted
            .iter()
            .filter_map(|r| old.get(&(r.service.as_str(), r.address.as_str())).copied())
            .collect();
        let mut free = (0..max_slots)
            .filter(|s| !used.contains(s))
            .collect::<Vec<_>>();
        free.reverse();
        let mut dropped = 0;
        let mut endpoints = Vec::with_capacity(sorted.len());
        for r in sorted {
            let slot = match old.get(&(r.service.as_str(), r.address.as_str())) {
                Some(s) => *s,
                None => match free.pop() {
                    Some(s) => {
                        used.insert(s);
                        s
                    }
                    None => {
                        dropped += 1;
                        continue;
                    }
                },
            };
            endpoints.push(Endpoint {
                slot,
                service: r.service.clone(),
                address: r.address.clone(),
                zone: r.zone.clone(),
                weight: r.weight,
            });
        }
        let changed = endpoints != self.endpoints;
        let generation = if changed {
            self.generation.saturating_add(1)
        } else {
            self.generation
        };
        (
            Table {
                generation,
                endpoints,
            },
            dropped,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = DEFAULT_PREFIX;

    fn rec(service: &str, address: &str, zone: &str, weight: u32) -> Record {
        Record {
            service: service.into(),
            address: address.into(),
            zone: zone.into(),
            weight,
        }
    }

    #[test]
    fn parses_records() {
        let r = parse_record(
            P,
            b"txmesh/services/payment/127.0.0.1:9000",
            br#"{"address":"127.0.0.1:9000","zone":"z1","weight":90,"version":"v2","metadata":{"a":"b"}}"#,
        )
        .unwrap();
        assert_eq!(r, rec("payment", "127.0.0.1:9000", "z1", 90));
        let r = parse_record(
            P,
            b"txmesh/services/p/[::1]:80",
            br#"{"address":"[::1]:80"}"#,
        )
        .unwrap();
        assert_eq!(r, rec("p", "[::1]:80", "", 1));
    }

    #[test]
    fn refuses_bad_records() {
        let e = |k: &str, v: &str| parse_record(P, k.as_bytes(), v.as_bytes()).unwrap_err();
        assert_eq!(
            e("txmesh/services/p/x", r#"{"address":"localhost:80"}"#),
            "txmesh/services/p/x: address \"localhost:80\" is not ip:port"
        );
        assert_eq!(
            e("txmesh/services/p/1.2.3.4:1", r#"{"address":"1.2.3.4:2"}"#),
            "txmesh/services/p/1.2.3.4:1: address \"1.2.3.4:2\" differs from the key's \"1.2.3.4:1\""
        );
        assert_eq!(
            e("txmesh/services/p", r#"{"address":"1.2.3.4:2"}"#),
            "txmesh/services/p: expected txmesh/services/<service>/<address>"
        );
        assert!(e("txmesh/services/p/1.2.3.4:1", "nope").contains("invalid JSON value"));
        assert!(e(
            "txmesh/services/p/1.2.3.4:1",
            r#"{"address":"1.2.3.4:1","zone":"a b"}"#
        )
        .contains("invalid zone"));
        assert!(e(
            "txmesh/services/p/1.2.3.4:1",
            r#"{"address":"1.2.3.4:1","weight":10001}"#
        )
        .contains("weight 10001 above 10000"));
        assert!(e("txmesh/services/p/1.2.3.4:1", r#"{"weight":1}"#).contains("missing field"));
    }

    #[test]
    fn slots_are_kept_and_reused() {
        let t0 = Table::default();
        let (t1, dropped) = t0.next(
            &[
                rec("b", "1.1.1.1:1", "", 1),
                rec("a", "1.1.1.1:2", "z", 1),
                rec("a", "1.1.1.1:1", "z", 1),
            ],
            3,
        );
        assert_eq!(dropped, 0);
        assert_eq!(t1.generation, 1);
        let slots: Vec<_> = t1.endpoints.iter().map(|e| (e.id(), e.slot)).collect();
        assert_eq!(
            slots,
            vec![
                ("a/1.1.1.1:1".to_string(), 0),
                ("a/1.1.1.1:2".to_string(), 1),
                ("b/1.1.1.1:1".to_string(), 2)
            ]
        );
        // Same records: same generation.
        let (same, _) = t1.next(
            &[
                rec("a", "1.1.1.1:1", "z", 1),
                rec("a", "1.1.1.1:2", "z", 1),
                rec("b", "1.1.1.1:1", "", 1),
            ],
            3,
        );
        assert_eq!(same, t1);
        // One leaves, two come: the freed slot is reused, the last has none.
        let (t2, dropped) = t1.next(
            &[
                rec("a", "1.1.1.1:2", "z", 1),
                rec("b", "1.1.1.1:1", "", 1),
                rec("c", "1.1.1.1:9", "", 1),
                rec("d", "1.1.1.1:9", "", 1),
            ],
            3,
        );
        assert_eq!(dropped, 1);
        assert_eq!(t2.generation, 2);
        let slots: Vec<_> = t2.endpoints.iter().map(|e| (e.id(), e.slot)).collect();
        assert_eq!(
            slots,
            vec![
                ("a/1.1.1.1:2".to_string(), 1),
                ("b/1.1.1.1:1".to_string(), 2),
                ("c/1.1.1.1:9".to_string(), 0)
            ]
        );
        // A weight change is a new generation.
        let (t3, _) = t2.next(
            &[
                rec("a", "1.1.1.1:2", "z", 5),
                rec("b", "1.1.1.1:1", "", 1),
                rec("c", "1.1.1.1:9", "", 1),
            ],
            3,
        );
        assert_eq!(t3.generation, 3);
        assert_eq!(Table::decode(t3.encode().as_bytes()), Some(t3));
        assert_eq!(Table::decode(b"x"), None);
        assert_eq!(Table::decode(b"1\n0\ta"), None);
    }
}
