//! The region's bytes: header, class table, client registry, counter blocks
//! and slot words, all `#[repr(C)]` and made only of atomics.
//!
//! # Layout (version 1)
//!
//! ```text
//! offset            what                                   size
//! 0                 Header                                 512
//! off_classes       ClassRecord × cap_classes              1024 each
//! off_clients       ClientRecord × cap_clients             128 each
//! off_counters      CounterBlock × cap_clients × cap_classes 128 each
//! off_slots         slot word (u64) × cap_slots            8 each
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
pub const CLASS_RECORD_SIZE: usize = 1024;
/// Bytes of one client record.
pub const CLIENT_RECORD_SIZE: usize = 128;
/// Bytes of one counter block.
pub const COUNTER_BLOCK_SIZE: usize = 128;
/// Bytes of one slot word.
pub const SLOT_SIZE: usize = 8;
/// Alignment of every table.
pub const LINE: usize = 128;
/// The region size is a multiple of this.
pub const PAGE: usize = 4096;

/// Header `flags` bit: the daemon is draining; new work is refused.
pub const FLAG_DRAINING: u32 = 1;

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
    _reserved0: [AtomicU32; 5],
    /// Line 1, written by the daemon often: its pid.
    pub daemon_pid: AtomicU32,
    _pad1: AtomicU32,
    /// CLOCK_MONOTONIC (ns) of the daemon's last heartbeat.
    pub heartbeat_ns: AtomicU64,
    _reserved1: [AtomicU64; 14],
    _reserved2: [AtomicU64; 32],
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
    /// Aging period, ns; 0 means off (reserved).
    pub age_after_ns: AtomicU64,
    _reserved_cfg: [AtomicU64; 14],
    /// The bucket's `tat`, alone on its line.
    pub tat: HotWord,
    /// Waiter count and futex word (reserved for the scheduling layout).
    pub waiters: HotWord,
    /// Counts folded in from exited clients; written by the daemon.
    pub totals: CounterBlock,
    _reserved_hot: [HotWord; 3],
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
    assert!(std::mem::offset_of!(Header, daemon_pid) == 128);
    assert!(std::mem::offset_of!(Header, heartbeat_ns) == 136);
    assert!(std::mem::offset_of!(ClassRecord, name) == 48);
    assert!(std::mem::offset_of!(ClassRecord, rate_t) == 96);
    assert!(std::mem::offset_of!(ClassRecord, tat) == 256);
    assert!(std::mem::offset_of!(ClassRecord, waiters) == 384);
    assert!(std::mem::offset_of!(ClassRecord, totals) == 512);
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
        let blocks = u64::from(caps.clients).checked_mul(u64::from(caps.classes)).ok_or_else(err)?;
        let off_slots = blocks
            .checked_mul(COUNTER_BLOCK_SIZE as u64)
            .and_then(|b| off_counters.checked_add(b))
            .ok_or_else(err)?;
        let end = mul(caps.slots, SLOT_SIZE)
            .and_then(|b| off_slots.checked_add(b))
            .and_then(|e| align_up(e, line))
            .ok_or_else(err)?;
        let size = align_up(end, PAGE as u64).ok_or_else(err)?;
        if size > isize::MAX as u64 {
            return Err(err());
        }
        Ok(Self { caps, off_classes, off_clients, off_counters, off_slots, size })
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
        return Err(AttachError::TooSmall { len: file_len, need: HEADER_SIZE as u64 });
    }
    let magic = le_u64(bytes, 0);
    if magic != MAGIC {
        return Err(AttachError::BadMagic { found: magic, expected: MAGIC });
    }
    let version = le_u32(bytes, 8);
    if version == 0 {
        return Err(AttachError::NotPublished);
    }
    if version != LAYOUT_VERSION {
        return Err(AttachError::VersionMismatch { found: version, supported: LAYOUT_VERSION });
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
        return Err(AttachError::SizeMismatch { header: size, file: file_len });
    }
    let caps = Capacities {
        classes: le_u32(bytes, 56),
        clients: le_u32(bytes, 60),
        slots: le_u32(bytes, 64),
        tickets: le_u32(bytes, 68),
    };
    let geo = Geometry::new(caps).map_err(|e| AttachError::Corrupt(e.to_string()))?;
    let stated = [le_u64(bytes, 72), le_u64(bytes, 80), le_u64(bytes, 88), le_u64(bytes, 96)];
    let computed = [geo.off_classes, geo.off_clients, geo.off_counters, geo.off_slots];
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
            return Err(AttachError::TooSmall { len: len as u64, need: HEADER_SIZE as u64 });
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
        h.class_record_size.store(CLASS_RECORD_SIZE as u32, Ordering::Relaxed);
        h.client_record_size.store(CLIENT_RECORD_SIZE as u32, Ordering::Relaxed);
        h.counter_block_size.store(COUNTER_BLOCK_SIZE as u32, Ordering::Relaxed);
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
        Self { base, geo }
    }

    /// Publish a region laid out by [`Region::initialize`]: after this,
    /// attachers accept it. Call once the classes are written.
    pub fn publish(&self) {
        // Release pairs with the Acquire load in `attach`: publishes the
        // header and everything the creator wrote before this.
        self.header().layout_version.store(LAYOUT_VERSION, Ordering::Release);
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
}

impl ClassRecord {
    /// The class name, if the stored bytes are valid UTF-8.
    pub fn name(&self) -> Option<String> {
        let mut bytes = Vec::with_capacity(48);
        for w in &self.name {
            // Relaxed: names are written before `state` is published with
            // Release; the caller loaded `state` with Acquire.
            bytes.extend_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
        }
        let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        bytes.truncate(end);
        String::from_utf8(bytes).ok()
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
