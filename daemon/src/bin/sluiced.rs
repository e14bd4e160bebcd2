//! `sluiced`: the daemon that owns a sluice region.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use sluice_daemon::config::Config;
use sluice_daemon::daemon::{self, DaemonError, Options};
use sluice_daemon::exit;

/// The sluice daemon: creates the shared-memory region, keeps it healthy,
/// returns what dead clients held, and serves the control socket.
///
/// Clients decide admissions on their own from the region; the daemon is
/// never on that path. With no --config it runs an embedded default with
/// example classes (`default`, `reports`, `imports`, `one`, `reads`, `api`;
/// `sluice check-config --print-default` prints it).
///
/// Signals: SIGHUP reloads the config (a bad file is logged with its line
/// and column and the old config stays); SIGTERM or SIGINT drains (new work
/// is refused `shutting_down`, holders may release) and exits once nothing
/// is held or after daemon.drain_timeout. Runs under systemd as Type=notify
/// (see packaging/sluiced.service).
#[derive(Parser, Debug)]
#[command(name = "sluiced", version)]
struct Args {
    /// Config file (TOML). Left out: the embedded default
    /// (see `sluice check-config --print-default`).
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,

    /// Region file. Overrides the config's region.path; default
    /// /dev/shm/sluice.
    #[arg(long, value_name = "PATH", env = "SLUICE_REGION")]
    region: Option<PathBuf>,

    /// More logging (-v debug, -vv trace).
    #[arg(short, long, action = clap::ArgAction::Count)]
    verbose: u8,

    /// Less logging (warnings and errors only).
    #[arg(short, long, conflicts_with = "verbose")]
    quiet: bool,
}

fn main() -> ExitCode {
    // Before anything else: a SIGHUP that arrives while we start must not
    // kill us (its default action); it is acted on once the loop runs.
    if let Err(e) = daemon::install_signals() {
        eprintln!("sluiced: installing signal handlers: {e}");
        return ExitCode::from(exit::OSERR as u8);
    }
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let code = if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            };
            let _ = e.print();
            return ExitCode::from(code as u8);
        }
    };
    sluice_daemon::init_logging(args.quiet, args.verbose, ["warn", "info", "debug", "trace"]);

    let config = match &args.config {
        Some(path) => match Config::load(path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("sluiced: {e}");
                eprintln!("sluiced: fix the file (check it with `sluice check-config {}`) and start again", path.display());
                return ExitCode::from(exit::CONFIG as u8);
            }
        },
        None => Config::embedded_default(),
    };
    let region_path = args
        .region
        .clone()
        .or_else(|| config.region.path.clone())
        .unwrap_or_else(|| PathBuf::from(sluice_client::DEFAULT_REGION));
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        config = %args.config.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "embedded default".into()),
        "sluiced starting"
    );
    let opts = Options {
        config_path: args.config.clone(),
        region_path,
    };
    match daemon::run(config, opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("sluiced: {e}");
            let code = match &e {
                DaemonError::Region(sluice_daemon::region::RegionError::Config(_)) => exit::CONFIG,
                DaemonError::Region(sluice_daemon::region::RegionError::Locked { .. }) => {
                    exit::UNAVAILABLE
                }
                DaemonError::Region(sluice_daemon::region::RegionError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::PermissionDenied =>
                {
                    exit::NOPERM
                }
                DaemonError::Region(_) => exit::UNAVAILABLE,
                _ => exit::OSERR,
            };
            ExitCode::from(code as u8)
        }
    }
}
