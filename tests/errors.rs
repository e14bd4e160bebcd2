//! Bad input gets a clear error and the right exit code, never a crash: a
//! missing region, a wrong layout version, a truncated file, a bad magic,
//! an unknown class, cost 0, a bad config (with line and column), permission
//! denied, a second daemon on one region, and a region path that is a
//! symbolic link.

#![allow(clippy::unwrap_used)]

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::{
    code, output_within, poke, sluice_bin, sluiced_bin, stderr, temp_dir, Daemon, SMALL_CAPACITY,
};
use sluice_client::{AcquireError, Client, Request};

/// A command expected to end promptly (a refusal, an error) gets this long.
const PROMPT: Duration = Duration::from_secs(20);

/// sysexits codes the commands use.
const EX_USAGE: i32 = 64;
const EX_UNAVAILABLE: i32 = 69;
const EX_CONFIG: i32 = 78;

fn config() -> String {
    format!("{SMALL_CAPACITY}\n[classes.one]\nmax_in_flight = 1\n\n[classes.api]\nrate = 10\nburst = 5\n")
}

/// `sluice --region PATH ARGS...` on a region that may have no daemon.
fn sluice_at(region: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new(sluice_bin());
    cmd.arg("--region")
        .arg(region)
        .args(args)
        .env_remove("SLUICE_LOG");
    output_within(&mut cmd, PROMPT)
}

/// A daemon's region with the daemon stopped, ready to be damaged.
fn stopped_region() -> Daemon {
    let mut d = Daemon::start(&config());
    let status = d.stop();
    assert!(
        status.success(),
        "sluiced stopped cleanly: {status}; log:\n{}",
        d.log()
    );
    d
}

