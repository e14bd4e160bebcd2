//! The sluice client library: attach to a region, look a class up once, then
//! ask whether work may start, in nanoseconds.
//!
//! ```no_run
//! use sluice_client::{Client, Decision, Request};
//!
//! let client = Client::attach_default()?;
//! let reports = client.class("reports")?;
//! match reports.try_acquire(&Request::new().cost(2))? {
//!     Decision::Admitted(permit) => {
//!         // do the work; the permit is released when it drops
//!         drop(permit);
//!     }
//!     Decision::Refused(no) => eprintln!("{no}"),
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! The fast path (`try_acquire` and the permit's release, no waiters) is a
//! few atomic operations on the shared mapping: no system call, no lock, no
//! allocation, no daemon round trip. The only clock read is the vDSO's
//! CLOCK_MONOTONIC, and only for classes with a rate.
//!
//! It fails closed: no region means an error. [`Client::attach_or_fail_open`]
//! lets an application choose to admit everything while detached; it counts
//! and logs what it let through.

pub mod clock;
pub mod map;
mod policy;
pub mod wait;

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use sluice_shm_layout::admit::{self, Admission, Ask, ClassParams};
use sluice_shm_layout::counters::{self, Reason};
use sluice_shm_layout::fleet;
use sluice_shm_layout::layout::{
    ClassRecord, CounterBlock, CLASS_ACTIVE, CLASS_FLEET, CLIENT_ALIVE, CLIENT_EXITING,
    FLAG_DRAINING, FLAG_REPLACED,
};
use sluice_shm_layout::queue::{self, ClassView, TicketRecord};
use sluice_shm_layout::registry;
use sluice_shm_layout::slots::{self, Owner, SlotGrant, INLINE_SLOTS};
use sluice_shm_layout::sync::{AtomicU64, Ordering};

pub use map::{region_path, OpenError, RegionMap, DEFAULT_REGION, REGION_ENV};
pub use sluice_shm_layout::counters::Reason as RefuseReason;
pub use wait::{Enqueued, Expiry, Outcome, Ticket, TicketState};

/// Permit sequence used by permits whose slots fit inline: they release by
/// position, so they need no unique number (and no shared counter).
const POSITIONAL_SEQ: u32 = 1;

/// A priority lane.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Lane {
    /// Highest priority.
    Critical,
    /// The default lane.
    #[default]
    Interactive,
    /// Bulk work.
    Batch,
    /// Lowest priority.
    Maintenance,
}

impl Lane {
    /// Every lane, highest first.
    pub const ALL: [Lane; 4] = [
        Lane::Critical,
        Lane::Interactive,
        Lane::Batch,
        Lane::Maintenance,
    ];

    /// The lane's index in the region (0 = critical).
    pub fn index(self) -> usize {
        self as usize
    }

    /// The lane's name.
    pub fn as_str(self) -> &'static str {
        sluice_shm_layout::layout::LANES[self.index()]
    }
}

impl FromStr for Lane {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Lane::ALL
            .into_iter()
            .find(|l| l.as_str() == s)
            .ok_or_else(|| {
                format!("unknown lane {s:?}: use critical, interactive, batch or maintenance")
            })
    }
}

impl fmt::Display for Lane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a piece of work asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request<'k> {
    /// Units of cost: tokens and slots (default 1; 0 is a usage error).
    pub cost: u64,
    /// Priority lane (default interactive).
    pub lane: Lane,
    /// Which attempt this is, 1 for the first (default 1). Retries draw on
    /// the class's retry budget.
    pub attempt: u32,
    /// Tenant key, required by classes with `tenants = true`.
    pub tenant: Option<&'k str>,
    /// Accept a smaller grant: the largest cost admissible now.
    pub allow_partial: bool,
}

impl Default for Request<'_> {
    fn default() -> Self {
        Self {
            cost: 1,
            lane: Lane::Interactive,
            attempt: 1,
            tenant: None,
            allow_partial: false,
        }
    }
}

impl<'k> Request<'k> {
    /// Cost 1, lane interactive, first attempt.
    pub fn new() -> Self {
        Self::default()
    }

    /// Set the cost.
    pub fn cost(mut self, cost: u64) -> Self {
        self.cost = cost;
        self
    }

    /// Set the lane.
    pub fn lane(mut self, lane: Lane) -> Self {
        self.lane = lane;
        self
    }

    /// Set the attempt number (1 = first).
    pub fn attempt(mut self, attempt: u32) -> Self {
        self.attempt = attempt;
        self
    }

