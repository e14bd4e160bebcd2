//! `sluice tickets [--json]` and `sluice cancel TICKET`.

use std::fmt::Write as _;
use std::path::Path;

use clap::Args;
use serde_json::json;
use sluice_client::RegionMap;

use crate::cli::fail;
use crate::exit;
use crate::stats::{tickets, TicketInfo};

/// Arguments of `tickets`.
#[derive(Args, Debug)]
pub struct TicketsArgs {
    /// Print JSON: {"tickets": [{"id", "class", "lane", "state",
    /// "position", "eta_ms", "age_ms", "pid", ...}]}.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `cancel`.
#[derive(Args, Debug)]
pub struct CancelArgs {
    /// The ticket id, as `sluice tickets` shows it.
    #[arg(value_name = "TICKET")]
    pub ticket: u64,
}

/// Run `tickets`.
pub fn run(region: &Path, args: &TicketsArgs) -> i32 {
    let map = match RegionMap::open(region, false) {
        Ok(m) => m,
        Err(e) => return fail(exit::UNAVAILABLE, e),
    };
    let list = tickets(&map);
    if args.json {
        println!("{}", json!({ "tickets": list }));
    } else {
        print!("{}", table(&list));
    }
    exit::OK
}

fn table(list: &[TicketInfo]) -> String {
    if list.is_empty() {
        return "no tickets: nothing is waiting, and no permit from `acquire` is held\n".into();
    }
    let head = [
        "ID", "CLASS", "LANE", "STATE", "POS", "ETA", "AGE", "PID", "COST",
    ];
    let mut rows: Vec<Vec<String>> = vec![head.iter().map(|h| h.to_string()).collect()];
    for t in list {
        let mut state = t.state.to_string();
        if t.cancel_requested {
            state.push_str(" (cancel requested)");
        }
        rows.push(vec![
            t.id.to_string(),
            t.class.clone(),
            t.lane.clone(),
            state,
            t.position
                .map(|p| p.to_string())
                .unwrap_or_else(|| "-".into()),
            match (t.state, t.eta_ms) {
                ("queued", Some(ms)) => format!("{ms}ms"),
                ("queued", None) => "unknown".into(),
                _ => "-".into(),
            },
            format!("{}ms", t.age_ms),
            t.pid.to_string(),
            t.cost.to_string(),
        ]);
    }
    let widths: Vec<usize> = (0..head.len())
        .map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, cell) in r.iter().enumerate() {
            let _ = write!(line, "{cell:<w$}  ", w = widths[i]);
        }
        let _ = writeln!(out, "{}", line.trim_end());
    }
    out
}

/// Run `cancel`.
pub fn cancel(region: &Path, socket: Option<&Path>, args: &CancelArgs) -> i32 {
    let id = args.ticket;
    let req = json!({"cmd": "cancel", "ticket": id});
    crate::cli::control_cmds::send_with(region, socket, req, |answer| {
        match answer.get("result").and_then(|v| v.as_str()) {
            Some("cancel_requested") => {
                format!("ticket {id}: granted; its holder was asked to stop")
            }
            _ => format!("ticket {id}: cancelled"),
        }
    })
}
