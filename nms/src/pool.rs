//! [`BlockPool`]: block buffers faulted in before they are needed.
//!
//! A block that arrives at an NMS (a vehicle's write, a migration's incoming block) is
//! copied into memory the cache then keeps. Memory a process has never touched costs a
//! page fault per page on its first write: ~0.25 us on bare metal, but 2-10 us in a VM
//! whose host backs guest memory lazily (measured here: 125-165 ms to touch 64 MiB the
//! first time, 20-30 ms for reused pages). A move's target touches as much memory as the
//! volume it takes in, all at once, so on a freshly started NMS the first move ran up to
//! twice as long as later ones.
//!
//! The pool keeps up to `block_pool_bytes` of [`SLOT_BYTES`] buffers ready. A background
//! thread faults them in when the node starts, at idle priority (off the serving threads,
//! on CPU time nothing else wants); a cached block
//! made from a slot gives the slot back when its last reference drops (eviction,
//! overwrite, a volume moved away), so memory once touched is touched again rather than
//! returned to the allocator. When the pool is empty, or a block is larger than a slot,
//! the block is an ordinary heap copy: the pool is never a reason for an error.
//!
//! Cost: the pool's free slots are resident memory on top of the cached blocks, at most
//! `block_pool_bytes`.

use bytes::Bytes;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// Size of one pool buffer, in bytes: the default block size. Blocks of a volume with a
/// smaller block size use slots too (a slot holds one block); larger ones use the heap.
pub const SLOT_BYTES: usize = 4096;

/// Slots the filling thread faults in between two hand-overs to the pool (so the pool is
/// usable while it fills), in slots.
const FILL_CHUNK_SLOTS: usize = 256;

/// A shared pool of pre-faulted block buffers (a copyable handle).
///
/// Its bookkeeping lives for the rest of the process (a few dozen bytes per pool made), so
/// a block's slot needs no reference count on it: a count shared by every block was ~7%
/// of a batched-write run's serving thread, its cache line bouncing between the threads
/// that make blocks and those that drop them. [`BlockPool::close`] frees the buffers.
#[derive(Debug, Clone, Copy)]
pub struct BlockPool {
    inner: &'static Inner,
}

#[derive(Debug)]
struct Inner {
    /// Free slots, most recently returned last (reused first: warmest in the CPU cache).
    free: Mutex<Vec<Box<[u8]>>>,
    /// Most free slots kept, in slots (`block_pool_bytes / SLOT_BYTES`).
    limit_slots: usize,
    /// Cleared by `close`: slots are no longer kept, the filling thread stops.
    open: AtomicBool,
    /// Set while a filling thread runs.
    filling: AtomicBool,
}

/// Every disabled pool (limit 0): nothing kept, nothing to free.
static DISABLED: Inner = Inner {
    free: Mutex::new(Vec::new()),
    limit_slots: 0,
    open: AtomicBool::new(false),
    filling: AtomicBool::new(false),
};

/// What a pool holds and has handed out, for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolStats {
    /// Slots ready for a block now.
    pub free_slots: usize,
    /// Most free slots the pool keeps.
    pub limit_slots: usize,
    /// Whether a filling thread is still faulting slots in.
    pub filling: bool,
}

impl BlockPool {
    /// A pool that keeps up to `limit_bytes` of free slots (rounded down to whole slots;
    /// 0 disables it: every block is a heap copy). It starts empty: see [`Self::fill`].
    pub fn new(limit_bytes: u64) -> Self {
        let limit_slots = usize::try_from(limit_bytes / SLOT_BYTES as u64).unwrap_or(usize::MAX);
        if limit_slots == 0 {
            return Self::disabled();
        }
        let inner = Inner {
            free: Mutex::new(Vec::new()),
            limit_slots,
            open: AtomicBool::new(true),
            filling: AtomicBool::new(false),
        };
        Self { inner: Box::leak(Box::new(inner)) }
    }

    /// A pool that holds nothing: every block is a heap copy.
    pub fn disabled() -> Self {
        Self { inner: &DISABLED }
    }

    /// Frees the free slots and keeps none from now on (blocks still in use are freed
    /// when they drop); a filling thread stops. For the node's end.
    pub fn close(&self) {
        self.inner.open.store(false, Ordering::Release);
        let free = std::mem::take(&mut *self.inner.lock());
        drop(free);
    }

    pub fn stats(&self) -> PoolStats {
        PoolStats {
            free_slots: self.inner.lock().len(),
            limit_slots: self.inner.limit_slots,
            filling: self.inner.filling.load(Ordering::Acquire),
        }
    }

