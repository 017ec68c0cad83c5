//! `testbed bench nms`: 4 KiB block writes and reads against one NMS (backed by a real
//! 3-node PSS in this process), 16 clients, side by side with redis-server (driven by
//! redis-benchmark, unpipelined and with 16-deep pipelining) and memcached (a small
//! text-protocol client here, unpipelined), all started by this run. Four drivers call the
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
//!   DATA frame, as the client library receives it. (It sends its own DATA in 16 KiB
//!   frames, each read from the request file and written apart: 5 `pread`s and 5 `writev`s
//!   per batch of 16 blocks, where redis-benchmark writes a pipeline of 16 in one call.)
//! - **h2** (`bench::h2drive`, a lean Rust HTTP/2 client on a thread of its own): streamed
//!   and batched, one long call per client.
//! - **tonic** (the Rust gRPC client over the client library's transport, every client on
//!   one thread of its own with a single-threaded runtime): unary, streamed (`--depth`
//!   tagged operations in flight per `Stream`) and batched (one `StreamBatches` message of
//!   `--depth` operations at a time); each client has its own volume and `--blocks` blocks.
//! - **tonic-channel**: the same unary calls over tonic's own channel.
//!
//! Each NMS phase is followed at once by the peer runs it is compared with (redis with the
//! driver's working set; memcached for unary calls), so a pair meets the machine in the
//! same state; `--rounds` repeats the whole. A run whose one-thread client used nearly a
//! whole CPU is marked client-bound: its ratio is the client's, not the server's. `--pin`
//! puts the server side and the client side on CPUs of their own.
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
    /// Distinct 4 KiB blocks (keys) each client of the h2, tonic and memcached drivers
    /// touches (redis, compared with them, gets clients x blocks keys, the same working
    /// set; h2load's calls name fixed blocks, see the module docs).
    #[arg(long, default_value_t = 256)]
    pub blocks: u64,
    /// Requests per redis-benchmark run (default: as many as the NMS phase it is paired
    /// with did operations, at least 50000: the two run about as long when their rates
    /// are near, the case a ratio decides).
    #[arg(long)]
    pub redis_requests: Option<u64>,
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
    /// Rounds: every NMS phase, each followed at once by the redis (and, for unary calls,
    /// memcached) runs it is compared with, this many times over. Each ratio is the median
    /// round's; each figure in the table the median of its runs. The machine is a shared
    /// VM whose speed drifts within minutes (the same phase 283k and 519k ops/s in two
    /// rounds of one run): a pair run back to back meets the same drift.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Every hop over TLS: the NMS serves TLS (a CA and certificate made for the run),
    /// h2load, the h2 and the tonic drivers dial it over TLS, and redis serves TLS too
    /// (redis-server --tls-port, redis-benchmark --tls), so the ratios compare TLS with
    /// TLS. memcached is not run (this bench's memcached client speaks plaintext).
    #[arg(long)]
    pub tls: bool,
    /// Server side on one CPU, client side on another, for every run alike: this process
    /// (the NMS, the PSS), redis-server and memcached on the first CPU this process may
    /// use; h2load, redis-benchmark and the in-process drivers' threads (h2, tonic, the
    /// memcached client) on the second. Unpinned, where the scheduler places a server and
    /// its load generator moves one run by up to 2x on 2 CPUs (redis GET P=16: 335-342k
    /// ops/s on one CPU, 512-634k on two). Needs two CPUs.
    #[arg(long)]
    pub pin: bool,
    /// (--tls) The run's TLS files: made by `run`.
    #[arg(skip)]
    pub tls_files: Option<wayside_proto::tls::TlsFiles>,
}

/// (--pin) Where this run's server side and client side go.
static PIN: std::sync::OnceLock<super::pin::Placement> = std::sync::OnceLock::new();

/// (--pin) The CPU of the server side, if pinned.
fn server_cpu() -> Option<usize> {
    PIN.get().map(|p| p.server)
}

/// (--pin) The CPU of the client side, if pinned.
fn client_cpu() -> Option<usize> {
    PIN.get().map(|p| p.client)
}

/// (--tls) What every client of this run dials the NMS with (the run's CA).
static CLIENT_TLS: std::sync::OnceLock<wayside_proto::tls::Tls> = std::sync::OnceLock::new();

/// (--tls) What the run's admin calls (the NMS's counters) dial with: the CA and the run's
/// node certificate, which an NMS on TLS requires of admin callers.
static ADMIN_TLS: std::sync::OnceLock<wayside_proto::tls::Tls> = std::sync::OnceLock::new();

