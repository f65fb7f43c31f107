//! The shop stack as users run it: scripts/shop.sh (`make up`), on free
//! ports (a port offset) and in a private directory.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// An offset that makes every port of the stack free right now.
pub fn free_offset() -> u16 {
    const PORTS: &[u16] = &[
        2379, 2380, 9090, 9901, 10000, 15000, 15001, 15006, 15008, 15100, 15101, 15106, 15108,
        15200, 15201, 15206, 15208, 18080, 18081, 18082,
    ];
    let seed = std::process::id();
    for i in 0..200u32 {
        // Every port + offset (and + 80 for a ninth instance) stays below
        // 32768, where the kernel's ephemeral ports begin: a connection
        // another test opens meanwhile cannot take one of the stack's ports
        // between this check and the service's bind (it did once).
        let off = (1_000 + (seed.wrapping_mul(31).wrapping_add(i * 97) % 680) * 20) as u16;
        if PORTS
            .iter()
            .all(|p| std::net::TcpListener::bind(("127.0.0.1", p + off)).is_ok())
        {
            return off;
        }
    }
    panic!("no free port offset");
}

pub struct ShopStack {
    pub home: PathBuf,
    pub off: u16,
    /// Also start Prometheus (`TXMESH_PROMETHEUS=1`).
    pub prometheus: bool,
}

impl ShopStack {
    pub fn run(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(root().join("scripts/shop.sh"))
            .args(args)
            .env("TXMESH_HOME", &self.home)
            .env("TXMESH_PORT_OFFSET", self.off.to_string())
            .env("TXMESH_SKIP_BUILD", "1")
            .env("TXMESH_PROMETHEUS", if self.prometheus { "1" } else { "0" })
            .env("SHOP_BIN", env!("CARGO_BIN_EXE_shop"))
            .env("DEMO_BIN", env!("CARGO_BIN_EXE_shop-demo"))
            .output()
            .expect("run scripts/shop.sh");
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        println!("$ scripts/shop.sh {}\n{text}", args.join(" "));
        (out.status.success(), text)
    }

    pub fn demo(&self, n: &str) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_shop-demo"))
            .args([
                "--ingress",
                &format!("http://127.0.0.1:{}", 10_000 + self.off),
            ])
            .args([
                "--admin",
                &format!("http://127.0.0.1:{}", 15_000 + self.off),
            ])
            .arg("--data")
            .arg(self.home.join("data"))
            .args(["--checkouts", n, "--concurrency", "4"])
            .output()
            .expect("run shop-demo");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        println!("{text}");
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    }
}

impl Drop for ShopStack {
    fn drop(&mut self) {
        self.run(&["down"]);
    }
}
