//! Drives one class of one region at a set pace, for the fleet tests: each
//! admitted request is timestamped so the test can count a window exactly.
//!
//! Arguments: region path, class, seconds to run, requests per second
//! (0: as fast as it goes, with a 50 µs pause between refusals). Prints, one
//! per line, `admit <ns since start>` for each admission (CLOCK_MONOTONIC
//! ns), then `refused <reason> <count>` per reason and
//! `slowest_decision_ns <ns>`.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use sluice_client::clock::monotonic_ns;
use sluice_client::{Client, Decision, Request};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let region = &args[0];
    let class = &args[1];
    let seconds: f64 = args[2].parse().expect("seconds: a number");
    let pace: f64 = args[3].parse().expect("requests per second: a number");
    let client = Client::attach(region).unwrap();
    let handle = client.class(class).unwrap();
    let start = Instant::now();
    let gap = (pace > 0.0).then(|| Duration::from_secs_f64(1.0 / pace));
    let mut next = start;
    let mut admits = Vec::new();
    let mut refused: BTreeMap<String, u64> = BTreeMap::new();
    let mut slowest = 0u64;
    while start.elapsed().as_secs_f64() < seconds {
        if let Some(g) = gap {
            let now = Instant::now();
            if now < next {
                std::thread::sleep(next - now);
            }
            next += g;
        }
        let t0 = monotonic_ns();
        let d = handle.try_acquire(&Request::new()).unwrap();
        let t1 = monotonic_ns();
        slowest = slowest.max(t1 - t0);
        match d {
            Decision::Admitted(p) => {
                admits.push(t0);
                drop(p);
            }
            Decision::Refused(no) => {
                *refused.entry(no.reason.to_string()).or_default() += 1;
                if gap.is_none() {
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
        }
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for t in admits {
        writeln!(out, "admit {t}").unwrap();
    }
    for (r, n) in refused {
        writeln!(out, "refused {r} {n}").unwrap();
    }
    writeln!(out, "slowest_decision_ns {slowest}").unwrap();
}
