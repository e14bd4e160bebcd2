//! A client process for the fault-injection tests (`tests/fault_injection.rs`):
//! something to `kill -9` at a random instruction while it holds, asks for,
//! waits for, releases or cancels permits.
//!
//! ```text
//! chaos_client MODE region=PATH class=NAME [key=value ...]
//! ```
//!
//! Modes:
//!
//! - `storm`: loop for ever (until killed) doing random operations on the
//!   class, drawn from a seeded xorshift (`seed`): `try_acquire`, hold a few
//!   ms, release (plain, or `release_with` a random outcome); `acquire` with
//!   a wait of up to `wait_ms`; `enqueue` and cancel the ticket after a
//!   random delay; a cost of 1 or 2 now and then. Every error is counted,
//!   never unwrapped: it is the kill that ends this process.
//! - `hold`: take `want` slots with `want` requests of cost 1 (or fewer if
//!   the class is full), print `held N` on stdout, and keep them until
//!   stdin closes; then release them, print `released N` and exit 0.
//! - `tight`: `try_acquire` and release as fast as possible for `secs`
//!   seconds, then print one line of tallies and exit 0. Errors (a corrupt
//!   class record, a class gone) are counted, not fatal.
//!
//! Exit codes: 0 done; 2 could not attach or look the class up; 3 bad
//! arguments. A signal is never caught: the tests read it as a crash.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use sluice_client::{Client, Decision, Enqueued, Outcome, Permit, Request, WorkOutcome};

/// xorshift64: a tiny seeded generator; enough to pick operations and
/// delays, and the same seed replays the same choices.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform-ish in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn usage(msg: &str) -> ! {
    eprintln!("chaos_client: {msg}");
    eprintln!("usage: chaos_client storm|hold|tight region=PATH class=NAME [key=value ...]");
    std::process::exit(3);
}

struct Args(HashMap<String, String>);

impl Args {
    fn str(&self, k: &str) -> &str {
        match self.0.get(k) {
            Some(v) => v,
            None => usage(&format!("{k}= is required")),
        }
    }

    fn num(&self, k: &str, default: u64) -> u64 {
        match self.0.get(k) {
            None => default,
            Some(v) => v
                .parse()
                .unwrap_or_else(|_| usage(&format!("{k}={v}: a whole number"))),
        }
    }
}

/// Spin for `us` microseconds: sub-tick delays a sleep would round up.
fn spin_for(us: u64) {
    let until = Instant::now() + Duration::from_micros(us);
    while Instant::now() < until {
        std::hint::spin_loop();
    }
}

/// Hold a permit for a random short while, then give it back one of the
/// four ways a holder can.
fn hold_and_release(rng: &mut Rng, permit: Permit<'_>) {
    match rng.below(3) {
        0 => spin_for(rng.below(300)),
        _ => std::thread::sleep(Duration::from_micros(rng.below(4_000))),
    }
    match rng.below(6) {
        0 => permit.release_with(WorkOutcome::Completed),
        1 => permit.release_with(WorkOutcome::Failed),
        2 => permit.release_with(WorkOutcome::Partial(1)),
        3 => permit.release_with(WorkOutcome::Cancelled),
        4 => permit.release(),
        _ => drop(permit),
    }
}

fn storm(args: &Args, client: &Client) {
    let class = match client.class(args.str("class")) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("chaos_client: {e}");
            std::process::exit(2);
        }
    };
    let mut rng = Rng::new(args.num("seed", 1));
    let max_wait = args.num("wait_ms", 20).max(1);
    loop {
        let cost = if rng.below(8) == 0 { 2 } else { 1 };
        let req = Request::new().cost(cost);
        match rng.below(4) {
            0 | 1 => {
                if let Ok(Decision::Admitted(p)) = class.try_acquire(&req) {
                    hold_and_release(&mut rng, p);
                }
            }
            2 => {
                let wait = Duration::from_millis(rng.below(max_wait) + 1);
                if let Ok(Outcome::Admitted(p)) = class.acquire(&req, wait) {
                    hold_and_release(&mut rng, p);
                }
            }
            _ => {
                let wait = Duration::from_millis(max_wait);
                match class.enqueue(&req, wait) {
                    Ok(Enqueued::Queued(ticket)) => {
                        spin_for(rng.below(2_000));
                        if let Outcome::Admitted(p) = ticket.cancel() {
                            hold_and_release(&mut rng, p);
                        }
                    }
                    Ok(Enqueued::Done(Outcome::Admitted(p))) => hold_and_release(&mut rng, p),
                    Ok(Enqueued::Done(_)) | Err(_) => {}
                }
            }
        }
    }
}

fn hold(args: &Args, client: &Client) {
    let class = match client.class(args.str("class")) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("chaos_client: {e}");
            std::process::exit(2);
        }
    };
    let want = args.num("want", 1);
    let mut held = Vec::new();
    for _ in 0..want {
        if let Ok(Decision::Admitted(p)) = class.try_acquire(&Request::new()) {
            held.push(p);
        }
    }
    let n = held.len();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "held {n}");
    let _ = out.flush();
    // Block until the test closes our stdin (or kills us).
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    for p in held {
        p.release();
    }
    let _ = writeln!(out, "released {n}");
    let _ = out.flush();
}

fn tight(args: &Args, client: &Client) {
    let class = match client.class(args.str("class")) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("chaos_client: {e}");
            std::process::exit(2);
        }
    };
    let until = Instant::now() + Duration::from_secs(args.num("secs", 3));
    let (mut admitted, mut refused, mut errors) = (0u64, 0u64, 0u64);
    let mut last_error = String::new();
    while Instant::now() < until {
        match class.try_acquire(&Request::new()) {
            Ok(Decision::Admitted(p)) => {
                admitted += 1;
                p.release();
            }
            Ok(Decision::Refused(_)) => refused += 1,
            Err(e) => {
                errors += 1;
                last_error = e.to_string();
            }
        }
    }
    println!("admitted={admitted} refused={refused} errors={errors} last_error={last_error:?}");
}

fn main() {
    let mut argv = std::env::args().skip(1);
    let mode = argv.next().unwrap_or_else(|| usage("no mode"));
    let args = Args(
        argv.map(|a| match a.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => usage(&format!("{a}: arguments are key=value")),
        })
        .collect(),
    );
    let client = match Client::attach(args.str("region")) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("chaos_client: {e}");
            std::process::exit(2);
        }
    };
    match mode.as_str() {
        "storm" => storm(&args, &client),
        "hold" => hold(&args, &client),
        "tight" => tight(&args, &client),
        other => usage(&format!("unknown mode {other:?}")),
    }
}