/// Each run's median figure (by ops/s; the lower one of an even count) across rounds, the
/// NMS's runs first, each group in the order first met.
fn medians(rounds: Vec<Vec<Figure>>) -> Vec<Figure> {
    let mut names: Vec<&str> = Vec::new();
    for f in rounds.iter().flatten() {
        if !names.contains(&f.name.as_str()) {
            names.push(&f.name);
        }
    }
    // The NMS's runs first, then the peers'.
    names.sort_by_key(|n| !n.starts_with("nms "));
    names
        .into_iter()
        .map(|name| {
            let mut all: Vec<&Figure> =
                rounds.iter().flatten().filter(|g| g.name == name).collect();
            all.sort_by(|a, b| a.ops_per_s.total_cmp(&b.ops_per_s));
            all[(all.len() - 1) / 2].clone()
        })
        .collect()
}

/// The targets (DESIGN.md section 10), as ratios to redis: unary calls against redis
/// unpipelined, streamed and batched calls against redis pipelined `--depth` deep.
const UNARY_TARGET: f64 = 0.7;
const PIPELINED_TARGET: f64 = 1.0;

/// Fewest requests a redis-benchmark run makes (see `Args::redis_requests`).
const MIN_REDIS_REQUESTS: u64 = 50_000;

/// One NMS phase and a peer run made right after it, in one round.
#[derive(Debug, Clone)]
struct PairSample {
    ours: Figure,
    peer: Figure,
    /// The ratio ours/peer must reach (0: none, for information).
    target: f64,
}

impl PairSample {
    fn ratio(&self) -> f64 {
        self.ours.ops_per_s / self.peer.ops_per_s
    }
}

/// A comparison over every round: its pairs, ordered by ratio.
struct Comparison<'a> {
    samples: Vec<&'a PairSample>,
}

impl<'a> Comparison<'a> {
    /// The pairs of `all` grouped by (ours, peer), in the order first met.
    fn group(all: &'a [PairSample]) -> Vec<Self> {
        let mut out: Vec<Comparison<'a>> = Vec::new();
        for p in all {
            match out.iter_mut().find(|c| {
                c.samples[0].ours.name == p.ours.name && c.samples[0].peer.name == p.peer.name
            }) {
                Some(c) => c.samples.push(p),
                None => out.push(Comparison { samples: vec![p] }),
            }
        }
        for c in &mut out {
            c.samples.sort_by(|a, b| a.ratio().total_cmp(&b.ratio()));
        }
        out
    }

    /// The pair with the median ratio (the lower one of an even count: a verdict never
    /// leans on the better half).
    fn median(&self) -> &'a PairSample {
        self.samples[(self.samples.len() - 1) / 2]
    }
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
    /// Operations the run measured (the per-op CPU figures' divisor).
    ops: u64,
    ops_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// CPU time the server side spent per operation, in microseconds: for NMS runs this
    /// whole process (NMS and the 3-node PSS) but the driver's thread; for redis and
    /// memcached their server process. On a shared machine ops/s depends on what else runs;
    /// CPU per op much less so.
    cpu_us_per_op: Option<f64>,
    /// CPU time the client spent per operation, in microseconds: h2load's and
    /// redis-benchmark's process, the in-process drivers' thread (h2, tonic, memcached).
    /// Client and server share the machine's cores, so a costlier client leaves the server
    /// less.
    client_cpu_us_per_op: Option<f64>,
}

/// A run whose client used this much of one CPU or more (its figure `ops_per_s` x
/// `client_cpu_us_per_op`) was held back by its client: every client here runs one
/// thread, so it can drive no more than one CPU's worth of calls.
const CLIENT_BOUND_CPU: f64 = 0.9;

impl Figure {
    /// How much of one CPU the client used during the run, where measured.
    fn client_cpu_use(&self) -> Option<f64> {
        self.client_cpu_us_per_op.map(|us| us * self.ops_per_s / 1e6)
    }

    /// Whether the run's client was the bottleneck (see `CLIENT_BOUND_CPU`).
    fn client_bound(&self) -> bool {
        self.client_cpu_use().is_some_and(|u| u >= CLIENT_BOUND_CPU)
    }
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
        ops: lat_us.len() as u64,
        ops_per_s: lat_us.len() as f64 / elapsed.as_secs_f64(),
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        cpu_us_per_op: None,
        client_cpu_us_per_op: None,
    }
}

