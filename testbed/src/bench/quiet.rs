//! Measuring and quieting the machine around a benchmark phase: CPU time and page faults
//! of this process and its children (`usage`), and waiting for them to go idle (`settle`)
//! so a phase does not pay for the work the previous one left behind.

use std::time::{Duration, Instant};

/// CPU share of a core (both systems' processes) below which the machine counts as quiet.
pub(crate) const QUIET_CPU_SHARE: f64 = 0.10;

/// Before a phase: writes every dirty page out (`sync`), so a phase does not pay for the
/// previous one's writeback, then waits (at most `max`) until this process and `pids`
/// use less than [`QUIET_CPU_SHARE`] of a core (compactions and collections left by the
/// previous phase finish). Returns how long it took.
pub(crate) async fn settle(pids: &[u32], max: Duration) -> Duration {
    let started = Instant::now();
    // SAFETY: sync has no preconditions.
    tokio::task::spawn_blocking(|| unsafe { libc::sync() }).await.ok();
    let window = Duration::from_millis(250);
    while started.elapsed() < max {
        let before = usage(pids);
        tokio::time::sleep(window).await;
        let used = usage(pids).cpu_secs - before.cpu_secs;
        if used / window.as_secs_f64() < QUIET_CPU_SHARE {
            break;
        }
    }
    started.elapsed()
}

/// CPU and page-fault counters of a set of processes.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Usage {
    /// User + system CPU seconds.
    pub(crate) cpu_secs: f64,
    /// Minor page faults.
    pub(crate) faults: f64,
}

/// Usage of this process plus the processes `pids`, from /proc/PID/stat.
pub(crate) fn usage(pids: &[u32]) -> Usage {
    std::iter::once("/proc/self/stat".to_owned())
        .chain(pids.iter().map(|p| format!("/proc/{p}/stat")))
        .map(|path| stat_usage(&path))
        .fold(Usage::default(), |a, b| Usage {
            cpu_secs: a.cpu_secs + b.cpu_secs,
            faults: a.faults + b.faults,
        })
}

/// CPU seconds process `pid` has run so far, all its threads, to the nanosecond (the sum
/// of /proc/PID/task/*/schedstat: /proc/PID/stat counts in 10 ms ticks, too coarse for a
/// run of a fraction of a second); `None` if the process is gone.
pub(crate) fn cpu_secs_of(pid: u32) -> Option<f64> {
    let mut ns = 0u64;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let Ok(t) = t else { continue };
        let Ok(stat) = std::fs::read_to_string(t.path().join("schedstat")) else { continue };
        ns += stat.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    }
    Some(ns as f64 / 1e9)
}

fn stat_usage(path: &str) -> Usage {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let Ok(stat) = std::fs::read_to_string(path) else { return Usage::default() };
    // Fields after the command name (which may hold spaces): state is the 3rd field,
    // minflt the 10th, utime and stime the 14th and 15th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    Usage { cpu_secs: (t(11) + t(12)) / ticks, faults: t(7) }
}
