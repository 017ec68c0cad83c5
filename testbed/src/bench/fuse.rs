//! `testbed bench fuse`: fio through the vehicle's FUSE mount (a real PSS, a real NMS and an
//! in-process `nms mount`) against the same fio jobs on a local directory, in one run.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use wayside_nms::fuse::cli::MountArgs;
use wayside_nms::fuse::mount::is_mounted;
use wayside_pss::testing::LocalCluster;

/// Options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Bytes each fio job writes or reads.
    #[arg(long, default_value_t = 64 << 20)]
    pub size_bytes: u64,
    /// Longest one fio job may run, in seconds.
    #[arg(long, default_value_t = 20)]
    pub runtime_secs: u64,
    /// Volume block size, in bytes.
    #[arg(long, default_value_t = 65536)]
    pub block_size: u32,
    /// Working directory (default: a fresh one under the system temp dir).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// The fio binary.
    #[arg(long, default_value = "fio")]
    pub fio: String,
}

/// One fio job's figures.
#[derive(Debug, Clone, Copy, Default)]
struct Figures {
    mib_per_sec: f64,
    iops: f64,
    p50_us: f64,
    p99_us: f64,
}

fn fio(
    fio: &str,
    dir: &Path,
    rw: &str,
    bs: &str,
    size: u64,
    runtime: u64,
) -> anyhow::Result<Figures> {
    let out = Command::new(fio)
        .args([
            "--name=bench",
            "--ioengine=psync",
            "--numjobs=1",
            "--invalidate=1",
            "--output-format=json",
            "--randrepeat=1",
            "--end_fsync=1",
        ])
        // A full path: fio ignores --directory when --filename is given.
        .arg(format!("--filename={}", dir.join("fio.data").display()))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={bs}"))
        .arg(format!("--size={size}"))
        .arg(format!("--runtime={runtime}"))
        .output()
        .with_context(|| format!("running {fio} (install the `fio` package)"))?;
    anyhow::ensure!(
        out.status.success(),
        "fio {rw} {bs} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("fio's JSON output")?;
    let job = &v["jobs"][0];
    let side = if rw.contains("read") { &job["read"] } else { &job["write"] };
    let pct = |p: &str| side["clat_ns"]["percentile"][p].as_f64().unwrap_or(0.0) / 1000.0;
    Ok(Figures {
        mib_per_sec: side["bw_bytes"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
        iops: side["iops"].as_f64().unwrap_or(0.0),
        p50_us: pct("50.000000"),
        p99_us: pct("99.000000"),
    })
}

/// Runs the benchmark.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("wayside-bench-fuse-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir)?;
    anyhow::ensure!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is missing: the FUSE benchmark needs it"
    );
    println!(
        "FUSE mount vs local directory: fio psync, 1 job, {} MiB per job, data under {}",
        args.size_bytes >> 20,
        dir.display()
    );

    let cluster = LocalCluster::start(1, &dir.join("pss")).await.context("starting the PSS")?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let nms_addr = listener.local_addr()?.to_string();
    let config = wayside_nms::config::Config {
        node_id: "bench-nms".into(),
        listen: nms_addr.clone(),
        pss: cluster.endpoints().iter().map(|e| e.authority().to_string()).collect(),
        ..Default::default()
    };
    let nms_stop = CancellationToken::new();
    let nms = tokio::spawn(wayside_nms::server::run(config, listener, nms_stop.clone()));

    let point = dir.join("mnt");
    let local = dir.join("local");
    std::fs::create_dir_all(&point)?;
    std::fs::create_dir_all(&local)?;
    let mount_args = MountArgs {
        volume: "bench-fuse".into(),
        credential: "bench-secret".into(),
        nms: vec![nms_addr],
        mountpoint: point.clone(),
        cache_dir: dir.join("cache"),
        create_block_size: args.block_size,
        op_timeout_ms: 30_000,
        cache_capacity_bytes: 1 << 30,
        journal_limit_bytes: 256 << 20,
        fuse_threads: 2,
        drain_timeout_ms: 60_000,
        max_inodes: 1 << 16,
        file_stride_blocks: 1 << 20,
        client_id: None,
    };
    let mount_stop = CancellationToken::new();
    let stop = mount_stop.clone();
    let mount =
        tokio::task::spawn_blocking(move || wayside_nms::fuse::cli::serve(mount_args, stop));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !is_mounted(&point) {
        anyhow::ensure!(!mount.is_finished(), "the mount ended before it was ready");
        anyhow::ensure!(Instant::now() < deadline, "not mounted within 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let jobs = [
        ("write", "4k"),
        ("read", "4k"),
        ("randwrite", "4k"),
        ("randread", "4k"),
        ("write", "1m"),
        ("read", "1m"),
        ("randwrite", "1m"),
        ("randread", "1m"),
    ];
    let mut rows = Vec::new();
    let result: anyhow::Result<()> = async {
        for (rw, bs) in jobs {
            // 4 KiB jobs move less data so each point stays within the runtime.
            let size = if bs == "4k" { args.size_bytes / 4 } else { args.size_bytes };
            let (fio_bin, p, l, rt) = (args.fio.clone(), point.clone(), local.clone(), args.runtime_secs);
            let (f, d) = tokio::task::spawn_blocking(move || {
                let f = fio(&fio_bin, &p, rw, bs, size, rt)?;
                let d = fio(&fio_bin, &l, rw, bs, size, rt)?;
                anyhow::Ok((f, d))
            })
            .await??;
            println!(
                "{rw:>9} {bs:>2}: mount {:>8.1} MiB/s {:>8.0} IOPS p50 {:>8.1} us p99 {:>9.1} us | local {:>8.1} MiB/s {:>8.0} IOPS p50 {:>7.1} us p99 {:>8.1} us | ratio {:.3}",
                f.mib_per_sec, f.iops, f.p50_us, f.p99_us, d.mib_per_sec, d.iops, d.p50_us, d.p99_us, f.mib_per_sec / d.mib_per_sec.max(1e-9)
            );
            rows.push((rw, bs, f, d));
        }
        Ok(())
    }
    .await;

    mount_stop.cancel();
    let served = mount.await?;
    nms_stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(15), nms).await;
    cluster.shutdown().await;
    result?;
    served?;

    println!();
    println!("| job | bs | mount MiB/s | mount IOPS | mount p50 us | mount p99 us | local MiB/s | local IOPS | local p50 us | local p99 us | mount/local |");
    println!("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (rw, bs, f, d) in rows {
        println!(
            "| {rw} | {bs} | {:.1} | {:.0} | {:.1} | {:.1} | {:.1} | {:.0} | {:.1} | {:.1} | {:.3} |",
            f.mib_per_sec, f.iops, f.p50_us, f.p99_us, d.mib_per_sec, d.iops, d.p50_us, d.p99_us, f.mib_per_sec / d.mib_per_sec.max(1e-9)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
