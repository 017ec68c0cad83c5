//! The NMS server: the node (cache core + PSS + per-volume write-back tasks) and its gRPC
//! services ([`rpc`]: vehicle API and admin; [`migrate`]: NMS-to-NMS migration).
//!
//! **Architecture invariant:** no fork/exec and no `/proc` here: this runs as PID 1 in the
//! NMS image (`crate::pid1`).

mod locks;
pub mod migrate;
pub mod rpc;
mod wire;

use crate::cache::{Cache, CacheError, Limits, ReadOutcome, VolumeState, WriteOutcome};
use crate::config::Config;
use crate::error::NmsError;
use crate::pool::BlockPool;
use crate::store::{Acquire, PssStore, Store, StoreError, WriteBack};
use anyhow::Context as _;
use bytes::Bytes;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::service::interceptor::InterceptedService;
use tracing::{debug, info, info_span, warn, Instrument as _};
use wayside_proto::token::RequireToken;
use wayside_proto::types::{
    BlockNo, BlockSize, Credential, CredentialHash, Endpoint, Epoch, Lsn, RequestId, VolumeName,
};

/// Most bytes of one request to the vehicle calls that carry no block data (CreateVolume,
/// Attach, Stat, List, Flush, Delete: a name, a credential and a few numbers).
pub const CONTROL_REQUEST_BYTES: usize = 64 * 1024;

/// Runs an NMS on `listener` against the PSS in `config.pss` until `shutdown` fires or
/// an admin Shutdown arrives; then drains write-back (bounded) and returns.
pub async fn run(
    config: Config,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    config.validate().map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    let tls = load_tls(&config)?;
    let endpoints = config
        .pss
        .iter()
        .map(|a| Endpoint::parse(a))
        .collect::<Result<Vec<_>, _>>()
        .context("pss addresses")?;
    let opts = wayside_pss::client::ClientOptions {
        rpc_timeout: Duration::from_millis(config.pss_rpc_timeout_ms),
        deadline: Duration::from_millis(config.pss_deadline_ms),
        max_message_size_bytes: config.pss_max_message_size_bytes,
        // Over TLS, presenting this node's certificate (a PSS requires one).
        tls: tls.clone(),
        ..Default::default()
    };
    let store: Arc<dyn Store> = Arc::new(PssStore::new(endpoints, opts));
    serve_node(config, listener, shutdown, store, tls).await
}

/// [`run`] with a given store (tests use an in-memory one for unit-level checks).
pub async fn run_with_store(
    config: Config,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
    store: Arc<dyn Store>,
) -> anyhow::Result<()> {
    config.validate().map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    let tls = load_tls(&config)?;
    serve_node(config, listener, shutdown, store, tls).await
}

/// The node's `[tls]`, loaded and checked: a node set up for TLS dials the PSS and other
/// NMSs over TLS only, so it needs the road's CA (and `Config::validate` refuses the CA
/// alone: the PSS asks for this node's certificate).
fn load_tls(config: &Config) -> anyhow::Result<Option<wayside_proto::tls::Tls>> {
    let tls = wayside_proto::tls::Tls::load(&config.tls).context("TLS")?;
    if let Some(t) = &tls {
        if !t.has_ca() {
            anyhow::bail!(
                "TLS: tls.ca is needed: an NMS with tls.cert and tls.key dials the PSS and \
                 other NMSs over TLS only, trusting the road's CA"
            );
        }
    }
    Ok(tls)
}

async fn serve_node(
    config: Config,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
    store: Arc<dyn Store>,
    tls: Option<wayside_proto::tls::Tls>,
) -> anyhow::Result<()> {
    wayside_proto::server::raise_open_file_limit(config.max_connections);
    let local = listener.local_addr()?;
    let acceptor = match &tls {
        Some(t) if t.has_identity() => {
            // Vehicles present no certificate; the road's nodes and operators present
            // theirs, which admin and migration calls need.
            Some(t.acceptor(wayside_proto::tls::ClientAuth::Optional).context("TLS")?)
        }
        _ => None,
    };
    let advertise = if config.advertise.is_empty() {
        Endpoint::parse(&local.to_string())?
    } else {
        Endpoint::parse(&config.advertise)?
    };
    // Served over TLS, the node is reached at https:// (what it records in the PSS as the
    // owner address and sends in redirects).
    let advertise = match acceptor {
        Some(_) => advertise.https(),
        None => advertise,
    };
    let node = Node::new(config.clone(), advertise.clone(), store, tls, shutdown.clone());
    let span = info_span!("nms", node = %node.node_id);
    async move {
        info!(listen = %local, advertise = %advertise, tls = acceptor.is_some(), "serving");
        if acceptor.is_none() {
            warn!(
                "no tls.cert/tls.key: vehicles' credentials and data cross the air in \
                 plaintext; set [tls] on every node of a real road"
            );
        }
        if config.cluster_token.is_none() {
            warn!(
                "no cluster_token: admin and migration calls are not authenticated (any client \
                 of this port can move volumes or shut the node down); set one on every NMS, \
                 the SMF and in operators' WAYSIDE_CLUSTER_TOKEN"
            );
        }
        let (reporter, health) = wayside_proto::server::health();
        for s in ["wayside.v1.Nms", "wayside.v1.NmsAdmin", "wayside.v1.Migration", ""] {
            reporter.set_service_status(s, tonic_health::ServingStatus::Serving).await;
        }
        let max = config.max_message_size_bytes;
        let gate = RequireToken::new(node.cfg.cluster_token.clone(), acceptor.is_some());
        let served = {
            let node = node.clone();
            move |incoming| {
                // Every call but the vehicle streams goes to tonic's services
                // (`wire::NmsHttp` serves those by hand).
                let routes = tonic::service::Routes::new(health.clone())
                    .add_service(wayside_proto::server::reflection())
                    // The vehicle calls tonic serves carry no block data (create, attach,
                    // stat, list, flush, delete): a small request limit, so a caller with no
                    // credential cannot make each of a connection's streams buffer a
                    // message of the node's largest size.
                    .add_service(
                        wayside_proto::pb::nms_server::NmsServer::from_arc(node.clone())
                            .max_decoding_message_size(CONTROL_REQUEST_BYTES.min(max))
                            .max_encoding_message_size(max),
                    )
                    // Operators, the SMF and other NMSs only: with the cluster token and,
                    // on TLS, a road certificate.
                    .add_service(InterceptedService::new(
                        wayside_proto::pb::nms_admin_server::NmsAdminServer::from_arc(node.clone())
                            .max_decoding_message_size(max)
                            .max_encoding_message_size(max),
                        gate.clone(),
                    ))
                    .add_service(InterceptedService::new(
                        wayside_proto::pb::migration_server::MigrationServer::from_arc(
                            node.clone(),
                        )
                        .max_decoding_message_size(max)
                        .max_encoding_message_size(max),
                        gate.clone(),
                    ))
                    .prepare();
                let settings = wayside_proto::h2serve::Http2Settings {
                    max_concurrent_streams: node.cfg.max_concurrent_streams,
                    max_header_list_bytes: node.cfg.max_header_list_bytes,
                    keepalive_interval_ms: node.cfg.http2_keepalive_interval_ms,
                    keepalive_timeout_ms: node.cfg.http2_keepalive_timeout_ms,
                    tls_handshake_timeout_ms: node.cfg.tls_handshake_timeout_ms,
                    max_tls_handshakes: node.cfg.max_tls_handshakes,
                    max_tls_handshakes_per_source: node.cfg.max_tls_handshakes_per_source,
                    connection_window_bytes: node.cfg.http2_connection_window_bytes,
                    stream_window_bytes: node.cfg.http2_stream_window_bytes,
                    max_frame_bytes: node.cfg.http2_max_frame_bytes,
                    send_buffer_bytes: node.cfg.http2_send_buffer_bytes,
                    max_held_slices: node.cfg.http2_max_held_slices,
                    max_resets_per_s: node.cfg.http2_max_resets_per_s,
                    shutdown_grace_ms: node.cfg.shutdown_grace_ms,
                };
                wayside_proto::h2serve::serve_http2(
                    incoming,
                    wire::NmsHttp::new(node.clone(), routes),
                    settings,
                    acceptor.clone(),
                    node.stop.clone().cancelled_owned(),
                )
            }
        };
        let server = wayside_proto::server::serve_sharded(
            listener,
            config.serve_threads,
            wayside_proto::server::ConnectionLimit::with_per_source(
                config.max_connections,
                config.max_connections_per_source,
            ),
            node.stop.clone().cancelled_owned(),
            served,
        );
        let stages = {
            let node = node.clone();
            async move {
                shutdown.cancelled().await;
                for s in ["wayside.v1.Nms", "wayside.v1.NmsAdmin", "wayside.v1.Migration", ""] {
                    reporter.set_service_status(s, tonic_health::ServingStatus::NotServing).await;
                }
                // What is accepted from here on is what the drain below writes back: a
                // write after it would be answered accepted and then end with the process.
                node.core().close_writes();
                let deadline = Duration::from_millis(node.cfg.shutdown_flush_timeout_ms);
                match tokio::time::timeout(deadline, node.flush_all()).await {
                    Ok(()) => info!("shutdown: write-back drained"),
                    Err(_) => warn!(?deadline, "shutdown: write-back not drained in time"),
                }
                node.stop.cancel();
            }
        };
        let (served, ()) = tokio::join!(server, stages);
        node.stop.cancel();
        node.tracker.close();
        if tokio::time::timeout(Duration::from_secs(5), node.tracker.wait()).await.is_err() {
            warn!("shutdown: background tasks did not stop in 5 s");
        }
        served.context("gRPC server")?;
        info!("stopped");
        Ok(())
    }
    .instrument(span)
    .await
}

