//! The region's bytes: header, class table, client registry, counter blocks
//! and slot words, all `#[repr(C)]` and made only of atomics.
//!
//! # Layout (version 1)
//!
//! ```text
//! offset            what                                   size
//! 0                 Header                                 512
//! off_classes       ClassRecord × cap_classes              2048 each
//! off_clients       ClientRecord × cap_clients             128 each
//! off_counters      CounterBlock × cap_clients × cap_classes 256 each
//! off_slots         slot word (u64) × cap_slots            8 each
//! off_tickets       TicketRecord × cap_tickets             64 each
//! size              rounded up to 4096
//! ```
//!
//! Offsets follow from the capacities ([`Geometry::new`]); an attacher
//! recomputes them and refuses a header that disagrees. Every field is an
//! atomic because any process with write access may store to any byte at
//! any time: a plain read of such memory would be a data race.
//!
//! # Publication
//!
//! The daemon creates the file zeroed, writes every field, then stores
//! `layout_version` last with Release. An attacher loads it with Acquire
//! (pairing with that store) before it trusts anything else; 0 means the
//! creator has not finished (or died trying). Once published, the geometry
//! fields never change for the life of the file.
//!
//! # Who writes what
//!
//! Header geometry: the daemon, once. Heartbeat, pid, flags: the daemon.
//! Class config: the daemon (at creation and reload). `tat`: any client, by
//! CAS ([`crate::bucket`]). Slot words: clients and the reclaimer, by CAS
//! ([`crate::slots`]). Client records: the claiming client and the daemon
//! ([`crate::registry`]). Counter blocks: their client; the daemon folds.

#[cfg(not(loom))]
use std::ptr::NonNull;

use crate::counters;
use crate::sync::{AtomicU32, AtomicU64, Ordering};

/// "SLUICE" + layout family, little-endian.
pub const MAGIC: u64 = u64::from_le_bytes(*b"SLUICErg");

/// The layout version this code reads and writes. Its own number, not the
/// crate version: bump it whenever any record changes.
pub const LAYOUT_VERSION: u32 = 1;

/// Bytes of the header.
pub const HEADER_SIZE: usize = 512;
/// Bytes of one class record.
pub const CLASS_RECORD_SIZE: usize = 2048;
/// Bytes of one client record.
pub const CLIENT_RECORD_SIZE: usize = 128;
/// Bytes of one counter block.
pub const COUNTER_BLOCK_SIZE: usize = 256;
/// Bytes of one slot word.
pub const SLOT_SIZE: usize = 8;
/// Bytes of one ticket record.
pub const TICKET_SIZE: usize = 64;
/// Buckets of a class's wait-time histogram (log-linear, µs).
pub const WAIT_HIST_BUCKETS: usize = 128;
/// Alignment of every table.
pub const LINE: usize = 128;
/// The region size is a multiple of this.
pub const PAGE: usize = 4096;

/// Header `flags` bit: the daemon is draining; new work is refused.
pub const FLAG_DRAINING: u32 = 1;
/// Header `flags` bit: this region's file vanished and the daemon re-created
/// it (a copy, with a new generation) at the same path: re-attach.
pub const FLAG_REPLACED: u32 = 2;

/// `tenant_flags` bit: a full tenant table sends unknown keys to one shared
/// overflow bucket instead of refusing them.
pub const TENANTS_ON_FULL_SHARED: u32 = 1;

/// Dependency records in every region.
pub const DEPS: u32 = 64;
/// Tier records in every region.
pub const TIERS: u32 = 16;
/// Bytes of one dependency record.
pub const DEP_SIZE: usize = 128;
/// Bytes of one tier record.
pub const TIER_SIZE: usize = 64;
/// Bytes of one tenant record.
pub const TENANT_SIZE: usize = 128;

/// Class `flags` bit: paused by its owner.
pub const CLASS_PAUSED: u32 = 1;
/// Class `flags` bit: paused work may wait (`on_paused = "queue"`).
pub const CLASS_ON_PAUSED_QUEUE: u32 = 2;
/// Class `flags` bit: work may wait for a dependency
/// (`on_dependency_down = "queue"`).
pub const CLASS_ON_DEP_QUEUE: u32 = 4;
/// Class `flags` bit: requests must carry a tenant key.
pub const CLASS_TENANTS: u32 = 8;
/// Class `flags` bit: the class has a retry budget.
pub const CLASS_RETRY_BUDGET: u32 = 16;
/// Class `flags` bit: the class lists dependencies.
pub const CLASS_HAS_DEPS: u32 = 32;
/// Class `flags` bit: the class has a fleet-wide limit; requests spend the
/// lease in `fleet_credit` (see [`crate::fleet`]).
pub const CLASS_FLEET: u32 = 64;
/// Class `flags` bit: a reload lowered `max_in_flight` and permits may still
/// be held above it; admission counts every held slot until the daemon sees
/// none above the limit and clears the bit.
pub const CLASS_OVERCOMMIT: u32 = 128;

/// The region header.
#[repr(C, align(128))]
pub struct Header {
    /// [`MAGIC`].
    pub magic: AtomicU64,
    /// [`LAYOUT_VERSION`]; stored last, with Release.
    pub layout_version: AtomicU32,
    /// [`HEADER_SIZE`], so a mismatched build is named precisely.
    pub header_size: AtomicU32,
    /// [`CLASS_RECORD_SIZE`].
    pub class_record_size: AtomicU32,
    /// [`CLIENT_RECORD_SIZE`].
    pub client_record_size: AtomicU32,
    /// [`COUNTER_BLOCK_SIZE`].
    pub counter_block_size: AtomicU32,
    /// [`SLOT_SIZE`].
    pub slot_size: AtomicU32,
    /// Total bytes of the region.
    pub region_size: AtomicU64,
    /// Changes each time a daemon lays the region out anew.
    pub generation: AtomicU64,
    /// CLOCK_MONOTONIC (ns) at creation; bucket times count from here.
    pub epoch_ns: AtomicU64,
    /// Class records.
    pub cap_classes: AtomicU32,
    /// Client records.
    pub cap_clients: AtomicU32,
    /// Slot words.
    pub cap_slots: AtomicU32,
    /// Ticket records (reserved for the scheduling layout).
    pub cap_tickets: AtomicU32,
    /// Byte offset of the class table.
    pub off_classes: AtomicU64,
    /// Byte offset of the client registry.
    pub off_clients: AtomicU64,
    /// Byte offset of the counter blocks.
    pub off_counters: AtomicU64,
    /// Byte offset of the slot words.
    pub off_slots: AtomicU64,
    /// Header flags ([`FLAG_DRAINING`]); read on every request, written
    /// rarely, so it lives on this read-mostly line.
    pub flags: AtomicU32,
    _pad0: AtomicU32,
    /// Byte offset of the ticket records.
    pub off_tickets: AtomicU64,
    /// Tenant records.
    pub cap_tenants: AtomicU32,
    /// Dependency records.
    pub cap_deps: AtomicU32,
    /// Line 1, written by the daemon often: its pid.
    pub daemon_pid: AtomicU32,
    _pad1: AtomicU32,
    /// CLOCK_MONOTONIC (ns) of the daemon's last heartbeat.
    pub heartbeat_ns: AtomicU64,
    /// Attaches refused because every client record was taken.
    pub registry_full: AtomicU64,
    _reserved1: [AtomicU64; 13],
    /// Line 2, geometry of the policy tables: byte offset of the dependency
    /// records.
    pub off_deps: AtomicU64,
    /// Byte offset of the tier records.
    pub off_tiers: AtomicU64,
    /// Byte offset of the tenant records.
    pub off_tenants: AtomicU64,
    /// Key of the tenant-key hash (SipHash), random per region, so nobody
    /// can aim keys at one set of the table.
    pub tenant_k0: AtomicU64,
    /// Second half of that key.
    pub tenant_k1: AtomicU64,
    /// Tenant policy bits ([`TENANTS_ON_FULL_SHARED`]).
    pub tenant_flags: AtomicU32,
    /// Tier of keys not listed in the config.
    pub tenant_default_tier: AtomicU32,
    /// Keys unused this long may be evicted, ns.
    pub tenant_idle_ns: AtomicU64,
    _reserved2: [AtomicU64; 25],
}

