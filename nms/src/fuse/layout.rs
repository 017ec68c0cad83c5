//! The on-volume format: how the file system's superblock, inodes, directories and file data map
//! onto the volume's blocks. Pure encoding and arithmetic, no I/O.
//!
//! With `B` the volume's block size (4 KiB ..= 1 MiB):
//!
//! ```text
//! block 0                      superblock (first 64 bytes; magic, version, geometry, inode high-water mark)
//! blocks 1 .. 1+T              inode table: inode N is the 128-byte record at byte N*128 (T = max_inodes*128/B)
//! block data_start + N*S + i   block i of inode N's data (S = file_stride_blocks)
//! ```
//!
//! There is no allocator and no block map to corrupt: every inode owns a fixed, sparse range of
//! `S` block numbers (the volume stores only blocks that were written), so a file's block `i` is
//! found by arithmetic and the largest file is `S * B` bytes. Invariant kept by the core: a file's
//! blocks at or past `ceil(size / B)` are absent and the bytes of its last block past `size` are
//! zero, so growing a file never exposes old data.
//!
//! A directory's data is an array of 264-byte slots (`ino: u64` (0 = free), `name_len: u8`,
//! `name: [u8; 255]`), `B / 264` slots per block, never straddling a block. A symlink's data is its
//! target. Inode 0 is unused; inode 1 is the root directory.
//!
//! Crash consistency comes from ordering: an inode is written before the directory entry that
//! names it, a directory entry is removed before the inode is freed, and a file's blocks are
//! deleted before its inode is marked free. A crash in between leaves at worst an orphan inode
//! (live, no name, `nlink == 0`), which the next mount frees.

/// Identifies a wayside file system in block 0.
pub const MAGIC: [u8; 8] = *b"WAYSDFS1";
/// The format version this code reads and writes.
pub const VERSION: u32 = 1;
/// Bytes per inode record.
pub const INODE_BYTES: u32 = 128;
/// Bytes per directory slot.
pub const DIRENT_BYTES: u32 = 264;
/// Longest file name, in bytes.
pub const MAX_NAME_BYTES: usize = 255;
/// Longest symlink target, in bytes (PATH_MAX).
pub const MAX_SYMLINK_BYTES: usize = 4095;
/// The root directory's inode number.
pub const ROOT_INO: u64 = 1;

/// Geometry chosen when the file system is created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub block_size: u32,
    pub max_inodes: u64,
    /// Every inode below this number has a record (possibly free) in the table; the rest are
    /// unused. Raised a whole table block at a time.
    pub inode_hwm: u64,
    pub inode_table_start: u64,
    pub data_start: u64,
    pub file_stride_blocks: u64,
}

/// Why a superblock could not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("block 0 does not hold a wayside file system (bad magic)")]
    BadMagic,
    #[error("file system version {0} is not supported (this build reads {VERSION})")]
    Version(u32),
    #[error(
        "the file system was made with {fs} byte blocks but the volume has {volume} byte blocks"
    )]
    BlockSize { fs: u32, volume: u32 },
    #[error("inconsistent geometry: {0}")]
    Geometry(String),
}

impl Superblock {
    /// The geometry for a new file system.
    pub fn new(
        block_size: u32,
        max_inodes: u64,
        file_stride_blocks: u64,
    ) -> Result<Self, LayoutError> {
        if block_size < DIRENT_BYTES * 8 || !block_size.is_power_of_two() {
            return Err(LayoutError::Geometry(format!("block size {block_size}")));
        }
        if max_inodes < 16 || file_stride_blocks == 0 {
            return Err(LayoutError::Geometry(format!(
                "max_inodes {max_inodes} (>= 16), file_stride_blocks {file_stride_blocks} (>= 1)"
            )));
        }
        let table_bytes = max_inodes
            .checked_mul(u64::from(INODE_BYTES))
            .ok_or_else(|| LayoutError::Geometry("inode table overflows".into()))?;
        let table_blocks = table_bytes.div_ceil(u64::from(block_size));
        let data_start = 1 + table_blocks;
        // The last inode's last block must be addressable.
        max_inodes
            .checked_mul(file_stride_blocks)
            .and_then(|n| n.checked_add(data_start))
            .ok_or_else(|| LayoutError::Geometry("block numbers overflow u64".into()))?;
        Ok(Superblock {
            block_size,
            max_inodes,
            inode_hwm: 0,
            inode_table_start: 1,
            data_start,
            file_stride_blocks,
        })
    }

