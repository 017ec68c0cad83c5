//! The `nms serve` configuration: a TOML file (`--config`), overridden by flags.

use serde::{Deserialize, Serialize};

/// The most `max_header_list_bytes` may be set to, in bytes: a header list of more fields
/// than an `http::HeaderMap` holds (32768, each counted at 32 bytes at least) would fail.
pub const MAX_HEADER_LIST_BYTES_LIMIT: u32 = wayside_proto::h2conn::MAX_HEADER_LIST_BYTES;

/// Settings of one NMS; every limit is named with its unit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address to listen on for gRPC (vehicle API, admin, migration).
    pub listen: String,
    /// Address vehicles and other NMSs reach this node at (recorded in the PSS as the
    /// owner address, sent in redirects). Empty: the bound listen address.
    pub advertise: String,
    /// This node's name (recorded in the PSS as the volume owner).
    pub node_id: String,
    /// PSS node addresses (`host:port`).
    pub pss: Vec<String>,
    /// Memory budget for every volume's cached blocks together, in bytes.
    pub cache_capacity_bytes: u64,
    /// Block buffers faulted in at start and kept for incoming blocks (writes, a move's
    /// blocks), in bytes; freed blocks return to it up to this size. Resident memory on
    /// top of the cache; at most `cache_capacity_bytes` of it is used; 0 disables it (see
    /// the `pool` module: it spares a move's target the page faults of fresh memory). As
    /// `/init` of the VM image: 0 unless the image's `nms.toml` sets it.
    pub block_pool_bytes: u64,
    /// Most unpersisted (dirty) bytes across all volumes, each dirty block counted as its
    /// data plus `cache::ENTRY_OVERHEAD_BYTES` (192); writes beyond wait.
    pub dirty_limit_bytes: u64,
    /// Most unpersisted bytes of one volume (counted the same way); writes beyond wait.
    pub dirty_limit_bytes_per_volume: u64,
    /// How long a write may wait for dirty space before RESOURCE_EXHAUSTED, in milliseconds.
    pub backpressure_wait_ms: u64,
    /// Request ids remembered per volume for duplicate detection (oldest forgotten first).
    /// Keep it above the vehicles' journal length in writes.
    pub dedupe_entries_per_volume: usize,
    /// Most block changes in one write-back batch (the PSS's `max_batch_ops` or less).
    pub max_batch_ops: usize,
    /// Most data bytes in one write-back batch.
    pub max_batch_bytes: u64,
    /// How long dirty data may wait before write-back starts, in milliseconds (0: at once;
    /// a flush always starts it at once, and so does dirty data past
    /// `writeback_start_dirty_bytes[_per_volume]`). Writes to a volume during a write-back
    /// wait for the next round, so a block rewritten continuously costs one PSS write per
    /// delay (a backlog of full batches is written back without waiting). Nothing waits on
    /// it: accepted writes are in the vehicle's journal until persisted, and a flush
    /// starts write-back at once; it trades the accepted-to-persisted lag for fewer PSS
    /// writes. Measured with 16 vehicles rewriting 256 blocks each, the 3-node PSS on the
    /// same 2 cores: a PSS write of a block cost ~30 us of CPU in all, so at 100 ms
    /// (0.10-0.13 blocks written back per write) the NMS took 190-270k batched writes/s,
    /// at 500 ms 436k, at 1000 ms (0.01-0.02) 491k, and with no write-back 551-690k.
    /// (Linux writes dirty pages back after 30 s; a ZFS transaction group closes after 5 s.)
    pub writeback_delay_ms: u64,
    /// Unpersisted bytes of one volume past which write-back starts at once rather than
    /// after `writeback_delay_ms`, in bytes (like Linux's `dirty_background_bytes`): a
    /// vehicle writing fast is persisted as fast as the PSS takes it, and does not run
    /// into `dirty_limit_bytes_per_volume` while the write-back sleeps.
    pub writeback_start_dirty_bytes_per_volume: u64,
    /// The same across all volumes, in bytes.
    pub writeback_start_dirty_bytes: u64,
    /// Most blocks per volume with a PSS read in flight that are tracked so a write racing
    /// the read wins (past it, reads in flight are answered but not cached).
    pub max_tracked_fetches_per_volume: usize,
    /// Most volumes cached on this node (redirect markers aside: `max_moved_markers`).
    pub max_volumes: usize,
    /// When a load or a move in finds `max_volumes` reached: a volume with everything it
    /// accepted persisted and no block operation for this long, in milliseconds, is
    /// unloaded to make room (the longest idle first; its vehicle's next call is told to
    /// attach again and loads it anew from the PSS). Without it the volumes of vehicles
    /// that parked or went silent in range, or that anyone created, would fill the node
    /// for good. 0: never unload (past `max_volumes` loads are refused).
    pub volume_idle_unload_ms: u64,
    /// Most redirect markers (volumes that moved away, kept to point their vehicles at the
    /// new NMS, ~200 bytes each); the oldest is dropped past it.
    pub max_moved_markers: usize,
    /// Most volume loads at once (a PSS read, then an epoch claim) started by block calls
    /// without an attach (a call naming a volume not cached here), in loads. Each runs in a
    /// task of its own that goes on after its caller gives up, and refusing a made-up
    /// credential for a volume not cached here takes a PSS read: without a limit, callers
    /// giving up on call after call started any number. A call waits for a slot within its
    /// own deadline. (An Attach loads within its call.)
    pub max_background_loads: usize,
    /// Most operations per second on one volume (reads answered, writes and deletes
    /// applied; a batch counts each of its operations), so one vehicle cannot take an
    /// RSU's capacity from the others. Past it an operation waits (up to
    /// `rate_limit_wait_ms`) and then fails RESOURCE_EXHAUSTED (a `LimitExceeded` fault the
    /// client library backs off on). A 27 Mbit/s radio carries ~800 4 KiB operations/s.
    pub max_volume_ops_per_s: u64,
    /// Operations a volume may make at once after being idle (the budget's depth), in
    /// operations.
    pub volume_ops_burst: u64,
    /// Longest an operation waits for its volume's budget (`max_volume_ops_per_s`), in
    /// milliseconds; 0: refused at once.
    pub rate_limit_wait_ms: u64,
    /// Largest gRPC message accepted or sent, in bytes.
    pub max_message_size_bytes: usize,
    /// A vehicle call's request DATA frames shorter than this are copied into one buffer on
    /// arrival, in bytes; longer ones are decoded where they were received (uncopied). Kept
    /// as received, a frame costs a 32-byte handle and holds its receive buffer, so a
    /// message sent in tiny frames would hold many times its size. 0: nothing is copied.
    pub request_copy_below_bytes: usize,
    /// The shared secret admin calls (`nms migrate`, `status`, `shutdown`, the SMF) and
    /// other NMSs' migrations must carry (16 to 256 visible ASCII characters; the same on
    /// every NMS of a road). Unset: those calls are not authenticated (a warning at start).
    /// `WAYSIDE_CLUSTER_TOKEN` in the environment overrides it.
    pub cluster_token: Option<wayside_proto::token::ClusterToken>,
    /// TLS (`[tls]`: `cert`, `key`, `ca`, PEM files): with `cert` and `key` this node
    /// serves vehicles, operators and other NMSs over TLS only (asking none of them for a
    /// certificate); with `ca` it dials the PSS and other NMSs over TLS only, presenting
    /// its certificate (the PSS requires one). Unset: plaintext.
    pub tls: wayside_proto::tls::TlsFiles,
    /// How long a connection has to finish its TLS handshake, in milliseconds.
    pub tls_handshake_timeout_ms: u64,
    /// Most TLS handshakes under way at once per serving thread (`serve_threads`), in
    /// connections; a connection past it is closed at once (callers that connect and stall
    /// hold at most this many sockets).
    pub max_tls_handshakes: usize,
    /// Most of those from one source address, in connections: a host that connects and
    /// stalls over and over takes at most this many slots from everyone else's handshakes.
    pub max_tls_handshakes_per_source: usize,
    /// Most connections open at once (vehicles, operators, other NMSs, across the serving
    /// threads), in connections; one past it is closed as soon as it is accepted (the
    /// client library retries with backoff). Each attached volume's client keeps one open;
    /// an idle one holds a 64 KiB receive buffer (256 KiB once it sent large frames). The
    /// soft open-file limit is raised to the hard one at start, with a warning if this plus
    /// 256 still exceeds it.
    pub max_connections: usize,
    /// Most connections open at once from one source address, in connections (at most
    /// `max_connections`; larger acts as it): one host cannot take every slot from the
    /// vehicles, peers and migrations of the road. A vehicle keeps one per attached volume.
    /// Callers behind one address (vehicles behind a NAT, every host connection to a VM on
    /// QEMU user-mode networking, a loopback testbed) share it; a host with many IPv4
    /// addresses gets it once per address; IPv6 sources count by /64.
    pub max_connections_per_source: usize,
    /// Most operations in flight on one vehicle stream; more wait. Also the most replies a
    /// stream gathers from the messages already received before they leave together.
    pub max_stream_inflight_ops: usize,
    /// Most operations in one `StreamBatches` message; a larger batch ends the stream with
    /// INVALID_ARGUMENT.
    pub max_stream_batch_ops: usize,
    /// Most concurrent HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
    /// Longest request header block (encoded, HEADERS and CONTINUATIONs) and header list
    /// (decoded) per call, in bytes: a longer block closes the connection (PROTOCOL_ERROR),
    /// a longer list is answered RESOURCE_EXHAUSTED.
    pub max_header_list_bytes: u32,
    /// Threads dedicated to serving gRPC connections, each connection on one of them for
    /// its whole life: less CPU per small request (no hops between runtime workers), but a
    /// single bulk stream (a migration) is then served by one thread. 0: connections are
    /// served by the process's runtime workers. Default: half the CPUs this process may
    /// use, at least 1, so write-back and migrations (on the runtime workers) keep CPUs
    /// of their own (on 2 CPUs, 1 serving thread served 16 vehicles' unary calls 1.4-1.5x
    /// faster than the runtime workers did).
    pub serve_threads: usize,
    /// Longest wait of a request behind a paused (switching) volume, in milliseconds.
    pub pause_wait_ms: u64,
    /// Pre-copy rounds at most before the switch.
    pub migration_max_rounds: u32,
    /// Most blocks a volume moving out tracks as changed between two rounds, in blocks
    /// (each ~20 bytes): a vehicle writing more distinct blocks than that during one round
    /// fails the move (it stays at the source), as the next round could not name them all.
    pub migration_max_changed_blocks: usize,
    /// Switch once a round's changed data is below this many bytes...
    pub migration_switch_below_bytes: u64,
    /// ...and would take at most this many microseconds to send at the fastest rate a
    /// round reached (the vehicle waits while the switch sends it; 0: no time condition).
    /// Another round is tried only while the changes shrink, and never past
    /// `migration_max_rounds`. Over a 1 Gbit/s link the 1 MiB threshold alone left 8 ms of
    /// data to the switch; at 2000 us a remainder of ~200 KB took 6-7 ms to cross (pauses
    /// of 7-13 ms in 6 of 26 moves), at 1000 us every pause of 18 moves took 0.9-1.8 ms.
    pub migration_switch_transfer_us: u64,
    /// Most block data per migration frame, in bytes.
    pub migration_frame_bytes: u64,
    /// Longest a whole migration may take before it aborts, in milliseconds, on either
    /// side: every wait of the source on the target (its answers, and room on a link that
    /// stopped taking data) ends by it, and a target drops an incoming move not switched
    /// within it of `Begin`.
    pub migration_timeout_ms: u64,
    /// Longest the switch may wait for the target (room on the link for the remainder,
    /// then its Switched), counted from the pause, in milliseconds; within
    /// `migration_timeout_ms`. The vehicle's requests wait meanwhile (`pause_wait_ms`), so
    /// a target or link gone silent during the switch costs the vehicle this much, not
    /// the rest of the move's time: the move is settled (or taken back) and served here.
    pub migration_switch_timeout_ms: u64,
    /// Longest wait, once the switch is decided, for the volume's write-back batch in
    /// flight to the PSS to finish, in milliseconds (no new batch starts meanwhile). The
    /// target raises the epoch in the PSS during the switch, behind whatever the PSS is
    /// still committing: an 8 MiB write-back batch there put 17-35 ms into the pause.
    /// 0: do not wait.
    pub migration_writeback_drain_ms: u64,
    /// Timeout of one PSS call, in milliseconds.
    pub pss_rpc_timeout_ms: u64,
    /// How long a PSS call is retried (leader changes) before it fails, in milliseconds.
    pub pss_deadline_ms: u64,
    /// Most bytes of block data one read from the PSS asks for (a cache miss of many
    /// blocks goes in several reads, side by side), at least one block of the largest size
    /// (1 MiB). The PSS refuses a reply past half its `max_message_size_bytes`: keep this
    /// below that.
    pub pss_read_bytes: u64,
    /// Largest message sent to or received from the PSS, in bytes: at least twice
    /// `pss_read_bytes` and `max_batch_bytes` (a read's reply, a write-back batch).
    pub pss_max_message_size_bytes: usize,
    /// Longest a shutdown waits for write-back to drain, in milliseconds.
    pub shutdown_flush_timeout_ms: u64,
    /// After the write-back drain at shutdown, how long open calls get to finish before
    /// their connections are closed, in milliseconds (a caller holding a call open would
    /// otherwise keep the node from ever exiting).
    pub shutdown_grace_ms: u64,
    /// HTTP/2 PING sent on a connection (idle or not) after this long without a frame
    /// from the peer, in milliseconds (0: never). A vehicle or NMS that vanished without
    /// closing (out of range, crashed) would otherwise hold its calls, and a shutdown that
    /// waits for them, until TCP gives up (~15 min).
    pub http2_keepalive_interval_ms: u64,
    /// A connection whose PING goes unanswered this long is closed, in milliseconds.
    pub http2_keepalive_timeout_ms: u64,
    /// Bytes a caller may have sent on one connection and its calls not consumed (the
    /// HTTP/2 connection window), in bytes. Large for migrations and batched writes (a
    /// window costs a round trip per window's worth in flight). It also bounds the request
    /// bytes a connection's calls hold taken and not yet decoded (messages begun), so what
    /// callers can make this node buffer is at most `max_connections` times twice this plus
    /// `http2_max_frame_bytes` (64 MiB and 256 KiB by default: lower them where many
    /// callers are not trusted). At least `max_message_size_bytes`.
    pub http2_connection_window_bytes: u32,
    /// The same for one call (the HTTP/2 stream window), in bytes.
    pub http2_stream_window_bytes: u32,
    /// Largest HTTP/2 frame a caller may send, in bytes (16384 to 16777215).
    pub http2_max_frame_bytes: u32,
    /// Replies queued on one connection past which it neither reads nor polls its calls'
    /// replies until the socket has taken them (a caller that stops reading), in bytes.
    pub http2_send_buffer_bytes: usize,
    /// Most request DATA payloads one connection holds uncopied (as slices of receive
    /// buffers, each of which may keep its whole 64-256 KiB buffer alive); past it they are
    /// copied, in slices.
    pub http2_max_held_slices: usize,
    /// Most calls a caller may reset (or make this node reset) while they run, per second
    /// on one connection, before the connection is closed (ENHANCE_YOUR_CALM, the "Rapid
    /// Reset" attack), in resets per second.
    pub http2_max_resets_per_s: u32,
}

