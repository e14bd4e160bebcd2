//! The one sync shim: std atomics normally, loom's under `cfg(loom)`.
//!
//! Every algorithm in this crate takes its atomics from here, so a loom model
//! can run the very code that ships. Nothing else in the workspace may name
//! `std::sync::atomic` integer types directly (see `clippy.toml`).

#[cfg(not(loom))]
#[allow(clippy::disallowed_types)]
pub use std::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

#[cfg(loom)]
pub use loom::sync::atomic::{fence, AtomicU32, AtomicU64, Ordering};

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
