//! `testbed bench migration`: a volume with 64 MiB cached (16 MiB of it dirty) moved
//! between two NMSs, a real 3-node PSS behind them, while a vehicle keeps reading and
//! writing through the client library. Prints, per move: total time, the switch pause
//! (source side), the vehicle-visible pause (p50/p99/max latency of the vehicle's
//! operations during the move), bytes moved and the ratio to bytes / link rate.
//!
//! Links (`--link`):
//! - `loopback` (default): everything in this process on 127.0.0.1; the bound is the
//!   loopback TCP rate measured in the same run. Targets (DESIGN.md section 10): total
//!   <= 100 ms, pause p99 <= 10 ms.
//! - `shaped`: two real `nms serve` processes, each in its own network namespace, joined
//!   by a point-to-point veth shaped with `tc tbf` to `--link-rate` (1 Gbit/s) in both
//!   directions; the move runs over that link. The 3 PSS nodes are `pss serve` processes
//!   in a third ("core") namespace behind a bridge, which both NMSs (and, for the leader
//!   check, the host) reach over their own unshaped veths. The vehicle is this process,
//!   in the host namespace, with an unshaped veth to each NMS. The bound is bytes / link
//!   rate; target <= 1.2x.

use anyhow::{bail, Context as _};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use wayside_nms::client::{ClientOptions, VolumeClient};
use wayside_proto::pb;
use wayside_proto::types::{BlockSize, Credential, Endpoint, VolumeName};

/// Which link the move crosses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LinkKind {
    /// In-process NMSs on 127.0.0.1.
    Loopback,
    /// `nms serve` processes in two namespaces joined by a `tc tbf`-shaped veth.
    Shaped,
    /// Both, one after the other.
    Both,
}

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
    /// The link the move crosses.
    #[arg(long, value_enum, default_value = "loopback")]
    pub link: LinkKind,
    /// Rate of the shaped link between the two NMSs, each direction (units: bit, kbit,
    /// mbit, gbit per second).
    #[arg(long, default_value = "1gbit", value_parser = crate::netns::parse_rate)]
    pub link_rate: u64,
    /// Each NMS's `block_pool_bytes` (0 to see a move into memory never touched before).
    #[arg(long, default_value_t = wayside_nms::config::Config::default().block_pool_bytes)]
    pub block_pool_bytes: u64,
    /// Longest wait before each move for the machine to go quiet (the PSS done with what
    /// the fill left it: Raft log compaction, sled's flushes; dirty pages written out), in
    /// seconds; 0 does not wait.
    #[arg(long, default_value_t = 15)]
    pub settle_seconds: u64,
}

const BS: usize = 4096;

/// The two NMSs as the bench sees them.
struct Pair {
    /// Addresses the vehicle uses (and the admin calls go to).
    vehicle: [Endpoint; 2],
    /// Addresses each NMS uses to reach the other (the move's target address).
    peer: [Endpoint; 2],
    /// Bytes per second of the link the move crosses, and its name for the table.
    bound_bytes_per_s: f64,
    bound_name: String,
    /// Bytes per second a plain TCP stream reached over the same link in this run (the
    /// peer the move is compared with), where that differs from the bound.
    raw_tcp_bytes_per_s: Option<f64>,
    /// The processes (besides this one) whose CPU use must settle before each move.
    pids: Vec<u32>,
}

fn nms_config(name: &str, pss: &[String], block_pool_bytes: u64) -> wayside_nms::config::Config {
    wayside_nms::config::Config {
        node_id: name.into(),
        block_pool_bytes,
        pss: pss.to_vec(),
        // Dirty data stays dirty until a flush (no delay, no start threshold ends it), so
        // the move carries the dirty part.
        writeback_delay_ms: 600_000,
        dirty_limit_bytes_per_volume: 128 << 20,
        writeback_start_dirty_bytes_per_volume: 128 << 20,
        writeback_start_dirty_bytes: 256 << 20,
        ..Default::default()
    }
}

