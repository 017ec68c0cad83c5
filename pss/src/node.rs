//! One Raft node: the raft-rs `RawNode`, its durable log and the sled state machine,
//! driven by a single loop on a dedicated thread (it blocks on `fdatasync`, so it must
//! not run on the shared runtime's workers).
//!
//! Each loop turn: take every input waiting (Raft messages, client commands, reads,
//! admin), propose all client commands as ONE entry (group commit), then handle the
//! `Ready` in raft-rs order: install a snapshot; send the leader's appends and
//! heartbeats (`messages`: raft-rs counts the leader's own copy only once it is
//! persisted, so followers may write theirs meanwhile, Raft thesis 10.2.1); append
//! entries + hard state; then, side by side, ONE `fdatasync` on the node's fsync thread (which
//! sends the `persisted_messages` — votes and append acks — the moment it returns, so
//! none leaves before it is durable) and the apply of the committed entries (raft-rs
//! hands out only entries committed AND persisted here earlier; one sled batch with the
//! applied index), answer the clients whose commands were applied, advance once both
//! are done.
//!
//! **Architecture invariant:** a client is answered only after its entry is committed
//! (durable on a majority) and applied; a read only after the read index is applied.

use crate::config::Config;
use crate::state::{ApplyError, Command, CommandBatch, Outcome, Reader, StateError, StateMachine};
use crate::storage::{DurableLog, LogError, RaftStorage};
use crate::transport::Transport;
use prost::Message as _;
use protobuf::Message as _;
use raft::prelude::*;
use raft::StateRole;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;

/// Inputs queued for the node loop before it blocks new ones (backpressure).
pub const INPUT_QUEUE_CAPACITY: usize = 8192;

/// Why a request could not be served; mapped to a gRPC status in `service`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NodeError {
    #[error("this node is not the leader")]
    NotLeader { leader_id: Option<u64>, leader_address: Option<String> },
    #[error("leadership changed before the request was applied; its outcome is unknown")]
    OutcomeUnknown,
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("the node is shutting down")]
    Stopped,
    /// Not now, retry (a new leader that has not applied its earlier membership entries).
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Refused(ApplyError),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Internal(String),
}

/// What the node tells the rest of the process after every loop turn.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeStatus {
    pub id: u64,
    pub role: Role,
    pub term: u64,
    pub leader_id: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub first_index: u64,
    pub last_index: u64,
    pub snapshot_index: u64,
    /// Snapshots that failed since the node started.
    pub snapshot_failures: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    /// Leader only: each member's replicated (matched) index.
    pub matched: BTreeMap<u64, u64>,
    /// Set once the loop has stopped (error or shutdown).
    pub stopped: bool,
}

/// A node's Raft role.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Role {
    #[default]
    Follower,
    Candidate,
    PreCandidate,
    Leader,
}

impl From<StateRole> for Role {
    fn from(r: StateRole) -> Self {
        match r {
            StateRole::Follower => Role::Follower,
            StateRole::Candidate => Role::Candidate,
            StateRole::PreCandidate => Role::PreCandidate,
            StateRole::Leader => Role::Leader,
        }
    }
}

/// Member id -> gRPC address, shared by the loop, the transport and the services.
pub type AddressBook = Arc<RwLock<BTreeMap<u64, String>>>;

type Reply<T> = oneshot::Sender<Result<T, NodeError>>;

/// A request to the node loop (a proposal's command boxed: it is several times the size
/// of any other input).
pub enum Input {
    Raft(Box<Message>),
    /// `term`: the term this node led in when the command was admitted; proposed only if
    /// it still leads in that term.
    Propose {
        cmd: Box<Command>,
        reply: Reply<Outcome>,
        permit: OwnedSemaphorePermit,
        term: u64,
    },
    Read {
        reply: Reply<()>,
        permit: OwnedSemaphorePermit,
    },
    ConfChange {
        cc: ConfChange,
        reply: Reply<()>,
    },
    TransferLeader {
        to: u64,
    },
    Compact {
        reply: Reply<u64>,
    },
    SnapshotSent {
        to: u64,
        ok: bool,
    },
    Unreachable {
        to: u64,
    },
}

/// The handle the services use.
#[derive(Clone)]
pub struct NodeHandle {
    pub id: u64,
    pub tx: mpsc::Sender<Input>,
    pub status: watch::Receiver<NodeStatus>,
    pub addresses: AddressBook,
    pub reader: Reader,
    /// Bounds client work in flight (`max_inflight_proposals`).
    pub inflight: Arc<tokio::sync::Semaphore>,
    pub request_timeout: Duration,
    pub snap_dir: PathBuf,
}

impl NodeHandle {
    /// The not-leader error with the best leader hint this node has.
    pub fn not_leader(&self) -> NodeError {
        let leader = self.status.borrow().leader_id;
        let leader_id = (leader != 0).then_some(leader);
        let leader_address = leader_id.and_then(|l| self.address_of(l));
        NodeError::NotLeader { leader_id, leader_address }
    }

    pub fn address_of(&self, id: u64) -> Option<String> {
        self.addresses.read().unwrap_or_else(std::sync::PoisonError::into_inner).get(&id).cloned()
    }

    pub fn is_leader(&self) -> bool {
        self.status.borrow().role == Role::Leader
    }

    async fn permit(&self) -> Result<OwnedSemaphorePermit, NodeError> {
        let fut = self.inflight.clone().acquire_owned();
        match tokio::time::timeout(self.request_timeout, fut).await {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(_)) => Err(NodeError::Stopped),
            Err(_) => Err(NodeError::Timeout(self.request_timeout)),
        }
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Input) -> Result<T, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.map_err(|_| NodeError::Stopped)?;
        match tokio::time::timeout(self.request_timeout, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(NodeError::Stopped),
            Err(_) => Err(NodeError::Timeout(self.request_timeout)),
        }
    }

    /// Proposes a client command and waits until it is committed and applied.
    pub async fn propose(&self, cmd: Command) -> Result<Outcome, NodeError> {
        let term = {
            let s = self.status.borrow();
            if s.role != Role::Leader {
                drop(s);
                return Err(self.not_leader());
            }
            s.term
        };
        let permit = self.permit().await?;
        self.call(|reply| Input::Propose { cmd: Box::new(cmd), reply, permit, term }).await
    }

    /// Waits until this node's applied state is linearizable (ReadIndex on the leader).
    pub async fn read_barrier(&self) -> Result<(), NodeError> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        let permit = self.permit().await?;
        self.call(|reply| Input::Read { reply, permit }).await
    }

    pub async fn conf_change(&self, cc: ConfChange) -> Result<(), NodeError> {
        if !self.is_leader() {
            return Err(self.not_leader());
        }
        self.call(|reply| Input::ConfChange { cc, reply }).await
    }

    pub async fn compact(&self) -> Result<u64, NodeError> {
        self.call(|reply| Input::Compact { reply }).await
    }

    pub async fn transfer_leader(&self, to: u64) -> Result<(), NodeError> {
        self.tx.send(Input::TransferLeader { to }).await.map_err(|_| NodeError::Stopped)
    }
}

pub use crate::snapshot::{checkpoint_path, snapshot_path};

