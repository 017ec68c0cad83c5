//! The NMS against a real PSS (a 3-node Raft cluster in this process, on loopback):
//! round trips, eviction, back-pressure, migration under load, crash and replay,
//! fencing, aborted moves and bad input. One test binary, so it links once.

use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use wayside_nms::cache::ENTRY_OVERHEAD_BYTES;
use wayside_nms::client::{ClientOptions, VolumeClient};
use wayside_nms::config::Config;
use wayside_nms::store::StoreError;
use wayside_nms::testing::{wait_healthy, LocalNms, Writer, Written};
use wayside_proto::error::fault_of;
use wayside_proto::pb;
use wayside_proto::types::{BlockSize, Credential, Endpoint, Fault, VolumeName};
use wayside_pss::testing::LocalCluster;

const BS: usize = 4096;

/// A test NMS (`LocalNms`) with the admin calls these tests make.
struct Nms(LocalNms);

impl std::ops::Deref for Nms {
    type Target = LocalNms;
    fn deref(&self) -> &LocalNms {
        &self.0
    }
}

impl Nms {
    async fn start(name: &str, pss: &[Endpoint], adjust: impl FnOnce(&mut Config)) -> Nms {
        Nms(LocalNms::start(name, pss, adjust).await)
    }

    async fn stop(self) {
        self.0.stop().await;
    }

    async fn admin(&self) -> pb::nms_admin_client::NmsAdminClient<tonic::transport::Channel> {
        pb::nms_admin_client::NmsAdminClient::new(channel(&self.ep).await)
    }

    /// The node's `NodeStatus` (admin call).
    async fn status(&self) -> pb::NodeStatusReply {
        self.admin().await.node_status(pb::NodeStatusRequest {}).await.unwrap().into_inner()
    }

    /// Creates volume `vol` (block size `BS`) through the raw `CreateVolume` call.
    async fn create_volume(&self, vol: &str, secret: &str) {
        self.raw()
            .await
            .create_volume(pb::CreateVolumeRequest {
                auth: auth(vol, secret),
                block_size: BS as u32,
                take_over: false,
            })
            .await
            .unwrap();
    }

    /// Moves `volume` from this node to `to` (admin `StartMigration`) and prints the report.
    async fn migrate(&self, volume: &str, to: &Endpoint, max_rounds: u32) -> pb::MigrationReport {
        let report = self
            .admin()
            .await
            .start_migration(pb::StartMigrationRequest {
                volume: volume.into(),
                target_address: to.uri().into(),
                max_rounds,
                switch_below_bytes: 0,
            })
            .await
            .unwrap()
            .into_inner();
        println!("{}", wayside_nms::cli::render_report(&report));
        report
    }
}

async fn channel(ep: &Endpoint) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(ep.uri().to_owned()).unwrap().connect().await.unwrap()
}

fn opts(nms: &[&Endpoint], vol: &str, secret: &str) -> ClientOptions {
    let mut o = ClientOptions::new(
        nms.iter().map(|e| (*e).clone()).collect(),
        VolumeName::new(vol).unwrap(),
        Credential::new(secret).unwrap(),
    );
    o.create_block_size = Some(BlockSize::new(BS as u32).unwrap());
    o.op_timeout = Duration::from_secs(20);
    o
}

fn block_data(block: u64, n: u64) -> Vec<u8> {
    let mut d = vec![0u8; BS];
    d[..8].copy_from_slice(&block.to_le_bytes());
    d[8..16].copy_from_slice(&n.to_le_bytes());
    d[16..].iter_mut().enumerate().for_each(|(i, b)| *b = (i as u64 ^ n ^ block) as u8);
    d
}

async fn pss_blocks(cluster: &LocalCluster, vol: &str, blocks: &[u64]) -> HashMap<u64, Vec<u8>> {
    let c = cluster.client();
    let got = c.get_blocks(&VolumeName::new(vol).unwrap(), blocks).await.unwrap();
    got.into_iter().filter(|b| b.found).map(|b| (b.block, b.data)).collect()
}

/// Waits (at most 20 s) until the PSS holds every one of `blocks` of `vol`, written by a
/// write-back nothing in the test asked for, and checks each is `block_data(block, n)`.
async fn wait_written_back(cluster: &LocalCluster, vol: &str, blocks: &[u64], n: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let stored = pss_blocks(cluster, vol, blocks).await;
        if stored.len() == blocks.len() {
            for b in blocks {
                assert_eq!(stored[b], block_data(*b, n), "block {b}");
            }
            return;
        }
        let (got, all) = (stored.len(), blocks.len());
        assert!(Instant::now() < deadline, "only {got} of {all} blocks persisted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn auth(vol: &str, secret: &str) -> Option<pb::VolumeAuth> {
    Some(pb::VolumeAuth { volume: vol.into(), credential: secret.into(), ..Default::default() })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn round_trip_read_write_delete_flush() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(3, dir.path()).await.unwrap();
    let a = Nms::start("a", &cluster.endpoints(), |_| {}).await;
    let c = VolumeClient::open(opts(&[&a.ep], "rt", "s3cret")).await.unwrap();
    assert_eq!(c.block_size().bytes(), BS as u32);
    assert_eq!(c.read(1, 0, None).await.unwrap(), None);
    let w1 = c.write(1, 0, block_data(1, 1)).await.unwrap();
    let w2 = c.write(2, 100, b"hello".to_vec()).await.unwrap();
    assert!(w2.lsn > w1.lsn);
    assert_eq!(c.read(1, 0, None).await.unwrap().unwrap(), block_data(1, 1));
    let mut want2 = vec![0u8; 105];
    want2[100..].copy_from_slice(b"hello");
    assert_eq!(c.read(2, 0, None).await.unwrap().unwrap(), want2);
    assert_eq!(c.read(2, 101, Some(3)).await.unwrap().unwrap(), b"ell");
    c.write(3, 0, block_data(3, 1)).await.unwrap();
    c.delete(3).await.unwrap();
    let p = c.flush().await.unwrap();
    assert!(p >= w2.lsn, "flush waits for persisted: {p:?}");
    assert_eq!(c.journal_bytes(), 0, "persisted writes leave the journal");
    let stored = pss_blocks(&cluster, "rt", &[1, 2, 3]).await;
    assert_eq!(stored.get(&1), Some(&block_data(1, 1)));
    assert_eq!(stored.get(&2), Some(&want2));
    assert!(!stored.contains_key(&3), "the delete reached the PSS");
    let list = c.list(0, 0).await.unwrap();
    assert_eq!(list.blocks.iter().map(|b| b.block).collect::<Vec<_>>(), vec![1, 2]);
    // A fresh NMS reads through from the PSS (this one serving its connections from two
    // dedicated threads; `stop` checks it shuts down).
    let b = Nms::start("b", &cluster.endpoints(), |c| c.serve_threads = 2).await;
    let c2 = VolumeClient::open(opts(&[&b.ep], "rt", "s3cret")).await.unwrap();
    assert_eq!(c2.read(1, 0, None).await.unwrap().unwrap(), block_data(1, 1));
    a.stop().await;
    b.stop().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eviction_under_memory_pressure_never_loses_a_dirty_block() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(3, dir.path()).await.unwrap();
    // 16 blocks of memory; write-back held back so written blocks stay dirty.
    let a = Nms::start("a", &cluster.endpoints(), |c| {
        c.cache_capacity_bytes = 16 * (BS as u64 + 64);
        c.dirty_limit_bytes = 8 * (BS as u64 + ENTRY_OVERHEAD_BYTES);
        c.dirty_limit_bytes_per_volume = 8 * (BS as u64 + ENTRY_OVERHEAD_BYTES);
        c.writeback_delay_ms = 600_000;
    })
    .await;
    let c = VolumeClient::open(opts(&[&a.ep], "ev", "k")).await.unwrap();
    // 40 clean blocks in the PSS, through the NMS.
    for b in 100..140 {
        c.write(b, 0, block_data(b, 0)).await.unwrap();
        if b % 6 == 0 {
            c.flush().await.unwrap();
        }
    }
    c.flush().await.unwrap();
    for b in 0..6 {
        c.write(b, 0, block_data(b, 7)).await.unwrap();
    }
    // Reading 40 blocks through a 16-block cache evicts; the 6 dirty ones must stay.
    for round in 0..2 {
        for b in 100..140 {
            assert_eq!(
                c.read(b, 0, None).await.unwrap().unwrap(),
                block_data(b, 0),
                "round {round}"
            );
        }
    }
    let st = a.status().await;
    assert!(st.cached_bytes <= st.cache_capacity_bytes, "{st:?}");
    assert!(
        st.block_pool_free_bytes <= st.cache_capacity_bytes,
        "pool capped by the cache: {st:?}"
    );
    assert!(st.dirty_bytes >= 6 * BS as u64, "dirty blocks still held: {st:?}");
    assert!(pss_blocks(&cluster, "ev", &[0]).await.is_empty(), "not yet written back");
    for b in 0..6 {
        assert_eq!(c.read(b, 0, None).await.unwrap().unwrap(), block_data(b, 7));
    }
    c.flush().await.unwrap();
    let stored = pss_blocks(&cluster, "ev", &(0..6).collect::<Vec<_>>()).await;
    for b in 0..6 {
        assert_eq!(stored.get(&b), Some(&block_data(b, 7)), "block {b}");
    }
    a.stop().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn back_pressure_when_the_dirty_limit_is_reached() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = LocalCluster::start(3, dir.path()).await.unwrap();
    let a = Nms::start("a", &cluster.endpoints(), |c| {
        c.dirty_limit_bytes_per_volume = 4 * (BS as u64 + ENTRY_OVERHEAD_BYTES);
        c.backpressure_wait_ms = 300;
        c.writeback_delay_ms = 600_000;
    })
    .await;
    let c = VolumeClient::open(opts(&[&a.ep], "bp", "k")).await.unwrap();
    for b in 0..4 {
        c.write(b, 0, block_data(b, 1)).await.unwrap();
    }
    let write = |block: u64| pb::WriteRequest {
        auth: auth("bp", "k"),
        op: Some(pb::WriteOp {
            block,
            offset: 0,
            data: block_data(block, 1).into(),
            request_id: None,
        }),
    };
    // The PSS without a quorum: the write-back a full volume starts cannot free anything.
    cluster.stop_node(2).await.unwrap();
    cluster.stop_node(3).await.unwrap();
    let mut raw = a.raw().await;
    let t = Instant::now();
    let err = raw.write(write(9)).await.unwrap_err();
    let waited = t.elapsed();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    assert!(
        matches!(fault_of(&err), Some(Fault::LimitExceeded { ref limit, .. }) if limit == "dirty_limit_bytes_per_volume"),
        "{err:?}"
    );
    assert!(waited >= Duration::from_millis(250), "the write waited before failing: {waited:?}");
    // With the PSS back, the write-back the full volume started (not the ten-minute delay)
    // frees the space: a write waits for it, then is accepted.
    cluster.restart_node(2).await.unwrap();
    cluster.restart_node(3).await.unwrap();
    assert_eq!(c.read(9, 0, None).await.unwrap(), None, "the refused write changed nothing");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match raw.write(write(10)).await {
            Ok(_) => break,
            Err(e) if e.code() == tonic::Code::ResourceExhausted && Instant::now() < deadline => {}
            Err(e) => panic!("the write should wait for space, then be accepted: {e:?}"),
        }
    }
    assert_eq!(c.read(10, 0, None).await.unwrap().unwrap(), block_data(10, 1));
    let stored = pss_blocks(&cluster, "bp", &[0, 1, 2, 3]).await;
    assert_eq!(stored.len(), 4, "the full volume's blocks were written back without the delay");
    // Full again: the fifth write waits while write-back runs, and is accepted.
    for b in 11..14 {
        raw.write(write(b)).await.unwrap();
    }
    raw.write(write(14)).await.expect("the write waited for space, then was accepted");
    assert_eq!(c.read(14, 0, None).await.unwrap().unwrap(), block_data(14, 1));
    a.stop().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_vehicle_keeps_writing_while_its_volume_moves() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(3, dir.path()).await.unwrap();
    // Small frames: a round's blocks travel 4 to a frame, its request ids 128 to a frame.
    let a = Nms::start("a", &cluster.endpoints(), |c| c.migration_frame_bytes = 16 << 10).await;
    let b = Nms::start("b", &cluster.endpoints(), |_| {}).await;
    let c = VolumeClient::open(opts(&[&a.ep], "mv", "k")).await.unwrap();
    // Some cached state to move: 256 blocks, half flushed, half dirty.
    for blk in 0..256u64 {
        c.write(blk, 0, block_data(blk, 0)).await.unwrap();
        if blk == 127 {
            c.flush().await.unwrap();
        }
    }
    // And 300 writes under request ids this test knows, to replay on B after the move.
    const REPLAYED: u64 = 300;
    let replay = |seq: u64, n: u64| pb::WriteRequest {
        auth: auth("mv", "k"),
        op: Some(pb::WriteOp {
            block: 1000 + seq,
            offset: 0,
            data: block_data(1000 + seq, n).into(),
            request_id: Some(pb::RequestId { client_id: "replayer".into(), seq }),
        }),
    };
    let mut raw_a = a.raw().await;
    for seq in 1..=REPLAYED {
        raw_a.write(replay(seq, 1)).await.unwrap();
    }
    let writer = Writer::spawn(c.clone(), 300, block_data);
    // Let the vehicle run, then move it.
    while c.stat().await.unwrap().accepted_lsn < 400 {
        tokio::task::yield_now().await;
    }
    let report = a.migrate("mv", &b.ep, 0).await;
    assert_eq!(report.outcome, pb::MigrationOutcome::Completed as i32, "{report:?}");
    let after = c.stat().await.unwrap().accepted_lsn;
    while c.stat().await.unwrap().accepted_lsn < after + 200 {
        tokio::task::yield_now().await;
    }
    let Written { acked, worst, writes: count } = writer.stop().await;
    println!("vehicle: {count} writes, worst write latency across the move {worst:?}");
    assert_eq!(c.current_nms(), b.ep, "the client followed the redirect");
    let info = c.stat().await.unwrap();
    assert_eq!(info.epoch, report.new_epoch);
    // Nothing applied twice: every accepted write got exactly one lsn.
    assert_eq!(info.accepted_lsn, 256 + REPLAYED + count, "lsns: {info:?}");
    // The request ids applied on A came along (in several RequestIds frames): replays of
    // them, with other data, apply nothing on B.
    let mut raw_b = b.raw().await;
    for seq in 1..=REPLAYED {
        raw_b.write(replay(seq, 2)).await.unwrap();
    }
    assert_eq!(c.stat().await.unwrap().accepted_lsn, info.accepted_lsn, "replays applied nothing");
    for seq in [1, REPLAYED / 2, REPLAYED] {
        let got = c.read(1000 + seq, 0, None).await.unwrap();
        assert_eq!(got.as_deref(), Some(&block_data(1000 + seq, 1)[..]), "block {}", 1000 + seq);
    }
    c.flush().await.unwrap();
    let mut want: HashMap<u64, Vec<u8>> = (0..256).map(|b| (b, block_data(b, 0))).collect();
    for (blk, n) in &acked {
        want.insert(*blk, block_data(*blk, *n));
    }
    let blocks: Vec<u64> = want.keys().copied().collect();
    let stored = pss_blocks(&cluster, "mv", &blocks).await;
    for (blk, data) in &want {
        assert_eq!(c.read(*blk, 0, None).await.unwrap().as_ref(), Some(data), "block {blk} from B");
        assert_eq!(stored.get(blk), Some(data), "block {blk} in the PSS");
    }
    // The old NMS redirects, and the PSS refuses its epoch.
    let err = a
        .raw()
        .await
        .read(pb::ReadRequest {
            auth: auth("mv", "k"),
            op: Some(pb::ReadOp { block: 1, offset: 0, length: 0 }),
        })
        .await
        .unwrap_err();
    assert!(
        matches!(fault_of(&err), Some(Fault::Moved { ref to, .. }) if *to == b.ep.uri()),
        "{err:?}"
    );
    let stale = cluster
        .client()
        .write_batch(pb::WriteBatchRequest {
            volume: "mv".into(),
            epoch: report.new_epoch - 1,
            request_id: Some(pb::RequestId { client_id: "old-a".into(), seq: 1 }),
            ops: vec![pb::PssBlockOp { block: 1, data: vec![0xEE; BS], delete: false, version: 0 }],
            persisted_lsn: 0,
        })
        .await;
    assert!(matches!(stale, Err(wayside_pss::client::PssError::StaleEpoch { .. })), "{stale:?}");
    assert_eq!(pss_blocks(&cluster, "mv", &[1]).await.get(&1), want.get(&1));
    a.stop().await;
    b.stop().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_old_owner_holding_unpersisted_writes_is_fenced() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(3, dir.path()).await.unwrap();
    let a = Nms::start("a", &cluster.endpoints(), |c| c.writeback_delay_ms = 600_000).await;
    let b = Nms::start("b", &cluster.endpoints(), |_| {}).await;
    let c = VolumeClient::open(opts(&[&a.ep, &b.ep], "fence", "k")).await.unwrap();
    c.write(1, 0, block_data(1, 1)).await.unwrap();
    c.flush().await.unwrap();
    c.write(1, 0, block_data(1, 2)).await.unwrap(); // dirty on A only
                                                    // B takes the volume over (as after A seemed lost): it raises the epoch.
    let other = VolumeClient::open(opts(&[&b.ep], "fence", "k")).await.unwrap();
    other.write(2, 0, block_data(2, 9)).await.unwrap();
    other.flush().await.unwrap();
    // A now tries to write back its old copy: the PSS refuses the stale epoch, A
    // redirects, and the vehicle's journal replays its write to B.
    c.flush().await.unwrap();
    assert_eq!(c.current_nms(), b.ep);
    let stored = pss_blocks(&cluster, "fence", &[1, 2]).await;
    assert_eq!(
        stored.get(&1),
        Some(&block_data(1, 2)),
        "the acknowledged write reached the PSS via B"
    );
    assert_eq!(stored.get(&2), Some(&block_data(2, 9)), "A did not overwrite B's data");
    let st = a.status().await;
    assert_eq!(st.volumes, 0, "A dropped its fenced copy: {st:?}");
    a.stop().await;
    b.stop().await;
    cluster.shutdown().await;
}

/// The PSS loses its leader twice under a vehicle writing continuously: once while the
/// NMS writes back (write-back goes on through the new leader), once just before a move
/// (the target's claim waits for the next election). Every acknowledged write is in the
/// PSS at its last value (a write-back batch retried across the change re-applied after
/// a newer one would revert a block) and reads back from the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pss_leader_changes_under_write_back_and_a_move_lose_nothing() {
    wayside_proto::telemetry::init_for_tests();
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = LocalCluster::start(3, dir.path()).await.unwrap();
    let a = Nms::start("a", &cluster.endpoints(), |c| c.writeback_delay_ms = 20).await;
    let b = Nms::start("b", &cluster.endpoints(), |_| {}).await;
    let c = VolumeClient::open(opts(&[&a.ep], "lc", "k")).await.unwrap();
    let writer = Writer::spawn(c.clone(), 200, block_data);
    // Waits (polling Stat, with a deadline) until the volume's persisted watermark reaches `lsn`.
    let persisted_past = |lsn: u64, what: &'static str| {
        let c = c.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let info = c.stat().await.unwrap();
                if info.persisted_lsn >= lsn {
                    return info;
                }
                assert!(Instant::now() < deadline, "{what}: persisted stuck below {lsn}: {info:?}");
                tokio::task::yield_now().await;
            }
        }
    };
    persisted_past(300, "write-back under the first leader").await;
    let first = cluster.wait_for_leader(Duration::from_secs(10)).await.unwrap();
    cluster.stop_node(first).await.unwrap();
    let mark = c.stat().await.unwrap().accepted_lsn;
    let info = persisted_past(mark + 1, "write-back after the leader stopped").await;
    println!("leader {first} stopped at accepted lsn {mark}; persisted {}", info.persisted_lsn);
    cluster.restart_node(first).await.unwrap();
    let second = cluster.wait_for_leader(Duration::from_secs(10)).await.unwrap();
    cluster.stop_node(second).await.unwrap();
    let report = a.migrate("lc", &b.ep, 0).await;
    assert_eq!(report.outcome, pb::MigrationOutcome::Completed as i32, "{report:?}");
    assert!(report.setup_us > 0 && report.setup_us < report.total_us, "{report:?}");
    let after = c.stat().await.unwrap().accepted_lsn;
    while c.stat().await.unwrap().accepted_lsn < after + 200 {
        tokio::task::yield_now().await;
    }
    let Written { acked, writes: count, .. } = writer.stop().await;
    assert_eq!(c.current_nms(), b.ep, "the client followed the move");
    let info = c.stat().await.unwrap();
    assert_eq!(info.accepted_lsn, count, "every write applied once: {info:?}");
    c.flush().await.unwrap();
    let want: HashMap<u64, Vec<u8>> =
        acked.iter().map(|(blk, n)| (*blk, block_data(*blk, *n))).collect();
    assert_eq!(want.len(), 200);
    assert_persisted_and_read_back(&cluster, &c, "lc", &want).await;
    println!("{count} writes, PSS leaders {first} and {second} stopped, one move: none lost");
    a.stop().await;
    b.stop().await;
    cluster.shutdown().await;
}

/// Every block of `want` is in the PSS with that data, and reads back so through `c` (in
/// batches).
async fn assert_persisted_and_read_back(
    cluster: &LocalCluster,
    c: &VolumeClient,
    vol: &str,
    want: &HashMap<u64, Vec<u8>>,
) {
    let blocks: Vec<u64> = want.keys().copied().collect();
    let stored = pss_blocks(cluster, vol, &blocks).await;
    let read = c.read_many(&blocks).await.unwrap();
    for (blk, got) in blocks.iter().zip(read) {
        let data = want.get(blk);
        assert_eq!(stored.get(blk), data, "acknowledged block {blk} is in the PSS");
        assert_eq!(got.as_ref(), data, "block {blk} reads back");
    }
}

/// `nms serve` as a process of its own listening on `listen` (node id `a`, writing
/// nothing back for ten minutes), for tests that kill it with SIGKILL; it is killed when
/// the child is dropped.
async fn spawn_nms_process(
    dir: &std::path::Path,
    cluster: &LocalCluster,
    listen: &str,
) -> (tokio::process::Child, Endpoint) {
    spawn_nms_process_with(dir, cluster, listen, "").await
}

/// [`spawn_nms_process`] with more settings (TOML lines).
async fn spawn_nms_process_with(
    dir: &std::path::Path,
    cluster: &LocalCluster,
    listen: &str,
    settings: &str,
) -> (tokio::process::Child, Endpoint) {
    let cfg = dir.join("a.toml");
    std::fs::write(&cfg, format!("writeback_delay_ms = 600000\n{settings}")).unwrap();
    let pss: Vec<String> = cluster.endpoints().iter().map(|e| e.authority().to_owned()).collect();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_nms"))
        .args(["--config", cfg.to_str().unwrap(), "serve", "--listen", listen, "--node-id", "a"])
        .arg("--pss")
        .arg(pss.join(","))
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut out, &mut line).await.unwrap();
    let addr = line.trim().strip_prefix("listening on ").expect("the child prints its address");
    let ep = Endpoint::parse(addr).unwrap();
    wait_healthy(&ep).await;
    (child, ep)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_of_the_nms_holding_unpersisted_writes_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(3, dir.path()).await.unwrap();
    let (mut child, a_ep) = spawn_nms_process(dir.path(), &cluster, "127.0.0.1:0").await;
    let b = Nms::start("b", &cluster.endpoints(), |_| {}).await;
    let mut o = opts(&[&a_ep, &b.ep], "crash", "k");
    o.max_batch_ops = 8;
    let c = VolumeClient::open(o).await.unwrap();
    c.write(0, 0, block_data(0, 1)).await.unwrap();
    c.flush().await.unwrap();
    // Half one at a time, half batched (`write_many`, batches of 8): both are journaled.
    for blk in 0..25u64 {
        c.write(blk, 0, block_data(blk, 2)).await.unwrap();
    }
    let acks = c.write_many((25..50u64).map(|b| (b, 0, block_data(b, 2))).collect()).await.unwrap();
    assert_eq!(acks.len(), 25);
    assert!(acks.windows(2).all(|w| w[0].lsn < w[1].lsn), "acks in order: {acks:?}");
    c.write(3, 10, b"partial".to_vec()).await.unwrap();
    assert!(c.journal_bytes() >= 50 * BS as u64, "writes are accepted, not persisted");
    assert!(pss_blocks(&cluster, "crash", &[1]).await.is_empty());
    child.start_kill().unwrap(); // SIGKILL
    child.wait().await.unwrap();
    // The next call finds A gone, attaches to B and replays the journal there.
    c.write(60, 0, block_data(60, 2)).await.unwrap();
    assert_eq!(c.current_nms(), b.ep);
    c.flush().await.unwrap();
    let mut want: HashMap<u64, Vec<u8>> = (0..50).map(|b| (b, block_data(b, 2))).collect();
    want.get_mut(&3).unwrap()[10..17].copy_from_slice(b"partial");
    want.insert(60, block_data(60, 2));
    // In the PSS, and read back from B in batches (several of 8).
    assert_persisted_and_read_back(&cluster, &c, "crash", &want).await;
    assert_eq!(c.read_many(&[1000]).await.unwrap(), vec![None], "a block never written");
    b.stop().await;
    cluster.shutdown().await;
}

/// A TCP proxy on a fresh loopback port to `to`, passing on what its clients send at
/// `rate` bytes a second at most (what comes back is not held), until the task returned is
/// aborted.
async fn slow_link(to: &Endpoint, rate: u64) -> (Endpoint, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ep = Endpoint::parse(&listener.local_addr().unwrap().to_string()).unwrap();
    let to = to.authority().to_owned();
    let task = tokio::spawn(async move {
        let mut links = tokio::task::JoinSet::new();
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(&to).await else { continue };
            links.spawn(async move {
                let (mut from_client, mut to_client) = client.into_split();
                let (mut from_server, mut to_server) = server.into_split();
                let back = tokio::io::copy(&mut from_server, &mut to_client);
                let forth = async {
                    // Chunks of a 50th of a second's worth, each let through on time.
                    let mut buf = vec![0u8; (rate / 50).max(1) as usize];
                    let (start, mut sent) = (tokio::time::Instant::now(), 0u64);
                    loop {
                        let n = from_client.read(&mut buf).await?;
                        if n == 0 {
                            return to_server.shutdown().await;
                        }
                        sent += n as u64;
                        let due = Duration::from_secs_f64(sent as f64 / rate as f64);
                        tokio::time::sleep_until(start + due).await;
                        to_server.write_all(&buf[..n]).await?;
                    }
                };
                let _ = tokio::join!(back, forth);
            });
        }
    });
    (ep, task)
}

/// A journal replay over a link too slow for one batch to cross within `rpc_timeout`
/// (1 MiB at 512 KiB/s, 1 s) gets through in smaller batches: each that gets no reply in
/// time halves the next. (Sent again whole, the same batch timed out again for ever and
/// the vehicle never attached.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_journal_replay_over_a_slow_link_gets_through() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(1, dir.path()).await.unwrap();
    let (mut child, a_ep) = spawn_nms_process(dir.path(), &cluster, "127.0.0.1:0").await;
    let b = Nms::start("b", &cluster.endpoints(), |_| {}).await;
    let (slow_b, link) = slow_link(&b.ep, 512 << 10).await;
    let mut o = opts(&[&a_ep, &slow_b], "slow", "k");
    (o.rpc_timeout, o.op_timeout) = (Duration::from_secs(1), Duration::from_secs(15));
    let c = VolumeClient::open(o).await.unwrap();
    // 1.5 MiB of writes held only by A (writing nothing back) and the vehicle's journal.
    let blocks = 384u64;
    let acks = c.write_many((0..blocks).map(|b| (b, 0, block_data(b, 1))).collect()).await;
    assert_eq!(acks.unwrap().len(), blocks as usize);
    assert!(c.journal_bytes() >= blocks * BS as u64, "accepted, not persisted");
    child.start_kill().unwrap(); // SIGKILL
    child.wait().await.unwrap();
    c.flush().await.expect("the replay to B got through within one call");
    assert_eq!(c.current_nms(), slow_b);
    let want: HashMap<u64, Vec<u8>> = (0..blocks).map(|b| (b, block_data(b, 1))).collect();
    let stored = pss_blocks(&cluster, "slow", &want.keys().copied().collect::<Vec<_>>()).await;
    assert!(stored == want, "{} of {blocks} blocks in the PSS as written", stored.len());
    link.abort();
    b.stop().await;
    cluster.shutdown().await;
}

