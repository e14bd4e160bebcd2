//! Criterion benches of the client fast path: `try_acquire` and the permit's
//! release, with no waiter and no daemon.
//!
//! Every bench runs against a real region that the daemon's own code lays out
//! in a temporary directory under `/dev/shm` (see `common/mod.rs`); the
//! process attaches to it with `Client::attach` like any client. The class
//! handle is looked up once, outside the timed code.
//!
//! Run: `cargo bench --bench fast_path -- --warm-up-time 1 --measurement-time 2`.

#![allow(clippy::unwrap_used)]

mod common;

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Bencher, Criterion};
use sluice_client::{ClassHandle, Client, Decision, Request};

/// One fast-path round: decide, then drop the permit (which releases its
/// slots). The decision must be an admission; anything else is a broken
/// bench set-up, not a measurement.
#[inline(always)]
fn admit_and_release(h: &ClassHandle<'_>, req: &Request) {
    match h.try_acquire(req) {
        Ok(Decision::Admitted(permit)) => drop(black_box(permit)),
        other => panic!("the bench class must always admit, got {other:?}"),
    }
}

/// Times `try_acquire` + drop of the permit on one class, one thread, no
/// contention. Included: the request checks, the class generation check, the
/// draining flag, reading the class limits, the slot CAS and/or the
/// CLOCK_MONOTONIC vDSO read and the `tat` CAS, the per-client `admitted`
/// counter bump, the permit's construction and its release CAS. Criterion's
/// loop overhead (well under 1 ns) is also inside.
fn uncontended(b: &mut Bencher<'_>, h: &ClassHandle<'_>) {
    let req = Request::new();
    b.iter(|| admit_and_release(h, &req));
}

/// Times the same round as [`uncontended`] on the calling thread while a
/// second thread of the same process (sharing the one `Client`, so also its
/// counter block and owner tag) runs the same loop on the same class without
/// pause. The second thread is started and seen running before the clock
/// starts, and stopped after it stops: its spawn and join are not timed.
fn two_threads(b: &mut Bencher<'_>, h: &ClassHandle<'_>) {
    let req = Request::new();
    b.iter_custom(|iters| {
        let stop = AtomicBool::new(false);
        let running = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                // Release/Acquire: only a start signal, nothing is published.
                running.store(true, Ordering::Release);
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..64 {
                        admit_and_release(h, &req);
                    }
                }
            });
            while !running.load(Ordering::Acquire) {
                std::hint::spin_loop();
            }
            let start = Instant::now();
            for _ in 0..iters {
                admit_and_release(h, &req);
            }
            let took = start.elapsed();
            stop.store(true, Ordering::Relaxed);
            took
        })
    });
}

/// Times a `try_acquire` that is refused `not_now`: the class has
/// `max_in_flight = 1` and its one slot is held (by a permit taken before
/// the loop). Included: the checks, the scan that finds the slot held
/// (one relaxed load, no CAS), the per-client `refused` counter bump and
/// building the `Refusal`. Nothing is taken, so nothing is released.
fn refused(b: &mut Bencher<'_>, h: &ClassHandle<'_>) {
    let req = Request::new();
    let held = h
        .try_acquire(&req)
        .unwrap()
        .permit()
        .expect("the first request takes the one slot");
    assert!(
        !h.try_acquire(&req).unwrap().is_admitted(),
        "a second request must be refused"
    );
    b.iter(|| black_box(h.try_acquire(&req).unwrap()));
    drop(held);
}

fn fast_path(c: &mut Criterion) {
    let region = common::bench_region();
    let client = Client::attach(region.path()).unwrap();
    let classes = ["slots", "rate", "both"];

    let mut g = c.benchmark_group("uncontended");
    for name in classes {
        let h = client.class(name).unwrap();
        g.bench_function(name, |b| uncontended(b, &h));
    }
    g.finish();

    let mut g = c.benchmark_group("two_threads");
    for name in classes {
        let h = client.class(name).unwrap();
        g.bench_function(name, |b| two_threads(b, &h));
    }
    g.finish();

    // Fleet leasing on vs off, same run: `both` and the same limits with a
    // fleet lease open (one more clock-free check, one more CAS on the
    // credit word).
    common::open_fleet_lease(&region);
    let mut g = c.benchmark_group("fleet");
    for name in ["both", "both_fleet"] {
        let h = client.class(name).unwrap();
        g.bench_function(name, |b| uncontended(b, &h));
    }
    g.finish();

    let mut g = c.benchmark_group("refused");
    let one = client.class("one").unwrap();
    g.bench_function("slots_full", |b| refused(b, &one));
    g.finish();

    drop(client);
    drop(region);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = fast_path
}
criterion_main!(benches);
