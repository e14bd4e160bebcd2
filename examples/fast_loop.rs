//! A tight loop of `try_acquire` + release with no waiter, for counting
//! system calls (strace) and for profiling (perf).
//!
//! ```text
//! cargo build --release --example fast_loop
//! strace -f -c target/release/examples/fast_loop 100000 both
//! strace -f target/release/examples/fast_loop 100000 both 2>&1 | sed -n '/loop start/,/loop end/p'
//! ```
//!
//! Arguments: iterations (default 100,000) and class (`slots`, `rate`,
//! `both`; default `both`). The region is created in-process exactly as the
//! benches create it (no daemon). The loop is framed by two writes to stderr,
//! `loop start` and `loop end`, so a trace shows which calls fall inside it.

#![allow(clippy::unwrap_used)]

#[path = "../benches/common/mod.rs"]
mod common;

use std::io::Write;

use sluice_client::{Client, Decision, Request};

fn main() {
    let mut args = std::env::args().skip(1);
    let iters: u64 = args
        .next()
        .map_or(100_000, |a| a.parse().expect("iterations: a whole number"));
    let class = args.next().unwrap_or_else(|| "both".to_string());

    let region = common::bench_region();
    let client = Client::attach(region.path()).unwrap();
    let handle = client.class(&class).unwrap();
    let req = Request::new();

    let mut stderr = std::io::stderr();
    stderr.write_all(b"loop start\n").unwrap();
    let mut admitted = 0u64;
    for _ in 0..iters {
        if let Ok(Decision::Admitted(permit)) = handle.try_acquire(&req) {
            admitted += 1;
            drop(std::hint::black_box(permit));
        }
    }
    stderr.write_all(b"loop end\n").unwrap();

    println!("{admitted} of {iters} admitted on class {class}");
    drop(handle);
    drop(client);
    drop(region);
}
