//! Creating, locking and re-attaching the region file, and writing the
//! config's classes into it.
//!
//! Creation is safe against a hostile path: the file is opened with
//! `O_NOFOLLOW` (a symbolic link is refused), created with `O_EXCL`, and on
//! re-attach its owner must be the daemon's user. One daemon per region: an
//! open-file-description write lock on the whole file is held for the
//! daemon's life (`sluice stats` tests that lock to say `running`).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use memmap2::MmapOptions;
use sluice_client::RegionMap;
use sluice_shm_layout::admit::ClassParams;
use sluice_shm_layout::bucket::RateParams;
use sluice_shm_layout::layout::{
    self, Capacities, ClassRecord, Geometry, Region, CLASS_ACTIVE, CLASS_FREE, CLASS_REMOVED,
    HEADER_SIZE,
};
use sluice_shm_layout::layout::{
    CLASS_FLEET, CLASS_HAS_DEPS, CLASS_ON_DEP_QUEUE, CLASS_ON_PAUSED_QUEUE, CLASS_OVERCOMMIT,
    CLASS_PAUSED, CLASS_RETRY_BUDGET, CLASS_TENANTS, DEPS, TENANTS_ON_FULL_SHARED, TIERS,
};
use sluice_shm_layout::queue::{TicketWord, T_FREE};
use sluice_shm_layout::sync::Ordering;
use sluice_shm_layout::{breaker, retry, slots};

use crate::config::{ClassConfig, Config, FallbackRate, FleetConfig, QueuePolicy, StoreDown};

/// Why the daemon could not set up its region.
#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    /// The path is a symbolic link.
    #[error("region {path} is a symbolic link: sluiced does not follow links; remove it or choose another --region")]
    Symlink {
        /// The path.
        path: PathBuf,
    },
    /// The path is not a regular file.
    #[error("region {path} is not a regular file: remove it or choose another --region")]
    NotAFile {
        /// The path.
        path: PathBuf,
    },
    /// Owned by someone else.
    #[error("region {path} is owned by uid {owner}, not by this daemon's uid {me}: refusing to serve it; remove it or run sluiced as its owner")]
    WrongOwner {
        /// The path.
        path: PathBuf,
        /// The file's owner.
        owner: u32,
        /// Our euid.
        me: u32,
    },
    /// Another daemon holds the lock.
    #[error("region {path} is already served by another sluiced{pid}: stop it first, or choose another --region")]
    Locked {
        /// The path.
        path: PathBuf,
        /// ", pid N" when known.
        pid: String,
    },
    /// An existing region this build cannot serve.
    #[error("region {path} cannot be served by this sluiced: {source}; running clients may still use it, so it is left alone: stop them, remove the file, and start sluiced again")]
    Incompatible {
        /// The path.
        path: PathBuf,
        /// What is wrong.
        source: layout::AttachError,
    },
    /// The config does not fit the region.
    #[error("{0}")]
    Config(String),
    /// I/O.
    #[error("region {path}: {op}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The error.
        source: io::Error,
    },
}

fn io_err<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(io::Error) -> RegionError + 'a {
    move |source| RegionError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// The daemon's region: the mapping plus the lock (held while this lives).
pub struct OwnedRegion {
    map: RegionMap,
    /// True when this start created (or re-created) the layout.
    pub created: bool,
}

impl OwnedRegion {
    /// The typed view.
    pub fn region(&self) -> &Region {
        self.map.region()
    }

    /// The path.
    pub fn path(&self) -> &Path {
        self.map.path()
    }

    /// The mapped file.
    pub fn map(&self) -> &RegionMap {
        &self.map
    }
}

/// Open the region file without following links, creating it exclusively if
/// it does not exist.
fn open_safely(path: &Path, mode: u32) -> Result<(File, bool), RegionError> {
    for _ in 0..3 {
        let existing = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path);
        match existing {
            Ok(f) => return Ok((f, false)),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(RegionError::Symlink {
                    path: path.to_path_buf(),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(path, "open")(e)),
        }
        let created = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(mode)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path);
        match created {
            Ok(f) => return Ok((f, true)),
            // Someone created it between our two opens: open it again.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(io_err(path, "create")(e)),
        }
    }
    Err(RegionError::Io {
        path: path.to_path_buf(),
        op: "open",
        source: io::Error::other("the file kept appearing and vanishing"),
    })
}

fn flock_struct(kind: libc::c_int) -> libc::flock {
    // SAFETY: flock is a plain C struct for which all-zero is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = 0;
    fl.l_len = 0;
    fl
}

/// Take the daemon lock (an OFD write lock on the whole file). False if
/// another open file description holds it.
fn try_lock(file: &File) -> io::Result<bool> {
    let fl = flock_struct(libc::F_WRLCK);
    // SAFETY: fcntl with F_OFD_SETLK reads a valid flock struct we own.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if rc == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Ok(false),
        _ => Err(e),
    }
}

