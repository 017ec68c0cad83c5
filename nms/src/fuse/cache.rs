//! The vehicle side of the mount: a disk cache and a crash-safe write journal in front of the
//! volume, and the uploader that drains the journal to the volume in order.
//!
//! - **Journal**: every batch of block changes is appended to a segment file under
//!   `<cache-dir>/journal/` and `fdatasync`ed before the file system call returns, so it
//!   survives a crash of the mount process (and of the OBU). Records carry a sequence number, a
//!   CRC and whether they end their batch (one `apply`); recovery drops the last segment's tail
//!   from its first torn record or incomplete batch, so a batch is replayed whole or not at all
//!   (the format is on `Record`). A failed append is cut back to the last whole batch (or, if
//!   that fails too, ends the journal's appends for the mount) and uses no sequence numbers. The
//!   unpersisted bytes are bounded by `journal_limit_bytes`: past it, writers wait (up to the
//!   operation timeout) for the uploader to make room.
//! - **Uploader**: one owned task sends records to the volume in journal order, one at a time
//!   (so two changes to one block can never be reordered), retrying with capped backoff while
//!   the NMS is unreachable or the volume moves. After a flush of the volume (the persisted
//!   barrier) it deletes the segments whose records are all persisted. Replaying a record that
//!   was already applied before a crash is harmless: the records are replayed as a sequence from
//!   the first unpersisted one, and replaying a prefix of overwrites again in order ends in the
//!   same bytes.
//! - **Cache**: full-block images under `<cache-dir>/blocks/`, up to `cache_capacity_bytes`,
//!   least recently used evicted first. A block with records not yet accepted by the NMS is
//!   pinned (its only up-to-date copy is local). The mount is the volume's only writer, so a cached
//!   block is fresh for the life of the mount; the cache is emptied at mount time.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::runtime::Handle;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::device::{check_range, BlockDevice, BlockOp, DeviceError};

/// Why the volume did not take an operation.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    /// Transient (NMS unreachable, volume moving, PSS down): retry later.
    #[error("volume unavailable: {0}")]
    Unavailable(String),
    /// Permanent (bad credential, unknown volume, invalid request): retrying will not help.
    #[error("volume refused: {0}")]
    Refused(String),
}

/// The volume as the cache sees it. Implemented over `VolumeClient` by the mount, and in memory
/// by tests.
pub trait Remote: Send + Sync + 'static {
    /// A whole block; `None` if it was never written (or was deleted).
    fn read(&self, block: u64)
        -> impl Future<Output = Result<Option<Vec<u8>>, RemoteError>> + Send;
    /// Whole blocks in one round trip, in the order asked.
    fn read_many(
        &self,
        blocks: &[u64],
    ) -> impl Future<Output = Result<Vec<Option<Vec<u8>>>, RemoteError>> + Send;
    /// Accepts a byte-range write.
    fn write(
        &self,
        block: u64,
        offset: u32,
        data: Vec<u8>,
    ) -> impl Future<Output = Result<(), RemoteError>> + Send;
    /// Accepts a delete.
    fn delete(&self, block: u64) -> impl Future<Output = Result<(), RemoteError>> + Send;
    /// Returns once everything accepted before it is persisted.
    fn flush(&self) -> impl Future<Output = Result<(), RemoteError>> + Send;
}

/// Limits and locations of the vehicle-side cache.
#[derive(Clone, Debug)]
pub struct CacheOptions {
    /// The OBU's local directory for the cache and the journal (one mount at a time; locked).
    pub dir: PathBuf,
    /// Disk space for cached block images, in bytes; blocks with writes the volume has not
    /// accepted yet (pinned) count too, and writers pinning more wait past it.
    pub cache_capacity_bytes: u64,
    /// Journalled bytes not yet persisted in the volume, at most; writers wait past it.
    pub journal_limit_bytes: u64,
    /// A journal segment is closed and a new one started past this size, in bytes.
    pub journal_segment_bytes: u64,
    /// No file system operation waits longer than this for the volume or for journal room.
    pub op_timeout: Duration,
    /// The uploader asks for the persisted barrier after this many bytes accepted, so the journal
    /// is trimmed while writes keep flowing.
    pub flush_every_bytes: u64,
    /// Longest pause between retries while the volume is unreachable.
    pub retry_backoff_max: Duration,
    /// Journal records in flight to the volume at once.
    pub upload_window_ops: usize,
    /// The volume this cache is for (written in the directory's `volume` file): a journal
    /// left by a mount of another volume is never replayed into this one.
    pub volume: String,
}

impl CacheOptions {
    /// Defaults for a cache in `dir`.
    pub fn new(dir: PathBuf) -> Self {
        CacheOptions {
            dir,
            cache_capacity_bytes: 1 << 30,
            journal_limit_bytes: 256 << 20,
            journal_segment_bytes: 16 << 20,
            op_timeout: Duration::from_secs(30),
            flush_every_bytes: 8 << 20,
            retry_backoff_max: Duration::from_millis(500),
            upload_window_ops: 32,
            volume: String::new(),
        }
    }
}

/// Journal and upload figures, for logs, tests and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Records appended in this mount (and recovered from an earlier one).
    pub appended: u64,
    /// Records accepted by the volume.
    pub accepted: u64,
    /// Records known persisted.
    pub persisted: u64,
    /// Records recovered from the journal at mount.
    pub recovered: u64,
    /// Journal bytes not yet persisted.
    pub journal_bytes: u64,
    pub cache_hits: u64,
    pub cache_misses: u64,
    /// Round trips that fetched several missing blocks at once (a multi-block read).
    pub batched_reads: u64,
    /// Failed attempts to reach the volume.
    pub remote_errors: u64,
}

/// One journal record: `len: u32, crc32: u32` of a payload `seq: u64, kind: u8, block: u64`
/// and, for a write, `offset: u32, data`. `kind` is 1 (write) or 2 (delete) for the last record
/// of its batch, 3 or 4 for a record that more of its batch follow: recovery replays a batch
/// whole or not at all. A journal written before batches were marked holds only 1 and 2 (each
/// record its own batch, replayed as before); an older build reads 3 and 4 as a torn record,
/// so a cache directory this build wrote must be unmounted cleanly (its journal drained) before
/// an older build mounts it.
#[derive(Clone, Debug)]
struct Record {
    seq: u64,
    op: BlockOp,
    /// The last record of its batch (one `apply`).
    ends_batch: bool,
}

const RECORD_HEADER_BYTES: usize = 8;

impl Record {
    fn encode(&self, out: &mut Vec<u8>) {
        let mut payload = Vec::with_capacity(32);
        payload.extend_from_slice(&self.seq.to_le_bytes());
        match &self.op {
            BlockOp::Write { block, offset, data, .. } => {
                payload.push(if self.ends_batch { 1 } else { 3 });
                payload.extend_from_slice(&block.to_le_bytes());
                payload.extend_from_slice(&offset.to_le_bytes());
                payload.extend_from_slice(data);
            }
            BlockOp::Delete { block } => {
                payload.push(if self.ends_batch { 2 } else { 4 });
                payload.extend_from_slice(&block.to_le_bytes());
            }
        }
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32(&payload).to_le_bytes());
        out.extend_from_slice(&payload);
    }

    /// Decodes one record at the start of `b`: `Some((record, bytes used))`, `None` if torn/corrupt.
    fn decode(b: &[u8]) -> Option<(Record, usize)> {
        let len = u32::from_le_bytes(b.get(0..4)?.try_into().ok()?) as usize;
        let crc = u32::from_le_bytes(b.get(4..8)?.try_into().ok()?);
        let p = b.get(RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + len)?;
        if crc32(p) != crc || p.len() < 17 {
            return None;
        }
        let seq = u64::from_le_bytes(p[0..8].try_into().ok()?);
        let block = u64::from_le_bytes(p[9..17].try_into().ok()?);
        let op = match p[8] {
            1 | 3 => BlockOp::Write {
                block,
                offset: u32::from_le_bytes(p.get(17..21)?.try_into().ok()?),
                data: p[21..].to_vec(),
                fresh: false,
            },
            2 | 4 => BlockOp::Delete { block },
            _ => return None,
        };
        Some((Record { seq, op, ends_batch: p[8] <= 2 }, RECORD_HEADER_BYTES + len))
    }

    fn cost(&self) -> u64 {
        op_cost(&self.op)
    }
}

/// `n` records of `block` accepted (or superseded): its pin count in `pins` drops.
fn unpin(pins: &mut HashMap<u64, u32>, block: u64, n: usize) {
    if let Some(c) = pins.get_mut(&block) {
        *c = c.saturating_sub(u32::try_from(n).unwrap_or(u32::MAX));
        if *c == 0 {
            pins.remove(&block);
        }
    }
}

/// The journal bytes the record of `op` takes.
fn op_cost(op: &BlockOp) -> u64 {
    let data = match op {
        BlockOp::Write { data, .. } => data.len(),
        BlockOp::Delete { .. } => 0,
    };
    (RECORD_HEADER_BYTES + 21 + data) as u64
}

