//! The order of one vehicle stream's operations against a real NMS and PSS: an operation
//! that has to wait (a partial write of an uncached block fetching it from the PSS) is
//! never overtaken by a later one on the same block, and a flush waits for the writes sent
//! before it.

use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use wayside_nms::config::Config;
use wayside_proto::pb;
use wayside_proto::types::{Endpoint, VolumeName};
use wayside_pss::testing::LocalCluster;

const BS: usize = 4096;
const VOL: &str = "order";
const SECRET: &str = "k";

struct Nms {
    ep: Endpoint,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Nms {
    async fn start(name: &str, pss: &[Endpoint]) -> Nms {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let ep = Endpoint::parse(&listener.local_addr().unwrap().to_string()).unwrap();
        let cfg = Config {
            listen: ep.authority().to_owned(),
            node_id: name.into(),
            pss: pss.iter().map(|e| e.authority().to_owned()).collect(),
            block_pool_bytes: 1 << 20,
            ..Config::default()
        };
        let stop = CancellationToken::new();
        let task = tokio::spawn(wayside_nms::server::run(cfg, listener, stop.clone()));
        wait_healthy(&ep).await;
        Nms { ep, stop, task }
    }

    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("NMS stops on shutdown")
            .unwrap()
            .unwrap();
    }

    async fn raw(&self) -> pb::nms_client::NmsClient<tonic::transport::Channel> {
        let ch = tonic::transport::Endpoint::from_shared(self.ep.uri().to_owned())
            .unwrap()
            .connect()
            .await
            .unwrap();
        pb::nms_client::NmsClient::new(ch)
    }

    /// One `StreamBatches` call carrying `ops` (tagged 1, 2, ... in order) in one message,
    /// then the end of the request stream; the results by tag.
    async fn batch(&self, ops: Vec<pb::stream_request::Op>) -> HashMap<u64, pb::StreamReply> {
        let m = pb::StreamBatch {
            auth: auth(),
            ops: ops
                .into_iter()
                .enumerate()
                .map(|(i, op)| pb::StreamRequest { auth: None, tag: i as u64 + 1, op: Some(op) })
                .collect(),
        };
        let mut replies = self
            .raw()
            .await
            .stream_batches(futures::stream::iter(vec![m]))
            .await
            .unwrap()
            .into_inner();
        let mut out = HashMap::new();
        while let Some(r) =
            tokio::time::timeout(Duration::from_secs(20), replies.message()).await.unwrap().unwrap()
        {
            out.extend(r.results.into_iter().map(|r| (r.tag, r)));
        }
        out
    }

