//! Moving a volume between NMSs (DESIGN.md section 4).
//!
//! Source ([`Node::migrate_out`]): Begin, pre-copy rounds (hottest blocks first, the vehicle
//! still served; blocks written meanwhile are sent again). When the changes are small the
//! source holds the volume's write-back and, once no batch is in flight, sends Claim: the
//! target raises the epoch in the PSS while one more round goes out. Then the switch: pause
//! the volume (requests wait), send the remainder and SwitchOver, and on Switched answer
//! callers with Moved. A failure before Switched after a Claim is undone by taking the
//! volume back (acquiring from the target's epoch; the source sent no vehicle there, and
//! if the target served one that reached it on its own, the target's write-back is then
//! fenced and that vehicle's journal replays here). Without a Claim, any failure before
//! SwitchOver aborts and the source keeps serving, and a failure after SwitchOver is
//! ambiguous (the target may have raised the epoch): the source settles it in the PSS by
//! trying to re-acquire from its own epoch: success means it still owns the volume
//! (abort); StaleEpoch means the target owns it (moved). Once SwitchOver may have gone
//! out the target may hold (and serve) everything up to the pause, so the source takes no
//! write until the PSS has told it who owns the volume: if the PSS does not answer in
//! time the volume stays paused (reads go on) and [`Node::resolve_in_background`] asks
//! again. A re-acquire of the source's own whose answer was lost is recognized in the PSS
//! record (this node as the owner) and kept.
//!
//! Target ([`pb::migration_server::Migration`] on [`Node`]): Begin creates the volume in
//! state Incoming; blocks are stored; Claim (or else SwitchOver) raises the epoch in the
//! PSS from the source's (`expected_epoch`); SwitchOver activates the volume. A frame out
//! of order is INVALID_ARGUMENT and the incoming volume is dropped.

use super::{Handle, Node, WritebackHold};
use crate::cache::{
    check_switch_lsns, hottest_first, Applied, Cache, IncomingError, MigBlock, Predecessor,
    Retired, VolumeState, MAX_ANCESTORS,
};
use crate::error::NmsError;
use crate::store::StoreError;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, info_span, warn, Instrument as _};
use wayside_proto::convert;
use wayside_proto::error::fault_status;
use wayside_proto::pb;
use wayside_proto::pb::migration_ack::Ack;
use wayside_proto::pb::migration_frame::Frame;
use wayside_proto::types::{Endpoint, Epoch, Fault, Lsn, RequestId, VolumeName};

/// Request ids a target remembers per hold of its cache lock (~0.1 ms of work).
const IDS_PER_LOCK: usize = 1024;
/// The most one request id takes in a `RequestIds` frame, in bytes: a run per id (ids of
/// alternating clients) with a 64-byte client id and three 10-byte varints is ~105. Frames
/// of ids are cut at `migration_frame_bytes / ID_BYTES` ids (8192 at the default 1 MiB;
/// one client's ids cost ~8 bytes each, so such a frame is ~64 KiB).
const ID_BYTES: u64 = 128;

/// What one block costs a `Blocks` frame besides its data (its number, version, lsn, heat
/// and flags, encoded), in bytes: frames are cut by data and this, so a round of blocks
/// without data (absent, deleted, forgotten) still comes in frames of at most
/// `migration_frame_bytes`, and a target refuses a frame of more blocks than its message
/// limit could hold so.
const BLOCK_FRAMING_BYTES: u64 = 32;

fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Frees a moved volume's old blocks off the async workers (the vehicle is already
/// redirected; this is just memory going back).
fn release(old: Option<Retired>) {
    if let Some(old) = old {
        tokio::task::spawn_blocking(move || drop(old));
    }
}

/// What a move has done towards the switch, kept by its caller so a move that fails after
/// claiming can be undone with the write-back still held.
#[derive(Default)]
struct SwitchState {
    /// The volume's write-back, held from the switch decision on.
    hold: Option<WritebackHold>,
    /// The target's node id (its Ready), as the PSS records an owner.
    target_node: String,
    /// When Claim was sent: from then the target may have raised the epoch. Until the
    /// source hears Switched it has sent no vehicle to the target, so a move that ends
    /// otherwise takes the volume back (whatever the target did: its write-back is then
    /// fenced, and a vehicle it served meanwhile replays its journal here).
    claim_sent_at: Option<Instant>,
    /// The epoch the target raised the volume to (its Claimed).
    claimed: Option<Epoch>,
    /// SwitchOver went (or may have gone) out: the target may be serving the volume with
    /// everything up to the pause, so until the PSS says who owns it this NMS must take no
    /// write (one it took would be missing at the target, and the vehicle's journal, whose
    /// older entries the target has, would not send it there again).
    switch_sent: bool,
    /// Who owns the volume is not known (the PSS did not answer in time): it stays paused
    /// here until [`Node::resolve_in_background`] finds out.
    unresolved: bool,
}

impl SwitchState {
    fn claim_sent(&self) -> bool {
        self.claim_sent_at.is_some()
    }

    /// Takes the target's Claimed in: its epoch, and how long the raise took.
    fn claimed(&mut self, c: pb::Claimed, report: &mut pb::MigrationReport) {
        self.claimed = Some(Epoch(c.new_epoch));
        report.claim_us = self.claim_sent_at.map_or(0, |t| us(t.elapsed()));
        tracing::debug!(claim_us = report.claim_us, "the target raised the epoch");
    }
}

/// What one try at settling an interrupted switch found.
enum Settled {
    /// The volume is still this NMS's, at this epoch now.
    Kept(Epoch),
    /// Another NMS owns it (at this epoch): it is a redirect here now.
    Moved(Epoch),
    /// The PSS did not answer.
    Unknown(String),
}

/// When pre-copy stops and the switch begins (the vehicle waits while the switch sends
/// what changed in the last round), like QEMU's downtime limit.
#[derive(Debug, Clone, Copy)]
struct SwitchRule {
    /// Rounds at most: the switch follows the last one whatever is left.
    max_rounds: u32,
    /// The changed data must be at most this many bytes...
    below_bytes: u64,
    /// ...and, at the fastest rate a round reached, take at most this many microseconds
    /// to send (0: no time condition).
    transfer_us: u64,
}

impl SwitchRule {
    /// After `round` sent `sent` bytes: `changed` bytes changed meanwhile; `rate` is the
    /// fastest rate of the rounds so far, in bytes per second.
    fn switch_now(&self, round: u32, changed: u64, sent: u64, rate: f64) -> bool {
        if round >= self.max_rounds {
            return true;
        }
        if changed > self.below_bytes {
            return false;
        }
        if self.transfer_us == 0 || rate <= 0.0 {
            return true;
        }
        let transfer_us = changed as f64 / rate * 1e6;
        // Another round helps only if the changes shrink: a vehicle writing as fast as
        // the link carries keeps them as large as the round that sent them.
        transfer_us <= self.transfer_us as f64 || changed >= sent
    }
}

/// Request ids, oldest first, as runs of one client's consecutive ids (a client id travels
/// once per run, not once per id).
fn applied_to_pb(applied: &[(RequestId, Applied)]) -> Vec<pb::AppliedRun> {
    let mut runs: Vec<pb::AppliedRun> = Vec::new();
    for (id, a) in applied {
        let run = match runs.last_mut() {
            Some(r) if r.client_id == id.client_id() => r,
            _ => {
                runs.push(pb::AppliedRun {
                    client_id: id.client_id().to_owned(),
                    ..Default::default()
                });
                runs.last_mut().expect("just pushed")
            }
        };
        run.seq.push(id.seq());
        run.lsn.push(a.lsn.0);
        run.version.push(a.version);
    }
    runs
}

/// The inverse of [`applied_to_pb`]; a run with lists of different lengths, no ids, or an
/// invalid id is INVALID_ARGUMENT. One allocation per run for its client id.
fn applied_from_pb(runs: Vec<pb::AppliedRun>) -> Result<Vec<(RequestId, Applied)>, Status> {
    let bad = |why: String| Status::invalid_argument(format!("applied request ids: {why}"));
    let mut out = Vec::with_capacity(runs.iter().map(|r| r.seq.len()).sum());
    for r in runs {
        let n = r.seq.len();
        if n == 0 || r.lsn.len() != n || r.version.len() != n {
            return Err(bad(format!(
                "a run of client {:?} has {} seqs, {} lsns and {} versions (one length, at least 1)",
                r.client_id,
                n,
                r.lsn.len(),
                r.version.len()
            )));
        }
        let first = RequestId::new(r.client_id, r.seq[0]).map_err(|e| bad(e.to_string()))?;
        for ((seq, lsn), version) in r.seq.into_iter().zip(r.lsn).zip(r.version) {
            let id = first.with_seq(seq).map_err(|e| bad(e.to_string()))?;
            out.push((id, Applied { lsn: Lsn(lsn), version }));
        }
    }
    Ok(out)
}

/// The source's next frame, if it comes before `deadline` (`migration_timeout_ms`).
async fn next_frame(
    inbound: &mut Streaming<pb::MigrationFrame>,
    deadline: Instant,
) -> Result<Option<pb::MigrationFrame>, Status> {
    tokio::time::timeout_at(deadline.into(), inbound.message()).await.map_err(|_| {
        Status::deadline_exceeded("migration_timeout_ms passed waiting for the source")
    })?
}

