//! `testbed bench nms`: 4 KiB block writes and reads against one NMS (backed by a real
//! 3-node PSS in this process), 16 clients, side by side with redis-server (driven by
//! redis-benchmark, unpipelined and with 16-deep pipelining) and memcached (a small
//! text-protocol client here, unpipelined), all started by this run. Two drivers call the
//! NMS:
//! - **h2load** (nghttp2's C load generator, Debian `nghttp2-client`): one process with one
//!   HTTP/2 connection per client, one call in flight on each, like redis-benchmark drives
//!   redis. Unary phases send `Read`/`Write`; batched phases send one `StreamBatches` call
//!   per batch of `--depth` operations (like a redis pipeline of that depth). h2load sends
//!   the same pre-encoded request on every call, so all its clients use volume `bench-0`
//!   (unary: block 0; batched: blocks `0..depth`); it cannot read gRPC trailers, so every
//!   phase checks the NMS's own counters (`NodeStatus.reads`, the volume's accepted lsn)
//!   against the calls h2load saw succeed. h2load offers the largest frame wayside's client
//!   library offers (256 KiB; h2load's own default is 16 KiB), so a 64 KiB batch reply is one
//!   DATA frame, as the client library receives it.
//! - **tonic** (the Rust gRPC client, in this process, every client on one thread of its own
//!   with a single-threaded runtime): unary, streamed (`--depth` tagged operations in flight
//!   per `Stream`) and batched (one `StreamBatches` message of `--depth` operations at a
//!   time); each client has its own volume and `--blocks` blocks.
//!
//! Prints ops/s, p50, p99, CPU per operation and the ratios. Targets: DESIGN.md section 10.

use anyhow::{bail, Context as _};
use futures::StreamExt as _;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
use tokio_util::sync::CancellationToken;
use wayside_proto::pb;

/// Options.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Concurrent clients (connections).
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// Seconds each NMS/memcached phase runs.
    #[arg(long, default_value_t = 3)]
    pub seconds: u64,
    /// Operations in flight per stream in the streamed NMS runs (and redis pipeline depth).
    #[arg(long, default_value_t = 16)]
    pub depth: usize,
    /// Distinct 4 KiB blocks (keys) each client touches (redis-benchmark gets
    /// clients x blocks keys, the same working set).
    #[arg(long, default_value_t = 256)]
    pub blocks: u64,
    /// Requests per redis-benchmark test.
    #[arg(long, default_value_t = 200_000)]
    pub redis_requests: u64,
    /// The NMS's `writeback_delay_ms` for this run (default: the NMS's own default).
    #[arg(long)]
    pub writeback_delay_ms: Option<u64>,
    /// The NMS's `serve_threads` for this run (default: the NMS's own default, 0: its
    /// connections served by this process's runtime workers).
    #[arg(long)]
    pub serve_threads: Option<usize>,
    /// Run only these NMS phases (comma-separated; default: all), e.g. for profiling one.
    #[arg(long, value_delimiter = ',', value_enum)]
    pub phases: Vec<Phase>,
    /// Skip the redis and memcached runs.
    #[arg(long)]
    pub no_peers: bool,
    /// Which clients drive the NMS phases (comma-separated): h2load (C, another process),
    /// h2 (a lean Rust HTTP/2 client on its own thread) and tonic (Rust, in this process, on
    /// its own thread).
    #[arg(
        long,
        value_delimiter = ',',
        value_enum,
        default_value = "h2load,h2,tonic,tonic-channel"
    )]
    pub drivers: Vec<Driver>,
    /// The h2load binary (Debian package nghttp2-client).
    #[arg(long, default_value = "h2load")]
    pub h2load: std::path::PathBuf,
    /// Rounds: every NMS phase, then redis and memcached, this many times over; each
    /// run's figures are its median round's (by ops/s). The machine is a shared VM whose
    /// speed drifts (redis GET P=16 measured 383k-826k ops/s on different days), and
    /// interleaved rounds expose the NMS and its peers to the same drift.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Every hop over TLS: the NMS serves TLS (a CA and certificate made for the run),
    /// h2load, the h2 and the tonic drivers dial it over TLS, and redis serves TLS too
    /// (redis-server --tls-port, redis-benchmark --tls), so the ratios compare TLS with
    /// TLS. memcached is not run (this bench's memcached client speaks plaintext).
    #[arg(long)]
    pub tls: bool,
    /// (--tls) The run's TLS files: made by `run`.
    #[arg(skip)]
    pub tls_files: Option<wayside_proto::tls::TlsFiles>,
}

/// (--tls) What every client of this run dials the NMS with (the run's CA).
static CLIENT_TLS: std::sync::OnceLock<wayside_proto::tls::Tls> = std::sync::OnceLock::new();

/// Each run's median figure (by ops/s) across rounds, in the first round's order.
fn medians(rounds: Vec<Vec<Figure>>) -> Vec<Figure> {
    let Some(first) = rounds.first() else { return Vec::new() };
    first
        .iter()
        .map(|f| {
            let mut all: Vec<&Figure> =
                rounds.iter().flatten().filter(|g| g.name == f.name).collect();
            all.sort_by(|a, b| a.ops_per_s.total_cmp(&b.ops_per_s));
            all[all.len() / 2].clone()
        })
        .collect()
}

/// A client that drives NMS phases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Driver {
    /// nghttp2's h2load, another process: unary and batched (one call per batch).
    H2load,
    /// The lean h2-crate driver on its own thread (`bench::h2drive`): streamed and batched,
    /// one long call per client.
    H2,
    /// tonic's generated client over the client library's transport
    /// (`wayside_proto::h2client`), in this process on a thread of its own: every API.
    Tonic,
    /// The same over tonic's own `transport::Channel` (hyper and h2), for the ratio of the
    /// library's transport to it: unary only.
    TonicChannel,
}

/// One NMS phase of the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Phase {
    UnaryWrite,
    UnaryRead,
    StreamedWrite,
    StreamedRead,
    BatchedWrite,
    BatchedRead,
}

const VALUE: usize = 4096;

