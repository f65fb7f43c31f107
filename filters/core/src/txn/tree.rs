//! The call tree below a participant, as it travels in
//! `x-txmesh-children`: `c1(d1,d2),c2@10.0.0.7:8080` — each child (a cluster,
//! or a cluster pinned to an instance) with, in parentheses, its own
//! children. A participant's sidecar reports its tree to its parent on the
//! response to every business call; the parent sends it back with the
//! prepare, commit and abort, so whichever replica of the participant, or a
//! restarted sidecar, receives them knows whom to cascade to.

/// The header that carries a participant's call tree (docs/protocol.md).
pub const CHILDREN_HEADER: &str = "x-txmesh-children";
/// The longest tree a sidecar reports or accepts.
pub const MAX_LEN: usize = 4096;
/// The deepest tree it accepts.
const MAX_DEPTH: usize = 16;

/// One child and its own tree (rendered; empty: no children).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Child {
    pub name: String,
    pub tree: String,
}

/// Whether a participant's name can travel in a tree: a cluster name
/// without the tree's own punctuation.
pub fn carriable(name: &str) -> bool {
    super::config::is_cluster_name(name)
        && !name.bytes().any(|b| matches!(b, b'(' | b')' | b',' | b'='))
}

/// `children` rendered as a tree.
pub fn render(children: &[Child]) -> String {
    let mut out = String::new();
    for (i, c) in children.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&c.name);
        if !c.tree.is_empty() {
            out.push('(');
            out.push_str(&c.tree);
            out.push(')');
        }
    }
    out
}

/// The top level of a tree: each child with its own tree.
pub fn parse(v: &[u8]) -> Result<Vec<Child>, String> {
    let bad = |why: &str| Err(format!("invalid {CHILDREN_HEADER}: {why}"));
    if v.len() > MAX_LEN {
        return bad("too long");
    }
    let s = std::str::from_utf8(v).or(Err(()));
    let Ok(s) = s else {
        return bad("not UTF-8");
    };
    let mut out = Vec::new();
    if s.is_empty() {
        return Ok(out);
    }
    let mut depth = 0usize;
    let mut name_start = 0usize;
    let mut name: Option<&str> = None;
    let mut tree_start = 0usize;
    let mut tree: &str = "";
    let push = |name: &str, tree: &str, out: &mut Vec<Child>| -> Result<(), String> {
        if !carriable(name) {
            return Err(format!("invalid {CHILDREN_HEADER}: bad participant name"));
        }
        out.push(Child {
            name: name.to_string(),
            tree: tree.to_string(),
        });
        Ok(())
    };
    for (i, b) in s.bytes().enumerate() {
        match (b, depth) {
            (b'(', 0) => {
                if name.is_some() {
                    return bad("two trees for one child");
                }
                name = s.get(name_start..i);
                tree_start = i + 1;
                depth = 1;
            }
            (b'(', d) => {
                depth = d + 1;
                if depth > MAX_DEPTH {
                    return bad("too deep");
                }
            }
            (b')', 0) => return bad("unbalanced parentheses"),
            (b')', 1) => {
                tree = s.get(tree_start..i).unwrap_or("");
                depth = 0;
            }
            (b')', d) => depth = d - 1,
            (b',', 0) => {
                let n = name.or_else(|| s.get(name_start..i)).unwrap_or("");
                if name.is_some() && s.get(i.saturating_sub(1)..i) != Some(")") {
                    return bad("text after a child's tree");
                }
                push(n, tree, &mut out)?;
                name = None;
                tree = "";
                name_start = i + 1;
            }
            _ => {}
        }
    }
    if depth != 0 {
        return bad("unbalanced parentheses");
    }
    if name.is_some() && !s.ends_with(')') {
        return bad("text after a child's tree");
    }
    let n = name.or_else(|| s.get(name_start..)).unwrap_or("");
    push(n, tree, &mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(name: &str, tree: &str) -> Child {
        Child {
            name: name.into(),
            tree: tree.into(),
        }
    }

    #[test]
    fn trees_round_trip() {
        let t = vec![
            c("c1", "d1,d2(e)"),
            c("c2@10.0.0.7:8080", ""),
            c("outbound|8080||x.ns.svc.cluster.local", ""),
        ];
        let s = render(&t);
        assert_eq!(
            s,
            "c1(d1,d2(e)),c2@10.0.0.7:8080,outbound|8080||x.ns.svc.cluster.local"
        );
        assert_eq!(parse(s.as_bytes()).unwrap(), t);
        assert_eq!(parse(b"d1,d2(e)").unwrap(), vec![c("d1", ""), c("d2", "e")]);
        assert_eq!(parse(b"").unwrap(), vec![]);
    }

    #[test]
    fn bad_trees_are_refused() {
        for bad in [
            &b"c1("[..],
            b"c1)",
            b"c1(d)x",
            b"c1(d)(e)",
            b",c1",
            b"c1,,c2",
            b"c 1",
            b"((((((((((((((((((x))))))))))))))))))",
        ] {
            assert!(parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        assert!(parse(&vec![b'a'; MAX_LEN + 1]).is_err());
        assert!(!carriable("a,b") && !carriable("a(b") && carriable("b@1.2.3.4:80"));
    }
}
