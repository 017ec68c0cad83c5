//! Runs one PSS node in-process: the Raft node (on its own thread), the Raft transport,
//! and the gRPC services (`PssBlocks`, `PssAdmin`, `RaftTransport`, health, reflection)
//! on a listener the caller bound. `pss serve`, tests and the testbed all call [`run`].

use crate::config::Config;
use crate::node;
use crate::service::{AdminService, BlockService, PipelineStats};
use crate::transport::RaftService;
use anyhow::Context as _;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use wayside_proto::pb::pss_admin_server::PssAdminServer;
use wayside_proto::pb::pss_blocks_server::PssBlocksServer;
use wayside_proto::pb::raft_transport_server::RaftTransportServer;

/// The HTTP/2 flow-control windows every wayside bulk stream uses (Raft appends, batches).
pub use wayside_proto::server::{HTTP2_CONNECTION_WINDOW_BYTES, HTTP2_STREAM_WINDOW_BYTES};

/// Serves one node until `shutdown` is cancelled (or the node fails), then stops in
/// order: stop accepting and drain requests, stop the Raft loop (which answers every
/// waiting request), wait for the transport tasks.
pub async fn run(
    config: Config,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    config.validate().context("invalid PSS configuration")?;
    // Instrumented, not entered: an entered span guard held across `.await` would leak
    // into whatever else the worker thread runs (other nodes of an in-process cluster).
    let span = tracing::info_span!("pss", node = config.id);
    tracing::Instrument::instrument(serve(config, listener, shutdown), span).await
}

async fn serve(
    config: Config,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let id = config.id;
    let addr = listener.local_addr().ok();
    let inner = shutdown.child_token();
    let tracker = TaskTracker::new();
    let started = node::start(
        config.clone(),
        tokio::runtime::Handle::current(),
        tracker.clone(),
        inner.clone(),
    )
    .with_context(|| format!("starting PSS node {id} in {}", config.data_dir.display()))?;
    let handle = started.handle.clone();

    // A node loop that stops on its own (a disk error) takes the server down with it.
    let mut status = handle.status.clone();
    let watcher_token = inner.clone();
    tracker.spawn(async move {
        loop {
            if status.borrow_and_update().stopped {
                watcher_token.cancel();
                return;
            }
            tokio::select! {
                _ = watcher_token.cancelled() => return,
                r = status.changed() => if r.is_err() { watcher_token.cancel(); return; },
            }
        }
    });

    let (reporter, health) = wayside_proto::server::health();
    reporter.set_serving::<PssBlocksServer<BlockService>>().await;
    let max = config.max_message_size_bytes;
    let pipeline_stats = std::sync::Arc::new(PipelineStats::default());
    let blocks = PssBlocksServer::new(BlockService {
        node: handle.clone(),
        max_batch_ops: config.max_batch_ops,
        max_blocks: config.max_blocks,
        max_pipeline_requests: config.max_pipeline_requests,
        shutdown: inner.clone(),
        pipeline_stats: pipeline_stats.clone(),
    })
    .max_decoding_message_size(max)
    .max_encoding_message_size(max);
    let admin = PssAdminServer::new(AdminService {
        node: handle.clone(),
        pipeline_stats,
        learner_catch_up_timeout: Duration::from_millis(config.learner_catch_up_timeout_ms),
    });
    let raft = RaftTransportServer::new(RaftService {
        id,
        node_tx: handle.tx.clone(),
        snap_dir: handle.snap_dir.clone(),
        shutdown: inner.clone(),
    })
    .max_decoding_message_size(max)
    .max_encoding_message_size(max);
    tracing::info!(?addr, data_dir = %config.data_dir.display(), "PSS node serving");
    let incoming = wayside_proto::server::incoming(listener);
    let builder = wayside_proto::server::with_keepalive(
        tonic::transport::Server::builder(),
        config.http2_keepalive_interval_ms,
        config.http2_keepalive_timeout_ms,
    );
    let served = builder
        // Raft appends and batched writes are large; the 64 KiB HTTP/2 default windows
        // would cost a round trip per 64 KiB.
        .initial_connection_window_size(HTTP2_CONNECTION_WINDOW_BYTES)
        .initial_stream_window_size(HTTP2_STREAM_WINDOW_BYTES)
        .add_service(health)
        .add_service(wayside_proto::server::reflection())
        .add_service(blocks)
        .add_service(admin)
        .add_service(raft)
        .serve_with_incoming_shutdown(incoming, inner.clone().cancelled_owned())
        .await;
    inner.cancel();
    let joined = tokio::task::spawn_blocking(move || started.thread.join())
        .await
        .context("joining the raft thread")?;
    tracker.close();
    tracker.wait().await;
    tracing::info!("PSS node stopped");
    served.context("gRPC server failed")?;
    match joined {
        Ok(r) => r.context("raft node failed"),
        Err(_) => anyhow::bail!("raft thread panicked"),
    }
}
