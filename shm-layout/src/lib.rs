//! The sluice region: its `#[repr(C)]` layout and every lock-free protocol
//! that runs on it.
//!
//! No I/O lives here: the client and the daemon map the file and hand this
//! crate references into the mapping. Under `cfg(loom)` the same protocols
//! run on heap-allocated atomics from [`sync`], with each process played by a
//! thread.
//!
//! | module       | protocol                                         |
//! |--------------|--------------------------------------------------|
//! | [`bucket`]   | GCRA token bucket, one CAS word                  |
//! | [`slots`]    | self-describing concurrency slots                |
//! | [`admit`]    | the order of checks for one request              |
//! | [`registry`] | client records and their lifecycle               |
//! | [`counters`] | per-client counter blocks and folding            |
//! | [`fleet`]    | fleet credit leased from the store, spent by CAS |
//! | [`layout`]   | header, tables, offsets, attach validation       |

pub mod admit;
pub mod breaker;
pub mod bucket;
pub mod counters;
pub mod fleet;
pub mod layout;
pub mod limits;
pub mod queue;
pub mod registry;
pub mod retry;
pub mod slots;
pub mod sync;
pub mod tenants;
