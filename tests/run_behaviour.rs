//! `sluice run` as a process wrapper: its exit status is the command's (128 +
//! signal when killed), SIGTERM reaches the command, the command sees
//! SLUICE_CLASS and SLUICE_GRANTED, a missing command exits 127 and gives the
//! permit back; and `sluice stats` still answers (with a warning) when the
//! daemon is down.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Stdio;

use common::{code, collect_within, num, poll, signal, stderr, stdout, Daemon, WATCHDOG};

const CONFIG: &str = "\
[daemon]
capacity = { classes = 16, clients = 64, tickets = 65536, slots = 4096 }

[classes.two]
max_in_flight = 2
";

#[test]
fn exit_status_is_the_commands() {
    let d = Daemon::start(CONFIG);
    let out = d.sluice(&["run", "--class", "two", "--", "sh", "-c", "exit 3"]);
    assert_eq!(code(&out), 3, "stderr: {}", stderr(&out));
    let out = d.sluice(&["run", "--class", "two", "--", "true"]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    assert_eq!(num(&d.class_stats("two"), "in_flight"), 0);
}

#[test]
fn a_command_killed_by_a_signal_gives_128_plus_the_signal() {
    let d = Daemon::start(CONFIG);
    let out = d.sluice(&["run", "--class", "two", "--", "sh", "-c", "kill -KILL $$"]);
    assert_eq!(code(&out), 128 + libc::SIGKILL, "stderr: {}", stderr(&out));
    let out = d.sluice(&["run", "--class", "two", "--", "sh", "-c", "kill -TERM $$"]);
    assert_eq!(code(&out), 128 + libc::SIGTERM, "stderr: {}", stderr(&out));
    assert_eq!(num(&d.class_stats("two"), "in_flight"), 0);
}

#[test]
fn sigterm_to_sluice_run_reaches_the_command() {
    let d = Daemon::start(CONFIG);
    let ready = d.dir().join("ready");
    let marker = d.dir().join("got-term");
    // The command says it is ready only once its trap is set; `sleep` in a
    // loop lets the shell run the trap within a tick of the signal.
    let script = format!(
        "trap 'echo term > {marker}; exit 7' TERM; echo up > {ready}; \
         n=0; while [ $n -lt 600 ]; do sleep 0.05; n=$((n+1)); done; exit 99",
        marker = marker.display(),
        ready = ready.display()
    );
    let child = d
        .sluice_cmd(&["run", "--class", "two", "--", "sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    poll(WATCHDOG, "the command to set its TERM trap", || {
        if ready.exists() {
            Ok(())
        } else {
            Err("no ready file")
        }
    });
    assert_eq!(num(&d.class_stats("two"), "in_flight"), 1);

    // To `sluice run` only, not its process group: the forwarding is tested.
    signal(pid, libc::SIGTERM);
    let out = collect_within(child, WATCHDOG, "sluice run after SIGTERM");
    assert_eq!(
        code(&out),
        7,
        "the command's own exit status; stderr: {}",
        stderr(&out)
    );
    let seen = std::fs::read_to_string(&marker).expect("the command's TERM trap ran");
    assert_eq!(seen.trim(), "term");
    assert_eq!(
        num(&d.class_stats("two"), "in_flight"),
        0,
        "the permit is released"
    );
}

#[test]
fn the_command_sees_its_class_and_grant() {
    let d = Daemon::start(CONFIG);
    let out = d.sluice(&[
        "run",
        "--class",
        "two",
        "--cost",
        "2",
        "--",
        "sh",
        "-c",
        "printf '%s %s' \"$SLUICE_CLASS\" \"$SLUICE_GRANTED\"",
    ]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out), "two 2");
}

