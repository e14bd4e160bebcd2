//! Wait queues: tickets, grants by hand-off, cancellation and expiry.
//!
//! # Algorithm
//!
//! A class owns a range of ticket records, one sub-range per lane. A request
//! that may wait claims a free record of its lane (the claim CAS writes the
//! owner, so the record is self-describing like a slot), takes a class-wide
//! sequence number for FIFO order, and publishes itself `QUEUED`. It then
//! sleeps on the record's own futex word (one word per ticket: a wake-up
//! wakes exactly one waiter, never a herd).
//!
//! A releaser frees its slots, then reads the class's `waiters` bits; only
//! when a bit is set does it *dispatch* (the only path that makes a system
//! call). Dispatch picks the best `QUEUED` ticket (lowest effective lane,
//! then lowest sequence; aging lowers the effective lane by one per
//! `age_after` waited), moves it `QUEUED → GRANTING(granter)`, claims its
//! slots with the *ticket's* tag and takes its tokens, then moves it
//! `GRANTING → GRANTED` and wakes it. If the slots or tokens are not there it
//! moves the ticket back `GRANTING → QUEUED` and stops: strict priority, no
//! overtaking. A ticket waiting for tokens reserves nothing.
//!
//! # State word
//!
//! ```text
//!  63          40 39      32 31             16 15              0
//! +--------------+----------+-----------------+-----------------+
//! | generation   | state    | granter idx + 1 | owner idx + 1   |
//! +--------------+----------+-----------------+-----------------+
//! ```
//!
//! `FREE(g) → CLAIMED(g+1, owner)` (enqueuer) `→ QUEUED` (enqueuer) and then
//! exactly one of:
//!
//! - `QUEUED → GRANTING(granter)` (a dispatcher) `→ GRANTED` or back
//!   `→ QUEUED`;
//! - `QUEUED → CANCELLED` (the owner, or the daemon for `sluice cancel`);
//! - `QUEUED → EXPIRED` (the owner at its deadline, or the daemon).
//!
//! Terminal states go back to `FREE(g)` when the owner has seen them (for
//! `GRANTED`: when the permit is released). The ticket id handed out is
//! `(generation, index)`: a stale id never matches a reused record.
//!
//! # Invariants
//!
//! - Cancel, expire and grant of one ticket are CASes from `QUEUED`: exactly
//!   one wins, and a grant is visible only once its slots are held.
//! - Slots granted from the queue carry the ticket's tag, which names the
//!   waiter's client record, so they are reclaimed exactly if it dies.
//! - No lost wake-up. An enqueuer sets its lane's `waiters` bit, publishes
//!   `QUEUED`, sets the bit again and then dispatches itself; a releaser frees
//!   its slot and then reads the bits (both sides `SeqCst`), so at least one
//!   of them sees the other's write and dispatches. A waiter re-reads its
//!   state after clearing its futex word and before sleeping; a granter
//!   writes the state, then the futex word, then wakes.
//!
//! # Who writes, progress, crashes
//!
//! Enqueuer: claim, publish, cancel/expire its own ticket, free it. Any
//! client (and the daemon): dispatch. Daemon: cancel by id, expire, reclaim.
//! Claiming, dispatching and cancelling are lock-free except that a cancel
//! meeting `GRANTING` waits for that granter's few steps. A process that dies
//! leaves: as enqueuer, `CLAIMED`/`QUEUED`/`GRANTED` records naming it (the
//! reclaimer frees them and its slots); as granter, `GRANTING(it)` (the
//! reclaimer returns the slots carrying that ticket's tag and puts the
//! ticket back to `QUEUED`). A `waiters` bit left set costs one empty
//! dispatch scan, which clears it.

use crate::bucket::{BucketVerdict, RateParams};
use crate::slots::{self, SlotGrant};
use crate::sync::{AtomicU32, AtomicU64, Ordering};

/// Unused.
pub const T_FREE: u64 = 0;
/// Claimed by an enqueuer that is filling it in.
pub const T_CLAIMED: u64 = 1;
/// Waiting.
pub const T_QUEUED: u64 = 2;
/// A dispatcher is granting it.
pub const T_GRANTING: u64 = 3;
/// Granted: its permit is held.
pub const T_GRANTED: u64 = 4;
/// Cancelled while queued.
pub const T_CANCELLED: u64 = 5;
/// Its deadline passed, or could not be met.
pub const T_EXPIRED: u64 = 6;
/// Its holder died; the outcome of its work is unknown.
pub const T_VERIFYING: u64 = 7;