/// One measured run.
#[derive(Debug, Clone)]
struct Figure {
    name: String,
    ops_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// CPU time the server side spent per operation, in microseconds: for NMS runs this
    /// whole process (NMS and the 3-node PSS, and the in-process clients of the tonic
    /// drivers); for redis and memcached their server process. On a shared machine ops/s
    /// depends on what else runs; CPU per op much less so.
    cpu_us_per_op: Option<f64>,
    /// CPU time the client process spent per operation, in microseconds: h2load's and
    /// redis-benchmark's (`None` for clients in this process). Client and server share
    /// the machine's cores, so a costlier client leaves the server less.
    client_cpu_us_per_op: Option<f64>,
}

/// CPU time (user + system, all threads) this process has used so far.
fn cpu_time() -> Duration {
    super::rusage_cpu(libc::RUSAGE_SELF)
}

/// CPU time of this process's children that have ended and been waited for (h2load,
/// redis-benchmark) so far.
fn children_cpu() -> Duration {
    super::rusage_cpu(libc::RUSAGE_CHILDREN)
}

/// When a phase started: wall clock and this process's CPU time.
#[derive(Clone, Copy)]
struct Start {
    wall: Instant,
    cpu: Duration,
}

impl Start {
    fn now() -> Self {
        Self { wall: Instant::now(), cpu: cpu_time() }
    }
}

fn figure(name: &str, mut lat_us: Vec<u32>, elapsed: Duration) -> Figure {
    lat_us.sort_unstable();
    let pct = |p: f64| {
        if lat_us.is_empty() {
            return 0.0;
        }
        let i = ((lat_us.len() as f64 - 1.0) * p).round() as usize;
        f64::from(lat_us[i]) / 1000.0
    };
    Figure {
        name: name.into(),
        ops_per_s: lat_us.len() as f64 / elapsed.as_secs_f64(),
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        cpu_us_per_op: None,
        client_cpu_us_per_op: None,
    }
}

/// Lets the client tasks run `secs` more, stops them, and gathers their latencies
/// (microseconds) with the phase's elapsed time and the CPU time used from `start` until
/// every client stopped.
async fn measure(
    mut tasks: tokio::task::JoinSet<anyhow::Result<Vec<u32>>>,
    start: Start,
    secs: u64,
    stop: &CancellationToken,
) -> anyhow::Result<(Vec<u32>, Duration, Duration)> {
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.cancel();
    let elapsed = start.wall.elapsed();
    let mut all = Vec::new();
    while let Some(r) = tasks.join_next().await {
        all.extend(r??);
    }
    Ok((all, elapsed, cpu_time().saturating_sub(start.cpu)))
}

/// A figure of a phase run in this process, with its CPU time per operation.
fn figure_cpu(name: &str, lat_us: Vec<u32>, elapsed: Duration, cpu: Duration) -> Figure {
    let n = lat_us.len().max(1) as f64;
    let mut f = figure(name, lat_us, elapsed);
    f.cpu_us_per_op = Some(cpu.as_secs_f64() * 1e6 / n);
    f
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A channel as the client library makes them (`wayside_proto::client::connect_h2`: tonic's
/// generated client over wayside's own HTTP/2 client connection).
async fn channel(addr: &str) -> anyhow::Result<wayside_proto::h2client::Channel> {
    let ep = wayside_proto::types::Endpoint::parse(addr)?;
    Ok(wayside_proto::client::connect_h2(
        &ep,
        CLIENT_TLS.get(),
        Duration::from_secs(5),
        wayside_proto::h2client::ClientSettings::default(),
    )
    .await?)
}

/// tonic's own channel (`transport::Channel`: a buffer task, hyper's client, h2) over
/// corked TCP, as the client library made them before `h2client`.
async fn tonic_channel_to(addr: &str) -> anyhow::Result<tonic::transport::Channel> {
    let ep = wayside_proto::types::Endpoint::parse(addr)?;
    let e = wayside_proto::client::endpoint(&ep, CLIENT_TLS.get())?
        .max_frame_size(wayside_proto::server::HTTP2_MAX_FRAME_BYTES);
    Ok(wayside_proto::client::connect(&e).await?)
}

/// Either transport, for the unary phases' comparison of the two.
#[derive(Clone)]
enum AnyChannel {
    Lib(wayside_proto::h2client::Channel),
    Tonic(tonic::transport::Channel),
}

type AnyBody = http_body_util::Either<wayside_proto::h2client::ClientBody, tonic::body::Body>;
type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower::Service<http::Request<tonic::body::Body>> for AnyChannel {
    type Response = http::Response<AnyBody>;
    type Error = BoxError;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<http::Response<AnyBody>, BoxError>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), BoxError>> {
        match self {
            Self::Lib(c) => c.poll_ready(cx),
            Self::Tonic(c) => c.poll_ready(cx).map_err(Into::into),
        }
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        match self {
            Self::Lib(c) => {
                let f = c.call(req);
                Box::pin(async move { Ok(f.await?.map(http_body_util::Either::Left)) })
            }
            Self::Tonic(c) => {
                let f = c.call(req);
                Box::pin(async move { Ok(f.await?.map(http_body_util::Either::Right)) })
            }
        }
    }
}

fn auth(i: usize) -> Option<pb::VolumeAuth> {
    Some(pb::VolumeAuth {
        volume: format!("bench-{i}"),
        credential: "bench".into(),
        nms_session: 0,
    })
}

/// Runs a phase of the tonic driver on a thread of its own, with a single-threaded runtime
/// that its clients, their connections and tonic's tasks all share, as h2load's clients share
/// its one thread and redis-benchmark's its event loop. (On this process's multi-threaded
/// runtime, each reply hopped between its two workers: task switches were 7% of the
/// clients' CPU, which shares the 2 cores with the NMS, and the phases reached 0.7-0.8x of
/// what they reach so: 583-630k streamed reads/s against 808-830k.)
async fn tonic_phase(
    addr: &str,
    a: &Args,
    api: Api,
    write: bool,
    tonic_channel: bool,
) -> anyhow::Result<Figure> {
    let (addr, a) = (addr.to_owned(), a.clone());
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new().name("bench-tonic-driver".into()).spawn(move || {
        let phase = async {
            match api {
                Api::Unary => nms_unary(&addr, &a, write, tonic_channel).await,
                Api::Streamed => nms_streamed(&addr, &a, write).await,
                Api::Batched => nms_batched(&addr, &a, write).await,
            }
        };
        let r = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(phase));
        let _ = tx.send(r);
    })?;
    rx.await.context("the tonic driver's thread died")?
}

