//! The vehicle-side client library: one volume on whichever NMS serves it.
//!
//! - Follows `Moved` redirects (a finished migration) to the new NMS and attaches there.
//! - Retries transient failures with exponential backoff, within `op_timeout` per call;
//!   when the NMS it uses is unreachable it tries the others in `nms` (attaching there
//!   takes ownership of the volume in the PSS, fencing the lost NMS). One that took the
//!   attach but whose journal replay met back-pressure is busy, not gone: the replay is
//!   tried there again after a pause, until the call's deadline, and not at another NMS
//!   (which would take the volume from it) unless it got nowhere for `rpc_timeout`.
//! - Keeps every accepted-but-not-persisted write in a bounded journal. After any
//!   reconnect it first sets aside the entries the NMS's copy of the volume holds: those
//!   that copy accepted, and those the copies it continues accepted up to their switch
//!   (the copy a move made it from, and that one's own line: `VolumeInfo.incarnation`,
//!   `predecessor_*`, `ancestors`; an NMS remembers only its last
//!   `dedupe_entries_per_volume` request ids, so ids alone cannot tell). It replays the
//!   rest, with their original request ids, in the original order: an NMS that already
//!   has one (a migration target that got the source's applied ids) answers `duplicate`;
//!   a fresh one (after a crash) applies it (byte-range writes replayed in order
//!   converge, so re-applying an already persisted suffix is harmless). So an
//!   acknowledged write survives the loss of the NMS that accepted it.
//! - Log positions (lsns) are only comparable within one lineage of owners: an NMS that
//!   takes a volume over after a crash numbers from the PSS's persisted watermark. So
//!   each entry remembers the connection its lsn came from, and only a persisted
//!   watermark from that same connection prunes it; `flush` first replays entries
//!   acknowledged on an older connection.
//!
//! - An NMS that restarted at the same address is noticed, not silently used: every call
//!   carries the session of the NMS process it attached to, which a restarted one refuses,
//!   so the client attaches again and replays (a restarted NMS knows nothing of what its
//!   earlier run accepted).
//! - A write acknowledged by an NMS the client left while it was in flight (another call
//!   reconnected meanwhile, and that reconnect's replay could not include it) is sent
//!   again on the new connection before the caller hears of it, so no later write of the
//!   caller's can be overtaken by a replay of it.
//! - Request ids are `client_id` + a sequence starting at a random point of 2^62, so a
//!   process reusing a client id (a remount with `--client-id`) never presents an id an
//!   earlier process used (an NMS would answer it as a duplicate and drop the write).
//!
//! - With TLS set up (`tls`), every NMS is dialled over TLS, trusting the road's CA,
//!   whatever scheme its address (given, or in a redirect) was written with: neither can
//!   downgrade the connection to plaintext. A handshake that fails (a certificate not
//!   signed by that CA, a server not speaking TLS) at every NMS of an attach round fails
//!   the call at once with [`ClientError::Tls`] rather than retrying for `op_timeout`.
//!
//! - An NMS gone silent (powered off, out of range, a link cut without a reset) is found
//!   out by the connection's keepalive PINGs (`http2.keepalive_interval_ms` and
//!   `_timeout_ms`, 2 s and 5 s): an idle vehicle connects anew at its next call rather than
//!   waiting out `rpc_timeout` on a dead connection, and a stream open on it fails over.
//!
//! Limits: `journal_limit_bytes` (a write that would pass it first flushes), `op_timeout`
//! (per call, retries included), `rpc_timeout` (per attempt), backoff doubling from
//! `initial_backoff` up to `max_backoff`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::{Code, Status};
use tracing::{debug, info, warn, Instrument as _};
use wayside_proto::convert::to_volume_auth;
use wayside_proto::error::fault_of;
use wayside_proto::h2client::Channel;
use wayside_proto::pb;
use wayside_proto::pb::nms_client::NmsClient;
use wayside_proto::types::{BlockSize, Credential, Endpoint, Fault, Lsn, RequestId, VolumeName};

/// How to reach and use one volume.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// NMS addresses to try, first preferred. Redirects may lead elsewhere.
    pub nms: Vec<Endpoint>,
    pub volume: VolumeName,
    pub credential: Credential,
    /// This client's name in request ids (`client_id` + a sequence starting at a random
    /// point, so reusing a name across processes repeats no id) and in the NMS's logs.
    pub client_id: String,
    /// Create the volume with this block size when it does not exist.
    pub create_block_size: Option<BlockSize>,
    /// Longest one call may take, retries and redirects included.
    pub op_timeout: Duration,
    /// Most bytes of memory the accepted-but-not-persisted writes kept for replay take:
    /// their data and `JOURNAL_ENTRY_OVERHEAD_BYTES` (224 on x86-64) each.
    pub journal_limit_bytes: u64,
    /// Longest one attempt may take.
    pub rpc_timeout: Duration,
    /// First retry delay; doubles up to `max_backoff`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// Longest a TCP connect may take (an NMS out of reach is passed over that soon); a TLS
    /// handshake after it gets up to `rpc_timeout` (a busy NMS is not taken for a gone one).
    pub connect_timeout: Duration,
    /// Largest gRPC message sent or accepted, in bytes.
    pub max_message_size_bytes: usize,
    /// Most operations per `StreamBatches` message sent by `read_many`/`write_many` (the
    /// NMS's `max_stream_batch_ops` or less); longer lists go in several batches.
    pub max_batch_ops: usize,
    /// Most bytes of journal entries (their data and `JOURNAL_ENTRY_OVERHEAD_BYTES` each)
    /// one batch of a journal replay carries (and half `max_message_size_bytes` at most):
    /// each batch must cross within `rpc_timeout` on whatever link the vehicle has. One
    /// that gets no reply in time halves the size for the replays after it (down to one
    /// entry a batch), one answered within a quarter of `rpc_timeout` doubles it back.
    pub replay_batch_bytes: usize,
    /// Dial NMSs over TLS, trusting the road's CA in it (every address, redirects included,
    /// whatever their scheme); `None`: plaintext.
    pub tls: Option<wayside_proto::tls::Tls>,
    /// The HTTP/2 connection's windows, frame and header sizes, the calls that may wait for
    /// a stream, its send buffer and the response payloads it holds uncopied
    /// (`wayside_proto::h2client`).
    pub http2: wayside_proto::h2client::ClientSettings,
}

impl ClientOptions {
    /// Options with defaults: a random client id, 10 s per call, a 64 MiB journal.
    pub fn new(nms: Vec<Endpoint>, volume: VolumeName, credential: Credential) -> Self {
        Self {
            nms,
            volume,
            credential,
            client_id: format!("c-{:016x}", rand::random::<u64>()),
            create_block_size: None,
            op_timeout: Duration::from_secs(10),
            journal_limit_bytes: 64 << 20,
            rpc_timeout: Duration::from_secs(5),
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(500),
            connect_timeout: Duration::from_secs(1),
            max_message_size_bytes: 16 << 20,
            max_batch_ops: 256,
            replay_batch_bytes: 1 << 20,
            tls: None,
            http2: wayside_proto::h2client::ClientSettings::default(),
        }
    }
}

/// A write the NMS accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteAck {
    /// This write's position in the volume's log.
    pub lsn: Lsn,
    /// Every write with lsn <= this is persisted in the PSS.
    pub persisted_lsn: Lsn,
    /// The block's version after the write.
    pub version: u64,
}

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad options: {0}")]
    Options(String),
    #[error("wrong credential for the volume: {0}")]
    Unauthenticated(String),
    #[error("volume not found: {0}")]
    NotFound(String),
    #[error("invalid request: {0}")]
    InvalidArgument(String),
    #[error("{limit} exceeded ({value} of {max} {unit})")]
    LimitExceeded { limit: String, unit: String, value: u64, max: u64 },
    #[error("the write journal is full ({bytes} of {limit} bytes) even after a flush")]
    JournalFull { bytes: u64, limit: u64 },
    #[error("no NMS answered within op_timeout ({timeout:?}); last error: {last}")]
    Unavailable { timeout: Duration, last: String },
    /// No TLS connection could be made: the NMS's certificate is not signed by the road's
    /// CA the client trusts, the NMS does not speak TLS, or an `https://` address was
    /// given to a client without TLS set up. Retrying would not help.
    #[error("TLS: {0}")]
    Tls(String),
    #[error("NMS error: {0}")]
    Status(Status),
}

#[derive(Debug, Clone)]
enum JOp {
    /// `Bytes`: the journal entry and every (re)send share one buffer.
    Write {
        block: u64,
        offset: u32,
        data: bytes::Bytes,
    },
    Delete {
        block: u64,
    },
}

impl JOp {
    /// This change as a stream operation under request id `client_id` + `seq`.
    fn stream_op(self, client_id: &str, seq: u64) -> pb::stream_request::Op {
        let request_id = Some(pb::RequestId { client_id: client_id.to_owned(), seq });
        match self {
            JOp::Write { block, offset, data } => {
                pb::stream_request::Op::Write(pb::WriteOp { block, offset, data, request_id })
            }
            JOp::Delete { block } => {
                pb::stream_request::Op::Delete(pb::DeleteOp { block, request_id })
            }
        }
    }
}

#[derive(Debug)]
struct JEntry {
    op: JOp,
    /// Known once accepted; entries without one are still being sent by their caller.
    lsn: Option<Lsn>,
    /// The connection generation that assigned `lsn` (or whose NMS holds the entry at
    /// it: the lsns of one line of copies compare).
    generation: u64,
    /// The copies of the volume (NMS process session, incarnation) known to hold the
    /// entry at `lsn`, oldest first, at most [`MAX_COPIES_PER_ENTRY`]: the one that
    /// accepted it, and those that took it over from there in a move.
    copies: Vec<(u64, u32)>,
    /// Where it stands in the order the NMSs applied the journal's writes: (generation,
    /// lsn) of its first acknowledgement, not changed by the acknowledgements of a replay
    /// (a later generation) until that replay has sent every entry listed: one cut short
    /// and resumed elsewhere would otherwise put the entries it had replayed after the
    /// older ones it had not, applying those last. A replay that went through sets it
    /// anew for every entry its copy holds (`Journal::replayed`): their lsns there are the
    /// order that copy applied them in, which later acknowledgements on the generation
    /// follow. (Kept from the first, a write whose reply was lost and that the copy a move
    /// made, or a source that took the volume back, answered as a duplicate went after a
    /// later write of its block acknowledged earlier, and a replay elsewhere rewound it.)
    order: Option<(u64, Lsn)>,
}

