//! Returning what a client process held once it is gone, like SysV
//! `SEM_UNDO`: its slots go back, its counters fold into the class totals,
//! and its record is freed.
//!
//! The daemon learns of a death at once through a pidfd per registered
//! process (readable when the process exits). The identity is the pid *and*
//! the process start time, so a reused pid is never taken for the old
//! process.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use sluice_client::clock::process_start_time;
use sluice_shm_layout::counters;
use sluice_shm_layout::layout::{
    Region, CLASS_FREE, CLIENT_ALIVE, CLIENT_CLAIMED, CLIENT_DEAD, CLIENT_EXITING, CLIENT_FREE,
};
use sluice_shm_layout::registry::{self, ClientState};
use sluice_shm_layout::slots::{self, Owner};
use sluice_shm_layout::sync::Ordering;

struct Watched {
    generation: u32,
    pid: u32,
    pidfd: OwnedFd,
}

/// What retiring one client returned.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Retired {
    /// Pid of the process.
    pub pid: u32,
    /// Slots it still held, now free.
    pub slots: u64,
    /// True when it died (false: clean detach).
    pub died: bool,
}

/// The daemon's view of which processes it watches.
#[derive(Default)]
pub struct Watcher {
    watched: HashMap<u32, Watched>,
}

fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor
    // or -1; it touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: the kernel just returned this descriptor to us; we own it.
    Some(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

impl Watcher {
    /// Look at every client record: start watching new processes, retire
    /// records whose process is gone or detached. Returns what was retired.
    pub fn scan(&mut self, region: &Region) -> Vec<Retired> {
        let mut retired = Vec::new();
        for idx in 0..region.geometry().caps.clients {
            let Some(rec) = region.client(idx) else { break };
            // Acquire pairs with the client's Release CAS to ALIVE/EXITING:
            // its start time and released slots are visible.
            let word = rec.state.load(Ordering::Acquire);
            let st = ClientState::decode(word);
            match st.state {
                CLIENT_FREE => {
                    self.watched.remove(&idx);
                }
                CLIENT_CLAIMED | CLIENT_ALIVE => {
                    let known = self
                        .watched
                        .get(&idx)
                        .is_some_and(|w| w.generation == st.generation && w.pid == st.pid);
                    if known {
                        continue;
                    }
                    self.watched.remove(&idx);
                    // Relaxed: ordered by the Acquire load of the state word.
                    let recorded = rec.start_time.load(Ordering::Relaxed);
                    let alive = pidfd_open(st.pid).filter(|_| {
                        // Same pid but another start time: the pid was reused.
                        recorded == 0 || process_start_time(st.pid) == Some(recorded)
                    });
                    match alive {
                        Some(pidfd) => {
                            self.watched.insert(
                                idx,
                                Watched {
                                    generation: st.generation,
                                    pid: st.pid,
                                    pidfd,
                                },
                            );
                        }
                        None => retired.extend(retire(region, idx, word, true)),
                    }
                }
                CLIENT_EXITING => {
                    self.watched.remove(&idx);
                    retired.extend(retire(region, idx, word, false));
                }
                CLIENT_DEAD => {
                    // A previous daemon died while retiring it: finish.
                    self.watched.remove(&idx);
                    retired.extend(retire(region, idx, word, true));
                }
                _ => {}
            }
        }
        retired
    }

    /// Wait up to `timeout_ms` for a watched process to exit, then retire
    /// every one that did.
    pub fn wait(&mut self, region: &Region, timeout_ms: i32) -> Vec<Retired> {
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(self.watched.len());
        let mut keys = Vec::with_capacity(self.watched.len());
        for (&idx, w) in &self.watched {
            fds.push(libc::pollfd {
                fd: w.pidfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            keys.push(idx);
        }
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs that
        // outlives the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if n <= 0 {
            return Vec::new();
        }
        let mut retired = Vec::new();
        for (pfd, idx) in fds.iter().zip(keys) {
            if pfd.revents == 0 {
                continue;
            }
            let Some(w) = self.watched.remove(&idx) else {
                continue;
            };
            let Some(rec) = region.client(idx) else {
                continue;
            };
            // Acquire: as in `scan`.
            let word = rec.state.load(Ordering::Acquire);
            let st = ClientState::decode(word);
            if st.generation == w.generation && st.pid == w.pid && st.state != CLIENT_FREE {
                retired.extend(retire(region, idx, word, st.state != CLIENT_EXITING));
            }
        }
        retired
    }

    /// How many processes are watched.
    pub fn watching(&self) -> usize {
        self.watched.len()
    }
}

/// Retire client record `idx` whose state word was `word`: mark it dead (if
/// it died), return its slots, fold its counters, free it. Idempotent: a
/// daemon that dies half way leaves `DEAD`, and the next one finishes.
pub fn retire(region: &Region, idx: u32, word: u64, died: bool) -> Option<Retired> {
    let rec = region.client(idx)?;
    let st = ClientState::decode(word);
    let mut word = word;
    if died && (st.state == CLIENT_CLAIMED || st.state == CLIENT_ALIVE) {
        if !registry::transition(&rec.state, st.generation, st.pid, st.state, CLIENT_DEAD) {
            // It changed under us (detached cleanly, say): next scan.
            return None;
        }
        word = ClientState {
            state: CLIENT_DEAD,
            ..st
        }
        .encode();
    }
    let owner = Owner {
        index: idx,
        generation: st.generation,
    };
    let mut total = 0;
    for class_idx in 0..region.geometry().caps.classes {
        let Some(class) = region.class(class_idx) else {
            break;
        };
        // Relaxed: the daemon is the only writer of `state` and the range.
        if class.state.load(Ordering::Relaxed) == CLASS_FREE {
            continue;
        }
        let base = class.slot_base.load(Ordering::Relaxed);
        let len = class.slot_len.load(Ordering::Relaxed);
        if let Some(words) = region.slots(base, len) {
            let n = slots::reclaim(words, owner);
            if n > 0 {
                // Relaxed: a counter.
                class.totals.counts[counters::RECLAIMED].fetch_add(n, Ordering::Relaxed);
                total += n;
            }
        }
        if let Some(block) = region.counters(idx, class_idx) {
            counters::fold(&block.counts, &class.totals.counts);
        }
    }
    registry::free(&rec.state, word);
    Some(Retired {
        pid: st.pid,
        slots: total,
        died,
    })
}