/// Class record `state`: unused.
pub const CLASS_FREE: u32 = 0;
/// Class record `state`: defined and usable.
pub const CLASS_ACTIVE: u32 = 1;
/// Class record `state`: removed by a reload; handles must look up again.
pub const CLASS_REMOVED: u32 = 2;

/// Lanes in priority order; the index is the lane's number in the region.
pub const LANES: [&str; 4] = ["critical", "interactive", "batch", "maintenance"];
/// The default lane.
pub const DEFAULT_LANE: usize = 1;

/// A word alone on its cache line.
#[repr(C, align(128))]
pub struct HotWord {
    /// The word.
    pub value: AtomicU64,
    _pad: [AtomicU64; 15],
}

/// The counts of one class, as a block of [`counters::COUNT`] words.
#[repr(C, align(128))]
pub struct CounterBlock {
    /// Indexed by the constants of [`crate::counters`].
    pub counts: [AtomicU64; counters::COUNT],
}

/// One class: its config (written by the daemon) and its hot state.
#[repr(C, align(128))]
pub struct ClassRecord {
    /// [`CLASS_FREE`], [`CLASS_ACTIVE`] or [`CLASS_REMOVED`]; stored with
    /// Release after the rest of the config.
    pub state: AtomicU32,
    /// Bumped each time the record is defined anew or removed; a handle
    /// caches it and checks it on every request.
    pub generation: AtomicU32,
    /// Class flags (reserved: pause).
    pub flags: AtomicU32,
    /// Slots (`max_in_flight`); 0 means the class has no slots.
    pub max_in_flight: AtomicU32,
    /// Grants needing a position at or above this are degraded.
    pub soft_in_flight: AtomicU32,
    /// First slot word of this class in the slot table.
    pub slot_base: AtomicU32,
    /// Slot words reserved for this class (≥ `max_in_flight`).
    pub slot_len: AtomicU32,
    /// Per-lane queue bound (reserved for the scheduling layout).
    pub queue_depth: AtomicU32,
    /// Highest slot position + 1 each lane may claim, in [`LANES`] order.
    pub lane_ceiling: [AtomicU32; 4],
    /// Class name, UTF-8, NUL padded, 48 bytes.
    pub name: [AtomicU64; 6],
    /// Emission interval `T` in 1/64 ns; 0 means the class has no bucket.
    pub rate_t: AtomicU64,
    /// Bucket green tolerance, in tokens.
    pub burst: AtomicU64,
    /// Bucket extra yellow tolerance, in tokens.
    pub excess: AtomicU64,
    /// Largest cost; 0 means no cap beyond the others.
    pub max_cost: AtomicU64,
    /// Cap on a request's wait, ns; 0 means none (reserved).
    pub max_wait_ns: AtomicU64,
    /// Aging period, ns; 0 means off.
    pub age_after_ns: AtomicU64,
    /// First ticket record of this class.
    pub ticket_base: AtomicU32,
    /// Ticket records reserved for this class.
    pub ticket_len: AtomicU32,
    /// Releases per second × 1000, sampled by the daemon for ETAs (0: none
    /// in the sampling window, the ETA of a slot waiter is unknown).
    pub grant_rate_milli: AtomicU64,
    /// Ticket records per lane; the four lanes come first, then the pool
    /// for tickets granted without waiting.
    pub ticket_lane_len: AtomicU32,
    _pad_cfg: AtomicU32,
    /// Retry budget refill per admitted first attempt, in millionths of a
    /// unit.
    pub retry_ratio_ppm: AtomicU64,
    /// Retry budget capacity, whole units.
    pub retry_burst: AtomicU64,
    /// Dependencies (index + 1; 0 = none), up to four.
    pub deps: [AtomicU32; 4],
    /// Fleet policy, written by the daemon; see [`crate::fleet`] for the
    /// bit layout (`on_store_down` in bits 0..2, shadow mode in bit 2).
    pub fleet_cfg: AtomicU64,
    /// Fallback bucket `T` in 1/64 ns (0: no fallback bucket); the daemon
    /// rewrites it when `fleet_fallback_rate = "auto"` and the host count
    /// changes.
    pub fleet_fallback_t: AtomicU64,
    /// Fallback bucket burst, in tokens.
    pub fleet_fallback_burst: AtomicU64,
    /// Lease interval, ns: the retry-after of a refusal when no lease is
    /// planned.
    pub fleet_interval_ns: AtomicU64,
    /// `fleet_max_lease`: the most credit one lease holds, and the largest
    /// cost a fleet class admits (a shape cap).
    pub fleet_max_lease: AtomicU64,
    _reserved_cfg: [AtomicU64; 2],
    /// The bucket's `tat`, alone on its line.
    pub tat: HotWord,
    /// Waiter count and futex word (reserved for the scheduling layout).
    pub waiters: HotWord,
    /// Counts folded in from exited clients; written by the daemon.
    pub totals: CounterBlock,
    /// Class-wide FIFO sequence for tickets.
    pub enqueue_seq: HotWord,
    /// Waits of tickets granted from the queue, log-linear µs buckets.
    pub wait_hist: [AtomicU64; WAIT_HIST_BUCKETS],
    /// Retry budget left, in millionths of a unit. It shares its line only
    /// with the fleet words below; a class rarely has both.
    pub retry_tokens: AtomicU64,
    /// Fleet credit: epoch in bits 48..64, tokens in bits 0..48 (see
    /// [`crate::fleet`]). Clients take and give back by CAS; the daemon tops
    /// up and drains.
    pub fleet_credit: AtomicU64,
    /// CLOCK_MONOTONIC ns until which the credit may be spent; 0: no lease
    /// yet. Written by the daemon with Release after a top-up.
    pub fleet_lease_until_ns: AtomicU64,
    /// CLOCK_MONOTONIC ns of the daemon's next planned lease: the
    /// retry-after of a `fleet` refusal.
    pub fleet_next_lease_ns: AtomicU64,
    /// The fallback bucket's `tat`, spent while the lease has expired.
    pub fleet_fallback_tat: AtomicU64,
    /// Tokens spent on the fallback bucket, never reset; the daemon charges
    /// the increase to the fleet bucket on reconnection.
    pub fleet_fallback_used: AtomicU64,
    /// Would-be refusals in shadow mode (`fleet_enforce = false`).
    pub fleet_shadow_refused: AtomicU64,
    /// Tokens leased from the store, in total (daemon-written, for stats).
    pub fleet_leased: AtomicU64,
    /// Tokens handed back to the store (daemon-written).
    pub fleet_returned: AtomicU64,
    /// Tokens voided because their lease expired unspent (daemon-written).
    pub fleet_expired: AtomicU64,
    /// Last lease round trip, µs (daemon-written).
    pub fleet_rtt_us: AtomicU64,
    /// Store outages seen (daemon-written).
    pub fleet_outages: AtomicU64,
    /// Status (daemon-written): active hosts in bits 0..32, on fallback in
    /// bit 32, the store's config differs from ours in bit 33.
    pub fleet_status: AtomicU64,
    /// The highest fleet `tat` the store reported (µs of the store's
    /// clock), kept here so a restarted daemon still sends it (daemon-only).
    pub fleet_seen_tat: AtomicU64,
    _reserved_tail: [AtomicU64; 2],
}

