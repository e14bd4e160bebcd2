//! `sluice run --class NAME [--lane L] [--cost N] [--attempt N] -- CMD ARGS...`
//!
//! Holds a permit while a command runs. The child dies with us
//! (`PR_SET_PDEATHSIG`), signals sent to us are forwarded to it, and we exit
//! with its status (128 + signal when it was killed). The permit is released
//! when the child ends; if we are killed instead, the daemon returns it.

use std::ffi::OsString;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicI32, Ordering as StdOrdering};

use clap::Args;
use sluice_client::{
    fmt_duration, Client, Enqueued, Lane, Outcome, Request, TicketState, WorkOutcome,
};

use crate::cli::fail;
use crate::exit;

/// Arguments of `run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// The class to ask.
    #[arg(long, value_name = "NAME")]
    pub class: String,

    /// Priority lane: critical, interactive, batch or maintenance.
    #[arg(long, value_name = "L", default_value = "interactive")]
    pub lane: Lane,

    /// Units of cost (tokens and slots), at least 1.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    pub cost: u64,

    /// Which attempt this is (1 = first); retries draw on the retry budget.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub attempt: u32,

    /// Tenant key (required by classes with `tenants = true`): its tier's
    /// rate and quota apply.
    #[arg(long, value_name = "KEY")]
    pub tenant: Option<String>,

    /// Accept a partial grant: the largest cost admissible now (the child
    /// sees it in SLUICE_GRANTED).
    #[arg(long)]
    pub allow_partial: bool,

    /// Wait up to DUR (e.g. 500ms, 30s, 5m) in the lane's queue instead of
    /// being refused at once. Expired or cancelled while waiting: exit 75.
    #[arg(long, value_name = "DUR", value_parser = parse_wait)]
    pub wait: Option<std::time::Duration>,

    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<OsString>,
}

fn parse_wait(s: &str) -> Result<std::time::Duration, String> {
    crate::config::parse_duration(s)
}

static CHILD: AtomicI32 = AtomicI32::new(0);

extern "C" fn forward(sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // Only async-signal-safe calls here: an atomic load and kill(2).
    let child = CHILD.load(StdOrdering::SeqCst);
    if child <= 0 {
        return;
    }
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler.
    let code = unsafe { (*info).si_code };
    // A signal the kernel raised for the terminal (Ctrl-C, Ctrl-\) already
    // reached the child, which shares our process group: do not send twice.
    if code == libc::SI_KERNEL {
        return;
    }
    // SAFETY: kill(2) is async-signal-safe and takes plain integers.
    unsafe { libc::kill(child, sig) };
}

const FORWARDED: [libc::c_int; 7] = [
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGWINCH,
];

fn install_forwarding() {
    for sig in FORWARDED {
        // SAFETY: sigaction is a plain C struct; all-zero is a valid start.
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        act.sa_sigaction = forward as *const () as usize;
        act.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        // SAFETY: `act` is initialised and outlives the call; the handler
        // only does async-signal-safe work.
        unsafe { libc::sigaction(sig, &act, std::ptr::null_mut()) };
    }
}