/// A credential as a caller presented it, hashed at most once however many operations it
/// covers: a stream's one credential covers all its operations, and a sha256 per
/// operation was most of the cost of checking it.
#[derive(Clone)]
pub(crate) struct Presented {
    credential: Credential,
    hash: std::sync::OnceLock<CredentialHash>,
    /// The session of this node the vehicle attached to (checked by `rpc::volume_auth`),
    /// or 0: a caller that never attached.
    session: u64,
    /// The copy of the volume it attached to (checked by `Node::check_local`), or 0.
    incarnation: u32,
}

impl Presented {
    pub(crate) fn new(credential: Credential) -> Self {
        Self::attached(credential, 0, 0)
    }

    pub(crate) fn attached(credential: Credential, session: u64, incarnation: u32) -> Self {
        Self { credential, hash: std::sync::OnceLock::new(), session, incarnation }
    }

    pub(crate) fn hash(&self) -> CredentialHash {
        *self.hash.get_or_init(|| self.credential.hash())
    }

    /// Whether the call may be answered by copy `vol` of the volume: the credential
    /// matches and, for a vehicle that attached, it is the copy it attached to (else the
    /// slow path tells it to attach again, see [`Node::check_local`]).
    pub(crate) fn admits(&self, vol: &crate::cache::Volume) -> bool {
        self.matches(&vol.credential) && self.attached_to(vol)
    }

    /// Whether `vol` is the copy the vehicle attached to (always, for a caller that never
    /// attached).
    fn attached_to(&self, vol: &crate::cache::Volume) -> bool {
        self.incarnation == 0 || self.incarnation == vol.incarnation()
    }

    /// Whether this is the credential `stored` is the hash of (constant time).
    pub(crate) fn matches(&self, stored: &CredentialHash) -> bool {
        let h = self.hash();
        stored.0.iter().zip(h.0.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

/// The copy of a volume a vehicle attached to was replaced (dropped and loaded anew).
fn replaced(v: &VolumeName) -> NmsError {
    NmsError::NotOwner {
        volume: v.to_string(),
        why: "the copy of the volume the vehicle attached to was replaced here since: attach \
              again"
            .into(),
        owner_address: String::new(),
        epoch: Epoch(0),
    }
}

/// Whether the copy of `v` here, if any, is the one `cred`'s vehicle attached to, checked
/// under the lock the operation runs under: `Node::ensure` checked it under another, and
/// the copy may have been replaced in between (answered by the new copy, a flush would
/// hand the vehicle a watermark of another lineage, and a read miss its own writes).
/// A copy moved away since (a redirect marker now) sends the vehicle on to where it went:
/// answered "replaced" (no address), the vehicle attached here again and this node took the
/// volume back from the move's target.
fn same_copy(core: &Cache, v: &VolumeName, cred: &Presented) -> Result<(), NmsError> {
    match core.volume(v) {
        Some(x) => is_attached_copy(x, v, cred),
        None => Ok(()),
    }
}

/// Whether `x`, the copy of `v` here, is the one `cred`'s vehicle attached to (see
/// [`same_copy`]).
pub(super) fn is_attached_copy(
    x: &crate::cache::Volume,
    v: &VolumeName,
    cred: &Presented,
) -> Result<(), NmsError> {
    match &x.state {
        VolumeState::Moved { to, epoch } => Err(NmsError::Moved { to: to.clone(), epoch: *epoch }),
        _ if !cred.attached_to(x) => Err(replaced(v)),
        _ => Ok(()),
    }
}

/// A load counted in `Node::loads_in_flight` until it ends (installed or failed).
struct LoadSlot<'a>(&'a Node);

impl Drop for LoadSlot<'_> {
    fn drop(&mut self) {
        // (Not `core()`: dropped while unwinding from a panic that poisoned the cache lock,
        // a second panic here would abort the process.)
        let _core = self.0.core.lock().unwrap_or_else(|p| p.into_inner());
        self.0.loads_in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Per-volume async machinery around the pure core.
pub(crate) struct Handle {
    kick: Notify,
    flush: Notify,
    cancel: CancellationToken,
    migrating: AtomicBool,
    /// Set by a migration about to switch: the writer starts no new batch.
    held: AtomicBool,
    /// A write-back batch is on its way to the PSS (set before `held` is checked).
    in_flight: AtomicBool,
    /// Told whenever `in_flight` is cleared: what [`Node::hold_writeback`] waits on (not
    /// the node-wide progress, which would wake every flush and write waiting on the
    /// held volume to hurry the writer again, round and round while the hold lasts).
    idle: Notify,
    /// Why the PSS refused the last write-back batch, when it refused it for a reason
    /// retrying alone will not fix (full, the volume gone); cleared when a batch lands.
    /// The writer goes on retrying (nothing accepted is dropped); a flush says why it
    /// cannot finish instead of waiting out its deadline.
    refused: Mutex<Option<String>>,
}

/// A volume's write-back held by [`Node::hold_writeback`]; dropping it lets the writer go
/// on at once (what was written meanwhile is not left for the write-back delay).
pub(crate) struct WritebackHold {
    h: Arc<Handle>,
}

impl Drop for WritebackHold {
    fn drop(&mut self) {
        self.h.held.store(false, Ordering::SeqCst);
        self.h.kick.notify_one();
        self.h.flush.notify_one();
    }
}

/// One NMS: the cache core, the PSS and the tasks around them.
pub struct Node {
    pub(crate) cfg: Config,
    pub(crate) node_id: String,
    pub(crate) advertise: Endpoint,
    pub(crate) store: Arc<dyn Store>,
    /// This node's TLS set-up (`[tls]`): every NMS it dials (a move's target) is dialled
    /// over TLS with it, whatever scheme its address was given with; `None`: plaintext.
    pub(crate) tls: Option<wayside_proto::tls::Tls>,
    core: Mutex<Cache>,
    /// Buffers for blocks arriving by migration (the cache's own writes use it too).
    pub(crate) pool: BlockPool,
    handles: Mutex<HashMap<VolumeName, Arc<Handle>>>,
    /// Bumped on every write-back completion and volume state change; waiters re-check.
    progress: watch::Sender<u64>,
    /// Per volume: held by a load from its check to `install`, and by a move's `Begin`
    /// from its check to the Incoming copy's insertion.
    load_locks: locks::VolumeLocks,
    /// Loads past their `max_volumes` check and not yet installed (or failed): counted
    /// against `max_volumes` with the volumes here, as loads of different volumes run
    /// concurrently. Changed only under the cache lock.
    loads_in_flight: std::sync::atomic::AtomicUsize,
    /// One permit per load a block call started in the background (`max_background_loads`).
    background_loads: Arc<tokio::sync::Semaphore>,
    pub(crate) tracker: TaskTracker,
    /// The runtime `run` was called on: background work (write-back, migrations) runs
    /// there, on all its workers, while each connection's I/O and requests stay on its
    /// serving thread (a migration's bulk stream on one serving thread ran at half speed).
    runtime: tokio::runtime::Handle,
    /// Cancels the server, the write-back tasks and migrations (last shutdown stage).
    pub(crate) stop: CancellationToken,
    /// The caller's shutdown signal (an admin Shutdown fires it too).
    pub(crate) shutdown: CancellationToken,
    started: Instant,
    /// This process's session (random, never 0), sent to vehicles in `VolumeInfo`: a call
    /// carrying another one was attached to an earlier life of this node (see
    /// `rpc::volume_auth`).
    pub(crate) session: u64,
    client_id: String,
    seq: AtomicU64,
    /// Write-back batches the PSS accepted, and the block changes in them (NodeStatus).
    pub(crate) wb_batches: AtomicU64,
    pub(crate) wb_blocks: AtomicU64,
    /// Read-through calls to the PSS, and the blocks asked for in them (NodeStatus).
    pub(crate) pss_reads: AtomicU64,
    pub(crate) pss_read_blocks: AtomicU64,
    /// Read operations answered, by any API (NodeStatus).
    pub(crate) reads: AtomicU64,
    /// Vehicle block calls (Read, Write, Stream, StreamBatches) answered with an error
    /// status since start (`NodeStatusReply.calls_failed`).
    pub(crate) calls_failed: AtomicU64,
    /// Idle volumes unloaded to make room under `max_volumes` (NodeStatus).
    pub(crate) volumes_unloaded: AtomicU64,
    /// The copies unloaded as idle (newest last, at most `max_moved_markers`): a volume
    /// loaded again names the copy it was unloaded from as its predecessor, through the
    /// lsn persisted then, so its vehicle's journal replays none of what that copy held
    /// (all of it in the PSS); only when no other copy owned the volume in between.
    unloaded: Mutex<VecDeque<Unloaded>>,
    me: std::sync::Weak<Node>,
}

impl Drop for Node {
    /// The node's block buffers go back to the system (blocks still referenced, such as
    /// a reply in flight, are freed when they drop).
    fn drop(&mut self) {
        self.pool.close();
    }
}

/// Ends the process at once (SIGABRT, or the VM's power-off as process 1; no unwinding, no
/// shutdown stages): `what`, a panic
/// where it happened, left the cache, or a volume's write-back, in a state nothing can
/// trust. Served on, every call would fail with a reset while health says SERVING and
/// dirty blocks would never persist (or be written back inconsistent); stopped, the
/// vehicles attach to another NMS and replay their journals, which hold every write not
/// yet persisted.
#[cold]
pub(crate) fn fail_stop(what: &str) -> ! {
    tracing::error!(
        what,
        "stopping this NMS: vehicles attach to another NMS and replay what was not persisted"
    );
    // (Also on stderr, whatever the log setup: the last word of a process ending now.)
    eprintln!("wayside-nms: fail-stop: {what}");
    if std::process::id() == 1 {
        // Process 1 of a VM image: SIGABRT would be ignored, and its exit panic the kernel.
        crate::pid1::power_off();
    }
    std::process::abort()
}

/// `m`'s guard; [`fail_stop`] when a panic poisoned it.
fn lock_or_fail_stop<'a, T>(m: &'a Mutex<T>, what: &str) -> MutexGuard<'a, T> {
    m.lock().unwrap_or_else(|_| fail_stop(what))
}

/// Who loads a volume ([`Node::load`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LoadFor {
    /// A block call naming a volume not cached here.
    Call,
    /// A vehicle's Attach or CreateVolume: a copy here must still be the volume's (asked of
    /// the PSS); a redirect marker (the volume moved on from here) is answered Moved unless
    /// `take_over` (the vehicle could not reach the volume where it went): then the volume
    /// is loaded anew here, fencing wherever it went.
    Attach { take_over: bool },
}

