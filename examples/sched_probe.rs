//! A client process for the scheduling tests (`tests/scheduling.rs`): it
//! attaches to a region, asks for a permit the way a test step says, and
//! reports every event as one JSON line on stdout, stamped with
//! CLOCK_MONOTONIC (which every process on the host shares), so a test can
//! order events across processes without timing anything itself.
//!
//! ```text
//! sched_probe MODE region=PATH class=NAME [key=value ...]
//! ```
//!
//! Modes:
//!
//! - `once`: one `enqueue`; prints `queued` (ticket id, position, ETA) if it
//!   waits, then `outcome`. Admitted: holds the permit `hold_ms`, or until
//!   the file `release_file` exists, or until CLOCK_MONOTONIC reaches
//!   `release_at_ns`; then releases and prints `released`. With
//!   `cancel_file`, the owner cancels its own queued ticket once that file
//!   exists (it polls the ticket's state instead of sleeping in `wait`).
//! - `loop`: `acquire`, print `granted`, hold `hold_ms`, release, and at
//!   once again (no sleep, no yield), until the file `stop_file` exists or
//!   `count` grants were made.
//! - `storm`: `iters` times: `enqueue` (wait `wait_ms`), then cancel the
//!   ticket after a random delay below `max_delay_us` (seeded by `seed`);
//!   a grant that won the race is held a few microseconds and released.
//!   Prints one `tallies` line.
//!
//! Common keys: `lane` (default interactive), `cost` (1), `wait_ms` (0),
//! `shift_kib` (map and touch an anonymous area of this size before
//! attaching, so the region lands at another address than in its peers).

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sluice_client::clock::monotonic_ns;
use sluice_client::{
    ClassHandle, Client, Enqueued, Lane, Outcome, Permit, Request, Ticket, TicketState,
};

/// How often the owner looks at its ticket while it may cancel it.
const CANCEL_POLL: Duration = Duration::from_micros(200);

/// Parsed `key=value` arguments.
struct Args(HashMap<String, String>);

impl Args {
    fn str(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str)
    }

    fn num(&self, k: &str, default: u64) -> u64 {
        self.str(k).map_or(default, |v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{k}={v}: a whole number"))
        })
    }

    fn path(&self, k: &str) -> Option<PathBuf> {
        self.str(k).map(PathBuf::from)
    }
}

/// Print one event line, flushed at once (the test reads it while we run).
fn emit(mut v: Value) {
    v["t_ns"] = json!(monotonic_ns());
    v["pid"] = json!(std::process::id());
    let mut out = std::io::stdout().lock();
    writeln!(out, "{v}").unwrap();
    out.flush().unwrap();
}

/// The outcome as an event; returns the permit if admitted.
fn report<'a>(o: Outcome<'a>) -> Option<Permit<'a>> {
    match o {
        Outcome::Admitted(p) => {
            emit(json!({
                "event": "outcome", "outcome": "admitted",
                "ticket": p.ticket_id(), "degraded": p.degraded(), "cost": p.cost(),
            }));
            Some(p)
        }
        Outcome::Refused(r) => {
            emit(json!({
                "event": "outcome", "outcome": "refused", "reason": r.reason.to_string(),
                "retry_after_us": r.retry_after.map(|d| d.as_micros() as u64),
                "largest_cost": r.largest_cost,
            }));
            None
        }
        Outcome::Expired(x) => {
            emit(json!({
                "event": "outcome", "outcome": "expired", "ticket": x.ticket,
                "at_once": x.at_once, "eta_us": x.eta.map(|d| d.as_micros() as u64),
            }));
            None
        }
        Outcome::Cancelled { ticket } => {
            emit(json!({"event": "outcome", "outcome": "cancelled", "ticket": ticket}));
            None
        }
    }
}

/// Map and touch an anonymous area first: the region then sits at another
/// virtual address than in a process that did not (C11).
fn shift_mappings(kib: u64) -> Vec<u8> {
    let mut v = vec![0u8; (kib * 1024) as usize];
    for b in v.iter_mut().step_by(4096) {
        *b = 1;
    }
    v
}

/// Hold a permit as `args` say, then release it.
fn hold(args: &Args, permit: Permit<'_>) {
    let until_file = args.path("release_file");
    let at_ns = args.num("release_at_ns", 0);
    let ms = args.num("hold_ms", 0);
    let start = Instant::now();
    loop {
        if let Some(f) = &until_file {
            if f.exists() {
                break;
            }
        } else if at_ns > 0 {
            // Spin the last stretch so that two holders release together.
            if monotonic_ns() >= at_ns {
                break;
            }
            if at_ns.saturating_sub(monotonic_ns()) > 2_000_000 {
                std::thread::sleep(Duration::from_millis(1));
            }
            continue;
        } else if start.elapsed() >= Duration::from_millis(ms) {
            break;
        }
        std::thread::sleep(Duration::from_millis(1).min(Duration::from_millis(ms.max(1))));
    }
    let ticket = permit.ticket_id();
    let t_release = monotonic_ns();
    permit.release();
    emit(json!({"event": "released", "ticket": ticket, "release_ns": t_release}));
}

