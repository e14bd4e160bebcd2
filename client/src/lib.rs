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

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use sluice_shm_layout::admit::{self, Admission, Ask, ClassParams};
use sluice_shm_layout::bucket::ns_to_units;
use sluice_shm_layout::counters::{self, Reason};
use sluice_shm_layout::layout::{
    ClassRecord, CounterBlock, CLASS_ACTIVE, CLIENT_ALIVE, CLIENT_EXITING, FLAG_DRAINING,
};
use sluice_shm_layout::registry;
use sluice_shm_layout::slots::{self, Owner, SlotGrant, INLINE_SLOTS};
use sluice_shm_layout::sync::{AtomicU64, Ordering};

pub use map::{region_path, OpenError, RegionMap, DEFAULT_REGION, REGION_ENV};
pub use sluice_shm_layout::counters::Reason as RefuseReason;

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
pub struct Request {
    /// Units of cost: tokens and slots (default 1; 0 is a usage error).
    pub cost: u64,
    /// Priority lane (default interactive).
    pub lane: Lane,
    /// Which attempt this is, 1 for the first (default 1).
    pub attempt: u32,
}

impl Default for Request {
    fn default() -> Self {
        Self {
            cost: 1,
            lane: Lane::Interactive,
            attempt: 1,
        }
    }
}

impl Request {
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

/// Format a duration the way the config writes them, to the millisecond
/// (or microsecond below one).
pub fn fmt_duration(d: Duration) -> String {
    let ns = d.as_nanos();
    if ns >= 1_000_000 {
        format!("{:.3}s", d.as_secs_f64()).replace(".000s", "s")
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
    #[error("region {path}: all {capacity} client records are taken: raise daemon.capacity.clients in the config, or find the processes holding them with `sluice stats`")]
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
                return Ok(ClassHandle {
                    client: self,
                    index: i,
                    generation,
                    name: name.to_string(),
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

    fn counters(&self, a: &'c Attached) -> Option<&'c CounterBlock> {
        a.map.region().counters(a.owner.index, self.index)
    }

    /// Decide now: admitted with a permit, or refused with a reason. Never
    /// waits.
    pub fn try_acquire(&self, req: &Request) -> Result<Decision<'_>, AcquireError> {
        if req.cost == 0 {
            return Err(AcquireError::ZeroCost);
        }
        if req.attempt == 0 {
            return Err(AcquireError::ZeroAttempt);
        }
        let Some(a) = &self.client.attached else {
            // Relaxed: a counter only.
            self.client.let_through.fetch_add(1, Ordering::Relaxed);
            return Ok(Decision::Admitted(Permit::detached(self, req.cost)));
        };
        let rec = self.record(a)?;
        let region = a.map.region();
        let counts = self.counters(a);
        // Relaxed: the draining flag is advisory; a request racing the
        // flag's store may still be admitted, as it would a moment earlier.
        if region.header().flags.load(Ordering::Relaxed) & FLAG_DRAINING != 0 {
            return Ok(self.refuse(counts, Reason::ShuttingDown, None, None));
        }
        let params = ClassParams::load(rec);
        // Relaxed: slot_base/len are fixed while the generation is.
        let base = rec.slot_base.load(Ordering::Relaxed);
        let len = if params.max_in_flight > 0 {
            rec.slot_len.load(Ordering::Relaxed)
        } else {
            0
        };
        let words: &[AtomicU64] = region.slots(base, len).ok_or(AcquireError::Corrupt {
            name: self.name.clone(),
            what: "slot range outside the slot table",
        })?;
        let now = if params.rate.is_some() {
            ns_to_units(clock::monotonic_ns().saturating_sub(a.epoch_ns))
        } else {
            0
        };
        let fits_inline = req.cost <= INLINE_SLOTS as u64;
        let seq = if fits_inline {
            POSITIONAL_SEQ
        } else {
            unique_seq(region, a)
        };
        let tag = a.owner.tag(seq);
        let ask = Ask {
            cost: req.cost,
            lane: req.lane.index(),
        };
        match admit::decide(&params, &rec.tat.value, words, ask, now, tag) {
            Admission::Admitted { slots, degraded } => {
                if let Some(c) = counts {
                    counters::bump(&c.counts[counters::ADMITTED], 1);
                    if degraded {
                        counters::bump(&c.counts[counters::DEGRADED], 1);
                    }
                }
                Ok(Decision::Admitted(Permit {
                    handle: self,
                    words,
                    grant: slots,
                    tag,
                    cost: req.cost,
                    degraded,
                    released: false,
                }))
            }
            Admission::Refused {
                reason,
                retry_after_ns,
                largest,
            } => Ok(self.refuse(
                counts,
                reason,
                retry_after_ns.map(Duration::from_nanos),
                largest,
            )),
        }
    }

    fn refuse(
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

/// A unique permit number for permits that must find their slots by tag.
fn unique_seq(region: &sluice_shm_layout::layout::Region, a: &Attached) -> u32 {
    let Some(rec) = region.client(a.owner.index) else {
        return POSITIONAL_SEQ + 1;
    };
    loop {
        // Relaxed: only uniqueness matters, which the RMW gives.
        let v = rec.permit_seq.fetch_add(1, Ordering::Relaxed) as u32;
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
    released: bool,
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
            released: true,
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

    /// Release now. Same as dropping; idempotent with the drop.
    pub fn release(mut self) {
        self.release_slots();
    }

    fn release_slots(&mut self) {
        if self.released {
            return;
        }
        self.released = true;
        if self.grant.count > 0 {
            slots::release(self.words, &self.grant, self.tag);
        }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.release_slots();
    }
}