    /// Set the tenant key.
    pub fn tenant(mut self, key: &'k str) -> Self {
        self.tenant = Some(key);
        self
    }

    /// Accept a partial grant (the largest cost admissible now, see
    /// [`Permit::cost`]).
    pub fn allow_partial(mut self, yes: bool) -> Self {
        self.allow_partial = yes;
        self
    }
}

/// A refusal: a typed reason and, where one exists, when to come back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// Why.
    pub reason: Reason,
    /// When a retry would be admitted (exact for the rate), if known.
    pub retry_after: Option<Duration>,
    /// For `smaller_scope`: the largest cost this class could admit.
    pub largest_cost: Option<u64>,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "refused: {}", self.reason)?;
        if let Some(n) = self.largest_cost {
            write!(f, " (largest admissible cost is {n})")?;
        }
        match self.retry_after {
            Some(d) => write!(f, ", retry after {}", fmt_duration(d)),
            None if self.reason == Reason::NotNow => write!(f, ", retry time unknown"),
            None => Ok(()),
        }
    }
}

/// Format a duration for people, rounded up: `950us`, `0.578s`, `4m05s`,
/// `8h00m00s`.
pub fn fmt_duration(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns >= 60_000_000_000 {
        // Whole seconds, rounded up (a retry-after is never early).
        let total = ns.div_ceil(1_000_000_000);
        let (h, m, sec) = (total / 3600, total % 3600 / 60, total % 60);
        if h > 0 {
            format!("{h}h{m:02}m{sec:02}s")
        } else {
            format!("{m}m{sec:02}s")
        }
    } else if ns >= 1_000_000 {
        // Milliseconds, rounded up.
        let ms = ns.div_ceil(1_000_000);
        format!("{}.{:03}s", ms / 1000, ms % 1000).replace(".000s", "s")
    } else if ns >= 1_000 {
        format!("{}us", ns.div_ceil(1_000))
    } else {
        format!("{ns}ns")
    }
}

/// The answer to a request.
#[derive(Debug)]
pub enum Decision<'a> {
    /// Work may start; the permit is released when dropped.
    Admitted(Permit<'a>),
    /// Work may not start; nothing is held.
    Refused(Refusal),
}

impl<'a> Decision<'a> {
    /// The permit, if admitted.
    pub fn permit(self) -> Option<Permit<'a>> {
        match self {
            Decision::Admitted(p) => Some(p),
            Decision::Refused(_) => None,
        }
    }

    /// True if admitted.
    pub fn is_admitted(&self) -> bool {
        matches!(self, Decision::Admitted(_))
    }
}

/// Why attaching failed.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The region could not be opened or is not usable.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// Every client record is taken.
    #[error("region {path}: all {capacity} client records are taken: raise daemon.capacity.clients in the config, or see daemon.clients and daemon.registry_full in `sluice stats --json`")]
    RegistryFull {
        /// The region.
        path: PathBuf,
        /// Its client capacity.
        capacity: u32,
    },
    /// The daemon took our record back while we registered.
    #[error("region {path}: registration was revoked while in progress: retry")]
    Revoked {
        /// The region.
        path: PathBuf,
    },
}

/// Why a class could not be looked up.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// No active class has this name.
    #[error("unknown class {name:?} in region {path}: known classes are {known}")]
    UnknownClass {
        /// The name asked for.
        name: String,
        /// The region.
        path: PathBuf,
        /// The names that exist, comma separated.
        known: String,
    },
}

/// Why a request could not even be decided (a usage error, not a refusal).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AcquireError {
    /// Cost 0 has no meaning.
    #[error("cost 0 is not a request: ask for at least 1")]
    ZeroCost,
    /// The attempt number 0 is not an attempt.
    #[error("attempt 0 is not an attempt: the first attempt is 1")]
    ZeroAttempt,
    /// A reload removed or replaced the class.
    #[error("class {name:?} was removed or replaced by a reload: look it up again")]
    ClassGone {
        /// Its name.
        name: String,
    },
    /// The region file vanished and the daemon re-created it.
    #[error("region {path} was re-created by sluiced (its file vanished): attach again with Client::attach")]
    RegionReplaced {
        /// The region path.
        path: PathBuf,
    },
    /// The class requires a tenant key and the request has none.
    #[error("this class has tenants = true: every request must carry a tenant key")]
    TenantRequired,
    /// The tenant key is empty or too long.
    #[error("tenant key of {len} bytes: it must be 1 to {max} bytes")]
    BadTenant {
        /// Its length.
        len: usize,
        /// The longest allowed.
        max: usize,
    },
    /// The region's class record is unusable (corrupt).
    #[error("class {name:?} record is corrupt: {what}")]
    Corrupt {
        /// Its name.
        name: String,
        /// What was wrong.
        what: &'static str,
    },
}