/// A 3-node PSS in `dir`; NMS A as a process of its own (to kill); NMS B over a PSS whose
/// writes the test can hold (`FaultyPss::hold_writes`), taking two dirty blocks a volume
/// and waiting 100 ms for room.
async fn a_killable_and_b_of_two_blocks(
    dir: &std::path::Path,
) -> (LocalCluster, tokio::process::Child, Endpoint, std::sync::Arc<FaultyPss>, Nms) {
    let cluster = LocalCluster::start(3, dir).await.unwrap();
    let (child, a_ep) = spawn_nms_process(dir, &cluster, "127.0.0.1:0").await;
    let store = FaultyPss::new(&cluster);
    let two_blocks = 2 * (BS as u64 + ENTRY_OVERHEAD_BYTES);
    let b = Nms(LocalNms::start_with_store("b", store.clone(), |c| {
        c.dirty_limit_bytes_per_volume = two_blocks;
        c.backpressure_wait_ms = 100;
    })
    .await);
    (cluster, child, a_ep, store, b)
}

/// Writes blocks 1 to 4 (version 1) through `c`'s NMS, then kills that NMS (`child`):
/// the writes are only in the vehicle's journal now.
async fn writes_left_only_in_the_journal(c: &VolumeClient, child: &mut tokio::process::Child) {
    for blk in 1..=4u64 {
        c.write(blk, 0, block_data(blk, 1)).await.unwrap();
    }
    child.start_kill().unwrap(); // SIGKILL
    child.wait().await.unwrap();
}

/// A journal replay to B after A was killed is cut short: B takes the first writes, then
/// refuses the next ones (its dirty limit, its write-back held up). At the next attach B
/// holds the first write of the rest at the very lsn A gave it (both numbered from the
/// same persisted watermark), yet not the writes after it: every one of them is still
/// sent, and every acknowledged write reads back and reaches the PSS. (Taking a copy that
/// answers the oldest entry a duplicate at its old lsn for one holding all the later
/// ones dropped them.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replay_cut_short_sends_the_rest_at_the_next_attach() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, mut child, a_ep, store, b) = a_killable_and_b_of_two_blocks(dir.path()).await;
    let mut o = opts(&[&a_ep, &b.ep], "cut", "k");
    o.op_timeout = Duration::from_secs(2);
    let c = VolumeClient::open(o).await.unwrap();
    writes_left_only_in_the_journal(&c, &mut child).await;
    store.hold_writes.send_replace(true);
    // B takes blocks 1 and 2 (its dirty limit), refuses 3 and 4 while nothing persists.
    let _ = c.read(1, 0, None).await;
    let on_b = b.status().await.volume_info;
    let accepted: Vec<u64> = on_b.iter().map(|v| v.accepted_lsn).collect();
    assert_eq!(accepted, [2], "B took blocks 1 and 2 of the replay, not 3 and 4");
    store.hold_writes.send_replace(false);
    for blk in 1..=4u64 {
        let got = c.read(blk, 0, None).await.unwrap();
        let head = got.as_ref().map(|d| d[..16].to_vec());
        assert!(got == Some(block_data(blk, 1)), "block {blk} reads back as {head:?}");
    }
    c.flush().await.unwrap();
    let want: HashMap<u64, Vec<u8>> = (1..=4).map(|b| (b, block_data(b, 1))).collect();
    assert_persisted_and_read_back(&cluster, &c, "cut", &want).await;
    b.stop().await;
    cluster.shutdown().await;
}

/// A journal replay that meets back-pressure at the NMS the vehicle attached to (its dirty
/// limit reached, its write-back held up) is sent there again after a pause, not to the
/// next NMS the vehicle knows: that one would take the volume over from the busy one (an
/// ownership change for a full cache). Once the write-back moves, the replay completes
/// there, and the other NMS never held the volume.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replay_meeting_back_pressure_stays_at_its_nms() {
    replay_at_a_busy_nms(Duration::from_secs(5), false).await;
}

/// ... unless the busy NMS gets nowhere (nothing accepted or persisted) for the client's
/// `rpc_timeout` (its PSS out of reach, say): the vehicle then moves on, and every
/// acknowledged write is replayed at the next NMS.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_busy_nms_that_gets_nowhere_is_left() {
    replay_at_a_busy_nms(Duration::from_millis(600), true).await;
}

/// ... also when every call ends before `rpc_timeout` has passed (its `op_timeout` is
/// shorter; say a FUSE mount's): the time a busy NMS got nowhere is judged across calls,
/// and a later call moves on. (Judged within one call, the vehicle stayed at the busy NMS
/// for good while another could serve it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_busy_nms_that_gets_nowhere_is_left_across_short_calls() {
    let dir = tempfile::tempdir().unwrap();
    let (cluster, mut child, a_ep, store, b) = a_killable_and_b_of_two_blocks(dir.path()).await;
    let c_nms = Nms::start("c", &cluster.endpoints(), |_| {}).await;
    let mut o = opts(&[&a_ep, &b.ep, &c_nms.ep], "busy", "k");
    o.op_timeout = Duration::from_millis(800);
    o.rpc_timeout = Duration::from_millis(1500);
    let c = VolumeClient::open(o).await.unwrap();
    writes_left_only_in_the_journal(&c, &mut child).await;
    store.hold_writes.send_replace(true);
    let mut failed = 0;
    let got = loop {
        match c.read(1, 0, None).await {
            Ok(got) => break got,
            Err(e) => {
                failed += 1;
                assert!(failed < 10, "still at the busy NMS after {failed} calls: {e}");
            }
        }
    };
    assert!(failed >= 1, "the first call could not have judged B stalled");
    assert_eq!(got, Some(block_data(1, 1)));
    assert_eq!(c.current_nms(), c_nms.ep, "C took the volume");
    store.hold_writes.send_replace(false);
    for blk in 1..=4u64 {
        assert_eq!(c.read(blk, 0, None).await.unwrap(), Some(block_data(blk, 1)), "block {blk}");
    }
    c.flush().await.unwrap();
    let want: HashMap<u64, Vec<u8>> = (1..=4).map(|b| (b, block_data(b, 1))).collect();
    assert_persisted_and_read_back(&cluster, &c, "busy", &want).await;
    b.stop().await;
    c_nms.stop().await;
    cluster.shutdown().await;
}

/// A's writes only in the vehicle's journal (A killed), B takes two of them and refuses the
/// rest while its write-back is held for a call's time; C is the vehicle's third NMS.
/// `moves_on`: the client is expected at C after that call, else at B.
async fn replay_at_a_busy_nms(rpc_timeout: Duration, moves_on: bool) {
    wayside_proto::telemetry::init_for_tests();
    let dir = tempfile::tempdir().unwrap();
    let (cluster, mut child, a_ep, store, b) = a_killable_and_b_of_two_blocks(dir.path()).await;
    let c_nms = Nms::start("c", &cluster.endpoints(), |_| {}).await;
    let mut o = opts(&[&a_ep, &b.ep, &c_nms.ep], "busy", "k");
    o.op_timeout = Duration::from_secs(4);
    o.rpc_timeout = rpc_timeout;
    let c = VolumeClient::open(o).await.unwrap();
    writes_left_only_in_the_journal(&c, &mut child).await;
    store.hold_writes.send_replace(true);
    // B takes blocks 1 and 2 and refuses the rest while nothing persists.
    let first = c.read(1, 0, None).await;
    let on_c = c_nms.status().await.volumes;
    if moves_on {
        assert_eq!(first.unwrap(), Some(block_data(1, 1)), "read at C");
        assert_eq!((on_c, c.current_nms()), (1, c_nms.ep.clone()), "C took the volume");
    } else {
        assert!(first.is_err(), "the read waited on B until its deadline: {first:?}");
        assert!(c.attaches() >= 3, "B was tried again: {} attaches", c.attaches());
        let on_b: Vec<u64> = b.status().await.volume_info.iter().map(|v| v.accepted_lsn).collect();
        assert_eq!(on_b, [2], "B took blocks 1 and 2 of the replay");
        assert_eq!(on_c, 0, "C never took the volume from B");
    }
    store.hold_writes.send_replace(false);
    for blk in 1..=4u64 {
        let got = c.read(blk, 0, None).await.unwrap();
        assert!(got == Some(block_data(blk, 1)), "block {blk}");
    }
    let want_at = if moves_on { &c_nms.ep } else { &b.ep };
    assert_eq!(&c.current_nms(), want_at);
    if !moves_on {
        assert_eq!(c_nms.status().await.volumes, 0, "C never took the volume from B");
    }
    c.flush().await.unwrap();
    let want: HashMap<u64, Vec<u8>> = (1..=4).map(|b| (b, block_data(b, 1))).collect();
    assert_persisted_and_read_back(&cluster, &c, "busy", &want).await;
    b.stop().await;
    c_nms.stop().await;
    cluster.shutdown().await;
}

/// A vehicle whose NMS goes silent with its writes unpersisted (an RSU powered off, or out
/// of range: sockets open, nothing answered, no reset) finds it out by the client's own
/// keepalive PINGs within `keepalive_interval_ms` + `keepalive_timeout_ms`, not by
/// `rpc_timeout` (30 s here): the write in flight fails over to B (the silent NMS's
/// address, tried first, is found out the same way), the journal is replayed there, and
/// every acknowledged write is read back from B and is in the PSS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_nms_is_found_out_by_keepalive_and_the_vehicle_moves_on() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(1, dir.path()).await.unwrap();
    // A holds its writes (no write-back for a minute): only the journal has them.
    let a = Nms::start("a", &cluster.endpoints(), |c| c.writeback_delay_ms = 60_000).await;
    let b = Nms::start("b", &cluster.endpoints(), |_| {}).await;
    let proxy =
        wayside_pss::testing::SilentProxy::start(a.ep.authority().parse().unwrap()).await.unwrap();
    let via = Endpoint::parse(&proxy.addr.to_string()).unwrap();
    let mut o = opts(&[&via, &b.ep], "quiet", "k");
    o.rpc_timeout = Duration::from_secs(30);
    o.op_timeout = Duration::from_secs(60);
    o.http2.keepalive_interval_ms = 200;
    o.http2.keepalive_timeout_ms = 300;
    let c = VolumeClient::open(o).await.unwrap();
    let mut want: HashMap<u64, Vec<u8>> = HashMap::new();
    for blk in 0..16u64 {
        c.write(blk, 0, block_data(blk, 1)).await.unwrap();
        want.insert(blk, block_data(blk, 1));
    }
    assert!(c.journal_bytes() >= 16 * BS as u64, "accepted, not persisted");
    proxy.silence();
    let silenced = Instant::now();
    tokio::time::timeout(Duration::from_secs(20), c.write(16, 0, block_data(16, 1)))
        .await
        .expect("the write waited out rpc_timeout: the silent NMS was not found out")
        .unwrap();
    want.insert(16, block_data(16, 1));
    let took = silenced.elapsed();
    println!("a silent NMS found out and the write landed at B {} ms later", took.as_millis());
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert_eq!(c.current_nms(), b.ep);
    c.flush().await.unwrap();
    assert_persisted_and_read_back(&cluster, &c, "quiet", &want).await;
    drop(proxy);
    b.stop().await;
    a.stop().await;
    cluster.shutdown().await;
}

/// A migration target that dies at a chosen point: a real gRPC server on loopback that
/// answers the protocol up to `die_after`, then drops the stream (and its listener).
#[derive(Debug, Clone, Copy, PartialEq)]
enum DieAt {
    AfterFirstRound,
    /// On the source's Claim, before raising the epoch.
    OnClaim,
    /// Raises the epoch in the PSS, answers Claimed, then dies before SwitchOver.
    AfterClaim,
    /// Raises the epoch in the PSS and dies before answering Claimed.
    RaisedOnClaim,
    /// Raises the epoch at Claim, dies on SwitchOver without answering.
    OnSwitchOver,
    /// A target from before Claim (Ready names no node; a Claim is a frame it does not
    /// know: INVALID_ARGUMENT), dying on SwitchOver.
    OldOnSwitchOver,
    /// Answers Ready, then reads nothing more and answers nothing, its stream left open
    /// (a hung target, or a link cut without a reset): flow control stops the source's
    /// sends once the windows fill.
    SilentAfterReady,
    /// Raises the epoch at Claim, takes SwitchOver in and answers nothing, its stream left
    /// open (silent in the middle of the switch).
    SilentOnSwitchOver,
    /// Raises the epoch at Claim; on SwitchOver writes block 0 (`block_data(0, 9)`) back at
    /// its epoch, the persisted watermark left at the source's (as a batch cut short by its
    /// limits leaves it), then dies without answering.
    WritesBackOnSwitchOver,
}

/// A migration target that raises the epoch in the PSS as a real one does (owner
/// "dying-target") and dies at a chosen point; with a [`ClaimPause`], it waits after its
/// raise landed until the test lets it answer Claimed.
struct DyingTarget(
    DieAt,
    CancellationToken,
    wayside_pss::client::PssClient,
    Option<std::sync::Arc<ClaimPause>>,
);

/// `landed`: the target's Claim raised the epoch; `go`: the test lets it answer.
#[derive(Default)]
struct ClaimPause {
    landed: tokio::sync::Notify,
    go: tokio::sync::Notify,
}

#[tonic::async_trait]
impl pb::migration_server::Migration for DyingTarget {
    type TransferStream = std::pin::Pin<
        Box<dyn futures::Stream<Item = Result<pb::MigrationAck, tonic::Status>> + Send>,
    >;
    async fn transfer(
        &self,
        req: tonic::Request<tonic::Streaming<pb::MigrationFrame>>,
    ) -> Result<tonic::Response<Self::TransferStream>, tonic::Status> {
        use pb::migration_ack::Ack;
        use pb::migration_frame::Frame;
        let mut inbound = req.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let (die, dead, pss, pause) = (self.0, self.1.clone(), self.2.clone(), self.3.clone());
        tokio::spawn(async move {
            let mut volume = String::new();
            let mut claimed_epoch = 0;
            while let Ok(Some(f)) = inbound.message().await {
                let ack = match f.frame {
                    Some(Frame::Begin(b)) => {
                        volume = b.volume;
                        let old = die == DieAt::OldOnSwitchOver;
                        let node = if old { "" } else { "dying-target" };
                        let ready = Ack::Ready(pb::MigrationReady { target_node: node.into() });
                        if die == DieAt::SilentAfterReady {
                            let _ = tx.send(Ok(pb::MigrationAck { ack: Some(ready) })).await;
                            // Silent until the test ends, holding the stream open.
                            dead.cancelled().await;
                            break;
                        }
                        ready
                    }
                    Some(Frame::SwitchOver(sw)) if die == DieAt::WritesBackOnSwitchOver => {
                        let data = block_data(0, 9);
                        pss.write_batch(pb::WriteBatchRequest {
                            volume: volume.clone(),
                            epoch: claimed_epoch,
                            request_id: Some(pb::RequestId {
                                client_id: "dying-target".into(),
                                seq: 1,
                            }),
                            ops: vec![pb::PssBlockOp { block: 0, data, delete: false, version: 0 }],
                            persisted_lsn: sw.persisted_lsn,
                        })
                        .await
                        .expect("the target writes back at its epoch");
                        break;
                    }
                    Some(Frame::SwitchOver(_)) if die == DieAt::SilentOnSwitchOver => {
                        dead.cancelled().await;
                        break;
                    }
                    Some(Frame::Claim(_)) if die == DieAt::OldOnSwitchOver => {
                        let e = tonic::Status::invalid_argument("empty migration frame");
                        let _ = tx.send(Err(e)).await;
                        break;
                    }
                    Some(Frame::Claim(_)) if die == DieAt::OnClaim => break,
                    Some(Frame::Claim(c)) => {
                        let r = pss
                            .acquire_volume(pb::AcquireVolumeRequest {
                                volume: volume.clone(),
                                owner_node: "dying-target".into(),
                                owner_address: "http://127.0.0.1:9".into(),
                                owner_session: 0,
                                expected_epoch: c.expected_epoch,
                                create: None,
                                request_id: None,
                            })
                            .await
                            .expect("the claim raises the epoch");
                        let new_epoch = r.meta.expect("meta").epoch;
                        claimed_epoch = new_epoch;
                        if let Some(p) = &pause {
                            p.landed.notify_one();
                            p.go.notified().await;
                        }
                        if die == DieAt::RaisedOnClaim {
                            break;
                        }
                        let claimed = Ack::Claimed(pb::Claimed { new_epoch });
                        let _ = tx.send(Ok(pb::MigrationAck { ack: Some(claimed) })).await;
                        if die == DieAt::AfterClaim {
                            break;
                        }
                        continue;
                    }
                    Some(Frame::RoundEnd(r)) if die == DieAt::AfterFirstRound => {
                        let _ = r;
                        break;
                    }
                    Some(Frame::RoundEnd(r)) => Ack::Round(pb::RoundAck {
                        round: r.round,
                        blocks: r.blocks,
                        bytes: r.bytes,
                    }),
                    Some(Frame::SwitchOver(_)) => break,
                    _ => continue,
                };
                if tx.send(Ok(pb::MigrationAck { ack: Some(ack) })).await.is_err() {
                    break;
                }
            }
            let _ = tx.send(Err(tonic::Status::unavailable("target died"))).await;
            dead.cancel();
        });
        Ok(tonic::Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_target_dies_mid_move_and_the_source_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(3, dir.path()).await.unwrap();
    let a = Nms::start("a", &cluster.endpoints(), |_| {}).await;
    let c = VolumeClient::open(opts(&[&a.ep], "abort", "k")).await.unwrap();
    for blk in 0..64 {
        c.write(blk, 0, block_data(blk, 1)).await.unwrap();
    }
    let epoch0 = c.stat().await.unwrap().epoch;
    let pss = cluster.client();
    let volume = VolumeName::new("abort").unwrap();
    let mut expected = epoch0;
    for die in [
        DieAt::AfterFirstRound,
        DieAt::OnClaim,
        DieAt::AfterClaim,
        DieAt::OnSwitchOver,
        DieAt::OldOnSwitchOver,
    ] {
        let target = DyingTarget(die, CancellationToken::new(), pss.clone(), None);
        let (t_ep, _dead, server) = dying_target(target).await;
        let report = a.migrate("abort", &t_ep, 2).await;
        assert_eq!(report.outcome, pb::MigrationOutcome::Aborted as i32, "{report:?}");
        let _ = server.await;
        // A move that claimed was taken back before the report: the target's raise and
        // A's re-acquire; the PSS has A as the owner before the vehicle does anything.
        if matches!(die, DieAt::AfterClaim | DieAt::OnSwitchOver) {
            expected += 2;
        }
        // A Claim that never landed (the target died on it): A raises the epoch itself, so
        // a late one (an acquire still waiting in the PSS) fails instead of fencing A.
        if die == DieAt::OnClaim {
            expected += 1;
        }
        // An old target got no Claim: the interrupted switch is settled from A's epoch
        // (one re-acquire), as before Claim.
        if die == DieAt::OldOnSwitchOver {
            assert_eq!(report.claim_us, 0, "no Claim to an old target: {report:?}");
            expected += 1;
        }
        let meta = pss.get_volume(&volume).await.unwrap();
        assert_eq!((meta.epoch, meta.owner_address.as_str()), (expected, a.ep.uri()), "{die:?}");
        if die == DieAt::OnClaim {
            let late = pss
                .acquire_volume(pb::AcquireVolumeRequest {
                    volume: "abort".into(),
                    owner_node: "dying-target".into(),
                    owner_address: "http://127.0.0.1:9".into(),
                    owner_session: 0,
                    expected_epoch: expected - 1,
                    create: None,
                    request_id: None,
                })
                .await;
            assert!(late.is_err(), "the target's late claim fails: {late:?}");
        }
        // A keeps serving: reads, writes and flushes work and nothing is lost.
        c.write(100, 0, block_data(100, 5)).await.unwrap();
        for blk in 0..64 {
            assert_eq!(c.read(blk, 0, None).await.unwrap().unwrap(), block_data(blk, 1));
        }
        c.flush().await.unwrap();
        assert_eq!(c.current_nms(), a.ep);
        assert_eq!(c.stat().await.unwrap().epoch, expected, "A kept the volume: no re-attach");
    }
    let stored = pss_blocks(&cluster, "abort", &(0..64).collect::<Vec<_>>()).await;
    assert_eq!(stored.len(), 64);
    a.stop().await;
    cluster.shutdown().await;
}

/// A write-back batch is in flight when the source, settling an interrupted switch,
/// raises the volume's epoch itself: the PSS refuses the batch (its epoch is older), and
/// the source sends the blocks again in a batch with the new epoch instead of taking
/// itself for fenced or giving up its write-back; the vehicle's flush completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_older_than_the_nodes_own_raise_is_written_back_again() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(3, dir.path()).await.unwrap();
    let store = FaultyPss::new(&cluster);
    let a = Nms(LocalNms::start_with_store("a", store.clone(), |c| {
        c.writeback_delay_ms = 0;
        c.migration_writeback_drain_ms = 50;
    })
    .await);
    let c = VolumeClient::open(opts(&[&a.ep], "inflight", "k")).await.unwrap();
    for blk in 0..8 {
        c.write(blk, 0, block_data(blk, 1)).await.unwrap();
    }
    c.flush().await.unwrap();
    let epoch0 = c.stat().await.unwrap().epoch;
    // The next write-back waits in the store, in flight.
    store.hold_writes.send_replace(true);
    c.write(8, 0, block_data(8, 1)).await.unwrap();
    store.held("no write-back started").await;
    let pss = cluster.client();
    let target = DyingTarget(DieAt::OldOnSwitchOver, CancellationToken::new(), pss.clone(), None);
    let (t_ep, dead, server) = dying_target(target).await;
    let report = a.migrate("inflight", &t_ep, 2).await;
    dead.cancel();
    let _ = server.await;
    assert!(report.error.contains("kept the volume"), "{report:?}");
    let meta = pss.get_volume(&VolumeName::new("inflight").unwrap()).await.unwrap();
    assert_eq!(meta.epoch, epoch0 + 1, "A raised the epoch while the batch was in flight");
    // The batch goes on to the PSS with the old epoch, and is refused.
    store.hold_writes.send_replace(false);
    c.write(9, 0, block_data(9, 1)).await.unwrap();
    c.flush().await.unwrap();
    let want: HashMap<u64, Vec<u8>> = (0..10).map(|b| (b, block_data(b, 1))).collect();
    assert_persisted_and_read_back(&cluster, &c, "inflight", &want).await;
    assert_eq!(c.current_nms(), a.ep);
    a.stop().await;
    cluster.shutdown().await;
}

/// A move's switch ends without Switched after the target claimed the volume; taking it
/// back, the source finds the claim as expected (nothing written back past its copy), but
/// the target, which had switched, writes back between that look and the source's raise.
/// The source's copy is then stale: it is dropped, and the vehicle's next call loads the
/// volume anew from the PSS, with the target's write. The same when the raise's answer is
/// lost too (the source then finds its own raise in the PSS record), and when the target's
/// batch left the persisted watermark at the source's accepted lsn (a batch cut short by
/// its limits persists a newer block without moving the watermark past it: the watermark
/// alone told the source its copy was current, and its older block went back over the
/// target's; the PSS's record of the last write-back's epoch tells).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_take_back_that_finds_the_target_wrote_back_meanwhile_drops_the_stale_copy() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(3, dir.path()).await.unwrap();
    let store = FaultyPss::new(&cluster);
    let a = Nms(LocalNms::start_with_store("a", store.clone(), |_| {}).await);
    let pss = cluster.client();
    for (round, vol, lose_answer, past) in
        [(1, "raced", false, 1), (2, "raced-lost", true, 1), (3, "raced-low", false, 0)]
    {
        let c = VolumeClient::open(opts(&[&a.ep], vol, "k")).await.unwrap();
        for blk in 0..8 {
            c.write(blk, 0, block_data(blk, 1)).await.unwrap();
        }
        c.flush().await.unwrap();
        let st = a.status().await;
        let info = st.volume_info.iter().find(|v| v.volume == vol).unwrap().clone();
        let (epoch0, accepted) = (info.epoch, info.accepted_lsn);
        // The target's write-back at its claimed epoch, committed just before A's raise.
        *store.before_acquire.lock().unwrap() = Some(wayside_nms::store::WriteBack {
            volume: VolumeName::new(vol).unwrap(),
            epoch: wayside_proto::types::Epoch(epoch0 + 1),
            request_id: wayside_proto::types::RequestId::new("dying-target", round).unwrap(),
            changes: vec![wayside_nms::store::Change {
                block: 0,
                data: Some(block_data(0, 9).into()),
                version: ((epoch0 + 1) << 32) | (accepted + 1),
            }],
            persisted: wayside_proto::types::Lsn(accepted + past),
        });
        store.lose_acquire_answer.store(lose_answer, std::sync::atomic::Ordering::SeqCst);
        let target = DyingTarget(DieAt::OnSwitchOver, CancellationToken::new(), pss.clone(), None);
        let (t_ep, dead, server) = dying_target(target).await;
        let report = a.migrate(vol, &t_ep, 2).await;
        dead.cancel();
        let _ = server.await;
        assert!(store.before_acquire.lock().unwrap().is_none(), "the target wrote back");
        let lost = store.lose_acquire_answer.load(std::sync::atomic::Ordering::SeqCst);
        assert!(!lost, "{vol}: the answer was lost when asked");
        assert_eq!(report.outcome, pb::MigrationOutcome::Aborted as i32, "{report:?}");
        assert!(report.error.contains("loaded again"), "{vol}: {report:?}");
        // The vehicle sees the target's write, not the stale copy's block.
        assert_eq!(c.read(0, 0, None).await.unwrap(), Some(block_data(0, 9)), "{vol}");
        for blk in 1..8 {
            assert_eq!(c.read(blk, 0, None).await.unwrap(), Some(block_data(blk, 1)));
        }
        c.write(8, 0, block_data(8, 1)).await.unwrap();
        c.flush().await.unwrap();
        let meta = pss.get_volume(&VolumeName::new(vol).unwrap()).await.unwrap();
        assert_eq!(meta.owner_address, a.ep.uri());
        assert_eq!(c.current_nms(), a.ep);
    }
    a.stop().await;
    cluster.shutdown().await;
}

/// A move's switch ends without Switched, and before the source looks, the target (which
/// switched) wrote a block back at its claimed epoch without moving the persisted
/// watermark past the source's lsn (a batch cut short by its limits). The PSS's record of
/// the last write-back's epoch tells the source the target acted as the owner: it is
/// fenced (not a take-back over the target), and the vehicle reads the target's block.
/// (With the watermark alone the source took the volume back and wrote its older block
/// over the target's.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_target_that_wrote_back_at_its_claimed_epoch_is_not_taken_back() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(3, dir.path()).await.unwrap();
    let a = Nms::start("a", &cluster.endpoints(), |_| {}).await;
    let c = VolumeClient::open(opts(&[&a.ep], "wrote", "k")).await.unwrap();
    for blk in 0..8 {
        c.write(blk, 0, block_data(blk, 1)).await.unwrap();
    }
    c.flush().await.unwrap();
    let pss = cluster.client();
    let target = DyingTarget(DieAt::WritesBackOnSwitchOver, CancellationToken::new(), pss, None);
    let (t_ep, dead, server) = dying_target(target).await;
    let report = a.migrate("wrote", &t_ep, 2).await;
    dead.cancel();
    let _ = server.await;
    assert_eq!(report.outcome, pb::MigrationOutcome::Aborted as i32, "{report:?}");
    assert!(report.error.contains("owns the volume now"), "fenced, not taken back: {report:?}");
    assert_eq!(c.read(0, 0, None).await.unwrap(), Some(block_data(0, 9)), "the target's block");
    for blk in 1..8 {
        assert_eq!(c.read(blk, 0, None).await.unwrap(), Some(block_data(blk, 1)));
    }
    c.write(8, 0, block_data(8, 1)).await.unwrap();
    c.flush().await.unwrap();
    let stored = pss_blocks(&cluster, "wrote", &[0, 8]).await;
    assert_eq!(stored.get(&0), Some(&block_data(0, 9)), "nothing older written over it");
    assert_eq!(stored.get(&8), Some(&block_data(8, 1)));
    a.stop().await;
    cluster.shutdown().await;
}

