//! Dependency circuit breakers.
//!
//! # Algorithm
//!
//! Holders of permits in classes that depend on a dependency report how
//! their work ended (`release_with`); those outcomes are added to the
//! dependency's window counters. The daemon evaluates each breaker on every
//! tick:
//!
//! - `CLOSED`: when the window holds at least `min_requests` outcomes and
//!   `failures / total ≥ failure_ratio`, it opens until `now + open_for`.
//!   When the window ends the counters start again.
//! - `OPEN`: requests are refused `dependency` with `retry_after =
//!   open_until − now` (none when tripped by hand). At `open_until` it goes
//!   half-open.
//! - `HALF_OPEN`: at most `half_open_probes` requests are admitted (one CAS
//!   each on `probes`); any failure reopens it, and `half_open_probes`
//!   successes close it.
//!
//! # State word
//!
//! ```text
//!  63                          32 31          8 7       1  0
//! +------------------------------+-------------+----------+---+
//! | epoch (bumped per change)    | reserved    | mode     | M |
//! +------------------------------+-------------+----------+---+
//! ```
//!
//! `mode`: 0 closed, 1 open, 2 half-open; `M`: opened by hand (`sluice
//! trip`). Every transition is one CAS by the daemon (or by `trip`/`heal`
//! through it), so clients only ever read the word.
//!
//! # Invariant
//!
//! While half-open, no more than `half_open_probes` requests pass: `probes`
//! only grows by a CAS that checks the bound, and it is reset only together
//! with a change of epoch.
//!
//! # Crashes
//!
//! A client that dies after taking a probe leaves the probe used: the
//! breaker waits for outcomes it will never get, until the daemon's next
//! window ends and it reopens (a lost probe fails safe). Outcomes are plain
//! counters.

use crate::layout::DepRecord;
use crate::sync::Ordering;

/// Closed: requests pass.
pub const CLOSED: u64 = 0;
/// Open: requests are refused.
pub const OPEN: u64 = 1;
/// Half-open: a few probes pass.
pub const HALF_OPEN: u64 = 2;

/// A decoded breaker state word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerWord {
    /// Bumped on every transition.
    pub epoch: u32,
    /// `CLOSED`, `OPEN` or `HALF_OPEN`.
    pub mode: u64,
    /// Tripped by hand.
    pub manual: bool,
}

impl BreakerWord {
    /// Unpack.
    pub fn decode(w: u64) -> Self {
        Self {
            epoch: (w >> 32) as u32,
            mode: (w >> 1) & 0x7F,
            manual: w & 1 != 0,
        }
    }

    /// Pack.
    pub fn encode(self) -> u64 {
        (u64::from(self.epoch) << 32) | ((self.mode & 0x7F) << 1) | u64::from(self.manual)
    }

    /// The name of the mode, for stats.
    pub fn mode_name(self) -> &'static str {
        match self.mode {
            OPEN => "open",
            HALF_OPEN => "half_open",
            _ => "closed",
        }
    }
}

/// What a request sees at a dependency.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    /// Pass.
    Pass,
    /// Pass as one of the half-open probes.
    Probe,
    /// Refuse; retry after this many ns (`None`: tripped by hand, or all
    /// probes taken and their outcome unknown).
    Refuse(Option<u64>),
}

/// Check a dependency for one request at `now_ns` (a client's call).
pub fn check(dep: &DepRecord, now_ns: u64) -> Gate {
    // Acquire pairs with the daemon's SeqCst transitions: `open_until_ns`
    // and `probes` written with the transition are visible.
    let w = BreakerWord::decode(dep.state.load(Ordering::Acquire));
    match w.mode {
        OPEN => {
            // Relaxed: ordered by the Acquire load above.
            let until = dep.open_until_ns.load(Ordering::Relaxed);
            if w.manual || until == 0 {
                Gate::Refuse(None)
            } else {
                Gate::Refuse(Some(until.saturating_sub(now_ns).max(1)))
            }
        }
        HALF_OPEN => {
            // Relaxed: a config value.
            let allowed = u64::from(dep.half_open_probes.load(Ordering::Relaxed).max(1));
            // AcqRel: the bound check and the increment are one step, so
            // never more than `allowed` probes pass (see the invariant).
            let taken = dep
                .probes
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
                    (p < allowed).then_some(p + 1)
                });
            match taken {
                Ok(_) => Gate::Probe,
                Err(_) => Gate::Refuse(None),
            }
        }
        _ => Gate::Pass,
    }
}

/// Report how work that depended on `dep` ended.
pub fn report(dep: &DepRecord, success: bool) {
    let c = if success {
        &dep.successes
    } else {
        &dep.failures
    };
    // Relaxed: counters the daemon samples; nothing is published by them.
    c.fetch_add(1, Ordering::Relaxed);
}