/// Wait on a queued ticket; cancel it ourselves once `cancel_file` exists.
fn wait_or_cancel<'a>(ticket: Ticket<'a>, cancel_file: Option<&Path>) -> Outcome<'a> {
    let Some(f) = cancel_file else {
        return ticket.wait();
    };
    loop {
        match ticket.state() {
            TicketState::Queued { .. } if f.exists() => return ticket.cancel(),
            TicketState::Queued { .. } => std::thread::sleep(CANCEL_POLL),
            _ => return ticket.wait(),
        }
    }
}

fn once(args: &Args, class: &ClassHandle<'_>, req: &Request) {
    let wait = Duration::from_millis(args.num("wait_ms", 0));
    let t_ask = monotonic_ns();
    let outcome = match class.enqueue(req, wait).unwrap() {
        Enqueued::Done(o) => o,
        Enqueued::Queued(ticket) => {
            let (position, eta_us) = match ticket.state() {
                TicketState::Queued { position, eta } => {
                    (Some(position), eta.map(|d| d.as_micros() as u64))
                }
                _ => (None, None),
            };
            emit(json!({
                "event": "queued", "ticket": ticket.id(), "position": position,
                "eta_us": eta_us, "ask_ns": t_ask,
            }));
            wait_or_cancel(ticket, args.path("cancel_file").as_deref())
        }
    };
    if let Some(p) = report(outcome) {
        hold(args, p);
    }
}

fn run_loop(args: &Args, class: &ClassHandle<'_>, req: &Request) {
    let stop = args.path("stop_file");
    let count = args.num("count", u64::MAX);
    let hold_for = Duration::from_millis(args.num("hold_ms", 0));
    let wait = Duration::from_millis(args.num("wait_ms", 60_000));
    for n in 0..count {
        if stop.as_ref().is_some_and(|f| f.exists()) {
            break;
        }
        match class.acquire(req, wait).unwrap() {
            Outcome::Admitted(p) => {
                emit(json!({"event": "granted", "n": n}));
                let t0 = Instant::now();
                while t0.elapsed() < hold_for {
                    std::thread::sleep(hold_for - t0.elapsed());
                }
                p.release();
            }
            other => {
                report(other);
            }
        }
    }
    emit(json!({"event": "done"}));
}

/// xorshift64*: a tiny seeded generator, enough for random delays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Spin (never sleep) for `us` microseconds: tiny delays a sleep would
/// round up to a scheduler tick.
fn spin_for(us: u64) {
    let until = monotonic_ns() + us * 1_000;
    while monotonic_ns() < until {
        std::hint::spin_loop();
    }
}

fn storm(args: &Args, class: &ClassHandle<'_>, req: &Request) {
    let iters = args.num("iters", 2_500);
    let wait = Duration::from_millis(args.num("wait_ms", 1_000));
    let max_delay = args.num("max_delay_us", 50).max(1);
    let mut rng = Rng(args.num("seed", 1).max(1));
    let (mut granted, mut cancelled, mut expired, mut refused) = (0u64, 0u64, 0u64, 0u64);
    let (mut granted_at_once, mut won_race) = (0u64, 0u64);
    let mut tally = |o: Outcome<'_>, raced: bool, rng: &mut Rng| match o {
        Outcome::Admitted(p) => {
            granted += 1;
            if raced {
                won_race += 1;
            } else {
                granted_at_once += 1;
            }
            spin_for(rng.next() % 5);
            p.release();
        }
        Outcome::Cancelled { .. } => cancelled += 1,
        Outcome::Expired(_) => expired += 1,
        Outcome::Refused(_) => refused += 1,
    };
    for _ in 0..iters {
        match class.enqueue(req, wait).unwrap() {
            Enqueued::Done(o) => tally(o, false, &mut rng),
            Enqueued::Queued(ticket) => {
                spin_for(rng.next() % max_delay);
                tally(ticket.cancel(), true, &mut rng);
            }
        }
    }
    emit(json!({
        "event": "tallies", "attempts": iters, "granted": granted,
        "granted_at_once": granted_at_once, "won_race": won_race,
        "cancelled": cancelled, "expired": expired, "refused": refused,
    }));
}

fn main() {
    let mut argv = std::env::args().skip(1);
    let mode = argv
        .next()
        .expect("usage: sched_probe once|loop|storm region=PATH class=NAME [key=value ...]");
    let args = Args(
        argv.map(|a| {
            let (k, v) = a
                .split_once('=')
                .unwrap_or_else(|| panic!("{a}: arguments are key=value"));
            (k.to_string(), v.to_string())
        })
        .collect(),
    );
    let _shift = shift_mappings(args.num("shift_kib", 0));
    let region = args.path("region").expect("region=PATH");
    let client = Client::attach(&region).unwrap();
    let class = client
        .class(args.str("class").expect("class=NAME"))
        .unwrap();
    let lane: Lane = args.str("lane").unwrap_or("interactive").parse().unwrap();
    let req = Request::new().lane(lane).cost(args.num("cost", 1));
    emit(
        json!({"event": "attached", "region_at": client.region_map().map(|m| m.region().header() as *const _ as usize)}),
    );
    match mode.as_str() {
        "once" => once(&args, &class, &req),
        "loop" => run_loop(&args, &class, &req),
        "storm" => storm(&args, &class, &req),
        other => panic!("unknown mode {other:?}: once, loop or storm"),
    }
}
