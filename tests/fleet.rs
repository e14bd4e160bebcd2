//! Fleet limits across daemons: three daemons on three regions lease from
//! one real Redis and stay within the bound of FLEET.md; a stopped Redis
//! moves hosts to their fallback without any decision waiting on it; a Redis
//! restarted empty hands out no fresh burst.
//!
//! Most need Redis: `.ci/run` starts one on a Unix socket and exports its
//! path as `SLUICE_TEST_REDIS`; without it they print why and pass. The
//! store-down policies (fallback, open, refuse, shadow mode) are tested
//! without one: the store named does not exist.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{collect_within, signal, temp_dir, wait_within, Daemon, SMALL_CAPACITY};
use serde_json::Value;

/// The env var naming the test Redis's Unix socket.
const REDIS_ENV: &str = "SLUICE_TEST_REDIS";

/// The shared test Redis, or `None` (and a line saying why the test skips).
fn test_redis(test: &str) -> Option<PathBuf> {
    match std::env::var_os(REDIS_ENV) {
        Some(p) if Path::new(&p).exists() => Some(PathBuf::from(p)),
        _ => {
            eprintln!("{test}: skipped: {REDIS_ENV} does not name a Redis socket (run .ci/run)");
            None
        }
    }
}

/// A namespace no other test (or run) shares.
fn namespace(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{test}-{}-{nanos}", std::process::id())
}

/// A config with one fleet class `api`.
fn fleet_config(socket: &Path, ns: &str, class: &str) -> String {
    format!(
        "{SMALL_CAPACITY}[fleet]\nstore = \"redis+unix://{}\"\nnamespace = \"{ns}\"\n\
         lease_interval = \"50ms\"\n[classes.api]\n{class}\n",
        socket.display()
    )
}

/// A Redis of this test's own (for SIGSTOP and restarts), on a Unix socket
/// in `dir`. Killed by pid on drop.
struct OwnRedis {
    child: Option<Child>,
    socket: PathBuf,
    dir: PathBuf,
}

impl OwnRedis {
    fn start(dir: &Path) -> OwnRedis {
        let socket = dir.join("redis.sock");
        let mut r = OwnRedis {
            child: None,
            socket,
            dir: dir.to_path_buf(),
        };
        r.spawn();
        r
    }

    fn spawn(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let child = Command::new("redis-server")
            .args(["--port", "0", "--unixsocket"])
            .arg(&self.socket)
            .args([
                "--unixsocketperm",
                "700",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        common::poll(Duration::from_secs(10), "the Redis socket", || {
            if self.socket.exists() {
                Ok(())
            } else {
                Err(())
            }
        });
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn kill(&mut self) {
        let mut c = self.child.take().unwrap();
        signal(c.id(), libc::SIGKILL);
        wait_within(
            &mut c,
            Duration::from_secs(10),
            "redis-server after SIGKILL",
        );
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), libc::SIGCONT);
            signal(c.id(), libc::SIGKILL);
            let _ = c.wait();
        }
    }
}

/// What one driver process saw.
struct Driven {
    admits: Vec<u64>,
    refused_fleet: u64,
    slowest_ns: u64,
}

