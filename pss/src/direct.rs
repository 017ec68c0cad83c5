//! Appending to a file around the page cache (`O_DIRECT`), for the Raft log and the blob
//! segments: data that is written once, fsynced, and read back rarely.
//!
//! Why: a buffered write copies every byte into a page-cache page the kernel has to
//! allocate, and on a VM whose idle memory is handed back to the host (this one: DAMON
//! page-out and free page reporting), every such page is a host fault too: writing 2 GB
//! into fresh page cache cost ~10 us of CPU per 4 KiB page here (`dd`), 40% of a loaded
//! PSS node's CPU, against ~1 us with `O_DIRECT` from a buffer that stays in use. Direct
//! I/O also keeps the log out of the cache that block reads want.
//!
//! `O_DIRECT` needs the file offset, length and buffer address aligned to the device's
//! block; appends are not. So the appender keeps the file's last partial block in memory
//! and each append rewrites it: it writes `[partial block][new bytes][zero padding]` from
//! the partial block's start, padded to whole blocks. The file may therefore end in up to
//! one block of zeros past the logical end; readers stop at the logical end or at a zero
//! record header, and [`Appender::trim`] cuts the padding when a file is closed for good.
//! Where `O_DIRECT` is refused (tmpfs), the appender writes through the page cache instead.

use std::alloc::Layout;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::Path;

/// Alignment of offsets, lengths and buffers of direct writes, in bytes (a multiple of
/// every common logical block size).
pub const BLOCK: usize = 4096;

/// A buffer whose start is aligned to [`BLOCK`].
struct Aligned {
    ptr: std::ptr::NonNull<u8>,
    cap: usize,
}

// SAFETY: `Aligned` owns its allocation exclusively, like a `Vec<u8>`.
unsafe impl Send for Aligned {}
unsafe impl Sync for Aligned {}

impl Aligned {
    /// An uninitialized buffer of at least `cap` bytes (not zeroed: zeroing a fresh
    /// multi-MiB buffer faulted in every page of it; every byte written out is filled
    /// first, see [`Aligned::fill`]).
    fn new(cap: usize) -> Self {
        let cap = cap.max(BLOCK).next_multiple_of(BLOCK);
        let layout = Layout::from_size_align(cap, BLOCK).expect("a valid layout");
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { std::alloc::alloc(layout) };
        let Some(ptr) = std::ptr::NonNull::new(ptr) else { std::alloc::handle_alloc_error(layout) };
        Self { ptr, cap }
    }

    /// Writes `head`, then `data`, then zeros up to `len` bytes (`len <= cap`, and at
    /// least `head` and `data` long), and returns those `len` bytes.
    fn fill(&mut self, head: &[u8], data: &[u8], len: usize) -> &[u8] {
        let used = head.len() + data.len();
        assert!(used <= len && len <= self.cap, "aligned buffer overrun");
        let p = self.ptr.as_ptr();
        // SAFETY: every write is within the `cap` bytes we own (checked above); the slice
        // returned covers only bytes written here.
        unsafe {
            std::ptr::copy_nonoverlapping(head.as_ptr(), p, head.len());
            std::ptr::copy_nonoverlapping(data.as_ptr(), p.add(head.len()), data.len());
            std::ptr::write_bytes(p.add(used), 0, len - used);
            std::slice::from_raw_parts(p, len)
        }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.cap, BLOCK).expect("a valid layout");
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) }
    }
}

/// Most bytes one direct write carries (a larger append is written in pieces).
const WRITE_BYTES: usize = 4 << 20;

/// Largest write buffer kept between appends, in bytes (a larger one is freed after use):
/// a group of write-back batches is often tens of MiB, and a fresh buffer that size is
/// fresh pages the kernel (and here the host) has to fault in.
const KEEP_BUFFER_BYTES: usize = 32 << 20;

/// An append-only writer of one file, `O_DIRECT` where the file system allows it.
pub struct Appender {
    file: File,
    direct: bool,
    /// The logical end: where the next byte goes.
    len: u64,
    /// The bytes of the block that holds `len` (`len % BLOCK` of them), direct mode only.
    tail: Vec<u8>,
    buf: Option<Aligned>,
}

