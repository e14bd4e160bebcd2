//! The daemon's config: reading the TOML file, checking every value against
//! the region's hard limits, and filling in the defaults for keys left out.
//!
//! Loading runs in two steps. First the text is deserialized into private
//! `Raw*` structs that mirror the file exactly: unknown keys are refused there
//! (`deny_unknown_fields`), and every value that is checked later is wrapped
//! in [`toml::Spanned`] so that it keeps its byte range in the file. Then each
//! raw value is checked and converted into the public types below, which hold
//! only valid values with every default filled in. The first problem found
//! stops the load.
//!
//! Every error, whether the TOML syntax is broken or a value is out of range,
//! carries the file name, the 1-based line and column of the offending text,
//! and a lowercase message that names the key path (`classes.reports.rate`),
//! the bad value, the allowed range and what to change. A reload on SIGHUP
//! that fails keeps the old config, so the message is all the operator sees.
//!
//! Classes, dependencies, tiers and tenant keys keep the order of the file.
//!
//! With no config file the daemon runs [`DEFAULT_CONFIG_TOML`], a commented
//! example that a newcomer can copy and edit.

use std::fmt;
use std::marker::PhantomData;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer};
use sluice_shm_layout::limits;
use toml::Spanned;

/// The config the daemon runs when it is started without `--config`.
///
/// [`Config::embedded_default`] parses it; a unit test proves it parses.
pub const DEFAULT_CONFIG_TOML: &str = r#"# sluice: the embedded default config.
#
# sluiced runs this when it is started without --config. Copy it to a file,
# edit it, check it with `sluice check-config FILE`, then start the daemon
# with `sluiced --config FILE` (or send SIGHUP to reload a running one).
#
# Durations are a whole number and a unit: ns, us, ms, s, m, h or d
# ("250ms", "30s", "1d"). Every key left out takes its default.

[daemon]
# How long a draining daemon (after SIGTERM) waits for held permits to be
# released before it exits anyway.
drain_timeout = "30s"
# The control socket used by `sluice pause`, `trip`, `cancel` and friends.
# Left out, it lives beside the region file.
# control_socket = "/run/sluice/control"

# Table sizes, fixed when the region is created. Classes leave room for
# classes added by a reload; slots must cover the sum of every class's
# max_in_flight.
capacity = { classes = 64, clients = 1024, tickets = 65536, slots = 65536 }

[region]
# Where the region lives. Left out, it is /dev/shm/sluice, or whatever
# --region or SLUICE_REGION says.
# path = "/dev/shm/sluice"
# Who may attach: an octal file mode. Clients need read and write access.
mode = "0660"
# The group that owns the region. Left out, it is the daemon's own group,
# so this file works on a fresh machine.
# group = "sluice"

# A class is a named kind of work. A request names its class and a cost
# (default 1); it takes that many tokens from the class's rate bucket and
# that many of its slots, whichever the class has.

# `default`: the class to try first. At most 100 requests a second, with a
# burst of 20 at once, and at most 4 in flight.
[classes.default]
rate = 100                 # tokens per second
burst = 20                 # how many may arrive at once
max_in_flight = 4          # slots: how many may run at the same time

# `reports`: rate only, no slot limit. 5 a second with a burst of 5; two
# more beyond the burst are admitted but marked degraded (serve the cheaper
# result). No report may cost more than 7: a bigger one is refused
# `smaller_scope` at once, since it could never fit. Retries (--attempt 2
# and up) spend a retry budget of 2 that each first attempt refills by 0.1.
[classes.reports]
rate = 5
burst = 5
excess_burst = 2
max_cost = 7
retry_ratio = 0.1
retry_burst = 2

# `imports`: two at a time. Batch work may use only half of the slots, so
# an interactive request always finds one free.
[classes.imports]
max_in_flight = 2
max_wait = "1m"            # a queued request waits at most this long

[classes.imports.lanes]    # share of max_in_flight each lane may use
batch = 0.5

# `one`: a mutex across processes, like flock. Try
#   sluice run --class one -- sleep 5
# in two terminals, or queue behind it with --wait 10s.
[classes.one]
max_in_flight = 1

# `reads`: work that needs the database `db`. While db's circuit breaker
# is open (half of at least 5 reported outcomes failed in 10s, or
# `sluice trip db`), reads are refused `dependency`.
[classes.reads]
max_in_flight = 8
depends_on = ["db"]

[dependencies.db]
failure_ratio = 0.5
window = "10s"
min_requests = 5
open_for = "5s"
half_open_probes = 1

# `api`: every request names its tenant (--tenant KEY); each tenant has its
# tier's rate and daily quota. `acme` is on the trial tier: 3 a day.
[classes.api]
max_in_flight = 16
tenants = true

[tenants]
default_tier = "free"

[tenants.tiers.free]
rate = 10
burst = 5
quota = 1000
period = "1d"

[tenants.tiers.trial]
rate = 10
burst = 3
quota = 3
period = "1d"

[tenants.keys]
acme = "trial"
"#;

/// The units [`parse_duration`] understands, with their length in nanoseconds.
///
/// Longer suffixes come first so that `ms` is not read as `m` followed by `s`.
const DURATION_UNITS: [(&str, u64); 7] = [
    ("ns", 1),
    ("us", 1_000),
    ("ms", 1_000_000),
    ("s", 1_000_000_000),
    ("m", 60 * 1_000_000_000),
    ("h", 3_600 * 1_000_000_000),
    ("d", 86_400 * 1_000_000_000),
];

/// The file mode of a new region when the config does not say.
const DEFAULT_MODE: u32 = 0o660;

/// How long a draining daemon waits by default.
const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// `fleet.lease_interval` by default.
const DEFAULT_LEASE_INTERVAL: Duration = Duration::from_millis(100);
/// The shortest `fleet.lease_interval`.
const MIN_LEASE_INTERVAL: Duration = Duration::from_millis(5);

/// How long a tenant key may sit unused before it may be evicted, by default.
const DEFAULT_IDLE_AFTER: Duration = Duration::from_secs(86_400);

/// A whole, checked config: every value valid, every default filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// The `[daemon]` table.
    pub daemon: DaemonConfig,
    /// The `[region]` table.
    pub region: RegionConfig,
    /// The `[classes.NAME]` tables, in the order of the file.
    pub classes: Vec<ClassConfig>,
    /// The `[dependencies.NAME]` tables, in the order of the file.
    pub dependencies: Vec<DependencyConfig>,
    /// The `[tenants]` table, if the file has one.
    pub tenants: Option<TenantsConfig>,
    /// The `[fleet]` table, if the file has one.
    pub fleet: Option<FleetConfig>,
}

/// The `[fleet]` table: where the fleet-wide buckets live and how this host
/// leases from them (see FLEET.md).
#[derive(Debug, Clone, PartialEq)]
pub struct FleetConfig {
    /// The store: `redis://`, `rediss://` (TLS) or `redis+unix://` URL.
    pub store: String,
    /// Prefix of every key, so deployments can share a store.
    pub namespace: String,
    /// A file holding the store's password (first line), if it needs one.
    pub password_file: Option<PathBuf>,
    /// How often the daemon leases; a lease lives for two intervals.
    pub lease_interval: Duration,
    /// Connect timeout; default half the lease interval.
    pub connect_timeout: Duration,
    /// Response timeout; default half the lease interval.
    pub response_timeout: Duration,
    /// What clients do once the lease has expired.
    pub on_store_down: StoreDown,
    /// This host's name in the store; default the hostname and the region
    /// path, so several daemons on one machine are distinct hosts.
    pub host_id: Option<String>,
}

/// `fleet.on_store_down`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreDown {
    /// Spend the class's fallback bucket.
    Fallback,
    /// Admit (host limits still apply).
    Open,
    /// Refuse with reason `fleet`.
    Refuse,
}

/// `fleet_fallback_rate`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FallbackRate {
    /// Tokens per second.
    Rate(f64),
    /// `fleet_rate` divided by the active hosts last seen.
    Auto,
}

/// A class's `fleet_*` keys.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassFleet {
    /// Fleet-wide tokens per second.
    pub rate: f64,
    /// Fleet-wide burst, in tokens.
    pub burst: u64,
    /// This host's weight in the fair share.
    pub weight: u32,
    /// The fallback bucket's rate.
    pub fallback_rate: FallbackRate,
    /// The fallback bucket's burst.
    pub fallback_burst: u64,
    /// The most credit one lease holds; also the largest cost.
    pub max_lease: u64,
    /// False: shadow mode, count would-be refusals and refuse nothing.
    pub enforce: bool,
}

/// The `[daemon]` table.
#[derive(Debug, Clone, PartialEq)]
pub struct DaemonConfig {
    /// How long a draining daemon waits for held permits before it exits.
    pub drain_timeout: Duration,
    /// The control socket; `None` puts it beside the region.
    pub control_socket: Option<PathBuf>,
    /// Table sizes of the region, fixed at creation.
    pub capacity: Capacity,
    /// Serve Prometheus metrics over HTTP here (a loopback address only);
    /// `None`: no HTTP server.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// `daemon.capacity`: how many of each thing the region has room for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// Class table entries, including room for classes added by a reload.
    pub classes: u32,
    /// Client processes attached at once.
    pub clients: u32,
    /// Tickets (waiting or verifying) at once.
    pub tickets: u32,
    /// Slot words; must cover the sum of every class's `max_in_flight`.
    pub slots: u32,
}

/// The `[region]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionConfig {
    /// The region file; `None` leaves it to `--region`, `SLUICE_REGION` or
    /// the built-in default.
    pub path: Option<PathBuf>,
    /// The file mode of a new region, permission bits only.
    pub mode: u32,
    /// The group that owns the region; `None` is the daemon's own group.
    pub group: Option<String>,
}

/// One `[classes.NAME]` table: a named kind of work and its limits.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassConfig {
    /// The class name, 1 to `MAX_NAME_LEN` bytes of `[A-Za-z0-9_.-]`.
    pub name: String,
    /// Tokens per second; `None` means the class has no rate bucket.
    pub rate: Option<f64>,
    /// How many tokens may be taken at once for a green (plain) admit.
    pub burst: u64,
    /// Tokens beyond `burst` that are admitted degraded (yellow).
    pub excess_burst: u64,
    /// Slots; `None` means the class has no concurrency limit.
    pub max_in_flight: Option<u64>,
    /// A grant that takes the in-flight count above this is degraded;
    /// `None` means the same as `max_in_flight`.
    pub soft_in_flight: Option<u64>,
    /// The largest cost one request may ask for; `None` means no cap beyond
    /// the others.
    pub max_cost: Option<u64>,
    /// Tickets each lane's queue holds.
    pub queue_depth: u32,
    /// The longest a request may wait in the queue; `None` means no cap
    /// beyond the request's own deadline.
    pub max_wait: Option<Duration>,
    /// A waiting ticket moves one lane up each time it has waited this long;
    /// `None` turns aging off.
    pub age_after: Option<Duration>,
    /// Retry budget units each admitted first attempt adds.
    pub retry_ratio: f64,
    /// Size of the retry budget; `None` means retries are not budgeted.
    pub retry_burst: Option<u64>,
    /// Names of the `[dependencies]` this class needs.
    pub depends_on: Vec<String>,
    /// What a request willing to wait does while a dependency is down.
    pub on_dependency_down: QueuePolicy,
    /// What a request willing to wait does while the class is paused.
    pub on_paused: QueuePolicy,
    /// The share of `max_in_flight` each lane may use.
    pub lanes: Lanes,
    /// Whether requests must carry a tenant key.
    pub tenants: bool,
    /// The fleet-wide limit, if `fleet_rate` is set.
    pub fleet: Option<ClassFleet>,
}