fn drive(d: &Daemon, seconds: f64, pace: f64) -> Child {
    Command::new(common::example("fleet_driver"))
        .arg(d.region())
        .arg("api")
        .arg(seconds.to_string())
        .arg(pace.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn fleet_driver")
}

fn collect(child: Child) -> Driven {
    let out = collect_within(child, Duration::from_secs(60), "fleet_driver");
    assert!(
        out.status.success(),
        "fleet_driver failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut d = Driven {
        admits: Vec::new(),
        refused_fleet: 0,
        slowest_ns: 0,
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let parts: Vec<&str> = line.split_whitespace().collect();
        match parts.as_slice() {
            ["admit", t] => d.admits.push(t.parse().unwrap()),
            ["refused", "fleet", n] => d.refused_fleet = n.parse().unwrap(),
            ["slowest_decision_ns", n] => d.slowest_ns = n.parse().unwrap(),
            _ => {}
        }
    }
    d
}

/// The class's `fleet` object in `sluice stats --json`.
fn fleet_stats(d: &Daemon) -> Value {
    d.class_stats("api")["fleet"].clone()
}

/// Wait until the daemon holds a valid lease.
fn wait_leased(d: &Daemon) {
    common::poll(Duration::from_secs(10), "a first lease", || {
        let f = fleet_stats(d);
        if f["on_fallback"] == Value::Bool(false) {
            Ok(())
        } else {
            Err(f)
        }
    });
}

/// The most admissions in any window of `w_ns` (admits sorted).
fn max_in_window(admits: &[u64], w_ns: u64) -> usize {
    let mut best = 0;
    let mut lo = 0;
    for hi in 0..admits.len() {
        while admits[hi] - admits[lo] > w_ns {
            lo += 1;
        }
        best = best.max(hi - lo + 1);
    }
    best
}

const RATE: f64 = 100.0;
const BURST: f64 = 100.0;
/// Two lease intervals of 50 ms.
const LIFETIME_S: f64 = 0.1;

#[test]
fn three_hosts_stay_within_the_fleet_bound() {
    let Some(socket) = test_redis("three_hosts_stay_within_the_fleet_bound") else {
        return;
    };
    let ns = namespace("three");
    let class = "fleet_rate = 100\nfleet_burst = 100\nfleet_fallback_rate = 10";
    let daemons: Vec<Daemon> = (0..3)
        .map(|_| Daemon::start(&fleet_config(&socket, &ns, class)))
        .collect();
    for d in &daemons {
        wait_leased(d);
    }
    // Different demand on each host: as fast as it goes, 80/s, 30/s.
    let seconds = 4.0;
    let drivers: Vec<Child> = daemons
        .iter()
        .zip([0.0, 80.0, 30.0])
        .map(|(d, pace)| drive(d, seconds, pace))
        .collect();
    let driven: Vec<Driven> = drivers.into_iter().map(collect).collect();
    let mut all: Vec<u64> = driven.iter().flat_map(|d| d.admits.clone()).collect();
    all.sort_unstable();
    for w in [0.5, 1.0, 2.0, seconds] {
        let n = max_in_window(&all, (w * 1e9) as u64);
        let bound = RATE * (w + LIFETIME_S) + BURST;
        eprintln!("window {w}s: {n} admitted fleet-wide, bound {bound}");
        assert!(
            n as f64 <= bound,
            "window {w}s: {n} admitted fleet-wide, over the bound {bound}"
        );
    }
    // Every host got something, and the store saw three hosts.
    for (i, d) in driven.iter().enumerate() {
        assert!(!d.admits.is_empty(), "host {i} admitted nothing");
    }
    let f = fleet_stats(&daemons[0]);
    assert_eq!(f["hosts"].as_u64(), Some(3), "{f}");
    assert!(f["leased"].as_u64().unwrap() > 0, "{f}");
    // The fast host was refused for lack of credit, with reason `fleet`.
    assert!(driven[0].refused_fleet > 0);
    let api = daemons[0].class_stats("api");
    assert!(api["refused"]["fleet"].as_u64().unwrap() > 0, "{api}");
}

#[test]
fn equal_demand_gets_equal_shares() {
    let Some(socket) = test_redis("equal_demand_gets_equal_shares") else {
        return;
    };
    let ns = namespace("equal");
    let class = "fleet_rate = 100\nfleet_burst = 100\nfleet_fallback_rate = 10";
    let daemons: Vec<Daemon> = (0..2)
        .map(|_| Daemon::start(&fleet_config(&socket, &ns, class)))
        .collect();
    for d in &daemons {
        wait_leased(d);
    }
    // Past the first 1.5 s (the full bucket's burst goes to whoever asks
    // first), each host should get about half of the rate.
    let warm = sluice_client::clock::monotonic_ns() + 1_500_000_000;
    let drivers: Vec<Child> = daemons.iter().map(|d| drive(d, 4.5, 0.0)).collect();
    let counts: Vec<usize> = drivers
        .into_iter()
        .map(|c| collect(c).admits.iter().filter(|t| **t >= warm).count())
        .collect();
    // `sluice fleet`: the store's view through either daemon: two hosts.
    let out = daemons[0].sluice(&["fleet", "--json"]);
    assert_eq!(common::code(&out), 0, "{}", common::stderr(&out));
    let view: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        view["classes"][0]["active_hosts"].as_u64(),
        Some(2),
        "{view}"
    );
    let total: usize = counts.iter().sum();
    eprintln!("admitted per host with equal demand: {counts:?}");
    for n in &counts {
        // About half each: between 30% and 70% of the total.
        assert!(
            *n * 10 >= total * 3 && *n * 10 <= total * 7,
            "uneven shares: {counts:?}"
        );
    }
}

