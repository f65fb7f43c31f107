//! The router: one [`RouterEngine`] per plugin root context (per worker).
//!
//! - **Registry.** One engine in the process is elected poller through a
//!   shared-data lease; it reads the registry prefix from etcd every
//!   `poll_interval_ms` and publishes a [`Table`] in shared data. Every engine
//!   picks the table up on its tick (a generation key tells it when to).
//!   Requests never wait for the registry.
//! - **Feedback.** Each endpoint's in-flight count, peak-EWMA latency and
//!   failure/ejection state live in its shared-data slot, updated with CAS
//!   by whichever worker served the request; engines cache them on tick and
//!   read the two candidates afresh for the load-aware strategies.
//! - **Pick.** The pick goes to Envoy in `endpoint_header` (ORIGINAL_DST or
//!   `override_host`), always overwritten.

use super::balance::{
    ejection_cap, record_health, smooth_weighted, two_choices, Ejection, EpHealth, Health, Load,
    Rng,
};
use super::config::{RouterConfig, ServiceConfig, ServiceFrom, Strategy};
use super::registry::{parse_record, Table};
use crate::host::{
    Callout, CalloutResponse, Family, FilterHost as Host, Label, LogLevel, MetricKind,
    SharedSetError, Verdict,
};
use crate::json::Obj;
use crate::labels::sanitize_value;
use crate::props;
use crate::txn::etcd::{parse_range_kvs, range_prefix_body};

/// Root tick period (ms): table refresh, stats refresh, poll deadlines.
pub const TICK_MS: u64 = 100;
const CAS_ATTEMPTS: u32 = 8;

pub const PICKS_TOTAL: &str = "txmesh_router_picks_total";
pub const REQUESTS_TOTAL: &str = "txmesh_router_requests_total";
pub const ERRORS_TOTAL: &str = "txmesh_router_errors_total";
pub const EJECTIONS_TOTAL: &str = "txmesh_router_ejections_total";
pub const EWMA_GAUGE: &str = "txmesh_router_ewma_latency_milliseconds";
pub const ENDPOINTS_GAUGE: &str = "txmesh_router_endpoints";
pub const NO_ENDPOINT_TOTAL: &str = "txmesh_router_no_endpoint_total";
pub const REGISTRY_ERRORS_TOTAL: &str = "txmesh_router_registry_errors_total";
pub const REGISTRY_UPDATES_TOTAL: &str = "txmesh_router_registry_updates_total";

/// Keys under which the labels are encoded in stat names, and the
/// Prometheus label each becomes (`stats_tags`). Not `service=`: that would
/// also match inside the metrics filter's `destination_service=`.
pub const LABEL_KEYS: [(&str, &str); 3] = [
    (SERVICE.name, SERVICE.key),
    (ENDPOINT.name, ENDPOINT.key),
    (ZONE.name, ZONE.key),
];

const SERVICE: Label = Label {
    name: "service",
    key: "router_service",
};
const ENDPOINT: Label = Label {
    name: "endpoint",
    key: "router_endpoint",
};
const ZONE: Label = Label {
    name: "zone",
    key: "router_zone",
};

const PER_ENDPOINT: &[Label] = &[SERVICE, ENDPOINT, ZONE];
pub static PICKS: Family = Family::new(MetricKind::Counter, PICKS_TOTAL, PER_ENDPOINT);
pub static REQUESTS: Family = Family::new(MetricKind::Counter, REQUESTS_TOTAL, PER_ENDPOINT);
pub static ERRORS: Family = Family::new(MetricKind::Counter, ERRORS_TOTAL, PER_ENDPOINT);
pub static EJECTIONS: Family = Family::new(MetricKind::Counter, EJECTIONS_TOTAL, PER_ENDPOINT);
pub static EWMA: Family = Family::new(MetricKind::Gauge, EWMA_GAUGE, PER_ENDPOINT);
pub static ENDPOINTS: Family = Family::new(MetricKind::Gauge, ENDPOINTS_GAUGE, &[SERVICE]);
pub static NO_ENDPOINT: Family = Family::new(MetricKind::Counter, NO_ENDPOINT_TOTAL, &[SERVICE]);
pub static REGISTRY_ERRORS: Family = Family::new(MetricKind::Counter, REGISTRY_ERRORS_TOTAL, &[]);
pub static REGISTRY_UPDATES: Family = Family::new(MetricKind::Counter, REGISTRY_UPDATES_TOTAL, &[]);

