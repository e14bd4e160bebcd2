//! Concurrency slots: one self-describing word per slot.
//!
//! # Algorithm
//!
//! A class with `max_in_flight = M` owns `M` consecutive slot words in the
//! region. A word is `0` when free, or the *tag* of the permit that holds it:
//!
//! ```text
//!  63          48 47          32 31                           0
//! +--------------+--------------+------------------------------+
//! | owner gen    | owner idx+1  | permit sequence              |
//! +--------------+--------------+------------------------------+
//! ```
//!
//! `owner idx` is the holder's client-registry index and `owner gen` the low
//! 16 bits of that record's generation, so a reused record never matches an
//! old holder. A request of cost `n` in lane `l` scans positions
//! `0 .. ceiling[l]` and claims free words one by one with
//! `CAS(0 → tag)`. Because the grant and the owner are one atomic write, a
//! dead holder's slots are found exactly by scanning for its owner bits.
//!
//! Lanes and degradation are positional. Every request scans from position 0,
//! so held slots pack at the bottom; a lane may only claim positions below its
//! ceiling, which leaves `M − ceiling` slots that lower lanes can never take
//! (the headroom of the higher lanes). A grant that needs any position at or
//! above `soft_in_flight` is degraded: every lower position was seen held.
//!
//! # Invariant
//!
//! Each slot word is owned by at most one permit, and `in_flight` (the number
//! of non-zero words) never exceeds `M`: there are only `M` words.
//!
//! # Who writes, progress, crashes
//!
//! Clients claim (`0 → tag`) and release (`tag → 0`) their own words; the
//! daemon releases a dead owner's words (`tag → 0`). All are CAS, so a stale
//! release can not free someone else's slot. Claiming is lock-free; a request
//! of cost `n > 1` that finds fewer than `n` free words gives back what it
//! claimed and is refused, so two large requests racing for the last slots
//! may both be refused (never both admitted). A process that dies between any
//! two steps leaves only words carrying its own tag, which the reclaimer
//! returns.

use crate::sync::{AtomicU64, Ordering};

/// Slot indices a permit remembers inline; a permit of larger cost finds the
/// rest by scanning for its tag on release.
pub const INLINE_SLOTS: usize = 4;

const SEQ_MASK: u64 = 0xFFFF_FFFF;
const OWNER_MASK: u64 = !SEQ_MASK;

/// The identity of a slot holder: a client-registry record and its
/// generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    /// Index of the client record.
    pub index: u32,
    /// Generation of that record at registration.
    pub generation: u32,
}

impl Owner {
    /// The owner half of a tag (bits 32..64).
    pub fn bits(self) -> u64 {
        let gen = u64::from(self.generation & 0xFFFF);
        let idx = u64::from(self.index.wrapping_add(1) & 0xFFFF);
        (gen << 48) | (idx << 32)
    }

    /// The tag of this owner's permit number `seq` (never 0).
    pub fn tag(self, seq: u32) -> u64 {
        self.bits() | u64::from(seq)
    }
}

/// Which client (record index) a tag belongs to, if it is well formed.
pub fn tag_owner_index(tag: u64) -> Option<u32> {
    let idx = ((tag >> 32) & 0xFFFF) as u32;
    idx.checked_sub(1)
}

/// Where a permit's slots are.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotGrant {
    /// How many slots were claimed.
    pub count: u64,
    /// The first claimed positions (up to [`INLINE_SLOTS`]).
    pub inline: [u32; INLINE_SLOTS],
    /// True when a position at or above `soft_in_flight` was needed.
    pub degraded: bool,
}

