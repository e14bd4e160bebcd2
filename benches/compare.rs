//! The side-by-side comparison: sluice's fast path, the floors it is built
//! from, and the peers a team would otherwise reach for, all measured in one
//! run on one machine.
//!
//! Run: `cargo bench --bench compare [-- --quick]`. Prints a table and the
//! target ratios, and writes `target/sluice-bench.json` (under
//! `$CARGO_TARGET_DIR` when set). It reports; it never fails on a miss.
//!
//! # Method
//!
//! Each row runs its operation in batches. The batch size is calibrated
//! during the warm-up: doubled from 1 until a batch takes at least 10 µs, at
//! most 1,000 operations. Each batch is timed with two CLOCK_MONOTONIC reads
//! (vDSO, about 20 ns each, so under 0.5% of a 10 µs batch) and gives one
//! sample, batch time / batch size. A row runs for a fixed time (1.5 s, or
//! 0.3 s with `--quick`) after its warm-up; median and p99 are taken over its
//! samples, and ops/s is operations / measured wall time.
//!
//! `procs = 2` rows start two worker processes (this binary re-executed with
//! `SLUICE_BENCH_ROLE` set) that run the same loop on the same shared object
//! over the same CLOCK_MONOTONIC window; their samples are pooled and their
//! ops/s added. Helpers (the RPC server, the futex partner) are re-executed
//! the same way, and every child is waited for by its own handle.
//!
//! # What each row includes
//!
//! See the `row_*` functions and BENCHMARKS.md; in short, one operation is
//! one "may I?" plus its "done", as each mechanism spells them.

#![allow(clippy::unwrap_used)]

mod common;

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::hint::black_box;
use std::io::{BufRead, BufReader, Read, Write};
use std::num::NonZeroU32;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use governor::clock::MonotonicClock;
use governor::{Quota, RateLimiter};
use memmap2::MmapMut;
use sluice_client::clock::monotonic_ns;
use sluice_client::{Client, Decision, Outcome, Request};
use sluice_shm_layout::sync::{AtomicU32, AtomicU64, Ordering};

/// Selects a worker role in a re-executed child.
const ROLE_ENV: &str = "SLUICE_BENCH_ROLE";
/// The shared object (shm file or region) a worker attaches to.
const PATH_ENV: &str = "SLUICE_BENCH_PATH";
/// CLOCK_MONOTONIC ns at which a worker's measured window opens.
const START_ENV: &str = "SLUICE_BENCH_START_NS";
/// CLOCK_MONOTONIC ns at which it closes.
const END_ENV: &str = "SLUICE_BENCH_END_NS";
/// The CPU a procs = 2 worker pins itself to.
const CPU_ENV: &str = "SLUICE_BENCH_CPU";
/// The inherited socket descriptor of the RPC helper.
const FD_ENV: &str = "SLUICE_BENCH_FD";
/// The shm file whose first word tells the handoff partner to stop.
const STOP_ENV: &str = "SLUICE_BENCH_STOP";
/// The class a `sluice_class` worker uses.
const CLASS_ENV: &str = "SLUICE_BENCH_CLASS";

/// The region of the `sluice_handoff` row: one class of one slot, and
/// small queues (a dispatch scans every ticket record of the class).
const HANDOFF_CONFIG: &str = r#"
[daemon]
capacity = { classes = 2, clients = 16, tickets = 80, slots = 16 }

[region]
mode = "0600"

[classes.handoff]
max_in_flight = 1
queue_depth = 2
"#;

/// A batch is grown until it takes at least this long.
const TARGET_BATCH_NS: u64 = 10_000;
/// Largest batch.
const MAX_BATCH: u64 = 1_000;
/// Slots of the counting semaphore, as the `slots` class has.
const SEM_SLOTS: u32 = 64;
/// Bytes of one RPC request and of its response.
const RPC_BYTES: usize = 16;
/// How long workers get to start before their window opens.
const WORKER_LEAD: Duration = Duration::from_millis(400);

// ---------------------------------------------------------------------------
// Measuring
// ---------------------------------------------------------------------------

/// One batch of `n` operations; returns how many of them were refused (the
/// mechanism said no: a held word, an empty semaphore, a red bucket).
type Op<'a> = dyn FnMut(u64) -> u64 + 'a;

/// What one process measured.
#[derive(Default)]
struct Measured {
    /// Per-operation ns, one per batch.
    samples: Vec<f64>,
    ops: u64,
    refused: u64,
    elapsed_ns: u64,
    batch: u64,
    /// Involuntary context switches during the measured window.
    preempted: u64,
}

/// Involuntary context switches of this process so far: how often the
/// scheduler took the CPU away (other load on the machine).
fn preemptions() -> u64 {
    // SAFETY: all-zero is a valid rusage, which getrusage then fills.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    ru.ru_nivcsw as u64
}

/// Calibrate, warm up until `start_ns`, then measure batches until `end_ns`.
///
/// Calibration times each batch size three times and keeps the fastest, so
/// a first-touch page fault or one preemption does not freeze the size.
fn measure(op: &mut Op<'_>, start_ns: u64, end_ns: u64) -> Measured {
    let mut batch = 1;
    loop {
        let mut best = u64::MAX;
        for _ in 0..3 {
            let t0 = monotonic_ns();
            op(batch);
            best = best.min(monotonic_ns() - t0);
        }
        if best >= TARGET_BATCH_NS || batch >= MAX_BATCH {
            break;
        }
        batch = (batch * 2).min(MAX_BATCH);
    }
    while monotonic_ns() < start_ns {
        op(batch);
    }
    let mut m = Measured {
        batch,
        ..Measured::default()
    };
    let preempted_before = preemptions();
    let begin = monotonic_ns();
    let mut t0 = begin;
    loop {
        m.refused += op(batch);
        let t1 = monotonic_ns();
        m.samples.push((t1 - t0) as f64 / batch as f64);
        m.ops += batch;
        if t1 >= end_ns {
            m.elapsed_ns = t1 - begin;
            break;
        }
        t0 = monotonic_ns();
    }
    m.preempted = preemptions() - preempted_before;
    m
}

/// A finished row of the table.
struct Row {
    name: &'static str,
    procs: u32,
    median_ns: Option<f64>,
    p99_ns: Option<f64>,
    ops_per_sec: Option<f64>,
    samples: usize,
    batch: u64,
    refused: u64,
    preempted: u64,
    note: Option<String>,
}

impl Row {
    fn missing(name: &'static str, procs: u32, note: &str) -> Row {
        Row {
            name,
            procs,
            median_ns: None,
            p99_ns: None,
            ops_per_sec: None,
            samples: 0,
            batch: 0,
            refused: 0,
            preempted: 0,
            note: Some(note.to_string()),
        }
    }

