//! Load-balancing arithmetic: one worker's load record per endpoint,
//! peak-EWMA latency, the health record shared by all workers, outlier
//! ejection and the pickers. Pure functions over plain values; the engine
//! does the host calls.

/// One worker's view of an endpoint's load: its own requests in flight and
/// its own latency estimate. Kept in the worker's memory, as Envoy's own
/// load balancers keep theirs: picking and finishing a request cost no host
/// call.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Load {
    /// Requests in flight (picked, not yet logged) from this worker.
    pub pending: u32,
    /// Peak-EWMA latency estimate in microseconds; 0 = no sample yet.
    pub ewma_us: u64,
    /// When `ewma_us` was last updated.
    pub stamp_ms: u64,
    /// Sum of the start times of the requests in flight (their mean age
    /// counts as a latency sample before they finish).
    pub pending_since_sum_ms: u64,
}

impl Load {
    /// The latency estimate at `now` without a new sample, in microseconds:
    /// the default for an endpoint never measured, otherwise the estimate
    /// decayed towards zero (`w = exp(-elapsed / decay)`), so that an endpoint
    /// that was slow is tried again after a while.
    pub fn rtt_us(&self, now_ms: u64, decay_ms: u64, default_rtt_ms: u64) -> f64 {
        if self.ewma_us == 0 && self.stamp_ms == 0 {
            return (default_rtt_ms * 1000) as f64;
        }
        let elapsed = now_ms.saturating_sub(self.stamp_ms) as f64;
        self.ewma_us as f64 * (-elapsed / decay_ms.max(1) as f64).exp()
    }

    /// Linkerd's cost, `rtt × (pending + 1)`, where `rtt` is at least the
    /// mean age of the requests in flight: an endpoint that stops answering
    /// looks slow at once, not only when its first stalled request finishes.
    pub fn cost(&self, now_ms: u64, decay_ms: u64, default_rtt_ms: u64) -> f64 {
        let rtt = self.rtt_us(now_ms, decay_ms, default_rtt_ms);
        let age_us = if self.pending > 0 {
            let mean_start = self.pending_since_sum_ms / u64::from(self.pending);
            (now_ms.saturating_sub(mean_start) * 1000) as f64
        } else {
            0.0
        };
        rtt.max(age_us) * (f64::from(self.pending) + 1.0)
    }

    /// A request starts (counted in flight).
    pub fn start(&mut self, now_ms: u64) {
        self.pending = self.pending.saturating_add(1);
        self.pending_since_sum_ms = self.pending_since_sum_ms.saturating_add(now_ms);
    }

    /// A request counted by [`Load::start`] at `started_ms` ends.
    pub fn finish(&mut self, started_ms: u64) {
        self.pending = self.pending.saturating_sub(1);
        self.pending_since_sum_ms = if self.pending == 0 {
            0
        } else {
            self.pending_since_sum_ms.saturating_sub(started_ms)
        };
    }

    /// Folds in one latency sample (tower's `RttEstimate::update`): a sample
    /// above the estimate replaces it (peak); otherwise
    /// `est = est·w + sample·(1 − w)` with `w = exp(-elapsed / decay)`.
    pub fn observe_rtt(&mut self, now_ms: u64, sample_us: u64, decay_ms: u64, default_rtt_ms: u64) {
        let est = if self.ewma_us == 0 && self.stamp_ms == 0 {
            (default_rtt_ms * 1000) as f64
        } else {
            self.ewma_us as f64
        };
        let sample = sample_us as f64;
        let next = if sample > est {
            sample
        } else {
            let elapsed = now_ms.saturating_sub(self.stamp_ms) as f64;
            let w = (-elapsed / decay_ms.max(1) as f64).exp();
            est * w + sample * (1.0 - w)
        };
        // Never 0 once measured (0 means "no sample").
        self.ewma_us = (next.round() as u64).max(1);
        self.stamp_ms = now_ms;
    }
}

