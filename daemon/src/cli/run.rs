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
use sluice_client::{fmt_duration, Client, Decision, Lane, Request};

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

    /// The command and its arguments (after `--`).
    #[arg(last = true, required = true, value_name = "CMD")]
    pub command: Vec<OsString>,
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
        .attempt(args.attempt);
    let permit = match class.try_acquire(&req) {
        Ok(Decision::Admitted(p)) => p,
        Ok(Decision::Refused(no)) => {
            let mut msg = format!("class {} {no}", args.class);
            if let Some(d) = no.retry_after {
                msg.push_str(&format!(
                    " (SLUICE_RETRY_AFTER_MS={})",
                    d.as_millis().max(1)
                ));
            }
            return fail(exit::TEMPFAIL, msg);
        }
        Err(e) => return fail(exit::USAGE, e),
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
            Ok(())
        });
    }
    install_forwarding();
    let mut child = match cmd.spawn() {
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
    CHILD.store(child.id() as i32, StdOrdering::SeqCst);
    let status = child.wait();
    CHILD.store(0, StdOrdering::SeqCst);
    drop(permit);
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => code,
            (None, Some(sig)) => 128 + sig,
            _ => exit::SOFTWARE,
        },
        Err(e) => fail(exit::OSERR, format!("waiting for the command: {e}")),
    }
}

/// Format a retry-after for messages (re-exported for tests).
pub fn retry_text(d: std::time::Duration) -> String {
    fmt_duration(d)
}
