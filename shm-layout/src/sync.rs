//! The one sync shim: std atomics normally, loom's under `cfg(loom)`.
//!
//! Every algorithm in this crate takes its atomics from here, so a loom model
//! can run the very code that ships. Nothing else in the workspace may name
//! `std::sync::atomic` integer types directly (see `clippy.toml`).

#![allow(clippy::disallowed_types)]

pub use std::sync::atomic::Ordering;

#[cfg(not(loom))]
pub use std::sync::atomic::fence;

#[cfg(loom)]
pub use loom::sync::atomic::fence;

#[cfg(not(loom))]
use std::sync::atomic as imp;

#[cfg(loom)]
use loom::sync::atomic as imp;

macro_rules! atomic_int {
    ($name:ident, $int:ty) => {
        /// An atomic integer of the region: std's type (same size and
        /// alignment as the integer, `repr(transparent)`), or loom's under
        /// `cfg(loom)`. Only the operations the protocols use are exposed.
        #[repr(transparent)]
        pub struct $name(imp::$name);

        impl $name {
            /// A new atomic holding `v`.
            pub fn new(v: $int) -> Self {
                Self(imp::$name::new(v))
            }
            /// Atomic load.
            #[inline(always)]
            pub fn load(&self, order: Ordering) -> $int {
                self.0.load(order)
            }
            /// Atomic store.
            #[inline(always)]
            pub fn store(&self, v: $int, order: Ordering) {
                self.0.store(v, order)
            }
            /// Atomic swap.
            #[inline(always)]
            pub fn swap(&self, v: $int, order: Ordering) -> $int {
                self.0.swap(v, order)
            }
            /// Strong compare-and-swap.
            #[inline(always)]
            pub fn compare_exchange(
                &self,
                current: $int,
                new: $int,
                success: Ordering,
                failure: Ordering,
            ) -> Result<$int, $int> {
                self.0.compare_exchange(current, new, success, failure)
            }
            /// Weak compare-and-swap (may fail spuriously; use in loops).
            #[inline(always)]
            pub fn compare_exchange_weak(
                &self,
                current: $int,
                new: $int,
                success: Ordering,
                failure: Ordering,
            ) -> Result<$int, $int> {
                self.0.compare_exchange_weak(current, new, success, failure)
            }
            /// Atomic add, wrapping.
            #[inline(always)]
            pub fn fetch_add(&self, v: $int, order: Ordering) -> $int {
                self.0.fetch_add(v, order)
            }
            /// Atomic subtract, wrapping.
            #[inline(always)]
            pub fn fetch_sub(&self, v: $int, order: Ordering) -> $int {
                self.0.fetch_sub(v, order)
            }
            /// Atomic bitwise or.
            #[inline(always)]
            pub fn fetch_or(&self, v: $int, order: Ordering) -> $int {
                self.0.fetch_or(v, order)
            }
            /// Apply `f` until it succeeds (a CAS loop) or `f` returns
            /// `None`; returns the previous value, or the current one.
            #[inline(always)]
            pub fn fetch_update<F>(
                &self,
                set: Ordering,
                fetch: Ordering,
                mut f: F,
            ) -> Result<$int, $int>
            where
                F: FnMut($int) -> Option<$int>,
            {
                let mut cur = self.0.load(fetch);
                loop {
                    let Some(next) = f(cur) else { return Err(cur) };
                    match self.0.compare_exchange_weak(cur, next, set, fetch) {
                        Ok(prev) => return Ok(prev),
                        Err(actual) => cur = actual,
                    }
                }
            }
            /// Atomic bitwise and.
            #[inline(always)]
            pub fn fetch_and(&self, v: $int, order: Ordering) -> $int {
                self.0.fetch_and(v, order)
            }
        }

        impl std::fmt::Debug for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                // Relaxed: a debugging snapshot.
                write!(f, "{}", self.load(Ordering::Relaxed))
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new(0)
            }
        }
    };
}

atomic_int!(AtomicU64, u64);
atomic_int!(AtomicU32, u32);

/// Back off inside a compare-and-swap retry loop.
///
/// Under loom it yields so the model checker can schedule the other thread;
/// otherwise it spins briefly with a CPU hint.
#[inline]
pub fn spin_hint(backoff: &crossbeam_utils::Backoff) {
    #[cfg(loom)]
    {
        let _ = backoff;
        loom::thread::yield_now();
    }
    #[cfg(not(loom))]
    backoff.spin();
}

/// Crash points for the loom models of issue "crash at any instruction".
///
/// A model arms a crash point on one thread; when that thread reaches it, the
/// protocol stops there forever (the thread returns early), standing for a
/// process killed between two atomic steps. Outside loom this compiles to
/// nothing.
#[cfg(loom)]
pub mod crash {
    use std::cell::Cell;

    loom::thread_local! {
        static ARMED: Cell<u32> = Cell::new(u32::MAX);
        static STEP: Cell<u32> = Cell::new(0);
    }

    /// Stop this thread at its `step`-th crash point (0-based); `u32::MAX`
    /// disarms.
    pub fn arm(step: u32) {
        ARMED.with(|a| a.set(step));
        STEP.with(|s| s.set(0));
    }

    /// True when this thread must stop here.
    pub fn reached() -> bool {
        let step = STEP.with(|s| {
            let v = s.get();
            s.set(v + 1);
            v
        });
        ARMED.with(|a| a.get() == step)
    }
}

/// Returns early with `$ret` when a loom model has armed a crash here.
#[macro_export]
macro_rules! crash_point {
    ($ret:expr) => {
        #[cfg(loom)]
        {
            if $crate::sync::crash::reached() {
                return $ret;
            }
        }
    };
}

/// Sleep while `word` holds `expected`, at most `timeout_ns` (a shared,
/// not process-private, futex: the word lives in a mapping other processes
/// wake through). Returns early on a wake-up, a signal, or a changed word;
/// callers re-check their condition in a loop.
#[cfg(not(loom))]
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout_ns: u64) {
    let ts = libc::timespec {
        tv_sec: (timeout_ns / 1_000_000_000).min(i64::MAX as u64) as libc::time_t,
        tv_nsec: (timeout_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: FUTEX_WAIT (without FUTEX_PRIVATE_FLAG) on the address of a
    // live, aligned u32 (AtomicU32 is repr(transparent) over one) with a
    // valid relative timeout; the kernel only reads the word.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word as *const AtomicU32 as *const u32,
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
        )
    };
}

/// Wake one process sleeping in [`futex_wait`] on `word`.
#[cfg(not(loom))]
pub fn futex_wake(word: &AtomicU32) {
    // SAFETY: FUTEX_WAKE (shared) on the address of a live, aligned u32;
    // the kernel does not access the memory.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word as *const AtomicU32 as *const u32,
            libc::FUTEX_WAKE,
            1,
        )
    };
}

/// Under loom a futex is modelled by yielding: the waiter re-checks its
/// condition, so a missing wake-up shows up as a waiter that never proceeds.
#[cfg(loom)]
pub fn futex_wait(word: &AtomicU32, expected: u32, _timeout_ns: u64) {
    if word.load(Ordering::SeqCst) == expected {
        loom::thread::yield_now();
    }
}

/// Under loom, waking is the store the waiter polls; nothing else to do.
#[cfg(loom)]
pub fn futex_wake(_word: &AtomicU32) {}
