//! Shared helpers for the cross-process tests: find the `sluiced` and `sluice`
//! binaries, start a daemon on a temporary region, run commands with a
//! watchdog, and read `sluice stats --json`.
//!
//! Where the binaries come from: they are looked up next to the test
//! executable (`target/<profile>/deps/<test>` → `target/<profile>/`).
//! Cargo does not put them there for us: it builds a package's `[[bin]]`s
//! before its tests only when that same package has integration tests, and
//! `sluice-daemon` (which owns `sluiced` and `sluice`) has none. Checked with
//! a fresh target directory: neither `cargo test --workspace` nor `cargo
//! test --workspace --test '*'` leaves `target/debug/sluiced` behind. So when
//! the first call to [`bin`] in each test executable runs `cargo build -p
//! sluice-daemon --bins` once (a `std::sync::Once`), into the same target
//! directory and profile. When the binaries are fresh that is a no-op of a
//! fraction of a second, and it means a test never runs a stale daemon.
//! Cargo releases its build lock before it runs the tests, so this does not
//! deadlock (checked). If cargo itself cannot be run (a test executable
//! started by hand) the binaries already there are used, with a warning.
//!
//! Every wait here has a deadline: a hung daemon or command is killed and the
//! test fails with what it printed, instead of hanging the run.

#![allow(dead_code, clippy::unwrap_used)]

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering as StdOrdering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The longest any single command, daemon start or stop may take before the
/// test is failed.
pub const WATCHDOG: Duration = Duration::from_secs(60);

/// How long a daemon may take to say it is running.
pub const START_DEADLINE: Duration = Duration::from_secs(20);

/// Pause between two polls. Never an assertion: only how often we look.
const POLL_EVERY: Duration = Duration::from_millis(10);

static BUILD: Once = Once::new();

/// `target/<profile>/`, the directory holding the test's own `deps/`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable has a path");
    let deps = exe
        .parent()
        .expect("the test executable lives in target/<profile>/deps");
    if deps.file_name().is_some_and(|n| n == "deps") {
        deps.parent().expect("deps has a parent").to_path_buf()
    } else {
        deps.to_path_buf()
    }
}

/// The path of a binary of `sluice-daemon` (`sluiced` or `sluice`), built
/// (or found fresh) by cargo once per test executable.
pub fn bin(name: &str) -> PathBuf {
    BUILD.call_once(build_daemon_bins);
    let path = profile_dir().join(name);
    assert!(
        path.exists(),
        "{} does not exist: build it with `cargo build -p sluice-daemon --bins`",
        path.display()
    );
    path
}

/// Build both binaries into the target directory this test runs from.
fn build_daemon_bins() {
    cargo_build(&["-p", "sluice-daemon", "--bins"]);
}

/// `cargo build --quiet ARGS` into the target directory and profile this
/// test executable runs from. If cargo itself cannot be run (a test
/// executable started by hand), what is already built is used.
fn cargo_build(args: &[&str]) {
    let dir = profile_dir();
    let target = dir.parent().expect("target/<profile> has a parent");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet"])
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("CARGO_TARGET_DIR", target);
    match dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => {}
        Some("release") => {
            cmd.arg("--release");
        }
        Some(profile) => {
            cmd.args(["--profile", profile]);
        }
    }
    let what = format!("{cmd:?}");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let child = match child {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "warning: cannot run cargo ({e}): using what is built in {}",
                dir.display()
            );
            return;
        }
    };
    let out = collect_within(child, Duration::from_secs(600), &what);
    assert!(
        out.status.success(),
        "{what} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `sluiced` binary.
pub fn sluiced_bin() -> PathBuf {
    bin("sluiced")
}

/// The `sluice` binary.
pub fn sluice_bin() -> PathBuf {
    bin("sluice")
}

/// Send `sig` to `pid`. Only ever called with pids of children we spawned
/// and have not yet reaped, so the pid cannot have been reused.
pub fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    unsafe { libc::kill(pid as libc::pid_t, sig) };
}

/// Wait for `child` to exit, at most `limit`; past it, kill it (SIGKILL, by
/// its pid) and fail the test.
pub fn wait_within(child: &mut Child, limit: Duration, what: &str) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait on our own child") {
            return status;
        }
        if Instant::now() >= deadline {
            signal(child.id(), libc::SIGKILL);
            let _ = child.wait();
            panic!(
                "watchdog: {what} (pid {}) still running after {limit:?}: killed",
                child.id()
            );
        }
        std::thread::sleep(POLL_EVERY);
    }
}