/// What a request that is willing to wait does when a class cannot serve it
/// for a reason other than load (a dependency down, the class paused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueuePolicy {
    /// Refuse at once with the reason.
    Refuse,
    /// Hold a ticket until the reason goes away or the deadline passes.
    Queue,
}

/// The share of `max_in_flight` each lane may use, each in (0, 1].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Lanes {
    /// The `critical` lane.
    pub critical: f64,
    /// The `interactive` lane, the default one.
    pub interactive: f64,
    /// The `batch` lane.
    pub batch: f64,
    /// The `maintenance` lane.
    pub maintenance: f64,
}

/// One `[dependencies.NAME]` table: a circuit breaker.
#[derive(Debug, Clone, PartialEq)]
pub struct DependencyConfig {
    /// The dependency name, under the same rules as a class name.
    pub name: String,
    /// The breaker opens when this share of outcomes in the window failed.
    pub failure_ratio: f64,
    /// How far back outcomes count.
    pub window: Duration,
    /// The breaker does not open on fewer outcomes than this in the window.
    pub min_requests: u32,
    /// How long the breaker stays open before it probes.
    pub open_for: Duration,
    /// How many probes a half-open breaker lets through.
    pub half_open_probes: u32,
}

/// The `[tenants]` table: per-key quotas.
#[derive(Debug, Clone, PartialEq)]
pub struct TenantsConfig {
    /// Tenant keys the region has room for.
    pub capacity: u32,
    /// The tier of a key not listed under `[tenants.keys]`.
    pub default_tier: String,
    /// What happens to a new key when the table is full.
    pub on_full: OnFull,
    /// A key unused this long may be evicted.
    pub idle_after: Duration,
    /// The `[tenants.tiers.NAME]` tables, in the order of the file.
    pub tiers: Vec<TierConfig>,
    /// `(key, tier)` pairs from `[tenants.keys]`, in the order of the file.
    pub keys: Vec<(String, String)>,
}

/// What happens to a new tenant key when the tenant table is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnFull {
    /// Refuse the request.
    Refuse,
    /// Put the key in one bucket shared by every overflow key.
    Shared,
}

/// One `[tenants.tiers.NAME]` table.
#[derive(Debug, Clone, PartialEq)]
pub struct TierConfig {
    /// The tier name, under the same rules as a class name.
    pub name: String,
    /// Tokens per second for each key of this tier.
    pub rate: f64,
    /// How many tokens a key may take at once.
    pub burst: u64,
    /// Tokens a key may take per `period`; `None` means no quota.
    pub quota: Option<u64>,
    /// The quota's period; set exactly when `quota` is.
    pub period: Option<Duration>,
}

/// A config that could not be read, parsed or accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file name (or other label) the text came from.
    pub source_name: String,
    /// 1-based line of the offending text, when known.
    pub line: Option<usize>,
    /// 1-based column, in characters, of the offending text, when known.
    pub column: Option<usize>,
    /// What is wrong and what to do, lowercase.
    pub message: String,
}