/// The router's stat families.
pub static FAMILIES: [&Family; 9] = [
    &PICKS,
    &REQUESTS,
    &ERRORS,
    &EJECTIONS,
    &EWMA,
    &ENDPOINTS,
    &NO_ENDPOINT,
    &REGISTRY_ERRORS,
    &REGISTRY_UPDATES,
];

/// Response flags that mean the endpoint could not be reached or failed the
/// exchange: UT, UR, UF, UC, UO (see [`crate::flags`]).
const FAILURE_FLAGS: u64 = 0x4 | 0x10 | 0x20 | 0x40 | 0x80;

/// A stream the router routed; handed back at the log phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Routed {
    service: usize,
    slot: u32,
    id: String,
    counted_pending: bool,
    /// The router's clock ([`clock_us`]) when it was routed.
    started_us: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct EpMetrics {
    picks: Option<u32>,
    requests: Option<u32>,
    errors: Option<u32>,
    ejections: Option<u32>,
    ewma: Option<u32>,
}

#[derive(Debug, Clone)]
struct Ep {
    slot: u32,
    id: String,
    address: String,
    zone: String,
    weight: u32,
    /// This worker's requests in flight and latency estimate.
    load: Load,
    /// The shared health record, as last read or written by this worker.
    health: EpHealth,
    m: EpMetrics,
}

#[derive(Debug)]
struct Service {
    name: String,
    cfg: ServiceConfig,
    eps: Vec<Ep>,
    rr: usize,
    wrr: Vec<i64>,
    no_endpoint: Option<u32>,
    endpoints_gauge: Option<u32>,
}

impl Service {
    fn tracks_pending(&self) -> bool {
        self.cfg.strategy.uses_load() || self.cfg.spill_over_pending.is_some()
    }
    fn ejection(&self) -> Ejection {
        Ejection {
            consecutive_failures: self.cfg.outlier.consecutive_failures,
            base_ms: self.cfg.outlier.base_ejection_ms,
            max_ms: self.cfg.outlier.max_ejection_ms,
        }
    }
}

#[derive(Debug, Default)]
struct Globals {
    registry_errors: Option<u32>,
    registry_updates: Option<u32>,
}

#[derive(Debug)]
struct Poll {
    token: u32,
    deadline_ms: u64,
}

/// How an engine keeps its table and health records fresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Freshness {
    /// By its own tick ([`RouterEngine::on_tick`]): a wasm root context, the
    /// native module's main-thread poller.
    Ticked,
    /// No tick of its own (a native worker: the ABI gives workers no timer):
    /// refreshed from its requests, at once when the shared data has changed
    /// since the last refresh (hosts with
    /// [`crate::host::SharedData::shared_version`]: a
    /// new table, another worker's failure or ejection), else at most once
    /// per [`TICK_MS`] (its gauges).
    Following {
        refreshed_ms: Option<u64>,
        seen_version: Option<u64>,
    },
}

pub struct RouterEngine {
    cfg: RouterConfig,
    zone: Option<String>,
    services: Vec<Service>,
    generation: u64,
    loaded: bool,
    owner: u64,
    rng: Rng,
    poll: Option<Poll>,
    next_poll_ms: u64,
    /// Last registry read: Some(true) ok, Some(false) failing (logs on change).
    registry_ok: Option<bool>,
    last_invalid: usize,
    g: Globals,
    freshness: Freshness,
    key_poller: String,
    key_gen: String,
    key_table: String,
    key_slot: String,
}

/// The router's clock, µs: the host's monotonic clock. Every time the router
/// keeps (in-flight starts, EWMA stamps, ejections, the poller lease — all
/// read only within this Envoy process) is on it, so a stream is timed by two
/// readings (≈0.2 µs each) rather than the `request.duration` attribute
/// (≈1 µs), and a wall-clock step moves no ejection.
fn clock_us(h: &impl Host) -> u64 {
    h.monotonic_us()
}

/// The shared-data key of endpoint slot `slot` (its health record).
fn slot_key(key_slot: &str, slot: u32) -> String {
    format!("{key_slot}{slot}")
}

fn define(h: &impl Host, family: &'static Family, values: &[&str]) -> Option<u32> {
    match h.define_metric(family, values) {
        Ok(id) => Some(id),
        Err(e) => {
            h.log(
                LogLevel::Warn,
                &format!("cannot define {}: {e}", family.name),
            );
            None
        }
    }
}

