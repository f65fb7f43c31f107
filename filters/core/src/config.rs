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
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = match e.path().to_string() {
            p if p.is_empty() || p == "?" => ".".to_string(),
            p => p,
        };
        let inner = e.into_inner();
        // serde_json appends " at line L column C"; keep it, it helps in big configs.
        ConfigError::at(path, inner.to_string())
    })
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
    }
}