/// True when some daemon holds the lock on `file`'s region. Takes no lock
/// itself (F_OFD_GETLK), so it works from a read-only descriptor.
pub fn lock_held(file: &File) -> io::Result<bool> {
    let mut fl = flock_struct(libc::F_WRLCK);
    // SAFETY: fcntl with F_OFD_GETLK writes into the flock struct we own.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Capacities from the config.
pub fn capacities(config: &Config) -> Capacities {
    let c = &config.daemon.capacity;
    let tenants = config.tenants.as_ref().map(|t| t.capacity).unwrap_or(4096);
    Capacities {
        classes: c.classes,
        clients: c.clients,
        slots: c.slots,
        tickets: c.tickets,
        tenants: tenants.max(8).next_power_of_two(),
    }
}

/// Create the region at `path`, or re-attach the one there, lock it, and
/// write the config's classes into it.
pub fn open_region(path: &Path, config: &Config, now_ns: u64) -> Result<OwnedRegion, RegionError> {
    let mode = config.region.mode;
    let (file, fresh) = open_safely(path, mode)?;
    let meta = file.metadata().map_err(io_err(path, "stat"))?;
    if !meta.file_type().is_file() {
        return Err(RegionError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(RegionError::WrongOwner {
            path: path.to_path_buf(),
            owner: meta.uid(),
            me,
        });
    }
    if !try_lock(&file).map_err(io_err(path, "lock"))? {
        let pid = read_daemon_pid(&file)
            .map(|p| format!(", pid {p}"))
            .unwrap_or_default();
        return Err(RegionError::Locked {
            path: path.to_path_buf(),
            pid,
        });
    }
    // Apply mode (the umask narrowed it at creation) and group.
    let found_mode = meta.permissions().mode() & 0o7777;
    if !fresh && found_mode != mode {
        tracing::warn!(
            region = %path.display(),
            found = format!("{found_mode:04o}"),
            config = format!("{mode:04o}"),
            "region file had another mode; set it back to the config's"
        );
    }
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(io_err(path, "chmod"))?;
    if let Some(group) = &config.region.group {
        let gid = lookup_group(group).ok_or_else(|| {
            RegionError::Config(format!(
                "region.group {group:?} does not exist: create it (see packaging/sluice.sysusers) or remove the setting"
            ))
        })?;
        std::os::unix::fs::fchown(&file, None, Some(gid)).map_err(io_err(path, "chown"))?;
    }

    let len = meta.len();
    let published = !fresh && len >= HEADER_SIZE as u64 && header_version(&file) != Some(0);
    let created;
    let map = if published {
        // An existing, published region: serve it only if it is ours.
        let mut head = [0u8; HEADER_SIZE];
        std::os::unix::fs::FileExt::read_exact_at(&file, &mut head, 0)
            .map_err(io_err(path, "read header"))?;
        layout::check_header_bytes(&head, len).map_err(|source| RegionError::Incompatible {
            path: path.to_path_buf(),
            source,
        })?;
        created = false;
        let want = capacities(config);
        let have = Geometry::new(want).map(|g| g.caps).ok();
        let map = RegionMap::open(path, true).map_err(|e| RegionError::Config(e.to_string()))?;
        if have.is_some_and(|h| h != map.region().geometry().caps) {
            tracing::warn!(
                region = %path.display(),
                region_caps = ?map.region().geometry().caps,
                config_caps = ?want,
                "daemon.capacity differs from the existing region's; the region keeps its sizes (they are fixed at creation): re-create it to resize"
            );
        }
        map
    } else {
        // New, empty, or never published (its creator died before the end):
        // nobody can be attached, so lay it out from scratch.
        created = true;
        let geo =
            Geometry::new(capacities(config)).map_err(|e| RegionError::Config(e.to_string()))?;
        file.set_len(0).map_err(io_err(path, "truncate"))?;
        file.set_len(geo.size).map_err(io_err(path, "grow"))?;
        let size = usize::try_from(geo.size)
            .map_err(|_| RegionError::Config("region too large".into()))?;
        // SAFETY: a shared mapping of a file we just sized and lock; every
        // access goes through atomics.
        let mut mm =
            unsafe { MmapOptions::new().len(size).map_mut(&file) }.map_err(io_err(path, "map"))?;
        let base =
            NonNull::new(mm.as_mut_ptr()).ok_or_else(|| RegionError::Config("null map".into()))?;
        let generation = fresh_generation(now_ns);
        // SAFETY: the mapping is page aligned, `size` bytes, zero-filled by
        // the truncate/grow above, owned by `mm` which the RegionMap keeps;
        // we hold the lock so no other daemon initialises it.
        let region = unsafe { Region::initialize(base, size, geo, generation, now_ns) };
        let reopened = file.try_clone().map_err(io_err(path, "dup"))?;
        RegionMap::from_parts(region, mm, reopened, path.to_path_buf())
    };
    let owned = OwnedRegion { map, created };
    if created {
        // A random key for the tenant-key hash, so nobody can aim keys at
        // one set of the tenant table.
        let mut key = [0u8; 16];
        // SAFETY: getrandom writes at most `key.len()` bytes into `key`.
        let n = unsafe { libc::getrandom(key.as_mut_ptr().cast(), key.len(), 0) };
        if n != key.len() as isize {
            let t = fresh_generation(now_ns);
            key[..8].copy_from_slice(&t.to_le_bytes());
            key[8..].copy_from_slice(&t.rotate_left(29).to_le_bytes());
        }
        let h = owned.region().header();
        let (a, b) = key.split_at(8);
        let word = |x: &[u8]| {
            let mut w = [0u8; 8];
            w.copy_from_slice(x);
            u64::from_le_bytes(w)
        };
        // Relaxed: published by `publish` below.
        h.tenant_k0.store(word(a), Ordering::Relaxed);
        h.tenant_k1.store(word(b), Ordering::Relaxed);
    }
    // The lock lives on `file`'s open file description; keep it open for
    // the daemon's life by leaking the descriptor into the process.
    std::mem::forget(file);
    apply_classes(owned.region(), config, now_ns)?;
    if created {
        owned.region().publish();
    }
    let h = owned.region().header();
    // Relaxed: advisory fields read by stats.
    h.daemon_pid.store(std::process::id(), Ordering::Relaxed);
    h.heartbeat_ns.store(now_ns, Ordering::Relaxed);
    h.flags.store(0, Ordering::Relaxed);
    Ok(owned)
}

fn header_version(file: &File) -> Option<u32> {
    let mut b = [0u8; 12];
    std::os::unix::fs::FileExt::read_exact_at(file, &mut b, 0).ok()?;
    Some(u32::from_le_bytes([b[8], b[9], b[10], b[11]]))
}

fn read_daemon_pid(file: &File) -> Option<u32> {
    let mut b = [0u8; 4];
    std::os::unix::fs::FileExt::read_exact_at(file, &mut b, 128).ok()?;
    let pid = u32::from_le_bytes(b);
    (pid != 0).then_some(pid)
}

fn lookup_group(name: &str) -> Option<u32> {
    nix::unistd::Group::from_name(name)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
}

fn fresh_generation(now_ns: u64) -> u64 {
    let pid = u64::from(std::process::id());
    let wall = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    (wall ^ now_ns.rotate_left(17) ^ (pid << 40)) | 1
}

/// A class record's slot range.
fn slot_range(rec: &ClassRecord) -> (u32, u32) {
    // Relaxed: the daemon is the only writer of these fields.
    (
        rec.slot_base.load(Ordering::Relaxed),
        rec.slot_len.load(Ordering::Relaxed),
    )
}

/// Write the config's classes into the region: update classes that exist
/// (limits change live, the bucket keeps its `tat`, held slots stay), add
/// new ones in free records, and mark classes no longer configured removed.
pub fn apply_classes(region: &Region, config: &Config, now_ns: u64) -> Result<(), RegionError> {
    let cap = region.geometry().caps.classes;
    let tiers = plan_tiers(config)?;
    let deps = apply_deps(region, config)?;
    write_tiers(region, config, &tiers);
    // Validate everything first, so a bad reload changes nothing.
    let mut plans = Vec::with_capacity(config.classes.len());
    for class in &config.classes {
        let rate = match class.rate {
            Some(r) => Some(
                RateParams::new(r, class.burst, class.excess_burst)
                    .map_err(|e| RegionError::Config(format!("classes.{}: {e}", class.name)))?,
            ),
            None => None,
        };
        plans.push((class, rate, find_class(region, &class.name)));
    }
    let new_needed = plans.iter().filter(|p| p.2.is_none()).count();
    let free = (0..cap)
        .filter_map(|i| region.class(i))
        .filter(|r| reusable(region, r))
        .count();
    if new_needed > free {
        return Err(RegionError::Config(format!(
            "config adds {new_needed} classes but the region has room for {free} more (capacity {cap}): raise daemon.capacity.classes and re-create the region"
        )));
    }
    for (class, _, existing) in &plans {
        let want = class.max_in_flight.unwrap_or(0) as u32;
        if let Some(i) = existing {
            let rec = region
                .class(*i)
                .ok_or_else(|| RegionError::Config("class index".into()))?;
            let (_, tlen) = ticket_range(rec);
            let lane_len = rec.ticket_lane_len.load(Ordering::Relaxed);
            if class.ticket_records() > tlen || class.tickets_per_lane() > lane_len {
                return Err(RegionError::Config(format!(
                    "classes.{}: queue_depth {} and max_in_flight need {} ticket records, more than the {tlen} this region reserved for the class: restart sluiced on a new region to raise them",
                    class.name,
                    class.queue_depth,
                    class.ticket_records()
                )));
            }
            let (_, len) = slot_range(rec);
            if want > len {
                return Err(RegionError::Config(format!(
                    "classes.{}.max_in_flight = {want} exceeds the {len} slots this region reserved for it: restart sluiced on a new region to raise it",
                    class.name
                )));
            }
        }
    }

    // Remove classes no longer configured.
    for i in 0..cap {
        let Some(rec) = region.class(i) else { break };
        // Relaxed: the daemon is the only writer of `state`.
        if rec.state.load(Ordering::Relaxed) != CLASS_ACTIVE {
            continue;
        }
        let keep = rec
            .name()
            .is_some_and(|n| config.classes.iter().any(|c| c.name == n));
        if !keep {
            // Release pairs with the clients' Acquire loads: handles see the
            // new generation and look the class up again.
            rec.generation.fetch_add(1, Ordering::Release);
            rec.state.store(CLASS_REMOVED, Ordering::Release);
        }
    }

    // Slot words left over once every class of this config has its own.
    let used: u64 = (0..cap)
        .filter_map(|i| region.class(i))
        .filter(|r| !reusable(region, r))
        .map(|r| u64::from(slot_range(r).1))
        .sum();
    let wanted: u64 = plans
        .iter()
        .filter(|p| p.2.is_none())
        .map(|p| p.0.max_in_flight.unwrap_or(0))
        .sum();
    let mut spare_slots = u64::from(region.geometry().caps.slots)
        .saturating_sub(used)
        .saturating_sub(wanted)
        .min(u64::from(u32::MAX)) as u32;
    for (class, rate, existing) in plans {
        match existing {
            Some(i) => {
                let rec = region
                    .class(i)
                    .ok_or_else(|| RegionError::Config("class index".into()))?;
                // The bucket keeps its fill, trimmed to the new burst.
                if let Some(new) = rate {
                    let old = ClassParams::load(rec).rate;
                    if let Some(old) = old.filter(|o| *o != new) {
                        let now_units = sluice_shm_layout::bucket::ns_to_units(
                            now_ns.saturating_sub(region.epoch_ns()),
                        );
                        // Relaxed: clients CAS the word; a request racing
                        // the reload is charged by the old or the new rule.
                        let tat = rec.tat.value.load(Ordering::Relaxed);
                        rec.tat
                            .value
                            .store(new.carry_over(&old, tat, now_units), Ordering::Relaxed);
                    }
                }
                write_limits(rec, class, rate, &deps, config.fleet.as_ref());
            }
            None => {
                let want = class.max_in_flight.unwrap_or(0) as u32;
                let caps = region.geometry().caps;
                let tickets = class.ticket_records();
                let ticket_base = allocate(region, tickets, caps.tickets, ticket_range)
                    .ok_or_else(|| {
                        RegionError::Config(format!(
                            "no room for the {tickets} ticket records of class {} in the region's ticket table ({} records): raise daemon.capacity.tickets, or lower queue_depth",
                            class.name, caps.tickets
                        ))
                    })?;
                // Reserve up to twice the slots while the table has room to
                // spare after every class of this config, so a reload can
                // later raise max_in_flight in place.
                let extra = want.min(spare_slots);
                let (base, reserved) = match allocate(region, want + extra, caps.slots, slot_range)
                {
                    Some(b) if extra > 0 => {
                        spare_slots -= extra;
                        (Some(b), want + extra)
                    }
                    _ => (allocate(region, want, caps.slots, slot_range), want),
                };
                let base = base.ok_or_else(|| {
                    RegionError::Config(format!(
                        "no room for {want} slots of class {} in the region's slot table ({} words): raise daemon.capacity.slots",
                        class.name,
                        region.geometry().caps.slots
                    ))
                })?;
                let rec = (0..cap)
                    .filter_map(|i| region.class(i))
                    .find(|r| reusable(region, r))
                    .ok_or_else(|| RegionError::Config("no free class record".into()))?;
                // Relaxed: published by the Release store of `state` below.
                rec.slot_base.store(base, Ordering::Relaxed);
                rec.slot_len.store(reserved, Ordering::Relaxed);
                rec.ticket_base.store(ticket_base, Ordering::Relaxed);
                rec.ticket_len.store(tickets, Ordering::Relaxed);
                rec.ticket_lane_len
                    .store(class.tickets_per_lane(), Ordering::Relaxed);
                rec.enqueue_seq.value.store(0, Ordering::Relaxed);
                rec.waiters.value.store(0, Ordering::Relaxed);
                for h in &rec.wait_hist {
                    h.store(0, Ordering::Relaxed);
                }
                for c in &rec.totals.counts {
                    c.store(0, Ordering::Relaxed);
                }
                rec.tat.value.store(0, Ordering::Relaxed);
                for w in [
                    &rec.fleet_credit,
                    &rec.fleet_lease_until_ns,
                    &rec.fleet_next_lease_ns,
                    &rec.fleet_fallback_tat,
                    &rec.fleet_fallback_used,
                    &rec.fleet_shadow_refused,
                    &rec.fleet_leased,
                    &rec.fleet_returned,
                    &rec.fleet_expired,
                    &rec.fleet_rtt_us,
                    &rec.fleet_outages,
                    &rec.fleet_status,
                    &rec.fleet_seen_tat,
                ] {
                    w.store(0, Ordering::Relaxed);
                }
                rec.set_name(&class.name);
                rec.flags.store(0, Ordering::Relaxed);
                rec.retry_tokens.store(
                    class.retry_burst.unwrap_or(0).saturating_mul(retry::UNIT),
                    Ordering::Relaxed,
                );
                write_limits(rec, class, rate, &deps, config.fleet.as_ref());
                rec.generation.fetch_add(1, Ordering::Relaxed);
                // Release pairs with the Acquire load of `state` in a client's
                // lookup: name, limits and generation are visible with it.
                rec.state.store(CLASS_ACTIVE, Ordering::Release);
            }
        }
    }
    Ok(())
}

fn write_limits(
    rec: &ClassRecord,
    class: &ClassConfig,
    rate: Option<RateParams>,
    deps: &std::collections::HashMap<String, u32>,
    fleet: Option<&FleetConfig>,
) {
    // Policy bits; the pause bit is runtime state and survives a reload.
    // Lowering the limit may leave permits held above it: counted until the
    // daemon sees them gone (see `maintain::clear_overcommit`).
    // Relaxed: the daemon is the only writer of the limit.
    let old_max = rec.max_in_flight.load(Ordering::Relaxed);
    let new_max = class.max_in_flight.unwrap_or(0) as u32;
    let lowered = if new_max < old_max {
        CLASS_OVERCOMMIT
    } else {
        0
    };
    let mut bits = 0;
    if let (Some(f), Some(c)) = (fleet, &class.fleet) {
        bits |= CLASS_FLEET;
        write_fleet(rec, f, c, 1);
    }
    if class.on_paused == QueuePolicy::Queue {
        bits |= CLASS_ON_PAUSED_QUEUE;
    }
    if class.on_dependency_down == QueuePolicy::Queue {
        bits |= CLASS_ON_DEP_QUEUE;
    }
    if class.tenants {
        bits |= CLASS_TENANTS;
    }
    if class.retry_burst.is_some() {
        bits |= CLASS_RETRY_BUDGET;
    }
    if !class.depends_on.is_empty() {
        bits |= CLASS_HAS_DEPS;
    }
    let mut dep_slots = [0u32; 4];
    for (slot, name) in dep_slots.iter_mut().zip(&class.depends_on) {
        *slot = deps.get(name).map(|i| i + 1).unwrap_or(0);
    }
    for (dst, v) in rec.deps.iter().zip(dep_slots) {
        // Relaxed: config values, read with the flags.
        dst.store(v, Ordering::Relaxed);
    }
    let burst = class.retry_burst.unwrap_or(0);
    rec.retry_ratio_ppm
        .store((class.retry_ratio * 1e6).round() as u64, Ordering::Relaxed);
    rec.retry_burst.store(burst, Ordering::Relaxed);
    // A smaller budget keeps what it had, trimmed to the new size.
    let cap = burst.saturating_mul(retry::UNIT);
    let _ = rec
        .retry_tokens
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |t| {
            (t > cap).then_some(cap)
        });
    // Relaxed: clients read the flags on each request; a request racing the
    // update is decided by the old or the new policy.
    let _ = rec
        .flags
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |f| {
            Some((f & (CLASS_PAUSED | CLASS_OVERCOMMIT)) | bits | lowered)
        });
    let max = class.max_in_flight.unwrap_or(0) as u32;
    let soft = class.soft_in_flight.map(|s| s as u32).unwrap_or(max);
    let ceilings = class.lane_ceilings().unwrap_or([0; 4]);
    // Relaxed: clients read these each request and clamp every value; a
    // request racing a reload may see a mix, each combination safe.
    rec.max_in_flight.store(max, Ordering::Relaxed);
    rec.soft_in_flight.store(soft, Ordering::Relaxed);
    for (dst, c) in rec.lane_ceiling.iter().zip(ceilings) {
        dst.store(c as u32, Ordering::Relaxed);
    }
    rec.queue_depth.store(class.queue_depth, Ordering::Relaxed);
    rec.max_cost
        .store(class.max_cost.unwrap_or(0), Ordering::Relaxed);
    rec.max_wait_ns.store(
        class.max_wait.map(|d| d.as_nanos() as u64).unwrap_or(0),
        Ordering::Relaxed,
    );
    rec.age_after_ns.store(
        class.age_after.map(|d| d.as_nanos() as u64).unwrap_or(0),
        Ordering::Relaxed,
    );
    match rate {
        Some(r) => {
            rec.burst.store(r.burst, Ordering::Relaxed);
            rec.excess.store(r.excess, Ordering::Relaxed);
            rec.rate_t.store(r.t, Ordering::Relaxed);
        }
        None => rec.rate_t.store(0, Ordering::Relaxed),
    }
}

