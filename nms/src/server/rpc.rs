//! The vehicle API (`wayside.v1.Nms`) and the admin API (`wayside.v1.NmsAdmin`): wire
//! messages in, domain calls on the [`Node`], statuses out.

use super::{LoadFor, Node, Presented};
use crate::cache::VolumeState;
use crate::error::NmsError;
use futures::stream::{FuturesUnordered, StreamExt as _};
use futures::FutureExt as _;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info_span, Instrument as _};
use wayside_proto::convert::{self, required_op};
use wayside_proto::pb;
use wayside_proto::types::{BlockNo, DeleteOp, Epoch, Lsn, ReadOp, VolumeName, WriteOp};

type Auth = (VolumeName, Presented);

/// The volume and credential an `Attach` or `CreateVolume` presents (its session, if
/// any, is not checked: these calls start one).
fn attach_auth(auth: Option<pb::VolumeAuth>) -> Result<Auth, convert::ConvertError> {
    let (v, c) = convert::volume_auth(auth)?;
    Ok((v, Presented::new(c)))
}

/// The volume and credential a vehicle call presents, refused (FAILED_PRECONDITION with a
/// `NotOwner` fault naming no owner) when it carries the session of another process than
/// this one: the vehicle attached to an earlier life of this node, which accepted writes
/// this one never saw. Loading the volume anew here would number new writes over the
/// lost ones; the vehicle attaches again instead and replays its journal.
fn volume_auth(node: &Node, auth: Option<pb::VolumeAuth>) -> Result<Auth, Status> {
    let session = auth.as_ref().map_or(0, |a| a.nms_session);
    let incarnation = auth.as_ref().map_or(0, |a| a.volume_incarnation);
    let (v, c) = convert::volume_auth(auth)?;
    if session != 0 && session != node.session {
        return Err(NmsError::NotOwner {
            volume: v.to_string(),
            why: format!(
                "the vehicle attached to an earlier run of this NMS (session {session:016x}, \
                 now {:016x}): attach again",
                node.session
            ),
            owner_address: String::new(),
            epoch: Epoch(0),
        }
        .into());
    }
    Ok((v, Presented::attached(c, session, incarnation)))
}

/// The figures of the copy of `v` here (`Ok(None)`: none). With `cred`, a vehicle's: the
/// copy must be the one it attached to, checked under the same lock the figures are read
/// under (a move may make it a redirect marker meanwhile, whose figures are no volume's).
fn info_of(
    node: &Node,
    v: &VolumeName,
    cred: Option<&Presented>,
) -> Result<Option<pb::VolumeInfo>, NmsError> {
    let writeback_refused = node.writeback_refused(v).unwrap_or_default();
    let migrating_out = node.handle(v).is_some_and(|h| h.migrating.load(Ordering::Acquire));
    let core = node.core();
    let Some(x) = core.volume(v) else { return Ok(None) };
    if let Some(cred) = cred {
        super::is_attached_copy(x, v, cred)?;
    }
    Ok(Some(pb::VolumeInfo {
        volume: v.as_str().to_owned(),
        block_size: x.block_size.bytes(),
        epoch: x.epoch.0,
        owner_node: node.node_id.clone(),
        cached_blocks: x.cached_blocks(),
        cached_bytes: x.cached_bytes(),
        dirty_bytes: x.dirty_bytes(),
        accepted_lsn: x.accepted.0,
        persisted_lsn: x.persisted.0,
        stored_blocks: x.stored_blocks,
        nms_session: node.session,
        writeback_refused,
        migrating_out,
        incarnation: x.incarnation(),
        predecessor_session: x.predecessor.map_or(0, |p| p.session),
        predecessor_incarnation: x.predecessor.map_or(0, |p| p.incarnation),
        predecessor_through_lsn: x.predecessor.map_or(0, |p| p.through.0),
        ancestors: x.ancestors.iter().map(super::copy_ref).collect(),
    }))
}

/// A read's reply: the data (`None`: the block holds none), its version, the watermark.
fn read_reply(data: Option<bytes::Bytes>, version: u64, persisted: Lsn) -> pb::ReadReply {
    pb::ReadReply {
        found: data.is_some(),
        data: data.unwrap_or_default(),
        version,
        persisted_lsn: persisted.0,
    }
}

/// A write's (or delete's) reply.
fn write_reply(o: &crate::cache::WriteOutcome) -> pb::WriteReply {
    pb::WriteReply {
        lsn: o.lsn.0,
        version: o.version,
        persisted_lsn: o.persisted.0,
        duplicate: o.duplicate,
    }
}

impl Node {
    /// A vehicle's create, attach or stat answered: the volume counts as in use.
    fn volume_reply(&self, v: &VolumeName, cred: &Presented) -> Result<pb::VolumeReply, Status> {
        self.core().touch(v);
        Ok(pb::VolumeReply {
            info: Some(
                info_of(self, v, Some(cred))?
                    .ok_or_else(|| NmsError::Unavailable("volume was unloaded".into()))?,
            ),
        })
    }

    async fn do_read(&self, auth: &Auth, op: ReadOp) -> Result<pb::ReadReply, NmsError> {
        let (data, version, p) = self.read(&auth.0, &auth.1, op.block, op.offset, op.len).await?;
        self.reads.fetch_add(1, Ordering::Relaxed);
        Ok(read_reply(data, version, p))
    }

    async fn do_write(&self, auth: &Auth, op: WriteOp) -> Result<pb::WriteReply, NmsError> {
        let o = self
            .write(&auth.0, &auth.1, op.block, op.offset, Some(&op.data), op.request_id.as_ref())
            .await?;
        Ok(write_reply(&o))
    }

    /// A unary `Read` (served by tonic's routes or by hand: [`super::wire`]).
    pub(super) async fn read_call(&self, r: pb::ReadRequest) -> Result<pb::ReadReply, Status> {
        let auth = volume_auth(self, r.auth)?;
        let op: ReadOp = required_op("op", r.op)?;
        Ok(self.do_read(&auth, op).await?)
    }

    /// A unary `Write`.
    pub(super) async fn write_call(&self, r: pb::WriteRequest) -> Result<pb::WriteReply, Status> {
        let auth = volume_auth(self, r.auth)?;
        let op: WriteOp = required_op("op", r.op)?;
        Ok(self.do_write(&auth, op).await?)
    }

    async fn do_delete(&self, auth: &Auth, op: DeleteOp) -> Result<pb::WriteReply, NmsError> {
        let o = self.write(&auth.0, &auth.1, op.block, 0, None, op.request_id.as_ref()).await?;
        Ok(write_reply(&o))
    }

    async fn stream_op(
        &self,
        auth: &Auth,
        op: pb::stream_request::Op,
    ) -> Result<pb::stream_reply::Result, Status> {
        use pb::stream_reply::Result as R;
        use pb::stream_request::Op;
        Ok(match op {
            Op::Read(r) => R::Read(self.do_read(auth, ReadOp::try_from(r)?).await?),
            Op::Write(w) => R::Write(self.do_write(auth, WriteOp::try_from(w)?).await?),
            Op::Delete(d) => R::Write(self.do_delete(auth, DeleteOp::try_from(d)?).await?),
            Op::Flush(_) => {
                R::Flush(pb::FlushReply { persisted_lsn: self.flush(&auth.0, &auth.1).await?.0 })
            }
        })
    }
}

/// The blocks a batch's read operations read.
fn batch_reads(ops: &[pb::StreamRequest]) -> Vec<BlockNo> {
    ops.iter()
        .filter_map(|m| match &m.op {
            Some(pb::stream_request::Op::Read(r)) => Some(r.block),
            _ => None,
        })
        .collect()
}

impl Node {
    /// Runs one stream operation to its reply (an error becomes the reply's result).
    async fn stream_reply(&self, a: &Auth, m: pb::StreamRequest) -> pb::StreamReply {
        let result = match m.op {
            None => Err(Status::invalid_argument("stream request without op")),
            Some(op) => self.stream_op(a, op).await,
        };
        let result = result.unwrap_or_else(|s| {
            pb::stream_reply::Result::Error(wayside_proto::error::stream_error(&s))
        });
        pb::StreamReply { tag: m.tag, result: Some(result) }
    }

