//! Unit tests of the core over an in-memory device, including the fsx run.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::device::{BlockDevice, BlockOp, DeviceError, MemDevice};
use super::fs::{Clock, FormatParams, Fs, FsError, SetAttr};
use super::fsx::{self, FsxConfig, NodeKind, Target};
use super::layout::{Kind, Timestamp, ROOT_INO};

pub(crate) fn test_clock() -> Clock {
    let t = Arc::new(AtomicI64::new(1_700_000_000));
    Box::new(move || Timestamp { secs: t.fetch_add(1, Ordering::Relaxed), nanos: 0 })
}

/// Drives an `Fs` by path, reopening it from the same device on remount.
pub(crate) struct CoreTarget<D: BlockDevice + Clone> {
    pub fs: Option<Fs<D>>,
    pub dev: D,
    pub params: FormatParams,
}

impl<D: BlockDevice + Clone> CoreTarget<D> {
    pub fn new(dev: D, params: FormatParams) -> Self {
        let fs = Fs::open_or_format(dev.clone(), params, test_clock()).expect("format");
        CoreTarget { fs: Some(fs), dev, params }
    }

    fn fs(&mut self) -> &mut Fs<D> {
        self.fs.as_mut().expect("mounted")
    }

    fn resolve(&mut self, path: &str) -> Result<u64, i32> {
        let mut ino = ROOT_INO;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            ino = self.fs().lookup(ino, part.as_bytes()).map_err(|e| e.errno())?.ino;
        }
        Ok(ino)
    }

    fn split(&mut self, path: &str) -> Result<(u64, Vec<u8>), i32> {
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
        Ok((self.resolve(dir)?, name.as_bytes().to_vec()))
    }
}

fn errno<T>(r: Result<T, FsError>) -> Result<T, i32> {
    r.map_err(|e| e.errno())
}

impl<D: BlockDevice + Clone> Target for CoreTarget<D> {
    fn create(&mut self, path: &str) -> Result<(), i32> {
        let (p, n) = self.split(path)?;
        errno(self.fs().create(p, &n, Kind::File, 0o644, 0, 0, None)).map(drop)
    }
    fn mkdir(&mut self, path: &str) -> Result<(), i32> {
        let (p, n) = self.split(path)?;
        errno(self.fs().create(p, &n, Kind::Dir, 0o755, 0, 0, None)).map(drop)
    }
    fn symlink(&mut self, target: &[u8], path: &str) -> Result<(), i32> {
        let (p, n) = self.split(path)?;
        errno(self.fs().create(p, &n, Kind::Symlink, 0o777, 0, 0, Some(target))).map(drop)
    }
    fn readlink(&mut self, path: &str) -> Result<Vec<u8>, i32> {
        let ino = self.resolve(path)?;
        errno(self.fs().readlink(ino))
    }
    fn write(&mut self, path: &str, offset: u64, data: &[u8]) -> Result<(), i32> {
        let ino = self.resolve(path)?;
        errno(self.fs().write(ino, offset, data)).map(drop)
    }
    fn truncate(&mut self, path: &str, size: u64) -> Result<(), i32> {
        let ino = self.resolve(path)?;
        errno(self.fs().setattr(ino, SetAttr { size: Some(size), ..SetAttr::default() })).map(drop)
    }
    fn read_all(&mut self, path: &str) -> Result<Vec<u8>, i32> {
        let ino = self.resolve(path)?;
        let size = errno(self.fs().attr(ino))?.size;
        errno(self.fs().read(ino, 0, size as u32))
    }
    fn read_at(&mut self, path: &str, offset: u64, len: usize) -> Result<Vec<u8>, i32> {
        let ino = self.resolve(path)?;
        errno(self.fs().read(ino, offset, len as u32))
    }
    fn rename(&mut self, from: &str, to: &str) -> Result<(), i32> {
        let (p, n) = self.split(from)?;
        let (np, nn) = self.split(to)?;
        errno(self.fs().rename(p, &n, np, &nn, false))
    }
    fn unlink(&mut self, path: &str) -> Result<(), i32> {
        let (p, n) = self.split(path)?;
        errno(self.fs().unlink(p, &n))
    }
    fn rmdir(&mut self, path: &str) -> Result<(), i32> {
        let (p, n) = self.split(path)?;
        errno(self.fs().rmdir(p, &n))
    }
    fn list(&mut self, path: &str) -> Result<Vec<String>, i32> {
        let ino = self.resolve(path)?;
        let mut names: Vec<String> = errno(self.fs().readdir(ino, 0, usize::MAX))?
            .into_iter()
            .map(|e| String::from_utf8(e.name).expect("utf8"))
            .filter(|n| n != "." && n != "..")
            .collect();
        names.sort();
        Ok(names)
    }
    fn kind(&mut self, path: &str) -> Result<NodeKind, i32> {
        let ino = self.resolve(path)?;
        Ok(match errno(self.fs().attr(ino))?.kind {
            Kind::File => NodeKind::File,
            Kind::Dir => NodeKind::Dir,
            Kind::Symlink => NodeKind::Symlink,
        })
    }
    fn fsync(&mut self, _path: &str) -> Result<(), i32> {
        errno(self.fs().sync())
    }
    fn remount(&mut self) -> Result<(), String> {
        self.fs = None;
        self.fs = Some(
            Fs::open_or_format(self.dev.clone(), self.params, test_clock())
                .map_err(|e| e.to_string())?,
        );
        Ok(())
    }
}