#[test]
fn a_missing_command_exits_127_and_releases_the_permit() {
    let d = Daemon::start(CONFIG);
    let missing = d.dir().join("no-such-command");
    let missing = missing.to_str().unwrap();
    let out = d.sluice(&["run", "--class", "two", "--", missing, "arg"]);
    assert_eq!(code(&out), 127, "stderr: {}", stderr(&out));
    assert!(
        stderr(&out).contains("no-such-command"),
        "names the command: {}",
        stderr(&out)
    );
    let two = d.class_stats("two");
    assert_eq!(num(&two, "in_flight"), 0, "permit released: {two}");
    assert_eq!(
        num(&two, "admitted"),
        1,
        "it was admitted before the spawn failed: {two}"
    );
    // Both slots are free again: two holders at once still fit.
    let out = d.sluice(&["run", "--class", "two", "--cost", "2", "--", "true"]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
}

#[test]
fn stats_exits_0_with_a_warning_when_the_daemon_is_down() {
    let mut d = Daemon::start(CONFIG);
    let status = d.stop();
    assert!(
        status.success(),
        "sluiced exits 0 after SIGTERM: {status}; log:\n{}",
        d.log()
    );
    let out = d.sluice(&["stats", "--json"]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("warning") && err.contains("not running"),
        "stderr: {err}"
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["daemon"]["running"], false, "{v}");
    assert!(
        v["classes"].as_array().is_some_and(|c| !c.is_empty()),
        "classes still shown: {v}"
    );
    // The plain table says so too.
    let out = d.sluice(&["stats"]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    assert!(stdout(&out).contains("DOWN"), "table: {}", stdout(&out));
}

#[test]
fn stats_says_down_as_soon_as_the_daemon_is_killed() {
    let mut d = Daemon::start(CONFIG);
    let out = d.sluice(&["run", "--class", "two", "--", "true"]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    d.kill();
    // The lock dies with the process: no heartbeat timeout to wait for.
    let out = d.sluice(&["stats", "--json"]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    assert!(
        stderr(&out).contains("not running"),
        "stderr: {}",
        stderr(&out)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["daemon"]["running"], false, "{v}");
    // Admissions go on from the region without the daemon.
    let out = d.sluice(&["run", "--class", "two", "--", "true"]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
}

#[test]
fn a_draining_daemon_refuses_new_work_and_exits_once_permits_are_back() {
    let mut d = Daemon::start(&CONFIG.replace("[daemon]\n", "[daemon]\ndrain_timeout = \"60s\"\n"));
    let gate = d.dir().join("gate");
    let script = format!(
        "n=0; while [ ! -e {g} ] && [ $n -lt 3000 ]; do sleep 0.01; n=$((n+1)); done",
        g = gate.display()
    );
    let holder = d
        .sluice_cmd(&["run", "--class", "two", "--", "sh", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    poll(WATCHDOG, "the permit to be held", || {
        match num(&d.class_stats("two"), "in_flight") {
            1 => Ok(()),
            n => Err(n),
        }
    });

    signal(d.pid(), libc::SIGTERM);
    poll(WATCHDOG, "the daemon to start draining", || {
        let v = d.stats();
        if v["daemon"]["draining"] == true {
            Ok(())
        } else {
            Err(v)
        }
    });
    let out = d.sluice(&["run", "--class", "two", "--", "true"]);
    assert_eq!(code(&out), 75, "stderr: {}", stderr(&out));
    assert!(
        stderr(&out).contains("shutting_down"),
        "stderr: {}",
        stderr(&out)
    );
    assert_eq!(common::refused(&d.class_stats("two"), "shutting_down"), 1);

    // The held permit is released normally; then the daemon exits by itself.
    std::fs::write(&gate, b"").unwrap();
    let out = collect_within(holder, WATCHDOG, "the holder");
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
    let status = d.wait_exit();
    assert!(status.success(), "{status}; log:\n{}", d.log());

    // It does not leave the region refusing `shutting_down` behind it.
    let out = d.sluice(&["run", "--class", "two", "--", "true"]);
    assert_eq!(code(&out), 0, "stderr: {}", stderr(&out));
}
