//! Plugin configuration parsing shared by all filters: strict JSON (unknown
//! fields refused), errors that say what is wrong and where.

use serde::de::DeserializeOwned;

/// A configuration error: `path` is the JSON path of the offending value
/// (`.` for the document itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: String,
    pub message: String,
}

impl ConfigError {
    pub fn at(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            path: path.into(),
            message: message.into(),
        }
    }
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "at `{}`: {}", self.path, self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Parses a plugin configuration. Empty input (no `configuration` in Envoy)
/// means `{}`.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ConfigError> {
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        bytes
    };
    serde_json::from_slice(bytes).map_err(|e| {
        // serde_json appends " at line L column C"; keep it, it helps in big configs.
        let message = e.to_string();
        let path = match e.classify() {
            // Not JSON (or cut short): the document.
            serde_json::error::Category::Syntax
            | serde_json::error::Category::Eof
            | serde_json::error::Category::Io => ".".to_string(),
            serde_json::error::Category::Data => {
                let variant = message.starts_with("unknown variant");
                path_at(bytes, e.line(), e.column(), variant)
            }
        };
        ConfigError::at(path, message)
    })
}

/// One open container of the JSON text while [`path_at`] scans it.
enum Frame {
    /// An object: the key whose value is being read (`None` between
    /// members); `at_key`: the key is read, its value not begun.
    Object {
        key: Option<String>,
        at_key: bool,
    },
    Array {
        index: usize,
    },
}

/// The JSON path (`begin[0].method`, `.` for the document) of the value
/// serde_json stopped at (1-based line, column of its error). A key read but
/// whose value has not begun names its member (an unknown field), except for
/// an unknown enum variant, which names the enum (`{"regex": ...}` as a
/// variant of `principals[0]`). Scanning the text once after the fact keeps
/// the path out of the deserializer: a path-tracking wrapper around every
/// visitor cost each wasm filter ~15 KB.
fn path_at(text: &[u8], line: usize, column: usize, variant: bool) -> String {
    let line_start = text
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == b'\n')
        .nth(line.saturating_sub(2))
        .map_or(0, |(i, _)| i + 1);
    let line_start = if line <= 1 { 0 } else { line_start };
    let end = (line_start + column).min(text.len());
    let mut stack: Vec<Frame> = Vec::new();
    let mut i = 0;
    while i < end {
        match text.get(i) {
            Some(b'{') => stack.push(Frame::Object {
                key: None,
                at_key: false,
            }),
            Some(b'[') => stack.push(Frame::Array { index: 0 }),
            Some(b'}' | b']') => {
                stack.pop();
            }
            Some(b',') => match stack.last_mut() {
                Some(Frame::Array { index }) => *index += 1,
                Some(Frame::Object { key, at_key }) => (*key, *at_key) = (None, false),
                None => {}
            },
            Some(b':') => {
                if let Some(Frame::Object { at_key, .. }) = stack.last_mut() {
                    *at_key = false;
                }
            }
            Some(b'"') => {
                let start = i + 1;
                i = start;
                while i < end && text.get(i) != Some(&b'"') {
                    i += if text.get(i) == Some(&b'\\') { 2 } else { 1 };
                }
                if let Some(Frame::Object {
                    key: key @ None,
                    at_key,
                }) = stack.last_mut()
                {
                    let raw = text.get(start..i.min(end)).unwrap_or_default();
                    *key = Some(String::from_utf8_lossy(raw).into_owned());
                    *at_key = true;
                }
            }
            _ => {}
        }
        i += 1;
    }
    if variant {
        if let Some(Frame::Object { key, at_key: true }) = stack.last_mut() {
            *key = None;
        }
    }
    let mut path = String::new();
    for f in &stack {
        match f {
            Frame::Object { key: Some(k), .. } => {
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(k);
            }
            Frame::Object { key: None, .. } => {}
            Frame::Array { index } => path.push_str(&format!("[{index}]")),
        }
    }
    if path.is_empty() {
        ".".to_string()
    } else {
        path
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    struct Demo {
        #[serde(default)]
        a: u32,
        #[serde(default)]
        inner: Option<Inner>,
    }
    #[derive(Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    struct Inner {
        #[allow(dead_code)]
        b: String,
    }

    #[test]
    fn empty_is_defaults() {
        let d: Demo = parse_json(b"").unwrap();
        assert_eq!(d.a, 0);
        assert!(d.inner.is_none());
        let d: Demo = parse_json(b"  \n").unwrap();
        assert_eq!(d.a, 0);
    }

    #[test]
    fn errors_name_the_path() {
        let e = parse_json::<Demo>(br#"{"a": -1}"#).unwrap_err();
        assert_eq!(e.path, "a");
        assert!(e.message.contains("invalid value"), "{e}");
        let e = parse_json::<Demo>(br#"{"inner": {"c": 1}}"#).unwrap_err();
        assert_eq!(e.path, "inner.c");
        assert!(e.message.contains("unknown field `c`"), "{e}");
        let e = parse_json::<Demo>(b"{not json").unwrap_err();
        assert_eq!(e.path, ".");
        assert!(e.message.contains("line 1"), "{e}");
        let e = parse_json::<Demo>(br#"{"a": 1"#).unwrap_err();
        assert_eq!(e.path, ".", "a document cut short is the document's fault");
        assert!(e.message.contains("EOF while parsing an object"), "{e}");
    }

    #[derive(Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Policy {
        #[serde(default)]
        rules: Vec<Rule>,
        #[serde(default)]
        services: std::collections::BTreeMap<String, Service>,
        #[serde(default)]
        protocol: Option<Protocol>,
    }
    #[derive(Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Rule {
        name: String,
        #[serde(default)]
        principals: Vec<Principal>,
    }
    #[derive(Deserialize, Debug)]
    #[serde(rename_all = "lowercase")]
    #[allow(dead_code)]
    enum Principal {
        Exact(String),
        Glob(String),
    }
    #[derive(Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Service {
        strategy: Protocol,
    }
    #[derive(Deserialize, Debug)]
    #[serde(rename_all = "lowercase")]
    enum Protocol {
        Http,
    }

    fn path_of(json: &str) -> String {
        parse_json::<Policy>(json.as_bytes()).unwrap_err().path
    }

    #[test]
    fn the_path_is_found_in_the_text() {
        // An unknown field: the field.
        assert_eq!(
            path_of(r#"{"rules": [{"name": "a"}, {"name": "b", "nmae": 1}]}"#),
            "rules[1].nmae"
        );
        // An unknown variant of an externally tagged enum: the enum.
        assert_eq!(
            path_of(
                r#"{"rules": [{"name": "a", "principals": [{"exact": "x"}, {"regex": ".*"}]}]}"#
            ),
            "rules[0].principals[1]"
        );
        // An unknown variant of a string enum: its field, through a map.
        assert_eq!(
            path_of(r#"{"services": {"pay": {"strategy": "soap"}}}"#),
            "services.pay.strategy"
        );
        assert_eq!(path_of(r#"{"protocol": "soap"}"#), "protocol");
        // A missing field: the struct; a wrong type: the value; over lines.
        assert_eq!(
            path_of("{\n \"rules\": [\n  {\"principals\": []}\n ]\n}"),
            "rules[0]"
        );
        assert_eq!(path_of(r#"{"rules": [{"name": 5}]}"#), "rules[0].name");
        assert_eq!(path_of(r#"{"rules": {"name": "a"}}"#), "rules");
        // Escaped quotes in strings do not end them.
        assert_eq!(
            path_of(r#"{"rules": [{"name": "a\"b", "x": 1}]}"#),
            "rules[0].x"
        );
    }
}
