//! `testbed bench migration`: a volume with 64 MiB cached (16 MiB of it dirty) moved
//! between two NMSs over loopback, a real 3-node PSS behind them, while a vehicle keeps
//! reading and writing through the client library. Prints, per move: total time, the
//! switch pause (source side), the vehicle-visible pause (p50/p99/max latency of the
//! vehicle's operations during the move), bytes moved and the ratio to bytes / loopback
//! rate. Targets: DESIGN.md section 10 (total <= 100 ms, pause p99 <= 10 ms).
//!
//! NOT DONE: the 1 Gbit/s `tc tbf`-shaped variant between two network namespaces.

use anyhow::{bail, Context as _};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use wayside_nms::client::{ClientOptions, VolumeClient};
use wayside_proto::pb;
use wayside_proto::types::{BlockSize, Credential, Endpoint, VolumeName};

/// Options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Bytes cached on the source before the move.
    #[arg(long, default_value_t = 64 << 20)]
    pub cached_bytes: u64,
    /// Of which dirty (not yet written back) at the move.
    #[arg(long, default_value_t = 16 << 20)]
    pub dirty_bytes: u64,
    /// Moves to measure (alternating A->B, B->A).
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
}

const BS: usize = 4096;

async fn start_nms(
    name: &str,
    pss: &[Endpoint],
    stop: &CancellationToken,
) -> anyhow::Result<(Endpoint, tokio::task::JoinHandle<anyhow::Result<()>>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let ep = Endpoint::parse(&listener.local_addr()?.to_string())?;
    let cfg = wayside_nms::config::Config {
        listen: ep.authority().to_owned(),
        node_id: name.into(),
        pss: pss.iter().map(|e| e.authority().to_owned()).collect(),
        // Dirty data stays dirty until a flush, so the move carries the dirty part.
        writeback_delay_ms: 600_000,
        dirty_limit_bytes_per_volume: 128 << 20,
        ..Default::default()
    };
    Ok((ep, tokio::spawn(wayside_nms::server::run(cfg, listener, stop.clone()))))
}