/// The index of the active class named `name`.
pub fn find_class(region: &Region, name: &str) -> Option<u32> {
    (0..region.geometry().caps.classes).find(|&i| {
        region.class(i).is_some_and(|r| {
            // Relaxed: the daemon is the only writer of `state`.
            r.state.load(Ordering::Relaxed) == CLASS_ACTIVE && r.name_is(name)
        })
    })
}

/// A record can take a new class when free, or removed with no slot held.
fn reusable(region: &Region, rec: &ClassRecord) -> bool {
    // Relaxed: the daemon is the only writer of `state`.
    match rec.state.load(Ordering::Relaxed) {
        CLASS_FREE => true,
        CLASS_REMOVED => {
            let (base, len) = slot_range(rec);
            let (tbase, tlen) = ticket_range(rec);
            let no_slots = region
                .slots(base, len)
                .is_none_or(|w| slots::in_flight(w) == 0);
            let no_tickets = region.tickets(tbase, tlen).is_none_or(|t| {
                t.iter().all(|r| {
                    // Relaxed: a snapshot; a removed class takes no new
                    // tickets, so none can appear after this.
                    TicketWord::decode(r.state.load(Ordering::Relaxed)).state == T_FREE
                })
            });
            no_slots && no_tickets
        }
        _ => false,
    }
}

