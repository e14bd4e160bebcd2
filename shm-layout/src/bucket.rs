//! Token bucket: GCRA, the virtual scheduling algorithm of ITU-T I.371,
//! extended with a cost per request and a second (excess) tolerance.
//!
//! # Algorithm
//!
//! With emission interval `T` (one token's worth of time) and theoretical
//! arrival time `tat`, a request of cost `n` at time `t` computes
//! `tat' = max(tat, t) + n·T` and is
//!
//! - green (admitted) iff `tat' − t ≤ burst·T`,
//! - yellow (admitted, degraded) iff `tat' − t ≤ (burst + excess)·T`,
//! - red otherwise: refused, `retry_after = tat' − t − best·T` where `best`
//!   is `burst` when `n ≤ burst`, else `burst + excess` (the earliest time it
//!   would be admitted at its best colour).
//!
//! Admitted requests store `tat'`; refused ones store nothing.
//!
//! # Representation
//!
//! Times are fixed point: [`FRAC_BITS`] fractional bits below a nanosecond,
//! counted from the region's epoch (CLOCK_MONOTONIC when the region was
//! created). `T` is rounded *up*, so `rate = 3` admits at most 3 in any second
//! and drifts by less than one part in 10⁹. A u64 of these units spans
//! 2⁶⁴ / 64 ns ≈ 9 years from the epoch. All arithmetic is done in u128, so a
//! huge cost or a long idle can neither wrap nor mint tokens.
//!
//! # Invariant
//!
//! The bucket is one `AtomicU64` holding `tat`. It only ever moves forward
//! (every successful CAS writes `max(tat, t) + n·T > tat`), so a process that
//! read the clock long ago (a stale `t`) sees a *stricter* check, never a
//! looser one: refill can not be credited twice.
//!
//! # Who writes, progress, crashes
//!
//! Any client writes `tat` by compare-and-swap; the daemon writes it only to
//! trim a bucket on reload. Lock-free: a CAS fails only because another
//! request succeeded. The update is one atomic step, so a process that dies
//! anywhere has either taken its tokens (and the request counts as admitted;
//! tokens are time, never given back) or changed nothing.

use crate::sync::{AtomicU64, Ordering};

/// Fractional bits of the fixed-point time unit (1/64 ns).
pub const FRAC_BITS: u32 = 6;

/// One nanosecond in fixed-point units.
pub const UNITS_PER_NS: u64 = 1 << FRAC_BITS;

/// Rate parameters of one bucket, already in fixed point.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateParams {
    /// Emission interval `T`, in 1/64 ns, rounded up; never 0.
    pub t: u64,
    /// Green tolerance, in tokens.
    pub burst: u64,
    /// Extra yellow tolerance, in tokens.
    pub excess: u64,
}

/// Why a rate could not be turned into [`RateParams`].
#[derive(Clone, Copy, Debug, PartialEq, thiserror::Error)]
pub enum RateError {
    /// The rate is not a finite number in `[MIN_RATE, MAX_RATE]`.
    #[error("rate {0} per second is outside ({min}, {max}]", min = crate::limits::MIN_RATE, max = crate::limits::MAX_RATE)]
    OutOfRange(f64),
    /// `burst` is 0.
    #[error("burst must be at least 1")]
    ZeroBurst,
    /// `(burst + excess)·T` does not fit the fixed-point word.
    #[error("burst + excess_burst spans more time than the region can represent")]
    ToleranceTooLong,
}

/// What the bucket says about one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BucketVerdict {
    /// Admitted; store `new_tat`.
    Green { new_tat: u64 },
    /// Admitted degraded; store `new_tat`.
    Yellow { new_tat: u64 },
    /// Refused for now; admitted at its best colour after `retry_after`
    /// fixed-point units.
    Red { retry_after: u64 },
    /// Larger than `burst + excess`: can never be admitted.
    Never,
}

impl RateParams {
    /// Build parameters from a rate in tokens per second.
    pub fn new(rate_per_sec: f64, burst: u64, excess: u64) -> Result<Self, RateError> {
        if !(rate_per_sec.is_finite()
            && (crate::limits::MIN_RATE..=crate::limits::MAX_RATE).contains(&rate_per_sec))
        {
            return Err(RateError::OutOfRange(rate_per_sec));
        }
        if burst == 0 {
            return Err(RateError::ZeroBurst);
        }
        let exact = 1e9 * UNITS_PER_NS as f64 / rate_per_sec;
        let t = exact.ceil();
        if t > (u64::MAX >> 2) as f64 {
            return Err(RateError::OutOfRange(rate_per_sec));
        }
        let t = (t as u64).max(1);
        let tol = u128::from(burst) + u128::from(excess);
        if tol * u128::from(t) > u128::from(u64::MAX >> 2) {
            return Err(RateError::ToleranceTooLong);
        }
        Ok(Self { t, burst, excess })
    }

