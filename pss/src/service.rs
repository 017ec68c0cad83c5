//! The gRPC services a PSS node serves to NMSs and operators: `PssBlocks` and
//! `PssAdmin`. Requests are validated here (the edge), turned into commands for the
//! node, and node errors become gRPC statuses in one place ([`status_of`]).

use crate::node::{NodeError, NodeHandle, Role};
use crate::state::{ApplyError, Command, Outcome};
use futures::stream::FuturesUnordered;
use futures::{FutureExt as _, StreamExt as _};
use raft::prelude::{ConfChange, ConfChangeType};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use wayside_proto::convert;
use wayside_proto::error::fault_status;
use wayside_proto::pb;
use wayside_proto::types::{Fault, MAX_BLOCK_SIZE_BYTES};

/// Most blocks one ListBlocks reply carries.
pub const MAX_LIST_BLOCKS: u32 = 10_000;
/// Most blocks one GetBlocks request may ask for.
pub const MAX_GET_BLOCKS: usize = 4096;

/// The one place node errors become gRPC statuses.
pub fn status_of(e: NodeError) -> Status {
    match e {
        NodeError::NotLeader { leader_id, leader_address } => {
            let msg = match &leader_address {
                Some(a) => format!("not the leader; try node {} at {a}", leader_id.unwrap_or(0)),
                None => "not the leader; no leader known yet".to_owned(),
            };
            fault_status(Fault::NotLeader { leader_id, leader_address }, msg)
        }
        NodeError::OutcomeUnknown => Status::unavailable(e.to_string()),
        NodeError::Timeout(_) => Status::deadline_exceeded(e.to_string()),
        NodeError::Stopped | NodeError::Busy(_) => Status::unavailable(e.to_string()),
        NodeError::Refused(ApplyError::StaleEpoch { presented, current }) => fault_status(
            Fault::StaleEpoch { presented, current },
            format!("stale epoch: presented {presented}, volume is at {current}"),
        ),
        NodeError::Refused(ApplyError::FutureEpoch { .. }) => {
            Status::failed_precondition(e.to_string())
        }
        NodeError::Refused(ApplyError::NotFound(v)) => {
            Status::not_found(format!("volume {v} does not exist"))
        }
        NodeError::Refused(ApplyError::Invalid(m)) => Status::invalid_argument(m),
        NodeError::Refused(e @ ApplyError::Exists { .. }) => Status::already_exists(e.to_string()),
        NodeError::FailedPrecondition(m) => Status::failed_precondition(m),
        NodeError::InvalidArgument(m) => Status::invalid_argument(m),
        NodeError::Internal(m) => Status::internal(m),
    }
}

fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}

fn limit(name: &str, unit: &str, value: usize, max: usize) -> Status {
    fault_status(
        Fault::LimitExceeded {
            limit: name.into(),
            unit: unit.into(),
            value: value as u64,
            max: max as u64,
        },
        format!("{name}: {value} {unit} exceeds the limit of {max}"),
    )
}

/// Blocks reserved in `BlockService::reserved_blocks` while a write is in flight.
struct Reservation<'a> {
    counter: &'a std::sync::atomic::AtomicUsize,
    n: usize,
    /// What others had reserved when this was taken.
    before: usize,
}

impl<'a> Reservation<'a> {
    fn take(counter: &'a std::sync::atomic::AtomicUsize, n: usize) -> Self {
        let before = counter.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        Reservation { counter, n, before }
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.counter.fetch_sub(self.n, std::sync::atomic::Ordering::Relaxed);
    }
}

