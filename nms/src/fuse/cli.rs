//! `nms mount` and `nms umount`: argument parsing and the mount's life cycle.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use wayside_proto::types::{BlockSize, Credential, Endpoint, VolumeName};

use super::cache::{CacheOptions, CachedVolume};
use super::fs::{FormatParams, Fs};
use super::mount::{fuse_config, system_clock, umount, FuseFs, Served};
use super::volume::VolumeRemote;
use crate::client::{ClientOptions, VolumeClient};

/// Mount a wayside volume as a POSIX file system (FUSE). Runs in the foreground until the file
/// system is unmounted (`nms umount MOUNTPOINT`, `fusermount3 -u MOUNTPOINT`) or the process gets
/// SIGINT/SIGTERM; then it drains its journal to the volume (up to --drain-timeout-ms) and exits.
/// Writes are journalled on the local disk (--cache-dir) before they return, so they survive a
/// crash of this process and an unreachable NMS; the next mount with the same --cache-dir
/// replays what was not yet persisted. fsync returns once everything written before it is
/// persisted in the PSS; with the NMS unreachable it fails ETIMEDOUT after --op-timeout-ms
/// (the data stays journalled here and is uploaded later).
#[derive(Debug, clap::Args)]
pub struct MountArgs {
    /// The volume to mount (created with --create-block-size if absent).
    #[arg(long)]
    pub volume: String,
    /// The volume's credential.
    #[arg(long, env = "WAYSIDE_CREDENTIAL", hide_env_values = true)]
    pub credential: String,
    /// NMS addresses (host:port), comma-separated, first preferred; redirects are followed.
    #[arg(long, value_delimiter = ',', required = true)]
    pub nms: Vec<String>,
    /// Where to mount (an existing directory).
    pub mountpoint: PathBuf,
    /// The OBU's local directory for the block cache and the write journal (one mount each;
    /// it names its volume, and one holding another volume's unpersisted journal is refused).
    #[arg(long)]
    pub cache_dir: PathBuf,
    /// Block size for a volume created by this mount, in bytes (power of two, 4096..=1048576).
    #[arg(long, default_value_t = 65536)]
    pub create_block_size: u32,
    /// Longest any file operation waits (for the volume, or for journal room), in milliseconds;
    /// past it the operation fails with ETIMEDOUT. (A write waits for room before taking the
    /// file system's lock, and once more under it if another write took the room meanwhile.)
    #[arg(long, default_value_t = 10_000)]
    pub op_timeout_ms: u64,
    /// Local disk for cached blocks, in bytes. Blocks written and not yet accepted by the
    /// NMS stay cached and count too: past it, writes to more blocks wait (up to
    /// --op-timeout-ms) for the NMS to accept the earlier ones.
    #[arg(long, default_value_t = 1 << 30)]
    pub cache_capacity_bytes: u64,
    /// Journalled bytes not yet persisted in the volume, at most; writers wait past it.
    #[arg(long, default_value_t = 256 << 20)]
    pub journal_limit_bytes: u64,
    /// Threads serving kernel requests. A read of blocks not cached waits for the volume
    /// on its thread (up to --op-timeout-ms) without holding up the others.
    #[arg(long, default_value_t = 4)]
    pub fuse_threads: usize,
    /// How long unmounting waits for the journal to reach the volume, in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    pub drain_timeout_ms: u64,
    /// Most inodes, for a file system created by this mount.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_inodes: u64,
    /// Blocks reserved per file, for a file system created by this mount (largest file =
    /// this x block size).
    #[arg(long, default_value_t = 1 << 20)]
    pub file_stride_blocks: u64,
    /// The client's name in request ids and the NMS's logs (default: random per mount; a
    /// name used again by a later mount repeats no request id: sequences start at random).
    #[arg(long)]
    pub client_id: Option<String>,
}

/// `nms mount` as parsed: [`MountArgs`], and how the mount reaches the NMSs (over TLS with
/// the road's CA). Not a field of `MountArgs`, so that code building one keeps compiling.
#[derive(Debug, clap::Args)]
pub struct MountCmd {
    #[command(flatten)]
    pub mount: MountArgs,
    #[command(flatten)]
    pub tls: crate::cli::TlsArgs,
}

/// Unmount a wayside mount (the mount process then drains its journal and exits).
#[derive(Debug, clap::Args)]
pub struct UmountArgs {
    /// The mount point.
    pub mountpoint: PathBuf,
    /// Detach even if the file system is busy (MNT_DETACH).
    #[arg(long)]
    pub lazy: bool,
}

