//! The `Pipeline` stream (many callers' writes and reads over one stream per node), on a
//! real in-process cluster: batching, apply-once, per-request errors that do not end the
//! stream, the stream's limits, and the unary path it replaces still working.

use futures::StreamExt as _;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::time::Duration;
use tonic::Code;
use wayside_proto::error::{fault_of, status_of_stream_error};
use wayside_proto::pb;
use wayside_proto::pb::pipeline_reply::Result as Piped;
use wayside_proto::pb::pipeline_request::Request as Ask;
use wayside_proto::pb::pss_blocks_client::PssBlocksClient;
use wayside_proto::types::{Fault, VolumeName};
use wayside_pss::client::{ClientOptions, PssClient, PssError};
use wayside_pss::testing::LocalCluster;

fn rid(client: &str, seq: u64) -> Option<pb::RequestId> {
    Some(pb::RequestId { client_id: client.into(), seq })
}

fn put(
    volume: &str,
    epoch: u64,
    client: &str,
    seq: u64,
    block: u64,
    fill: u8,
) -> pb::WriteBatchRequest {
    pb::WriteBatchRequest {
        volume: volume.into(),
        epoch,
        request_id: rid(client, seq),
        ops: vec![pb::PssBlockOp { block, data: vec![fill; 4096], delete: false, version: 0 }],
        persisted_lsn: 0,
    }
}

async fn create(client: &PssClient, volume: &str, seq: u64) -> u64 {
    let r = client
        .acquire_volume(pb::AcquireVolumeRequest {
            volume: volume.into(),
            owner_node: "t".into(),
            owner_address: String::new(),
            owner_session: 0,
            expected_epoch: 0,
            create: Some(pb::CreateSpec { block_size: 4096, credential_hash: vec![] }),
            request_id: rid(&format!("acq-{volume}"), seq),
        })
        .await
        .unwrap();
    r.meta.unwrap().epoch
}

