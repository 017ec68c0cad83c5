//! `testbed drive`: a whole road on one machine. A 3-node PSS (real Raft, real disk), one NMS
//! per RSU, the SMF over gRPC, and vehicles driving through the RSUs (scenario time
//! compressed by `time_scale`) while running a read/write workload through
//! `wayside_nms::client::VolumeClient`. Every op, stall and move is recorded; at the end every
//! acknowledged write is read back.
//!
//! How the PSS and the RSUs' NMSs are deployed is a [`Deployment`]; each gives the drive a
//! [`Deployed`] road (per RSU: the address the SMF and the other NMSs use, and the address
//! vehicles use) and tears it down:
//! - [`Deployment::InProcess`] (default): every server in this process on 127.0.0.1.
//! - [`Deployment::Netns`] (`--netns`): every PSS node and every NMS a real process (`pss
//!   serve`, `nms serve`) in its own network namespace. A "core" namespace holds a bridge
//!   (the backhaul switch): the PSS nodes, each RSU's backhaul veth (rate-shaped with `tc
//!   tbf` both ways) and a management veth from the host (the SMF's control path, unshaped)
//!   plug into it. Each RSU also has a radio veth to the host (the vehicles' namespace),
//!   rate-shaped both ways, and in front of it a user-space [`crate::shaper`] proxy on
//!   127.0.0.1 that adds the radio's delay and emulated loss. Each NMS advertises its proxy
//!   address (the address vehicles use: redirects lead vehicles through the radio), while
//!   moves between NMSs use the backhaul addresses. The SMF and vehicles stay in this
//!   process (host namespace).
//!
//! - [`Deployment::Image`] (`--image`): every NMS the unikernel image booted under QEMU on a
//!   tap of one host bridge ([`crate::vmroad`]); the PSS runs in this process on the
//!   bridge's address so the guests reach it. The SMF and vehicles use the guests' addresses.
//!
//! Every hop of every road is TLS (unless `--plaintext`): the drive makes a CA for the run
//! and one certificate every node presents ([`RoadTls`]; the VMs get it through fw_cfg);
//! the PSS requires it of its callers, vehicles trust the CA and present none.
//!
//! To add a variant: a `Deployment` variant with its
//! options, a `Backend` variant holding what must be stopped, an arm in `deploy` that starts
//! it and returns `Deployed`, and an arm in `Deployed::shutdown`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rand::Rng as _;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use wayside_nms::client::{ClientOptions, VolumeClient};
use wayside_nms::smf::model::Speed;
use wayside_nms::smf::road::Road;
use wayside_nms::smf::service::{Smf, SmfConfig};
use wayside_proto::pb;
use wayside_proto::token::ClusterToken;
use wayside_proto::types::{BlockSize, Credential, Endpoint, VolumeName};

use crate::mobility::{self, Motion, Vehicle};
use crate::shaper::{Shaper, ShaperConfig};
use std::sync::atomic::Ordering;

/// `testbed drive` options.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Use only the first N RSUs of the A41 road (paper Table IV, RSU1-7).
    #[arg(long, default_value_t = 7, conflicts_with = "rsus")]
    pub rsu_count: usize,
    /// CSV of RSUs (`name,dwell_distance_m`) instead of the A41 road.
    #[arg(long, value_name = "FILE")]
    pub rsus: Option<PathBuf>,
    /// Vehicle speeds in mph, one vehicle each (repeatable). Default: 30 and 50.
    #[arg(long = "speed-mph", value_name = "MPH", conflicts_with = "fcd")]
    pub speed_mph: Vec<f64>,
    /// A SUMO FCD trace (`sumo --fcd-output`); its vehicles replace the constant-speed ones.
    #[arg(long, value_name = "FILE")]
    pub fcd: Option<PathBuf>,
    /// Scenario seconds per wall second.
    #[arg(long, default_value_t = 8.0)]
    pub time_scale: f64,
    /// Workload operations per vehicle per wall second (half writes, half reads).
    #[arg(long, default_value_t = 40.0)]
    pub ops_per_s: f64,
    /// Distinct 4 KiB blocks each vehicle writes to.
    #[arg(long, default_value_t = 256)]
    pub blocks: u64,
    /// Position reports to the SMF per scenario second.
    #[arg(long, default_value_t = 2.0)]
    pub reports_per_s: f64,
    /// An operation slower than this counts as a stall, milliseconds.
    #[arg(long, default_value_t = 100.0)]
    pub stall_ms: f64,
    /// Output folder for report.md and the SVG plots.
    #[arg(long, default_value = "out/drive")]
    pub out: PathBuf,
    /// Put every node in its own network namespace: `pss serve` and `nms serve` processes,
    /// links rate-shaped with tc tbf, delay/loss added on the radio and the backhaul by
    /// user-space shapers. Needs root and iproute2.
    #[arg(long)]
    pub netns: bool,
    /// (--netns) Radio link rate vehicle <-> RSU, each direction (units: bit, kbit, mbit,
    /// gbit per second).
    #[arg(long, requires = "netns", default_value = "27mbit", value_parser = crate::netns::parse_rate)]
    pub radio_rate: u64,
    /// (--netns) Backhaul rate RSU <-> core (PSS, other RSUs), each direction.
    #[arg(long, requires = "netns", default_value = "1gbit", value_parser = crate::netns::parse_rate)]
    pub backhaul_rate: u64,
    /// (--netns) One-way delay the radio adds, milliseconds (each direction).
    #[arg(long, requires = "netns", default_value_t = 5.0)]
    pub radio_delay_ms: f64,
    /// (--netns) Probability that a forwarded radio chunk is "lost", i.e. held for
    /// --radio-loss-stall-ms like a TCP retransmission (0..=1).
    #[arg(long, requires = "netns", default_value_t = 0.01)]
    pub radio_loss: f64,
    /// (--netns) How long an emulated loss stalls the radio, milliseconds (an RTO).
    #[arg(long, requires = "netns", default_value_t = 200.0)]
    pub radio_loss_stall_ms: f64,
    /// (--netns) Seed of the radio shaper's loss RNG.
    #[arg(long, requires = "netns", default_value_t = 1)]
    pub shaper_seed: u64,
    /// (--netns) One-way delay the backhaul adds (RSU <-> PSS and RSU <-> RSU), milliseconds.
    /// Above 0 (or with --backhaul-loss), every backhaul connection goes through a shaper.
    #[arg(long, requires = "netns", default_value_t = 1.0)]
    pub backhaul_delay_ms: f64,
    /// (--netns) Probability that a forwarded backhaul chunk is "lost" (a stall of
    /// --radio-loss-stall-ms), 0..=1.
    #[arg(long, requires = "netns", default_value_t = 0.0)]
    pub backhaul_loss: f64,
    /// Boot each RSU's NMS as the unikernel image under QEMU (KVM if it works, else TCG),
    /// each VM on a tap of one host bridge; the PSS runs in this process on the bridge.
    #[arg(long, conflicts_with = "netns")]
    pub image: bool,
    /// With --image: a built image folder (`unikernel build`) instead of building one from
    /// the `nms` binary (WAYSIDE_NMS_BIN or the cargo target dir).
    #[arg(long, value_name = "DIR", requires = "image")]
    pub image_dir: Option<PathBuf>,
    /// With --image: guest memory per VM, MiB.
    #[arg(long, default_value_t = 384, value_name = "MIB", requires = "image")]
    pub vm_memory_mib: u32,
    /// Run every hop in plaintext. By default every road runs TLS on every hop (a CA made
    /// for the run; the PSS requires the road's certificate of its callers; vehicles trust
    /// the CA).
    #[arg(long)]
    pub plaintext: bool,
    /// Operations (reads and writes) that may fail, in all, for the drive still to pass.
    /// A vehicle's client retries within its deadline, through moves and reconnects, so on
    /// a road without injected faults none should fail.
    #[arg(long, default_value_t = 0, value_name = "OPS")]
    pub max_op_errors: u64,
    /// Stop the vehicles after this many wall seconds of driving (then flush and check as
    /// at the end of the road): bounds a long FCD trace or a slow time scale.
    #[arg(long, default_value_t = 3600.0, value_name = "SECONDS")]
    pub max_wall_s: f64,
}

/// What a drive is made of (the library entry point; tests build it directly).
#[derive(Debug, Clone)]
pub struct Scenario {
    pub rsus: Vec<(String, f64)>,
    pub vehicles: Vec<Vehicle>,
    pub time_scale: f64,
    pub ops_per_s: f64,
    pub blocks: u64,
    pub reports_per_s: f64,
    pub stall_ms: f64,
    /// Coverage overlap (m) and handover execution time (s) of the road.
    pub overlap_m: f64,
    pub handover_execution_s: f64,
    /// Print progress lines.
    pub progress: bool,
    /// The road's cluster token (random per scenario): every NMS requires it on admin and
    /// migration calls, the SMF presents it, and the NMSs present it to each other.
    pub cluster_token: ClusterToken,
    /// TLS on every hop ([`RoadTls`]).
    pub tls: bool,
    /// Failed operations the verdict allows ([`verdict`]).
    pub max_op_errors: u64,
    /// Wall time the vehicles drive at most (from the road being ready); at the limit they
    /// stop and are checked as at the end of the road.
    pub max_wall: Duration,
}

