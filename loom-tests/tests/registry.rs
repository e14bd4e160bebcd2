//! loom models of the client registry (`registry::claim`,
//! `registry::transition`): record state words on the heap, each process a
//! thread.
#![cfg(loom)]
#![allow(clippy::unwrap_used)]

use loom::sync::Arc;
use loom::thread;
use sluice_shm_layout::layout::{CLIENT_ALIVE, CLIENT_CLAIMED, CLIENT_DEAD, CLIENT_FREE};
use sluice_shm_layout::registry::{self, ClientState};
use sluice_shm_layout::sync::{AtomicU64, Ordering};

fn records(n: usize) -> Arc<Vec<AtomicU64>> {
    let free = ClientState {
        generation: 0,
        state: CLIENT_FREE,
        pid: 0,
    }
    .encode();
    Arc::new((0..n).map(|_| AtomicU64::new(free)).collect())
}

/// Two processes attach at once; returns what each got, by pid 100 and 101.
fn attach_both(recs: &Arc<Vec<AtomicU64>>) -> [Option<(u32, u32)>; 2] {
    let handles: Vec<_> = [100u32, 101]
        .into_iter()
        .map(|pid| {
            let recs = Arc::clone(recs);
            thread::spawn(move || registry::claim((0u32..).zip(recs.iter()), pid))
        })
        .collect();
    let mut out = [None; 2];
    for (o, h) in out.iter_mut().zip(handles) {
        *o = h.join().unwrap();
    }
    out
}

fn state(recs: &[AtomicU64], idx: u32) -> ClientState {
    ClientState::decode(recs[idx as usize].load(Ordering::Acquire))
}

// Real event: two processes start and attach to the region at the same
// moment, with two free client records.
#[test]
fn two_processes_claim_distinct_records() {
    loom::model(|| {
        let recs = records(2);
        let [a, b] = attach_both(&recs);
        let (ia, ga) = a.expect("a free record was there");
        let (ib, gb) = b.expect("a free record was there");
        assert_ne!(ia, ib, "two processes got one record");
        for (idx, generation, pid) in [(ia, ga, 100), (ib, gb, 101)] {
            let st = state(&recs, idx);
            assert_eq!(
                st,
                ClientState {
                    generation,
                    state: CLIENT_CLAIMED,
                    pid
                }
            );
            assert_eq!(generation, 1, "a claim bumps the generation once");
        }
    });
}

// Real event: two processes attach at once to a region whose client table
// has one free record left.
#[test]
fn claim_on_full_registry_one_gets_none() {
    loom::model(|| {
        let recs = records(1);
        let got = attach_both(&recs);
        let winners: Vec<usize> = (0..2).filter(|&i| got[i].is_some()).collect();
        assert_eq!(winners.len(), 1, "one record, winners {winners:?}");
        let pid = 100 + winners[0] as u32;
        assert_eq!(
            state(&recs, 0),
            ClientState {
                generation: 1,
                state: CLIENT_CLAIMED,
                pid
            }
        );
    });
}

// Real event: a process finishes registering (CLAIMED -> ALIVE) just as the
// daemon's death watch, having seen it CLAIMED and its pid gone, marks it
// DEAD. `activate` is played by its CAS, `transition(CLAIMED -> ALIVE)`:
// `ClientRecord` has no constructor the model can call.
#[test]
fn activate_races_dead_transition() {
    loom::model(|| {
        let (generation, pid) = (1, 7);
        let claimed = ClientState {
            generation,
            state: CLIENT_CLAIMED,
            pid,
        }
        .encode();
        let word = Arc::new(AtomicU64::new(claimed));
        let client = {
            let w = Arc::clone(&word);
            thread::spawn(move || {
                registry::transition(&w, generation, pid, CLIENT_CLAIMED, CLIENT_ALIVE)
            })
        };
        let daemon = {
            let w = Arc::clone(&word);
            thread::spawn(move || {
                registry::transition(&w, generation, pid, CLIENT_CLAIMED, CLIENT_DEAD)
            })
        };
        let alive = client.join().unwrap();
        let dead = daemon.join().unwrap();
        assert!(
            alive != dead,
            "exactly one must win: alive={alive} dead={dead}"
        );
        let end = ClientState::decode(word.load(Ordering::Acquire));
        let want = if alive { CLIENT_ALIVE } else { CLIENT_DEAD };
        assert_eq!(
            end,
            ClientState {
                generation,
                state: want,
                pid
            }
        );
    });
}
