//! The replicated state machine on sled: volumes, the block index, the request-id dedupe
//! table, the member address book, and the applied index, all in one tree so that every
//! committed entry's changes and the new applied index land in one atomic sled batch.
//! Block data itself lives in append-only segment files (`blobs`); the block index maps
//! each block to its version and its record there. A group's records are written to the
//! segment before the sled batch that refers to them.
//!
//! sled 0.34's `flush()` does not fsync on Linux, so nothing here is trusted to be
//! durable: after a crash sled may hold an older applied index than it reported, and
//! the node replays the durable Raft log (and, below the log's compaction point, the
//! durable snapshot file) from there. Apply is deterministic: the same entries give
//! the same state and the same replies on every node.

use prost::Message as _;
use protobuf::Message as _;
use raft::prelude::{ConfState, SnapshotMetadata};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use wayside_proto::pb;
use wayside_proto::types::{BlockSize, Epoch, VolumeName};

use crate::blobs::{BlobError, BlobReader, Blobs, Loc};
use crate::index::{block_key, block_prefix, BlockIndex, BlockMap, IndexBase, SharedIndex};
use crate::snapshot::{CheckpointView, Pair, SNAPSHOT_MAGIC};
use std::borrow::Cow;

const META_APPLIED: &[u8] = b"mapplied";
const META_CONF: &[u8] = b"mconf";
/// Request ids in the dedupe table now. The table is one record per Raft entry (`o` +
/// entry index, a [`DedupeEntry`]) holding the ids that entry first remembered, each
/// with its reply; the oldest entries are forgotten first, whole entries at a time, so
/// every node forgets the same ids at the same point of the log.
const META_DEDUPE_COUNT: &[u8] = b"mdedupe_count";
/// Prefix of the dedupe table's per-entry records.
const DEDUPE_PREFIX: u8 = b'o';
/// Local (per-node, not replicated, not in snapshots) keys start with `x`: where this
/// node's blob segments end and which of them are known synced.
const LOCAL_PREFIX: u8 = b'x';
const LOCAL_BLOB_END: &[u8] = b"xblob_end";
const LOCAL_BLOB_SYNCED: &[u8] = b"xblob_synced";
/// The length of each sealed blob segment not known synced (from `xblob_synced` on), as
/// `segment u32 | length u64` pairs: a power loss can cut such a file at a record
/// boundary, which its own size cannot show. Written with the blob end when it changes.
const LOCAL_BLOB_SEALED: &[u8] = b"xblob_sealed";
/// Where the durable block index starts ([`IndexBase`]); absent: `Scratch`.
const LOCAL_INDEX_BASE: &[u8] = b"xindex_base";
/// Version 2: the dedupe table is per-entry records with the replies in them (version 1
/// had a record per request id beside lists of ids per entry).
/// sled's segment (and IO buffer) size: sled's 512 KiB default holds ~100 blocks of
/// 4 KiB, so a group-commit entry of hundreds of blocks waited on sled's IO threads
/// several times per apply. Fixed when a state machine directory is created.
const SLED_SEGMENT_BYTES: usize = 8 * 1024 * 1024;
/// Blob record bytes a group buffers before writing them out, in bytes.
const FLUSH_RECORDS_BYTES: usize = 4 << 20;
/// Largest blob record buffer kept between groups, in bytes (see `direct`'s buffer).
const KEEP_RECORDS_BYTES: usize = 32 << 20;
/// Longest wait for sled's file lock at open (held briefly by a just-dropped instance).
const SLED_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The client commands of one Raft entry (group commit: many per entry).
#[derive(Clone, PartialEq, prost::Message)]
pub struct CommandBatch {
    #[prost(message, repeated, tag = "1")]
    pub commands: Vec<Command>,
    /// The proposing leader's `dedupe_table_entries`: every replica forgets request ids
    /// past this entry by it, so all give a retry the same answer whatever their own
    /// configs say (0, in an entry of a PSS from before it: the node's own).
    #[prost(uint64, tag = "2")]
    pub dedupe_limit: u64,
}

/// One client command, tagged with the proposing node, that node's process incarnation
/// and its local sequence number so that process can route the outcome back to the
/// waiting request. The sequence restarts with every process, so `(origin, seq)` alone
/// is not unique: a leader restarted before its entries committed would hand their
/// outcomes (committed under its next term) to new requests with the same numbers.
/// The tags are not state: applying ignores them.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Command {
    #[prost(uint64, tag = "1")]
    pub origin: u64,
    #[prost(uint64, tag = "2")]
    pub seq: u64,
    #[prost(message, optional, tag = "3")]
    pub acquire: Option<pb::AcquireVolumeRequest>,
    #[prost(message, optional, tag = "4")]
    pub write: Option<pb::WriteBatchRequest>,
    /// The proposing process's random incarnation (never 0); 0 in entries of a PSS from
    /// before it (a field such a PSS skips when it decodes a newer entry).
    #[prost(uint64, tag = "5")]
    pub incarnation: u64,
}

/// A request id and the first reply to it, returned again for a retry.
#[derive(Clone, PartialEq, prost::Message)]
struct DedupeItem {
    #[prost(message, optional, tag = "1")]
    id: Option<pb::RequestId>,
    #[prost(message, optional, tag = "2")]
    acquire: Option<pb::AcquireVolumeReply>,
    #[prost(message, optional, tag = "3")]
    write: Option<pb::WriteBatchReply>,
}

/// The dedupe record of one Raft entry: the request ids it first remembered, in apply
/// order. One sled key per entry rather than one per id: with group commit an entry
/// holds hundreds of writes, and each sled insert (and later removal) costs more than
/// the bytes it carries.
#[derive(Clone, PartialEq, prost::Message)]
struct DedupeEntry {
    #[prost(message, repeated, tag = "1")]
    items: Vec<DedupeItem>,
}

/// The key (field 1, length-delimited) that starts each item of an encoded
/// [`DedupeEntry`]: an entry's record is built by appending items one at a time.
const DEDUPE_ITEM_KEY: u8 = (1 << 3) | 2;

/// Which reply a lookup wants: an id used for an acquire and (wrongly) reused for a
/// write is remembered for both, and each retry gets its own kind's first reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Acquire,
    Write,
}

/// The entries whose records hold request ids with one hash (almost always one entry;
/// more only when different ids' hashes collide or one id has both kinds).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Holders {
    One(u64),
    Many(Vec<u64>),
}

impl Holders {
    fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        let (one, many) = match self {
            Holders::One(i) => (Some(*i), &[][..]),
            Holders::Many(v) => (None, &v[..]),
        };
        one.into_iter().chain(many.iter().copied())
    }
}

/// A hasher for keys that are already hashes (the mirror's id hashes).
#[derive(Default)]
struct PassThrough(u64);

impl std::hash::Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

type HashIndex = HashMap<u64, Holders, std::hash::BuildHasherDefault<PassThrough>>;

/// A command refused by the state machine (the same on every node).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    #[error("volume {0} does not exist")]
    NotFound(String),
    #[error("write carries epoch {presented} but volume is at epoch {current}")]
    StaleEpoch { presented: Epoch, current: Epoch },
    #[error("write carries epoch {presented}, newer than the volume's epoch {current}")]
    FutureEpoch { presented: Epoch, current: Epoch },
    #[error("{0}")]
    Invalid(String),
    /// A create met a volume that exists with another credential or block size (made by
    /// another caller meanwhile): nothing changed, its owner keeps it.
    #[error("volume {volume} exists already: {why}")]
    Exists { volume: String, why: String },
}

/// What applying a command produced.
#[derive(Debug, Clone)]
pub enum Outcome {
    Acquire(Result<pb::AcquireVolumeReply, ApplyError>),
    Write(Result<pb::WriteBatchReply, ApplyError>),
}

/// A state machine failure: the node must stop (its state can no longer be trusted).
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("snapshot file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("snapshot file {path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("block data: {0}")]
    Blob(#[from] BlobError),
    #[error("snapshot cancelled (the node is stopping)")]
    Cancelled,
    #[error("block {block} of volume {volume}: its record moved away three times in a row")]
    Moving { volume: String, block: u64 },
}

/// The state machine's limits (from the node's config).
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Request ids remembered for duplicate detection.
    pub dedupe_limit: u64,
    /// Size at which a blob segment is sealed, in bytes.
    pub blob_segment_bytes: u64,
    /// Live share (percent) below which a sealed segment is collected.
    pub blob_gc_live_percent: u64,
    /// Segment bytes, as a percentage of live bytes, above which collection runs.
    pub blob_gc_space_percent: u64,
    /// Append to blob segments with `O_DIRECT` (see `direct`).
    pub direct_io: bool,
}

impl Options {
    /// The defaults, with another dedupe limit (tests).
    pub fn with_dedupe(dedupe_limit: u64) -> Self {
        Self {
            dedupe_limit,
            blob_segment_bytes: 64 << 20,
            blob_gc_live_percent: 50,
            blob_gc_space_percent: 200,
            direct_io: true,
        }
    }
}

/// The sled-backed state machine.
pub struct StateMachine {
    db: sled::Db,
    dir: PathBuf,
    tree: sled::Tree,
    blobs: Blobs,
    gc_live_percent: u64,
    gc_space_percent: u64,
    /// Collected segments whose deletion waits until the copies of their records and
    /// sled's new index are durable...
    retired: Vec<u32>,
    /// ...which this job (on its own thread) makes them, for the segments it names.
    durability: Option<DurabilityJob>,
    dedupe_limit: u64,
    /// The limit of the entry being applied (`CommandBatch::dedupe_limit`, see
    /// [`StateMachine::set_entry_dedupe_limit`]; else `dedupe_limit`).
    entry_dedupe_limit: u64,
    /// Ids in the table, and each entry record's index with the hashes of its ids, oldest
    /// first: a mirror of sled's `o` keys so forgetting needs no scan or read; at most
    /// `dedupe_limit` ids.
    dedupe_count: u64,
    dedupe_order: VecDeque<(u64, Box<[u64]>)>,
    /// The entries holding each remembered id's hash: a request id whose hash is absent
    /// was never seen (the common case: no sled lookup), and a retried one is looked up
    /// in the record of the entry that holds it. At most `dedupe_limit` ids, like the
    /// table it mirrors. Local to this process (rebuilt on open and after a snapshot
    /// load), so its hashes are keyed per process (`id_hasher`): ids chosen to collide
    /// cannot be computed from outside.
    dedupe_index: HashIndex,
    id_hasher: std::hash::RandomState,
    /// The blob record buffer, reused between groups (see `storage::DurableLog::buf`).
    spare_records: Vec<u8>,
    /// What `LOCAL_BLOB_SEALED` holds (`None`: unknown, written with the next blob end).
    sealed_recorded: Option<Vec<(u32, u64)>>,
    /// The block index (see `index`), shared with the readers, and where its durable
    /// form starts; checkpoints are found in `snap_dir`.
    index: SharedIndex,
    base: IndexBase,
    snap_dir: PathBuf,
    /// Volumes stored (the `v` keys), shared with the readers for admission
    /// (`max_volumes`): counted at open and after a snapshot load, raised by each create.
    volumes: Arc<AtomicUsize>,
}

/// The segment size an existing sled directory was created with (sled refuses to open
/// it with another one), read from sled's `conf` file (`segment_size: N` lines).
fn existing_segment_size(dir: &Path) -> Option<usize> {
    // The file ends in a binary checksum, so it is not all UTF-8.
    let bytes = std::fs::read(dir.join("conf")).ok()?;
    String::from_utf8_lossy(&bytes)
        .lines()
        .find_map(|l| l.strip_prefix("segment_size: ")?.trim().parse().ok())
}

fn be(v: u64) -> [u8; 8] {
    v.to_be_bytes()
}

fn read_u64(v: &[u8]) -> u64 {
    v.get(..8).and_then(|b| b.try_into().ok()).map_or(0, u64::from_be_bytes)
}

/// Prefix of the volumes' metadata keys (`v` + name, a [`pb::VolumeMeta`]).
const VOLUME_PREFIX: &[u8] = b"v";

