//! The durable Raft log: entries, hard state and the compaction point, kept in memory
//! for raft-rs (through [`raft::Storage`]) and on disk in append-only segment files
//! (`raft-NNNNNNNNNNNNNNNN.log`) that this module `fdatasync`s itself.
//!
//! File format: each segment is a sequence of records `[kind u8][len u32 LE][crc32 u32
//! LE][payload]`; the log is the segments' records in order. Replay applies them in order;
//! a torn or corrupt tail of the last segment (a crash during a write that was never
//! synced, hence never acknowledged) ends the replay and is cut off. A segment is closed
//! at `log_segment_bytes`: it is fsynced before the next one is started, and the next one
//! starts with the compaction point and the hard state, so a compaction deletes the
//! segments holding only compacted entries (nothing is rewritten). A segment that follows
//! deleted ones may start with entries past its own leading compaction point (a gap):
//! the compaction record that allowed the deletion comes later in the log and closes it.
//!
//! **Failure contract:** [`DurableLog::sync`] returns only after everything appended so
//! far is on disk; an I/O error is returned to the caller, which must stop the node
//! (a Raft node that cannot persist must not keep voting or acknowledging).

use protobuf::Message as _;
use raft::prelude::*;
use raft::{GetEntriesContext, RaftState, StorageError};
use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

const KIND_ENTRIES: u8 = 1;
const KIND_HARD_STATE: u8 = 2;
const KIND_SNAPSHOT: u8 = 3;
const HEADER_BYTES: usize = 9;
/// The single log file of PSS versions before segments; opened as the first segment.
const LEGACY_LOG_FILE: &str = "raft.log";

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("raft-{seq:016}.log"))
}

/// The sequence number of a segment file name, if it is one.
fn segment_seq(name: &str) -> Option<u64> {
    name.strip_prefix("raft-")?.strip_suffix(".log")?.parse().ok()
}

/// An error of the durable log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("raft log {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("raft log {path}: record {kind} does not decode: {reason}")]
    Decode { path: PathBuf, kind: u8, reason: String },
}

/// Where a record of entries sits in the log: its first and last entry that still count
/// (a later append may replace a suffix) and the record's position.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Span {
    first: u64,
    last: u64,
    /// The segment holding the record.
    seg: u64,
    /// Offset of the record (its header) in the segment.
    offset: u64,
    /// Header and payload bytes.
    len: u64,
}

/// The view raft-rs reads: the compaction point (snapshot metadata), the entries after
/// it, the hard state and the conf state. The newest entries are in memory; older ones
/// that are applied are dropped from memory past [`LogCore::trim`]'s byte limit and read
/// back from the log file on demand (a follower that lags), so a node's memory does not
/// grow with the log until the next compaction (fresh memory is zeroed by the kernel:
/// ~a quarter of a loaded node's CPU when the whole log stayed in memory).
pub struct LogCore {
    pub snapshot: SnapshotMetadata,
    /// Entries `mem_first ..= last_index()`.
    entries: std::collections::VecDeque<Entry>,
    mem_first: u64,
    /// Entry data bytes in `entries`.
    mem_bytes: u64,
    /// Every record in the file that holds entries still in the log, in index order.
    spans: Vec<Span>,
    /// Terms of the entries only on disk (`first_index() .. mem_first`): runs of
    /// `(first index, term)`, ascending.
    terms: Vec<(u64, u64)>,
    /// The segment files, by sequence number, for reading entries back.
    files: std::collections::BTreeMap<u64, (Arc<File>, PathBuf)>,
    pub hard_state: HardState,
    /// The membership as of `conf_index` (set by [`LogCore::set_conf_state`] as changes are
    /// applied, and by a snapshot at or past it).
    conf_state: ConfState,
    /// The index `conf_state` is as of: a snapshot older than it (our own compaction
    /// installs a checkpoint taken before a membership change applied while it was
    /// written) must not roll it back.
    conf_index: u64,
    /// Log record bytes read back from the segment files (entries no longer in memory).
    disk_read_bytes: std::sync::atomic::AtomicU64,
}

impl Default for LogCore {
    fn default() -> Self {
        Self {
            snapshot: SnapshotMetadata::default(),
            entries: std::collections::VecDeque::new(),
            mem_first: 1,
            mem_bytes: 0,
            spans: Vec::new(),
            terms: Vec::new(),
            files: std::collections::BTreeMap::new(),
            hard_state: HardState::default(),
            conf_state: ConfState::default(),
            conf_index: 0,
            disk_read_bytes: Default::default(),
        }
    }
}

fn store_error(e: impl std::fmt::Display) -> raft::Error {
    raft::Error::Store(StorageError::Other(e.to_string().into()))
}

impl LogCore {
    pub fn first_index(&self) -> u64 {
        self.snapshot.index + 1
    }

    pub fn last_index(&self) -> u64 {
        self.mem_first + self.entries.len() as u64 - 1
    }

    /// The membership as of the newest applied change or installed snapshot.
    pub fn conf_state(&self) -> &ConfState {
        &self.conf_state
    }

    /// Sets the membership to `cs`, as of (applied) index `index`.
    pub fn set_conf_state(&mut self, cs: ConfState, index: u64) {
        self.conf_state = cs;
        self.conf_index = index;
    }

    /// Entry data bytes held in memory.
    pub fn memory_bytes(&self) -> u64 {
        self.mem_bytes
    }

