//! `sluiced`'s life: set up the region, then a boring maintenance loop.
//!
//! Each turn of the loop (at most every 50 ms, at once when a watched
//! process exits or a signal arrives): write the heartbeat, retire clients
//! that died or detached, apply a pending reload or drain, ping the systemd
//! watchdog. The control socket is served on its own thread. Nothing here is
//! on the admission path: clients decide without the daemon.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering as StdOrdering};
use std::time::{Duration, Instant};

use serde_json::json;
use sluice_client::clock::monotonic_ns;
use sluice_shm_layout::layout::FLAG_DRAINING;
use sluice_shm_layout::slots;
use sluice_shm_layout::sync::Ordering;

use crate::config::Config;
use crate::reclaim::Watcher;
use crate::region::{self, OwnedRegion};

static TERMINATE: AtomicBool = AtomicBool::new(false);
static RELOAD: AtomicBool = AtomicBool::new(false);

/// SIGBUS: the region file was truncated under us and a cut-off page was
/// touched. Nothing in the mapping can be trusted; say so and exit (systemd
/// restarts the daemon; the next one refuses the truncated file clearly).
// Known shortcoming: clients touching a truncated region get SIGBUS too; only the daemon says why.
extern "C" fn on_sigbus(_sig: libc::c_int) {
    const MSG: &[u8] = b"sluiced: SIGBUS: the region file was truncated under the daemon; exiting (remove the file and start again)\n";
    // SAFETY: write(2) and _exit(2) are async-signal-safe; MSG is a valid
    // buffer of its length.
    unsafe {
        libc::write(2, MSG.as_ptr().cast(), MSG.len());
        libc::_exit(70);
    }
}

extern "C" fn on_signal(sig: libc::c_int) {
    // Only async-signal-safe work here: set a flag.
    match sig {
        libc::SIGHUP => RELOAD.store(true, StdOrdering::SeqCst),
        _ => TERMINATE.store(true, StdOrdering::SeqCst),
    }
}

/// Install the SIGINT, SIGTERM and SIGHUP handlers. `main` calls this
/// first, so an early SIGHUP neither kills the daemon nor is lost.
pub fn install_signals() -> std::io::Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    // No SA_RESTART: a signal interrupts the loop's poll so it acts at once.
    let act = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    let bus = SigAction::new(
        SigHandler::Handler(on_sigbus),
        SaFlags::empty(),
        SigSet::empty(),
    );
    // SAFETY: the handler only calls write(2) and _exit(2), both
    // async-signal-safe.
    unsafe { sigaction(Signal::SIGBUS, &bus) }.map_err(std::io::Error::from)?;
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        // SAFETY: the handler only stores to atomics, which is
        // async-signal-safe.
        unsafe { sigaction(sig, &act) }.map_err(std::io::Error::from)?;
    }
    Ok(())
}

/// How the daemon was asked to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// The config file, if any (re-read on SIGHUP).
    pub config_path: Option<PathBuf>,
    /// The region path.
    pub region_path: PathBuf,
}

/// Why the daemon stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Region setup failed.
    #[error(transparent)]
    Region(#[from] region::RegionError),
    /// The control socket could not be set up.
    #[error("control socket {path}: {source}")]
    Control {
        /// Socket path.
        path: PathBuf,
        /// Error.
        source: std::io::Error,
    },
    /// Signal handlers could not be installed.
    #[error("installing signal handlers: {0}")]
    Signals(std::io::Error),
}

