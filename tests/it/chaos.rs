//! The short history-checker run inside `make test`: 200 randomized
//! transactions in pods under every kind of fault — at least one partition
//! and one link-proxy fault (`make chaos` runs 1000).

use std::process::Command;

#[test]
fn history_check_200_transactions_in_pods_with_faults() {
    txmesh_tests::wasm("txmesh_txn");
    let t = std::time::Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_chaos"))
        .args(["--txns", "200", "--seed", "7", "--pace-ms", "400"])
        .args(["--faults", "all", "--net", "pods"])
        .output()
        .expect("run chaos");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    println!("history check took {:.1} s", t.elapsed().as_secs_f64());
    assert!(out.status.success(), "history check failed:\n{text}");
    assert!(text.contains("| violations | 0 |"), "{text}");
    assert!(text.contains("| transactions submitted | 200 |"), "{text}");
    let faults = |kind: &str| -> u32 {
        text.lines()
            .filter(|l| l.starts_with(&format!("| &nbsp;&nbsp;{kind}")))
            .filter_map(|l| l.rsplit('|').nth(1)?.trim().parse::<u32>().ok())
            .sum()
    };
    let partitions = faults("partition") + faults("one-way");
    let proxied = faults("link:");
    assert!(partitions >= 1, "no partition in the run:\n{text}");
    assert!(proxied >= 1, "no link-proxy fault in the run:\n{text}");
    assert!(text.contains("[chaos] history: "), "{text}");
}
