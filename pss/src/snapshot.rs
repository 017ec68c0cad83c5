//! Snapshot files: the state at a Raft index, in two forms.
//!
//! - A **snapshot file** (`snap-<index>.snap`, format 2) is self-contained: every key and
//!   value of the state, a block's value being its version and its data. It is what one
//!   node sends another (a lagging or new member) and what a member receives.
//! - A **checkpoint** (`snap-<index>.d/`, a directory) is what a node's own log
//!   compaction takes: the state's index file (a block's value is where its record
//!   lives) beside hard links to the blob segments holding the records. Blob segments
//!   are append-only and sealed before they are linked, so a checkpoint costs a copy of
//!   the index and a link per segment, not a copy of every block: at 4 KiB blocks the
//!   index is ~1-2% of the data. A checkpoint is turned into a snapshot file only when a
//!   member needs one sent ([`materialize`]).
//!
//! Both share one framing: a magic line, then `len u32 LE | bytes` items (the metadata,
//! then key, value, key, value...), a `u32::MAX` end mark and a CRC32 of all before it.
//!
//! **Invariant:** a segment file linked into a checkpoint is never changed in place
//! afterwards; whoever would truncate or rewrite a segment file replaces it with a new
//! file instead (see `blobs`), so the checkpoint keeps the bytes it linked.

use protobuf::Message as _;
use raft::prelude::SnapshotMetadata;
use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::blobs::Loc;
use crate::index::BlockMap;
use crate::state::StateError;

/// First bytes of a snapshot file (format 2).
pub const SNAPSHOT_MAGIC: &[u8] = b"WAYSIDE-PSS-SNAPSHOT-2\n";
const SNAPSHOT_MAGIC_STEM: &[u8] = b"WAYSIDE-PSS-SNAPSHOT-";
/// First bytes of a checkpoint's index file.
pub const CHECKPOINT_MAGIC: &[u8] = b"WAYSIDE-PSS-CHECKPOINT-1\n";
/// The index file inside a checkpoint directory.
const CHECKPOINT_INDEX: &str = "index";

/// The snapshot file for `index` in `dir`.
pub fn snapshot_path(dir: &Path, index: u64) -> PathBuf {
    dir.join(format!("snap-{index:020}.snap"))
}

/// The checkpoint directory for `index` in `dir`.
pub fn checkpoint_path(dir: &Path, index: u64) -> PathBuf {
    dir.join(format!("snap-{index:020}.d"))
}

/// The index of a snapshot file or checkpoint name (`snap-<index>.snap` / `.d`).
pub fn index_of(name: &str) -> Option<u64> {
    let rest = name.strip_prefix("snap-")?;
    rest.strip_suffix(".snap").or_else(|| rest.strip_suffix(".d"))?.parse().ok()
}

/// One key/value pair on its way into a file.
pub type Pair<'a> = Result<(Cow<'a, [u8]>, Cow<'a, [u8]>), StateError>;

/// Writes a framed file at `path` and fsyncs it; returns its size. Stops with
/// [`StateError::Cancelled`] once `cancel` is set (the caller removes the partial file).
pub fn write_framed<'a>(
    path: &Path,
    magic: &[u8],
    meta: &SnapshotMetadata,
    cancel: &AtomicBool,
    pairs: impl Iterator<Item = Pair<'a>>,
) -> Result<u64, StateError> {
    let io = |source| StateError::Io { path: path.to_owned(), source };
    let file = File::create(path).map_err(io)?;
    let mut w =
        Framed { w: BufWriter::with_capacity(1 << 20, file), crc: crc32fast::Hasher::new() };
    w.raw(magic).map_err(io)?;
    w.item(&meta.write_to_bytes().unwrap_or_default()).map_err(io)?;
    for (n, pair) in pairs.enumerate() {
        if n % 1024 == 0 && cancel.load(Ordering::Relaxed) {
            return Err(StateError::Cancelled);
        }
        let (k, v) = pair?;
        w.item(&k).map_err(io)?;
        w.item(&v).map_err(io)?;
    }
    w.raw(&u32::MAX.to_le_bytes()).map_err(io)?;
    let sum = w.crc.finalize();
    w.w.write_all(&sum.to_le_bytes()).map_err(io)?;
    let file = w.w.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    Ok(file.metadata().map_err(io)?.len())
}

