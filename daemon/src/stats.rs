//! Reading a region for `sluice stats`: a snapshot of the daemon and every
//! class, summed from the class totals and every live client's counters.
//!
//! Everything here is a read; it works from a read-only mapping.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;
use sluice_client::clock::monotonic_ns;
use sluice_client::{OpenError, RegionMap};
use sluice_shm_layout::admit::ClassParams;
use sluice_shm_layout::bucket::ns_to_units;
use sluice_shm_layout::counters::{self, Reason};
use sluice_shm_layout::layout::{ClassRecord, Region, CLASS_ACTIVE, CLIENT_FREE, LANES};
use sluice_shm_layout::queue::{self, TicketWord};
use sluice_shm_layout::registry::ClientState;
use sluice_shm_layout::slots;
use sluice_shm_layout::sync::Ordering;

/// The daemon as the region shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DaemonInfo {
    /// Last daemon pid written in the header (0: never).
    pub pid: u32,
    /// True while a daemon holds the region's lock.
    pub running: bool,
    /// Milliseconds since its last heartbeat.
    pub heartbeat_age_ms: u64,
    /// Region generation.
    pub generation: u64,
    /// True while draining.
    pub draining: bool,
    /// Client processes attached now.
    pub clients: u64,
    /// Client records in the region.
    pub clients_capacity: u32,
    /// Attaches refused because every client record was taken.
    pub registry_full: u64,
}

/// One class.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClassStats {
    /// Name.
    pub name: String,
    /// Slots held now.
    pub in_flight: u64,
    /// Slot limit, null when the class has no slots.
    pub max_in_flight: Option<u64>,
    /// Degrade threshold, null without slots.
    pub soft_in_flight: Option<u64>,
    /// Per-lane ceilings, keyed by lane name (absent without slots).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lane_ceilings: Option<BTreeMap<String, u64>>,
    /// Tokens per second, null without a rate.
    pub rate: Option<f64>,
    /// Bucket burst, null without a rate.
    pub burst: Option<u64>,
    /// Bucket excess burst, null without a rate.
    pub excess_burst: Option<u64>,
    /// Whole tokens available now at green, null without a rate.
    pub tokens_available: Option<u64>,
    /// Every grant.
    pub admitted: u64,
    /// Degraded grants.
    pub degraded: u64,
    /// Grants that had waited.
    pub granted_from_queue: u64,
    /// Tickets waiting now (a gauge).
    pub queued: u64,
    /// Tickets cancelled.
    pub cancelled: u64,
    /// Tickets expired.
    pub expired: u64,
    /// Permits returned from dead holders.
    pub reclaimed: u64,
    /// Refusals by reason (every reason present, 0 included).
    pub refused: BTreeMap<String, u64>,
    /// Tickets waiting now, per lane (by the lane they count in now).
    pub queued_by_lane: BTreeMap<String, u64>,
    /// Wait before a grant from the queue, percentiles in ms (null until
    /// something waited).
    pub wait_ms: WaitPercentiles,
    /// Outcomes reported on release.
    pub outcomes: BTreeMap<String, u64>,
    /// Paused by its owner.
    pub paused: bool,
    /// Retry budget left (units), null without a budget.
    pub retry_budget: Option<f64>,
    /// Dependencies it waits on.
    pub depends_on: Vec<String>,
    /// The fleet lease, absent for a class without `fleet_rate`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fleet: Option<FleetStats>,
}

/// A fleet class's lease, as the daemon and its clients left it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FleetStats {
    /// Tokens leased from the store, in total.
    pub leased: u64,
    /// Leased tokens spent by clients.
    pub used: u64,
    /// Unspent tokens handed back (at each renewal, removal, shutdown).
    pub returned: u64,
    /// Tokens voided because their lease expired.
    pub expired: u64,
    /// Credit left in the current lease.
    pub credit: u64,
    /// The lease has expired: clients spend the fallback (or follow
    /// `on_store_down`).
    pub on_fallback: bool,
    /// Tokens spent on the fallback bucket, in total.
    pub fallback_used: u64,
    /// Would-be refusals in shadow mode.
    pub shadow_refused: u64,
    /// Last lease round trip, µs.
    pub lease_rtt_us: u64,
    /// Store outages seen.
    pub outages: u64,
    /// Active hosts the store last reported.
    pub hosts: u64,
    /// The store holds a rate or burst other than this host's.
    pub config_mismatch: bool,
}