/// First-fit a run of `want` entries of a table of `total`, avoiding the
/// ranges (`range_of`) of every class record that is not reusable.
fn allocate(
    region: &Region,
    want: u32,
    total: u32,
    range_of: fn(&ClassRecord) -> (u32, u32),
) -> Option<u32> {
    if want == 0 {
        return Some(0);
    }
    let mut used: Vec<(u32, u32)> = (0..region.geometry().caps.classes)
        .filter_map(|i| region.class(i))
        .filter(|r| !reusable(region, r))
        .map(range_of)
        .filter(|&(_, len)| len > 0)
        .collect();
    used.sort_unstable();
    let mut start = 0u32;
    for (base, len) in used {
        if base >= start && base - start >= want {
            return Some(start);
        }
        start = start.max(base.checked_add(len)?);
    }
    (total.checked_sub(start)? >= want).then_some(start)
}

/// A class record's ticket range.
fn ticket_range(rec: &ClassRecord) -> (u32, u32) {
    // Relaxed: the daemon is the only writer of these fields.
    (
        rec.ticket_base.load(Ordering::Relaxed),
        rec.ticket_len.load(Ordering::Relaxed),
    )
}

/// Tier names in config order (their record index), checked to fit.
fn plan_tiers(config: &Config) -> Result<Vec<String>, RegionError> {
    let Some(t) = &config.tenants else {
        return Ok(Vec::new());
    };
    if t.tiers.len() > TIERS as usize {
        return Err(RegionError::Config(format!(
            "tenants.tiers has {} tiers; a region holds at most {TIERS}",
            t.tiers.len()
        )));
    }
    for tier in &t.tiers {
        RateParams::new(tier.rate, tier.burst, 0)
            .map_err(|e| RegionError::Config(format!("tenants.tiers.{}: {e}", tier.name)))?;
    }
    Ok(t.tiers.iter().map(|t| t.name.clone()).collect())
}

