//! TLS on the NMS's hops: vehicles (the client library) to their NMS, NMS to NMS in a move,
//! the SMF to the NMSs and vehicles to the SMF. Real servers on loopback, with a road CA
//! made for the test; the NMSs run over an in-memory store (the PSS's own TLS is tested in
//! the pss crate), except where the NMS-to-PSS hop itself is the point.

use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt as _;
use tokio_util::sync::CancellationToken;
use wayside_nms::client::{ClientError, ClientOptions, VolumeClient};
use wayside_nms::config::Config;
use wayside_nms::smf::service::{Smf, SmfConfig};
use wayside_nms::store::{MemStore, Store};
use wayside_nms::testing::LocalNms;
use wayside_proto::pb;
use wayside_proto::tls::{pki, Tls, TlsFiles};
use wayside_proto::types::{BlockSize, Credential, Endpoint, VolumeName};

/// A road's CA, writing node certificates (for `localhost`, 127.0.0.1 and ::1) into a
/// directory each.
struct Road {
    ca: pki::Ca,
    dir: tempfile::TempDir,
    nodes: usize,
}

impl Road {
    fn new(name: &str) -> Road {
        Road { ca: pki::Ca::new(name).unwrap(), dir: tempfile::tempdir().unwrap(), nodes: 0 }
    }

    /// A node's `[tls]`: its own certificate and key, and the road's CA.
    fn node(&mut self) -> TlsFiles {
        self.nodes += 1;
        let (names, ips) = pki::loopback();
        self.ca.write_road(&self.dir.path().join(format!("n{}", self.nodes)), &names, &ips).unwrap()
    }

    /// A vehicle's TLS: the road's CA only.
    fn vehicle(&mut self) -> Tls {
        let ca = self.node().ca;
        Tls::load(&TlsFiles { ca, ..Default::default() }).unwrap().unwrap()
    }
}

/// An NMS serving TLS with a certificate of `road`, over `store`.
async fn tls_nms(
    name: &str,
    road: &mut Road,
    store: &Arc<MemStore>,
    adjust: impl FnOnce(&mut Config),
) -> LocalNms {
    let tls = road.node();
    let store: Arc<dyn Store> = store.clone();
    LocalNms::start_with_store(name, store, |c| {
        c.tls = tls;
        adjust(c);
    })
    .await
}

/// The NMS's address as `host:port` (which parses as `http://`): a client with TLS dials
/// it over TLS all the same.
fn plain(ep: &Endpoint) -> Endpoint {
    Endpoint::parse(ep.authority()).unwrap()
}

fn opts(nms: &Endpoint, tls: Option<Tls>) -> ClientOptions {
    let mut o = ClientOptions::new(
        vec![nms.clone()],
        VolumeName::new("car-1").unwrap(),
        Credential::new("secret-1").unwrap(),
    );
    o.create_block_size = Some(BlockSize::new(4096).unwrap());
    o.op_timeout = Duration::from_secs(10);
    o.tls = tls;
    o
}

/// A vehicle with the road's CA creates, writes, reads, flushes and stats its volume at an
/// NMS served over TLS, reached at an address written without a scheme.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vehicle_with_the_roads_ca_uses_its_volume_over_tls() {
    let mut road = Road::new("road");
    let store = Arc::new(MemStore::default());
    let a = tls_nms("a", &mut road, &store, |_| {}).await;
    assert!(a.ep.uri().starts_with("https://"), "{}", a.ep);
    let c = VolumeClient::open(opts(&plain(&a.ep), Some(road.vehicle()))).await.unwrap();
    c.write(3, 0, b"over the air, encrypted".to_vec()).await.unwrap();
    assert_eq!(&c.read(3, 0, Some(23)).await.unwrap().unwrap()[..], b"over the air, encrypted");
    let persisted = c.flush().await.unwrap();
    assert!(persisted.0 >= 1, "{persisted:?}");
    assert_eq!(c.stat().await.unwrap().persisted_lsn, persisted.0);
    drop(c);
    a.stop().await;
}

