//! The paper's vehicular model (Ezenwigbo et al., COMM 2020, sections III and IV), as pure
//! functions: no I/O, no clock. Distances in metres, times in seconds, speeds in m/s.
//!
//! Vocabulary (paper section III):
//! - coverage (handover) radius `R_H` and exit radius `R_E` of a point of attachment (eqs. 1-2);
//! - time before handover `Υ`: from now until the vehicle reaches the exit radius;
//! - time to handover `h̄`: the handover must be complete within it, at most 4 s;
//! - network dwell time `N̄`: the time spent in the next network, network dwell distance (NDD) / speed;
//! - reactive migration fits when `h̄ + N̄ > SMT` (eqs. 3/6);
//! - proactive migration starts `X` seconds before the handover with `h̄ + N̄ > SMT - X`
//!   (eqs. 4/7) and `X < N̄` (eq. 5).

/// `h̄` is "set to a maximum value of 4 seconds" (paper section III).
pub const MAX_TIME_TO_HANDOVER_S: f64 = 4.0;
/// One mile per hour in metres per second (international mile: 1609.344 m / 3600 s).
pub const MPS_PER_MPH: f64 = 0.44704;
/// One kilometre per hour in metres per second.
pub const MPS_PER_KMH: f64 = 1.0 / 3.6;

/// A model input that makes no physical sense.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ModelError {
    /// A quantity that must be finite and > 0 was not.
    #[error("{what} must be a finite number > 0, got {value}")]
    NotPositive { what: &'static str, value: f64 },
    /// A quantity that must be finite and >= 0 was not.
    #[error("{what} must be a finite number >= 0, got {value}")]
    Negative { what: &'static str, value: f64 },
    /// `h̄` above the paper's 4 s maximum.
    #[error("time to handover must be at most {max} s, got {value} s")]
    TimeToHandoverTooLong { value: f64, max: f64 },
}

/// Checks that `value` is finite and > 0.
pub fn positive(what: &'static str, value: f64) -> Result<f64, ModelError> {
    if value.is_finite() && value > 0.0 {
        Ok(value)
    } else {
        Err(ModelError::NotPositive { what, value })
    }
}

/// Checks that `value` is finite and >= 0.
pub fn non_negative(what: &'static str, value: f64) -> Result<f64, ModelError> {
    if value.is_finite() && value >= 0.0 {
        Ok(value)
    } else {
        Err(ModelError::Negative { what, value })
    }
}

/// A vehicle's speed along the road, > 0.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct Speed(f64);

impl Speed {
    pub fn from_mps(mps: f64) -> Result<Self, ModelError> {
        positive("speed (m/s)", mps).map(Self)
    }
    pub fn from_mph(mph: f64) -> Result<Self, ModelError> {
        positive("speed (mph)", mph).map(|v| Self(v * MPS_PER_MPH))
    }
    pub fn from_kmh(kmh: f64) -> Result<Self, ModelError> {
        positive("speed (km/h)", kmh).map(|v| Self(v * MPS_PER_KMH))
    }
    pub fn mps(self) -> f64 {
        self.0
    }
    pub fn mph(self) -> f64 {
        self.0 / MPS_PER_MPH
    }
}

/// Eq. 2: the exit radius `R_E = R_H - v * T_EH`, where the handover must begin so that it
/// completes (taking `T_EH`) before the vehicle crosses the coverage radius `R_H`.
/// Negative means the coverage is too small to hand over at this speed.
pub fn exit_radius_m(coverage_radius_m: f64, speed: Speed, handover_execution_s: f64) -> f64 {
    coverage_radius_m - speed.mps() * handover_execution_s
}

/// Eq. 1: the longest handover execution time `T_EH = (R_H - R_E) / v` that fits between
/// the exit radius and the coverage radius.
pub fn max_handover_execution_s(coverage_radius_m: f64, exit_radius_m: f64, speed: Speed) -> f64 {
    (coverage_radius_m - exit_radius_m) / speed.mps()
}

/// Time before handover `Υ`: the vehicle is `distance_past_rsu_m` past its RSU (negative
/// while approaching it) and the handover starts at the exit radius. 0 once it is reached.
pub fn time_before_handover_s(distance_past_rsu_m: f64, exit_radius_m: f64, speed: Speed) -> f64 {
    ((exit_radius_m - distance_past_rsu_m) / speed.mps()).max(0.0)
}

/// Time to handover `h̄`: the handover execution time, capped at the paper's 4 s.
pub fn time_to_handover_s(handover_execution_s: f64) -> f64 {
    handover_execution_s.clamp(0.0, MAX_TIME_TO_HANDOVER_S)
}

/// Checks a configured `h̄` against the paper's bound.
pub fn validate_time_to_handover_s(value: f64) -> Result<f64, ModelError> {
    let v = non_negative("time to handover (s)", value)?;
    if v > MAX_TIME_TO_HANDOVER_S {
        return Err(ModelError::TimeToHandoverTooLong { value: v, max: MAX_TIME_TO_HANDOVER_S });
    }
    Ok(v)
}

/// Network dwell time `N̄ = NDD / v`.
pub fn dwell_time_s(dwell_distance_m: f64, speed: Speed) -> f64 {
    dwell_distance_m / speed.mps()
}

/// Network dwell distance: the road length travelled in `dwell_time_s` at `speed`.
pub fn dwell_distance_m(dwell_time_s: f64, speed: Speed) -> f64 {
    dwell_time_s * speed.mps()
}

/// Eqs. 3/6: a reactive migration (started at the handover) succeeds when
/// `h̄ + N̄ > SMT` (strictly: a migration that ends as the vehicle leaves is too late).
pub fn reactive_fits(smt_s: f64, window_s: f64) -> bool {
    window_s > smt_s
}

/// Eqs. 4/7: the proactive lead `X` such that `h̄ + N̄ > SMT - X` holds at its boundary:
/// `X = max(0, SMT - (h̄ + N̄))`. The inequality is strict, so any start at least this early
/// works; the paper's Table VI prints this boundary, and 0 means "no proactive lead needed".
pub fn proactive_x_s(smt_s: f64, window_s: f64) -> f64 {
    (smt_s - window_s).max(0.0)
}

/// Eq. 5: migration between adjacent RSUs needs `X < N̄` (it cannot start before the vehicle
/// has the current RSU's resources). Eq. 4 also asks `X <= SMT`, true for the boundary X.
pub fn adjacent_fits(x_s: f64, dwell_s: f64) -> bool {
    x_s < dwell_s
}

/// What to do for one handover, given the predicted service migration time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Plan {
    /// Start at the handover (eq. 3/6 holds).
    Reactive,
    /// Start `x_s` seconds before the handover (eqs. 4, 5, 7).
    Proactive { x_s: f64 },
    /// No start time works: the needed lead `x_s` is not below the dwell time (eq. 5 fails).
    CannotFit { x_s: f64 },
}