/// A framed file being written, with the checksum of everything so far.
struct Framed {
    w: BufWriter<File>,
    crc: crc32fast::Hasher,
}

impl Framed {
    fn raw(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.crc.update(b);
        self.w.write_all(b)
    }

    fn item(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.raw(&u32::try_from(b.len()).unwrap_or(u32::MAX).to_le_bytes())?;
        self.raw(b)
    }
}

/// Borrowed key/value pairs of a parsed file.
pub type Pairs<'a> = Vec<(&'a [u8], &'a [u8])>;

/// Checks a framed file (magic, checksum) and splits it into metadata and pairs.
pub fn parse_framed<'a>(
    bytes: &'a [u8],
    magic: &[u8],
) -> Result<(SnapshotMetadata, Pairs<'a>), String> {
    if bytes.len() < magic.len() + 8 || !bytes.starts_with(magic) {
        return Err(not_framed(&bytes[..magic.len().min(bytes.len())], magic));
    }
    let (body, sum) = bytes.split_at(bytes.len() - 4);
    if crc32fast::hash(body) != u32::from_le_bytes(sum.try_into().unwrap_or_default()) {
        return Err("checksum mismatch".into());
    }
    let mut pos = magic.len();
    let next = |pos: &mut usize| -> Result<Option<&[u8]>, String> {
        let len = body.get(*pos..*pos + 4).ok_or("truncated")?;
        let len = u32::from_le_bytes(len.try_into().unwrap_or_default());
        *pos += 4;
        if len == u32::MAX {
            return Ok(None);
        }
        let v = body.get(*pos..*pos + len as usize).ok_or("truncated")?;
        *pos += len as usize;
        Ok(Some(v))
    };
    let meta_bytes = next(&mut pos)?.ok_or("missing metadata")?;
    let meta = SnapshotMetadata::parse_from_bytes(meta_bytes).map_err(|e| e.to_string())?;
    let mut pairs = Vec::new();
    while let Some(k) = next(&mut pos)? {
        let v = next(&mut pos)?.ok_or("missing value")?;
        pairs.push((k, v));
    }
    Ok((meta, pairs))
}

/// Why a file whose first bytes are `head` is not a framed file of `magic`.
fn not_framed(head: &[u8], magic: &[u8]) -> String {
    if head.starts_with(SNAPSHOT_MAGIC_STEM) {
        return format!(
            "a wayside snapshot of another format version ({:?}); this PSS reads {:?}",
            String::from_utf8_lossy(head).trim(),
            String::from_utf8_lossy(magic).trim()
        );
    }
    "not a wayside snapshot".into()
}

/// Most bytes a framed file's metadata item may take (a Raft `SnapshotMetadata`: an
/// index, a term and the membership).
const MAX_METADATA_BYTES: u32 = 16 << 20;