/// A dependency's circuit breaker (see [`crate::breaker`]).
#[repr(C, align(128))]
#[derive(Default)]
pub struct DepRecord {
    /// Packed breaker state, see [`crate::breaker`].
    pub state: AtomicU64,
    /// CLOCK_MONOTONIC ns when an open breaker may probe (0 = tripped by
    /// hand: no retry-after).
    pub open_until_ns: AtomicU64,
    /// Half-open probes admitted so far.
    pub probes: AtomicU64,
    /// Outcomes reported in the current window: successes.
    pub successes: AtomicU64,
    /// Outcomes reported in the current window: failures.
    pub failures: AtomicU64,
    /// Name, UTF-8, NUL padded, 48 bytes.
    pub name: [AtomicU64; 6],
    /// Opens when failures / total ≥ this, in millionths.
    pub failure_ratio_ppm: AtomicU64,
    /// Window length, ns.
    pub window_ns: AtomicU64,
    /// Fewest outcomes in a window before it may open.
    pub min_requests: AtomicU32,
    /// Probes admitted while half-open.
    pub half_open_probes: AtomicU32,
    /// How long it stays open, ns.
    pub open_for_ns: AtomicU64,
}

/// A tenant tier: its rate and its long-period quota, as bucket params.
#[repr(C, align(64))]
#[derive(Default)]
pub struct TierRecord {
    /// Rate bucket `T` (0: tier unused).
    pub rate_t: AtomicU64,
    /// Rate bucket burst.
    pub burst: AtomicU64,
    /// Quota bucket `T` (quota/period; 0: no quota).
    pub quota_t: AtomicU64,
    /// Quota bucket burst (= quota).
    pub quota: AtomicU64,
    /// Name, UTF-8, NUL padded, 32 bytes.
    pub name: [AtomicU64; 4],
}

/// Client record `state` low byte: unused.
pub const CLIENT_FREE: u64 = 0;
/// Claimed by a process that is still registering.
pub const CLIENT_CLAIMED: u64 = 1;
/// Registered and running.
pub const CLIENT_ALIVE: u64 = 2;
/// Detached cleanly; the daemon folds its counters, then frees it.
pub const CLIENT_EXITING: u64 = 3;
/// Found dead by the daemon; being reclaimed.
pub const CLIENT_DEAD: u64 = 4;

/// One client process.
#[repr(C, align(128))]
#[derive(Default)]
pub struct ClientRecord {
    /// Packed `[generation: 24 | state: 8 | pid: 32]`; see
    /// [`crate::registry`].
    pub state: AtomicU64,
    /// Process start time (clock ticks since boot, /proc/PID/stat field 22).
    pub start_time: AtomicU64,
    /// Permit numbers this process has handed out; written only by it.
    pub permit_seq: AtomicU64,
    /// Requests let through while fail-open (reserved).
    pub fail_open: AtomicU64,
    _reserved: [AtomicU64; 12],
}

#[cfg(not(loom))]
const _: () = {
    assert!(std::mem::size_of::<Header>() == HEADER_SIZE);
    assert!(std::mem::size_of::<ClassRecord>() == CLASS_RECORD_SIZE);
    assert!(std::mem::size_of::<ClientRecord>() == CLIENT_RECORD_SIZE);
    assert!(std::mem::size_of::<CounterBlock>() == COUNTER_BLOCK_SIZE);
    assert!(std::mem::size_of::<AtomicU64>() == SLOT_SIZE);
    assert!(std::mem::align_of::<Header>() == LINE);
    assert!(std::mem::align_of::<ClassRecord>() == LINE);
    assert!(std::mem::offset_of!(Header, layout_version) == 8);
    assert!(std::mem::offset_of!(Header, region_size) == 32);
    assert!(std::mem::offset_of!(Header, flags) == 104);
    assert!(std::mem::offset_of!(Header, off_tickets) == 112);
    assert!(std::mem::offset_of!(Header, cap_tenants) == 120);
    assert!(std::mem::offset_of!(Header, off_deps) == 256);
    assert!(std::mem::offset_of!(Header, off_tenants) == 272);
    assert!(std::mem::offset_of!(ClassRecord, retry_ratio_ppm) == 168);
    assert!(std::mem::offset_of!(ClassRecord, retry_tokens) == 1920);
    assert!(std::mem::offset_of!(ClassRecord, fleet_cfg) == 200);
    assert!(std::mem::offset_of!(ClassRecord, fleet_max_lease) == 232);
    assert!(std::mem::offset_of!(ClassRecord, fleet_credit) == 1928);
    assert!(std::mem::offset_of!(ClassRecord, fleet_lease_until_ns) == 1936);
    assert!(std::mem::offset_of!(ClassRecord, fleet_fallback_tat) == 1952);
    assert!(std::mem::offset_of!(ClassRecord, fleet_status) == 2016);
    assert!(std::mem::offset_of!(ClassRecord, fleet_seen_tat) == 2024);
    assert!(std::mem::size_of::<DepRecord>() == DEP_SIZE);
    assert!(std::mem::size_of::<TierRecord>() == TIER_SIZE);
    assert!(std::mem::size_of::<crate::tenants::TenantRecord>() == TENANT_SIZE);
    assert!(std::mem::offset_of!(Header, daemon_pid) == 128);
    assert!(std::mem::offset_of!(Header, heartbeat_ns) == 136);
    assert!(std::mem::offset_of!(ClassRecord, name) == 48);
    assert!(std::mem::offset_of!(ClassRecord, rate_t) == 96);
    assert!(std::mem::offset_of!(ClassRecord, tat) == 256);
    assert!(std::mem::offset_of!(ClassRecord, waiters) == 384);
    assert!(std::mem::offset_of!(ClassRecord, totals) == 512);
    assert!(std::mem::offset_of!(ClassRecord, ticket_base) == 144);
    assert!(std::mem::offset_of!(ClassRecord, enqueue_seq) == 768);
    assert!(std::mem::offset_of!(ClassRecord, wait_hist) == 896);
    assert!(std::mem::size_of::<crate::queue::TicketRecord>() == TICKET_SIZE);
};

/// Table capacities of a region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacities {
    /// Class records (including spare room for reloads).
    pub classes: u32,
    /// Client records.
    pub clients: u32,
    /// Slot words.
    pub slots: u32,
    /// Ticket records.
    pub tickets: u32,
    /// Tenant records (a power of two, at least 8; 0 = no tenant table).
    pub tenants: u32,
}

/// Where everything is, computed from the capacities.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// The capacities this was computed from.
    pub caps: Capacities,
    /// Byte offset of the class table.
    pub off_classes: u64,
    /// Byte offset of the client registry.
    pub off_clients: u64,
    /// Byte offset of the counter blocks.
    pub off_counters: u64,
    /// Byte offset of the slot words.
    pub off_slots: u64,
    /// Byte offset of the ticket records.
    pub off_tickets: u64,
    /// Byte offset of the dependency records.
    pub off_deps: u64,
    /// Byte offset of the tier records.
    pub off_tiers: u64,
    /// Byte offset of the tenant records.
    pub off_tenants: u64,
    /// Total bytes.
    pub size: u64,
}

/// Why a region could not be attached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttachError {
    /// The file is smaller than a header.
    #[error("region is {len} bytes, smaller than its {need}-byte header: truncated, or not a sluice region")]
    TooSmall {
        /// File length.
        len: u64,
        /// Header size.
        need: u64,
    },
    /// Wrong magic number.
    #[error("not a sluice region (magic {found:#018x}, expected {expected:#018x})")]
    BadMagic {
        /// What the file holds.
        found: u64,
        /// [`MAGIC`].
        expected: u64,
    },
    /// Header not yet published.
    #[error("region header is not published yet: a daemon is creating it, or died while doing so")]
    NotPublished,
    /// Layout version differs.
    #[error("region layout v{found}, this build supports v{supported}")]
    VersionMismatch {
        /// The region's version.
        found: u32,
        /// [`LAYOUT_VERSION`].
        supported: u32,
    },
    /// A record size differs although the version matches.
    #[error("region {what} is {found} bytes, this build expects {expected}: layout mismatch")]
    RecordSize {
        /// Which record.
        what: &'static str,
        /// The region's size.
        found: u64,
        /// Ours.
        expected: u64,
    },
    /// The file is not as long as the header says.
    #[error("region header says {header} bytes but the file has {file}: truncated or corrupt")]
    SizeMismatch {
        /// `region_size` in the header.
        header: u64,
        /// Actual length.
        file: u64,
    },
    /// The header's geometry is inconsistent.
    #[error("region header is corrupt: {0}")]
    Corrupt(String),
}