/// Most copies of a volume a journal entry remembers holding it (a move back to an older
/// one among them needs no replay either).
const MAX_COPIES_PER_ENTRY: usize = 4;

/// Memory one journal entry takes beside its data, in bytes, counted against
/// `journal_limit_bytes`: the entry under its key in the map, its list of copies at their
/// most, and 32 for the map's node and the allocator's share. (Counted as 32, a vehicle
/// writing tiny blocks or deleting held several times its limit in memory.)
pub const JOURNAL_ENTRY_OVERHEAD_BYTES: u64 = (std::mem::size_of::<(u64, JEntry)>()
    + MAX_COPIES_PER_ENTRY * std::mem::size_of::<(u64, u32)>()
    + 32) as u64;

impl JEntry {
    fn new(op: JOp) -> Self {
        JEntry { op, lsn: None, generation: 0, copies: Vec::new(), order: None }
    }

    /// Acknowledged at `lsn` on `generation`, by `copy` (if known): applied there anew,
    /// or, at the lsn it had, answered as held there. `before`: the copies `copy`
    /// continues, nearest first, each with the last lsn it gave out; one that had given
    /// out `lsn` (a duplicate of a write it applied) holds the entry at it too. (Not named
    /// so, a write whose reply was lost, answered as a duplicate by a move's target, was
    /// sent again to the source when it took the volume back, which may have forgotten
    /// its id and applied it anew over later writes of its block.)
    fn acked(&mut self, lsn: Lsn, generation: u64, copy: Option<(u64, u32)>, before: &[Through]) {
        if self.lsn != Some(lsn) {
            self.copies.clear();
        }
        self.order.get_or_insert((generation, lsn));
        self.lsn = Some(lsn);
        self.generation = generation;
        // The farthest first: a full list drops the oldest it named.
        for (c, through) in before.iter().rev() {
            if lsn <= *through {
                self.held_at(*c);
            }
        }
        if let Some(c) = copy {
            self.held_at(c);
        }
    }

    fn held_at(&mut self, copy: (u64, u32)) {
        if !self.copies.contains(&copy) {
            if self.copies.len() >= MAX_COPIES_PER_ENTRY {
                self.copies.remove(0);
            }
            self.copies.push(copy);
        }
    }
}

#[derive(Debug, Default)]
struct Journal {
    entries: BTreeMap<u64, JEntry>,
    bytes: u64,
    /// The generation of the last attach that listed the entries to replay: an entry
    /// acknowledged on an older generation after that listing was not replayed there.
    listed_for: u64,
    /// The copy of the volume each generation still named by an entry attached to, and
    /// the copies it continues: entries a copy accepted are in that copy, and in a copy a
    /// move made from it up to the switch's lsn, so they need no replay there.
    lineages: HashMap<u64, Lineage>,
}

/// A generation's copy of the volume (NMS process session, incarnation) and the copies it
/// continues, nearest first (see `JEntry::acked`).
#[derive(Debug, Default)]
struct Lineage {
    copy: (u64, u32),
    before: Vec<Through>,
}

/// A copy of the volume (NMS process session, incarnation) and the last lsn it gave out
/// before the copy that continues it took over.
type Through = ((u64, u32), Lsn);

impl Journal {
    /// The accepted entries not from `generation`, in the order their NMS applied them
    /// first ([`JEntry::order`]: generation, then lsn): not in request-id order, which two
    /// tasks writing one block at once may have had applied the other way round (the later
    /// write, acknowledged and read back, would be overwritten by the earlier one at a
    /// replay), nor in the order of a replay's acknowledgements (see `order`).
    fn to_replay(&self, generation: u64) -> Vec<(u64, JOp)> {
        let mut todo: Vec<(u64, Lsn, u64, &JOp)> = self
            .entries
            .iter()
            .filter(|(_, e)| e.generation != generation)
            .filter_map(|(s, e)| {
                let (g, lsn) = e.order.or(Some((e.generation, e.lsn?)))?;
                e.lsn?;
                Some((g, lsn, *s, &e.op))
            })
            .collect();
        todo.sort_unstable_by_key(|&(g, lsn, seq, _)| (g, lsn, seq));
        todo.into_iter().map(|(_, _, seq, op)| (seq, op.clone())).collect()
    }

    /// What an entry of `op` costs against `journal_limit_bytes`: its data and
    /// [`JOURNAL_ENTRY_OVERHEAD_BYTES`].
    fn size(op: &JOp) -> u64 {
        match op {
            JOp::Write { data, .. } => data.len() as u64 + JOURNAL_ENTRY_OVERHEAD_BYTES,
            JOp::Delete { .. } => JOURNAL_ENTRY_OVERHEAD_BYTES,
        }
    }
    fn prune(&mut self, persisted: Lsn, generation: u64) {
        // The watermark of a connection left since a newer one's replay listed the journal
        // says nothing any more: that replay may have applied older entries of its own
        // generation again over ones this watermark covers (the NMS left, still serving,
        // answered a read late), and an entry removed now would never be replayed.
        if generation < self.listed_for {
            return;
        }
        let done: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, e)| e.generation == generation && e.lsn.is_some_and(|l| l <= persisted))
            .map(|(s, _)| *s)
            .collect();
        for s in done {
            self.remove(s);
        }
    }
    /// Entry `seq` acknowledged at `lsn` on `generation` (see [`JEntry::acked`]), by the
    /// copy of the volume that generation attached to.
    fn acked(&mut self, seq: u64, lsn: Lsn, generation: u64) {
        let line = self.lineages.get(&generation);
        let before = line.map_or(&[][..], |l| l.before.as_slice());
        if let Some(e) = self.entries.get_mut(&seq) {
            e.acked(lsn, generation, line.map(|l| l.copy), before);
        }
    }

    /// Generation `generation`'s replay sent every entry it listed (and its copy took
    /// them): every entry that copy holds is in it at its lsn there, in the order the copy
    /// applied them, and takes that place in the journal's order (see [`JEntry::order`]).
    /// Nothing if a later attach listed the journal since.
    fn replayed(&mut self, generation: u64) {
        if self.listed_for != generation {
            return;
        }
        for e in self.entries.values_mut().filter(|e| e.generation == generation) {
            if let Some(lsn) = e.lsn {
                e.order = Some((generation, lsn));
            }
        }
    }

    fn remove(&mut self, seq: u64) {
        if let Some(e) = self.entries.remove(&seq) {
            self.bytes -= Self::size(&e.op);
        }
    }

    /// Generation `generation` attached to the copy of the volume `info` describes: the
    /// entries that copy holds (accepted by it, or by the copy a move made it from, up to
    /// the switch's lsn) take `generation`, so they are not replayed and leave the journal
    /// with its watermark; those persisted leave now. Request ids cannot tell this for
    /// every entry: an NMS remembers only the last `dedupe_entries_per_volume` of them, and
    /// an entry whose id it forgot would otherwise be applied again, over later writes.
    fn held_by(&mut self, generation: u64, info: &pb::VolumeInfo) {
        let here = (info.nms_session, info.incarnation);
        // The copies this one continues, each through the last lsn of its writes it holds:
        // its predecessor, then that one's own line (a copy two moves on, or reloaded
        // after an idle unload of a moved-in copy).
        let before = std::iter::once((
            (info.predecessor_session, info.predecessor_incarnation),
            Lsn(info.predecessor_through_lsn),
        ))
        .chain(info.ancestors.iter().map(|a| ((a.session, a.incarnation), Lsn(a.through_lsn))))
        .filter(|((session, _), _)| *session != 0)
        .collect::<Vec<_>>();
        let mut held = 0usize;
        for e in self.entries.values_mut() {
            let Some(lsn) = e.lsn else { continue };
            if e.generation == generation {
                continue;
            }
            let holds = (here.0 != 0 && e.copies.contains(&here))
                || before.iter().any(|(copy, through)| lsn <= *through && e.copies.contains(copy));
            if holds {
                e.generation = generation;
                e.held_at(here);
                held += 1;
            }
        }
        if held > 0 {
            debug!(entries = held, "journal entries this NMS's copy of the volume holds");
        }
        if here.0 != 0 {
            self.lineages.insert(generation, Lineage { copy: here, before });
        }
        self.prune(Lsn(info.persisted_lsn), generation);
        let named: HashSet<u64> = self.entries.values().map(|e| e.generation).collect();
        self.lineages.retain(|g, _| *g == generation || named.contains(g));
    }
}

#[derive(Clone)]
struct Conn {
    endpoint: Endpoint,
    client: NmsClient<Channel>,
    generation: u64,
    /// The NMS process's session (`VolumeInfo.nms_session`), carried by every call.
    session: u64,
    /// The copy of the volume there (`VolumeInfo.incarnation`), carried by every call.
    incarnation: u32,
}

/// A busy NMS, its (accepted, persisted) lsns when seen so, and since when they stand.
type BusySeen = (Endpoint, (u64, u64), Instant);