/// A TLS handshake slower than `connect_timeout` (a busy NMS, reached at once) gets up to
/// `rpc_timeout`: the vehicle attaches there rather than passing the NMS over as out of reach
/// (with one NMS it failed every attempt; with more it moved on, and the next NMS took the
/// volume over). The TCP connect alone is held to `connect_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_tls_handshake_gets_rpc_timeout_not_connect_timeout() {
    let mut road = Road::new("road");
    let store = Arc::new(MemStore::default());
    let a = tls_nms("a", &mut road, &store, |_| {}).await;
    // A hop that holds each connection's first bytes for 1.5 s, then relays both ways.
    let proxy = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let via = Endpoint::parse(&proxy.local_addr().unwrap().to_string()).unwrap();
    let target = a.ep.authority().to_owned();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = proxy.accept().await {
            let target = target.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                let mut out = tokio::net::TcpStream::connect(&target).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
            });
        }
    });
    let mut o = opts(&via, Some(road.vehicle()));
    o.connect_timeout = Duration::from_millis(500);
    o.rpc_timeout = Duration::from_secs(5);
    let t = Instant::now();
    let c = VolumeClient::open(o).await.expect("attached through the slow handshake");
    assert!(t.elapsed() >= Duration::from_millis(1500), "{:?}", t.elapsed());
    c.write(1, 0, b"slow but there".to_vec()).await.unwrap();
    assert_eq!(&c.read(1, 0, Some(14)).await.unwrap().unwrap()[..], b"slow but there");
    drop(c);
    a.stop().await;
}

/// A vehicle trusting another road's CA is refused at the handshake, at once and saying so,
/// and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vehicle_trusting_another_ca_is_refused_clearly_and_changes_nothing() {
    let mut road = Road::new("road");
    let mut other = Road::new("another road");
    let store = Arc::new(MemStore::default());
    let a = tls_nms("a", &mut road, &store, |_| {}).await;
    let good = VolumeClient::open(opts(&a.ep, Some(road.vehicle()))).await.unwrap();
    good.write(0, 0, b"before".to_vec()).await.unwrap();
    good.flush().await.unwrap();

    let t = Instant::now();
    let mut o = opts(&a.ep, Some(other.vehicle()));
    o.create_block_size = None;
    let e = VolumeClient::open(o).await.err().expect("refused");
    println!("{e}");
    assert!(matches!(e, ClientError::Tls(_)), "{e:?}");
    let text = e.to_string();
    assert!(text.contains("TLS handshake failed") && text.contains("certificate"), "{text}");
    assert!(text.contains(a.ep.authority()), "names the NMS: {text}");
    assert!(t.elapsed() < Duration::from_secs(5), "said at once, not after retries");

    assert_eq!(&good.read(0, 0, Some(6)).await.unwrap().unwrap()[..], b"before");
    let info = good.stat().await.unwrap();
    assert_eq!(info.accepted_lsn, info.persisted_lsn);
    assert_eq!(info.accepted_lsn, 1, "only the good vehicle's write: {info:?}");
    drop(good);
    a.stop().await;
}

/// A vehicle without TLS set up, given the NMS's plaintext address, fails within its
/// op_timeout (the NMS drops the connection at the failed handshake; nothing hangs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_vehicle_of_a_tls_nms_fails_within_its_op_timeout() {
    let mut road = Road::new("road");
    let store = Arc::new(MemStore::default());
    let a = tls_nms("a", &mut road, &store, |_| {}).await;
    let mut o = opts(&plain(&a.ep), None);
    o.op_timeout = Duration::from_secs(1);
    o.rpc_timeout = Duration::from_millis(500);
    let t = Instant::now();
    let e = VolumeClient::open(o).await.err().expect("refused");
    let took = t.elapsed();
    println!("{e} ({took:?})");
    assert!(took < Duration::from_millis(1_900), "op_timeout is 1 s, took {took:?}");
    assert!(matches!(e, ClientError::Unavailable { .. }), "{e:?}");
    assert!(e.to_string().contains("TLS"), "hints at TLS: {e}");
    a.stop().await;
}

/// A vehicle without TLS set up refuses an https:// address rather than guess trust roots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_address_without_tls_set_up_is_refused_clearly() {
    let mut road = Road::new("road");
    let store = Arc::new(MemStore::default());
    let a = tls_nms("a", &mut road, &store, |_| {}).await;
    let t = Instant::now();
    let e = VolumeClient::open(opts(&a.ep, None)).await.err().expect("refused");
    println!("{e}");
    assert!(matches!(e, ClientError::Tls(_)), "{e:?}");
    assert!(e.to_string().contains("no TLS set up"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(1), "at once");
    a.stop().await;
}

