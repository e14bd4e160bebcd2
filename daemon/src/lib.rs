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

/// Log to stderr with tracing: `SLUICE_LOG` (an env-filter) wins, else
/// `levels` = [quiet, default, -v, -vv and more].
pub fn init_logging(quiet: bool, verbose: u8, levels: [&str; 4]) {
    let level = match (quiet, verbose) {
        (true, _) => levels[0],
        (false, 0) => levels[1],
        (false, 1) => levels[2],
        _ => levels[3],
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

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
