//! Builds the NMS boot image and runs, controls and live-migrates it under QEMU.
//!
//! Code map:
//! - [`kernel`]: Debian's stock kernel, fetched with apt-get/dpkg-deb (not installed);
//!   finding it and the modules the image needs (dependencies from `.modinfo`).
//! - [`elf`]: the few ELF reads needed (is `/init` static? what does a module depend on?).
//! - [`cpio`]: a deterministic cpio newc writer (the initramfs).
//! - [`image`]: the image folder (vmlinuz, initramfs.cpio, manifest.json).
//! - [`qmp`]: a QEMU Machine Protocol client.
//! - [`vm`]: starting QEMU (KVM when a probe says it works, else TCG), the health wait,
//!   status, stop and live migration.
//! - [`tap`]: host bridges and tap devices for VMs on a routable address (subnet
//!   allocation under a host lock; removed on drop).
//! - [`config`]: the `unikernel` binary's settings.
//!
//! The guest side (the NMS as process 1) lives in `wayside_nms::pid1`.
//!
//! **Architecture invariant:** nothing QEMU is asked to run is unchecked: the image's
//! `/init` is verified static, and the kernel command line is parsed with the guest's own
//! parser before QEMU starts, so bad input fails here with a message, not in a VM log.

pub mod config;
pub mod cpio;
pub mod elf;
pub mod image;
pub mod kernel;
pub mod qmp;
pub mod tap;
pub mod vm;