struct Attached {
    map: RegionMap,
    owner: Owner,
    pid: u32,
    epoch_ns: u64,
}

/// A process attached to a region (or, by choice, failing open without one).
pub struct Client {
    attached: Option<Attached>,
    path: PathBuf,
    /// Requests admitted while fail-open and detached.
    let_through: AtomicU64,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("path", &self.path)
            .field("attached", &self.attached.is_some())
            .finish()
    }
}

impl Client {
    /// Attach to the default region (`$SLUICE_REGION`, else
    /// `/dev/shm/sluice`).
    pub fn attach_default() -> Result<Client, AttachError> {
        Self::attach(region_path(None))
    }

    /// Attach to the region at `path` and register this process.
    pub fn attach(path: impl AsRef<Path>) -> Result<Client, AttachError> {
        let path = path.as_ref().to_path_buf();
        let map = RegionMap::open(&path, true)?;
        let region = map.region();
        let pid = std::process::id();
        let start = clock::process_start_time(pid).unwrap_or(0);
        let caps = region.geometry().caps;
        let records = (0..caps.clients).filter_map(|i| region.client(i).map(|r| (i, &r.state)));
        let Some((index, generation)) = registry::claim(records, pid) else {
            // Relaxed: a counter for stats.
            region
                .header()
                .registry_full
                .fetch_add(1, Ordering::Relaxed);
            return Err(AttachError::RegistryFull {
                path,
                capacity: caps.clients,
            });
        };
        let rec = region
            .client(index)
            .ok_or(AttachError::Revoked { path: path.clone() })?;
        if !registry::activate(rec, generation, pid, start) {
            return Err(AttachError::Revoked { path });
        }
        let epoch_ns = region.epoch_ns();
        // Tell the daemon we are here (one datagram, best effort), so it
        // watches this process from now rather than from its next scan.
        if let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() {
            let _ = sock.set_nonblocking(true);
            let _ = sock.send_to(b"attach", map::wake_socket(&path));
        }
        Ok(Client {
            attached: Some(Attached {
                map,
                owner: Owner { index, generation },
                pid,
                epoch_ns,
            }),
            path,
            let_through: AtomicU64::new(0),
        })
    }

    /// Attach, or if the region is unusable, run fail-open: every request is
    /// admitted (and counted, see [`Client::let_through`]) while detached.
    /// The reason is logged once here.
    pub fn attach_or_fail_open(path: impl AsRef<Path>) -> Client {
        let path = path.as_ref().to_path_buf();
        match Self::attach(&path) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(region = %path.display(), error = %e, "sluice: failing open: every request will be admitted until re-attached");
                Client {
                    attached: None,
                    path,
                    let_through: AtomicU64::new(0),
                }
            }
        }
    }

    /// True when attached to a region (false only for fail-open).
    pub fn is_attached(&self) -> bool {
        self.attached.is_some()
    }

    /// How many requests were admitted without a region (fail-open).
    pub fn let_through(&self) -> u64 {
        // Relaxed: a counter read for reporting.
        self.let_through.load(Ordering::Relaxed)
    }

    /// The region path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// This process's identity in the region, if attached.
    pub fn owner(&self) -> Option<Owner> {
        self.attached.as_ref().map(|a| a.owner)
    }

    /// The mapped region, if attached.
    pub fn region_map(&self) -> Option<&RegionMap> {
        self.attached.as_ref().map(|a| &a.map)
    }

    /// Look a class up by name. Do this once and keep the handle.
    pub fn class(&self, name: &str) -> Result<ClassHandle<'_>, LookupError> {
        let Some(a) = &self.attached else {
            return Ok(ClassHandle {
                client: self,
                index: u32::MAX,
                generation: 0,
                name: name.to_string(),
                fast: None,
            });
        };
        let region = a.map.region();
        let mut known = Vec::new();
        for i in 0..region.geometry().caps.classes {
            let Some(rec) = region.class(i) else { break };
            // Acquire pairs with the daemon's Release store of `state`, made
            // after it wrote the name, the config and the new generation.
            if rec.state.load(Ordering::Acquire) != CLASS_ACTIVE {
                continue;
            }
            // Relaxed: ordered after the Acquire load above.
            let generation = rec.generation.load(Ordering::Relaxed);
            if rec.name_is(name) {
                // Relaxed: fixed while the generation is (read after the
                // Acquire load of `state` above).
                let (sb, sl) = (
                    rec.slot_base.load(Ordering::Relaxed),
                    rec.slot_len.load(Ordering::Relaxed),
                );
                let fast = region.slots(sb, sl).map(|slots| Fast {
                    header: region.header(),
                    rec,
                    counts: region.counters(a.owner.index, i),
                    slots,
                    tag: a.owner.tag(POSITIONAL_SEQ),
                    epoch_ns: a.epoch_ns,
                });
                return Ok(ClassHandle {
                    client: self,
                    index: i,
                    generation,
                    name: name.to_string(),
                    fast,
                });
            }
            if let Some(n) = rec.name() {
                known.push(n);
            }
        }
        let known = if known.is_empty() {
            "(none)".to_string()
        } else {
            known.join(", ")
        };
        Err(LookupError::UnknownClass {
            name: name.to_string(),
            path: self.path.clone(),
            known,
        })
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if let Some(a) = &self.attached {
            if let Some(rec) = a.map.region().client(a.owner.index) {
                // Clean detach: the daemon folds our counters and frees the
                // record. Permits borrow the client, so none is alive here.
                registry::transition(
                    &rec.state,
                    a.owner.generation,
                    a.pid,
                    CLIENT_ALIVE,
                    CLIENT_EXITING,
                );
            }
        }
    }
}

