//! loom models of the fleet credit word (`fleet::take`, `give_back`,
//! `renew`): clients spend a lease while the daemon swaps in the next one.
#![cfg(loom)]
#![allow(clippy::unwrap_used)]

use loom::sync::Arc;
use loom::thread;
use sluice_shm_layout::fleet;
use sluice_shm_layout::sync::{AtomicU64, Ordering};

// Real event: a client takes a token of the current lease, a later check
// (slots, the class rate) refuses it, and it gives the token back, while
// the daemon renews the lease with a fresh grant. A give-back of the old
// lease must never land in the new one.
#[test]
fn renew_races_take_and_give_back() {
    loom::model(|| {
        let credit = Arc::new(AtomicU64::new(0));
        fleet::top_up(&credit, 2);

        let client = {
            let credit = Arc::clone(&credit);
            thread::spawn(move || {
                let epoch = fleet::take(&credit, 1).unwrap();
                fleet::give_back(&credit, epoch, 1);
            })
        };
        let unspent = fleet::renew(&credit, 5);
        client.join().unwrap();

        let left = fleet::tokens(credit.load(Ordering::Acquire));
        // The new lease holds exactly its grant: the give-back either
        // landed before the renewal (and was returned with it) or failed.
        assert_eq!(left, 5, "unspent {unspent}");
        // Nothing minted: the old lease's 2 tokens are returned or spent.
        assert!(unspent == 1 || unspent == 2, "unspent {unspent}");
    });
}

// Real event: two processes spend the last token of a lease at once.
#[test]
fn two_takers_one_token() {
    loom::model(|| {
        let credit = Arc::new(AtomicU64::new(0));
        fleet::top_up(&credit, 1);
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let credit = Arc::clone(&credit);
                thread::spawn(move || fleet::take(&credit, 1).is_ok())
            })
            .collect();
        let took: usize = handles
            .into_iter()
            .map(|h| usize::from(h.join().unwrap()))
            .sum();
        assert_eq!(took, 1);
        assert_eq!(fleet::tokens(credit.load(Ordering::Acquire)), 0);
    });
}