    /// A message's operations answered at once when every one is a read that hits the
    /// cache (`None` otherwise: nothing was answered).
    fn stream_reads_now(
        &self,
        auth: &Auth,
        ops: &[pb::StreamRequest],
    ) -> Option<Vec<pb::StreamReply>> {
        let reads = ops
            .iter()
            .map(|m| match &m.op {
                Some(pb::stream_request::Op::Read(r)) => {
                    ReadOp::try_from(*r).ok().map(|op| (op.block, op.offset, op.len))
                }
                _ => None,
            })
            .collect::<Option<Vec<_>>>()?;
        let (outcomes, p) = self.read_many_now(&auth.0, &auth.1, &reads)?;
        self.reads.fetch_add(outcomes.len() as u64, Ordering::Relaxed);
        Some(
            ops.iter()
                .zip(outcomes)
                .map(|(m, o)| {
                    let (data, version) = match o {
                        crate::cache::ReadOutcome::Hit { data, version } => (Some(data), version),
                        _ => (None, 0),
                    };
                    pb::StreamReply {
                        tag: m.tag,
                        result: Some(pb::stream_reply::Result::Read(read_reply(data, version, p))),
                    }
                })
                .collect(),
        )
    }

    /// The writes at the start of `ops` that the cache takes at once, applied under one
    /// cache lock (one wake-up of the volume's write-back for all of them); their replies
    /// go to `out`. Stops at the first operation that is not a write or that must wait
    /// (dirty limit, a block to fetch) or fails: the caller runs it and the rest one by
    /// one, in order. Returns how many it applied.
    fn stream_writes_now(
        &self,
        auth: &Auth,
        ops: &[pb::StreamRequest],
        out: &mut Vec<pb::StreamReply>,
    ) -> usize {
        let (mut n, mut wrote, mut urgent) = (0, false, false);
        {
            let mut core = self.core();
            match core.volume(&auth.0) {
                Some(vol) if auth.1.admits(vol) && vol.state == VolumeState::Active => {}
                _ => return 0,
            }
            for m in ops {
                let Some(pb::stream_request::Op::Write(w)) = &m.op else { break };
                let Ok(op) = WriteOp::try_from(w.clone()) else { break };
                let Ok(o) =
                    core.write(&auth.0, op.block, op.offset, &op.data, op.request_id.as_ref())
                else {
                    break;
                };
                wrote |= !o.duplicate;
                urgent |= o.urgent;
                out.push(pb::StreamReply {
                    tag: m.tag,
                    result: Some(pb::stream_reply::Result::Write(write_reply(&o))),
                });
                n += 1;
            }
        }
        self.wake_writer(&auth.0, wrote, urgent);
        n
    }

    /// A stream's read that hits the cache or write the cache takes at once, answered
    /// without an `await` (no task, no wakeups); `None` for everything else (a miss, a
    /// paused or full volume, any error), which [`Node::stream_op`] then does in full.
    fn stream_op_now(
        &self,
        auth: &Auth,
        op: &pb::stream_request::Op,
    ) -> Option<pb::stream_reply::Result> {
        use pb::stream_reply::Result as R;
        use pb::stream_request::Op;
        Some(match op {
            Op::Read(r) => {
                let op = ReadOp::try_from(*r).ok()?;
                let (data, version, p) =
                    self.read_now(&auth.0, &auth.1, op.block, op.offset, op.len)?;
                self.reads.fetch_add(1, Ordering::Relaxed);
                R::Read(read_reply(data, version, p))
            }
            Op::Write(w) => {
                let op = WriteOp::try_from(w.clone()).ok()?;
                let o = self.write_now(
                    &auth.0,
                    &auth.1,
                    op.block,
                    op.offset,
                    &op.data,
                    op.request_id.as_ref(),
                )?;
                R::Write(write_reply(&o))
            }
            Op::Delete(_) | Op::Flush(_) => return None,
        })
    }
}

type StreamOut = Pin<Box<dyn futures::Stream<Item = Result<pb::StreamReply, Status>> + Send>>;
type BatchOut = Pin<Box<dyn futures::Stream<Item = Result<pb::StreamResults, Status>> + Send>>;

#[tonic::async_trait]
impl pb::nms_server::Nms for Node {
    async fn create_volume(
        &self,
        req: Request<pb::CreateVolumeRequest>,
    ) -> Result<Response<pb::VolumeReply>, Status> {
        let r = req.into_inner();
        let (v, cred) = attach_auth(r.auth)?;
        let bs = convert::block_size(r.block_size)?;
        let span = info_span!("create", node = %self.node_id, volume = %v);
        let by = LoadFor::Attach { take_over: r.take_over };
        self.load(&v, &cred, Some(bs), by).instrument(span).await?;
        Ok(Response::new(self.volume_reply(&v, &cred)?))
    }

    async fn attach(
        &self,
        req: Request<pb::AttachRequest>,
    ) -> Result<Response<pb::VolumeReply>, Status> {
        let r = req.into_inner();
        let (v, cred) = attach_auth(r.auth)?;
        let span = info_span!("attach", node = %self.node_id, volume = %v, client = %r.client_id);
        let by = LoadFor::Attach { take_over: r.take_over };
        self.load(&v, &cred, None, by).instrument(span).await?;
        Ok(Response::new(self.volume_reply(&v, &cred)?))
    }

    async fn read(&self, req: Request<pb::ReadRequest>) -> Result<Response<pb::ReadReply>, Status> {
        Ok(Response::new(self.read_call(req.into_inner()).await?))
    }

    async fn write(
        &self,
        req: Request<pb::WriteRequest>,
    ) -> Result<Response<pb::WriteReply>, Status> {
        Ok(Response::new(self.write_call(req.into_inner()).await?))
    }