    /// Pool the measurements of every process of a row. `scale` divides each
    /// sample and multiplies the throughput (2 for a round trip reported as
    /// two one-way handoffs).
    fn from_measured(name: &'static str, procs: u32, parts: Vec<Measured>, scale: f64) -> Row {
        let mut all: Vec<f64> = parts
            .iter()
            .flat_map(|m| m.samples.iter().map(|s| s / scale))
            .collect();
        all.sort_by(f64::total_cmp);
        let ops_per_sec: f64 = parts
            .iter()
            .filter(|m| m.elapsed_ns > 0)
            .map(|m| m.ops as f64 * scale * 1e9 / m.elapsed_ns as f64)
            .sum();
        Row {
            name,
            procs,
            median_ns: percentile(&all, 0.50),
            p99_ns: percentile(&all, 0.99),
            ops_per_sec: Some(ops_per_sec),
            samples: all.len(),
            batch: parts.iter().map(|m| m.batch).max().unwrap_or(0),
            refused: parts.iter().map(|m| m.refused).sum(),
            preempted: parts.iter().map(|m| m.preempted).sum(),
            note: None,
        }
    }
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// How long each row runs.
#[derive(Clone, Copy)]
struct Plan {
    warm: Duration,
    measure: Duration,
}

impl Plan {
    /// Measure `op` in this process.
    fn local(&self, name: &'static str, op: &mut Op<'_>) -> Row {
        let start = monotonic_ns() + self.warm.as_nanos() as u64;
        let end = start + self.measure.as_nanos() as u64;
        let m = measure(op, start, end);
        Row::from_measured(name, 1, vec![m], 1.0)
    }

    /// Measure `role` in two worker processes at once, on `path`.
    fn two_procs(&self, name: &'static str, role: &str, path: &Path) -> Row {
        self.n_procs(name, role, path, 2, |_, _| {})
    }