fn small_params() -> FormatParams {
    FormatParams { max_inodes: 4096, file_stride_blocks: 64 }
}

#[test]
fn fsx_core_matches_the_model_across_remounts() {
    for (seed, block_size) in [(1, 4096), (2, 16384)] {
        let dev = Arc::new(MemDevice::new(block_size));
        let mut target = CoreTarget::new(dev.clone(), small_params());
        let cfg = FsxConfig {
            seed,
            steps: 3000,
            max_file_bytes: 200_000,
            max_write_bytes: 40_000,
            remount_every: 500,
        };
        fsx::run(&mut target, cfg)
            .unwrap_or_else(|e| panic!("seed {seed}, block size {block_size}: {e}"));
    }
}

#[test]
fn deleting_everything_leaves_only_metadata_blocks() {
    let dev = Arc::new(MemDevice::new(4096));
    let mut t = CoreTarget::new(dev.clone(), small_params());
    t.mkdir("d").unwrap();
    t.create("d/f").unwrap();
    t.write("d/f", 10_000, &[7; 20_000]).unwrap();
    let with_data = dev.stored_blocks();
    t.truncate("d/f", 5000).unwrap();
    assert_eq!(t.read_all("d/f").unwrap().len(), 5000);
    // Growing again must expose zeros, not the old bytes (the tail invariant).
    t.truncate("d/f", 30_000).unwrap();
    assert!(t.read_all("d/f").unwrap().iter().all(|&b| b == 0));
    t.unlink("d/f").unwrap();
    t.rmdir("d").unwrap();
    let after = dev.stored_blocks();
    assert!(after < with_data, "{after} blocks after deleting, {with_data} before");
    // Superblock, one inode-table block, the root directory's one data block.
    assert_eq!(after, 3);
}

/// A directory's slots are packed whole into blocks (15 of 264 bytes in 4 KiB), so its
/// size in bytes undercounts its blocks: 31 slots are 8184 bytes, yet slot 30 is in block
/// 2. Adding slot 31 must not take block 2 for a fresh one (the device would start it from
/// zeros, losing slot 30), and removing the directory frees block 2 as well.
#[test]
fn a_directory_block_past_its_size_in_bytes_is_kept_and_freed() {
    let dev = Arc::new(MemDevice::new(4096));
    let mut t = CoreTarget::new(dev.clone(), small_params());
    t.mkdir("d").unwrap();
    for i in 0..32 {
        t.create(&format!("d/f{i}")).unwrap();
    }
    t.remount().unwrap();
    let mut names = t.list("d").unwrap();
    names.sort();
    let mut want: Vec<String> = (0..32).map(|i| format!("f{i}")).collect();
    want.sort();
    assert_eq!(names, want, "every entry survives a reload from the device");
    let d = t.resolve("d").unwrap();
    let sb = t.fs().superblock();
    let blocks: Vec<u64> = (0..3).map(|i| sb.data_block(d, i).unwrap()).collect();
    assert!(blocks.iter().all(|b| dev.holds(*b)), "the directory's three blocks");
    for i in 0..32 {
        t.unlink(&format!("d/f{i}")).unwrap();
    }
    t.rmdir("d").unwrap();
    let left: Vec<&u64> = blocks.iter().filter(|b| dev.holds(**b)).collect();
    assert!(left.is_empty(), "blocks of the removed directory left: {left:?}");
}

