//! `sluice`: the ops command for a sluice region.
fn main() {
    std::process::exit(sluice_daemon::cli::main())
}