/// A class looked up once; decides requests.
#[derive(Debug)]
pub struct ClassHandle<'c> {
    client: &'c Client,
    index: u32,
    generation: u32,
    name: String,
    /// What the fast path needs, resolved once at lookup (fixed while the
    /// class generation is unchanged); `None` when fail-open.
    fast: Option<Fast<'c>>,
}

/// References into the region for one class, resolved at lookup.
#[derive(Clone, Copy)]
struct Fast<'c> {
    header: &'c sluice_shm_layout::layout::Header,
    rec: &'c ClassRecord,
    counts: Option<&'c CounterBlock>,
    /// The class's slot words (bounds-checked against the table at lookup;
    /// the range is fixed while the generation is).
    slots: &'c [AtomicU64],
    /// This process's positional permit tag.
    tag: u64,
    epoch_ns: u64,
}

impl fmt::Debug for Fast<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fast")
            .field("slots", &self.slots.len())
            .finish()
    }
}

impl<'c> ClassHandle<'c> {
    /// The class name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The class's index in the region.
    pub fn index(&self) -> u32 {
        self.index
    }

    fn record(&self, a: &'c Attached) -> Result<&'c ClassRecord, AcquireError> {
        let rec = a
            .map
            .region()
            .class(self.index)
            .ok_or_else(|| AcquireError::ClassGone {
                name: self.name.clone(),
            })?;
        // Acquire pairs with the daemon's Release store of the generation
        // after a reload rewrote the config: the limits we read next are at
        // least that new.
        if rec.generation.load(Ordering::Acquire) != self.generation {
            return Err(AcquireError::ClassGone {
                name: self.name.clone(),
            });
        }
        Ok(rec)
    }

    /// Everything one decision needs, read from the region, or the decision
    /// itself when it needs nothing more (fail-open, draining).
    pub(crate) fn context(
        &self,
        req: &Request<'_>,
    ) -> Result<Result<Ctx<'_>, Decision<'_>>, AcquireError> {
        if req.cost == 0 {
            return Err(AcquireError::ZeroCost);
        }
        if req.attempt == 0 {
            return Err(AcquireError::ZeroAttempt);
        }
        let Some(a) = &self.client.attached else {
            // Relaxed: a counter only.
            self.client.let_through.fetch_add(1, Ordering::Relaxed);
            return Ok(Err(Decision::Admitted(Permit::detached(self, req.cost))));
        };
        let rec = self.record(a)?;
        let region = a.map.region();
        let counts = region.counters(a.owner.index, self.index);
        // Relaxed: the flags are advisory; a request racing the flag's
        // store may still be decided as it would a moment earlier.
        let hflags = region.header().flags.load(Ordering::Relaxed);
        if hflags & (FLAG_DRAINING | FLAG_REPLACED) != 0 {
            if hflags & FLAG_REPLACED != 0 {
                // Known shortcoming: clients are told to re-attach, not switched over to the re-created region.
                return Err(AcquireError::RegionReplaced {
                    path: self.client.path.clone(),
                });
            }
            return Ok(Err(self.refuse(counts, Reason::ShuttingDown, None, None)));
        }
        let params = ClassParams::load(rec);
        let corrupt = |what| AcquireError::Corrupt {
            name: self.name.clone(),
            what,
        };
        // Relaxed: the slot and ticket ranges are fixed while the
        // generation is (checked above).
        let base = rec.slot_base.load(Ordering::Relaxed);
        let len = if params.max_in_flight > 0 {
            rec.slot_len.load(Ordering::Relaxed)
        } else {
            0
        };
        let slots = region
            .slots(base, len)
            .ok_or_else(|| corrupt("slot range outside the slot table"))?;
        let ticket_base = rec.ticket_base.load(Ordering::Relaxed);
        let ticket_len = rec.ticket_len.load(Ordering::Relaxed);
        let tickets = region
            .tickets(ticket_base, ticket_len)
            .ok_or_else(|| corrupt("ticket range outside the ticket table"))?;
        // Clamped: four lanes must fit the range (the region is untrusted).
        let lane_len =
            (rec.ticket_lane_len.load(Ordering::Relaxed) as usize).min(tickets.len() / 4);
        Ok(Ok(Ctx {
            attached: a,
            rec,
            counts,
            params,
            slots,
            tickets,
            ticket_base,
            lane_len,
        }))
    }

    /// Decide now: admitted with a permit, or refused with a reason. Never
    /// waits, and never overtakes a waiting ticket of its lane or a higher
    /// one.
    pub fn try_acquire(&self, req: &Request<'_>) -> Result<Decision<'_>, AcquireError> {
        // The fast path: a plain request on a class with no policy, nobody
        // waiting, daemon not draining. A handful of loads on read-mostly
        // lines, the slot CAS, the bucket CAS, one counter add.
        if let Some(f) = &self.fast {
            if let Some(d) = self.try_fast(f, req) {
                return d;
            }
        }
        self.try_acquire_general(req)
    }

    #[inline]
    fn try_fast<'s>(
        &'s self,
        f: &Fast<'s>,
        req: &Request<'_>,
    ) -> Option<Result<Decision<'s>, AcquireError>> {
        let lane = req.lane.index();
        if req.cost == 0
            || req.cost > INLINE_SLOTS as u64
            || req.attempt == 0
            || req.tenant.is_some()
            || req.allow_partial
        {
            return None;
        }
        // Acquire pairs with the daemon's Release store of a new generation
        // (see `record`); Relaxed loads after it: header flags, class
        // flags and waiters are hints, each re-checked on the slow path.
        let flags = f.rec.flags.load(Ordering::Relaxed);
        if f.rec.generation.load(Ordering::Acquire) != self.generation
            || f.header.flags.load(Ordering::Relaxed) != 0
            || flags & (policy::POLICY_FLAGS & !CLASS_FLEET) != 0
            || f.rec.waiters.value.load(Ordering::Relaxed) & queue::bits_at_or_above(lane) != 0
        {
            return None;
        }
        let params = ClassParams::load(f.rec);
        // A fleet class with a valid lease and enough credit takes it here
        // (given back if the host limits refuse); anything else (expired
        // lease, short credit, shadow mode) goes the policy way.
        let mut now_ns = 0;
        let fleet_epoch = if flags & CLASS_FLEET != 0 {
            now_ns = clock::monotonic_ns();
            // Relaxed: a config bit, as in `policy::take_fleet`.
            if f.rec.fleet_cfg.load(Ordering::Relaxed) & fleet::CFG_SHADOW != 0
                || !fleet::lease_valid(&f.rec.fleet_lease_until_ns, now_ns)
            {
                return None;
            }
            Some(fleet::take(&f.rec.fleet_credit, req.cost).ok()?)
        } else {
            None
        };
        let now = if params.rate.is_some() {
            if now_ns == 0 {
                now_ns = clock::monotonic_ns();
            }
            wait::units_at(now_ns, f.epoch_ns)
        } else {
            0
        };
        let slots = if params.max_in_flight > 0 {
            f.slots
        } else {
            &[]
        };
        let ask = Ask {
            cost: req.cost,
            lane,
        };
        let adm = admit::decide(&params, &f.rec.tat.value, slots, ask, now, f.tag);
        if let (Admission::Refused { .. }, Some(epoch)) = (&adm, fleet_epoch) {
            fleet::give_back(&f.rec.fleet_credit, epoch, req.cost);
        }
        Some(Ok(
            self.conclude(adm, f.counts, slots, f.tag, req.cost, [0; 4])
        ))
    }

