//! Helpers the PSS's integration tests share (each test file is its own crate and uses
//! some of them).
#![allow(dead_code)]

use std::time::{Duration, Instant};
use wayside_proto::pb;
use wayside_proto::pb::pss_blocks_client::PssBlocksClient;
use wayside_pss::testing::LocalCluster;

pub fn rid(client: &str, seq: u64) -> Option<pb::RequestId> {
    Some(pb::RequestId { client_id: client.into(), seq })
}

pub fn acquire(volume: &str, owner: &str, seq: u64) -> pb::AcquireVolumeRequest {
    pb::AcquireVolumeRequest {
        volume: volume.into(),
        owner_node: owner.into(),
        owner_address: "127.0.0.1:9".into(),
        owner_session: 0,
        expected_epoch: 0,
        create: Some(pb::CreateSpec { block_size: 4096, credential_hash: vec![7; 32] }),
        request_id: rid(owner, seq),
    }
}

pub fn put(
    volume: &str,
    epoch: u64,
    client: &str,
    seq: u64,
    block: u64,
    data: Vec<u8>,
) -> pb::WriteBatchRequest {
    pb::WriteBatchRequest {
        volume: volume.into(),
        epoch,
        request_id: rid(client, seq),
        ops: vec![pb::PssBlockOp { block, data, delete: false, version: 0 }],
        persisted_lsn: seq,
    }
}

/// Waits until node `id` has applied `index`.
pub async fn wait_applied(cluster: &LocalCluster, id: u64, index: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while cluster.status(id).await.is_none_or(|s| s.applied_index < index) {
        assert!(Instant::now() < deadline, "node {id} did not apply {index}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits (at most 20 s) until node `id` has applied `index`, having caught up through a
/// snapshot (its log was compacted past what it had).
pub async fn wait_caught_up_by_snapshot(cluster: &LocalCluster, id: u64, index: u64) {
    wait_applied(cluster, id, index).await;
    let s = cluster.status(id).await.expect("it answered just now");
    assert!(s.snapshot_index > 1, "node {id} caught up through a snapshot: {s:?}");
}

/// Blocks `0..count` of `volume` as node `id` has them applied (a stale read), over
/// the cluster's TLS when it has it.
pub async fn stale_blocks(
    cluster: &LocalCluster,
    id: u64,
    volume: &str,
    count: u64,
) -> Vec<pb::PssBlock> {
    let ch = cluster.channel(&cluster.endpoint(id).unwrap()).unwrap();
    let req = pb::GetBlocksRequest {
        volume: volume.into(),
        blocks: (0..count).collect(),
        consistency: pb::ReadConsistency::Stale as i32,
    };
    PssBlocksClient::new(ch).get_blocks(req).await.unwrap().into_inner().blocks
}

/// Starts node `id` of `cluster` empty (`join`), on a new loopback port, with `tls`
/// (empty: plaintext); returns its address, its stop token and its task.
pub async fn start_joiner(
    cluster: &LocalCluster,
    id: u64,
    tls: wayside_proto::tls::TlsFiles,
    dir: &std::path::Path,
) -> (String, tokio_util::sync::CancellationToken, tokio::task::JoinHandle<anyhow::Result<()>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let mut peers = cluster
        .endpoints()
        .iter()
        .zip(1u64..)
        .map(|(e, id)| wayside_pss::config::Peer { id, address: e.authority().into() })
        .collect::<Vec<_>>();
    peers.push(wayside_pss::config::Peer { id, address: addr.clone() });
    let mut cfg = wayside_pss::testing::test_config(id, peers, dir.join(format!("node-{id}")));
    cfg.join = true;
    cfg.tls = tls;
    let token = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(wayside_pss::server::run(cfg, listener, token.clone()));
    (addr, token, task)
}