/// A road's TLS: a CA made for the run, and one certificate (`localhost`, the loopback
/// addresses and the road's own) that every node of the road presents.
pub struct RoadTls {
    /// The nodes' `[tls]` files.
    pub files: wayside_proto::tls::TlsFiles,
    /// What a node (and the drive's SMF client, an operator's) dials with: the CA and the
    /// road certificate.
    pub node: wayside_proto::tls::Tls,
    /// What vehicles dial with: the CA only.
    pub vehicle: wayside_proto::tls::Tls,
    /// Where [`RoadTls::make`] wrote the files.
    _dir: Option<tempfile::TempDir>,
}

impl RoadTls {
    /// Makes a CA and the road's certificate, good for the loopback addresses and `ips`.
    pub fn make(ips: &[std::net::IpAddr]) -> anyhow::Result<Self> {
        use wayside_proto::tls::pki;
        let dir = tempfile::tempdir().context("temp dir for the road's TLS files")?;
        let ca = pki::Ca::new("wayside testbed road").context("making the road's CA")?;
        let (names, mut all) = pki::loopback();
        all.extend_from_slice(ips);
        let files = ca.write_road(dir.path(), &names, &all).context("writing TLS files")?;
        Self::with_files(files, Some(dir))
    }

    /// The road's TLS from node files made elsewhere (a test PSS cluster's).
    pub fn from_files(files: wayside_proto::tls::TlsFiles) -> anyhow::Result<Self> {
        Self::with_files(files, None)
    }

    fn with_files(
        files: wayside_proto::tls::TlsFiles,
        dir: Option<tempfile::TempDir>,
    ) -> anyhow::Result<Self> {
        use wayside_proto::tls::{Tls, TlsFiles};
        let node = Tls::load(&files)?.context("the road's TLS files")?;
        let vehicle = Tls::load(&TlsFiles { ca: files.ca.clone(), ..TlsFiles::default() })?
            .context("the road's CA")?;
        Ok(Self { files, node, vehicle, _dir: dir })
    }
}

/// A fresh random cluster token for a road.
pub fn road_token() -> ClusterToken {
    ClusterToken::new(format!("road-{:032x}", rand::random::<u128>())).expect("a valid token")
}

/// One workload operation.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct OpRecord {
    pub vehicle: usize,
    pub write: bool,
    /// Scenario time at the start of the op, seconds.
    pub time_s: f64,
    pub latency_ms: f64,
    pub ok: bool,
}

/// A vehicle's samples for the timeline: (scenario s, position m, serving RSU index).
pub type Track = Vec<(f64, f64, Option<usize>)>;

/// The outcome of a drive.
#[derive(Debug, Default, Clone)]
pub struct Outcome {
    pub ops: Vec<OpRecord>,
    pub tracks: Vec<(String, Track)>,
    pub moves: Vec<pb::MoveRecord>,
    /// Acknowledged writes checked at the end / not read back with their last acked bytes.
    pub checked: u64,
    pub lost: u64,
    /// Reads during the drive that returned something other than the last acked bytes.
    pub read_mismatches: u64,
    /// Acknowledged writes the PSS did not hold after the vehicle's final flush.
    pub unpersisted: u64,
    /// Blocks whose bytes read back through the NMS differed from the PSS's after a final
    /// flush that succeeded (each may be a write whose outcome the vehicle never learnt,
    /// but a flush must leave the two the same).
    pub diverged: u64,
    /// Vehicles whose final flush failed.
    pub flush_failures: u64,
    /// Vehicles that ended with no acknowledged write (nothing of theirs was checked).
    pub unchecked_vehicles: Vec<String>,
    /// Operations past [`MAX_OP_RECORDS_PER_VEHICLE`]: counted here, not in `ops`.
    pub ops_unrecorded: u64,
    pub op_errors: u64,
    /// The failed operations the scenario allowed ([`Scenario::max_op_errors`]).
    pub max_op_errors: u64,
    /// Acknowledged writes the final check could not read (through the NMS or from the
    /// PSS: the call failed), so neither found nor missed.
    pub unverified: u64,
    pub wall_s: f64,
    pub interrupted: bool,
    /// The vehicles were stopped at [`Scenario::max_wall`].
    pub wall_limit_reached: bool,
    /// How the road was deployed, and what its links did (shaper counters).
    pub deployment: String,
    pub learnt_fixed_s: f64,
    pub learnt_rate_bytes_per_s: f64,
    pub road: Option<Road>,
}

impl Scenario {
    /// A short road for tests and quick looks: one vehicle named `car` at `mph` from 0 m,
    /// time x20, 40 ops/s over 64 blocks, 2 reports/s, stalls counted above 500 ms, 100 m
    /// overlap, 2 s handover execution, no progress lines.
    pub fn short(
        rsus: Vec<(String, f64)>,
        mph: f64,
    ) -> Result<Self, wayside_nms::smf::model::ModelError> {
        let speed = Speed::from_mph(mph)?;
        Ok(Self {
            rsus,
            vehicles: vec![Vehicle {
                name: "car".into(),
                motion: Motion::Constant { depart_s: 0.0, start_m: 0.0, speed },
            }],
            time_scale: 20.0,
            ops_per_s: 40.0,
            blocks: 64,
            reports_per_s: 2.0,
            stall_ms: 500.0,
            overlap_m: 100.0,
            handover_execution_s: 2.0,
            progress: false,
            cluster_token: road_token(),
            tls: true,
            max_op_errors: 0,
            max_wall: Duration::from_secs(600),
        })
    }
}