fn set(dep: &DepRecord, from: u64, mode: u64, manual: bool, open_until: u64) -> bool {
    let cur = BreakerWord::decode(from);
    let next = BreakerWord {
        epoch: cur.epoch.wrapping_add(1),
        mode,
        manual,
    };
    // Relaxed stores: published by the SeqCst CAS below (readers Acquire).
    dep.open_until_ns.store(open_until, Ordering::Relaxed);
    dep.probes.store(0, Ordering::Relaxed);
    dep.successes.store(0, Ordering::Relaxed);
    dep.failures.store(0, Ordering::Relaxed);
    // SeqCst: the daemon is the only writer; the total order keeps trips
    // from the control thread and ticks from the loop simple.
    dep.state
        .compare_exchange(from, next.encode(), Ordering::SeqCst, Ordering::SeqCst)
        .is_ok()
}

/// Trip by hand: open with no retry-after until healed.
pub fn trip(dep: &DepRecord) {
    for _ in 0..64 {
        // SeqCst: see `set`.
        let cur = dep.state.load(Ordering::SeqCst);
        if set(dep, cur, OPEN, true, 0) {
            return;
        }
    }
}

/// Heal by hand: close and start a fresh window.
pub fn heal(dep: &DepRecord) {
    for _ in 0..64 {
        // SeqCst: see `set`.
        let cur = dep.state.load(Ordering::SeqCst);
        if set(dep, cur, CLOSED, false, 0) {
            return;
        }
    }
}

/// What one evaluation did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    /// Nothing changed.
    None,
    /// Opened on the failure ratio.
    Opened {
        /// Failures in the window.
        failures: u64,
        /// Outcomes in the window.
        total: u64,
    },
    /// Went half-open.
    HalfOpen,
    /// Closed after successful probes.
    Closed,
    /// Reopened after a failed probe.
    Reopened,
    /// The window ended; counters restarted.
    WindowReset,
}

/// The daemon's evaluation of one breaker at `now_ns`; `window_start` is
/// the daemon's own record of when the current window began (it resets it
/// when this returns `WindowReset` or any transition).
pub fn evaluate(dep: &DepRecord, now_ns: u64, window_start: u64) -> Transition {
    // SeqCst: see `set`.
    let raw = dep.state.load(Ordering::SeqCst);
    let w = BreakerWord::decode(raw);
    // Relaxed: counters and config, sampled.
    let s = dep.successes.load(Ordering::Relaxed);
    let f = dep.failures.load(Ordering::Relaxed);
    match w.mode {
        CLOSED => {
            let total = s + f;
            let min = u64::from(dep.min_requests.load(Ordering::Relaxed).max(1));
            let ratio = dep.failure_ratio_ppm.load(Ordering::Relaxed);
            if total >= min && u128::from(f) * 1_000_000 >= u128::from(ratio) * u128::from(total) {
                let until = now_ns.saturating_add(dep.open_for_ns.load(Ordering::Relaxed));
                if set(dep, raw, OPEN, false, until.max(1)) {
                    return Transition::Opened { failures: f, total };
                }
            } else if now_ns.saturating_sub(window_start) >= dep.window_ns.load(Ordering::Relaxed) {
                dep.successes.fetch_sub(s, Ordering::Relaxed);
                dep.failures.fetch_sub(f, Ordering::Relaxed);
                return Transition::WindowReset;
            }
            Transition::None
        }
        OPEN => {
            let until = dep.open_until_ns.load(Ordering::Relaxed);
            if !w.manual && until != 0 && now_ns >= until && set(dep, raw, HALF_OPEN, false, 0) {
                return Transition::HalfOpen;
            }
            Transition::None
        }
        HALF_OPEN => {
            let probes = u64::from(dep.half_open_probes.load(Ordering::Relaxed).max(1));
            if f > 0 {
                let until = now_ns.saturating_add(dep.open_for_ns.load(Ordering::Relaxed));
                if set(dep, raw, OPEN, false, until.max(1)) {
                    return Transition::Reopened;
                }
            } else if s >= probes {
                if set(dep, raw, CLOSED, false, 0) {
                    return Transition::Closed;
                }
            } else if now_ns.saturating_sub(window_start) >= dep.window_ns.load(Ordering::Relaxed)
                && dep.probes.load(Ordering::Relaxed) >= probes
            {
                // Probes were taken but never reported (their holders
                // died): fail safe, open again.
                let until = now_ns.saturating_add(dep.open_for_ns.load(Ordering::Relaxed));
                if set(dep, raw, OPEN, false, until.max(1)) {
                    return Transition::Reopened;
                }
            }
            Transition::None
        }
        _ => Transition::None,
    }
}

impl DepRecord {
    /// The dependency's name.
    pub fn name(&self) -> Option<String> {
        crate::layout::read_name(&self.name)
    }
}