/// `wayside.v1.PssBlocks`.
#[derive(Clone)]
pub struct BlockService {
    pub node: NodeHandle,
    pub max_batch_ops: usize,
    /// Most blocks the node stores (its block index is in memory).
    pub max_blocks: usize,
    /// Most blocks one volume stores (checked at admission, like `max_blocks`; a volume
    /// has one owner writing back one batch at a time, so nothing is reserved for it).
    pub max_blocks_per_volume: usize,
    /// Blocks that writes admitted and not yet answered may add (an upper bound: their
    /// non-delete ops), counted against `max_blocks` with the stored ones: admission looks
    /// at the applied state only, so concurrent writers could otherwise pass it together.
    pub reserved_blocks: Arc<std::sync::atomic::AtomicUsize>,
    /// Most volumes the node stores (a create past it is refused, naming `max_volumes`).
    pub max_volumes: usize,
    /// Creates admitted and not yet answered, counted against `max_volumes` with the
    /// stored volumes (as `reserved_blocks` for blocks).
    pub reserved_volumes: Arc<std::sync::atomic::AtomicUsize>,
    /// Most requests in one `Pipeline` message and unanswered on one `Pipeline` stream.
    pub max_pipeline_requests: usize,
    /// Most bytes of block data one reply carries (half the message limit: room for the
    /// fields around it): a `GetBlocks` past it is refused, naming the limit, and a
    /// `Pipeline` reply message takes no more of the answers ready (the rest go next).
    /// A write carrying more is refused too (it must fit in a Raft message as an entry).
    pub max_reply_bytes: usize,
    /// Ends every `Pipeline` stream (they are long-lived and would otherwise hold the
    /// server's graceful shutdown open).
    pub shutdown: CancellationToken,
    pub pipeline_stats: Arc<PipelineStats>,
}

/// What this node's `Pipeline` streams carried (reported by `PssAdmin.Status`).
#[derive(Debug, Default)]
pub struct PipelineStats {
    pub messages: AtomicU64,
    pub requests: AtomicU64,
}

impl BlockService {
    async fn barrier(&self, consistency: i32) -> Result<(), Status> {
        if consistency == pb::ReadConsistency::Stale as i32 {
            return Ok(());
        }
        self.node.read_barrier().await.map_err(status_of)
    }

    /// A `WriteBatch`, unary or pipelined.
    async fn write(&self, req: pb::WriteBatchRequest) -> Result<pb::WriteBatchReply, Status> {
        convert::volume_name(&req.volume)?;
        match req.request_id.clone() {
            None => return Err(Status::invalid_argument("missing required field `request_id`")),
            Some(id) => {
                wayside_proto::types::RequestId::try_from(id)?;
            }
        }
        if req.ops.len() > self.max_batch_ops {
            return Err(limit("max_batch_ops", "ops", req.ops.len(), self.max_batch_ops));
        }
        if let Some(op) = req.ops.iter().find(|o| o.data.len() > MAX_BLOCK_SIZE_BYTES as usize) {
            return Err(Status::invalid_argument(format!(
                "block {} has {} bytes; no block may exceed {MAX_BLOCK_SIZE_BYTES} bytes",
                op.block,
                op.data.len()
            )));
        }
        // One write is one Raft entry, which raft-rs never splits: one that would not fit
        // in a Raft message to a follower (the same message limit, plus its framing) could
        // never commit, and every entry after it would wait behind it for good. Half the
        // message limit, as replies are.
        let bytes: usize = req.ops.iter().map(|o| o.data.len()).sum();
        if bytes > self.max_reply_bytes {
            return Err(limit("max_message_size_bytes", "bytes", bytes, self.max_reply_bytes));
        }
        // Admission against the node's capacity (checked here, before proposing: the
        // state machine itself must apply whatever is committed, the same on every node),
        // the blocks writes in flight may add counted too.
        let stored = self.node.reader.block_count();
        let upper = req.ops.iter().filter(|o| !o.delete).count();
        let reserved = Reservation::take(&self.reserved_blocks, upper);
        if stored + reserved.before + upper > self.max_blocks {
            let reader = &self.node.reader;
            let new =
                req.ops.iter().filter(|o| !o.delete && !reader.has_block(&req.volume, o.block));
            let new = new.count();
            let total = stored + reserved.before + new;
            if new > 0 && total > self.max_blocks {
                return Err(limit("max_blocks", "blocks", total, self.max_blocks));
            }
        }
        if upper > 0 {
            // (From the index in memory: no store read on every write's path.)
            let stored = self.node.reader.volume_block_count(&req.volume);
            if stored + upper > self.max_blocks_per_volume {
                let reader = &self.node.reader;
                let new =
                    req.ops.iter().filter(|o| !o.delete && !reader.has_block(&req.volume, o.block));
                let total = stored + new.count();
                if total > stored && total > self.max_blocks_per_volume {
                    return Err(limit(
                        "max_blocks_per_volume",
                        "blocks in the volume",
                        total,
                        self.max_blocks_per_volume,
                    ));
                }
            }
        }
        let cmd = Command { write: Some(req), ..Default::default() };
        match self.node.propose(cmd).await.map_err(status_of)? {
            Outcome::Write(r) => r.map_err(|e| status_of(NodeError::Refused(e))),
            Outcome::Acquire(_) => Err(internal("mismatched outcome")),
        }
    }