/// Vehicle X's copy at A is taken over at B by vehicle Y, which writes there; A's copy
/// holds one write of X's not yet persisted, and nothing fences it (its write-back waits).
/// A third vehicle attaching at A gets the volume as B left it, not A's old blocks: A
/// checks its copy is still the volume's at an explicit attach, drops it and loads the
/// volume anew. X's next call is told to attach again (its copy was replaced), so it
/// replays its write instead of being served by the new copy, which never had it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_attach_to_a_copy_another_nms_took_over_loads_the_volume_anew() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(3, dir.path()).await.unwrap();
    let a = Nms::start("a", &cluster.endpoints(), |c| c.writeback_delay_ms = 600_000).await;
    let b = Nms::start("b", &cluster.endpoints(), |_| {}).await;
    let x = VolumeClient::open(opts(&[&a.ep], "taken", "k")).await.unwrap();
    x.write(0, 0, block_data(0, 1)).await.unwrap();
    x.flush().await.unwrap();
    x.write(1, 0, block_data(1, 1)).await.unwrap();
    let y = VolumeClient::open(opts(&[&b.ep], "taken", "k")).await.unwrap();
    y.write(0, 0, block_data(0, 2)).await.unwrap();
    y.flush().await.unwrap();
    let z = VolumeClient::open(opts(&[&a.ep], "taken", "k")).await.unwrap();
    assert_eq!(z.read(0, 0, None).await.unwrap(), Some(block_data(0, 2)), "A's old block");
    let meta = cluster.client().get_volume(&VolumeName::new("taken").unwrap()).await.unwrap();
    assert_eq!(meta.owner_address, a.ep.uri(), "A took it over again");
    // X's next call, a batch the new copy could take at once, makes X attach again and
    // replay its write; nothing of it is lost.
    x.write_many(vec![(2, 0, block_data(2, 1))]).await.unwrap();
    let got = x.read_many(&[0, 1, 2]).await.unwrap();
    assert_eq!(got[1], Some(block_data(1, 1)), "X's write");
    assert_eq!(got[2], Some(block_data(2, 1)));
    x.flush().await.unwrap();
    let stored = pss_blocks(&cluster, "taken", &[0, 1, 2]).await;
    assert_eq!(stored.get(&0), Some(&block_data(0, 2)));
    assert_eq!(stored.get(&1), Some(&block_data(1, 1)));
    assert_eq!(stored.get(&2), Some(&block_data(2, 1)));
    drop((x, y, z));
    a.stop().await;
    b.stop().await;
    cluster.shutdown().await;
}

/// A copy the volume left without telling it (clean, so no fenced write-back told it:
/// another NMS took the volume over) does not stand in the way of a move back into its
/// NMS: once the PSS confirms the source's epoch, the move in drops it (as an attach there
/// would) and completes; the vehicle reads what it wrote at the other NMS. (It was refused
/// as "already here" at every try, until a vehicle's attach dropped it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_move_back_in_drops_a_copy_the_volume_left_without_telling_it() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(1, dir.path()).await.unwrap();
    let a = Nms::start("a", &cluster.endpoints(), |_| {}).await;
    let b = Nms::start("b", &cluster.endpoints(), |_| {}).await;
    let x = VolumeClient::open(opts(&[&a.ep], "left", "k")).await.unwrap();
    x.write(0, 0, block_data(0, 1)).await.unwrap();
    x.flush().await.unwrap();
    let y = VolumeClient::open(opts(&[&b.ep], "left", "k")).await.unwrap();
    y.write(0, 0, block_data(0, 2)).await.unwrap();
    assert_eq!(a.status().await.volumes, 1, "A still holds its clean copy");
    let report = b.migrate("left", &a.ep, 2).await;
    assert_eq!(report.outcome, pb::MigrationOutcome::Completed as i32, "{report:?}");
    assert_eq!(y.read(0, 0, None).await.unwrap(), Some(block_data(0, 2)));
    assert_eq!(y.current_nms(), a.ep, "redirected to A");
    assert_eq!(x.read(0, 0, None).await.unwrap(), Some(block_data(0, 2)), "not A's old copy");
    y.flush().await.unwrap();
    assert_eq!(pss_blocks(&cluster, "left", &[0]).await[&0], block_data(0, 2));
    drop((x, y));
    a.stop().await;
    b.stop().await;
    cluster.shutdown().await;
}

/// A flush waits on a copy that is dropped and loaded anew meanwhile: another NMS took
/// the volume over and wrote back, then a vehicle attached here again. The new copy's
/// persisted watermark, past the lsn the flush waits for, says nothing of the write the
/// old copy held: the flush is not answered from it. The vehicle's journal replays the
/// write to the new copy and its flush returns once the write is in the PSS. (The flush
/// sees the copy gone first, between its drop and the reload; the incarnation check in
/// `Node::flush` covers a flush that wakes only after the reload. With both off, the
/// write is lost and this test fails.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flush_is_not_answered_by_a_copy_loaded_anew_during_it() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(3, dir.path()).await.unwrap();
    let store = FaultyPss::new(&cluster);
    let a = Nms(LocalNms::start_with_store("a", store.clone(), |_| {}).await);
    let b = Nms::start("b", &cluster.endpoints(), |_| {}).await;
    let x = VolumeClient::open(opts(&[&a.ep], "reloaded", "k")).await.unwrap();
    store.hold_writes.send_replace(true);
    x.write(0, 0, block_data(0, 1)).await.unwrap();
    let flush = tokio::spawn(async move { x.flush().await.map(|p| (x, p)) });
    store.held("the flush started no write-back").await;
    let y = VolumeClient::open(opts(&[&b.ep], "reloaded", "k")).await.unwrap();
    for blk in 1..=3 {
        y.write(blk, 0, block_data(blk, 1)).await.unwrap();
    }
    y.flush().await.unwrap();
    let z = VolumeClient::open(opts(&[&a.ep], "reloaded", "k")).await.unwrap();
    let meta = cluster.client().get_volume(&VolumeName::new("reloaded").unwrap()).await.unwrap();
    assert_eq!(meta.owner_address, a.ep.uri(), "A loaded the volume anew");
    assert!(!flush.is_finished(), "the flush still waits");
    store.hold_writes.send_replace(false);
    let (x, _) = flush.await.unwrap().unwrap();
    let stored = pss_blocks(&cluster, "reloaded", &[0, 1, 2, 3]).await;
    let want: HashMap<u64, Vec<u8>> = (0..=3).map(|b| (b, block_data(b, 1))).collect();
    assert_eq!(stored, want, "the flushed write is in the PSS");
    drop((x, y, z));
    a.stop().await;
    b.stop().await;
    cluster.shutdown().await;
}

/// The writes of a dedupe test: block 0 written (its request id soon forgotten by an NMS
/// remembering 8), blocks 1..=10, then block 0 again; nothing persisted yet.
async fn writes_past_the_dedupe_window(c: &VolumeClient) {
    c.write(0, 0, block_data(0, 1)).await.unwrap();
    for blk in 1..=10 {
        c.write(blk, 0, block_data(blk, 1)).await.unwrap();
    }
    c.write(0, 0, block_data(0, 2)).await.unwrap();
    let entry = BS as u64 + wayside_nms::client::JOURNAL_ENTRY_OVERHEAD_BYTES;
    assert_eq!(c.journal_bytes(), 12 * entry, "nothing persisted yet");
}

/// Every block of the dedupe test reads back (from the NMS, then the PSS) as last written.
async fn assert_the_last_writes(cluster: &LocalCluster, c: &VolumeClient, vol: &str) {
    assert_eq!(c.read(0, 0, None).await.unwrap(), Some(block_data(0, 2)), "block 0 rewound");
    c.flush().await.unwrap();
    let mut want: HashMap<u64, Vec<u8>> = (1..=10).map(|b| (b, block_data(b, 1))).collect();
    want.insert(0, block_data(0, 2));
    assert_persisted_and_read_back(cluster, c, vol, &want).await;
}

/// A vehicle reconnects to the NMS it was on, its journal holding writes whose request
/// ids the NMS has forgotten (it remembers the last 8): the NMS's copy of the volume holds
/// every write it accepted, so none is replayed (sent again, the forgotten first write of
/// block 0 would be applied over its later rewrite).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reconnect_replays_nothing_the_nms_holds_even_past_its_dedupe_window() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(3, dir.path()).await.unwrap();
    let a = Nms::start("a", &cluster.endpoints(), |c| {
        c.dedupe_entries_per_volume = 8;
        c.writeback_delay_ms = 600_000;
    })
    .await;
    // The vehicle reaches A through a proxy first, then directly.
    let proxy =
        wayside_pss::testing::SilentProxy::start(a.ep.authority().parse().unwrap()).await.unwrap();
    let via = Endpoint::parse(&proxy.addr.to_string()).unwrap();
    let c = VolumeClient::open(opts(&[&via, &a.ep], "window", "k")).await.unwrap();
    writes_past_the_dedupe_window(&c).await;
    // The connection drops; the vehicle attaches to A again, directly.
    drop(proxy);
    assert_eq!(c.read(5, 0, None).await.unwrap(), Some(block_data(5, 1)));
    assert_eq!(c.current_nms(), a.ep);
    let st = a.status().await;
    let accepted = st.volume_info.iter().find(|v| v.volume == "window").unwrap().accepted_lsn;
    assert_eq!(accepted, 12, "no write applied twice");
    assert_the_last_writes(&cluster, &c, "window").await;
    a.stop().await;
    cluster.shutdown().await;
}

/// The same across a move: the target's copy continues the source's up to the switch, so
/// the vehicle, redirected there with every write still in its journal (ids the target
/// never saw, the source having forgotten them), replays none of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_moved_volume_gets_no_replay_of_what_it_holds_even_past_the_dedupe_window() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(3, dir.path()).await.unwrap();
    let small = |c: &mut Config| {
        c.dedupe_entries_per_volume = 8;
        c.writeback_delay_ms = 600_000;
    };
    let a = Nms::start("a", &cluster.endpoints(), small).await;
    let b = Nms::start("b", &cluster.endpoints(), small).await;
    let c = VolumeClient::open(opts(&[&a.ep], "window2", "k")).await.unwrap();
    writes_past_the_dedupe_window(&c).await;
    let report = a.migrate("window2", &b.ep, 2).await;
    assert_eq!(report.outcome, pb::MigrationOutcome::Completed as i32, "{report:?}");
    // Redirected to B.
    assert_eq!(c.read(5, 0, None).await.unwrap(), Some(block_data(5, 1)));
    assert_eq!(c.current_nms(), b.ep);
    let st = b.status().await;
    let info = st.volume_info.iter().find(|v| v.volume == "window2").unwrap();
    assert_eq!(info.accepted_lsn, 12, "no write applied twice: {info:?}");
    assert_eq!(info.predecessor_through_lsn, 12, "{info:?}");
    assert_the_last_writes(&cluster, &c, "window2").await;
    a.stop().await;
    b.stop().await;
    cluster.shutdown().await;
}

/// ... and two moves on: the volume moves A to B and B to C while its vehicle is idle, and
/// the vehicle, A and B out of its reach, attaches at C: C's copy continues B's, which
/// continued A's, which accepted every write in the journal. C names both
/// (`VolumeInfo.ancestors`), and the vehicle replays none of them. (Naming only B, every
/// entry was replayed with its id; C remembers only the last 8 ids, so the forgotten first
/// write of block 0 was applied again over its later rewrite.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_volume_two_moves_on_gets_no_replay_of_what_it_holds_even_past_the_dedupe_window() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(1, dir.path()).await.unwrap();
    let small = |c: &mut Config| {
        c.dedupe_entries_per_volume = 8;
        c.writeback_delay_ms = 600_000;
    };
    let a = Nms::start("a", &cluster.endpoints(), small).await;
    let b = Nms::start("b", &cluster.endpoints(), small).await;
    let c_nms = Nms::start("c", &cluster.endpoints(), small).await;
    let c = VolumeClient::open(opts(&[&a.ep, &c_nms.ep], "window3", "k")).await.unwrap();
    writes_past_the_dedupe_window(&c).await;
    let first = c.stat().await.unwrap();
    let report = a.migrate("window3", &b.ep, 2).await;
    assert_eq!(report.outcome, pb::MigrationOutcome::Completed as i32, "{report:?}");
    let report = b.migrate("window3", &c_nms.ep, 2).await;
    assert_eq!(report.outcome, pb::MigrationOutcome::Completed as i32, "{report:?}");
    a.stop().await;
    b.stop().await;
    assert_eq!(c.read(5, 0, None).await.unwrap(), Some(block_data(5, 1)));
    assert_eq!(c.current_nms(), c_nms.ep);
    let st = c_nms.status().await;
    let info = st.volume_info.iter().find(|v| v.volume == "window3").unwrap();
    assert_eq!(info.accepted_lsn, 12, "no write applied twice: {info:?}");
    let named: Vec<(u64, u32, u64)> =
        info.ancestors.iter().map(|a| (a.session, a.incarnation, a.through_lsn)).collect();
    assert_eq!(named, [(first.nms_session, first.incarnation, 12)], "A's copy: {info:?}");
    assert_the_last_writes(&cluster, &c, "window3").await;
    c_nms.stop().await;
    cluster.shutdown().await;
}

/// A vehicle idle through two moves (A to B, then B to C) follows the redirects to C,
/// where the volume is: its attach at B, which the volume left too, is answered with a
/// redirect (`AttachRequest.take_over` unset), not by B taking the volume back from C (a
/// needless ownership change that fenced C's unpersisted writes). Only once it has been
/// without an NMS for `rpc_timeout` (C out of reach) does it take the volume over.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_vehicle_idle_through_two_moves_follows_them_and_takes_nothing_back() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(1, dir.path()).await.unwrap();
    let a = Nms::start("a", &cluster.endpoints(), |_| {}).await;
    let b = Nms::start("b", &cluster.endpoints(), |_| {}).await;
    let c_nms = Nms::start("c", &cluster.endpoints(), |_| {}).await;
    let c = VolumeClient::open(opts(&[&a.ep], "idle2", "k")).await.unwrap();
    for blk in 0..4 {
        c.write(blk, 0, block_data(blk, 1)).await.unwrap();
    }
    let first = c.stat().await.unwrap();
    let report = a.migrate("idle2", &b.ep, 2).await;
    assert_eq!(report.outcome, pb::MigrationOutcome::Completed as i32, "{report:?}");
    let report = b.migrate("idle2", &c_nms.ep, 2).await;
    assert_eq!(report.outcome, pb::MigrationOutcome::Completed as i32, "{report:?}");
    assert_eq!(c.read(1, 0, None).await.unwrap(), Some(block_data(1, 1)));
    assert_eq!(c.current_nms(), c_nms.ep, "followed A's redirect to B, and B's to C");
    let at_c = c.stat().await.unwrap();
    assert_eq!(at_c.epoch, first.epoch + 2, "one raise per move, none by B taking it back");
    assert_eq!(b.status().await.volumes, 0, "B serves no copy of it");
    // C goes away: A, which the volume moved on from, takes it over.
    c.flush().await.unwrap();
    c_nms.stop().await;
    assert_eq!(c.read(2, 0, None).await.unwrap(), Some(block_data(2, 1)));
    let now = c.current_nms();
    assert!(now == a.ep || now == b.ep, "taken over at A or B: {now}");
    for blk in 0..4 {
        assert_eq!(c.read(blk, 0, None).await.unwrap(), Some(block_data(blk, 1)), "{blk}");
    }
    a.stop().await;
    b.stop().await;
    cluster.shutdown().await;
}

/// A vehicle sent by A's redirect to where its volume went, B, which accepts connections
/// and never answers (a hung process), takes the volume over at A once it has been without
/// an NMS for `rpc_timeout`, within a few calls, and reads what it wrote: also when each
/// call's `op_timeout` is no longer than `rpc_timeout` (a call ends while B is tried; the
/// time without an NMS counts across calls, and B, which never answered, is no longer
/// tried first).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_redirect_to_a_hung_nms_makes_the_vehicle_take_the_volume_over() {
    for (rpc_ms, op_ms) in [(500, 1000), (600, 600)] {
        redirect_to_a_hung_nms(Duration::from_millis(rpc_ms), Duration::from_millis(op_ms)).await;
    }
}

async fn redirect_to_a_hung_nms(rpc_timeout: Duration, op_timeout: Duration) {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(1, dir.path()).await.unwrap();
    let a = Nms::start("a", &cluster.endpoints(), |_| {}).await;
    let b = Nms::start("b", &cluster.endpoints(), |_| {}).await;
    let mut o = opts(&[&a.ep, &b.ep], "hung", "k");
    (o.rpc_timeout, o.op_timeout) = (rpc_timeout, op_timeout);
    let c = VolumeClient::open(o).await.unwrap();
    for blk in 0..4 {
        c.write(blk, 0, block_data(blk, 1)).await.unwrap();
    }
    c.flush().await.unwrap();
    let first = c.stat().await.unwrap();
    let report = a.migrate("hung", &b.ep, 2).await;
    assert_eq!(report.outcome, pb::MigrationOutcome::Completed as i32, "{report:?}");
    // B hangs: its address accepts connections and never answers.
    let holder = hang(b).await;
    let mut failed = 0;
    let got = loop {
        match c.read(1, 0, None).await {
            Ok(got) => break got,
            Err(e) => {
                failed += 1;
                assert!(failed < 4, "{op_timeout:?}: still trying B after {failed} calls: {e}");
            }
        }
    };
    assert_eq!(got, Some(block_data(1, 1)));
    assert_eq!(c.current_nms(), a.ep, "A took the volume over");
    assert!(c.stat().await.unwrap().epoch > first.epoch + 1, "taken over after the move");
    holder.abort();
    a.stop().await;
    cluster.shutdown().await;
}

/// Stops `nms` and has its address accept connections and never answer (until the task
/// returned is aborted).
async fn hang(nms: Nms) -> tokio::task::JoinHandle<()> {
    let addr: std::net::SocketAddr = nms.ep.authority().parse().unwrap();
    nms.stop().await;
    let hung = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hung.accept().await {
            held.push(s);
        }
    })
}

/// The vehicle's first two NMSs hang (accepting connections, never answering) and the
/// third is live: each call that finds the one tried first out of reach makes the next in
/// the list the first to try, so the vehicle reaches the third within a few calls, each no
/// longer than `rpc_timeout`. (Made the second candidate of the round the first, the two
/// hung NMSs took turns being first and the third was never tried.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_vehicle_whose_first_two_nmss_hang_reaches_the_third() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(1, dir.path()).await.unwrap();
    let a = Nms::start("a", &cluster.endpoints(), |_| {}).await;
    let b = Nms::start("b", &cluster.endpoints(), |_| {}).await;
    let live = Nms::start("c", &cluster.endpoints(), |_| {}).await;
    let mut o = opts(&[&a.ep, &b.ep, &live.ep], "three", "k");
    (o.rpc_timeout, o.op_timeout) = (Duration::from_millis(500), Duration::from_millis(500));
    let c = VolumeClient::open(o).await.unwrap();
    for blk in 0..4 {
        c.write(blk, 0, block_data(blk, 1)).await.unwrap();
    }
    c.flush().await.unwrap();
    assert_eq!(c.current_nms(), a.ep);
    let (b_ep, a_ep) = (b.ep.clone(), a.ep.clone());
    let hung = [hang(a).await, hang(b).await];
    let mut failed = 0;
    let got = loop {
        match c.read(2, 0, None).await {
            Ok(got) => break got,
            Err(e) => {
                failed += 1;
                assert!(failed < 5, "the third NMS not reached after {failed} calls: {e}");
            }
        }
    };
    assert_eq!(got, Some(block_data(2, 1)));
    assert_eq!(c.current_nms(), live.ep, "neither {a_ep} nor {b_ep}");
    c.write(7, 0, block_data(7, 2)).await.unwrap();
    c.flush().await.unwrap();
    let mut want: HashMap<u64, Vec<u8>> = (0..4).map(|b| (b, block_data(b, 1))).collect();
    want.insert(7, block_data(7, 2));
    assert_persisted_and_read_back(&cluster, &c, "three", &want).await;
    hung.iter().for_each(|h| h.abort());
    live.stop().await;
    cluster.shutdown().await;
}

/// A fake migration target's gRPC server on a fresh loopback port: its address, and the
/// task serving it until `dead` is cancelled.
async fn dying_target(
    target: DyingTarget,
) -> (Endpoint, CancellationToken, tokio::task::JoinHandle<Result<(), tonic::transport::Error>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ep = Endpoint::parse(&listener.local_addr().unwrap().to_string()).unwrap();
    let dead = target.1.clone();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(pb::migration_server::MigrationServer::new(target))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                dead.clone().cancelled_owned(),
            ),
    );
    (ep, dead, server)
}

/// The target raised the epoch at Claim and died before answering, and the PSS cannot
/// answer the source when it tries to take the volume back. The source serves the volume
/// on, its write-back held, and takes it back once the PSS answers. (It released the
/// write-back at once: the next write-back, fenced by the target's raise, turned the
/// volume into a redirect to the dead target, which never served it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_claim_whose_take_back_waits_for_the_pss_keeps_the_volume_here() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(1, dir.path()).await.unwrap();
    let store = FaultyPss::new(&cluster);
    let a = Nms(LocalNms::start_with_store("a", store.clone(), |c| {
        c.writeback_delay_ms = 0;
        c.pss_rpc_timeout_ms = 200;
        c.pss_deadline_ms = 1_000;
    })
    .await);
    let c = VolumeClient::open(opts(&[&a.ep], "held", "k")).await.unwrap();
    for blk in 0..8 {
        c.write(blk, 0, block_data(blk, 1)).await.unwrap();
    }
    c.flush().await.unwrap();
    let before = c.stat().await.unwrap();
    let epoch0 = before.epoch;
    let pss = cluster.client();
    let pause = std::sync::Arc::new(ClaimPause::default());
    let target = DyingTarget(
        DieAt::RaisedOnClaim,
        CancellationToken::new(),
        pss.clone(),
        Some(pause.clone()),
    );
    let (t_ep, dead, server) = dying_target(target).await;
    // Once the target's raise has landed, the PSS stops answering A's volume reads.
    let unreachable = async {
        pause.landed.notified().await;
        store.fail_get_volume.store(usize::MAX, std::sync::atomic::Ordering::SeqCst);
        pause.go.notify_one();
    };
    let (report, ()) = tokio::join!(a.migrate("held", &t_ep, 1), unreachable);
    dead.cancel();
    let _ = server.await;
    assert_eq!(report.outcome, pb::MigrationOutcome::Aborted as i32, "{report:?}");
    assert!(report.error.contains("write-back held"), "{report:?}");
    // Served on meanwhile: a write is taken.
    c.write(100, 0, block_data(100, 2)).await.unwrap();
    assert_eq!(c.read(3, 0, None).await.unwrap(), Some(block_data(3, 1)));
    // The PSS answers again: A takes the volume back and writes back with its new epoch.
    store.fail_get_volume.store(0, std::sync::atomic::Ordering::SeqCst);
    c.flush().await.unwrap();
    assert_eq!(c.current_nms(), a.ep, "the vehicle stayed at A");
    let after = c.stat().await.unwrap();
    assert_eq!(
        after.incarnation, before.incarnation,
        "A's copy was kept (not turned into a redirect to the dead target, then loaded anew)"
    );
    let meta = pss.get_volume(&VolumeName::new("held").unwrap()).await.unwrap();
    assert_eq!(meta.owner_node, "a");
    assert_eq!(meta.epoch, epoch0 + 2, "the target's raise, then A's take-back");
    let mut want: HashMap<u64, Vec<u8>> = (0..8).map(|b| (b, block_data(b, 1))).collect();
    want.insert(100, block_data(100, 2));
    assert_persisted_and_read_back(&cluster, &c, "held", &want).await;
    a.stop().await;
    cluster.shutdown().await;
}

/// A flush waiting on a slow PSS longer than the client's `rpc_timeout` is waited for on
/// the same connection (its NMS is alive; keepalive finds out one that is not): it was taken
/// for a dead NMS, the connection dropped and the volume attached again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_slower_than_rpc_timeout_keeps_its_connection() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(1, dir.path()).await.unwrap();
    let store = FaultyPss::new(&cluster);
    let a = Nms(LocalNms::start_with_store("a", store.clone(), |c| {
        c.writeback_delay_ms = 0;
        c.pss_deadline_ms = 10_000;
    })
    .await);
    let mut o = opts(&[&a.ep], "slow", "k");
    o.rpc_timeout = Duration::from_millis(300);
    o.op_timeout = Duration::from_secs(10);
    let c = VolumeClient::open(o).await.unwrap();
    assert_eq!(c.attaches(), 1);
    store.hold_writes.send_replace(true);
    c.write(1, 0, block_data(1, 1)).await.unwrap();
    store.held("no write-back started").await;
    let flush = tokio::spawn({
        let c = c.clone();
        async move { c.flush().await }
    });
    // The PSS is slow: the write-back lands after twice the client's rpc_timeout.
    tokio::time::sleep(Duration::from_millis(600)).await;
    store.hold_writes.send_replace(false);
    flush.await.unwrap().unwrap();
    assert_eq!(c.attaches(), 1, "the flush dropped its connection and attached again");
    let want: HashMap<u64, Vec<u8>> = [(1, block_data(1, 1))].into();
    assert_persisted_and_read_back(&cluster, &c, "slow", &want).await;
    a.stop().await;
    cluster.shutdown().await;
}

/// A vehicle that has used the volume at a newer epoch (at B) does not attach to an older,
/// stale copy (at A, which kept serving it while it could not ask the PSS): it would read
/// there data older than what it wrote at B. Once A can ask the PSS, A loads the volume
/// anew and the vehicle reads its own writes there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_vehicle_does_not_attach_to_a_copy_older_than_one_it_used() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(1, dir.path()).await.unwrap();
    let store = FaultyPss::new(&cluster);
    let a =
        Nms(LocalNms::start_with_store("a", store.clone(), |c| c.pss_rpc_timeout_ms = 200).await);
    let b = Nms::start("b", &cluster.endpoints(), |_| {}).await;
    // Another vehicle's client leaves a copy at A (epoch 1) holding X = 1.
    let first = VolumeClient::open(opts(&[&a.ep], "aged", "k")).await.unwrap();
    first.write(7, 0, block_data(7, 1)).await.unwrap();
    first.flush().await.unwrap();
    drop(first);
    // This vehicle works at B (which takes the volume: epoch 2) and writes X = 2.
    let proxy =
        wayside_pss::testing::SilentProxy::start(b.ep.authority().parse().unwrap()).await.unwrap();
    let via_b = Endpoint::parse(&proxy.addr.to_string()).unwrap();
    let mut o = opts(&[&via_b, &a.ep], "aged", "k");
    o.op_timeout = Duration::from_secs(3);
    o.rpc_timeout = Duration::from_millis(500);
    let c = VolumeClient::open(o).await.unwrap();
    c.write(7, 0, block_data(7, 2)).await.unwrap();
    c.flush().await.unwrap();
    assert_eq!(c.current_nms(), via_b);
    // B drops out of reach and A cannot ask the PSS who owns the volume.
    store.fail_get_volume.store(usize::MAX, std::sync::atomic::Ordering::SeqCst);
    proxy.silence();
    match c.read(7, 0, None).await {
        Ok(got) => assert_eq!(got, Some(block_data(7, 2)), "a read older than its own write"),
        Err(e) => println!("no NMS with a current copy: {e}"),
    }
    // A can ask the PSS again: it finds its copy stale, loads the volume anew, and the
    // vehicle reads what it wrote.
    store.fail_get_volume.store(0, std::sync::atomic::Ordering::SeqCst);
    assert_eq!(c.read(7, 0, None).await.unwrap(), Some(block_data(7, 2)));
    assert_eq!(c.current_nms(), a.ep);
    drop(proxy);
    a.stop().await;
    b.stop().await;
    cluster.shutdown().await;
}