    async fn delete(
        &self,
        req: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::WriteReply>, Status> {
        let r = req.into_inner();
        let auth = volume_auth(self, r.auth)?;
        let op: DeleteOp = required_op("op", r.op)?;
        Ok(Response::new(self.do_delete(&auth, op).await?))
    }

    async fn list(&self, req: Request<pb::ListRequest>) -> Result<Response<pb::ListReply>, Status> {
        let r = req.into_inner();
        let (v, cred) = volume_auth(self, r.auth)?;
        self.ensure(&v, &cred).await?;
        // Everything accepted is in the PSS first, so the PSS's listing is complete.
        self.flush(&v, &cred).await?;
        let limit = if r.limit == 0 { 1000 } else { r.limit.min(10_000) };
        let page = self.store.list_blocks(v, r.start_block, limit).await.map_err(NmsError::from)?;
        Ok(Response::new(pb::ListReply {
            blocks: page
                .blocks
                .into_iter()
                .map(|(block, version, length)| pb::BlockMeta { block, version, length })
                .collect(),
            more: page.more,
            next_block: page.next_block,
        }))
    }

    async fn stat(
        &self,
        req: Request<pb::StatRequest>,
    ) -> Result<Response<pb::VolumeReply>, Status> {
        let r = req.into_inner();
        let (v, cred) = volume_auth(self, r.auth)?;
        self.ensure(&v, &cred).await?;
        Ok(Response::new(self.volume_reply(&v, &cred)?))
    }

    async fn flush(
        &self,
        req: Request<pb::FlushRequest>,
    ) -> Result<Response<pb::FlushReply>, Status> {
        let r = req.into_inner();
        let (v, cred) = volume_auth(self, r.auth)?;
        let p = Node::flush(self, &v, &cred).await?;
        Ok(Response::new(pb::FlushReply { persisted_lsn: p.0 }))
    }

    type StreamStream = StreamOut;

    async fn stream(
        &self,
        req: Request<Streaming<pb::StreamRequest>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let out = self.serve_ops(stream_inbound(req.into_inner())).flat_map(|r| {
            futures::stream::iter(match r {
                Ok(replies) => replies.into_iter().map(Ok).collect::<Vec<_>>(),
                Err(s) => vec![Err(s)],
            })
        });
        Ok(Response::new(Box::pin(out)))
    }

    type StreamBatchesStream = BatchOut;

    async fn stream_batches(
        &self,
        req: Request<Streaming<pb::StreamBatch>>,
    ) -> Result<Response<Self::StreamBatchesStream>, Status> {
        let out = self
            .serve_ops(batch_inbound(req.into_inner(), self.cfg.max_stream_batch_ops))
            .map(|r| r.map(|results| pb::StreamResults { results }));
        Ok(Response::new(Box::pin(out)))
    }
}

/// `Stream`'s inbound messages as [`OpsIn`] (one operation each; tonic's server and the
/// hand-served one, [`super::wire`], both take them so).
pub(super) fn stream_inbound(
    inbound: impl futures::Stream<Item = Result<pb::StreamRequest, Status>> + Send + 'static,
) -> OpsIn {
    Box::pin(inbound.map(|m| {
        m.map(|mut m| {
            let auth = m.auth.take();
            (auth, vec![m])
        })
    }))
}

/// `StreamBatches`' inbound messages as [`OpsIn`]: a batch of more than `max` operations,
/// or one whose operations carry their own credential, ends the call.
pub(super) fn batch_inbound(
    inbound: impl futures::Stream<Item = Result<pb::StreamBatch, Status>> + Send + 'static,
    max: usize,
) -> OpsIn {
    Box::pin(inbound.map(move |m| {
        let m = m?;
        if m.ops.len() > max {
            return Err(Status::invalid_argument(format!(
                "a batch of {} operations exceeds max_stream_batch_ops ({max})",
                m.ops.len()
            )));
        }
        if m.ops.iter().any(|op| op.auth.is_some()) {
            return Err(Status::invalid_argument(
                "an operation in a batch carries its own auth; put it on the batch",
            ));
        }
        Ok((m.auth, m.ops))
    }))
}

/// The inbound side of a vehicle stream, whichever RPC carries it: per message, the
/// credential (if any) and the operations in order.
pub(super) type OpsIn = Pin<Box<dyn futures::Stream<Item = InMsg> + Send>>;

/// Items of replies (each up to `max_stream_inflight_ops` replies) a stream queues for
/// its caller to read.
const STREAM_REPLY_ITEMS: usize = 2;

/// One inbound message of a vehicle stream: its credential (if any) and its operations.
type InMsg = Result<(Option<pb::VolumeAuth>, Vec<pb::StreamRequest>), Status>;

/// What a stream's operations are waiting on: each future gives the replies of one or
/// more operations.
type Inflight = FuturesUnordered<futures::future::BoxFuture<'static, Vec<pb::StreamReply>>>;

/// The replies of a stream as they leave: one item per outbound message.
pub(super) type RepliesOut =
    Pin<Box<dyn futures::Stream<Item = Result<Vec<pb::StreamReply>, Status>> + Send>>;

/// One vehicle stream's state between its messages.
struct Ops {
    node: Arc<Node>,
    /// The credential of the stream (its first message's, or the latest one given).
    auth: Option<Arc<Auth>>,
    inflight: Inflight,
    /// Operations in the units of `inflight` (a cold batch is one unit of many): what
    /// `max_stream_inflight_ops` bounds.
    inflight_ops: usize,
    /// The order of the units in `inflight` (see [`BlockOrder`]).
    order: BlockOrder,
}

/// A pending unit's end, shared with the units ordered after it: `ran` is cancelled once
/// the unit has run (by its [`UnitEnd`], also when that is dropped unrun: the stream
/// ended), and `failed` then holds the blocks on which a write or delete of the unit failed
/// or was refused for an earlier failure (see [`BlockOrder`]), each with its volume and
/// that failure (set once, before `ran` is cancelled; read only after).
#[derive(Clone, Default)]
struct Done(Arc<DoneState>);

#[derive(Default)]
struct DoneState {
    ran: CancellationToken,
    failed: std::sync::OnceLock<Failed>,
}

/// The blocks of a unit on which an earlier write or delete of the stream failed, each with
/// its volume and its failure (a few: a unit is one operation, or one batch).
type Failed = Vec<(BlockNo, VolumeName, pb::StreamError)>;

impl Done {
    fn is_cancelled(&self) -> bool {
        self.0.ran.is_cancelled()
    }

    /// The failures this unit passes on to the next unit on `block`.
    fn failed_on(
        &self,
        block: BlockNo,
    ) -> impl Iterator<Item = &(BlockNo, VolumeName, pb::StreamError)> {
        self.0.failed.get().into_iter().flatten().filter(move |(b, _, _)| *b == block)
    }
}

/// Ends a pending unit when dropped (see [`Done`]).
struct UnitEnd(Done);

impl UnitEnd {
    /// Records the failures the unit passes on (call before dropping it).
    fn pass_on(&self, failed: Failed) {
        if !failed.is_empty() {
            let _ = self.0 .0.failed.set(failed);
        }
    }
}

impl Drop for UnitEnd {
    fn drop(&mut self) {
        self.0 .0.ran.cancel();
    }
}

/// Per block, the latest pending unit of a stream (an operation, or a batch run as one)
/// that touches it: a later unit touching the block waits for that one to finish first,
/// and so (each waiting for the one before it) for every earlier unit on the block. Keyed
/// by block number alone: a stream that changes volume at most waits more than it must.
/// Entries of finished units linger until pruned, so the map stays within about twice the
/// blocks of the pending units (and `2 * max_stream_inflight_ops`).
///
/// Waiting for an earlier unit to finish is not enough when it failed: a write (or delete)
/// failed under back-pressure, say, followed by a write of the same block that succeeded,
/// and the vehicle sends the failed one again (the same request ids: the later one answers
/// `duplicate`), the older data would land over the newer. So a failed write or delete
/// that may be sent again ([`passes_on`]) is passed on: every later write or delete of its
/// block (and volume) among the units pending behind it is not run but answered with that
/// failure (reads run, and pass it on), directly behind it or behind other pending units
/// of the block. Only those: a unit taken once nothing of its block is pending (or nothing
/// at all: the map is then cleared) runs. A vehicle that resends a batch on a new stream (as the
/// client library does) is served; one that pipelines on a long stream must not resend a
/// failed write with its old id after a later write of its block was acknowledged.
struct BlockOrder {
    latest: std::collections::HashMap<BlockNo, Done, foldhash::fast::RandomState>,
    /// The size past which the entries of finished units are dropped.
    prune_at: usize,
    floor: usize,
}

impl BlockOrder {
    fn new(max_inflight: usize) -> BlockOrder {
        let floor = 2 * max_inflight.max(1);
        BlockOrder { latest: Default::default(), prune_at: floor, floor }
    }

    /// Forgets every unit (call only when none is pending).
    fn clear(&mut self) {
        if !self.latest.is_empty() {
            self.latest.clear();
            self.prune_at = self.floor;
        }
    }