/// A copy of a volume unloaded as idle (see `Node::unload_idle`).
struct Unloaded {
    volume: VolumeName,
    /// Its owner epoch: a copy loaded later at the next epoch follows it directly.
    epoch: Epoch,
    copy: crate::cache::Predecessor,
    /// The copies it continued (`Volume::lineage`): the next copy's ancestors.
    lineage: Vec<crate::cache::Predecessor>,
}

/// A copy in a line of copies, on the wire.
pub(crate) fn copy_ref(p: &crate::cache::Predecessor) -> wayside_proto::pb::CopyRef {
    wayside_proto::pb::CopyRef {
        session: p.session,
        incarnation: p.incarnation,
        through_lsn: p.through.0,
    }
}

/// A copy in a line of copies, from the wire.
pub(crate) fn predecessor_of(c: &wayside_proto::pb::CopyRef) -> crate::cache::Predecessor {
    crate::cache::Predecessor {
        session: c.session,
        incarnation: c.incarnation,
        through: Lsn(c.through_lsn),
    }
}

impl Node {
    fn new(
        cfg: Config,
        advertise: Endpoint,
        store: Arc<dyn Store>,
        tls: Option<wayside_proto::tls::Tls>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let limits = Limits {
            cache_capacity_bytes: cfg.cache_capacity_bytes,
            dirty_limit_bytes: cfg.dirty_limit_bytes,
            dirty_limit_bytes_per_volume: cfg.dirty_limit_bytes_per_volume,
            writeback_start_dirty_bytes: cfg.writeback_start_dirty_bytes,
            writeback_start_dirty_bytes_per_volume: cfg.writeback_start_dirty_bytes_per_volume,
            dedupe_entries_per_volume: cfg.dedupe_entries_per_volume,
            max_batch_ops: cfg.max_batch_ops,
            max_batch_bytes: cfg.max_batch_bytes,
            max_tracked_fetches_per_volume: cfg.max_tracked_fetches_per_volume,
            max_moved_markers: cfg.max_moved_markers,
            volume_ops_per_s: cfg.max_volume_ops_per_s,
            volume_ops_burst: cfg.volume_ops_burst,
            max_changed_blocks_per_move: cfg.migration_max_changed_blocks,
        };
        let pool = BlockPool::new(cfg.block_pool_bytes.min(cfg.cache_capacity_bytes));
        // Faulted in off the serving threads; blocks use the heap until slots are ready.
        pool.fill();
        // A fresh client id per process start: the PSS dedupes by request id, and a
        // restarted node must not collide with its previous life's sequence numbers.
        let mut id: String = cfg.node_id.chars().take(40).collect();
        id.push_str(&format!(".{:016x}", rand::random::<u64>()));
        let background_loads = Arc::new(tokio::sync::Semaphore::new(cfg.max_background_loads));
        Arc::new_cyclic(|me| Self {
            me: me.clone(),
            background_loads,
            node_id: cfg.node_id.clone(),
            cfg,
            advertise,
            store,
            tls,
            core: Mutex::new(Cache::with_pool(limits, pool)),
            pool,
            handles: Mutex::new(HashMap::new()),
            progress: watch::channel(0).0,
            load_locks: locks::VolumeLocks::default(),
            loads_in_flight: std::sync::atomic::AtomicUsize::new(0),
            tracker: TaskTracker::new(),
            runtime: tokio::runtime::Handle::current(),
            stop: CancellationToken::new(),
            shutdown,
            started: Instant::now(),
            session: rand::random::<u64>().max(1),
            client_id: id,
            seq: AtomicU64::new(1),
            wb_batches: AtomicU64::new(0),
            wb_blocks: AtomicU64::new(0),
            pss_reads: AtomicU64::new(0),
            pss_read_blocks: AtomicU64::new(0),
            reads: AtomicU64::new(0),
            calls_failed: AtomicU64::new(0),
            volumes_unloaded: AtomicU64::new(0),
            unloaded: Mutex::new(VecDeque::new()),
        })
    }

