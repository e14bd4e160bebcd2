//! The optional HTTP endpoint for a Prometheus scraper
//! (`daemon.metrics_listen`, loopback only): every GET answers the same
//! text `sluice stats --prometheus` prints.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::region::OwnedRegion;

/// Serve metrics on `addr` from the region in `current` until the process
/// exits. Returns once the listener is bound (the serving is on a thread).
pub fn spawn(addr: SocketAddr, current: Arc<Mutex<Arc<OwnedRegion>>>) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut stream) = conn else { continue };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
                // Read the request head (at most 8 KiB); any path is served.
                let mut buf = [0u8; 8192];
                let mut seen = 0;
                while seen < buf.len() {
                    match stream.read(&mut buf[seen..]) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            seen += n;
                            if buf[..seen].windows(4).any(|w| w == b"\r\n\r\n") {
                                break;
                            }
                        }
                    }
                }
                let owned = current.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let snap = crate::stats::Snapshot::of(owned.map());
                let body = crate::cli::stats::prometheus(&snap);
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = stream.write_all(head.as_bytes());
                let _ = stream.write_all(body.as_bytes());
            }
        })?;
    Ok(())
}