/// The target raised the epoch (Claim), took SwitchOver in and died without answering,
/// and the PSS lost its majority meanwhile, so the source cannot learn who owns the
/// volume: it takes no write until the PSS answers (the target may be serving the volume
/// with everything up to the pause, and a write taken here would be missing there), but
/// reads go on. Once the PSS is back the source finds the target never served, takes the
/// volume back and serves it again; nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_switch_whose_outcome_the_pss_cannot_tell_takes_no_write_until_it_can() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = LocalCluster::start(3, dir.path()).await.unwrap();
    let a = Nms::start("a", &cluster.endpoints(), |c| {
        c.pss_deadline_ms = 1_000;
        c.pause_wait_ms = 200;
    })
    .await;
    let mut o = opts(&[&a.ep], "limbo", "k");
    o.op_timeout = Duration::from_millis(1_500);
    let c = VolumeClient::open(o).await.unwrap();
    for blk in 0..16 {
        c.write(blk, 0, block_data(blk, 1)).await.unwrap();
    }
    c.flush().await.unwrap();
    let epoch0 = c.stat().await.unwrap().epoch;
    let pss = cluster.client();
    let pause = std::sync::Arc::new(ClaimPause::default());
    let target = DyingTarget(
        DieAt::OnSwitchOver,
        CancellationToken::new(),
        pss.clone(),
        Some(pause.clone()),
    );
    let (t_ep, dead, server) = dying_target(target).await;
    let (report, ()) = tokio::join!(a.migrate("limbo", &t_ep, 2), async {
        pause.landed.notified().await;
        // The target's raise landed; now the PSS loses its majority.
        cluster.stop_node(2).await.unwrap();
        cluster.stop_node(3).await.unwrap();
        pause.go.notify_one();
    });
    dead.cancel();
    let _ = server.await;
    assert_eq!(report.outcome, pb::MigrationOutcome::Aborted as i32, "{report:?}");
    assert!(report.error.contains("stays paused"), "{report:?}");

    let accepted = |s: pb::NodeStatusReply| {
        s.volume_info.iter().find(|v| v.volume == "limbo").map(|v| v.accepted_lsn)
    };
    let before = accepted(a.status().await);
    let e = c.write(100, 0, block_data(100, 1)).await;
    assert!(e.is_err(), "a write taken while the owner is unknown: {e:?}");
    assert_eq!(c.read(3, 0, None).await.unwrap(), Some(block_data(3, 1)), "reads go on");
    assert_eq!(accepted(a.status().await), before, "no write taken");

    // The PSS back: the target never served, so A takes the volume back and serves again.
    cluster.restart_node(2).await.unwrap();
    cluster.restart_node(3).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while let Err(e) = c.write(101, 0, block_data(101, 1)).await {
        assert!(Instant::now() < deadline, "A still takes no write: {e}");
    }
    let meta = pss.get_volume(&VolumeName::new("limbo").unwrap()).await.unwrap();
    assert_eq!((meta.epoch, meta.owner_address.as_str()), (epoch0 + 2, a.ep.uri()));
    c.flush().await.unwrap();
    let mut want: HashMap<u64, Vec<u8>> = (0..16).map(|b| (b, block_data(b, 1))).collect();
    want.insert(101, block_data(101, 1));
    assert_persisted_and_read_back(&cluster, &c, "limbo", &want).await;
    assert_eq!(c.current_nms(), a.ep);
    a.stop().await;
    cluster.shutdown().await;
}

/// A store over the real PSS with faults a test arms: the answer of the next acquire
/// lost (it commits, the NMS hears UNAVAILABLE); write-backs held back until let go; a
/// write-back of another NMS's committed just before the next acquire.
struct FaultyPss {
    pss: wayside_nms::store::PssStore,
    lose_acquire_answer: std::sync::atomic::AtomicBool,
    /// true: write-backs wait (counted in `held_writes`) until it is set back to false.
    hold_writes: tokio::sync::watch::Sender<bool>,
    held_writes: std::sync::atomic::AtomicUsize,
    before_acquire: std::sync::Mutex<Option<wayside_nms::store::WriteBack>>,
    /// Another caller's acquire (a create, say) committed just before the next acquire.
    acquire_first: std::sync::Mutex<Option<wayside_nms::store::Acquire>>,
    /// The next this many volume reads fail (UNAVAILABLE: the PSS electing a leader).
    fail_get_volume: std::sync::atomic::AtomicUsize,
}

impl FaultyPss {
    /// Waits (at most 10 s) until a write-back is held (`hold_writes`); `what` says what
    /// should have started one.
    async fn held(&self, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.held_writes.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            assert!(Instant::now() < deadline, "{what}");
            tokio::task::yield_now().await;
        }
    }

    fn new(cluster: &LocalCluster) -> std::sync::Arc<FaultyPss> {
        std::sync::Arc::new(FaultyPss {
            pss: wayside_nms::store::PssStore::new(cluster.endpoints(), cluster.client_options()),
            lose_acquire_answer: false.into(),
            hold_writes: tokio::sync::watch::channel(false).0,
            held_writes: 0.into(),
            before_acquire: std::sync::Mutex::new(None),
            acquire_first: std::sync::Mutex::new(None),
            fail_get_volume: 0.into(),
        })
    }
}

impl wayside_nms::store::Store for FaultyPss {
    fn acquire(
        &self,
        req: wayside_nms::store::Acquire,
    ) -> wayside_nms::store::BoxFut<'_, Result<wayside_nms::store::VolumeMeta, StoreError>> {
        Box::pin(async move {
            let first = self.before_acquire.lock().unwrap().take();
            if let Some(wb) = first {
                self.pss.write_batch(wb).await.expect("the other NMS's write-back");
            }
            let other = self.acquire_first.lock().unwrap().take();
            if let Some(other) = other {
                self.pss.acquire(other).await.expect("the other caller's acquire");
            }
            let r = self.pss.acquire(req).await;
            let lose = std::sync::atomic::Ordering::SeqCst;
            if r.is_ok() && self.lose_acquire_answer.swap(false, lose) {
                return Err(StoreError::Unavailable("the answer was lost (test)".into()));
            }
            r
        })
    }
    fn get_volume(
        &self,
        v: VolumeName,
    ) -> wayside_nms::store::BoxFut<'_, Result<wayside_nms::store::VolumeMeta, StoreError>> {
        let ord = std::sync::atomic::Ordering::SeqCst;
        let fail = self.fail_get_volume.fetch_update(ord, ord, |n| n.checked_sub(1)).is_ok();
        if fail {
            return Box::pin(async { Err(StoreError::Unavailable("no leader yet (test)".into())) });
        }
        self.pss.get_volume(v)
    }
    fn write_batch(
        &self,
        b: wayside_nms::store::WriteBack,
    ) -> wayside_nms::store::BoxFut<'_, Result<wayside_proto::types::Lsn, StoreError>> {
        Box::pin(async move {
            let mut rx = self.hold_writes.subscribe();
            if *rx.borrow() {
                self.held_writes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = rx.wait_for(|held| !*held).await;
            }
            self.pss.write_batch(b).await
        })
    }
    fn get_blocks(
        &self,
        v: VolumeName,
        blocks: Vec<wayside_proto::types::BlockNo>,
    ) -> wayside_nms::store::BoxFut<'_, Result<wayside_nms::store::Fetched, StoreError>> {
        self.pss.get_blocks(v, blocks)
    }
    fn list_blocks(
        &self,
        v: VolumeName,
        start: wayside_proto::types::BlockNo,
        limit: u32,
    ) -> wayside_nms::store::BoxFut<'_, Result<wayside_nms::store::BlockPage, StoreError>> {
        self.pss.list_blocks(v, start, limit)
    }
}

/// Two callers create one volume at once: between the NMS's look (not found) and its
/// acquire, another creates it, with another credential, then with the same credential
/// and another block size. The vehicle is refused (UNAUTHENTICATED, ALREADY_EXISTS) and
/// the volume is left as its creator made it: same epoch and owner, so the creator's
/// write-back is not fenced by a caller who could never use the volume.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_create_racing_another_callers_create_leaves_the_volume_to_its_creator() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(3, dir.path()).await.unwrap();
    let store = FaultyPss::new(&cluster);
    let a = Nms(LocalNms::start_with_store("a", store.clone(), |_| {}).await);
    let pss = cluster.client();
    for (n, (cred, bs, code)) in [
        ("other", BS as u32, tonic::Code::Unauthenticated),
        ("k", 2 * BS as u32, tonic::Code::AlreadyExists),
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("raced{n}");
        let volume = VolumeName::new(name.as_str()).unwrap();
        *store.acquire_first.lock().unwrap() = Some(wayside_nms::store::Acquire {
            volume: volume.clone(),
            owner_node: "creator".into(),
            owner_address: "http://127.0.0.1:9".into(),
            owner_session: 0,
            expected_epoch: None,
            create: Some((BlockSize::new(bs).unwrap(), Credential::new(cred).unwrap().hash())),
            request_id: wayside_proto::types::RequestId::new("creator", n as u64 + 1).unwrap(),
        });
        let e = VolumeClient::open(opts(&[&a.ep], &name, "k")).await.err().expect("refused");
        let got = match &e {
            wayside_nms::client::ClientError::Unauthenticated(_) => tonic::Code::Unauthenticated,
            wayside_nms::client::ClientError::Status(s) => s.code(),
            other => panic!("{other:?}"),
        };
        assert_eq!(got, code, "{e:?}");
        assert!(store.acquire_first.lock().unwrap().is_none(), "the race was played");
        let meta = pss.get_volume(&volume).await.unwrap();
        assert_eq!((meta.epoch, meta.owner_node.as_str()), (1, "creator"), "{e:?}");
        assert_eq!(meta.block_size, bs);
    }
    a.stop().await;
    cluster.shutdown().await;
}

/// The PSS refuses a write-back for a newer epoch and then cannot say whose it is (its
/// read fails once): the node keeps the volume and its blocks and tries again, instead of
/// dropping them for a redirect to nobody. The raise here is the node's own, made behind
/// its back as by an acquire whose answer was lost: once the PSS answers, the node takes
/// that epoch and writes back, and the vehicle's copy is never replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fence_the_pss_cannot_explain_drops_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(3, dir.path()).await.unwrap();
    let store = FaultyPss::new(&cluster);
    let a = Nms(LocalNms::start_with_store("a", store.clone(), |c| {
        c.writeback_delay_ms = 600_000;
        c.pss_rpc_timeout_ms = 200;
    })
    .await);
    let c = VolumeClient::open(opts(&[&a.ep], "unexplained", "k")).await.unwrap();
    for blk in 0..4 {
        c.write(blk, 0, block_data(blk, 1)).await.unwrap();
    }
    let before = c.stat().await.unwrap();
    let pss = cluster.client();
    pss.acquire_volume(pb::AcquireVolumeRequest {
        volume: "unexplained".into(),
        owner_node: "a".into(),
        owner_address: a.ep.uri().to_owned(),
        owner_session: 0,
        expected_epoch: before.epoch,
        create: None,
        request_id: Some(pb::RequestId { client_id: "lost-answer".into(), seq: 1 }),
    })
    .await
    .unwrap();
    store.fail_get_volume.store(1, std::sync::atomic::Ordering::SeqCst);
    c.flush().await.unwrap();
    assert_eq!(store.fail_get_volume.load(std::sync::atomic::Ordering::SeqCst), 0, "it failed");
    let after = c.stat().await.unwrap();
    assert_eq!(after.incarnation, before.incarnation, "the copy was kept, not reloaded");
    assert_eq!(after.epoch, before.epoch + 1, "the node took its own raise");
    let want: HashMap<u64, Vec<u8>> = (0..4).map(|b| (b, block_data(b, 1))).collect();
    assert_persisted_and_read_back(&cluster, &c, "unexplained", &want).await;
    a.stop().await;
    cluster.shutdown().await;
}

/// Settling an interrupted switch, the source's own re-acquire commits but its answer is
/// lost; the retry finds the epoch moved on. The PSS names the source as the owner: it
/// keeps the volume at that epoch (rather than turning it into a redirect to itself and
/// dropping its blocks), writes back with it and the vehicle goes on there.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_settling_acquire_whose_answer_was_lost_keeps_the_volume_here() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(3, dir.path()).await.unwrap();
    let store = FaultyPss::new(&cluster);
    let a = Nms(LocalNms::start_with_store("a", store.clone(), |_| {}).await);
    let c = VolumeClient::open(opts(&[&a.ep], "lost", "k")).await.unwrap();
    for blk in 0..8 {
        c.write(blk, 0, block_data(blk, 1)).await.unwrap();
    }
    let epoch0 = c.stat().await.unwrap().epoch;
    let pss = cluster.client();
    // A target from before Claim, dying on SwitchOver: A settles by re-acquiring.
    let target = DyingTarget(DieAt::OldOnSwitchOver, CancellationToken::new(), pss.clone(), None);
    let (t_ep, dead, server) = dying_target(target).await;
    store.lose_acquire_answer.store(true, std::sync::atomic::Ordering::SeqCst);
    let report = a.migrate("lost", &t_ep, 2).await;
    dead.cancel();
    let _ = server.await;
    let armed = store.lose_acquire_answer.load(std::sync::atomic::Ordering::SeqCst);
    assert!(!armed, "an answer was lost");
    assert_eq!(report.outcome, pb::MigrationOutcome::Aborted as i32, "{report:?}");
    assert!(report.error.contains("kept the volume"), "{report:?}");
    let meta = pss.get_volume(&VolumeName::new("lost").unwrap()).await.unwrap();
    assert_eq!((meta.epoch, meta.owner_address.as_str()), (epoch0 + 1, a.ep.uri()));
    c.write(8, 0, block_data(8, 1)).await.unwrap();
    c.flush().await.unwrap();
    assert_eq!(c.current_nms(), a.ep, "no redirect");
    assert_eq!(c.stat().await.unwrap().epoch, epoch0 + 1);
    let want: HashMap<u64, Vec<u8>> = (0..9).map(|b| (b, block_data(b, 1))).collect();
    assert_persisted_and_read_back(&cluster, &c, "lost", &want).await;
    a.stop().await;
    cluster.shutdown().await;
}

/// The source dies after the target claimed the volume (raised its epoch in the PSS) and
/// before the switch, holding writes it accepted and never persisted. The target drops
/// the half-moved volume; the vehicle finds its NMS gone, attaches to the target and
/// replays its journal there; every acknowledged write reaches the PSS. The source is A,
/// a real `nms serve` process killed with SIGKILL; its half of the move is played by the
/// test on the wire, as A's migration would send it: Begin at A's epoch, a pre-copy
/// round (of older data than the vehicle's last writes), Claim, and no SwitchOver.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_source_dies_after_the_claim_and_the_vehicle_loses_nothing() {
    use pb::migration_ack::Ack;
    use pb::migration_frame::Frame;
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(3, dir.path()).await.unwrap();
    let (mut child, a_ep) = spawn_nms_process(dir.path(), &cluster, "127.0.0.1:0").await;
    let b = Nms::start("b", &cluster.endpoints(), |_| {}).await;
    let c = VolumeClient::open(opts(&[&a_ep, &b.ep], "claimed", "k")).await.unwrap();
    for blk in 0..32u64 {
        c.write(blk, 0, block_data(blk, 1)).await.unwrap();
    }
    c.flush().await.unwrap();
    // Accepted by A, not persisted (A writes back after ten minutes): only in A's memory
    // and the vehicle's journal.
    for blk in 0..32u64 {
        c.write(blk, 0, block_data(blk, 2)).await.unwrap();
    }
    c.write(5, 100, b"partial".to_vec()).await.unwrap();
    assert!(c.journal_bytes() >= 32 * BS as u64, "the writes are accepted, not persisted");
    let pss = cluster.client();
    let volume = VolumeName::new("claimed").unwrap();
    let before = pss.get_volume(&volume).await.unwrap();
    assert_eq!(before.owner_node, "a");

    let mut source = PlayedSource::open(&b.ep).await;
    source.send(begin_frame("claimed", before.epoch, a_ep.uri(), 32 * BS as u64)).await;
    let ready = source.acks.message().await.unwrap().unwrap();
    assert!(
        matches!(&ready.ack, Some(Ack::Ready(r)) if r.target_node == "b"),
        "Ready names the target: {ready:?}"
    );
    source
        .send(Frame::Blocks(pb::MigrationBlocks {
            round: 1,
            blocks: (0..32u64)
                .map(|blk| pb::MigratedBlock {
                    block: blk,
                    data: block_data(blk, 1).into(),
                    version: 1,
                    heat: 1,
                    ..Default::default()
                })
                .collect(),
        }))
        .await;
    source
        .send(Frame::RoundEnd(pb::RoundEnd { round: 1, blocks: 32, bytes: 32 * BS as u64 }))
        .await;
    let round = source.acks.message().await.unwrap().unwrap();
    assert!(matches!(round.ack, Some(Ack::Round(_))), "{round:?}");
    source.send(Frame::Claim(pb::Claim { expected_epoch: before.epoch })).await;
    let claimed = source.acks.message().await.unwrap().unwrap();
    let Some(Ack::Claimed(pb::Claimed { new_epoch })) = claimed.ack else {
        panic!("expected Claimed: {claimed:?}")
    };
    let meta = pss.get_volume(&volume).await.unwrap();
    assert_eq!((meta.epoch, meta.owner_node.as_str()), (new_epoch, "b"), "B claimed it");
    assert!(new_epoch > before.epoch);

    // A dies: no SwitchOver, its stream and its memory gone.
    drop(source);
    child.start_kill().unwrap(); // SIGKILL
    child.wait().await.unwrap();

    // The vehicle's next call finds A gone, attaches to B (which has dropped the
    // half-moved volume) and replays its journal there.
    c.write(40, 0, block_data(40, 2)).await.unwrap();
    assert_eq!(c.current_nms(), b.ep);
    c.flush().await.unwrap();
    assert_eq!(c.journal_bytes(), 0, "everything is persisted");
    let mut want: HashMap<u64, Vec<u8>> = (0..32).map(|b| (b, block_data(b, 2))).collect();
    want.get_mut(&5).unwrap()[100..107].copy_from_slice(b"partial");
    want.insert(40, block_data(40, 2));
    assert_persisted_and_read_back(&cluster, &c, "claimed", &want).await;
    let meta = pss.get_volume(&volume).await.unwrap();
    assert_eq!(meta.owner_node, "b");
    assert!(meta.epoch >= new_epoch, "{meta:?}");
    b.stop().await;
    cluster.shutdown().await;
}

/// A target or link that goes silent (no reset: a hung target, a cut link) ends the move
/// within its limits, not when TCP gives up: in pre-copy, once flow control stops the
/// source's sends, by `migration_timeout_ms`; in the switch, where the vehicle waits, by
/// `migration_switch_timeout_ms`. Either way the source keeps (or takes back) the volume
/// and serves it with nothing lost. And a real target whose source goes silent after its
/// Claim drops the half-moved volume by its own `migration_timeout_ms` and can then serve
/// the volume to the vehicle.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silent_target_or_source_ends_the_move_within_its_limits() {
    const MOVE_MS: u64 = 3_000;
    const SWITCH_MS: u64 = 500;
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(3, dir.path()).await.unwrap();
    let a = Nms::start("a", &cluster.endpoints(), |c| {
        c.migration_timeout_ms = MOVE_MS;
        c.migration_switch_timeout_ms = SWITCH_MS;
        c.migration_frame_bytes = 64 * 1024;
    })
    .await;
    let c = VolumeClient::open(opts(&[&a.ep], "quiet", "k")).await.unwrap();
    // 4 MiB: more than a silent target's 64 KiB windows, the client's send buffer and the
    // move's queue of four 64 KiB frames hold, so the source's sends stop.
    const BLOCKS: u64 = 1024;
    let acks = c.write_many((0..BLOCKS).map(|b| (b, 0, block_data(b, 1))).collect()).await;
    assert_eq!(acks.unwrap().len(), BLOCKS as usize);
    let pss = cluster.client();
    let volume = VolumeName::new("quiet").unwrap();
    let mut expected = c.stat().await.unwrap().epoch;
    for (die, limit) in [
        (DieAt::SilentAfterReady, "migration_timeout_ms"),
        (DieAt::SilentOnSwitchOver, "migration_switch_timeout_ms"),
    ] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let t_ep = Endpoint::parse(&listener.local_addr().unwrap().to_string()).unwrap();
        let dead = CancellationToken::new();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .initial_stream_window_size(65_535)
                .initial_connection_window_size(65_535)
                .add_service(pb::migration_server::MigrationServer::new(DyingTarget(
                    die,
                    dead.clone(),
                    pss.clone(),
                    None,
                )))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    dead.clone().cancelled_owned(),
                ),
        );
        let t = Instant::now();
        let within = Duration::from_millis(MOVE_MS + 10_000);
        let report = tokio::time::timeout(within, a.migrate("quiet", &t_ep, 2))
            .await
            .unwrap_or_else(|_| panic!("{die:?}: the move still waits after {within:?}"));
        let took = t.elapsed();
        println!("{die:?}: aborted after {} ms: {}", took.as_millis(), report.error);
        dead.cancel();
        let _ = server.await;
        assert_eq!(report.outcome, pb::MigrationOutcome::Aborted as i32, "{report:?}");
        assert!(report.error.contains(limit), "{die:?} ends by {limit}: {report:?}");
        assert!(took < Duration::from_millis(MOVE_MS + 5_000), "{die:?} took {took:?}");
        if die == DieAt::SilentAfterReady {
            // The report shows the round the move ended in, and counts nothing as moved.
            let last = report.rounds.last().expect("the round under way is reported");
            assert!(last.unfinished && last.round == 1 && last.bytes > 0, "{report:?}");
            assert_eq!(report.bytes_moved, 0, "{report:?}");
        }
        if die == DieAt::SilentOnSwitchOver {
            // The switch ended by its own limit, well before the move's.
            assert!(report.claim_us > 0, "claimed first: {report:?}");
            assert!(took < Duration::from_millis(MOVE_MS), "{die:?} took {took:?}");
            expected += 2; // the target's raise, A's take-back
        }
        let meta = pss.get_volume(&volume).await.unwrap();
        assert_eq!((meta.epoch, meta.owner_address.as_str()), (expected, a.ep.uri()), "{die:?}");
        c.write(BLOCKS, 0, block_data(BLOCKS, 2)).await.unwrap();
        let all: Vec<u64> = (0..=BLOCKS).collect();
        let read = c.read_many(&all).await.unwrap();
        for (blk, got) in all.iter().zip(read) {
            let n = if *blk == BLOCKS { 2 } else { 1 };
            assert_eq!(got, Some(block_data(*blk, n)), "{die:?}: block {blk}");
        }
        c.flush().await.unwrap();
        assert_eq!(c.current_nms(), a.ep);
    }
    let a_uri = a.ep.uri().to_owned();
    a.stop().await;

    // The source goes silent after the target's Claim: the target (a real NMS) gives up by
    // its migration_timeout_ms, drops the half-moved volume, and serves it when asked.
    let b = Nms::start("b", &cluster.endpoints(), |c| c.migration_timeout_ms = 1_000).await;
    let mut source = PlayedSource::open(&b.ep).await;
    source.send(begin_frame("quiet", expected, &a_uri, 0)).await;
    source.send(pb::migration_frame::Frame::Claim(pb::Claim { expected_epoch: expected })).await;
    let t = Instant::now();
    let mut claimed = false;
    let end = loop {
        match source.acks.message().await {
            Ok(Some(pb::MigrationAck { ack: Some(pb::migration_ack::Ack::Claimed(_)) })) => {
                claimed = true
            }
            Ok(Some(_)) => {}
            Ok(None) => panic!("the target ended the stream without a status"),
            Err(e) => break e,
        }
    };
    assert!(claimed, "B claimed the volume");
    assert_eq!(end.code(), tonic::Code::DeadlineExceeded, "{end:?}");
    assert!(t.elapsed() < Duration::from_secs(10), "B gave up after {:?}", t.elapsed());
    assert_eq!(b.status().await.volumes, 0, "B dropped the half-moved volume");
    drop(source);
    // The vehicle, its NMS gone, reaches B: B serves the volume (from the PSS).
    let c = VolumeClient::open(opts(&[&b.ep], "quiet", "k")).await.unwrap();
    assert_eq!(c.read(BLOCKS, 0, None).await.unwrap(), Some(block_data(BLOCKS, 2)));
    assert_eq!(pss.get_volume(&volume).await.unwrap().owner_node, "b");
    b.stop().await;
    cluster.shutdown().await;
}

/// A migration Begin for `vol` (credential "k") from source node "a" at `epoch`.
fn begin_frame(
    vol: &str,
    epoch: u64,
    source_address: &str,
    cached_bytes: u64,
) -> pb::migration_frame::Frame {
    pb::migration_frame::Frame::Begin(pb::MigrationBegin {
        migration_id: 1,
        volume: vol.into(),
        block_size: BS as u32,
        source_epoch: epoch,
        source_node: "a".into(),
        source_address: source_address.into(),
        credential_hash: Credential::new("k").unwrap().hash().0.to_vec(),
        cached_bytes,
        ..Default::default()
    })
}

/// A source's half of a move, played by a test on the wire to a real target NMS.
struct PlayedSource {
    tx: tokio::sync::mpsc::Sender<pb::MigrationFrame>,
    acks: tonic::Streaming<pb::MigrationAck>,
}

impl PlayedSource {
    async fn open(target: &Endpoint) -> PlayedSource {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        let acks = pb::migration_client::MigrationClient::new(channel(target).await)
            .transfer(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        PlayedSource { tx, acks }
    }

    async fn send(&self, f: pb::migration_frame::Frame) {
        self.tx.send(pb::MigrationFrame { frame: Some(f) }).await.unwrap();
    }
}

async fn first_error(
    mig: &mut pb::migration_client::MigrationClient<tonic::transport::Channel>,
    f: Vec<pb::migration_frame::Frame>,
) -> tonic::Status {
    let frames = tokio_stream::iter(f.into_iter().map(|f| pb::MigrationFrame { frame: Some(f) }));
    match mig.transfer(frames).await {
        Err(s) => s,
        Ok(r) => {
            let mut s = r.into_inner();
            loop {
                match s.message().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => panic!("stream ended without an error"),
                    Err(e) => break e,
                }
            }
        }
    }
}

/// Batches of large blocks past the message limit (20 blocks of 1 MiB: 20 MiB against
/// 16 MiB) go in several messages: `write_many` and `read_many` work, and so does the
/// journal's replay of as many unpersisted writes to another NMS after a crash (it failed
/// for good with an oversized message: the vehicle could never attach again).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batches_of_large_blocks_past_the_message_limit_are_split() {
    const MIB: usize = 1 << 20;
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(1, dir.path()).await.unwrap();
    // A writes nothing back before it is killed.
    let no_writeback = "writeback_start_dirty_bytes_per_volume = 67108864\n";
    let (mut child, a_ep) =
        spawn_nms_process_with(dir.path(), &cluster, "127.0.0.1:0", no_writeback).await;
    let b = Nms::start("b", &cluster.endpoints(), |_| {}).await;
    let mut o = opts(&[&a_ep, &b.ep], "large", "k");
    o.create_block_size = Some(BlockSize::new(MIB as u32).unwrap());
    let c = VolumeClient::open(o).await.unwrap();
    let data = |blk: u64| vec![blk as u8 + 1; MIB];
    let all: Vec<u64> = (0..20).collect();
    let acks = c.write_many(all.iter().map(|&blk| (blk, 0, data(blk))).collect()).await.unwrap();
    assert_eq!(acks.len(), 20);
    for (blk, got) in all.iter().zip(c.read_many(&all).await.unwrap()) {
        assert_eq!(got.as_deref(), Some(&data(*blk)[..]), "block {blk}");
    }
    assert!(c.journal_bytes() >= 20 * MIB as u64, "unpersisted");
    child.start_kill().unwrap(); // SIGKILL
    child.wait().await.unwrap();
    // The client replays the 20 MiB journal to B.
    for (blk, got) in all.iter().zip(c.read_many(&all).await.unwrap()) {
        assert_eq!(got.as_deref(), Some(&data(*blk)[..]), "block {blk} at B");
    }
    assert_eq!(c.current_nms(), b.ep);
    c.flush().await.unwrap();
    assert_eq!(c.journal_bytes(), 0);
    b.stop().await;
    cluster.shutdown().await;
}