/// CRC-32 (IEEE), bitwise: records are small and this keeps the crate free of another dependency.
fn crc32(data: &[u8]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut t = [0u32; 256];
        for (i, e) in t.iter_mut().enumerate() {
            let mut c = i as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 { 0xEDB8_8320 ^ (c >> 1) } else { c >> 1 };
            }
            *e = c;
        }
        t
    });
    let mut c = !0u32;
    for &b in data {
        c = table[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

#[derive(Debug)]
struct Segment {
    last_seq: u64,
    path: PathBuf,
}

/// Where a journal record is in its upload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Upload {
    Waiting,
    InFlight,
    Accepted,
    /// Its content travels merged into the send of the earlier record of this seq (a run
    /// of small writes to one block, as appends make, goes as one write): accepted with
    /// that send, waiting again if it fails.
    Carried(u64),
    /// Fully overwritten by the later record of this seq, which carries its content: it
    /// counts as accepted once that one does (not before: a flush then would report it
    /// persisted while its content, the later record's, was still on its way).
    Superseded(u64),
}

/// Whether the record at `i` counts as accepted: it was, or the record that superseded it
/// does (see [`Upload::Superseded`]).
fn settled(unsent: &VecDeque<(Record, Upload)>, mut i: usize) -> bool {
    loop {
        match unsent[i].1 {
            Upload::Accepted => return true,
            Upload::Superseded(by) => match unsent.binary_search_by_key(&by, |(r, _)| r.seq) {
                Ok(j) => i = j,
                // Gone from the queue: only an accepted prefix leaves it.
                Err(_) => return true,
            },
            Upload::Waiting | Upload::InFlight | Upload::Carried(_) => return false,
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum Cached {
    Present,
    Absent,
}

#[derive(Debug)]
struct Entry {
    state: Cached,
    tick: u64,
}

struct State {
    // Journal.
    next_seq: u64,
    /// Records not yet accepted, in journal order.
    unsent: VecDeque<(Record, Upload)>,
    /// Blocks with a record in flight: a block's records go one at a time, in order.
    busy_blocks: std::collections::HashSet<u64>,
    unpersisted: VecDeque<(u64, u64)>,
    journal_bytes: u64,
    accepted_upto: u64,
    persisted_upto: u64,
    sync_wanted_upto: u64,
    bytes_since_flush: u64,
    segments: VecDeque<Segment>,
    active: File,
    active_bytes: u64,
    /// Records not yet accepted by the volume, per block (a pinned block stays cached).
    pinned: HashMap<u64, u32>,
    /// Of those, the writes: the blocks whose images they keep cached, counted against
    /// `cache_capacity_bytes` (`Shared::room`). A delete keeps none (its block is absent).
    write_pins: HashMap<u64, u32>,
    // Cache.
    entries: HashMap<u64, Entry>,
    lru: BTreeMap<u64, u64>,
    tick: u64,
    cache_bytes: u64,
    refused: Option<String>,
    /// Set when a failed append could not be cut back (see [`State::append`]): the active
    /// segment may end in a partial record, so nothing more may follow it in this mount.
    journal_broken: Option<String>,
    stats: CacheStats,
    /// The next append fails as the test asks.
    #[cfg(test)]
    append_fault: Option<AppendFault>,
    /// The cut back after the failed append fails too.
    #[cfg(test)]
    cut_fault: bool,
    /// The next new segment's directory sync fails.
    #[cfg(test)]
    dir_sync_fault: bool,
}

/// A failed append, injected by tests.
#[cfg(test)]
#[derive(Clone, Copy, Debug)]
struct AppendFault {
    /// Bytes of the batch written before the failure (a partial record when not a boundary).
    after_bytes: usize,
    /// The cut back to the segment's last whole record fails too.
    cut_fails: bool,
}

struct Shared<R> {
    remote: R,
    opts: CacheOptions,
    block_size: u32,
    state: Mutex<State>,
    /// Woken when the journal moves (accepted, persisted, refused): writers and syncs wait here.
    progress: Condvar,
    /// Wakes the uploader (new records, a sync asked for).
    work: Notify,
}

/// A [`BlockDevice`] over a [`Remote`] volume with a disk cache and a crash-safe journal.
pub struct CachedVolume<R: Remote> {
    shared: Arc<Shared<R>>,
    rt: Handle,
    cancel: CancellationToken,
    uploader: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Held for the life of the mount: one process per cache directory.
    _lock: File,
}

fn seg_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("seg-{first_seq:020}.log"))
}

impl<R: Remote> CachedVolume<R> {
    /// Opens the cache in `opts.dir`: locks it, empties the block cache, recovers the journal and
    /// starts the uploader on `rt` (which replays recovered records first, in order).
    pub fn open(
        remote: R,
        block_size: u32,
        opts: CacheOptions,
        rt: Handle,
    ) -> Result<Self, DeviceError> {
        fs::create_dir_all(&opts.dir)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(opts.dir.join("lock"))?;
        // SAFETY: flock on an fd we own; no memory is shared with the kernel.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(DeviceError::Io(std::io::Error::other(format!(
                "cache directory {} is in use by another mount",
                opts.dir.display()
            ))));
        }
        let blocks = opts.dir.join("blocks");
        if blocks.exists() {
            fs::remove_dir_all(&blocks)?;
        }
        fs::create_dir_all(&blocks)?;
        let jdir = opts.dir.join("journal");
        fs::create_dir_all(&jdir)?;

        let (records, mut segments) = recover(&jdir)?;
        claim_for_volume(&opts.dir, &opts.volume, block_size, !records.is_empty())?;
        let next_seq = records.last().map_or(1, |r| r.seq + 1);
        let first = seg_path(&jdir, next_seq);
        let active = OpenOptions::new().create(true).append(true).open(&first)?;
        sync_dir(&jdir)?;
        segments.push_back(Segment { last_seq: next_seq - 1, path: first });
        let mut state = State {
            next_seq,
            unsent: VecDeque::new(),
            busy_blocks: std::collections::HashSet::new(),
            unpersisted: VecDeque::new(),
            journal_bytes: 0,
            accepted_upto: 0,
            persisted_upto: 0,
            sync_wanted_upto: 0,
            bytes_since_flush: 0,
            segments,
            active,
            active_bytes: 0,
            pinned: HashMap::new(),
            write_pins: HashMap::new(),
            entries: HashMap::new(),
            lru: BTreeMap::new(),
            tick: 0,
            cache_bytes: 0,
            refused: None,
            journal_broken: None,
            stats: CacheStats::default(),
            #[cfg(test)]
            append_fault: None,
            #[cfg(test)]
            cut_fault: false,
            #[cfg(test)]
            dir_sync_fault: false,
        };
        if let Some(r) = records.first() {
            state.accepted_upto = r.seq - 1;
            state.persisted_upto = r.seq - 1;
            tracing::info!(
                records = records.len(),
                first_seq = r.seq,
                "replaying the journal of an earlier mount"
            );
        } else {
            state.accepted_upto = next_seq - 1;
            state.persisted_upto = next_seq - 1;
        }
        state.stats.recovered = records.len() as u64;
        for r in records {
            state.enqueue(r);
        }
        let shared = Arc::new(Shared {
            remote,
            block_size,
            opts,
            state: Mutex::new(state),
            progress: Condvar::new(),
            work: Notify::new(),
        });
        let cancel = CancellationToken::new();
        let uploader = rt.spawn(upload_loop(shared.clone(), cancel.clone()));
        Ok(CachedVolume { shared, rt, cancel, uploader: Mutex::new(Some(uploader)), _lock: lock })
    }

    /// Current figures.
    pub fn stats(&self) -> CacheStats {
        let s = self.shared.lock();
        CacheStats { journal_bytes: s.journal_bytes, ..s.stats }
    }

    /// Waits up to `timeout` for every journalled change to be persisted, then stops the
    /// uploader. Returns whether the journal is empty (else it is replayed by the next mount).
    pub fn shutdown(&self, timeout: Duration) -> bool {
        let drained = self.wait_persisted(timeout).is_ok();
        self.cancel.cancel();
        if let Some(task) = self.uploader.lock().expect("poisoned").take() {
            // The uploader checks the token at every await point; wait for it so no task outlives us.
            let _ = self
                .rt
                .block_on(async { tokio::time::timeout(Duration::from_secs(5), task).await });
        }
        drained
    }

    fn wait_persisted(&self, timeout: Duration) -> Result<(), DeviceError> {
        let target = self.shared.lock().next_seq - 1;
        self.wait_persisted_upto(target, timeout)
    }

    /// The journal's last record.
    #[cfg(test)]
    fn last_seq(&self) -> u64 {
        self.shared.lock().next_seq - 1
    }

    /// Waits until every record up to `target` is persisted.
    fn wait_persisted_upto(&self, target: u64, timeout: Duration) -> Result<(), DeviceError> {
        let deadline = Instant::now() + timeout;
        let mut s = self.shared.lock();
        s.sync_wanted_upto = s.sync_wanted_upto.max(target);
        self.shared.work.notify_one();
        let wait = Wait { deadline, after: timeout, what: "persisting the journal" };
        self.shared.wait_until(s, wait, |s| s.persisted_upto >= target).map(drop)
    }

    /// Reads a whole block into the cache (waiting for its unaccepted records first).
    /// Fetches `block` into the cache; it and `keep` (the other blocks the caller is about
    /// to use) stay cached past the eviction that makes room for it.
    fn fill<'a>(
        &'a self,
        mut s: MutexGuard<'a, State>,
        block: u64,
        deadline: Instant,
        keep: &[u64],
    ) -> Result<MutexGuard<'a, State>, DeviceError> {
        let timeout = self.shared.opts.op_timeout;
        // The NMS serves our own accepted writes; until a pinned block's records are accepted its
        // only current copy was local (lost with the cache at remount), so wait for them.
        let wait = Wait { deadline, after: timeout, what: "replaying the journal before a read" };
        s = self.shared.wait_until(s, wait, |s| s.pinned.get(&block).copied().unwrap_or(0) == 0)?;
        s.stats.cache_misses += 1;
        drop(s);
        let remaining = deadline.saturating_duration_since(Instant::now());
        let fetched = self.rt.block_on(async {
            tokio::time::timeout(remaining, self.shared.remote.read(block)).await
        });
        let mut s = self.shared.lock();
        let image = match fetched {
            Err(_) => {
                s.stats.remote_errors += 1;
                return Err(DeviceError::Timeout {
                    what: "reading a block from the volume",
                    after: timeout,
                });
            }
            Ok(Err(RemoteError::Unavailable(e))) => {
                s.stats.remote_errors += 1;
                tracing::debug!(block, error = %e, "block read failed");
                return Err(DeviceError::Timeout {
                    what: "reading a block from the volume",
                    after: timeout,
                });
            }
            Ok(Err(RemoteError::Refused(e))) => return Err(DeviceError::Refused(e)),
            Ok(Ok(image)) => image,
        };
        self.shared.store(&mut s, block, image.as_deref(), keep)?;
        Ok(s)
    }
}

impl<R: Remote> CachedVolume<R> {
    /// Waits (up to the op timeout) until none of `blocks` that is not cached is pinned by
    /// journal records still to be accepted (after a remount with a journal to replay, the
    /// volume's copy of such a block is not yet current): what `read` would otherwise wait
    /// for under the file system's lock.
    fn wait_unpinned(&self, blocks: &[u64]) -> Result<(), DeviceError> {
        let timeout = self.shared.opts.op_timeout;
        let deadline = Instant::now() + timeout;
        let wait = Wait { deadline, after: timeout, what: "replaying the journal before a read" };
        let pinned = |s: &State, b: &u64| {
            !s.entries.contains_key(b) && s.pinned.get(b).copied().unwrap_or(0) > 0
        };
        let s = self.shared.lock();
        self.shared.wait_until(s, wait, |s| !blocks.iter().any(|b| pinned(s, b))).map(drop)
    }

    /// Fetches the blocks of `blocks` not cached (pinned ones wait for their journal
    /// records in `read`), in one round trip, when at least `min` are missing; fails as a
    /// read of them would when the volume cannot answer (the answer is cached as far as
    /// there is room).
    fn fetch_missing(&self, blocks: &[u64], min: usize) -> Result<(), DeviceError> {
        let (missing, journalled) = {
            let s = self.shared.lock();
            if let Some(why) = &s.refused {
                return Err(DeviceError::Refused(why.clone()));
            }
            let missing: Vec<u64> = blocks
                .iter()
                .copied()
                .filter(|b| {
                    !s.entries.contains_key(b) && s.pinned.get(b).copied().unwrap_or(0) == 0
                })
                .collect();
            (missing, s.next_seq)
        };
        if missing.is_empty() || missing.len() < min {
            return Ok(());
        }
        let timeout = self.shared.opts.op_timeout;
        let fetched = self.rt.block_on(async {
            tokio::time::timeout(timeout, self.shared.remote.read_many(&missing)).await
        });
        let mut s = self.shared.lock();
        let unavailable =
            || DeviceError::Timeout { what: "reading blocks from the volume", after: timeout };
        match fetched {
            Ok(Ok(images)) => {
                s.stats.cache_misses += missing.len() as u64;
                s.stats.batched_reads += 1;
                if s.next_seq != journalled {
                    // Written meanwhile (the mount fetches without the file system's lock):
                    // the answer may predate a change since accepted and evicted, so it is
                    // not cached; the read fetches what it still lacks itself.
                    return Ok(());
                }
                for (block, image) in missing.into_iter().zip(images) {
                    // Written or pinned meanwhile: the local copy is the newer one.
                    if s.entries.contains_key(&block)
                        || s.pinned.get(&block).copied().unwrap_or(0) > 0
                    {
                        continue;
                    }
                    if let Err(e) = self.shared.store(&mut s, block, image.as_deref(), &[]) {
                        // (No room: the read itself fetches what it still lacks.)
                        tracing::debug!(block, error = %e, "read-ahead not cached");
                        return Ok(());
                    }
                }
                Ok(())
            }
            Ok(Err(RemoteError::Refused(e))) => Err(DeviceError::Refused(e)),
            Ok(Err(RemoteError::Unavailable(e))) => {
                s.stats.remote_errors += 1;
                tracing::debug!(error = %e, "batched read failed");
                Err(unavailable())
            }
            Err(_) => {
                s.stats.remote_errors += 1;
                Err(unavailable())
            }
        }
    }
}

