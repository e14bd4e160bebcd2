//! Tenant table (placeholder until the full protocol lands): keyed records
//! in sets of 8, inserted by CAS.

#![allow(clippy::needless_range_loop)]

use crate::sync::{AtomicU32, AtomicU64, Ordering};

/// Longest tenant key, bytes.
pub const MAX_KEY_LEN: usize = 48;
/// Ways per set.
pub const WAYS: usize = 8;

/// One tenant.
#[repr(C, align(128))]
#[derive(Default)]
pub struct TenantRecord {
    /// State word.
    pub state: AtomicU64,
    /// Keyed hash.
    pub hash: AtomicU64,
    /// Key bytes.
    pub key: [AtomicU64; 6],
    /// Tier.
    pub tier: AtomicU32,
    _pad: AtomicU32,
    /// Rate bucket.
    pub tat: AtomicU64,
    /// Quota bucket.
    pub quota_tat: AtomicU64,
    /// Last use.
    pub last_used_ns: AtomicU64,
}

/// The set is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TableFull;

/// A keyed hash of `key`.
pub fn key_hash(k0: u64, k1: u64, key: &[u8]) -> u64 {
    let mut h = k0 ^ 0x9E37_79B9_7F4A_7C15;
    for &b in key {
        h = (h ^ u64::from(b))
            .wrapping_mul(0x100_0000_01B3)
            .rotate_left(5)
            ^ k1;
    }
    h
}

fn key_is(rec: &TenantRecord, key: &[u8]) -> bool {
    rec.key.iter().enumerate().all(|(i, w)| {
        let mut want = [0u8; 8];
        for (j, b) in want.iter_mut().enumerate() {
            *b = key.get(i * 8 + j).copied().unwrap_or(0);
        }
        // Relaxed: read after the Acquire load of a LIVE state.
        w.load(Ordering::Relaxed) == u64::from_le_bytes(want)
    })
}

/// Find or insert `key`.
pub fn find_or_insert(
    table: &[TenantRecord],
    hash: u64,
    key: &[u8],
    tier: u32,
    now_ns: u64,
    inserter: u32,
) -> Result<usize, TableFull> {
    let sets = table.len() / WAYS;
    if sets == 0 {
        return Err(TableFull);
    }
    let base = (hash as usize % sets) * WAYS;
    for i in base..base + WAYS {
        // Acquire pairs with the Release publish below.
        if table[i].state.load(Ordering::Acquire) == 2 && key_is(&table[i], key) {
            return Ok(i);
        }
    }
    for i in base..base + WAYS {
        let rec = &table[i];
        // AcqRel: claim.
        if rec
            .state
            .compare_exchange(
                0,
                1 | (u64::from(inserter) << 8),
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_ok()
        {
            crate::layout::write_name(&rec.key, std::str::from_utf8(key).unwrap_or(""));
            rec.hash.store(hash, Ordering::Relaxed);
            rec.tier.store(tier, Ordering::Relaxed);
            rec.tat.store(0, Ordering::Relaxed);
            rec.quota_tat.store(0, Ordering::Relaxed);
            rec.last_used_ns.store(now_ns, Ordering::Relaxed);
            // Release: publishes the fields above.
            rec.state.store(2, Ordering::Release);
            return Ok(i);
        }
    }
    Err(TableFull)
}

/// Mark a record used.
pub fn touch(rec: &TenantRecord, now_ns: u64) {
    // Relaxed: an idle-eviction hint.
    rec.last_used_ns.store(now_ns, Ordering::Relaxed);
}