/// The error `Client::attach` gives, as text.
fn attach_error(region: &Path) -> String {
    match Client::attach(region) {
        Ok(_) => panic!("attach to {} succeeded", region.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_missing_region_exits_69_and_names_the_path() {
    let dir = temp_dir();
    let region = dir.path().join("region");
    let ran = dir.path().join("ran");
    let out = sluice_at(
        &region,
        &[
            "run",
            "--class",
            "one",
            "--",
            "touch",
            ran.to_str().unwrap(),
        ],
    );
    assert_eq!(code(&out), EX_UNAVAILABLE, "stderr: {}", stderr(&out));
    assert!(
        stderr(&out).contains(region.to_str().unwrap()),
        "names the path: {}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("does not exist"),
        "says what is wrong: {}",
        stderr(&out)
    );
    assert!(!ran.exists(), "the command did not run");

    let out = sluice_at(&region, &["stats", "--json"]);
    assert_eq!(code(&out), EX_UNAVAILABLE, "stderr: {}", stderr(&out));
    assert!(
        stderr(&out).contains(region.to_str().unwrap()),
        "names the path: {}",
        stderr(&out)
    );
    assert!(out.stdout.is_empty(), "no JSON for a missing region");
}

#[test]
fn a_layout_version_mismatch_names_both_versions() {
    let d = stopped_region();
    // The layout version is the u32 at byte 8 of the header.
    poke(d.region(), 8, &2u32.to_le_bytes());

    let out = sluice_at(d.region(), &["stats", "--json"]);
    assert_eq!(code(&out), EX_UNAVAILABLE, "stderr: {}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("v2") && err.contains("v1"),
        "names both versions: {err}"
    );
    assert!(
        err.contains(d.region().to_str().unwrap()),
        "names the file: {err}"
    );

    let out = sluice_at(d.region(), &["run", "--class", "one", "--", "true"]);
    assert_eq!(code(&out), EX_UNAVAILABLE, "stderr: {}", stderr(&out));

    let msg = attach_error(d.region());
    assert!(
        msg.contains("v2") && msg.contains("v1"),
        "library error names both: {msg}"
    );
}

#[test]
fn a_truncated_region_is_a_clear_error_not_a_crash() {
    let d = stopped_region();
    fs::OpenOptions::new()
        .write(true)
        .open(d.region())
        .unwrap()
        .set_len(4096)
        .unwrap();

    for args in [
        &["stats", "--json"][..],
        &["run", "--class", "one", "--", "true"][..],
    ] {
        let out = sluice_at(d.region(), args);
        // `code` fails the test if the process died of a signal (SIGBUS).
        assert_eq!(
            code(&out),
            EX_UNAVAILABLE,
            "{args:?}: stderr: {}",
            stderr(&out)
        );
        let err = stderr(&out);
        assert!(
            err.contains("truncated") || err.contains("corrupt"),
            "{args:?}: {err}"
        );
    }
    let msg = attach_error(d.region());
    assert!(
        msg.contains("truncated") || msg.contains("corrupt"),
        "library error: {msg}"
    );

    // Shorter than the header itself.
    fs::OpenOptions::new()
        .write(true)
        .open(d.region())
        .unwrap()
        .set_len(100)
        .unwrap();
    let out = sluice_at(d.region(), &["stats", "--json"]);
    assert_eq!(code(&out), EX_UNAVAILABLE, "stderr: {}", stderr(&out));
    assert!(
        stderr(&out).contains("truncated"),
        "stderr: {}",
        stderr(&out)
    );
}

#[test]
fn a_bad_magic_is_not_a_sluice_region() {
    let d = stopped_region();
    poke(d.region(), 0, b"NOTSLUIC");
    let out = sluice_at(d.region(), &["stats", "--json"]);
    assert_eq!(code(&out), EX_UNAVAILABLE, "stderr: {}", stderr(&out));
    assert!(
        stderr(&out).contains("not a sluice region"),
        "stderr: {}",
        stderr(&out)
    );
    let msg = attach_error(d.region());
    assert!(msg.contains("not a sluice region"), "library error: {msg}");
}

#[test]
fn an_unknown_class_exits_64_and_lists_the_known_ones() {
    let d = Daemon::start(&config());
    let out = d.sluice(&["run", "--class", "nope", "--", "true"]);
    assert_eq!(code(&out), EX_USAGE, "stderr: {}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("\"nope\""), "names the class asked for: {err}");
    assert!(
        err.contains("known classes") && err.contains("one") && err.contains("api"),
        "{err}"
    );
}

#[test]
fn cost_0_is_a_usage_error() {
    let d = Daemon::start(&config());
    let out = d.sluice(&["run", "--class", "one", "--cost", "0", "--", "true"]);
    assert_eq!(code(&out), EX_USAGE, "stderr: {}", stderr(&out));
    assert!(stderr(&out).contains("cost"), "stderr: {}", stderr(&out));

    let client = Client::attach(d.region()).unwrap();
    for name in ["one", "api"] {
        let class = client.class(name).unwrap();
        let got = class
            .try_acquire(&Request::new().cost(0))
            .map(|d| d.is_admitted());
        assert_eq!(got, Err(AcquireError::ZeroCost), "class {name}");
    }
    drop(client);
    let one = d.class_stats("one");
    assert_eq!(common::num(&one, "admitted"), 0, "{one}");
    assert_eq!(common::num(&one, "in_flight"), 0, "{one}");
}

#[test]
fn a_bad_config_names_its_line_and_column() {
    let dir = temp_dir();
    let bad = dir.path().join("bad.toml");
    // Line 3, and the bad value starts in column 9.
    fs::write(&bad, "[classes.api]\nrate = 10\nburst = \"five\"\n").unwrap();

    let mut check = Command::new(sluice_bin());
    check.arg("check-config").arg(&bad);
    let out = output_within(&mut check, PROMPT);
    assert_eq!(code(&out), EX_CONFIG, "stderr: {}", stderr(&out));
    assert!(
        stderr(&out).contains("bad.toml:3:9"),
        "stderr: {}",
        stderr(&out)
    );

    let region = dir.path().join("region");
    let mut daemon = Command::new(sluiced_bin());
    daemon
        .arg("--config")
        .arg(&bad)
        .arg("--region")
        .arg(&region);
    let out = output_within(&mut daemon, PROMPT);
    assert_eq!(code(&out), EX_CONFIG, "stderr: {}", stderr(&out));
    assert!(
        stderr(&out).contains("bad.toml:3:9"),
        "stderr: {}",
        stderr(&out)
    );
    assert!(
        !region.exists(),
        "a daemon with a bad config creates no region"
    );
}

/// How to run a command as `nobody`, if this machine can.
fn as_nobody() -> Option<Command> {
    let works = |prog: &str, args: &[&str]| {
        let mut cmd = Command::new(prog);
        cmd.args(args);
        output_within(&mut cmd, PROMPT).status.success()
    };
    let setpriv = ["--reuid=65534", "--regid=65534", "--clear-groups", "--"];
    if works("setpriv", &[&setpriv[..], &["true"]].concat()) {
        let mut cmd = Command::new("setpriv");
        cmd.args(setpriv);
        return Some(cmd);
    }
    if works("runuser", &["-u", "nobody", "--", "true"]) {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "nobody", "--"]);
        return Some(cmd);
    }
    None
}