/// A node shutting down takes no more writes once its last drain has begun: a write then
/// is refused UNAVAILABLE (the vehicle keeps it in its journal and goes elsewhere), never
/// answered "accepted" and then left behind when the process ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_shutting_down_refuses_the_writes_its_last_drain_would_miss() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(1, dir.path()).await.unwrap();
    let store = FaultyPss::new(&cluster);
    let a = Nms(LocalNms::start_with_store("a", store.clone(), |c| {
        c.writeback_delay_ms = 600_000;
        c.shutdown_flush_timeout_ms = 20_000;
    })
    .await);
    a.create_volume("down", "k").await;
    let mut raw = a.raw().await;
    let write = |block: u64| pb::WriteRequest {
        auth: auth("down", "k"),
        op: Some(pb::WriteOp {
            block,
            offset: 0,
            data: block_data(block, 1).into(),
            request_id: None,
        }),
    };
    raw.write(write(0)).await.unwrap();
    // The shutdown's drain writes block 0 back; the store holds that write-back.
    store.hold_writes.send_replace(true);
    a.admin().await.shutdown(pb::ShutdownRequest {}).await.unwrap();
    store.held("the shutdown started no write-back").await;
    // On the connection opened before the shutdown: refused, not accepted.
    let e = raw.write(write(1)).await.expect_err("a write accepted during the last drain");
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(e.message().contains("shutting down"), "{e:?}");
    // Nor is an attach taken (the vehicle would only be sent on again).
    let attach =
        pb::AttachRequest { auth: auth("down", "k"), client_id: "v".into(), take_over: false };
    let e = raw.attach(attach).await.expect_err("an attach taken during the last drain");
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(e.message().contains("shutting down"), "{e:?}");
    store.hold_writes.send_replace(false);
    a.0.exited().await.unwrap();
    // What it accepted is in the PSS; what it refused is not.
    let stored = pss_blocks(&cluster, "down", &[0, 1]).await;
    assert_eq!(stored, HashMap::from([(0, block_data(0, 1))]));
    cluster.shutdown().await;
}

/// The NMS's PSS store answers every block a read names, one named twice (a batch reading
/// a block twice) included: the second was answered absent, which a cache would keep.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pss_read_naming_a_block_twice_answers_it_twice() {
    use wayside_nms::store::Store as _;
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(1, dir.path()).await.unwrap();
    let a = Nms::start("a", &cluster.endpoints(), |_| {}).await;
    let c = VolumeClient::open(opts(&[&a.ep], "twice", "k")).await.unwrap();
    c.write(0, 0, block_data(0, 1)).await.unwrap();
    c.flush().await.unwrap();
    let store = wayside_nms::store::PssStore::new(cluster.endpoints(), cluster.client_options());
    let got = store.get_blocks(VolumeName::new("twice").unwrap(), vec![0, 0, 1]).await.unwrap();
    let data = |i: usize| got[i].as_ref().map(|(d, _)| d.to_vec());
    assert_eq!((data(0), data(1), data(2)), (Some(block_data(0, 1)), Some(block_data(0, 1)), None));
    a.stop().await;
    cluster.shutdown().await;
}

/// A target shutting down takes no move in past its Begin: a Claim (or a SwitchOver)
/// arriving during its last drain is refused UNAVAILABLE and raises no epoch, so the
/// source keeps the volume rather than hand it to a node about to exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_target_shutting_down_refuses_the_claim_of_a_move_begun_before() {
    use pb::migration_ack::Ack;
    use pb::migration_frame::Frame;
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(1, dir.path()).await.unwrap();
    let a = Nms::start("a", &cluster.endpoints(), |_| {}).await;
    let c = VolumeClient::open(opts(&[&a.ep], "late", "k")).await.unwrap();
    c.write(0, 0, block_data(0, 1)).await.unwrap();
    c.flush().await.unwrap();
    let store = FaultyPss::new(&cluster);
    let b = Nms(LocalNms::start_with_store("b", store.clone(), |c| {
        c.writeback_delay_ms = 600_000;
        c.shutdown_flush_timeout_ms = 20_000;
    })
    .await);
    // B holds a write of its own vehicle, which its last drain writes back.
    let other = VolumeClient::open(opts(&[&b.ep], "other", "k")).await.unwrap();
    other.write(0, 0, block_data(0, 2)).await.unwrap();
    let volume = VolumeName::new("late").unwrap();
    let before = cluster.client().get_volume(&volume).await.unwrap();
    let mut source = PlayedSource::open(&b.ep).await;
    source.send(begin_frame("late", before.epoch, a.ep.uri(), 0)).await;
    let ready = source.acks.message().await.unwrap().unwrap();
    assert!(matches!(ready.ack, Some(Ack::Ready(_))), "{ready:?}");
    store.hold_writes.send_replace(true);
    b.admin().await.shutdown(pb::ShutdownRequest {}).await.unwrap();
    store.held("B's shutdown started no write-back").await;
    source.send(Frame::Claim(pb::Claim { expected_epoch: before.epoch })).await;
    let end = loop {
        match source.acks.message().await {
            Ok(Some(m)) => assert!(!matches!(m.ack, Some(Ack::Claimed(_))), "claimed: {m:?}"),
            Ok(None) => panic!("the target ended the stream without a status"),
            Err(e) => break e,
        }
    };
    assert_eq!(end.code(), tonic::Code::Unavailable, "{end:?}");
    assert!(end.message().contains("shutting down"), "{end:?}");
    let after = cluster.client().get_volume(&volume).await.unwrap();
    assert_eq!((after.epoch, after.owner_node.as_str()), (before.epoch, "a"), "no epoch raised");
    store.hold_writes.send_replace(false);
    b.0.exited().await.unwrap();
    assert_eq!(c.read(0, 0, None).await.unwrap(), Some(block_data(0, 1)), "A still serves it");
    a.stop().await;
    cluster.shutdown().await;
}

/// A move's frames are cut by each block's framing as well as its data: a volume holding
/// hundreds of thousands of blocks without data (reads of blocks never written, cached as
/// absent) moves in frames within the message limit (they went in one frame past it, and
/// every move of the volume failed).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn blocks_without_data_move_in_frames_within_the_message_limit() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(1, dir.path()).await.unwrap();
    let small = |c: &mut Config| {
        c.max_message_size_bytes = 2 << 20;
        c.migration_frame_bytes = 64 << 10;
        // (A switch's request ids must fit in half a message.)
        c.dedupe_entries_per_volume = 8192;
    };
    let a = Nms::start("a", &cluster.endpoints(), small).await;
    let b = Nms::start("b", &cluster.endpoints(), small).await;
    let c = VolumeClient::open(opts(&[&a.ep, &b.ep], "sparse", "k")).await.unwrap();
    c.write(0, 0, block_data(0, 1)).await.unwrap();
    // ~10 bytes each in a frame: 250,000 are past the 2 MiB message limit in one.
    let blocks: Vec<u64> = (0..250_000).collect();
    let got = c.read_many(&blocks).await.unwrap();
    assert_eq!(got.iter().filter(|b| b.is_some()).count(), 1);
    let info = c.stat().await.unwrap();
    assert!(info.cached_blocks >= 250_000, "the absent blocks are cached: {info:?}");
    let report = a.migrate("sparse", &b.ep, 0).await;
    assert_eq!(report.outcome(), pb::MigrationOutcome::Completed, "{}", report.error);
    assert_eq!(c.read(0, 0, None).await.unwrap(), Some(block_data(0, 1)));
    assert_eq!(c.current_nms(), b.ep);
    assert_eq!(c.read(7, 0, None).await.unwrap(), None);
    a.stop().await;
    b.stop().await;
    cluster.shutdown().await;
}

/// `nms put/get/stat` work through the client library, and without a road CA they say on
/// stderr that the credential and data go in plaintext.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_volume_commands_work_and_say_when_they_dial_in_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(1, dir.path()).await.unwrap();
    let a = Nms::start("a", &cluster.endpoints(), |_| {}).await;
    let file = dir.path().join("in.bin");
    std::fs::write(&file, b"hello").unwrap();
    let run = |args: &[&str]| {
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_nms"));
        cmd.args(args)
            .args(["--nms", a.ep.authority(), "--volume", "cli"])
            .env("WAYSIDE_CREDENTIAL", "k")
            .env_remove("WAYSIDE_TLS_CA")
            .output()
    };
    let create = run(&["create", "--block-size", "4096"]).await.unwrap();
    assert!(create.status.success(), "{create:?}");
    let put = run(&["put", "--block", "3", "--file", file.to_str().unwrap()]).await.unwrap();
    assert!(put.status.success(), "{put:?}");
    let stderr = String::from_utf8_lossy(&put.stderr);
    assert!(stderr.contains("plaintext"), "no plaintext warning: {stderr}");
    let get = run(&["get", "--block", "3"]).await.unwrap();
    assert!(get.status.success(), "{get:?}");
    assert!(get.stdout.starts_with(b"hello"), "{get:?}");
    a.stop().await;
    cluster.shutdown().await;
}

/// The names of the volumes `nms` serves, sorted, and how many it unloaded to make room.
async fn served_volumes(nms: &Nms) -> (Vec<String>, u64) {
    let s = nms.status().await;
    let mut names: Vec<String> = s.volume_info.iter().map(|v| v.volume.clone()).collect();
    names.sort();
    (names, s.volumes_unloaded)
}

/// An NMS at `max_volumes` unloads the longest idle volume with nothing to write back to
/// make room for another (a parked vehicle's volume would otherwise hold its place for
/// good), never one holding unpersisted writes; the unloaded volume's vehicle is told to
/// attach again at its next call and finds everything it wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_nms_unloads_an_idle_volume_with_nothing_unpersisted_to_make_room() {
    const IDLE: Duration = Duration::from_millis(300);
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(1, dir.path()).await.unwrap();
    let a = Nms::start("a", &cluster.endpoints(), |c| {
        c.max_volumes = 2;
        c.volume_idle_unload_ms = IDLE.as_millis() as u64;
        // What is not flushed stays unpersisted for the whole test.
        c.writeback_delay_ms = 600_000;
    })
    .await;
    let short = |vol: &str| {
        let mut o = opts(&[&a.ep], vol, "k");
        // (RESOURCE_EXHAUSTED: the client tries its other NMSs until op_timeout.)
        o.op_timeout = Duration::from_secs(3);
        o
    };
    // A vehicle writes, flushes and goes quiet (parked); another keeps a write unpersisted.
    let parked = VolumeClient::open(short("parked")).await.unwrap();
    parked.write(0, 0, block_data(0, 1)).await.unwrap();
    parked.flush().await.unwrap();
    let first = parked.stat().await.unwrap();
    let busy = VolumeClient::open(short("busy")).await.unwrap();
    busy.write(0, 0, block_data(0, 2)).await.unwrap();
    // Both idle past volume_idle_unload_ms (the condition is time itself).
    tokio::time::sleep(IDLE + Duration::from_millis(100)).await;
    // A third vehicle arrives: the parked volume makes room, the busy one stays.
    let third = VolumeClient::open(short("third")).await.unwrap();
    assert_eq!(served_volumes(&a).await, (vec!["busy".into(), "third".into()], 1));
    // The parked vehicle comes back: told to attach again, it loads its volume anew
    // (the third, idle and holding nothing, makes room) and reads what it wrote.
    tokio::time::sleep(IDLE + Duration::from_millis(100)).await;
    assert_eq!(parked.read(0, 0, None).await.unwrap(), Some(block_data(0, 1)));
    assert_eq!(served_volumes(&a).await, (vec!["busy".into(), "parked".into()], 2));
    // The copy loaded anew names the unloaded one, through what was persisted then: the
    // vehicle's journal replays nothing it held.
    let again = parked.stat().await.unwrap();
    assert_ne!(again.incarnation, first.incarnation);
    assert_eq!(
        (again.predecessor_session, again.predecessor_incarnation, again.predecessor_through_lsn),
        (first.nms_session, first.incarnation, first.persisted_lsn)
    );
    // Both volumes here hold unpersisted writes now: nothing is unloaded for the third,
    // however long they have been idle.
    parked.write(1, 0, block_data(1, 3)).await.unwrap();
    tokio::time::sleep(IDLE + Duration::from_millis(100)).await;
    let e = third.read(0, 0, None).await.expect_err("no room");
    assert!(e.to_string().contains("max_volumes"), "{e}");
    assert_eq!(served_volumes(&a).await, (vec!["busy".into(), "parked".into()], 2));
    // Nothing of theirs was lost.
    busy.flush().await.unwrap();
    parked.flush().await.unwrap();
    assert_eq!(pss_blocks(&cluster, "busy", &[0]).await[&0], block_data(0, 2));
    assert_eq!(pss_blocks(&cluster, "parked", &[0, 1]).await[&1], block_data(1, 3));
    a.stop().await;
    cluster.shutdown().await;
}

/// A copy loaded again after an idle unload names the unloaded copy as its predecessor
/// (its vehicle's journal then replays nothing that copy held) only when no other copy
/// owned the volume in between: an NMS that took the volume over meanwhile may have
/// applied older writes of the journal over newer ones the unloaded copy had persisted
/// (its replay cut short), so the vehicle must replay its journal in full.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unloaded_copy_is_no_predecessor_once_another_nms_owned_the_volume() {
    const IDLE: Duration = Duration::from_millis(300);
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(1, dir.path()).await.unwrap();
    let a = Nms::start("a", &cluster.endpoints(), |c| {
        c.max_volumes = 1;
        c.volume_idle_unload_ms = IDLE.as_millis() as u64;
    })
    .await;
    let b = Nms::start("b", &cluster.endpoints(), |_| {}).await;
    let parked = VolumeClient::open(opts(&[&a.ep], "parked", "k")).await.unwrap();
    parked.write(0, 0, block_data(0, 1)).await.unwrap();
    parked.flush().await.unwrap();
    let first = parked.stat().await.unwrap();
    // Idle past volume_idle_unload_ms (the condition is time itself), it makes room.
    tokio::time::sleep(IDLE + Duration::from_millis(100)).await;
    let third = VolumeClient::open(opts(&[&a.ep], "third", "k")).await.unwrap();
    assert_eq!(served_volumes(&a).await, (vec!["third".into()], 1));
    // Meanwhile the volume is taken over at B (its vehicle out of A's reach, say), and
    // B goes away; the vehicle is back at A, which loads the volume anew.
    let at_b = VolumeClient::open(opts(&[&b.ep], "parked", "k")).await.unwrap();
    assert_eq!(at_b.read(0, 0, None).await.unwrap(), Some(block_data(0, 1)));
    b.stop().await;
    tokio::time::sleep(IDLE + Duration::from_millis(100)).await;
    assert_eq!(parked.read(0, 0, None).await.unwrap(), Some(block_data(0, 1)));
    let again = parked.stat().await.unwrap();
    assert_eq!(again.epoch, first.epoch + 2, "B's ownership came in between");
    assert_eq!(
        (again.predecessor_session, again.predecessor_incarnation),
        (0, 0),
        "the unloaded copy is named as this one's predecessor over B's ownership"
    );
    drop(third);
    a.stop().await;
    cluster.shutdown().await;
}

/// A volume whose blocks could never fit under the node's per-volume dirty limit is
/// refused at attach, naming the limit (it was served, and every write then failed after
/// backpressure_wait_ms), and nothing is created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_whose_block_exceeds_the_dirty_limit_is_refused_at_attach() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(1, dir.path()).await.unwrap();
    let a =
        Nms::start("a", &cluster.endpoints(), |c| c.dirty_limit_bytes_per_volume = 64 << 10).await;
    let mut o = opts(&[&a.ep], "big", "k");
    o.create_block_size = Some(BlockSize::new(1 << 20).unwrap());
    // (RESOURCE_EXHAUSTED: the client tries its other NMSs until op_timeout.)
    o.op_timeout = Duration::from_secs(2);
    let e = VolumeClient::open(o).await.err().expect("refused");
    assert!(e.to_string().contains("dirty_limit_bytes_per_volume exceeded"), "{e}");
    let got = cluster.client().get_volume(&VolumeName::new("big").unwrap()).await;
    assert!(got.is_err(), "the volume was created: {got:?}");
    // A block that fits is served.
    let c = VolumeClient::open(opts(&[&a.ep], "small", "k")).await.unwrap();
    c.write(0, 0, block_data(0, 1)).await.unwrap();
    a.stop().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_the_right_status_and_changes_nothing() {
    use pb::migration_frame::Frame;
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(3, dir.path()).await.unwrap();
    let a = Nms::start("a", &cluster.endpoints(), |_| {}).await;
    let c = VolumeClient::open(opts(&[&a.ep], "good", "right")).await.unwrap();
    c.write(1, 0, block_data(1, 1)).await.unwrap();
    // A batch with one write past its block is refused whole by the client library.
    let e = c.write_many(vec![(2, 0, block_data(2, 1)), (3, 10, block_data(3, 1))]).await;
    assert!(matches!(e, Err(wayside_nms::client::ClientError::InvalidArgument(_))), "{e:?}");
    assert_eq!(c.read(2, 0, None).await.unwrap(), None, "nothing of the batch was written");
    let mut raw = a.raw().await;
    let failed_before = a.status().await.calls_failed;
    let write = |vol: &str, secret: &str, data: Vec<u8>, offset: u32| pb::WriteRequest {
        auth: auth(vol, secret),
        op: Some(pb::WriteOp { block: 1, offset, data: data.into(), request_id: None }),
    };
    let e = raw.write(write("good", "right", vec![1; BS + 1], 0)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "oversized block: {e:?}");
    let e = raw.write(write("good", "right", vec![1; 10], BS as u32 - 5)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "range past the block: {e:?}");
    let e = raw.write(write("good", "wrong", vec![1; BS], 0)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "wrong credential: {e:?}");
    // A call carrying no block data past its small limit is refused before anything
    // looks at it (a caller with no credential cannot make the node buffer big ones).
    let big = pb::StatRequest {
        auth: Some(pb::VolumeAuth {
            volume: "good".into(),
            credential: "x".repeat(wayside_nms::server::CONTROL_REQUEST_BYTES + 1),
            ..Default::default()
        }),
    };
    let e = raw.stat(big).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::OutOfRange, "an oversized control call: {e:?}");
    // So are the health and reflection services' (they answer anyone).
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel(&a.ep).await);
    let name = "x".repeat(wayside_proto::server::SMALL_REQUEST_BYTES + 1);
    let e = health.check(tonic_health::pb::HealthCheckRequest { service: name }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::OutOfRange, "an oversized health check: {e:?}");
    let e = raw
        .read(pb::ReadRequest {
            auth: auth("good", "wrong"),
            op: Some(pb::ReadOp { block: 1, offset: 0, length: 0 }),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "reading with a wrong credential: {e:?}");
    let e = raw.write(write("nope", "right", vec![1; BS], 0)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "unknown volume: {e:?}");
    assert_eq!(e.message(), "volume nope does not exist", "named once: {e:?}");
    let e = raw.write(write("bad/name", "right", vec![1; BS], 0)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "bad name: {e:?}");
    let failed = a.status().await.calls_failed - failed_before;
    assert_eq!(failed, 6, "NodeStatus counts the block calls answered with an error");
    // An operation refused inside a stream counts too.
    let op = pb::StreamRequest {
        auth: auth("good", "wrong"),
        tag: 1,
        op: Some(pb::stream_request::Op::Read(pb::ReadOp { block: 1, offset: 0, length: 0 })),
    };
    let mut replies = raw.stream(futures::stream::iter([op])).await.unwrap().into_inner();
    let r = replies.message().await.unwrap().expect("a reply");
    assert!(matches!(r.result, Some(pb::stream_reply::Result::Error(_))), "{r:?}");
    let failed = a.status().await.calls_failed - failed_before;
    assert_eq!(failed, 7, "and a stream's refused operation");
    // Another vehicle's credential does not open the volume on a fresh NMS either.
    let b = Nms::start("b", &cluster.endpoints(), |_| {}).await;
    let mut o = opts(&[&b.ep], "good", "wrong");
    o.create_block_size = None;
    assert!(matches!(
        VolumeClient::open(o).await,
        Err(wayside_nms::client::ClientError::Unauthenticated(_))
    ));
    assert_eq!(c.read(1, 0, None).await.unwrap().unwrap(), block_data(1, 1), "nothing changed");
    assert_eq!(c.current_nms(), a.ep, "the refused attach did not take the volume");

    // Malformed migration streams.
    let mut mig = pb::migration_client::MigrationClient::new(channel(&a.ep).await);
    let e = first_error(
        &mut mig,
        vec![Frame::RoundEnd(pb::RoundEnd { round: 1, blocks: 0, bytes: 0 })],
    )
    .await;
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "no Begin: {e:?}");
    let begin_at = |vol: &str, epoch: u64| begin_frame(vol, epoch, "http://127.0.0.1:1", 0);
    let oversized = Frame::Blocks(pb::MigrationBlocks {
        round: 1,
        blocks: vec![pb::MigratedBlock {
            block: 1,
            data: vec![0; BS * 2].into(),
            ..Default::default()
        }],
    });
    let begin = |vol: &str| begin_at(vol, 1);
    let e = first_error(&mut mig, vec![begin("incoming")]).await;
    assert_eq!(e.code(), tonic::Code::NotFound, "Begin for a volume the PSS lacks: {e:?}");
    // "other" is in the PSS at epoch 1, served by b, with the credential Begin carries.
    let other = VolumeClient::open(opts(&[&b.ep], "other", "k")).await.unwrap();
    other.write(3, 0, block_data(3, 1)).await.unwrap();
    let e = first_error(&mut mig, vec![begin_at("other", 2)]).await;
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "a source claiming epoch 2: {e:?}");
    assert!(e.message().contains("epoch 1"), "the message names the PSS's epoch: {e:?}");
    let e = first_error(&mut mig, vec![begin("other"), oversized]).await;
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "oversized migrated block: {e:?}");
    let forget_with_data = Frame::Blocks(pb::MigrationBlocks {
        round: 1,
        blocks: vec![pb::MigratedBlock {
            block: 1,
            data: vec![7; 16].into(),
            forget: true,
            ..Default::default()
        }],
    });
    let e = first_error(&mut mig, vec![begin("other"), forget_with_data]).await;
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "a forget carrying data: {e:?}");
    let uneven = Frame::RequestIds(pb::RequestIds {
        round: 1,
        runs: vec![pb::AppliedRun {
            client_id: "c".into(),
            seq: vec![1, 2],
            lsn: vec![5],
            version: vec![1, 1],
        }],
    });
    let e = first_error(&mut mig, vec![begin("other"), uneven]).await;
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "request ids of uneven lists: {e:?}");
    let n = Config::default().dedupe_entries_per_volume as u64 + 1;
    // One client's run of `n` request ids.
    let run_of = |n: u64| pb::AppliedRun {
        client_id: "c".into(),
        seq: (1..=n).collect(),
        lsn: vec![1; n as usize],
        version: vec![1; n as usize],
    };
    let too_many = Frame::RequestIds(pb::RequestIds { round: 1, runs: vec![run_of(n)] });
    let e = first_error(&mut mig, vec![begin("other"), too_many]).await;
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "more ids than the table keeps: {e:?}");
    assert!(e.message().contains("dedupe_entries_per_volume"), "{e:?}");
    // The same in a SwitchOver (its ids had no limit), refused before the epoch is raised.
    let switch_too_many = Frame::SwitchOver(pb::SwitchOver {
        accepted_lsn: 1,
        persisted_lsn: 1,
        applied: vec![run_of(n)],
        expected_epoch: 1,
    });
    let e = first_error(&mut mig, vec![begin("other"), switch_too_many]).await;
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "a SwitchOver of too many ids: {e:?}");
    assert!(e.message().contains("dedupe_entries_per_volume"), "{e:?}");
    let claim = Frame::Claim(pb::Claim { expected_epoch: 2 });
    let e = first_error(&mut mig, vec![begin("other"), claim]).await;
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "a Claim from another epoch: {e:?}");
    let meta = cluster.client().get_volume(&VolumeName::new("other").unwrap()).await.unwrap();
    assert_eq!(meta.epoch, 1, "the refused Claim raised nothing");
    // A SwitchOver with impossible log positions (persisted past accepted, or no room for
    // the next lsn) is a malformed stream: refused before the epoch is raised, never a panic.
    for (accepted_lsn, persisted_lsn) in [(1, 2), (u64::MAX, 0), (u64::MAX, u64::MAX)] {
        let switch = Frame::SwitchOver(pb::SwitchOver {
            accepted_lsn,
            persisted_lsn,
            applied: Vec::new(),
            expected_epoch: 1,
        });
        let e = first_error(&mut mig, vec![begin("other"), switch]).await;
        assert_eq!(
            e.code(),
            tonic::Code::InvalidArgument,
            "SwitchOver accepted {accepted_lsn} persisted {persisted_lsn}: {e:?}"
        );
    }
    let meta = cluster.client().get_volume(&VolumeName::new("other").unwrap()).await.unwrap();
    assert_eq!(meta.epoch, 1, "the malformed SwitchOvers raised nothing");
    let e = first_error(&mut mig, vec![begin("good")]).await;
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "Begin for a volume served here: {e:?}");
    let st = a.status().await;
    assert_eq!(st.volumes, 1, "the malformed incoming volume was dropped: {st:?}");
    assert_eq!(c.read(1, 0, None).await.unwrap().unwrap(), block_data(1, 1));
    assert_eq!(other.read(3, 0, None).await.unwrap().unwrap(), block_data(3, 1));
    assert_eq!(other.current_nms(), b.ep, "the refused moves left \"other\" on b");
    let e = a
        .admin()
        .await
        .start_migration(pb::StartMigrationRequest {
            volume: "good".into(),
            target_address: "not an address".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    a.stop().await;
    b.stop().await;
    cluster.shutdown().await;
}

/// One `Nms.Stream` call: requests go out tagged 1, 2, ...; the credential on the first.
struct OpStream {
    tx: tokio::sync::mpsc::Sender<pb::StreamRequest>,
    replies: tonic::Streaming<pb::StreamReply>,
    tag: u64,
    auth: Option<pb::VolumeAuth>,
}

impl OpStream {
    async fn open(nms: &Nms, vol: &str, secret: &str) -> OpStream {
        let (tx, rx) = tokio::sync::mpsc::channel(256);
        let replies = nms
            .raw()
            .await
            .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        OpStream { tx, replies, tag: 0, auth: auth(vol, secret) }
    }

    async fn send(&mut self, op: pb::stream_request::Op) -> u64 {
        self.tag += 1;
        let req = pb::StreamRequest { auth: self.auth.take(), tag: self.tag, op: Some(op) };
        self.tx.send(req).await.unwrap();
        self.tag
    }

    /// The next `n` replies by tag (in whatever order they come).
    async fn replies(&mut self, n: usize) -> HashMap<u64, pb::stream_reply::Result> {
        let mut out = HashMap::new();
        while out.len() < n {
            let r = tokio::time::timeout(Duration::from_secs(20), self.replies.message())
                .await
                .expect("a reply within 20 s")
                .unwrap()
                .expect("the stream stays open");
            assert!(out.insert(r.tag, r.result.expect("a result")).is_none(), "tag twice");
        }
        out
    }

    async fn one(&mut self, op: pb::stream_request::Op) -> pb::stream_reply::Result {
        let tag = self.send(op).await;
        self.replies(1).await.remove(&tag).expect("the reply carries the request's tag")
    }
}

fn stream_read(block: u64) -> pb::stream_request::Op {
    pb::stream_request::Op::Read(pb::ReadOp { block, offset: 0, length: 0 })
}

fn stream_write(block: u64, offset: u32, data: Vec<u8>) -> pb::stream_request::Op {
    pb::stream_request::Op::Write(pb::WriteOp {
        block,
        offset,
        data: data.into(),
        request_id: None,
    })
}

/// The streamed API: pipelined writes through back-pressure (a dirty limit of a few
/// blocks), reads of cached, absent and read-through blocks, a partial write of an uncached
/// block, bad input and a wrong credential answered per operation, and a flush.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn streamed_operations_round_trip_through_back_pressure() {
    use pb::stream_reply::Result as R;
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(3, dir.path()).await.unwrap();
    let a = Nms::start("a", &cluster.endpoints(), |c| {
        c.dirty_limit_bytes_per_volume = 4 * (BS as u64 + ENTRY_OVERHEAD_BYTES);
    })
    .await;
    a.create_volume("st", "key").await;
    let mut s = OpStream::open(&a, "st", "key").await;
    // 32 writes in flight against room for 4 dirty blocks: most wait for write-back.
    let mut tags = HashMap::new();
    for b in 0..32 {
        tags.insert(s.send(stream_write(b, 0, block_data(b, 1))).await, b);
    }
    let mut lsns = Vec::new();
    for (tag, r) in s.replies(32).await {
        let R::Write(w) = r else { panic!("write {tag}: {r:?}") };
        assert!(tags.contains_key(&tag));
        lsns.push(w.lsn);
    }
    lsns.sort_unstable();
    lsns.dedup();
    assert_eq!(lsns.len(), 32, "every write got its own lsn");
    let mut tags = HashMap::new();
    for b in 0..32 {
        tags.insert(s.send(stream_read(b)).await, b);
    }
    for (tag, r) in s.replies(32).await {
        let R::Read(r) = r else { panic!("read {tag}: {r:?}") };
        assert!(r.found);
        assert_eq!(&r.data[..], &block_data(tags[&tag], 1)[..], "block {}", tags[&tag]);
    }
    let R::Read(r) = s.one(stream_read(100)).await else { panic!("read of an absent block") };
    assert!(!r.found && r.data.is_empty());
    // A partial write of a block not in the cache: read through from the PSS first.
    let R::Write(_) = s.one(stream_write(200, 100, b"hello".to_vec())).await else { panic!() };
    let R::Read(r) = s.one(stream_read(200)).await else { panic!() };
    let mut want = [0u8; 105];
    want[100..].copy_from_slice(b"hello");
    assert_eq!(&r.data[..], &want[..]);
    let R::Error(e) = s.one(stream_write(1, 0, vec![9; BS + 1])).await else {
        panic!("an oversized block is refused")
    };
    assert_eq!(e.code, tonic::Code::InvalidArgument as i32, "{e:?}");
    // Another stream with the wrong credential: every operation is refused.
    let mut bad = OpStream::open(&a, "st", "not-the-key").await;
    for op in [stream_write(1, 0, vec![7; BS]), stream_read(1)] {
        let R::Error(e) = bad.one(op).await else { panic!("a wrong credential is refused") };
        assert_eq!(e.code, tonic::Code::Unauthenticated as i32, "{e:?}");
    }
    let R::Flush(f) = s.one(pb::stream_request::Op::Flush(pb::FlushOp {})).await else {
        panic!("flush")
    };
    assert!(f.persisted_lsn >= *lsns.last().unwrap());
    let stored = pss_blocks(&cluster, "st", &(0..32).collect::<Vec<_>>()).await;
    for b in 0..32 {
        assert_eq!(stored.get(&b), Some(&block_data(b, 1)), "block {b} in the PSS");
    }
    drop((s, bad));
    a.stop().await;
    cluster.shutdown().await;
}

