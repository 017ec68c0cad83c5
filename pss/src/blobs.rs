//! Block data outside sled: append-only segment files ("blobs") that the state machine's
//! sled index points into.
//!
//! Why: sled 0.34 keeps values inline in its B-tree leaves (up to 16 per leaf), so a leaf
//! of 4 KiB blocks is ~64 KiB, and every insert, lookup, consolidation and split copied
//! and rewrote such leaves: the apply cost ~120 us per 4 KiB write per replica and was
//! the PSS's bottleneck. Here a block write is one record appended to the active segment
//! (one `pwrite` per applied group) and a 24-byte index entry in sled.
//!
//! Crash consistency (sled is not trusted to be durable either; see `state`):
//! - every applied group records, in the same atomic sled batch, the blob end it wrote
//!   up to (`end`); segments below `synced_below` were fsynced before that was recorded;
//! - on open, every record from the first unsynced segment up to `end` is read and its
//!   CRC checked: if one is missing or torn (a power loss lost blob pages that sled's
//!   state refers to), the state machine is reloaded from the durable snapshot file and
//!   the durable Raft log replays the rest. Bytes past `end` belong to applies sled does
//!   not remember; they are cut off and replayed;
//! - garbage collection copies a mostly-dead segment's live records forward, makes the
//!   copies and sled's new index durable (fsync, sled flush + fsync), and only then
//!   deletes the old segment, so no recoverable sled state can point into a deleted file.
//!
//! Record layout: magic u32 | crc32 u32 (of everything after it) | data_len u32 |
//! version u64 | raft index u64 | key_len u16 | key | data.

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, RwLock};

const MAGIC: u32 = 0x5742_4c42; // "WBLB"
/// The magic of a tombstone: a block deleted (no data). The block index is rebuilt from
/// the records after its durable base (see `state`), so a delete must leave one.
const TOMB_MAGIC: u32 = 0x5742_4c54; // "WBLT"
/// Bytes of a record before its key.
pub const HEADER: usize = 4 + 4 + 4 + 8 + 8 + 2;
/// Appended bytes after which the active segment's writeback is started (not awaited).
const WRITEBACK_KICK_BYTES: u64 = 4 << 20;
/// Bytes of an index entry: version u64 | segment u32 | offset u64 | record length u32.
pub const LOC_BYTES: usize = 8 + 4 + 8 + 4;

/// Where a block's current record lives, and its version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Loc {
    pub version: u64,
    pub segment: u32,
    pub offset: u64,
    /// The whole record's length (header, key, data).
    pub len: u32,
}

impl Loc {
    pub fn encode(&self) -> [u8; LOC_BYTES] {
        let mut b = [0u8; LOC_BYTES];
        b[..8].copy_from_slice(&self.version.to_be_bytes());
        b[8..12].copy_from_slice(&self.segment.to_be_bytes());
        b[12..20].copy_from_slice(&self.offset.to_be_bytes());
        b[20..24].copy_from_slice(&self.len.to_be_bytes());
        b
    }
    pub fn decode(b: &[u8]) -> Option<Self> {
        if b.len() != LOC_BYTES {
            return None;
        }
        Some(Self {
            version: u64::from_be_bytes(b[..8].try_into().ok()?),
            segment: u32::from_be_bytes(b[8..12].try_into().ok()?),
            offset: u64::from_be_bytes(b[12..20].try_into().ok()?),
            len: u32::from_be_bytes(b[20..24].try_into().ok()?),
        })
    }
    /// Bytes of block data in the record.
    pub fn data_len(&self, key_len: usize) -> usize {
        (self.len as usize).saturating_sub(HEADER + key_len)
    }
}

/// A blob store failure.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    #[error("blob file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("blob segment {segment} at offset {offset}: {reason}")]
    Corrupt { segment: u32, offset: u64, reason: String },
}

/// Appends one record to `buf`; returns its length.
pub fn encode_record(buf: &mut Vec<u8>, key: &[u8], version: u64, index: u64, data: &[u8]) -> u32 {
    encode(buf, MAGIC, key, version, index, data)
}

/// Appends a tombstone (block `key` deleted by the entry at `index`); returns its length.
pub fn encode_tombstone(buf: &mut Vec<u8>, key: &[u8], index: u64) -> u32 {
    encode(buf, TOMB_MAGIC, key, 0, index, &[])
}

fn encode(buf: &mut Vec<u8>, magic: u32, key: &[u8], version: u64, index: u64, data: &[u8]) -> u32 {
    let start = buf.len();
    buf.extend_from_slice(&magic.to_be_bytes());
    buf.extend_from_slice(&[0; 4]);
    buf.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_be_bytes());
    buf.extend_from_slice(&version.to_be_bytes());
    buf.extend_from_slice(&index.to_be_bytes());
    buf.extend_from_slice(&u16::try_from(key.len()).unwrap_or(u16::MAX).to_be_bytes());
    buf.extend_from_slice(key);
    buf.extend_from_slice(data);
    let crc = crc32fast::hash(&buf[start + 8..]);
    buf[start + 4..start + 8].copy_from_slice(&crc.to_be_bytes());
    u32::try_from(buf.len() - start).unwrap_or(u32::MAX)
}

/// One parsed record.
#[derive(Debug)]
pub struct Record<'a> {
    pub version: u64,
    pub key: &'a [u8],
    pub data: &'a [u8],
    /// A delete, not data.
    pub tombstone: bool,
}