/// `flags` bit: someone asked the holder of this granted ticket to stop.
pub const FLAG_CANCEL_REQUESTED: u32 = 1;
/// `flags` bit: the grant needed a slot at or above `soft_in_flight`, or the
/// bucket's excess burst.
pub const FLAG_DEGRADED: u32 = 2;
/// `flags` bit: the last dispatch found this ticket blocked by the rate
/// (else by slots).
pub const FLAG_WAITING_TOKENS: u32 = 4;
/// `flags` bit: granted without waiting (the queue was empty).
pub const FLAG_IMMEDIATE: u32 = 8;
/// `flags` bit (with `QUEUED`): the ticket waits for its tenant's quota
/// before it joins the line (`blocked_by_quota`); dispatch passes it by.
pub const FLAG_BLOCKED_QUOTA: u32 = 32;

/// `flags` bit (with `EXPIRED`): ended because its cost can no longer fit
/// (a reload lowered the limits); the owner reports `smaller_scope`.
pub const FLAG_TOO_LARGE: u32 = 16;

/// Sequence bit marking a slot tag as a ticket's (the low bits are the
/// ticket's index).
pub const TICKET_TAG_BIT: u32 = 0x8000_0000;

/// One ticket.
#[repr(C, align(64))]
#[derive(Default)]
pub struct TicketRecord {
    /// Packed state word, see the module doc.
    pub state: AtomicU64,
    /// The slot tag of this ticket (owner bits | `TICKET_TAG_BIT` | index).
    pub tag: AtomicU64,
    /// Class-wide FIFO sequence number.
    pub seq: AtomicU64,
    /// Cost asked for.
    pub cost: AtomicU64,
    /// CLOCK_MONOTONIC ns when enqueued.
    pub enqueued_ns: AtomicU64,
    /// CLOCK_MONOTONIC ns after which it expires.
    pub deadline_ns: AtomicU64,
    /// Futex word: 0 while the owner may sleep, 1 after a state change.
    pub wake: AtomicU32,
    /// `FLAG_*` bits.
    pub flags: AtomicU32,
    /// The lane it was enqueued in.
    pub lane: AtomicU32,
    /// The owner's pid (for listings).
    pub pid: AtomicU32,
}

#[cfg(not(loom))]
const _: () = assert!(std::mem::size_of::<TicketRecord>() == 64);

/// A decoded ticket state word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TicketWord {
    /// Incarnation of the record.
    pub generation: u32,
    /// One of the `T_*` constants.
    pub state: u64,
    /// Granter's client index + 1 while `GRANTING`, else 0.
    pub granter: u32,
    /// Owner's client index + 1 (0 when free).
    pub owner: u32,
}

impl TicketWord {
    /// Unpack.
    pub fn decode(w: u64) -> Self {
        Self {
            generation: (w >> 40) as u32 & 0xFF_FFFF,
            state: (w >> 32) & 0xFF,
            granter: (w >> 16) as u32 & 0xFFFF,
            owner: w as u32 & 0xFFFF,
        }
    }

    /// Pack.
    pub fn encode(self) -> u64 {
        (u64::from(self.generation & 0xFF_FFFF) << 40)
            | ((self.state & 0xFF) << 32)
            | (u64::from(self.granter & 0xFFFF) << 16)
            | u64::from(self.owner & 0xFFFF)
    }

    /// The same word in another state (granter cleared unless given).
    pub fn with(self, state: u64, granter: u32) -> Self {
        Self {
            state,
            granter,
            ..self
        }
    }
}

/// Bits of a ticket id that hold the record index (the ticket table holds
/// at most `limits::MAX_TICKETS` = 2^22 records).
const ID_INDEX_BITS: u32 = 22;

/// A ticket's public id: `(generation << 22) | index`. The generation
/// makes a stale id miss a reused record.
pub fn ticket_id(index: u32, generation: u32) -> u64 {
    (u64::from(generation) << ID_INDEX_BITS) | u64::from(index & ((1 << ID_INDEX_BITS) - 1))
}

/// Split a ticket id into `(index, generation)`.
pub fn split_id(id: u64) -> (u32, u32) {
    (
        (id & ((1 << ID_INDEX_BITS) - 1)) as u32,
        (id >> ID_INDEX_BITS) as u32,
    )
}