/// One `Nms.StreamBatches` call: each `batch` sends its operations tagged in order in one
/// message (the credential on the first) and gathers their results.
struct BatchStream {
    tx: tokio::sync::mpsc::Sender<pb::StreamBatch>,
    replies: tonic::Streaming<pb::StreamResults>,
    tag: u64,
    auth: Option<pb::VolumeAuth>,
}

impl BatchStream {
    async fn open(nms: &Nms, vol: &str, secret: &str) -> BatchStream {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let replies = nms
            .raw()
            .await
            .stream_batches(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        BatchStream { tx, replies, tag: 0, auth: auth(vol, secret) }
    }

    async fn send(&mut self, ops: Vec<pb::stream_request::Op>) -> Vec<u64> {
        let ops: Vec<pb::StreamRequest> = ops
            .into_iter()
            .map(|op| {
                self.tag += 1;
                pb::StreamRequest { auth: None, tag: self.tag, op: Some(op) }
            })
            .collect();
        let tags = ops.iter().map(|o| o.tag).collect();
        self.tx.send(pb::StreamBatch { auth: self.auth.take(), ops }).await.unwrap();
        tags
    }

    /// The next message off the stream.
    async fn message(&mut self) -> Result<Option<pb::StreamResults>, tonic::Status> {
        tokio::time::timeout(Duration::from_secs(20), self.replies.message())
            .await
            .expect("a reply within 20 s")
    }

    /// Sends a batch and gathers its results by tag, with how many messages they came in.
    async fn batch(
        &mut self,
        ops: Vec<pb::stream_request::Op>,
    ) -> (Vec<pb::stream_reply::Result>, usize) {
        let tags = self.send(ops).await;
        let mut got = HashMap::new();
        let mut messages = 0;
        while got.len() < tags.len() {
            let m = self.message().await.unwrap().expect("the stream stays open");
            messages += 1;
            for r in m.results {
                assert!(got.insert(r.tag, r.result.expect("a result")).is_none(), "tag twice");
            }
        }
        (tags.iter().map(|t| got.remove(t).expect("a result per tag")).collect(), messages)
    }
}

/// The batched streamed API: many operations per message, through back-pressure, with the
/// results that are ready together in one message; bad batches are refused whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_operations_round_trip_and_bad_batches_change_nothing() {
    use pb::stream_reply::Result as R;
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(3, dir.path()).await.unwrap();
    let a = Nms::start("a", &cluster.endpoints(), |c| {
        c.dirty_limit_bytes_per_volume = 4 * (BS as u64 + ENTRY_OVERHEAD_BYTES);
        c.max_stream_batch_ops = 40;
    })
    .await;
    a.create_volume("bt", "key").await;
    let mut s = BatchStream::open(&a, "bt", "key").await;
    // 32 writes in one message against room for 4 dirty blocks: most wait for write-back.
    let (results, _) =
        s.batch((0..32).map(|b| stream_write(b, 0, block_data(b, 2))).collect()).await;
    let mut lsns: Vec<u64> = results
        .iter()
        .map(|r| match r {
            R::Write(w) => w.lsn,
            other => panic!("a write: {other:?}"),
        })
        .collect();
    lsns.sort_unstable();
    lsns.dedup();
    assert_eq!(lsns.len(), 32, "every write got its own lsn");
    // 32 reads of cached blocks are all answered at once: one message back.
    let (results, messages) = s.batch((0..32).map(stream_read).collect()).await;
    assert_eq!(messages, 1, "results ready together travel together");
    for (b, r) in results.iter().enumerate() {
        let R::Read(r) = r else { panic!("read {b}: {r:?}") };
        assert!(r.found);
        assert_eq!(&r.data[..], &block_data(b as u64, 2)[..], "block {b}");
    }
    // Mixed (after a flush, so the first write is taken at once): an oversized write fails
    // alone; the operations around it still succeed.
    let (results, _) = s.batch(vec![pb::stream_request::Op::Flush(pb::FlushOp {})]).await;
    assert!(matches!(results[0], R::Flush(_)), "{:?}", results[0]);
    let (results, _) = s
        .batch(vec![
            stream_write(40, 0, block_data(40, 2)),
            stream_write(41, 0, vec![9; BS + 1]),
            stream_read(40),
            stream_read(100),
        ])
        .await;
    assert!(matches!(results[0], R::Write(_)), "{:?}", results[0]);
    let R::Error(e) = &results[1] else { panic!("an oversized block is refused") };
    assert_eq!(e.code, tonic::Code::InvalidArgument as i32, "{e:?}");
    let R::Read(r) = &results[2] else { panic!() };
    assert_eq!(&r.data[..], &block_data(40, 2)[..], "the batch's own earlier write is read");
    let R::Read(r) = &results[3] else { panic!() };
    assert!(!r.found, "block 100 was never written");
    // A batch over max_stream_batch_ops is refused whole: the stream ends with
    // INVALID_ARGUMENT and none of its writes happened, but the batch sent just before it
    // (back to back: the NMS may take both in one turn) is answered first.
    let before = s.send((0..8).map(stream_read).collect()).await;
    s.send((200..241).map(|b| stream_write(b, 0, block_data(b, 3))).collect()).await;
    let mut answered = 0;
    let e = loop {
        match s.message().await {
            Ok(Some(m)) => answered += m.results.len(),
            Ok(None) => panic!("the stream ended without an error"),
            Err(e) => break e,
        }
    };
    assert_eq!(answered, before.len(), "the batch before the refused one was answered");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("max_stream_batch_ops"), "{e:?}");
    // An operation with its own credential inside a batch is refused the same way.
    let mut s = BatchStream::open(&a, "bt", "key").await;
    s.tx.send(pb::StreamBatch {
        auth: s.auth.take(),
        ops: vec![pb::StreamRequest {
            auth: auth("other", "x"),
            tag: 1,
            op: Some(stream_write(201, 0, block_data(201, 3))),
        }],
    })
    .await
    .unwrap();
    let e = s.message().await.expect_err("auth inside a batch ends the stream");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    // The wrong credential: every operation of the batch is refused.
    let mut bad = BatchStream::open(&a, "bt", "not-the-key").await;
    let (results, _) = bad.batch(vec![stream_write(1, 0, vec![7; BS]), stream_read(1)]).await;
    for r in results {
        let R::Error(e) = r else { panic!("a wrong credential is refused: {r:?}") };
        assert_eq!(e.code, tonic::Code::Unauthenticated as i32, "{e:?}");
    }
    let mut s = BatchStream::open(&a, "bt", "key").await;
    let (results, _) = s
        .batch(vec![
            stream_read(1),
            stream_read(200),
            pb::stream_request::Op::Flush(pb::FlushOp {}),
        ])
        .await;
    let R::Read(r) = &results[0] else { panic!() };
    assert_eq!(&r.data[..], &block_data(1, 2)[..], "the wrong credential changed nothing");
    let R::Read(r) = &results[1] else { panic!() };
    assert!(!r.found, "nothing of the refused batch was written");
    let R::Flush(f) = &results[2] else { panic!("flush") };
    assert!(f.persisted_lsn >= *lsns.last().unwrap());
    let blocks: Vec<u64> = (0..32).chain([40, 200, 201]).collect();
    let stored = pss_blocks(&cluster, "bt", &blocks).await;
    for b in (0..32).chain([40]) {
        assert_eq!(stored.get(&b), Some(&block_data(b, 2)), "block {b} in the PSS");
    }
    assert!(!stored.contains_key(&200) && !stored.contains_key(&201), "refused batches");
    // A vehicle that sends its last batch and half-closes gets every result, then the end
    // of the stream with OK: the NMS does not wait for messages that cannot come.
    let mut half = BatchStream::open(&a, "bt", "key").await;
    half.send(vec![stream_read(1), stream_write(50, 0, block_data(50, 2)), stream_read(50)]).await;
    drop(std::mem::replace(&mut half.tx, tokio::sync::mpsc::channel(1).0));
    let mut answered = 0;
    while let Some(m) = half.message().await.expect("the stream ends with OK") {
        answered += m.results.len();
    }
    assert_eq!(answered, 3, "every operation of the half-closed stream was answered");
    drop((s, bad));
    a.stop().await;
    cluster.shutdown().await;
}

/// Messages a stream has already received are answered together, but never more than
/// `max_stream_inflight_ops` replies in one outbound message: ten batches of 4 cached reads,
/// all sent before the call opens, come back in order in messages of at most 8 results.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_gathered_from_received_messages_are_bounded() {
    use pb::stream_reply::Result as R;
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(3, dir.path()).await.unwrap();
    let a = Nms::start("a", &cluster.endpoints(), |c| c.max_stream_inflight_ops = 8).await;
    a.create_volume("gb", "key").await;
    let mut s = BatchStream::open(&a, "gb", "key").await;
    let (results, _) =
        s.batch((0..4).map(|b| stream_write(b, 0, block_data(b, 5))).collect()).await;
    assert!(results.iter().all(|r| matches!(r, R::Write(_))), "{results:?}");
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    for i in 0..10u64 {
        let ops = (0..4)
            .map(|b| pb::StreamRequest { auth: None, tag: i * 4 + b + 1, op: Some(stream_read(b)) })
            .collect();
        let auth = if i == 0 { auth("gb", "key") } else { None };
        tx.send(pb::StreamBatch { auth, ops }).await.unwrap();
    }
    drop(tx);
    let mut replies = a
        .raw()
        .await
        .stream_batches(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let (mut next_tag, mut sizes) = (1, Vec::new());
    while let Some(m) = tokio::time::timeout(Duration::from_secs(20), replies.message())
        .await
        .expect("a reply within 20 s")
        .unwrap()
    {
        sizes.push(m.results.len());
        for r in m.results {
            assert_eq!(r.tag, next_tag, "results in order");
            let Some(R::Read(read)) = r.result else { panic!("read {}: {:?}", r.tag, r.result) };
            let b = (r.tag - 1) % 4;
            assert_eq!(&read.data[..], &block_data(b, 5)[..], "block {b}");
            next_tag += 1;
        }
    }
    println!("results per message: {sizes:?}");
    assert_eq!(next_tag, 41, "all 40 reads answered");
    assert!(sizes.iter().all(|&n| n <= 8), "at most max_stream_inflight_ops: {sizes:?}");
    a.stop().await;
    cluster.shutdown().await;
}

/// A vehicle that vanishes without closing its connection (out of range, crashed) while
/// its stream is open: HTTP/2 keepalive closes the connection, so the NMS's shutdown, which
/// waits for every open call, still ends (`Nms::stop` allows 20 s). The vehicle is behind a
/// proxy that goes silent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_vehicle_with_a_stream_open_does_not_hold_up_shutdown() {
    use pb::stream_reply::Result as R;
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(1, dir.path()).await.unwrap();
    let a = Nms::start("a", &cluster.endpoints(), |c| {
        c.http2_keepalive_interval_ms = 200;
        c.http2_keepalive_timeout_ms = 200;
    })
    .await;
    a.create_volume("gone", "key").await;
    let proxy =
        wayside_pss::testing::SilentProxy::start(a.ep.authority().parse().unwrap()).await.unwrap();
    let via = Endpoint::parse(&proxy.addr.to_string()).unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut replies = pb::nms_client::NmsClient::new(channel(&via).await)
        .stream(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(pb::StreamRequest { auth: auth("gone", "key"), tag: 1, op: Some(stream_read(0)) })
        .await
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(20), replies.message())
        .await
        .expect("a reply within 20 s")
        .unwrap()
        .expect("the stream stays open");
    assert!(matches!(r.result, Some(R::Read(_))), "{r:?}");
    proxy.silence();
    let asked = Instant::now();
    a.stop().await;
    println!("shutdown ended {} ms after it was asked", asked.elapsed().as_millis());
    drop(tx);
    cluster.shutdown().await;
}

/// A PSS that refuses write-back for good (full: `max_blocks`) does not make a flush wait
/// out its deadline: it fails at once with RESOURCE_EXHAUSTED naming the PSS's limit,
/// and so does a write that finds the dirty limit reached. Nothing accepted is dropped:
/// reads still see every write, and once the PSS has room the write-back (retrying all
/// along) lands and a flush succeeds with every block in the PSS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pss_refusing_write_back_fails_a_flush_at_once_and_nothing_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = LocalCluster::start_with(1, dir.path(), |c| c.max_blocks = 4).await.unwrap();
    let a = Nms::start("a", &cluster.endpoints(), |c| {
        // Without the refusal noticed, a flush would wait this long (and the test fail on
        // the timeout below).
        c.pss_deadline_ms = 120_000;
        c.backpressure_wait_ms = 120_000;
        c.dirty_limit_bytes_per_volume = 12 * (BS as u64 + ENTRY_OVERHEAD_BYTES);
    })
    .await;
    a.create_volume("full", "key").await;
    let mut raw = a.raw().await;
    let write = |block: u64| pb::WriteRequest {
        auth: auth("full", "key"),
        op: Some(pb::WriteOp {
            block,
            offset: 0,
            data: block_data(block, 1).into(),
            request_id: None,
        }),
    };
    for block in 0..12 {
        raw.write(write(block)).await.unwrap();
    }
    let flushed = tokio::time::timeout(
        Duration::from_secs(30),
        raw.flush(pb::FlushRequest { auth: auth("full", "key") }),
    )
    .await
    .expect("the flush answers without waiting out pss_deadline_ms");
    let e = flushed.expect_err("the PSS holds only 4 blocks");
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("max_blocks"), "the PSS's limit is named: {e:?}");
    // Operators see it too.
    let info = a.status().await.volume_info.into_iter().find(|v| v.volume == "full").unwrap();
    assert!(info.writeback_refused.contains("max_blocks"), "{info:?}");
    // The dirty limit is reached: a write fails the same way instead of waiting.
    let w = tokio::time::timeout(Duration::from_secs(30), raw.write(write(12)))
        .await
        .expect("the write answers without waiting out backpressure_wait_ms");
    assert_eq!(w.expect_err("dirty limit reached").code(), tonic::Code::ResourceExhausted);
    // Nothing accepted was dropped.
    for block in 0..12 {
        let r = raw
            .read(pb::ReadRequest {
                auth: auth("full", "key"),
                op: Some(pb::ReadOp { block, offset: 0, length: 0 }),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(r.data, block_data(block, 1), "block {block} still reads back");
    }
    // Room in the PSS: the write-back lands and a flush succeeds.
    cluster.stop_node(1).await.unwrap();
    cluster.reconfigure(1, |c| c.max_blocks = 1024).unwrap();
    cluster.restart_node(1).await.unwrap();
    let c = VolumeClient::open(opts(&[&a.ep], "full", "key")).await.unwrap();
    let p = c.flush().await.unwrap();
    assert!(p.0 >= 12, "every accepted write persisted ({p:?})");
    let all: Vec<u64> = (0..12).collect();
    let stored = pss_blocks(&cluster, "full", &all).await;
    for block in 0..12 {
        assert_eq!(stored.get(&block), Some(&block_data(block, 1)), "block {block} in the PSS");
    }
    a.stop().await;
    cluster.shutdown().await;
}

/// A vehicle call cut short never ends with OK, which would read as complete: a request
/// that ends inside a message ends with INTERNAL (a unary `Write` without running, even
/// after a whole message),
/// and no cut write is applied; streams open when the node stops end with UNAVAILABLE,
/// saying so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_cut_short_never_ends_with_ok() {
    use pb::stream_reply::Result as R;
    use prost::Message as _;
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(1, dir.path()).await.unwrap();
    let a = Nms::start("a", &cluster.endpoints(), |_| {}).await;
    a.create_volume("cut", "k").await;
    let mut send = raw_connection(&a).await;
    let host = a.ep.authority().to_owned();
    // `msg` gRPC-framed, cut in the middle of its body.
    let cut = |msg: &[u8]| {
        let mut b = vec![0u8];
        b.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        b.extend_from_slice(&msg[..msg.len() / 2]);
        bytes::Bytes::from(b)
    };
    let read = pb::StreamRequest { auth: auth("cut", "k"), tag: 1, op: Some(stream_read(0)) };
    let write = pb::StreamRequest { auth: None, tag: 2, op: Some(stream_write(0, 0, vec![1; BS])) };
    let path = "/wayside.v1.Nms/Stream";
    let (resp, mut out) =
        raw_open(&mut send, &host, path, &[], &[&read.encode_to_vec()], false).await;
    out.send_data(cut(&write.encode_to_vec()), true).unwrap();
    let (msgs, status) = raw_reply(resp).await;
    assert_eq!(status, "13", "INTERNAL");
    // (The read of the whole message is answered only if it was ready before the error:
    // one still waiting on the PSS is dropped with the stream.)
    let tags: Vec<u64> =
        msgs.iter().map(|m| pb::StreamReply::decode(&m[..]).unwrap().tag).collect();
    assert!(tags.is_empty() || tags == [1], "{tags:?}");
    let write = pb::WriteRequest {
        auth: auth("cut", "k"),
        op: Some(pb::WriteOp { block: 0, data: vec![2; BS].into(), ..Default::default() }),
    };
    let path = "/wayside.v1.Nms/Write";
    let (resp, mut out) = raw_open(&mut send, &host, path, &[], &[], false).await;
    out.send_data(cut(&write.encode_to_vec()), true).unwrap();
    let (msgs, status) = raw_reply(resp).await;
    assert_eq!((msgs.len(), status.as_str()), (0, "13"), "INTERNAL, no reply");
    // A whole unary request, then a cut one: refused before it runs, as tonic's server
    // refuses it.
    let whole = write.encode_to_vec();
    let (resp, mut out) = raw_open(&mut send, &host, path, &[], &[&whole], false).await;
    out.send_data(cut(&whole), true).unwrap();
    let (msgs, status) = raw_reply(resp).await;
    assert_eq!((msgs.len(), status.as_str()), (0, "13"), "INTERNAL, no reply");
    // No cut write, nor the one before a cut one, was applied; two streams stay open,
    // idle, as the node stops.
    let mut s = OpStream::open(&a, "cut", "k").await;
    match s.one(stream_read(0)).await {
        R::Read(r) => assert!(!r.found, "a cut write was applied: {r:?}"),
        other => panic!("{other:?}"),
    }
    let mut b = BatchStream::open(&a, "cut", "k").await;
    assert!(matches!(b.batch(vec![stream_read(0)]).await.0[..], [R::Read(_)]));
    let stopping = tokio::spawn(a.stop());
    let ended = tokio::time::timeout(Duration::from_secs(20), s.replies.message())
        .await
        .expect("the stream ends within 20 s");
    for (call, ended) in [
        ("Stream", ended.map(|m| m.is_some())),
        ("StreamBatches", b.message().await.map(|m| m.is_some())),
    ] {
        let e = ended.expect_err(call);
        assert_eq!(e.code(), tonic::Code::Unavailable, "{call}: {e:?}");
        assert!(e.message().contains("stopping"), "{call}: {e:?}");
    }
    stopping.await.unwrap();
    cluster.shutdown().await;
}

/// With a write-back delay, a block rewritten as fast as the vehicle can costs about one
/// PSS write per delay, not one per PSS round trip; a flush still persists everything at
/// once, and the PSS has the last data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_block_rewritten_continuously_is_written_back_once_per_delay() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(3, dir.path()).await.unwrap();
    let a = Nms::start("a", &cluster.endpoints(), |c| c.writeback_delay_ms = 250).await;
    let c = VolumeClient::open(opts(&[&a.ep], "hot", "k")).await.unwrap();
    let before = a.status().await;
    let started = std::time::Instant::now();
    let mut writes = 0u64;
    while started.elapsed() < Duration::from_millis(1500) {
        writes += 1;
        c.write(7, 0, block_data(7, writes)).await.unwrap();
    }
    let elapsed = started.elapsed();
    let after = a.status().await;
    let rounds = after.writeback_batches - before.writeback_batches;
    // One round per 250 ms at most (plus the one in flight at each end).
    let most = elapsed.as_millis() as u64 / 250 + 2;
    assert!(writes > 50, "the vehicle kept writing ({writes} writes)");
    assert!(
        rounds <= most,
        "{rounds} write-backs for {writes} writes in {elapsed:?} (at most {most})"
    );
    let p = c.flush().await.unwrap();
    assert!(p.0 >= writes, "the flush persisted every write ({p:?}, {writes} writes)");
    let stored = pss_blocks(&cluster, "hot", &[7]).await;
    assert_eq!(stored.get(&7), Some(&block_data(7, writes)), "the PSS has the last write");
    a.stop().await;
    cluster.shutdown().await;
}

/// Dirty data past `writeback_start_dirty_bytes_per_volume` is written back at once, not
/// after `writeback_delay_ms` (here ten minutes); under it, it waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dirty_data_past_the_start_threshold_is_written_back_without_the_delay() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(3, dir.path()).await.unwrap();
    let a = Nms::start("a", &cluster.endpoints(), |c| {
        c.writeback_delay_ms = 600_000;
        c.writeback_start_dirty_bytes_per_volume = 8 * (BS as u64 + ENTRY_OVERHEAD_BYTES);
    })
    .await;
    let c = VolumeClient::open(opts(&[&a.ep], "eager", "k")).await.unwrap();
    let batches = || async { a.status().await.writeback_batches };
    let before = batches().await;
    for b in 0..8 {
        c.write(b, 0, block_data(b, 1)).await.unwrap();
    }
    // 8 blocks dirty: at the threshold, not past it. (With a ten-minute delay nothing
    // else could have started a write-back.)
    assert_eq!(batches().await, before, "under the threshold, write-back waits");
    assert!(pss_blocks(&cluster, "eager", &[0]).await.is_empty());
    c.write(8, 0, block_data(8, 1)).await.unwrap();
    // The ninth block passes it: everything dirty reaches the PSS well before the delay.
    let all: Vec<u64> = (0..9).collect();
    wait_written_back(&cluster, "eager", &all, 1).await;
    assert!(batches().await > before);
    a.stop().await;
    cluster.shutdown().await;
}

/// A move that leaves the target past its write-back start threshold starts the
/// target's write-back at once, not after `writeback_delay_ms` (ten minutes here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_leaving_the_target_past_the_start_threshold_writes_back_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(3, dir.path()).await.unwrap();
    let a = Nms::start("a", &cluster.endpoints(), |c| c.writeback_delay_ms = 600_000).await;
    let b = Nms::start("b", &cluster.endpoints(), |c| {
        c.writeback_delay_ms = 600_000;
        c.writeback_start_dirty_bytes_per_volume = 8 * (BS as u64 + ENTRY_OVERHEAD_BYTES);
    })
    .await;
    let c = VolumeClient::open(opts(&[&a.ep, &b.ep], "carried", "k")).await.unwrap();
    let all: Vec<u64> = (0..32).collect();
    c.write_many(all.iter().map(|&b| (b, 0, block_data(b, 3))).collect()).await.unwrap();
    assert!(pss_blocks(&cluster, "carried", &all).await.is_empty(), "all 32 dirty on A");
    let report = a.migrate("carried", &b.ep, 0).await;
    assert_eq!(report.outcome, pb::MigrationOutcome::Completed as i32, "{report:?}");
    wait_written_back(&cluster, "carried", &all, 3).await;
    a.stop().await;
    b.stop().await;
    cluster.shutdown().await;
}

/// Reads of a batch that miss the cache share one PSS call (a cold NMS refills a volume
/// in a round trip per batch, not one per block).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_cold_reads_is_one_pss_call() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(3, dir.path()).await.unwrap();
    let a = Nms::start("a", &cluster.endpoints(), |_| {}).await;
    let b = Nms::start("b", &cluster.endpoints(), |_| {}).await;
    write_flushed(&a, "cold", 0..64u64, 4).await;
    let reads = |status: pb::NodeStatusReply| (status.pss_reads, status.pss_read_blocks);
    let mut o = opts(&[&b.ep], "cold", "k");
    o.max_batch_ops = 64;
    let c = VolumeClient::open(o).await.unwrap();
    let before = reads(b.status().await);
    // 60 written blocks and 4 never written, none cached on B.
    let blocks: Vec<u64> = (4..68).collect();
    let got = c.read_many(&blocks).await.unwrap();
    for (blk, data) in blocks.iter().zip(&got) {
        let want = (*blk < 64).then(|| block_data(*blk, 4));
        assert_eq!(data, &want, "block {blk}");
    }
    let after = reads(b.status().await);
    assert_eq!((after.0 - before.0, after.1 - before.1), (1, 64), "one PSS call for the batch");
    // Cached now (the absent ones too): no PSS call at all.
    assert_eq!(c.read_many(&blocks).await.unwrap(), got);
    let again = reads(b.status().await);
    assert_eq!(again, after);
    a.stop().await;
    b.stop().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_shutdown_flushes_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(3, dir.path()).await.unwrap();
    let a = Nms::start("a", &cluster.endpoints(), |c| c.writeback_delay_ms = 600_000).await;
    let c = VolumeClient::open(opts(&[&a.ep], "sd", "k")).await.unwrap();
    c.write(5, 0, block_data(5, 5)).await.unwrap();
    a.admin().await.shutdown(pb::ShutdownRequest {}).await.unwrap();
    a.0.exited().await.unwrap();
    assert_eq!(pss_blocks(&cluster, "sd", &[5]).await.get(&5), Some(&block_data(5, 5)));
    cluster.shutdown().await;
}

