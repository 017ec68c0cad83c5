//! The file system core: POSIX operations over a [`BlockDevice`], in the on-volume format of
//! [`super::layout`]. No FUSE, no clock of its own (time comes from the injected clock), no
//! threads: the FUSE adapter serialises calls behind one lock.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use super::device::{BlockDevice, BlockOp, DeviceError};
use super::layout::{
    decode_dirent, encode_dirent, Inode, Kind, LayoutError, Superblock, Timestamp, DIRENT_BYTES,
    INODE_BYTES, MAX_NAME_BYTES, MAX_SYMLINK_BYTES, ROOT_INO,
};

/// Why a file system operation failed; [`FsError::errno`] is the one place these become errno.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("file exists")]
    Exists,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("directory not empty")]
    NotEmpty,
    #[error("name longer than {MAX_NAME_BYTES} bytes")]
    NameTooLong,
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    #[error("file would exceed the largest file size ({max_bytes} bytes)")]
    TooBig { max_bytes: u64 },
    #[error("no free inode (max_inodes = {max_inodes})")]
    NoInodes { max_inodes: u64 },
    /// A directory's slots fill its inode's fixed data range: out of space, not a file too big.
    #[error("directory is full ({max_entries} entries)")]
    DirFull { max_entries: u64 },
    #[error("operation not supported: {0}")]
    Unsupported(&'static str),
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("the volume does not hold a usable file system: {0}")]
    Layout(#[from] LayoutError),
    #[error("corrupt file system: {0}")]
    Corrupt(String),
    /// An earlier device write failed; changes are refused until the next mount.
    #[error("the file system refuses changes after a failed device write; mount it again")]
    Failed,
}

impl FsError {
    /// The errno a caller of the POSIX API sees.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::Exists => libc::EEXIST,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::NameTooLong => libc::ENAMETOOLONG,
            FsError::Invalid(_) => libc::EINVAL,
            FsError::TooBig { .. } => libc::EFBIG,
            FsError::NoInodes { .. } | FsError::DirFull { .. } => libc::ENOSPC,
            FsError::Unsupported(_) => libc::EOPNOTSUPP,
            FsError::Device(DeviceError::Timeout { .. }) => libc::ETIMEDOUT,
            FsError::Device(_) | FsError::Layout(_) | FsError::Corrupt(_) | FsError::Failed => {
                libc::EIO
            }
        }
    }
}

pub type Result<T> = std::result::Result<T, FsError>;

/// Geometry for a new file system (ignored when the volume already holds one).
#[derive(Clone, Copy, Debug)]
pub struct FormatParams {
    /// Most inodes the file system can ever hold.
    pub max_inodes: u64,
    /// Volume blocks reserved per inode: the largest file is this times the block size.
    pub file_stride_blocks: u64,
}

impl Default for FormatParams {
    fn default() -> Self {
        FormatParams { max_inodes: 1 << 20, file_stride_blocks: 1 << 20 }
    }
}

/// Changes asked for by setattr; `None` leaves a field alone.
#[derive(Clone, Debug, Default)]
pub struct SetAttr {
    pub perm: Option<u16>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<Timestamp>,
    pub mtime: Option<Timestamp>,
}

/// One entry returned by [`Fs::readdir`]; `offset` is where the next call resumes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirEntry {
    pub offset: u64,
    pub ino: u64,
    pub kind: Kind,
    pub name: Vec<u8>,
}

/// Usage figures for statfs.
#[derive(Clone, Copy, Debug)]
pub struct FsStats {
    pub block_size: u32,
    pub max_inodes: u64,
    pub used_inodes: u64,
    pub used_bytes: u64,
}

/// A directory's entries, loaded from its slots on first use.
#[derive(Debug, Default)]
struct Dir {
    by_name: HashMap<Vec<u8>, (u64, u64)>,
    by_slot: BTreeMap<u64, Vec<u8>>,
    free_slots: BTreeSet<u64>,
    slots: u64,
}

/// The clock the core reads for timestamps.
pub type Clock = Box<dyn Fn() -> Timestamp + Send + Sync>;

/// A mounted file system.
pub struct Fs<D> {
    dev: D,
    sb: Superblock,
    inodes: HashMap<u64, Inode>,
    free_inos: BTreeSet<u64>,
    dirs: HashMap<u64, Dir>,
    open_counts: HashMap<u64, u32>,
    clock: Clock,
    /// Set by the first failed device write (see [`Fs::apply`]); cleared only by mounting again.
    failed: bool,
    /// A metadata change timed out and the reload from the device that undoes it in
    /// memory failed too (the link down): memory may be ahead of the device, so the next
    /// change reloads first, and is refused (ETIMEDOUT) while that fails.
    stale: bool,
    /// The generation of each inode number allocated since mount (0 for the others): a
    /// number freed and given to a new file gets a new one, so the kernel does not take
    /// the new file for the dead one it may still cache under that number. At most one
    /// entry per inode number (`max_inodes`).
    generations: HashMap<u64, u64>,
    next_generation: u64,
}

