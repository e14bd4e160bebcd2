//! A client process for the tenant-insert race in `tests/policy.rs`: two
//! of these ask for the same brand-new tenant key at the same moment, round
//! after round, so that both try to insert it into the tenant table at once.
//!
//! ```text
//! tenant_racer region=PATH class=NAME go=PATH
//! ```
//!
//! It reads rounds from stdin, one line each: `ROUND KEY`. For each it
//! prints `ready ROUND`, then spins (no sleep) until the file `go` holds a
//! little-endian u64 of at least `ROUND`, then makes one `try_acquire` for
//! tenant `KEY` and prints `ROUND admitted` or `ROUND refused REASON`. The
//! test releases both racers of a round with one write to `go`, so both
//! leave the spin within a few microseconds of each other: the race is made
//! to happen, not hoped for. End of input ends the process.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufRead, Write};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use sluice_client::{Client, Decision, Request};

/// The longest a racer spins for its go signal before it gives up.
const SPIN_LIMIT: Duration = Duration::from_secs(30);

fn main() {
    let args: HashMap<String, String> = std::env::args()
        .skip(1)
        .filter_map(|a| a.split_once('=').map(|(k, v)| (k.into(), v.into())))
        .collect();
    let need = |k: &str| {
        args.get(k)
            .unwrap_or_else(|| panic!("tenant_racer needs {k}=..."))
            .clone()
    };
    let client = Client::attach(need("region")).unwrap();
    let class = client.class(&need("class")).unwrap();
    let go = File::open(need("go")).unwrap();

    let stdin = std::io::stdin();
    let mut out = std::io::stdout().lock();
    for line in stdin.lock().lines() {
        let line = line.unwrap();
        let Some((round, key)) = line.split_once(' ') else {
            continue;
        };
        let round: u64 = round.parse().unwrap();
        writeln!(out, "ready {round}").unwrap();
        out.flush().unwrap();

        let started = Instant::now();
        let mut word = [0u8; 8];
        loop {
            go.read_exact_at(&mut word, 0).unwrap();
            if u64::from_le_bytes(word) >= round {
                break;
            }
            assert!(
                started.elapsed() < SPIN_LIMIT,
                "round {round}: no go signal within {SPIN_LIMIT:?}"
            );
            std::hint::spin_loop();
        }

        match class.try_acquire(&Request::new().tenant(key)).unwrap() {
            Decision::Admitted(permit) => {
                drop(permit);
                writeln!(out, "{round} admitted").unwrap();
            }
            Decision::Refused(no) => writeln!(out, "{round} refused {}", no.reason).unwrap(),
        }
        out.flush().unwrap();
    }
}
