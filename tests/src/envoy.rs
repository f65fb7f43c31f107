//! Sidecar Envoys built from a config template: an inbound listener in front
//! of the local app, an outbound listener routing by `Host` to named clusters,
//! the same shape as `envoy/sidecar.yaml`, with free ports.

use crate::http::Client;
use crate::ports::free_port;
use crate::process::ChildGuard;
use crate::prom::Scrape;
use crate::upstream::Upstream;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Every `stats_tags` entry of a txmesh bootstrap (the labels are defined
/// once, in txmesh-core: `labels::stats_tags`).
pub fn stats_tags_json() -> Vec<Value> {
    txmesh_core::labels::stats_tags()
        .into_iter()
        .map(|(t, key)| json!({"tag_name": t, "regex": txmesh_core::labels::stats_tag_regex(key)}))
        .collect()
}

/// An ORIGINAL_DST cluster that sends each request to the `ip:port` in
/// request header `header` (the router's pick).
/// `cluster` speaking HTTP/2 to its endpoints (a gRPC service).
pub fn http2(mut cluster: Value) -> Value {
    cluster["typed_extension_protocol_options"] = json!({
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}},
        }
    });
    cluster
}

pub fn original_dst_cluster(name: &str, header: &str) -> Value {
    json!({
        "name": name,
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "1s",
        "original_dst_lb_config": {"use_http_header": true, "http_header_name": header},
    })
}

/// A static cluster whose hosts Envoy knows, picked by the `ip:port` in
/// request header `header` (override_host policy; round robin when absent).
pub fn override_host_cluster(name: &str, eps: &[SocketAddr], header: &str) -> Value {
    let mut c = static_cluster(name, eps);
    c["load_balancing_policy"] = json!({"policies": [{"typed_extension_config": {
        "name": "envoy.load_balancing_policies.override_host",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.override_host.v3.OverrideHost",
            "override_host_sources": [{"header": header}],
            "fallback_policy": {"policies": [{"typed_extension_config": {
                "name": "envoy.load_balancing_policies.round_robin",
                "typed_config": {"@type": "type.googleapis.com/envoy.extensions.load_balancing_policies.round_robin.v3.RoundRobin"}
            }}]}
        }
    }}]});
    c
}

/// One HTTP filter of a listener.
#[derive(Clone, Debug)]
pub struct Filter(pub Value);

impl Filter {
    /// A txmesh wasm filter: `name` is the artifact (`txmesh_metrics`), also
    /// used as plugin name, root id and vm id. Fails closed unless changed.
    pub fn wasm(name: &str, config: Value) -> Self {
        let config_str = match &config {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        Filter(json!({
            "name": "envoy.filters.http.wasm",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                "config": {
                    "name": name,
                    "root_id": name,
                    "failure_policy": "FAIL_CLOSED",
                    "configuration": {
                        "@type": "type.googleapis.com/google.protobuf.StringValue",
                        "value": config_str,
                    },
                    "vm_config": {
                        "vm_id": name,
                        "runtime": "envoy.wasm.runtime.v8",
                        "code": {"local": {"filename": crate::wasm(name).display().to_string()}},
                    }
                }
            }
        }))
    }

    pub fn metrics(config: Value) -> Self {
        match FilterHost::current() {
            FilterHost::Wasm => Self::wasm("txmesh_metrics", config),
            FilterHost::Native => Self::native("metrics", config),
        }
    }

    /// The router (fails closed: a request it cannot route must not go
    /// wherever a client-supplied header says).
    pub fn router(config: Value) -> Self {
        match FilterHost::current() {
            FilterHost::Wasm => Self::wasm("txmesh_router", config),
            FilterHost::Native => Self::native("router", config),
        }
    }

    /// Authorization (fails closed), on the host this run tests
    /// ([`FilterHost::current`]).
    pub fn authz(config: Value) -> Self {
        match FilterHost::current() {
            FilterHost::Wasm => Self::wasm("txmesh_authz", config),
            FilterHost::Native => Self::native("authz", config),
        }
    }