/// The lanes' bits in a class's `waiters` word that a request in `lane`
/// must not overtake: its own lane and every higher one.
pub fn bits_at_or_above(lane: usize) -> u64 {
    (1u64 << (lane.min(3) + 1)) - 1
}

/// Claim a free record among `records` (indices `first..`) for the client
/// with index `owner`. Returns `(index, generation)`.
pub fn claim(records: &[TicketRecord], first: u32, owner: u32) -> Option<(u32, u32)> {
    for (i, rec) in records.iter().enumerate() {
        // Acquire pairs with the Release store that freed the record: its
        // previous use is over before we reuse it.
        let cur = rec.state.load(Ordering::Acquire);
        let w = TicketWord::decode(cur);
        if w.state != T_FREE {
            continue;
        }
        let next = TicketWord {
            generation: (w.generation + 1) & 0xFF_FFFF,
            state: T_CLAIMED,
            granter: 0,
            owner: (owner + 1) & 0xFFFF,
        };
        // AcqRel: Acquire as above; Release makes the owner visible with
        // the claim (the reclaimer reads it from this word alone).
        if rec
            .state
            .compare_exchange(cur, next.encode(), Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            return Some((first + i as u32, next.generation));
        }
    }
    None
}

/// Move a record from `from` to `to` if it is still `expect` (same
/// generation and owner). Returns the word written, or the word found.
pub fn transition(rec: &TicketRecord, expect: TicketWord, to: TicketWord) -> Result<u64, u64> {
    // SeqCst: these transitions take part in the no-lost-wake-up argument
    // (publish vs. the waiters bits) and decide the cancel/grant race; the
    // total order keeps the argument simple. Not on the admission fast path.
    rec.state
        .compare_exchange(
            expect.encode(),
            to.encode(),
            Ordering::SeqCst,
            Ordering::SeqCst,
        )
        .map(|_| to.encode())
}

/// Set the futex word and wake the owner (one waiter).
pub fn wake(rec: &TicketRecord) {
    // Release pairs with the owner's AcqRel swap of `wake`: the state change
    // made before this store is visible once it sees the 1.
    rec.wake.store(1, Ordering::Release);
    crate::sync::futex_wake(&rec.wake);
}

/// The lane a ticket counts in now: its own, raised one step per
/// `age_after_ns` waited (0 = aging off).
pub fn effective_lane(lane: u32, enqueued_ns: u64, now_ns: u64, age_after_ns: u64) -> u32 {
    if age_after_ns == 0 {
        return lane.min(3);
    }
    let steps = now_ns.saturating_sub(enqueued_ns) / age_after_ns;
    lane.min(3).saturating_sub(steps.min(3) as u32)
}

/// What one scan of a class's tickets found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Best {
    /// Index (within the scanned slice) of the best `QUEUED` ticket.
    pub pos: Option<usize>,
    /// Its effective lane.
    pub lane: u32,
    /// Its sequence number.
    pub seq: u64,
    /// `QUEUED` tickets per effective lane.
    pub queued: [u32; 4],
    /// `GRANTING` tickets per lane (being granted now; may go back to
    /// `QUEUED`).
    pub granting: [u32; 4],
}

/// Find the best `QUEUED` ticket: lowest effective lane, then lowest
/// sequence. A racy scan: a ticket published during it may be missed, which
/// is the same as it arriving just after.
pub fn best(records: &[TicketRecord], now_ns: u64, age_after_ns: u64) -> Best {
    let mut b = Best::default();
    for (i, rec) in records.iter().enumerate() {
        // SeqCst: pairs with the enqueuer's SeqCst publish (seq, lane and
        // enqueue time are visible with QUEUED) and takes part in the
        // no-lost-wake-up argument (a plain load on x86).
        let st = TicketWord::decode(rec.state.load(Ordering::SeqCst)).state;
        if st == T_GRANTING {
            let lane = rec.lane.load(Ordering::Relaxed).min(3) as usize;
            b.granting[lane] += 1;
            continue;
        }
        if st != T_QUEUED {
            continue;
        }
        // Relaxed: a hint; the owner clears it before it sets its waiters
        // bit (SeqCst), after which dispatchers look again.
        if rec.flags.load(Ordering::Relaxed) & FLAG_BLOCKED_QUOTA != 0 {
            continue;
        }
        // Relaxed: ordered after the Acquire load above; fixed while queued.
        let lane = rec.lane.load(Ordering::Relaxed);
        let enq = rec.enqueued_ns.load(Ordering::Relaxed);
        let seq = rec.seq.load(Ordering::Relaxed);
        let eff = effective_lane(lane, enq, now_ns, age_after_ns);
        b.queued[eff as usize] += 1;
        let better = match b.pos {
            None => true,
            Some(_) => (eff, seq) < (b.lane, b.seq),
        };
        if better {
            b.pos = Some(i);
            b.lane = eff;
            b.seq = seq;
        }
    }
    b
}

