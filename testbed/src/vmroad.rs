//! A road of RSUs whose NMSs run as the unikernel image (`testbed drive --image`): one host
//! bridge with its own /24, one tap per VM, every VM's NMS listening and advertising on its
//! own tap address, and the PSS on the bridge's host address (the caller starts it there;
//! [`VmRoadNet::pss_bind_ip`] says where, [`BridgePss`] does it for a small cluster).
//!
//! The VMs boot in parallel (under TCG a boot takes 10-25 s here, so serial boots would
//! multiply that), [`VmRoad::start`] returns when every NMS answers its gRPC health check,
//! and [`VmRoad::shutdown`] stops every VM cleanly (the NMS flushes to the PSS and powers
//! off) before removing the taps and the bridge. Dropping a `VmRoad` kills the QEMUs and
//! removes the devices too, so an error or a panic leaves nothing behind.
//!
//! Usage:
//! ```ignore
//! let net = VmRoad::network()?;                          // bridge 10.202.N.1/24
//! let pss = BridgePss::start(net.pss_bind_ip(), 3, &dir).await?;
//! let road = VmRoad::start(net, &names, &pss.endpoints(), None).await?;
//! let nms: Vec<String> = road.addresses();               // "10.202.N.10:7000", ...
//! // ... drive ...
//! road.shutdown().await?;
//! pss.shutdown().await;
//! ```

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;
use wayside_nms::pid1::BootParams;
use wayside_proto::pb::pss_admin_client::PssAdminClient;
use wayside_proto::types::Endpoint;
use wayside_unikernel::image::Image;
use wayside_unikernel::tap::Bridge;
use wayside_unikernel::vm::{self, Accel, Machine, Net, StopOutcome, Vm, VmOptions};

/// The NMS's gRPC port inside every VM (each VM has its own address, so one port serves all).
pub const NMS_PORT: u16 = 7000;

/// Settings of a [`VmRoad`]; every limit with its unit.
#[derive(Debug, Clone)]
pub struct VmRoadOptions {
    /// Guest memory per VM, MiB (the initramfs is unpacked into it; the NMS cache lives in it).
    pub memory_mib: u32,
    /// KVM when the probe shows it works (`Auto`), or forced.
    pub accel: Accel,
    /// How long one VM may take from QEMU start to a SERVING health answer.
    pub boot_timeout: Duration,
    /// How long a clean stop may take before QEMU is told to quit.
    pub stop_grace: Duration,
    /// The `nms` binary put into a freshly built image [default: [`find_nms`]].
    pub nms_bin: Option<PathBuf>,
    /// The unpacked kernel (fetch-kernel cache) for a freshly built image.
    pub kernel_dir: Option<PathBuf>,
    /// The guests' tracing filter (`wayside.log`).
    pub guest_log: Option<String>,
    /// The road's cluster token, which every guest NMS requires (through fw_cfg).
    pub cluster_token: Option<wayside_proto::token::ClusterToken>,
    /// The road's TLS files, which every guest NMS gets (through fw_cfg): it then serves
    /// TLS only and dials the PSS (which must require the road's certificate) over TLS.
    pub tls: Option<wayside_proto::tls::TlsFiles>,
    /// Each QEMU in a process group of its own: a terminal's Ctrl-C then reaches only
    /// this program, which stops the VMs cleanly (their NMSs drain their write-back)
    /// instead of every QEMU quitting at once (`testbed drive --image` sets it; a test's
    /// VMs stay in the test's group, so ending the test run ends them too).
    pub own_group: bool,
}

impl Default for VmRoadOptions {
    fn default() -> Self {
        Self {
            memory_mib: 384,
            accel: Accel::Auto,
            boot_timeout: Duration::from_secs(300),
            stop_grace: Duration::from_secs(30),
            nms_bin: None,
            kernel_dir: None,
            guest_log: None,
            cluster_token: None,
            tls: None,
            own_group: false,
        }
    }
}

/// The `nms` binary: `$WAYSIDE_NMS_BIN`, else `nms` beside this program (or one folder up,
/// for test binaries under `deps/`).
pub fn find_nms() -> anyhow::Result<PathBuf> {
    crate::netns::wayside_binary("nms").map_err(anyhow::Error::msg)
}