fn to_pb(b: MigBlock) -> pb::MigratedBlock {
    pb::MigratedBlock {
        block: b.block,
        deleted: b.data.is_none() && !b.forget,
        data: b.data.unwrap_or_default(),
        version: b.version,
        dirty: b.dirty,
        lsn: b.lsn.0,
        heat: b.heat,
        forget: b.forget,
    }
}

/// What a round has queued for the target so far.
#[derive(Debug, Default, Clone, Copy)]
struct Queued {
    blocks: u64,
    bytes: u64,
}

impl Queued {
    fn add(&mut self, blocks: u64, bytes: u64) {
        self.blocks += blocks;
        self.bytes += bytes;
    }

    /// The round's line in the report: `unfinished` when the move ended in it.
    fn report(self, round: u32, took: Duration, unfinished: bool) -> pb::RoundReport {
        pb::RoundReport {
            round,
            blocks: self.blocks,
            bytes: self.bytes,
            duration_us: us(took),
            unfinished,
        }
    }
}

/// The source's side of one transfer stream.
struct Link {
    tx: mpsc::Sender<pb::MigrationFrame>,
    acks: Streaming<pb::MigrationAck>,
    /// Every wait on the target ends by this...
    deadline: Instant,
    /// ...the limit it comes from (for the abort's reason).
    limit: &'static str,
}

impl Link {
    /// Queues a frame. A target or link that stopped taking data fills the queue once
    /// HTTP/2 flow control holds the stream: the wait for room ends at the deadline too.
    async fn send(&self, f: Frame) -> Result<(), String> {
        let sent = self.tx.send(pb::MigrationFrame { frame: Some(f) });
        match tokio::time::timeout_at(self.deadline.into(), sent).await {
            Err(_) => Err(format!("{} passed with the link taking no data", self.limit)),
            Ok(r) => r.map_err(|_| "the migration stream closed".to_string()),
        }
    }
    /// From now on every wait ends within `limit_ms` (named `limit`), or sooner.
    fn tighten(&mut self, limit: &'static str, limit_ms: u64) {
        let d = Instant::now() + Duration::from_millis(limit_ms);
        if d < self.deadline {
            (self.deadline, self.limit) = (d, limit);
        }
    }
    async fn ack(&mut self) -> Result<Ack, String> {
        let next = tokio::time::timeout_at(self.deadline.into(), self.acks.message());
        match next.await {
            Err(_) => Err(format!("{} passed waiting for the target", self.limit)),
            Ok(Err(s)) => Err(format!("target: {}: {}", s.code(), s.message())),
            Ok(Ok(None)) => Err("target closed the stream".into()),
            Ok(Ok(Some(a))) => a.ack.ok_or_else(|| "empty ack".into()),
        }
    }
    /// Sends the request ids remembered since the previous round (first, so the target
    /// takes them in while the blocks stream; at most `frame_bytes / ID_BYTES` per frame),
    /// the blocks (hottest first) in frames of at most `frame_bytes`, then RoundEnd.
    /// `queued` counts the blocks and bytes queued so far (what an abort reports).
    async fn round(
        &self,
        round: u32,
        mut blocks: Vec<MigBlock>,
        applied: Vec<(RequestId, Applied)>,
        frame_bytes: u64,
        queued: &mut Queued,
    ) -> Result<(), String> {
        let ids_per_frame = usize::try_from(frame_bytes / ID_BYTES).unwrap_or(usize::MAX).max(1);
        for ids in applied.chunks(ids_per_frame) {
            let runs = applied_to_pb(ids);
            self.send(Frame::RequestIds(pb::RequestIds { round, runs })).await?;
        }
        hottest_first(&mut blocks);
        let mut frame = Vec::new();
        // Data bytes (reported), and what the frame costs with each block's framing (what
        // cuts frames: blocks without data, absent, deleted or forgotten, cost only that).
        let (mut fb, mut cost) = (0u64, 0u64);
        for b in blocks {
            let len = b.bytes();
            if !frame.is_empty() && cost + len + BLOCK_FRAMING_BYTES > frame_bytes {
                let n = frame.len() as u64;
                self.send(Frame::Blocks(pb::MigrationBlocks {
                    round,
                    blocks: std::mem::take(&mut frame),
                }))
                .await?;
                queued.add(n, fb);
                (fb, cost) = (0, 0);
            }
            fb += len;
            cost += len + BLOCK_FRAMING_BYTES;
            frame.push(to_pb(b));
        }
        if !frame.is_empty() {
            let n = frame.len() as u64;
            self.send(Frame::Blocks(pb::MigrationBlocks { round, blocks: frame })).await?;
            queued.add(n, fb);
        }
        let (blocks, bytes) = (queued.blocks, queued.bytes);
        self.send(Frame::RoundEnd(pb::RoundEnd { round, blocks, bytes })).await
    }
}