/// The class state a dispatch needs.
pub struct ClassView<'a> {
    /// Limits.
    pub params: crate::admit::ClassParams,
    /// The bucket word.
    pub tat: &'a AtomicU64,
    /// The class's slot words.
    pub slots: &'a [AtomicU64],
    /// The class's ticket records (all lanes).
    pub tickets: &'a [TicketRecord],
    /// The class's `waiters` bits.
    pub waiters: &'a AtomicU64,
    /// Aging period, ns (0 = off).
    pub age_after_ns: u64,
    /// The class is paused, or a dependency is down: grant nothing.
    pub held: bool,
}

/// Why a dispatch stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dispatch {
    /// No ticket is queued.
    Empty,
    /// The best ticket needs slots that are not free.
    BlockedSlots,
    /// The best ticket needs tokens; the bucket has them after this many
    /// fixed-point units.
    BlockedTokens(u64),
    /// Gave up after granting this many (bounded work per call).
    Budget(u32),
    /// The class is held (paused, or a dependency is down).
    Held,
}

/// Grant queued tickets while capacity lasts. `granter` is the calling
/// client's index (the daemon passes `u32::MAX - 1`); `now_ns` is
/// CLOCK_MONOTONIC and `now_units` bucket time. Returns why it stopped and
/// how many it granted.
pub fn dispatch(
    view: &ClassView<'_>,
    granter: u32,
    now_ns: u64,
    now_units: u64,
) -> (Dispatch, u32) {
    let mut granted = 0;
    let mut retried = false;
    if view.held {
        return (Dispatch::Held, 0);
    }
    // Bounded work per call, even on a region someone scribbles on.
    for _ in 0..256 {
        if granted >= 64 {
            break;
        }
        let b = best(view.tickets, now_ns, view.age_after_ns);
        let Some(pos) = b.pos else {
            clear_idle_bits(view, now_ns);
            return (Dispatch::Empty, granted);
        };
        let rec = &view.tickets[pos];
        // Acquire: as in `best`.
        let cur = TicketWord::decode(rec.state.load(Ordering::Acquire));
        if cur.state != T_QUEUED {
            continue;
        }
        // A ticket that can no longer be granted must not block the line:
        // past its deadline (its owner is late to notice), or too large for
        // limits a reload lowered.
        // Relaxed: fields written before the ticket was published.
        let too_large =
            rec.cost.load(Ordering::Relaxed) > view.params.largest_cost(b.lane as usize);
        if too_large || rec.deadline_ns.load(Ordering::Relaxed) <= now_ns {
            if too_large {
                // Relaxed: read by the owner after the SeqCst transition.
                rec.flags.fetch_or(FLAG_TOO_LARGE, Ordering::Relaxed);
            }
            if transition(rec, cur, cur.with(T_EXPIRED, 0)).is_ok() {
                wake(rec);
            }
            continue;
        }
        let granting = cur.with(T_GRANTING, (granter + 1) & 0xFFFF);
        if transition(rec, cur, granting).is_err() {
            continue;
        }
        crate::crash_point!((Dispatch::Budget(granted), granted));
        match take_for(view, rec, b.lane as usize, now_units) {
            Ok((degraded, grant)) => {
                if degraded {
                    // Relaxed: read by the owner after it sees GRANTED
                    // (ordered by the SeqCst transition below).
                    rec.flags.fetch_or(FLAG_DEGRADED, Ordering::Relaxed);
                }
                rec.flags.fetch_and(!FLAG_WAITING_TOKENS, Ordering::Relaxed);
                crate::crash_point!((Dispatch::Budget(granted), granted));
                if transition(rec, granting, cur.with(T_GRANTED, 0)).is_ok() {
                    wake(rec);
                    granted += 1;
                } else {
                    // The reclaimer took the ticket (its owner died): the
                    // slots we claimed for it are nobody's; give them back.
                    // Relaxed: written before the ticket was published.
                    let tag = rec.tag.load(Ordering::Relaxed);
                    slots::release(view.slots, &grant, tag);
                }
            }
            Err(stop) => {
                if let Dispatch::BlockedTokens(_) = stop {
                    // Relaxed: an ETA hint for listings.
                    rec.flags.fetch_or(FLAG_WAITING_TOKENS, Ordering::Relaxed);
                } else {
                    rec.flags.fetch_and(!FLAG_WAITING_TOKENS, Ordering::Relaxed);
                }
                let _ = transition(rec, granting, cur);
                // A slot freed while the ticket was GRANTING: its releaser
                // may have seen the ticket as taken and gone away. Look
                // again (SeqCst, after our SeqCst roll-back) so the slot is
                // not left free beside a waiting ticket.
                // SeqCst fence: orders our roll-back before the look at
                // the slots, against the releaser's free-then-read-bits.
                crate::sync::fence(Ordering::SeqCst);
                if stop == Dispatch::BlockedSlots
                    && !retried
                    && slots::any_free(view.slots, view.params.ceiling(b.lane as usize) as usize)
                {
                    retried = true;
                    continue;
                }
                return (stop, granted);
            }
        }
    }
    (Dispatch::Budget(granted), granted)
}

