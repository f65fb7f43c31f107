//! The small history-checker run inside `make test`: 100 randomized
//! transactions under a seeded fault schedule (`make chaos` runs 1000).

use std::process::Command;

#[test]
fn history_check_100_transactions_with_faults() {
    txmesh_tests::wasm("txmesh_txn");
    let out = Command::new(env!("CARGO_BIN_EXE_chaos"))
        .args(["--txns", "100", "--seed", "7", "--pace-ms", "400"])
        .output()
        .expect("run chaos");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(out.status.success(), "history check failed:\n{text}");
    assert!(text.contains("| violations | 0 |"), "{text}");
    assert!(text.contains("| transactions submitted | 100 |"), "{text}");
    let faults: u32 = text
        .lines()
        .find_map(|l| l.strip_prefix("| faults injected | "))
        .and_then(|v| v.trim_end_matches(" |").parse().ok())
        .unwrap_or(0);
    assert!(
        faults >= 2,
        "the run injected only {faults} faults:\n{text}"
    );
}