impl Node {
    /// Moves `v` to the NMS at `target` and reports the timeline. Errors only for a
    /// request that cannot start (unknown volume, one already moving); a move that fails
    /// midway returns an ABORTED report and the volume stays served here.
    pub(crate) async fn migrate_out(
        &self,
        v: VolumeName,
        target: Endpoint,
        max_rounds: u32,
        switch_below: u64,
    ) -> Result<pb::MigrationReport, NmsError> {
        let started = Instant::now();
        let started_unix_ms = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(0));
        let (bs, epoch, cred, cached, incarnation) = {
            let core = self.core();
            let x = core.volume(&v).ok_or_else(|| NmsError::NotFound(v.to_string()))?;
            match &x.state {
                VolumeState::Active => {}
                VolumeState::Moved { to, epoch } => {
                    return Err(NmsError::Moved { to: to.clone(), epoch: *epoch })
                }
                s => return Err(NmsError::Precondition(format!("volume is {s:?}"))),
            }
            (x.block_size, x.epoch, x.credential, x.cached_bytes(), x.incarnation())
        };
        if target == self.advertise {
            return Err(NmsError::Invalid("target_address is this NMS".into()));
        }
        let h = self.handle(&v).ok_or_else(|| NmsError::NotFound(v.to_string()))?;
        if h.migrating.swap(true, Ordering::AcqRel) {
            return Err(NmsError::Precondition("a migration of this volume is under way".into()));
        }
        let mut report = pb::MigrationReport {
            volume: v.as_str().to_owned(),
            source_node: self.node_id.clone(),
            target_address: target.uri().to_owned(),
            started_unix_ms,
            ..Default::default()
        };
        let mut sw = SwitchState::default();
        let mut result = self
            .run_move(
                &v,
                &target,
                bs.bytes(),
                epoch,
                cred.0.to_vec(),
                cached,
                max_rounds,
                switch_below,
                &mut report,
                &mut sw,
            )
            .await;
        if let Err(why) = &result {
            if sw.claim_sent() {
                // The write-back is still held: nothing is written back with the epoch the
                // target may have raised past until the volume is taken back. Before
                // SwitchOver the target served nobody, so the volume is served on here
                // meanwhile; after it, it stays paused until the take-back succeeds.
                if !sw.switch_sent {
                    self.resume(&v);
                }
                match self.take_back(&v, epoch, incarnation, &sw).await {
                    Ok(()) => self.resume(&v),
                    Err(e) => {
                        result = Err(format!("{why}; {e}"));
                        // Not another NMS's (a redirect now) nor known to be this one's:
                        // the write-back stays held (the target may have raised the epoch:
                        // a write-back now would be fenced and turn the volume into a
                        // redirect to a target that never served it) until a take-back
                        // lands.
                        sw.unresolved = !self.owner_known(&v, incarnation);
                    }
                }
            }
        }
        if sw.unresolved {
            if let Err(why) = &mut result {
                why.push_str(if sw.switch_sent {
                    "; who owns the volume is unknown: it stays paused here (reads go on, \
                     writes wait) until the PSS answers"
                } else {
                    "; who owns the volume is unknown: it is served here, its write-back \
                     held, until the PSS answers"
                });
            }
            self.self_arc().resolve_in_background(
                v.clone(),
                epoch,
                incarnation,
                target.clone(),
                std::mem::take(&mut sw),
                h.clone(),
            );
        } else {
            drop(sw.hold.take());
            self.core().stop_tracking(&v);
            h.migrating.store(false, Ordering::Release);
        }
        match result {
            Ok(()) => report.outcome = pb::MigrationOutcome::Completed as i32,
            Err(why) => {
                warn!(reason = %why, "migration aborted; still serving here");
                report.outcome = pb::MigrationOutcome::Aborted as i32;
                report.error = why;
            }
        }
        report.total_us = us(started.elapsed());
        info!(
            outcome = report.outcome,
            total_us = report.total_us,
            pause_us = report.pause_us,
            setup_us = report.setup_us,
            writeback_drain_us = report.writeback_drain_us,
            claim_us = report.claim_us,
            bytes = report.bytes_moved,
            rounds = report.rounds.len(),
            "migration finished"
        );
        self.bump();
        Ok(report)
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_move(
        &self,
        v: &VolumeName,
        target: &Endpoint,
        block_size: u32,
        epoch: Epoch,
        cred: Vec<u8>,
        cached: u64,
        max_rounds: u32,
        switch_below: u64,
        report: &mut pb::MigrationReport,
        sw: &mut SwitchState,
    ) -> Result<(), String> {
        let started = Instant::now();
        let deadline = started + Duration::from_millis(self.cfg.migration_timeout_ms);
        let max = self.cfg.max_message_size_bytes;
        // Over TLS when this node is set up for it, whatever scheme the target's address
        // came with (an operator's `--to host:port` is dialled over TLS too).
        let endpoint = wayside_proto::client::endpoint(target, self.tls.as_ref())
            .map_err(|e| format!("the target's address: {e}"))?;
        let channel = tokio::time::timeout_at(
            deadline.into(),
            endpoint
                .tcp_nodelay(true)
                .initial_connection_window_size(
                    wayside_proto::server::HTTP2_CONNECTION_WINDOW_BYTES,
                )
                .initial_stream_window_size(wayside_proto::server::HTTP2_STREAM_WINDOW_BYTES)
                .max_frame_size(wayside_proto::server::HTTP2_MAX_FRAME_BYTES)
                .connect_timeout(Duration::from_secs(2))
                .connect(),
        )
        .await
        .map_err(|_| "connecting to the target timed out".to_string())?
        .map_err(|e| {
            format!("connecting to the target: {}", crate::client::connect_failure(&e).text)
        })?;
        let mut client = pb::migration_client::MigrationClient::new(channel)
            .max_decoding_message_size(max)
            .max_encoding_message_size(max);
        let (tx, rx) = mpsc::channel(4);
        let migration_id = rand::random::<u64>();
        let (incarnation, lineage) =
            self.core().volume(v).map_or((0, Vec::new()), |x| (x.incarnation(), x.lineage()));
        tx.send(pb::MigrationFrame {
            frame: Some(Frame::Begin(pb::MigrationBegin {
                migration_id,
                volume: v.as_str().to_owned(),
                block_size,
                source_epoch: epoch.0,
                source_node: self.node_id.clone(),
                source_address: self.advertise.uri().to_owned(),
                credential_hash: cred,
                cached_bytes: cached,
                source_session: self.session,
                source_incarnation: incarnation,
                source_lineage: lineage.iter().map(super::copy_ref).collect(),
            })),
        })
        .await
        .map_err(|_| "stream closed".to_string())?;
        let acks = tokio::time::timeout_at(
            deadline.into(),
            client.transfer(wayside_proto::token::request(
                self.cfg.cluster_token.as_ref(),
                ReceiverStream::new(rx),
            )),
        )
        .await
        .map_err(|_| "opening the transfer timed out".to_string())?
        .map_err(|s| format!("target refused: {}: {}", s.code(), s.message()))?
        .into_inner();
        let mut link = Link { tx, acks, deadline, limit: "migration_timeout_ms" };
        match link.ack().await? {
            Ack::Ready(r) => sw.target_node = r.target_node,
            other => return Err(format!("expected Ready, got {other:?}")),
        }
        report.setup_us = us(started.elapsed());
        let frame_bytes = self.cfg.migration_frame_bytes;
        // Pre-copy: round 1 sends everything cached, later rounds what changed since.
        let mut round = 1u32;
        // Blocks and the request ids that wrote them are taken under one lock, so a round
        // never carries a block without the id (the switch carries what came after).
        let (mut blocks, mut applied, mut mark) = {
            let mut core = self.core();
            let held = Instant::now();
            let blocks = core.snapshot_all(v);
            let (applied, mark) = core.volume(v).map(|x| x.applied_since(0)).unwrap_or_default();
            drop(core);
            tracing::debug!(
                blocks = blocks.len(),
                request_ids = applied.len(),
                held_us = us(held.elapsed()),
                "round 1 snapshot taken (cache lock held)"
            );
            (blocks, applied, mark)
        };
        let rule = SwitchRule {
            max_rounds,
            below_bytes: switch_below,
            transfer_us: self.cfg.migration_switch_transfer_us,
        };
        // The fastest a round carried data to the target, in bytes per second.
        let mut rate = 0f64;
        loop {
            let t = Instant::now();
            let mut q = Queued::default();
            let mut queued_us = 0;
            let acked = async {
                link.round(round, blocks, applied, frame_bytes, &mut q).await?;
                queued_us = us(t.elapsed());
                loop {
                    match link.ack().await? {
                        Ack::Round(_) => return Ok(()),
                        // The Claim sent before this round is answered before it.
                        Ack::Claimed(c) if sw.claim_sent() && sw.claimed.is_none() => {
                            sw.claimed(c, report)
                        }
                        other => return Err(format!("expected RoundAck, got {other:?}")),
                    }
                }
            }
            .await;
            let took = t.elapsed();
            if let Err(e) = acked {
                report.rounds.push(q.report(round, took, true));
                return Err(e);
            }
            let (n, bytes) = (q.blocks, q.bytes);
            tracing::debug!(round, bytes, queued_us, acked_us = us(took), "round acknowledged");
            rate = rate.max(bytes as f64 / took.as_secs_f64().max(1e-6));
            report.rounds.push(q.report(round, took, false));
            report.bytes_moved += bytes;
            report.blocks_moved += n;
            if self.stop.is_cancelled() {
                return Err("node shutting down".into());
            }
            // Past the changed-block limit the set misses blocks (and its bytes undercount
            // what changed): the move cannot go on, and is given up before a Claim or pause.
            if let Some(e) = self.core().changed_overflow(v) {
                return Err(e);
            }
            let changed = self.core().changed_bytes(v);
            let mut switch = rule.switch_now(round, changed, bytes, rate);
            if sw.claim_sent() {
                // The round sent with the Claim is done: switch whatever it left (the
                // write-back is held and the epoch is the target's from now on; more rounds
                // would only hold the vehicle's write-back, and its flushes, longer).
                switch = true;
            }
            if switch && sw.hold.is_none() {
                // Before pausing: no new write-back, and once the batch in flight has
                // committed the target raises the epoch (Claim), so the pause waits for
                // no PSS commit (one took 2-35 ms there, behind what else the PSS was
                // committing). What the vehicle wrote meanwhile may call for another round.
                let drain = Duration::from_millis(self.cfg.migration_writeback_drain_ms);
                let mut idle = false;
                if let Some((h, waited, i)) = self.hold_writeback(v, drain).await {
                    report.writeback_drain_us = us(waited);
                    sw.hold = Some(h);
                    idle = i;
                }
                tracing::debug!(
                    round,
                    idle,
                    waited_us = report.writeback_drain_us,
                    "write-back held"
                );
                // A target from before Claim names no node in Ready (and would refuse the
                // frame): it raises the epoch at SwitchOver.
                if idle && !sw.target_node.is_empty() {
                    sw.claim_sent_at = Some(Instant::now());
                    link.send(Frame::Claim(pb::Claim { expected_epoch: epoch.0 })).await?;
                    if round < max_rounds {
                        // One more round, sent while the target raises the epoch (its
                        // Claimed comes before the round's ack), for what the vehicle
                        // writes meanwhile; then the rule is asked again.
                        switch = false;
                    } else {
                        match link.ack().await? {
                            Ack::Claimed(c) => sw.claimed(c, report),
                            other => return Err(format!("expected Claimed, got {other:?}")),
                        }
                    }
                } else {
                    let changed = self.core().changed_bytes(v);
                    switch = rule.switch_now(round, changed, bytes, rate);
                    if !switch {
                        // Another round (the vehicle wrote on while a batch in flight was
                        // waited for): the write-back goes on meanwhile, and is held
                        // again at the next switch decision.
                        drop(sw.hold.take());
                    }
                }
            }
            if switch {
                tracing::debug!(round, changed, rate, "switching");
                break;
            }
            round += 1;
            let mut core = self.core();
            blocks = core.snapshot_changed(v)?;
            (applied, mark) = core.volume(v).map(|x| x.applied_since(mark)).unwrap_or_default();
        }
        // Switch: pause, send the remainder, hand over.
        let pause = Instant::now();
        link.tighten("migration_switch_timeout_ms", self.cfg.migration_switch_timeout_ms);
        tracing::debug!(volume = %v, "switch: pausing");
        let (rest, switch) = {
            let mut core = self.core();
            core.pause(v).map_err(|s| format!("not switching: the volume is {s:?} here"))?;
            let rest = match core.snapshot_changed(v) {
                Ok(rest) => rest,
                Err(e) => {
                    // Before anything went to the target: served here again at once (a
                    // move without a Claim is not resumed by its caller).
                    core.set_state(v, VolumeState::Active);
                    drop(core);
                    self.bump();
                    return Err(e);
                }
            };
            let x = core.volume(v).ok_or("volume vanished")?;
            let applied = applied_to_pb(&x.applied_since(mark).0);
            (
                rest,
                pb::SwitchOver {
                    accepted_lsn: x.accepted.0,
                    persisted_lsn: x.persisted.0,
                    applied,
                    expected_epoch: epoch.0,
                },
            )
        };
        self.bump();
        let t = Instant::now();
        let mut q = Queued::default();
        let sent = link.round(round + 1, rest, Vec::new(), frame_bytes, &mut q).await;
        report.rounds.push(q.report(round + 1, t.elapsed(), sent.is_err()));
        if let Err(e) = sent {
            self.resume(v);
            return Err(e);
        }
        report.bytes_moved += q.bytes;
        report.blocks_moved += q.blocks;
        tracing::debug!(volume = %v, "switch: remainder queued");
        if let Err(e) = link.send(Frame::SwitchOver(switch)).await {
            // Never queued (the stream closed, or no room came within the switch's
            // limit): the target cannot have it, so nothing needs settling.
            self.resume(v);
            return Err(e);
        }
        sw.switch_sent = true;
        loop {
            match link.ack().await {
                Ok(Ack::Round(_)) => continue,
                Ok(Ack::Switched(s)) => {
                    let answered = pause.elapsed();
                    let to = if s.target_address.is_empty() {
                        target.uri().to_owned()
                    } else {
                        s.target_address
                    };
                    let old = self.moved(v, to, Epoch(s.new_epoch));
                    report.new_epoch = s.new_epoch;
                    report.pause_us = us(pause.elapsed());
                    tracing::debug!(
                        answered_us = us(answered),
                        pause_us = report.pause_us,
                        "switch: the target answered; the volume now redirects"
                    );
                    release(old);
                    return Ok(());
                }
                Ok(Ack::Aborted(a)) => {
                    // The target did not switch and dropped its copy: it serves nobody.
                    sw.switch_sent = false;
                    self.resume(v);
                    return Err(format!("target aborted: {}", a.reason));
                }
                Ok(other) => {
                    let e = format!("unexpected ack {other:?}");
                    return self.settle(v, epoch, target, pause, report, e, sw).await;
                }
                Err(e) => return self.settle(v, epoch, target, pause, report, e, sw).await,
            }
        }
    }

