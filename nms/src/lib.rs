//! wayside's network memory server (NMS): the RSU-side block cache, migration, vehicle client and FUSE mount.
//!
//! Code map:
//! - [`cache`]: the cache core as pure logic (budget, eviction, dirty limits, write-back
//!   batches, request-id dedupe, migration snapshots). No I/O, no clock.
//! - [`pool`]: block buffers faulted in ahead of need (a move's target skips page faults).
//! - [`store`]: the PSS behind one trait (real client; in-memory for unit tests).
//! - [`server`]: the node and its gRPC services (vehicle API, admin, migration).
//! - [`client`]: the vehicle-side library (redirects, retries, the write journal).
//! - [`error`]: domain errors and their one mapping to gRPC statuses.
//! - [`config`]: the `nms serve` settings.
//! - [`cli`]: the `nms` subcommands for people (serve, migrate, put/get/flush/stat, ...).
//! - [`smf`]: the service management framework: the paper's model, the move planner and
//!   its gRPC service (`nms smf`).
//! - [`fuse`]: the vehicle's FUSE mount (`nms mount`) with its local cache and journal.
//! - [`pid1`]: the NMS as process 1 of its VM image (mounts, modules, network, power-off).
//! - [`testing`]: helpers shared by tests (a vehicle writing continuously).

pub mod cache;
pub mod cli;
pub mod client;
pub mod config;
pub mod error;
pub mod fuse;
pub mod pid1;
pub mod pool;
pub mod server;
pub mod smf;
pub mod store;
pub mod testing;
