//! wayside's testbed: the paper's vehicular model, the SMF, an emulated road, benchmarks.
//!
//! Code map:
//! - [`paper`]: `testbed paper`, Tables IV-VII from the paper's inputs (the equations are in
//!   `wayside_nms::smf::model`, shared with the SMF), with published-vs-computed departures.
//! - [`fcd`]: a strict reader of SUMO FCD traces (errors name the line).
//! - [`mobility`]: the road (RSUs placed by dwell distance; the A41 default), constant-speed
//!   and trace-driven vehicles.
//! - [`drive`]: `testbed drive`, a whole road on one machine (PSS, NMSs, SMF, vehicles) that
//!   checks every acknowledged write at the end and writes a Markdown/SVG report.
//! - [`bench`]: `testbed bench ...`, benchmarks against peers (not tests).

pub mod bench;
pub mod drive;
pub mod fcd;
pub mod mechanisms;
pub mod mobility;
pub mod netns;
pub mod paper;
pub mod shaper;
pub mod vmroad;