    /// Log record bytes read back from the segment files so far.
    pub fn disk_read_bytes(&self) -> u64 {
        self.disk_read_bytes.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn term(&self, idx: u64) -> raft::Result<u64> {
        if idx == self.snapshot.index {
            return Ok(self.snapshot.term);
        }
        if idx < self.first_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if idx > self.last_index() {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        if idx >= self.mem_first {
            return Ok(
                self.entries[usize::try_from(idx - self.mem_first).unwrap_or(usize::MAX)].term
            );
        }
        let run = self.terms.partition_point(|&(first, _)| first <= idx);
        run.checked_sub(1)
            .map(|r| self.terms[r].1)
            .ok_or_else(|| store_error(format!("no term known for on-disk entry {idx}")))
    }

    /// Entries `low..high` (at least one, then up to `max` bytes).
    fn entries(&self, low: u64, high: u64, max: u64) -> raft::Result<Vec<Entry>> {
        let mut out = Vec::new();
        let mut size = 0u64;
        let mut take = |e: Entry, out: &mut Vec<Entry>| {
            size += u64::from(e.compute_size());
            if !out.is_empty() && size > max {
                return false;
            }
            out.push(e);
            true
        };
        if low < self.mem_first {
            for e in self.read_disk(low, high.min(self.mem_first), max)? {
                if !take(e, &mut out) {
                    return Ok(out);
                }
            }
        }
        let lo = low.max(self.mem_first);
        if lo < high {
            let skip = usize::try_from(lo - self.mem_first).unwrap_or(usize::MAX);
            let n = usize::try_from(high - lo).unwrap_or(usize::MAX);
            for e in self.entries.iter().skip(skip).take(n) {
                if !take(e.clone(), &mut out) {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// Reads entries `low..high` (all on disk) back from the log's segments, from `low` on
    /// and record by record until past `max` bytes of entries: a follower far behind asks
    /// for a range of hundreds of MiB, 4 MiB at a time, and reading all of it for each
    /// (on the Raft thread) held the leader up past its followers' election timeout.
    fn read_disk(&self, low: u64, high: u64, max: u64) -> raft::Result<Vec<Entry>> {
        use std::os::unix::fs::FileExt as _;
        let mut out: Vec<Entry> = Vec::new();
        let mut size = 0u64;
        let from = self.spans.partition_point(|s| s.last < low);
        for span in self.spans[from..].iter().take_while(|s| s.first < high) {
            if size > max {
                break;
            }
            let Some((file, path)) = self.files.get(&span.seg) else {
                return Err(store_error(format!(
                    "entries {}..={} are in log segment {}, which is not open",
                    span.first, span.last, span.seg
                )));
            };
            let mut buf = vec![0u8; usize::try_from(span.len).unwrap_or(usize::MAX)];
            file.read_exact_at(&mut buf, span.offset)
                .map_err(|e| store_error(format!("reading {}: {e}", path.display())))?;
            self.disk_read_bytes.fetch_add(span.len, std::sync::atomic::Ordering::Relaxed);
            let (kind, payload) = parse_record_at(&buf).ok_or_else(|| {
                store_error(format!("{}: record at {} is corrupt", path.display(), span.offset))
            })?;
            if kind != KIND_ENTRIES {
                return Err(store_error(format!(
                    "{}: no entries at {}",
                    path.display(),
                    span.offset
                )));
            }
            let ents = decode_entries(payload).map_err(store_error)?;
            for e in ents.into_iter().filter(|e| {
                e.index >= low.max(span.first) && e.index < high && e.index <= span.last
            }) {
                size += u64::from(e.compute_size());
                out.push(e);
            }
        }
        // Whole, or a prefix cut past `max`; from `low`, with no index missing.
        let whole = out.len() as u64 == high - low;
        let cut = size > max && !out.is_empty();
        let in_order = out.iter().zip(low..).all(|(e, i)| e.index == i);
        if !(whole || cut) || !in_order {
            return Err(store_error(format!(
                "raft log: entries {low}..{high} not all found on disk ({} read)",
                out.len()
            )));
        }
        Ok(out)
    }

    /// Appends entries whose record was written to segment `seg` at `(offset, len)` (a
    /// suffix that may replace a conflicting tail).
    fn append(&mut self, ents: &[Entry], (seg, offset, len): (u64, u64, u64)) {
        let Some(first) = ents.first() else { return };
        // Entries at or below the compaction point are already in the snapshot.
        let skip = self.first_index().saturating_sub(first.index);
        let ents = &ents[usize::try_from(skip).unwrap_or(usize::MAX).min(ents.len())..];
        let (Some(first), Some(last)) = (ents.first(), ents.last()) else { return };
        let k = first.index;
        // From `k` on, this record is the log: earlier records end before it...
        while self.spans.last().is_some_and(|s| s.first >= k) {
            self.spans.pop();
        }
        if let Some(s) = self.spans.last_mut() {
            s.last = s.last.min(k - 1);
        }
        self.spans.push(Span { first: k, last: last.index, seg, offset, len });
        // ...and so is memory. (Only applied entries leave memory, and applied entries
        // are committed, so a conflict below `mem_first` cannot happen; if it did, the
        // replaced entries are simply gone from both.)
        if k < self.mem_first {
            self.entries.clear();
            self.mem_bytes = 0;
            self.mem_first = k;
            self.terms.retain(|&(i, _)| i < k);
        } else {
            let keep = usize::try_from(k - self.mem_first).unwrap_or(usize::MAX);
            while self.entries.len() > keep {
                if let Some(e) = self.entries.pop_back() {
                    self.mem_bytes -= e.data.len() as u64;
                }
            }
        }
        for e in ents {
            self.mem_bytes += e.data.len() as u64;
            self.entries.push_back(e.clone());
        }
    }

    /// Drops applied entries (index `<= applied`) from memory, oldest first, until at
    /// most `keep_bytes` of entry data is held; they stay readable from the file.
    pub fn trim(&mut self, applied: u64, keep_bytes: u64) {
        while self.mem_bytes > keep_bytes {
            match self.entries.front() {
                Some(e) if e.index <= applied && !self.files.is_empty() => {}
                _ => break,
            }
            let Some(e) = self.entries.pop_front() else { break };
            self.mem_bytes -= e.data.len() as u64;
            if self.terms.last().is_none_or(|&(_, t)| t != e.term) {
                self.terms.push((e.index, e.term));
            }
            self.mem_first += 1;
        }
    }

    /// Replay only: the log continues at `index`, past its end (the segments holding
    /// the entries in between were deleted by a compaction recorded later in the log).
    fn restart_at(&mut self, index: u64) {
        self.entries.clear();
        self.mem_bytes = 0;
        self.mem_first = index;
        self.spans.clear();
        self.terms.clear();
    }

    fn apply_snapshot(&mut self, meta: SnapshotMetadata) {
        // A snapshot inside our log (our own compaction) keeps the suffix after it; one
        // past our log replaces it entirely. (Decided by indices alone, the same at replay
        // as when it was installed: a replay that restarted past a deleted segment knows
        // no term for the snapshot's index.)
        let keep = meta.index + 1 >= self.first_index() && meta.index < self.last_index();
        if keep {
            while self.entries.front().is_some_and(|e| e.index <= meta.index) {
                if let Some(e) = self.entries.pop_front() {
                    self.mem_bytes -= e.data.len() as u64;
                }
            }
            self.mem_first = self.mem_first.max(meta.index + 1);
            self.spans.retain(|s| s.last > meta.index);
            // The run holding `meta.index + 1` and the later ones.
            let from = self.terms.partition_point(|&(i, _)| i <= meta.index + 1).saturating_sub(1);
            self.terms.drain(..from);
        } else {
            self.entries.clear();
            self.mem_bytes = 0;
            self.mem_first = meta.index + 1;
            self.spans.clear();
            self.terms.clear();
        }
        self.hard_state.commit = self.hard_state.commit.max(meta.index);
        if meta.term > self.hard_state.term {
            // A vote is for one term: kept with a later term, it would claim (once
            // persisted here) a vote this node never cast in that term.
            self.hard_state.term = meta.term;
            self.hard_state.vote = 0;
        }
        // Our own compaction installs a checkpoint of an earlier applied index: a membership
        // change applied after it (while it was written) stays. (A snapshot from the leader
        // is always past our commit index, hence past any change applied here.)
        if meta.index >= self.conf_index {
            self.set_conf_state(meta.get_conf_state().clone(), meta.index);
        }
        self.snapshot = meta;
    }
}

/// The kind and payload of the record at the start of `buf`, if it is whole and its
/// checksum matches.
fn parse_record_at(buf: &[u8]) -> Option<(u8, &[u8])> {
    let head = buf.get(..HEADER_BYTES)?;
    let len = u32::from_le_bytes(head[1..5].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(head[5..9].try_into().ok()?);
    let payload = buf.get(HEADER_BYTES..HEADER_BYTES + len)?;
    (crc32fast::hash(payload) == crc).then_some((head[0], payload))
}

/// raft-rs's view of the log (shared with the node loop, which writes it).
#[derive(Clone, Default)]
pub struct RaftStorage {
    pub core: Arc<RwLock<LogCore>>,
    /// Set when raft-rs asked for a snapshot the current one cannot serve (a peer
    /// missing from its membership); the node loop then takes a fresh one.
    pub want_snapshot: Arc<std::sync::atomic::AtomicBool>,
}

impl RaftStorage {
    pub fn read(&self) -> std::sync::RwLockReadGuard<'_, LogCore> {
        self.core.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
    pub fn write(&self) -> std::sync::RwLockWriteGuard<'_, LogCore> {
        self.core.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl raft::Storage for RaftStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let core = self.read();
        Ok(RaftState::new(core.hard_state.clone(), core.conf_state().clone()))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let core = self.read();
        if low < core.first_index() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > core.last_index() + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        core.entries(low, high, max_size.into().unwrap_or(u64::MAX))
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        self.read().term(idx)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.read().first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.read().last_index())
    }

    /// The latest snapshot is the compaction point; its data lives in a snapshot file
    /// that the transport streams (see `transport`), so the message carries none.
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let core = self.read();
        let cs = core.snapshot.get_conf_state();
        // raft-rs refuses a snapshot whose membership lacks the receiver (a node just
        // added), so such a peer needs a snapshot taken after its addition.
        let knows_peer = cs.voters.iter().chain(&cs.learners).any(|id| *id == to);
        if core.snapshot.index < request_index || core.snapshot.index == 0 || !knows_peer {
            self.want_snapshot.store(true, std::sync::atomic::Ordering::Relaxed);
            return Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable));
        }
        let mut snap = Snapshot::default();
        snap.set_metadata(core.snapshot.clone());
        Ok(snap)
    }
}

/// The on-disk half: append-only segment files of records.
pub struct DurableLog {
    dir: PathBuf,
    /// The segment being appended to (around the page cache where possible), and its
    /// sequence number.
    file: crate::direct::Appender,
    seq: u64,
    /// Append with `O_DIRECT` (see `direct`).
    direct: bool,
    /// Sequence numbers of every segment on disk (the active one last).
    segments: std::collections::VecDeque<u64>,
    /// Bytes appended since the last sync.
    dirty: bool,
    /// A segment is closed and the next started once it holds this many bytes.
    segment_bytes: u64,
    /// The record being written, kept between appends: a Ready's entries are often
    /// hundreds of KiB, and a fresh buffer of that size each time is fresh pages the
    /// kernel has to fault in and zero.
    buf: Vec<u8>,
}

/// Largest record buffer kept between appends, in bytes (a larger one is freed after use).
const KEEP_BUFFER_BYTES: usize = 32 << 20;

/// Entry bytes per log record (a larger entry still goes whole, in a record of its own).
const RECORD_BYTES: usize = 4 << 20;

/// A compaction that leaves no entry in the active segment starts a new one (so the old
/// one can go) once the active one holds at least this many bytes.
const ROLL_ON_COMPACT_BYTES: u64 = 1 << 20;

impl DurableLog {
    fn io(&self, source: std::io::Error) -> LogError {
        LogError::Io { path: segment_path(&self.dir, self.seq), source }
    }

    /// Opens (or creates) the log in `dir` and replays it into a [`LogCore`]; segments
    /// are closed at `segment_bytes`; `direct`: append with `O_DIRECT` where the file
    /// system allows. Also returns whether the log had any record.
    pub fn open(
        dir: &Path,
        segment_bytes: u64,
        direct: bool,
    ) -> Result<(Self, LogCore, bool), LogError> {
        let dir_io = |source| LogError::Io { path: dir.to_owned(), source };
        let mut seqs: Vec<u64> = std::fs::read_dir(dir)
            .map_err(dir_io)?
            .filter_map(|e| e.ok()?.file_name().to_str().and_then(segment_seq))
            .collect();
        seqs.sort_unstable();
        let legacy = dir.join(LEGACY_LOG_FILE);
        if seqs.is_empty() && legacy.exists() {
            // A log of the single-file format is the first segment of this one.
            std::fs::rename(&legacy, segment_path(dir, 1)).map_err(dir_io)?;
            sync_dir(dir).map_err(dir_io)?;
            seqs.push(1);
        }
        let mut core = LogCore::default();
        let mut any = false;
        // A replayed segment starting past the log's end (the segments before it were
        // deleted by a compaction): the last such index, which the newest compaction must
        // reach (then so does every earlier gap's).
        let mut gap: Option<u64> = None;
        let mut active_len = 0u64;
        for (n, &seq) in seqs.iter().enumerate() {
            let path = segment_path(dir, seq);
            let io = |source| LogError::Io { path: path.clone(), source };
            let bytes = std::fs::read(&path).map_err(io)?;
            let mut pos = 0usize;
            while let Some((kind, payload)) = parse_record_at(&bytes[pos..]) {
                if kind == 0 {
                    // Zeros: the padding of a direct write past the last record.
                    break;
                }
                let end = pos + HEADER_BYTES + payload.len();
                let decode = |reason: String| LogError::Decode { path: path.clone(), kind, reason };
                match kind {
                    KIND_ENTRIES => {
                        let ents = decode_entries(payload).map_err(decode)?;
                        if let Some(first) = ents.first() {
                            if first.index > core.last_index() + 1 {
                                gap = Some(gap.map_or(first.index, |g| g.max(first.index)));
                                core.restart_at(first.index);
                            }
                        }
                        core.append(&ents, (seq, pos as u64, (end - pos) as u64));
                    }
                    KIND_HARD_STATE => {
                        core.hard_state = HardState::parse_from_bytes(payload)
                            .map_err(|e| decode(e.to_string()))?;
                    }
                    KIND_SNAPSHOT => {
                        let meta = SnapshotMetadata::parse_from_bytes(payload)
                            .map_err(|e| decode(e.to_string()))?;
                        core.apply_snapshot(meta);
                    }
                    other => return Err(decode(format!("unknown record kind {other}"))),
                }
                any = true;
                pos = end;
            }
            let last = n + 1 == seqs.len();
            let padding = bytes[pos..].iter().all(|&b| b == 0);
            if pos < bytes.len() {
                if !last && !padding {
                    // Every segment but the last was fsynced whole before the next began.
                    return Err(LogError::Decode {
                        path,
                        kind: 0,
                        reason: format!(
                            "corrupt record at byte {pos} of {} in a closed segment",
                            bytes.len()
                        ),
                    });
                }
                if !padding {
                    // The unsynced tail of a crash: never acknowledged, so dropping it is safe.
                    tracing::warn!(
                        segment = seq,
                        valid_bytes = pos,
                        file_bytes = bytes.len(),
                        "cutting torn raft log tail"
                    );
                }
                let f = OpenOptions::new().write(true).open(&path).map_err(io)?;
                f.set_len(pos as u64).map_err(io)?;
                f.sync_all().map_err(io)?;
            }
            core.files.insert(seq, (Arc::new(File::open(&path).map_err(io)?), path.clone()));
            if last {
                active_len = pos as u64;
            }
        }
        if let Some(g) = gap {
            if core.snapshot.index + 1 < g {
                return Err(LogError::Decode {
                    path: dir.to_owned(),
                    kind: KIND_ENTRIES,
                    reason: format!(
                        "entries before {g} are missing (their segments are gone) but the \
                         log is compacted only to {}",
                        core.snapshot.index
                    ),
                });
            }
        }
        let seq = match seqs.last() {
            Some(&s) => s,
            None => {
                let path = segment_path(dir, 1);
                File::create(&path)
                    .map_err(|source| LogError::Io { path: path.clone(), source })?;
                sync_dir(dir).map_err(dir_io)?;
                let f = File::open(&path)
                    .map_err(|source| LogError::Io { path: path.clone(), source })?;
                core.files.insert(1, (Arc::new(f), path));
                seqs.push(1);
                1
            }
        };
        let path = segment_path(dir, seq);
        let file = crate::direct::Appender::open(&path, active_len, direct)
            .map_err(|source| LogError::Io { path: path.clone(), source })?;
        let log = Self {
            dir: dir.to_owned(),
            file,
            seq,
            direct,
            segments: seqs.into_iter().collect(),
            dirty: false,
            segment_bytes: segment_bytes.max(1),
            buf: Vec::new(),
        };
        Ok((log, core, any))
    }

    /// Segment files on disk and their total bytes.
    pub fn segments(&self) -> (usize, u64) {
        let bytes = self
            .segments
            .iter()
            .filter_map(|&s| std::fs::metadata(segment_path(&self.dir, s)).ok())
            .map(|m| m.len())
            .sum();
        (self.segments.len(), bytes)
    }

    fn record(
        &mut self,
        core: &RaftStorage,
        kind: u8,
        payload: &[u8],
        durable: bool,
    ) -> Result<(), LogError> {
        self.record_with(core, kind, |buf| buf.extend_from_slice(payload), durable).map(|_| ())
    }

    /// Writes one record whose payload `fill` appends to the buffer (encoded in place:
    /// no intermediate copy of the payload). A `durable` record makes the next
    /// [`DurableLog::begin_sync`] fsync; any other one rides along with the next fsync
    /// something durable asks for (or is lost in a crash, which it may be).
    /// Returns where the record went (segment, offset, bytes).
    fn record_with(
        &mut self,
        core: &RaftStorage,
        kind: u8,
        fill: impl FnOnce(&mut Vec<u8>),
        durable: bool,
    ) -> Result<(u64, u64, u64), LogError> {
        if self.file.len() >= self.segment_bytes {
            self.roll(core)?;
        }
        self.write_record(kind, fill, durable)
    }

    fn write_record(
        &mut self,
        kind: u8,
        fill: impl FnOnce(&mut Vec<u8>),
        durable: bool,
    ) -> Result<(u64, u64, u64), LogError> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        buf.push(kind);
        buf.extend_from_slice(&[0; HEADER_BYTES - 1]);
        fill(&mut buf);
        let len = u32::try_from(buf.len() - HEADER_BYTES).unwrap_or(u32::MAX);
        let crc = crc32fast::hash(&buf[HEADER_BYTES..]);
        buf[1..5].copy_from_slice(&len.to_le_bytes());
        buf[5..9].copy_from_slice(&crc.to_le_bytes());
        let at = (self.seq, self.file.len(), buf.len() as u64);
        let written = self.file.append(&buf);
        if buf.capacity() <= KEEP_BUFFER_BYTES {
            self.buf = buf;
        }
        // (On an error the node stops: the file's length no longer matters.)
        written.map_err(|e| self.io(e))?;
        self.dirty |= durable;
        Ok(at)
    }

    /// Closes the active segment (fsynced whole, so only the last segment can ever have
    /// a torn tail) and starts the next one with the compaction point and hard state.
    fn roll(&mut self, core: &RaftStorage) -> Result<(), LogError> {
        self.file.sync_data().map_err(|e| self.io(e))?;
        // Closed for good: no padding past its last record (the size is synced with the
        // next segment's directory entry).
        self.file.trim().map_err(|e| self.io(e))?;
        let seq = self.seq + 1;
        let path = segment_path(&self.dir, seq);
        let io = |source| LogError::Io { path: path.clone(), source };
        OpenOptions::new().write(true).create_new(true).open(&path).map_err(io)?;
        self.file.sync_data().map_err(|e| self.io(e))?;
        sync_dir(&self.dir).map_err(io)?;
        let reader = File::open(&path).map_err(io)?;
        self.file = crate::direct::Appender::open(&path, 0, self.direct).map_err(io)?;
        self.seq = seq;
        self.segments.push_back(seq);
        let (snapshot, hard_state) = {
            let mut w = core.write();
            w.files.insert(seq, (Arc::new(reader), path));
            (w.snapshot.write_to_bytes(), w.hard_state.write_to_bytes())
        };
        let enc = |r: protobuf::ProtobufResult<Vec<u8>>| r.unwrap_or_default();
        let (snapshot, hard_state) = (enc(snapshot), enc(hard_state));
        self.write_record(KIND_SNAPSHOT, |b| b.extend_from_slice(&snapshot), true)?;
        self.write_record(KIND_HARD_STATE, |b| b.extend_from_slice(&hard_state), true)?;
        tracing::debug!(segment = seq, "raft log segment started");
        Ok(())
    }

    /// Appends entries (a suffix that may overwrite a conflicting tail).
    /// A Ready's entries go out as records of about [`RECORD_BYTES`] each, so the record
    /// buffer stays small enough to be reused (a Ready of write-backs is tens of MiB, and
    /// a fresh buffer that size was a fault and a zeroed page per 4 KiB).
    pub fn append(&mut self, core: &RaftStorage, ents: &[Entry]) -> Result<(), LogError> {
        let mut rest = ents;
        while !rest.is_empty() {
            let mut bytes = 0usize;
            let n = rest
                .iter()
                .take_while(|e| {
                    let first = bytes == 0;
                    bytes += 4 + e.compute_size() as usize;
                    first || bytes <= RECORD_BYTES
                })
                .count();
            let (chunk, later) = rest.split_at(n);
            let at =
                self.record_with(core, KIND_ENTRIES, |buf| encode_entries_into(buf, chunk), true)?;
            core.write().append(chunk, at);
            rest = later;
        }
        Ok(())
    }

    /// Records the hard state. A change of term or vote must be durable before any
    /// message that depends on it leaves (the next sync covers it); a change of the commit
    /// index alone need not be (a restarted node relearns it from the leader, and recovery
    /// raises it to the applied index), so it costs no fsync of its own.
    pub fn set_hard_state(&mut self, core: &RaftStorage, hs: &HardState) -> Result<(), LogError> {
        let durable = {
            let old = &core.read().hard_state;
            old.term != hs.term || old.vote != hs.vote
        };
        let payload = hs.write_to_bytes().unwrap_or_default();
        self.record(core, KIND_HARD_STATE, &payload, durable)?;
        core.write().hard_state = hs.clone();
        Ok(())
    }

    /// Records a new compaction point: a snapshot at `meta.index` whose data file is
    /// already durable. The record is fsynced, then every segment before the first one
    /// still holding an entry past the point is deleted (nothing is rewritten).
    pub fn install_snapshot(
        &mut self,
        core: &RaftStorage,
        meta: SnapshotMetadata,
    ) -> Result<(), LogError> {
        let payload = meta.write_to_bytes().unwrap_or_default();
        core.write().apply_snapshot(meta);
        self.record(core, KIND_SNAPSHOT, &payload, true)?;
        // The hard state beside it: the segments deleted below may hold its only record
        // (a segment a roll began, whose leading records a crash cut, starts with none),
        // and a node that forgot its vote could vote twice in one term.
        let hard_state = core.read().hard_state.write_to_bytes().unwrap_or_default();
        self.record(core, KIND_HARD_STATE, &hard_state, true)?;
        self.sync()?;
        let mut keep_from = core.read().spans.iter().map(|s| s.seg).min();
        if keep_from.is_none() && self.file.len() >= ROLL_ON_COMPACT_BYTES {
            // Nothing left in the active segment either: start a fresh one so it can go.
            self.roll(core)?;
            self.sync()?;
            keep_from = Some(self.seq);
        }
        let keep_from = keep_from.unwrap_or(self.seq).min(self.seq);
        let mut removed = 0;
        while self.segments.front().is_some_and(|&s| s < keep_from) {
            let Some(seq) = self.segments.pop_front() else { break };
            core.write().files.remove(&seq);
            let path = segment_path(&self.dir, seq);
            std::fs::remove_file(&path).map_err(|source| LogError::Io { path, source })?;
            removed += 1;
        }
        if removed > 0 {
            sync_dir(&self.dir).map_err(|e| self.io(e))?;
            tracing::debug!(removed, first_kept = keep_from, "raft log segments deleted");
        }
        Ok(())
    }

    /// Makes everything appended so far durable (one `fdatasync` for the whole Ready).
    pub fn sync(&mut self) -> Result<(), LogError> {
        match self.begin_sync()? {
            Some(pending) => pending.wait(),
            None => Ok(()),
        }
    }

    /// Starts making everything appended so far durable; [`PendingSync::wait`] (which
    /// may run on another thread) returns once it is. `None`: nothing to sync. Nothing
    /// appended before this call may be acknowledged before `wait` returned `Ok`, and an
    /// error there must stop the node (the log is then in an unknown state).
    pub fn begin_sync(&mut self) -> Result<Option<PendingSync>, LogError> {
        if !self.dirty {
            return Ok(None);
        }
        let file = self.file.try_clone_file().map_err(|e| self.io(e))?;
        self.dirty = false;
        Ok(Some(PendingSync { file, path: segment_path(&self.dir, self.seq) }))
    }
}

/// An `fdatasync` of the log that can run beside other work (see
/// [`DurableLog::begin_sync`]).
pub struct PendingSync {
    file: File,
    path: PathBuf,
}

impl PendingSync {
    pub fn wait(self) -> Result<(), LogError> {
        self.file.sync_data().map_err(|source| LogError::Io { path: self.path, source })
    }
}

/// `fsync` of a directory, so a rename or a new file in it survives a crash.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Bytes an unprivileged writer may still take on the file system holding `dir`.
pub fn free_disk_bytes(dir: &Path) -> std::io::Result<u64> {
    fs2::available_space(dir)
}

/// Appends each entry as `length u32 | protobuf`, encoded straight into `out`.
fn encode_entries_into(out: &mut Vec<u8>, ents: &[Entry]) {
    // One allocation for the whole record (a Ready of write-backs is tens of MiB: growing
    // by doubling copied it several times, into fresh pages each time).
    let total: usize = ents.iter().map(|e| 4 + e.compute_size() as usize).sum();
    out.reserve(total);
    for e in ents {
        let len = e.get_cached_size();
        out.extend_from_slice(&len.to_le_bytes());
        let at = out.len();
        if e.write_to_vec(out).is_err() {
            // Cannot happen for a well-formed entry; keep the framing consistent anyway.
            out.truncate(at);
            out.resize(at + len as usize, 0);
        }
    }
}

fn decode_entries(mut payload: &[u8]) -> Result<Vec<Entry>, String> {
    let mut out = Vec::new();
    while !payload.is_empty() {
        if payload.len() < 4 {
            return Err("truncated entry length".into());
        }
        let len = u32::from_le_bytes(payload[..4].try_into().unwrap_or_default()) as usize;
        let body = payload.get(4..4 + len).ok_or("truncated entry")?;
        out.push(Entry::parse_from_bytes(body).map_err(|e| e.to_string())?);
        payload = &payload[4 + len..];
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Opens with segments large enough that these tests' logs fit in one.
    fn open(dir: &Path) -> Result<(DurableLog, LogCore, bool), LogError> {
        DurableLog::open(dir, 64 << 20, true)
    }

    fn entry(index: u64, term: u64) -> Entry {
        Entry { index, term, data: vec![index as u8; 10].into(), ..Default::default() }
    }

    #[test]
    fn replay_restores_entries_overwrites_hard_state_and_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let store = RaftStorage::default();
        {
            let (mut log, core, existed) = open(dir.path()).unwrap();
            assert!(!existed);
            assert_eq!(core.last_index(), 0);
            log.append(&store, &(1..=5).map(|i| entry(i, 1)).collect::<Vec<_>>()).unwrap();
            // A new leader overwrites 4..: the conflicting tail goes.
            log.append(&store, &[entry(4, 2)]).unwrap();
            let hs = HardState { term: 2, commit: 3, ..Default::default() };
            log.set_hard_state(&store, &hs).unwrap();
            log.sync().unwrap();
        }
        let (mut log, core, existed) = open(dir.path()).unwrap();
        assert!(existed);
        assert_eq!(core.last_index(), 4);
        assert_eq!(core.term(4).unwrap(), 2);
        assert_eq!(core.hard_state.commit, 3);
        let store = RaftStorage { core: Arc::new(RwLock::new(core)), ..Default::default() };
        let meta = SnapshotMetadata { index: 3, term: 1, ..Default::default() };
        log.install_snapshot(&store, meta).unwrap();
        drop(log);
        let (_log, core, _) = open(dir.path()).unwrap();
        assert_eq!(core.first_index(), 4);
        assert_eq!(core.last_index(), 4);
        assert_eq!(core.term(3).unwrap(), 1);
        assert!(core.term(2).is_err());
    }

    /// A crash cut the leading records (compaction point, hard state) of the segment a
    /// roll had just begun; a compaction then deletes every older segment, the only ones
    /// holding the term and vote. They must survive it: a node that forgot its vote could
    /// vote twice in one term.
    #[test]
    fn a_compaction_keeps_the_hard_state_a_cut_segment_lost() {
        let dir = tempfile::tempdir().unwrap();
        let small = |d: &Path| DurableLog::open(d, 4096, false);
        let last = {
            let (mut log, core, _) = small(dir.path()).unwrap();
            let store = RaftStorage { core: Arc::new(RwLock::new(core)), ..Default::default() };
            let hs = HardState { term: 3, vote: 2, commit: 0, ..Default::default() };
            log.set_hard_state(&store, &hs).unwrap();
            for i in 1..=12 {
                log.append(&store, &[entry_t(i, 3, 1000)]).unwrap();
            }
            log.sync().unwrap();
            let last = store.read().last_index();
            last
        };
        let mut seqs: Vec<u64> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| segment_seq(e.unwrap().file_name().to_str()?))
            .collect();
        seqs.sort_unstable();
        assert!(seqs.len() >= 2, "rolled: {seqs:?}");
        // The newest segment's records never reached the disk.
        let newest = segment_path(dir.path(), *seqs.last().unwrap());
        std::fs::OpenOptions::new().write(true).open(&newest).unwrap().set_len(0).unwrap();
        {
            let (mut log, core, _) = small(dir.path()).unwrap();
            assert_eq!((core.hard_state.term, core.hard_state.vote), (3, 2));
            let store = RaftStorage { core: Arc::new(RwLock::new(core)), ..Default::default() };
            let index = store.read().last_index();
            assert!(index <= last);
            let meta = SnapshotMetadata { index, term: 3, ..Default::default() };
            log.install_snapshot(&store, meta).unwrap();
        }
        let (_log, core, _) = small(dir.path()).unwrap();
        assert_eq!((core.hard_state.term, core.hard_state.vote), (3, 2), "term and vote kept");
    }

