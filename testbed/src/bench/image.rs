//! `testbed bench image`: the NMS image. Builds it, boots it several times (boot to the
//! health check and to the first served request, medians), reports its size, and moves a
//! vehicle's cached volume two ways in one run: QEMU live migration of the whole VM (the
//! paper's "Unikernel KVM" route) and wayside's own state migration between two NMSs.
//! Both move the same volume (same blocks written through the same client library) and
//! write back to the same real PSS.
//!
//! The measuring steps are public functions, shared with `testbed mechanisms`
//! ([`crate::mechanisms`]), which times the same routes plus a cold boot with refill.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;
use wayside_nms::client::{ClientOptions, VolumeClient};
use wayside_nms::pid1::BootParams;
use wayside_proto::types::{BlockSize, Credential, Endpoint, VolumeName};
use wayside_unikernel::image::{self, Image, Manifest};
use wayside_unikernel::kernel::{self, KernelTree};
use wayside_unikernel::vm::{self, Accel, Machine, MigrationReport, Net, Vm, VmOptions};

/// Options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The nms binary [default: the `nms` beside this program].
    #[arg(long)]
    pub nms: Option<PathBuf>,
    /// Unpacked kernel package or the fetch-kernel cache [default: the cache].
    #[arg(long)]
    pub kernel_dir: Option<PathBuf>,
    /// Boots to time (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub boots: usize,
    /// Guest memory, MiB.
    #[arg(long, default_value_t = 512)]
    pub memory_mib: u32,
    /// Cached volume data moved by both migrations, MiB (4 KiB blocks).
    #[arg(long, default_value_t = 16)]
    pub volume_mib: u64,
    /// KVM, TCG or auto.
    #[arg(long, value_enum, default_value = "auto")]
    pub accel: Accel,
    /// How long one boot may take, in seconds.
    #[arg(long, default_value_t = 300)]
    pub boot_timeout_s: u64,
}

/// The block size of the volumes the image benchmarks move.
pub const BLOCK: usize = 4096;
/// Client operations in flight while filling or refilling a volume.
pub const FILL_CONCURRENCY: usize = 16;

fn median(mut xs: Vec<u128>) -> u128 {
    xs.sort_unstable();
    xs.get(xs.len() / 2).copied().unwrap_or(0)
}

/// The `nms` beside this program.
pub fn default_nms() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("nms")))
        .unwrap_or_else(|| "nms".into())
}

/// A vehicle client for `volume` at `nms` (`IP:PORT` or a URI), 4 KiB blocks.
pub async fn client(nms: &str, volume: &str) -> anyhow::Result<VolumeClient> {
    let mut opts = ClientOptions::new(
        vec![Endpoint::parse(nms)?],
        VolumeName::new(volume)?,
        Credential::new("bench-secret")?,
    );
    opts.create_block_size = Some(BlockSize::new(BLOCK as u32)?);
    opts.op_timeout = Duration::from_secs(120);
    Ok(VolumeClient::open(opts).await?)
}

/// Blocks in `mib` MiB.
pub fn blocks_in(mib: u64) -> u64 {
    mib * (1 << 20) / BLOCK as u64
}

/// The content of block `b` (checkable after a move).
pub fn block_data(b: u64) -> Vec<u8> {
    vec![(b % 251) as u8; BLOCK]
}

/// Writes `mib` MiB of 4 KiB blocks, then flushes (so every route moves clean, cached data).
pub async fn fill(c: &VolumeClient, mib: u64) -> anyhow::Result<()> {
    let mut writes = futures::stream::iter(0..blocks_in(mib))
        .map(|b| async move { c.write(b, 0, block_data(b)).await })
        .buffer_unordered(FILL_CONCURRENCY);
    while let Some(r) = writes.next().await {
        r?;
    }
    c.flush().await?;
    Ok(())
}