impl FleetStats {
    /// Read a class's fleet words (racy snapshots: each word is exact, the
    /// set may straddle a lease).
    pub fn of(rec: &ClassRecord, now_ns: u64) -> FleetStats {
        use sluice_shm_layout::fleet;
        // Relaxed throughout: statistics.
        let load = |w: &sluice_shm_layout::sync::AtomicU64| w.load(Ordering::Relaxed);
        let leased = load(&rec.fleet_leased);
        let returned = load(&rec.fleet_returned);
        let expired = load(&rec.fleet_expired);
        let credit = fleet::tokens(load(&rec.fleet_credit));
        let status = load(&rec.fleet_status);
        FleetStats {
            leased,
            used: leased.saturating_sub(returned + expired + credit),
            returned,
            expired,
            credit,
            on_fallback: !fleet::lease_valid(&rec.fleet_lease_until_ns, now_ns),
            fallback_used: load(&rec.fleet_fallback_used),
            shadow_refused: load(&rec.fleet_shadow_refused),
            lease_rtt_us: load(&rec.fleet_rtt_us),
            outages: load(&rec.fleet_outages),
            hosts: status & 0xffff_ffff,
            config_mismatch: status & fleet::STATUS_MISMATCH != 0,
        }
    }
}

/// One dependency's circuit breaker.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DependencyStats {
    /// Name.
    pub name: String,
    /// `closed`, `open` or `half_open`.
    pub state: &'static str,
    /// Tripped by hand (`sluice trip`).
    pub manual: bool,
    /// When an open breaker probes again, ms from now (null: by hand, or
    /// not open).
    pub retry_after_ms: Option<u64>,
    /// Successes reported in the current window.
    pub successes: u64,
    /// Failures reported in the current window.
    pub failures: u64,
}

/// Wait-time percentiles, from the region's log-linear histogram.
#[derive(Debug, Clone, Serialize, PartialEq, Default)]
pub struct WaitPercentiles {
    /// Median.
    pub p50: Option<f64>,
    /// 90th percentile.
    pub p90: Option<f64>,
    /// 99th percentile.
    pub p99: Option<f64>,
    /// Largest bucket seen.
    pub max: Option<f64>,
    /// Grants counted.
    pub count: u64,
}

/// One ticket, as `sluice tickets --json` prints it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TicketInfo {
    /// Id for `sluice cancel`.
    pub id: u64,
    /// Class name.
    pub class: String,
    /// Lane it counts in now (aging may have raised it).
    pub lane: String,
    /// `queued`, `granted`, `cancelled`, `expired` or `verifying`.
    pub state: &'static str,
    /// 1-based place in the class's queue; null unless queued.
    pub position: Option<u32>,
    /// Honest ETA in ms; null when unknown or not queued.
    pub eta_ms: Option<u64>,
    /// Since it was enqueued (or, verifying, since its holder died).
    pub age_ms: u64,
    /// Owner's pid.
    pub pid: u32,
    /// Cost.
    pub cost: u64,
    /// True once a cancel was requested of its holder.
    pub cancel_requested: bool,
}

/// The lowercase name of a ticket state.
pub fn state_name(state: u64) -> &'static str {
    match state {
        queue::T_CLAIMED | queue::T_QUEUED | queue::T_GRANTING => "queued",
        queue::T_GRANTED => "granted",
        queue::T_CANCELLED => "cancelled",
        queue::T_EXPIRED => "expired",
        queue::T_VERIFYING => "verifying",
        _ => "free",
    }
}

/// The whole snapshot: `sluice stats --json` prints exactly this.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Snapshot {
    /// The daemon.
    pub daemon: DaemonInfo,
    /// Active classes, in region order.
    pub classes: Vec<ClassStats>,
    /// Configured dependencies.
    pub dependencies: Vec<DependencyStats>,
}

impl Snapshot {
    /// Open `path` read-only and take a snapshot.
    pub fn read(path: &Path) -> Result<Snapshot, OpenError> {
        let map = RegionMap::open(path, false)?;
        Ok(Self::of(&map))
    }

