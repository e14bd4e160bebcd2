//! Field cases C02, C07 and C17, the steps this foundation (try_acquire,
//! slots, GCRA buckets, header checks, reclaim) makes possible, through the
//! client library against a real daemon. Steps that need `acquire` with a
//! deadline, a reload that shrinks a class, or a second build of the layout
//! are not here yet; each test says which steps it covers. (C03 needs an
//! injectable clock or a freeze hook between clock read and CAS, which the
//! library does not have: none of its steps is here.)

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{
    alive, code, num, output_within, poke, poll, refused, signal, sluice_bin, stderr, wait_within,
    Daemon, SMALL_CAPACITY, WATCHDOG,
};
use sluice_client::{
    AcquireError, AttachError, Client, Decision, OpenError, Refusal, RefuseReason, Request,
};
use sluice_shm_layout::layout::{self, Header};

/// Slack for rounding between the bucket's fixed-point units and whole
/// nanoseconds, and between the two `Instant`s around the calls.
const ROUNDING: Duration = Duration::from_millis(1);

fn refusal(d: Result<Decision<'_>, AcquireError>) -> Refusal {
    match d.unwrap() {
        Decision::Refused(r) => r,
        Decision::Admitted(p) => panic!("admitted (cost {}), expected a refusal", p.cost()),
    }
}

/// Poll `sluice stats` until `check` holds for class `name`.
fn poll_class(d: &Daemon, name: &str, what: &str, check: impl Fn(&serde_json::Value) -> bool) {
    poll(Duration::from_secs(10), what, || {
        let c = d.class_stats(name);
        if check(&c) {
            Ok(())
        } else {
            Err(c)
        }
    });
}