/// A move between two NMSs served over TLS: the source dials the target over TLS (given its
/// address without a scheme), and the vehicle follows the redirect to the target over TLS,
/// its data with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_between_tls_nmss_is_made_and_followed_over_tls() {
    let mut road = Road::new("road");
    let store = Arc::new(MemStore::default());
    let a = tls_nms("a", &mut road, &store, |_| {}).await;
    let b = tls_nms("b", &mut road, &store, |_| {}).await;
    let c = VolumeClient::open(opts(&a.ep, Some(road.vehicle()))).await.unwrap();
    for blk in 0..16u64 {
        c.write(blk, 0, vec![blk as u8; 4096]).await.unwrap();
    }
    let mut admin = wayside_nms::cli::admin_over(a.ep.authority(), a.tls()).await.unwrap();
    let report = admin
        .start_migration(pb::StartMigrationRequest {
            volume: "car-1".into(),
            target_address: plain(&b.ep).uri().into(),
            max_rounds: 0,
            switch_below_bytes: 0,
        })
        .await
        .unwrap()
        .into_inner();
    print!("{}", wayside_nms::cli::render_report(&report));
    assert_eq!(report.outcome, pb::MigrationOutcome::Completed as i32, "{}", report.error);
    // The next call is redirected (to B's https:// address) and followed over TLS.
    c.write(16, 0, vec![16; 4096]).await.unwrap();
    assert_eq!(c.current_nms(), b.ep);
    for blk in 0..17u64 {
        assert_eq!(c.read(blk, 0, None).await.unwrap().unwrap(), vec![blk as u8; 4096]);
    }
    c.flush().await.unwrap();
    drop(c);
    a.stop().await;
    b.stop().await;
}

/// A call refused as UNAUTHENTICATED because its caller presented no road certificate.
fn refused_for_want_of_a_certificate<T: std::fmt::Debug>(r: Result<T, tonic::Status>) {
    let e = r.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("road certificate"), "{e:?}");
}

/// On TLS, admin and migration calls need a road certificate as well as the cluster token:
/// a vehicle (the road's CA, no certificate) that learned the token can neither read a
/// node's status, nor move a volume, nor open a migration stream, nor stop the node; a
/// certificate of another road fails the handshake; the road's certificate with the token
/// is answered, and with a wrong token is not. Vehicle calls still need no certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_and_migration_calls_on_tls_need_a_road_certificate_and_the_token() {
    use wayside_proto::token::ClusterToken;
    let mut road = Road::new("road");
    let store = Arc::new(MemStore::default());
    let token = ClusterToken::new("road-0123456789abcdef").unwrap();
    let t = token.clone();
    let a = tls_nms("a", &mut road, &store, move |c| c.cluster_token = Some(t)).await;
    let c = VolumeClient::open(opts(&a.ep, Some(road.vehicle()))).await.unwrap();
    c.write(0, 0, vec![7; 4096]).await.unwrap();

    let admin = |tls: Tls| {
        let ep = a.ep.clone();
        async move { wayside_nms::cli::admin_over(ep.authority(), Some(&tls)).await }
    };
    let status = || token.request(pb::NodeStatusRequest {});
    // The road's CA only (a vehicle's set-up), with the right token.
    let vehicle = road.vehicle();
    let mut as_vehicle = admin(vehicle.clone()).await.unwrap();
    refused_for_want_of_a_certificate(as_vehicle.node_status(status()).await);
    refused_for_want_of_a_certificate(
        as_vehicle
            .start_migration(token.request(pb::StartMigrationRequest {
                volume: "car-1".into(),
                target_address: "127.0.0.1:9".into(),
                max_rounds: 0,
                switch_below_bytes: 0,
            }))
            .await,
    );
    refused_for_want_of_a_certificate(
        as_vehicle.shutdown(token.request(pb::ShutdownRequest {})).await,
    );
    let ch = wayside_proto::client::endpoint(&a.ep, Some(&vehicle)).unwrap().connect().await;
    let mut mig = pb::migration_client::MigrationClient::new(ch.unwrap());
    refused_for_want_of_a_certificate(
        mig.transfer(token.request(futures::stream::empty::<pb::MigrationFrame>())).await,
    );

    // A certificate of another road fails the handshake.
    let mut foreign = Road::new("another road");
    let theirs = foreign.node();
    let mixed = TlsFiles { ca: road.node().ca, ..theirs };
    let mixed = Tls::load(&mixed).unwrap().unwrap();
    let e = match admin(mixed).await {
        Ok(mut c) => c.node_status(status()).await.unwrap_err(),
        Err(e) => tonic::Status::unavailable(e.to_string()),
    };
    assert_ne!(e.code(), tonic::Code::Ok, "{e:?}");

    // The road's certificate: a wrong token is refused, the token answered.
    let node = Tls::load(&road.node()).unwrap().unwrap();
    let other = ClusterToken::new("road-fedcba9876543210").unwrap();
    let e = admin(node.clone())
        .await
        .unwrap()
        .node_status(other.request(pb::NodeStatusRequest {}))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let st = admin(node).await.unwrap().node_status(status()).await.unwrap().into_inner();
    assert_eq!(st.volumes, 1);
    // Nothing was moved or stopped: the vehicle goes on at A.
    assert_eq!(c.read(0, 0, None).await.unwrap().unwrap(), vec![7; 4096]);
    assert_eq!(c.current_nms(), a.ep);
    drop(c);
    a.stop().await;
}