/// What every worker knows about one endpoint's health, kept in the
/// endpoint's shared-data slot (written on failures and while an ejection
/// is being forgiven, read on tick). `id` (`service/address`) tells whether
/// the record belongs to the endpoint now in the slot: a record left by an
/// endpoint that has gone reads as a fresh one.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct EpHealth {
    pub id: String,
    /// Consecutive failures (all workers).
    pub fails: u32,
    /// Ejected while `now < ejected_until_ms`.
    pub ejected_until_ms: u64,
    /// Ejections in a row (the next lasts `base × (ejections + 1)`).
    pub ejections: u32,
    /// Healthy since (for forgetting past ejections).
    pub healthy_since_ms: u64,
}

impl EpHealth {
    pub fn fresh(id: &str) -> Self {
        Self {
            id: id.to_string(),
            ..Self::default()
        }
    }

    pub fn encode(&self) -> String {
        format!(
            "{} {} {} {} {}",
            self.id, self.fails, self.ejected_until_ms, self.ejections, self.healthy_since_ms
        )
    }

    /// The record for endpoint `id` from a slot's bytes: fresh when the slot
    /// is empty, unreadable (a record of another shape included), or holds
    /// another endpoint's record.
    pub fn decode_for(id: &str, bytes: Option<&[u8]>) -> Self {
        bytes
            .and_then(|b| std::str::from_utf8(b).ok())
            .and_then(|t| {
                let mut f = t.split(' ');
                if f.next()? != id {
                    return None;
                }
                let mut n = || f.next()?.parse::<u64>().ok();
                let h = Self {
                    id: id.to_string(),
                    fails: u32::try_from(n()?).ok()?,
                    ejected_until_ms: n()?,
                    ejections: u32::try_from(n()?).ok()?,
                    healthy_since_ms: n()?,
                };
                f.next().is_none().then_some(h)
            })
            .unwrap_or_else(|| Self::fresh(id))
    }

    pub fn ejected(&self, now_ms: u64) -> bool {
        now_ms < self.ejected_until_ms
    }

    /// Whether a success must be written back: a failure count to reset or
    /// a past ejection to forgive.
    pub fn needs_success(&self) -> bool {
        self.fails > 0 || self.ejections > 0
    }
}

/// Outlier-ejection settings (from the service's config).
#[derive(Debug, Clone, Copy)]
pub struct Ejection {
    pub consecutive_failures: u32,
    pub base_ms: u64,
    pub max_ms: u64,
}

/// Outcome of recording one finished request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Ok,
    Failed,
    /// This failure ejected the endpoint, until the given time.
    Ejected(u64),
}

/// Records a success or failure. `may_eject` says whether the service's
/// ejection cap leaves room for one more ejected endpoint.
pub fn record_health(
    s: &mut EpHealth,
    now_ms: u64,
    failed: bool,
    e: Ejection,
    may_eject: bool,
) -> Health {
    if !failed {
        s.fails = 0;
        // A healthy stretch as long as the base ejection time forgives one
        // past ejection.
        if s.ejections > 0 && !s.ejected(now_ms) {
            if s.healthy_since_ms == 0 {
                s.healthy_since_ms = now_ms;
            } else if now_ms.saturating_sub(s.healthy_since_ms) >= e.base_ms {
                s.ejections -= 1;
                s.healthy_since_ms = now_ms;
            }
        }
        return Health::Ok;
    }
    s.fails = s.fails.saturating_add(1);
    s.healthy_since_ms = 0;
    if e.consecutive_failures == 0
        || s.fails < e.consecutive_failures
        || s.ejected(now_ms)
        || !may_eject
    {
        return Health::Failed;
    }
    s.ejections = s.ejections.saturating_add(1);
    let span = e
        .base_ms
        .saturating_mul(u64::from(s.ejections))
        .min(e.max_ms);
    s.ejected_until_ms = now_ms.saturating_add(span);
    s.fails = 0;
    Health::Ejected(s.ejected_until_ms)
}

/// How many endpoints of a service may be ejected at once: `percent` of
/// them, and at least one.
pub fn ejection_cap(endpoints: usize, percent: u32) -> usize {
    if percent == 0 {
        return 0;
    }
    (endpoints * percent as usize / 100).max(1)
}

/// A small, fast PRNG (xorshift64*) seeded once per worker from the host.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (((self.next_u64() >> 32) * n as u64) >> 32) as usize
    }
}

