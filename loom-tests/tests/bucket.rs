//! loom models of the GCRA token bucket (`bucket::RateParams::take`): one
//! `tat` word shared by every process that takes tokens from a class.
#![cfg(loom)]
#![allow(clippy::unwrap_used)]

use loom::sync::Arc;
use loom::thread;
use sluice_shm_layout::bucket::{BucketVerdict, RateParams};
use sluice_shm_layout::sync::{AtomicU64, Ordering};

/// Emission interval of every model: 10 fixed-point units per token.
const T: u64 = 10;

fn params(burst: u64) -> RateParams {
    RateParams {
        t: T,
        burst,
        excess: 0,
    }
}

/// The `tat'` an admitted verdict stored, or `None` when it was refused.
fn stored(v: BucketVerdict) -> Option<u64> {
    match v {
        BucketVerdict::Green { new_tat } | BucketVerdict::Yellow { new_tat } => Some(new_tat),
        BucketVerdict::Red { .. } | BucketVerdict::Never => None,
    }
}

// Real event: two processes call try_acquire on the same rate-limited class
// in the same instant, each twice, against a bucket with burst 3.
#[test]
fn concurrent_takers_never_exceed_gcra() {
    loom::model(|| {
        let p = params(3);
        let now = 1_000;
        let tat = Arc::new(AtomicU64::new(0));

        let handles: Vec<_> = (0..2)
            .map(|_| {
                let tat = Arc::clone(&tat);
                thread::spawn(move || {
                    let a = stored(p.take(&tat, now, 1));
                    let b = stored(p.take(&tat, now, 1));
                    [a, b]
                })
            })
            .collect();
        let results: Vec<Option<u64>> = handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();

        let admitted: Vec<u64> = results.iter().flatten().copied().collect();
        // All four asked at the same `now`: GCRA admits exactly `burst`.
        assert_eq!(admitted.len(), 3, "admitted {admitted:?}");
        // Each admission stored a distinct `tat'`: none was counted twice.
        let mut sorted = admitted.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, vec![now + T, now + 2 * T, now + 3 * T]);
        // `tat` ends at the largest `tat'` any admitted taker stored.
        assert_eq!(tat.load(Ordering::Acquire), now + 3 * T);
    });
}

// Real event: two processes with clocks far apart (one read the clock, was
// descheduled, and takes with a stale `now`) race on one class.
#[test]
fn stale_clock_taker_never_moves_tat_backwards() {
    loom::model(|| {
        let p = params(2);
        let fresh_now = 1_000;
        let stale_now = 0;
        let tat = Arc::new(AtomicU64::new(0));

        let fresh = {
            let tat = Arc::clone(&tat);
            thread::spawn(move || stored(p.take(&tat, fresh_now, 1)))
        };
        let stale = {
            let tat = Arc::clone(&tat);
            thread::spawn(move || stored(p.take(&tat, stale_now, 1)))
        };
        let fresh_tat = fresh.join().unwrap();
        let stale_tat = stale.join().unwrap();

        // The fresh taker always finds a full bucket at its `now`.
        assert_eq!(fresh_tat, Some(fresh_now + T));
        let end = tat.load(Ordering::Acquire);
        // `tat` ends at the max of both admitted `tat'`: never behind the
        // fresh taker's, whatever the stale one did.
        let max = fresh_tat.into_iter().chain(stale_tat).max().unwrap();
        assert_eq!(end, max);
        assert!(end >= fresh_now + T, "tat moved backwards to {end}");
        // A stale taker after the fresh one is judged against the newer
        // `tat`: only admitted if it came first.
        if let Some(s) = stale_tat {
            assert_eq!(s, stale_now + T, "stale taker admitted after the fresh one");
        }
    });
}
