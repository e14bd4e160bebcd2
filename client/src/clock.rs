//! CLOCK_MONOTONIC: the one clock every process on the host shares.

/// Nanoseconds of CLOCK_MONOTONIC. Read through the vDSO: no system call.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always
    // exists on Linux, so the call cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// The start time of process `pid` (clock ticks after boot, field 22 of
/// /proc/PID/stat), which with the pid identifies one process for good.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields
    // after it start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    // rest starts with " S ppid ..."; field 3 is rest's 1st, so field 22 is
    // its 20th.
    rest.split_whitespace().nth(19)?.parse().ok()
}
