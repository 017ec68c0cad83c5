//! Raft messages between PSS nodes over gRPC (`wayside.v1.RaftTransport`).
//!
//! Outbound: one worker task per peer with a bounded queue; a full queue drops the
//! message (Raft resends) rather than blocking the node loop. Ordinary messages go in
//! batches (envelopes) on one long-lived `Send` stream per peer, reopened when it fails;
//! a `MsgSnapshot` goes on `InstallSnapshot`, followed by the snapshot file in chunks,
//! and its outcome is reported back to raft-rs.
//! Inbound: the service decodes messages and queues them for the node loop (awaiting
//! room: backpressure to the sender). A snapshot's file is written and fsynced before
//! its message reaches the node.
//!
//! Who may send: over TLS every caller of a PSS holds a certificate signed by the road's
//! CA, but so does every NMS and operator. A Raft message claiming to come from node
//! `from` is therefore accepted only over a connection whose client certificate is valid
//! for the host of `from`'s address in the node's address book ([`PeerCheck`]); anything
//! else is refused with `PERMISSION_DENIED`. Without TLS there is no caller identity to
//! check and nothing is.

use crate::config::Config;
use crate::node::{checkpoint_path, snapshot_path, AddressBook, Input};
use futures::StreamExt;
use protobuf::Message as _;
use raft::prelude::{Message, MessageType, SnapshotMetadata};
use rustls_pki_types::{CertificateDer, ServerName};
use std::collections::HashMap;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};
use wayside_proto::pb;
use wayside_proto::pb::raft_transport_client::RaftTransportClient;
use wayside_proto::tls::Tls;

/// Most messages sent in one `RaftEnvelope`.
pub const MAX_MESSAGES_PER_ENVELOPE: usize = 1024;
/// Longest a batch may wait for room on the stream to its peer before the stream is
/// given up (the peer stopped reading).
const SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// Envelopes queued on the stream to one peer beyond what HTTP/2 has sent.
const STREAM_QUEUE_ENVELOPES: usize = 64;
/// HTTP/2 keep-alive on the connections to peers: a PING this often while a stream is
/// open, and the connection is dropped (the stream fails, the peer is reported
/// unreachable) when no answer comes within [`PEER_KEEPALIVE_TIMEOUT`]. Without it a
/// link that silently drops packets would hold the stream open forever.
const PEER_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
const PEER_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);

/// The open `Send` stream to a peer.
struct OpenStream {
    tx: mpsc::Sender<pb::RaftEnvelope>,
    call: Pin<Box<dyn std::future::Future<Output = Result<(), Status>> + Send>>,
}
/// Pause after a failed send before the next attempt, so a dead peer costs little.
const RETRY_PAUSE: Duration = Duration::from_millis(100);

/// The outbound side, owned by the node loop (a clone shares the peer queues, so the
/// loop's fsync thread can send the messages that wait for that fsync).
#[derive(Clone)]
pub struct Transport {
    id: u64,
    addresses: AddressBook,
    node_tx: mpsc::Sender<Input>,
    snap_dir: PathBuf,
    queue_capacity: usize,
    chunk_bytes: usize,
    max_message_bytes: usize,
    /// Time allowed for a whole snapshot transfer (`snapshot_send_timeout_ms`).
    snapshot_timeout: Duration,
    /// What peers are dialled with: over TLS, presenting this node's certificate (a peer,
    /// like every PSS, requires one signed by the road's CA); `None`: plaintext.
    tls: Option<Tls>,
    runtime: tokio::runtime::Handle,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    peers: std::sync::Arc<Mutex<HashMap<u64, mpsc::Sender<Message>>>>,
}