/// How long [`Shared::wait_until`] waits, and what its timeout error says.
struct Wait {
    deadline: Instant,
    /// The limit the error names.
    after: Duration,
    what: &'static str,
}

impl<R: Remote> Shared<R> {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("cache state poisoned")
    }

    /// Waits (until `deadline`) for room for `ops` in the journal and in the cache for the
    /// block images their writes pin; fails once the volume refused a change, or at the
    /// deadline. The uploader frees both as the volume accepts and persists. (A pinned
    /// block stays cached whatever the capacity: counted by the journal's bytes alone, a
    /// few bytes appended to each of many files, with the volume taking no writes, pinned
    /// block images far past `cache_capacity_bytes` of local disk.) A batch goes when no
    /// write is pinned, however many blocks it writes, and when the journal is empty,
    /// however large; deletes (a truncate's, say) need no cache room.
    fn room<'a>(
        &'a self,
        mut s: MutexGuard<'a, State>,
        ops: &[BlockOp],
        deadline: Instant,
    ) -> Result<MutexGuard<'a, State>, DeviceError> {
        let opts = &self.opts;
        let cost: u64 = ops.iter().map(op_cost).sum();
        let written: HashSet<u64> = ops
            .iter()
            .filter(|op| matches!(op, BlockOp::Write { .. }))
            .map(BlockOp::block)
            .collect();
        let bs = u64::from(self.block_size);
        let waiting_for = |s: &State| {
            if s.journal_bytes > 0 && s.journal_bytes + cost > opts.journal_limit_bytes {
                return Some("waiting for journal room");
            }
            let new = written.iter().filter(|b| !s.write_pins.contains_key(b)).count();
            let pins = s.write_pins.len() + new;
            (new > 0 && !s.write_pins.is_empty() && pins as u64 * bs > opts.cache_capacity_bytes)
                .then_some("waiting for cache room for blocks not yet in the volume")
        };
        while let Some(what) = waiting_for(&s) {
            if let Some(why) = &s.refused {
                return Err(DeviceError::Refused(why.clone()));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(DeviceError::Timeout { what, after: opts.op_timeout });
            }
            self.work.notify_one();
            s = self.progress.wait_timeout(s, deadline - now).expect("poisoned").0;
        }
        if let Some(why) = &s.refused {
            return Err(DeviceError::Refused(why.clone()));
        }
        Ok(s)
    }

    /// Waits on the cache's progress until `done` holds; fails once the volume refused a
    /// change, or at the deadline.
    fn wait_until<'a>(
        &'a self,
        mut s: MutexGuard<'a, State>,
        wait: Wait,
        done: impl Fn(&State) -> bool,
    ) -> Result<MutexGuard<'a, State>, DeviceError> {
        loop {
            if done(&s) {
                return Ok(s);
            }
            if let Some(why) = &s.refused {
                return Err(DeviceError::Refused(why.clone()));
            }
            let now = Instant::now();
            if now >= wait.deadline {
                return Err(DeviceError::Timeout { what: wait.what, after: wait.after });
            }
            s = self.progress.wait_timeout(s, wait.deadline - now).expect("poisoned").0;
        }
    }

    fn block_file(&self, block: u64) -> PathBuf {
        self.opts.dir.join("blocks").join(format!("{block:016x}"))
    }

    /// Puts a block image (None: absent) into the cache, evicting others (never it or
    /// `keep`) to make room.
    fn store(
        &self,
        s: &mut State,
        block: u64,
        image: Option<&[u8]>,
        keep: &[u64],
    ) -> Result<(), DeviceError> {
        let bs = u64::from(self.block_size);
        let path = self.block_file(block);
        let was_present =
            matches!(s.entries.get(&block), Some(Entry { state: Cached::Present, .. }));
        let state = match image {
            Some(data) if data.iter().any(|&b| b != 0) => {
                let mut full = data.to_vec();
                full.resize(self.block_size as usize, 0);
                fs::write(&path, &full)?;
                if !was_present {
                    s.cache_bytes += bs;
                }
                Cached::Present
            }
            _ => {
                if was_present {
                    fs::remove_file(&path)?;
                    s.cache_bytes -= bs;
                }
                Cached::Absent
            }
        };
        s.touch(block, state);
        let mut keep = keep.to_vec();
        keep.push(block);
        self.evict(s, &keep)
    }

    /// Applies a journalled change to the block's cached image.
    fn cache_apply(&self, s: &mut State, op: &BlockOp) -> Result<(), DeviceError> {
        let bs = u64::from(self.block_size);
        let block = op.block();
        let present = matches!(s.entries.get(&block).map(|e| e.state), Some(Cached::Present));
        let path = self.block_file(block);
        match op {
            BlockOp::Write { offset, data, .. } => {
                // An absent block reads as zeros: start its image from zeros (truncating what a
                // failed update may have left in its file).
                let f =
                    OpenOptions::new().create(true).write(true).truncate(!present).open(&path)?;
                if !present {
                    f.set_len(bs)?;
                }
                f.write_all_at(data, u64::from(*offset))?;
                if !present {
                    s.cache_bytes += bs;
                }
                s.touch(block, Cached::Present);
            }
            BlockOp::Delete { .. } => {
                if present {
                    fs::remove_file(&path)?;
                    s.cache_bytes -= bs;
                }
                s.touch(block, Cached::Absent);
            }
        }
        Ok(())
    }

    /// Drops `block` from the cache. Removing its file is best effort: an entry not present
    /// never reads it, and a write or a fetch rewrites it whole.
    fn forget(&self, s: &mut State, block: u64) {
        if let Some(entry) = s.entries.remove(&block) {
            s.lru.remove(&entry.tick);
            if let Cached::Present = entry.state {
                s.cache_bytes -= u64::from(self.block_size);
            }
        }
        let _ = fs::remove_file(self.block_file(block));
    }

    /// Evicts the least recently used blocks, never a pinned one or one of `keep` (a block
    /// just fetched for the caller: evicting it left a read without its entry, a panic
    /// under the state lock, and a partial write on a block image of zeros).
    fn evict(&self, s: &mut State, keep: &[u64]) -> Result<(), DeviceError> {
        let bs = u64::from(self.block_size);
        while s.cache_bytes > self.opts.cache_capacity_bytes
            || s.entries.len() as u64 * 64 > self.opts.cache_capacity_bytes
        {
            let Some(victim) = s
                .lru
                .values()
                .copied()
                .find(|b| s.pinned.get(b).copied().unwrap_or(0) == 0 && !keep.contains(b))
            else {
                break; // everything left is pinned; `apply` bounds that
            };
            let entry = s.entries.remove(&victim).expect("lru and entries agree");
            s.lru.remove(&entry.tick);
            if let Cached::Present = entry.state {
                fs::remove_file(self.block_file(victim))?;
                s.cache_bytes -= bs;
            }
        }
        Ok(())
    }
}

impl State {
    /// Appends `buf` (whole records) to the active segment and makes it durable. A failed
    /// append (ENOSPC part way, EIO, bytes not known durable) may leave part of a record
    /// behind, and recovery stops at the first bad record of the last segment: every batch
    /// appended after it would be dropped at the next mount. So on failure the segment is cut
    /// back to where it ended; where even that fails, the journal takes no more appends in this
    /// mount (the next one drops the partial tail as a torn record).
    fn append(&mut self, buf: &[u8]) -> Result<(), DeviceError> {
        let Err(e) = self.write_active(buf).and_then(|()| self.active.sync_data()) else {
            self.active_bytes += buf.len() as u64;
            return Ok(());
        };
        match self.cut_back() {
            Ok(()) => {
                tracing::warn!(error = %e, "a journal append failed; the segment was cut back to its last whole record")
            }
            Err(cut) => {
                tracing::error!(error = %e, cut_error = %cut, "a journal append failed and the segment could not be cut back: no more writes until the next mount");
                self.journal_broken =
                    Some(format!("the journal could not be cut back after a failed append: {cut}"));
            }
        }
        Err(e.into())
    }