/// Claim `n` free slots among `slots[..ceiling]` for `tag`.
///
/// Returns `None`, having given back anything it claimed, when fewer than
/// `n` are free.
pub fn claim(
    slots: &[AtomicU64],
    ceiling: usize,
    soft: usize,
    n: u64,
    tag: u64,
) -> Option<SlotGrant> {
    debug_assert!(tag & OWNER_MASK != 0, "a slot tag always names an owner");
    let ceiling = ceiling.min(slots.len());
    if n == 0 || n > ceiling as u64 {
        return None;
    }
    if n == 1 {
        return claim_one(&slots[..ceiling], soft, tag);
    }
    let mut grant = SlotGrant::default();
    for (pos, word) in slots[..ceiling].iter().enumerate() {
        // Relaxed: only a hint to skip held words; the CAS below decides.
        if word.load(Ordering::Relaxed) != 0 {
            continue;
        }
        // Acquire on success pairs with the Release in `release_one`: the
        // previous holder's work happens-before ours. Relaxed on failure: we
        // just move on to the next word.
        if word
            .compare_exchange(0, tag, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            continue;
        }
        crate::crash_point!(None);
        if (grant.count as usize) < INLINE_SLOTS {
            grant.inline[grant.count as usize] = pos as u32;
        }
        grant.count += 1;
        grant.degraded |= pos >= soft;
        if grant.count == n {
            return Some(grant);
        }
    }
    release(slots, &grant, tag);
    None
}

