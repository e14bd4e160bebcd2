//! loom models of the tenant table (`tenants::find_or_insert`, eviction,
//! release of a dead inserter's claims): one set of records on the heap, each
//! process a thread.
#![cfg(loom)]
#![allow(clippy::unwrap_used)]

use loom::sync::Arc;
use loom::thread;
use sluice_shm_layout::bucket::{BucketVerdict, RateParams, UNITS_PER_NS};
use sluice_shm_layout::sync::{crash, AtomicU32, Ordering};
use sluice_shm_layout::tenants::{
    self, TenantRecord, TenantWord, EVICTION_GRACE_NS, FLAG_STAMPED, TN_EVICTING, TN_INSERTING,
    TN_LIVE, WAYS,
};

const SEC: u64 = 1_000_000_000;
/// "Now" in the models: every record planted idle was last used at 0.
const NOW: u64 = 10 * SEC;
const IDLE: u64 = 5 * SEC;
/// Hashes are given, not computed: the models are about the protocol, and
/// one set is the whole table.
const H_ACME: u64 = 0xAC;
const H_ZED: u64 = 0x2E;
const H_NEWCO: u64 = 0x9C;

fn table() -> Arc<Vec<TenantRecord>> {
    Arc::new((0..WAYS).map(|_| TenantRecord::default()).collect())
}

fn word(rec: &TenantRecord) -> TenantWord {
    TenantWord::decode(rec.state.load(Ordering::Acquire))
}

/// True when `rec` is LIVE or EVICTING and holds `key`.
fn holds(rec: &TenantRecord, key: &[u8]) -> bool {
    let st = word(rec).state;
    if st != TN_LIVE && st != TN_EVICTING {
        return false;
    }
    let mut bytes = [0u8; 48];
    for (chunk, w) in bytes.chunks_mut(8).zip(&rec.key) {
        chunk.copy_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
    }
    rec.key_len.load(Ordering::Relaxed) as usize == key.len() && &bytes[..key.len()] == key
}

/// Indices of the LIVE records holding `key`.
fn live_copies(t: &[TenantRecord], key: &str) -> Vec<usize> {
    tenants::live(t)
        .filter(|l| l.key == key)
        .map(|l| l.index)
        .collect()
}

fn find(t: &[TenantRecord], hash: u64, key: &[u8], now: u64, who: u32) -> Option<usize> {
    tenants::find_or_insert(t, hash, key, 0, now, who).ok()
}

// Real event: two processes see the same new tenant key at the same moment
// and both insert it.
#[test]
fn two_processes_insert_same_key() {
    loom::model(|| {
        let t = table();
        let handles: Vec<_> = [0u32, 1]
            .into_iter()
            .map(|who| {
                let t = Arc::clone(&t);
                thread::spawn(move || find(&t, H_ACME, b"acme", 1, who))
            })
            .collect();
        let got: Vec<usize> = handles
            .into_iter()
            .map(|h| h.join().unwrap().expect("the set had room"))
            .collect();
        for &i in &got {
            assert!(
                holds(&t[i], b"acme"),
                "a process got {i}: {:?}",
                word(&t[i])
            );
        }
        let live = live_copies(&t, "acme");
        assert_eq!(live.len(), 1, "live copies {live:?}, handed out {got:?}");
        assert!(t.iter().all(|r| word(r).state != TN_INSERTING));
        // At rest every lookup lands on the one copy.
        assert_eq!(find(&t, H_ACME, b"acme", 2, 2), Some(live[0]));
    });
}

/// Window states of the client's lookup-to-take, for the grace step.
const NOT_OPENED: u32 = 0;
const OPEN: u32 = 1;
const CLOSED: u32 = 2;