/// Builds the NMS image (stripped `/init`, default modules, no baked-in settings) into `out`.
pub fn build_image(nms: &Path, kernel_dir: Option<&Path>, out: &Path) -> anyhow::Result<Image> {
    Ok(crate::bench::image::build(nms, kernel_dir, out)?.0)
}

/// The host side of a VM road before any VM exists: the bridge and its host address.
#[derive(Debug)]
pub struct VmRoadNet {
    bridge: Bridge,
}

impl VmRoadNet {
    /// The address to bind PSS listeners on: the bridge's host address, which every VM
    /// reaches (and nothing off the host does).
    pub fn pss_bind_ip(&self) -> Ipv4Addr {
        self.bridge.host_ip()
    }

    /// The bridge's interface name.
    pub fn bridge_name(&self) -> &str {
        self.bridge.name()
    }

    /// The address the `i`th VM gets (what its certificate must name).
    pub fn guest_ip(&self, i: usize) -> anyhow::Result<Ipv4Addr> {
        Ok(self.bridge.guest_cidr(i)?.addr)
    }
}

struct RoadVm {
    name: String,
    address: String,
    vm: Vm,
}

/// N NMS VMs on taps of one bridge. Fields drop in order: VMs are killed before their taps go.
pub struct VmRoad {
    vms: Vec<RoadVm>,
    net: VmRoadNet,
    stop_grace: Duration,
    /// Holds the built image and the VMs' state folders.
    _work: tempfile::TempDir,
}

impl VmRoad {
    /// Creates the host bridge (a free `10.202.N.0/24`, host at `.1`). Start the PSS on
    /// [`VmRoadNet::pss_bind_ip`], then call [`VmRoad::start`].
    pub fn network() -> anyhow::Result<VmRoadNet> {
        Ok(VmRoadNet {
            bridge: Bridge::create().context("creating the host bridge for the RSU VMs")?,
        })
    }

    /// Boots one NMS VM per name (in parallel), each on its own tap with address
    /// `10.202.N.(10+i)`, node name `names[i]`, PSS endpoints `pss` (which must be on
    /// `net.pss_bind_ip()`), from `image` or a freshly built image when `None`.
    pub async fn start(
        net: VmRoadNet,
        names: &[String],
        pss: &[String],
        image: Option<PathBuf>,
    ) -> anyhow::Result<VmRoad> {
        Self::start_with(net, names, pss, image, &VmRoadOptions::default()).await
    }