/// C02 steps 2–3 and the refusal half of step 4, and the separate count of
/// oversized refusals. Not here: step 4's wait with a deadline (no
/// `acquire` yet) and step 5 (reload with a queued waiter).
#[test]
fn c02_a_cost_that_can_never_fit_is_refused_smaller_scope_and_takes_nothing() {
    let d = Daemon::start(&format!(
        "{SMALL_CAPACITY}\n[classes.api]\nrate = 10\nburst = 5\n\n[classes.db]\nmax_in_flight = 4\n"
    ));
    let client = Client::attach(d.region()).unwrap();
    let api = client.class("api").unwrap();

    // Step 2. A new bucket starts full, as if idle for ever.
    let no = refusal(api.try_acquire(&Request::new().cost(6)));
    assert_eq!(no.reason, RefuseReason::SmallerScope, "{no}");
    assert_eq!(no.largest_cost, Some(5), "{no}");
    assert_eq!(no.retry_after, None, "waiting can never help: {no}");

    // Step 3. Exactly the burst is still there: the oversized request took
    // nothing.
    let before = Instant::now();
    let answers: Vec<Decision<'_>> = (0..6)
        .map(|_| api.try_acquire(&Request::new()).unwrap())
        .collect();
    let elapsed = before.elapsed();
    let admitted = answers.iter().filter(|a| a.is_admitted()).count();
    assert!(
        answers[..5].iter().all(Decision::is_admitted),
        "the first five are admitted"
    );
    assert_eq!(admitted, 5, "exactly the burst of 5");
    let Decision::Refused(sixth) = &answers[5] else {
        unreachable!("counted above")
    };
    assert_eq!(sixth.reason, RefuseReason::NotNow, "{sixth}");
    // Computed, not timed: the first admit at t1 left tat = t1 + 5T; the
    // sixth at t6 must wait tat + (1 - 5)T - t6 = T - (t6 - t1), with T =
    // 100 ms and 0 <= t6 - t1 <= elapsed.
    let t = Duration::from_millis(100);
    let retry = sixth
        .retry_after
        .expect("a rate refusal knows when to come back");
    assert!(retry <= t + ROUNDING, "retry_after {retry:?} > T");
    assert!(
        retry + elapsed + ROUNDING >= t,
        "retry_after {retry:?} < T - {elapsed:?}"
    );
    if elapsed < Duration::from_millis(19) {
        let off = retry.abs_diff(t);
        assert!(
            off <= Duration::from_millis(20),
            "retry_after {retry:?} not 100 ms ± 20 ms"
        );
    }
    drop(answers);

    // Step 4, refusal part: more than the semaphore holds is refused at
    // once, never queued, and a small request is still admitted.
    let db = client.class("db").unwrap();
    let no = refusal(db.try_acquire(&Request::new().cost(5)));
    assert_eq!(no.reason, RefuseReason::SmallerScope, "{no}");
    assert_eq!(no.largest_cost, Some(4), "{no}");
    assert_eq!(no.retry_after, None, "{no}");
    let one = db.try_acquire(&Request::new()).unwrap();
    assert!(one.is_admitted(), "cost 1 is admitted at once");
    // The same from another process: the CLI.
    let out = d.sluice(&["run", "--class", "db", "--cost", "5", "--", "true"]);
    assert_eq!(code(&out), 75, "stderr: {}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("smaller_scope") && err.contains("largest admissible cost is 4"),
        "{err}"
    );
    let out = d.sluice(&["run", "--class", "db", "--", "true"]);
    assert_eq!(
        code(&out),
        0,
        "cost 1 from another process while one is held: {}",
        stderr(&out)
    );
    drop(one);

    // Stats count the oversized refusals apart from `not_now`.
    let want = |api: &serde_json::Value, db: &serde_json::Value| {
        (
            refused(api, "smaller_scope"),
            refused(api, "not_now"),
            num(api, "admitted"),
        ) == (1, 1, 5)
            && (
                refused(db, "smaller_scope"),
                refused(db, "not_now"),
                num(db, "admitted"),
            ) == (2, 0, 2)
    };
    poll(
        Duration::from_secs(10),
        "stats to show the refusals by reason",
        || {
            let (a, b) = (d.class_stats("api"), d.class_stats("db"));
            if want(&a, &b) {
                Ok(())
            } else {
                Err((a, b))
            }
        },
    );
    drop(api);
    drop(db);
    drop(client);
    poll(
        Duration::from_secs(10),
        "the same counts once our client detached",
        || {
            let (a, b) = (d.class_stats("api"), d.class_stats("db"));
            if want(&a, &b) && num(&b, "in_flight") == 0 {
                Ok(())
            } else {
                Err((a, b))
            }
        },
    );
}

/// C07 step 2 (the documented maximum of `max_in_flight`, at load and at
/// reload) and step 1 as far as it goes here: 6 000 000 000 slots is
/// rejected by name of the maximum, since a class holds at most 65 536.
#[test]
fn c07_max_in_flight_has_a_documented_maximum() {
    // Room in the slot table for the maximum, so only the limit itself speaks.
    const ROOMY: &str =
        "[daemon]\ncapacity = { classes = 16, clients = 64, tickets = 65536, slots = 65536 }\n";
    let d = Daemon::start(&format!("{ROOMY}\n[classes.big]\nmax_in_flight = 8\n"));
    let check = |name: &str, max_in_flight: u64| {
        let path = d.dir().join(name);
        std::fs::write(
            &path,
            format!("{ROOMY}\n[classes.big]\nmax_in_flight = {max_in_flight}\n"),
        )
        .unwrap();
        let mut cmd = std::process::Command::new(sluice_bin());
        cmd.arg("check-config").arg(&path);
        (output_within(&mut cmd, WATCHDOG), path)
    };
    let (out, _) = check("huge.toml", 6_000_000_000);
    assert_eq!(code(&out), 78, "stderr: {}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("6000000000") && err.contains("maximum 65536"),
        "{err}"
    );
    let (out, _) = check("max.toml", 65_536);
    assert_eq!(
        code(&out),
        0,
        "the maximum itself is accepted: {}",
        stderr(&out)
    );
    let (out, over) = check("max-plus-1.toml", 65_537);
    assert_eq!(code(&out), 78, "stderr: {}", stderr(&out));
    assert!(
        stderr(&out).contains("exceeds the maximum 65536"),
        "{}",
        stderr(&out)
    );

    // At reload: the bad file is refused and the old limit stays.
    std::fs::copy(&over, d.dir().join("sluice.toml")).unwrap();
    signal(d.pid(), libc::SIGHUP);
    poll(
        Duration::from_secs(10),
        "the daemon to refuse the reload",
        || {
            let log = d.log();
            if log.contains("reload refused") {
                Ok(())
            } else {
                Err(log)
            }
        },
    );
    assert!(
        d.log().contains("exceeds the maximum 65536"),
        "log:\n{}",
        d.log()
    );
    assert_eq!(
        num(&d.class_stats("big"), "max_in_flight"),
        8,
        "the old limit stays"
    );
}

