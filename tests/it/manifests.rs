//! Every Istio manifest and the docker-compose file parse, carry the fields
//! Istio and Compose require, and every WasmPlugin's pluginConfig is accepted
//! by the filter's own configuration parser.

use serde::Deserialize;
use serde_yaml::Value;
use txmesh_tests::workspace_root;

fn docs(path: &std::path::Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn s<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(v, |v, k| v.get(*k))?.as_str()
}

/// One EnvoyFilter patch inserting a filter of libtxmesh.so: an HTTP filter
/// of the HTTP connection manager, the dynamic-module filter type, a filter
/// name the module provides, and a config its parser accepts.
fn native_patch(at: &str, p: &Value) {
    assert_eq!(s(p, &["applyTo"]), Some("HTTP_FILTER"), "{at}");
    let context = s(p, &["match", "context"]).unwrap_or_default();
    assert!(
        ["SIDECAR_INBOUND", "SIDECAR_OUTBOUND", "GATEWAY"].contains(&context),
        "{at}: context {context}"
    );
    assert_eq!(
        s(p, &["match", "listener", "filterChain", "filter", "name"]),
        Some("envoy.filters.network.http_connection_manager"),
        "{at}"
    );
    let op = s(p, &["patch", "operation"]).unwrap_or_default();
    assert!(
        ["INSERT_FIRST", "INSERT_BEFORE", "INSERT_AFTER"].contains(&op),
        "{at}: operation {op}"
    );
    let tc = &p["patch"]["value"]["typed_config"];
    assert_eq!(
        s(tc, &["@type"]),
        Some("type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter"),
        "{at}"
    );
    assert_eq!(
        s(tc, &["dynamic_module_config", "name"]),
        Some("txmesh"),
        "{at}"
    );
    let cfg = s(tc, &["filter_config", "value"])
        .unwrap_or_else(|| panic!("{at}: filter_config.value"))
        .as_bytes();
    native_config(at, s(tc, &["filter_name"]), cfg);
}

/// A config for the module's filter `filter_name`, which it must provide;
/// the config must be accepted by that filter's own parser.
fn native_config(at: &str, filter_name: Option<&str>, cfg: &[u8]) {
    let parsed = match filter_name {
        Some("authz") => txmesh_core::authz::AuthzConfig::parse(cfg).map(|_| ()),
        Some("metrics") => txmesh_core::metrics::MetricsConfig::parse(cfg).map(|_| ()),
        Some("router") => txmesh_core::router::config::RouterConfig::parse(cfg).map(|_| ()),
        other => panic!("{at}: filter_name {other:?} is not one libtxmesh.so provides"),
    };
    parsed.unwrap_or_else(|e| panic!("{at}: {e}"));
}