    /// [`VmRoad::start`] with explicit options.
    pub async fn start_with(
        net: VmRoadNet,
        names: &[String],
        pss: &[String],
        image: Option<PathBuf>,
        opts: &VmRoadOptions,
    ) -> anyhow::Result<VmRoad> {
        anyhow::ensure!(!names.is_empty(), "a VM road needs at least one RSU name");
        anyhow::ensure!(!pss.is_empty(), "the RSU VMs need PSS endpoints");
        let pss: Vec<Endpoint> = pss
            .iter()
            .map(|p| Endpoint::parse(p).map_err(|e| anyhow::anyhow!("PSS endpoint {p:?}: {e}")))
            .collect::<anyhow::Result<_>>()?;
        let host = net.pss_bind_ip();
        for p in &pss {
            // A PSS on loopback is invisible to the guests: refuse it here, not after a boot.
            let ip = p.authority().rsplit_once(':').map(|(h, _)| h).unwrap_or_default();
            anyhow::ensure!(
                ip == host.to_string(),
                "PSS endpoint {} is not on the bridge address {host}: the VMs cannot reach it",
                p.authority()
            );
        }
        let work = tempfile::Builder::new().prefix("wayside-vmroad").tempdir()?;
        let image = match image {
            Some(dir) => Image::open(&dir, true)?,
            None => {
                let nms = match &opts.nms_bin {
                    Some(p) => p.clone(),
                    None => find_nms()?,
                };
                let (out, kdir) = (work.path().join("image"), opts.kernel_dir.clone());
                tokio::task::spawn_blocking(move || build_image(&nms, kdir.as_deref(), &out))
                    .await??
            }
        };
        // The probe boots a kernel for up to 2 s: once, off the runtime, for every VM.
        let accel = {
            let (a, k) = (opts.accel, image.kernel_path());
            tokio::task::spawn_blocking(move || vm::choose_accel(a, &k)).await?
        };
        let mut road = VmRoad { vms: Vec::new(), net, stop_grace: opts.stop_grace, _work: work };
        let mut launches = Vec::new();
        let own_group = opts.own_group;
        for (i, name) in names.iter().enumerate() {
            let tap = road.net.bridge.add_tap()?;
            let ip = road.net.bridge.guest_cidr(i)?;
            let boot = BootParams {
                ip: Some(ip),
                gateway: Some(host),
                listen: ([0, 0, 0, 0], NMS_PORT).into(),
                pss: pss.clone(),
                node: Some(name.clone()),
                advertise: Some(Endpoint::parse(&format!("{}:{NMS_PORT}", ip.addr))?),
                log: opts.guest_log.clone(),
                ..BootParams::default()
            };
            let vm_opts = VmOptions {
                image: image.clone(),
                state_dir: road._work.path().join(format!("vm-{i}")),
                memory_mib: opts.memory_mib,
                cpus: 1,
                accel,
                machine: Machine::Microvm,
                net: Net::Tap { ifname: tap },
                boot,
                incoming: None,
                cluster_token: opts.cluster_token.clone(),
                tls: opts.tls.clone(),
            };
            launches.push(async move {
                let vm = Vm::launch_with(&vm_opts, false, own_group).await?;
                Ok::<_, vm::VmError>((format!("{}:{NMS_PORT}", ip.addr), vm))
            });
        }
        let started = Instant::now();
        for (r, name) in futures::future::join_all(launches).await.into_iter().zip(names) {
            // A failed launch returns here; the VMs already in `road` die with it on drop.
            let (address, vm) = r.with_context(|| format!("starting the VM of {name}"))?;
            road.vms.push(RoadVm { name: name.clone(), address, vm });
        }
        let limit = opts.boot_timeout;
        let waits = road.vms.iter_mut().map(|v| async move {
            v.vm.wait_serving(limit).await.with_context(|| format!("{} did not serve", v.name))
        });
        for r in futures::future::join_all(waits).await {
            r?;
        }
        tracing::info!(
            vms = road.vms.len(),
            ms = started.elapsed().as_millis() as u64,
            ?accel,
            bridge = road.net.bridge_name(),
            "RSU VMs serving"
        );
        Ok(road)
    }

    /// Every NMS's endpoint (`IP:PORT` on the bridge), in the order of the names given.
    pub fn addresses(&self) -> Vec<String> {
        self.vms.iter().map(|v| v.address.clone()).collect()
    }

    /// The RSU names, in order.
    pub fn names(&self) -> Vec<String> {
        self.vms.iter().map(|v| v.name.clone()).collect()
    }

    /// The host's bridge address (where the PSS listens).
    pub fn pss_bind_ip(&self) -> Ipv4Addr {
        self.net.pss_bind_ip()
    }

    /// The serial console log of VM `i` (for diagnostics).
    pub fn serial_log(&self, i: usize) -> Option<PathBuf> {
        self.vms.get(i).map(|v| v.vm.state.serial_log.clone())
    }

    /// Stops every VM (all at once: NmsAdmin.Shutdown, the NMS flushes to the PSS and powers
    /// off; QMP `quit` after the grace time), then removes the taps and the bridge. Returns
    /// each VM's outcome in order; the devices are removed even when a stop fails.
    pub async fn shutdown(mut self) -> anyhow::Result<Vec<StopOutcome>> {
        let outcomes = self.stop_vms().await;
        drop(self);
        outcomes
    }

    /// Stops every VM as [`VmRoad::shutdown`] does but keeps the bridge and its address, so
    /// a PSS bound to [`VmRoadNet::pss_bind_ip`] can still be stopped cleanly (its nodes
    /// talk to each other over that address); drop the road afterwards.
    pub async fn stop_vms(&mut self) -> anyhow::Result<Vec<StopOutcome>> {
        let grace = self.stop_grace;
        let stops = self.vms.iter_mut().map(|v| async move {
            v.vm.stop(grace, false).await.with_context(|| format!("stopping {}", v.name))
        });
        futures::future::join_all(stops).await.into_iter().collect()
    }
}