    pub fn inodes_per_block(&self) -> u64 {
        u64::from(self.block_size / INODE_BYTES)
    }

    pub fn dirents_per_block(&self) -> u64 {
        u64::from(self.block_size / DIRENT_BYTES)
    }

    /// Where inode `ino`'s record lives: (block, byte offset).
    pub fn inode_location(&self, ino: u64) -> (u64, u32) {
        let per = self.inodes_per_block();
        let offset = (ino % per) * u64::from(INODE_BYTES);
        (self.inode_table_start + ino / per, offset as u32)
    }

    /// The volume block holding block `index` of inode `ino`'s data, or `None` past the largest file.
    pub fn data_block(&self, ino: u64, index: u64) -> Option<u64> {
        (index < self.file_stride_blocks)
            .then(|| self.data_start + ino * self.file_stride_blocks + index)
    }

    /// The largest file, in bytes.
    pub fn max_file_bytes(&self) -> u64 {
        self.file_stride_blocks.saturating_mul(u64::from(self.block_size))
    }

    /// How many data blocks `inode` uses: a file's size in blocks; a directory's slots
    /// (`size / DIRENT_BYTES`) in blocks of `dirents_per_block` (a block's tail past its
    /// last whole slot is unused, so a directory's size in bytes undercounts its blocks).
    pub fn data_blocks(&self, inode: &Inode) -> u64 {
        match inode.kind {
            Kind::Dir => (inode.size / u64::from(DIRENT_BYTES)).div_ceil(self.dirents_per_block()),
            _ => inode.size.div_ceil(u64::from(self.block_size)),
        }
    }

    /// Where directory slot `slot` lives in its directory's data: (data block index, byte offset).
    pub fn dirent_location(&self, slot: u64) -> (u64, u32) {
        let per = self.dirents_per_block();
        (slot / per, ((slot % per) * u64::from(DIRENT_BYTES)) as u32)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; 64];
        b[0..8].copy_from_slice(&MAGIC);
        put32(&mut b, 8, VERSION);
        put32(&mut b, 12, self.block_size);
        put64(&mut b, 16, self.inode_hwm);
        put64(&mut b, 24, self.max_inodes);
        put64(&mut b, 32, self.inode_table_start);
        put64(&mut b, 40, self.data_start);
        put64(&mut b, 48, self.file_stride_blocks);
        b
    }

    /// Decodes block 0 and checks it against the volume's block size.
    pub fn decode(b: &[u8], volume_block_size: u32) -> Result<Self, LayoutError> {
        if b.len() < 64 || b[0..8] != MAGIC {
            return Err(LayoutError::BadMagic);
        }
        let version = get32(b, 8);
        if version != VERSION {
            return Err(LayoutError::Version(version));
        }
        let block_size = get32(b, 12);
        if block_size != volume_block_size {
            return Err(LayoutError::BlockSize { fs: block_size, volume: volume_block_size });
        }
        let mut sb = Superblock::new(block_size, get64(b, 24), get64(b, 48))?;
        if sb.inode_table_start != get64(b, 32) || sb.data_start != get64(b, 40) {
            return Err(LayoutError::Geometry(
                "table or data start disagrees with max_inodes".into(),
            ));
        }
        sb.inode_hwm = get64(b, 16);
        if sb.inode_hwm > sb.max_inodes {
            return Err(LayoutError::Geometry(format!("inode high-water mark {}", sb.inode_hwm)));
        }
        Ok(sb)
    }
}

/// What an inode is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
    Symlink,
}

impl Kind {
    fn code(self) -> u8 {
        match self {
            Kind::File => 1,
            Kind::Dir => 2,
            Kind::Symlink => 3,
        }
    }
    fn from_code(c: u8) -> Option<Kind> {
        match c {
            1 => Some(Kind::File),
            2 => Some(Kind::Dir),
            3 => Some(Kind::Symlink),
            _ => None,
        }
    }
}

/// Seconds and nanoseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, PartialOrd, Ord)]
pub struct Timestamp {
    pub secs: i64,
    pub nanos: u32,
}

/// One live inode's metadata.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Inode {
    pub ino: u64,
    pub kind: Kind,
    /// Permission bits (mode & 0o7777).
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    /// Bytes of data (for a directory: slots * DIRENT_BYTES).
    pub size: u64,
    pub atime: Timestamp,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
    pub crtime: Timestamp,
    /// A directory's parent (the root is its own parent); 0 otherwise.
    pub parent: u64,
}

