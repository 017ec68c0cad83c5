//! The cache core: every volume's blocks under one memory budget, dirty tracking,
//! write-back batching, request-id dedupe and the migration snapshots.
//!
//! Pure logic: no I/O, no async, time read only through its [`Clock`] (for the volumes'
//! operation budgets). The server (`crate::server`) holds it under one mutex and does the
//! waiting, the PSS calls and the networking around it.
//!
//! **Invariant:** a block with unpersisted content (dirty or in a write-back batch in
//! flight) is never evicted; only clean blocks are (CLOCK, second chance).
//!
//! Block versions are `(epoch << 32) | (lsn & 0xffff_ffff)`: a new owner (a higher epoch)
//! always writes versions above every version an older owner wrote, even for a full-block
//! write of a block it never read.

use crate::pool::BlockPool;
use crate::store::Change;
use bytes::Bytes;
use std::collections::{BTreeSet, VecDeque};
use std::time::{Duration, Instant};
use wayside_proto::types::{BlockNo, BlockSize, CredentialHash, Epoch, Lsn, RequestId, VolumeName};

/// The cache's hash maps: foldhash (fast, seeded per map) instead of SipHash, whose
/// hashing of block numbers and volume names was ~2% of a batched-read run's serving
/// thread.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
type HashSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

/// Bookkeeping bytes charged per cached block on top of its data, against the memory
/// budget and, while the block is dirty, the dirty limits: its `Entry` (~72 bytes) in a
/// hash table (key, control byte, load-factor slack), its place in the CLOCK ring and, while
/// dirty, in the volume's dirty set. Charging dirty blocks this (not just their data) keeps
/// a flood of tiny writes or deletes of distinct blocks, which cannot be evicted until
/// written back, within `dirty_limit_bytes` of real memory.
pub const ENTRY_OVERHEAD_BYTES: u64 = 192;

/// The limits the core enforces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Memory budget for every volume's cached blocks together, in bytes.
    pub cache_capacity_bytes: u64,
    /// Most unpersisted bytes across all volumes.
    pub dirty_limit_bytes: u64,
    /// Most unpersisted bytes of one volume.
    pub dirty_limit_bytes_per_volume: u64,
    /// Unpersisted bytes across all volumes past which a write asks for write-back at
    /// once ([`WriteOutcome::urgent`]).
    pub writeback_start_dirty_bytes: u64,
    /// Unpersisted bytes of one volume past which a write asks for write-back at once.
    pub writeback_start_dirty_bytes_per_volume: u64,
    /// Request ids remembered per volume for dedupe (oldest forgotten first).
    pub dedupe_entries_per_volume: usize,
    /// Most block changes in one write-back batch.
    pub max_batch_ops: usize,
    /// Most data bytes in one write-back batch.
    pub max_batch_bytes: u64,
    /// Most blocks of one volume with a PSS read in flight tracked for [`Cache::fill`];
    /// past it the tracking restarts (fetches then in flight are not cached, only answered).
    pub max_tracked_fetches_per_volume: usize,
    /// Most redirect markers (volumes moved away) kept; the oldest is dropped past it.
    pub max_moved_markers: usize,
    /// Most vehicle operations (reads answered, writes and deletes applied) per second on
    /// one volume, so one vehicle cannot take an RSU's whole capacity; past it an
    /// operation gets [`CacheError::RateLimited`]. Operations refused for any other
    /// reason (a wrong credential, a miss still to fetch, a full cache) are not counted.
    pub volume_ops_per_s: u64,
    /// Operations a volume may make at once after being idle (the bucket's depth).
    pub volume_ops_burst: u64,
    /// Most blocks a volume moving out tracks as changed since the last round; one more
    /// overflows it and the move fails at the next round ([`Cache::snapshot_changed`]).
    pub max_changed_blocks_per_move: usize,
}

/// Where the core reads the time (the real clock; tests drive a fake one).
#[derive(Clone)]
pub struct Clock(std::sync::Arc<dyn Fn() -> Instant + Send + Sync>);

impl Clock {
    pub fn new(now: impl Fn() -> Instant + Send + Sync + 'static) -> Self {
        Self(std::sync::Arc::new(now))
    }
    fn now(&self) -> Instant {
        (self.0)()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Clock")
    }
}

/// A volume's operation budget ([`Limits::volume_ops_per_s`]): a token bucket at most
/// [`Limits::volume_ops_burst`] deep, refilled at the rate.
///
/// Cells, so the core checks it while it holds the volume for reading (no second lookup
/// of the volume on a write's path); the core is only ever used under one lock.
#[derive(Debug, Clone, Default)]
struct RateBucket {
    tokens: std::cell::Cell<f64>,
    /// `None`: never used (full).
    last: std::cell::Cell<Option<Instant>>,
}

impl RateBucket {
    /// Refills the bucket up to `now`; `Ok` when `n` operations may go now (taken by
    /// [`RateBucket::take`]), else how long until they may. A batch larger than the
    /// bucket goes once it is full, and the operations after it wait for what it used.
    fn ready(&self, now: Instant, per_s: u64, burst: u64, n: u64) -> Result<(), Duration> {
        let (rate, depth) = (per_s.max(1) as f64, burst.max(1) as f64);
        let tokens = match self.last.get() {
            None => depth,
            Some(t) => (self.tokens.get() + now.saturating_duration_since(t).as_secs_f64() * rate)
                .min(depth),
        };
        self.tokens.set(tokens);
        self.last.set(Some(now));
        let need = (n as f64).min(depth);
        if tokens >= need {
            Ok(())
        } else {
            Err(Duration::from_secs_f64((need - tokens) / rate))
        }
    }

    fn take(&self, n: u64) {
        self.tokens.set(self.tokens.get() - n as f64);
    }
}

/// Names one PSS read of blocks that missed ([`Cache::begin_fetch`]); its answer is cached
/// by [`Cache::fill`] only if nothing wrote those blocks since.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchId(u64);

/// What a volume on this node is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VolumeState {
    /// Owned and served here.
    Active,
    /// Being switched to another NMS: requests wait.
    Paused,
    /// Arriving by migration; not served until the switch.
    Incoming { migration_id: u64 },
    /// Owned elsewhere now; callers are redirected.
    Moved { to: String, epoch: Epoch },
}

/// A request id already applied, with what it produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    pub lsn: Lsn,
    pub version: u64,
}

#[derive(Debug)]
struct Entry {
    /// `None`: the block is absent (never written, or deleted).
    data: Option<Bytes>,
    version: u64,
    heat: u32,
    referenced: bool,
    /// Smallest lsn of the writes folded in since the content last went to the PSS.
    dirty_lsn: Option<Lsn>,
    /// A write-back batch holding this block's content is in flight.
    inflight: bool,
    /// Highest lsn folded into this block.
    lsn: Lsn,
    /// Bytes this block counts against the dirty limits while unpersisted (its data and
    /// `ENTRY_OVERHEAD_BYTES`).
    charged: u64,
}

impl Entry {
    fn bytes(&self) -> u64 {
        self.data.as_ref().map_or(0, |d| d.len() as u64) + ENTRY_OVERHEAD_BYTES
    }
    fn unpersisted(&self) -> bool {
        self.dirty_lsn.is_some() || self.inflight
    }
}

/// A block of the write-back batch in flight: its number, version and the lsn that
/// dirtied it (dirty again from that lsn if the batch fails).
type InFlight = (BlockNo, u64, Lsn);

/// The source's copy of a volume a move made this one from: its process session, its
/// incarnation there, and the last lsn it had accepted at the switch (every write it
/// accepted up to that lsn is in this copy, at the same lsn).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Predecessor {
    pub session: u64,
    pub incarnation: u32,
    pub through: Lsn,
}

/// Most copies before a volume's predecessor it remembers (`Volume::ancestors`).
pub const MAX_ANCESTORS: usize = 4;

/// One cached volume.
#[derive(Debug)]
pub struct Volume {
    pub name: VolumeName,
    pub block_size: BlockSize,
    pub epoch: Epoch,
    pub credential: CredentialHash,
    pub state: VolumeState,
    pub accepted: Lsn,
    pub persisted: Lsn,
    /// Blocks stored in the PSS when last seen (for `stat`).
    pub stored_blocks: u64,
    /// The copy a move made this one from, if one did (`VolumeInfo.predecessor_*`).
    pub predecessor: Option<Predecessor>,
    /// The copies before `predecessor` in this one's line, newest first, at most
    /// [`MAX_ANCESTORS`] (`VolumeInfo.ancestors`): a vehicle's journal entry one of them
    /// accepted up to its `through` is in this copy too (a copy two moves on).
    pub ancestors: Vec<Predecessor>,
    id: u32,
    entries: HashMap<BlockNo, Entry>,
    dirty: BTreeSet<(Lsn, BlockNo)>,
    dirty_bytes: u64,
    cached_bytes: u64,
    /// The write-back batch in flight: its sequence number ([`BatchId::seq`]) and blocks.
    inflight: Option<(u64, Vec<InFlight>)>,
    applied: HashMap<RequestId, Applied>,
    /// The same ids (and outcomes) oldest first, so a migration copies a range of them
    /// without a map lookup per id.
    applied_order: VecDeque<(RequestId, Applied)>,
    /// Ids ever remembered: `applied_order[i]` is the `(applied_total - len + i)`th.
    /// A migration sends the ids past a mark each round, so the switch carries few.
    applied_total: u64,
    /// While migrating out: blocks changed since the last snapshot. One evicted meanwhile
    /// (written back, then pushed out) goes to the target as a `forget` (see
    /// [`Cache::snapshot_changed`]).
    changed: Option<HashSet<BlockNo>>,
    /// More blocks changed than [`Limits::max_changed_blocks_per_move`] since the last
    /// snapshot: the set misses some, so the move cannot go on.
    changed_overflow: bool,
    /// Its vehicle's operation budget ([`Limits::volume_ops_per_s`]).
    rate: RateBucket,
    /// Blocks with a PSS read in flight, by the fetch that will fill them; a write (or a
    /// migrated copy) of the block removes it, so an answer older than the write is not
    /// cached even when the written block was persisted and evicted before the answer came.
    fetches: HashMap<BlockNo, u64>,
    /// When its vehicle last called about it other than by a block operation (an attach,
    /// a flush, a stat, a list: [`Cache::touch`]), or when this copy was made or switched
    /// in; block operations are in `rate`'s last use.
    touched: std::cell::Cell<Instant>,
}

impl Volume {
    pub fn dirty_bytes(&self) -> u64 {
        self.dirty_bytes
    }
    pub fn cached_bytes(&self) -> u64 {
        self.cached_bytes
    }
    pub fn cached_blocks(&self) -> u64 {
        self.entries.len() as u64
    }
    /// Which volume of this name this is: every [`Cache::insert_volume`] (a load, a
    /// migration's arrival, a redirect marker) makes a new one, so a task that began with
    /// one incarnation (a write-back writer, a move) can tell it was replaced meanwhile.
    pub fn incarnation(&self) -> u32 {
        self.id
    }
    /// The copies this one continues, newest first: its predecessor, then its ancestors
    /// (what a copy made from this one takes as its own ancestors), at most
    /// [`MAX_ANCESTORS`].
    pub fn lineage(&self) -> Vec<Predecessor> {
        self.predecessor.iter().chain(&self.ancestors).take(MAX_ANCESTORS).copied().collect()
    }
    /// No write-back is pending or in flight.
    pub fn is_clean(&self) -> bool {
        self.dirty.is_empty() && self.inflight.is_none()
    }
    fn next_version(&self, lsn: Lsn) -> u64 {
        (self.epoch.0 << 32) | (lsn.0 & 0xffff_ffff)
    }
    fn remember(&mut self, id: RequestId, applied: Applied, cap: usize) {
        if cap == 0 || self.applied.contains_key(&id) {
            return;
        }
        while self.applied_order.len() >= cap {
            if let Some((old, _)) = self.applied_order.pop_front() {
                self.applied.remove(&old);
            }
        }
        self.applied_order.push_back((id.clone(), applied));
        self.applied.insert(id, applied);
        self.applied_total += 1;
    }
    /// The request ids remembered since `mark` (0: all), oldest first, and the next mark.
    /// Ids already forgotten here are forgotten for the target too.
    pub fn applied_since(&self, mark: u64) -> (Vec<(RequestId, Applied)>, u64) {
        let first = self.applied_total - self.applied_order.len() as u64;
        let skip = usize::try_from(mark.saturating_sub(first))
            .unwrap_or(usize::MAX)
            .min(self.applied_order.len());
        let out = self.applied_order.range(skip..).cloned().collect();
        (out, self.applied_total)
    }
}