/// Lets the client tasks run `secs` more, stops them, and gathers their latencies
/// (microseconds) with the time since `started`. (The CPU time is measured by the caller
/// around the driver's thread: see `tonic_phase`.)
async fn measure(
    mut tasks: tokio::task::JoinSet<anyhow::Result<Vec<u32>>>,
    started: Instant,
    secs: u64,
    stop: &CancellationToken,
) -> anyhow::Result<(Vec<u32>, Duration)> {
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.cancel();
    let elapsed = started.elapsed();
    let mut all = Vec::new();
    while let Some(r) = tasks.join_next().await {
        all.extend(r??);
    }
    Ok((all, elapsed))
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A channel as the client library makes them (`wayside_proto::client::connect_h2`: tonic's
/// generated client over wayside's own HTTP/2 client connection).
async fn channel(addr: &str) -> anyhow::Result<wayside_proto::h2client::Channel> {
    channel_with(addr, CLIENT_TLS.get()).await
}

async fn channel_with(
    addr: &str,
    tls: Option<&wayside_proto::tls::Tls>,
) -> anyhow::Result<wayside_proto::h2client::Channel> {
    let ep = wayside_proto::types::Endpoint::parse(addr)?;
    Ok(wayside_proto::client::connect_h2(
        &ep,
        tls,
        Duration::from_secs(5),
        Duration::from_secs(5),
        wayside_proto::h2client::ClientSettings::default(),
    )
    .await?)
}

/// An admin client of the NMS at `addr` (over TLS with the run's node certificate).
async fn admin(
    addr: &str,
) -> anyhow::Result<pb::nms_admin_client::NmsAdminClient<wayside_proto::h2client::Channel>> {
    Ok(pb::nms_admin_client::NmsAdminClient::new(channel_with(addr, ADMIN_TLS.get()).await?))
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
        ..Default::default()
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
    let start = Start::now();
    let (mut f, driver_cpu) =
        super::on_thread("bench-tonic-driver", client_cpu(), move || async move {
            match api {
                Api::Unary => nms_unary(&addr, &a, write, tonic_channel).await,
                Api::Streamed => nms_streamed(&addr, &a, write).await,
                Api::Batched => nms_batched(&addr, &a, write).await,
            }
        })
        .await?;
    // The server side: this process's CPU time over the whole phase (its connections
    // accepted, set up and served) but the driver thread's.
    let server = cpu_time().saturating_sub(start.cpu).saturating_sub(driver_cpu);
    let n = f.ops.max(1) as f64;
    f.cpu_us_per_op = Some(server.as_secs_f64() * 1e6 / n);
    f.client_cpu_us_per_op = Some(driver_cpu.as_secs_f64() * 1e6 / n);
    Ok(f)
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
    let started = Instant::now();
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
    let (all, elapsed) = measure(tasks, started, a.seconds, &stop).await?;
    let driver = if tonic_channel { "tonic-channel" } else { "tonic" };
    let name = format!("nms unary {} ({driver})", if write { "write" } else { "read" });
    Ok(figure(&name, all, elapsed))
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
    let started = Instant::now();
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
    let (all, elapsed) = measure(tasks, started, a.seconds, &stop).await?;
    let name = if write { "nms streamed write (tonic)" } else { "nms streamed read (tonic)" };
    Ok(figure(name, all, elapsed))
}

/// Batched (like redis-benchmark's pipelining): each client sends `depth` operations in
/// one `StreamBatches` message, waits for all their results, then sends the next batch.
/// An operation's latency is its batch's round trip.
async fn nms_batched(addr: &str, a: &Args, write: bool) -> anyhow::Result<Figure> {
    let stop = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    let started = Instant::now();
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
    let (all, elapsed) = measure(tasks, started, a.seconds, &stop).await?;
    let name = if write { "nms batched write (tonic)" } else { "nms batched read (tonic)" };
    Ok(figure(name, all, elapsed))
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
        cpu: client_cpu(),
    };
    let start = Start::now();
    let out = crate::bench::h2drive::run(plan).await?;
    let cpu = cpu_time().saturating_sub(start.cpu).saturating_sub(out.driver_cpu);
    let kind = if write { "write" } else { "read" };
    let name = format!("nms {} {kind} (h2)", if batched { "batched" } else { "streamed" });
    let mut f = figure(&name, out.lat_us, out.elapsed);
    f.cpu_us_per_op = Some(cpu.as_secs_f64() * 1e6 / f.ops.max(1) as f64);
    f.client_cpu_us_per_op = Some(out.driver_cpu.as_secs_f64() * 1e6 / f.ops.max(1) as f64);
    Ok(f)
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
async fn served(addr: &str) -> anyhow::Result<(u64, u64, u64)> {
    let mut admin = admin(addr).await?;
    let s = admin.node_status(pb::NodeStatusRequest {}).await?.into_inner();
    let accepted =
        s.volume_info.iter().find(|v| v.volume == "bench-0").map_or(0, |v| v.accepted_lsn);
    Ok((s.reads, accepted, s.calls_failed))
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
    let mut cmd = tokio::process::Command::new(&a.h2load);
    super::pin::pin_command(&mut cmd, client_cpu());
    let out = cmd
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
    // h2load counts an HTTP 200 as success whatever the gRPC status: the NMS counts the
    // block calls it answered with an error (warm-up included, which h2load's counts are
    // not), and its counters must show every operation of every call h2load saw succeed.
    let failed = after.2 - before.2;
    if h.failed > 0 || failed > 0 || answered < h.succeeded * ops_per_call {
        bail!(
            "{name}: h2load saw {} calls succeed and {} fail, the NMS answered {failed} calls \
             with an error status and {answered} operations (expected at least {}): calls \
             failed at the gRPC level",
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
    f.ops = answered;
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

/// Waits (at most a minute) until the NMS's block pool has faulted in its buffers
/// (`NodeStatus.block_pool_filling` clear). The filling thread runs at idle priority on
/// CPU time nothing else wants, so a phase that starts before it ends shares its CPU with
/// it (with --pin, the NMS's CPU: 8 s to fault in 128 MiB under the first phases, against
/// about 2 s on an idle CPU).
async fn pool_filled(addr: &str) -> anyhow::Result<()> {
    let mut admin = admin(addr).await?;
    let started = Instant::now();
    loop {
        let s = admin.node_status(pb::NodeStatusRequest {}).await?.into_inner();
        if !s.block_pool_filling {
            return Ok(());
        }
        if started.elapsed() > Duration::from_secs(60) {
            println!(
                "the NMS's block pool is still filling after 60 s ({} bytes free): measuring \
                 anyway",
                s.block_pool_free_bytes
            );
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The NMS's write-back totals so far: (PSS calls, block changes in them).
async fn writeback_totals(addr: &str) -> anyhow::Result<(u64, u64)> {
    let mut admin = admin(addr).await?;
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

/// A redis-server started for the run (killed when dropped), and how to reach it.
struct Redis {
    server: Child,
    port: u16,
    pid: u32,
    /// (--tls) redis-benchmark's TLS flags.
    client_tls: Vec<std::ffi::OsString>,
}

impl Redis {
    async fn start(a: &Args) -> anyhow::Result<Self> {
        let port = free_port()?;
        // With --tls: TLS only, on `port`, with the NMS's certificate; clients
        // unauthenticated (as the NMS's vehicles).
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
        let mut cmd = tokio::process::Command::new("redis-server");
        super::pin::pin_command(&mut cmd, server_cpu());
        super::pin::dies_with_us(&mut cmd);
        let server = Child(
            cmd.args([
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
        let pid = server.0.id().context("redis-server exited at once")?;
        Ok(Self { server, port, pid, client_tls })
    }

    /// One redis-benchmark run: `requests` of `test` ("set" or "get") over `keys` keys,
    /// `pipeline` deep, with the server's and the client's CPU time per request.
    async fn run(
        &self,
        a: &Args,
        test: &str,
        pipeline: usize,
        keys: u64,
        requests: u64,
    ) -> anyhow::Result<Figure> {
        let mut cmd = tokio::process::Command::new("redis-benchmark");
        super::pin::pin_command(&mut cmd, client_cpu());
        cmd.args(&self.client_tls);
        if keys > 1 {
            cmd.args(["-r", &keys.to_string()]);
        }
        let (server_before, client_before) = (super::quiet::cpu_secs_of(self.pid), children_cpu());
        let o = cmd
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-c", &a.clients.to_string(), "-n", &requests.to_string()])
            .args(["-d", &VALUE.to_string(), "-t", test, "--csv"])
            .args(["-P", &pipeline.to_string()])
            .output()
            .await
            .context("running redis-benchmark (apt-get install redis-tools)")?;
        let server_cpu = super::quiet::cpu_secs_of(self.pid)
            .zip(server_before)
            .map(|(after, before)| after - before);
        let client_cpu = Some(children_cpu().saturating_sub(client_before).as_secs_f64());
        let per_op = |secs: Option<f64>| secs.map(|s| s * 1e6 / requests.max(1) as f64);
        let text = String::from_utf8_lossy(&o.stdout);
        // The CSV's second line: "test","rps","avg","min","p50","p95","p99","max".
        let f: Vec<String> = text
            .lines()
            .nth(1)
            .with_context(|| format!("no figures in redis-benchmark's output:\n{text}"))?
            .split(',')
            .map(|s| s.trim_matches('"').to_owned())
            .collect();
        if f.len() < 7 {
            bail!("redis-benchmark's figures are not as expected:\n{text}");
        }
        Ok(Figure {
            name: redis_name(test, pipeline, keys),
            ops: requests,
            ops_per_s: f[1].parse().context("redis-benchmark's rps")?,
            p50_ms: f[4].parse().unwrap_or(0.0),
            p99_ms: f[6].parse().unwrap_or(0.0),
            cpu_us_per_op: per_op(server_cpu),
            client_cpu_us_per_op: per_op(client_cpu),
        })
    }

    /// Sets every key the runs' gets read, untimed: one, `--depth` and `spread` keys (50
    /// random sets per key leave none unset but with odds of about 1 in 10^18).
    async fn fill(&self, a: &Args, spread: u64) -> anyhow::Result<()> {
        for keys in [1, a.depth as u64, spread] {
            self.run(a, "set", a.depth, keys, 50 * keys.max(20)).await?;
        }
        Ok(())
    }

    /// Kills and waits for the server (reaped later, its CPU time would count in the
    /// children's usage the next h2load or redis-benchmark run is measured by).
    async fn stop(mut self) {
        let _ = self.server.0.kill().await;
    }
}

/// A redis figure's name: the command, the pipeline depth, the keys in use.
fn redis_name(cmd: &str, pipeline: usize, keys: u64) -> String {
    let s = if keys == 1 { "" } else { "s" };
    format!("redis {cmd} P={pipeline} ({keys} key{s})")
}

/// A memcached started for the run (killed when dropped).
struct Memcached {
    server: Child,
    port: u16,
    pid: u32,
}

impl Memcached {
    async fn start() -> anyhow::Result<Self> {
        let port = free_port()?;
        let mut cmd = tokio::process::Command::new("memcached");
        super::pin::pin_command(&mut cmd, server_cpu());
        super::pin::dies_with_us(&mut cmd);
        let server = Child(
            cmd.args(["-p", &port.to_string(), "-U", "0", "-l", "127.0.0.1"])
                .args(["-m", "1024", "-t", "2", "-u", "root"])
                .kill_on_drop(true)
                .spawn()
                .context("starting memcached (apt-get install memcached)")?,
        );
        wait_port(port).await?;
        let pid = server.0.id().context("memcached exited at once")?;
        Ok(Self { server, port, pid })
    }

    /// One phase of sets or gets (see `memcached_phase`), its client on a thread of its own.
    async fn run(&self, a: &Args, write: bool) -> anyhow::Result<Figure> {
        let server_before = super::quiet::cpu_secs_of(self.pid);
        let (a2, port) = (a.clone(), self.port);
        let ((all, elapsed), client) =
            super::on_thread("bench-memcached-client", client_cpu(), move || {
                memcached_phase(port, a2, write)
            })
            .await?;
        let server_cpu = super::quiet::cpu_secs_of(self.pid).zip(server_before);
        let n = all.len().max(1) as f64;
        let mut f = figure(if write { "memcached set" } else { "memcached get" }, all, elapsed);
        f.cpu_us_per_op = server_cpu.map(|(after, before)| (after - before) * 1e6 / n);
        f.client_cpu_us_per_op = Some(client.as_secs_f64() * 1e6 / n);
        Ok(f)
    }

    /// Sets every key the gets read (`k{client}-{block}`), untimed, so no get misses.
    async fn fill(&self, a: &Args) -> anyhow::Result<()> {
        let s = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await?;
        let mut s = tokio::io::BufStream::new(s);
        let data = vec![b'x'; VALUE];
        let mut line = String::new();
        for i in 0..a.clients {
            for b in 0..a.blocks {
                memcached_set(&mut s, &format!("k{i}-{b}"), &data, &mut line).await?;
            }
        }
        Ok(())
    }

    /// Kills and waits for the server (as `Redis::stop`).
    async fn stop(mut self) {
        let _ = self.server.0.kill().await;
    }
}

/// One memcached `set` of `data` under `key`, answered `STORED` (`line`: a buffer).
async fn memcached_set(
    s: &mut tokio::io::BufStream<tokio::net::TcpStream>,
    key: &str,
    data: &[u8],
    line: &mut String,
) -> anyhow::Result<()> {
    s.write_all(format!("set {key} 0 0 {}\r\n", data.len()).as_bytes()).await?;
    s.write_all(data).await?;
    s.write_all(b"\r\n").await?;
    s.flush().await?;
    line.clear();
    s.read_line(line).await?;
    if line != "STORED\r\n" {
        bail!("memcached set {key}: {line:?}");
    }
    Ok(())
}

/// `clients` memcached connections (a text-protocol client each, unpipelined) for
/// `seconds`: sets of `blocks` keys each, or gets of them. Returns every operation's
/// latency (microseconds) and the time the phase ran.
async fn memcached_phase(port: u16, a: Args, write: bool) -> anyhow::Result<(Vec<u32>, Duration)> {
    let stop = CancellationToken::new();
    let mut tasks = tokio::task::JoinSet::new();
    let started = Instant::now();
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
            let mut buf = vec![0u8; VALUE + 2];
            while !stop.is_cancelled() {
                n += 1;
                let key = format!("k{i}-{}", n % blocks);
                let t = Instant::now();
                if write {
                    memcached_set(&mut s, &key, &data, &mut line).await?;
                } else {
                    s.write_all(format!("get {key}\r\n").as_bytes()).await?;
                    s.flush().await?;
                    line.clear();
                    s.read_line(&mut line).await?;
                    // Every key was set (`Memcached::fill`): a miss is an error, not a
                    // cheap answer counted as a get.
                    if !line.starts_with("VALUE") {
                        bail!("memcached get {key}: {line:?}");
                    }
                    s.read_exact(&mut buf).await?;
                    line.clear();
                    s.read_line(&mut line).await?;
                    if line != "END\r\n" {
                        bail!("memcached get: {line:?}");
                    }
                }
                lat.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
            }
            anyhow::Ok(lat)
        });
    }
    let (all, elapsed) = measure(tasks, started, a.seconds, &stop).await?;
    Ok((all, elapsed))
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
    if args.pin {
        let p = super::pin::Placement::first_two()?;
        // Before the PSS and the NMS start: every thread they start inherits the pin.
        super::pin::pin_process(p.server)?;
        let _ = PIN.set(p);
        println!(
            "--pin: server side (this process: NMS and PSS; redis-server, memcached) on CPU {}, \
             client side (h2load, redis-benchmark, the driver threads) on CPU {}",
            p.server, p.client
        );
    }
    let dir = tempfile::tempdir()?;
    // With --tls the PSS runs TLS too (a TLS NMS dials nothing in plaintext), and its
    // road's node certificate is the NMS's and redis's.
    let cluster = if args.tls {
        let cluster = wayside_pss::testing::LocalCluster::start_tls(3, dir.path()).await?;
        let files = cluster.tls().context("the PSS's TLS files")?.node_files.clone();
        let vehicle = wayside_proto::tls::TlsFiles { ca: files.ca.clone(), ..Default::default() };
        let tls = wayside_proto::tls::Tls::load(&vehicle)?.context("the run's CA")?;
        let _ = CLIENT_TLS.set(tls);
        let _ =
            ADMIN_TLS.set(wayside_proto::tls::Tls::load(&files)?.context("the run's node files")?);
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
        c.create_volume(pb::CreateVolumeRequest {
            auth: auth(i),
            block_size: VALUE as u32,
            take_over: false,
        })
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
    pool_filled(&addr).await?;
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
    // The peers run for the whole bench, each NMS phase followed at once by the peer runs
    // it is compared with, so each pair meets the machine in the same state.
    let spread = args.blocks * args.clients as u64;
    let (mut redis, mut memcached) = (None, None);
    if !args.no_peers {
        // A peer that cannot start (or fill) is left out, said here; the NMS is measured
        // all the same.
        match Redis::start(&args).await {
            Ok(r) => match r.fill(&args, spread).await {
                Ok(()) => redis = Some(r),
                Err(e) => {
                    println!("redis: not measured: {e:#}");
                    r.stop().await;
                }
            },
            Err(e) => println!("redis: not measured: {e:#}"),
        }
        if args.tls {
            println!("memcached: not measured with --tls");
        } else {
            match Memcached::start().await {
                Ok(m) => match m.fill(&args).await {
                    Ok(()) => memcached = Some(m),
                    Err(e) => {
                        println!("memcached: not measured: {e:#}");
                        m.stop().await;
                    }
                },
                Err(e) => println!("memcached: not measured: {e:#}"),
            }
        }
    }
    let mut rounds = Vec::new();
    let mut pairs: Vec<PairSample> = Vec::new();
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
                // Its peers, at once. redis with the same working set as the driver (see
                // `Redis::run`), as many requests as the phase did operations (so the two
                // runs last about as long).
                let keys = match (driver, api) {
                    (Driver::H2load, Api::Unary) => 1,
                    (Driver::H2load, _) => args.depth as u64,
                    _ => spread,
                };
                let (cmd, pipeline, target) = match api {
                    Api::Unary => (if write { "set" } else { "get" }, 1, UNARY_TARGET),
                    _ => (if write { "set" } else { "get" }, args.depth, PIPELINED_TARGET),
                };
                // tonic's own channel is not how vehicles call (the client library has its
                // own transport): its runs are there for the ratio of the two transports.
                let target = if driver == Driver::TonicChannel { 0.0 } else { target };
                let mut peers = Vec::new();
                if let Some(r) = &redis {
                    let requests = args.redis_requests.unwrap_or(f.ops.max(MIN_REDIS_REQUESTS));
                    match r.run(&args, cmd, pipeline, keys, requests).await {
                        Ok(p) => peers.push((p, target)),
                        Err(e) => println!("redis: a run after {} failed: {e:#}", f.name),
                    }
                }
                if let (Some(m), Api::Unary) = (&memcached, api) {
                    match m.run(&args, write).await {
                        Ok(p) => peers.push((p, 0.0)),
                        Err(e) => println!("memcached: a run after {} failed: {e:#}", f.name),
                    }
                }
                figs.push(f.clone());
                for (p, target) in peers {
                    pairs.push(PairSample { ours: f.clone(), peer: p.clone(), target });
                    figs.push(p);
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
    if let Some(r) = redis {
        r.stop().await;
    }
    if let Some(m) = memcached {
        m.stop().await;
    }
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(30), server).await;
    cluster.shutdown().await;
    let figs = medians(rounds);
    println!(
        "\n4 KiB values, {} clients, {} s per NMS/memcached phase; each figure the median of \
         its runs over {} rounds (a peer's: of every run of it, each paired with an NMS phase; \
         write-back lines: the last round); the NMS writes back after \
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
        "\nServer CPU us/op: for NMS runs this process (NMS and 3-node PSS) but the driver's \
         thread, for redis and memcached their server process, over the run's operations; \
         client CPU us/op: h2load's and redis-benchmark's process, the h2, tonic and memcached \
         drivers' thread. A run whose client used {CLIENT_BOUND_CPU} of a CPU or more was \
         client-bound (every client runs one thread). h2load: every client on volume \
         bench-0 (unary: block 0; batched: blocks 0..{}); h2 and tonic: a volume per client, \
         {} blocks each; redis: as many keys as the driver's calls name blocks (h2load: 1 \
         unary, {} batched; h2 and tonic: {}); tonic-channel: no target (vehicles call through \
         the client library's transport, measured as tonic).",
        args.depth,
        args.blocks,
        args.depth,
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
    println!(
        "\nRatios: each NMS phase against the peer runs made right after it in the same round \
         (redis with the driver's working set); the median round's pair, and every round's."
    );
    for c in Comparison::group(&pairs) {
        let m = c.median();
        let (o, p, target) = (&m.ours, &m.peer, m.target);
        let r = m.ratio();
        let verdict = if target == 0.0 {
            String::new()
        } else if r >= target && p.client_bound() {
            // The peer's figure is its client's ceiling: redis might have gone faster.
            format!(
                " (target >= {target}: met, against a client-bound peer run: its client used \
                 {:.2} of a CPU)",
                p.client_cpu_use().unwrap_or(0.0)
            )
        } else if r >= target {
            format!(" (target >= {target}: met)")
        } else if o.client_bound() {
            // A driver that used its whole CPU set the pace: the ratio is the driver's,
            // and says nothing either way about the NMS.
            format!(
                " (target >= {target}: NOT met with this driver, which was client-bound: it \
                 used {:.2} of a CPU; the figure is the driver's ceiling, not the NMS's)",
                o.client_cpu_use().unwrap_or(0.0)
            )
        } else {
            format!(" (target >= {target}: NOT met)")
        };
        let each: Vec<String> = c.samples.iter().map(|s| format!("{:.2}", s.ratio())).collect();
        println!("ratio {} / {}: {r:.2}{verdict}; rounds: {}", o.name, p.name, each.join(", "));
        // What each side cost per operation, and how much of a CPU each client used (every
        // client runs one thread: at 1.0 it can go no faster).
        let pair = |x: Option<f64>, y: Option<f64>| match (x, y) {
            (Some(x), Some(y)) => format!("{x:.1} / {y:.1} us = {:.2}", x / y),
            _ => "-".into(),
        };
        if let (Some(ou), Some(pu)) = (o.client_cpu_use(), p.client_cpu_use()) {
            println!(
                "  {:.0} / {:.0} ops/s; CPU per op, ours / the peer's: server {}; client {}; the \
                 clients used {ou:.2} / {pu:.2} of a CPU{}",
                o.ops_per_s,
                p.ops_per_s,
                pair(o.cpu_us_per_op, p.cpu_us_per_op),
                pair(o.client_cpu_us_per_op, p.client_cpu_us_per_op),
                if p.client_bound() { " (the peer's run was client-bound)" } else { "" }
            );
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

    fn fig(name: &str, ops_per_s: f64, client_us: Option<f64>) -> Figure {
        Figure {
            name: name.into(),
            ops: 1000,
            ops_per_s,
            p50_ms: 0.0,
            p99_ms: 0.0,
            cpu_us_per_op: None,
            client_cpu_us_per_op: client_us,
        }
    }

    #[test]
    fn a_client_that_used_nearly_a_whole_cpu_is_client_bound() {
        // 300k ops/s at 3.0 us each: 0.9 of a CPU.
        let f = fig("nms batched write (h2load)", 300_000.0, Some(3.0));
        assert!((f.client_cpu_use().unwrap() - 0.9).abs() < 1e-9);
        assert!(f.client_bound());
        assert!(!fig("x", 300_000.0, Some(2.9)).client_bound());
        // Not measured: never called client-bound.
        assert!(!fig("x", 300_000.0, None).client_bound());
    }

    #[test]
    fn pairs_are_grouped_by_both_names_and_the_median_round_is_reported() {
        let pair = |ours: &str, o: f64, peer: &str, p: f64| PairSample {
            ours: fig(ours, o, None),
            peer: fig(peer, p, None),
            target: 1.0,
        };
        let all = vec![
            pair("nms a", 100.0, "redis x", 100.0),
            pair("nms a", 100.0, "memcached", 50.0),
            pair("nms b", 90.0, "redis x", 100.0),
            pair("nms a", 300.0, "redis x", 100.0),
            pair("nms a", 50.0, "redis x", 100.0),
            pair("nms b", 100.0, "redis x", 100.0),
        ];
        let groups = Comparison::group(&all);
        let names: Vec<(&str, &str, usize)> = groups
            .iter()
            .map(|c| (&*c.samples[0].ours.name, &*c.samples[0].peer.name, c.samples.len()))
            .collect();
        assert_eq!(
            names,
            [("nms a", "redis x", 3), ("nms a", "memcached", 1), ("nms b", "redis x", 2)]
        );
        // Rounds 1.0, 3.0, 0.5: the median round is the one at 1.0, not the mean (1.5).
        let ratios: Vec<f64> = groups[0].samples.iter().map(|s| s.ratio()).collect();
        assert_eq!(ratios, [0.5, 1.0, 3.0]);
        assert_eq!(groups[0].median().ratio(), 1.0);
        assert_eq!(groups[0].median().ours.ops_per_s, 100.0);
        // Two rounds, 0.9 and 1.0: the lower one, so a verdict never leans on the better.
        assert_eq!(groups[2].median().ratio(), 0.9);
    }

    #[test]
    fn the_table_has_each_run_once_at_its_median_nms_runs_first() {
        let rounds = vec![
            vec![fig("redis x", 10.0, None), fig("nms a", 1.0, None), fig("redis x", 30.0, None)],
            vec![fig("redis x", 20.0, None), fig("nms a", 3.0, None)],
            vec![fig("nms a", 2.0, None), fig("nms c", 5.0, None)],
            vec![fig("nms c", 4.0, None)],
        ];
        let m = medians(rounds);
        let got: Vec<(&str, f64)> = m.iter().map(|f| (&*f.name, f.ops_per_s)).collect();
        // nms c: two runs, the lower middle.
        assert_eq!(got, [("nms a", 2.0), ("nms c", 4.0), ("redis x", 20.0)]);
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