    /// Turn an admission into the caller's decision: count it, and wrap a
    /// grant in a permit.
    #[inline]
    fn conclude<'s>(
        &'s self,
        adm: Admission,
        counts: Option<&CounterBlock>,
        words: &'s [AtomicU64],
        tag: u64,
        cost: u64,
        deps: [u32; 4],
    ) -> Decision<'s> {
        match adm {
            Admission::Admitted {
                slots: grant,
                degraded,
            } => {
                if let Some(c) = counts {
                    // Known shortcoming: a locked add per grant; per-thread counter shards would remove it.
                    counters::bump(&c.counts[counters::ADMITTED], 1);
                    if degraded {
                        counters::bump(&c.counts[counters::DEGRADED], 1);
                    }
                }
                Decision::Admitted(Permit {
                    handle: self,
                    words,
                    grant,
                    tag,
                    cost,
                    degraded,
                    ticket: None,
                    deps,
                    released: false,
                })
            }
            Admission::Refused {
                reason,
                retry_after_ns,
                largest,
            } => self.refuse(
                counts,
                reason,
                retry_after_ns.map(Duration::from_nanos),
                largest,
            ),
        }
    }

    /// The general path: policy checks (when the class or the request has
    /// any), then no overtaking, then slots and tokens; whatever an earlier
    /// step took is given back if a later one refuses.
    fn try_acquire_general(&self, req: &Request<'_>) -> Result<Decision<'_>, AcquireError> {
        let ctx = match self.context(req)? {
            Ok(ctx) => ctx,
            Err(decision) => return Ok(decision),
        };
        let ctx = &ctx;
        let lane = req.lane.index();
        let now_ns = clock::monotonic_ns();
        // Relaxed: class policy bits, written by the daemon; a request
        // racing a pause may still be decided as before it.
        let flags = ctx.rec.flags.load(Ordering::Relaxed);
        let mut taken = policy::Taken {
            cost: req.cost,
            ..policy::Taken::default()
        };
        if flags & policy::POLICY_FLAGS != 0 || req.allow_partial || req.tenant.is_some() {
            taken = match policy::gates(ctx, req, flags, now_ns, false)? {
                policy::Gates::Go(t) => t,
                policy::Gates::Refuse(r) => {
                    return Ok(self.refuse(ctx.counts, r.reason, r.retry_after, r.largest_cost))
                }
                policy::Gates::Hold(t) => {
                    policy::give_back(ctx, &t);
                    return Ok(self.refuse(ctx.counts, Reason::NotNow, None, None));
                }
            };
        }
        // Relaxed: a hint. Missing a ticket published a moment ago only lets
        // this request in first, as if it came first; no wake-up depends on
        // this load (see `Permit::release_slots`).
        if ctx.rec.waiters.value.load(Ordering::Relaxed) & queue::bits_at_or_above(lane) != 0 {
            let largest = ctx.params.largest_cost(lane);
            if taken.cost > largest {
                policy::give_back(ctx, &taken);
                return Ok(self.refuse(ctx.counts, Reason::SmallerScope, None, Some(largest)));
            }
            // Tickets wait ahead: help them along, then go on only if none
            // is left at or above our lane (never overtake).
            self.help(ctx, now_ns);
            // SeqCst: pairs with the enqueuers' bit sets and the
            // dispatcher's clearing; after our dispatch the bits say who
            // still waits.
            if ctx.rec.waiters.value.load(Ordering::SeqCst) & queue::bits_at_or_above(lane) != 0 {
                policy::give_back(ctx, &taken);
                return Ok(self.refuse(ctx.counts, Reason::NotNow, None, None));
            }
        }
        let seq = if taken.cost <= INLINE_SLOTS as u64 {
            POSITIONAL_SEQ
        } else {
            unique_seq(ctx.attached)
        };
        let tag = ctx.attached.owner.tag(seq);
        let ask = Ask {
            cost: taken.cost,
            lane,
        };
        let now = ctx.now_units_at(now_ns);
        let adm = admit::decide(&ctx.params, &ctx.rec.tat.value, ctx.slots, ask, now, tag);
        if matches!(adm, Admission::Admitted { .. }) {
            policy::after_admit(ctx, req.attempt);
        } else {
            policy::give_back(ctx, &taken);
        }
        Ok(self.conclude(adm, ctx.counts, ctx.slots, tag, taken.cost, deps_of(ctx)))
    }

    pub(crate) fn refuse(
        &self,
        counts: Option<&CounterBlock>,
        reason: Reason,
        retry_after: Option<Duration>,
        largest_cost: Option<u64>,
    ) -> Decision<'_> {
        if let Some(c) = counts {
            counters::bump(&c.counts[reason.counter()], 1);
        }
        Decision::Refused(Refusal {
            reason,
            retry_after,
            largest_cost,
        })
    }
}

