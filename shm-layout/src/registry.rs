//! Client registry: which processes are attached, so that what a dead one
//! held can be found and returned.
//!
//! # Record state word
//!
//! ```text
//!  63            40 39      32 31                          0
//! +----------------+----------+-----------------------------+
//! | generation     | state    | pid                         |
//! +----------------+----------+-----------------------------+
//! ```
//!
//! Transitions (each one CAS on the whole word):
//!
//! - `FREE(g)` → `CLAIMED(g+1, pid)`: a process claims the record. The pid
//!   is in the same word, so the daemon can always tell whom to watch.
//! - `CLAIMED(g, pid)` → `ALIVE(g, pid)`: after it stored its start time.
//! - `ALIVE` → `EXITING`: clean detach, after releasing its permits.
//! - `CLAIMED | ALIVE` → `DEAD`: the daemon saw the process die.
//! - `EXITING | DEAD` → `FREE(g)`: the daemon has returned the slots and
//!   folded the counters.
//!
//! # Invariant
//!
//! A record's generation changes only when it is claimed, so the owner bits
//! `(index, generation)` carried by slot words name exactly one process
//! incarnation (modulo 2¹⁶ reuses of the same record).
//!
//! # Crashes
//!
//! A process that dies after claiming leaves `CLAIMED` or `ALIVE` with its
//! pid: the daemon's death watch finds it. A daemon that dies mid-reclaim
//! leaves `DEAD`/`EXITING`, and the next daemon finishes (reclaiming is
//! idempotent). Progress: claiming is lock-free (a CAS fails only because
//! another process claimed that record).

use crate::layout::{ClientRecord, CLIENT_ALIVE, CLIENT_CLAIMED, CLIENT_FREE};
use crate::sync::{AtomicU64, Ordering};

const PID_MASK: u64 = 0xFFFF_FFFF;
const STATE_SHIFT: u32 = 32;
const GEN_SHIFT: u32 = 40;
const GEN_MASK: u64 = 0xFF_FFFF;

/// A decoded record state word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientState {
    /// Incarnation number of the record.
    pub generation: u32,
    /// One of the `CLIENT_*` constants.
    pub state: u64,
    /// Process id of the holder (0 when free).
    pub pid: u32,
}

impl ClientState {
    /// Unpack a state word.
    pub fn decode(word: u64) -> Self {
        Self {
            generation: ((word >> GEN_SHIFT) & GEN_MASK) as u32,
            state: (word >> STATE_SHIFT) & 0xFF,
            pid: (word & PID_MASK) as u32,
        }
    }

    /// Pack into a state word.
    pub fn encode(self) -> u64 {
        (u64::from(self.generation) & GEN_MASK) << GEN_SHIFT
            | (self.state & 0xFF) << STATE_SHIFT
            | u64::from(self.pid)
    }
}

/// Claim a free record among `records` for process `pid`.
///
/// Returns the record's index and new generation, or `None` when every
/// record is taken (the registry is full).
pub fn claim<'a, I>(records: I, pid: u32) -> Option<(u32, u32)>
where
    I: IntoIterator<Item = (u32, &'a AtomicU64)>,
{
    for (idx, word) in records {
        // Acquire pairs with the daemon's Release store of FREE: the
        // record's previous use is fully retired before we take it.
        let cur = word.load(Ordering::Acquire);
        let st = ClientState::decode(cur);
        if st.state != CLIENT_FREE {
            continue;
        }
        let generation = (st.generation + 1) & GEN_MASK as u32;
        let next = ClientState { generation, state: CLIENT_CLAIMED, pid }.encode();
        // AcqRel: Acquire as above; Release publishes the pid with the claim.
        if word.compare_exchange(cur, next, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            return Some((idx, generation));
        }
    }
    None
}

/// Finish registration: store the start time, then mark the record alive.
/// Returns false if the record is no longer ours (the daemon judged us dead).
pub fn activate(rec: &ClientRecord, generation: u32, pid: u32, start_time: u64) -> bool {
    // Relaxed: published by the Release CAS below.
    rec.start_time.store(start_time, Ordering::Relaxed);
    crate::crash_point!(false);
    let from = ClientState { generation, state: CLIENT_CLAIMED, pid }.encode();
    let to = ClientState { generation, state: CLIENT_ALIVE, pid }.encode();
    // Release pairs with the daemon's Acquire load of the state word: it
    // sees the start time once it sees ALIVE.
    rec.state.compare_exchange(from, to, Ordering::Release, Ordering::Relaxed).is_ok()
}

/// Move our record from `from` to `to` state (keeping generation and pid).
/// Returns false if it was not in `from` with our generation.
pub fn transition(word: &AtomicU64, generation: u32, pid: u32, from: u64, to: u64) -> bool {
    let a = ClientState { generation, state: from, pid }.encode();
    let b = ClientState { generation, state: to, pid }.encode();
    // AcqRel: Release publishes what we did before (released slots, last
    // counts) to the daemon's Acquire load; Acquire sees its prior writes.
    word.compare_exchange(a, b, Ordering::AcqRel, Ordering::Acquire).is_ok()
}

/// Free a retired record, keeping its generation so the next claim bumps it.
pub fn free(word: &AtomicU64, current: u64) -> bool {
    let st = ClientState::decode(current);
    let next = ClientState { generation: st.generation, state: CLIENT_FREE, pid: 0 }.encode();
    // Release pairs with the Acquire load in `claim`: our folding is done
    // before anyone reuses the record.
    word.compare_exchange(current, next, Ordering::Release, Ordering::Relaxed).is_ok()
}