    /// Starts a thread that allocates and touches slots until the pool holds its limit (or
    /// it has made that many), handing them over [`FILL_CHUNK_SLOTS`] at a time. It stops
    /// early when every handle to the pool is gone (the node stopped). Returns `None` for a
    /// disabled pool, or when the thread could not be started (the pool then fills only
    /// from freed blocks).
    /// The thread's result is the number of slots it made.
    pub fn fill(&self) -> Option<std::thread::JoinHandle<usize>> {
        if !self.inner.open.load(Ordering::Acquire) {
            return None;
        }
        let pool = *self;
        // Set before the thread starts, so a caller that sees it clear knows the filling
        // is over (or never began).
        self.inner.filling.store(true, Ordering::Release);
        let spawned = std::thread::Builder::new().name("nms-block-pool".into()).spawn(move || {
            let made = fill_until_full(pool.inner);
            pool.inner.filling.store(false, Ordering::Release);
            made
        });
        match spawned {
            Ok(h) => Some(h),
            Err(e) => {
                self.inner.filling.store(false, Ordering::Release);
                tracing::warn!(error = %e, "could not start the block-pool thread; blocks use the heap");
                None
            }
        }
    }

    /// `data` as a block: in a pool slot when one is free and the data fits, else a heap
    /// copy.
    pub fn copy(&self, data: &[u8]) -> Bytes {
        self.build(data.len(), |dst| dst.copy_from_slice(data))
    }

    /// A block of `len` bytes that `init` writes whole (it is handed exactly `len` bytes,
    /// whose content is unspecified: `init` must write every byte).
    pub fn build(&self, len: usize, init: impl FnOnce(&mut [u8])) -> Bytes {
        if len == 0 || len > SLOT_BYTES {
            return heap(len, init);
        }
        let Some(mut buf) = self.inner.lock().pop() else {
            return heap(len, init);
        };
        init(&mut buf[..len]);
        Bytes::from_owner(Slot { buf, len, pool: self.inner })
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Box<[u8]>>> {
        // A panic while holding this lock leaves a valid Vec: keep using it.
        self.free.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes a slot back unless the pool is full or closed.
    fn give_back(&self, buf: Box<[u8]>) {
        // `open` is read under the lock: `close` clears it before taking the lock, so
        // nothing is kept once `close` has emptied the pool.
        let mut free = self.lock();
        if self.open.load(Ordering::Relaxed) && free.len() < self.limit_slots {
            free.push(buf);
        }
    }
}

fn heap(len: usize, init: impl FnOnce(&mut [u8])) -> Bytes {
    let mut v = vec![0u8; len];
    init(&mut v);
    Bytes::from(v)
}

/// One slot in use: the block's bytes are its first `len`.
struct Slot {
    buf: Box<[u8]>,
    len: usize,
    /// Blocks outliving their node (a read reply in flight) find it closed and free
    /// their slot.
    pool: &'static Inner,
}

impl AsRef<[u8]> for Slot {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.buf));
    }
}

/// A fresh slot with each of its pages written now, so they are faulted in. Zeroes,
/// written with volatile stores (a plain store of zero into zeroed memory may be dropped as
/// redundant): a page that stays zero costs a VM's live migration (QEMU) a marker, not a
/// page.
fn faulted_slot() -> Box<[u8]> {
    let mut b = vec![0u8; SLOT_BYTES].into_boxed_slice();
    let last = b.len() - 1;
    // Every page the slot spans: one byte per page stride, and the last byte.
    for i in (0..b.len()).step_by(4096).chain([last]) {
        // SAFETY: `b[i]` is a valid, aligned, exclusively borrowed byte.
        unsafe { std::ptr::write_volatile(&mut b[i], 0) };
    }
    b
}

/// Puts the calling thread in the `SCHED_IDLE` class: it runs only on CPU time nothing
/// else wants, so filling the pool never delays serving (or, in a VM image, the boot).
fn idle_priority() {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: plain system call; pid 0 is the calling thread; `param` outlives the call.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "block pool: SCHED_IDLE refused");
    }
}