    /// A filter of the native module (`libtxmesh.so`, Envoy's
    /// `DynamicModuleFilter`) with the same JSON config as its wasm twin.
    pub fn native(filter_name: &str, config: Value) -> Self {
        let config_str = match &config {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        Filter(json!({
            "name": "envoy.filters.http.dynamic_modules",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter",
                "dynamic_module_config": {"name": "txmesh", "metrics_namespace": "txmesh"},
                "filter_name": filter_name,
                "filter_config": {
                    "@type": "type.googleapis.com/google.protobuf.StringValue",
                    "value": config_str,
                },
            }
        }))
    }

    /// The transaction filter (fails closed).
    pub fn txn(config: Value) -> Self {
        Self::wasm("txmesh_txn", config)
    }

    /// This filter behind Envoy's `match_delegate`: `xds_matcher` (whose
    /// action is `SkipFilter`) decides per request whether it runs.
    pub fn gated(self, xds_matcher: Value) -> Self {
        Filter(json!({
            "name": self.0["name"].clone(),
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.common.matching.v3.ExtensionWithMatcher",
                "extension_config": self.0,
                "xds_matcher": xds_matcher,
            }
        }))
    }

    /// Sets `failure_policy` (FAIL_CLOSED, FAIL_OPEN, FAIL_RELOAD) of a wasm filter.
    pub fn failure_policy(mut self, policy: &str) -> Self {
        if let Some(cfg) = self.0.pointer_mut("/typed_config/config") {
            cfg["failure_policy"] = json!(policy);
        }
        self
    }
}

/// Which build of txmesh's filters a test run uses for the filters that
/// have both (authz, metrics and the router): `TXMESH_HOST=native` selects the dynamic module
/// (`make test` runs those suites once per host); default wasm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterHost {
    Wasm,
    Native,
}

impl FilterHost {
    pub fn current() -> Self {
        match std::env::var("TXMESH_HOST").as_deref() {
            Ok("native") => FilterHost::Native,
            _ => FilterHost::Wasm,
        }
    }

    /// The line Envoy logs when it refuses the filter `wasm_name` (or its
    /// native twin) for a bad config.
    pub fn config_refusal(self, wasm_name: &str) -> String {
        match self {
            FilterHost::Wasm => format!("Unable to create Wasm plugin {wasm_name}"),
            FilterHost::Native => "Failed to initialize dynamic module".to_string(),
        }
    }
}

/// A count a test expects in a scrape: the metric, the labels it is summed
/// over, the sum ([`Envoy::scrape_counts`]).
pub type Count<'a> = (&'a str, &'a [(&'a str, &'a str)], f64);

/// Runtime flags every txmesh bootstrap sets: the native module's stats
/// without Envoy's `envoy_<namespace>_` prefix (named as the wasm filters').
pub fn runtime_layer() -> Value {
    json!({"layers": [{"name": "static", "static_layer": {
        "envoy.reloadable_features.dynamic_modules_strip_custom_stat_prefix": true
    }}]})
}

/// Builder of a sidecar Envoy.
#[derive(Clone)]
pub struct Sidecar {
    workload: String,
    app: Option<SocketAddr>,
    routes: Vec<(String, Vec<SocketAddr>)>,
    cluster_routes: Vec<Value>,
    inbound_filters: Vec<Filter>,
    outbound_filters: Vec<Filter>,
    extra_clusters: Vec<Value>,
    concurrency: u32,
    tls: Option<(crate::Certs, Option<String>)>,
    /// Speak HTTP/2 to the local app (a gRPC app).
    app_http2: bool,
    /// The pod it runs in (listening on the pod's address), or loopback.
    pod: Option<crate::netns::Pod>,
}

/// Ports of a running sidecar.
#[derive(Clone, Copy, Debug)]
pub struct Ports {
    pub admin: u16,
    pub inbound: u16,
    pub outbound: u16,
}

impl Sidecar {
    pub fn new(workload: &str) -> Self {
        Self {
            workload: workload.to_string(),
            app: None,
            routes: Vec::new(),
            cluster_routes: Vec::new(),
            inbound_filters: Vec::new(),
            outbound_filters: Vec::new(),
            extra_clusters: Vec::new(),
            concurrency: 2,
            tls: None,
            app_http2: false,
            pod: None,
        }
    }

    /// The local app behind the inbound listener (cluster `local_app`).
    pub fn app(mut self, app: &Upstream) -> Self {
        self.app = Some(app.addr());
        self
    }