/// The Envoy Gateway example: the module registered in the EnvoyProxy's
/// allowlist at the path docker/native.Dockerfile puts it, the Gateway
/// using that EnvoyProxy, and every dynamicModule of the policy naming a
/// registered module, a filter it provides and a config its parser accepts.
#[test]
fn the_envoy_gateway_example_registers_the_module_and_configures_its_filters() {
    let root = workspace_root();
    let path = root.join("deploy/envoy-gateway/txmesh-native.yaml");
    let all = docs(&path);
    let of = |kind: &str| -> Vec<&Value> {
        all.iter()
            .filter(|d| s(d, &["kind"]) == Some(kind))
            .collect()
    };
    let proxies = of("EnvoyProxy");
    assert_eq!(proxies.len(), 1);
    let proxy = proxies[0];
    assert_eq!(
        s(proxy, &["apiVersion"]),
        Some("gateway.envoyproxy.io/v1alpha1")
    );
    let dockerfile = std::fs::read_to_string(root.join("docker/native.Dockerfile")).unwrap();
    let registered: Vec<&str> = proxy["spec"]["dynamicModules"]
        .as_sequence()
        .unwrap_or_else(|| panic!("EnvoyProxy spec.dynamicModules"))
        .iter()
        .map(|m| {
            let name = s(m, &["name"]).unwrap_or_else(|| panic!("a module without a name"));
            assert_eq!(s(m, &["source", "type"]), Some("Local"), "{name}");
            let so = s(m, &["source", "local", "path"]).unwrap_or_default();
            assert!(
                so.starts_with('/') && dockerfile.contains(so),
                "{name}: {so} is not where docker/native.Dockerfile puts the module"
            );
            name
        })
        .collect();
    let proxy_name = s(proxy, &["metadata", "name"]);
    let gateways = of("Gateway");
    assert_eq!(gateways.len(), 1);
    assert_eq!(
        s(
            gateways[0],
            &["spec", "infrastructure", "parametersRef", "name"]
        ),
        proxy_name
    );
    let policies = of("EnvoyExtensionPolicy");
    assert_eq!(policies.len(), 1);
    let p = policies[0];
    assert_eq!(
        s(p, &["apiVersion"]),
        Some("gateway.envoyproxy.io/v1alpha1")
    );
    let targets = p["spec"]["targetRefs"]
        .as_sequence()
        .unwrap_or_else(|| panic!("targetRefs"));
    assert!(targets
        .iter()
        .all(|t| s(t, &["name"]) == s(gateways[0], &["metadata", "name"])));
    let modules = p["spec"]["dynamicModule"]
        .as_sequence()
        .unwrap_or_else(|| panic!("EnvoyExtensionPolicy spec.dynamicModule"));
    let mut filters = Vec::new();
    for m in modules {
        let name = s(m, &["name"]).unwrap_or_default();
        assert!(registered.contains(&name), "{name} is not registered");
        let filter = s(m, &["filterName"]);
        let cfg = serde_json::to_vec(&m["config"]).unwrap();
        native_config(&format!("{}: {filter:?}", path.display()), filter, &cfg);
        filters.extend(filter);
    }
    assert_eq!(filters, ["authz", "metrics"]);
}