impl Transport {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: u64,
        addresses: AddressBook,
        node_tx: mpsc::Sender<Input>,
        snap_dir: PathBuf,
        cfg: &Config,
        tls: Option<Tls>,
        runtime: tokio::runtime::Handle,
        tracker: TaskTracker,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            id,
            addresses,
            node_tx,
            snap_dir,
            queue_capacity: cfg.peer_queue_messages,
            chunk_bytes: cfg.snapshot_chunk_bytes,
            max_message_bytes: cfg.max_message_size_bytes,
            snapshot_timeout: Duration::from_millis(cfg.snapshot_send_timeout_ms),
            tls,
            runtime,
            tracker,
            shutdown,
            peers: std::sync::Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// Queues a message for its peer; never blocks.
    pub fn send(&self, msg: Message) {
        let to = msg.to;
        let mut peers = self.peers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let tx = peers.entry(to).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(self.queue_capacity);
            let worker = PeerWorker {
                from: self.id,
                to,
                addresses: self.addresses.clone(),
                node_tx: self.node_tx.clone(),
                snap_dir: self.snap_dir.clone(),
                chunk_bytes: self.chunk_bytes,
                max_message_bytes: self.max_message_bytes,
                snapshot_timeout: self.snapshot_timeout,
                tls: self.tls.clone(),
                client: None,
                refused: None,
            };
            let shutdown = self.shutdown.clone();
            let span = tracing::debug_span!("raft_peer", node = self.id, peer = to);
            let task = tracing::Instrument::instrument(worker.run(rx, shutdown), span);
            self.tracker.spawn_on(task, &self.runtime);
            tx
        });
        if let Err(mpsc::error::TrySendError::Full(m)) = tx.try_send(msg) {
            tracing::debug!(to, kind = ?m.get_msg_type(), "peer queue full; message dropped");
            let _ = self.node_tx.try_send(Input::Unreachable { to });
            if m.get_msg_type() == MessageType::MsgSnapshot {
                // raft-rs holds the follower in its snapshot state (replication paused)
                // until told how the send went: told, whatever the node's queue holds
                // (from a task: this is the raft thread, the queue's only reader).
                let node_tx = self.node_tx.clone();
                self.runtime.spawn(async move {
                    let _ = node_tx.send(Input::SnapshotSent { to, ok: false }).await;
                });
            }
        }
    }
}

struct PeerWorker {
    from: u64,
    to: u64,
    addresses: AddressBook,
    node_tx: mpsc::Sender<Input>,
    snap_dir: PathBuf,
    chunk_bytes: usize,
    max_message_bytes: usize,
    snapshot_timeout: Duration,
    tls: Option<Tls>,
    client: Option<(String, RaftTransportClient<Channel>)>,
    /// The last address that could not be dialled (logged once, not per message).
    refused: Option<String>,
}

