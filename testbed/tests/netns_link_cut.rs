//! A move whose backhaul is cut mid-transfer: two `nms serve` processes in their own
//! network namespaces, joined by a `tc tbf`-shaped veth, a 3-node PSS of `pss serve`
//! processes behind them (`wayside_testbed::bench::migration::ShapedRsus`). While a vehicle
//! (this process, on its own links to each NMS) keeps writing, the link between the NMSs
//! goes down (`ip link set ... down`: no reset reaches either side, packets just stop).
//! The source must end the move within `migration_timeout_ms` and keep serving; the target
//! must give up its half-moved copy within its own; after the link heals, the same volume
//! moves; every acknowledged write is in the PSS and reads back from the target.
//! Skips visibly without root/iproute2. Starts 5 processes: nextest's `heavy` group.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};
use wayside_nms::client::{ClientOptions, VolumeClient};
use wayside_nms::testing::{Writer, Written};
use wayside_proto::pb;
use wayside_proto::types::{BlockSize, Credential, Endpoint, VolumeName};
use wayside_testbed::bench::migration::ShapedRsus;
use wayside_testbed::netns::{self, Lab, Tbf};

const BS: usize = 4096;
/// The move's limit on each NMS, in milliseconds.
const MOVE_LIMIT_MS: u64 = 3000;

fn block(blk: u64, n: u64) -> Vec<u8> {
    let mut d = vec![(blk ^ n) as u8; BS];
    d[..8].copy_from_slice(&blk.to_le_bytes());
    d[8..16].copy_from_slice(&n.to_le_bytes());
    d
}

async fn admin(ep: &Endpoint) -> pb::nms_admin_client::NmsAdminClient<tonic::transport::Channel> {
    wayside_nms::cli::admin(ep.authority()).await.unwrap()
}

async fn status(ep: &Endpoint) -> pb::NodeStatusReply {
    admin(ep).await.node_status(pb::NodeStatusRequest {}).await.unwrap().into_inner()
}

