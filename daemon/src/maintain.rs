//! The daemon's periodic work on the queues: sampling grant rates for ETAs,
//! granting tickets whose waiters sleep (a rate-limited class refills with
//! time, not with releases), retiring `verifying` tickets, and cancelling
//! tickets by id for `sluice cancel`.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use sluice_client::clock::monotonic_ns;
use sluice_shm_layout::admit::ClassParams;
use sluice_shm_layout::bucket::ns_to_units;
use sluice_shm_layout::counters;
use sluice_shm_layout::layout::{Region, CLASS_ACTIVE, CLIENT_FREE};
use sluice_shm_layout::queue::{
    self, ClassView, TicketWord, FLAG_CANCEL_REQUESTED, T_CANCELLED, T_GRANTED, T_GRANTING,
    T_QUEUED,
};
use sluice_shm_layout::registry::ClientState;
use sluice_shm_layout::sync::Ordering;

/// The daemon's client index when it grants tickets (one past the last
/// client a region can have).
pub const DAEMON_GRANTER: u32 = sluice_shm_layout::limits::MAX_CLIENTS;

/// How far back the grant rate looks.
pub const RATE_WINDOW: Duration = Duration::from_secs(5);

/// Grant-rate samples per class.
#[derive(Default)]
pub struct RateSampler {
    samples: HashMap<u32, VecDeque<(Instant, u64)>>,
    last: Option<Instant>,
}

/// Sum of a class's `admitted` counter: totals plus every live block.
pub fn admitted(region: &Region, class_idx: u32) -> u64 {
    count(region, class_idx, counters::ADMITTED)
}

/// Sum of one counter of a class: totals plus every live block.
pub fn count(region: &Region, class_idx: u32, counter: usize) -> u64 {
    let Some(rec) = region.class(class_idx) else {
        return 0;
    };
    // Relaxed: counter snapshots.
    let mut sum = rec.totals.counts[counter].load(Ordering::Relaxed);
    for c in 0..region.geometry().caps.clients {
        let live = region.client(c).is_some_and(|r| {
            ClientState::decode(r.state.load(Ordering::Relaxed)).state != CLIENT_FREE
        });
        if live {
            if let Some(b) = region.counters(c, class_idx) {
                sum = sum.wrapping_add(b.counts[counter].load(Ordering::Relaxed));
            }
        }
    }
    sum
}

impl RateSampler {
    /// Take a sample (at most once a second) and publish each class's
    /// releases per second over the window: grants minus the growth of
    /// held slots (no counter on the release path). 0 when nothing was
    /// released in it: the ETA of a slot-waiting ticket is then unknown.
    pub fn sample(&mut self, region: &Region) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Duration::from_secs(1))
        {
            return;
        }
        self.last = Some(now);
        for i in 0..region.geometry().caps.classes {
            let Some(rec) = region.class(i) else { break };
            // Relaxed: the daemon is the only writer of `state`.
            if rec.state.load(Ordering::Relaxed) != CLASS_ACTIVE {
                self.samples.remove(&i);
                continue;
            }
            // Relaxed: fixed while the class exists (the daemon writes them).
            let (b, l) = (
                rec.slot_base.load(Ordering::Relaxed),
                rec.slot_len.load(Ordering::Relaxed),
            );
            let held = region
                .slots(b, l)
                .map(sluice_shm_layout::slots::in_flight)
                .unwrap_or(0);
            // Releases so far = grants so far − slots held now.
            let n = admitted(region, i).saturating_sub(held);
            let q = self.samples.entry(i).or_default();
            q.push_back((now, n));
            while q.len() > 2
                && q.front()
                    .is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW)
            {
                q.pop_front();
            }
            let rate = match (q.front(), q.back()) {
                (Some(&(t0, n0)), Some(&(t1, n1))) if t1 > t0 => {
                    let secs = t1.duration_since(t0).as_secs_f64();
                    (n1.saturating_sub(n0) as f64 / secs * 1000.0) as u64
                }
                _ => 0,
            };
            // Relaxed: an ETA input, read as a hint.
            rec.grant_rate_milli.store(rate, Ordering::Relaxed);
        }
    }
}

