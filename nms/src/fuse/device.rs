//! The block device the file system core runs on: one trait with a written failure contract and
//! two implementations, [`MemDevice`] (unit tests) and [`super::cache::CachedVolume`] (the
//! vehicle's disk cache and journal in front of a wayside volume).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// One change to the volume, as the file system core asks for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlockOp {
    /// Writes `data` at byte `offset` of `block` (within the block).
    Write {
        block: u64,
        offset: u32,
        data: Vec<u8>,
        /// The caller knows the block holds no data (never written, or deleted by an earlier op):
        /// a cache may start from zeros instead of fetching the block first.
        fresh: bool,
    },
    /// Forgets `block`: it reads as zeros afterwards.
    Delete { block: u64 },
}

impl BlockOp {
    /// The volume block this op changes.
    pub fn block(&self) -> u64 {
        match self {
            BlockOp::Write { block, .. } | BlockOp::Delete { block } => *block,
        }
    }

    /// The block whose current image this op is applied to, on a device of `block_size`-byte
    /// blocks: a write of part of a block that may hold data (not `fresh`).
    pub fn builds_on_image(&self, block_size: u32) -> Option<u64> {
        match self {
            BlockOp::Write { block, offset, data, fresh: false }
                if *offset != 0 || data.len() != block_size as usize =>
            {
                Some(*block)
            }
            _ => None,
        }
    }
}

