//! Leasing: the daemon's thread that keeps each fleet class's credit topped
//! up from the fleet bucket in the store (Redis), so that clients spend it
//! locally and never wait on the network.
//!
//! # One lease
//!
//! Every `lease_interval`, per fleet class, one script call (EVALSHA through
//! [`redis::Script`], loaded again after NOSCRIPT) sends: the tokens wanted
//! (this host's smoothed demand over one interval and a half, within
//! `fleet_max_lease`), the tokens of the previous lease left unspent (given
//! back), what clients spent on the fallback bucket since the last success
//! (charged), the highest `tat` this host has seen, and this host's demand
//! and weight. The reply is the grant; the thread then swaps the class's
//! credit for it in one step ([`fleet::renew`]) and publishes a lease that
//! lives two intervals from the moment the request was sent.
//!
//! So a token leased at `t` is spent by `t + 2 × lease_interval` or never:
//! the next renewal removes it, and if the daemon or the store is gone the
//! lease expires and clients move to the fallback bucket by themselves.
//! FLEET.md derives the bound that follows.
//!
//! # Failures
//!
//! A call that fails or times out drops the connection; the next tick makes
//! a new one (at most one attempt per interval and class set). The outage is
//! logged once and counted once per class; the reconnection is logged too.
//! Returns (on removal of a class, on shutdown) are sent once, never retried.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering as StdOrdering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use redis::IntoConnectionInfo;
use sluice_client::clock::monotonic_ns;
use sluice_shm_layout::counters;
use sluice_shm_layout::fleet;
use sluice_shm_layout::layout::{ClassRecord, Region};
use sluice_shm_layout::sync::Ordering;

use crate::config::{ClassFleet, Config, FallbackRate, FleetConfig};
use crate::region::{self, OwnedRegion};

/// The lease script; see its header for keys, arguments and reply.
const LEASE_LUA: &str = include_str!("fleet/lease.lua");

/// How long a lease lives, in lease intervals.
pub const LEASE_LIFETIME_INTERVALS: u32 = 2;

/// A host is active in the store's demand record while heard from within
/// this many lease intervals.
const QUIET_INTERVALS: u32 = 5;

/// The store's keys of a class: its bucket and its hosts' demand record.
pub fn keys(namespace: &str, class: &str) -> (String, String) {
    let bucket = format!("sluice:{namespace}:{{{class}}}");
    let hosts = format!("{bucket}:hosts");
    (bucket, hosts)
}

/// This host's name in the store: `host_id`, or the hostname and the
/// region path (so that several daemons on one machine are distinct).
pub fn host_id(config: &FleetConfig, region_path: &std::path::Path) -> String {
    if let Some(h) = &config.host_id {
        return h.clone();
    }
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "host".to_string());
    format!("{name}:{}", region_path.display())
}

/// What the thread remembers of one fleet class between leases.
struct ClassState {
    index: u32,
    generation: u32,
    fleet: ClassFleet,
    /// Admitted plus refused-for-fleet at the last tick.
    demand_count: u64,
    /// Smoothed demand, tokens per second.
    demand_per_s: f64,
    /// Unspent tokens of the previous lease, to give back with the next.
    to_return: u64,
    /// The highest `tat` the store has reported.
    seen_tat: u64,
    /// `fleet_fallback_used` already charged to the store.
    fallback_charged: u64,
    /// Hosts the store last reported.
    hosts: u32,
}

/// The reply of one lease call.
struct Grant {
    granted: u64,
    tat: u64,
    hosts: u32,
    mismatch: bool,
}

/// The leasing state of one daemon.
pub struct Leaser {
    config: FleetConfig,
    host: String,
    con: Option<redis::Connection>,
    script: redis::Script,
    classes: HashMap<String, ClassState>,
    /// Set while the store is unreachable (logged once).
    down: bool,
    last_tick: Instant,
}

impl Leaser {
    /// A leaser for `config`; connects on the first tick.
    pub fn new(config: FleetConfig, host: String) -> Leaser {
        Leaser {
            config,
            host,
            con: None,
            script: redis::Script::new(LEASE_LUA),
            classes: HashMap::new(),
            down: false,
            last_tick: Instant::now(),
        }
    }

