//! The admission decision for one request: the order of checks.
//!
//! 1. **Shape.** A cost above the largest the class could ever admit (its
//!    `max_cost`, `burst + excess_burst`, the lane's ceiling) is refused
//!    `smaller_scope` with that largest cost. Nothing is taken.
//! 2. **Slots** (if the class has `max_in_flight`): claim `n` slot words
//!    below the lane's ceiling ([`crate::slots::claim`]). None free: refused
//!    `not_now`, no retry-after (no ETA is known on this path).
//! 3. **Tokens** (if the class has a rate): one CAS on `tat`
//!    ([`crate::bucket`]). Red: the slots taken in step 2 are given back,
//!    then refused `not_now` with the exact retry-after.
//! 4. **Admit.** Degraded if the bucket said yellow or a slot at or above
//!    `soft_in_flight` was needed.
//!
//! A refused request therefore holds nothing once this returns. The checks
//! that need no shared write (class state, draining, cost 0) are made by the
//! caller before this.
//!
//! A process that dies inside this function leaves at most slot words with
//! its own tag (returned by the reclaimer) and possibly tokens taken (time,
//! which is never given back).

use crate::bucket::{units_to_ns_ceil, BucketVerdict, RateParams};
use crate::counters::Reason;
use crate::slots::{self, SlotGrant};
use crate::sync::AtomicU64;

/// A class's limits, read from its record for one decision.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ClassParams {
    /// Slots; 0 = no slots.
    pub max_in_flight: u32,
    /// Degraded above this position.
    pub soft_in_flight: u32,
    /// Per-lane ceilings (positions), in lane order.
    pub lane_ceiling: [u32; 4],
    /// The bucket, if any.
    pub rate: Option<RateParams>,
    /// Cap on cost; 0 = none.
    pub max_cost: u64,
}

/// What a request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ask {
    /// Cost, ≥ 1.
    pub cost: u64,
    /// Lane index (0 = critical … 3 = maintenance).
    pub lane: usize,
}

/// The outcome of [`decide`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Admitted; the slots (if any) carry the caller's tag.
    Admitted {
        /// The slots claimed.
        slots: SlotGrant,
        /// Excess burst or above `soft_in_flight`.
        degraded: bool,
    },
    /// Refused; nothing is held.
    Refused {
        /// Why.
        reason: Reason,
        /// When to come back, ns, if known.
        retry_after_ns: Option<u64>,
        /// For `smaller_scope`: the largest cost that could be admitted.
        largest: Option<u64>,
    },
}

impl ClassParams {
    /// The ceiling (in slot positions) of `lane`, clamped to the slots.
    pub fn ceiling(&self, lane: usize) -> u32 {
        let c = self.lane_ceiling.get(lane).copied().unwrap_or(self.max_in_flight);
        c.min(self.max_in_flight)
    }

    /// The largest cost the class could ever admit in `lane`.
    pub fn largest_cost(&self, lane: usize) -> u64 {
        let mut cap = u64::MAX;
        if self.max_cost > 0 {
            cap = cap.min(self.max_cost);
        }
        if let Some(r) = &self.rate {
            cap = cap.min(r.max_cost());
        }
        if self.max_in_flight > 0 {
            cap = cap.min(u64::from(self.ceiling(lane)));
        }
        cap
    }
}

/// Decide one request: the checks above, in order.
///
/// `now` is bucket time in fixed-point units; `tag` identifies the permit in
/// the slot words it claims.
pub fn decide(p: &ClassParams, tat: &AtomicU64, slot_words: &[AtomicU64], ask: Ask, now: u64, tag: u64) -> Admission {
    let largest = p.largest_cost(ask.lane);
    if ask.cost > largest {
        return Admission::Refused {
            reason: Reason::SmallerScope,
            retry_after_ns: None,
            largest: Some(largest),
        };
    }

    let mut grant = SlotGrant::default();
    if p.max_in_flight > 0 {
        let ceiling = p.ceiling(ask.lane) as usize;
        let soft = p.soft_in_flight.min(p.max_in_flight) as usize;
        match slots::claim(slot_words, ceiling, soft, ask.cost, tag) {
            Some(g) => grant = g,
            None => {
                return Admission::Refused {
                    reason: Reason::NotNow,
                    retry_after_ns: None,
                    largest: None,
                }
            }
        }
    }

    let mut yellow = false;
    if let Some(rate) = &p.rate {
        match rate.take(tat, now, ask.cost) {
            BucketVerdict::Green { .. } => {}
            BucketVerdict::Yellow { .. } => yellow = true,
            BucketVerdict::Red { retry_after } => {
                slots::release(slot_words, &grant, tag);
                return Admission::Refused {
                    reason: Reason::NotNow,
                    retry_after_ns: Some(units_to_ns_ceil(retry_after)),
                    largest: None,
                };
            }
            BucketVerdict::Never => {
                slots::release(slot_words, &grant, tag);
                return Admission::Refused {
                    reason: Reason::SmallerScope,
                    retry_after_ns: None,
                    largest: Some(rate.max_cost()),
                };
            }
        }
    }

    Admission::Admitted { slots: grant, degraded: yellow || grant.degraded }
}

#[cfg(not(loom))]
impl ClassParams {
    /// Read a class record's limits. The record is untrusted: values are
    /// clamped so that no later index can leave the class's slot range.
    pub fn load(rec: &crate::layout::ClassRecord) -> Self {
        use crate::sync::Ordering::Relaxed;
        // Relaxed throughout: the caller loaded `generation` with Acquire
        // (pairing with the daemon's Release store of it), which orders
        // these config reads after the config was written. A reload racing
        // this read may mix old and new limits for one request; every
        // combination is still safe because each value is clamped.
        let slot_len = rec.slot_len.load(Relaxed);
        let max_in_flight = rec.max_in_flight.load(Relaxed).min(slot_len);
        let soft = rec.soft_in_flight.load(Relaxed).min(max_in_flight);
        let mut lane_ceiling = [0u32; 4];
        for (c, src) in lane_ceiling.iter_mut().zip(rec.lane_ceiling.iter()) {
            *c = src.load(Relaxed).min(max_in_flight);
        }
        let t = rec.rate_t.load(Relaxed);
        let rate = (t > 0).then(|| RateParams {
            t,
            burst: rec.burst.load(Relaxed),
            excess: rec.excess.load(Relaxed),
        });
        Self { max_in_flight, soft_in_flight: soft, lane_ceiling, rate, max_cost: rec.max_cost.load(Relaxed) }
    }
}
