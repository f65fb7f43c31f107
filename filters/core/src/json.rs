//! A tiny JSON object writer for the bodies txmesh sends (error replies,
//! votes, decision records): smaller in wasm than building `serde_json::Value`s.

/// Appends `s` as a JSON string literal.
pub fn push_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                out.push_str(&format!("\\u{:04x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Builds one flat JSON object, fields in insertion order.
#[derive(Default)]
pub struct Obj(String);

impl Obj {
    pub fn new() -> Self {
        Self(String::from("{"))
    }
    fn key(&mut self, k: &str) {
        if self.0.len() > 1 {
            self.0.push(',');
        }
        push_str(&mut self.0, k);
        self.0.push(':');
    }
    pub fn str(mut self, k: &str, v: &str) -> Self {
        self.key(k);
        push_str(&mut self.0, v);
        self
    }
    pub fn num(mut self, k: &str, v: u64) -> Self {
        self.key(k);
        self.0.push_str(&v.to_string());
        self
    }
    pub fn bool(mut self, k: &str, v: bool) -> Self {
        self.key(k);
        self.0.push_str(if v { "true" } else { "false" });
        self
    }
    pub fn strs(mut self, k: &str, vs: &[String]) -> Self {
        self.key(k);
        self.0.push('[');
        for (i, v) in vs.iter().enumerate() {
            if i > 0 {
                self.0.push(',');
            }
            push_str(&mut self.0, v);
        }
        self.0.push(']');
        self
    }
    /// A field whose value is already JSON.
    pub fn raw(mut self, k: &str, json: &str) -> Self {
        self.key(k);
        self.0.push_str(json);
        self
    }
    pub fn build(mut self) -> String {
        self.0.push('}');
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_valid_json() {
        let s = Obj::new()
            .str("a", "q\"uote\\ new\nline \u{1}")
            .num("n", 42)
            .bool("b", false)
            .strs("l", &["x".into(), "y\"".into()])
            .raw("o", r#"{"k":1}"#)
            .build();
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["a"], "q\"uote\\ new\nline \u{1}");
        assert_eq!(v["n"], 42);
        assert_eq!(v["b"], false);
        assert_eq!(v["l"][1], "y\"");
        assert_eq!(v["o"]["k"], 1);
        assert_eq!(Obj::new().build(), "{}");
    }
}
