//! The PSS client library (used by the NMS and the `pss` CLI): finds the leader, follows
//! leader hints, retries with bounded exponential backoff within a deadline, and never
//! retries a write in a way that could apply it twice: a write is retried after an
//! ambiguous failure only when it carries a request id (the state machine applies a
//! request id once); without one, only when the server said it did not take it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic::{Code, Status};
use wayside_proto::error::fault_of;
use wayside_proto::pb;
use wayside_proto::pb::pipeline_reply::Result as Piped;
use wayside_proto::pb::pipeline_request::Request as Ask;
use wayside_proto::pb::pss_admin_client::PssAdminClient;
use wayside_proto::pb::pss_blocks_client::PssBlocksClient;
use wayside_proto::types::{Endpoint, Epoch, Fault, VolumeName};

use crate::pipe::{Pipe, PipeLimits};

/// How the client waits and retries.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Time allowed for one RPC attempt.
    pub rpc_timeout: Duration,
    /// Time allowed for a whole call, retries included.
    pub deadline: Duration,
    /// First pause between retries; doubles up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Largest message sent or received, in bytes.
    pub max_message_size_bytes: usize,
    /// Send `write_batch` and `get_blocks` over one `Pipeline` stream per node (many
    /// requests per message) instead of a unary call each. A node that does not serve
    /// `Pipeline` (UNIMPLEMENTED) gets unary calls from then on.
    pub pipeline: bool,
    /// Most requests one pipeline carries in a message and has unanswered (at most the
    /// servers' `max_pipeline_requests`).
    pub pipeline_max_requests: usize,
    /// Requests queued for a pipeline before callers wait to queue more.
    pub pipeline_queue_requests: usize,
    /// A pipeline message stops taking requests at this many bytes. A write larger than
    /// this goes as a unary call of its own: refused (past a node's message limit), it
    /// fails alone instead of ending the stream every other caller's requests share.
    pub pipeline_message_bytes: usize,
    /// Dial every node over TLS with this set-up (the road's CA; a PSS requires the
    /// caller's certificate too); `None`: plaintext.
    pub tls: Option<wayside_proto::tls::Tls>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            rpc_timeout: Duration::from_secs(5),
            deadline: Duration::from_secs(20),
            initial_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(500),
            max_message_size_bytes: 64 * 1024 * 1024,
            pipeline: true,
            pipeline_max_requests: 256,
            pipeline_queue_requests: 1024,
            pipeline_message_bytes: 4 * 1024 * 1024,
            tls: None,
        }
    }
}

/// Why a PSS call failed (after retries, where retrying was allowed).
#[derive(Debug, thiserror::Error)]
pub enum PssError {
    /// The write carried an older owner epoch than the volume's: this NMS was fenced.
    #[error("stale epoch: presented {presented}, volume is at {current}")]
    StaleEpoch { presented: Epoch, current: Epoch },
    #[error("not found: {0}")]
    NotFound(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// A create met a volume another caller made (another credential or block size), or
    /// a member is added again at another address.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// No leader answered within the deadline, or the outcome of a write without a
    /// request id is unknown.
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("PSS error: {0}")]
    Other(tonic::Status),
}

/// What the retry loop ended with.
enum Answer<T> {
    Reply(T),
    /// A retry after an ambiguous failure found the first attempt's change applied.
    AlreadyDone,
}

impl<T> Answer<T> {
    /// The reply of a call that counts no error answer as done already.
    fn reply(self) -> T {
        match self {
            Answer::Reply(r) => r,
            Answer::AlreadyDone => unreachable!("no answer counts as done already"),
        }
    }
}

impl From<Status> for PssError {
    fn from(s: Status) -> Self {
        if let Some(Fault::StaleEpoch { presented, current }) = fault_of(&s) {
            return PssError::StaleEpoch { presented, current };
        }
        let msg = s.message().to_owned();
        match s.code() {
            Code::NotFound => PssError::NotFound(msg),
            Code::InvalidArgument => PssError::InvalidArgument(msg),
            Code::FailedPrecondition => PssError::FailedPrecondition(msg),
            Code::AlreadyExists => PssError::AlreadyExists(msg),
            Code::Unavailable | Code::DeadlineExceeded => PssError::Unavailable(msg),
            _ => PssError::Other(s),
        }
    }
}

/// HTTP/2 PING on a connection to a node silent this long.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
/// A connection whose PING goes unanswered this long is closed.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// A handle to a PSS cluster; cheap to clone; connects lazily.
#[derive(Clone)]
pub struct PssClient {
    inner: Arc<Inner>,
}

struct Inner {
    endpoints: Vec<Endpoint>,
    opts: ClientOptions,
    channels: Mutex<HashMap<String, Channel>>,
    leader: Mutex<Option<Endpoint>>,
    next: std::sync::atomic::AtomicUsize,
    /// Per node (by URI): its pipeline stream, or that it serves none.
    pipes: Mutex<HashMap<String, PipeSlot>>,
}

