//! Short real drives (3-node PSS, one NMS per RSU, the SMF over gRPC, all on loopback):
//! one vehicle through three RSUs with compressed time must make at least two moves and lose
//! no acknowledged write; on a road whose next cell is too short for a reactive move, the
//! SMF starts the move proactively, before the handover.

use tokio_util::sync::CancellationToken;
use wayside_nms::smf::model::Speed;
use wayside_proto::pb;
use wayside_testbed::drive::{self, Scenario};
use wayside_testbed::mobility::a41_rsus;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_drive_moves_twice_and_loses_nothing() {
    wayside_proto::telemetry::init_for_tests();
    let sc = Scenario::short(a41_rsus()[..3].to_vec(), 50.0).unwrap();
    let out = drive::run_scenario(sc.clone(), CancellationToken::new()).await.unwrap();
    let summary = drive::summary(&sc, &out);
    eprintln!("{summary}");
    let ok: Vec<_> = out.moves.iter().filter(|m| m.ok).collect();
    let moves = format!("{summary}\n{:#?}", out.moves);
    assert!(ok.len() >= 2, "{moves}");
    let path = |m: &pb::MoveRecord| (m.from_rsu.clone(), m.to_rsu.clone());
    assert_eq!(path(ok[0]), ("RSU1".into(), "RSU2".into()), "{moves}");
    if ok.len() == out.moves.len() {
        assert_eq!(path(ok[1]), ("RSU2".into(), "RSU3".into()), "{moves}");
    } else {
        // A move failed (under a loaded machine: a fault path the drive must survive);
        // the SMF found the volume where it was and moved it on from there.
        eprintln!("a move failed; the volume still reached RSU3: {moves}");
        assert_eq!(out.moves.len() - ok.len(), 1, "at most one move failed: {moves}");
        assert_eq!(ok.last().map(|m| m.to_rsu.as_str()), Some("RSU3"), "{moves}");
    }
    for m in &ok {
        assert!(
            m.bytes > 0
                && m.actual_start_s >= m.planned_start_s - 1e-6
                && m.end_s >= m.actual_start_s,
            "{m:?}"
        );
    }
    assert!(out.checked > 0, "{summary}");
    assert_eq!(out.lost, 0, "{summary}");
    assert_eq!(out.read_mismatches, 0, "{summary}");
    assert_eq!(out.unpersisted, 0, "{summary}");
    assert_eq!(drive::verdict(&out), Ok(()), "{summary}");
    // The SMF learnt from the moves: its estimate moved away from the 0.5 s prior.
    assert!(out.learnt_fixed_s < 0.5, "{summary}: fixed {}", out.learnt_fixed_s);
    // The report and plots are written.
    let dir = tempfile::tempdir().unwrap();
    let md = drive::write_report(dir.path(), &sc, &out).unwrap();
    let text = std::fs::read_to_string(md).unwrap();
    assert!(text.contains("| car | RSU1 | RSU2 |"), "{text}");
    assert!(std::fs::read_to_string(dir.path().join("timeline.svg"))
        .unwrap()
        .contains("<polyline"));
}

/// `--max-wall-s`: a drive longer than its wall limit stops its vehicles there and checks
/// them as at the road's end (flush, read back, PSS), passing marked as stopped early.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drive_stops_at_its_wall_limit_and_checks_what_it_drove() {
    let mut sc = Scenario::short(a41_rsus()[..3].to_vec(), 10.0).unwrap();
    // Real time at 10 mph: the road would take minutes.
    sc.time_scale = 1.0;
    sc.max_wall = std::time::Duration::from_secs(3);
    let out = drive::run_scenario(sc.clone(), CancellationToken::new()).await.unwrap();
    let summary = drive::summary(&sc, &out);
    eprintln!("{summary}");
    assert!(out.wall_limit_reached && !out.interrupted, "{summary}");
    assert!(summary.contains("(stopped at the wall limit)"), "{summary}");
    assert!(out.checked > 0, "{summary}");
    assert_eq!((out.lost, out.unpersisted, out.unverified), (0, 0, 0), "{summary}");
    assert_eq!(drive::verdict(&out), Ok(()), "{summary}");
}

