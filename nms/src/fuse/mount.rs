//! The FUSE side: a `fuser::Filesystem` over the core, and mounting/unmounting.
//!
//! The kernel's requests arrive on `fuse_threads` threads; the core sits behind one lock (its
//! state is a handful of maps, and the device below bounds every wait by the operation timeout,
//! so no request can hang the mount). A read fetches the blocks it lacks before taking the
//! lock (`BlockDevice::fetch_ahead`), so one waiting on the network holds up no other request. `fsync` is the persisted barrier; `flush` (every close)
//! only needs the local journal, which is already durable when a write returns, so closing a
//! file keeps working while the link is down.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, MountOption, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request,
    TimeOrNow, WriteFlags,
};

use super::device::BlockDevice;
use super::fs::{Fs, FsError, SetAttr};
use super::layout::{Inode, Kind, Timestamp, MAX_NAME_BYTES};

/// How long the kernel may cache attributes and names. The mount is its volume's only writer,
/// so the kernel's copy can only go stale through this mount, which the kernel sees.
const ATTR_TTL: Duration = Duration::from_secs(1);
/// Most directory entries one READDIR reply is built from, in entries: the kernel's buffer
/// (a page) holds at most 128 (32 bytes each at the least), so more would be dropped.
const READDIR_MAX_ENTRIES: usize = 256;

/// The system clock, for the core's timestamps.
pub fn system_clock() -> super::fs::Clock {
    Box::new(|| to_ts(SystemTime::now()))
}

fn to_ts(t: SystemTime) -> Timestamp {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => Timestamp { secs: d.as_secs() as i64, nanos: d.subsec_nanos() },
        Err(e) => {
            let d = e.duration();
            Timestamp {
                secs: -(d.as_secs() as i64) - i64::from(d.subsec_nanos() > 0),
                nanos: (1_000_000_000 - d.subsec_nanos()) % 1_000_000_000,
            }
        }
    }
}

fn to_system(t: Timestamp) -> SystemTime {
    if t.secs >= 0 {
        UNIX_EPOCH + Duration::new(t.secs as u64, t.nanos)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.secs.unsigned_abs())
            + Duration::from_nanos(u64::from(t.nanos))
    }
}

fn attr(inode: &Inode, block_size: u32) -> FileAttr {
    FileAttr {
        ino: INodeNo(inode.ino),
        size: inode.size,
        blocks: inode.size.div_ceil(512),
        atime: to_system(inode.atime),
        mtime: to_system(inode.mtime),
        ctime: to_system(inode.ctime),
        crtime: to_system(inode.crtime),
        kind: match inode.kind {
            Kind::File => FileType::RegularFile,
            Kind::Dir => FileType::Directory,
            Kind::Symlink => FileType::Symlink,
        },
        perm: inode.perm,
        nlink: inode.nlink,
        uid: inode.uid,
        gid: inode.gid,
        rdev: 0,
        blksize: block_size,
        flags: 0,
    }
}

fn errno(e: &FsError) -> Errno {
    if matches!(e, FsError::Device(_) | FsError::Corrupt(_)) {
        // Logged once here, where the error leaves the file system.
        tracing::warn!(error = %e, "file system operation failed");
    }
    Errno::from_i32(e.errno())
}

/// The core as a FUSE file system.
pub struct FuseFs<D: BlockDevice + Clone> {
    fs: Mutex<Fs<D>>,
    /// The same device, for the persisted barrier outside the core lock.
    dev: D,
    block_size: u32,
}

impl<D: BlockDevice + Clone> FuseFs<D> {
    pub fn new(fs: Fs<D>) -> Self {
        let block_size = fs.superblock().block_size;
        let dev = fs.device().clone();
        FuseFs { fs: Mutex::new(fs), dev, block_size }
    }

    fn core(&self) -> MutexGuard<'_, Fs<D>> {
        // A panic inside the core must not wedge the mount: keep serving what state there is.
        self.fs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn entry(&self, r: Result<(Inode, u64), FsError>, reply: ReplyEntry) {
        match r {
            Ok((i, g)) => reply.entry(&ATTR_TTL, &attr(&i, self.block_size), Generation(g)),
            Err(e) => reply.error(errno(&e)),
        }
    }
}

fn time_or_now(t: Option<TimeOrNow>) -> Option<Timestamp> {
    t.map(|t| match t {
        TimeOrNow::SpecificTime(t) => to_ts(t),
        TimeOrNow::Now => to_ts(SystemTime::now()),
    })
}