#[test]
fn unlinked_open_file_lives_until_released_and_orphans_are_freed_on_mount() {
    let dev = Arc::new(MemDevice::new(4096));
    let mut t = CoreTarget::new(dev.clone(), small_params());
    t.create("f").unwrap();
    t.write("f", 0, b"still here").unwrap();
    let ino = t.resolve("f").unwrap();
    t.fs().open(ino).unwrap();
    t.unlink("f").unwrap();
    assert_eq!(t.fs().read(ino, 0, 100).unwrap(), b"still here");
    // A crash now leaves an orphan (nlink 0): the next mount frees it.
    t.remount().unwrap();
    assert!(matches!(t.fs().attr(ino), Err(FsError::NotFound)));
    assert_eq!(t.list("").unwrap(), Vec::<String>::new());
}

#[test]
fn errors_map_to_posix_errno() {
    let dev = Arc::new(MemDevice::new(4096));
    let mut t = CoreTarget::new(dev, small_params());
    t.mkdir("d").unwrap();
    t.create("d/x").unwrap();
    assert_eq!(t.rmdir("d"), Err(libc::ENOTEMPTY));
    assert_eq!(t.rename("d", "d/sub"), Err(libc::EINVAL));
    assert_eq!(t.create(&"n".repeat(256)), Err(libc::ENAMETOOLONG));
    assert_eq!(t.write("d/x", 64 * 4096, b"z"), Err(libc::EFBIG));
    assert_eq!(t.unlink("d"), Err(libc::EISDIR));
    assert_eq!(t.rmdir("d/x"), Err(libc::ENOTDIR));
}

/// What is made in a set-group-ID directory takes its group (a directory the bit too);
/// elsewhere the caller's.
#[test]
fn a_setgid_directory_passes_its_group_on() {
    let dev = Arc::new(MemDevice::new(4096));
    let mut t = CoreTarget::new(dev, small_params());
    let d = t.fs().create(ROOT_INO, b"d", Kind::Dir, 0o2775, 0, 50, None).unwrap();
    let f = t.fs().create(d.ino, b"f", Kind::File, 0o644, 7, 7, None).unwrap();
    assert_eq!((f.gid, f.perm), (50, 0o644));
    let sub = t.fs().create(d.ino, b"sub", Kind::Dir, 0o755, 7, 7, None).unwrap();
    assert_eq!((sub.gid, sub.perm), (50, 0o2755));
    let plain = t.fs().create(ROOT_INO, b"p", Kind::Dir, 0o755, 7, 7, None).unwrap();
    let g = t.fs().create(plain.ino, b"g", Kind::File, 0o644, 7, 7, None).unwrap();
    assert_eq!((g.gid, g.perm), (7, 0o644));
}

/// A listing taken `max` entries at a time (as the mount serves READDIR) visits every
/// name once, each call returning at most `max`.
#[test]
fn a_directory_is_listed_in_pieces_of_at_most_the_limit() {
    let dev = Arc::new(MemDevice::new(4096));
    let mut t = CoreTarget::new(dev, small_params());
    t.mkdir("d").unwrap();
    for i in 0..40 {
        t.create(&format!("d/f{i}")).unwrap();
    }
    t.unlink("d/f7").unwrap();
    let ino = t.resolve("d").unwrap();
    let (mut names, mut offset) = (Vec::new(), 0);
    loop {
        let got = t.fs().readdir(ino, offset, 5).unwrap();
        assert!(got.len() <= 5, "{} entries", got.len());
        let Some(last) = got.last() else { break };
        offset = last.offset;
        names.extend(got.into_iter().map(|e| String::from_utf8(e.name).unwrap()));
    }
    let mut want: Vec<String> = (0..40).filter(|i| *i != 7).map(|i| format!("f{i}")).collect();
    want.extend([".".to_string(), "..".to_string()]);
    want.sort();
    names.sort();
    assert_eq!(names, want);
}