/// Two distinct candidates at random (power of two choices); one when there
/// is only one.
pub fn two_choices(rng: &mut Rng, n: usize) -> (usize, usize) {
    if n <= 1 {
        return (0, 0);
    }
    let a = rng.below(n);
    let mut b = rng.below(n - 1);
    if b >= a {
        b += 1;
    }
    (a, b)
}

/// Smooth weighted round robin (nginx): each candidate's current weight grows
/// by its weight, the largest is picked and pays back the total. Exact
/// proportions over every `Σweights` picks. `current` is indexed like
/// `weights`.
pub fn smooth_weighted(weights: &[u32], current: &mut [i64]) -> Option<usize> {
    let mut total: i64 = 0;
    let mut best: Option<(usize, i64)> = None;
    for (i, (w, c)) in weights.iter().zip(current.iter_mut()).enumerate() {
        if *w == 0 {
            continue;
        }
        let w = i64::from(*w);
        *c += w;
        total += w;
        if best.is_none_or(|(_, b)| *c > b) {
            best = Some((i, *c));
        }
    }
    let (i, _) = best?;
    if let Some(c) = current.get_mut(i) {
        *c -= total;
    }
    Some(i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_round_trip_and_foreign_records() {
        let s = EpHealth {
            id: "p/1.2.3.4:5".into(),
            fails: 2,
            ejected_until_ms: 7,
            ejections: 1,
            healthy_since_ms: 5,
        };
        let b = s.encode();
        assert_eq!(b, "p/1.2.3.4:5 2 7 1 5");
        assert_eq!(EpHealth::decode_for("p/1.2.3.4:5", Some(b.as_bytes())), s);
        assert_eq!(
            EpHealth::decode_for("p/9.9.9.9:9", Some(b.as_bytes())),
            EpHealth::fresh("p/9.9.9.9:9")
        );
        assert_eq!(EpHealth::decode_for("x", None), EpHealth::fresh("x"));
        assert_eq!(
            EpHealth::decode_for("x", Some(b"x 1 2")),
            EpHealth::fresh("x")
        );
        // A record of the earlier, longer shape reads as fresh.
        assert_eq!(
            EpHealth::decode_for("x", Some(b"x 1 2 3 4 5 6 7 8")),
            EpHealth::fresh("x")
        );
        assert!(!EpHealth::fresh("x").needs_success());
        assert!(s.needs_success());
    }

    #[test]
    fn peak_ewma_like_tower() {
        let mut s = Load::default();
        // Never measured: the default rtt.
        assert_eq!(s.rtt_us(1000, 10_000, 30), 30_000.0);
        assert_eq!(s.cost(1000, 10_000, 30), 30_000.0);
        s.start(1000);
        s.start(1000);
        assert_eq!(s.cost(1000, 10_000, 30), 90_000.0);
        // A sample above the estimate replaces it.
        s.observe_rtt(1000, 50_000, 10_000, 30);
        assert_eq!(s.ewma_us, 50_000);
        // Below: weighted by exp(-elapsed/decay); elapsed 10 s = one decay.
        s.observe_rtt(11_000, 10_000, 10_000, 30);
        let w = (-1.0f64).exp();
        assert_eq!(
            s.ewma_us,
            (50_000.0 * w + 10_000.0 * (1.0 - w)).round() as u64
        );
        // Same instant: w = 1, the estimate stays.
        let before = s.ewma_us;
        s.observe_rtt(11_000, 1, 10_000, 30);
        assert_eq!(s.ewma_us, before);
        // Decay towards zero while idle.
        let at = s.rtt_us(21_000, 10_000, 30);
        assert!((at - before as f64 * w).abs() < 1.0, "{at}");
    }

    #[test]
    fn requests_stuck_in_flight_raise_the_cost() {
        let mut s = Load::default();
        (s.ewma_us, s.stamp_ms) = (2_000, 1000);
        assert_eq!(s.cost(1000, 10_000, 30), 2_000.0);
        // Two requests start at 1000 and 1100 and hang.
        s.start(1000);
        s.start(1100);
        // At 1100 the mean age (50 ms) is above the 2 ms estimate.
        assert_eq!(s.cost(1100, 10_000, 30), 50_000.0 * 3.0);
        s.finish(1000);
        assert_eq!((s.pending, s.pending_since_sum_ms), (1, 1100));
        s.finish(1100);
        assert_eq!((s.pending, s.pending_since_sum_ms), (0, 0));
        assert!(s.cost(5000, 10_000, 30) < 2_000.0);
    }

    #[test]
    fn ejection_after_consecutive_failures_grows_and_is_forgiven() {
        let e = Ejection {
            consecutive_failures: 3,
            base_ms: 1000,
            max_ms: 2500,
        };
        let mut s = EpHealth::fresh("e");
        assert_eq!(record_health(&mut s, 10, true, e, true), Health::Failed);
        assert_eq!(record_health(&mut s, 10, false, e, true), Health::Ok);
        assert_eq!(s.fails, 0);
        assert_eq!(record_health(&mut s, 10, true, e, true), Health::Failed);
        assert_eq!(record_health(&mut s, 10, true, e, true), Health::Failed);
        // The cap says no: stays in.
        assert_eq!(record_health(&mut s, 10, true, e, false), Health::Failed);
        assert_eq!(
            record_health(&mut s, 10, true, e, true),
            Health::Ejected(1010)
        );
        assert!(s.ejected(1009));
        assert!(!s.ejected(1010));
        // Failures while ejected do not extend it.
        for _ in 0..5 {
            assert_eq!(record_health(&mut s, 500, true, e, true), Health::Failed);
        }
        s.fails = 2;
        assert_eq!(
            record_health(&mut s, 2000, true, e, true),
            Health::Ejected(4000)
        );
        s.fails = 2;
        // Third in a row: 3000 capped at 2500.
        assert_eq!(
            record_health(&mut s, 5000, true, e, true),
            Health::Ejected(7500)
        );
        assert_eq!(s.ejections, 3);
        // Healthy for one base time after returning: one ejection forgiven.
        record_health(&mut s, 8000, false, e, true);
        record_health(&mut s, 8999, false, e, true);
        assert_eq!(s.ejections, 3);
        record_health(&mut s, 9000, false, e, true);
        assert_eq!(s.ejections, 2);
        // Disabled.
        let off = Ejection {
            consecutive_failures: 0,
            ..e
        };
        let mut s = EpHealth::fresh("e");
        for _ in 0..10 {
            assert_eq!(record_health(&mut s, 1, true, off, true), Health::Failed);
        }
    }

    #[test]
    fn caps() {
        assert_eq!(ejection_cap(5, 50), 2);
        assert_eq!(ejection_cap(1, 50), 1);
        assert_eq!(ejection_cap(10, 10), 1);
        assert_eq!(ejection_cap(10, 100), 10);
        assert_eq!(ejection_cap(10, 0), 0);
    }

    #[test]
    fn two_choices_are_distinct_and_cover() {
        let mut rng = Rng::new(42);
        let mut seen = [0u32; 5];
        for _ in 0..10_000 {
            let (a, b) = two_choices(&mut rng, 5);
            assert_ne!(a, b);
            assert!(a < 5 && b < 5);
            seen[a] += 1;
            seen[b] += 1;
        }
        for s in seen {
            assert!((3500..4500).contains(&s), "{seen:?}");
        }
        assert_eq!(two_choices(&mut rng, 1), (0, 0));
    }

    #[test]
    fn smooth_weighted_is_exact_and_spread() {
        let w = [5, 1, 1];
        let mut cur = [0i64; 3];
        let picks: Vec<usize> = (0..7)
            .map(|_| smooth_weighted(&w, &mut cur).unwrap())
            .collect();
        // nginx's example: a a b a c a a.
        assert_eq!(picks, vec![0, 0, 1, 0, 2, 0, 0]);
        let w = [90, 10];
        let mut cur = [0i64; 2];
        let mut n = [0; 2];
        for _ in 0..2000 {
            n[smooth_weighted(&w, &mut cur).unwrap()] += 1;
        }
        assert_eq!(n, [1800, 200]);
        // Zero weight is never picked; all zero picks nothing.
        let mut cur = [0i64; 2];
        for _ in 0..10 {
            assert_eq!(smooth_weighted(&[0, 3], &mut cur), Some(1));
        }
        assert_eq!(smooth_weighted(&[0, 0], &mut [0, 0]), None);
    }
}
