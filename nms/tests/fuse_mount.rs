//! Real FUSE mounts of a wayside volume: the `nms mount` binary over real NMSs (in-process
//! `wayside_nms::server::run`) and a real PSS (`wayside_pss::testing::LocalCluster`, Raft on
//! disk), all over loopback gRPC. Needs /dev/fuse and root; skips visibly otherwise.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use wayside_nms::fuse::fsx::{self, FsxConfig, NodeKind, Target};
use wayside_nms::fuse::mount::is_mounted;

const CREDENTIAL: &str = "fuse-test-secret";

fn fuse_usable() -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !Path::new("/dev/fuse").exists() || !root {
        eprintln!(
            "SKIP: FUSE mount tests need /dev/fuse and root (have /dev/fuse: {}, root: {root})",
            Path::new("/dev/fuse").exists()
        );
        return false;
    }
    true
}

/// A PSS cluster and NMS nodes in this process.
struct Env {
    rt: tokio::runtime::Runtime,
    dir: tempfile::TempDir,
    cluster: Option<wayside_pss::testing::LocalCluster>,
    nms: Vec<Nms>,
}

struct Nms {
    addr: String,
    shutdown: CancellationToken,
}

impl Env {
    fn start(nms_nodes: usize) -> Env {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cluster = rt
            .block_on(wayside_pss::testing::LocalCluster::start(1, &dir.path().join("pss")))
            .unwrap();
        let pss: Vec<String> =
            cluster.endpoints().iter().map(|e| e.authority().to_string()).collect();
        let mut nms = Vec::new();
        for i in 0..nms_nodes {
            let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
            let addr = listener.local_addr().unwrap().to_string();
            let config = wayside_nms::config::Config {
                node_id: format!("nms-{i}"),
                listen: addr.clone(),
                pss: pss.clone(),
                ..Default::default()
            };
            let shutdown = CancellationToken::new();
            rt.spawn(wayside_nms::server::run(config, listener, shutdown.clone()));
            nms.push(Nms { addr, shutdown });
        }
        Env { rt, dir, cluster: Some(cluster), nms }
    }

    fn path(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        fs::create_dir_all(&p).unwrap();
        p
    }

    /// Moves `volume` from NMS `from` to NMS `to` (NmsAdmin.StartMigration).
    fn migrate(&self, volume: &str, from: usize, to: usize) -> wayside_proto::pb::MigrationReport {
        let from = format!("http://{}", self.nms[from].addr);
        let target = self.nms[to].addr.clone();
        self.rt.block_on(async move {
            let mut admin =
                wayside_proto::pb::nms_admin_client::NmsAdminClient::connect(from).await.unwrap();
            admin
                .start_migration(wayside_proto::pb::StartMigrationRequest {
                    volume: volume.to_string(),
                    target_address: target,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
        })
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for n in &self.nms {
            n.shutdown.cancel();
        }
        if let Some(c) = self.cluster.take() {
            self.rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(10), c.shutdown()).await.ok()
            });
        }
    }
}

/// A TCP relay between the mount and an NMS that the test can cut (the radio link dropping).
struct Link {
    addr: String,
    up: Arc<AtomicBool>,
    cut: Arc<tokio::sync::Notify>,
}

impl Link {
    fn start(env: &Env, to: &str) -> Link {
        let listener = env.rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let up = Arc::new(AtomicBool::new(true));
        let cut = Arc::new(tokio::sync::Notify::new());
        let (up2, cut2, to) = (up.clone(), cut.clone(), to.to_string());
        env.rt.spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else { return };
                if !up2.load(Ordering::SeqCst) {
                    continue; // dropped: the link is down
                }
                let (to, cut) = (to.clone(), cut2.clone());
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(&to).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.notified() => {}
                    }
                });
            }
        });
        Link { addr, up, cut }
    }

    fn set_up(&self, up: bool) {
        self.up.store(up, Ordering::SeqCst);
        if !up {
            self.cut.notify_waiters();
        }
    }
}

/// One `nms mount` process; unmounted (with a deadline) and reaped on drop.
struct Mount {
    child: Option<Child>,
    point: PathBuf,
}

