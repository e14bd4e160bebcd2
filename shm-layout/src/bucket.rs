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
            return BucketVerdict::Red { retry_after: u64::MAX };
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

/// Convert fixed-point units to nanoseconds, rounding up (a retry-after must
/// never be early).
pub fn units_to_ns_ceil(units: u64) -> u64 {
    units.div_ceil(UNITS_PER_NS)
}

/// Convert nanoseconds since the epoch to fixed-point units, saturating.
pub fn ns_to_units(ns: u64) -> u64 {
    ns.saturating_mul(UNITS_PER_NS)
}