/// A raw TCP connection to `ep` that sends nothing: it stays open until the server drops
/// it; returns how long that took (None: not within `limit`).
async fn dropped_after(ep: &Endpoint, limit: Duration) -> Option<Duration> {
    let mut s = tokio::net::TcpStream::connect(ep.authority()).await.unwrap();
    let t = Instant::now();
    let mut buf = [0u8; 64];
    match tokio::time::timeout(limit, s.read(&mut buf)).await {
        // EOF or a reset: dropped.
        Ok(Ok(0) | Err(_)) => Some(t.elapsed()),
        Ok(Ok(n)) => panic!("the server sent {n} bytes to a client that sent nothing"),
        Err(_) => None,
    }
}

/// A connection that never starts its TLS handshake is dropped after
/// `tls_handshake_timeout_ms`, and vehicles are served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_tls_handshake_is_dropped_in_time_and_holds_up_nobody() {
    let mut road = Road::new("road");
    let store = Arc::new(MemStore::default());
    let a = tls_nms("a", &mut road, &store, |c| c.tls_handshake_timeout_ms = 300).await;
    let ep = a.ep.clone();
    let stalled = tokio::spawn(async move { dropped_after(&ep, Duration::from_secs(5)).await });
    // Served while the silent connection is open (it is, for 300 ms).
    let c = VolumeClient::open(opts(&a.ep, Some(road.vehicle()))).await.unwrap();
    c.write(0, 0, b"x".to_vec()).await.unwrap();
    let took = stalled.await.unwrap().expect("the silent connection was dropped");
    println!("dropped after {took:?}");
    assert!(took >= Duration::from_millis(250), "not before its time: {took:?}");
    drop(c);
    a.stop().await;
}

/// Past `max_tls_handshakes` handshakes under way, a new connection is closed at once
/// (not after the handshake timeout), and the stalled ones go at their timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_max_tls_handshakes_are_closed_at_once() {
    let mut road = Road::new("road");
    let store = Arc::new(MemStore::default());
    let a = tls_nms("a", &mut road, &store, |c| {
        c.tls_handshake_timeout_ms = 2_000;
        c.max_tls_handshakes = 2;
        c.serve_threads = 1;
    })
    .await;
    // Two connections that send nothing hold both handshake slots for their 2 s (the
    // server takes connections in the order they came).
    let t = Instant::now();
    let mut stalled = Vec::new();
    for _ in 0..2 {
        stalled.push(tokio::net::TcpStream::connect(a.ep.authority()).await.unwrap());
    }
    let third = dropped_after(&a.ep, Duration::from_secs(10)).await.expect("dropped");
    println!("closed after {third:?}");
    assert!(third < Duration::from_millis(1_000), "held to the handshake timeout: {third:?}");
    for mut s in stalled {
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await;
        assert!(matches!(n, Ok(Ok(0) | Err(_))), "{n:?}");
        assert!(t.elapsed() >= Duration::from_millis(1_500), "went early: {:?}", t.elapsed());
    }
    // Slots free again: a vehicle is served.
    let c = VolumeClient::open(opts(&a.ep, Some(road.vehicle()))).await.unwrap();
    c.write(0, 0, b"x".to_vec()).await.unwrap();
    drop(c);
    a.stop().await;
}