impl<D: BlockDevice + Clone + 'static> Filesystem for FuseFs<D> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Big writes reach the core whole (fewer journal records); the kernel caps what it can.
        let _ = config.set_max_write(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let mut core = self.core();
        let r = core.lookup(parent.0, name.as_bytes());
        let r = core.with_generation(r);
        drop(core);
        self.entry(r, reply);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.core().attr(ino.0) {
            Ok(i) => reply.attr(&ATTR_TTL, &attr(&i, self.block_size)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let set = SetAttr {
            perm: mode.map(|m| (m & 0o7777) as u16),
            uid,
            gid,
            size,
            atime: time_or_now(atime),
            mtime: time_or_now(mtime),
        };
        match self.core().setattr(ino.0, set) {
            Ok(i) => reply.attr(&ATTR_TTL, &attr(&i, self.block_size)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.core().readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        if mode & libc::S_IFMT != libc::S_IFREG && mode & libc::S_IFMT != 0 {
            // Device nodes, FIFOs and sockets have no meaning on a vehicle's network volume.
            reply.error(Errno::EPERM);
            return;
        }
        let perm = (mode & !umask & 0o7777) as u16;
        let mut core = self.core();
        let r =
            core.create(parent.0, name.as_bytes(), Kind::File, perm, req.uid(), req.gid(), None);
        let r = core.with_generation(r);
        drop(core);
        self.entry(r, reply);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let perm = (mode & !umask & 0o7777) as u16;
        let mut core = self.core();
        let r = core.create(parent.0, name.as_bytes(), Kind::Dir, perm, req.uid(), req.gid(), None);
        let r = core.with_generation(r);
        drop(core);
        self.entry(r, reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.core().unlink(parent.0, name.as_bytes()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.core().rmdir(parent.0, name.as_bytes()) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let mut core = self.core();
        let r = core.create(
            parent.0,
            link_name.as_bytes(),
            Kind::Symlink,
            0o777,
            req.uid(),
            req.gid(),
            Some(target.as_os_str().as_bytes()),
        );
        let r = core.with_generation(r);
        drop(core);
        self.entry(r, reply);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.intersects(RenameFlags::RENAME_EXCHANGE | RenameFlags::RENAME_WHITEOUT) {
            reply.error(Errno::EINVAL);
            return;
        }
        let noreplace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        match self.core().rename(
            parent.0,
            name.as_bytes(),
            newparent.0,
            newname.as_bytes(),
            noreplace,
        ) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let mut core = self.core();
        let r = core.link(ino.0, newparent.0, newname.as_bytes());
        let r = core.with_generation(r);
        drop(core);
        self.entry(r, reply);
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.core().open(ino.0) {
            Ok(_) => reply.opened(FileHandle(0), FopenFlags::empty()),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        // What the read needs is fetched outside the file system's lock: a read waiting on
        // the network (up to the operation timeout) holds up no other operation, and one
        // that cannot be fetched fails here. Under the lock the read then finds it cached
        // (or, evicted meanwhile, fetches it itself).
        let blocks = self.core().read_blocks(ino.0, offset, size);
        if let Err(e) = blocks.and_then(|b| self.dev.fetch_ahead(&b).map_err(FsError::from)) {
            return reply.error(errno(&e));
        }
        match self.core().read(ino.0, offset, size) {
            Ok(d) => reply.data(&d),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        // Room for the write (journal, cache), and the images of the blocks it writes in
        // part, waited for outside the core's lock: a write waiting for the volume to take
        // earlier ones, or for a block from it (up to the op timeout each), holds up no
        // other request. (The write waits again if another took the room meanwhile.)
        let plan = self.core().write_plan(ino.0, offset, data);
        let room = plan.and_then(|ops| {
            if ops.is_empty() {
                return Ok(());
            }
            let partial: Vec<u64> =
                ops.iter().filter_map(|op| op.builds_on_image(self.block_size)).collect();
            self.dev.wait_room(&ops)?;
            self.dev.fetch_ahead(&partial).map_err(FsError::from)
        });
        if let Err(e) = room {
            return reply.error(errno(&e));
        }
        match self.core().write(ino.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        match self.core().release(ino.0) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        // Sync outside the core lock: other operations keep going while the barrier completes.
        match self.dev.sync() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(&FsError::from(e))),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        match self.core().readdir(ino.0, offset, READDIR_MAX_ENTRIES) {
            Ok(entries) => {
                for e in entries {
                    let kind = match e.kind {
                        Kind::File => FileType::RegularFile,
                        Kind::Dir => FileType::Directory,
                        Kind::Symlink => FileType::Symlink,
                    };
                    if reply.add(INodeNo(e.ino), e.offset, kind, OsStr::from_bytes(&e.name)) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fsyncdir(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.fsync(req, ino, fh, datasync, reply);
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = self.core().stats();
        let bs = u64::from(s.block_size);
        // The volume has no fixed capacity; report a large one so tools do not refuse to write.
        let total_blocks = (1u64 << 50) / bs;
        let used = s.used_bytes.div_ceil(bs);
        let free = total_blocks.saturating_sub(used);
        let ffree = s.max_inodes.saturating_sub(s.used_inodes);
        reply.statfs(
            total_blocks,
            free,
            free,
            s.max_inodes,
            ffree,
            s.block_size,
            MAX_NAME_BYTES as u32,
            s.block_size,
        );
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _length: u64,
        _mode: i32,
        reply: ReplyEmpty,
    ) {
        // Space is not reserved on a network volume; callers (fio, posix_fallocate) fall back.
        // ENOSYS: the kernel remembers it (no_fallocate) and answers EOPNOTSUPP itself.
        reply.error(Errno::from_i32(libc::ENOSYS));
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: fuser::ReplyXattr,
    ) {
        // No extended attributes. ENOSYS, not EOPNOTSUPP: only ENOSYS makes the kernel stop
        // asking (no_getxattr; it then answers EOPNOTSUPP itself), where EOPNOTSUPP cost a
        // request, e.g. for security.capability at every write.
        reply.error(Errno::from_i32(libc::ENOSYS));
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: fuser::ReplyXattr) {
        reply.error(Errno::from_i32(libc::ENOSYS));
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        // Permissions are checked by the kernel (`default_permissions`).
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let perm = (mode & !umask & 0o7777) as u16;
        let mut core = self.core();
        let r = core
            .create(parent.0, name.as_bytes(), Kind::File, perm, req.uid(), req.gid(), None)
            .and_then(|i| core.open(i.ino));
        let r = core.with_generation(r);
        drop(core);
        match r {
            Ok((i, g)) => reply.created(
                &ATTR_TTL,
                &attr(&i, self.block_size),
                Generation(g),
                FileHandle(0),
                FopenFlags::empty(),
            ),
            Err(e) => reply.error(errno(&e)),
        }
    }
}

/// The FUSE session settings for a wayside mount.
pub fn fuse_config(volume: &str, fuse_threads: usize) -> fuser::Config {
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        MountOption::FSName(format!("wayside:{volume}")),
        MountOption::Subtype("wayside".into()),
        MountOption::DefaultPermissions,
        MountOption::RW,
        MountOption::NoAtime,
    ];
    config.acl = fuser::SessionACL::All;
    config.n_threads = Some(fuse_threads.max(1));
    config
}

/// A mounted file system being served on its own thread.
pub struct Served {
    unmounter: fuser::SessionUnmounter,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
    mountpoint: PathBuf,
}

impl Served {
    /// Mounts `fs` at `mountpoint` and serves it on a background thread.
    pub fn start<D: BlockDevice + Clone + 'static>(
        fs: FuseFs<D>,
        mountpoint: &Path,
        config: &fuser::Config,
    ) -> std::io::Result<Self> {
        let mut session = fuser::Session::new(fs, mountpoint, config)?;
        let unmounter = session.unmount_callable();
        let thread =
            std::thread::Builder::new().name("fuse-session".into()).spawn(move || session.run())?;
        Ok(Served { unmounter, thread: Some(thread), mountpoint: mountpoint.to_path_buf() })
    }

    /// Whether the session ended (the file system was unmounted from outside, e.g. `nms umount`).
    pub fn finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Unmounts (if still mounted) and waits for the session to end.
    pub fn stop(mut self) -> std::io::Result<()> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> std::io::Result<()> {
        let Some(thread) = self.thread.take() else { return Ok(()) };
        if !thread.is_finished() {
            if let Err(e) = self.unmounter.unmount() {
                tracing::warn!(mountpoint = %self.mountpoint.display(), error = %e, "unmount failed; detaching");
                umount(&self.mountpoint, true)?;
            }
        }
        thread.join().map_err(|_| std::io::Error::other("the FUSE session thread panicked"))?
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Err(e) = self.stop_inner() {
            tracing::warn!(error = %e, "stopping the FUSE session");
        }
    }
}

/// Unmounts `mountpoint` (`lazy`: detach even if busy). Needs root (or use `fusermount3 -u`).
pub fn umount(mountpoint: &Path, lazy: bool) -> std::io::Result<()> {
    let c = std::ffi::CString::new(mountpoint.as_os_str().as_bytes()).map_err(|_| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "mount point contains a NUL byte")
    })?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: a valid NUL-terminated path; umount2 does not retain it.
    if unsafe { libc::umount2(c.as_ptr(), flags) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Whether a FUSE mount is active at `mountpoint` (per /proc/self/mountinfo).
pub fn is_mounted(mountpoint: &Path) -> bool {
    let Ok(canon) = mountpoint.canonicalize() else { return false };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else { return false };
    info.lines().any(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        f.len() > 4 && Path::new(f[4]) == canon && l.contains(" - fuse")
    })
}