/// Write tiers and the tenant policy into the region.
fn write_tiers(region: &Region, config: &Config, tiers: &[String]) {
    let h = region.header();
    let Some(t) = &config.tenants else { return };
    for (i, tier) in t.tiers.iter().enumerate() {
        let Some(rec) = region.tier(i as u32) else {
            break;
        };
        let Ok(rate) = RateParams::new(tier.rate, tier.burst, 0) else {
            continue;
        };
        let quota = match (tier.quota, tier.period) {
            (Some(q), Some(p)) if q > 0 && !p.is_zero() => {
                RateParams::new(q as f64 / p.as_secs_f64(), q, 0).ok()
            }
            _ => None,
        };
        // Relaxed: clients read tier params with the tenant record they
        // found; a reload racing a request may mix old and new, each safe.
        rec.rate_t.store(rate.t, Ordering::Relaxed);
        rec.burst.store(rate.burst, Ordering::Relaxed);
        rec.quota_t
            .store(quota.map(|q| q.t).unwrap_or(0), Ordering::Relaxed);
        rec.quota
            .store(quota.map(|q| q.burst).unwrap_or(0), Ordering::Relaxed);
        sluice_shm_layout::layout::write_name(&rec.name, &tier.name);
    }
    seed_tenant_keys(region, config, tiers);
    let default = tiers.iter().position(|n| *n == t.default_tier).unwrap_or(0) as u32;
    // Relaxed: policy values read by clients per request.
    h.tenant_default_tier.store(default, Ordering::Relaxed);
    region
        .tenant_overflow()
        .tier
        .store(default, Ordering::Relaxed);
    h.tenant_idle_ns
        .store(t.idle_after.as_nanos() as u64, Ordering::Relaxed);
    let shared = t.on_full == crate::config::OnFull::Shared;
    h.tenant_flags.store(
        if shared { TENANTS_ON_FULL_SHARED } else { 0 },
        Ordering::Relaxed,
    );
}