/// Checks a framed file through a buffer (a received snapshot holds every block of the
/// state: it is never read into memory whole): its magic, its checksum, and that it is
/// one run of items (the metadata, then keys and values) ending with the end mark right
/// before the checksum, every length within the file; returns its metadata. A file that passes is read by [`read_framed`]
/// without any length in it reaching past its end. A damaged file is named as such
/// ("checksum mismatch") before any fault of its structure.
pub fn check_framed(path: &Path, magic: &[u8]) -> Result<SnapshotMetadata, String> {
    use std::io::Read as _;
    let f = File::open(path).map_err(|e| e.to_string())?;
    let len = f.metadata().map_err(|e| e.to_string())?.len();
    let mut r =
        Hashed { r: std::io::BufReader::with_capacity(1 << 20, f), crc: crc32fast::Hasher::new() };
    let mut head = vec![0u8; magic.len()];
    if len < magic.len() as u64 + 8 || r.r.read_exact(&mut head).is_err() || head != magic {
        return Err(not_framed(&head, magic));
    }
    r.crc.update(&head);
    let body_end = len - 4;
    let mut pos = head.len() as u64;
    let mut meta = None;
    // Items after the metadata (keys and values: an even count).
    let mut items = 0u64;
    // The first fault of structure; the rest of the body is then only hashed, so damage
    // is told from a well-sealed file that does not hold together.
    let mut fault: Option<String> = None;
    let mut buf = vec![0u8; 1 << 20];
    while fault.is_none() {
        if body_end - pos < 4 {
            fault = Some("the end mark is missing".into());
            break;
        }
        let mut n = [0u8; 4];
        r.read(&mut n).map_err(|e| e.to_string())?;
        pos += 4;
        let n = u32::from_le_bytes(n);
        if n == u32::MAX {
            if pos != body_end {
                fault = Some(format!("{} bytes after the end mark", body_end - pos));
            } else if items % 2 == 1 {
                fault = Some("a key without a value before the end mark".into());
            }
            break;
        }
        if u64::from(n) > body_end - pos {
            fault = Some(format!("an item of {n} bytes at {} runs past the end", pos - 4));
            break;
        }
        if meta.is_none() {
            if n > MAX_METADATA_BYTES {
                fault = Some(format!("metadata of {n} bytes (at most {MAX_METADATA_BYTES})"));
                break;
            }
            let mut m = vec![0u8; n as usize];
            r.read(&mut m).map_err(|e| e.to_string())?;
            match SnapshotMetadata::parse_from_bytes(&m) {
                Ok(m) => meta = Some(m),
                Err(e) => fault = Some(format!("metadata does not decode: {e}")),
            }
        } else {
            r.skip(u64::from(n), &mut buf).map_err(|e| e.to_string())?;
            items += 1;
        }
        pos += u64::from(n);
    }
    r.skip(body_end - pos, &mut buf).map_err(|e| e.to_string())?;
    let mut sum = [0u8; 4];
    r.r.read_exact(&mut sum).map_err(|e| e.to_string())?;
    if r.crc.finalize() != u32::from_le_bytes(sum) {
        return Err("checksum mismatch".into());
    }
    match (fault, meta) {
        (Some(fault), _) => Err(fault),
        (None, Some(meta)) => Ok(meta),
        (None, None) => Err("missing metadata".into()),
    }
}

/// A reader that hashes what it reads.
struct Hashed {
    r: std::io::BufReader<File>,
    crc: crc32fast::Hasher,
}

impl Hashed {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<()> {
        use std::io::Read as _;
        self.r.read_exact(out)?;
        self.crc.update(out);
        Ok(())
    }

    /// Reads and hashes `n` bytes through `buf`.
    fn skip(&mut self, mut n: u64, buf: &mut [u8]) -> std::io::Result<()> {
        while n > 0 {
            let k = buf.len().min(usize::try_from(n).unwrap_or(usize::MAX));
            self.read(&mut buf[..k])?;
            n -= k as u64;
        }
        Ok(())
    }
}

/// A framed file checked with [`check_framed`], read one item at a time: its metadata and
/// an iterator of its pairs (memory: one pair and a buffer).
pub fn read_framed(path: &Path, magic: &[u8]) -> Result<(SnapshotMetadata, FramedPairs), String> {
    use std::io::Read as _;
    let mut r =
        std::io::BufReader::with_capacity(1 << 20, File::open(path).map_err(|e| e.to_string())?);
    let mut head = vec![0u8; magic.len()];
    r.read_exact(&mut head).map_err(|e| e.to_string())?;
    let mut pairs = FramedPairs { r, path: path.to_owned() };
    let meta = pairs.item().map_err(|e| e.to_string())?.ok_or("missing metadata")?;
    let meta = SnapshotMetadata::parse_from_bytes(&meta).map_err(|e| e.to_string())?;
    Ok((meta, pairs))
}

/// The pairs of a framed file, read as they are asked for (see [`read_framed`]).
pub struct FramedPairs {
    r: std::io::BufReader<File>,
    path: PathBuf,
}

impl FramedPairs {
    fn item(&mut self) -> std::io::Result<Option<Vec<u8>>> {
        use std::io::Read as _;
        let mut len = [0u8; 4];
        self.r.read_exact(&mut len)?;
        let len = u32::from_le_bytes(len);
        if len == u32::MAX {
            return Ok(None);
        }
        let mut v = vec![0u8; len as usize];
        self.r.read_exact(&mut v)?;
        Ok(Some(v))
    }
}