    /// Orders a new pending unit that touches `blocks`, and every block when `barrier` (a
    /// flush: it waits for every write sent before it): it becomes the latest unit of each
    /// of its blocks, and gets the still pending units it must not overtake (the latest of
    /// each of its blocks, with the block; every one for a barrier) and its end (to drop
    /// once it has run). Units on other blocks are not waited for: they run concurrently.
    fn order(&mut self, blocks: &[BlockNo], barrier: bool) -> (Vec<(BlockNo, Done)>, UnitEnd) {
        // All looked up before any is registered: a unit touching a block twice does
        // not wait for itself.
        let before: Vec<(BlockNo, Done)> = if barrier {
            self.latest
                .iter()
                .filter(|(_, d)| !d.is_cancelled())
                .map(|(&b, d)| (b, d.clone()))
                .collect()
        } else {
            blocks
                .iter()
                .filter_map(|b| self.latest.get(b).map(|d| (*b, d)))
                .filter(|(_, d)| !d.is_cancelled())
                .map(|(b, d)| (b, d.clone()))
                .collect()
        };
        let done = Done::default();
        for &b in blocks {
            self.latest.insert(b, done.clone());
        }
        if self.latest.len() > self.prune_at {
            self.latest.retain(|_, d| !d.is_cancelled());
            self.prune_at = (2 * self.latest.len()).max(self.floor);
        }
        (before, UnitEnd(done))
    }
}

/// The block an operation touches (`None`: a flush, or no operation).
fn op_block(op: Option<&pb::stream_request::Op>) -> Option<BlockNo> {
    use pb::stream_request::Op;
    match op? {
        Op::Read(r) => Some(r.block),
        Op::Write(w) => Some(w.block),
        Op::Delete(d) => Some(d.block),
        Op::Flush(_) => None,
    }
}

fn is_flush(op: Option<&pb::stream_request::Op>) -> bool {
    matches!(op, Some(pb::stream_request::Op::Flush(_)))
}

/// Waits until every unit of `before` has run; returns the failures they pass on to
/// the blocks they precede (see [`BlockOrder`]).
async fn after(before: Vec<(BlockNo, Done)>) -> Failed {
    let mut failed = Failed::new();
    for (b, d) in &before {
        d.0.ran.cancelled().await;
        for f in d.failed_on(*b) {
            if !failed.iter().any(|(b, v, _)| (b, v) == (&f.0, &f.1)) {
                failed.push(f.clone());
            }
        }
    }
    failed
}

/// Whether an operation changes its block (a write or a delete).
fn is_change(op: Option<&pb::stream_request::Op>) -> bool {
    use pb::stream_request::Op;
    matches!(op, Some(Op::Write(_) | Op::Delete(_)))
}

/// Whether a failed write or delete is passed on to the later ones of its block: when the
/// vehicle may send it again (its error is one a retry can get past: back-pressure, an NMS
/// or PSS unavailable, a redirect). A write refused for what it is (malformed, past the
/// block, a wrong credential) can never apply, so the later ones are not held to it.
fn passes_on(e: &pb::StreamError) -> bool {
    use tonic::Code;
    !matches!(
        Code::from_i32(e.code),
        Code::InvalidArgument
            | Code::OutOfRange
            | Code::NotFound
            | Code::Unauthenticated
            | Code::PermissionDenied
            | Code::AlreadyExists
            | Code::Unimplemented
    )
}

impl Node {
    /// Runs a unit's operation `m` in its turn (see [`BlockOrder`]): a write or delete of a
    /// block of its volume in `failed` is not run but answered with that block's failure
    /// (its code and detail: the vehicle does with it what it does with the failure), and
    /// one that fails so that it may be sent again adds its block to `failed`, which the
    /// unit passes on.
    async fn ordered_reply(
        &self,
        a: &Auth,
        m: pb::StreamRequest,
        failed: &mut Failed,
    ) -> pb::StreamReply {
        let change = is_change(m.op.as_ref()).then(|| op_block(m.op.as_ref())).flatten();
        if let Some(b) = change {
            if let Some((_, _, e)) = failed.iter().find(|(f, v, _)| *f == b && *v == a.0) {
                let e = pb::StreamError {
                    message: format!(
                        "not applied: an earlier write or delete of block {b} in this stream \
                         failed, send it again first ({})",
                        e.message
                    ),
                    ..e.clone()
                };
                return pb::StreamReply {
                    tag: m.tag,
                    result: Some(pb::stream_reply::Result::Error(e)),
                };
            }
        }
        let reply = self.stream_reply(a, m).await;
        if let (Some(b), Some(pb::stream_reply::Result::Error(e))) = (change, &reply.result) {
            if passes_on(e) {
                failed.push((b, a.0.clone(), e.clone()));
            }
        }
        reply
    }
}

impl Ops {
    /// Takes one inbound message: its operations start in order, and those answered at
    /// once are returned (an error ends the stream). An operation is answered at once only
    /// when nothing of the stream is pending; one that waits (or comes after one that
    /// waits) joins `inflight` as a unit ordered after the pending units on its blocks
    /// ([`BlockOrder`]), so no operation overtakes an earlier one on the same block.
    fn take(
        &mut self,
        m_auth: Option<pb::VolumeAuth>,
        ops: Vec<pb::StreamRequest>,
    ) -> Result<Vec<pb::StreamReply>, Status> {
        let node = self.node.clone();
        if self.auth.is_none() || m_auth.is_some() {
            self.auth = Some(Arc::new(volume_auth(&node, m_auth)?));
        }
        let a = self.auth.clone().expect("set above");
        if self.inflight.is_empty() {
            // Nothing pending: no unit to wait for.
            self.order.clear();
        }
        // A batch of reads that all hit: answered under one cache lock.
        if ops.len() > 1 && self.inflight.is_empty() {
            if let Some(replies) = node.stream_reads_now(&a, &ops) {
                return Ok(replies);
            }
        }
        let mut ready = Vec::new();
        // A batch whose reads miss the cache: every missed block comes from the PSS in one
        // call first, then the message's operations run in order in one task (instead of
        // one PSS call per read), as one unit ordered after the pending ones on its blocks.
        let reads = if ops.len() > 1 { batch_reads(&ops) } else { Vec::new() };
        // (No cache lock for a batch without two reads.)
        let cold = if reads.len() > 1 { node.uncached(&a.0, &reads) } else { Vec::new() };
        if cold.len() > 1 {
            let mut blocks: Vec<BlockNo> =
                ops.iter().filter_map(|m| op_block(m.op.as_ref())).collect();
            blocks.sort_unstable();
            blocks.dedup();
            let barrier = ops.iter().any(|m| is_flush(m.op.as_ref()));
            let (before, done) = self.order.order(&blocks, barrier);
            self.inflight_ops += ops.len();
            self.inflight.push(
                async move {
                    let (cold, mut failed) = if before.is_empty() {
                        (cold, Failed::new())
                    } else {
                        // The earlier units on these blocks first (they may fetch some
                        // of them: fetched once, not twice with one fill lost).
                        let failed = after(before).await;
                        (node.uncached(&a.0, &cold), failed)
                    };
                    // On failure each read below goes to the PSS itself and answers with
                    // its own error.
                    if !cold.is_empty() {
                        if let Err(e) = node.prefetch(&a.0, &a.1, cold).await {
                            tracing::debug!(error = %e, "batch prefetch failed");
                        }
                    }
                    let mut out = Vec::with_capacity(ops.len());
                    for m in ops {
                        out.push(node.ordered_reply(&a, m, &mut failed).await);
                    }
                    done.pass_on(failed);
                    drop(done);
                    out
                }
                .boxed(),
            );
            return Ok(ready);
        }
        // A run of writes the cache takes at once: under one lock.
        let done = if ops.len() > 1 && self.inflight.is_empty() {
            node.stream_writes_now(&a, &ops, &mut ready)
        } else {
            0
        };
        for m in ops.into_iter().skip(done) {
            // Answered at once, but only when nothing earlier in this stream is still
            // pending, so an operation never overtakes one that waits.
            if self.inflight.is_empty() {
                if let Some(result) = m.op.as_ref().and_then(|op| node.stream_op_now(&a, op)) {
                    ready.push(pb::StreamReply { tag: m.tag, result: Some(result) });
                    continue;
                }
            }
            let (before, done) = match op_block(m.op.as_ref()) {
                Some(b) => self.order.order(&[b], false),
                None => self.order.order(&[], is_flush(m.op.as_ref())),
            };
            let (node, a) = (node.clone(), a.clone());
            self.inflight_ops += 1;
            self.inflight.push(
                async move {
                    let mut failed =
                        if before.is_empty() { Failed::new() } else { after(before).await };
                    let reply = node.ordered_reply(&a, m, &mut failed).await;
                    done.pass_on(failed);
                    drop(done);
                    vec![reply]
                }
                .boxed(),
            );
        }
        Ok(ready)
    }
}

/// Messages received together, not yet taken: their operations run as one (see
/// [`Node::serve_ops`]).
#[derive(Default)]
struct Pending {
    messages: usize,
    auth: Option<pb::VolumeAuth>,
    ops: Vec<pb::StreamRequest>,
}

impl Ops {
    /// Adds a received message to `p`; what `p` holds is taken first if the message
    /// carries a credential (operations run under the credential they were sent with).
    fn add(
        &mut self,
        p: &mut Pending,
        m_auth: Option<pb::VolumeAuth>,
        m_ops: Vec<pb::StreamRequest>,
        ready: &mut Vec<pb::StreamReply>,
    ) -> Result<(), Status> {
        if m_auth.is_some() && p.messages > 0 {
            self.flush(p, ready)?;
        }
        p.messages += 1;
        if m_auth.is_some() {
            p.auth = m_auth;
        }
        if p.ops.is_empty() {
            p.ops = m_ops;
        } else {
            p.ops.extend(m_ops);
        }
        Ok(())
    }

    /// Takes what `p` holds (see [`Ops::take`]); the replies answered at once go to `ready`.
    fn flush(&mut self, p: &mut Pending, ready: &mut Vec<pb::StreamReply>) -> Result<(), Status> {
        if p.messages == 0 {
            return Ok(());
        }
        p.messages = 0;
        ready.extend(self.take(p.auth.take(), std::mem::take(&mut p.ops))?);
        Ok(())
    }