fn notify(states: &[sd_notify::NotifyState<'_>]) {
    // Errors mean no systemd is listening (or it went away): nothing to do.
    let _ = sd_notify::notify(false, states);
}

/// Run the daemon until SIGTERM/SIGINT and the drain that follows.
pub fn run(mut config: Config, opts: Options) -> Result<(), DaemonError> {
    install_signals().map_err(DaemonError::Signals)?;
    let owned = std::sync::Arc::new(region::open_region(
        &opts.region_path,
        &config,
        monotonic_ns(),
    )?);
    // The region the daemon serves now; replaced if the file vanishes.
    let current = std::sync::Arc::new(std::sync::Mutex::new(std::sync::Arc::clone(&owned)));
    let region_path = owned.path().to_path_buf();
    tracing::info!(
        region = %region_path.display(),
        created = owned.created,
        generation = owned.region().header().generation.load(Ordering::Relaxed),
        classes = config.classes.len(),
        "region ready"
    );

    let socket = config
        .daemon
        .control_socket
        .clone()
        .unwrap_or_else(|| crate::control::default_socket(&region_path));
    let listener = crate::control::bind(&socket, config.region.mode).map_err(|source| {
        DaemonError::Control {
            path: socket.clone(),
            source,
        }
    })?;
    let pid = std::process::id();
    // The config in force, for the leasing thread and `sluice fleet`.
    let shared_config = std::sync::Arc::new(std::sync::Mutex::new(config.clone()));
    let config_for_control = std::sync::Arc::clone(&shared_config);
    let shared = std::sync::Arc::clone(&current);
    std::thread::Builder::new()
        .name("control".into())
        .spawn(move || {
            crate::control::serve(listener, move |req, peer| {
                let owned = shared.lock().unwrap_or_else(|e| e.into_inner()).clone();
                if req.get("cmd").and_then(|c| c.as_str()) == Some("fleet") {
                    let cfg = config_for_control
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .clone();
                    return match crate::fleet::store_view(&cfg) {
                        Ok(view) => json!({"ok": true, "fleet": view}),
                        Err(e) => json!({"ok": false, "error": e}),
                    };
                }
                answer(&owned, req, peer, pid)
            })
        })
        .map_err(|source| DaemonError::Control {
            path: socket.clone(),
            source,
        })?;
    tracing::info!(socket = %socket.display(), "control socket listening");
    if let Some(addr) = config.daemon.metrics_listen {
        match crate::metrics::spawn(addr, std::sync::Arc::clone(&current)) {
            Ok(()) => tracing::info!(%addr, "serving Prometheus metrics over HTTP"),
            Err(e) => {
                tracing::warn!(%addr, error = %e, "cannot serve metrics over HTTP; sluice stats --prometheus still works")
            }
        }
    }
    // Attaching clients send a datagram here so the daemon watches them at
    // once (optional: without it they are found by the next scan).
    let wake_path = sluice_client::map::wake_socket(&region_path);
    let _ = std::fs::remove_file(&wake_path);
    let wake = std::os::unix::net::UnixDatagram::bind(&wake_path)
        .and_then(|w| {
            w.set_nonblocking(true)?;
            std::fs::set_permissions(
                &wake_path,
                std::os::unix::fs::PermissionsExt::from_mode(config.region.mode),
            )?;
            Ok(w)
        })
        .map_err(|e| tracing::warn!(path = %wake_path.display(), error = %e, "no wake socket; new clients are found by the periodic scan"))
        .ok();

    let status = format!(
        "serving {} classes on {}",
        config.classes.len(),
        region_path.display()
    );
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&status),
    ]);
    // The leasing thread: idle without a [fleet] table; it follows reloads
    // through `shared_config` and returns the credit when `stop_leasing`.
    let stop_leasing = std::sync::Arc::new(AtomicBool::new(false));
    let leasing = crate::fleet::spawn(
        std::sync::Arc::clone(&current),
        std::sync::Arc::clone(&shared_config),
        std::sync::Arc::clone(&stop_leasing),
    )
    .map_err(|e| tracing::error!(error = %e, "cannot start the fleet leasing thread; fleet classes run on their fallback"))
    .ok();

    let mut watchdog_usec = 0u64;
    let watchdog = sd_notify::watchdog_enabled(false, &mut watchdog_usec);
    let mut last_ping = Instant::now();

    let mut watcher;
    watcher = Watcher::default();
    let mut rates = crate::maintain::RateSampler::default();
    let mut last_seed = Instant::now();
    let mut last_audit_log = Instant::now()
        .checked_sub(Duration::from_secs(60))
        .unwrap_or_else(Instant::now);
    let mut breakers = crate::maintain::Breakers::default();
    let mut drain_deadline: Option<Instant> = None;
    let mut owned = owned;
    loop {
        if region::truncated(&owned) {
            let res = region::regrow(&owned);
            tracing::error!(region = %owned.path().display(), regrown = res.is_ok(), "region file was truncated under the daemon: grew it back to its size; what was cut off is lost (zeros)");
        }
        if region::vanished(&owned) {
            match region::recreate(&owned, &config, monotonic_ns()) {
                Ok(fresh) => {
                    let fresh = std::sync::Arc::new(fresh);
                    *current.lock().unwrap_or_else(|e| e.into_inner()) =
                        std::sync::Arc::clone(&fresh);
                    owned = fresh;
                    watcher = Watcher::default();
                }
                Err(e) => {
                    tracing::error!(error = %e, "region file vanished and could not be re-created; clients attached keep working on their mapping");
                }
            }
        }
        let region = owned.region();
        // Relaxed: advisory, read by stats.
        region
            .header()
            .heartbeat_ns
            .store(monotonic_ns(), Ordering::Relaxed);
        for r in watcher.scan(region) {
            log_retired(&r);
        }
        if last_seed.elapsed() >= Duration::from_secs(1) {
            last_seed = Instant::now();
            region::seed_tenant_keys(region, &config, &region::tier_names(&config));
            crate::maintain::evict_tenants(region);
            crate::maintain::clear_overcommit(region);
            let mut found = crate::maintain::audit_header(region, drain_deadline.is_some());
            let orphans = crate::maintain::audit_slots(region);
            if orphans > 0 {
                found.push(format!(
                    "{orphans} slot words held by no registered client: returned"
                ));
            }
            if !found.is_empty() && last_audit_log.elapsed() >= Duration::from_secs(10) {
                last_audit_log = Instant::now();
                tracing::warn!(findings = %found.join("; "), "region was written by something other than sluice; repaired what the daemon owns");
            }
        }
        rates.sample(region);
        breakers.tick(region);
        crate::maintain::dispatch_all(region);
        crate::reclaim::expire_verifying(region);

        if RELOAD.swap(false, StdOrdering::SeqCst) {
            config = reload(&owned, config, opts.config_path.as_deref());
            *shared_config.lock().unwrap_or_else(|e| e.into_inner()) = config.clone();
        }
        if TERMINATE.load(StdOrdering::SeqCst) && drain_deadline.is_none() {
            // Relaxed: clients read the flag advisorily (see client).
            region
                .header()
                .flags
                .fetch_or(FLAG_DRAINING, Ordering::Relaxed);
            let held = held_slots(&owned);
            tracing::info!(held, timeout = ?config.daemon.drain_timeout, "draining: refusing new work, waiting for held permits");
            notify(&[
                sd_notify::NotifyState::Stopping,
                sd_notify::NotifyState::Status("draining"),
            ]);
            drain_deadline = Some(Instant::now() + config.daemon.drain_timeout);
        }
        if let Some(deadline) = drain_deadline {
            let held = held_slots(&owned);
            if held == 0 || Instant::now() >= deadline {
                if held > 0 {
                    tracing::warn!(held, "drain timeout: exiting with permits still held; they stay valid in the region");
                }
                break;
            }
        }
        if watchdog && last_ping.elapsed() >= Duration::from_micros(watchdog_usec / 2) {
            notify(&[sd_notify::NotifyState::Watchdog]);
            last_ping = Instant::now();
        }
        for r in watcher.wait(region, 50, wake.as_ref()) {
            log_retired(&r);
        }
    }
    // Leases end with the daemon: the thread returns the unspent credit once.
    stop_leasing.store(true, StdOrdering::SeqCst);
    if let Some(t) = leasing {
        let _ = t.join();
    }
    // The region outlives us and clients keep using it: never leave it
    // refusing `shutting_down` while no daemon runs.
    // Relaxed: advisory flag.
    owned
        .region()
        .header()
        .flags
        .fetch_and(!FLAG_DRAINING, Ordering::Relaxed);
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(&wake_path);
    tracing::info!(watching = watcher.watching(), "sluiced stopped");
    Ok(())
}