    /// Take a snapshot of a mapped region.
    pub fn of(map: &RegionMap) -> Snapshot {
        let region = map.region();
        let h = region.header();
        let now = monotonic_ns();
        // Relaxed: advisory values for display.
        let heartbeat = h.heartbeat_ns.load(Ordering::Relaxed);
        let daemon = DaemonInfo {
            pid: h.daemon_pid.load(Ordering::Relaxed),
            running: crate::region::lock_held(map.file()).unwrap_or(false),
            heartbeat_age_ms: now.saturating_sub(heartbeat) / 1_000_000,
            generation: h.generation.load(Ordering::Relaxed),
            draining: h.flags.load(Ordering::Relaxed) & sluice_shm_layout::layout::FLAG_DRAINING
                != 0,
            clients: 0,
            clients_capacity: 0,
            registry_full: 0,
        };
        let live = live_clients(region);
        let daemon = DaemonInfo {
            clients: live.len() as u64,
            clients_capacity: region.geometry().caps.clients,
            // Relaxed: a counter.
            registry_full: h.registry_full.load(Ordering::Relaxed),
            ..daemon
        };
        let mut classes = Vec::new();
        for i in 0..region.geometry().caps.classes {
            let Some(rec) = region.class(i) else { break };
            // Acquire pairs with the daemon's Release store of `state` after
            // it wrote the class.
            if rec.state.load(Ordering::Acquire) != CLASS_ACTIVE {
                continue;
            }
            let Some(name) = rec.name() else { continue };
            let mut sums = [0u64; counters::COUNT];
            for (k, c) in rec.totals.counts.iter().enumerate() {
                // Relaxed: a snapshot of counters.
                sums[k] = sums[k].wrapping_add(c.load(Ordering::Relaxed));
            }
            for &client in &live {
                if let Some(block) = region.counters(client, i) {
                    for (k, c) in block.counts.iter().enumerate() {
                        // Relaxed: a snapshot of counters.
                        sums[k] = sums[k].wrapping_add(c.load(Ordering::Relaxed));
                    }
                }
            }
            let p = ClassParams::load(rec);
            // Relaxed: the slot range is fixed while the class exists.
            let base = rec.slot_base.load(Ordering::Relaxed);
            let len = rec.slot_len.load(Ordering::Relaxed);
            let in_flight = region.slots(base, len).map(slots::in_flight).unwrap_or(0);
            let has_slots = p.max_in_flight > 0;
            let tokens_available = p.rate.map(|r| {
                // Relaxed: a display snapshot of the bucket.
                let tat = rec.tat.value.load(Ordering::Relaxed);
                let t_now = ns_to_units(now.saturating_sub(region.epoch_ns()));
                let debt = tat.saturating_sub(t_now);
                let room = u128::from(r.burst) * u128::from(r.t);
                (room.saturating_sub(u128::from(debt)) / u128::from(r.t.max(1))) as u64
            });
            let refused = Reason::ALL
                .iter()
                .map(|r| (r.as_str().to_string(), sums[r.counter()]))
                .collect();
            let tickets = region
                .tickets(
                    rec.ticket_base.load(Ordering::Relaxed),
                    rec.ticket_len.load(Ordering::Relaxed),
                )
                .unwrap_or(&[]);
            let age = rec.age_after_ns.load(Ordering::Relaxed);
            let best = queue::best(tickets, now, age);
            let queued_by_lane: BTreeMap<String, u64> = LANES
                .iter()
                .zip(best.queued)
                .map(|(l, n)| (l.to_string(), u64::from(n)))
                .collect();
            let queued = queued_by_lane.values().sum();
            let outcomes = [
                ("completed", counters::OUTCOME_COMPLETED),
                ("partial", counters::OUTCOME_PARTIAL),
                ("failed", counters::OUTCOME_FAILED),
                ("cancelled", counters::OUTCOME_CANCELLED),
            ]
            .iter()
            .map(|(n, k)| (n.to_string(), sums[*k]))
            .collect();
            let wait_ms = percentiles(rec);
            let flags = rec.flags.load(Ordering::Relaxed);
            let retry_budget =
                (flags & sluice_shm_layout::layout::CLASS_RETRY_BUDGET != 0).then(|| {
                    rec.retry_tokens.load(Ordering::Relaxed) as f64
                        / sluice_shm_layout::retry::UNIT as f64
                });
            let depends_on = rec
                .deps
                .iter()
                .filter_map(|d| d.load(Ordering::Relaxed).checked_sub(1))
                .filter_map(|i| region.dep(i).and_then(|d| d.name()))
                .collect();
            classes.push(ClassStats {
                name,
                in_flight,
                max_in_flight: has_slots.then_some(u64::from(p.max_in_flight)),
                soft_in_flight: has_slots.then_some(u64::from(p.soft_in_flight)),
                lane_ceilings: has_slots.then(|| {
                    LANES
                        .iter()
                        .enumerate()
                        .map(|(l, n)| (n.to_string(), u64::from(p.ceiling(l))))
                        .collect()
                }),
                rate: p.rate.map(|r| 1e9 * 64.0 / r.t as f64),
                burst: p.rate.map(|r| r.burst),
                excess_burst: p.rate.map(|r| r.excess),
                tokens_available,
                admitted: sums[counters::ADMITTED],
                degraded: sums[counters::DEGRADED],
                granted_from_queue: sums[counters::GRANTED_FROM_QUEUE],
                queued,
                cancelled: sums[counters::CANCELLED],
                expired: sums[counters::EXPIRED],
                reclaimed: sums[counters::RECLAIMED],
                refused,
                queued_by_lane,
                wait_ms,
                outcomes,
                paused: flags & sluice_shm_layout::layout::CLASS_PAUSED != 0,
                retry_budget,
                depends_on,
                fleet: (flags & sluice_shm_layout::layout::CLASS_FLEET != 0)
                    .then(|| FleetStats::of(rec, now)),
            });
        }
        let dependencies = (0..sluice_shm_layout::layout::DEPS)
            .filter_map(|i| region.dep(i))
            .filter_map(|d| {
                let name = d.name().filter(|n| !n.is_empty())?;
                let w = sluice_shm_layout::breaker::BreakerWord::decode(
                    d.state.load(Ordering::Relaxed),
                );
                let until = d.open_until_ns.load(Ordering::Relaxed);
                let open = w.mode == sluice_shm_layout::breaker::OPEN;
                Some(DependencyStats {
                    name,
                    state: w.mode_name(),
                    manual: w.manual,
                    retry_after_ms: (open && !w.manual && until > 0)
                        .then(|| until.saturating_sub(now) / 1_000_000),
                    successes: d.successes.load(Ordering::Relaxed),
                    failures: d.failures.load(Ordering::Relaxed),
                })
            })
            .collect();
        Snapshot {
            daemon,
            classes,
            dependencies,
        }
    }