    /// A `GetBlocks`, unary or pipelined.
    async fn get(&self, req: pb::GetBlocksRequest) -> Result<pb::GetBlocksReply, Status> {
        convert::volume_name(&req.volume)?;
        if req.blocks.len() > MAX_GET_BLOCKS {
            return Err(limit("max_get_blocks", "blocks", req.blocks.len(), MAX_GET_BLOCKS));
        }
        self.barrier(req.consistency).await?;
        if self.node.reader.volume(&req.volume).map_err(internal)?.is_none() {
            return Err(Status::not_found(format!("volume {} does not exist", req.volume)));
        }
        let blocks = self.node.reader.blocks(&req.volume, &req.blocks).map_err(|e| match e {
            // Raced a collection of its segment three times: retryable.
            crate::state::StateError::Moving { .. } => Status::unavailable(e.to_string()),
            e => internal(e),
        })?;
        let bytes: usize = blocks.iter().map(|b| b.data.len()).sum();
        if bytes > self.max_reply_bytes {
            return Err(limit("max_message_size_bytes", "bytes", bytes, self.max_reply_bytes));
        }
        Ok(pb::GetBlocksReply { blocks })
    }

    /// One request of a `Pipeline` stream, answered with the result its unary call would
    /// have had.
    async fn pipelined(self: Arc<Self>, req: pb::PipelineRequest) -> pb::PipelineReply {
        use pb::pipeline_reply::Result as R;
        use pb::pipeline_request::Request as Q;
        let result = match req.request {
            Some(Q::Write(w)) => self.write(w).await.map(R::Write),
            Some(Q::Get(g)) => self.get(g).await.map(R::Get),
            None => Err(Status::invalid_argument("a pipeline request without a request")),
        };
        let result = result.unwrap_or_else(|s| R::Error(wayside_proto::error::stream_error(&s)));
        pb::PipelineReply { tag: req.tag, result: Some(result) }
    }
}

/// The reply side of one `Pipeline` stream.
pub type PipelineOut =
    Pin<Box<dyn futures::Stream<Item = Result<pb::PipelineReplies, Status>> + Send>>;

/// The state of one `Pipeline` stream between two reply messages.
struct Pipe {
    svc: Arc<BlockService>,
    inbound: Streaming<pb::PipelineRequests>,
    inflight: FuturesUnordered<Pin<Box<dyn Future<Output = pb::PipelineReply> + Send>>>,
    /// Answers ready that did not fit in the last reply message (`max_reply_bytes`).
    held: std::collections::VecDeque<pb::PipelineReply>,
    /// The client has not half-closed its side.
    open: bool,
}

