//! Runs one PSS node in-process: the Raft node (on its own thread), the Raft transport,
//! and the gRPC services (`PssBlocks`, `PssAdmin`, `RaftTransport`, health, reflection)
//! on a listener the caller bound. `pss serve`, tests and the testbed all call [`run`].

use crate::config::Config;
use crate::node;
use crate::service::{AdminService, BlockService, PipelineStats};
use crate::transport::{PeerCheck, RaftService, SnapshotReceiving};
use anyhow::Context as _;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use wayside_proto::pb::pss_admin_server::PssAdminServer;
use wayside_proto::pb::pss_blocks_server::PssBlocksServer;
use wayside_proto::pb::raft_transport_server::RaftTransportServer;
use wayside_proto::tls::{ClientAuth, Tls, TlsError};

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
    // Before the node starts (no data dir made yet): a bad file is named now.
    let tls = load_tls(&config).context("PSS TLS set-up ([tls])")?;
    // Instrumented, not entered: an entered span guard held across `.await` would leak
    // into whatever else the worker thread runs (other nodes of an in-process cluster).
    let span = tracing::info_span!("pss", node = config.id);
    tracing::Instrument::instrument(serve(config, tls, listener, shutdown), span).await
}

/// The node's TLS set-up from `config.tls`, read and checked once: `None` when `[tls]` is
/// empty (plaintext). A PSS with TLS needs all three files: its certificate and key (what
/// it serves with, and presents when it dials its peers, which require one of it) and the
/// road's CA (what its callers' and its peers' certificates must be signed by). A node
/// with an identity but no CA could neither check its callers nor reach its peers, so it
/// refuses to start rather than serve half-authenticated.
pub fn load_tls(config: &Config) -> Result<Option<Tls>, TlsError> {
    let Some(tls) = Tls::load(&config.tls)? else { return Ok(None) };
    if !tls.has_identity() {
        return Err(TlsError::NoIdentity("a PSS serves over TLS with its own certificate"));
    }
    if !tls.has_ca() {
        return Err(TlsError::NoCa("a PSS checks its callers' and its peers' certificates"));
    }
    Ok(Some(tls))
}

async fn serve(
    config: Config,
    tls: Option<Tls>,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    wayside_proto::server::raise_open_file_limit(config.max_connections);
    let id = config.id;
    let addr = listener.local_addr().ok();
    let inner = shutdown.child_token();
    let tracker = TaskTracker::new();
    // Checked (and built) before the node starts, so a set-up tonic refuses stops here.
    let server_tls = match &tls {
        Some(t) => Some(
            t.tonic_server(ClientAuth::Required)
                .context("PSS TLS set-up ([tls])")?
                .timeout(Duration::from_millis(config.tls_handshake_timeout_ms)),
        ),
        None => None,
    };
    let started = node::start(
        config.clone(),
        tls.clone(),
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
        max_blocks_per_volume: config.max_blocks_per_volume,
        reserved_blocks: Default::default(),
        max_volumes: config.max_volumes,
        reserved_volumes: Default::default(),
        max_pipeline_requests: config.max_pipeline_requests,
        max_reply_bytes: max / 2,
        shutdown: inner.clone(),
        pipeline_stats: pipeline_stats.clone(),
    })
    .max_decoding_message_size(max)
    .max_encoding_message_size(max);
    let admin = PssAdminServer::new(AdminService {
        node: handle.clone(),
        pipeline_stats,
        learner_catch_up_timeout: Duration::from_millis(config.learner_catch_up_timeout_ms),
        // Over TLS the cluster is changed only with a PSS node's certificate.
        members_only: tls.as_ref().map(|_| PeerCheck::new(handle.addresses.clone())),
    });
    let raft = RaftTransportServer::new(RaftService {
        id,
        node_tx: handle.tx.clone(),
        snap_dir: handle.snap_dir.clone(),
        shutdown: inner.clone(),
        // Over TLS a Raft message is accepted only from the peer its certificate names.
        peers: tls.as_ref().map(|_| PeerCheck::new(handle.addresses.clone())),
        receiving: SnapshotReceiving::new(&config),
    })
    .max_decoding_message_size(max)
    .max_encoding_message_size(max);
    let incoming = wayside_proto::server::incoming(
        listener,
        wayside_proto::server::ConnectionLimit::with_per_source(
            config.max_connections,
            config.max_connections_per_source,
        ),
        config.silence_limit()?,
    );
    let mut builder = tonic::transport::Server::builder();
    match server_tls {
        // tonic wraps every connection of `incoming` in TLS (a handshake task each, bounded
        // by the timeout) before HTTP/2 sees it; a caller without a certificate signed by
        // the CA fails the handshake and never reaches a service.
        Some(server_tls) => {
            builder = builder.tls_config(server_tls).context("PSS TLS set-up ([tls])")?;
            tracing::info!(
                ?addr,
                data_dir = %config.data_dir.display(),
                cert = ?config.tls.cert,
                ca = ?config.tls.ca,
                "PSS node serving over TLS; callers must present a certificate signed by the CA"
            );
        }
        None => {
            tracing::warn!(
                ?addr,
                data_dir = %config.data_dir.display(),
                "PSS node serving PLAINTEXT: no [tls] configured, callers and peers are not \
                 authenticated and blocks cross the network unencrypted"
            );
        }
    }
    let builder = wayside_proto::server::with_keepalive(
        builder,
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
