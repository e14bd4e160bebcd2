//! `blocked_by_quota`: a tenant request willing to wait, whose quota has
//! room before its deadline, waits as a ticket in that state (listed by
//! `sluice tickets`) and runs once the quota has room; one whose quota has
//! no room before its deadline is refused `quota` at once.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;

const CONFIG: &str = r#"
[classes.api]
max_in_flight = 4
tenants = true

[tenants]
default_tier = "slow"

[tenants.tiers.slow]
rate = 1
burst = 1
"#;

#[test]
fn a_tenant_waits_as_blocked_by_quota_then_runs() {
    let d = Daemon::start(CONFIG);
    let first = d.sluice(&["run", "--class", "api", "--tenant", "t1", "--", "true"]);
    assert_eq!(code(&first), 0, "{}", stderr(&first));
    // The bucket is empty for about a second: this one waits for it.
    let mut waiter = d
        .sluice_cmd(&[
            "run", "--class", "api", "--tenant", "t1", "--wait", "10s", "--", "true",
        ])
        .spawn()
        .unwrap();
    let listed = poll(Duration::from_secs(20), "the waiter to be listed", || {
        let out = d.sluice(&["tickets", "--json"]);
        let v: serde_json::Value =
            serde_json::from_str(&stdout(&out)).map_err(|e| e.to_string())?;
        let states: Vec<String> = v["tickets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["state"].as_str().unwrap_or("").to_string())
            .collect();
        if states.iter().any(|s| s == "blocked_by_quota") {
            Ok(states)
        } else {
            Err(format!("{states:?}"))
        }
    });
    assert!(listed.contains(&"blocked_by_quota".to_string()));
    let status = wait_within(&mut waiter, Duration::from_secs(30), "the blocked waiter");
    assert_eq!(
        status.code(),
        Some(0),
        "the waiter ran once the quota had room"
    );
    let s = d.class_stats("api");
    assert_eq!(num(&s, "admitted"), 2, "{s}");
    assert_eq!(refused(&s, "quota"), 0, "{s}");
}

#[test]
fn a_quota_without_room_before_the_deadline_is_refused_at_once() {
    let d = Daemon::start(CONFIG);
    let first = d.sluice(&["run", "--class", "api", "--tenant", "t2", "--", "true"]);
    assert_eq!(code(&first), 0);
    let out = d.sluice(&[
        "run", "--class", "api", "--tenant", "t2", "--wait", "100ms", "--", "true",
    ]);
    assert_eq!(code(&out), 75);
    assert!(stderr(&out).contains("quota"), "{}", stderr(&out));
    assert_eq!(refused(&d.class_stats("api"), "quota"), 1);
}