    fn write_active(&mut self, buf: &[u8]) -> std::io::Result<()> {
        #[cfg(test)]
        if let Some(fault) = self.append_fault.take() {
            self.cut_fault = fault.cut_fails;
            self.active.write_all(&buf[..fault.after_bytes.min(buf.len())])?;
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        self.active.write_all(buf)
    }

    /// Cuts the active segment back to its last whole record (it is opened for appending, so
    /// the next append starts there).
    fn cut_back(&mut self) -> std::io::Result<()> {
        #[cfg(test)]
        if std::mem::take(&mut self.cut_fault) {
            return Err(std::io::Error::from_raw_os_error(libc::EIO));
        }
        self.active.set_len(self.active_bytes)?;
        self.active.sync_data()
    }

    fn touch(&mut self, block: u64, state: Cached) {
        self.tick += 1;
        let tick = self.tick;
        if let Some(old) = self.entries.insert(block, Entry { state, tick }) {
            self.lru.remove(&old.tick);
        }
        self.lru.insert(tick, block);
    }

    fn enqueue(&mut self, r: Record) {
        let cost = r.cost();
        self.journal_bytes += cost;
        self.unpersisted.push_back((r.seq, cost));
        *self.pinned.entry(r.op.block()).or_default() += 1;
        if let BlockOp::Write { .. } = r.op {
            *self.write_pins.entry(r.op.block()).or_default() += 1;
        }
        self.stats.appended += 1;
        self.unsent.push_back((r, Upload::Waiting));
    }

    fn mark_persisted(&mut self, upto: u64, jdir_sync: impl Fn(&Path) -> bool) {
        if upto <= self.persisted_upto {
            return;
        }
        self.persisted_upto = upto;
        while let Some(&(seq, cost)) = self.unpersisted.front() {
            if seq > upto {
                break;
            }
            self.unpersisted.pop_front();
            self.journal_bytes -= cost;
            self.stats.persisted += 1;
        }
        self.delete_segments(upto, jdir_sync);
    }

    /// Closed segments whose records are all persisted are no longer needed: deleted
    /// oldest first, stopping at one `remove` fails to delete (tried again at the next
    /// persisted mark). What is left is always the journal's tail, so a mount replays it
    /// in order and ends at the newest content; deleting past a segment left behind would
    /// leave it alone, and a later mount would replay its old writes over newer ones.
    fn delete_segments(&mut self, upto: u64, remove: impl Fn(&Path) -> bool) {
        let mut dir = None;
        while self.segments.len() > 1 && self.segments[0].last_seq <= upto {
            if !remove(&self.segments[0].path) {
                break;
            }
            let gone = self.segments.pop_front().expect("checked");
            dir = gone.path.parent().map(Path::to_path_buf);
        }
        // The deletions made durable together, in order with later ones: a file system
        // that keeps unlinks out of order could bring an older segment back past a newer
        // one's deletion, and the next mount would refuse the gap.
        if let Some(dir) = dir {
            if let Err(e) = sync_dir(&dir) {
                tracing::warn!(dir = %dir.display(), error = %e, "could not sync the journal folder after deleting segments");
            }
        }
    }

    fn mark_persisted_segments(&mut self, upto: u64) {
        self.delete_segments(upto, remove_segment);
    }
}

/// Ties the cache directory `dir` to `volume` (of `block_size`-byte blocks) in its `volume`
/// file. A directory holding another volume's unpersisted journal (`pending`) is refused:
/// replayed here, that volume's writes would land in this one, and be trimmed from the
/// journal as persisted, lost to their own volume. Without a pending journal the directory
/// is taken over (its block cache is emptied at every open anyway).
fn claim_for_volume(
    dir: &Path,
    volume: &str,
    block_size: u32,
    pending: bool,
) -> Result<(), DeviceError> {
    let path = dir.join("volume");
    let want = format!("{volume}\n{block_size}\n");
    match fs::read_to_string(&path) {
        Ok(have) if have == want => return Ok(()),
        Ok(have) if pending => {
            let mut lines = have.lines();
            let (other, bs) = (lines.next().unwrap_or(""), lines.next().unwrap_or("?"));
            return Err(DeviceError::Refused(format!(
                "cache directory {} holds the unpersisted journal of volume {other:?} \
                 ({bs}-byte blocks), not of {volume:?} ({block_size}-byte blocks): mount \
                 {other:?} with it until its journal is persisted, or use another cache \
                 directory",
                dir.display()
            )));
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    let tmp = dir.join("volume.tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(want.as_bytes())?;
    f.sync_all()?;
    fs::rename(&tmp, &path)?;
    sync_dir(dir)?;
    Ok(())
}

/// Deletes a persisted journal segment; `false` (logged) when it is still there.
fn remove_segment(path: &Path) -> bool {
    match fs::remove_file(path) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "could not delete a persisted journal segment; kept, with every later one, until it can be");
            false
        }
    }
}

/// Reads every segment in order; truncates a torn tail of the last one.
fn recover(jdir: &Path) -> Result<(Vec<Record>, VecDeque<Segment>), DeviceError> {
    let mut paths: Vec<PathBuf> = fs::read_dir(jdir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("seg-") && n.ends_with(".log"))
        })
        .collect();
    paths.sort();
    let mut records = Vec::new();
    let mut segments = VecDeque::new();
    let count = paths.len();
    for (i, path) in paths.into_iter().enumerate() {
        let mut bytes = Vec::new();
        File::open(&path)?.read_to_end(&mut bytes)?;
        let mut at = 0;
        let mut seg_records = Vec::new();
        // Where the last whole batch ends (bytes, records): what follows it is torn.
        let mut whole = (0, 0);
        while let Some((r, used)) = Record::decode(&bytes[at..]) {
            // The record before it: this segment's last so far, or the previous segment's.
            let prev = seg_records.last().or(records.last());
            if prev.is_some_and(|p: &Record| r.seq != p.seq + 1) {
                return Err(DeviceError::Io(std::io::Error::other(format!(
                    "journal {} skips from a record to seq {}",
                    path.display(),
                    r.seq
                ))));
            }
            at += used;
            let ends_batch = r.ends_batch;
            seg_records.push(r);
            if ends_batch {
                whole = (at, seg_records.len());
            }
        }
        if whole.0 < bytes.len() {
            // A crash while a batch was appended leaves part of it: a torn record, or whole
            // records of a batch whose last one is missing. Only the last segment is appended
            // to (a new one starts after a whole batch), so anywhere else this is corruption.
            if i + 1 != count {
                return Err(DeviceError::Io(std::io::Error::other(format!(
                    "journal segment {} is corrupt at byte {}",
                    path.display(),
                    whole.0
                ))));
            }
            tracing::warn!(
                path = %path.display(),
                at = whole.0,
                len = bytes.len(),
                records = seg_records.len() - whole.1,
                "dropping a torn journal tail (the records of an incomplete batch)"
            );
            seg_records.truncate(whole.1);
            // Durably: the next mount appends to a new segment, behind which this tail would
            // read as corruption.
            let f = OpenOptions::new().write(true).open(&path)?;
            f.set_len(whole.0 as u64)?;
            f.sync_all()?;
        }
        if seg_records.is_empty() {
            fs::remove_file(&path)?;
            continue;
        }
        let last_seq = seg_records.last().expect("non-empty").seq;
        records.append(&mut seg_records);
        segments.push_back(Segment { last_seq, path });
    }
    Ok((records, segments))
}

/// Starts a new active segment; with everything persisted, the old ones are deleted.
/// On failure the old segment stays the active one.
fn rotate(jdir: &Path, s: &mut State) -> Result<(), DeviceError> {
    let path = seg_path(jdir, s.next_seq);
    let active = OpenOptions::new().create(true).append(true).open(&path)?;
    #[cfg(test)]
    let synced = if std::mem::take(&mut s.dir_sync_fault) {
        Err(DeviceError::Io(std::io::Error::other("injected directory sync failure")))
    } else {
        sync_dir(jdir)
    };
    #[cfg(not(test))]
    let synced = sync_dir(jdir);
    if let Err(e) = synced {
        // Not left behind: an empty segment named after the active one would sort last at
        // the next mount, and a tail of the active one torn by a crash would then look like
        // corruption in the middle of the journal (the mount refused) instead of being cut.
        drop(active);
        let _ = std::fs::remove_file(&path);
        return Err(e);
    }
    s.active = active;
    s.active_bytes = 0;
    s.segments.push_back(Segment { last_seq: s.next_seq - 1, path });
    let upto = s.persisted_upto;
    s.mark_persisted_segments(upto);
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), DeviceError> {
    File::open(dir)?.sync_all()?;
    Ok(())
}

impl<R: Remote> BlockDevice for CachedVolume<R> {
    fn block_size(&self) -> u32 {
        self.shared.block_size
    }

    fn read(&self, block: u64, offset: u32, len: u32) -> Result<Vec<u8>, DeviceError> {
        check_range(self.shared.block_size, offset, len as usize)?;
        let deadline = Instant::now() + self.shared.opts.op_timeout;
        let mut s = self.shared.lock();
        if let Some(why) = &s.refused {
            return Err(DeviceError::Refused(why.clone()));
        }
        if s.entries.contains_key(&block) {
            s.stats.cache_hits += 1;
        } else {
            s = self.fill(s, block, deadline, &[])?;
        }
        let state = s.entries[&block].state;
        s.touch(block, state);
        let mut out = vec![0u8; len as usize];
        if let Cached::Present = state {
            File::open(self.shared.block_file(block))?
                .read_exact_at(&mut out, u64::from(offset))?;
        }
        Ok(out)
    }

    fn prefetch(&self, blocks: &[u64]) {
        // The reads that follow fetch one by one and report what fails.
        let _ = self.fetch_missing(blocks, 2);
    }

    fn fetch_ahead(&self, blocks: &[u64]) -> Result<(), DeviceError> {
        self.wait_unpinned(blocks)?;
        self.fetch_missing(blocks, 1)
    }

    fn wait_room(&self, ops: &[BlockOp]) -> Result<(), DeviceError> {
        let deadline = Instant::now() + self.shared.opts.op_timeout;
        self.shared.room(self.shared.lock(), ops, deadline).map(drop)
    }

    fn apply(&self, ops: Vec<BlockOp>) -> Result<(), DeviceError> {
        let bs = self.shared.block_size;
        let opts = &self.shared.opts;
        let deadline = Instant::now() + opts.op_timeout;
        for op in &ops {
            if let BlockOp::Write { offset, data, .. } = op {
                check_range(bs, *offset, data.len())?;
            }
        }
        let s = self.shared.lock();
        if let Some(why) = &s.journal_broken {
            return Err(DeviceError::Io(std::io::Error::other(why.clone())));
        }
        let mut s = self.shared.room(s, &ops, deadline)?;
        // Every partially written block needs its current image in the cache to apply the write to
        // (and keeps it while the others are fetched).
        let partial: Vec<u64> = ops.iter().filter_map(|op| op.builds_on_image(bs)).collect();
        // A fresh or whole-block write of an uncached block needs no image (cache_apply builds
        // it from zeros), nor does a later partial write of the same block in this batch. Note
        // such blocks here, not as Absent cache entries: a fill or the append below may still
        // fail, and an Absent entry left behind would read as zeros instead of the volume's data.
        let mut no_image: HashSet<u64> = HashSet::new();
        for op in &ops {
            let BlockOp::Write { block, .. } = op else { continue };
            if !s.entries.contains_key(block) && !no_image.contains(block) {
                if op.builds_on_image(bs).is_some() {
                    s = self.fill(s, *block, deadline, &partial)?;
                } else {
                    no_image.insert(*block);
                }
            }
        }
        // Journal (durable), then cache, then hand to the uploader. Everything above failed
        // with nothing applied (as a Timeout must, by the BlockDevice contract); a failed append
        // leaves the journal as it was, numbering included, so the next batch follows on.
        let mut buf = Vec::new();
        let mut records = Vec::with_capacity(ops.len());
        let n = ops.len() as u64;
        for (seq, op) in (s.next_seq..).zip(ops) {
            let r = Record { seq, op, ends_batch: seq + 1 == s.next_seq + n };
            r.encode(&mut buf);
            records.push(r);
        }
        s.append(&buf)?;
        s.next_seq += records.len() as u64;
        let last = s.next_seq - 1;
        s.segments.back_mut().expect("an active segment").last_seq = last;
        // The batch is durable now and the next mount replays it whatever happens: it is
        // applied. A failure below must neither report it failed (the file system would take
        // its state for ahead of the device) nor keep its records from the uploader (a sync
        // would wait for them forever).
        if s.active_bytes >= opts.journal_segment_bytes {
            if let Err(e) = rotate(&opts.dir.join("journal"), &mut s) {
                // The active segment grows meanwhile; the next append tries again.
                tracing::warn!(error = %e, "could not start a new journal segment");
            }
        }
        let mut forgotten = Vec::new();
        for r in records {
            let block = r.op.block();
            if !forgotten.contains(&block) {
                if let Err(e) = self.shared.cache_apply(&mut s, &r.op) {
                    // The cached image is stale: forget the block (for the rest of the batch
                    // too, whose changes would go onto zeros), so a read waits for its records to
                    // reach the volume and fetches it from there.
                    tracing::warn!(block, error = %e, "could not update a cached block; it is fetched again once uploaded");
                    self.shared.forget(&mut s, block);
                    forgotten.push(block);
                }
            }
            s.enqueue(r);
        }
        if let Err(e) = self.shared.evict(&mut s, &[]) {
            tracing::warn!(error = %e, "could not evict cached blocks");
        }
        drop(s);
        self.shared.work.notify_one();
        Ok(())
    }

    fn sync(&self) -> Result<(), DeviceError> {
        self.wait_persisted(self.shared.opts.op_timeout)
    }
}

impl<R: Remote> Drop for CachedVolume<R> {
    fn drop(&mut self) {
        self.cancel.cancel();
        // The directory's lock goes with this value: the uploader, which may be finishing
        // a flush and deleting or starting journal segments, must have ended by then, or a
        // mount taking the directory next would find a segment started under it (a torn
        // tail in a segment no longer the last: "corrupt"). Waited for here unless this
        // is a runtime's thread (which cannot block on it; the task stops at its next
        // await point).
        let task = self.uploader.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(task) = task {
            if tokio::runtime::Handle::try_current().is_err() {
                let _ = self
                    .rt
                    .block_on(async { tokio::time::timeout(Duration::from_secs(5), task).await });
            }
        }
    }
}

/// How far ahead the uploader looks for a later change that overwrites one it is about to send.
const SUPERSEDE_LOOKAHEAD: usize = 256;

/// Whether applying `later` after `earlier` leaves no trace of `earlier`.
fn covers(later: &BlockOp, earlier: &BlockOp) -> bool {
    if later.block() != earlier.block() {
        return false;
    }
    match (later, earlier) {
        (BlockOp::Delete { .. }, _) => true,
        (
            BlockOp::Write { offset: lo, data: ld, .. },
            BlockOp::Write { offset: eo, data: ed, .. },
        ) => *lo <= *eo && u64::from(*lo) + ld.len() as u64 >= u64::from(*eo) + ed.len() as u64,
        (BlockOp::Write { .. }, BlockOp::Delete { .. }) => false,
    }
}