impl<D: BlockDevice> Fs<D> {
    /// Opens the file system on `dev`, creating one with `params` when block 0 was never written.
    pub fn open_or_format(dev: D, params: FormatParams, clock: Clock) -> Result<Self> {
        let bs = dev.block_size();
        let head = dev.read(0, 0, 64)?;
        if head.iter().all(|&b| b == 0) {
            return Self::format(dev, params, clock);
        }
        let sb = Superblock::decode(&head, bs)?;
        let mut fs = Fs {
            dev,
            sb,
            inodes: HashMap::new(),
            free_inos: BTreeSet::new(),
            dirs: HashMap::new(),
            open_counts: HashMap::new(),
            clock,
            failed: false,
            stale: false,
            generations: HashMap::new(),
            next_generation: 1,
        };
        fs.load_inodes()?;
        fs.collect_orphans()?;
        Ok(fs)
    }

    fn format(dev: D, params: FormatParams, clock: Clock) -> Result<Self> {
        let mut sb =
            Superblock::new(dev.block_size(), params.max_inodes, params.file_stride_blocks)?;
        sb.inode_hwm = sb.inodes_per_block().min(sb.max_inodes);
        let now = clock();
        let root = Inode {
            ino: ROOT_INO,
            kind: Kind::Dir,
            perm: 0o755,
            uid: 0,
            gid: 0,
            nlink: 2,
            size: 0,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            parent: ROOT_INO,
        };
        let mut fs = Fs {
            dev,
            sb,
            inodes: HashMap::new(),
            free_inos: (ROOT_INO + 1..sb.inode_hwm).collect(),
            dirs: HashMap::new(),
            open_counts: HashMap::new(),
            clock,
            failed: false,
            stale: false,
            generations: HashMap::new(),
            next_generation: 1,
        };
        // The root inode first, the superblock (which makes the volume a file system) last.
        let ops = vec![fs.inode_op(&root, true), fs.superblock_op()];
        fs.dev.apply(ops)?;
        fs.dev.sync()?;
        fs.inodes.insert(ROOT_INO, root);
        fs.dirs.insert(ROOT_INO, Dir::default());
        Ok(fs)
    }

    fn load_inodes(&mut self) -> Result<()> {
        let per = self.sb.inodes_per_block();
        let bs = self.sb.block_size;
        let table_blocks = self.sb.inode_hwm.div_ceil(per);
        // The missing table blocks in one round trip, not one each: a mount (and a reload
        // after a timeout, under the file system's lock) waits one `op_timeout` at most for
        // the volume, however large the table.
        let blocks: Vec<u64> = (0..table_blocks).map(|b| self.sb.inode_table_start + b).collect();
        self.dev.prefetch(&blocks);
        for table_block in 0..table_blocks {
            let data = self.dev.read(self.sb.inode_table_start + table_block, 0, bs)?;
            for i in 0..per {
                let ino = table_block * per + i;
                if ino == 0 || ino >= self.sb.inode_hwm {
                    continue;
                }
                let at = (i * u64::from(INODE_BYTES)) as usize;
                match Inode::decode(ino, &data[at..at + INODE_BYTES as usize]) {
                    Some(inode) => {
                        self.inodes.insert(ino, inode);
                    }
                    None => {
                        self.free_inos.insert(ino);
                    }
                }
            }
        }
        match self.inodes.get(&ROOT_INO) {
            Some(root) if root.kind == Kind::Dir => Ok(()),
            _ => Err(FsError::Corrupt("the root inode is missing".into())),
        }
    }

    /// Rebuilds the in-memory metadata from the device, as a mount does: after a metadata
    /// operation whose ops the device did not apply (a timeout), memory is ahead of it.
    /// Open handles are kept; orphans are not collected here (that writes, and the device just
    /// timed out): an unlinked inode is freed at its last release or the next mount.
    fn reload(&mut self) -> Result<()> {
        let bs = self.dev.block_size();
        // The high-water mark may have been raised in memory only.
        let sb = Superblock::decode(&self.dev.read(0, 0, 64)?, bs)?;
        let old = (self.sb, std::mem::take(&mut self.inodes), std::mem::take(&mut self.free_inos));
        self.sb = sb;
        // Directories are loaded again from the device on next use.
        self.dirs.clear();
        if let Err(e) = self.load_inodes() {
            // Leave memory as it was (the caller enters the failed state).
            (self.sb, self.inodes, self.free_inos) = old;
            return Err(e);
        }
        Ok(())
    }

    /// Frees inodes left live without a name by a crash between an unlink's steps.
    fn collect_orphans(&mut self) -> Result<()> {
        let orphans: Vec<u64> = self
            .inodes
            .values()
            .filter(|i| i.nlink == 0 && i.ino != ROOT_INO)
            .map(|i| i.ino)
            .collect();
        for ino in orphans {
            tracing::info!(ino, "freeing an orphan inode left by an interrupted unlink");
            self.free_inode(ino)?;
        }
        Ok(())
    }

    /// The device underneath.
    pub fn device(&self) -> &D {
        &self.dev
    }

    /// The geometry in use.
    pub fn superblock(&self) -> Superblock {
        self.sb
    }

    fn now(&self) -> Timestamp {
        (self.clock)()
    }

    fn superblock_op(&self) -> BlockOp {
        BlockOp::Write { block: 0, offset: 0, data: self.sb.encode(), fresh: false }
    }

    /// `fresh`: the inode's table block was never written (it lies past the old high-water mark).
    fn inode_op(&self, inode: &Inode, fresh: bool) -> BlockOp {
        let (block, offset) = self.sb.inode_location(inode.ino);
        BlockOp::Write { block, offset, data: inode.encode(), fresh }
    }

