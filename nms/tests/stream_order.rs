//! The order of one vehicle stream's operations against a real NMS and PSS: an operation
//! that has to wait (a partial write of an uncached block fetching it from the PSS) is
//! never overtaken by a later one on the same block, and a flush waits for the writes sent
//! before it.

use std::collections::HashMap;
use std::time::Duration;
use wayside_nms::testing::LocalNms;
use wayside_proto::pb;
use wayside_proto::types::VolumeName;
use wayside_pss::testing::LocalCluster;

const BS: usize = 4096;
const VOL: &str = "order";
const SECRET: &str = "k";

/// The calls these tests make of a test NMS.
trait Calls {
    async fn batch(&self, ops: Vec<pb::stream_request::Op>) -> HashMap<u64, pb::StreamReply>;
    async fn read(&self, block: u64) -> Vec<u8>;
}

impl Calls for LocalNms {
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

fn auth() -> Option<pb::VolumeAuth> {
    Some(pb::VolumeAuth { volume: VOL.into(), credential: SECRET.into(), ..Default::default() })
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
async fn persisted_volume(nms: &LocalNms, blocks: &[u64]) {
    let mut c = nms.raw().await;
    c.create_volume(pb::CreateVolumeRequest {
        auth: auth(),
        block_size: BS as u32,
        take_over: false,
    })
    .await
    .unwrap();
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
async fn fresh_nms(name: &str, cluster: &LocalCluster) -> LocalNms {
    let nms = LocalNms::start(name, &cluster.endpoints(), |_| {}).await;
    nms.raw()
        .await
        .attach(pb::AttachRequest { auth: auth(), client_id: "test".into(), take_over: false })
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
    let a = LocalNms::start("a", &cluster.endpoints(), |_| {}).await;
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
    let a = LocalNms::start("a", &cluster.endpoints(), |_| {}).await;
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
