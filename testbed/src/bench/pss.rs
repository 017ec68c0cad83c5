//! `testbed bench pss`: durable 4 KiB writes to a 3-node PSS and to a 3-member etcd
//! cluster (Debian `etcd-server`), both started by this run on this machine, driven
//! side by side at several client counts; prints ops/s, p50, p99, CPU time per
//! operation (both systems and the client driver) and the PSS/etcd ratios.
//!
//! Both systems acknowledge a write only after a majority fsynced it. PSS clients send
//! `WriteBatch` (one 4 KiB op, a fresh request id) through `PssClient`; etcd clients
//! send `etcdserverpb.KV/Put` (4 KiB value) over gRPC to the etcd leader. Clients of
//! both share connections the same way (one HTTP/2 connection per 64 clients).

use anyhow::{bail, Context as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use wayside_proto::pb;
use wayside_proto::types::Endpoint;
use wayside_pss::client::{ClientOptions, PssClient};
use wayside_pss::testing::LocalCluster;

use super::quiet::{settle, usage, Usage};

/// Options.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Concurrent client counts to measure, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16,256")]
    pub clients: Vec<usize>,
    /// Measured seconds per system and client count.
    #[arg(long, default_value_t = 5)]
    pub seconds: u64,
    /// Value size in bytes.
    #[arg(long, default_value_t = 4096)]
    pub value_bytes: usize,
    /// The etcd server binary.
    #[arg(long, default_value = "etcd")]
    pub etcd: PathBuf,
    /// Directory for both systems' data (default: a new directory under the system temp dir).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Measure the PSS alone (no etcd, no ratio): to profile it or count its CPU with
    /// outside tools without etcd's phases in between.
    #[arg(long)]
    pub no_etcd: bool,
    /// Rounds per client count: PSS and etcd alternate this many times and each
    /// system's figures are the median round's (by ops/s). This machine is a shared
    /// VM whose speed drifts from minute to minute; interleaved rounds expose both
    /// systems to the same drift.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Longest wait before each phase for the machine to go quiet (dirty pages written
    /// out, both systems' processes idle), in seconds.
    #[arg(long, default_value_t = 15)]
    pub settle_seconds: u64,
    /// Run the PSS with buffered (page cache) writes instead of `O_DIRECT` (its
    /// `direct_io = false`), to compare the two.
    #[arg(long)]
    pub buffered_io: bool,
}

/// The round with the median ops/s.
fn median(mut rounds: Vec<Figures>) -> Figures {
    rounds.sort_by(|a, b| a.ops_per_sec.total_cmp(&b.ops_per_sec));
    rounds[rounds.len() / 2]
}

/// Clients that share one HTTP/2 connection.
const CLIENTS_PER_CONNECTION: usize = 64;

#[derive(Debug, Clone, Copy)]
struct Figures {
    ops_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    errors: u64,
    /// CPU time (user + system, every thread of the system measured and of the client
    /// driver) per operation, in microseconds: what the throughput would be bounded by
    /// on idle cores, and a figure the other load on a shared machine disturbs less.
    cpu_us_per_op: f64,
    /// Minor page faults per operation (same processes as `cpu_us_per_op`): memory the
    /// allocator handed back to the kernel and faulted in (zeroed) again; unlike CPU time
    /// this count does not depend on the machine's other load.
    faults_per_op: f64,
}

fn figures(mut lat: Vec<Duration>, elapsed: Duration, errors: u64, used: Usage) -> Figures {
    lat.sort_unstable();
    let pct = |p: f64| {
        if lat.is_empty() {
            return f64::NAN;
        }
        let i = ((lat.len() as f64 - 1.0) * p).round() as usize;
        lat[i].as_secs_f64() * 1e3
    };
    Figures {
        ops_per_sec: lat.len() as f64 / elapsed.as_secs_f64(),
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        errors,
        cpu_us_per_op: used.cpu_secs * 1e6 / lat.len().max(1) as f64,
        faults_per_op: used.faults / lat.len().max(1) as f64,
    }
}

