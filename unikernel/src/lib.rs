//! builds the NMS boot image and runs, controls and live-migrates it under QEMU.

pub mod config;