// Real event: the daemon's maintenance tick evicts an idle tenant ("acme")
// while a client request for that tenant looks it up and takes a token, and
// later another tenant ("newco") arrives and may reuse the freed record.
// A third record ("zed") is another key, already marked and not yet due.
//
// The grace is a timing assumption (a lookup-to-take lasts far less than
// 1 s); loom has no time, so it is an explicit step: after marking, the
// daemon reads the client's window with a read-modify-write, and if the
// window was already open, the tick a grace later runs only after the client
// is done (joined). A window opened after that read is ordered after the
// mark (the RMW pairs with the client's swap), so its lookup sees the mark.
#[test]
fn eviction_races_lookup() {
    loom::model(|| {
        let t = table();
        // Way 0: zed; way 1: acme, idle since 0. Ways 2.. are free.
        assert_eq!(find(&t, H_ZED, b"zed", 0, 9), Some(0));
        assert_eq!(find(&t, H_ACME, b"acme", 0, 9), Some(1));
        // zed is already marked and stamped far in the future (never due).
        assert_eq!(tenants::evict_idle(&t[..1], NOW, IDLE), 1);
        t[0].marked_ns.store(u64::MAX / 2, Ordering::Relaxed);
        let w = word(&t[0]);
        t[0].state.store(
            TenantWord {
                flags: FLAG_STAMPED,
                ..w
            }
            .encode(),
            Ordering::Release,
        );
        let window = Arc::new(AtomicU32::new(NOT_OPENED));
        let params = RateParams::new(1.0, 10, 0).unwrap();
        let now_units = NOW * UNITS_PER_NS;

        let client = {
            let (t, window) = (Arc::clone(&t), Arc::clone(&window));
            thread::spawn(move || {
                // AcqRel pairs with the daemon's RMW on the window.
                window.swap(OPEN, Ordering::AcqRel);
                let found = find(&t, H_ACME, b"acme", NOW, 0);
                let used = found.map(|i| {
                    let v = params.take(&t[i].tat, now_units, 1);
                    // Still inside the window: the record must hold acme.
                    (i, v, holds(&t[i], b"acme"), word(&t[i]))
                });
                window.store(CLOSED, Ordering::Release);
                used
            })
        };
        // The daemon's tick that marks and stamps, then one inside the grace.
        let tick = {
            let (t, window) = (Arc::clone(&t), Arc::clone(&window));
            thread::spawn(move || {
                tenants::evict_idle(&t, NOW, IDLE);
                // AcqRel RMW: reads the latest window state; see above.
                let open_at_mark = window.fetch_or(0, Ordering::AcqRel) == OPEN;
                tenants::finish_evictions(&t, NOW, EVICTION_GRACE_NS);
                tenants::finish_evictions(&t, NOW + 1, EVICTION_GRACE_NS);
                open_at_mark
            })
        };
        let open_at_mark = tick.join().unwrap();
        // The grace passes: a window open at the mark has closed (joined).
        let (mut client, mut used) = (Some(client), None);
        if open_at_mark {
            used = client.take().map(|c| c.join().unwrap());
        }
        // The tick a grace later frees; then another tenant arrives and
        // takes two tokens (maybe from acme's old record).
        let later = {
            let t = Arc::clone(&t);
            thread::spawn(move || {
                tenants::finish_evictions(&t, NOW + EVICTION_GRACE_NS, EVICTION_GRACE_NS);
                let j = find(&t, H_NEWCO, b"newco", NOW + EVICTION_GRACE_NS, 1)?;
                let v = params.take(&t[j].tat, now_units, 2);
                assert!(matches!(v, BucketVerdict::Green { .. }), "{v:?}");
                Some(j)
            })
        };
        if let Some(c) = client {
            used = Some(c.join().unwrap());
        }
        let used = used.expect("the client was joined");
        let j = later.join().unwrap();
        let (i, v, held, w) = used.expect("a way was free, or acme's own");
        assert!(matches!(v, BucketVerdict::Green { .. }), "{v:?}");
        assert!(
            held,
            "the client used record {i} while it held another key: {w:?}"
        );
        if let Some(j) = j {
            assert!(holds(&t[j], b"newco"));
            // newco's bucket holds newco's take alone.
            assert_eq!(t[j].tat.load(Ordering::Acquire), now_units + 2 * params.t);
        }
        assert!(live_copies(&t, "acme").len() <= 1);
    });
}

// Real event: a process is killed in the middle of inserting a new tenant
// key while another process looks up the same key; the daemon learns of the
// death and releases the dead process's claims.
#[test]
fn inserter_dies_mid_insert() {
    // Crash points in a fresh insert: after the claim, after the fields,
    // after the publication (before settle).
    for step in 0..3u32 {
        loom::model(move || {
            let t = table();
            let dying = {
                let t = Arc::clone(&t);
                thread::spawn(move || {
                    crash::arm(step);
                    find(&t, H_ACME, b"acme", 1, 0)
                })
            };
            let other = {
                let t = Arc::clone(&t);
                thread::spawn(move || find(&t, H_ACME, b"acme", 1, 1))
            };
            // `None` is the crash (the set can not be full here).
            let crashed = dying.join().unwrap().is_none();
            let daemon = {
                let t = Arc::clone(&t);
                thread::spawn(move || {
                    if crashed {
                        tenants::release_inserting(&t, 0);
                    }
                })
            };
            let b = other.join().unwrap().expect("the set had room");
            daemon.join().unwrap();

            assert!(holds(&t[b], b"acme"), "survivor got {b}: {:?}", word(&t[b]));
            assert!(
                t.iter().all(|r| word(r).state != TN_INSERTING),
                "a claim was left: {:?}",
                t.iter().map(word).collect::<Vec<_>>()
            );
            let live = live_copies(&t, "acme");
            // A death between publication and settle may leave a second,
            // higher copy that no lookup reaches (it idles out).
            let allowed = if crashed && step == 2 { 2 } else { 1 };
            assert!(
                (1..=allowed).contains(&live.len()),
                "step {step}, crashed {crashed}: live copies {live:?}"
            );
            assert_eq!(find(&t, H_ACME, b"acme", 2, 2), Some(live[0]));
        });
    }
}