/// Grant what can be granted in every class with waiters.
pub fn dispatch_all(region: &Region) -> u32 {
    let now_ns = monotonic_ns();
    let now_units = ns_to_units(now_ns.saturating_sub(region.epoch_ns()));
    let mut granted = 0;
    for i in 0..region.geometry().caps.classes {
        let Some(rec) = region.class(i) else { break };
        // Relaxed: the daemon is the only writer of `state`; `waiters` is a
        // hint here (the waiters' own dispatch is the authority).
        if rec.state.load(Ordering::Relaxed) != CLASS_ACTIVE
            || rec.waiters.value.load(Ordering::Relaxed) == 0
        {
            continue;
        }
        let params = ClassParams::load(rec);
        let (sb, sl) = (
            rec.slot_base.load(Ordering::Relaxed),
            rec.slot_len.load(Ordering::Relaxed),
        );
        let (tb, tl) = (
            rec.ticket_base.load(Ordering::Relaxed),
            rec.ticket_len.load(Ordering::Relaxed),
        );
        let sl = if params.max_in_flight > 0 { sl } else { 0 };
        let (Some(slots), Some(tickets)) = (region.slots(sb, sl), region.tickets(tb, tl)) else {
            continue;
        };
        let view = ClassView {
            params,
            tat: &rec.tat.value,
            slots,
            tickets,
            waiters: &rec.waiters.value,
            age_after_ns: rec.age_after_ns.load(Ordering::Relaxed),
            held: class_held(region, rec),
        };
        granted += queue::dispatch(&view, DAEMON_GRANTER, now_ns, now_units).1;
    }
    granted
}

/// What `sluice cancel` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelResult {
    /// A queued ticket was cancelled; its waiter is told.
    Cancelled,
    /// The ticket is granted: its holder was asked to stop.
    Requested,
}

/// Why a cancel did nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CancelError {
    /// No live ticket has this id.
    #[error("no live ticket {0}: it ended already, or the id is wrong (see `sluice tickets`)")]
    NotFound(u64),
    /// It is in a state a cancel cannot change.
    #[error("ticket {id} is {state}: nothing to cancel")]
    Final {
        /// The id.
        id: u64,
        /// Its state name.
        state: &'static str,
    },
}

/// Cancel ticket `id`: a queued one is cancelled (the owner counts it); a
/// granted one gets its cancel-requested flag.
pub fn cancel(region: &Region, id: u64) -> Result<CancelResult, CancelError> {
    let (index, generation) = queue::split_id(id);
    let rec = region
        .tickets(index, 1)
        .and_then(|t| t.first())
        .ok_or(CancelError::NotFound(id))?;
    for _ in 0..10_000 {
        // Acquire pairs with the SeqCst transitions of the ticket.
        let w = TicketWord::decode(rec.state.load(Ordering::Acquire));
        if w.generation != generation {
            return Err(CancelError::NotFound(id));
        }
        match w.state {
            T_QUEUED => {
                if queue::transition(rec, w, w.with(T_CANCELLED, 0)).is_ok() {
                    queue::wake(rec);
                    return Ok(CancelResult::Cancelled);
                }
            }
            T_GRANTING => std::thread::yield_now(),
            T_GRANTED => {
                // Relaxed: a flag the holder polls; the wake below lets a
                // holder that sleeps on its ticket notice at once.
                rec.flags.fetch_or(FLAG_CANCEL_REQUESTED, Ordering::Relaxed);
                queue::wake(rec);
                return Ok(CancelResult::Requested);
            }
            s => {
                return Err(CancelError::Final {
                    id,
                    state: crate::stats::state_name(s),
                })
            }
        }
    }
    Err(CancelError::NotFound(id))
}

/// Pause or resume class `name`. Returns whether it was paused before.
pub fn set_paused(region: &Region, name: &str, paused: bool) -> Result<bool, String> {
    let idx = crate::region::find_class(region, name)
        .ok_or_else(|| format!("no class {name:?}: see `sluice stats` for the classes"))?;
    let rec = region.class(idx).ok_or("class index")?;
    let bit = sluice_shm_layout::layout::CLASS_PAUSED;
    // SeqCst: a resume must be ordered before the dispatch that follows it,
    // which reads the flag (Relaxed) after its own SeqCst operations.
    let before = if paused {
        rec.flags.fetch_or(bit, Ordering::SeqCst)
    } else {
        rec.flags.fetch_and(!bit, Ordering::SeqCst)
    };
    if !paused {
        dispatch_all(region);
    }
    Ok(before & bit != 0)
}

