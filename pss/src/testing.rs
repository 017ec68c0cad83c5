//! A real PSS cluster inside the test process: real Raft, real gRPC on loopback
//! sockets, real files under a directory the caller owns. For other crates' tests
//! (the NMS writes back to it) and for this crate's own. [`LocalCluster::start_tls`] runs
//! one over TLS, as a road does, with a CA and certificates made in its directory.

use crate::client::{ClientOptions, PssClient};
use crate::config::{Config, Peer};
use anyhow::Context as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use wayside_proto::pb;
use wayside_proto::pb::pss_admin_client::PssAdminClient;
use wayside_proto::tls::{pki, Tls, TlsFiles};
use wayside_proto::types::Endpoint;

/// How long [`LocalCluster::start`] waits for a leader.
pub const LEADER_TIMEOUT: Duration = Duration::from_secs(20);

struct Slot {
    config: Config,
    addr: SocketAddr,
    shutdown: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

/// N in-process PSS nodes on loopback.
pub struct LocalCluster {
    slots: Vec<Slot>,
    dir: PathBuf,
    /// Set by [`start_tls`](Self::start_tls): the road's PKI.
    tls: Option<ClusterTls>,
}

/// The road PKI of a TLS [`LocalCluster`], made in its directory (`tls/`).
pub struct ClusterTls {
    /// The road's CA: signs the nodes' certificates and the clients'; tests issue more
    /// with it (a new member's, say).
    pub ca: pki::Ca,
    /// What every node serves with (`tls/node/`: one certificate for localhost,
    /// 127.0.0.1 and ::1, shared by the nodes).
    pub node_files: TlsFiles,
    /// A road client's certificate, key and the CA (`tls/client/`): what an NMS or an
    /// operator would hold.
    pub client_files: TlsFiles,
    /// `client_files`, loaded.
    pub client: Tls,
}

impl ClusterTls {
    /// Makes a road CA and a node and a client certificate under `dir`.
    pub fn make(dir: &Path) -> anyhow::Result<Self> {
        let ca = pki::Ca::new("wayside test road").context("making the road CA")?;
        let (names, ips) = pki::loopback();
        let node_files = ca.write_road(&dir.join("node"), &names, &ips)?;
        let client_files =
            ca.write_road(&dir.join("client"), &["road-operator".to_owned()], &[])?;
        let client = Tls::load(&client_files)?.context("client TLS files")?;
        Ok(Self { ca, node_files, client_files, client })
    }
}

/// The configuration tests use: short ticks so elections take ~0.5 s.
pub fn test_config(id: u64, peers: Vec<Peer>, data_dir: PathBuf) -> Config {
    Config {
        id,
        listen: peers.iter().find(|p| p.id == id).map(|p| p.address.clone()).unwrap_or_default(),
        peers,
        data_dir,
        tick_interval_ms: 50,
        election_timeout_ticks: 10,
        heartbeat_interval_ticks: 2,
        ..Config::default()
    }
}

impl LocalCluster {
    /// Starts `nodes` nodes (ids 1..=nodes) with data under `dir`; returns once a
    /// leader is elected.
    pub async fn start(nodes: usize, dir: &Path) -> anyhow::Result<Self> {
        Self::start_with(nodes, dir, |_| {}).await
    }

    /// Like [`start`](Self::start), letting the caller adjust each node's config.
    pub async fn start_with(
        nodes: usize,
        dir: &Path,
        adjust: impl Fn(&mut Config),
    ) -> anyhow::Result<Self> {
        Self::start_inner(nodes, dir, None, adjust).await
    }

    /// Like [`start`](Self::start), over TLS: makes a road PKI under `dir/tls` (see
    /// [`ClusterTls`]), every node serves with it and requires callers' certificates, and
    /// [`client`](Self::client), [`status`](Self::status) and
    /// [`client_tls`](Self::client_tls) use the road client's certificate.
    pub async fn start_tls(nodes: usize, dir: &Path) -> anyhow::Result<Self> {
        Self::start_tls_with(nodes, dir, |_| {}).await
    }

    /// [`start_tls`](Self::start_tls), letting the caller adjust each node's config (after
    /// its `tls` is set).
    pub async fn start_tls_with(
        nodes: usize,
        dir: &Path,
        adjust: impl Fn(&mut Config),
    ) -> anyhow::Result<Self> {
        let tls = ClusterTls::make(&dir.join("tls"))?;
        Self::start_inner(nodes, dir, Some(tls), adjust).await
    }