    pub(crate) fn core(&self) -> MutexGuard<'_, Cache> {
        lock_or_fail_stop(&self.core, "a panic while the cache lock was held")
    }

    pub(crate) fn bump(&self) {
        self.progress.send_modify(|g| *g = g.wrapping_add(1));
    }

    pub(crate) fn next_request_id(&self) -> RequestId {
        RequestId::new(self.client_id.clone(), self.seq.fetch_add(1, Ordering::Relaxed))
            .expect("node client id is 1..=64 bytes and seq > 0")
    }

    /// A request making this node the owner of `volume` (from `expected_epoch` when given).
    pub(crate) fn acquire_request(
        &self,
        volume: &VolumeName,
        expected_epoch: Option<Epoch>,
        create: Option<(BlockSize, wayside_proto::types::CredentialHash)>,
    ) -> Acquire {
        Acquire {
            volume: volume.clone(),
            owner_node: self.node_id.clone(),
            owner_address: self.advertise.uri().to_owned(),
            owner_session: self.session,
            expected_epoch,
            create,
            request_id: self.next_request_id(),
        }
    }

    fn handle(&self, v: &VolumeName) -> Option<Arc<Handle>> {
        self.handles.lock().expect("poisoned").get(v).cloned()
    }

    /// Why the PSS refuses `v`'s write-back for now, if it does (see `Handle::refused`).
    pub(crate) fn writeback_refused(&self, v: &VolumeName) -> Option<String> {
        self.handle(v).and_then(|h| h.refused.lock().expect("poisoned").clone())
    }

    /// Checks the credential and that the volume is served here, loading it from the PSS
    /// (and taking ownership) when it is not cached yet.
    /// A vehicle that attached here (its session) and finds the volume gone (its marker
    /// dropped, `max_moved_markers`) is told to attach again rather than the volume being
    /// loaded behind its back: its attach replays what it wrote, and finds the new owner.
    pub(crate) async fn ensure(&self, v: &VolumeName, cred: &Presented) -> Result<(), NmsError> {
        if self.check_local(v, cred)? {
            return Ok(());
        }
        if cred.session != 0 {
            // Point the vehicle at the owner the PSS names (it continues the lineage the
            // vehicle knows, so its replay is answered as duplicates), else at nobody: it
            // attaches again, here or elsewhere, and replays its journal.
            let owner = match self.store.get_volume(v.clone()).await {
                Ok(m) if cred.matches(&m.credential) && m.owner_node != self.node_id => {
                    Some((m.owner_address, m.epoch))
                }
                _ => None,
            };
            let (owner_address, epoch) = owner.unwrap_or_default();
            return Err(NmsError::NotOwner {
                volume: v.to_string(),
                why: "it is no longer served here: attach again".into(),
                owner_address,
                epoch,
            });
        }
        // In a task of its own: a caller that stops being polled (a stream whose vehicle
        // stopped reading its replies, its task waiting to send) must not keep the
        // volume's load lock, and with it every other attach of the volume here, waiting.
        // It goes on after its caller gives up: `max_background_loads` at most.
        let slot = self.background_loads.clone().acquire_owned().await;
        let slot = slot.map_err(|_| NmsError::Unavailable("the node is stopping".into()))?;
        let (node, v, cred) = (self.self_arc(), v.clone(), cred.clone());
        self.spawn_background(async move {
            let _slot = slot;
            node.load(&v, &cred, None, LoadFor::Call).await
        })
        .await
        .map_err(|e| NmsError::Unavailable(format!("loading the volume: {e}")))?
    }

    /// Whether the active copy of `v` here is still the volume's (`Ok(false)`: it was
    /// dropped, load it anew). A copy whose epoch another NMS raised past (the vehicle
    /// attached there meanwhile, or a move taken back from here after this node switched)
    /// may hold nothing to write back, so no fenced write-back ever told it: served, it
    /// would answer with blocks older than what the vehicle wrote there. Other vehicles
    /// attached to the dropped copy are told to attach again at their next call (their
    /// `VolumeAuth.volume_incarnation`) and replay what it held of theirs. With the PSS
    /// not answering within `pss_rpc_timeout_ms` the copy is served (a stale one's
    /// write-back is fenced).
    async fn still_owner(&self, v: &VolumeName) -> Result<bool, NmsError> {
        let here = self.core().volume(v).and_then(|x| {
            matches!(x.state, VolumeState::Active).then(|| (x.epoch, x.incarnation()))
        });
        // Paused, or a move out under way (its target may own the volume from its Claim
        // on): the move decides.
        let Some((epoch, incarnation)) = here else { return Ok(true) };
        if self.handle(v).is_some_and(|h| h.migrating.load(Ordering::Acquire)) {
            return Ok(true);
        }
        let limit = Duration::from_millis(self.cfg.pss_rpc_timeout_ms);
        match tokio::time::timeout(limit, self.store.get_volume(v.clone())).await {
            Ok(Ok(m)) if self.is_mine(&m) => {
                self.adopt_epoch(v, incarnation, m.epoch);
                Ok(true)
            }
            Ok(Ok(m)) if m.epoch > epoch => {
                warn!(
                    volume = %v,
                    epoch = epoch.0,
                    owner = %m.owner_node,
                    owner_epoch = m.epoch.0,
                    "the copy here is stale (another NMS took the volume over); loading it anew"
                );
                self.drop_copy(v, incarnation);
                Ok(false)
            }
            _ => Ok(true),
        }
    }

    /// `Ok(true)`: cached and served; `Ok(false)`: not here, load it.
    fn check_local(&self, v: &VolumeName, cred: &Presented) -> Result<bool, NmsError> {
        let core = self.core();
        let Some(vol) = core.volume(v) else { return Ok(false) };
        if !cred.matches(&vol.credential) {
            return Err(NmsError::Unauthenticated { volume: v.to_string() });
        }
        match &vol.state {
            VolumeState::Active | VolumeState::Paused if !cred.attached_to(vol) => Err(replaced(v)),
            VolumeState::Active | VolumeState::Paused => Ok(true),
            VolumeState::Moved { to, epoch } => {
                Err(NmsError::Moved { to: to.clone(), epoch: *epoch })
            }
            VolumeState::Incoming { .. } => Err(NmsError::NotOwner {
                volume: v.to_string(),
                why: "it is arriving by migration".into(),
                owner_address: String::new(),
                epoch: vol.epoch,
            }),
        }
    }

    /// Loads a volume from the PSS and takes ownership (creating it with `create`), for
    /// `by` (see [`LoadFor`]).
    pub(crate) async fn load(
        &self,
        v: &VolumeName,
        cred: &Presented,
        create: Option<BlockSize>,
        by: LoadFor,
    ) -> Result<(), NmsError> {
        let (explicit, take_over) = match by {
            LoadFor::Call => (false, false),
            LoadFor::Attach { take_over } => (true, take_over),
        };
        if self.shutdown.is_cancelled() {
            // It takes no writes any more: a vehicle attaching here (or loading a volume,
            // fencing the NMS that serves it) would only be sent on again.
            return Err(NmsError::Unavailable(
                "this NMS is shutting down: attach to another one".into(),
            ));
        }
        let _g = self.load_locks.lock(v).await;
        let local = match self.check_local(v, cred) {
            // A vehicle attaching explicitly: the copy here must still be the volume's.
            // (In use from now: not unloaded as idle while the PSS is asked.)
            Ok(true) if explicit => {
                self.core().touch(v);
                self.still_owner(v).await
            }
            r => r,
        };
        match local {
            Ok(true) => {
                if let Some(bs) = create {
                    let have = self.core().volume(v).map(|x| x.block_size);
                    if have != Some(bs) {
                        return Err(NmsError::Exists {
                            volume: v.to_string(),
                            why: format!("its block size is {}", have.map_or(0, |b| b.bytes())),
                        });
                    }
                }
                return Ok(());
            }
            Ok(false) => {}
            // A redirect marker: the vehicle is sent on where the volume went, unless it
            // asks to take the volume over (it could not reach it there).
            Err(NmsError::Moved { .. }) if take_over => {}
            Err(e) => return Err(e),
        }
        let hash = cred.hash();
        let existing = match self.store.get_volume(v.clone()).await {
            Ok(m) => Some(m),
            Err(StoreError::NotFound(_)) => None,
            Err(e) => return Err(e.into()),
        };
        if let Some(m) = &existing {
            if !cred.matches(&m.credential) {
                return Err(NmsError::Unauthenticated { volume: v.to_string() });
            }
            if let Some(bs) = create {
                if bs != m.block_size {
                    return Err(NmsError::Exists {
                        volume: v.to_string(),
                        why: format!("its block size is {}", m.block_size.bytes()),
                    });
                }
            }
        } else if create.is_none() {
            return Err(NmsError::NotFound(v.to_string()));
        }
        // A block that cannot fit under the volume's dirty limit could never be written.
        if let Some(bs) = existing.as_ref().map(|m| m.block_size).or(create) {
            let entry = u64::from(bs.bytes()) + crate::cache::ENTRY_OVERHEAD_BYTES;
            if entry > self.cfg.dirty_limit_bytes_per_volume {
                return Err(NmsError::Limit {
                    limit: "dirty_limit_bytes_per_volume".into(),
                    unit: format!("bytes (one {}-byte block and its entry)", bs.bytes()),
                    value: entry,
                    max: self.cfg.dirty_limit_bytes_per_volume,
                });
            }
        }
        let _slot = {
            let mut core = self.core();
            self.volume_room(&mut core, true)?;
            self.loads_in_flight.fetch_add(1, Ordering::SeqCst);
            LoadSlot(self)
        };
        let acquired = self
            .store
            .acquire(self.acquire_request(
                v,
                existing.as_ref().map(|m| m.epoch),
                match (&existing, create) {
                    (None, Some(bs)) => Some((bs, hash)),
                    _ => None,
                },
            ))
            .await;
        let meta = match acquired {
            Ok(m) => m,
            // Created by another caller between the look and the acquire, with another
            // credential or block size: the PSS changed nothing (its owner keeps its
            // epoch); refused as if the volume had been found by the look.
            Err(StoreError::Exists(why)) => {
                warn!(volume = %v, %why, "a volume created meanwhile by another caller");
                let why = match self.store.get_volume(v.clone()).await {
                    Ok(m) if !cred.matches(&m.credential) => {
                        return Err(NmsError::Unauthenticated { volume: v.to_string() });
                    }
                    Ok(m) => format!("its block size is {}", m.block_size.bytes()),
                    Err(_) => "another caller created it meanwhile".to_owned(),
                };
                return Err(NmsError::Exists { volume: v.to_string(), why });
            }
            Err(e) => return Err(e.into()),
        };
        info!(volume = %v, epoch = meta.epoch.0, persisted = meta.persisted.0, "volume acquired");
        self.install(
            v,
            meta.block_size,
            meta.epoch,
            meta.credential,
            meta.persisted,
            meta.block_count,
        )
    }

    /// Whether one more volume fits under `max_volumes`: the volumes served or arriving
    /// here, and the loads under way (call under the cache lock). At the limit, with
    /// `unload`, the longest idle volume past `volume_idle_unload_ms` with nothing to
    /// write back is unloaded to make room, if there is one.
    pub(crate) fn volume_room(&self, core: &mut Cache, unload: bool) -> Result<(), NmsError> {
        let here = core.volumes().filter(|x| !matches!(x.state, VolumeState::Moved { .. })).count();
        let mut n = here + self.loads_in_flight.load(Ordering::SeqCst);
        // (One unloaded makes room only when exactly at the limit.)
        if unload && n == self.cfg.max_volumes && self.unload_idle(core) {
            n -= 1;
        }
        if n >= self.cfg.max_volumes {
            return Err(NmsError::Limit {
                limit: "max_volumes".into(),
                unit: "volumes".into(),
                value: n as u64,
                max: self.cfg.max_volumes as u64,
            });
        }
        Ok(())
    }

    /// Unloads the longest idle volume past `volume_idle_unload_ms` whose copy here holds
    /// nothing the PSS lacks and that no move or write-back is working on (call under the
    /// cache lock). Its vehicle's next call is told to attach again (the copy's
    /// incarnation is gone) and loads it anew. Returns whether one was unloaded.
    fn unload_idle(&self, core: &mut Cache) -> bool {
        if self.cfg.volume_idle_unload_ms == 0 {
            return false;
        }
        let idle = Duration::from_millis(self.cfg.volume_idle_unload_ms);
        for (v, incarnation) in core.idle_clean(idle) {
            let busy = self.handle(&v).is_some_and(|h| {
                h.migrating.load(Ordering::SeqCst)
                    || h.held.load(Ordering::SeqCst)
                    || h.in_flight.load(Ordering::SeqCst)
            });
            if busy {
                continue;
            }
            if let Some(x) = core.volume(&v) {
                let copy = crate::cache::Predecessor {
                    session: self.session,
                    incarnation,
                    through: x.persisted,
                };
                let mut u = self.unloaded.lock().expect("poisoned");
                u.retain(|m| m.volume != v);
                let lineage = x.lineage();
                u.push_back(Unloaded { volume: v.clone(), epoch: x.epoch, copy, lineage });
                while u.len() > self.cfg.max_moved_markers {
                    u.pop_front();
                }
            }
            // Its blocks are freed off the lock (and off the async workers).
            if let Some(old) = core.unload(&v) {
                self.runtime.spawn_blocking(move || drop(old));
            }
            self.stop_writer(&v);
            self.volumes_unloaded.fetch_add(1, Ordering::Relaxed);
            info!(
                volume = %v,
                incarnation,
                max_volumes = self.cfg.max_volumes,
                idle_ms = self.cfg.volume_idle_unload_ms,
                "unloaded an idle volume (everything it accepted is persisted) to make room"
            );
            return true;
        }
        false
    }

    /// Installs an owned, active volume and starts its write-back task. Never replaces a
    /// volume arriving by migration (re-checked under the cache lock; a move's Begin takes
    /// the volume's lock in `load_locks` too, so a load never meets one here): NotOwner.
    pub(crate) fn install(
        &self,
        v: &VolumeName,
        bs: BlockSize,
        epoch: Epoch,
        cred: wayside_proto::types::CredentialHash,
        persisted: Lsn,
        stored_blocks: u64,
    ) -> Result<(), NmsError> {
        {
            let mut core = self.core();
            if let Err(e) = core.insert_owned(v.clone(), bs, epoch, cred, persisted) {
                warn!(volume = %v, error = %e, "a load met a volume arriving by migration");
                return Err(NmsError::NotOwner {
                    volume: v.to_string(),
                    why: "it is arriving by migration".into(),
                    owner_address: String::new(),
                    epoch,
                });
            }
            let unloaded = {
                let mut u = self.unloaded.lock().expect("poisoned");
                let at = u.iter().position(|m| m.volume == *v);
                at.and_then(|i| u.remove(i))
            };
            if let Some(x) = core.volume_mut(v) {
                x.stored_blocks = stored_blocks;
                // Everything the unloaded copy accepted is in the PSS, so in this one;
                // unless another copy owned the volume in between (this one's epoch is
                // not the next after the unloaded copy's): it may have applied older
                // writes of the vehicle's journal over newer ones the unloaded copy had
                // persisted, which the vehicle must then replay.
                let follows = unloaded.filter(|m| {
                    m.epoch.0.checked_add(1) == Some(epoch.0) && m.copy.through <= persisted
                });
                (x.predecessor, x.ancestors) =
                    follows.map_or((None, Vec::new()), |m| (Some(m.copy), m.lineage));
            }
        }
        self.start_writer(v);
        // A write taken between the install and the writer's start kicked no writer:
        // kicked now (with nothing dirty the writer finds nothing to do).
        self.kick(v);
        self.bump();
        Ok(())
    }

    /// Starts (or restarts) the write-back task of a volume, bound to the volume's
    /// current incarnation ([`crate::cache::Volume::incarnation`]): once the volume is
    /// replaced, that task takes no batch of the new one and its late completions change
    /// nothing.
    pub(crate) fn start_writer(&self, v: &VolumeName) {
        let h = Arc::new(Handle {
            kick: Notify::new(),
            flush: Notify::new(),
            cancel: self.stop.child_token(),
            migrating: AtomicBool::new(false),
            held: AtomicBool::new(false),
            in_flight: AtomicBool::new(false),
            idle: Notify::new(),
            refused: Mutex::new(None),
        });
        // The incarnation read and the handle put in place under one cache lock (lock
        // order: the cache, then the handles), so two of these for successive copies
        // cannot interleave and leave the newer copy without a writer.
        let incarnation = {
            let core = self.core();
            let Some(incarnation) = core.volume(v).map(|x| x.incarnation()) else { return };
            if let Some(old) = self.handles.lock().expect("poisoned").insert(v.clone(), h.clone()) {
                old.cancel.cancel();
            }
            incarnation
        };
        let me = self.self_arc();
        let vol = v.clone();
        let span = info_span!("writeback", node = %self.node_id, volume = %v);
        let run = async move { me.writer(vol, h, incarnation).await };
        self.spawn_critical("a volume's write-back task panicked", run.instrument(span));
    }

    /// Spawns background work (tracked) on the node's main runtime; see `runtime`.
    pub(crate) fn spawn_background<F>(&self, fut: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn_on(fut, &self.runtime)
    }

    /// [`Node::spawn_background`] for work whose panic would leave state nothing resets
    /// (a volume's write-back stopped, a volume paused or arriving for good): the process
    /// stops instead ([`fail_stop`], saying `what`).
    pub(crate) fn spawn_critical<F>(
        &self,
        what: &'static str,
        fut: F,
    ) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.spawn_background(async move {
            match futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(fut)).await {
                Ok(out) => out,
                Err(_) => fail_stop(what),
            }
        })
    }

    /// The node's own `Arc` (gRPC handlers get `&self`; spawned tasks need ownership).
    pub(crate) fn self_arc(&self) -> Arc<Node> {
        self.me.upgrade().expect("a node is only used while its Arc lives")
    }

    /// Starts no new write-back batch of `v` until the returned hold is dropped, and waits
    /// at most `limit` for the batch in flight to finish. Returns the hold, how long the
    /// wait took and whether no batch is in flight now (`None` if `v` has no writer).
    pub(crate) async fn hold_writeback(
        &self,
        v: &VolumeName,
        limit: Duration,
    ) -> Option<(WritebackHold, Duration, bool)> {
        let h = self.handle(v)?;
        h.held.store(true, Ordering::SeqCst);
        let hold = WritebackHold { h: h.clone() };
        let t = Instant::now();
        let deadline = t + limit;
        loop {
            // Registered before the check, so a clear between the two is not missed.
            let idle = h.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if !h.in_flight.load(Ordering::SeqCst) {
                break;
            }
            if tokio::time::timeout_at(deadline.into(), idle).await.is_err() {
                break;
            }
        }
        let idle = !h.in_flight.load(Ordering::SeqCst);
        Some((hold, t.elapsed(), idle))
    }

    /// Stops a volume's write-back task and forgets its handle.
    pub(crate) fn stop_writer(&self, v: &VolumeName) {
        if let Some(h) = self.handles.lock().expect("poisoned").remove(v) {
            h.cancel.cancel();
        }
    }

    async fn writer(self: Arc<Self>, v: VolumeName, h: Arc<Handle>, incarnation: u32) {
        let delay = Duration::from_millis(self.cfg.writeback_delay_ms);
        loop {
            tokio::select! {
                _ = h.kick.notified() => {}
                _ = h.cancel.cancelled() => return,
            }
            if !delay.is_zero() {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = h.flush.notified() => {}
                    _ = h.cancel.cancelled() => return,
                }
            }
            'batches: loop {
                // In flight first, then the hold: a migration sets the hold, then waits
                // while a batch is in flight, so one of the two sees the other.
                h.in_flight.store(true, Ordering::SeqCst);
                let batch = if h.held.load(Ordering::SeqCst) {
                    None
                } else {
                    let mut core = self.core();
                    if core.volume(&v).map(|x| x.incarnation()) != Some(incarnation) {
                        // Replaced (moved, fenced, loaded again): its own writer took over.
                        drop(core);
                        h.in_flight.store(false, Ordering::SeqCst);
                        h.idle.notify_waiters(); // (a move waiting on `in_flight` goes on)
                        return;
                    }
                    core.take_batch(&v)
                };
                let Some(mut batch) = batch else {
                    h.in_flight.store(false, Ordering::SeqCst);
                    // A migration waiting on `in_flight` set the hold first, so it is seen
                    // here (SeqCst) and woken; otherwise nobody waits. Nothing progressed:
                    // the node-wide progress is not told.
                    h.idle.notify_waiters();
                    break;
                };
                let blocks = batch.changes.len() as u64;
                // A batch the limits cut short means a backlog: the next one goes at once.
                // Otherwise, with a delay, what was written meanwhile waits for the next
                // round (the writes kicked), so a block rewritten all the time costs one
                // PSS write per delay, not one per PSS round trip.
                let backlog = batch.cut_short;
                let wb = WriteBack {
                    volume: v.clone(),
                    epoch: batch.epoch,
                    request_id: self.next_request_id(),
                    // Retries clone this: reference counts, not block copies.
                    changes: std::mem::take(&mut batch.changes),
                    persisted: batch.persisted,
                };
                let mut backoff = Duration::from_millis(10);
                loop {
                    match self.store.write_batch(wb.clone()).await {
                        Ok(_) => {
                            *h.refused.lock().expect("poisoned") = None;
                            // A batch of a volume replaced meanwhile completes nothing.
                            let current = self.core().complete_batch(&batch, true);
                            h.in_flight.store(false, Ordering::SeqCst);
                            h.idle.notify_waiters();
                            self.wb_batches.fetch_add(1, Ordering::Relaxed);
                            self.wb_blocks.fetch_add(blocks, Ordering::Relaxed);
                            self.bump();
                            if !current {
                                return;
                            }
                            break;
                        }
                        Err(StoreError::StaleEpoch { presented, current }) => {
                            let ours = self.core().complete_batch(&batch, false);
                            h.in_flight.store(false, Ordering::SeqCst);
                            h.idle.notify_waiters();
                            if !ours {
                                // A stale writer's batch: the volume here now is another
                                // incarnation, whose own write-back decides its fate.
                                self.bump();
                                return;
                            }
                            if self.fenced(&v, current, incarnation).await {
                                warn!(
                                    presented = presented.0,
                                    current = current.0,
                                    "write-back refused: another NMS owns the volume now \
                                     (fenced)"
                                );
                                return;
                            }
                            // Still ours: the blocks are dirty again and go in a new batch,
                            // with the volume's epoch now.
                            continue 'batches;
                        }
                        Err(e) => {
                            // (Another failure, the PSS unreachable say, makes an earlier
                            // refusal's reason stale.)
                            let refused =
                                matches!(e, StoreError::Refused(_) | StoreError::NotFound(_))
                                    .then(|| e.to_string());
                            let was = std::mem::replace(
                                &mut *h.refused.lock().expect("poisoned"),
                                refused.clone(),
                            );
                            if refused.is_some() && was.is_none() {
                                self.bump();
                            }
                            warn!(error = %e, ?backoff, "write-back failed; retrying");
                            tokio::select! {
                                _ = tokio::time::sleep(backoff) => {}
                                _ = h.cancel.cancelled() => {
                                    self.core().complete_batch(&batch, false);
                                    h.in_flight.store(false, Ordering::SeqCst);
                                    h.idle.notify_waiters();
                                    self.bump();
                                    return;
                                }
                            }
                            backoff = (backoff * 2).min(Duration::from_secs(1));
                        }
                    }
                }
                if !delay.is_zero() && !backlog {
                    break;
                }
            }
        }
    }

    /// The PSS refused `v`'s write-back for a newer epoch (`current`): if another NMS owns
    /// it, redirect callers there and drop the blocks (true). Only the volume's
    /// `incarnation` that was fenced: one installed since (a load at a newer epoch) is left
    /// alone, its writer too. If this node raised the epoch to `current` itself, or the PSS
    /// names this node (its own raise, an answer lost, taken as the volume's epoch),
    /// nothing is dropped (false: write back again); nor when the PSS cannot say who owns
    /// it (false after a pause).
    pub(crate) async fn fenced(&self, v: &VolumeName, current: Epoch, incarnation: u32) -> bool {
        let here = self.core().volume(v).map(|x| (x.incarnation(), x.epoch));
        if matches!(here, Some((i, e)) if i == incarnation && e >= current) {
            // This node raised the epoch itself since the refused batch was taken (an
            // interrupted move settled, or taken back).
            debug!(volume = %v, current = current.0, "refused for an epoch of this node's own");
            return false;
        }
        let to = match self.store.get_volume(v.clone()).await {
            Ok(m) if self.is_mine(&m) => {
                // This node's own acquire raised the epoch and its answer was lost (the
                // retry, with another request id, found the epoch moved on): still ours.
                return !self.adopt_epoch(v, incarnation, m.epoch);
            }
            Ok(m) => m.owner_address,
            Err(e) => {
                // Not knowing whose raise it was (this node's own, its answer lost, is
                // as likely as another owner's), the blocks are kept and the batch tried
                // again after a pause: dropping them (a redirect to nobody) cost a reload
                // and a replay of every vehicle's journal.
                warn!(volume = %v, error = %e, current = current.0, "write-back refused for a newer epoch and the PSS cannot say whose; retrying");
                tokio::time::sleep(Duration::from_millis(self.cfg.pss_rpc_timeout_ms.min(1000)))
                    .await;
                return false;
            }
        };
        let old = {
            let mut core = self.core();
            if core.volume(v).map(|x| x.incarnation()) != Some(incarnation) {
                return true;
            }
            let old = core.mark_moved(v, to, current);
            // Under the cache lock, so no volume installed after the check loses its writer
            // (lock order: the cache, then the handles).
            self.stop_writer(v);
            old
        };
        drop(old);
        self.bump();
        true
    }

    /// Whether the PSS's record names this node as the owner: its id and address, and
    /// this process's session where the record has one. Another process under the same
    /// id and address (a replacement started while this one was paused or cut off) owns
    /// what it acquired: adopting its epoch would write this copy's older blocks over what
    /// the vehicle wrote there.
    pub(crate) fn is_mine(&self, m: &crate::store::VolumeMeta) -> bool {
        m.owner_node == self.node_id
            && m.owner_address == self.advertise.uri()
            && (m.owner_session == 0 || m.owner_session == self.session)
    }

    /// Takes `epoch`, which the PSS records with this node as the owner, as the epoch of
    /// incarnation `incarnation` of `v` here (never lowering it); false when that
    /// incarnation is no longer here.
    pub(crate) fn adopt_epoch(&self, v: &VolumeName, incarnation: u32, epoch: Epoch) -> bool {
        let mut core = self.core();
        match core.volume_mut(v) {
            Some(x) if x.incarnation() == incarnation => {
                if epoch > x.epoch {
                    info!(volume = %v, from = x.epoch.0, to = epoch.0, "own epoch raise found in the PSS");
                    x.epoch = epoch;
                }
                true
            }
            _ => false,
        }
    }

    fn kick(&self, v: &VolumeName) {
        if let Some(h) = self.handle(v) {
            h.kick.notify_one();
        }
    }

    /// Starts `v`'s write-back at once, without the write-back delay (a flush, dirty data
    /// past a start threshold, writes waiting for dirty space).
    fn hurry(&self, v: &VolumeName) {
        if let Some(h) = self.handle(v) {
            h.kick.notify_one();
            h.flush.notify_one();
        }
    }

    /// Wakes `v`'s write-back after an accepted write: at once when the write says the
    /// dirty data passed a start threshold, else after the delay.
    pub(crate) fn written(&self, v: &VolumeName, o: &WriteOutcome) {
        self.wake_writer(v, !o.duplicate, o.urgent);
    }

    /// [`Node::written`] for a run of writes: `wrote` when any changed data, `urgent` when
    /// any passed a start threshold.
    pub(crate) fn wake_writer(&self, v: &VolumeName, wrote: bool, urgent: bool) {
        if urgent {
            self.hurry(v);
        } else if wrote {
            self.kick(v);
        }
    }

    /// Waits for progress (a write-back or state change) until `deadline`; false on timeout.
    /// Waits `wait` for a volume's operation budget when that ends by `deadline`
    /// (`rate_limit_wait_ms` from the call's start); false, at once, when it would not, and
    /// when the node stops meanwhile: the caller then refuses the operation.
    async fn wait_budget(&self, wait: Duration, deadline: Instant) -> bool {
        if Instant::now() + wait > deadline {
            return false;
        }
        tokio::select! {
            () = tokio::time::sleep(wait) => true,
            () = self.stop.cancelled() => false,
        }
    }

    async fn wait_progress(&self, rx: &mut watch::Receiver<u64>, deadline: Instant) -> bool {
        tokio::select! {
            r = rx.changed() => r.is_ok(),
            _ = tokio::time::sleep_until(deadline.into()) => false,
            _ = self.stop.cancelled() => false,
        }
    }

    fn not_serving(&self, v: &VolumeName, s: VolumeState) -> NmsError {
        match s {
            VolumeState::Moved { to, epoch } => NmsError::Moved { to, epoch },
            VolumeState::Incoming { .. } => NmsError::NotOwner {
                volume: v.to_string(),
                why: "it is arriving by migration".into(),
                owner_address: String::new(),
                epoch: Epoch(0),
            },
            VolumeState::Active | VolumeState::Paused => {
                NmsError::Unavailable("volume busy".into())
            }
        }
    }

    /// [`Node::read`] when it can answer at once: the credential matches, the volume is
    /// served here and the block is cached (or known absent). `None`: call `read`.
    pub(crate) fn read_now(
        &self,
        v: &VolumeName,
        cred: &Presented,
        block: BlockNo,
        offset: u32,
        len: Option<u32>,
    ) -> Option<(Option<Bytes>, u64, Lsn)> {
        let mut core = self.core();
        let vol = core.volume(v)?;
        if !cred.admits(vol) || !matches!(vol.state, VolumeState::Active | VolumeState::Paused) {
            return None;
        }
        let p = vol.persisted;
        match core.read(v, block, offset, len) {
            Ok(ReadOutcome::Hit { data, version }) => Some((Some(data), version, p)),
            Ok(ReadOutcome::Absent) => Some((None, 0, p)),
            _ => None,
        }
    }

    /// Several reads of one volume answered from the cache under one lock: `Some` (each
    /// with the persisted watermark) only when the credential matches, the volume is
    /// served here and every read hits; `None`: nothing answered, read one by one.
    pub(crate) fn read_many_now(
        &self,
        v: &VolumeName,
        cred: &Presented,
        reads: &[(BlockNo, u32, Option<u32>)],
    ) -> Option<(Vec<ReadOutcome>, Lsn)> {
        let mut core = self.core();
        let vol = core.volume(v)?;
        if !cred.admits(vol) {
            return None;
        }
        let p = vol.persisted;
        Some((core.read_many(v, reads)?, p))
    }

    /// [`Node::write`] when the cache takes it at once (credential matches, volume
    /// active, room under the dirty limits, no block to fetch). `None`: nothing was
    /// changed; call `write`.
    pub(crate) fn write_now(
        &self,
        v: &VolumeName,
        cred: &Presented,
        block: BlockNo,
        offset: u32,
        data: &[u8],
        request_id: Option<&RequestId>,
    ) -> Option<WriteOutcome> {
        let o = {
            let mut core = self.core();
            let vol = core.volume(v)?;
            if !cred.admits(vol) || vol.state != VolumeState::Active {
                return None;
            }
            core.write(v, block, offset, data, request_id).ok()?
        };
        self.written(v, &o);
        Some(o)
    }

    /// Reads part of a block, through from the PSS on a miss.
    pub(crate) async fn read(
        &self,
        v: &VolumeName,
        cred: &Presented,
        block: BlockNo,
        offset: u32,
        len: Option<u32>,
    ) -> Result<(Option<Bytes>, u64, Lsn), NmsError> {
        let start = Instant::now();
        let deadline = start + Duration::from_millis(self.cfg.pause_wait_ms);
        let rate_deadline = start + Duration::from_millis(self.cfg.rate_limit_wait_ms);
        loop {
            self.ensure(v, cred).await?;
            let r = {
                let mut core = self.core();
                same_copy(&core, v, cred)?;
                let r = core.read(v, block, offset, len);
                r.map(|o| {
                    let fetch =
                        matches!(o, ReadOutcome::Miss).then(|| core.begin_fetch(v, &[block]));
                    (o, core.volume(v).map_or(Lsn(0), |x| x.persisted), fetch)
                })
            };
            match r {
                Ok((ReadOutcome::Hit { data, version }, p, _)) => {
                    return Ok((Some(data), version, p))
                }
                Ok((ReadOutcome::Absent, p, _)) => return Ok((None, 0, p)),
                Ok((ReadOutcome::Miss, p, fetch)) => {
                    let got = self.fetch(v, vec![block]).await?;
                    let got = got.into_iter().next().flatten();
                    let mut core = self.core();
                    core.fill(v, block, got.clone(), fetch.expect("begun on a miss"));
                    match core.read(v, block, offset, len) {
                        Ok(ReadOutcome::Hit { data, version }) => {
                            return Ok((Some(data), version, p))
                        }
                        Ok(ReadOutcome::Absent) => return Ok((None, 0, p)),
                        // The budget was used meanwhile: the block is cached now, so the
                        // next pass waits for the budget and answers it as a hit.
                        Err(CacheError::RateLimited { .. }) => continue,
                        // Not cached (paused or evicted at once): answer from what we fetched.
                        _ => {
                            return Ok(match got {
                                None => (None, 0, p),
                                Some((d, ver)) => {
                                    let s = (offset as usize).min(d.len());
                                    let e = len.map_or(d.len(), |l| (s + l as usize).min(d.len()));
                                    (Some(d.slice(s..e)), ver, p)
                                }
                            })
                        }
                    }
                }
                Err(CacheError::UnknownVolume(_)) if Instant::now() < deadline => continue,
                Err(CacheError::RateLimited { wait, .. })
                    if self.wait_budget(wait, rate_deadline).await => {}
                Err(e) => return Err(self.cache_error(v, e)),
            }
        }
    }

    /// Reads blocks from the PSS (a cache miss), counted for `NodeStatus`.
    async fn fetch(
        &self,
        v: &VolumeName,
        blocks: Vec<BlockNo>,
    ) -> Result<crate::store::Fetched, crate::store::StoreError> {
        self.pss_reads.fetch_add(1, Ordering::Relaxed);
        self.pss_read_blocks.fetch_add(blocks.len() as u64, Ordering::Relaxed);
        // In reads of at most `pss_read_bytes` of block data, side by side (the PSS refuses
        // a reply past half its message limit: 256 blocks of 1 MiB are 256 MiB). As many
        // blocks of the largest size as fit need no look at the volume's block size.
        let read_bytes = self.cfg.pss_read_bytes;
        // (And at most the PSS's `MAX_GET_BLOCKS` blocks a read.)
        let most = wayside_pss::service::MAX_GET_BLOCKS;
        let fit_any =
            (read_bytes / u64::from(wayside_proto::types::MAX_BLOCK_SIZE_BYTES)).min(most as u64);
        if blocks.len() as u64 <= fit_any {
            return self.store.get_blocks(v.clone(), blocks).await;
        }
        let bs = self.core().volume(v).map_or(1, |x| u64::from(x.block_size.bytes()));
        let per_read = usize::try_from(read_bytes / bs.max(1)).unwrap_or(usize::MAX).clamp(1, most);
        if blocks.len() <= per_read {
            return self.store.get_blocks(v.clone(), blocks).await;
        }
        let reads = blocks.chunks(per_read).map(|c| self.store.get_blocks(v.clone(), c.to_vec()));
        let got = futures::future::try_join_all(reads).await?;
        Ok(got.into_iter().flatten().collect())
    }

    /// The blocks of `blocks` this node does not cache for `v` (empty when the volume is
    /// not loaded or not active): a batch's reads that would each go to the PSS.
    pub(crate) fn uncached(&self, v: &VolumeName, blocks: &[BlockNo]) -> Vec<BlockNo> {
        self.core().uncached(v, blocks)
    }

    /// Brings `blocks` (the uncached ones of a batch) into the cache with one PSS call, so
    /// a batch of cold reads costs one round trip to the PSS instead of one per block.
    /// Blocks cached meanwhile (a write) keep what they have (`Cache::fill`).
    pub(crate) async fn prefetch(
        &self,
        v: &VolumeName,
        cred: &Presented,
        blocks: Vec<BlockNo>,
    ) -> Result<(), NmsError> {
        self.ensure(v, cred).await?;
        let fetch = {
            let mut core = self.core();
            // Over the volume's budget the batch's reads go one by one instead, each
            // waiting for the budget before its own PSS read.
            if core.budget_ready(v, blocks.len() as u64).is_err() {
                return Ok(());
            }
            core.begin_fetch(v, &blocks)
        };
        let got = self.fetch(v, blocks.clone()).await?;
        let mut core = self.core();
        for (b, g) in blocks.into_iter().zip(got) {
            core.fill(v, b, g, fetch);
        }
        Ok(())
    }

    fn cache_error(&self, v: &VolumeName, e: CacheError) -> NmsError {
        match e {
            CacheError::UnknownVolume(_) => NmsError::Unavailable("volume was unloaded".into()),
            CacheError::NotServing(s) => self.not_serving(v, s),
            CacheError::Range { .. } => NmsError::Invalid(e.to_string()),
            CacheError::DirtyFull { limit, value, max } => {
                NmsError::Limit { limit: limit.into(), unit: "bytes".into(), value, max }
            }

            CacheError::NeedBlock(_) | CacheError::ShuttingDown => {
                NmsError::Unavailable(e.to_string())
            }
            // The budget is used up: `value` is what was used, the most there is.
            CacheError::RateLimited { per_s, .. } => NmsError::Limit {
                limit: "max_volume_ops_per_s".into(),
                unit: "operations per second".into(),
                value: per_s,
                max: per_s,
            },
        }
    }

    /// Writes (`Some(data)`) or deletes (`None`) a block: accepted once in memory.
    pub(crate) async fn write(
        &self,
        v: &VolumeName,
        cred: &Presented,
        block: BlockNo,
        offset: u32,
        data: Option<&[u8]>,
        request_id: Option<&RequestId>,
    ) -> Result<WriteOutcome, NmsError> {
        let start = Instant::now();
        let pause_deadline = start + Duration::from_millis(self.cfg.pause_wait_ms);
        let space_deadline = start + Duration::from_millis(self.cfg.backpressure_wait_ms);
        let rate_deadline = start + Duration::from_millis(self.cfg.rate_limit_wait_ms);
        // From the first read of a missing block on (a pause waited out before is not
        // counted against it).
        let mut fetch_deadline: Option<Instant> = None;
        let mut rx = self.progress.subscribe();
        loop {
            self.ensure(v, cred).await?;
            rx.borrow_and_update();
            let r = {
                let mut core = self.core();
                same_copy(&core, v, cred)?;
                match data {
                    Some(d) => core.write(v, block, offset, d, request_id),
                    None => core.delete(v, block, request_id),
                }
            };
            match r {
                Ok(o) => {
                    self.written(v, &o);
                    return Ok(o);
                }
                Err(CacheError::NeedBlock(b)) => {
                    // A partial write of an uncached block reads it first; bounded like a
                    // wait for space (a block filled and pushed out again at once by dirty
                    // blocks filling the cache would otherwise be fetched forever).
                    let wait = Duration::from_millis(self.cfg.backpressure_wait_ms);
                    if Instant::now() >= *fetch_deadline.get_or_insert(Instant::now() + wait) {
                        return Err(NmsError::Unavailable(format!(
                            "block {b} could not be kept cached for a partial write within \
                             backpressure_wait_ms (the cache is full of unpersisted blocks)"
                        )));
                    }
                    let fetch = self.core().begin_fetch(v, &[b]);
                    let got = self.fetch(v, vec![b]).await?;
                    self.core().fill(v, b, got.into_iter().next().flatten(), fetch);
                }
                Err(CacheError::NotServing(VolumeState::Paused)) => {
                    if !self.wait_progress(&mut rx, pause_deadline).await {
                        return Err(NmsError::Unavailable(
                            "volume paused for a migration switch longer than pause_wait_ms".into(),
                        ));
                    }
                }
                Err(e @ CacheError::DirtyFull { .. }) => {
                    // Waiting for write-back the PSS refuses would only use up the deadline.
                    if let Some(why) = self.writeback_refused(v) {
                        return Err(NmsError::WritebackRefused(why));
                    }
                    self.hurry(v);
                    if !self.wait_progress(&mut rx, space_deadline).await {
                        return Err(self.cache_error(v, e));
                    }
                }
                Err(CacheError::UnknownVolume(_)) if Instant::now() < pause_deadline => {}
                Err(CacheError::RateLimited { wait, .. })
                    if self.wait_budget(wait, rate_deadline).await => {}
                Err(e) => return Err(self.cache_error(v, e)),
            }
        }
    }

    /// Waits until every write accepted before the call is persisted.
    pub(crate) async fn flush(&self, v: &VolumeName, cred: &Presented) -> Result<Lsn, NmsError> {
        self.ensure(v, cred).await?;
        let deadline = Instant::now() + Duration::from_millis(self.cfg.pss_deadline_ms);
        let mut rx = self.progress.subscribe();
        let (target, incarnation) = {
            let core = self.core();
            same_copy(&core, v, cred)?;
            core.touch(v);
            core.volume(v).map_or((Lsn(0), 0), |x| (x.accepted, x.incarnation()))
        };
        loop {
            rx.borrow_and_update();
            if self.stop.is_cancelled() {
                // Its write-back writers have stopped: nothing more will be persisted here.
                return Err(NmsError::Unavailable(
                    "this NMS has stopped writing back (shutting down)".into(),
                ));
            }
            {
                let core = self.core();
                let Some(x) = core.volume(v) else {
                    return Err(NmsError::Unavailable("volume was unloaded".into()));
                };
                match &x.state {
                    VolumeState::Moved { to, epoch } => {
                        return Err(NmsError::Moved { to: to.clone(), epoch: *epoch })
                    }
                    // Another copy's watermark says nothing of this one's writes (a copy
                    // fenced and loaded anew meanwhile: the vehicle's journal replays them).
                    _ if x.incarnation() != incarnation => {
                        return Err(NmsError::Unavailable(
                            "the volume was loaded anew during the flush".into(),
                        ))
                    }
                    _ if x.persisted >= target => return Ok(x.persisted),
                    _ => {}
                }
            }
            if let Some(why) = self.writeback_refused(v) {
                return Err(NmsError::WritebackRefused(why));
            }
            self.hurry(v);
            if !self.wait_progress(&mut rx, deadline).await {
                return Err(NmsError::Unavailable(format!(
                    "write-back did not reach lsn {} within pss_deadline_ms",
                    target.0
                )));
            }
        }
    }

    /// Flushes every volume (shutdown).
    pub(crate) async fn flush_all(&self) {
        let mut rx = self.progress.subscribe();
        loop {
            rx.borrow_and_update();
            let dirty: Vec<VolumeName> = self
                .core()
                .volumes()
                .filter(|x| {
                    matches!(x.state, VolumeState::Active | VolumeState::Paused) && !x.is_clean()
                })
                .map(|x| x.name.clone())
                .collect();
            if dirty.is_empty() {
                return;
            }
            for v in &dirty {
                self.hurry(v);
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    pub(crate) fn uptime(&self) -> Duration {
        self.started.elapsed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Acquire, BlockPage, BoxFut, Fetched, MemStore, VolumeMeta};

    /// A store whose write-back panics (a bug in a write-back path).
    struct PanicsOnWriteBack(MemStore);

    impl Store for PanicsOnWriteBack {
        fn acquire(&self, req: Acquire) -> BoxFut<'_, Result<VolumeMeta, StoreError>> {
            self.0.acquire(req)
        }
        fn get_volume(&self, volume: VolumeName) -> BoxFut<'_, Result<VolumeMeta, StoreError>> {
            self.0.get_volume(volume)
        }
        fn write_batch(&self, _: WriteBack) -> BoxFut<'_, Result<Lsn, StoreError>> {
            panic!("a write-back bug");
        }
        fn get_blocks(
            &self,
            volume: VolumeName,
            blocks: Vec<BlockNo>,
        ) -> BoxFut<'_, Result<Fetched, StoreError>> {
            self.0.get_blocks(volume, blocks)
        }
        fn list_blocks(
            &self,
            volume: VolumeName,
            start: BlockNo,
            limit: u32,
        ) -> BoxFut<'_, Result<BlockPage, StoreError>> {
            self.0.list_blocks(volume, start, limit)
        }
    }

    /// The child's side of [`a_panic_in_the_cache_or_a_write_back_ends_the_process`]:
    /// `mode` "lock" poisons the node's cache lock and uses it; "writeback" writes a block
    /// whose write-back panics. Returning means the process went on (exit 0).
    fn child(mode: &str) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let store: Arc<dyn Store> = Arc::new(PanicsOnWriteBack(MemStore::default()));
            let cfg = Config { node_id: "a".into(), writeback_delay_ms: 0, ..Config::default() };
            let ep = Endpoint::parse("127.0.0.1:2").unwrap();
            let node = Node::new(cfg, ep, store, None, CancellationToken::new());
            if mode == "lock" {
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let _core = node.core();
                    panic!("poisons the cache lock");
                }));
                let _core = node.core();
                return;
            }
            if mode == "critical" {
                let task = node.spawn_critical("a probe panicked", async { panic!("a probe") });
                let _ = task.await;
                return;
            }
            let v = VolumeName::new("v").unwrap();
            let who = Presented::new(Credential::new("k").unwrap());
            let bs = BlockSize::new(4096).unwrap();
            node.load(&v, &who, Some(bs), LoadFor::Call).await.unwrap();
            node.write(&v, &who, 0, 0, Some(&[1; 4096]), None).await.unwrap();
            // The write-back runs at once (no delay); the process ends within this.
            tokio::time::sleep(Duration::from_secs(10)).await;
        });
    }

    /// A panic that poisons the cache lock, or one in a volume's write-back task, ends the
    /// process (SIGABRT), rather than leaving a node that resets every call while saying
    /// SERVING and never persists its dirty blocks. (Each in a child process: this test
    /// binary runs itself again with a variable naming the case.)
    #[test]
    fn a_panic_in_the_cache_or_a_write_back_ends_the_process() {
        use std::os::unix::process::ExitStatusExt as _;
        const CHILD: &str = "WAYSIDE_NMS_PANIC_CHILD";
        if let Ok(mode) = std::env::var(CHILD) {
            child(&mode);
            std::process::exit(0);
        }
        for (mode, what) in [
            ("lock", "a panic while the cache lock was held"),
            ("writeback", "a volume's write-back task panicked"),
            ("critical", "a probe panicked"),
        ] {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "server::tests::a_panic_in_the_cache_or_a_write_back_ends_the_process",
                ])
                .arg("--nocapture")
                .env(CHILD, mode)
                .output()
                .unwrap();
            assert_eq!(out.status.signal(), Some(libc::SIGABRT), "{mode}: {out:?}");
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(stderr.contains(&format!("fail-stop: {what}")), "{mode}: {stderr}");
        }
    }
}