impl PeerWorker {
    fn client(&mut self) -> Option<RaftTransportClient<Channel>> {
        let addr = self
            .addresses
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&self.to)
            .cloned()?;
        if self.client.as_ref().is_none_or(|(a, _)| *a != addr) {
            // Over TLS when this node has it, whatever scheme the address book holds: an
            // `http://` there never downgrades a Raft hop to plaintext.
            let endpoint = wayside_proto::types::Endpoint::parse(&addr)
                .map_err(|e| e.to_string())
                .and_then(|ep| {
                    wayside_proto::client::endpoint(&ep, self.tls.as_ref())
                        .map_err(|e| e.to_string())
                });
            let endpoint = match endpoint {
                Ok(e) => e,
                Err(e) => {
                    if self.refused.as_deref() != Some(addr.as_str()) {
                        tracing::warn!(peer = self.to, %addr, error = %e, "cannot dial peer");
                        self.refused = Some(addr);
                    }
                    return None;
                }
            };
            let channel = endpoint
                .connect_timeout(Duration::from_secs(1))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(PEER_KEEPALIVE_INTERVAL)
                .keep_alive_timeout(PEER_KEEPALIVE_TIMEOUT)
                .initial_connection_window_size(crate::server::HTTP2_CONNECTION_WINDOW_BYTES)
                .initial_stream_window_size(crate::server::HTTP2_STREAM_WINDOW_BYTES)
                .connect_lazy();
            let c = RaftTransportClient::new(channel)
                .max_decoding_message_size(self.max_message_bytes)
                .max_encoding_message_size(self.max_message_bytes);
            self.client = Some((addr, c));
        }
        self.client.as_ref().map(|(_, c)| c.clone())
    }

    /// Opens the long-lived `Send` stream to the peer: envelopes pushed into the returned
    /// sender go out as they come (no round trip per batch); the future ends only when
    /// the stream fails (the peer went away, or HTTP/2 keep-alive found the link dead).
    fn open(&self, mut client: RaftTransportClient<Channel>) -> OpenStream {
        let (tx, rx) = mpsc::channel(STREAM_QUEUE_ENVELOPES);
        let call = Box::pin(async move {
            client.send(tokio_stream::wrappers::ReceiverStream::new(rx)).await.map(|_| ())
        });
        OpenStream { tx, call }
    }

    /// After a failed send: tell raft-rs, wait a little, and drop what queued meanwhile
    /// (stale by the time the peer is back; Raft resends what matters).
    async fn failed(&self, rx: &mut mpsc::Receiver<Message>, shutdown: &CancellationToken) -> bool {
        let _ = self.node_tx.try_send(Input::Unreachable { to: self.to });
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = tokio::time::sleep(RETRY_PAUSE) => {}
        }
        while let Ok(m) = rx.try_recv() {
            self.dropped(&m).await;
        }
        true
    }

    /// A message dropped unsent: a snapshot's failure is reported (raft-rs pauses the
    /// follower's replication until told), waiting for room in the node's queue.
    async fn dropped(&self, m: &Message) {
        if m.get_msg_type() == MessageType::MsgSnapshot {
            let _ = self.node_tx.send(Input::SnapshotSent { to: self.to, ok: false }).await;
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Message>, shutdown: CancellationToken) {
        let mut held: Option<Message> = None;
        let mut open: Option<OpenStream> = None;
        loop {
            let first = match held.take() {
                Some(m) => m,
                None => tokio::select! {
                    _ = shutdown.cancelled() => return,
                    m = rx.recv() => match m { Some(m) => m, None => return },
                    r = async { (&mut open.as_mut().expect("guarded").call).await }, if open.is_some() => {
                        tracing::debug!(peer = self.to, result = ?r.err(), "raft stream ended");
                        open = None;
                        if !self.failed(&mut rx, &shutdown).await { return; }
                        continue;
                    }
                },
            };
            let Some(client) = self.client() else {
                let _ = self.node_tx.try_send(Input::Unreachable { to: self.to });
                self.dropped(&first).await;
                continue;
            };
            if first.get_msg_type() == MessageType::MsgSnapshot {
                let ok = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    r = self.send_snapshot(client, first) => r,
                };
                let _ = self.node_tx.send(Input::SnapshotSent { to: self.to, ok }).await;
                continue;
            }
            let mut batch = vec![first.write_to_bytes().unwrap_or_default()];
            let mut bytes = batch[0].len();
            while batch.len() < MAX_MESSAGES_PER_ENVELOPE && bytes < self.max_message_bytes / 2 {
                let Ok(m) = rx.try_recv() else { break };
                if m.get_msg_type() == MessageType::MsgSnapshot {
                    held = Some(m);
                    break;
                }
                let b = m.write_to_bytes().unwrap_or_default();
                bytes += b.len();
                batch.push(b);
            }
            let env = pb::RaftEnvelope { from: self.from, to: self.to, messages: batch };
            let stream = open.get_or_insert_with(|| self.open(client));
            // A peer that stops reading fills the stream's queue: give up on the stream
            // after SEND_TIMEOUT rather than hold the node's messages behind it.
            let sent = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = tokio::time::timeout(SEND_TIMEOUT, stream.tx.send(env)) => matches!(r, Ok(Ok(()))),
                r = &mut stream.call => {
                    tracing::debug!(peer = self.to, result = ?r.err(), "raft stream ended");
                    false
                }
            };
            if !sent {
                open = None;
                if !self.failed(&mut rx, &shutdown).await {
                    return;
                }
            }
        }
    }

    async fn send_snapshot(&self, mut client: RaftTransportClient<Channel>, msg: Message) -> bool {
        let index = msg.get_snapshot().get_metadata().index;
        let path = snapshot_path(&self.snap_dir, index);
        let checkpoint = checkpoint_path(&self.snap_dir, index);
        if !path.exists() && checkpoint.is_dir() {
            // This node's own compaction took a checkpoint: make the self-contained file
            // a member is sent (once; later sends reuse it).
            let started = std::time::Instant::now();
            let out = path.clone();
            match tokio::task::spawn_blocking(move || {
                crate::snapshot::materialize(&checkpoint, &out)
            })
            .await
            {
                Ok(Ok(bytes)) => tracing::info!(
                    index,
                    bytes,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "snapshot file made from the checkpoint"
                ),
                Ok(Err(e)) => {
                    tracing::warn!(index, error = %e, "could not make the snapshot file; raft will retry");
                    return false;
                }
                Err(e) => {
                    tracing::warn!(index, error = %e, "snapshot file task failed; raft will retry");
                    return false;
                }
            }
        }
        let file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!(index, error = %e, "snapshot file missing; raft will retry");
                return false;
            }
        };
        let started = std::time::Instant::now();
        let header = pb::SnapshotChunk {
            from: self.from,
            to: self.to,
            message: msg.write_to_bytes().unwrap_or_default(),
            data: Vec::new(),
            last: false,
        };
        let (from, to, chunk) = (self.from, self.to, self.chunk_bytes);
        let body = futures::stream::unfold(Some(file), move |file| async move {
            let mut file = file?;
            let mut buf = vec![0u8; chunk];
            let mut n = 0;
            // Fill the chunk (short reads happen), so every chunk but the last is full.
            while n < chunk {
                match file.read(&mut buf[n..]).await {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) => {
                        tracing::warn!(error = %e, "reading snapshot file");
                        return None;
                    }
                }
            }
            buf.truncate(n);
            let last = n < chunk;
            let c = pb::SnapshotChunk { from, to, message: Vec::new(), data: buf, last };
            Some((c, if last { None } else { Some(file) }))
        });
        let stream = futures::stream::iter([header]).chain(body);
        match tokio::time::timeout(self.snapshot_timeout, client.install_snapshot(stream)).await {
            Ok(Ok(_)) => {
                tracing::info!(
                    index,
                    peer = self.to,
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "snapshot sent"
                );
                true
            }
            Ok(Err(e)) => {
                tracing::warn!(index, error = %e, "snapshot transfer failed");
                false
            }
            Err(_) => {
                tracing::warn!(index, "snapshot transfer timed out");
                false
            }
        }
    }
}