/// Parses and checks the record at the start of `b` (which may hold more after it).
pub fn parse_record(b: &[u8]) -> Result<(Record<'_>, usize), String> {
    if b.len() < HEADER {
        return Err(format!("truncated header ({} bytes)", b.len()));
    }
    let u32_at = |i: usize| u32::from_be_bytes(b[i..i + 4].try_into().unwrap_or_default());
    let tombstone = match u32_at(0) {
        MAGIC => false,
        TOMB_MAGIC => true,
        _ => return Err("bad magic".into()),
    };
    let data_len = u32_at(8) as usize;
    let version = u64::from_be_bytes(b[12..20].try_into().unwrap_or_default());
    let key_len = u16::from_be_bytes(b[28..30].try_into().unwrap_or_default()) as usize;
    let total = HEADER + key_len + data_len;
    if b.len() < total {
        return Err(format!("truncated record ({} of {total} bytes)", b.len()));
    }
    if crc32fast::hash(&b[8..total]) != u32_at(4) {
        return Err("checksum mismatch".into());
    }
    let key = &b[HEADER..HEADER + key_len];
    Ok((Record { version, key, data: &b[HEADER + key_len..total], tombstone }, total))
}

/// The file name of segment `segment`.
pub fn segment_name(segment: u32) -> String {
    format!("{segment:010}.blob")
}

/// Creates segment `segment` empty, open for reading and writing. A file of that name
/// is replaced, not truncated: a checkpoint may have it linked (`snapshot`).
fn create_segment(dir: &Path, segment: u32) -> Result<File, BlobError> {
    let path = dir.join(segment_name(segment));
    let io = |source| BlobError::Io { path: path.clone(), source };
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
        _ => {}
    }
    OpenOptions::new().read(true).write(true).create_new(true).open(&path).map_err(io)
}

/// Makes `path` a file of its own before it is changed in place: if a checkpoint links
/// it (more than one name), its first `len` bytes are copied to a new file that takes
/// its name, and the checkpoint keeps the old one whole.
fn unshare(path: &Path, len: u64) -> Result<(), BlobError> {
    use std::os::unix::fs::MetadataExt as _;
    let io = |source| BlobError::Io { path: path.to_owned(), source };
    if std::fs::metadata(path).map_err(io)?.nlink() <= 1 {
        return Ok(());
    }
    let tmp = path.with_extension("unshare");
    {
        let mut from = File::open(path).map_err(io)?.take(len);
        let mut to = File::create(&tmp).map_err(io)?;
        std::io::copy(&mut from, &mut to).map_err(io)?;
        to.sync_all().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)?;
    if let Some(dir) = path.parent() {
        crate::storage::sync_dir(dir).map_err(io)?;
    }
    Ok(())
}

/// The open segment files, shared with readers on other threads.
#[derive(Default)]
struct Files {
    open: HashMap<u32, Arc<File>>,
}

/// Read access to the segments from any thread.
#[derive(Clone)]
pub struct BlobReader {
    dir: PathBuf,
    files: Arc<RwLock<Files>>,
}

impl BlobReader {
    /// A reader over the segments open now, held open even if they are collected and
    /// deleted later (for a snapshot being written while the state moves on).
    pub fn pinned(&self) -> BlobReader {
        let open =
            self.files.read().unwrap_or_else(std::sync::PoisonError::into_inner).open.clone();
        BlobReader { dir: self.dir.clone(), files: Arc::new(RwLock::new(Files { open })) }
    }

    /// Reads and checks the record at `loc`; `Ok(None)` if its segment is gone (garbage
    /// collected meanwhile: the caller looks the block up again).
    pub fn read(&self, key: &[u8], loc: &Loc) -> Result<Option<Vec<u8>>, BlobError> {
        let file = {
            let files = self.files.read().unwrap_or_else(std::sync::PoisonError::into_inner);
            match files.open.get(&loc.segment) {
                Some(f) => f.clone(),
                None => return Ok(None),
            }
        };
        let mut buf = vec![0u8; loc.len as usize];
        file.read_exact_at(&mut buf, loc.offset).map_err(|source| BlobError::Io {
            path: self.dir.join(segment_name(loc.segment)),
            source,
        })?;
        let corrupt = |reason: String| BlobError::Corrupt {
            segment: loc.segment,
            offset: loc.offset,
            reason,
        };
        let (rec, _) = parse_record(&buf).map_err(corrupt)?;
        if rec.key != key || rec.tombstone {
            // The slot was reused after a collection: look the block up again.
            return Ok(None);
        }
        let start = HEADER + key.len();
        buf.drain(..start);
        Ok(Some(buf))
    }
}

/// The writer side, owned by the state machine (the Raft thread).
pub struct Blobs {
    dir: PathBuf,
    files: Arc<RwLock<Files>>,
    /// The segment appended to, and its length.
    active: u32,
    active_len: u64,
    /// Up to where the active segment's writeback was started.
    kicked: u64,
    /// Segments below this were fsynced: a sealed segment is fsynced by a helper thread
    /// (so the Raft thread does not wait for up to `blob_segment_bytes` of writeback),
    /// which raises this when done; at most one such fsync runs at a time.
    synced_below: Arc<AtomicU32>,
    syncing: Option<std::thread::JoinHandle<()>>,
    /// A sealed segment's fsync (on the helper thread) failed: the segment and why. Fatal
    /// at the next append or seal: Linux may have dropped the unwritten pages and marks
    /// them clean, so a later fsync (a checkpoint's) would report success over lost data.
    sync_failed: Arc<std::sync::Mutex<Option<(PathBuf, String)>>>,
    /// Live record bytes per segment (what sled's index points at).
    live: BTreeMap<u32, u64>,
    /// Each sealed segment's length.
    sizes: BTreeMap<u32, u64>,
    segment_bytes: u64,
    /// Appends to the active segment (around the page cache where possible; see
    /// `direct`); reads go through `files`.
    writer: Option<crate::direct::Appender>,
    /// Append with `O_DIRECT`.
    direct: bool,
}