/// A node failure that stops the loop.
#[derive(Debug, thiserror::Error)]
pub enum FatalError {
    #[error(transparent)]
    Log(#[from] LogError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    #[error("{0}")]
    Setup(String),
}

/// A read waiting for its read index to be applied.
type ReadWaiter = (Reply<()>, OwnedSemaphorePermit);

/// Where the loop's time goes, summed over a reporting interval and logged at debug
/// level (`RUST_LOG=wayside_pss::node=debug`), to find the throughput bottleneck.
#[derive(Default)]
struct PhaseStats {
    since: Option<std::time::Instant>,
    turns: u64,
    readies: u64,
    entries: u64,
    commands: u64,
    idle: Duration,
    write: Duration,
    sync: Duration,
    apply: Duration,
    /// The fsync and the apply run side by side: this is their wall time.
    persist_and_apply: Duration,
    max_sync: Duration,
    max_apply: Duration,
}

/// How often [`PhaseStats`] are logged.
const STATS_INTERVAL: Duration = Duration::from_secs(2);

impl PhaseStats {
    fn maybe_report(&mut self) {
        let now = std::time::Instant::now();
        let since = *self.since.get_or_insert(now);
        if now.duration_since(since) < STATS_INTERVAL {
            return;
        }
        if self.readies > 0 {
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            tracing::debug!(
                window_ms = ms(now.duration_since(since)) as u64,
                turns = self.turns,
                readies = self.readies,
                entries = self.entries,
                commands = self.commands,
                idle_ms = ms(self.idle) as u64,
                write_ms = ms(self.write) as u64,
                sync_ms = ms(self.sync) as u64,
                apply_ms = ms(self.apply) as u64,
                sync_and_apply_ms = ms(self.persist_and_apply) as u64,
                max_sync_ms = ms(self.max_sync),
                max_apply_ms = ms(self.max_apply),
                "raft loop phases"
            );
        }
        *self = PhaseStats { since: Some(now), ..Default::default() };
    }
}

/// The log's fsync thread, one per node for its whole life (a thread per `Ready` cost a
/// clone and a teardown each time). It also sends the messages that wait for the fsync
/// (votes, append acks) the moment it returns.
struct Syncer {
    jobs: std::sync::mpsc::SyncSender<(crate::storage::PendingSync, Vec<Message>)>,
    done: std::sync::mpsc::Receiver<Result<Duration, LogError>>,
}

impl Syncer {
    fn start(id: u64, transport: Transport) -> std::io::Result<Self> {
        let (jobs, rx) =
            std::sync::mpsc::sync_channel::<(crate::storage::PendingSync, Vec<Message>)>(1);
        let (done_tx, done) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new().name(format!("pss-fsync-{id}")).spawn(move || {
            // Ends when the loop drops its `Syncer`.
            for (sync, after) in rx {
                let started = std::time::Instant::now();
                let r = sync.wait();
                if r.is_ok() {
                    for m in after {
                        transport.send(m);
                    }
                }
                if done_tx.send(r.map(|()| started.elapsed())).is_err() {
                    return;
                }
            }
        })?;
        Ok(Self { jobs, done })
    }

    /// Starts the fsync; `after` leaves once it succeeded.
    fn submit(
        &self,
        sync: crate::storage::PendingSync,
        after: Vec<Message>,
    ) -> Result<(), FatalError> {
        self.jobs
            .send((sync, after))
            .map_err(|_| FatalError::Setup("the fsync thread stopped".into()))
    }

