//! The SMF gRPC service (`wayside.v1.Smf`): holds the road, plans each reported vehicle's next
//! move with [`planner`](super::planner), starts due moves by calling
//! `NmsAdmin.StartMigration` on the source NMS, records every move and learns its migration
//! time from them.
//!
//! Time: vehicles report in scenario seconds; `time_scale` scenario seconds pass per wall
//! second (the testbed compresses time). The SMF maps wall instants to each vehicle's scenario
//! clock from its latest report, and learns migration times in wall seconds.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::{Request, Response, Status};
use tracing::{info, info_span, warn, Instrument as _};
use wayside_proto::pb;
use wayside_proto::types::{Credential, CredentialHash, Endpoint};

use super::estimate::{EstimatorConfig, SmtEstimator};
use super::model::Speed;
use super::planner::{self, Kind, VehicleFix};
use super::road::{Road, RsuSite};

/// SMF settings; every limit named with its unit.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SmfConfig {
    /// Scenario seconds per wall second (1 for real roads; > 1 compresses time).
    pub time_scale: f64,
    /// Added to every proactive lead, scenario seconds.
    pub margin_s: f64,
    /// How often due moves are started, milliseconds.
    pub tick_ms: u64,
    /// Moves kept for ListMoves (oldest dropped first).
    pub max_move_records: usize,
    /// Moves in flight at once; due moves beyond wait for a slot.
    pub max_concurrent_moves: usize,
    /// Credential checks (a report of a volume not checked yet, each asking NMSs of the
    /// road) in flight at once; reports beyond get RESOURCE_EXHAUSTED (reports are
    /// unauthenticated until checked: this bounds the load they can put on the NMSs).
    pub max_concurrent_credential_checks: usize,
    /// Longest one StartMigration call may take, milliseconds.
    pub migration_rpc_timeout_ms: u64,
    /// After a StartMigration whose outcome the SMF did not hear (the call timed out or
    /// failed once sent: the move may have gone on at the NMSs), how long the SMF asks the
    /// move's two NMSs where the volume ended up, milliseconds (the volume's RSU stays
    /// what it was if they do not tell in time).
    pub locate_wait_ms: u64,
    /// After a failed move, a volume's next move waits this long, in wall milliseconds,
    /// doubling with each failure in a row up to 64 times it (a move failing late would
    /// otherwise be started again at every report, pre-copy and all). 0: no wait.
    pub move_retry_backoff_ms: u64,
    /// Vehicles tracked at once (RESOURCE_EXHAUSTED beyond, once no tracked vehicle has been
    /// silent for `idle_forget_ms`).
    pub max_vehicles: usize,
    /// Volumes tracked at once (the same).
    pub max_volumes: usize,
    /// Vehicles (distinct vehicle ids, not silent for `idle_forget_ms`) reporting one
    /// volume at once; another is refused RESOURCE_EXHAUSTED. A volume is one vehicle's:
    /// this keeps one credential holder from filling `max_vehicles` with made-up ids.
    pub max_vehicles_per_volume: usize,
    /// A vehicle (or a volume not moving) silent this long, in wall milliseconds, is
    /// forgotten when room is needed for a new one.
    pub idle_forget_ms: u64,
    pub estimator: EstimatorConfig,
    /// The NMSs' cluster token, presented on StartMigration and required on SetRoad (None:
    /// neither).
    pub cluster_token: Option<wayside_proto::token::ClusterToken>,
    /// TLS (`[tls]`: `cert`, `key`, `ca`): with `cert` and `key` the SMF serves over TLS
    /// only (asking callers for no certificate: vehicles report to it); with `ca` it dials
    /// the NMSs over TLS only, whatever scheme the road's addresses have (a TLS set-up
    /// needs `ca`). Unset: plaintext.
    pub tls: wayside_proto::tls::TlsFiles,
    /// How long a connection has to finish its TLS handshake (served over TLS only), in
    /// milliseconds: a caller that connects and sends nothing holds a task no longer.
    pub tls_handshake_timeout_ms: u64,
    /// Longest wait to connect to an NMS (the TCP connect and, over TLS, the handshake), in
    /// milliseconds: an NMS that accepts connections and never answers (a stopped process,
    /// a paused VM) holds a move, its slot of `max_concurrent_moves`, a locate and the
    /// SMF's shutdown no longer.
    pub nms_connect_timeout_ms: u64,
    /// Largest request the SMF service decodes, in bytes (a vehicle's report is a few
    /// hundred; a road of thousands of RSUs fits): callers need no credential to send one,
    /// and each is held whole before it is looked at.
    pub max_request_bytes: usize,
    /// Most calls open at once on one connection, in calls (HTTP/2 streams).
    pub max_concurrent_streams: u32,
    /// Most RSUs a road may have, in RSUs (SetRoad past it: INVALID_ARGUMENT); the SMF's
    /// reports, moves and surveys do work per RSU.
    pub max_rsus: usize,
    /// Most connections open at once (vehicles' reports, operators), in connections; one
    /// past it is closed as soon as it is accepted. Each reporting vehicle keeps one open:
    /// keep it above `max_vehicles` and below the process's open-file limit.
    pub max_connections: usize,
    /// Most connections open at once from one source address, in connections (at most
    /// `max_connections`; larger acts as it): one host cannot take every slot from the
    /// road's vehicles. Callers behind one address (vehicles behind a NAT, every host
    /// connection to a VM on QEMU user-mode networking, a loopback testbed) share it; a
    /// host with many IPv4 addresses gets it once per address; IPv6 sources count by /64.
    pub max_connections_per_source: usize,
    /// HTTP/2 PING sent on a connection after this long without a frame from the peer, in
    /// milliseconds (0: never): a vehicle gone out of range without closing its connection
    /// would otherwise hold it (and its slot of `max_connections`) until TCP gives up.
    pub http2_keepalive_interval_ms: u64,
    /// A connection whose PING goes unanswered this long is closed, in milliseconds.
    pub http2_keepalive_timeout_ms: u64,
    /// A connection whose peer has sent nothing this long is closed, in milliseconds (0:
    /// never): a caller that connects and never speaks HTTP/2 would otherwise hold one of
    /// `max_connections` for good. With keepalive on it must exceed
    /// `http2_keepalive_interval_ms` plus `http2_keepalive_timeout_ms`; with keepalive off,
    /// a caller that sends nothing this long is cut even with a call open (an idle client
    /// then connects anew at its next call).
    pub silent_connection_timeout_ms: u64,
}

/// Default `max_connections` of the SMF: `max_vehicles` (10000) reporting at once, and
/// operators, in connections.
pub const DEFAULT_SMF_MAX_CONNECTIONS: usize = 10_240;
/// Default `max_connections_per_source` of the SMF, in connections.
pub const DEFAULT_SMF_MAX_CONNECTIONS_PER_SOURCE: usize = 1_024;

impl Default for SmfConfig {
    fn default() -> Self {
        Self {
            time_scale: 1.0,
            margin_s: 1.0,
            tick_ms: 10,
            max_move_records: 10_000,
            max_concurrent_moves: 16,
            max_concurrent_credential_checks: 16,
            migration_rpc_timeout_ms: 60_000,
            locate_wait_ms: 10_000,
            move_retry_backoff_ms: 500,
            max_vehicles: 10_000,
            max_volumes: 10_000,
            max_vehicles_per_volume: 4,
            idle_forget_ms: 600_000,
            estimator: EstimatorConfig::default(),
            cluster_token: None,
            tls: wayside_proto::tls::TlsFiles::default(),
            tls_handshake_timeout_ms: 5_000,
            nms_connect_timeout_ms: 5_000,
            max_request_bytes: 1 << 20,
            max_concurrent_streams: 64,
            max_rsus: 1024,
            max_connections: DEFAULT_SMF_MAX_CONNECTIONS,
            max_connections_per_source: DEFAULT_SMF_MAX_CONNECTIONS_PER_SOURCE,
            http2_keepalive_interval_ms: wayside_proto::server::HTTP2_KEEPALIVE_INTERVAL_MS,
            http2_keepalive_timeout_ms: wayside_proto::server::HTTP2_KEEPALIVE_TIMEOUT_MS,
            silent_connection_timeout_ms: wayside_proto::server::SILENT_CONNECTION_TIMEOUT_MS,
        }
    }
}

impl SmfConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.time_scale.is_finite() && self.time_scale > 0.0) {
            return Err(format!("time_scale must be > 0, got {}", self.time_scale));
        }
        if !(self.margin_s.is_finite() && self.margin_s >= 0.0) {
            return Err(format!("margin_s must be >= 0, got {}", self.margin_s));
        }
        if self.tick_ms == 0
            || self.max_concurrent_moves == 0
            || self.max_concurrent_credential_checks == 0
            || self.max_move_records == 0
            || self.max_vehicles == 0
            || self.max_volumes == 0
            || self.max_vehicles_per_volume == 0
            || self.migration_rpc_timeout_ms == 0
            || self.tls_handshake_timeout_ms == 0
            || self.nms_connect_timeout_ms == 0
            || self.max_request_bytes == 0
            || self.max_concurrent_streams == 0
            || self.max_rsus == 0
            || self.max_connections == 0
            || self.max_connections_per_source == 0
        {
            return Err("tick_ms, max_concurrent_moves, max_move_records, max_vehicles, \
                        max_volumes, max_vehicles_per_volume, migration_rpc_timeout_ms, \
                        tls_handshake_timeout_ms, nms_connect_timeout_ms, max_request_bytes, \
                        max_concurrent_streams, max_rsus, max_connections and \
                        max_connections_per_source must be > 0"
                .into());
        }
        self.silence_limit()?;
        Ok(())
    }

    /// How long a connection may stay silent (`silent_connection_timeout_ms`; None: for
    /// ever), checked against the keepalive settings.
    pub fn silence_limit(&self) -> Result<Option<Duration>, String> {
        wayside_proto::server::silence_limit(
            self.silent_connection_timeout_ms,
            self.http2_keepalive_interval_ms,
            self.http2_keepalive_timeout_ms,
        )
    }
}

/// A StartMigration that did not report: `sent` once the source may have started the move.
#[derive(Debug)]
struct CallError {
    sent: bool,
    message: String,
}

/// Each CheckCredential call of [`Smf::check_credential`].
const CHECK_CREDENTIAL_TIMEOUT: Duration = Duration::from_secs(2);
/// The most NMSs [`Smf::check_credential`] asks before giving up.
const CHECK_CREDENTIAL_MAX_NMSS: usize = 3;

fn unauthenticated(volume: &str) -> Status {
    Status::unauthenticated(format!("wrong credential for volume {volume}"))
}

/// The speed a stopped vehicle's report (speed 0) is planned with, only to find the RSU
/// serving its position (an exit radius of its handover radius), in metres per second.
const STOPPED_MPS: f64 = 1e-6;
/// Most bytes of a vehicle id in a report.
pub const MAX_VEHICLE_ID_BYTES: usize = 128;

/// A reported speed that counts as stopped: 0, or below `STOPPED_MPS` (a speed of 1e-300
/// m/s plans a handover at infinity).
fn is_stopped(mps: f64) -> bool {
    (0.0..STOPPED_MPS).contains(&mps)
}

/// Each NodeStatus call of [`Smf::locate`].
const LOCATE_CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// [`Smf::locate`] asks again after this, doubling up to [`LOCATE_MAX_PAUSE`].
const LOCATE_FIRST_PAUSE: Duration = Duration::from_millis(10);
const LOCATE_MAX_PAUSE: Duration = Duration::from_millis(500);