#[test]
fn permission_denied_on_the_region_exits_69() {
    // As root, file permissions are not checked at all, so the client runs as
    // nobody. The temp dir is 0755 so nobody can reach the 0600 region.
    let Some(mut cmd) = as_nobody() else {
        println!("skipped: neither setpriv nor runuser can switch to nobody here");
        return;
    };
    let d = Daemon::start(&format!("{}\n[region]\nmode = \"0600\"\n", config()));
    let mode = fs::metadata(d.region()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the region takes the config's mode");
    let sluice = sluice_bin();
    let region = d.region().to_str().unwrap().to_string();

    cmd.arg(&sluice)
        .args(["--region", &region, "stats", "--json"])
        .env_remove("SLUICE_LOG");
    let out = output_within(&mut cmd, PROMPT);
    assert_eq!(code(&out), EX_UNAVAILABLE, "stderr: {}", stderr(&out));
    let err = stderr(&out);
    assert!(err.contains("permission denied"), "stderr: {err}");
    assert!(err.contains(&region), "names the file: {err}");

    let mut run = as_nobody().unwrap();
    run.arg(&sluice)
        .args(["--region", &region, "run", "--class", "one", "--", "true"]);
    let out = output_within(&mut run, PROMPT);
    assert_eq!(code(&out), EX_UNAVAILABLE, "stderr: {}", stderr(&out));
    assert!(
        stderr(&out).contains("permission denied"),
        "stderr: {}",
        stderr(&out)
    );
}

#[test]
fn a_second_daemon_on_the_same_region_exits_69() {
    let d = Daemon::start(&config());
    let mut second = Command::new(sluiced_bin());
    second
        .arg("--region")
        .arg(d.region())
        .arg("--config")
        .arg(d.dir().join("sluice.toml"));
    let out = output_within(&mut second, PROMPT);
    assert_eq!(code(&out), EX_UNAVAILABLE, "stderr: {}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("already served by another sluiced"),
        "stderr: {err}"
    );
    assert!(
        err.contains(&d.pid().to_string()),
        "names the running daemon's pid: {err}"
    );

    // The first one still serves it.
    let v = d.stats();
    assert_eq!(v["daemon"]["running"], true, "{v}");
    assert_eq!(v["daemon"]["pid"].as_u64(), Some(u64::from(d.pid())), "{v}");
}

#[test]
fn sluiced_refuses_a_region_path_that_is_a_symlink() {
    let dir = temp_dir();
    let existing = dir.path().join("existing");
    fs::write(&existing, b"").unwrap();
    let nowhere = dir.path().join("nowhere");
    for (name, target) in [("dangling", &nowhere), ("to-file", &existing)] {
        let link = dir.path().join(name);
        std::os::unix::fs::symlink(target, &link).unwrap();
        let mut cmd = Command::new(sluiced_bin());
        cmd.arg("--region").arg(&link).env_remove("SLUICE_LOG");
        let out = output_within(&mut cmd, PROMPT);
        assert_eq!(
            code(&out),
            EX_UNAVAILABLE,
            "{name}: stderr: {}",
            stderr(&out)
        );
        assert!(
            stderr(&out).contains("symbolic link"),
            "{name}: stderr: {}",
            stderr(&out)
        );
    }
    assert!(
        !nowhere.exists(),
        "nothing created through the dangling link"
    );
    assert_eq!(
        fs::metadata(&existing).unwrap().len(),
        0,
        "the link's target is untouched"
    );
}
