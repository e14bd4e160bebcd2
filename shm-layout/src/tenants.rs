//! Tenant table: a bounded, set-associative table of keyed quota buckets.
//!
//! # Algorithm
//!
//! The table is a slice of [`TenantRecord`]s whose length is a power of two
//! and at least [`WAYS`]. It is cut into sets of `WAYS` consecutive records;
//! a tenant key lives in the set `hash & (sets − 1)`, where `hash` is
//! [`key_hash`], SipHash-2-4 keyed with a 128-bit secret the daemon draws
//! when it creates the region. A lookup reads the eight ways of that one set
//! and nothing else: there are no probe chains, so freeing a record can never
//! hide another key, and an attacker who does not know the secret can not
//! choose keys that pile into one set (flooding).
//!
//! [`find_or_insert`] returns the index of the key's record:
//!
//! 1. *Scan* the set. A `LIVE` way holding the key is the answer. A way that
//!    is `INSERTING` with the same hash is waited for (a bounded spin) before
//!    it is judged; past the bound it counts as another key. An `EVICTING`
//!    way holding the key is taken back (*un-evicted*) by one CAS, which can
//!    only succeed while the record still holds this key (the generation in
//!    the word changes whenever a record is reused).
//! 2. *Insert* when the key is absent: claim the first `FREE` way by CAS,
//!    write hash, key, tier, both buckets full (`tat = quota_tat = 0`) and
//!    `last_used_ns`, then *publish* `INSERTING → LIVE`.
//! 3. *Settle* after every publication (insert or un-evict): re-read the set
//!    and, if more than one `LIVE` record holds the key (two processes
//!    inserted it at once), keep the lowest index and *retire* every higher
//!    copy (`LIVE → EVICTING`). The lowest copy is the answer.
//!
//! Eviction belongs to the daemon: [`evict_idle`] marks `LIVE` records unused
//! for `idle_after` as `EVICTING`; [`finish_evictions`] stamps each
//! `EVICTING` record with the time it first sees it and frees it
//! (`EVICTING → FREE`) on a pass at least the grace (normally
//! [`EVICTION_GRACE_NS`]) after the stamp. [`release_inserting`] frees the
//! `INSERTING` records of a client that died mid-insert.
//!
//! # State word
//!
//! ```text
//!  63                   32 31      24 23                 8 7        0
//! +-----------------------+----------+--------------------+----------+
//! | generation            | state    | inserter idx + 1   | flags    |
//! +-----------------------+----------+--------------------+----------+
//! ```
//!
//! `flags` bit 0 is [`FLAG_STAMPED`] (only in `EVICTING`: `marked_ns` holds
//! the daemon's stamp); the other seven bits are reserved and zero. The
//! inserter is non-zero only in `INSERTING`. Transitions, each one CAS on the
//! whole word:
//!
//! - `FREE(g) → INSERTING(g+1, inserter)`: a client claims the way.
//! - `INSERTING(g, inserter) → LIVE(g)`: it publishes, fields written.
//! - `INSERTING(g, inserter) → FREE(g)`: the daemon, the inserter being dead.
//! - `LIVE(g) → EVICTING(g)`: the daemon (idle), or any client (a duplicate
//!   copy above the lowest, in settle).
//! - `EVICTING(g) → EVICTING(g, STAMPED)`: the daemon, after storing
//!   `marked_ns`.
//! - `EVICTING(g, any) → LIVE(g)`: a client looking up that key (un-evict).
//! - `EVICTING(g, STAMPED) → FREE(g)`: the daemon, grace elapsed.
//!
//! # Invariants
//!
//! - A record's key fields are written only between its claim and its
//!   publication, so a `LIVE` or `EVICTING` word of generation `g` names one
//!   key for as long as it keeps generation `g`. Readers check the key and
//!   then re-read the word (a sequence-lock read): a match is a match of that
//!   incarnation.
//! - Once every settle has finished, a key has at most one `LIVE` record.
//!   Each settle opens with a `SeqCst` fence after its publication; of two
//!   copies, the settle behind the later fence reads the other copy as
//!   `LIVE` and retires the higher one. The lowest copy is never retired by
//!   a settle.
//! - *Grace.* An index returned by [`find_or_insert`] holds that key (in
//!   `LIVE` or `EVICTING`) for at least the grace after the lookup: a record
//!   is freed only by a daemon pass a grace after the daemon first saw it
//!   `EVICTING`, and a lookup never returns an `EVICTING` record without
//!   first taking it back to `LIVE`. This is a timing assumption: the caller
//!   uses the index for one request (take its tokens, at once) and looks the
//!   key up again for the next; a process stopped for longer than the grace
//!   between lookup and take could charge a tenant that reused the record.
//!
//! # Who writes what
//!
//! | field                          | written by                               |
//! |--------------------------------|------------------------------------------|
//! | `state`                        | clients (claim, publish, un-evict, retire); daemon (mark, stamp, free, release) |
//! | `hash`, `key`, `key_len`, `tier` | the inserter, while `INSERTING`        |
//! | `tat`, `quota_tat`             | the inserter (0); then any client's `take` |
//! | `last_used_ns`                 | the inserter; any client ([`touch`])    |
//! | `marked_ns`                    | the daemon only                          |
//!
//! # Progress
//!
//! Lookups, inserts, settles and daemon passes are lock-free: every retry
//! follows a CAS another process won. The one wait is the bounded spin on a
//! way `INSERTING` the same hash; after it the lookup goes on without that
//! way.
//!
//! # Crashes
//!
//! A client that dies
//!
//! - after its claim, before its publication, leaves `INSERTING(it)`: lookups
//!   of that hash spin out their bound and pass it by, and the daemon's
//!   [`release_inserting`] frees it when it reclaims the client;
//! - after its publication, before its settle, may leave a second `LIVE` copy
//!   of a key at a higher index than a copy another process settled before:
//!   every lookup stops at the lower copy, so the higher one is never used,
//!   goes idle and is evicted;
//! - anywhere else, leaves nothing (un-evict, retire and the bucket takes are
//!   single CASes).
//!
//! A daemon that dies leaves marks and stamps, which are plain state the next
//! daemon continues from; `marked_ns` is stored before the CAS that stamps,
//! so a stamped record always carries its stamp.
//!
//! # The two buckets of a tier
//!
//! A tier has a rate bucket on `tat` (`rate`, `burst`) and a quota bucket on
//! `quota_tat` (rate `quota / period`, burst `quota`: a GCRA bucket, so no
//! window edge lets twice the quota through). The caller checks them with
//! [`crate::bucket::RateParams`], in this order:
//!
//! 1. `decide` on the quota bucket (a read, no write): red refuses `quota`
//!    with its retry-after (`blocked_by_quota` for a waiter), `Never` refuses
//!    `smaller_scope`;
//! 2. `take` on the rate bucket: red refuses `not_now` with its retry-after;
//! 3. `take` on the quota bucket: red refuses `quota` with its retry-after.
//!
//! Tokens are time and are never given back: a `take` only moves its `tat`
//! forward, so no order of checks can mint tokens; the order only decides
//! what a refused request may have spent. A refusal at step 1 or 2 spends
//! nothing. Step 3 refuses only when a concurrent request took the last of
//! the quota between steps 1 and 3 (rare: the quota must be nearly gone),
//! and then what was spent is rate tokens, which come back within
//! `burst / rate`. The opposite order (decide on the rate, take the quota,
//! then the rate) would spend long-period quota each time a tenant at its
//! rate limit loses the step-3 race, which happens all the time at that
//! limit.
//!
//! Set `idle_after` no shorter than the longest `period`: an evicted key comes
//! back with full buckets.
//!
//! Two processes inserting the same new key at the same moment may each take
//! tokens from their own fresh copy before settle keeps one: settle carries
//! the retired copy's spending over (the later `tat` of each bucket), and a
//! client re-checks its record after taking and retries on the kept copy.