/// Most serving threads (`Config::serve_threads`).
pub const MAX_SERVE_THREADS: usize = 256;

/// Most bytes one request id takes in a move's `SwitchOver`, in bytes: a run of its own
/// (a 64-byte client id, and a seq, an lsn and a version of up to 10 bytes each, with
/// their tags and lengths).
pub const MAX_SWITCH_ID_BYTES: u64 = 106;

/// Half the CPUs this process may use, at least 1 (see `Config::serve_threads`).
pub fn default_serve_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7100".into(),
            advertise: String::new(),
            node_id: "nms-1".into(),
            pss: vec!["127.0.0.1:7400".into()],
            cache_capacity_bytes: 1 << 30,
            block_pool_bytes: 128 << 20,
            dirty_limit_bytes: 256 << 20,
            dirty_limit_bytes_per_volume: 64 << 20,
            backpressure_wait_ms: 2_000,
            dedupe_entries_per_volume: 65_536,
            max_batch_ops: 1024,
            max_batch_bytes: 8 << 20,
            writeback_delay_ms: 1_000,
            writeback_start_dirty_bytes_per_volume: 16 << 20,
            writeback_start_dirty_bytes: 64 << 20,
            max_tracked_fetches_per_volume: 65_536,
            max_volumes: 4096,
            volume_idle_unload_ms: 60_000,
            max_moved_markers: 65_536,
            max_background_loads: 64,
            max_message_size_bytes: 16 << 20,
            request_copy_below_bytes: wayside_proto::h2serve::DEFAULT_COPY_BELOW_BYTES,
            cluster_token: None,
            tls: wayside_proto::tls::TlsFiles::default(),
            tls_handshake_timeout_ms: 5_000,
            max_tls_handshakes: 256,
            max_tls_handshakes_per_source: 16,
            max_connections: 4096,
            max_connections_per_source: 1024,
            max_stream_inflight_ops: 256,
            max_stream_batch_ops: 256,
            max_concurrent_streams: 1024,
            max_header_list_bytes: 16 * 1024,
            serve_threads: default_serve_threads(),
            pause_wait_ms: 5_000,
            max_volume_ops_per_s: 100_000,
            volume_ops_burst: 10_000,
            rate_limit_wait_ms: 1_000,
            migration_max_rounds: 8,
            migration_max_changed_blocks: 1 << 20,
            migration_switch_below_bytes: 1 << 20,
            migration_switch_transfer_us: 1_000,
            migration_frame_bytes: 1 << 20,
            migration_timeout_ms: 30_000,
            migration_switch_timeout_ms: 2_000,
            migration_writeback_drain_ms: 200,
            pss_rpc_timeout_ms: 2_000,
            pss_deadline_ms: 10_000,
            pss_read_bytes: 8 << 20,
            pss_max_message_size_bytes: 64 << 20,
            shutdown_flush_timeout_ms: 10_000,
            shutdown_grace_ms: 5_000,
            http2_keepalive_interval_ms: wayside_proto::server::HTTP2_KEEPALIVE_INTERVAL_MS,
            http2_keepalive_timeout_ms: wayside_proto::server::HTTP2_KEEPALIVE_TIMEOUT_MS,
            http2_connection_window_bytes: wayside_proto::server::HTTP2_CONNECTION_WINDOW_BYTES,
            http2_stream_window_bytes: wayside_proto::server::HTTP2_STREAM_WINDOW_BYTES,
            http2_max_frame_bytes: wayside_proto::server::HTTP2_MAX_FRAME_BYTES,
            http2_send_buffer_bytes: wayside_proto::h2conn::DEFAULT_SEND_BUFFER_BYTES,
            http2_max_held_slices: wayside_proto::h2conn::DEFAULT_MAX_HELD_SLICES,
            http2_max_resets_per_s: wayside_proto::h2conn::DEFAULT_MAX_RESETS_PER_S,
        }
    }
}