    /// Whether the store is unreachable since the last attempt.
    pub fn is_down(&self) -> bool {
        self.down
    }

    fn connect(&self) -> redis::RedisResult<redis::Connection> {
        let mut info = self.config.store.as_str().into_connection_info()?;
        if let Some(path) = &self.config.password_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "cannot read fleet.password_file",
                    format!("{}: {e}", path.display()),
                ))
            })?;
            let password = text.lines().next().unwrap_or("").to_string();
            let settings = info.redis_settings().clone().set_password(password);
            info = info.set_redis_settings(settings);
        }
        let client = redis::Client::open(info)?;
        let con = client.get_connection_with_timeout(self.config.connect_timeout)?;
        con.set_read_timeout(Some(self.config.response_timeout))?;
        con.set_write_timeout(Some(self.config.response_timeout))?;
        Ok(con)
    }

    fn ensure_connected(&mut self) -> bool {
        if self.con.is_some() {
            return true;
        }
        match self.connect() {
            Ok(con) => {
                self.con = Some(con);
                true
            }
            Err(e) => {
                self.went_down(&e);
                false
            }
        }
    }

    fn went_down(&mut self, e: &redis::RedisError) {
        self.con = None;
        if !self.down {
            self.down = true;
            let why = if e.is_timeout() {
                format!("no answer within {:?} ({e})", self.config.response_timeout)
            } else {
                e.to_string()
            };
            tracing::error!(store = %self.config.store, error = %why, "fleet store unreachable: classes spend their fallback once their lease expires");
        }
    }

    /// One lease call for a class.
    #[allow(clippy::too_many_arguments)]
    fn call(
        &mut self,
        class: &str,
        f: &ClassFleet,
        want: u64,
        give: u64,
        charge: u64,
        seen_tat: u64,
        demand_per_s: f64,
    ) -> redis::RedisResult<Grant> {
        let con = self.con.as_mut().ok_or_else(|| {
            redis::RedisError::from((redis::ErrorKind::Io, "not connected to the fleet store"))
        })?;
        let (bucket, hosts) = keys(&self.config.namespace, class);
        let t_ns = (1e9 / f.rate).ceil().max(1.0) as u64;
        let quiet_us = self.config.lease_interval.as_micros() as u64 * u64::from(QUIET_INTERVALS);
        let reply: Vec<i64> = self
            .script
            .key(bucket)
            .key(hosts)
            .arg(&self.host)
            .arg(t_ns)
            .arg(f.burst)
            .arg(want)
            .arg(give)
            .arg(charge)
            .arg(seen_tat)
            .arg((demand_per_s * 1000.0).round() as u64)
            .arg(f.weight)
            .arg(quiet_us)
            .arg(self.config.lease_interval.as_micros() as u64)
            .invoke(con)?;
        let at = |i: usize| reply.get(i).copied().unwrap_or(0).max(0) as u64;
        Ok(Grant {
            granted: at(0),
            tat: at(1),
            hosts: at(2) as u32,
            mismatch: at(3) != 0,
        })
    }

    /// Bring the class list in line with `config`; a class gone (or
    /// redefined) gives its credit back, once.
    fn sync_classes(&mut self, region: &Region, config: &Config) {
        let mut wanted: HashMap<String, (u32, u32, ClassFleet)> = HashMap::new();
        for c in &config.classes {
            let Some(f) = &c.fleet else { continue };
            let Some(i) = region::find_class(region, &c.name) else {
                continue;
            };
            let Some(rec) = region.class(i) else { continue };
            // Relaxed: the daemon wrote the generation itself.
            let generation = rec.generation.load(Ordering::Relaxed);
            wanted.insert(c.name.clone(), (i, generation, f.clone()));
        }
        let gone: Vec<String> = self
            .classes
            .iter()
            .filter(|(name, st)| {
                wanted
                    .get(*name)
                    .is_none_or(|(i, g, _)| *i != st.index || *g != st.generation)
            })
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            if let Some(st) = self.classes.remove(&name) {
                self.give_back_once(region, &name, &st);
            }
        }
        for (name, (index, generation, f)) in wanted {
            let st = self
                .classes
                .entry(name.clone())
                .or_insert_with(|| ClassState {
                    index,
                    generation,
                    fleet: f.clone(),
                    demand_count: region_demand(region, index),
                    demand_per_s: 0.0,
                    to_return: 0,
                    seen_tat: region
                        .class(index)
                        // Relaxed: written only by this thread (or a daemon
                        // before us on this region).
                        .map_or(0, |r| r.fleet_seen_tat.load(Ordering::Relaxed)),
                    fallback_charged: region
                        .class(index)
                        // Relaxed: a running total.
                        .map_or(0, |r| r.fleet_fallback_used.load(Ordering::Relaxed)),
                    hosts: 1,
                });
            st.fleet = f;
        }
    }

    /// Drain a class's credit and send the unspent tokens back, once.
    fn give_back_once(&mut self, region: &Region, name: &str, st: &ClassState) {
        let mut give = st.to_return;
        if let Some(rec) = region.class(st.index) {
            // Relaxed: expiry first, so clients stop before the drain.
            rec.fleet_lease_until_ns.store(0, Ordering::Relaxed);
            let drained = fleet::drain(&rec.fleet_credit);
            // Relaxed: a statistic (tokens leave the host when drained).
            rec.fleet_returned.fetch_add(drained, Ordering::Relaxed);
            give += drained;
        }
        if give == 0 || !self.ensure_connected() {
            return;
        }
        let f = st.fleet.clone();
        match self.call(name, &f, 0, give, 0, st.seen_tat, 0.0) {
            Ok(_) => {
                tracing::info!(class = name, tokens = give, "fleet credit returned");
            }
            Err(e) => self.went_down(&e),
        }
    }

    /// Return every class's credit (the daemon is stopping).
    pub fn return_all(&mut self, region: &Region) {
        let names: Vec<String> = self.classes.keys().cloned().collect();
        for name in names {
            if let Some(st) = self.classes.remove(&name) {
                self.give_back_once(region, &name, &st);
            }
        }
    }

    /// One round of leases.
    pub fn tick(&mut self, region: &Region, config: &Config) {
        let dt = self.last_tick.elapsed().as_secs_f64().max(1e-3);
        self.last_tick = Instant::now();
        self.sync_classes(region, config);
        let interval = self.config.lease_interval;
        let interval_ns = interval.as_nanos() as u64;
        let lifetime_ns = interval_ns * u64::from(LEASE_LIFETIME_INTERVALS);
        let names: Vec<String> = self.classes.keys().cloned().collect();
        let was_down = self.down;
        let mut connected = self.ensure_connected();
        for name in names {
            let Some(mut st) = self.classes.remove(&name) else {
                continue;
            };
            let Some(rec) = region.class(st.index) else {
                continue;
            };
            let now_ns = monotonic_ns();
            // Relaxed: a hint for clients' retry-after.
            rec.fleet_next_lease_ns
                .store(now_ns + interval_ns, Ordering::Relaxed);

            // An expired lease's credit is void: count it, never return it.
            if !fleet::lease_valid(&rec.fleet_lease_until_ns, now_ns) {
                let n = fleet::drain(&rec.fleet_credit);
                // Relaxed: statistics.
                rec.fleet_expired.fetch_add(n, Ordering::Relaxed);
            }

            // Demand: admitted plus refused for lack of credit, smoothed.
            let count = region_demand(region, st.index);
            let rate = count.saturating_sub(st.demand_count) as f64 / dt;
            st.demand_count = count;
            st.demand_per_s = 0.5 * st.demand_per_s + 0.5 * rate;
            let want = ((st.demand_per_s * interval.as_secs_f64() * 1.5).ceil() as u64)
                .clamp(1, st.fleet.max_lease);

            // Relaxed: a running total written by clients.
            let used = rec.fleet_fallback_used.load(Ordering::Relaxed);
            let charge = used.saturating_sub(st.fallback_charged);

            if connected {
                let sent = Instant::now();
                let sent_ns = monotonic_ns();
                let f = st.fleet.clone();
                match self.call(
                    &name,
                    &f,
                    want,
                    st.to_return,
                    charge,
                    st.seen_tat,
                    st.demand_per_s,
                ) {
                    Ok(g) => {
                        if self.down {
                            self.down = false;
                            tracing::info!(store = %self.config.store, "fleet store reachable again: leasing resumed");
                        }
                        let unspent = fleet::renew(&rec.fleet_credit, g.granted);
                        // Release pairs with clients' Acquire in
                        // `fleet::lease_valid`: the credit comes first.
                        rec.fleet_lease_until_ns
                            .store(sent_ns + lifetime_ns, Ordering::Release);
                        // Relaxed: statistics and hints.
                        rec.fleet_returned.fetch_add(unspent, Ordering::Relaxed);
                        rec.fleet_leased.fetch_add(g.granted, Ordering::Relaxed);
                        rec.fleet_rtt_us
                            .store(sent.elapsed().as_micros() as u64, Ordering::Relaxed);
                        st.to_return = unspent;
                        st.fallback_charged = used;
                        st.seen_tat = st.seen_tat.max(g.tat);
                        rec.fleet_seen_tat.store(st.seen_tat, Ordering::Relaxed);
                        if g.hosts != st.hosts {
                            st.hosts = g.hosts.max(1);
                            if st.fleet.fallback_rate == FallbackRate::Auto {
                                region::write_fleet(rec, &self.config, &st.fleet, st.hosts);
                            }
                        }
                        let mismatch = if g.mismatch {
                            fleet::STATUS_MISMATCH
                        } else {
                            0
                        };
                        rec.fleet_status
                            .store(u64::from(st.hosts) | mismatch, Ordering::Relaxed);
                    }
                    Err(e) => {
                        self.went_down(&e);
                        connected = false;
                    }
                }
            }
            set_fallback_bit(rec, monotonic_ns());
            self.classes.insert(name, st);
        }
        // A new outage counts once per class.
        if self.down && !was_down {
            for st in self.classes.values() {
                if let Some(rec) = region.class(st.index) {
                    // Relaxed: a statistic.
                    rec.fleet_outages.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }
}

/// Admitted plus refused for lack of fleet credit: this host's demand.
fn region_demand(region: &Region, index: u32) -> u64 {
    crate::maintain::count(region, index, counters::ADMITTED).wrapping_add(crate::maintain::count(
        region,
        index,
        counters::REFUSED_FLEET,
    ))
}

/// Keep the status's fallback bit in line with the lease.
fn set_fallback_bit(rec: &ClassRecord, now_ns: u64) {
    let on = !fleet::lease_valid(&rec.fleet_lease_until_ns, now_ns);
    // Relaxed: a statistic; only this thread writes the status.
    let s = rec.fleet_status.load(Ordering::Relaxed);
    let s = if on {
        s | fleet::STATUS_ON_FALLBACK
    } else {
        s & !fleet::STATUS_ON_FALLBACK
    };
    rec.fleet_status.store(s, Ordering::Relaxed);
}

/// Run the leasing thread until `stop`, then return every class's credit.
/// `current` is the region served now; `config` the config in force.
pub fn spawn(
    current: Arc<Mutex<Arc<OwnedRegion>>>,
    config: Arc<Mutex<Config>>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("fleet-lease".into())
        .spawn(move || {
            let mut leaser: Option<Leaser> = None;
            loop {
                let owned = current.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let cfg = config.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let region = owned.region();
                if stop.load(StdOrdering::SeqCst) {
                    if let Some(l) = leaser.as_mut() {
                        l.return_all(region);
                    }
                    return;
                }
                let Some(fc) = cfg.fleet.clone() else {
                    if let Some(mut l) = leaser.take() {
                        l.return_all(region);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                };
                let same = leaser.as_ref().is_some_and(|l| l.config == fc);
                if !same {
                    if let Some(mut l) = leaser.take() {
                        l.return_all(region);
                    }
                    let host = host_id(&fc, owned.path());
                    tracing::info!(store = %fc.store, namespace = %fc.namespace, host = %host, interval = ?fc.lease_interval, "fleet leasing on");
                    leaser = Some(Leaser::new(fc.clone(), host));
                }
                let started = Instant::now();
                if let Some(l) = leaser.as_mut() {
                    l.tick(region, &cfg);
                }
                let left = fc.lease_interval.saturating_sub(started.elapsed());
                // Sleep in short steps so a stop is seen promptly.
                let until = Instant::now() + left;
                while Instant::now() < until && !stop.load(StdOrdering::SeqCst) {
                    std::thread::sleep((until - Instant::now()).min(Duration::from_millis(10)));
                }
            }
        })
}

/// The store's view of every fleet class (for `sluice fleet`): per class the
/// fill, the active hosts, and each host's demand, weight and share. Reads
/// only, on a connection of its own with the configured timeouts.
pub fn store_view(config: &Config) -> Result<serde_json::Value, String> {
    let Some(fc) = &config.fleet else {
        return Err("this sluiced has no [fleet] table".to_string());
    };
    let leaser = Leaser::new(fc.clone(), String::new());
    let mut con = leaser
        .connect()
        .map_err(|e| format!("cannot reach the fleet store {}: {e}", fc.store))?;
    let err = |e: redis::RedisError| format!("fleet store {}: {e}", fc.store);
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query(&mut con).map_err(err)?;
    let now = secs * 1_000_000 + micros;
    let quiet = fc.lease_interval.as_micros() as u64 * u64::from(QUIET_INTERVALS);
    let mut classes = Vec::new();
    for c in &config.classes {
        let Some(f) = &c.fleet else { continue };
        let (bucket, hosts_key) = keys(&fc.namespace, &c.name);
        let b: HashMap<String, u64> = redis::cmd("HGETALL")
            .arg(&bucket)
            .query(&mut con)
            .map_err(err)?;
        let t_ns = b
            .get("t_ns")
            .copied()
            .unwrap_or((1e9 / f.rate).ceil() as u64)
            .max(1);
        let burst = b.get("burst").copied().unwrap_or(f.burst);
        let tat = b.get("tat").copied().unwrap_or(0);
        let room_us = (burst as f64 * t_ns as f64 / 1000.0) - (tat.max(now) - now) as f64;
        let fill = ((room_us * 1000.0 / t_ns as f64).floor().max(0.0) as u64).min(burst);
        let h: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(&hosts_key)
            .query(&mut con)
            .map_err(err)?;
        let mut hosts: Vec<(String, f64, u64)> = h
            .iter()
            .filter_map(|(host, v)| {
                let mut it = v.split_whitespace().map(|x| x.parse::<u64>().ok());
                let (d, w, seen) = (it.next()??, it.next()??, it.next()??);
                (seen + quiet >= now).then(|| (host.clone(), d as f64 / 1000.0, w))
            })
            .collect();
        hosts.sort_by(|a, b| a.0.cmp(&b.0));
        let weights: u64 = hosts.iter().filter(|h| h.1 > 0.0).map(|h| h.2).sum();
        let host_list: Vec<serde_json::Value> = hosts
            .iter()
            .map(|(host, demand, w)| {
                let share = if *demand > 0.0 && weights > 0 {
                    *w as f64 / weights as f64
                } else {
                    0.0
                };
                serde_json::json!({"host": host, "demand_per_s": demand, "weight": w, "share": share})
            })
            .collect();
        classes.push(serde_json::json!({
            "name": c.name,
            "key": bucket,
            "rate": 1e9 / t_ns as f64,
            "burst": burst,
            "fill": fill,
            "active_hosts": hosts.len(),
            "hosts": host_list,
        }));
    }
    Ok(serde_json::json!({"store": fc.store, "namespace": fc.namespace, "classes": classes}))
}