/// Most bytes of journal records one merged send carries ([`carry_along`]).
const CARRY_MAX_BYTES: u64 = 1 << 20;

/// The record to send for `unsent[i]` (a write about to go): with the later writes of its
/// block that waited right behind it folded in while each touches or overlaps what is
/// gathered so far (marked [`Upload::Carried`] by it), so a run of small appends to one
/// block is one round trip, not one each in turn. Stops at the block's first record that
/// cannot be folded (a delete, a gap, one not waiting).
fn carry_along(unsent: &mut VecDeque<(Record, Upload)>, i: usize) -> Record {
    let first = unsent[i].0.clone();
    let BlockOp::Write { block, offset, ref data, fresh } = first.op else { return first };
    let (mut start, mut image) = (u64::from(offset), data.clone());
    let mut carried = 0u64;
    for j in i + 1..unsent.len().min(i + 1 + SUPERSEDE_LOOKAHEAD) {
        if unsent[j].0.op.block() != block {
            continue;
        }
        let BlockOp::Write { offset: lo, data: ref ld, .. } = unsent[j].0.op else { break };
        let (ls, le) = (u64::from(lo), u64::from(lo) + ld.len() as u64);
        let end = start + image.len() as u64;
        if unsent[j].1 != Upload::Waiting || ls > end || le < start {
            break;
        }
        carried += ld.len() as u64;
        if carried > CARRY_MAX_BYTES {
            break;
        }
        let new_start = start.min(ls);
        let mut merged = vec![0u8; (end.max(le) - new_start) as usize];
        let at = (start - new_start) as usize;
        merged[at..at + image.len()].copy_from_slice(&image);
        let at = (ls - new_start) as usize;
        merged[at..at + ld.len()].copy_from_slice(ld);
        (start, image) = (new_start, merged);
        unsent[j].1 = Upload::Carried(first.seq);
    }
    let offset = u32::try_from(start).expect("within the block");
    Record { op: BlockOp::Write { block, offset, data: image, fresh }, ..first }
}

/// What the uploader has in flight.
enum Done {
    Sent { seq: u64, block: u64, cost: u64, result: Result<(), RemoteError> },
    Flushed { upto: u64, result: Result<(), RemoteError> },
}

/// Sends journal records to the volume, up to `upload_window_ops` at a time but never two of
/// one block at once (so each block sees its changes in journal order), and asks for the
/// persisted barrier to trim the journal. "Accepted up to N" only ever counts a gap-free prefix.
async fn upload_loop<R: Remote>(shared: Arc<Shared<R>>, cancel: CancellationToken) {
    use futures::stream::{FuturesUnordered, StreamExt};
    let timeout = shared.opts.op_timeout;
    let mut backoff = Duration::from_millis(10);
    let mut pause_until: Option<tokio::time::Instant> = None;
    let mut flushing = false;
    let mut inflight = FuturesUnordered::new();
    loop {
        let notified = shared.work.notified();
        // Dispatch what may go now.
        if pause_until.is_none_or(|t| t <= tokio::time::Instant::now()) {
            pause_until = None;
            let mut s = shared.lock();
            if s.refused.is_none() {
                let window = shared.opts.upload_window_ops.max(1);
                let mut sends = Vec::new();
                let mut in_flight = s.unsent.iter().filter(|(_, u)| *u == Upload::InFlight).count();
                let State { unsent, busy_blocks, pinned, write_pins, stats, .. } = &mut *s;
                // Records still to send or in flight, looked at per turn (accepted and
                // superseded ones, which wait at the front for the records after them, are
                // passed over without counting: they must not hide those records).
                let mut scan = window * 8;
                for i in 0..unsent.len() {
                    if in_flight >= window || scan == 0 {
                        break;
                    }
                    let block = unsent[i].0.op.block();
                    if matches!(unsent[i].1, Upload::Accepted | Upload::Superseded(_)) {
                        continue;
                    }
                    scan -= 1;
                    match unsent[i].1 {
                        Upload::Accepted | Upload::Superseded(_) => continue,
                        // A record in flight, or one held back, keeps its block's later records behind it.
                        Upload::InFlight | Upload::Carried(_) => {
                            busy_blocks.insert(block);
                            continue;
                        }
                        Upload::Waiting if busy_blocks.contains(&block) => continue,
                        Upload::Waiting => {}
                    }
                    // A change that a later journalled one fully overwrites need not travel (the
                    // later one is still in the journal): metadata rewrites collapse this way.
                    let superseded = unsent
                        .iter()
                        .skip(i + 1)
                        .take(SUPERSEDE_LOOKAHEAD)
                        .find(|(later, _)| covers(&later.op, &unsent[i].0.op))
                        .map(|(later, _)| later.seq);
                    if let Some(by) = superseded {
                        unsent[i].1 = Upload::Superseded(by);
                        stats.accepted += 1;
                        unpin(pinned, block, 1);
                        if let BlockOp::Write { .. } = unsent[i].0.op {
                            unpin(write_pins, block, 1);
                        }
                        continue;
                    }
                    unsent[i].1 = Upload::InFlight;
                    busy_blocks.insert(block);
                    in_flight += 1;
                    sends.push(carry_along(unsent, i));
                }
                while !s.unsent.is_empty() && settled(&s.unsent, 0) {
                    let (r, _) = s.unsent.pop_front().expect("checked");
                    s.accepted_upto = r.seq;
                }
                // Only blocks with a record really in flight stay busy.
                s.busy_blocks = s
                    .unsent
                    .iter()
                    .filter(|(_, u)| *u == Upload::InFlight)
                    .map(|(r, _)| r.op.block())
                    .collect();
                let want_flush = !flushing
                    && s.accepted_upto > s.persisted_upto
                    && (s.unsent.is_empty()
                        || s.bytes_since_flush >= shared.opts.flush_every_bytes
                        || s.sync_wanted_upto > s.persisted_upto);
                let upto = s.accepted_upto;
                if want_flush {
                    s.bytes_since_flush = 0;
                }
                drop(s);
                for r in sends {
                    let shared = shared.clone();
                    inflight.push(Box::pin(async move {
                        let block = r.op.block();
                        let fut = async {
                            match r.op.clone() {
                                BlockOp::Write { block, offset, data, .. } => {
                                    shared.remote.write(block, offset, data).await
                                }
                                BlockOp::Delete { block } => shared.remote.delete(block).await,
                            }
                        };
                        let result = match tokio::time::timeout(timeout, fut).await {
                            Ok(r) => r,
                            Err(_) => Err(RemoteError::Unavailable(format!(
                                "no answer within {timeout:?}"
                            ))),
                        };
                        Done::Sent { seq: r.seq, block, cost: r.cost(), result }
                    })
                        as std::pin::Pin<Box<dyn Future<Output = Done> + Send>>);
                }
                if want_flush {
                    flushing = true;
                    let shared = shared.clone();
                    inflight.push(Box::pin(async move {
                        let result =
                            match tokio::time::timeout(timeout, shared.remote.flush()).await {
                                Ok(r) => r,
                                Err(_) => Err(RemoteError::Unavailable(format!(
                                    "flush: no answer within {timeout:?}"
                                ))),
                            };
                        Done::Flushed { upto, result }
                    }));
                }
            }
        }
        let done = tokio::select! {
            _ = cancel.cancelled() => return,
            Some(done) = inflight.next(), if !inflight.is_empty() => done,
            _ = notified => continue,
            _ = tokio::time::sleep_until(pause_until.unwrap_or_else(tokio::time::Instant::now)), if pause_until.is_some() => continue,
        };
        let result = match done {
            Done::Sent { seq, block, cost, result } => {
                let mut s = shared.lock();
                s.busy_blocks.remove(&block);
                let Some(at) = s.unsent.iter().position(|(r, _)| r.seq == seq) else { continue };
                // The records whose content this send carried share its outcome.
                let carried: Vec<usize> = (at + 1..s.unsent.len())
                    .filter(|&j| s.unsent[j].1 == Upload::Carried(seq))
                    .collect();
                if result.is_ok() {
                    s.unsent[at].1 = Upload::Accepted;
                    s.bytes_since_flush += cost;
                    let accepted = 1 + carried.len();
                    for &j in &carried {
                        s.unsent[j].1 = Upload::Accepted;
                    }
                    s.stats.accepted += accepted as u64;
                    let writes = std::iter::once(at)
                        .chain(carried.iter().copied())
                        .filter(|&j| matches!(s.unsent[j].0.op, BlockOp::Write { .. }))
                        .count();
                    unpin(&mut s.pinned, block, accepted);
                    unpin(&mut s.write_pins, block, writes);
                    while !s.unsent.is_empty() && settled(&s.unsent, 0) {
                        let (r, _) = s.unsent.pop_front().expect("checked");
                        s.accepted_upto = r.seq;
                    }
                } else {
                    s.unsent[at].1 = Upload::Waiting;
                    for &j in &carried {
                        s.unsent[j].1 = Upload::Waiting;
                    }
                }
                drop(s);
                shared.progress.notify_all();
                result
            }
            Done::Flushed { upto, result } => {
                flushing = false;
                if result.is_ok() {
                    let mut s = shared.lock();
                    s.mark_persisted(upto, remove_segment);
                    if s.persisted_upto + 1 == s.next_seq && s.active_bytes > 0 {
                        // Everything is persisted: start an empty segment so a later mount replays nothing.
                        if let Err(e) = rotate(&shared.opts.dir.join("journal"), &mut s) {
                            tracing::warn!(error = %e, "could not start a new journal segment");
                        }
                    }
                    drop(s);
                    shared.progress.notify_all();
                }
                result
            }
        };
        match result {
            Ok(()) => backoff = Duration::from_millis(10),
            Err(RemoteError::Refused(why)) => {
                tracing::error!(error = %why, "the volume refused a journalled change; the mount fails its operations and keeps the journal for the next mount");
                shared.lock().refused = Some(why);
                shared.progress.notify_all();
            }
            Err(RemoteError::Unavailable(why)) => {
                shared.lock().stats.remote_errors += 1;
                tracing::debug!(error = %why, ?backoff, "volume unreachable; retrying");
                pause_until = Some(tokio::time::Instant::now() + backoff);
                backoff = (backoff * 2).min(shared.opts.retry_backoff_max);
            }
        }
    }
}

/// A volume in memory that can be made unreachable, for tests of the cache and of mounts
/// without an NMS.
#[derive(Clone, Default)]
pub struct MemRemote {
    inner: Arc<MemRemoteInner>,
}

#[derive(Default)]
struct MemRemoteInner {
    blocks: Mutex<HashMap<u64, Vec<u8>>>,
    /// Accepted but not yet persisted changes (applied to `blocks` as they come).
    unpersisted: Mutex<u64>,
    down: std::sync::atomic::AtomicBool,
    /// Writes, deletes and flushes fail as unreachable; reads work.
    writes_down: std::sync::atomic::AtomicBool,
    /// Writes to the block one below this wait (0: none) until `release`.
    held: std::sync::atomic::AtomicU64,
    release: tokio::sync::Notify,
    writes: std::sync::atomic::AtomicU64,
    /// Read calls (one per `read`, one per `read_many`).
    reads: std::sync::atomic::AtomicU64,
}

impl MemRemote {
    /// Makes every call fail as unreachable (`true`) or work again.
    /// Makes writes to `block` wait (until called with `None`); other calls go on.
    pub fn hold_writes_to(&self, block: Option<u64>) {
        let held = block.map_or(0, |b| b + 1);
        self.inner.held.store(held, std::sync::atomic::Ordering::SeqCst);
        if block.is_none() {
            self.inner.release.notify_waiters();
        }
    }

