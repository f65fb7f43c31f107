//! Demo identities for tests, made by `scripts/certs.sh` (the tool users run):
//! a CA and per-workload certificates with SPIFFE URI SANs.

use std::path::PathBuf;
use std::process::Command;

#[derive(Clone, Debug)]
pub struct Certs {
    pub dir: PathBuf,
}

impl Certs {
    /// A fresh CA (its own directory) and certificates for `names`.
    pub fn make(label: &str, names: &[&str]) -> Self {
        let dir = crate::scratch_dir(&format!("certs-{label}"));
        let out = Command::new(crate::workspace_root().join("scripts/certs.sh"))
            .arg("--out")
            .arg(&dir)
            .args(names)
            .output()
            .unwrap_or_else(|e| panic!("scripts/certs.sh: {e}"));
        assert!(
            out.status.success(),
            "scripts/certs.sh failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { dir }
    }
    pub fn ca(&self) -> String {
        self.dir.join("ca.crt").display().to_string()
    }
    pub fn crt(&self, name: &str) -> String {
        self.dir.join(format!("{name}.crt")).display().to_string()
    }
    pub fn key(&self, name: &str) -> String {
        self.dir.join(format!("{name}.key")).display().to_string()
    }
}

/// The SPIFFE id scripts/certs.sh gives workload `name`.
pub fn spiffe(name: &str) -> String {
    format!("spiffe://txmesh.local/ns/shop/sa/{name}")
}