    /// Block `block` as this NMS reads it (unary `Read`).
    async fn read(&self, block: u64) -> Vec<u8> {
        let r = self
            .raw()
            .await
            .read(pb::ReadRequest {
                auth: auth(),
                op: Some(pb::ReadOp { block, offset: 0, length: 0 }),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(r.found, "block {block} found");
        r.data.to_vec()
    }
}

/// Polls the gRPC health check with a deadline (no sleeping for readiness).
async fn wait_healthy(ep: &Endpoint) {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(ch) =
            tonic::transport::Endpoint::from_shared(ep.uri().to_owned()).unwrap().connect().await
        {
            let r = HealthClient::new(ch)
                .check(HealthCheckRequest { service: "wayside.v1.Nms".into() })
                .await;
            if r.is_ok_and(|r| r.into_inner().status == 1) {
                return;
            }
        }
        assert!(Instant::now() < deadline, "NMS at {ep} not healthy in time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn auth() -> Option<pb::VolumeAuth> {
    Some(pb::VolumeAuth { volume: VOL.into(), credential: SECRET.into(), nms_session: 0 })
}

fn block_data(block: u64, n: u8) -> Vec<u8> {
    (0..BS).map(|i| (i as u64 ^ block) as u8 ^ n.wrapping_mul(31)).collect()
}

fn write_op(block: u64, offset: u32, data: Vec<u8>) -> pb::stream_request::Op {
    pb::stream_request::Op::Write(pb::WriteOp {
        block,
        offset,
        data: data.into(),
        request_id: None,
    })
}

fn write_reply(r: &pb::StreamReply) -> &pb::WriteReply {
    match &r.result {
        Some(pb::stream_reply::Result::Write(w)) => w,
        other => panic!("tag {}: not a write's result: {other:?}", r.tag),
    }
}

/// Creates the volume on `nms`, writes `blocks` whole (`block_data(b, 1)`) and flushes, so
/// the PSS holds them and a fresh NMS must fetch them.
async fn persisted_volume(nms: &Nms, blocks: &[u64]) {
    let mut c = nms.raw().await;
    c.create_volume(pb::CreateVolumeRequest { auth: auth(), block_size: BS as u32 }).await.unwrap();
    for &b in blocks {
        c.write(pb::WriteRequest {
            auth: auth(),
            op: Some(pb::WriteOp {
                block: b,
                offset: 0,
                data: block_data(b, 1).into(),
                request_id: None,
            }),
        })
        .await
        .unwrap();
    }
    c.flush(pb::FlushRequest { auth: auth() }).await.unwrap();
}

/// A fresh NMS serving the volume (attached), none of whose blocks it caches.
async fn fresh_nms(name: &str, cluster: &LocalCluster) -> Nms {
    let nms = Nms::start(name, &cluster.endpoints()).await;
    nms.raw()
        .await
        .attach(pb::AttachRequest { auth: auth(), client_id: "test".into() })
        .await
        .unwrap();
    nms
}

/// One batch [a partial write of block 7, a whole write of block 7] on an NMS that does not
/// cache block 7: the partial write waits for block 7 from the PSS, and the whole write
/// sent after it must not overtake it. Block 7 ends as the whole write left it, and its
/// lsn is the later one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_write_never_overtakes_a_fetching_one_on_its_block() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(3, dir.path()).await.unwrap();
    let a = Nms::start("a", &cluster.endpoints()).await;
    persisted_volume(&a, &[7]).await;
    a.stop().await;
    let b = fresh_nms("b", &cluster).await;
    let whole = block_data(7, 2);
    let got = b.batch(vec![write_op(7, 0, b"xx".to_vec()), write_op(7, 0, whole.clone())]).await;
    assert_eq!(got.len(), 2, "{got:?}");
    let (first, second) = (write_reply(&got[&1]), write_reply(&got[&2]));
    assert!(second.lsn > first.lsn, "acks in the order sent: {first:?} then {second:?}");
    assert_eq!(b.read(7).await, whole, "the whole write, sent last, wins");
    // And so in the PSS.
    b.raw().await.flush(pb::FlushRequest { auth: auth() }).await.unwrap();
    let stored = cluster
        .client()
        .get_blocks(&VolumeName::new(VOL).unwrap(), &[7])
        .await
        .unwrap()
        .into_iter()
        .next()
        .unwrap();
    assert!(stored.found);
    assert_eq!(stored.data.to_vec(), whole, "block 7 persisted as the whole write left it");
    b.stop().await;
    cluster.shutdown().await;
}

/// A flush in a stream waits for the writes sent before it, even one still fetching its
/// block: its watermark covers them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_in_a_stream_covers_a_fetching_write_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(3, dir.path()).await.unwrap();
    let a = Nms::start("a", &cluster.endpoints()).await;
    persisted_volume(&a, &[8]).await;
    a.stop().await;
    let b = fresh_nms("b", &cluster).await;
    let got = b
        .batch(vec![write_op(8, 0, b"yy".to_vec()), pb::stream_request::Op::Flush(pb::FlushOp {})])
        .await;
    let w = write_reply(&got[&1]);
    let persisted = match &got[&2].result {
        Some(pb::stream_reply::Result::Flush(f)) => f.persisted_lsn,
        other => panic!("not a flush's result: {other:?}"),
    };
    assert!(persisted >= w.lsn, "the flush covers the write before it: {persisted} < {}", w.lsn);
    let mut want = block_data(8, 1);
    want[..2].copy_from_slice(b"yy");
    assert_eq!(b.read(8).await, want);
    b.stop().await;
    cluster.shutdown().await;
}