impl Iterator for FramedPairs {
    type Item = Pair<'static>;

    fn next(&mut self) -> Option<Pair<'static>> {
        let path = self.path.clone();
        let io = |source| StateError::Io { path, source };
        let k = match self.item() {
            Ok(Some(k)) => k,
            Ok(None) => return None,
            Err(e) => return Some(Err(io(e))),
        };
        match self.item() {
            Ok(Some(v)) => Some(Ok((Cow::Owned(k), Cow::Owned(v)))),
            Ok(None) => Some(Err(StateError::Corrupt {
                path: self.path.clone(),
                reason: "a key without a value".into(),
            })),
            Err(e) => Some(Err(io(e))),
        }
    }
}

/// Whether a key is a block's (its value is a [`Loc`] in a checkpoint, `version | data`
/// in a snapshot file).
pub fn is_block_key(k: &[u8]) -> bool {
    k.first() == Some(&b'b')
}

/// Every block's key and entry, in key order (volume, then block), as sled would list them.
pub fn block_entries(blocks: &[(Box<str>, BlockMap)]) -> impl Iterator<Item = (Vec<u8>, Loc)> + '_ {
    let mut volumes: Vec<&(Box<str>, BlockMap)> = blocks.iter().collect();
    volumes.sort_by(|a, b| a.0.cmp(&b.0));
    volumes.into_iter().flat_map(|(volume, map)| {
        let mut entries: Vec<(u64, Loc)> = map.iter().map(|(b, l)| (*b, *l)).collect();
        entries.sort_unstable_by_key(|(b, _)| *b);
        entries.into_iter().map(move |(b, loc)| (crate::index::block_key(volume, b), loc))
    })
}

/// A checkpoint being taken: the state's index as of its index (copied on the Raft
/// thread) and the blob segments already linked into `tmp`.
pub struct CheckpointView {
    /// Every key but the blocks' (when `blocks` has them) and the node-local ones.
    pub(crate) pairs: Vec<(sled::IVec, sled::IVec)>,
    /// The block index, per volume, copied from memory.
    pub(crate) blocks: Vec<(Box<str>, BlockMap)>,
    /// The blob position the index is complete up to (the index replays from here when
    /// this checkpoint is its base).
    pub(crate) at: (u32, u64),
    /// The directory being filled (renamed to the checkpoint's name when durable).
    pub(crate) tmp: PathBuf,
    /// The linked segment files' names in `tmp`.
    pub(crate) segments: Vec<String>,
}

impl CheckpointView {
    /// The blob position this checkpoint's index is complete up to.
    pub fn at(&self) -> (u32, u64) {
        self.at
    }

    /// Writes the index file, makes every linked segment and the index durable, then
    /// renames the directory to `path` (and fsyncs its parent). Returns the index file's
    /// size. On an error or `cancel`, nothing is left behind.
    pub fn write(
        &self,
        path: &Path,
        meta: &SnapshotMetadata,
        cancel: &AtomicBool,
    ) -> Result<u64, StateError> {
        let r = self.write_tmp(path, meta, cancel);
        if r.is_err() {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
        r
    }

    fn write_tmp(
        &self,
        path: &Path,
        meta: &SnapshotMetadata,
        cancel: &AtomicBool,
    ) -> Result<u64, StateError> {
        let io = |p: &Path| {
            let p = p.to_owned();
            move |source| StateError::Io { path: p.clone(), source }
        };
        let pairs =
            self.pairs.iter().map(|(k, v)| Ok((Cow::Borrowed(&k[..]), Cow::Borrowed(&v[..]))));
        let blocks = block_entries(&self.blocks)
            .map(|(k, loc)| Ok((Cow::Owned(k), Cow::Owned(loc.encode().to_vec()))));
        let size = write_framed(
            &self.tmp.join(CHECKPOINT_INDEX),
            CHECKPOINT_MAGIC,
            meta,
            cancel,
            pairs.chain(blocks),
        )?;
        for name in &self.segments {
            if cancel.load(Ordering::Relaxed) {
                return Err(StateError::Cancelled);
            }
            // Sealed segments are fsynced by the blob store's helper thread too; one
            // more fsync of a clean file costs little and does not depend on its timing.
            let p = self.tmp.join(name);
            File::open(&p).and_then(|f| f.sync_data()).map_err(io(&p))?;
        }
        crate::storage::sync_dir(&self.tmp).map_err(io(&self.tmp))?;
        if path.exists() {
            std::fs::remove_dir_all(path).map_err(io(path))?;
        }
        std::fs::rename(&self.tmp, path).map_err(io(path))?;
        if let Some(parent) = path.parent() {
            crate::storage::sync_dir(parent).map_err(io(parent))?;
        }
        Ok(size)
    }
}

/// A checkpoint read back: its metadata and pairs, a block's value turned into `version
/// | data` from its record in the linked segments.
pub struct Checkpoint {
    dir: PathBuf,
    bytes: Vec<u8>,
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        let p = dir.join(CHECKPOINT_INDEX);
        let bytes =
            std::fs::read(&p).map_err(|source| StateError::Io { path: p.clone(), source })?;
        Ok(Self { dir: dir.to_owned(), bytes })
    }