    fn free_inode_op(&self, ino: u64) -> BlockOp {
        let (block, offset) = self.sb.inode_location(ino);
        BlockOp::Write { block, offset, data: vec![0; INODE_BYTES as usize], fresh: false }
    }

    /// Attributes of `ino`.
    pub fn attr(&self, ino: u64) -> Result<Inode> {
        self.inodes.get(&ino).cloned().ok_or(FsError::NotFound)
    }

    fn dir_inode(&self, ino: u64) -> Result<&Inode> {
        let inode = self.inodes.get(&ino).ok_or(FsError::NotFound)?;
        if inode.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        Ok(inode)
    }

    fn load_dir(&mut self, ino: u64) -> Result<&mut Dir> {
        let size = self.dir_inode(ino)?.size;
        if !self.dirs.contains_key(&ino) {
            let slots = size / u64::from(DIRENT_BYTES);
            let per = self.sb.dirents_per_block();
            let mut dir = Dir { slots, ..Dir::default() };
            // The missing blocks in one round trip, not one each (a large directory's first
            // lookup after a mount waited for hundreds, under the file system's lock).
            let blocks: Vec<u64> = (0..slots.div_ceil(per))
                .map_while(|index| self.sb.data_block(ino, index))
                .collect();
            self.dev.prefetch(&blocks);
            for index in 0..slots.div_ceil(per) {
                let block = self.sb.data_block(ino, index).ok_or_else(|| {
                    FsError::Corrupt(format!("directory {ino} is larger than a file may be"))
                })?;
                let data = self.dev.read(block, 0, self.sb.block_size)?;
                for i in 0..per {
                    let slot = index * per + i;
                    if slot >= slots {
                        break;
                    }
                    let at = (i * u64::from(DIRENT_BYTES)) as usize;
                    match decode_dirent(&data[at..at + DIRENT_BYTES as usize]) {
                        Some((child, name)) if self.inodes.contains_key(&child) => {
                            dir.by_slot.insert(slot, name.clone());
                            dir.by_name.insert(name, (child, slot));
                        }
                        Some((child, name)) => {
                            // The inode was freed after a crash left its name behind: drop the name.
                            tracing::warn!(dir = ino, child, name = %String::from_utf8_lossy(&name), "dropping an entry naming a free inode");
                            dir.free_slots.insert(slot);
                        }
                        None => {
                            dir.free_slots.insert(slot);
                        }
                    }
                }
            }
            self.dirs.insert(ino, dir);
        }
        Ok(self.dirs.get_mut(&ino).expect("just loaded"))
    }

    fn check_name(name: &[u8]) -> Result<()> {
        if name.is_empty()
            || name == b"."
            || name == b".."
            || name.contains(&b'/')
            || name.contains(&0)
        {
            return Err(FsError::Invalid("bad file name"));
        }
        if name.len() > MAX_NAME_BYTES {
            return Err(FsError::NameTooLong);
        }
        Ok(())
    }

    /// Looks `name` up in directory `parent`.
    pub fn lookup(&mut self, parent: u64, name: &[u8]) -> Result<Inode> {
        if name == b"." {
            return self.attr(parent);
        }
        if name == b".." {
            let p = self.dir_inode(parent)?.parent;
            return self.attr(p);
        }
        if name.len() > MAX_NAME_BYTES {
            return Err(FsError::NameTooLong);
        }
        let dir = self.load_dir(parent)?;
        let (child, _) = *dir.by_name.get(name).ok_or(FsError::NotFound)?;
        self.attr(child)
    }

    /// The generation of inode `ino` (FUSE's `generation` of its entries; see
    /// `Fs::generations`).
    pub fn generation(&self, ino: u64) -> u64 {
        self.generations.get(&ino).copied().unwrap_or(0)
    }

    /// `r`'s inode with its generation.
    pub fn with_generation(&self, r: Result<Inode>) -> Result<(Inode, u64)> {
        r.map(|i| {
            let g = self.generation(i.ino);
            (i, g)
        })
    }

    fn alloc_ino(&mut self, ops: &mut Vec<BlockOp>) -> Result<(u64, bool)> {
        let (ino, fresh) = self.take_ino(ops)?;
        self.generations.insert(ino, self.next_generation);
        self.next_generation += 1;
        Ok((ino, fresh))
    }

    fn take_ino(&mut self, ops: &mut Vec<BlockOp>) -> Result<(u64, bool)> {
        if let Some(ino) = self.free_inos.pop_first() {
            return Ok((ino, false));
        }
        let old = self.sb.inode_hwm;
        if old >= self.sb.max_inodes {
            return Err(FsError::NoInodes { max_inodes: self.sb.max_inodes });
        }
        // Raise the mark a whole table block at a time: one superblock write per block of inodes.
        let new = (old + self.sb.inodes_per_block()).min(self.sb.max_inodes);
        self.sb.inode_hwm = new;
        self.free_inos.extend(old + 1..new);
        ops.push(self.superblock_op());
        let fresh = old.is_multiple_of(self.sb.inodes_per_block());
        Ok((old, fresh))
    }