/// Wait for `child` with the watchdog, then collect what it wrote to its
/// piped stdout and stderr. Reading happens on threads, so a chatty child
/// cannot block on a full pipe.
pub fn collect_within(mut child: Child, limit: Duration, what: &str) -> Output {
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let reader = |p: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut p) = p {
                let _ = p.read_to_end(&mut buf);
            }
            buf
        })
    };
    let out_t = reader(out.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let err_t = reader(err.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let status = wait_within(&mut child, limit, what);
    Output {
        status,
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
    }
}

/// Run `cmd` to completion (stdin closed, stdout and stderr captured) under
/// the watchdog.
pub fn output_within(cmd: &mut Command, limit: Duration) -> Output {
    let what = format!("{cmd:?}");
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {what}: {e}"));
    collect_within(child, limit, &what)
}

/// The exit code, failing the test if the process was killed by a signal.
pub fn code(out: &Output) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    match out.status.code() {
        Some(c) => c,
        None => panic!(
            "process was killed by signal {:?}; stderr:\n{}",
            out.status.signal(),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// Stderr as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Stdout as text.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Poll `f` until it returns `Some`, at most `limit`; fail with `what` and
/// the last value seen otherwise.
pub fn poll<T, L: std::fmt::Debug>(
    limit: Duration,
    what: &str,
    mut f: impl FnMut() -> Result<T, L>,
) -> T {
    let deadline = Instant::now() + limit;
    loop {
        match f() {
            Ok(v) => return v,
            Err(last) if Instant::now() >= deadline => {
                panic!("waited {limit:?} for {what}; last seen: {last:?}")
            }
            Err(_) => std::thread::sleep(POLL_EVERY),
        }
    }
}

/// A temporary directory for one test, made traversable by every user (mode
/// 0755) so that a test can run a command as `nobody` inside it.
pub fn temp_dir() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("sluice-it-")
        .tempdir()
        .expect("a temp dir");
    fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod the temp dir");
    dir
}

/// A small region: room enough for every test, and a few hundred KiB rather
/// than the default's megabytes.
pub const SMALL_CAPACITY: &str =
    "[daemon]\ncapacity = { classes = 16, clients = 64, tickets = 65536, slots = 4096 }\n";

/// A `sluiced` started by a test on its own temporary region. Dropping it
/// kills the daemon (SIGKILL, by pid) if it is still running.
pub struct Daemon {
    dir: tempfile::TempDir,
    region: PathBuf,
    child: Option<Child>,
    pid: u32,
}

impl Daemon {
    /// Start `sluiced` on `DIR/region` with the embedded default config.
    pub fn start_default() -> Daemon {
        Self::start_in(temp_dir(), None)
    }

    /// Start `sluiced` with `config` written to `DIR/sluice.toml`.
    pub fn start(config: &str) -> Daemon {
        Self::start_in(temp_dir(), Some(config))
    }

    /// Start in `dir`, which the daemon then owns (removed on drop).
    pub fn start_in(dir: tempfile::TempDir, config: Option<&str>) -> Daemon {
        let region = dir.path().join("region");
        if let Some(text) = config {
            fs::write(dir.path().join("sluice.toml"), text).expect("write the test config");
        }
        let mut d = Daemon {
            dir,
            region,
            child: None,
            pid: 0,
        };
        d.spawn();
        d
    }

    /// Start `sluiced` again on the same region and config, after
    /// [`Daemon::stop`] or [`Daemon::kill`].
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "the previous daemon is still running");
        self.spawn();
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(sluiced_bin());
        cmd.arg("--region")
            .arg(&self.region)
            .env_remove("SLUICE_REGION")
            .env_remove("SLUICE_LOG");
        let config = self.dir.path().join("sluice.toml");
        if config.exists() {
            cmd.arg("--config").arg(&config);
        }
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("sluiced.log"))
            .expect("open the daemon log");
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        let child = cmd.spawn().expect("spawn sluiced");
        self.pid = child.id();
        self.child = Some(child);
        self.wait_running();
    }

    /// Wait until `sluice stats --json` reports this daemon running.
    fn wait_running(&mut self) {
        let deadline = Instant::now() + START_DEADLINE;
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                self.child = None;
                panic!(
                    "sluiced exited during start-up ({status}); its log:\n{}",
                    self.log()
                );
            }
            let out = self.sluice(&["stats", "--json"]);
            if out.status.success() {
                let v: Value = serde_json::from_slice(&out.stdout).expect("stats --json is JSON");
                if v["daemon"]["running"] == Value::Bool(true)
                    && v["daemon"]["pid"].as_u64() == Some(u64::from(self.pid))
                {
                    return;
                }
            }
            if Instant::now() >= deadline {
                panic!(
                    "sluiced did not report running within {START_DEADLINE:?}; last stats: {}{}\nlog:\n{}",
                    stdout(&out),
                    stderr(&out),
                    self.log()
                );
            }
            std::thread::sleep(POLL_EVERY);
        }
    }

    /// The region file.
    pub fn region(&self) -> &Path {
        &self.region
    }

    /// The test's temporary directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// What the daemon logged so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("sluiced.log")).unwrap_or_default()
    }

    /// A `sluice` command on this region, not yet run.
    pub fn sluice_cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(sluice_bin());
        cmd.arg("--region")
            .arg(&self.region)
            .args(args)
            .env_remove("SLUICE_LOG");
        cmd
    }

    /// Run `sluice --region REGION ARGS...` under the watchdog.
    pub fn sluice(&self, args: &[&str]) -> Output {
        output_within(&mut self.sluice_cmd(args), WATCHDOG)
    }

    /// `sluice stats --json`, parsed; fails the test if it does not exit 0.
    pub fn stats(&self) -> Value {
        let out = self.sluice(&["stats", "--json"]);
        assert_eq!(code(&out), 0, "sluice stats failed: {}", stderr(&out));
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("stats --json is not JSON ({e}): {}", stdout(&out)))
    }

    /// One class of `sluice stats --json`.
    pub fn class_stats(&self, name: &str) -> Value {
        let v = self.stats();
        let classes = v["classes"].as_array().expect("stats has a classes array");
        classes
            .iter()
            .find(|c| c["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("class {name} not in stats: {v}"))
    }

    /// Kill the daemon (SIGKILL) and reap it: a crash, as far as the region
    /// can tell.
    pub fn kill(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("the daemon is still ours to kill");
        signal(self.pid, libc::SIGKILL);
        wait_within(&mut child, WATCHDOG, "sluiced after SIGKILL")
    }

    /// Wait for the daemon to exit on its own (after a drain, say).
    pub fn wait_exit(&mut self) -> ExitStatus {
        let mut child = self
            .child
            .take()
            .expect("the daemon is still ours to wait for");
        wait_within(&mut child, WATCHDOG, "sluiced to exit")
    }

    /// Ask the daemon to stop (SIGTERM) and wait for it to exit.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("the daemon is still ours to stop");
        signal(self.pid, libc::SIGTERM);
        wait_within(&mut child, WATCHDOG, "sluiced after SIGTERM")
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if child.try_wait().ok().flatten().is_none() {
                signal(self.pid, libc::SIGKILL);
            }
            let _ = child.wait();
        }
    }
}