    /// Largest cost this bucket can ever admit.
    pub fn max_cost(&self) -> u64 {
        self.burst.saturating_add(self.excess)
    }

    /// Like [`RateParams::take`], and also returns the `tat` it replaced,
    /// so a later refusal can give the tokens back with [`RateParams::untake`].
    pub fn take_undoable(&self, tat: &AtomicU64, now: u64, n: u64) -> (BucketVerdict, u64) {
        let backoff = crossbeam_utils::Backoff::new();
        // SeqCst: the tenant re-check after this take (see the client's
        // policy) must be ordered after it; AcqRel would do for the bucket.
        let mut cur = tat.load(Ordering::SeqCst);
        loop {
            let verdict = self.decide(cur, now, n);
            let new_tat = match verdict {
                BucketVerdict::Green { new_tat } | BucketVerdict::Yellow { new_tat } => new_tat,
                BucketVerdict::Red { .. } | BucketVerdict::Never => return (verdict, cur),
            };
            match tat.compare_exchange_weak(cur, new_tat, Ordering::SeqCst, Ordering::SeqCst) {
                Ok(_) => return (verdict, cur),
                Err(actual) => {
                    cur = actual;
                    crate::sync::spin_hint(&backoff);
                }
            }
        }
    }

    /// Give back what [`RateParams::take_undoable`] took (`taken` is the
    /// `tat` it stored, `prev` the one it replaced), if nobody has taken
    /// since. Otherwise the tokens stay spent: a give-back never mints.
    pub fn untake(tat: &AtomicU64, taken: u64, prev: u64) -> bool {
        // SeqCst: as in `take_undoable`.
        tat.compare_exchange(taken, prev, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    /// The pure GCRA decision for a request of cost `n` at time `now`, given
    /// the stored `tat`. Both times are in fixed-point units.
    pub fn decide(&self, tat: u64, now: u64, n: u64) -> BucketVerdict {
        if n > self.max_cost() {
            return BucketVerdict::Never;
        }
        let t = u128::from(self.t);
        let now_w = u128::from(now);
        let new_tat = u128::from(tat).max(now_w) + u128::from(n) * t;
        let wait = new_tat - now_w;
        let green = u128::from(self.burst) * t;
        let yellow = u128::from(self.max_cost()) * t;
        // A `tat'` beyond the word means a clock ~9 years past the epoch;
        // refuse rather than wrap.
        let Ok(stored) = u64::try_from(new_tat) else {
            return BucketVerdict::Red {
                retry_after: u64::MAX,
            };
        };
        if wait <= green {
            BucketVerdict::Green { new_tat: stored }
        } else if wait <= yellow {
            BucketVerdict::Yellow { new_tat: stored }
        } else {
            let best = if n <= self.burst { green } else { yellow };
            let retry = u64::try_from(wait - best).unwrap_or(u64::MAX);
            BucketVerdict::Red { retry_after: retry }
        }
    }

    /// Take `n` tokens from the bucket word at time `now`: one CAS loop.
    ///
    /// Returns the verdict that was applied. `Red` and `Never` wrote nothing.
    pub fn take(&self, tat: &AtomicU64, now: u64, n: u64) -> BucketVerdict {
        let backoff = crossbeam_utils::Backoff::new();
        // Acquire pairs with the AcqRel CAS below in other processes: we must
        // see the latest `tat` any admitted request stored (the value is the
        // whole state, nothing else is published through it).
        let mut cur = tat.load(Ordering::Acquire);
        loop {
            let verdict = self.decide(cur, now, n);
            let new_tat = match verdict {
                BucketVerdict::Green { new_tat } | BucketVerdict::Yellow { new_tat } => new_tat,
                BucketVerdict::Red { .. } | BucketVerdict::Never => return verdict,
            };
            crate::crash_point!(BucketVerdict::Never);
            // AcqRel: Release publishes our `tat'` to the next taker's
            // Acquire load; Acquire on failure re-reads the winner's value.
            match tat.compare_exchange_weak(cur, new_tat, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return verdict,
                Err(actual) => {
                    cur = actual;
                    crate::sync::spin_hint(&backoff);
                }
            }
        }
    }
}

impl RateParams {
    /// The `tat` that carries a bucket over to new parameters (a reload):
    /// it keeps the tokens it had, trimmed to the new burst. `old` is the
    /// bucket's previous parameters, `tat` its word, `now` bucket time.
    pub fn carry_over(&self, old: &RateParams, tat: u64, now: u64) -> u64 {
        let debt = u128::from(tat.saturating_sub(now));
        let old_room = u128::from(old.burst) * u128::from(old.t);
        let had = old_room.saturating_sub(debt) / u128::from(old.t.max(1));
        let keep = had.min(u128::from(self.burst));
        let new_debt = (u128::from(self.burst) - keep) * u128::from(self.t);
        u64::try_from(u128::from(now) + new_debt).unwrap_or(u64::MAX)
    }
}

/// Convert fixed-point units to nanoseconds, rounding up (a retry-after must
/// never be early).
pub fn units_to_ns_ceil(units: u64) -> u64 {
    units.div_ceil(UNITS_PER_NS)
}

/// Convert nanoseconds since the epoch to fixed-point units, saturating.
pub fn ns_to_units(ns: u64) -> u64 {
    ns.saturating_mul(UNITS_PER_NS)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    // Covers the GCRA bucket: `decide` against an independent reference model
    // of PRODUCT.md's definition, exact retry-after, burst/excess/refill,
    // rate accuracy, range edges (C07), stale clocks (C03) and concurrent takes.

    use super::*;
    use proptest::prelude::*;

    /// Fixed-point units in one second: every time below is an exact
    /// fraction of a second with this denominator.
    const UNITS_PER_SEC: u64 = 1_000_000_000 * UNITS_PER_NS;
    const MS: u64 = UNITS_PER_SEC / 1000;

    /// What the reference model says about one request.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    enum RefColour {
        Green(u128),
        Yellow(u128),
        Red(u128),
        Never,
    }

    /// PRODUCT.md's GCRA, written from the text alone in signed 128-bit
    /// arithmetic. Times are in units of 1/(64·10⁹) s, `t_units` is T in the
    /// same units (so T = t_units / 64·10⁹ s exactly). The state is read as a
    /// debt: how far `tat` lies ahead of `now` (never negative).
    fn reference(t_units: u64, burst: u64, excess: u64, tat: u64, now: u64, n: u64) -> RefColour {
        let t = i128::from(t_units);
        let n_i = i128::from(n);
        let burst_i = i128::from(burst);
        let tol = burst_i + i128::from(excess);
        if n_i > tol {
            return RefColour::Never;
        }
        let debt = (i128::from(tat) - i128::from(now)).max(0);
        let after = debt + n_i * t;
        let new_tat = i128::from(now) + after;
        if after <= burst_i * t {
            return RefColour::Green(new_tat as u128);
        }
        if after <= tol * t {
            return RefColour::Yellow(new_tat as u128);
        }
        // Smallest d with max(tat - now - d, 0) + n·T <= cap·T; since
        // n <= cap this is tat - now - (cap - n)·T.
        let cap = if n_i <= burst_i { burst_i } else { tol };
        let d = i128::from(tat) - i128::from(now) - (cap - n_i) * t;
        assert!(d > 0, "a red request always has something to wait for");
        RefColour::Red(d as u128)
    }

    fn as_ref_colour(v: BucketVerdict) -> RefColour {
        match v {
            BucketVerdict::Green { new_tat } => RefColour::Green(u128::from(new_tat)),
            BucketVerdict::Yellow { new_tat } => RefColour::Yellow(u128::from(new_tat)),
            BucketVerdict::Red { retry_after } => RefColour::Red(u128::from(retry_after)),
            BucketVerdict::Never => RefColour::Never,
        }
    }

    fn is_admit(v: BucketVerdict) -> bool {
        matches!(
            v,
            BucketVerdict::Green { .. } | BucketVerdict::Yellow { .. }
        )
    }

    /// Arbitrary valid parameters, rate spread over [MIN_RATE, MAX_RATE] on a
    /// log scale, with burst and excess shrunk until they fit.
    fn params() -> impl Strategy<Value = RateParams> {
        let lo = crate::limits::MIN_RATE.ln();
        let hi = crate::limits::MAX_RATE.ln();
        (lo..=hi, 1u64..=1 << 20, 0u64..=1 << 20, any::<bool>()).prop_map(
            |(ln_rate, burst, excess, no_excess)| {
                let rate = ln_rate
                    .exp()
                    .clamp(crate::limits::MIN_RATE, crate::limits::MAX_RATE);
                let t = RateParams::new(rate, 1, 0).unwrap().t;
                let room = (u64::MAX >> 2) / t;
                let burst = burst.min(room).max(1);
                let excess = if no_excess {
                    0
                } else {
                    excess.min(room - burst)
                };
                RateParams::new(rate, burst, excess).unwrap()
            },
        )
    }

    /// A request against `p`: (tat, now, cost), with tat placed within a few
    /// tolerances of now so that every colour is reached.
    fn request(p: RateParams) -> impl Strategy<Value = (RateParams, u64, u64, u64)> {
        let tol = p.max_cost();
        let k_span = i128::from(tol) + 3;
        (
            0u64..=1 << 61,
            -k_span..=k_span,
            0..p.t,
            prop_oneof![8 => 1..=tol.saturating_add(2), 1 => Just(u64::MAX)],
        )
            .prop_map(move |(now, k, r, n)| {
                let tat = i128::from(now) + k * i128::from(p.t) + i128::from(r);
                let tat = tat.clamp(0, 1 << 62) as u64;
                (p, tat, now, n)
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn decide_agrees_with_reference_and_retry_after_is_exact(
            (p, tat, now, n) in params().prop_flat_map(request)
        ) {
            let v = p.decide(tat, now, n);
            prop_assert_eq!(as_ref_colour(v), reference(p.t, p.burst, p.excess, tat, now, n));
            if let BucketVerdict::Red { retry_after } = v {
                prop_assert!(retry_after >= 1);
                let at = now + retry_after;
                let best_is_green = n <= p.burst;
                let then = p.decide(tat, at, n);
                if best_is_green {
                    prop_assert!(matches!(then, BucketVerdict::Green { .. }), "at retry: {:?}", then);
                } else {
                    prop_assert!(matches!(then, BucketVerdict::Yellow { .. }), "at retry: {:?}", then);
                }
                let early = p.decide(tat, at - 1, n);
                if best_is_green {
                    prop_assert!(!matches!(early, BucketVerdict::Green { .. }), "early: {:?}", early);
                } else {
                    prop_assert!(matches!(early, BucketVerdict::Red { .. }), "early: {:?}", early);
                }
            }
        }

        #[test]
        fn decide_never_panics_on_untrusted_record_values(
            t in 1u64..=u64::MAX, burst in any::<u64>(), excess in any::<u64>(),
            tat in any::<u64>(), now in any::<u64>(), n in any::<u64>()
        ) {
            let p = RateParams { t, burst, excess };
            let v = p.decide(tat, now, n);
            if let BucketVerdict::Green { new_tat } | BucketVerdict::Yellow { new_tat } = v {
                // An admit always moves tat forward past both inputs.
                prop_assert!(new_tat >= tat.max(now));
            }
        }

        #[test]
        fn emission_interval_is_one_over_rate_rounded_up(k in 1u64..=1_000_000_000, shift in 0u32..=20) {
            // rate = k / 2^shift is exact in f64, so T's exact value is known.
            let rate = k as f64 / f64::from(1u32 << shift);
            prop_assume!(rate >= crate::limits::MIN_RATE);
            let p = RateParams::new(rate, 1, 0).unwrap();
            // T = ceil(UNITS_PER_SEC / rate) = ceil(UNITS_PER_SEC · 2^shift / k).
            let num = u128::from(UNITS_PER_SEC) << shift;
            let want = num.div_ceil(u128::from(k));
            prop_assert_eq!(u128::from(p.t), want);
            // T is never shorter than 1/rate, and less than one unit longer.
            prop_assert!(u128::from(p.t) * u128::from(k) >= num);
            prop_assert!((u128::from(p.t) - 1) * u128::from(k) < num);
        }

        /// C03 step 4 as a property: random stale and fresh stamps; every
        /// stamp window holds no more than its tolerance plus its refill.
        #[test]
        fn stale_stamps_never_mint_tokens(
            rate in 1.0f64..=1000.0,
            burst in 1u64..=8,
            excess in 0u64..=4,
            ops in proptest::collection::vec((0u64..=3000, prop_oneof![1 => Just(0u64), 1 => 0u64..=4000], 1u64..=3), 1..200)
        ) {
            let p = RateParams::new(rate, burst, excess).unwrap();
            let word = AtomicU64::new(0);
            let mut real = 10 * UNITS_PER_SEC;
            let mut max_stamp = 0u64;
            let mut admits: Vec<(u64, u64)> = Vec::new();
            for (advance_permille, stale_permille, n) in ops {
                // Advance the real clock by up to 3 T; stamp up to 4 T ago.
                real += p.t / 1000 * advance_permille;
                let stamp = real - p.t / 1000 * stale_permille;
                let n = n.min(p.max_cost());
                let before = word.load(Ordering::Relaxed);
                let v = p.take(&word, stamp, n);
                let after = word.load(Ordering::Relaxed);
                prop_assert_eq!(as_ref_colour(v), reference(p.t, p.burst, p.excess, before, stamp, n));
                prop_assert!(after >= before, "tat moved back from {} to {}", before, after);
                if is_admit(v) {
                    // A clock clamped to the latest stamp would have admitted too.
                    let clamped = stamp.max(max_stamp);
                    prop_assert!(
                        is_admit(p.decide(before, clamped, n)),
                        "stale stamp {} admitted what clamped {} refuses", stamp, clamped
                    );
                    admits.push((stamp, n));
                } else {
                    prop_assert_eq!(after, before);
                }
                max_stamp = max_stamp.max(stamp);
            }
            check_windows(&p, &mut admits)?;
        }
    }

    /// Over every stamp window [t1, t2], with tol = burst + excess:
    /// `Σ cost · T ≤ tol · T + (t2 − t1)`. That is PRODUCT's bound
    /// `≤ burst + excess + rate·(t2 − t1)` with T rounded up, stated exactly.
    fn check_windows(p: &RateParams, admits: &mut [(u64, u64)]) -> Result<(), TestCaseError> {
        admits.sort_unstable();
        let t = u128::from(p.t);
        for i in 0..admits.len() {
            if i > 0 && admits[i].0 == admits[i - 1].0 {
                continue;
            }
            let mut sum = 0u128;
            for j in i..admits.len() {
                sum += u128::from(admits[j].1);
                if j + 1 < admits.len() && admits[j + 1].0 == admits[j].0 {
                    continue;
                }
                let span = u128::from(admits[j].0 - admits[i].0);
                prop_assert!(
                    sum * t <= u128::from(p.max_cost()) * t + span,
                    "window [{}, {}] admitted {} tokens",
                    admits[i].0,
                    admits[j].0,
                    sum
                );
            }
        }
        Ok(())
    }

    #[test]
    fn new_bucket_admits_burst_green_then_excess_yellow_then_red() {
        for (burst, excess) in [(1, 0), (5, 0), (3, 2), (1, 7), (100, 50)] {
            let p = RateParams::new(10.0, burst, excess).unwrap();
            let word = AtomicU64::new(0);
            let now = 7 * UNITS_PER_SEC;
            for i in 0..burst {
                assert!(
                    matches!(p.take(&word, now, 1), BucketVerdict::Green { .. }),
                    "green #{i}"
                );
            }
            for i in 0..excess {
                assert!(
                    matches!(p.take(&word, now, 1), BucketVerdict::Yellow { .. }),
                    "yellow #{i}"
                );
            }
            let before = word.load(Ordering::Relaxed);
            assert_eq!(
                p.take(&word, now, 1),
                BucketVerdict::Red {
                    retry_after: (excess + 1) * p.t
                }
            );
            assert_eq!(word.load(Ordering::Relaxed), before);
        }
    }

    #[test]
    fn new_bucket_is_full_even_at_time_zero() {
        let p = RateParams::new(2.0, 4, 0).unwrap();
        let word = AtomicU64::new(0);
        for _ in 0..4 {
            assert!(matches!(p.take(&word, 0, 1), BucketVerdict::Green { .. }));
        }
        assert!(matches!(p.take(&word, 0, 1), BucketVerdict::Red { .. }));
    }

    #[test]
    fn idle_refills_one_token_per_emission_interval_up_to_burst() {
        let p = RateParams::new(10.0, 5, 0).unwrap();
        assert_eq!(p.t, 100 * MS);
        let word = AtomicU64::new(0);
        let t0 = UNITS_PER_SEC;
        for _ in 0..5 {
            assert!(is_admit(p.take(&word, t0, 1)));
        }
        // 299.99.. ms later: only 2 tokens have come back.
        let now = t0 + 3 * p.t - 1;
        assert!(is_admit(p.take(&word, now, 1)));
        assert!(is_admit(p.take(&word, now, 1)));
        assert_eq!(p.take(&word, now, 1), BucketVerdict::Red { retry_after: 1 });
        // A long idle refills to burst, never beyond.
        let later = t0 + 3600 * UNITS_PER_SEC;
        for _ in 0..5 {
            assert!(matches!(
                p.take(&word, later, 1),
                BucketVerdict::Green { .. }
            ));
        }
        assert!(matches!(p.take(&word, later, 1), BucketVerdict::Red { .. }));
    }

    #[test]
    fn cost_above_one_takes_that_many_tokens() {
        let p = RateParams::new(10.0, 10, 0).unwrap();
        let word = AtomicU64::new(0);
        let now = UNITS_PER_SEC;
        assert_eq!(
            p.take(&word, now, 4),
            BucketVerdict::Green {
                new_tat: now + 4 * p.t
            }
        );
        assert_eq!(
            p.take(&word, now, 4),
            BucketVerdict::Green {
                new_tat: now + 8 * p.t
            }
        );
        // Two tokens left: cost 4 waits for two more.
        assert_eq!(
            p.take(&word, now, 4),
            BucketVerdict::Red {
                retry_after: 2 * p.t
            }
        );
        assert_eq!(
            p.take(&word, now, 2),
            BucketVerdict::Green {
                new_tat: now + 10 * p.t
            }
        );
        assert_eq!(
            p.take(&word, now + 2 * p.t, 3),
            BucketVerdict::Red { retry_after: p.t }
        );
        assert!(matches!(
            p.take(&word, now + 3 * p.t, 3),
            BucketVerdict::Green { .. }
        ));
    }

    #[test]
    fn excess_admits_yellow_and_cost_above_burst_retries_to_yellow() {
        let p = RateParams::new(10.0, 2, 3).unwrap();
        let now = UNITS_PER_SEC;
        // Full bucket: cost 4 (> burst, ≤ burst + excess) is yellow at once.
        assert_eq!(
            p.decide(0, now, 4),
            BucketVerdict::Yellow {
                new_tat: now + 4 * p.t
            }
        );
        assert_eq!(
            p.decide(0, now, 2),
            BucketVerdict::Green {
                new_tat: now + 2 * p.t
            }
        );
        assert_eq!(
            p.decide(0, now, 5),
            BucketVerdict::Yellow {
                new_tat: now + 5 * p.t
            }
        );
        assert_eq!(p.decide(0, now, 6), BucketVerdict::Never);
        // Drained to the yellow edge: cost 4's best colour is yellow, which
        // comes back after 4 T.
        let tat = now + 5 * p.t;
        assert_eq!(
            p.decide(tat, now, 4),
            BucketVerdict::Red {
                retry_after: 4 * p.t
            }
        );
        // Cost 1's best colour is green: 4 T as well (debt 5 T, 1 T needed
        // under the green line of 2 T).
        assert_eq!(
            p.decide(tat, now, 1),
            BucketVerdict::Red {
                retry_after: 4 * p.t
            }
        );
        assert!(matches!(
            p.decide(tat, now + 3 * p.t, 1),
            BucketVerdict::Yellow { .. }
        ));
    }

    /// Times of the admits when a request of cost 1 is made at every tick.
    fn admit_times(p: &RateParams, step: u64, horizon: u64) -> Vec<u64> {
        let word = AtomicU64::new(0);
        let mut out = Vec::new();
        let mut now = 0;
        while now < horizon {
            if is_admit(p.take(&word, now, 1)) {
                out.push(now);
            }
            now += step;
        }
        out
    }

    fn count_in(admits: &[u64], from: u64, len: u64) -> usize {
        admits
            .iter()
            .filter(|&&a| a >= from && a < from + len)
            .count()
    }

    #[test]
    fn rate_three_admits_three_per_second_on_a_millisecond_clock() {
        let p = RateParams::new(3.0, 1, 0).unwrap();
        let admits = admit_times(&p, MS, 10 * UNITS_PER_SEC);
        assert_eq!(admits.len(), 30, "admits: {admits:?}");
        for s in 0..10 {
            assert_eq!(
                count_in(&admits, s * UNITS_PER_SEC, UNITS_PER_SEC),
                3,
                "second {s}"
            );
        }
        // Sliding one-second windows on the millisecond grid: never 4. (The
        // floor is 2, not 3: a 1 ms clock can only admit on the next tick
        // after T, so it loses up to 1 ms per admit.)
        for s in 0..9000 {
            let c = count_in(&admits, s * MS, UNITS_PER_SEC);
            assert!((2..=3).contains(&c), "window at {s} ms holds {c}");
        }
    }

    #[test]
    fn rate_three_retried_exactly_admits_exactly_three_in_every_second() {
        // Retrying at exactly `retry_after` puts admits at k·T, the tightest
        // packing GCRA allows: T rounded down would fit 4 into one second.
        let p = RateParams::new(3.0, 1, 0).unwrap();
        let word = AtomicU64::new(0);
        let mut now = 0;
        let mut admits = Vec::new();
        while now < 10 * UNITS_PER_SEC {
            match p.take(&word, now, 1) {
                BucketVerdict::Green { .. } => admits.push(now),
                BucketVerdict::Red { retry_after } => now += retry_after,
                v => panic!("unexpected {v:?}"),
            }
        }
        assert_eq!(admits.len(), 30);
        for (k, &a) in admits.iter().enumerate() {
            assert_eq!(a, k as u64 * p.t);
        }
        for (i, &a) in admits.iter().enumerate().take(admits.len() - 3) {
            assert_eq!(
                count_in(&admits, a, UNITS_PER_SEC),
                3,
                "window from admit {i}"
            );
        }
        for s in 0..9000 {
            assert!(
                count_in(&admits, s * MS, UNITS_PER_SEC) <= 3,
                "window at {s} ms"
            );
        }
    }

    #[test]
    fn smallest_rate_works_and_refuses_a_tolerance_it_cannot_hold() {
        let min = crate::limits::MIN_RATE;
        let p = RateParams::new(min, 1, 0).unwrap();
        // ~2.26 years per token, still exact in the word.
        assert!(p.t > 4_000_000_000_000_000_000);
        let word = AtomicU64::new(0);
        assert_eq!(p.take(&word, 0, 1), BucketVerdict::Green { new_tat: p.t });
        assert_eq!(p.take(&word, 0, 1), BucketVerdict::Red { retry_after: p.t });
        assert_eq!(
            p.take(&word, UNITS_PER_SEC, 1),
            BucketVerdict::Red {
                retry_after: p.t - UNITS_PER_SEC
            }
        );
        assert_eq!(RateParams::new(min, 2, 0), Err(RateError::ToleranceTooLong));
        assert_eq!(RateParams::new(min, 1, 1), Err(RateError::ToleranceTooLong));
    }

    #[test]
    fn largest_rate_is_one_token_per_nanosecond() {
        let p = RateParams::new(1e9, 1, 0).unwrap();
        assert_eq!(p.t, UNITS_PER_NS);
        let word = AtomicU64::new(0);
        let now = 5 * UNITS_PER_SEC;
        assert!(is_admit(p.take(&word, now, 1)));
        assert_eq!(
            p.take(&word, now, 1),
            BucketVerdict::Red {
                retry_after: UNITS_PER_NS
            }
        );
        assert!(is_admit(p.take(&word, now + UNITS_PER_NS, 1)));
    }

    #[test]
    fn c07_huge_rate_and_burst_refill_saturates_without_wrapping() {
        let p = RateParams::new(1e9, 1_000_000_000, 0).unwrap();
        let word = AtomicU64::new(0);
        let t0 = UNITS_PER_SEC;
        // Drain.
        assert!(matches!(
            p.take(&word, t0, 1_000_000_000),
            BucketVerdict::Green { .. }
        ));
        assert!(matches!(p.take(&word, t0, 1), BucketVerdict::Red { .. }));
        // Idle 20 s: 2·10¹⁰ tokens' worth of time, capped at burst.
        let now = t0 + ns_to_units(20_000_000_000);
        assert_eq!(now, t0 + 20 * UNITS_PER_SEC);
        assert_eq!(
            p.take(&word, now, 1_000_000_000),
            BucketVerdict::Green {
                new_tat: now + 1_000_000_000 * UNITS_PER_NS
            }
        );
        let v = p.take(&word, now, 1_000_000_000);
        assert_eq!(
            v,
            BucketVerdict::Red {
                retry_after: UNITS_PER_SEC
            }
        );
        let BucketVerdict::Red { retry_after } = v else {
            unreachable!()
        };
        assert_eq!(units_to_ns_ceil(retry_after), 1_000_000_000);
    }

    #[test]
    fn cost_u64_max_is_never_and_writes_nothing() {
        for (burst, excess) in [(1, 0), (5, 5)] {
            let p = RateParams::new(10.0, burst, excess).unwrap();
            let word = AtomicU64::new(12345);
            assert_eq!(p.take(&word, 0, u64::MAX), BucketVerdict::Never);
            assert_eq!(p.take(&word, 0, p.max_cost() + 1), BucketVerdict::Never);
            assert_eq!(word.load(Ordering::Relaxed), 12345);
        }
    }

    #[test]
    fn a_tat_past_the_word_refuses_rather_than_wraps() {
        let p = RateParams::new(1e9, 4, 0).unwrap();
        let near_end = u64::MAX - 10;
        let word = AtomicU64::new(near_end);
        let v = p.take(&word, near_end, 1);
        assert_eq!(
            v,
            BucketVerdict::Red {
                retry_after: u64::MAX
            }
        );
        assert_eq!(word.load(Ordering::Relaxed), near_end);
    }

    #[test]
    fn refused_take_leaves_the_word_byte_for_byte_unchanged() {
        let p = RateParams::new(10.0, 5, 2).unwrap();
        let now = UNITS_PER_SEC;
        let word = AtomicU64::new(0);
        while is_admit(p.take(&word, now, 1)) {}
        let before = word.load(Ordering::Relaxed).to_ne_bytes();
        for (at, n) in [
            (now, 1),
            (now, 3),
            (now - 50 * MS, 1),
            (now + 10 * MS, 1),
            (0, 1),
            (now, 8),
        ] {
            let v = p.take(&word, at, n);
            assert!(
                matches!(v, BucketVerdict::Red { .. } | BucketVerdict::Never),
                "{v:?}"
            );
            assert_eq!(word.load(Ordering::Relaxed).to_ne_bytes(), before);
        }
    }

    #[test]
    fn c03_stale_stamp_after_a_drain_is_refused_and_tat_stays() {
        let p = RateParams::new(10.0, 5, 0).unwrap();
        let word = AtomicU64::new(0);
        // B drains the bucket at 1000 ms.
        let b_now = 1000 * MS;
        for _ in 0..5 {
            assert!(matches!(
                p.take(&word, b_now, 1),
                BucketVerdict::Green { .. }
            ));
        }
        let drained = word.load(Ordering::Relaxed);
        assert_eq!(drained, 1500 * MS);
        // A arrives with its stale 900 ms.
        let a = p.take(&word, 900 * MS, 1);
        assert_eq!(
            a,
            BucketVerdict::Red {
                retry_after: 200 * MS
            }
        );
        assert_eq!(word.load(Ordering::Relaxed), drained);
        // B at 1000 ms: still refused, back in exactly 100 ms.
        let b = p.take(&word, b_now, 1);
        assert_eq!(
            b,
            BucketVerdict::Red {
                retry_after: 100 * MS
            }
        );
        let BucketVerdict::Red { retry_after } = b else {
            unreachable!()
        };
        assert_eq!(units_to_ns_ceil(retry_after), 100_000_000);
        assert_eq!(word.load(Ordering::Relaxed), drained);
    }

    #[test]
    fn stale_admit_never_moves_tat_backwards() {
        let p = RateParams::new(10.0, 5, 0).unwrap();
        let word = AtomicU64::new(0);
        assert!(is_admit(p.take(&word, 1000 * MS, 1)));
        let after_fresh = word.load(Ordering::Relaxed);
        // A stamp older than the last admit still charges from the stored tat.
        assert_eq!(
            p.take(&word, 950 * MS, 1),
            BucketVerdict::Green {
                new_tat: after_fresh + p.t
            }
        );
        assert_eq!(word.load(Ordering::Relaxed), after_fresh + p.t);
        // A very stale one is judged against the stored tat, so it is
        // stricter than a fresh one, never looser.
        assert_eq!(
            p.take(&word, 500 * MS, 1),
            BucketVerdict::Red {
                retry_after: 300 * MS
            }
        );
        assert_eq!(word.load(Ordering::Relaxed), after_fresh + p.t);
    }

    #[test]
    fn rate_params_reject_out_of_range_rates_and_zero_burst() {
        for bad in [
            0.0,
            -0.0,
            -1.0,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            1e9 * (1.0 + f64::EPSILON),
            1e10,
            f64::MIN_POSITIVE,
            crate::limits::MIN_RATE / 2.0,
        ] {
            let r = RateParams::new(bad, 1, 0);
            assert!(
                matches!(r, Err(RateError::OutOfRange(_))),
                "rate {bad}: {r:?}"
            );
        }
        assert_eq!(RateParams::new(10.0, 0, 5), Err(RateError::ZeroBurst));
        assert!(RateParams::new(1e9, 1, 0).is_ok());
        assert!(RateParams::new(crate::limits::MIN_RATE, 1, 0).is_ok());
        let msg = RateParams::new(-1.0, 1, 0).unwrap_err().to_string();
        assert!(msg.contains("-1"), "{msg}");
    }

    #[test]
    fn unit_conversions_round_retry_up_and_saturate() {
        assert_eq!(units_to_ns_ceil(0), 0);
        assert_eq!(units_to_ns_ceil(1), 1);
        assert_eq!(units_to_ns_ceil(UNITS_PER_NS), 1);
        assert_eq!(units_to_ns_ceil(UNITS_PER_NS + 1), 2);
        assert_eq!(ns_to_units(3), 3 * UNITS_PER_NS);
        assert_eq!(ns_to_units(u64::MAX), u64::MAX);
    }

    #[test]
    fn concurrent_takes_admit_exactly_the_tolerance() {
        // 4 threads race for one full bucket at the same instant: exactly
        // burst + excess unit costs get through, however the CASes interleave.
        let p = RateParams::new(1.0, 300, 100).unwrap();
        let word = AtomicU64::new(0);
        let now = UNITS_PER_SEC;
        let barrier = std::sync::Barrier::new(4);
        let counts: Vec<(u64, u64)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        let (mut green, mut yellow) = (0, 0);
                        for _ in 0..500 {
                            match p.take(&word, now, 1) {
                                BucketVerdict::Green { .. } => green += 1,
                                BucketVerdict::Yellow { .. } => yellow += 1,
                                _ => {}
                            }
                        }
                        (green, yellow)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let green: u64 = counts.iter().map(|c| c.0).sum();
        let yellow: u64 = counts.iter().map(|c| c.1).sum();
        assert_eq!((green, yellow), (300, 100));
        assert_eq!(word.load(Ordering::Relaxed), now + 400 * p.t);
    }

    #[test]
    fn concurrent_stale_stamps_never_exceed_the_window_bound() {
        // C03 step 4 with real threads: each reads a shared clock, then uses
        // a stamp up to 5 T stale. The bound holds for any interleaving.
        let p = RateParams::new(100.0, 4, 2).unwrap();
        let word = AtomicU64::new(0);
        let clock = AtomicU64::new(UNITS_PER_SEC);
        let logs: Vec<Vec<(u64, u64)>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4u64)
                .map(|id| {
                    let (p, word, clock) = (&p, &word, &clock);
                    s.spawn(move || {
                        let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (id + 1);
                        let mut log = Vec::new();
                        for _ in 0..3000 {
                            x ^= x << 13;
                            x ^= x >> 7;
                            x ^= x << 17;
                            let real = clock.fetch_add(p.t / 7, Ordering::Relaxed);
                            let stale = if x & 1 == 0 { 0 } else { (x >> 8) % (5 * p.t) };
                            let stamp = real.saturating_sub(stale);
                            let n = 1 + (x >> 40) % 3;
                            if is_admit(p.take(word, stamp, n)) {
                                log.push((stamp, n));
                            }
                        }
                        log
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut all: Vec<(u64, u64)> = logs.into_iter().flatten().collect();
        assert!(!all.is_empty());
        check_windows(&p, &mut all).unwrap();
    }
}