fn spawn_mount(volume: &str, nms: &str, point: &Path, cache: &Path, extra: &[&str]) -> Mount {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_nms"));
    cmd.args(["mount", "--volume", volume, "--nms", nms, "--cache-dir"])
        .arg(cache)
        .args([
            "--create-block-size",
            "16384",
            "--max-inodes",
            "65536",
            "--file-stride-blocks",
            "65536",
        ])
        .args(extra)
        .arg(point)
        .env("WAYSIDE_CREDENTIAL", CREDENTIAL)
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .stdin(Stdio::null());
    let child = cmd.spawn().expect("spawn nms mount");
    let mut m = Mount { child: Some(child), point: point.to_path_buf() };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !is_mounted(point) {
        if let Some(status) = m.child.as_mut().unwrap().try_wait().unwrap() {
            m.child = None;
            panic!("nms mount exited before mounting: {status}");
        }
        assert!(Instant::now() < deadline, "not mounted within 30 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    m
}

impl Mount {
    /// `nms umount`, then the process drains and exits by itself.
    fn unmount(mut self) {
        let status = Command::new(env!("CARGO_BIN_EXE_nms"))
            .arg("umount")
            .arg(&self.point)
            .status()
            .unwrap();
        assert!(status.success(), "nms umount failed");
        let mut child = self.child.take().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success(), "nms mount exited with {status}");
                break;
            }
            assert!(Instant::now() < deadline, "nms mount did not exit within 30 s of the unmount");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!is_mounted(&self.point));
    }

    fn kill9(&mut self) {
        let mut child = self.child.take().unwrap();
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // The kernel keeps a dead mount (ENOTCONN) until it is detached.
        let _ = wayside_nms::fuse::mount::umount(&self.point, true);
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new(env!("CARGO_BIN_EXE_nms")).arg("umount").arg(&self.point).status();
            let deadline = Instant::now() + Duration::from_secs(15);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        if is_mounted(&self.point) {
            let _ = wayside_nms::fuse::mount::umount(&self.point, true);
        }
    }
}