/// `nms umount`.
pub fn umount_cmd(args: UmountArgs) -> anyhow::Result<()> {
    umount(&args.mountpoint, args.lazy)
        .with_context(|| format!("unmounting {}", args.mountpoint.display()))
}

/// `nms mount`: mounts and serves until unmounted or signalled.
pub fn mount_cmd(cmd: MountCmd) -> anyhow::Result<()> {
    let tls = cmd.tls.load()?;
    serve_tls(cmd.mount, tls, CancellationToken::new())
}

/// Mounts and serves until unmounted, signalled or `stop` fires; then unmounts and drains the
/// journal. Blocking (it runs its own runtime): call it from a plain thread. Plaintext; see
/// [`serve_tls`].
pub fn serve(args: MountArgs, stop: CancellationToken) -> anyhow::Result<()> {
    serve_tls(args, None, stop)
}

/// [`serve`], dialling the NMSs over TLS with `tls` (the road's CA) when given.
pub fn serve_tls(
    args: MountArgs,
    tls: Option<wayside_proto::tls::Tls>,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let volume = VolumeName::new(args.volume.clone()).context("--volume")?;
    let credential = Credential::new(args.credential.clone()).context("--credential")?;
    let nms = args
        .nms
        .iter()
        .map(|a| Endpoint::parse(a).with_context(|| format!("--nms {a}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let block_size = BlockSize::new(args.create_block_size).context("--create-block-size")?;
    anyhow::ensure!(args.op_timeout_ms > 0, "--op-timeout-ms must be positive");
    anyhow::ensure!(
        args.cache_capacity_bytes >= 64 * u64::from(block_size.bytes()),
        "--cache-capacity-bytes must hold at least 64 blocks"
    );
    anyhow::ensure!(
        args.mountpoint.is_dir(),
        "mount point {} is not a directory",
        args.mountpoint.display()
    );
    let op_timeout = Duration::from_millis(args.op_timeout_ms);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("nms-mount")
        .build()?;
    let mut copts = ClientOptions::new(nms, volume.clone(), credential);
    copts.create_block_size = Some(block_size);
    copts.op_timeout = op_timeout;
    copts.tls = tls;
    if let Some(id) = args.client_id.clone() {
        copts.client_id = id;
    }
    let client = rt
        .block_on(VolumeClient::open(copts))
        .with_context(|| format!("attaching volume {}", volume.as_str()))?;
    let bs = client.block_size().bytes();
    let mut cache = CacheOptions::new(args.cache_dir.clone());
    cache.cache_capacity_bytes = args.cache_capacity_bytes;
    cache.journal_limit_bytes = args.journal_limit_bytes;
    cache.op_timeout = op_timeout;
    cache.volume = volume.as_str().to_owned();
    let dev = Arc::new(
        CachedVolume::open(VolumeRemote { client }, bs, cache, rt.handle().clone())
            .with_context(|| format!("opening the cache in {}", args.cache_dir.display()))?,
    );
    let params =
        FormatParams { max_inodes: args.max_inodes, file_stride_blocks: args.file_stride_blocks };
    let fs = Fs::open_or_format(dev.clone(), params, system_clock())
        .context("opening the file system")?;
    let served = Served::start(
        FuseFs::new(fs),
        &args.mountpoint,
        &fuse_config(volume.as_str(), args.fuse_threads),
    )
    .with_context(|| format!("mounting at {}", args.mountpoint.display()))?;
    tracing::info!(volume = volume.as_str(), mountpoint = %args.mountpoint.display(), block_size = bs, "mounted");

    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
                _ = stop.cancelled() => break,
                // An unmount from outside ends the session thread.
                _ = tick.tick() => if served.finished() { break },
            }
        }
        anyhow::Ok(())
    })?;
    served.stop().context("unmounting")?;
    let drained = dev.shutdown(Duration::from_millis(args.drain_timeout_ms));
    let stats = dev.stats();
    if drained {
        tracing::info!(
            volume = volume.as_str(),
            accepted = stats.accepted,
            "unmounted; everything persisted"
        );
    } else {
        tracing::warn!(
            volume = volume.as_str(),
            journal_bytes = stats.journal_bytes,
            "unmounted with changes not yet persisted; the next mount with this --cache-dir replays them"
        );
    }
    Ok(())
}