impl Outcome {
    pub fn stalls(&self, stall_ms: f64) -> usize {
        self.ops.iter().filter(|o| o.latency_ms > stall_ms).count()
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let k = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[k.min(sorted.len() - 1)]
}

fn data_for(vehicle: usize, block: u64, seq: u64) -> Vec<u8> {
    // Each write's bytes are unique (vehicle, block, seq), so a stale read is detected.
    let mut d = vec![0u8; 4096];
    let tag = format!("v{vehicle} b{block} s{seq};");
    for (i, b) in d.iter_mut().enumerate() {
        *b = tag.as_bytes()[i % tag.len()];
    }
    d
}

/// Runs a scenario on in-process servers to the end (or until `stop` fires).
pub async fn run_scenario(sc: Scenario, stop: CancellationToken) -> anyhow::Result<Outcome> {
    run_scenario_on(sc, &Deployment::InProcess, stop).await
}

/// Runs a scenario on the given deployment to the end (or until `stop` fires); everything
/// the deployment started is stopped and removed before this returns.
pub async fn run_scenario_on(
    sc: Scenario,
    deployment: &Deployment,
    stop: CancellationToken,
) -> anyhow::Result<Outcome> {
    let t_wall = Instant::now();
    let deployed = tokio::select! {
        d = deploy(deployment, &sc) => d?,
        () = stop.cancelled() => anyhow::bail!("interrupted while deploying the road"),
    };
    let nodes = CancellationToken::new();
    let mut servers = JoinSet::new();
    let result = drive_on(&sc, &deployed, &stop, &nodes, &mut servers).await;
    nodes.cancel();
    while let Some(r) = servers.join_next().await {
        match r {
            Ok(Err(e)) => tracing::warn!(error = %e, "a node stopped with an error"),
            Err(e) => tracing::warn!(error = %e, "a node task failed"),
            Ok(Ok(())) => {}
        }
    }
    let description = deployed.shutdown().await;
    let mut out = result?;
    out.deployment = description;
    out.wall_s = t_wall.elapsed().as_secs_f64();
    Ok(out)
}

/// How the PSS and the RSUs' NMSs run (see the module docs).
#[derive(Debug, Clone, Default)]
pub enum Deployment {
    /// Every server in this process, on 127.0.0.1.
    #[default]
    InProcess,
    /// Every node a process in its own network namespace, links shaped.
    Netns(NetnsOptions),
    /// Every NMS a VM booted from the unikernel image (a fresh build when `image` is None).
    Image { image: Option<PathBuf>, options: crate::vmroad::VmRoadOptions },
}

/// Options of [`Deployment::Netns`].
#[derive(Debug, Clone)]
pub struct NetnsOptions {
    /// Radio vehicle <-> RSU, each direction, bits/s (tc tbf).
    pub radio_rate_bits_per_s: u64,
    /// Backhaul RSU <-> core, each direction, bits/s (tc tbf).
    pub backhaul_rate_bits_per_s: u64,
    /// Delay and emulated loss of the radio (a shaper proxy per RSU in the vehicles' path).
    pub radio: ShaperConfig,
    /// Delay and emulated loss of the backhaul: when either is set, each RSU namespace owns
    /// the PSS nodes' and the other RSUs' backhaul addresses on its loopback and serves them
    /// with shapers (rate-capped at the backhaul rate) that forward over the core bridge.
    pub backhaul: ShaperConfig,
    /// `nms` / `pss` binaries (default: [`crate::netns::wayside_binary`]).
    pub nms_bin: Option<PathBuf>,
    pub pss_bin: Option<PathBuf>,
    /// Print the namespaces and process ids once deployed (the Ctrl-C test reads them).
    pub announce: bool,
}

impl Default for NetnsOptions {
    fn default() -> Self {
        Self {
            radio_rate_bits_per_s: 27_000_000,
            backhaul_rate_bits_per_s: 1_000_000_000,
            radio: ShaperConfig {
                delay: Duration::from_millis(5),
                loss: 0.01,
                ..Default::default()
            },
            backhaul: ShaperConfig { delay: Duration::from_millis(1), ..Default::default() },
            nms_bin: None,
            pss_bin: None,
            announce: true,
        }
    }
}

/// A deployed road.
pub struct Deployed {
    /// Per RSU: the NMS address the SMF and other NMSs use.
    pub control: Vec<String>,
    /// Per RSU: the NMS address vehicles use.
    pub vehicle: Vec<String>,
    /// The PSS nodes' addresses.
    pub pss: Vec<Endpoint>,
    /// The road's TLS, when it runs TLS.
    pub tls: Option<RoadTls>,
    backend: Backend,
}

/// What a deployment must stop.
enum Backend {
    InProcess {
        cluster: Box<wayside_pss::testing::LocalCluster>,
        nodes: CancellationToken,
        servers: JoinSet<anyhow::Result<()>>,
        _dir: tempfile::TempDir,
    },
    Netns {
        lab: crate::netns::Lab,
        shapers: Vec<Shaper>,
        /// (RSU index, shaper) per backhaul destination of each RSU.
        backhaul_shapers: Vec<(usize, Shaper)>,
        description: String,
    },
    Image {
        road: crate::vmroad::VmRoad,
        pss: crate::vmroad::BridgePss,
        _dir: tempfile::TempDir,
    },
}

impl Deployed {
    /// Stops and removes everything; returns a description of the deployment (with the
    /// shapers' counters).
    pub async fn shutdown(self) -> String {
        match self.backend {
            Backend::InProcess { cluster, nodes, mut servers, _dir } => {
                nodes.cancel();
                while let Some(r) = servers.join_next().await {
                    match r {
                        Ok(Err(e)) => tracing::warn!(error = %e, "a node stopped with an error"),
                        Err(e) => tracing::warn!(error = %e, "a node task failed"),
                        Ok(Ok(())) => {}
                    }
                }
                cluster.shutdown().await;
                "in-process (127.0.0.1)".into()
            }
            Backend::Netns { mut lab, shapers, backhaul_shapers, description } => {
                let mut stats = Vec::new();
                for (i, sh) in shapers.iter().enumerate() {
                    sh.shutdown().await;
                    let st = &sh.stats;
                    stats.push(format!(
                        "radio {}: {} connections, {} chunks, {} stalled ({:.2}%), {} B up, {} B down",
                        i + 1,
                        st.connections.load(Ordering::Relaxed),
                        st.chunks.load(Ordering::Relaxed),
                        st.stalled_chunks.load(Ordering::Relaxed),
                        sh.stall_ratio() * 100.0,
                        st.bytes_up.load(Ordering::Relaxed),
                        st.bytes_down.load(Ordering::Relaxed),
                    ));
                }
                // NMSs first (they flush to the PSS on SIGTERM, through the backhaul
                // shapers), then those shapers, then the PSS, namespaces, links.
                let lab = tokio::task::spawn_blocking(move || {
                    lab.stop_matching("nms", Duration::from_secs(10));
                    lab
                })
                .await;
                let mut per_rsu: BTreeMap<usize, [u64; 3]> = BTreeMap::new();
                for (i, sh) in &backhaul_shapers {
                    sh.shutdown().await;
                    let e = per_rsu.entry(*i).or_default();
                    e[0] += sh.stats.connections.load(Ordering::Relaxed);
                    e[1] += sh.stats.chunks.load(Ordering::Relaxed);
                    e[2] += sh.stats.stalled_chunks.load(Ordering::Relaxed);
                }
                for (i, [conns, chunks, stalled]) in per_rsu {
                    stats.push(format!(
                        "backhaul {}: {conns} connections, {chunks} chunks, {stalled} stalled",
                        i + 1
                    ));
                }
                match lab {
                    Ok(mut lab) => {
                        let r = tokio::task::spawn_blocking(move || {
                            lab.shutdown(Duration::from_secs(5));
                        })
                        .await;
                        if let Err(e) = r {
                            tracing::warn!(error = %e, "tearing the namespaces down failed");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "stopping the NMSs failed"),
                }
                format!("{description}\n{}", stats.join("\n"))
            }
            Backend::Image { mut road, pss, _dir } => {
                let addresses = road.addresses().join(", ");
                // NMSs first (each flushes to the PSS as it stops), then the PSS, and the
                // bridge last: the PSS nodes talk to each other over its address.
                let stopped = match road.stop_vms().await {
                    Ok(outcomes) => format!("{} VMs stopped: {outcomes:?}", outcomes.len()),
                    Err(e) => format!("stopping the VMs: {e:#}"),
                };
                if tokio::time::timeout(Duration::from_secs(30), pss.shutdown()).await.is_err() {
                    tracing::warn!("the PSS did not stop within 30 s; leaving it to drop");
                }
                drop(road);
                format!("unikernel images under QEMU on taps ({addresses}); {stopped}")
            }
        }
    }
}

/// Starts the PSS and one NMS per RSU as `deployment` says.
pub async fn deploy(deployment: &Deployment, sc: &Scenario) -> anyhow::Result<Deployed> {
    match deployment {
        Deployment::InProcess => {
            let dir = tempfile::tempdir().context("temp dir")?;
            // Over TLS, the PSS cluster makes the road's PKI (its node certificate names
            // the loopback addresses every node here listens on).
            let cluster = if sc.tls {
                wayside_pss::testing::LocalCluster::start_tls(3, dir.path()).await
            } else {
                wayside_pss::testing::LocalCluster::start(3, dir.path()).await
            }
            .context("starting the PSS")?;
            let tls = match cluster.tls() {
                Some(t) => Some(RoadTls::from_files(t.node_files.clone())?),
                None => None,
            };
            let pss: Vec<String> =
                cluster.endpoints().iter().map(|e| e.authority().to_string()).collect();
            let nodes = CancellationToken::new();
            let mut servers = JoinSet::new();
            let mut addresses = Vec::new();
            for (name, _) in &sc.rsus {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
                addresses.push(listener.local_addr()?.to_string());
                let cfg = wayside_nms::config::Config {
                    node_id: name.clone(),
                    pss: pss.clone(),
                    listen: listener.local_addr()?.to_string(),
                    // Every RSU's NMS shares this process: they are served by its runtime
                    // instead of each taking serving threads (the default assumes one NMS
                    // per machine).
                    serve_threads: 0,
                    // Seven NMSs in one process, each faulting its pool in at start; the
                    // road's volumes are a few MiB.
                    block_pool_bytes: 16 << 20,
                    cluster_token: Some(sc.cluster_token.clone()),
                    tls: tls.as_ref().map(|t| t.files.clone()).unwrap_or_default(),
                    ..Default::default()
                };
                servers.spawn(wayside_nms::server::run(cfg, listener, nodes.child_token()));
            }
            Ok(Deployed {
                control: addresses.clone(),
                vehicle: addresses,
                pss: cluster.endpoints(),
                tls,
                backend: Backend::InProcess {
                    cluster: Box::new(cluster),
                    nodes,
                    servers,
                    _dir: dir,
                },
            })
        }
        Deployment::Netns(o) => deploy_netns(o, sc).await,
        Deployment::Image { image, options } => {
            use crate::vmroad::{BridgePss, VmRoad};
            let net = VmRoad::network().context("--image: the VMs' bridge")?;
            let dir = tempfile::tempdir().context("temp dir")?;
            // The road's certificate names the bridge (the PSS) and every guest.
            let tls = if sc.tls {
                let mut ips = vec![std::net::IpAddr::from(net.pss_bind_ip())];
                for i in 0..sc.rsus.len() {
                    ips.push(net.guest_ip(i)?.into());
                }
                Some(RoadTls::make(&ips)?)
            } else {
                None
            };
            let pss = BridgePss::start_with(net.pss_bind_ip(), 3, dir.path(), tls.as_ref())
                .await
                .context("starting the PSS on the VMs' bridge")?;
            let names: Vec<String> = sc.rsus.iter().map(|(n, _)| n.clone()).collect();
            // Every guest NMS requires the road's token, as the in-process and netns
            // deployments' NMSs do.
            let options = crate::vmroad::VmRoadOptions {
                cluster_token: Some(sc.cluster_token.clone()),
                tls: tls.as_ref().map(|t| t.files.clone()),
                ..options.clone()
            };
            let road = VmRoad::start_with(net, &names, &pss.endpoints(), image.clone(), &options)
                .await
                .context("booting the RSUs' NMS images")?;
            let addresses = road.addresses();
            Ok(Deployed {
                control: addresses.clone(),
                vehicle: addresses,
                pss: endpoints(&pss.endpoints())?,
                tls,
                backend: Backend::Image { road, pss, _dir: dir },
            })
        }
    }
}

fn endpoints(addrs: &[String]) -> anyhow::Result<Vec<Endpoint>> {
    addrs.iter().map(|a| Endpoint::parse(a).map_err(|e| anyhow::anyhow!("{e}"))).collect()
}

/// The NMSs' port inside their namespaces (each namespace has its own ports).
/// RSU `i`'s NMS listens on `NMS_PORT + 1 + i`: distinct ports, so an RSU namespace can own
/// the other RSUs' backhaul addresses (for their shapers) without clashing with its own NMS's
/// wildcard listener.
const NMS_PORT: u16 = 7100;

fn nms_port(i: usize) -> u16 {
    NMS_PORT + 1 + u16::try_from(i).expect("at most 200 RSUs")
}
const PSS_PORT: u16 = 7400;

async fn deploy_netns(o: &NetnsOptions, sc: &Scenario) -> anyhow::Result<Deployed> {
    use crate::netns::{self, Lab, Tbf};
    use std::net::{Ipv4Addr, SocketAddr};
    netns::probe().map_err(|e| anyhow::anyhow!("--netns: network namespaces are unusable: {e}"))?;
    o.radio.validate().map_err(|e| anyhow::anyhow!("radio shaper: {e}"))?;
    if sc.rsus.len() > 200 {
        anyhow::bail!("--netns supports at most 200 RSUs");
    }
    let bin = |given: &Option<PathBuf>, name: &str| match given {
        Some(p) => Ok(p.clone()),
        None => netns::wayside_binary(name).map_err(anyhow::Error::msg),
    };
    let (nms_bin, pss_bin) = (bin(&o.nms_bin, "nms")?, bin(&o.pss_bin, "pss")?);
    for gone in netns::reap_stale() {
        tracing::info!(namespace = %gone, "removed a namespace left by a dead run");
    }
    let mut lab = Lab::new("road")?;
    let core = lab.namespace("core")?;
    let br = lab.bridge(&core)?;
    let seg = lab.segment()?.octets();
    let at = |h: u8| Ipv4Addr::new(seg[0], seg[1], seg[2], h);
    let mut pss_nodes = Vec::new();
    for i in 1..=3u8 {
        let ns = lab.namespace(&format!("pss{i}"))?;
        let l = lab.veth_bare(Some(&ns), Some(&core))?;
        lab.enslave(&l.b, &br)?;
        lab.addr(&l.a, at(10 + i), 24)?;
        pss_nodes.push((ns, SocketAddr::from((at(10 + i), PSS_PORT))));
    }
    let mgmt = lab.veth_bare(None, Some(&core))?;
    lab.enslave(&mgmt.b, &br)?;
    lab.addr(&mgmt.a, at(254), 24)?;
    // The road's certificate names every address a node is dialled at: the PSS nodes' and
    // the RSUs' backhaul addresses (vehicles dial the radio shapers on 127.0.0.1).
    let tls = if sc.tls {
        let ips: Vec<std::net::IpAddr> = (11..=13)
            .chain((0..sc.rsus.len()).map(|i| 20 + i as u8))
            .map(|h| at(h).into())
            .collect();
        Some(RoadTls::make(&ips)?)
    } else {
        None
    };
    let data = lab.log_dir().join("data");
    let pss =
        netns::spawn_pss(&mut lab, &pss_bin, &pss_nodes, &data, tls.as_ref().map(|t| &t.files))?;
    let backhaul = Tbf::for_rate(o.backhaul_rate_bits_per_s);
    let radio = Tbf::for_rate(o.radio_rate_bits_per_s);
    let stop = CancellationToken::new();
    let (mut control, mut vehicle, mut shapers) = (Vec::new(), Vec::new(), Vec::new());
    let shape_backhaul = !o.backhaul.delay.is_zero() || o.backhaul.loss > 0.0;
    o.backhaul.validate().map_err(|e| anyhow::anyhow!("backhaul shaper: {e}"))?;
    let mut backhaul_shapers = Vec::new();
    for (i, (name, _)) in sc.rsus.iter().enumerate() {
        let ns = lab.namespace(&format!("rsu{}", i + 1))?;
        let bh = lab.veth_bare(Some(&ns), Some(&core))?;
        lab.enslave(&bh.b, &br)?;
        let bh_addr = at(20 + i as u8);
        if shape_backhaul {
            // What this RSU reaches over the backhaul: the PSS nodes and the other RSUs.
            // Their addresses are owned here and served by shapers in this process, which
            // forward from the host's management veth (so tbf is replaced by their cap).
            let remote = pss_nodes.iter().map(|(_, a)| *a).chain(
                (0..sc.rsus.len())
                    .filter(|&j| j != i)
                    .map(|j| SocketAddr::from((at(20 + j as u8), nms_port(j)))),
            );
            for addr in remote {
                let SocketAddr::V4(v4) = addr else { unreachable!("lab addresses are IPv4") };
                lab.own_address(&ns, *v4.ip())?;
                let l = lab.tcp_listener_in(&ns, addr)?;
                l.set_nonblocking(true)?;
                let cfg = ShaperConfig {
                    seed: o
                        .backhaul
                        .seed
                        .wrapping_add(1000 * (i as u64 + 1) + backhaul_shapers.len() as u64),
                    rate_bits_per_s: Some(o.backhaul_rate_bits_per_s),
                    ..o.backhaul.clone()
                };
                let sh =
                    Shaper::start(tokio::net::TcpListener::from_std(l)?, addr, cfg, stop.clone())
                        .map_err(|e| anyhow::anyhow!("backhaul shaper: {e}"))?;
                backhaul_shapers.push((i, sh));
            }
        }
        lab.addr(&bh.a, bh_addr, 24)?;
        lab.tbf_both(&bh, &backhaul)?;
        let air = lab.veth(None, Some(&ns), 30)?;
        lab.tbf_both(&air, &radio)?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let cfg = ShaperConfig { seed: o.radio.seed.wrapping_add(i as u64), ..o.radio.clone() };
        let sh =
            Shaper::start(listener, SocketAddr::from((air.b.addr, nms_port(i))), cfg, stop.clone())
                .map_err(|e| anyhow::anyhow!("radio shaper: {e}"))?;
        let nms_cfg = wayside_nms::config::Config {
            node_id: name.clone(),
            pss: pss.clone(),
            listen: format!("0.0.0.0:{}", nms_port(i)),
            advertise: sh.local_addr().to_string(),
            cluster_token: Some(sc.cluster_token.clone()),
            tls: tls.as_ref().map(|t| t.files.clone()).unwrap_or_default(),
            ..Default::default()
        };
        netns::spawn_nms(&mut lab, &nms_bin, &ns, &nms_cfg)?;
        control.push(format!("{bh_addr}:{}", nms_port(i)));
        vehicle.push(sh.local_addr().to_string());
        shapers.push(sh);
    }
    netns::wait_pss_leader(&mut lab, &pss, tls.as_ref().map(|t| &t.node), Duration::from_secs(30))
        .await
        .map_err(anyhow::Error::msg)?;
    for c in &control {
        let addr: SocketAddr = c.parse()?;
        netns::wait_tcp(&mut lab, addr, Duration::from_secs(20))
            .await
            .map_err(anyhow::Error::msg)?;
    }
    let backhaul_shaping = if shape_backhaul {
        format!(
            "; backhaul shapers ({}, in each RSU namespace for the PSS nodes and the other RSUs) delay {:?} one-way, loss {} per chunk, rate cap {} bit/s",
            backhaul_shapers.len(),
            o.backhaul.delay,
            o.backhaul.loss,
            o.backhaul_rate_bits_per_s
        )
    } else {
        String::new()
    };
    let description = format!(
        "netns: namespaces {p}core, {p}pss1-3, {p}rsu1-{n}; backhaul {bh} bit/s, radio {ra} bit/s (tc tbf, both ways); radio shaper delay {d:?} one-way, loss {l} per chunk (stall {st:?}){backhaul_shaping}",
        p = lab.prefix(),
        n = sc.rsus.len(),
        bh = o.backhaul_rate_bits_per_s,
        ra = o.radio_rate_bits_per_s,
        d = o.radio.delay,
        l = o.radio.loss,
        st = o.radio.loss_stall,
    );
    if o.announce {
        let pids: Vec<String> = lab.pids().iter().map(u32::to_string).collect();
        eprintln!("{description}");
        eprintln!("netns: prefix {} processes {}", lab.prefix(), pids.join(","));
    }
    Ok(Deployed {
        control,
        vehicle,
        pss: endpoints(&pss)?,
        tls,
        backend: Backend::Netns { lab, shapers, backhaul_shapers, description },
    })
}

async fn drive_on(
    sc: &Scenario,
    deployed: &Deployed,
    stop: &CancellationToken,
    nodes: &CancellationToken,
    servers: &mut JoinSet<anyhow::Result<()>>,
) -> anyhow::Result<Outcome> {
    let (addresses, vehicle_addresses) = (&deployed.control, &deployed.vehicle);
    let road =
        mobility::road_from_dwell(&sc.rsus, addresses, sc.overlap_m, sc.handover_execution_s, 4.0)?;
    // The SMF, served over gRPC like in a deployment; we keep a handle for its estimate.
    let smf_cfg = SmfConfig {
        time_scale: sc.time_scale,
        cluster_token: Some(sc.cluster_token.clone()),
        tls: deployed.tls.as_ref().map(|t| t.files.clone()).unwrap_or_default(),
        ..Default::default()
    };
    let smf = Smf::new(smf_cfg, nodes.child_token()).map_err(anyhow::Error::msg)?;
    let smf_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let smf_addr = format!("http://{}", smf_listener.local_addr()?);
    servers.spawn(wayside_nms::smf::service::serve(smf.clone(), smf_listener, nodes.child_token()));
    let mut smf_client = connect_smf(&smf_addr, deployed.tls.as_ref().map(|t| &t.node)).await?;
    let road_pb = pb::Road {
        rsus: road
            .rsus()
            .iter()
            .map(|r| pb::Rsu {
                name: r.name.clone(),
                position_m: r.position_m,
                coverage_radius_m: r.coverage_radius_m,
                nms_address: r.nms_address.clone(),
            })
            .collect(),
        handover_execution_s: road.handover_execution_s(),
        time_to_handover_s: road.time_to_handover_s(),
    };
    smf_client.set_road(sc.cluster_token.request(road_pb)).await.context("SetRoad")?;
    if sc.progress {
        eprintln!("road ready ({} RSUs); the vehicles are driving", addresses.len());
    }

    // What the vehicles' final checks read the PSS with (as an operator: the road's
    // certificate on TLS).
    let pss = wayside_pss::client::PssClient::new(
        deployed.pss.clone(),
        wayside_pss::client::ClientOptions {
            tls: deployed.tls.as_ref().map(|t| t.node.clone()),
            ..Default::default()
        },
    );
    let t0 = Instant::now();
    // The vehicles stop at the end of the road, on `stop` (Ctrl-C), or at the wall limit.
    let driving = stop.child_token();
    let wall_limit = tokio::time::sleep_until((t0 + sc.max_wall).into());
    tokio::pin!(wall_limit);
    let mut wall_limit_reached = false;
    let mut vehicles = JoinSet::new();
    let (progress_tx, mut progress_rx) =
        tokio::sync::mpsc::channel::<(usize, f64, f64, Option<usize>)>(64);
    for (i, v) in sc.vehicles.iter().cloned().enumerate() {
        let road = road.clone();
        let client = smf_client.clone();
        let sc = sc.clone();
        let stop = driving.clone();
        let tx = progress_tx.clone();
        let at = vehicle_addresses.to_vec();
        let tls = deployed.tls.as_ref().map(|t| t.vehicle.clone());
        let pss = pss.clone();
        vehicles.spawn(async move {
            run_vehicle(i, v, road, at, tls, client, pss, sc, t0, stop, tx).await
        });
    }
    drop(progress_tx);
    let mut last_print = Instant::now();
    let mut outs = Vec::new();
    loop {
        tokio::select! {
            p = progress_rx.recv() => {
                if let Some((i, t, pos, rsu)) = p {
                    if sc.progress && last_print.elapsed() >= Duration::from_secs(3) {
                        last_print = Instant::now();
                        let name = rsu.map(|r| road.rsus()[r].name.clone()).unwrap_or_else(|| "-".into());
                        eprintln!("[{:5.1} s wall] t={t:6.1} s  {} at {pos:7.1} m, served by {name}", t0.elapsed().as_secs_f64(), sc.vehicles[i].name);
                    }
                }
            }
            r = vehicles.join_next() => match r {
                Some(r) => outs.push(r.context("vehicle task")??),
                None => break,
            },
            () = &mut wall_limit, if !wall_limit_reached => {
                wall_limit_reached = true;
                if sc.progress {
                    eprintln!(
                        "the wall limit ({:.0} s) is reached: stopping the vehicles, then checking",
                        sc.max_wall.as_secs_f64()
                    );
                }
                driving.cancel();
            }
        }
    }
    // Let moves in flight land before reading the records.
    let deadline = Instant::now() + Duration::from_secs(10);
    while smf.moves_in_flight() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let moves = smf_client
        .list_moves(sc.cluster_token.request(pb::ListMovesRequest::default()))
        .await
        .context("ListMoves")?
        .into_inner()
        .moves;
    let est = smf.estimator();
    let mut out = Outcome {
        moves,
        learnt_fixed_s: est.fixed_s(),
        learnt_rate_bytes_per_s: est.rate_bytes_per_s(),
        interrupted: stop.is_cancelled(),
        wall_limit_reached: wall_limit_reached && !stop.is_cancelled(),
        max_op_errors: sc.max_op_errors,
        road: Some(road),
        ..Default::default()
    };
    outs.sort_by_key(|v: &VehicleOut| v.index);
    for v in outs {
        out.ops.extend(v.ops);
        out.tracks.push((v.name.clone(), v.track));
        out.checked += v.checked;
        out.lost += v.lost;
        out.read_mismatches += v.read_mismatches;
        out.unpersisted += v.unpersisted;
        out.diverged += v.diverged;
        out.unverified += v.unverified;
        out.flush_failures += u64::from(v.flush_failed);
        out.ops_unrecorded += v.ops_unrecorded;
        if v.checked == 0 {
            out.unchecked_vehicles.push(v.name);
        }
        out.op_errors += v.op_errors;
    }
    Ok(out)
}

async fn connect_smf(
    addr: &str,
    tls: Option<&wayside_proto::tls::Tls>,
) -> anyhow::Result<pb::smf_client::SmfClient<tonic::transport::Channel>> {
    let ep = Endpoint::parse(addr).map_err(|e| anyhow::anyhow!("{e}"))?;
    let ch = wayside_proto::client::endpoint(&ep, tls)?
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .context("connecting to the SMF")?;
    Ok(pb::smf_client::SmfClient::new(ch))
}

struct VehicleOut {
    index: usize,
    name: String,
    ops: Vec<OpRecord>,
    track: Track,
    checked: u64,
    lost: u64,
    read_mismatches: u64,
    unpersisted: u64,
    diverged: u64,
    unverified: u64,
    flush_failed: bool,
    ops_unrecorded: u64,
    op_errors: u64,
}

/// What a vehicle knows a block may hold: the bytes of its last acknowledged write, and
/// those of the writes to it that failed since (a failed write may or may not have been
/// applied: the NMS may have taken it before the answer was lost), by sequence number.
#[derive(Debug, Default)]
struct Expected {
    acked: BTreeMap<u64, Vec<u8>>,
    unsure: BTreeMap<u64, Vec<u64>>,
}

/// Most failed writes remembered per block (the oldest forgotten past it).
const MAX_UNSURE_WRITES_PER_BLOCK: usize = 64;

impl Expected {
    fn acked(&mut self, block: u64, data: Vec<u8>) {
        self.acked.insert(block, data);
        self.unsure.remove(&block);
    }