    /// Makes writes, deletes and flushes fail as unreachable (`true`) while reads work.
    pub fn set_writes_down(&self, down: bool) {
        self.inner.writes_down.store(down, std::sync::atomic::Ordering::SeqCst);
    }

    fn check_writes(&self) -> Result<(), RemoteError> {
        self.check()?;
        if self.inner.writes_down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(RemoteError::Unavailable("writes down (test)".into()));
        }
        Ok(())
    }

    pub fn set_down(&self, down: bool) {
        self.inner.down.store(down, std::sync::atomic::Ordering::SeqCst);
    }

    /// A copy of a block's stored bytes.
    pub fn block(&self, block: u64) -> Option<Vec<u8>> {
        self.inner.blocks.lock().expect("poisoned").get(&block).cloned()
    }

    /// Read calls so far (a `read_many` counts once).
    pub fn reads(&self) -> u64 {
        self.inner.reads.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Writes and deletes accepted so far.
    pub fn writes(&self) -> u64 {
        self.inner.writes.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn check(&self) -> Result<(), RemoteError> {
        if self.inner.down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(RemoteError::Unavailable("the in-memory volume is down".into()));
        }
        Ok(())
    }
}

impl Remote for MemRemote {
    async fn read(&self, block: u64) -> Result<Option<Vec<u8>>, RemoteError> {
        self.check()?;
        self.inner.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(self.block(block))
    }

    async fn read_many(&self, blocks: &[u64]) -> Result<Vec<Option<Vec<u8>>>, RemoteError> {
        self.check()?;
        self.inner.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(blocks.iter().map(|b| self.block(*b)).collect())
    }

    async fn write(&self, block: u64, offset: u32, data: Vec<u8>) -> Result<(), RemoteError> {
        self.check_writes()?;
        loop {
            let released = self.inner.release.notified();
            if self.inner.held.load(std::sync::atomic::Ordering::SeqCst) != block + 1 {
                break;
            }
            released.await;
        }
        let mut blocks = self.inner.blocks.lock().expect("poisoned");
        let image = blocks.entry(block).or_default();
        let end = offset as usize + data.len();
        if image.len() < end {
            image.resize(end, 0);
        }
        image[offset as usize..end].copy_from_slice(&data);
        *self.inner.unpersisted.lock().expect("poisoned") += 1;
        self.inner.writes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    async fn delete(&self, block: u64) -> Result<(), RemoteError> {
        self.check_writes()?;
        self.inner.blocks.lock().expect("poisoned").remove(&block);
        self.inner.writes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    async fn flush(&self) -> Result<(), RemoteError> {
        self.check_writes()?;
        *self.inner.unpersisted.lock().expect("poisoned") = 0;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuse::fs::FormatParams;
    use crate::fuse::fsx::{self, FsxConfig};
    use crate::fuse::tests::CoreTarget;

    fn opts(dir: &Path) -> CacheOptions {
        CacheOptions {
            op_timeout: Duration::from_millis(300),
            journal_segment_bytes: 64 << 10,
            flush_every_bytes: 32 << 10,
            retry_backoff_max: Duration::from_millis(50),
            ..CacheOptions::new(dir.to_path_buf())
        }
    }

    /// A cache over `remote` in `dir` with the test options ([`opts`]).
    fn open_dev(
        remote: &MemRemote,
        dir: &Path,
        rt: &tokio::runtime::Runtime,
    ) -> CachedVolume<MemRemote> {
        CachedVolume::open(remote.clone(), 4096, opts(dir), rt.handle().clone()).unwrap()
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap()
    }

    fn write(block: u64, offset: u32, data: &[u8]) -> BlockOp {
        BlockOp::Write { block, offset, data: data.to_vec(), fresh: false }
    }

    /// A cache full of pinned blocks (writes the volume has not accepted): a block fetched
    /// for a read stays for its read, a write to one more block waits for room (it pinned
    /// images past the capacity before), and a partial write builds on its fetched image.
    #[test]
    fn a_cache_full_of_pinned_blocks_keeps_a_fetched_block_and_holds_more_writes() {
        let dir = tempfile::tempdir().unwrap();
        let rt = rt();
        let remote = MemRemote::default();
        let o = CacheOptions { cache_capacity_bytes: 4 * 4096, ..opts(dir.path()) };
        let dev = CachedVolume::open(remote.clone(), 4096, o, rt.handle().clone()).unwrap();
        dev.apply(vec![write(100, 0, &[7; 4096]), write(101, 0, &[8; 4096])]).unwrap();
        dev.sync().unwrap();
        // Writes cannot reach the volume (reads can): four whole blocks pinned, all the
        // cache holds (100 and 101 evicted).
        remote.set_writes_down(true);
        for b in 0..4u64 {
            dev.apply(vec![write(b, 0, &[b as u8 + 1; 4096])]).unwrap();
        }
        // Fetched with nothing else evictable: it must stay for its read (a panic under
        // the state lock before, which took the mount down).
        assert_eq!(dev.read(100, 10, 10).unwrap(), vec![7; 10]);
        // Another block would pin past the capacity: the write waits, and fails at the op
        // timeout with nothing applied; a rewrite of a pinned block needs no room.
        let seq = dev.last_seq();
        match dev.apply(vec![write(4, 0, &[5; 4096])]) {
            Err(DeviceError::Timeout { what, .. }) => {
                assert!(what.contains("cache room"), "{what}")
            }
            other => panic!("a fifth pinned block: {other:?}"),
        }
        assert_eq!(dev.last_seq(), seq, "nothing journaled");
        dev.apply(vec![write(3, 0, &[9; 4096])]).unwrap();
        // Deletes keep no image: a truncate's go through whatever the writes pin.
        dev.apply((10..30).map(|block| BlockOp::Delete { block }).collect()).unwrap();
        // The volume takes writes again: partial writes of blocks not cached build on their
        // fetched images, not on zeros, two in one batch keeping each other's.
        remote.set_writes_down(false);
        dev.apply(vec![write(100, 0, &[9; 4]), write(101, 0, &[9; 4])]).unwrap();
        assert_eq!(dev.read(100, 0, 8).unwrap(), [9, 9, 9, 9, 7, 7, 7, 7]);
        assert_eq!(dev.read(101, 0, 8).unwrap(), [9, 9, 9, 9, 8, 8, 8, 8]);
        dev.sync().unwrap();
        assert_eq!(&remote.block(100).unwrap()[..8], [9, 9, 9, 9, 7, 7, 7, 7]);
        assert_eq!(&remote.block(101).unwrap()[..8], [9, 9, 9, 9, 8, 8, 8, 8]);
        assert_eq!(remote.block(3).unwrap(), vec![9; 4096]);
        assert_eq!(remote.block(4), None);
        assert!(dev.shutdown(Duration::from_secs(1)));
    }

    #[test]
    fn a_sync_covers_a_write_only_once_the_write_that_overwrote_it_is_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let rt = rt();
        let remote = MemRemote::default();
        let dev = Arc::new(open_dev(&remote, dir.path(), &rt));
        dev.apply(vec![write(5, 0, &[1; 4096])]).unwrap();
        dev.sync().unwrap();
        remote.set_writes_down(true);
        dev.apply(vec![write(5, 10, &[2; 10])]).unwrap();
        // An fsync of that write, waiting.
        let upto = dev.last_seq();
        let syncing = std::thread::spawn({
            let dev = dev.clone();
            move || dev.wait_persisted_upto(upto, Duration::from_millis(300))
        });
        // Overwritten whole before it could be sent: it travels as the later write.
        dev.apply(vec![write(5, 0, &[3; 4096])]).unwrap();
        // The later write is held on its way; flushes go through.
        remote.hold_writes_to(Some(5));
        remote.set_writes_down(false);
        let synced = syncing.join().unwrap();
        // Either the sync waited past its limit, or what it covers is in the volume.
        let in_volume = remote.block(5);
        assert!(
            synced.is_err() || in_volume == Some(vec![3; 4096]),
            "sync returned {synced:?} with the volume holding {:?}",
            in_volume.map(|b| b[..12].to_vec())
        );
        remote.hold_writes_to(None);
        dev.sync().unwrap();
        assert_eq!(remote.block(5).unwrap(), vec![3; 4096]);
        assert!(dev.shutdown(Duration::from_secs(1)));
    }

    /// After a remount with a journal to replay, a block its records pin and the cache
    /// lacks is waited for by `fetch_ahead` (which the mount calls before taking the file
    /// system's lock), failing after the op timeout while the volume is down, instead of
    /// leaving the wait to the read under the lock.
    #[test]
    fn fetch_ahead_waits_for_a_pinned_block_outside_the_read() {
        let dir = tempfile::tempdir().unwrap();
        let rt = rt();
        let remote = MemRemote::default();
        remote.set_down(true);
        {
            let dev = open_dev(&remote, dir.path(), &rt);
            dev.apply(vec![fresh(5, 9)]).unwrap();
            // "Crash": the record stays in the journal.
        }
        let dev = open_dev(&remote, dir.path(), &rt);
        let e = dev.fetch_ahead(&[5]).unwrap_err();
        assert!(matches!(e, DeviceError::Timeout { .. }), "{e:?}");
        remote.set_down(false);
        dev.fetch_ahead(&[5]).unwrap();
        assert_eq!(dev.read(5, 0, 100).unwrap(), vec![9; 100]);
        assert!(dev.shutdown(Duration::from_secs(1)));
    }

    /// A run of small appends to one block, journalled while the volume could not take
    /// writes, goes as a few merged writes, not one round trip each in turn; a merged write
    /// that fails is sent again whole; what lands is exactly what was written, in order.
    #[test]
    fn a_run_of_small_appends_to_one_block_travels_merged() {
        let dir = tempfile::tempdir().unwrap();
        let rt = rt();
        let remote = MemRemote::default();
        let dev = open_dev(&remote, dir.path(), &rt);
        remote.set_writes_down(true);
        let mut want = Vec::new();
        for i in 0..60u8 {
            let line = [i; 50];
            dev.apply(vec![write(4, 50 * u32::from(i), &line)]).unwrap();
            want.extend_from_slice(&line);
        }
        // A rewrite inside the run, and a write to another block between.
        dev.apply(vec![write(9, 0, &[7; 100])]).unwrap();
        dev.apply(vec![write(4, 100, &[200; 20])]).unwrap();
        want[100..120].fill(200);
        // (The uploader has tried, and failed, merged sends meanwhile.)
        assert!(matches!(dev.sync(), Err(DeviceError::Timeout { .. })));
        let before = remote.writes();
        remote.set_writes_down(false);
        dev.sync().unwrap();
        let writes = remote.writes() - before;
        assert!(writes <= 4, "{writes} writes for 62 journalled changes");
        assert_eq!(remote.block(4).unwrap()[..want.len()], want[..]);
        assert_eq!(remote.block(9).unwrap()[..100], [7; 100]);
        assert_eq!(dev.stats().accepted, 62);
        assert!(dev.shutdown(Duration::from_secs(1)));
    }

    #[test]
    fn writes_survive_an_outage_and_reach_the_volume_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let rt = rt();
        let remote = MemRemote::default();
        let dev = open_dev(&remote, dir.path(), &rt);
        dev.apply(vec![write(7, 0, &[1; 4096])]).unwrap();
        dev.sync().unwrap();
        assert_eq!(remote.block(7).unwrap(), vec![1; 4096]);

        remote.set_down(true);
        // Accepted into the journal while the volume is unreachable; cached reads still work.
        for i in 0..50u8 {
            dev.apply(vec![
                write(7, u32::from(i) * 10, &[i; 10]),
                write(8 + u64::from(i % 3), 0, &[i; 4096]),
            ])
            .unwrap();
        }
        assert_eq!(dev.read(7, 490, 10).unwrap(), vec![49; 10]);
        assert!(matches!(dev.sync(), Err(DeviceError::Timeout { .. })));
        assert!(dev.stats().journal_bytes > 0);
        // A block never cached cannot be read while down: an error, not a hang.
        let t = Instant::now();
        assert!(matches!(dev.read(1000, 0, 1), Err(DeviceError::Timeout { .. })));
        assert!(t.elapsed() < Duration::from_secs(2));

        remote.set_down(false);
        dev.sync().unwrap();
        let mut want = vec![1u8; 4096];
        for i in 0..50u8 {
            want[usize::from(i) * 10..usize::from(i) * 10 + 10].fill(i);
        }
        assert_eq!(remote.block(7).unwrap(), want);
        assert_eq!(remote.block(8).unwrap(), vec![48; 4096]);
        assert_eq!(remote.block(10).unwrap(), vec![47; 4096]);
        assert_eq!(dev.stats().journal_bytes, 0);
        assert!(dev.shutdown(Duration::from_secs(1)));
        // Persisted segments were deleted: the next mount has nothing to replay.
        drop(dev);
        let dev = open_dev(&remote, dir.path(), &rt);
        assert_eq!(dev.stats().recovered, 0);
        assert_eq!(fs::read_dir(dir.path().join("journal")).unwrap().count(), 1);
    }

    /// A cache directory left with volume a's unpersisted journal is refused to a mount of
    /// volume b (replayed there, a's writes would land in b and be trimmed as persisted);
    /// a's own mount replays it, and once it is persisted b may have the directory.
    #[test]
    fn a_cache_directory_holding_another_volumes_journal_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let rt = rt();
        let (remote_a, remote_b) = (MemRemote::default(), MemRemote::default());
        let a = CacheOptions { volume: "a".into(), ..opts(dir.path()) };
        let b = CacheOptions { volume: "b".into(), ..opts(dir.path()) };
        let open = |r: &MemRemote, o: &CacheOptions| {
            CachedVolume::open(r.clone(), 4096, o.clone(), rt.handle().clone())
        };
        let dev = open(&remote_a, &a).unwrap();
        remote_a.set_writes_down(true);
        dev.apply(vec![write(1, 0, &[1; 4096])]).unwrap();
        drop(dev);
        let e = open(&remote_b, &b).err().expect("refused");
        assert!(matches!(&e, DeviceError::Refused(m) if m.contains("\"a\"")), "{e:?}");
        assert_eq!(remote_b.block(1), None, "nothing of a's reached b");
        remote_a.set_writes_down(false);
        let dev = open(&remote_a, &a).unwrap();
        assert_eq!(dev.stats().recovered, 1);
        dev.sync().unwrap();
        assert_eq!(remote_a.block(1), Some(vec![1; 4096]));
        drop(dev);
        let dev = open(&remote_b, &b).expect("a's journal is persisted: b may have it");
        assert_eq!(dev.stats().recovered, 0);
    }