    /// The slot the next entry of directory `parent` (loaded) goes to, and where it lives:
    /// (slot, data block index, volume block, byte offset). Changes nothing, so a caller can
    /// check for room before it changes anything else.
    fn next_slot(&self, parent: u64) -> Result<(u64, u64, u64, u32)> {
        let dir = self.dirs.get(&parent).expect("directory loaded");
        let slot = dir.free_slots.first().copied().unwrap_or(dir.slots);
        let (index, offset) = self.sb.dirent_location(slot);
        let block = self.sb.data_block(parent, index).ok_or(FsError::DirFull {
            max_entries: self.sb.file_stride_blocks * self.sb.dirents_per_block(),
        })?;
        Ok((slot, index, block, offset))
    }

    /// Adds `name -> child` to directory `parent` (loaded), returning the ops that write the slot.
    /// Fails (with nothing changed) when the directory is full.
    fn add_entry(
        &mut self,
        parent: u64,
        name: &[u8],
        child: u64,
        ops: &mut Vec<BlockOp>,
    ) -> Result<()> {
        let sb = self.sb;
        let (slot, index, block, offset) = self.next_slot(parent)?;
        let dir = self.dirs.get_mut(&parent).expect("directory loaded");
        if !dir.free_slots.remove(&slot) {
            dir.slots += 1;
        }
        dir.by_slot.insert(slot, name.to_vec());
        dir.by_name.insert(name.to_vec(), (child, slot));
        let slots = dir.slots;
        let parent_inode = self.inodes.get(&parent).expect("live directory");
        let fresh = index >= sb.data_blocks(parent_inode);
        ops.push(BlockOp::Write { block, offset, data: encode_dirent(child, name), fresh });
        let now = self.now();
        let p = self.inodes.get_mut(&parent).expect("live directory");
        p.size = p.size.max(slots * u64::from(DIRENT_BYTES));
        p.mtime = now;
        p.ctime = now;
        Ok(())
    }

    /// Removes `name` from directory `parent` (loaded), returning the op that frees the slot.
    fn remove_entry(&mut self, parent: u64, name: &[u8], ops: &mut Vec<BlockOp>) -> Result<u64> {
        let sb = self.sb;
        let dir = self.dirs.get_mut(&parent).expect("directory loaded");
        let (child, slot) = dir.by_name.remove(name).ok_or(FsError::NotFound)?;
        dir.by_slot.remove(&slot);
        dir.free_slots.insert(slot);
        let (index, offset) = sb.dirent_location(slot);
        let block = sb.data_block(parent, index).expect("slot was addressable");
        ops.push(BlockOp::Write { block, offset, data: encode_dirent(0, b""), fresh: false });
        let now = self.now();
        let p = self.inodes.get_mut(&parent).expect("live directory");
        p.mtime = now;
        p.ctime = now;
        Ok(child)
    }

    /// Creates a file, directory or symlink named `name` in `parent`.
    #[allow(clippy::too_many_arguments)]
    pub fn create(
        &mut self,
        parent: u64,
        name: &[u8],
        kind: Kind,
        perm: u16,
        uid: u32,
        gid: u32,
        symlink_target: Option<&[u8]>,
    ) -> Result<Inode> {
        self.writable()?;
        Self::check_name(name)?;
        if let Some(t) = symlink_target {
            if t.is_empty() || t.len() > MAX_SYMLINK_BYTES {
                return Err(FsError::Invalid("bad symlink target length"));
            }
        }
        if self.load_dir(parent)?.by_name.contains_key(name) {
            return Err(FsError::Exists);
        }
        // In a set-group-ID directory what is made takes the directory's group, and a
        // directory the bit too (as every local Linux file system does; the kernel leaves
        // it to a FUSE file system).
        let (gid, perm) = match self.attr(parent)? {
            d if d.perm & 0o2000 != 0 => {
                (d.gid, if kind == Kind::Dir { perm | 0o2000 } else { perm })
            }
            _ => (gid, perm),
        };
        // Room for the name before the inode: allocating may raise the in-memory high-water
        // mark, which must not happen for a create that then fails.
        self.next_slot(parent)?;
        let mut ops = Vec::new();
        let (ino, fresh) = self.alloc_ino(&mut ops)?;
        let now = self.now();
        let mut inode = Inode {
            ino,
            kind,
            perm: perm & 0o7777,
            uid,
            gid,
            nlink: if kind == Kind::Dir { 2 } else { 1 },
            size: 0,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
            parent: if kind == Kind::Dir { parent } else { 0 },
        };
        if let Some(target) = symlink_target {
            let block = self.sb.data_block(ino, 0).expect("block 0 exists");
            ops.push(BlockOp::Write { block, offset: 0, data: target.to_vec(), fresh: true });
            inode.size = target.len() as u64;
        }
        // Order: the inode (and its data) before the name that makes it reachable.
        ops.push(self.inode_op(&inode, fresh));
        self.add_entry(parent, name, ino, &mut ops)?;
        if kind == Kind::Dir {
            self.inodes.get_mut(&parent).expect("live").nlink += 1;
        }
        let p = self.inodes[&parent].clone();
        ops.push(self.inode_op(&p, false));
        self.inodes.insert(ino, inode.clone());
        if kind == Kind::Dir {
            self.dirs.insert(ino, Dir::default());
        }
        self.apply(ops, true)?;
        Ok(inode)
    }

