//! Fleet credit: a host's lease of a fleet-wide bucket, spent locally.
//!
//! # Protocol
//!
//! The daemon leases tokens from the fleet store (Redis) and adds them to the
//! class's `fleet_credit` word, then publishes `fleet_lease_until_ns`.
//! Clients spend the credit with a CAS while the lease is valid; when it has
//! expired (daemon or store down) they spend the class's fallback bucket,
//! open, or refuse, per `on_store_down` in `fleet_cfg`.
//!
//! # The credit word
//!
//! ```text
//! bits 63..48  epoch   bumped by every drain (expiry, return, removal)
//! bits 47..0   tokens  credit left in this lease
//! ```
//!
//! Transitions: a client's take writes `(epoch, tokens − n)` if `tokens ≥ n`;
//! a give-back writes `(epoch, tokens + n)` only while the epoch is the one
//! it took from; the daemon's top-up writes `(epoch, tokens + k)`; its
//! renewal writes `(epoch + 1, k)` and its drain `(epoch + 1, 0)`, each
//! returning the tokens it removed.
//!
//! # Invariant
//!
//! Tokens only enter the word by a top-up (leased from the store) or a
//! give-back of tokens taken in the same epoch. So the tokens spent in an
//! epoch never exceed the tokens leased in it: a give-back that races a
//! drain fails and the tokens stay spent (the host under-admits, never
//! over-admits).
//!
//! # Who writes, progress, crashes
//!
//! Clients (take, give back) and the daemon (top up, drain), all by CAS or
//! swap: lock-free, a CAS fails only because another write succeeded. A
//! client that dies between its take and the rest of the decision has spent
//! the tokens; a daemon that dies leaves credit that expires with the lease,
//! after which clients move to the fallback bucket on their own.

use crate::sync::{AtomicU64, Ordering};

/// Bits of the credit word holding tokens.
pub const TOKEN_BITS: u32 = 48;
/// Mask of the token bits.
pub const TOKEN_MASK: u64 = (1 << TOKEN_BITS) - 1;

/// `fleet_cfg` bits 0..2: what clients do once the lease has expired.
pub const STORE_DOWN_MASK: u64 = 0b11;
/// Spend the fallback bucket.
pub const STORE_DOWN_FALLBACK: u64 = 0;
/// Admit (host limits still apply).
pub const STORE_DOWN_OPEN: u64 = 1;
/// Refuse with reason `fleet`.
pub const STORE_DOWN_REFUSE: u64 = 2;
/// `fleet_cfg` bit 2: shadow mode; count would-be refusals, refuse nothing.
pub const CFG_SHADOW: u64 = 1 << 2;

/// `fleet_status` bit: the host is spending the fallback bucket.
pub const STATUS_ON_FALLBACK: u64 = 1 << 32;
/// `fleet_status` bit: the store holds a rate or burst other than ours.
pub const STATUS_MISMATCH: u64 = 1 << 33;

/// Tokens in a credit word.
pub fn tokens(word: u64) -> u64 {
    word & TOKEN_MASK
}

/// Epoch of a credit word.
pub fn epoch(word: u64) -> u64 {
    word >> TOKEN_BITS
}

/// Take `n` tokens. `Ok(epoch)` when taken (keep it for [`give_back`]);
/// `Err(tokens)` with what is left when there are fewer than `n`.
// Known shortcoming: one CAS per request on a shared word; per-process batches of credit would cut it.
pub fn take(credit: &AtomicU64, n: u64) -> Result<u64, u64> {
    // AcqRel: the Acquire half pairs with the daemon's Release top-up (the
    // tokens we take were leased before we saw them); the Release half
    // orders our take before a later give-back by this thread. Acquire on
    // failure: the refusal reports what is left.
    credit
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
            (tokens(w) >= n).then(|| w - n)
        })
        .map(epoch)
        .map_err(tokens)
}