    /// Measure `role` in `n` worker processes at once, on `path`. Worker
    /// `i` is pinned to CPU `i mod cpus`; `setup(i, cmd)` may add to its
    /// environment (which class it uses, for instance).
    fn n_procs(
        &self,
        name: &'static str,
        role: &str,
        path: &Path,
        n: u32,
        setup: impl Fn(u32, &mut Command),
    ) -> Row {
        let start = monotonic_ns() + (WORKER_LEAD + self.warm).as_nanos() as u64;
        let end = start + self.measure.as_nanos() as u64;
        let mut children = Vec::new();
        let cpus = std::thread::available_parallelism().map_or(1, |c| c.get());
        for i in 0..n {
            let mut cmd = self_command(role);
            cmd.env(CPU_ENV, (i as usize % cpus).to_string())
                .env(PATH_ENV, path)
                .env(START_ENV, start.to_string())
                .env(END_ENV, end.to_string())
                .stdout(Stdio::piped());
            setup(i, &mut cmd);
            children.push(
                cmd.spawn()
                    .expect("the bench can re-execute itself as a worker"),
            );
        }
        let mut parts = Vec::new();
        let mut failed = None;
        for child in children {
            match collect_worker(child) {
                Ok(m) => parts.push(m),
                Err(e) => failed = Some(e),
            }
        }
        match failed {
            Some(e) => Row::missing(name, n, &format!("worker failed: {e}")),
            None => Row::from_measured(name, n, parts, 1.0),
        }
    }
}

/// Pin this process to one CPU, so that the two workers of a row run on
/// different CPUs whenever both are running. Best effort.
fn pin_to_cpu(cpu: usize) {
    // SAFETY: all-zero is an empty cpu_set_t; CPU_SET writes inside it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` is below the machine's CPU count, far inside the set.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed.
    unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
}

/// This binary, re-executed in `role`.
fn self_command(role: &str) -> Command {
    let exe = std::env::current_exe().expect("the bench knows its own executable");
    let mut cmd = Command::new(exe);
    cmd.env(ROLE_ENV, role).stdin(Stdio::null());
    cmd
}

/// Read a worker's report and wait for it.
fn collect_worker(mut child: Child) -> Result<Measured, String> {
    let out = child.stdout.take().ok_or("no stdout")?;
    let mut m = Measured::default();
    let mut lines = BufReader::new(out).lines();
    let head = lines
        .next()
        .ok_or("empty report")?
        .map_err(|e| e.to_string())?;
    let f: Vec<u64> = head
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    if f.len() != 5 {
        let _ = child.wait();
        return Err(format!("bad report header {head:?}"));
    }
    (m.ops, m.refused, m.elapsed_ns, m.batch, m.preempted) = (f[0], f[1], f[2], f[3], f[4]);
    for line in lines {
        let line = line.map_err(|e| e.to_string())?;
        m.samples.push(
            line.trim()
                .parse()
                .map_err(|_| format!("bad sample {line:?}"))?,
        );
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    if !status.success() {
        return Err(format!("worker exited with {status}"));
    }
    Ok(m)
}

// ---------------------------------------------------------------------------
// Shared memory
// ---------------------------------------------------------------------------

/// A small file under /dev/shm mapped MAP_SHARED. The creator removes the
/// file when it drops.
struct ShmFile {
    map: MmapMut,
    path: PathBuf,
    owner: bool,
}

impl ShmFile {
    /// Create `/dev/shm/sluice-bench-PID-TAG`, one zeroed page.
    fn create(tag: &str) -> ShmFile {
        let path = common::shm_dir().join(format!("sluice-bench-{}-{tag}", std::process::id()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .expect("a fresh /dev/shm file for the bench");
        file.set_len(4096).unwrap();
        ShmFile {
            map: map_file(&file),
            path,
            owner: true,
        }
    }

    /// Map the file a parent created.
    fn open(path: &Path) -> ShmFile {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        ShmFile {
            map: map_file(&file),
            path: path.to_path_buf(),
            owner: false,
        }
    }

    fn ptr(&self) -> *mut u8 {
        self.map.as_ptr() as *mut u8
    }

    fn u64_word(&self) -> &AtomicU64 {
        // SAFETY: the mapping is page aligned and at least 8 bytes, lives as
        // long as `self`, and every process touches the word only through
        // atomics.
        unsafe { &*(self.ptr() as *const AtomicU64) }
    }

    fn u32_word(&self) -> &AtomicU32 {
        // SAFETY: as in `u64_word`, for 4 bytes.
        unsafe { &*(self.ptr() as *const AtomicU32) }
    }
}

impl Drop for ShmFile {
    fn drop(&mut self) {
        if self.owner {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn map_file(file: &File) -> MmapMut {
    // SAFETY: a MAP_SHARED mapping of a file only this benchmark uses; all
    // access to it goes through atomics or through libc calls made for
    // process-shared memory (sem_*, futex).
    unsafe { MmapMut::map_mut(file) }.expect("the bench can map its /dev/shm file")
}

// ---------------------------------------------------------------------------
// The operations. Each `op_*` returns the batch closure used both in this
// process and in the workers, so a procs = 2 row runs the very same code.
// ---------------------------------------------------------------------------

/// `floor_cas_pair`: `compare_exchange(0 → 1)`, and if that won,
/// `compare_exchange(1 → 0)`: the least a slot grant and its release can
/// cost. With two processes an attempt that finds the word held counts as a
/// refused operation (one failed CAS).
fn op_cas_pair(word: &AtomicU64) -> impl FnMut(u64) -> u64 + '_ {
    move |n| {
        let mut refused = 0;
        for _ in 0..n {
            // Acquire/Release as a slot grant and release use.
            if word
                .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                let _ = word.compare_exchange(1, 0, Ordering::Release, Ordering::Relaxed);
            } else {
                refused += 1;
            }
        }
        refused
    }
}

/// Nanoseconds of CLOCK_MONOTONIC, read directly (the vDSO).
#[inline(always)]
fn raw_monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// `floor_gcra`: the least a GCRA admission can cost: one clock read, a load
/// of `tat`, `tat' = max(tat, now) + T`, the tolerance check and one CAS.
/// Whole nanoseconds in a u64; T = 1 ns and a tolerance of 10⁹ ns (the
/// `rate` class's parameters), so it never refuses here.
fn op_gcra(tat: &AtomicU64) -> impl FnMut(u64) -> u64 + '_ {
    const T: u64 = 1;
    const TOLERANCE: u64 = 1_000_000_000;
    move |n| {
        let mut refused = 0;
        for _ in 0..n {
            let now = raw_monotonic_ns();
            // Acquire/AcqRel as sluice's bucket uses.
            let mut cur = tat.load(Ordering::Acquire);
            loop {
                let next = cur.max(now) + T;
                if next - now > TOLERANCE {
                    refused += 1;
                    break;
                }
                match tat.compare_exchange_weak(cur, next, Ordering::AcqRel, Ordering::Acquire) {
                    Ok(_) => break,
                    Err(seen) => cur = seen,
                }
            }
        }
        refused
    }
}

/// `sluice_*`: `try_acquire(cost 1)` and drop of the permit, through
/// `sluice-client` on a real region.
fn with_sluice<R>(path: &Path, class: &str, body: impl FnOnce(&mut Op<'_>) -> R) -> R {
    let client = Client::attach(path).expect("attach to the bench region");
    let handle = client.class(class).expect("the bench region has the class");
    let req = Request::new();
    let mut op = |n: u64| {
        let mut refused = 0;
        for _ in 0..n {
            match handle.try_acquire(&req) {
                Ok(Decision::Admitted(permit)) => drop(black_box(permit)),
                _ => refused += 1,
            }
        }
        refused
    };
    body(&mut op)
}

/// `posix_sem`: `sem_trywait` then, if it succeeded, `sem_post`, on an
/// unnamed process-shared semaphore (initial value 64, as the `slots` class)
/// in a MAP_SHARED mapping.
fn op_posix_sem(sem: *mut libc::sem_t) -> impl FnMut(u64) -> u64 {
    move |n| {
        let mut refused = 0;
        for _ in 0..n {
            // SAFETY: `sem` points at a semaphore initialised with
            // pshared = 1 in a mapping that outlives this closure's use.
            if unsafe { libc::sem_trywait(sem) } == 0 {
                // SAFETY: as above.
                unsafe { libc::sem_post(sem) };
            } else {
                refused += 1;
            }
        }
        refused
    }
}

/// Run `role` as a worker of a procs = 2 row and report on stdout.
fn worker(role: &str) {
    let path = PathBuf::from(std::env::var_os(PATH_ENV).expect("a worker is given a path"));
    let num = |k: &str| -> u64 { std::env::var(k).ok().and_then(|v| v.parse().ok()).expect(k) };
    let (start, end) = (num(START_ENV), num(END_ENV));
    if let Some(cpu) = std::env::var(CPU_ENV)
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        pin_to_cpu(cpu);
    }
    let m = match role {
        "floor_cas_pair" => {
            let shm = ShmFile::open(&path);
            let mut op = op_cas_pair(shm.u64_word());
            measure(&mut op, start, end)
        }
        "sluice_slots" => with_sluice(&path, "slots", |op| measure(op, start, end)),
        "sluice_both" => with_sluice(&path, "both", |op| measure(op, start, end)),
        "sluice_class" => {
            let class = std::env::var(CLASS_ENV).expect("a sluice_class worker is given a class");
            with_sluice(&path, &class, |op| measure(op, start, end))
        }
        "posix_sem" => {
            let shm = ShmFile::open(&path);
            measure(&mut op_posix_sem(shm.ptr().cast()), start, end)
        }
        other => panic!("unknown worker role {other:?}"),
    };
    let mut out = String::with_capacity(m.samples.len() * 12 + 64);
    let _ = writeln!(
        out,
        "{} {} {} {} {}",
        m.ops, m.refused, m.elapsed_ns, m.batch, m.preempted
    );
    for s in &m.samples {
        let _ = writeln!(out, "{s:.3}");
    }
    std::io::stdout().lock().write_all(out.as_bytes()).unwrap();
}

/// The RPC helper: answer each 16-byte request with 16 bytes (the request's
/// bytes with a verdict byte set) until the socket closes.
fn rpc_server() {
    let fd: i32 = std::env::var(FD_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .expect("SLUICE_BENCH_FD");
    // SAFETY: the parent passed us this descriptor, open and owned by nobody
    // else in this process.
    let mut sock = unsafe { UnixStream::from_raw_fd(fd) };
    let mut buf = [0u8; RPC_BYTES];
    while sock.read_exact(&mut buf).is_ok() {
        buf[0] = 1;
        if sock.write_all(&buf).is_err() {
            break;
        }
    }
}

/// The futex partner: whenever the word is 1 (A's ping), set it to 2 and
/// wake A; exit on 3.
fn futex_partner() {
    let path = PathBuf::from(std::env::var_os(PATH_ENV).expect("a worker is given a path"));
    let shm = ShmFile::open(&path);
    let word = shm.u32_word();
    loop {
        // Acquire/Release: the handoff itself is what is published.
        match word.load(Ordering::Acquire) {
            1 => {
                word.store(2, Ordering::Release);
                futex_wake(word);
            }
            3 => return,
            v => {
                futex_wait(word, v, None);
            }
        }
    }
}

/// FUTEX_WAIT (shared, not PRIVATE) while `word == expected`.
fn futex_wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) -> bool {
    let ts = timeout.map(|d| libc::timespec {
        tv_sec: d.as_secs() as libc::time_t,
        tv_nsec: d.subsec_nanos() as libc::c_long,
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `word` is a live 4-byte aligned u32 in a shared mapping; the
    // timeout pointer is null or points at `ts`, alive for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_futex,
            word as *const AtomicU32,
            libc::FUTEX_WAIT,
            expected,
            ts_ptr,
        )
    };
    rc == 0
}

/// FUTEX_WAKE (shared) one waiter on `word`.
fn futex_wake(word: &AtomicU32) {
    // SAFETY: `word` is a live aligned u32; FUTEX_WAKE only uses its address.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word as *const AtomicU32,
            libc::FUTEX_WAKE,
            1,
        )
    };
}

// ---------------------------------------------------------------------------
// Rows
// ---------------------------------------------------------------------------

fn row_floor_cas_pair(plan: &Plan, rows: &mut Vec<Row>) {
    let shm = ShmFile::create("cas");
    rows.push(plan.local("floor_cas_pair", &mut op_cas_pair(shm.u64_word())));
    rows.push(plan.two_procs("floor_cas_pair", "floor_cas_pair", &shm.path));
}

fn row_floor_gcra(plan: &Plan, rows: &mut Vec<Row>) {
    let shm = ShmFile::create("gcra");
    rows.push(plan.local("floor_gcra", &mut op_gcra(shm.u64_word())));
}

fn rows_sluice(plan: &Plan, rows: &mut Vec<Row>) {
    let region = common::bench_region();
    let path = region.path();
    rows.push(with_sluice(path, "slots", |op| {
        plan.local("sluice_slots", op)
    }));
    rows.push(with_sluice(path, "rate", |op| {
        plan.local("sluice_rate", op)
    }));
    rows.push(with_sluice(path, "both", |op| {
        plan.local("sluice_both", op)
    }));
    rows.push(plan.two_procs("sluice_slots", "sluice_slots", path));
    rows.push(plan.two_procs("sluice_both", "sluice_both", path));
    drop(region);
}

fn row_posix_sem(plan: &Plan, rows: &mut Vec<Row>) {
    let shm = ShmFile::create("sem");
    let sem: *mut libc::sem_t = shm.ptr().cast();
    // SAFETY: the page is ours, zeroed, page aligned and larger than a
    // sem_t; pshared = 1 because other processes map it too.
    let rc = unsafe { libc::sem_init(sem, 1, SEM_SLOTS) };
    assert_eq!(rc, 0, "sem_init: {}", std::io::Error::last_os_error());
    rows.push(plan.local("posix_sem", &mut op_posix_sem(sem)));
    rows.push(plan.two_procs("posix_sem", "posix_sem", &shm.path));
    // SAFETY: initialised above; the workers have exited.
    unsafe { libc::sem_destroy(sem) };
}

/// A quota of one token per ns with a burst of 10⁹, the `rate` class's
/// parameters: never refuses a single caller.
fn governor_quota() -> Quota {
    Quota::with_period(Duration::from_nanos(1))
        .expect("1 ns is a valid period")
        .allow_burst(NonZeroU32::new(1_000_000_000).expect("nonzero"))
}

fn rows_governor(plan: &Plan, rows: &mut Vec<Row>) {
    let lim = RateLimiter::direct(governor_quota());
    rows.push(plan.local("governor_check", &mut |n| {
        (0..n).map(|_| u64::from(lim.check().is_err())).sum()
    }));
    let lim = RateLimiter::direct_with_clock(governor_quota(), MonotonicClock);
    rows.push(plan.local("governor_monotonic", &mut |n| {
        (0..n).map(|_| u64::from(lim.check().is_err())).sum()
    }));
}

fn row_mutex(plan: &Plan, rows: &mut Vec<Row>) {
    let m = Mutex::new(0u64);
    rows.push(plan.local("mutex_counter", &mut |n| {
        for _ in 0..n {
            *black_box(&m).lock().unwrap() += 1;
        }
        0
    }));
}

fn row_flock(plan: &Plan, rows: &mut Vec<Row>) {
    // Unlinked at once; closed (and so gone) when `file` drops.
    let file = tempfile::tempfile_in(common::shm_dir()).unwrap();
    let fd = file.as_raw_fd();
    rows.push(plan.local("flock", &mut |n| {
        let mut refused = 0;
        for _ in 0..n {
            // SAFETY: `fd` is an open descriptor owned by `file`.
            if unsafe { libc::flock(fd, libc::LOCK_EX) } != 0 {
                refused += 1;
            }
            // SAFETY: as above.
            unsafe { libc::flock(fd, libc::LOCK_UN) };
        }
        refused
    }));
    drop(file);
}

/// A private SysV semaphore set, removed (IPC_RMID) on drop.
struct SysvSem(i32);

impl Drop for SysvSem {
    fn drop(&mut self) {
        // SAFETY: IPC_RMID on a set we created; no pointer arguments.
        unsafe { libc::semctl(self.0, 0, libc::IPC_RMID) };
    }
}

fn row_sysv(plan: &Plan, rows: &mut Vec<Row>) {
    // SAFETY: semget has no pointer arguments.
    let id = unsafe { libc::semget(libc::IPC_PRIVATE, 1, libc::IPC_CREAT | 0o600) };
    if id < 0 {
        let e = std::io::Error::last_os_error();
        rows.push(Row::missing(
            "sysv_sem_undo",
            1,
            &format!("semget failed: {e}"),
        ));
        return;
    }
    let set = SysvSem(id);
    // SAFETY: SETVAL takes an int (the first member of union semun) as its
    // variadic argument.
    let rc = unsafe { libc::semctl(set.0, 0, libc::SETVAL, 1 as libc::c_int) };
    assert_eq!(rc, 0, "semctl SETVAL: {}", std::io::Error::last_os_error());
    let undo = libc::SEM_UNDO as libc::c_short;
    rows.push(plan.local("sysv_sem_undo", &mut |n| {
        let mut refused = 0;
        for _ in 0..n {
            let mut down = libc::sembuf {
                sem_num: 0,
                sem_op: -1,
                sem_flg: undo,
            };
            let mut up = libc::sembuf {
                sem_num: 0,
                sem_op: 1,
                sem_flg: undo,
            };
            // SAFETY: one valid sembuf, on a set we own.
            if unsafe { libc::semop(set.0, &mut down, 1) } != 0 {
                refused += 1;
                continue;
            }
            // SAFETY: as above.
            unsafe { libc::semop(set.0, &mut up, 1) };
        }
        refused
    }));
    drop(set);
}

fn row_unix_rpc(plan: &Plan, rows: &mut Vec<Row>) {
    let (mut mine, theirs) = UnixStream::pair().unwrap();
    // The helper inherits `theirs`: clear its close-on-exec flag.
    // SAFETY: F_SETFD on a descriptor we own; no pointer arguments.
    let rc = unsafe { libc::fcntl(theirs.as_raw_fd(), libc::F_SETFD, 0) };
    assert_eq!(rc, 0, "fcntl F_SETFD: {}", std::io::Error::last_os_error());
    let mut helper = self_command("rpc_server")
        .env(FD_ENV, theirs.as_raw_fd().to_string())
        .spawn()
        .expect("the bench can start its RPC helper");
    drop(theirs);
    let mut req = [0u8; RPC_BYTES];
    let mut resp = [0u8; RPC_BYTES];
    rows.push(plan.local("unix_socket_rpc", &mut |n| {
        let mut refused = 0;
        for i in 0..n {
            req[..8].copy_from_slice(&i.to_le_bytes());
            mine.write_all(&req).unwrap();
            mine.read_exact(&mut resp).unwrap();
            if resp[0] != 1 {
                refused += 1;
            }
        }
        refused
    }));
    // EOF ends the helper; wait for it by its handle.
    drop(mine);
    let _ = helper.wait();
}

fn row_futex(plan: &Plan, rows: &mut Vec<Row>) {
    let shm = ShmFile::create("futex");
    let word = shm.u32_word();
    // 2: "A's turn". A writes 1 (ping), the partner writes 2 (pong), 3 ends.
    word.store(2, Ordering::Release);
    let mut partner = self_command("futex_partner")
        .env(PATH_ENV, &shm.path)
        .spawn()
        .expect("the bench can start its futex partner");
    let mut stuck = 0;
    let mut op = |n: u64| {
        for _ in 0..n {
            word.store(1, Ordering::Release);
            futex_wake(word);
            while word.load(Ordering::Acquire) == 1 {
                if !futex_wait(word, 1, Some(Duration::from_secs(1)))
                    && word.load(Ordering::Acquire) == 1
                {
                    stuck += 1;
                    assert!(stuck < 5, "the futex partner stopped answering");
                }
            }
        }
        0
    };
    let start = monotonic_ns() + plan.warm.as_nanos() as u64;
    let end = start + plan.measure.as_nanos() as u64;
    let m = measure(&mut op, start, end);
    rows.push(Row::from_measured("futex_pingpong", 2, vec![m], 2.0));
    word.store(3, Ordering::Release);
    futex_wake(word);
    let _ = partner.wait();
}

/// The ticket records of class `name` in the region `client` is attached to.
fn class_tickets<'c>(
    client: &'c Client,
    name: &str,
) -> &'c [sluice_shm_layout::queue::TicketRecord] {
    let idx = client.class(name).unwrap().index();
    let region = client.region_map().expect("attached").region();
    let rec = region.class(idx).expect("the class record exists");
    // Relaxed: fixed while the class lives; nothing reloads it here.
    let (base, len) = (
        rec.ticket_base.load(Ordering::Relaxed),
        rec.ticket_len.load(Ordering::Relaxed),
    );
    region
        .tickets(base, len)
        .expect("the class's tickets are in the table")
}