/// A vehicle's scenario clock: `time_s` was reported at wall instant `at`.
#[derive(Debug, Clone, Copy)]
struct Clock {
    at: Instant,
    time_s: f64,
    scale: f64,
}

impl Clock {
    fn scenario(&self, wall: Instant) -> f64 {
        self.time_s + wall.saturating_duration_since(self.at).as_secs_f64() * self.scale
    }
    fn wall(&self, scenario_s: f64) -> Instant {
        let ahead = ((scenario_s - self.time_s) / self.scale).max(0.0);
        self.at + Duration::from_secs_f64(ahead.min(1e6))
    }
}

#[derive(Debug, Clone)]
struct Pending {
    vehicle: String,
    /// The road (`State::road_gen`) `from` and `to` index.
    road_gen: u64,
    from: usize,
    to: usize,
    kind: Kind,
    planned_start_s: f64,
    due: Instant,
    predicted_smt_s: f64,
    /// The volume bytes the prediction was made for (the report's cached bytes): what a
    /// completed move's time is learnt against, so the estimate predicts from what it
    /// learns from (a move's bytes moved count blocks sent again in later rounds too).
    planned_bytes: u64,
    clock: Clock,
}

#[derive(Debug, Default)]
struct VolumeState {
    /// The RSU whose NMS holds the volume (as far as the SMF knows).
    at: Option<usize>,
    moving: bool,
    pending: Option<Pending>,
    /// When its vehicle last reported it.
    last: Option<Instant>,
    /// The hash of the credential a report proved to be the volume's (checked with an
    /// NMS of the road once; later reports must present the same).
    credential: Option<CredentialHash>,
    /// When the report the volume's plan comes from was received: a report received
    /// earlier that reaches the planner later (its credential check took longer) is
    /// older news and changes nothing.
    planned_from: Option<Instant>,
    /// Moves of it that failed in a row, and when the next may start
    /// (`move_retry_backoff_ms`).
    failures: u32,
    retry_at: Option<Instant>,
}

struct State {
    road: Option<(Road, pb::Road)>,
    /// Bumped by every SetRoad: a move started on an older road changes nothing when it
    /// ends (its RSU indices mean nothing on the new one).
    road_gen: u64,
    estimator: SmtEstimator,
    volumes: HashMap<String, VolumeState>,
    /// Each tracked vehicle's last report, and the volume it reported.
    vehicles: HashMap<String, (Instant, String)>,
    moves: VecDeque<pb::MoveRecord>,
    in_flight: usize,
}

/// The SMF: cheap to clone (shared state).
#[derive(Clone)]
pub struct Smf {
    cfg: Arc<SmfConfig>,
    state: Arc<Mutex<State>>,
    tracker: TaskTracker,
    stop: CancellationToken,
    /// `max_concurrent_credential_checks` permits.
    checks: Arc<tokio::sync::Semaphore>,
    /// `cfg.tls` loaded: the NMSs are dialled over TLS with it; with an identity the SMF
    /// serves over TLS.
    tls: Option<wayside_proto::tls::Tls>,
    /// Unit tests without NMSs: the credential every volume has (no NMS is asked).
    #[cfg(test)]
    test_credential: Option<CredentialHash>,
}

fn kind_pb(k: Kind) -> pb::MoveKind {
    match k {
        Kind::None => pb::MoveKind::None,
        Kind::Reactive => pb::MoveKind::Reactive,
        Kind::Proactive => pb::MoveKind::Proactive,
        Kind::CannotFit => pb::MoveKind::CannotFit,
    }
}

/// Wire road -> domain road (INVALID_ARGUMENT on nonsense).
fn road_of(r: &pb::Road) -> Result<Road, Status> {
    let rsus = r
        .rsus
        .iter()
        .map(|s| RsuSite {
            name: s.name.clone(),
            position_m: s.position_m,
            coverage_radius_m: s.coverage_radius_m,
            nms_address: s.nms_address.clone(),
        })
        .collect();
    let road = Road::new(rsus, r.handover_execution_s, r.time_to_handover_s)
        .map_err(|e| Status::invalid_argument(format!("road: {e}")))?;
    for s in road.rsus() {
        Endpoint::parse(&s.nms_address)
            .map_err(|e| Status::invalid_argument(format!("RSU {:?} nms_address: {e}", s.name)))?;
    }
    Ok(road)
}