    fn resume(&self, v: &VolumeName) {
        let mut core = self.core();
        if core.volume(v).is_some_and(|x| x.state == VolumeState::Paused) {
            core.set_state(v, VolumeState::Active);
        }
        drop(core);
        self.bump();
    }

    /// Turns the volume into a redirect; returns its old blocks for [`release`] once the
    /// vehicle's waiting requests have been let go.
    fn moved(&self, v: &VolumeName, to: String, epoch: Epoch) -> Option<Retired> {
        info!(volume = %v, to = %to, epoch = epoch.0, "volume moved");
        let old = self.core().mark_moved(v, to, epoch);
        self.stop_writer(v);
        self.bump();
        old
    }

    /// SwitchOver went (or may have gone) out but no Switched came back. After a Claim the
    /// caller takes the volume back (see [`SwitchState::claim_sent_at`]); the volume stays
    /// paused meanwhile. Otherwise the outcome is unknown: re-acquire from our epoch. If
    /// that succeeds we still own the volume (the target's acquire will fail) and serve
    /// again; if it is stale the target won. If the PSS does not answer within
    /// `pss_deadline_ms` the volume stays paused ([`SwitchState::unresolved`]).
    #[allow(clippy::too_many_arguments)]
    async fn settle(
        &self,
        v: &VolumeName,
        epoch: Epoch,
        target: &Endpoint,
        pause: Instant,
        report: &mut pb::MigrationReport,
        why: String,
        sw: &mut SwitchState,
    ) -> Result<(), String> {
        if sw.claim_sent() {
            return Err(why);
        }
        let incarnation = self.core().volume(v).map_or(0, |x| x.incarnation());
        let deadline = Instant::now() + Duration::from_millis(self.cfg.pss_deadline_ms);
        loop {
            match self.settle_step(v, epoch, incarnation, target).await {
                Settled::Kept(e) => {
                    self.resume(v);
                    return Err(format!("{why}; kept the volume (epoch {})", e.0));
                }
                Settled::Moved(current) => {
                    report.new_epoch = current.0;
                    report.pause_us = us(pause.elapsed());
                    return Ok(());
                }
                Settled::Unknown(e) if Instant::now() < deadline => {
                    warn!(error = %e, "settling an interrupted switch; retrying");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Settled::Unknown(e) => {
                    sw.unresolved = true;
                    return Err(format!("{why}; PSS unreachable while settling: {e}"));
                }
            }
        }
    }

    /// One try at settling an interrupted switch without Claim (see [`Node::settle`]).
    async fn settle_step(
        &self,
        v: &VolumeName,
        epoch: Epoch,
        incarnation: u32,
        target: &Endpoint,
    ) -> Settled {
        match self.store.acquire(self.acquire_request(v, Some(epoch), None)).await {
            Ok(meta) => {
                self.adopt_epoch(v, incarnation, meta.epoch);
                Settled::Kept(meta.epoch)
            }
            Err(StoreError::StaleEpoch { current, .. }) => {
                let to = match self.store.get_volume(v.clone()).await {
                    // An earlier try of ours landed and its answer was lost.
                    Ok(m) if self.is_mine(&m) => {
                        self.adopt_epoch(v, incarnation, m.epoch);
                        return Settled::Kept(m.epoch);
                    }
                    Ok(m) if !m.owner_address.is_empty() => m.owner_address,
                    Ok(_) => target.uri().to_owned(),
                    Err(e) => return Settled::Unknown(e.to_string()),
                };
                let old = self.moved(v, to, current);
                release(old);
                Settled::Moved(current)
            }
            Err(e) => Settled::Unknown(e.to_string()),
        }
    }

    /// A move ended with the volume's owner unknown ([`SwitchState::unresolved`]): the
    /// volume stays paused here (reads go on; writes wait `pause_wait_ms`, then fail and
    /// the vehicle tries its other NMSs, the target among them), and this task asks the
    /// PSS again until it answers: then the volume is served here again, or turns into a
    /// redirect to its owner. Holds the move's write-back hold and the volume's
    /// `migrating` flag until then; ends with the node or when the volume is replaced.
    fn resolve_in_background(
        self: Arc<Self>,
        v: VolumeName,
        epoch: Epoch,
        incarnation: u32,
        target: Endpoint,
        mut sw: SwitchState,
        h: Arc<Handle>,
    ) {
        let span = tracing::info_span!("resolve_owner", volume = %v);
        let node = self.clone();
        self.spawn_critical(
            "a move's owner resolution panicked",
            async move {
                let mut backoff = Duration::from_millis(100);
                loop {
                    let here = node.core().volume(&v).map(|x| (x.incarnation(), x.state.clone()));
                    // Paused after SwitchOver; served (its write-back held) when the move
                    // ended before it.
                    let waiting = |s: &VolumeState| {
                        *s == VolumeState::Paused || (!sw.switch_sent && *s == VolumeState::Active)
                    };
                    if node.stop.is_cancelled()
                        || !matches!(&here, Some((i, s)) if *i == incarnation && waiting(s))
                    {
                        break;
                    }
                    let known = if sw.claim_sent() {
                        match node.take_back(&v, epoch, incarnation, &sw).await {
                            Ok(()) => Some(true),
                            Err(e) if node.owner_known(&v, incarnation) => {
                                info!(error = %e, "the volume is another NMS's");
                                Some(false)
                            }
                            Err(e) => {
                                warn!(error = %e, "who owns the volume is still unknown");
                                None
                            }
                        }
                    } else {
                        match node.settle_step(&v, epoch, incarnation, &target).await {
                            Settled::Kept(_) => Some(true),
                            Settled::Moved(_) => Some(false),
                            Settled::Unknown(e) => {
                                warn!(error = %e, "who owns the volume is still unknown");
                                None
                            }
                        }
                    };
                    match known {
                        Some(kept) => {
                            if kept {
                                info!("the volume is still this NMS's: served again");
                                node.resume(&v);
                            }
                            break;
                        }
                        None => {
                            tokio::select! {
                                _ = tokio::time::sleep(backoff) => {}
                                _ = node.stop.cancelled() => {}
                            }
                            backoff = (backoff * 2).min(Duration::from_secs(2));
                        }
                    }
                }
                drop(sw.hold.take());
                {
                    let mut core = node.core();
                    if core.volume(&v).is_some_and(|x| x.incarnation() == incarnation) {
                        core.stop_tracking(&v);
                    }
                }
                h.migrating.store(false, Ordering::Release);
                node.bump();
            }
            .instrument(span),
        );
    }

    /// After this node raised the epoch taking `v` back (from `ours`, its epoch before the
    /// move; `m`, the raise's answer): if anyone wrote back at an epoch past ours (the PSS
    /// records the last write-back's epoch) or the PSS's persisted watermark is past what
    /// this copy accepted, the target, having switched, wrote back before the raise landed,
    /// and this copy is stale. (The watermark alone cannot tell: a target's batch cut short
    /// by its limits persists a newer block while the watermark stays at the source's
    /// persisted lsn.) It is dropped; the vehicle's next call loads the volume anew from
    /// the PSS and its journal replays what this copy and the target accepted and the PSS
    /// lacks. Returns the move's error then.
    fn stale_after_raise(
        &self,
        v: &VolumeName,
        incarnation: u32,
        ours: Epoch,
        m: &crate::store::VolumeMeta,
    ) -> Option<String> {
        let accepted = self.core().volume(v).map_or(Lsn(0), |x| x.accepted);
        if m.persisted <= accepted && m.written_epoch <= ours {
            return None;
        }
        warn!(
            volume = %v,
            persisted = m.persisted.0,
            accepted = accepted.0,
            written_epoch = m.written_epoch.0,
            ours = ours.0,
            "the aborted move's target wrote back meanwhile; this copy is dropped"
        );
        self.drop_copy(v, incarnation);
        Some(format!(
            "the target wrote back meanwhile (at epoch {}, this copy's {}; persisted lsn {}, \
             this copy accepted {}); the volume will be loaded again from the PSS",
            m.written_epoch.0, ours.0, m.persisted.0, accepted.0
        ))
    }

    /// Takes incarnation `incarnation` of `v` out of the cache (its blocks, its writer): a
    /// vehicle's next call is told to attach again and loads it anew from the PSS.
    pub(crate) fn drop_copy(&self, v: &VolumeName, incarnation: u32) {
        let mut core = self.core();
        if core.volume(v).map(|x| x.incarnation()) == Some(incarnation) {
            core.remove_volume(v);
            self.stop_writer(v);
        }
        drop(core);
        self.bump();
    }

    /// Whether incarnation `incarnation` of `v` left this NMS's hands (a redirect now, or
    /// replaced): after a failed take-back, the PSS named another owner.
    fn owner_known(&self, v: &VolumeName, incarnation: u32) -> bool {
        let core = self.core();
        match core.volume(v) {
            Some(x) if x.incarnation() == incarnation => {
                matches!(x.state, VolumeState::Moved { .. })
            }
            _ => true,
        }
    }

    /// A move that sent Claim ended without Switched: the target may have raised the
    /// volume's epoch in the PSS (and, once SwitchOver went out, may serve the volume:
    /// this copy stays paused meanwhile). Acquires it back from that epoch, so this NMS's
    /// write-back is not fenced (its epoch is updated). If someone else owns the volume
    /// now, it is theirs: the volume turns into a redirect. If the target wrote back past
    /// this copy before the raise landed, this copy is stale and is dropped (the vehicle
    /// attaches again and the volume is loaded anew from the PSS).
    ///
    /// What counts as the move's own claim: the PSS has the volume owned by the target
    /// node at exactly our epoch + 1 (a claim raises `expected_epoch` by one; any later
    /// acquire, by the target or anyone, is past it), at the epoch the target's Claimed
    /// named when we heard it, with no write-back at that epoch (the PSS records the last
    /// write-back's epoch) and none persisted past what we accepted (the target writes
    /// nothing back before SwitchOver). What remains ambiguous without
    /// Claimed: the target dropped the incoming copy without acting on the Claim and then
    /// loaded the volume itself from our epoch (a vehicle attaching there directly while
    /// this NMS serves it) and has written back nothing past our accepted lsn yet. The PSS
    /// record (owner, epoch) is then the same as after the claim; we take the volume back,
    /// the target's write-back is fenced and its vehicle's journal replays to us.
    async fn take_back(
        &self,
        v: &VolumeName,
        ours: Epoch,
        incarnation: u32,
        sw: &SwitchState,
    ) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_millis(self.cfg.pss_deadline_ms);
        let mut last = String::new();
        loop {
            // The epoch to raise ours from, and what it means.
            let from = match self.store.get_volume(v.clone()).await {
                // The target's Claim has not landed (yet: its acquire may be waiting out a
                // PSS election). Raise the epoch ourselves, so a late one fails instead of
                // fencing us after we report the volume kept.
                Ok(meta) if meta.epoch == ours => Some((
                    ours,
                    "kept the volume; a late claim by the aborted move's target will fail",
                )),
                // An earlier try of ours landed and its answer was lost.
                Ok(meta) if self.is_mine(&meta) && meta.epoch > ours => {
                    if let Some(e) = self.stale_after_raise(v, incarnation, ours, &meta) {
                        return Err(e);
                    }
                    if self.adopt_epoch(v, incarnation, meta.epoch) {
                        info!(volume = %v, epoch = meta.epoch.0, "took the volume back");
                        return Ok(());
                    }
                    return Err("the volume was replaced here meanwhile".into());
                }
                Ok(meta) => {
                    let accepted = self.core().volume(v).map_or(Lsn(0), |x| x.accepted);
                    let by_target = !sw.target_node.is_empty()
                        && meta.owner_node == sw.target_node
                        && meta.epoch.0 == ours.0.saturating_add(1)
                        && meta.persisted <= accepted
                        && meta.written_epoch <= ours;
                    let claimed = by_target && sw.claimed.is_none_or(|e| meta.epoch == e);
                    if !claimed {
                        warn!(
                            volume = %v,
                            epoch = meta.epoch.0,
                            owner = %meta.owner_node,
                            "after an aborted move another NMS owns the volume"
                        );
                        self.fenced(v, meta.epoch, incarnation).await;
                        return Err(format!(
                            "{} owns the volume now (epoch {})",
                            meta.owner_node, meta.epoch.0
                        ));
                    }
                    Some((meta.epoch, "took the volume back from the aborted move's target"))
                }
                Err(e) => {
                    last = e.to_string();
                    None
                }
            };
            if let Some((from, done)) = from {
                match self.store.acquire(self.acquire_request(v, Some(from), None)).await {
                    Ok(m) => {
                        if let Some(e) = self.stale_after_raise(v, incarnation, ours, &m) {
                            return Err(e);
                        }
                        if let Some(x) = self.core().volume_mut(v) {
                            x.epoch = m.epoch;
                        }
                        info!(volume = %v, epoch = m.epoch.0, "{done}");
                        return Ok(());
                    }
                    // Someone (the target's claim) moved the epoch on meanwhile: look again.
                    Err(StoreError::StaleEpoch { .. }) => {
                        last = "the epoch moved on meanwhile".to_string()
                    }
                    Err(e) => last = e.to_string(),
                }
            }
            if Instant::now() >= deadline || self.stop.is_cancelled() {
                return Err(format!("taking the volume back from the target failed: {last}"));
            }
            warn!(error = %last, "taking the volume back from the aborted move's target; retrying");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The request ids a frame (`what`) carries, refused past `dedupe_entries_per_volume`
    /// (more than the table keeps is never sent, and would all be decoded to be dropped).
    fn applied_ids(
        &self,
        what: &str,
        runs: Vec<pb::AppliedRun>,
    ) -> Result<Vec<(RequestId, Applied)>, Status> {
        let ids: usize = runs.iter().map(|x| x.seq.len()).sum();
        if ids > self.cfg.dedupe_entries_per_volume {
            return Err(Status::invalid_argument(format!(
                "{what} of {ids} request ids: at most dedupe_entries_per_volume ({})",
                self.cfg.dedupe_entries_per_volume
            )));
        }
        applied_from_pb(runs)
    }

    /// Remembers `applied` in the incoming volume `v` of move `mid`, `IDS_PER_LOCK` at a
    /// time under the cache lock.
    fn remember_in_chunks(
        &self,
        v: &VolumeName,
        mid: u64,
        applied: Vec<(RequestId, Applied)>,
    ) -> Result<(), crate::cache::IncomingError> {
        self.core().reserve_applied(v, applied.len());
        let mut applied = applied.into_iter();
        while applied.len() > 0 {
            let chunk = applied.by_ref().take(IDS_PER_LOCK);
            self.core().remember_migrated(v, mid, chunk)?;
        }
        Ok(())
    }

    /// Refuses a move's Begin, Claim or SwitchOver once this node is shutting down: its
    /// last drain is under way, and a volume switched in now would be refused writes and
    /// end with the process (the source keeps it).
    fn taking_moves_in(&self) -> Result<(), Status> {
        if self.shutdown.is_cancelled() {
            return Err(Status::unavailable("this NMS is shutting down: it takes no move in"));
        }
        Ok(())
    }

    /// A move's Begin at the target: the volume must not be here (a redirect marker
    /// aside), must fit, and the PSS's record must be what the source claims; then the
    /// volume is created in state Incoming. Returns its name and block size.
    async fn admit_incoming(
        &self,
        b: &pb::MigrationBegin,
    ) -> Result<(VolumeName, wayside_proto::types::BlockSize), Status> {
        let v = convert::volume_name(&b.volume)?;
        let bs = convert::block_size(b.block_size)?;
        let cred = convert::credential_hash(&b.credential_hash)?;
        // (`unload`: an idle volume may be unloaded to make room; only once the PSS has
        // confirmed the move, so a bogus Begin unloads nothing.)
        // A copy here at an epoch below the source's is one the volume left (another NMS
        // took it over; holding nothing to write back, this one was never told): it does
        // not stand in the way before the PSS is asked (`!unload`), and is dropped once
        // the PSS confirms the source's epoch, as an attach here would drop it.
        let superseded = |x: &crate::cache::Volume| {
            matches!(x.state, VolumeState::Active) && x.epoch.0 < b.source_epoch
        };
        let admissible = |core: &mut Cache, unload: bool| -> Result<(), Status> {
            if let Some(x) = core.volume(&v) {
                if !matches!(x.state, VolumeState::Moved { .. }) && (unload || !superseded(x)) {
                    return Err(Status::failed_precondition(format!(
                        "volume {v} is already here ({:?})",
                        x.state
                    )));
                }
            }
            self.volume_room(core, unload)?;
            let room = self.cfg.cache_capacity_bytes.saturating_sub(core.dirty_bytes());
            if b.cached_bytes > room {
                return Err(NmsError::Limit {
                    limit: "cache_capacity_bytes".into(),
                    unit: "bytes".into(),
                    value: b.cached_bytes,
                    max: room,
                }
                .into());
            }
            Ok(())
        };
        admissible(&mut self.core(), false)?;
        // The PSS's record must be what the source claims: a source that no longer owns
        // the volume (or never did) is refused before any block travels. The read goes to
        // the PSS leader, so it also opens the connection the switch's epoch raise uses
        // (in a freshly started NMS that first connection cost the vehicle several ms of
        // pause).
        let meta =
            self.store.get_volume(v.clone()).await.map_err(|e| Status::from(NmsError::from(e)))?;
        if meta.epoch.0 != b.source_epoch || meta.block_size != bs || meta.credential != cred {
            return Err(Status::failed_precondition(format!(
                "the PSS has volume {v} at epoch {} owned by {:?} (block size {}); the source claims epoch {} (block size {}){}",
                meta.epoch.0,
                meta.owner_node,
                meta.block_size.bytes(),
                b.source_epoch,
                bs.bytes(),
                if meta.credential == cred { "" } else { " and another credential" },
            )));
        }
        let stale = self.core().volume(&v).filter(|x| superseded(x)).map(|x| x.incarnation());
        if let Some(incarnation) = stale {
            if !self.handle(&v).is_some_and(|h| h.migrating.load(Ordering::Acquire)) {
                warn!(
                    volume = %v,
                    epoch = b.source_epoch,
                    "a move in finds a copy here the volume left (another NMS took it over): dropped"
                );
                self.drop_copy(&v, incarnation);
            }
        }
        {
            // Serialized with vehicles' loads of this volume (`Node::load` holds its
            // lock from its check to `install`): either a load finished first and the
            // volume is served here (refused above), or the Incoming copy is in place
            // first and the load refuses (NotOwner). Unserialized, a load's `install`
            // could replace the Incoming copy and this move's frames overwrite what its
            // vehicle wrote.
            let _load = self.load_locks.lock(&v).await;
            let mut core = self.core();
            admissible(&mut core, true)?;
            core.insert_volume(
                v.clone(),
                bs,
                Epoch(b.source_epoch),
                cred,
                Lsn(0),
                VolumeState::Incoming { migration_id: b.migration_id },
            );
            core.reserve_blocks(&v, b.cached_bytes / u64::from(bs.bytes()));
        }
        Ok((v, bs))
    }

    /// The target's side of one transfer.
    async fn receive(
        &self,
        mut inbound: Streaming<pb::MigrationFrame>,
        tx: mpsc::Sender<Result<pb::MigrationAck, Status>>,
    ) {
        let mut incoming: Option<(VolumeName, u64)> = None;
        let r = self.receive_frames(&mut inbound, &tx, &mut incoming).await;
        if let Err(status) = r {
            if let Some((v, migration_id)) = incoming {
                warn!(volume = %v, error = %status.message(), "incoming migration dropped");
                // Only this move's copy: never a volume loaded (or moved in) since.
                let mut core = self.core();
                let state = core.volume(&v).map(|x| &x.state);
                if state == Some(&VolumeState::Incoming { migration_id }) {
                    core.remove_volume(&v);
                }
            }
            // Bounded: a source that stopped reading its acks (the reason `answer` failed,
            // perhaps) would hold this task and its stream for good.
            let wait = Duration::from_millis(self.cfg.migration_switch_timeout_ms);
            let _ = tokio::time::timeout(wait, tx.send(Err(status))).await;
        }
    }

    async fn receive_frames(
        &self,
        inbound: &mut Streaming<pb::MigrationFrame>,
        tx: &mpsc::Sender<Result<pb::MigrationAck, Status>>,
        incoming: &mut Option<(VolumeName, u64)>,
    ) -> Result<(), Status> {
        // A step refused because the volume is no longer this move's (see `IncomingError`)
        // aborts the move; impossible switch positions are a malformed stream.
        let refused = |e: IncomingError| match e {
            IncomingError::Lsns { .. } => Status::invalid_argument(e.to_string()),
            IncomingError::NotIncoming { .. } => Status::aborted(e.to_string()),
            IncomingError::DirtyFull { limit, value, max } => fault_status(
                Fault::LimitExceeded { limit: limit.into(), unit: "bytes".into(), value, max },
                e.to_string(),
            ),
        };
        let ack = |a: Ack| pb::MigrationAck { ack: Some(a) };
        let closed = || Status::cancelled("source went away");
        // The source gives up by then; a source or link gone silent (no reset) must not
        // leave the half-moved volume here, refusing its vehicle, any longer.
        let deadline = Instant::now() + Duration::from_millis(self.cfg.migration_timeout_ms);
        let first = next_frame(inbound, deadline)
            .await?
            .ok_or_else(|| Status::invalid_argument("empty migration stream"))?;
        let Some(Frame::Begin(b)) = first.frame else {
            return Err(Status::invalid_argument("a migration stream must start with Begin"));
        };
        self.taking_moves_in()?;
        let (v, bs) = self.admit_incoming(&b).await?;
        let mid = b.migration_id;
        *incoming = Some((v.clone(), mid));
        info!(volume = %v, from = %b.source_address, "incoming migration");
        // An answer waits for room in the ack stream (the source's HTTP/2 window) no
        // longer than the move may last: a source that stops reading its acks must not
        // keep the half-moved volume here.
        let answer = |a: Ack| async move {
            match tokio::time::timeout_at(deadline.into(), tx.send(Ok(ack(a)))).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) => Err(closed()),
                Err(_) => Err(Status::deadline_exceeded(
                    "migration_timeout_ms passed waiting for the source to take an answer",
                )),
            }
        };
        let ready = pb::MigrationReady { target_node: self.node_id.clone() };
        answer(Ack::Ready(ready)).await?;
        // The PSS's answer to a Claim: the epoch is raised, the volume not served until
        // SwitchOver.
        let mut claimed = None;
        let (mut round_blocks, mut round_bytes) = (0u64, 0u64);
        loop {
            let f = next_frame(inbound, deadline)
                .await?
                .ok_or_else(|| Status::cancelled("source closed the stream before SwitchOver"))?;
            match f.frame {
                Some(Frame::Blocks(bl)) => {
                    let most = self.cfg.max_message_size_bytes as u64 / BLOCK_FRAMING_BYTES;
                    if bl.blocks.len() as u64 > most {
                        return Err(Status::invalid_argument(format!(
                            "a Blocks frame of {} blocks: at most {most} (frames are cut at \
                             {BLOCK_FRAMING_BYTES} bytes a block besides its data)",
                            bl.blocks.len()
                        )));
                    }
                    let mut blocks = Vec::with_capacity(bl.blocks.len());
                    for m in bl.blocks {
                        if m.forget {
                            if m.dirty || m.deleted || !m.data.is_empty() {
                                return Err(Status::invalid_argument(format!(
                                    "block {}: a forget carries no data, dirty or deleted flag",
                                    m.block
                                )));
                            }
                            round_blocks += 1;
                            blocks.push(MigBlock::forget(m.block));
                            continue;
                        }
                        let len = m.data.len() as u64;
                        if len > u64::from(bs.bytes()) || (m.deleted && len != 0) {
                            return Err(Status::invalid_argument(format!(
                                "block {} has {len} bytes; the block size is {}",
                                m.block,
                                bs.bytes()
                            )));
                        }
                        round_blocks += 1;
                        round_bytes += len;
                        blocks.push(MigBlock {
                            block: m.block,
                            // A copy, not a slice: a slice would pin the whole received
                            // frame for as long as any one of its blocks stays cached. Into
                            // a pool slot: memory already faulted in (see `crate::pool`).
                            data: (!m.deleted).then(|| self.pool.copy(&m.data)),
                            version: m.version,
                            dirty: m.dirty,
                            lsn: Lsn(m.lsn),
                            heat: m.heat,
                            forget: false,
                        });
                    }
                    self.core().put_migrated(&v, mid, blocks).map_err(refused)?;
                }
                Some(Frame::RequestIds(r)) => {
                    let t = Instant::now();
                    let applied = self.applied_ids("a RequestIds frame", r.runs)?;
                    let entries = applied.len();
                    self.remember_in_chunks(&v, mid, applied).map_err(refused)?;
                    tracing::debug!(
                        round = r.round,
                        request_ids = entries,
                        took_us = us(t.elapsed()),
                        "request ids remembered"
                    );
                }
                Some(Frame::RoundEnd(r)) => {
                    answer(Ack::Round(pb::RoundAck {
                        round: r.round,
                        blocks: round_blocks,
                        bytes: round_bytes,
                    }))
                    .await?;
                    (round_blocks, round_bytes) = (0, 0);
                }
                Some(Frame::Claim(c)) => {
                    if claimed.is_some() {
                        return Err(Status::invalid_argument("a second Claim"));
                    }
                    self.taking_moves_in()?;
                    if c.expected_epoch != b.source_epoch {
                        return Err(Status::invalid_argument("Claim epoch differs from Begin's"));
                    }
                    let t = Instant::now();
                    let meta = self
                        .store
                        .acquire(self.acquire_request(&v, Some(Epoch(c.expected_epoch)), None))
                        .await
                        .map_err(|e| Status::from(NmsError::from(e)))?;
                    info!(
                        volume = %v,
                        epoch = meta.epoch.0,
                        acquire_us = us(t.elapsed()),
                        "claimed: the epoch is raised; serving from SwitchOver on"
                    );
                    let new_epoch = meta.epoch.0;
                    claimed = Some(meta);
                    answer(Ack::Claimed(pb::Claimed { new_epoch })).await?;
                }
                Some(Frame::SwitchOver(s)) => {
                    tracing::debug!(volume = %v, "switch: SwitchOver received");
                    let received = Instant::now();
                    let applied = self.applied_ids("a SwitchOver", s.applied)?;
                    if s.expected_epoch != b.source_epoch {
                        return Err(Status::invalid_argument(
                            "SwitchOver epoch differs from Begin's",
                        ));
                    }
                    // Before the epoch is raised: a malformed switch takes nothing over.
                    check_switch_lsns(Lsn(s.accepted_lsn), Lsn(s.persisted_lsn))
                        .map_err(refused)?;
                    self.taking_moves_in()?;
                    // The switch's ids in chunks while the volume is still arriving (the
                    // target's other vehicles wait for the cache lock one chunk at most),
                    // before the epoch is raised (a failure drops the arriving copy).
                    self.remember_in_chunks(&v, mid, applied).map_err(refused)?;
                    let t_acquire = Instant::now();
                    let meta = match claimed.take() {
                        Some(meta) => meta,
                        None => self
                            .store
                            .acquire(self.acquire_request(&v, Some(Epoch(s.expected_epoch)), None))
                            .await
                            .map_err(|e| Status::from(NmsError::from(e)))?,
                    };
                    let acquire_us = us(t_acquire.elapsed());
                    let t_finish = Instant::now();
                    {
                        let mut core = self.core();
                        core.finish_incoming(
                            &v,
                            mid,
                            meta.epoch,
                            Lsn(s.accepted_lsn),
                            Lsn(s.persisted_lsn),
                            Vec::new(),
                        )
                        .map_err(refused)?;
                        if let Some(x) = core.volume_mut(&v) {
                            x.stored_blocks = meta.block_count;
                            // A source from before lineages names none.
                            x.predecessor = (b.source_session != 0).then_some(Predecessor {
                                session: b.source_session,
                                incarnation: b.source_incarnation,
                                through: Lsn(s.accepted_lsn),
                            });
                            x.ancestors = if b.source_session == 0 {
                                Vec::new()
                            } else {
                                let line = b.source_lineage.iter().take(MAX_ANCESTORS);
                                line.map(super::predecessor_of).collect()
                            };
                        }
                    }
                    self.bump();
                    let finish_us = us(t_finish.elapsed());
                    *incoming = None;
                    // Answer first: the source's vehicle is paused until it hears this, and
                    // the write-back of the dirty blocks would compete with the answer.
                    // (Switched here whether or not the source hears it, within
                    // `migration_switch_timeout_ms`: the writer starts all the same.)
                    let switched = ack(Ack::Switched(pb::Switched {
                        new_epoch: meta.epoch.0,
                        target_address: self.advertise.uri().to_owned(),
                    }));
                    let wait = Duration::from_millis(self.cfg.migration_switch_timeout_ms);
                    let _ = tokio::time::timeout(wait, tx.send(Ok(switched))).await;
                    let answered_us = us(received.elapsed());
                    self.start_writer(&v);
                    let urgent = self.core().past_writeback_start(&v);
                    self.wake_writer(&v, true, urgent);
                    info!(
                        volume = %v,
                        epoch = meta.epoch.0,
                        acquire_us,
                        finish_us,
                        answered_us,
                        "volume switched here"
                    );
                    return Ok(());
                }
                Some(Frame::Abort(a)) => {
                    // Bounded: a source that stops reading its acks must not keep the
                    // half-arrived copy here (it is dropped when this returns).
                    let aborted =
                        ack(Ack::Aborted(pb::MigrationAborted { reason: a.reason.clone() }));
                    let wait = Duration::from_millis(self.cfg.migration_switch_timeout_ms);
                    let _ = tokio::time::timeout(wait, tx.send(Ok(aborted))).await;
                    return Err(Status::aborted(format!("source aborted: {}", a.reason)));
                }
                Some(Frame::Begin(_)) => return Err(Status::invalid_argument("a second Begin")),
                None => return Err(Status::invalid_argument("empty migration frame")),
            }
        }
    }
}