/// Write the config's dependencies into the dependency table: existing ones
/// (by name) keep their breaker state, new ones start closed, ones no longer
/// configured are cleared. Returns name → record index.
fn apply_deps(
    region: &Region,
    config: &Config,
) -> Result<std::collections::HashMap<String, u32>, RegionError> {
    let mut map = std::collections::HashMap::new();
    if config.dependencies.len() > DEPS as usize {
        return Err(RegionError::Config(format!(
            "{} dependencies configured; a region holds at most {DEPS}",
            config.dependencies.len()
        )));
    }
    let name_of = |i: u32| region.dep(i).and_then(|d| d.name()).unwrap_or_default();
    // Clear the ones no longer configured.
    for i in 0..DEPS {
        let n = name_of(i);
        if !n.is_empty() && !config.dependencies.iter().any(|d| d.name == n) {
            if let Some(d) = region.dep(i) {
                breaker::heal(d);
                sluice_shm_layout::layout::write_name(&d.name, "");
            }
        }
    }
    for dep in &config.dependencies {
        let idx = (0..DEPS)
            .find(|&i| name_of(i) == dep.name)
            .or_else(|| (0..DEPS).find(|&i| name_of(i).is_empty()))
            .ok_or_else(|| RegionError::Config("dependency table full".into()))?;
        let Some(d) = region.dep(idx) else { continue };
        let fresh = name_of(idx).is_empty();
        // Relaxed: config values the daemon's breaker evaluation reads.
        d.failure_ratio_ppm
            .store((dep.failure_ratio * 1e6).round() as u64, Ordering::Relaxed);
        d.window_ns
            .store(dep.window.as_nanos() as u64, Ordering::Relaxed);
        d.min_requests.store(dep.min_requests, Ordering::Relaxed);
        d.half_open_probes
            .store(dep.half_open_probes, Ordering::Relaxed);
        d.open_for_ns
            .store(dep.open_for.as_nanos() as u64, Ordering::Relaxed);
        sluice_shm_layout::layout::write_name(&d.name, &dep.name);
        if fresh {
            breaker::heal(d);
        }
        map.insert(dep.name.clone(), idx);
    }
    Ok(map)
}