#[test]
fn the_nms_binary_is_static_pie_without_an_interpreter() {
    let out = match std::process::Command::new("file")
        .arg("-L")
        .arg(env!("CARGO_BIN_EXE_nms"))
        .output()
    {
        Ok(o) => o,
        Err(e) => {
            eprintln!("SKIP: `file` is not installed ({e})");
            return;
        }
    };
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("static-pie"), "{text}");
    assert!(!text.contains("interpreter"), "{text}");
}

/// One `StreamBatches` call carrying a single batch and its end together (as h2load and
/// pipelining clients send it): answered in the call when every operation hits the cache,
/// through the stream task when reads miss, and refused whole when the batch is bad.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_one_batch_calls_answer_hits_misses_and_refusals() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(3, dir.path()).await.unwrap();
    let a = Nms::start("a", &cluster.endpoints(), |_| {}).await;
    let b = Nms::start("b", &cluster.endpoints(), |_| {}).await;
    let writer = VolumeClient::open(opts(&[&a.ep], "ob", "k")).await.unwrap();
    writer.write_many((0..8u64).map(|blk| (blk, 0, block_data(blk, 1))).collect()).await.unwrap();
    writer.flush().await.unwrap();
    drop(writer);
    let batch = |ops: Vec<pb::stream_request::Op>, secret: &str| pb::StreamBatch {
        auth: auth("ob", secret),
        ops: ops
            .into_iter()
            .enumerate()
            .map(|(i, op)| pb::StreamRequest { auth: None, tag: i as u64 + 1, op: Some(op) })
            .collect(),
    };
    // The whole call: one message, then the end of the request stream.
    async fn call(nms: &Nms, m: pb::StreamBatch) -> Result<Vec<pb::StreamReply>, tonic::Status> {
        let mut replies =
            nms.raw().await.stream_batches(futures::stream::iter(vec![m])).await?.into_inner();
        let mut out = Vec::new();
        while let Some(r) =
            tokio::time::timeout(Duration::from_secs(20), replies.message()).await.unwrap()?
        {
            out.extend(r.results);
        }
        out.sort_by_key(|r| r.tag);
        Ok(out)
    }
    let data = |r: &pb::StreamReply| match &r.result {
        Some(pb::stream_reply::Result::Read(x)) => x.data.to_vec(),
        other => panic!("tag {}: {other:?}", r.tag),
    };
    let reads: Vec<_> = (0..8).map(stream_read).collect();
    // Hits on A (the writer's NMS): every read answered, then an OK end.
    let got = call(&a, batch(reads.clone(), "k")).await.unwrap();
    assert_eq!(got.len(), 8);
    for (blk, r) in got.iter().enumerate() {
        assert_eq!(data(r), block_data(blk as u64, 1), "block {blk} from A");
    }
    // Misses on B: fetched from the PSS, same answers.
    let got = call(&b, batch(reads.clone(), "k")).await.unwrap();
    for (blk, r) in got.iter().enumerate() {
        assert_eq!(data(r), block_data(blk as u64, 1), "block {blk} from B");
    }
    // A write and a read of it in one whole call, on B (now cached there).
    let got = call(&b, batch(vec![stream_write(3, 0, block_data(3, 2)), stream_read(3)], "k"))
        .await
        .unwrap();
    assert!(matches!(got[0].result, Some(pb::stream_reply::Result::Write(_))), "{got:?}");
    assert_eq!(data(&got[1]), block_data(3, 2), "the read sees the write before it");
    // A wrong credential: every operation is refused, nothing written.
    let got = call(&b, batch(vec![stream_write(4, 0, block_data(4, 9))], "wrong")).await.unwrap();
    match &got[0].result {
        Some(pb::stream_reply::Result::Error(e)) => {
            assert_eq!(e.code, tonic::Code::Unauthenticated as i32, "{e:?}")
        }
        other => panic!("a wrong credential wrote: {other:?}"),
    }
    // A batch over max_stream_batch_ops ends the call with INVALID_ARGUMENT, nothing run.
    let too_many: Vec<_> = (0..300).map(|_| stream_write(5, 0, block_data(5, 9))).collect();
    let e = call(&b, batch(too_many, "k")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    let got = call(&b, batch(vec![stream_read(4), stream_read(5)], "k")).await.unwrap();
    assert_eq!(data(&got[0]), block_data(4, 1), "the refused write changed nothing");
    assert_eq!(data(&got[1]), block_data(5, 1), "the oversized batch changed nothing");
    a.stop().await;
    b.stop().await;
    cluster.shutdown().await;
}

/// A raw HTTP/2 connection to `nms` (frames up to 256 KiB, as wayside clients take).
async fn raw_connection(nms: &Nms) -> h2::client::SendRequest<bytes::Bytes> {
    let tcp = tokio::net::TcpStream::connect(nms.ep.authority()).await.unwrap();
    let (send, conn) = h2::client::Builder::new()
        .max_frame_size(wayside_proto::server::HTTP2_MAX_FRAME_BYTES)
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .unwrap();
    tokio::spawn(conn);
    send
}

/// Writes version `n` of `blocks` of `vol` through `nms` and flushes them to the PSS.
async fn write_flushed(nms: &Nms, vol: &str, blocks: std::ops::Range<u64>, n: u64) {
    let writer = VolumeClient::open(opts(&[&nms.ep], vol, "k")).await.unwrap();
    writer.write_many(blocks.map(|blk| (blk, 0, block_data(blk, n))).collect()).await.unwrap();
    writer.flush().await.unwrap();
}

/// One raw HTTP/2 call on `send`: `path` with `headers`, the gRPC messages `messages`,
/// then the end of the request. Returns the gRPC messages of the reply and its
/// `grpc-status`.
async fn raw_call(
    send: &mut h2::client::SendRequest<bytes::Bytes>,
    authority: &str,
    path: &str,
    headers: &[(&'static str, &'static str)],
    messages: &[&[u8]],
) -> (Vec<Vec<u8>>, String) {
    let (resp, _) = raw_open(send, authority, path, headers, messages, true).await;
    raw_reply(resp).await
}

/// Starts a raw HTTP/2 call on `send`: `path` with `headers` and the gRPC messages
/// `messages`, the request ended if `end`. Returns the response to come and the request
/// body (dropping it resets an unended request).
async fn raw_open(
    send: &mut h2::client::SendRequest<bytes::Bytes>,
    authority: &str,
    path: &str,
    headers: &[(&'static str, &'static str)],
    messages: &[&[u8]],
    end: bool,
) -> (h2::client::ResponseFuture, h2::SendStream<bytes::Bytes>) {
    let mut req = http::Request::post(format!("http://{authority}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let mut body = Vec::new();
    for m in messages {
        body.push(0u8);
        body.extend_from_slice(&(m.len() as u32).to_be_bytes());
        body.extend_from_slice(m);
    }
    let ready = send.clone().ready().await.unwrap();
    *send = ready;
    let (resp, mut out) = send.send_request(req.body(()).unwrap(), false).unwrap();
    out.send_data(bytes::Bytes::from(body), end).unwrap();
    (resp, out)
}

/// The gRPC messages of a raw call's reply and its `grpc-status` (from the headers or the
/// trailers).
async fn raw_reply(resp: h2::client::ResponseFuture) -> (Vec<Vec<u8>>, String) {
    let resp = tokio::time::timeout(Duration::from_secs(20), resp).await.unwrap().unwrap();
    let mut headers_status =
        resp.headers().get("grpc-status").map(|v| v.to_str().unwrap().to_owned());
    let mut body = resp.into_body();
    let mut data = Vec::new();
    while let Some(d) = body.data().await {
        let d = d.unwrap();
        body.flow_control().release_capacity(d.len()).unwrap();
        data.extend_from_slice(&d);
    }
    if let Some(t) = body.trailers().await.unwrap() {
        headers_status = t.get("grpc-status").map(|v| v.to_str().unwrap().to_owned());
    }
    let mut msgs = Vec::new();
    let mut rest = &data[..];
    while !rest.is_empty() {
        assert_eq!(rest[0], 0, "an uncompressed message");
        let len = u32::from_be_bytes(rest[1..5].try_into().unwrap()) as usize;
        msgs.push(rest[5..5 + len].to_vec());
        rest = &rest[5 + len..];
    }
    (msgs, headers_status.expect("a grpc-status in the headers or the trailers"))
}

/// The NMS answers the vehicle's block calls itself (block data uncopied) and every other
/// call through tonic, on one connection: the replies decode with prost like tonic's; a
/// compressed request is refused with UNIMPLEMENTED before anything in it runs; a wrong
/// credential is UNAUTHENTICATED; an unknown method is UNIMPLEMENTED; the health service
/// answers between them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hand_served_streams_and_tonic_calls_share_a_connection() {
    use prost::Message as _;
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(3, dir.path()).await.unwrap();
    let a = Nms::start("a", &cluster.endpoints(), |_| {}).await;
    a.create_volume("hs", "k").await;
    let mut send = raw_connection(&a).await;
    let host = a.ep.authority().to_owned();
    let batch = |ops: Vec<pb::stream_request::Op>| {
        pb::StreamBatch {
            auth: auth("hs", "k"),
            ops: ops
                .into_iter()
                .enumerate()
                .map(|(i, op)| pb::StreamRequest { auth: None, tag: i as u64 + 1, op: Some(op) })
                .collect(),
        }
        .encode_to_vec()
    };
    // Claimed gzip: refused whole, so its write is not applied.
    let write = batch(vec![stream_write(1, 0, block_data(1, 1))]);
    let (msgs, status) = raw_call(
        &mut send,
        &host,
        "/wayside.v1.Nms/StreamBatches",
        &[("grpc-encoding", "gzip")],
        &[&write],
    )
    .await;
    assert_eq!((msgs.len(), status.as_str()), (0, "12"), "UNIMPLEMENTED, no reply");
    // Tonic's fallback for a method the service does not have.
    let (_, status) = raw_call(&mut send, &host, "/wayside.v1.Nms/NoSuchMethod", &[], &[&[]]).await;
    assert_eq!(status, "12");
    // Health, through tonic, on the same connection.
    let (msgs, status) =
        raw_call(&mut send, &host, "/grpc.health.v1.Health/Check", &[], &[&[]]).await;
    assert_eq!(status, "0");
    let health = tonic_health::pb::HealthCheckResponse::decode(&msgs[0][..]).unwrap();
    assert_eq!(
        health.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    // The block was not written: a read finds nothing. Then a write and reads, in one
    // batch (one StreamResults) and as single-operation messages (one StreamReply each).
    let read = batch(vec![stream_read(1)]);
    let (msgs, status) =
        raw_call(&mut send, &host, "/wayside.v1.Nms/StreamBatches", &[], &[&read]).await;
    assert_eq!(status, "0");
    let r = pb::StreamResults::decode(&msgs[0][..]).unwrap();
    match &r.results[0].result {
        Some(pb::stream_reply::Result::Read(x)) => assert!(!x.found, "the refused write applied"),
        other => panic!("{other:?}"),
    }
    let both = batch(vec![stream_write(1, 0, block_data(1, 2)), stream_read(1), stream_read(2)]);
    let (msgs, status) =
        raw_call(&mut send, &host, "/wayside.v1.Nms/StreamBatches", &[], &[&both]).await;
    assert_eq!(status, "0");
    // (Replies ready at once and those that waited on the PSS may leave in separate
    // messages.)
    let mut results: Vec<pb::StreamReply> =
        msgs.iter().flat_map(|m| pb::StreamResults::decode(&m[..]).unwrap().results).collect();
    results.sort_by_key(|r| r.tag);
    assert_eq!(results.iter().map(|r| r.tag).collect::<Vec<_>>(), [1, 2, 3]);
    let lsn = match &results[0].result {
        Some(pb::stream_reply::Result::Write(w)) => w.lsn,
        other => panic!("{other:?}"),
    };
    match (&results[1].result, &results[2].result) {
        (Some(pb::stream_reply::Result::Read(x)), Some(pb::stream_reply::Result::Read(y))) => {
            assert_eq!((x.found, &x.data[..]), (true, &block_data(1, 2)[..]));
            assert!(x.version > 0 && x.persisted_lsn <= lsn, "{x:?}");
            assert!(!y.found && y.data.is_empty(), "block 2 was never written");
        }
        other => panic!("{other:?}"),
    }
    let single = |tag: u64, op| {
        pb::StreamRequest { auth: auth("hs", "k"), tag, op: Some(op) }.encode_to_vec()
    };
    let (m1, m2) = (single(7, stream_read(1)), single(8, stream_read(1)));
    let (msgs, status) =
        raw_call(&mut send, &host, "/wayside.v1.Nms/Stream", &[], &[&m1, &m2]).await;
    assert_eq!(status, "0");
    assert_eq!(msgs.len(), 2, "one message per operation");
    for (m, tag) in msgs.iter().zip([7, 8]) {
        let r = pb::StreamReply::decode(&m[..]).unwrap();
        assert_eq!(r.tag, tag);
        match r.result {
            Some(pb::stream_reply::Result::Read(x)) => {
                assert_eq!(&x.data[..], &block_data(1, 2)[..])
            }
            other => panic!("{other:?}"),
        }
    }
    // Unary Read and Write, served by hand too: a write, its read back (the block's bytes
    // as prost decodes them), a wrong credential (UNAUTHENTICATED, nothing written), a
    // compressed request (UNIMPLEMENTED, nothing written).
    let w = |block: u64, n: u64, secret: &str| {
        pb::WriteRequest {
            auth: auth("hs", secret),
            op: Some(pb::WriteOp {
                block,
                offset: 0,
                data: block_data(block, n).into(),
                ..Default::default()
            }),
        }
        .encode_to_vec()
    };
    let r = |block: u64| {
        pb::ReadRequest {
            auth: auth("hs", "k"),
            op: Some(pb::ReadOp { block, offset: 0, length: 0 }),
        }
        .encode_to_vec()
    };
    let (msgs, status) =
        raw_call(&mut send, &host, "/wayside.v1.Nms/Write", &[], &[&w(4, 1, "k")]).await;
    assert_eq!(status, "0");
    let lsn = pb::WriteReply::decode(&msgs[0][..]).unwrap().lsn;
    assert!(lsn > 0);
    let (_, status) =
        raw_call(&mut send, &host, "/wayside.v1.Nms/Write", &[], &[&w(4, 2, "wrong")]).await;
    assert_eq!(status, "16", "UNAUTHENTICATED");
    let (_, status) = raw_call(
        &mut send,
        &host,
        "/wayside.v1.Nms/Write",
        &[("grpc-encoding", "gzip")],
        &[&w(4, 3, "k")],
    )
    .await;
    assert_eq!(status, "12", "UNIMPLEMENTED");
    let (_, status) = raw_call(&mut send, &host, "/wayside.v1.Nms/Read", &[], &[]).await;
    assert_eq!(status, "13", "INTERNAL: no request message");
    let (msgs, status) = raw_call(&mut send, &host, "/wayside.v1.Nms/Read", &[], &[&r(4)]).await;
    assert_eq!(status, "0");
    let got = pb::ReadReply::decode(&msgs[0][..]).unwrap();
    assert!(got.found && got.version > 0, "{got:?}");
    assert_eq!(&got.data[..], &block_data(4, 1)[..], "only the first write applied");
    let (msgs, status) = raw_call(&mut send, &host, "/wayside.v1.Nms/Read", &[], &[&r(9)]).await;
    assert_eq!(status, "0");
    let got = pb::ReadReply::decode(&msgs[0][..]).unwrap();
    assert!(!got.found && got.data.is_empty(), "{got:?}");
    a.stop().await;
    cluster.shutdown().await;
}

/// Single-operation `Stream` messages that arrive together are taken as one run: reads
/// that miss the cache are fetched with one PSS call (as a batch's are), and every reply
/// keeps its tag. (Taken one message at a time, 8 cold reads were 8 PSS calls.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_messages_received_together_share_one_pss_fetch() {
    use prost::Message as _;
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(3, dir.path()).await.unwrap();
    let a = Nms::start("a", &cluster.endpoints(), |_| {}).await;
    let b = Nms::start("b", &cluster.endpoints(), |_| {}).await;
    write_flushed(&a, "tg", 0..8u64, 3).await;
    let mut send = raw_connection(&b).await;
    // The volume is loaded on B (attached), its blocks not cached.
    let attached = VolumeClient::open(opts(&[&b.ep], "tg", "k")).await.unwrap();
    let reads = |s: pb::NodeStatusReply| (s.pss_reads, s.pss_read_blocks);
    let before = reads(b.status().await);
    // Blocks 0..8 (written, not cached on B) and 8, 9 (never written); the credential on
    // the first message only.
    let msgs: Vec<Vec<u8>> = (0..10u64)
        .map(|blk| {
            let auth = if blk == 0 { auth("tg", "k") } else { None };
            pb::StreamRequest { auth, tag: 100 + blk, op: Some(stream_read(blk)) }.encode_to_vec()
        })
        .collect();
    let refs: Vec<&[u8]> = msgs.iter().map(|m| &m[..]).collect();
    let host = b.ep.authority().to_owned();
    let (replies, status) = raw_call(&mut send, &host, "/wayside.v1.Nms/Stream", &[], &refs).await;
    assert_eq!(status, "0");
    let after = reads(b.status().await);
    assert_eq!((after.0 - before.0, after.1 - before.1), (1, 10), "one PSS call for the ten");
    assert_eq!(replies.len(), 10, "a reply per message");
    for (m, blk) in replies.iter().zip(0..10u64) {
        let r = pb::StreamReply::decode(&m[..]).unwrap();
        assert_eq!(r.tag, 100 + blk, "in order");
        match r.result {
            Some(pb::stream_reply::Result::Read(x)) => {
                let want = (blk < 8).then(|| block_data(blk, 3));
                assert_eq!(x.found.then(|| x.data.to_vec()), want, "block {blk}");
            }
            other => panic!("block {blk}: {other:?}"),
        }
    }
    drop(attached);
    a.stop().await;
    b.stop().await;
    cluster.shutdown().await;
}

/// A call's `grpc-timeout` is its deadline on the server: a write held by back-pressure, a
/// flush waiting for a PSS without a quorum (a call tonic routes) and a stream still open
/// end with DEADLINE_EXCEEDED when it passes (long before the server's own waits would
/// end), the timed-out write is not applied, and the stream's replies sent before its
/// deadline arrive intact. Raw HTTP/2, so no client-side timer answers for the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_timeout_ends_calls_with_deadline_exceeded() {
    use prost::Message as _;
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = LocalCluster::start(3, dir.path()).await.unwrap();
    let a = Nms::start("a", &cluster.endpoints(), |c| {
        c.dirty_limit_bytes_per_volume = 4 * (BS as u64 + ENTRY_OVERHEAD_BYTES);
        c.backpressure_wait_ms = 60_000;
        c.writeback_delay_ms = 600_000;
        c.pss_deadline_ms = 60_000;
    })
    .await;
    a.create_volume("gt", "k").await;
    let c = VolumeClient::open(opts(&[&a.ep], "gt", "k")).await.unwrap();
    for b in 0..4 {
        c.write(b, 0, block_data(b, 1)).await.unwrap();
    }
    // The PSS without a quorum: nothing can be written back, so the volume stays full.
    cluster.stop_node(2).await.unwrap();
    cluster.stop_node(3).await.unwrap();
    let mut send = raw_connection(&a).await;
    let host = a.ep.authority().to_owned();
    let write = pb::WriteRequest {
        auth: auth("gt", "k"),
        op: Some(pb::WriteOp {
            block: 9,
            offset: 0,
            data: block_data(9, 1).into(),
            request_id: None,
        }),
    }
    .encode_to_vec();
    let t = Instant::now();
    let (msgs, status) =
        raw_call(&mut send, &host, "/wayside.v1.Nms/Write", &[("grpc-timeout", "300m")], &[&write])
            .await;
    let waited = t.elapsed();
    assert_eq!((msgs.len(), status.as_str()), (0, "4"), "DEADLINE_EXCEEDED, no reply");
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(20),
        "ended at its deadline, not at backpressure_wait_ms: {waited:?}"
    );
    let flush = pb::FlushRequest { auth: auth("gt", "k") }.encode_to_vec();
    let t = Instant::now();
    let (msgs, status) =
        raw_call(&mut send, &host, "/wayside.v1.Nms/Flush", &[("grpc-timeout", "300m")], &[&flush])
            .await;
    let waited = t.elapsed();
    assert_eq!((msgs.len(), status.as_str()), (0, "4"), "DEADLINE_EXCEEDED, no reply");
    assert!(waited >= Duration::from_millis(300), "{waited:?}");
    // A stream with a deadline: its read (a cache hit) is answered, then the still-open
    // stream ends with DEADLINE_EXCEEDED.
    let read = pb::StreamRequest { auth: auth("gt", "k"), tag: 7, op: Some(stream_read(2)) }
        .encode_to_vec();
    let t = Instant::now();
    let path = "/wayside.v1.Nms/Stream";
    let timeout = [("grpc-timeout", "400m")];
    let (resp, out) = raw_open(&mut send, &host, path, &timeout, &[&read], false).await;
    let (msgs, status) = raw_reply(resp).await;
    let waited = t.elapsed();
    assert_eq!((msgs.len(), status.as_str()), (1, "4"), "the read's reply, then DEADLINE_EXCEEDED");
    assert!(waited >= Duration::from_millis(400), "{waited:?}");
    let reply = pb::StreamReply::decode(&msgs[0][..]).unwrap();
    assert_eq!(reply.tag, 7);
    let Some(pb::stream_reply::Result::Read(r)) = reply.result else { panic!("{reply:?}") };
    assert_eq!(r.data, block_data(2, 1));
    drop(out);
    // With the quorum back: the timed-out write was not applied; the rest is persisted.
    cluster.restart_node(2).await.unwrap();
    cluster.restart_node(3).await.unwrap();
    assert_eq!(c.read(9, 0, None).await.unwrap(), None, "the timed-out write changed nothing");
    c.flush().await.unwrap();
    assert_eq!(pss_blocks(&cluster, "gt", &[0, 1, 2, 3]).await.len(), 4);
    a.stop().await;
    cluster.shutdown().await;
}

/// The source's write-back batch is stuck on its way to the PSS (its PSS link silent) when
/// the switch is decided: the source waits `migration_writeback_drain_ms` for it, starts no
/// other, then switches without a Claim (the target raises the epoch at SwitchOver, over
/// its own PSS link). Nothing is lost: the stuck batch's blocks travel as dirty and the
/// target writes them back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_back_stuck_in_flight_delays_the_claim_not_the_move() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(1, dir.path()).await.unwrap();
    let upstream = cluster.endpoints()[0].authority().parse().unwrap();
    let proxy = wayside_pss::testing::SilentProxy::start(upstream).await.unwrap();
    let via_proxy = Endpoint::parse(&proxy.addr.to_string()).unwrap();
    let a = Nms::start("a", &[via_proxy], |c| {
        c.writeback_delay_ms = 0;
        c.migration_writeback_drain_ms = 300;
        c.pss_rpc_timeout_ms = 500;
        c.pss_deadline_ms = 1_000;
    })
    .await;
    let b = Nms::start("b", &cluster.endpoints(), |_| {}).await;
    let c = VolumeClient::open(opts(&[&a.ep], "stuck", "k")).await.unwrap();
    for blk in 0..32 {
        c.write(blk, 0, block_data(blk, 1)).await.unwrap();
    }
    c.flush().await.unwrap();
    // A's PSS link goes silent; the next write's write-back starts at once and hangs.
    proxy.silence();
    c.write(40, 0, block_data(40, 1)).await.unwrap();
    let report = a.migrate("stuck", &b.ep, 4).await;
    assert_eq!(report.outcome, pb::MigrationOutcome::Completed as i32, "{report:?}");
    assert!(report.writeback_drain_us >= 300_000, "waited for the batch in flight: {report:?}");
    assert_eq!(report.claim_us, 0, "no Claim with a batch in flight: {report:?}");
    for blk in 0..32 {
        assert_eq!(c.read(blk, 0, None).await.unwrap().unwrap(), block_data(blk, 1));
    }
    assert_eq!(c.read(40, 0, None).await.unwrap().unwrap(), block_data(40, 1));
    assert_eq!(c.current_nms(), b.ep);
    c.flush().await.unwrap();
    let stored = pss_blocks(&cluster, "stuck", &[40]).await;
    assert_eq!(stored[&40], block_data(40, 1), "the target wrote the stuck batch's block back");
    b.stop().await;
    a.stop().await;
    drop(proxy);
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_nms_restarted_at_its_address_is_attached_again_and_the_journal_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(3, dir.path()).await.unwrap();
    let (mut child, a_ep) = spawn_nms_process(dir.path(), &cluster, "127.0.0.1:0").await;
    // Only A: the client can only come back to the same address.
    let c = VolumeClient::open(opts(&[&a_ep], "restart", "k")).await.unwrap();
    for blk in 0..20u64 {
        c.write(blk, 0, block_data(blk, 1)).await.unwrap();
    }
    assert!(c.journal_bytes() >= 20 * BS as u64, "accepted, not persisted");
    child.start_kill().unwrap(); // SIGKILL
    child.wait().await.unwrap();
    // The same address again, a new process that knows nothing of those writes. The
    // client's channel reconnects by itself; its calls carry the dead process's session,
    // so the new one refuses them, and the client attaches and replays its journal.
    let (_child, again) = spawn_nms_process(dir.path(), &cluster, a_ep.authority()).await;
    assert_eq!(again, a_ep);
    assert_eq!(
        c.read(5, 0, None).await.unwrap(),
        Some(block_data(5, 1)),
        "an acknowledged write reads back after the NMS restarted"
    );
    c.write(20, 0, block_data(20, 1)).await.unwrap();
    c.flush().await.unwrap();
    assert_eq!(c.journal_bytes(), 0);
    let want: HashMap<u64, Vec<u8>> = (0..21).map(|b| (b, block_data(b, 1))).collect();
    assert_persisted_and_read_back(&cluster, &c, "restart", &want).await;
    // A call carrying another session is refused with the fault the client acts on.
    let mut raw = pb::nms_client::NmsClient::new(channel(&a_ep).await);
    let mut stale = auth("restart", "k");
    stale.as_mut().unwrap().nms_session = 1;
    let req =
        pb::ReadRequest { auth: stale, op: Some(pb::ReadOp { block: 5, offset: 0, length: 0 }) };
    let e = raw.read(req).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e:?}");
    assert!(
        matches!(fault_of(&e), Some(Fault::NotOwner { ref owner_address, .. }) if owner_address.is_empty()),
        "{e:?}"
    );
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_id_used_again_by_another_process_repeats_no_request_id() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(3, dir.path()).await.unwrap();
    let a = Nms::start("a", &cluster.endpoints(), |_| {}).await;
    let mut o = opts(&[&a.ep], "reuse", "k");
    o.client_id = "car-7".into();
    let first = VolumeClient::open(o.clone()).await.unwrap();
    first.write(1, 0, block_data(1, 1)).await.unwrap();
    drop(first);
    // A remount with the same --client-id: its writes are new writes, not duplicates
    // of the first client's (which the NMS still remembers by id).
    let second = VolumeClient::open(o).await.unwrap();
    let ack = second.write(1, 0, block_data(1, 2)).await.unwrap();
    assert_eq!(second.read(1, 0, None).await.unwrap(), Some(block_data(1, 2)), "{ack:?}");
    second.flush().await.unwrap();
    assert_eq!(pss_blocks(&cluster, "reuse", &[1]).await.get(&1), Some(&block_data(1, 2)));
    a.stop().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_nms_that_accepts_and_never_answers_is_passed_over_in_time() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(3, dir.path()).await.unwrap();
    let b = Nms::start("b", &cluster.endpoints(), |_| {}).await;
    // Accepts connections (the kernel's backlog) and never reads or answers: a stalled NMS.
    let mute = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mute_ep = Endpoint::parse(&mute.local_addr().unwrap().to_string()).unwrap();
    let mut o = opts(&[&mute_ep, &b.ep], "mute", "k");
    o.op_timeout = Duration::from_secs(10);
    o.rpc_timeout = Duration::from_millis(300);
    let t = Instant::now();
    let c = tokio::time::timeout(Duration::from_secs(8), VolumeClient::open(o))
        .await
        .expect("an NMS that never answers holds the attach up no longer than rpc_timeout")
        .unwrap();
    println!("attached past a mute NMS in {:?}", t.elapsed());
    assert_eq!(c.current_nms(), b.ep);
    c.write(0, 0, block_data(0, 1)).await.unwrap();
    drop(mute);
    b.stop().await;
    cluster.shutdown().await;
}