/// `claim` for cost 1, the common case: the first free word.
#[inline]
fn claim_one(slots: &[AtomicU64], soft: usize, tag: u64) -> Option<SlotGrant> {
    for (pos, word) in slots.iter().enumerate() {
        // Relaxed / Acquire: as in `claim`.
        if word.load(Ordering::Relaxed) == 0
            && word
                .compare_exchange(0, tag, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
        {
            crate::crash_point!(None);
            return Some(SlotGrant {
                count: 1,
                inline: [pos as u32, 0, 0, 0],
                degraded: pos >= soft,
            });
        }
    }
    None
}

/// Release one slot if it still carries `tag`. Returns whether it did.
pub fn release_one(word: &AtomicU64, tag: u64) -> bool {
    // SeqCst: Release part pairs with the Acquire CAS in `claim` (our work
    // under the permit happens-before the next holder's); the total order
    // matters to the releaser's following SeqCst load of the class's
    // `waiters` bits (no lost wake-up, see `queue`). Same instruction as a
    // Release CAS on x86.
    word.compare_exchange(tag, 0, Ordering::SeqCst, Ordering::Relaxed)
        .is_ok()
}

/// Release every slot of `grant` that still carries `tag`; returns how many
/// were released. Slots already reclaimed (or released) are skipped, so a
/// second release is a no-op.
pub fn release(slots: &[AtomicU64], grant: &SlotGrant, tag: u64) -> u64 {
    if grant.count == 1 {
        let freed = slots
            .get(grant.inline[0] as usize)
            .is_some_and(|w| release_one(w, tag));
        return u64::from(freed);
    }
    let mut freed = 0;
    let known = (grant.count as usize).min(INLINE_SLOTS);
    for &pos in &grant.inline[..known] {
        if let Some(word) = slots.get(pos as usize) {
            if release_one(word, tag) {
                freed += 1;
            }
        }
        crate::crash_point!(freed);
    }
    if grant.count as usize > INLINE_SLOTS {
        for word in slots {
            if freed == grant.count {
                break;
            }
            // Relaxed hint; `release_one` decides.
            if word.load(Ordering::Relaxed) == tag && release_one(word, tag) {
                freed += 1;
            }
        }
    }
    freed
}

/// Return every slot whose owner bits match `owner` (a dead process).
/// Returns how many were returned. Safe to repeat.
pub fn reclaim(slots: &[AtomicU64], owner: Owner) -> u64 {
    let bits = owner.bits();
    let mut freed = 0;
    for word in slots {
        // Relaxed: a hint; the CAS below only frees the exact tag we saw.
        let cur = word.load(Ordering::Relaxed);
        if cur != 0 && cur & OWNER_MASK == bits && release_one(word, cur) {
            freed += 1;
        }
    }
    freed
}

/// True when a word below `ceiling` is free. SeqCst loads: used by a
/// dispatcher after its SeqCst roll-back, against a releaser's SeqCst free
/// (see `queue`).
pub fn any_free(slots: &[AtomicU64], ceiling: usize) -> bool {
    slots[..ceiling.min(slots.len())]
        .iter()
        .any(|w| w.load(Ordering::SeqCst) == 0)
}

/// Number of held slots. A racy snapshot: each word is read once, so the
/// answer is a count that was true of every word at some moment during the
/// scan; stats and tests at rest need no more.
pub fn in_flight(slots: &[AtomicU64]) -> u64 {
    // Relaxed: nothing is read through these words.
    slots
        .iter()
        .filter(|w| w.load(Ordering::Relaxed) != 0)
        .count() as u64
}

/// Held slots whose owner is `owner`.
pub fn held_by(slots: &[AtomicU64], owner: Owner) -> u64 {
    let bits = owner.bits();
    // Relaxed: a snapshot for the reclaimer's report and for tests.
    slots
        .iter()
        .filter(|w| {
            let v = w.load(Ordering::Relaxed);
            v != 0 && v & OWNER_MASK == bits
        })
        .count() as u64
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    // Covers slot claim/release/reclaim on plain words: ceilings, soft →
    // degraded, large costs released by tag scan, give-back, exact reclaim by
    // owner and generation, idempotent release, counts, a model-based
    // property and a multi-threaded ownership stress.

    use super::*;
    use proptest::prelude::*;

    fn words(n: usize) -> Vec<AtomicU64> {
        (0..n).map(|_| AtomicU64::new(0)).collect()
    }

    fn snapshot(slots: &[AtomicU64]) -> Vec<u64> {
        slots.iter().map(|w| w.load(Ordering::Relaxed)).collect()
    }

    const A: Owner = Owner {
        index: 0,
        generation: 1,
    };
    const B: Owner = Owner {
        index: 1,
        generation: 1,
    };

    #[test]
    fn tag_names_its_owner_and_is_never_zero() {
        assert_ne!(
            Owner {
                index: 0,
                generation: 0
            }
            .tag(0),
            0
        );
        assert_eq!(tag_owner_index(A.tag(7)), Some(0));
        assert_eq!(
            tag_owner_index(
                Owner {
                    index: 65_534,
                    generation: 3
                }
                .tag(1)
            ),
            Some(65_534)
        );
        assert_eq!(tag_owner_index(42), None);
        assert_eq!(A.tag(9) & SEQ_MASK, 9);
        assert_ne!(
            A.bits(),
            Owner {
                index: 0,
                generation: 2
            }
            .bits()
        );
        assert_ne!(A.bits(), B.bits());
    }

    #[test]
    fn claim_stays_below_the_ceiling() {
        let slots = words(8);
        for i in 0..5 {
            let g = claim(&slots, 5, 8, 1, A.tag(i)).unwrap();
            assert_eq!(g.inline[0], i);
        }
        assert_eq!(claim(&slots, 5, 8, 1, A.tag(99)), None);
        assert!(snapshot(&slots)[5..].iter().all(|&w| w == 0));
        assert_eq!(in_flight(&slots), 5);
        // A higher ceiling still finds the headroom.
        let g = claim(&slots, 8, 8, 3, A.tag(100)).unwrap();
        assert_eq!(&g.inline[..3], &[5, 6, 7]);
        assert_eq!(claim(&slots, 8, 8, 1, A.tag(101)), None);
    }

    #[test]
    fn claim_refuses_zero_and_more_than_the_ceiling_without_writing() {
        let slots = words(4);
        assert_eq!(claim(&slots, 4, 4, 0, A.tag(1)), None);
        assert_eq!(claim(&slots, 4, 4, 5, A.tag(1)), None);
        assert_eq!(claim(&slots, 2, 4, 3, A.tag(1)), None);
        // A ceiling beyond the slice is clamped to it.
        assert_eq!(claim(&slots, 100, 100, 5, A.tag(1)), None);
        assert_eq!(in_flight(&slots), 0);
        assert_eq!(claim(&slots, 100, 100, 4, A.tag(1)).unwrap().count, 4);
    }

    #[test]
    fn grants_at_or_above_soft_are_degraded() {
        let slots = words(6);
        let g1 = claim(&slots, 6, 3, 2, A.tag(1)).unwrap();
        assert!(!g1.degraded);
        let g2 = claim(&slots, 6, 3, 1, A.tag(2)).unwrap();
        assert!(!g2.degraded, "position 2 is below soft 3");
        let g3 = claim(&slots, 6, 3, 1, A.tag(3)).unwrap();
        assert!(g3.degraded, "position 3 is at soft");
        // Freed low positions are reused first and are not degraded.
        assert_eq!(release(&slots, &g1, A.tag(1)), 2);
        let g4 = claim(&slots, 6, 3, 3, A.tag(4)).unwrap();
        assert_eq!(&g4.inline[..3], &[0, 1, 4]);
        assert!(g4.degraded, "one of its positions is above soft");
        let g5 = claim(&slots, 6, 3, 1, A.tag(5)).unwrap();
        assert!(g5.degraded);
    }

    #[test]
    fn large_cost_is_released_by_tag_scan() {
        let slots = words(10);
        let other = claim(&slots, 10, 10, 1, B.tag(1)).unwrap();
        let tag = A.tag(7);
        let g = claim(&slots, 10, 10, 7, tag).unwrap();
        assert_eq!(g.count, 7);
        assert_eq!(g.inline, [1, 2, 3, 4]);
        assert_eq!(snapshot(&slots).iter().filter(|&&w| w == tag).count(), 7);
        assert_eq!(release(&slots, &g, tag), 7);
        assert_eq!(in_flight(&slots), 1);
        assert_eq!(snapshot(&slots)[0], B.tag(1));
        assert_eq!(release(&slots, &other, B.tag(1)), 1);
        assert_eq!(in_flight(&slots), 0);
    }

    #[test]
    fn partial_claim_gives_everything_back() {
        for n in [2u64, 4, 5, 9] {
            let slots = words(12);
            // Another owner holds all but n - 1 scattered slots: the claim
            // takes n - 1 words (via the inline list, then the scan) and must
            // give every one back.
            let order = [1usize, 3, 5, 7, 9, 11, 0, 2, 4, 6, 8, 10];
            let free = &order[..n as usize - 1];
            for pos in (0..12).filter(|p| !free.contains(p)) {
                slots[pos].store(B.tag(pos as u32), Ordering::Relaxed);
            }
            let before = snapshot(&slots);
            assert_eq!(claim(&slots, 12, 12, n, A.tag(1)), None, "n={n}");
            assert_eq!(snapshot(&slots), before, "n={n}");
            assert_eq!(held_by(&slots, A), 0);
        }
        // Cost above INLINE_SLOTS that fails late: the scan must find all.
        let slots = words(8);
        slots[7].store(B.tag(1), Ordering::Relaxed);
        assert_eq!(claim(&slots, 8, 8, 8, A.tag(2)), None);
        assert_eq!(snapshot(&slots), [0, 0, 0, 0, 0, 0, 0, B.tag(1)]);
    }

    #[test]
    fn reclaim_returns_exactly_the_dead_owners_words() {
        let slots = words(16);
        let a_old = Owner {
            index: 3,
            generation: 5,
        };
        let a_new = Owner {
            index: 3,
            generation: 6,
        };
        let other = Owner {
            index: 4,
            generation: 5,
        };
        let g_old1 = claim(&slots, 16, 16, 6, a_old.tag(1)).unwrap();
        let _g_new = claim(&slots, 16, 16, 2, a_new.tag(1)).unwrap();
        let _g_old2 = claim(&slots, 16, 16, 1, a_old.tag(2)).unwrap();
        let _g_other = claim(&slots, 16, 16, 3, other.tag(1)).unwrap();
        assert_eq!(held_by(&slots, a_old), 7);
        let before = snapshot(&slots);
        assert_eq!(reclaim(&slots, a_old), 7);
        let after = snapshot(&slots);
        for (b, a) in before.iter().zip(&after) {
            if *b & OWNER_MASK == a_old.bits() {
                assert_eq!(*a, 0);
            } else {
                assert_eq!(a, b, "another owner's word changed");
            }
        }
        assert_eq!(held_by(&slots, a_new), 2);
        assert_eq!(held_by(&slots, other), 3);
        assert_eq!(in_flight(&slots), 5);
        // Repeating is harmless, and the dead owner's own late release frees
        // nothing (its words may already be someone else's).
        assert_eq!(reclaim(&slots, a_old), 0);
        let reuse = claim(&slots, 16, 16, 1, other.tag(2)).unwrap();
        assert_eq!(reuse.inline[0], g_old1.inline[0]);
        assert_eq!(release(&slots, &g_old1, a_old.tag(1)), 0);
        assert_eq!(snapshot(&slots)[reuse.inline[0] as usize], other.tag(2));
    }

    #[test]
    fn double_release_is_a_no_op() {
        let slots = words(4);
        let g = claim(&slots, 4, 4, 2, A.tag(1)).unwrap();
        let h = claim(&slots, 4, 4, 1, A.tag(2)).unwrap();
        assert_eq!(in_flight(&slots), 3);
        assert_eq!(release(&slots, &g, A.tag(1)), 2);
        assert_eq!(release(&slots, &g, A.tag(1)), 0);
        assert_eq!(in_flight(&slots), 1);
        // Released words reclaimed by a new permit are not freed by the
        // stale grant either.
        let k = claim(&slots, 4, 4, 2, A.tag(3)).unwrap();
        assert_eq!(release(&slots, &g, A.tag(1)), 0);
        assert_eq!(in_flight(&slots), 3);
        assert_eq!(
            release(&slots, &h, A.tag(2)) + release(&slots, &k, A.tag(3)),
            3
        );
        assert_eq!(in_flight(&slots), 0);
        assert!(!release_one(&slots[0], A.tag(3)));
    }

    #[test]
    fn release_with_wrong_tag_frees_nothing() {
        let slots = words(6);
        let g = claim(&slots, 6, 6, 5, A.tag(1)).unwrap();
        assert_eq!(release(&slots, &g, A.tag(2)), 0);
        assert_eq!(release(&slots, &g, B.tag(1)), 0);
        assert_eq!(in_flight(&slots), 5);
    }

    #[test]
    fn in_flight_and_held_by_count_words() {
        let slots = words(5);
        assert_eq!(in_flight(&slots), 0);
        claim(&slots, 5, 5, 2, A.tag(1)).unwrap();
        claim(&slots, 5, 5, 1, B.tag(1)).unwrap();
        assert_eq!(in_flight(&slots), 3);
        assert_eq!(held_by(&slots, A), 2);
        assert_eq!(held_by(&slots, B), 1);
        assert_eq!(
            held_by(
                &slots,
                Owner {
                    index: 2,
                    generation: 1
                }
            ),
            0
        );
    }

    #[derive(Clone, Debug)]
    enum Op {
        Claim {
            owner: u32,
            gen: u32,
            n: u64,
            ceiling: usize,
        },
        Release(usize),
        Reclaim {
            owner: u32,
            gen: u32,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0u32..3, 0u32..2, 1u64..=7, 0usize..=12)
                .prop_map(|(owner, gen, n, ceiling)| Op::Claim { owner, gen, n, ceiling }),
            2 => any::<usize>().prop_map(Op::Release),
            1 => (0u32..3, 0u32..2).prop_map(|(owner, gen)| Op::Reclaim { owner, gen }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(500))]

        /// Against a model: a list of live permits and the words they hold.
        #[test]
        fn slots_match_a_model_of_live_permits(ops in proptest::collection::vec(op(), 1..60)) {
            let slots = words(10);
            let soft = 6;
            let mut live: Vec<(Owner, u64, SlotGrant, Vec<usize>)> = Vec::new();
            let mut seq = 0u32;
            for op in ops {
                match op {
                    Op::Claim { owner, gen, n, ceiling } => {
                        seq += 1;
                        let who = Owner { index: owner, generation: gen };
                        let tag = who.tag(seq);
                        let before = snapshot(&slots);
                        let free_below: Vec<usize> = (0..ceiling.min(10)).filter(|&p| before[p] == 0).collect();
                        match claim(&slots, ceiling, soft, n, tag) {
                            Some(g) => {
                                prop_assert_eq!(g.count, n);
                                let want: Vec<usize> = free_below[..n as usize].to_vec();
                                let now = snapshot(&slots);
                                let got: Vec<usize> = (0..10).filter(|&p| now[p] == tag).collect();
                                prop_assert_eq!(&got, &want, "lowest free positions, below ceiling");
                                prop_assert_eq!(g.degraded, want.iter().any(|&p| p >= soft));
                                for (i, &p) in want.iter().take(INLINE_SLOTS).enumerate() {
                                    prop_assert_eq!(g.inline[i] as usize, p);
                                }
                                live.push((who, tag, g, want));
                            }
                            None => {
                                prop_assert!((free_below.len() as u64) < n);
                                prop_assert_eq!(snapshot(&slots), before);
                            }
                        }
                    }
                    Op::Release(pick) => {
                        if live.is_empty() {
                            continue;
                        }
                        let (_, tag, g, held) = live.remove(pick % live.len());
                        prop_assert_eq!(release(&slots, &g, tag), held.len() as u64);
                        prop_assert_eq!(release(&slots, &g, tag), 0);
                    }
                    Op::Reclaim { owner, gen } => {
                        let who = Owner { index: owner, generation: gen };
                        let mine: u64 = live.iter().filter(|l| l.0 == who).map(|l| l.3.len() as u64).sum();
                        prop_assert_eq!(reclaim(&slots, who), mine);
                        live.retain(|l| l.0 != who);
                    }
                }
                // Every held word is exactly the tag of the live permit listing it.
                let now = snapshot(&slots);
                let mut expect = vec![0u64; 10];
                for (_, tag, _, held) in &live {
                    for &p in held {
                        prop_assert_eq!(expect[p], 0, "two permits list position {}", p);
                        expect[p] = *tag;
                    }
                }
                prop_assert_eq!(&now, &expect);
                prop_assert_eq!(in_flight(&slots), live.iter().map(|l| l.3.len() as u64).sum::<u64>());
            }
        }
    }

    #[test]
    fn threads_claiming_three_slots_never_share_one() {
        const THREADS: u32 = 4;
        const ROUNDS: u32 = 20_000;
        let slots = words(3);
        let barrier = std::sync::Barrier::new(THREADS as usize);
        let granted: Vec<u64> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..THREADS)
                .map(|id| {
                    let (slots, barrier) = (&slots, &barrier);
                    s.spawn(move || {
                        let me = Owner {
                            index: id,
                            generation: 1,
                        };
                        let mut got = 0u64;
                        barrier.wait();
                        for seq in 1..=ROUNDS {
                            let n = 1 + u64::from(seq % 2);
                            let tag = me.tag(seq);
                            let Some(g) = claim(slots, 3, 2, n, tag) else {
                                continue;
                            };
                            got += 1;
                            assert_eq!(g.count, n);
                            let held = &g.inline[..n as usize];
                            for &p in held {
                                assert_eq!(slots[p as usize].load(Ordering::Relaxed), tag);
                            }
                            std::hint::spin_loop();
                            for &p in held {
                                assert_eq!(
                                    slots[p as usize].load(Ordering::Relaxed),
                                    tag,
                                    "slot {p} stolen"
                                );
                            }
                            assert_eq!(release(slots, &g, tag), n);
                        }
                        got
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(granted.iter().sum::<u64>() > 0);
        assert_eq!(in_flight(&slots), 0);
    }
}