use crate::sync::{fence, AtomicU32, AtomicU64, Ordering};

/// Records per set: a key may live in any of the ways of its set.
pub const WAYS: usize = 8;

/// Longest tenant key, in bytes. Longer keys are a usage error (the config
/// loader refuses them).
pub const MAX_KEY_LEN: usize = 48;

/// Words of a record's key.
const KEY_WORDS: usize = MAX_KEY_LEN / 8;

/// Default time between the daemon first seeing a record `EVICTING` and
/// freeing it: far longer than any lookup-to-take of a running process.
pub const EVICTION_GRACE_NS: u64 = 1_000_000_000;

/// State: unused.
pub const TN_FREE: u64 = 0;
/// State: claimed by an inserter that is writing the fields.
pub const TN_INSERTING: u64 = 1;
/// State: holds a key; lookups use it.
pub const TN_LIVE: u64 = 2;
/// State: idle or a duplicate; still holds its key, freed after the grace.
pub const TN_EVICTING: u64 = 3;

/// Flag (in `EVICTING`): `marked_ns` holds the daemon's stamp.
pub const FLAG_STAMPED: u64 = 1;

const GEN_SHIFT: u32 = 32;
const STATE_SHIFT: u32 = 24;
const INSERTER_SHIFT: u32 = 8;
const FLAGS_MASK: u64 = 0xFF;

/// Rounds of the bounded wait on a way `INSERTING` the same hash. An insert
/// is a few dozen stores, so a live inserter finishes well within the bound;
/// one that has died or been descheduled is passed by.
#[cfg(not(loom))]
const INSERT_WAIT_ROUNDS: u32 = 64;
/// Under loom a round yields; two are enough to explore both outcomes.
#[cfg(loom)]
const INSERT_WAIT_ROUNDS: u32 = 2;

/// One tenant: its key, its tier and its two buckets.
#[repr(C, align(128))]
#[derive(Debug, Default)]
pub struct TenantRecord {
    /// Packed state word, see the module doc.
    pub state: AtomicU64,
    /// [`key_hash`] of the key.
    pub hash: AtomicU64,
    /// The key's bytes, little-endian, NUL padded.
    pub key: [AtomicU64; KEY_WORDS],
    /// Index of the key's tier in the config.
    pub tier: AtomicU32,
    /// Length of the key in bytes (so `a` and `a\0` differ).
    pub key_len: AtomicU32,
    /// Rate bucket (GCRA `tat`, fixed point).
    pub tat: AtomicU64,
    /// Long-period quota bucket (GCRA `tat`, fixed point).
    pub quota_tat: AtomicU64,
    /// CLOCK_MONOTONIC ns of the last lookup.
    pub last_used_ns: AtomicU64,
    /// CLOCK_MONOTONIC ns of the daemon's stamp (valid with [`FLAG_STAMPED`]).
    pub marked_ns: AtomicU64,
    _reserved: [AtomicU64; 3],
}

#[cfg(not(loom))]
const _: () = {
    assert!(std::mem::size_of::<TenantRecord>() == 128);
    assert!(std::mem::align_of::<TenantRecord>() == 128);
};

/// A decoded state word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TenantWord {
    /// Incarnation of the record; bumped by each claim.
    pub generation: u32,
    /// One of the `TN_*` constants.
    pub state: u64,
    /// Inserter's client index + 1 while `INSERTING`, else 0.
    pub inserter: u32,
    /// `FLAG_*` bits.
    pub flags: u64,
}

impl TenantWord {
    /// Unpack.
    pub fn decode(w: u64) -> Self {
        Self {
            generation: (w >> GEN_SHIFT) as u32,
            state: (w >> STATE_SHIFT) & 0xFF,
            inserter: ((w >> INSERTER_SHIFT) & 0xFFFF) as u32,
            flags: w & FLAGS_MASK,
        }
    }

    /// Pack.
    pub fn encode(self) -> u64 {
        (u64::from(self.generation) << GEN_SHIFT)
            | ((self.state & 0xFF) << STATE_SHIFT)
            | (u64::from(self.inserter & 0xFFFF) << INSERTER_SHIFT)
            | (self.flags & FLAGS_MASK)
    }

    /// The same incarnation in `state`, with no inserter and no flags.
    fn plain(self, state: u64) -> Self {
        Self {
            state,
            inserter: 0,
            flags: 0,
            ..self
        }
    }
}