/// Decides reactive / proactive / cannot fit for a move taking `smt_s`, into a window of
/// `window_s` (`h̄ + N̄` of the next RSU), when the lead may be at most `lead_limit_s`
/// (the paper's eq. 5 uses `N̄`). `margin_s` is room for prediction error on both sides: a
/// reactive move must end `margin_s` before the window does, and a proactive lead is
/// `margin_s` longer than the boundary X (a move predicted just under the window got no
/// room, one just over it `margin_s`).
pub fn plan(smt_s: f64, window_s: f64, lead_limit_s: f64, margin_s: f64) -> Plan {
    if reactive_fits(smt_s + margin_s, window_s) {
        return Plan::Reactive;
    }
    let x_s = proactive_x_s(smt_s + margin_s, window_s);
    if adjacent_fits(x_s, lead_limit_s) {
        Plan::Proactive { x_s }
    } else {
        Plan::CannotFit { x_s }
    }
}

/// How the paper's published tables combine `h̄` and `N̄`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Convention {
    /// What the published Tables IV-VII hold: the column headed `h̄ + N̄` is NDD / v, i.e.
    /// `h̄` is not added (every cell of Table IV is NDD / v to 0.01 s, not NDD / v + 4 s).
    Published,
    /// The equations as written: window = `h̄ + N̄` = NDD / v + h̄.
    AsWritten,
}

impl Convention {
    /// The reactive window `h̄ + N̄` for an RSU with dwell distance `ndd_m`.
    pub fn window_s(self, ndd_m: f64, speed: Speed, time_to_handover_s: f64) -> f64 {
        let n = dwell_time_s(ndd_m, speed);
        match self {
            Convention::Published => n,
            Convention::AsWritten => n + time_to_handover_s,
        }
    }
}

