//! wayside's persistent storage service (PSS): a Raft-replicated block store on sled.
//!
//! Code map:
//! - [`config`]: a node's settings (TOML + flags), every limit named with its unit.
//! - [`direct`]: appending around the page cache (`O_DIRECT`), for the log and blobs.
//! - [`storage`]: the durable Raft log (append-only file, `fdatasync`ed by us) and the
//!   `raft::Storage` view of it.
//! - [`state`]: the sled state machine (volumes, blocks, epochs, request-id dedupe) and
//!   snapshot files.
//! - [`index`]: the block index in memory (shared with readers) and where its durable
//!   form starts (a checkpoint's index file, then the blob records after it).
//! - [`snapshot`]: snapshot files (sent between members) and checkpoints (a node's own
//!   compaction: the index beside hard links to sealed blob segments).
//! - [`node`]: the Raft loop (raft-rs `RawNode`, group commit, ReadIndex, membership,
//!   compaction) on its own thread.
//! - [`transport`]: Raft messages and snapshots between nodes over gRPC.
//! - [`service`]: the `PssBlocks` and `PssAdmin` gRPC services; error -> status mapping.
//! - [`server`]: [`server::run`], one node on a listener.
//! - [`client`]: [`client::PssClient`], the library the NMS and the `pss` CLI use (leader
//!   finding, hints, retries within a deadline; data and membership calls alike).
//! - [`pipe`]: the client side of the `Pipeline` stream (many callers' writes and reads
//!   to one node over one stream).
//! - [`testing`]: [`testing::LocalCluster`], a real in-process cluster for tests.
//! - [`alloc`]: the mimalloc settings the `pss` and `testbed` binaries start with.

pub mod alloc;
pub mod blobs;
pub mod client;
pub mod config;
pub mod direct;
pub mod index;
mod logging;
pub mod node;
pub mod pipe;
pub mod server;
pub mod service;
pub mod snapshot;
pub mod state;
pub mod storage;
pub mod testing;
pub mod transport;

pub use config::Config;