    /// Applies one operation's ops. `memory_changed`: the operation already changed the
    /// in-memory state (inodes, directories, the high-water mark) to match them.
    ///
    /// When the device fails, memory may be ahead of it: the operation's changes are in memory
    /// and the device applied any prefix of its ops. A later successful write would then persist
    /// that state (an inode past the high-water mark the device has, a link count of a rename
    /// that never happened), so, like ext4's errors=remount-ro, the first failure stops all
    /// changes until the next mount reloads the state from the device; reads go on. A timeout
    /// is not such a failure: the device applied nothing. An operation that changes memory only
    /// after it succeeds (a write, a setattr) fails with ETIMEDOUT and may be retried; one that
    /// changed memory first reloads it from the device ([`Fs::reload`]) and fails with
    /// ETIMEDOUT too, entering the failed state only when the reload fails.
    fn apply(&mut self, ops: Vec<BlockOp>, memory_changed: bool) -> Result<()> {
        match self.dev.apply(ops) {
            Ok(()) => Ok(()),
            Err(e @ DeviceError::Timeout { .. }) if !memory_changed => Err(e.into()),
            // A metadata operation (create, link, unlink, rmdir, rename) changes memory first.
            // A timeout applied none of its ops (the device contract), so the device still
            // holds the state before it: reload that instead of refusing every change until a
            // remount, which one timeout during a long outage would otherwise cause.
            Err(e @ DeviceError::Timeout { .. }) => match self.reload() {
                Ok(()) => Err(e.into()),
                Err(reload) => {
                    tracing::warn!(error = %e, reload = %reload, "a device write timed out and the state could not be reloaded yet: changes wait for a reload that works (ETIMEDOUT until then)");
                    self.stale = true;
                    self.dirs.clear();
                    Err(e.into())
                }
            },
            Err(e) => {
                if !self.failed {
                    tracing::error!(error = %e, "a device write failed: the file system refuses changes (EIO) until it is mounted again");
                }
                self.failed = true;
                // Directories are reloaded from the device for the reads that go on.
                self.dirs.clear();
                Err(e.into())
            }
        }
    }

    /// Refuses a change once a device write has failed (see [`Fs::apply`]).
    fn writable(&mut self) -> Result<()> {
        if self.failed {
            return Err(FsError::Failed);
        }
        if self.stale {
            self.reload()?;
            self.stale = false;
            tracing::info!("the state is reloaded from the device: changes go on");
        }
        Ok(())
    }

    /// Whether a failed device write has stopped changes until the next mount.
    pub fn failed(&self) -> bool {
        self.failed
    }

    /// A symlink's target.
    pub fn readlink(&mut self, ino: u64) -> Result<Vec<u8>> {
        let inode = self.attr(ino)?;
        if inode.kind != Kind::Symlink {
            return Err(FsError::Invalid("not a symlink"));
        }
        let block = self.sb.data_block(ino, 0).expect("block 0 exists");
        Ok(self.dev.read(block, 0, inode.size as u32)?)
    }

    /// A new name `newname` in `newparent` for the file `ino`.
    pub fn link(&mut self, ino: u64, newparent: u64, newname: &[u8]) -> Result<Inode> {
        self.writable()?;
        Self::check_name(newname)?;
        if self.attr(ino)?.kind == Kind::Dir {
            return Err(FsError::Unsupported("hard links to directories"));
        }
        if self.load_dir(newparent)?.by_name.contains_key(newname) {
            return Err(FsError::Exists);
        }
        // Room first: the link count below must not rise for a link that then fails.
        self.next_slot(newparent)?;
        let now = self.now();
        let inode = self.inodes.get_mut(&ino).expect("checked");
        inode.nlink += 1;
        inode.ctime = now;
        let inode = inode.clone();
        let mut ops = vec![self.inode_op(&inode, false)];
        self.add_entry(newparent, newname, ino, &mut ops)?;
        let p = self.inodes[&newparent].clone();
        ops.push(self.inode_op(&p, false));
        self.apply(ops, true)?;
        Ok(inode)
    }

    /// Removes a non-directory name.
    pub fn unlink(&mut self, parent: u64, name: &[u8]) -> Result<()> {
        self.writable()?;
        let child = self.lookup(parent, name)?;
        if child.kind == Kind::Dir {
            return Err(FsError::IsDir);
        }
        let mut ops = Vec::new();
        self.remove_entry(parent, name, &mut ops)?;
        let p = self.inodes[&parent].clone();
        ops.push(self.inode_op(&p, false));
        self.drop_link(child.ino, &mut ops);
        self.apply(ops, true)?;
        self.free_unlinked(child.ino);
        Ok(())
    }

    /// Removes an empty directory.
    pub fn rmdir(&mut self, parent: u64, name: &[u8]) -> Result<()> {
        self.writable()?;
        if name == b"." {
            return Err(FsError::Invalid("rmdir of ."));
        }
        if name == b".." {
            return Err(FsError::NotEmpty);
        }
        let child = self.lookup(parent, name)?;
        if child.kind != Kind::Dir {
            return Err(FsError::NotDir);
        }
        if !self.load_dir(child.ino)?.by_name.is_empty() {
            return Err(FsError::NotEmpty);
        }
        let mut ops = Vec::new();
        self.remove_entry(parent, name, &mut ops)?;
        self.inodes.get_mut(&parent).expect("live").nlink -= 1;
        let p = self.inodes[&parent].clone();
        ops.push(self.inode_op(&p, false));
        let c = self.inodes.get_mut(&child.ino).expect("live");
        c.nlink = 0;
        let c = c.clone();
        ops.push(self.inode_op(&c, false));
        self.apply(ops, true)?;
        self.free_unlinked(child.ino);
        Ok(())
    }