/// Reads and writes of no bytes do nothing: no panic, no growth past the end.
#[test]
fn reads_and_writes_of_no_bytes_change_nothing() {
    let dev = Arc::new(MemDevice::new(4096));
    let mut t = CoreTarget::new(dev, small_params());
    t.create("x").unwrap();
    t.write("x", 0, b"abc").unwrap();
    let ino = t.resolve("x").unwrap();
    assert_eq!(t.fs().read(ino, 0, 0).unwrap(), Vec::<u8>::new());
    assert_eq!(t.fs().read(ino, 2, 0).unwrap(), Vec::<u8>::new());
    assert_eq!(t.fs().write(ino, 10_000, &[]).unwrap(), 0);
    assert_eq!(t.fs().attr(ino).unwrap().size, 3);
    assert_eq!(t.read_all("x").unwrap(), b"abc");
}

#[test]
fn a_full_directory_reports_enospc_and_keeps_no_trace_of_the_refused_name() {
    // One data block per inode: a directory holds 4096 / 264 = 15 entries.
    let params = FormatParams { max_inodes: 64, file_stride_blocks: 1 };
    let mut t = CoreTarget::new(Arc::new(MemDevice::new(4096)), params);
    t.mkdir("d").unwrap();
    for i in 0..15 {
        t.create(&format!("d/f{i}")).unwrap();
    }
    t.create("g").unwrap();
    assert_eq!(t.create("d/more"), Err(libc::ENOSPC));
    assert_eq!(t.mkdir("d/more"), Err(libc::ENOSPC));
    assert_eq!(t.symlink(b"g", "d/more"), Err(libc::ENOSPC));
    assert_eq!(t.rename("g", "d/more"), Err(libc::ENOSPC));
    let (d, g) = (t.resolve("d").unwrap(), t.resolve("g").unwrap());
    assert_eq!(errno(t.fs().link(g, d, b"more")).map(drop), Err(libc::ENOSPC));
    // The refused name and link left nothing behind, in memory or on the device.
    assert_eq!(t.fs().attr(g).unwrap().nlink, 1);
    assert_eq!(t.kind("d/more"), Err(libc::ENOENT));
    t.unlink("d/f0").unwrap();
    t.create("d/more").unwrap();
    t.remount().unwrap();
    let mut want: Vec<String> = (1..15).map(|i| format!("f{i}")).collect();
    want.push("more".into());
    want.sort();
    assert_eq!(t.list("d").unwrap(), want);
    assert_eq!(t.fs().attr(g).unwrap().nlink, 1);
}

/// How [`FlakyDevice`]'s next `apply` fails.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Applies this many of the batch's ops, then fails as the local disk does.
    Io { after_ops: usize },
    /// Applies nothing and times out (a full journal with the link down).
    Timeout,
}

/// A [`MemDevice`] whose next `apply` can be made to fail within the device contract. Its
/// contents are what a crash at the failure leaves, so reopening the core on it is a remount.
#[derive(Clone)]
struct FlakyDevice {
    inner: Arc<MemDevice>,
    fault: Arc<Mutex<Option<Fault>>>,
    /// Applies that go through before the armed fault strikes.
    pass: Arc<Mutex<usize>>,
    /// While set, every read times out (the link down).
    reads_fail: Arc<std::sync::atomic::AtomicBool>,
}

impl FlakyDevice {
    fn new(block_size: u32) -> Self {
        FlakyDevice {
            inner: Arc::new(MemDevice::new(block_size)),
            fault: Arc::default(),
            pass: Arc::default(),
            reads_fail: Arc::default(),
        }
    }

    fn fail_reads(&self, fail: bool) {
        self.reads_fail.store(fail, std::sync::atomic::Ordering::SeqCst);
    }

    fn fail_next_apply(&self, fault: Fault) {
        self.fail_apply_after(0, fault);
    }

    /// Arms `fault` for the apply after the next `pass` ones.
    fn fail_apply_after(&self, pass: usize, fault: Fault) {
        *self.pass.lock().unwrap() = pass;
        *self.fault.lock().unwrap() = Some(fault);
    }
}

impl BlockDevice for FlakyDevice {
    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }
    fn read(&self, block: u64, offset: u32, len: u32) -> Result<Vec<u8>, DeviceError> {
        if self.reads_fail.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(DeviceError::Timeout { what: "injected read", after: Duration::ZERO });
        }
        self.inner.read(block, offset, len)
    }
    fn apply(&self, mut ops: Vec<BlockOp>) -> Result<(), DeviceError> {
        {
            let mut pass = self.pass.lock().unwrap();
            if *pass > 0 {
                *pass -= 1;
                return self.inner.apply(ops);
            }
        }
        match self.fault.lock().unwrap().take() {
            None => self.inner.apply(ops),
            Some(Fault::Io { after_ops }) => {
                ops.truncate(after_ops);
                self.inner.apply(ops)?;
                Err(DeviceError::Io(std::io::Error::other("injected write failure")))
            }
            Some(Fault::Timeout) => {
                Err(DeviceError::Timeout { what: "injected", after: Duration::ZERO })
            }
        }
    }
    fn sync(&self) -> Result<(), DeviceError> {
        self.inner.sync()
    }
}