/// Give back `n` tokens taken in `epoch` (a later check refused). Nothing
/// happens when the daemon drained the word since: the tokens stay spent.
pub fn give_back(credit: &AtomicU64, taken_epoch: u64, n: u64) {
    // AcqRel/Acquire: as in `take`; a drain in between changes the epoch, so
    // the update gives up.
    let _ = credit.fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
        (epoch(w) == taken_epoch).then(|| (w & !TOKEN_MASK) | (tokens(w) + n).min(TOKEN_MASK))
    });
}

/// Daemon: add `n` leased tokens; returns the tokens after the top-up.
pub fn top_up(credit: &AtomicU64, n: u64) -> u64 {
    // AcqRel: Release publishes the lease to clients' Acquire takes.
    let prev = credit
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
            Some((w & !TOKEN_MASK) | (tokens(w) + n).min(TOKEN_MASK))
        })
        .unwrap_or_else(|w| w);
    (tokens(prev) + n).min(TOKEN_MASK)
}

/// Daemon: remove every token and start a new epoch; returns the tokens
/// removed (to return to the store, or count as expired).
pub fn drain(credit: &AtomicU64) -> u64 {
    // AcqRel: pairs with clients' takes and give-backs; after the bump a
    // give-back from the old epoch fails.
    let prev = credit
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
            Some((epoch(w).wrapping_add(1) << TOKEN_BITS) & !TOKEN_MASK)
        })
        .unwrap_or_else(|w| w);
    tokens(prev)
}

/// Daemon: replace the credit with a new lease of `n` tokens in a new
/// epoch; returns the tokens of the old lease left unspent (to return).
pub fn renew(credit: &AtomicU64, n: u64) -> u64 {
    // AcqRel: Release publishes the new lease to clients' Acquire takes;
    // Acquire sees every take of the old epoch, so what we return is
    // exactly what nobody spent. A give-back of the old epoch then fails.
    let prev = credit
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
            Some(((epoch(w).wrapping_add(1) << TOKEN_BITS) & !TOKEN_MASK) | n.min(TOKEN_MASK))
        })
        .unwrap_or_else(|w| w);
    tokens(prev)
}

/// Whether the lease published in `until_ns` may be spent at `now_ns`.
pub fn lease_valid(until_ns: &AtomicU64, now_ns: u64) -> bool {
    // Acquire: pairs with the daemon's Release store after its top-up, so a
    // valid lease comes with its credit.
    now_ns < until_ns.load(Ordering::Acquire)
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn take_refuses_short_credit_and_names_what_is_left() {
        let w = AtomicU64::new(0);
        assert_eq!(top_up(&w, 3), 3);
        assert_eq!(take(&w, 2), Ok(0));
        assert_eq!(take(&w, 2), Err(1));
        assert_eq!(tokens(w.load(Ordering::Relaxed)), 1);
    }

    #[test]
    fn give_back_after_a_drain_mints_nothing() {
        let w = AtomicU64::new(0);
        top_up(&w, 5);
        let e = take(&w, 4).expect("5 tokens cover 4");
        assert_eq!(drain(&w), 1);
        give_back(&w, e, 4);
        assert_eq!(tokens(w.load(Ordering::Relaxed)), 0);
        assert_eq!(epoch(w.load(Ordering::Relaxed)), 1);
    }

    #[test]
    fn give_back_in_the_same_epoch_restores() {
        let w = AtomicU64::new(0);
        top_up(&w, 5);
        let e = take(&w, 4).expect("5 tokens cover 4");
        top_up(&w, 2);
        give_back(&w, e, 4);
        assert_eq!(tokens(w.load(Ordering::Relaxed)), 7);
    }

    #[test]
    fn renew_returns_the_unspent_and_voids_old_give_backs() {
        let w = AtomicU64::new(0);
        top_up(&w, 5);
        let e = take(&w, 2).expect("5 tokens cover 2");
        assert_eq!(renew(&w, 7), 3);
        give_back(&w, e, 2);
        assert_eq!(tokens(w.load(Ordering::Relaxed)), 7);
    }

    #[test]
    fn lease_validity_is_strict() {
        let u = AtomicU64::new(100);
        assert!(lease_valid(&u, 99));
        assert!(!lease_valid(&u, 100));
    }
}