    /// Envoy speaks HTTP/2 to the local app (a gRPC server; the upstream
    /// serves both). Transaction control calls to it go the same way.
    pub fn app_http2(mut self) -> Self {
        self.app_http2 = true;
        self
    }

    pub fn app_addr(mut self, addr: SocketAddr) -> Self {
        self.app = Some(addr);
        self
    }

    /// An outbound destination: requests with `Host: <name>` go to cluster
    /// `<name>` with these endpoints (none: the cluster has no healthy host).
    pub fn route(mut self, name: &str, endpoints: &[SocketAddr]) -> Self {
        self.routes.push((name.to_string(), endpoints.to_vec()));
        self
    }

    /// An outbound destination served by a given cluster (raw Envoy JSON):
    /// requests with `Host: <cluster name>` go to it.
    pub fn route_cluster(mut self, cluster: Value) -> Self {
        self.cluster_routes.push(cluster);
        self
    }

    /// mTLS with identity `name` from `certs`: the inbound listener requires
    /// a client certificate from that CA; calls to other sidecars (route
    /// clusters) present `name`'s certificate and verify the peer's SPIFFE id
    /// (`spiffe(<route name>)`).
    pub fn mtls(mut self, certs: &crate::Certs, name: &str) -> Self {
        self.tls = Some((certs.clone(), Some(name.to_string())));
        self
    }

    /// Calls to other sidecars over TLS (verifying them) without a client
    /// certificate of its own.
    pub fn tls_without_cert(mut self, certs: &crate::Certs) -> Self {
        self.tls = Some((certs.clone(), None));
        self
    }