/// Checks what a mount loaded from its device, fsck-style: every name leads to a live inode,
/// each file's link count is its number of names, each directory's is 2 + its subdirectories
/// and it names its parent, and every live inode is reachable.
fn fsck<D: BlockDevice>(fs: &mut Fs<D>) -> Result<(), String> {
    let mut names: HashMap<u64, u32> = HashMap::new();
    let mut reached = 1;
    let mut dirs = vec![ROOT_INO];
    while let Some(dir) = dirs.pop() {
        let entries = fs.readdir(dir, 2, usize::MAX).map_err(|e| format!("readdir {dir}: {e}"))?;
        let mut subdirs = 0;
        for e in entries {
            let child = fs.attr(e.ino).map_err(|err| format!("{dir}/{:?}: {err}", e.name))?;
            if child.kind == Kind::Dir {
                subdirs += 1;
                reached += 1;
                if child.parent != dir {
                    return Err(format!(
                        "directory {} names {} as its parent, not {dir}",
                        e.ino, child.parent
                    ));
                }
                dirs.push(e.ino);
            } else {
                *names.entry(e.ino).or_default() += 1;
            }
        }
        let nlink = fs.attr(dir).map_err(|e| e.to_string())?.nlink;
        if nlink != 2 + subdirs {
            return Err(format!("directory {dir} has nlink {nlink} and {subdirs} subdirectories"));
        }
    }
    for (&ino, &n) in &names {
        let nlink = fs.attr(ino).map_err(|e| e.to_string())?.nlink;
        if nlink != n {
            return Err(format!("inode {ino} has nlink {nlink} and {n} names"));
        }
    }
    reached += names.len() as u64;
    let live = fs.stats().used_inodes;
    if live != reached {
        return Err(format!("{live} live inodes, {reached} reachable"));
    }
    Ok(())
}

#[test]
fn after_a_failed_device_write_changes_get_eio_and_the_device_stays_consistent() {
    let dev = FlakyDevice::new(4096);
    let mut t = CoreTarget::new(dev.clone(), small_params());
    t.create("kept").unwrap();
    t.write("kept", 0, b"fsynced before the failure").unwrap();
    t.fsync("kept").unwrap();
    // Use up the inodes below the high-water mark (32 a table block; 0 and the root are taken),
    // so the next create raises it.
    for i in 0..29 {
        t.create(&format!("f{i}")).unwrap();
    }
    // The create fails before the device takes its superblock write: the mark is raised in
    // memory only.
    dev.fail_next_apply(Fault::Io { after_ops: 0 });
    assert_eq!(t.create("failed"), Err(libc::EIO));
    // Before, this create succeeded in an inode past the device's mark, and the file was lost
    // at the next mount although fsynced. Now every change is refused.
    assert_eq!(t.create("late"), Err(libc::EIO));
    assert_eq!(t.mkdir("d"), Err(libc::EIO));
    assert_eq!(t.write("kept", 0, b"x"), Err(libc::EIO));
    assert_eq!(t.truncate("kept", 0), Err(libc::EIO));
    assert_eq!(t.rename("f0", "f1"), Err(libc::EIO));
    assert_eq!(t.unlink("f0"), Err(libc::EIO));
    assert!(t.fs().failed());
    // Reads go on.
    assert_eq!(t.read_all("kept").unwrap(), b"fsynced before the failure");
    assert_eq!(t.list("").unwrap().len(), 30);
    // Mounted again, the device's contents are consistent and changes work again.
    t.remount().unwrap();
    fsck(t.fs()).unwrap();
    assert_eq!(t.kind("failed"), Err(libc::ENOENT));
    assert_eq!(t.read_all("kept").unwrap(), b"fsynced before the failure");
    t.create("late").unwrap();
    t.write("late", 0, b"after the remount").unwrap();
    t.fsync("late").unwrap();
    t.remount().unwrap();
    fsck(t.fs()).unwrap();
    assert_eq!(t.read_all("late").unwrap(), b"after the remount");
}