/// A refusal of a claimed sender is logged at warn at most this often per claimed id
/// (the rest at debug): a caller retrying in a loop must not flood the log.
const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(60);
/// Most claimed ids whose last warning is remembered (ids are the caller's to choose).
const REFUSAL_LOG_IDS: usize = 64;

/// Binds inbound Raft messages to the sending peer's identity (a node serving TLS): a
/// message from node `from` is accepted only over a connection whose client certificate
/// (already checked by the TLS handshake to be signed by the road's CA) is valid for the
/// host of `from`'s address in the address book: the configured peers, and members added
/// later, whose address the `AddNode` entry recorded. A road certificate of another
/// machine (an NMS's, an operator's) names no peer's address and is refused.
pub struct PeerCheck {
    addresses: AddressBook,
    /// When a refusal of each claimed id was last logged at warn.
    logged: Mutex<HashMap<u64, Instant>>,
}

impl PeerCheck {
    pub fn new(addresses: AddressBook) -> Self {
        Self { addresses, logged: Mutex::new(HashMap::new()) }
    }

    /// Ok when `certs` (the caller's chain, leaf first) names the address node `from` has
    /// in this node's (`this`) address book; else `PERMISSION_DENIED`, saying why.
    fn check(
        &self,
        certs: Option<&[CertificateDer<'static>]>,
        from: u64,
        this: u64,
    ) -> Result<(), Status> {
        let addr = self
            .addresses
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&from)
            .cloned();
        let refused = match addr {
            None => format!(
                "raft messages claiming to come from node {from} refused by node {this}: node \
                 {from} is not a member this node knows an address for"
            ),
            Some(addr) => match certs.and_then(<[_]>::first) {
                None => format!(
                    "raft messages claiming to come from node {from} ({addr}) refused by node \
                     {this}: the caller presented no certificate"
                ),
                Some(leaf) => match certificate_names(leaf, &addr) {
                    Ok(()) => return Ok(()),
                    Err(why) => format!(
                        "raft messages claiming to come from node {from} ({addr}) refused by \
                         node {this}: the caller's certificate is not valid for that address \
                         ({why})"
                    ),
                },
            },
        };
        self.log(from, &refused);
        Err(Status::permission_denied(refused))
    }