/// Take slots and tokens for the ticket in `rec`, in the order of
/// [`crate::admit`]; on failure nothing stays taken.
fn take_for(
    view: &ClassView<'_>,
    rec: &TicketRecord,
    lane: usize,
    now_units: u64,
) -> Result<(bool, SlotGrant), Dispatch> {
    // Relaxed: written before the ticket was published QUEUED, which we
    // observed (and then won GRANTING) with SeqCst.
    let tag = rec.tag.load(Ordering::Relaxed);
    let cost = rec.cost.load(Ordering::Relaxed);
    let p = &view.params;
    let mut grant = SlotGrant::default();
    if p.max_in_flight > 0 {
        let ceiling = p.ceiling(lane) as usize;
        let soft = p.soft_in_flight as usize;
        // SeqCst fence: the claim's scan reads slot words with Relaxed
        // loads; after this fence they see every slot freed (by a SeqCst
        // CAS) before our SeqCst steps, the releaser's half of the
        // no-lost-wake-up argument. Slow path only (a grant from the queue).
        crate::sync::fence(Ordering::SeqCst);
        grant = slots::claim(view.slots, ceiling, soft, cost, tag).ok_or(Dispatch::BlockedSlots)?;
        // Held above a limit a reload lowered: see `admit::decide`.
        if p.overcommit && slots::in_flight(view.slots) > u64::from(p.max_in_flight) {
            slots::release(view.slots, &grant, tag);
            return Err(Dispatch::BlockedSlots);
        }
    }
    let mut yellow = false;
    if let Some(rate) = &p.rate {
        match rate.take(view.tat, now_units, cost) {
            BucketVerdict::Green { .. } => {}
            BucketVerdict::Yellow { .. } => yellow = true,
            BucketVerdict::Red { retry_after } => {
                slots::release(view.slots, &grant, tag);
                return Err(Dispatch::BlockedTokens(retry_after));
            }
            BucketVerdict::Never => {
                slots::release(view.slots, &grant, tag);
                return Err(Dispatch::BlockedTokens(u64::MAX));
            }
        }
    }
    Ok((yellow || grant.degraded, grant))
}

/// Clear the `waiters` bits of lanes that hold no ticket, then look again
/// and restore any bit whose lane gained one meanwhile (see the invariant).
fn clear_idle_bits(view: &ClassView<'_>, now_ns: u64) {
    // SeqCst: pairs with the enqueuer's SeqCst publish and bit set; see the
    // no-lost-wake-up argument in the module doc.
    let bits = view.waiters.load(Ordering::SeqCst);
    if bits == 0 {
        return;
    }
    view.waiters.fetch_and(!bits, Ordering::SeqCst);
    let again = best(view.tickets, now_ns, view.age_after_ns);
    let mut restore = 0;
    for lane in 0..4 {
        if again.queued[lane] > 0 || again.granting[lane] > 0 {
            restore |= 1 << lane;
        }
    }
    // CLAIMED records are enqueuers that will set their bit themselves.
    if restore != 0 {
        view.waiters.fetch_or(restore, Ordering::SeqCst);
    }
}

