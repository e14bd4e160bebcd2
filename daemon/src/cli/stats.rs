//! `sluice stats [--json | --prometheus] [--watch SECS]`.

use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::path::Path;
use std::time::Duration;

use clap::Args;

use crate::exit;
use crate::stats::{FleetStats, Snapshot};

/// Arguments of `stats`.
#[derive(Args, Debug)]
pub struct StatsArgs {
    /// Print JSON: {"daemon": {...}, "classes": [...], "dependencies": [...]}
    /// (one line per sample
    /// with --watch).
    #[arg(long, conflicts_with = "prometheus")]
    pub json: bool,

    /// Print Prometheus text exposition (metrics named sluice_*).
    #[arg(long)]
    pub prometheus: bool,

    /// Print again every SECS seconds until interrupted.
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    pub watch: Option<f64>,
}

fn parse_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.05..=86_400.0).contains(&v) => Ok(v),
        _ => Err(format!(
            "{s:?} is not a number of seconds between 0.05 and 86400"
        )),
    }
}

/// Run `stats`.
pub fn run(region: &Path, args: &StatsArgs) -> i32 {
    let mut warned = false;
    loop {
        let snap = match Snapshot::read(region) {
            Ok(s) => s,
            Err(e) => return crate::cli::fail(exit::UNAVAILABLE, e),
        };
        if !snap.daemon.running && !warned {
            eprintln!(
                "sluice: warning: sluiced is not running (last pid {}, heartbeat {} ago): admissions go on from the region, but dead clients are not reclaimed until it is back",
                snap.daemon.pid,
                age(snap.daemon.heartbeat_age_ms)
            );
            warned = args.watch.is_some();
        }
        let text = if args.json {
            let j = if args.watch.is_some() {
                serde_json::to_string(&snap)
            } else {
                serde_json::to_string_pretty(&snap)
            };
            match j {
                Ok(s) => s + "\n",
                Err(e) => return crate::cli::fail(exit::SOFTWARE, e),
            }
        } else if args.prometheus {
            prometheus(&snap)
        } else {
            table(&snap, region)
        };
        let mut out = std::io::stdout().lock();
        if args.watch.is_some() && !args.json && std::io::stdout().is_terminal() {
            // Clear the screen and home the cursor between samples.
            let _ = out.write_all(b"\x1b[2J\x1b[H");
        }
        if out
            .write_all(text.as_bytes())
            .and_then(|_| out.flush())
            .is_err()
        {
            // Reader went away (a closed pipe): stop quietly.
            return exit::OK;
        }
        match args.watch {
            Some(secs) => std::thread::sleep(Duration::from_secs_f64(secs)),
            None => return exit::OK,
        }
    }
}

fn age(ms: u64) -> String {
    if ms >= 86_400_000 {
        format!("{}d", ms / 86_400_000)
    } else if ms >= 3_600_000 {
        format!("{}h", ms / 3_600_000)
    } else if ms >= 60_000 {
        format!("{}m", ms / 60_000)
    } else if ms >= 1_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else {
        format!("{ms}ms")
    }
}