    fn drop_link(&mut self, ino: u64, ops: &mut Vec<BlockOp>) {
        let now = self.now();
        let inode = self.inodes.get_mut(&ino).expect("live");
        inode.nlink = inode.nlink.saturating_sub(1);
        inode.ctime = now;
        let inode = inode.clone();
        ops.push(self.inode_op(&inode, false));
    }

    /// Frees an inode whose last name an operation just removed on the device. That
    /// operation is done whatever happens here: when the free fails (a timeout, a failed
    /// write), the inode stays an orphan on the device, which the next mount frees, and the
    /// caller is still told the unlink, rmdir or rename succeeded (an error would say it had
    /// not happened).
    fn free_unlinked(&mut self, ino: u64) {
        if let Err(e) = self.maybe_free(ino) {
            tracing::warn!(ino, error = %e, "an unlinked inode could not be freed now; the next mount frees it");
        }
    }

    /// Frees `ino` once it has no name and no open handle.
    fn maybe_free(&mut self, ino: u64) -> Result<()> {
        let unused = |fs: &Self| {
            fs.inodes.get(&ino).is_some_and(|i| i.nlink == 0)
                && fs.open_counts.get(&ino).copied().unwrap_or(0) == 0
        };
        if unused(self) {
            // After a failure the inode stays an orphan, which the next mount frees. A
            // state gone stale (a change that timed out: an unlink, say) is reloaded first,
            // and may bring the link back: decided again after it, or a file whose unlink
            // was reported failed would be freed under its name.
            self.writable()?;
            if unused(self) {
                self.free_inode(ino)?;
            }
        }
        Ok(())
    }

    fn free_inode(&mut self, ino: u64) -> Result<()> {
        let inode = self.inodes.get(&ino).cloned().ok_or(FsError::NotFound)?;
        let mut ops = Vec::new();
        // Data first, then the record: a crash in between leaves an orphan that is freed again.
        for index in 0..self.sb.data_blocks(&inode) {
            if let Some(block) = self.sb.data_block(ino, index) {
                ops.push(BlockOp::Delete { block });
            }
        }
        ops.push(self.free_inode_op(ino));
        self.apply(ops, false)?;
        self.inodes.remove(&ino);
        self.dirs.remove(&ino);
        self.generations.remove(&ino);
        self.free_inos.insert(ino);
        Ok(())
    }

    /// Renames `parent/name` to `newparent/newname`, replacing a compatible target unless
    /// `noreplace`.
    pub fn rename(
        &mut self,
        parent: u64,
        name: &[u8],
        newparent: u64,
        newname: &[u8],
        noreplace: bool,
    ) -> Result<()> {
        self.writable()?;
        Self::check_name(newname)?;
        let src = self.lookup(parent, name)?;
        self.load_dir(newparent)?;
        if src.kind == Kind::Dir {
            // A directory may not move below itself.
            let mut at = newparent;
            loop {
                if at == src.ino {
                    return Err(FsError::Invalid("a directory cannot move into itself"));
                }
                if at == ROOT_INO {
                    break;
                }
                at = self.dir_inode(at)?.parent;
            }
        }
        let existing = self.dirs[&newparent].by_name.get(newname).map(|&(ino, _)| ino);
        let mut ops = Vec::new();
        if let Some(dst_ino) = existing {
            if dst_ino == src.ino {
                return Ok(());
            }
            // The target may not be an ancestor of the source (the kernel's order of checks).
            let mut at = parent;
            loop {
                if at == dst_ino {
                    return Err(FsError::NotEmpty);
                }
                if at == ROOT_INO {
                    break;
                }
                at = self.dir_inode(at)?.parent;
            }
            if noreplace {
                return Err(FsError::Exists);
            }
            let dst = self.attr(dst_ino)?;
            match (src.kind == Kind::Dir, dst.kind == Kind::Dir) {
                (true, false) => return Err(FsError::NotDir),
                (false, true) => return Err(FsError::IsDir),
                (true, true) if !self.load_dir(dst_ino)?.by_name.is_empty() => {
                    return Err(FsError::NotEmpty)
                }
                _ => {}
            }
            // Replace: the name now points at the source (one slot write), the target loses a link.
            self.remove_entry(newparent, newname, &mut ops)?;
            if dst.kind == Kind::Dir {
                self.inodes.get_mut(&newparent).expect("live").nlink -= 1;
                self.inodes.get_mut(&dst_ino).expect("live").nlink = 1;
            }
            self.drop_link(dst_ino, &mut ops);
            self.add_entry(newparent, newname, src.ino, &mut ops)?;
            // Keep the slot write after the free of the same slot: both go to one place, in order.
            self.finish_rename(parent, name, newparent, &src, &mut ops)?;
            self.apply(ops, true)?;
            self.free_unlinked(dst_ino);
            return Ok(());
        }
        self.add_entry(newparent, newname, src.ino, &mut ops)?;
        self.finish_rename(parent, name, newparent, &src, &mut ops)?;
        self.apply(ops, true)
    }