struct Inner {
    opts: ClientOptions,
    conn: Mutex<Option<Conn>>,
    /// Where to go first on the next (re)connect: the last redirect or the last good NMS.
    preferred: Mutex<Endpoint>,
    reconnect: tokio::sync::Mutex<()>,
    /// An NMS whose journal replay met back-pressure, its lsns then, and since when they
    /// stand: kept across calls (each of which may end before `rpc_timeout` has passed),
    /// cleared by an attach that completes.
    busy_seen: Mutex<Option<BusySeen>>,
    /// Time spent in attach rounds that got nowhere since the last attach that completed
    /// (across calls: each may end before `rpc_timeout`): past `rpc_timeout`, attaches take
    /// the volume over at an NMS it moved on from (`AttachRequest.take_over`), where it
    /// went being out of reach. (Not the wall time since the first failure: a short blip
    /// long ago must not make an attach take a volume from a live owner.)
    unattached_for: Mutex<Duration>,
    generation: AtomicU64,
    block_size: Mutex<BlockSize>,
    seq: AtomicU64,
    journal: Mutex<Journal>,
    /// The highest epoch of the volume an attach reported: a copy at a lower one is stale
    /// (another NMS took the volume since), and one that serves it anyway (its PSS check
    /// failing) would answer reads older than writes acknowledged elsewhere.
    max_epoch: AtomicU64,
    /// The bytes of a journal replay's batch now: `replay_batch_bytes`, halved after a
    /// batch that got no reply within `rpc_timeout` (a slow link), doubled back after a
    /// quick one.
    replay_batch: AtomicUsize,
}

/// One volume, as a vehicle uses it. Cheap to clone; clones share the journal.
#[derive(Clone)]
pub struct VolumeClient {
    inner: Arc<Inner>,
}

enum Next {
    Redirect(Endpoint),
    Reconnect,
    Wait,
    Fail(ClientError),
}

/// Why an attach at one NMS failed: what to do next, and why (for the caller's error).
struct AttachFailed {
    next: Next,
    why: String,
    /// The TLS handshake failed (a retry would fail the same way).
    tls: bool,
    /// The NMS took the attach (it holds the volume now) and its journal replay met
    /// back-pressure: busy, not gone. Its accepted and persisted lsns at the attach, to
    /// tell whether it gets anywhere.
    busy_owner: Option<(u64, u64)>,
    /// No answer came from the NMS (no connection, or no attach reply in time): it is out
    /// of reach, as opposed to an NMS that answered with an error.
    out_of_reach: bool,
}

impl From<Next> for AttachFailed {
    fn from(next: Next) -> Self {
        let why = match &next {
            Next::Redirect(to) => format!("redirected to {to}"),
            Next::Fail(e) => e.to_string(),
            Next::Reconnect | Next::Wait => "the NMS did not take the attach".into(),
        };
        Self { next, why, tls: false, busy_owner: None, out_of_reach: false }
    }
}

/// Why a connection could not be made, as [`connect_failure`] tells it.
#[derive(Debug, Clone)]
pub struct ConnectFailure {
    /// The TLS handshake failed: the server's certificate is not trusted, or the server
    /// does not speak TLS (as opposed to nothing listening, or a timeout).
    pub tls: bool,
    /// The causes, outermost first (tonic's own text is only "transport error").
    pub text: String,
}

/// Why connecting failed (`e` from tonic's `connect`), naming a TLS handshake failure.
pub fn connect_failure(e: &(dyn std::error::Error + 'static)) -> ConnectFailure {
    use tokio_rustls::rustls;
    let mut chain: Vec<String> = Vec::new();
    let mut tls: Option<String> = None;
    let mut cur = Some(e);
    while let Some(x) = cur {
        // tokio-rustls hands a handshake's rustls error over as an io::Error's payload
        // (whose `source` skips it).
        let rustls_err = x.downcast_ref::<rustls::Error>().or_else(|| {
            x.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        });
        if let (Some(r), None) = (rustls_err, &tls) {
            let hint = match r {
                rustls::Error::InvalidMessage(_) => " (does the server speak TLS?)",
                rustls::Error::InvalidCertificate(c) => match c {
                    rustls::CertificateError::NotValidForName
                    | rustls::CertificateError::NotValidForNameContext { .. } => {
                        " (its certificate does not name the address dialled: issue it for the \
                         host or IP the node advertises)"
                    }
                    rustls::CertificateError::Expired
                    | rustls::CertificateError::ExpiredContext { .. }
                    | rustls::CertificateError::NotValidYet
                    | rustls::CertificateError::NotValidYetContext { .. } => {
                        " (its certificate is outside its validity period: check both clocks)"
                    }
                    _ => " (is its certificate signed by the road's CA this side trusts?)",
                },
                _ => "",
            };
            tls = Some(format!("TLS handshake failed: {r}{hint}"));
        }
        let text = x.to_string();
        if chain.last() != Some(&text) {
            chain.push(text);
        }
        cur = x.source();
    }
    match tls {
        Some(text) => ConnectFailure { tls: true, text },
        None => ConnectFailure { tls: false, text: chain.join(": ") },
    }
}

/// What caused a status made here from a transport error (one the server sent has no
/// source): its causes after the status's own message, as [`connect_failure`] tells them.
pub(crate) fn status_cause(s: &Status) -> Option<String> {
    let t = connect_failure(std::error::Error::source(s)?).text;
    Some(t.strip_prefix(&format!("{}: ", s.message())).map_or(t.clone(), str::to_owned))
}

fn classify(s: Status) -> (Next, String) {
    let text = format!("{}: {}", s.code(), s.message());
    let next = match fault_of(&s) {
        Some(Fault::Moved { to, .. }) => match Endpoint::parse(&to) {
            Ok(e) => Next::Redirect(e),
            Err(_) => Next::Reconnect,
        },
        Some(Fault::NotOwner { owner_address, .. }) => match Endpoint::parse(&owner_address) {
            Ok(e) => Next::Redirect(e),
            Err(_) => Next::Reconnect,
        },
        Some(Fault::LimitExceeded { .. }) => Next::Wait,
        _ => match s.code() {
            Code::Unauthenticated => Next::Fail(ClientError::Unauthenticated(s.message().into())),
            Code::NotFound => Next::Fail(ClientError::NotFound(s.message().into())),
            Code::InvalidArgument | Code::OutOfRange => {
                Next::Fail(ClientError::InvalidArgument(s.message().into()))
            }
            Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Cancelled
            | Code::Unknown
            | Code::Aborted
            | Code::Internal
            | Code::FailedPrecondition => Next::Reconnect,
            Code::ResourceExhausted => Next::Wait,
            _ => Next::Fail(ClientError::Status(s)),
        },
    };
    (next, text)
}

fn limit_error(s: &Status) -> Option<ClientError> {
    match fault_of(s) {
        Some(Fault::LimitExceeded { limit, unit, value, max }) => {
            Some(ClientError::LimitExceeded { limit, unit, value, max })
        }
        _ => None,
    }
}

/// Journal entries a call added and has not had acknowledged: dropped with the call (it
/// failed, or its caller gave up and dropped it mid-flight, as a timeout does), they leave
/// the journal, as a write that failed does; the call disarms it once they are acknowledged.
struct Unacked<'a> {
    journal: &'a Mutex<Journal>,
    seqs: Vec<u64>,
}

impl Unacked<'_> {
    fn disarm(mut self) {
        self.seqs.clear();
    }
}

impl Drop for Unacked<'_> {
    fn drop(&mut self) {
        if self.seqs.is_empty() {
            return;
        }
        // (A poisoned journal: nothing more to keep consistent.)
        if let Ok(mut j) = self.journal.lock() {
            for seq in &self.seqs {
                j.remove(*seq);
            }
        }
    }
}

impl VolumeClient {
    /// Attaches to the volume (creating it when `create_block_size` is set and it is absent).
    pub async fn open(opts: ClientOptions) -> Result<Self, ClientError> {
        let first = opts
            .nms
            .first()
            .cloned()
            .ok_or_else(|| ClientError::Options("no NMS address given".into()))?;
        RequestId::new(opts.client_id.clone(), 1)
            .map_err(|e| ClientError::Options(format!("client_id: {e}")))?;
        let me = Self {
            inner: Arc::new(Inner {
                preferred: Mutex::new(first),
                busy_seen: Mutex::new(None),
                unattached_for: Mutex::new(Duration::ZERO),
                replay_batch: AtomicUsize::new(opts.replay_batch_bytes.max(1)),
                opts,
                conn: Mutex::new(None),
                reconnect: tokio::sync::Mutex::new(()),
                generation: AtomicU64::new(0),
                block_size: Mutex::new(BlockSize::default()),
                // Below 2^62 + 1: room for 2^62 operations before the sequence could wrap.
                seq: AtomicU64::new((rand::random::<u64>() >> 2) + 1),
                journal: Mutex::new(Journal::default()),
                max_epoch: AtomicU64::new(0),
            }),
        };
        let deadline = Instant::now() + me.inner.opts.op_timeout;
        me.connection(deadline).await?;
        Ok(me)
    }

    pub fn block_size(&self) -> BlockSize {
        *self.inner.block_size.lock().expect("poisoned")
    }

    /// The NMS in use (or to be tried next).
    pub fn current_nms(&self) -> Endpoint {
        match &*self.inner.conn.lock().expect("poisoned") {
            Some(c) => c.endpoint.clone(),
            None => self.inner.preferred.lock().expect("poisoned").clone(),
        }
    }

    /// Attaches made so far (the first, then one per reconnect).
    pub fn attaches(&self) -> u64 {
        self.inner.generation.load(Ordering::Relaxed)
    }

    /// Bytes of accepted writes not yet known to be persisted.
    pub fn journal_bytes(&self) -> u64 {
        self.inner.journal.lock().expect("poisoned").bytes
    }

    /// The volume's credentials, for the NMS process with `session` and the copy of the
    /// volume `incarnation` there (0s: attaching).
    fn auth(&self, session: u64, incarnation: u32) -> Option<pb::VolumeAuth> {
        let mut a = to_volume_auth(&self.inner.opts.volume, &self.inner.opts.credential);
        a.nms_session = session;
        a.volume_incarnation = incarnation;
        Some(a)
    }

    fn prune(&self, persisted: Lsn, generation: u64) {
        self.inner.journal.lock().expect("poisoned").prune(persisted, generation);
    }

    /// Reads `len` bytes (to the end when `None`) at `offset`; `None` if never written.
    pub async fn read(
        &self,
        block: u64,
        offset: u32,
        len: Option<u32>,
    ) -> Result<Option<Vec<u8>>, ClientError> {
        let op = pb::ReadOp { block, offset, length: len.unwrap_or(0) };
        let (r, generation) = self
            .call(self.deadline(), |mut c, auth| {
                let req = pb::ReadRequest { auth, op: Some(op) };
                async move { c.read(req).await.map(|r| r.into_inner()) }
            })
            .await?;
        self.prune(Lsn(r.persisted_lsn), generation);
        Ok(r.found.then(|| Vec::from(r.data)))
    }

