//! wayside's testbed: the paper's vehicular model, the SMF, an emulated road, benchmarks.

pub mod bench;
pub mod config;
pub mod drive;
pub mod fcd;
pub mod mobility;
pub mod paper;