    fn upstream_tls(&self, service: &str) -> Option<Value> {
        let (certs, me) = self.tls.as_ref()?;
        let mut common = json!({"validation_context": {
            "trusted_ca": {"filename": certs.ca()},
            "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": crate::spiffe(service)}}],
        }});
        if let Some(me) = me {
            common["tls_certificates"] = json!([{
                "certificate_chain": {"filename": certs.crt(me)},
                "private_key": {"filename": certs.key(me)},
            }]);
        }
        Some(
            json!({"name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "common_tls_context": common,
            }}),
        )
    }

    fn downstream_tls(&self) -> Option<Value> {
        let (certs, Some(me)) = self.tls.as_ref()? else {
            return None;
        };
        Some(
            json!({"name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "require_client_certificate": true,
                "common_tls_context": {
                    "tls_certificates": [{
                        "certificate_chain": {"filename": certs.crt(me)},
                        "private_key": {"filename": certs.key(me)},
                    }],
                    "validation_context": {"trusted_ca": {"filename": certs.ca()}},
                },
            }}),
        )
    }

    /// A filter on both listeners.
    pub fn filter(self, f: Filter) -> Self {
        self.inbound_filter(f.clone()).outbound_filter(f)
    }

    pub fn inbound_filter(mut self, f: Filter) -> Self {
        self.inbound_filters.push(f);
        self
    }

    pub fn outbound_filter(mut self, f: Filter) -> Self {
        self.outbound_filters.push(f);
        self
    }

    /// An extra cluster (raw Envoy JSON), e.g. etcd for the txn filter.
    pub fn cluster(mut self, c: Value) -> Self {
        self.extra_clusters.push(c);
        self
    }

    /// A cluster `etcd` pointing at this etcd's client port (JSON gateway).
    pub fn etcd(self, etcd: &crate::Etcd) -> Self {
        self.cluster(static_cluster("etcd", &[etcd.addr()]))
    }

    /// A cluster `etcd` over several members, health-checked every second so
    /// a dead member leaves the rotation.
    pub fn etcd_members(self, addrs: &[SocketAddr]) -> Self {
        let mut c = static_cluster("etcd", addrs);
        c["health_checks"] = json!([{
            "timeout": "1s", "interval": "1s", "unhealthy_threshold": 1, "healthy_threshold": 1,
            "http_health_check": {"path": "/health"}
        }]);
        self.cluster(c)
    }

    /// A cluster `etcd` at an address where nothing listens.
    pub fn etcd_addr(self, addr: SocketAddr) -> Self {
        self.cluster(static_cluster("etcd", &[addr]))
    }

    /// Runs in `pod` (its network namespace): every listener on the pod's
    /// address, so that other pods reach the inbound one and the app in the
    /// pod reaches the outbound one on 127.0.0.1.
    pub fn pod(mut self, pod: &crate::netns::Pod) -> Self {
        self.pod = Some(pod.clone());
        self
    }

    /// Envoy worker threads (default 2, so cross-worker behaviour is exercised).
    pub fn concurrency(mut self, n: u32) -> Self {
        self.concurrency = n;
        self
    }

    /// The filters, with the native metrics filter told this sidecar's
    /// workload where its config does not name one (`xds.node` does not
    /// answer on the dynamic-modules ABI, so a native deployment sets
    /// `workload`, as the wasm filter reads it from the node metadata).
    fn with_workload(&self, filters: &[Filter]) -> Vec<Filter> {
        filters
            .iter()
            .map(|f| {
                let mut f = f.clone();
                let tc = &mut f.0["typed_config"];
                if tc["filter_name"] == "metrics" {
                    let value = &mut tc["filter_config"]["value"];
                    if let Some(mut cfg) = value
                        .as_str()
                        .and_then(|v| serde_json::from_str::<Value>(v).ok())
                    {
                        if cfg.get("workload").is_none() && cfg.is_object() {
                            cfg["workload"] = json!(self.workload);
                            *value = json!(cfg.to_string());
                        }
                    }
                }
                f
            })
            .collect()
    }

    /// The bootstrap for these ports.
    pub fn bootstrap(&self, ports: Ports) -> Value {
        let bind = bind_addr(self.pod.as_ref());
        let stats_tags = stats_tags_json();
        let mut clusters: Vec<Value> = Vec::new();
        if let Some(app) = self.app {
            let c = static_cluster("local_app", &[app]);
            clusters.push(if self.app_http2 { http2(c) } else { c });
        }
        let mut vhosts = Vec::new();
        // A route per named upstream: its cluster (with mTLS where
        // configured) and a virtual host for its name.
        let routed = self
            .routes
            .iter()
            .map(|(name, eps)| static_cluster(name, eps))
            .chain(self.cluster_routes.iter().cloned());
        for mut c in routed {
            let name = c["name"].as_str().unwrap_or("unnamed").to_string();
            if let Some(t) = self.upstream_tls(&name) {
                c["transport_socket"] = t;
            }
            clusters.push(c);
            vhosts.push(json!({
                "name": name,
                "domains": [&name, &format!("{name}:*")],
                "routes": [{"match": {"prefix": "/"}, "route": {"cluster": name}}],
            }));
        }
        clusters.extend(self.extra_clusters.iter().cloned());
        let inbound_routes = json!({"virtual_hosts": [{
            "name": "local_app",
            "domains": ["*"],
            "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "local_app"}}],
        }]});
        let mut listeners = Vec::new();
        // No app, no inbound listener (an edge or client-only Envoy).
        if self.app.is_some() {
            let mut l = listener(
                bind,
                "inbound",
                "INBOUND",
                ports.inbound,
                inbound_routes,
                &self.with_workload(&self.inbound_filters),
            );
            if let Some(t) = self.downstream_tls() {
                l["filter_chains"][0]["transport_socket"] = t;
            }
            listeners.push(l);
        }
        listeners.push(listener(
            bind,
            "outbound",
            "OUTBOUND",
            ports.outbound,
            json!({"virtual_hosts": vhosts}),
            &self.with_workload(&self.outbound_filters),
        ));
        json!({
            "node": {"id": format!("{}-sidecar", self.workload), "cluster": self.workload,
                     "metadata": {"WORKLOAD_NAME": self.workload}},
            "admin": {"address": sock(bind, ports.admin)},
            "stats_flush_on_admin": true,
            "layered_runtime": runtime_layer(),
            "stats_config": {"stats_tags": stats_tags},
            "static_resources": {"listeners": listeners, "clusters": clusters},
        })
    }

    /// Starts Envoy and waits until it is ready; panics with its log otherwise.
    pub fn start(self) -> Envoy {
        match self.try_start() {
            Ok(e) => e,
            Err(log) => panic!("envoy for {} did not become ready:\n{log}", self.workload),
        }
    }

    /// Starts Envoy; `Err(log)` when it exits before it is ready. Retries with
    /// new ports when a port was taken in the meantime.
    pub fn try_start(&self) -> Result<Envoy, String> {
        let dir = crate::scratch_dir(&format!("envoy-{}", self.workload));
        let mut last = String::new();
        for _attempt in 0..3 {
            let ports = Ports {
                admin: free_port(),
                inbound: free_port(),
                outbound: free_port(),
            };
            let cfg_path = dir.join("envoy.json");
            let text =
                serde_json::to_string_pretty(&self.bootstrap(ports)).map_err(|e| e.to_string())?;
            std::fs::write(&cfg_path, text).map_err(|e| e.to_string())?;
            let at = self.pod.as_ref();
            match Envoy::launch(&self.workload, &cfg_path, &dir, ports, self.concurrency, at) {
                Ok(e) => return Ok(e),
                Err(log) if log.contains("ddress already in use") => last = log,
                Err(log) => return Err(log),
            }
        }
        Err(last)
    }
}