#[test]
fn stopped_redis_moves_hosts_to_fallback_without_waiting() {
    let Some(_) = test_redis("stopped_redis_moves_hosts_to_fallback_without_waiting") else {
        return;
    };
    let dir = temp_dir();
    let mut redis = OwnRedis::start(dir.path());
    let class = "fleet_rate = 100\nfleet_burst = 100\nfleet_fallback_rate = 20";
    let d = Daemon::start(&fleet_config(&redis.socket, &namespace("stop"), class));
    wait_leased(&d);
    let driver = drive(&d, 3.0, 0.0);
    std::thread::sleep(Duration::from_millis(800));

    // Redis stops answering: the socket accepts, nothing replies.
    signal(redis.pid(), libc::SIGSTOP);
    let stopped = Instant::now();
    common::poll(Duration::from_secs(5), "the host on fallback", || {
        let f = fleet_stats(&d);
        if f["on_fallback"] == Value::Bool(true) {
            Ok(())
        } else {
            Err(f)
        }
    });
    let took = stopped.elapsed();
    eprintln!("on fallback {took:?} after SIGSTOP (lease lifetime 100ms)");
    // `sluice run` while the store is stopped: decided locally, at once
    // (the watchdog fails the test if it waited on the network).
    let mut run = d.sluice_cmd(&["run", "--class", "api", "--", "true"]);
    let out = common::output_within(&mut run, Duration::from_secs(5));
    let code = common::code(&out);
    assert!(
        code == 0 || code == 75,
        "sluice run: {}",
        common::stderr(&out)
    );
    let driven = collect(driver);
    eprintln!("slowest decision {} ns", driven.slowest_ns);
    assert!(
        driven.slowest_ns < 50_000_000,
        "a decision took {} ns: it waited on something",
        driven.slowest_ns
    );
    signal(redis.pid(), libc::SIGCONT);
    // Leasing resumes.
    wait_leased(&d);
    let f = fleet_stats(&d);
    assert!(f["outages"].as_u64().unwrap() >= 1, "{f}");
    assert!(f["fallback_used"].as_u64().unwrap() >= 1, "{f}");
    redis.kill();
}

#[test]
fn restarted_empty_redis_hands_out_no_fresh_burst() {
    let Some(_) = test_redis("restarted_empty_redis_hands_out_no_fresh_burst") else {
        return;
    };
    let dir = temp_dir();
    let mut redis = OwnRedis::start(dir.path());
    // No fallback spending while Redis is gone: refuse.
    let class = "fleet_rate = 100\nfleet_burst = 100";
    let config = fleet_config(&redis.socket, &namespace("restart"), class).replace(
        "lease_interval",
        "on_store_down = \"refuse\"\nlease_interval",
    );
    let d = Daemon::start(&config);
    wait_leased(&d);
    // Empty the bucket (a full second of demand), then restart Redis empty.
    let first = collect(drive(&d, 1.5, 0.0));
    assert!(!first.admits.is_empty());
    redis.kill();
    redis.spawn();
    let restarted = sluice_client::clock::monotonic_ns();
    let after = collect(drive(&d, 1.0, 0.0));
    let n = after.admits.iter().filter(|t| **t >= restarted).count();
    // A fresh burst would add BURST on top of the rate.
    let bound = RATE * (1.0 + LIFETIME_S) + BURST / 2.0;
    eprintln!("{n} admitted in the second after an empty restart; bound {bound}");
    assert!(
        (n as f64) <= bound,
        "{n} admitted after an empty restart: a fresh burst (bound {bound})"
    );
}