impl Appender {
    /// Opens `path` (which must exist) for appending at `len`, its logical end.
    /// `direct`: try `O_DIRECT` (falls back to the page cache where it is refused).
    pub fn open(path: &Path, len: u64, direct: bool) -> io::Result<Self> {
        let mut file = None;
        if direct {
            match OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(path) {
                Ok(f) => file = Some(f),
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    tracing::debug!(path = %path.display(), "O_DIRECT refused here: writing through the page cache");
                }
                Err(e) => return Err(e),
            }
        }
        let direct = file.is_some();
        let file = match file {
            Some(f) => f,
            None => OpenOptions::new().write(true).open(path)?,
        };
        let mut tail = Vec::new();
        if direct {
            let keep = (len % BLOCK as u64) as usize;
            if keep > 0 {
                tail.resize(keep, 0);
                File::open(path)?.read_exact_at(&mut tail, len - keep as u64)?;
            }
        }
        Ok(Self { file, direct, len, tail, buf: None })
    }

    /// Whether writes bypass the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// The logical end.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `data` at the logical end (on an error the file's tail is unknown: the
    /// caller stops using it).
    pub fn append(&mut self, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        if !self.direct {
            self.file.write_all_at(data, self.len)?;
            self.len += data.len() as u64;
            return Ok(());
        }
        // In pieces, so the aligned buffer stays small enough to be kept.
        for piece in data.chunks(WRITE_BYTES) {
            self.append_direct(piece)?;
        }
        Ok(())
    }

    fn append_direct(&mut self, data: &[u8]) -> io::Result<()> {
        let start = self.len - self.tail.len() as u64;
        let used = self.tail.len() + data.len();
        let padded = used.next_multiple_of(BLOCK);
        let mut buf = match self.buf.take() {
            Some(b) if b.cap >= padded => b,
            // Grown geometrically, so a rising write size allocates a few times, not each.
            Some(b) => Aligned::new(padded.max(b.cap * 2)),
            None => Aligned::new(padded),
        };
        let out = buf.fill(&self.tail, data, padded);
        let written = self.file.write_all_at(out, start);
        let keep = used % BLOCK;
        self.tail.clear();
        self.tail.extend_from_slice(&out[used - keep..used]);
        if buf.cap <= KEEP_BUFFER_BYTES {
            self.buf = Some(buf);
        }
        written?;
        self.len += data.len() as u64;
        Ok(())
    }

    /// Cuts the padding past the logical end (before the file is closed for good).
    pub fn trim(&self) -> io::Result<()> {
        if self.direct {
            self.file.set_len(self.len)?;
        }
        Ok(())
    }

    /// `fdatasync`: everything appended is durable when it returns.
    pub fn sync_data(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Another handle to the file, for an fsync on another thread.
    pub fn try_clone_file(&self) -> io::Result<File> {
        self.file.try_clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn on_tmpfs(path: &Path) -> bool {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid C string and a zeroed statfs for the call to fill.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type == libc::TMPFS_MAGIC }
    }

    fn check_modes(mut f: impl FnMut(bool)) {
        f(true);
        f(false);
    }

    #[test]
    fn unaligned_appends_read_back_in_either_mode_and_reopen_mid_block() {
        check_modes(|direct| {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("f");
            File::create(&path).unwrap();
            let mut a = Appender::open(&path, 0, direct).unwrap();
            // Where the file system has O_DIRECT (ext4 on this machine and in CI) the direct
            // path must be the one taken; tmpfs has none (said, and the fallback is tested).
            if direct && !a.is_direct() {
                assert!(on_tmpfs(dir.path()), "O_DIRECT refused on {}", dir.path().display());
                eprintln!("SKIP the O_DIRECT path: {} is tmpfs", dir.path().display());
            }
            let mut want = Vec::new();
            for (i, n) in [1usize, 4095, 4096, 5000, 3, 9000].into_iter().enumerate() {
                let chunk = vec![i as u8 + 1; n];
                a.append(&chunk).unwrap();
                want.extend_from_slice(&chunk);
            }
            a.sync_data().unwrap();
            let got = std::fs::read(&path).unwrap();
            assert_eq!(&got[..want.len()], &want[..]);
            assert!(got[want.len()..].iter().all(|&b| b == 0), "only zero padding past the end");
            assert!(got.len() - want.len() < BLOCK);
            drop(a);
            // Reopened in the middle of a block: the partial block is carried on.
            let mut a = Appender::open(&path, want.len() as u64, direct).unwrap();
            a.append(b"tail").unwrap();
            want.extend_from_slice(b"tail");
            a.trim().unwrap();
            assert_eq!(std::fs::read(&path).unwrap(), want, "trim leaves exactly the data");
        });
    }
}