/// Where a sidecar's listeners bind: loopback, or every address of its pod.
fn bind_addr(pod: Option<&crate::netns::Pod>) -> &'static str {
    match pod {
        Some(_) => "0.0.0.0",
        None => "127.0.0.1",
    }
}

fn sock(address: &str, port: u16) -> Value {
    json!({"socket_address": {"address": address, "port_value": port}})
}

fn static_cluster(name: &str, eps: &[SocketAddr]) -> Value {
    let lb: Vec<Value> = eps
        .iter()
        .map(|a| {
            json!({"endpoint": {"address": {"socket_address": {
            "address": a.ip().to_string(), "port_value": a.port()}}}})
        })
        .collect();
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": lb}]},
    })
}

fn listener(
    bind: &str,
    name: &str,
    dir: &str,
    port: u16,
    routes: Value,
    filters: &[Filter],
) -> Value {
    let mut http_filters: Vec<Value> = filters.iter().map(|f| f.0.clone()).collect();
    http_filters.push(json!({
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}
    }));
    json!({
        "name": name,
        "traffic_direction": dir,
        "address": sock(bind, port),
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": name,
                "route_config": routes,
                "http_filters": http_filters,
            }
        }]}],
    })
}

/// A running Envoy, killed on drop.
pub struct Envoy {
    pub guard: ChildGuard,
    pub ports: Ports,
    pub dir: PathBuf,
    client: Client,
    name: String,
    concurrency: u32,
    pod: Option<crate::netns::Pod>,
}

