//! `make up`, `kill -9` a service, `make up` again: the stack recovers and the
//! invariants hold. Runs scripts/shop.sh itself, on free ports (a port
//! offset) and in a private directory.

mod shopsh;

use shopsh::{free_offset, ShopStack};

#[test]
fn the_stack_recovers_from_a_killed_service() {
    txmesh_tests::wasm("txmesh_txn");
    let s = ShopStack {
        home: txmesh_tests::scratch_dir("shop-updown"),
        off: free_offset(),
        prometheus: false,
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
