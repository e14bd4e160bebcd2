//! loom model of the header's publication (`Region::initialize`, `publish`,
//! `attach`): the creator writes the header, then the version; an attacher
//! trusts nothing before it sees the version.
//!
//! `Region` maps raw memory and does not exist under `cfg(loom)`, and
//! `Header` has private padding and no constructor, so this model cannot run
//! the shipped code. It mirrors it instead: `HeaderMirror` holds, as
//! `sluice_shm_layout::sync` atomics, every header field the attach path
//! reads, and the two functions below copy the orderings of layout.rs line
//! for line (with one shortcut, noted in `attach`). The validation is the
//! real one: `layout::check_header_bytes`.
#![cfg(loom)]
#![allow(clippy::unwrap_used)]

use loom::sync::Arc;
use loom::thread;
use sluice_shm_layout::layout::{
    check_header_bytes, AttachError, Capacities, Geometry, CLASS_RECORD_SIZE, CLIENT_RECORD_SIZE,
    COUNTER_BLOCK_SIZE, DEPS, HEADER_SIZE, LAYOUT_VERSION, MAGIC, SLOT_SIZE,
};
use sluice_shm_layout::sync::{AtomicU32, AtomicU64, Ordering};

/// The `Header` fields that `Region::initialize` writes and `attach` reads,
/// zeroed like a freshly created file.
#[derive(Default)]
struct HeaderMirror {
    magic: AtomicU64,
    layout_version: AtomicU32,
    header_size: AtomicU32,
    class_record_size: AtomicU32,
    client_record_size: AtomicU32,
    counter_block_size: AtomicU32,
    slot_size: AtomicU32,
    region_size: AtomicU64,
    generation: AtomicU64,
    epoch_ns: AtomicU64,
    cap_classes: AtomicU32,
    cap_clients: AtomicU32,
    cap_slots: AtomicU32,
    cap_tickets: AtomicU32,
    off_classes: AtomicU64,
    off_clients: AtomicU64,
    off_counters: AtomicU64,
    off_slots: AtomicU64,
    off_tickets: AtomicU64,
    cap_tenants: AtomicU32,
    cap_deps: AtomicU32,
    off_deps: AtomicU64,
    off_tiers: AtomicU64,
    off_tenants: AtomicU64,
}

/// Mirrors `Region::initialize` (layout.rs lines 779-804: every field stored
/// Relaxed) followed by `Region::publish` (lines 810-816: the version stored
/// last, with Release).
fn initialize_and_publish(h: &HeaderMirror, geo: Geometry, generation: u64, epoch_ns: u64) {
    // Relaxed, as in `initialize`: published by the version's store below.
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

    // Release, as in `publish`: pairs with the attacher's Acquire load.
    h.layout_version.store(LAYOUT_VERSION, Ordering::Release);
}