    fn finish_rename(
        &mut self,
        parent: u64,
        name: &[u8],
        newparent: u64,
        src: &Inode,
        ops: &mut Vec<BlockOp>,
    ) -> Result<()> {
        self.remove_entry(parent, name, ops)?;
        let now = self.now();
        if src.kind == Kind::Dir && parent != newparent {
            self.inodes.get_mut(&parent).expect("live").nlink -= 1;
            self.inodes.get_mut(&newparent).expect("live").nlink += 1;
            self.inodes.get_mut(&src.ino).expect("live").parent = newparent;
        }
        self.inodes.get_mut(&src.ino).expect("live").ctime = now;
        let s = self.inodes[&src.ino].clone();
        ops.push(self.inode_op(&s, false));
        let p = self.inodes[&parent].clone();
        ops.push(self.inode_op(&p, false));
        if newparent != parent {
            let np = self.inodes[&newparent].clone();
            ops.push(self.inode_op(&np, false));
        }
        Ok(())
    }

    /// Changes attributes; a size change truncates or extends the file.
    pub fn setattr(&mut self, ino: u64, set: SetAttr) -> Result<Inode> {
        self.writable()?;
        let mut inode = self.attr(ino)?;
        let now = self.now();
        let mut ops = Vec::new();
        if let Some(size) = set.size {
            match inode.kind {
                Kind::Dir => return Err(FsError::IsDir),
                Kind::Symlink => return Err(FsError::Invalid("truncate of a symlink")),
                Kind::File => {}
            }
            if size > self.sb.max_file_bytes() {
                return Err(FsError::TooBig { max_bytes: self.sb.max_file_bytes() });
            }
            self.truncate_ops(&inode, size, &mut ops);
            inode.size = size;
            inode.mtime = now;
        }
        if let Some(perm) = set.perm {
            inode.perm = perm & 0o7777;
        }
        if let Some(uid) = set.uid {
            inode.uid = uid;
        }
        if let Some(gid) = set.gid {
            inode.gid = gid;
        }
        if let Some(t) = set.atime {
            inode.atime = t;
        }
        if let Some(t) = set.mtime {
            inode.mtime = t;
        }
        inode.ctime = now;
        ops.push(self.inode_op(&inode, false));
        self.apply(ops, false)?;
        self.inodes.insert(ino, inode.clone());
        Ok(inode)
    }

    /// Ops that keep the layout invariant when a file shrinks from `inode.size` to `size`.
    fn truncate_ops(&self, inode: &Inode, size: u64, ops: &mut Vec<BlockOp>) {
        let bs = u64::from(self.sb.block_size);
        if size >= inode.size {
            return;
        }
        let keep = size.div_ceil(bs);
        for index in keep..inode.size.div_ceil(bs) {
            if let Some(block) = self.sb.data_block(inode.ino, index) {
                ops.push(BlockOp::Delete { block });
            }
        }
        let tail = size % bs;
        if tail != 0 {
            let index = size / bs;
            let old_end = (inode.size - index * bs).min(bs);
            let block = self.sb.data_block(inode.ino, index).expect("within the file");
            ops.push(BlockOp::Write {
                block,
                offset: tail as u32,
                data: vec![0; (old_end - tail) as usize],
                fresh: false,
            });
        }
    }

    /// Reads up to `size` bytes at `offset` (short at end of file).
    /// The device blocks a [`Fs::read`] of these arguments reads (none for one past the end
    /// or of nothing); what it would refuse is refused here too.
    pub fn read_blocks(&self, ino: u64, offset: u64, size: u32) -> Result<Vec<u64>> {
        let Some(end) = self.read_end(ino, offset, size)? else { return Ok(Vec::new()) };
        let bs = u64::from(self.sb.block_size);
        Ok((offset / bs..=(end - 1) / bs).map_while(|i| self.sb.data_block(ino, i)).collect())
    }

    /// Where a read of these arguments ends (`None`: it reads nothing), or why it is refused.
    fn read_end(&self, ino: u64, offset: u64, size: u32) -> Result<Option<u64>> {
        let inode = self.attr(ino)?;
        match inode.kind {
            Kind::Dir => return Err(FsError::IsDir),
            Kind::Symlink => return Err(FsError::Invalid("read of a symlink")),
            Kind::File => {}
        }
        if size == 0 || offset >= inode.size {
            return Ok(None);
        }
        Ok(Some((offset + u64::from(size)).min(inode.size)))
    }

    pub fn read(&mut self, ino: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        let Some(end) = self.read_end(ino, offset, size)? else { return Ok(Vec::new()) };
        let bs = u64::from(self.sb.block_size);
        // A read over several blocks asks the device for all of them at once first (one
        // round trip over the radio link instead of one per block).
        if (end - 1) / bs > offset / bs {
            let blocks: Vec<u64> = (offset / bs..=(end - 1) / bs)
                .map(|i| self.sb.data_block(ino, i).expect("within the file"))
                .collect();
            self.dev.prefetch(&blocks);
        }
        let mut out = Vec::with_capacity((end - offset) as usize);
        let mut pos = offset;
        while pos < end {
            let index = pos / bs;
            let within = pos % bs;
            let len = (bs - within).min(end - pos);
            let block = self.sb.data_block(ino, index).expect("within the file");
            out.extend_from_slice(&self.dev.read(block, within as u32, len as u32)?);
            pos += len;
        }
        Ok(out)
    }