    #[test]
    fn only_term_vote_and_entries_cost_an_fsync_a_commit_index_rides_along() {
        let dir = tempfile::tempdir().unwrap();
        let store = RaftStorage::default();
        let (mut log, _, _) = open(dir.path()).unwrap();
        let mut hs = HardState { term: 1, vote: 1, commit: 0, ..Default::default() };
        log.set_hard_state(&store, &hs).unwrap();
        assert!(log.begin_sync().unwrap().is_some(), "a new term and vote are synced");
        hs.commit = 5;
        log.set_hard_state(&store, &hs).unwrap();
        assert!(log.begin_sync().unwrap().is_none(), "a commit index alone is not");
        log.append(&store, &[entry(1, 1)]).unwrap();
        assert!(log.begin_sync().unwrap().is_some(), "entries are");
        hs.vote = 2;
        log.set_hard_state(&store, &hs).unwrap();
        log.begin_sync().unwrap().expect("a new vote is synced").wait().unwrap();
        drop(log);
        // The commit index still reached the file (with the later fsync).
        let (_, core, _) = open(dir.path()).unwrap();
        assert_eq!((core.hard_state.commit, core.hard_state.vote), (5, 2));
    }

    fn entry_t(index: u64, term: u64, bytes: usize) -> Entry {
        Entry { index, term, data: vec![index as u8; bytes].into(), ..Default::default() }
    }