/// Wait (spinning, then yielding) until some ticket of the class is
/// `QUEUED`, or `stop` is set. Untimed by the caller's intent: it only makes
/// sure the release below hands off to a waiter instead of to nobody.
fn until_queued(tickets: &[sluice_shm_layout::queue::TicketRecord], stop: &AtomicU32) {
    use sluice_shm_layout::queue::{TicketWord, T_QUEUED};
    let mut spins = 0u32;
    loop {
        // Acquire pairs with the enqueuer's SeqCst publish.
        let queued = tickets
            .iter()
            .any(|t| TicketWord::decode(t.state.load(Ordering::Acquire)).state == T_QUEUED);
        // Acquire: pairs with the parent's Release store of 1.
        if queued || stop.load(Ordering::Acquire) != 0 {
            return;
        }
        spins += 1;
        if spins < 64 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

/// The handoff partner: `acquire` (it waits, asleep on its ticket's futex,
/// while the parent holds), then as soon as the parent waits in turn,
/// release (handing the slot to it); exit when told to stop.
fn handoff_partner() {
    let path = PathBuf::from(std::env::var_os(PATH_ENV).expect("a worker is given a path"));
    let stop_path = PathBuf::from(std::env::var_os(STOP_ENV).expect("a stop word"));
    let stop_shm = ShmFile::open(&stop_path);
    let stop = stop_shm.u32_word();
    let client = Client::attach(&path).expect("attach to the handoff region");
    let class = client.class("handoff").unwrap();
    let tickets = class_tickets(&client, "handoff");
    let req = Request::new();
    loop {
        let permit = match class.acquire(&req, Duration::from_secs(10)) {
            Ok(Outcome::Admitted(p)) => p,
            other => panic!("the handoff partner was not granted: {other:?}"),
        };
        // Acquire: pairs with the parent's Release store of 1.
        if stop.load(Ordering::Acquire) != 0 {
            return;
        }
        until_queued(tickets, stop);
        drop(permit);
    }
}

/// `sluice_handoff`: one permit of a `max_in_flight = 1` class ping-ponged
/// between this process and a partner through `acquire`. One round trip:
/// wait until the partner's ticket is queued, release (the release grants
/// the partner's ticket and wakes it: FUTEX_WAKE on its ticket word), then
/// `acquire`, which queues and sleeps until the partner, woken and holding,
/// sees us queued and releases back. Reported like `futex_pingpong`: one
/// way = round trip / 2. No daemon runs (the releasers dispatch).
fn row_handoff(plan: &Plan, rows: &mut Vec<Row>) {
    let dir = tempfile::Builder::new()
        .prefix("sluice-bench-handoff-")
        .tempdir_in(common::shm_dir())
        .unwrap();
    let path = dir.path().join("region");
    let config = sluice_daemon::config::Config::parse(HANDOFF_CONFIG, "handoff")
        .expect("HANDOFF_CONFIG is a valid config");
    let owned = sluice_daemon::region::open_region(&path, &config, monotonic_ns())
        .expect("a fresh region in a private temp dir");
    let stop_shm = ShmFile::create("handoff-stop");
    let stop = stop_shm.u32_word();
    let client = Client::attach(&path).unwrap();
    let class = client.class("handoff").unwrap();
    let tickets = class_tickets(&client, "handoff");
    let req = Request::new();
    let mut held = Some(
        class
            .try_acquire(&req)
            .unwrap()
            .permit()
            .expect("the slot is free before the partner starts"),
    );
    let mut partner = self_command("handoff_partner")
        .env(PATH_ENV, &path)
        .env(STOP_ENV, &stop_shm.path)
        .spawn()
        .expect("the bench can start its handoff partner");
    let mut op = |n: u64| {
        for _ in 0..n {
            until_queued(tickets, stop);
            drop(held.take());
            match class.acquire(&req, Duration::from_secs(10)) {
                Ok(Outcome::Admitted(p)) => held = Some(p),
                other => panic!("the handoff partner stopped answering: {other:?}"),
            }
        }
        0
    };
    let start = monotonic_ns() + plan.warm.as_nanos() as u64;
    let end = start + plan.measure.as_nanos() as u64;
    let m = measure(&mut op, start, end);
    rows.push(Row::from_measured("sluice_handoff", 2, vec![m], 2.0));
    // Release: the partner's acquire is granted, it sees the stop word and
    // exits.
    stop.store(1, Ordering::Release);
    drop(held);
    let _ = partner.wait();
    drop(client);
    drop(owned);
}

/// `part_decide_*`: `admit::decide` (shape check, slot claim, bucket take)
/// and the slot release, with the class limits loaded once outside the loop
/// and no client around it. With `epoch` the clock is read each time, as
/// the client does for a class with a rate.
fn op_decide<'a>(
    rec: &'a sluice_shm_layout::layout::ClassRecord,
    words: &'a [AtomicU64],
    epoch: Option<u64>,
    tag: u64,
) -> impl FnMut(u64) -> u64 + 'a {
    use sluice_shm_layout::admit::{self, Admission, Ask, ClassParams};
    use sluice_shm_layout::bucket::ns_to_units;
    use sluice_shm_layout::slots;

    let params = ClassParams::load(rec);
    let ask = Ask { cost: 1, lane: 1 };
    move |n| {
        let mut refused = 0;
        for _ in 0..n {
            let now = epoch.map_or(0, |e| ns_to_units(raw_monotonic_ns().saturating_sub(e)));
            match admit::decide(&params, &rec.tat.value, words, ask, now, tag) {
                Admission::Admitted { slots: g, .. } => {
                    if g.count > 0 {
                        slots::release(words, &g, tag);
                    }
                }
                Admission::Refused { .. } => refused += 1,
            }
        }
        refused
    }
}