/// One source address takes at most `max_tls_handshakes_per_source` of the handshake
/// slots: its next connection is closed at once, while another address's is taken (and
/// held to its handshake timeout, as it sends nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_source_takes_at_most_its_share_of_the_handshake_slots() {
    let mut road = Road::new("road");
    let store = Arc::new(MemStore::default());
    let a = tls_nms("a", &mut road, &store, |c| {
        c.tls_handshake_timeout_ms = 2_000;
        c.max_tls_handshakes = 8;
        c.max_tls_handshakes_per_source = 2;
        c.serve_threads = 1;
    })
    .await;
    let mut stalled = Vec::new();
    for _ in 0..2 {
        stalled.push(tokio::net::TcpStream::connect(a.ep.authority()).await.unwrap());
    }
    let third = dropped_after(&a.ep, Duration::from_secs(10)).await.expect("dropped");
    assert!(third < Duration::from_millis(1_000), "not refused at once: {third:?}");
    // From 127.0.0.2 (loopback too): a slot of its own.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut other = socket.connect(a.ep.authority().parse().unwrap()).await.unwrap();
    let t = Instant::now();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), other.read(&mut buf)).await;
    assert!(matches!(n, Ok(Ok(0) | Err(_))), "{n:?}");
    assert!(t.elapsed() >= Duration::from_millis(1_500), "refused: {:?}", t.elapsed());
    drop(stalled);
    a.stop().await;
}

