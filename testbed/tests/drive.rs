//! A short real drive (3-node PSS, one NMS per RSU, the SMF over gRPC, all on loopback):
//! one vehicle through three RSUs with compressed time must make at least two moves and lose
//! no acknowledged write.

use tokio_util::sync::CancellationToken;
use wayside_nms::smf::model::Speed;
use wayside_testbed::drive::{self, Scenario};
use wayside_testbed::mobility::{a41_rsus, Motion, Vehicle};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_drive_moves_twice_and_loses_nothing() {
    let sc = Scenario {
        rsus: a41_rsus()[..3].to_vec(),
        vehicles: vec![Vehicle {
            name: "car".into(),
            motion: Motion::Constant {
                depart_s: 0.0,
                start_m: 0.0,
                speed: Speed::from_mph(50.0).unwrap(),
            },
        }],
        time_scale: 20.0,
        ops_per_s: 40.0,
        blocks: 64,
        reports_per_s: 2.0,
        stall_ms: 500.0,
        overlap_m: 100.0,
        handover_execution_s: 2.0,
        progress: false,
    };
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