    async fn start_inner(
        nodes: usize,
        dir: &Path,
        tls: Option<ClusterTls>,
        adjust: impl Fn(&mut Config),
    ) -> anyhow::Result<Self> {
        let mut listeners = Vec::new();
        for _ in 0..nodes {
            listeners.push(tokio::net::TcpListener::bind("127.0.0.1:0").await?);
        }
        let peers: Vec<Peer> = listeners
            .iter()
            .zip(1u64..)
            .map(|(l, id)| Ok(Peer { id, address: l.local_addr()?.to_string() }))
            .collect::<std::io::Result<_>>()?;
        let node_files = tls.as_ref().map(|t| t.node_files.clone()).unwrap_or_default();
        let mut cluster = Self { slots: Vec::new(), dir: dir.to_owned(), tls };
        for (listener, id) in listeners.into_iter().zip(1u64..) {
            let mut config = test_config(id, peers.clone(), dir.join(format!("node-{id}")));
            config.tls = node_files.clone();
            adjust(&mut config);
            let addr = listener.local_addr()?;
            let mut slot = Slot { config, addr, shutdown: CancellationToken::new(), task: None };
            slot.spawn(listener);
            cluster.slots.push(slot);
        }
        cluster.wait_for_leader(LEADER_TIMEOUT).await?;
        Ok(cluster)
    }

    /// The gRPC endpoint of every node, in id order.
    pub fn endpoints(&self) -> Vec<Endpoint> {
        self.slots.iter().filter_map(|s| Endpoint::parse(&s.addr.to_string()).ok()).collect()
    }

    /// The endpoint of node `id`.
    pub fn endpoint(&self, id: u64) -> Option<Endpoint> {
        self.slots
            .iter()
            .find(|s| s.config.id == id)
            .and_then(|s| Endpoint::parse(&s.addr.to_string()).ok())
    }

    /// The directory holding the nodes' data.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A client for the whole cluster (with the road client's certificate if the cluster
    /// runs TLS).
    pub fn client(&self) -> PssClient {
        PssClient::new(self.endpoints(), self.client_options())
    }

    /// The options [`client`](Self::client) uses: the defaults, with
    /// [`client_tls`](Self::client_tls).
    pub fn client_options(&self) -> ClientOptions {
        ClientOptions { tls: self.client_tls(), ..ClientOptions::default() }
    }

    /// What a road client dials this cluster with: `Some` for a cluster started with
    /// [`start_tls`](Self::start_tls) (the CA and a client certificate it signed).
    pub fn client_tls(&self) -> Option<Tls> {
        self.tls.as_ref().map(|t| t.client.clone())
    }

    /// The road PKI of a TLS cluster.
    pub fn tls(&self) -> Option<&ClusterTls> {
        self.tls.as_ref()
    }

    /// A gRPC channel to `ep` as [`client`](Self::client) dials it (TLS when the cluster
    /// has it), connected at the first call.
    pub fn channel(&self, ep: &Endpoint) -> anyhow::Result<tonic::transport::Channel> {
        let e = wayside_proto::client::endpoint(ep, self.client_tls().as_ref())?
            .connect_timeout(Duration::from_millis(500));
        Ok(wayside_proto::client::connect_lazy(&e))
    }

    /// Node `id`'s status, if it answers.
    pub async fn status(&self, id: u64) -> Option<pb::StatusReply> {
        let ep = self.endpoint(id)?;
        let ch = wayside_proto::client::endpoint(&ep, self.client_tls().as_ref())
            .ok()?
            .connect_timeout(Duration::from_millis(500));
        let mut c = PssAdminClient::new(ch.connect().await.ok()?);
        let call = c.status(pb::StatusRequest {});
        tokio::time::timeout(Duration::from_secs(1), call).await.ok()?.ok().map(|r| r.into_inner())
    }

