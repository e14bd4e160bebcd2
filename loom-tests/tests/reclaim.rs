//! loom models of exact reclamation: a client process stops forever at any
//! crash point inside `slots::claim`, `slots::release` or `admit::decide`,
//! then the reclaimer returns its slots with `slots::reclaim`, while another
//! client keeps working on the same class.
#![cfg(loom)]
#![allow(clippy::unwrap_used)]

use loom::sync::Arc;
use loom::thread;
use sluice_shm_layout::admit::{self, Admission, Ask, ClassParams};
use sluice_shm_layout::bucket::RateParams;
use sluice_shm_layout::counters::Reason;
use sluice_shm_layout::slots::{self, Owner};
use sluice_shm_layout::sync::{crash, AtomicU64, Ordering};

/// The client that dies.
const DEAD: Owner = Owner {
    index: 0,
    generation: 1,
};
/// The client that survives.
const ALIVE: Owner = Owner {
    index: 1,
    generation: 1,
};
/// Slot words of the class in every model.
const SLOTS: usize = 3;

fn words(n: usize) -> Arc<Vec<AtomicU64>> {
    Arc::new((0..n).map(|_| AtomicU64::new(0)).collect())
}

/// The surviving client: takes one slot, checks it stays its own while the
/// reclaimer runs, and releases it.
fn survivor(s: &[AtomicU64]) {
    let me = ALIVE.tag(1);
    let g = slots::claim(s, SLOTS, SLOTS, 1, me).expect("a free slot is always left for it");
    let pos = g.inline[0] as usize;
    assert_eq!(
        s[pos].load(Ordering::Acquire),
        me,
        "survivor's slot was touched"
    );
    assert_eq!(
        slots::release(s, &g, me),
        1,
        "survivor's slot was freed by someone else"
    );
}

/// Run `dying` (which arms its own crash point) beside the survivor; once
/// `dying` has stopped, reclaim its owner and check that reclamation was
/// exact.
fn crash_then_reclaim<F>(dying: F)
where
    F: FnOnce(&[AtomicU64]) + Send + 'static,
{
    let s = words(SLOTS);
    let d = {
        let s = Arc::clone(&s);
        thread::spawn(move || dying(&s))
    };
    let a = {
        let s = Arc::clone(&s);
        thread::spawn(move || survivor(&s))
    };
    d.join().unwrap();

    // The daemon's death watch fired: return whatever the dead owner holds,
    // while the survivor may still be working.
    slots::reclaim(&s, DEAD);
    assert_eq!(
        slots::held_by(&s, DEAD),
        0,
        "a dead owner's slot survived reclaim"
    );

    a.join().unwrap();
    assert_eq!(slots::in_flight(&s), 0, "every slot ends free");
}

// Real event: a client is SIGKILLed inside try_acquire while it claims the
// two slots of a cost-2 request (crash points: after each claimed word; the
// last k stands for dying right after the grant, holding the permit).
#[test]
fn crash_in_claim_then_reclaim() {
    for k in 0..=2 {
        loom::model(move || {
            crash_then_reclaim(move |s| {
                crash::arm(k);
                let g = slots::claim(s, SLOTS, SLOTS, 2, DEAD.tag(1));
                // Two free words are always there: a `None` means it stopped.
                assert_eq!(g.is_some(), k == 2, "crash point {k} not where expected");
            });
        });
    }
}

// Real event: a client is SIGKILLed inside release of a cost-2 permit
// (crash points: after each word given back; the last k is a clean release).
#[test]
fn crash_in_release_then_reclaim() {
    for k in 0..=2 {
        loom::model(move || {
            crash_then_reclaim(move |s| {
                let me = DEAD.tag(1);
                let g = slots::claim(s, SLOTS, SLOTS, 2, me).unwrap();
                crash::arm(k);
                let freed = slots::release(s, &g, me);
                if k == 2 {
                    // It ran to the end: a clean release holds nothing.
                    assert_eq!(freed, 2);
                    assert_eq!(slots::held_by(s, DEAD), 0, "release leaked a slot");
                }
            });
        });
    }
}

fn class(rate: RateParams) -> ClassParams {
    ClassParams {
        max_in_flight: SLOTS as u32,
        soft_in_flight: SLOTS as u32,
        lane_ceiling: [SLOTS as u32; 4],
        rate: Some(rate),
        max_cost: 0,
        overcommit: false,
    }
}

// Real event: a client is SIGKILLed inside an admission that is granted
// (cost 2, slots then tokens; crash points: two slot claims and the bucket
// CAS; the last k dies holding the permit).
#[test]
fn crash_in_admit_then_reclaim() {
    for k in 0..=3 {
        loom::model(move || {
            crash_then_reclaim(move |s| {
                let p = class(RateParams {
                    t: 10,
                    burst: 2,
                    excess: 0,
                });
                let tat = AtomicU64::new(0);
                crash::arm(k);
                let out = admit::decide(&p, &tat, s, Ask { cost: 2, lane: 1 }, 1_000, DEAD.tag(1));
                if k == 3 {
                    assert!(matches!(out, Admission::Admitted { slots, .. } if slots.count == 2));
                }
            });
        });
    }
}

// Real event: a client is SIGKILLed inside an admission the bucket refuses
// after its slots were taken (crash points: two slot claims, then the two
// give-backs; the last k is a clean refusal).
#[test]
fn crash_in_admit_refusal_then_reclaim() {
    for k in 0..=4 {
        loom::model(move || {
            crash_then_reclaim(move |s| {
                let p = class(RateParams {
                    t: 10,
                    burst: 2,
                    excess: 0,
                });
                // The bucket is spent far into the future: red.
                let tat = AtomicU64::new(1_000_000);
                crash::arm(k);
                let out = admit::decide(&p, &tat, s, Ask { cost: 2, lane: 1 }, 0, DEAD.tag(1));
                if k == 4 {
                    assert!(matches!(
                        out,
                        Admission::Refused {
                            reason: Reason::NotNow,
                            retry_after_ns: Some(_),
                            ..
                        }
                    ));
                    assert_eq!(slots::held_by(s, DEAD), 0, "a refused request kept slots");
                }
            });
        });
    }
}

// Real event: the daemon judged a stopped (SIGSTOPped) client dead and
// reclaimed its slot; the client wakes and releases its old permit while
// another client is taking that slot.
#[test]
fn stale_release_after_reclaim_spares_new_holder() {
    loom::model(|| {
        let s = words(1);
        let old = DEAD.tag(1);
        let g = slots::claim(&s, 1, 1, 1, old).unwrap();
        assert_eq!(slots::reclaim(&s, DEAD), 1);

        let late = {
            let s = Arc::clone(&s);
            thread::spawn(move || slots::release(&s, &g, old))
        };
        let new = {
            let s = Arc::clone(&s);
            thread::spawn(move || slots::claim(&s, 1, 1, 1, ALIVE.tag(1)))
        };
        assert_eq!(
            late.join().unwrap(),
            0,
            "a reclaimed permit was released twice"
        );
        let g2 = new
            .join()
            .unwrap()
            .expect("the reclaimed slot is free for it");
        assert_eq!(
            s[0].load(Ordering::Acquire),
            ALIVE.tag(1),
            "late release freed new holder"
        );
        assert_eq!(slots::release(&s, &g2, ALIVE.tag(1)), 1);
    });
}