/// A daemon whose store does not exist (it starts, and stays, store-down).
fn storeless(dir_hint: &str, fleet_extra: &str, class_extra: &str) -> Daemon {
    let config = format!(
        "{SMALL_CAPACITY}[fleet]\nstore = \"redis+unix:///nonexistent/{dir_hint}.sock\"\n\
         lease_interval = \"50ms\"\n{fleet_extra}\n[classes.api]\nfleet_rate = 1000\n\
         fleet_burst = 100\n{class_extra}\n"
    );
    Daemon::start(&config)
}

/// Decide `n` requests on class `api` now; returns the decisions' reasons
/// (`admitted` or the refusal reason) and the first fleet retry-after.
fn decide(d: &Daemon, n: usize) -> (Vec<String>, Option<Duration>) {
    let client = sluice_client::Client::attach(d.region()).unwrap();
    let api = client.class("api").unwrap();
    let mut out = Vec::new();
    let mut retry = None;
    for _ in 0..n {
        match api.try_acquire(&sluice_client::Request::new()).unwrap() {
            sluice_client::Decision::Admitted(p) => {
                out.push("admitted".to_string());
                drop(p);
            }
            sluice_client::Decision::Refused(no) => {
                if no.reason == sluice_client::RefuseReason::Fleet && retry.is_none() {
                    retry = no.retry_after;
                }
                out.push(no.reason.to_string());
            }
        }
    }
    (out, retry)
}

#[test]
fn store_down_at_start_spends_the_fallback_bucket() {
    let d = storeless(
        "fallback",
        "",
        "fleet_fallback_rate = 1\nfleet_fallback_burst = 2",
    );
    let (got, retry) = decide(&d, 4);
    assert_eq!(got, ["admitted", "admitted", "fleet", "fleet"]);
    // The fallback bucket's own retry-after: about one second at 1/s.
    let retry = retry.expect("a fallback refusal says when to come back");
    assert!(
        retry > Duration::from_millis(500) && retry <= Duration::from_secs(1),
        "{retry:?}"
    );
    let api = d.class_stats("api");
    let f = &api["fleet"];
    assert_eq!(f["on_fallback"], Value::Bool(true), "{api}");
    assert_eq!(f["fallback_used"].as_u64(), Some(2), "{api}");
    assert_eq!(api["refused"]["fleet"].as_u64(), Some(2), "{api}");
    common::poll(Duration::from_secs(10), "the outage counted", || {
        let f = fleet_stats(&d);
        if f["outages"].as_u64() == Some(1) {
            Ok(())
        } else {
            Err(f)
        }
    });
    assert!(d.log().contains("fleet store unreachable"), "{}", d.log());
}

#[test]
fn store_down_refuse_and_open() {
    let refuse = storeless("refuse", "on_store_down = \"refuse\"", "");
    let (got, retry) = decide(&refuse, 2);
    assert_eq!(got, ["fleet", "fleet"]);
    assert!(
        retry.is_some_and(|r| r <= Duration::from_millis(50)),
        "{retry:?}"
    );
    let open = storeless("open", "on_store_down = \"open\"", "");
    let (got, _) = decide(&open, 3);
    assert_eq!(got, ["admitted", "admitted", "admitted"]);
}

#[test]
fn shadow_mode_counts_but_never_refuses() {
    let d = storeless(
        "shadow",
        "on_store_down = \"refuse\"",
        "fleet_enforce = false",
    );
    let (got, _) = decide(&d, 3);
    assert_eq!(got, ["admitted", "admitted", "admitted"]);
    let f = fleet_stats(&d);
    assert_eq!(f["shadow_refused"].as_u64(), Some(3), "{f}");
}

#[test]
fn run_with_wait_sleeps_through_a_fleet_refusal() {
    let d = storeless(
        "wait",
        "",
        "fleet_fallback_rate = 0.5\nfleet_fallback_burst = 1",
    );
    let first = d.sluice(&["run", "--class", "api", "--", "true"]);
    assert_eq!(common::code(&first), 0, "{}", common::stderr(&first));
    // The bucket is empty now: without a wait, refused `fleet` (exit 75).
    let no_wait = d.sluice(&["run", "--class", "api", "--", "true"]);
    assert_eq!(common::code(&no_wait), 75, "{}", common::stderr(&no_wait));
    assert!(
        common::stderr(&no_wait).contains("fleet"),
        "{}",
        common::stderr(&no_wait)
    );
    // Willing to wait: it sleeps until the bucket has a token (≤ 2 s).
    let waited = d.sluice(&["run", "--class", "api", "--wait", "5s", "--", "true"]);
    assert_eq!(common::code(&waited), 0, "{}", common::stderr(&waited));
}