impl Envoy {
    fn launch(
        name: &str,
        cfg: &Path,
        dir: &Path,
        ports: Ports,
        concurrency: u32,
        pod: Option<&crate::netns::Pod>,
    ) -> Result<Self, String> {
        let mut cmd = match pod {
            Some(p) => p.command(crate::envoy_bin()),
            None => Command::new(crate::envoy_bin()),
        };
        // Where Envoy finds libtxmesh.so (`dynamic_module_config.name`).
        cmd.env("ENVOY_DYNAMIC_MODULES_SEARCH_PATH", crate::native_dir());
        cmd.arg("-c")
            .arg(cfg)
            .args(["--base-id", &ports.admin.to_string()])
            .args(["--concurrency", &concurrency.to_string()])
            .args(["-l", "info"]);
        let mut guard = ChildGuard::spawn(&format!("envoy-{name}"), cmd, dir, vec![]);
        let client = Client::new();
        let host = pod.map_or(std::net::Ipv4Addr::LOCALHOST, |p| p.ip);
        let ready = format!("http://{host}:{}/ready", ports.admin);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        loop {
            if let Some(status) = guard.exited() {
                let log = guard.log_text();
                std::mem::forget(guard); // already exited: nothing to kill or print
                return Err(format!("envoy exited with {status}\n{log}"));
            }
            if let Ok(r) = client.get(&ready) {
                if r.status == 200 {
                    break;
                }
            }
            if std::time::Instant::now() > deadline {
                return Err(format!("not ready after 60s\n{}", guard.log_text()));
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Ok(Self {
            guard,
            ports,
            dir: dir.to_path_buf(),
            client,
            name: name.to_string(),
            concurrency,
            pod: pod.cloned(),
        })
    }

    /// `kill -9`: the Envoy dies mid-flight, its shared data with it.
    pub fn crash(&mut self) {
        self.guard.kill();
    }

    /// Starts Envoy again with the same config and ports (after `crash`).
    /// Its output is appended to the same log.
    pub fn restart(&mut self) {
        self.guard.kill();
        let cfg = self.dir.join("envoy.json");
        let fresh = crate::wait_for(20, "envoy restart (ports free again)", || {
            let (name, ports, n) = (&self.name, self.ports, self.concurrency);
            Envoy::launch(name, &cfg, &self.dir, ports, n, self.pod.as_ref()).ok()
        });
        let Envoy { guard, .. } = fresh;
        // Swap the new child in; the old guard (dead) is dropped quietly.
        let old_guard = std::mem::replace(&mut self.guard, guard);
        std::mem::forget(old_guard);
    }

    /// Its address as the test reaches it: loopback, or its pod's.
    pub fn host(&self) -> std::net::Ipv4Addr {
        self.pod
            .as_ref()
            .map_or(std::net::Ipv4Addr::LOCALHOST, |p| p.ip)
    }

    pub fn inbound_url(&self, path: &str) -> String {
        format!("http://{}:{}{path}", self.host(), self.ports.inbound)
    }

    pub fn outbound_url(&self, path: &str) -> String {
        format!("http://{}:{}{path}", self.host(), self.ports.outbound)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}:{}{path}", self.host(), self.ports.admin)
    }

    pub fn inbound_addr(&self) -> SocketAddr {
        SocketAddr::from((self.host(), self.ports.inbound))
    }

    /// `/stats/prometheus`, parsed.
    pub fn scrape(&self) -> Scrape {
        let r = self
            .client
            .get(&self.admin_url("/stats/prometheus"))
            .unwrap_or_else(|e| panic!("scrape failed: {e}"));
        Scrape::parse(&String::from_utf8_lossy(&r.body))
    }

    /// Waits (10 s at most) until a request to `host` through the outbound
    /// listener is answered 200 (e.g. once the router has read its registry).
    pub fn wait_outbound_ok(&self, c: &crate::Client, host: &str) {
        crate::wait_for(
            10,
            &format!("a 200 from {host} through the outbound listener"),
            || {
                let r = c
                    .request("GET", &self.outbound_url("/x"), &[("host", host)], b"")
                    .ok()?;
                (r.status == 200).then_some(())
            },
        );
    }

    /// Scrapes until each (name, labels) sums to exactly its expected value,
    /// and returns that scrape; panics after 10 s with the last scrape.
    /// Counters are not all up to date when a response arrives: the native
    /// module sums a worker's counters and records them every tick (100 ms),
    /// and the log phase runs after the response.
    pub fn scrape_counts(&self, expected: &[Count]) -> Scrape {
        let want: Vec<String> = expected
            .iter()
            .map(|(n, l, v)| format!("{n}{l:?} = {v}"))
            .collect();
        self.scrape_until(&want.join(", "), |s| {
            expected.iter().all(|(n, l, v)| s.sum(n, l) == *v)
        })
    }

    /// Scrapes until `ok` holds (histograms reach the admin only after a
    /// stats flush, which the scrape itself triggers); panics after 10 s with
    /// the last scrape.
    pub fn scrape_until(&self, what: &str, ok: impl Fn(&Scrape) -> bool) -> Scrape {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let s = self.scrape();
            if ok(&s) {
                return s;
            }
            if std::time::Instant::now() > deadline {
                panic!(
                    "timed out waiting for {what}; last scrape:\n{}",
                    s.text_of("txmesh")
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }

    pub fn log(&self) -> String {
        self.guard.log_text()
    }
}

/// Runs `envoy --mode validate -c <path>`; returns (ok, output).
pub fn validate(path: &Path) -> (bool, String) {
    let root = crate::workspace_root();
    let out = Command::new(crate::envoy_bin())
        .env("ENVOY_DYNAMIC_MODULES_SEARCH_PATH", crate::native_dir())
        .current_dir(&root)
        .args(["--mode", "validate", "-c"])
        .arg(path)
        .args(["-l", "error", "--base-id", &free_port().to_string()])
        .output()
        .unwrap_or_else(|e| panic!("cannot run envoy: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}
