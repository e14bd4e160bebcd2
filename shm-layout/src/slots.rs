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
pub fn claim(slots: &[AtomicU64], ceiling: usize, soft: usize, n: u64, tag: u64) -> Option<SlotGrant> {
    debug_assert!(tag & OWNER_MASK != 0, "a slot tag always names an owner");
    let ceiling = ceiling.min(slots.len());
    if n == 0 || n > ceiling as u64 {
        return None;
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
        if word.compare_exchange(0, tag, Ordering::Acquire, Ordering::Relaxed).is_err() {
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

/// Release one slot if it still carries `tag`. Returns whether it did.
pub fn release_one(word: &AtomicU64, tag: u64) -> bool {
    // Release pairs with the Acquire CAS in `claim`: our work under the
    // permit happens-before the next holder's.
    word.compare_exchange(tag, 0, Ordering::Release, Ordering::Relaxed).is_ok()
}

/// Release every slot of `grant` that still carries `tag`; returns how many
/// were released. Slots already reclaimed (or released) are skipped, so a
/// second release is a no-op.
pub fn release(slots: &[AtomicU64], grant: &SlotGrant, tag: u64) -> u64 {
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

/// Number of held slots. A racy snapshot: each word is read once, so the
/// answer is a count that was true of every word at some moment during the
/// scan; stats and tests at rest need no more.
pub fn in_flight(slots: &[AtomicU64]) -> u64 {
    // Relaxed: nothing is read through these words.
    slots.iter().filter(|w| w.load(Ordering::Relaxed) != 0).count() as u64
}

/// Held slots whose owner is `owner`.
pub fn held_by(slots: &[AtomicU64], owner: Owner) -> u64 {
    let bits = owner.bits();
    // Relaxed: a snapshot for the reclaimer's report and for tests.
    slots.iter().filter(|w| {
        let v = w.load(Ordering::Relaxed);
        v != 0 && v & OWNER_MASK == bits
    }).count() as u64
}
