//! Every Envoy config shipped in `envoy/` passes `envoy --mode validate`, and
//! carries the stats_tags the filters need.

use txmesh_core::labels::TXN_LABELS;
use txmesh_core::metrics::LABELS as METRICS_LABELS;
use txmesh_tests::envoy::validate;
use txmesh_tests::workspace_root;

/// envoy/*.yaml and envoy/native/*.yaml (the native tier's, docs/native.md).
fn shipped_configs() -> Vec<std::path::PathBuf> {
    let read = |d: &str| std::fs::read_dir(workspace_root().join(d)).unwrap();
    let mut v: Vec<_> = read("envoy")
        .chain(read("envoy/native"))
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            (name.ends_with(".yaml") || name.ends_with(".json"))
                && !name.starts_with("docker-compose")
        })
        .collect();
    v.sort();
    v
}

#[test]
fn every_shipped_config_validates() {
    txmesh_tests::wasm("txmesh_metrics");
    txmesh_tests::native_module();
    // The sidecar configs name the demo certificates (.txmesh/certs).
    let st = std::process::Command::new(workspace_root().join("scripts/certs.sh"))
        .current_dir(workspace_root())
        .args(["order", "payment", "inventory", "ingress"])
        .status()
        .unwrap();
    assert!(st.success());
    let configs = shipped_configs();
    assert!(!configs.is_empty());
    for p in configs {
        let (ok, out) = validate(&p);
        assert!(ok, "{} does not validate:\n{out}", p.display());
    }
}

#[test]
fn shipped_configs_extract_every_label() {
    for p in shipped_configs() {
        let text = std::fs::read_to_string(&p).unwrap();
        let mut tags: Vec<&str> = Vec::new();
        if text.contains("txmesh_metrics.wasm") {
            tags.extend(METRICS_LABELS);
        }
        if text.contains("txmesh_txn.wasm") {
            tags.extend(TXN_LABELS);
        }
        for tag in tags {
            let want = format!("{{tag_name: {tag}, regex: '({tag}=\\.=(.*?);\\.;)'}}");
            assert!(
                text.contains(&want),
                "{} lacks stats_tags entry {want}",
                p.display()
            );
        }
    }
}

/// The gated example's matcher is what `TxnConfig::gate_matcher` (and so
/// `txmeshctl gate`) computes from the filter config next to it.
#[test]
fn the_gated_example_matches_its_filter_config() {
    let path = workspace_root().join("envoy/txn-gated-sidecar.yaml");
    let doc: serde_json::Value =
        serde_yaml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let f = &doc["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        ["typed_config"]["http_filters"][0]["typed_config"];
    let config = f["extension_config"]["typed_config"]["config"]["configuration"]["value"]
        .as_str()
        .unwrap();
    let want = txmesh_core::txn::config::TxnConfig::parse(config.as_bytes())
        .unwrap()
        .gate_matcher();
    assert_eq!(f["xds_matcher"], want, "regenerate with `txmeshctl gate`");
}

#[test]
fn validation_catches_a_broken_config() {
    let dir = txmesh_tests::scratch_dir("broken");
    let p = dir.join("broken.yaml");
    std::fs::write(
        &p,
        "static_resources:\n  clusters:\n  - name: x\n    type: NOT_A_TYPE\n",
    )
    .unwrap();
    let (ok, out) = validate(&p);
    assert!(!ok, "a broken config validated:\n{out}");
}

/// The function names a wasm module exports (its export section).
fn wasm_exports(bytes: &[u8]) -> Vec<String> {
    fn leb(b: &[u8], i: &mut usize) -> usize {
        let (mut r, mut shift) = (0usize, 0);
        loop {
            let x = b[*i];
            *i += 1;
            r |= usize::from(x & 0x7f) << shift;
            shift += 7;
            if x < 0x80 {
                return r;
            }
        }
    }
    assert_eq!(&bytes[..4], b"\0asm", "not a wasm module");
    let mut i = 8;
    let mut out = Vec::new();
    while i < bytes.len() {
        let id = bytes[i];
        i += 1;
        let len = leb(bytes, &mut i);
        let end = i + len;
        if id == 7 {
            for _ in 0..leb(bytes, &mut i) {
                let n = leb(bytes, &mut i);
                let name = String::from_utf8(bytes[i..i + n].to_vec()).unwrap();
                i += n;
                let kind = bytes[i];
                i += 1;
                leb(bytes, &mut i);
                if kind == 0 {
                    out.push(name);
                }
            }
        }
        i = end;
    }
    out.sort();
    out
}

/// Envoy calls into the VM only for the callbacks a module exports, and each
/// call costs (BENCHMARKS.md): each filter exports exactly the ones it uses
/// (docs/architecture.md, "The runtime").
#[test]
fn each_filter_exports_only_the_callbacks_it_uses() {
    let common = [
        "proxy_abi_version_0_2_1",
        "proxy_on_memory_allocate",
        "proxy_on_configure",
        "proxy_on_context_create",
    ];
    let cases: [(&str, &[&str]); 4] = [
        (
            "txmesh_metrics",
            &["proxy_on_request_headers", "proxy_on_log"],
        ),
        ("txmesh_authz", &["proxy_on_request_headers"]),
        (
            "txmesh_router",
            &[
                "proxy_on_request_headers",
                "proxy_on_log",
                "proxy_on_tick",
                "proxy_on_http_call_response",
            ],
        ),
        (
            "txmesh_txn",
            &[
                "proxy_on_request_headers",
                "proxy_on_response_headers",
                "proxy_on_response_trailers",
                "proxy_on_log",
                "proxy_on_tick",
                "proxy_on_http_call_response",
                "proxy_on_grpc_receive",
                "proxy_on_grpc_close",
            ],
        ),
    ];
    for (module, own) in cases {
        let bytes = std::fs::read(txmesh_tests::wasm(module)).unwrap();
        let mut want: Vec<String> = common.iter().chain(own).map(|s| s.to_string()).collect();
        want.sort();
        assert_eq!(wasm_exports(&bytes), want, "{module}.wasm exports");
    }
}

/// The shop's configs have one producer: envoy/*.yaml are exactly what
/// scripts/dev/gen-sidecar-configs.py writes (scripts/shop.sh runs the same
/// generator with its ports, certificates and instances).
#[test]
fn the_committed_shop_configs_are_what_the_generator_writes() {
    for (host, dir) in [("wasm", "envoy/"), ("native", "envoy/native/")] {
        let out = std::process::Command::new("python3")
            .arg("scripts/dev/gen-sidecar-configs.py")
            .args(["--check", "--host", host])
            .current_dir(workspace_root())
            .output()
            .expect("python3");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{text}");
        assert!(
            text.contains(&format!("{dir}: 4 configs as generated")),
            "{text}"
        );
    }
}