/// Trip (open by hand, no retry-after) or heal (close) dependency `name`.
pub fn set_tripped(region: &Region, name: &str, trip: bool) -> Result<(), String> {
    let idx = crate::region::find_dep(region, name).ok_or_else(|| {
        format!("no dependency {name:?}: see `sluice stats --json` for the dependencies")
    })?;
    let dep = region.dep(idx).ok_or("dependency index")?;
    if trip {
        sluice_shm_layout::breaker::trip(dep);
    } else {
        sluice_shm_layout::breaker::heal(dep);
        dispatch_all(region);
    }
    Ok(())
}

/// The daemon's side of the circuit breakers: windows and transitions.
#[derive(Default)]
pub struct Breakers {
    window_start: HashMap<u32, u64>,
}

impl Breakers {
    /// Evaluate every configured breaker once.
    pub fn tick(&mut self, region: &Region) {
        use sluice_shm_layout::breaker::{evaluate, Transition};
        let now = monotonic_ns();
        for i in 0..sluice_shm_layout::layout::DEPS {
            let Some(dep) = region.dep(i) else { break };
            let Some(name) = dep.name().filter(|n| !n.is_empty()) else {
                self.window_start.remove(&i);
                continue;
            };
            let start = *self.window_start.entry(i).or_insert(now);
            let t = evaluate(dep, now, start);
            match t {
                Transition::None => {}
                Transition::WindowReset => {
                    self.window_start.insert(i, now);
                }
                Transition::Opened { failures, total } => {
                    self.window_start.insert(i, now);
                    tracing::warn!(dependency = %name, failures, total, "breaker opened");
                }
                Transition::HalfOpen => {
                    self.window_start.insert(i, now);
                    tracing::info!(dependency = %name, "breaker half-open: probing");
                    dispatch_all(region);
                }
                Transition::Closed => {
                    self.window_start.insert(i, now);
                    tracing::info!(dependency = %name, "breaker closed");
                    dispatch_all(region);
                }
                Transition::Reopened => {
                    self.window_start.insert(i, now);
                    tracing::warn!(dependency = %name, "breaker reopened: a probe failed or was lost");
                }
            }
        }
    }
}

/// True when class `rec` may grant nothing now: paused, or a dependency
/// open.
pub fn class_held(region: &Region, rec: &sluice_shm_layout::layout::ClassRecord) -> bool {
    // Relaxed: policy bits and breaker modes, read as hints.
    let flags = rec.flags.load(Ordering::Relaxed);
    if flags & sluice_shm_layout::layout::CLASS_PAUSED != 0 {
        return true;
    }
    rec.deps.iter().any(|d| {
        d.load(Ordering::Relaxed)
            .checked_sub(1)
            .and_then(|i| region.dep(i))
            .is_some_and(|dep| {
                let w = sluice_shm_layout::breaker::BreakerWord::decode(
                    dep.state.load(Ordering::Relaxed),
                );
                w.mode != sluice_shm_layout::breaker::CLOSED
            })
    })
}

/// Evict tenant keys idle longer than `idle_after` (two steps with a grace
/// period in between, see `sluice_shm_layout::tenants`). Keys named in the
/// config are seeded again by the daemon.
pub fn evict_tenants(region: &Region) {
    use sluice_shm_layout::tenants;
    let table = region.tenants();
    let now = monotonic_ns();
    // Relaxed: a config value written by this daemon.
    let idle = region.header().tenant_idle_ns.load(Ordering::Relaxed);
    let freed = tenants::finish_evictions(table, now, tenants::EVICTION_GRACE_NS);
    let marked = if idle > 0 {
        tenants::evict_idle(table, now, idle)
    } else {
        0
    };
    if freed > 0 || marked > 0 {
        tracing::debug!(marked, freed, "tenant keys evicted while idle");
    }
}

