//! The admission decision for one request: the order of checks.
//!
//! 1. **Shape.** A cost above the largest the class could ever admit (its
//!    `max_cost`, `burst + excess_burst`, the lane's ceiling) is refused
//!    `smaller_scope` with that largest cost. Nothing is taken.
//! 2. **Slots** (if the class has `max_in_flight`): claim `n` slot words
//!    below the lane's ceiling ([`crate::slots::claim`]). None free: refused
//!    `not_now`, no retry-after (no ETA is known on this path). After a
//!    reload lowered the limit, the held count is checked after the claim
//!    and the claim given back if over, so held permits drain down.
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
    /// A reload lowered the limit and permits may be held above it: count
    /// every held slot after a claim ([`crate::layout::CLASS_OVERCOMMIT`]).
    pub overcommit: bool,
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
        let c = self
            .lane_ceiling
            .get(lane)
            .copied()
            .unwrap_or(self.max_in_flight);
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
pub fn decide(
    p: &ClassParams,
    tat: &AtomicU64,
    slot_words: &[AtomicU64],
    ask: Ask,
    now: u64,
    tag: u64,
) -> Admission {
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
        // A reload lowered `max_in_flight` below the slots the class owns:
        // permits held above the new limit still count. Take, then count
        // every held word, and give back if over (never over-admits; two
        // racers may both give back).
        if p.overcommit && slots::in_flight(slot_words) > u64::from(p.max_in_flight) {
            slots::release(slot_words, &grant, tag);
            return Admission::Refused {
                reason: Reason::NotNow,
                retry_after_ns: None,
                largest: None,
            };
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

    Admission::Admitted {
        slots: grant,
        degraded: yellow || grant.degraded,
    }
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
        Self {
            max_in_flight,
            soft_in_flight: soft,
            lane_ceiling,
            rate,
            max_cost: rec.max_cost.load(Relaxed),
            overcommit: rec.flags.load(Relaxed) & crate::layout::CLASS_OVERCOMMIT != 0,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    // Covers the order of checks in `decide`: shape first (nothing taken),
    // then slots, then tokens with the slot given back on a token refusal;
    // C02 steps 2 and 3; lane ceilings; degraded from yellow and from soft.

    use super::*;
    use crate::bucket::{ns_to_units, UNITS_PER_NS};
    use crate::slots::{in_flight, Owner};
    use crate::sync::Ordering;

    const SEC: u64 = 1_000_000_000 * UNITS_PER_NS;
    const ME: Owner = Owner {
        index: 2,
        generation: 1,
    };

    fn words(n: usize) -> Vec<AtomicU64> {
        (0..n).map(|_| AtomicU64::new(0)).collect()
    }

    fn all_zero(slots: &[AtomicU64]) -> bool {
        slots.iter().all(|w| w.load(Ordering::Relaxed) == 0)
    }

    fn slots_only(max: u32, soft: u32, lanes: [u32; 4]) -> ClassParams {
        ClassParams {
            max_in_flight: max,
            soft_in_flight: soft,
            lane_ceiling: lanes,
            rate: None,
            max_cost: 0,
            overcommit: false,
        }
    }

    fn rate_only(rate: f64, burst: u64, excess: u64) -> ClassParams {
        ClassParams {
            rate: Some(RateParams::new(rate, burst, excess).unwrap()),
            ..ClassParams::default()
        }
    }

    fn ask(cost: u64, lane: usize) -> Ask {
        Ask { cost, lane }
    }

    fn refused(reason: Reason, retry_after_ns: Option<u64>, largest: Option<u64>) -> Admission {
        Admission::Refused {
            reason,
            retry_after_ns,
            largest,
        }
    }

    fn admitted(a: Admission) -> Option<(SlotGrant, bool)> {
        match a {
            Admission::Admitted { slots, degraded } => Some((slots, degraded)),
            Admission::Refused { .. } => None,
        }
    }

    #[test]
    fn shape_refuses_with_the_largest_cost_and_takes_nothing() {
        let mut p = ClassParams {
            rate: Some(RateParams::new(10.0, 5, 3).unwrap()),
            ..slots_only(10, 10, [10, 10, 6, 2])
        };
        let tat = AtomicU64::new(0);
        let slots = words(10);
        let cases = [(9, 1, 8), (7, 2, 6), (3, 3, 2)];
        for (cost, lane, largest) in cases {
            let a = decide(&p, &tat, &slots, ask(cost, lane), SEC, ME.tag(1));
            assert_eq!(
                a,
                refused(Reason::SmallerScope, None, Some(largest)),
                "cost {cost} lane {lane}"
            );
        }
        p.max_cost = 4;
        let a = decide(&p, &tat, &slots, ask(5, 0), SEC, ME.tag(1));
        assert_eq!(a, refused(Reason::SmallerScope, None, Some(4)));
        let a = decide(&p, &tat, &slots, ask(u64::MAX, 0), SEC, ME.tag(1));
        assert_eq!(a, refused(Reason::SmallerScope, None, Some(4)));
        assert_eq!(tat.load(Ordering::Relaxed), 0);
        assert!(all_zero(&slots));
    }

    #[test]
    fn class_without_limits_admits_any_cost() {
        let p = ClassParams::default();
        assert_eq!(p.largest_cost(1), u64::MAX);
        let tat = AtomicU64::new(0);
        let a = decide(&p, &tat, &[], ask(u64::MAX, 1), 0, ME.tag(1));
        assert_eq!(admitted(a), Some((SlotGrant::default(), false)));
    }

    #[test]
    fn token_refusal_gives_the_slot_back_and_leaves_tat() {
        let p = ClassParams {
            rate: Some(RateParams::new(10.0, 2, 0).unwrap()),
            ..slots_only(4, 4, [4; 4])
        };
        let tat = AtomicU64::new(0);
        let slots = words(4);
        let now = SEC;
        let g1 = admitted(decide(&p, &tat, &slots, ask(1, 1), now, ME.tag(1)))
            .unwrap()
            .0;
        let g2 = admitted(decide(&p, &tat, &slots, ask(1, 1), now, ME.tag(2)))
            .unwrap()
            .0;
        assert_eq!(in_flight(&slots), 2);
        let before = tat.load(Ordering::Relaxed);
        let a = decide(&p, &tat, &slots, ask(1, 1), now, ME.tag(3));
        assert_eq!(a, refused(Reason::NotNow, Some(100_000_000), None));
        assert_eq!(tat.load(Ordering::Relaxed), before);
        assert_eq!(
            in_flight(&slots),
            2,
            "the third request's slot was given back"
        );
        crate::slots::release(&slots, &g1, ME.tag(1));
        crate::slots::release(&slots, &g2, ME.tag(2));
        // With no slot held, a token refusal leaves every word at 0.
        let a = decide(&p, &tat, &slots, ask(2, 1), now, ME.tag(4));
        assert!(matches!(
            a,
            Admission::Refused {
                reason: Reason::NotNow,
                ..
            }
        ));
        assert!(all_zero(&slots));
        assert_eq!(tat.load(Ordering::Relaxed), before);
    }

    #[test]
    fn slot_refusal_takes_no_tokens() {
        let p = ClassParams {
            rate: Some(RateParams::new(10.0, 5, 0).unwrap()),
            ..slots_only(1, 1, [1; 4])
        };
        let tat = AtomicU64::new(0);
        let slots = words(1);
        assert!(admitted(decide(&p, &tat, &slots, ask(1, 0), SEC, ME.tag(1))).is_some());
        let before = tat.load(Ordering::Relaxed);
        let a = decide(&p, &tat, &slots, ask(1, 0), SEC, ME.tag(2));
        assert_eq!(a, refused(Reason::NotNow, None, None));
        assert_eq!(tat.load(Ordering::Relaxed), before);
    }

    #[test]
    fn c02_oversized_request_is_smaller_scope_and_takes_no_tokens() {
        let p = rate_only(10.0, 5, 0);
        let tat = AtomicU64::new(0);
        // Step 2: after ≥ 1 s idle, cost 6 can never fit burst 5.
        let now = ns_to_units(1_500_000_000);
        let a = decide(&p, &tat, &[], ask(6, 1), now, ME.tag(1));
        assert_eq!(a, refused(Reason::SmallerScope, None, Some(5)));
        assert_eq!(tat.load(Ordering::Relaxed), 0);
        // Step 3: exactly 5 of 6 cost-1 requests, the 6th back in 100 ms.
        let mut verdicts = Vec::new();
        for i in 0..6 {
            verdicts.push(decide(&p, &tat, &[], ask(1, 1), now, ME.tag(2 + i)));
        }
        for (i, v) in verdicts[..5].iter().enumerate() {
            assert_eq!(
                admitted(*v),
                Some((SlotGrant::default(), false)),
                "request {i}"
            );
        }
        assert_eq!(
            verdicts[5],
            refused(Reason::NotNow, Some(100_000_000), None)
        );
    }

    #[test]
    fn retry_after_ns_is_never_early() {
        // Rate 3/s: T is not a whole number of ns; the retry rounds up.
        let p = rate_only(3.0, 1, 0);
        let tat = AtomicU64::new(0);
        assert!(admitted(decide(&p, &tat, &[], ask(1, 1), SEC, ME.tag(1))).is_some());
        let Admission::Refused {
            retry_after_ns: Some(ns),
            ..
        } = decide(&p, &tat, &[], ask(1, 1), SEC, ME.tag(2))
        else {
            panic!("expected a timed refusal");
        };
        assert_eq!(ns, 333_333_334);
        let a = decide(&p, &tat, &[], ask(1, 1), SEC + ns_to_units(ns), ME.tag(3));
        assert!(admitted(a).is_some());
    }

    #[test]
    fn lane_ceilings_keep_headroom_for_higher_lanes() {
        let p = slots_only(10, 10, [10, 9, 6, 3]);
        let tat = AtomicU64::new(0);
        let slots = words(10);
        let mut seq = 0;
        let mut go = |lane| {
            seq += 1;
            decide(&p, &tat, &slots, ask(1, lane), 0, ME.tag(seq))
        };
        for i in 0..6 {
            assert!(admitted(go(2)).is_some(), "batch #{i}");
        }
        assert_eq!(go(2), refused(Reason::NotNow, None, None), "7th batch");
        assert_eq!(
            go(3),
            refused(Reason::NotNow, None, None),
            "maintenance is under 3"
        );
        for i in 0..4 {
            assert!(admitted(go(0)).is_some(), "critical #{i}");
        }
        assert_eq!(go(0), refused(Reason::NotNow, None, None));
        assert_eq!(in_flight(&slots), 10);
    }

    #[test]
    fn degraded_from_yellow() {
        let p = rate_only(10.0, 1, 1);
        let tat = AtomicU64::new(0);
        assert_eq!(
            admitted(decide(&p, &tat, &[], ask(1, 1), SEC, ME.tag(1))).map(|a| a.1),
            Some(false)
        );
        assert_eq!(
            admitted(decide(&p, &tat, &[], ask(1, 1), SEC, ME.tag(2))).map(|a| a.1),
            Some(true)
        );
        assert!(admitted(decide(&p, &tat, &[], ask(1, 1), SEC, ME.tag(3))).is_none());
    }

    #[test]
    fn degraded_from_soft() {
        let p = slots_only(4, 2, [4; 4]);
        let tat = AtomicU64::new(0);
        let slots = words(4);
        let d: Vec<bool> = (1..=4)
            .map(|s| {
                admitted(decide(&p, &tat, &slots, ask(1, 1), 0, ME.tag(s)))
                    .unwrap()
                    .1
            })
            .collect();
        assert_eq!(d, [false, false, true, true]);
    }

    #[test]
    fn ceiling_clamps_lanes_to_max_in_flight() {
        let p = slots_only(5, 5, [9, 5, 2, 0]);
        assert_eq!(p.ceiling(0), 5);
        assert_eq!(p.ceiling(2), 2);
        assert_eq!(p.ceiling(7), 5, "an unknown lane gets the class's slots");
        assert_eq!(p.largest_cost(2), 2);
    }
}