    fn failed(&mut self, block: u64, seq: u64) {
        let u = self.unsure.entry(block).or_default();
        if u.len() >= MAX_UNSURE_WRITES_PER_BLOCK {
            u.remove(0);
        }
        u.push(seq);
    }

    /// Whether `got` is what vehicle `index`'s `block` may hold.
    fn allows(&self, index: usize, block: u64, got: Option<&[u8]>) -> bool {
        got == self.acked.get(&block).map(Vec::as_slice)
            || got.is_some_and(|g| {
                self.unsure
                    .get(&block)
                    .is_some_and(|u| u.iter().any(|s| g == data_for(index, block, *s)))
            })
    }
}

/// Most op records kept per vehicle (the rest are counted in `Outcome::ops_unrecorded`).
const MAX_OP_RECORDS_PER_VEHICLE: usize = 200_000;

#[allow(clippy::too_many_arguments)]
async fn run_vehicle(
    index: usize,
    v: Vehicle,
    road: Road,
    vehicle_addresses: Vec<String>,
    tls: Option<wayside_proto::tls::Tls>,
    mut smf: pb::smf_client::SmfClient<tonic::transport::Channel>,
    pss: wayside_pss::client::PssClient,
    sc: Scenario,
    t0: Instant,
    stop: CancellationToken,
    progress: tokio::sync::mpsc::Sender<(usize, f64, f64, Option<usize>)>,
) -> anyhow::Result<VehicleOut> {
    let scen = |at: Instant| at.duration_since(t0).as_secs_f64() * sc.time_scale;
    let end_m = road.rsus().last().map_or(0.0, |r| r.position_m + r.coverage_radius_m);
    let end_s = v.motion.time_past(end_m);
    // Attach at the RSU serving the vehicle when it starts (or the first).
    let start_t = match &v.motion {
        Motion::Constant { depart_s, .. } => *depart_s,
        Motion::Trace(s) => s.first().map_or(0.0, |p| p.0),
    };
    let first =
        v.motion.at(start_t).and_then(|f| road.serving_at(f.position_m, f.speed)).unwrap_or(0);
    let volume =
        VolumeName::new(format!("drive-{}", v.name)).map_err(|e| anyhow::anyhow!("{e}"))?;
    let credential = format!("secret-{}", v.name);
    let mut opts = ClientOptions::new(
        vec![Endpoint::parse(&vehicle_addresses[first]).map_err(|e| anyhow::anyhow!("{e}"))?],
        volume.clone(),
        Credential::new(credential.clone()).map_err(|e| anyhow::anyhow!("{e}"))?,
    );
    opts.create_block_size = Some(BlockSize::new(4096).map_err(|e| anyhow::anyhow!("{e}"))?);
    opts.tls = tls;
    let client = VolumeClient::open(opts).await.context("opening the vehicle's volume")?;
    let mut out = VehicleOut {
        index,
        name: v.name.clone(),
        ops: Vec::new(),
        track: Vec::new(),
        checked: 0,
        lost: 0,
        read_mismatches: 0,
        unpersisted: 0,
        diverged: 0,
        unverified: 0,
        flush_failed: false,
        ops_unrecorded: 0,
        op_errors: 0,
    };
    let mut expected = Expected::default();
    let mut seq = 0u64;
    let report_every = Duration::from_secs_f64(1.0 / (sc.reports_per_s * sc.time_scale));
    let op_every = Duration::from_secs_f64(1.0 / sc.ops_per_s);
    let mut next_report = Instant::now();
    let mut next_op = Instant::now();
    let mut rng = rand::rngs::StdRng::seed_from_u64(index as u64 + 1);
    loop {
        if stop.is_cancelled() {
            break;
        }
        let now = Instant::now();
        let t = scen(now);
        if t > end_s {
            break;
        }
        if now >= next_report {
            next_report = now + report_every;
            // The volume's figures first: the report's time and position are then those
            // of the moment it is sent (the SMF plans from its receipt).
            let stat = client.stat().await.ok();
            let t = scen(Instant::now());
            if let Some(fix) = v.motion.at(t) {
                let serving = road.serving_at(fix.position_m, fix.speed);
                out.track.push((t, fix.position_m, serving));
                let _ = progress.try_send((index, t, fix.position_m, serving));
                let report = pb::VehicleReport {
                    vehicle: v.name.clone(),
                    volume: volume.as_str().to_string(),
                    time_s: t,
                    position_m: fix.position_m,
                    speed_mps: fix.speed.mps(),
                    serving_rsu: serving.map(|i| road.rsus()[i].name.clone()).unwrap_or_default(),
                    cached_bytes: stat.as_ref().map_or(0, |s| s.cached_bytes),
                    dirty_bytes: stat.as_ref().map_or(0, |s| s.dirty_bytes),
                    // The SMF moves the volume only for a report proving it is ours.
                    credential: credential.clone(),
                };
                if let Err(e) = smf.report_vehicle(report).await {
                    tracing::warn!(vehicle = %v.name, error = %e, "ReportVehicle failed");
                }
            }
        }
        if now >= next_op {
            next_op += op_every;
            if next_op < now {
                next_op = now + op_every; // fell behind: do not burst
            }
            let write = expected.acked.is_empty() || rng.gen_bool(0.5);
            let t_op = Instant::now();
            let block = if write {
                rng.gen_range(0..sc.blocks)
            } else {
                let n = rng.gen_range(0..expected.acked.len());
                *expected.acked.keys().nth(n).expect("non-empty")
            };
            let ok = if write {
                seq += 1;
                let data = data_for(index, block, seq);
                match client.write(block, 0, data.clone()).await {
                    Ok(_) => {
                        expected.acked(block, data);
                        true
                    }
                    Err(e) => {
                        tracing::warn!(vehicle = %v.name, block, error = %e, "write failed");
                        expected.failed(block, seq);
                        false
                    }
                }
            } else {
                match client.read(block, 0, None).await {
                    Ok(got) => {
                        if !expected.allows(index, block, got.as_deref()) {
                            out.read_mismatches += 1;
                        }
                        true
                    }
                    Err(e) => {
                        tracing::warn!(vehicle = %v.name, block, error = %e, "read failed");
                        false
                    }
                }
            };
            if !ok {
                out.op_errors += 1;
            }
            if out.ops.len() < MAX_OP_RECORDS_PER_VEHICLE {
                out.ops.push(OpRecord {
                    vehicle: index,
                    write,
                    time_s: scen(t_op),
                    latency_ms: t_op.elapsed().as_secs_f64() * 1e3,
                    ok,
                });
            } else {
                out.ops_unrecorded += 1;
            }
        }
        let wake = next_op.min(next_report);
        tokio::select! {
            () = tokio::time::sleep_until(wake.into()) => {}
            () = stop.cancelled() => break,
        }
    }
    final_check(index, &v.name, &volume, &client, &pss, &expected, &mut out).await;
    Ok(out)
}

/// The end of a vehicle's drive: a flush (every acknowledged write persisted), then every
/// acknowledged write must read back through the NMS (`lost` counts those that do not)
/// and be in the PSS itself (`unpersisted`); a read that fails leaves its blocks
/// `unverified` (each side's count). Each call is bounded by its client's deadline.
async fn final_check(
    index: usize,
    name: &str,
    volume: &VolumeName,
    client: &VolumeClient,
    pss: &wayside_pss::client::PssClient,
    expected: &Expected,
    out: &mut VehicleOut,
) {
    if let Err(e) = client.flush().await {
        tracing::warn!(vehicle = %name, error = %e, "final flush failed");
        out.flush_failed = true;
    }
    let blocks: Vec<u64> = expected.acked.keys().copied().collect();
    out.checked = blocks.len() as u64;
    // What the NMS holds, by block (compared with the PSS below).
    let mut held: Option<BTreeMap<u64, Option<Vec<u8>>>> = None;
    match client.read_many(&blocks).await {
        Ok(got) => {
            for (block, got) in blocks.iter().zip(&got) {
                if !expected.allows(index, *block, got.as_deref()) {
                    out.lost += 1;
                }
            }
            held = Some(blocks.iter().copied().zip(got).collect());
        }
        Err(e) => {
            // Not found missing either: counted apart, and the drive fails on it.
            tracing::warn!(vehicle = %name, error = %e, "final read-back failed");
            out.unverified += out.checked;
        }
    }
    // In requests the PSS takes (at most MAX_GET_BLOCKS blocks each).
    for chunk in blocks.chunks(wayside_pss::service::MAX_GET_BLOCKS) {
        match pss.get_blocks(volume, chunk).await {
            Ok(stored) => {
                let stored: BTreeMap<u64, Vec<u8>> =
                    stored.into_iter().filter(|b| b.found).map(|b| (b.block, b.data)).collect();
                for block in chunk {
                    let in_pss = stored.get(block).map(Vec::as_slice);
                    if !expected.allows(index, *block, in_pss) {
                        out.unpersisted += 1;
                    }
                    // Each side may hold a write whose outcome the vehicle never learnt,
                    // but after a flush that succeeded they hold the same one.
                    let at_nms = held.as_ref().and_then(|h| h.get(block)).map(|d| d.as_deref());
                    if !out.flush_failed && at_nms.is_some_and(|n| n != in_pss) {
                        out.diverged += 1;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(vehicle = %name, error = %e, "reading the volume from the PSS failed");
                out.unverified += chunk.len() as u64;
            }
        }
    }
}

use rand::SeedableRng as _;

/// Builds the scenario from the command line.
pub fn scenario_from_args(a: &Args) -> anyhow::Result<Scenario> {
    if !(a.time_scale.is_finite() && a.time_scale > 0.0) {
        anyhow::bail!("--time-scale must be > 0");
    }
    if !(a.ops_per_s.is_finite() && a.ops_per_s > 0.0) {
        anyhow::bail!("--ops-per-s must be > 0, got {}", a.ops_per_s);
    }
    if !(a.reports_per_s.is_finite() && a.reports_per_s > 0.0) {
        anyhow::bail!("--reports-per-s must be > 0, got {}", a.reports_per_s);
    }
    if a.blocks == 0 {
        anyhow::bail!("--blocks must be at least 1");
    }
    if !(a.stall_ms.is_finite() && a.stall_ms >= 0.0) {
        anyhow::bail!("--stall-ms must be 0 or more milliseconds, got {}", a.stall_ms);
    }
    if !(a.max_wall_s.is_finite() && a.max_wall_s > 0.0 && a.max_wall_s <= 1e9) {
        anyhow::bail!("--max-wall-s must be above 0 seconds (and finite), got {}", a.max_wall_s);
    }
    let rsus = match &a.rsus {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            crate::paper::parse_rsus_csv(&text, &p.display().to_string())?
                .into_iter()
                .map(|r| (r.name, r.ndd_m))
                .collect()
        }
        None => {
            let all = mobility::a41_rsus();
            if a.rsu_count < 2 || a.rsu_count > all.len() {
                anyhow::bail!("--rsu-count must be 2..={}", all.len());
            }
            all[..a.rsu_count].to_vec()
        }
    };
    let vehicles = match &a.fcd {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            let trace = crate::fcd::parse(&text).with_context(|| p.display().to_string())?;
            mobility::vehicles_from_fcd(&trace)
        }
        None => {
            let speeds =
                if a.speed_mph.is_empty() { vec![30.0, 50.0] } else { a.speed_mph.clone() };
            speeds
                .iter()
                .map(|mph| {
                    Ok(Vehicle {
                        name: format!("car{}mph", mph),
                        motion: Motion::Constant {
                            depart_s: 0.0,
                            start_m: 0.0,
                            speed: Speed::from_mph(*mph)?,
                        },
                    })
                })
                .collect::<Result<Vec<_>, wayside_nms::smf::model::ModelError>>()?
        }
    };
    if vehicles.is_empty() {
        anyhow::bail!("no vehicle to drive (the FCD trace has none)");
    }
    // Each vehicle has a volume of its own, named after it.
    let mut names = std::collections::HashSet::new();
    for v in &vehicles {
        if !names.insert(v.name.as_str()) {
            anyhow::bail!(
                "two vehicles are named {:?} (the same --speed-mph twice?): each needs a \
                 volume of its own",
                v.name
            );
        }
        VolumeName::new(format!("drive-{}", v.name))
            .map_err(|e| anyhow::anyhow!("vehicle {:?} cannot name a volume: {e}", v.name))?;
    }
    Ok(Scenario {
        rsus,
        vehicles,
        time_scale: a.time_scale,
        ops_per_s: a.ops_per_s,
        blocks: a.blocks,
        reports_per_s: a.reports_per_s,
        stall_ms: a.stall_ms,
        overlap_m: 100.0,
        handover_execution_s: 2.0,
        progress: true,
        cluster_token: road_token(),
        tls: !a.plaintext,
        max_op_errors: a.max_op_errors,
        max_wall: Duration::from_secs_f64(a.max_wall_s),
    })
}

/// The deployment the command line asks for.
pub fn deployment_from_args(a: &Args) -> anyhow::Result<Deployment> {
    if a.image {
        if !(64..=65_536).contains(&a.vm_memory_mib) {
            anyhow::bail!("--vm-memory-mib must be 64..=65536, got {}", a.vm_memory_mib);
        }
        // The command's VMs in groups of their own: Ctrl-C stops them cleanly.
        let options = crate::vmroad::VmRoadOptions {
            memory_mib: a.vm_memory_mib,
            own_group: true,
            ..Default::default()
        };
        return Ok(Deployment::Image { image: a.image_dir.clone(), options });
    }
    if !a.netns {
        return Ok(Deployment::InProcess);
    }
    let ms = |what: &str, v: f64| {
        if v.is_finite() && (0.0..=60_000.0).contains(&v) {
            Ok(Duration::from_secs_f64(v / 1e3))
        } else {
            Err(anyhow::anyhow!("--{what} must be 0..=60000 milliseconds, got {v}"))
        }
    };
    let radio = ShaperConfig {
        delay: ms("radio-delay-ms", a.radio_delay_ms)?,
        loss: a.radio_loss,
        loss_stall: ms("radio-loss-stall-ms", a.radio_loss_stall_ms)?,
        seed: a.shaper_seed,
        ..Default::default()
    };
    radio.validate().map_err(|e| anyhow::anyhow!("--radio-*: {e}"))?;
    let backhaul = ShaperConfig {
        delay: ms("backhaul-delay-ms", a.backhaul_delay_ms)?,
        loss: a.backhaul_loss,
        loss_stall: radio.loss_stall,
        seed: a.shaper_seed,
        ..Default::default()
    };
    backhaul.validate().map_err(|e| anyhow::anyhow!("--backhaul-*: {e}"))?;
    Ok(Deployment::Netns(NetnsOptions {
        radio_rate_bits_per_s: a.radio_rate,
        backhaul_rate_bits_per_s: a.backhaul_rate,
        radio,
        backhaul,
        ..Default::default()
    }))
}

/// `testbed drive`.
pub async fn run(a: Args) -> anyhow::Result<()> {
    let sc = scenario_from_args(&a)?;
    let deployment = deployment_from_args(&a)?;
    let stop = CancellationToken::new();
    let ctrl_c = {
        let stop = stop.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                eprintln!(
                    "Ctrl-C: stopping the vehicles, checking what they wrote, then every node \
                     (Ctrl-C again to exit at once)"
                );
                stop.cancel();
            }
            if tokio::signal::ctrl_c().await.is_ok() {
                // Server processes and VMs die with this process (PR_SET_PDEATHSIG); the
                // network namespaces and taps stay until the next drive or a reboot.
                eprintln!("second Ctrl-C: exiting now, without checking or stopping the nodes");
                std::process::exit(INTERRUPTED_EXIT_CODE);
            }
        })
    };
    eprintln!(
        "driving {} vehicle(s) through {} RSUs, time x{}; writing to {}",
        sc.vehicles.len(),
        sc.rsus.len(),
        sc.time_scale,
        a.out.display()
    );
    let outcome = run_scenario_on(sc.clone(), &deployment, stop).await;
    ctrl_c.abort();
    let outcome = outcome?;
    let md = write_report(&a.out, &sc, &outcome)?;
    println!("{}", summary(&sc, &outcome));
    if !matches!(deployment, Deployment::InProcess) {
        println!("{}", outcome.deployment);
    }
    eprintln!("report: {}", md.display());
    verdict(&outcome).map_err(|e| anyhow::anyhow!("the drive failed: {e}"))?;
    if outcome.interrupted {
        return Err(Interrupted.into());
    }
    Ok(())
}