    /// Writes `data` at `offset`, growing the file as needed. Data and the new size reach the
    /// device in one batch, so a crash keeps both or neither of the size change.
    pub fn write(&mut self, ino: u64, offset: u64, data: &[u8]) -> Result<u32> {
        self.writable()?;
        let Some((inode, ops)) = self.write_ops(ino, offset, data)? else { return Ok(0) };
        self.apply(ops, false)?;
        self.inodes.insert(ino, inode);
        Ok(data.len() as u32)
    }

    /// The device operations [`Fs::write`] of these arguments would apply now (none for
    /// no data): the mount waits for room for them outside the file system's lock first
    /// (`BlockDevice::wait_room`).
    pub fn write_plan(&mut self, ino: u64, offset: u64, data: &[u8]) -> Result<Vec<BlockOp>> {
        self.writable()?;
        Ok(self.write_ops(ino, offset, data)?.map(|(_, ops)| ops).unwrap_or_default())
    }

    /// The inode a write leaves and the operations it applies (`None`: no data).
    fn write_ops(
        &self,
        ino: u64,
        offset: u64,
        data: &[u8],
    ) -> Result<Option<(Inode, Vec<BlockOp>)>> {
        let mut inode = self.attr(ino)?;
        match inode.kind {
            Kind::Dir => return Err(FsError::IsDir),
            Kind::Symlink => return Err(FsError::Invalid("write to a symlink")),
            Kind::File => {}
        }
        if data.is_empty() {
            // Nothing written: the size stays, even at an offset past the end.
            return Ok(None);
        }
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|&e| e <= self.sb.max_file_bytes())
            .ok_or(FsError::TooBig { max_bytes: self.sb.max_file_bytes() })?;
        let bs = u64::from(self.sb.block_size);
        let first_absent = inode.size.div_ceil(bs);
        let mut ops = Vec::new();
        let mut pos = offset;
        while pos < end {
            let index = pos / bs;
            let within = pos % bs;
            let len = (bs - within).min(end - pos);
            let at = (pos - offset) as usize;
            let block = self.sb.data_block(ino, index).expect("checked against the max size");
            ops.push(BlockOp::Write {
                block,
                offset: within as u32,
                data: data[at..at + len as usize].to_vec(),
                fresh: index >= first_absent,
            });
            pos += len;
        }
        let now = self.now();
        inode.size = inode.size.max(end);
        inode.mtime = now;
        inode.ctime = now;
        ops.push(self.inode_op(&inode, false));
        Ok(Some((inode, ops)))
    }

    /// Entries of directory `ino` after `offset` (0 starts; `.` and `..` come first).
    /// At most `max` entries: a listing takes many calls (one per kernel buffer), each of
    /// which must cost what it returns, not the rest of the directory.
    pub fn readdir(&mut self, ino: u64, offset: u64, max: usize) -> Result<Vec<DirEntry>> {
        let parent = self.dir_inode(ino)?.parent;
        let mut out = Vec::new();
        if offset < 1 {
            out.push(DirEntry { offset: 1, ino, kind: Kind::Dir, name: b".".to_vec() });
        }
        if offset < 2 {
            out.push(DirEntry { offset: 2, ino: parent, kind: Kind::Dir, name: b"..".to_vec() });
        }
        let from = offset.saturating_sub(2);
        let dir = self.load_dir(ino)?;
        let room = max.saturating_sub(out.len());
        let entries: Vec<(u64, Vec<u8>)> =
            dir.by_slot.range(from..).take(room).map(|(s, n)| (*s, n.clone())).collect();
        for (slot, name) in entries {
            let (child, _) = self.dirs[&ino].by_name[&name];
            let kind = self.inodes.get(&child).map(|i| i.kind).unwrap_or(Kind::File);
            // Offsets are slot + 3 so they stay stable while other entries come and go.
            out.push(DirEntry { offset: slot + 3, ino: child, kind, name });
        }
        Ok(out)
    }

    /// Notes an open handle on `ino` (an unlinked file lives until its last handle closes).
    pub fn open(&mut self, ino: u64) -> Result<Inode> {
        let inode = self.attr(ino)?;
        *self.open_counts.entry(ino).or_default() += 1;
        Ok(inode)
    }

    /// Drops an open handle on `ino`.
    pub fn release(&mut self, ino: u64) -> Result<()> {
        if let Some(n) = self.open_counts.get_mut(&ino) {
            *n -= 1;
            if *n == 0 {
                self.open_counts.remove(&ino);
            }
        }
        self.maybe_free(ino)
    }

    /// The persisted barrier: returns once every change so far is in the volume's durable store.
    pub fn sync(&self) -> Result<()> {
        Ok(self.dev.sync()?)
    }

    /// Usage figures.
    pub fn stats(&self) -> FsStats {
        FsStats {
            block_size: self.sb.block_size,
            max_inodes: self.sb.max_inodes,
            used_inodes: self.inodes.len() as u64,
            used_bytes: self.inodes.values().map(|i| i.size).sum(),
        }
    }
}