impl Pipe {
    /// The next reply message: every request answered by then (at least one), or the
    /// stream's end (the client half-closed and all is answered, a bad message, or the
    /// node stopping).
    async fn next(&mut self) -> Option<Result<pb::PipelineReplies, Status>> {
        let limit = self.svc.max_pipeline_requests;
        loop {
            if !self.held.is_empty() {
                return Some(Ok(self.reply_message()));
            }
            if !self.open && self.inflight.is_empty() {
                return None;
            }
            tokio::select! {
                _ = self.svc.shutdown.cancelled() => {
                    return Some(Err(Status::unavailable("the PSS node is stopping")));
                }
                Some(first) = self.inflight.next(), if !self.inflight.is_empty() => {
                    self.held.push_back(first);
                    // Everything else already finished goes in the same message, as much
                    // as fits.
                    while let Some(Some(r)) = self.inflight.next().now_or_never() {
                        self.held.push_back(r);
                    }
                    return Some(Ok(self.reply_message()));
                }
                msg = self.inbound.message(), if self.open && self.inflight.len() < limit => {
                    match msg {
                        Ok(Some(m)) => {
                            if m.requests.len() > limit {
                                return Some(Err(limit_status(m.requests.len(), limit)));
                            }
                            let stats = &self.svc.pipeline_stats;
                            stats.messages.fetch_add(1, Ordering::Relaxed);
                            stats.requests.fetch_add(m.requests.len() as u64, Ordering::Relaxed);
                            for r in m.requests {
                                self.inflight.push(Box::pin(self.svc.clone().pipelined(r)));
                            }
                        }
                        Ok(None) => self.open = false,
                        Err(s) => return Some(Err(s)),
                    }
                }
            }
        }
    }
}

impl Pipe {
    /// A reply message of the held answers, in order: at least one, and no more than
    /// `max_reply_bytes` of them past the first.
    fn reply_message(&mut self) -> pb::PipelineReplies {
        use prost::Message as _;
        let mut replies = Vec::new();
        let mut bytes = 0;
        while let Some(r) = self.held.front() {
            let n = r.encoded_len();
            if !replies.is_empty() && bytes + n > self.svc.max_reply_bytes {
                break;
            }
            bytes += n;
            replies.push(self.held.pop_front().expect("looked at"));
        }
        pb::PipelineReplies { replies }
    }
}

fn limit_status(value: usize, max: usize) -> Status {
    limit("max_pipeline_requests", "requests", value, max)
}

#[tonic::async_trait]
impl pb::pss_blocks_server::PssBlocks for BlockService {
    #[tracing::instrument(skip_all, fields(node = self.node.id, volume = %request.get_ref().volume))]
    async fn acquire_volume(
        &self,
        request: Request<pb::AcquireVolumeRequest>,
    ) -> Result<Response<pb::AcquireVolumeReply>, Status> {
        let req = request.into_inner();
        convert::volume_name(&req.volume)?;
        convert::optional_request_id(req.request_id.clone())?;
        if let Some(spec) = &req.create {
            convert::block_size(spec.block_size)?;
            if !spec.credential_hash.is_empty() {
                convert::credential_hash(&spec.credential_hash)?;
            }
        }
        // Admission of a new volume against the node's capacity (as for blocks: checked
        // before proposing, the creates in flight counted too).
        let _reserved = match &req.create {
            Some(_) if self.node.reader.volume(&req.volume).map_err(internal)?.is_none() => {
                let reserved = Reservation::take(&self.reserved_volumes, 1);
                let total = self.node.reader.volume_count() + reserved.before + 1;
                if total > self.max_volumes {
                    return Err(limit("max_volumes", "volumes", total, self.max_volumes));
                }
                Some(reserved)
            }
            _ => None,
        };
        let cmd = Command { acquire: Some(req), ..Default::default() };
        match self.node.propose(cmd).await.map_err(status_of)? {
            Outcome::Acquire(r) => {
                Ok(Response::new(r.map_err(|e| status_of(NodeError::Refused(e)))?))
            }
            Outcome::Write(_) => Err(internal("mismatched outcome")),
        }
    }

