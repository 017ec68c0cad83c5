//! `--pin`: a benchmark's server side on one CPU and its client side on another, for
//! wayside and its peers alike. Unpinned, where the scheduler puts a server and its load
//! generator moves a run by up to 2x on a 2-CPU machine (redis GET with 16-deep pipelining:
//! 335-342k ops/s with redis-server and redis-benchmark on one CPU, 512-634k on two), so
//! which of two near-equal systems comes out ahead says more about placement than about
//! either system.

use anyhow::{bail, Context as _};

/// Where a run's two sides go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// The server side: this process's threads (the NMS, the PSS) or a peer's server.
    pub server: usize,
    /// The client side: the load generator's process or driver thread.
    pub client: usize,
}

impl Placement {
    /// The first two CPUs this process may run on; an error naming what is there when it
    /// may run on fewer.
    pub fn first_two() -> anyhow::Result<Self> {
        let cpus = allowed_cpus().context("reading this process's CPU affinity")?;
        match cpus[..] {
            [server, client, ..] => Ok(Self { server, client }),
            _ => bail!("--pin needs two CPUs; this process may run on {cpus:?} only"),
        }
    }
}

/// The CPUs the calling thread may run on, in order.
pub fn allowed_cpus() -> std::io::Result<Vec<usize>> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity writes at most
    // the size it is given.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } != 0
    {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: CPU_ISSET reads the set within its size (CPU_SETSIZE bits).
    Ok((0..libc::CPU_SETSIZE as usize).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) }).collect())
}

/// Pins thread `tid` (0: the calling thread) to `cpu`. Threads it creates afterwards
/// inherit the pin. Async-signal-safe (one system call), so a `pre_exec` hook may call it.
pub fn pin_thread(tid: libc::pid_t, cpu: usize) -> std::io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    // SAFETY: as in `allowed_cpus`; CPU_SET writes within the set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(cpu, &mut set) };
    if unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Pins every thread this process has now to `cpu` (those it starts later inherit the pin
/// of the thread that starts them).
pub fn pin_process(cpu: usize) -> anyhow::Result<()> {
    for t in std::fs::read_dir("/proc/self/task").context("listing this process's threads")? {
        let name = t?.file_name();
        let tid: libc::pid_t = name.to_string_lossy().parse().context("a thread id")?;
        match pin_thread(tid, cpu) {
            // A thread that has ended since the listing.
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {}
            r => r.with_context(|| format!("pinning thread {tid} to CPU {cpu}"))?,
        }
    }
    Ok(())
}

/// Makes `cmd`'s process start pinned to `cpu` (`None`: as this process's placement).
pub fn pin_command(cmd: &mut tokio::process::Command, cpu: Option<usize>) {
    if let Some(cpu) = cpu {
        // SAFETY: the hook makes one system call and touches no memory shared with the
        // parent (allowed between fork and exec).
        unsafe {
            cmd.pre_exec(move || pin_thread(0, cpu));
        }
    }
}

/// Makes a peer server the benchmark starts die with this process however it ends
/// (PR_SET_PDEATHSIG): killed, the benchmark left redis-server, memcached or etcd running.
/// The signal follows the spawning thread, so peers are started from the runtime's own
/// long-lived threads, not from a driver's.
pub fn dies_with_us(cmd: &mut impl PreExec) {
    // SAFETY: prctl is async-signal-safe and touches no memory shared with the parent.
    unsafe {
        cmd.hook(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// The commands [`dies_with_us`] takes (std's and tokio's).
pub trait PreExec {
    /// # Safety
    /// As `CommandExt::pre_exec`: `f` runs between fork and exec.
    unsafe fn hook(&mut self, f: fn() -> std::io::Result<()>);
}

impl PreExec for std::process::Command {
    unsafe fn hook(&mut self, f: fn() -> std::io::Result<()>) {
        use std::os::unix::process::CommandExt as _;
        // SAFETY: passed on from the caller.
        unsafe {
            self.pre_exec(f);
        }
    }
}

impl PreExec for tokio::process::Command {
    unsafe fn hook(&mut self, f: fn() -> std::io::Result<()>) {
        // SAFETY: passed on from the caller.
        unsafe {
            self.pre_exec(f);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pinned_thread_runs_on_its_cpu_only_and_its_children_inherit_it() {
        let cpus = allowed_cpus().unwrap();
        assert!(!cpus.is_empty());
        let last = *cpus.last().unwrap();
        let (on, child) = std::thread::spawn(move || {
            pin_thread(0, last).unwrap();
            let child = std::thread::spawn(allowed_cpus).join().unwrap().unwrap();
            (allowed_cpus().unwrap(), child)
        })
        .join()
        .unwrap();
        assert_eq!(on, vec![last]);
        assert_eq!(child, vec![last]);
        // This thread was not moved.
        assert_eq!(allowed_cpus().unwrap(), cpus);
        // A CPU past the set's size is refused, not a panic (in a forked child).
        let e = pin_thread(0, libc::CPU_SETSIZE as usize).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
    }

    /// A peer started with `dies_with_us` is killed when what started it ends (here its
    /// thread; for the benchmark, the process).
    #[test]
    fn a_peer_dies_with_what_started_it() {
        use std::os::unix::process::ExitStatusExt as _;
        let mut child = std::thread::spawn(|| {
            let mut cmd = std::process::Command::new("sleep");
            cmd.arg("30");
            dies_with_us(&mut cmd);
            cmd.spawn().unwrap()
        })
        .join()
        .unwrap();
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
    }

    #[tokio::test]
    async fn a_pinned_command_starts_on_its_cpu() {
        let cpus = allowed_cpus().unwrap();
        let last = *cpus.last().unwrap();
        let mut cmd = tokio::process::Command::new("sh");
        cmd.args(["-c", "grep Cpus_allowed_list /proc/self/status"]);
        pin_command(&mut cmd, Some(last));
        let out = cmd.output().await.unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(text.split_whitespace().nth(1), Some(last.to_string().as_str()), "{text}");
    }
}