/// The aligned table.
pub fn table(s: &Snapshot, region: &Path) -> String {
    let mut out = String::new();
    let d = &s.daemon;
    let state = match (d.running, d.draining) {
        (true, true) => "running, draining",
        (true, false) => "running",
        (false, _) => "DOWN",
    };
    let _ = writeln!(
        out,
        "sluiced {state} (pid {}, heartbeat {} ago) region {}, {} of {} clients attached{}",
        d.pid,
        age(d.heartbeat_age_ms),
        region.display(),
        d.clients,
        d.clients_capacity,
        if d.registry_full > 0 {
            format!(", {} attaches refused: registry full", d.registry_full)
        } else {
            String::new()
        }
    );
    let head = [
        "CLASS",
        "IN FLIGHT",
        "ADMITTED",
        "DEGRADED",
        "FROM QUEUE",
        "QUEUED",
        "REFUSED",
        "EXPIRED",
        "CANCELLED",
        "RECLAIMED",
        "TOKENS",
    ];
    let mut rows: Vec<Vec<String>> = vec![head.iter().map(|h| h.to_string()).collect()];
    for c in &s.classes {
        // Saturating: the counts come from the region, which anyone with
        // write access can scribble on.
        let refused = c.refused.values().fold(0u64, |a, &b| a.saturating_add(b));
        rows.push(vec![
            if c.paused {
                format!("{} (paused)", c.name)
            } else {
                c.name.clone()
            },
            match c.max_in_flight {
                Some(m) => format!("{}/{}", c.in_flight, m),
                None => format!("{}", c.in_flight),
            },
            c.admitted.to_string(),
            c.degraded.to_string(),
            c.granted_from_queue.to_string(),
            c.queued.to_string(),
            refused.to_string(),
            c.expired.to_string(),
            c.cancelled.to_string(),
            c.reclaimed.to_string(),
            match (c.tokens_available, c.burst) {
                (Some(t), Some(b)) => format!("{t}/{b}"),
                _ => "-".to_string(),
            },
        ]);
    }
    let widths: Vec<usize> = (0..head.len())
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    for r in &rows {
        let mut line = String::new();
        for (i, cell) in r.iter().enumerate() {
            if i == 0 {
                let _ = write!(line, "{cell:<w$}", w = widths[i]);
            } else {
                let _ = write!(line, "  {cell:>w$}", w = widths[i]);
            }
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
    let mut reasons = Vec::new();
    for c in &s.classes {
        let parts: Vec<String> = c
            .refused
            .iter()
            .filter(|(_, &n)| n > 0)
            .map(|(r, n)| format!("{r}={n}"))
            .collect();
        if !parts.is_empty() {
            reasons.push(format!("  {}: {}", c.name, parts.join(" ")));
        }
    }
    if !reasons.is_empty() {
        let _ = writeln!(out, "refused by reason:");
        for r in reasons {
            let _ = writeln!(out, "{r}");
        }
    }
    let mut waiting = Vec::new();
    for c in &s.classes {
        let lanes: Vec<String> = c
            .queued_by_lane
            .iter()
            .filter(|(_, &n)| n > 0)
            .map(|(l, n)| format!("{l}={n}"))
            .collect();
        let w = &c.wait_ms;
        if lanes.is_empty() && w.count == 0 {
            continue;
        }
        let mut line = format!("  {}:", c.name);
        if !lanes.is_empty() {
            let _ = write!(line, " queued {}", lanes.join(" "));
        }
        if let (Some(p50), Some(p99)) = (w.p50, w.p99) {
            let _ = write!(
                line,
                " waited p50 {p50:.1}ms p99 {p99:.1}ms (n={})",
                w.count
            );
        }
        waiting.push(line);
    }
    if !waiting.is_empty() {
        let _ = writeln!(out, "queues:");
        for w in waiting {
            let _ = writeln!(out, "{w}");
        }
    }
    if !s.dependencies.is_empty() {
        let deps: Vec<String> = s
            .dependencies
            .iter()
            .map(|d| {
                let mut t = format!("{} {}", d.name, d.state);
                if d.manual {
                    t.push_str(" (tripped by hand)");
                } else if let Some(ms) = d.retry_after_ms {
                    let _ = write!(t, " (probes in {ms}ms)");
                }
                t
            })
            .collect();
        let _ = writeln!(out, "dependencies: {}", deps.join(", "));
    }
    out
}

fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Prometheus text exposition.
pub fn prometheus(s: &Snapshot) -> String {
    let mut out = String::new();
    let d = &s.daemon;
    let _ = writeln!(
        out,
        "# HELP sluice_daemon_running 1 while sluiced holds the region lock."
    );
    let _ = writeln!(out, "# TYPE sluice_daemon_running gauge");
    let _ = writeln!(out, "sluice_daemon_running {}", u8::from(d.running));
    let _ = writeln!(out, "# HELP sluice_clients Client processes attached.");
    let _ = writeln!(out, "# TYPE sluice_clients gauge");
    let _ = writeln!(out, "sluice_clients {}", d.clients);
    let _ = writeln!(
        out,
        "# HELP sluice_registry_full_total Attaches refused: every client record taken."
    );
    let _ = writeln!(out, "# TYPE sluice_registry_full_total counter");
    let _ = writeln!(out, "sluice_registry_full_total {}", d.registry_full);
    let _ = writeln!(
        out,
        "# HELP sluice_daemon_heartbeat_age_seconds Time since the daemon's last heartbeat."
    );
    let _ = writeln!(out, "# TYPE sluice_daemon_heartbeat_age_seconds gauge");
    let _ = writeln!(
        out,
        "sluice_daemon_heartbeat_age_seconds {}",
        d.heartbeat_age_ms as f64 / 1000.0
    );
    type Get = fn(&crate::stats::ClassStats) -> Option<u64>;
    let series: [(&str, &str, &str, Get); 9] = [
        ("in_flight", "gauge", "Slots held now.", |c| {
            Some(c.in_flight)
        }),
        ("max_in_flight", "gauge", "Slot limit.", |c| c.max_in_flight),
        ("queued", "gauge", "Tickets waiting now.", |c| {
            Some(c.queued)
        }),
        ("admitted_total", "counter", "Grants.", |c| Some(c.admitted)),
        (
            "degraded_total",
            "counter",
            "Grants marked degraded.",
            |c| Some(c.degraded),
        ),
        (
            "granted_from_queue_total",
            "counter",
            "Grants that had waited.",
            |c| Some(c.granted_from_queue),
        ),
        ("cancelled_total", "counter", "Tickets cancelled.", |c| {
            Some(c.cancelled)
        }),
        ("expired_total", "counter", "Tickets expired.", |c| {
            Some(c.expired)
        }),
        (
            "reclaimed_total",
            "counter",
            "Permits returned from dead holders.",
            |c| Some(c.reclaimed),
        ),
    ];
    for (name, kind, help, get) in series {
        let _ = writeln!(out, "# HELP sluice_{name} {help}");
        let _ = writeln!(out, "# TYPE sluice_{name} {kind}");
        for c in &s.classes {
            if let Some(v) = get(c) {
                let _ = writeln!(out, "sluice_{name}{{class=\"{}\"}} {v}", label(&c.name));
            }
        }
    }
    let _ = writeln!(
        out,
        "# HELP sluice_queued_by_lane Tickets waiting now, by lane."
    );
    let _ = writeln!(out, "# TYPE sluice_queued_by_lane gauge");
    for c in &s.classes {
        for (lane, n) in &c.queued_by_lane {
            let _ = writeln!(
                out,
                "sluice_queued_by_lane{{class=\"{}\",lane=\"{lane}\"}} {n}",
                label(&c.name)
            );
        }
    }
    let _ = writeln!(
        out,
        "# HELP sluice_wait_seconds Wait before a grant from the queue."
    );
    let _ = writeln!(out, "# TYPE sluice_wait_seconds summary");
    for c in &s.classes {
        let w = &c.wait_ms;
        for (q, v) in [("0.5", w.p50), ("0.9", w.p90), ("0.99", w.p99)] {
            if let Some(ms) = v {
                let _ = writeln!(
                    out,
                    "sluice_wait_seconds{{class=\"{}\",quantile=\"{q}\"}} {}",
                    label(&c.name),
                    ms / 1000.0
                );
            }
        }
        let _ = writeln!(
            out,
            "sluice_wait_seconds_count{{class=\"{}\"}} {}",
            label(&c.name),
            w.count
        );
    }
    let _ = writeln!(
        out,
        "# HELP sluice_dependency_open 1 while a dependency's breaker is open (2: half-open)."
    );
    let _ = writeln!(out, "# TYPE sluice_dependency_open gauge");
    for d in &s.dependencies {
        let v = match d.state {
            "open" => 1,
            "half_open" => 2,
            _ => 0,
        };
        let _ = writeln!(
            out,
            "sluice_dependency_open{{dependency=\"{}\"}} {v}",
            label(&d.name)
        );
    }
    let _ = writeln!(out, "# HELP sluice_refused_total Refusals by reason.");
    let _ = writeln!(out, "# TYPE sluice_refused_total counter");
    for c in &s.classes {
        for (reason, n) in &c.refused {
            let _ = writeln!(
                out,
                "sluice_refused_total{{class=\"{}\",reason=\"{reason}\"}} {n}",
                label(&c.name)
            );
        }
    }
    // The fleet lease of each fleet class: (metric, type, help, value).
    type FleetMetric = (
        &'static str,
        &'static str,
        &'static str,
        fn(&FleetStats) -> u64,
    );
    let fleet_metrics: [FleetMetric; 12] = [
        (
            "leased_total",
            "counter",
            "Tokens leased from the fleet store.",
            |f| f.leased,
        ),
        ("used_total", "counter", "Leased tokens spent.", |f| f.used),
        (
            "returned_total",
            "counter",
            "Unspent tokens handed back.",
            |f| f.returned,
        ),
        (
            "expired_total",
            "counter",
            "Tokens voided by an expired lease.",
            |f| f.expired,
        ),
        (
            "credit",
            "gauge",
            "Credit left in the current lease.",
            |f| f.credit,
        ),
        (
            "on_fallback",
            "gauge",
            "1 while the lease has expired.",
            |f| u64::from(f.on_fallback),
        ),
        (
            "fallback_used_total",
            "counter",
            "Tokens spent on the fallback bucket.",
            |f| f.fallback_used,
        ),
        (
            "shadow_refused_total",
            "counter",
            "Would-be refusals in shadow mode.",
            |f| f.shadow_refused,
        ),
        (
            "lease_rtt_us",
            "gauge",
            "Last lease round trip in microseconds.",
            |f| f.lease_rtt_us,
        ),
        ("outages_total", "counter", "Fleet store outages.", |f| {
            f.outages
        }),
        ("hosts", "gauge", "Active hosts the store reported.", |f| {
            f.hosts
        }),
        (
            "config_mismatch",
            "gauge",
            "1 when the store holds another rate or burst.",
            |f| u64::from(f.config_mismatch),
        ),
    ];
    if s.classes.iter().any(|c| c.fleet.is_some()) {
        for (name, kind, help, get) in fleet_metrics {
            let _ = writeln!(out, "# HELP sluice_fleet_{name} {help}");
            let _ = writeln!(out, "# TYPE sluice_fleet_{name} {kind}");
            for c in &s.classes {
                if let Some(f) = &c.fleet {
                    let _ = writeln!(
                        out,
                        "sluice_fleet_{name}{{class=\"{}\"}} {}",
                        label(&c.name),
                        get(f)
                    );
                }
            }
        }
    }
    out
}