/// One decision's view of the region: the class record and its tables.
pub(crate) struct Ctx<'a> {
    pub(crate) attached: &'a Attached,
    pub(crate) rec: &'a ClassRecord,
    pub(crate) counts: Option<&'a CounterBlock>,
    pub(crate) params: ClassParams,
    pub(crate) slots: &'a [AtomicU64],
    pub(crate) tickets: &'a [TicketRecord],
    pub(crate) ticket_base: u32,
    /// Records per lane; the pool for immediate grants follows the lanes.
    pub(crate) lane_len: usize,
}

impl<'a> Ctx<'a> {
    /// Bucket time now.
    pub(crate) fn now_units(&self) -> u64 {
        self.now_units_at(clock::monotonic_ns())
    }

    /// Bucket time of a CLOCK_MONOTONIC reading.
    pub(crate) fn now_units_at(&self, now_ns: u64) -> u64 {
        wait::units_at(now_ns, self.attached.epoch_ns)
    }

    /// The class as the dispatcher sees it.
    pub(crate) fn view(&self) -> ClassView<'a> {
        ClassView {
            params: self.params,
            tat: &self.rec.tat.value,
            slots: self.slots,
            tickets: self.tickets,
            waiters: &self.rec.waiters.value,
            // Relaxed: a config value.
            age_after_ns: self.rec.age_after_ns.load(Ordering::Relaxed),
            held: policy::held(self),
        }
    }
}

