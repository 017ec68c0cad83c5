//! A node's configuration: a TOML file (`--config`), overridden by flags.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Settings of one PSS node; every limit is named with its unit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This node's Raft id (> 0, unique in the cluster).
    pub id: u64,
    /// Address to listen on for gRPC (the block, admin and Raft transport services).
    pub listen: String,
    /// Every initial member (this node included), as `[[peers]]` tables with `id` and
    /// `address`. With `join` unset, these ids form the first voter set; otherwise they
    /// are only addresses.
    pub peers: Vec<Peer>,
    /// Directory holding the Raft log, snapshots, the sled state machine (`sm/`) and the
    /// block data segments it points into (`sm/blobs/`).
    pub data_dir: PathBuf,
    /// Start empty and wait to be added by `pss add-node` (a new member) instead of
    /// bootstrapping the cluster from `peers`.
    pub join: bool,
    /// Length of one Raft tick, in milliseconds.
    pub tick_interval_ms: u64,
    /// Ticks without a leader heartbeat before an election starts.
    pub election_timeout_ticks: usize,
    /// Ticks between leader heartbeats.
    pub heartbeat_interval_ticks: usize,
    /// Most operations (puts and deletes) in one WriteBatch request.
    pub max_batch_ops: usize,
    /// Most requests in one `Pipeline` message, and most requests one `Pipeline` stream
    /// may have unanswered (the node reads no further from it until some are answered).
    pub max_pipeline_requests: usize,
    /// Most bytes of client commands grouped into one Raft entry (group commit).
    pub max_entry_bytes: usize,
    /// Most client commands grouped into one Raft entry (group commit).
    pub max_commands_per_entry: usize,
    /// Most client writes and reads in flight in this node at once; more wait.
    pub max_inflight_proposals: usize,
    /// Largest gRPC message this node accepts or sends, in bytes.
    pub max_message_size_bytes: usize,
    /// Largest Raft append message, in bytes (raft-rs `max_size_per_msg`).
    pub max_raft_message_bytes: u64,
    /// Most unacknowledged Raft append messages per follower.
    pub max_inflight_raft_messages: usize,
    /// Most Raft messages queued for one peer before new ones are dropped (Raft resends).
    pub peer_queue_messages: usize,
    /// Request ids remembered for duplicate detection (oldest forgotten first). The leader
    /// stamps its value in every entry it proposes and every replica forgets by it, so
    /// replicas agree on retries even with other values here (a follower's table holds as
    /// many ids as its leaders' values say).
    pub dedupe_table_entries: u64,
    /// Applied entries past the last snapshot that trigger a snapshot and log compaction.
    pub compact_log_entries: u64,
    /// Bytes of applied entries past the last snapshot that trigger a snapshot and log
    /// compaction (the log file grows until then).
    pub compact_log_bytes: u64,
    /// After a snapshot fails (a full disk, say), the next one the log's size would start
    /// waits this long, in milliseconds, doubling with each failure in a row up to 64x (an
    /// operator's CompactLog does not wait). It was started again at once, every turn of
    /// the Raft loop, each sealing a blob segment.
    pub snapshot_retry_ms: u64,
    /// The Raft log is kept in segment files of about this size, in bytes; a compaction
    /// deletes the segments holding only compacted entries.
    pub log_segment_bytes: u64,
    /// Bytes of applied Raft entries kept in memory (for followers a little behind);
    /// older ones are read back from the log file when a lagging follower needs them.
    /// Entries not yet applied always stay in memory.
    pub log_memory_bytes: u64,
    /// Size of one snapshot chunk on the wire, in bytes: at most `max_message_size_bytes`
    /// less `SNAPSHOT_CHUNK_HEADROOM_BYTES` (a chunk is one message, which every node
    /// decodes within that limit).
    pub snapshot_chunk_bytes: usize,
    /// Time allowed for sending one whole snapshot to a follower (its chunks, and the
    /// follower's fsync and check of the file), in milliseconds; past it the transfer
    /// fails and is tried again from the start. A store larger than this at the link's
    /// rate cannot be sent: raise it with the data.
    pub snapshot_send_timeout_ms: u64,
    /// A snapshot being received that brings no chunk this long is given up, in
    /// milliseconds: the partial file is removed and the call fails (its sender reports
    /// the failure to raft-rs, which sends it again later). A sender that stalls
    /// mid-transfer holds a receive slot and disk space only this long. (The sending side
    /// is bounded by `snapshot_send_timeout_ms` and by keepalive on the peer connection.)
    pub snapshot_receive_idle_timeout_ms: u64,
    /// Most snapshots this node receives at once, in transfers; one more is refused
    /// (RESOURCE_EXHAUSTED) and its sender tries again later. A leader sends a follower
    /// one at a time; a second lets a new leader's start while an old one's ends.
    pub max_snapshot_receives: usize,
    /// A snapshot being received is refused (RESOURCE_EXHAUSTED, its partial file
    /// removed) once the data dir's file system would have less free than what was
    /// received so far plus this, in bytes: installing it copies its blocks into the
    /// node's own files, so a received file needs as much room again to be loaded. The
    /// node goes on from its own state; the leader sends again later.
    pub snapshot_min_free_disk_bytes: u64,
    /// Block data lives in append-only segment files beside sled (only the index is in
    /// sled); a segment is sealed (fsynced) and the next started at this size, in bytes.
    pub blob_segment_bytes: u64,
    /// A sealed segment whose live bytes fall below this percentage of its size is
    /// garbage-collected (its live blocks copied forward, the file deleted); 1-99.
    pub blob_gc_live_percent: u64,
    /// Segments are collected only while all of them together take more than this
    /// percentage of the live block bytes (>= 100): collection waits until there is
    /// garbage worth the copying, by when the oldest segments are mostly dead.
    pub blob_gc_space_percent: u64,
    /// Most blocks this node stores, in blocks: the block index (version and record
    /// location of every block) is in memory, ~60 bytes a block. A write that would add
    /// blocks past it is refused (RESOURCE_EXHAUSTED, `max_blocks`); give every node the
    /// same value.
    pub max_blocks: usize,
    /// Most blocks one volume stores, in blocks (DESIGN section 8's "blocks per volume"):
    /// a write that would add blocks to a volume past it is refused (RESOURCE_EXHAUSTED,
    /// `max_blocks_per_volume`), so one vehicle cannot take the node's `max_blocks`.
    pub max_blocks_per_volume: usize,
    /// Most volumes this node stores, in volumes: a create past it is refused
    /// (RESOURCE_EXHAUSTED, `max_volumes`). Vehicles create volumes through any NMS, so
    /// this bounds what they can make the cluster keep; give every node the same value.
    pub max_volumes: usize,
    /// Append to the Raft log and the blob segments with `O_DIRECT` (around the page
    /// cache; falls back to buffered writes where the file system refuses it).
    pub direct_io: bool,
    /// How long a client request may wait for commit or a read index, in milliseconds.
    pub request_timeout_ms: u64,
    /// Longest wait for a new member to catch up before promotion, in milliseconds.
    pub learner_catch_up_timeout_ms: u64,
    /// HTTP/2 PING sent on a connection (idle or not) after this long without a frame
    /// from the peer, in milliseconds (0: never). A peer that vanished without closing (a
    /// crashed VM, a cut link) would otherwise hold its calls, and a shutdown that waits
    /// for them, until TCP gives up (~15 min).
    pub http2_keepalive_interval_ms: u64,
    /// A connection whose PING goes unanswered this long is closed, in milliseconds.
    pub http2_keepalive_timeout_ms: u64,
    /// TLS (`[tls]`: `cert`, `key`, `ca`, PEM files): this node serves over TLS only and
    /// requires every caller (NMSs, peers, operators) to present a certificate signed by
    /// `ca`; it dials its peers over TLS with its own. Unset: plaintext.
    pub tls: wayside_proto::tls::TlsFiles,
    /// With TLS on, a connection whose TLS handshake has not finished this long after it
    /// was accepted is closed, in milliseconds: a caller that connects and then stalls
    /// holds a socket and a handshake task only this long.
    pub tls_handshake_timeout_ms: u64,
    /// Most connections open at once (NMSs, peers, operators), in connections; one past it
    /// is closed as soon as it is accepted. Keep it below the process's open-file limit.
    pub max_connections: usize,
    /// Most connections open at once from one source address, in connections (at most
    /// `max_connections`; larger acts as it): one host cannot take every slot from the
    /// NMSs and peers. Callers behind one address (vehicles behind a NAT, every host
    /// connection to a VM on QEMU user-mode networking, a loopback testbed) share it; a
    /// host with many IPv4 addresses gets it once per address; IPv6 sources count by /64.
    pub max_connections_per_source: usize,
    /// A connection whose peer has sent nothing this long is closed, in milliseconds (0:
    /// never): a caller that connects and never speaks HTTP/2 would otherwise hold one of
    /// `max_connections` for good. With keepalive on it must exceed
    /// `http2_keepalive_interval_ms` plus `http2_keepalive_timeout_ms` (an idle live peer
    /// is heard only when it answers a PING); with keepalive off, a caller that sends
    /// nothing this long is cut even with a call open (an idle client then connects anew
    /// at its next call).
    pub silent_connection_timeout_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            id: 1,
            listen: "127.0.0.1:7400".into(),
            peers: Vec::new(),
            data_dir: PathBuf::from("pss-data"),
            join: false,
            tick_interval_ms: 100,
            election_timeout_ticks: 10,
            heartbeat_interval_ticks: 2,
            max_batch_ops: 1024,
            max_pipeline_requests: 1024,
            max_entry_bytes: 8 * 1024 * 1024,
            max_commands_per_entry: 4096,
            max_inflight_proposals: 4096,
            max_message_size_bytes: 64 * 1024 * 1024,
            max_raft_message_bytes: 4 * 1024 * 1024,
            max_inflight_raft_messages: 256,
            peer_queue_messages: 4096,
            dedupe_table_entries: 1_000_000,
            compact_log_entries: 20_000,
            snapshot_retry_ms: 1_000,
            compact_log_bytes: 256 * 1024 * 1024,
            log_segment_bytes: 64 * 1024 * 1024,
            log_memory_bytes: 64 * 1024 * 1024,
            snapshot_chunk_bytes: 1024 * 1024,
            snapshot_send_timeout_ms: 300_000,
            snapshot_receive_idle_timeout_ms: 30_000,
            max_snapshot_receives: 2,
            snapshot_min_free_disk_bytes: 256 * 1024 * 1024,
            blob_segment_bytes: 64 * 1024 * 1024,
            blob_gc_live_percent: 50,
            blob_gc_space_percent: 200,
            max_blocks: 8 * 1024 * 1024,
            max_blocks_per_volume: 2 * 1024 * 1024,
            max_volumes: 1024 * 1024,
            direct_io: true,
            request_timeout_ms: 10_000,
            learner_catch_up_timeout_ms: 30_000,
            http2_keepalive_interval_ms: wayside_proto::server::HTTP2_KEEPALIVE_INTERVAL_MS,
            http2_keepalive_timeout_ms: wayside_proto::server::HTTP2_KEEPALIVE_TIMEOUT_MS,
            tls: wayside_proto::tls::TlsFiles::default(),
            tls_handshake_timeout_ms: 5_000,
            max_connections: wayside_proto::server::DEFAULT_MAX_CONNECTIONS,
            max_connections_per_source: wayside_proto::server::DEFAULT_MAX_CONNECTIONS_PER_SOURCE,
            silent_connection_timeout_ms: wayside_proto::server::SILENT_CONNECTION_TIMEOUT_MS,
        }
    }
}