#[test]
fn istio_manifests_have_what_istio_requires() {
    let dir = workspace_root().join("istio");
    let mut kinds: Vec<String> = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for f in files
        .iter()
        .filter(|f| f.extension().is_some_and(|e| e == "yaml"))
    {
        for d in docs(f) {
            let at = format!("{} ({:?})", f.display(), s(&d, &["metadata", "name"]));
            let api = s(&d, &["apiVersion"]).unwrap_or_else(|| panic!("{at}: no apiVersion"));
            let kind = s(&d, &["kind"])
                .unwrap_or_else(|| panic!("{at}: no kind"))
                .to_string();
            assert!(
                s(&d, &["metadata", "name"]).is_some(),
                "{at}: no metadata.name"
            );
            if kind != "Namespace" {
                assert_eq!(
                    s(&d, &["metadata", "namespace"]),
                    Some("shop"),
                    "{at}: namespace"
                );
            }
            match kind.as_str() {
                "WasmPlugin" => {
                    assert_eq!(api, "extensions.istio.io/v1alpha1", "{at}");
                    let spec = &d["spec"];
                    assert!(
                        spec["selector"]["matchLabels"]
                            .as_mapping()
                            .is_some_and(|m| !m.is_empty()),
                        "{at}: selector.matchLabels"
                    );
                    let url = s(spec, &["url"]).unwrap_or_default();
                    assert!(url.starts_with("oci://"), "{at}: url {url}");
                    let sha = s(spec, &["sha256"]).unwrap_or_default();
                    assert!(
                        sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit()),
                        "{at}: sha256 {sha:?}"
                    );
                    let phase = s(spec, &["phase"]).unwrap_or_default();
                    assert!(
                        ["AUTHN", "AUTHZ", "STATS", "UNSPECIFIED_PHASE"].contains(&phase),
                        "{at}: phase {phase}"
                    );
                    assert!(spec["priority"].as_i64().is_some(), "{at}: priority");
                    let fail = s(spec, &["failStrategy"]).unwrap_or_default();
                    assert!(
                        ["FAIL_CLOSE", "FAIL_OPEN", "FAIL_RELOAD"].contains(&fail),
                        "{at}: failStrategy {fail}"
                    );
                    let cfg = serde_json::to_vec(&spec["pluginConfig"]).unwrap();
                    if url.contains("txmesh_txn") {
                        assert_eq!(fail, "FAIL_CLOSE", "{at}: the txn filter never fails open");
                        txmesh_core::txn::config::TxnConfig::parse(&cfg)
                            .unwrap_or_else(|e| panic!("{at}: pluginConfig {e}"));
                    } else if url.contains("txmesh_authz") {
                        assert_eq!(fail, "FAIL_CLOSE", "{at}: authorization never fails open");
                        txmesh_core::authz::AuthzConfig::parse(&cfg)
                            .unwrap_or_else(|e| panic!("{at}: pluginConfig {e}"));
                    } else if url.contains("txmesh_metrics") {
                        txmesh_core::metrics::MetricsConfig::parse(&cfg)
                            .unwrap_or_else(|e| panic!("{at}: pluginConfig {e}"));
                    } else {
                        panic!("{at}: which filter is {url}?");
                    }
                }
                "Deployment" | "StatefulSet" => {
                    let spec = &d["spec"];
                    let sel = spec["selector"]["matchLabels"]
                        .as_mapping()
                        .unwrap_or_else(|| panic!("{at}: selector"));
                    let labels = spec["template"]["metadata"]["labels"]
                        .as_mapping()
                        .unwrap_or_else(|| panic!("{at}: template labels"));
                    for (k, v) in sel {
                        assert_eq!(
                            labels.get(k),
                            Some(v),
                            "{at}: selector {k:?} not on the pod template"
                        );
                    }
                    let containers = spec["template"]["spec"]["containers"]
                        .as_sequence()
                        .unwrap_or_else(|| panic!("{at}: containers"));
                    assert!(
                        containers
                            .iter()
                            .all(|c| s(c, &["image"]).is_some() && s(c, &["name"]).is_some()),
                        "{at}: container name/image"
                    );
                }
                "Service" => {
                    let ports = d["spec"]["ports"]
                        .as_sequence()
                        .unwrap_or_else(|| panic!("{at}: ports"));
                    assert!(
                        ports.iter().all(|p| p["port"].as_i64().is_some()),
                        "{at}: port numbers"
                    );
                    assert!(
                        d["spec"]["selector"].as_mapping().is_some(),
                        "{at}: selector"
                    );
                }
                "PeerAuthentication" => {
                    assert_eq!(s(&d, &["spec", "mtls", "mode"]), Some("STRICT"), "{at}")
                }
                "DestinationRule" => assert!(s(&d, &["spec", "host"]).is_some(), "{at}: host"),
                "ServiceEntry" => {
                    assert!(
                        d["spec"]["hosts"]
                            .as_sequence()
                            .is_some_and(|h| !h.is_empty()),
                        "{at}: hosts"
                    );
                    let ports = d["spec"]["ports"]
                        .as_sequence()
                        .unwrap_or_else(|| panic!("{at}: ports"));
                    assert!(
                        ports
                            .iter()
                            .all(|p| p["number"].as_i64().is_some() && s(p, &["name"]).is_some()),
                        "{at}: port number/name"
                    );
                    assert!(s(&d, &["spec", "resolution"]).is_some(), "{at}: resolution");
                }
                "AuthorizationPolicy" => {
                    assert_eq!(api, "security.istio.io/v1", "{at}");
                    let action = s(&d, &["spec", "action"]).unwrap_or("ALLOW");
                    assert!(
                        ["ALLOW", "DENY", "AUDIT", "CUSTOM"].contains(&action),
                        "{at}"
                    );
                    let rules = d["spec"]["rules"]
                        .as_sequence()
                        .unwrap_or_else(|| panic!("{at}: rules"));
                    assert!(!rules.is_empty(), "{at}: rules");
                }
                "EnvoyFilter" => {
                    assert_eq!(api, "networking.istio.io/v1alpha3", "{at}");
                    assert!(
                        d["spec"]["workloadSelector"]["labels"]
                            .as_mapping()
                            .is_some_and(|m| !m.is_empty()),
                        "{at}: workloadSelector.labels"
                    );
                    let patches = d["spec"]["configPatches"]
                        .as_sequence()
                        .unwrap_or_else(|| panic!("{at}: configPatches"));
                    assert!(!patches.is_empty(), "{at}: configPatches");
                    for p in patches {
                        native_patch(&at, p);
                    }
                }
                "Namespace" | "ServiceAccount" => {}
                other => panic!("{at}: unexpected kind {other}"),
            }
            kinds.push(kind);
        }
    }
    for want in [
        "WasmPlugin",
        "Deployment",
        "Service",
        "StatefulSet",
        "Namespace",
        "PeerAuthentication",
    ] {
        assert!(kinds.iter().any(|k| k == want), "no {want} in istio/");
    }
    assert_eq!(
        kinds.iter().filter(|k| *k == "WasmPlugin").count(),
        5,
        "txn (HTTP and gRPC participants) + metrics inbound/outbound + authz"
    );
    assert!(kinds.iter().any(|k| k == "AuthorizationPolicy"));
    assert!(
        kinds.iter().any(|k| k == "EnvoyFilter"),
        "the native tier's EnvoyFilter"
    );
}