/// Polls `ep`'s status (no blind sleep) until `done` holds, at most `limit`.
async fn wait_status(
    ep: &Endpoint,
    limit: Duration,
    what: &str,
    done: impl Fn(&pb::NodeStatusReply) -> bool,
) -> pb::NodeStatusReply {
    let deadline = Instant::now() + limit;
    loop {
        let st = status(ep).await;
        if done(&st) {
            return st;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}: {st:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn start_move(
    from: &Endpoint,
    to: &Endpoint,
) -> tokio::task::JoinHandle<Result<pb::MigrationReport, tonic::Status>> {
    let (from, to) = (from.clone(), to.clone());
    tokio::spawn(async move {
        let req = pb::StartMigrationRequest {
            volume: "cut".into(),
            target_address: to.uri().into(),
            max_rounds: 0,
            switch_below_bytes: 0,
        };
        admin(&from).await.start_migration(req).await.map(|r| r.into_inner())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_over_a_cut_link_aborts_in_time_and_the_volume_moves_once_healed() {
    if let Err(e) = netns::probe() {
        eprintln!("SKIP: network namespaces are unusable here: {e}");
        return;
    }
    let [nms_bin, pss_bin] = common::wayside_binaries(["nms", "pss"]);
    netns::reap_stale();
    // 100 Mbit/s: the 8 MiB first round takes ~0.7 s, time to cut it half-way.
    let rsus = ShapedRsus::start(
        Lab::new("cut").unwrap(),
        &nms_bin,
        &pss_bin,
        &Tbf::for_rate(100_000_000),
        |name, pss| wayside_nms::config::Config {
            node_id: name.into(),
            pss: pss.to_vec(),
            migration_timeout_ms: MOVE_LIMIT_MS,
            // Nothing written back before the flush: the move carries dirty data.
            writeback_delay_ms: 600_000,
            block_pool_bytes: 16 << 20,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    println!("{}", rsus.describe());
    let [a, b] = rsus.vehicle.clone();
    let mut o = ClientOptions::new(
        rsus.vehicle.to_vec(),
        VolumeName::new("cut").unwrap(),
        Credential::new("k").unwrap(),
    );
    o.create_block_size = Some(BlockSize::new(BS as u32).unwrap());
    o.op_timeout = Duration::from_secs(30);
    let c = VolumeClient::open(o).await.unwrap();
    // 8 MiB cached on A, all of it dirty.
    const FILLED: u64 = 2048;
    let mut fill = tokio::task::JoinSet::new();
    for w in 0..8u64 {
        let c = c.clone();
        fill.spawn(async move {
            for blk in (w..FILLED).step_by(8) {
                c.write(blk, 0, block(blk, 0)).await.unwrap();
            }
        });
    }
    while let Some(r) = fill.join_next().await {
        r.unwrap();
    }
    assert_eq!(c.current_nms(), a);
    // The vehicle keeps writing (its own link to A is not cut).
    let writer = Writer::spawn(c.clone(), 64, block);

    // Move 1: cut once B holds some of the first round.
    let started = Instant::now();
    let first = start_move(&a, &rsus.peer[1]);
    let st = wait_status(&b, Duration::from_secs(20), "blocks arriving on B", |s| {
        s.cached_bytes >= 2 << 20
    })
    .await;
    rsus.lab.set_link(&rsus.p2p.a, false).unwrap();
    let cut = Instant::now();
    println!(
        "cut the NMS link {:?} after the move began, B holding {} bytes",
        cut - started,
        st.cached_bytes
    );
    let report = tokio::time::timeout(Duration::from_millis(MOVE_LIMIT_MS + 5000), first)
        .await
        .expect("the move ended within its limit")
        .unwrap()
        .expect("the admin call answers with a report");
    let ended = cut.elapsed();
    println!("{}", wayside_nms::cli::render_report(&report));
    println!("the move ended {ended:?} after the cut");
    assert_eq!(report.outcome, pb::MigrationOutcome::Aborted as i32, "{report:?}");
    assert!(report.error.contains("migration_timeout_ms"), "the limit is named: {}", report.error);
    let last = report.rounds.last().expect("the round under way is reported");
    assert!(last.unfinished && last.bytes >= st.cached_bytes, "{report:?}");
    assert_eq!(report.bytes_moved, 0, "no round was acknowledged: {report:?}");
    assert!(
        Duration::from_micros(report.total_us) <= Duration::from_millis(MOVE_LIMIT_MS + 1000),
        "aborted by its limit, counted from its start: {report:?}"
    );
    // B gives up its half-moved copy on its own limit (the source is out of its reach).
    let st =
        wait_status(&b, Duration::from_millis(MOVE_LIMIT_MS + 5000), "B dropping the copy", |s| {
            s.volumes == 0
        })
        .await;
    assert_eq!((st.cached_bytes, st.dirty_bytes), (0, 0), "B freed the half-moved blocks: {st:?}");
    let on_a = status(&a).await;
    assert_eq!(on_a.volumes, 1, "A still holds the volume: {on_a:?}");
    let before = c.stat().await.unwrap().accepted_lsn;
    assert_eq!(c.current_nms(), a, "the vehicle stayed on A");

    // Healed: the same volume moves.
    rsus.lab.set_link(&rsus.p2p.a, true).unwrap();
    let report = start_move(&a, &rsus.peer[1]).await.unwrap().unwrap();
    println!("{}", wayside_nms::cli::render_report(&report));
    assert_eq!(report.outcome, pb::MigrationOutcome::Completed as i32, "{report:?}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let at = c.stat().await.unwrap().accepted_lsn;
        if at >= before + 100 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the writer made no progress after the move: accepted lsn {at}, wanted {}",
            before + 100
        );
        tokio::task::yield_now().await;
    }
    let Written { acked, writes, .. } = writer.stop().await;
    assert_eq!(c.current_nms(), b, "the vehicle followed the move");
    c.flush().await.unwrap();

    let mut want: HashMap<u64, Vec<u8>> = (0..FILLED).map(|blk| (blk, block(blk, 0))).collect();
    for (blk, n) in &acked {
        want.insert(*blk, block(*blk, *n));
    }
    let blocks: Vec<u64> = (0..FILLED).collect();
    let pss: Vec<Endpoint> = rsus.pss.iter().map(|p| Endpoint::parse(p).unwrap()).collect();
    let stored = wayside_pss::client::PssClient::new(pss, Default::default())
        .get_blocks(&VolumeName::new("cut").unwrap(), &blocks)
        .await
        .unwrap();
    let read = c.read_many(&blocks).await.unwrap();
    assert_eq!(stored.len(), blocks.len());
    for ((blk, s), r) in blocks.iter().zip(stored).zip(read) {
        assert!(s.found && s.data == want[blk], "block {blk} in the PSS");
        assert_eq!(r.as_ref(), Some(&want[blk]), "block {blk} reads back from B");
    }
    println!("{writes} writes acknowledged across the cut and the move: none lost");
    let ShapedRsus { mut lab, .. } = rsus;
    lab.stop_matching("nms", Duration::from_secs(10));
}