impl Smf {
    /// A new SMF; its move starter runs until `stop` fires (see [`Smf::run_ticker`]).
    pub fn new(cfg: SmfConfig, stop: CancellationToken) -> Result<Self, String> {
        cfg.validate()?;
        let tls = wayside_proto::tls::Tls::load(&cfg.tls).map_err(|e| format!("TLS: {e}"))?;
        if tls.as_ref().is_some_and(|t| !t.has_ca()) {
            return Err("TLS: tls.ca is needed: an SMF set up for TLS dials the NMSs over TLS \
                        only, trusting the road's CA"
                .into());
        }
        // The CA alone would serve vehicles in plaintext, their reports carrying their
        // volumes' credentials.
        if tls.as_ref().is_some_and(|t| !t.has_identity()) {
            return Err("TLS: tls.ca without tls.cert and tls.key: the SMF would serve in \
                        plaintext, vehicles' credentials in the clear (set all three, or none)"
                .into());
        }
        let estimator = SmtEstimator::new(cfg.estimator);
        let max_checks = cfg.max_concurrent_credential_checks;
        Ok(Self {
            cfg: Arc::new(cfg),
            state: Arc::new(Mutex::new(State {
                road: None,
                estimator,
                volumes: HashMap::new(),
                vehicles: HashMap::new(),
                road_gen: 0,
                moves: VecDeque::new(),
                in_flight: 0,
            })),
            tracker: TaskTracker::new(),
            stop,
            checks: Arc::new(tokio::sync::Semaphore::new(max_checks)),
            tls,
            #[cfg(test)]
            test_credential: None,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain data; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The learnt estimate (for reports).
    pub fn estimator(&self) -> SmtEstimator {
        self.lock().estimator.clone()
    }

    /// Plans for one report; schedules the move it implies.
    /// A vehicle's report: checks that it holds the volume's credential (with an NMS of
    /// the road the first time: a caller naming another vehicle's volume must not move
    /// it), then plans the volume's next move.
    pub async fn report(&self, r: &pb::VehicleReport) -> Result<pb::MoveDecision, Status> {
        // The report's `time_s` is now: its scenario clock is anchored here, not after the
        // credential check (up to seconds for a first report), which would plan it late.
        let received = Instant::now();
        if r.vehicle.is_empty() || r.volume.is_empty() {
            return Err(Status::invalid_argument("vehicle and volume are required"));
        }
        // Kept per vehicle, in every move record and in ListMoves' replies.
        if r.vehicle.len() > MAX_VEHICLE_ID_BYTES {
            return Err(Status::invalid_argument(format!(
                "vehicle id of {} bytes: at most {MAX_VEHICLE_ID_BYTES} (MAX_VEHICLE_ID_BYTES)",
                r.vehicle.len()
            )));
        }
        wayside_proto::convert::volume_name(&r.volume)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        // All of it checked before any NMS is asked about the credential. A stopped
        // vehicle (0, a red light) is planned no move until it moves again (its pending
        // one is dropped); its position still says which RSU serves it.
        let stopped = is_stopped(r.speed_mps);
        let speed = Speed::from_mps(if stopped { STOPPED_MPS } else { r.speed_mps })
            .map_err(|e| Status::invalid_argument(format!("speed_mps: {e}")))?;
        if !r.time_s.is_finite() || !r.position_m.is_finite() {
            return Err(Status::invalid_argument("time_s and position_m must be finite"));
        }
        let cred = Credential::new(r.credential.clone())
            .map_err(|e| Status::invalid_argument(format!("credential: {e}")))?;
        let hash = cred.hash();
        let (known, ask) = {
            let st = self.lock();
            let Some((road, _)) = &st.road else {
                return Err(Status::failed_precondition("no road: call SetRoad first"));
            };
            let vol = st.volumes.get(&r.volume);
            // The NMS holding the volume, the one serving the vehicle, then the others.
            let mut ask: Vec<String> = Vec::new();
            let first = [vol.and_then(|v| v.at), road.index_of(&r.serving_rsu)];
            for i in first.into_iter().flatten().chain(0..road.rsus().len()) {
                let a = &road.rsus()[i].nms_address;
                if !ask.contains(a) {
                    ask.push(a.clone());
                }
            }
            (vol.and_then(|v| v.credential), ask)
        };
        match known {
            Some(k) if k.matches(&cred) => {}
            Some(_) => return Err(unauthenticated(&r.volume)),
            None => self.check_credential(&ask, &r.volume, &r.credential).await?,
        }
        self.decide(r, speed, hash, received)
    }

    /// Asks the NMSs at `ask`, in order, whether `credential` is `volume`'s (the first
    /// that answers decides).
    async fn check_credential(
        &self,
        ask: &[String],
        volume: &str,
        credential: &str,
    ) -> Result<(), Status> {
        let Ok(_slot) = self.checks.clone().try_acquire_owned() else {
            return Err(Status::resource_exhausted(format!(
                "max_concurrent_credential_checks ({}) credential checks in flight",
                self.cfg.max_concurrent_credential_checks
            )));
        };
        #[cfg(test)]
        if let Some(h) = self.test_credential {
            let c = Credential::new(credential).expect("checked by the caller");
            return if h.matches(&c) { Ok(()) } else { Err(unauthenticated(volume)) };
        }
        let mut failures = Vec::new();
        for address in ask.iter().take(CHECK_CREDENTIAL_MAX_NMSS) {
            let mut client = match self.admin(address, CHECK_CREDENTIAL_TIMEOUT).await {
                Ok(c) => c,
                Err(e) => {
                    failures.push(e);
                    continue;
                }
            };
            let req = wayside_proto::token::request(
                self.cfg.cluster_token.as_ref(),
                pb::CheckCredentialRequest { volume: volume.into(), credential: credential.into() },
            );
            match client.check_credential(req).await {
                Ok(r) if r.get_ref().valid => return Ok(()),
                Ok(_) => return Err(unauthenticated(volume)),
                Err(s) if s.code() == tonic::Code::NotFound => {
                    return Err(Status::not_found(format!("volume {volume} does not exist")))
                }
                Err(s) if s.code() == tonic::Code::InvalidArgument => {
                    return Err(Status::invalid_argument(s.message().to_owned()))
                }
                Err(s) if s.code() == tonic::Code::Unauthenticated => failures
                    .push(format!("{address} refused the SMF's cluster token (is it the road's?)")),
                Err(s) => failures.push(format!("{address}: {}: {}", s.code(), s.message())),
            }
        }
        Err(Status::unavailable(format!(
            "could not check the volume's credential with an NMS of the road: {}",
            failures.join("; ")
        )))
    }

    /// Plans the next move of a reported volume (its report checked, `speed` parsed from
    /// it) whose credential `hash` is checked.
    fn decide(
        &self,
        r: &pb::VehicleReport,
        speed: Speed,
        hash: CredentialHash,
        received: Instant,
    ) -> Result<pb::MoveDecision, Status> {
        let now = Instant::now();
        let clock = Clock { at: received, time_s: r.time_s, scale: self.cfg.time_scale };
        let mut st = self.lock();
        let Some((road, _)) = st.road.clone() else {
            return Err(Status::failed_precondition("no road: call SetRoad first"));
        };
        let idle = Duration::from_millis(self.cfg.idle_forget_ms);
        let silent = |last: Instant| now.saturating_duration_since(last) >= idle;
        // A vehicle id new to this volume: at most `max_vehicles_per_volume` report it.
        if st.vehicles.get(&r.vehicle).is_none_or(|(_, vol)| *vol != r.volume) {
            let others = st
                .vehicles
                .values()
                .filter(|(last, vol)| *vol == r.volume && !silent(*last))
                .count();
            if others >= self.cfg.max_vehicles_per_volume {
                return Err(Status::resource_exhausted(format!(
                    "max_vehicles_per_volume ({}) vehicles report volume {} already",
                    self.cfg.max_vehicles_per_volume, r.volume
                )));
            }
        }
        if !st.vehicles.contains_key(&r.vehicle) && st.vehicles.len() >= self.cfg.max_vehicles {
            st.vehicles.retain(|_, (last, _)| !silent(*last));
            if st.vehicles.len() >= self.cfg.max_vehicles {
                return Err(Status::resource_exhausted(format!(
                    "max_vehicles ({}) vehicles tracked, none silent for idle_forget_ms ({} ms)",
                    self.cfg.max_vehicles, self.cfg.idle_forget_ms
                )));
            }
        }
        if !st.volumes.contains_key(&r.volume) && st.volumes.len() >= self.cfg.max_volumes {
            st.volumes.retain(|_, v| v.moving || v.last.is_none_or(|l| !silent(l)));
            if st.volumes.len() >= self.cfg.max_volumes {
                return Err(Status::resource_exhausted(format!(
                    "max_volumes ({}) volumes tracked, none silent for idle_forget_ms ({} ms)",
                    self.cfg.max_volumes, self.cfg.idle_forget_ms
                )));
            }
        }
        st.vehicles.insert(r.vehicle.clone(), (now, r.volume.clone()));
        let road_gen = st.road_gen;
        let planned_bytes = r.cached_bytes.max(r.dirty_bytes);
        let predicted_wall = st.estimator.predict_s(planned_bytes);
        let predicted = predicted_wall * self.cfg.time_scale;
        let fix = VehicleFix { time_s: r.time_s, position_m: r.position_m, speed };
        let mut d = planner::decide(&road, fix, predicted, self.cfg.margin_s);
        // The RSU after the serving one, stopped or not: a volume already there (a move
        // that finished before the vehicle stopped short of the handover) is ahead, not
        // behind, and is not moved back.
        let next = d.to;
        if is_stopped(r.speed_mps) {
            d = planner::Decision {
                kind: Kind::None,
                to: None,
                handover_at_s: f64::INFINITY,
                start_at_s: f64::INFINITY,
                x_s: 0.0,
                window_s: 0.0,
                reason: "the vehicle is stopped: no move until it moves again".into(),
                ..d
            };
        }
        let serving = road.index_of(&r.serving_rsu).or(d.from);
        let vol = st.volumes.entry(r.volume.clone()).or_default();
        vol.last = Some(now);
        vol.credential = Some(hash);
        let stale = vol.planned_from.is_some_and(|p| p > received);
        if vol.at.is_none() && !stale {
            vol.at = serving;
        }
        let mut reason = d.reason.clone();
        if stale {
            reason = format!(
                "{reason} (a report received later has been planned already: this one changes \
                 nothing)"
            );
        } else {
            vol.planned_from = Some(received);
        }
        if !vol.moving && !stale {
            vol.pending = None;
            match (vol.at, d.from, d.to) {
                // Behind: the vehicle is already served elsewhere; catch up now.
                (Some(at), Some(from), _) if at != from && Some(at) != next => {
                    reason = format!(
                        "volume is at {} but the vehicle is served by {}: moving now",
                        road.rsus()[at].name,
                        road.rsus()[from].name
                    );
                    vol.pending = Some(Pending {
                        vehicle: r.vehicle.clone(),
                        road_gen,
                        from: at,
                        to: from,
                        kind: Kind::Reactive,
                        planned_start_s: r.time_s,
                        due: now,
                        predicted_smt_s: predicted,
                        planned_bytes,
                        clock,
                    });
                }
                (Some(at), Some(from), Some(to)) if at == from && d.kind != Kind::None => {
                    vol.pending = Some(Pending {
                        vehicle: r.vehicle.clone(),
                        road_gen,
                        from,
                        to,
                        kind: d.kind,
                        planned_start_s: d.start_at_s,
                        due: clock.wall(d.start_at_s),
                        predicted_smt_s: predicted,
                        planned_bytes,
                        clock,
                    });
                }
                _ => {}
            }
            if let (Some(_), Some(t)) = (&vol.pending, vol.retry_at.filter(|t| *t > now)) {
                reason = format!(
                    "{reason} (its last {} move(s) failed: the next starts no sooner than {} ms \
                     from now, move_retry_backoff_ms)",
                    vol.failures,
                    (t - now).as_millis()
                );
            }
        }
        let name = |i: Option<usize>| i.map(|i| road.rsus()[i].name.clone()).unwrap_or_default();
        Ok(pb::MoveDecision {
            kind: kind_pb(d.kind).into(),
            from_rsu: name(d.from),
            to_rsu: name(d.to),
            handover_at_s: if d.handover_at_s.is_finite() { d.handover_at_s } else { 0.0 },
            start_at_s: if d.start_at_s.is_finite() { d.start_at_s } else { 0.0 },
            proactive_x_s: d.x_s,
            predicted_smt_s: d.predicted_smt_s,
            dwell_s: d.window_s,
            reason,
        })
    }

    /// Starts every due move (bounded by `max_concurrent_moves`).
    fn start_due(&self) {
        let now = Instant::now();
        let mut st = self.lock();
        let Some((road, _)) = st.road.clone() else { return };
        let slots = self.cfg.max_concurrent_moves.saturating_sub(st.in_flight);
        // The moves due longest first, when there are more than slots.
        let mut ready: Vec<(Instant, String)> = st
            .volumes
            .iter()
            .filter(|(_, v)| !v.moving && v.retry_at.is_none_or(|t| t <= now))
            .filter_map(|(name, v)| {
                v.pending.as_ref().filter(|p| p.due <= now).map(|p| (p.due, name.clone()))
            })
            .collect();
        ready.sort();
        let mut due: Vec<(String, Pending)> = Vec::new();
        for (_, volume) in ready.into_iter().take(slots) {
            let v = st.volumes.get_mut(&volume).expect("listed above");
            let p = v.pending.take().expect("listed above");
            v.moving = true;
            due.push((volume, p));
        }
        st.in_flight += due.len();
        drop(st);
        for (volume, p) in due {
            let smf = self.clone();
            let road = road.clone();
            let span = info_span!("smf_move", volume = %volume, vehicle = %p.vehicle);
            self.tracker.spawn(async move { smf.do_move(road, volume, p).await }.instrument(span));
        }
    }

    async fn do_move(&self, road: Road, volume: String, p: Pending) {
        // Gives the slot and the volume's `moving` back if this task ends before the record
        // below (a panic): the volume would never move again, and the slot be lost.
        let guard = MoveGuard { smf: self, volume: &volume, armed: true };
        let src = &road.rsus()[p.from];
        let dst = &road.rsus()[p.to];
        let start = Instant::now();
        let actual_start_s = p.clock.scenario(start);
        info!(from = %src.name, to = %dst.name, kind = ?p.kind, planned = p.planned_start_s, actual = actual_start_s, "move starting");
        let result = self.call_migrate(&src.nms_address, &volume, &dst.nms_address).await;
        let wall = start.elapsed().as_secs_f64();
        // An outcome the SMF did not hear: the move may have completed at the NMSs, and the
        // next move must start where the volume is, not where the SMF last saw it. When
        // the move's two NMSs cannot tell (the source unreachable, or not holding it: the
        // vehicle attached elsewhere after an NMS died, or a move the SMF never saw), the
        // whole road is asked, or every later move would start from the wrong NMS.
        // An abort is asked about too: one whose switch went out and whose take-back
        // failed leaves the volume possibly at the target (the source resolving it).
        let found = match &result {
            Ok(rep) if rep.outcome == pb::MigrationOutcome::Completed as i32 => None,
            Ok(_) => match self.locate(&road, &volume, p.from, p.to).await {
                Some(i) => Some(i),
                None => self.survey(&road, &volume).await,
            },
            Err(e) => {
                let near =
                    if e.sent { self.locate(&road, &volume, p.from, p.to).await } else { None };
                match near {
                    Some(i) => Some(i),
                    None => self.survey(&road, &volume).await,
                }
            }
        };
        let scale = self.cfg.time_scale;
        let mut rec = pb::MoveRecord {
            vehicle: p.vehicle.clone(),
            volume: volume.clone(),
            from_rsu: src.name.clone(),
            to_rsu: dst.name.clone(),
            kind: kind_pb(p.kind).into(),
            planned_start_s: p.planned_start_s,
            actual_start_s,
            end_s: p.clock.scenario(Instant::now()),
            predicted_smt_s: p.predicted_smt_s,
            measured_smt_s: wall * scale,
            ..Default::default()
        };
        let mut st = self.lock();
        match result {
            Ok(rep) if rep.outcome == pb::MigrationOutcome::Completed as i32 => {
                rec.ok = true;
                rec.bytes = rep.bytes_moved;
                rec.pause_ms = rep.pause_us as f64 / 1000.0;
                // Learnt from the size the source moved in its first round (every cached
                // block, counted as `VolumeInfo.cached_bytes` counts it, which is what
                // honest reports carry), not from the vehicle's report: a report's sizes
                // are the vehicle's word, and one vehicle must not skew every plan.
                let learnt = rep.rounds.first().map_or(p.planned_bytes, |r| {
                    r.bytes
                        .saturating_add(r.blocks.saturating_mul(crate::cache::ENTRY_OVERHEAD_BYTES))
                });
                st.estimator.observe(learnt, wall);
                info!(
                    bytes = rep.bytes_moved,
                    wall_ms = wall * 1e3,
                    pause_us = rep.pause_us,
                    "move done"
                );
            }
            Ok(rep) => {
                rec.error = format!("aborted: {}", rep.error);
                if let Some(i) = found.filter(|i| *i != p.from) {
                    rec.error += &format!("; the volume is at {} now", road.rsus()[i].name);
                }
                warn!(error = %rec.error, "move aborted");
            }
            Err(e) => {
                rec.error = e.message;
                match found {
                    Some(i) => {
                        rec.error += &format!("; the volume is at {} now", road.rsus()[i].name)
                    }
                    None => rec.error += "; no NMS of the road answered that it holds the volume",
                }
                warn!(error = %rec.error, "move failed");
            }
        }
        st.in_flight = st.in_flight.saturating_sub(1);
        guard.disarm();
        // (A move started on an older road ends with the volume's place unknown on the new
        // one: its vehicle's next report says.)
        let same_road = st.road_gen == p.road_gen;
        let backoff = Duration::from_millis(self.cfg.move_retry_backoff_ms);
        if let Some(v) = st.volumes.get_mut(&volume) {
            v.moving = false;
            if rec.ok {
                (v.failures, v.retry_at) = (0, None);
            } else {
                v.failures = v.failures.saturating_add(1);
                let wait = backoff * (1u32 << (v.failures - 1).min(6));
                v.retry_at = Some(Instant::now() + wait);
            }
            v.at = if !same_road {
                // A report on the new road during the move may have set a place from
                // before it: unknown until the next report.
                None
            } else if rec.ok {
                Some(p.to)
            } else {
                // Unknown (no NMS holds it, or none answered): where the vehicle's next
                // report says it is served, as for a volume first seen.
                found
            };
        }
        if st.moves.len() >= self.cfg.max_move_records {
            st.moves.pop_front();
        }
        st.moves.push_back(rec);
    }

    async fn call_migrate(
        &self,
        source: &str,
        volume: &str,
        target: &str,
    ) -> Result<pb::MigrationReport, CallError> {
        let unsent = |message: String| CallError { sent: false, message };
        let mut client = self
            .admin(source, Duration::from_millis(self.cfg.migration_rpc_timeout_ms))
            .await
            .map_err(unsent)?;
        let req = pb::StartMigrationRequest {
            volume: volume.to_string(),
            target_address: target.to_string(),
            ..Default::default()
        };
        let token = self.cfg.cluster_token.as_ref();
        tokio::select! {
            r = client.start_migration(wayside_proto::token::request(token, req)) => {
                r.map(|r| r.into_inner()).map_err(|s| CallError {
                    sent: true,
                    message: format!("StartMigration: {}: {}", s.code(), s.message()),
                })
            }
            () = self.stop.cancelled() => {
                Err(CallError { sent: true, message: "SMF stopping".into() })
            }
        }
    }

    /// An admin client of the NMS at `address`, each call bounded by `timeout`; over TLS
    /// when the SMF is set up for it (whatever scheme `address` has).
    async fn admin(
        &self,
        address: &str,
        timeout: Duration,
    ) -> Result<pb::nms_admin_client::NmsAdminClient<tonic::transport::Channel>, String> {
        let ep = Endpoint::parse(address).map_err(|e| format!("NMS address {address:?}: {e}"))?;
        // The whole connect, TLS handshake included (tonic's connect timeout covers the
        // TCP connect only, and its TLS handshake has none).
        let limit = Duration::from_millis(self.cfg.nms_connect_timeout_ms);
        let endpoint = wayside_proto::client::endpoint(&ep, self.tls.as_ref())
            .map_err(|e| format!("NMS address {address:?}: {e}"))?
            .connect_timeout(limit)
            .timeout(timeout);
        let connect = endpoint.connect();
        let channel = tokio::select! {
            r = tokio::time::timeout(limit, connect) => r
                .map_err(|_| {
                    format!(
                        "connecting to {address}: no connection within {} ms \
                         (nms_connect_timeout_ms)",
                        limit.as_millis()
                    )
                })?
                .map_err(|e| {
                    format!("connecting to {address}: {}", crate::client::connect_failure(&e).text)
                })?,
            () = self.stop.cancelled() => return Err("SMF stopping".into()),
        };
        Ok(pb::nms_admin_client::NmsAdminClient::new(channel))
    }

    /// The epoch at which the NMS at `address` holds `volume` and whether it is moving it
    /// out (`None`: it does not hold it; a volume it moved away is not listed), by its
    /// NodeStatus.
    async fn epoch_at(&self, address: &str, volume: &str) -> Result<Option<(u64, bool)>, String> {
        let mut client = self.admin(address, LOCATE_CALL_TIMEOUT).await?;
        let req = wayside_proto::token::request(
            self.cfg.cluster_token.as_ref(),
            pb::NodeStatusRequest {},
        );
        let s = client.node_status(req).await.map_err(|s| s.message().to_owned())?.into_inner();
        Ok(s.volume_info.iter().find(|v| v.volume == volume).map(|v| (v.epoch, v.migrating_out)))
    }

    /// Where `volume` is on the whole road: the RSU whose NMS holds it at the newest epoch
    /// (asked all at once, each within `LOCATE_CALL_TIMEOUT`; the road's RSUs bound them).
    /// `None`: no NMS that answered holds it.
    async fn survey(&self, road: &Road, volume: &str) -> Option<usize> {
        let asks = road.rsus().iter().map(|r| self.epoch_at(&r.nms_address, volume));
        let found = holder(futures::future::join_all(asks).await);
        info!(volume, at = ?found.map(|i| &road.rsus()[i].name), "asked the road where the volume is");
        found
    }

    /// Where `volume` is after a move `from` -> `to` whose outcome the SMF did not hear:
    /// the one of the two NMSs holding it alone, or at the newer epoch (the target raised
    /// it). A source still moving it out is asked again until the move ends (it may still be
    /// connecting to the target, which then holds nothing yet), within `locate_wait_ms`.
    /// `None`: neither told in time.
    async fn locate(&self, road: &Road, volume: &str, from: usize, to: usize) -> Option<usize> {
        let deadline = Instant::now() + Duration::from_millis(self.cfg.locate_wait_ms);
        let mut pause = LOCATE_FIRST_PAUSE;
        loop {
            let (at_from, at_to) = tokio::join!(
                self.epoch_at(&road.rsus()[from].nms_address, volume),
                self.epoch_at(&road.rsus()[to].nms_address, volume)
            );
            match (&at_from, &at_to) {
                (Ok(Some((a, _))), Ok(Some((b, _)))) if b > a => return Some(to),
                (Ok(Some((a, _))), Ok(Some((b, _)))) if b < a => return Some(from),
                // Under way: wait for its end.
                (Ok(Some((_, true))), _) => {}
                (Ok(None), Ok(Some(_))) => return Some(to),
                // Ended without a switch (a copy the target has not dropped yet aside).
                (Ok(Some((_, false))), Ok(_)) => return Some(from),
                (Ok(None), Ok(None)) => return None,
                _ => {}
            }
            if Instant::now() + pause >= deadline {
                warn!(?at_from, ?at_to, "could not tell where the volume is after the move");
                return None;
            }
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = self.stop.cancelled() => return None,
            }
            pause = (pause * 2).min(LOCATE_MAX_PAUSE);
        }
    }

    /// Starts due moves every `tick_ms` until stopped, then waits for moves in flight.
    pub async fn run_ticker(&self) {
        let mut tick = tokio::time::interval(Duration::from_millis(self.cfg.tick_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.start_due(),
                () = self.stop.cancelled() => break,
            }
        }
        self.tracker.close();
        self.tracker.wait().await;
    }

    /// Moves started and not yet recorded.
    pub fn moves_in_flight(&self) -> usize {
        self.lock().in_flight
    }

    /// Every move recorded (of `vehicle`, or all when empty).
    pub fn moves(&self, vehicle: &str) -> Vec<pb::MoveRecord> {
        self.lock()
            .moves
            .iter()
            .filter(|m| vehicle.is_empty() || m.vehicle == vehicle)
            .cloned()
            .collect()
    }

    /// Replaces the road.
    pub fn set_road(&self, r: pb::Road) -> Result<pb::Road, Status> {
        if r.rsus.len() > self.cfg.max_rsus {
            return Err(Status::invalid_argument(format!(
                "road: {} RSUs, more than max_rsus ({})",
                r.rsus.len(),
                self.cfg.max_rsus
            )));
        }
        let road = road_of(&r)?;
        let mut st = self.lock();
        st.road = Some((road, r.clone()));
        st.road_gen += 1;
        // Indices into the old road mean nothing on the new one. A volume moving stays
        // marked so until its move ends (where it is, unknown until its vehicle's next
        // report), or a report on the new road could start a second move of it. What is
        // known of a volume itself stays: the credential its reports proved (a fleet's
        // every next report would otherwise need a check with an NMS again, a few at a
        // time) and when it last reported.
        for v in st.volumes.values_mut() {
            v.at = None;
            v.pending = None;
            v.planned_from = None;
        }
        Ok(r)
    }
}

#[tonic::async_trait]
impl pb::smf_server::Smf for Smf {
    /// The road names the NMSs the SMF sends the cluster token to and moves volumes
    /// between: setting it needs the token (when the SMF has one) and, on TLS, a road
    /// certificate (vehicles reach this port too).
    async fn set_road(&self, req: Request<pb::Road>) -> Result<Response<pb::Road>, Status> {
        let on_tls = self.tls.as_ref().is_some_and(|t| t.has_identity());
        wayside_proto::token::check(self.cfg.cluster_token.as_ref(), on_tls, &req)?;
        Smf::set_road(self, req.into_inner()).map(Response::new)
    }
    async fn get_road(&self, _: Request<pb::GetRoadRequest>) -> Result<Response<pb::Road>, Status> {
        let st = self.lock();
        st.road
            .as_ref()
            .map(|(_, r)| Response::new(r.clone()))
            .ok_or_else(|| Status::not_found("no road set"))
    }
    async fn report_vehicle(
        &self,
        req: Request<pb::VehicleReport>,
    ) -> Result<Response<pb::MoveDecision>, Status> {
        self.report(&req.into_inner()).await.map(Response::new)
    }
    async fn list_moves(
        &self,
        req: Request<pb::ListMovesRequest>,
    ) -> Result<Response<pb::ListMovesReply>, Status> {
        // Every vehicle's moves say where it drove and when: for the road's operators
        // (the cluster token, and on TLS a road certificate), as SetRoad.
        let on_tls = self.tls.as_ref().is_some_and(|t| t.has_identity());
        wayside_proto::token::check(self.cfg.cluster_token.as_ref(), on_tls, &req)?;
        Ok(Response::new(pb::ListMovesReply { moves: self.moves(&req.into_inner().vehicle) }))
    }
}

/// Serves the SMF on `listener` until `shutdown` fires; moves in flight finish first.
pub async fn run(
    cfg: SmfConfig,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let smf = Smf::new(cfg, shutdown.clone())
        .map_err(|e| anyhow::anyhow!("invalid SMF configuration: {e}"))?;
    serve(smf, listener, shutdown).await
}

/// Serves a given [`Smf`] (the testbed keeps a handle to read its estimate).
pub async fn serve(
    smf: Smf,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let local = listener.local_addr()?;
    wayside_proto::server::raise_open_file_limit(smf.cfg.max_connections);
    // A vehicle gone out of range without closing gives its connection back.
    let mut builder = wayside_proto::server::with_keepalive(
        tonic::transport::Server::builder().max_concurrent_streams(smf.cfg.max_concurrent_streams),
        smf.cfg.http2_keepalive_interval_ms,
        smf.cfg.http2_keepalive_timeout_ms,
    );
    let served_tls = match &smf.tls {
        Some(t) if t.has_identity() => {
            let handshake = Duration::from_millis(smf.cfg.tls_handshake_timeout_ms);
            let cfg = t
                // Vehicles present no certificate; operators setting the road do.
                .tonic_server(wayside_proto::tls::ClientAuth::Optional)
                .map_err(|e| anyhow::anyhow!("TLS: {e}"))?
                .timeout(handshake);
            builder = builder.tls_config(cfg).map_err(|e| anyhow::anyhow!("TLS: {e}"))?;
            true
        }
        _ => false,
    };
    async move {
        info!(listen = %local, tls = served_tls, "SMF serving");
        if !served_tls {
            warn!(
                "no tls.cert/tls.key: vehicles' reports (with their volumes' credentials) \
                 cross the air in plaintext; set them on a real road"
            );
        }
        if smf.cfg.cluster_token.is_none() && !served_tls {
            warn!(
                "no cluster_token and no TLS: anyone reaching this port can set the road (and \
                 so choose where vehicles' credentials are checked); set both on a real road"
            );
        }
        let (reporter, health) = wayside_proto::server::health();
        reporter.set_service_status("wayside.v1.Smf", tonic_health::ServingStatus::Serving).await;
        reporter.set_service_status("", tonic_health::ServingStatus::Serving).await;
        let server = builder
            .add_service(health)
            .add_service(wayside_proto::server::reflection())
            .add_service(
                pb::smf_server::SmfServer::new(smf.clone())
                    .max_decoding_message_size(smf.cfg.max_request_bytes),
            )
            .serve_with_incoming_shutdown(
                wayside_proto::server::incoming(
                    listener,
                    wayside_proto::server::ConnectionLimit::with_per_source(
                        smf.cfg.max_connections,
                        smf.cfg.max_connections_per_source,
                    ),
                    smf.cfg.silence_limit().map_err(|e| anyhow::anyhow!(e))?,
                ),
                shutdown.clone().cancelled_owned(),
            );
        let (served, ()) = tokio::join!(server, smf.run_ticker());
        served?;
        info!("SMF stopped");
        Ok(())
    }
    .instrument(info_span!("smf", listen = %local))
    .await
}

/// `nms smf`: serve the SMF.
#[derive(Debug, Clone, clap::Args)]
pub struct SmfArgs {
    /// Address to listen on for gRPC (`wayside.v1.Smf`).
    #[arg(long, default_value = "127.0.0.1:7300")]
    pub listen: String,
    /// Scenario seconds per wall second in vehicles' reports (1 on a real road).
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
    /// Seconds added to every proactive lead.
    #[arg(long, default_value_t = 1.0)]
    pub margin_s: f64,
    /// The SMF's certificate chain (PEM): with --tls-key, serve over TLS only (callers
    /// present no certificate).
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// The road's CA certificate (PEM): dial the NMSs over TLS only, trusting servers it
    /// signed (needed with --tls-cert).
    #[arg(long)]
    pub tls_ca: Option<std::path::PathBuf>,
    /// How long a connection has to finish its TLS handshake, in milliseconds.
    #[arg(long, default_value_t = 5_000)]
    pub tls_handshake_timeout_ms: u64,
    /// Longest wait to connect to an NMS (TCP connect and TLS handshake), in milliseconds.
    #[arg(long, default_value_t = 5_000)]
    pub nms_connect_timeout_ms: u64,
    /// Largest request the SMF decodes, in bytes (reports are small; a road of thousands
    /// of RSUs fits in the default).
    #[arg(long, default_value_t = 1 << 20)]
    pub max_request_bytes: usize,
    /// Most calls open at once on one connection, in calls.
    #[arg(long, default_value_t = 64)]
    pub max_concurrent_streams: u32,
    /// Most connections open at once (each reporting vehicle keeps one); one past it is
    /// closed as soon as it is accepted.
    #[arg(long, default_value_t = DEFAULT_SMF_MAX_CONNECTIONS)]
    pub max_connections: usize,
    /// Most connections open at once from one source address (at most --max-connections).
    #[arg(long, default_value_t = DEFAULT_SMF_MAX_CONNECTIONS_PER_SOURCE)]
    pub max_connections_per_source: usize,
    /// HTTP/2 PING sent on a connection after this long without a frame from the peer, in
    /// milliseconds (0: never): a vehicle gone out of range gives its connection back.
    #[arg(long, default_value_t = wayside_proto::server::HTTP2_KEEPALIVE_INTERVAL_MS)]
    pub http2_keepalive_interval_ms: u64,
    /// A connection whose PING goes unanswered this long is closed, in milliseconds.
    #[arg(long, default_value_t = wayside_proto::server::HTTP2_KEEPALIVE_TIMEOUT_MS)]
    pub http2_keepalive_timeout_ms: u64,
    /// A connection whose peer has sent nothing this long is closed, in milliseconds (0:
    /// never); with keepalive on it must exceed --http2-keepalive-interval-ms plus
    /// --http2-keepalive-timeout-ms.
    #[arg(long, default_value_t = wayside_proto::server::SILENT_CONNECTION_TIMEOUT_MS)]
    pub silent_connection_timeout_ms: u64,
}

/// A move's slot of `max_concurrent_moves` and its volume's `moving` flag, given back when
/// dropped armed (the move's task ended without recording its outcome).
struct MoveGuard<'a> {
    smf: &'a Smf,
    volume: &'a str,
    armed: bool,
}

impl MoveGuard<'_> {
    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for MoveGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let mut st = self.smf.lock();
            st.in_flight = st.in_flight.saturating_sub(1);
            if let Some(v) = st.volumes.get_mut(self.volume) {
                v.moving = false;
            }
        }
    }
}

