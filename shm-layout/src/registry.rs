//! Client registry: which processes are attached, so that what a dead one
//! held can be found and returned.
//!
//! # Record state word
//!
//! ```text
//!  63            40 39      32 31                          0
//! +----------------+----------+-----------------------------+
//! | generation     | state    | pid                         |
//! +----------------+----------+-----------------------------+
//! ```
//!
//! Transitions (each one CAS on the whole word):
//!
//! - `FREE(g)` → `CLAIMED(g+1, pid)`: a process claims the record. The pid
//!   is in the same word, so the daemon can always tell whom to watch.
//! - `CLAIMED(g, pid)` → `ALIVE(g, pid)`: after it stored its start time.
//! - `ALIVE` → `EXITING`: clean detach, after releasing its permits.
//! - `CLAIMED | ALIVE` → `DEAD`: the daemon saw the process die.
//! - `EXITING | DEAD` → `FREE(g)`: the daemon has returned the slots and
//!   folded the counters.
//!
//! # Invariant
//!
//! A record's generation changes only when it is claimed, so the owner bits
//! `(index, generation)` carried by slot words name exactly one process
//! incarnation (modulo 2¹⁶ reuses of the same record).
//!
//! # Crashes
//!
//! A process that dies after claiming leaves `CLAIMED` or `ALIVE` with its
//! pid: the daemon's death watch finds it. A daemon that dies mid-reclaim
//! leaves `DEAD`/`EXITING`, and the next daemon finishes (reclaiming is
//! idempotent). Progress: claiming is lock-free (a CAS fails only because
//! another process claimed that record).

use crate::layout::{ClientRecord, CLIENT_ALIVE, CLIENT_CLAIMED, CLIENT_FREE};
use crate::sync::{AtomicU64, Ordering};

const PID_MASK: u64 = 0xFFFF_FFFF;
const STATE_SHIFT: u32 = 32;
const GEN_SHIFT: u32 = 40;
const GEN_MASK: u64 = 0xFF_FFFF;

/// A decoded record state word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClientState {
    /// Incarnation number of the record.
    pub generation: u32,
    /// One of the `CLIENT_*` constants.
    pub state: u64,
    /// Process id of the holder (0 when free).
    pub pid: u32,
}

impl ClientState {
    /// Unpack a state word.
    pub fn decode(word: u64) -> Self {
        Self {
            generation: ((word >> GEN_SHIFT) & GEN_MASK) as u32,
            state: (word >> STATE_SHIFT) & 0xFF,
            pid: (word & PID_MASK) as u32,
        }
    }

    /// Pack into a state word.
    pub fn encode(self) -> u64 {
        (u64::from(self.generation) & GEN_MASK) << GEN_SHIFT
            | (self.state & 0xFF) << STATE_SHIFT
            | u64::from(self.pid)
    }
}

