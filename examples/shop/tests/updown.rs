//! `make up`, `kill -9` a service, `make up` again: the stack recovers and the
//! invariants hold. Runs scripts/shop.sh itself, on free ports (a port
//! offset) and in a private directory.

use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// An offset that makes every port of the stack free right now.
fn free_offset() -> u16 {
    const PORTS: &[u16] = &[
        2379, 2380, 9901, 10000, 15000, 15001, 15006, 15100, 15101, 15106, 15200, 15201, 15206,
        18080, 18081, 18082,
    ];
    let seed = std::process::id();
    for i in 0..200u32 {
        // Every port + offset stays below 64100.
        let off = (20_000 + (seed.wrapping_mul(31).wrapping_add(i * 97) % 1_300) * 20) as u16;
        if PORTS
            .iter()
            .all(|p| std::net::TcpListener::bind(("127.0.0.1", p + off)).is_ok())
        {
            return off;
        }
    }
    panic!("no free port offset");
}

struct ShopStack {
    home: PathBuf,
    off: u16,
}

impl ShopStack {
    fn run(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(root().join("scripts/shop.sh"))
            .args(args)
            .env("TXMESH_HOME", &self.home)
            .env("TXMESH_PORT_OFFSET", self.off.to_string())
            .env("TXMESH_SKIP_BUILD", "1")
            .env("SHOP_BIN", env!("CARGO_BIN_EXE_shop"))
            .env("DEMO_BIN", env!("CARGO_BIN_EXE_shop-demo"))
            .output()
            .expect("run scripts/shop.sh");
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        println!("$ scripts/shop.sh {}\n{text}", args.join(" "));
        (out.status.success(), text)
    }

    fn demo(&self, n: &str) -> String {
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

#[test]
fn the_stack_recovers_from_a_killed_service() {
    txmesh_tests::wasm("txmesh_txn");
    let s = ShopStack {
        home: txmesh_tests::scratch_dir("shop-updown"),
        off: free_offset(),
    };
    let (ok, text) = s.run(&["up"]);
    assert!(ok, "{text}");
    assert!(text.contains("[shop] ready."), "{text}");
    s.demo("30");

    // kill -9 the payment service (its process group: the service and the
    // sh that parents it), then `up` starts only what is missing.
    let pid: i32 = std::fs::read_to_string(s.home.join("run/payment.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    unsafe { libc_kill(pid) };
    std::thread::sleep(std::time::Duration::from_millis(300));
    let (ok, text) = s.run(&["up"]);
    assert!(ok, "{text}");
    assert!(
        text.contains("[shop] payment up on"),
        "payment restarted: {text}"
    );
    assert!(
        text.contains("[shop] order already running"),
        "the rest untouched: {text}"
    );
    let out = s.demo("30");
    assert!(out.contains("all invariants hold"), "{out}");
    let (_, status) = s.run(&["status"]);
    assert_eq!(status.matches(": running").count(), 8, "{status}");
}

/// SIGKILL to the process group `pid` leads.
unsafe fn libc_kill(pid: i32) {
    extern "C" {
        fn kill(pid: i32, sig: i32) -> i32;
    }
    kill(-pid, 9);
}