/// Everything under `root`: path -> (kind, mode, content or target).
fn snapshot(root: &Path) -> BTreeMap<String, (String, u32, Vec<u8>)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let p = e.path();
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().to_string();
            let md = fs::symlink_metadata(&p).unwrap();
            let mode = md.permissions().mode() & 0o7777;
            if md.file_type().is_symlink() {
                out.insert(
                    rel,
                    ("link".into(), 0, fs::read_link(&p).unwrap().as_os_str().as_bytes().to_vec()),
                );
            } else if md.is_dir() {
                out.insert(rel, ("dir".into(), mode, Vec::new()));
                stack.push(p);
            } else {
                out.insert(rel, ("file".into(), mode, fs::read(&p).unwrap()));
            }
        }
    }
    out
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn a_tree_reads_back_identical_after_remount_through_another_nms() {
    if !fuse_usable() {
        return;
    }
    let env = Env::start(2);
    let point = env.path("mnt");
    let m = spawn_mount("tree", &env.nms[0].addr, &point, &env.path("cache-a"), &[]);
    fs::create_dir_all(point.join("docs/deep/er")).unwrap();
    fs::write(point.join("docs/readme.txt"), b"hello wayside\n").unwrap();
    fs::write(point.join("docs/deep/er/big.bin"), pattern(1, 2 << 20)).unwrap();
    fs::write(point.join("empty"), b"").unwrap();
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(point.join("sparse"))
        .unwrap();
    f.write_all_at(b"tail", 1_000_000).unwrap();
    drop(f);
    fs::write(point.join("cut"), pattern(2, 100_000)).unwrap();
    OpenOptions::new().write(true).open(point.join("cut")).unwrap().set_len(40_000).unwrap();
    std::os::unix::fs::symlink("docs/readme.txt", point.join("link")).unwrap();
    fs::set_permissions(point.join("docs/readme.txt"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(point.join("moved-from"), b"x").unwrap();
    fs::rename(point.join("moved-from"), point.join("docs/deep/moved-to")).unwrap();
    for i in 0..100 {
        fs::write(point.join(format!("docs/many-{i:03}")), format!("file {i}")).unwrap();
    }
    fs::remove_file(point.join("docs/many-050")).unwrap();
    let before = snapshot(&point);
    assert_eq!(before.len(), 3 + 7 + 99, "{:?}", before.keys().collect::<Vec<_>>());
    assert_eq!(before["link"].2, b"docs/readme.txt");
    m.unmount();

    // A fresh OBU cache, through the other NMS: everything must come from the volume.
    let m = spawn_mount("tree", &env.nms[1].addr, &point, &env.path("cache-b"), &[]);
    let after = snapshot(&point);
    assert_eq!(before.keys().collect::<Vec<_>>(), after.keys().collect::<Vec<_>>());
    for (k, v) in &before {
        assert!(after[k] == *v, "{k} differs after remount");
    }
    assert_eq!(fs::read(point.join("link")).unwrap(), b"hello wayside\n");
    m.unmount();
}

/// An inode number freed while the kernel still holds the dead inode (a directory removed
/// while a process has it open) and given to a new directory: the new one has another
/// generation, so the kernel does not take it for the dead one, and files can be made in it.
#[test]
fn a_directory_made_on_a_removed_ones_inode_number_is_usable() {
    if !fuse_usable() {
        return;
    }
    let env = Env::start(1);
    let point = env.path("mnt");
    let m = spawn_mount("reuse", &env.nms[0].addr, &point, &env.path("cache"), &[]);
    fs::create_dir(point.join("d")).unwrap();
    let held = fs::File::open(point.join("d")).unwrap();
    let ino = held.metadata().unwrap().ino();
    fs::remove_dir(point.join("d")).unwrap();
    fs::create_dir(point.join("e")).unwrap();
    assert_eq!(fs::metadata(point.join("e")).unwrap().ino(), ino, "the number is given again");
    fs::write(point.join("e/x"), b"x").expect("a file made in the new directory");
    assert_eq!(fs::read(point.join("e/x")).unwrap(), b"x");
    drop(held);
    // No extended attributes and no space reservation: applications see EOPNOTSUPP (the
    // mount answers the kernel ENOSYS, which it remembers and turns into EOPNOTSUPP).
    let path = std::ffi::CString::new(point.join("e/x").as_os_str().as_bytes()).unwrap();
    let name = std::ffi::CString::new("user.test").unwrap();
    for _ in 0..2 {
        // SAFETY: valid C strings; a null buffer of size 0 asks for the value's size.
        let r = unsafe { libc::getxattr(path.as_ptr(), name.as_ptr(), std::ptr::null_mut(), 0) };
        let e = std::io::Error::last_os_error();
        assert_eq!((r, e.raw_os_error()), (-1, Some(libc::EOPNOTSUPP)), "getxattr: {e}");
    }
    let f = OpenOptions::new().write(true).open(point.join("e/x")).unwrap();
    // SAFETY: a valid open descriptor.
    let r = unsafe { libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(&f), 0, 0, 4096) };
    let e = std::io::Error::last_os_error();
    assert_eq!((r, e.raw_os_error()), (-1, Some(libc::EOPNOTSUPP)), "fallocate: {e}");
    drop(f);
    m.unmount();
}

/// fsx through the real mount: `std::fs` calls against the model.
struct MountTarget<'a> {
    env: &'a Env,
    mount: Option<Mount>,
    point: PathBuf,
    cache: PathBuf,
}

fn errno<T>(r: std::io::Result<T>) -> Result<T, i32> {
    r.map_err(|e| e.raw_os_error().unwrap_or(-1))
}

impl MountTarget<'_> {
    fn p(&self, path: &str) -> PathBuf {
        self.point.join(path)
    }
}