fn pct(v: &mut [u64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_unstable();
    v[((v.len() as f64 - 1.0) * p).round() as usize] as f64 / 1000.0
}

/// Runs the benchmark.
pub async fn run(args: Args) -> anyhow::Result<()> {
    if cfg!(debug_assertions) {
        println!("NOTE: a debug build; run `cargo run --release -p wayside-testbed -- bench migration` for real figures");
    }
    if args.dirty_bytes > args.cached_bytes {
        bail!("--dirty-bytes must not exceed --cached-bytes");
    }
    let dir = tempfile::tempdir()?;
    let cluster = wayside_pss::testing::LocalCluster::start(3, dir.path()).await?;
    let stop = CancellationToken::new();
    let (a, ta) = start_nms("a", &cluster.endpoints(), &stop).await?;
    let (b, tb) = start_nms("b", &cluster.endpoints(), &stop).await?;
    let mut o = ClientOptions::new(
        vec![a.clone(), b.clone()],
        VolumeName::new("moving")?,
        Credential::new("k")?,
    );
    o.create_block_size = Some(BlockSize::new(BS as u32)?);
    o.journal_limit_bytes = 2 * args.cached_bytes;
    o.op_timeout = Duration::from_secs(60);
    let c = VolumeClient::open(o).await.context("opening the volume")?;
    let blocks = args.cached_bytes / BS as u64;
    let dirty = args.dirty_bytes / BS as u64;
    // Fill: everything written and persisted, then the dirty part rewritten.
    let mut fill = tokio::task::JoinSet::new();
    for w in 0..8u64 {
        let c = c.clone();
        fill.spawn(async move {
            let mut blk = w;
            while blk < blocks {
                c.write(blk, 0, vec![(blk % 251) as u8; BS]).await?;
                blk += 8;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = fill.join_next().await {
        r??;
    }
    c.flush().await?;
    for blk in 0..dirty {
        c.write(blk, 0, vec![7; BS]).await?;
    }
    println!(
        "volume: {} blocks ({} MiB) cached, {} MiB dirty",
        blocks,
        args.cached_bytes >> 20,
        c.stat().await?.dirty_bytes >> 20
    );
    let mut rows = Vec::new();
    let (mut from, mut to) = (a.clone(), b.clone());
    for run in 0..args.runs {
        // The vehicle: a read and a write per loop, timing each, until the move is over.
        let done = CancellationToken::new();
        let vehicle = {
            let (c, done) = (c.clone(), done.clone());
            tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut n = 0u64;
                while !done.is_cancelled() {
                    n += 1;
                    let blk = (n * 7919) % blocks;
                    let t = Instant::now();
                    c.read(blk, 0, None).await?;
                    lat.push(u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX));
                    let t = Instant::now();
                    c.write(blk % dirty.max(1), 0, vec![n as u8; BS]).await?;
                    lat.push(u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX));
                }
                anyhow::Ok(lat)
            })
        };
        let mut admin = pb::nms_admin_client::NmsAdminClient::new(
            tonic::transport::Endpoint::from_shared(from.uri().to_owned())?.connect().await?,
        );
        let r = admin
            .start_migration(pb::StartMigrationRequest {
                volume: "moving".into(),
                target_address: to.uri().into(),
                max_rounds: 0,
                switch_below_bytes: 0,
            })
            .await?
            .into_inner();
        // Let the vehicle reach the new NMS before stopping it.
        c.stat().await?;
        done.cancel();
        let mut lat = vehicle.await??;
        print!("run {}: {}", run + 1, wayside_nms::cli::render_report(&r));
        if r.outcome != pb::MigrationOutcome::Completed as i32 {
            bail!("the move aborted: {}", r.error);
        }
        let (p50, p99) = (pct(&mut lat, 0.5), pct(&mut lat, 0.99));
        let max = lat.last().copied().unwrap_or(0) as f64 / 1000.0;
        rows.push((r.total_us as f64 / 1e3, r.pause_us as f64 / 1e3, p50, p99, max, r.bytes_moved));
        std::mem::swap(&mut from, &mut to);
    }
    // Loopback rate, measured here: one TCP stream copying 256 MiB.
    let loopback = loopback_bytes_per_s().await?;
    println!("\nloopback TCP: {:.2} GB/s\n", loopback / 1e9);
    println!("| run | total ms | switch pause ms | vehicle op p50 ms | p99 ms | max ms | MiB moved | total / (bytes/loopback rate) |");
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (i, (total, pause, p50, p99, max, bytes)) in rows.iter().enumerate() {
        let bound_ms = *bytes as f64 / loopback * 1e3;
        println!(
            "| {} | {total:.1} | {pause:.1} | {p50:.3} | {p99:.3} | {max:.1} | {:.1} | {:.1}x |",
            i + 1,
            *bytes as f64 / (1 << 20) as f64,
            total / bound_ms
        );
    }
    println!("\ntargets: total <= 100 ms; vehicle-visible pause p99 <= 10 ms");
    println!("NOT MEASURED: the 1 Gbit/s tc-tbf shaped netns variant (not built yet)");
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), ta).await;
    let _ = tokio::time::timeout(Duration::from_secs(30), tb).await;
    cluster.shutdown().await;
    Ok(())
}

async fn loopback_bytes_per_s() -> anyhow::Result<f64> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    let total = 256usize << 20;
    let reader = tokio::spawn(async move {
        let (mut s, _) = l.accept().await?;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0;
        while got < total {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            got += n;
        }
        anyhow::Ok(got)
    });
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    let buf = vec![1u8; 1 << 20];
    let t = Instant::now();
    for _ in 0..(total >> 20) {
        s.write_all(&buf).await?;
    }
    s.flush().await?;
    let got = reader.await??;
    Ok(got as f64 / t.elapsed().as_secs_f64())
}