    #[tracing::instrument(skip_all, fields(node = self.node.id, volume = %request.get_ref().volume))]
    async fn get_volume(
        &self,
        request: Request<pb::GetVolumeRequest>,
    ) -> Result<Response<pb::VolumeMeta>, Status> {
        let req = request.into_inner();
        convert::volume_name(&req.volume)?;
        self.barrier(req.consistency).await?;
        match self.node.reader.volume(&req.volume).map_err(internal)? {
            Some(m) => Ok(Response::new(m)),
            None => Err(Status::not_found(format!("volume {} does not exist", req.volume))),
        }
    }

    #[tracing::instrument(skip_all, fields(node = self.node.id, volume = %request.get_ref().volume, ops = request.get_ref().ops.len()))]
    async fn write_batch(
        &self,
        request: Request<pb::WriteBatchRequest>,
    ) -> Result<Response<pb::WriteBatchReply>, Status> {
        self.write(request.into_inner()).await.map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(node = self.node.id, volume = %request.get_ref().volume))]
    async fn get_blocks(
        &self,
        request: Request<pb::GetBlocksRequest>,
    ) -> Result<Response<pb::GetBlocksReply>, Status> {
        self.get(request.into_inner()).await.map(Response::new)
    }

    #[tracing::instrument(skip_all, fields(node = self.node.id, volume = %request.get_ref().volume))]
    async fn list_blocks(
        &self,
        request: Request<pb::ListBlocksRequest>,
    ) -> Result<Response<pb::ListBlocksReply>, Status> {
        let req = request.into_inner();
        convert::volume_name(&req.volume)?;
        self.barrier(req.consistency).await?;
        if self.node.reader.volume(&req.volume).map_err(internal)?.is_none() {
            return Err(Status::not_found(format!("volume {} does not exist", req.volume)));
        }
        let limit = if req.limit == 0 { MAX_LIST_BLOCKS } else { req.limit.min(MAX_LIST_BLOCKS) };
        let reply = self
            .node
            .reader
            .list(&req.volume, req.start_block, limit as usize)
            .map_err(internal)?;
        Ok(Response::new(reply))
    }

    type PipelineStream = PipelineOut;

    #[tracing::instrument(skip_all, fields(node = self.node.id))]
    async fn pipeline(
        &self,
        request: Request<Streaming<pb::PipelineRequests>>,
    ) -> Result<Response<Self::PipelineStream>, Status> {
        let pipe = Pipe {
            svc: Arc::new(self.clone()),
            inbound: request.into_inner(),
            inflight: FuturesUnordered::new(),
            held: Default::default(),
            open: true,
        };
        // Driven by the connection's task as it sends replies: no task of its own.
        let out = futures::stream::unfold(pipe, |mut pipe| async move {
            let item = pipe.next().await?;
            Some((item, pipe))
        });
        Ok(Response::new(Box::pin(out)))
    }
}

/// `wayside.v1.PssAdmin`.
pub struct AdminService {
    pub node: NodeHandle,
    pub pipeline_stats: Arc<PipelineStats>,
    pub learner_catch_up_timeout: Duration,
    /// Over TLS: membership, leadership and log compaction are changed only by callers
    /// holding a PSS node's certificate. `None` (plaintext): no caller identity.
    pub members_only: Option<crate::transport::PeerCheck>,
}

impl AdminService {
    /// Refuses a change of the cluster (`what`) from a caller without a PSS node's
    /// certificate, when the node runs TLS.
    fn members_only<T>(&self, request: &Request<T>, what: &str) -> Result<(), Status> {
        match &self.members_only {
            Some(check) => {
                check.check_member(request.peer_certs().as_deref().map(|c| &c[..]), what)
            }
            None => Ok(()),
        }
    }

    fn members(&self) -> pb::MembersReply {
        let st = self.node.status.borrow().clone();
        let member = |id: u64, role: pb::MemberRole| pb::Member {
            id,
            address: self.node.address_of(id).unwrap_or_default(),
            role: role as i32,
        };
        let mut members: Vec<_> =
            st.voters.iter().map(|&id| member(id, pb::MemberRole::Voter)).collect();
        members.extend(st.learners.iter().map(|&id| member(id, pb::MemberRole::Learner)));
        members.sort_by_key(|m| m.id);
        pb::MembersReply { members }
    }