/// C07 step 4 without its 20 s idle (the bucket's arithmetic under a long
/// idle belongs to shm-layout's unit tests; sleeping 20 s here would make
/// this the slowest test by far), and step 5.
#[test]
fn c07_huge_rates_and_costs_neither_wrap_nor_mint_tokens() {
    let d = Daemon::start(&format!(
        "{SMALL_CAPACITY}\n[classes.bw]\nrate = 1000000000\nburst = 1000000000\n\n\
         [classes.db]\nmax_in_flight = 4\n\n[classes.api]\nrate = 10\nburst = 5\n"
    ));
    let client = Client::attach(d.region()).unwrap();
    let bw = client.class("bw").unwrap();
    let giga = 1_000_000_000u64;

    let before = Instant::now();
    let first = bw.try_acquire(&Request::new().cost(giga)).unwrap();
    let second = refusal(bw.try_acquire(&Request::new().cost(giga)));
    let elapsed = before.elapsed();
    assert!(first.is_admitted(), "a full bucket admits its whole burst");
    assert_eq!(second.reason, RefuseReason::NotNow, "{second}");
    // Computed: tat = t1 + 1e9 T with T = 1 ns; a second full burst may
    // come at tat, 1 s after t1.
    let retry = second
        .retry_after
        .expect("a rate refusal knows when to come back");
    let t = Duration::from_secs(1);
    assert!(retry <= t + ROUNDING, "retry_after {retry:?} > 1 s");
    assert!(
        retry + elapsed + ROUNDING >= t,
        "retry_after {retry:?} < 1 s - {elapsed:?}"
    );

    // Step 5: u64::MAX can never fit, on any class; cost 0 is a usage error.
    for (name, largest) in [("bw", giga), ("db", 4), ("api", 5)] {
        let class = client.class(name).unwrap();
        let no = refusal(class.try_acquire(&Request::new().cost(u64::MAX)));
        assert_eq!(no.reason, RefuseReason::SmallerScope, "{name}: {no}");
        assert_eq!(no.largest_cost, Some(largest), "{name}: {no}");
        assert_eq!(no.retry_after, None, "{name}: {no}");
        let zero = class
            .try_acquire(&Request::new().cost(0))
            .map(|d| d.is_admitted());
        assert_eq!(zero, Err(AcquireError::ZeroCost), "{name}");
    }
    let db = d.class_stats("db");
    assert_eq!(
        num(&db, "in_flight"),
        0,
        "nothing taken by the refusals: {db}"
    );
    let out = d.sluice(&["run", "--class", "db", "--cost", "4", "--", "true"]);
    assert_eq!(code(&out), 0, "all four slots still free: {}", stderr(&out));
    let out = d.sluice(&[
        "run",
        "--class",
        "db",
        "--cost",
        &u64::MAX.to_string(),
        "--",
        "true",
    ]);
    assert_eq!(code(&out), 75, "stderr: {}", stderr(&out));
    assert!(stderr(&out).contains("smaller_scope"), "{}", stderr(&out));
}

/// The error attaching to `region` gives.
fn attach_err(region: &Path) -> AttachError {
    match Client::attach(region) {
        Ok(_) => panic!("attached to a damaged region {}", region.display()),
        Err(e) => e,
    }
}