/// Returns the slots it made.
fn fill_until_full(p: &'static Inner) -> usize {
    idle_priority();
    let started = Instant::now();
    let mut made = 0usize;
    loop {
        if !p.open.load(Ordering::Acquire) {
            tracing::debug!(slots = made, "block pool: closed, filling stopped");
            return made;
        }
        // At most the limit in all: slots taken meanwhile come back as their blocks drop.
        let want = p
            .limit_slots
            .saturating_sub(p.lock().len())
            .min(p.limit_slots - made)
            .min(FILL_CHUNK_SLOTS);
        if want == 0 {
            break;
        }
        // Faulted in without the lock; the pool's users go on meanwhile.
        let chunk: Vec<Box<[u8]>> = (0..want).map(|_| faulted_slot()).collect();
        made += chunk.len();
        let mut free = p.lock();
        if !p.open.load(Ordering::Relaxed) {
            return made;
        }
        let room = p.limit_slots.saturating_sub(free.len());
        free.extend(chunk.into_iter().take(room));
    }
    tracing::info!(
        slots = made,
        mib = (made * SLOT_BYTES) >> 20,
        took_ms = started.elapsed().as_millis() as u64,
        "block pool faulted in"
    );
    made
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_from_a_slot_gives_it_back_when_its_last_reference_drops() {
        let pool = BlockPool::new(4 * SLOT_BYTES as u64);
        assert!(!pool.stats().filling);
        assert_eq!(pool.fill().expect("a thread").join().unwrap(), 4);
        assert_eq!(pool.stats(), PoolStats { free_slots: 4, limit_slots: 4, filling: false });
        let a = pool.copy(&[7u8; SLOT_BYTES]);
        let part = pool.copy(b"hello");
        assert_eq!(pool.stats().free_slots, 2);
        assert_eq!(&a[..], &[7u8; SLOT_BYTES][..]);
        assert_eq!(&part[..], b"hello");
        let clone = a.slice(10..20);
        drop(a);
        assert_eq!(pool.stats().free_slots, 2, "a slice still holds the slot");
        assert_eq!(&clone[..], &[7u8; 10][..]);
        drop(clone);
        drop(part);
        assert_eq!(pool.stats().free_slots, 4);
        // A reused slot carries only the new block's bytes.
        let b = pool.build(3, |d| d.copy_from_slice(b"abc"));
        assert_eq!(&b[..], b"abc");
    }

    #[test]
    fn an_empty_pool_or_a_large_block_falls_back_to_the_heap() {
        let pool = BlockPool::new(SLOT_BYTES as u64);
        // Not filled: the heap.
        let a = pool.copy(&[1u8; 100]);
        assert_eq!(&a[..], &[1u8; 100][..]);
        drop(a);
        assert_eq!(pool.stats().free_slots, 0, "a heap block never enters the pool");
        pool.fill().unwrap().join().unwrap();
        let big = pool.copy(&vec![2u8; 2 * SLOT_BYTES]);
        assert_eq!(big.len(), 2 * SLOT_BYTES);
        assert_eq!(pool.stats().free_slots, 1, "too large for a slot: not taken from the pool");
        let x = pool.copy(&[3u8; 10]);
        let y = pool.copy(&[4u8; 10]);
        assert_eq!((&x[..], &y[..]), (&[3u8; 10][..], &[4u8; 10][..]));
        assert_eq!(pool.stats().free_slots, 0);
        drop((x, y));
        assert_eq!(pool.stats().free_slots, 1, "never more than the limit kept");
        assert!(BlockPool::disabled().fill().is_none());
        assert_eq!(&BlockPool::disabled().copy(b"z")[..], b"z");
    }

    #[test]
    fn blocks_outliving_a_closed_pool_still_read_and_free_cleanly() {
        let pool = BlockPool::new(2 * SLOT_BYTES as u64);
        pool.fill().unwrap().join().unwrap();
        let a = pool.copy(b"still here");
        pool.close();
        assert_eq!(pool.stats().free_slots, 0, "closing frees the free slots");
        assert_eq!(&a[..], b"still here");
        drop(a);
        assert_eq!(pool.stats().free_slots, 0, "a closed pool keeps nothing");
        assert!(pool.fill().is_none());
        assert_eq!(&pool.copy(b"heap now")[..], b"heap now");
    }

    #[test]
    fn filling_stops_when_the_pool_is_closed() {
        // Large enough that the thread is still filling when the pool closes.
        let pool = BlockPool::new(1 << 30);
        let limit = pool.stats().limit_slots;
        let h = pool.fill().unwrap();
        assert!(pool.stats().filling, "filling from the moment fill() returns");
        pool.close();
        let made = h.join().unwrap();
        assert!(!pool.stats().filling, "over once its thread has ended");
        assert!(made < limit, "made {made} of {limit} slots after the pool was closed");
        assert_eq!(pool.stats().free_slots, 0);
    }
}