/// Run `run`.
pub fn run(region: &Path, args: RunArgs) -> i32 {
    let client = match Client::attach(region) {
        Ok(c) => c,
        Err(e) => return fail(exit::UNAVAILABLE, e),
    };
    let class = match client.class(&args.class) {
        Ok(c) => c,
        Err(e) => return fail(exit::USAGE, e),
    };
    let req = Request::new()
        .cost(args.cost)
        .lane(args.lane)
        .attempt(args.attempt)
        .allow_partial(args.allow_partial);
    let req = match &args.tenant {
        Some(t) => req.tenant(t),
        None => req,
    };
    let wait = args.wait.unwrap_or(std::time::Duration::ZERO);
    let outcome = match class.enqueue_across_leases(&req, wait) {
        Ok(Enqueued::Done(o)) => o,
        Ok(Enqueued::Queued(ticket)) => {
            if let TicketState::Queued { position, eta } = ticket.state() {
                let eta = eta.map(fmt_duration).unwrap_or_else(|| "unknown".into());
                tracing::info!(ticket = ticket.id(), position, %eta, "queued");
            }
            ticket.wait()
        }
        Err(e) => return fail(exit::USAGE, e),
    };
    let permit = match outcome {
        Outcome::Admitted(p) => p,
        Outcome::Refused(no) => {
            let mut msg = format!("class {} {no}", args.class);
            if let Some(d) = no.retry_after {
                msg.push_str(&format!(
                    " (SLUICE_RETRY_AFTER_MS={})",
                    d.as_nanos().div_ceil(1_000_000).max(1)
                ));
            }
            return fail(exit::TEMPFAIL, msg);
        }
        Outcome::Expired(x) => {
            return fail(
                exit::TEMPFAIL,
                format!("class {}: ticket {} {x}", args.class, x.ticket),
            )
        }
        Outcome::Cancelled { ticket } => {
            return fail(
                exit::TEMPFAIL,
                format!(
                    "class {}: ticket {ticket} cancelled while queued",
                    args.class
                ),
            )
        }
    };
    if permit.degraded() {
        tracing::info!(class = %args.class, "admitted degraded");
    }

    let (prog, rest) = match args.command.split_first() {
        Some(x) => x,
        None => return fail(exit::USAGE, "no command given after --"),
    };
    let parent = std::process::id() as libc::pid_t;
    let mut cmd = Command::new(prog);
    cmd.args(rest)
        .env("SLUICE_CLASS", &args.class)
        .env("SLUICE_GRANTED", permit.cost().to_string());
    if permit.degraded() {
        cmd.env("SLUICE_DEGRADED", "1");
    } else {
        cmd.env_remove("SLUICE_DEGRADED");
    }
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls (prctl, getppid, kill).
    unsafe {
        cmd.pre_exec(move || {
            // Die with us: if sluice is killed, so is the command.
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // We may have died between fork and prctl.
            if libc::getppid() != parent {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
            // The parent blocked the forwarded signals around the spawn;
            // the command starts with them unblocked.
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for sig in FORWARDED {
                libc::sigaddset(&mut set, sig);
            }
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            Ok(())
        });
    }
    install_forwarding();
    // Block the forwarded signals until the child's pid is known, so none
    // arriving around the spawn is lost; the child unblocks them itself.
    let mut set = nix::sys::signal::SigSet::empty();
    for sig in FORWARDED {
        if let Ok(s) = nix::sys::signal::Signal::try_from(sig) {
            set.add(s);
        }
    }
    let _ = nix::sys::signal::pthread_sigmask(
        nix::sys::signal::SigmaskHow::SIG_BLOCK,
        Some(&set),
        None,
    );
    let spawned = cmd.spawn();
    if let Ok(c) = &spawned {
        CHILD.store(c.id() as i32, StdOrdering::SeqCst);
    }
    let _ = nix::sys::signal::pthread_sigmask(
        nix::sys::signal::SigmaskHow::SIG_UNBLOCK,
        Some(&set),
        None,
    );
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            drop(permit);
            let code = match e.kind() {
                std::io::ErrorKind::NotFound => 127,
                std::io::ErrorKind::PermissionDenied => 126,
                _ => exit::OSERR,
            };
            return fail(code, format!("cannot run {}: {e}", prog.to_string_lossy()));
        }
    };
    let (status, told) = wait_child(&mut child, &permit);
    CHILD.store(0, StdOrdering::SeqCst);
    // Report how it went, so the class's dependency breakers hear it: exit
    // 0 completed; stopped after a cancel request cancelled; else failed.
    let outcome = match &status {
        _ if told => WorkOutcome::Cancelled,
        Ok(s) if s.success() => WorkOutcome::Completed,
        _ => WorkOutcome::Failed,
    };
    permit.release_with(outcome);
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => code,
            (None, Some(sig)) => 128 + sig,
            _ => exit::SOFTWARE,
        },
        Err(e) => fail(exit::OSERR, format!("waiting for the command: {e}")),
    }
}

/// Wait for the command; if the permit's holder is asked to stop (`sluice
/// cancel`), send the command SIGTERM (once) and keep waiting for it.
fn wait_child(
    child: &mut std::process::Child,
    permit: &sluice_client::Permit<'_>,
) -> (std::io::Result<std::process::ExitStatus>, bool) {
    let mut told = false;
    let mut nap = 1u64;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return (Ok(status), told),
            Ok(None) => {}
            Err(e) => return (Err(e), told),
        }
        if !told && permit.cancel_requested() {
            told = true;
            tracing::warn!(ticket = ?permit.ticket_id(), "cancel requested: sending the command SIGTERM");
            // SAFETY: kill(2) with the pid of our own child, not yet reaped.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        }
        std::thread::sleep(std::time::Duration::from_millis(nap));
        nap = (nap * 2).min(20);
    }
}