enum PipeSlot {
    Open(Arc<Pipe>),
    /// The node answered UNIMPLEMENTED: an older PSS, reached by unary calls.
    Unsupported,
}

/// Whether a failed request certainly never reached a server (so it was not applied).
fn never_sent(status: &Status) -> bool {
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(status);
    while let Some(e) = src {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::ConnectionRefused {
                return true;
            }
        }
        src = e.source();
    }
    false
}

impl PssClient {
    pub fn new(endpoints: Vec<Endpoint>, opts: ClientOptions) -> Self {
        Self {
            inner: Arc::new(Inner {
                endpoints,
                opts,
                channels: Mutex::new(HashMap::new()),
                leader: Mutex::new(None),
                next: std::sync::atomic::AtomicUsize::new(0),
                pipes: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The endpoints this client was given.
    pub fn endpoints(&self) -> &[Endpoint] {
        &self.inner.endpoints
    }

    /// A lazily connected channel to `ep` (shared by every call to it).
    pub fn channel(&self, ep: &Endpoint) -> Result<Channel, PssError> {
        let mut channels =
            self.inner.channels.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(c) = channels.get(ep.uri()) {
            return Ok(c.clone());
        }
        let e = wayside_proto::client::endpoint(ep, self.inner.opts.tls.as_ref())
            .map_err(|e| PssError::InvalidArgument(format!("endpoint {ep}: {e}")))?
            .connect_timeout(Duration::from_secs(1))
            // A node that vanished without closing (a cut link, a frozen host) is found
            // out, and its pipeline stream ends (the next call dials anew), instead of
            // every call routed there waiting out rpc_timeout until TCP gives up.
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .initial_connection_window_size(crate::server::HTTP2_CONNECTION_WINDOW_BYTES)
            .initial_stream_window_size(crate::server::HTTP2_STREAM_WINDOW_BYTES);
        // A call's HEADERS and DATA leave in one write (TCP_NODELAY set there too).
        let c = wayside_proto::client::connect_lazy(&e);
        channels.insert(ep.uri().to_owned(), c.clone());
        Ok(c)
    }

    fn blocks(&self, ch: Channel) -> PssBlocksClient<Channel> {
        let max = self.inner.opts.max_message_size_bytes;
        PssBlocksClient::new(ch).max_decoding_message_size(max).max_encoding_message_size(max)
    }

    /// The pipeline stream to `ep` (a new one if the last has ended), or `None` when
    /// requests to it go unary.
    fn pipe(&self, ch: &Channel, ep: &Endpoint) -> Option<Arc<Pipe>> {
        let opts = &self.inner.opts;
        if !opts.pipeline {
            return None;
        }
        let mut pipes = self.inner.pipes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match pipes.get(ep.uri()) {
            Some(PipeSlot::Unsupported) => return None,
            Some(PipeSlot::Open(p)) if !p.is_closed() => return Some(p.clone()),
            _ => {}
        }
        let limits = PipeLimits {
            queue_requests: opts.pipeline_queue_requests,
            max_requests: opts.pipeline_max_requests,
            message_bytes: opts.pipeline_message_bytes,
        };
        let pipe = Arc::new(Pipe::start(self.blocks(ch.clone()), limits));
        pipes.insert(ep.uri().to_owned(), PipeSlot::Open(pipe.clone()));
        Some(pipe)
    }

    /// One request over `pipe`; a node without `Pipeline` is remembered, and the request
    /// fails as UNAVAILABLE so the retry loop sends it again, unary.
    async fn pipelined(&self, pipe: &Pipe, ep: &Endpoint, ask: Ask) -> Result<Piped, Status> {
        match pipe.call(ask).await {
            Err(s) if s.code() == Code::Unimplemented => {
                tracing::info!(node = %ep, "this PSS node serves no Pipeline: unary calls from now on");
                self.inner
                    .pipes
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(ep.uri().to_owned(), PipeSlot::Unsupported);
                Err(Status::unavailable(format!("{ep} serves no Pipeline; retrying unary")))
            }
            r => r,
        }
    }

    fn target(&self) -> Result<Endpoint, PssError> {
        if let Some(l) =
            self.inner.leader.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
        {
            return Ok(l);
        }
        let n = self.inner.endpoints.len();
        if n == 0 {
            return Err(PssError::InvalidArgument("no PSS endpoints given".into()));
        }
        let i = self.inner.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(self.inner.endpoints[i % n].clone())
    }

    fn set_leader(&self, ep: Option<Endpoint>) {
        *self.inner.leader.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = ep;
    }

    fn admin(&self, ch: Channel) -> PssAdminClient<Channel> {
        let max = self.inner.opts.max_message_size_bytes;
        PssAdminClient::new(ch).max_decoding_message_size(max).max_encoding_message_size(max)
    }

    /// Runs `f` against the leader, following hints and retrying as allowed.
    /// `retry_ambiguous`: whether a failure after the request may have been applied can
    /// be retried (true for reads and for writes with a request id).
    async fn call<T, F, Fut>(&self, retry_ambiguous: bool, f: F) -> Result<T, PssError>
    where
        F: Fn(PssBlocksClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        Ok(self.call_on(retry_ambiguous, |ch, _| f(self.blocks(ch)), |_| false).await?.reply())
    }

    /// The retry loop behind every call: `f` gets a channel to the node believed to
    /// lead. `done_already(status)`: after an ambiguous failure, whether this answer to
    /// the retry means the first attempt took effect (an idempotent admin change).
    async fn call_on<T, F, Fut>(
        &self,
        retry_ambiguous: bool,
        f: F,
        done_already: impl Fn(&Status) -> bool,
    ) -> Result<Answer<T>, PssError>
    where
        F: Fn(Channel, Endpoint) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let opts = &self.inner.opts;
        let deadline = Instant::now() + opts.deadline;
        let mut backoff = opts.initial_backoff;
        let mut hops = 0;
        let mut ambiguous = false;
        loop {
            let target = self.target()?;
            let left = deadline.saturating_duration_since(Instant::now());
            let attempt = tokio::time::timeout(
                opts.rpc_timeout.min(left),
                f(self.channel(&target)?, target.clone()),
            )
            .await;
            let err = match attempt {
                Ok(Ok(r)) => {
                    self.set_leader(Some(target));
                    return Ok(Answer::Reply(r.into_inner()));
                }
                Ok(Err(status)) => status,
                Err(_) => Status::deadline_exceeded(format!("no answer from {target} in time")),
            };
            if ambiguous && done_already(&err) {
                return Ok(Answer::AlreadyDone);
            }
            let mut pause = true;
            match fault_of(&err) {
                Some(Fault::NotLeader { leader_address, .. }) => {
                    // The node refused before proposing: safe to retry anything.
                    let hint = leader_address.and_then(|a| Endpoint::parse(&a).ok());
                    let follow = hint.filter(|h| *h != target && hops < 3);
                    pause = follow.is_none();
                    hops = if follow.is_some() { hops + 1 } else { 0 };
                    self.set_leader(follow);
                }
                _ => {
                    let transient = matches!(
                        err.code(),
                        Code::Unavailable
                            | Code::DeadlineExceeded
                            | Code::Unknown
                            | Code::Cancelled
                    );
                    if !transient {
                        return Err(err.into());
                    }
                    if !retry_ambiguous && !never_sent(&err) {
                        return Err(PssError::Unavailable(format!(
                            "outcome unknown (no request id, so not retried): {}",
                            err.message()
                        )));
                    }
                    ambiguous |= !never_sent(&err);
                    self.set_leader(None);
                    hops = 0;
                }
            }
            if Instant::now() + if pause { backoff } else { Duration::ZERO } >= deadline {
                return Err(PssError::Unavailable(format!(
                    "no PSS leader answered within {:?}: {}",
                    opts.deadline,
                    err.message()
                )));
            }
            if pause {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(opts.max_backoff);
            }
        }
    }

    /// Makes the caller the volume's owner with a new epoch (creating it if asked).
    pub async fn acquire_volume(
        &self,
        req: pb::AcquireVolumeRequest,
    ) -> Result<pb::AcquireVolumeReply, PssError> {
        let idempotent = req.request_id.is_some();
        self.call(idempotent, |mut c| {
            let req = req.clone();
            async move { c.acquire_volume(req).await }
        })
        .await
    }

    /// A volume's metadata (linearizable).
    pub async fn get_volume(&self, volume: &VolumeName) -> Result<pb::VolumeMeta, PssError> {
        let req = pb::GetVolumeRequest {
            volume: volume.to_string(),
            consistency: pb::ReadConsistency::Linearizable as i32,
        };
        self.call(true, |mut c| {
            let req = req.clone();
            async move { c.get_volume(req).await }
        })
        .await
    }

    /// Applies a batch of puts/deletes once. Needs a request id, so retries are safe.
    pub async fn write_batch(
        &self,
        req: pb::WriteBatchRequest,
    ) -> Result<pb::WriteBatchReply, PssError> {
        if req.request_id.is_none() {
            return Err(PssError::InvalidArgument(
                "write_batch needs a request_id (retries rely on it)".into(),
            ));
        }
        let len = prost::Message::encoded_len(&req);
        let max = self.inner.opts.max_message_size_bytes;
        if len > max {
            // Refused here, naming the limit (sent, it failed as an opaque reset).
            return Err(PssError::Other(Status::out_of_range(format!(
                "a write of {len} bytes exceeds this client's max_message_size_bytes ({max})"
            ))));
        }
        let alone = len > self.inner.opts.pipeline_message_bytes;
        let call = |ch: Channel, ep: Endpoint| {
            let req = req.clone();
            async move {
                match if alone { None } else { self.pipe(&ch, &ep) } {
                    Some(pipe) => match self.pipelined(&pipe, &ep, Ask::Write(req)).await? {
                        Piped::Write(r) => Ok(tonic::Response::new(r)),
                        _ => Err(Status::internal("a pipeline reply of the wrong kind")),
                    },
                    None => self.blocks(ch).write_batch(req).await,
                }
            }
        };
        Ok(self.call_on(true, call, |_| false).await?.reply())
    }

    /// Reads blocks (linearizable); absent blocks come back with `found == false`.
    pub async fn get_blocks(
        &self,
        volume: &VolumeName,
        blocks: &[u64],
    ) -> Result<Vec<pb::PssBlock>, PssError> {
        let req = pb::GetBlocksRequest {
            volume: volume.to_string(),
            blocks: blocks.to_vec(),
            consistency: pb::ReadConsistency::Linearizable as i32,
        };
        let call = |ch: Channel, ep: Endpoint| {
            let req = req.clone();
            async move {
                match self.pipe(&ch, &ep) {
                    Some(pipe) => match self.pipelined(&pipe, &ep, Ask::Get(req)).await? {
                        Piped::Get(r) => Ok(tonic::Response::new(r)),
                        _ => Err(Status::internal("a pipeline reply of the wrong kind")),
                    },
                    None => self.blocks(ch).get_blocks(req).await,
                }
            }
        };
        Ok(self.call_on(true, call, |_| false).await?.reply().blocks)
    }

    /// Lists up to `limit` blocks from `start_block` (linearizable).
    pub async fn list_blocks(
        &self,
        volume: &VolumeName,
        start_block: u64,
        limit: u32,
    ) -> Result<pb::ListBlocksReply, PssError> {
        let req = pb::ListBlocksRequest {
            volume: volume.to_string(),
            start_block,
            limit,
            consistency: pb::ReadConsistency::Linearizable as i32,
        };
        self.call(true, |mut c| {
            let req = req.clone();
            async move { c.list_blocks(req).await }
        })
        .await
    }

    /// The cluster's members, as the node believed to lead sees them.
    pub async fn members(&self) -> Result<pb::MembersReply, PssError> {
        let call = |ch, _| async move { self.admin(ch).members(pb::MembersRequest {}).await };
        Ok(self.call_on(true, call, |_| false).await?.reply())
    }

    /// Adds node `id` at `address`: as a learner, then (unless `learner_only`) as a
    /// voter once it has caught up. Follows leader changes within the deadline; the
    /// server treats "already a voter at this address" as done, so retries are safe.
    pub async fn add_node(
        &self,
        id: u64,
        address: &str,
        learner_only: bool,
    ) -> Result<pb::MembersReply, PssError> {
        let req = pb::AddNodeRequest { id, address: address.to_owned(), learner_only };
        let call = |ch, _| {
            let req = req.clone();
            async move { self.admin(ch).add_node(req).await }
        };
        Ok(self.call_on(true, call, |_| false).await?.reply())
    }

    /// Removes node `id`. Follows leader changes within the deadline; a retry that
    /// finds the node gone (after an attempt whose outcome was unknown) is success.
    pub async fn remove_node(&self, id: u64) -> Result<pb::MembersReply, PssError> {
        let r = self
            .call_on(
                true,
                |ch, _| async move { self.admin(ch).remove_node(pb::RemoveNodeRequest { id }).await },
                |st| st.code() == Code::InvalidArgument,
            )
            .await?;
        match r {
            Answer::Reply(m) => Ok(m),
            Answer::AlreadyDone => {
                let m = self.members().await?;
                if m.members.iter().any(|m| m.id == id) {
                    return Err(PssError::Unavailable(format!(
                        "node {id} is still a member after a removal whose outcome was unknown"
                    )));
                }
                Ok(m)
            }
        }
    }

    /// Hands leadership to voter `to` and waits until it leads. Follows leader changes
    /// within the deadline; the server answers at once when `to` already leads.
    pub async fn transfer_leader(&self, to: u64) -> Result<pb::StatusReply, PssError> {
        let call = |ch, _| async move {
            self.admin(ch).transfer_leader(pb::TransferLeaderRequest { to }).await
        };
        let s = self.call_on(true, call, |_| false).await?.reply();
        // The next call goes to the new leader.
        if let Ok(leader) = Endpoint::parse(&s.leader_address) {
            self.set_leader(Some(leader));
        }
        Ok(s)
    }
}