    /// Polls the running nodes until one reports itself leader.
    pub async fn wait_for_leader(&self, timeout: Duration) -> anyhow::Result<u64> {
        let deadline = Instant::now() + timeout;
        loop {
            for s in self.slots.iter().filter(|s| s.task.is_some()) {
                if let Some(st) = self.status(s.config.id).await {
                    if st.role == pb::RaftRole::Leader as i32 {
                        return Ok(st.id);
                    }
                }
            }
            if Instant::now() >= deadline {
                anyhow::bail!("no PSS leader elected within {timeout:?}");
            }
            // Polling a status endpoint with a deadline, not waiting blindly.
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Whether node `id` was started and has since stopped on its own (an error, a panic),
    /// without [`stop_node`](Self::stop_node).
    pub fn node_exited(&self, id: u64) -> bool {
        self.slots
            .iter()
            .find(|s| s.config.id == id)
            .and_then(|s| s.task.as_ref())
            .is_some_and(JoinHandle::is_finished)
    }

    /// Stops node `id` (its data stays); returns the node's exit result.
    pub async fn stop_node(&mut self, id: u64) -> anyhow::Result<()> {
        let slot = self.slots.iter_mut().find(|s| s.config.id == id).context("no such node")?;
        slot.shutdown.cancel();
        match slot.task.take() {
            Some(t) => t.await.context("node task panicked")?,
            None => Ok(()),
        }
    }

    /// Changes node `id`'s configuration for its next [`restart_node`](Self::restart_node).
    pub fn reconfigure(&mut self, id: u64, adjust: impl FnOnce(&mut Config)) -> anyhow::Result<()> {
        let slot = self.slots.iter_mut().find(|s| s.config.id == id).context("no such node")?;
        adjust(&mut slot.config);
        Ok(())
    }

    /// Starts a stopped node again on its old address with its data dir.
    pub async fn restart_node(&mut self, id: u64) -> anyhow::Result<()> {
        let slot = self.slots.iter_mut().find(|s| s.config.id == id).context("no such node")?;
        anyhow::ensure!(slot.task.is_none(), "node {id} is running");
        let listener = tokio::net::TcpListener::bind(slot.addr)
            .await
            .with_context(|| format!("rebinding {}", slot.addr))?;
        slot.shutdown = CancellationToken::new();
        slot.spawn(listener);
        Ok(())
    }

    /// Stops every node and waits for them.
    pub async fn shutdown(mut self) {
        for s in &self.slots {
            s.shutdown.cancel();
        }
        for s in &mut self.slots {
            if let Some(t) = s.task.take() {
                match t.await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(node = s.config.id, error = %e, "node stopped with an error")
                    }
                    Err(e) => tracing::warn!(node = s.config.id, error = %e, "node task panicked"),
                }
            }
        }
    }
}

impl Slot {
    fn spawn(&mut self, listener: tokio::net::TcpListener) {
        let fut = crate::server::run(self.config.clone(), listener, self.shutdown.clone());
        self.task = Some(tokio::spawn(fut));
    }
}

impl Drop for LocalCluster {
    /// A cluster dropped without [`shutdown`](Self::shutdown) still stops its nodes.
    fn drop(&mut self) {
        for s in &self.slots {
            s.shutdown.cancel();
        }
    }
}

/// A one-connection TCP proxy in front of `upstream` that can go silent: after
/// [`SilentProxy::silence`] both its sockets stay open but nothing is read or forwarded any
/// more, as when a peer vanishes without closing (a crashed VM, a cut link, a vehicle out
/// of range). Stops when dropped.
pub struct SilentProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    silent: CancellationToken,
    task: JoinHandle<()>,
}

impl SilentProxy {
    pub async fn start(upstream: SocketAddr) -> std::io::Result<SilentProxy> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let silent = CancellationToken::new();
        let task = tokio::spawn({
            let silent = silent.clone();
            async move {
                let Ok((client, _)) = listener.accept().await else { return };
                let Ok(upstream) = tokio::net::TcpStream::connect(upstream).await else { return };
                let (mut cr, mut cw) = client.into_split();
                let (mut ur, mut uw) = upstream.into_split();
                tokio::select! {
                    _ = async {
                        tokio::join!(
                            tokio::io::copy(&mut cr, &mut uw),
                            tokio::io::copy(&mut ur, &mut cw)
                        )
                    } => {}
                    () = silent.cancelled() => {}
                }
                // Every half stays open and unread (owned by this task) until the proxy
                // is dropped, which aborts it.
                std::future::pending::<()>().await;
            }
        });
        Ok(SilentProxy { addr, silent, task })
    }

    /// From now on nothing is read or forwarded; the sockets stay open.
    pub fn silence(&self) {
        self.silent.cancel();
    }
}

impl Drop for SilentProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
