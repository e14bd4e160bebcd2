//! The sluice daemon (`sluiced`) and ops command (`sluice`), as a library
//! so that tests and both binaries share one implementation.

pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod fleet;
pub mod maintain;
pub mod metrics;
pub mod reclaim;
pub mod region;
pub mod stats;

/// sysexits codes used by both binaries.
pub mod exit {
    /// Success.
    pub const OK: i32 = 0;
    /// Command line usage error.
    pub const USAGE: i32 = 64;
    /// The region is missing or unusable.
    pub const UNAVAILABLE: i32 = 69;
    /// Internal error.
    pub const SOFTWARE: i32 = 70;
    /// An OS-level failure (cannot create a file, a socket...).
    pub const OSERR: i32 = 71;
    /// Try again later: the work was not run (refused, expired, cancelled).
    pub const TEMPFAIL: i32 = 75;
    /// Permission denied.
    pub const NOPERM: i32 = 77;
    /// Bad config.
    pub const CONFIG: i32 = 78;
}
