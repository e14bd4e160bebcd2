//! Hard limits of layout version 1: the largest values the region can hold.
//!
//! The config loader rejects anything beyond these with a message that names
//! the limit, so a value is never silently truncated or wrapped.

/// Longest class name, in bytes (ASCII letters, digits, `_`, `-`, `.`).
pub const MAX_NAME_LEN: usize = 48;

/// Most slots one class may have (`max_in_flight`). Each slot is one 8-byte
/// self-describing word in the region, so this bounds the scan on refusal.
pub const MAX_IN_FLIGHT: u64 = 65_536;

/// Highest rate, tokens per second.
pub const MAX_RATE: f64 = 1e9;

/// Lowest rate, tokens per second: the emission interval must fit the
/// fixed-point word (about one token per 2.3 years).
pub const MIN_RATE: f64 = 1.4e-8;

/// Largest `burst + excess_burst`.
pub const MAX_BURST: u64 = 1 << 40;

/// Table capacities a config may ask for.
pub const MAX_CLASSES: u32 = 4_096;
/// Most client processes attached at once (index 65534 is the daemon's
/// own identity when it grants queued tickets).
pub const MAX_CLIENTS: u32 = 65_534;
/// Most tickets (waiting or verifying) at once.
pub const MAX_TICKETS: u32 = 1 << 22;
/// Most slot words in the whole region (sum of every class's `max_in_flight`).
pub const MAX_SLOTS: u32 = 1 << 24;
/// Most tenant keys.
pub const MAX_TENANTS: u32 = 1 << 20;

/// Longest duration a config may state: 100 years, in nanoseconds.
pub const MAX_DURATION_NS: u64 = 100 * 365 * 24 * 3600 * 1_000_000_000;