/// A drive stopped by Ctrl-C before the end of the road: what ran passed its checks, but
/// the road was not driven (the process exits with [`INTERRUPTED_EXIT_CODE`]).
#[derive(Debug, thiserror::Error)]
#[error("the drive was interrupted (Ctrl-C) before the end of the road; what it drove passed its checks")]
pub struct Interrupted;

/// The exit status of an interrupted drive (128 + SIGINT, as shells report it).
pub const INTERRUPTED_EXIT_CODE: i32 = 130;

/// The one-paragraph summary.
pub fn summary(sc: &Scenario, o: &Outcome) -> String {
    let ok_moves = o.moves.iter().filter(|m| m.ok).count();
    format!(
        "drive: {:.1} s wall{}; ops {}{} (errors {}), stalls > {} ms: {}; moves {} ok / {}; \
         acknowledged writes checked {}, lost {}, not in the PSS {}{}; stale reads {}{}",
        o.wall_s,
        if o.interrupted {
            " (interrupted)"
        } else if o.wall_limit_reached {
            " (stopped at the wall limit)"
        } else {
            ""
        },
        o.ops.len() as u64 + o.ops_unrecorded,
        if o.ops_unrecorded > 0 {
            format!(" ({} past the record limit, not in the tables)", o.ops_unrecorded)
        } else {
            String::new()
        },
        o.op_errors,
        sc.stall_ms,
        o.stalls(sc.stall_ms),
        ok_moves,
        o.moves.len(),
        o.checked,
        o.lost,
        o.unpersisted,
        if o.unverified > 0 { format!(", unverified {}", o.unverified) } else { String::new() },
        o.read_mismatches,
        if o.flush_failures > 0 {
            format!("; final flushes failed {}", o.flush_failures)
        } else {
            String::new()
        }
    )
}