/// RSU2's cell is 30 m: at 50 mph its reactive window (4 s to handover + 1.3 s dwell) is
/// shorter than the SMF's first SMT estimate (its 0.5 s wall prior, x20 = 10 s of scenario
/// time), so eq. 3 fails and eq. 4 gives a lead that fits in RSU1's 13 s dwell (eq. 5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_next_cell_makes_the_smf_move_proactively_before_the_handover() {
    let sc = Scenario::short(
        vec![("R1".into(), 300.0), ("R2".into(), 30.0), ("R3".into(), 300.0)],
        50.0,
    )
    .unwrap();
    let out = drive::run_scenario(sc.clone(), CancellationToken::new()).await.unwrap();
    let summary = drive::summary(&sc, &out);
    eprintln!("{summary}\n{:#?}", out.moves);
    let road = out.road.as_ref().expect("the outcome keeps the road");
    let speed = Speed::from_mph(50.0).unwrap();
    let first = out
        .moves
        .iter()
        .find(|m| m.from_rsu == "R1" && m.to_rsu == "R2")
        .unwrap_or_else(|| panic!("no move R1 -> R2: {summary}"));
    assert_eq!(first.kind, pb::MoveKind::Proactive as i32, "{first:?}");
    assert!(first.ok, "{first:?}");
    // The vehicle starts at 0 m at t = 0, so it reaches RSU1's exit radius at x / v.
    let handover_at_s = road.exit_position_m(0, speed) / speed.mps();
    assert!(
        first.planned_start_s < handover_at_s - 1.0 && first.actual_start_s < handover_at_s,
        "a proactive move starts ahead of the handover at {handover_at_s:.2} s: {first:?}"
    );
    assert!(first.actual_start_s >= first.planned_start_s - 1e-6, "{first:?}");
    assert!(out.checked > 0, "{summary}");
    assert_eq!(out.lost, 0, "{summary}");
    assert_eq!(out.read_mismatches, 0, "{summary}");
    assert_eq!(out.unpersisted, 0, "{summary}");
    assert_eq!(drive::verdict(&out), Ok(()), "{summary}");
}

/// The default road runs TLS on every hop: a vehicle trusting the road's CA writes, reads
/// and flushes through an NMS (which writes back to the PSS over TLS with the road's
/// certificate); a plaintext vehicle, a vehicle trusting another CA, and a PSS caller
/// without the road's certificate are all refused, and what they tried is not there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_road_runs_tls_on_every_hop_and_refuses_the_rest() {
    use std::time::Duration;
    use wayside_nms::client::{ClientOptions, VolumeClient};
    use wayside_proto::tls::{pki, Tls, TlsFiles};
    use wayside_proto::types::{BlockSize, Credential, Endpoint, VolumeName};
    let sc = Scenario::short(a41_rsus()[..2].to_vec(), 50.0).unwrap();
    assert!(sc.tls, "the default scenario runs TLS");
    let deployed = drive::deploy(&drive::Deployment::InProcess, &sc).await.unwrap();
    let road = deployed.tls.as_ref().expect("the road's TLS");
    let nms = Endpoint::parse(&deployed.vehicle[0]).unwrap();
    let opts = |tls: Option<Tls>| {
        let mut o = ClientOptions::new(
            vec![nms.clone()],
            VolumeName::new("tls-car").unwrap(),
            Credential::new("tls-secret").unwrap(),
        );
        o.create_block_size = Some(BlockSize::new(4096).unwrap());
        o.op_timeout = Duration::from_secs(5);
        o.tls = tls;
        o
    };
    let car = VolumeClient::open(opts(Some(road.vehicle.clone()))).await.unwrap();
    car.write(1, 0, vec![7u8; 4096]).await.unwrap();
    car.flush().await.expect("persisted in the PSS over TLS");
    assert_eq!(car.read(1, 0, None).await.unwrap(), Some(vec![7u8; 4096]));

    // A plaintext vehicle: refused, within its deadline.
    let t = std::time::Instant::now();
    let e = VolumeClient::open(opts(None)).await.err().expect("plaintext refused");
    assert!(t.elapsed() < Duration::from_secs(15), "took {:?}", t.elapsed());
    eprintln!("plaintext vehicle: {e}");
    assert!(e.to_string().contains("road's CA"), "{e}");
    // A vehicle trusting another CA (a man in the middle's view): refused.
    let other = tempfile::tempdir().unwrap();
    let ca = pki::Ca::new("someone else").unwrap();
    let (names, ips) = pki::loopback();
    let foreign = ca.write_road(other.path(), &names, &ips).unwrap();
    let foreign_ca =
        Tls::load(&TlsFiles { ca: foreign.ca.clone(), ..TlsFiles::default() }).unwrap().unwrap();
    let e = VolumeClient::open(opts(Some(foreign_ca))).await.err().expect("untrusted NMS");
    eprintln!("vehicle trusting another CA: {e}");
    assert!(e.to_string().contains("UnknownIssuer"), "{e}");

    // The PSS: with the road's certificate the block is there; with the CA only (no
    // certificate), or a certificate of another CA, the PSS refuses the caller.
    let pss_client = |tls: Tls| {
        let o = wayside_pss::client::ClientOptions {
            tls: Some(tls),
            deadline: Duration::from_secs(3),
            ..Default::default()
        };
        wayside_pss::client::PssClient::new(deployed.pss.clone(), o)
    };
    let vol = VolumeName::new("tls-car").unwrap();
    pss_client(road.node.clone()).get_volume(&vol).await.expect("the road's certificate");
    let ca_only = pss_client(road.vehicle.clone()).get_volume(&vol).await;
    assert!(ca_only.is_err(), "a PSS caller without a certificate was served: {ca_only:?}");
    let foreign_node = Tls::load(&foreign).unwrap().unwrap();
    let foreign_cert = pss_client(foreign_node).get_volume(&vol).await;
    assert!(foreign_cert.is_err(), "a certificate of another CA was served: {foreign_cert:?}");
    drop(car);
    deployed.shutdown().await;
}