fn answer(
    owned: &OwnedRegion,
    req: &serde_json::Value,
    peer: &crate::control::Peer,
    pid: u32,
) -> serde_json::Value {
    match req.get("cmd").and_then(|c| c.as_str()) {
        Some("ping") => json!({"ok": true, "pid": pid}),
        Some("cancel") => {
            let Some(id) = req.get("ticket").and_then(|t| t.as_u64()) else {
                return json!({"ok": false, "error": "cancel needs a numeric \"ticket\""});
            };
            match crate::maintain::cancel(owned.region(), id) {
                Ok(r) => {
                    let what = match r {
                        crate::maintain::CancelResult::Cancelled => "cancelled",
                        crate::maintain::CancelResult::Requested => "cancel_requested",
                    };
                    tracing::info!(
                        ticket = id,
                        result = what,
                        peer_pid = peer.pid,
                        peer_uid = peer.uid,
                        "operator cancel"
                    );
                    json!({"ok": true, "ticket": id, "result": what})
                }
                Err(e) => json!({"ok": false, "error": e.to_string()}),
            }
        }
        Some(cmd @ ("pause" | "resume")) => {
            let Some(name) = req.get("class").and_then(|c| c.as_str()) else {
                return json!({"ok": false, "error": format!("{cmd} needs a \"class\"")});
            };
            match crate::maintain::set_paused(owned.region(), name, cmd == "pause") {
                Ok(was) => {
                    tracing::info!(
                        class = name,
                        action = cmd,
                        was_paused = was,
                        peer_pid = peer.pid,
                        peer_uid = peer.uid,
                        "operator {cmd}"
                    );
                    json!({"ok": true, "class": name, "was_paused": was})
                }
                Err(e) => json!({"ok": false, "error": e}),
            }
        }
        Some(cmd @ ("trip" | "heal")) => {
            let Some(name) = req.get("dependency").and_then(|c| c.as_str()) else {
                return json!({"ok": false, "error": format!("{cmd} needs a \"dependency\"")});
            };
            match crate::maintain::set_tripped(owned.region(), name, cmd == "trip") {
                Ok(()) => {
                    tracing::info!(
                        dependency = name,
                        action = cmd,
                        peer_pid = peer.pid,
                        peer_uid = peer.uid,
                        "operator {cmd}"
                    );
                    json!({"ok": true, "dependency": name})
                }
                Err(e) => json!({"ok": false, "error": e}),
            }
        }
        Some(other) => json!({
            "ok": false,
            "error": format!("unknown command {other:?}: this sluiced knows ping, cancel, pause, resume, trip, heal and fleet")
        }),
        None => json!({"ok": false, "error": "request has no \"cmd\""}),
    }
}