/// Whether a drive passed: nothing acknowledged lost (read back through the NMS and found
/// in the PSS after every vehicle's final flush), every acknowledged write checked (no
/// read of the final check failed), no read older than a write already acknowledged, no
/// more failed operations than allowed, and every vehicle with something checked (unless
/// interrupted or stopped at the wall limit).
pub fn verdict(o: &Outcome) -> Result<(), String> {
    let mut wrong = Vec::new();
    if o.unverified > 0 {
        wrong.push(format!(
            "{} acknowledged writes could not be checked (the final check's reads failed)",
            o.unverified
        ));
    }
    if o.op_errors > o.max_op_errors {
        wrong.push(format!(
            "{} operations failed (at most {} allowed: --max-op-errors)",
            o.op_errors, o.max_op_errors
        ));
    }
    if o.lost > 0 {
        wrong.push(format!("{} acknowledged writes did not read back", o.lost));
    }
    if o.unpersisted > 0 {
        wrong.push(format!(
            "{} acknowledged writes were not in the PSS after the final flush",
            o.unpersisted
        ));
    }
    if o.flush_failures > 0 {
        wrong.push(format!("{} vehicles' final flush failed", o.flush_failures));
    }
    if o.diverged > 0 {
        wrong.push(format!(
            "{} blocks read back through the NMS differed from the PSS's after a final flush \
             that succeeded",
            o.diverged
        ));
    }
    if o.read_mismatches > 0 {
        wrong.push(format!(
            "{} reads returned something other than the last acknowledged write",
            o.read_mismatches
        ));
    }
    if o.tracks.is_empty() {
        wrong.push("no vehicle drove".into());
    }
    if !o.interrupted && !o.wall_limit_reached && !o.unchecked_vehicles.is_empty() {
        wrong.push(format!(
            "no write of {} was acknowledged, so nothing of theirs was checked",
            o.unchecked_vehicles.join(", ")
        ));
    }
    if wrong.is_empty() {
        Ok(())
    } else {
        Err(wrong.join("; "))
    }
}