impl Target for MountTarget<'_> {
    fn create(&mut self, path: &str) -> Result<(), i32> {
        errno(OpenOptions::new().write(true).create_new(true).open(self.p(path))).map(drop)
    }
    fn mkdir(&mut self, path: &str) -> Result<(), i32> {
        errno(fs::create_dir(self.p(path)))
    }
    fn symlink(&mut self, target: &[u8], path: &str) -> Result<(), i32> {
        errno(std::os::unix::fs::symlink(OsStr::from_bytes(target), self.p(path)))
    }
    fn readlink(&mut self, path: &str) -> Result<Vec<u8>, i32> {
        errno(fs::read_link(self.p(path))).map(|t| t.as_os_str().as_bytes().to_vec())
    }
    fn write(&mut self, path: &str, offset: u64, data: &[u8]) -> Result<(), i32> {
        let f = errno(OpenOptions::new().write(true).open(self.p(path)))?;
        errno(f.write_all_at(data, offset))
    }
    fn truncate(&mut self, path: &str, size: u64) -> Result<(), i32> {
        let f = errno(OpenOptions::new().write(true).open(self.p(path)))?;
        errno(f.set_len(size))
    }
    fn read_all(&mut self, path: &str) -> Result<Vec<u8>, i32> {
        errno(fs::read(self.p(path)))
    }
    fn read_at(&mut self, path: &str, offset: u64, len: usize) -> Result<Vec<u8>, i32> {
        let f = errno(File::open(self.p(path)))?;
        let mut buf = vec![0; len];
        let mut got = 0;
        while got < len {
            let n = errno(f.read_at(&mut buf[got..], offset + got as u64))?;
            if n == 0 {
                break;
            }
            got += n;
        }
        buf.truncate(got);
        Ok(buf)
    }
    fn rename(&mut self, from: &str, to: &str) -> Result<(), i32> {
        errno(fs::rename(self.p(from), self.p(to)))
    }
    fn unlink(&mut self, path: &str) -> Result<(), i32> {
        errno(fs::remove_file(self.p(path)))
    }
    fn rmdir(&mut self, path: &str) -> Result<(), i32> {
        errno(fs::remove_dir(self.p(path)))
    }
    fn list(&mut self, path: &str) -> Result<Vec<String>, i32> {
        let mut names: Vec<String> = errno(fs::read_dir(self.p(path)))?
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        names.sort();
        Ok(names)
    }
    fn kind(&mut self, path: &str) -> Result<NodeKind, i32> {
        let md = errno(fs::symlink_metadata(self.p(path)))?;
        Ok(if md.file_type().is_symlink() {
            NodeKind::Symlink
        } else if md.is_dir() {
            NodeKind::Dir
        } else {
            NodeKind::File
        })
    }
    fn fsync(&mut self, path: &str) -> Result<(), i32> {
        errno(errno(File::open(self.p(path)))?.sync_all())
    }
    fn remount(&mut self) -> Result<(), String> {
        self.mount.take().expect("mounted").unmount();
        self.mount = Some(spawn_mount("fsx", &self.env.nms[0].addr, &self.point, &self.cache, &[]));
        Ok(())
    }
}

#[test]
fn fsx_thousands_of_random_operations_through_the_mount_match_the_model() {
    if !fuse_usable() {
        return;
    }
    let env = Env::start(1);
    let point = env.path("mnt");
    let cache = env.path("cache");
    let mount = spawn_mount("fsx", &env.nms[0].addr, &point, &cache, &[]);
    let mut t = MountTarget { env: &env, mount: Some(mount), point, cache };
    let cfg = FsxConfig {
        seed: 42,
        steps: 2000,
        max_file_bytes: 300_000,
        max_write_bytes: 70_000,
        remount_every: 700,
    };
    let started = Instant::now();
    let result = fsx::run(&mut t, cfg);
    eprintln!("fsx: {} steps in {:?}", cfg.steps, started.elapsed());
    result.unwrap();
    t.mount.take().unwrap().unmount();
}