/// Check the header fields only the daemon writes against what they must
/// be, repair them, and say what was wrong (the region is untrusted: any
/// process with write access can scribble on it). `draining` is the
/// daemon's own state.
pub fn audit_header(region: &Region, draining: bool) -> Vec<String> {
    use sluice_shm_layout::layout::{FLAG_DRAINING, LAYOUT_VERSION, MAGIC};
    let h = region.header();
    let geo = region.geometry();
    let mut found = Vec::new();
    let want_flags = if draining { FLAG_DRAINING } else { 0 };
    // Relaxed throughout: the daemon is the only legitimate writer of these
    // fields; clients read them as hints (flags) or once at attach.
    let flags = h.flags.load(Ordering::Relaxed);
    if flags != want_flags {
        found.push(format!(
            "header flags were {flags:#x}, expected {want_flags:#x}"
        ));
        h.flags.store(want_flags, Ordering::Relaxed);
    }
    if h.magic.load(Ordering::Relaxed) != MAGIC {
        found.push("header magic overwritten".into());
        h.magic.store(MAGIC, Ordering::Relaxed);
    }
    if h.layout_version.load(Ordering::Relaxed) != LAYOUT_VERSION {
        found.push("header layout version overwritten".into());
        h.layout_version.store(LAYOUT_VERSION, Ordering::Release);
    }
    let geometry = [
        (&h.off_classes, geo.off_classes, "off_classes"),
        (&h.off_clients, geo.off_clients, "off_clients"),
        (&h.off_counters, geo.off_counters, "off_counters"),
        (&h.off_slots, geo.off_slots, "off_slots"),
        (&h.off_tickets, geo.off_tickets, "off_tickets"),
        (&h.region_size, geo.size, "region_size"),
    ];
    for (field, want, name) in geometry {
        if field.load(Ordering::Relaxed) != want {
            found.push(format!("header {name} overwritten"));
            field.store(want, Ordering::Relaxed);
        }
    }
    let pid = std::process::id();
    if h.daemon_pid.load(Ordering::Relaxed) != pid {
        found.push("header daemon pid overwritten".into());
        h.daemon_pid.store(pid, Ordering::Relaxed);
    }
    found
}

/// Slot words held by no registered client (scribbles, or a bug): returned
/// and reported. A word's owner must be a non-free client record of the
/// same generation.
pub fn audit_slots(region: &Region) -> u64 {
    use sluice_shm_layout::slots::{self, tag_owner_index};
    let mut freed = 0;
    for i in 0..region.geometry().caps.classes {
        let Some(rec) = region.class(i) else { break };
        // Relaxed: the daemon is the only writer of these fields.
        if rec.state.load(Ordering::Relaxed) == sluice_shm_layout::layout::CLASS_FREE {
            continue;
        }
        let (b, l) = (
            rec.slot_base.load(Ordering::Relaxed),
            rec.slot_len.load(Ordering::Relaxed),
        );
        let Some(words) = region.slots(b, l) else {
            continue;
        };
        for w in words {
            // Relaxed: a snapshot; the CAS below only frees the exact word seen.
            let tag = w.load(Ordering::Relaxed);
            if tag == 0 {
                continue;
            }
            let owner_ok = tag_owner_index(tag)
                .and_then(|o| region.client(o))
                .is_some_and(|c| {
                    let st = ClientState::decode(c.state.load(Ordering::Acquire));
                    st.state != CLIENT_FREE && u64::from(st.generation & 0xFFFF) == tag >> 48
                });
            if !owner_ok && slots::release_one(w, tag) {
                freed += 1;
                rec.totals.counts[counters::RECLAIMED].fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    freed
}

/// Clear a class's overcommit bit once no permit is held at or above its
/// (lowered) `max_in_flight`: admission goes back to the plain claim.
pub fn clear_overcommit(region: &Region) {
    use sluice_shm_layout::layout::CLASS_OVERCOMMIT;
    for i in 0..region.geometry().caps.classes {
        let Some(rec) = region.class(i) else { break };
        // Relaxed: the daemon is the only writer of these fields.
        if rec.flags.load(Ordering::Relaxed) & CLASS_OVERCOMMIT == 0 {
            continue;
        }
        let max = rec.max_in_flight.load(Ordering::Relaxed);
        let (b, l) = (
            rec.slot_base.load(Ordering::Relaxed),
            rec.slot_len.load(Ordering::Relaxed),
        );
        let Some(words) = region.slots(b, l) else {
            continue;
        };
        // SeqCst loads: a held word above the limit must be seen before
        // the bit goes; a claim there is impossible (it is above every
        // ceiling), so once none is seen, none appears.
        let above = words
            .get(max as usize..)
            .is_some_and(|tail| tail.iter().any(|w| w.load(Ordering::SeqCst) != 0));
        if !above {
            rec.flags.fetch_and(!CLASS_OVERCOMMIT, Ordering::SeqCst);
        }
    }
}