    fn status(&self) -> pb::StatusReply {
        let st = self.node.status.borrow().clone();
        let role = match st.role {
            Role::Follower => pb::RaftRole::Follower,
            Role::Candidate => pb::RaftRole::Candidate,
            Role::PreCandidate => pb::RaftRole::PreCandidate,
            Role::Leader => pb::RaftRole::Leader,
        };
        pb::StatusReply {
            id: st.id,
            role: role as i32,
            term: st.term,
            leader_id: st.leader_id,
            leader_address: self.node.address_of(st.leader_id).unwrap_or_default(),
            commit_index: st.commit_index,
            applied_index: st.applied_index,
            first_index: st.first_index,
            last_index: st.last_index,
            snapshot_index: st.snapshot_index,
            snapshot_failures: st.snapshot_failures,
            members: self.members().members,
            pipeline_messages: self.pipeline_stats.messages.load(Ordering::Relaxed),
            pipeline_requests: self.pipeline_stats.requests.load(Ordering::Relaxed),
        }
    }

    /// Waits (up to `timeout`) until `done` holds for the node status; `give_up` ends
    /// the wait early with the status it returns (leadership moved elsewhere).
    async fn wait_for(
        &self,
        timeout: Duration,
        what: &str,
        done: impl Fn(&crate::node::NodeStatus) -> bool,
        give_up: impl Fn(&crate::node::NodeStatus) -> Option<Status>,
    ) -> Result<(), Status> {
        let mut rx = self.node.status.clone();
        let deadline = Instant::now() + timeout;
        loop {
            {
                let st = rx.borrow_and_update();
                if done(&st) {
                    return Ok(());
                }
                if let Some(e) = give_up(&st) {
                    return Err(e);
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, rx.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) => return Err(Status::unavailable("node stopped")),
                Err(_) => {
                    return Err(Status::deadline_exceeded(format!("timed out waiting for {what}")))
                }
            }
        }
    }

    fn check_member(&self, id: u64) -> Result<(), Status> {
        let st = self.node.status.borrow();
        if id == 0 || !(st.voters.contains(&id) || st.learners.contains(&id)) {
            return Err(Status::invalid_argument(format!(
                "node {id} is not a member (voters {:?}, learners {:?})",
                st.voters, st.learners
            )));
        }
        Ok(())
    }
}

fn conf_change(kind: ConfChangeType, id: u64, address: &str) -> ConfChange {
    let mut cc = ConfChange::default();
    cc.set_change_type(kind);
    cc.node_id = id;
    cc.context = address.as_bytes().to_vec().into();
    cc
}

#[tonic::async_trait]
impl pb::pss_admin_server::PssAdmin for AdminService {
    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusReply>, Status> {
        Ok(Response::new(self.status()))
    }

    async fn members(
        &self,
        _request: Request<pb::MembersRequest>,
    ) -> Result<Response<pb::MembersReply>, Status> {
        Ok(Response::new(self.members()))
    }