/// The acceptance run: two daemons, `fleet_rate = 100`,
/// `fleet_burst = 100`, `fleet_fallback_rate = 10`, the default lease
/// interval (100 ms, so a lease lives 200 ms), both driven as fast as they
/// admit for 10 s.
#[test]
fn acceptance_two_hosts_ten_seconds() {
    let Some(socket) = test_redis("acceptance_two_hosts_ten_seconds") else {
        return;
    };
    let ns = namespace("acceptance");
    let config = format!(
        "{SMALL_CAPACITY}[fleet]\nstore = \"redis+unix://{}\"\nnamespace = \"{ns}\"\n\
         [classes.api]\nfleet_rate = 100\nfleet_burst = 100\nfleet_fallback_rate = 10\n",
        socket.display()
    );
    let a = Daemon::start(&config);
    let b = Daemon::start(&config);
    wait_leased(&a);
    wait_leased(&b);
    let drivers = [drive(&a, 10.0, 0.0), drive(&b, 10.0, 0.0)];
    let [da, db] = drivers.map(collect);
    let total = da.admits.len() + db.admits.len();
    let bound = 100.0 * (10.0 + 0.2) + 100.0;
    eprintln!(
        "admitted on a {} + on b {} = {total}; bound {bound}",
        da.admits.len(),
        db.admits.len()
    );
    assert!(total as f64 <= bound, "{total} admitted, over {bound}");
    let f = fleet_stats(&a);
    for key in [
        "leased",
        "used",
        "returned",
        "expired",
        "credit",
        "on_fallback",
        "lease_rtt_us",
        "outages",
        "hosts",
        "config_mismatch",
    ] {
        assert!(f.get(key).is_some(), "no {key} in the fleet object: {f}");
    }
    let out = a.sluice(&["fleet"]);
    assert_eq!(common::code(&out), 0, "{}", common::stderr(&out));
    assert!(
        common::stdout(&out).contains("2 active hosts"),
        "{}",
        common::stdout(&out)
    );
}

#[test]
fn a_host_configured_differently_is_reported_not_obeyed() {
    let Some(socket) = test_redis("a_host_configured_differently_is_reported_not_obeyed") else {
        return;
    };
    let ns = namespace("mismatch");
    let first = Daemon::start(&fleet_config(&socket, &ns, "fleet_rate = 100"));
    wait_leased(&first);
    let other = Daemon::start(&fleet_config(&socket, &ns, "fleet_rate = 5000"));
    common::poll(Duration::from_secs(10), "the mismatch reported", || {
        let f = fleet_stats(&other);
        if f["config_mismatch"] == Value::Bool(true) {
            Ok(())
        } else {
            Err(f)
        }
    });
    assert_eq!(fleet_stats(&first)["config_mismatch"], Value::Bool(false));
}

#[test]
fn a_class_removed_by_reload_returns_its_credit_once() {
    let Some(socket) = test_redis("a_class_removed_by_reload_returns_its_credit_once") else {
        return;
    };
    let ns = namespace("reload");
    let two = fleet_config(&socket, &ns, "fleet_rate = 100") + "[classes.gone]\nfleet_rate = 100\n";
    let d = Daemon::start(&two);
    wait_leased(&d);
    common::poll(Duration::from_secs(10), "class gone leased", || {
        let s = d.class_stats("gone");
        if s["fleet"]["leased"].as_u64().unwrap_or(0) > 0 {
            Ok(())
        } else {
            Err(s)
        }
    });
    std::fs::write(
        d.dir().join("sluice.toml"),
        fleet_config(&socket, &ns, "fleet_rate = 100"),
    )
    .unwrap();
    signal(d.pid(), libc::SIGHUP);
    common::poll(Duration::from_secs(10), "the return logged", || {
        let log = d.log();
        if log.contains("fleet credit returned class=\"gone\"") {
            Ok(())
        } else {
            Err(log)
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let returns = d
        .log()
        .matches("fleet credit returned class=\"gone\"")
        .count();
    assert_eq!(returns, 1, "{}", d.log());
}