/// One member's id and gRPC address (`host:port`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    pub id: u64,
    pub address: String,
}

/// A configuration that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("node id must be > 0")]
    ZeroId,
    #[error("peer list entry {entry:?} is not ID=HOST:PORT with a numeric id > 0")]
    PeerSyntax { entry: String },
    #[error("peer {id} address {addr:?} is not host:port")]
    PeerAddress { id: u64, addr: String },
    #[error("peer id {0} appears twice")]
    DuplicatePeer(u64),
    #[error("this node's id {id} is not in the peer list (ids: {ids:?}); a new node needs `join`")]
    SelfNotInPeers { id: u64, ids: Vec<u64> },
    #[error("`{name}` must be > 0")]
    Zero { name: &'static str },
    #[error("`{name}` must be a percentage from 1 to 99, got {value}")]
    Percent { name: &'static str, value: u64 },
    #[error("`blob_gc_space_percent` must be at least 100 (segments hold at least the live bytes), got {value}")]
    SpacePercent { value: u64 },
    #[error("election_timeout_ticks ({election}) must be greater than heartbeat_interval_ticks ({heartbeat})")]
    Ticks { election: usize, heartbeat: usize },
    #[error("{0}")]
    Silence(String),
    #[error(
        "snapshot_chunk_bytes ({chunk}) must leave {SNAPSHOT_CHUNK_HEADROOM_BYTES} bytes within \
         max_message_size_bytes ({max}): every chunk is one message, and a larger one is \
         refused by the node it is sent to, so no snapshot could be delivered"
    )]
    ChunkPastMessage { chunk: usize, max: usize },
}