/// The per-op breakdown: the pieces of the sluice fast path measured one by
/// one, so a miss can be explained. Named `part_*`; printed in their own
/// table.
fn rows_breakdown(plan: &Plan, rows: &mut Vec<Row>) {
    use sluice_shm_layout::admit::ClassParams;
    use sluice_shm_layout::slots;

    rows.push(plan.local("part_clock_read", &mut |n| {
        for _ in 0..n {
            black_box(raw_monotonic_ns());
        }
        0
    }));

    let shm = ShmFile::create("parts");
    let counter = shm.u64_word();
    rows.push(plan.local("part_counter_add", &mut |n| {
        for _ in 0..n {
            // Relaxed, as `counters::bump`.
            counter.fetch_add(1, Ordering::Relaxed);
        }
        0
    }));
    let shm2 = ShmFile::create("parts2");
    let mut pair = op_cas_pair(shm2.u64_word());
    rows.push(plan.local("part_cas_pair_counter", &mut |n| {
        for _ in 0..n {
            pair(1);
            counter.fetch_add(1, Ordering::Relaxed);
        }
        0
    }));
    let name = String::from("slots");
    rows.push(plan.local("part_string_clone", &mut |n| {
        for _ in 0..n {
            drop(black_box(black_box(&name).clone()));
        }
        0
    }));

    let region = common::bench_region();
    let client = Client::attach(region.path()).unwrap();
    let tag = client.owner().expect("attached").tag(1);
    let r = client.region_map().expect("attached").region();
    let epoch = r.epoch_ns();
    let class = |name: &str| {
        let idx = client.class(name).unwrap().index();
        let rec = r.class(idx).expect("the class record exists");
        // Relaxed: fixed while the class lives; nothing else changes here.
        let (base, len) = (
            rec.slot_base.load(Ordering::Relaxed),
            rec.slot_len.load(Ordering::Relaxed),
        );
        (
            rec,
            r.slots(base, len)
                .expect("the class's slots are in the table"),
        )
    };
    let (slots_rec, slot_words) = class("slots");
    rows.push(plan.local("part_params_load", &mut |n| {
        for _ in 0..n {
            black_box(ClassParams::load(black_box(slots_rec)));
        }
        0
    }));
    rows.push(plan.local("part_layout_slots", &mut |n| {
        let mut refused = 0;
        for _ in 0..n {
            match slots::claim(slot_words, 64, 64, 1, tag) {
                Some(g) => {
                    slots::release(slot_words, &g, tag);
                }
                None => refused += 1,
            }
        }
        refused
    }));
    rows.push(plan.local(
        "part_decide_slots",
        &mut op_decide(slots_rec, slot_words, None, tag),
    ));
    let (rate_rec, rate_words) = class("rate");
    rows.push(plan.local(
        "part_decide_rate",
        &mut op_decide(rate_rec, rate_words, Some(epoch), tag),
    ));
    let (both_rec, both_words) = class("both");
    rows.push(plan.local(
        "part_decide_both",
        &mut op_decide(both_rec, both_words, Some(epoch), tag),
    ));
    drop(client);
    drop(region);
}

