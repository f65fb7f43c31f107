//! Prometheus text as Envoy's admin serves it: txmesh-core's parser
//! (`txmesh_core::prom`, shared with txmeshctl), plus what tests add — a
//! value that must be there exactly once.

use std::ops::Deref;

pub use txmesh_core::prom::Sample;

#[derive(Debug, Clone, Default)]
pub struct Scrape(txmesh_core::prom::Scrape);

impl Deref for Scrape {
    type Target = txmesh_core::prom::Scrape;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Scrape {
    pub fn parse(text: &str) -> Self {
        Self(txmesh_core::prom::Scrape::parse(text))
    }

    /// The value of the one sample that matches; panics if not exactly one.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found = self.find(name, labels);
        assert_eq!(
            found.len(),
            1,
            "expected exactly one {name}{labels:?}, found {found:?}\n{}",
            self.text_of(name)
        );
        found[0].value
    }
}