/// Room a snapshot chunk's message needs beside its bytes (its metadata and framing), in
/// bytes.
pub const SNAPSHOT_CHUNK_HEADROOM_BYTES: usize = 64 * 1024;

/// Parses a peer list `1=HOST:PORT,2=HOST:PORT,...`.
pub fn parse_peers(list: &str) -> Result<Vec<Peer>, ConfigError> {
    let mut peers = BTreeMap::new();
    for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let syntax = || ConfigError::PeerSyntax { entry: entry.to_owned() };
        let (id, addr) = entry.split_once('=').ok_or_else(syntax)?;
        let id: u64 = id.trim().parse().map_err(|_| syntax())?;
        if id == 0 {
            return Err(syntax());
        }
        let addr = addr.trim();
        if wayside_proto::types::Endpoint::parse(addr).is_err() {
            return Err(ConfigError::PeerAddress { id, addr: addr.to_owned() });
        }
        if peers.insert(id, addr.to_owned()).is_some() {
            return Err(ConfigError::DuplicatePeer(id));
        }
    }
    if peers.is_empty() {
        return Err(ConfigError::PeerSyntax { entry: list.to_owned() });
    }
    Ok(peers.into_iter().map(|(id, address)| Peer { id, address }).collect())
}

impl Config {
    /// The peers as a map `id -> host:port`.
    pub fn peer_map(&self) -> BTreeMap<u64, String> {
        self.peers.iter().map(|p| (p.id, p.address.clone())).collect()
    }