/// Why a device operation failed. The file system maps these to errno values in one place
/// ([`super::fs::FsError::errno`]).
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The operation did not complete within the configured time (the link is down, the journal
    /// is full and not draining, the volume is moving): the caller gets ETIMEDOUT.
    #[error("{what} did not complete within {after:?}")]
    Timeout { what: &'static str, after: Duration },
    /// The back end refused for a reason retrying will not fix (bad credential, unknown volume).
    #[error("the volume refused the operation: {0}")]
    Refused(String),
    /// The local disk (cache or journal) failed.
    #[error("local disk: {0}")]
    Io(#[from] std::io::Error),
    /// A request outside the device's geometry (a bug in the caller).
    #[error("invalid block request: {0}")]
    Invalid(String),
}

/// A block store with a fixed block size.
///
/// Failure contract: `apply` either returns `Ok` after every op is durable at least locally (it
/// survives a crash of the calling process and is eventually persisted in order, once) or returns
/// an error after applying a prefix of the ops (possibly none); reads then see that prefix. A
/// [`DeviceError::Timeout`] from `apply` means none of the ops was applied (the file system
/// relies on it to let a timed-out write be retried; see `Fs::apply`).
/// `sync` returns `Ok` only once everything applied before it is persisted in the volume's
/// durable store. No call blocks longer than the device's configured operation timeout.
pub trait BlockDevice: Send + Sync {
    /// Bytes per block.
    fn block_size(&self) -> u32;
    /// Reads `len` bytes at `offset` of `block` (zeros where nothing was ever written).
    fn read(&self, block: u64, offset: u32, len: u32) -> Result<Vec<u8>, DeviceError>;
    /// A hint that `blocks` are about to be read: a device with a remote back end fetches
    /// the ones it lacks in one round trip. Failures are left for the reads to report.
    fn prefetch(&self, _blocks: &[u64]) {}
    /// Fetches the ones of `blocks` it lacks (in one round trip), failing as a read of
    /// them would: the mount calls it outside the file system's lock, so a read waiting on
    /// the network holds up nobody else, and one that cannot be fetched fails there.
    fn fetch_ahead(&self, _blocks: &[u64]) -> Result<(), DeviceError> {
        Ok(())
    }
    /// Waits until `apply(ops)` would find room for them (in a journal, say), failing as
    /// it would at its timeout: the mount calls it outside the file system's lock, so a
    /// write waiting for the volume to take earlier ones holds up nobody else. (`apply`
    /// still waits if another took the room meanwhile.)
    fn wait_room(&self, _ops: &[BlockOp]) -> Result<(), DeviceError> {
        Ok(())
    }
    /// Applies `ops` in order.
    fn apply(&self, ops: Vec<BlockOp>) -> Result<(), DeviceError>;
    /// The persisted barrier.
    fn sync(&self) -> Result<(), DeviceError>;
}

/// Checks that a `len`-byte range at `offset` fits a block of `block_size` bytes.
pub(crate) fn check_range(block_size: u32, offset: u32, len: usize) -> Result<(), DeviceError> {
    let end = u64::from(offset) + len as u64;
    if end > u64::from(block_size) {
        return Err(DeviceError::Invalid(format!(
            "range {offset}+{len} exceeds the block size {block_size}"
        )));
    }
    Ok(())
}

/// Applies one op to a full-block image.
pub(crate) fn apply_to_image(image: &mut Vec<u8>, block_size: u32, op: &BlockOp) {
    match op {
        BlockOp::Write { offset, data, .. } => {
            image.resize(block_size as usize, 0);
            let start = *offset as usize;
            image[start..start + data.len()].copy_from_slice(data);
        }
        BlockOp::Delete { .. } => image.clear(),
    }
}

/// A block device in memory, for unit tests of the file system core. A write marked
/// `fresh` starts from zeros, as a cache may (so a core that marks a block holding data
/// fresh loses that data here too, and its tests see it).
#[derive(Debug)]
pub struct MemDevice {
    block_size: u32,
    blocks: Mutex<HashMap<u64, Vec<u8>>>,
}

impl MemDevice {
    /// An empty device.
    pub fn new(block_size: u32) -> Self {
        MemDevice { block_size, blocks: Mutex::new(HashMap::new()) }
    }

    /// How many blocks hold data.
    pub fn stored_blocks(&self) -> usize {
        self.blocks.lock().expect("poisoned").len()
    }

    /// Whether `block` holds data.
    pub fn holds(&self, block: u64) -> bool {
        self.blocks.lock().expect("poisoned").contains_key(&block)
    }
}

impl BlockDevice for MemDevice {
    fn block_size(&self) -> u32 {
        self.block_size
    }

    fn read(&self, block: u64, offset: u32, len: u32) -> Result<Vec<u8>, DeviceError> {
        check_range(self.block_size, offset, len as usize)?;
        let blocks = self.blocks.lock().expect("poisoned");
        let mut out = vec![0; len as usize];
        if let Some(image) = blocks.get(&block) {
            let start = offset as usize;
            let end = (start + len as usize).min(image.len());
            if start < end {
                out[..end - start].copy_from_slice(&image[start..end]);
            }
        }
        Ok(out)
    }

    fn apply(&self, ops: Vec<BlockOp>) -> Result<(), DeviceError> {
        let mut blocks = self.blocks.lock().expect("poisoned");
        for op in &ops {
            if let BlockOp::Write { offset, data, .. } = op {
                check_range(self.block_size, *offset, data.len())?;
            }
            let image = blocks.entry(op.block()).or_default();
            if let BlockOp::Write { fresh: true, .. } = op {
                image.clear();
            }
            apply_to_image(image, self.block_size, op);
            if image.is_empty() {
                blocks.remove(&op.block());
            }
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), DeviceError> {
        Ok(())
    }
}

impl<T: BlockDevice + ?Sized> BlockDevice for std::sync::Arc<T> {
    fn block_size(&self) -> u32 {
        (**self).block_size()
    }
    fn read(&self, block: u64, offset: u32, len: u32) -> Result<Vec<u8>, DeviceError> {
        (**self).read(block, offset, len)
    }
    fn prefetch(&self, blocks: &[u64]) {
        (**self).prefetch(blocks)
    }
    fn fetch_ahead(&self, blocks: &[u64]) -> Result<(), DeviceError> {
        (**self).fetch_ahead(blocks)
    }
    fn wait_room(&self, ops: &[BlockOp]) -> Result<(), DeviceError> {
        (**self).wait_room(ops)
    }
    fn apply(&self, ops: Vec<BlockOp>) -> Result<(), DeviceError> {
        (**self).apply(ops)
    }
    fn sync(&self) -> Result<(), DeviceError> {
        (**self).sync()
    }
}