/// Reads every block [`fill`] wrote, checking each (on a fresh NMS: the refill from the
/// PSS), in batches of [`REFILL_BATCH_BLOCKS`] (`read_many`: one message each way and one
/// PSS call per batch), [`FILL_CONCURRENCY`] / 4 batches at a time.
pub async fn read_all(c: &VolumeClient, mib: u64) -> anyhow::Result<()> {
    let blocks: Vec<u64> = (0..blocks_in(mib)).collect();
    let mut reads = futures::stream::iter(blocks.chunks(REFILL_BATCH_BLOCKS))
        .map(|chunk| async move { (chunk, c.read_many(chunk).await) })
        .buffer_unordered((FILL_CONCURRENCY / 4).max(1));
    while let Some((chunk, r)) = reads.next().await {
        for (b, data) in chunk.iter().zip(r?) {
            anyhow::ensure!(data == Some(block_data(*b)), "block {b} read back wrong");
        }
    }
    Ok(())
}

/// Blocks per `read_many` batch in a refill (the NMS's default `max_stream_batch_ops`).
pub const REFILL_BATCH_BLOCKS: usize = 256;

/// Builds the image (stripped `/init`) into `out`; returns it with its manifest and build time.
pub fn build(
    nms: &Path,
    kernel_dir: Option<&Path>,
    out: &Path,
) -> anyhow::Result<(Image, Manifest, Duration)> {
    let kdir = kernel_dir.map(Path::to_path_buf).unwrap_or_else(kernel::default_cache_dir);
    let tree = KernelTree::locate(&kdir, None)
        .context("Debian's kernel is not in the cache: run `unikernel fetch-kernel` first")?;
    let t = Instant::now();
    let manifest = image::build(&image::BuildOptions {
        kernel: tree,
        nms: nms.to_path_buf(),
        out_dir: out.to_path_buf(),
        modules: kernel::DEFAULT_MODULES.iter().map(|s| s.to_string()).collect(),
        boot: BootParams::default(),
        nms_config: None,
        strip: true,
    })?;
    Ok((Image::open(out, true)?, manifest, t.elapsed()))
}

/// How to boot NMS VMs on user-mode networking against a PSS on host loopback.
#[derive(Clone)]
pub struct VmSetup {
    pub image: Image,
    /// State folders go under here.
    pub work: PathBuf,
    pub memory_mib: u32,
    pub accel: Accel,
    /// The PSS's port on host 127.0.0.1 (the guest reaches it as 10.0.2.2:PORT).
    pub pss_port: u16,
    pub boot_limit: Duration,
}

impl VmSetup {
    /// Options for a VM with state in `work/state`, on a fresh forwarded port.
    pub fn opts(&self, state: &str) -> anyhow::Result<VmOptions> {
        Ok(VmOptions {
            image: self.image.clone(),
            state_dir: self.work.join(state),
            memory_mib: self.memory_mib,
            cpus: 1,
            accel: self.accel,
            machine: Machine::Microvm,
            net: Net::User { host_port: vm::free_port()? },
            boot: BootParams {
                pss: vec![Endpoint::parse(&format!("{}:{}", vm::USER_NET_HOST, self.pss_port))?],
                node: Some(format!("rsu-{state}")),
                ..BootParams::default()
            },
            incoming: None,
            cluster_token: None,
            tls: None,
        })
    }

    /// Boots a VM and waits for its health check; returns it and the time taken.
    pub async fn boot(&self, state: &str) -> anyhow::Result<(Vm, Duration)> {
        let o = self.opts(state)?;
        let t = Instant::now();
        let mut vm = Vm::launch(&o, false).await?;
        vm.wait_serving(self.boot_limit).await?;
        Ok((vm, t.elapsed()))
    }
}

/// The PSS port of a loopback endpoint.
pub fn port_of(e: &Endpoint) -> anyhow::Result<u16> {
    e.authority()
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .with_context(|| format!("no port in {}", e.authority()))
}

