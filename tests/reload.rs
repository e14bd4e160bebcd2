//! Live reload on SIGHUP: limits change in place without revoking held
//! permits (raise max_in_flight within the region's reserve; lower it and
//! held permits drain down), a broken file keeps the old config, and a
//! waiter too large for lowered limits is told so (C02 step 5).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use sluice_client::{Client, Enqueued, Outcome, Request};

const BEFORE: &str = "[classes.db]\nmax_in_flight = 4\n";

fn reload(d: &Daemon, text: &str, want_max: u64) {
    std::fs::write(d.dir().join("sluice.toml"), text).unwrap();
    signal(d.pid(), libc::SIGHUP);
    poll(Duration::from_secs(20), "the reload to take effect", || {
        let m = num(&d.class_stats("db"), "max_in_flight");
        if m == want_max {
            Ok(())
        } else {
            Err(m)
        }
    });
}

#[test]
fn raising_max_in_flight_applies_in_place() {
    let d = Daemon::start(BEFORE);
    let client = Client::attach(d.region()).unwrap();
    let db = client.class("db").unwrap();
    let held: Vec<_> = (0..4)
        .map(|_| db.try_acquire(&Request::new()).unwrap().permit().unwrap())
        .collect();
    assert!(!db.try_acquire(&Request::new()).unwrap().is_admitted());
    reload(&d, "[classes.db]\nmax_in_flight = 6\n", 6);
    let more: Vec<_> = (0..2)
        .map(|_| db.try_acquire(&Request::new()).unwrap().permit().unwrap())
        .collect();
    assert!(!db.try_acquire(&Request::new()).unwrap().is_admitted());
    assert_eq!(num(&d.class_stats("db"), "in_flight"), 6);
    drop(held);
    drop(more);
    assert_eq!(num(&d.class_stats("db"), "in_flight"), 0);
}

#[test]
fn lowering_max_in_flight_drains_down_without_revoking() {
    let d = Daemon::start("[classes.db]\nmax_in_flight = 8\n");
    let client = Client::attach(d.region()).unwrap();
    let db = client.class("db").unwrap();
    let mut held: Vec<_> = (0..8)
        .map(|_| db.try_acquire(&Request::new()).unwrap().permit().unwrap())
        .collect();
    reload(&d, "[classes.db]\nmax_in_flight = 4\n", 4);
    // All 8 stay held; no new admission until fewer than 4 are held.
    assert_eq!(num(&d.class_stats("db"), "in_flight"), 8);
    for _ in 0..4 {
        drop(held.remove(0));
        assert!(
            !db.try_acquire(&Request::new()).unwrap().is_admitted(),
            "admitted with {} held over a limit of 4",
            held.len()
        );
    }
    drop(held.remove(0));
    assert_eq!(held.len(), 3);
    assert!(db.try_acquire(&Request::new()).unwrap().is_admitted());
}

#[test]
fn a_broken_file_keeps_the_old_limits() {
    let d = Daemon::start(BEFORE);
    std::fs::write(
        d.dir().join("sluice.toml"),
        "[classes.db]\nmax_in_flight = \n",
    )
    .unwrap();
    signal(d.pid(), libc::SIGHUP);
    poll(Duration::from_secs(20), "the refusal to be logged", || {
        let log = d.log();
        if log.contains("reload refused") {
            Ok(log)
        } else {
            Err("not yet")
        }
    });
    assert!(d.log().contains("sluice.toml:2:"), "{}", d.log());
    assert_eq!(num(&d.class_stats("db"), "max_in_flight"), 4);
    assert!(d.stats()["daemon"]["running"].as_bool().unwrap());
}

#[test]
fn a_waiter_too_large_after_a_reload_is_told_smaller_scope() {
    let d = Daemon::start("[classes.db]\nmax_in_flight = 10\n");
    let client = Client::attach(d.region()).unwrap();
    let db = client.class("db").unwrap();
    let _held = db
        .try_acquire(&Request::new().cost(4))
        .unwrap()
        .permit()
        .unwrap();
    let _held2 = db
        .try_acquire(&Request::new().cost(4))
        .unwrap()
        .permit()
        .unwrap();
    let ticket = match db
        .enqueue(&Request::new().cost(4), Duration::from_secs(30))
        .unwrap()
    {
        Enqueued::Queued(t) => t,
        Enqueued::Done(o) => panic!("expected to queue, got {o:?}"),
    };
    reload(&d, "[classes.db]\nmax_in_flight = 3\n", 3);
    let outcome = ticket.wait();
    match &outcome {
        Outcome::Refused(r) => {
            assert_eq!(r.reason.as_str(), "smaller_scope");
            assert_eq!(r.largest_cost, Some(3));
        }
        other => panic!("expected smaller_scope, got {other:?}"),
    };
}