    /// Ok when `certs` (the caller's chain, leaf first) is valid for the address of any
    /// member in the address book: the caller is one of the cluster's own nodes (or holds
    /// one's certificate). Else `PERMISSION_DENIED` naming `what` was refused.
    pub fn check_member(
        &self,
        certs: Option<&[CertificateDer<'static>]>,
        what: &str,
    ) -> Result<(), Status> {
        let Some(leaf) = certs.and_then(<[_]>::first) else {
            return Err(Status::permission_denied(format!(
                "{what} needs a PSS node's certificate; the caller presented none"
            )));
        };
        let book = self.addresses.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        if book.values().any(|addr| certificate_names(leaf, addr).is_ok()) {
            return Ok(());
        }
        Err(Status::permission_denied(format!(
            "{what} needs a PSS node's certificate (one naming a member's address: {}); the \
             caller's names none (an NMS's or an operator's road certificate reads and writes \
             blocks, it does not change the cluster)",
            book.values().cloned().collect::<Vec<_>>().join(", ")
        )))
    }

    fn log(&self, from: u64, refused: &str) {
        let now = Instant::now();
        let mut logged = self.logged.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let due = logged.get(&from).is_none_or(|t| now.duration_since(*t) >= REFUSAL_LOG_INTERVAL);
        if due && logged.len() >= REFUSAL_LOG_IDS {
            logged.retain(|_, t| now.duration_since(*t) < REFUSAL_LOG_INTERVAL);
        }
        if due && (logged.len() < REFUSAL_LOG_IDS || logged.contains_key(&from)) {
            logged.insert(from, now);
            tracing::warn!(
                claimed = from,
                "{refused} (logged at most once a minute per claimed node)"
            );
        } else {
            tracing::debug!(claimed = from, "{refused}");
        }
    }
}

/// The host of a peer address (`host:port`, `http(s)://host:port`, `[v6]:port`), as the
/// name a certificate must be valid for: an IP address or a DNS name.
fn server_name_of(addr: &str) -> Result<ServerName<'static>, String> {
    let ep = wayside_proto::types::Endpoint::parse(addr).map_err(|e| e.to_string())?;
    let authority = ep.authority();
    let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    ServerName::try_from(host.to_owned())
        .map_err(|e| format!("{host} is neither an IP address nor a DNS name: {e}"))
}

/// Ok when the certificate `leaf` is valid for the host of `addr`.
pub fn certificate_names(leaf: &CertificateDer<'_>, addr: &str) -> Result<(), String> {
    let name = server_name_of(addr)?;
    let cert = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| format!("the certificate does not parse: {e}"))?;
    cert.verify_is_valid_for_subject_name(&name).map_err(|e| format!("{e}"))
}

/// The inbound side: `wayside.v1.RaftTransport`.
pub struct RaftService {
    pub id: u64,
    pub node_tx: mpsc::Sender<Input>,
    pub snap_dir: PathBuf,
    /// The node's shutdown: a peer's `Send` stream is long-lived, so the handler ends it
    /// (and the server's graceful shutdown can finish) when this fires.
    pub shutdown: CancellationToken,
    /// Over TLS: who may send as which peer. `None` (plaintext): no caller identity.
    pub peers: Option<PeerCheck>,
    /// The limits on the snapshots it receives.
    pub receiving: SnapshotReceiving,
}

