//! The RSU map the SMF plans on: a straight road, RSUs at positions along it, each with a
//! coverage (handover) radius and the address of its NMS. Vehicles drive towards increasing
//! positions. Pure: no I/O.

use super::model::{self, ModelError, Speed};

/// One road-side unit.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RsuSite {
    pub name: String,
    /// Along the road, metres.
    pub position_m: f64,
    /// Coverage (handover) radius `R_H`, metres.
    pub coverage_radius_m: f64,
    /// Where this RSU's NMS listens (host:port or URI); may be empty in pure models.
    pub nms_address: String,
}

/// A road that does not make sense.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RoadError {
    #[error("the road has no RSU")]
    Empty,
    #[error("RSU #{index}: the name is empty")]
    EmptyName { index: usize },
    #[error("RSU name {name:?} appears twice")]
    DuplicateName { name: String },
    #[error("RSU {name:?}: {source}")]
    Bad { name: String, source: ModelError },
    #[error("RSUs must be listed in increasing position: {name:?} at {position_m} m comes after {previous:?}")]
    NotIncreasing { name: String, position_m: f64, previous: String },
    #[error("{0}")]
    Model(#[from] ModelError),
}

/// The SMF's map: RSUs sorted by position and the handover parameters.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Road {
    rsus: Vec<RsuSite>,
    /// `T_EH`: how long a handover takes to execute, seconds.
    handover_execution_s: f64,
    /// `h̄`: at most 4 s. Validated and reported only: on this road the next RSU's dwell
    /// starts at the previous one's exit point, so it already holds the handover, and the
    /// planner adds no `h̄` to it (see `planner::decide`, the published convention).
    time_to_handover_s: f64,
}

impl Road {
    /// Validates and builds a road.
    pub fn new(
        rsus: Vec<RsuSite>,
        handover_execution_s: f64,
        time_to_handover_s: f64,
    ) -> Result<Self, RoadError> {
        if rsus.is_empty() {
            return Err(RoadError::Empty);
        }
        for (index, r) in rsus.iter().enumerate() {
            if r.name.is_empty() {
                return Err(RoadError::EmptyName { index });
            }
            if rsus[..index].iter().any(|o| o.name == r.name) {
                return Err(RoadError::DuplicateName { name: r.name.clone() });
            }
            let bad = |source| RoadError::Bad { name: r.name.clone(), source };
            if !r.position_m.is_finite() {
                return Err(bad(ModelError::NotPositive {
                    what: "position (m)",
                    value: r.position_m,
                }));
            }
            model::positive("coverage radius (m)", r.coverage_radius_m).map_err(bad)?;
            if index > 0 && r.position_m <= rsus[index - 1].position_m {
                return Err(RoadError::NotIncreasing {
                    name: r.name.clone(),
                    position_m: r.position_m,
                    previous: rsus[index - 1].name.clone(),
                });
            }
        }
        model::non_negative("handover execution time (s)", handover_execution_s)?;
        model::validate_time_to_handover_s(time_to_handover_s)?;
        Ok(Self { rsus, handover_execution_s, time_to_handover_s })
    }

    /// Places RSUs one after another from position 0 so that each one but the first serves
    /// exactly its dwell distance (the paper's NDD) at every speed (the first serves from
    /// its coverage's start, `overlap_m` before 0, to its exit point): RSU i sits in the middle of its
    /// segment with `R_H = NDD/2 + overlap_m`, so the handover out of every RSU starts the
    /// same distance (`overlap_m - v*T_EH`) past its segment's end. `overlap_m` must cover
    /// `v * T_EH` at the fastest speed driven, or the exit radius falls short of the segment.
    pub fn from_dwell_distances(
        rsus: &[(String, f64, String)],
        overlap_m: f64,
        handover_execution_s: f64,
        time_to_handover_s: f64,
    ) -> Result<Self, RoadError> {
        model::non_negative("coverage overlap (m)", overlap_m)?;
        let mut start = 0.0;
        let mut sites = Vec::with_capacity(rsus.len());
        for (name, ndd, address) in rsus {
            model::positive("dwell distance (m)", *ndd)
                .map_err(|source| RoadError::Bad { name: name.clone(), source })?;
            sites.push(RsuSite {
                name: name.clone(),
                position_m: start + ndd / 2.0,
                coverage_radius_m: ndd / 2.0 + overlap_m,
                nms_address: address.clone(),
            });
            start += ndd;
        }
        Self::new(sites, handover_execution_s, time_to_handover_s)
    }