/// Runs `clients` unary loops for `secs`; `write` picks the op; `tonic_channel`: over
/// tonic's own channel rather than the client library's transport.
async fn nms_unary(
    addr: &str,
    a: &Args,
    write: bool,
    tonic_channel: bool,
) -> anyhow::Result<Figure> {
    let stop = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    let start = Start::now();
    for i in 0..a.clients {
        let ch = if tonic_channel {
            AnyChannel::Tonic(tonic_channel_to(addr).await?)
        } else {
            AnyChannel::Lib(channel(addr).await?)
        };
        let mut c = pb::nms_client::NmsClient::new(ch);
        let (stop, blocks) = (stop.clone(), a.blocks);
        tasks.spawn(async move {
            let mut lat = Vec::with_capacity(1 << 16);
            // Shared by every request: cloning it is a reference count, not a 4 KiB copy.
            let data = prost::bytes::Bytes::from(vec![i as u8; VALUE]);
            let mut n = 0u64;
            while !stop.is_cancelled() {
                n += 1;
                let block = n % blocks;
                let t = Instant::now();
                if write {
                    c.write(pb::WriteRequest {
                        auth: auth(i),
                        op: Some(pb::WriteOp {
                            block,
                            offset: 0,
                            data: data.clone(),
                            request_id: None,
                        }),
                    })
                    .await?;
                } else {
                    c.read(pb::ReadRequest {
                        auth: auth(i),
                        op: Some(pb::ReadOp { block, offset: 0, length: 0 }),
                    })
                    .await?;
                }
                lat.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
            }
            anyhow::Ok(lat)
        });
    }
    let (all, elapsed, cpu) = measure(tasks, start, a.seconds, &stop).await?;
    let driver = if tonic_channel { "tonic-channel" } else { "tonic" };
    let name = format!("nms unary {} ({driver})", if write { "write" } else { "read" });
    Ok(figure_cpu(&name, all, elapsed, cpu))
}

/// A whole-block write of `data` (shared, not copied) or read of `block`.
fn bench_op(block: u64, write: bool, data: &prost::bytes::Bytes) -> pb::stream_request::Op {
    if write {
        pb::stream_request::Op::Write(pb::WriteOp {
            block,
            offset: 0,
            data: data.clone(),
            request_id: None,
        })
    } else {
        pb::stream_request::Op::Read(pb::ReadOp { block, offset: 0, length: 0 })
    }
}

