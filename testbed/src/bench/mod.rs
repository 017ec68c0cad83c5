//! Benchmarks (not tests): each starts wayside and a peer (redis, memcached, etcd, a local
//! directory, QEMU) in the same run, drives both, and prints figures and ratios.

pub mod fuse;
pub mod h2drive;
pub mod image;
pub mod migration;
pub mod nms;
pub mod pss;

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
