//! Mobility: the road (RSUs placed by dwell distance; the paper's A41 testbed by default) and
//! where each vehicle is at a scenario time (constant speed, or a SUMO FCD trace). Pure.

use wayside_nms::smf::model::Speed;
use wayside_nms::smf::planner::VehicleFix;
use wayside_nms::smf::road::{Road, RoadError};

use crate::fcd::{self, FcdTrace};
use crate::paper::TABLE_IV;

/// Speeds below this are treated as this (the model divides by the speed; a stopped vehicle
/// is simply very slow), m/s.
pub const MIN_SPEED_MPS: f64 = 0.1;

/// The paper's A41 road: RSUs 1-7 with Table IV's dwell distances (m).
pub fn a41_rsus() -> Vec<(String, f64)> {
    TABLE_IV.iter().map(|(n, d, _, _)| (n.to_string(), *d)).collect()
}

/// Builds a road from `(name, dwell distance)` with NMS addresses (same order; empty
/// addresses allowed for pure use). See [`Road::from_dwell_distances`] for `overlap_m`.
pub fn road_from_dwell(
    rsus: &[(String, f64)],
    addresses: &[String],
    overlap_m: f64,
    handover_execution_s: f64,
    time_to_handover_s: f64,
) -> Result<Road, RoadError> {
    let spec: Vec<(String, f64, String)> = rsus
        .iter()
        .enumerate()
        .map(|(i, (n, d))| (n.clone(), *d, addresses.get(i).cloned().unwrap_or_default()))
        .collect();
    Road::from_dwell_distances(&spec, overlap_m, handover_execution_s, time_to_handover_s)
}

/// How a vehicle moves.
#[derive(Debug, Clone, PartialEq)]
pub enum Motion {
    /// From `start_m` at `depart_s`, at a constant speed.
    Constant { depart_s: f64, start_m: f64, speed: Speed },
    /// Samples `(time s, along-road position m, speed m/s)` in time order, interpolated.
    Trace(Vec<(f64, f64, f64)>),
}

impl Motion {
    /// Where the vehicle is at `t`: `None` before it departs or after its trace ends.
    pub fn at(&self, t: f64) -> Option<VehicleFix> {
        match self {
            Motion::Constant { depart_s, start_m, speed } => (t >= *depart_s).then(|| VehicleFix {
                time_s: t,
                position_m: start_m + speed.mps() * (t - depart_s),
                speed: *speed,
            }),
            Motion::Trace(s) => {
                let first = s.first()?;
                let last = s.last()?;
                if t < first.0 || t > last.0 {
                    return None;
                }
                let k = s.partition_point(|p| p.0 <= t).max(1);
                let (a, b) = (s[k - 1], *s.get(k).unwrap_or(&s[k - 1]));
                let f = if b.0 > a.0 { (t - a.0) / (b.0 - a.0) } else { 0.0 };
                let speed = (a.2 + f * (b.2 - a.2)).max(MIN_SPEED_MPS);
                Some(VehicleFix {
                    time_s: t,
                    position_m: a.1 + f * (b.1 - a.1),
                    speed: Speed::from_mps(speed).ok()?,
                })
            }
        }
    }

    /// When the vehicle has passed `position_m` (or its trace ends), for sizing a run.
    pub fn time_past(&self, position_m: f64) -> f64 {
        match self {
            Motion::Constant { depart_s, start_m, speed } => {
                depart_s + ((position_m - start_m) / speed.mps()).max(0.0)
            }
            Motion::Trace(s) => {
                s.iter().find(|p| p.1 >= position_m).or(s.last()).map_or(0.0, |p| p.0)
            }
        }
    }
}

/// A vehicle of a scenario.
#[derive(Debug, Clone, PartialEq)]
pub struct Vehicle {
    pub name: String,
    pub motion: Motion,
}

