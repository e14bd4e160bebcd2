//! loom models of the retry budget (`retry::take`, `give_back`, `refill`):
//! one class's budget word on the heap, each process a thread.
#![cfg(loom)]
#![allow(clippy::unwrap_used)]

use loom::sync::Arc;
use loom::thread;
use sluice_shm_layout::retry::{self, UNIT};
use sluice_shm_layout::sync::{AtomicU64, Ordering};

/// `retry_burst` of every model: the budget holds at most two units.
const CAP_UNITS: u64 = 2;
const CAP: u64 = CAP_UNITS * UNIT;

fn budget(v: u64) -> Arc<AtomicU64> {
    Arc::new(AtomicU64::new(v))
}

/// Any value of the word, read at any moment, is within the cap.
fn within_cap(tokens: &AtomicU64) {
    let t = tokens.load(Ordering::Acquire);
    assert!(t <= CAP, "budget word {t} above its cap {CAP}");
}

// Real event: two processes each retry twice on a class while a third
// admits a first attempt, whose `retry_ratio` (1.5 units) refills the
// budget.
#[test]
fn retries_never_exceed_the_budget() {
    loom::model(|| {
        let start = CAP;
        let ppm = UNIT + UNIT / 2;
        let tokens = budget(start);

        let takers: Vec<_> = (0..2)
            .map(|_| {
                let tokens = Arc::clone(&tokens);
                thread::spawn(move || {
                    let n = u64::from(retry::take(&tokens)) + u64::from(retry::take(&tokens));
                    within_cap(&tokens);
                    n
                })
            })
            .collect();
        let refiller = {
            let tokens = Arc::clone(&tokens);
            thread::spawn(move || {
                retry::refill(&tokens, ppm, CAP_UNITS);
                within_cap(&tokens);
            })
        };
        let taken: u64 = takers.into_iter().map(|h| h.join().unwrap()).sum();
        refiller.join().unwrap();

        let left = tokens.load(Ordering::Acquire);
        assert!(left <= CAP, "budget word {left} above its cap {CAP}");
        // What is left plus what was taken is the start plus the part of
        // the refill the cap let in: never more, and nothing vanished.
        let accounted = left + taken * UNIT;
        assert!(
            accounted <= start + ppm,
            "{taken} units taken, {left} left: more than {start} + {ppm}"
        );
        assert!(
            accounted >= start,
            "{taken} units taken, {left} left: budget lost"
        );
    });
}

// Real event: a retry takes a unit and is then refused by the slots, so it
// gives the unit back, while another process's retry takes one.
#[test]
fn give_back_never_mints() {
    loom::model(|| {
        let start = CAP;
        let tokens = budget(start);

        let refused = {
            let tokens = Arc::clone(&tokens);
            thread::spawn(move || {
                let took = retry::take(&tokens);
                if took {
                    retry::give_back(&tokens, CAP_UNITS);
                }
                took
            })
        };
        let admitted = {
            let tokens = Arc::clone(&tokens);
            thread::spawn(move || retry::take(&tokens))
        };
        assert!(refused.join().unwrap(), "two units for two retries");
        let held = u64::from(admitted.join().unwrap());
        assert_eq!(held, 1, "two units for two retries");

        // The refused retry's unit came back exactly once; the admitted
        // one still holds its unit.
        let left = tokens.load(Ordering::Acquire);
        assert_eq!(left + held * UNIT, start, "{left} left, {held} held");
    });
}
