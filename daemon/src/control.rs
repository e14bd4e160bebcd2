//! The control socket: a Unix stream socket beside the region through which
//! ops commands reach the daemon. One JSON request line, one JSON answer
//! line. Every connection's peer credentials are checked and logged.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use serde_json::{json, Value};

/// The default control socket path for a region: beside it, `.sock` added.
pub fn default_socket(region: &Path) -> PathBuf {
    let mut s = region.as_os_str().to_os_string();
    s.push(".sock");
    PathBuf::from(s)
}

/// Bind the control socket at `path` with `mode`, replacing a stale socket
/// file (the caller holds the region lock, so no live daemon owns it).
pub fn bind(path: &Path, mode: u32) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            std::fs::remove_file(path)?;
        } else {
            return Err(std::io::Error::other(format!(
                "{} exists and is not a socket: remove it or set daemon.control_socket",
                path.display()
            )));
        }
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

/// Serve connections until the listener fails. `handle` answers a request.
pub fn serve<F>(listener: UnixListener, handle: F)
where
    F: Fn(&Value, &Peer) -> Value + Send + Sync + 'static,
{
    for conn in listener.incoming() {
        let Ok(stream) = conn else { continue };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let _ = stream.set_write_timeout(Some(Duration::from_secs(5)));
        let peer = peer_of(&stream);
        let answer = match read_request(&stream) {
            Ok(req) => {
                tracing::info!(pid = peer.pid, uid = peer.uid, gid = peer.gid, request = %req, "control request");
                handle(&req, &peer)
            }
            Err(e) => json!({"ok": false, "error": e}),
        };
        let mut w = &stream;
        let _ = writeln!(w, "{answer}");
    }
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone, Copy, Default)]
pub struct Peer {
    /// Peer pid.
    pub pid: i32,
    /// Peer uid.
    pub uid: u32,
    /// Peer gid.
    pub gid: u32,
}

fn peer_of(stream: &UnixStream) -> Peer {
    match getsockopt(stream, PeerCredentials) {
        Ok(c) => Peer {
            pid: c.pid(),
            uid: c.uid(),
            gid: c.gid(),
        },
        Err(_) => Peer {
            pid: -1,
            uid: u32::MAX,
            gid: u32::MAX,
        },
    }
}

fn read_request(stream: &UnixStream) -> Result<Value, String> {
    let mut line = String::new();
    let mut r = BufReader::new(stream).take(64 * 1024);
    r.read_line(&mut line)
        .map_err(|e| format!("reading request: {e}"))?;
    serde_json::from_str(&line).map_err(|e| format!("request is not JSON: {e}"))
}

use std::io::Read as _;

/// Send one request to the daemon at `socket` and read its answer.
pub fn request(socket: &Path, req: &Value) -> std::io::Result<Value> {
    let stream = UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut w = &stream;
    writeln!(w, "{req}")?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(std::io::Error::other)
}