    fn read(store: &RaftStorage, low: u64, high: u64) -> Vec<(u64, u64)> {
        raft::Storage::entries(store, low, high, None, GetEntriesContext::empty(false))
            .unwrap()
            .into_iter()
            .map(|e| {
                assert_eq!(e.data.len(), 100, "entry {} keeps its data", e.index);
                assert!(e.data.iter().all(|b| *b == e.index as u8));
                (e.index, e.term)
            })
            .collect()
    }

    #[test]
    fn applied_entries_leave_memory_and_are_read_back_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, core, _) = open(dir.path()).unwrap();
        let store = RaftStorage { core: Arc::new(RwLock::new(core)), ..Default::default() };
        // Two records (1..=6, 7..=10), terms 1 then 2 from 5 on.
        log.append(
            &store,
            &(1..=6).map(|i| entry_t(i, if i < 5 { 1 } else { 2 }, 100)).collect::<Vec<_>>(),
        )
        .unwrap();
        log.append(&store, &(7..=10).map(|i| entry_t(i, 2, 100)).collect::<Vec<_>>()).unwrap();
        assert_eq!(store.read().memory_bytes(), 1000);
        // Applied up to 8, at most 250 bytes kept: 1..=8 leave (8 too: 300 > 250).
        store.write().trim(8, 250);
        assert_eq!(store.read().memory_bytes(), 200, "entries 9 and 10 stay");
        // Not past what is applied, whatever the budget.
        store.write().trim(8, 0);
        assert_eq!(store.read().memory_bytes(), 200);
        let want: Vec<(u64, u64)> = (1..=10).map(|i| (i, if i < 5 { 1 } else { 2 })).collect();
        assert_eq!(read(&store, 1, 11), want, "across both records and memory");
        assert_eq!(read(&store, 5, 7), want[4..6]);
        for (i, t) in &want {
            assert_eq!(raft::Storage::term(&store, *i).unwrap(), *t, "term of {i}");
        }
        // A size limit still returns at least one entry.
        let one = raft::Storage::entries(&store, 2, 11, Some(1), GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(one.len(), 1);
        // A new leader replaces 9..: the later record wins for 9 on.
        log.append(&store, &[entry_t(9, 3, 100)]).unwrap();
        assert_eq!(store.read().last_index(), 9);
        assert_eq!(read(&store, 7, 10), vec![(7, 2), (8, 2), (9, 3)]);
        log.sync().unwrap();
        drop(log);
        // After a restart, the same log (all of it in memory again until trimmed).
        let (mut log, core, _) = open(dir.path()).unwrap();
        let store = RaftStorage { core: Arc::new(RwLock::new(core)), ..Default::default() };
        store.write().trim(9, 0);
        assert_eq!(store.read().memory_bytes(), 0);
        let mut want = want[..8].to_vec();
        want.push((9, 3));
        assert_eq!(read(&store, 1, 10), want, "all read back from the replayed file");
        // Compaction at 4 keeps the entries after it, wherever they are.
        let meta = SnapshotMetadata { index: 4, term: 1, ..Default::default() };
        log.install_snapshot(&store, meta).unwrap();
        assert_eq!(read(&store, 5, 10), want[4..]);
        assert!(
            raft::Storage::entries(&store, 4, 10, None, GetEntriesContext::empty(false)).is_err()
        );
        log.append(&store, &[entry_t(10, 3, 100)]).unwrap();
        log.sync().unwrap();
        drop(log);
        let (_log, core, _) = open(dir.path()).unwrap();
        let store = RaftStorage { core: Arc::new(RwLock::new(core)), ..Default::default() };
        want.push((10, 3));
        assert_eq!(read(&store, 5, 11), want[4..], "the compacted log replays");
    }

    /// A snapshot of a later term clears the stored vote (a vote is for one term: kept, it
    /// claimed once persisted a vote this node never cast in that term); one of the same
    /// term keeps it.
    #[test]
    fn a_snapshot_of_a_later_term_clears_the_vote() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, core, _) = open(dir.path()).unwrap();
        let store = RaftStorage { core: Arc::new(RwLock::new(core)), ..Default::default() };
        log.append(&store, &(1..=10).map(|i| entry_t(i, 1, 10)).collect::<Vec<_>>()).unwrap();
        let hs = HardState { term: 1, vote: 3, commit: 2, ..Default::default() };
        log.set_hard_state(&store, &hs).unwrap();
        let meta = SnapshotMetadata { index: 4, term: 1, ..Default::default() };
        log.install_snapshot(&store, meta).unwrap();
        assert_eq!(store.read().last_index(), 10);
        assert_eq!(store.read().hard_state.vote, 3);
        let meta = SnapshotMetadata { index: 12, term: 2, ..Default::default() };
        log.install_snapshot(&store, meta).unwrap();
        let hs = store.read().hard_state.clone();
        assert_eq!((hs.term, hs.vote), (2, 0));
        drop(log);
        let (_log, core, _) = open(dir.path()).unwrap();
        assert_eq!((core.hard_state.term, core.hard_state.vote), (2, 0));
    }

    /// A compaction at exactly the last entry of a closed segment, with entries after it:
    /// the log replays whole (the segments before are deleted, so the replay restarts at
    /// the next segment's first entry, where no term of the compaction's index is known).
    #[test]
    fn a_compaction_at_a_segments_last_entry_replays() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, core, _) = DurableLog::open(dir.path(), 1000, true).unwrap();
        let store = RaftStorage { core: Arc::new(RwLock::new(core)), ..Default::default() };
        for i in 1..=30 {
            log.append(&store, &[entry_t(i, 1, 100)]).unwrap();
        }
        // The last entry of the second segment.
        let c = {
            let core = store.read();
            let second =
                core.spans.iter().map(|s| s.seg).collect::<std::collections::BTreeSet<_>>();
            let seg = *second.iter().nth(1).unwrap();
            core.spans.iter().filter(|s| s.seg == seg).map(|s| s.last).max().unwrap()
        };
        assert!(c < 30, "{c}");
        log.install_snapshot(&store, SnapshotMetadata { index: c, term: 1, ..Default::default() })
            .unwrap();
        for i in 31..=35 {
            log.append(&store, &[entry_t(i, 1, 100)]).unwrap();
        }
        log.sync().unwrap();
        drop(log);
        let (_log, core, _) = DurableLog::open(dir.path(), 1000, true).unwrap();
        assert_eq!((core.first_index(), core.last_index()), (c + 1, 35));
        let store = RaftStorage { core: Arc::new(RwLock::new(core)), ..Default::default() };
        let want: Vec<(u64, u64)> = (c + 1..=35).map(|i| (i, 1)).collect();
        assert_eq!(read(&store, c + 1, 36), want);
    }

    /// Entries asked of the disk with a size limit are read record by record up to it,
    /// not the whole range first (a follower far behind asks for hundreds of MiB at 4 MiB
    /// a time, and each read of all of it held the leader's Raft thread for seconds).
    #[test]
    fn entries_read_back_from_disk_stop_at_the_size_limit() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, core, _) = open(dir.path()).unwrap();
        let store = RaftStorage { core: Arc::new(RwLock::new(core)), ..Default::default() };
        for i in 1..=40 {
            log.append(&store, &[entry_t(i, 1, 1000)]).unwrap();
        }
        store.write().trim(40, 0);
        assert_eq!(store.read().memory_bytes(), 0, "all of it on disk");
        let before = store.read().disk_read_bytes();
        let some =
            raft::Storage::entries(&store, 3, 41, Some(2500), GetEntriesContext::empty(false))
                .unwrap();
        assert!(!some.is_empty() && some.len() < 5, "{} entries", some.len());
        assert!(some.iter().zip(3..).all(|(e, i)| e.index == i));
        let read = store.read().disk_read_bytes() - before;
        assert!(read < 8 * 1000, "{read} bytes read for {} entries", some.len());
        // Without a limit, all of them.
        let all =
            raft::Storage::entries(&store, 3, 41, None, GetEntriesContext::empty(false)).unwrap();
        assert_eq!(all.len(), 38);
    }

    /// A segment missing after the compacted ones (lost outside this code) is an error at
    /// open, not entries silently skipped: only the first gap was checked against the
    /// compaction.
    #[test]
    fn a_segment_missing_past_the_compacted_ones_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, core, _) = DurableLog::open(dir.path(), 1000, true).unwrap();
        let store = RaftStorage { core: Arc::new(RwLock::new(core)), ..Default::default() };
        for i in 1..=60 {
            log.append(&store, &[entry_t(i, 1, 100)]).unwrap();
        }
        log.install_snapshot(&store, SnapshotMetadata { index: 20, term: 1, ..Default::default() })
            .unwrap();
        log.sync().unwrap();
        drop(log);
        let mut segs: Vec<_> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().path()).collect();
        segs.sort();
        assert!(segs.len() >= 4, "{segs:?}");
        // Reopens whole; then one past the compacted ones goes missing.
        drop(DurableLog::open(dir.path(), 1000, true).unwrap());
        std::fs::remove_file(&segs[segs.len() / 2]).unwrap();
        let e = DurableLog::open(dir.path(), 1000, true).err().expect("a missing segment");
        assert!(e.to_string().contains("missing"), "{e}");
    }

    #[test]
    fn segments_roll_and_compaction_deletes_old_ones_whole() {
        let dir = tempfile::tempdir().unwrap();
        // Tiny segments: a few 100-byte entries each.
        let (mut log, core, _) = DurableLog::open(dir.path(), 1000, true).unwrap();
        let store = RaftStorage { core: Arc::new(RwLock::new(core)), ..Default::default() };
        let hs = HardState { term: 1, vote: 1, commit: 0, ..Default::default() };
        log.set_hard_state(&store, &hs).unwrap();
        for i in 1..=30 {
            log.append(&store, &[entry_t(i, 1, 100)]).unwrap();
        }
        log.sync().unwrap();
        let (segments, _) = log.segments();
        assert!(segments >= 4, "30 entries of ~130 bytes in 1000-byte segments: {segments}");
        store.write().trim(30, 0);
        let all: Vec<(u64, u64)> = (1..=30).map(|i| (i, 1)).collect();
        assert_eq!(read(&store, 1, 31), all, "read back across segments");

        // Compaction at 20: the segments holding only 1..=20 go; nothing else changes.
        let first = segment_path(dir.path(), 1);
        let (active, active_len) = (log.seq, log.file.len());
        log.install_snapshot(&store, SnapshotMetadata { index: 20, term: 1, ..Default::default() })
            .unwrap();
        assert!(!first.exists(), "the first segment holds only compacted entries");
        let (left, _) = log.segments();
        assert!(left < segments && left >= 2, "{left} of {segments} segments left");
        assert!(
            log.seq == active && log.file.len() > active_len,
            "the active segment is appended to (the compaction record), not rewritten"
        );
        assert_eq!(read(&store, 21, 31), all[20..]);
        for i in 31..=35 {
            log.append(&store, &[entry_t(i, 2, 100)]).unwrap();
        }
        // (Entries of term 2 come with a hard state of term 2, here with a vote in it.)
        let hs = HardState { term: 2, vote: 1, commit: 0, ..Default::default() };
        log.set_hard_state(&store, &hs).unwrap();
        log.sync().unwrap();
        drop(log);

        // The replay starts in a segment whose first entries follow deleted ones.
        let (mut log, core, existed) = DurableLog::open(dir.path(), 1000, true).unwrap();
        assert!(existed);
        assert_eq!((core.first_index(), core.last_index()), (21, 35));
        assert_eq!((core.hard_state.term, core.hard_state.vote), (2, 1));
        let store = RaftStorage { core: Arc::new(RwLock::new(core)), ..Default::default() };
        store.write().trim(35, 0);
        let want: Vec<(u64, u64)> = (21..=35).map(|i| (i, if i <= 30 { 1 } else { 2 })).collect();
        assert_eq!(read(&store, 21, 36), want);

        // A compaction past every entry leaves one fresh segment behind.
        log.install_snapshot(&store, SnapshotMetadata { index: 35, term: 2, ..Default::default() })
            .unwrap();
        assert_eq!(log.segments().0, 1);
        drop(log);
        let (_log, core, _) = DurableLog::open(dir.path(), 1000, true).unwrap();
        assert_eq!((core.first_index(), core.last_index()), (36, 35));
        assert_eq!(core.term(35).unwrap(), 2);
        assert_eq!(core.hard_state.vote, 1);
    }

    #[test]
    fn a_single_file_log_is_adopted_and_a_corrupt_closed_segment_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let store = RaftStorage::default();
        {
            let (mut log, _, _) = open(dir.path()).unwrap();
            log.append(&store, &[entry(1, 1), entry(2, 1)]).unwrap();
            log.sync().unwrap();
        }
        // The format before segments: one `raft.log`.
        std::fs::rename(segment_path(dir.path(), 1), dir.path().join(LEGACY_LOG_FILE)).unwrap();
        let (_log, core, existed) = DurableLog::open(dir.path(), 100, true).unwrap();
        assert!(existed);
        assert_eq!(core.last_index(), 2);
        assert!(!dir.path().join(LEGACY_LOG_FILE).exists());

        // Fill a second segment, then damage the first (closed, fsynced whole): an error
        // that names it, never a silently shorter log.
        let (mut log, core, _) = DurableLog::open(dir.path(), 20, true).unwrap();
        let store = RaftStorage { core: Arc::new(RwLock::new(core)), ..Default::default() };
        log.append(&store, &[entry(3, 1)]).unwrap();
        log.sync().unwrap();
        assert!(segment_path(dir.path(), 2).exists());
        drop(log);
        let first = segment_path(dir.path(), 1);
        let mut bytes = std::fs::read(&first).unwrap();
        let n = bytes.len();
        bytes[n - 3] ^= 0xFF;
        std::fs::write(&first, bytes).unwrap();
        let Err(err) = DurableLog::open(dir.path(), 20, true) else {
            panic!("a corrupt closed segment was accepted")
        };
        assert!(err.to_string().contains("raft-0000000000000001.log"), "{err}");
    }

    #[test]
    fn a_large_append_is_split_into_records_that_replay_whole() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, core, _) = open(dir.path()).unwrap();
        let store = RaftStorage { core: Arc::new(RwLock::new(core)), ..Default::default() };
        // Ten 1 MiB entries: more than one record's worth.
        let big = |i: u64| Entry {
            index: i,
            term: 1,
            data: vec![i as u8; 1 << 20].into(),
            ..Default::default()
        };
        log.append(&store, &(1..=10).map(big).collect::<Vec<_>>()).unwrap();
        log.sync().unwrap();
        assert!(store.read().spans.len() >= 3, "{} records", store.read().spans.len());
        drop(log);
        let (_log, core, _) = open(dir.path()).unwrap();
        let store = RaftStorage { core: Arc::new(RwLock::new(core)), ..Default::default() };
        store.write().trim(10, 0);
        let got =
            raft::Storage::entries(&store, 1, 11, None, GetEntriesContext::empty(false)).unwrap();
        assert_eq!(got.len(), 10);
        for e in got {
            assert!(e.data.len() == 1 << 20 && e.data.iter().all(|&b| b == e.index as u8));
        }
    }

    /// Our own compaction installs a checkpoint started before a membership change that
    /// was applied while it was written: the newer membership stays (it used to be rolled
    /// back, and the next snapshot, sent to a node added by the change, lacked that node).
    #[test]
    fn an_older_checkpoint_keeps_a_newer_membership_a_newer_snapshot_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, core, _) = open(dir.path()).unwrap();
        let store = RaftStorage { core: Arc::new(RwLock::new(core)), ..Default::default() };
        log.append(&store, &(1..=10).map(|i| entry(i, 1)).collect::<Vec<_>>()).unwrap();
        let conf = |voters: &[u64], learners: &[u64]| ConfState {
            voters: voters.to_vec(),
            learners: learners.to_vec(),
            ..Default::default()
        };
        let (c0, c1, c2) = (conf(&[1, 2, 3], &[]), conf(&[1, 2, 3], &[4]), conf(&[1, 2, 4], &[]));
        store.write().set_conf_state(c0.clone(), 3);
        // Learner 4 added by entry 7, applied while the checkpoint at 5 was written.
        store.write().set_conf_state(c1.clone(), 7);
        let mut meta = SnapshotMetadata { index: 5, term: 1, ..Default::default() };
        meta.set_conf_state(c0.clone());
        log.install_snapshot(&store, meta).unwrap();
        assert_eq!(store.read().first_index(), 6);
        assert_eq!(store.read().conf_state(), &c1, "an older checkpoint rolled membership back");
        assert_eq!(store.read().snapshot.get_conf_state(), &c0, "the snapshot keeps its own");
        let state = raft::Storage::initial_state(&store).unwrap();
        assert_eq!(state.conf_state, c1);
        // A snapshot from the leader past our log replaces it.
        let mut meta = SnapshotMetadata { index: 12, term: 2, ..Default::default() };
        meta.set_conf_state(c2.clone());
        log.install_snapshot(&store, meta).unwrap();
        assert_eq!(store.read().conf_state(), &c2);
        assert_eq!((store.read().first_index(), store.read().last_index()), (13, 12));
        // A membership change applied later, then our own compaction at that index.
        let c3 = conf(&[1, 2, 4], &[5]);
        log.append(&store, &(13..=15).map(|i| entry(i, 2)).collect::<Vec<_>>()).unwrap();
        store.write().set_conf_state(c3.clone(), 14);
        let mut meta = SnapshotMetadata { index: 14, term: 2, ..Default::default() };
        meta.set_conf_state(c3.clone());
        log.install_snapshot(&store, meta).unwrap();
        assert_eq!(store.read().conf_state(), &c3);
    }

    #[test]
    fn torn_tail_is_cut_and_earlier_records_survive() {
        let dir = tempfile::tempdir().unwrap();
        let store = RaftStorage::default();
        let good = {
            let (mut log, _, _) = open(dir.path()).unwrap();
            log.append(&store, &[entry(1, 1), entry(2, 1)]).unwrap();
            log.sync().unwrap();
            log.file.len()
        };
        // A torn record right after the last good one (over a direct write's padding).
        let path = segment_path(dir.path(), 1);
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        std::os::unix::fs::FileExt::write_all_at(
            &f,
            &[KIND_ENTRIES, 200, 0, 0, 0, 1, 2, 3, 4, 5],
            good,
        )
        .unwrap();
        drop(f);
        let (_log, core, _) = open(dir.path()).unwrap();
        assert_eq!(core.last_index(), 2);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), good);
    }
}
