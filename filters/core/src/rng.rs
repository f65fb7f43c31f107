//! splitmix64: the one small seeded generator of the tree. Its finalizer
//! spreads transaction ids over table slots (`txn::id`); the generator
//! drives the native tools' reproducible schedules (the history checker,
//! the shop's demo). Not for anything secret.

/// splitmix64's finalizer: every input bit moves every output bit.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A splitmix64 sequence from its seed: the same seed, the same sequence.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        mix(self.0)
    }

    /// A number in `0..n` (`0` for `n == 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// True `percent` times in a hundred.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    /// One of `weighted` (value, weight), in proportion to the weights.
    pub fn pick<'a, T>(&mut self, weighted: &'a [(T, u64)]) -> Option<&'a T> {
        let total: u64 = weighted.iter().map(|(_, w)| w).sum();
        let mut x = self.below(total);
        for (v, w) in weighted {
            if x < *w {
                return Some(v);
            }
            x -= w;
        }
        weighted.first().map(|(v, _)| v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reproducible_and_in_range() {
        // splitmix64's published first output for seed 0.
        assert_eq!(SplitMix64(0).next_u64(), 0xe220_a839_7b1d_cdaf);
        let (mut a, mut b) = (SplitMix64(42), SplitMix64(42));
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
        }
        assert!((0..100).all(|_| a.below(7) < 7));
        let mut r = SplitMix64(1);
        let picks = (0..1000)
            .filter(|_| r.pick(&[("a", 9), ("b", 1)]) == Some(&"b"))
            .count();
        assert!((50..150).contains(&picks), "{picks}");
        assert_eq!(SplitMix64(1).pick::<u8>(&[]), None);
    }
}