    fn corrupt(&self, reason: String) -> StateError {
        StateError::Corrupt { path: self.dir.clone(), reason }
    }

    /// The index file's pairs as written (a block's value is its [`Loc`]).
    pub fn index_pairs(&self) -> Result<Pairs<'_>, StateError> {
        let (_, pairs) =
            parse_framed(&self.bytes, CHECKPOINT_MAGIC).map_err(|r| self.corrupt(r))?;
        Ok(pairs)
    }

    /// The metadata, and every pair in order with block data resolved.
    pub fn pairs(&self) -> Result<(SnapshotMetadata, impl Iterator<Item = Pair<'_>>), StateError> {
        let (meta, pairs) =
            parse_framed(&self.bytes, CHECKPOINT_MAGIC).map_err(|r| self.corrupt(r))?;
        let mut files: HashMap<u32, File> = HashMap::new();
        let iter = pairs.into_iter().map(move |(k, v)| {
            if !is_block_key(k) {
                return Ok((Cow::Borrowed(k), Cow::Borrowed(v)));
            }
            let loc = Loc::decode(v)
                .ok_or_else(|| self.corrupt(format!("block index entry of {} bytes", v.len())))?;
            let name = crate::blobs::segment_name(loc.segment);
            let file = match files.entry(loc.segment) {
                std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                std::collections::hash_map::Entry::Vacant(slot) => {
                    let p = self.dir.join(&name);
                    slot.insert(
                        File::open(&p).map_err(|source| StateError::Io { path: p, source })?,
                    )
                }
            };
            let mut buf = vec![0u8; loc.len as usize];
            file.read_exact_at(&mut buf, loc.offset)
                .map_err(|source| StateError::Io { path: self.dir.join(&name), source })?;
            let (rec, _) = crate::blobs::parse_record(&buf)
                .map_err(|r| self.corrupt(format!("{name} at {}: {r}", loc.offset)))?;
            if rec.key != k {
                return Err(
                    self.corrupt(format!("{name} at {}: another block's record", loc.offset))
                );
            }
            let mut out = Vec::with_capacity(8 + rec.data.len());
            out.extend_from_slice(&loc.version.to_be_bytes());
            out.extend_from_slice(rec.data);
            Ok((Cow::Borrowed(k), Cow::Owned(out)))
        });
        Ok((meta, iter))
    }
}