impl Inode {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; INODE_BYTES as usize];
        b[0] = self.kind.code();
        b[2..4].copy_from_slice(&self.perm.to_le_bytes());
        put32(&mut b, 4, self.uid);
        put32(&mut b, 8, self.gid);
        put32(&mut b, 12, self.nlink);
        put64(&mut b, 16, self.size);
        for (i, t) in [self.atime, self.mtime, self.ctime, self.crtime].iter().enumerate() {
            put64(&mut b, 24 + i * 12, t.secs as u64);
            put32(&mut b, 32 + i * 12, t.nanos);
        }
        put64(&mut b, 72, self.parent);
        b
    }

    /// Decodes a record; `None` for a free slot.
    pub fn decode(ino: u64, b: &[u8]) -> Option<Inode> {
        let kind = Kind::from_code(*b.first()?)?;
        let t = |i: usize| Timestamp {
            secs: get64(b, 24 + i * 12) as i64,
            nanos: get32(b, 32 + i * 12).min(999_999_999),
        };
        Some(Inode {
            ino,
            kind,
            perm: u16::from_le_bytes([b[2], b[3]]) & 0o7777,
            uid: get32(b, 4),
            gid: get32(b, 8),
            nlink: get32(b, 12),
            size: get64(b, 16),
            atime: t(0),
            mtime: t(1),
            ctime: t(2),
            crtime: t(3),
            parent: get64(b, 72),
        })
    }
}

/// Encodes a directory slot (`ino == 0` frees it).
pub fn encode_dirent(ino: u64, name: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; DIRENT_BYTES as usize];
    put64(&mut b, 0, ino);
    b[8] = name.len() as u8;
    b[9..9 + name.len()].copy_from_slice(name);
    b
}

/// Decodes a directory slot; `None` when free or malformed.
pub fn decode_dirent(b: &[u8]) -> Option<(u64, Vec<u8>)> {
    let ino = get64(b, 0);
    let len = usize::from(b[8]);
    if ino == 0 || len == 0 {
        return None;
    }
    Some((ino, b[9..9 + len].to_vec()))
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
fn get32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn get64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn superblock_round_trips_and_checks_block_size() {
        let mut sb = Superblock::new(4096, 1 << 20, 1 << 20).unwrap();
        sb.inode_hwm = 64;
        assert_eq!(Superblock::decode(&sb.encode(), 4096).unwrap(), sb);
        assert_eq!(
            Superblock::decode(&sb.encode(), 8192),
            Err(LayoutError::BlockSize { fs: 4096, volume: 8192 })
        );
        assert_eq!(Superblock::decode(&[0; 64], 4096), Err(LayoutError::BadMagic));
        assert_eq!(sb.data_start, 1 + (1 << 20) * 128 / 4096);
    }

    #[test]
    fn inode_and_dirent_round_trip() {
        let t = Timestamp { secs: -5, nanos: 7 };
        let inode = Inode {
            ino: 9,
            kind: Kind::Symlink,
            perm: 0o751,
            uid: 1,
            gid: 2,
            nlink: 3,
            size: u64::MAX - 1,
            atime: t,
            mtime: Timestamp { secs: 1, nanos: 2 },
            ctime: t,
            crtime: t,
            parent: 0,
        };
        assert_eq!(Inode::decode(9, &inode.encode()), Some(inode));
        assert_eq!(Inode::decode(9, &[0; 128]), None);
        let name = vec![b'x'; MAX_NAME_BYTES];
        assert_eq!(decode_dirent(&encode_dirent(5, &name)), Some((5, name)));
        assert_eq!(decode_dirent(&encode_dirent(0, b"gone")), None);
    }

    #[test]
    fn locations_do_not_overlap() {
        let sb = Superblock::new(4096, 64, 8).unwrap();
        assert_eq!(sb.inode_location(33), (1 + 33 / 32, 128));
        assert_eq!(sb.data_block(0, 0), Some(sb.data_start));
        assert_eq!(sb.data_block(1, 7), Some(sb.data_start + 15));
        assert_eq!(sb.data_block(1, 8), None);
        assert_eq!(sb.dirent_location(16), (1, 16 * 264 - 15 * 264));
    }
}