/// Two RSUs on one machine: `nms serve` processes in namespaces `nms-a` and `nms-b`, joined
/// by a point-to-point veth shaped with `tc tbf` both ways (the backhaul a move crosses);
/// a 3-node PSS (`pss serve` processes) in a `core` namespace behind a bridge, which both
/// NMSs reach over unshaped veths, as does the host; and an unshaped veth from the host (the
/// vehicle, this process) to each NMS. `bench migration --link shaped` and the link-cut
/// test run on it.
pub struct ShapedRsus {
    /// The namespaces, links and processes (all removed when it is dropped).
    pub lab: crate::netns::Lab,
    /// The NMSs' namespaces, `a` then `b`.
    pub ns: [crate::netns::Ns; 2],
    /// The shaped link between the NMSs (end `a` in `nms-a`).
    pub p2p: crate::netns::Link,
    /// The shaping of each direction of `p2p`.
    pub tbf: crate::netns::Tbf,
    /// The PSS nodes (`host:port`, reachable from the host too).
    pub pss: Vec<String>,
    /// Each NMS's address on the vehicle's link (also for admin calls).
    pub vehicle: [Endpoint; 2],
    /// Each NMS's address on `p2p` (what the other NMS moves a volume to).
    pub peer: [Endpoint; 2],
    /// The core segment's network address (`/24`).
    pub core_net: std::net::Ipv4Addr,
}

/// The port every NMS of a [`ShapedRsus`] listens on.
pub const SHAPED_NMS_PORT: u16 = 7100;

impl ShapedRsus {
    /// Builds the namespaces and links in `lab`, starts the PSS and waits for its leader,
    /// then starts NMS `a` and `b` with `config(name, pss endpoints)` (its `listen` and
    /// `advertise` are set here) and waits until both accept connections.
    pub async fn start(
        mut lab: crate::netns::Lab,
        nms_bin: &std::path::Path,
        pss_bin: &std::path::Path,
        tbf: &crate::netns::Tbf,
        config: impl Fn(&str, &[String]) -> wayside_nms::config::Config,
    ) -> anyhow::Result<Self> {
        use crate::netns;
        let core = lab.namespace("core")?;
        let ns = [lab.namespace("nms-a")?, lab.namespace("nms-b")?];
        // The core segment: a bridge with the PSS address; each NMS and the host plug in.
        let br = lab.bridge(&core)?;
        let seg = lab.segment()?.octets();
        let at = |h: u8| std::net::Ipv4Addr::new(seg[0], seg[1], seg[2], h);
        lab.addr(&br, at(1), 24)?;
        for (i, n) in ns.iter().enumerate() {
            let l = lab.veth_bare(Some(n), Some(&core))?;
            lab.enslave(&l.b, &br)?;
            lab.addr(&l.a, at(2 + i as u8), 24)?;
        }
        let mgmt = lab.veth_bare(None, Some(&core))?;
        lab.enslave(&mgmt.b, &br)?;
        lab.addr(&mgmt.a, at(254), 24)?;
        // The shaped link between the NMSs, both directions.
        let p2p = lab.veth(Some(&ns[0]), Some(&ns[1]), 30)?;
        lab.tbf_both(&p2p, tbf)?;
        // The vehicle's (unshaped) links.
        let va = lab.veth(None, Some(&ns[0]), 30)?;
        let vb = lab.veth(None, Some(&ns[1]), 30)?;
        let pss_nodes: Vec<_> = (0..3u16)
            .map(|i| (core.clone(), std::net::SocketAddr::from((at(1), 7401 + i))))
            .collect();
        let data = lab.log_dir().join("data");
        let pss = netns::spawn_pss(&mut lab, pss_bin, &pss_nodes, &data, None)?;
        netns::wait_pss_leader(&mut lab, &pss, None, Duration::from_secs(30))
            .await
            .map_err(anyhow::Error::msg)?;
        let vehicle_addr = [va.b.addr, vb.b.addr];
        for (i, n) in ns.iter().enumerate() {
            let name = ["a", "b"][i];
            let cfg = wayside_nms::config::Config {
                listen: format!("0.0.0.0:{SHAPED_NMS_PORT}"),
                advertise: format!("{}:{SHAPED_NMS_PORT}", vehicle_addr[i]),
                ..config(name, &pss)
            };
            netns::spawn_nms(&mut lab, nms_bin, n, &cfg)?;
        }
        for a in vehicle_addr {
            netns::wait_tcp(&mut lab, (a, SHAPED_NMS_PORT).into(), Duration::from_secs(20))
                .await
                .map_err(anyhow::Error::msg)?;
        }
        let ep = |a: std::net::Ipv4Addr| Endpoint::parse(&format!("{a}:{SHAPED_NMS_PORT}"));
        Ok(Self {
            vehicle: [ep(va.b.addr)?, ep(vb.b.addr)?],
            peer: [ep(p2p.a.addr)?, ep(p2p.b.addr)?],
            lab,
            ns,
            p2p,
            tbf: *tbf,
            pss,
            core_net: at(0),
        })
    }