#[test]
fn docker_compose_runs_the_same_envoy_configs() {
    let root = workspace_root();
    let d = &docs(&root.join("envoy/docker-compose.yaml"))[0];
    let services = d["services"].as_mapping().expect("services");
    for name in [
        "etcd",
        "order",
        "payment",
        "inventory",
        "order-sidecar",
        "payment-sidecar",
        "inventory-sidecar",
        "ingress",
    ] {
        assert!(services.contains_key(name), "docker-compose lacks {name}");
    }
    // Every Envoy command names a config that exists in envoy/ (the same
    // configs `make up` uses, validated by tests/it/configs.rs).
    let text = std::fs::read_to_string(root.join("envoy/docker-compose.yaml")).unwrap();
    for cfg in [
        "order-sidecar.yaml",
        "payment-sidecar.yaml",
        "inventory-sidecar.yaml",
        "ingress.yaml",
    ] {
        assert!(
            text.contains(&format!("/txmesh/envoy/{cfg}")),
            "{cfg} not used"
        );
        assert!(root.join("envoy").join(cfg).exists(), "{cfg} missing");
    }
    for f in [
        "docker/shop.Dockerfile",
        "docker/wasm.Dockerfile",
        "docker/native.Dockerfile",
    ] {
        let t = std::fs::read_to_string(root.join(f)).unwrap();
        assert!(t.contains("FROM "), "{f}");
    }
    let wasm = std::fs::read_to_string(root.join("docker/wasm.Dockerfile")).unwrap();
    assert!(
        wasm.contains("FROM scratch") && wasm.contains("plugin.wasm"),
        "the OCI wasm image layout"
    );
    // The native tier: Envoy 1.40 (what the module is built for) with the
    // module where `dynamic_module_config: {name: txmesh}` finds it.
    let native = std::fs::read_to_string(root.join("docker/native.Dockerfile")).unwrap();
    assert!(native.contains("FROM envoyproxy/envoy:v1.40"), "{native}");
    assert!(
        native.contains("--profile native -p txmesh-native"),
        "{native}"
    );
    let dir = native
        .lines()
        .find_map(|l| l.strip_prefix("ENV ENVOY_DYNAMIC_MODULES_SEARCH_PATH="))
        .unwrap_or_else(|| panic!("no search path in {native}"));
    assert!(
        native.contains(&format!("{dir}/libtxmesh.so")),
        "the module is copied into {dir}"
    );
}