/// An NMS that attaches the vehicle, holds its first write until told, then answers it,
/// and (once told to) refuses every other call: an NMS the vehicle leaves (the edge of
/// its coverage) while a write is in flight.
#[derive(Clone)]
struct LeftBehind {
    write_arrived: std::sync::Arc<tokio::sync::Notify>,
    answer_write: std::sync::Arc<tokio::sync::Notify>,
    refuse: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl LeftBehind {
    fn gate(&self) -> Result<(), tonic::Status> {
        if self.refuse.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(tonic::Status::unavailable("out of coverage"));
        }
        Ok(())
    }
    fn info() -> pb::VolumeReply {
        pb::VolumeReply {
            info: Some(pb::VolumeInfo {
                volume: "left".into(),
                block_size: BS as u32,
                epoch: 1,
                nms_session: 42,
                ..Default::default()
            }),
        }
    }
}

type Unsupported<T> = Result<tonic::Response<T>, tonic::Status>;

#[tonic::async_trait]
impl pb::nms_server::Nms for LeftBehind {
    async fn create_volume(
        &self,
        _: tonic::Request<pb::CreateVolumeRequest>,
    ) -> Unsupported<pb::VolumeReply> {
        self.gate()?;
        Ok(tonic::Response::new(Self::info()))
    }
    async fn attach(&self, _: tonic::Request<pb::AttachRequest>) -> Unsupported<pb::VolumeReply> {
        self.gate()?;
        Ok(tonic::Response::new(Self::info()))
    }
    async fn read(&self, _: tonic::Request<pb::ReadRequest>) -> Unsupported<pb::ReadReply> {
        Err(tonic::Status::unavailable("out of coverage"))
    }
    async fn write(&self, _: tonic::Request<pb::WriteRequest>) -> Unsupported<pb::WriteReply> {
        self.write_arrived.notify_one();
        self.answer_write.notified().await;
        Ok(tonic::Response::new(pb::WriteReply { lsn: 1, ..Default::default() }))
    }
    async fn delete(&self, _: tonic::Request<pb::DeleteRequest>) -> Unsupported<pb::WriteReply> {
        Err(tonic::Status::unavailable("out of coverage"))
    }
    async fn list(&self, _: tonic::Request<pb::ListRequest>) -> Unsupported<pb::ListReply> {
        Err(tonic::Status::unavailable("out of coverage"))
    }
    async fn stat(&self, _: tonic::Request<pb::StatRequest>) -> Unsupported<pb::VolumeReply> {
        Err(tonic::Status::unavailable("out of coverage"))
    }
    async fn flush(&self, _: tonic::Request<pb::FlushRequest>) -> Unsupported<pb::FlushReply> {
        Err(tonic::Status::unavailable("out of coverage"))
    }
    type StreamStream = futures::stream::Empty<Result<pb::StreamReply, tonic::Status>>;
    async fn stream(
        &self,
        _: tonic::Request<tonic::Streaming<pb::StreamRequest>>,
    ) -> Unsupported<Self::StreamStream> {
        Err(tonic::Status::unavailable("out of coverage"))
    }
    type StreamBatchesStream = futures::stream::Empty<Result<pb::StreamResults, tonic::Status>>;
    async fn stream_batches(
        &self,
        _: tonic::Request<tonic::Streaming<pb::StreamBatch>>,
    ) -> Unsupported<Self::StreamBatchesStream> {
        Err(tonic::Status::unavailable("out of coverage"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_write_acknowledged_by_an_nms_left_meanwhile_is_not_replayed_over_later_ones() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(3, dir.path()).await.unwrap();
    let b = Nms::start("b", &cluster.endpoints(), |_| {}).await;
    let left = LeftBehind {
        write_arrived: Default::default(),
        answer_write: Default::default(),
        refuse: Default::default(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a_ep = Endpoint::parse(&listener.local_addr().unwrap().to_string()).unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(pb::nms_server::NmsServer::new(left.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let c = VolumeClient::open(opts(&[&a_ep, &b.ep], "left", "k")).await.unwrap();
    assert_eq!(c.current_nms(), a_ep);
    // X is in flight at A when the vehicle leaves A: another call fails there, and the
    // client attaches to B (its replay cannot include X: not acknowledged yet).
    let x = tokio::spawn({
        let c = c.clone();
        async move { c.write(7, 0, block_data(7, 1)).await }
    });
    left.write_arrived.notified().await;
    left.refuse.store(true, std::sync::atomic::Ordering::SeqCst);
    c.stat().await.unwrap();
    assert_eq!(c.current_nms(), b.ep);
    // Now A acknowledges X. The caller hears of X only once B has it too.
    left.answer_write.notify_one();
    x.await.unwrap().unwrap();
    // Y comes after X: X must never be applied after it.
    c.write(7, 0, block_data(7, 2)).await.unwrap();
    c.flush().await.unwrap();
    assert_eq!(c.read(7, 0, None).await.unwrap(), Some(block_data(7, 2)));
    assert_eq!(pss_blocks(&cluster, "left", &[7]).await.get(&7), Some(&block_data(7, 2)));
    server.abort();
    b.stop().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_and_migration_calls_need_the_cluster_token() {
    use wayside_proto::token::ClusterToken;
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(3, dir.path()).await.unwrap();
    let token = ClusterToken::new("road-0123456789abcdef").unwrap();
    let other = ClusterToken::new("road-fedcba9876543210").unwrap();
    let with = |t: &ClusterToken| {
        let t = t.clone();
        move |c: &mut Config| c.cluster_token = Some(t)
    };
    let a = Nms::start("a", &cluster.endpoints(), with(&token)).await;
    let b = Nms::start("b", &cluster.endpoints(), with(&token)).await;
    let stranger = Nms::start("x", &cluster.endpoints(), with(&other)).await;
    // Vehicle calls need no token.
    let c = VolumeClient::open(opts(&[&a.ep], "guarded", "k")).await.unwrap();
    for blk in 0..8u64 {
        c.write(blk, 0, block_data(blk, 1)).await.unwrap();
    }
    // Admin calls: none, or a wrong one, is UNAUTHENTICATED; the token passes.
    let e = a.admin().await.node_status(pb::NodeStatusRequest {}).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let e = a.admin().await.node_status(other.request(pb::NodeStatusRequest {})).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let e = a.admin().await.shutdown(pb::ShutdownRequest {}).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "a vehicle cannot stop the node: {e:?}");
    let st = a.admin().await.node_status(token.request(pb::NodeStatusRequest {})).await.unwrap();
    assert_eq!(st.into_inner().volumes, 1);
    let req = |to: &Endpoint| pb::StartMigrationRequest {
        volume: "guarded".into(),
        target_address: to.uri().into(),
        max_rounds: 2,
        switch_below_bytes: 0,
    };
    let e = a.admin().await.start_migration(req(&b.ep)).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    // A migration stream opened without the token is refused by the target.
    let mut m = pb::migration_client::MigrationClient::new(channel(&b.ep).await);
    let e = m.transfer(futures::stream::empty::<pb::MigrationFrame>()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    // A node of another road (another token) refuses A's move; A keeps serving.
    let r = a.admin().await.start_migration(token.request(req(&stranger.ep))).await.unwrap();
    let r = r.into_inner();
    assert_eq!(r.outcome, pb::MigrationOutcome::Aborted as i32, "{r:?}");
    assert!(r.error.contains("wrong x-wayside-cluster-token"), "{r:?}");
    assert_eq!(c.read(3, 0, None).await.unwrap(), Some(block_data(3, 1)));
    assert_eq!(c.current_nms(), a.ep);
    // Within the road the move completes; the vehicle follows and reads everything back.
    let r = a.admin().await.start_migration(token.request(req(&b.ep))).await.unwrap();
    let r = r.into_inner();
    assert_eq!(r.outcome, pb::MigrationOutcome::Completed as i32, "{r:?}");
    c.flush().await.unwrap();
    let want: HashMap<u64, Vec<u8>> = (0..8).map(|b| (b, block_data(b, 1))).collect();
    assert_persisted_and_read_back(&cluster, &c, "guarded", &want).await;
    assert_eq!(c.current_nms(), b.ep);
    a.stop().await;
    b.stop().await;
    stranger.stop().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_vehicle_whose_redirect_marker_was_dropped_attaches_again_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(3, dir.path()).await.unwrap();
    // Nothing written back during the test; A keeps one redirect marker.
    let a = Nms::start("a", &cluster.endpoints(), |c| {
        c.writeback_delay_ms = 600_000;
        c.max_moved_markers = 1;
    })
    .await;
    let b = Nms::start("b", &cluster.endpoints(), |c| c.writeback_delay_ms = 600_000).await;
    let c1 = VolumeClient::open(opts(&[&a.ep], "v1", "k")).await.unwrap();
    for blk in 0..8u64 {
        c1.write(blk, 0, block_data(blk, 1)).await.unwrap();
    }
    let c2 = VolumeClient::open(opts(&[&a.ep], "v2", "k")).await.unwrap();
    c2.write(0, 0, block_data(0, 1)).await.unwrap();
    // Both move to B while c1 is idle; v2's marker pushes v1's out of A.
    for v in ["v1", "v2"] {
        let r = a.migrate(v, &b.ep, 2).await;
        assert_eq!(r.outcome, pb::MigrationOutcome::Completed as i32, "{r:?}");
    }
    // c1 comes back to A, which no longer knows v1: rather than load v1 from the PSS
    // (where none of c1's writes are yet) behind c1's back, A points it at the owner the
    // PSS names; c1 attaches there (its replay answered as duplicates: B continues A's
    // lineage) and B is not fenced.
    assert_eq!(c1.read(3, 0, None).await.unwrap(), Some(block_data(3, 1)));
    assert_eq!(c1.current_nms(), b.ep);
    assert_eq!(b.status().await.volumes, 2, "B still serves both volumes");
    c1.flush().await.unwrap();
    let want: HashMap<u64, Vec<u8>> = (0..8).map(|b| (b, block_data(b, 1))).collect();
    assert_persisted_and_read_back(&cluster, &c1, "v1", &want).await;
    a.stop().await;
    b.stop().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_journal_larger_than_one_call_can_replay_gets_through() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(3, dir.path()).await.unwrap();
    let (mut child, a_ep) = spawn_nms_process(dir.path(), &cluster, "127.0.0.1:0").await;
    let mut o = opts(&[&a_ep], "big-journal", "k");
    // Far less than replaying 3000 writes one call each takes.
    o.op_timeout = Duration::from_millis(300);
    let c = VolumeClient::open(o).await.unwrap();
    const N: u64 = 3000;
    for chunk in (0..N).collect::<Vec<_>>().chunks(250) {
        c.write_many(chunk.iter().map(|&b| (b, 0, block_data(b, 1))).collect()).await.unwrap();
    }
    assert!(c.journal_bytes() >= N * BS as u64, "accepted, not persisted");
    child.start_kill().unwrap(); // SIGKILL
    child.wait().await.unwrap();
    let (_child, _) = spawn_nms_process(dir.path(), &cluster, a_ep.authority()).await;
    // The replay (in batches, not cut at the caller's op_timeout) gets through; a call that
    // waited for it may run out of its own time, a later one succeeds.
    let mut attempts = 0;
    while let Err(e) = c.write(N, 0, block_data(N, 1)).await {
        attempts += 1;
        assert!(attempts < 20, "the journal never got through: {e}");
    }
    println!("written after {attempts} failed attempts");
    let mut attempts = 0;
    while let Err(e) = c.flush().await {
        attempts += 1;
        assert!(attempts < 100, "never flushed: {e}");
    }
    let blocks: Vec<u64> = (0..=N).collect();
    let stored = pss_blocks(&cluster, "big-journal", &blocks).await;
    for b in blocks {
        assert_eq!(stored.get(&b), Some(&block_data(b, 1)), "block {b} in the PSS");
    }
    cluster.shutdown().await;
}

/// A move out of an NMS whose cache holds a fraction of the volume (48 of 200 blocks)
/// while the vehicle keeps writing and write-back runs at once, so blocks are evicted
/// around the rounds: every acknowledged write reads back from B and is in the PSS. (A
/// block written, written back and evicted between two rounds, which the next round tells
/// the target to forget, is rare here: rounds take milliseconds; the cache test
/// `a_block_written_again_written_back_and_evicted_mid_move_is_forgotten_by_the_target`
/// covers it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_move_under_memory_pressure_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(3, dir.path()).await.unwrap();
    let entry = BS as u64 + ENTRY_OVERHEAD_BYTES;
    let a = Nms::start("a", &cluster.endpoints(), |c| {
        c.cache_capacity_bytes = 48 * entry;
        c.dirty_limit_bytes = 24 * entry;
        c.dirty_limit_bytes_per_volume = 24 * entry;
        c.writeback_delay_ms = 0;
        c.migration_frame_bytes = 16 << 10;
    })
    .await;
    let b = Nms::start("b", &cluster.endpoints(), |_| {}).await;
    let c = VolumeClient::open(opts(&[&a.ep], "tight", "k")).await.unwrap();
    let writer = Writer::spawn(c.clone(), 200, block_data);
    while c.stat().await.unwrap().persisted_lsn < 400 {
        tokio::task::yield_now().await;
    }
    let report = a.migrate("tight", &b.ep, 8).await;
    assert_eq!(report.outcome, pb::MigrationOutcome::Completed as i32, "{report:?}");
    let after = c.stat().await.unwrap().accepted_lsn;
    while c.stat().await.unwrap().accepted_lsn < after + 200 {
        tokio::task::yield_now().await;
    }
    let Written { acked, writes, .. } = writer.stop().await;
    assert_eq!(c.current_nms(), b.ep);
    c.flush().await.unwrap();
    let want: HashMap<u64, Vec<u8>> = acked.iter().map(|(b, n)| (*b, block_data(*b, *n))).collect();
    println!("{writes} writes over {} blocks; {} rounds", want.len(), report.rounds.len());
    assert_persisted_and_read_back(&cluster, &c, "tight", &want).await;
    a.stop().await;
    b.stop().await;
    cluster.shutdown().await;
}

/// A vehicle writing more distinct blocks during a move than the source may track
/// (`migration_max_changed_blocks`) fails the move, named; the volume stays at the source,
/// which serves on, and every acknowledged write is persisted and reads back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_past_its_changed_block_limit_fails_and_the_source_serves_on() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(3, dir.path()).await.unwrap();
    // Both nodes track one changed block a round: two distinct ones written during a round
    // fail the move. Whether the vehicle writes two during a given round depends on the
    // machine, so the volume is moved back and forth until a move fails (each one that
    // completes is a round in which it wrote at most one).
    let small = |c: &mut Config| {
        c.migration_max_changed_blocks = 1;
        c.migration_frame_bytes = 16 << 10;
    };
    let a = Nms::start("a", &cluster.endpoints(), small).await;
    let b = Nms::start("b", &cluster.endpoints(), small).await;
    let c = VolumeClient::open(opts(&[&a.ep], "many", "k")).await.unwrap();
    for blk in 0..64u64 {
        c.write(blk, 0, block_data(blk, 0)).await.unwrap();
    }
    let writer = Writer::spawn(c.clone(), 200, block_data);
    while c.stat().await.unwrap().accepted_lsn < 400 {
        tokio::task::yield_now().await;
    }
    let (mut from, mut to) = (&a, &b);
    let mut failed = None;
    for _ in 0..20 {
        let report = from.migrate("many", &to.ep, 8).await;
        if report.outcome == pb::MigrationOutcome::Completed as i32 {
            (from, to) = (to, from);
            continue;
        }
        assert!(report.error.contains("migration_max_changed_blocks"), "{report:?}");
        failed = Some(from.ep.clone());
        break;
    }
    let source = failed.expect("no move failed in 20 (the limit is not enforced)");
    let after = c.stat().await.unwrap().accepted_lsn;
    while c.stat().await.unwrap().accepted_lsn < after + 100 {
        tokio::task::yield_now().await;
    }
    let Written { acked, .. } = writer.stop().await;
    assert_eq!(c.current_nms(), source, "the volume stayed at the failed move's source");
    c.flush().await.unwrap();
    let mut want: HashMap<u64, Vec<u8>> = (0..64).map(|b| (b, block_data(b, 0))).collect();
    want.extend(acked.iter().map(|(b, n)| (*b, block_data(*b, *n))));
    assert_persisted_and_read_back(&cluster, &c, "many", &want).await;
    a.stop().await;
    b.stop().await;
    cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_its_caller_gave_up_on_leaves_the_journal() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(3, dir.path()).await.unwrap();
    let a = Nms::start("a", &cluster.endpoints(), |_| {}).await;
    let c = VolumeClient::open(opts(&[&a.ep], "gave-up", "k")).await.unwrap();
    c.write(0, 0, block_data(0, 1)).await.unwrap();
    c.flush().await.unwrap();
    assert_eq!(c.journal_bytes(), 0);
    a.stop().await;
    // The NMS is gone; each write is dropped by a timeout around it (as the FUSE mount's
    // uploader does) while the client retries: not acknowledged, so not journaled (else the
    // journal fills with writes nobody will ever see acknowledged, and every later write
    // fails JournalFull).
    for n in 0..5 {
        let r = tokio::time::timeout(Duration::from_millis(50), c.write(1, 0, block_data(1, n)));
        assert!(r.await.is_err(), "no NMS to acknowledge it");
    }
    assert_eq!(c.journal_bytes(), 0);
    cluster.shutdown().await;
}

/// `max_volume_ops_per_s`: a volume past its operation budget has its operations refused
/// (with `rate_limit_wait_ms` 0) or paced (waiting within it), alone: another volume on the
/// node goes on at once, and calls with a wrong credential use none of the budget. Unary
/// calls, streamed writes and batched reads are all held to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_volume_over_its_operation_budget_is_refused_or_paced_alone() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start(3, dir.path()).await.unwrap();
    let a = Nms::start("a", &cluster.endpoints(), |c| {
        c.max_volume_ops_per_s = 50;
        c.volume_ops_burst = 10;
        c.rate_limit_wait_ms = 0;
    })
    .await;
    a.create_volume("hog", "k").await;
    a.create_volume("quiet", "q").await;
    let mut raw = a.raw().await;
    let write = |vol: &str, secret: &str, block: u64| pb::WriteRequest {
        auth: auth(vol, secret),
        op: Some(pb::WriteOp {
            block,
            offset: 0,
            data: vec![1; BS].into(),
            request_id: Some(pb::RequestId { client_id: format!("{vol}-c"), seq: block + 1 }),
        }),
    };
    for b in 0..30 {
        let e = raw.write(write("hog", "wrong", b)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    }
    let t = Instant::now();
    let (mut ok, mut refused) = (0u64, 0u64);
    for b in 0..40 {
        match raw.write(write("hog", "k", b)).await {
            Ok(_) => ok += 1,
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
                assert!(
                    matches!(fault_of(&e), Some(Fault::LimitExceeded { ref limit, .. }) if limit == "max_volume_ops_per_s"),
                    "{e:?}"
                );
                refused += 1;
            }
        }
    }
    // Cold reads (blocks never written: each a PSS read) are held to it too.
    let (mut read_ok, mut read_refused) = (0u64, 0u64);
    for b in 1000..1040 {
        let req = pb::ReadRequest {
            auth: auth("hog", "k"),
            op: Some(pb::ReadOp { block: b, offset: 0, length: 0 }),
        };
        match raw.read(req).await {
            Ok(_) => read_ok += 1,
            Err(e) => {
                assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
                read_refused += 1;
            }
        }
    }
    let allowed = 10 + (t.elapsed().as_secs_f64() * 50.0).ceil() as u64;
    eprintln!(
        "hog: {ok} written, {refused} refused, {read_ok} cold reads answered, {read_refused} \
         refused in {:?}",
        t.elapsed()
    );
    assert!(ok >= 10, "the wrong credential's calls used the budget: {ok} written");
    assert!(ok + read_ok <= allowed && refused > 0, "{ok} + {read_ok} done, {allowed} allowed");
    assert!(read_refused > 0, "cold reads went past the budget");
    // Over the budget, a retried write (its request id seen) is answered as the duplicate
    // it is, and a bad range as the bad range it is.
    let again = raw.write(write("hog", "k", 0)).await.unwrap().into_inner();
    assert!(again.duplicate, "{again:?}");
    let mut bad = write("hog", "k", 77);
    bad.op.as_mut().unwrap().offset = 1;
    let e = raw.write(bad).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    // The other volume has a budget of its own.
    for b in 0..10 {
        raw.write(write("quiet", "q", b)).await.unwrap();
    }
    a.stop().await;

    // Paced: 100 operations/s, 10 at once, waiting up to the default 1 s: nothing refused,
    // and 60 writes (streamed, in batches of 20) then 60 reads (batched) each take at least
    // the 0.5 s the budget allows them.
    let b = Nms::start("b", &cluster.endpoints(), |c| {
        c.max_volume_ops_per_s = 100;
        c.volume_ops_burst = 10;
    })
    .await;
    let mut o = opts(&[&b.ep], "paced", "p");
    o.max_batch_ops = 20;
    let c = VolumeClient::open(o).await.unwrap();
    let t = Instant::now();
    let writes = (0..60).map(|n| (n, 0, block_data(n, 1))).collect();
    c.write_many(writes).await.unwrap();
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(450), "60 writes took {took:?}");
    let t = Instant::now();
    let got = c.read_many(&(0..60).collect::<Vec<_>>()).await.unwrap();
    let took_reads = t.elapsed();
    for (n, d) in got.into_iter().enumerate() {
        assert_eq!(d, Some(block_data(n as u64, 1)), "block {n}");
    }
    assert!(took_reads >= Duration::from_millis(450), "60 reads took {took_reads:?}");
    eprintln!("paced: 60 writes in {took:?}, 60 reads in {took_reads:?}");
    b.stop().await;
}

/// A caller that connects and never sends the HTTP/2 preface does not hold its connection
/// slot: the NMS's keepalive runs from the moment a connection is accepted, so the mute
/// caller is sent the server's SETTINGS and a PING, and is closed when the PING goes
/// unanswered (the tonic servers, PSS and SMF, close it by `silent_connection_timeout_ms`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_never_sends_the_preface_is_pinged_and_closed() {
    use tokio::io::AsyncReadExt as _;
    let store = std::sync::Arc::new(wayside_nms::store::MemStore::default());
    let a = LocalNms::start_with_store("a", store, |c| {
        c.http2_keepalive_interval_ms = 200;
        c.http2_keepalive_timeout_ms = 200;
    })
    .await;
    let mut mute = tokio::net::TcpStream::connect(a.ep.authority()).await.unwrap();
    let connected = Instant::now();
    let mut sent = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(10), mute.read_to_end(&mut sent)).await;
    assert!(r.is_ok(), "a caller that never sent the preface was held open 10 s");
    let held = connected.elapsed();
    // (Half the 400 ms: the server's clock starts at its accept.)
    assert!(held >= Duration::from_millis(200), "closed after {held:?}, before its PING ran out");
    let kinds = wayside_nms::testing::frame_types(&sent);
    assert_eq!(kinds.first(), Some(&0x4), "SETTINGS first: {kinds:?}");
    assert!(kinds.contains(&0x6), "the mute caller was never pinged: {kinds:?}");
    a.stop().await;
}

/// `max_connections_per_source`: one host holds at most its share of the NMS's
/// connections (past it, its next is closed without an HTTP/2 byte), while another host
/// (here 127.0.0.2, another loopback address) is served; a connection closed gives its
/// host's place back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_host_gets_at_most_max_connections_per_source_and_others_are_served() {
    use tokio::io::AsyncReadExt as _;
    let store = std::sync::Arc::new(wayside_nms::store::MemStore::default());
    let a = LocalNms::start_with_store("a", store, |c| {
        c.max_connections = 8;
        c.max_connections_per_source = 2;
    })
    .await;
    let addr: std::net::SocketAddr = a.ep.authority().parse().unwrap();
    // A connection from `from`, and whether it was served (the server's SETTINGS came)
    // or closed at once.
    let connect = |from: [u8; 4]| async move {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind((std::net::Ipv4Addr::from(from), 0).into()).unwrap();
        let mut tcp = sock.connect(addr).await.unwrap();
        let mut head = [0u8; 9];
        let served = tokio::time::timeout(Duration::from_secs(10), tcp.read_exact(&mut head))
            .await
            .expect("neither served nor closed")
            .is_ok_and(|_| head[3] == 0x4);
        (tcp, served)
    };
    // A connection from 127.0.0.1 that is served, tried for at most 10 s (`why` names
    // what is waited for).
    let served_one = |why: &'static str| async move {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (tcp, served) = connect([127, 0, 0, 1]).await;
            if served {
                return tcp;
            }
            assert!(Instant::now() < deadline, "{why}");
        }
    };
    // Two from 127.0.0.1 (retried while the start's health check still holds a place).
    let mut held = vec![
        served_one("127.0.0.1 was never given a first connection").await,
        served_one("127.0.0.1 was never given a second connection").await,
    ];
    let (_, served) = connect([127, 0, 0, 1]).await;
    assert!(!served, "a third connection from one host past max_connections_per_source 2");
    let (_other, served) = connect([127, 0, 0, 2]).await;
    assert!(served, "another host was refused while the first held its share");
    // A closed connection gives its host's place back.
    drop(held.pop());
    held.push(served_one("the closed connection's place never came back").await);
    a.stop().await;
}

/// `max_connections`: a connection past it is closed as soon as it is accepted (no HTTP/2
/// byte is sent on it), the connections open are served meanwhile, the client library
/// fails over-limit attaches UNAVAILABLE within its deadline, and a slot freed by a closed
/// connection is taken by the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_max_connections_are_closed_and_open_ones_served() {
    use tokio::io::AsyncReadExt as _;
    let store = std::sync::Arc::new(wayside_nms::store::MemStore::default());
    let a = LocalNms::start_with_store("a", store, |c| c.max_connections = 2).await;
    let c1 = VolumeClient::open(opts(&[&a.ep], "v1", "k")).await.unwrap();
    c1.write(1, 0, block_data(1, 1)).await.unwrap();
    // The second slot: an operator's connection, served (a call answered on it). Tried
    // again until the start's health-check connection has given its slot back.
    let deadline = Instant::now() + Duration::from_secs(10);
    let op = loop {
        let uri = a.ep.uri().to_owned();
        let checked = async {
            let ch = tonic::transport::Endpoint::from_shared(uri)?.connect().await?;
            let mut op = tonic_health::pb::health_client::HealthClient::new(ch);
            let req = tonic_health::pb::HealthCheckRequest { service: String::new() };
            op.check(req).await.map_err(|s| anyhow::anyhow!("{s}"))?;
            anyhow::Ok(op)
        };
        match checked.await {
            Ok(op) => break op,
            Err(e) if Instant::now() < deadline => println!("not served yet: {e}"),
            Err(e) => panic!("a second connection was never served: {e}"),
        }
    };
    // A third connection is closed at once: end of stream (or a reset), never a SETTINGS.
    let mut tcp = tokio::net::TcpStream::connect(a.ep.authority()).await.unwrap();
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
        .await
        .expect("the connection past max_connections was neither served nor closed");
    assert!(matches!(r, Ok(0) | Err(_)), "a connection past the limit was served: {r:?}");
    // The client library is refused the same way, within its deadline, UNAVAILABLE.
    let mut o = opts(&[&a.ep], "v2", "k");
    o.op_timeout = Duration::from_millis(500);
    let err = VolumeClient::open(o).await.err().expect("attached past max_connections");
    assert!(matches!(err, wayside_nms::client::ClientError::Unavailable { .. }), "{err}");
    println!("attaching past max_connections: {err}");
    // The open connections were served meanwhile.
    assert_eq!(c1.read(1, 0, None).await.unwrap(), Some(block_data(1, 1)));
    // The operator's connection closes: its slot goes to the next vehicle.
    drop(op);
    let c2 = VolumeClient::open(opts(&[&a.ep], "v2", "k")).await.unwrap();
    c2.write(2, 0, block_data(2, 1)).await.unwrap();
    assert_eq!(c2.read(2, 0, None).await.unwrap(), Some(block_data(2, 1)));
    a.stop().await;
}