/// Runs `clients` loops of `op(client, seq)` for `secs`, after a short warm-up; the CPU
/// time of this process and of `pids` is taken over the measured window.
async fn drive<F, Fut>(clients: usize, secs: u64, pids: Vec<u32>, op: F) -> Figures
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let op = Arc::new(op);
    let warmup = Duration::from_millis(500);
    let start = Instant::now() + warmup;
    let end = start + Duration::from_secs(secs);
    let cpu = tokio::spawn(async move {
        tokio::time::sleep_until(start.into()).await;
        let before = usage(&pids);
        tokio::time::sleep_until(end.into()).await;
        let after = usage(&pids);
        Usage { cpu_secs: after.cpu_secs - before.cpu_secs, faults: after.faults - before.faults }
    });
    let mut set = tokio::task::JoinSet::new();
    for c in 0..clients {
        let op = op.clone();
        set.spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let mut seq = 0u64;
            loop {
                seq += 1;
                let t = Instant::now();
                if t >= end {
                    break;
                }
                let ok = op(c, seq).await;
                if t >= start {
                    if ok {
                        lat.push(t.elapsed());
                    } else {
                        errors += 1;
                    }
                }
            }
            (lat, errors)
        });
    }
    let mut all = Vec::new();
    let mut errors = 0;
    while let Some(r) = set.join_next().await {
        if let Ok((l, e)) = r {
            all.extend(l);
            errors += e;
        }
    }
    let used = cpu.await.unwrap_or(Usage { cpu_secs: f64::NAN, faults: f64::NAN });
    figures(all, Duration::from_secs(secs), errors, used)
}

// --- etcd, over its gRPC API (message shapes from etcd's rpc.proto) ---

#[derive(Clone, PartialEq, prost::Message)]
struct PutRequest {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
}

/// Only success matters; the header's fields are not read.
#[derive(Clone, PartialEq, prost::Message)]
struct PutResponse {}

#[derive(Clone, PartialEq, prost::Message)]
struct StatusRequest {}

