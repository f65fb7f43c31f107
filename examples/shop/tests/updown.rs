//! `make up`, `kill -9` one process of the stack, `make up` again: exactly
//! that process comes back, with the data, and the invariants hold; `make
//! down` then leaves no process of the stack behind. Runs scripts/shop.sh
//! itself, on free ports (a port offset) and in a private directory.

mod shopsh;

use shopsh::{free_offset, ShopStack};
use std::path::Path;
use txmesh_tests::wait_for;

/// The pid in `run/<name>.<ext>` (`pid`: the process that serves; `pgid`:
/// its process group).
fn read_id(home: &Path, name: &str, ext: &str) -> i32 {
    let path = home.join(format!("run/{name}.{ext}"));
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Whether process `pid` exists and is not a zombie.
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
    })
}

/// Every live process whose process group is `pgid`.
fn group_members(pgid: i32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                // Fields after the command: state ppid pgrp ...
                let rest: Vec<&str> = s
                    .rsplit(')')
                    .next()
                    .unwrap_or("")
                    .split_whitespace()
                    .collect();
                rest.first() != Some(&"Z") && rest.get(2) == Some(&pgid.to_string().as_str())
            })
        })
        .collect()
}

#[test]
fn any_killed_process_comes_back_and_down_stops_everything() {
    txmesh_tests::wasm("txmesh_txn");
    let s = ShopStack {
        home: txmesh_tests::scratch_dir("shop-updown"),
        off: free_offset(),
        prometheus: false,
    };
    let (ok, text) = s.run(&["up"]);
    assert!(ok, "{text}");
    assert!(text.contains("[shop] ready."), "{text}");
    s.demo("20");

    // One of each kind: an app, a sidecar, etcd, the ingress.
    for name in ["payment", "payment-sidecar", "etcd", "ingress"] {
        let pid = read_id(&s.home, name, "pid");
        // SAFETY: a signal to a process of the test's own stack.
        unsafe { libc_kill(pid, 9) };
        wait_for(10, &format!("{name} (pid {pid}) gone"), || {
            (!alive(pid)).then_some(())
        });
        let (ok, text) = s.run(&["up"]);
        assert!(ok, "{text}");
        assert!(
            text.contains(&format!("[shop] {name} up on")),
            "{name} restarted: {text}"
        );
        let restarted = text.matches(" up on ").count();
        assert_eq!(restarted, 1, "only {name} restarted: {text}");
        assert_ne!(read_id(&s.home, name, "pid"), pid);
        let out = s.demo("10");
        assert!(out.contains("all invariants hold"), "after {name}: {out}");
    }
    let (_, status) = s.run(&["status"]);
    assert_eq!(status.matches(": running").count(), 8, "{status}");

    // kill -9 of a group leader (the sh that parents a service) leaves the
    // service orphaned in its group: `down` still stops it, and every
    // other process of the stack.
    let orphaned = read_id(&s.home, "order", "pid");
    unsafe { libc_kill(read_id(&s.home, "order", "pgid"), 9) };
    let groups: Vec<i32> = std::fs::read_dir(s.home.join("run"))
        .unwrap()
        .filter_map(|e| {
            let name = e.ok()?.file_name().to_str()?.to_string();
            let svc = name.strip_suffix(".pgid")?;
            Some(read_id(&s.home, svc, "pgid"))
        })
        .collect();
    assert_eq!(groups.len(), 8, "{groups:?}");
    let (ok, text) = s.run(&["down"]);
    assert!(ok, "{text}");
    assert!(!alive(orphaned), "the orphaned order service survived down");
    for g in groups {
        assert_eq!(
            group_members(g),
            Vec::<i32>::new(),
            "group {g} survived down"
        );
    }
}

/// `kill(2)`.
unsafe fn libc_kill(pid: i32, sig: i32) {
    extern "C" {
        fn kill(pid: i32, sig: i32) -> i32;
    }
    kill(pid, sig);
}