/// The dependencies of the class in `ctx` (index + 1 each, 0 = none).
fn deps_of(ctx: &Ctx<'_>) -> [u32; 4] {
    let mut out = [0; 4];
    for (o, d) in out.iter_mut().zip(ctx.rec.deps.iter()) {
        // Relaxed: a config value.
        *o = d.load(Ordering::Relaxed);
    }
    out
}

/// The bucket of the wait-time histogram for a wait of `us` microseconds:
/// log-linear, 4 sub-buckets per power of two, exact below 16 µs.
pub fn hist_bucket(us: u64) -> usize {
    if us < 16 {
        return us as usize;
    }
    let e = 63 - us.leading_zeros() as usize;
    let sub = ((us >> (e - 2)) & 3) as usize;
    (16 + (e - 4) * 4 + sub).min(HIST_BUCKETS - 1)
}

/// The smallest wait (µs) that falls in histogram bucket `b`.
pub fn hist_bucket_floor(b: usize) -> u64 {
    if b < 16 {
        return b as u64;
    }
    let e = (b - 16) / 4 + 4;
    let sub = ((b - 16) % 4) as u64;
    (1u64 << e) + (sub << (e - 2))
}

/// Buckets of the wait-time histogram.
pub const HIST_BUCKETS: usize = sluice_shm_layout::layout::WAIT_HIST_BUCKETS;

/// A unique permit number for permits that must find their slots by tag.
fn unique_seq(a: &Attached) -> u32 {
    let Some(rec) = a.map.region().client(a.owner.index) else {
        return POSITIONAL_SEQ + 1;
    };
    loop {
        // Relaxed: only uniqueness matters, which the RMW gives; the top bit
        // is left to ticket tags.
        let v = (rec.permit_seq.fetch_add(1, Ordering::Relaxed) as u32) & !queue::TICKET_TAG_BIT;
        if v > POSITIONAL_SEQ {
            return v;
        }
    }
}

/// Permission to do work. Released when dropped (or by [`Permit::release`]).
#[derive(Debug)]
pub struct Permit<'a> {
    handle: &'a ClassHandle<'a>,
    words: &'a [AtomicU64],
    grant: SlotGrant,
    tag: u64,
    cost: u64,
    degraded: bool,
    /// `(index, generation)` of the ticket, for permits from `acquire`.
    ticket: Option<(u32, u32)>,
    /// Dependencies (index + 1) whose breakers hear this work's outcome.
    deps: [u32; 4],
    released: bool,
}

/// How the work under a permit ended, reported on release.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkOutcome {
    /// Done.
    Completed,
    /// Done in part: this many units of the cost.
    Partial(u64),
    /// Failed.
    Failed,
    /// Stopped because cancellation was requested.
    Cancelled,
}

impl<'a> Permit<'a> {
    fn detached(handle: &'a ClassHandle<'a>, cost: u64) -> Self {
        Self {
            handle,
            words: &[],
            grant: SlotGrant::default(),
            tag: 0,
            cost,
            degraded: false,
            ticket: None,
            deps: [0; 4],
            released: true,
        }
    }

