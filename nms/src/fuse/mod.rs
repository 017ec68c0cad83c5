//! The vehicle's FUSE mount (`nms mount`): a POSIX file system whose data and metadata live in a
//! wayside volume's blocks, with a local disk cache and write journal so it keeps serving while
//! the volume moves between NMSs or the radio link drops.
//!
//! Code map (inner to outer):
//! - [`layout`]: the on-volume format (superblock, inode table, directory slots, per-inode data
//!   ranges). Pure encoding.
//! - [`device`]: the [`device::BlockDevice`] trait the core runs on, and an in-memory device.
//! - [`fs`]: the file system core (lookup, create, write, rename, ...) over a `BlockDevice`.
//! - [`cache`]: the vehicle side: disk cache + crash-safe journal + uploader over a [`cache::Remote`]
//!   (the wayside volume through `VolumeClient`, or an in-memory remote in tests).
//! - [`mount`]: the `fuser::Filesystem` adapter and `mount`/`umount`.
//! - [`volume`]: the cache's `Remote` over `crate::client::VolumeClient`.
//! - [`cli`]: `nms mount` / `nms umount`.
//! - [`fsx`]: a seeded random-operation checker with a model, used by unit and mount tests.

pub mod cache;
pub mod cli;
pub mod device;
pub mod fs;
pub mod fsx;
pub mod layout;
pub mod mount;
pub mod volume;

#[cfg(test)]
mod tests;
