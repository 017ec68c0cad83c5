//! `testbed bench image`: the NMS image. Builds it, boots it several times (boot to the
//! health check and to the first served request, medians), reports its size, and moves a
//! vehicle's cached volume two ways in one run: QEMU live migration of the whole VM (the
//! paper's "Unikernel KVM" route) and wayside's own state migration between two NMSs.
//! Both move the same volume (same blocks written through the same client library) and
//! write back to the same real PSS.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use wayside_nms::client::{ClientOptions, VolumeClient};
use wayside_nms::pid1::BootParams;
use wayside_proto::types::{BlockSize, Credential, Endpoint, VolumeName};
use wayside_unikernel::image::{self, Image};
use wayside_unikernel::kernel::{self, KernelTree};
use wayside_unikernel::vm::{self, Accel, Machine, Net, Vm, VmOptions};

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

const BLOCK: usize = 4096;

fn median(mut xs: Vec<u128>) -> u128 {
    xs.sort_unstable();
    xs.get(xs.len() / 2).copied().unwrap_or(0)
}

async fn client(nms: &str, volume: &str) -> anyhow::Result<VolumeClient> {
    let mut opts = ClientOptions::new(
        vec![Endpoint::parse(nms)?],
        VolumeName::new(volume)?,
        Credential::new("bench-secret")?,
    );
    opts.create_block_size = Some(BlockSize::new(BLOCK as u32)?);
    opts.op_timeout = Duration::from_secs(120);
    Ok(VolumeClient::open(opts).await?)
}

/// Writes `mib` MiB of 4 KiB blocks, then flushes (so both routes move clean, cached data).
async fn fill(c: &VolumeClient, mib: u64) -> anyhow::Result<()> {
    let blocks = mib * (1 << 20) / BLOCK as u64;
    for b in 0..blocks {
        c.write(b, 0, vec![(b % 251) as u8; BLOCK]).await?;
    }
    c.flush().await?;
    Ok(())
}

/// Runs the benchmark.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    let nms = args.nms.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("nms")))
            .unwrap_or_else(|| "nms".into())
    });
    let kdir = args.kernel_dir.clone().unwrap_or_else(kernel::default_cache_dir);
    let tree = KernelTree::locate(&kdir, None).context("run `unikernel fetch-kernel` first")?;
    let cluster = wayside_pss::testing::LocalCluster::start(1, &work.path().join("pss")).await?;
    let pss_host = cluster.endpoints()[0].clone();
    let pss_port =
        pss_host.authority().rsplit_once(':').map(|(_, p)| p.to_string()).unwrap_or_default();

    let img_dir = work.path().join("img");
    let t = Instant::now();
    let manifest = image::build(&image::BuildOptions {
        kernel: tree,
        nms: nms.clone(),
        out_dir: img_dir.clone(),
        modules: kernel::DEFAULT_MODULES.iter().map(|s| s.to_string()).collect(),
        boot: BootParams::default(),
        nms_config: None,
        strip: true,
    })?;
    let build_ms = t.elapsed().as_millis();
    let image = Image::open(&img_dir, true)?;
    println!("== NMS image (kernel {})", manifest.kernel_version);
    println!("build time              {build_ms} ms");
    println!("vmlinuz                 {:>10} bytes", manifest.kernel.bytes);
    println!(
        "initramfs.cpio          {:>10} bytes (/init {} bytes stripped, {} modules)",
        manifest.initramfs.bytes,
        manifest.init.bytes,
        manifest.modules.len()
    );
    println!("image total             {:>10} bytes", manifest.image_bytes());

    let boot = BootParams {
        pss: vec![Endpoint::parse(&format!("10.0.2.2:{pss_port}"))?],
        node: Some("rsu-vm".into()),
        ..BootParams::default()
    };
    let opts = |state: &str| -> anyhow::Result<VmOptions> {
        Ok(VmOptions {
            image: image.clone(),
            state_dir: work.path().join(state),
            memory_mib: args.memory_mib,
            cpus: 1,
            accel: args.accel,
            machine: Machine::Microvm,
            net: Net::User { host_port: vm::free_port()? },
            boot: boot.clone(),
            incoming: None,
        })
    };
    let limit = Duration::from_secs(args.boot_timeout_s);
    let (mut to_health, mut to_request) = (Vec::new(), Vec::new());
    let mut accel_used = Accel::Tcg;
    for i in 0..args.boots.max(1) {
        let o = opts(&format!("boot{i}"))?;
        let t = Instant::now();
        let mut vm = Vm::launch(&o, false).await?;
        vm.wait_serving(limit).await?;
        to_health.push(t.elapsed().as_millis());
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
    let mut src = Vm::launch(&opts("mig-src")?, false).await?;
    src.wait_serving(limit).await?;
    let c = client(&src.state.nms_endpoint, "vehicle-qemu").await?;
    fill(&c, args.volume_mib).await?;
    let (mut dest, q) = src.migrate(&work.path().join("mig-dst"), None).await?;
    c.read(0, 0, None).await?;
    println!(
        "QEMU live migration     total {} ms, downtime {} ms, {} MiB RAM moved (guest {} MiB, volume {} MiB); wall {} ms incl. starting the destination",
        q.total_ms,
        q.downtime_ms,
        q.ram_transferred_bytes >> 20,
        args.memory_mib,
        args.volume_mib,
        q.wall_ms
    );
    dest.stop(Duration::from_secs(30), false).await?;
    drop(src);

    // Route 2: wayside's state migration of the same volume between two NMSs on the host.
    let stop = CancellationToken::new();
    let mut servers = tokio::task::JoinSet::new();
    let mut addrs = Vec::new();
    for name in ["rsu-a", "rsu-b"] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        addrs.push(format!("127.0.0.1:{}", listener.local_addr()?.port()));
        let config = wayside_nms::config::Config {
            listen: addrs.last().cloned().unwrap_or_default(),
            node_id: name.into(),
            pss: vec![pss_host.authority().to_string()],
            ..Default::default()
        };
        servers.spawn(wayside_nms::server::run(config, listener, stop.clone()));
    }
    let c = client(&addrs[0], "vehicle-wayside").await?;
    fill(&c, args.volume_mib).await?;
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
    let wall = t.elapsed().as_millis();
    c.read(0, 0, None).await?;
    println!(
        "wayside state migration total {} ms, vehicle pause {} ms, {} MiB moved ({} blocks), outcome {:?}; wall {wall} ms",
        w.total_us / 1000,
        w.pause_us / 1000,
        w.bytes_moved >> 20,
        w.blocks_moved,
        w.outcome()
    );
    let wayside_ms = (w.total_us as f64 / 1000.0).max(0.001);
    println!(
        "ratio                   QEMU live migration / wayside migration: total {:.1}x, pause {:.1}x",
        q.total_ms as f64 / wayside_ms,
        q.downtime_ms as f64 / (w.pause_us as f64 / 1000.0).max(0.001)
    );
    stop.cancel();
    while servers.join_next().await.is_some() {}
    cluster.shutdown().await;
    Ok(())
}