/// QEMU live migration of a serving NMS VM holding a `volume_mib` MiB cached volume: the
/// figures QEMU reports, after checking the volume is still served by the destination.
pub async fn qemu_live_migration(
    setup: &VmSetup,
    volume_mib: u64,
) -> anyhow::Result<MigrationReport> {
    let (mut src, _) = setup.boot("live-src").await?;
    let c = client(&src.state.nms_endpoint, "vehicle-qemu").await?;
    fill(&c, volume_mib).await?;
    let (mut dest, q) = src.migrate(&setup.work.join("live-dst"), None).await?;
    c.read(0, 0, None).await?;
    dest.stop(Duration::from_secs(30), false).await?;
    drop(src);
    Ok(q)
}

/// Cold boot of the image on the next RSU plus the refill of the cached blocks from the PSS.
#[derive(Debug, Clone, Copy)]
pub struct ColdBoot {
    /// QEMU start to the NMS's health check answering.
    pub boot: Duration,
    /// Health check to every block of the volume read (from the PSS) through the new NMS.
    pub refill: Duration,
}

/// Writes a `volume_mib` MiB volume through a host NMS (flushed to the PSS), then boots a
/// fresh VM and reads every block through it.
pub async fn cold_boot_refill(
    setup: &VmSetup,
    pss: &Endpoint,
    volume_mib: u64,
) -> anyhow::Result<ColdBoot> {
    let stop = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let config = wayside_nms::config::Config {
        listen: addr.clone(),
        node_id: "rsu-previous".into(),
        pss: vec![pss.authority().to_string()],
        ..Default::default()
    };
    let server = tokio::spawn(wayside_nms::server::run(config, listener, stop.clone()));
    let c = client(&addr, "vehicle-cold").await?;
    fill(&c, volume_mib).await?;
    drop(c);
    stop.cancel();
    server.await??;
    let (mut vm, boot) = setup.boot("cold").await?;
    let t = Instant::now();
    let c = client(&vm.state.nms_endpoint, "vehicle-cold").await?;
    read_all(&c, volume_mib).await?;
    let refill = t.elapsed();
    vm.stop(Duration::from_secs(30), false).await?;
    Ok(ColdBoot { boot, refill })
}

/// wayside's state migration of a `volume_mib` MiB cached volume between two NMSs on host
/// loopback (both writing back to `pss`): the source's report and the RPC's wall time.
pub async fn wayside_migration(
    pss: &Endpoint,
    volume_mib: u64,
) -> anyhow::Result<(wayside_proto::pb::MigrationReport, Duration)> {
    let stop = CancellationToken::new();
    let mut servers = tokio::task::JoinSet::new();
    let mut addrs = Vec::new();
    for name in ["rsu-a", "rsu-b"] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        addrs.push(format!("127.0.0.1:{}", listener.local_addr()?.port()));
        let config = wayside_nms::config::Config {
            listen: addrs.last().cloned().unwrap_or_default(),
            node_id: name.into(),
            pss: vec![pss.authority().to_string()],
            ..Default::default()
        };
        servers.spawn(wayside_nms::server::run(config, listener, stop.clone()));
    }
    let outcome = async {
        let c = client(&addrs[0], "vehicle-wayside").await?;
        fill(&c, volume_mib).await?;
        let mut admin = wayside_proto::pb::nms_admin_client::NmsAdminClient::connect(format!(
            "http://{}",
            addrs[0]
        ))
        .await?;
        let t = Instant::now();
        let w = admin
            .start_migration(wayside_proto::pb::StartMigrationRequest {
                volume: "vehicle-wayside".into(),
                target_address: format!("http://{}", addrs[1]),
                ..Default::default()
            })
            .await?
            .into_inner();
        anyhow::ensure!(
            w.outcome() == wayside_proto::pb::MigrationOutcome::Completed,
            "wayside migration aborted: {}",
            w.error
        );
        // The volume is served by the target now: the move ends (on this clock, as every
        // mechanism's does) with the vehicle's next read answered there.
        c.read(0, 0, None).await?;
        let wall = t.elapsed();
        anyhow::ensure!(
            c.current_nms().authority() == addrs[1],
            "the client was not redirected to the target"
        );
        Ok((w, wall))
    }
    .await;
    stop.cancel();
    while servers.join_next().await.is_some() {}
    outcome
}