fn kind_name(k: i32) -> &'static str {
    match pb::MoveKind::try_from(k).unwrap_or(pb::MoveKind::Unspecified) {
        pb::MoveKind::Reactive => "reactive",
        pb::MoveKind::Proactive => "proactive",
        pb::MoveKind::CannotFit => "cannot fit",
        pb::MoveKind::None => "none",
        pb::MoveKind::Unspecified => "?",
    }
}

/// Writes report.md, timeline.svg and latency.svg into `dir`.
pub fn write_report(dir: &Path, sc: &Scenario, o: &Outcome) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut s = String::new();
    let _ = writeln!(s, "# testbed drive\n\n{}\n", summary(sc, o));
    let _ = writeln!(
        s,
        "Road: {} RSUs ({}); {} vehicle(s); time compression x{}; workload {} ops/s per vehicle on {} blocks of 4 KiB.\n",
        sc.rsus.len(),
        sc.rsus.iter().map(|(n, d)| format!("{n} {d} m")).collect::<Vec<_>>().join(", "),
        sc.vehicles.len(),
        sc.time_scale,
        sc.ops_per_s,
        sc.blocks
    );
    if !o.deployment.is_empty() {
        let _ = writeln!(s, "Deployment: {}\n", o.deployment.replace('\n', "; "));
    }
    let _ = writeln!(
        s,
        "SMF migration-time estimate after the drive: {:.1} ms fixed + {:.1} MB/s.\n",
        o.learnt_fixed_s * 1e3,
        o.learnt_rate_bytes_per_s / 1e6
    );
    let _ = writeln!(s, "## Operations\n\n| vehicle | kind | ops | errors | p50 ms | p99 ms | max ms | stalls |\n| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    for (vi, (name, _)) in o.tracks.iter().enumerate() {
        for write in [true, false] {
            let sel: Vec<&OpRecord> =
                o.ops.iter().filter(|r| r.vehicle == vi && r.write == write).collect();
            let mut lat: Vec<f64> = sel.iter().map(|r| r.latency_ms).collect();
            lat.sort_by(f64::total_cmp);
            let _ = writeln!(
                s,
                "| {name} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {} |",
                if write { "write" } else { "read" },
                sel.len(),
                sel.iter().filter(|r| !r.ok).count(),
                percentile(&lat, 0.5),
                percentile(&lat, 0.99),
                lat.last().copied().unwrap_or(0.0),
                lat.iter().filter(|l| **l > sc.stall_ms).count()
            );
        }
    }
    let _ = writeln!(s, "\n## Moves\n\nTimes in scenario seconds; SMT measured = wall time x compression.\n\n| vehicle | from | to | kind | planned start | actual start | end | predicted SMT | measured SMT | pause ms | bytes | ok |\n| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |");
    for m in &o.moves {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.3} | {:.3} | {:.2} | {} | {} |",
            m.vehicle,
            m.from_rsu,
            m.to_rsu,
            kind_name(m.kind),
            m.planned_start_s,
            m.actual_start_s,
            m.end_s,
            m.predicted_smt_s,
            m.measured_smt_s,
            m.pause_ms,
            m.bytes,
            if m.ok { "yes".to_string() } else { format!("no: {}", m.error) }
        );
    }
    let _ = writeln!(s, "\n## Plots\n\n![timeline](timeline.svg)\n\n![latency](latency.svg)\n");
    std::fs::write(dir.join("timeline.svg"), timeline_svg(o))?;
    std::fs::write(dir.join("latency.svg"), latency_svg(o))?;
    let path = dir.join("report.md");
    std::fs::write(&path, s)?;
    Ok(path)
}