    /// Writes `data` at `offset` of `block`; returns once the NMS accepted it.
    pub async fn write(
        &self,
        block: u64,
        offset: u32,
        data: Vec<u8>,
    ) -> Result<WriteAck, ClientError> {
        self.journaled(JOp::Write { block, offset, data: data.into() }).await
    }

    /// Deletes a block.
    pub async fn delete(&self, block: u64) -> Result<WriteAck, ClientError> {
        self.journaled(JOp::Delete { block }).await
    }

    /// The most operations, and bytes of block data, one `StreamBatches` message carries
    /// (either way): `max_batch_ops`, and half of `max_message_size_bytes` (room for the
    /// fields around the data), so a batch of large blocks goes in several messages.
    fn batch_limits(&self) -> (usize, usize) {
        let o = &self.inner.opts;
        (o.max_batch_ops.max(1), (o.max_message_size_bytes / 2).max(1))
    }

    /// Reads whole blocks with one `StreamBatches` message each way per `max_batch_ops`
    /// blocks (one round trip for many blocks; fewer when they are large: see
    /// `batch_limits`); results in the order of `blocks`, `None` for a block never
    /// written. Retried, redirected and reconnected like `read`.
    pub async fn read_many(&self, blocks: &[u64]) -> Result<Vec<Option<Vec<u8>>>, ClientError> {
        let mut out = Vec::with_capacity(blocks.len());
        let (ops, bytes) = self.batch_limits();
        let block_bytes = self.block_size().bytes() as usize + BATCH_OP_OVERHEAD_BYTES;
        for chunk in runs(blocks, ops, bytes, |_| block_bytes) {
            let ops = chunk
                .iter()
                .map(|&block| {
                    pb::stream_request::Op::Read(pb::ReadOp { block, offset: 0, length: 0 })
                })
                .collect();
            let (results, generation) = self.batch(self.deadline(), ops).await?;
            let mut persisted = Lsn(0);
            for r in results {
                let pb::stream_reply::Result::Read(r) = r else {
                    return Err(ClientError::Status(Status::internal("a read got another result")));
                };
                persisted = persisted.max(Lsn(r.persisted_lsn));
                out.push(r.found.then(|| Vec::from(r.data)));
            }
            self.prune(persisted, generation);
        }
        Ok(out)
    }

    /// Writes whole or partial blocks (`(block, offset, data)`) with one `StreamBatches`
    /// message per `max_batch_ops` writes; returns once the NMS accepted every one, acks in
    /// order. Each write is journaled with its own request id, as with `write`, so a retry
    /// or a replay after an NMS crash applies each exactly once. On an error the writes of
    /// the failed batch may or may not have been accepted (as with a failed `write`);
    /// earlier batches were.
    pub async fn write_many(
        &self,
        writes: Vec<(u64, u32, Vec<u8>)>,
    ) -> Result<Vec<WriteAck>, ClientError> {
        // Every write checked before any is sent: one out of its block would fail its batch
        // with some of the batch applied and others not.
        let bs = u64::from(self.block_size().bytes());
        if let Some((block, offset, data)) =
            writes.iter().find(|(_, o, d)| u64::from(*o) + d.len() as u64 > bs)
        {
            return Err(ClientError::InvalidArgument(format!(
                "the write of {} bytes at offset {offset} of block {block} passes the block \
                 size ({bs} bytes): nothing was written",
                data.len()
            )));
        }
        let mut acks = Vec::with_capacity(writes.len());
        let ops: Vec<JOp> = writes
            .into_iter()
            .map(|(block, offset, data)| JOp::Write { block, offset, data: data.into() })
            .collect();
        let (max_ops, bytes) = self.batch_limits();
        for chunk in runs(&ops, max_ops, bytes, |op| Journal::size(op) as usize) {
            acks.extend(self.journaled_batch(chunk.to_vec()).await?);
        }
        Ok(acks)
    }

    /// Journals `ops`, sends them as one batch and records their lsns (see `journaled`).
    async fn journaled_batch(&self, ops: Vec<JOp>) -> Result<Vec<WriteAck>, ClientError> {
        let deadline = self.deadline();
        let seqs = self.journal_add(deadline, &ops).await?;
        let reqs: Vec<pb::stream_request::Op> = seqs
            .iter()
            .zip(ops)
            .map(|(&seq, op)| op.stream_op(&self.inner.opts.client_id, seq))
            .collect();
        let unacked = Unacked { journal: &self.inner.journal, seqs: seqs.clone() };
        loop {
            // Not acknowledged: the caller knows, and `unacked` takes them out of the journal.
            let (results, generation) = self.batch(deadline, reqs.clone()).await?;
            let mut j = self.inner.journal.lock().expect("poisoned");
            if generation != j.listed_for {
                // Acknowledged by an NMS left while in flight: again, on the new one.
                drop(j);
                self.resend_or_fail(deadline, &seqs)?;
                continue;
            }
            let mut acks = Vec::with_capacity(results.len());
            for (seq, r) in seqs.iter().zip(results) {
                let pb::stream_reply::Result::Write(w) = r else {
                    return Err(ClientError::Status(Status::internal(
                        "a write got another result",
                    )));
                };
                j.acked(*seq, Lsn(w.lsn), generation);
                acks.push(WriteAck {
                    lsn: Lsn(w.lsn),
                    persisted_lsn: Lsn(w.persisted_lsn),
                    version: w.version,
                });
            }
            if let Some(p) = acks.iter().map(|a| a.persisted_lsn).max() {
                j.prune(p, generation);
            }
            unacked.disarm();
            return Ok(acks);
        }
    }

    /// Before sending again writes an NMS acknowledged after the client left it: fails
    /// when the call's deadline has passed (the caller's `Unacked` then takes them out of the
    /// journal: the caller hears they may not have been applied).
    fn resend_or_fail(&self, deadline: Instant, seqs: &[u64]) -> Result<(), ClientError> {
        if Instant::now() < deadline {
            debug!(writes = seqs.len(), "acknowledged by an NMS left meanwhile: sending again");
            return Ok(());
        }
        Err(ClientError::Unavailable {
            timeout: self.inner.opts.op_timeout,
            last: "acknowledged by an NMS the client had left, with no time to send again".into(),
        })
    }

    /// Sends `ops` (tagged by their index) as one `StreamBatches` message, with the
    /// retries, redirects and reconnects of every call, and returns their results in
    /// order with the connection generation. An operation's error fails the whole call
    /// as that error (classified like a unary call's status, so a redirect resends the
    /// whole batch to the new NMS: writes carry request ids and apply once).
    async fn batch(
        &self,
        deadline: Instant,
        ops: Vec<pb::stream_request::Op>,
    ) -> Result<(Vec<pb::stream_reply::Result>, u64), ClientError> {
        let ops: Vec<pb::StreamRequest> = ops
            .into_iter()
            .enumerate()
            .map(|(i, op)| pb::StreamRequest { auth: None, tag: i as u64, op: Some(op) })
            .collect();
        self.call(deadline, |mut c, auth| {
            let batch = pb::StreamBatch { auth, ops: ops.clone() };
            async move { send_batch(&mut c, batch).await }
        })
        .await
    }

    /// Puts `ops` in the journal and returns their request ids (sequence numbers), taken
    /// with the room under one lock, so concurrent writers cannot pass
    /// `journal_limit_bytes` together, and an operation's id is never below one that went
    /// in before it. Past the limit it flushes first, within the caller's `deadline`, and
    /// fails if even that leaves too little room.
    async fn journal_add(&self, deadline: Instant, ops: &[JOp]) -> Result<Vec<u64>, ClientError> {
        let limit = self.inner.opts.journal_limit_bytes;
        let size: u64 = ops.iter().map(Journal::size).sum();
        let mut flushed = false;
        loop {
            {
                let mut j = self.inner.journal.lock().expect("poisoned");
                if j.bytes + size <= limit {
                    j.bytes += size;
                    let first = self.inner.seq.fetch_add(ops.len() as u64, Ordering::Relaxed);
                    let seqs: Vec<u64> = (first..first + ops.len() as u64).collect();
                    for (seq, op) in seqs.iter().zip(ops) {
                        j.entries.insert(*seq, JEntry::new(op.clone()));
                    }
                    return Ok(seqs);
                }
                if flushed {
                    return Err(ClientError::JournalFull { bytes: j.bytes, limit });
                }
            }
            self.flush_by(deadline).await?;
            flushed = true;
        }
    }

    async fn journaled(&self, op: JOp) -> Result<WriteAck, ClientError> {
        let deadline = self.deadline();
        let seq = self.journal_add(deadline, std::slice::from_ref(&op)).await?[0];
        let unacked = Unacked { journal: &self.inner.journal, seqs: vec![seq] };
        loop {
            // Not acknowledged: the caller knows, and `unacked` takes it out of the journal.
            let (ack, generation) = self.send_op(deadline, seq, &op).await?;
            let mut j = self.inner.journal.lock().expect("poisoned");
            if generation != j.listed_for {
                // The connection changed while this write was in flight, and the new
                // connection's replay listed the journal before this ack arrived: it was
                // not replayed there. Sent again now, before the caller hears of it (the
                // new NMS applies it, or, continuing the old one's lineage, answers
                // `duplicate`), so no later write of the caller's can come before it.
                drop(j);
                self.resend_or_fail(deadline, &[seq])?;
                continue;
            }
            j.acked(seq, ack.lsn, generation);
            j.prune(ack.persisted_lsn, generation);
            drop(j);
            unacked.disarm();
            return Ok(ack);
        }
    }