fn log_retired(r: &crate::reclaim::Retired) {
    if r.died {
        tracing::warn!(
            pid = r.pid,
            returned = r.slots,
            "client died; returned its permits"
        );
    } else if r.slots > 0 {
        tracing::warn!(
            pid = r.pid,
            returned = r.slots,
            "client detached holding permits; returned them"
        );
    } else {
        tracing::debug!(pid = r.pid, "client detached");
    }
}

fn held_slots(owned: &OwnedRegion) -> u64 {
    let region = owned.region();
    (0..region.geometry().caps.classes)
        .filter_map(|i| region.class(i))
        .map(|c| {
            // Relaxed: the daemon is the only writer of the range.
            let base = c.slot_base.load(Ordering::Relaxed);
            let len = c.slot_len.load(Ordering::Relaxed);
            region.slots(base, len).map(slots::in_flight).unwrap_or(0)
        })
        .sum()
}

fn reload(owned: &OwnedRegion, old: Config, path: Option<&Path>) -> Config {
    let Some(path) = path else {
        tracing::info!("SIGHUP: running the embedded default config; nothing to reload");
        return old;
    };
    let now_usec = monotonic_ns() / 1_000;
    notify(&[
        sd_notify::NotifyState::Reloading,
        sd_notify::NotifyState::MonotonicUsec(now_usec as i128),
    ]);
    let result = Config::load(path)
        .map_err(|e| e.to_string())
        .and_then(|new| {
            region::apply_classes(owned.region(), &new, monotonic_ns())
                .map_err(|e| e.to_string())?;
            Ok(new)
        });
    let config = match result {
        Ok(new) => {
            tracing::info!(config = %path.display(), classes = new.classes.len(), "config reloaded");
            new
        }
        Err(e) => {
            tracing::warn!(config = %path.display(), error = %e, "reload refused; the old config stays in force");
            let status = format!("reload failed: {e}");
            notify(&[
                sd_notify::NotifyState::Ready,
                sd_notify::NotifyState::Status(&status),
            ]);
            return old;
        }
    };
    notify(&[sd_notify::NotifyState::Ready]);
    config
}