/// Count of waiting (claimed or queued or being granted) records in one
/// lane's range, for the queue bound.
pub fn waiting_in(records: &[TicketRecord]) -> u32 {
    records
        .iter()
        .filter(|r| {
            // SeqCst: the bound check must see every racing enqueuer that
            // published before it (take-then-check).
            let s = TicketWord::decode(r.state.load(Ordering::SeqCst)).state;
            s == T_CLAIMED || s == T_QUEUED || s == T_GRANTING
        })
        .count() as u32
}

/// Where a queued ticket stands: its 1-based position among queued tickets
/// of its class (by effective lane, then sequence) and the total cost of
/// the tickets ahead of it and itself.
pub fn position(
    records: &[TicketRecord],
    me: usize,
    now_ns: u64,
    age_after_ns: u64,
) -> Option<(u32, u64)> {
    let rec = records.get(me)?;
    // Relaxed throughout: a listing snapshot; each field is read once.
    let mine = (
        effective_lane(
            rec.lane.load(Ordering::Relaxed),
            rec.enqueued_ns.load(Ordering::Relaxed),
            now_ns,
            age_after_ns,
        ),
        rec.seq.load(Ordering::Relaxed),
    );
    let mut pos = 0u32;
    let mut cost = 0u64;
    for r in records {
        if TicketWord::decode(r.state.load(Ordering::Relaxed)).state != T_QUEUED {
            continue;
        }
        let key = (
            effective_lane(
                r.lane.load(Ordering::Relaxed),
                r.enqueued_ns.load(Ordering::Relaxed),
                now_ns,
                age_after_ns,
            ),
            r.seq.load(Ordering::Relaxed),
        );
        if key <= mine {
            pos += 1;
            cost = cost.saturating_add(r.cost.load(Ordering::Relaxed));
        }
    }
    Some((pos.max(1), cost))
}

/// What an ETA is computed from.
#[derive(Clone, Copy, Debug)]
pub struct EtaInput<'a> {
    /// The class's bucket, if it has a rate.
    pub rate: Option<&'a RateParams>,
    /// The bucket's `tat` now.
    pub tat_units: u64,
    /// Bucket time now.
    pub now_units: u64,
    /// The class has slots.
    pub has_slots: bool,
    /// A slot below the ticket's ceiling is free right now.
    pub slot_free: bool,
    /// 1-based position in the queue.
    pub position: u32,
    /// Cost of the tickets ahead, this one included.
    pub cost_ahead: u64,
    /// Releases per second × 1000 recently sampled by the daemon (0: none).
    pub grants_per_sec_milli: u64,
}

/// An honest ETA for a queued ticket, in ns from now, or `None` if unknown.
///
/// - Waiting for tokens: the bucket admits the cumulative cost `cost_ahead`
///   (this ticket's included) at `max(tat, now) + (cost_ahead − burst)·T`.
/// - Waiting for slots: `position / releases_per_sec`, where the rate is
///   the daemon's sample of recent releases; unknown (None) with none.
pub fn eta_ns(e: &EtaInput<'_>) -> Option<u64> {
    let token_eta = e.rate.map(|r| {
        // tat + (n − burst)·T − now, which is below tat when n < burst;
        // never before now.
        let t = i128::from(r.t);
        let at = i128::from(e.tat_units.max(e.now_units))
            + (i128::from(e.cost_ahead) - i128::from(r.burst)) * t;
        let units = (at - i128::from(e.now_units)).max(0);
        crate::bucket::units_to_ns_ceil(u64::try_from(units).unwrap_or(u64::MAX))
    });
    let slot_eta = if !e.has_slots || e.slot_free {
        Some(0)
    } else if e.grants_per_sec_milli == 0 {
        None
    } else {
        let ns = u128::from(e.position) * 1_000_000_000_000 / u128::from(e.grants_per_sec_milli);
        Some(u64::try_from(ns).unwrap_or(u64::MAX))
    };
    match (token_eta, slot_eta) {
        (Some(t), Some(s)) => Some(t.max(s)),
        (_, None) => None,
        (None, s) => s,
    }
}

/// Release every slot word carrying `tag` (a ticket's grant, whose
/// positions the waiter does not know). Returns how many it freed.
pub fn release_tagged(words: &[AtomicU64], tag: u64) -> u64 {
    let mut freed = 0;
    for w in words {
        // Relaxed: a hint; `release_one` is the decision (a CAS).
        if w.load(Ordering::Relaxed) == tag && slots::release_one(w, tag) {
            freed += 1;
        }
    }
    freed
}
