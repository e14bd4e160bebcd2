//! Counters: what happened to requests, per class.
//!
//! Each client process has its own [`CounterBlock`](crate::layout::CounterBlock)
//! per class, on its own cache line, written only by that process. When a client exits, the daemon
//! moves its counts into the class totals (`fold`) and zeroes the block, so a
//! reused block starts at zero and no count is lost. A reader sums the totals
//! and every live block.
//!
//! Known shortcoming: a daemon killed in the middle of `fold` may lose the one counter it was
//! moving (the `swap` happened, the `fetch_add` not).

use crate::sync::{AtomicU64, Ordering};

/// Why a request was refused. The numbering is part of the layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Reason {
    /// Not now: no slot free, or the rate refused; see `retry_after`.
    NotNow = 0,
    /// The cost can never be admitted; see the largest admissible cost.
    SmallerScope = 1,
    /// A tenant's quota is exhausted.
    Quota = 2,
    /// A dependency's circuit breaker is open.
    Dependency = 3,
    /// The class is paused by its owner.
    Paused = 4,
    /// A retry found the retry budget empty.
    RetryBudget = 5,
    /// The wait queue is full.
    QueueFull = 6,
    /// The daemon is draining.
    ShuttingDown = 7,
    /// The host's fleet lease has no credit left (or the store is down and
    /// `on_store_down` refuses or the fallback bucket is empty). Its counter
    /// is [`REFUSED_FLEET`], outside the range of the first eight.
    Fleet = 8,
}

impl Reason {
    /// Every reason, in counter order.
    pub const ALL: [Reason; 9] = [
        Reason::NotNow,
        Reason::SmallerScope,
        Reason::Quota,
        Reason::Dependency,
        Reason::Paused,
        Reason::RetryBudget,
        Reason::QueueFull,
        Reason::ShuttingDown,
        Reason::Fleet,
    ];

    /// The name used in stats, JSON and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NotNow => "not_now",
            Reason::SmallerScope => "smaller_scope",
            Reason::Quota => "quota",
            Reason::Dependency => "dependency",
            Reason::Paused => "paused",
            Reason::RetryBudget => "retry_budget",
            Reason::QueueFull => "queue_full",
            Reason::ShuttingDown => "shutting_down",
            Reason::Fleet => "fleet",
        }
    }

    /// The counter index of this reason.
    pub fn counter(self) -> usize {
        match self {
            // Counters 11.. were taken before this reason came; it has its
            // own index rather than a renumbering.
            Reason::Fleet => REFUSED_FLEET,
            _ => REFUSED_BASE + self as usize,
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Every grant.
pub const ADMITTED: usize = 0;
/// Grants that were degraded.
pub const DEGRADED: usize = 1;
/// Grants that had waited in a queue.
pub const GRANTED_FROM_QUEUE: usize = 2;
/// First of the eight `refused` counters, in [`Reason`] order.
pub const REFUSED_BASE: usize = 3;
/// Tickets cancelled while queued.
pub const CANCELLED: usize = 11;
/// Tickets expired.
pub const EXPIRED: usize = 12;
/// Permits returned because their holder died.
pub const RECLAIMED: usize = 13;
/// Permits released (any outcome).
pub const RELEASED: usize = 14;
/// Releases reporting the work completed.
pub const OUTCOME_COMPLETED: usize = 15;
/// Releases reporting the work partly done.
pub const OUTCOME_PARTIAL: usize = 16;
/// Releases reporting the work failed.
pub const OUTCOME_FAILED: usize = 17;
/// Releases reporting the work stopped on a cancel request.
pub const OUTCOME_CANCELLED: usize = 18;
/// Requests refused with [`Reason::Fleet`].
pub const REFUSED_FLEET: usize = 19;
/// Number of counters in a block.
pub const COUNT: usize = 32;

/// Add to a counter of this process's block.
///
/// The block's line belongs to one process, so the add is uncontended
/// between processes; it is still a `fetch_add` because threads of that
/// process share the block. Relaxed: readers sum snapshots and need no order
/// with anything else.
#[inline]
pub fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// Move every count of `block` into `totals` and zero `block`.
///
/// Called by the daemon once the block's process is gone (no other writer).
pub fn fold(block: &[AtomicU64; COUNT], totals: &[AtomicU64; COUNT]) {
    for (b, t) in block.iter().zip(totals.iter()) {
        // Relaxed: the writer is dead; readers tolerate a momentary miss.
        let v = b.swap(0, Ordering::Relaxed);
        if v != 0 {
            t.fetch_add(v, Ordering::Relaxed);
        }
    }
}
