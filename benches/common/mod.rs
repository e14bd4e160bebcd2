//! Shared set-up for the benches and the `fast_loop` example: a real sluice
//! region created in-process, with no daemon running.
//!
//! The region is laid out by the daemon's own code (`open_region`) from a
//! config parsed by the daemon's own parser, so the bytes a client sees are
//! exactly the ones `sluiced` would create. Nothing maintains it afterwards
//! (no heartbeat, no reclaimer): the fast path does not need that.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use sluice_daemon::config::Config;
use sluice_daemon::region::{open_region, OwnedRegion};

/// The classes every bench region has.
///
/// - `slots`: `max_in_flight = 64`, no rate.
/// - `rate`: 10⁹ tokens per second with a burst of 10⁹, no slots. One token
///   is 1 ns of bucket time and the burst is one second of it, so a single
///   caller (≥ 1 ns per request) can never be refused.
/// - `both`: the two limits above on one class.
/// - `one`: `max_in_flight = 1`, for the refused path.
/// - `both_fleet`: `both` with a fleet limit. No daemon leases for it (the
///   store named is never contacted); a bench that wants the lease path
///   opens a lease by hand ([`open_fleet_lease`]).
pub const BENCH_CONFIG: &str = r#"
[daemon]
capacity = { classes = 8, clients = 256, tickets = 65536, slots = 1024 }

[region]
mode = "0600"

[classes.slots]
max_in_flight = 64

[classes.rate]
rate = 1e9
burst = 1000000000

[classes.both]
rate = 1e9
burst = 1000000000
max_in_flight = 64

[classes.one]
max_in_flight = 1

[fleet]
store = "redis+unix:///nonexistent/sluice-bench.sock"

[classes.both_fleet]
rate = 1e9
burst = 1000000000
max_in_flight = 64
fleet_rate = 1e9
fleet_burst = 1000000000
"#;

/// A region file in a private temporary directory, owned (locked and laid
/// out) by this process for as long as the value lives.
pub struct BenchRegion {
    // Field order is drop order: unmap the region before the directory goes.
    owned: OwnedRegion,
    path: PathBuf,
    dir: tempfile::TempDir,
}

impl BenchRegion {
    /// The region file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The daemon-side view (kept only so the mapping stays alive).
    pub fn owned(&self) -> &OwnedRegion {
        &self.owned
    }

    /// The temporary directory holding the region.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// Where temporary bench files go: `/dev/shm` when it exists (a tmpfs, like
/// a production region), else the system temp dir.
pub fn shm_dir() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// Create a fresh region laid out from [`BENCH_CONFIG`].
pub fn bench_region() -> BenchRegion {
    let dir = tempfile::Builder::new()
        .prefix("sluice-bench-")
        .tempdir_in(shm_dir())
        .expect("the bench can create a temp dir under /dev/shm or $TMPDIR");
    let path = dir.path().join("region");
    let config = Config::parse(BENCH_CONFIG, "bench").expect("BENCH_CONFIG is a valid config");
    let owned = open_region(&path, &config, sluice_client::clock::monotonic_ns())
        .expect("a fresh region can be created in a private temp dir");
    BenchRegion { owned, path, dir }
}

/// Give class `both_fleet` a lease that never expires and 2⁴⁸ − 1 tokens of
/// credit, as if a daemon had leased them: its requests then take the
/// fleet credit on the fast path.
pub fn open_fleet_lease(region: &BenchRegion) {
    use sluice_shm_layout::fleet;
    use sluice_shm_layout::sync::Ordering;
    let r = region.owned().region();
    let idx =
        sluice_daemon::region::find_class(r, "both_fleet").expect("BENCH_CONFIG has both_fleet");
    let rec = r
        .class(idx)
        .expect("a class index from find_class is in the table");
    fleet::top_up(&rec.fleet_credit, fleet::TOKEN_MASK);
    // Release: as the daemon publishes a lease after its credit.
    rec.fleet_lease_until_ns.store(u64::MAX, Ordering::Release);
}