/// A small real PSS cluster (raft, gRPC, disk) listening on one host address, e.g. a
/// bridge's [`VmRoadNet::pss_bind_ip`] (`wayside_pss::testing::LocalCluster` binds loopback
/// only, which guests cannot reach). Its leader hints name that address too, so guests
/// can follow them. Stops its nodes on drop.
pub struct BridgePss {
    endpoints: Vec<Endpoint>,
    stop: CancellationToken,
    tasks: tokio::task::JoinSet<anyhow::Result<()>>,
    /// What this side dials the nodes with (the road's certificate), when they run TLS.
    tls: Option<wayside_proto::tls::Tls>,
}

impl BridgePss {
    /// How long [`BridgePss::start`] waits for a leader.
    pub const LEADER_TIMEOUT: Duration = Duration::from_secs(30);

    /// Starts `nodes` nodes on `ip` (ports chosen by the kernel) with data under `dir`, and
    /// returns once one of them is leader.
    pub async fn start(ip: Ipv4Addr, nodes: usize, dir: &Path) -> anyhow::Result<BridgePss> {
        Self::start_with(ip, nodes, dir, None).await
    }

    /// [`BridgePss::start`] over TLS with `tls` (the nodes require the road's certificate
    /// of every caller), or plaintext.
    pub async fn start_with(
        ip: Ipv4Addr,
        nodes: usize,
        dir: &Path,
        tls: Option<&crate::drive::RoadTls>,
    ) -> anyhow::Result<BridgePss> {
        anyhow::ensure!(nodes >= 1, "a PSS needs at least one node");
        let mut listeners = Vec::new();
        for _ in 0..nodes {
            listeners.push(
                tokio::net::TcpListener::bind((ip, 0))
                    .await
                    .with_context(|| format!("binding a PSS listener on {ip}"))?,
            );
        }
        let peers = listeners
            .iter()
            .zip(1u64..)
            .map(|(l, id)| {
                Ok(wayside_pss::config::Peer { id, address: l.local_addr()?.to_string() })
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        let endpoints = peers
            .iter()
            .map(|p| Endpoint::parse(&p.address).map_err(|e| anyhow::anyhow!("{e}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut pss = BridgePss {
            endpoints,
            stop: CancellationToken::new(),
            tasks: tokio::task::JoinSet::new(),
            tls: tls.map(|t| t.node.clone()),
        };
        for (listener, id) in listeners.into_iter().zip(1u64..) {
            let mut config = wayside_pss::testing::test_config(
                id,
                peers.clone(),
                dir.join(format!("node-{id}")),
            );
            config.tls = tls.map(|t| t.files.clone()).unwrap_or_default();
            pss.tasks.spawn(wayside_pss::server::run(config, listener, pss.stop.clone()));
        }
        pss.wait_for_leader().await?;
        Ok(pss)
    }

    async fn wait_for_leader(&self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Self::LEADER_TIMEOUT;
        loop {
            for ep in &self.endpoints {
                let status = async {
                    let e = wayside_proto::client::endpoint(ep, self.tls.as_ref()).ok()?;
                    let mut c = PssAdminClient::new(e.connect().await.ok()?);
                    c.status(wayside_proto::pb::StatusRequest {}).await.ok().map(|r| r.into_inner())
                };
                if let Ok(Some(s)) = tokio::time::timeout(Duration::from_secs(1), status).await {
                    if s.role == wayside_proto::pb::RaftRole::Leader as i32 {
                        return Ok(());
                    }
                }
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "no PSS leader elected within {:?}",
                Self::LEADER_TIMEOUT
            );
            // Polling a status endpoint with a deadline, not waiting blindly.
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The nodes' endpoints (`IP:PORT`), in id order.
    pub fn endpoints(&self) -> Vec<String> {
        self.endpoints.iter().map(|e| e.authority().to_string()).collect()
    }

    /// Stops every node and waits for them.
    pub async fn shutdown(mut self) {
        self.stop.cancel();
        while let Some(r) = self.tasks.join_next().await {
            if let Ok(Err(e)) = r {
                tracing::warn!(error = %e, "a PSS node stopped with an error");
            }
        }
    }
}

impl Drop for BridgePss {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