#[cfg(test)]
mod tests {

    /// The margin protects both sides: a move predicted just under the window starts
    /// early enough to end `margin` before it, as one just over it does.
    #[test]
    fn the_margin_holds_for_reactive_moves_too() {
        assert_eq!(plan(18.9, 20.0, 100.0, 1.0), Plan::Reactive);
        match plan(19.5, 20.0, 100.0, 1.0) {
            Plan::Proactive { x_s } => assert!((x_s - 0.5).abs() < 1e-9, "{x_s}"),
            p => panic!("{p:?}"),
        }
        match plan(25.0, 20.0, 100.0, 1.0) {
            Plan::Proactive { x_s } => assert!((x_s - 6.0).abs() < 1e-9, "{x_s}"),
            p => panic!("{p:?}"),
        }
        assert_eq!(plan(19.5, 20.0, 100.0, 0.0), Plan::Reactive, "no margin: eq. 3 as is");
    }
    use super::*;

    fn mph(v: f64) -> Speed {
        Speed::from_mph(v).unwrap()
    }

    #[test]
    fn speed_conversions() {
        assert!((mph(30.0).mps() - 13.4112).abs() < 1e-12);
        assert!((mph(50.0).mps() - 22.352).abs() < 1e-12);
        assert!((Speed::from_kmh(36.0).unwrap().mps() - 10.0).abs() < 1e-12);
        assert!((mph(30.0).mph() - 30.0).abs() < 1e-12);
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(Speed::from_mps(bad).is_err(), "{bad}");
            assert!(Speed::from_mph(bad).is_err(), "{bad}");
            assert!(Speed::from_kmh(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn exit_radius_and_handover_execution_are_inverse() {
        let v = Speed::from_mps(20.0).unwrap();
        let re = exit_radius_m(300.0, v, 4.0);
        assert_eq!(re, 220.0);
        assert_eq!(max_handover_execution_s(300.0, re, v), 4.0);
        // Too fast for the coverage: negative exit radius, the caller must reject it.
        assert!(exit_radius_m(50.0, v, 4.0) < 0.0);
    }

    #[test]
    fn time_before_and_to_handover() {
        let v = Speed::from_mps(10.0).unwrap();
        assert_eq!(time_before_handover_s(-100.0, 200.0, v), 30.0);
        assert_eq!(time_before_handover_s(150.0, 200.0, v), 5.0);
        assert_eq!(time_before_handover_s(250.0, 200.0, v), 0.0);
        assert_eq!(time_to_handover_s(2.5), 2.5);
        assert_eq!(time_to_handover_s(9.0), MAX_TIME_TO_HANDOVER_S);
        assert!(validate_time_to_handover_s(4.0).is_ok());
        assert!(matches!(
            validate_time_to_handover_s(4.5),
            Err(ModelError::TimeToHandoverTooLong { .. })
        ));
        assert!(validate_time_to_handover_s(-1.0).is_err());
    }

    #[test]
    fn dwell_time_and_distance() {
        let v = mph(30.0);
        assert!((dwell_time_s(300.0, v) - 22.369_44).abs() < 1e-4);
        assert!((dwell_distance_m(dwell_time_s(974.0, v), v) - 974.0).abs() < 1e-9);
    }

    #[test]
    fn reactive_proactive_and_cannot_fit() {
        // Strict inequalities at the boundary.
        assert!(!reactive_fits(10.0, 10.0));
        assert!(reactive_fits(9.99, 10.0));
        assert_eq!(proactive_x_s(12.0, 10.0), 2.0);
        assert_eq!(proactive_x_s(8.0, 10.0), 0.0);
        assert!(!adjacent_fits(10.0, 10.0));
        assert_eq!(plan(5.0, 10.0, 10.0, 0.5), Plan::Reactive);
        assert_eq!(plan(15.0, 10.0, 10.0, 0.5), Plan::Proactive { x_s: 5.5 });
        assert_eq!(plan(25.0, 10.0, 10.0, 0.5), Plan::CannotFit { x_s: 15.5 });
    }

    #[test]
    fn conventions_differ_by_h_bar() {
        let v = mph(30.0);
        let p = Convention::Published.window_s(300.0, v, 4.0);
        let w = Convention::AsWritten.window_s(300.0, v, 4.0);
        assert!((w - p - 4.0).abs() < 1e-12);
    }
}