/// Why a geometry could not be computed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("capacities {0:?} give a region too large to address")]
pub struct GeometryError(pub Capacities);

fn align_up(v: u64, to: u64) -> Option<u64> {
    v.checked_add(to - 1).map(|x| x / to * to)
}

impl Geometry {
    /// Compute offsets for `caps`, with checked arithmetic.
    pub fn new(caps: Capacities) -> Result<Self, GeometryError> {
        let err = || GeometryError(caps);
        let line = LINE as u64;
        let mul = |n: u32, size: usize| u64::from(n).checked_mul(size as u64);
        let off_classes = HEADER_SIZE as u64;
        let off_clients = mul(caps.classes, CLASS_RECORD_SIZE)
            .and_then(|b| off_classes.checked_add(b))
            .ok_or_else(err)?;
        let off_counters = mul(caps.clients, CLIENT_RECORD_SIZE)
            .and_then(|b| off_clients.checked_add(b))
            .ok_or_else(err)?;
        let blocks = u64::from(caps.clients)
            .checked_mul(u64::from(caps.classes))
            .ok_or_else(err)?;
        let off_slots = blocks
            .checked_mul(COUNTER_BLOCK_SIZE as u64)
            .and_then(|b| off_counters.checked_add(b))
            .ok_or_else(err)?;
        let off_tickets = mul(caps.slots, SLOT_SIZE)
            .and_then(|b| off_slots.checked_add(b))
            .and_then(|e| align_up(e, line))
            .ok_or_else(err)?;
        let off_deps = mul(caps.tickets, TICKET_SIZE)
            .and_then(|b| off_tickets.checked_add(b))
            .and_then(|e| align_up(e, line))
            .ok_or_else(err)?;
        let off_tiers = mul(DEPS, DEP_SIZE)
            .and_then(|b| off_deps.checked_add(b))
            .ok_or_else(err)?;
        let off_tenants = mul(TIERS, TIER_SIZE)
            .and_then(|b| off_tiers.checked_add(b))
            .and_then(|e| align_up(e, line))
            .ok_or_else(err)?;
        // One record past the table: the shared overflow bucket.
        let end = mul(caps.tenants.saturating_add(1), TENANT_SIZE)
            .and_then(|b| off_tenants.checked_add(b))
            .and_then(|e| align_up(e, line))
            .ok_or_else(err)?;
        let size = align_up(end, PAGE as u64).ok_or_else(err)?;
        if size > isize::MAX as u64 {
            return Err(err());
        }
        Ok(Self {
            caps,
            off_classes,
            off_clients,
            off_counters,
            off_slots,
            off_tickets,
            off_deps,
            off_tiers,
            off_tenants,
            size,
        })
    }
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// Validate a header read from the file with ordinary I/O, before mapping
/// it, against the file's length. A truncated file is caught here, so no
/// access through the mapping can fault with SIGBUS.
pub fn check_header_bytes(bytes: &[u8], file_len: u64) -> Result<Geometry, AttachError> {
    if bytes.len() < HEADER_SIZE || file_len < HEADER_SIZE as u64 {
        return Err(AttachError::TooSmall {
            len: file_len,
            need: HEADER_SIZE as u64,
        });
    }
    let magic = le_u64(bytes, 0);
    let version = le_u32(bytes, 8);
    // A daemon lays a region out in a zeroed file and stores the magic
    // first, the version last: all zeros, or our magic without a version,
    // is a region being created, not a foreign file.
    if version == 0 && (magic == 0 || magic == MAGIC) {
        return Err(AttachError::NotPublished);
    }
    if magic != MAGIC {
        return Err(AttachError::BadMagic {
            found: magic,
            expected: MAGIC,
        });
    }
    if version != LAYOUT_VERSION {
        return Err(AttachError::VersionMismatch {
            found: version,
            supported: LAYOUT_VERSION,
        });
    }
    let sizes = [
        ("header", le_u32(bytes, 12), HEADER_SIZE),
        ("class record", le_u32(bytes, 16), CLASS_RECORD_SIZE),
        ("client record", le_u32(bytes, 20), CLIENT_RECORD_SIZE),
        ("counter block", le_u32(bytes, 24), COUNTER_BLOCK_SIZE),
        ("slot word", le_u32(bytes, 28), SLOT_SIZE),
    ];
    for (what, found, expected) in sizes {
        if found as usize != expected {
            return Err(AttachError::RecordSize {
                what,
                found: u64::from(found),
                expected: expected as u64,
            });
        }
    }
    let size = le_u64(bytes, 32);
    if size != file_len {
        return Err(AttachError::SizeMismatch {
            header: size,
            file: file_len,
        });
    }
    let caps = Capacities {
        classes: le_u32(bytes, 56),
        clients: le_u32(bytes, 60),
        slots: le_u32(bytes, 64),
        tickets: le_u32(bytes, 68),
        tenants: le_u32(bytes, 120),
    };
    if le_u32(bytes, 124) != DEPS {
        return Err(AttachError::Corrupt(format!(
            "{} dependency records, this build has {DEPS}",
            le_u32(bytes, 124)
        )));
    }
    let geo = Geometry::new(caps).map_err(|e| AttachError::Corrupt(e.to_string()))?;
    let stated = [
        le_u64(bytes, 72),
        le_u64(bytes, 80),
        le_u64(bytes, 88),
        le_u64(bytes, 96),
        le_u64(bytes, 112),
        le_u64(bytes, 256),
        le_u64(bytes, 264),
        le_u64(bytes, 272),
    ];
    let computed = [
        geo.off_classes,
        geo.off_clients,
        geo.off_counters,
        geo.off_slots,
        geo.off_tickets,
        geo.off_deps,
        geo.off_tiers,
        geo.off_tenants,
    ];
    if stated != computed || geo.size != size {
        return Err(AttachError::Corrupt(format!(
            "table offsets {stated:?} and size {size} do not follow from capacities {caps:?}"
        )));
    }
    Ok(geo)
}

/// A typed view of a mapped region. Hands out references into the mapping,
/// every index bounds-checked against the validated geometry.
#[cfg(not(loom))]
pub struct Region {
    base: NonNull<u8>,
    geo: Geometry,
}

// SAFETY: Region only hands out shared references to atomics, which are Sync;
// the mapping it points into is shared memory valid for its whole life.
#[cfg(not(loom))]
unsafe impl Send for Region {}
// SAFETY: as above: all access is through atomics.
#[cfg(not(loom))]
unsafe impl Sync for Region {}

#[cfg(not(loom))]
impl Region {
    /// View an existing, published region.
    ///
    /// # Safety
    ///
    /// `base` must point to a mapping of `len` bytes, aligned to [`LINE`],
    /// that stays mapped (and at least `len` bytes long) for the life of the
    /// returned value and of every reference it hands out.
    pub unsafe fn attach(base: NonNull<u8>, len: usize) -> Result<Self, AttachError> {
        if len < HEADER_SIZE {
            return Err(AttachError::TooSmall {
                len: len as u64,
                need: HEADER_SIZE as u64,
            });
        }
        // SAFETY: the caller guarantees `len` readable bytes at `base`,
        // aligned to LINE, which covers the header's size and alignment.
        let header = unsafe { &*(base.as_ptr() as *const Header) };
        // Acquire pairs with the Release store of the version in
        // `initialize`: everything the creator wrote is visible after it.
        let version = header.layout_version.load(Ordering::Acquire);
        let mut bytes = [0u8; HEADER_SIZE];
        snapshot_header(header, version, &mut bytes);
        let geo = check_header_bytes(&bytes, len as u64)?;
        Ok(Self { base, geo })
    }