fn volume_key(volume: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + volume.len());
    k.extend_from_slice(VOLUME_PREFIX);
    k.extend_from_slice(volume.as_bytes());
    k
}

fn dedupe_entry_key(index: u64) -> [u8; 9] {
    let mut k = [DEDUPE_PREFIX; 9];
    k[1..].copy_from_slice(&be(index));
    k
}

fn member_key(id: u64) -> Vec<u8> {
    let mut k = vec![b'n'];
    k.extend_from_slice(&be(id));
    k
}

/// The writes of one group of committed entries: a sled batch plus an overlay so later
/// commands of the group read what earlier ones wrote.
struct Txn {
    tree: sled::Tree,
    batch: sled::Batch,
    /// `IVec`s are reference counted: the batch and the overlay share one copy.
    overlay: HashMap<Vec<u8>, Option<sled::IVec>>,
}

impl Txn {
    /// The current value (`IVec` derefs to `[u8]`; getting it copies nothing).
    fn get(&self, key: &[u8]) -> Result<Option<sled::IVec>, sled::Error> {
        if let Some(v) = self.overlay.get(key) {
            return Ok(v.clone());
        }
        self.tree.get(key)
    }
    fn insert(&mut self, key: Vec<u8>, value: Vec<u8>) {
        let value = sled::IVec::from(value);
        self.batch.insert(key.as_slice(), value.clone());
        self.overlay.insert(key, Some(value));
    }
    fn remove(&mut self, key: Vec<u8>) {
        self.batch.remove(key.as_slice());
        self.overlay.insert(key, None);
    }
}

/// An fsync of collected records' copies and of sled, on its own thread; the retired
/// `segments` may be deleted once it succeeded.
struct DurabilityJob {
    segments: Vec<u32>,
    thread: std::thread::JoinHandle<Result<(), StateError>>,
}

impl Drop for StateMachine {
    fn drop(&mut self) {
        // Its sled handle holds sled's file lock; a reopen must not find it taken.
        if let Some(job) = self.durability.take() {
            let _ = job.thread.join();
        }
    }
}

/// The pending changes of a group of entries; apply with [`StateMachine::commit`].
pub struct Pending {
    txn: Txn,
    /// The entry whose commands' request ids are being remembered; its record is
    /// written when the entry ends.
    dedupe_new: Option<NewDedupeEntry>,
    /// Blob records of this group, to be appended at `base` before the sled batch.
    records: Vec<u8>,
    base: (u32, u64),
    /// The group's block index changes (by block key), applied to the shared index once
    /// their records are written, so a reader never finds a record not yet there.
    index: HashMap<Vec<u8>, Option<Loc>>,
}

/// The dedupe record of the entry being applied, built as its commands apply.
struct NewDedupeEntry {
    index: u64,
    /// An encoded [`DedupeEntry`] so far.
    record: Vec<u8>,
    /// The hashes of its ids, in order.
    hashes: Vec<u64>,
    /// Ids the table keeps once this entry ends (the entry's `dedupe_limit`).
    limit: u64,
}

fn read_end(v: &[u8]) -> (u32, u64) {
    let seg = v.get(..4).and_then(|b| b.try_into().ok()).map_or(0, u32::from_be_bytes);
    (seg, v.get(4..12).map_or(0, read_u64))
}

fn encode_sealed(sealed: &[(u32, u64)]) -> Vec<u8> {
    sealed.iter().flat_map(|&end| encode_end(end)).collect()
}

fn read_sealed(v: &[u8]) -> BTreeMap<u32, u64> {
    v.chunks_exact(12).map(read_end).collect()
}

fn encode_end((seg, off): (u32, u64)) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[..4].copy_from_slice(&seg.to_be_bytes());
    b[4..].copy_from_slice(&off.to_be_bytes());
    b
}

impl StateMachine {
    /// [`StateMachine::open_in`] with checkpoints in `dir/snap`.
    pub fn open(dir: &Path, opts: Options) -> Result<Self, StateError> {
        Self::open_in(dir, &dir.join("snap"), opts)
    }

    /// Opens the sled database under `dir` and the block data segments in `dir/blobs`,
    /// and rebuilds the block index from its base (a checkpoint in `snap_dir`, if any)
    /// and the blob records after it. If sled refers to block data a power loss took,
    /// the state is emptied (applied index 0): the node then reloads its durable
    /// checkpoint or snapshot and replays its log.
    pub fn open_in(dir: &Path, snap_dir: &Path, opts: Options) -> Result<Self, StateError> {
        // High-throughput mode: sled rewrites (garbage-collects) its segments less
        // eagerly, which costs disk space but fewer bytes written per block write.
        let config = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            .segment_size(existing_segment_size(dir).unwrap_or(SLED_SEGMENT_BYTES));
        // A state machine of this process that was just dropped (a node restarted in
        // place) may hold sled's file lock a moment longer, until its threads end.
        let waited = std::time::Instant::now();
        let db = loop {
            match config.open() {
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock")
                        && waited.elapsed() < SLED_LOCK_WAIT =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                other => break other?,
            }
        };
        let tree = db.open_tree("sm")?;
        let end = tree.get(LOCAL_BLOB_END)?.map_or((0, 0), |v| read_end(&v));
        let synced = tree.get(LOCAL_BLOB_SYNCED)?.map_or(0, |v| read_end(&v).0);
        let sealed = tree.get(LOCAL_BLOB_SEALED)?.map(|v| read_sealed(&v));
        let blob_dir = dir.join("blobs");
        let opened = Blobs::open(
            &blob_dir,
            end,
            synced,
            sealed.as_ref(),
            opts.blob_segment_bytes,
            opts.direct_io,
        )?;
        let blobs = match opened {
            Some(b) => b,
            None => {
                tracing::warn!(
                    "the state machine refers to block data that is not on disk: \
                     emptying it to reload the snapshot and replay the log"
                );
                tree.clear()?;
                // Durable before the files go: a crash between the two would bring the
                // old index back over deleted segments.
                flush_db(&db, dir)?;
                Blobs::fresh(&blob_dir, end.0 + 1, opts.blob_segment_bytes, opts.direct_io)?
            }
        };
        let mut sm = Self {
            db,
            dir: dir.to_owned(),
            tree,
            blobs,
            gc_live_percent: opts.blob_gc_live_percent,
            gc_space_percent: opts.blob_gc_space_percent,
            retired: Vec::new(),
            durability: None,
            dedupe_limit: opts.dedupe_limit,
            entry_dedupe_limit: opts.dedupe_limit,
            dedupe_count: 0,
            dedupe_order: VecDeque::new(),
            dedupe_index: HashIndex::default(),
            id_hasher: std::hash::RandomState::new(),
            spare_records: Vec::new(),
            sealed_recorded: None,
            index: SharedIndex::default(),
            base: IndexBase::Scratch,
            snap_dir: snap_dir.to_owned(),
            volumes: Arc::default(),
        };
        sm.load_dedupe()?;
        sm.load_index()?;
        sm.count_volumes()?;
        Ok(sm)
    }

    /// Counts the volumes stored (a scan of their metadata keys, at open and after a
    /// snapshot load only).
    fn count_volumes(&mut self) -> Result<(), StateError> {
        let mut n = 0usize;
        for kv in self.tree.scan_prefix(VOLUME_PREFIX) {
            kv?;
            n += 1;
        }
        self.volumes.store(n, Ordering::Relaxed);
        Ok(())
    }

    /// Rebuilds the block index: its base (see [`IndexBase`]), then every blob record
    /// after the base's position, in log order; counts every indexed record as live.
    fn load_index(&mut self) -> Result<(), StateError> {
        let mut index = BlockIndex::default();
        let stored =
            match self.tree.get(LOCAL_INDEX_BASE)? {
                Some(v) => Some(IndexBase::decode(&v).ok_or_else(|| {
                    self.corrupt(format!("index base record of {} bytes", v.len()))
                })?),
                None => None,
            };
        let has_sled_entries = self.tree.scan_prefix(b"b").next().transpose()?.is_some();
        let base = match stored {
            // A state directory of a PSS that kept the index in sled: its entries are
            // the base as of the blob end they were written with.
            None if has_sled_entries => {
                let base = IndexBase::Sled { at: self.blobs.end() };
                self.tree.insert(LOCAL_INDEX_BASE, base.encode())?;
                base
            }
            None => IndexBase::Scratch,
            Some(b) => b,
        };
        match base {
            IndexBase::Scratch => {}
            IndexBase::Sled { .. } => {
                for kv in self.tree.scan_prefix(b"b") {
                    let (k, v) = kv?;
                    index.set_key(&k, Loc::decode(&v));
                }
            }
            IndexBase::Checkpoint { index: at_index, .. } => {
                let dir = crate::snapshot::checkpoint_path(&self.snap_dir, at_index);
                let cp = crate::snapshot::Checkpoint::open(&dir)?;
                for (k, v) in cp.index_pairs()? {
                    if crate::snapshot::is_block_key(k) {
                        index.set_key(k, Loc::decode(v));
                    }
                }
            }
        }
        if let Some(at) = base.at().filter(|&at| at > self.blobs.end()) {
            // A checkpoint sealed the active segment with nothing applied after it, and
            // (before `set_index_base` recorded the blob end with the base) sled kept the
            // end before the seal: appends must not go into the segment the base starts
            // after (the replay below would skip them at the next start). Sealed again,
            // the blob end is at the base's position.
            self.blobs.seal_active()?;
            if at > self.blobs.end() {
                return Err(self.corrupt(format!(
                    "the block index's base starts at blob position {at:?}, past the blob \
                     end {:?}",
                    self.blobs.end()
                )));
            }
            let mut batch = sled::Batch::default();
            self.record_blob_end(&mut batch);
            self.tree.apply_batch(batch)?;
            flush_db(&self.db, &self.dir)?;
        }
        let from = base.at().unwrap_or((self.blobs.first_segment(), 0));
        let mut replayed = 0u64;
        self.blobs.replay(from, |loc, rec| {
            index.set_key(rec.key, (!rec.tombstone).then_some(loc));
            replayed += 1;
            Ok(())
        })?;
        for (_, _, loc) in index.iter() {
            self.blobs.add_live(&loc);
        }
        tracing::debug!(?base, replayed, blocks = index.entries(), "block index rebuilt");
        *crate::index::write(&self.index) = index;
        self.base = base;
        Ok(())
    }

    /// Makes `base` the durable start of the block index (after its checkpoint is
    /// durable): written and made durable (sled flush and an fsync of its file) before it
    /// counts, since older checkpoints are deleted after it. sled's block entries of an
    /// older PSS are dropped with the first such base.
    pub fn set_index_base(&mut self, base: IndexBase) -> Result<(), StateError> {
        let mut batch = sled::Batch::default();
        batch.insert(LOCAL_INDEX_BASE, base.encode());
        // The blob end with it: the checkpoint sealed the active segment, so the base
        // starts past the end sled last recorded when nothing was applied since. Left so,
        // a restart would append to the sealed segment again, behind the base, and the
        // next start's replay (from the base) would skip those records.
        self.record_blob_end(&mut batch);
        if matches!(self.base, IndexBase::Sled { .. }) {
            for kv in self.tree.scan_prefix(b"b") {
                batch.remove(kv?.0);
            }
        }
        self.tree.apply_batch(batch)?;
        flush_db(&self.db, &self.dir)?;
        self.base = base;
        Ok(())
    }

    /// The block index's durable start.
    pub fn index_base(&self) -> IndexBase {
        self.base
    }

    fn corrupt(&self, reason: String) -> StateError {
        StateError::Corrupt { path: self.dir.clone(), reason }
    }

    /// The index of the last entry whose effects sled holds (0: none).
    pub fn applied(&self) -> Result<u64, StateError> {
        Ok(self.tree.get(META_APPLIED)?.map_or(0, |v| read_u64(&v)))
    }

    /// The membership as of the applied index.
    pub fn conf_state(&self) -> Result<Option<ConfState>, StateError> {
        Ok(self.tree.get(META_CONF)?.and_then(|v| ConfState::parse_from_bytes(&v).ok()))
    }