impl Config {
    /// Checks the settings make sense together.
    pub fn validate(&self) -> Result<(), String> {
        if self.node_id.is_empty() {
            return Err("node_id must not be empty".into());
        }
        if self.pss.is_empty() {
            return Err("pss: at least one PSS address is needed".into());
        }
        for a in &self.pss {
            wayside_proto::types::Endpoint::parse(a).map_err(|e| format!("pss: {e}"))?;
        }
        if !self.advertise.is_empty() {
            wayside_proto::types::Endpoint::parse(&self.advertise)
                .map_err(|e| format!("advertise: {e}"))?;
            // Recorded as the owner address and sent in redirects: an https:// address of
            // a node serving plaintext would send every vehicle to a handshake that fails.
            let serves_tls = self.tls.cert.is_some() && self.tls.key.is_some();
            if self.advertise.trim().starts_with("https://") && !serves_tls {
                return Err(format!(
                    "advertise {} is https://, but this node serves plaintext (no tls.cert and \
                     tls.key)",
                    self.advertise
                ));
            }
        }
        for (name, v) in [
            ("cache_capacity_bytes", self.cache_capacity_bytes),
            ("dirty_limit_bytes", self.dirty_limit_bytes),
            ("dirty_limit_bytes_per_volume", self.dirty_limit_bytes_per_volume),
            ("max_batch_bytes", self.max_batch_bytes),
            ("migration_frame_bytes", self.migration_frame_bytes),
            ("max_batch_ops", self.max_batch_ops as u64),
            ("max_volumes", self.max_volumes as u64),
            ("max_moved_markers", self.max_moved_markers as u64),
            ("max_background_loads", self.max_background_loads as u64),
            ("max_volume_ops_per_s", self.max_volume_ops_per_s),
            ("volume_ops_burst", self.volume_ops_burst),
            ("max_tracked_fetches_per_volume", self.max_tracked_fetches_per_volume as u64),
            ("max_stream_inflight_ops", self.max_stream_inflight_ops as u64),
            ("max_stream_batch_ops", self.max_stream_batch_ops as u64),
            ("migration_max_rounds", u64::from(self.migration_max_rounds)),
            ("migration_max_changed_blocks", self.migration_max_changed_blocks as u64),
            ("migration_timeout_ms", self.migration_timeout_ms),
            ("migration_switch_timeout_ms", self.migration_switch_timeout_ms),
            ("tls_handshake_timeout_ms", self.tls_handshake_timeout_ms),
            ("max_tls_handshakes", self.max_tls_handshakes as u64),
            ("max_tls_handshakes_per_source", self.max_tls_handshakes_per_source as u64),
            ("max_connections", self.max_connections as u64),
            ("max_connections_per_source", self.max_connections_per_source as u64),
            ("max_concurrent_streams", u64::from(self.max_concurrent_streams)),
            ("http2_send_buffer_bytes", self.http2_send_buffer_bytes as u64),
            ("http2_max_resets_per_s", u64::from(self.http2_max_resets_per_s)),
            // 0 would remember no request id: a retried write would be applied twice.
            ("dedupe_entries_per_volume", self.dedupe_entries_per_volume as u64),
            ("pss_rpc_timeout_ms", self.pss_rpc_timeout_ms),
            ("pss_deadline_ms", self.pss_deadline_ms),
        ] {
            if v == 0 {
                return Err(format!("{name} must be > 0"));
            }
        }
        if self.http2_keepalive_interval_ms > 0 && self.http2_keepalive_timeout_ms == 0 {
            return Err("http2_keepalive_timeout_ms must be > 0 when \
                        http2_keepalive_interval_ms is (0 would close every connection at \
                        its first PING)"
                .into());
        }
        if self.serve_threads > MAX_SERVE_THREADS {
            return Err(format!(
                "serve_threads ({}) must be at most {MAX_SERVE_THREADS}",
                self.serve_threads
            ));
        }
        let block = u64::from(wayside_proto::types::MAX_BLOCK_SIZE_BYTES);
        if self.pss_read_bytes < block {
            return Err(format!(
                "pss_read_bytes ({}) must be at least {block} (one block of the largest size)",
                self.pss_read_bytes
            ));
        }
        let pss_half = self.pss_max_message_size_bytes as u64 / 2;
        if self.pss_read_bytes > pss_half || self.max_batch_bytes > pss_half {
            return Err(format!(
                "pss_read_bytes ({}) and max_batch_bytes ({}) must be at most half of \
                 pss_max_message_size_bytes ({}): a read's reply and a write-back batch are \
                 one message each, with room for their framing",
                self.pss_read_bytes, self.max_batch_bytes, self.pss_max_message_size_bytes
            ));
        }
        if self.migration_frame_bytes > self.max_message_size_bytes as u64 / 2 {
            return Err(format!(
                "migration_frame_bytes ({}) must be at most half of max_message_size_bytes \
                 ({}): a frame carries a block past it, and the target refuses larger messages",
                self.migration_frame_bytes, self.max_message_size_bytes
            ));
        }
        // A switch carries the request ids remembered since the last round in one message:
        // at most the whole dedupe table, which must fit in half a message.
        let ids_bytes = self.dedupe_entries_per_volume as u64 * MAX_SWITCH_ID_BYTES;
        if ids_bytes > self.max_message_size_bytes as u64 / 2 {
            return Err(format!(
                "dedupe_entries_per_volume ({}) ids take up to {ids_bytes} bytes in a move's \
                 SwitchOver ({MAX_SWITCH_ID_BYTES} each), more than half of \
                 max_message_size_bytes ({}): lower one or raise the other",
                self.dedupe_entries_per_volume, self.max_message_size_bytes
            ));
        }
        if self.tls.ca.is_some() && (self.tls.cert.is_none() || self.tls.key.is_none()) {
            return Err("tls.ca without tls.cert and tls.key: the PSS asks this node for the \
                        road's certificate, so it could reach no PSS (set all three, or none)"
                .into());
        }
        if self.dirty_limit_bytes > self.cache_capacity_bytes {
            return Err(format!(
                "dirty_limit_bytes ({}) must not exceed cache_capacity_bytes ({}) (with a \
                 smaller cache, set dirty_limit_bytes and dirty_limit_bytes_per_volume in a \
                 --config file)",
                self.dirty_limit_bytes, self.cache_capacity_bytes
            ));
        }
        if self.dirty_limit_bytes_per_volume > self.dirty_limit_bytes {
            return Err("dirty_limit_bytes_per_volume must not exceed dirty_limit_bytes".into());
        }
        if !(1024..=MAX_HEADER_LIST_BYTES_LIMIT).contains(&self.max_header_list_bytes) {
            return Err(format!(
                "max_header_list_bytes ({}) must be from 1024 (a gRPC call's headers) to {}",
                self.max_header_list_bytes, MAX_HEADER_LIST_BYTES_LIMIT
            ));
        }
        const MAX_WINDOW: u32 = (1 << 31) - 1;
        for (name, v) in [
            ("http2_connection_window_bytes", self.http2_connection_window_bytes),
            ("http2_stream_window_bytes", self.http2_stream_window_bytes),
        ] {
            if !(65_535..=MAX_WINDOW).contains(&v) {
                return Err(format!("{name} ({v}) must be from 65535 to {MAX_WINDOW}"));
            }
        }
        if !(16_384..=16_777_215).contains(&self.http2_max_frame_bytes) {
            return Err(format!(
                "http2_max_frame_bytes ({}) must be from 16384 to 16777215",
                self.http2_max_frame_bytes
            ));
        }
        // A message of the largest size, its 5-byte prefix and the start of the next in
        // the same frame: what a call may hold undecoded.
        let hold = self.max_message_size_bytes + 5 + self.http2_max_frame_bytes as usize;
        if (self.http2_connection_window_bytes as usize) < hold {
            return Err(format!(
                "http2_connection_window_bytes ({}) must be at least max_message_size_bytes \
                 ({}) + 5 + http2_max_frame_bytes ({}): a connection's calls hold at most its \
                 window of undecoded request bytes, and a message of the largest size must fit",
                self.http2_connection_window_bytes,
                self.max_message_size_bytes,
                self.http2_max_frame_bytes
            ));
        }
        let max_block = u64::from(wayside_proto::types::MAX_BLOCK_SIZE_BYTES);
        if (self.max_message_size_bytes as u64) < 2 * max_block {
            return Err(format!("max_message_size_bytes must be at least {}", 2 * max_block));
        }
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
        back.validate().unwrap();
        let err =
            wayside_proto::config::parse::<Config>("listen = \"x\"\nbogus = 1\n").unwrap_err();
        assert!(err.to_string().contains("bogus"), "{err}");
    }