async fn pipeline_counts(cluster: &LocalCluster, id: u64) -> (u64, u64) {
    let s = cluster.status(id).await.unwrap();
    (s.pipeline_messages, s.pipeline_requests)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_share_messages_and_each_write_applies_once() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(3, dir.path()).await.unwrap();
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await.unwrap();
    let client = PssClient::new(cluster.endpoints(), ClientOptions::default());
    let epoch = create(&client, "pipe-1", 1).await;
    let before = pipeline_counts(&cluster, leader).await;

    // 64 callers, 16 writes each, all at once over one client (one pipeline per node).
    const CALLERS: u64 = 64;
    const WRITES: u64 = 16;
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..CALLERS {
        let client = client.clone();
        tasks.spawn(async move {
            for w in 0..WRITES {
                let block = c * WRITES + w;
                let r = client
                    .write_batch(put("pipe-1", epoch, &format!("c{c}"), w + 1, block, block as u8))
                    .await
                    .unwrap();
                assert!(!r.duplicate);
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    // The leader may have changed meanwhile (then its successor counted the rest).
    let leader_now = cluster.wait_for_leader(Duration::from_secs(10)).await.unwrap();
    let after = pipeline_counts(&cluster, leader_now).await;
    if leader_now == leader {
        let (messages, requests) = (after.0 - before.0, after.1 - before.1);
        assert!(requests >= CALLERS * WRITES, "{requests} requests went by Pipeline");
        assert!(
            messages < requests,
            "concurrent requests shared no message: {messages} messages for {requests} requests"
        );
    }

    // Every block reads back (pipelined reads), and a retried id applies once.
    let vol = VolumeName::new("pipe-1").unwrap();
    let all: Vec<u64> = (0..CALLERS * WRITES).collect();
    let got = client.get_blocks(&vol, &all).await.unwrap();
    for (b, blk) in all.iter().zip(&got) {
        assert!(blk.found, "block {b} missing");
        assert_eq!(blk.data, vec![*b as u8; 4096], "block {b}");
        assert_eq!(blk.version, 1, "block {b} applied more than once");
    }
    let again = client.write_batch(put("pipe-1", epoch, "c3", 1, 3 * WRITES, 0xEE)).await.unwrap();
    assert!(again.duplicate);
    let blk = &client.get_blocks(&vol, &[3 * WRITES]).await.unwrap()[0];
    assert_eq!(blk.data, vec![(3 * WRITES) as u8; 4096]);

    // The unary path (pipeline off) still serves the same data.
    let unary = PssClient::new(
        cluster.endpoints(),
        ClientOptions { pipeline: false, ..Default::default() },
    );
    let before = pipeline_counts(&cluster, leader_now).await;
    unary.write_batch(put("pipe-1", epoch, "u", 1, 5000, 0x55)).await.unwrap();
    assert_eq!(unary.get_blocks(&vol, &[5000]).await.unwrap()[0].data, vec![0x55; 4096]);
    let after = pipeline_counts(&cluster, leader_now).await;
    assert_eq!(after, before, "a client with pipeline off used the Pipeline");

    // A stale epoch through the pipeline is the same typed error as unary.
    let newer = create(&unary, "pipe-1", 2).await;
    assert!(newer > epoch);
    let err = client.write_batch(put("pipe-1", epoch, "x", 1, 0, 1)).await.unwrap_err();
    assert!(matches!(err, PssError::StaleEpoch { .. }), "{err:?}");

    // Shutting down with the pipeline stream still open ends promptly (the stream ends
    // with its node instead of holding the server's graceful shutdown).
    tokio::time::timeout(Duration::from_secs(30), cluster.shutdown())
        .await
        .expect("cluster shutdown hung with a Pipeline stream open");
    drop(client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_stream_answers_each_request_and_enforces_its_limits() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(3, dir.path()).await.unwrap();
    let client = cluster.client();
    let epoch = create(&client, "pipe-2", 1).await;
    let mut stale = put("pipe-2", epoch, "r", 2, 1, 2);
    stale.epoch = 0;
    let batch = pb::PipelineRequests {
        requests: vec![
            pb::PipelineRequest {
                tag: 7,
                request: Some(Ask::Write(put("pipe-2", epoch, "r", 1, 0, 1))),
            },
            pb::PipelineRequest { tag: 8, request: Some(Ask::Write(stale)) },
            pb::PipelineRequest { tag: 9, request: None },
            pb::PipelineRequest {
                tag: 10,
                request: Some(Ask::Get(pb::GetBlocksRequest {
                    volume: "no-such".into(),
                    blocks: vec![0],
                    consistency: 0,
                })),
            },
        ],
    };
    // On the leader (a follower answers each request NotLeader); again if it moved.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let (mut raw, replies) = loop {
        let leader = cluster.wait_for_leader(Duration::from_secs(10)).await.unwrap();
        let ep = cluster.endpoint(leader).unwrap();
        let mut raw = PssBlocksClient::connect(ep.uri().to_owned()).await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(batch.clone()).await.unwrap();
        let mut inbound = raw
            .pipeline(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        let mut replies = std::collections::HashMap::new();
        while replies.len() < 4 {
            let m = inbound.message().await.unwrap().expect("the stream ended early");
            for r in m.replies {
                replies.insert(r.tag, r.result.unwrap());
            }
        }
        // The stream goes on after errors: one more write on it is answered.
        tx.send(pb::PipelineRequests {
            requests: vec![pb::PipelineRequest {
                tag: 11,
                request: Some(Ask::Write(put("pipe-2", epoch, "r", 3, 2, 3))),
            }],
        })
        .await
        .unwrap();
        let m = inbound.message().await.unwrap().unwrap();
        replies.insert(m.replies[0].tag, m.replies[0].result.clone().unwrap());
        drop(tx);
        // Half-closed and all answered: the stream ends with OK.
        assert!(inbound.message().await.unwrap().is_none());
        let not_leader = replies.values().any(|r| {
            matches!(r, Piped::Error(e) if matches!(fault_of(&status_of_stream_error(e.clone())), Some(Fault::NotLeader { .. })))
        });
        if !not_leader || std::time::Instant::now() > deadline {
            break (raw, replies);
        }
    };
    assert!(matches!(&replies[&7], Piped::Write(w) if !w.duplicate), "{:?}", replies[&7]);
    let Piped::Error(e) = &replies[&8] else { panic!("stale write accepted: {:?}", replies[&8]) };
    let st = status_of_stream_error(e.clone());
    assert_eq!(st.code(), Code::FailedPrecondition);
    assert!(matches!(fault_of(&st), Some(Fault::StaleEpoch { .. })), "{st:?}");
    assert!(matches!(&replies[&9], Piped::Error(e) if e.code == Code::InvalidArgument as i32));
    assert!(matches!(&replies[&10], Piped::Error(e) if e.code == Code::NotFound as i32));
    assert!(matches!(&replies[&11], Piped::Write(_)), "{:?}", replies[&11]);
    let vol = VolumeName::new("pipe-2").unwrap();
    let got = client.get_blocks(&vol, &[0, 1, 2]).await.unwrap();
    assert!(got[0].found && !got[1].found && got[2].found, "{got:?}");

    // A message over max_pipeline_requests ends the stream before any of it runs.
    let limit = wayside_pss::Config::default().max_pipeline_requests;
    let over = pb::PipelineRequests {
        requests: (0..=limit as u64)
            .map(|i| pb::PipelineRequest {
                tag: i,
                request: Some(Ask::Write(put("pipe-2", epoch, "over", i + 1, 100 + i, 9))),
            })
            .collect(),
    };
    let out = tokio_stream::iter(vec![over]);
    let mut inbound = raw.pipeline(out).await.unwrap().into_inner();
    let st = match inbound.next().await {
        Some(Ok(m)) => panic!("answered an over-limit message: {} replies", m.replies.len()),
        Some(Err(st)) => st,
        None => panic!("the stream ended without an error"),
    };

    assert_eq!(st.code(), Code::ResourceExhausted, "{st:?}");
    assert!(matches!(fault_of(&st), Some(Fault::LimitExceeded { .. })), "{st:?}");
    let got = client.get_blocks(&vol, &[100, 100 + limit as u64]).await.unwrap();
    assert!(!got[0].found && !got[1].found, "part of an over-limit message was applied");
    cluster.shutdown().await;
}

/// A PSS node from before `Pipeline` (a unit stand-in: it keeps blocks in a map and
/// answers `Pipeline` UNIMPLEMENTED, as a server without the method does).
#[derive(Default)]
struct LegacyNode {
    pipeline_calls: AtomicU64,
    unary_writes: AtomicU64,
    unary_reads: AtomicU64,
    blocks: std::sync::Mutex<std::collections::HashMap<u64, Vec<u8>>>,
}

type PipelineOut = std::pin::Pin<
    Box<dyn futures::Stream<Item = Result<pb::PipelineReplies, tonic::Status>> + Send>,
>;

#[tonic::async_trait]
impl pb::pss_blocks_server::PssBlocks for LegacyNode {
    async fn acquire_volume(
        &self,
        _: tonic::Request<pb::AcquireVolumeRequest>,
    ) -> Result<tonic::Response<pb::AcquireVolumeReply>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this stand-in"))
    }
    async fn get_volume(
        &self,
        _: tonic::Request<pb::GetVolumeRequest>,
    ) -> Result<tonic::Response<pb::VolumeMeta>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this stand-in"))
    }
    async fn write_batch(
        &self,
        req: tonic::Request<pb::WriteBatchRequest>,
    ) -> Result<tonic::Response<pb::WriteBatchReply>, tonic::Status> {
        let n = self.unary_writes.fetch_add(1, SeqCst) + 1;
        let mut blocks = self.blocks.lock().unwrap();
        for op in req.into_inner().ops {
            blocks.insert(op.block, op.data);
        }
        Ok(tonic::Response::new(pb::WriteBatchReply {
            raft_index: n,
            duplicate: false,
            persisted_lsn: 0,
        }))
    }
    async fn get_blocks(
        &self,
        req: tonic::Request<pb::GetBlocksRequest>,
    ) -> Result<tonic::Response<pb::GetBlocksReply>, tonic::Status> {
        self.unary_reads.fetch_add(1, SeqCst);
        let blocks = self.blocks.lock().unwrap();
        let out = req
            .into_inner()
            .blocks
            .into_iter()
            .map(|b| match blocks.get(&b) {
                Some(d) => pb::PssBlock { block: b, found: true, data: d.clone(), version: 1 },
                None => pb::PssBlock { block: b, found: false, data: Vec::new(), version: 0 },
            })
            .collect();
        Ok(tonic::Response::new(pb::GetBlocksReply { blocks: out }))
    }
    async fn list_blocks(
        &self,
        _: tonic::Request<pb::ListBlocksRequest>,
    ) -> Result<tonic::Response<pb::ListBlocksReply>, tonic::Status> {
        Err(tonic::Status::unimplemented("not in this stand-in"))
    }
    type PipelineStream = PipelineOut;
    async fn pipeline(
        &self,
        _: tonic::Request<tonic::Streaming<pb::PipelineRequests>>,
    ) -> Result<tonic::Response<PipelineOut>, tonic::Status> {
        self.pipeline_calls.fetch_add(1, SeqCst);
        Err(tonic::Status::unimplemented("wayside.v1.PssBlocks/Pipeline"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_pipeline_is_called_unary_from_then_on() {
    let node = std::sync::Arc::new(LegacyNode::default());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(pb::pss_blocks_server::PssBlocksServer::from_arc(node.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let ep = wayside_proto::types::Endpoint::parse(&addr.to_string()).unwrap();
    let client = PssClient::new(vec![ep], ClientOptions::default());
    assert!(ClientOptions::default().pipeline, "the client pipelines by default");
    let vol = VolumeName::new("legacy").unwrap();
    // The first write tries the Pipeline, is refused, and goes unary: applied once.
    let r = client.write_batch(put("legacy", 1, "c", 1, 7, 0x77)).await.unwrap();
    assert_eq!(r.raft_index, 1);
    // Later calls go unary at once: no second Pipeline attempt.
    client.write_batch(put("legacy", 1, "c", 2, 8, 0x88)).await.unwrap();
    let got = client.get_blocks(&vol, &[7, 8, 9]).await.unwrap();
    assert_eq!(got[0].data, vec![0x77; 4096]);
    assert_eq!(got[1].data, vec![0x88; 4096]);
    assert!(!got[2].found);
    let load = |a: &AtomicU64| a.load(SeqCst);
    assert_eq!(load(&node.pipeline_calls), 1, "the Pipeline was tried once");
    assert_eq!(load(&node.unary_writes), 2, "each write applied once, unary");
    assert_eq!(load(&node.unary_reads), 1);
    server.abort();
}

/// Replies past half the message limit: a `GetBlocks` whose blocks would not fit is
/// refused, naming the limit (with the message limit it ended the whole pipeline, every
/// caller's request on it failing OUT_OF_RANGE, which the NMS takes as permanent); answers
/// that fit one by one but not together go in several reply messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_past_the_message_limit_are_refused_alone_or_split() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start_with(1, dir.path(), |c| c.max_message_size_bytes = 4 << 20)
        .await
        .unwrap();
    let client = PssClient::new(
        cluster.endpoints(),
        ClientOptions { max_message_size_bytes: 4 << 20, ..cluster.client_options() },
    );
    let epoch = create(&client, "big", 1).await;
    // 1000 blocks of 4 KiB, in batches.
    for (seq, first) in (0..1000u64).step_by(250).enumerate() {
        let mut req = put("big", epoch, "w", seq as u64 + 1, 0, 1);
        req.ops = (first..first + 250)
            .map(|block| pb::PssBlockOp { block, data: vec![7; 4096], delete: false, version: 0 })
            .collect();
        client.write_batch(req).await.unwrap();
    }
    // A write of more than half the message limit (one Raft entry, which must fit in a
    // message to a follower) is refused, naming the limit, and changes nothing.
    let mut req = put("big", epoch, "w", 99, 0, 1);
    req.ops = (5000..5600)
        .map(|block| pb::PssBlockOp { block, data: vec![8; 4096], delete: false, version: 0 })
        .collect();
    match client.write_batch(req).await {
        Err(PssError::Other(s)) => {
            assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
            assert!(s.message().contains("max_message_size_bytes"), "{s:?}");
        }
        other => panic!("expected the limit, got {other:?}"),
    }
    // A write past the node's whole message limit (5 MiB), from a client allowing larger
    // messages, beside writes that fit: it is refused alone, at once (sent over the
    // pipeline, the stream every caller shares failed on it, and its retries failed them
    // again until its deadline); the others are applied.
    let wide = PssClient::new(cluster.endpoints(), cluster.client_options());
    let mut huge = put("big", epoch, "w", 100, 0, 1);
    huge.ops = (6000..7280)
        .map(|block| pb::PssBlockOp { block, data: vec![9; 4096], delete: false, version: 0 })
        .collect();
    let small = (0..8u64).map(|i| wide.write_batch(put("big", epoch, "s", i + 1, 8000 + i, 3)));
    let (r, small) = tokio::join!(wide.write_batch(huge.clone()), futures::future::join_all(small));
    match r {
        Err(PssError::Other(s)) => {
            assert!(matches!(s.code(), Code::OutOfRange | Code::ResourceExhausted), "{s:?}")
        }
        other => panic!("expected the message limit, got {other:?}"),
    }
    for r in small {
        assert!(!r.expect("a write that fits is applied").duplicate);
    }
    // A client refuses one past its own limit, naming it.
    match client.write_batch(huge).await {
        Err(PssError::Other(s)) => {
            assert_eq!(s.code(), Code::OutOfRange, "{s:?}");
            assert!(s.message().contains("max_message_size_bytes"), "{s:?}");
        }
        other => panic!("expected the client's limit, got {other:?}"),
    }
    let volume = VolumeName::new("big").unwrap();
    let got = client.get_blocks(&volume, &[5000, 5599, 6000, 7279]).await.unwrap();
    assert!(got.iter().all(|b| !b.found), "the refused writes changed nothing");
    // 4 MB of blocks, past the 2 MiB a reply may carry: refused, naming the limit.
    let all: Vec<u64> = (0..1000).collect();
    match client.get_blocks(&volume, &all).await {
        Err(PssError::Other(s)) => {
            assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
            assert!(s.message().contains("max_message_size_bytes"), "{s:?}");
        }
        other => panic!("expected the limit, got {other:?}"),
    }
    // 16 callers at once, 800 KB each: 12.8 MB of answers, several reply messages.
    let gets = (0..16u64).map(|i| {
        let (client, volume) = (client.clone(), volume.clone());
        async move {
            let blocks: Vec<u64> = (i * 50..i * 50 + 200).map(|b| b % 1000).collect();
            client.get_blocks(&volume, &blocks).await
        }
    });
    for got in futures::future::join_all(gets).await {
        let got = got.expect("every caller answered");
        assert_eq!(got.len(), 200);
        assert!(got.iter().all(|b| b.found && b.data == vec![7; 4096]));
    }
    cluster.shutdown().await;
}