/// Writes the snapshot file `out` (format 2, self-contained) from the checkpoint `dir`:
/// what a member is sent. Returns its size.
pub fn materialize(dir: &Path, out: &Path) -> Result<u64, StateError> {
    let cp = Checkpoint::open(dir)?;
    let (meta, pairs) = cp.pairs()?;
    let tmp = out.with_extension(format!("tmp-{}", rand::random::<u32>()));
    let r = write_framed(&tmp, SNAPSHOT_MAGIC, &meta, &AtomicBool::new(false), pairs).and_then(
        |size| {
            std::fs::rename(&tmp, out)
                .map_err(|source| StateError::Io { path: out.to_owned(), source })?;
            if let Some(parent) = out.parent() {
                crate::storage::sync_dir(parent)
                    .map_err(|source| StateError::Io { path: parent.to_owned(), source })?;
            }
            Ok(size)
        },
    );
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A framed file is checked and read back through a buffer, pair by pair, as written;
    /// a changed byte, a cut tail and another format are refused, each saying so.
    #[test]
    fn a_framed_file_is_checked_and_read_back_as_a_stream() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let meta = SnapshotMetadata { index: 42, ..Default::default() };
        let pairs: Vec<(Vec<u8>, Vec<u8>)> =
            (0..3000u32).map(|i| (i.to_be_bytes().to_vec(), vec![i as u8; 700])).collect();
        let items = pairs.iter().map(|(k, v)| Ok((Cow::Borrowed(&k[..]), Cow::Borrowed(&v[..]))));
        write_framed(&path, SNAPSHOT_MAGIC, &meta, &AtomicBool::new(false), items).unwrap();
        check_framed(&path, SNAPSHOT_MAGIC).unwrap();
        let (got_meta, got) = read_framed(&path, SNAPSHOT_MAGIC).unwrap();
        assert_eq!(got_meta.index, 42);
        let got: Vec<(Vec<u8>, Vec<u8>)> =
            got.map(|p| p.map(|(k, v)| (k.into_owned(), v.into_owned())).unwrap()).collect();
        assert_eq!(got, pairs);
        let bytes = std::fs::read(&path).unwrap();
        let mut flipped = bytes.clone();
        flipped[bytes.len() / 2] ^= 1;
        std::fs::write(&path, &flipped).unwrap();
        assert_eq!(check_framed(&path, SNAPSHOT_MAGIC).unwrap_err(), "checksum mismatch");
        std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
        assert_eq!(check_framed(&path, SNAPSHOT_MAGIC).unwrap_err(), "checksum mismatch");
        let mut older = bytes.clone();
        older[SNAPSHOT_MAGIC.len() - 2] = b'1';
        std::fs::write(&path, &older).unwrap();
        let e = check_framed(&path, SNAPSHOT_MAGIC).unwrap_err();
        assert!(e.contains("another format version"), "{e}");
        std::fs::write(&path, b"nonsense").unwrap();
        assert_eq!(check_framed(&path, SNAPSHOT_MAGIC).unwrap_err(), "not a wayside snapshot");
    }

    /// A file whose checksum is right but whose items do not hold together (as a buggy or
    /// hostile sender could make) is refused, naming the fault, before anything reads a
    /// length from it: an item longer than the file, no end mark, bytes past it, metadata
    /// that does not decode.
    #[test]
    fn a_sealed_file_that_does_not_hold_together_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        let meta =
            SnapshotMetadata { index: 7, term: 2, ..Default::default() }.write_to_bytes().unwrap();
        let item = |b: &[u8]| [&(b.len() as u32).to_le_bytes()[..], b].concat();
        let end = u32::MAX.to_le_bytes();
        let check = |items: &[&[u8]]| {
            let body = [SNAPSHOT_MAGIC, &items.concat()].concat();
            let sum = crc32fast::hash(&body).to_le_bytes();
            std::fs::write(&path, [&body[..], &sum].concat()).unwrap();
            check_framed(&path, SNAPSHOT_MAGIC)
        };
        let (k, v) = (item(b"bkey"), item(&[5u8; 100]));
        let good = check(&[&item(&meta), &k, &v, &end]).unwrap();
        assert_eq!((good.index, good.term), (7, 2));
        let long = [&(1u32 << 30).to_le_bytes()[..], &[1u8; 10]].concat();
        let e = check(&[&item(&meta), &k, &long, &end]).unwrap_err();
        assert!(e.contains("runs past the end"), "{e}");
        let e = check(&[&item(&meta), &k, &v]).unwrap_err();
        assert!(e.contains("end mark is missing"), "{e}");
        let e = check(&[&item(&meta), &k, &v, &end, b"extra"]).unwrap_err();
        assert!(e.contains("5 bytes after the end mark"), "{e}");
        let e = check(&[&item(&meta), &k, &v, &k, &end]).unwrap_err();
        assert!(e.contains("a key without a value"), "{e}");
        let e = check(&[&item(&[0xff; 9]), &end]).unwrap_err();
        assert!(e.contains("metadata does not decode"), "{e}");
        assert_eq!(check(&[&end]).unwrap_err(), "missing metadata");
    }
}
