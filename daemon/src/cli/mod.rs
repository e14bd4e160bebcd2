//! The `sluice` ops command: one module per subcommand. Doc comments are the
//! help text.

pub mod check_config;
pub mod control_cmds;
pub mod fleet;
pub mod run;
pub mod stats;
pub mod tickets;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::exit;

/// sluice: admission control for one host, in shared memory.
///
/// Reads and steers the region that `sluiced` serves. Every request gets an
/// explicit decision: admitted (maybe degraded), or refused with a reason and,
/// where one exists, the time to come back.
///
/// Exit codes: 0 ok; 64 usage error (bad flag, unknown class, cost 0); 69
/// region missing or unusable; 75 the work was not run (refused, expired or
/// cancelled while queued: reason and retry-after on stderr); 78 bad config.
/// `sluice run` otherwise exits with its command's status (128 + signal when
/// the command was killed; 127 when it does not exist, 126 when it cannot be
/// executed).
#[derive(Parser, Debug)]
#[command(name = "sluice", version, propagate_version = true)]
pub struct Cli {
    /// Region file [default: /dev/shm/sluice].
    #[arg(long, global = true, value_name = "PATH", env = "SLUICE_REGION")]
    pub region: Option<PathBuf>,

    /// Control socket of the daemon [default: the region path + ".sock"].
    #[arg(long, global = true, value_name = "PATH", env = "SLUICE_CONTROL")]
    pub control_socket: Option<PathBuf>,

    /// More logging.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Only errors.
    #[arg(short, long, global = true)]
    pub quiet: bool,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Show the daemon and every class: in flight, admitted, degraded,
    /// refused by reason. Exits 0 (with a warning) even when sluiced is down.
    Stats(stats::StatsArgs),
    /// Run a command while holding a permit of a class, like flock or GNU
    /// sem with lanes, rates and crash safety.
    ///
    /// Refused: exits 75 without running it, the reason and any retry-after
    /// on stderr. Admitted: runs it (SLUICE_CLASS, SLUICE_GRANTED and, when
    /// degraded, SLUICE_DEGRADED=1 in its environment), forwards signals,
    /// kills it if sluice dies, releases the permit when it ends and exits
    /// with its status.
    ///
    /// Example: sluice run --class reports -- ./make-report.sh --daily
    Run(run::RunArgs),
    /// List live tickets: queued (with position and ETA), granted (held
    /// permits from a waiting acquire), verifying (their holder died).
    Tickets(tickets::TicketsArgs),
    /// Cancel a ticket through the daemon: a queued one leaves the queue
    /// (its `sluice run --wait` exits 75); a granted one's holder is asked
    /// to stop (`sluice run` sends its command SIGTERM).
    Cancel(tickets::CancelArgs),
    /// Pause a class: new work is refused `paused` (or held as
    /// paused_by_owner where `on_paused = "queue"`). Held permits stay.
    Pause(control_cmds::ClassArg),
    /// Resume a paused class; held tickets are granted as capacity allows.
    Resume(control_cmds::ClassArg),
    /// Trip a dependency's circuit breaker by hand: its classes refuse
    /// `dependency` (no retry-after) until healed.
    Trip(control_cmds::DepArg),
    /// Heal (close) a dependency's circuit breaker.
    Heal(control_cmds::DepArg),
    /// Check a config file; prints a summary, or the error with its line and
    /// column (exit 78).
    CheckConfig(check_config::CheckArgs),
    /// Show the fleet store's view through the daemon: per fleet class the
    /// bucket's fill, the active hosts, each host's demand and share.
    Fleet(fleet::FleetArgs),
}

/// Parse the command line and run; returns the process exit code.
pub fn main() -> i32 {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            };
        }
    };
    crate::init_logging(cli.quiet, cli.verbose, ["error", "warn", "info", "debug"]);
    let region = sluice_client::region_path(cli.region.as_deref());
    match cli.command {
        Command::Stats(a) => stats::run(&region, &a),
        Command::Run(a) => run::run(&region, a),
        Command::Tickets(a) => tickets::run(&region, &a),
        Command::Cancel(a) => tickets::cancel(&region, cli.control_socket.as_deref(), &a),
        Command::Pause(a) => control_cmds::pause(&region, cli.control_socket.as_deref(), &a, true),
        Command::Resume(a) => {
            control_cmds::pause(&region, cli.control_socket.as_deref(), &a, false)
        }
        Command::Trip(a) => control_cmds::trip(&region, cli.control_socket.as_deref(), &a, true),
        Command::Heal(a) => control_cmds::trip(&region, cli.control_socket.as_deref(), &a, false),
        Command::CheckConfig(a) => check_config::run(&a),
        Command::Fleet(a) => fleet::run(&region, cli.control_socket.as_deref(), &a),
    }
}

/// Print an error the CLI way: `sluice: ...` on stderr.
pub fn fail(code: i32, msg: impl std::fmt::Display) -> i32 {
    eprintln!("sluice: {msg}");
    code
}