    /// One line naming the namespaces, the links and the shaping.
    pub fn describe(&self) -> String {
        format!(
            "namespaces {}*; core {}/24 (PSS), NMS link {} <-> {} (tbf rate {} bit/s, burst {} B, latency {:?} each way); vehicle -> {} / {}",
            self.lab.prefix(),
            self.core_net,
            self.p2p.a.addr,
            self.p2p.b.addr,
            self.tbf.rate_bits_per_s,
            self.tbf.burst_bytes,
            self.tbf.latency,
            self.vehicle[0].authority(),
            self.vehicle[1].authority(),
        )
    }
}

async fn start_nms(
    name: &str,
    pss: &[Endpoint],
    block_pool_bytes: u64,
    stop: &CancellationToken,
) -> anyhow::Result<(Endpoint, tokio::task::JoinHandle<anyhow::Result<()>>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let ep = Endpoint::parse(&listener.local_addr()?.to_string())?;
    let pss: Vec<String> = pss.iter().map(|e| e.authority().to_owned()).collect();
    let cfg = wayside_nms::config::Config {
        listen: ep.authority().to_owned(),
        // Both NMSs (two RSUs) share this process and its CPUs, so neither takes serving
        // threads of its own (the default, half the CPUs, assumes one NMS per machine): on
        // 2 CPUs, two serving threads beside the shared runtime made moves take 32-148 ms
        // (2 of 12 over 100 ms), against 39-47 ms served by the runtime.
        serve_threads: 0,
        ..nms_config(name, &pss, block_pool_bytes)
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
    let body = async {
        if matches!(args.link, LinkKind::Loopback | LinkKind::Both) {
            run_loopback(&args).await?;
        }
        if matches!(args.link, LinkKind::Shaped | LinkKind::Both) {
            run_shaped(&args).await?;
        }
        anyhow::Ok(())
    };
    // Ctrl-C drops the body: its namespaces and processes go with it (Lab's Drop).
    tokio::select! {
        r = body => r,
        _ = tokio::signal::ctrl_c() => bail!("interrupted (Ctrl-C); everything started was removed"),
    }
}

async fn run_loopback(args: &Args) -> anyhow::Result<()> {
    println!("== link: loopback (in-process NMSs and PSS on 127.0.0.1)");
    let dir = tempfile::tempdir()?;
    let cluster = wayside_pss::testing::LocalCluster::start(3, dir.path()).await?;
    let stop = CancellationToken::new();
    let (a, ta) = start_nms("a", &cluster.endpoints(), args.block_pool_bytes, &stop).await?;
    let (b, tb) = start_nms("b", &cluster.endpoints(), args.block_pool_bytes, &stop).await?;
    let loopback = loopback_bytes_per_s().await?;
    println!("loopback TCP: {:.2} GB/s", loopback / 1e9);
    let bytes = usize::try_from(args.cached_bytes).context("--cached-bytes")?;
    println!(
        "fresh memory: touching {} MiB newly mapped takes {:.1} ms here (page faults a move's target pays when it has never held that much)",
        args.cached_bytes >> 20,
        fresh_touch_ms(bytes)?
    );
    let pair = Pair {
        vehicle: [a.clone(), b.clone()],
        peer: [a, b],
        bound_bytes_per_s: loopback,
        bound_name: "loopback rate".into(),
        raw_tcp_bytes_per_s: None,
        pids: Vec::new(),
    };
    let r = measure(args, &pair).await;
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), ta).await;
    let _ = tokio::time::timeout(Duration::from_secs(30), tb).await;
    cluster.shutdown().await;
    r?;
    println!("\ntargets: total <= 100 ms; vehicle-visible pause p99 <= 10 ms\n");
    Ok(())
}