fn bump(h: &impl Host, id: Option<u32>, n: i64) {
    if let Some(id) = id {
        let _ = h.increment_metric(id, n);
    }
}

fn json_error(error: &str, service: &str) -> Vec<u8> {
    Obj::new()
        .str("error", error)
        .str("service", service)
        .build()
        .into_bytes()
}

/// The endpoints a pick may choose from: registered with weight > 0 and not
/// ejected; with zone preference the unsaturated local ones first, then the
/// other zones', then the saturated local ones; when every endpoint is
/// ejected, all of them (Envoy's panic mode: better any endpoint than none).
fn candidates(s: &Service, zone: Option<&str>, now: u64) -> Vec<usize> {
    let select = |keep: &dyn Fn(&Ep) -> bool| -> Vec<usize> {
        s.eps
            .iter()
            .enumerate()
            .filter(|(_, e)| keep(e))
            .map(|(i, _)| i)
            .collect()
    };
    let live = |e: &Ep| e.weight > 0;
    let up = |e: &Ep| live(e) && !e.health.ejected(now);
    if let (true, Some(z)) = (s.cfg.zone_preference, zone) {
        let local = select(&|e| {
            up(e) && e.zone == z && s.cfg.spill_over_pending.is_none_or(|m| e.load.pending < m)
        });
        if !local.is_empty() {
            return local;
        }
        let others = select(&|e| up(e) && e.zone != z);
        if !others.is_empty() {
            return others;
        }
    }
    let available = select(&up);
    if !available.is_empty() {
        return available;
    }
    select(&live)
}

impl RouterEngine {
    pub fn new(cfg: RouterConfig, h: &impl Host) -> Self {
        let zone = cfg.local_zone.clone().or_else(|| {
            [
                &["xds", "node", "locality", "zone"][..],
                &["xds", "node", "metadata", "ZONE"][..],
            ]
            .iter()
            .filter_map(|p| h.property(p))
            .find(|v| !v.is_empty())
            .map(|v| sanitize_value(&v))
        });
        let seed = h.random_id();
        let half = |r: std::ops::Range<usize>, d: u8| {
            seed.get(r)
                .and_then(|b| <[u8; 8]>::try_from(b).ok())
                .map_or(u64::from(d), u64::from_le_bytes)
        };
        let owner = half(0..8, 1);
        let rng = Rng::new(half(8..16, 7));
        let services = cfg
            .services
            .iter()
            .map(|(name, s)| Service {
                name: name.clone(),
                cfg: s.clone(),
                eps: Vec::new(),
                rr: 0,
                wrr: Vec::new(),
                no_endpoint: None,
                endpoints_gauge: None,
            })
            .collect();
        let base = format!("txmesh.router.{}.", cfg.name);
        Self {
            zone,
            services,
            generation: 0,
            loaded: false,
            owner,
            rng,
            poll: None,
            next_poll_ms: 0,
            registry_ok: None,
            last_invalid: 0,
            g: Globals::default(),
            freshness: Freshness::Ticked,
            key_poller: format!("{base}poller"),
            key_gen: format!("{base}generation"),
            key_table: format!("{base}table"),
            key_slot: format!("{base}ep."),
            cfg,
        }
    }

    /// This engine follows another one's polls and has no tick of its own
    /// (see [`Freshness::Following`]); it never takes the poller lease.
    pub fn following(mut self) -> Self {
        self.freshness = Freshness::Following {
            refreshed_ms: None,
            seen_version: None,
        };
        self
    }

    pub fn config(&self) -> &RouterConfig {
        &self.cfg
    }

    /// One line for the log at configure time.
    pub fn describe(&self) -> String {
        let services: Vec<String> = self
            .cfg
            .services
            .iter()
            .map(|(n, s)| format!("{n}={}", s.strategy.as_str()))
            .collect();
        format!(
            "registry {} via cluster {}, every {} ms; zone {}; header {}; services {}",
            self.cfg.registry_prefix,
            self.cfg.etcd_cluster,
            self.cfg.poll_interval_ms,
            self.zone().unwrap_or("none"),
            self.cfg.endpoint_header,
            services.join(",")
        )
    }
    pub fn zone(&self) -> Option<&str> {
        self.zone.as_deref()
    }

