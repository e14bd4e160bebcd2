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

use sluice_client::clock::{monotonic_ns, process_start_time};
use sluice_shm_layout::counters;
use sluice_shm_layout::layout::ClassRecord;
use sluice_shm_layout::layout::{
    Region, CLASS_FREE, CLIENT_ALIVE, CLIENT_CLAIMED, CLIENT_DEAD, CLIENT_EXITING, CLIENT_FREE,
};
use sluice_shm_layout::queue::{
    self, TicketWord, T_CANCELLED, T_CLAIMED, T_EXPIRED, T_FREE, T_GRANTED, T_GRANTING, T_QUEUED,
    T_VERIFYING,
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
    pub fn wait(
        &mut self,
        region: &Region,
        timeout_ms: i32,
        wake: Option<&std::os::unix::net::UnixDatagram>,
    ) -> Vec<Retired> {
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(self.watched.len() + 1);
        let mut keys = Vec::with_capacity(self.watched.len() + 1);
        // A newly attached client pokes this socket, so it is watched at
        // once rather than at the next scan.
        if let Some(w) = wake {
            fds.push(libc::pollfd {
                fd: w.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            keys.push(u32::MAX);
        }
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
            if idx == u32::MAX {
                if let Some(w) = wake {
                    let mut buf = [0u8; 64];
                    while w.recv(&mut buf).is_ok() {}
                }
                retired.extend(self.scan(region));
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
    // A tenant insert it left half done is undone.
    sluice_shm_layout::tenants::release_inserting(region.tenants(), idx);
    // Tickets first: once none of its tickets can be granted, no slot can
    // take its tag any more, so the slot scan below is final.
    let held_tickets = settle_tickets(region, idx);
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
                // Permits that held no ticket get a `verifying` one now,
                // so ops can see what the dead process was doing.
                let ticketed = held_tickets.get(&class_idx).copied().unwrap_or(0);
                if died && n > ticketed {
                    record_verifying(region, class, idx, st.pid, n - ticketed);
                }
            }
        }
        if let Some(block) = region.counters(idx, class_idx) {
            counters::fold(&block.counts, &class.totals.counts);
        }
    }
    // Relaxed: ordered before the Release CAS of `free`.
    rec.start_time.store(0, Ordering::Relaxed);
    registry::free(&rec.state, word);
    Some(Retired {
        pid: st.pid,
        slots: total,
        died,
    })
}

/// How long a `verifying` ticket stays listed.
pub const VERIFYING_FOR_NS: u64 = 60_000_000_000;

/// Settle every ticket owned by client `idx`: queued ones are removed,
/// granted ones become `verifying` (their holder died; the outcome of the
/// work is unknown). Tickets it was granting for others go back to the
/// queue. Returns, per class, the slots its granted tickets held.
fn settle_tickets(region: &Region, idx: u32) -> HashMap<u32, u64> {
    let me = (idx + 1) & 0xFFFF;
    let mut held = HashMap::new();
    for class_idx in 0..region.geometry().caps.classes {
        let Some(class) = region.class(class_idx) else {
            break;
        };
        // Relaxed: the daemon is the only writer of these fields.
        if class.state.load(Ordering::Relaxed) == CLASS_FREE {
            continue;
        }
        let tbase = class.ticket_base.load(Ordering::Relaxed);
        let tlen = class.ticket_len.load(Ordering::Relaxed);
        let sbase = class.slot_base.load(Ordering::Relaxed);
        let slen = class.slot_len.load(Ordering::Relaxed);
        let (Some(tickets), Some(words)) = (region.tickets(tbase, tlen), region.slots(sbase, slen))
        else {
            continue;
        };
        for rec in tickets {
            // A granter is a few atomic steps from done: give it a moment.
            for _ in 0..1000 {
                // Acquire pairs with the SeqCst transitions of the ticket.
                let w = TicketWord::decode(rec.state.load(Ordering::Acquire));
                if w.state != T_GRANTING || w.granter == me {
                    break;
                }
                std::thread::yield_now();
            }
            // Acquire: as above.
            let w = TicketWord::decode(rec.state.load(Ordering::Acquire));
            if w.state == T_GRANTING && w.granter == me {
                // It died granting this ticket: undo its half grant.
                // Relaxed: written before the ticket was published.
                let tag = rec.tag.load(Ordering::Relaxed);
                queue::release_tagged(words, tag);
                if queue::transition(rec, w, w.with(T_QUEUED, 0)).is_ok() {
                    queue::wake(rec);
                }
                continue;
            }
            if w.owner != me {
                continue;
            }
            match w.state {
                T_CLAIMED | T_QUEUED | T_GRANTING
                    if queue::transition(rec, w, w.with(T_FREE, 0)).is_ok() =>
                {
                    // Relaxed: a counter.
                    class.totals.counts[counters::CANCELLED].fetch_add(1, Ordering::Relaxed);
                }
                T_GRANTED => {
                    // Relaxed: fields of a record whose owner is dead.
                    let tag = rec.tag.load(Ordering::Relaxed);
                    let n = words
                        .iter()
                        .filter(|w| w.load(Ordering::Relaxed) == tag)
                        .count() as u64;
                    *held.entry(class_idx).or_insert(0) += n;
                    // Its record (maybe a queue place) is freed; the
                    // `verifying` ticket is listed from the pool instead.
                    let cost = rec.cost.load(Ordering::Relaxed);
                    let pid = rec.pid.load(Ordering::Relaxed);
                    if queue::transition(rec, w, w.with(T_FREE, 0)).is_ok() {
                        record_verifying(region, class, idx, pid, cost);
                    }
                }
                T_CANCELLED | T_EXPIRED => {
                    let _ = queue::transition(rec, w, w.with(T_FREE, 0));
                }
                _ => {}
            }
        }
    }
    held
}

/// List `n` reclaimed ticketless permits of a dead process as one
/// `verifying` ticket (if a record is free).
fn record_verifying(region: &Region, class: &ClassRecord, idx: u32, pid: u32, n: u64) {
    // Relaxed: the daemon is the only writer of these fields.
    let tbase = class.ticket_base.load(Ordering::Relaxed);
    let tlen = class.ticket_len.load(Ordering::Relaxed);
    let Some(tickets) = region.tickets(tbase, tlen) else {
        return;
    };
    // The pool after the four lanes, so these never take a queue place.
    // Relaxed: the daemon is the only writer of this field.
    let lane_len = (class.ticket_lane_len.load(Ordering::Relaxed) as usize).min(tickets.len() / 4);
    let pool = &tickets[4 * lane_len..];
    let first = 4 * lane_len as u32;
    let Some((i, generation)) = queue::claim(pool, first, idx) else {
        tracing::debug!(pid, "no free ticket record to list a verifying permit");
        return;
    };
    let Some(rec) = tickets.get(i as usize) else {
        return;
    };
    let now = monotonic_ns();
    // Relaxed: published by the SeqCst transition below.
    rec.cost.store(n, Ordering::Relaxed);
    rec.lane.store(
        sluice_shm_layout::layout::DEFAULT_LANE as u32,
        Ordering::Relaxed,
    );
    rec.enqueued_ns.store(now, Ordering::Relaxed);
    rec.deadline_ns
        .store(now.saturating_add(VERIFYING_FOR_NS), Ordering::Relaxed);
    rec.pid.store(pid, Ordering::Relaxed);
    rec.tag.store(0, Ordering::Relaxed);
    rec.flags.store(0, Ordering::Relaxed);
    let w = TicketWord {
        generation,
        state: T_CLAIMED,
        granter: 0,
        owner: (idx + 1) & 0xFFFF,
    };
    let _ = queue::transition(rec, w, w.with(T_VERIFYING, 0));
}

/// Free `verifying` tickets listed long enough. Returns how many.
pub fn expire_verifying(region: &Region) -> u32 {
    let now = monotonic_ns();
    let mut freed = 0;
    for class_idx in 0..region.geometry().caps.classes {
        let Some(class) = region.class(class_idx) else {
            break;
        };
        // Relaxed: the daemon is the only writer of these fields.
        let tbase = class.ticket_base.load(Ordering::Relaxed);
        let tlen = class.ticket_len.load(Ordering::Relaxed);
        let Some(tickets) = region.tickets(tbase, tlen) else {
            continue;
        };
        for rec in tickets {
            // Acquire pairs with the SeqCst transition to VERIFYING.
            let w = TicketWord::decode(rec.state.load(Ordering::Acquire));
            if w.state == T_VERIFYING
                && rec.deadline_ns.load(Ordering::Relaxed) <= now
                && queue::transition(rec, w, w.with(T_FREE, 0)).is_ok()
            {
                freed += 1;
            }
        }
    }
    freed
}