#[test]
fn a_rename_that_fails_leaves_no_link_count_for_a_later_write_to_persist() {
    let dev = FlakyDevice::new(4096);
    let mut t = CoreTarget::new(dev.clone(), small_params());
    for d in ["a", "b", "a/sub"] {
        t.mkdir(d).unwrap();
    }
    t.create("b/kept").unwrap();
    t.write("b/kept", 0, b"fsynced").unwrap();
    t.fsync("b/kept").unwrap();
    // The move changes both parents' link counts in memory; the device takes none of it.
    dev.fail_next_apply(Fault::Io { after_ops: 0 });
    assert_eq!(t.rename("a/sub", "b/sub"), Err(libc::EIO));
    // Before, this create wrote a's inode with the link count of the move that failed.
    assert_eq!(t.create("a/x"), Err(libc::EIO));
    assert_eq!(t.rmdir("a/sub"), Err(libc::EIO));
    t.remount().unwrap();
    fsck(t.fs()).unwrap();
    assert_eq!(t.list("a").unwrap(), ["sub"]);
    assert_eq!(t.read_all("b/kept").unwrap(), b"fsynced");
}

#[test]
fn a_write_that_timed_out_applying_nothing_may_be_retried() {
    let dev = FlakyDevice::new(4096);
    let mut t = CoreTarget::new(dev.clone(), small_params());
    t.create("f").unwrap();
    t.write("f", 0, b"one").unwrap();
    dev.fail_next_apply(Fault::Timeout);
    assert_eq!(t.write("f", 3, b"two"), Err(libc::ETIMEDOUT));
    assert!(!t.fs().failed());
    t.write("f", 3, b"two").unwrap();
    t.create("g").unwrap();
    t.remount().unwrap();
    fsck(t.fs()).unwrap();
    assert_eq!(t.read_all("f").unwrap(), b"onetwo");
}

/// An unlink, a rename over a name and an rmdir whose name change reached the device are
/// done, even when freeing the inode they unlinked then fails: the caller is told success
/// (an error would say they had not happened), the names are as they said, changes go on,
/// and the next mount frees the orphans.
#[test]
fn a_name_removed_is_reported_done_when_freeing_its_inode_fails() {
    let dev = FlakyDevice::new(4096);
    let mut t = CoreTarget::new(dev.clone(), small_params());
    t.create("a").unwrap();
    t.write("a", 0, b"aaaa").unwrap();
    t.create("b").unwrap();
    t.write("b", 0, b"bbbb").unwrap();
    t.create("c").unwrap();
    t.write("c", 0, b"cccc").unwrap();
    t.mkdir("e").unwrap();
    // Each time the name change goes through and the free that follows times out.
    dev.fail_apply_after(1, Fault::Timeout);
    assert_eq!(t.unlink("a"), Ok(()));
    dev.fail_apply_after(1, Fault::Timeout);
    assert_eq!(t.rename("b", "c"), Ok(()));
    dev.fail_apply_after(1, Fault::Timeout);
    assert_eq!(t.rmdir("e"), Ok(()));
    assert_eq!(t.kind("a"), Err(libc::ENOENT));
    assert_eq!(t.kind("b"), Err(libc::ENOENT));
    assert_eq!(t.read_all("c").unwrap(), b"bbbb");
    assert_eq!(t.kind("e"), Err(libc::ENOENT));
    assert!(!t.fs().failed());
    t.create("d").unwrap();
    t.remount().unwrap();
    fsck(t.fs()).unwrap();
    assert_eq!(t.list("").unwrap(), ["c", "d"]);
    assert_eq!(t.read_all("c").unwrap(), b"bbbb");
}