impl Blobs {
    fn io(&self, segment: u32) -> impl Fn(std::io::Error) -> BlobError + '_ {
        move |source| BlobError::Io { path: self.dir.join(segment_name(segment)), source }
    }

    fn open_writer(&self, segment: u32, len: u64) -> Result<crate::direct::Appender, BlobError> {
        crate::direct::Appender::open(&self.dir.join(segment_name(segment)), len, self.direct)
            .map_err(self.io(segment))
    }

    fn writer(&mut self) -> &mut crate::direct::Appender {
        self.writer.as_mut().expect("the active segment always has a writer")
    }

    /// Opens the directory with sled's view of it: the end of the last append it
    /// remembers, the first segment not known to be synced and the lengths the sealed
    /// segments from there on had when they were sealed (`sealed`, recorded with `end`;
    /// `None` for a state directory of a PSS that did not record them: their file sizes
    /// are trusted then). Checks every record not known durable. `Ok(None)`: sled refers
    /// to blob bytes that are not there (a power loss): the caller must reload the state
    /// from the snapshot.
    pub fn open(
        dir: &Path,
        end: (u32, u64),
        synced_below: u32,
        sealed: Option<&BTreeMap<u32, u64>>,
        segment_bytes: u64,
        direct: bool,
    ) -> Result<Option<Self>, BlobError> {
        let dir_io = |source| BlobError::Io { path: dir.to_owned(), source };
        std::fs::create_dir_all(dir).map_err(dir_io)?;
        let mut present = BTreeMap::new();
        for e in std::fs::read_dir(dir).map_err(dir_io)? {
            let e = e.map_err(dir_io)?;
            let name = e.file_name();
            let Some(seg) = name.to_str().and_then(|n| n.strip_suffix(".blob")) else { continue };
            let Ok(seg) = seg.parse::<u32>() else { continue };
            present.insert(seg, e.metadata().map_err(dir_io)?.len());
        }
        let mut me = Self {
            dir: dir.to_owned(),
            files: Arc::default(),
            active: end.0,
            active_len: end.1,
            kicked: end.1,
            synced_below: Arc::new(AtomicU32::new(synced_below.min(end.0))),
            syncing: None,
            sync_failed: Arc::default(),
            live: BTreeMap::new(),
            sizes: BTreeMap::new(),
            segment_bytes,
            writer: None,
            direct,
        };
        // Segments past sled's end hold appends sled forgot: drop them.
        for (&seg, _) in present.range(end.0 + 1..) {
            let path = dir.join(segment_name(seg));
            std::fs::remove_file(&path).map_err(|source| BlobError::Io { path, source })?;
        }
        // Check the records sled may refer to that were never fsynced.
        for seg in me.synced_below()..=end.0 {
            // A sealed segment's own size is no proof: a power loss may have cut a file
            // never fsynced at a record boundary. Its length when sealed is.
            let limit = match present.get(&seg) {
                _ if seg == end.0 => end.1,
                // Gone: collected (its records copied, the index durable) before the crash.
                None => 0,
                Some(&len) => sealed.and_then(|s| s.get(&seg)).copied().unwrap_or(len),
            };
            if limit == 0 {
                continue;
            }
            if present.get(&seg).copied().unwrap_or(0) < limit {
                tracing::warn!(
                    segment = seg,
                    limit,
                    "blob segment shorter than the state refers to"
                );
                return Ok(None);
            }
            if let Err(e) = me.check(seg, limit) {
                tracing::warn!(segment = seg, error = %e, "blob segment torn below the applied end");
                return Ok(None);
            }
        }
        let mut files = Files::default();
        if let Some(&len) = present.get(&end.0) {
            // The segment appended to from here on (and cut to `end` first).
            unshare(&dir.join(segment_name(end.0)), len.min(end.1))?;
        }
        for (&seg, &len) in present.range(..=end.0) {
            let path = dir.join(segment_name(seg));
            let file = OpenOptions::new()
                .read(true)
                .write(seg == end.0)
                .open(&path)
                .map_err(|source| BlobError::Io { path: path.clone(), source })?;
            if seg == end.0 && len > end.1 {
                // Durably: after a power loss the cut records (appends sled forgot) must
                // not come back behind the ones appended from here on.
                let cut = file.set_len(end.1).and_then(|()| file.sync_data());
                cut.map_err(|source| BlobError::Io { path, source })?;
            } else if seg != end.0 {
                me.sizes.insert(seg, len);
            }
            files.open.insert(seg, Arc::new(file));
        }
        if let std::collections::hash_map::Entry::Vacant(slot) = files.open.entry(end.0) {
            let path = dir.join(segment_name(end.0));
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .map_err(|source| BlobError::Io { path, source })?;
            file.set_len(end.1).map_err(me.io(end.0))?;
            slot.insert(Arc::new(file));
        }
        // Sealed segments not known synced (a crash came before their fsync was recorded)
        // were checked above: synced now, so later seals count as synced again (one is
        // counted only after every earlier one) and the next start checks none of them.
        for seg in me.synced_below()..end.0 {
            if let Some(f) = files.open.get(&seg) {
                f.sync_data().map_err(me.io(seg))?;
            }
        }
        me.synced_below.store(end.0, Ordering::Release);
        me.files = Arc::new(RwLock::new(files));
        me.writer = Some(me.open_writer(end.0, end.1)?);
        Ok(Some(me))
    }

    /// An empty store starting at `segment` (every old segment file removed).
    pub fn fresh(
        dir: &Path,
        segment: u32,
        segment_bytes: u64,
        direct: bool,
    ) -> Result<Self, BlobError> {
        let dir_io = |source| BlobError::Io { path: dir.to_owned(), source };
        std::fs::create_dir_all(dir).map_err(dir_io)?;
        for e in std::fs::read_dir(dir).map_err(dir_io)? {
            let path = e.map_err(dir_io)?.path();
            if path.extension().is_some_and(|x| x == "blob") {
                std::fs::remove_file(&path).map_err(|source| BlobError::Io { path, source })?;
            }
        }
        let mut me = Self {
            dir: dir.to_owned(),
            files: Arc::default(),
            active: segment,
            active_len: 0,
            kicked: 0,
            synced_below: Arc::new(AtomicU32::new(segment)),
            syncing: None,
            sync_failed: Arc::default(),
            live: BTreeMap::new(),
            sizes: BTreeMap::new(),
            segment_bytes,
            writer: None,
            direct,
        };
        me.reset(segment)?;
        Ok(me)
    }

    /// Reads segment `seg` up to `limit` and checks every record.
    fn check(&self, seg: u32, limit: u64) -> Result<(), BlobError> {
        let mut pos = 0u64;
        self.scan(seg, limit, |_, len, _| {
            pos += u64::from(len);
            Ok(())
        })?;
        if pos != limit {
            return Err(BlobError::Corrupt {
                segment: seg,
                offset: pos,
                reason: format!("records end at {pos}, expected {limit}"),
            });
        }
        Ok(())
    }

    /// Calls `f(offset, record length, record)` for each record of `seg` below `limit`.
    fn scan(
        &self,
        seg: u32,
        limit: u64,
        f: impl FnMut(u64, u32, Record<'_>) -> Result<(), BlobError>,
    ) -> Result<(), BlobError> {
        self.scan_from(seg, 0, limit, f)
    }

    /// [`Blobs::scan`] from `start`, a record boundary.
    fn scan_from(
        &self,
        seg: u32,
        start: u64,
        limit: u64,
        mut f: impl FnMut(u64, u32, Record<'_>) -> Result<(), BlobError>,
    ) -> Result<(), BlobError> {
        use std::io::{Seek as _, SeekFrom};
        let path = self.dir.join(segment_name(seg));
        let mut file = File::open(&path).map_err(self.io(seg))?;
        file.seek(SeekFrom::Start(start)).map_err(self.io(seg))?;
        let mut r = BufReader::with_capacity(1 << 20, file.take(limit.saturating_sub(start)));
        let mut buf = Vec::new();
        let mut offset = start;
        while offset < limit {
            buf.resize(HEADER, 0);
            r.read_exact(&mut buf).map_err(self.io(seg))?;
            let data_len = u32::from_be_bytes(buf[8..12].try_into().unwrap_or_default()) as usize;
            let key_len = u16::from_be_bytes(buf[28..30].try_into().unwrap_or_default()) as usize;
            let total = HEADER + key_len + data_len;
            if offset + total as u64 > limit {
                return Err(BlobError::Corrupt {
                    segment: seg,
                    offset,
                    reason: "record runs past the end".into(),
                });
            }
            buf.resize(total, 0);
            r.read_exact(&mut buf[HEADER..]).map_err(self.io(seg))?;
            let (rec, len) = parse_record(&buf).map_err(|reason| BlobError::Corrupt {
                segment: seg,
                offset,
                reason,
            })?;
            let len = u32::try_from(len).unwrap_or(u32::MAX);
            f(offset, len, rec)?;
            offset += u64::from(len);
        }
        Ok(())
    }

    /// A handle for readers on other threads.
    pub fn reader(&self) -> BlobReader {
        BlobReader { dir: self.dir.clone(), files: self.files.clone() }
    }

    /// Where the next appended byte goes.
    pub fn end(&self) -> (u32, u64) {
        (self.active, self.active_len)
    }

    pub fn synced_below(&self) -> u32 {
        self.synced_below.load(Ordering::Acquire)
    }

    /// Waits for the sealed segment's fsync in flight, if any.
    fn join_sync(&mut self) {
        if let Some(t) = self.syncing.take() {
            let _ = t.join();
        }
    }

    /// Counts a record as live (at open, from sled's index; on append).
    pub fn add_live(&mut self, loc: &Loc) {
        *self.live.entry(loc.segment).or_default() += u64::from(loc.len);
    }

    /// Counts a record as dead (overwritten or deleted).
    pub fn remove_live(&mut self, loc: &Loc) {
        if let Some(l) = self.live.get_mut(&loc.segment) {
            *l = l.saturating_sub(u64::from(loc.len));
        }
    }

    /// Writes `buf` (records encoded at offsets from [`Blobs::end`]) to the active segment.
    pub fn append(&mut self, buf: &[u8]) -> Result<(), BlobError> {
        self.check_synced()?;
        if buf.is_empty() {
            return Ok(());
        }
        let active = self.active;
        let w = self.writer();
        let written = w.append(buf);
        let direct = w.is_direct();
        written.map_err(self.io(active))?;
        self.active_len += buf.len() as u64;
        if !direct && self.active_len - self.kicked >= WRITEBACK_KICK_BYTES {
            let file = self.active_file();
            // Start writeback of what was appended so far without waiting for it, so a
            // segment's data trickles to disk as it is written instead of in one burst
            // when it is sealed (a 64 MiB fsync burst stalled the Raft log's fsync for
            // hundreds of milliseconds on a shared disk).
            use std::os::fd::AsRawFd;
            let (from, len) = (self.kicked, self.active_len - self.kicked);
            // SAFETY: a valid open fd; SYNC_FILE_RANGE_WRITE only starts writeback.
            let r = unsafe {
                libc::sync_file_range(
                    file.as_raw_fd(),
                    i64::try_from(from).unwrap_or(i64::MAX),
                    i64::try_from(len).unwrap_or(i64::MAX),
                    libc::SYNC_FILE_RANGE_WRITE,
                )
            };
            if r != 0 {
                tracing::debug!(error = %std::io::Error::last_os_error(), "sync_file_range failed (harmless)");
            }
            self.kicked = self.active_len;
        }
        Ok(())
    }

    fn active_file(&self) -> Arc<File> {
        let files = self.files.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        files.open.get(&self.active).cloned().expect("the active segment is always open")
    }

    /// Seals the active segment once it reached `blob_segment_bytes`: fsyncs it and starts
    /// the next. Returns whether it did.
    pub fn maybe_rotate(&mut self) -> Result<bool, BlobError> {
        if self.active_len < self.segment_bytes {
            return Ok(false);
        }
        self.rotate()?;
        Ok(true)
    }

    /// Seals the active segment now, unless it is empty (a checkpoint links only sealed
    /// segments, which never change again).
    pub fn seal_active(&mut self) -> Result<(), BlobError> {
        if self.active_len > 0 {
            self.rotate()?;
        }
        Ok(())
    }

    /// The first segment not known synced, and the length of every sealed segment from
    /// there on: what sled records with the blob end, so [`Blobs::open`] can tell a
    /// sealed segment cut short by a power loss.
    pub fn unsynced_sealed(&self) -> (u32, Vec<(u32, u64)>) {
        let synced = self.synced_below();
        (synced, self.sizes.range(synced..).map(|(&s, &l)| (s, l)).collect())
    }

    /// Every sealed segment's file name and path.
    pub fn sealed_segments(&self) -> Vec<(String, PathBuf)> {
        self.sizes
            .keys()
            .map(|&seg| (segment_name(seg), self.dir.join(segment_name(seg))))
            .collect()
    }

    /// Fails once a sealed segment's fsync has failed (see `sync_failed`).
    fn check_synced(&self) -> Result<(), BlobError> {
        let failed = self.sync_failed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match &*failed {
            Some((path, why)) => Err(BlobError::Io {
                path: path.clone(),
                source: std::io::Error::other(format!(
                    "the fsync of this sealed blob segment failed earlier ({why}): its data \
                     may be lost, so the node stops"
                )),
            }),
            None => Ok(()),
        }
    }

    fn rotate(&mut self) -> Result<(), BlobError> {
        // One sealed segment's fsync at a time: the next waits for the previous.
        self.join_sync();
        self.check_synced()?;
        let seg = self.active;
        let w = self.writer();
        // No padding past the last record once sealed.
        let trimmed = w.trim();
        if w.is_direct() {
            // Direct writes are on the device already: the fsync (a cache flush and the
            // new size) is short, so it runs here and the segment counts as synced now.
            let synced = trimmed.and_then(|()| w.sync_data());
            synced.map_err(self.io(seg))?;
            self.synced_below.fetch_max(seg + 1, Ordering::AcqRel);
            return self.start_next();
        }
        trimmed.map_err(self.io(seg))?;
        let sealed = self.active_file();
        let (seg, path, synced) =
            (self.active, self.dir.join(segment_name(self.active)), self.synced_below.clone());
        let failed = self.sync_failed.clone();
        self.syncing = Some(
            std::thread::Builder::new()
                .name("pss-blob-sync".into())
                .spawn(move || match sealed.sync_data() {
                    Ok(()) => {
                        if !mark_synced(&synced, seg) {
                            tracing::warn!(
                                path = %path.display(),
                                synced_below = synced.load(Ordering::Acquire),
                                "a sealed blob segment is synced but an earlier one is not: \
                                 both stay checked on open"
                            );
                        }
                    }
                    // Fatal at the next append or seal (see `sync_failed`); the segment
                    // stays "unsynced" (and so does every later one, see `mark_synced`)
                    // and is checked on open.
                    Err(e) => {
                        tracing::error!(path = %path.display(), error = %e, "fsync of a sealed blob segment failed");
                        let mut f = failed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                        f.get_or_insert((path, e.to_string()));
                    }
                })
                .map_err(self.io(seg))?,
        );
        self.start_next()
    }

    /// Starts the next segment after the (sealed) active one.
    fn start_next(&mut self) -> Result<(), BlobError> {
        self.sizes.insert(self.active, self.active_len);
        let next = self.active + 1;
        let file = create_segment(&self.dir, next)?;
        crate::storage::sync_dir(&self.dir).map_err(self.io(next))?;
        self.files
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .open
            .insert(next, Arc::new(file));
        self.writer = Some(self.open_writer(next, 0)?);
        self.active = next;
        self.active_len = 0;
        self.kicked = 0;
        Ok(())
    }

    /// Fsyncs the active segment (before sled is made durable for a collection).
    /// Also waits for a sealed segment's fsync, so every segment is durable after it.
    pub fn sync_active(&mut self) -> Result<(), BlobError> {
        self.join_sync();
        self.active_file().sync_data().map_err(self.io(self.active))
    }

    /// The sealed segment with the smallest live share, if it is below `live_percent`
    /// and all segments together hold more than `space_percent` of the live bytes.
    /// Only segments below `below` are candidates (the block index is rebuilt from the
    /// records past its durable base, so those must stay).
    pub fn gc_candidate(&self, live_percent: u64, space_percent: u64, below: u32) -> Option<u32> {
        let total = self.sizes.values().sum::<u64>() + self.active_len;
        let live = self.live.values().sum::<u64>();
        if total * 100 <= live * space_percent {
            return None;
        }
        self.sizes
            .range(..below)
            .filter(|(_, &size)| size > 0)
            .map(|(&seg, &size)| (seg, self.live.get(&seg).copied().unwrap_or(0), size))
            .filter(|&(_, live, size)| live * 100 < size * live_percent)
            .min_by_key(|&(_, live, size)| live * 1000 / size)
            .map(|(seg, _, _)| seg)
    }

    /// Takes a collected segment out of the accounting (no index entry points into it
    /// any more); its file stays readable until [`Blobs::remove_segment`], which waits
    /// until the new index is durable.
    pub fn retire(&mut self, seg: u32) {
        self.sizes.remove(&seg);
        self.live.remove(&seg);
    }

    /// The open files of segments `from..`, for an fsync on another thread.
    pub fn handles_from(&self, from: u32) -> Vec<(u32, Arc<File>)> {
        let files = self.files.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        files.open.iter().filter(|(&s, _)| s >= from).map(|(&s, f)| (s, f.clone())).collect()
    }

    /// Visits every record of sealed segment `seg` (for a collection).
    pub fn records(
        &self,
        seg: u32,
        f: impl FnMut(u64, u32, Record<'_>) -> Result<(), BlobError>,
    ) -> Result<(), BlobError> {
        let size = self.sizes.get(&seg).copied().unwrap_or(0);
        self.scan(seg, size, f)
    }

    /// Visits, in log order, every record from `from` up to the store's end (the index
    /// rebuild after its durable base): `f(location, record)`.
    pub fn replay(
        &self,
        from: (u32, u64),
        mut f: impl FnMut(Loc, Record<'_>) -> Result<(), BlobError>,
    ) -> Result<(), BlobError> {
        let segments: Vec<u32> = self
            .sizes
            .keys()
            .copied()
            .chain(std::iter::once(self.active))
            .filter(|&s| s >= from.0)
            .collect();
        for seg in segments {
            let end = if seg == self.active {
                self.active_len
            } else {
                self.sizes.get(&seg).copied().unwrap_or(0)
            };
            let start = if seg == from.0 { from.1.min(end) } else { 0 };
            self.scan_from(seg, start, end, |offset, len, rec| {
                f(Loc { version: rec.version, segment: seg, offset, len }, rec)
            })?;
        }
        Ok(())
    }

    /// The first segment on disk (where an index rebuild with no base starts).
    pub fn first_segment(&self) -> u32 {
        self.sizes.keys().next().copied().unwrap_or(self.active)
    }

    /// Deletes a collected segment (its live records were copied and the copies and
    /// sled's index made durable). A file already gone (a snapshot load reset the
    /// store meanwhile) is not an error.
    pub fn remove_segment(&mut self, seg: u32) -> Result<(), BlobError> {
        self.files.write().unwrap_or_else(std::sync::PoisonError::into_inner).open.remove(&seg);
        self.retire(seg);
        let path = self.dir.join(segment_name(seg));
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(BlobError::Io { path, source: e });
            }
            _ => {}
        }
        crate::storage::sync_dir(&self.dir).map_err(self.io(seg))
    }

    /// Removes every segment and starts empty at `segment` (a snapshot load).
    pub fn reset(&mut self, segment: u32) -> Result<(), BlobError> {
        self.join_sync();
        let mut files = self.files.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        let old: Vec<u32> = files.open.keys().copied().collect();
        files.open.clear();
        for seg in old {
            let path = self.dir.join(segment_name(seg));
            if let Err(source) = std::fs::remove_file(&path) {
                if source.kind() != std::io::ErrorKind::NotFound {
                    return Err(BlobError::Io { path, source });
                }
            }
        }
        files.open.insert(segment, Arc::new(create_segment(&self.dir, segment)?));
        drop(files);
        crate::storage::sync_dir(&self.dir).map_err(self.io(segment))?;
        self.writer = Some(self.open_writer(segment, 0)?);
        self.active = segment;
        self.active_len = 0;
        self.kicked = 0;
        self.synced_below.store(segment, Ordering::Release);
        self.live.clear();
        self.sizes.clear();
        Ok(())
    }

    /// Segment files on disk and their total bytes (for status and tests).
    pub fn usage(&self) -> (usize, u64) {
        (self.sizes.len() + 1, self.sizes.values().sum::<u64>() + self.active_len)
    }
}

impl Drop for Blobs {
    fn drop(&mut self) {
        self.join_sync();
    }
}

/// Records that sealed segment `seg` is synced: `synced_below` moves past it only if every
/// earlier segment is synced too. A segment whose fsync failed is never counted as synced
/// by a later one's success (after a failed fsync Linux may have dropped its dirty pages),
/// so it and every later segment stay checked against their sealed lengths on open.
fn mark_synced(synced_below: &AtomicU32, seg: u32) -> bool {
    synced_below.compare_exchange(seg, seg + 1, Ordering::AcqRel, Ordering::Acquire).is_ok()
}

#[cfg(test)]
mod tests {

    /// A sealed segment whose fsync failed stops the node at the next append or seal: a
    /// later fsync (a checkpoint's) could report success over the pages Linux dropped.
    #[test]
    fn a_failed_sealed_segment_fsync_fails_what_comes_next() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = Blobs::fresh(dir.path(), 1, 1 << 20, false).unwrap();
        b.append(b"record").unwrap();
        *b.sync_failed.lock().unwrap() = Some((dir.path().join("x.blob"), "EIO".into()));
        let e = b.append(b"more").unwrap_err().to_string();
        assert!(e.contains("x.blob") && e.contains("EIO"), "{e}");
        assert!(b.seal_active().is_err());
    }
    #[test]
    fn a_segment_whose_fsync_failed_is_not_counted_synced_by_a_later_one() {
        let synced = super::AtomicU32::new(3);
        // Segment 3's fsync failed (nothing recorded); segment 4's succeeds.
        assert!(!super::mark_synced(&synced, 4));
        assert_eq!(synced.load(super::Ordering::Acquire), 3, "3 and 4 stay checked on open");
        assert!(super::mark_synced(&synced, 3));
        assert_eq!(synced.load(super::Ordering::Acquire), 4);
    }

    use super::*;

    #[test]
    fn records_round_trip_and_damage_is_detected() {
        let mut buf = Vec::new();
        let n = encode_record(&mut buf, b"bkey", 7, 42, b"hello");
        assert_eq!(n as usize, buf.len());
        let (rec, len) = parse_record(&buf).unwrap();
        assert_eq!(
            (rec.version, rec.key, rec.data, len),
            (7, &b"bkey"[..], &b"hello"[..], buf.len())
        );
        let mut bad = buf.clone();
        *bad.last_mut().unwrap() ^= 1;
        assert!(parse_record(&bad).unwrap_err().contains("checksum"));
        assert!(parse_record(&buf[..buf.len() - 1]).unwrap_err().contains("truncated"));
        let loc = Loc { version: 3, segment: 9, offset: 1 << 40, len: 77 };
        assert_eq!(Loc::decode(&loc.encode()), Some(loc));
    }

    #[test]
    fn open_cuts_forgotten_appends_and_refuses_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = Blobs::open(dir.path(), (0, 0), 0, None, 1 << 20, true).unwrap().unwrap();
        let mut buf = Vec::new();
        let first = encode_record(&mut buf, b"k1", 1, 1, &[1; 100]);
        encode_record(&mut buf, b"k2", 1, 2, &[2; 100]);
        b.append(&buf).unwrap();
        drop(b);
        // sled remembers only the first record: the second is cut off.
        let b = Blobs::open(dir.path(), (0, u64::from(first)), 0, None, 1 << 20, true)
            .unwrap()
            .unwrap();
        assert_eq!(b.end(), (0, u64::from(first)));
        let loc = Loc { version: 1, segment: 0, offset: 0, len: first };
        assert_eq!(b.reader().read(b"k1", &loc).unwrap().unwrap(), vec![1; 100]);
        assert_eq!(b.reader().read(b"kX", &loc).unwrap(), None, "another key's slot");
        drop(b);
        // A flipped byte below sled's end: the state must be reloaded.
        let path = dir.path().join(segment_name(0));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[50] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        assert!(Blobs::open(dir.path(), (0, u64::from(first)), 0, None, 1 << 20, true)
            .unwrap()
            .is_none());
        // A segment shorter than sled's end is refused too.
        assert!(Blobs::open(dir.path(), (0, 10_000), 0, None, 1 << 20, true).unwrap().is_none());
    }

    /// Sealed segments a crash left not known synced are synced at open, so the next seal
    /// counts as synced again (it is counted only after every earlier one).
    #[test]
    fn sealed_segments_left_unsynced_by_a_crash_are_synced_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = Blobs::open(dir.path(), (0, 0), 0, None, 1 << 20, false).unwrap().unwrap();
        let mut sealed = std::collections::BTreeMap::new();
        for seg in 0..3u32 {
            let mut buf = Vec::new();
            encode_record(&mut buf, b"k", 1, u64::from(seg) + 1, &[seg as u8; 100]);
            b.append(&buf).unwrap();
            sealed.insert(seg, buf.len() as u64);
            b.seal_active().unwrap();
        }
        let end = b.end();
        assert_eq!(end, (3, 0));
        drop(b);
        // As if the process died before any sealed segment's fsync was recorded.
        let mut b =
            Blobs::open(dir.path(), end, 0, Some(&sealed), 1 << 20, false).unwrap().unwrap();
        assert_eq!(b.synced_below(), 3, "the sealed segments were synced at open");
        let mut buf = Vec::new();
        encode_record(&mut buf, b"k", 1, 9, &[9; 100]);
        b.append(&buf).unwrap();
        b.seal_active().unwrap();
        b.join_sync();
        assert_eq!(b.synced_below(), 4, "the next seal counts as synced");
    }

    #[test]
    fn a_linked_segment_is_replaced_never_changed_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let linked = tempfile::tempdir().unwrap();
        let mut b = Blobs::open(dir.path(), (0, 0), 0, None, 1 << 20, true).unwrap().unwrap();
        let mut buf = Vec::new();
        let first = encode_record(&mut buf, b"k1", 1, 1, &[1; 100]);
        encode_record(&mut buf, b"k2", 1, 2, &[2; 100]);
        b.append(&buf).unwrap();
        b.seal_active().unwrap();
        assert_eq!(b.end(), (1, 0));
        let names: Vec<String> = b.sealed_segments().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, vec![segment_name(0)]);
        // A checkpoint links the sealed segment.
        let link = linked.path().join(segment_name(0));
        std::fs::hard_link(dir.path().join(segment_name(0)), &link).unwrap();
        drop(b);
        // sled came back remembering only the first record (segment 0 as the active
        // one): the cut happens on a copy, the checkpoint's link keeps both records.
        let b = Blobs::open(dir.path(), (0, u64::from(first)), 0, None, 1 << 20, true)
            .unwrap()
            .unwrap();
        assert_eq!(b.end(), (0, u64::from(first)));
        assert_eq!(std::fs::read(dir.path().join(segment_name(0))).unwrap(), buf[..first as usize]);
        assert_eq!(std::fs::read(&link).unwrap(), buf, "the linked file was changed in place");
        drop(b);
        // A new segment over a linked name replaces the file too.
        std::fs::hard_link(dir.path().join(segment_name(0)), linked.path().join("again")).unwrap();
        drop(create_segment(dir.path(), 0).unwrap());
        assert_eq!(std::fs::metadata(dir.path().join(segment_name(0))).unwrap().len(), 0);
        assert_eq!(std::fs::read(linked.path().join("again")).unwrap(), buf[..first as usize]);
    }

    #[test]
    fn collection_waits_until_the_garbage_is_worth_copying() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = Blobs::open(dir.path(), (0, 0), 0, None, 1 << 20, true).unwrap().unwrap();
        let put = |b: &mut Blobs, fill: u8| {
            let mut buf = Vec::new();
            let (seg, offset) = b.end();
            let len = encode_record(&mut buf, b"k", 1, 1, &[fill; 1000]);
            b.append(&buf).unwrap();
            let loc = Loc { version: 1, segment: seg, offset, len };
            b.add_live(&loc);
            b.seal_active().unwrap();
            loc
        };
        let first = put(&mut b, 1);
        assert_eq!(b.gc_candidate(50, 150, u32::MAX), None, "nothing dead yet");
        // The block is rewritten: segment 0 is all garbage, half the bytes are dead.
        b.remove_live(&first);
        put(&mut b, 2);
        assert_eq!(b.gc_candidate(50, 150, u32::MAX), Some(0));
        assert_eq!(b.gc_candidate(50, 250, u32::MAX), None, "2x the live bytes is within 250%");
        b.retire(0);
        assert_eq!(
            b.gc_candidate(50, 150, u32::MAX),
            None,
            "a retired segment is not offered again"
        );
    }

    /// Buffered mode: a sealed segment is fsynced by a helper thread, so sled may record
    /// an end in the next segment while the sealed one is not known synced. A power loss
    /// that then cuts it at a record boundary must be seen (its length when sealed is
    /// recorded), not taken for a shorter segment: its records are committed state.
    #[test]
    fn a_sealed_unsynced_segment_cut_at_a_record_boundary_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = Blobs::open(dir.path(), (0, 0), 0, Some(&BTreeMap::new()), 1 << 20, false)
            .unwrap()
            .unwrap();
        let mut buf = Vec::new();
        let first = encode_record(&mut buf, b"k1", 1, 1, &[1; 100]);
        encode_record(&mut buf, b"k2", 1, 2, &[2; 100]);
        b.append(&buf).unwrap();
        b.seal_active().unwrap();
        buf.clear();
        encode_record(&mut buf, b"k3", 1, 3, &[3; 100]);
        b.append(&buf).unwrap();
        let end = b.end();
        assert_eq!(end.0, 1);
        // What sled records with this end, as if segment 0's fsync had not finished yet.
        let (_, mut sealed) = b.unsynced_sealed();
        sealed.extend(b.sizes.iter().map(|(&s, &l)| (s, l)));
        let sealed: BTreeMap<u32, u64> = sealed.into_iter().collect();
        assert_eq!(sealed.get(&0), Some(&(2 * u64::from(first))));
        drop(b);
        // Unchanged, it opens; cut after its first record, it is refused.
        assert!(Blobs::open(dir.path(), end, 0, Some(&sealed), 1 << 20, false).unwrap().is_some());
        let path = dir.path().join(segment_name(0));
        OpenOptions::new().write(true).open(&path).unwrap().set_len(u64::from(first)).unwrap();
        assert!(
            Blobs::open(dir.path(), end, 0, Some(&sealed), 1 << 20, false).unwrap().is_none(),
            "committed records of a cut segment vanished unnoticed"
        );
    }
}