/// The index of the dependency named `name`.
pub fn find_dep(region: &Region, name: &str) -> Option<u32> {
    (0..DEPS).find(|&i| {
        region
            .dep(i)
            .and_then(|d| d.name())
            .is_some_and(|n| !n.is_empty() && n == name)
    })
}

/// Put every key of `[tenants.keys]` in the tenant table with its tier (and
/// put the tier right if a client inserted the key first with the default
/// tier). Run at config apply and again by the maintenance loop, so a key
/// evicted while idle comes back with its tier.
pub fn seed_tenant_keys(region: &Region, config: &Config, tiers: &[String]) {
    let Some(t) = &config.tenants else { return };
    let h = region.header();
    // Relaxed: written once at creation.
    let (k0, k1) = (
        h.tenant_k0.load(Ordering::Relaxed),
        h.tenant_k1.load(Ordering::Relaxed),
    );
    let table = region.tenants();
    let now = sluice_client::clock::monotonic_ns();
    for (key, tier_name) in &t.keys {
        let Some(tier) = tiers.iter().position(|n| n == tier_name) else {
            continue;
        };
        let hash = sluice_shm_layout::tenants::key_hash(k0, k1, key.as_bytes());
        let found = sluice_shm_layout::tenants::find_or_insert(
            table,
            hash,
            key.as_bytes(),
            tier as u32,
            now,
            crate::maintain::DAEMON_GRANTER,
        );
        match found {
            Ok(i) => {
                if let Some(rec) = table.get(i) {
                    // Relaxed: clients read the tier per request.
                    rec.tier.store(tier as u32, Ordering::Relaxed);
                }
            }
            Err(_) => {
                tracing::warn!(tenant = %key, "tenant table set full: configured key not seeded")
            }
        }
    }
}

/// The tier names of a config, in record order.
pub fn tier_names(config: &Config) -> Vec<String> {
    config
        .tenants
        .as_ref()
        .map(|t| t.tiers.iter().map(|x| x.name.clone()).collect())
        .unwrap_or_default()
}

/// True when the daemon's region file is gone from its path (removed, or
/// replaced by another file): systemd-logind's RemoveIPC, or an operator's
/// rm. One fstat and one stat, once per maintenance turn.
pub fn vanished(owned: &OwnedRegion) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    let Ok(mine) = owned.map().file().metadata() else {
        return false;
    };
    if mine.nlink() == 0 {
        return true;
    }
    match std::fs::symlink_metadata(owned.path()) {
        Ok(there) => there.dev() != mine.dev() || there.ino() != mine.ino(),
        Err(e) => e.kind() == io::ErrorKind::NotFound,
    }
}