    async fn send_op(
        &self,
        deadline: Instant,
        seq: u64,
        op: &JOp,
    ) -> Result<(WriteAck, u64), ClientError> {
        let rid = Some(pb::RequestId { client_id: self.inner.opts.client_id.clone(), seq });
        let (r, generation) = match op {
            JOp::Write { block, offset, data } => {
                let op = pb::WriteOp {
                    block: *block,
                    offset: *offset,
                    data: data.clone(),
                    request_id: rid,
                };
                self.call(deadline, |mut c, auth| {
                    let req = pb::WriteRequest { auth, op: Some(op.clone()) };
                    async move { c.write(req).await.map(|r| r.into_inner()) }
                })
                .await?
            }
            JOp::Delete { block } => {
                let op = pb::DeleteOp { block: *block, request_id: rid };
                self.call(deadline, |mut c, auth| {
                    let req = pb::DeleteRequest { auth, op: Some(op.clone()) };
                    async move { c.delete(req).await.map(|r| r.into_inner()) }
                })
                .await?
            }
        };
        Ok((
            WriteAck { lsn: Lsn(r.lsn), persisted_lsn: Lsn(r.persisted_lsn), version: r.version },
            generation,
        ))
    }

    /// Returns once everything accepted before the call is persisted in the PSS.
    pub async fn flush(&self) -> Result<Lsn, ClientError> {
        self.flush_by(self.deadline()).await
    }

    async fn flush_by(&self, deadline: Instant) -> Result<Lsn, ClientError> {
        // Entries acknowledged on an older connection are not covered by this NMS's
        // watermark: send them here first.
        let conn = self.connection(deadline).await?;
        if self.has_stale(conn.generation) {
            let mut client = conn.client.clone();
            let replayed =
                self.replay(&mut client, conn.generation, conn.session, conn.incarnation, None);
            if replayed.await.is_err() {
                self.invalidate(conn.generation, None);
            }
        }
        // Up to the whole deadline: the NMS answers once its write-back reached the PSS.
        let (r, generation) = self
            .call_within(deadline, Duration::MAX, |mut c, auth| {
                let req = pb::FlushRequest { auth };
                async move { c.flush(req).await.map(|r| r.into_inner()) }
            })
            .await?;
        self.prune(Lsn(r.persisted_lsn), generation);
        if self.has_stale(generation) {
            // A reconnect raced with this flush; the next flush settles it.
            return Err(ClientError::Unavailable {
                timeout: self.inner.opts.op_timeout,
                last: "the connection changed during the flush".into(),
            });
        }
        Ok(Lsn(r.persisted_lsn))
    }

    fn has_stale(&self, generation: u64) -> bool {
        let j = self.inner.journal.lock().expect("poisoned");
        j.entries.values().any(|e| e.lsn.is_some() && e.generation != generation)
    }

    /// The volume's state on its NMS.
    pub async fn stat(&self) -> Result<pb::VolumeInfo, ClientError> {
        let (r, _) = self
            .call(self.deadline(), |mut c, auth| {
                let req = pb::StatRequest { auth };
                async move { c.stat(req).await.map(|r| r.into_inner()) }
            })
            .await?;
        r.info.ok_or_else(|| ClientError::Status(Status::internal("Stat reply without info")))
    }

    /// Stored blocks from `start_block`, at most `limit` (0: the server's page size).
    pub async fn list(&self, start_block: u64, limit: u32) -> Result<pb::ListReply, ClientError> {
        let (r, _) = self
            .call(self.deadline(), |mut c, auth| {
                let req = pb::ListRequest { auth, start_block, limit };
                async move { c.list(req).await.map(|r| r.into_inner()) }
            })
            .await?;
        Ok(r)
    }

    /// When a call started now must end (`op_timeout`).
    fn deadline(&self) -> Instant {
        Instant::now() + self.inner.opts.op_timeout
    }