    /// Takes `first` (a message the caller already received, if any) and every message
    /// already received after it as one run (`Pending`), until `limit` operations are
    /// waiting, taken or answered; the replies answered at once go to `ready`. Returns
    /// whether the vehicle may still send; an error ends the stream (the replies before it
    /// are in `ready`).
    fn take_received(
        &mut self,
        inbound: &mut OpsIn,
        mut first: Option<Option<InMsg>>,
        limit: usize,
        ready: &mut Vec<pb::StreamReply>,
    ) -> Result<bool, Status> {
        let mut pending = Pending::default();
        let (mut open, mut failed) = (true, None);
        loop {
            // (A no-op waker if not received yet: the caller's task polls `inbound` again
            // with its own.)
            let Some(m) = first.take().or_else(|| inbound.next().now_or_never()) else { break };
            let Some(m) = m else {
                open = false;
                break;
            };
            if let Err(s) =
                m.and_then(|(m_auth, m_ops)| self.add(&mut pending, m_auth, m_ops, ready))
            {
                failed = Some(s);
                break;
            }
            if self.inflight_ops + ready.len() + pending.ops.len() >= limit {
                break;
            }
        }
        let flushed = self.flush(&mut pending, ready);
        match failed {
            Some(s) => Err(s),
            None => flushed.map(|()| open),
        }
    }
}

impl Node {
    /// Serves one vehicle stream (`Stream` or `StreamBatches`): the operations of each
    /// inbound message are taken in order; the results that are ready together (those of
    /// every message already received that were answered at once, or every in-flight
    /// operation that has finished) leave as one outbound item, so a batch costs one
    /// message each way and a pipelining vehicle's single operations share messages. An
    /// item gathers at most `max_stream_inflight_ops` results (more messages received wait
    /// for the next item). The messages received together are taken as one run of
    /// operations (`Pending`), so single-operation messages (`Stream`) are answered
    /// together as a batch is: the reads that hit under one cache lock, the reads that miss
    /// with one PSS call.
    ///
    /// The messages already received are taken here, in the call; a task (and a channel
    /// to it) serves the rest of the stream only if something waits or more may come. A
    /// call of one batch answered from the cache (a batch with its END_STREAM, as a
    /// pipelining client sends it) so ends in this turn: its results and trailers leave
    /// in one write, with no task spawned and no wake-up between them.
    pub(super) fn serve_ops(&self, mut inbound: OpsIn) -> RepliesOut {
        let mut ops = Ops {
            node: self.self_arc(),
            auth: None,
            inflight: Inflight::new(),
            inflight_ops: 0,
            order: BlockOrder::new(self.cfg.max_stream_inflight_ops),
        };
        let limit = self.cfg.max_stream_inflight_ops;
        // The replies answered here leave as one item: at most `limit` are gathered (the
        // task takes the rest).
        let mut gathered: Vec<pb::StreamReply> = Vec::new();
        let mut open = match ops.take_received(&mut inbound, None, limit, &mut gathered) {
            Ok(open) => open,
            Err(s) => {
                let now = (!gathered.is_empty()).then_some(Ok(gathered));
                return Box::pin(futures::stream::iter(now.into_iter().chain([Err(s)])));
            }
        };
        let now = futures::stream::iter((!gathered.is_empty()).then_some(Ok(gathered)));
        if !open && ops.inflight.is_empty() {
            return Box::pin(now);
        }
        // Each item gathers up to `limit` replies already: a few of them queued keep the
        // connection busy, and a vehicle that stops reading makes this node hold no more
        // than that (`limit` items held `limit` squared replies a stream).
        let (tx, rx) = tokio::sync::mpsc::channel(STREAM_REPLY_ITEMS);
        // Sent when the task ends the stream itself (all answered, or an error sent). A
        // task that ends otherwise (the node stopping, or a panic) drops it unsent, and
        // the reply stream then ends with UNAVAILABLE: ended with OK, a stream cut short
        // would read as complete. (The task sends no status itself at a stop: that would
        // wait for room in `tx`, on a vehicle that may read no more.)
        let (ended_tx, ended_rx) = tokio::sync::oneshot::channel::<()>();
        let stop = self.stop.clone();
        let span = info_span!("stream", node = %self.node_id);
        self.tracker.spawn(
            async move {
                // One future for the whole stream, not a new waiter registered per message.
                let cancelled = stop.cancelled();
                // Ready once the reply stream is dropped (the call is gone: its connection
                // closed, or the vehicle reset it): nobody reads the replies.
                let gone = tx.closed();
                tokio::pin!(cancelled, gone);
                loop {
                    // The vehicle half-closed and every operation is answered: end the
                    // reply stream (its trailers tell the vehicle all is done).
                    if !open && ops.inflight.is_empty() {
                        let _ = ended_tx.send(());
                        return;
                    }
                    let mut ready = Vec::new();
                    tokio::select! {
                        _ = &mut cancelled => return,
                        () = &mut gone => return,
                        Some(replies) = ops.inflight.next(), if !ops.inflight.is_empty() => {
                            ops.inflight_ops -= replies.len();
                            ready.extend(replies);
                            // Everything else already finished goes in the same message.
                            // (Polling with a no-op waker here loses no wakeup: the next
                            // `select!` polls `inflight` again with this task's waker.)
                            while let Some(Some(replies)) = ops.inflight.next().now_or_never() {
                                ops.inflight_ops -= replies.len();
                                ready.extend(replies);
                            }
                        }
                        msg = inbound.next(), if open && ops.inflight_ops < limit => {
                            // This message, then every one already received, taken as
                            // one run: their replies leave as one item, not one each.
                            match ops.take_received(&mut inbound, Some(msg), limit, &mut ready) {
                                Ok(still_open) => open = still_open,
                                Err(s) => {
                                    let last = async {
                                        if !ready.is_empty() {
                                            let _ = tx.send(Ok(ready)).await;
                                        }
                                        let _ = tx.send(Err(s)).await;
                                        let _ = ended_tx.send(());
                                    };
                                    tokio::select! {
                                        () = last => {}
                                        _ = &mut cancelled => {}
                                    }
                                    return;
                                }
                            }
                        }
                        // (Not reached: with nothing in flight the vehicle may still send,
                        // or the check at the top has ended the stream.)
                        else => {
                            let _ = ended_tx.send(());
                            return;
                        }
                    }
                    if !ready.is_empty() {
                        // (A vehicle that stops reading holds this task no longer than
                        // the node runs.)
                        tokio::select! {
                            sent = tx.send(Ok(ready)) => if sent.is_err() { return },
                            _ = &mut cancelled => return,
                        }
                    }
                }
            }
            .instrument(span),
        );
        let cut_short = futures::stream::once(ended_rx).filter_map(|ended| async move {
            ended.is_err().then(|| {
                Err(Status::unavailable(
                    "the node is stopping: the stream was cut short (an operation sent may be unanswered)",
                ))
            })
        });
        Box::pin(now.chain(ReceiverStream::new(rx)).chain(cut_short))
    }
}

#[tonic::async_trait]
impl pb::nms_admin_server::NmsAdmin for Node {
    async fn start_migration(
        &self,
        req: Request<pb::StartMigrationRequest>,
    ) -> Result<Response<pb::MigrationReport>, Status> {
        let r = req.into_inner();
        let v = convert::volume_name(&r.volume)?;
        let target = convert::endpoint("target_address", &r.target_address)?;
        let rounds = if r.max_rounds == 0 { self.cfg.migration_max_rounds } else { r.max_rounds };
        let below = if r.switch_below_bytes == 0 {
            self.cfg.migration_switch_below_bytes
        } else {
            r.switch_below_bytes
        };
        let node = self.self_arc();
        let span = info_span!("migrate_out", node = %self.node_id, volume = %v, to = %target);
        // Owned by the tracker so a dropped admin call does not cut a switch in half.
        let task = self.spawn_critical(
            "a move out panicked",
            async move { node.migrate_out(v, target, rounds, below).await }.instrument(span),
        );
        let report = task.await.map_err(|e| Status::internal(format!("migration task: {e}")))??;
        Ok(Response::new(report))
    }

    async fn node_status(
        &self,
        _req: Request<pb::NodeStatusRequest>,
    ) -> Result<Response<pb::NodeStatusReply>, Status> {
        let names: Vec<VolumeName> = self
            .core()
            .volumes()
            .filter(|v| !matches!(v.state, VolumeState::Moved { .. }))
            .map(|v| v.name.clone())
            .collect();
        let volume_info: Vec<pb::VolumeInfo> =
            names.iter().filter_map(|v| info_of(self, v, None).ok().flatten()).collect();
        let core = self.core();
        let pool = self.pool.stats();
        Ok(Response::new(pb::NodeStatusReply {
            node: self.node_id.clone(),
            advertise_address: self.advertise.uri().to_owned(),
            volumes: volume_info.len() as u64,
            cached_bytes: core.used_bytes(),
            cache_capacity_bytes: self.cfg.cache_capacity_bytes,
            dirty_bytes: core.dirty_bytes(),
            dirty_limit_bytes: self.cfg.dirty_limit_bytes,
            volume_info,
            uptime_ms: u64::try_from(self.uptime().as_millis()).unwrap_or(u64::MAX),
            writeback_batches: self.wb_batches.load(Ordering::Relaxed),
            pss_reads: self.pss_reads.load(Ordering::Relaxed),
            pss_read_blocks: self.pss_read_blocks.load(Ordering::Relaxed),
            writeback_blocks: self.wb_blocks.load(Ordering::Relaxed),
            reads: self.reads.load(Ordering::Relaxed),
            calls_failed: self.calls_failed.load(Ordering::Relaxed),
            volumes_unloaded: self.volumes_unloaded.load(Ordering::Relaxed),
            block_pool_free_bytes: (pool.free_slots * crate::pool::SLOT_BYTES) as u64,
            block_pool_filling: pool.filling,
        }))
    }

