//! docs/protocol.md lists every enum of the transaction engine with its
//! variants ("The engine's state machines"). This test reads the engine's
//! source and the table and fails when they differ, either way: an enum or
//! a variant added, renamed or removed in one and not the other.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

type Enums = BTreeMap<String, BTreeSet<String>>;

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src/txn")
}

/// Every enum (with its variants) defined at any depth in one source file.
fn enums_in(file: &Path) -> Enums {
    fn walk(items: &[syn::Item], out: &mut Enums) {
        for item in items {
            match item {
                syn::Item::Enum(e) => {
                    let vs = e.variants.iter().map(|v| v.ident.to_string()).collect();
                    out.insert(e.ident.to_string(), vs);
                }
                syn::Item::Mod(m) => {
                    if let Some((_, items)) = &m.content {
                        walk(items, out);
                    }
                }
                // syn::Item is non-exhaustive: other items hold no enums.
                _ => {}
            }
        }
    }
    let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let ast = syn::parse_file(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let mut out = Enums::new();
    walk(&ast.items, &mut out);
    out
}

/// The table between the `enums:begin`/`enums:end` markers: enum → (file, variants).
fn documented() -> BTreeMap<String, (String, BTreeSet<String>)> {
    let doc = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/protocol.md");
    let text = std::fs::read_to_string(&doc).expect("docs/protocol.md");
    let (_, rest) = text
        .split_once("<!-- enums:begin -->")
        .expect("enums:begin marker");
    let (table, _) = rest
        .split_once("<!-- enums:end -->")
        .expect("enums:end marker");
    let unquote = |s: &str| s.trim().trim_matches('`').to_string();
    let mut out = BTreeMap::new();
    for line in table.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.trim_matches('|').split('|').collect();
        let [name, file, variants] = cells.as_slice() else {
            panic!("a row of three cells: {line}");
        };
        let vs = variants.split(',').map(unquote).collect();
        let prev = out.insert(unquote(name), (unquote(file), vs));
        assert!(prev.is_none(), "{name} listed twice");
    }
    out
}

#[test]
fn the_documented_state_tables_match_the_engines_enums() {
    let doc = documented();
    let mut problems = Vec::new();
    // Every documented enum exists in its file with exactly those variants.
    for (name, (file, variants)) in &doc {
        let found = enums_in(&src().join(file));
        match found.get(name) {
            None => problems.push(format!(
                "docs list {name} in {file}, which has no such enum"
            )),
            Some(vs) if vs != variants => problems.push(format!(
                "{name} ({file}): source has {vs:?}, docs have {variants:?}"
            )),
            Some(_) => {}
        }
    }
    // Every enum of the engine is documented.
    let mut files = vec![src().join("engine.rs")];
    let dir = src().join("engine");
    for entry in std::fs::read_dir(&dir).expect("engine/") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    for file in files {
        for name in enums_in(&file).keys() {
            if !doc.contains_key(name) {
                problems.push(format!(
                    "{name} ({}) is missing from docs/protocol.md's enum table",
                    file.display()
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(doc.len() >= 20, "the table was read ({} enums)", doc.len());
}