    /// The class named `name`.
    pub fn class(&self, name: &str) -> Option<&ClassStats> {
        self.classes.iter().find(|c| c.name == name)
    }
}

/// Client records whose counters are not yet folded.
fn live_clients(region: &Region) -> Vec<u32> {
    (0..region.geometry().caps.clients)
        .filter(|&i| {
            region.client(i).is_some_and(|r| {
                // Relaxed: a snapshot; a record folded during the read is at
                // worst counted twice or missed once in this one snapshot.
                ClientState::decode(r.state.load(Ordering::Relaxed)).state != CLIENT_FREE
            })
        })
        .collect()
}

/// Percentiles of a class's wait histogram, through hdrhistogram: each
/// bucket is recorded at its lower bound, so values are exact to the
/// bucket's width (a quarter of a power of two).
fn percentiles(rec: &ClassRecord) -> WaitPercentiles {
    let Ok(mut h) = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 1 << 40, 2) else {
        return WaitPercentiles::default();
    };
    // The region is untrusted: counts are capped so that no sum of them
    // can overflow inside the histogram.
    let mut total: u64 = 0;
    for (b, c) in rec.wait_hist.iter().enumerate() {
        // Relaxed: counter snapshots.
        let n = c.load(Ordering::Relaxed).min(1 << 48);
        if n > 0 && total.checked_add(n).is_some_and(|t| t < 1 << 56) {
            total += n;
            let _ = h.record_n(sluice_client::hist_bucket_floor(b).clamp(1, 1 << 40), n);
        }
    }
    if h.is_empty() {
        return WaitPercentiles::default();
    }
    let ms = |us: u64| Some(us as f64 / 1000.0);
    WaitPercentiles {
        p50: ms(h.value_at_quantile(0.50)),
        p90: ms(h.value_at_quantile(0.90)),
        p99: ms(h.value_at_quantile(0.99)),
        max: ms(h.max()),
        count: h.len(),
    }
}