    /// Lay a new region out in zeroed memory, unpublished (attachers refuse
    /// it until [`Region::publish`]).
    ///
    /// # Safety
    ///
    /// As for [`Region::attach`]; in addition the memory must be zeroed,
    /// `len == geo.size`, and no other process may be initialising it.
    pub unsafe fn initialize(
        base: NonNull<u8>,
        len: usize,
        geo: Geometry,
        generation: u64,
        epoch_ns: u64,
    ) -> Self {
        debug_assert_eq!(len as u64, geo.size);
        // SAFETY: the caller guarantees a live, aligned mapping of `len`
        // bytes, which holds a header.
        let h = unsafe { &*(base.as_ptr() as *const Header) };
        // Relaxed stores: nothing reads them until the Release store of the
        // version below publishes them all.
        h.magic.store(MAGIC, Ordering::Relaxed);
        h.header_size.store(HEADER_SIZE as u32, Ordering::Relaxed);
        h.class_record_size
            .store(CLASS_RECORD_SIZE as u32, Ordering::Relaxed);
        h.client_record_size
            .store(CLIENT_RECORD_SIZE as u32, Ordering::Relaxed);
        h.counter_block_size
            .store(COUNTER_BLOCK_SIZE as u32, Ordering::Relaxed);
        h.slot_size.store(SLOT_SIZE as u32, Ordering::Relaxed);
        h.region_size.store(geo.size, Ordering::Relaxed);
        h.generation.store(generation, Ordering::Relaxed);
        h.epoch_ns.store(epoch_ns, Ordering::Relaxed);
        h.cap_classes.store(geo.caps.classes, Ordering::Relaxed);
        h.cap_clients.store(geo.caps.clients, Ordering::Relaxed);
        h.cap_slots.store(geo.caps.slots, Ordering::Relaxed);
        h.cap_tickets.store(geo.caps.tickets, Ordering::Relaxed);
        h.off_classes.store(geo.off_classes, Ordering::Relaxed);
        h.off_clients.store(geo.off_clients, Ordering::Relaxed);
        h.off_counters.store(geo.off_counters, Ordering::Relaxed);
        h.off_slots.store(geo.off_slots, Ordering::Relaxed);
        h.off_tickets.store(geo.off_tickets, Ordering::Relaxed);
        h.cap_tenants.store(geo.caps.tenants, Ordering::Relaxed);
        h.cap_deps.store(DEPS, Ordering::Relaxed);
        h.off_deps.store(geo.off_deps, Ordering::Relaxed);
        h.off_tiers.store(geo.off_tiers, Ordering::Relaxed);
        h.off_tenants.store(geo.off_tenants, Ordering::Relaxed);
        Self { base, geo }
    }

    /// Publish a region laid out by [`Region::initialize`]: after this,
    /// attachers accept it. Call once the classes are written.
    pub fn publish(&self) {
        // Release pairs with the Acquire load in `attach`: publishes the
        // header and everything the creator wrote before this.
        self.header()
            .layout_version
            .store(LAYOUT_VERSION, Ordering::Release);
    }

    /// View a mapping whose geometry the caller has already checked (with
    /// [`check_header_bytes`]) but whose version may not be published yet.
    ///
    /// # Safety
    ///
    /// As for [`Region::attach`], and `geo` must be the checked geometry of
    /// this very mapping.
    pub unsafe fn from_checked(base: NonNull<u8>, geo: Geometry) -> Self {
        Self { base, geo }
    }

    /// The validated geometry.
    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    /// The header.
    pub fn header(&self) -> &Header {
        // SAFETY: `attach`/`initialize` checked the mapping holds a header at
        // `base`, aligned to LINE, and it lives as long as `self`.
        unsafe { &*(self.base.as_ptr() as *const Header) }
    }

    /// The epoch of bucket time, ns of CLOCK_MONOTONIC.
    pub fn epoch_ns(&self) -> u64 {
        // Relaxed: written once before publication (see `attach`).
        self.header().epoch_ns.load(Ordering::Relaxed)
    }

    /// Class record `idx`, if it exists.
    pub fn class(&self, idx: u32) -> Option<&ClassRecord> {
        if idx >= self.geo.caps.classes {
            return None;
        }
        let off = self.geo.off_classes + u64::from(idx) * CLASS_RECORD_SIZE as u64;
        // SAFETY: idx < cap_classes, so the record lies inside the validated
        // geometry (off + size <= region size); offsets are LINE-aligned.
        Some(unsafe { &*(self.base.as_ptr().add(off as usize) as *const ClassRecord) })
    }

    /// Client record `idx`, if it exists.
    pub fn client(&self, idx: u32) -> Option<&ClientRecord> {
        if idx >= self.geo.caps.clients {
            return None;
        }
        let off = self.geo.off_clients + u64::from(idx) * CLIENT_RECORD_SIZE as u64;
        // SAFETY: idx < cap_clients: inside the validated geometry, aligned.
        Some(unsafe { &*(self.base.as_ptr().add(off as usize) as *const ClientRecord) })
    }

    /// The counter block of client `client` for class `class`.
    pub fn counters(&self, client: u32, class: u32) -> Option<&CounterBlock> {
        if client >= self.geo.caps.clients || class >= self.geo.caps.classes {
            return None;
        }
        let n = u64::from(client) * u64::from(self.geo.caps.classes) + u64::from(class);
        let off = self.geo.off_counters + n * COUNTER_BLOCK_SIZE as u64;
        // SAFETY: both indices are in range, so block n lies inside the
        // validated counter table; offsets are LINE-aligned.
        Some(unsafe { &*(self.base.as_ptr().add(off as usize) as *const CounterBlock) })
    }

    /// Slot words `base .. base + len`, if that range is inside the table.
    pub fn slots(&self, base: u32, len: u32) -> Option<&[AtomicU64]> {
        let end = base.checked_add(len)?;
        if end > self.geo.caps.slots {
            return None;
        }
        let off = self.geo.off_slots + u64::from(base) * SLOT_SIZE as u64;
        // SAFETY: [base, end) is inside the validated slot table, whose
        // words are 8-byte aligned AtomicU64s living as long as `self`.
        let first = unsafe { self.base.as_ptr().add(off as usize) } as *const AtomicU64;
        // SAFETY: `first` points at `len` consecutive initialised atomics.
        Some(unsafe { std::slice::from_raw_parts(first, len as usize) })
    }

    /// The tenant table.
    pub fn tenants(&self) -> &[crate::tenants::TenantRecord] {
        let off = self.geo.off_tenants;
        // SAFETY: the tenant table lies inside the validated geometry at
        // a LINE-aligned offset: `caps.tenants` records of TENANT_SIZE.
        let first = unsafe { self.base.as_ptr().add(off as usize) };
        // SAFETY: `first` points at `caps.tenants` consecutive records made
        // of atomics, living as long as `self`.
        unsafe {
            std::slice::from_raw_parts(
                first as *const crate::tenants::TenantRecord,
                self.geo.caps.tenants as usize,
            )
        }
    }

    /// The shared overflow bucket (`on_full = "shared"`), just past the
    /// tenant table, so no key can ever land in it.
    pub fn tenant_overflow(&self) -> &crate::tenants::TenantRecord {
        let off = self.geo.off_tenants + u64::from(self.geo.caps.tenants) * TENANT_SIZE as u64;
        // SAFETY: the geometry reserves one record after the table (see
        // `Geometry::new`), LINE aligned, inside the validated size.
        unsafe { &*(self.base.as_ptr().add(off as usize) as *const crate::tenants::TenantRecord) }
    }

    /// Dependency record `idx`.
    pub fn dep(&self, idx: u32) -> Option<&DepRecord> {
        if idx >= DEPS {
            return None;
        }
        let off = self.geo.off_deps + u64::from(idx) * DEP_SIZE as u64;
        // SAFETY: idx < DEPS: inside the validated dependency table, aligned
        // to LINE (the table starts LINE aligned; records are 128 bytes).
        Some(unsafe { &*(self.base.as_ptr().add(off as usize) as *const DepRecord) })
    }