    pub fn rsus(&self) -> &[RsuSite] {
        &self.rsus
    }
    pub fn handover_execution_s(&self) -> f64 {
        self.handover_execution_s
    }
    pub fn time_to_handover_s(&self) -> f64 {
        self.time_to_handover_s
    }
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.rsus.iter().position(|r| r.name == name)
    }

    /// Where on the road the handover out of RSU `i` starts at `speed`: its exit radius
    /// (eq. 2) past its position.
    pub fn exit_position_m(&self, i: usize, speed: Speed) -> f64 {
        let r = &self.rsus[i];
        r.position_m + model::exit_radius_m(r.coverage_radius_m, speed, self.handover_execution_s)
    }

    /// Where RSU `i`'s coverage begins.
    pub fn entry_position_m(&self, i: usize) -> f64 {
        self.rsus[i].position_m - self.rsus[i].coverage_radius_m
    }

    /// Where the vehicle starts being served by RSU `i` at `speed`: the previous RSU's
    /// exit point, or the start of RSU `i`'s coverage for the first one.
    pub fn serve_start_m(&self, i: usize, speed: Speed) -> f64 {
        if i == 0 {
            self.entry_position_m(0)
        } else {
            self.exit_position_m(i - 1, speed)
        }
    }

    /// The RSU serving a vehicle at `position_m` driving at `speed`: the vehicle stays with an
    /// RSU until it reaches that RSU's exit radius, then hands over to the next one.
    /// `None` before the first coverage and past the last RSU's exit point.
    pub fn serving_at(&self, position_m: f64, speed: Speed) -> Option<usize> {
        if position_m < self.entry_position_m(0) {
            return None;
        }
        (0..self.rsus.len()).find(|&i| position_m < self.exit_position_m(i, speed))
    }

    /// Network dwell distance of RSU `i` at `speed`: from handover in to handover out.
    pub fn dwell_distance_m(&self, i: usize, speed: Speed) -> f64 {
        (self.exit_position_m(i, speed) - self.serve_start_m(i, speed)).max(0.0)
    }

    /// The dwell time of RSU `i` for a vehicle handed over to it at `from_m` (the exit
    /// point of the RSU that served the vehicle before): `N̄` of RSU `i` when that is RSU
    /// `i - 1` (whose exit point is where RSU `i`'s service starts), from `from_m` when
    /// RSUs between, whose coverage ends before it, were skipped.
    pub fn dwell_time_after_s(&self, i: usize, from_m: f64, speed: Speed) -> f64 {
        let distance = (self.exit_position_m(i, speed) - from_m).max(0.0);
        model::dwell_time_s(distance, speed)
    }

    /// Network dwell time `N̄` of RSU `i` at `speed`.
    pub fn dwell_time_s(&self, i: usize, speed: Speed) -> f64 {
        model::dwell_time_s(self.dwell_distance_m(i, speed), speed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn a41(overlap_m: f64) -> Road {
        let ndd = [300.0, 456.0, 517.0, 248.0, 974.0, 1390.0, 1140.0];
        let rsus: Vec<_> = ndd
            .iter()
            .enumerate()
            .map(|(i, d)| (format!("RSU{}", i + 1), *d, String::new()))
            .collect();
        Road::from_dwell_distances(&rsus, overlap_m, 2.0, 4.0).unwrap()
    }

    #[test]
    fn dwell_distances_are_the_ndds_at_every_speed() {
        let road = a41(100.0);
        for mph in [10.0, 30.0, 50.0] {
            let v = Speed::from_mph(mph).unwrap();
            for (i, want) in [456.0, 517.0, 248.0, 974.0, 1390.0, 1140.0].iter().enumerate() {
                let got = road.dwell_distance_m(i + 1, v);
                assert!((got - want).abs() < 1e-9, "{mph} mph RSU{}: {got}", i + 2);
            }
        }
    }

    #[test]
    fn serving_rsu_follows_exit_radius() {
        let road = a41(100.0);
        let v = Speed::from_mps(20.0).unwrap();
        // RSU1 covers [0, 300): R_H = 250, exit radius 250 - 40 = 210 past 150 -> 360.
        assert_eq!(road.exit_position_m(0, v), 360.0);
        assert_eq!(road.serving_at(-101.0, v), None);
        assert_eq!(road.serving_at(0.0, v), Some(0));
        assert_eq!(road.serving_at(359.9, v), Some(0));
        assert_eq!(road.serving_at(360.0, v), Some(1));
        assert_eq!(road.serving_at(1e6, v), None);
    }

    #[test]
    fn bad_roads_are_rejected() {
        let site = |name: &str, p: f64, r: f64| RsuSite {
            name: name.into(),
            position_m: p,
            coverage_radius_m: r,
            nms_address: String::new(),
        };
        assert_eq!(Road::new(vec![], 1.0, 4.0), Err(RoadError::Empty));
        assert!(matches!(
            Road::new(vec![site("a", 0.0, 10.0), site("a", 5.0, 10.0)], 1.0, 4.0),
            Err(RoadError::DuplicateName { .. })
        ));
        assert!(matches!(
            Road::new(vec![site("a", 10.0, 10.0), site("b", 5.0, 10.0)], 1.0, 4.0),
            Err(RoadError::NotIncreasing { .. })
        ));
        assert!(matches!(
            Road::new(vec![site("a", 10.0, 0.0)], 1.0, 4.0),
            Err(RoadError::Bad { .. })
        ));
        assert!(Road::new(vec![site("a", 10.0, 5.0)], 1.0, 4.5).is_err());
        assert!(matches!(
            Road::new(vec![site("", 10.0, 5.0)], 1.0, 4.0),
            Err(RoadError::EmptyName { index: 0 })
        ));
    }
}