    /// Runs one call with redirects, reconnects and backoff until `deadline`, each attempt
    /// within `rpc_timeout` (and the time left); `f` gets the connection's client and the
    /// volume's credentials for it. Returns the reply and the generation of the connection
    /// that gave it.
    async fn call<T, F, Fut>(&self, deadline: Instant, f: F) -> Result<(T, u64), ClientError>
    where
        F: FnMut(NmsClient<Channel>, Option<pb::VolumeAuth>) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        self.call_within(deadline, self.inner.opts.rpc_timeout, f).await
    }

    /// [`VolumeClient::call`] with each attempt given up to `attempt_max` (a flush may wait
    /// on the PSS longer than `rpc_timeout` while its NMS is alive; an NMS gone silent is
    /// found out by the connection's keepalive instead).
    async fn call_within<T, F, Fut>(
        &self,
        deadline: Instant,
        attempt_max: Duration,
        mut f: F,
    ) -> Result<(T, u64), ClientError>
    where
        F: FnMut(NmsClient<Channel>, Option<pb::VolumeAuth>) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let o = &self.inner.opts;
        let mut backoff = o.initial_backoff;
        loop {
            let conn = self.connection(deadline).await?;
            let attempt = attempt_max.min(deadline.saturating_duration_since(Instant::now()));
            let reply = f(conn.client.clone(), self.auth(conn.session, conn.incarnation));
            let last = match tokio::time::timeout(attempt, reply).await {
                Ok(Ok(t)) => return Ok((t, conn.generation)),
                Ok(Err(s)) => {
                    let limit = limit_error(&s);
                    let (next, text) = classify(s);
                    match next {
                        Next::Fail(e) => return Err(e),
                        Next::Redirect(to) => {
                            debug!(to = %to, "redirected");
                            self.invalidate(conn.generation, Some(to));
                            continue;
                        }
                        Next::Reconnect => self.invalidate(conn.generation, None),
                        Next::Wait => {
                            if Instant::now() + backoff > deadline {
                                return Err(limit.unwrap_or(ClientError::Unavailable {
                                    timeout: o.op_timeout,
                                    last: text,
                                }));
                            }
                        }
                    }
                    text
                }
                Err(_) => {
                    // Only a full `rpc_timeout` says the NMS is gone: a call that ran out of
                    // its own time (less left, or a longer call's deadline) does not drop a
                    // connection others use.
                    if attempt >= o.rpc_timeout && attempt_max <= o.rpc_timeout {
                        self.invalidate(conn.generation, None);
                    }
                    format!("no reply within {attempt:?} (rpc_timeout {:?})", o.rpc_timeout)
                }
            };
            if Instant::now() + backoff > deadline {
                return Err(ClientError::Unavailable { timeout: o.op_timeout, last });
            }
            debug!(error = %last, ?backoff, "retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(o.max_backoff);
        }
    }

    fn invalidate(&self, generation: u64, redirect: Option<Endpoint>) {
        let mut c = self.inner.conn.lock().expect("poisoned");
        if c.as_ref().is_some_and(|c| c.generation == generation) {
            *c = None;
            if let Some(to) = redirect {
                *self.inner.preferred.lock().expect("poisoned") = to;
            }
        }
    }

    /// The current connection, or a new one: attach, then replay the journal.
    async fn connection(&self, deadline: Instant) -> Result<Conn, ClientError> {
        if let Some(c) = self.inner.conn.lock().expect("poisoned").clone() {
            return Ok(c);
        }
        // In a task of its own: a caller that gives up (a timeout around its call, as the
        // FUSE mount's uploader has) does not cut an attach and its journal replay short,
        // which would start over at the next attach and, for a large journal, might never
        // get through.
        let me = self.clone();
        let task = tokio::spawn(
            async move { me.reconnect(deadline).await }.instrument(tracing::Span::current()),
        );
        // The call waits no longer than its deadline (a long journal's replay, each batch
        // within rpc_timeout, could take many times op_timeout); the attach goes on.
        match tokio::time::timeout_at(deadline.into(), task).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => Err(ClientError::Unavailable {
                timeout: self.inner.opts.op_timeout,
                last: format!("the reconnect task failed: {e}"),
            }),
            Err(_) => Err(ClientError::Unavailable {
                timeout: self.inner.opts.op_timeout,
                last: "attaching, and replaying the journal there, took longer than the \
                       call may; it goes on in the background"
                    .into(),
            }),
        }
    }

    /// Attaches somewhere (one reconnect at a time), then replays the journal there.
    async fn reconnect(&self, deadline: Instant) -> Result<Conn, ClientError> {
        let o = &self.inner.opts;
        // Another caller may be attaching (to an NMS that does not answer): wait for it
        // no longer than this call may take.
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(_g) = tokio::time::timeout(left, self.inner.reconnect.lock()).await else {
            return Err(ClientError::Unavailable {
                timeout: o.op_timeout,
                last: "another call's attach took the time left".into(),
            });
        };
        if let Some(c) = self.inner.conn.lock().expect("poisoned").clone() {
            return Ok(c);
        }
        let started = Instant::now();
        let before = *self.inner.unattached_for.lock().expect("poisoned");
        let r = self.attach_rounds(deadline, before, started).await;
        *self.inner.unattached_for.lock().expect("poisoned") = match r {
            Ok(_) => Duration::ZERO,
            Err(_) => before + started.elapsed(),
        };
        r
    }

    /// [`VolumeClient::reconnect`]'s rounds of attaches, `before` spent in rounds that got
    /// nowhere already, this one `started` then.
    async fn attach_rounds(
        &self,
        deadline: Instant,
        before: Duration,
        started: Instant,
    ) -> Result<Conn, ClientError> {
        let o = &self.inner.opts;
        let mut backoff = o.initial_backoff;
        let mut last = String::from("no attempt");
        loop {
            let preferred = self.inner.preferred.lock().expect("poisoned").clone();
            let mut candidates = vec![preferred];
            for e in &o.nms {
                if !candidates.contains(e) {
                    candidates.push(e.clone());
                }
            }
            let mut redirects = 0;
            let mut busy_backoff = o.initial_backoff;
            let mut i = 0;
            // The TLS handshake failures of this round, if every attempt was one.
            let mut tls_failures: Option<Vec<String>> = Some(Vec::new());
            while i < candidates.len() {
                let ep = candidates[i].clone();
                i += 1;
                // An NMS that says the volume moved on is followed (it went where the vehicle
                // was sent); once the vehicle has been without an NMS for `rpc_timeout`
                // (where it went is out of reach), one the volume moved on from takes it over.
                let take_over = before + started.elapsed() >= o.rpc_timeout;
                let failed = match self.attach(&ep, deadline, take_over).await {
                    Ok(conn) => {
                        *self.inner.busy_seen.lock().expect("poisoned") = None;
                        return Ok(conn);
                    }
                    Err(f) => f,
                };
                let busy_owner = failed.busy_owner;
                match failed.next {
                    Next::Redirect(to) if redirects < 4 => {
                        redirects += 1;
                        *self.inner.preferred.lock().expect("poisoned") = to.clone();
                        // Next, and once (it may be later in the list too).
                        if let Some(later) = candidates[i..].iter().position(|c| *c == to) {
                            candidates.remove(i + later);
                        }
                        candidates.insert(i, to);
                    }
                    // The NMS tried first is out of reach (no connection, no attach reply; not
                    // one answering with an error): the next one is tried first from now on,
                    // so a call no longer than `rpc_timeout` does not spend itself on it again.
                    // (The one after it in the list, wrapping: two that do not answer must not
                    // take turns being first while a third that would is never reached.)
                    Next::Reconnect if failed.out_of_reach && i == 1 => {
                        let after = o
                            .nms
                            .iter()
                            .position(|e| *e == ep)
                            .map(|p| &o.nms[(p + 1) % o.nms.len()]);
                        if let Some(next) = after.or(candidates.get(1)) {
                            *self.inner.preferred.lock().expect("poisoned") = next.clone();
                        }
                    }
                    Next::Fail(e) => return Err(e),
                    _ => {}
                }
                last = format!("attach at {ep} failed: {}", failed.why);
                match (&mut tls_failures, failed.tls) {
                    (Some(v), true) => v.push(format!("{ep}: {}", failed.why)),
                    _ => tls_failures = None,
                }
                if let Some(progress) = busy_owner {
                    // It holds the volume now and is busy, not gone: the same NMS again
                    // after a pause, until the call's deadline, while it gets anywhere (its
                    // lsns moved within `rpc_timeout`). Another one would take the volume
                    // from it (and the vehicle's writes from its cache back to the PSS
                    // first); one that gets nowhere (its PSS out of reach, say) is left.
                    // (Judged across calls: a call's `op_timeout` may be shorter.)
                    let now = Instant::now();
                    let stalled = match &mut *self.inner.busy_seen.lock().expect("poisoned") {
                        Some((e, p, since)) if *e == ep => {
                            if *p != progress {
                                (*p, *since) = (progress, now);
                            }
                            now.duration_since(*since) >= o.rpc_timeout
                        }
                        seen => {
                            *seen = Some((ep.clone(), progress, now));
                            false
                        }
                    };
                    if !stalled {
                        *self.inner.preferred.lock().expect("poisoned") = ep.clone();
                        if now + busy_backoff >= deadline {
                            return Err(ClientError::Unavailable { timeout: o.op_timeout, last });
                        }
                        debug!(nms = %ep, pause = ?busy_backoff, "journal replay met back-pressure: again here");
                        tokio::time::sleep(busy_backoff).await;
                        busy_backoff = (busy_backoff * 2).min(o.max_backoff);
                        i -= 1;
                        continue;
                    }
                    warn!(nms = %ep, "a busy NMS got nowhere within rpc_timeout: trying the others");
                }
                if Instant::now() >= deadline {
                    break;
                }
            }
            // A certificate the client does not trust, or a server not speaking TLS, does
            // not change in a retry's time: said now, not after op_timeout.
            if let Some(v) = tls_failures.filter(|v| !v.is_empty()) {
                return Err(ClientError::Tls(format!("no NMS could be reached: {}", v.join("; "))));
            }
            if Instant::now() + backoff > deadline {
                return Err(ClientError::Unavailable { timeout: o.op_timeout, last });
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(o.max_backoff);
        }
    }

    /// Connects to `ep`, attaches (or creates the volume) within `rpc_timeout` (and before
    /// `deadline`) and replays the journal there (each batch within `rpc_timeout`): an NMS
    /// that accepts connections and never answers holds the client up no longer than that,
    /// and the next one is tried.
    /// Over TLS when `tls` is set (redirects included, whatever their scheme; the TLS
    /// handshake gets up to `rpc_timeout`, the TCP connect `connect_timeout`).
    async fn attach(
        &self,
        ep: &Endpoint,
        deadline: Instant,
        take_over: bool,
    ) -> Result<Conn, AttachFailed> {
        let o = &self.inner.opts;
        // wayside's own HTTP/2 client connection: a unary call's HEADERS and DATA leave in
        // one write (TCP_NODELAY set), so the NMS reads and answers it in one turn.
        let left = deadline.saturating_duration_since(Instant::now());
        let (connect, handshake) = (o.connect_timeout.min(left), o.rpc_timeout.min(left));
        // An NMS is out of reach when it did not answer in a fair share of the time it
        // could have had: at least half of `rpc_timeout` (or of the whole call, if shorter).
        // One given only a call's last moments is not (it may be slower than that to answer
        // a live attach), and a connection refused at once is.
        let fair = o.rpc_timeout.min(o.op_timeout) / 2;
        let dialled = Instant::now();
        let channel =
            wayside_proto::client::connect_h2(ep, o.tls.as_ref(), connect, handshake, o.http2)
                .await
                .map_err(|e| match e {
                    wayside_proto::client::ConnectError::Tls(e) => {
                        AttachFailed::from(Next::Fail(ClientError::Tls(e.to_string())))
                    }
                    e => {
                        let f = connect_failure(&e);
                        debug!(nms = %ep, error = %f.text, "connect failed");
                        let given = dialled.elapsed();
                        AttachFailed {
                            next: Next::Reconnect,
                            why: f.text,
                            tls: f.tls,
                            busy_owner: None,
                            out_of_reach: given < connect || left >= fair,
                        }
                    }
                })?;
        let mut client = NmsClient::new(channel)
            .max_decoding_message_size(o.max_message_size_bytes)
            .max_encoding_message_size(o.max_message_size_bytes);
        let attempt = o.rpc_timeout.min(deadline.saturating_duration_since(Instant::now()));
        let reply = tokio::time::timeout(attempt, async {
            match o.create_block_size {
                Some(bs) => {
                    client
                        .create_volume(pb::CreateVolumeRequest {
                            auth: self.auth(0, 0),
                            block_size: bs.bytes(),
                            take_over,
                        })
                        .await
                }
                None => {
                    client
                        .attach(pb::AttachRequest {
                            auth: self.auth(0, 0),
                            client_id: o.client_id.clone(),
                            take_over,
                        })
                        .await
                }
            }
        })
        .await;
        let info = match reply {
            Ok(Ok(r)) => r.into_inner().info.unwrap_or_default(),
            Ok(Err(s)) => {
                // A status with a source was made here from a transport error (no NMS
                // answered): its causes say what happened. A plaintext client of an NMS
                // served over TLS ends here (the NMS drops it at the failed handshake).
                let transport = status_cause(&s);
                let out_of_reach = transport.is_some();
                // A create of an existing volume with another block size is an error to report.
                let (next, mut why) = classify(s);
                if let Some(t) = transport {
                    why = format!("{why}: {t}");
                    if o.tls.is_none() {
                        why.push_str(
                            " (if the NMS serves TLS, the client needs the road's CA to reach it)",
                        );
                    }
                }
                return Err(AttachFailed { next, why, tls: false, busy_owner: None, out_of_reach });
            }
            Err(_) => {
                debug!(nms = %ep, ?attempt, "no attach reply in time");
                return Err(AttachFailed {
                    next: Next::Reconnect,
                    why: format!("no attach reply within {attempt:?} (rpc_timeout)"),
                    tls: false,
                    busy_owner: None,
                    out_of_reach: attempt >= fair,
                });
            }
        };
        let seen = self.inner.max_epoch.load(Ordering::Acquire);
        if info.epoch > 0 && info.epoch < seen {
            warn!(nms = %ep, epoch = info.epoch, seen, "a stale copy of the volume: not attached");
            return Err(AttachFailed {
                next: Next::Reconnect,
                why: format!(
                    "{ep} serves the volume at epoch {}, older than epoch {seen} seen already \
                     (a stale copy: another NMS took the volume since)",
                    info.epoch
                ),
                tls: false,
                busy_owner: None,
                out_of_reach: false,
            });
        }
        self.inner.max_epoch.fetch_max(info.epoch, Ordering::AcqRel);
        if let Ok(bs) = BlockSize::new(info.block_size) {
            *self.inner.block_size.lock().expect("poisoned") = bs;
        }
        let generation = self.inner.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let (session, incarnation) = (info.nms_session, info.incarnation);
        let progress = (info.accepted_lsn, info.persisted_lsn);
        self.replay(&mut client, generation, session, incarnation, Some(&info)).await.map_err(
            |next| {
                let busy_owner = matches!(next, Next::Wait).then_some(progress);
                AttachFailed { busy_owner, ..AttachFailed::from(next) }
            },
        )?;
        let conn = Conn { endpoint: ep.clone(), client, generation, session, incarnation };
        *self.inner.conn.lock().expect("poisoned") = Some(conn.clone());
        *self.inner.preferred.lock().expect("poisoned") = ep.clone();
        info!(nms = %ep, epoch = info.epoch, persisted = info.persisted_lsn, "attached");
        Ok(conn)
    }

    /// A replay batch of `entries` entries and `sent` bytes, cut at `limit`, took `took`
    /// (`None`: no reply within `rpc_timeout`): the size of the next ones (see
    /// `ClientOptions::replay_batch_bytes`). Only a batch near the limit tells that a
    /// larger one would cross in time; one of a single entry, that no smaller batch
    /// would carry, changes nothing (halving on it took the size down to a byte, one
    /// entry a round trip from then on, after a few timeouts of a slow NMS).
    fn replay_batch_took(&self, took: Option<Duration>, limit: usize, entries: usize, sent: usize) {
        let o = &self.inner.opts;
        let next = match took {
            None if entries <= 1 => return,
            None => (limit.min(sent) / 2).max(1),
            Some(t) if t < o.rpc_timeout / 4 && sent >= limit / 2 => {
                limit.saturating_mul(2).min(o.replay_batch_bytes.max(1))
            }
            Some(_) => return,
        };
        let was = self.inner.replay_batch.swap(next, Ordering::Relaxed);
        if next < was {
            warn!(
                bytes = next,
                "a journal replay batch got no reply in time: smaller ones from now on"
            );
        }
    }

    /// Sends every accepted journal entry not yet from `generation`, in order, with its
    /// original request id; the replies' lsns belong to `generation`. In `StreamBatches`
    /// messages of up to `max_batch_ops` (taken in order, a block's operations never
    /// overtaking each other), each within `rpc_timeout`:
    /// a 64 MiB journal of 4 KiB writes is 64 round trips, not 16k. Not bounded by the
    /// caller's `op_timeout`: a replay cut short would start over at the next attach and
    /// might never finish; one that makes progress is let finish.
    async fn replay(
        &self,
        client: &mut NmsClient<Channel>,
        generation: u64,
        session: u64,
        incarnation: u32,
        attached: Option<&pb::VolumeInfo>,
    ) -> Result<(), Next> {
        let todo: Vec<(u64, JOp)> = {
            let mut j = self.inner.journal.lock().expect("poisoned");
            // A newer connection took the list already (a flush's replay over a connection
            // left meanwhile): its entries are that one's, not to be sent to this one and
            // recorded with this one's lsns.
            if j.listed_for > generation {
                return Err(Next::Reconnect);
            }
            // An entry acknowledged on an older connection from now on is not in this
            // list: its caller sends it again (see `journaled`).
            j.listed_for = generation;
            if let Some(info) = attached {
                j.held_by(generation, info);
            }
            j.to_replay(generation)
        };
        if todo.is_empty() {
            self.inner.journal.lock().expect("poisoned").replayed(generation);
            return Ok(());
        }
        let rpc_timeout = self.inner.opts.rpc_timeout;
        let record = |seq: u64, lsn: u64| {
            let mut j = self.inner.journal.lock().expect("poisoned");
            // A newer attach listed the journal meanwhile: the entries are its now.
            if j.listed_for == generation {
                j.acked(seq, Lsn(lsn), generation);
            }
        };
        // Every entry listed is sent (what this copy holds by lineage left the list in
        // `held_by`): a duplicate answered at the lsn it had is no sign that the later ones
        // are held too. A copy loaded anew numbers from the same persisted watermark as
        // the lost one did, and may hold the first entries from a replay cut short before
        // (taking the rest for held once lost them).
        let (mut applied, mut dup) = (0u64, 0u64);
        // Smaller batches than a call's: each must cross within rpc_timeout, on whatever
        // link the vehicle has now (8 MiB on a slow radio never would, and the attach
        // would start over for ever); ~240 writes of 4 KiB still go in one by default
        // (each counted with its journal entry's overhead), fewer after a batch that
        // took too long (the same batch sent again would time out again, for ever).
        let (max_ops, bytes) = self.batch_limits();
        let bytes = bytes.min(self.inner.replay_batch.load(Ordering::Relaxed));
        for chunk in runs(&todo, max_ops, bytes, |(_, op)| Journal::size(op) as usize) {
            let ops = chunk
                .iter()
                .enumerate()
                .map(|(i, (seq, op))| {
                    let op = op.clone().stream_op(&self.inner.opts.client_id, *seq);
                    pb::StreamRequest { auth: None, tag: i as u64, op: Some(op) }
                })
                .collect();
            let batch = pb::StreamBatch { auth: self.auth(session, incarnation), ops };
            let size = chunk.iter().map(|(_, op)| Journal::size(op) as usize).sum();
            let sent_at = Instant::now();
            let sent = tokio::time::timeout(rpc_timeout, send_batch(client, batch)).await;
            let took = sent.is_ok().then(|| sent_at.elapsed());
            self.replay_batch_took(took, bytes, chunk.len(), size);
            let results = replayed(sent, rpc_timeout)?;
            for ((seq, _), r) in chunk.iter().zip(results) {
                let pb::stream_reply::Result::Write(w) = r else {
                    return Err(Next::Reconnect);
                };
                if w.duplicate {
                    dup += 1;
                } else {
                    applied += 1;
                }
                record(*seq, w.lsn);
            }
        }
        self.inner.journal.lock().expect("poisoned").replayed(generation);
        info!(applied, duplicates = dup, "journal replayed");
        Ok(())
    }
}

