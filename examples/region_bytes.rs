//! How many bytes a region takes, table by table, from
//! `sluice_shm_layout::layout::Geometry::new`.
//!
//! ```text
//! cargo run --release --example region_bytes              # 64 classes x 4 lanes x queue 1,024
//! cargo run --release --example region_bytes -- 256 128 16 # classes, clients, queue_depth
//! ```
//!
//! Capacities: `classes` and `clients` as given (default 64 and 1,024),
//! 65,536 slot words, 4,096 tenants, and for every class the ticket records
//! the config checker asks it to reserve: 4 lanes x 2 x queue_depth, plus
//! 64. The file is a tmpfs file whose pages are allocated only when first
//! touched, so the size is an upper bound on memory, not what a region
//! costs at rest.

use sluice_shm_layout::layout::{Capacities, Geometry};

fn main() {
    let mut args = std::env::args().skip(1);
    let mut next = |default: u32| -> u32 {
        args.next()
            .map_or(default, |a| a.parse().expect("a whole number"))
    };
    let classes = next(64);
    let clients = next(1024);
    let queue_depth = next(1024);
    let caps = Capacities {
        classes,
        clients,
        slots: 65_536,
        tickets: queue_depth
            .checked_mul(8)
            .and_then(|t| t.checked_add(64))
            .and_then(|t| t.checked_mul(classes))
            .expect("the ticket records fit a u32"),
        tenants: 4096,
    };
    let g = Geometry::new(caps).expect("the capacities fit a region");
    println!(
        "capacities: classes {}, clients {}, slots {}, tickets {}, tenants {}",
        caps.classes, caps.clients, caps.slots, caps.tickets, caps.tenants
    );
    let parts = [
        ("header", 0, g.off_classes),
        ("class records", g.off_classes, g.off_clients),
        ("client records", g.off_clients, g.off_counters),
        ("counter blocks", g.off_counters, g.off_slots),
        ("slot words", g.off_slots, g.off_tickets),
        ("ticket records", g.off_tickets, g.off_deps),
        ("dependency records", g.off_deps, g.off_tiers),
        ("tier records", g.off_tiers, g.off_tenants),
        ("tenant records (+ overflow)", g.off_tenants, g.size),
    ];
    for (name, from, to) in parts {
        let bytes = to - from;
        println!(
            "{name:<30} {bytes:>14} B  {:>9.2} MiB  {:>5.1}%",
            bytes as f64 / (1024.0 * 1024.0),
            100.0 * bytes as f64 / g.size as f64
        );
    }
    println!(
        "{:<30} {:>14} B  {:>9.2} MiB",
        "total (page aligned)",
        g.size,
        g.size as f64 / (1024.0 * 1024.0)
    );
}