impl RaftService {
    /// Checks that a decoded message's own sender is the envelope's (bound to the
    /// connection). raft-rs's `MsgTransferLeader` is the exception: it names the
    /// transferee as its sender, and a follower forwards it to the leader as it is.
    /// A message of the `Send` stream: of a kind peers send each other there (see
    /// [`RaftService::check_inner`] for the sender).
    fn check_streamed(&self, m: &Message, from: u64) -> Result<(), Status> {
        use MessageType::*;
        // What peers send each other on this stream. Local-only kinds (a proposal: this
        // node never forwards one; a campaign or beat trigger; a snapshot, which comes
        // on `InstallSnapshot` with its file) would step raft-rs down paths no peer
        // drives: a forged proposal of a malformed membership change, once committed,
        // would stop every node at every start.
        let peer_kind = matches!(
            m.get_msg_type(),
            MsgAppend
                | MsgAppendResponse
                | MsgRequestVote
                | MsgRequestVoteResponse
                | MsgRequestPreVote
                | MsgRequestPreVoteResponse
                | MsgHeartbeat
                | MsgHeartbeatResponse
                | MsgTransferLeader
                | MsgTimeoutNow
                | MsgReadIndex
                | MsgReadIndexResp
        );
        if !peer_kind {
            return Err(Status::invalid_argument(format!(
                "a raft message of kind {:?} is not sent between nodes on this stream",
                m.get_msg_type()
            )));
        }
        self.check_inner(m, from)
    }

    fn check_inner(&self, m: &Message, from: u64) -> Result<(), Status> {
        if self.peers.is_none()
            || m.from == from
            || m.get_msg_type() == MessageType::MsgTransferLeader
        {
            return Ok(());
        }
        Err(Status::permission_denied(format!(
            "a raft message from node {} came in an envelope from node {from}",
            m.from
        )))
    }
}

fn decode(bytes: &[u8]) -> Result<Message, Status> {
    Message::parse_from_bytes(bytes)
        .map_err(|e| Status::invalid_argument(format!("raft message does not decode: {e}")))
}

#[tonic::async_trait]
impl pb::raft_transport_server::RaftTransport for RaftService {
    async fn send(
        &self,
        request: Request<Streaming<pb::RaftEnvelope>>,
    ) -> Result<Response<pb::RaftSendReply>, Status> {
        let certs = request.peer_certs();
        let mut stream = request.into_inner();
        // The sender the stream's first envelope proved; every later one must be it.
        let mut sender: Option<u64> = None;
        loop {
            let env = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                m = stream.message() => match m? {
                    Some(env) => env,
                    None => break,
                },
            };
            if let Some(peers) = &self.peers {
                match sender {
                    None => {
                        peers.check(certs.as_deref().map(Vec::as_slice), env.from, self.id)?;
                        sender = Some(env.from);
                    }
                    Some(s) if s != env.from => {
                        return Err(Status::permission_denied(format!(
                            "a raft stream from node {s} carried an envelope claiming node {}",
                            env.from
                        )));
                    }
                    Some(_) => {}
                }
            }
            if env.to != self.id {
                return Err(Status::failed_precondition(format!(
                    "raft messages for node {} reached node {}: check the peer addresses",
                    env.to, self.id
                )));
            }
            for bytes in &env.messages {
                let m = decode(bytes)?;
                self.check_streamed(&m, env.from)?;
                self.node_tx
                    .send(Input::Raft(Box::new(m)))
                    .await
                    .map_err(|_| Status::unavailable("node is shutting down"))?;
            }
        }
        Ok(Response::new(pb::RaftSendReply {}))
    }

    async fn install_snapshot(
        &self,
        request: Request<Streaming<pb::SnapshotChunk>>,
    ) -> Result<Response<pb::RaftSendReply>, Status> {
        let certs = request.peer_certs();
        let mut stream = request.into_inner();
        let first = self
            .receiving
            .next(&mut stream)
            .await?
            .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))?;
        // Before anything is written: a snapshot replaces the whole store.
        if let Some(peers) = &self.peers {
            peers.check(certs.as_deref().map(Vec::as_slice), first.from, self.id)?;
        }
        if first.to != self.id {
            return Err(Status::failed_precondition(format!(
                "snapshot for node {} reached node {}",
                first.to, self.id
            )));
        }
        let msg = decode(&first.message)?;
        if msg.get_msg_type() != MessageType::MsgSnapshot {
            return Err(Status::invalid_argument("first chunk must carry a MsgSnapshot"));
        }
        self.check_inner(&msg, first.from)?;
        let _slot = self.receiving.slots.clone().try_acquire_owned().map_err(|_| {
            Status::resource_exhausted(format!(
                "node {} is receiving {} snapshots already (max_snapshot_receives); try again \
                 later",
                self.id, self.receiving.max
            ))
        })?;
        let meta = msg.get_snapshot().get_metadata();
        let index = meta.index;
        let path = snapshot_path(&self.snap_dir, index);
        let tmp = self.snap_dir.join(format!("recv-{index:020}-{}.tmp", rand::random::<u64>()));
        // Removed on an error, and when the call is dropped mid-transfer (its sender gave
        // up: a partial file left would hold disk space every later snapshot needs).
        let partial = RemoveOnDrop(Some(tmp.clone()));
        let bytes = self.receiving.receive(&mut stream, first, &tmp, &path, meta).await?;
        partial.disarm();
        tracing::info!(node = self.id, index, bytes, "snapshot received");
        self.node_tx
            .send(Input::Raft(Box::new(msg)))
            .await
            .map_err(|_| Status::unavailable("node is shutting down"))?;
        Ok(Response::new(pb::RaftSendReply {}))
    }
}