// ---------------------------------------------------------------------------
// How cost grows: classes configured, processes running, slots per class
// ---------------------------------------------------------------------------

/// The `scale_classes_*` rows: (classes configured, row of the `slots`-like
/// class, row of the `both`-like class). 4,096 is `limits::MAX_CLASSES`.
const SCALE_CLASSES: [(u32, &str, &str); 4] = [
    (1, "scale_classes_1", "scale_both_classes_1"),
    (16, "scale_classes_16", "scale_both_classes_16"),
    (256, "scale_classes_256", "scale_both_classes_256"),
    (4_096, "scale_classes_4096", "scale_both_classes_4096"),
];

/// Process counts of the `scale_procs_slots` rows.
const SCALE_PROCS: [u32; 3] = [1, 2, 4];

/// The `scale_in_flight_*` rows: `max_in_flight` of a one-class region.
const SCALE_IN_FLIGHT: [(u32, &str); 3] = [
    (64, "scale_in_flight_64"),
    (1_024, "scale_in_flight_1024"),
    (16_384, "scale_in_flight_16384"),
];

/// Client records of a scaling region: the parent, four workers, spare.
const SCALE_CLIENTS: u32 = 8;

/// Ticket records one class with `queue_depth = 1` reserves: 4 lanes x 2 x
/// 1, plus the pool of 64 (see the daemon's `ticket_records`).
const SCALE_TICKETS_PER_CLASS: u32 = 4 * 2 + 64;

/// The rate limits of the `both`-like measured class (the bench class
/// `both`'s).
const SCALE_RATE: &str = "rate = 1e9\nburst = 1000000000\n";

/// The measured class of a scaling region.
#[derive(Clone, Copy)]
struct Measured1 {
    /// Its `max_in_flight`.
    max_in_flight: u32,
    /// A rate as well (the `both` class) or slots only (`slots`).
    rate: bool,
}

/// A config of `classes` classes named `c0`, `c1`, ...: the last one is
/// `m`, every other the smallest a class can be (`max_in_flight = 1`: one
/// slot word). All have `queue_depth = 1`; tickets are exactly what the
/// classes need. With `reserve` the slot table has twice the slots the
/// classes need, so the daemon gives every class its reload reserve (twice
/// `max_in_flight` words), as it does whenever `capacity.slots` has room to
/// spare (the default 65,536 nearly always has); without, exactly what they
/// need and no reserve.
fn scale_config(classes: u32, m: Measured1, reserve: bool) -> String {
    let need = m.max_in_flight + (classes - 1);
    let mut text = String::with_capacity(48 * classes as usize + 256);
    let _ = writeln!(
        text,
        "[daemon]\ncapacity = {{ classes = {classes}, clients = {SCALE_CLIENTS}, \
         tickets = {}, slots = {} }}\n\n[region]\nmode = \"0600\"\n",
        classes * SCALE_TICKETS_PER_CLASS,
        if reserve { 2 * need } else { need },
    );
    for i in 0..classes {
        let _ = write!(text, "[classes.c{i}]\nqueue_depth = 1\n");
        if i + 1 == classes {
            let rate = if m.rate { SCALE_RATE } else { "" };
            let _ = writeln!(text, "{rate}max_in_flight = {}\n", m.max_in_flight);
        } else {
            let _ = writeln!(text, "max_in_flight = 1\n");
        }
    }
    text
}

/// A region laid out from `config_text` by the daemon's own code in a
/// private temp dir under /dev/shm, as `common::bench_region` does. Drop
/// the region before the directory.
fn scale_region(
    config_text: &str,
    tag: &str,
) -> (
    sluice_daemon::region::OwnedRegion,
    PathBuf,
    tempfile::TempDir,
) {
    let dir = tempfile::Builder::new()
        .prefix("sluice-bench-scale-")
        .tempdir_in(common::shm_dir())
        .unwrap();
    let path = dir.path().join("region");
    let config = sluice_daemon::config::Config::parse(config_text, tag)
        .unwrap_or_else(|e| panic!("the {tag} scaling config is valid: {e:?}"));
    let owned = sluice_daemon::region::open_region(&path, &config, monotonic_ns())
        .expect("a fresh region in a private temp dir");
    (owned, path, dir)
}

/// Measure the `sluice_*` operation, one process, on the last class of a
/// region laid out from `scale_config(classes, m, reserve)`.
fn scale_row(plan: &Plan, name: &'static str, classes: u32, m: Measured1, reserve: bool) -> Row {
    let (owned, path, dir) = scale_region(&scale_config(classes, m, reserve), name);
    let bytes = std::fs::metadata(&path).map_or(0, |md| md.len());
    let last = format!("c{}", classes - 1);
    let mut row = with_sluice(&path, &last, |op| plan.local(name, op));
    row.note = Some(format!(
        "{classes} cl, max {}{}, region {:.1} MB",
        m.max_in_flight,
        if reserve {
            " (+reserve)"
        } else {
            ", no reserve"
        },
        bytes as f64 / 1e6
    ));
    drop(owned);
    drop(dir);
    row
}