    /// Member addresses known to the state machine.
    pub fn members(&self) -> Result<BTreeMap<u64, String>, StateError> {
        let mut out = BTreeMap::new();
        for kv in self.tree.scan_prefix(b"n") {
            let (k, v) = kv?;
            out.insert(read_u64(&k[1..]), String::from_utf8_lossy(&v).into_owned());
        }
        Ok(out)
    }

    /// Rebuilds the dedupe table's in-memory mirror (order and id index) from sled's
    /// entry records.
    fn load_dedupe(&mut self) -> Result<(), StateError> {
        if self.tree.scan_prefix(b"d").next().transpose()?.is_some() {
            return Err(StateError::Corrupt {
                path: self.dir.clone(),
                reason: "it holds per-request-id dedupe records (`d` keys): it was written by \
                         an older PSS, whose state directories this one does not read"
                    .into(),
            });
        }
        self.dedupe_count = self.tree.get(META_DEDUPE_COUNT)?.map_or(0, |v| read_u64(&v));
        self.dedupe_order.clear();
        self.dedupe_index.clear();
        for kv in self.tree.scan_prefix([DEDUPE_PREFIX]) {
            let (k, v) = kv?;
            let index = read_u64(&k[1..]);
            let entry = DedupeEntry::decode(&v[..]).map_err(|e| StateError::Corrupt {
                path: self.dir.clone(),
                reason: format!("the dedupe record of entry {index} does not decode: {e}"),
            })?;
            let hashes: Box<[u64]> = entry
                .items
                .iter()
                .filter_map(|i| i.id.as_ref())
                .map(|id| self.id_hash(id))
                .collect();
            for &h in &hashes {
                self.hold(h, index);
            }
            self.dedupe_order.push_back((index, hashes));
        }
        Ok(())
    }

    fn id_hash(&self, id: &pb::RequestId) -> u64 {
        use std::hash::BuildHasher;
        self.id_hasher.hash_one((id.client_id.as_str(), id.seq))
    }