async fn run_shaped(args: &Args) -> anyhow::Result<()> {
    use crate::netns::{self, Lab, Tbf};
    println!(
        "== link: shaped ({} Mbit/s tc tbf between two network namespaces; `nms serve` and `pss serve` processes)",
        args.link_rate / 1_000_000
    );
    netns::probe().map_err(|e| anyhow::anyhow!("network namespaces are unusable here: {e}"))?;
    let nms_bin = netns::wayside_binary("nms").map_err(anyhow::Error::msg)?;
    let pss_bin = netns::wayside_binary("pss").map_err(anyhow::Error::msg)?;
    netns::reap_stale();
    let rsus = ShapedRsus::start(
        Lab::new("mig")?,
        &nms_bin,
        &pss_bin,
        &Tbf::for_rate(args.link_rate),
        |name, pss| nms_config(name, pss, args.block_pool_bytes),
    )
    .await?;
    println!("{}", rsus.describe());
    let ShapedRsus { mut lab, ns, p2p, vehicle, peer, .. } = rsus;
    // The peer: one plain TCP stream carrying the cached bytes over the same link, each
    // way, while the NMSs idle.
    let mut raw = Vec::new();
    for (from, to, addr) in [(&ns[0], &ns[1], p2p.b.addr), (&ns[1], &ns[0], p2p.a.addr)] {
        let at = std::net::SocketAddr::from((addr, 7199));
        let l = lab.tcp_listener_in(to, at)?;
        let s = lab.tcp_connect_in(from, at)?;
        raw.push(raw_tcp_bytes_per_s(l, s, args.cached_bytes).await?);
    }
    let raw_rate = raw.iter().sum::<f64>() / raw.len() as f64;
    println!(
        "raw TCP over the shaped link ({} MiB, one stream): {} MB/s ({:.2}x the bound)",
        args.cached_bytes >> 20,
        raw.iter().map(|r| format!("{:.1}", r / 1e6)).collect::<Vec<_>>().join(" / "),
        args.link_rate as f64 / 8.0 / raw_rate
    );
    let pair = Pair {
        vehicle,
        peer,
        bound_bytes_per_s: args.link_rate as f64 / 8.0,
        bound_name: format!("{} Mbit/s", args.link_rate / 1_000_000),
        raw_tcp_bytes_per_s: Some(raw_rate),
        pids: lab.pids(),
    };
    let r = measure(args, &pair).await;
    if let Err(e) = &r {
        for w in ["nms-a", "nms-b"] {
            eprintln!("--- {w} log tail:\n{}", lab.log_tail(w, 1500));
        }
        eprintln!("error: {e:#}");
    }
    let prefix = lab.prefix().to_string();
    // The NMSs first: they flush to the PSS when stopped.
    lab.stop_matching("nms", Duration::from_secs(10));
    drop(lab);
    let left: Vec<_> =
        netns::list_namespaces().into_iter().filter(|n| n.starts_with(&prefix)).collect();
    println!("\nremoved every namespace and process ({} left with prefix {prefix})", left.len());
    r?;
    println!("target: total <= 1.2x bytes / link rate\n");
    Ok(())
}

/// Fills the volume on NMS A, then moves it `runs` times (A->B, B->A, ...) while a vehicle
/// works, and prints the table.
async fn measure(args: &Args, pair: &Pair) -> anyhow::Result<()> {
    let mut o = ClientOptions::new(
        pair.vehicle.to_vec(),
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
    let (mut from, mut to) = (0usize, 1usize);
    for run in 0..args.runs {
        // Nothing left over from the fill or the previous move (the PSS's compaction and
        // flushes, dirty pages) competes with the move for the 2 CPUs. (Measured: it takes
        // 0.3-0.4 s here, and first moves over the shaped link stay slower than later
        // ones with it: 1.17-1.21x the bound against 1.07x.)
        if args.settle_seconds > 0 {
            let max = Duration::from_secs(args.settle_seconds);
            let waited = super::quiet::settle(&pair.pids, max).await;
            println!("run {}: the machine settled in {:.1} s", run + 1, waited.as_secs_f64());
        }
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
            tonic::transport::Endpoint::from_shared(pair.vehicle[from].uri().to_owned())?
                .connect()
                .await?,
        );
        let ready = pb::nms_admin_client::NmsAdminClient::new(
            tonic::transport::Endpoint::from_shared(pair.vehicle[to].uri().to_owned())?
                .connect()
                .await?,
        )
        .node_status(pb::NodeStatusRequest {})
        .await?
        .into_inner()
        .block_pool_free_bytes;
        let r = admin
            .start_migration(pb::StartMigrationRequest {
                volume: "moving".into(),
                target_address: pair.peer[to].uri().into(),
                max_rounds: 0,
                switch_below_bytes: 0,
            })
            .await?
            .into_inner();
        // Let the vehicle reach the new NMS before stopping it.
        c.stat().await?;
        done.cancel();
        let mut lat = vehicle.await??;
        println!(
            "run {}: the target had {:.1} MiB of faulted-in block buffers ready (block_pool_bytes)",
            run + 1,
            ready as f64 / f64::from(1 << 20)
        );
        print!("run {}: {}", run + 1, wayside_nms::cli::render_report(&r));
        if r.outcome != pb::MigrationOutcome::Completed as i32 {
            bail!("the move aborted: {}", r.error);
        }
        let (p50, p99) = (pct(&mut lat, 0.5), pct(&mut lat, 0.99));
        let max = lat.last().copied().unwrap_or(0) as f64 / 1000.0;
        rows.push((r.total_us as f64 / 1e3, r.pause_us as f64 / 1e3, p50, p99, max, r.bytes_moved));
        std::mem::swap(&mut from, &mut to);
    }
    let raw_head = if pair.raw_tcp_bytes_per_s.is_some() {
        (" raw TCP ms (same bytes) | total / raw TCP |", " ---: | ---: |")
    } else {
        ("", "")
    };
    println!("\n| run | total ms | switch pause ms | vehicle op p50 ms | p99 ms | max ms | MiB moved | bound ms (bytes / {}) | total / bound |{}", pair.bound_name, raw_head.0);
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |{}", raw_head.1);
    for (i, (total, pause, p50, p99, max, bytes)) in rows.iter().enumerate() {
        let bound_ms = *bytes as f64 / pair.bound_bytes_per_s * 1e3;
        let raw = pair.raw_tcp_bytes_per_s.map_or(String::new(), |r| {
            let raw_ms = *bytes as f64 / r * 1e3;
            format!(" {raw_ms:.1} | {:.2}x |", total / raw_ms)
        });
        println!(
            "| {} | {total:.1} | {pause:.1} | {p50:.3} | {p99:.3} | {max:.1} | {:.1} | {bound_ms:.1} | {:.2}x |{raw}",
            i + 1,
            *bytes as f64 / (1 << 20) as f64,
            total / bound_ms
        );
    }
    Ok(())
}