/// Streamed: each client keeps `depth` tagged operations in flight on one stream.
async fn nms_streamed(addr: &str, a: &Args, write: bool) -> anyhow::Result<Figure> {
    let stop = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    let start = Start::now();
    for i in 0..a.clients {
        let mut c = pb::nms_client::NmsClient::new(channel(addr).await?);
        let (stop, blocks, depth) = (stop.clone(), a.blocks, a.depth);
        tasks.spawn(async move {
            let (tx, rx) = tokio::sync::mpsc::channel::<pb::StreamRequest>(depth);
            let mut replies =
                c.stream(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
            // Shared by every request: cloning it is a reference count, not a 4 KiB copy.
            let data = prost::bytes::Bytes::from(vec![i as u8; VALUE]);
            let mut sent: std::collections::HashMap<u64, Instant> =
                std::collections::HashMap::new();
            let mut lat = Vec::with_capacity(1 << 16);
            let mut tag = 0u64;
            let req = |tag: u64, first: bool| pb::StreamRequest {
                auth: if first { auth(i) } else { None },
                tag,
                op: Some(bench_op(tag % blocks, write, &data)),
            };
            for _ in 0..depth {
                tag += 1;
                sent.insert(tag, Instant::now());
                tx.send(req(tag, tag == 1)).await?;
            }
            while let Some(r) = replies.next().await {
                let r = r?;
                if let Some(pb::stream_reply::Result::Error(e)) = &r.result {
                    bail!("stream op failed: {e:?}");
                }
                if let Some(t) = sent.remove(&r.tag) {
                    lat.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
                }
                if stop.is_cancelled() {
                    if sent.is_empty() {
                        break;
                    }
                    continue;
                }
                tag += 1;
                sent.insert(tag, Instant::now());
                tx.send(req(tag, false)).await?;
            }
            anyhow::Ok(lat)
        });
    }
    let (all, elapsed, cpu) = measure(tasks, start, a.seconds, &stop).await?;
    let name = if write { "nms streamed write (tonic)" } else { "nms streamed read (tonic)" };
    Ok(figure_cpu(name, all, elapsed, cpu))
}

/// Batched (like redis-benchmark's pipelining): each client sends `depth` operations in
/// one `StreamBatches` message, waits for all their results, then sends the next batch.
/// An operation's latency is its batch's round trip.
async fn nms_batched(addr: &str, a: &Args, write: bool) -> anyhow::Result<Figure> {
    let stop = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    let start = Start::now();
    for i in 0..a.clients {
        let mut c = pb::nms_client::NmsClient::new(channel(addr).await?);
        let (stop, blocks, depth) = (stop.clone(), a.blocks, a.depth);
        tasks.spawn(async move {
            let (tx, rx) = tokio::sync::mpsc::channel::<pb::StreamBatch>(1);
            let mut replies = c
                .stream_batches(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await?
                .into_inner();
            // Shared by every request: cloning it is a reference count, not a 4 KiB copy.
            let data = prost::bytes::Bytes::from(vec![i as u8; VALUE]);
            let mut lat = Vec::with_capacity(1 << 16);
            let mut tag = 0u64;
            let mut first = true;
            while !stop.is_cancelled() {
                let ops = (0..depth)
                    .map(|_| {
                        tag += 1;
                        pb::StreamRequest {
                            auth: None,
                            tag,
                            op: Some(bench_op(tag % blocks, write, &data)),
                        }
                    })
                    .collect();
                let t = Instant::now();
                let auth = if first { auth(i) } else { None };
                first = false;
                tx.send(pb::StreamBatch { auth, ops }).await?;
                let mut left = depth;
                while left > 0 {
                    let Some(r) = replies.next().await else { bail!("batch stream ended early") };
                    for r in r?.results {
                        if let Some(pb::stream_reply::Result::Error(e)) = &r.result {
                            bail!("batched op failed: {e:?}");
                        }
                        left -= 1;
                    }
                }
                let us = u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX);
                lat.extend(std::iter::repeat_n(us, depth));
            }
            anyhow::Ok(lat)
        });
    }
    let (all, elapsed, cpu) = measure(tasks, start, a.seconds, &stop).await?;
    let name = if write { "nms batched write (tonic)" } else { "nms batched read (tonic)" };
    Ok(figure_cpu(name, all, elapsed, cpu))
}

/// Streamed or batched through the lean h2 driver (`bench::h2drive`): each client one
/// call on its own volume, `depth` operations in flight, cycling over its `blocks`.
async fn nms_h2(addr: &str, a: &Args, api: Api, write: bool) -> anyhow::Result<Figure> {
    let batched = matches!(api, Api::Batched);
    let depth = a.depth.max(1);
    let clients = (0..a.clients)
        .map(|i| {
            let data = prost::bytes::Bytes::from(vec![i as u8; VALUE]);
            let op = |tag: u64| pb::StreamRequest {
                auth: None,
                tag,
                op: Some(bench_op(tag % a.blocks.max(1), write, &data)),
            };
            // Message `k` of the client's cycle; the call's first one carries the credentials.
            let msg = |k: usize, first: bool| {
                let auth = if first { auth(i) } else { None };
                prost::bytes::Bytes::from(if batched {
                    let ops = (0..depth).map(|j| op((k * depth + j) as u64)).collect();
                    grpc_frame(&pb::StreamBatch { auth, ops })
                } else {
                    grpc_frame(&pb::StreamRequest { auth, ..op(k as u64) })
                })
            };
            let n = if batched {
                (a.blocks as usize).div_ceil(depth).max(1)
            } else {
                a.blocks.max(1) as usize
            };
            crate::bench::h2drive::ClientPlan {
                first: msg(0, true),
                cycle: (1..=n).map(|k| msg(k % n, false)).collect(),
            }
        })
        .collect();
    let plan = crate::bench::h2drive::Plan {
        addr: addr.parse().context("the NMS's address")?,
        batched,
        ops_per_message: if batched { depth } else { 1 },
        window: if batched { 1 } else { depth },
        clients,
        duration: Duration::from_secs(a.seconds),
        tls: CLIENT_TLS.get().map(|t| t.client_config()).transpose()?,
    };
    let start = Start::now();
    let out = crate::bench::h2drive::run(plan).await?;
    let cpu = cpu_time().saturating_sub(start.cpu).saturating_sub(out.driver_cpu);
    let kind = if write { "write" } else { "read" };
    let name = format!("nms {} {kind} (h2)", if batched { "batched" } else { "streamed" });
    Ok(figure_cpu(&name, out.lat_us, out.elapsed, cpu))
}

/// A gRPC message framed for the wire (no compression): flag, big-endian length, bytes.
fn grpc_frame(msg: &impl prost::Message) -> Vec<u8> {
    let body = msg.encode_to_vec();
    let mut out = Vec::with_capacity(5 + body.len());
    out.push(0);
    out.extend_from_slice(&u32::try_from(body.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// What h2load's summary says.
#[derive(Debug, PartialEq)]
struct H2loadSummary {
    req_per_s: f64,
    succeeded: u64,
    failed: u64,
}

fn parse_h2load(out: &str) -> anyhow::Result<H2loadSummary> {
    // "finished in 4.00s, 39245.50 req/s, 155.14MB/s"
    // "requests: 156982 total, 156982 started, 156982 done, 156982 succeeded, 0 failed, 0 errored, 0 timeout"
    let rate = out
        .lines()
        .find_map(|l| l.strip_prefix("finished in "))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|r| r.strip_suffix(" req/s"))
        .and_then(|r| r.parse().ok())
        .with_context(|| format!("no request rate in h2load's output:\n{out}"))?;
    let reqs = out
        .lines()
        .find_map(|l| l.strip_prefix("requests: "))
        .with_context(|| format!("no request counts in h2load's output:\n{out}"))?;
    let count = |what: &str| -> u64 {
        reqs.split(", ")
            .find_map(|f| f.strip_suffix(what).map(str::trim))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    Ok(H2loadSummary {
        req_per_s: rate,
        succeeded: count(" succeeded"),
        failed: count(" failed") + count(" errored") + count(" timeout"),
    })
}

/// The NMS's answered reads and `bench-0`'s accepted lsn.
async fn served(addr: &str) -> anyhow::Result<(u64, u64)> {
    let mut admin = pb::nms_admin_client::NmsAdminClient::new(channel(addr).await?);
    let s = admin.node_status(pb::NodeStatusRequest {}).await?.into_inner();
    let accepted =
        s.volume_info.iter().find(|v| v.volume == "bench-0").map_or(0, |v| v.accepted_lsn);
    Ok((s.reads, accepted))
}

/// A phase driven by h2load: `clients` connections, one call in flight on each, for
/// `seconds` after a 1 s warm-up; every call the same pre-encoded request on `bench-0`.
/// CPU us/op is this process's (NMS and PSS, not h2load's) over every operation the NMS
/// answered, warm-up included (the NMS's counters cover the same window).
async fn nms_h2load(
    addr: &str,
    a: &Args,
    api: Api,
    write: bool,
    dir: &std::path::Path,
) -> anyhow::Result<Figure> {
    let data = prost::bytes::Bytes::from(vec![7u8; VALUE]);
    let (path, body, ops_per_call) = match api {
        Api::Unary if write => (
            "Write",
            grpc_frame(&pb::WriteRequest {
                auth: auth(0),
                op: Some(pb::WriteOp { block: 0, offset: 0, data, request_id: None }),
            }),
            1,
        ),
        Api::Unary => (
            "Read",
            grpc_frame(&pb::ReadRequest {
                auth: auth(0),
                op: Some(pb::ReadOp { block: 0, offset: 0, length: 0 }),
            }),
            1,
        ),
        Api::Batched => (
            "StreamBatches",
            grpc_frame(&pb::StreamBatch {
                auth: auth(0),
                ops: (0..a.depth as u64)
                    .map(|b| pb::StreamRequest {
                        auth: None,
                        tag: b + 1,
                        op: Some(bench_op(b, write, &data)),
                    })
                    .collect(),
            }),
            a.depth as u64,
        ),
        Api::Streamed => bail!("h2load cannot drive a bidirectional stream"),
    };
    let kind = if write { "write" } else { "read" };
    let name = match api {
        Api::Unary => format!("nms unary {kind} (h2load)"),
        _ => format!("nms batched {kind} (h2load)"),
    };
    let file = dir.join(format!("{path}-{kind}.bin"));
    std::fs::write(&file, &body)?;
    let log = dir.join(format!("{path}-{kind}.log"));
    let before = served(addr).await?;
    let start = Start::now();
    let children = children_cpu();
    let out = tokio::process::Command::new(&a.h2load)
        .args(["-c", &a.clients.to_string(), "-m", "1", "-t", "1"])
        .args(["-D", &a.seconds.to_string(), "--warm-up-time", "1"])
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        // The frame size wayside's own client library offers (h2load's default is 16 KiB).
        .args(["-f", &wayside_proto::server::HTTP2_MAX_FRAME_BYTES.to_string()])
        .arg("-d")
        .arg(&file)
        .arg("--log-file")
        .arg(&log)
        .arg(format!(
            "{}://{addr}/wayside.v1.Nms/{path}",
            if CLIENT_TLS.get().is_some() { "https" } else { "http" }
        ))
        .output()
        .await
        .with_context(|| {
            format!("running {} (apt-get install nghttp2-client)", a.h2load.display())
        })?;
    let cpu = cpu_time().saturating_sub(start.cpu);
    let client_cpu = children_cpu().saturating_sub(children);
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!("h2load failed ({}):\n{text}{}", out.status, String::from_utf8_lossy(&out.stderr));
    }
    let h = parse_h2load(&text)?;
    let after = served(addr).await?;
    let answered = if write { after.1 - before.1 } else { after.0 - before.0 };
    // h2load counts an HTTP 200 as success whatever the gRPC status: the NMS's counters
    // must show every operation of every call h2load saw succeed (and of the warm-up).
    if h.failed > 0 || answered < h.succeeded * ops_per_call {
        bail!(
            "{name}: h2load saw {} calls succeed and {} fail, but the NMS answered {answered} \
             operations (expected at least {}): calls failed at the gRPC level",
            h.succeeded,
            h.failed,
            h.succeeded * ops_per_call
        );
    }
    // Each line: start time (us since the epoch), HTTP status, microseconds to the end
    // of the response; each of a batch's operations waited for the whole call.
    let lat: Vec<u32> = std::fs::read_to_string(&log)?
        .lines()
        .filter_map(|l| l.split('\t').nth(2)?.trim().parse().ok())
        .collect();
    let mut f = figure(&name, lat, Duration::from_secs(1));
    f.ops_per_s = h.req_per_s * ops_per_call as f64;
    f.cpu_us_per_op = Some(cpu.as_secs_f64() * 1e6 / answered.max(1) as f64);
    f.client_cpu_us_per_op = Some(client_cpu.as_secs_f64() * 1e6 / answered.max(1) as f64);
    Ok(f)
}

/// Flushes every bench volume (waits until the PSS has every accepted write), so the
/// write-back a write phase left behind is not charged to the next phase. Returns the
/// wall and CPU time the drain took.
async fn drain(addr: &str, a: &Args) -> anyhow::Result<(Duration, Duration)> {
    let start = Start::now();
    let mut flushes = tokio::task::JoinSet::new();
    for i in 0..a.clients {
        let mut c = pb::nms_client::NmsClient::new(channel(addr).await?);
        flushes.spawn(async move { c.flush(pb::FlushRequest { auth: auth(i) }).await });
    }
    while let Some(r) = flushes.join_next().await {
        r??;
    }
    Ok((start.wall.elapsed(), cpu_time().saturating_sub(start.cpu)))
}

/// The NMS's write-back totals so far: (PSS calls, block changes in them).
async fn writeback_totals(addr: &str) -> anyhow::Result<(u64, u64)> {
    let mut admin = pb::nms_admin_client::NmsAdminClient::new(channel(addr).await?);
    let s = admin.node_status(pb::NodeStatusRequest {}).await?.into_inner();
    Ok((s.writeback_batches, s.writeback_blocks))
}

/// A child process killed when dropped.
struct Child(tokio::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.start_kill();
    }
}

async fn wait_port(port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on port {port} after 10 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn redis(a: &Args) -> anyhow::Result<Vec<Figure>> {
    let port = free_port()?;
    // With --tls: TLS only, on `port`, with the NMS's certificate; clients unauthenticated
    // (as the NMS's vehicles).
    let mut tls_args: Vec<std::ffi::OsString> = Vec::new();
    let mut client_tls: Vec<std::ffi::OsString> = Vec::new();
    if let Some(t) = &a.tls_files {
        let (Some(cert), Some(key), Some(ca)) = (&t.cert, &t.key, &t.ca) else {
            bail!("--tls: the run's TLS files are incomplete");
        };
        for (k, v) in [
            ("--port", std::ffi::OsString::from("0")),
            ("--tls-port", port.to_string().into()),
            ("--tls-cert-file", cert.into()),
            ("--tls-key-file", key.into()),
            ("--tls-ca-cert-file", ca.into()),
            ("--tls-auth-clients", "no".into()),
        ] {
            tls_args.push(k.into());
            tls_args.push(v);
        }
        client_tls = vec!["--tls".into(), "--cacert".into(), ca.into()];
    }
    let mut server = Child(
        tokio::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
                "--bind",
                "127.0.0.1",
            ])
            // (Later flags win: with --tls the plaintext port is 0, off.)
            .args(&tls_args)
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting redis-server (apt-get install redis-server)")?,
    );
    wait_port(port).await?;
    let mut out = Vec::new();
    // Two working sets, each matching NMS drivers': one key (h2load's calls all name the
    // same few blocks of volume bench-0, which stay in the CPU caches) and `spread` keys
    // (the h2 and tonic clients each touch `blocks` blocks of their own volume).
    let spread = a.blocks * a.clients as u64;
    let server_pid = server.0.id().context("redis-server exited at once")?;
    for (pipeline, keys) in [(1usize, 1), (1, spread), (a.depth, 1), (a.depth, spread)] {
        // One test per run (set first, so the gets hit), each with its CPU times.
        for test in ["set", "get"] {
            let mut cmd = tokio::process::Command::new("redis-benchmark");
            cmd.args(&client_tls);
            if keys > 1 {
                cmd.args(["-r", &keys.to_string()]);
            }
            let (server_before, client_before) =
                (super::quiet::cpu_secs_of(server_pid), children_cpu());
            let o = cmd
                .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-c", &a.clients.to_string()])
                .args([
                    "-n",
                    &a.redis_requests.to_string(),
                    "-d",
                    &VALUE.to_string(),
                    "-t",
                    test,
                    "--csv",
                ])
                .args(["-P", &pipeline.to_string()])
                .output()
                .await
                .context("running redis-benchmark (apt-get install redis-tools)")?;
            let server_cpu = super::quiet::cpu_secs_of(server_pid)
                .zip(server_before)
                .map(|(after, before)| after - before);
            let client_cpu = Some(children_cpu().saturating_sub(client_before).as_secs_f64());
            let per_op = |secs: Option<f64>| secs.map(|s| s * 1e6 / a.redis_requests.max(1) as f64);
            let text = String::from_utf8_lossy(&o.stdout);
            for line in text.lines().skip(1) {
                let f: Vec<String> =
                    line.split(',').map(|s| s.trim_matches('"').to_owned()).collect();
                if f.len() < 7 {
                    continue;
                }
                let name = redis_name(&f[0].to_lowercase(), pipeline, keys);
                out.push(Figure {
                    name,
                    ops_per_s: f[1].parse().unwrap_or(0.0),
                    p50_ms: f[4].parse().unwrap_or(0.0),
                    p99_ms: f[6].parse().unwrap_or(0.0),
                    cpu_us_per_op: per_op(server_cpu),
                    client_cpu_us_per_op: per_op(client_cpu),
                });
            }
        }
    }
    // Killed and waited for here: reaped later, its CPU time would count in the children's
    // usage the next h2load run is measured by.
    let _ = server.0.kill().await;
    Ok(out)
}

/// A redis figure's name: the command, the pipeline depth, the keys in use.
fn redis_name(cmd: &str, pipeline: usize, keys: u64) -> String {
    let s = if keys == 1 { "" } else { "s" };
    format!("redis {cmd} P={pipeline} ({keys} key{s})")
}

async fn memcached(a: &Args) -> anyhow::Result<Vec<Figure>> {
    let port = free_port()?;
    let mut server = Child(
        tokio::process::Command::new("memcached")
            .args([
                "-p",
                &port.to_string(),
                "-U",
                "0",
                "-l",
                "127.0.0.1",
                "-m",
                "1024",
                "-t",
                "2",
                "-u",
                "root",
            ])
            .kill_on_drop(true)
            .spawn()
            .context("starting memcached (apt-get install memcached)")?,
    );
    wait_port(port).await?;
    let server_pid = server.0.id().context("memcached exited at once")?;
    let mut out = Vec::new();
    for write in [true, false] {
        let stop = CancellationToken::new();
        let mut tasks = tokio::task::JoinSet::new();
        let start = Start::now();
        let server_before = super::quiet::cpu_secs_of(server_pid);
        for i in 0..a.clients {
            let s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
            s.set_nodelay(true)?;
            let (stop, blocks) = (stop.clone(), a.blocks);
            tasks.spawn(async move {
                let mut s = tokio::io::BufStream::new(s);
                let data = vec![b'x'; VALUE];
                let mut lat = Vec::with_capacity(1 << 16);
                let mut n = 0u64;
                let mut line = String::new();
                // Writes first populate every key, so the reads hit.
                let mut buf = vec![0u8; VALUE + 2];
                while !stop.is_cancelled() {
                    n += 1;
                    let key = format!("k{i}-{}", n % blocks);
                    let t = Instant::now();
                    if write {
                        s.write_all(format!("set {key} 0 0 {VALUE}\r\n").as_bytes()).await?;
                        s.write_all(&data).await?;
                        s.write_all(b"\r\n").await?;
                        s.flush().await?;
                        line.clear();
                        s.read_line(&mut line).await?;
                        if line != "STORED\r\n" {
                            bail!("memcached set: {line:?}");
                        }
                    } else {
                        s.write_all(format!("get {key}\r\n").as_bytes()).await?;
                        s.flush().await?;
                        line.clear();
                        s.read_line(&mut line).await?;
                        if line.starts_with("VALUE") {
                            s.read_exact(&mut buf).await?;
                            line.clear();
                            s.read_line(&mut line).await?;
                        }
                        if line != "END\r\n" {
                            bail!("memcached get: {line:?}");
                        }
                    }
                    lat.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
                }
                anyhow::Ok(lat)
            });
        }
        let (all, elapsed, _) = measure(tasks, start, a.seconds, &stop).await?;
        let server_cpu = super::quiet::cpu_secs_of(server_pid).zip(server_before);
        let n = all.len().max(1) as f64;
        let mut f = figure(if write { "memcached set" } else { "memcached get" }, all, elapsed);
        f.cpu_us_per_op = server_cpu.map(|(after, before)| (after - before) * 1e6 / n);
        out.push(f);
    }
    // Waited for here, as redis-server (see `redis`).
    let _ = server.0.kill().await;
    Ok(out)
}

/// How a phase's clients call the NMS.
#[derive(Debug, Clone, Copy)]
enum Api {
    /// One `Read`/`Write` call at a time.
    Unary,
    /// `depth` tagged operations in flight on one `Stream`.
    Streamed,
    /// `depth` operations per `StreamBatches` message, one batch at a time.
    Batched,
}

/// Runs the benchmark.
pub async fn run(args: Args) -> anyhow::Result<()> {
    if cfg!(debug_assertions) {
        println!("NOTE: a debug build; run `cargo run --release -p wayside-testbed -- bench nms` for real figures");
    }
    let mut args = args;
    let dir = tempfile::tempdir()?;
    // With --tls the PSS runs TLS too (a TLS NMS dials nothing in plaintext), and its
    // road's node certificate is the NMS's and redis's.
    let cluster = if args.tls {
        let cluster = wayside_pss::testing::LocalCluster::start_tls(3, dir.path()).await?;
        let files = cluster.tls().context("the PSS's TLS files")?.node_files.clone();
        let vehicle = wayside_proto::tls::TlsFiles { ca: files.ca.clone(), ..Default::default() };
        let tls = wayside_proto::tls::Tls::load(&vehicle)?.context("the run's CA")?;
        let _ = CLIENT_TLS.set(tls);
        args.tls_files = Some(files);
        cluster
    } else {
        wayside_pss::testing::LocalCluster::start(3, dir.path()).await?
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let mut cfg = wayside_nms::config::Config {
        listen: addr.clone(),
        node_id: "bench".into(),
        pss: cluster.endpoints().iter().map(|e| e.authority().to_owned()).collect(),
        // Every h2load client works on one volume (bench-0), which the default budget
        // (100k operations/s per volume) would hold back: a budget far above what the
        // machine does, so the limiter still runs (its cost is in the figures).
        max_volume_ops_per_s: 1_000_000_000,
        volume_ops_burst: 1_000_000,
        tls: args.tls_files.clone().unwrap_or_default(),
        ..Default::default()
    };
    if let Some(ms) = args.writeback_delay_ms {
        cfg.writeback_delay_ms = ms;
    }
    if let Some(n) = args.serve_threads {
        cfg.serve_threads = n;
    }
    let writeback_delay_ms = cfg.writeback_delay_ms;
    let stop = CancellationToken::new();
    let server = tokio::spawn(wayside_nms::server::run(cfg, listener, stop.clone()));
    // Create the volumes and fill every block once (so reads hit the cache).
    let fill = prost::bytes::Bytes::from(vec![1; VALUE]);
    for i in 0..args.clients {
        let mut c = pb::nms_client::NmsClient::new(channel(&addr).await?);
        c.create_volume(pb::CreateVolumeRequest { auth: auth(i), block_size: VALUE as u32 })
            .await?;
        for block in 0..args.blocks {
            c.write(pb::WriteRequest {
                auth: auth(i),
                op: Some(pb::WriteOp { block, offset: 0, data: fill.clone(), request_id: None }),
            })
            .await?;
        }
    }
    drain(&addr, &args).await?;
    let mut drains = Vec::new();
    let h2load_dir = tempfile::tempdir()?;
    // h2load missing: its phases are skipped (said below), the rest still runs.
    let h2load_missing = if args.drivers.contains(&Driver::H2load) {
        tokio::process::Command::new(&args.h2load)
            .arg("--version")
            .output()
            .await
            .err()
            .map(|e| format!("{}: {e} (apt-get install nghttp2-client)", args.h2load.display()))
    } else {
        None
    };
    let mut rounds = Vec::new();
    for round in 0..args.rounds.max(1) {
        let mut figs = Vec::new();
        drains.clear();
        for driver in [Driver::H2load, Driver::H2, Driver::Tonic, Driver::TonicChannel] {
            if !args.drivers.contains(&driver) {
                continue;
            }
            for (phase, api, write) in [
                (Phase::UnaryWrite, Api::Unary, true),
                (Phase::UnaryRead, Api::Unary, false),
                (Phase::StreamedWrite, Api::Streamed, true),
                (Phase::StreamedRead, Api::Streamed, false),
                (Phase::BatchedWrite, Api::Batched, true),
                (Phase::BatchedRead, Api::Batched, false),
            ] {
                if !args.phases.is_empty() && !args.phases.contains(&phase) {
                    continue;
                }
                if driver == Driver::H2load
                    && (matches!(api, Api::Streamed) || h2load_missing.is_some())
                {
                    continue;
                }
                if driver == Driver::H2 && matches!(api, Api::Unary) {
                    continue;
                }
                if driver == Driver::TonicChannel && !matches!(api, Api::Unary) {
                    continue;
                }
                tracing::info!(?driver, ?api, write, "bench nms: phase starts");
                let wb0 = writeback_totals(&addr).await?;
                let f = match (driver, api) {
                    (Driver::H2load, _) => {
                        nms_h2load(&addr, &args, api, write, h2load_dir.path()).await?
                    }
                    (Driver::H2, _) => nms_h2(&addr, &args, api, write).await?,
                    (Driver::Tonic, _) => tonic_phase(&addr, &args, api, write, false).await?,
                    (Driver::TonicChannel, _) => {
                        tonic_phase(&addr, &args, api, write, true).await?
                    }
                };
                if write {
                    let d = drain(&addr, &args).await?;
                    let wb1 = writeback_totals(&addr).await?;
                    let wb = (wb1.0 - wb0.0, wb1.1 - wb0.1);
                    drains.push((f.name.clone(), f.ops_per_s, d, wb));
                }
                figs.push(f);
            }
        }
        tracing::info!(round, "bench nms: NMS phases done");
        if !args.no_peers {
            match redis(&args).await {
                Ok(f) => figs.extend(f),
                Err(e) => println!("redis: not measured: {e:#}"),
            }
            if args.tls {
                println!("memcached: not measured with --tls");
            } else {
                match memcached(&args).await {
                    Ok(f) => figs.extend(f),
                    Err(e) => println!("memcached: not measured: {e:#}"),
                }
            }
        }
        println!("round {round}:");
        for f in &figs {
            println!("  {:<28} {:>9.0} ops/s", f.name, f.ops_per_s);
        }
        rounds.push(figs);
    }
    if let Some(e) = &h2load_missing {
        println!("h2load phases: not measured: {e}");
    }
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), server).await;
    cluster.shutdown().await;
    let figs = medians(rounds);
    println!(
        "\n4 KiB values, {} clients, {} s per NMS/memcached phase; each run's median of {} \
         interleaved rounds (write-back lines: the last round); the NMS writes back after \
         {writeback_delay_ms} ms (writeback_delay_ms) to a 3-node PSS in this process{}\n",
        args.clients,
        args.seconds,
        args.rounds.max(1),
        if args.tls {
            "; every NMS call and redis command over TLS (TLS 1.3, rustls at the NMS, OpenSSL \
             at redis and h2load)"
        } else {
            "; plaintext (--tls for TLS on both sides)"
        }
    );
    println!(
        "| run | ops/s | p50 ms | p99 ms | server CPU us/op | client CPU us/op |\n| --- | ---: | \
         ---: | ---: | ---: | ---: |"
    );
    let us = |c: Option<f64>| c.map_or_else(|| "-".into(), |c| format!("{c:.1}"));
    for f in &figs {
        println!(
            "| {} | {:.0} | {:.3} | {:.3} | {} | {} |",
            f.name,
            f.ops_per_s,
            f.p50_ms,
            f.p99_ms,
            us(f.cpu_us_per_op),
            us(f.client_cpu_us_per_op)
        );
    }
    println!(
        "\nServer CPU us/op: for NMS runs this process (NMS and 3-node PSS; the tonic clients \
         too, the h2 driver's thread not), for redis and memcached their server process, over \
         the run's operations; client CPU us/op: h2load's and redis-benchmark's process (the \
         other clients run in this process). h2load: every client on volume \
         bench-0 (unary: block 0; batched: blocks 0..{}); h2 and tonic: a volume per client, \
         {} blocks each; redis: 1 key (compared with h2load) and {} keys (with h2 and tonic).",
        args.depth,
        args.blocks,
        args.blocks * args.clients as u64
    );
    for (name, ops_per_s, (wall, cpu), (batches, blocks)) in &drains {
        let ops = (ops_per_s * args.seconds as f64).max(1.0);
        println!(
            "{name}: write-back drained {:.0} ms after the phase, using {:.2} s CPU ({:.1} us \
             per op); {batches} PSS write-backs of {:.1} blocks on average, {:.2} blocks \
             written back per write",
            wall.as_secs_f64() * 1e3,
            cpu.as_secs_f64(),
            cpu.as_secs_f64() * 1e6 / ops,
            *blocks as f64 / (*batches).max(1) as f64,
            *blocks as f64 / ops,
        );
    }
    let get = |n: &str| figs.iter().find(|f| f.name == n).map(|f| f.ops_per_s);
    let depth = args.depth;
    println!();
    for driver in ["h2load", "h2", "tonic", "tonic-channel"] {
        // Against redis with the same working set (see `redis`).
        let keys = if driver == "h2load" { 1 } else { args.blocks * args.clients as u64 };
        for (ours, peer, target) in [
            ("unary write", redis_name("set", 1, keys), 0.7),
            ("unary read", redis_name("get", 1, keys), 0.7),
            ("streamed write", redis_name("set", depth, keys), 1.0),
            ("streamed read", redis_name("get", depth, keys), 1.0),
            ("batched write", redis_name("set", depth, keys), 1.0),
            ("batched read", redis_name("get", depth, keys), 1.0),
            ("unary write", "memcached set".into(), 0.0),
            ("unary read", "memcached get".into(), 0.0),
        ] {
            let ours = format!("nms {ours} ({driver})");
            if let (Some(a), Some(b)) = (get(&ours), get(&peer)) {
                let verdict = if target == 0.0 {
                    String::new()
                } else if a / b >= target {
                    format!(" (target >= {target}: met)")
                } else {
                    format!(" (target >= {target}: NOT met)")
                };
                println!("ratio {ours} / {peer}: {:.2}{verdict}", a / b);
                // Where both sides' processes were measured: what each cost per operation.
                let fig = |n: &str| figs.iter().find(|f| f.name == n);
                if let (Some(o), Some(p)) = (fig(&ours), fig(&peer)) {
                    let pair = |x: Option<f64>, y: Option<f64>| match (x, y) {
                        (Some(x), Some(y)) => format!("{x:.1} / {y:.1} us = {:.2}", x / y),
                        _ => "-".into(),
                    };
                    if let (Some(oc), Some(pc)) = (o.client_cpu_us_per_op, p.client_cpu_us_per_op) {
                        // Both clients run one thread (h2load -t 1, redis-benchmark's
                        // default): neither can drive more than a core's worth of its calls.
                        println!(
                            "  CPU per op, ours / the peer's: server {}; client {} (one client \
                             thread drives at most {:.0}k / {:.0}k ops/s)",
                            pair(o.cpu_us_per_op, p.cpu_us_per_op),
                            pair(o.client_cpu_us_per_op, p.client_cpu_us_per_op),
                            1e3 / oc,
                            1e3 / pc
                        );
                    }
                }
            }
        }
    }
    // The client library's transport against tonic's own channel, same calls, same run.
    for op in ["write", "read"] {
        let (lib, tonic) =
            (format!("nms unary {op} (tonic)"), format!("nms unary {op} (tonic-channel)"));
        if let (Some(a), Some(b)) = (get(&lib), get(&tonic)) {
            println!(
                "ratio {lib} / {tonic}: {:.2} (the client library's transport / tonic's)",
                a / b
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn h2load_summary_is_read_from_its_output() {
        // As h2load 1.52 (Debian's nghttp2-client) prints it.
        let out = "starting benchmark...\nspawning thread #0: 16 total client(s). 1 total requests\n\
                   Application protocol: h2c\n\nfinished in 5.00s, 39245.50 req/s, 155.14MB/s\n\
                   requests: 156982 total, 156982 started, 156982 done, 156900 succeeded, 80 failed, 2 errored, 0 timeout\n\
                   status codes: 156982 2xx, 0 3xx, 0 4xx, 0 5xx\n";
        let s = parse_h2load(out).unwrap();
        assert_eq!(s, H2loadSummary { req_per_s: 39245.5, succeeded: 156900, failed: 82 });
        let e = parse_h2load("h2load: connection refused\n").unwrap_err();
        assert!(format!("{e:#}").contains("no request rate"), "{e:#}");
    }

    #[test]
    fn a_grpc_frame_is_flag_length_and_message() {
        let m = pb::ReadRequest { auth: auth(0), op: None };
        let f = grpc_frame(&m);
        assert_eq!(f[0], 0, "not compressed");
        assert_eq!(u32::from_be_bytes(f[1..5].try_into().unwrap()) as usize, f.len() - 5);
        assert_eq!(<pb::ReadRequest as prost::Message>::decode(&f[5..]).unwrap(), m);
    }
}