type AckStream = Pin<Box<dyn futures::Stream<Item = Result<pb::MigrationAck, Status>> + Send>>;

#[tonic::async_trait]
impl pb::migration_server::Migration for Node {
    type TransferStream = AckStream;

    async fn transfer(
        &self,
        req: Request<Streaming<pb::MigrationFrame>>,
    ) -> Result<Response<Self::TransferStream>, Status> {
        let inbound = req.into_inner();
        let (tx, rx) = mpsc::channel(16);
        let node = self.self_arc();
        let stop = self.stop.clone();
        let span = info_span!("migrate_in", node = %self.node_id);
        self.spawn_critical(
            "a move in panicked",
            async move {
                tokio::select! {
                    _ = node.receive(inbound, tx) => {}
                    _ = stop.cancelled() => {}
                }
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    use super::{applied_from_pb, applied_to_pb, Node, SwitchRule};
    use crate::cache::{Applied, VolumeState};
    use crate::config::Config;
    use crate::error::NmsError;
    use crate::server::{LoadFor, Presented};
    use crate::store::{
        Acquire, BlockPage, BoxFut, Fetched, Store, StoreError, VolumeMeta, WriteBack,
    };
    use std::sync::Arc;
    use tokio_util::sync::CancellationToken;
    use wayside_proto::pb;
    use wayside_proto::types::{
        BlockNo, BlockSize, Credential, Endpoint, Epoch, Lsn, RequestId, VolumeName,
    };

    #[test]
    fn request_ids_travel_as_runs_per_client_in_order() {
        let id = |c: &str, seq| RequestId::new(c, seq).unwrap();
        let at = |lsn, version| Applied { lsn: Lsn(lsn), version };
        let ids = vec![
            (id("a", 1), at(10, 1)),
            (id("a", 2), at(11, 2)),
            (id("b", 7), at(12, 1)),
            (id("a", 3), at(13, 3)),
        ];
        let runs = applied_to_pb(&ids);
        let clients: Vec<_> = runs.iter().map(|r| (r.client_id.as_str(), r.seq.len())).collect();
        assert_eq!(clients, [("a", 2), ("b", 1), ("a", 1)], "consecutive ids share a run");
        assert_eq!(applied_from_pb(runs).unwrap(), ids, "the same ids, in the same order");
        assert!(applied_to_pb(&[]).is_empty());
        let run = |seq: Vec<u64>, lsn: Vec<u64>, version: Vec<u64>| pb::AppliedRun {
            client_id: "c".into(),
            seq,
            lsn,
            version,
        };
        for bad in [
            run(vec![1, 2], vec![1], vec![1, 1]),
            run(vec![1], vec![1], vec![]),
            run(vec![], vec![], vec![]),
            run(vec![1, 0], vec![1, 2], vec![1, 1]),
        ] {
            let e = applied_from_pb(vec![bad.clone()]).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{bad:?}: {e:?}");
        }
        let mut no_client = run(vec![1], vec![1], vec![1]);
        no_client.client_id.clear();
        assert_eq!(
            applied_from_pb(vec![no_client]).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }

    const GBIT: f64 = 125e6;

    #[test]
    fn the_switch_waits_for_changes_small_in_bytes_and_in_time() {
        let rule = SwitchRule { max_rounds: 8, below_bytes: 1 << 20, transfer_us: 2_000 };
        // Over the 1 MiB threshold: another round.
        assert!(!rule.switch_now(1, 8 << 20, 64 << 20, GBIT));
        // Under it, but 930 KB is ~7.4 ms at 1 Gbit/s: another round, as the changes shrink.
        assert!(!rule.switch_now(2, 930_000, 8 << 20, GBIT));
        // 100 KB is 0.8 ms: switch.
        assert!(rule.switch_now(3, 100_000, 930_000, GBIT));
        // On loopback (~2.5 GB/s) 930 KB is 0.4 ms: switch.
        assert!(rule.switch_now(2, 930_000, 64 << 20, 2.5e9));
        // Changes as large as the round that sent them (the vehicle writes as fast as the
        // link carries): more rounds would not help, switch.
        assert!(rule.switch_now(3, 900_000, 900_000, GBIT));
        // Rounds spent: switch whatever is left.
        assert!(rule.switch_now(8, 8 << 20, 8 << 20, GBIT));
        // No time condition: the byte threshold alone.
        let bytes_only = SwitchRule { transfer_us: 0, ..rule };
        assert!(bytes_only.switch_now(2, 930_000, 8 << 20, GBIT));
    }
    /// A store whose `acquire` parks (after saying so) until the gate opens.
    struct Gated {
        inner: crate::store::MemStore,
        entered: tokio::sync::Notify,
        gate: tokio::sync::Semaphore,
    }

    impl Store for Gated {
        fn acquire(&self, req: Acquire) -> BoxFut<'_, Result<VolumeMeta, StoreError>> {
            Box::pin(async move {
                self.entered.notify_one();
                let _open = self.gate.acquire().await.expect("gate open");
                self.inner.acquire(req).await
            })
        }
        fn get_volume(&self, volume: VolumeName) -> BoxFut<'_, Result<VolumeMeta, StoreError>> {
            self.inner.get_volume(volume)
        }
        fn write_batch(&self, batch: WriteBack) -> BoxFut<'_, Result<Lsn, StoreError>> {
            self.inner.write_batch(batch)
        }
        fn get_blocks(
            &self,
            volume: VolumeName,
            blocks: Vec<BlockNo>,
        ) -> BoxFut<'_, Result<Fetched, StoreError>> {
            self.inner.get_blocks(volume, blocks)
        }
        fn list_blocks(
            &self,
            volume: VolumeName,
            start: BlockNo,
            limit: u32,
        ) -> BoxFut<'_, Result<BlockPage, StoreError>> {
            self.inner.list_blocks(volume, start, limit)
        }
    }

    /// Target node "b" over a [`Gated`] store holding `names` at epoch 1 (owned by "a",
    /// credential "k", 4 KiB blocks), with `max_volumes`.
    async fn gated_target(names: &[&str], max_volumes: usize) -> (Arc<Gated>, Arc<Node>) {
        let gated = Arc::new(Gated {
            inner: crate::store::MemStore::default(),
            entered: tokio::sync::Notify::new(),
            gate: tokio::sync::Semaphore::new(0),
        });
        for (n, name) in names.iter().enumerate() {
            let created = gated.inner.acquire(Acquire {
                volume: VolumeName::new(*name).unwrap(),
                owner_node: "a".into(),
                owner_address: "http://127.0.0.1:1".into(),
                owner_session: 0,
                expected_epoch: None,
                create: Some((BlockSize::new(4096).unwrap(), Credential::new("k").unwrap().hash())),
                request_id: RequestId::new("test", n as u64 + 1).unwrap(),
            });
            assert_eq!(created.await.unwrap().epoch, Epoch(1));
        }
        let cfg =
            Config { node_id: "b".into(), block_pool_bytes: 0, max_volumes, ..Config::default() };
        let store: Arc<dyn Store> = gated.clone();
        let node = Node::new(
            cfg,
            Endpoint::parse("127.0.0.1:2").unwrap(),
            store,
            None,
            CancellationToken::new(),
        );
        (gated, node)
    }

    /// The Begin of a move of `name` from "a" at epoch 1 (as [`gated_target`] holds it).
    fn begin_of(name: &str) -> pb::MigrationBegin {
        pb::MigrationBegin {
            migration_id: 9,
            volume: name.into(),
            block_size: 4096,
            source_epoch: 1,
            source_node: "a".into(),
            source_address: "http://127.0.0.1:1".into(),
            credential_hash: Credential::new("k").unwrap().hash().0.to_vec(),
            cached_bytes: 0,
            ..Default::default()
        }
    }

    /// Loads and Begins of different volumes do not wait for each other (a load waiting
    /// on the PSS holds up nothing else), and `max_volumes` counts the loads under way
    /// with the volumes here, so concurrent loads and moves in cannot pass it.
    #[tokio::test]
    async fn loads_and_moves_in_of_other_volumes_go_on_within_max_volumes() {
        use futures::FutureExt as _;
        let (gated, node) = gated_target(&["v", "w", "x"], 2).await;
        let cred = Credential::new("k").unwrap();
        let begin = begin_of;
        // A vehicle's load of v waits in the PSS's acquire...
        let load = tokio::spawn({
            let (node, cred) = (node.clone(), cred.clone());
            async move {
                node.load(
                    &VolumeName::new("v").unwrap(),
                    &Presented::new(cred),
                    None,
                    LoadFor::Call,
                )
                .await
            }
        });
        gated.entered.notified().await;
        // ...while a move of w comes in at once.
        let admitted = node.admit_incoming(&begin("w")).now_or_never();
        assert!(matches!(admitted, Some(Ok(_))), "w's Begin waited for v's load: {admitted:?}");
        // v (loading) and w (arriving) fill max_volumes = 2: a load of x and a move of y are
        // refused, at once.
        let x = VolumeName::new("x").unwrap();
        let refused =
            node.load(&x, &Presented::new(cred.clone()), None, LoadFor::Call).now_or_never();
        assert!(
            matches!(&refused, Some(Err(NmsError::Limit { limit, .. })) if limit == "max_volumes"),
            "{refused:?}"
        );
        let e = node.admit_incoming(&begin("y")).now_or_never().expect("at once").unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
        gated.gate.add_permits(1000);
        load.await.unwrap().unwrap();
        assert_eq!(node.loads_in_flight.load(std::sync::atomic::Ordering::SeqCst), 0);
        node.stop.cancel();
    }

    /// Two processes under one node id and address (a replacement started while the first
    /// was paused or cut off): the first, fenced, does not take the second's epoch for its
    /// own, so its older copy is never written over what the vehicle wrote at the second.
    #[tokio::test]
    async fn a_process_under_the_same_id_and_address_is_not_taken_for_this_one() {
        let store = Arc::new(crate::store::MemStore::default());
        let start = || {
            let cfg = Config {
                node_id: "rsu".into(),
                block_pool_bytes: 0,
                writeback_delay_ms: 60_000,
                ..Config::default()
            };
            let store: Arc<dyn Store> = store.clone();
            Node::new(
                cfg,
                Endpoint::parse("127.0.0.1:2").unwrap(),
                store,
                None,
                CancellationToken::new(),
            )
        };
        let (old, new) = (start(), start());
        let v = VolumeName::new("v").unwrap();
        let cred = Presented::new(Credential::new("k").unwrap());
        let bs = BlockSize::new(4096).unwrap();
        old.load(&v, &cred, Some(bs), LoadFor::Call).await.unwrap();
        old.write(&v, &cred, 3, 0, Some(&[1; 4096]), None).await.unwrap();
        // The replacement loads the volume (a newer epoch) and the vehicle writes there.
        new.load(&v, &cred, None, LoadFor::Call).await.unwrap();
        new.write(&v, &cred, 3, 0, Some(&[2; 4096]), None).await.unwrap();
        new.flush(&v, &cred).await.unwrap();
        // The first one's write-back of its older block is refused: fenced, not adopted.
        let r = old.flush(&v, &cred).await;
        assert!(r.is_err(), "the old copy was written back over the new one: {r:?}");
        let got = store.get_blocks(v.clone(), vec![3]).await.unwrap();
        assert_eq!(got[0].as_ref().map(|(d, _)| d[0]), Some(2), "the vehicle's newer write");
        old.stop.cancel();
        new.stop.cancel();
    }

    /// While a move holds a volume's write-back, a flush waiting on it waits quietly: the
    /// writer, woken to hurry and finding the hold, used to tell the whole node of progress,
    /// which woke the flush to hurry it again, round and round until the flush's deadline.
    #[tokio::test]
    async fn a_flush_waiting_on_a_held_write_back_does_not_spin_with_the_writer() {
        let (gated, node) = gated_target(&["v"], Config::default().max_volumes).await;
        gated.gate.add_permits(1000);
        let v = VolumeName::new("v").unwrap();
        let cred = Presented::new(Credential::new("k").unwrap());
        node.load(&v, &cred, None, LoadFor::Call).await.unwrap();
        node.write(&v, &cred, 3, 0, Some(&[7; 4096]), None).await.unwrap();
        let (hold, _, idle) =
            node.hold_writeback(&v, std::time::Duration::from_secs(5)).await.unwrap();
        assert!(idle, "no batch in flight");
        let before = *node.progress.borrow();
        let flush =
            tokio::time::timeout(std::time::Duration::from_millis(300), node.flush(&v, &cred))
                .await;
        assert!(flush.is_err(), "a flush finished while the write-back was held: {flush:?}");
        let bumps = node.progress.borrow().wrapping_sub(before);
        assert!(bumps < 20, "{bumps} progress wake-ups in 300 ms of a held write-back");
        // The hold dropped, the flush goes through.
        drop(hold);
        assert!(node.flush(&v, &cred).await.unwrap() >= Lsn(1));
        node.stop.cancel();
    }

    /// A vehicle's load and a move's Begin for the same volume at the target are
    /// serialized: a Begin arriving while a load is under way waits for it and is then
    /// refused (the volume is served here); a load after a Begin is refused (NotOwner), and
    /// so is an install over the incoming copy.
    #[tokio::test]
    async fn a_moves_begin_and_a_vehicles_load_at_the_target_exclude_each_other() {
        use futures::FutureExt as _;
        // Both volumes are in the PSS at epoch 1, owned by NMS "a".
        let (gated, node) = gated_target(&["v", "w"], Config::default().max_volumes).await;
        let cred = Credential::new("k").unwrap();
        let bs = BlockSize::new(4096).unwrap();
        let begin = begin_of;
        let v = VolumeName::new("v").unwrap();

        // A vehicle attaches at b: its load holds on in the PSS's acquire...
        let load = tokio::spawn({
            let (node, v, cred) = (node.clone(), v.clone(), cred.clone());
            async move { node.load(&v, &Presented::new(cred), None, LoadFor::Call).await }
        });
        gated.entered.notified().await;
        // ...and the move's Begin, arriving now, waits for it rather than creating the
        // Incoming copy that the load's install would then replace.
        assert!(
            node.admit_incoming(&begin("v")).now_or_never().is_none(),
            "Begin went ahead of the load in progress"
        );
        gated.gate.add_permits(1000);
        load.await.unwrap().unwrap();
        let e = node.admit_incoming(&begin("v")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
        let state = node.core().volume(&v).map(|x| (x.state.clone(), x.epoch));
        assert_eq!(state, Some((VolumeState::Active, Epoch(2))));

        // The other order: the Incoming copy first; a load, or an install, refuses.
        let w = VolumeName::new("w").unwrap();
        node.admit_incoming(&begin("w")).await.unwrap();
        let e =
            node.load(&w, &Presented::new(cred.clone()), None, LoadFor::Call).await.unwrap_err();
        assert!(matches!(e, NmsError::NotOwner { .. }), "{e:?}");
        let e = node.install(&w, bs, Epoch(7), cred.hash(), Lsn(0), 0).unwrap_err();
        assert!(matches!(e, NmsError::NotOwner { .. }), "{e:?}");
        let state = node.core().volume(&w).map(|x| x.state.clone());
        assert_eq!(state, Some(VolumeState::Incoming { migration_id: 9 }));
        node.stop.cancel();
    }
}