    #[tracing::instrument(skip_all, fields(node = self.node.id, new = request.get_ref().id))]
    async fn add_node(
        &self,
        request: Request<pb::AddNodeRequest>,
    ) -> Result<Response<pb::MembersReply>, Status> {
        self.members_only(&request, "AddNode")?;
        let req = request.into_inner();
        if req.id == 0 {
            return Err(Status::invalid_argument("node id must be > 0"));
        }
        let ep = convert::endpoint("address", &req.address)?;
        // The leader's view of the membership is the one that counts.
        if !self.node.is_leader() {
            return Err(status_of(self.node.not_leader()));
        }
        if self.node.status.borrow().voters.contains(&req.id) {
            // Done already (a retry after an unknown outcome): the same address is success.
            if self.node.address_of(req.id).as_deref() == Some(ep.authority()) {
                return Ok(Response::new(self.members()));
            }
            return Err(Status::already_exists(format!(
                "node {} is already a voter at another address",
                req.id
            )));
        }
        if !self.node.status.borrow().learners.contains(&req.id) {
            let cc = conf_change(ConfChangeType::AddLearnerNode, req.id, ep.authority());
            self.node.conf_change(cc).await.map_err(status_of)?;
        }
        if !req.learner_only {
            // Promote only once the learner has (nearly) the leader's log, so the
            // quorum does not depend on a node that is still catching up.
            let id = req.id;
            let node = self.node.clone();
            self.wait_for(
                self.learner_catch_up_timeout,
                "the learner to catch up",
                |st| st.matched.get(&id).is_some_and(|m| *m + 1 >= st.commit_index),
                |st| (st.role != Role::Leader).then(|| status_of(node.not_leader())),
            )
            .await?;
            let cc = conf_change(ConfChangeType::AddNode, req.id, ep.authority());
            self.node.conf_change(cc).await.map_err(status_of)?;
        }
        Ok(Response::new(self.members()))
    }

    #[tracing::instrument(skip_all, fields(node = self.node.id, removed = request.get_ref().id))]
    async fn remove_node(
        &self,
        request: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::MembersReply>, Status> {
        self.members_only(&request, "RemoveNode")?;
        let id = request.into_inner().id;
        // The leader's view of the membership is the one that counts.
        if !self.node.is_leader() {
            return Err(status_of(self.node.not_leader()));
        }
        self.check_member(id)?;
        if id == self.node.id {
            // raft-rs drops the leader's own progress and keeps it leading a group it is
            // not in; its next commit panics the raft thread.
            return Err(Status::failed_precondition(format!(
                "node {id} leads the cluster: transfer the leadership to another voter first \
                 (TransferLeader, `pss transfer-leader`), then remove it"
            )));
        }
        let cc = conf_change(ConfChangeType::RemoveNode, id, "");
        self.node.conf_change(cc).await.map_err(status_of)?;
        Ok(Response::new(self.members()))
    }

    #[tracing::instrument(skip_all, fields(node = self.node.id, to = request.get_ref().to))]
    async fn transfer_leader(
        &self,
        request: Request<pb::TransferLeaderRequest>,
    ) -> Result<Response<pb::StatusReply>, Status> {
        self.members_only(&request, "TransferLeader")?;
        let to = request.into_inner().to;
        {
            let st = self.node.status.borrow();
            if st.leader_id == to && (st.role == Role::Leader) == (st.id == to) {
                // Done already: `to` leads (a retry, or a transfer to the leader itself).
                drop(st);
                return Ok(Response::new(self.status()));
            }
        }
        // The leader's view of the membership is the one that counts.
        if !self.node.is_leader() {
            return Err(status_of(self.node.not_leader()));
        }
        self.check_member(to)?;
        if !self.node.status.borrow().voters.contains(&to) {
            return Err(Status::invalid_argument(format!("node {to} is a learner, not a voter")));
        }
        self.node.transfer_leader(to).await.map_err(status_of)?;
        let node = self.node.clone();
        self.wait_for(
            self.node.request_timeout,
            "the leadership transfer",
            |st| st.leader_id == to && st.role != Role::Leader,
            // Someone else won an election meanwhile: the caller retries at that leader.
            |st| {
                (st.role != Role::Leader && st.leader_id != 0 && st.leader_id != to)
                    .then(|| status_of(node.not_leader()))
            },
        )
        .await?;
        Ok(Response::new(self.status()))
    }

    async fn compact_log(
        &self,
        request: Request<pb::CompactLogRequest>,
    ) -> Result<Response<pb::StatusReply>, Status> {
        self.members_only(&request, "CompactLog")?;
        self.node.compact().await.map_err(status_of)?;
        Ok(Response::new(self.status()))
    }
}
