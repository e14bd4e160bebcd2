//! Retry budgets: retries are demand too, and may not outgrow first
//! attempts.
//!
//! # Algorithm
//!
//! A class with `retry_burst` set has one word of budget, in millionths of a
//! unit, starting full (`retry_burst` units). Every admitted first attempt
//! adds `retry_ratio` units (capped at `retry_burst`); every attempt after the
//! first takes one whole unit before anything else is taken, or is refused
//! `retry_budget`. A retry refused later (by slots or the rate) gets its unit
//! back, so a refused retry consumes nothing.
//!
//! So over any period, admitted retries ≤ `retry_ratio` × admitted first
//! attempts + `retry_burst`.
//!
//! # Who writes, progress, crashes
//!
//! Any client, by CAS (lock-free: a CAS fails only because another request
//! changed the word). A process that dies between taking a unit and the rest
//! of the decision has spent it: the budget errs on the side of fewer
//! retries.

use crate::sync::{AtomicU64, Ordering};

/// One unit of budget, in the word's units.
pub const UNIT: u64 = 1_000_000;

/// Take one unit for a retry. False (nothing taken) when less than a unit
/// is left.
pub fn take(tokens: &AtomicU64) -> bool {
    // AcqRel/Acquire: the budget word is the whole state; the CAS orders
    // competing takers and refillers.
    tokens
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| t.checked_sub(UNIT))
        .is_ok()
}

/// Give back a unit taken by a retry that was then refused, up to `cap`
/// units.
pub fn give_back(tokens: &AtomicU64, cap_units: u64) {
    refill(tokens, UNIT, cap_units);
}

/// Add `ppm` millionths of a unit (an admitted first attempt), capped at
/// `cap_units` units.
pub fn refill(tokens: &AtomicU64, ppm: u64, cap_units: u64) {
    if ppm == 0 {
        return;
    }
    let cap = cap_units.saturating_mul(UNIT);
    // AcqRel/Acquire: as in `take`.
    let _ = tokens.fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
        let next = t.saturating_add(ppm).min(cap);
        (next != t).then_some(next)
    });
}
