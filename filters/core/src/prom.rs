//! Prometheus text exposition, as Envoy's admin serves it
//! (`/stats/prometheus`): parsed once here for everything native that reads
//! it (txmeshctl's `top`, the test harness). Not used by the filters.

use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

#[derive(Debug, Clone, Default)]
pub struct Scrape {
    pub samples: Vec<Sample>,
    pub text: String,
}

impl Scrape {
    /// Every sample line (comments and unparsable lines are skipped).
    pub fn parse(text: &str) -> Self {
        let samples = text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .filter_map(parse_line)
            .collect();
        Self {
            samples,
            text: text.to_string(),
        }
    }

    /// Samples of `name` whose labels include every pair of `labels`.
    pub fn find(&self, name: &str, labels: &[(&str, &str)]) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect()
    }

    /// Sum of the matching samples (0 when none).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.find(name, labels).iter().map(|s| s.value).sum()
    }

    /// The raw lines mentioning `needle` (for messages).
    pub fn text_of(&self, needle: &str) -> String {
        self.text
            .lines()
            .filter(|l| l.contains(needle) && !l.contains("_bucket"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn parse_line(line: &str) -> Option<Sample> {
    let (head, value) = line.rsplit_once(' ')?;
    let value: f64 = value.parse().ok()?;
    let (name, labels) = match head.split_once('{') {
        Some((name, rest)) => (name, parse_labels(rest.strip_suffix('}')?)?),
        None => (head, BTreeMap::new()),
    };
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

fn parse_labels(s: &str) -> Option<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek() == Some(&',') || chars.peek() == Some(&' ') {
            chars.next();
        }
        if chars.peek().is_none() {
            return Some(out);
        }
        let key: String = chars.by_ref().take_while(|&c| c != '=').collect();
        if chars.next()? != '"' {
            return None;
        }
        let mut val = String::new();
        loop {
            match chars.next()? {
                '\\' => match chars.next()? {
                    'n' => val.push('\n'),
                    c => val.push(c),
                },
                '"' => break,
                c => val.push(c),
            }
        }
        out.insert(key, val);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_envoy_output() {
        let s = Scrape::parse(
            "# TYPE x counter\nx{a=\"1\",b=\"q\\\"z\"} 3\ny{} 0\nz 1.5\nh_bucket{le=\"+Inf\"} 2\n",
        );
        assert_eq!(s.sum("x", &[("a", "1")]), 3.0);
        assert_eq!(s.find("x", &[]).first().unwrap().labels["b"], "q\"z");
        assert_eq!(s.find("y", &[]).len(), 1);
        assert_eq!(s.sum("z", &[]), 1.5);
        assert_eq!(s.sum("h_bucket", &[("le", "+Inf")]), 2.0);
        assert_eq!(s.sum("nope", &[]), 0.0);
        assert_eq!(s.text_of("z "), "z 1.5");
    }
}