#[test]
fn a_long_write_completes_while_the_volume_moves_between_nmss() {
    if !fuse_usable() {
        return;
    }
    let env = Env::start(2);
    let point = env.path("mnt");
    // Both NMSs are listed; the redirect after the move leads to the second one anyway.
    let nms = format!("{},{}", env.nms[0].addr, env.nms[1].addr);
    let m = spawn_mount("moving", &nms, &point, &env.path("cache"), &[]);
    let data = Arc::new(pattern(7, 12 << 20));
    let written = Arc::new(AtomicU64::new(0));
    let writer = {
        let (data, written, path) = (data.clone(), written.clone(), point.join("long.bin"));
        std::thread::spawn(move || {
            let mut f = File::create(&path).unwrap();
            for chunk in data.chunks(128 << 10) {
                f.write_all(chunk).unwrap();
                written.fetch_add(chunk.len() as u64, Ordering::SeqCst);
            }
            f.sync_all().unwrap();
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while written.load(Ordering::SeqCst) < 2 << 20 {
        assert!(
            Instant::now() < deadline && !writer.is_finished(),
            "the writer stalled before the move"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let at_move = written.load(Ordering::SeqCst);
    let report = env.migrate("moving", 0, 1);
    assert_eq!(report.outcome, wayside_proto::pb::MigrationOutcome::Completed as i32, "{report:?}");
    writer.join().expect("the write failed during the move");
    assert!(at_move < data.len() as u64, "the move happened mid-write");
    let mut got = Vec::new();
    File::open(point.join("long.bin")).unwrap().read_to_end(&mut got).unwrap();
    assert!(got == *data, "content differs after the move");
    m.unmount();
    // And from the volume itself, through the new owner, with a fresh cache.
    let m = spawn_mount("moving", &env.nms[1].addr, &point, &env.path("cache-2"), &[]);
    assert!(fs::read(point.join("long.bin")).unwrap() == *data);
    m.unmount();
}

/// A read waiting on an unreachable volume (its blocks not cached) holds up no other
/// operation of the mount: it waited under the file system's one lock for up to twice the
/// operation timeout, and every other request (a create, a stat) waited behind it.
#[test]
fn a_read_waiting_on_the_network_holds_up_no_other_operation() {
    if !fuse_usable() {
        return;
    }
    let env = Env::start(1);
    let link = Link::start(&env, &env.nms[0].addr);
    let point = env.path("mnt");
    let args = ["--op-timeout-ms", "4000", "--fuse-threads", "4"];
    let m = spawn_mount("waits", &link.addr, &point, &env.path("cache-1"), &args);
    let data = pattern(3, 256 << 10);
    fs::write(point.join("big.bin"), &data).unwrap();
    File::open(point.join("big.bin")).unwrap().sync_all().unwrap();
    m.unmount();
    // A fresh cache: the file's blocks are only in the volume.
    let m = spawn_mount("waits", &link.addr, &point, &env.path("cache-2"), &args);
    assert_eq!(fs::metadata(point.join("big.bin")).unwrap().len(), data.len() as u64);
    link.set_up(false);
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (path, done) = (point.join("big.bin"), done.clone());
        std::thread::spawn(move || {
            let r = fs::read(path);
            done.store(true, Ordering::SeqCst);
            r
        })
    };
    // Creates (journalled locally, the link being down) while the read waits.
    let (mut made, mut during) = (0, 0);
    while !done.load(Ordering::SeqCst) && made < 200 {
        let t = Instant::now();
        fs::write(point.join(format!("b{made}")), b"x").unwrap();
        let took = t.elapsed();
        assert!(took < Duration::from_secs(2), "a create waited {took:?} behind the read");
        made += 1;
        if !done.load(Ordering::SeqCst) {
            during += 1;
        }
    }
    let read = reader.join().unwrap();
    assert_eq!(read.unwrap_err().raw_os_error(), Some(libc::ETIMEDOUT));
    assert!(during > 0, "no create while the read waited");
    link.set_up(true);
    assert!(fs::read(point.join("big.bin")).unwrap() == data);
    m.unmount();
}

/// A write waiting for journal room (the volume unreachable, the journal full) holds up
/// no other operation of the mount: it waited under the file system's one lock for up to
/// the operation timeout, and every other request (a stat, a listing) waited behind it.
#[test]
fn a_write_waiting_for_journal_room_holds_up_no_other_operation() {
    if !fuse_usable() {
        return;
    }
    let env = Env::start(1);
    let link = Link::start(&env, &env.nms[0].addr);
    let point = env.path("mnt");
    let args =
        ["--op-timeout-ms", "4000", "--fuse-threads", "4", "--journal-limit-bytes", "1048576"];
    let m = spawn_mount("room", &link.addr, &point, &env.path("cache"), &args);
    fs::write(point.join("other"), b"x").unwrap();
    File::open(point.join("other")).unwrap().sync_all().unwrap();
    link.set_up(false);
    let done = Arc::new(AtomicBool::new(false));
    let writer = {
        let (path, done) = (point.join("big.bin"), done.clone());
        std::thread::spawn(move || {
            // Four times the journal's limit: the writes past it wait, and time out.
            let r = fs::write(path, pattern(4, 4 << 20));
            done.store(true, Ordering::SeqCst);
            r
        })
    };
    let (mut looked, mut during) = (0, 0);
    while !done.load(Ordering::SeqCst) && looked < 10_000 {
        let t = Instant::now();
        assert_eq!(fs::metadata(point.join("other")).unwrap().len(), 1);
        assert!(fs::read_dir(&point).unwrap().count() >= 1);
        let took = t.elapsed();
        assert!(took < Duration::from_secs(2), "a stat waited {took:?} behind the write");
        looked += 1;
        if !done.load(Ordering::SeqCst) {
            during += 1;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let wrote = writer.join().unwrap();
    assert_eq!(wrote.unwrap_err().raw_os_error(), Some(libc::ETIMEDOUT));
    assert!(during > 0, "no stat while the write waited");
    link.set_up(true);
    File::open(point.join("other")).unwrap().sync_all().unwrap();
    m.unmount();
}

#[test]
fn with_the_nms_unreachable_writes_are_journalled_and_reach_the_pss_later() {
    if !fuse_usable() {
        return;
    }
    let env = Env::start(2);
    let link = Link::start(&env, &env.nms[0].addr);
    let point = env.path("mnt");
    let m =
        spawn_mount("outage", &link.addr, &point, &env.path("cache"), &["--op-timeout-ms", "1500"]);
    let first = pattern(1, 300_000);
    fs::write(point.join("cached.bin"), &first).unwrap();
    File::open(point.join("cached.bin")).unwrap().sync_all().unwrap();

    link.set_up(false);
    // Writes keep being accepted (into the local journal); cached data reads back.
    let second = pattern(2, 500_000);
    fs::write(point.join("during.bin"), &second).unwrap();
    fs::create_dir(point.join("made-offline")).unwrap();
    OpenOptions::new()
        .write(true)
        .open(point.join("cached.bin"))
        .unwrap()
        .write_all_at(b"patched", 10)
        .unwrap();
    let mut want_first = first.clone();
    want_first[10..17].copy_from_slice(b"patched");
    assert!(fs::read(point.join("cached.bin")).unwrap() == want_first);
    assert!(fs::read(point.join("during.bin")).unwrap() == second);
    // The persisted barrier cannot complete: it fails after the timeout rather than hanging.
    let t = Instant::now();
    let err = File::open(point.join("during.bin")).unwrap().sync_all().unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::ETIMEDOUT), "{err}");
    assert!(t.elapsed() < Duration::from_secs(10), "fsync took {:?}", t.elapsed());

    link.set_up(true);
    // The barrier succeeds once the journal has drained (each attempt is bounded by the timeout).
    let t = Instant::now();
    loop {
        match File::open(point.join("during.bin")).unwrap().sync_all() {
            Ok(()) => break,
            Err(e)
                if e.raw_os_error() == Some(libc::ETIMEDOUT)
                    && t.elapsed() < Duration::from_secs(60) => {}
            Err(e) => panic!("fsync after the link came back: {e} (after {:?})", t.elapsed()),
        }
    }
    eprintln!("journal drained {:?} after the link came back", t.elapsed());
    m.unmount();
    // Everything reached the PSS: a fresh cache through the other NMS sees it.
    let m = spawn_mount("outage", &env.nms[1].addr, &point, &env.path("cache-2"), &[]);
    assert!(fs::read(point.join("cached.bin")).unwrap() == want_first);
    assert!(fs::read(point.join("during.bin")).unwrap() == second);
    assert!(point.join("made-offline").is_dir());
    m.unmount();
}

#[test]
fn kill_9_mid_write_then_remount_keeps_every_returned_write() {
    if !fuse_usable() {
        return;
    }
    let env = Env::start(1);
    let link = Link::start(&env, &env.nms[0].addr);
    let point = env.path("mnt");
    let cache = env.path("cache");
    let mut m = spawn_mount("crash", &link.addr, &point, &cache, &["--op-timeout-ms", "2000"]);
    let data = Arc::new(pattern(9, 8 << 20));
    let fsynced = pattern(10, 200_000);
    fs::write(point.join("synced.bin"), &fsynced).unwrap();
    File::open(point.join("synced.bin")).unwrap().sync_all().unwrap();
    // With the link down nothing can reach the volume: whatever survives must come from the journal.
    link.set_up(false);
    let acked = Arc::new(AtomicU64::new(0));
    let writer = {
        let (data, acked, path) = (data.clone(), acked.clone(), point.join("crash.bin"));
        std::thread::spawn(move || {
            let Ok(mut f) = File::create(&path) else { return };
            for chunk in data.chunks(64 << 10) {
                if f.write_all(chunk).is_err() {
                    return;
                }
                acked.fetch_add(chunk.len() as u64, Ordering::SeqCst);
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while acked.load(Ordering::SeqCst) < 1 << 20 {
        assert!(Instant::now() < deadline, "the writer stalled");
        std::thread::sleep(Duration::from_millis(5));
    }
    m.kill9();
    writer.join().unwrap();
    let acked = acked.load(Ordering::SeqCst);
    assert!(
        acked >= 1 << 20 && acked < data.len() as u64,
        "killed mid-write ({acked} bytes acknowledged)"
    );
    link.set_up(true);

    // The same OBU cache directory: the journal is replayed.
    let m = spawn_mount("crash", &link.addr, &point, &cache, &[]);
    let got = fs::read(point.join("crash.bin")).unwrap();
    assert!(
        got.len() as u64 >= acked,
        "{} bytes after remount, {acked} were acknowledged",
        got.len()
    );
    assert!(
        got[..acked as usize] == data[..acked as usize],
        "acknowledged bytes differ after the crash"
    );
    assert!(fs::read(point.join("synced.bin")).unwrap() == fsynced);
    File::open(point.join("crash.bin")).unwrap().sync_all().unwrap();
    m.unmount();
    // And the replay reached the volume: a fresh cache sees it.
    let m = spawn_mount("crash", &env.nms[0].addr, &point, &env.path("cache-2"), &[]);
    let again = fs::read(point.join("crash.bin")).unwrap();
    assert!(again[..acked as usize] == data[..acked as usize]);
    m.unmount();
}

/// `nms mount --tls-ca` reaches an NMS served over TLS (over an in-memory store: the PSS's
/// TLS is the pss crate's); a mount trusting another road's CA exits, naming the handshake.
#[test]
fn a_mount_with_the_roads_ca_reaches_a_tls_nms() {
    if !fuse_usable() {
        return;
    }
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (names, ips) = wayside_proto::tls::pki::loopback();
    let ca = wayside_proto::tls::pki::Ca::new("road").unwrap();
    let tls = ca.write_road(&dir.path().join("nms"), &names, &ips).unwrap();
    let other = wayside_proto::tls::pki::Ca::new("another road").unwrap();
    let other_ca = other.write_road(&dir.path().join("other"), &names, &ips).unwrap().ca.unwrap();
    let road_ca = tls.ca.clone().unwrap();
    let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let config = wayside_nms::config::Config {
        node_id: "nms-tls".into(),
        listen: addr.clone(),
        pss: vec!["127.0.0.1:1".into()],
        tls,
        ..Default::default()
    };
    let stop = CancellationToken::new();
    let store: Arc<dyn wayside_nms::store::Store> =
        Arc::new(wayside_nms::store::MemStore::default());
    rt.spawn(wayside_nms::server::run_with_store(config, listener, stop.clone(), store));
    let vehicle = wayside_proto::tls::Tls::load(&wayside_proto::tls::TlsFiles {
        ca: Some(road_ca.clone()),
        ..Default::default()
    })
    .unwrap()
    .unwrap();
    let https = wayside_proto::types::Endpoint::parse(&format!("https://{addr}")).unwrap();
    rt.block_on(wayside_nms::testing::wait_healthy_tls(&https, Some(&vehicle)));

    let point = dir.path().join("mnt");
    fs::create_dir_all(&point).unwrap();
    let ca_arg = road_ca.to_str().unwrap();
    let m = spawn_mount("tls", &addr, &point, &dir.path().join("c1"), &["--tls-ca", ca_arg]);
    fs::write(point.join("secret.txt"), b"encrypted on the air\n").unwrap();
    m.unmount();
    // A fresh OBU cache: the file comes from the NMS, over TLS.
    let m = spawn_mount("tls", &addr, &point, &dir.path().join("c2"), &["--tls-ca", ca_arg]);
    assert_eq!(fs::read(point.join("secret.txt")).unwrap(), b"encrypted on the air\n");
    m.unmount();

    let out = Command::new(env!("CARGO_BIN_EXE_nms"))
        .args(["mount", "--volume", "tls", "--nms", &addr, "--cache-dir"])
        .arg(dir.path().join("c3"))
        .arg("--tls-ca")
        .arg(&other_ca)
        .arg(&point)
        .env("WAYSIDE_CREDENTIAL", CREDENTIAL)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && !is_mounted(&point));
    assert!(err.contains("TLS handshake failed"), "{err}");
    stop.cancel();
}