/// A volume taken out of the cache (its memory is no longer counted); dropping it frees it.
pub struct Retired(#[allow(dead_code)] Volume);

/// A read's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadOutcome {
    Hit {
        data: Bytes,
        version: u64,
    },
    /// Known to be absent (never written or deleted).
    Absent,
    /// Not cached: fetch it from the PSS and [`Cache::fill`] it.
    Miss,
}

/// A write's or delete's outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteOutcome {
    pub lsn: Lsn,
    pub version: u64,
    pub persisted: Lsn,
    pub duplicate: bool,
    /// The volume's (or all volumes') unpersisted bytes passed a write-back start
    /// threshold: write back now rather than after the delay.
    pub urgent: bool,
}

/// Why the core did not take an operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CacheError {
    #[error("volume {0} is not on this node")]
    UnknownVolume(VolumeName),
    #[error("volume is not served here now ({0:?})")]
    NotServing(VolumeState),
    #[error("a partial write needs block {0}, which is not cached")]
    NeedBlock(BlockNo),
    #[error("{limit} reached: {value} + write > {max} bytes")]
    DirtyFull { limit: &'static str, value: u64, max: u64 },
    #[error("range {offset}+{len} does not fit in a {block_size}-byte block")]
    Range { offset: u32, len: u64, block_size: u32 },
    /// The volume used its operations for now ([`Limits::volume_ops_per_s`]); `wait` is
    /// how long until this one may go.
    #[error("volume_ops_per_s reached: {per_s} operations per second; retry in {wait:?}")]
    RateLimited { per_s: u64, wait: Duration },
    /// The node is shutting down ([`Cache::close_writes`]): nothing more is accepted.
    #[error("this NMS is shutting down: it accepts no more writes (the vehicle's go elsewhere)")]
    ShuttingDown,
}

/// Why the target side of a move refused a step ([`Cache::put_migrated`],
/// [`Cache::remember_migrated`], [`Cache::finish_incoming`]): either way the move aborts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IncomingError {
    /// The volume here is not the one this move created (the move was dropped, or the
    /// volume was loaded and served here meanwhile): the move must not touch it.
    #[error("volume {volume} is not arriving here by migration {migration_id} (it is {state:?})")]
    NotIncoming { volume: VolumeName, migration_id: u64, state: Option<VolumeState> },
    /// The switch's log positions are impossible (a malformed migration stream).
    #[error(
        "malformed switch: persisted lsn {persisted} must be at most accepted lsn {accepted}, \
         and accepted below {}",
        u64::MAX
    )]
    Lsns { accepted: u64, persisted: u64 },
    /// The move's dirty blocks (which cannot be evicted) would pass this node's memory.
    #[error("the arriving dirty blocks would pass {limit} ({value} of {max} bytes dirty)")]
    DirtyFull { limit: &'static str, value: u64, max: u64 },
}

/// Checks the log positions a move's switch hands over: persisted at most accepted, and
/// room for the next write's lsn (`accepted + 1`).
pub fn check_switch_lsns(accepted: Lsn, persisted: Lsn) -> Result<(), IncomingError> {
    if persisted > accepted || accepted.0 == u64::MAX {
        return Err(IncomingError::Lsns { accepted: accepted.0, persisted: persisted.0 });
    }
    Ok(())
}

/// Which batch a [`Batch`] is: the volume's incarnation ([`Volume::incarnation`]) and a
/// sequence number unique in the cache. Only the volume's current in-flight batch can be
/// completed: a late completion of an older batch (a writer of a replaced volume) is ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchId {
    pub incarnation: u32,
    pub seq: u64,
}

/// A write-back batch taken from a volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub id: BatchId,
    pub volume: VolumeName,
    pub epoch: Epoch,
    pub changes: Vec<Change>,
    /// Once the batch is applied, every write with lsn <= this is persisted.
    pub persisted: Lsn,
    /// The batch limits stopped it with dirty blocks left (a backlog).
    pub cut_short: bool,
}

/// A block as it travels in a migration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigBlock {
    pub block: BlockNo,
    pub data: Option<Bytes>,
    pub version: u64,
    pub dirty: bool,
    pub lsn: Lsn,
    pub heat: u32,
    /// The source dropped the block since an earlier round sent it (clean: its latest
    /// content is in the PSS): the target drops its copy. Nothing else is set.
    pub forget: bool,
}

impl MigBlock {
    /// A block the source no longer caches (see `forget`).
    pub fn forget(block: BlockNo) -> Self {
        Self { block, data: None, version: 0, dirty: false, lsn: Lsn(0), heat: 0, forget: true }
    }
}

impl MigBlock {
    pub fn bytes(&self) -> u64 {
        self.data.as_ref().map_or(0, |d| d.len() as u64)
    }
}

/// Everything of every volume cached on this node.
#[derive(Debug)]
pub struct Cache {
    limits: Limits,
    volumes: HashMap<VolumeName, Volume>,
    ids: HashMap<u32, VolumeName>,
    next_id: u32,
    ring: VecDeque<(u32, BlockNo)>,
    used_bytes: u64,
    dirty_bytes: u64,
    /// Dirty bytes of volumes still arriving by a move: apart from `dirty_bytes`, so a
    /// move in does not take the dirty budget this node's served vehicles write within
    /// (bounded by `cache_capacity_bytes` instead; they join `dirty_bytes` at the switch).
    incoming_dirty_bytes: u64,
    evictions: u64,
    next_fetch: u64,
    next_batch: u64,
    /// Redirect markers in the order they were made, with the volume id each was made
    /// as (an entry whose volume has been replaced since is stale and skipped).
    markers: VecDeque<(VolumeName, u32)>,
    /// Where written blocks' buffers come from (see [`crate::pool`]).
    pool: BlockPool,
    clock: Clock,
    /// Set by [`Cache::close_writes`]: writes and deletes are refused from then on.
    writes_closed: bool,
}

impl Cache {
    /// A cache whose blocks are heap copies.
    pub fn new(limits: Limits) -> Self {
        Self::with_pool(limits, BlockPool::disabled())
    }

    /// A cache whose written blocks take their buffers from `pool` when it has one free.
    pub fn with_pool(limits: Limits, pool: BlockPool) -> Self {
        Self {
            pool,
            limits,
            volumes: HashMap::default(),
            ids: HashMap::default(),
            next_id: 1,
            ring: VecDeque::new(),
            markers: VecDeque::new(),
            used_bytes: 0,
            dirty_bytes: 0,
            incoming_dirty_bytes: 0,
            evictions: 0,
            next_fetch: 1,
            next_batch: 1,
            clock: Clock::new(Instant::now),
            writes_closed: false,
        }
    }

    /// Refuses every write and delete from now on ([`CacheError::ShuttingDown`]; a
    /// duplicate of one already applied is still answered): a node shutting down closes
    /// writes before its last drain, so everything it accepted is what the drain writes
    /// back, and a vehicle's later writes stay in its journal for another NMS.
    pub fn close_writes(&mut self) {
        self.writes_closed = true;
    }

    /// The same cache reading the time from `clock`.
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Whether `name`'s dirty bytes, or all volumes', are past a write-back start
    /// threshold (see [`WriteOutcome::urgent`]).
    pub fn past_writeback_start(&self, name: &VolumeName) -> bool {
        let volume = self.volumes.get(name).map_or(0, |v| v.dirty_bytes);
        volume > self.limits.writeback_start_dirty_bytes_per_volume
            || self.dirty_bytes > self.limits.writeback_start_dirty_bytes
    }

    pub fn used_bytes(&self) -> u64 {
        self.used_bytes
    }
    /// Unpersisted bytes held, the volumes arriving by a move included (the dirty limits
    /// count only the served volumes').
    pub fn dirty_bytes(&self) -> u64 {
        self.dirty_bytes + self.incoming_dirty_bytes
    }
    pub fn evictions(&self) -> u64 {
        self.evictions
    }
    pub fn volumes(&self) -> impl Iterator<Item = &Volume> {
        self.volumes.values()
    }
    pub fn volume(&self, name: &VolumeName) -> Option<&Volume> {
        self.volumes.get(name)
    }
    pub fn volume_mut(&mut self, name: &VolumeName) -> Option<&mut Volume> {
        self.volumes.get_mut(name)
    }

