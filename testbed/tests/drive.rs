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
    let sc = Scenario::short(a41_rsus()[..3].to_vec(), 50.0).unwrap();
    let out = drive::run_scenario(sc.clone(), CancellationToken::new()).await.unwrap();
    let summary = drive::summary(&sc, &out);
    eprintln!("{summary}");
    let ok: Vec<_> = out.moves.iter().filter(|m| m.ok).collect();
    assert!(ok.len() >= 2, "{summary}\n{:#?}", out.moves);
    assert_eq!((ok[0].from_rsu.as_str(), ok[0].to_rsu.as_str()), ("RSU1", "RSU2"));
    assert_eq!((ok[1].from_rsu.as_str(), ok[1].to_rsu.as_str()), ("RSU2", "RSU3"));
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
}