/// Runs the benchmark.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    let nms = args.nms.clone().unwrap_or_else(default_nms);
    let cluster = wayside_pss::testing::LocalCluster::start(1, &work.path().join("pss")).await?;
    let pss_host = cluster.endpoints()[0].clone();

    let (image, manifest, build_time) =
        build(&nms, args.kernel_dir.as_deref(), &work.path().join("img"))?;
    println!("== NMS image (kernel {})", manifest.kernel_version);
    println!("build time              {} ms", build_time.as_millis());
    println!("vmlinuz                 {:>10} bytes", manifest.kernel.bytes);
    println!(
        "initramfs.cpio          {:>10} bytes (/init {} bytes stripped, {} modules)",
        manifest.initramfs.bytes,
        manifest.init.bytes,
        manifest.modules.len()
    );
    println!("image total             {:>10} bytes", manifest.image_bytes());

    let setup = VmSetup {
        image,
        work: work.path().to_path_buf(),
        memory_mib: args.memory_mib,
        accel: args.accel,
        pss_port: port_of(&pss_host)?,
        boot_limit: Duration::from_secs(args.boot_timeout_s),
    };
    let (mut to_health, mut to_request) = (Vec::new(), Vec::new());
    let mut accel_used = Accel::Tcg;
    for i in 0..args.boots.max(1) {
        let t = Instant::now();
        let (mut vm, waited) = setup.boot(&format!("boot{i}")).await?;
        to_health.push(waited.as_millis());
        let c = client(&vm.state.nms_endpoint, &format!("boot-{i}")).await?;
        c.read(0, 0, None).await?;
        to_request.push(t.elapsed().as_millis());
        accel_used = vm.state.accel;
        vm.stop(Duration::from_secs(30), false).await?;
    }
    println!(
        "boot to health check    median {} ms  {:?}  ({:?})",
        median(to_health.clone()),
        to_health,
        accel_used
    );
    println!(
        "boot to first request   median {} ms  {:?}  (QEMU start to a served read)",
        median(to_request.clone()),
        to_request
    );

    // Route 1: QEMU live migration of a serving VM with the volume cached.
    let q = qemu_live_migration(&setup, args.volume_mib).await?;
    println!(
        "QEMU live migration     total {} ms, downtime {} ms, {} MiB RAM moved (guest {} MiB, volume {} MiB); wall {} ms incl. starting the destination",
        q.total_ms,
        q.downtime_ms,
        q.ram_transferred_bytes >> 20,
        args.memory_mib,
        args.volume_mib,
        q.wall_ms
    );

    // Route 2: wayside's state migration of the same volume between two NMSs on the host.
    let (w, wall) = wayside_migration(&pss_host, args.volume_mib).await?;
    println!(
        "wayside state migration total {} ms, vehicle pause {} ms, {} MiB moved ({} blocks), outcome {:?}; wall {} ms",
        w.total_us / 1000,
        w.pause_us / 1000,
        w.bytes_moved >> 20,
        w.blocks_moved,
        w.outcome(),
        wall.as_millis()
    );
    let wayside_ms = (w.total_us as f64 / 1000.0).max(0.001);
    println!(
        "ratio                   QEMU live migration / wayside migration: total {:.1}x, pause {:.1}x",
        q.total_ms as f64 / wayside_ms,
        q.downtime_ms as f64 / (w.pause_us as f64 / 1000.0).max(0.001)
    );
    cluster.shutdown().await;
    Ok(())
}