    /// Adds (or replaces) a volume with no cached blocks.
    pub fn insert_volume(
        &mut self,
        name: VolumeName,
        block_size: BlockSize,
        epoch: Epoch,
        credential: CredentialHash,
        persisted: Lsn,
        state: VolumeState,
    ) {
        self.remove_volume(&name);
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1).max(1);
        self.ids.insert(id, name.clone());
        self.volumes.insert(
            name.clone(),
            Volume {
                name,
                block_size,
                epoch,
                credential,
                state,
                accepted: persisted,
                persisted,
                stored_blocks: 0,
                predecessor: None,
                ancestors: Vec::new(),
                id,
                entries: HashMap::default(),
                dirty: BTreeSet::new(),
                dirty_bytes: 0,
                cached_bytes: 0,
                inflight: None,
                applied: HashMap::default(),
                applied_order: VecDeque::new(),
                applied_total: 0,
                changed: None,
                changed_overflow: false,
                rate: RateBucket::default(),
                fetches: HashMap::default(),
                touched: std::cell::Cell::new(self.clock.now()),
            },
        );
    }

    /// The volumes that may be unloaded to make room for another: active, everything they
    /// accepted persisted and nothing on its way to the PSS, no move snapshot under way,
    /// and no call about them for `idle` or longer (a block operation, or a call
    /// [`Cache::touch`]ed; since the copy was made or switched in, for one with neither).
    /// Longest idle first, with their incarnations. (A PSS read still in flight after
    /// `idle` is abandoned, its caller gone: its answer finds the volume unloaded.)
    pub fn idle_clean(&self, idle: Duration) -> Vec<(VolumeName, u32)> {
        let now = self.clock.now();
        let mut found: Vec<(Instant, &Volume)> = self
            .volumes
            .values()
            .filter_map(|v| {
                let touched = v.touched.get();
                let last = v.rate.last.get().map_or(touched, |t| t.max(touched));
                let quiet = v.state == VolumeState::Active
                    && v.is_clean()
                    && v.accepted <= v.persisted
                    && v.changed.is_none();
                (quiet && now.saturating_duration_since(last) >= idle).then_some((last, v))
            })
            .collect();
        found.sort_by_key(|&(t, _)| t);
        found.into_iter().map(|(_, v)| (v.name.clone(), v.id)).collect()
    }

    /// Marks `name` as just used by its vehicle (a call other than a block operation), so
    /// [`Cache::idle_clean`] does not offer it.
    pub fn touch(&self, name: &VolumeName) {
        if let Some(v) = self.volumes.get(name) {
            v.touched.set(self.clock.now());
        }
    }

    /// Takes an idle volume out (see [`Cache::idle_clean`]), to be dropped after the lock
    /// is released (freeing its blocks is not work to do under it).
    pub fn unload(&mut self, name: &VolumeName) -> Option<Retired> {
        self.take_volume(name).map(Retired)
    }

    /// Adds an owned, active volume (a vehicle's load), replacing a redirect marker or an
    /// older copy, but never a volume arriving by migration: that one belongs to the move
    /// until it switches or is dropped (the caller serializes loads with a move's Begin, so
    /// this only backs that up).
    pub fn insert_owned(
        &mut self,
        name: VolumeName,
        block_size: BlockSize,
        epoch: Epoch,
        credential: CredentialHash,
        persisted: Lsn,
    ) -> Result<(), CacheError> {
        if let Some(v) = self.volumes.get(&name) {
            if matches!(v.state, VolumeState::Incoming { .. }) {
                return Err(CacheError::NotServing(v.state.clone()));
            }
        }
        self.insert_volume(name, block_size, epoch, credential, persisted, VolumeState::Active);
        Ok(())
    }

    /// Drops a volume and its blocks (dirty ones too: the caller knows they are safe
    /// elsewhere). Returns whether it was there.
    pub fn remove_volume(&mut self, name: &VolumeName) -> bool {
        self.take_volume(name).is_some()
    }

    /// Takes a volume out of the cache, its accounting with it; dropping it frees its blocks.
    fn take_volume(&mut self, name: &VolumeName) -> Option<Volume> {
        let v = self.volumes.remove(name)?;
        self.ids.remove(&v.id);
        self.used_bytes -= v.cached_bytes;
        *self.dirty_counter(&v.state) -= v.dirty_bytes;
        self.compact_ring();
        Some(v)
    }

    /// Drops the ring's stale places (of volumes gone, of blocks gone, a block's second
    /// place) once they outnumber the live blocks: the ring's memory is not in
    /// `used_bytes`, and a move's frames that forget and send a block again and again
    /// would otherwise grow it without bound.
    fn compact_ring(&mut self) {
        if self.ring.len() <= 1024 || self.ring.len() <= 2 * self.live_entries() {
            return;
        }
        let (ids, volumes) = (&self.ids, &self.volumes);
        let mut seen = std::collections::HashSet::new();
        self.ring.retain(|&(id, block)| {
            let live = ids
                .get(&id)
                .and_then(|n| volumes.get(n))
                .is_some_and(|v| v.entries.contains_key(&block));
            live && seen.insert((id, block))
        });
    }

    /// Replaces a volume's blocks by a redirect marker. The old blocks and request-id table
    /// come back as [`Retired`], to be dropped after the lock is released: freeing tens of
    /// thousands of allocations is the slowest part of a switch otherwise.
    pub fn mark_moved(&mut self, name: &VolumeName, to: String, epoch: Epoch) -> Option<Retired> {
        let old = self.take_volume(name)?;
        let state = VolumeState::Moved { to, epoch };
        self.insert_volume(name.clone(), old.block_size, epoch, old.credential, Lsn(0), state);
        if let Some(v) = self.volumes.get(name) {
            self.markers.push_back((name.clone(), v.id));
        }
        self.drop_old_markers();
        Some(Retired(old))
    }

    /// Keeps at most `max_moved_markers` redirect markers, dropping the oldest: every live
    /// marker is in `markers` (with entries of markers replaced since), so keeping that to
    /// the limit bounds them, in O(1) per move under the cache lock (no scan of the
    /// volumes in a switch). A vehicle that attached here and still calls with a dropped
    /// marker's volume is told to attach again at the owner the PSS names (its session is
    /// this node's: the volume is not loaded anew behind its back, see `Node::ensure`).
    fn drop_old_markers(&mut self) {
        while self.markers.len() > self.limits.max_moved_markers {
            let Some((name, id)) = self.markers.pop_front() else { break };
            let live = self
                .volumes
                .get(&name)
                .is_some_and(|v| v.id == id && matches!(v.state, VolumeState::Moved { .. }));
            if live {
                self.remove_volume(&name);
            }
        }
    }

    fn live_entries(&self) -> usize {
        self.volumes.values().map(|v| v.entries.len()).sum()
    }

    fn serving(&self, name: &VolumeName) -> Result<&Volume, CacheError> {
        let v = self.volumes.get(name).ok_or_else(|| CacheError::UnknownVolume(name.clone()))?;
        match &v.state {
            VolumeState::Active => Ok(v),
            s => Err(CacheError::NotServing(s.clone())),
        }
    }

    /// Reads `len` bytes (to the end when `None`) at `offset` of a block.
    pub fn read(
        &mut self,
        name: &VolumeName,
        block: BlockNo,
        offset: u32,
        len: Option<u32>,
    ) -> Result<ReadOutcome, CacheError> {
        // A paused volume's content is final until the switch, so reads go on.
        let v =
            self.volumes.get_mut(name).ok_or_else(|| CacheError::UnknownVolume(name.clone()))?;
        if !matches!(v.state, VolumeState::Active | VolumeState::Paused) {
            return Err(CacheError::NotServing(v.state.clone()));
        }
        let bs = v.block_size;
        bs.check_range(offset, u64::from(len.unwrap_or(0))).map_err(|_| CacheError::Range {
            offset,
            len: u64::from(len.unwrap_or(0)),
            block_size: bs.bytes(),
        })?;
        let (per_s, burst) = (self.limits.volume_ops_per_s, self.limits.volume_ops_burst);
        // A miss waits for the budget too, before its PSS read (taken once it is answered).
        v.rate
            .ready(self.clock.now(), per_s, burst, 1)
            .map_err(|wait| CacheError::RateLimited { per_s, wait })?;
        let Some(e) = v.entries.get_mut(&block) else { return Ok(ReadOutcome::Miss) };
        v.rate.take(1);
        Ok(read_entry(e, offset, len))
    }

    /// [`Cache::read`] of several blocks of one volume, looking the volume up once: `Some`
    /// with each outcome, in order, when every block is cached (with data or known absent)
    /// and every range fits; `None` when the volume is not served here or any read would
    /// miss or fail (the caller then reads one by one).
    pub fn read_many(
        &mut self,
        name: &VolumeName,
        reads: &[(BlockNo, u32, Option<u32>)],
    ) -> Option<Vec<ReadOutcome>> {
        let v = self.volumes.get_mut(name)?;
        if !matches!(v.state, VolumeState::Active | VolumeState::Paused) {
            return None;
        }
        // All or nothing: over the budget, the caller reads one by one (and waits); checked
        // first, so a refused batch marks no block as used.
        let n = reads.len() as u64;
        let (per_s, burst) = (self.limits.volume_ops_per_s, self.limits.volume_ops_burst);
        v.rate.ready(self.clock.now(), per_s, burst, n).ok()?;
        let bs = v.block_size;
        let mut out = Vec::with_capacity(reads.len());
        for &(block, offset, len) in reads {
            bs.check_range(offset, u64::from(len.unwrap_or(0))).ok()?;
            out.push(read_entry(v.entries.get_mut(&block)?, offset, len));
        }
        v.rate.take(n);
        Some(out)
    }

    /// The blocks of `blocks` without an entry in an active volume `name` (none when the
    /// volume is unknown or not active).
    pub fn uncached(&self, name: &VolumeName, blocks: &[BlockNo]) -> Vec<BlockNo> {
        match self.volumes.get(name) {
            Some(v) if matches!(v.state, VolumeState::Active) => {
                blocks.iter().copied().filter(|b| !v.entries.contains_key(b)).collect()
            }
            _ => Vec::new(),
        }
    }

    /// Starts a PSS read of `blocks` of `name` (call it before the read is sent): the
    /// answer is cached by [`Cache::fill`] with the returned id only if no write of the
    /// block came in between.
    pub fn begin_fetch(&mut self, name: &VolumeName, blocks: &[BlockNo]) -> FetchId {
        let id = self.next_fetch;
        self.next_fetch += 1;
        if let Some(v) = self.volumes.get_mut(name) {
            if v.fetches.len() + blocks.len() > self.limits.max_tracked_fetches_per_volume {
                // Forgetting is safe: the fetches in flight then are answered, not cached.
                v.fetches.clear();
            }
            // A block cached by now (written since the caller found it missing) is not
            // registered: its answer, older than that write, is never cached, even after
            // the write is persisted and evicted.
            for b in blocks {
                if !v.entries.contains_key(b) {
                    v.fetches.insert(*b, id);
                }
            }
        }
        FetchId(id)
    }

    /// Caches a block fetched from the PSS (`None`: absent there) by `fetch`, unless the
    /// block got cached meanwhile or was written since the fetch began (a write wins over
    /// an older fetch, even one that was written back and evicted before the answer came).
    pub fn fill(
        &mut self,
        name: &VolumeName,
        block: BlockNo,
        fetched: Option<(Bytes, u64)>,
        fetch: FetchId,
    ) {
        let Some(v) = self.volumes.get_mut(name) else { return };
        if v.fetches.get(&block) != Some(&fetch.0) {
            return;
        }
        v.fetches.remove(&block);
        if v.entries.contains_key(&block) || !matches!(v.state, VolumeState::Active) {
            return;
        }
        let (data, version) = match fetched {
            Some((d, ver)) => (Some(d), ver),
            None => (None, 0),
        };
        let e = Entry {
            data,
            version,
            heat: 1,
            referenced: true,
            dirty_lsn: None,
            inflight: false,
            lsn: Lsn(0),
            charged: 0,
        };
        let add = e.bytes();
        v.entries.insert(block, e);
        v.cached_bytes += add;
        self.used_bytes += add;
        self.ring.push_back((v.id, block));
        self.evict();
    }

    /// The dirty bytes a write would add, and whether the limits allow it.
    fn admit(&self, v: &Volume, block: BlockNo, new_len: u64) -> Result<(), CacheError> {
        let charged = v.entries.get(&block).map_or(0, |e| e.charged);
        let add = (new_len + ENTRY_OVERHEAD_BYTES).saturating_sub(charged);
        if add == 0 {
            return Ok(());
        }
        if v.dirty_bytes + add > self.limits.dirty_limit_bytes_per_volume {
            return Err(CacheError::DirtyFull {
                limit: "dirty_limit_bytes_per_volume",
                value: v.dirty_bytes,
                max: self.limits.dirty_limit_bytes_per_volume,
            });
        }
        if self.dirty_bytes + add > self.limits.dirty_limit_bytes {
            return Err(CacheError::DirtyFull {
                limit: "dirty_limit_bytes",
                value: self.dirty_bytes,
                max: self.limits.dirty_limit_bytes,
            });
        }
        Ok(())
    }

    /// Whether `n` operations of `v` fit its operation budget now (nothing is taken: a
    /// write or delete takes it in [`Cache::apply`], once applied).
    fn rate_ready_n(&self, v: &Volume, n: u64) -> Result<(), CacheError> {
        let (per_s, burst) = (self.limits.volume_ops_per_s, self.limits.volume_ops_burst);
        v.rate
            .ready(self.clock.now(), per_s, burst, n)
            .map_err(|wait| CacheError::RateLimited { per_s, wait })
    }

    fn rate_ready(&self, v: &Volume) -> Result<(), CacheError> {
        self.rate_ready_n(v, 1)
    }

    /// Whether `n` operations of `name` fit its operation budget now (nothing is taken):
    /// a batch's PSS read of its misses is made only then. An unknown volume passes.
    pub fn budget_ready(&self, name: &VolumeName, n: u64) -> Result<(), CacheError> {
        self.volumes.get(name).map_or(Ok(()), |v| self.rate_ready_n(v, n))
    }

    fn duplicate(&self, v: &Volume, id: Option<&RequestId>) -> Option<WriteOutcome> {
        let a = v.applied.get(id?)?;
        Some(WriteOutcome {
            lsn: a.lsn,
            version: a.version,
            persisted: v.persisted,
            duplicate: true,
            urgent: false,
        })
    }

    /// Writes `data` at `offset` of a block. A partial write of an uncached block is
    /// [`CacheError::NeedBlock`]: fetch it, [`Cache::fill`] it, and retry.
    pub fn write(
        &mut self,
        name: &VolumeName,
        block: BlockNo,
        offset: u32,
        data: &[u8],
        request_id: Option<&RequestId>,
    ) -> Result<WriteOutcome, CacheError> {
        let v = self.serving(name)?;
        if let Some(d) = self.duplicate(v, request_id) {
            return Ok(d);
        }
        if self.writes_closed {
            return Err(CacheError::ShuttingDown);
        }
        let bs = v.block_size.bytes();
        let len = data.len() as u64;
        v.block_size.check_range(offset, len).map_err(|_| CacheError::Range {
            offset,
            len,
            block_size: bs,
        })?;
        let full = offset == 0 && len == u64::from(bs);
        let base = match (full, v.entries.get(&block)) {
            (true, _) => None,
            (false, None) => return Err(CacheError::NeedBlock(block)),
            (false, Some(e)) => Some(e.data.clone().unwrap_or_default()),
        };
        // The budget is asked last: a duplicate, a bad range or a block to fetch first is
        // answered as such, whatever the budget.
        self.rate_ready(v)?;
        let new = match base {
            None => self.pool.copy(data),
            Some(base) => {
                let (start, end) = (offset as usize, offset as usize + data.len());
                self.pool.build(end.max(base.len()), |buf| {
                    // Every byte: the old content, zeroes up to the write, the write.
                    let keep = base.len().min(start);
                    buf[..keep].copy_from_slice(&base[..keep]);
                    buf[keep..start].fill(0);
                    buf[start..end].copy_from_slice(data);
                    if base.len() > end {
                        buf[end..].copy_from_slice(&base[end..]);
                    }
                })
            }
        };
        self.admit(v, block, new.len() as u64)?;
        Ok(self.apply(name, block, Some(new), request_id))
    }

    /// Deletes a block.
    pub fn delete(
        &mut self,
        name: &VolumeName,
        block: BlockNo,
        request_id: Option<&RequestId>,
    ) -> Result<WriteOutcome, CacheError> {
        let v = self.serving(name)?;
        if let Some(d) = self.duplicate(v, request_id) {
            return Ok(d);
        }
        if self.writes_closed {
            return Err(CacheError::ShuttingDown);
        }
        self.rate_ready(v)?;
        self.admit(v, block, 0)?;
        Ok(self.apply(name, block, None, request_id))
    }

    fn apply(
        &mut self,
        name: &VolumeName,
        block: BlockNo,
        data: Option<Bytes>,
        request_id: Option<&RequestId>,
    ) -> WriteOutcome {
        let cap = self.limits.dedupe_entries_per_volume;
        let max_changed = self.limits.max_changed_blocks_per_move;
        let v = self.volumes.get_mut(name).expect("checked by caller");
        v.rate.take(1);
        v.fetches.remove(&block);
        v.accepted = Lsn(v.accepted.0 + 1);
        let lsn = v.accepted;
        let version = v.next_version(lsn);
        let new_bytes = data.as_ref().map_or(0, |d| d.len() as u64) + ENTRY_OVERHEAD_BYTES;
        let old_bytes = v.entries.get(&block).map_or(0, Entry::bytes);
        let is_new = !v.entries.contains_key(&block);
        let e = v.entries.entry(block).or_insert(Entry {
            data: None,
            version: 0,
            heat: 0,
            referenced: true,
            dirty_lsn: None,
            inflight: false,
            lsn: Lsn(0),
            charged: 0,
        });
        e.data = data;
        e.version = version;
        e.heat = e.heat.saturating_add(1);
        e.referenced = true;
        e.lsn = lsn;
        if e.dirty_lsn.is_none() {
            e.dirty_lsn = Some(lsn);
            v.dirty.insert((lsn, block));
        }
        // Dirty bytes count data plus the entry's overhead, so a dirty delete is never
        // free. A block rewritten while in flight stays charged at its largest size until
        // clean.
        let new_charge = new_bytes.max(e.charged);
        let delta = new_charge - e.charged;
        e.charged = new_charge;
        v.dirty_bytes += delta;
        self.dirty_bytes += delta;
        v.cached_bytes = v.cached_bytes + new_bytes - old_bytes;
        self.used_bytes = self.used_bytes + new_bytes - old_bytes;
        if let Some(changed) = &mut v.changed {
            if changed.len() < max_changed || changed.contains(&block) {
                changed.insert(block);
            } else {
                v.changed_overflow = true;
            }
        }
        let applied = Applied { lsn, version };
        if let Some(id) = request_id {
            v.remember(id.clone(), applied, cap);
        }
        let persisted = v.persisted;
        let id = v.id;
        if is_new {
            self.ring.push_back((id, block));
        }
        self.evict();
        let urgent = self.past_writeback_start(name);
        WriteOutcome { lsn, version, persisted, duplicate: false, urgent }
    }

    /// Evicts clean blocks (CLOCK) until the budget holds or only unpersisted ones remain.
    /// A block of a volume migrating out may go too: if it changed since an earlier round
    /// sent it, the next round tells the target to forget its copy
    /// ([`Cache::snapshot_changed`]), so nothing is pinned past the budget during a move.
    fn evict(&mut self) {
        let mut skipped = 0usize;
        while self.used_bytes > self.limits.cache_capacity_bytes && skipped <= self.ring.len() {
            let Some((id, block)) = self.ring.pop_front() else { break };
            let Some(name) = self.ids.get(&id) else { continue };
            let v = self.volumes.get_mut(name).expect("ids and volumes agree");
            let Some(e) = v.entries.get_mut(&block) else { continue };
            if e.unpersisted() {
                skipped += 1;
                self.ring.push_back((id, block));
            } else if e.referenced {
                e.referenced = false;
                self.ring.push_back((id, block));
            } else {
                let b = e.bytes();
                v.entries.remove(&block);
                v.cached_bytes -= b;
                self.used_bytes -= b;
                self.evictions += 1;
                skipped = 0;
            }
        }
    }

    /// Takes the next write-back batch of a volume (none while one is in flight): the
    /// blocks dirtied earliest first, up to the batch limits.
    pub fn take_batch(&mut self, name: &VolumeName) -> Option<Batch> {
        let (max_ops, max_bytes) = (self.limits.max_batch_ops, self.limits.max_batch_bytes);
        let v = self.volumes.get_mut(name)?;
        if v.inflight.is_some() || v.dirty.is_empty() {
            return None;
        }
        if !matches!(v.state, VolumeState::Active | VolumeState::Paused) {
            return None;
        }
        let mut changes = Vec::new();
        let mut taken = Vec::new();
        let mut bytes = 0u64;
        while let Some(&(lsn, block)) = v.dirty.first() {
            let e = v.entries.get_mut(&block).expect("dirty blocks are cached");
            let len = e.data.as_ref().map_or(0, |d| d.len() as u64);
            if !changes.is_empty() && (changes.len() >= max_ops || bytes + len > max_bytes) {
                break;
            }
            v.dirty.pop_first();
            bytes += len;
            e.dirty_lsn = None;
            e.inflight = true;
            taken.push((block, e.version, lsn));
            changes.push(Change { block, data: e.data.clone(), version: e.version });
        }
        // Every write below the earliest still-dirty one is in this batch or already in
        // the PSS, so the batch makes everything before it persisted.
        let persisted = match v.dirty.first() {
            Some(&(lsn, _)) => Lsn(lsn.0 - 1),
            None => v.accepted,
        }
        .max(v.persisted);
        let cut_short = !v.dirty.is_empty();
        let seq = self.next_batch;
        self.next_batch += 1;
        v.inflight = Some((seq, taken));
        let id = BatchId { incarnation: v.id, seq };
        Some(Batch { id, volume: name.clone(), epoch: v.epoch, changes, persisted, cut_short })
    }

    /// Records a batch's fate. On success its blocks become clean unless written again
    /// meanwhile; on failure they are dirty again. Only the volume's current in-flight
    /// batch counts: for any other (the volume was replaced since, or the batch was already
    /// completed) nothing changes and this returns false.
    pub fn complete_batch(&mut self, batch: &Batch, ok: bool) -> bool {
        let Some(v) = self.volumes.get_mut(&batch.volume) else { return false };
        if v.id != batch.id.incarnation
            || v.inflight.as_ref().map(|(seq, _)| *seq) != Some(batch.id.seq)
        {
            return false;
        }
        let Some((_, taken)) = v.inflight.take() else { return false };
        let mut freed = 0u64;
        for (block, _version, lsn) in taken {
            let Some(e) = v.entries.get_mut(&block) else { continue };
            e.inflight = false;
            if ok {
                if e.dirty_lsn.is_none() {
                    freed += e.charged;
                    e.charged = 0;
                }
            } else {
                if let Some(later) = e.dirty_lsn {
                    v.dirty.remove(&(later, block));
                }
                e.dirty_lsn = Some(lsn);
                v.dirty.insert((lsn, block));
            }
        }
        if ok {
            v.persisted = v.persisted.max(batch.persisted);
            v.dirty_bytes -= freed;
            self.dirty_bytes -= freed;
        }
        true
    }

    // ---- migration, source side ----

    /// Starts tracking changed blocks and returns every cached block, in no order (sort
    /// them with [`hottest_first`] after letting go of the cache).
    pub fn snapshot_all(&mut self, name: &VolumeName) -> Vec<MigBlock> {
        let Some(v) = self.volumes.get_mut(name) else { return Vec::new() };
        v.changed = Some(HashSet::default());
        v.changed_overflow = false;
        v.entries.iter().map(|(&b, e)| mig_block(b, e)).collect()
    }

    /// Bytes of the blocks changed since the last snapshot.
    pub fn changed_bytes(&self, name: &VolumeName) -> u64 {
        let Some(v) = self.volumes.get(name) else { return 0 };
        let Some(changed) = &v.changed else { return 0 };
        changed
            .iter()
            .filter_map(|b| v.entries.get(b))
            .map(|e| e.data.as_ref().map_or(0, |d| d.len() as u64))
            .sum()
    }

    /// The blocks changed since the last snapshot, in no order (see [`hottest_first`]);
    /// tracking restarts. A changed block no longer cached (written back, then evicted)
    /// goes as a `forget`: the target must not keep the copy an earlier round sent it
    /// (dirty, it would write that older content back at the new epoch). Refused when more
    /// blocks changed than the set may hold: which ones is no longer known, and a block
    /// left out would leave the target an older copy.
    pub fn snapshot_changed(&mut self, name: &VolumeName) -> Result<Vec<MigBlock>, String> {
        if let Some(e) = self.changed_overflow(name) {
            return Err(e);
        }
        let Some(v) = self.volumes.get_mut(name) else { return Ok(Vec::new()) };
        let Some(changed) = v.changed.replace(HashSet::default()) else { return Ok(Vec::new()) };
        Ok(changed
            .into_iter()
            .map(|b| v.entries.get(&b).map_or_else(|| MigBlock::forget(b), |e| mig_block(b, e)))
            .collect())
    }

    /// Why a move of `name` cannot go on: more blocks changed since the last snapshot than
    /// the set may hold ([`Limits::max_changed_blocks_per_move`]).
    pub fn changed_overflow(&self, name: &VolumeName) -> Option<String> {
        let max = self.limits.max_changed_blocks_per_move;
        self.volumes.get(name).filter(|v| v.changed_overflow).map(|_| {
            format!(
                "more than migration_max_changed_blocks ({max}) blocks changed during one \
                 round: the vehicle writes more distinct blocks than the move keeps up with"
            )
        })
    }

    /// Stops tracking changes (migration finished or aborted).
    pub fn stop_tracking(&mut self, name: &VolumeName) {
        if let Some(v) = self.volumes.get_mut(name) {
            v.changed = None;
            v.changed_overflow = false;
        }
    }

    /// Sets a volume's state (pause for a switch, resume after an abort).
    pub fn set_state(&mut self, name: &VolumeName, state: VolumeState) {
        let Some(v) = self.volumes.get_mut(name) else { return };
        let (was, dirty) = (std::mem::replace(&mut v.state, state.clone()), v.dirty_bytes);
        *self.dirty_counter(&was) -= dirty;
        *self.dirty_counter(&state) += dirty;
    }

    /// The node-wide dirty count a volume in `state` is charged to.
    fn dirty_counter(&mut self, state: &VolumeState) -> &mut u64 {
        match state {
            VolumeState::Incoming { .. } => &mut self.incoming_dirty_bytes,
            _ => &mut self.dirty_bytes,
        }
    }

    /// Pauses a served volume for a move's switch; anything else (a redirect marker left
    /// by a fence during the move, a volume gone) is refused as it is, unchanged: pausing a
    /// marker would stop its redirects, and a failed switch would then make it Active.
    pub fn pause(&mut self, name: &VolumeName) -> Result<(), Option<VolumeState>> {
        match self.volumes.get_mut(name) {
            Some(v) if v.state == VolumeState::Active => {
                v.state = VolumeState::Paused;
                Ok(())
            }
            other => Err(other.map(|v| v.state.clone())),
        }
    }

    // ---- migration, target side ----

    /// The volume `name` arriving by migration `migration_id`, or why not.
    fn incoming_mut<'a>(
        volumes: &'a mut HashMap<VolumeName, Volume>,
        name: &VolumeName,
        migration_id: u64,
    ) -> Result<&'a mut Volume, IncomingError> {
        match volumes.get_mut(name) {
            Some(v) if v.state == (VolumeState::Incoming { migration_id }) => Ok(v),
            other => Err(IncomingError::NotIncoming {
                volume: name.clone(),
                migration_id,
                state: other.map(|v| v.state.clone()),
            }),
        }
    }

    /// Stores blocks arriving by migration `migration_id` (an incoming volume). Dirty ones
    /// will be written back once the volume is switched here. Refused (nothing changes)
    /// unless the volume is still arriving by that move.
    pub fn put_migrated(
        &mut self,
        name: &VolumeName,
        migration_id: u64,
        blocks: Vec<MigBlock>,
    ) -> Result<(), IncomingError> {
        let v = Self::incoming_mut(&mut self.volumes, name, migration_id)?;
        let id = v.id;
        let mut added = Vec::new();
        for b in blocks {
            v.fetches.remove(&b.block);
            let old = v.entries.remove(&b.block);
            if let Some(old) = &old {
                v.cached_bytes -= old.bytes();
                self.used_bytes -= old.bytes();
                if let Some(l) = old.dirty_lsn {
                    v.dirty.remove(&(l, b.block));
                }
                v.dirty_bytes -= old.charged;
                self.incoming_dirty_bytes -= old.charged;
            } else if !b.forget {
                added.push(b.block);
            }
            if b.forget {
                // The source's copy was written back since: reads go to the PSS.
                continue;
            }
            let mut e = Entry {
                data: b.data,
                version: b.version,
                heat: b.heat,
                referenced: true,
                // Placeholder; re-keyed at the switch when the lsns are known.
                dirty_lsn: b.dirty.then_some(Lsn(1)),
                inflight: false,
                lsn: b.lsn,
                charged: 0,
            };
            if e.dirty_lsn.is_some() {
                // Blocks that cannot be evicted stay within the memory budget (a source
                // claiming a small volume cannot fill this node's memory with them): past it
                // the move is refused, and the incoming copy dropped. Not the dirty limits:
                // a block sent dirty in one round stays dirty here until the switch even if
                // the source wrote it back since (rounds carry no watermark), so a busy
                // writer's move would pass them while the source stays within its own; and
                // apart from the served volumes' dirty bytes (`incoming_dirty_bytes`), whose
                // writes would otherwise wait on a move in for as long as it lasts.
                // The served volumes keep room for their whole dirty budget: what cannot be
                // evicted stays within the memory budget whatever they write meanwhile.
                let charge = e.bytes();
                let max = self.limits.cache_capacity_bytes;
                let served = self.dirty_bytes.max(self.limits.dirty_limit_bytes);
                let value = served + self.incoming_dirty_bytes;
                if value + charge > max {
                    let limit = "cache_capacity_bytes";
                    return Err(IncomingError::DirtyFull { limit, value, max });
                }
                v.dirty.insert((Lsn(1), b.block));
                e.charged = charge;
                v.dirty_bytes += e.charged;
                self.incoming_dirty_bytes += e.charged;
            }
            v.cached_bytes += e.bytes();
            self.used_bytes += e.bytes();
            v.entries.insert(b.block, e);
        }
        for block in added {
            self.ring.push_back((id, block));
        }
        self.compact_ring();
        self.evict();
        Ok(())
    }

    /// Makes room for `n` more blocks of an incoming volume at once (its block table and
    /// the eviction ring), as [`Cache::reserve_applied`] does for request ids; `n` is
    /// capped by what the cache's capacity can hold.
    pub fn reserve_blocks(&mut self, name: &VolumeName, n: u64) {
        let Some(v) = self.volumes.get_mut(name) else { return };
        let fit = self.limits.cache_capacity_bytes / u64::from(v.block_size.bytes()).max(1);
        let n = usize::try_from(n.min(fit)).unwrap_or(0);
        v.entries.reserve(n);
        self.ring.reserve(n);
    }

    /// Makes room for `n` more remembered request ids at once: growing by doubling
    /// rehashed (and, in a fresh process, faulted in) the table several times over for a
    /// round's ~20k ids.
    pub fn reserve_applied(&mut self, name: &VolumeName, n: usize) {
        let cap = self.limits.dedupe_entries_per_volume;
        let Some(v) = self.volumes.get_mut(name) else { return };
        let room = n.min(cap.saturating_sub(v.applied_order.len()));
        v.applied.reserve(room);
        v.applied_order.reserve(room);
    }

    /// Remembers request ids the source applied (sent with a pre-copy round), oldest
    /// first; refused like [`Cache::put_migrated`].
    pub fn remember_migrated(
        &mut self,
        name: &VolumeName,
        migration_id: u64,
        applied: impl IntoIterator<Item = (RequestId, Applied)>,
    ) -> Result<(), IncomingError> {
        let cap = self.limits.dedupe_entries_per_volume;
        let v = Self::incoming_mut(&mut self.volumes, name, migration_id)?;
        for (id, a) in applied {
            v.remember(id, a, cap);
        }
        Ok(())
    }

    /// Completes an incoming volume: it takes the source's log positions and applied
    /// request ids, and its dirty blocks wait for write-back after `persisted`. Refused
    /// (nothing changes) unless the volume is still arriving by `migration_id` and the
    /// positions pass [`check_switch_lsns`].
    pub fn finish_incoming(
        &mut self,
        name: &VolumeName,
        migration_id: u64,
        epoch: Epoch,
        accepted: Lsn,
        persisted: Lsn,
        applied: Vec<(RequestId, Applied)>,
    ) -> Result<(), IncomingError> {
        check_switch_lsns(accepted, persisted)?;
        let cap = self.limits.dedupe_entries_per_volume;
        let now = self.clock.now();
        let v = Self::incoming_mut(&mut self.volumes, name, migration_id)?;
        // Served from now: idle from now (however long the move took).
        v.touched.set(now);
        v.epoch = epoch;
        v.accepted = accepted;
        v.persisted = persisted;
        let first = Lsn(persisted.0 + 1);
        let blocks: Vec<BlockNo> = v.dirty.iter().map(|&(_, b)| b).collect();
        v.dirty.clear();
        let mut freed = 0;
        for b in blocks {
            let Some(e) = v.entries.get_mut(&b) else { continue };
            // Sent dirty in a round, and every write folded into it is persisted by now
            // (the source wrote it back since; written again, it would have been sent
            // again or forgotten): clean here, not written back a second time nor held
            // against the dirty limits. (An lsn of 0 says nothing: kept dirty.)
            if e.lsn.0 > 0 && e.lsn <= persisted {
                e.dirty_lsn = None;
                freed += e.charged;
                e.charged = 0;
                continue;
            }
            e.dirty_lsn = Some(first);
            v.dirty.insert((first, b));
        }
        // Served from now: what stays dirty joins the served volumes' dirty bytes (it may
        // pass the dirty limit for a while: the writer starts at once, and writes wait).
        self.incoming_dirty_bytes -= v.dirty_bytes;
        v.dirty_bytes -= freed;
        self.dirty_bytes += v.dirty_bytes;
        for (id, a) in applied {
            v.remember(id, a, cap);
        }
        v.state = VolumeState::Active;
        Ok(())
    }
}