    /// Waits for the fsync started by `submit`; how long it took.
    fn wait(&self) -> Result<Duration, FatalError> {
        let r =
            self.done.recv().map_err(|_| FatalError::Setup("the fsync thread stopped".into()))?;
        Ok(r?)
    }
}

struct Loop {
    id: u64,
    node: RawNode<RaftStorage>,
    storage: RaftStorage,
    log: DurableLog,
    sm: StateMachine,
    transport: Transport,
    syncer: Syncer,
    addresses: AddressBook,
    snap_dir: PathBuf,
    cfg: Config,
    /// This process's random incarnation, stamped into every proposal with `next_seq`:
    /// `next_seq` starts at 1 in every process, so only the pair identifies a proposal
    /// of this process (see [`is_own`]).
    incarnation: u64,
    next_seq: u64,
    /// Commands to propose, each with the term it was admitted in.
    batch: Vec<(Command, Reply<Outcome>, OwnedSemaphorePermit, u64)>,
    pending: HashMap<u64, (Reply<Outcome>, OwnedSemaphorePermit)>,
    reads_new: Vec<ReadWaiter>,
    reads_sent: HashMap<Vec<u8>, Vec<ReadWaiter>>,
    reads_ready: VecDeque<(u64, Vec<ReadWaiter>)>,
    next_read: u64,
    conf_waiter: Option<(ConfChange, Reply<()>)>,
    applied: u64,
    /// Entry bytes applied since the last snapshot (for `compact_log_bytes`).
    applied_bytes: u64,
    /// The snapshot being written on its own thread, if any (one at a time).
    snapshot_job: Option<SnapshotJob>,
    /// Snapshots failed since the start, and in a row (the retry's backoff), and when the
    /// next one the log's size calls for may start.
    snapshot_failures: u64,
    snapshot_failures_in_row: u32,
    snapshot_retry_at: Option<std::time::Instant>,
    status: watch::Sender<NodeStatus>,
    stats: PhaseStats,
}

/// A snapshot file being written off the Raft thread: the state's index was copied on
/// the Raft thread (cheap: block data stays in the blob segments), the block data is
/// read and the file written and fsynced by `thread`; the log is compacted when it ends.
struct SnapshotJob {
    meta: SnapshotMetadata,
    /// The blob position the checkpoint's block index is complete up to.
    at: (u32, u64),
    started: std::time::Instant,
    cancel: Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Result<u64, StateError>>,
    /// `pss compact` callers waiting for the new snapshot index.
    waiters: Vec<Reply<u64>>,
}

/// A random incarnation for a new process (never 0, the value of entries proposed by a
/// PSS from before incarnations). 64 random bits: two processes of one node drawing the
/// same one is not a practical concern, unlike a clock (which may step back).
fn new_incarnation() -> u64 {
    rand::random::<u64>().max(1)
}

/// Whether an applied command was proposed by this process (node `id`, `incarnation`), so
/// its outcome goes to the request waiting under its `seq`. A command of an earlier
/// process of this node (proposed, not yet committed when it stopped, committed under a
/// later term) is not: its `seq` may well be waiting here for another request.
fn is_own(cmd: &Command, id: u64, incarnation: u64) -> bool {
    cmd.origin == id && cmd.incarnation == incarnation
}

/// The started node: its handle and the thread that runs the loop.
pub struct Started {
    pub handle: NodeHandle,
    pub thread: std::thread::JoinHandle<Result<(), FatalError>>,
}

/// Opens the data dir (bootstrapping it on first start), recovers, and starts the loop.
/// `tls` (loaded from `cfg.tls` by the server): what the transport dials its peers with.
pub fn start(
    cfg: Config,
    tls: Option<wayside_proto::tls::Tls>,
    runtime: tokio::runtime::Handle,
    tracker: tokio_util::task::TaskTracker,
    shutdown: CancellationToken,
) -> Result<Started, FatalError> {
    let setup = |what: &str, e: std::io::Error| FatalError::Setup(format!("{what}: {e}"));
    let snap_dir = cfg.data_dir.join("snap");
    std::fs::create_dir_all(&snap_dir).map_err(|e| setup("creating data dir", e))?;
    remove_unfinished(&snap_dir);
    let (mut log, core, existed) =
        DurableLog::open(&cfg.data_dir, cfg.log_segment_bytes, cfg.direct_io)?;
    let storage = RaftStorage { core: Arc::new(RwLock::new(core)), ..Default::default() };
    let mut sm = StateMachine::open_in(
        &cfg.data_dir.join("sm"),
        &snap_dir,
        crate::state::Options {
            dedupe_limit: cfg.dedupe_table_entries,
            blob_segment_bytes: cfg.blob_segment_bytes,
            blob_gc_live_percent: cfg.blob_gc_live_percent,
            blob_gc_space_percent: cfg.blob_gc_space_percent,
            direct_io: cfg.direct_io,
        },
    )?;
    if !existed && !cfg.join {
        // First start of a founding member: every founder writes the same initial
        // snapshot at index 1 (the voter set, the address book), so a node added later
        // always starts from a snapshot and never replays a log it cannot interpret.
        let cs =
            ConfState { voters: cfg.peers.iter().map(|p| p.id).collect(), ..Default::default() };
        let mut meta = SnapshotMetadata { index: 1, term: 1, ..Default::default() };
        meta.set_conf_state(cs.clone());
        let mut p = sm.begin();
        for peer in &cfg.peers {
            sm.set_member(&mut p, peer.id, Some(&peer.address));
        }
        sm.commit(p, 1, Some(&cs))?;
        sm.write_snapshot(&snapshot_path(&snap_dir, 1), &meta)?;
        log.install_snapshot(&storage, meta)?;
        tracing::info!(voters = ?cs.voters, "bootstrapped a new cluster member");
    }
    // Recovery: sled may be behind what it once applied (its flush is not an fsync);
    // below the log's compaction point only the durable snapshot file has the data.
    let snap_index = storage.read().snapshot.index;
    let mut applied = sm.applied()?;
    if applied < snap_index {
        tracing::info!(applied, snap_index, "state machine behind the snapshot: reloading it");
        let checkpoint = checkpoint_path(&snap_dir, snap_index);
        if checkpoint.is_dir() {
            sm.load_snapshot(&checkpoint)?;
        } else {
            sm.load_snapshot(&snapshot_path(&snap_dir, snap_index))?;
        }
        applied = snap_index;
    }
    {
        let mut core = storage.write();
        if let Some(cs) = sm.conf_state()? {
            core.set_conf_state(cs, applied);
        }
        // Applied entries were committed; the commit index on disk may lag (it is
        // written without its own fsync), so raise it.
        let last = core.last_index();
        core.hard_state.commit = core.hard_state.commit.max(applied.min(last));
    }
    let addresses: AddressBook = Arc::new(RwLock::new(cfg.peer_map()));
    {
        let mut book = addresses.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        book.extend(sm.members()?);
        // A node removed from the group (still in `--peers`, say) is no member: its
        // certificate may no longer send Raft messages or change the cluster.
        let cs = storage.read().conf_state().clone();
        if !cs.voters.is_empty() {
            book.retain(|id, _| {
                *id == cfg.id || cs.voters.contains(id) || cs.learners.contains(id)
            });
        }
    }

    let raft_cfg = raft::Config {
        id: cfg.id,
        election_tick: cfg.election_timeout_ticks,
        heartbeat_tick: cfg.heartbeat_interval_ticks,
        applied,
        max_size_per_msg: cfg.max_raft_message_bytes,
        max_inflight_msgs: cfg.max_inflight_raft_messages,
        check_quorum: true,
        pre_vote: true,
        ..Default::default()
    };
    raft_cfg.validate()?;
    let logger = slog::Logger::root(crate::logging::TracingDrain, slog::o!());
    let node = RawNode::new(&raft_cfg, storage.clone(), &logger)?;

    let (tx, rx) = mpsc::channel(INPUT_QUEUE_CAPACITY);
    let (status_tx, status_rx) = watch::channel(NodeStatus { id: cfg.id, ..Default::default() });
    let transport = Transport::new(
        cfg.id,
        addresses.clone(),
        tx.clone(),
        snap_dir.clone(),
        &cfg,
        tls,
        runtime.clone(),
        tracker,
        shutdown.clone(),
    );
    let handle = NodeHandle {
        id: cfg.id,
        tx,
        status: status_rx,
        addresses: addresses.clone(),
        reader: sm.reader(),
        inflight: Arc::new(tokio::sync::Semaphore::new(cfg.max_inflight_proposals)),
        request_timeout: Duration::from_millis(cfg.request_timeout_ms),
        snap_dir: snap_dir.clone(),
    };
    let syncer = Syncer::start(cfg.id, transport.clone())
        .map_err(|e| setup("spawning the fsync thread", e))?;
    let mut lp = Loop {
        id: cfg.id,
        node,
        storage,
        log,
        sm,
        transport,
        syncer,
        addresses,
        snap_dir,
        cfg,
        incarnation: new_incarnation(),
        next_seq: 1,
        batch: Vec::new(),
        pending: HashMap::new(),
        reads_new: Vec::new(),
        reads_sent: HashMap::new(),
        reads_ready: VecDeque::new(),
        next_read: 1,
        conf_waiter: None,
        applied,
        applied_bytes: 0,
        snapshot_job: None,
        snapshot_failures: 0,
        snapshot_failures_in_row: 0,
        snapshot_retry_at: None,
        status: status_tx,
        stats: PhaseStats::default(),
    };
    lp.publish();
    let id = lp.id;
    let thread = std::thread::Builder::new()
        .name(format!("pss-raft-{id}"))
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .map_err(|e| FatalError::Setup(format!("node runtime: {e}")))?;
            let span = tracing::info_span!("raft", node = id);
            let _g = span.enter();
            let r = rt.block_on(lp.run(rx, shutdown));
            if let Err(e) = &r {
                tracing::error!(error = %e, "raft node stopped on an error");
            }
            r
        })
        .map_err(|e| setup("spawning the raft thread", e))?;
    Ok(Started { handle, thread })
}