    async fn check_credential(
        &self,
        req: Request<pb::CheckCredentialRequest>,
    ) -> Result<Response<pb::CheckCredentialReply>, Status> {
        let r = req.into_inner();
        let v = convert::volume_name(&r.volume)?;
        let presented = wayside_proto::types::Credential::new(r.credential)
            .map_err(|e| Status::invalid_argument(format!("credential: {e}")))?;
        let cached = self.core().volume(&v).map(|x| x.credential);
        let stored = match cached {
            Some(h) => h,
            None => self.store.get_volume(v).await.map_err(NmsError::from)?.credential,
        };
        Ok(Response::new(pb::CheckCredentialReply { valid: stored.matches(&presented) }))
    }

    async fn shutdown(
        &self,
        _req: Request<pb::ShutdownRequest>,
    ) -> Result<Response<pb::ShutdownReply>, Status> {
        tracing::info!(node = %self.node_id, "admin shutdown requested");
        self.shutdown.cancel();
        Ok(Response::new(pb::ShutdownReply {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether every unit of `before` has run (waiting for them would not wait).
    fn ran(before: &[(BlockNo, Done)]) -> bool {
        after(before.to_vec()).now_or_never().is_some()
    }

    #[test]
    fn a_unit_waits_for_the_pending_ones_on_its_blocks_only() {
        let mut o = BlockOrder::new(4);
        let (b1, g1) = o.order(&[7], false);
        assert!(b1.is_empty(), "the first unit waits for nothing");
        let (b2, g2) = o.order(&[8], false);
        assert!(b2.is_empty(), "another block: concurrent");
        let (b3, g3) = o.order(&[7, 9, 7], false);
        // (The first unit once per naming of block 7; never the new unit itself: see
        // below, it is done waiting once the first unit ran.)
        assert_eq!(b3.len(), 2, "the pending unit on block 7");
        assert!(!ran(&b3));
        let (b4, _g4) = o.order(&[7], false);
        assert_eq!(b4.len(), 1, "only the latest on block 7 (it waits for the first)");
        let (b5, _g5) = o.order(&[9], false);
        assert_eq!(b5.len(), 1);
        drop(g1);
        assert!(ran(&b3), "the first unit ran");
        assert!(!ran(&b4), "the third has not");
        let (flush, _) = o.order(&[], true);
        assert_eq!(flush.len(), 3, "a flush waits for every pending unit: {}", flush.len());
        drop((g2, g3));
        let (b6, _) = o.order(&[8], false);
        assert!(b6.is_empty(), "a finished unit is not waited for");
    }

    #[test]
    fn finished_units_are_pruned() {
        let mut o = BlockOrder::new(2);
        for b in 0..100 {
            drop(o.order(&[b], false).1);
        }
        assert!(o.latest.len() <= 5, "{} entries", o.latest.len());
        let pending: Vec<_> = (1000..1010).map(|b| o.order(&[b], false).1).collect();
        assert!(o.latest.len() <= 10 + 5);
        for b in 1000..1010 {
            let (before, _) = o.order(&[b], false);
            assert_eq!(before.len(), 1, "block {b}: its pending unit kept");
        }
        drop(pending);
        o.clear();
        assert!(o.latest.is_empty());
    }

    /// A store whose `get_blocks` counts the blocks asked for and parks until the gate
    /// opens (a PSS slow to answer).
    struct SlowReads {
        inner: crate::store::MemStore,
        asked: std::sync::atomic::AtomicUsize,
        entered: tokio::sync::Notify,
        gate: tokio::sync::Semaphore,
        /// Set: before answering, a newer read of the same blocks begins on this node
        /// (another caller's), so the answer is not cached.
        superseded_on: std::sync::Mutex<Option<std::sync::Weak<Node>>>,
        /// Set: acquires wait for `acquire_gate` (after notifying `acquire_entered`).
        hold_acquires: std::sync::atomic::AtomicBool,
        acquire_entered: tokio::sync::Notify,
        acquire_gate: tokio::sync::Semaphore,
        /// Reads asking for any of these blocks fail (UNAVAILABLE), after the gate.
        fail_blocks: std::sync::Mutex<Vec<BlockNo>>,
        /// Set: volume reads wait for `volume_gate`, counted in `volume_reads_waiting`.
        hold_volume_reads: std::sync::atomic::AtomicBool,
        volume_reads_waiting: std::sync::atomic::AtomicUsize,
        volume_read_entered: tokio::sync::Notify,
        volume_gate: tokio::sync::Semaphore,
    }

    impl SlowReads {
        fn new() -> Arc<SlowReads> {
            Arc::new(SlowReads {
                inner: crate::store::MemStore::default(),
                asked: Default::default(),
                entered: tokio::sync::Notify::new(),
                gate: tokio::sync::Semaphore::new(0),
                superseded_on: std::sync::Mutex::new(None),
                hold_acquires: false.into(),
                acquire_entered: tokio::sync::Notify::new(),
                acquire_gate: tokio::sync::Semaphore::new(0),
                fail_blocks: Default::default(),
                hold_volume_reads: false.into(),
                volume_reads_waiting: Default::default(),
                volume_read_entered: tokio::sync::Notify::new(),
                volume_gate: tokio::sync::Semaphore::new(0),
            })
        }
    }

    impl crate::store::Store for SlowReads {
        fn acquire(
            &self,
            req: crate::store::Acquire,
        ) -> crate::store::BoxFut<'_, Result<crate::store::VolumeMeta, crate::store::StoreError>>
        {
            Box::pin(async move {
                if self.hold_acquires.load(Ordering::SeqCst) {
                    self.acquire_entered.notify_one();
                    let _open = self.acquire_gate.acquire().await.expect("gate open");
                }
                self.inner.acquire(req).await
            })
        }
        fn get_volume(
            &self,
            volume: VolumeName,
        ) -> crate::store::BoxFut<'_, Result<crate::store::VolumeMeta, crate::store::StoreError>>
        {
            Box::pin(async move {
                if self.hold_volume_reads.load(Ordering::SeqCst) {
                    self.volume_reads_waiting.fetch_add(1, Ordering::SeqCst);
                    self.volume_read_entered.notify_one();
                    let _open = self.volume_gate.acquire().await.expect("gate open");
                    self.volume_reads_waiting.fetch_sub(1, Ordering::SeqCst);
                }
                self.inner.get_volume(volume).await
            })
        }
        fn write_batch(
            &self,
            batch: crate::store::WriteBack,
        ) -> crate::store::BoxFut<'_, Result<Lsn, crate::store::StoreError>> {
            self.inner.write_batch(batch)
        }
        fn get_blocks(
            &self,
            volume: VolumeName,
            blocks: Vec<BlockNo>,
        ) -> crate::store::BoxFut<'_, Result<crate::store::Fetched, crate::store::StoreError>>
        {
            Box::pin(async move {
                self.asked.fetch_add(blocks.len(), Ordering::SeqCst);
                self.entered.notify_one();
                let _open = self.gate.acquire().await.expect("gate open");
                let node = self.superseded_on.lock().unwrap().as_ref().and_then(|n| n.upgrade());
                if let Some(node) = node {
                    node.core().begin_fetch(&volume, &blocks);
                }
                if blocks.iter().any(|b| self.fail_blocks.lock().unwrap().contains(b)) {
                    return Err(crate::store::StoreError::Unavailable("the test fails it".into()));
                }
                self.inner.get_blocks(volume, blocks).await
            })
        }
        fn list_blocks(
            &self,
            volume: VolumeName,
            start: BlockNo,
            limit: u32,
        ) -> crate::store::BoxFut<'_, Result<crate::store::BlockPage, crate::store::StoreError>>
        {
            self.inner.list_blocks(volume, start, limit)
        }
    }

    /// A node (id "a") over a [`SlowReads`] store holding volume "v" (credential "k", made
    /// by another node), with `cfg` (its id and block pool set here).
    async fn node_over_slow_reads(
        cfg: crate::config::Config,
    ) -> (Arc<SlowReads>, Arc<Node>, VolumeName, wayside_proto::types::Credential) {
        use crate::store::Store as _;
        use wayside_proto::types::{BlockSize, Credential, Endpoint, RequestId};
        let store = SlowReads::new();
        let v = VolumeName::new("v").unwrap();
        let cred = Credential::new("k").unwrap();
        store
            .inner
            .acquire(crate::store::Acquire {
                volume: v.clone(),
                owner_node: "other".into(),
                owner_address: "http://127.0.0.1:1".into(),
                owner_session: 0,
                expected_epoch: None,
                create: Some((BlockSize::new(4096).unwrap(), cred.hash())),
                request_id: RequestId::new("test", 1).unwrap(),
            })
            .await
            .unwrap();
        let cfg = crate::config::Config { node_id: "a".into(), block_pool_bytes: 0, ..cfg };
        let dyn_store: Arc<dyn crate::store::Store> = store.clone();
        let node = Node::new(
            cfg,
            Endpoint::parse("127.0.0.1:2").unwrap(),
            dyn_store,
            None,
            CancellationToken::new(),
        );
        (store, node, v, cred)
    }

    /// `max_stream_inflight_ops` counts operations, not units: a stream whose batches of
    /// cold reads (each run as one unit) wait on the PSS takes no more messages once the
    /// operations it holds reach the limit; they are taken once answers come back, and
    /// every operation is answered. (Counting units, 2 units of 200 reads passed a limit
    /// of 150 and the third batch was taken too.)
    #[tokio::test]
    async fn a_stream_holds_at_most_max_stream_inflight_ops_operations() {
        use crate::config::Config;
        let (store, node, v, cred) =
            node_over_slow_reads(Config { max_stream_inflight_ops: 150, ..Config::default() })
                .await;
        node.load(&v, &Presented::new(cred.clone()), None, LoadFor::Call).await.unwrap();
        // Three batches of 100 reads of blocks never written (cold: they go to the PSS),
        // all received before the stream starts.
        let (tx, rx) = tokio::sync::mpsc::channel(3);
        for batch in 0..3u64 {
            let ops = (0..100u64)
                .map(|i| {
                    let block = batch * 100 + i;
                    pb::StreamRequest {
                        auth: None,
                        tag: block + 1,
                        op: Some(pb::stream_request::Op::Read(pb::ReadOp {
                            block,
                            offset: 0,
                            length: 0,
                        })),
                    }
                })
                .collect();
            let auth =
                pb::VolumeAuth { volume: "v".into(), credential: "k".into(), ..Default::default() };
            tx.send(Ok(pb::StreamBatch { auth: Some(auth), ops })).await.unwrap();
        }
        drop(tx);
        let mut replies = node.serve_ops(batch_inbound(ReceiverStream::new(rx), 1000));
        // The stream's task has run (it polls the operations in flight, which ask the PSS)
        // and, with room, would have taken the third batch in the same turn.
        store.entered.notified().await;
        tokio::task::yield_now().await;
        assert_eq!(
            store.asked.load(Ordering::SeqCst),
            200,
            "two batches taken (200 operations reach the limit of 150), the third waits"
        );
        store.gate.add_permits(1000);
        let mut tags = std::collections::BTreeSet::new();
        while let Some(r) = replies.next().await {
            for reply in r.unwrap() {
                assert!(
                    matches!(reply.result, Some(pb::stream_reply::Result::Read(ref x)) if !x.found),
                    "{reply:?}"
                );
                tags.insert(reply.tag);
            }
        }
        assert_eq!(tags.len(), 300, "every operation answered");
        assert_eq!(store.asked.load(Ordering::SeqCst), 300);
        node.stop.cancel();
    }

    /// A vehicle that stops reading its stream's replies makes the node take only a few
    /// items' worth more of its requests (the reply queue held `max_stream_inflight_ops`
    /// items of as many replies each: a million replies a stream, from a caller without
    /// the volume's credential).
    #[tokio::test]
    async fn a_stream_whose_replies_are_not_read_takes_few_more_requests() {
        use crate::config::Config;
        let (_store, node, v, cred) =
            node_over_slow_reads(Config { max_stream_inflight_ops: 32, ..Config::default() }).await;
        node.load(&v, &Presented::new(cred), None, LoadFor::Call).await.unwrap();
        let taken = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = taken.clone();
        let inbound = futures::stream::iter(0..100_000u64).map(move |tag| {
            counter.fetch_add(1, Ordering::SeqCst);
            let auth = pb::VolumeAuth {
                volume: "v".into(),
                credential: "no".into(),
                ..Default::default()
            };
            let op = pb::ReadOp { block: 0, offset: 0, length: 0 };
            Ok(pb::StreamRequest {
                auth: Some(auth),
                tag,
                op: Some(pb::stream_request::Op::Read(op)),
            })
        });
        let replies = node.serve_ops(stream_inbound(inbound));
        for _ in 0..200 {
            tokio::task::yield_now().await;
        }
        let n = taken.load(Ordering::SeqCst);
        assert!(n > 32, "the stream was served (each operation refused): {n}");
        assert!(n < 300, "{n} requests taken while nobody read the replies");
        drop(replies);
        node.stop.cancel();
    }

    /// A partial write of an uncached block reads it from the PSS first; when the answer
    /// cannot be cached (here every read is overtaken by a newer one of the same block, as
    /// by other callers; or the block is pushed out again at once), it stops after
    /// `backpressure_wait_ms` from the first read with UNAVAILABLE, rather than reading
    /// the block for ever, and nothing is written. Read once and kept, the write applies.
    #[tokio::test]
    async fn a_partial_write_whose_block_cannot_be_kept_gives_up_within_the_wait() {
        use crate::config::Config;
        let (store, node, v, cred) =
            node_over_slow_reads(Config { backpressure_wait_ms: 200, ..Config::default() }).await;
        store.gate.add_permits(1 << 20);
        let who = Presented::new(cred.clone());
        node.load(&v, &who, None, LoadFor::Call).await.unwrap();
        *store.superseded_on.lock().unwrap() = Some(Arc::downgrade(&node));
        let t = std::time::Instant::now();
        let e = node.write(&v, &who, 100, 10, Some(b"abc"), None).await.unwrap_err();
        let took = t.elapsed();
        assert!(
            matches!(&e, NmsError::Unavailable(m) if m.contains("backpressure_wait_ms")),
            "{e:?}"
        );
        assert!(took >= std::time::Duration::from_millis(200), "gave up after {took:?}");
        assert!(took < std::time::Duration::from_secs(5), "gave up after {took:?}");
        let reads = store.asked.load(Ordering::SeqCst);
        assert!(reads > 1, "read again and again: {reads}");
        assert_eq!(node.core().volume(&v).unwrap().accepted, Lsn(0), "nothing written");
        *store.superseded_on.lock().unwrap() = None;
        let o = node.write(&v, &who, 100, 10, Some(b"abc"), None).await.unwrap();
        assert_eq!(o.lsn, Lsn(1));
        node.stop.cancel();
    }

    /// A caller whose load of a volume waits on the PSS and who then stops being polled
    /// (a stream whose vehicle stopped reading its replies: its task waits to send) does
    /// not keep the volume's load lock, and with it every other attach of the volume here,
    /// waiting: the load runs in a task of its own and finishes when the PSS answers.
    #[tokio::test]
    async fn a_load_whose_caller_stops_being_polled_does_not_hold_up_other_callers() {
        use crate::config::Config;
        let (store, node, v, cred) = node_over_slow_reads(Config::default()).await;
        let who = Presented::new(cred.clone());
        store.hold_acquires.store(true, Ordering::SeqCst);
        let mut stalled = Box::pin(node.ensure(&v, &who));
        assert!(futures::poll!(&mut stalled).is_pending(), "the load waits on the PSS");
        store.acquire_entered.notified().await;
        // The PSS answers; the first caller is never polled again.
        store.hold_acquires.store(false, Ordering::SeqCst);
        store.acquire_gate.add_permits(1);
        let other = tokio::time::timeout(std::time::Duration::from_secs(10), node.ensure(&v, &who));
        let r = other.await.expect("another caller waited on the stalled caller's load");
        r.unwrap();
        assert!(node.core().volume(&v).is_some(), "loaded");
        drop(stalled);
        node.stop.cancel();
    }
    /// Block calls without an attach that name volumes not cached here each start a load
    /// in a task of its own, which goes on after its caller gives up: at most
    /// `max_background_loads` of them run at once (a caller with a made-up credential,
    /// giving up on each call, started any number of PSS reads); a call waiting for a
    /// slot starts nothing once dropped, and slots free as loads end.
    #[tokio::test]
    async fn block_calls_start_at_most_max_background_loads() {
        use crate::config::Config;
        let cfg = Config { max_background_loads: 2, ..Config::default() };
        let (store, node, _, _) = node_over_slow_reads(cfg).await;
        store.hold_volume_reads.store(true, Ordering::SeqCst);
        let who = Presented::new(wayside_proto::types::Credential::new("made-up").unwrap());
        for i in 0..6 {
            let v = VolumeName::new(format!("x{i}")).unwrap();
            let mut call = Box::pin(node.ensure(&v, &who));
            assert!(futures::poll!(&mut call).is_pending(), "call {i}");
            drop(call);
        }
        while store.volume_reads_waiting.load(Ordering::SeqCst) < 2 {
            store.volume_read_entered.notified().await;
        }
        for _ in 0..200 {
            tokio::task::yield_now().await;
        }
        assert_eq!(store.volume_reads_waiting.load(Ordering::SeqCst), 2, "loads at the PSS");
        store.hold_volume_reads.store(false, Ordering::SeqCst);
        store.volume_gate.add_permits(1 << 20);
        let x9 = VolumeName::new("x9").unwrap();
        let r = tokio::time::timeout(std::time::Duration::from_secs(10), node.ensure(&x9, &who));
        let r = r.await;
        assert!(r.expect("a later call got a slot").is_err(), "no such volume");
        node.stop.cancel();
    }

    /// Serves one `StreamBatches` call of `ops` (tagged by index) on `node` for volume "v"
    /// with credential "k"; the replies' results in order.
    async fn one_batch(
        node: &Node,
        ops: Vec<pb::stream_request::Op>,
    ) -> Vec<pb::stream_reply::Result> {
        let ops: Vec<pb::StreamRequest> = ops
            .into_iter()
            .enumerate()
            .map(|(i, op)| pb::StreamRequest { auth: None, tag: i as u64, op: Some(op) })
            .collect();
        let n = ops.len();
        let auth =
            pb::VolumeAuth { volume: "v".into(), credential: "k".into(), ..Default::default() };
        let batch = pb::StreamBatch { auth: Some(auth), ops };
        let mut replies = node.serve_ops(batch_inbound(futures::stream::iter([Ok(batch)]), 1000));
        let mut out: Vec<Option<pb::stream_reply::Result>> = vec![None; n];
        while let Some(r) = replies.next().await {
            for reply in r.unwrap() {
                out[reply.tag as usize] = reply.result;
            }
        }
        out.into_iter().map(|r| r.expect("every operation answered")).collect()
    }

    fn write_op(block: BlockNo, offset: u32, data: &[u8], seq: u64) -> pb::stream_request::Op {
        pb::stream_request::Op::Write(pb::WriteOp {
            block,
            offset,
            data: data.to_vec().into(),
            request_id: Some(pb::RequestId { client_id: "t".into(), seq }),
        })
    }

    fn read_op(block: BlockNo) -> pb::stream_request::Op {
        pb::stream_request::Op::Read(pb::ReadOp { block, offset: 0, length: 0 })
    }

    /// Within one stream, a write that fails stops the later writes of its block pending
    /// behind it (through a read between them too), whether the operations run one by one
    /// or as a batch whose reads miss: sent again with the same request ids, the batch then
    /// applies in order and the block ends as its last write left it. (Without it, the
    /// first partial write failed reading its block from the PSS, the full write after it
    /// was applied, and the resent partial write landed over it: older data over an
    /// acknowledged newer write.)
    #[tokio::test]
    async fn a_failed_write_stops_the_later_writes_of_its_block_in_the_stream() {
        use crate::config::Config;
        use pb::stream_reply::Result as R;
        for cold_batch in [false, true] {
            let (store, node, v, cred) = node_over_slow_reads(Config::default()).await;
            store.gate.add_permits(1 << 20);
            let who = Presented::new(cred.clone());
            node.load(&v, &who, None, LoadFor::Call).await.unwrap();
            store.fail_blocks.lock().unwrap().push(5);
            let full = vec![b'n'; 4096];
            let mut ops = Vec::new();
            if cold_batch {
                // Reads that miss first: the batch runs as one unit after one PSS call.
                ops.extend([read_op(1), read_op(2)]);
            }
            let first = ops.len();
            ops.extend([
                write_op(5, 10, b"old", 1),
                write_op(5, 0, &full, 2),
                read_op(5),
                write_op(5, 0, b"x", 3),
                write_op(6, 0, b"other", 4),
            ]);
            let got = one_batch(&node, ops.clone()).await;
            let error = |r: &R| match r {
                R::Error(e) => e.clone(),
                r => panic!("cold batch {cold_batch}: {r:?} is no error"),
            };
            let e = error(&got[first]);
            assert_eq!(e.code, tonic::Code::Unavailable as i32, "{e:?}");
            for later in [first + 1, first + 3] {
                let e2 = error(&got[later]);
                assert_eq!(e2.code, e.code, "the first failure's code: {e2:?}");
                assert!(e2.message.contains("earlier write or delete of block 5"), "{e2:?}");
            }
            assert!(matches!(got[first + 4], R::Write(_)), "another block is written: {got:?}");
            let vol = node.core().volume(&v).unwrap().accepted;
            assert_eq!(vol, Lsn(1), "only the other block's write was applied");
            // Sent again, once the PSS answers.
            store.fail_blocks.lock().unwrap().clear();
            let again = one_batch(&node, ops).await;
            assert!(again.iter().all(|r| !matches!(r, R::Error(_))), "{again:?}");
            let (data, _, _) = node.read(&v, &who, 5, 0, None).await.unwrap();
            let mut want = full.clone();
            want[0] = b'x';
            assert!(
                data.unwrap()[..] == want[..],
                "cold batch {cold_batch}: block 5 is not its last write"
            );
            // A write refused for what it is (past the block's end) can never apply: the
            // later write of its block is not held to it.
            let bad =
                one_batch(&node, vec![write_op(7, 4095, b"ab", 10), write_op(7, 0, b"ok", 11)])
                    .await;
            let e = error(&bad[0]);
            assert!(
                [tonic::Code::InvalidArgument as i32, tonic::Code::OutOfRange as i32]
                    .contains(&e.code),
                "{e:?}"
            );
            assert!(matches!(bad[1], R::Write(_)), "{bad:?}");
            node.stop.cancel();
        }
    }

    /// A copy that became a redirect marker between an operation's two looks at it (its
    /// `ensure`, then the check under the lock it runs under: a move's switch in between)
    /// sends the vehicle on to where the volume went, as the marker itself would. Answered
    /// "replaced" (NOT_OWNER, no address), the vehicle attached here again and this node
    /// took the volume back from the move's target. A stat's figures are checked the same
    /// way: a marker's are no volume's.
    #[tokio::test]
    async fn an_operation_meeting_its_copy_moved_away_is_redirected() {
        use crate::config::Config;
        let (_store, node, v, cred) = node_over_slow_reads(Config::default()).await;
        node.load(&v, &Presented::new(cred.clone()), None, LoadFor::Call).await.unwrap();
        let incarnation = node.core().volume(&v).unwrap().incarnation();
        let attached = Presented::attached(cred.clone(), node.session, incarnation);
        assert!(info_of(&node, &v, Some(&attached)).unwrap().is_some());
        node.core().mark_moved(&v, "http://127.0.0.1:9".into(), Epoch(2));
        let moved = |e: NmsError| matches!(e, NmsError::Moved { ref to, epoch } if to == "http://127.0.0.1:9" && epoch == Epoch(2));
        let e = super::super::same_copy(&node.core(), &v, &attached).unwrap_err();
        assert!(moved(e), "the write, read or flush is redirected");
        let e = info_of(&node, &v, Some(&attached)).unwrap_err();
        assert!(moved(e), "the stat is redirected");
        assert!(info_of(&node, &v, None).unwrap().is_some(), "the node's own status lists it");
        node.stop.cancel();
    }
}