/// A metadata change that timed out, whose reload from the device then fails too (the link
/// still down): memory may be ahead of the device, so changes are refused (ETIMEDOUT) while
/// a reload still fails, and go on once one works, from the device's state (the change
/// that timed out is not there). (Before, one such reload entered the failed state: EIO
/// for every change until the next mount.)
#[test]
fn a_timed_out_change_whose_reload_fails_waits_for_a_reload_that_works() {
    let dev = FlakyDevice::new(4096);
    let mut t = CoreTarget::new(dev.clone(), small_params());
    t.create("kept").unwrap();
    t.write("kept", 0, b"kept").unwrap();
    dev.fail_next_apply(Fault::Timeout);
    dev.fail_reads(true);
    assert_eq!(t.create("lost"), Err(libc::ETIMEDOUT));
    assert!(!t.fs().failed());
    assert_eq!(t.create("other"), Err(libc::ETIMEDOUT), "the reload still fails");
    dev.fail_reads(false);
    t.create("other").unwrap();
    t.write("kept", 0, b"KEPT").unwrap();
    assert_eq!(t.list("").unwrap(), ["kept", "other"]);
    fsck(t.fs()).unwrap();
    assert_eq!(t.read_all("kept").unwrap(), b"KEPT");
    t.remount().unwrap();
    fsck(t.fs()).unwrap();
    assert_eq!(t.list("").unwrap(), ["kept", "other"]);
    assert_eq!(t.read_all("kept").unwrap(), b"KEPT");
}

/// An open file's unlink times out and the reload that would undo it in memory fails
/// too (ETIMEDOUT: not done). When the file is closed, after the link is back, the state
/// is reloaded first and shows the file still linked: it is not freed (it was, under its
/// name, on the stale decision: its data gone, its inode free for another file).
#[test]
fn closing_a_file_whose_unlink_timed_out_keeps_it() {
    let dev = FlakyDevice::new(4096);
    let mut t = CoreTarget::new(dev.clone(), small_params());
    t.create("a").unwrap();
    t.write("a", 0, b"still here").unwrap();
    let ino = t.resolve("a").unwrap();
    t.fs().open(ino).unwrap();
    dev.fail_next_apply(Fault::Timeout);
    dev.fail_reads(true);
    assert_eq!(t.unlink("a"), Err(libc::ETIMEDOUT));
    dev.fail_reads(false);
    t.fs().release(ino).unwrap();
    assert_eq!(t.read_all("a").unwrap(), b"still here");
    fsck(t.fs()).unwrap();
    t.remount().unwrap();
    fsck(t.fs()).unwrap();
    assert_eq!(t.read_all("a").unwrap(), b"still here");
}

#[test]
fn a_metadata_change_that_timed_out_is_undone_in_memory_and_changes_go_on() {
    let dev = FlakyDevice::new(4096);
    let mut t = CoreTarget::new(dev.clone(), small_params());
    t.mkdir("d").unwrap();
    t.create("d/kept").unwrap();
    t.write("d/kept", 0, b"kept").unwrap();
    // Use up the inodes below the high-water mark (32 a table block; 0, the root, d and
    // d/kept are taken), so the create that times out raises it in memory.
    for i in 0..28 {
        t.create(&format!("f{i}")).unwrap();
    }
    dev.fail_next_apply(Fault::Timeout);
    assert_eq!(t.create("d/a"), Err(libc::ETIMEDOUT));
    // Before, the timeout entered the failed state: EIO for every change until a remount.
    assert!(!t.fs().failed());
    assert_eq!(t.kind("d/a"), Err(libc::ENOENT));
    t.create("d/b").unwrap();
    t.mkdir("e").unwrap();
    // The other metadata operations too.
    for op in 0..4 {
        dev.fail_next_apply(Fault::Timeout);
        let r = match op {
            0 => t.rename("d/kept", "moved"),
            1 => t.unlink("f0"),
            2 => t.rmdir("e"),
            _ => t.mkdir("d/sub"),
        };
        assert_eq!(r, Err(libc::ETIMEDOUT), "{op}");
        assert!(!t.fs().failed());
    }
    assert_eq!(t.list("d").unwrap(), ["b", "kept"]);
    assert_eq!(t.read_all("d/kept").unwrap(), b"kept");
    assert_eq!(t.kind("f0"), Ok(NodeKind::File));
    assert_eq!(t.kind("e"), Ok(NodeKind::Dir));
    fsck(t.fs()).unwrap();
    t.rename("d/kept", "moved").unwrap();
    t.unlink("f0").unwrap();
    t.remount().unwrap();
    fsck(t.fs()).unwrap();
    assert_eq!(t.kind("d/a"), Err(libc::ENOENT));
    assert_eq!(t.kind("d/b"), Ok(NodeKind::File));
    assert_eq!(t.read_all("moved").unwrap(), b"kept");
    assert_eq!(t.kind("f0"), Err(libc::ENOENT));
}
