//! loom models of the dependency circuit breaker (`breaker::check`,
//! `report`, `evaluate`, `trip`, `heal`): one `DepRecord` on the heap,
//! clients, the daemon's tick and the operator each a thread.
#![cfg(loom)]
#![allow(clippy::unwrap_used)]

use loom::sync::Arc;
use loom::thread;
use sluice_shm_layout::breaker::{self, BreakerWord, Gate, Transition, CLOSED, HALF_OPEN, OPEN};
use sluice_shm_layout::layout::DepRecord;
use sluice_shm_layout::sync::Ordering;

/// How long an opened breaker stays open in every model, ns.
const OPEN_FOR: u64 = 1_000;

/// A configured breaker in `mode` at `epoch`: opens on one outcome in a
/// window when half of them failed; one half-open probe.
fn dep(mode: u64, epoch: u32) -> Arc<DepRecord> {
    let d = DepRecord::default();
    let word = BreakerWord {
        epoch,
        mode,
        manual: false,
    };
    d.state.store(word.encode(), Ordering::Relaxed);
    d.min_requests.store(1, Ordering::Relaxed);
    d.failure_ratio_ppm.store(500_000, Ordering::Relaxed);
    d.window_ns.store(100, Ordering::Relaxed);
    d.half_open_probes.store(1, Ordering::Relaxed);
    d.open_for_ns.store(OPEN_FOR, Ordering::Relaxed);
    Arc::new(d)
}

fn word(d: &DepRecord) -> BreakerWord {
    BreakerWord::decode(d.state.load(Ordering::SeqCst))
}

// Real event: three requests reach a half-open dependency (one probe
// allowed) in the same instant, from three processes.
#[test]
fn half_open_admits_at_most_the_probes() {
    loom::model(|| {
        let d = dep(HALF_OPEN, 1);
        let handles: Vec<_> = (0..3)
            .map(|_| {
                let d = Arc::clone(&d);
                thread::spawn(move || breaker::check(&d, 0))
            })
            .collect();
        let gates: Vec<Gate> = handles.into_iter().map(|h| h.join().unwrap()).collect();

        let probes = gates.iter().filter(|&&g| g == Gate::Probe).count();
        assert_eq!(probes, 1, "one probe allowed, gates {gates:?}");
        let refused = gates.iter().filter(|&&g| g == Gate::Refuse(None)).count();
        assert_eq!(refused, 2, "the others wait for the probe, gates {gates:?}");
        assert_eq!(d.probes.load(Ordering::SeqCst), 1);
    });
}

// Real event: the daemon's tick opens a breaker on its failure ratio while
// an operator runs `sluice trip` on the same dependency.
#[test]
fn trip_races_evaluate() {
    loom::model(|| {
        let d = dep(CLOSED, 0);
        d.failures.store(2, Ordering::Relaxed);
        let now = 1_000;

        let daemon = {
            let d = Arc::clone(&d);
            thread::spawn(move || breaker::evaluate(&d, now, now))
        };
        let operator = {
            let d = Arc::clone(&d);
            thread::spawn(move || breaker::trip(&d))
        };
        let t = daemon.join().unwrap();
        operator.join().unwrap();

        // The tick either opened first (and the trip came after it) or saw
        // the trip, or lost its CAS to it: both bump the epoch once each.
        let opened = match t {
            Transition::Opened { failures, total } => {
                assert_eq!((failures, total), (2, 2));
                true
            }
            Transition::None => false,
            other => panic!("a closed breaker with failures went {other:?}"),
        };
        let w = word(&d);
        assert_eq!(w.mode, OPEN, "ended {w:?} after tick {t:?}");
        assert!(w.manual, "the trip came last or won: {w:?}");
        assert_eq!(w.epoch, 1 + u32::from(opened), "transitions lost: {w:?}");
        // Tripped by hand: refused with no retry-after.
        assert_eq!(breaker::check(&d, now), Gate::Refuse(None));
    });
}

// Real event: two clients report failed work while the daemon's tick, at
// the end of the window, evaluates the breaker.
#[test]
fn report_then_evaluate_opens() {
    loom::model(|| {
        let d = dep(CLOSED, 0);
        let now = 1_000;

        let clients: Vec<_> = (0..2)
            .map(|_| {
                let d = Arc::clone(&d);
                thread::spawn(move || breaker::report(&d, false))
            })
            .collect();
        let daemon = {
            let d = Arc::clone(&d);
            // The window began at 0 and lasts 100 ns: it has ended.
            thread::spawn(move || breaker::evaluate(&d, now, 0))
        };
        for c in clients {
            c.join().unwrap();
        }
        let t = daemon.join().unwrap();

        match t {
            Transition::Opened { failures, .. } => {
                assert!(failures >= 1, "opened on {t:?}");
                // The reports that came after went to the open window.
                assert_eq!(breaker::evaluate(&d, now, now), Transition::None);
            }
            Transition::WindowReset => {
                // The tick saw no failure (one would have opened it), so
                // it took nothing from the counters: both failures are
                // still there, and the next tick opens on them.
                assert_eq!(
                    breaker::evaluate(&d, now, now),
                    Transition::Opened {
                        failures: 2,
                        total: 2
                    }
                );
            }
            other => panic!("a closed breaker went {other:?}"),
        }
        let w = word(&d);
        assert_eq!((w.mode, w.manual, w.epoch), (OPEN, false, 1), "{w:?}");
    });
}

// Real event: a request takes the one half-open probe just as an operator
// runs `sluice heal` on the dependency.
#[test]
fn heal_races_probe() {
    loom::model(|| {
        let d = dep(HALF_OPEN, 1);
        let now = 0;

        let client = {
            let d = Arc::clone(&d);
            thread::spawn(move || breaker::check(&d, now))
        };
        let operator = {
            let d = Arc::clone(&d);
            thread::spawn(move || breaker::heal(&d))
        };
        let gate = client.join().unwrap();
        operator.join().unwrap();

        let w = word(&d);
        assert_eq!((w.mode, w.manual, w.epoch), (CLOSED, false, 2), "{w:?}");
        // The probe was counted (after the heal's reset) or reset by it.
        let probes = d.probes.load(Ordering::SeqCst);
        match gate {
            Gate::Probe => assert!(probes <= 1, "probes {probes}"),
            Gate::Pass => assert_eq!(probes, 0, "a pass took a probe"),
            Gate::Refuse(_) => panic!("the only probe was free: refused"),
        }

        // No stuck state: the breaker passes, opens on a failure, and when
        // half-open again admits its probe.
        assert_eq!(breaker::check(&d, now), Gate::Pass);
        breaker::report(&d, false);
        assert!(matches!(
            breaker::evaluate(&d, now, now),
            Transition::Opened { .. }
        ));
        assert_eq!(
            breaker::evaluate(&d, now + OPEN_FOR, now),
            Transition::HalfOpen
        );
        assert_eq!(breaker::check(&d, now + OPEN_FOR), Gate::Probe);
    });
}