    /// How long a connection may stay silent (`silent_connection_timeout_ms`; None: for
    /// ever), checked against the keepalive settings.
    pub fn silence_limit(&self) -> Result<Option<std::time::Duration>, ConfigError> {
        wayside_proto::server::silence_limit(
            self.silent_connection_timeout_ms,
            self.http2_keepalive_interval_ms,
            self.http2_keepalive_timeout_ms,
        )
        .map_err(ConfigError::Silence)
    }

    /// Checks the settings before a node starts.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.id == 0 {
            return Err(ConfigError::ZeroId);
        }
        let mut seen = BTreeMap::new();
        for Peer { id, address } in &self.peers {
            if *id == 0 {
                return Err(ConfigError::PeerSyntax { entry: format!("{id}={address}") });
            }
            if wayside_proto::types::Endpoint::parse(address).is_err() {
                return Err(ConfigError::PeerAddress { id: *id, addr: address.clone() });
            }
            if seen.insert(*id, address).is_some() {
                return Err(ConfigError::DuplicatePeer(*id));
            }
        }
        if !self.join && !seen.contains_key(&self.id) {
            return Err(ConfigError::SelfNotInPeers {
                id: self.id,
                ids: seen.keys().copied().collect(),
            });
        }
        let positive = [
            ("tick_interval_ms", self.tick_interval_ms as usize),
            ("heartbeat_interval_ticks", self.heartbeat_interval_ticks),
            ("max_batch_ops", self.max_batch_ops),
            ("max_pipeline_requests", self.max_pipeline_requests),
            ("max_entry_bytes", self.max_entry_bytes),
            ("max_commands_per_entry", self.max_commands_per_entry),
            ("max_inflight_proposals", self.max_inflight_proposals),
            ("max_message_size_bytes", self.max_message_size_bytes),
            ("max_inflight_raft_messages", self.max_inflight_raft_messages),
            ("peer_queue_messages", self.peer_queue_messages),
            ("dedupe_table_entries", self.dedupe_table_entries as usize),
            ("compact_log_entries", self.compact_log_entries as usize),
            ("compact_log_bytes", self.compact_log_bytes as usize),
            ("log_segment_bytes", self.log_segment_bytes as usize),
            ("snapshot_chunk_bytes", self.snapshot_chunk_bytes),
            ("snapshot_send_timeout_ms", self.snapshot_send_timeout_ms as usize),
            ("snapshot_receive_idle_timeout_ms", self.snapshot_receive_idle_timeout_ms as usize),
            ("max_snapshot_receives", self.max_snapshot_receives),
            ("blob_segment_bytes", self.blob_segment_bytes as usize),
            ("max_blocks", self.max_blocks),
            ("max_blocks_per_volume", self.max_blocks_per_volume),
            ("max_volumes", self.max_volumes),
            ("request_timeout_ms", self.request_timeout_ms as usize),
            ("tls_handshake_timeout_ms", self.tls_handshake_timeout_ms as usize),
            ("max_connections", self.max_connections),
            ("max_connections_per_source", self.max_connections_per_source),
        ];
        if let Some((name, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(ConfigError::Zero { name });
        }
        if !(1..=99).contains(&self.blob_gc_live_percent) {
            return Err(ConfigError::Percent {
                name: "blob_gc_live_percent",
                value: self.blob_gc_live_percent,
            });
        }
        if self.blob_gc_space_percent < 100 {
            return Err(ConfigError::SpacePercent { value: self.blob_gc_space_percent });
        }
        if self.election_timeout_ticks <= self.heartbeat_interval_ticks {
            return Err(ConfigError::Ticks {
                election: self.election_timeout_ticks,
                heartbeat: self.heartbeat_interval_ticks,
            });
        }
        if self.snapshot_chunk_bytes.saturating_add(SNAPSHOT_CHUNK_HEADROOM_BYTES)
            > self.max_message_size_bytes
        {
            return Err(ConfigError::ChunkPastMessage {
                chunk: self.snapshot_chunk_bytes,
                max: self.max_message_size_bytes,
            });
        }
        self.silence_limit()?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_round_trips_and_unknown_keys_are_rejected() {
        let text = wayside_proto::config::render(&Config::default());
        let back: Config = wayside_proto::config::parse(&text).unwrap();
        assert_eq!(back, Config::default());
        let c = Config {
            peers: parse_peers("1=127.0.0.1:1,2=127.0.0.1:2").unwrap(),
            ..Config::default()
        };
        let back: Config =
            wayside_proto::config::parse(&wayside_proto::config::render(&c)).unwrap();
        assert_eq!(back, c);
        let err =
            wayside_proto::config::parse::<Config>("listen = \"x\"\nbogus = 1\n").unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
    }

    #[test]
    fn a_silence_limit_within_the_keepalive_period_is_refused_naming_it() {
        let c = Config { peers: parse_peers("1=127.0.0.1:1").unwrap(), ..Config::default() };
        c.validate().unwrap();
        let short = Config { silent_connection_timeout_ms: 20_000, ..c.clone() };
        let e = short.validate().unwrap_err().to_string();
        assert!(e.contains("silent_connection_timeout_ms (20000)"), "{e}");
        assert!(e.contains("http2_keepalive_timeout_ms"), "{e}");
        let off = Config { silent_connection_timeout_ms: 0, ..c.clone() };
        assert_eq!(off.silence_limit().unwrap(), None);
        let no_pings =
            Config { http2_keepalive_interval_ms: 0, silent_connection_timeout_ms: 1, ..c };
        assert_eq!(no_pings.silence_limit().unwrap(), Some(std::time::Duration::from_millis(1)));
    }

    #[test]
    fn peer_lists_parse_and_malformed_ones_are_named() {
        let p = parse_peers("1=127.0.0.1:1,2=127.0.0.1:2, 3=10.0.0.1:3").unwrap();
        assert_eq!(p.len(), 3);
        assert_eq!(p[2], Peer { id: 3, address: "10.0.0.1:3".into() });
        for bad in ["1:127.0.0.1:1", "x=127.0.0.1:1", "0=127.0.0.1:1", "1=nohost", ""] {
            let err = parse_peers(bad).unwrap_err();
            assert!(!err.to_string().is_empty(), "{bad}");
        }
        let err = parse_peers("1=127.0.0.1:1,1=127.0.0.1:2").unwrap_err();
        assert!(matches!(err, ConfigError::DuplicatePeer(1)), "{err}");
    }

    #[test]
    fn validate_rejects_self_missing_and_zero_limits() {
        let mut c = Config { peers: parse_peers("2=127.0.0.1:2").unwrap(), ..Config::default() };
        assert!(matches!(c.validate(), Err(ConfigError::SelfNotInPeers { id: 1, .. })));
        c.join = true;
        c.validate().unwrap();
        c.max_batch_ops = 0;
        assert!(matches!(c.validate(), Err(ConfigError::Zero { name: "max_batch_ops" })));
        // A snapshot chunk larger than a message could never be delivered.
        let mut c = Config { peers: parse_peers("1=127.0.0.1:1").unwrap(), ..Config::default() };
        c.snapshot_chunk_bytes = c.max_message_size_bytes;
        let e = c.validate().unwrap_err();
        assert!(matches!(e, ConfigError::ChunkPastMessage { .. }), "{e}");
        assert!(e.to_string().contains("snapshot_chunk_bytes"), "{e}");
        c.snapshot_chunk_bytes = c.max_message_size_bytes - SNAPSHOT_CHUNK_HEADROOM_BYTES;
        c.validate().unwrap();
        c.max_batch_ops = 1;
        c.blob_gc_live_percent = 100;
        let err = c.validate().unwrap_err();
        assert!(err.to_string().contains("blob_gc_live_percent"), "{err}");
    }
}