/// The key's set has no free way and does not hold the key; the caller
/// applies `on_full` (refuse, or the shared overflow bucket).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("tenant set {set} is full: all {ways} ways hold other keys", ways = WAYS)]
pub struct TableFull {
    /// The set that was full.
    pub set: usize,
}

/// A live tenant, for stats.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveTenant {
    /// Record index.
    pub index: usize,
    /// The key (invalid UTF-8 replaced).
    pub key: String,
    /// Tier index.
    pub tier: u32,
    /// CLOCK_MONOTONIC ns of the last lookup.
    pub last_used_ns: u64,
}

/// What a lookup compares: the hash and the packed key.
#[derive(Clone, Copy)]
struct Probe {
    hash: u64,
    len: u32,
    words: [u64; KEY_WORDS],
}

/// What a scan of one set found (indices within the set).
enum Scan {
    /// A `LIVE` way holds the key.
    Live(usize),
    /// An `EVICTING` way holds the key; its word as read.
    Evicting(usize, u64),
    /// The key is absent; the first `FREE` way and its word, if any.
    Absent(Option<(usize, u64)>),
}

/// SipHash-2-4 of `key` under the 128-bit secret `(k0, k1)` (Aumasson and
/// Bernstein, "SipHash: a fast short-input PRF", 2012).
pub fn key_hash(k0: u64, k1: u64, key: &[u8]) -> u64 {
    let mut v = [
        k0 ^ 0x736f_6d65_7073_6575,
        k1 ^ 0x646f_7261_6e64_6f6d,
        k0 ^ 0x6c79_6765_6e65_7261,
        k1 ^ 0x7465_6462_7974_6573,
    ];
    let mut chunks = key.chunks_exact(8);
    for chunk in &mut chunks {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        sip_compress(&mut v, u64::from_le_bytes(b));
    }

    // The last block: the remaining bytes, and the length mod 256 on top.
    let rest = chunks.remainder();
    let mut b = [0u8; 8];
    b[..rest.len()].copy_from_slice(rest);
    let last = u64::from_le_bytes(b) | ((key.len() as u64 & 0xFF) << 56);
    sip_compress(&mut v, last);

    v[2] ^= 0xFF;
    for _ in 0..4 {
        sip_round(&mut v);
    }
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

/// Absorb one message word: two rounds.
fn sip_compress(v: &mut [u64; 4], m: u64) {
    v[3] ^= m;
    sip_round(v);
    sip_round(v);
    v[0] ^= m;
}

/// One SipRound.
fn sip_round(v: &mut [u64; 4]) {
    v[0] = v[0].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(13) ^ v[0];
    v[0] = v[0].rotate_left(32);
    v[2] = v[2].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(16) ^ v[2];
    v[0] = v[0].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(21) ^ v[0];
    v[2] = v[2].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(17) ^ v[2];
    v[2] = v[2].rotate_left(32);
}

/// The set a hash falls in. Always a valid set of `table` when it holds at
/// least one set: `hash & (sets − 1)` is at most `sets − 1`.
pub fn set_index(table: &[TenantRecord], hash: u64) -> usize {
    let sets = table.len() / WAYS;
    debug_assert!(
        sets.is_power_of_two(),
        "tenant table of {} records is not a power-of-two number of sets",
        table.len()
    );
    (hash as usize) & sets.saturating_sub(1)
}

/// Pack a key into words.
fn probe(hash: u64, key: &[u8]) -> Probe {
    assert!(
        key.len() <= MAX_KEY_LEN,
        "tenant key of {} bytes is longer than {MAX_KEY_LEN}: the caller must refuse it",
        key.len()
    );
    let mut words = [0u64; KEY_WORDS];
    for (w, chunk) in words.iter_mut().zip(key.chunks(8)) {
        let mut b = [0u8; 8];
        b[..chunk.len()].copy_from_slice(chunk);
        *w = u64::from_le_bytes(b);
    }
    Probe {
        hash,
        len: key.len() as u32,
        words,
    }
}

/// True when `rec`, seen as `seen`, holds the probed key, and still did after
/// the key was read (so the answer belongs to that incarnation).
fn holds(rec: &TenantRecord, seen: u64, p: &Probe) -> bool {
    // Relaxed (all field loads): ordered after the Acquire load that
    // returned `seen`, which pairs with the publication and so shows this
    // incarnation's fields; a reuse racing with us is caught below.
    if rec.hash.load(Ordering::Relaxed) != p.hash || rec.key_len.load(Ordering::Relaxed) != p.len {
        return false;
    }
    for (w, &want) in rec.key.iter().zip(&p.words) {
        if w.load(Ordering::Relaxed) != want {
            return false;
        }
    }
    // Acquire fence pairs with the Release fence a claimer issues before it
    // writes new fields: if any load above read a newer incarnation's field,
    // the re-read below sees that claim (a new generation) or later.
    fence(Ordering::Acquire);
    // Relaxed: ordered by the fence above.
    rec.state.load(Ordering::Relaxed) == seen
}

/// Wait (bounded) for a way seen `INSERTING` as `seen` to move on. Returns the
/// word it moved to, or `seen` when it did not move within the bound.
fn wait_for_insert(rec: &TenantRecord, seen: u64) -> u64 {
    let backoff = crossbeam_utils::Backoff::new();
    for _ in 0..INSERT_WAIT_ROUNDS {
        crate::sync::spin_hint(&backoff);
        // Acquire pairs with the inserter's Release publication: seeing LIVE
        // shows its fields.
        let now = rec.state.load(Ordering::Acquire);
        if now != seen {
            return now;
        }
    }
    seen
}

/// Read one set and say where the key is.
fn scan(set: &[TenantRecord], p: &Probe) -> Scan {
    let mut free = None;
    for (way, rec) in set.iter().enumerate() {
        // Acquire pairs with the Release publication (or un-evict) of this
        // way: the fields `holds` reads are this incarnation's.
        let mut seen = rec.state.load(Ordering::Acquire);
        let mut waited = false;
        loop {
            let w = TenantWord::decode(seen);
            match w.state {
                TN_FREE if free.is_none() => free = Some((way, seen)),
                // Relaxed: a hint. The hash is written after the claim, so it
                // may be a previous key's; missing a same-key insert this way
                // only makes a duplicate, which settle removes.
                TN_INSERTING if !waited && rec.hash.load(Ordering::Relaxed) == p.hash => {
                    waited = true;
                    let next = wait_for_insert(rec, seen);
                    if next != seen {
                        seen = next;
                        continue;
                    }
                }
                TN_LIVE if holds(rec, seen, p) => return Scan::Live(way),
                TN_EVICTING if holds(rec, seen, p) => return Scan::Evicting(way, seen),
                _ => {}
            }
            break;
        }
    }
    Scan::Absent(free)
}

/// Record a use of `rec` at `now_ns`, for the daemon's idle test.
///
/// A plain store, not a maximum: a process whose clock reading is a little
/// old may move the stamp back by its own lag (microseconds), against an
/// `idle_after` of minutes or days. At worst a record is marked a little
/// early, which is harmless: its next lookup takes it back, and an index
/// already handed out stays valid for the grace.
pub fn touch(rec: &TenantRecord, now_ns: u64) {
    // Relaxed: read only by the daemon's idle test, as a hint (above).
    rec.last_used_ns.store(now_ns, Ordering::Relaxed);
}

/// Find the `LIVE` record of `key` in `table`, inserting it (tier `tier`,
/// both buckets full) if absent. `hash` is [`key_hash`] of `key` under the
/// region's secret; `inserter` is the caller's client-registry index.
///
/// The index is for one request: take its tokens now, and look the key up
/// again for the next request (see *Grace* in the module doc).
///
/// # Panics
///
/// If `key` is longer than [`MAX_KEY_LEN`] (a usage error the config loader
/// and the client API refuse earlier).
pub fn find_or_insert(
    table: &[TenantRecord],
    hash: u64,
    key: &[u8],
    tier: u32,
    now_ns: u64,
    inserter: u32,
) -> Result<usize, TableFull> {
    debug_assert!(inserter < 0xFFFF, "client index {inserter} out of range");
    let p = probe(hash, key);
    let set = set_index(table, hash);
    let base = set * WAYS;
    let Some(ways) = table.get(base..base + WAYS) else {
        return Err(TableFull { set });
    };
    loop {
        match scan(ways, &p) {
            Scan::Live(way) => {
                touch(&ways[way], now_ns);
                return Ok(base + way);
            }
            Scan::Evicting(way, seen) => {
                let rec = &ways[way];
                // Before the un-evict, so the daemon reads a fresh stamp with
                // the LIVE word and does not mark it again at once.
                touch(rec, now_ns);
                let live = TenantWord::decode(seen).plain(TN_LIVE).encode();
                // AcqRel: Release publishes the `touch` above to the daemon's
                // Acquire load in `evict_idle`; Acquire pairs with the Release
                // of the daemon's stamp. It races with the daemon's stamp and
                // free, CASes from the same `seen`: exactly one wins, and a
                // free wins only before we use the record. Relaxed on
                // failure: we scan again.
                if rec
                    .state
                    .compare_exchange(seen, live, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
                {
                    return Ok(settle(ways, base, way, &p));
                }
            }
            Scan::Absent(None) => return Err(TableFull { set }),
            Scan::Absent(Some((way, seen))) => {
                let rec = &ways[way];
                let claimed = TenantWord {
                    generation: TenantWord::decode(seen).generation.wrapping_add(1),
                    state: TN_INSERTING,
                    inserter: inserter + 1,
                    flags: 0,
                };
                // AcqRel: Acquire pairs with the Release of the CAS that freed
                // the way (the old incarnation is over before we write);
                // Release makes the inserter visible to the daemon's
                // `release_inserting`. Relaxed on failure: we scan again.
                if rec
                    .state
                    .compare_exchange(seen, claimed.encode(), Ordering::AcqRel, Ordering::Relaxed)
                    .is_err()
                {
                    continue;
                }
                crate::crash_point!(Err(TableFull { set }));

                // Release fence pairs with the Acquire fence in `holds`: a
                // reader that reads any field stored below also sees the
                // claim, so it never takes a half-written key for a match.
                fence(Ordering::Release);
                // Relaxed (all field stores): published by the Release CAS
                // below to whoever reads LIVE.
                rec.hash.store(hash, Ordering::Relaxed);
                for (w, &v) in rec.key.iter().zip(&p.words) {
                    w.store(v, Ordering::Relaxed);
                }
                rec.key_len.store(p.len, Ordering::Relaxed);
                rec.tier.store(tier, Ordering::Relaxed);
                rec.tat.store(0, Ordering::Relaxed);
                rec.quota_tat.store(0, Ordering::Relaxed);
                rec.last_used_ns.store(now_ns, Ordering::Relaxed);
                crate::crash_point!(Err(TableFull { set }));

                let live = claimed.plain(TN_LIVE).encode();
                // Release: publishes the fields above to every Acquire load of
                // the word (scans, settles, the daemon); settle's SeqCst fence
                // orders it against other publications. A CAS, not a store: if
                // the daemon released the claim (it took us for dead), we must
                // not resurrect it. Relaxed on failure: we start over.
                if rec
                    .state
                    .compare_exchange(claimed.encode(), live, Ordering::Release, Ordering::Relaxed)
                    .is_err()
                {
                    continue;
                }
                crate::crash_point!(Err(TableFull { set }));
                return Ok(settle(ways, base, way, &p));
            }
        }
    }
}

/// After publishing `me`: keep the lowest `LIVE` copy of the key in the set,
/// retire the higher ones, and return the kept index.
fn settle(ways: &[TenantRecord], base: usize, me: usize, p: &Probe) -> usize {
    // SeqCst fence pairs with the same fence in every other settle: our
    // publication is sequenced before ours, theirs before theirs, and of two
    // SeqCst fences one comes first in the single total order, so the settle
    // behind the later fence reads the other copy's publication (or a later
    // value of its word). Without the fences, the publications and these
    // loads would all have to be SeqCst for the same argument.
    fence(Ordering::SeqCst);
    let mut lowest = None;
    let mut copies = [None; WAYS];
    for (way, rec) in ways.iter().enumerate() {
        // Acquire pairs with the publication (or un-evict) of that way: its
        // key fields are visible to `holds`.
        let seen = rec.state.load(Ordering::Acquire);
        if TenantWord::decode(seen).state == TN_LIVE && holds(rec, seen, p) {
            copies[way] = Some(seen);
            lowest.get_or_insert(way);
        }
    }
    let Some(lowest) = lowest else {
        // Every copy, ours included, was retired or marked meanwhile: ours
        // still holds the key for the grace, which is all one request needs.
        return base + me;
    };
    for (way, seen) in copies.iter().enumerate().skip(lowest + 1) {
        if let Some(seen) = *seen {
            let retired = TenantWord::decode(seen).plain(TN_EVICTING).encode();
            // Relaxed: nothing new is published (the fields went out with
            // LIVE, and this CAS continues that word's release sequence, so
            // an Acquire reader of EVICTING still sees them). Failure means
            // someone else retired or evicted it already: what we wanted.
            let _ = ways[way].state.compare_exchange(
                seen,
                retired,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            // What was spent on the retired copy stays spent: the kept copy
            // takes the later of the two `tat`s of each bucket, so a racer
            // that charged the copy before it was retired is counted. A
            // racer that charged it after sees EVICTING on its re-check
            // (SeqCst, see the client) and tries again on the kept copy.
            // SeqCst: ordered after the retire above, against the racer's
            // SeqCst take-then-check.
            fence(Ordering::SeqCst);
            for (kept, gone) in [
                (&ways[lowest].tat, &ways[way].tat),
                (&ways[lowest].quota_tat, &ways[way].quota_tat),
            ] {
                let spent = gone.load(Ordering::SeqCst);
                let _ = kept.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| {
                    (spent > t).then_some(spent)
                });
            }
        }
    }
    base + lowest
}

/// Daemon: mark `LIVE` records unused for at least `idle_ns` as `EVICTING`.
/// Returns how many it marked.
pub fn evict_idle(table: &[TenantRecord], now_ns: u64, idle_ns: u64) -> u32 {
    let mut marked = 0;
    for rec in table {
        // Acquire pairs with the publication or un-evict (Release) that made
        // it LIVE: the `touch` done before an un-evict is visible.
        let seen = rec.state.load(Ordering::Acquire);
        if TenantWord::decode(seen).state != TN_LIVE {
            continue;
        }
        // Relaxed: a hint (see `touch`); the CAS below decides.
        let last = rec.last_used_ns.load(Ordering::Relaxed);
        if now_ns.saturating_sub(last) < idle_ns {
            continue;
        }
        let evicting = TenantWord::decode(seen).plain(TN_EVICTING).encode();
        // Relaxed: as for a retire in `settle`, nothing is published; the
        // grace is counted from the daemon's own later stamp, and a lookup
        // acts on EVICTING only through a CAS, which reads the latest word.
        // Relaxed on failure: it changed, leave it.
        if rec
            .state
            .compare_exchange(seen, evicting, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            marked += 1;
        }
    }
    marked
}

/// Daemon: stamp every unstamped `EVICTING` record with `now_ns`, and free
/// every stamped one whose stamp is at least `grace_ns` old (normally
/// [`EVICTION_GRACE_NS`]). Call it on every maintenance tick; a record is
/// freed on the first tick a grace after the tick that stamped it. Returns
/// how many it freed.
pub fn finish_evictions(table: &[TenantRecord], now_ns: u64, grace_ns: u64) -> u32 {
    let mut freed = 0;
    for rec in table {
        // Acquire pairs with the Release part of the CAS that stamped it
        // (possibly a previous daemon's): its `marked_ns` is visible.
        let seen = rec.state.load(Ordering::Acquire);
        let w = TenantWord::decode(seen);
        if w.state != TN_EVICTING {
            continue;
        }
        if w.flags & FLAG_STAMPED == 0 {
            // Relaxed: published by the CAS below. If the CAS fails, the
            // stamp of a record that is not stamped is never read.
            rec.marked_ns.store(now_ns, Ordering::Relaxed);
            let stamped = TenantWord {
                flags: w.flags | FLAG_STAMPED,
                ..w
            };
            // Release: publishes `marked_ns` with the flag. Relaxed on
            // failure: a lookup took it back, or it changed; next tick.
            let _ = rec.state.compare_exchange(
                seen,
                stamped.encode(),
                Ordering::Release,
                Ordering::Relaxed,
            );
            continue;
        }
        // Relaxed: ordered after the Acquire load above.
        if now_ns.saturating_sub(rec.marked_ns.load(Ordering::Relaxed)) < grace_ns {
            continue;
        }
        crate::crash_point!(freed);
        let free = w.plain(TN_FREE).encode();
        // AcqRel: Release pairs with the next claimer's Acquire (this
        // incarnation is over before the next one writes); it races with a
        // lookup's un-evict of the same `seen` word, and exactly one wins.
        if rec
            .state
            .compare_exchange(seen, free, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            freed += 1;
        }
    }
    freed
}

/// Daemon: free the `INSERTING` records of client `inserter`, which died
/// mid-insert (call it before that client's record is reused). Returns how
/// many it freed. Safe to repeat.
pub fn release_inserting(table: &[TenantRecord], inserter: u32) -> u32 {
    let mut freed = 0;
    for rec in table {
        // Acquire: pairs with the claim's Release (the inserter bits).
        let seen = rec.state.load(Ordering::Acquire);
        let w = TenantWord::decode(seen);
        if w.state != TN_INSERTING || w.inserter != (inserter + 1) & 0xFFFF {
            continue;
        }
        // AcqRel, as for any free: the next claimer's Acquire pairs with it.
        // It keeps the generation: the next claim bumps it. Relaxed on
        // failure: it changed, so it was not a dead insert.
        if rec
            .state
            .compare_exchange(
                seen,
                w.plain(TN_FREE).encode(),
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_ok()
        {
            freed += 1;
        }
    }
    freed
}

/// The `LIVE` tenants, for stats. A racy snapshot: each record is read once
/// and kept only if its word did not change while its fields were read, so a
/// tenant inserted or evicted during the walk may be missing, which is the
/// same as the walk happening a moment earlier or later.
pub fn live(table: &[TenantRecord]) -> impl Iterator<Item = LiveTenant> + '_ {
    table.iter().enumerate().filter_map(|(index, rec)| {
        // Acquire pairs with the publication: the fields are visible.
        let seen = rec.state.load(Ordering::Acquire);
        if TenantWord::decode(seen).state != TN_LIVE {
            return None;
        }
        // Relaxed (fields): validated by the fence and re-read below.
        let len = (rec.key_len.load(Ordering::Relaxed) as usize).min(MAX_KEY_LEN);
        let mut bytes = [0u8; MAX_KEY_LEN];
        for (chunk, w) in bytes.chunks_mut(8).zip(&rec.key) {
            chunk.copy_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
        }
        let tier = rec.tier.load(Ordering::Relaxed);
        let last_used_ns = rec.last_used_ns.load(Ordering::Relaxed);
        // Acquire fence pairs with the claimer's Release fence, as in `holds`.
        fence(Ordering::Acquire);
        // Relaxed: ordered by the fence.
        if rec.state.load(Ordering::Relaxed) != seen {
            return None;
        }
        Some(LiveTenant {
            index,
            key: String::from_utf8_lossy(&bytes[..len]).into_owned(),
            tier,
            last_used_ns,
        })
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    // Covers the tenant table on heap records: SipHash-2-4 against the
    // published vectors and std's implementation, the record's size, the
    // state word, insert/lookup, sets filling up, eviction with its grace,
    // un-evict, settle of duplicates, release of a dead inserter's claims,
    // the bounded wait on a stuck insert, flooding resistance, and a
    // four-thread insert stress.

    use super::*;
    use proptest::prelude::*;

    const K0: u64 = 0x0706_0504_0302_0100;
    const K1: u64 = 0x0f0e_0d0c_0b0a_0908;
    const SEC: u64 = 1_000_000_000;

    fn table(n: usize) -> Vec<TenantRecord> {
        (0..n).map(|_| TenantRecord::default()).collect()
    }

    fn word(rec: &TenantRecord) -> TenantWord {
        TenantWord::decode(rec.state.load(Ordering::Relaxed))
    }

    fn insert(t: &[TenantRecord], key: &str, now: u64) -> Result<usize, TableFull> {
        find_or_insert(
            t,
            key_hash(K0, K1, key.as_bytes()),
            key.as_bytes(),
            1,
            now,
            0,
        )
    }

    fn live_keys(t: &[TenantRecord]) -> Vec<(usize, String)> {
        live(t).map(|l| (l.index, l.key)).collect()
    }

    /// Write a record by hand in `state` holding `key` under `hash`.
    fn plant(rec: &TenantRecord, state: TenantWord, hash: u64, key: &str) {
        let p = probe(hash, key.as_bytes());
        rec.hash.store(hash, Ordering::Relaxed);
        for (w, &v) in rec.key.iter().zip(&p.words) {
            w.store(v, Ordering::Relaxed);
        }
        rec.key_len.store(p.len, Ordering::Relaxed);
        rec.state.store(state.encode(), Ordering::Relaxed);
    }

    #[test]
    fn siphash_matches_the_published_vectors() {
        // The paper's appendix: key 00..0f, message 00..0e.
        let msg: Vec<u8> = (0..15).collect();
        assert_eq!(key_hash(K0, K1, &msg), 0xa129_ca61_49be_45e5);
        // vectors_sip64[0] of the reference code: the empty message.
        assert_eq!(key_hash(K0, K1, &[]), 0x726f_db47_dd0e_0e31);
    }

    #[allow(deprecated)]
    fn std_siphash(k0: u64, k1: u64, msg: &[u8]) -> u64 {
        use std::hash::Hasher;
        let mut h = std::hash::SipHasher::new_with_keys(k0, k1);
        h.write(msg);
        h.finish()
    }

    proptest! {
        #[test]
        fn siphash_agrees_with_std(
            k0 in any::<u64>(),
            k1 in any::<u64>(),
            msg in proptest::collection::vec(any::<u8>(), 0..80),
        ) {
            prop_assert_eq!(key_hash(k0, k1, &msg), std_siphash(k0, k1, &msg));
        }

        #[test]
        fn state_word_round_trips(
            generation in any::<u32>(),
            state in 0u64..4,
            inserter in 0u32..0x1_0000,
            flags in 0u64..0x100,
        ) {
            let w = TenantWord { generation, state, inserter, flags };
            prop_assert_eq!(TenantWord::decode(w.encode()), w);
        }
    }

    #[test]
    fn record_is_one_128_byte_line_of_atomics() {
        assert_eq!(std::mem::size_of::<TenantRecord>(), 128);
        assert_eq!(std::mem::align_of::<TenantRecord>(), 128);
        let r = TenantRecord::default();
        assert_eq!(word(&r).state, TN_FREE);
    }

    #[test]
    fn insert_then_lookup_returns_the_same_live_record() {
        let t = table(16);
        let i = insert(&t, "acme", 5).unwrap();
        let w = word(&t[i]);
        assert_eq!(
            (w.state, w.generation, w.inserter, w.flags),
            (TN_LIVE, 1, 0, 0)
        );
        assert_eq!(t[i].tier.load(Ordering::Relaxed), 1);
        assert_eq!(t[i].last_used_ns.load(Ordering::Relaxed), 5);
        t[i].tat.store(777, Ordering::Relaxed);
        assert_eq!(insert(&t, "acme", 9).unwrap(), i);
        assert_eq!(
            t[i].last_used_ns.load(Ordering::Relaxed),
            9,
            "a hit touches"
        );
        assert_eq!(
            t[i].tat.load(Ordering::Relaxed),
            777,
            "a hit keeps the bucket"
        );
        assert_eq!(live_keys(&t), vec![(i, "acme".to_string())]);
        let set = set_index(&t, key_hash(K0, K1, b"acme"));
        assert_eq!(i / WAYS, set);
    }

    #[test]
    fn keys_in_one_set_get_their_own_ways_until_it_is_full() {
        // One set: every key lands in it, whatever its hash.
        let t = table(WAYS);
        let keys: Vec<String> = (0..WAYS).map(|i| format!("tenant-{i}")).collect();
        let idx: Vec<usize> = keys.iter().map(|k| insert(&t, k, 1).unwrap()).collect();
        assert_eq!(idx, (0..WAYS).collect::<Vec<_>>());
        for (k, &i) in keys.iter().zip(&idx) {
            assert_eq!(insert(&t, k, 2).unwrap(), i, "{k}");
        }
        let err = insert(&t, "one-too-many", 3).unwrap_err();
        assert_eq!(err, TableFull { set: 0 });
        assert_eq!(
            err.to_string(),
            "tenant set 0 is full: all 8 ways hold other keys"
        );
        assert_eq!(live(&t).count(), WAYS);
    }

    #[test]
    fn keys_that_differ_only_in_trailing_nuls_or_length_are_different() {
        let t = table(WAYS);
        // Same hash on purpose: only the stored key and length tell them apart.
        let a = find_or_insert(&t, 42, b"a", 0, 1, 0).unwrap();
        let a0 = find_or_insert(&t, 42, b"a\0", 0, 1, 0).unwrap();
        let long = [b'x'; MAX_KEY_LEN];
        let l = find_or_insert(&t, 42, &long, 0, 1, 0).unwrap();
        assert_eq!(vec![a, a0, l], vec![0, 1, 2]);
        assert_eq!(find_or_insert(&t, 42, &long, 0, 1, 0).unwrap(), 2);
        assert_eq!(find_or_insert(&t, 42, b"", 0, 1, 0).unwrap(), 3);
    }

    #[test]
    #[should_panic(expected = "longer than 48")]
    fn a_key_longer_than_the_limit_is_a_usage_error() {
        let t = table(WAYS);
        let _ = find_or_insert(&t, 1, &[b'k'; MAX_KEY_LEN + 1], 0, 1, 0);
    }

    #[test]
    fn idle_record_is_evicted_after_the_grace_and_comes_back_fresh() {
        let t = table(16);
        let i = insert(&t, "acme", SEC).unwrap();
        let busy = insert(&t, "busy", SEC).unwrap();
        t[i].tat.store(123, Ordering::Relaxed);
        t[i].quota_tat.store(456, Ordering::Relaxed);
        touch(&t[busy], 10 * SEC);

        assert_eq!(evict_idle(&t, 10 * SEC, 9 * SEC), 1);
        assert_eq!(word(&t[i]).state, TN_EVICTING);
        assert_eq!(word(&t[busy]).state, TN_LIVE);
        // First pass stamps, a pass inside the grace frees nothing.
        assert_eq!(finish_evictions(&t, 11 * SEC, EVICTION_GRACE_NS), 0);
        assert_eq!(word(&t[i]).flags, FLAG_STAMPED);
        assert_eq!(t[i].marked_ns.load(Ordering::Relaxed), 11 * SEC);
        assert_eq!(finish_evictions(&t, 12 * SEC - 1, EVICTION_GRACE_NS), 0);
        assert_eq!(finish_evictions(&t, 12 * SEC, EVICTION_GRACE_NS), 1);
        let w = word(&t[i]);
        assert_eq!((w.state, w.generation, w.flags), (TN_FREE, 1, 0));
        assert_eq!(live_keys(&t), vec![(busy, "busy".to_string())]);

        // The next lookup inserts anew: new generation, full buckets.
        let j = insert(&t, "acme", 13 * SEC).unwrap();
        assert_eq!(j, i, "the first free way of its set");
        assert_eq!(word(&t[j]).generation, 2);
        assert_eq!(t[j].tat.load(Ordering::Relaxed), 0);
        assert_eq!(t[j].quota_tat.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn lookup_takes_back_a_marked_record_and_the_daemon_leaves_it() {
        let t = table(16);
        let i = insert(&t, "acme", SEC).unwrap();
        t[i].tat.store(999, Ordering::Relaxed);
        assert_eq!(evict_idle(&t, 10 * SEC, SEC), 1);
        assert_eq!(finish_evictions(&t, 10 * SEC, EVICTION_GRACE_NS), 0);
        assert_eq!(word(&t[i]).flags, FLAG_STAMPED);

        assert_eq!(insert(&t, "acme", 10 * SEC + 5).unwrap(), i);
        let w = word(&t[i]);
        assert_eq!((w.state, w.generation, w.flags), (TN_LIVE, 1, 0));
        assert_eq!(
            t[i].tat.load(Ordering::Relaxed),
            999,
            "same bucket, not a new one"
        );
        assert_eq!(t[i].last_used_ns.load(Ordering::Relaxed), 10 * SEC + 5);
        // Long past the grace: it is LIVE and fresh, so nothing happens.
        assert_eq!(finish_evictions(&t, 20 * SEC, EVICTION_GRACE_NS), 0);
        assert_eq!(evict_idle(&t, 10 * SEC + 6, SEC), 0);
        assert_eq!(word(&t[i]).state, TN_LIVE);
    }

    #[test]
    fn lookup_does_not_take_back_another_keys_marked_record() {
        let t = table(WAYS);
        let other = find_or_insert(&t, 7, b"other", 0, 0, 0).unwrap();
        assert_eq!(evict_idle(&t, 10 * SEC, SEC), 1);
        // Same hash, different key: inserted beside it, the mark stays.
        let mine = find_or_insert(&t, 7, b"mine", 0, 10 * SEC, 0).unwrap();
        assert_ne!(mine, other);
        assert_eq!(word(&t[other]).state, TN_EVICTING);
    }

    #[test]
    fn settle_keeps_the_lowest_copy_and_retires_the_rest() {
        let t = table(WAYS);
        let h = 99;
        let g = |generation, state| TenantWord {
            generation,
            state,
            inserter: 0,
            flags: 0,
        };
        // A marked copy at way 1 and a stray LIVE copy at way 4 (two inserts
        // that raced, one of them died before settling).
        plant(&t[1], g(3, TN_EVICTING), h, "dup");
        plant(&t[4], g(1, TN_LIVE), h, "dup");
        // The lookup takes back way 1 (the first match), and its settle
        // retires way 4.
        assert_eq!(find_or_insert(&t, h, b"dup", 0, 5, 0).unwrap(), 1);
        assert_eq!(word(&t[1]), g(3, TN_LIVE));
        assert_eq!(word(&t[4]), g(1, TN_EVICTING));
        assert_eq!(live_keys(&t), vec![(1, "dup".to_string())]);
    }

    #[test]
    fn release_inserting_frees_only_the_dead_inserters_claims() {
        let t = table(WAYS);
        let ins = |generation, inserter: u32| TenantWord {
            generation,
            state: TN_INSERTING,
            inserter: inserter + 1,
            flags: 0,
        };
        plant(&t[0], ins(5, 3), 1, "a");
        plant(&t[1], ins(2, 4), 2, "b");
        plant(&t[2], ins(9, 3), 3, "c");
        let live_one = insert(&t, "live", 1).unwrap();
        assert_eq!(release_inserting(&t, 3), 2);
        assert_eq!(release_inserting(&t, 3), 0, "idempotent");
        let w0 = word(&t[0]);
        assert_eq!((w0.state, w0.generation, w0.inserter), (TN_FREE, 5, 0));
        assert_eq!(word(&t[2]).generation, 9, "the generation is kept");
        assert_eq!(word(&t[1]).state, TN_INSERTING);
        assert_eq!(word(&t[live_one]).state, TN_LIVE);
        // The freed way is claimed next with the generation bumped.
        let n = find_or_insert(&t, 1, b"next", 0, 2, 0).unwrap();
        assert_eq!((n, word(&t[n]).generation), (0, 6));
    }

    #[test]
    fn a_stuck_insert_of_the_same_hash_is_waited_for_then_passed_by() {
        let t = table(WAYS);
        let stuck = TenantWord {
            generation: 1,
            state: TN_INSERTING,
            inserter: 8,
            flags: 0,
        };
        plant(&t[0], stuck, 55, "k");
        assert_eq!(find_or_insert(&t, 55, b"k", 0, 1, 0).unwrap(), 1);
        // After the daemon frees it, lookups still find the live copy.
        assert_eq!(release_inserting(&t, 7), 1);
        assert_eq!(find_or_insert(&t, 55, b"k", 0, 2, 0).unwrap(), 1);
    }

    #[test]
    fn hash_spreads_keys_over_sets_and_depends_on_the_secret() {
        let t = table(512 * WAYS);
        let sets = 512;
        let keys: Vec<String> = (0..8192).map(|i| format!("customer-{i}")).collect();
        let mut load = vec![0u32; sets];
        for k in &keys {
            load[set_index(&t, key_hash(K0, K1, k.as_bytes()))] += 1;
        }
        // 16 per set on average; a fair hash keeps every set near that.
        assert!(load.iter().all(|&n| (2..=40).contains(&n)), "{load:?}");

        // An attacker who learned which keys share set 0 under one secret
        // gains nothing under another: they scatter.
        let (a0, a1) = (0x1234_5678_9abc_def0, 0x0fed_cba9_8765_4321);
        let colliding: Vec<&String> = keys
            .iter()
            .filter(|k| set_index(&t, key_hash(K0, K1, k.as_bytes())) == 0)
            .collect();
        assert!(colliding.len() >= WAYS);
        let mut elsewhere: Vec<usize> = colliding
            .iter()
            .map(|k| set_index(&t, key_hash(a0, a1, k.as_bytes())))
            .collect();
        elsewhere.sort_unstable();
        elsewhere.dedup();
        assert!(elsewhere.len() * 2 > colliding.len(), "{elsewhere:?}");
        // And the hash itself changes with either half of the secret.
        for k in keys.iter().take(64) {
            let h = key_hash(K0, K1, k.as_bytes());
            assert_ne!(h, key_hash(K0 ^ 1, K1, k.as_bytes()));
            assert_ne!(h, key_hash(K0, K1 ^ 1, k.as_bytes()));
        }
    }

    #[test]
    fn four_threads_inserting_overlapping_keys_leave_one_live_record_each() {
        // 8 sets; key i hashes to set i % 8, so two keys share each set and
        // their retired duplicates (at most 3 each) still fit its 8 ways.
        let keys: Vec<String> = (0..16).map(|i| format!("k{i}")).collect();
        for round in 0..200u64 {
            let t = table(8 * WAYS);
            let barrier = std::sync::Barrier::new(4);
            let got: Vec<Vec<(usize, usize)>> = std::thread::scope(|s| {
                let handles: Vec<_> = (0..4u64)
                    .map(|id| {
                        let (t, keys, barrier) = (&t, &keys, &barrier);
                        s.spawn(move || {
                            let mut order: Vec<usize> = (0..keys.len()).collect();
                            // Each thread walks the keys in its own order.
                            order.rotate_left(((id * 5 + round) % 16) as usize);
                            if id % 2 == 1 {
                                order.reverse();
                            }
                            barrier.wait();
                            order
                                .into_iter()
                                .map(|k| {
                                    let i = find_or_insert(
                                        t,
                                        k as u64,
                                        keys[k].as_bytes(),
                                        0,
                                        round,
                                        id as u32,
                                    )
                                    .unwrap();
                                    (k, i)
                                })
                                .collect()
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let live: Vec<(usize, String)> = live_keys(&t);
            for (k, key) in keys.iter().enumerate() {
                let copies: Vec<usize> = live
                    .iter()
                    .filter(|(_, n)| n == key)
                    .map(|(i, _)| *i)
                    .collect();
                assert_eq!(copies.len(), 1, "round {round}: {key} has {copies:?}");
                assert_eq!(copies[0] / WAYS, k % 8);
                // A lookup at rest returns that copy.
                assert_eq!(
                    find_or_insert(&t, k as u64, key.as_bytes(), 0, round, 9).unwrap(),
                    copies[0]
                );
            }
            // Every index handed out still holds its key (nothing was freed:
            // no daemon ran), LIVE or retired.
            for (k, i) in got.into_iter().flatten() {
                let w = word(&t[i]);
                assert!(matches!(w.state, TN_LIVE | TN_EVICTING), "{w:?}");
                assert!(holds(
                    &t[i],
                    t[i].state.load(Ordering::Relaxed),
                    &probe(k as u64, keys[k].as_bytes())
                ));
            }
            assert!(t.iter().all(|r| word(r).state != TN_INSERTING));
        }
    }
}