/// The SMF served over TLS: vehicles report to it over TLS (a plaintext one fails), it
/// checks their credentials with, and moves volumes between, NMSs it dials over TLS (the
/// road's addresses written without a scheme), and drops a stalled handshake in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_smf_serves_and_dials_over_tls() {
    let mut road = Road::new("road");
    let store = Arc::new(MemStore::default());
    let a = tls_nms("a", &mut road, &store, |_| {}).await;
    let b = tls_nms("b", &mut road, &store, |_| {}).await;
    let c = VolumeClient::open(opts(&a.ep, Some(road.vehicle()))).await.unwrap();
    c.write(0, 0, vec![7; 4096]).await.unwrap();

    let cfg = SmfConfig { tls: road.node(), tls_handshake_timeout_ms: 300, ..Default::default() };
    let stop = CancellationToken::new();
    let smf = Smf::new(cfg, stop.clone()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let smf_ep = Endpoint::parse(&format!("https://{}", listener.local_addr().unwrap())).unwrap();
    let served = tokio::spawn(wayside_nms::smf::service::serve(smf, listener, stop.clone()));
    let vehicle_tls = road.vehicle();
    let ch = wayside_proto::client::endpoint(&smf_ep, Some(&vehicle_tls))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = pb::smf_client::SmfClient::new(ch);
    // The road is set by an operator presenting a road certificate.
    let operator_tls = Tls::load(&road.node()).unwrap().unwrap();
    let ch = wayside_proto::client::endpoint(&smf_ep, Some(&operator_tls));
    let mut operator = pb::smf_client::SmfClient::new(ch.unwrap().connect().await.unwrap());

    let rsu = |name: &str, p: f64, nms: &LocalNms| pb::Rsu {
        name: name.into(),
        position_m: p,
        coverage_radius_m: 150.0,
        nms_address: nms.ep.authority().into(),
    };
    let the_road = pb::Road {
        rsus: vec![rsu("A", 100.0, &a), rsu("B", 300.0, &b)],
        handover_execution_s: 0.0,
        time_to_handover_s: 4.0,
    };
    // A vehicle (the road's CA only) cannot set the road.
    let e = client.set_road(the_road.clone()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("road certificate"), "{e:?}");
    operator.set_road(the_road).await.unwrap();
    // At 249.5 m, 10 m/s: the handover out of A is 0.05 s away, a reactive move A -> B.
    let report = |credential: &str| pb::VehicleReport {
        vehicle: "car".into(),
        volume: "car-1".into(),
        time_s: 0.0,
        position_m: 249.5,
        speed_mps: 10.0,
        serving_rsu: "A".into(),
        cached_bytes: 4096,
        dirty_bytes: 0,
        credential: credential.into(),
    };
    let e = client.report_vehicle(report("guess")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "checked with A over TLS: {e:?}");
    let d = client.report_vehicle(report("secret-1")).await.unwrap().into_inner();
    assert_eq!(d.kind, pb::MoveKind::Reactive as i32, "{d:?}");
    // Where vehicles drove is for the road's operators, not for a vehicle.
    let e = client.list_moves(pb::ListMovesRequest::default()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
    let deadline = Instant::now() + Duration::from_secs(20);
    let m = loop {
        let moves = operator
            .list_moves(pb::ListMovesRequest { vehicle: "car".into() })
            .await
            .unwrap()
            .into_inner()
            .moves;
        if let Some(m) = moves.into_iter().next() {
            break m;
        }
        assert!(Instant::now() < deadline, "no move recorded");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(m.ok, "the move over TLS: {m:?}");
    assert_eq!(c.read(0, 0, None).await.unwrap().unwrap(), vec![7; 4096]);
    assert_eq!(c.current_nms(), b.ep, "followed to B");

    // A vehicle without TLS is not served.
    let plain_ch =
        tonic::transport::Endpoint::from_shared(format!("http://{}", smf_ep.authority()))
            .unwrap()
            .connect()
            .await;
    if let Ok(ch) = plain_ch {
        let r = pb::smf_client::SmfClient::new(ch).get_road(pb::GetRoadRequest {}).await;
        assert!(r.is_err(), "a plaintext call was answered");
    }
    // A silent connection is dropped after the SMF's tls_handshake_timeout_ms.
    let took = dropped_after(&smf_ep, Duration::from_secs(5)).await.expect("dropped");
    assert!(took >= Duration::from_millis(250), "{took:?}");

    stop.cancel();
    served.await.unwrap().unwrap();
    drop(c);
    a.stop().await;
    b.stop().await;
}

/// An NMS set up for TLS dials its PSS over TLS only: against a plaintext PSS its calls
/// fail with the TLS handshake's error, where a plaintext NMS's succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_nms_never_dials_its_pss_in_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = wayside_pss::testing::LocalCluster::start(1, dir.path()).await.unwrap();
    let mut road = Road::new("road");
    let tls = road.node();
    let a = LocalNms::start("a", &cluster.endpoints(), |c| {
        c.tls = tls;
        c.pss_deadline_ms = 500;
    })
    .await;
    let e = a
        .raw()
        .await
        .create_volume(pb::CreateVolumeRequest {
            auth: Some(wayside_proto::convert::to_volume_auth(
                &VolumeName::new("car-1").unwrap(),
                &Credential::new("secret-1").unwrap(),
            )),
            block_size: 4096,
            take_over: false,
        })
        .await
        .unwrap_err();
    println!("{e:?}");
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    // rustls's words for a reply that is no TLS record (the PSS client's error).
    assert!(e.message().contains("received corrupt message"), "{e:?}");
    a.stop().await;
    let p = LocalNms::start("p", &cluster.endpoints(), |_| {}).await;
    VolumeClient::open(opts(&p.ep, None)).await.unwrap();
    p.stop().await;
    cluster.shutdown().await;
}

/// `nms` run as a command with `args` (no TLS or cluster token from the environment but
/// the `WAYSIDE_TLS_*` variables in `env`), to its end.
async fn nms(args: &[&str], env: &[(&str, &std::path::Path)]) -> std::process::Output {
    let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_nms"));
    c.args(args).env_remove("WAYSIDE_CLUSTER_TOKEN");
    for v in ["WAYSIDE_TLS_CA", "WAYSIDE_TLS_CERT", "WAYSIDE_TLS_KEY"] {
        c.env_remove(v);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    let out = tokio::time::timeout(Duration::from_secs(20), c.output())
        .await
        .expect("the command ends")
        .unwrap();
    println!(
        "nms {args:?}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `nms serve --tls-cert --tls-key --tls-ca` serves TLS; the operator commands reach it with
/// --tls-ca and an operator's road certificate (--tls-cert/--tls-key, or WAYSIDE_TLS_*), and
/// say what is wrong without them or with another road's CA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_serves_and_calls_over_tls() {
    let mut road = Road::new("road");
    let files = road.node();
    let (cert, key, ca) = (files.cert.unwrap(), files.key.unwrap(), files.ca.unwrap());
    let mut other = Road::new("another road");
    let other_ca = other.node().ca.unwrap();
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_nms"))
        .args(["serve", "--listen", "127.0.0.1:0", "--node-id", "cli", "--pss", "127.0.0.1:1"])
        .arg("--tls-cert")
        .arg(&cert)
        .arg("--tls-key")
        .arg(&key)
        .arg("--tls-ca")
        .arg(&ca)
        .env_remove("WAYSIDE_CLUSTER_TOKEN")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut out = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    tokio::io::AsyncBufReadExt::read_line(&mut out, &mut line).await.unwrap();
    let addr = line.trim().strip_prefix("listening on ").expect("the address").to_owned();
    let https = Endpoint::parse(&format!("https://{addr}")).unwrap();
    wayside_nms::testing::wait_healthy_tls(&https, Some(&road.vehicle())).await;
    let ca_s = ca.to_str().unwrap();

    // An operator's certificate of the road (not the NMS's own).
    let operator = road.node();
    let (op_cert, op_key) = (operator.cert.unwrap(), operator.key.unwrap());
    let (op_cert_s, op_key_s) = (op_cert.to_str().unwrap(), op_key.to_str().unwrap());
    let certified = ["--tls-ca", ca_s, "--tls-cert", op_cert_s, "--tls-key", op_key_s];
    let ok = nms(&[&["status", "--nms", &addr][..], &certified].concat(), &[]).await;
    assert!(ok.status.success());
    let text = String::from_utf8_lossy(&ok.stdout);
    assert!(text.contains(&format!("at https://{addr}")), "advertised over TLS: {text}");
    let env =
        [("WAYSIDE_TLS_CA", &*ca), ("WAYSIDE_TLS_CERT", &*op_cert), ("WAYSIDE_TLS_KEY", &*op_key)];
    assert!(nms(&["status", "--nms", &addr], &env).await.status.success());
    // The CA alone (what a vehicle has) does not make an operator.
    let ca_only = nms(&["status", "--nms", &addr, "--tls-ca", ca_s], &[]).await;
    let err = String::from_utf8_lossy(&ca_only.stderr);
    assert!(!ca_only.status.success());
    assert!(err.contains("road certificate") && err.contains("--tls-cert"), "{err}");
    let half_args = ["status", "--nms", &addr, "--tls-ca", ca_s, "--tls-cert", op_cert_s];
    let half = nms(&half_args, &[]).await;
    let err = String::from_utf8_lossy(&half.stderr);
    assert!(!half.status.success());
    assert!(err.contains("--tls-key"), "{err}");

    let no_tls = nms(&["status", "--nms", https.uri()], &[]).await;
    let err = String::from_utf8_lossy(&no_tls.stderr);
    assert!(!no_tls.status.success());
    assert!(err.contains("no TLS set up") && err.contains("--tls-ca"), "{err}");
    let plaintext = nms(&["status", "--nms", &addr], &[]).await;
    let err = String::from_utf8_lossy(&plaintext.stderr);
    assert!(!plaintext.status.success());
    assert!(err.contains("if the NMS serves TLS"), "{err}");
    let wrong = nms(&["status", "--nms", &addr, "--tls-ca", other_ca.to_str().unwrap()], &[]).await;
    let err = String::from_utf8_lossy(&wrong.stderr);
    assert!(!wrong.status.success());
    assert!(err.contains("TLS handshake failed") && err.contains("UnknownIssuer"), "{err}");

    let shutdown = nms(&[&["shutdown", "--nms", &addr][..], &certified].concat(), &[]).await;
    assert!(shutdown.status.success());
    let exit = tokio::time::timeout(Duration::from_secs(20), child.wait()).await.unwrap().unwrap();
    assert!(exit.success(), "{exit}");
}
