//! The service management framework (SMF): it knows the road, hears where vehicles are, and
//! moves their volumes between RSUs' NMSs in time (paper eqs. 3-7).
//!
//! - [`model`]: the paper's equations, pure functions (also used by `testbed paper`).
//! - [`road`]: the RSU map (positions, coverage radii, NMS addresses).
//! - [`estimate`]: the migration-time estimate that learns from measured moves.
//! - [`planner`]: one vehicle report -> next RSU, handover time, reactive/proactive/cannot fit.
//! - [`service`]: the `wayside.v1.Smf` gRPC service: plans, calls `NmsAdmin.StartMigration`,
//!   records moves.

pub mod estimate;
pub mod model;
pub mod planner;
pub mod road;
pub mod service;