/// Bytes per second of one plain TCP stream: `bytes` written to `s`, timed until the
/// accepted end of `l` has read them all (blocking sockets, on their own threads).
async fn raw_tcp_bytes_per_s(
    l: std::net::TcpListener,
    mut s: std::net::TcpStream,
    bytes: u64,
) -> anyhow::Result<f64> {
    use std::io::{Read as _, Write as _};
    let reader = tokio::task::spawn_blocking(move || {
        let (mut r, _) = l.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        while got < bytes {
            let n = r.read(&mut buf)?;
            if n == 0 {
                bail!("the raw TCP stream ended after {got} of {bytes} bytes");
            }
            got += n as u64;
        }
        anyhow::Ok(Instant::now())
    });
    let writer = tokio::task::spawn_blocking(move || {
        s.set_nodelay(true)?;
        let buf = vec![1u8; 1 << 20];
        let t = Instant::now();
        let mut sent = 0u64;
        while sent < bytes {
            let n = (bytes - sent).min(buf.len() as u64) as usize;
            s.write_all(&buf[..n])?;
            sent += n as u64;
        }
        anyhow::Ok(t)
    });
    let started = writer.await??;
    let done = reader.await??;
    Ok(bytes as f64 / done.duration_since(started).as_secs_f64())
}

/// Milliseconds to touch (one write per 4 KiB page) `bytes` of freshly mapped memory: the
/// page-fault cost a process pays the first time it holds that much, e.g. a move's
/// target filling its cache. On a VM whose own memory is not yet backed by the host this
/// is several times the cost of reusing freed pages.
fn fresh_touch_ms(bytes: usize) -> anyhow::Result<f64> {
    // SAFETY: an anonymous private mapping of `bytes`, written within bounds, then unmapped.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            bail!("mmap of {bytes} bytes: {}", std::io::Error::last_os_error());
        }
        let base = p.cast::<u8>();
        let t = Instant::now();
        for off in (0..bytes).step_by(4096) {
            std::ptr::write_volatile(base.add(off), 1);
        }
        let ms = t.elapsed().as_secs_f64() * 1e3;
        libc::munmap(p, bytes);
        Ok(ms)
    }
}

/// Loopback TCP rate: one stream copying 256 MiB ([`raw_tcp_bytes_per_s`] on 127.0.0.1).
async fn loopback_bytes_per_s() -> anyhow::Result<f64> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let s = std::net::TcpStream::connect(l.local_addr()?)?;
    raw_tcp_bytes_per_s(l, s, 256 << 20).await
}