impl Loop {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<Input>,
        shutdown: CancellationToken,
    ) -> Result<(), FatalError> {
        let mut ticker = tokio::time::interval(Duration::from_millis(self.cfg.tick_interval_ms));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let result = loop {
            let waiting = std::time::Instant::now();
            tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                _ = ticker.tick() => { self.node.tick(); }
                input = rx.recv() => {
                    let Some(input) = input else { break Ok(()) };
                    self.stats.idle += waiting.elapsed();
                    self.handle(input);
                    // Group commit: take everything already waiting before the next fsync.
                    let mut taken = 1usize;
                    while taken < INPUT_QUEUE_CAPACITY {
                        let Ok(input) = rx.try_recv() else { break };
                        self.handle(input);
                        taken += 1;
                    }
                }
            }
            if let Err(e) = self.turn() {
                break Err(e);
            }
        };
        self.fail_all(NodeError::Stopped);
        if let Some(job) = self.snapshot_job.take() {
            job.cancel.store(true, std::sync::atomic::Ordering::Relaxed);
            let _ = job.thread.join();
            for w in job.waiters {
                let _ = w.send(Err(NodeError::Stopped));
            }
        }
        if let Err(e) = self.sm.finish_collections() {
            tracing::warn!(error = %e, "collected blob segments left for the next start");
        }
        self.sm.flush();
        self.status.send_modify(|s| s.stopped = true);
        result
    }

    fn turn(&mut self) -> Result<(), FatalError> {
        self.stats.turns += 1;
        self.stats.maybe_report();
        self.flush_proposals();
        self.flush_reads();
        self.on_ready()?;
        self.maybe_compact()?;
        self.publish();
        Ok(())
    }

    fn handle(&mut self, input: Input) {
        match input {
            Input::Raft(m) => {
                if let Err(e) = self.node.step(*m) {
                    tracing::debug!(error = %e, "raft message dropped");
                }
            }
            Input::Propose { cmd, reply, permit, term } => {
                self.batch.push((*cmd, reply, permit, term))
            }
            Input::Read { reply, permit } => self.reads_new.push((reply, permit)),
            Input::ConfChange { cc, reply } => self.propose_conf_change(cc, reply),
            // Not while a membership change is pending: a node being removed could win
            // and then apply its own removal while leading.
            Input::TransferLeader { to } if self.node.raft.has_pending_conf() => {
                tracing::warn!(to, "leadership transfer refused: a membership change is pending");
            }
            Input::TransferLeader { to } => self.node.transfer_leader(to),
            Input::Compact { reply } => {
                if let Err(e) = self.start_snapshot(Some(reply)) {
                    tracing::error!(error = %e, "could not start a snapshot");
                }
            }
            Input::SnapshotSent { to, ok } => {
                let status = if ok { SnapshotStatus::Finish } else { SnapshotStatus::Failure };
                self.node.report_snapshot(to, status);
            }
            Input::Unreachable { to } => self.node.report_unreachable(to),
        }
    }

    fn not_leader(&self) -> NodeError {
        let leader = self.node.raft.leader_id;
        let leader_id = (leader != 0).then_some(leader);
        let leader_address = leader_id.and_then(|l| {
            self.addresses
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(&l)
                .cloned()
        });
        NodeError::NotLeader { leader_id, leader_address }
    }

    fn propose_conf_change(&mut self, cc: ConfChange, reply: Reply<()>) {
        if self.node.raft.state != StateRole::Leader {
            let _ = reply.send(Err(self.not_leader()));
            return;
        }
        if self.conf_waiter.is_some() {
            let _ = reply.send(Err(NodeError::FailedPrecondition(
                "another membership change is in progress".into(),
            )));
            return;
        }
        if self.node.raft.has_pending_conf() {
            // raft-rs would turn the change into an empty entry and report it proposed: no
            // membership entry would ever apply, and the change's caller would wait in vain.
            let _ = reply.send(Err(NodeError::Busy(
                "a membership entry this leader proposed or inherited is not applied yet; \
                 retry"
                    .into(),
            )));
            return;
        }
        let ctx = cc.context.to_vec();
        match self.node.propose_conf_change(ctx, cc.clone()) {
            Ok(()) => self.conf_waiter = Some((cc, reply)),
            Err(e) => {
                let _ = reply.send(Err(NodeError::FailedPrecondition(format!(
                    "membership change refused: {e}"
                ))));
            }
        }
    }

    /// Proposes the waiting client commands as few entries as the size limits allow.
    fn flush_proposals(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.batch);
        let leading = self.node.raft.state == StateRole::Leader;
        let term = self.node.raft.term;
        let mut group = CommandBatch::default();
        let mut waiters = Vec::new();
        let mut bytes = 0usize;
        for (mut cmd, reply, permit, admitted) in batch {
            if !leading || admitted != term {
                // Admitted in an earlier term (this node lost the lead and won it back
                // while the command waited for a permit): its caller may have had it
                // retried through the leader in between, and later commands after it;
                // proposed now, it would land after them. Refused instead, as not leading
                // (nothing was proposed: any caller may retry, one without a request id
                // too; a retry applies once).
                let _ = reply.send(Err(self.not_leader()));
                continue;
            }
            cmd.origin = self.id;
            cmd.incarnation = self.incarnation;
            cmd.seq = self.next_seq;
            self.next_seq += 1;
            let size = cmd.encoded_len();
            let full = group.commands.len() >= self.cfg.max_commands_per_entry
                || bytes + size > self.cfg.max_entry_bytes;
            if full && !group.commands.is_empty() {
                self.propose_group(std::mem::take(&mut group), std::mem::take(&mut waiters));
                bytes = 0;
            }
            bytes += size;
            waiters.push((cmd.seq, reply, permit));
            group.commands.push(cmd);
        }
        if !group.commands.is_empty() {
            self.propose_group(group, waiters);
        }
    }

    fn propose_group(
        &mut self,
        mut group: CommandBatch,
        waiters: Vec<(u64, Reply<Outcome>, OwnedSemaphorePermit)>,
    ) {
        tracing::trace!(commands = group.commands.len(), "proposing one entry");
        group.dedupe_limit = self.cfg.dedupe_table_entries;
        match self.node.propose(Vec::new(), group.encode_to_vec()) {
            Ok(()) => {
                for (seq, reply, permit) in waiters {
                    self.pending.insert(seq, (reply, permit));
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "proposal dropped");
                let err = match e {
                    // Still leading (a leadership transfer under way): "not leader, try
                    // this node" would send the caller straight back here.
                    raft::Error::ProposalDropped if self.node.raft.state == StateRole::Leader => {
                        NodeError::Busy("a leadership transfer is under way: retry shortly".into())
                    }
                    raft::Error::ProposalDropped => self.not_leader(),
                    other => NodeError::Internal(other.to_string()),
                };
                for (_, reply, _) in waiters {
                    let _ = reply.send(Err(err.clone()));
                }
            }
        }
    }

    /// Starts one ReadIndex round for every read that arrived this turn. A leader that
    /// has not yet committed an entry of its term cannot serve one (raft-rs drops the
    /// request), so the reads wait for the next turn.
    fn flush_reads(&mut self) {
        if self.reads_new.is_empty() {
            return;
        }
        if self.node.raft.state != StateRole::Leader {
            let err = self.not_leader();
            for (reply, _) in self.reads_new.drain(..) {
                let _ = reply.send(Err(err.clone()));
            }
            return;
        }
        if !self.node.raft.commit_to_current_term() {
            return;
        }
        let ctx = self.next_read.to_be_bytes().to_vec();
        self.next_read += 1;
        self.node.read_index(ctx.clone());
        self.reads_sent.insert(ctx, std::mem::take(&mut self.reads_new));
    }

    fn send(&mut self, msgs: Vec<Message>) {
        for m in msgs {
            self.transport.send(m);
        }
    }

    fn on_ready(&mut self) -> Result<(), FatalError> {
        if !self.node.has_ready() {
            self.release_reads();
            return Ok(());
        }
        let mut ready = self.node.ready();
        if let Some(ss) = ready.ss() {
            if ss.raft_state != StateRole::Leader {
                self.lost_leadership();
            }
            tracing::info!(role = ?ss.raft_state, leader = ss.leader_id, "raft role changed");
        }
        if !ready.snapshot().is_empty() {
            self.install_snapshot(ready.snapshot().get_metadata().clone())?;
        }
        for rs in ready.take_read_states() {
            if let Some(waiters) = self.reads_sent.remove(rs.request_ctx.as_slice()) {
                self.reads_ready.push_back((rs.index, waiters));
            }
        }
        // The leader's appends and heartbeats (`messages`) may leave before its own fsync:
        // raft-rs counts the leader's own copy only once `advance` reports it persisted,
        // so an entry still commits only when a majority has it durable, and the
        // followers' fsyncs overlap the leader's. Every vote and every append ack
        // (`persisted_messages`) leaves only after the fsync below.
        self.send(ready.take_messages());
        let t0 = std::time::Instant::now();
        let appended = ready.entries().len();
        self.log.append(&self.storage, ready.entries())?;
        if let Some(hs) = ready.hs() {
            self.log.set_hard_state(&self.storage, hs)?;
        }
        let pending = self.log.begin_sync()?;
        let t1 = std::time::Instant::now();
        // raft-rs hands out only entries both committed and persisted here before, so
        // applying them need not wait for this Ready's fsync: it runs on a helper
        // thread while sled applies (one fdatasync for the whole Ready).
        // The messages that wait for this fsync (votes, append acks) leave from the
        // fsync thread the moment it returns, not after the apply.
        let committed = ready.take_committed_entries();
        let after_sync = ready.take_persisted_messages();
        match pending {
            Some(sync) => {
                self.syncer.submit(sync, after_sync)?;
                let applied = self.apply(committed);
                let sync_time = self.syncer.wait()?;
                applied?;
                self.stats.sync += sync_time;
                self.stats.max_sync = self.stats.max_sync.max(sync_time);
            }
            None => {
                self.send(after_sync);
                self.apply(committed)?;
            }
        }
        let synced = t0.elapsed();
        self.stats.readies += 1;
        self.stats.entries += appended as u64;
        self.stats.write += t1 - t0;
        self.stats.persist_and_apply += t1.elapsed();
        let mut light = self.node.advance(ready);
        if let Some(commit) = light.commit_index() {
            let mut hs = self.storage.read().hard_state.clone();
            hs.commit = commit;
            // Not synced on its own: a lost commit index is relearned from the leader.
            self.log.set_hard_state(&self.storage, &hs)?;
        }
        self.send(light.take_messages());
        let committed = light.take_committed_entries();
        self.apply(committed)?;
        self.node.advance_apply();
        // Applied entries past the memory budget are read back from the file if needed.
        self.storage.write().trim(self.applied, self.cfg.log_memory_bytes);
        self.release_reads();
        tracing::trace!(
            appended,
            sync_us = synced.as_micros() as u64,
            total_us = t0.elapsed().as_micros() as u64,
            "ready handled"
        );
        Ok(())
    }

    fn release_reads(&mut self) {
        while self.reads_ready.front().is_some_and(|(index, _)| *index <= self.applied) {
            if let Some((_, waiters)) = self.reads_ready.pop_front() {
                for (reply, _) in waiters {
                    let _ = reply.send(Ok(()));
                }
            }
        }
    }

    fn lost_leadership(&mut self) {
        for (_, (reply, _)) in self.pending.drain() {
            // The entry may still commit under the next leader: only a request id retry
            // can tell, so the outcome is unknown (not "not leader").
            let _ = reply.send(Err(NodeError::OutcomeUnknown));
        }
        let err = self.not_leader();
        for (_, waiters) in self.reads_sent.drain() {
            for (reply, _) in waiters {
                let _ = reply.send(Err(err.clone()));
            }
        }
        for (_, waiters) in self.reads_ready.drain(..) {
            for (reply, _) in waiters {
                let _ = reply.send(Err(err.clone()));
            }
        }
        if let Some((_, reply)) = self.conf_waiter.take() {
            let _ = reply.send(Err(NodeError::OutcomeUnknown));
        }
    }

    fn fail_all(&mut self, err: NodeError) {
        for (_, (reply, _)) in self.pending.drain() {
            let _ = reply.send(Err(err.clone()));
        }
        for (_, reply, _, _) in self.batch.drain(..) {
            let _ = reply.send(Err(err.clone()));
        }
        for (reply, _) in self.reads_new.drain(..) {
            let _ = reply.send(Err(err.clone()));
        }
        self.lost_leadership();
    }

    fn apply(&mut self, entries: Vec<Entry>) -> Result<(), FatalError> {
        let Some(last) = entries.last().map(|e| e.index) else { return Ok(()) };
        let started = std::time::Instant::now();
        let mut p = self.sm.begin();
        let mut outcomes = Vec::new();
        let mut conf = None;
        let mut conf_done = Vec::new();
        for e in &entries {
            self.applied_bytes += e.data.len() as u64;
            match e.get_entry_type() {
                EntryType::EntryNormal => {
                    if e.data.is_empty() {
                        continue; // a new leader's empty entry
                    }
                    let batch = match CommandBatch::decode(&e.data[..]) {
                        Ok(b) => b,
                        Err(err) => {
                            // Every node skips it the same way, so states stay equal.
                            tracing::error!(index = e.index, error = %err, "undecodable entry skipped");
                            continue;
                        }
                    };
                    self.stats.commands += batch.commands.len() as u64;
                    self.sm.set_entry_dedupe_limit(batch.dedupe_limit);
                    for cmd in &batch.commands {
                        let out = self.sm.apply(&mut p, e.index, cmd)?;
                        if is_own(cmd, self.id, self.incarnation) {
                            outcomes.push((cmd.seq, out));
                        }
                    }
                }
                EntryType::EntryConfChange => {
                    let cc = ConfChange::parse_from_bytes(&e.data)
                        .map_err(|err| FatalError::Setup(format!("conf change entry: {err}")))?;
                    let cs = self.node.apply_conf_change(&cc)?;
                    let addr = String::from_utf8_lossy(&cc.context).into_owned();
                    match cc.get_change_type() {
                        ConfChangeType::AddNode | ConfChangeType::AddLearnerNode => {
                            if !addr.is_empty() {
                                self.sm.set_member(&mut p, cc.node_id, Some(&addr));
                                self.addresses
                                    .write()
                                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                                    .insert(cc.node_id, addr);
                            }
                        }
                        ConfChangeType::RemoveNode => {
                            if cc.node_id == self.id && self.node.raft.state == StateRole::Leader {
                                // raft-rs leaves a leader that applied its own removal
                                // leading a group it is not in (its next commit panics
                                // the raft thread): it steps down, and the remaining
                                // voters elect a leader among themselves.
                                let term = self.node.raft.term;
                                self.node.raft.become_follower(term, raft::INVALID_ID);
                                tracing::warn!(
                                    "this node applied its own removal while leading: stepped down"
                                );
                            }
                            self.sm.set_member(&mut p, cc.node_id, None);
                            // No longer a member: its certificate sends no more Raft
                            // messages and changes nothing here.
                            if cc.node_id != self.id {
                                self.addresses
                                    .write()
                                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                                    .remove(&cc.node_id);
                            }
                        }
                    }
                    tracing::info!(change = ?cc.get_change_type(), node_id = cc.node_id, voters = ?cs.voters, learners = ?cs.learners, "membership changed");
                    self.storage.write().set_conf_state(cs.clone(), e.index);
                    conf = Some(cs);
                    conf_done.push(cc);
                }
                EntryType::EntryConfChangeV2 => {
                    let cc = ConfChangeV2::parse_from_bytes(&e.data)
                        .map_err(|err| FatalError::Setup(format!("conf change entry: {err}")))?;
                    let cs = self.node.apply_conf_change(&cc)?;
                    self.storage.write().set_conf_state(cs.clone(), e.index);
                    conf = Some(cs);
                }
            }
        }
        self.sm.commit(p, last, conf.as_ref())?;
        self.applied = last;
        self.stats.apply += started.elapsed();
        self.stats.max_apply = self.stats.max_apply.max(started.elapsed());
        if !conf_done.is_empty() {
            // Whoever waits for a membership change reads the membership from the status
            // next: it must show the change.
            self.publish();
        }
        for (seq, out) in outcomes {
            if let Some((reply, _permit)) = self.pending.remove(&seq) {
                let _ = reply.send(Ok(out));
            }
        }
        for cc in conf_done {
            let matches = self.conf_waiter.as_ref().is_some_and(|(w, _)| {
                w.node_id == cc.node_id && w.get_change_type() == cc.get_change_type()
            });
            if matches {
                if let Some((_, reply)) = self.conf_waiter.take() {
                    let _ = reply.send(Ok(()));
                }
            }
        }
        Ok(())
    }

    /// Replaces the state with a snapshot received from the leader (its file was written
    /// and fsynced by the transport before the message was stepped).
    ///
    /// The log records it first, then sled loads it: a crash in between leaves sled's
    /// applied index below the log's compaction point, and a restart reloads the file.
    /// (The other order left sled applied past the log's end, which raft-rs refuses at
    /// every start.)
    fn install_snapshot(&mut self, meta: SnapshotMetadata) -> Result<(), FatalError> {
        let path = snapshot_path(&self.snap_dir, meta.index);
        tracing::info!(index = meta.index, term = meta.term, "installing snapshot");
        self.log.install_snapshot(&self.storage, meta.clone())?;
        #[cfg(test)]
        tests::crash_point(&self.cfg.data_dir)?;
        self.sm.load_snapshot(&path)?;
        self.applied = meta.index;
        self.applied_bytes = 0;
        let members = self.sm.members()?;
        self.addresses.write().unwrap_or_else(std::sync::PoisonError::into_inner).extend(members);
        self.prune_snapshots(meta.index);
        Ok(())
    }

    fn maybe_compact(&mut self) -> Result<(), FatalError> {
        if self.snapshot_job.as_ref().is_some_and(|j| j.thread.is_finished()) {
            self.finish_snapshot()?;
        }
        if self.snapshot_job.is_some() {
            return Ok(());
        }
        let snap = self.storage.read().snapshot.index;
        let wanted = self.storage.want_snapshot.swap(false, std::sync::atomic::Ordering::Relaxed);
        let backing_off = self.snapshot_retry_at.is_some_and(|t| std::time::Instant::now() < t);
        if wanted
            || !backing_off
                && (self.applied.saturating_sub(snap) >= self.cfg.compact_log_entries
                    || self.applied_bytes >= self.cfg.compact_log_bytes)
        {
            self.start_snapshot(None)?;
        }
        Ok(())
    }

    /// Starts snapshotting the state at the applied index into a durable file on its own
    /// thread; the log is dropped up to it once the file is durable (only past that
    /// point: sled alone is not durable). The Raft thread only copies the index, so a
    /// large store no longer stalls heartbeats and writes for the seconds it takes to
    /// write every block out.
    fn start_snapshot(&mut self, waiter: Option<Reply<u64>>) -> Result<(), FatalError> {
        if let Some(job) = &mut self.snapshot_job {
            job.waiters.extend(waiter);
            return Ok(());
        }
        let index = self.applied;
        let (snap, term, conf) = {
            let core = self.storage.read();
            (core.snapshot.index, core.term(index), core.conf_state().clone())
        };
        if index <= snap {
            if let Some(w) = waiter {
                let _ = w.send(Ok(snap));
            }
            return Ok(());
        }
        let mut meta = SnapshotMetadata { index, term: term?, ..Default::default() };
        meta.set_conf_state(conf);
        let started = std::time::Instant::now();
        // A checkpoint: the index and links to the (sealed) blob segments, not a copy of
        // every block; a snapshot file is made from it only when a member needs one.
        let path = checkpoint_path(&self.snap_dir, index);
        let view = match self.sm.checkpoint_view(&path.with_extension("d.tmp")) {
            Ok(view) => view,
            // The snapshot folder could not take the checkpoint's links (a full disk, a
            // folder gone): this snapshot fails, the node goes on (it stopped).
            Err(StateError::Io { path: at, source }) if at.starts_with(&self.snap_dir) => {
                let e = StateError::Io { path: at, source };
                self.snapshot_failed(index, &e);
                if let Some(w) = waiter {
                    let _ = w.send(Err(NodeError::Internal(format!(
                        "snapshot at index {index} failed: {e}"
                    ))));
                }
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        let at = view.at();
        let copied = started.elapsed();
        let cancel = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (job_meta, job_cancel) = (meta.clone(), cancel.clone());
        let span = tracing::Span::current();
        let thread = std::thread::Builder::new()
            .name(format!("pss-snapshot-{}", self.id))
            .spawn(move || span.in_scope(|| view.write(&path, &job_meta, &job_cancel)))
            .map_err(|e| FatalError::Setup(format!("spawning the snapshot thread: {e}")))?;
        tracing::debug!(index, index_copy_ms = copied.as_millis() as u64, "snapshot started");
        self.applied_bytes = 0;
        self.snapshot_job = Some(SnapshotJob {
            meta,
            at,
            started,
            cancel,
            thread,
            waiters: waiter.into_iter().collect(),
        });
        Ok(())
    }

    /// Counts a failed snapshot; the next one the log's size calls for waits
    /// `snapshot_retry_ms`, doubling with each failure in a row up to 64x (an operator's
    /// CompactLog goes at once).
    fn snapshot_failed(&mut self, index: u64, e: &StateError) {
        self.snapshot_failures += 1;
        self.snapshot_failures_in_row = self.snapshot_failures_in_row.saturating_add(1);
        let shift = (self.snapshot_failures_in_row - 1).min(6);
        let wait =
            std::time::Duration::from_millis(self.cfg.snapshot_retry_ms.saturating_mul(1 << shift));
        self.snapshot_retry_at = Some(std::time::Instant::now() + wait);
        tracing::warn!(index, error = %e, retry_in_ms = wait.as_millis() as u64, "snapshot failed");
    }

    /// Compacts the log up to a finished snapshot (unless a newer one was installed
    /// meanwhile) and answers whoever waited for it.
    fn finish_snapshot(&mut self) -> Result<(), FatalError> {
        let Some(job) = self.snapshot_job.take() else { return Ok(()) };
        let index = job.meta.index;
        let result = job.thread.join().unwrap_or_else(|_| {
            Err(StateError::Corrupt {
                path: self.snap_dir.clone(),
                reason: "the snapshot thread panicked".into(),
            })
        });
        let reply = match result {
            Ok(bytes) => {
                let current = self.storage.read().snapshot.index;
                if index > current {
                    // The block index now starts from this checkpoint (durably, before
                    // the older ones it may have started from are pruned).
                    self.sm.set_index_base(crate::index::IndexBase::Checkpoint {
                        index,
                        at: job.at,
                    })?;
                    self.log.install_snapshot(&self.storage, job.meta)?;
                    self.prune_snapshots(index);
                }
                tracing::info!(
                    index,
                    bytes,
                    elapsed_ms = job.started.elapsed().as_millis() as u64,
                    "log compacted"
                );
                self.snapshot_failures_in_row = 0;
                self.snapshot_retry_at = None;
                Ok(index.max(current))
            }
            Err(e) => {
                // Not fatal: the log stays as it is and a later trigger tries again.
                self.snapshot_failed(index, &e);
                Err(NodeError::Internal(format!("snapshot at index {index} failed: {e}")))
            }
        };
        for w in job.waiters {
            let _ = w.send(reply.clone());
        }
        Ok(())
    }

    /// Keeps the current snapshot (file or checkpoint) and the one before (a transfer may
    /// be reading it); removes older ones and any left half-written.
    fn prune_snapshots(&self, current: u64) {
        let Ok(dir) = std::fs::read_dir(&self.snap_dir) else { return };
        let mut found: Vec<(u64, PathBuf)> = Vec::new();
        for e in dir.filter_map(Result::ok) {
            let path = e.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
            match crate::snapshot::index_of(name) {
                Some(i) if i < current => found.push((i, path)),
                Some(_) => {}
                // A checkpoint directory that never finished (none is being written now).
                None if name.ends_with(".d.tmp") && self.snapshot_job.is_none() => {
                    found.push((0, path))
                }
                None => {}
            }
        }
        let previous = found.iter().map(|(i, _)| *i).max();
        for (i, p) in found {
            if Some(i) == previous && i != 0 {
                continue;
            }
            let r = if p.is_dir() { std::fs::remove_dir_all(&p) } else { std::fs::remove_file(&p) };
            if let Err(e) = r {
                tracing::warn!(path = %p.display(), error = %e, "could not remove an old snapshot");
            }
        }
    }

    fn publish(&mut self) {
        let raft = &self.node.raft;
        let core = self.storage.read();
        let conf = raft.prs().conf().to_conf_state();
        let mut voters = conf.voters.clone();
        voters.sort_unstable();
        let mut learners = conf.learners.clone();
        learners.sort_unstable();
        let matched = if raft.state == StateRole::Leader {
            raft.prs().iter().map(|(id, pr)| (*id, pr.matched)).collect()
        } else {
            BTreeMap::new()
        };
        let next = NodeStatus {
            id: self.id,
            role: raft.state.into(),
            term: raft.term,
            leader_id: raft.leader_id,
            commit_index: raft.raft_log.committed,
            applied_index: self.applied,
            first_index: core.first_index(),
            last_index: core.last_index(),
            snapshot_index: core.snapshot.index,
            snapshot_failures: self.snapshot_failures,
            voters,
            learners,
            matched,
            stopped: false,
        };
        drop(core);
        self.status.send_if_modified(|s| {
            if *s == next {
                false
            } else {
                *s = next;
                true
            }
        });
    }
}

/// Removes what a crash left half-written in the snapshot folder (each as large as the
/// store: a snapshot being received, `recv-*.tmp`; one being written, `snap-N.tmp*`; a
/// checkpoint being made, `snap-N.d.tmp`). Nothing refers to them; at start none is being
/// written.
fn remove_unfinished(snap_dir: &Path) {
    let Ok(dir) = std::fs::read_dir(snap_dir) else { return };
    for e in dir.filter_map(Result::ok) {
        let path = e.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
        let unfinished = (name.starts_with("recv-") && name.ends_with(".tmp"))
            || (name.starts_with("snap-") && name.contains(".tmp"));
        if !unfinished {
            continue;
        }
        let r = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match r {
            Ok(()) => tracing::info!(path = %path.display(), "removed an unfinished snapshot file"),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "could not remove an unfinished snapshot file")
            }
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn unfinished_snapshot_files_are_removed_and_finished_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for f in
            ["recv-00000000000000000007-99.tmp", "snap-00000000000000000007.tmp-123", "snap-7.tmp"]
        {
            std::fs::write(d.join(f), b"x").unwrap();
        }
        std::fs::create_dir(d.join("snap-00000000000000000007.d.tmp")).unwrap();
        std::fs::write(d.join("snap-00000000000000000007.d.tmp").join("index"), b"x").unwrap();
        let keep = ["snap-00000000000000000005.snap", "snap-00000000000000000006.d"];
        std::fs::write(d.join(keep[0]), b"x").unwrap();
        std::fs::create_dir(d.join(keep[1])).unwrap();
        remove_unfinished(d);
        let mut left: Vec<String> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, keep);
    }
    use super::*;
    use crate::testing::LocalCluster;
    use std::path::Path;
    use wayside_proto::pb;

    /// Data dirs whose node fails (as if it crashed) at [`crash_point`], each with whom to
    /// tell when it did.
    static CRASH_POINTS: std::sync::Mutex<Vec<(PathBuf, oneshot::Sender<()>)>> =
        std::sync::Mutex::new(Vec::new());

    /// In `install_snapshot`, between recording a received snapshot in the log and loading
    /// it into the state machine: an armed node stops there (once), as a crash would.
    pub(super) fn crash_point(data_dir: &Path) -> Result<(), FatalError> {
        let mut armed = CRASH_POINTS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(i) = armed.iter().position(|(d, _)| d == data_dir) else { return Ok(()) };
        let (_, fired) = armed.swap_remove(i);
        let _ = fired.send(());
        Err(FatalError::Setup("injected crash while installing a received snapshot".into()))
    }

    fn arm_crash_point(data_dir: PathBuf) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        CRASH_POINTS.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push((data_dir, tx));
        rx
    }

    /// A command admitted in an earlier term than the leader's (it waited for a permit while
    /// this node lost the lead and won it back) is refused, not proposed: its caller may
    /// have had it retried through the leader in between, with later commands after it,
    /// and proposed now it would land after them. One of the current term is proposed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_command_admitted_in_an_earlier_term_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let peers = vec![crate::config::Peer { id: 1, address: "127.0.0.1:1".into() }];
        let cfg = crate::testing::test_config(1, peers, dir.path().to_owned());
        let stop = CancellationToken::new();
        let tracker = tokio_util::task::TaskTracker::new();
        let started =
            start(cfg, None, tokio::runtime::Handle::current(), tracker.clone(), stop.clone())
                .unwrap();
        let h = started.handle.clone();
        let mut status = h.status.clone();
        let term = status.wait_for(|s| s.role == Role::Leader).await.unwrap().term;
        let cmd = |seq: u64| Command {
            acquire: Some(pb::AcquireVolumeRequest {
                volume: format!("v{seq}"),
                owner_node: "nms".into(),
                owner_address: "127.0.0.1:9".into(),
                owner_session: 0,
                expected_epoch: 0,
                create: Some(pb::CreateSpec { block_size: 4096, credential_hash: vec![7; 32] }),
                request_id: Some(pb::RequestId { client_id: "nms".into(), seq }),
            }),
            ..Default::default()
        };
        let propose = |term: u64, seq: u64| {
            let (h, cmd) = (h.clone(), Box::new(cmd(seq)));
            async move {
                let permit = h.inflight.clone().acquire_owned().await.unwrap();
                h.call(|reply| Input::Propose { cmd, reply, permit, term }).await
            }
        };
        let stale = propose(term - 1, 1).await;
        assert!(matches!(stale, Err(NodeError::NotLeader { .. })), "{stale:?}");
        propose(term, 2).await.expect("the current term's command is proposed");
        // Through `propose`: a command waiting for a proposal permit while the node is
        // elected again (a new term) is refused once it gets one (the term it was admitted
        // in is taken before the wait).
        let all = h.inflight.available_permits() as u32;
        let held = h.inflight.clone().acquire_many_owned(all).await.unwrap();
        let mut waiting = Box::pin(h.propose(cmd(3)));
        assert!(futures::poll!(&mut waiting).is_pending(), "it waits for a permit");
        // A heartbeat of a later term (from a node it does not know) makes it a follower;
        // alone, it is elected again, in a later term still.
        let mut beat = Message::default();
        beat.set_msg_type(raft::prelude::MessageType::MsgHeartbeat);
        (beat.from, beat.to, beat.term) = (2, 1, term + 1);
        h.tx.send(Input::Raft(Box::new(beat))).await.unwrap();
        let again = status.wait_for(|s| s.role == Role::Leader && s.term > term + 1);
        tokio::time::timeout(std::time::Duration::from_secs(10), again).await.unwrap().unwrap();
        drop(held);
        let r = waiting.await;
        assert!(matches!(r, Err(NodeError::NotLeader { .. })), "{r:?}");
        h.propose(cmd(4)).await.expect("a command admitted in the new term is proposed");
        stop.cancel();
        tracker.close();
        let _ = tokio::task::spawn_blocking(move || started.thread.join()).await;
    }

    /// A leader that stopped before its proposals committed and won again commits them
    /// under its new term; the new process's sequence numbers start over, so the old
    /// commands' outcomes must not go to the new requests waiting under the same numbers.
    #[test]
    fn a_command_of_an_earlier_process_is_not_routed_to_a_request_of_this_one() {
        let (earlier, now) = (new_incarnation(), new_incarnation());
        assert!(earlier != 0 && now != 0 && earlier != now);
        let stamped =
            |incarnation| Command { origin: 1, seq: 1, incarnation, ..Default::default() };
        // Through the entry encoding, as the apply sees them.
        let batch =
            CommandBatch { commands: vec![stamped(earlier), stamped(now)], dedupe_limit: 0 };
        let decoded = CommandBatch::decode(&batch.encode_to_vec()[..]).unwrap();
        let [old, new] = &decoded.commands[..] else { panic!("two commands") };
        assert!(!is_own(old, 1, now), "an earlier process's seq 1 went to this one's seq 1");
        assert!(is_own(new, 1, now));
        assert!(!is_own(new, 2, now), "another node's command");

        // An entry of a PSS from before incarnations (no field 5) decodes with 0, which no
        // process has; and such a PSS decodes a new entry (skipping the field).
        #[derive(Clone, PartialEq, prost::Message)]
        struct OldCommand {
            #[prost(uint64, tag = "1")]
            origin: u64,
            #[prost(uint64, tag = "2")]
            seq: u64,
        }
        let legacy =
            Command::decode(&OldCommand { origin: 1, seq: 1 }.encode_to_vec()[..]).unwrap();
        assert_eq!((legacy.origin, legacy.seq, legacy.incarnation), (1, 1, 0));
        assert!(!is_own(&legacy, 1, now));
        let read_by_old = OldCommand::decode(&stamped(now).encode_to_vec()[..]).unwrap();
        assert_eq!(read_by_old, OldCommand { origin: 1, seq: 1 });
    }

    fn put(epoch: u64, seq: u64) -> pb::WriteBatchRequest {
        pb::WriteBatchRequest {
            volume: "crash-vol".into(),
            epoch,
            request_id: Some(pb::RequestId { client_id: "w".into(), seq }),
            ops: vec![pb::PssBlockOp {
                block: seq % 16,
                data: vec![(seq % 251) as u8; 4096],
                delete: false,
                version: 0,
            }],
            persisted_lsn: seq,
        }
    }

    /// A follower that crashes after recording a received snapshot in its log and before
    /// loading it into sled starts again (reloading the snapshot file) and catches up. In
    /// the other order (sled first) the crash left sled applied past the log's end and
    /// every restart panicked in raft-rs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_crash_while_installing_a_received_snapshot_is_recovered_at_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mut cluster =
            LocalCluster::start_with(3, dir.path(), |c| c.compact_log_entries = 30).await.unwrap();
        let client = cluster.client();
        let acquire = pb::AcquireVolumeRequest {
            volume: "crash-vol".into(),
            owner_node: "nms".into(),
            owner_address: "127.0.0.1:9".into(),
            owner_session: 0,
            expected_epoch: 0,
            create: Some(pb::CreateSpec { block_size: 4096, credential_hash: vec![7; 32] }),
            request_id: Some(pb::RequestId { client_id: "nms".into(), seq: 1 }),
        };
        let epoch = client.acquire_volume(acquire).await.unwrap().meta.unwrap().epoch;
        let leader = cluster.wait_for_leader(Duration::from_secs(5)).await.unwrap();
        let down = (1..=3).find(|id| *id != leader).unwrap();
        cluster.stop_node(down).await.unwrap();
        // One entry per write: the leader's log is compacted past all the stopped node has.
        for seq in 1..=80 {
            client.write_batch(put(epoch, seq)).await.unwrap();
        }
        // (Its snapshots run beside the writes: the one the last writes call for may still
        // be under way.)
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let st = loop {
            let st = cluster.status(leader).await.unwrap();
            if st.first_index > 40 {
                break st;
            }
            assert!(std::time::Instant::now() < deadline, "the leader compacted its log: {st:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };

        let data_dir = dir.path().join(format!("node-{down}"));
        let crashed = arm_crash_point(data_dir.clone());
        cluster.restart_node(down).await.unwrap();
        tokio::time::timeout(Duration::from_secs(30), crashed)
            .await
            .expect("the follower was sent no snapshot")
            .unwrap();
        let stopped = cluster.stop_node(down).await;
        assert!(stopped.is_err(), "the node stopped on the injected crash: {stopped:?}");
        {
            // The crash window: the log has the snapshot, sled does not.
            let (_, core, _) = DurableLog::open(&data_dir, 64 << 20, false).unwrap();
            let sm = StateMachine::open_in(
                &data_dir.join("sm"),
                &data_dir.join("snap"),
                crate::state::Options::with_dedupe(16),
            )
            .unwrap();
            assert!(core.snapshot.index > 1, "the log recorded the received snapshot");
            assert!(sm.applied().unwrap() < core.snapshot.index, "sled has not loaded it");
        }

        cluster.restart_node(down).await.unwrap();
        let target = st.commit_index;
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            assert!(!cluster.node_exited(down), "the restarted node failed");
            if cluster.status(down).await.is_some_and(|s| s.applied_index >= target) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "node {down} did not catch up");
            // Polling its status until the deadline, not waiting blindly.
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let ep = cluster.endpoint(down).unwrap();
        let mut theirs =
            pb::pss_blocks_client::PssBlocksClient::connect(ep.uri().to_owned()).await.unwrap();
        let req = pb::GetBlocksRequest {
            volume: "crash-vol".into(),
            blocks: (0..16).collect(),
            consistency: pb::ReadConsistency::Stale as i32,
        };
        let theirs = theirs.get_blocks(req).await.unwrap().into_inner().blocks;
        let vol = wayside_proto::types::VolumeName::new("crash-vol").unwrap();
        let ours = client.get_blocks(&vol, &(0..16).collect::<Vec<_>>()).await.unwrap();
        assert_eq!(theirs, ours);
        assert_eq!(ours[0].data, vec![80u8; 4096]); // block 0 last written by seq 80
        cluster.shutdown().await;
    }
}
