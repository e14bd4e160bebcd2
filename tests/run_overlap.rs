//! Many concurrent `sluice run` processes on a class with `max_in_flight = 2`:
//! never more than two commands run at once, every other process exits 75
//! (`not_now`) without running its command, and `sluice stats` counts exactly
//! what happened, before and after the daemon folds the exited clients'
//! counters.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::Duration;

use common::{code, collect_within, num, poll, refused, stderr, Daemon, WATCHDOG};
use sluice_client::RegionMap;
use sluice_shm_layout::layout::CLIENT_FREE;
use sluice_shm_layout::registry::ClientState;
use sluice_shm_layout::sync::Ordering;

const CONFIG: &str = "\
[daemon]
capacity = { classes = 16, clients = 64, tickets = 65536, slots = 4096 }

[classes.two]
max_in_flight = 2
";

/// Processes per wave.
const WAVE: usize = 8;

/// One `sluice run` of the test and the file its command writes.
struct Runner {
    child: Child,
    log: PathBuf,
}

/// How one process ended.
struct Ended {
    out: Output,
    log: PathBuf,
}

/// The shell command: append a start time, wait for `gate` (if any, at most
/// 30 s), hold the permit ~200 ms, append an end time. `date +%s%N` is the
/// wall clock; it only orders intervals on this one host.
fn script(log: &Path, gate: Option<&Path>) -> String {
    let wait = match gate {
        Some(g) => format!(
            "n=0; while [ ! -e {g} ] && [ $n -lt 3000 ]; do sleep 0.01; n=$((n+1)); done; ",
            g = g.display()
        ),
        None => String::new(),
    };
    format!(
        "echo start $(date +%s%N) >> {log}; {wait}sleep 0.2; echo end $(date +%s%N) >> {log}",
        log = log.display()
    )
}