type ChunkStream = Streaming<pb::SnapshotChunk>;

/// A file removed when this is dropped, unless disarmed.
struct RemoveOnDrop(Option<PathBuf>);

impl RemoveOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            // (A missing file, never created or renamed already, is no error.)
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The limits on the snapshots a node receives (from its configuration).
pub struct SnapshotReceiving {
    /// One permit per snapshot being received (`max_snapshot_receives`).
    slots: std::sync::Arc<tokio::sync::Semaphore>,
    max: usize,
    /// Longest wait for the next chunk (`snapshot_receive_idle_timeout_ms`).
    idle: Duration,
    /// Free disk space kept beside a snapshot and its installed copy
    /// (`snapshot_min_free_disk_bytes`).
    min_free_disk_bytes: u64,
}

impl SnapshotReceiving {
    pub fn new(cfg: &Config) -> Self {
        Self {
            slots: std::sync::Arc::new(tokio::sync::Semaphore::new(cfg.max_snapshot_receives)),
            max: cfg.max_snapshot_receives,
            idle: Duration::from_millis(cfg.snapshot_receive_idle_timeout_ms),
            min_free_disk_bytes: cfg.snapshot_min_free_disk_bytes,
        }
    }

    /// The stream's next chunk, within the idle limit.
    async fn next(&self, stream: &mut ChunkStream) -> Result<Option<pb::SnapshotChunk>, Status> {
        match tokio::time::timeout(self.idle, stream.message()).await {
            Ok(r) => r,
            Err(_) => Err(Status::deadline_exceeded(format!(
                "the snapshot stream brought nothing for {} ms (snapshot_receive_idle_timeout_ms)",
                self.idle.as_millis()
            ))),
        }
    }

    /// Ok when the file system of `dir` has room for `chunk` more bytes of a snapshot of
    /// which `received` bytes (this chunk's included) have come, its installed copy and
    /// the reserve; else RESOURCE_EXHAUSTED saying so.
    fn room(&self, dir: &std::path::Path, received: u64, chunk: u64) -> Result<(), Status> {
        let free = crate::storage::free_disk_bytes(dir)
            .map_err(|e| Status::internal(format!("free space of {}: {e}", dir.display())))?;
        let needed = received.saturating_add(chunk).saturating_add(self.min_free_disk_bytes);
        if free < needed {
            return Err(Status::resource_exhausted(format!(
                "{} has {free} bytes free; the snapshot being received ({received} bytes so \
                 far) needs as much again to be installed, and snapshot_min_free_disk_bytes \
                 ({}) kept free",
                dir.display(),
                self.min_free_disk_bytes
            )));
        }
        Ok(())
    }