/// Mirrors `Region::attach` (layout.rs lines 752-755: the version loaded
/// with Acquire, the header copied, then `check_header_bytes`) and
/// `snapshot_header` (lines 961-992: every field Relaxed, at the same byte
/// offsets). Returns the version it loaded, and the geometry with the
/// generation and clock epoch or why the header was refused.
fn attach(h: &HeaderMirror, len: u64) -> (u32, Result<(Geometry, u64, u64), AttachError>) {
    // Acquire, as in `attach`: pairs with the creator's Release store.
    let version = h.layout_version.load(Ordering::Acquire);
    let mut b = [0u8; HEADER_SIZE];
    let mut put = |at: usize, bytes: &[u8]| b[at..at + bytes.len()].copy_from_slice(bytes);

    // Relaxed, as in `snapshot_header`: ordered by the Acquire load above.
    put(0, &h.magic.load(Ordering::Relaxed).to_le_bytes());
    put(8, &version.to_le_bytes());
    if version == 0 {
        // A shortcut layout.rs does not take: `check_header_bytes` refuses
        // any header whose version is 0 and looks only at the magic before
        // it, so no other field can change the answer. Reading them would
        // let each Relaxed load return 0 or the creator's value: 2^22 runs.
        return (version, check(&b, len));
    }
    put(12, &h.header_size.load(Ordering::Relaxed).to_le_bytes());
    put(
        16,
        &h.class_record_size.load(Ordering::Relaxed).to_le_bytes(),
    );
    put(
        20,
        &h.client_record_size.load(Ordering::Relaxed).to_le_bytes(),
    );
    put(
        24,
        &h.counter_block_size.load(Ordering::Relaxed).to_le_bytes(),
    );
    put(28, &h.slot_size.load(Ordering::Relaxed).to_le_bytes());
    put(32, &h.region_size.load(Ordering::Relaxed).to_le_bytes());
    put(40, &h.generation.load(Ordering::Relaxed).to_le_bytes());
    put(48, &h.epoch_ns.load(Ordering::Relaxed).to_le_bytes());
    put(56, &h.cap_classes.load(Ordering::Relaxed).to_le_bytes());
    put(60, &h.cap_clients.load(Ordering::Relaxed).to_le_bytes());
    put(64, &h.cap_slots.load(Ordering::Relaxed).to_le_bytes());
    put(68, &h.cap_tickets.load(Ordering::Relaxed).to_le_bytes());
    put(72, &h.off_classes.load(Ordering::Relaxed).to_le_bytes());
    put(80, &h.off_clients.load(Ordering::Relaxed).to_le_bytes());
    put(88, &h.off_counters.load(Ordering::Relaxed).to_le_bytes());
    put(96, &h.off_slots.load(Ordering::Relaxed).to_le_bytes());
    put(112, &h.off_tickets.load(Ordering::Relaxed).to_le_bytes());
    put(120, &h.cap_tenants.load(Ordering::Relaxed).to_le_bytes());
    put(124, &h.cap_deps.load(Ordering::Relaxed).to_le_bytes());
    put(256, &h.off_deps.load(Ordering::Relaxed).to_le_bytes());
    put(264, &h.off_tiers.load(Ordering::Relaxed).to_le_bytes());
    put(272, &h.off_tenants.load(Ordering::Relaxed).to_le_bytes());

    (version, check(&b, len))
}

/// The real validation, then the generation and clock epoch it does not
/// check but every attacher uses.
fn check(b: &[u8; HEADER_SIZE], len: u64) -> Result<(Geometry, u64, u64), AttachError> {
    let word = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    check_header_bytes(b, len).map(|geo| (geo, word(40), word(48)))
}

// Real event: a process attaches to a region while the daemon that just
// created the file is still writing its header.
#[test]
fn attach_sees_a_whole_header_or_none() {
    loom::model(|| {
        let caps = Capacities {
            classes: 2,
            clients: 2,
            slots: 4,
            tickets: 4,
            tenants: 8,
        };
        let geo = Geometry::new(caps).unwrap();
        let (generation, epoch_ns) = (7, 1_000);
        let header = Arc::new(HeaderMirror::default());

        let creator = {
            let h = Arc::clone(&header);
            thread::spawn(move || initialize_and_publish(&h, geo, generation, epoch_ns))
        };
        let attacher = {
            let h = Arc::clone(&header);
            thread::spawn(move || attach(&h, geo.size))
        };
        creator.join().unwrap();
        let (version, seen) = attacher.join().unwrap();

        // Published means every field is the creator's, never a zero from
        // the fresh file; unpublished means refused.
        if version == LAYOUT_VERSION {
            assert_eq!(seen, Ok((geo, generation, epoch_ns)));
        } else {
            assert_eq!(version, 0);
            assert!(
                seen.is_err(),
                "an unpublished header was accepted: {seen:?}"
            );
        }
    });
}

// Real event: a client starts while the daemon is still creating the region
// file, and must be told to wait (`NotPublished`), not to delete the file.
#[test]
fn attach_during_creation_is_refused_as_unpublished() {
    loom::model(|| {
        let geo = Geometry::new(Capacities {
            classes: 1,
            clients: 1,
            slots: 1,
            tickets: 1,
            tenants: 0,
        })
        .unwrap();
        let header = Arc::new(HeaderMirror::default());

        let creator = {
            let h = Arc::clone(&header);
            thread::spawn(move || initialize_and_publish(&h, geo, 1, 1))
        };
        let (version, seen) = attach(&header, geo.size);
        creator.join().unwrap();

        if version == 0 {
            assert_eq!(seen, Err(AttachError::NotPublished));
        }
    });
}