    /// Notes that the record of entry `index` holds an id with hash `h`.
    fn hold(&mut self, h: u64, index: u64) {
        match self.dedupe_index.entry(h) {
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(Holders::One(index));
            }
            std::collections::hash_map::Entry::Occupied(mut o) => match o.get_mut() {
                Holders::One(i) => {
                    let first = *i;
                    o.insert(Holders::Many(vec![first, index]));
                }
                Holders::Many(v) => v.push(index),
            },
        }
    }

    /// Undoes one [`StateMachine::hold`] of `h` by entry `index`.
    fn release(&mut self, h: u64, index: u64) {
        let std::collections::hash_map::Entry::Occupied(mut o) = self.dedupe_index.entry(h) else {
            debug_assert!(false, "dedupe mirror: hash of entry {index} not held");
            return;
        };
        match o.get_mut() {
            Holders::One(i) => {
                debug_assert_eq!(*i, index);
                o.remove();
            }
            Holders::Many(v) => {
                if let Some(pos) = v.iter().position(|&i| i == index) {
                    v.swap_remove(pos);
                }
                if let [only] = v[..] {
                    o.insert(Holders::One(only));
                }
            }
        }
    }

    /// Starts a group of changes.
    pub fn begin(&mut self) -> Pending {
        Pending {
            txn: Txn {
                tree: self.tree.clone(),
                batch: sled::Batch::default(),
                overlay: HashMap::new(),
            },
            dedupe_new: None,
            records: std::mem::take(&mut self.spare_records),
            base: self.blobs.end(),
            index: HashMap::new(),
        }
    }

    /// Commits a group atomically together with its applied index (and conf state).
    pub fn commit(
        &mut self,
        mut p: Pending,
        applied: u64,
        conf: Option<&ConfState>,
    ) -> Result<(), StateError> {
        p.txn.batch.insert(META_APPLIED, &be(applied));
        if let Some(cs) = conf {
            p.txn.batch.insert(META_CONF, cs.write_to_bytes().unwrap_or_default());
        }
        self.dedupe_end_entry(&mut p);
        p.txn.batch.insert(META_DEDUPE_COUNT, &be(self.dedupe_count));
        debug_assert_eq!(p.base, self.blobs.end());
        self.blobs.append(&p.records)?;
        if p.records.capacity() <= KEEP_RECORDS_BYTES {
            p.records.clear();
            self.spare_records = std::mem::take(&mut p.records);
        }
        if !p.index.is_empty() {
            let mut index = crate::index::write(&self.index);
            for (key, loc) in p.index.drain() {
                index.set_key(&key, loc);
            }
        }
        self.record_blob_end(&mut p.txn.batch);
        self.tree.apply_batch(p.txn.batch)?;
        self.blobs.maybe_rotate()?;
        // Records past the index's durable base rebuild it after a restart: only older
        // segments may be collected.
        let below = self.base.at().map_or(0, |(seg, _)| seg);
        let candidate = self.blobs.gc_candidate(self.gc_live_percent, self.gc_space_percent, below);
        if let Some(seg) = candidate {
            self.collect(seg)?;
        }
        self.tend_retired()
    }

    /// Waits until every collected segment is durable-ly replaced and deleted (shutdown,
    /// tests).
    pub fn finish_collections(&mut self) -> Result<(), StateError> {
        while self.durability.is_some() || !self.retired.is_empty() {
            if let Some(job) = &self.durability {
                while !job.thread.is_finished() {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
            self.tend_retired()?;
        }
        Ok(())
    }

    /// Deletes the collected segments a finished durability job covered, and starts a
    /// job for those collected since.
    fn tend_retired(&mut self) -> Result<(), StateError> {
        if self.durability.as_ref().is_some_and(|j| j.thread.is_finished()) {
            if let Some(job) = self.durability.take() {
                match job.thread.join() {
                    Ok(Ok(())) => {
                        for seg in job.segments {
                            self.blobs.remove_segment(seg)?;
                        }
                    }
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "making a collection durable failed; retrying");
                        self.retired.extend(job.segments);
                    }
                    Err(_) => {
                        tracing::warn!("the collection durability thread panicked; retrying");
                        self.retired.extend(job.segments);
                    }
                }
            }
        }
        if self.durability.is_some() || self.retired.is_empty() {
            return Ok(());
        }
        let segments = std::mem::take(&mut self.retired);
        // The copies went to the active segment of their time or a later one.
        let first_copy = self.blobs.synced_below();
        let files = self.blobs.handles_from(first_copy);
        let db = self.db.clone();
        let db_file = self.dir.join("db");
        let thread = std::thread::Builder::new()
            .name("pss-gc-sync".into())
            .spawn(move || -> Result<(), StateError> {
                for (seg, f) in files {
                    f.sync_data().map_err(|source| StateError::Io {
                        path: PathBuf::from(crate::blobs::segment_name(seg)),
                        source,
                    })?;
                }
                // sled's flush writes its buffers; the fsync of its file makes them durable.
                db.flush()?;
                std::fs::File::open(&db_file)
                    .and_then(|f| f.sync_all())
                    .map_err(|source| StateError::Io { path: db_file, source })?;
                Ok(())
            })
            .map_err(|source| StateError::Io { path: self.dir.clone(), source })?;
        self.durability = Some(DurabilityJob { segments, thread });
        Ok(())
    }

    /// Copies a mostly-dead sealed segment's live records to the active segment and
    /// points the index at the copies; the segment is deleted once the copies and the
    /// new index are durable (`tend_retired`), off this thread.
    fn collect(&mut self, seg: u32) -> Result<(), StateError> {
        let started = std::time::Instant::now();
        let base = self.blobs.end();
        let mut records = Vec::new();
        let mut moved = Vec::new();
        // The index knows every live record of the segment: read just those (a scan
        // read the whole segment, mostly dead bytes, from disk: direct writes leave
        // nothing of it in the page cache). Tombstones there are dead: the segment is
        // below the index's durable base, which has the deletes.
        let live = crate::index::read(&self.index).in_segment(seg);
        let reader = self.blobs.reader();
        for (key, old) in live {
            let data = reader.read(&key, &old)?.ok_or_else(|| {
                self.corrupt(format!(
                    "the record of a live block is gone from segment {seg} at {}",
                    old.offset
                ))
            })?;
            let at = base.1 + records.len() as u64;
            let n = crate::blobs::encode_record(&mut records, &key, old.version, 0, &data);
            moved.push((key, Loc { version: old.version, segment: base.0, offset: at, len: n }));
        }
        self.finish_collect(seg, started, records, moved)
    }

    /// Appends a collection's copies, points the index at them and retires the segment.
    fn finish_collect(
        &mut self,
        seg: u32,
        started: std::time::Instant,
        records: Vec<u8>,
        moved: Vec<(Vec<u8>, Loc)>,
    ) -> Result<(), StateError> {
        self.blobs.append(&records)?;
        {
            let mut index = crate::index::write(&self.index);
            for (key, loc) in &moved {
                self.blobs.add_live(loc);
                index.set_key(key, Some(*loc));
            }
        }
        // The copies are part of the log the index is rebuilt from; sled records its end.
        let mut batch = sled::Batch::default();
        self.record_blob_end(&mut batch);
        self.tree.apply_batch(batch)?;
        self.blobs.retire(seg);
        self.retired.push(seg);
        let (files, bytes) = self.blobs.usage();
        tracing::debug!(
            segment = seg,
            moved = moved.len(),
            files,
            bytes,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "blob segment collected"
        );
        Ok(())
    }

    /// Blob segment files and their total bytes.
    pub fn blob_usage(&self) -> (usize, u64) {
        self.blobs.usage()
    }

    /// Records a member's address (from an applied conf change).
    pub fn set_member(&self, p: &mut Pending, id: u64, address: Option<&str>) {
        match address {
            Some(a) => p.txn.insert(member_key(id), a.as_bytes().to_vec()),
            None => p.txn.remove(member_key(id)),
        }
    }

    /// Applies one command of the entry at `index`.
    pub fn apply(
        &mut self,
        p: &mut Pending,
        index: u64,
        cmd: &Command,
    ) -> Result<Outcome, StateError> {
        if p.dedupe_new.as_ref().is_some_and(|new| new.index != index) {
            self.dedupe_end_entry(p);
        }
        if let Some(req) = &cmd.acquire {
            Ok(Outcome::Acquire(self.acquire(p, index, req)?))
        } else if let Some(req) = &cmd.write {
            Ok(Outcome::Write(self.write(p, index, req)?))
        } else {
            Ok(Outcome::Write(Err(ApplyError::Invalid("empty command".into()))))
        }
    }

    /// The first reply of `kind` to a remembered request id: the newest entry's, if the
    /// id is remembered by several.
    fn dedupe_get(
        &self,
        p: &Pending,
        id: &Option<pb::RequestId>,
        kind: Kind,
    ) -> Result<Option<DedupeItem>, StateError> {
        let Some(id) = id else { return Ok(None) };
        let Some(holders) = self.dedupe_index.get(&self.id_hash(id)) else { return Ok(None) };
        let mut best: Option<(u64, DedupeItem)> = None;
        for index in holders.iter() {
            if best.as_ref().is_some_and(|(b, _)| *b >= index) {
                continue;
            }
            let stored;
            let record: &[u8] = match &p.dedupe_new {
                Some(new) if new.index == index => &new.record,
                _ => {
                    let Some(v) = p.txn.get(&dedupe_entry_key(index))? else {
                        return Err(self.dedupe_corrupt(format!(
                            "the mirror says entry {index} remembers a request id, \
                             but its dedupe record is missing"
                        )));
                    };
                    stored = v;
                    &stored
                }
            };
            let entry = DedupeEntry::decode(record).map_err(|e| {
                self.dedupe_corrupt(format!("the dedupe record of entry {index}: {e}"))
            })?;
            let hit = entry.items.into_iter().rev().find(|i| {
                i.id.as_ref() == Some(id)
                    && match kind {
                        Kind::Acquire => i.acquire.is_some(),
                        Kind::Write => i.write.is_some(),
                    }
            });
            if let Some(item) = hit {
                best = Some((index, item));
            }
        }
        Ok(best.map(|(_, item)| item))
    }

    fn dedupe_corrupt(&self, reason: String) -> StateError {
        StateError::Corrupt { path: self.dir.clone(), reason }
    }

    /// The dedupe limit the leader that proposed the entry about to be applied stamped
    /// in it (`CommandBatch::dedupe_limit`; 0: this node's own): request ids are forgotten
    /// by it, the same on every replica.
    pub fn set_entry_dedupe_limit(&mut self, limit: u64) {
        self.entry_dedupe_limit = if limit == 0 { self.dedupe_limit } else { limit };
    }

    /// Remembers a request's reply in the record of its entry (written when the entry
    /// ends).
    fn dedupe_put(&mut self, p: &mut Pending, index: u64, item: DedupeItem) {
        let Some(id) = &item.id else { return };
        let h = self.id_hash(id);
        self.hold(h, index);
        let limit = self.entry_dedupe_limit;
        let new = p.dedupe_new.get_or_insert_with(|| NewDedupeEntry {
            index,
            record: Vec::new(),
            hashes: Vec::new(),
            limit,
        });
        debug_assert_eq!(new.index, index, "the previous entry was not ended");
        // A repeated field's encoding is its items' encodings one after another.
        new.record.push(DEDUPE_ITEM_KEY);
        // Encoding into a Vec cannot fail (it grows).
        let _ = item.encode_length_delimited(&mut new.record);
        new.hashes.push(h);
    }

    /// Ends the entry whose ids are being remembered: writes its record, then forgets the
    /// oldest entries' records while the table holds more than `dedupe_table_entries` ids.
    fn dedupe_end_entry(&mut self, p: &mut Pending) {
        let Some(new) = p.dedupe_new.take() else { return };
        p.txn.insert(dedupe_entry_key(new.index).to_vec(), new.record);
        self.dedupe_count += new.hashes.len() as u64;
        self.dedupe_order.push_back((new.index, new.hashes.into_boxed_slice()));
        while self.dedupe_count > new.limit {
            let Some((old, hashes)) = self.dedupe_order.pop_front() else { break };
            for &h in &hashes {
                self.release(h, old);
            }
            p.txn.remove(dedupe_entry_key(old).to_vec());
            self.dedupe_count = self.dedupe_count.saturating_sub(hashes.len() as u64);
        }
    }

    fn acquire(
        &mut self,
        p: &mut Pending,
        index: u64,
        req: &pb::AcquireVolumeRequest,
    ) -> Result<Result<pb::AcquireVolumeReply, ApplyError>, StateError> {
        if let Some(reply) = self.dedupe_get(p, &req.request_id, Kind::Acquire)? {
            if let Some(reply) = reply.acquire {
                return Ok(Ok(reply));
            }
        }
        if let Err(e) = VolumeName::new(req.volume.as_str()) {
            return Ok(Err(ApplyError::Invalid(format!("invalid `volume`: {e}"))));
        }
        let key = volume_key(&req.volume);
        let (mut meta, created) = match p.txn.get(&key)? {
            Some(v) => {
                let meta = pb::VolumeMeta::decode(&v[..]).unwrap_or_default();
                // A create is the creator's: one that finds a volume someone else made
                // (another credential, another block size) takes nothing over, and above
                // all does not raise the epoch its owner writes back with.
                if let Some(spec) = &req.create {
                    let why = if spec.credential_hash != meta.credential_hash {
                        Some("it belongs to another credential".to_owned())
                    } else if spec.block_size != meta.block_size {
                        Some(format!("its block size is {}", meta.block_size))
                    } else {
                        None
                    };
                    if let Some(why) = why {
                        return Ok(Err(ApplyError::Exists { volume: req.volume.clone(), why }));
                    }
                }
                (meta, false)
            }
            None => {
                let Some(spec) = &req.create else {
                    return Ok(Err(ApplyError::NotFound(req.volume.clone())));
                };
                if let Err(e) = BlockSize::new(spec.block_size) {
                    return Ok(Err(ApplyError::Invalid(format!("invalid `block_size`: {e}"))));
                }
                if !spec.credential_hash.is_empty() && spec.credential_hash.len() != 32 {
                    return Ok(Err(ApplyError::Invalid(format!(
                        "credential_hash must be 32 bytes (sha256), got {}",
                        spec.credential_hash.len()
                    ))));
                }
                let meta = pb::VolumeMeta {
                    volume: req.volume.clone(),
                    block_size: spec.block_size,
                    credential_hash: spec.credential_hash.clone(),
                    ..Default::default()
                };
                (meta, true)
            }
        };
        if req.expected_epoch != 0 && req.expected_epoch != meta.epoch {
            return Ok(Err(ApplyError::StaleEpoch {
                presented: Epoch(req.expected_epoch),
                current: Epoch(meta.epoch),
            }));
        }
        meta.epoch += 1;
        meta.owner_node.clone_from(&req.owner_node);
        meta.owner_address.clone_from(&req.owner_address);
        meta.owner_session = req.owner_session;
        p.txn.insert(key, meta.encode_to_vec());
        if created {
            self.volumes.fetch_add(1, Ordering::Relaxed);
        }
        let reply = pb::AcquireVolumeReply { meta: Some(meta), created };
        self.dedupe_put(
            p,
            index,
            DedupeItem { id: req.request_id.clone(), acquire: Some(reply.clone()), write: None },
        );
        Ok(Ok(reply))
    }

    fn write(
        &mut self,
        p: &mut Pending,
        index: u64,
        req: &pb::WriteBatchRequest,
    ) -> Result<Result<pb::WriteBatchReply, ApplyError>, StateError> {
        if let Some(reply) = self.dedupe_get(p, &req.request_id, Kind::Write)? {
            if let Some(mut reply) = reply.write {
                reply.duplicate = true;
                return Ok(Ok(reply));
            }
        }
        let key = volume_key(&req.volume);
        let Some(v) = p.txn.get(&key)? else {
            return Ok(Err(ApplyError::NotFound(req.volume.clone())));
        };
        let mut meta = pb::VolumeMeta::decode(&v[..]).unwrap_or_default();
        if req.epoch < meta.epoch {
            return Ok(Err(ApplyError::StaleEpoch {
                presented: Epoch(req.epoch),
                current: Epoch(meta.epoch),
            }));
        }
        if req.epoch > meta.epoch {
            return Ok(Err(ApplyError::FutureEpoch {
                presented: Epoch(req.epoch),
                current: Epoch(meta.epoch),
            }));
        }
        // Validate every op first: a batch applies whole or not at all.
        if let Some(op) =
            req.ops.iter().find(|o| !o.delete && o.data.len() > meta.block_size as usize)
        {
            return Ok(Err(ApplyError::Invalid(format!(
                "block {} has {} bytes; the volume's block size is {} bytes",
                op.block,
                op.data.len(),
                meta.block_size
            ))));
        }
        // Room for this command's records at once (a write-back batch is ~1 MiB).
        let key_len = block_prefix(&req.volume).len() + 8;
        let need: usize =
            req.ops.iter().map(|o| crate::blobs::HEADER + key_len + o.data.len()).sum();
        p.records.reserve(need);
        for op in &req.ops {
            let bkey = block_key(&req.volume, op.block);
            // This group's own earlier change first, then the shared index.
            let old = match p.index.get(&bkey) {
                Some(old) => *old,
                None => crate::index::read(&self.index).get(&req.volume, op.block),
            };
            if let Some(old) = &old {
                self.blobs.remove_live(old);
            }
            if op.delete {
                if old.is_some() {
                    // A tombstone, so the index rebuilt from the blob log sees the delete.
                    crate::blobs::encode_tombstone(&mut p.records, &bkey, index);
                    p.index.insert(bkey, None);
                    meta.block_count = meta.block_count.saturating_sub(1);
                }
                continue;
            }
            let version = if op.version > 0 {
                op.version
            } else {
                old.map_or(0, |l| l.version).saturating_add(1)
            };
            let offset = p.base.1 + p.records.len() as u64;
            let len = crate::blobs::encode_record(&mut p.records, &bkey, version, index, &op.data);
            let loc = Loc { version, segment: p.base.0, offset, len };
            self.blobs.add_live(&loc);
            if old.is_none() {
                meta.block_count += 1;
            }
            p.index.insert(bkey, Some(loc));
        }
        if p.records.len() >= FLUSH_RECORDS_BYTES {
            // Written as the group goes (before anything points at them; nothing else
            // appends until the group commits), so the buffer stays reusable.
            self.blobs.append(&p.records)?;
            p.base.1 += p.records.len() as u64;
            p.records.clear();
        }
        meta.persisted_lsn = meta.persisted_lsn.max(req.persisted_lsn);
        meta.written_epoch = req.epoch;
        let reply = pb::WriteBatchReply {
            raft_index: index,
            duplicate: false,
            persisted_lsn: meta.persisted_lsn,
        };
        p.txn.insert(key, meta.encode_to_vec());
        self.dedupe_put(
            p,
            index,
            DedupeItem { id: req.request_id.clone(), acquire: None, write: Some(reply) },
        );
        Ok(Ok(reply))
    }

    /// A read handle that other threads use while this state machine applies.
    pub fn reader(&self) -> Reader {
        Reader {
            tree: self.tree.clone(),
            blobs: self.blobs.reader(),
            index: self.index.clone(),
            volumes: self.volumes.clone(),
        }
    }
    /// Writes the whole state (as of the applied index) to a snapshot file, durably, on
    /// this thread. See [`StateMachine::snapshot_view`] for doing it off the Raft thread.
    pub fn write_snapshot(&self, path: &Path, meta: &SnapshotMetadata) -> Result<u64, StateError> {
        self.snapshot_view()?.write(path, meta, &AtomicBool::new(false))
    }

    /// A frozen copy of the state's index (as of the applied index, which the caller
    /// guarantees no one changes meanwhile), with the blob segments it points into held
    /// open: writing it out (which reads every block) can then run on another thread
    /// while the state machine moves on. Collected segments stay readable through the
    /// held handles; records are never rewritten in place.
    pub fn snapshot_view(&self) -> Result<SnapshotView, StateError> {
        Ok(SnapshotView {
            pairs: self.other_pairs()?,
            blocks: crate::index::read(&self.index).copy(),
            blobs: self.blobs.reader().pinned(),
            dir: self.dir.clone(),
        })
    }

    /// Replaces the whole state with a snapshot file's or a checkpoint directory's;
    /// returns its metadata.
    pub fn load_snapshot(&mut self, path: &Path) -> Result<SnapshotMetadata, StateError> {
        if path.is_dir() {
            let cp = crate::snapshot::Checkpoint::open(path)?;
            let (meta, pairs) = cp.pairs()?;
            return self.load_pairs(meta, pairs);
        }
        // Read as it is loaded (a snapshot holds every block of the state), after its
        // checksum is checked through a buffer.
        let corrupt = |reason| StateError::Corrupt { path: path.to_owned(), reason };
        crate::snapshot::check_framed(path, SNAPSHOT_MAGIC).map_err(corrupt)?;
        let (meta, pairs) = crate::snapshot::read_framed(path, SNAPSHOT_MAGIC).map_err(corrupt)?;
        self.load_pairs(meta, pairs)
    }

    fn load_pairs<'a>(
        &mut self,
        meta: SnapshotMetadata,
        pairs: impl Iterator<Item = Pair<'a>>,
    ) -> Result<SnapshotMetadata, StateError> {
        // Applied index first goes away, so a crash mid-load shows "nothing applied" and
        // the load is redone from the durable snapshot file.
        self.tree.remove(META_APPLIED)?;
        self.tree.clear()?;
        // Durable before the blob files go (`reset` below deletes them): a crash between
        // the two would bring the old index back over deleted segments.
        flush_db(&self.db, &self.dir)?;
        self.sealed_recorded = None;
        if let Some(job) = self.durability.take() {
            let _ = job.thread.join();
        }
        self.retired.clear();
        // The tree's clear dropped the index base: the loaded records, from the fresh
        // blob store's start, are the whole index (`Scratch`).
        self.base = IndexBase::Scratch;
        let mut index = BlockIndex::default();
        let (seg, _) = self.blobs.end();
        self.blobs.reset(seg + 1)?;
        let mut batch = sled::Batch::default();
        let mut records = Vec::new();
        let mut base = self.blobs.end();
        for (n, pair) in pairs.enumerate() {
            let (k, v) = pair?;
            let (k, v) = (&k[..], &v[..]);
            if k == META_APPLIED || k.first() == Some(&LOCAL_PREFIX) {
                continue;
            }
            if crate::snapshot::is_block_key(k) {
                let version = read_u64(v);
                let data = v.get(8..).unwrap_or_default();
                let offset = base.1 + records.len() as u64;
                let len = crate::blobs::encode_record(&mut records, k, version, meta.index, data);
                let loc = Loc { version, segment: base.0, offset, len };
                self.blobs.add_live(&loc);
                index.set_key(k, Some(loc));
            } else {
                batch.insert(k, v);
            }
            if n % 10_000 == 9_999 || records.len() >= 16 << 20 {
                // Records before the index entries that point at them.
                self.blobs.append(&std::mem::take(&mut records))?;
                self.record_blob_end(&mut batch);
                self.tree.apply_batch(std::mem::take(&mut batch))?;
                self.blobs.maybe_rotate()?;
                base = self.blobs.end();
            }
        }
        self.blobs.append(&records)?;
        self.record_blob_end(&mut batch);
        self.tree.apply_batch(batch)?;
        *crate::index::write(&self.index) = index;
        self.load_dedupe()?;
        self.count_volumes()?;
        let p = self.begin();
        self.commit(p, meta.index, Some(meta.get_conf_state()))?;
        Ok(meta)
    }

    /// Adds to `batch` (the one recording what the blob records just appended stand for)
    /// the blob end, the first segment not known synced and, when they changed, the
    /// sealed segments' lengths from there on (see `LOCAL_BLOB_SEALED`).
    fn record_blob_end(&mut self, batch: &mut sled::Batch) {
        batch.insert(LOCAL_BLOB_END, &encode_end(self.blobs.end()));
        let (synced, sealed) = self.blobs.unsynced_sealed();
        batch.insert(LOCAL_BLOB_SYNCED, &encode_end((synced, 0)));
        if self.sealed_recorded.as_ref() != Some(&sealed) {
            batch.insert(LOCAL_BLOB_SEALED, encode_sealed(&sealed));
            self.sealed_recorded = Some(sealed);
        }
    }

    /// Starts a checkpoint of the state as of the applied index (which the caller
    /// guarantees no one changes meanwhile) in the directory `tmp`: seals the active blob
    /// segment, hard-links every segment into `tmp` and copies the index. The returned
    /// view writes the rest on any thread ([`CheckpointView::write`]). Runs on the Raft
    /// thread, the only one that deletes segments, so every linked file is there.
    pub fn checkpoint_view(&mut self, tmp: &Path) -> Result<CheckpointView, StateError> {
        let io = |source| StateError::Io { path: tmp.to_owned(), source };
        if tmp.exists() {
            std::fs::remove_dir_all(tmp).map_err(io)?;
        }
        std::fs::create_dir_all(tmp).map_err(io)?;
        self.blobs.seal_active()?;
        let mut segments = Vec::new();
        for (name, path) in self.blobs.sealed_segments() {
            std::fs::hard_link(&path, tmp.join(&name)).map_err(io)?;
            segments.push(name);
        }
        // The index from memory (a copy of the maps: milliseconds, where iterating
        // sled's block entries took ~0.5 s at 200k blocks, all of it on the Raft thread).
        let blocks = crate::index::read(&self.index).copy();
        let pairs = self.other_pairs()?;
        Ok(CheckpointView { pairs, blocks, at: self.blobs.end(), tmp: tmp.to_owned(), segments })
    }

    /// Every key but the blocks' (in memory) and the node-local ones.
    fn other_pairs(&self) -> Result<Vec<(sled::IVec, sled::IVec)>, StateError> {
        let mut pairs = Vec::new();
        let before = self.tree.range(..&b"b"[..]);
        let after = self.tree.range(&b"c"[..]..);
        for kv in before.chain(after) {
            let (k, v) = kv?;
            if k.first() != Some(&LOCAL_PREFIX) {
                pairs.push((k, v));
            }
        }
        Ok(pairs)
    }

    /// Asks sled to write its buffers out (not a durability point; see the module doc).
    pub fn flush(&self) {
        if let Err(e) = self.db.flush() {
            tracing::warn!(error = %e, "sled flush failed");
        }
    }
}