/// The scaling rows.
///
/// - `scale_classes_N` / `scale_both_classes_N`: the `sluice_slots` /
///   `sluice_both` operation on the last class (64 slots; `both` adds the
///   bench rate) of a region with N classes configured, the others idle;
///   one process; every class with its reload reserve, as the bench
///   `slots` class has. Flat across N is the goal: the fast path touches
///   the one class record, its slot words and the client's counter block
///   for that class, wherever they sit.
/// - `scale_reserve_none`: `scale_classes_1` without the reserve (the slot
///   table exactly full), to show what the reserve costs.
/// - `scale_in_flight_M`: one class of `max_in_flight = M` with its
///   reserve: a grant from a class whose slot range is larger than its
///   limit counts every held word of the range (`admit::decide`), so this
///   grows with M.
/// - `scale_procs_slots`: the `sluice_slots` operation in 1, 2 and 4 worker
///   processes at once, each on a class of its own (`p0`..`p3`, 64 slots
///   and the reserve each) of one region; workers pinned round-robin to the
///   CPUs. Flat median and ops/s growing with min(procs, CPUs) is the goal.
fn rows_scale(plan: &Plan, rows: &mut Vec<Row>) {
    let slots64 = Measured1 {
        max_in_flight: 64,
        rate: false,
    };
    let both64 = Measured1 {
        max_in_flight: 64,
        rate: true,
    };
    for (classes, slots_row, both_row) in SCALE_CLASSES {
        rows.push(scale_row(plan, slots_row, classes, slots64, true));
        rows.push(scale_row(plan, both_row, classes, both64, true));
    }
    rows.push(scale_row(plan, "scale_reserve_none", 1, slots64, false));
    for (max_in_flight, name) in SCALE_IN_FLIGHT {
        let m = Measured1 {
            max_in_flight,
            rate: false,
        };
        rows.push(scale_row(plan, name, 1, m, true));
    }

    let mut text = format!(
        "[daemon]\ncapacity = {{ classes = 4, clients = {SCALE_CLIENTS}, tickets = {}, \
         slots = 512 }}\n\n[region]\nmode = \"0600\"\n",
        4 * SCALE_TICKETS_PER_CLASS
    );
    for i in 0..4 {
        let _ = writeln!(
            text,
            "[classes.p{i}]\nmax_in_flight = 64\nqueue_depth = 1\n"
        );
    }
    let (owned, path, dir) = scale_region(&text, "scale_procs");
    for n in SCALE_PROCS {
        let mut r = plan.n_procs("scale_procs_slots", "sluice_class", &path, n, |i, cmd| {
            cmd.env(CLASS_ENV, format!("p{i}"));
        });
        if r.note.is_none() {
            r.note = Some("one class per process (+reserve)".to_string());
        }
        rows.push(r);
    }
    drop(owned);
    drop(dir);
}

/// How the scaling rows compare with their smallest case.
fn print_scaling(rows: &[Row]) {
    let median_of = |name: &str, procs: u32| {
        rows.iter()
            .find(|r| r.name == name && r.procs == procs)
            .and_then(|r| r.median_ns)
    };
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "-".to_string(),
    };
    println!();
    println!("how cost grows (median over the smallest case; ops/s over 1 process):");
    for (idx, label) in [(1, "sluice_slots"), (2, "sluice_both")] {
        let name = |c: &(u32, &'static str, &'static str)| if idx == 1 { c.1 } else { c.2 };
        let base = median_of(name(&SCALE_CLASSES[0]), 1);
        let mut line = format!("  {label:<13} classes:");
        for c in &SCALE_CLASSES {
            let _ = write!(line, "  {} -> {}", c.0, ratio(median_of(name(c), 1), base));
        }
        println!("{line}");
    }
    let base = median_of(SCALE_IN_FLIGHT[0].1, 1);
    let mut line = "  sluice_slots  max_in_flight:".to_string();
    for (m, name) in SCALE_IN_FLIGHT {
        let _ = write!(line, "  {m} -> {}", ratio(median_of(name, 1), base));
    }
    println!("{line}");
    println!(
        "  sluice_slots  reserve: with / without = {}",
        ratio(
            median_of(SCALE_CLASSES[0].1, 1),
            median_of("scale_reserve_none", 1)
        )
    );
    let ops = |n| find(rows, "scale_procs_slots", n).and_then(|r| r.ops_per_sec);
    let mut line = "  sluice_slots  procs (own class each):".to_string();
    for n in SCALE_PROCS {
        let _ = write!(
            line,
            "  {n} -> ops/s x{}, median {}",
            ratio(ops(n), ops(1)),
            fmt_opt(median_of("scale_procs_slots", n), 1)
        );
    }
    println!("{line}");
}

// ---------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------

/// Which table a row is printed in: 0 the comparison, 1 the scaling rows,
/// 2 the breakdown.
fn section(name: &str) -> u8 {
    if name.starts_with("part_") {
        2
    } else if name.starts_with("scale_") {
        1
    } else {
        0
    }
}

fn find<'r>(rows: &'r [Row], name: &str, procs: u32) -> Option<&'r Row> {
    rows.iter().find(|r| r.name == name && r.procs == procs)
}

fn median(rows: &[Row], name: &str) -> Option<f64> {
    find(rows, name, 1).and_then(|r| r.median_ns)
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.digits$}"))
}

/// Print `rows`; the ratio columns divide by the procs = 1 medians of
/// `floor_cas_pair` and `posix_sem` found in `all`.
fn print_table(rows: &[Row], all: &[Row]) {
    let cas1 = median(all, "floor_cas_pair");
    let sem1 = median(all, "posix_sem");
    println!(
        "{:<22} {:>5} {:>11} {:>11} {:>14} {:>8} {:>8} {:>6} {:>8}  note",
        "name", "procs", "median ns", "p99 ns", "ops/s", "x cas", "x sem", "batch", "preempt"
    );
    for r in rows {
        let ratio = |base: Option<f64>| match (r.median_ns, base) {
            (Some(m), Some(b)) if b > 0.0 => format!("{:.2}", m / b),
            _ => "-".to_string(),
        };
        let mut note = r.note.clone().unwrap_or_default();
        if r.refused > 0 {
            let _ = write!(
                note,
                "{}refused {}",
                if note.is_empty() { "" } else { "; " },
                r.refused
            );
        }
        println!(
            "{:<22} {:>5} {:>11} {:>11} {:>14} {:>8} {:>8} {:>6} {:>8}  {}",
            r.name,
            r.procs,
            fmt_opt(r.median_ns, 1),
            fmt_opt(r.p99_ns, 1),
            fmt_opt(r.ops_per_sec, 0),
            ratio(cas1),
            ratio(sem1),
            r.batch,
            r.preempted,
            note
        );
    }
}

/// One target ratio: (label, value, bound, true when lower is better).
struct Target {
    label: &'static str,
    value: Option<f64>,
    bound: f64,
    at_most: bool,
}