/// What a batched operation adds to a message besides its block data, at most, in bytes
/// (its tag, block number, request id and field keys).
const BATCH_OP_OVERHEAD_BYTES: usize = 128;

/// `items` in order, in runs of at most `max_ops` and, but for a run's first item, at
/// most `max_bytes` by `size`.
fn runs<T>(items: &[T], max_ops: usize, max_bytes: usize, size: impl Fn(&T) -> usize) -> Vec<&[T]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, item) in items.iter().enumerate() {
        let n = size(item);
        if i > start && (i - start >= max_ops || bytes + n > max_bytes) {
            out.push(&items[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += n;
    }
    if start < items.len() {
        out.push(&items[start..]);
    }
    out
}

/// Sends `batch` as one `StreamBatches` message and returns its results in the order of its
/// operations (tagged by index); an operation's error fails the whole call as that error.
async fn send_batch(
    c: &mut NmsClient<Channel>,
    batch: pb::StreamBatch,
) -> Result<Vec<pb::stream_reply::Result>, Status> {
    let n = batch.ops.len();
    let mut replies = c.stream_batches(futures::stream::iter([batch])).await?.into_inner();
    let mut out: Vec<Option<pb::stream_reply::Result>> = vec![None; n];
    let mut got = 0;
    while got < n {
        let m = replies
            .message()
            .await?
            .ok_or_else(|| Status::unavailable("the batch stream ended early"))?;
        for r in m.results {
            let slot = usize::try_from(r.tag).ok().and_then(|i| out.get_mut(i));
            match (r.result, slot) {
                (Some(pb::stream_reply::Result::Error(e)), _) => {
                    return Err(wayside_proto::error::status_of_stream_error(e));
                }
                (Some(x), Some(slot @ None)) => {
                    *slot = Some(x);
                    got += 1;
                }
                _ => return Err(Status::internal("a batch result with a bad tag")),
            }
        }
    }
    Ok(out.into_iter().flatten().collect())
}

/// A replay step's reply, or what the replay does next (logged): the status's classification,
/// or a reconnect when no reply came within `rpc_timeout`.
fn replayed<T>(
    sent: Result<Result<T, Status>, tokio::time::error::Elapsed>,
    rpc_timeout: Duration,
) -> Result<T, Next> {
    match sent {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(s)) => {
            warn!(error = %s.message(), "journal replay interrupted");
            Err(classify(s).0)
        }
        Err(_) => {
            warn!(?rpc_timeout, "journal replay interrupted: no reply in time");
            Err(Next::Reconnect)
        }
    }
}

#[cfg(test)]
mod tests {

    /// Two tasks' writes to one block, applied the other way round from their request
    /// ids: a replay repeats the order they were applied in (lsn), so the block ends as
    /// it was read back (the later write), not as the request ids would have it.
    #[test]
    fn a_replay_follows_the_order_writes_were_applied_in() {
        let mut j = Journal::default();
        let write = |d: &'static [u8]| JOp::Write { block: 5, offset: 0, data: d.into() };
        for (seq, data, lsn) in [(100, &b"X"[..], 11), (101, b"Y", 10), (102, b"Z", 12)] {
            let mut e = JEntry::new(write(data));
            e.acked(Lsn(lsn), 1, None, &[]);
            j.entries.insert(seq, e);
        }
        // Not accepted yet: its caller sends it.
        j.entries.insert(103, JEntry::new(write(b"W")));
        let order: Vec<u64> = j.to_replay(2).into_iter().map(|(seq, _)| seq).collect();
        assert_eq!(order, [101, 100, 102]);
        assert!(j.to_replay(1).is_empty(), "the generation that holds them replays nothing");
        // A replay to generation 2 cut short after its first entry (101, now at lsn 1 of
        // generation 2): resumed on generation 3, the entries still go in the order they
        // were first applied, not the replayed one last.
        j.acked(101, Lsn(1), 2);
        let order: Vec<u64> = j.to_replay(3).into_iter().map(|(seq, _)| seq).collect();
        assert_eq!(order, [101, 100, 102]);
        let order: Vec<u64> = j.to_replay(2).into_iter().map(|(seq, _)| seq).collect();
        assert_eq!(order, [100, 102], "generation 2 holds 101");
    }

    /// A watermark answered on a connection left since a newer one listed the journal
    /// prunes nothing: that listing's replay re-applied an older entry (e1) over a later one
    /// (e2) the old NMS had persisted, so e2 must still be replayed after it.
    #[test]
    fn a_watermark_from_a_connection_left_since_prunes_nothing() {
        let mut j = Journal::default();
        let write = |d: &'static [u8]| JOp::Write { block: 5, offset: 0, data: d.into() };
        let (mut e1, mut e2) = (JEntry::new(write(b"1")), JEntry::new(write(b"2")));
        e1.acked(Lsn(5), 1, None, &[]);
        e2.acked(Lsn(6), 1, None, &[]);
        j.bytes = Journal::size(&e1.op) + Journal::size(&e2.op);
        j.entries.insert(10, e1);
        j.entries.insert(11, e2);
        // Generation 2 listed the journal and replayed e1 (cut short before e2).
        j.listed_for = 2;
        j.acked(10, Lsn(1), 2);
        // The old NMS (generation 1) answers a read late: persisted through 6.
        j.prune(Lsn(6), 1);
        assert!(j.entries.contains_key(&11), "e2 must still be replayed after e1");
        let order: Vec<u64> = j.to_replay(3).into_iter().map(|(seq, _)| seq).collect();
        assert_eq!(order, [10, 11]);
        // The current connection's own watermark prunes what it covers.
        j.prune(Lsn(1), 2);
        assert!(!j.entries.contains_key(&10));
    }

    /// Generation `g` attaches to the copy `info` describes and lists the journal for its
    /// replay (as `VolumeClient::replay` does): the entries to send, in order.
    fn attach(j: &mut Journal, g: u64, info: &pb::VolumeInfo) -> Vec<u64> {
        j.listed_for = g;
        j.held_by(g, info);
        j.to_replay(g).into_iter().map(|(seq, _)| seq).collect()
    }

    fn write(data: &'static [u8]) -> JEntry {
        JEntry::new(JOp::Write { block: 5, offset: 0, data: data.into() })
    }

    /// A write whose reply was lost (applied at S at lsn 10) while another task's write
    /// of its block was acknowledged there at lsn 11, answered as a duplicate by the copy a
    /// move made from S: a replay elsewhere applies it before the later write, as S did
    /// (kept at its generation, it went last and rewound the block).
    #[test]
    fn a_duplicate_answered_by_a_later_copy_keeps_its_place() {
        const S: (u64, u32) = (10, 1);
        const T: (u64, u32) = (30, 2);
        let mut j = Journal::default();
        assert!(attach(&mut j, 1, &info(S.0, S.1, 0)).is_empty());
        j.replayed(1);
        j.entries.insert(1, write(b"w1"));
        j.entries.insert(2, write(b"A"));
        j.acked(2, Lsn(11), 1);
        let mut moved = info(T.0, T.1, 0);
        (moved.predecessor_session, moved.predecessor_incarnation) = S;
        moved.predecessor_through_lsn = 11;
        assert!(attach(&mut j, 2, &moved).is_empty(), "T holds A");
        j.replayed(2);
        // w1 sent again on generation 2: T holds it (S's id travelled) at lsn 10.
        j.acked(1, Lsn(10), 2);
        // Both lost with T: a copy loaded anew gets w1 first, as S applied them.
        assert_eq!(attach(&mut j, 3, &info(50, 1, 0)), [1, 2]);
        // Cut short there after w1 (at its lsn 1): the next replay keeps the order.
        j.acked(1, Lsn(1), 3);
        assert_eq!(attach(&mut j, 4, &info(60, 1, 0)), [1, 2]);
        // Through there (w1 at 1, A at 2): a write taken afterwards goes after both.
        j.acked(1, Lsn(1), 4);
        j.acked(2, Lsn(2), 4);
        j.replayed(4);
        j.entries.insert(3, write(b"B"));
        j.acked(3, Lsn(3), 4);
        assert_eq!(attach(&mut j, 5, &info(70, 1, 0)), [1, 2, 3]);
    }

    /// A move's target Y switched (numbering on from the source X's lsn 100) and took write
    /// Q of a block at lsn 101; X, not told of the switch, took the volume back and applied
    /// P of the same block, waiting in its pause, at lsn 101 too (P's reply came on a
    /// connection already left). At X the vehicle replays Q (lsn 102) and sends P again (a
    /// duplicate at 101): X holds P, then Q, and a replay elsewhere must too. (Q kept its
    /// place from Y, before P's, and the block went back to P.)
    #[test]
    fn a_source_that_took_the_volume_back_orders_what_it_applied() {
        const X: (u64, u32) = (10, 1);
        const Y: (u64, u32) = (30, 2);
        let mut j = Journal::default();
        assert!(attach(&mut j, 1, &info(X.0, X.1, 0)).is_empty());
        j.replayed(1);
        j.entries.insert(1, write(b"P"));
        let mut moved = info(Y.0, Y.1, 0);
        (moved.predecessor_session, moved.predecessor_incarnation) = X;
        moved.predecessor_through_lsn = 100;
        assert!(attach(&mut j, 2, &moved).is_empty());
        j.replayed(2);
        j.entries.insert(2, write(b"Q"));
        j.acked(2, Lsn(101), 2);
        assert_eq!(attach(&mut j, 3, &info(X.0, X.1, 0)), [2], "X never had Q");
        j.acked(2, Lsn(102), 3);
        j.replayed(3);
        j.acked(1, Lsn(101), 3);
        assert_eq!(attach(&mut j, 4, &info(50, 1, 0)), [1, 2], "P, then Q, as X applied them");
    }

    /// A write whose reply was lost (applied at X at lsn 50), answered as a duplicate by
    /// the copy Y a move made from X (through lsn 100): X holds it too, so with the move
    /// taken back to X it is not sent there again (X may have forgotten its id since, and
    /// would apply it anew over a later write of its block).
    #[test]
    fn a_duplicate_at_a_moved_copy_is_held_by_the_copies_it_continues() {
        const X: (u64, u32) = (10, 1);
        const Y: (u64, u32) = (30, 2);
        let mut j = Journal::default();
        assert!(attach(&mut j, 1, &info(X.0, X.1, 0)).is_empty());
        j.entries.insert(1, write(b"R"));
        j.entries.insert(2, write(b"H"));
        j.acked(2, Lsn(60), 1);
        let mut moved = info(Y.0, Y.1, 0);
        (moved.predecessor_session, moved.predecessor_incarnation) = X;
        moved.predecessor_through_lsn = 100;
        assert!(attach(&mut j, 2, &moved).is_empty(), "Y holds H");
        j.acked(1, Lsn(50), 2);
        assert_eq!(j.entries[&1].copies, [X, Y]);
        // Applied anew at Y (past the switch): X never had it.
        j.entries.insert(3, write(b"N"));
        j.acked(3, Lsn(101), 2);
        assert_eq!(j.entries[&3].copies, [Y]);
        assert_eq!(attach(&mut j, 3, &info(X.0, X.1, 0)), [3], "X holds R and H");
    }

    #[test]
    fn batches_are_cut_by_count_and_by_bytes() {
        let items: Vec<usize> = vec![5, 5, 5, 5, 20, 1, 1];
        let cut = |ops, bytes| -> Vec<Vec<usize>> {
            runs(&items, ops, bytes, |n| *n).into_iter().map(<[usize]>::to_vec).collect()
        };
        assert_eq!(cut(3, 1000), [vec![5, 5, 5], vec![5, 20, 1], vec![1]]);
        // 12 bytes: an item larger than that goes alone.
        assert_eq!(cut(100, 12), [vec![5, 5], vec![5, 5], vec![20], vec![1, 1]]);
        assert!(runs(&[] as &[usize], 3, 10, |n| *n).is_empty());
    }
    use super::*;

    fn entry(lsn: u64, generation: u64, copy: (u64, u32)) -> JEntry {
        let mut e = JEntry::new(JOp::Delete { block: lsn });
        e.acked(Lsn(lsn), generation, Some(copy), &[]);
        e
    }

    fn info(session: u64, incarnation: u32, persisted: u64) -> pb::VolumeInfo {
        pb::VolumeInfo {
            nms_session: session,
            incarnation,
            persisted_lsn: persisted,
            ..Default::default()
        }
    }

    /// Entries are taken as held by the copy that accepted them, and by the copy a move
    /// made from it up to the switch's lsn (and then by any copy that held them); a later
    /// one, or another copy's, is replayed.
    #[test]
    fn entries_a_copy_holds_need_no_replay_and_the_persisted_leave() {
        const S: (u64, u32) = (10, 1); // copy 1 in process 10
        const OTHER: (u64, u32) = (20, 4);
        const T: (u64, u32) = (30, 2);
        let mut j = Journal::default();
        for (seq, lsn, generation, copy) in
            [(1, 5, 1, S), (2, 6, 1, S), (3, 7, 1, S), (4, 3, 2, OTHER)]
        {
            j.entries.insert(seq, entry(lsn, generation, copy));
            j.bytes += JOURNAL_ENTRY_OVERHEAD_BYTES;
        }
        j.lineages.insert(1, Lineage { copy: S, ..Default::default() });
        j.lineages.insert(2, Lineage { copy: OTHER, ..Default::default() });
        // Back on S, its watermark at 5: the first leaves, the next two are held.
        j.held_by(3, &info(S.0, S.1, 5));
        let gens: Vec<u64> = j.entries.values().map(|e| e.generation).collect();
        assert_eq!(gens, [3, 3, 2], "seq 2 and 3 held, seq 4 (another copy's) replayed");
        assert_eq!(j.bytes, 3 * JOURNAL_ENTRY_OVERHEAD_BYTES);

        // A move made T from S through lsn 6: seq 2 is held there, seq 3 (lsn 7, past the
        // switch) is not; nothing persisted there yet.
        let mut j2 = Journal::default();
        for (seq, lsn) in [(2, 6), (3, 7)] {
            j2.entries.insert(seq, entry(lsn, 1, S));
        }
        j2.lineages.insert(1, Lineage { copy: S, ..Default::default() });
        let mut moved = info(T.0, T.1, 0);
        (moved.predecessor_session, moved.predecessor_incarnation) = S;
        moved.predecessor_through_lsn = 6;
        j2.held_by(5, &moved);
        let gens: Vec<u64> = j2.entries.values().map(|e| e.generation).collect();
        assert_eq!(gens, [5, 1]);
        // Back on S (the move taken back): both are S's, held there still.
        j2.held_by(6, &info(S.0, S.1, 0));
        let gens: Vec<u64> = j2.entries.values().map(|e| e.generation).collect();
        assert_eq!(gens, [6, 6]);
        // A copy made from T (two moves on) holds seq 2 (held at T) up to its switch.
        let mut next = info(40, 1, 0);
        (next.predecessor_session, next.predecessor_incarnation) = T;
        next.predecessor_through_lsn = 7;
        j2.held_by(7, &next);
        let gens: Vec<u64> = j2.entries.values().map(|e| e.generation).collect();
        assert_eq!(gens, [7, 6], "seq 3 was never at T");
        // Generations no entry names any more are forgotten.
        j2.entries.remove(&3);
        j2.held_by(8, &info(40, 1, 0));
        assert_eq!(j2.lineages.keys().copied().collect::<HashSet<_>>(), HashSet::from([8]));
        // A copy list stays bounded.
        let mut e = entry(1, 1, S);
        for i in 0..10 {
            e.held_at((100 + i, 1));
        }
        assert_eq!(e.copies.len(), MAX_COPIES_PER_ENTRY);
        assert_eq!(e.copies.last(), Some(&(109, 1)));
        // Applied anew at another lsn: only the copy that did it holds it.
        e.acked(Lsn(9), 2, Some(T), &[]);
        assert_eq!(e.copies, [T]);
    }
}