/// The state to put in a snapshot file; see [`StateMachine::snapshot_view`].
pub struct SnapshotView {
    pairs: Vec<(sled::IVec, sled::IVec)>,
    blocks: Vec<(Box<str>, BlockMap)>,
    blobs: BlobReader,
    dir: PathBuf,
}

impl SnapshotView {
    /// Writes the snapshot file durably: tmp file, fsync, rename, fsync dir. Stops with
    /// [`StateError::Cancelled`] (and no file) once `cancel` is set.
    pub fn write(
        &self,
        path: &Path,
        meta: &SnapshotMetadata,
        cancel: &AtomicBool,
    ) -> Result<u64, StateError> {
        let tmp = path.with_extension("tmp");
        let result = self.write_tmp(&tmp, path, meta, cancel);
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    fn write_tmp(
        &self,
        tmp: &Path,
        path: &Path,
        meta: &SnapshotMetadata,
        cancel: &AtomicBool,
    ) -> Result<u64, StateError> {
        let pairs =
            self.pairs.iter().map(|(k, v)| Ok((Cow::Borrowed(&k[..]), Cow::Borrowed(&v[..]))));
        // Blocks go in as `version | data` (the snapshot is self-contained: a node that
        // installs it has none of this node's blob files).
        let blocks = crate::snapshot::block_entries(&self.blocks).map(|(k, loc)| {
            let data = self.blobs.read(&k, &loc)?.ok_or_else(|| StateError::Corrupt {
                path: self.dir.clone(),
                reason: format!(
                    "block record at segment {} offset {} is gone",
                    loc.segment, loc.offset
                ),
            })?;
            let mut b = Vec::with_capacity(8 + data.len());
            b.extend_from_slice(&be(loc.version));
            b.extend_from_slice(&data);
            Ok((Cow::Owned(k), Cow::Owned(b)))
        });
        let pairs = pairs.chain(blocks);
        let size = crate::snapshot::write_framed(tmp, SNAPSHOT_MAGIC, meta, cancel, pairs)?;
        let io = |source| StateError::Io { path: tmp.to_owned(), source };
        std::fs::rename(tmp, path).map_err(io)?;
        if let Some(dir) = path.parent() {
            crate::storage::sync_dir(dir).map_err(io)?;
        }
        Ok(size)
    }
}

/// Reads of the applied state; cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct Reader {
    tree: sled::Tree,
    blobs: BlobReader,
    index: SharedIndex,
    volumes: Arc<AtomicUsize>,
}

impl Reader {
    /// A volume's metadata as of the applied index.
    pub fn volume(&self, volume: &str) -> Result<Option<pb::VolumeMeta>, StateError> {
        Ok(self
            .tree
            .get(volume_key(volume))?
            .map(|v| pb::VolumeMeta::decode(v.as_ref()).unwrap_or_default()))
    }

    /// Blocks as of the applied index (absent ones have `found == false`).
    pub fn blocks(&self, volume: &str, blocks: &[u64]) -> Result<Vec<pb::PssBlock>, StateError> {
        // Every block's location from one look at the index, so the answer is the state
        // between two applied groups, never part of a batch and not the rest. A collection
        // may move a record between the look and its read: look again, for all of them.
        'look: for _ in 0..3 {
            let locs: Vec<Option<Loc>> = {
                let index = crate::index::read(&self.index);
                blocks.iter().map(|&b| index.get(volume, b)).collect()
            };
            let mut out = Vec::with_capacity(blocks.len());
            for (&block, loc) in blocks.iter().zip(locs) {
                let Some(loc) = loc else {
                    out.push(pb::PssBlock { block, found: false, data: Vec::new(), version: 0 });
                    continue;
                };
                let Some(data) = self.blobs.read(&block_key(volume, block), &loc)? else {
                    continue 'look;
                };
                out.push(pb::PssBlock { block, found: true, version: loc.version, data });
            }
            return Ok(out);
        }
        Err(StateError::Moving { volume: volume.to_owned(), block: blocks[0] })
    }

    /// Volumes stored on this node (as of the applied index).
    pub fn volume_count(&self) -> usize {
        self.volumes.load(Ordering::Relaxed)
    }

    /// Blocks stored on this node (the block index's size).
    pub fn block_count(&self) -> usize {
        crate::index::read(&self.index).entries()
    }

    /// Blocks `volume` stores (from the index in memory, as of the applied index).
    pub fn volume_block_count(&self, volume: &str) -> usize {
        crate::index::read(&self.index).volume_entries(volume)
    }

    /// Whether `volume` has `block` stored.
    pub fn has_block(&self, volume: &str, block: u64) -> bool {
        crate::index::read(&self.index).get(volume, block).is_some()
    }

    /// Up to `limit` blocks from `start_block` on, in block order.
    pub fn list(
        &self,
        volume: &str,
        start_block: u64,
        limit: usize,
    ) -> Result<pb::ListBlocksReply, StateError> {
        let key_len = block_prefix(volume).len() + 8;
        let (blocks, next) = crate::index::read(&self.index).list(volume, start_block, limit);
        Ok(pb::ListBlocksReply {
            blocks: blocks
                .into_iter()
                .map(|(block, loc)| pb::BlockMeta {
                    block,
                    version: loc.version,
                    length: u32::try_from(loc.data_len(key_len)).unwrap_or(u32::MAX),
                })
                .collect(),
            more: next.is_some(),
            next_block: next.unwrap_or(0),
        })
    }
}