/// Vehicles of a SUMO FCD trace, positions unrolled along their paths, its clock shifted
/// so its first sample is at second 0 (SUMO traces often begin at, say, 25200: the drive
/// would wait that long, writing, before any vehicle moved). The vehicles keep their
/// times relative to each other.
pub fn vehicles_from_fcd(trace: &FcdTrace) -> Vec<Vehicle> {
    let first = trace
        .values()
        .filter_map(|samples| samples.first().map(|s| s.time_s))
        .fold(f64::INFINITY, f64::min);
    let shift = if first.is_finite() { first } else { 0.0 };
    trace
        .iter()
        .map(|(id, samples)| {
            let mut motion = fcd::along_road(samples);
            for m in &mut motion {
                m.0 -= shift;
            }
            Vehicle { name: id.clone(), motion: Motion::Trace(motion) }
        })
        .collect()
}

/// A handover seen by a vehicle: at `time_s` it goes from RSU `from` to RSU `to` (indices;
/// `None` = no coverage).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Handover {
    pub time_s: f64,
    pub from: Option<usize>,
    pub to: Option<usize>,
}

/// The handovers of `motion` on `road` between `t0` and `t1`, sampled every `step_s`.
pub fn handovers(road: &Road, motion: &Motion, t0: f64, t1: f64, step_s: f64) -> Vec<Handover> {
    let mut out = Vec::new();
    let mut serving: Option<Option<usize>> = None;
    let steps = ((t1 - t0) / step_s).ceil().max(0.0) as u64;
    for k in 0..=steps {
        let t = t0 + step_s * k as f64;
        let now = motion.at(t).and_then(|f| road.serving_at(f.position_m, f.speed));
        match serving {
            Some(prev) if prev != now => out.push(Handover { time_s: t, from: prev, to: now }),
            _ => {}
        }
        serving = Some(now);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a41() -> Road {
        road_from_dwell(&a41_rsus(), &[], 100.0, 2.0, 4.0).unwrap()
    }

    #[test]
    fn constant_speed_dwells_ndd_over_v_in_each_rsu() {
        let road = a41();
        let v = Speed::from_mph(30.0).unwrap();
        let m = Motion::Constant { depart_s: 0.0, start_m: 0.0, speed: v };
        let h = handovers(&road, &m, 0.0, 400.0, 0.001);
        let into: Vec<_> = h.iter().filter_map(|h| h.to.map(|to| (h.time_s, to))).collect();
        assert_eq!(into.iter().map(|x| x.1).collect::<Vec<_>>(), vec![1, 2, 3, 4, 5, 6]);
        // Dwell in RSU2..RSU6 = NDD / v: Table IV's 30 mph column (published convention).
        for (k, want) in [34.00, 38.55, 18.49, 72.63, 103.64].iter().enumerate() {
            let dwell = into[k + 1].0 - into[k].0;
            assert!((dwell - want).abs() < 0.01, "RSU{}: {dwell}", k + 2);
        }
        assert_eq!(h.last().unwrap().to, None, "leaves the road after RSU7");
    }

    #[test]
    fn trace_interpolates_and_ends() {
        let m = Motion::Trace(vec![(0.0, 0.0, 10.0), (1.0, 10.0, 10.0), (3.0, 50.0, 30.0)]);
        assert_eq!(m.at(-0.1), None);
        let f = m.at(2.0).unwrap();
        assert_eq!((f.position_m, f.speed.mps()), (30.0, 20.0));
        assert_eq!(m.at(3.0).unwrap().position_m, 50.0);
        assert_eq!(m.at(3.5), None);
        assert_eq!(m.time_past(25.0), 3.0);
        // A stopped vehicle is slow, not an error.
        let stop = Motion::Trace(vec![(0.0, 5.0, 0.0), (1.0, 5.0, 0.0)]);
        assert_eq!(stop.at(0.5).unwrap().speed.mps(), MIN_SPEED_MPS);
    }
}
