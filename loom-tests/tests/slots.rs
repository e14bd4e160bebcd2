//! loom models of the self-describing concurrency slots (`slots::claim`,
//! `slots::release`): each process is a thread, the slot words a heap Vec.
#![cfg(loom)]
#![allow(clippy::unwrap_used)]

use loom::cell::UnsafeCell;
use loom::sync::atomic::AtomicUsize;
use loom::sync::Arc;
use loom::thread;
use sluice_shm_layout::slots::{self, Owner, SlotGrant};
use sluice_shm_layout::sync::{AtomicU64, Ordering};

fn words(n: usize) -> Arc<Vec<AtomicU64>> {
    Arc::new((0..n).map(|_| AtomicU64::new(0)).collect())
}

/// The permit tag of client record `index` (generation 1), permit `seq`.
fn tag(index: u32, seq: u32) -> u64 {
    Owner {
        index,
        generation: 1,
    }
    .tag(seq)
}

/// Positions a grant holds (all of them fit inline in these models).
fn positions(g: &SlotGrant) -> &[u32] {
    &g.inline[..g.count as usize]
}

fn load(slots: &[AtomicU64], pos: u32) -> u64 {
    slots[pos as usize].load(Ordering::Acquire)
}

// Real event: two processes try_acquire the last free slot of a class with
// max_in_flight = 1 at the same moment.
#[test]
fn two_claimers_race_for_one_slot() {
    loom::model(|| {
        let s = words(1);
        let handles: Vec<_> = (0..2u32)
            .map(|i| {
                let s = Arc::clone(&s);
                thread::spawn(move || slots::claim(&s, 1, 1, 1, tag(i, 1)))
            })
            .collect();
        let grants: Vec<Option<SlotGrant>> =
            handles.into_iter().map(|h| h.join().unwrap()).collect();

        let winners: Vec<u32> = (0..2u32)
            .filter(|&i| grants[i as usize].is_some())
            .collect();
        assert_eq!(winners.len(), 1, "one slot, holders {winners:?}");
        let w = winners[0];
        let g = grants[w as usize].unwrap();
        assert_eq!(load(&s, 0), tag(w, 1), "the held word names its holder");
        assert_eq!(slots::release(&s, &g, tag(w, 1)), 1);
        assert_eq!(slots::in_flight(&s), 0);
    });
}

// Real event: a critical and an interactive process (lane ceiling 2) and a
// batch process (lane ceiling 1) acquire and release on a class with
// max_in_flight = 2 at once.
#[test]
fn three_claimers_two_slots_lane_ceilings() {
    loom::model(|| {
        let s = words(2);
        let holders = Arc::new(AtomicUsize::new(0));
        let ceilings = [2usize, 2, 1];
        let handles: Vec<_> = (0..3u32)
            .map(|i| {
                let s = Arc::clone(&s);
                let holders = Arc::clone(&holders);
                let ceiling = ceilings[i as usize];
                thread::spawn(move || {
                    let me = tag(i, 1);
                    let Some(g) = slots::claim(&s, ceiling, 2, 1, me) else {
                        return;
                    };
                    let before = holders.fetch_add(1, Ordering::SeqCst);
                    assert!(before < 2, "more holders than slots");
                    let pos = positions(&g)[0];
                    assert!(
                        (pos as usize) < ceiling,
                        "lane ceiling {ceiling} broken at {pos}"
                    );
                    assert_eq!(load(&s, pos), me, "held word must carry its holder's tag");
                    holders.fetch_sub(1, Ordering::SeqCst);
                    assert_eq!(slots::release(&s, &g, me), 1);
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(slots::in_flight(&s), 0);
    });
}

// Real event: a request of cost 2 and a request of cost 1 arrive together on
// a class with max_in_flight = 2 (only one of them can fit).
#[test]
fn cost_two_races_cost_one_on_two_slots() {
    loom::model(|| {
        let s = words(2);
        let big = {
            let s = Arc::clone(&s);
            thread::spawn(move || slots::claim(&s, 2, 2, 2, tag(0, 1)))
        };
        let small = {
            let s = Arc::clone(&s);
            thread::spawn(move || slots::claim(&s, 2, 2, 1, tag(1, 1)))
        };
        let big = big.join().unwrap();
        let small = small.join().unwrap();

        let admitted = big.map_or(0, |g| g.count) + small.map_or(0, |g| g.count);
        assert!(admitted <= 2, "over-admitted: {admitted} units on 2 slots");
        // A refused request holds nothing once claim returns.
        let held = slots::held_by(
            &s,
            Owner {
                index: 0,
                generation: 1,
            },
        ) + slots::held_by(
            &s,
            Owner {
                index: 1,
                generation: 1,
            },
        );
        assert_eq!(held, admitted, "words held by refused requests");
        for (g, me) in [(big, tag(0, 1)), (small, tag(1, 1))] {
            if let Some(g) = g {
                for &pos in positions(&g) {
                    assert_eq!(load(&s, pos), me);
                }
                assert_eq!(slots::release(&s, &g, me), g.count);
            }
        }
        assert_eq!(slots::in_flight(&s), 0, "all words end free");
    });
}

// Real event: one process finishes its work under a permit and releases it;
// another process is granted the same slot and starts its work.
#[test]
fn release_hands_work_to_next_holder() {
    loom::model(|| {
        let s = words(1);
        // Stands for the resource the slot guards: only the holder touches it.
        let guarded = Arc::new(UnsafeCell::new(0u64));
        let handles: Vec<_> = (0..2u32)
            .map(|i| {
                let s = Arc::clone(&s);
                let guarded = Arc::clone(&guarded);
                thread::spawn(move || {
                    let me = tag(i, 1);
                    if let Some(g) = slots::claim(&s, 1, 1, 1, me) {
                        guarded.with_mut(|v| {
                            // SAFETY: the slot grants exclusive use; loom
                            // reports any access not ordered by it.
                            unsafe { *v += 1 }
                        });
                        assert_eq!(slots::release(&s, &g, me), 1);
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(slots::in_flight(&s), 0);
    });
}