/// Re-create a vanished region at its path: a byte copy of the old one
/// (held permits, tickets, buckets and counters carry over) with a new
/// generation. The old mapping is marked replaced, so its clients learn to
/// re-attach; releases they make into it are lost to the copy, which keeps
/// those permits until their holders exit (then reclaimed as usual).
pub fn recreate(
    old: &OwnedRegion,
    config: &Config,
    now_ns: u64,
) -> Result<OwnedRegion, RegionError> {
    let path = old.path().to_path_buf();
    let held: u64 = (0..old.region().geometry().caps.classes)
        .filter_map(|i| old.region().class(i))
        .map(|c| {
            let (b, l) = slot_range(c);
            old.region().slots(b, l).map(slots::in_flight).unwrap_or(0)
        })
        .sum();
    let size = old.region().geometry().size;
    let mut bytes = vec![0u8; usize::try_from(size).unwrap_or(0)];
    std::os::unix::fs::FileExt::read_exact_at(old.map().file(), &mut bytes, 0)
        .map_err(io_err(&path, "copy old region"))?;
    let (file, fresh) = open_safely(&path, config.region.mode)?;
    if !fresh {
        return Err(RegionError::Config(format!(
            "{} reappeared as another file; not serving it: restart sluiced",
            path.display()
        )));
    }
    if !try_lock(&file).map_err(io_err(&path, "lock"))? {
        return Err(RegionError::Locked {
            path,
            pid: String::new(),
        });
    }
    file.set_permissions(std::fs::Permissions::from_mode(config.region.mode))
        .map_err(io_err(&path, "chmod"))?;
    // Clear the version so nobody attaches the copy before it is ready.
    bytes[8..12].copy_from_slice(&0u32.to_le_bytes());
    std::os::unix::fs::FileExt::write_all_at(&file, &bytes, 0)
        .map_err(io_err(&path, "write copy"))?;
    let map = RegionMap::open_unpublished(&path, &file)
        .map_err(|e| RegionError::Config(e.to_string()))?;
    let owned = OwnedRegion { map, created: true };
    let h = owned.region().header();
    let generation = fresh_generation(now_ns);
    // Relaxed: published by `publish` below.
    h.generation.store(generation, Ordering::Relaxed);
    h.flags.store(0, Ordering::Relaxed);
    h.daemon_pid.store(std::process::id(), Ordering::Relaxed);
    owned.region().publish();
    std::mem::forget(file);
    // Relaxed: an advisory flag the old mapping's clients read.
    old.region()
        .header()
        .flags
        .fetch_or(sluice_shm_layout::layout::FLAG_REPLACED, Ordering::Relaxed);
    tracing::error!(
        region = %path.display(),
        generation,
        carried_over = held,
        "region file vanished (RemoveIPC or rm?): re-created it from the daemon's copy; clients must re-attach; permits held in it stay counted until their holders exit"
    );
    Ok(owned)
}

/// True when the region file is now shorter than the region: someone
/// truncated it under us. Touching the cut-off pages would fault (SIGBUS).
pub fn truncated(owned: &OwnedRegion) -> bool {
    owned
        .map()
        .file()
        .metadata()
        .is_ok_and(|m| m.len() < owned.region().geometry().size)
}

/// Grow a truncated region file back to its size (the cut-off part reads
/// as zeros), so that nobody faults on it. What was cut off is lost.
pub fn regrow(owned: &OwnedRegion) -> io::Result<()> {
    owned.map().file().set_len(owned.region().geometry().size)
}

/// Write a fleet class's config words. `hosts` divides `fleet_rate` for
/// `fleet_fallback_rate = "auto"` (the leasing thread rewrites it as the
/// store reports hosts).
pub fn write_fleet(
    rec: &ClassRecord,
    fleet: &FleetConfig,
    class: &crate::config::ClassFleet,
    hosts: u32,
) {
    let mode = match fleet.on_store_down {
        StoreDown::Fallback => sluice_shm_layout::fleet::STORE_DOWN_FALLBACK,
        StoreDown::Open => sluice_shm_layout::fleet::STORE_DOWN_OPEN,
        StoreDown::Refuse => sluice_shm_layout::fleet::STORE_DOWN_REFUSE,
    };
    let shadow = if class.enforce {
        0
    } else {
        sluice_shm_layout::fleet::CFG_SHADOW
    };
    let rate = match class.fallback_rate {
        FallbackRate::Rate(r) => r,
        FallbackRate::Auto => class.rate / f64::from(hosts.max(1)),
    };
    let t = RateParams::new(rate, class.fallback_burst, 0)
        .map(|p| p.t)
        .unwrap_or(0);
    // Relaxed: config values; clients read them after the Acquire load of
    // the class generation (a fresh class) or as plain hints (a reload),
    // each combination safe.
    rec.fleet_cfg.store(mode | shadow, Ordering::Relaxed);
    rec.fleet_fallback_t.store(t, Ordering::Relaxed);
    rec.fleet_fallback_burst
        .store(class.fallback_burst, Ordering::Relaxed);
    rec.fleet_interval_ns.store(
        u64::try_from(fleet.lease_interval.as_nanos()).unwrap_or(u64::MAX),
        Ordering::Relaxed,
    );
    rec.fleet_max_lease
        .store(class.max_lease, Ordering::Relaxed);
}