    #[test]
    fn the_journal_limit_bounds_unpersisted_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let rt = rt();
        let remote = MemRemote::default();
        remote.set_down(true);
        let o = CacheOptions { journal_limit_bytes: 20_000, ..opts(dir.path()) };
        let dev = CachedVolume::open(remote.clone(), 4096, o, rt.handle().clone()).unwrap();
        for b in 0..4 {
            dev.apply(vec![write(b, 0, &[9; 4096])]).unwrap();
        }
        let t = Instant::now();
        assert!(matches!(
            dev.apply(vec![write(5, 0, &[9; 4096])]),
            Err(DeviceError::Timeout { .. })
        ));
        assert!(t.elapsed() >= Duration::from_millis(250));
        remote.set_down(false);
        dev.apply(vec![write(5, 0, &[9; 4096])]).unwrap();
        dev.sync().unwrap();
        assert_eq!(remote.block(5).unwrap(), vec![9; 4096]);
    }

    #[test]
    fn a_crashed_mounts_journal_is_replayed_by_the_next_and_a_torn_tail_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let rt = rt();
        let remote = MemRemote::default();
        remote.set_down(true);
        {
            let dev = open_dev(&remote, dir.path(), &rt);
            // Refused: one cache directory, one mount.
            assert!(CachedVolume::open(
                remote.clone(),
                4096,
                opts(dir.path()),
                rt.handle().clone()
            )
            .is_err());
            for i in 0..200u32 {
                // `fresh`: the blocks are new (as the file system knows), so no fetch is needed offline.
                let op = BlockOp::Write {
                    block: u64::from(i % 7),
                    offset: (i % 16) * 256,
                    data: i.to_le_bytes().to_vec(),
                    fresh: true,
                };
                dev.apply(vec![op]).unwrap();
            }
            dev.apply(vec![BlockOp::Delete { block: 6 }]).unwrap();
            // "Crash": the process would die here; nothing is drained.
        }
        // A torn half-record at the end of the last segment, as a crash mid-append leaves.
        let mut segs: Vec<PathBuf> =
            fs::read_dir(dir.path().join("journal")).unwrap().map(|e| e.unwrap().path()).collect();
        segs.sort();
        let last = segs.iter().rev().find(|p| fs::metadata(p).unwrap().len() > 0).unwrap().clone();
        OpenOptions::new()
            .append(true)
            .open(&last)
            .unwrap()
            .write_all(&[50, 0, 0, 0, 1, 2])
            .unwrap();
        assert_eq!(remote.writes(), 0);

        remote.set_down(false);
        let dev = open_dev(&remote, dir.path(), &rt);
        assert_eq!(dev.stats().recovered, 201);
        dev.sync().unwrap();
        let mut model: HashMap<u64, Vec<u8>> = HashMap::new();
        for i in 0..200u32 {
            let img = model.entry(u64::from(i % 7)).or_default();
            let at = ((i % 16) * 256) as usize;
            if img.len() < at + 4 {
                img.resize(at + 4, 0);
            }
            img[at..at + 4].copy_from_slice(&i.to_le_bytes());
        }
        model.remove(&6);
        for b in 0..7 {
            assert_eq!(remote.block(b), model.get(&b).cloned(), "block {b}");
        }
        assert!(dev.shutdown(Duration::from_secs(1)));
    }

    /// A journal of many segments, each of several records (a long time offline), is
    /// replayed whole by the next mount (each record was checked against the last record
    /// of the previous segment, so a second record in any later segment refused the mount).
    #[test]
    fn a_journal_of_many_segments_is_replayed_whole() {
        let dir = tempfile::tempdir().unwrap();
        let rt = rt();
        let remote = MemRemote::default();
        let o = CacheOptions { journal_segment_bytes: 1024, ..opts(dir.path()) };
        remote.set_down(true);
        {
            let dev =
                CachedVolume::open(remote.clone(), 4096, o.clone(), rt.handle().clone()).unwrap();
            for i in 0..100u8 {
                dev.apply(vec![fresh(u64::from(i % 9), i)]).unwrap();
            }
            // "Crash": nothing is drained.
        }
        let segments = fs::read_dir(dir.path().join("journal")).unwrap().count();
        assert!(segments >= 5, "{segments} journal segments");
        remote.set_down(false);
        let dev = CachedVolume::open(remote.clone(), 4096, o, rt.handle().clone()).unwrap();
        assert_eq!(dev.stats().recovered, 100);
        dev.sync().unwrap();
        for b in 0..9u64 {
            let last = (0..100u8).filter(|i| u64::from(i % 9) == b).max().unwrap();
            let mut want = vec![last; 100];
            want.resize(remote.block(b).map_or(0, |d| d.len()), 0);
            assert_eq!(remote.block(b), Some(want), "block {b}");
        }
        assert!(dev.shutdown(Duration::from_secs(1)));
    }

    fn fresh(block: u64, byte: u8) -> BlockOp {
        BlockOp::Write { block, offset: 0, data: vec![byte; 100], fresh: true }
    }

    /// With the volume down: applies a batch, injects `fault` into the next append, applies a
    /// batch that must fail, then one more, whose outcome it returns; then "crashes" and mounts
    /// again with the volume up and drains the journal.
    fn append_fault_then_crash(
        dir: &Path,
        remote: &MemRemote,
        rt: &tokio::runtime::Runtime,
        fault: AppendFault,
    ) -> (Result<(), DeviceError>, CachedVolume<MemRemote>) {
        remote.set_down(true);
        let after = {
            let dev =
                CachedVolume::open(remote.clone(), 4096, opts(dir), rt.handle().clone()).unwrap();
            dev.apply(vec![fresh(1, 1), fresh(2, 1)]).unwrap();
            dev.shared.lock().append_fault = Some(fault);
            assert!(matches!(dev.apply(vec![fresh(3, 2), fresh(4, 2)]), Err(DeviceError::Io(_))));
            // The failed batch used no sequence numbers.
            assert_eq!(dev.last_seq(), 2);
            dev.apply(vec![fresh(5, 3)])
            // "Crash": nothing is drained.
        };
        remote.set_down(false);
        let dev = CachedVolume::open(remote.clone(), 4096, opts(dir), rt.handle().clone()).unwrap();
        dev.sync().unwrap();
        (after, dev)
    }

    #[test]
    fn a_failed_journal_append_is_cut_back_and_the_next_batch_survives_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let rt = rt();
        let remote = MemRemote::default();
        // ENOSPC part way through the second record of the batch (each is 129 bytes).
        let fault = AppendFault { after_bytes: 150, cut_fails: false };
        let (after, dev) = append_fault_then_crash(dir.path(), &remote, &rt, fault);
        after.unwrap();
        // Before, the partial record stayed and recovery stopped at it: the failed batch's
        // first record came back and the next batch, acknowledged, was lost.
        assert_eq!(dev.stats().recovered, 3);
        for (block, want) in [(1, Some(1)), (2, Some(1)), (3, None), (4, None), (5, Some(3))] {
            assert_eq!(remote.block(block).map(|b| b[0]), want, "block {block}");
        }
        assert!(dev.shutdown(Duration::from_secs(1)));
    }

    #[test]
    fn a_journal_that_cannot_be_cut_back_takes_no_more_appends() {
        let dir = tempfile::tempdir().unwrap();
        let rt = rt();
        let remote = MemRemote::default();
        let fault = AppendFault { after_bytes: 50, cut_fails: true };
        let (after, dev) = append_fault_then_crash(dir.path(), &remote, &rt, fault);
        // Refused rather than written after the partial record, where recovery would drop it.
        assert!(matches!(after, Err(DeviceError::Io(_))), "{after:?}");
        assert_eq!(dev.stats().recovered, 2);
        for (block, want) in [(1, Some(1)), (2, Some(1)), (3, None), (5, None)] {
            assert_eq!(remote.block(block).map(|b| b[0]), want, "block {block}");
        }
        assert!(dev.shutdown(Duration::from_secs(1)));
    }

    /// A volume holding blocks 0 and 1 (all ones), with a cache over it that holds neither.
    fn volume_of_ones(
        dir: &Path,
        rt: &tokio::runtime::Runtime,
    ) -> (MemRemote, CachedVolume<MemRemote>) {
        let remote = MemRemote::default();
        for b in [0, 1] {
            rt.block_on(remote.write(b, 0, vec![1; 4096])).unwrap();
        }
        let dev = CachedVolume::open(remote.clone(), 4096, opts(dir), rt.handle().clone()).unwrap();
        (remote, dev)
    }

    fn assert_ones(dev: &CachedVolume<MemRemote>, block: u64) {
        let got = dev.read(block, 0, 4096).unwrap();
        assert!(got.iter().all(|&b| b == 1), "block {block} reads {:?}...", &got[..8]);
    }

    #[test]
    fn a_batch_that_times_out_fetching_leaves_its_whole_block_writes_uncached() {
        let dir = tempfile::tempdir().unwrap();
        let rt = rt();
        let (remote, dev) = volume_of_ones(dir.path(), &rt);
        // Block 0 written whole, block 1 in part: its image cannot be fetched.
        remote.set_down(true);
        let r = dev.apply(vec![write(0, 0, &[9; 4096]), write(1, 0, &[9; 100])]);
        assert!(matches!(r, Err(DeviceError::Timeout { .. })), "{r:?}");
        remote.set_down(false);
        // Nothing was applied: both read as the volume holds them. Before, block 0 was left
        // cached as absent and read as zeros until evicted.
        assert_ones(&dev, 0);
        assert_ones(&dev, 1);
        assert!(dev.shutdown(Duration::from_secs(1)));
    }

    #[test]
    fn a_batch_whose_append_fails_leaves_its_whole_block_writes_uncached() {
        let dir = tempfile::tempdir().unwrap();
        let rt = rt();
        let (_remote, dev) = volume_of_ones(dir.path(), &rt);
        dev.shared.lock().append_fault = Some(AppendFault { after_bytes: 10, cut_fails: false });
        let r = dev.apply(vec![
            write(0, 0, &[9; 4096]),
            BlockOp::Write { block: 1, offset: 0, data: vec![9; 4096], fresh: false },
        ]);
        assert!(matches!(r, Err(DeviceError::Io(_))), "{r:?}");
        assert_ones(&dev, 0);
        assert_ones(&dev, 1);
        assert!(dev.shutdown(Duration::from_secs(1)));
    }

    #[test]
    fn a_batch_journalled_but_not_cached_succeeds_reaches_the_volume_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let rt = rt();
        let remote = MemRemote::default();
        let dev = open_dev(&remote, dir.path(), &rt);
        // The cache cannot take block 6's image: a directory stands where its file goes.
        let in_the_way = dir.path().join("blocks").join(format!("{:016x}", 6));
        fs::create_dir(&in_the_way).unwrap();
        // Before, the journalled batch was reported failed and its records never uploaded.
        dev.apply(vec![fresh(6, 6), write(6, 50, &[7; 10]), fresh(8, 8)]).unwrap();
        fs::remove_dir(&in_the_way).unwrap();
        dev.sync().unwrap();
        let mut want = vec![6u8; 100];
        want[50..60].fill(7);
        assert_eq!(remote.block(6).unwrap(), want);
        // Read back from the volume, not from a stale image.
        assert_eq!(dev.read(6, 0, 100).unwrap(), want);
        assert_eq!(dev.read(8, 0, 1).unwrap(), [8]);
        assert!(dev.shutdown(Duration::from_secs(1)));
    }

    #[test]
    fn a_batch_journalled_when_no_new_segment_can_be_started_succeeds() {
        let dir = tempfile::tempdir().unwrap();
        let rt = rt();
        let remote = MemRemote::default();
        remote.set_down(true);
        let dev = open_dev(&remote, dir.path(), &rt);
        // Sixteen whole blocks pass the 64 KiB segment size: the segment after them, from seq
        // 17, cannot be created.
        let in_the_way = dir.path().join("journal").join("seg-00000000000000000017.log");
        fs::create_dir(&in_the_way).unwrap();
        let batch = |byte: u8| (0..16).map(|b| write(b, 0, &[byte; 4096])).collect::<Vec<_>>();
        dev.apply(batch(1)).unwrap();
        fs::remove_dir(&in_the_way).unwrap();
        dev.apply(batch(2)).unwrap();
        remote.set_down(false);
        dev.sync().unwrap();
        for b in 0..16 {
            assert_eq!(remote.block(b).unwrap(), vec![2; 4096], "block {b}");
        }
        assert!(dev.shutdown(Duration::from_secs(1)));
    }

    /// A new segment whose directory sync fails is removed again: left behind (empty, named
    /// after the active one), it made a tail of the active segment torn by a later crash
    /// look like corruption in the middle of the journal, and the mount was refused.
    #[test]
    fn a_segment_that_could_not_be_started_leaves_no_file_behind() {
        let dir = tempfile::tempdir().unwrap();
        let rt = rt();
        let remote = MemRemote::default();
        remote.set_down(true);
        {
            let dev = open_dev(&remote, dir.path(), &rt);
            dev.shared.lock().dir_sync_fault = true;
            // Sixteen whole blocks pass the 64 KiB segment size: the next segment's start
            // fails (the batch itself is journalled and succeeds).
            dev.apply((0..16).map(|b| write(b, 0, &[1; 4096])).collect()).unwrap();
            assert_eq!(segments(dir.path()).len(), 1, "{:?}", segments(dir.path()));
            // "Crash" in the middle of the next append, to the active segment.
        }
        // (Still the first segment: the next one could not be started.)
        let active = segments(dir.path()).remove(0);
        OpenOptions::new().append(true).open(&active).unwrap().write_all(&[7; 20]).unwrap();
        let dev = CachedVolume::open(remote.clone(), 4096, opts(dir.path()), rt.handle().clone())
            .expect("the torn tail is cut, the journal mounts");
        assert_eq!(dev.stats().recovered, 16, "the first batch, not the torn one");
        remote.set_down(false);
        dev.sync().unwrap();
        assert_eq!(remote.block(15).unwrap(), vec![1; 4096]);
        assert!(dev.shutdown(Duration::from_secs(1)));
    }

    /// The journal's segment files, oldest first.
    fn segments(dir: &Path) -> Vec<PathBuf> {
        let mut segs: Vec<PathBuf> =
            fs::read_dir(dir.join("journal")).unwrap().map(|e| e.unwrap().path()).collect();
        segs.sort();
        segs
    }

    #[test]
    fn a_batch_torn_by_a_crash_is_replayed_whole_or_not_at_all() {
        let dir = tempfile::tempdir().unwrap();
        let rt = rt();
        let remote = MemRemote::default();
        remote.set_down(true);
        {
            let dev = open_dev(&remote, dir.path(), &rt);
            dev.apply(vec![fresh(1, 1)]).unwrap();
            dev.apply(vec![fresh(2, 2), fresh(3, 2), fresh(4, 2)]).unwrap();
            // "Crash".
        }
        // A power loss kept the second batch's first two records (129 bytes each) only.
        let last = segments(dir.path()).pop().unwrap();
        let len = fs::metadata(&last).unwrap().len();
        assert_eq!(len, 4 * 129);
        OpenOptions::new().write(true).open(&last).unwrap().set_len(len - 129).unwrap();
        // (The volume still down while the journal is looked at: up, the uploader could
        // upload the recovered record and delete the segment first.)
        let dev = open_dev(&remote, dir.path(), &rt);
        // Before, the two records were replayed: half a rename, a file's data without its size.
        assert_eq!(dev.stats().recovered, 1);
        assert_eq!(fs::metadata(&last).unwrap().len(), 129);
        remote.set_down(false);
        dev.sync().unwrap();
        for (block, want) in [(1, Some(1)), (2, None), (3, None), (4, None)] {
            assert_eq!(remote.block(block).map(|b| b[0]), want, "block {block}");
        }
        assert!(dev.shutdown(Duration::from_secs(1)));
    }

    #[test]
    fn a_journal_from_before_batches_were_marked_is_replayed_record_by_record() {
        let dir = tempfile::tempdir().unwrap();
        let rt = rt();
        let remote = MemRemote::default();
        // What an older build wrote for a batch of three: every record marked as its own batch
        // (kinds 1 and 2 only), the last one torn.
        let mut bytes = Vec::new();
        for (seq, op) in [(1, fresh(1, 1)), (2, BlockOp::Delete { block: 2 }), (3, fresh(3, 3))] {
            Record { seq, op, ends_batch: true }.encode(&mut bytes);
        }
        bytes.truncate(bytes.len() - 10);
        fs::create_dir_all(dir.path().join("journal")).unwrap();
        fs::write(dir.path().join("journal").join("seg-00000000000000000001.log"), bytes).unwrap();
        let dev = open_dev(&remote, dir.path(), &rt);
        assert_eq!(dev.stats().recovered, 2);
        dev.sync().unwrap();
        assert_eq!(remote.block(1).map(|b| b[0]), Some(1));
        assert_eq!(remote.block(3), None);
        assert!(dev.shutdown(Duration::from_secs(1)));
    }

    /// A mount with a cold cache reads the inode table in one round trip, not one per
    /// table block (a reload after a timeout does the same, under the file system's lock).
    #[test]
    fn a_cold_mount_reads_the_inode_table_in_one_round_trip() {
        use crate::fuse::fs::{FormatParams, Fs};
        let dir = tempfile::tempdir().unwrap();
        let rt = rt();
        let remote = MemRemote::default();
        let open = || Arc::new(open_dev(&remote, dir.path(), &rt));
        let params = FormatParams { max_inodes: 4096, file_stride_blocks: 64 };
        let dev = open();
        let mut fs =
            Fs::open_or_format(dev.clone(), params, crate::fuse::tests::test_clock()).unwrap();
        for i in 0..300 {
            fs.create(
                1,
                format!("f{i}").as_bytes(),
                crate::fuse::layout::Kind::File,
                0o644,
                0,
                0,
                None,
            )
            .unwrap();
        }
        let table_blocks = fs.superblock().inode_hwm.div_ceil(fs.superblock().inodes_per_block());
        assert!(table_blocks >= 8, "{table_blocks} inode table blocks");
        fs.sync().unwrap();
        drop(fs);
        assert!(dev.shutdown(Duration::from_secs(2)));
        drop(dev);
        let dev = open();
        let before = remote.reads();
        let fs = Fs::open_or_format(dev.clone(), params, crate::fuse::tests::test_clock()).unwrap();
        let calls = remote.reads() - before;
        assert!(calls <= 3, "{calls} read calls to mount {table_blocks} inode table blocks");
        assert_eq!(fs.stats().used_inodes, 301, "every inode loaded");
        drop(fs);
        assert!(dev.shutdown(Duration::from_secs(1)));
    }

    #[test]
    fn fsx_through_the_cache_with_eviction_then_a_cold_cache() {
        let dir = tempfile::tempdir().unwrap();
        let rt = rt();
        let remote = MemRemote::default();
        let o = CacheOptions { cache_capacity_bytes: 64 * 4096, ..opts(dir.path()) };
        let open = |o: CacheOptions| {
            Arc::new(CachedVolume::open(remote.clone(), 4096, o, rt.handle().clone()).unwrap())
        };
        let dev = open(o.clone());
        let params = FormatParams { max_inodes: 4096, file_stride_blocks: 64 };
        let mut target = CoreTarget::new(dev.clone(), params);
        let cfg = FsxConfig {
            seed: 7,
            steps: 1500,
            max_file_bytes: 150_000,
            max_write_bytes: 30_000,
            remount_every: 0,
        };
        let model = fsx::run(&mut target, cfg).unwrap();
        // A fresh cache (as after a remount) reads everything back from the volume.
        target.fs = None;
        assert!(dev.shutdown(Duration::from_secs(2)));
        drop(target);
        drop(dev);
        let dev2 = open(o);
        let reads = remote.reads();
        let mut again = CoreTarget::new(dev2.clone(), params);
        fsx::verify_tree(&mut again, &model, cfg.steps).unwrap();
        let st = dev2.stats();
        assert!(st.cache_misses > 0);
        // Multi-block reads fetched their missing blocks together (read-ahead), and the
        // tree still verified: fewer round trips than blocks fetched.
        assert!(st.batched_reads > 0, "{st:?}");
        assert!(
            remote.reads() - reads < st.cache_misses,
            "{} calls, {st:?}",
            remote.reads() - reads
        );
    }
}