    #[test]
    fn validate_names_the_bad_setting() {
        let c = Config { dirty_limit_bytes: 2 << 30, ..Config::default() };
        assert!(c.validate().unwrap_err().contains("dirty_limit_bytes"));
        let c = Config {
            pss: vec!["127.0.0.1:7400".into()],
            advertise: "https://10.0.0.1:7100".into(),
            ..Config::default()
        };
        assert!(c.validate().unwrap_err().contains("serves plaintext"));
        let c = Config { pss: vec!["nope".into()], ..Config::default() };
        assert!(c.validate().unwrap_err().contains("pss"));
        let c = Config { max_connections: 0, ..Config::default() };
        assert!(c.validate().unwrap_err().contains("max_connections"));
        let c = Config { max_connections_per_source: 0, ..Config::default() };
        assert!(c.validate().unwrap_err().contains("max_connections_per_source must be > 0"));
        let c = Config { http2_stream_window_bytes: 1000, ..Config::default() };
        assert!(c.validate().unwrap_err().contains("http2_stream_window_bytes"));
        let c = Config { http2_max_frame_bytes: 1 << 24, ..Config::default() };
        assert!(c.validate().unwrap_err().contains("http2_max_frame_bytes"));
        let c = Config { http2_send_buffer_bytes: 0, ..Config::default() };
        assert!(c.validate().unwrap_err().contains("http2_send_buffer_bytes"));
        // Settings that were accepted and then made the node useless or unsafe.
        let bad = [
            (Config { dedupe_entries_per_volume: 0, ..Config::default() }, "dedupe_entries"),
            (Config { pss_rpc_timeout_ms: 0, ..Config::default() }, "pss_rpc_timeout_ms"),
            (Config { pss_deadline_ms: 0, ..Config::default() }, "pss_deadline_ms"),
            (Config { pss_read_bytes: 4096, ..Config::default() }, "pss_read_bytes (4096)"),
            (
                Config { pss_max_message_size_bytes: 8 << 20, ..Config::default() },
                "half of pss_max_message_size_bytes",
            ),
            (Config { http2_keepalive_timeout_ms: 0, ..Config::default() }, "keepalive_timeout"),
            (Config { serve_threads: 100_000, ..Config::default() }, "serve_threads"),
            (Config { migration_frame_bytes: 32 << 20, ..Config::default() }, "migration_frame"),
            // A move's switch could not carry the request ids it must.
            (
                Config {
                    max_message_size_bytes: 4 << 20,
                    migration_frame_bytes: 1 << 20,
                    ..Config::default()
                },
                "dedupe_entries_per_volume (65536) ids",
            ),
            // A window of exactly the message limit could not hold a message of that size.
            (
                Config {
                    http2_connection_window_bytes: Config::default().max_message_size_bytes as u32,
                    ..Config::default()
                },
                "+ 5 + http2_max_frame_bytes",
            ),
        ];
        for (c, name) in bad {
            let e = c.validate().unwrap_err();
            assert!(e.contains(name), "{name}: {e}");
        }
        // The largest id, as a SwitchOver carries it, fits in MAX_SWITCH_ID_BYTES.
        let run = wayside_proto::pb::AppliedRun {
            client_id: "c".repeat(wayside_proto::types::MAX_CLIENT_ID_BYTES),
            seq: vec![u64::MAX],
            lsn: vec![u64::MAX],
            version: vec![u64::MAX],
        };
        let one = wayside_proto::pb::SwitchOver { applied: vec![run], ..Default::default() };
        assert!(prost::Message::encoded_len(&one) as u64 <= MAX_SWITCH_ID_BYTES);
        let mut ca_only = Config::default();
        ca_only.tls.ca = Some("ca.pem".into());
        assert!(ca_only.validate().unwrap_err().contains("tls.ca without"));
        // No keepalive at all: no timeout needed.
        let c = Config {
            http2_keepalive_interval_ms: 0,
            http2_keepalive_timeout_ms: 0,
            ..Config::default()
        };
        c.validate().unwrap();
    }
}