/// Claim a free record among `records` for process `pid`.
///
/// Returns the record's index and new generation, or `None` when every
/// record is taken (the registry is full).
pub fn claim<'a, I>(records: I, pid: u32) -> Option<(u32, u32)>
where
    I: IntoIterator<Item = (u32, &'a AtomicU64)>,
{
    for (idx, word) in records {
        // Acquire pairs with the daemon's Release store of FREE: the
        // record's previous use is fully retired before we take it.
        let cur = word.load(Ordering::Acquire);
        let st = ClientState::decode(cur);
        if st.state != CLIENT_FREE {
            continue;
        }
        let generation = (st.generation + 1) & GEN_MASK as u32;
        let next = ClientState {
            generation,
            state: CLIENT_CLAIMED,
            pid,
        }
        .encode();
        // AcqRel: Acquire as above; Release publishes the pid with the claim.
        if word
            .compare_exchange(cur, next, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            return Some((idx, generation));
        }
    }
    None
}

/// Finish registration: store the start time, then mark the record alive.
/// Returns false if the record is no longer ours (the daemon judged us dead).
pub fn activate(rec: &ClientRecord, generation: u32, pid: u32, start_time: u64) -> bool {
    let from = ClientState {
        generation,
        state: CLIENT_CLAIMED,
        pid,
    }
    .encode();
    let to = ClientState {
        generation,
        state: CLIENT_ALIVE,
        pid,
    }
    .encode();
    // Relaxed: only a check that the record is still ours before we write
    // to it; the CASes below decide.
    if rec.state.load(Ordering::Relaxed) != from {
        return false;
    }
    // The daemon zeroes `start_time` when it frees a record, so a CAS from
    // 0 fails if this record was freed and re-claimed by another process
    // while we stalled: we never overwrite a live holder's identity.
    // Relaxed: published by the Release CAS of the state word below.
    if rec
        .start_time
        .compare_exchange(0, start_time.max(1), Ordering::Relaxed, Ordering::Relaxed)
        .is_err()
    {
        return false;
    }
    crate::crash_point!(false);
    // Release pairs with the daemon's Acquire load of the state word: it
    // sees the start time once it sees ALIVE.
    rec.state
        .compare_exchange(from, to, Ordering::Release, Ordering::Relaxed)
        .is_ok()
}

/// Move our record from `from` to `to` state (keeping generation and pid).
/// Returns false if it was not in `from` with our generation.
pub fn transition(word: &AtomicU64, generation: u32, pid: u32, from: u64, to: u64) -> bool {
    let a = ClientState {
        generation,
        state: from,
        pid,
    }
    .encode();
    let b = ClientState {
        generation,
        state: to,
        pid,
    }
    .encode();
    // AcqRel: Release publishes what we did before (released slots, last
    // counts) to the daemon's Acquire load; Acquire sees its prior writes.
    word.compare_exchange(a, b, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
}

/// Free a retired record, keeping its generation so the next claim bumps it.
/// The caller zeroes the record's `start_time` first (see [`activate`]).
pub fn free(word: &AtomicU64, current: u64) -> bool {
    let st = ClientState::decode(current);
    let next = ClientState {
        generation: st.generation,
        state: CLIENT_FREE,
        pid: 0,
    }
    .encode();
    // Release pairs with the Acquire load in `claim`: our folding is done
    // before anyone reuses the record.
    word.compare_exchange(current, next, Ordering::Release, Ordering::Relaxed)
        .is_ok()
}

#[cfg(all(test, not(loom)))]
#[allow(clippy::unwrap_used)]
mod tests {
    // Covers the client registry: claim order, generation bumps, the pid in
    // the state word, activate, transitions, free keeping the generation, a
    // full registry, concurrent claims, and the state word's encoding.

    use super::*;
    use crate::layout::{CLIENT_DEAD, CLIENT_EXITING};
    use proptest::prelude::*;

    /// Zeroed client records, as a fresh region holds them.
    fn records(n: usize) -> Vec<ClientRecord> {
        (0..n)
            .map(|_| {
                // SAFETY: ClientRecord is made only of atomics, for which all
                // zero bytes are a valid value (0).
                unsafe { std::mem::zeroed::<ClientRecord>() }
            })
            .collect()
    }

    fn words(recs: &[ClientRecord]) -> impl Iterator<Item = (u32, &AtomicU64)> {
        recs.iter().enumerate().map(|(i, r)| (i as u32, &r.state))
    }

    fn state(rec: &ClientRecord) -> ClientState {
        ClientState::decode(rec.state.load(Ordering::Relaxed))
    }

    #[test]
    fn claim_takes_the_first_free_record_and_bumps_its_generation() {
        let recs = records(4);
        assert_eq!(claim(words(&recs), 100), Some((0, 1)));
        assert_eq!(claim(words(&recs), 101), Some((1, 1)));
        assert_eq!(
            state(&recs[0]),
            ClientState {
                generation: 1,
                state: CLIENT_CLAIMED,
                pid: 100
            }
        );
        assert_eq!(
            state(&recs[1]),
            ClientState {
                generation: 1,
                state: CLIENT_CLAIMED,
                pid: 101
            }
        );
        // A record in any non-free state is skipped.
        for (i, st) in [(2, CLIENT_ALIVE), (3, CLIENT_DEAD)] {
            recs[i].state.store(
                ClientState {
                    generation: 9,
                    state: st,
                    pid: 5,
                }
                .encode(),
                Ordering::Relaxed,
            );
        }
        assert_eq!(claim(words(&recs), 102), None, "full registry");
        assert_eq!(state(&recs[3]).state, CLIENT_DEAD);
    }

    #[test]
    fn pid_is_stored_whole() {
        let recs = records(1);
        assert_eq!(claim(words(&recs), u32::MAX), Some((0, 1)));
        assert_eq!(state(&recs[0]).pid, u32::MAX);
        assert_eq!(state(&recs[0]).state, CLIENT_CLAIMED);
    }

    #[test]
    fn lifecycle_claim_activate_exit_free_then_reclaim_bumps_generation() {
        let recs = records(2);
        let (idx, gen) = claim(words(&recs), 42).unwrap();
        let rec = &recs[idx as usize];
        assert!(!activate(rec, gen + 1, 42, 777), "wrong generation");
        assert!(!activate(rec, gen, 43, 777), "wrong pid");
        assert!(activate(rec, gen, 42, 777));
        assert_eq!(
            state(rec),
            ClientState {
                generation: gen,
                state: CLIENT_ALIVE,
                pid: 42
            }
        );
        assert_eq!(rec.start_time.load(Ordering::Relaxed), 777);
        assert!(!activate(rec, gen, 42, 777), "already alive");

        assert!(!transition(
            &rec.state,
            gen,
            42,
            CLIENT_CLAIMED,
            CLIENT_EXITING
        ));
        assert!(transition(
            &rec.state,
            gen,
            42,
            CLIENT_ALIVE,
            CLIENT_EXITING
        ));
        assert!(
            !transition(&rec.state, gen, 42, CLIENT_ALIVE, CLIENT_EXITING),
            "twice"
        );
        assert_eq!(state(rec).state, CLIENT_EXITING);

        let cur = rec.state.load(Ordering::Relaxed);
        assert!(!free(&rec.state, cur ^ 1), "a stale word frees nothing");
        assert!(free(&rec.state, cur));
        assert_eq!(
            state(rec),
            ClientState {
                generation: gen,
                state: CLIENT_FREE,
                pid: 0
            }
        );

        assert_eq!(claim(words(&recs), 50), Some((idx, gen + 1)));
        assert_eq!(state(rec).pid, 50);
    }

    #[test]
    fn daemon_marks_dead_and_frees() {
        let recs = records(1);
        let (_, gen) = claim(words(&recs), 7).unwrap();
        assert!(transition(
            &recs[0].state,
            gen,
            7,
            CLIENT_CLAIMED,
            CLIENT_DEAD
        ));
        let cur = recs[0].state.load(Ordering::Relaxed);
        assert!(free(&recs[0].state, cur));
        // The dead process's late activate fails: the record is not its own.
        assert!(!activate(&recs[0], gen, 7, 1));
        assert_eq!(claim(words(&recs), 8), Some((0, gen + 1)));
    }

    #[test]
    fn late_activate_does_not_touch_another_holders_record() {
        let recs = records(1);
        // A claims, then stalls before activating.
        let (_, gen_a) = claim(words(&recs), 100).unwrap();
        // The daemon retires A's record; B claims it and activates.
        assert!(transition(
            &recs[0].state,
            gen_a,
            100,
            CLIENT_CLAIMED,
            CLIENT_DEAD
        ));
        free(&recs[0].state, recs[0].state.load(Ordering::Relaxed));
        let (_, gen_b) = claim(words(&recs), 200).unwrap();
        assert!(activate(&recs[0], gen_b, 200, 2222));
        // A resumes: its activate must fail and leave B's record alone.
        assert!(!activate(&recs[0], gen_a, 100, 1111));
        assert_eq!(
            recs[0].start_time.load(Ordering::Relaxed),
            2222,
            "B's start time was overwritten"
        );
    }

    #[test]
    fn generation_wraps_within_24_bits_without_touching_state_or_pid() {
        let recs = records(1);
        let top = ClientState {
            generation: 0xFF_FFFF,
            state: CLIENT_FREE,
            pid: 0,
        };
        recs[0].state.store(top.encode(), Ordering::Relaxed);
        assert_eq!(claim(words(&recs), 9), Some((0, 0)));
        assert_eq!(
            state(&recs[0]),
            ClientState {
                generation: 0,
                state: CLIENT_CLAIMED,
                pid: 9
            }
        );
    }

    #[test]
    fn concurrent_claims_get_distinct_records() {
        let recs = records(16);
        let barrier = std::sync::Barrier::new(4);
        let got: Vec<Vec<u32>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4u32)
                .map(|t| {
                    let (recs, barrier) = (&recs, &barrier);
                    s.spawn(move || {
                        barrier.wait();
                        let mut mine = Vec::new();
                        while let Some((idx, _)) = claim(words(recs), 1000 + t) {
                            mine.push(idx);
                        }
                        mine
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut all: Vec<u32> = got.concat();
        all.sort_unstable();
        assert_eq!(all, (0..16).collect::<Vec<_>>());
        for (t, idxs) in got.iter().enumerate() {
            for &i in idxs {
                assert_eq!(state(&recs[i as usize]).pid, 1000 + t as u32);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn state_encode_decode_round_trip(generation in 0u32..=0xFF_FFFF, state in 0u64..=0xFF, pid in any::<u32>()) {
            let s = ClientState { generation, state, pid };
            prop_assert_eq!(ClientState::decode(s.encode()), s);
        }

        #[test]
        fn every_word_decodes_and_re_encodes_to_itself(word in any::<u64>()) {
            prop_assert_eq!(ClientState::decode(word).encode(), word);
        }

        #[test]
        fn encode_masks_out_of_range_fields(generation in any::<u32>(), state in any::<u64>(), pid in any::<u32>()) {
            let d = ClientState::decode(ClientState { generation, state, pid }.encode());
            prop_assert_eq!(d, ClientState { generation: generation & 0xFF_FFFF, state: state & 0xFF, pid });
        }
    }
}