/// The file as written: every key optional, checked values with their spans.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    daemon: Option<RawDaemon>,
    region: Option<RawRegion>,
    classes: Option<Entries<RawClass>>,
    dependencies: Option<Entries<RawDependency>>,
    tenants: Option<RawTenants>,
    fleet: Option<RawFleet>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFleet {
    store: Option<Spanned<String>>,
    namespace: Option<Spanned<String>>,
    password_file: Option<Spanned<String>>,
    lease_interval: Option<Spanned<String>>,
    connect_timeout: Option<Spanned<String>>,
    response_timeout: Option<Spanned<String>>,
    on_store_down: Option<StoreDown>,
    host_id: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDaemon {
    drain_timeout: Option<Spanned<String>>,
    control_socket: Option<Spanned<String>>,
    metrics_listen: Option<Spanned<String>>,
    capacity: Option<RawCapacity>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCapacity {
    classes: Option<Spanned<i64>>,
    clients: Option<Spanned<i64>>,
    tickets: Option<Spanned<i64>>,
    slots: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegion {
    path: Option<Spanned<String>>,
    mode: Option<Spanned<String>>,
    group: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClass {
    rate: Option<Spanned<f64>>,
    burst: Option<Spanned<i64>>,
    excess_burst: Option<Spanned<i64>>,
    max_in_flight: Option<Spanned<i64>>,
    soft_in_flight: Option<Spanned<i64>>,
    max_cost: Option<Spanned<i64>>,
    queue_depth: Option<Spanned<i64>>,
    max_wait: Option<Spanned<String>>,
    age_after: Option<Spanned<String>>,
    retry_ratio: Option<Spanned<f64>>,
    retry_burst: Option<Spanned<i64>>,
    depends_on: Option<Vec<Spanned<String>>>,
    on_dependency_down: Option<QueuePolicy>,
    on_paused: Option<QueuePolicy>,
    lanes: Option<RawLanes>,
    tenants: Option<Spanned<bool>>,
    fleet_rate: Option<Spanned<f64>>,
    fleet_burst: Option<Spanned<i64>>,
    fleet_weight: Option<Spanned<i64>>,
    fleet_fallback_rate: Option<Spanned<toml::Value>>,
    fleet_fallback_burst: Option<Spanned<i64>>,
    fleet_max_lease: Option<Spanned<i64>>,
    fleet_enforce: Option<Spanned<bool>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLanes {
    critical: Option<Spanned<f64>>,
    interactive: Option<Spanned<f64>>,
    batch: Option<Spanned<f64>>,
    maintenance: Option<Spanned<f64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDependency {
    failure_ratio: Option<Spanned<f64>>,
    window: Option<Spanned<String>>,
    min_requests: Option<Spanned<i64>>,
    open_for: Option<Spanned<String>>,
    half_open_probes: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTenants {
    capacity: Option<Spanned<i64>>,
    default_tier: Spanned<String>,
    on_full: Option<OnFull>,
    idle_after: Option<Spanned<String>>,
    tiers: Option<Entries<RawTier>>,
    keys: Option<Entries<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTier {
    rate: Spanned<f64>,
    burst: Option<Spanned<i64>>,
    quota: Option<Spanned<i64>>,
    period: Option<Spanned<String>>,
}

/// A TOML table read as a list, so that its keys keep the order of the file
/// and their spans (a map type would sort them and lose where they were).
struct Entries<V>(Vec<(Spanned<String>, V)>);

/// Builds errors that point into one text.
struct Checker<'a> {
    text: &'a str,
    source: &'a str,
}

/// Parses a duration: a whole number followed by a unit, with no space.
///
/// The units are `ns`, `us`, `ms`, `s`, `m`, `h` and `d`; `"0s"` is allowed.
/// The result may not exceed `limits::MAX_DURATION_NS` (100 years). The
/// error is a lowercase sentence without the key path; the caller adds it.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    const UNITS_HINT: &str =
        "write a whole number followed by a unit, one of ns, us, ms, s, m, h, d \
                              (e.g. \"250ms\", \"30s\", \"1d\")";

    // Split at the first character that is not a digit.
    let digits_end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (digits, unit) = s.split_at(digits_end);
    if s.is_empty() {
        return Err(format!("the duration is empty; {UNITS_HINT}"));
    }
    if digits.is_empty() {
        return Err(format!(
            "\"{s}\" does not start with a whole number; {UNITS_HINT}"
        ));
    }
    if unit.is_empty() {
        return Err(format!("\"{s}\" has no unit; {UNITS_HINT}"));
    }

    // Find the unit; it must be the whole rest of the string.
    let Some(&(_, unit_ns)) = DURATION_UNITS.iter().find(|(name, _)| *name == unit) else {
        return Err(format!(
            "\"{s}\" has an unknown unit \"{unit}\"; {UNITS_HINT}"
        ));
    };

    // Scale to nanoseconds; any overflow is beyond the limit anyway.
    let too_long = || {
        format!(
            "\"{s}\" is longer than the limit of 100 years ({} ns); use a shorter duration",
            limits::MAX_DURATION_NS
        )
    };
    let count: u64 = digits.parse().map_err(|_| too_long())?;
    let nanos = count.checked_mul(unit_ns).ok_or_else(too_long)?;
    if nanos > limits::MAX_DURATION_NS {
        return Err(too_long());
    }
    Ok(Duration::from_nanos(nanos))
}

impl Config {
    /// Parses and checks a config; `source` names the text in messages
    /// (usually the file name).
    pub fn parse(text: &str, source: &str) -> Result<Config, ConfigError> {
        let checker = Checker { text, source };
        let raw: RawConfig = toml::from_str(text).map_err(|e| checker.toml_error(&e))?;
        checker.config(raw)
    }

    /// Reads the file at `path`, then parses and checks it.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let source = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            source_name: source.clone(),
            line: None,
            column: None,
            message: format!(
                "cannot read the config file: {e}; check the path and its permissions"
            ),
        })?;
        Config::parse(&text, &source)
    }

    /// The config the daemon runs without `--config`: [`DEFAULT_CONFIG_TOML`].
    pub fn embedded_default() -> Config {
        Config::parse(DEFAULT_CONFIG_TOML, "<embedded default>")
            .expect("DEFAULT_CONFIG_TOML is valid: a unit test parses it")
    }
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            control_socket: None,
            capacity: Capacity::default(),
            metrics_listen: None,
        }
    }
}

impl Default for Capacity {
    fn default() -> Self {
        Capacity {
            classes: 64,
            clients: 1_024,
            tickets: 65_536,
            slots: 65_536,
        }
    }
}

impl Default for RegionConfig {
    fn default() -> Self {
        RegionConfig {
            path: None,
            mode: DEFAULT_MODE,
            group: None,
        }
    }
}

impl Lanes {
    /// The shares in lane order: critical, interactive, batch, maintenance.
    pub fn shares(&self) -> [f64; 4] {
        [
            self.critical,
            self.interactive,
            self.batch,
            self.maintenance,
        ]
    }
}

impl Default for Lanes {
    fn default() -> Self {
        Lanes {
            critical: 1.0,
            interactive: 1.0,
            batch: 1.0,
            maintenance: 1.0,
        }
    }
}

impl ClassConfig {
    /// Ticket records per lane: a full queue plus as many tickets granted
    /// from it and still held.
    pub fn tickets_per_lane(&self) -> u32 {
        self.queue_depth.saturating_mul(2)
    }

    /// Ticket records the class reserves in the region: four lanes, then a
    /// pool of 64 for tickets granted without waiting (when it is empty, a
    /// request is decided without a ticket, or waits in its lane). Fixed, so
    /// a reload may raise `max_in_flight` without new records.
    pub fn ticket_records(&self) -> u32 {
        self.tickets_per_lane().saturating_mul(4).saturating_add(64)
    }

    /// How many slots each lane may hold, in lane order (critical,
    /// interactive, batch, maintenance): `max(1, ceil(share ×
    /// max_in_flight))`. `None` when the class has no slots.
    pub fn lane_ceilings(&self) -> Option<[u64; 4]> {
        let max = self.max_in_flight?;
        Some(self.lanes.shares().map(|share| {
            // max <= MAX_IN_FLIGHT (2^16) is exact in an f64, and so is the
            // ceiling; the clamp only guards a share read back as above 1.
            let ceiling = (share * max as f64).ceil() as u64;
            ceiling.clamp(1, max.max(1))
        }))
    }
}

impl<'a> Checker<'a> {
    /// Turns a TOML syntax or shape error into a `ConfigError` with a position.
    fn toml_error(&self, e: &toml::de::Error) -> ConfigError {
        // serde names Rust types; say what the file should hold instead.
        let mut message = e
            .message()
            .trim_end()
            .replace("expected i64", "expected a whole number")
            .replace("expected f64", "expected a number");
        if message.starts_with("unknown field") {
            message.push_str("; remove it or fix its spelling");
        }
        match e.span() {
            Some(span) => self.at(span, message),
            None => ConfigError {
                source_name: self.source.to_string(),
                line: None,
                column: None,
                message,
            },
        }
    }

    /// An error at the start of `span`.
    fn at(&self, span: Range<usize>, message: String) -> ConfigError {
        let (line, column) = line_column(self.text, span.start);
        ConfigError {
            source_name: self.source.to_string(),
            line: Some(line),
            column: Some(column),
            message,
        }
    }

    fn config(&self, raw: RawConfig) -> Result<Config, ConfigError> {
        // Tables the rest depends on come first: capacity bounds the classes,
        // dependencies and tenants are named by the classes.
        let daemon = match raw.daemon {
            Some(d) => self.daemon(d)?,
            None => DaemonConfig::default(),
        };
        let region = match raw.region {
            Some(r) => self.region(r)?,
            None => RegionConfig::default(),
        };
        let mut dependencies = Vec::new();
        for (name, dep) in raw.dependencies.map(|e| e.0).unwrap_or_default() {
            dependencies.push(self.dependency(name, dep)?);
        }
        let tenants = raw.tenants.map(|t| self.tenants(t)).transpose()?;
        let fleet = raw.fleet.map(|f| self.fleet(f)).transpose()?;

        let raw_classes = raw.classes.map(|e| e.0).unwrap_or_default();
        let class_count = raw_classes.len();
        let mut classes = Vec::with_capacity(class_count);
        let mut slots_total: u64 = 0;
        let mut tickets_total: u64 = 0;
        for (index, (name, class)) in raw_classes.into_iter().enumerate() {
            // The region's class table has room for capacity.classes entries;
            // point at the first class that does not fit.
            if index == daemon.capacity.classes as usize {
                return Err(self.at(
                    name.span(),
                    format!(
                        "the file has {class_count} classes, more than daemon.capacity.classes = \
                         {}; class \"{}\" is the first that does not fit; raise \
                         daemon.capacity.classes (at most {}) or remove classes",
                        daemon.capacity.classes,
                        name.get_ref(),
                        limits::MAX_CLASSES
                    ),
                ));
            }
            let slots_span = class
                .max_in_flight
                .as_ref()
                .map_or_else(|| name.span(), Spanned::span);
            let depth_span = class
                .queue_depth
                .as_ref()
                .map_or_else(|| name.span(), Spanned::span);
            let checked = self.class(
                name,
                class,
                &dependencies,
                tenants.is_some(),
                fleet.is_some(),
            )?;

            // Every class reserves ticket records for its queues; point at
            // the class that first overflows the ticket table.
            tickets_total += u64::from(checked.ticket_records());
            if tickets_total > u64::from(daemon.capacity.tickets) {
                return Err(self.at(
                    depth_span,
                    format!(
                        "classes.{} needs {} ticket records (4 lanes x 2 x queue_depth {}, plus 64), bringing all classes to {tickets_total}, more than daemon.capacity.tickets = {}; raise daemon.capacity.tickets (at most {}) or lower queue_depth",
                        checked.name,
                        checked.ticket_records(),
                        checked.queue_depth,
                        daemon.capacity.tickets,
                        limits::MAX_TICKETS
                    ),
                ));
            }

            // Every slot of every class is one word of the region's slot
            // table; point at the max_in_flight that first overflows it.
            let Some(max_in_flight) = checked.max_in_flight else {
                classes.push(checked);
                continue;
            };
            slots_total += max_in_flight;
            if slots_total > u64::from(daemon.capacity.slots) {
                return Err(self.at(
                    slots_span,
                    format!(
                        "classes.{}.max_in_flight = {max_in_flight} brings the slots of all \
                         classes to {slots_total}, more than daemon.capacity.slots = {}; raise \
                         daemon.capacity.slots (at most {}) or lower max_in_flight",
                        checked.name,
                        daemon.capacity.slots,
                        limits::MAX_SLOTS
                    ),
                ));
            }
            classes.push(checked);
        }

        Ok(Config {
            daemon,
            region,
            classes,
            dependencies,
            tenants,
            fleet,
        })
    }

    fn fleet(&self, raw: RawFleet) -> Result<FleetConfig, ConfigError> {
        let Some(store) = raw.store else {
            return Err(self.at(
                0..0,
                "[fleet] needs store = \"redis://host:port\" (or rediss://, redis+unix://); \
                 add it or remove the [fleet] table"
                    .to_string(),
            ));
        };
        let url = store.get_ref();
        let scheme_ok = ["redis://", "rediss://", "redis+unix://"]
            .iter()
            .any(|p| url.starts_with(p) && url.len() > p.len());
        if !scheme_ok {
            return Err(self.at(
                store.span(),
                format!(
                    "fleet.store = \"{url}\" is not a store URL; write redis://host:port, \
                     rediss://host:port (TLS) or redis+unix:///path/to/socket"
                ),
            ));
        }
        let namespace = match &raw.namespace {
            Some(n) => {
                self.name(n, "fleet namespace")?;
                n.get_ref().clone()
            }
            None => "default".to_string(),
        };
        if let Some(h) = &raw.host_id {
            self.name(h, "fleet host_id")?;
        }
        let password_file = raw
            .password_file
            .as_ref()
            .map(|p| self.path(p, "fleet.password_file"))
            .transpose()?;
        let lease_interval = match &raw.lease_interval {
            Some(d) => self.positive_duration(
                d,
                "fleet.lease_interval",
                "the daemon leases once per interval",
            )?,
            None => DEFAULT_LEASE_INTERVAL,
        };
        if lease_interval < MIN_LEASE_INTERVAL {
            let span = raw.lease_interval.as_ref().map_or(0..0, Spanned::span);
            return Err(self.at(
                span,
                format!(
                    "fleet.lease_interval = {lease_interval:?} is below the minimum \
                     {MIN_LEASE_INTERVAL:?}; raise it"
                ),
            ));
        }
        let timeout = |raw: &Option<Spanned<String>>, key: &str| match raw {
            Some(d) => self.positive_duration(d, key, "a request to the store needs time"),
            None => Ok(lease_interval / 2),
        };
        let connect_timeout = timeout(&raw.connect_timeout, "fleet.connect_timeout")?;
        let response_timeout = timeout(&raw.response_timeout, "fleet.response_timeout")?;
        Ok(FleetConfig {
            store: url.clone(),
            namespace,
            password_file,
            lease_interval,
            connect_timeout,
            response_timeout,
            on_store_down: raw.on_store_down.unwrap_or(StoreDown::Fallback),
            host_id: raw.host_id.map(Spanned::into_inner),
        })
    }

    /// A class's `fleet_*` keys; `None` without `fleet_rate`.
    fn class_fleet(
        &self,
        name: &str,
        raw: &RawClass,
        have_fleet: bool,
    ) -> Result<Option<ClassFleet>, ConfigError> {
        let key = |field: &str| format!("classes.{name}.{field}");
        let Some(rate_raw) = &raw.fleet_rate else {
            // Any other fleet_ key without fleet_rate is a mistake.
            let stray = [
                ("fleet_burst", raw.fleet_burst.as_ref().map(Spanned::span)),
                ("fleet_weight", raw.fleet_weight.as_ref().map(Spanned::span)),
                (
                    "fleet_fallback_rate",
                    raw.fleet_fallback_rate.as_ref().map(Spanned::span),
                ),
                (
                    "fleet_fallback_burst",
                    raw.fleet_fallback_burst.as_ref().map(Spanned::span),
                ),
                (
                    "fleet_max_lease",
                    raw.fleet_max_lease.as_ref().map(Spanned::span),
                ),
                (
                    "fleet_enforce",
                    raw.fleet_enforce.as_ref().map(Spanned::span),
                ),
            ];
            if let Some((k, Some(span))) = stray.into_iter().find(|(_, s)| s.is_some()) {
                return Err(self.at(
                    span,
                    format!("classes.{name}.{k} needs fleet_rate; set fleet_rate or remove {k}"),
                ));
            }
            return Ok(None);
        };
        if !have_fleet {
            return Err(self.at(
                rate_raw.span(),
                format!(
                    "classes.{name}.fleet_rate needs a [fleet] table naming the store; add one \
                     or remove fleet_rate"
                ),
            ));
        }
        let rate = self.rate(rate_raw, &key("fleet_rate"))?;
        let burst = match &raw.fleet_burst {
            Some(b) => self.int_in(b, &key("fleet_burst"), 1, limits::MAX_BURST)?,
            None => (rate.ceil() as u64).clamp(1, limits::MAX_BURST),
        };
        let weight = match &raw.fleet_weight {
            Some(w) => self.u32_in(w, &key("fleet_weight"), 1, 1_000_000)?,
            None => 1,
        };
        let fallback_rate = match &raw.fleet_fallback_rate {
            None => FallbackRate::Auto,
            Some(v) => match v.get_ref() {
                toml::Value::String(s) if s == "auto" => FallbackRate::Auto,
                toml::Value::Float(_) | toml::Value::Integer(_) => {
                    let f = match v.get_ref() {
                        toml::Value::Integer(i) => *i as f64,
                        other => other.as_float().unwrap_or(0.0),
                    };
                    let spanned = Spanned::new(v.span(), f);
                    FallbackRate::Rate(self.rate(&spanned, &key("fleet_fallback_rate"))?)
                }
                other => {
                    return Err(self.at(
                        v.span(),
                        format!(
                            "classes.{name}.fleet_fallback_rate = {other} is neither a rate nor \
                             \"auto\"; write a number of tokens per second or \"auto\""
                        ),
                    ))
                }
            },
        };
        let fallback_burst = match &raw.fleet_fallback_burst {
            Some(b) => self.int_in(b, &key("fleet_fallback_burst"), 1, limits::MAX_BURST)?,
            None => 1,
        };
        let max_lease = match &raw.fleet_max_lease {
            Some(m) => self.int_in(m, &key("fleet_max_lease"), 1, burst)?,
            None => (burst / 2).max(1),
        };
        Ok(Some(ClassFleet {
            rate,
            burst,
            weight,
            fallback_rate,
            fallback_burst,
            max_lease,
            enforce: !matches!(
                raw.fleet_enforce.as_ref().map(|e| *e.get_ref()),
                Some(false)
            ),
        }))
    }

    fn daemon(&self, raw: RawDaemon) -> Result<DaemonConfig, ConfigError> {
        let drain_timeout = match &raw.drain_timeout {
            Some(d) => self.duration(d, "daemon.drain_timeout")?,
            None => DEFAULT_DRAIN_TIMEOUT,
        };
        let control_socket = raw
            .control_socket
            .as_ref()
            .map(|p| self.path(p, "daemon.control_socket"))
            .transpose()?;
        let mut capacity = Capacity::default();
        if let Some(c) = raw.capacity {
            let fields = [
                (
                    c.classes,
                    "classes",
                    &mut capacity.classes,
                    limits::MAX_CLASSES,
                ),
                (
                    c.clients,
                    "clients",
                    &mut capacity.clients,
                    limits::MAX_CLIENTS,
                ),
                (
                    c.tickets,
                    "tickets",
                    &mut capacity.tickets,
                    limits::MAX_TICKETS,
                ),
                (c.slots, "slots", &mut capacity.slots, limits::MAX_SLOTS),
            ];
            for (value, key, slot, max) in fields {
                if let Some(v) = value {
                    *slot = self.u32_in(&v, &format!("daemon.capacity.{key}"), 1, max)?;
                }
            }
        }
        let metrics_listen = match &raw.metrics_listen {
            None => None,
            Some(v) => {
                let text = v.get_ref();
                let addr: std::net::SocketAddr = text.parse().map_err(|_| {
                    self.at(
                        v.span(),
                        format!(
                            "daemon.metrics_listen = {text:?} is not an address:port; write e.g. \"127.0.0.1:9464\""
                        ),
                    )
                })?;
                if !addr.ip().is_loopback() {
                    return Err(self.at(
                        v.span(),
                        format!(
                            "daemon.metrics_listen = {text:?} is not a loopback address: metrics are served on 127.0.0.1 or [::1] only; put a proxy in front to expose them"
                        ),
                    ));
                }
                Some(addr)
            }
        };
        Ok(DaemonConfig {
            drain_timeout,
            control_socket,
            capacity,
            metrics_listen,
        })
    }

    fn region(&self, raw: RawRegion) -> Result<RegionConfig, ConfigError> {
        let path = raw
            .path
            .as_ref()
            .map(|p| self.path(p, "region.path"))
            .transpose()?;
        let mode = match &raw.mode {
            Some(m) => self.mode(m)?,
            None => DEFAULT_MODE,
        };
        let group = match raw.group {
            Some(g) if g.get_ref().is_empty() => {
                return Err(self.at(
                    g.span(),
                    "region.group = \"\" is empty; name a group, or leave group out to use the \
                     daemon's own group"
                        .to_string(),
                ));
            }
            Some(g) => Some(g.into_inner()),
            None => None,
        };
        Ok(RegionConfig { path, mode, group })
    }

    /// An octal permission string such as `"0660"`.
    fn mode(&self, raw: &Spanned<String>) -> Result<u32, ConfigError> {
        let text = raw.get_ref();
        let bad = || {
            self.at(
                raw.span(),
                format!(
                    "region.mode = \"{text}\" is not an octal file mode of at most 0777; write \
                     it as a string of octal digits, e.g. \"0660\""
                ),
            )
        };
        let digits_ok =
            (1..=4).contains(&text.len()) && text.bytes().all(|b| (b'0'..=b'7').contains(&b));
        if !digits_ok {
            return Err(bad());
        }
        let mode = u32::from_str_radix(text, 8).map_err(|_| bad())?;
        if mode > 0o777 {
            return Err(bad());
        }
        Ok(mode)
    }

    fn class(
        &self,
        name: Spanned<String>,
        raw: RawClass,
        dependencies: &[DependencyConfig],
        have_tenants: bool,
        have_fleet: bool,
    ) -> Result<ClassConfig, ConfigError> {
        self.name(&name, "class")?;
        let name = name.into_inner();
        let fleet = self.class_fleet(&name, &raw, have_fleet)?;
        let key = |field: &str| format!("classes.{name}.{field}");

        // The rate bucket.
        let rate = raw
            .rate
            .as_ref()
            .map(|r| self.rate(r, &key("rate")))
            .transpose()?;
        let burst = match &raw.burst {
            Some(b) => self.int_in(b, &key("burst"), 1, limits::MAX_BURST)?,
            None => 1,
        };
        let excess_burst = match &raw.excess_burst {
            Some(b) => self.int_in(b, &key("excess_burst"), 0, limits::MAX_BURST)?,
            None => 0,
        };
        if burst + excess_burst > limits::MAX_BURST {
            let span = raw
                .excess_burst
                .as_ref()
                .or(raw.burst.as_ref())
                .map(Spanned::span)
                .unwrap_or(0..0);
            return Err(self.at(
                span,
                format!(
                    "classes.{name}.burst + excess_burst = {} exceeds the maximum {}; lower burst \
                     or excess_burst",
                    burst + excess_burst,
                    limits::MAX_BURST
                ),
            ));
        }

        // The slots.
        let max_in_flight = raw
            .max_in_flight
            .as_ref()
            .map(|m| self.int_in(m, &key("max_in_flight"), 1, limits::MAX_IN_FLIGHT))
            .transpose()?;
        let soft_in_flight = match (&raw.soft_in_flight, max_in_flight) {
            (None, _) => None,
            (Some(s), None) => {
                return Err(self.at(
                    s.span(),
                    format!(
                        "classes.{name}.soft_in_flight = {} needs max_in_flight; set \
                         max_in_flight or remove soft_in_flight",
                        s.get_ref()
                    ),
                ));
            }
            (Some(s), Some(max)) => Some(self.int_in(s, &key("soft_in_flight"), 1, max)?),
        };
        let max_cost = raw
            .max_cost
            .as_ref()
            .map(|c| self.int_in(c, &key("max_cost"), 1, i64::MAX as u64))
            .transpose()?;

        // The queue.
        let queue_depth = match &raw.queue_depth {
            Some(q) => self.u32_in(q, &key("queue_depth"), 1, limits::MAX_TICKETS)?,
            None => 64,
        };
        let max_wait = raw
            .max_wait
            .as_ref()
            .map(|d| self.duration(d, &key("max_wait")))
            .transpose()?;
        let age_after = match &raw.age_after {
            Some(d) => Some(self.positive_duration(
                d,
                &key("age_after"),
                "leave age_after out to turn aging off",
            )?),
            None => None,
        };

        // The retry budget.
        let retry_ratio = match &raw.retry_ratio {
            Some(r) => self.fraction(r, &key("retry_ratio"), true)?,
            None => 0.0,
        };
        let retry_burst = raw
            .retry_burst
            .as_ref()
            .map(|b| self.int_in(b, &key("retry_burst"), 0, limits::MAX_BURST))
            .transpose()?;

        // Dependencies must be declared, each named once.
        let mut depends_on: Vec<String> = Vec::new();
        for dep in raw.depends_on.unwrap_or_default() {
            let dep_name = dep.get_ref();
            if !dependencies.iter().any(|d| &d.name == dep_name) {
                return Err(self.at(
                    dep.span(),
                    format!(
                        "classes.{name}.depends_on names \"{dep_name}\", which is not under \
                         [dependencies]; add a [dependencies.{dep_name}] table or fix the name"
                    ),
                ));
            }
            if depends_on.contains(dep_name) {
                return Err(self.at(
                    dep.span(),
                    format!("classes.{name}.depends_on lists \"{dep_name}\" twice; remove one"),
                ));
            }
            depends_on.push(dep.into_inner());
        }

        // Lane shares are fractions of max_in_flight.
        let lanes = match raw.lanes {
            Some(l) => self.lanes(l, &name, max_in_flight.is_some())?,
            None => Lanes::default(),
        };

        let tenants = match raw.tenants {
            Some(t) if *t.get_ref() && !have_tenants => {
                return Err(self.at(
                    t.span(),
                    format!(
                        "classes.{name}.tenants = true needs a [tenants] table with its tiers; \
                         add one or set tenants = false"
                    ),
                ));
            }
            Some(t) => t.into_inner(),
            None => false,
        };

        Ok(ClassConfig {
            name,
            rate,
            burst,
            excess_burst,
            max_in_flight,
            soft_in_flight,
            max_cost,
            queue_depth,
            max_wait,
            age_after,
            retry_ratio,
            retry_burst,
            depends_on,
            on_dependency_down: raw.on_dependency_down.unwrap_or(QueuePolicy::Refuse),
            on_paused: raw.on_paused.unwrap_or(QueuePolicy::Refuse),
            lanes,
            tenants,
            fleet,
        })
    }

    fn lanes(&self, raw: RawLanes, class: &str, has_slots: bool) -> Result<Lanes, ConfigError> {
        let fields = [
            ("critical", raw.critical),
            ("interactive", raw.interactive),
            ("batch", raw.batch),
            ("maintenance", raw.maintenance),
        ];
        let mut shares = [1.0; 4];
        for (share, (lane, value)) in shares.iter_mut().zip(fields) {
            let Some(v) = value else { continue };
            if !has_slots {
                return Err(self.at(
                    v.span(),
                    format!(
                        "classes.{class}.lanes.{lane} is a share of max_in_flight, which \
                         classes.{class} does not set; set max_in_flight or remove the lanes table"
                    ),
                ));
            }
            *share = self.fraction(&v, &format!("classes.{class}.lanes.{lane}"), false)?;
        }
        let [critical, interactive, batch, maintenance] = shares;
        Ok(Lanes {
            critical,
            interactive,
            batch,
            maintenance,
        })
    }

    fn dependency(
        &self,
        name: Spanned<String>,
        raw: RawDependency,
    ) -> Result<DependencyConfig, ConfigError> {
        self.name(&name, "dependency")?;
        let name = name.into_inner();
        let key = |field: &str| format!("dependencies.{name}.{field}");

        let failure_ratio = match &raw.failure_ratio {
            Some(r) => self.fraction(r, &key("failure_ratio"), false)?,
            None => 0.5,
        };
        let window = match &raw.window {
            Some(d) => {
                self.positive_duration(d, &key("window"), "the breaker needs a window to count in")?
            }
            None => Duration::from_secs(10),
        };
        let min_requests = match &raw.min_requests {
            Some(m) => self.u32_in(m, &key("min_requests"), 1, u32::MAX)?,
            None => 20,
        };
        let open_for = match &raw.open_for {
            Some(d) => self.positive_duration(
                d,
                &key("open_for"),
                "an open breaker must stay open a while",
            )?,
            None => Duration::from_secs(5),
        };
        let half_open_probes = match &raw.half_open_probes {
            Some(p) => self.u32_in(p, &key("half_open_probes"), 1, u32::MAX)?,
            None => 1,
        };
        Ok(DependencyConfig {
            name,
            failure_ratio,
            window,
            min_requests,
            open_for,
            half_open_probes,
        })
    }

    fn tenants(&self, raw: RawTenants) -> Result<TenantsConfig, ConfigError> {
        let capacity = match &raw.capacity {
            Some(c) => self.u32_in(c, "tenants.capacity", 1, limits::MAX_TENANTS)?,
            None => 4_096,
        };
        let idle_after = match &raw.idle_after {
            Some(d) => self.positive_duration(
                d,
                "tenants.idle_after",
                "keys need some time before eviction",
            )?,
            None => DEFAULT_IDLE_AFTER,
        };

        let mut tiers: Vec<TierConfig> = Vec::new();
        for (name, tier) in raw.tiers.map(|e| e.0).unwrap_or_default() {
            tiers.push(self.tier(name, tier)?);
        }
        let tier_names = || {
            tiers
                .iter()
                .map(|t| t.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let unknown_tier = |value: &Spanned<String>, key: &str| {
            let known = if tiers.is_empty() {
                "none are defined".to_string()
            } else {
                tier_names()
            };
            self.at(
                value.span(),
                format!(
                    "{key} = \"{}\" names no tier under [tenants.tiers] (known: {known}); \
                     add a [tenants.tiers.{}] table or fix the name",
                    value.get_ref(),
                    value.get_ref()
                ),
            )
        };

        if !tiers.iter().any(|t| &t.name == raw.default_tier.get_ref()) {
            return Err(unknown_tier(&raw.default_tier, "tenants.default_tier"));
        }

        let mut keys = Vec::new();
        for (key, tier) in raw.keys.map(|e| e.0).unwrap_or_default() {
            if key.get_ref().is_empty() {
                return Err(self.at(
                    key.span(),
                    "tenants.keys has an empty key; remove it".to_string(),
                ));
            }
            if !tiers.iter().any(|t| &t.name == tier.get_ref()) {
                return Err(unknown_tier(
                    &tier,
                    &format!("tenants.keys.{}", key.get_ref()),
                ));
            }
            if keys.len() >= capacity as usize {
                return Err(self.at(
                    key.span(),
                    format!(
                        "tenants.keys lists more keys than tenants.capacity = {capacity}; raise \
                         tenants.capacity (at most {}) or remove keys",
                        limits::MAX_TENANTS
                    ),
                ));
            }
            keys.push((key.into_inner(), tier.into_inner()));
        }

        Ok(TenantsConfig {
            capacity,
            default_tier: raw.default_tier.into_inner(),
            on_full: raw.on_full.unwrap_or(OnFull::Refuse),
            idle_after,
            tiers,
            keys,
        })
    }

    fn tier(&self, name: Spanned<String>, raw: RawTier) -> Result<TierConfig, ConfigError> {
        self.name(&name, "tier")?;
        let name = name.into_inner();
        let key = |field: &str| format!("tenants.tiers.{name}.{field}");

        let rate = self.rate(&raw.rate, &key("rate"))?;
        let burst = match &raw.burst {
            Some(b) => self.int_in(b, &key("burst"), 1, limits::MAX_BURST)?,
            None => 1,
        };
        let (quota, period) = match (&raw.quota, &raw.period) {
            (None, None) => (None, None),
            (Some(q), None) => {
                return Err(self.at(
                    q.span(),
                    format!(
                        "{} is set without {}; set both or neither",
                        key("quota"),
                        key("period")
                    ),
                ));
            }
            (None, Some(p)) => {
                return Err(self.at(
                    p.span(),
                    format!(
                        "{} is set without {}; set both or neither",
                        key("period"),
                        key("quota")
                    ),
                ));
            }
            (Some(q), Some(p)) => {
                let quota = self.int_in(q, &key("quota"), 1, limits::MAX_BURST)?;
                let period = self.positive_duration(p, &key("period"), "a quota needs a period")?;

                // The quota is a bucket of rate quota/period: that rate must fit too.
                let quota_rate = quota as f64 / period.as_secs_f64();
                if !(limits::MIN_RATE..=limits::MAX_RATE).contains(&quota_rate) {
                    return Err(self.at(
                        q.span(),
                        format!(
                            "{} = {quota} per \"{}\" is {quota_rate:.3e} per second, outside [{:e}, \
                             {:e}]; change quota or period",
                            key("quota"),
                            p.get_ref(),
                            limits::MIN_RATE,
                            limits::MAX_RATE
                        ),
                    ));
                }
                (Some(quota), Some(period))
            }
        };
        Ok(TierConfig {
            name,
            rate,
            burst,
            quota,
            period,
        })
    }

    /// A class, dependency or tier name: 1 to `MAX_NAME_LEN` bytes of
    /// `[A-Za-z0-9_.-]`.
    fn name(&self, name: &Spanned<String>, what: &str) -> Result<(), ConfigError> {
        let text = name.get_ref();
        if text.is_empty() || text.len() > limits::MAX_NAME_LEN {
            return Err(self.at(
                name.span(),
                format!(
                    "{what} name \"{text}\" is {} bytes long; it must be 1 to {} bytes",
                    text.len(),
                    limits::MAX_NAME_LEN
                ),
            ));
        }
        if let Some(bad) = text
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
        {
            return Err(self.at(
                name.span(),
                format!(
                    "{what} name \"{text}\" holds {bad:?}; use only ASCII letters, digits, '_', \
                     '-' and '.'"
                ),
            ));
        }
        Ok(())
    }

    /// A rate in `[MIN_RATE, MAX_RATE]` tokens per second.
    fn rate(&self, raw: &Spanned<f64>, key: &str) -> Result<f64, ConfigError> {
        let rate = *raw.get_ref();
        if !(rate > 0.0 && rate <= limits::MAX_RATE) {
            return Err(self.at(
                raw.span(),
                format!(
                    "{key} = {rate} is out of range: a rate must lie in (0, 1e9] per second; \
                     leave it out for no rate limit"
                ),
            ));
        }
        if rate < limits::MIN_RATE {
            return Err(self.at(
                raw.span(),
                format!(
                    "{key} = {rate} is below the minimum {:e} per second (about one token per \
                     2.3 years); raise it or leave it out for no rate limit",
                    limits::MIN_RATE
                ),
            ));
        }
        Ok(rate)
    }

    /// A share or ratio: in `[0, 1]` if `zero_ok`, else in `(0, 1]`.
    fn fraction(&self, raw: &Spanned<f64>, key: &str, zero_ok: bool) -> Result<f64, ConfigError> {
        let v = *raw.get_ref();
        let ok = if zero_ok {
            (0.0..=1.0).contains(&v)
        } else {
            v > 0.0 && v <= 1.0
        };
        if !ok {
            let range = if zero_ok { "[0, 1]" } else { "(0, 1]" };
            return Err(self.at(
                raw.span(),
                format!("{key} = {v} is out of range; it must lie in {range}"),
            ));
        }
        Ok(v)
    }

    /// An integer in `min..=max`.
    fn int_in(
        &self,
        raw: &Spanned<i64>,
        key: &str,
        min: u64,
        max: u64,
    ) -> Result<u64, ConfigError> {
        let v = *raw.get_ref();
        let range = if max >= i64::MAX as u64 {
            format!("set it to at least {min}")
        } else {
            format!("set it between {min} and {max}")
        };
        match u64::try_from(v) {
            Ok(n) if n > max => Err(self.at(
                raw.span(),
                format!("{key} = {v} exceeds the maximum {max}; {range}"),
            )),
            Ok(n) if n >= min => Ok(n),
            _ => Err(self.at(
                raw.span(),
                format!("{key} = {v} is below the minimum {min}; {range}"),
            )),
        }
    }

    /// An integer in `min..=max` that fits a `u32`.
    fn u32_in(
        &self,
        raw: &Spanned<i64>,
        key: &str,
        min: u32,
        max: u32,
    ) -> Result<u32, ConfigError> {
        let n = self.int_in(raw, key, u64::from(min), u64::from(max))?;
        Ok(u32::try_from(n).expect("int_in checked the value against a u32 maximum"))
    }

    fn duration(&self, raw: &Spanned<String>, key: &str) -> Result<Duration, ConfigError> {
        parse_duration(raw.get_ref()).map_err(|e| self.at(raw.span(), format!("{key}: {e}")))
    }

    /// A duration that must not be zero; `why` says what zero would break.
    fn positive_duration(
        &self,
        raw: &Spanned<String>,
        key: &str,
        why: &str,
    ) -> Result<Duration, ConfigError> {
        let d = self.duration(raw, key)?;
        if d.is_zero() {
            return Err(self.at(
                raw.span(),
                format!(
                    "{key} = \"{}\" must be longer than zero: {why}",
                    raw.get_ref()
                ),
            ));
        }
        Ok(d)
    }

    /// An absolute file path.
    fn path(&self, raw: &Spanned<String>, key: &str) -> Result<PathBuf, ConfigError> {
        let path = PathBuf::from(raw.get_ref());
        if !path.is_absolute() {
            return Err(self.at(
                raw.span(),
                format!(
                    "{key} = \"{}\" is not an absolute path; write the full path, starting with '/'",
                    raw.get_ref()
                ),
            ));
        }
        Ok(path)
    }
}

/// The 1-based line and column (in characters) of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    (line, column)
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Entries<V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct EntriesVisitor<V>(PhantomData<V>);

        impl<'de, V: Deserialize<'de>> Visitor<'de> for EntriesVisitor<V> {
            type Value = Entries<V>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::new();
                while let Some(entry) = map.next_entry()? {
                    entries.push(entry);
                }
                Ok(Entries(entries))
            }
        }

        deserializer.deserialize_map(EntriesVisitor(PhantomData))
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (Some(line), Some(column)) => {
                write!(f, "{}:{line}:{column}: {}", self.source_name, self.message)
            }
            (Some(line), None) => write!(f, "{}:{line}: {}", self.source_name, self.message),
            _ => write!(f, "{}: {}", self.source_name, self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

#[cfg(test)]
mod tests {
    use super::*;

    /// The full example from PRODUCT.md, unchanged.
    const PRODUCT_EXAMPLE: &str = r#"
[daemon]
drain_timeout = "30s"
control_socket = "/run/sluice/control"   # default: beside the region
capacity = { classes = 64, clients = 1024, tickets = 65536 }

[region]
path = "/dev/shm/sluice"
mode = "0660"
group = "sluice"               # optional; default: the daemon's group

[classes.reports]
rate = 50                      # tokens per second
burst = 10
excess_burst = 5
max_in_flight = 8
soft_in_flight = 6
max_cost = 10
queue_depth = 256              # per lane
max_wait = "30s"
age_after = "5s"
retry_ratio = 0.1
retry_burst = 5
depends_on = ["db"]
on_dependency_down = "queue"   # or "refuse"
on_paused = "refuse"           # or "queue"

[classes.reports.lanes]        # share of max_in_flight each lane may use
critical = 1.0
interactive = 0.9
batch = 0.6
maintenance = 0.3

[dependencies.db]
failure_ratio = 0.5
window = "10s"
min_requests = 20
open_for = "5s"
half_open_probes = 3

[classes.api]
max_in_flight = 64
tenants = true                 # requests must carry a tenant key

[tenants]
capacity = 4096
default_tier = "free"
on_full = "refuse"             # or "shared": one bucket for overflow keys
idle_after = "1d"              # keys unused this long may be evicted

[tenants.tiers.free]
rate = 5
burst = 5
quota = 1000                   # per period: a GCRA bucket of rate
period = "1d"                  # quota/period and burst quota

[tenants.tiers.paid]
rate = 100
burst = 50
quota = 100000
period = "1d"

[tenants.keys]
acme = "paid"
"#;

    fn parse(text: &str) -> Config {
        match Config::parse(text, "test.toml") {
            Ok(config) => config,
            Err(e) => panic!("expected the config to parse, got: {e}"),
        }
    }

    fn error(text: &str) -> ConfigError {
        match Config::parse(text, "test.toml") {
            Ok(config) => panic!("expected an error, got: {config:?}"),
            Err(e) => e,
        }
    }

    /// Asserts the error holds every piece of `parts` and sits at `line:column`.
    fn assert_error(text: &str, parts: &[&str], line: usize, column: usize) {
        let e = error(text);
        for part in parts {
            assert!(
                e.message.contains(part),
                "message {:?} lacks {:?}",
                e.message,
                part
            );
        }
        assert_eq!(
            (e.line, e.column),
            (Some(line), Some(column)),
            "position of: {e}"
        );
        assert_eq!(e.source_name, "test.toml");
    }

    /// Asserts the error of a one-class config mentions every part; the class
    /// table header is line 1, so the offending line is 2 or later.
    fn assert_class_error(body: &str, parts: &[&str]) {
        let text = format!("[classes.c]\n{body}\n");
        let e = error(&text);
        for part in parts {
            assert!(
                e.message.contains(part),
                "message {:?} lacks {:?}",
                e.message,
                part
            );
        }
        assert!(e.line.is_some_and(|l| l >= 2), "no line in: {e}");
        assert!(e.column.is_some(), "no column in: {e}");
    }

    fn class<'a>(config: &'a Config, name: &str) -> &'a ClassConfig {
        match config.classes.iter().find(|c| c.name == name) {
            Some(c) => c,
            None => panic!("no class {name} in {config:?}"),
        }
    }

    // Defaults.

    #[test]
    fn empty_file_takes_every_default() {
        let config = parse("");
        assert_eq!(config.daemon, DaemonConfig::default());
        assert_eq!(config.daemon.drain_timeout, Duration::from_secs(30));
        assert_eq!(config.daemon.control_socket, None);
        assert_eq!(
            config.daemon.capacity,
            Capacity {
                classes: 64,
                clients: 1024,
                tickets: 65_536,
                slots: 65_536
            }
        );
        assert_eq!(
            config.region,
            RegionConfig {
                path: None,
                mode: 0o660,
                group: None
            }
        );
        assert!(config.classes.is_empty());
        assert!(config.dependencies.is_empty());
        assert_eq!(config.tenants, None);
    }

    #[test]
    fn empty_class_takes_every_default() {
        let config = parse("[classes.plain]\n");
        let expected = ClassConfig {
            name: "plain".to_string(),
            rate: None,
            burst: 1,
            excess_burst: 0,
            max_in_flight: None,
            soft_in_flight: None,
            max_cost: None,
            queue_depth: 64,
            max_wait: None,
            age_after: None,
            retry_ratio: 0.0,
            retry_burst: None,
            depends_on: Vec::new(),
            on_dependency_down: QueuePolicy::Refuse,
            on_paused: QueuePolicy::Refuse,
            lanes: Lanes {
                critical: 1.0,
                interactive: 1.0,
                batch: 1.0,
                maintenance: 1.0,
            },
            tenants: false,
            fleet: None,
        };
        assert_eq!(config.classes, vec![expected]);
    }

    #[test]
    fn empty_dependency_and_tenants_take_every_default() {
        let config = parse(
            "[dependencies.db]\n[tenants]\ndefault_tier = \"t\"\n[tenants.tiers.t]\nrate = 1\n",
        );
        assert_eq!(
            config.dependencies,
            vec![DependencyConfig {
                name: "db".to_string(),
                failure_ratio: 0.5,
                window: Duration::from_secs(10),
                min_requests: 20,
                open_for: Duration::from_secs(5),
                half_open_probes: 1,
            }]
        );
        assert_eq!(
            config.tenants,
            Some(TenantsConfig {
                capacity: 4096,
                default_tier: "t".to_string(),
                on_full: OnFull::Refuse,
                idle_after: Duration::from_secs(86_400),
                tiers: vec![TierConfig {
                    name: "t".to_string(),
                    rate: 1.0,
                    burst: 1,
                    quota: None,
                    period: None,
                }],
                keys: Vec::new(),
            })
        );
    }

    #[test]
    fn embedded_default_parses() {
        let config = Config::embedded_default();
        assert_eq!(Config::parse(DEFAULT_CONFIG_TOML, "x"), Ok(config.clone()));
        assert_eq!(config.region.group, None);
        assert_eq!(config.region.path, None);
        let names: Vec<&str> = config.classes.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(
            names,
            ["default", "reports", "imports", "one", "reads", "api"]
        );

        let default = class(&config, "default");
        assert_eq!(default.max_in_flight, Some(4));
        assert_eq!(default.rate, Some(100.0));
        assert_eq!(default.burst, 20);

        let reports = class(&config, "reports");
        assert_eq!(
            (reports.rate, reports.burst, reports.excess_burst),
            (Some(5.0), 5, 2)
        );
        assert_eq!(reports.max_in_flight, None);
        assert_eq!(reports.max_cost, Some(7));
        assert_eq!(reports.retry_burst, Some(2));
        assert_eq!(class(&config, "reads").depends_on, ["db"]);
        assert!(class(&config, "api").tenants);
        let tenants = config.tenants.as_ref().expect("the default has tenants");
        assert_eq!(tenants.keys, [("acme".to_string(), "trial".to_string())]);

        let imports = class(&config, "imports");
        assert_eq!(imports.max_in_flight, Some(2));
        assert_eq!(imports.lanes.batch, 0.5);
        assert_eq!(imports.lane_ceilings(), Some([2, 2, 1, 2]));

        assert_eq!(class(&config, "one").max_in_flight, Some(1));
    }

    #[test]
    fn product_example_parses() {
        let config = parse(PRODUCT_EXAMPLE);
        assert_eq!(
            config.daemon.control_socket,
            Some(PathBuf::from("/run/sluice/control"))
        );
        assert_eq!(config.daemon.capacity.slots, 65_536);
        assert_eq!(config.region.path, Some(PathBuf::from("/dev/shm/sluice")));
        assert_eq!(config.region.group.as_deref(), Some("sluice"));

        let reports = class(&config, "reports");
        assert_eq!(reports.rate, Some(50.0));
        assert_eq!((reports.burst, reports.excess_burst), (10, 5));
        assert_eq!(
            (reports.max_in_flight, reports.soft_in_flight),
            (Some(8), Some(6))
        );
        assert_eq!(reports.max_cost, Some(10));
        assert_eq!(reports.queue_depth, 256);
        assert_eq!(reports.max_wait, Some(Duration::from_secs(30)));
        assert_eq!(reports.age_after, Some(Duration::from_secs(5)));
        assert_eq!((reports.retry_ratio, reports.retry_burst), (0.1, Some(5)));
        assert_eq!(reports.depends_on, ["db"]);
        assert_eq!(reports.on_dependency_down, QueuePolicy::Queue);
        assert_eq!(reports.on_paused, QueuePolicy::Refuse);
        assert_eq!(reports.lanes.shares(), [1.0, 0.9, 0.6, 0.3]);
        assert_eq!(reports.lane_ceilings(), Some([8, 8, 5, 3]));

        let api = class(&config, "api");
        assert!(api.tenants);
        assert_eq!(api.max_in_flight, Some(64));

        assert_eq!(config.dependencies.len(), 1);
        assert_eq!(config.dependencies[0].half_open_probes, 3);

        let tenants = config
            .tenants
            .as_ref()
            .expect("the example has a [tenants] table");
        assert_eq!(tenants.default_tier, "free");
        assert_eq!(tenants.on_full, OnFull::Refuse);
        assert_eq!(tenants.tiers.len(), 2);
        assert_eq!(tenants.tiers[0].name, "free");
        assert_eq!(tenants.tiers[0].quota, Some(1000));
        assert_eq!(tenants.tiers[0].period, Some(Duration::from_secs(86_400)));
        assert_eq!(tenants.tiers[1].name, "paid");
        assert_eq!(tenants.keys, vec![("acme".to_string(), "paid".to_string())]);
    }

    #[test]
    fn classes_keep_file_order() {
        let config = parse(
            "[classes.zeta]\n[dependencies.x]\n[classes.alpha]\nrate = 1\n\
             [classes.zeta.lanes]\n[classes.mid]\n",
        );
        let names: Vec<&str> = config.classes.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["zeta", "alpha", "mid"]);
    }

    #[test]
    fn other_tables_keep_file_order() {
        let config = parse(
            "[dependencies.zz]\n[dependencies.aa]\n[tenants]\ndefault_tier = \"b\"\n\
             [tenants.tiers.b]\nrate = 1\n[tenants.tiers.a]\nrate = 1\n\
             [tenants.keys]\nzed = \"a\"\nabe = \"b\"\n",
        );
        let deps: Vec<&str> = config
            .dependencies
            .iter()
            .map(|d| d.name.as_str())
            .collect();
        assert_eq!(deps, ["zz", "aa"]);
        let tenants = config.tenants.expect("the config has a [tenants] table");
        let tiers: Vec<&str> = tenants.tiers.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(tiers, ["b", "a"]);
        let keys: Vec<&str> = tenants.keys.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["zed", "abe"]);
    }

    #[test]
    fn inline_class_tables_parse() {
        let config = parse("classes = { a = { rate = 2 }, b = { max_in_flight = 3 } }\n");
        assert_eq!(config.classes.len(), 2);
        assert_eq!(config.classes[0].rate, Some(2.0));
        assert_eq!(config.classes[1].max_in_flight, Some(3));
    }

    #[test]
    fn region_mode_is_octal() {
        assert_eq!(parse("[region]\nmode = \"0600\"\n").region.mode, 0o600);
        assert_eq!(parse("[region]\nmode = \"640\"\n").region.mode, 0o640);
        assert_eq!(parse("[region]\nmode = \"0777\"\n").region.mode, 0o777);
        for bad in ["", "rw", "0o660", "0680", "1777", "00660", "-660"] {
            let text = format!("[region]\nmode = \"{bad}\"\n");
            assert_error(&text, &["region.mode", bad, "octal", "\"0660\""], 2, 8);
        }
    }

    // Durations.

    #[test]
    fn durations_in_every_unit() {
        assert_eq!(parse_duration("10ns"), Ok(Duration::from_nanos(10)));
        assert_eq!(parse_duration("1500us"), Ok(Duration::from_micros(1500)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("007s"), Ok(Duration::from_secs(7)));
    }

    #[test]
    fn duration_limit_is_inclusive() {
        assert_eq!(
            parse_duration("36500d"),
            Ok(Duration::from_nanos(limits::MAX_DURATION_NS))
        );
        let e = parse_duration("36501d").expect_err("one day past the limit");
        assert!(e.contains("100 years"), "{e}");
    }

    #[test]
    fn duration_overflow_names_the_limit() {
        for text in [
            "99999999999999999999d",
            "18446744073709551615d",
            "99999999999999999999ns",
        ] {
            let e = parse_duration(text).expect_err("overflows a u64");
            assert!(e.contains("100 years"), "{e}");
            assert!(e.contains(&limits::MAX_DURATION_NS.to_string()), "{e}");
        }
    }

    #[test]
    fn duration_without_a_unit_lists_the_units() {
        for text in [
            "", "30", "s", "1.5s", "30 s", " 30s", "-5s", "5sec", "5S", "1µs",
        ] {
            let e = parse_duration(text).expect_err("not a duration");
            assert!(e.contains("ns, us, ms, s, m, h, d"), "{text:?}: {e}");
        }
        assert!(parse_duration("30")
            .expect_err("no unit")
            .contains("no unit"));
        assert!(parse_duration("").expect_err("empty").contains("empty"));
    }

    #[test]
    fn bad_durations_in_the_file_name_the_key() {
        assert_error(
            "[daemon]\ndrain_timeout = \"30\"\n",
            &["daemon.drain_timeout", "\"30\"", "no unit"],
            2,
            17,
        );
        assert_class_error(
            "max_wait = \"99999999999999999999d\"",
            &["classes.c.max_wait", "100 years"],
        );
        assert_class_error(
            "age_after = \"0s\"",
            &["classes.c.age_after", "longer than zero"],
        );
        assert_error(
            "[dependencies.db]\nwindow = \"0ms\"\n",
            &["dependencies.db.window", "longer than zero"],
            2,
            10,
        );
        assert_error(
            "[dependencies.db]\nopen_for = \"0s\"\n",
            &["dependencies.db.open_for"],
            2,
            12,
        );
        assert_class_error("max_wait = 30", &["invalid type"]);
    }

    #[test]
    fn zero_max_wait_and_drain_timeout_are_allowed() {
        let config = parse("[daemon]\ndrain_timeout = \"0s\"\n[classes.a]\nmax_wait = \"0s\"\n");
        assert_eq!(config.daemon.drain_timeout, Duration::ZERO);
        assert_eq!(config.classes[0].max_wait, Some(Duration::ZERO));
    }

    // Lanes.

    #[test]
    fn lane_ceilings_round_up() {
        let config = parse("[classes.a]\nmax_in_flight = 10\n[classes.a.lanes]\nbatch = 0.6\n");
        assert_eq!(config.classes[0].lane_ceilings(), Some([10, 10, 6, 10]));

        let config = parse(
            "[classes.a]\nmax_in_flight = 10\nlanes = { batch = 0.61, maintenance = 1e-9 }\n",
        );
        assert_eq!(config.classes[0].lane_ceilings(), Some([10, 10, 7, 1]));
    }

    #[test]
    fn lane_ceilings_without_lanes_table_are_max() {
        let config = parse("[classes.a]\nmax_in_flight = 3\n[classes.b]\nrate = 1\n");
        assert_eq!(config.classes[0].lane_ceilings(), Some([3; 4]));
        assert_eq!(config.classes[1].lane_ceilings(), None);
    }

    #[test]
    fn lane_ceilings_at_the_largest_max() {
        let config = parse(
            "[classes.a]\nmax_in_flight = 65536\nlanes = { critical = 1, interactive = 0.5 }\n",
        );
        assert_eq!(
            config.classes[0].lane_ceilings(),
            Some([65_536, 32_768, 65_536, 65_536])
        );
    }

    #[test]
    fn bad_lane_shares() {
        for bad in ["0", "0.0", "-0.5", "1.5", "nan", "inf"] {
            let text =
                format!("[classes.c]\nmax_in_flight = 4\n[classes.c.lanes]\nbatch = {bad}\n");
            assert_error(&text, &["classes.c.lanes.batch", "(0, 1]"], 4, 9);
        }
        assert_error(
            "[classes.c]\nrate = 1\n[classes.c.lanes]\ncritical = 0.5\n",
            &["classes.c.lanes.critical", "max_in_flight"],
            4,
            12,
        );
    }

    // Validation errors, one by one.

    #[test]
    fn bad_class_names() {
        assert_error(
            "[classes.\"has space\"]\n",
            &["\"has space\"", "' '", "letters"],
            1,
            10,
        );
        assert_error("[classes.\"\"]\n", &["1 to 48 bytes"], 1, 10);
        let long = "x".repeat(limits::MAX_NAME_LEN + 1);
        assert_error(
            &format!("[classes.{long}]\n"),
            &["49 bytes", "1 to 48"],
            1,
            10,
        );
        let longest = "y".repeat(limits::MAX_NAME_LEN);
        assert_eq!(
            parse(&format!("[classes.{longest}]\n")).classes[0].name,
            longest
        );
        assert_eq!(parse("[classes.\"a-b_c.d\"]\n").classes[0].name, "a-b_c.d");
        assert_error(
            "[dependencies.\"d/b\"]\n",
            &["dependency name", "'/'"],
            1,
            15,
        );
    }

    #[test]
    fn bad_rates() {
        for bad in ["0", "-1", "0.0", "nan", "inf", "-inf", "1e10", "1000000001"] {
            let text = format!("[classes.reports]\nrate = {bad}\n");
            assert_error(
                &text,
                &["classes.reports.rate", "(0, 1e9] per second"],
                2,
                8,
            );
        }
        assert_error(
            "[classes.reports]\nrate = 1e-9\n",
            &["classes.reports.rate", "minimum"],
            2,
            8,
        );
        assert_eq!(
            parse("[classes.a]\nrate = 1e9\n").classes[0].rate,
            Some(1e9)
        );
        assert_eq!(
            parse("[classes.a]\nrate = 1.4e-8\n").classes[0].rate,
            Some(1.4e-8)
        );
        assert_class_error("rate = \"5\"", &["invalid type"]);
        assert_error(
            "[classes.c]\nburst = 1.5\n",
            &["expected a whole number"],
            2,
            9,
        );
        assert_error("[classes.c]\nrate = true\n", &["expected a number"], 2, 8);
    }

    #[test]
    fn bad_bursts() {
        assert_error(
            "[classes.c]\nburst = 0\n",
            &["classes.c.burst = 0", "minimum 1"],
            2,
            9,
        );
        assert_class_error("burst = -3", &["classes.c.burst = -3", "minimum 1"]);
        assert_class_error(
            "excess_burst = -1",
            &["classes.c.excess_burst", "minimum 0"],
        );
        let text = format!(
            "[classes.c]\nburst = {}\nexcess_burst = 1\n",
            limits::MAX_BURST
        );
        assert_error(
            &text,
            &["classes.c.burst + excess_burst", "1099511627777"],
            3,
            16,
        );
        let text = format!("[classes.c]\nburst = {}\n", limits::MAX_BURST + 1);
        assert_error(
            &text,
            &["classes.c.burst", "exceeds the maximum 1099511627776"],
            2,
            9,
        );
        let text = format!(
            "[classes.c]\nburst = {}\nexcess_burst = 0\n",
            limits::MAX_BURST
        );
        assert_eq!(parse(&text).classes[0].burst, limits::MAX_BURST);
    }

    #[test]
    fn bad_max_in_flight() {
        assert_error(
            "[classes.big]\nmax_in_flight = 6000000000\n",
            &["classes.big.max_in_flight = 6000000000 exceeds the maximum 65536"],
            2,
            17,
        );
        assert_class_error(
            "max_in_flight = 0",
            &["classes.c.max_in_flight = 0", "minimum 1"],
        );
        assert_class_error("max_in_flight = 65537", &["exceeds the maximum 65536"]);
    }

    #[test]
    fn bad_soft_in_flight() {
        assert_error(
            "[classes.c]\nsoft_in_flight = 2\n",
            &["classes.c.soft_in_flight", "needs max_in_flight"],
            2,
            18,
        );
        assert_class_error(
            "max_in_flight = 4\nsoft_in_flight = 5",
            &["classes.c.soft_in_flight = 5", "maximum 4"],
        );
        assert_class_error(
            "max_in_flight = 4\nsoft_in_flight = 0",
            &["classes.c.soft_in_flight"],
        );
        let config = parse("[classes.c]\nmax_in_flight = 4\nsoft_in_flight = 4\n");
        assert_eq!(config.classes[0].soft_in_flight, Some(4));
    }

    #[test]
    fn bad_max_cost_and_queue_depth() {
        assert_class_error("max_cost = 0", &["classes.c.max_cost = 0", "at least 1"]);
        assert_error(
            "[classes.c]\nqueue_depth = 0\n",
            &["classes.c.queue_depth = 0"],
            2,
            15,
        );
        let text = format!("[classes.c]\nqueue_depth = {}\n", limits::MAX_TICKETS + 1);
        assert_error(&text, &["classes.c.queue_depth", "maximum 4194304"], 2, 15);
    }

    #[test]
    fn bad_retry_budget() {
        for bad in ["-0.1", "1.5", "nan"] {
            assert_class_error(
                &format!("retry_ratio = {bad}"),
                &["classes.c.retry_ratio", "[0, 1]"],
            );
        }
        assert_class_error("retry_burst = -1", &["classes.c.retry_burst", "minimum 0"]);
        let config = parse("[classes.c]\nretry_ratio = 0\nretry_burst = 0\n");
        assert_eq!(config.classes[0].retry_burst, Some(0));
    }

    #[test]
    fn bad_policies() {
        assert_class_error("on_paused = \"wait\"", &["unknown variant `wait`"]);
        assert_error("[classes.c]\non_dependency_down = 1\n", &["string"], 2, 22);
    }

    #[test]
    fn depends_on_must_name_a_dependency() {
        assert_error(
            "[dependencies.db]\n[classes.c]\ndepends_on = [\"db\", \"cache\"]\n",
            &["classes.c.depends_on", "\"cache\"", "[dependencies.cache]"],
            3,
            21,
        );
        assert_error(
            "[dependencies.db]\n[classes.c]\ndepends_on = [\"db\", \"db\"]\n",
            &["classes.c.depends_on", "twice"],
            3,
            21,
        );
    }

    #[test]
    fn bad_dependency_values() {
        assert_error(
            "[dependencies.db]\nfailure_ratio = 0\n",
            &["dependencies.db.failure_ratio", "(0, 1]"],
            2,
            17,
        );
        assert_error(
            "[dependencies.db]\nfailure_ratio = 1.01\n",
            &["(0, 1]"],
            2,
            17,
        );
        assert_error(
            "[dependencies.db]\nmin_requests = 0\n",
            &["dependencies.db.min_requests"],
            2,
            16,
        );
        assert_error(
            "[dependencies.db]\nhalf_open_probes = 0\n",
            &["dependencies.db.half_open_probes"],
            2,
            20,
        );
    }

    #[test]
    fn bad_capacities() {
        for (key, max) in [
            ("classes", limits::MAX_CLASSES),
            ("clients", limits::MAX_CLIENTS),
            ("tickets", limits::MAX_TICKETS),
            ("slots", limits::MAX_SLOTS),
        ] {
            let text = format!("[daemon]\ncapacity = {{ {key} = 0 }}\n");
            assert_error(
                &text,
                &[&format!("daemon.capacity.{key} = 0"), "minimum 1"],
                2,
                17 + key.len(),
            );
            let text = format!("[daemon.capacity]\n{key} = {}\n", u64::from(max) + 1);
            assert_error(
                &text,
                &[&format!("exceeds the maximum {max}")],
                2,
                key.len() + 4,
            );
            let text = format!("[daemon.capacity]\n{key} = {max}\n");
            assert_eq!(Config::parse(&text, "t").map(|_| ()), Ok(()));
        }
    }

    #[test]
    fn too_many_classes() {
        let text = "[daemon]\ncapacity = { classes = 2 }\n[classes.a]\n[classes.b]\n[classes.c]\n";
        assert_error(
            text,
            &["3 classes", "\"c\"", "daemon.capacity.classes = 2", "raise"],
            5,
            10,
        );
    }

    #[test]
    fn too_many_slots() {
        let text = "[daemon]\ncapacity = { slots = 10 }\n[classes.a]\nmax_in_flight = 6\n\
                    [classes.b]\nmax_in_flight = 5\n";
        assert_error(
            text,
            &[
                "11",
                "daemon.capacity.slots = 10",
                "raise daemon.capacity.slots",
            ],
            6,
            17,
        );
        let text = "[daemon]\ncapacity = { slots = 11 }\n[classes.a]\nmax_in_flight = 6\n\
                    [classes.b]\nmax_in_flight = 5\n";
        assert_eq!(parse(text).daemon.capacity.slots, 11);
    }

    #[test]
    fn bad_paths_and_group() {
        assert_error(
            "[region]\npath = \"region\"\n",
            &["region.path", "absolute"],
            2,
            8,
        );
        assert_error(
            "[daemon]\ncontrol_socket = \"\"\n",
            &["daemon.control_socket"],
            2,
            18,
        );
        assert_error("[region]\ngroup = \"\"\n", &["region.group", "empty"], 2, 9);
    }

    #[test]
    fn bad_tenants() {
        assert_error(
            "[classes.api]\ntenants = true\n",
            &["classes.api.tenants", "[tenants]"],
            2,
            11,
        );
        assert!(!parse("[classes.api]\ntenants = false\n").classes[0].tenants);

        let tiers = "[tenants.tiers.free]\nrate = 1\n";
        assert_error(
            &format!("[tenants]\ndefault_tier = \"gold\"\n{tiers}"),
            &["tenants.default_tier", "\"gold\"", "known: free"],
            2,
            16,
        );
        assert_error(
            &format!(
                "[tenants]\ndefault_tier = \"free\"\n[tenants.keys]\nacme = \"paid\"\n{tiers}"
            ),
            &["tenants.keys.acme", "\"paid\""],
            4,
            8,
        );
        let e = error("[classes.a]\n\n[tenants]\n");
        assert!(e.message.contains("missing field `default_tier`"), "{e}");
        assert_eq!(e.line, Some(3), "{e}");
        assert_error(
            "[tenants]\ndefault_tier = \"free\"\ncapacity = 1\n[tenants.keys]\na = \"free\"\nb = \"free\"\n[tenants.tiers.free]\nrate = 1\n",
            &["tenants.capacity = 1"],
            6,
            1,
        );
        assert_error(
            "[tenants]\ndefault_tier = \"x\"\ncapacity = 0\n",
            &["tenants.capacity"],
            3,
            12,
        );
        assert_error(
            "[tenants]\ndefault_tier = \"x\"\nidle_after = \"0s\"\n",
            &["tenants.idle_after"],
            3,
            14,
        );
        assert_error(
            "[tenants]\ndefault_tier = \"x\"\non_full = \"drop\"\n",
            &["unknown variant"],
            3,
            11,
        );
    }

    #[test]
    fn bad_tiers() {
        let head = "[tenants]\ndefault_tier = \"t\"\n[tenants.tiers.t]\n";
        assert_error(
            &format!("{head}rate = 0\n"),
            &["tenants.tiers.t.rate", "(0, 1e9]"],
            4,
            8,
        );
        assert_error(
            &format!("{head}rate = 1\nburst = 0\n"),
            &["tenants.tiers.t.burst"],
            5,
            9,
        );
        assert_error(
            &format!("{head}rate = 1\nquota = 5\n"),
            &[
                "tenants.tiers.t.quota",
                "without tenants.tiers.t.period",
                "both or neither",
            ],
            5,
            9,
        );
        assert_error(
            &format!("{head}rate = 1\nperiod = \"1d\"\n"),
            &["tenants.tiers.t.period", "without tenants.tiers.t.quota"],
            5,
            10,
        );
        assert_error(
            &format!("{head}rate = 1\nquota = 0\nperiod = \"1d\"\n"),
            &["quota = 0"],
            5,
            9,
        );
        assert_error(
            &format!("{head}rate = 1\nquota = 1\nperiod = \"36500d\"\n"),
            &["tenants.tiers.t.quota", "per second"],
            5,
            9,
        );
        let e = error(&format!("{head}burst = 1\n"));
        assert!(e.message.contains("rate"), "{e}");
    }

    // Fleet.

    const FLEET: &str = "[fleet]\nstore = \"redis+unix:///tmp/r.sock\"\n";

    #[test]
    fn fleet_defaults() {
        let config = parse(&format!("{FLEET}[classes.api]\nfleet_rate = 100\n"));
        let f = config.fleet.clone().expect("the file has a [fleet] table");
        assert_eq!(f.namespace, "default");
        assert_eq!(f.lease_interval, Duration::from_millis(100));
        assert_eq!(f.connect_timeout, Duration::from_millis(50));
        assert_eq!(f.response_timeout, Duration::from_millis(50));
        assert_eq!(f.on_store_down, StoreDown::Fallback);
        let c = class(&config, "api")
            .fleet
            .clone()
            .expect("fleet_rate is set");
        assert_eq!(
            c,
            ClassFleet {
                rate: 100.0,
                burst: 100,
                weight: 1,
                fallback_rate: FallbackRate::Auto,
                fallback_burst: 1,
                max_lease: 50,
                enforce: true,
            }
        );
    }

    #[test]
    fn fleet_keys_parse() {
        let config = parse(
            "[fleet]\nstore = \"rediss://r:6380\"\nnamespace = \"prod\"\n\
             lease_interval = \"200ms\"\nresponse_timeout = \"20ms\"\n\
             on_store_down = \"refuse\"\n\
             [classes.api]\nfleet_rate = 10\nfleet_burst = 8\nfleet_weight = 3\n\
             fleet_fallback_rate = 2.5\nfleet_fallback_burst = 2\nfleet_max_lease = 8\n\
             fleet_enforce = false\n",
        );
        let f = config.fleet.clone().expect("the file has a [fleet] table");
        assert_eq!(f.connect_timeout, Duration::from_millis(100));
        assert_eq!(f.response_timeout, Duration::from_millis(20));
        assert_eq!(f.on_store_down, StoreDown::Refuse);
        let c = class(&config, "api")
            .fleet
            .clone()
            .expect("fleet_rate is set");
        assert_eq!(c.fallback_rate, FallbackRate::Rate(2.5));
        assert_eq!(
            (c.burst, c.weight, c.fallback_burst, c.max_lease),
            (8, 3, 2, 8)
        );
        assert!(!c.enforce);
    }

    #[test]
    fn bad_fleet_values() {
        assert_error(
            "[fleet]\nstore = \"http://x\"\n",
            &["fleet.store", "redis://"],
            2,
            9,
        );
        assert_error(
            "[fleet]\nstore = \"redis://x\"\nlease_interval = \"1ms\"\n",
            &["lease_interval", "minimum"],
            3,
            18,
        );
        assert_error(
            "[fleet]\nstore = \"redis://x\"\non_store_down = \"maybe\"\n",
            &["maybe"],
            3,
            17,
        );
        assert_error(
            "[classes.c]\nfleet_rate = 5\n",
            &["classes.c.fleet_rate", "[fleet]"],
            2,
            14,
        );
        assert_class_error("fleet_burst = 5", &["fleet_burst needs fleet_rate"]);
        assert_error(
            &format!("{FLEET}[classes.c]\nfleet_rate = 5\nfleet_fallback_rate = \"half\"\n"),
            &["fleet_fallback_rate", "auto"],
            5,
            23,
        );
        assert_error(
            &format!("{FLEET}[classes.c]\nfleet_rate = 5\nfleet_burst = 4\nfleet_max_lease = 9\n"),
            &["classes.c.fleet_max_lease = 9", "maximum 4"],
            6,
            19,
        );
        assert_error(
            &format!("{FLEET}[classes.c]\nfleet_rate = 5\nfleet_weight = 0\n"),
            &["fleet_weight = 0"],
            5,
            16,
        );
    }

    // Shape and syntax errors.

    #[test]
    fn unknown_keys_are_errors_with_a_position() {
        assert_error(
            "colour = 1\n",
            &["unknown field `colour`", "fix its spelling"],
            1,
            1,
        );
        assert_error("[daemon]\ndrain = \"1s\"\n", &["drain"], 2, 1);
        assert_error(
            "[classes.c]\nrate = 1\nmax_inflight = 2\n",
            &["max_inflight"],
            3,
            1,
        );
        assert_error(
            "[classes.c]\nmax_in_flight = 2\n[classes.c.lanes]\nbulk = 0.5\n",
            &["bulk"],
            4,
            1,
        );
        assert_error(
            "[daemon]\ncapacity = { classes = 1, tenants = 5 }\n",
            &["tenants"],
            2,
            27,
        );
        assert_error("[dependencies.db]\nratio = 0.5\n", &["ratio"], 2, 1);
        assert_error(
            "[tenants]\ndefault_tier = \"x\"\nsize = 5\n",
            &["size"],
            3,
            1,
        );
    }

    #[test]
    fn syntax_errors_have_a_position() {
        let e = error("[daemon]\ndrain_timeout = \"30s\n");
        assert_eq!(e.line, Some(2), "{e}");
        assert!(e.column.is_some(), "{e}");

        let e = error("[classes.a]\nrate = 1\nrate = 2\n");
        assert_eq!(e.line, Some(3), "{e}");

        let e = error("[classes.a]\n[classes.a]\n");
        assert_eq!(e.line, Some(2), "{e}");
    }

    #[test]
    fn columns_count_characters_not_bytes() {
        // "é" is two bytes; the bad value still starts at character 12.
        assert_error("[classes.c] # é\nrate = 0\n", &["classes.c.rate"], 2, 8);
        assert_eq!(line_column("é = 1", 2), (1, 2));
        assert_eq!(line_column("é = 1", 1), (1, 1));
        assert_eq!(line_column("a\nb\n", 2), (2, 1));
        assert_eq!(line_column("a", 99), (1, 2));
    }

    #[test]
    fn display_has_source_line_and_column() {
        let e = error("[classes.c]\nrate = 0\n");
        assert!(
            e.to_string()
                .starts_with("test.toml:2:8: classes.c.rate = 0 "),
            "{e}"
        );
        let e = ConfigError {
            source_name: "f.toml".to_string(),
            line: None,
            column: None,
            message: "cannot read".to_string(),
        };
        assert_eq!(e.to_string(), "f.toml: cannot read");
    }

    #[test]
    fn load_reads_a_file_and_names_it() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let path = dir.path().join("sluice.toml");
        std::fs::write(&path, "[classes.a]\nrate = 3\n").expect("write the config");
        let config = Config::load(&path).expect("a valid config");
        assert_eq!(config.classes[0].rate, Some(3.0));

        std::fs::write(&path, "[classes.a]\nrate = -3\n").expect("write the config");
        let e = Config::load(&path).expect_err("a bad rate");
        assert_eq!(e.source_name, path.display().to_string());
        assert_eq!((e.line, e.column), (Some(2), Some(8)));

        let missing = dir.path().join("missing.toml");
        let e = Config::load(&missing).expect_err("no such file");
        assert_eq!(e.line, None);
        assert!(
            e.to_string().starts_with(&missing.display().to_string()),
            "{e}"
        );
        assert!(e.message.contains("cannot read"), "{e}");
    }
}