fn spawn_wave(d: &Daemon, wave: usize, gate: Option<&Path>) -> Vec<Runner> {
    (0..WAVE)
        .map(|i| {
            let log = d.dir().join(format!("interval.{wave}.{i}"));
            let child = d
                .sluice_cmd(&[
                    "run",
                    "--class",
                    "two",
                    "--",
                    "sh",
                    "-c",
                    &script(&log, gate),
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            Runner { child, log }
        })
        .collect()
}

fn finish(runners: Vec<Runner>) -> Vec<Ended> {
    runners
        .into_iter()
        .map(|r| Ended {
            out: collect_within(r.child, WATCHDOG, "sluice run"),
            log: r.log,
        })
        .collect()
}

/// Checks each process's outcome; returns its interval when it ran.
fn outcome(e: &Ended) -> Option<(u128, u128)> {
    match code(&e.out) {
        0 => {
            let text = std::fs::read_to_string(&e.log).expect("a process that ran wrote its file");
            let mut start = None;
            let mut end = None;
            for line in text.lines() {
                match line.split_once(' ') {
                    Some(("start", t)) => start = Some(t.trim().parse::<u128>().unwrap()),
                    Some(("end", t)) => end = Some(t.trim().parse::<u128>().unwrap()),
                    _ => panic!("unexpected line {line:?} in {}", e.log.display()),
                }
            }
            let (start, end) = (start.expect("a start time"), end.expect("an end time"));
            assert!(
                start <= end,
                "{}: start {start} after end {end}",
                e.log.display()
            );
            Some((start, end))
        }
        75 => {
            assert!(
                !e.log.exists(),
                "a refused process ran its command: {}",
                e.log.display()
            );
            let err = stderr(&e.out);
            assert!(err.contains("not_now"), "refusal reason on stderr: {err}");
            None
        }
        other => panic!("sluice run exited {other}; stderr: {}", stderr(&e.out)),
    }
}

/// The most intervals open at one instant (an end and a start at the same
/// nanosecond do not overlap).
fn max_overlap(intervals: &[(u128, u128)]) -> usize {
    let mut events: Vec<(u128, i32)> = intervals
        .iter()
        .flat_map(|&(s, e)| [(s, 1), (e, -1)])
        .collect();
    events.sort();
    let (mut open, mut most) = (0i32, 0i32);
    for (_, step) in events {
        open += step;
        most = most.max(open);
    }
    most as usize
}

/// Client records not yet retired by the daemon.
fn unretired_clients(region: &Path) -> usize {
    let map = RegionMap::open(region, false).unwrap();
    let r = map.region();
    (0..r.geometry().caps.clients)
        .filter_map(|i| r.client(i))
        .filter(|c| {
            // Relaxed: a snapshot, polled until it settles.
            ClientState::decode(c.state.load(Ordering::Relaxed)).state != CLIENT_FREE
        })
        .count()
}

#[test]
fn at_most_two_run_at_once_and_stats_count_every_process() {
    let d = Daemon::start(CONFIG);
    let gate = d.dir().join("gate");

    // Wave 1, made to collide: the two processes admitted first hold their
    // permits until the gate opens, and the gate opens only once every other
    // process has been turned away. So exactly two run, six are refused.
    let mut wave1 = spawn_wave(&d, 1, Some(&gate));
    let (exited, held) = poll(
        WATCHDOG,
        "wave 1 to settle: refused ones gone, two holding",
        || {
            let exited = wave1
                .iter_mut()
                .map(|r| r.child.try_wait().unwrap())
                .filter(Option::is_some)
                .count();
            let held = num(&d.class_stats("two"), "in_flight") as usize;
            if exited + held == WAVE {
                Ok((exited, held))
            } else {
                Err((exited, held))
            }
        },
    );
    assert_eq!(
        (exited, held),
        (WAVE - 2, 2),
        "two admitted, the rest refused"
    );
    std::fs::write(&gate, b"").unwrap();
    let wave1 = finish(wave1);

    // Wave 2: no gate, all at once; how many get in is up to the scheduler.
    let wave2 = finish(spawn_wave(&d, 2, None));

    let mut intervals = Vec::new();
    let mut ran = [0usize; 2];
    let mut turned_away = [0usize; 2];
    for (w, ended) in [&wave1, &wave2].into_iter().enumerate() {
        for e in ended {
            match outcome(e) {
                Some(iv) => {
                    intervals.push(iv);
                    ran[w] += 1;
                }
                None => turned_away[w] += 1,
            }
        }
    }
    assert_eq!((ran[0], turned_away[0]), (2, WAVE - 2), "wave 1");
    assert!(
        ran[1] >= 2,
        "wave 2 started with both slots free, so at least two ran"
    );
    let most = max_overlap(&intervals);
    assert!(most <= 2, "{most} commands ran at once: {intervals:?}");

    let (ran, turned_away) = (
        (ran[0] + ran[1]) as u64,
        (turned_away[0] + turned_away[1]) as u64,
    );
    let counted = |two: &serde_json::Value| {
        (
            num(two, "admitted"),
            refused(two, "not_now"),
            num(two, "in_flight"),
        )
    };
    let want = (ran, turned_away, 0);

    // Every client has exited: the counts must add up, whether a client's
    // counters are still in its own block or already folded.
    poll(
        Duration::from_secs(10),
        "stats to count every exited client",
        || {
            let two = d.class_stats("two");
            if counted(&two) == want {
                Ok(())
            } else {
                Err(two)
            }
        },
    );

    // Once the daemon has retired every client record (folding its
    // counters into the class totals), the counts are the same.
    poll(
        Duration::from_secs(10),
        "the daemon to retire every exited client",
        || match unretired_clients(d.region()) {
            0 => Ok(()),
            n => Err(n),
        },
    );
    let two = d.class_stats("two");
    assert_eq!(counted(&two), want, "after folding: {two}");
    assert_eq!(refused(&two, "smaller_scope"), 0, "{two}");
    let again = d.class_stats("two");
    assert_eq!(counted(&again), want, "stable: {again}");
}

#[test]
fn max_overlap_counts_intervals_open_at_once() {
    assert_eq!(max_overlap(&[]), 0);
    assert_eq!(
        max_overlap(&[(0, 10), (10, 20), (20, 30)]),
        1,
        "touching is not overlapping"
    );
    assert_eq!(max_overlap(&[(0, 10), (5, 15), (9, 12), (14, 20)]), 3);
}