    /// Defines the per-service and global stats (once, at configure time).
    pub fn define_metrics(&mut self, h: &impl Host) {
        self.g.registry_errors = define(h, &REGISTRY_ERRORS, &[]);
        self.g.registry_updates = define(h, &REGISTRY_UPDATES, &[]);
        for s in &mut self.services {
            let l = [s.name.as_str()];
            s.no_endpoint = define(h, &NO_ENDPOINT, &l);
            s.endpoints_gauge = define(h, &ENDPOINTS, &l);
        }
    }

    /// Applies `f` to the health record in slot `key` with CAS; returns the
    /// record written.
    fn update_health<R>(
        h: &impl Host,
        key: &str,
        id: &str,
        mut f: impl FnMut(&mut EpHealth) -> R,
    ) -> Option<(EpHealth, R)> {
        for _ in 0..CAS_ATTEMPTS {
            let (v, cas) = h.shared_get(key);
            let mut s = EpHealth::decode_for(id, v.as_deref());
            let r = f(&mut s);
            match h.shared_set(key, s.encode().as_bytes(), cas) {
                Ok(()) => return Some((s, r)),
                Err(SharedSetError::CasMismatch) => continue,
                Err(SharedSetError::Other(e)) => {
                    h.log(LogLevel::Warn, &format!("cannot write {key}: {e}"));
                    return None;
                }
            }
        }
        h.log(
            LogLevel::Warn,
            &format!("{key}: gave up after {CAS_ATTEMPTS} CAS conflicts"),
        );
        None
    }

    // ---------------------------------------------------------------- tick

    pub fn on_tick(&mut self, h: &impl Host) {
        let now = clock_us(h) / 1000;
        if let Some(p) = &self.poll {
            if now >= p.deadline_ms {
                self.poll = None;
                self.registry_failed(
                    h,
                    &format!("no answer within {} ms", self.cfg.poll_timeout_ms),
                );
            }
        }
        if self.poll.is_none() && now >= self.next_poll_ms && self.elected(h, now) {
            self.start_poll(h, now);
        }
        self.on_refresh(h);
    }

    /// The follower's half of a tick: picks up the published table and the
    /// shared health records, and sets this engine's gauges (all a following
    /// engine does: it never takes the poller lease or calls etcd).
    fn on_refresh(&mut self, h: &impl Host) {
        self.refresh_table(h);
        self.refresh_health(h);
    }

    /// A following engine's refresh, when due (at a request, `now` ms).
    fn follow(&mut self, h: &impl Host, now: u64) {
        let Freshness::Following {
            refreshed_ms,
            seen_version,
        } = self.freshness
        else {
            return;
        };
        let version = h.shared_version();
        let changed = version.is_some() && version != seen_version;
        let due = refreshed_ms.is_none_or(|t| now >= t.saturating_add(TICK_MS));
        if changed || due {
            self.on_refresh(h);
            self.freshness = Freshness::Following {
                refreshed_ms: Some(now),
                seen_version: version,
            };
        }
    }

    /// Whether this engine holds (or now takes) the poller lease.
    fn elected(&self, h: &impl Host, now: u64) -> bool {
        let lease = (self.cfg.poll_interval_ms * 3).max(1_500);
        let (v, cas) = h.shared_get(&self.key_poller);
        let (holder, expires) = v
            .as_deref()
            .and_then(|b| std::str::from_utf8(b).ok())
            .and_then(|t| t.split_once(' '))
            .and_then(|(o, e)| Some((o.parse::<u64>().ok()?, e.parse::<u64>().ok()?)))
            .unwrap_or((0, 0));
        if holder != self.owner && expires > now {
            return false;
        }
        let value = format!("{} {}", self.owner, now.saturating_add(lease));
        h.shared_set(&self.key_poller, value.as_bytes(), cas)
            .is_ok()
    }

