//! The demo scenario, smaller, on a stack with free ports: every invariant holds.

mod stack;

use std::process::Command;

#[test]
fn the_demo_scenario_keeps_every_invariant() {
    let s = stack::Stack::start();
    let out = Command::new(env!("CARGO_BIN_EXE_shop-demo"))
        .args(["--ingress", &s.order_sc.inbound_url("")])
        .args(["--data", &s.dir.display().to_string()])
        .args(["--admin", &s.order_sc.admin_url("")])
        .args(["--checkouts", "60", "--concurrency", "4"])
        .output()
        .expect("run shop-demo");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    println!("{text}");
    assert!(out.status.success(), "{text}");
    assert!(text.contains("[demo] all invariants hold"), "{text}");
    assert!(!text.contains("**NO**"), "{text}");
    assert!(text.contains("| committed |"), "{text}");
    assert!(
        text.contains("aborted: insufficient_funds") || text.contains("aborted: out_of_stock"),
        "some aborts: {text}"
    );
}
