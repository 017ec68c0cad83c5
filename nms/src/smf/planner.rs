//! The SMF's decision for one vehicle report: which RSU is next, when the handover starts,
//! and when to start moving the volume (paper eqs. 3-7). Pure: time is an argument.

use super::model::{self, Plan, Speed};
use super::road::Road;

/// What the planner was told about a vehicle.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VehicleFix {
    /// Scenario time of the fix, seconds.
    pub time_s: f64,
    /// Along the road, metres.
    pub position_m: f64,
    pub speed: Speed,
}

/// The kind of move decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// No handover ahead (off the road, or past the last RSU's handover point).
    None,
    /// Start at the handover (eq. 3/6 holds).
    Reactive,
    /// Start `x_s` before the handover (eqs. 4, 5, 7).
    Proactive,
    /// The needed lead is not below the current RSU's dwell time (eq. 5 fails); the SMF
    /// starts as early as it can and reports it.
    CannotFit,
}

/// The planner's answer.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Decision {
    pub kind: Kind,
    /// Index (into the road) of the RSU serving the vehicle now.
    pub from: Option<usize>,
    /// Index of the next RSU.
    pub to: Option<usize>,
    /// When the handover to `to` starts (the vehicle reaches the exit radius).
    pub handover_at_s: f64,
    /// When to start the move; never before the fix's time.
    pub start_at_s: f64,
    /// The proactive lead `X` (0 for reactive).
    pub x_s: f64,
    pub predicted_smt_s: f64,
    /// `h̄ + N̄` of the next RSU.
    pub window_s: f64,
    /// The current RSU's dwell time `N̄` (the bound of eq. 5).
    pub lead_limit_s: f64,
    pub reason: String,
}