    /// Tier record `idx`.
    pub fn tier(&self, idx: u32) -> Option<&TierRecord> {
        if idx >= TIERS {
            return None;
        }
        let off = self.geo.off_tiers + u64::from(idx) * TIER_SIZE as u64;
        // SAFETY: idx < TIERS: inside the validated tier table, 64-byte
        // aligned (it follows the 128-byte dependency records).
        Some(unsafe { &*(self.base.as_ptr().add(off as usize) as *const TierRecord) })
    }

    /// Ticket records `base .. base + len`, if inside the ticket table.
    pub fn tickets(&self, base: u32, len: u32) -> Option<&[crate::queue::TicketRecord]> {
        let end = base.checked_add(len)?;
        if end > self.geo.caps.tickets {
            return None;
        }
        let off = self.geo.off_tickets + u64::from(base) * TICKET_SIZE as u64;
        // SAFETY: [base, end) is inside the validated ticket table, LINE
        // aligned at its start, records of TICKET_SIZE (64) bytes.
        let first = unsafe { self.base.as_ptr().add(off as usize) };
        // SAFETY: `first` points at `len` consecutive ticket records made of
        // atomics, living as long as `self`.
        Some(unsafe {
            std::slice::from_raw_parts(first as *const crate::queue::TicketRecord, len as usize)
        })
    }
}

/// Copy the header's atomics into little-endian bytes for validation.
#[cfg(not(loom))]
fn snapshot_header(h: &Header, version: u32, out: &mut [u8; HEADER_SIZE]) {
    // Relaxed: ordered after the Acquire load of the version by the caller.
    let put32 = |out: &mut [u8; HEADER_SIZE], at: usize, v: u32| {
        out[at..at + 4].copy_from_slice(&v.to_le_bytes())
    };
    let put64 = |out: &mut [u8; HEADER_SIZE], at: usize, v: u64| {
        out[at..at + 8].copy_from_slice(&v.to_le_bytes())
    };
    put64(out, 0, h.magic.load(Ordering::Relaxed));
    put32(out, 8, version);
    put32(out, 12, h.header_size.load(Ordering::Relaxed));
    put32(out, 16, h.class_record_size.load(Ordering::Relaxed));
    put32(out, 20, h.client_record_size.load(Ordering::Relaxed));
    put32(out, 24, h.counter_block_size.load(Ordering::Relaxed));
    put32(out, 28, h.slot_size.load(Ordering::Relaxed));
    put64(out, 32, h.region_size.load(Ordering::Relaxed));
    put64(out, 40, h.generation.load(Ordering::Relaxed));
    put64(out, 48, h.epoch_ns.load(Ordering::Relaxed));
    put32(out, 56, h.cap_classes.load(Ordering::Relaxed));
    put32(out, 60, h.cap_clients.load(Ordering::Relaxed));
    put32(out, 64, h.cap_slots.load(Ordering::Relaxed));
    put32(out, 68, h.cap_tickets.load(Ordering::Relaxed));
    put64(out, 72, h.off_classes.load(Ordering::Relaxed));
    put64(out, 80, h.off_clients.load(Ordering::Relaxed));
    put64(out, 88, h.off_counters.load(Ordering::Relaxed));
    put64(out, 96, h.off_slots.load(Ordering::Relaxed));
    put64(out, 112, h.off_tickets.load(Ordering::Relaxed));
    put32(out, 120, h.cap_tenants.load(Ordering::Relaxed));
    put32(out, 124, h.cap_deps.load(Ordering::Relaxed));
    put64(out, 256, h.off_deps.load(Ordering::Relaxed));
    put64(out, 264, h.off_tiers.load(Ordering::Relaxed));
    put64(out, 272, h.off_tenants.load(Ordering::Relaxed));
}

/// Read a NUL-padded UTF-8 name stored in atomic words.
pub fn read_name(words: &[AtomicU64]) -> Option<String> {
    let mut bytes = Vec::with_capacity(words.len() * 8);
    for w in words {
        // Relaxed: names are written before the record's state is
        // published with Release; the caller loaded that state with Acquire.
        bytes.extend_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
    }
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    bytes.truncate(end);
    String::from_utf8(bytes).ok()
}

/// Store `name` NUL padded into atomic words (truncated to fit).
pub fn write_name(words: &[AtomicU64], name: &str) {
    let bytes = name.as_bytes();
    for (i, w) in words.iter().enumerate() {
        let mut word = [0u8; 8];
        for (j, b) in word.iter_mut().enumerate() {
            *b = bytes.get(i * 8 + j).copied().unwrap_or(0);
        }
        // Relaxed: published by the Release store of the record's state.
        w.store(u64::from_le_bytes(word), Ordering::Relaxed);
    }
}

impl ClassRecord {
    /// The class name, if the stored bytes are valid UTF-8.
    pub fn name(&self) -> Option<String> {
        read_name(&self.name)
    }

    /// True when the stored name equals `name` (no allocation).
    pub fn name_is(&self, name: &str) -> bool {
        let want = name.as_bytes();
        if want.len() > 48 {
            return false;
        }
        for (i, w) in self.name.iter().enumerate() {
            // Relaxed: see `name`.
            let have = w.load(Ordering::Relaxed).to_le_bytes();
            for (j, &b) in have.iter().enumerate() {
                let k = i * 8 + j;
                let expect = want.get(k).copied().unwrap_or(0);
                if b != expect {
                    return false;
                }
            }
        }
        true
    }

    /// Store `name` (at most 48 bytes; the config loader checks).
    pub fn set_name(&self, name: &str) {
        let bytes = name.as_bytes();
        for (i, w) in self.name.iter().enumerate() {
            let mut word = [0u8; 8];
            for (j, b) in word.iter_mut().enumerate() {
                *b = bytes.get(i * 8 + j).copied().unwrap_or(0);
            }
            // Relaxed: published by the Release store of `state`.
            w.store(u64::from_le_bytes(word), Ordering::Relaxed);
        }
    }
}

#[cfg(all(test, not(loom)))]
#[allow(clippy::unwrap_used)]
mod tests {
    // Covers the geometry (aligned, ordered, non-overlapping tables), header
    // validation with one field corrupted at a time, attach on a real
    // heap-backed region with its bounds checks, and class names.

    use super::*;
    use proptest::prelude::*;

    #[repr(C, align(4096))]
    struct Page([u8; PAGE]);

    /// A zeroed, page-aligned heap buffer standing in for the mapping.
    struct Buf {
        pages: Vec<Page>,
    }

    impl Buf {
        fn new(len: u64) -> Self {
            let n = (len as usize).div_ceil(PAGE);
            Self {
                pages: (0..n).map(|_| Page([0; PAGE])).collect(),
            }
        }

        fn base(&mut self) -> NonNull<u8> {
            NonNull::new(self.pages.as_mut_ptr().cast::<u8>()).unwrap()
        }
    }

    const CAPS: Capacities = Capacities {
        classes: 3,
        clients: 5,
        slots: 100,
        tickets: 16,
        tenants: 8,
    };

    /// Header byte offsets of the five table offsets.
    const OFFSET_FIELDS: [usize; 5] = [72, 80, 88, 96, 112];

    /// A region laid out and published in `buf`; returns its geometry.
    fn published(buf: &mut Buf) -> Geometry {
        let geo = Geometry::new(CAPS).unwrap();
        // SAFETY: `buf` is zeroed, page-aligned, `geo.size` bytes long and
        // outlives the region, which only this thread touches.
        let region = unsafe { Region::initialize(buf.base(), geo.size as usize, geo, 7, 1234) };
        region.publish();
        geo
    }

    fn header_bytes(buf: &mut Buf) -> [u8; HEADER_SIZE] {
        let mut out = [0u8; HEADER_SIZE];
        // SAFETY: the buffer holds at least one page, more than HEADER_SIZE
        // bytes, and no other thread writes it.
        unsafe {
            std::ptr::copy_nonoverlapping(buf.base().as_ptr(), out.as_mut_ptr(), HEADER_SIZE)
        };
        out
    }

