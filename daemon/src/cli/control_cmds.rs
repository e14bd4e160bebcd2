//! `sluice pause CLASS`, `resume CLASS`, `trip DEP`, `heal DEP`: operator
//! actions applied (and audited) by the daemon through its control socket.

use std::path::Path;

use clap::Args;
use serde_json::json;

use crate::cli::fail;
use crate::exit;

/// A class name.
#[derive(Args, Debug)]
pub struct ClassArg {
    /// The class.
    #[arg(value_name = "CLASS")]
    pub class: String,
}

/// A dependency name.
#[derive(Args, Debug)]
pub struct DepArg {
    /// The dependency (a `[dependencies.NAME]` of the config).
    #[arg(value_name = "DEP")]
    pub dependency: String,
}

/// Send `req` to the daemon; on success print what `ok` makes of its
/// answer and exit 0, else say why (64 refused, 69 unreachable).
pub fn send_with(
    region: &Path,
    socket: Option<&Path>,
    req: serde_json::Value,
    ok: impl FnOnce(&serde_json::Value) -> String,
) -> i32 {
    let socket = socket
        .map(Path::to_path_buf)
        .unwrap_or_else(|| crate::control::default_socket(region));
    match crate::control::request(&socket, &req) {
        Ok(answer) if answer.get("ok").and_then(|v| v.as_bool()) == Some(true) => {
            println!("{}", ok(&answer));
            exit::OK
        }
        Ok(answer) => {
            let e = answer
                .get("error")
                .and_then(|v| v.as_str())
                .unwrap_or("refused");
            fail(exit::USAGE, e)
        }
        Err(e) => fail(
            exit::UNAVAILABLE,
            format!(
                "cannot reach sluiced at {}: {e}; is it running? (sluice stats)",
                socket.display()
            ),
        ),
    }
}

/// Send `req` to the daemon and print `ok` (or fail with its error).
pub fn send(region: &Path, socket: Option<&Path>, req: serde_json::Value, ok: &str) -> i32 {
    send_with(region, socket, req, |_| ok.to_string())
}

/// `pause` / `resume`.
pub fn pause(region: &Path, socket: Option<&Path>, a: &ClassArg, pause: bool) -> i32 {
    let cmd = if pause { "pause" } else { "resume" };
    let msg = if pause {
        format!("class {}: paused (new work is refused `paused`, or held as paused_by_owner where on_paused = \"queue\")", a.class)
    } else {
        format!("class {}: resumed", a.class)
    };
    send(region, socket, json!({"cmd": cmd, "class": a.class}), &msg)
}

/// `trip` / `heal`.
pub fn trip(region: &Path, socket: Option<&Path>, a: &DepArg, trip: bool) -> i32 {
    let cmd = if trip { "trip" } else { "heal" };
    let msg = if trip {
        format!("dependency {}: tripped open by hand (refused `dependency`, no retry-after, until `sluice heal {}`)", a.dependency, a.dependency)
    } else {
        format!("dependency {}: healed (closed)", a.dependency)
    };
    send(
        region,
        socket,
        json!({"cmd": cmd, "dependency": a.dependency}),
        &msg,
    )
}