/// Plans the next move for a vehicle at `fix` whose volume takes `predicted_smt_s` to move.
/// `margin_s` is added to a proactive lead (room for prediction error).
pub fn decide(road: &Road, fix: VehicleFix, predicted_smt_s: f64, margin_s: f64) -> Decision {
    let none = |from: Option<usize>, reason: String| Decision {
        kind: Kind::None,
        from,
        to: None,
        handover_at_s: f64::INFINITY,
        start_at_s: f64::INFINITY,
        x_s: 0.0,
        predicted_smt_s,
        window_s: 0.0,
        lead_limit_s: 0.0,
        reason,
    };
    let v = fix.speed;
    let Some(from) = road.serving_at(fix.position_m, v) else {
        return none(None, format!("no RSU serves position {:.1} m", fix.position_m));
    };
    let exit = road.exit_position_m(from, v);
    // The next RSU to serve the vehicle: the first past `from` whose exit point lies
    // beyond `from`'s (one whose coverage ends before it never serves the vehicle, as
    // `Road::serving_at` says), usually `from + 1`.
    let Some(to) = (from + 1..road.rsus().len()).find(|&j| road.exit_position_m(j, v) > exit)
    else {
        return none(Some(from), format!("{} is the last RSU", road.rsus()[from].name));
    };
    let handover_at_s = fix.time_s + (exit - fix.position_m).max(0.0) / v.mps();
    // Eq. 3's h̄ + N̄: on this road `to` serves the vehicle from `from`'s exit point (where
    // the handover starts) to its own, so its dwell already holds the handover; adding
    // h̄ again (`Convention::AsWritten`) granted the move seconds the vehicle is no longer
    // with `to`. This is the published tables' convention (window = NDD / v).
    let window_s = road.dwell_time_after_s(to, exit, v);
    let lead_limit_s = road.dwell_time_s(from, v);
    let names = (&road.rsus()[from].name, &road.rsus()[to].name);
    let (kind, x_s, reason) = match model::plan(predicted_smt_s, window_s, lead_limit_s, margin_s) {
        Plan::Reactive => (
            Kind::Reactive,
            0.0,
            format!(
                "SMT {predicted_smt_s:.3} s < h+N {window_s:.3} s of {}: start at the handover",
                names.1
            ),
        ),
        Plan::Proactive { x_s } => (
            Kind::Proactive,
            x_s,
            format!(
                "SMT {predicted_smt_s:.3} s >= h+N {window_s:.3} s of {}: start {x_s:.3} s ahead (< N {lead_limit_s:.3} s of {})",
                names.1, names.0
            ),
        ),
        Plan::CannotFit { x_s } => (
            Kind::CannotFit,
            x_s,
            format!(
                "lead {x_s:.3} s >= dwell {lead_limit_s:.3} s of {}: the move cannot fit; starting as early as possible",
                names.0
            ),
        ),
    };
    let start_at_s = (handover_at_s - x_s).max(fix.time_s);
    Decision {
        kind,
        from: Some(from),
        to: Some(to),
        handover_at_s,
        start_at_s,
        x_s,
        predicted_smt_s,
        window_s,
        lead_limit_s,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::super::road::RsuSite;
    use super::*;

    /// Three RSUs, 200 m segments, handover parameters 0 s so the arithmetic is by hand:
    /// RSU A covers [0, 200), B [200, 400), C [400, 600).
    fn road() -> Road {
        let rsus: Vec<_> =
            ["A", "B", "C"].iter().map(|n| (n.to_string(), 200.0, String::new())).collect();
        Road::from_dwell_distances(&rsus, 0.0, 0.0, 4.0).unwrap()
    }

    fn at(time_s: f64, position_m: f64, mps: f64) -> VehicleFix {
        VehicleFix { time_s, position_m, speed: Speed::from_mps(mps).unwrap() }
    }

    #[test]
    fn fits_reactively() {
        // 10 m/s at 50 m: handover at 200 m in 15 s; B's window = its dwell, 20 s (it serves
        // the vehicle from A's exit on: the handover is inside it, not 4 s on top).
        let d = decide(&road(), at(100.0, 50.0, 10.0), 5.0, 1.0);
        assert_eq!(d.kind, Kind::Reactive, "{d:?}");
        assert_eq!((d.from, d.to), (Some(0), Some(1)));
        assert_eq!(d.handover_at_s, 115.0);
        assert_eq!(d.start_at_s, 115.0);
        assert_eq!(d.window_s, 20.0);
        assert_eq!(d.x_s, 0.0);
    }

    #[test]
    fn needs_a_proactive_start() {
        // SMT 30 s > 20 s window: X = 10 + 1 margin = 11 s < A's dwell 20 s.
        let d = decide(&road(), at(100.0, 50.0, 10.0), 30.0, 1.0);
        assert_eq!(d.kind, Kind::Proactive, "{d:?}");
        assert_eq!(d.x_s, 11.0);
        assert_eq!(d.start_at_s, 104.0);
        assert!(d.reason.contains("ahead"), "{}", d.reason);
        // Reported late (2 s before the handover): start now, not in the past.
        let late = decide(&road(), at(100.0, 180.0, 10.0), 30.0, 1.0);
        assert_eq!(late.kind, Kind::Proactive);
        assert_eq!(late.start_at_s, 100.0);
    }

    #[test]
    fn cannot_fit() {
        // SMT 50 s: X = 30 + 1 = 31 s >= A's dwell 20 s.
        let d = decide(&road(), at(0.0, 50.0, 10.0), 50.0, 1.0);
        assert_eq!(d.kind, Kind::CannotFit, "{d:?}");
        assert_eq!(d.start_at_s, 0.0);
        assert!(d.reason.contains("cannot fit"));
    }

    #[test]
    fn no_move_past_the_last_handover_or_off_road() {
        let d = decide(&road(), at(0.0, 450.0, 10.0), 1.0, 0.0);
        assert_eq!((d.kind, d.from, d.to), (Kind::None, Some(2), None));
        let d = decide(&road(), at(0.0, -5.0, 10.0), 1.0, 0.0);
        assert_eq!((d.kind, d.from), (Kind::None, None));
    }

    #[test]
    fn faster_vehicles_get_smaller_windows() {
        let slow = decide(&road(), at(0.0, 50.0, 5.0), 15.0, 0.0);
        let fast = decide(&road(), at(0.0, 50.0, 20.0), 15.0, 0.0);
        assert_eq!(slow.kind, Kind::Reactive); // 40 > 15
        assert_eq!(fast.kind, Kind::Proactive); // 10 < 15: X = 5 < A's dwell 10
        assert_eq!(fast.x_s, 5.0);
    }

    #[test]
    fn handover_uses_the_exit_radius() {
        // T_EH = 2 s, R_H = 150: at 10 m/s R_E = 130, so the handover out of A starts at 230 m.
        let site = |n: &str, p: f64| RsuSite {
            name: n.into(),
            position_m: p,
            coverage_radius_m: 150.0,
            nms_address: String::new(),
        };
        let road = Road::new(vec![site("A", 100.0), site("B", 300.0)], 2.0, 2.0).unwrap();
        let d = decide(&road, at(0.0, 30.0, 10.0), 1.0, 0.0);
        assert_eq!(d.handover_at_s, 20.0);
    }

    /// An RSU whose coverage ends before the one serving the vehicle (nested coverage)
    /// never serves it: the next RSU is the one after it, as `Road::serving_at` says, with
    /// its dwell counted from the serving RSU's exit.
    #[test]
    fn an_rsu_nested_in_the_serving_ones_coverage_is_skipped() {
        let site = |name: &str, position_m: f64, coverage_radius_m: f64| RsuSite {
            name: name.into(),
            position_m,
            coverage_radius_m,
            nms_address: String::new(),
        };
        let road = Road::new(
            vec![site("A", 1000.0, 600.0), site("B", 1300.0, 200.0), site("C", 2000.0, 500.0)],
            0.0,
            0.0,
        )
        .unwrap();
        let d = decide(&road, at(0.0, 1200.0, 10.0), 1.0, 0.0);
        assert_eq!((d.from, d.to), (Some(0), Some(2)), "{d:?}");
        assert_eq!(road.serving_at(1700.0, Speed::from_mps(10.0).unwrap()), Some(2));
        // C serves from A's exit (1600 m) to its own (2500 m): 90 s at 10 m/s.
        assert!((d.window_s - 90.0).abs() < 1e-9, "{d:?}");
        assert_eq!(d.kind, Kind::Reactive);
    }
}