    pub(crate) fn from_ticket(
        handle: &'a ClassHandle<'a>,
        ctx: &Ctx<'a>,
        tag: u64,
        cost: u64,
        degraded: bool,
        ticket: (u32, u32),
    ) -> Self {
        Self {
            handle,
            words: ctx.slots,
            grant: SlotGrant::default(),
            tag,
            cost,
            degraded,
            ticket: Some(ticket),
            deps: deps_of(ctx),
            released: false,
        }
    }

    /// True when granted degraded (excess burst, or above `soft_in_flight`):
    /// serve the cheaper, still honest result.
    pub fn degraded(&self) -> bool {
        self.degraded
    }

    /// The cost granted.
    pub fn cost(&self) -> u64 {
        self.cost
    }

    /// The class this permit is for.
    pub fn class(&self) -> &str {
        self.handle.name()
    }

    /// The ticket id, for permits from `acquire`/`enqueue` (what `sluice
    /// tickets` lists and `sluice cancel` takes).
    pub fn ticket_id(&self) -> Option<u64> {
        self.ticket.map(|(i, g)| queue::ticket_id(i, g))
    }

    fn ticket_record(&self) -> Option<&'a TicketRecord> {
        let (index, _) = self.ticket?;
        let a = self.handle.client.attached.as_ref()?;
        a.map.region().tickets(index, 1)?.first()
    }

    /// True once someone asked the holder to stop (`sluice cancel`). A
    /// cheap load; poll it between units of work.
    pub fn cancel_requested(&self) -> bool {
        self.ticket_record().is_some_and(wait::cancel_requested)
    }

    /// Release now. Same as dropping; idempotent with the drop.
    pub fn release(mut self) {
        self.release_slots();
    }

    /// Release, reporting how the work ended: counted per class, and heard
    /// by the circuit breakers of the class's dependencies (failed is a
    /// failure; completed and partial are successes; cancelled is neither).
    pub fn release_with(mut self, outcome: WorkOutcome) {
        if let Some(a) = &self.handle.client.attached {
            let success = match outcome {
                WorkOutcome::Completed | WorkOutcome::Partial(_) => Some(true),
                WorkOutcome::Failed => Some(false),
                WorkOutcome::Cancelled => None,
            };
            if let Some(ok) = success {
                for &d in &self.deps {
                    if let Some(dep) = d.checked_sub(1).and_then(|i| a.map.region().dep(i)) {
                        sluice_shm_layout::breaker::report(dep, ok);
                    }
                }
            }
            if let Some(c) = a.map.region().counters(a.owner.index, self.handle.index) {
                let which = match outcome {
                    WorkOutcome::Completed => counters::OUTCOME_COMPLETED,
                    WorkOutcome::Partial(_) => counters::OUTCOME_PARTIAL,
                    WorkOutcome::Failed => counters::OUTCOME_FAILED,
                    WorkOutcome::Cancelled => counters::OUTCOME_CANCELLED,
                };
                counters::bump(&c.counts[which], 1);
            }
        }
        self.release_slots();
    }

    fn release_slots(&mut self) {
        if self.released {
            return;
        }
        self.released = true;
        if let Some((index, generation)) = self.ticket {
            queue::release_tagged(self.words, self.tag);
            if let Some(rec) = self.ticket_record() {
                wait::free_granted(rec, generation);
            }
            let _ = index;
        } else if self.grant.count > 0 {
            slots::release(self.words, &self.grant, self.tag);
        } else {
            return;
        }
        self.after_release();
    }

    /// A slot came free: if a ticket waits, hand it on. The only system
    /// call a release can make, and only when a waiter is recorded.
    #[inline]
    fn after_release(&self) {
        let rec = match &self.handle.fast {
            Some(f) => f.rec,
            None => {
                let Some(a) = &self.handle.client.attached else {
                    return;
                };
                let Some(rec) = a.map.region().class(self.handle.index) else {
                    return;
                };
                rec
            }
        };
        // SeqCst: pairs with the enqueuer's SeqCst bit set and publish,
        // ordered after our SeqCst slot release (see queue.rs: no lost
        // wake-up). A plain load on x86.
        if rec.waiters.value.load(Ordering::SeqCst) == 0 {
            return;
        }
        if let Ok(Ok(ctx)) = self.handle.context(&Request::new()) {
            self.handle.help(&ctx, clock::monotonic_ns());
        }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.release_slots();
    }
}
