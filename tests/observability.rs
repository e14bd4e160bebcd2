//! Observability: the daemon's optional Prometheus endpoint over HTTP on
//! loopback, `sluice stats --prometheus`, and `--watch` sampling.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;

/// A loopback port that was free a moment ago.
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn get(port: u16) -> Result<String, String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

#[test]
fn metrics_are_served_over_http_on_loopback_when_asked() {
    let port = free_port();
    let d = Daemon::start(&format!(
        "[daemon]\nmetrics_listen = \"127.0.0.1:{port}\"\n\n[classes.web]\nmax_in_flight = 2\n"
    ));
    let out = d.sluice(&["run", "--class", "web", "--", "true"]);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    let body = poll(
        Duration::from_secs(20),
        "the metrics endpoint to count the run",
        || {
            let b = get(port)?;
            if b.contains("sluice_admitted_total{class=\"web\"} 1") {
                Ok(b)
            } else {
                Err(b)
            }
        },
    );
    assert!(body.starts_with("HTTP/1.1 200 OK"), "{body}");
    assert!(body.contains("sluice_daemon_running 1"), "{body}");
    assert!(
        body.contains("sluice_max_in_flight{class=\"web\"} 2"),
        "{body}"
    );
}

#[test]
fn a_metrics_address_off_loopback_is_a_config_error() {
    let dir = temp_dir();
    let path = dir.path().join("m.toml");
    std::fs::write(&path, "[daemon]\nmetrics_listen = \"0.0.0.0:9464\"\n").unwrap();
    let out = output_within(
        std::process::Command::new(sluice_bin())
            .arg("check-config")
            .arg(&path),
        Duration::from_secs(30),
    );
    assert_eq!(code(&out), 78, "{}", stderr(&out));
    assert!(stderr(&out).contains("m.toml:2:18"), "{}", stderr(&out));
    assert!(stderr(&out).contains("loopback"), "{}", stderr(&out));
}

#[test]
fn prometheus_text_names_every_metric_sluice_and_counts_refusals_by_reason() {
    let d = Daemon::start("[classes.one]\nmax_in_flight = 1\n");
    let mut holder = d
        .sluice_cmd(&["run", "--class", "one", "--", "sleep", "30"])
        .spawn()
        .unwrap();
    poll(
        Duration::from_secs(20),
        "the holder to take the slot",
        || {
            let n = num(&d.class_stats("one"), "in_flight");
            if n == 1 {
                Ok(())
            } else {
                Err(n)
            }
        },
    );
    let out = d.sluice(&["run", "--class", "one", "--", "true"]);
    assert_eq!(code(&out), 75);
    let out = d.sluice(&["stats", "--prometheus"]);
    assert_eq!(code(&out), 0);
    let text = stdout(&out);
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        assert!(
            line.starts_with("sluice_"),
            "metric not named sluice_*: {line}"
        );
    }
    assert!(
        text.contains("sluice_refused_total{class=\"one\",reason=\"not_now\"} 1"),
        "{text}"
    );
    assert!(text.contains("sluice_in_flight{class=\"one\"} 1"), "{text}");
    signal(holder.id(), libc::SIGKILL);
    let _ = holder.wait();
}

#[test]
fn stats_watch_prints_a_json_line_per_sample() {
    let d = Daemon::start("[classes.a]\nmax_in_flight = 1\n");
    let mut child = d
        .sluice_cmd(&["stats", "--json", "--watch", "0.1"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut got = String::new();
    let mut buf = [0u8; 4096];
    while got.lines().count() < 3 {
        let n = stdout.read(&mut buf).unwrap();
        assert!(n > 0, "stats --watch ended early");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    signal(child.id(), libc::SIGKILL);
    let _ = child.wait();
    for line in got.lines().take(3) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(v["daemon"]["running"].as_bool().unwrap());
        assert_eq!(v["classes"][0]["name"], "a");
    }
}