/// A field of a class's stats as a number.
pub fn num(class: &Value, field: &str) -> u64 {
    class[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} is not a number in {class}"))
}

/// `refused.<reason>` of a class's stats.
pub fn refused(class: &Value, reason: &str) -> u64 {
    class["refused"][reason]
        .as_u64()
        .unwrap_or_else(|| panic!("refused.{reason} is not a number in {class}"))
}

/// Overwrite `bytes` at `offset` of the file at `path`.
pub fn poke(path: &Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open the region to edit it");
    f.write_all_at(bytes, offset).expect("edit the region");
}

/// True while `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the first field after the parenthesised command name.
        Ok(s) => s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

static BUILD_EXAMPLES: Once = Once::new();

/// The path of an example binary of the root package (`examples/NAME.rs`),
/// built by cargo once per test executable, like [`bin`]: `cargo test
/// --test X` does not build examples.
pub fn example(name: &str) -> PathBuf {
    BUILD_EXAMPLES.call_once(build_examples);
    let path = profile_dir().join("examples").join(name);
    assert!(
        path.exists(),
        "{} does not exist: build it with `cargo build --examples`",
        path.display()
    );
    path
}

/// Build the root package's examples into the target directory this test
/// runs from.
fn build_examples() {
    cargo_build(&["-p", "sluice", "--examples"]);
}

/// A whole-test deadline: past it, every process in `pids` (the ones the
/// test file started and has not reaped) is killed (SIGKILL, by pid) and
/// the test executable exits failing, so a deadlock is a failure, never a
/// hang. Disarmed when dropped.
pub struct Watchdog(Arc<AtomicBool>);

/// Arm a [`Watchdog`] for `test`.
pub fn watchdog(test: &'static str, limit: Duration, pids: &'static Mutex<Vec<u32>>) -> Watchdog {
    let done = Arc::new(AtomicBool::new(false));
    let seen = Arc::clone(&done);
    std::thread::spawn(move || {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if seen.load(StdOrdering::SeqCst) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("watchdog: {test} still running after {limit:?}: killing what it started");
        for &pid in pids.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            signal(pid, libc::SIGKILL);
        }
        std::process::exit(101);
    });
    Watchdog(done)
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.0.store(true, StdOrdering::SeqCst);
    }
}
