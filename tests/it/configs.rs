//! Every Envoy config shipped in `envoy/` passes `envoy --mode validate`, and
//! carries the stats_tags the filters need.

use txmesh_tests::envoy::{validate, METRICS_TAGS, TXN_TAGS};
use txmesh_tests::workspace_root;

fn shipped_configs() -> Vec<std::path::PathBuf> {
    let dir = workspace_root().join("envoy");
    let mut v: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
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
            tags.extend(METRICS_TAGS);
        }
        if text.contains("txmesh_txn.wasm") {
            tags.extend(TXN_TAGS);
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