/// Orders a migration snapshot hottest first (ties by block number), the order its blocks
/// travel in. Done outside the cache lock: sorting 16k blocks held every vehicle up ~1 ms.
pub fn hottest_first(blocks: &mut [MigBlock]) {
    blocks.sort_unstable_by(|a, b| b.heat.cmp(&a.heat).then(a.block.cmp(&b.block)));
}

fn mig_block(block: BlockNo, e: &Entry) -> MigBlock {
    MigBlock {
        block,
        data: e.data.clone(),
        version: e.version,
        dirty: e.unpersisted(),
        lsn: e.lsn,
        heat: e.heat,
        forget: false,
    }
}

/// A read of a cached entry (marks it referenced and hotter): its bytes in
/// `offset..offset + len` (to its end without `len`), clipped to what it holds.
fn read_entry(e: &mut Entry, offset: u32, len: Option<u32>) -> ReadOutcome {
    e.referenced = true;
    e.heat = e.heat.saturating_add(1);
    let Some(data) = &e.data else { return ReadOutcome::Absent };
    let start = (offset as usize).min(data.len());
    let end = len.map_or(data.len(), |l| (offset as usize + l as usize).min(data.len()));
    ReadOutcome::Hit { data: data.slice(start..end), version: e.version }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wayside_proto::types::Credential;

    fn limits() -> Limits {
        Limits {
            cache_capacity_bytes: 10 * (4096 + ENTRY_OVERHEAD_BYTES),
            dirty_limit_bytes: 6 * (4096 + ENTRY_OVERHEAD_BYTES),
            dirty_limit_bytes_per_volume: 4 * (4096 + ENTRY_OVERHEAD_BYTES),
            writeback_start_dirty_bytes: 5 * (4096 + ENTRY_OVERHEAD_BYTES),
            writeback_start_dirty_bytes_per_volume: 2 * (4096 + ENTRY_OVERHEAD_BYTES),
            dedupe_entries_per_volume: 4,
            max_batch_ops: 2,
            max_batch_bytes: 1 << 20,
            max_tracked_fetches_per_volume: 8,
            max_moved_markers: 3,
            volume_ops_per_s: 1_000_000,
            volume_ops_burst: 1_000_000,
            max_changed_blocks_per_move: 1_000,
        }
    }

    fn vol(c: &mut Cache, name: &str) -> VolumeName {
        let n = VolumeName::new(name).unwrap();
        c.insert_volume(
            n.clone(),
            BlockSize::new(4096).unwrap(),
            Epoch(1),
            Credential::new("s").unwrap().hash(),
            Lsn(0),
            VolumeState::Active,
        );
        n
    }

    fn full(b: u8) -> Vec<u8> {
        vec![b; 4096]
    }

    #[test]
    fn a_rate_bucket_refills_at_its_rate_up_to_its_depth() {
        let t0 = Instant::now();
        let b = RateBucket::default();
        // Full at first use: 4 go at once, the 5th waits a quarter of a second at 4/s.
        for _ in 0..4 {
            b.ready(t0, 4, 4, 1).unwrap();
            b.take(1);
        }
        assert_eq!(b.ready(t0, 4, 4, 1), Err(Duration::from_millis(250)));
        let t1 = t0 + Duration::from_millis(500);
        b.ready(t1, 4, 4, 2).unwrap();
        b.take(2);
        assert!(b.ready(t1, 4, 4, 1).is_err());
        // Idle for a minute: still only 4 deep.
        let t2 = t1 + Duration::from_secs(60);
        assert!(b.ready(t2, 4, 4, 4).is_ok());
        assert!(b.ready(t2, 4, 4, 5).is_ok(), "a batch past the depth goes once it is full");
        b.take(10);
        assert_eq!(b.ready(t2, 4, 4, 1), Err(Duration::from_secs_f64(7.0 / 4.0)), "it paid");
    }

    #[test]
    fn only_operations_applied_or_answered_use_a_volumes_budget() {
        // A clock that stands still: nothing refills during the test.
        let t0 = Instant::now();
        let mut c = Cache::new(Limits { volume_ops_per_s: 1, volume_ops_burst: 3, ..limits() })
            .with_clock(Clock::new(move || t0));
        let v = vol(&mut c, "v");
        let w = vol(&mut c, "w");
        // A miss, a partial write of an uncached block and a bad range cost nothing.
        for _ in 0..5 {
            assert_eq!(c.read(&v, 7, 0, None).unwrap(), ReadOutcome::Miss);
            assert_eq!(c.write(&v, 7, 1, b"x", None), Err(CacheError::NeedBlock(7)));
            assert!(matches!(c.write(&v, 7, 4095, b"xy", None), Err(CacheError::Range { .. })));
        }
        c.write(&v, 1, 0, &full(1), None).unwrap();
        assert!(matches!(c.read(&v, 1, 0, None).unwrap(), ReadOutcome::Hit { .. }));
        c.delete(&v, 2, None).unwrap();
        // The budget of 3 is used: the next write is refused and changes nothing.
        let accepted = c.volume(&v).unwrap().accepted;
        let e = c.write(&v, 1, 0, &full(9), None).unwrap_err();
        assert!(matches!(e, CacheError::RateLimited { per_s: 1, .. }), "{e:?}");
        assert_eq!(c.volume(&v).unwrap().accepted, accepted);
        assert!(matches!(c.delete(&v, 1, None), Err(CacheError::RateLimited { .. })));
        assert!(matches!(c.read(&v, 1, 0, None), Err(CacheError::RateLimited { .. })));
        assert!(
            matches!(c.read(&v, 8, 0, None), Err(CacheError::RateLimited { .. })),
            "a miss waits for the budget before it is fetched"
        );
        assert_eq!(c.read_many(&v, &[(1, 0, None)]), None, "a batch is refused whole");
        // What is not an operation of the budget is answered as what it is.
        assert!(matches!(c.write(&v, 1, 4095, b"xy", None), Err(CacheError::Range { .. })));
        assert_eq!(c.write(&v, 9, 1, b"x", None), Err(CacheError::NeedBlock(9)));
        // Another volume has a budget of its own.
        c.write(&w, 1, 0, &full(2), None).unwrap();
        assert!(c.read_many(&w, &[(1, 0, None), (1, 0, None)]).is_some());
        assert!(c.read_many(&w, &[(1, 0, None)]).is_none(), "w used its 3 too");
    }

    #[test]
    fn idle_volumes_with_nothing_to_write_back_are_offered_longest_idle_first() {
        let now = std::sync::Arc::new(std::sync::Mutex::new(Instant::now()));
        let clock = {
            let now = now.clone();
            Clock::new(move || *now.lock().unwrap())
        };
        let advance = |d: u64| *now.lock().unwrap() += Duration::from_secs(d);
        let mut c = Cache::new(limits()).with_clock(clock);
        let idle = Duration::from_secs(60);
        let (old, used, dirty, sent) =
            (vol(&mut c, "old"), vol(&mut c, "used"), vol(&mut c, "dirty"), vol(&mut c, "sent"));
        advance(1);
        c.write(&used, 0, 0, &full(1), None).unwrap();
        let b = c.take_batch(&used).unwrap();
        assert!(c.complete_batch(&b, true));
        advance(29);
        let fresh = vol(&mut c, "fresh");
        advance(1);
        c.write(&dirty, 0, 0, &full(2), None).unwrap();
        c.write(&sent, 0, 0, &full(3), None).unwrap();
        let in_flight = c.take_batch(&sent).unwrap();
        assert_eq!(c.idle_clean(idle), Vec::<(VolumeName, u32)>::new(), "none idle a minute");
        advance(39);
        // 70 s: old and used (its last operation at 1 s) are idle; the rest were made at
        // 30 s or operated on at 31 s.
        let names = |c: &Cache| -> Vec<String> {
            c.idle_clean(idle).into_iter().map(|(v, _)| v.as_str().to_owned()).collect()
        };
        assert_eq!(names(&c), ["old", "used"]);
        advance(30);
        // 100 s: fresh (never operated on) is idle since it was made; dirty holds an
        // unpersisted write and sent's is on its way to the PSS; used is read again.
        assert!(matches!(c.read(&used, 0, 0, None).unwrap(), ReadOutcome::Hit { .. }));
        assert_eq!(names(&c), ["old", "fresh"]);
        assert_eq!(c.idle_clean(idle)[0].1, c.volume(&old).unwrap().incarnation());
        // Once persisted, sent is idle too (since its write at 31 s), after fresh.
        assert!(c.complete_batch(&in_flight, true));
        assert_eq!(names(&c), ["old", "fresh", "sent"]);
        // A call other than a block operation (an attach, a flush) counts as use too.
        c.touch(&fresh);
        assert_eq!(names(&c), ["old", "sent"]);
        // A volume being moved in or out is never offered.
        c.volume_mut(&old).unwrap().state = VolumeState::Paused;
        assert_eq!(names(&c), ["sent"]);
        // Unloaded, it is gone with its accounting.
        let used_before = c.used_bytes();
        assert!(c.unload(&sent).is_some());
        assert!(c.volume(&sent).is_none());
        assert!(c.used_bytes() < used_before);
        let _ = dirty;
    }

    #[test]
    fn room_made_for_an_incoming_volume_is_capped_by_the_cache_and_the_dedupe_limit() {
        let mut c = Cache::new(limits());
        let v = vol(&mut c, "in");
        // A Begin may claim anything; the tables grow at most to what the cache can hold.
        c.reserve_blocks(&v, u64::MAX);
        c.reserve_applied(&v, usize::MAX);
        let x = c.volume(&v).unwrap();
        assert!(x.entries.capacity() >= 9, "room for the 9 blocks the cache holds");
        assert!(x.entries.capacity() < 64, "not for u64::MAX: {}", x.entries.capacity());
        assert!(x.applied.capacity() >= 4 && x.applied.capacity() < 64);
        assert!(c.ring.capacity() >= 9 && c.ring.capacity() < 64);
        c.reserve_blocks(&VolumeName::new("absent").unwrap(), 5);
    }

    #[test]
    fn applied_ids_travel_in_marks_and_deduplicate_on_the_target() {
        let mut c = Cache::new(limits());
        let v = vol(&mut c, "v");
        let id = |n| RequestId::new("car".to_string(), n).unwrap();
        let mut outs = Vec::new();
        for n in 1..=3 {
            outs.push(c.write(&v, n, 0, &full(n as u8), Some(&id(n))).unwrap());
        }
        let (first, mark) = c.volume(&v).unwrap().applied_since(0);
        assert_eq!(first.iter().map(|(i, _)| i.seq()).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(mark, 3);
        for n in 4..=6 {
            outs.push(c.write(&v, n % 3, 0, &full(n as u8), Some(&id(n))).unwrap());
        }
        // Only what came after the mark; the cap (4) forgot ids 1 and 2 for everyone.
        let (next, mark2) = c.volume(&v).unwrap().applied_since(mark);
        assert_eq!(next.iter().map(|(i, _)| i.seq()).collect::<Vec<_>>(), vec![4, 5, 6]);
        assert_eq!(mark2, 6);
        assert!(c.volume(&v).unwrap().applied_since(mark2).0.is_empty());
        assert_eq!(c.volume(&v).unwrap().applied_since(0).0.len(), 4);

        // The target remembers them: a replay is answered with the original lsn and version.
        let mut t = Cache::new(limits());
        let tv = vol(&mut t, "v");
        t.set_state(&tv, VolumeState::Incoming { migration_id: 1 });
        t.remember_migrated(&tv, 1, first.into_iter().chain(next)).unwrap();
        t.set_state(&tv, VolumeState::Active);
        let again = t.write(&tv, 0, 0, &full(9), Some(&id(6))).unwrap();
        assert_eq!((again.lsn, again.version), (outs[5].lsn, outs[5].version));
        assert_eq!(t.read(&tv, 0, 0, None).unwrap(), ReadOutcome::Miss, "a replay writes nothing");
    }

    #[test]
    fn write_then_read_hits_and_partial_write_needs_the_block() {
        let mut c = Cache::new(limits());
        let v = vol(&mut c, "v");
        assert_eq!(c.read(&v, 1, 0, None).unwrap(), ReadOutcome::Miss);
        assert_eq!(c.write(&v, 1, 10, b"abc", None), Err(CacheError::NeedBlock(1)));
        let f = c.begin_fetch(&v, &[1]);
        c.fill(&v, 1, None, f);
        assert_eq!(c.read(&v, 1, 0, None).unwrap(), ReadOutcome::Absent);
        let w = c.write(&v, 1, 2, b"abc", None).unwrap();
        assert_eq!(w.lsn, Lsn(1));
        let ReadOutcome::Hit { data, .. } = c.read(&v, 1, 0, None).unwrap() else { panic!() };
        assert_eq!(&data[..], b"\0\0abc");
        let ReadOutcome::Hit { data, .. } = c.read(&v, 1, 3, Some(1)).unwrap() else { panic!() };
        assert_eq!(&data[..], b"b");
        assert!(matches!(c.write(&v, 1, 4095, b"ab", None), Err(CacheError::Range { .. })));
    }

    #[test]
    fn read_many_answers_only_when_every_read_hits() {
        let mut c = Cache::new(limits());
        let v = vol(&mut c, "v");
        c.write(&v, 1, 0, &full(1), None).unwrap();
        c.write(&v, 2, 0, &full(2), None).unwrap();
        let f = c.begin_fetch(&v, &[3]);
        c.fill(&v, 3, None, f);
        let got = c.read_many(&v, &[(2, 0, None), (3, 0, None), (1, 10, Some(5))]).unwrap();
        assert_eq!(
            got,
            vec![
                c.read(&v, 2, 0, None).unwrap(),
                ReadOutcome::Absent,
                c.read(&v, 1, 10, Some(5)).unwrap(),
            ]
        );
        assert!(matches!(&got[2], ReadOutcome::Hit { data, .. } if data.len() == 5));
        // One miss, a bad range, an unknown volume or one not served: no answer at all.
        assert_eq!(c.read_many(&v, &[(1, 0, None), (9, 0, None)]), None);
        assert_eq!(c.read_many(&v, &[(1, 4095, Some(2))]), None);
        assert_eq!(c.read_many(&VolumeName::new("nope").unwrap(), &[(1, 0, None)]), None);
        c.volume_mut(&v).unwrap().state = VolumeState::Incoming { migration_id: 1 };
        assert_eq!(c.read_many(&v, &[(1, 0, None)]), None);
    }

    /// Blocks written through a pool reuse slots that held other blocks: every byte of a
    /// partial write's result must still be the old block, zeroes, or the write.
    #[test]
    fn partial_writes_into_reused_pool_slots_carry_no_stale_bytes() {
        let pool = BlockPool::new(8 * crate::pool::SLOT_BYTES as u64);
        pool.fill().unwrap().join().unwrap();
        let mut c = Cache::with_pool(limits(), pool);
        let v = vol(&mut c, "v");
        // Dirty every slot with 0xee, then let them go back to the pool.
        for b in 0..4 {
            c.write(&v, b, 0, &full(0xee), None).unwrap();
        }
        assert_eq!(pool.stats().free_slots, 4);
        assert!(c.remove_volume(&v));
        assert_eq!(pool.stats().free_slots, 8, "dropped blocks give their slots back");
        let v = vol(&mut c, "v");
        let read = |c: &mut Cache, b| {
            let ReadOutcome::Hit { data, .. } = c.read(&v, b, 0, None).unwrap() else { panic!() };
            data
        };
        let f = c.begin_fetch(&v, &[1, 2]);
        c.fill(&v, 1, None, f);
        c.fill(&v, 2, Some((Bytes::from_static(b"0123456789"), 1)), f);
        // Past the end of an absent block: zeroes, then the write.
        c.write(&v, 1, 3, b"xy", None).unwrap();
        assert_eq!(&read(&mut c, 1)[..], b"\0\0\0xy");
        // Inside a shorter block: its bytes around the write.
        c.write(&v, 2, 4, b"ab", None).unwrap();
        assert_eq!(&read(&mut c, 2)[..], b"0123ab6789");
        // Past the end of a shorter block: it, zeroes, the write.
        c.write(&v, 2, 12, b"z", None).unwrap();
        assert_eq!(&read(&mut c, 2)[..], b"0123ab6789\0\0z");
        assert!(pool.stats().free_slots < 8, "the writes were served from the pool");
    }

    /// Caches `blocks` as read from the PSS (pushing older clean blocks out).
    fn fill_others(c: &mut Cache, v: &VolumeName, blocks: std::ops::Range<u64>) {
        for b in blocks {
            let f = c.begin_fetch(v, &[b]);
            c.fill(v, b, Some((Bytes::from(full(9)), 1)), f);
        }
    }

    #[test]
    fn a_fetch_overtaken_by_a_write_and_an_eviction_never_caches_stale_data() {
        let mut c = Cache::new(limits());
        let v = vol(&mut c, "v");
        assert_eq!(c.read(&v, 1, 0, None).unwrap(), ReadOutcome::Miss);
        // A read misses; its PSS read (which will answer version 1, all 1s) is in flight...
        let stale = c.begin_fetch(&v, &[1]);
        // ...while a newer write arrives, is written back and, under memory pressure, evicted.
        c.write(&v, 1, 0, &full(2), None).unwrap();
        let batch = c.take_batch(&v).expect("a write-back batch");
        c.complete_batch(&batch, true);
        fill_others(&mut c, &v, 100..120);
        assert_eq!(c.read(&v, 1, 0, None).unwrap(), ReadOutcome::Miss, "block 1 was evicted");
        // The old answer arrives: it is not cached (a partial write would build on it).
        c.fill(&v, 1, Some((Bytes::from(full(1)), 1)), stale);
        assert_eq!(c.read(&v, 1, 0, None).unwrap(), ReadOutcome::Miss, "stale data cached");
        assert_eq!(c.write(&v, 1, 10, b"abc", None), Err(CacheError::NeedBlock(1)));
        // A fetch begun after the write caches what it gets.
        let fresh = c.begin_fetch(&v, &[1]);
        c.fill(&v, 1, Some((Bytes::from(full(2)), 2)), fresh);
        let ReadOutcome::Hit { data, .. } = c.read(&v, 1, 0, None).unwrap() else { panic!() };
        assert_eq!(data[0], 2);
        // Past max_tracked_fetches_per_volume (8) tracking restarts: older fetches in
        // flight are answered by their caller but not cached.
        let old = c.begin_fetch(&v, &[200]);
        let many: Vec<u64> = (300..308).collect();
        c.begin_fetch(&v, &many);
        c.fill(&v, 200, Some((Bytes::from(full(3)), 1)), old);
        assert_eq!(c.read(&v, 200, 0, None).unwrap(), ReadOutcome::Miss);
        assert!(c.volume(&v).unwrap().fetches.len() <= 8);

        // The write lands between the caller finding block 400 missing and registering its
        // fetch: the fetch is not registered for it, so its older answer is not cached
        // even once the write is persisted and evicted.
        assert_eq!(c.read(&v, 400, 0, None).unwrap(), ReadOutcome::Miss);
        c.write(&v, 400, 0, &full(4), None).unwrap();
        let late = c.begin_fetch(&v, &[400]);
        let batch = c.take_batch(&v).expect("a write-back batch");
        c.complete_batch(&batch, true);
        fill_others(&mut c, &v, 500..520);
        assert_eq!(c.read(&v, 400, 0, None).unwrap(), ReadOutcome::Miss, "block 400 evicted");
        c.fill(&v, 400, None, late);
        assert_eq!(c.read(&v, 400, 0, None).unwrap(), ReadOutcome::Miss, "stale answer cached");
    }

    #[test]
    fn request_ids_apply_once() {
        let mut c = Cache::new(limits());
        let v = vol(&mut c, "v");
        let id = RequestId::new("car", 1).unwrap();
        let a = c.write(&v, 1, 0, &full(1), Some(&id)).unwrap();
        let b = c.write(&v, 1, 0, &full(2), Some(&id)).unwrap();
        assert!(b.duplicate && !a.duplicate);
        assert_eq!((a.lsn, a.version), (b.lsn, b.version));
        let ReadOutcome::Hit { data, .. } = c.read(&v, 1, 0, None).unwrap() else { panic!() };
        assert_eq!(data[0], 1);
        assert_eq!(c.volume(&v).unwrap().accepted, Lsn(1));
    }

    #[test]
    fn eviction_keeps_dirty_blocks_and_frees_clean_ones() {
        let mut c = Cache::new(limits());
        let v = vol(&mut c, "v");
        for b in 0..4 {
            c.write(&v, b, 0, &full(b as u8), None).unwrap();
        }
        fill_others(&mut c, &v, 100..120);
        assert!(c.used_bytes() <= c.limits().cache_capacity_bytes);
        assert!(c.evictions() > 0);
        for b in 0..4 {
            let ReadOutcome::Hit { data, .. } = c.read(&v, b, 0, None).unwrap() else {
                panic!("dirty block {b} was evicted")
            };
            assert_eq!(data[0], b as u8);
        }
    }

    #[test]
    fn writes_past_a_start_threshold_ask_for_write_back_at_once() {
        let mut c = Cache::new(limits());
        let v = vol(&mut c, "v");
        let urgent = |c: &mut Cache, v: &VolumeName, b: BlockNo| {
            c.write(v, b, 0, &full(1), None).unwrap().urgent
        };
        // Per volume: past 2 blocks' worth of dirty bytes.
        assert!(!urgent(&mut c, &v, 0));
        assert!(!urgent(&mut c, &v, 1));
        assert!(urgent(&mut c, &v, 2));
        assert!(urgent(&mut c, &v, 0), "a rewrite while past it asks again");
        assert!(urgent(&mut c, &v, 3));
        // Across volumes: w holds 2 blocks (under its own threshold), but all volumes
        // together pass 5 blocks' worth.
        let w = vol(&mut c, "w");
        assert!(!urgent(&mut c, &w, 0), "5 blocks dirty in all: not past it yet");
        assert!(urgent(&mut c, &w, 1), "6 blocks dirty in all");
        // Once half of v is persisted (a batch is 2 blocks), w is under both again.
        let b = c.take_batch(&v).unwrap();
        c.complete_batch(&b, true);
        assert!(!urgent(&mut c, &w, 1));
        // A duplicate (a replayed request id) never asks.
        let id = RequestId::new("r", 1).unwrap();
        assert!(c.write(&v, 5, 0, &full(1), Some(&id)).unwrap().urgent, "v: 3 blocks dirty");
        let again = c.write(&v, 5, 0, &full(1), Some(&id)).unwrap();
        assert!(again.duplicate && !again.urgent);
    }

    #[test]
    fn dirty_limits_push_back_and_write_back_frees_them() {
        let mut c = Cache::new(limits());
        let v = vol(&mut c, "v");
        for b in 0..4 {
            c.write(&v, b, 0, &full(1), None).unwrap();
        }
        // Rewriting a dirty block adds nothing; a fifth block does not fit.
        c.write(&v, 0, 0, &full(2), None).unwrap();
        assert!(matches!(
            c.write(&v, 9, 0, &full(1), None),
            Err(CacheError::DirtyFull { limit: "dirty_limit_bytes_per_volume", .. })
        ));
        let w = vol(&mut c, "w");
        c.write(&w, 0, 0, &full(1), None).unwrap();
        c.write(&w, 1, 0, &full(1), None).unwrap();
        assert!(matches!(
            c.write(&w, 2, 0, &full(1), None),
            Err(CacheError::DirtyFull { limit: "dirty_limit_bytes", .. })
        ));
        let b1 = c.take_batch(&v).unwrap();
        assert_eq!(b1.changes.len(), 2);
        assert!(c.take_batch(&v).is_none(), "one batch in flight per volume");
        c.complete_batch(&b1, true);
        c.write(&v, 9, 0, &full(1), None).unwrap();
    }

    #[test]
    fn persisted_watermark_follows_batches_and_failures_redirty() {
        let mut c = Cache::new(limits());
        let v = vol(&mut c, "v");
        c.write(&v, 1, 0, &full(1), None).unwrap(); // lsn 1
        c.write(&v, 2, 0, &full(1), None).unwrap(); // lsn 2
        c.write(&v, 3, 0, &full(1), None).unwrap(); // lsn 3
        let b = c.take_batch(&v).unwrap();
        assert_eq!(b.persisted, Lsn(2));
        c.write(&v, 1, 0, &full(7), None).unwrap(); // lsn 4, block 1 written during flight
        c.complete_batch(&b, false);
        assert_eq!(c.volume(&v).unwrap().persisted, Lsn(0));
        let b = c.take_batch(&v).unwrap();
        assert_eq!(b.changes.iter().map(|c| c.block).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(b.persisted, Lsn(2));
        c.complete_batch(&b, true);
        let b = c.take_batch(&v).unwrap();
        assert_eq!(b.persisted, Lsn(4));
        c.complete_batch(&b, true);
        let vv = c.volume(&v).unwrap();
        assert!(vv.is_clean());
        assert_eq!(vv.persisted, Lsn(4));
        assert_eq!(c.dirty_bytes(), 0);
    }

    #[test]
    fn migration_snapshots_hottest_first_and_track_rewrites() {
        let mut c = Cache::new(limits());
        let v = vol(&mut c, "v");
        c.write(&v, 1, 0, &full(1), None).unwrap();
        c.write(&v, 2, 0, &full(2), None).unwrap();
        for _ in 0..5 {
            c.read(&v, 2, 0, None).unwrap();
        }
        let mut all = c.snapshot_all(&v);
        hottest_first(&mut all);
        assert_eq!(all.iter().map(|b| b.block).collect::<Vec<_>>(), vec![2, 1]);
        assert!(all.iter().all(|b| b.dirty));
        c.write(&v, 1, 0, &full(3), None).unwrap();
        assert_eq!(c.changed_bytes(&v), 4096);
        let again = c.snapshot_changed(&v).unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].data.as_ref().unwrap()[0], 3);
        assert!(c.snapshot_changed(&v).unwrap().is_empty());

        let mut t = Cache::new(limits());
        let tv = vol(&mut t, "v");
        t.set_state(&tv, VolumeState::Incoming { migration_id: 1 });
        t.put_migrated(&tv, 1, all).unwrap();
        t.put_migrated(&tv, 1, again).unwrap();
        t.finish_incoming(&tv, 1, Epoch(2), Lsn(3), Lsn(0), vec![]).unwrap();
        let ReadOutcome::Hit { data, .. } = t.read(&tv, 1, 0, None).unwrap() else { panic!() };
        assert_eq!(data[0], 3);
        let w = t.write(&tv, 5, 0, &full(5), None).unwrap();
        assert_eq!(w.lsn, Lsn(4));
        assert!(w.version > (1 << 33), "new owner's versions are above the old owner's");
        let b = t.take_batch(&tv).unwrap();
        assert_eq!(b.epoch, Epoch(2));
    }
    /// A move tracks at most `max_changed_blocks_per_move` changed blocks between rounds:
    /// rewrites of blocks it tracks go on counting, one more distinct block makes the next
    /// round refuse (which blocks changed is no longer known), and a new snapshot starts
    /// the count afresh.
    #[test]
    fn a_move_tracks_at_most_its_limit_of_changed_blocks() {
        let mut c = Cache::new(Limits { max_changed_blocks_per_move: 2, ..limits() });
        let v = vol(&mut c, "v");
        c.snapshot_all(&v);
        c.write(&v, 1, 0, &full(1), None).unwrap();
        c.write(&v, 2, 0, &full(2), None).unwrap();
        c.write(&v, 1, 0, &full(3), None).unwrap();
        assert_eq!(c.snapshot_changed(&v).unwrap().len(), 2, "two blocks, one rewritten");
        for b in 1..=3 {
            c.write(&v, b, 0, &full(4), None).unwrap();
        }
        let e = c.snapshot_changed(&v).unwrap_err();
        assert!(e.contains("migration_max_changed_blocks (2)"), "{e}");
        c.snapshot_all(&v);
        c.write(&v, 3, 0, &full(5), None).unwrap();
        assert_eq!(c.snapshot_changed(&v).unwrap().len(), 1);
    }

    /// A block sent in round 1, written again, written back and then pushed out by memory
    /// pressure must still go in the next round: the target must not keep round 1's copy.
    #[test]
    fn a_block_written_again_written_back_and_evicted_mid_move_is_forgotten_by_the_target() {
        let mut c = Cache::new(limits());
        let v = vol(&mut c, "v");
        c.write(&v, 1, 0, &full(1), None).unwrap();
        let all = c.snapshot_all(&v);
        assert!(all.iter().any(|b| b.block == 1 && b.dirty), "round 1 carries X=1, dirty");
        c.write(&v, 1, 0, &full(2), None).unwrap();
        let b = c.take_batch(&v).unwrap();
        assert!(c.complete_batch(&b, true));
        // Memory pressure: far more clean blocks than the cache holds. X is clean (its
        // latest content persisted): it may go, pinned by nothing past the budget.
        for b in 100..130 {
            let f = c.begin_fetch(&v, &[b]);
            c.fill(&v, b, Some((Bytes::from(full(9)), 1)), f);
        }
        assert_eq!(c.read(&v, 1, 0, None).unwrap(), ReadOutcome::Miss, "X evicted");
        assert!(c.used_bytes() <= limits().cache_capacity_bytes);
        let again = c.snapshot_changed(&v).unwrap();
        let x = again.iter().find(|b| b.block == 1).expect("the next round carries X");
        assert!(x.forget && x.data.is_none() && !x.dirty, "{x:?}");

        // The target drops the X=1 round 1 sent it (dirty): it never writes 1 back, and a
        // read of X goes to the PSS (which holds X=2).
        let mut t = Cache::new(limits());
        let tv = vol(&mut t, "v");
        t.set_state(&tv, VolumeState::Incoming { migration_id: 7 });
        t.put_migrated(&tv, 7, all).unwrap();
        assert_eq!(t.dirty_bytes(), 4096 + ENTRY_OVERHEAD_BYTES);
        t.put_migrated(&tv, 7, again).unwrap();
        assert_eq!(t.dirty_bytes(), 0);
        t.finish_incoming(&tv, 7, Epoch(2), Lsn(2), Lsn(2), vec![]).unwrap();
        assert_eq!(t.read(&tv, 1, 0, None).unwrap(), ReadOutcome::Miss);
        assert!(t.take_batch(&tv).is_none(), "nothing to write back: {:?}", t.volume(&tv));
    }

    /// A volume arriving by a move (its blocks sent dirty, held until the switch) does not
    /// take the dirty budget of the volumes served here: their writes go on. Incoming dirty
    /// blocks get what memory the served volumes' whole dirty budget leaves; at the switch
    /// they join the served ones; a move given up takes its charge with it.
    #[test]
    fn a_move_in_leaves_the_served_volumes_their_dirty_budget() {
        // 10 entries of memory, 6 of them the served volumes' dirty budget: 4 for moves in.
        let mut t = Cache::new(limits());
        let served = vol(&mut t, "served");
        let incoming = |t: &mut Cache, name: &str, id: u64, n: u64| {
            let v = vol(t, name);
            t.set_state(&v, VolumeState::Incoming { migration_id: id });
            let blocks = (1..=n)
                .map(|b| MigBlock {
                    block: b,
                    data: Some(Bytes::from(full(b as u8))),
                    version: 1,
                    dirty: true,
                    lsn: Lsn(10 + b),
                    heat: 0,
                    forget: false,
                })
                .collect();
            (t.put_migrated(&v, id, blocks), v)
        };
        let entry = 4096 + ENTRY_OVERHEAD_BYTES;
        let (r, gone) = incoming(&mut t, "gone", 2, 2);
        r.unwrap();
        let (r, tv) = incoming(&mut t, "in", 1, 2);
        r.unwrap();
        assert_eq!(t.dirty_bytes(), 4 * entry, "held, and reported");
        // Past the room the served volumes' dirty budget leaves: refused.
        let (r, _) = incoming(&mut t, "more", 3, 1);
        assert!(
            matches!(r, Err(IncomingError::DirtyFull { limit: "cache_capacity_bytes", .. })),
            "{r:?}"
        );
        // The served volume writes up to its own limit (4 blocks), past the node's 6 with
        // the incoming 4 counted.
        for b in 1..=4 {
            t.write(&served, b, 0, &full(9), None).expect("a served vehicle's write");
        }
        // A move in given up: its charge goes with it.
        assert!(t.remove_volume(&gone));
        assert_eq!(t.dirty_bytes(), 6 * entry);
        // Switched in: both count now, so writes wait for write-back.
        t.finish_incoming(&tv, 1, Epoch(2), Lsn(12), Lsn(0), vec![]).unwrap();
        assert_eq!(t.dirty_bytes(), 6 * entry);
        let other = vol(&mut t, "other");
        assert!(matches!(
            t.write(&other, 1, 0, &full(1), None),
            Err(CacheError::DirtyFull { limit: "dirty_limit_bytes", .. })
        ));
    }

    /// Blocks a round sent dirty that the source wrote back before the switch (all their
    /// writes at or below the switch's persisted lsn, and not written again) are clean at
    /// the target: not written back a second time, not held against its dirty limits.
    /// Those written after the persisted lsn stay dirty.
    #[test]
    fn blocks_the_source_wrote_back_before_the_switch_are_clean_at_the_target() {
        let mut c = Cache::new(limits());
        let v = vol(&mut c, "v");
        for b in 1..=3 {
            c.write(&v, b, 0, &full(b as u8), None).unwrap();
        }
        let round = c.snapshot_all(&v);
        assert!(round.iter().all(|b| b.dirty));
        let mut t = Cache::new(limits());
        let tv = vol(&mut t, "v");
        t.set_state(&tv, VolumeState::Incoming { migration_id: 3 });
        t.put_migrated(&tv, 3, round).unwrap();
        assert_eq!(t.dirty_bytes(), 3 * (4096 + ENTRY_OVERHEAD_BYTES));
        // The source persisted lsns 1 and 2 (blocks 1 and 2) before the switch.
        t.finish_incoming(&tv, 3, Epoch(2), Lsn(3), Lsn(2), vec![]).unwrap();
        assert_eq!(t.dirty_bytes(), 4096 + ENTRY_OVERHEAD_BYTES, "only block 3 is dirty");
        let b = t.take_batch(&tv).unwrap();
        let blocks: Vec<BlockNo> = b.changes.iter().map(|ch| ch.block).collect();
        assert_eq!(blocks, [3]);
        assert!(t.complete_batch(&b, true));
        assert!(t.volume(&tv).unwrap().is_clean());
        assert_eq!(t.dirty_bytes(), 0);
        for blk in 1..=3u64 {
            let ReadOutcome::Hit { data, .. } = t.read(&tv, blk, 0, None).unwrap() else {
                panic!("block {blk} is cached")
            };
            assert_eq!(data[0], blk as u8);
        }
    }

    /// A move's frames that forget a block and send it again, over and over, leave the
    /// eviction ring no longer than about twice the live blocks (each pair used to add a
    /// place for good: memory outside the budget, without a bound).
    #[test]
    fn forgetting_and_resending_a_block_does_not_grow_the_ring() {
        let mut t = Cache::new(limits());
        let tv = vol(&mut t, "v");
        t.set_state(&tv, VolumeState::Incoming { migration_id: 5 });
        let block = |forget: bool| MigBlock {
            block: 1,
            data: (!forget).then(|| Bytes::from(full(1))),
            version: 1,
            dirty: false,
            lsn: Lsn(1),
            heat: 1,
            forget,
        };
        let frame: Vec<MigBlock> = (0..10_000).flat_map(|_| [block(true), block(false)]).collect();
        t.put_migrated(&tv, 5, frame).unwrap();
        assert!(t.ring.len() <= 1025, "{} places for one block", t.ring.len());
        t.finish_incoming(&tv, 5, Epoch(2), Lsn(1), Lsn(1), vec![]).unwrap();
        let ReadOutcome::Hit { data, .. } = t.read(&tv, 1, 0, None).unwrap() else { panic!() };
        assert_eq!(data[0], 1);
    }

    #[test]
    fn an_incoming_volume_takes_only_its_own_moves_frames_and_no_load() {
        let mut c = Cache::new(limits());
        let v = vol(&mut c, "v");
        c.set_state(&v, VolumeState::Incoming { migration_id: 7 });
        let blk = |n: u8| MigBlock {
            block: 1,
            data: Some(Bytes::from(full(n))),
            version: u64::from(n),
            dirty: true,
            lsn: Lsn(u64::from(n)),
            heat: 1,
            forget: false,
        };
        c.put_migrated(&v, 7, vec![blk(1)]).unwrap();
        // A load must not replace it.
        let (bs, cred) = (BlockSize::new(4096).unwrap(), Credential::new("s").unwrap().hash());
        assert!(matches!(
            c.insert_owned(v.clone(), bs, Epoch(5), cred, Lsn(0)),
            Err(CacheError::NotServing(VolumeState::Incoming { migration_id: 7 }))
        ));
        assert_eq!(c.volume(&v).unwrap().state, VolumeState::Incoming { migration_id: 7 });
        // Another move's frames change nothing.
        let id = RequestId::new("car", 1).unwrap();
        let applied = Applied { lsn: Lsn(1), version: 1 };
        assert!(c.put_migrated(&v, 8, vec![blk(2)]).is_err());
        assert!(c.remember_migrated(&v, 8, [(id.clone(), applied)]).is_err());
        assert!(c.finish_incoming(&v, 8, Epoch(2), Lsn(1), Lsn(0), vec![]).is_err());
        let x = c.volume(&v).unwrap();
        assert_eq!(x.state, VolumeState::Incoming { migration_id: 7 });
        assert!(x.applied.is_empty());
        // Malformed switch positions are refused, never panic.
        for (accepted, persisted) in [(1, 2), (u64::MAX, 0), (u64::MAX, u64::MAX)] {
            let e = c.finish_incoming(&v, 7, Epoch(2), Lsn(accepted), Lsn(persisted), vec![]);
            assert_eq!(e, Err(IncomingError::Lsns { accepted, persisted }));
        }
        assert_eq!(c.volume(&v).unwrap().state, VolumeState::Incoming { migration_id: 7 });
        c.finish_incoming(&v, 7, Epoch(2), Lsn(1), Lsn(0), vec![]).unwrap();
        let ReadOutcome::Hit { data, .. } = c.read(&v, 1, 0, None).unwrap() else { panic!() };
        assert_eq!(data[0], 1, "only move 7's block");
        // Once switched, the move's frames (a late one) no longer apply; a load (a vehicle
        // attaching explicitly) may replace the active volume.
        assert!(c.put_migrated(&v, 7, vec![blk(3)]).is_err());
        let ReadOutcome::Hit { data, .. } = c.read(&v, 1, 0, None).unwrap() else { panic!() };
        assert_eq!(data[0], 1);
        // A volume that is not here is refused too.
        let gone = VolumeName::new("gone").unwrap();
        assert!(c.put_migrated(&gone, 7, vec![blk(3)]).is_err());
        c.insert_owned(v.clone(), bs, Epoch(5), cred, Lsn(0)).unwrap();
        assert_eq!(c.volume(&v).unwrap().epoch, Epoch(5));
    }

    #[test]
    fn a_stale_batch_completion_changes_nothing() {
        let mut c = Cache::new(limits());
        let v = vol(&mut c, "v");
        c.write(&v, 1, 0, &full(1), None).unwrap();
        let b1 = c.take_batch(&v).unwrap();
        // The volume is replaced (fenced and loaded again, at a newer epoch) while b1 is
        // on its way; the new incarnation takes a batch of its own.
        let (bs, cred) = (BlockSize::new(4096).unwrap(), Credential::new("s").unwrap().hash());
        c.insert_volume(v.clone(), bs, Epoch(3), cred, Lsn(0), VolumeState::Active);
        c.write(&v, 1, 0, &full(2), None).unwrap();
        c.write(&v, 2, 0, &full(2), None).unwrap();
        let b2 = c.take_batch(&v).unwrap();
        assert_ne!(b1.id, b2.id);
        // b1's late success must not mark b2's blocks clean.
        assert!(!c.complete_batch(&b1, true));
        let x = c.volume(&v).unwrap();
        assert!(!x.is_clean());
        assert_eq!(x.persisted, Lsn(0));
        assert_eq!(c.dirty_bytes(), 2 * (4096 + ENTRY_OVERHEAD_BYTES));
        assert!(c.take_batch(&v).is_none(), "b2 is still in flight");
        // b2 fails: its blocks are dirty again and go in the next batch.
        assert!(c.complete_batch(&b2, false));
        assert!(!c.complete_batch(&b2, true), "completed once");
        let b3 = c.take_batch(&v).unwrap();
        assert_eq!(b3.changes.iter().map(|c| c.block).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(b3.epoch, Epoch(3));
        // Within one incarnation, an older batch's completion is ignored as well.
        assert!(!c.complete_batch(&b2, true));
        assert!(c.complete_batch(&b3, true));
        assert!(c.volume(&v).unwrap().is_clean());
        assert_eq!(c.dirty_bytes(), 0);
    }

    #[test]
    fn a_flood_of_tiny_dirty_blocks_stays_within_the_memory_budget() {
        let mut c = Cache::new(limits());
        let v = vol(&mut c, "v");
        // Deletes of distinct blocks: each costs an entry that cannot be evicted until
        // written back, so each counts its entry against the dirty limit.
        let mut accepted = 0u64;
        for block in 0..100_000u64 {
            match c.delete(&v, block, None) {
                Ok(_) => accepted += 1,
                Err(CacheError::DirtyFull { .. }) => break,
                Err(e) => panic!("{e}"),
            }
        }
        let per_volume = limits().dirty_limit_bytes_per_volume;
        assert!(accepted <= per_volume / ENTRY_OVERHEAD_BYTES, "{accepted} tiny blocks accepted");
        assert!(c.dirty_bytes() <= per_volume);
        assert!(
            c.used_bytes() <= limits().cache_capacity_bytes,
            "{} bytes used of {}",
            c.used_bytes(),
            limits().cache_capacity_bytes
        );
    }

    #[test]
    fn a_move_bringing_more_dirty_blocks_than_the_memory_budget_is_refused() {
        let mut c = Cache::new(limits());
        let v = vol(&mut c, "v");
        c.set_state(&v, VolumeState::Incoming { migration_id: 1 });
        let dirty = |block: u64| MigBlock {
            block,
            data: Some(Bytes::from(full(1))),
            version: 1,
            dirty: true,
            lsn: Lsn(block + 1),
            heat: 1,
            forget: false,
        };
        // The memory budget holds 10 blocks (limits()), 6 of them kept for the served
        // volumes' dirty budget: 4 may arrive dirty, a fifth is refused.
        c.put_migrated(&v, 1, (0..4).map(dirty).collect()).unwrap();
        let e = c.put_migrated(&v, 1, vec![dirty(4)]).unwrap_err();
        assert!(
            matches!(e, IncomingError::DirtyFull { limit: "cache_capacity_bytes", .. }),
            "{e:?}"
        );
        assert!(c.dirty_bytes() <= limits().cache_capacity_bytes);
        // A block sent again replaces its copy: no double count.
        c.put_migrated(&v, 1, vec![dirty(3)]).unwrap();
    }

    #[test]
    fn redirect_markers_are_bounded_the_oldest_dropped_first() {
        let mut c = Cache::new(limits()); // max_moved_markers: 3
        let names: Vec<VolumeName> = (0..5).map(|i| vol(&mut c, &format!("v{i}"))).collect();
        for (i, v) in names.iter().enumerate() {
            c.mark_moved(v, format!("http://10.0.0.{i}:7100"), Epoch(2)).unwrap();
        }
        let kept: Vec<bool> = names.iter().map(|v| c.volume(v).is_some()).collect();
        assert_eq!(kept, [false, false, true, true, true]);
        // A marker replaced by a served volume is not counted, nor dropped for it.
        let (bs, cred) = (BlockSize::new(4096).unwrap(), Credential::new("s").unwrap().hash());
        c.insert_owned(names[2].clone(), bs, Epoch(3), cred, Lsn(0)).unwrap();
        let again = vol(&mut c, "w");
        c.mark_moved(&again, "http://10.0.0.9:7100".into(), Epoch(2)).unwrap();
        assert_eq!(c.volume(&names[2]).unwrap().state, VolumeState::Active);
        assert!(c.volume(&names[3]).is_some() && c.volume(&names[4]).is_some());
        assert!(c.volume(&again).is_some());
    }

    #[test]
    fn only_a_served_volume_pauses_for_a_switch() {
        let mut c = Cache::new(limits());
        let v = vol(&mut c, "v");
        c.pause(&v).unwrap();
        assert_eq!(c.volume(&v).unwrap().state, VolumeState::Paused);
        c.set_state(&v, VolumeState::Active);
        // Fenced during the move: the marker keeps redirecting.
        c.mark_moved(&v, "http://10.0.0.2:7100".into(), Epoch(3)).unwrap();
        let moved = VolumeState::Moved { to: "http://10.0.0.2:7100".into(), epoch: Epoch(3) };
        assert_eq!(c.pause(&v), Err(Some(moved.clone())));
        assert_eq!(c.volume(&v).unwrap().state, moved);
        assert_eq!(c.pause(&VolumeName::new("gone").unwrap()), Err(None));
    }
}