/// Every live ticket (not free) of every active class.
pub fn tickets(map: &RegionMap) -> Vec<TicketInfo> {
    let region = map.region();
    let now = monotonic_ns();
    let now_units = ns_to_units(now.saturating_sub(region.epoch_ns()));
    let mut out = Vec::new();
    for i in 0..region.geometry().caps.classes {
        let Some(rec) = region.class(i) else { break };
        // Acquire pairs with the daemon's Release store of `state`.
        if rec.state.load(Ordering::Acquire) == sluice_shm_layout::layout::CLASS_FREE {
            continue;
        }
        let Some(name) = rec.name() else { continue };
        // Relaxed throughout: a listing snapshot.
        let tickets = region
            .tickets(
                rec.ticket_base.load(Ordering::Relaxed),
                rec.ticket_len.load(Ordering::Relaxed),
            )
            .unwrap_or(&[]);
        let age = rec.age_after_ns.load(Ordering::Relaxed);
        let p = ClassParams::load(rec);
        let paused =
            rec.flags.load(Ordering::Relaxed) & sluice_shm_layout::layout::CLASS_PAUSED != 0;
        let held = crate::maintain::class_held(region, rec);
        let in_flight = region
            .slots(
                rec.slot_base.load(Ordering::Relaxed),
                rec.slot_len.load(Ordering::Relaxed),
            )
            .map(slots::in_flight)
            .unwrap_or(0);
        for (k, t) in tickets.iter().enumerate() {
            let w = TicketWord::decode(t.state.load(Ordering::Relaxed));
            if w.state == queue::T_FREE {
                continue;
            }
            let mut state = state_name(w.state);
            if state == "queued" && t.flags.load(Ordering::Relaxed) & queue::FLAG_BLOCKED_QUOTA != 0
            {
                state = "blocked_by_quota";
            } else if state == "queued" && held {
                state = if paused {
                    "paused_by_owner"
                } else {
                    "waiting_on_dependency"
                };
            }
            let lane = t.lane.load(Ordering::Relaxed);
            let enq = t.enqueued_ns.load(Ordering::Relaxed);
            let eff = queue::effective_lane(lane, enq, now, age);
            let (position, eta_ms) = if state == "queued" || held && w.state == queue::T_QUEUED {
                let (pos, cost_ahead) = queue::position(tickets, k, now, age).unwrap_or((1, 0));
                let eta = queue::eta_ns(&queue::EtaInput {
                    rate: p.rate.as_ref(),
                    tat_units: rec.tat.value.load(Ordering::Relaxed),
                    now_units,
                    has_slots: p.max_in_flight > 0,
                    slot_free: in_flight < u64::from(p.ceiling(eff as usize)),
                    position: pos,
                    cost_ahead,
                    grants_per_sec_milli: rec.grant_rate_milli.load(Ordering::Relaxed),
                });
                (Some(pos), eta.map(|ns| ns.div_ceil(1_000_000)))
            } else {
                (None, None)
            };
            let index = rec.ticket_base.load(Ordering::Relaxed) + k as u32;
            out.push(TicketInfo {
                id: queue::ticket_id(index, w.generation),
                class: name.clone(),
                lane: LANES
                    .get(eff as usize)
                    .unwrap_or(&"interactive")
                    .to_string(),
                state,
                position,
                eta_ms,
                age_ms: now.saturating_sub(enq) / 1_000_000,
                pid: t.pid.load(Ordering::Relaxed),
                cost: t.cost.load(Ordering::Relaxed),
                cancel_requested: t.flags.load(Ordering::Relaxed) & queue::FLAG_CANCEL_REQUESTED
                    != 0,
            });
        }
    }
    out.sort_by(|a, b| {
        (a.class.as_str(), a.position, a.id).cmp(&(b.class.as_str(), b.position, b.id))
    });
    out
}