/// C17 steps 2/3 (a region of another layout version, or whose record
/// sizes differ from this build's) and 5 (truncated to 4096 bytes), by
/// editing a real region's header: each is a clear, distinct error, and no
/// process crashes. Step 4 (an in-place upgrade) needs a second build.
#[test]
fn c17_a_region_of_another_layout_is_refused_clearly() {
    let mut d = Daemon::start(&format!(
        "{SMALL_CAPACITY}\n[classes.one]\nmax_in_flight = 1\n"
    ));
    assert!(d.stop().success(), "log:\n{}", d.log());
    let copy = |name: &str| {
        let p = d.dir().join(name);
        std::fs::copy(d.region(), &p).unwrap();
        p
    };
    let version_at = std::mem::offset_of!(Header, layout_version) as u64;
    let record_at = std::mem::offset_of!(Header, class_record_size) as u64;

    let v2 = copy("v2");
    poke(&v2, version_at, &(layout::LAYOUT_VERSION + 1).to_le_bytes());
    let bigger_record = copy("bigger-record");
    poke(
        &bigger_record,
        record_at,
        &(layout::CLASS_RECORD_SIZE as u32 + 8).to_le_bytes(),
    );
    let truncated = copy("truncated");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&truncated)
        .unwrap()
        .set_len(4096)
        .unwrap();
    let missing = d.dir().join("missing");

    let e = attach_err(&v2);
    assert!(
        matches!(
            &e,
            AttachError::Open(OpenError::Layout {
                source: layout::AttachError::VersionMismatch { found, supported },
                ..
            }) if *found == layout::LAYOUT_VERSION + 1 && *supported == layout::LAYOUT_VERSION
        ),
        "{e:?}"
    );
    let msg = e.to_string();
    let (theirs, ours) = (layout::LAYOUT_VERSION + 1, layout::LAYOUT_VERSION);
    assert!(
        msg.contains(&format!("v{theirs}")) && msg.contains(&format!("v{ours}")),
        "{msg}"
    );

    let e = attach_err(&bigger_record);
    assert!(
        matches!(
            &e,
            AttachError::Open(OpenError::Layout {
                source: layout::AttachError::RecordSize { .. },
                ..
            })
        ),
        "{e:?}"
    );
    let want = (layout::CLASS_RECORD_SIZE + 8).to_string();
    assert!(e.to_string().contains(&want), "names the size found: {e}");

    let e = attach_err(&truncated);
    assert!(
        matches!(
            &e,
            AttachError::Open(OpenError::Layout {
                source: layout::AttachError::SizeMismatch { file: 4096, .. },
                ..
            })
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("truncated or corrupt"), "{e}");

    let e = attach_err(&missing);
    assert!(
        matches!(&e, AttachError::Open(OpenError::Missing { .. })),
        "{e:?}"
    );

    // The same through another process, which must exit, not die of a
    // signal, each with its own message.
    let mut messages = Vec::new();
    for region in [&v2, &bigger_record, &truncated, &missing] {
        let mut cmd = std::process::Command::new(sluice_bin());
        cmd.arg("--region")
            .arg(region)
            .args(["run", "--class", "one", "--", "true"]);
        let out = output_within(&mut cmd, WATCHDOG);
        assert_eq!(code(&out), 69, "{}: {}", region.display(), stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains(region.to_str().unwrap()),
            "names the file: {err}"
        );
        messages.push(err.replace(region.to_str().unwrap(), "REGION"));
    }
    messages.sort();
    messages.dedup();
    assert_eq!(messages.len(), 4, "four different errors: {messages:#?}");
}