    /// Writes the chunks to `tmp`, checks the file (its structure and checksum, and that
    /// its metadata is `expect`, the message's), then makes it durable under `path`.
    async fn receive(
        &self,
        stream: &mut ChunkStream,
        first: pb::SnapshotChunk,
        tmp: &std::path::Path,
        path: &std::path::Path,
        expect: &SnapshotMetadata,
    ) -> Result<u64, Status> {
        use tokio::io::AsyncWriteExt as _;
        let io = |e: std::io::Error| Status::internal(format!("writing snapshot: {e}"));
        let dir = tmp.parent().unwrap_or(std::path::Path::new("."));
        let file = tokio::fs::File::create(tmp).await.map_err(io)?;
        let mut file = tokio::io::BufWriter::with_capacity(1 << 20, file);
        let mut bytes = 0u64;
        let mut chunk = first;
        loop {
            let n = chunk.data.len() as u64;
            bytes += n;
            self.room(dir, bytes, n)?;
            file.write_all(&chunk.data).await.map_err(io)?;
            if chunk.last {
                break;
            }
            chunk = self.next(stream).await?.ok_or_else(|| {
                Status::invalid_argument("snapshot stream ended before its last chunk")
            })?;
        }
        file.flush().await.map_err(io)?;
        let file = file.into_inner().into_std().await;
        // The fsync, a check reading the whole file and the rename off the async workers
        // (they serve clients and Raft traffic; a large snapshot took one for seconds).
        let (tmp, path, expect) = (tmp.to_owned(), path.to_owned(), expect.clone());
        tokio::task::spawn_blocking(move || {
            file.sync_all().map_err(io)?;
            drop(file);
            // Checked before the node trusts it (through a buffer: it holds every block).
            let corrupt =
                |r| Status::invalid_argument(format!("received snapshot is corrupt: {r}"));
            let got = crate::snapshot::check_framed(&tmp, crate::snapshot::SNAPSHOT_MAGIC)
                .map_err(corrupt)?;
            if got != expect {
                return Err(corrupt(format!(
                    "its metadata (index {}, term {}, voters {:?}) is not its message's (index \
                     {}, term {}, voters {:?})",
                    got.index,
                    got.term,
                    got.get_conf_state().voters,
                    expect.index,
                    expect.term,
                    expect.get_conf_state().voters
                )));
            }
            std::fs::rename(&tmp, &path).map_err(io)?;
            if let Some(dir) = path.parent() {
                crate::storage::sync_dir(dir).map_err(io)?;
            }
            Ok::<_, Status>(())
        })
        .await
        .map_err(|e| Status::internal(format!("checking the received snapshot: {e}")))??;
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::pem::PemObject as _;
    use wayside_proto::tls::pki;

    #[test]
    fn the_host_of_a_peer_address_is_the_name_checked() {
        let name = |a: &str| server_name_of(a).map(|n| n.to_str().into_owned());
        assert_eq!(name("127.0.0.1:7000").unwrap(), "127.0.0.1");
        assert_eq!(name("https://[::1]:7000").unwrap(), "::1");
        assert_eq!(name("http://pss-2.road.example:7000/").unwrap(), "pss-2.road.example");
        assert!(name("no-port").is_err());
    }

    #[test]
    fn a_certificate_is_checked_against_the_address_host() {
        let ca = pki::Ca::new("unit road").unwrap();
        let ips = [std::net::IpAddr::from([10, 1, 2, 3])];
        let issued = ca.issue(&["pss-1.road".to_owned()], &ips).unwrap();
        let leaf = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
        certificate_names(&leaf, "10.1.2.3:7000").unwrap();
        certificate_names(&leaf, "https://pss-1.road:7000").unwrap();
        assert!(certificate_names(&leaf, "10.1.2.4:7000").is_err());
        assert!(certificate_names(&leaf, "127.0.0.1:7000").is_err());
        assert!(certificate_names(&leaf, "pss-2.road:7000").is_err());
        assert!(certificate_names(&CertificateDer::from(vec![1, 2, 3]), "10.1.2.3:7000").is_err());
    }
}