fn targets(rows: &[Row]) -> Vec<Target> {
    let m = |n| median(rows, n);
    let div = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let sum = |a: Option<f64>, b: Option<f64>| Some(a? + b?);
    let tput = |n| find(rows, n, 2).and_then(|r| r.ops_per_sec);
    vec![
        Target {
            label: "sluice_slots / posix_sem",
            value: div(m("sluice_slots"), m("posix_sem")),
            bound: 1.05,
            at_most: true,
        },
        Target {
            label: "sluice_slots / floor_cas_pair",
            value: div(m("sluice_slots"), m("floor_cas_pair")),
            bound: 1.3,
            at_most: true,
        },
        Target {
            label: "sluice_rate / governor_monotonic",
            value: div(m("sluice_rate"), m("governor_monotonic")),
            bound: 1.0,
            at_most: true,
        },
        Target {
            label: "sluice_rate / floor_gcra",
            value: div(m("sluice_rate"), m("floor_gcra")),
            bound: 1.3,
            at_most: true,
        },
        Target {
            label: "sluice_both / (governor_monotonic + posix_sem)",
            value: div(
                m("sluice_both"),
                sum(m("governor_monotonic"), m("posix_sem")),
            ),
            bound: 1.0,
            at_most: true,
        },
        Target {
            label: "procs=2 sluice_handoff / futex_pingpong",
            value: div(
                find(rows, "sluice_handoff", 2).and_then(|r| r.median_ns),
                find(rows, "futex_pingpong", 2).and_then(|r| r.median_ns),
            ),
            bound: 1.3,
            at_most: true,
        },
        Target {
            label: "unix_socket_rpc / sluice_both",
            value: div(m("unix_socket_rpc"), m("sluice_both")),
            bound: 100.0,
            at_most: false,
        },
        Target {
            label: "procs=2 ops/s sluice_slots / posix_sem",
            value: div(tput("sluice_slots"), tput("posix_sem")),
            bound: 1.0 / 1.05,
            at_most: false,
        },
    ]
}

fn print_targets(ts: &[Target]) {
    println!();
    println!("target ratios (medians, procs = 1 unless stated):");
    for t in ts {
        let verdict = match t.value {
            Some(v) if (t.at_most && v <= t.bound) || (!t.at_most && v >= t.bound) => "PASS",
            Some(_) => "MISS",
            None => "n/a",
        };
        let op = if t.at_most { "<=" } else { ">=" };
        println!(
            "  {:<48} {:>9}  (target {op} {:.2})  {verdict}",
            t.label,
            fmt_opt(t.value, 3),
            t.bound
        );
    }
}

/// The cargo target directory: `$CARGO_TARGET_DIR`, else the nearest
/// ancestor of this executable named `target` or holding `CACHEDIR.TAG`.
fn target_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CARGO_TARGET_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("the bench knows its own executable");
    exe.ancestors()
        .skip(1)
        .find(|a| a.file_name().is_some_and(|n| n == "target") || a.join("CACHEDIR.TAG").is_file())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("target"))
}

/// The first three fields of /proc/loadavg: other load skews every row, and
/// two-process rows most.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Facts about the run that go into the JSON beside the rows.
struct RunInfo {
    quick: bool,
    load_before: String,
    load_after: String,
}

fn write_json(rows: &[Row], ts: &[Target], plan: &Plan, info: &RunInfo) -> PathBuf {
    let json_rows: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            let mut v = serde_json::json!({
                "name": r.name,
                "procs": r.procs,
                "median_ns": r.median_ns,
                "p99_ns": r.p99_ns,
                "ops_per_sec": r.ops_per_sec,
                "samples": r.samples,
                "batch": r.batch,
                "refused": r.refused,
                "preempted": r.preempted,
            });
            if let Some(n) = &r.note {
                v["note"] = serde_json::Value::from(n.as_str());
            }
            v
        })
        .collect();
    let json_targets: Vec<serde_json::Value> = ts
        .iter()
        .map(|t| serde_json::json!({ "ratio": t.label, "value": t.value, "bound": t.bound, "at_most": t.at_most }))
        .collect();
    let doc = serde_json::json!({
        "rows": json_rows,
        "targets": json_targets,
        "quick": info.quick,
        "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "loadavg_before": info.load_before,
        "loadavg_after": info.load_after,
        "measure_s": plan.measure.as_secs_f64(),
        "warm_s": plan.warm.as_secs_f64(),
    });
    let dir = target_dir();
    let _ = std::fs::create_dir_all(&dir);
    let path = dir.join("sluice-bench.json");
    std::fs::write(&path, serde_json::to_string_pretty(&doc).unwrap() + "\n").unwrap();
    path
}

fn main() {
    if let Ok(role) = std::env::var(ROLE_ENV) {
        match role.as_str() {
            "rpc_server" => rpc_server(),
            "futex_partner" => futex_partner(),
            "handoff_partner" => handoff_partner(),
            _ => worker(&role),
        }
        return;
    }
    // cargo passes `--bench`; the only flag of our own is `--quick`.
    let quick = std::env::args().any(|a| a == "--quick");
    let plan = if quick {
        Plan {
            warm: Duration::from_millis(50),
            measure: Duration::from_millis(300),
        }
    } else {
        Plan {
            warm: Duration::from_millis(200),
            measure: Duration::from_millis(1500),
        }
    };
    println!(
        "sluice compare: {} ms per row after {} ms warm-up{}",
        plan.measure.as_millis(),
        plan.warm.as_millis(),
        if quick { " (--quick)" } else { "" }
    );

    let load_before = loadavg();
    let mut rows = Vec::new();
    row_floor_cas_pair(&plan, &mut rows);
    row_floor_gcra(&plan, &mut rows);
    rows_sluice(&plan, &mut rows);
    row_posix_sem(&plan, &mut rows);
    rows_governor(&plan, &mut rows);
    row_mutex(&plan, &mut rows);
    row_flock(&plan, &mut rows);
    row_sysv(&plan, &mut rows);
    row_unix_rpc(&plan, &mut rows);
    row_handoff(&plan, &mut rows);
    row_futex(&plan, &mut rows);
    rows_scale(&plan, &mut rows);
    rows_breakdown(&plan, &mut rows);

    // Table order: the comparison (procs = 1 rows first, then procs = 2),
    // then the scaling rows, then the breakdown; stable otherwise.
    rows.sort_by_key(|r| {
        let s = section(r.name);
        (s, if s == 0 { r.procs } else { 0 })
    });
    let scale = rows
        .iter()
        .position(|r| section(r.name) >= 1)
        .unwrap_or(rows.len());
    let parts = rows
        .iter()
        .position(|r| section(r.name) == 2)
        .unwrap_or(rows.len());
    print_table(&rows[..scale], &rows);
    println!();
    println!("how cost grows: classes configured, processes on classes of their own");
    print_table(&rows[scale..parts], &rows);
    println!();
    println!("breakdown: pieces of the sluice fast path, procs = 1");
    print_table(&rows[parts..], &rows);
    print_scaling(&rows);
    let ts = targets(&rows);
    print_targets(&ts);
    let info = RunInfo {
        quick,
        load_before,
        load_after: loadavg(),
    };
    println!();
    println!(
        "load average before/after: {} / {} on {} cpus",
        info.load_before,
        info.load_after,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let path = write_json(&rows, &ts, &plan, &info);
    println!("wrote {}", path.display());
}