/// C17's and the product's crash safety: a permit held by a process that is
/// SIGKILLed comes back, counted as reclaimed, and the command it ran dies
/// with it (parent-death signal).
#[test]
fn a_sigkilled_holders_slot_is_returned_and_its_command_dies() {
    let d = Daemon::start(&format!(
        "{SMALL_CAPACITY}\n[classes.one]\nmax_in_flight = 1\n"
    ));
    let pidfile = d.dir().join("command.pid");
    let script = format!(
        "echo $$ > {}.tmp && mv {0}.tmp {0} && exec sleep 60",
        pidfile.display()
    );
    let mut holder = d
        .sluice_cmd(&["run", "--class", "one", "--", "sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let command_pid: u32 = poll(
        WATCHDOG,
        "the command to start",
        || match std::fs::read_to_string(&pidfile) {
            Ok(s) => s.trim().parse::<u32>().map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        },
    );
    poll_class(&d, "one", "the permit to be held", |c| {
        num(c, "in_flight") == 1
    });
    let out = d.sluice(&["run", "--class", "one", "--", "true"]);
    assert_eq!(code(&out), 75, "the only slot is held: {}", stderr(&out));

    signal(holder.id(), libc::SIGKILL);
    let status = wait_within(&mut holder, WATCHDOG, "sluice run after SIGKILL");
    assert!(!status.success());

    poll_class(&d, "one", "the daemon to return the slot", |c| {
        num(c, "in_flight") == 0 && num(c, "reclaimed") == 1
    });
    poll(WATCHDOG, "the command to die with its sluice run", || {
        if alive(command_pid) {
            Err(command_pid)
        } else {
            Ok(())
        }
    });
    let out = d.sluice(&["run", "--class", "one", "--", "true"]);
    assert_eq!(code(&out), 0, "the slot is usable again: {}", stderr(&out));
    let one = d.class_stats("one");
    assert_eq!(num(&one, "in_flight"), 0, "{one}");
    assert_eq!(num(&one, "admitted"), 2, "{one}");
    assert_eq!(refused(&one, "not_now"), 1, "{one}");
}

/// The product's restart promise (and the part of C17 step 4 one build can
/// show): a daemon that crashes and comes back re-attaches the same region,
/// keeps the permits of holders that are still alive, and returns those of
/// holders that died while it was down.
#[test]
fn a_restarted_daemon_keeps_live_permits_and_returns_dead_ones() {
    let mut d = Daemon::start(&format!(
        "{SMALL_CAPACITY}\n[classes.two]\nmax_in_flight = 2\n"
    ));
    let generation = d.stats()["daemon"]["generation"].clone();
    let gate = d.dir().join("gate");
    let waits = format!(
        "n=0; while [ ! -e {g} ] && [ $n -lt 3000 ]; do sleep 0.01; n=$((n+1)); done",
        g = gate.display()
    );
    let spawn = |script: &str| {
        d.sluice_cmd(&["run", "--class", "two", "--", "sh", "-c", script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut survivor = spawn(&waits);
    let mut victim = spawn("exec sleep 60");
    poll_class(&d, "two", "both permits to be held", |c| {
        num(c, "in_flight") == 2
    });

    d.kill();
    signal(victim.id(), libc::SIGKILL);
    wait_within(&mut victim, WATCHDOG, "the killed holder");
    let down = d.class_stats("two");
    assert_eq!(
        num(&down, "in_flight"),
        2,
        "nobody returns permits while the daemon is down"
    );

    d.restart();
    assert_eq!(
        d.stats()["daemon"]["generation"],
        generation,
        "the same region, re-attached"
    );
    poll_class(&d, "two", "the dead holder's permit to be returned", |c| {
        num(c, "in_flight") == 1 && num(c, "reclaimed") == 1
    });
    // The survivor's permit is still held: one slot free, not two.
    let out = d.sluice(&["run", "--class", "two", "--cost", "2", "--", "true"]);
    assert_eq!(code(&out), 75, "stderr: {}", stderr(&out));
    let out = d.sluice(&["run", "--class", "two", "--", "true"]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));

    std::fs::write(&gate, b"").unwrap();
    let status = wait_within(&mut survivor, WATCHDOG, "the surviving holder");
    assert!(status.success(), "{status}");
    let two = d.class_stats("two");
    assert_eq!(
        (num(&two, "in_flight"), num(&two, "reclaimed")),
        (0, 1),
        "{two}"
    );
}