const COLORS: [&str; 6] = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"];

struct Frame {
    w: f64,
    h: f64,
    x0: f64,
    x1: f64,
    y0: f64,
    y1: f64,
}

impl Frame {
    fn x(&self, v: f64) -> f64 {
        60.0 + (v - self.x0) / (self.x1 - self.x0).max(1e-9) * (self.w - 80.0)
    }
    fn y(&self, v: f64) -> f64 {
        self.h - 40.0 - (v - self.y0) / (self.y1 - self.y0).max(1e-9) * (self.h - 70.0)
    }
    fn open(&self, title: &str, xlabel: &str, ylabel: &str) -> String {
        let mut s = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"11\">\n\
             <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"60\" y=\"18\" font-size=\"14\">{title}</text>\n",
            self.w, self.h
        );
        let (l, r, t, b) = (self.x(self.x0), self.x(self.x1), self.y(self.y1), self.y(self.y0));
        let _ = writeln!(
            s,
            "<rect x=\"{l}\" y=\"{t}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#444\"/>",
            r - l,
            b - t
        );
        for k in 0..=5 {
            let xv = self.x0 + (self.x1 - self.x0) * k as f64 / 5.0;
            let yv = self.y0 + (self.y1 - self.y0) * k as f64 / 5.0;
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{xv:.0}</text>",
                self.x(xv),
                b + 14.0
            );
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{yv:.0}</text>",
                l - 4.0,
                self.y(yv) + 4.0
            );
        }
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{xlabel}</text>",
            (l + r) / 2.0,
            self.h - 8.0
        );
        let _ = writeln!(s, "<text x=\"12\" y=\"{:.1}\" transform=\"rotate(-90 12 {:.1})\" text-anchor=\"middle\">{ylabel}</text>", (t + b) / 2.0, (t + b) / 2.0);
        s
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Vehicle position over scenario time, RSU coverage segments, and every move.
pub fn timeline_svg(o: &Outcome) -> String {
    let t1 = o.tracks.iter().flat_map(|(_, t)| t.iter().map(|p| p.0)).fold(1.0, f64::max);
    let road = o.road.as_ref();
    let y1 = road
        .and_then(|r| r.rsus().last().map(|l| l.position_m + l.coverage_radius_m))
        .unwrap_or(1.0)
        .max(o.tracks.iter().flat_map(|(_, t)| t.iter().map(|p| p.1)).fold(1.0, f64::max));
    let f = Frame { w: 900.0, h: 500.0, x0: 0.0, x1: t1, y0: 0.0, y1 };
    let mut s = f.open(
        "Drive timeline: position, RSU boundaries, moves (x: reactive, o: proactive)",
        "scenario time (s)",
        "position (m)",
    );
    if let Some(road) = road {
        for r in road.rsus() {
            let y = f.y(r.position_m);
            let _ = writeln!(s, "<line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#ccc\" stroke-dasharray=\"4 3\"/><text x=\"{:.1}\" y=\"{:.1}\" fill=\"#888\">{}</text>", f.x(0.0), f.x(t1), f.x(t1) - 40.0, y - 3.0, escape(&r.name));
        }
    }
    for (vi, (name, track)) in o.tracks.iter().enumerate() {
        let c = COLORS[vi % COLORS.len()];
        let pts: Vec<String> =
            track.iter().map(|p| format!("{:.1},{:.1}", f.x(p.0), f.y(p.1))).collect();
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"1.5\" points=\"{}\"/>",
            pts.join(" ")
        );
        let _ = writeln!(
            s,
            "<text x=\"70\" y=\"{}\" fill=\"{c}\">{}</text>",
            40 + 14 * vi,
            escape(name)
        );
        for m in o.moves.iter().filter(|m| &m.vehicle == name) {
            // Position at the move's start, from the track.
            let pos = track
                .iter()
                .min_by(|a, b| {
                    (a.0 - m.actual_start_s).abs().total_cmp(&(b.0 - m.actual_start_s).abs())
                })
                .map_or(0.0, |p| p.1);
            let (x, y) = (f.x(m.actual_start_s), f.y(pos));
            if m.kind == pb::MoveKind::Proactive as i32 {
                let _ = writeln!(
                    s,
                    "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"5\" fill=\"none\" stroke=\"{c}\"/>"
                );
            } else {
                let _ = writeln!(
                    s,
                    "<path d=\"M{} {} l8 8 m0 -8 l-8 8\" stroke=\"{}\"/>",
                    x - 4.0,
                    y - 4.0,
                    if m.ok { c } else { "black" }
                );
            }
        }
    }
    s.push_str("</svg>\n");
    s
}

/// Per-operation latency over scenario time (log scale), move starts as vertical lines.
pub fn latency_svg(o: &Outcome) -> String {
    let t1 = o.ops.iter().map(|r| r.time_s).fold(1.0, f64::max);
    let max_ms = o.ops.iter().map(|r| r.latency_ms).fold(1.0, f64::max);
    let ly = |ms: f64| ms.max(0.01).log10();
    let f = Frame { w: 900.0, h: 400.0, x0: 0.0, x1: t1, y0: -2.0, y1: ly(max_ms).ceil().max(1.0) };
    let mut s = f.open(
        "Operation latency (log10 ms); vertical lines: moves",
        "scenario time (s)",
        "log10 latency (ms)",
    );
    for m in &o.moves {
        let x = f.x(m.actual_start_s);
        let _ = writeln!(
            s,
            "<line x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" stroke=\"#bbb\"/>",
            f.y(f.y0),
            f.y(f.y1)
        );
    }
    for r in &o.ops {
        let c = if r.ok { COLORS[r.vehicle % COLORS.len()] } else { "black" };
        let _ = writeln!(
            s,
            "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"1.2\" fill=\"{c}\"/>",
            f.x(r.time_s),
            f.y(ly(r.latency_ms))
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_write_may_or_may_not_be_what_a_block_holds() {
        let mut e = Expected::default();
        e.acked(3, data_for(0, 3, 1));
        e.failed(3, 2);
        assert!(e.allows(0, 3, Some(&data_for(0, 3, 1))), "the acknowledged write");
        assert!(e.allows(0, 3, Some(&data_for(0, 3, 2))), "the failed one, applied after all");
        assert!(!e.allows(0, 3, Some(&data_for(0, 3, 3))), "a write never made");
        assert!(!e.allows(0, 3, None), "nothing, after a write was acknowledged");
        assert!(!e.allows(0, 3, Some(&data_for(1, 3, 2))), "another vehicle's");
        // A later acknowledged write settles it.
        e.acked(3, data_for(0, 3, 4));
        assert!(!e.allows(0, 3, Some(&data_for(0, 3, 2))));
        // A block whose only write failed: never written, or that write.
        e.failed(5, 6);
        assert!(e.allows(0, 5, None) && e.allows(0, 5, Some(&data_for(0, 5, 6))));
        // Bounded.
        for s in 0..1000 {
            e.failed(7, s);
        }
        assert_eq!(e.unsure[&7].len(), MAX_UNSURE_WRITES_PER_BLOCK);
    }

    #[test]
    fn a_drive_passes_only_when_everything_acknowledged_is_found() {
        let good =
            Outcome { tracks: vec![("car".into(), Vec::new())], checked: 10, ..Default::default() };
        assert_eq!(verdict(&good), Ok(()));
        let cases = [
            (Outcome { lost: 1, ..Default::default() }, "did not read back"),
            (Outcome { unpersisted: 2, ..Default::default() }, "not in the PSS"),
            (Outcome { flush_failures: 1, ..Default::default() }, "final flush failed"),
            (Outcome { diverged: 1, ..Default::default() }, "differed from the PSS"),
            (Outcome { read_mismatches: 1, ..Default::default() }, "other than the last"),
            (Outcome { unchecked_vehicles: vec!["car".into()], ..Default::default() }, "car"),
            (Outcome { unverified: 3, ..Default::default() }, "could not be checked"),
            (Outcome { op_errors: 2, max_op_errors: 1, ..Default::default() }, "2 operations"),
        ];
        for (bad, says) in cases {
            let bad = Outcome { tracks: good.tracks.clone(), ..bad };
            let e = verdict(&bad).unwrap_err();
            assert!(e.contains(says), "{e}");
        }
        assert!(verdict(&Outcome::default()).unwrap_err().contains("no vehicle"));
        // Interrupted before a vehicle's first write: not a failure of the road.
        let cut =
            Outcome { interrupted: true, unchecked_vehicles: vec!["car".into()], ..good.clone() };
        assert_eq!(verdict(&cut), Ok(()));
        let limit = Outcome {
            wall_limit_reached: true,
            unchecked_vehicles: vec!["car".into()],
            ..good.clone()
        };
        assert_eq!(verdict(&limit), Ok(()));
        // Failed operations up to the allowance pass.
        assert_eq!(verdict(&Outcome { op_errors: 2, max_op_errors: 2, ..good.clone() }), Ok(()));
    }
}
