//! `sluice fleet`: the fleet store's view, through the daemon (which knows
//! the store and its credentials): per class the fill, the active hosts,
//! and each host's demand and share.

use std::path::Path;

use clap::Args;
use serde_json::{json, Value};

use crate::cli::fail;
use crate::exit;

/// Options of `sluice fleet`.
#[derive(Args, Debug)]
pub struct FleetArgs {
    /// Print the view as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Ask the daemon for the store's view and print it.
pub fn run(region: &Path, socket: Option<&Path>, a: &FleetArgs) -> i32 {
    let socket = socket
        .map(Path::to_path_buf)
        .unwrap_or_else(|| crate::control::default_socket(region));
    let answer = match crate::control::request(&socket, &json!({"cmd": "fleet"})) {
        Ok(v) => v,
        Err(e) => {
            return fail(
                exit::UNAVAILABLE,
                format!(
                    "cannot reach sluiced at {}: {e}; is it running? (sluice stats)",
                    socket.display()
                ),
            )
        }
    };
    if answer.get("ok").and_then(Value::as_bool) != Some(true) {
        let e = answer
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or("refused");
        return fail(
            exit::UNAVAILABLE,
            format!("{e}; check the [fleet] table and that the store is up"),
        );
    }
    let view = &answer["fleet"];
    if a.json {
        println!("{view}");
        return exit::OK;
    }
    println!(
        "store {} namespace {}",
        view["store"].as_str().unwrap_or("?"),
        view["namespace"].as_str().unwrap_or("?")
    );
    for c in view["classes"].as_array().into_iter().flatten() {
        println!(
            "class {}: fill {}/{} at {:.3}/s, {} active hosts",
            c["name"].as_str().unwrap_or("?"),
            c["fill"],
            c["burst"],
            c["rate"].as_f64().unwrap_or(0.0),
            c["active_hosts"]
        );
        for h in c["hosts"].as_array().into_iter().flatten() {
            println!(
                "  {:<40} demand {:>10.1}/s  weight {:>4}  share {:>5.1}%",
                h["host"].as_str().unwrap_or("?"),
                h["demand_per_s"].as_f64().unwrap_or(0.0),
                h["weight"],
                100.0 * h["share"].as_f64().unwrap_or(0.0)
            );
        }
    }
    exit::OK
}