/// Makes sled's state durable: its own flush, then an fsync of its file.
fn flush_db(db: &sled::Db, dir: &Path) -> Result<(), StateError> {
    db.flush()?;
    let db_file = dir.join("db");
    std::fs::File::open(&db_file)
        .and_then(|f| f.sync_all())
        .map_err(|source| StateError::Io { path: db_file, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_a_directory_made_with_another_sled_segment_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sm");
        {
            let db = sled::Config::new().path(&path).segment_size(512 * 1024).open().unwrap();
            db.open_tree("sm").unwrap().insert(META_APPLIED, &be(7)).unwrap();
            db.flush().unwrap();
        }
        assert_eq!(existing_segment_size(&path), Some(512 * 1024));
        let sm = StateMachine::open(&path, Options::with_dedupe(10)).unwrap();
        assert_eq!(sm.applied().unwrap(), 7);
        drop(sm);
        let fresh = dir.path().join("fresh");
        drop(StateMachine::open(&fresh, Options::with_dedupe(10)).unwrap());
        assert_eq!(existing_segment_size(&fresh), Some(SLED_SEGMENT_BYTES));
    }

    fn write_cmd(volume: &str, epoch: u64, seq: u64, block: u64, data: &[u8]) -> Command {
        Command {
            origin: 1,
            seq,
            acquire: None,
            write: Some(pb::WriteBatchRequest {
                volume: volume.into(),
                epoch,
                request_id: Some(pb::RequestId { client_id: "c".into(), seq }),
                ops: vec![pb::PssBlockOp { block, data: data.to_vec(), delete: false, version: 0 }],
                persisted_lsn: seq,
            }),
            incarnation: 1,
        }
    }

    fn acquire_cmd(volume: &str, seq: u64) -> Command {
        Command {
            origin: 1,
            seq,
            acquire: Some(pb::AcquireVolumeRequest {
                volume: volume.into(),
                owner_node: "nms-a".into(),
                owner_address: "127.0.0.1:1".into(),
                owner_session: 0,
                expected_epoch: 0,
                create: Some(pb::CreateSpec { block_size: 4096, credential_hash: vec![] }),
                request_id: Some(pb::RequestId { client_id: "a".into(), seq }),
            }),
            write: None,
            incarnation: 1,
        }
    }

    /// The request ids (client, seq) in the dedupe table's entry records.
    fn remembered(sm: &StateMachine) -> Vec<(String, u64)> {
        sm.tree
            .scan_prefix([DEDUPE_PREFIX])
            .map(|kv| DedupeEntry::decode(&kv.unwrap().1[..]).unwrap())
            .flat_map(|e| e.items)
            .map(|i| i.id.map(|id| (id.client_id, id.seq)).unwrap())
            .collect()
    }

    fn run(sm: &mut StateMachine, index: u64, cmd: &Command) -> Outcome {
        let mut p = sm.begin();
        let out = sm.apply(&mut p, index, cmd).unwrap();
        sm.commit(p, index, None).unwrap();
        out
    }

    #[test]
    fn epochs_fence_duplicates_apply_once_and_dedupe_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = StateMachine::open(dir.path(), Options::with_dedupe(3)).unwrap();
        let Outcome::Acquire(Ok(a)) = run(&mut sm, 2, &acquire_cmd("v", 1)) else { panic!() };
        assert_eq!(a.meta.unwrap().epoch, 1);
        assert!(a.created);
        let Outcome::Write(Ok(w)) = run(&mut sm, 3, &write_cmd("v", 1, 1, 7, b"x")) else {
            panic!()
        };
        assert!(!w.duplicate);
        let Outcome::Write(Ok(w)) = run(&mut sm, 4, &write_cmd("v", 1, 1, 7, b"y")) else {
            panic!()
        };
        assert!(w.duplicate, "retried request id applies once");
        assert_eq!(w.raft_index, 3);
        assert_eq!(sm.reader().blocks("v", &[7]).unwrap()[0].data, b"x");
        assert_eq!(sm.reader().blocks("v", &[7]).unwrap()[0].version, 1);
        assert_eq!(sm.reader().volume("v").unwrap().unwrap().written_epoch, 1);
        // A second owner raises the epoch; the old one is fenced.
        let Outcome::Acquire(Ok(a)) = run(&mut sm, 5, &acquire_cmd("v", 2)) else { panic!() };
        let meta = a.meta.unwrap();
        assert_eq!(meta.epoch, 2);
        assert_eq!(meta.written_epoch, 1, "the record tells nothing was written at epoch 2");
        let Outcome::Write(Err(e)) = run(&mut sm, 6, &write_cmd("v", 1, 2, 7, b"z")) else {
            panic!()
        };
        assert_eq!(e, ApplyError::StaleEpoch { presented: Epoch(1), current: Epoch(2) });
        // Oversized block: refused whole.
        let big = vec![0u8; 4097];
        let Outcome::Write(Err(ApplyError::Invalid(_))) =
            run(&mut sm, 7, &write_cmd("v", 2, 3, 8, &big))
        else {
            panic!()
        };
        for seq in 10..20 {
            run(&mut sm, 10 + seq, &write_cmd("v", 2, seq, seq, b"k"));
        }
        assert_eq!(remembered(&sm).len(), 3, "dedupe table holds at most its limit");
        assert_eq!(sm.dedupe_index.len(), 3, "and so does its in-memory mirror");
        assert_eq!(sm.applied().unwrap(), 29);
        assert_eq!(sm.reader().volume("v").unwrap().unwrap().block_count, 11);
        assert_eq!(sm.reader().volume("v").unwrap().unwrap().written_epoch, 2);
        let list = sm.reader().list("v", 0, 5).unwrap();
        assert_eq!(list.blocks.len(), 5);
        assert!(list.more);
        assert_eq!(list.next_block, 14);
        // A remembered id is still found after a reopen (the mirror is rebuilt).
        drop(sm);
        let mut sm = StateMachine::open(dir.path(), Options::with_dedupe(3)).unwrap();
        let Outcome::Write(Ok(w)) = run(&mut sm, 30, &write_cmd("v", 2, 19, 19, b"again")) else {
            panic!()
        };
        assert!(w.duplicate, "id 19 is remembered across a reopen");
        assert_eq!(sm.reader().blocks("v", &[19]).unwrap()[0].data, b"k");
    }

    /// A read of several blocks while batches writing all of them apply sees each batch
    /// whole or not at all (one look at the index for all of them): blocks 1 and 2 are
    /// always written together, so they always read alike.
    #[test]
    fn a_read_of_several_blocks_never_sees_part_of_a_batch() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = StateMachine::open(dir.path(), Options::with_dedupe(16)).unwrap();
        run(&mut sm, 2, &acquire_cmd("v", 1));
        let reader = sm.reader();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let done = stop.clone();
        let writer = std::thread::spawn(move || {
            for n in 0..3000u64 {
                let mut cmd = write_cmd("v", 1, n + 2, 1, &[n as u8; 64]);
                let w = cmd.write.as_mut().unwrap();
                w.ops.push(pb::PssBlockOp {
                    block: 2,
                    data: vec![n as u8; 64],
                    ..w.ops[0].clone()
                });
                run(&mut sm, n + 3, &cmd);
            }
            done.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        let mut reads = 0u64;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            let got = reader.blocks("v", &[1, 2]).unwrap();
            assert_eq!(got[0].data, got[1].data, "a read saw part of a batch");
            reads += 1;
        }
        writer.join().unwrap();
        assert!(reads > 0);
    }

    /// Replicas configured with other `dedupe_table_entries` forget request ids by the
    /// limit the proposing leader stamped in each entry, so a retry gets the same answer on
    /// every one of them (by their own limits, one applied a forgotten acquire again and
    /// raised the epoch while another answered it a duplicate: their epochs parted).
    #[test]
    fn replicas_with_other_dedupe_limits_forget_alike() {
        let (d2, d4) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let mut small = StateMachine::open(d2.path(), Options::with_dedupe(2)).unwrap();
        let mut large = StateMachine::open(d4.path(), Options::with_dedupe(4)).unwrap();
        let mut answers = Vec::new();
        for sm in [&mut small, &mut large] {
            let mut epochs = Vec::new();
            // Ids 1..=4, one entry each, then id 1 again: the leader's limit is 3.
            for (index, seq) in (2..=6).zip([1, 2, 3, 4, 1]) {
                sm.set_entry_dedupe_limit(3);
                let Outcome::Acquire(Ok(a)) = run(sm, index, &acquire_cmd("v", seq)) else {
                    panic!()
                };
                epochs.push(a.meta.unwrap().epoch);
            }
            answers.push((epochs, sm.reader().volume("v").unwrap().unwrap().epoch));
        }
        assert_eq!(answers[0], answers[1], "the replicas agree");
        assert_eq!(answers[0].1, 5, "id 1 was forgotten (3 ids kept) and applied again");
    }

    /// A create that finds the volume made by another caller (another credential or block
    /// size) is refused and changes nothing: the owner's epoch stays, so its write-back is
    /// not fenced by someone who could never use the volume. The creator's own retry (same
    /// credential and block size) takes it as an acquire does.
    #[test]
    fn a_create_meeting_another_callers_volume_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = StateMachine::open(dir.path(), Options::with_dedupe(16)).unwrap();
        let with = |seq: u64, block_size: u32, cred: u8| {
            let mut c = acquire_cmd("v", seq);
            let a = c.acquire.as_mut().unwrap();
            a.create = Some(pb::CreateSpec { block_size, credential_hash: vec![cred; 32] });
            c
        };
        let Outcome::Acquire(Ok(a)) = run(&mut sm, 2, &with(1, 4096, 1)) else { panic!() };
        assert!(a.created);
        for (index, cmd, why) in [
            (3, with(2, 4096, 2), "another credential"),
            (4, with(3, 8192, 1), "block size is 4096"),
        ] {
            let Outcome::Acquire(Err(e)) = run(&mut sm, index, &cmd) else { panic!("{why}") };
            assert!(matches!(&e, ApplyError::Exists { .. }), "{e:?}");
            assert!(e.to_string().contains(why), "{e}");
            assert_eq!(sm.reader().volume("v").unwrap().unwrap().epoch, 1, "epoch unchanged");
        }
        let Outcome::Acquire(Ok(a)) = run(&mut sm, 5, &with(4, 4096, 1)) else { panic!() };
        assert!(!a.created);
        assert_eq!(a.meta.unwrap().epoch, 2, "the creator's own create acquires");
    }

    /// Nodes group committed entries into applies differently; what they remember and
    /// forget of request ids, and so every reply, must not depend on that.
    #[test]
    fn dedupe_forgets_by_entry_the_same_whatever_the_apply_grouping() {
        let entries: Vec<Vec<Command>> = (0..12u64)
            .map(|e| {
                // Two new ids per entry, and a retry of an id from one entry back (still
                // remembered) or three back (forgotten: limit 5 ids, whole entries at a time).
                let mut cmds = vec![
                    write_cmd("v", 1, 100 + 2 * e, e, b"a"),
                    write_cmd("v", 1, 101 + 2 * e, e + 50, b"b"),
                ];
                let back = if e % 2 == 0 { 1 } else { 3 };
                if e >= back {
                    cmds.push(write_cmd("v", 1, 100 + 2 * (e - back), 99, b"retry"));
                }
                cmds
            })
            .collect();
        let run_grouped = |group: usize| {
            let dir = tempfile::tempdir().unwrap();
            let mut sm = StateMachine::open(dir.path(), Options::with_dedupe(5)).unwrap();
            run(&mut sm, 2, &acquire_cmd("v", 1));
            let mut replies = Vec::new();
            for (n, chunk) in entries.chunks(group).enumerate() {
                let mut p = sm.begin();
                let mut last = 0;
                for (i, cmds) in chunk.iter().enumerate() {
                    let index = 3 + (n * group + i) as u64;
                    for c in cmds {
                        let Outcome::Write(r) = sm.apply(&mut p, index, c).unwrap() else {
                            panic!()
                        };
                        replies.push(r.map(|w| w.duplicate));
                    }
                    last = index;
                }
                sm.commit(p, last, None).unwrap();
            }
            let state: Vec<(Vec<u8>, Vec<u8>)> = sm
                .tree
                .iter()
                .map(|kv| kv.unwrap())
                .filter(|(k, _)| k[0] == b'd' || k[0] == b'o' || k == META_DEDUPE_COUNT)
                .map(|(k, v)| (k.to_vec(), v.to_vec()))
                .collect();
            (replies, state, sm.reader().blocks("v", &[99]).unwrap()[0].clone())
        };
        let one = run_grouped(1);
        let ids: usize = one
            .1
            .iter()
            .filter(|(k, _)| k[0] == DEDUPE_PREFIX)
            .map(|(_, v)| DedupeEntry::decode(&v[..]).unwrap().items.len())
            .sum();
        assert!((2..=5).contains(&ids), "{ids} ids remembered: at most 5, whole entries");
        assert!(one.0.contains(&Ok(true)) && one.0.contains(&Ok(false)));
        for group in [2, 3, 5, 12] {
            assert_eq!(run_grouped(group), one, "grouping {group}");
        }
    }

    /// A retried request id must apply once however the node came by its state: applied
    /// itself, reopened (the in-memory id index rebuilt from sled), or installed from a
    /// snapshot into a fresh state machine. An id beyond the table's limit is forgotten
    /// and applies again.
    #[test]
    fn retried_ids_stay_duplicates_across_reopen_and_snapshot_install() {
        let dir = tempfile::tempdir().unwrap();
        let opts = Options::with_dedupe(3);
        let mut sm = StateMachine::open(&dir.path().join("a"), opts).unwrap();
        run(&mut sm, 2, &acquire_cmd("v", 1));
        for seq in 1..=4 {
            run(&mut sm, 2 + seq, &write_cmd("v", 1, seq, seq, b"first"));
        }
        // Entry 7 remembers two ids; the table (3 ids) now holds ids 4, 5 and 6.
        let mut p = sm.begin();
        for seq in [5, 6] {
            sm.apply(&mut p, 7, &write_cmd("v", 1, seq, seq, b"first")).unwrap();
        }
        sm.commit(p, 7, None).unwrap();
        let ids = |sm: &StateMachine| {
            let mut r: Vec<u64> = remembered(sm).into_iter().map(|(_, s)| s).collect();
            r.sort_unstable();
            r
        };
        assert_eq!(ids(&sm), [4, 5, 6]);
        let retry = |sm: &mut StateMachine, index: u64, seq: u64| {
            let Outcome::Write(Ok(w)) = run(sm, index, &write_cmd("v", 1, seq, seq, b"again"))
            else {
                panic!("retry of {seq} failed")
            };
            w
        };
        let data = |sm: &StateMachine, block: u64| {
            sm.reader().blocks("v", &[block]).unwrap()[0].data.clone()
        };

        drop(sm);
        let mut sm = StateMachine::open(&dir.path().join("a"), opts).unwrap();
        for (index, seq, entry) in [(8, 5, 7), (9, 4, 6)] {
            let w = retry(&mut sm, index, seq);
            assert!(w.duplicate, "id {seq} is a duplicate after a reopen");
            assert_eq!(w.raft_index, entry, "the first reply of id {seq}");
            assert_eq!(data(&sm, seq), b"first");
        }
        let path = dir.path().join("snap");
        let meta = SnapshotMetadata { index: 9, term: 1, ..Default::default() };
        sm.write_snapshot(&path, &meta).unwrap();

        let mut fresh = StateMachine::open(&dir.path().join("b"), opts).unwrap();
        fresh.load_snapshot(&path).unwrap();
        assert_eq!(ids(&fresh), [4, 5, 6]);
        for (index, seq) in [(10, 6), (11, 4)] {
            let w = retry(&mut fresh, index, seq);
            assert!(w.duplicate, "id {seq} is a duplicate after a snapshot install");
            assert_eq!(data(&fresh, seq), b"first");
        }
        // Id 1 was forgotten (its entry left the table whole): it applies again.
        let w = retry(&mut fresh, 12, 1);
        assert!(!w.duplicate);
        assert_eq!(w.raft_index, 12);
        assert_eq!(data(&fresh, 1), b"again");
        assert_eq!(ids(&fresh), [1, 5, 6], "remembering id 1 forgot entry 6 (id 4)");
        assert_eq!(fresh.dedupe_index.len(), 3);
        assert_eq!(fresh.dedupe_count, 3);
    }

    /// A request id wrongly reused for another kind of command applies that command once
    /// too, and a retry of either gets its own kind's first reply (the acquire is not
    /// applied again, which would raise the epoch a second time).
    #[test]
    fn an_id_reused_for_another_kind_is_remembered_for_each() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = StateMachine::open(dir.path(), Options::with_dedupe(100)).unwrap();
        let acquire = acquire_cmd("v", 1);
        let mut write = write_cmd("v", 1, 1, 7, b"x");
        write.write.as_mut().unwrap().request_id =
            acquire.acquire.as_ref().unwrap().request_id.clone();
        let Outcome::Acquire(Ok(a)) = run(&mut sm, 2, &acquire) else { panic!() };
        let Outcome::Write(Ok(w)) = run(&mut sm, 3, &write) else { panic!() };
        assert!(!w.duplicate, "a write is not a duplicate of an acquire");
        for index in [4, 5] {
            let Outcome::Acquire(Ok(again)) = run(&mut sm, index, &acquire) else { panic!() };
            assert_eq!(again, a, "the acquire's first reply, epoch not raised again");
            let Outcome::Write(Ok(again)) = run(&mut sm, index, &write) else { panic!() };
            assert!(again.duplicate);
            assert_eq!(again.raft_index, 3);
            drop(sm);
            sm = StateMachine::open(dir.path(), Options::with_dedupe(100)).unwrap();
        }
        assert_eq!(sm.reader().volume("v").unwrap().unwrap().epoch, 1);
    }

    /// Buffered mode: with every blob end, sled records the length of each sealed segment
    /// not known synced, which `Blobs::open` checks the file against (a power loss can
    /// cut an unsynced file at a record boundary).
    #[test]
    fn the_lengths_of_sealed_unsynced_segments_are_recorded_with_the_blob_end() {
        let dir = tempfile::tempdir().unwrap();
        let opts =
            Options { blob_segment_bytes: 1024, direct_io: false, ..Options::with_dedupe(100) };
        let mut sm = StateMachine::open(dir.path(), opts).unwrap();
        run(&mut sm, 2, &acquire_cmd("v", 1));
        for index in 3..40u64 {
            run(&mut sm, index, &write_cmd("v", 1, index, index % 4, &[index as u8; 1000]));
            let get = |k: &[u8]| sm.tree.get(k).unwrap().expect("recorded");
            let end = read_end(&get(LOCAL_BLOB_END));
            let synced = read_end(&get(LOCAL_BLOB_SYNCED)).0;
            let sealed = read_sealed(&get(LOCAL_BLOB_SEALED));
            for seg in synced..end.0 {
                let path = dir.path().join("blobs").join(crate::blobs::segment_name(seg));
                let Ok(meta) = std::fs::metadata(&path) else { continue };
                assert_eq!(sealed.get(&seg), Some(&meta.len()), "segment {seg} at index {index}");
            }
            assert!(sealed.keys().all(|&seg| seg >= synced && seg < end.0), "{sealed:?}");
        }
        drop(sm);
        let sm = StateMachine::open(dir.path(), opts).unwrap();
        assert_eq!(sm.applied().unwrap(), 39);
    }

    #[test]
    fn overwrites_are_collected_and_blocks_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let opts = Options {
            dedupe_limit: 100,
            blob_segment_bytes: 64 * 1024,
            blob_gc_live_percent: 50,
            blob_gc_space_percent: 200,
            direct_io: true,
        };
        let mut sm = StateMachine::open(dir.path(), opts).unwrap();
        run(&mut sm, 2, &acquire_cmd("v", 1));
        // 8 blocks of 1 KiB rewritten 50 times: ~400 KiB written, 8 KiB live. A checkpoint
        // after 45 rounds makes the segments before it collectable.
        let mut index = 3;
        for round in 0..50u64 {
            if round == 45 {
                checkpoint(&mut sm, &dir.path().join("snap"), index - 1);
            }
            for block in 0..8u64 {
                let data = vec![(round * 8 + block) as u8; 1024];
                run(&mut sm, index, &write_cmd("v", 1, index, block, &data));
                index += 1;
            }
        }
        let (files, bytes) = sm.blob_usage();
        assert!(files <= 4, "{files} segment files: collection did not run");
        assert!(bytes < 4 * 64 * 1024, "{bytes} bytes of segments");
        // Collected segments are deleted once the copies and the index are durable.
        sm.finish_collections().unwrap();
        let on_disk = std::fs::read_dir(dir.path().join("blobs"))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "blob"))
            .count();
        assert_eq!(on_disk, files, "collected segment files left on disk");
        let check = |sm: &StateMachine| {
            for block in 0..8u64 {
                let b = &sm.reader().blocks("v", &[block]).unwrap()[0];
                assert_eq!(b.data, vec![(49 * 8 + block) as u8; 1024], "block {block}");
                assert_eq!(b.version, 50);
            }
        };
        check(&sm);
        drop(sm);
        let sm = StateMachine::open(dir.path(), opts).unwrap();
        assert_eq!(sm.applied().unwrap(), index - 1);
        check(&sm);
        assert_eq!(sm.reader().list("v", 0, 100).unwrap().blocks[3].length, 1024);
    }

    #[test]
    fn torn_block_data_empties_the_state_for_a_snapshot_reload() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = StateMachine::open(dir.path(), Options::with_dedupe(100)).unwrap();
        run(&mut sm, 2, &acquire_cmd("v", 1));
        run(&mut sm, 3, &write_cmd("v", 1, 1, 7, &[9; 4096]));
        drop(sm);
        // A power loss took blob pages that sled's state refers to.
        let seg = dir.path().join("blobs").join("0000000000.blob");
        let mut bytes = std::fs::read(&seg).unwrap();
        bytes[2000] ^= 0xff; // inside the block's data
        std::fs::write(&seg, bytes).unwrap();
        let mut sm = StateMachine::open(dir.path(), Options::with_dedupe(100)).unwrap();
        assert_eq!(sm.applied().unwrap(), 0, "nothing trusted: the snapshot is reloaded");
        assert!(sm.reader().volume("v").unwrap().is_none());
        // And the emptied state works.
        run(&mut sm, 2, &acquire_cmd("v", 1));
        run(&mut sm, 3, &write_cmd("v", 1, 1, 7, &[5; 4096]));
        assert_eq!(sm.reader().blocks("v", &[7]).unwrap()[0].data, vec![5; 4096]);
    }

    #[test]
    fn a_checkpoint_links_segments_and_outlives_collection() {
        let dir = tempfile::tempdir().unwrap();
        let opts = Options {
            dedupe_limit: 100,
            blob_segment_bytes: 64 * 1024,
            blob_gc_live_percent: 50,
            blob_gc_space_percent: 200,
            direct_io: true,
        };
        let mut sm = StateMachine::open(&dir.path().join("sm"), opts).unwrap();
        run(&mut sm, 2, &acquire_cmd("v", 1));
        let mut index = 3;
        let mut write_rounds = |sm: &mut StateMachine, rounds: std::ops::Range<u64>| {
            for round in rounds {
                for block in 0..8u64 {
                    let data = vec![(round * 8 + block) as u8; 1024];
                    run(sm, index, &write_cmd("v", 1, index, block, &data));
                    index += 1;
                }
            }
        };
        write_rounds(&mut sm, 0..20);
        let at = sm.applied().unwrap();
        let want: Vec<Vec<u8>> =
            (0..8u64).map(|b| sm.reader().blocks("v", &[b]).unwrap()[0].data.clone()).collect();
        let cp = dir.path().join("snap-1.d");
        let view = sm.checkpoint_view(&dir.path().join("snap-1.d.tmp")).unwrap();
        let meta = SnapshotMetadata { index: at, term: 1, ..Default::default() };
        let blob_at = view.at();
        let index_bytes = view.write(&cp, &meta, &AtomicBool::new(false)).unwrap();
        sm.set_index_base(IndexBase::Checkpoint { index: meta.index, at: blob_at }).unwrap();
        assert!(!dir.path().join("snap-1.d.tmp").exists());
        let linked: Vec<String> = std::fs::read_dir(&cp)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".blob"))
            .collect();
        assert!(!linked.is_empty());
        let linked_bytes: u64 =
            linked.iter().map(|n| std::fs::metadata(cp.join(n)).unwrap().len()).sum();
        assert!(
            index_bytes * 10 < linked_bytes,
            "the index ({index_bytes} bytes) is small beside the data it links ({linked_bytes})"
        );

        // The state moves on; collection deletes segments the checkpoint links.
        write_rounds(&mut sm, 20..80);
        let blobs = dir.path().join("sm/blobs");
        assert!(
            linked.iter().any(|n| !blobs.join(n).exists()),
            "no linked segment was collected: the test proves nothing"
        );

        // Loaded into a fresh state machine: the state at the checkpoint.
        let check = |sm: &StateMachine| {
            assert_eq!(sm.applied().unwrap(), at);
            for (b, data) in want.iter().enumerate() {
                assert_eq!(&sm.reader().blocks("v", &[b as u64]).unwrap()[0].data, data);
            }
        };
        let mut fresh = StateMachine::open(&dir.path().join("fresh"), opts).unwrap();
        assert_eq!(fresh.load_snapshot(&cp).unwrap().index, at);
        check(&fresh);
        // And as the self-contained file a member is sent.
        let file = dir.path().join("snap-1.snap");
        crate::snapshot::materialize(&cp, &file).unwrap();
        let mut other = StateMachine::open(&dir.path().join("other"), opts).unwrap();
        assert_eq!(other.load_snapshot(&file).unwrap().index, at);
        check(&other);
        // Damaged linked records are found, not loaded.
        for n in &linked {
            let seg = cp.join(n);
            let mut bytes = std::fs::read(&seg).unwrap();
            for i in (64..bytes.len()).step_by(512) {
                bytes[i] ^= 1;
            }
            std::fs::remove_file(&seg).unwrap();
            std::fs::write(&seg, bytes).unwrap();
        }
        let mut third = StateMachine::open(&dir.path().join("third"), opts).unwrap();
        assert!(matches!(third.load_snapshot(&cp), Err(StateError::Corrupt { .. })));
    }

    /// Takes a checkpoint at `index` in `snap_dir` and makes it the index's base (what
    /// the node does at a compaction), so collection may take the segments before it.
    fn checkpoint(sm: &mut StateMachine, snap_dir: &Path, index: u64) {
        std::fs::create_dir_all(snap_dir).unwrap();
        let cp = crate::snapshot::checkpoint_path(snap_dir, index);
        let view = sm.checkpoint_view(&cp.with_extension("d.tmp")).unwrap();
        let at = view.at();
        let meta = SnapshotMetadata { index, term: 1, ..Default::default() };
        view.write(&cp, &meta, &AtomicBool::new(false)).unwrap();
        sm.set_index_base(IndexBase::Checkpoint { index, at }).unwrap();
    }

    /// The block index as `(volume, block, version, bytes)`, sorted.
    fn index_of(sm: &StateMachine) -> Vec<(String, u64, u64, Vec<u8>)> {
        let entries: Vec<(String, u64)> =
            crate::index::read(&sm.index).iter().map(|(v, b, _)| (v.to_owned(), b)).collect();
        let mut out: Vec<_> = entries
            .into_iter()
            .map(|(v, b)| {
                let blk = sm.reader().blocks(&v, &[b]).unwrap().remove(0);
                assert!(blk.found, "{v}/{b} indexed but not readable");
                (v, b, blk.version, blk.data)
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn the_block_index_is_rebuilt_from_its_base_and_the_blob_log() {
        let dir = tempfile::tempdir().unwrap();
        let sm_dir = dir.path().join("sm");
        let snap_dir = dir.path().join("snap");
        std::fs::create_dir_all(&snap_dir).unwrap();
        let opts = |direct_io| Options {
            dedupe_limit: 100,
            blob_segment_bytes: 16 * 1024,
            blob_gc_live_percent: 50,
            blob_gc_space_percent: 200,
            direct_io,
        };
        let mut sm = StateMachine::open_in(&sm_dir, &snap_dir, opts(true)).unwrap();
        let index = std::cell::Cell::new(2u64);
        run(&mut sm, index.get(), &acquire_cmd("v", 1));
        // Writes over 10 blocks, every fifth op a delete (a tombstone in the blob log).
        let seq = std::cell::Cell::new(0u64);
        let rounds = |sm: &mut StateMachine, n: u64| {
            for _ in 0..n {
                seq.set(seq.get() + 1);
                index.set(index.get() + 1);
                let s = seq.get();
                let block = (s * 7) % 10;
                let mut cmd = write_cmd("v", 1, s, block, &vec![s as u8; 1000]);
                if s.is_multiple_of(5) {
                    cmd.write.as_mut().unwrap().ops[0].delete = true;
                }
                run(sm, index.get(), &cmd);
            }
        };
        rounds(&mut sm, 120);
        assert_eq!(sm.index_base(), IndexBase::Scratch);
        assert!(sm.tree.scan_prefix(b"b").next().is_none(), "block entries are not in sled");
        let want = index_of(&sm);
        assert!(want.len() < 10, "deletes left some blocks out: {}", want.len());
        // Rebuilt from the whole blob log (no base yet).
        drop(sm);
        let mut sm = StateMachine::open_in(&sm_dir, &snap_dir, opts(false)).unwrap();
        assert_eq!(index_of(&sm), want, "rebuilt from scratch");
        // A checkpoint becomes the base; more writes, collections (only below the base)
        // and a reopen: the base's index plus the records after it.
        let cp = crate::snapshot::checkpoint_path(&snap_dir, index.get());
        let view = sm.checkpoint_view(&cp.with_extension("d.tmp")).unwrap();
        let at = view.at();
        let meta = SnapshotMetadata { index: index.get(), term: 1, ..Default::default() };
        view.write(&cp, &meta, &AtomicBool::new(false)).unwrap();
        sm.set_index_base(IndexBase::Checkpoint { index: index.get(), at }).unwrap();
        rounds(&mut sm, 200);
        sm.finish_collections().unwrap();
        let want = index_of(&sm);
        let volume_before = sm.reader().volume("v").unwrap();
        drop(sm);
        let sm = StateMachine::open_in(&sm_dir, &snap_dir, opts(true)).unwrap();
        assert_eq!(sm.index_base(), IndexBase::Checkpoint { index: meta.index, at });
        assert_eq!(index_of(&sm), want, "rebuilt from the checkpoint and the records after it");
        assert_eq!(sm.reader().volume("v").unwrap(), volume_before);
        let count = want.len() as u64;
        assert_eq!(volume_before.unwrap().block_count, count);
        assert_eq!(sm.reader().list("v", 0, 100).unwrap().blocks.len() as u64, count);
    }

    /// A checkpoint with nothing applied after it (an idle cluster) seals the active blob
    /// segment: its base starts past the blob end sled recorded. Writes after a restart
    /// must still be found after the next restart (they went into the segment the base
    /// starts after, and the index replay skipped them).
    #[test]
    fn writes_after_a_restart_following_an_idle_checkpoint_survive_the_next_restart() {
        // (as_older_pss: the state as a PSS that did not record the blob end with the
        // base left it, which the open must repair.)
        for (direct_io, as_older_pss) in [(false, false), (true, false), (false, true)] {
            let dir = tempfile::tempdir().unwrap();
            let (sm_dir, snap_dir) = (dir.path().join("sm"), dir.path().join("snap"));
            let opts = Options { direct_io, ..Options::with_dedupe(100) };
            let mut sm = StateMachine::open_in(&sm_dir, &snap_dir, opts).unwrap();
            run(&mut sm, 2, &acquire_cmd("v", 1));
            run(&mut sm, 3, &write_cmd("v", 1, 1, 1, b"one"));
            let before = sm.blobs.end();
            checkpoint(&mut sm, &snap_dir, 3);
            if as_older_pss {
                sm.tree.insert(LOCAL_BLOB_END, &encode_end(before)).unwrap();
                flush_db(&sm.db, &sm.dir).unwrap();
            } else {
                // The durable blob end is not behind the base's position.
                let end = read_end(&sm.tree.get(LOCAL_BLOB_END).unwrap().unwrap());
                let at = sm.index_base().at();
                assert!(Some(end) >= at, "{end:?} before {at:?}");
            }
            drop(sm);
            let mut sm = StateMachine::open_in(&sm_dir, &snap_dir, opts).unwrap();
            run(&mut sm, 4, &write_cmd("v", 1, 2, 2, b"two"));
            drop(sm);
            let sm = StateMachine::open_in(&sm_dir, &snap_dir, opts).unwrap();
            let got = sm.reader().blocks("v", &[1, 2]).unwrap();
            let case = format!("direct_io {direct_io}, as an older PSS left it {as_older_pss}");
            assert_eq!(got[0].data, b"one", "{case}");
            assert!(got[1].found, "the write after the restart is lost ({case})");
            assert_eq!(got[1].data, b"two");
            assert_eq!(sm.reader().volume("v").unwrap().unwrap().block_count, 2);
        }
    }

    #[test]
    fn a_group_larger_than_the_record_buffer_is_written_whole() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = StateMachine::open(dir.path(), Options::with_dedupe(100)).unwrap();
        run(&mut sm, 2, &acquire_cmd("v", 1));
        // Two commands of 700 blocks (~5.7 MiB of records) in one group: the records
        // go out as the group goes.
        let mut p = sm.begin();
        for c in 0..2u64 {
            let mut cmd = write_cmd("v", 1, 10 + c, 0, b"");
            cmd.write.as_mut().unwrap().ops = (0..700u64)
                .map(|b| pb::PssBlockOp {
                    block: c * 1000 + b,
                    data: vec![(b % 251) as u8 + c as u8; 4096],
                    delete: false,
                    version: 0,
                })
                .collect();
            assert!(matches!(sm.apply(&mut p, 3 + c, &cmd).unwrap(), Outcome::Write(Ok(_))));
        }
        sm.commit(p, 4, None).unwrap();
        let check = |sm: &StateMachine| {
            for c in 0..2u64 {
                let blocks: Vec<u64> = (0..700).map(|b| c * 1000 + b).collect();
                for (b, got) in sm.reader().blocks("v", &blocks).unwrap().iter().enumerate() {
                    assert_eq!(got.data, vec![(b as u64 % 251) as u8 + c as u8; 4096]);
                }
            }
        };
        check(&sm);
        drop(sm);
        check(&StateMachine::open(dir.path(), Options::with_dedupe(100)).unwrap());
    }

    #[test]
    fn a_state_directory_with_the_index_in_sled_is_adopted() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = StateMachine::open(dir.path(), Options::with_dedupe(100)).unwrap();
        run(&mut sm, 2, &acquire_cmd("v", 1));
        run(&mut sm, 3, &write_cmd("v", 1, 1, 7, b"seven"));
        run(&mut sm, 4, &write_cmd("v", 1, 2, 8, b"eight"));
        // As an older PSS left it: every block entry in sled, no index base.
        let entries: Vec<(Vec<u8>, Loc)> =
            crate::index::read(&sm.index).iter().map(|(v, b, l)| (block_key(v, b), l)).collect();
        for (k, l) in &entries {
            sm.tree.insert(k, &l.encode()).unwrap();
        }
        sm.tree.remove(LOCAL_INDEX_BASE).unwrap();
        drop(sm);
        let mut sm = StateMachine::open(dir.path(), Options::with_dedupe(100)).unwrap();
        assert!(matches!(sm.index_base(), IndexBase::Sled { .. }));
        run(&mut sm, 5, &write_cmd("v", 1, 3, 9, b"nine"));
        drop(sm);
        // sled's entries are the base; the newer write comes from the blob log.
        let mut sm = StateMachine::open(dir.path(), Options::with_dedupe(100)).unwrap();
        let got = sm.reader().blocks("v", &[7, 8, 9]).unwrap();
        assert_eq!(got[0].data, b"seven");
        assert_eq!(got[1].data, b"eight");
        assert_eq!(got[2].data, b"nine");
        // The first checkpoint base drops them from sled.
        sm.set_index_base(IndexBase::Checkpoint { index: 5, at: sm.blobs.end() }).unwrap();
        assert!(sm.tree.scan_prefix(b"b").next().is_none());
    }

    #[test]
    fn snapshot_round_trips_and_corruption_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let mut sm = StateMachine::open(&dir.path().join("a"), Options::with_dedupe(100)).unwrap();
        run(&mut sm, 2, &acquire_cmd("v", 1));
        run(&mut sm, 3, &write_cmd("v", 1, 1, 7, b"hello"));
        let meta = SnapshotMetadata { index: 3, term: 1, ..Default::default() };
        let path = dir.path().join("snap");
        sm.write_snapshot(&path, &meta).unwrap();
        let mut other =
            StateMachine::open(&dir.path().join("b"), Options::with_dedupe(100)).unwrap();
        run(&mut other, 2, &acquire_cmd("w", 1));
        assert_eq!(other.load_snapshot(&path).unwrap().index, 3);
        assert_eq!(other.applied().unwrap(), 3);
        assert!(other.reader().volume("w").unwrap().is_none());
        assert_eq!(other.reader().blocks("v", &[7]).unwrap()[0].data, b"hello");
        let mut bytes = std::fs::read(&path).unwrap();
        let n = bytes.len() / 2;
        bytes[n] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        assert!(matches!(other.load_snapshot(&path), Err(StateError::Corrupt { .. })));
    }
}