    fn start_poll(&mut self, h: &impl Host, now: u64) {
        self.next_poll_ms = now.saturating_add(self.cfg.poll_interval_ms);
        let limit = self.cfg.max_endpoints.saturating_mul(2).saturating_add(16);
        let c = Callout {
            cluster: self.cfg.etcd_cluster.clone(),
            method: "POST",
            path: "/v3/kv/range".to_string(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: range_prefix_body(&self.cfg.registry_prefix, limit).into_bytes(),
            timeout_ms: self.cfg.poll_timeout_ms,
            grpc: None,
        };
        match h.dispatch(&c) {
            Ok(token) => {
                self.poll = Some(Poll {
                    token,
                    deadline_ms: now.saturating_add(self.cfg.poll_timeout_ms),
                })
            }
            Err(e) => self.registry_failed(h, &format!("cannot call etcd: {e}")),
        }
    }

    fn registry_failed(&mut self, h: &impl Host, why: &str) {
        bump(h, self.g.registry_errors, 1);
        if self.registry_ok != Some(false) {
            let eps: usize = self.services.iter().map(|s| s.eps.len()).sum();
            h.log(
                LogLevel::Warn,
                &format!(
                    "registry unreachable (cluster {}: {why}); keeping the last table: {eps} endpoints, generation {}",
                    self.cfg.etcd_cluster, self.generation
                ),
            );
        }
        self.registry_ok = Some(false);
    }

    /// An HTTP callout answered (only the registry read is ours).
    pub fn on_callout(&mut self, h: &impl Host, token: u32, resp: CalloutResponse) {
        if self.poll.as_ref().map(|p| p.token) != Some(token) {
            return;
        }
        self.poll = None;
        match resp.status {
            Some(200) => {}
            Some(s) => {
                return self.registry_failed(h, &format!("etcd answered {s}"));
            }
            None => return self.registry_failed(h, "no HTTP answer"),
        }
        let (kvs, more) = match parse_range_kvs(&resp.body) {
            Ok(r) => r,
            Err(e) => return self.registry_failed(h, &e),
        };
        if self.registry_ok == Some(false) {
            h.log(LogLevel::Info, "registry reachable again");
        }
        self.registry_ok = Some(true);
        let mut records = Vec::with_capacity(kvs.len());
        let mut invalid = Vec::new();
        for (k, v) in &kvs {
            match parse_record(&self.cfg.registry_prefix, k, v) {
                Ok(r) => records.push(r),
                Err(e) => invalid.push(e),
            }
        }
        let (current, cas) = h.shared_get(&self.key_table);
        let current = current
            .as_deref()
            .and_then(Table::decode)
            .unwrap_or_default();
        let (next, dropped) = current.next(&records, self.cfg.max_endpoints);
        if invalid.len() != self.last_invalid {
            if let Some(first) = invalid.first() {
                h.log(
                    LogLevel::Warn,
                    &format!(
                        "registry: {} invalid entries ignored, first: {first}",
                        invalid.len()
                    ),
                );
            }
            self.last_invalid = invalid.len();
        }
        if next.generation == current.generation && current.generation != 0 {
            return;
        }
        if dropped > 0 || more {
            h.log(
                LogLevel::Warn,
                &format!(
                    "registry: more endpoints than max_endpoints {}: {dropped} left out",
                    self.cfg.max_endpoints
                ),
            );
        }
        // A first read of an empty registry still publishes (generation 1).
        let next = if next.generation == 0 {
            Table {
                generation: 1,
                ..next
            }
        } else {
            next
        };
        if h.shared_set(&self.key_table, next.encode().as_bytes(), cas)
            .is_err()
        {
            return; // Another poller published meanwhile.
        }
        let _ = h.shared_set(&self.key_gen, next.generation.to_string().as_bytes(), None);
        bump(h, self.g.registry_updates, 1);
        h.log(
            LogLevel::Info,
            &format!(
                "registry generation {}: {} endpoints",
                next.generation,
                next.endpoints.len()
            ),
        );
    }

    /// Picks up a newer table from shared data.
    fn refresh_table(&mut self, h: &impl Host) {
        let generation = h
            .shared_get(&self.key_gen)
            .0
            .and_then(|b| std::str::from_utf8(&b).ok()?.parse::<u64>().ok());
        let Some(generation) = generation else { return };
        if generation == self.generation && self.loaded {
            return;
        }
        let Some(table) = h
            .shared_get(&self.key_table)
            .0
            .as_deref()
            .and_then(Table::decode)
        else {
            return;
        };
        for s in &mut self.services {
            let mut eps = Vec::new();
            for e in table.endpoints.iter().filter(|e| e.service == s.name) {
                let id = e.id();
                let old = s.eps.iter().find(|o| o.id == id && o.zone == e.zone);
                // An endpoint that stays keeps its requests in flight and
                // its latency estimate.
                let (load, health) = old.map_or_else(
                    || (Load::default(), EpHealth::fresh(&id)),
                    |o| (o.load.clone(), o.health.clone()),
                );
                let m = old.map(|o| o.m).unwrap_or_else(|| {
                    let zone = if e.zone.is_empty() { "none" } else { &e.zone };
                    let l = [s.name.as_str(), e.address.as_str(), zone];
                    EpMetrics {
                        picks: define(h, &PICKS, &l),
                        requests: define(h, &REQUESTS, &l),
                        errors: define(h, &ERRORS, &l),
                        ejections: define(h, &EJECTIONS, &l),
                        ewma: define(h, &EWMA, &l),
                    }
                });
                eps.push(Ep {
                    slot: e.slot,
                    load,
                    health,
                    id,
                    address: e.address.clone(),
                    zone: e.zone.clone(),
                    weight: e.weight,
                    m,
                });
            }
            if let Some(g) = s.endpoints_gauge {
                let _ = h.record_metric(g, eps.len() as u64);
            }
            s.wrr = vec![0; eps.len()];
            s.eps = eps;
        }
        self.generation = table.generation;
        self.loaded = true;
    }

    /// Every tick: the shared health records (failures and ejections seen
    /// by other workers), and this worker's latency estimates as gauges.
    fn refresh_health(&mut self, h: &impl Host) {
        let Self {
            key_slot, services, ..
        } = self;
        for s in services.iter_mut() {
            for e in &mut s.eps {
                let v = h.shared_get(&slot_key(key_slot, e.slot)).0;
                e.health = EpHealth::decode_for(&e.id, v.as_deref());
                if let (Some(g), true) = (e.m.ewma, e.load.ewma_us > 0) {
                    let _ = h.record_metric(g, e.load.ewma_us / 1000);
                }
            }
        }
    }

    // ------------------------------------------------------------- request

    fn service_of(&self, h: &impl Host) -> Option<usize> {
        let name = match self.cfg.service_from {
            ServiceFrom::Cluster => {
                let c = h.property(&["xds", "cluster_name"])?;
                self.cfg.service_of_cluster(&c)?.to_string()
            }
            ServiceFrom::Authority => {
                let a = h.request_header(":authority")?;
                let host = match a.iter().rposition(|&b| b == b':') {
                    Some(i) if !a.ends_with(b"]") => a.get(..i)?.to_vec(),
                    _ => a,
                };
                String::from_utf8(host).ok()?
            }
        };
        self.services.iter().position(|s| s.name == name)
    }

    /// Routes one request: sets the endpoint header, or answers 503 when the
    /// service has no endpoint. Requests to services the router does not
    /// route lose any client-supplied endpoint header.
    pub fn on_request_headers(&mut self, h: &impl Host, ctx: u32) -> (Option<Routed>, Verdict) {
        let Some(si) = self.service_of(h) else {
            h.set_request_header(&self.cfg.endpoint_header, None);
            return (None, Verdict::Continue);
        };
        let now_us = clock_us(h);
        let now = now_us / 1000;
        self.follow(h, now);
        let picked = if self.loaded {
            self.pick(si, now)
        } else {
            None
        };
        let Some(s) = self.services.get_mut(si) else {
            return (None, Verdict::Continue);
        };
        let Some(ei) = picked else {
            bump(h, s.no_endpoint, 1);
            let error = if self.loaded {
                "no endpoints"
            } else {
                "registry not read yet"
            };
            h.send_reply(
                ctx,
                503,
                &[
                    ("content-type", "application/json"),
                    ("x-txmesh-router", "no-endpoint"),
                ],
                &json_error(error, &s.name),
            );
            return (None, Verdict::Pause);
        };
        let counted = s.tracks_pending();
        let Some(e) = s.eps.get_mut(ei) else {
            return (None, Verdict::Continue);
        };
        h.set_request_header(&self.cfg.endpoint_header, Some(&e.address));
        bump(h, e.m.picks, 1);
        if counted {
            e.load.start(now);
        }
        let (slot, id) = (e.slot, e.id.clone());
        (
            Some(Routed {
                service: si,
                slot,
                id,
                counted_pending: counted,
                started_us: now_us,
            }),
            Verdict::Continue,
        )
    }

    /// The endpoint to use, by the service's strategy, among the available
    /// ones (not ejected, weight > 0; local zone first when preferred).
    fn pick(&mut self, si: usize, now: u64) -> Option<usize> {
        let s = self.services.get(si)?;
        let cands = candidates(s, self.zone.as_deref(), now);
        if cands.is_empty() {
            return None;
        }
        let strategy = s.cfg.strategy;
        let (decay, rtt) = (s.cfg.ewma_decay_ms, s.cfg.default_rtt_ms);
        let n = cands.len();
        let pick = match strategy {
            Strategy::RoundRobin => {
                let s = self.services.get_mut(si)?;
                let k = s.rr % n;
                s.rr = s.rr.wrapping_add(1);
                *cands.get(k)?
            }
            Strategy::Random => *cands.get(self.rng.below(n))?,
            Strategy::Weighted => {
                let s = self.services.get_mut(si)?;
                let mut weights = vec![0u32; s.eps.len()];
                for &i in &cands {
                    if let (Some(w), Some(e)) = (weights.get_mut(i), s.eps.get(i)) {
                        *w = e.weight;
                    }
                }
                smooth_weighted(&weights, &mut s.wrr)?
            }
            Strategy::LeastRequest | Strategy::PeakEwma => {
                let (a, b) = two_choices(&mut self.rng, n);
                let (a, b) = (*cands.get(a)?, *cands.get(b)?);
                if a == b {
                    a
                } else {
                    let s = self.services.get(si)?;
                    let (sa, sb) = (&s.eps.get(a)?.load, &s.eps.get(b)?.load);
                    let better_b = if strategy == Strategy::LeastRequest {
                        sb.pending < sa.pending
                    } else {
                        sb.cost(now, decay, rtt) < sa.cost(now, decay, rtt)
                    };
                    if better_b {
                        b
                    } else {
                        a
                    }
                }
            }
        };
        Some(pick)
    }

    /// The log phase of a routed stream: in-flight count, latency, health,
    /// ejection, metrics.
    pub fn on_log(&mut self, h: &impl Host, r: &Routed) {
        let now_us = clock_us(h);
        let now = now_us / 1000;
        let code = h
            .property(&["response", "code"])
            .as_deref()
            .and_then(props::as_u64)
            .unwrap_or(0);
        let flags = h
            .property(&["response", "flags"])
            .as_deref()
            .and_then(props::as_u64)
            .unwrap_or(0);
        let failed = (500..600).contains(&code) || flags & FAILURE_FLAGS != 0;
        let sample_us =
            (code > 0 && flags & FAILURE_FLAGS == 0).then(|| now_us.saturating_sub(r.started_us));
        let key_slot = &self.key_slot;
        let Some(s) = self.services.get_mut(r.service) else {
            return;
        };
        let (decay, rtt) = (s.cfg.ewma_decay_ms, s.cfg.default_rtt_ms);
        let Some(ei) = s.eps.iter().position(|e| e.slot == r.slot && e.id == r.id) else {
            return; // Left the registry meanwhile: nothing to account for.
        };
        let Some(e) = s.eps.get_mut(ei) else {
            return;
        };
        // This worker's load: no host call.
        if r.counted_pending {
            e.load.finish(r.started_us / 1000);
        }
        if let Some(us) = sample_us {
            e.load.observe_rtt(now, us, decay, rtt);
        }
        bump(h, e.m.requests, 1);
        if failed {
            bump(h, e.m.errors, 1);
        }
        // The shared health record: written on a failure, and on a success
        // only when there is a failure count to reset or an ejection to
        // forgive (as far as this worker knows: its copy is re-read every
        // tick and after each of its writes).
        if !failed && !e.health.needs_success() {
            return;
        }
        let ej = s.ejection();
        let cap = ejection_cap(s.eps.len(), s.cfg.outlier.max_ejection_percent);
        let ejected_others = s
            .eps
            .iter()
            .filter(|o| o.slot != r.slot && o.health.ejected(now))
            .count();
        let may_eject = ejected_others < cap;
        let Some(e) = s.eps.get_mut(ei) else {
            return;
        };
        let key = slot_key(key_slot, r.slot);
        let Some((st, health)) = Self::update_health(h, &key, &r.id, |st| {
            record_health(st, now, failed, ej, may_eject)
        }) else {
            return;
        };
        if let Health::Ejected(until) = health {
            bump(h, e.m.ejections, 1);
            h.log(
                LogLevel::Info,
                &format!(
                    "ejected {} endpoint {} for {} ms (ejection {} in a row) after {} consecutive failures",
                    s.name,
                    e.address,
                    until.saturating_sub(now),
                    st.ejections,
                    ej.consecutive_failures
                ),
            );
        }
        e.health = st;
    }
}

#[cfg(test)]
mod tests;