#[derive(Clone, PartialEq, prost::Message)]
struct ResponseHeader {
    #[prost(uint64, tag = "2")]
    member_id: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct StatusResponse {
    #[prost(message, optional, tag = "1")]
    header: Option<ResponseHeader>,
    #[prost(uint64, tag = "4")]
    leader: u64,
}

async fn unary<Req, Resp>(ch: Channel, path: &'static str, req: Req) -> Result<Resp, tonic::Status>
where
    Req: prost::Message + Send + Sync + 'static,
    Resp: prost::Message + Default + Send + Sync + 'static,
{
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let codec = tonic_prost::ProstCodec::<Req, Resp>::default();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
    grpc.unary(tonic::Request::new(req), path, codec).await.map(|r| r.into_inner())
}

struct Etcd {
    children: Vec<Child>,
    clients: Vec<String>,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn start_etcd(bin: &Path, dir: &Path) -> anyhow::Result<Etcd> {
    let mut peers = Vec::new();
    let mut clients = Vec::new();
    for _ in 0..3 {
        peers.push(format!("http://127.0.0.1:{}", free_port()?));
        clients.push(format!("http://127.0.0.1:{}", free_port()?));
    }
    let cluster =
        peers.iter().enumerate().map(|(i, p)| format!("e{i}={p}")).collect::<Vec<_>>().join(",");
    let mut etcd = Etcd { children: Vec::new(), clients: clients.clone() };
    for i in 0..3 {
        let log = std::fs::File::create(dir.join(format!("etcd-{i}.log")))?;
        let mut cmd = Command::new(bin);
        super::pin::dies_with_us(&mut cmd);
        let child = cmd
            .args(["--name", &format!("e{i}")])
            .arg("--data-dir")
            .arg(dir.join(format!("etcd-{i}")))
            .args(["--listen-client-urls", &clients[i], "--advertise-client-urls", &clients[i]])
            .args(["--listen-peer-urls", &peers[i], "--initial-advertise-peer-urls", &peers[i]])
            .args(["--initial-cluster", &cluster, "--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "wayside-bench", "--log-level", "warn"])
            .args(["--quota-backend-bytes", &(8u64 << 30).to_string()])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} (Debian package etcd-server)", bin.display()))?;
        etcd.children.push(child);
    }
    Ok(etcd)
}

async fn channel(uri: &str) -> anyhow::Result<Channel> {
    let e = tonic::transport::Endpoint::from_shared(uri.to_owned())?
        .connect_timeout(Duration::from_secs(1))
        // The same HTTP/2 windows the PSS client uses, so neither side is throttled.
        .initial_connection_window_size(wayside_pss::server::HTTP2_CONNECTION_WINDOW_BYTES)
        .initial_stream_window_size(wayside_pss::server::HTTP2_STREAM_WINDOW_BYTES);
    // As the PSS client connects: a call's HEADERS and DATA in one write (no change in the
    // figures here, interleaved: 29.8-30.3k ops/s at 256 clients either way; Raft and fsync
    // bound).
    Ok(wayside_proto::client::connect_lazy(&e))
}

/// Waits for the etcd cluster to elect a leader; returns the leader's client URL.
async fn etcd_leader(etcd: &Etcd) -> anyhow::Result<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for url in &etcd.clients {
            let ch = channel(url).await?;
            let r = tokio::time::timeout(
                Duration::from_secs(1),
                unary::<_, StatusResponse>(
                    ch,
                    "/etcdserverpb.Maintenance/Status",
                    StatusRequest {},
                ),
            )
            .await;
            if let Ok(Ok(s)) = r {
                if s.leader != 0 && s.header.is_some_and(|h| h.member_id == s.leader) {
                    return Ok(url.clone());
                }
            }
        }
        if Instant::now() >= deadline {
            bail!("etcd elected no leader within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn bench_etcd(
    pids: Vec<u32>,
    leader: &str,
    clients: usize,
    secs: u64,
    value: usize,
) -> anyhow::Result<Figures> {
    let mut chans = Vec::new();
    for _ in 0..clients.div_ceil(CLIENTS_PER_CONNECTION) {
        chans.push(channel(leader).await?);
    }
    let chans = Arc::new(chans);
    let value = Arc::new(vec![0xABu8; value]);
    Ok(drive(clients, secs, pids, move |c, seq| {
        let ch = chans[c / CLIENTS_PER_CONNECTION].clone();
        let req =
            PutRequest { key: format!("k/{c}/{}", seq % 1024).into_bytes(), value: value.to_vec() };
        async move { unary::<_, PutResponse>(ch, "/etcdserverpb.KV/Put", req).await.is_ok() }
    })
    .await)
}

async fn bench_pss(
    endpoints: &[Endpoint],
    round: usize,
    clients: usize,
    secs: u64,
    value: usize,
) -> anyhow::Result<Figures> {
    let opts = ClientOptions::default();
    let pss: Arc<Vec<PssClient>> = Arc::new(
        (0..clients.div_ceil(CLIENTS_PER_CONNECTION))
            .map(|_| PssClient::new(endpoints.to_vec(), opts.clone()))
            .collect(),
    );
    let volume = format!("bench-{round}");
    let acq = pss[0]
        .acquire_volume(pb::AcquireVolumeRequest {
            volume: volume.clone(),
            owner_node: "bench".into(),
            owner_address: String::new(),
            owner_session: 0,
            expected_epoch: 0,
            create: Some(pb::CreateSpec {
                block_size: value.next_power_of_two().max(4096) as u32,
                credential_hash: vec![],
            }),
            request_id: Some(pb::RequestId { client_id: format!("bench-acq-{round}"), seq: 1 }),
        })
        .await?;
    let epoch = acq.meta.map(|m| m.epoch).unwrap_or_default();
    let data = Arc::new(vec![0xABu8; value]);
    Ok(drive(clients, secs, Vec::new(), move |c, seq| {
        let client = pss[c / CLIENTS_PER_CONNECTION].clone();
        let req = pb::WriteBatchRequest {
            volume: volume.clone(),
            epoch,
            request_id: Some(pb::RequestId { client_id: format!("b{round}-{c}"), seq }),
            ops: vec![pb::PssBlockOp {
                block: (c as u64) << 20 | (seq % 1024),
                data: data.to_vec(),
                delete: false,
                version: 0,
            }],
            persisted_lsn: 0,
        };
        async move { client.write_batch(req).await.is_ok() }
    })
    .await)
}

/// Runs the benchmark.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("wayside-bench-pss-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir)?;
    println!(
        "PSS vs etcd: durable {}-byte writes, 3 nodes each on this machine, {} s per point",
        args.value_bytes, args.seconds
    );
    println!("data under {}", dir.display());
    let buffered = args.buffered_io;
    let cluster = LocalCluster::start_with(3, &dir.join("pss"), |c| c.direct_io = !buffered)
        .await
        .context("starting the PSS")?;
    let etcd = if args.no_etcd {
        None
    } else {
        let etcd = start_etcd(&args.etcd, &dir)?;
        let url = etcd_leader(&etcd).await?;
        Some((etcd, url))
    };
    let endpoints = cluster.endpoints();

    let mut rows = Vec::new();
    let etcd_pids: Vec<u32> =
        etcd.as_ref().map(|(e, _)| e.children.iter().map(Child::id).collect()).unwrap_or_default();
    let settle_max = Duration::from_secs(args.settle_seconds);
    let mut volume = 0usize;
    for &clients in &args.clients {
        let (mut ps, mut es, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..args.rounds.max(1) {
            let waited = settle(&etcd_pids, settle_max).await;
            let p = bench_pss(&endpoints, volume, clients, args.seconds, args.value_bytes).await?;
            volume += 1;
            print!(
                "clients {clients:>4} round {round}: PSS {:>9.0} ops/s p50 {:>7.2} ms p99 {:>7.2} ms CPU {:>5.0} us/op faults {:>4.1}/op (settled {:.1} s)",
                p.ops_per_sec, p.p50_ms, p.p99_ms, p.cpu_us_per_op, p.faults_per_op, waited.as_secs_f64()
            );
            if p.errors > 0 {
                print!(" ({} errors)", p.errors);
            }
            ps.push(p);
            let Some((_, url)) = &etcd else {
                println!();
                continue;
            };
            let waited = settle(&etcd_pids, settle_max).await;
            let e =
                bench_etcd(etcd_pids.clone(), url, clients, args.seconds, args.value_bytes).await?;
            println!(
                " | etcd {:>9.0} ops/s p50 {:>7.2} ms p99 {:>7.2} ms (settled {:.1} s) | ratio {:.2}x",
                e.ops_per_sec,
                e.p50_ms,
                e.p99_ms,
                waited.as_secs_f64(),
                p.ops_per_sec / e.ops_per_sec
            );
            ratios.push(p.ops_per_sec / e.ops_per_sec);
            es.push(e);
        }
        if !es.is_empty() {
            // The verdict's ratio: the median round's pair (a PSS run and the etcd run made
            // right after it meet the same drift of this VM's speed), lower median for an
            // even count; the table beside gives each system's own median.
            ratios.sort_by(f64::total_cmp);
            let paired = ratios[(ratios.len() - 1) / 2];
            rows.push((clients, median(ps), median(es), paired));
        }
    }
    if etcd.is_none() {
        cluster.shutdown().await;
        if args.dir.is_none() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        return Ok(());
    }
    println!();
    println!(
        "median of {} interleaved rounds per client count (by ops/s), each system's own:",
        args.rounds.max(1)
    );
    println!("| clients | PSS ops/s | PSS p50 ms | PSS p99 ms | PSS CPU us/op | PSS faults/op | etcd ops/s | etcd p50 ms | etcd p99 ms | etcd CPU us/op | PSS/etcd ops | etcd/PSS CPU per op |");
    println!(
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for (c, p, e, _) in &rows {
        println!(
            "| {c} | {:.0} | {:.2} | {:.2} | {:.0} | {:.1} | {:.0} | {:.2} | {:.2} | {:.0} | {:.2}x | {:.2}x |",
            p.ops_per_sec,
            p.p50_ms,
            p.p99_ms,
            p.cpu_us_per_op,
            p.faults_per_op,
            e.ops_per_sec,
            e.p50_ms,
            e.p99_ms,
            e.cpu_us_per_op,
            p.ops_per_sec / e.ops_per_sec,
            e.cpu_us_per_op / p.cpu_us_per_op
        );
        if p.errors + e.errors > 0 {
            println!("  (errors during {c}-client run: PSS {}, etcd {})", p.errors, e.errors);
        }
    }
    for (c, _, _, paired) in &rows {
        println!("ratio at {c} clients, the median round's pair: {paired:.2}x");
    }
    if let Some((_, _, _, ratio)) = rows.iter().find(|(c, ..)| *c == 256) {
        println!(
            "target at 256 clients: PSS >= 3x etcd; measured {ratio:.2}x, the median round's pair ({})",
            if *ratio >= 3.0 { "met" } else { "NOT met" }
        );
    }
    drop(etcd);
    cluster.shutdown().await;
    if args.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}