    fn put32(b: &mut [u8], at: usize, v: u32) {
        b[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn put64(b: &mut [u8], at: usize, v: u64) {
        b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }

    fn check_geometry(geo: &Geometry) {
        let c = geo.caps;
        let line = LINE as u64;
        let offs = [
            geo.off_classes,
            geo.off_clients,
            geo.off_counters,
            geo.off_slots,
            geo.off_tickets,
        ];
        for off in offs {
            assert_eq!(off % line, 0, "{geo:?}");
        }
        assert_eq!(geo.size % PAGE as u64, 0);
        assert!(geo.off_classes >= HEADER_SIZE as u64);
        let classes_end = geo.off_classes + u64::from(c.classes) * CLASS_RECORD_SIZE as u64;
        assert!(geo.off_clients >= classes_end);
        let clients_end = geo.off_clients + u64::from(c.clients) * CLIENT_RECORD_SIZE as u64;
        assert!(geo.off_counters >= clients_end);
        let blocks = u64::from(c.clients) * u64::from(c.classes);
        assert!(geo.off_slots >= geo.off_counters + blocks * COUNTER_BLOCK_SIZE as u64);
        let slots_end = geo.off_slots + u64::from(c.slots) * SLOT_SIZE as u64;
        assert!(geo.off_tickets >= slots_end);
        assert!(geo.off_tickets < slots_end + line);
        let tickets_end = geo.off_tickets + u64::from(c.tickets) * TICKET_SIZE as u64;
        assert!(geo.off_deps >= tickets_end);
        assert!(geo.off_tiers >= geo.off_deps + u64::from(DEPS) * DEP_SIZE as u64);
        assert!(geo.off_tenants >= geo.off_tiers + u64::from(TIERS) * TIER_SIZE as u64);
        assert_eq!(geo.off_tenants % line, 0);
        let end = geo.off_tenants + (u64::from(c.tenants) + 1) * TENANT_SIZE as u64;
        assert!(geo.size >= end);
        assert!(geo.size < end + PAGE as u64 + line);
    }

    #[test]
    fn geometry_tables_are_aligned_ordered_and_disjoint() {
        for caps in [
            Capacities {
                classes: 0,
                clients: 0,
                slots: 0,
                tickets: 0,
                tenants: 8,
            },
            Capacities {
                classes: 1,
                clients: 1,
                slots: 1,
                tickets: 1,
                tenants: 8,
            },
            CAPS,
            Capacities {
                classes: 64,
                clients: 1024,
                slots: 65_536,
                tickets: 65_536,
                tenants: 8,
            },
        ] {
            check_geometry(&Geometry::new(caps).unwrap());
        }
        let one = Capacities {
            classes: 1,
            clients: 1,
            slots: 1,
            tickets: 1,
            tenants: 8,
        };
        let small = Geometry::new(one).unwrap();
        assert_eq!(small.off_classes, HEADER_SIZE as u64);
        assert_eq!(
            small.off_clients,
            small.off_classes + CLASS_RECORD_SIZE as u64
        );
        assert_eq!(
            small.off_counters,
            small.off_clients + CLIENT_RECORD_SIZE as u64
        );
        assert_eq!(
            small.off_slots,
            small.off_counters + COUNTER_BLOCK_SIZE as u64
        );
        assert_eq!(small.off_tickets, small.off_slots + LINE as u64);
        let tickets_end = small.off_tickets + TICKET_SIZE as u64;
        assert_eq!(
            small.off_deps,
            tickets_end.div_ceil(LINE as u64) * LINE as u64
        );
        let end = small.off_tenants + 9 * TENANT_SIZE as u64;
        assert_eq!(small.size, end.div_ceil(PAGE as u64) * PAGE as u64);
    }

    #[test]
    fn geometry_rejects_capacities_too_large_to_address() {
        let caps = Capacities {
            classes: u32::MAX,
            clients: u32::MAX,
            slots: u32::MAX,
            tickets: 0,
            tenants: 8,
        };
        assert_eq!(Geometry::new(caps), Err(GeometryError(caps)));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn geometry_holds_for_any_capacities(
            classes in 0u32..=4096, clients in 0u32..=65_535, slots in 0u32..=1 << 24, tickets in any::<u32>()
        ) {
            if let Ok(geo) = Geometry::new(Capacities { classes, clients, slots, tickets, tenants: 8 }) {
                check_geometry(&geo);
            }
        }
    }

    #[test]
    fn published_header_passes_validation() {
        let mut buf = Buf::new(Geometry::new(CAPS).unwrap().size);
        let geo = published(&mut buf);
        let bytes = header_bytes(&mut buf);
        assert_eq!(check_header_bytes(&bytes, geo.size), Ok(geo));
        assert_eq!(&bytes[..8], b"SLUICErg");
    }

    #[cfg(target_endian = "little")]
    #[test]
    fn attach_snapshot_matches_the_raw_header_bytes() {
        let mut buf = Buf::new(Geometry::new(CAPS).unwrap().size);
        published(&mut buf);
        let raw = header_bytes(&mut buf);
        let len = buf.pages.len() * PAGE;
        // SAFETY: as in `published`; the region is live and published.
        let region = unsafe { Region::attach(buf.base(), len) }.unwrap();
        let mut snap = [0u8; HEADER_SIZE];
        snapshot_header(region.header(), LAYOUT_VERSION, &mut snap);
        // Every field the snapshot copies sits where `repr(C)` put it.
        for at in (0..HEADER_SIZE).step_by(8) {
            if snap[at..at + 8] != [0; 8] {
                assert_eq!(snap[at..at + 8], raw[at..at + 8], "header bytes at {at}");
            }
        }
        for at in OFFSET_FIELDS {
            assert_ne!(snap[at..at + 8], [0; 8], "offset field at {at} is copied");
        }
    }

    #[test]
    fn header_shorter_than_512_bytes_is_too_small() {
        let mut buf = Buf::new(Geometry::new(CAPS).unwrap().size);
        let geo = published(&mut buf);
        let bytes = header_bytes(&mut buf);
        let need = HEADER_SIZE as u64;
        assert_eq!(
            check_header_bytes(&bytes, need - 1),
            Err(AttachError::TooSmall {
                len: need - 1,
                need
            })
        );
        let r = check_header_bytes(&bytes[..HEADER_SIZE - 1], geo.size);
        assert!(matches!(r, Err(AttachError::TooSmall { .. })));
        assert_eq!(
            check_header_bytes(&[], 0),
            Err(AttachError::TooSmall { len: 0, need })
        );
    }

    #[test]
    fn each_corrupted_field_is_named() {
        let mut buf = Buf::new(Geometry::new(CAPS).unwrap().size);
        let geo = published(&mut buf);
        let good = header_bytes(&mut buf);
        let size = geo.size;
        let with = |f: &dyn Fn(&mut [u8])| {
            let mut b = good;
            f(&mut b);
            check_header_bytes(&b, size)
        };

        let mut bad_magic = good;
        bad_magic[0] ^= 0x20;
        let found = u64::from_le_bytes(bad_magic[..8].try_into().unwrap());
        assert_eq!(
            with(&|b| b[0] ^= 0x20),
            Err(AttachError::BadMagic {
                found,
                expected: MAGIC
            })
        );
        assert_eq!(with(&|b| put32(b, 8, 0)), Err(AttachError::NotPublished));
        let v2 = with(&|b| put32(b, 8, 2));
        assert_eq!(
            v2,
            Err(AttachError::VersionMismatch {
                found: 2,
                supported: 1
            })
        );
        let msg = v2.unwrap_err().to_string();
        assert!(msg.contains("v2") && msg.contains("v1"), "{msg}");

        let records = [
            (12, "header", HEADER_SIZE as u64),
            (16, "class record", CLASS_RECORD_SIZE as u64),
            (20, "client record", CLIENT_RECORD_SIZE as u64),
            (24, "counter block", COUNTER_BLOCK_SIZE as u64),
            (28, "slot word", SLOT_SIZE as u64),
        ];
        for (at, what, expected) in records {
            let r = with(&|b| put32(b, at, expected as u32 + 8));
            assert_eq!(
                r,
                Err(AttachError::RecordSize {
                    what,
                    found: expected + 8,
                    expected
                })
            );
        }

        let page = PAGE as u64;
        let longer = check_header_bytes(&good, size + page);
        assert_eq!(
            longer,
            Err(AttachError::SizeMismatch {
                header: size,
                file: size + page
            })
        );
        let shorter = check_header_bytes(&good, size - page);
        assert_eq!(
            shorter,
            Err(AttachError::SizeMismatch {
                header: size,
                file: size - page
            })
        );
        let r = with(&|b| put64(b, 32, size * 2));
        assert_eq!(
            r,
            Err(AttachError::SizeMismatch {
                header: size * 2,
                file: size
            })
        );

        // Offsets or capacities that disagree with each other.
        for at in OFFSET_FIELDS {
            let r = with(&|b| {
                let v = u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
                put64(b, at, v + LINE as u64);
            });
            assert!(
                matches!(r, Err(AttachError::Corrupt(_))),
                "offset at {at}: {r:?}"
            );
        }
        for (at, v) in [
            (56, CAPS.classes + 1),
            (60, CAPS.clients + 1),
            (64, CAPS.slots + 512),
        ] {
            let r = with(&|b| put32(b, at, v));
            assert!(
                matches!(r, Err(AttachError::Corrupt(_))),
                "capacity at {at}: {r:?}"
            );
        }
        let r = with(&|b| {
            put32(b, 56, u32::MAX);
            put32(b, 60, u32::MAX);
        });
        assert!(matches!(r, Err(AttachError::Corrupt(_))), "{r:?}");
    }

    #[test]
    fn unpublished_region_is_refused() {
        let geo = Geometry::new(CAPS).unwrap();
        let mut buf = Buf::new(geo.size);
        // SAFETY: as in `published`.
        let _region = unsafe { Region::initialize(buf.base(), geo.size as usize, geo, 1, 0) };
        // SAFETY: the same live buffer.
        let r = unsafe { Region::attach(buf.base(), geo.size as usize) };
        assert!(matches!(r, Err(AttachError::NotPublished)));
    }

    #[test]
    fn attach_checks_length_before_anything_else() {
        let geo = Geometry::new(CAPS).unwrap();
        let mut buf = Buf::new(geo.size);
        published(&mut buf);
        // SAFETY: the buffer is longer than each length passed.
        let short = unsafe { Region::attach(buf.base(), 100) };
        assert!(matches!(short, Err(AttachError::TooSmall { len: 100, .. })));
        // SAFETY: as above.
        let truncated = unsafe { Region::attach(buf.base(), geo.size as usize - PAGE) };
        assert!(matches!(truncated, Err(AttachError::SizeMismatch { .. })));
    }

    #[test]
    fn attach_bounds_checks_every_index() {
        let geo = Geometry::new(CAPS).unwrap();
        let mut buf = Buf::new(geo.size);
        published(&mut buf);
        let base = buf.base();
        // SAFETY: `buf` is a published region of `geo.size` bytes that lives
        // until the end of this test.
        let region = unsafe { Region::attach(base, geo.size as usize) }.unwrap();
        assert_eq!(region.geometry(), geo);
        assert_eq!(region.epoch_ns(), 1234);
        assert_eq!(region.header().generation.load(Ordering::Relaxed), 7);

        let at = |p: *const u8| p as usize - base.as_ptr() as usize;
        let last_class = region.class(CAPS.classes - 1).unwrap();
        assert_eq!(
            at((last_class as *const ClassRecord).cast()),
            geo.off_classes as usize + (CAPS.classes as usize - 1) * CLASS_RECORD_SIZE
        );
        assert!(region.class(CAPS.classes).is_none());
        assert!(region.class(u32::MAX).is_none());
        let last_client = region.client(CAPS.clients - 1).unwrap();
        assert_eq!(
            at((last_client as *const ClientRecord).cast()),
            geo.off_clients as usize + (CAPS.clients as usize - 1) * CLIENT_RECORD_SIZE
        );
        assert!(region.client(CAPS.clients).is_none());
        let block = region.counters(CAPS.clients - 1, CAPS.classes - 1).unwrap();
        assert_eq!(
            at((block as *const CounterBlock).cast()) + COUNTER_BLOCK_SIZE,
            geo.off_slots as usize
        );
        assert!(region.counters(CAPS.clients, 0).is_none());
        assert!(region.counters(0, CAPS.classes).is_none());
        assert!(region.counters(u32::MAX, u32::MAX).is_none());

        let all = region.slots(0, CAPS.slots).unwrap();
        assert_eq!(all.len(), CAPS.slots as usize);
        assert_eq!(at(all.as_ptr().cast()), geo.off_slots as usize);
        assert_eq!(region.slots(CAPS.slots - 2, 2).unwrap().len(), 2);
        assert_eq!(region.slots(CAPS.slots, 0).unwrap().len(), 0);
        assert!(region.slots(1, CAPS.slots).is_none());
        assert!(region.slots(CAPS.slots, 1).is_none());
        assert!(region.slots(u32::MAX, 2).is_none(), "base + len overflows");
        assert!(region.slots(2, u32::MAX).is_none(), "base + len overflows");

        let tickets = region.tickets(0, CAPS.tickets).unwrap();
        assert_eq!(tickets.len(), CAPS.tickets as usize);
        assert_eq!(at(tickets.as_ptr().cast()), geo.off_tickets as usize);
        assert!(geo.off_tickets + u64::from(CAPS.tickets) * TICKET_SIZE as u64 <= geo.size);
        assert!(region.tickets(1, CAPS.tickets).is_none());
        assert!(region.tickets(CAPS.tickets, 1).is_none());
        assert!(
            region.tickets(u32::MAX, 2).is_none(),
            "base + len overflows"
        );

        // The tables do not alias: a write through one is seen only there.
        region.slots(CAPS.slots - 1, 1).unwrap()[0].store(u64::MAX, Ordering::Relaxed);
        block.counts[counters::COUNT - 1].store(5, Ordering::Relaxed);
        assert_eq!(
            region.slots(0, CAPS.slots).unwrap()[0].load(Ordering::Relaxed),
            0
        );
        assert_eq!(block.counts[counters::COUNT - 1].load(Ordering::Relaxed), 5);
    }

    #[test]
    fn class_name_round_trips_up_to_48_bytes() {
        let geo = Geometry::new(CAPS).unwrap();
        let mut buf = Buf::new(geo.size);
        published(&mut buf);
        // SAFETY: as in `attach_bounds_checks_every_index`.
        let region = unsafe { Region::attach(buf.base(), geo.size as usize) }.unwrap();
        let rec = region.class(0).unwrap();
        let other = region.class(1).unwrap();
        assert_eq!(rec.name().as_deref(), Some(""));
        assert!(rec.name_is(""));

        let long = "a-48-byte-class-name.for-the-limit_0123456789xyz";
        assert_eq!(long.len(), 48);
        for name in ["reports", "x", "exactly8", long, "api"] {
            rec.set_name(name);
            assert_eq!(rec.name().as_deref(), Some(name));
            assert!(rec.name_is(name), "{name}");
        }
        // "api" overwrote the 48-byte name: no tail survives.
        assert!(!rec.name_is(long));
        assert!(!rec.name_is("ap"));
        assert!(!rec.name_is("apis"));
        assert!(!rec.name_is(&format!("{long}z")));
        assert_eq!(
            other.name().as_deref(),
            Some(""),
            "names do not spill into the next record"
        );

        rec.set_name(long);
        other.set_name("next");
        assert_eq!(rec.name().as_deref(), Some(long));

        // Bytes that are not UTF-8 give None, never a panic.
        rec.name[0].store(
            u64::from_le_bytes([0xFF, 0xFE, 0, 0, 0, 0, 0, 0]),
            Ordering::Relaxed,
        );
        assert_eq!(rec.name(), None);
    }
}