/// Which NMS (by its index on the road) holds a volume, from each one's answer (the epoch
/// it holds the volume at, and whether it is moving it out): the one at the newest epoch;
/// at a tie, one moving it out (a move's target lists its arriving copy at the source's
/// epoch until the switch: the volume is still the source's).
fn holder(answers: Vec<Result<Option<(u64, bool)>, String>>) -> Option<usize> {
    answers
        .into_iter()
        .enumerate()
        .filter_map(|(i, a)| match a {
            Ok(Some((epoch, moving_out))) => Some((epoch, moving_out, i)),
            _ => None,
        })
        .max()
        .map(|(_, _, i)| i)
}

/// Runs `nms smf` until Ctrl-C or SIGTERM (moves in flight finish first).
pub async fn serve_cmd(a: SmfArgs) -> anyhow::Result<()> {
    let cfg = SmfConfig {
        time_scale: a.time_scale,
        margin_s: a.margin_s,
        // Presented on StartMigration to NMSs that require it.
        cluster_token: wayside_proto::token::ClusterToken::from_env()
            .map_err(anyhow::Error::msg)?,
        tls: wayside_proto::tls::TlsFiles { cert: a.tls_cert, key: a.tls_key, ca: a.tls_ca },
        tls_handshake_timeout_ms: a.tls_handshake_timeout_ms,
        nms_connect_timeout_ms: a.nms_connect_timeout_ms,
        max_request_bytes: a.max_request_bytes,
        max_concurrent_streams: a.max_concurrent_streams,
        max_connections: a.max_connections,
        max_connections_per_source: a.max_connections_per_source,
        http2_keepalive_interval_ms: a.http2_keepalive_interval_ms,
        http2_keepalive_timeout_ms: a.http2_keepalive_timeout_ms,
        silent_connection_timeout_ms: a.silent_connection_timeout_ms,
        ..Default::default()
    };
    let listener = tokio::net::TcpListener::bind(&a.listen)
        .await
        .map_err(|e| anyhow::anyhow!("binding {}: {e}", a.listen))?;
    let shutdown = CancellationToken::new();
    let server = run(cfg, listener, shutdown.clone());
    tokio::pin!(server);
    // A server that ends on its own (a configuration refused at start) ends the command
    // with its error; Ctrl-C stops it gracefully.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = &mut server => return r,
        _ = tokio::signal::ctrl_c() => shutdown.cancel(),
        _ = term.recv() => shutdown.cancel(),
    }
    server.await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn road(addr: &str) -> pb::Road {
        let rsu = |name: &str, p: f64| pb::Rsu {
            name: name.into(),
            position_m: p,
            coverage_radius_m: 150.0,
            nms_address: addr.into(),
        };
        pb::Road {
            rsus: vec![rsu("A", 100.0), rsu("B", 300.0)],
            handover_execution_s: 0.0,
            time_to_handover_s: 4.0,
        }
    }

    /// [`road`] with RSU A served by NMS `a` and RSU B by `b`.
    fn road_of(a: &crate::testing::LocalNms, b: &crate::testing::LocalNms) -> pb::Road {
        let mut r = road("unused");
        r.rsus[0].nms_address = a.ep.authority().into();
        r.rsus[1].nms_address = b.ep.authority().into();
        r
    }

    fn report(t: f64, pos: f64) -> pb::VehicleReport {
        pb::VehicleReport {
            vehicle: "car".into(),
            volume: "vol".into(),
            time_s: t,
            position_m: pos,
            speed_mps: 10.0,
            serving_rsu: "A".into(),
            cached_bytes: 1 << 20,
            dirty_bytes: 0,
            credential: "key".into(),
        }
    }

    /// An SMF for tests without NMSs: every volume's credential is "key" (no NMS asked).
    fn no_nms(cfg: SmfConfig, stop: CancellationToken) -> Smf {
        let mut smf = Smf::new(cfg, stop).unwrap();
        smf.test_credential = Some(Credential::new("key").unwrap().hash());
        smf
    }

    #[tokio::test]
    async fn bad_input_gets_the_right_codes() {
        let smf = no_nms(SmfConfig::default(), CancellationToken::new());
        assert_eq!(
            smf.report(&report(0.0, 0.0)).await.unwrap_err().code(),
            tonic::Code::FailedPrecondition
        );
        let mut bad = road("127.0.0.1:1");
        bad.rsus[1].position_m = 50.0;
        assert_eq!(smf.set_road(bad).unwrap_err().code(), tonic::Code::InvalidArgument);
        assert_eq!(
            smf.set_road(road("not an address")).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        smf.set_road(road("127.0.0.1:1")).unwrap();
        // (A stopped vehicle, speed 0, is a valid report: see
        // `a_stopped_vehicle_is_planned_no_move`.)
        for speed in [-1.0, f64::NAN, f64::INFINITY] {
            let mut r = report(0.0, 0.0);
            r.speed_mps = speed;
            assert_eq!(smf.report(&r).await.unwrap_err().code(), tonic::Code::InvalidArgument);
        }
        for (time, position) in [(f64::NAN, 0.0), (0.0, f64::INFINITY), (0.0, f64::NAN)] {
            let r = pb::VehicleReport { time_s: time, position_m: position, ..report(0.0, 0.0) };
            assert_eq!(smf.report(&r).await.unwrap_err().code(), tonic::Code::InvalidArgument);
        }
        // A road past max_rsus is refused, naming it.
        let mut long = road("127.0.0.1:1");
        let mut extra = long.rsus[1].clone();
        for i in 0..SmfConfig::default().max_rsus {
            extra.name = format!("R{i}");
            extra.position_m = 10_000.0 + i as f64 * 1000.0;
            long.rsus.push(extra.clone());
        }
        let Err(e) = smf.set_road(long) else { panic!("a road past max_rsus was taken") };
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("max_rsus"), "{e:?}");
        assert!(Smf::new(
            SmfConfig { time_scale: 0.0, ..Default::default() },
            CancellationToken::new()
        )
        .is_err());
    }

    /// The road's CA alone would serve vehicles in plaintext (their reports carry their
    /// volumes' credentials): refused, as the NMS refuses it.
    #[test]
    fn a_ca_without_a_certificate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = wayside_proto::tls::pki::Ca::new("test road").unwrap();
        let (names, ips) = wayside_proto::tls::pki::loopback();
        let files = ca.write_road(dir.path(), &names, &ips).unwrap();
        let ca_only = wayside_proto::tls::TlsFiles { ca: files.ca.clone(), ..Default::default() };
        let cfg = SmfConfig { tls: ca_only, ..Default::default() };
        let e = Smf::new(cfg, CancellationToken::new()).err().expect("refused");
        assert!(e.contains("tls.ca without"), "{e}");
        let cfg = SmfConfig { tls: files, ..Default::default() };
        assert!(Smf::new(cfg, CancellationToken::new()).is_ok());
    }

    /// An SMF serving `cfg` on loopback: its address, its stop token and its task.
    async fn serving_smf(
        cfg: SmfConfig,
    ) -> (std::net::SocketAddr, CancellationToken, tokio::task::JoinHandle<anyhow::Result<()>>)
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(no_nms(cfg, stop.clone()), listener, stop.clone()));
        (addr, stop, server)
    }

    /// A request past `max_request_bytes` (callers need no credential to send one) is
    /// refused (OUT_OF_RANGE) before the service looks at it; one within is served.
    #[tokio::test]
    async fn a_request_past_max_request_bytes_is_refused() {
        let cfg = SmfConfig { max_request_bytes: 64 * 1024, ..Default::default() };
        let (addr, stop, server) = serving_smf(cfg).await;
        served_again(addr, "the first connection").await;
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut c = pb::smf_client::SmfClient::new(ch);
        let big = pb::VehicleReport { serving_rsu: "x".repeat(128 * 1024), ..report(0.0, 0.0) };
        let e = c.report_vehicle(big).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::OutOfRange, "{e:?}");
        let small = c.report_vehicle(report(0.0, 0.0)).await;
        assert!(small.is_ok() || small.unwrap_err().code() != tonic::Code::OutOfRange);
        stop.cancel();
        server.await.unwrap().unwrap();
    }

    /// One health check of the SMF at `addr` on a new connection, within 2 s.
    async fn health(addr: std::net::SocketAddr) -> anyhow::Result<()> {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(2))
            .connect()
            .await?;
        let req = tonic_health::pb::HealthCheckRequest { service: String::new() };
        tonic_health::pb::health_client::HealthClient::new(ch).check(req).await?;
        Ok(())
    }

    /// Health checks until one is served, for at most 10 s (`what` names the slot waited
    /// for in the failure).
    async fn served_again(addr: std::net::SocketAddr, what: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match health(addr).await {
                Ok(()) => return,
                Err(e) if std::time::Instant::now() < deadline => {
                    tracing::debug!(error = %e, "not served yet");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("{what} never came back: {e}"),
            }
        }
    }

    async fn stop_smf(
        stop: CancellationToken,
        server: tokio::task::JoinHandle<anyhow::Result<()>>,
    ) {
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), server)
            .await
            .expect("the SMF did not stop")
            .unwrap()
            .unwrap();
    }

    /// `max_connections` and keepalive on the SMF: with its one slot held by a peer that
    /// spoke HTTP/2 and then went silent (out of range, its socket still open), another
    /// caller is refused; the silent peer's PING goes unanswered, its connection is closed,
    /// and the slot serves the next caller.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_silent_peer_gives_back_its_connection_slot() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let cfg = SmfConfig {
            max_connections: 1,
            http2_keepalive_interval_ms: 200,
            http2_keepalive_timeout_ms: 200,
            ..Default::default()
        };
        let (addr, stop, server) = serving_smf(cfg).await;
        // The silent peer: the client preface and an empty SETTINGS, then nothing.
        let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
        silent.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0").await.unwrap();
        // Refused while the silent peer holds the slot (the server has taken it once its
        // SETTINGS came back).
        let mut got = [0u8; 9];
        silent.read_exact(&mut got).await.unwrap();
        assert_eq!(got[3], 0x4, "the server's SETTINGS first");
        let len = usize::from(got[0]) << 16 | usize::from(got[1]) << 8 | usize::from(got[2]);
        silent.read_exact(&mut vec![0u8; len]).await.unwrap();
        assert!(health(addr).await.is_err(), "served past max_connections 1");
        // The silent peer is pinged, never answers, and is closed: the slot is free again.
        served_again(addr, "the silent peer's slot").await;
        // What the silent peer was sent before its connection closed: a PING among it.
        let mut rest = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut rest)).await;
        let kinds = crate::testing::frame_types(&rest);
        assert!(kinds.contains(&0x6), "the silent peer was never pinged (frames {kinds:?})");
        stop_smf(stop, server).await;
    }

    /// `silent_connection_timeout_ms`: a caller that connects and never speaks HTTP/2 (no
    /// preface, so no keepalive PING either) holds the SMF's one slot only that long; then
    /// its connection is closed and the slot serves the next caller. (With the limit off,
    /// such a caller held the slot for as long as it liked: 20 s in a check.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_caller_that_never_speaks_is_closed_after_the_silence_limit() {
        use tokio::io::AsyncReadExt as _;
        let cfg = SmfConfig {
            max_connections: 1,
            http2_keepalive_interval_ms: 100,
            http2_keepalive_timeout_ms: 100,
            silent_connection_timeout_ms: 600,
            ..Default::default()
        };
        let (addr, stop, server) = serving_smf(cfg).await;
        let mut mute = tokio::net::TcpStream::connect(addr).await.unwrap();
        let connected = std::time::Instant::now();
        // The mute caller's connection is closed (whatever hyper sent it first)...
        let mut sent = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(10), mute.read_to_end(&mut sent)).await;
        assert!(r.is_ok(), "a caller that never spoke was held open 10 s");
        let held = connected.elapsed();
        assert!(held >= Duration::from_millis(300), "closed after {held:?}, before the limit");
        // ...and its slot serves the next caller.
        served_again(addr, "the mute caller's slot").await;
        stop_smf(stop, server).await;
    }

    /// The silence limit must leave an idle live peer, heard only when it answers a PING,
    /// room: a limit within the keepalive interval plus its timeout is refused, naming the
    /// settings; 0 turns it off.
    #[test]
    fn a_silence_limit_within_the_keepalive_period_is_refused() {
        let cfg = SmfConfig { silent_connection_timeout_ms: 15_000, ..Default::default() };
        let e = cfg.validate().unwrap_err();
        assert!(e.contains("silent_connection_timeout_ms (15000)"), "{e}");
        assert!(e.contains("http2_keepalive_interval_ms"), "{e}");
        let off = SmfConfig { silent_connection_timeout_ms: 0, ..Default::default() };
        assert_eq!(off.silence_limit().unwrap(), None);
        let no_pings = SmfConfig {
            http2_keepalive_interval_ms: 0,
            silent_connection_timeout_ms: 500,
            ..Default::default()
        };
        assert_eq!(no_pings.silence_limit().unwrap(), Some(Duration::from_millis(500)));
        assert_eq!(
            SmfConfig::default().silence_limit().unwrap(),
            Some(Duration::from_millis(wayside_proto::server::SILENT_CONNECTION_TIMEOUT_MS))
        );
    }

    /// A vehicle that created volume "vol" (credential "key", 4 KiB blocks) at `nms`.
    async fn vehicle_of_vol(nms: &crate::testing::LocalNms) -> crate::client::VolumeClient {
        use wayside_proto::types::{BlockSize, VolumeName};
        let mut o = crate::client::ClientOptions::new(
            vec![nms.ep.clone()],
            VolumeName::new("vol").unwrap(),
            Credential::new("key").unwrap(),
        );
        o.create_block_size = Some(BlockSize::new(4096).unwrap());
        crate::client::VolumeClient::open(o).await.unwrap()
    }

    /// A reactive move of car's volume from RSU `from` to `to`, due now.
    fn reactive_move_now(smf: &Smf, from: usize, to: usize) -> Pending {
        let now = Instant::now();
        Pending {
            vehicle: "car".into(),
            road_gen: smf.lock().road_gen,
            from,
            to,
            kind: Kind::Reactive,
            planned_start_s: 0.0,
            due: now,
            predicted_smt_s: 0.0,
            planned_bytes: 0,
            clock: Clock { at: now, time_s: 0.0, scale: 1.0 },
        }
    }

    /// More moves due than slots: the one due longest starts first (they started in the
    /// volume map's order, so the same volumes could win every tick).
    #[tokio::test]
    async fn the_move_due_longest_starts_first() {
        let cfg = SmfConfig { max_concurrent_moves: 1, ..Default::default() };
        let smf = no_nms(cfg, CancellationToken::new());
        smf.set_road(road("127.0.0.1:1")).unwrap();
        let now = Instant::now();
        for i in 0..8u64 {
            let mut p = reactive_move_now(&smf, 0, 1);
            // vol7 is due longest.
            p.due = now - Duration::from_millis(10 * (i + 1));
            let v = VolumeState { pending: Some(p), ..Default::default() };
            smf.lock().volumes.insert(format!("vol{i}"), v);
        }
        smf.start_due();
        let st = smf.lock();
        let moving: Vec<&String> =
            st.volumes.iter().filter(|(_, v)| v.moving).map(|(n, _)| n).collect();
        assert_eq!(moving, ["vol7"]);
    }

    /// A failed move holds the volume's next one back (`move_retry_backoff_ms`, doubling
    /// with each failure in a row); a completed one clears that.
    #[tokio::test]
    async fn a_failed_move_holds_the_next_one_back() {
        let cfg = SmfConfig { move_retry_backoff_ms: 60_000, ..Default::default() };
        let smf = no_nms(cfg, CancellationToken::new());
        // Nothing listens at port 1: every move fails at once.
        smf.set_road(road("127.0.0.1:1")).unwrap();
        smf.lock().volumes.insert("vol".into(), VolumeState::default());
        let (road, _) = smf.lock().road.clone().unwrap();
        let started = Instant::now();
        smf.do_move(road.clone(), "vol".into(), reactive_move_now(&smf, 0, 1)).await;
        assert!(!smf.moves("car")[0].ok);
        let retry_at = {
            let st = smf.lock();
            let v = &st.volumes["vol"];
            assert_eq!(v.failures, 1);
            v.retry_at.expect("a retry time")
        };
        assert!(retry_at >= started + Duration::from_secs(60), "{:?}", retry_at - started);
        // Due now, but held back.
        smf.lock().volumes.get_mut("vol").unwrap().pending = Some(reactive_move_now(&smf, 0, 1));
        smf.start_due();
        assert!(!smf.lock().volumes["vol"].moving, "started within the backoff");
        // A second failure in a row waits twice as long.
        let p = smf.lock().volumes.get_mut("vol").unwrap().pending.take().unwrap();
        smf.do_move(road, "vol".into(), p).await;
        let st = smf.lock();
        assert_eq!(st.volumes["vol"].failures, 2);
        let wait = st.volumes["vol"].retry_at.unwrap() - started;
        assert!(wait >= Duration::from_secs(120), "{wait:?}");
    }

    /// A StartMigration the SMF gave up on (its 25 ms ran out) while the NMSs went on and
    /// completed the move: the SMF asks them where the volume is, so the next move starts
    /// from B (it would start from A, which no longer has it, and fail).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_move_whose_answer_the_smf_missed_is_located_where_it_ended() {
        use crate::testing::LocalNms;
        let dir = tempfile::tempdir().unwrap();
        let cluster = wayside_pss::testing::LocalCluster::start(1, dir.path()).await.unwrap();
        let a = LocalNms::start("a", &cluster.endpoints(), |_| {}).await;
        let b = LocalNms::start("b", &cluster.endpoints(), |_| {}).await;
        let c = vehicle_of_vol(&a).await;
        // 16 MiB to move: the move (~60 ms on loopback) outlasts the SMF's 25 ms.
        c.write_many((0..4096).map(|b| (b, 0, vec![b as u8; 4096])).collect()).await.unwrap();
        let cfg = SmfConfig { migration_rpc_timeout_ms: 25, ..Default::default() };
        // (Its report's credential is checked with A, for real.)
        let smf = Smf::new(cfg, CancellationToken::new()).unwrap();
        smf.set_road(road_of(&a, &b)).unwrap();
        smf.report(&report(0.0, 0.0)).await.unwrap();
        assert_eq!(smf.lock().volumes["vol"].at, Some(0), "first seen at A");
        let (road, _) = smf.lock().road.clone().unwrap();
        let p = reactive_move_now(&smf, 0, 1);
        smf.do_move(road, "vol".into(), p).await;
        let m = &smf.moves("car")[0];
        println!("{m:?}");
        assert!(!m.ok && m.error.contains("StartMigration"), "the SMF missed the answer: {m:?}");
        assert!(m.error.contains("the volume is at B now"), "{m:?}");
        assert_eq!(smf.lock().volumes["vol"].at, Some(1), "the SMF knows the volume is at B");
        // And it is: B serves it, with its data.
        assert_eq!(c.read(4095, 0, None).await.unwrap().unwrap(), vec![4095u16 as u8; 4096]);
        let status = smf.epoch_at(b.ep.authority(), "vol").await.unwrap();
        assert!(status.is_some(), "B holds the volume");
        drop(c);
        a.stop().await;
        b.stop().await;
        cluster.shutdown().await;
    }

    /// A move is learnt from the bytes the source moved in its first round, whatever the
    /// vehicle reported: a report claiming a terabyte does not skew every plan.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_move_is_learnt_from_what_the_source_moved_not_the_report() {
        use crate::testing::LocalNms;
        let dir = tempfile::tempdir().unwrap();
        let cluster = wayside_pss::testing::LocalCluster::start(1, dir.path()).await.unwrap();
        let a = LocalNms::start("a", &cluster.endpoints(), |_| {}).await;
        let b = LocalNms::start("b", &cluster.endpoints(), |_| {}).await;
        let c = vehicle_of_vol(&a).await;
        c.write_many((0..256).map(|b| (b, 0, vec![b as u8; 4096])).collect()).await.unwrap();
        let smf = Smf::new(SmfConfig::default(), CancellationToken::new()).unwrap();
        smf.set_road(road_of(&a, &b)).unwrap();
        smf.report(&report(0.0, 0.0)).await.unwrap();
        let before = smf.estimator();
        let (road, _) = smf.lock().road.clone().unwrap();
        let p = Pending { planned_bytes: 1 << 40, ..reactive_move_now(&smf, 0, 1) };
        smf.do_move(road, "vol".into(), p).await;
        let m = &smf.moves("car")[0];
        assert!(m.ok, "{m:?}");
        let mut want = before.clone();
        want.observe(256 * (4096 + crate::cache::ENTRY_OVERHEAD_BYTES), m.measured_smt_s);
        assert_eq!(smf.estimator(), want, "learnt from the volume's 256 cached blocks");
        // As the volume's own cached bytes count them.
        assert_eq!(
            c.stat().await.unwrap().cached_bytes,
            256 * (4096 + crate::cache::ENTRY_OVERHEAD_BYTES)
        );
        drop(c);
        a.stop().await;
        b.stop().await;
        cluster.shutdown().await;
    }

    /// A stopped vehicle (speed 0: a red light) is planned no move: its report is taken
    /// (not refused as a bad speed) and drops the move planned while it was driving, which
    /// would otherwise move its volume away while it waits inside its RSU's coverage.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stopped_vehicle_is_planned_no_move() {
        use crate::testing::LocalNms;
        let dir = tempfile::tempdir().unwrap();
        let cluster = wayside_pss::testing::LocalCluster::start(1, dir.path()).await.unwrap();
        let a = LocalNms::start("a", &cluster.endpoints(), |_| {}).await;
        let _c = vehicle_of_vol(&a).await;
        let smf = Smf::new(SmfConfig::default(), CancellationToken::new()).unwrap();
        smf.set_road(road(a.ep.authority())).unwrap();
        // 10 m before A's exit at 10 m/s: a move to B is due in about a second.
        let d = smf.report(&report(0.0, 240.0)).await.unwrap();
        assert_ne!(d.kind, pb::MoveKind::None as i32, "{d:?}");
        assert!(smf.lock().volumes["vol"].pending.is_some());
        let stopped = pb::VehicleReport { speed_mps: 0.0, ..report(0.5, 240.0) };
        let d = smf.report(&stopped).await.unwrap();
        assert_eq!(d.kind, pb::MoveKind::None as i32, "{d:?}");
        assert_eq!(d.from_rsu, "A");
        assert!(d.reason.contains("stopped"), "{d:?}");
        assert!(smf.lock().volumes["vol"].pending.is_none(), "the planned move is dropped");
        let backwards = pb::VehicleReport { speed_mps: -1.0, ..report(1.0, 240.0) };
        let e = smf.report(&backwards).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        a.stop().await;
        cluster.shutdown().await;
    }

    /// A volume whose move to the next RSU finished before its vehicle stopped short of
    /// the handover is ahead of the vehicle, not behind it: it is not moved back.
    #[tokio::test]
    async fn a_vehicle_stopping_before_the_handover_does_not_pull_its_volume_back() {
        let smf = no_nms(SmfConfig::default(), CancellationToken::new());
        smf.set_road(road("127.0.0.1:1")).unwrap();
        smf.report(&report(0.0, 200.0)).await.unwrap();
        // The proactive move to B is done.
        {
            let mut st = smf.lock();
            let v = st.volumes.get_mut("vol").unwrap();
            v.at = Some(1);
            v.pending = None;
        }
        // Stopped in A's coverage, 10 m before its exit (a red light).
        let stopped = pb::VehicleReport { speed_mps: 0.0, ..report(5.0, 240.0) };
        let d = smf.report(&stopped).await.unwrap();
        assert_eq!(d.kind, pb::MoveKind::None as i32, "{d:?}");
        assert!(smf.lock().volumes["vol"].pending.is_none(), "moved back: {d:?}");
        assert_eq!(smf.lock().volumes["vol"].at, Some(1));
        // A speed too small to plan with counts as stopped too.
        let crawl = pb::VehicleReport { speed_mps: 1e-300, ..report(6.0, 240.0) };
        let d = smf.report(&crawl).await.unwrap();
        assert!(d.reason.contains("stopped"), "{d:?}");
        // A vehicle id past its limit is refused.
        let long = pb::VehicleReport {
            vehicle: "v".repeat(MAX_VEHICLE_ID_BYTES + 1),
            ..report(7.0, 240.0)
        };
        let e = smf.report(&long).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        // A new road keeps what the reports proved (the credential).
        smf.set_road(road("127.0.0.1:2")).unwrap();
        assert!(smf.lock().volumes["vol"].credential.is_some());
        assert_eq!(smf.lock().volumes["vol"].at, None);
    }

    /// Two reports of one volume planned in the other order from the one they were
    /// received in (the first's credential check took longer): the older one changes
    /// nothing, or the volume would be moved by stale news.
    #[tokio::test]
    async fn a_report_overtaken_by_a_later_one_changes_no_plan() {
        let smf = no_nms(SmfConfig::default(), CancellationToken::new());
        smf.set_road(road("127.0.0.1:1")).unwrap();
        let hash = Credential::new("key").unwrap().hash();
        let older = pb::VehicleReport { speed_mps: 5.0, ..report(0.0, 0.0) };
        let newer = report(10.0, 100.0);
        let (t_older, t_newer) = (Instant::now(), Instant::now() + Duration::from_millis(1));
        let speed = |r: &pb::VehicleReport| Speed::from_mps(r.speed_mps).unwrap();
        smf.decide(&newer, speed(&newer), hash, t_newer).unwrap();
        let planned =
            |smf: &Smf| smf.lock().volumes["vol"].pending.as_ref().unwrap().planned_start_s;
        let start = planned(&smf);
        // A's coverage ends at 250 m: 15 s on at 10 m/s from 100 m at 10 s.
        assert!((20.0..=25.0).contains(&start), "{start}");
        let d = smf.decide(&older, speed(&older), hash, t_older).unwrap();
        assert!(d.reason.contains("changes nothing"), "{d:?}");
        assert_eq!(planned(&smf), start, "the plan is the later report's");
        // A report received after it plans anew.
        let later = pb::VehicleReport { speed_mps: 5.0, ..report(11.0, 110.0) };
        smf.decide(&later, speed(&later), hash, Instant::now() + Duration::from_millis(2)).unwrap();
        assert!(planned(&smf) > start + 10.0, "{}", planned(&smf));
    }

    /// A road set anew while a volume moves: the volume stays marked moving (its move's
    /// RSU indices mean nothing on the new road, but the NMSs still run it), so a report
    /// on the new road plans no second move until the first ends.
    #[tokio::test]
    async fn a_road_set_during_a_move_starts_no_second_move() {
        let smf = no_nms(SmfConfig::default(), CancellationToken::new());
        smf.set_road(road("127.0.0.1:1")).unwrap();
        smf.report(&report(0.0, 240.0)).await.unwrap();
        {
            let mut st = smf.lock();
            let v = st.volumes.get_mut("vol").unwrap();
            assert!(v.pending.is_some(), "a move to B is planned");
            // As `start_due` does when it starts the move.
            v.pending = None;
            v.moving = true;
        }
        smf.set_road(road("127.0.0.1:2")).unwrap();
        smf.report(&report(0.5, 245.0)).await.unwrap();
        let st = smf.lock();
        let v = &st.volumes["vol"];
        assert!(v.moving, "still moving");
        assert!(v.pending.is_none(), "no second move planned while the first runs");
    }

    /// A move whose source is gone (its NMS died; the vehicle attached at C meanwhile and
    /// C loaded the volume): the move's two NMSs cannot say where the volume is, so the SMF
    /// asks the whole road and the next move starts from C. (Before, the SMF kept the
    /// volume at A for good, and every later move started from the dead NMS.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_move_from_a_dead_nms_finds_the_volume_on_the_road() {
        use crate::testing::LocalNms;
        let dir = tempfile::tempdir().unwrap();
        let cluster = wayside_pss::testing::LocalCluster::start(1, dir.path()).await.unwrap();
        let nms: Vec<LocalNms> = vec![
            LocalNms::start("a", &cluster.endpoints(), |_| {}).await,
            LocalNms::start("b", &cluster.endpoints(), |_| {}).await,
            LocalNms::start("c", &cluster.endpoints(), |_| {}).await,
        ];
        let at_a = vehicle_of_vol(&nms[0]).await;
        at_a.write(0, 0, vec![7; 4096]).await.unwrap();
        at_a.flush().await.unwrap();
        let smf = Smf::new(SmfConfig::default(), CancellationToken::new()).unwrap();
        let mut r = road("unused");
        r.rsus.push(pb::Rsu { name: "C".into(), position_m: 500.0, ..r.rsus[0].clone() });
        for (rsu, n) in r.rsus.iter_mut().zip(&nms) {
            rsu.nms_address = n.ep.authority().into();
        }
        smf.set_road(r).unwrap();
        smf.report(&report(0.0, 0.0)).await.unwrap();
        assert_eq!(smf.lock().volumes["vol"].at, Some(0), "first seen at A");
        drop(at_a);
        let mut nms = nms.into_iter();
        nms.next().unwrap().stop().await;
        let (b, c) = (nms.next().unwrap(), nms.next().unwrap());
        let at_c = vehicle_of_vol(&c).await;
        assert_eq!(at_c.read(0, 0, None).await.unwrap(), Some(vec![7; 4096]));
        let (road, _) = smf.lock().road.clone().unwrap();
        let p = reactive_move_now(&smf, 0, 1);
        smf.do_move(road, "vol".into(), p).await;
        let m = &smf.moves("car")[0];
        assert!(!m.ok && m.error.contains("the volume is at C now"), "{m:?}");
        assert_eq!(smf.lock().volumes["vol"].at, Some(2), "the SMF knows the volume is at C");
        drop(at_c);
        b.stop().await;
        c.stop().await;
        cluster.shutdown().await;
    }

    /// A report moves a volume only if it carries the volume's credential: the SMF checks
    /// it with an NMS of the road (CheckCredential, with the cluster token), then holds
    /// later reports to it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_report_naming_another_vehicles_volume_is_refused() {
        use crate::testing::LocalNms;
        use wayside_proto::token::ClusterToken;
        let dir = tempfile::tempdir().unwrap();
        let cluster = wayside_pss::testing::LocalCluster::start(1, dir.path()).await.unwrap();
        let token = ClusterToken::new("road-token-0123456789").unwrap();
        let a = LocalNms::start("a", &cluster.endpoints(), |c| {
            c.cluster_token = Some(token.clone());
        })
        .await;
        let _c = vehicle_of_vol(&a).await;
        let with_token = SmfConfig { cluster_token: Some(token), ..Default::default() };
        let smf = Smf::new(with_token, CancellationToken::new()).unwrap();
        smf.set_road(road(a.ep.authority())).unwrap();
        let as_ = |credential: &str, volume: &str| pb::VehicleReport {
            credential: credential.into(),
            volume: volume.into(),
            ..report(0.0, 0.0)
        };
        let code = |r: Result<pb::MoveDecision, Status>| r.unwrap_err().code();
        assert_eq!(code(smf.report(&as_("guess", "vol")).await), tonic::Code::Unauthenticated);
        assert!(smf.lock().volumes.is_empty(), "a refused report is not tracked");
        assert_eq!(code(smf.report(&as_("key", "nobody")).await), tonic::Code::NotFound);
        assert_eq!(code(smf.report(&as_("", "vol")).await), tonic::Code::InvalidArgument);
        smf.report(&as_("key", "vol")).await.unwrap();
        // Checked once; later reports are held to it, the NMS not asked again.
        a.stop().await;
        smf.report(&as_("key", "vol")).await.unwrap();
        assert_eq!(code(smf.report(&as_("guess", "vol")).await), tonic::Code::Unauthenticated);
        // An SMF without the road's token cannot ask: it refuses rather than trust.
        let b = LocalNms::start("b", &cluster.endpoints(), |c| {
            c.cluster_token = Some(ClusterToken::new("road-token-0123456789").unwrap());
        })
        .await;
        let smf = Smf::new(SmfConfig::default(), CancellationToken::new()).unwrap();
        smf.set_road(road(b.ep.authority())).unwrap();
        let e = smf.report(&as_("key", "vol")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
        b.stop().await;
        cluster.shutdown().await;
    }

    /// Reports are unauthenticated until checked: the checks they start (each asking NMSs)
    /// are bounded, and a malformed volume name is refused before any NMS is asked.
    #[tokio::test]
    async fn credential_checks_are_bounded_and_bad_names_refused_first() {
        // An NMS that accepts connections and never answers: a check waits on it.
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = silent.local_addr().unwrap().to_string();
        let cfg = SmfConfig { max_concurrent_credential_checks: 1, ..Default::default() };
        let smf = Smf::new(cfg, CancellationToken::new()).unwrap();
        smf.set_road(road(&addr)).unwrap();
        let first = report(0.0, 0.0);
        let mut waiting = Box::pin(smf.report(&first));
        assert!(futures::poll!(&mut waiting).is_pending(), "the first check waits on the NMS");
        let other = pb::VehicleReport { volume: "other".into(), ..report(0.0, 0.0) };
        let e = smf.report(&other).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
        assert!(e.message().contains("max_concurrent_credential_checks"), "{e:?}");
        let bad = pb::VehicleReport { volume: "a/b".into(), ..report(0.0, 0.0) };
        assert_eq!(smf.report(&bad).await.unwrap_err().code(), tonic::Code::InvalidArgument);
        drop(waiting);
        // The slot is free again (the next check waits on the NMS, as the first did).
        assert!(futures::poll!(Box::pin(smf.report(&other))).is_pending());
    }

    /// The road's answer to "who holds the volume": the newest epoch; at a tie (a move's
    /// target lists its arriving copy at the source's epoch), the NMS moving it out, not
    /// the target (it was taken for the holder while the move still ran).
    #[test]
    fn the_holder_is_the_newest_epoch_and_at_a_tie_the_source_of_a_move() {
        let ans = |v: &[Option<(u64, bool)>]| v.iter().map(|a| Ok(*a)).collect::<Vec<_>>();
        assert_eq!(holder(ans(&[Some((3, true)), Some((3, false))])), Some(0));
        assert_eq!(holder(ans(&[Some((3, false)), Some((3, true))])), Some(1));
        assert_eq!(holder(ans(&[Some((3, true)), Some((4, false))])), Some(1));
        assert_eq!(holder(ans(&[None, Some((2, false))])), Some(1));
        assert_eq!(holder(vec![Err("down".into()), Ok(None)]), None);
    }

    /// Over TLS, an NMS that accepts connections and never answers (a stopped process, a
    /// paused VM) holds a dial no longer than `nms_connect_timeout_ms`, handshake included
    /// (tonic's connect timeout covers the TCP connect only: the move, its slot and the
    /// SMF's shutdown waited for good), and no dial outlasts the SMF's stop.
    #[tokio::test]
    async fn a_dial_to_an_nms_that_never_answers_gives_up() {
        let dir = tempfile::tempdir().unwrap();
        let ca = wayside_proto::tls::pki::Ca::new("test road").unwrap();
        let (names, ips) = wayside_proto::tls::pki::loopback();
        let files = ca.write_road(dir.path(), &names, &ips).unwrap();
        let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = hung.local_addr().unwrap().to_string();
        let holder = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = hung.accept().await {
                held.push(s);
            }
        });
        let stop = CancellationToken::new();
        let cfg = SmfConfig { tls: files, nms_connect_timeout_ms: 300, ..Default::default() };
        let smf = Arc::new(Smf::new(cfg, stop.clone()).unwrap());
        let dial = smf.admin(&addr, Duration::from_secs(60));
        let e = tokio::time::timeout(Duration::from_secs(10), dial).await.expect("hung").err();
        let e = e.expect("no NMS answered");
        assert!(e.contains("nms_connect_timeout_ms"), "{e}");
        // With a long limit, the SMF's stop ends the dial.
        let cfg = SmfConfig {
            tls: smf.cfg.tls.clone(),
            nms_connect_timeout_ms: 600_000,
            ..Default::default()
        };
        let stop = CancellationToken::new();
        let slow = Arc::new(Smf::new(cfg, stop.clone()).unwrap());
        let mut dial = Box::pin(slow.admin(&addr, Duration::from_secs(60)));
        assert!(futures::poll!(&mut dial).is_pending());
        stop.cancel();
        let e = tokio::time::timeout(Duration::from_secs(10), dial).await.expect("hung").err();
        assert_eq!(e.as_deref(), Some("SMF stopping"));
        holder.abort();
    }

    #[tokio::test]
    async fn a_move_to_an_unreachable_nms_is_recorded_as_failed() {
        // A port nothing listens on: bind, read the port, close.
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let stop = CancellationToken::new();
        let smf = no_nms(SmfConfig::default(), stop.clone());
        smf.set_road(road(&addr)).unwrap();
        let ticker = tokio::spawn({
            let smf = smf.clone();
            async move { smf.run_ticker().await }
        });
        // At 249.5 m, 10 m/s: the handover out of A (exit 250 m) is 0.05 s away; B's window
        // (4 + 20 s) dwarfs the prior SMT estimate: reactive.
        let d = smf.report(&report(0.0, 249.5)).await.unwrap();
        assert_eq!(d.kind, pb::MoveKind::Reactive as i32, "{d:?}");
        assert_eq!((d.from_rsu.as_str(), d.to_rsu.as_str()), ("A", "B"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while smf.moves("car").is_empty() {
            assert!(Instant::now() < deadline, "no move recorded");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let m = &smf.moves("car")[0];
        assert!(!m.ok && m.error.contains("connecting"), "{m:?}");
        assert!(
            m.actual_start_s >= m.planned_start_s - 1e-9 && (m.planned_start_s - 0.05).abs() < 1e-9,
            "{m:?}"
        );
        // A failed move teaches nothing.
        assert_eq!(smf.estimator().samples(), 0);
        stop.cancel();
        ticker.await.unwrap();
    }

    #[tokio::test]
    async fn silent_vehicles_and_volumes_make_room_the_limits_hold_otherwise() {
        let of = |vehicle: &str, volume: &str| pb::VehicleReport {
            vehicle: vehicle.into(),
            volume: volume.into(),
            ..report(0.0, 0.0)
        };
        let limits = |idle_forget_ms| SmfConfig {
            max_vehicles: 2,
            max_volumes: 2,
            idle_forget_ms,
            ..Default::default()
        };
        // Nobody silent long enough: the third vehicle, and the third volume, wait.
        let smf = no_nms(limits(3_600_000), CancellationToken::new());
        smf.set_road(road("127.0.0.1:1")).unwrap();
        smf.report(&of("v1", "a")).await.unwrap();
        smf.report(&of("v2", "b")).await.unwrap();
        let e = smf.report(&of("v3", "c")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
        let e = smf.report(&of("v1", "c")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
        smf.report(&of("v2", "b")).await.unwrap();
        // Everyone silent long enough (0 ms): forgotten to make room, never locked out.
        let smf = no_nms(limits(0), CancellationToken::new());
        smf.set_road(road("127.0.0.1:1")).unwrap();
        for i in 0..10 {
            smf.report(&of(&format!("v{i}"), &format!("vol{i}"))).await.unwrap();
        }
        let st = smf.lock();
        assert!(st.vehicles.len() <= 2 && st.volumes.len() <= 2);
    }

    /// One credential holder cannot fill `max_vehicles` with made-up vehicle ids for its
    /// volume: past `max_vehicles_per_volume` they are refused, other volumes go on, and
    /// the vehicles already tracked keep reporting (silent ones make room).
    #[tokio::test]
    async fn a_volume_is_reported_by_at_most_max_vehicles_per_volume() {
        let of = |vehicle: &str, volume: &str| pb::VehicleReport {
            vehicle: vehicle.into(),
            volume: volume.into(),
            ..report(0.0, 0.0)
        };
        let cfg = |idle_forget_ms| SmfConfig {
            max_vehicles_per_volume: 2,
            idle_forget_ms,
            ..Default::default()
        };
        let smf = no_nms(cfg(3_600_000), CancellationToken::new());
        smf.set_road(road("127.0.0.1:1")).unwrap();
        smf.report(&of("v1", "a")).await.unwrap();
        smf.report(&of("v2", "a")).await.unwrap();
        for i in 3..50 {
            let e = smf.report(&of(&format!("v{i}"), "a")).await.unwrap_err();
            assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
            assert!(e.message().contains("max_vehicles_per_volume"), "{e:?}");
        }
        assert_eq!(smf.lock().vehicles.len(), 2, "the refused ids are not tracked");
        smf.report(&of("v1", "a")).await.unwrap();
        smf.report(&of("v3", "b")).await.unwrap();
        // Silent vehicles do not count.
        let smf = no_nms(cfg(0), CancellationToken::new());
        smf.set_road(road("127.0.0.1:1")).unwrap();
        for i in 0..5 {
            smf.report(&of(&format!("v{i}"), "a")).await.unwrap();
        }
    }

    #[tokio::test]
    async fn setting_the_road_needs_the_cluster_token() {
        use pb::smf_server::Smf as Service;
        let token = wayside_proto::token::ClusterToken::new("road-0123456789abcdef").unwrap();
        let cfg = SmfConfig { cluster_token: Some(token.clone()), ..Default::default() };
        let smf = no_nms(cfg, CancellationToken::new());
        // Else anyone could point the SMF (and its token) at an address of their own.
        let e = Service::set_road(&smf, Request::new(road("127.0.0.1:1"))).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        Service::set_road(&smf, token.request(road("127.0.0.1:1"))).await.unwrap();
    }
}
