//! wayside's network memory server (NMS): the RSU-side block cache, migration, vehicle client and FUSE mount.

pub mod config;
