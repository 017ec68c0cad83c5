//! Benchmarks (not tests): each starts wayside and a peer (redis, memcached, etcd, a local
//! directory, QEMU) in the same run, drives both, and prints figures and ratios.

pub mod fuse;
pub mod h2drive;
pub mod image;
pub mod migration;
pub mod nms;
pub mod pin;
pub mod pss;
pub(crate) mod quiet;

/// CPU time (user + system) used so far by `who`: `libc::RUSAGE_SELF` (this process, all
/// threads) or `libc::RUSAGE_THREAD` (the calling thread); zero if it cannot be read.
pub(crate) fn rusage_cpu(who: libc::c_int) -> std::time::Duration {
    // SAFETY: getrusage only writes the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(who, &mut u) } != 0 {
        return std::time::Duration::ZERO;
    }
    let tv = |t: libc::timeval| {
        std::time::Duration::from_secs(t.tv_sec as u64)
            + std::time::Duration::from_micros(t.tv_usec as u64)
    };
    tv(u.ru_utime) + tv(u.ru_stime)
}

/// Runs `make()`'s future on a thread of its own with a single-threaded runtime (pinned
/// to `cpu` if given), as a load generator runs in a process of its own; returns its
/// result and the CPU time (user + system) the thread used.
pub(crate) async fn on_thread<F, Fut, T>(
    name: &str,
    cpu: Option<usize>,
    make: F,
) -> anyhow::Result<(T, std::time::Duration)>
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
    T: Send + 'static,
{
    use anyhow::Context as _;
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new().name(name.into()).spawn(move || {
        let run = || {
            if let Some(cpu) = cpu {
                pin::pin_thread(0, cpu).with_context(|| format!("pinning to CPU {cpu}"))?;
            }
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let cpu0 = rusage_cpu(libc::RUSAGE_THREAD);
            let out = rt.block_on(make())?;
            Ok((out, rusage_cpu(libc::RUSAGE_THREAD).saturating_sub(cpu0)))
        };
        let _ = tx.send(run());
    })?;
    rx.await.with_context(|| format!("the {name} thread died"))?
}

/// `testbed bench ...`
#[derive(Debug, clap::Subcommand)]
pub enum Bench {
    /// PSS durable 4 KiB writes vs a 3-member etcd cluster.
    Pss(pss::Args),
    /// NMS 4 KiB reads/writes (unary and streamed) vs redis and memcached.
    Nms(nms::Args),
    /// Migration of a cached volume over loopback and a shaped link.
    Migration(migration::Args),
    /// NMS image: boot-to-serving, size, QEMU live migration vs wayside state migration.
    Image(image::Args),
    /// Throughput through the FUSE mount vs a local directory (fio).
    Fuse(fuse::Args),
}

/// Runs one benchmark.
pub async fn run(bench: Bench) -> anyhow::Result<()> {
    match bench {
        Bench::Pss(a) => pss::run(a).await,
        Bench::Nms(a) => nms::run(a).await,
        Bench::Migration(a) => migration::run(a).await,
        Bench::Image(a) => image::run(a).await,
        Bench::Fuse(a) => fuse::run(a).await,
    }
}
