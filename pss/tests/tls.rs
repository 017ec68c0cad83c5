//! TLS on every PSS hop (DESIGN.md section 8), with real nodes on loopback and the real
//! Raft log: a TLS cluster elects, replicates and serves a road client; callers without a
//! certificate signed by the road's CA (none, a foreign CA's, plaintext) are refused and
//! write nothing; a foreign certificate cannot reach the Raft transport, nor can a road
//! certificate that does not name the address of the peer it claims to be; a node with a
//! certificate but no CA refuses to start; the CLI talks to a TLS cluster with a road
//! certificate.

use std::time::{Duration, Instant};
use tonic::Code;
use wayside_proto::pb;
use wayside_proto::pb::pss_blocks_client::PssBlocksClient;
use wayside_proto::pb::raft_transport_client::RaftTransportClient;
use wayside_proto::tls::{pki, Tls, TlsFiles};
use wayside_proto::types::{Endpoint, VolumeName};
use wayside_pss::client::{ClientOptions, PssClient, PssError};
use wayside_pss::testing::{test_config, LocalCluster};

mod common;
use common::{acquire, put, stale_blocks, start_joiner, wait_applied};

/// A client of `cluster` dialling with `tls`, giving up after a few seconds (a refused
/// caller's calls fail; retrying them longer proves nothing more).
fn client_with(cluster: &LocalCluster, tls: Option<Tls>) -> PssClient {
    let opts = ClientOptions {
        tls,
        rpc_timeout: Duration::from_secs(2),
        deadline: Duration::from_secs(3),
        ..ClientOptions::default()
    };
    PssClient::new(cluster.endpoints(), opts)
}

/// The road's CA file of a TLS cluster.
fn road_ca(cluster: &LocalCluster) -> std::path::PathBuf {
    cluster.tls().unwrap().client_files.ca.clone().unwrap()
}

/// A certificate and key signed by a CA that is not the road's, with the road's CA to
/// check the servers by: the client verifies the nodes and offers its certificate, so
/// only the node's check of the caller can refuse it.
fn foreign_identity(cluster: &LocalCluster, dir: &std::path::Path) -> Tls {
    let other = pki::Ca::new("another road").unwrap();
    let (names, ips) = pki::loopback();
    let files = other.write_road(dir, &names, &ips).unwrap();
    let mixed = TlsFiles { ca: Some(road_ca(cluster)), ..files };
    Tls::load(&mixed).unwrap().unwrap()
}

/// The peers' own identity: the certificate every node of a test cluster serves with and
/// presents to its peers (it names 127.0.0.1, every node's address).
fn node_identity(cluster: &LocalCluster) -> Tls {
    Tls::load(&cluster.tls().unwrap().node_files).unwrap().unwrap()
}

/// A road certificate (signed by the road's CA) for another machine: one reached at
/// 10.9.9.9 only, as an NMS on a road-side unit would hold. It names no peer's address.
fn other_machine_identity(cluster: &LocalCluster, dir: &std::path::Path) -> Tls {
    let ips = [std::net::IpAddr::from([10, 9, 9, 9])];
    let files = cluster.tls().unwrap().ca.write_road(dir, &[], &ips).unwrap();
    Tls::load(&files).unwrap().unwrap()
}

/// Makes volume `vol` with block 0 written, through the road client; returns its epoch.
async fn volume_with_block_0(cluster: &LocalCluster, vol: &str) -> u64 {
    let good = cluster.client();
    let epoch = good.acquire_volume(acquire(vol, "nms-a", 1)).await.unwrap().meta.unwrap().epoch;
    good.write_batch(put(vol, epoch, "nms-a", 2, 0, vec![1; 4096])).await.unwrap();
    epoch
}

/// What a refused caller tried did not happen: block 1 of `vol` and volume `new_vol` do
/// not exist, as the road client reads them (linearizably, from the leader).
async fn nothing_written(cluster: &LocalCluster, vol: &str, new_vol: &str) {
    let good = cluster.client();
    let got = good.get_blocks(&VolumeName::new(vol).unwrap(), &[0, 1]).await.unwrap();
    assert!(got[0].found, "block 0 was written by the road client");
    assert!(!got[1].found, "a refused caller's write was applied");
    let err = good.get_volume(&VolumeName::new(new_vol).unwrap()).await.unwrap_err();
    assert!(matches!(err, PssError::NotFound(_)), "a refused caller made a volume: {err:?}");
}

/// What a refused caller tries: a write to an existing volume, a new volume, a read.
/// Every one must fail.
async fn try_everything(client: &PssClient, vol: &str, epoch: u64, new_vol: &str) {
    let w = client.write_batch(put(vol, epoch, "intruder", 1, 1, vec![0xEE; 4096])).await;
    assert!(w.is_err(), "a refused caller's write succeeded: {w:?}");
    let a = client.acquire_volume(acquire(new_vol, "intruder", 2)).await;
    assert!(a.is_err(), "a refused caller made a volume: {a:?}");
    let r = client.get_blocks(&VolumeName::new(vol).unwrap(), &[0]).await;
    assert!(r.is_err(), "a refused caller read a block: {r:?}");
}

/// (a) Three TLS nodes elect a leader (Raft messages over TLS, each node presenting its
/// certificate to its peers) and replicate; a road client writes and reads back, and every
/// node has the blocks applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_elects_replicates_and_serves_a_road_client() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start_tls(3, dir.path()).await.unwrap();
    assert!(cluster.client_tls().is_some_and(|t| t.has_identity() && t.has_ca()));
    let client = cluster.client();
    let vol = VolumeName::new("car-tls").unwrap();
    let epoch =
        client.acquire_volume(acquire("car-tls", "nms-a", 1)).await.unwrap().meta.unwrap().epoch;
    let mut last = 0;
    for b in 0..16u64 {
        let r = client
            .write_batch(put("car-tls", epoch, "nms-a", 10 + b, b, vec![b as u8; 4096]))
            .await
            .unwrap();
        last = last.max(r.raft_index);
    }
    let got = client.get_blocks(&vol, &(0..16).collect::<Vec<_>>()).await.unwrap();
    for (b, block) in got.iter().enumerate() {
        assert!(block.found, "block {b}");
        assert_eq!(block.data, vec![b as u8; 4096], "block {b}");
    }
    // Every node applied them: the log reached the followers over TLS.
    for id in 1..=3 {
        wait_applied(&cluster, id, last).await;
        let blocks = stale_blocks(&cluster, id, "car-tls", 16).await;
        for (b, block) in blocks.iter().enumerate() {
            assert_eq!(block.data, vec![b as u8; 4096], "node {id} block {b}");
        }
    }
    // Leadership moves over TLS too: hand it to another node, which then serves writes.
    // Changing the cluster takes a PSS node's certificate: a road client's (an NMS's, an
    // operator's) reads and writes blocks but is refused it.
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await.unwrap();
    let next = (1..=3).find(|id| *id != leader).unwrap();
    let opts = ClientOptions {
        tls: cluster.client_tls(),
        deadline: Duration::from_secs(3),
        ..ClientOptions::default()
    };
    let refused = PssClient::new(cluster.endpoints(), opts).transfer_leader(next).await;
    let e = format!("{:?}", refused.unwrap_err());
    assert!(e.contains("needs a PSS node's certificate"), "{e}");
    for (name, r) in [
        ("AddNode", client.add_node(9, "10.9.9.9:7400", false).await.map(|_| ())),
        ("RemoveNode", client.remove_node(next).await.map(|_| ())),
    ] {
        let e = format!("{:?}", r.unwrap_err());
        assert!(e.contains(name) && e.contains("PSS node's certificate"), "{e}");
    }
    assert_eq!(cluster.status(next).await.unwrap().members.len(), 3, "membership unchanged");
    let opts = ClientOptions { tls: Some(node_identity(&cluster)), ..ClientOptions::default() };
    let r = PssClient::new(cluster.endpoints(), opts).transfer_leader(next).await.unwrap();
    assert_eq!(r.leader_id, next);
    client.write_batch(put("car-tls", epoch, "nms-a", 99, 99, vec![9; 4096])).await.unwrap();
    assert_eq!(client.get_blocks(&vol, &[99]).await.unwrap()[0].data, vec![9; 4096]);
    cluster.shutdown().await;
}

/// (b) A caller that trusts the road's CA but presents no certificate is refused by every
/// node: its writes, volume creations and reads fail, and nothing it sent is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_without_a_certificate_is_refused_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start_tls(3, dir.path()).await.unwrap();
    let epoch = volume_with_block_0(&cluster, "car-b").await;
    let ca_only = TlsFiles { ca: Some(road_ca(&cluster)), ..TlsFiles::default() };
    let ca_only = Tls::load(&ca_only).unwrap().unwrap();
    assert!(!ca_only.has_identity());
    try_everything(&client_with(&cluster, Some(ca_only)), "car-b", epoch, "car-b-new").await;
    nothing_written(&cluster, "car-b", "car-b-new").await;
    cluster.shutdown().await;
}

/// (c) A caller whose certificate a different CA signed is refused, though it trusts the
/// road's CA (so the refusal is the node's check of the caller, not the caller's of the
/// node).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_with_a_foreign_ca_certificate_is_refused_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start_tls(3, dir.path()).await.unwrap();
    let epoch = volume_with_block_0(&cluster, "car-c").await;
    let foreign = foreign_identity(&cluster, &dir.path().join("foreign"));
    try_everything(&client_with(&cluster, Some(foreign)), "car-c", epoch, "car-c-new").await;
    nothing_written(&cluster, "car-c", "car-c-new").await;
    cluster.shutdown().await;
}

/// (d) A plaintext caller gets an error promptly (the TLS server closes on its cleartext
/// HTTP/2 preface), not a hang, and writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_client_fails_promptly_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start_tls(3, dir.path()).await.unwrap();
    let epoch = volume_with_block_0(&cluster, "car-d").await;
    for ep in cluster.endpoints() {
        let e = wayside_proto::client::endpoint(&ep, None).unwrap();
        let mut raw = PssBlocksClient::new(wayside_proto::client::connect_lazy(&e));
        let call = raw.write_batch(put("car-d", epoch, "plain", 1, 1, vec![2; 4096]));
        let r = tokio::time::timeout(Duration::from_secs(3), call)
            .await
            .unwrap_or_else(|_| panic!("a plaintext call to {ep} hung"));
        // The code varies with when the node's close is seen (UNAVAILABLE, CANCELLED with
        // "connection closed", ...); what matters is that the call failed, promptly.
        let st = r.expect_err("a plaintext write to a TLS node succeeded");
        assert_ne!(st.code(), Code::Ok, "{ep}: {st:?}");
    }
    try_everything(&client_with(&cluster, None), "car-d", epoch, "car-d-new").await;
    nothing_written(&cluster, "car-d", "car-d-new").await;
    cluster.shutdown().await;
}

/// A `Send` stream to node 1 carrying `env`, dialled with `tls`.
async fn raft_send(ep: &Endpoint, tls: &Tls, env: pb::RaftEnvelope) -> Result<(), tonic::Status> {
    let e = wayside_proto::client::endpoint(ep, Some(tls)).unwrap();
    let mut c = RaftTransportClient::new(wayside_proto::client::connect_lazy(&e));
    let call = c.send(futures::stream::iter([env]));
    match tokio::time::timeout(Duration::from_secs(10), call).await {
        Ok(r) => r.map(|_| ()),
        Err(_) => panic!("a raft send to {ep} hung"),
    }
}

/// (f) A would-be peer with a certificate from another CA cannot reach the Raft transport:
/// a heartbeat from a far later term, which would depose the leader were it delivered, is
/// refused and no node's term moves. With the nodes' own certificate the same transport
/// answers (a misaddressed envelope gets the service's own refusal), so the refusal above
/// is the TLS check.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_a_foreign_certificate_cannot_reach_the_raft_transport() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start_tls(3, dir.path()).await.unwrap();
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await.unwrap();
    let term = cluster.status(leader).await.unwrap().term;
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let ep = cluster.endpoint(follower).unwrap();

    let peer = node_identity(&cluster);
    let misaddressed = pb::RaftEnvelope { from: leader, to: 99, messages: Vec::new() };
    let st = raft_send(&ep, &peer, misaddressed).await.unwrap_err();
    assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}");

    let foreign = foreign_identity(&cluster, &dir.path().join("foreign"));
    let env = forged_heartbeat(leader, follower, term + 100);
    let st = raft_send(&ep, &foreign, env).await.unwrap_err();
    assert_ne!(
        st.code(),
        Code::FailedPrecondition,
        "the foreign caller reached the service: {st:?}"
    );
    for id in 1..=3 {
        let s = cluster.status(id).await.unwrap();
        assert!(s.term < term + 100, "node {id} took the forged term: {s:?}");
    }
    cluster.shutdown().await;
}

/// Even a peer with the nodes' own certificate sends only the kinds of Raft message peers
/// send each other on the `Send` stream: a proposal (this code never forwards one; a forged
/// membership change in it, once committed, would stop every node at every start) or a
/// snapshot (it comes on `InstallSnapshot`, with its file) is refused, and the cluster's
/// membership is unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_only_raft_messages_are_refused_on_the_send_stream() {
    use raft::prelude::{Entry, EntryType, MessageType};
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start_tls(3, dir.path()).await.unwrap();
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await.unwrap();
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let peer = node_identity(&cluster);
    let members = cluster.status(leader).await.unwrap().members;
    for kind in [MessageType::MsgPropose, MessageType::MsgSnapshot, MessageType::MsgHup] {
        let mut m = raft::prelude::Message::default();
        m.set_msg_type(kind);
        m.from = follower;
        m.to = leader;
        let mut e = Entry::default();
        e.set_entry_type(EntryType::EntryConfChange);
        e.data = vec![0xff; 8].into();
        m.entries = vec![e].into();
        let st = raft_send(&cluster.endpoint(leader).unwrap(), &peer, envelope(&m)).await;
        let st = st.unwrap_err();
        assert_eq!(st.code(), Code::InvalidArgument, "{kind:?}: {st:?}");
        assert!(st.message().contains("not sent between nodes"), "{kind:?}: {st:?}");
    }
    // (A heartbeat, which peers do send, is taken: the same call with one succeeds.)
    let term = cluster.status(leader).await.unwrap().term;
    let hb = forged_heartbeat(leader, follower, term);
    raft_send(&cluster.endpoint(follower).unwrap(), &peer, hb).await.unwrap();
    let client = cluster.client();
    let epoch = client
        .acquire_volume(pb::AcquireVolumeRequest {
            volume: "after".into(),
            owner_node: "nms".into(),
            owner_address: "127.0.0.1:9".into(),
            owner_session: 0,
            expected_epoch: 0,
            create: Some(pb::CreateSpec { block_size: 4096, credential_hash: vec![7; 32] }),
            request_id: Some(pb::RequestId { client_id: "t".into(), seq: 1 }),
        })
        .await
        .unwrap()
        .meta
        .unwrap()
        .epoch;
    assert_eq!(epoch, 1);
    for id in 1..=3 {
        assert_eq!(cluster.status(id).await.unwrap().members, members, "node {id}");
    }
    cluster.shutdown().await;
}

/// (e) A node with a certificate and key but no CA could not check its callers: it refuses
/// to start, naming tls.ca, before making its data dir; a missing file is named; a zero
/// handshake timeout is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_certificate_but_no_ca_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let road = wayside_pss::testing::ClusterTls::make(&dir.path().join("tls")).unwrap();
    let start = |tls: TlsFiles, adjust: fn(&mut wayside_pss::config::Config)| {
        let data = dir.path().join("node-1");
        async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap().to_string();
            let peers = vec![wayside_pss::config::Peer { id: 1, address: addr }];
            let mut config = test_config(1, peers, data);
            config.tls = tls;
            adjust(&mut config);
            let token = tokio_util::sync::CancellationToken::new();
            let run = wayside_pss::server::run(config, listener, token.clone());
            let r = tokio::time::timeout(Duration::from_secs(10), run).await;
            token.cancel();
            let r = r.expect("a node that cannot start returns, not serves");
            format!("{:#}", r.expect_err("the node started"))
        }
    };
    let no_ca = TlsFiles { ca: None, ..road.node_files.clone() };
    let e = start(no_ca, |_| {}).await;
    assert!(e.contains("tls.ca"), "{e}");
    assert!(!dir.path().join("node-1").exists(), "the data dir was made before the TLS check");

    let missing = TlsFiles { cert: Some(dir.path().join("nope.pem")), ..road.node_files.clone() };
    let e = start(missing, |_| {}).await;
    assert!(e.contains("tls.cert") && e.contains("nope.pem"), "{e}");

    let ca_only = TlsFiles { ca: road.node_files.ca.clone(), ..TlsFiles::default() };
    let e = start(ca_only, |_| {}).await;
    assert!(e.contains("tls.cert and tls.key are needed"), "{e}");

    let e = start(road.node_files.clone(), |c| c.tls_handshake_timeout_ms = 0).await;
    assert!(e.contains("tls_handshake_timeout_ms"), "{e}");

    // The binary: --tls-cert/--tls-key override the config, and WAYSIDE_TLS_CA in the
    // environment does not stand in for tls.ca (it is for the client subcommands).
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pss"))
        .env("WAYSIDE_TLS_CA", road.node_files.ca.as_ref().unwrap())
        .args(["serve", "--id", "1", "--listen", "127.0.0.1:0", "--peers", "1=127.0.0.1:1"])
        .arg("--data-dir")
        .arg(dir.path().join("node-cli"))
        .arg("--tls-cert")
        .arg(road.node_files.cert.as_ref().unwrap())
        .arg("--tls-key")
        .arg(road.node_files.key.as_ref().unwrap())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "pss serve started without tls.ca: {stderr}");
    assert!(stderr.contains("tls.ca"), "{stderr}");

    // TLS files in the environment only: the node would serve plaintext, so it refuses.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pss"))
        .env("WAYSIDE_TLS_CA", road.node_files.ca.as_ref().unwrap())
        .env("WAYSIDE_TLS_CERT", road.node_files.cert.as_ref().unwrap())
        .env("WAYSIDE_TLS_KEY", road.node_files.key.as_ref().unwrap())
        .args(["serve", "--id", "1", "--listen", "127.0.0.1:0", "--peers", "1=127.0.0.1:1"])
        .arg("--data-dir")
        .arg(dir.path().join("node-env"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "pss serve started in plaintext: {stderr}");
    assert!(stderr.contains("would serve plaintext"), "{stderr}");
}

/// The CLI talks to a TLS cluster with a road certificate, from flags or from
/// WAYSIDE_TLS_*; without one it gets no answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_talks_to_a_tls_cluster_with_a_road_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start_tls(3, dir.path()).await.unwrap();
    let files = cluster.tls().unwrap().client_files.clone();
    let list = cluster.endpoints().iter().map(|e| e.authority().to_owned()).collect::<Vec<_>>();
    let cli = |args: &[&str]| {
        let mut c = tokio::process::Command::new(env!("CARGO_BIN_EXE_pss"));
        c.env_remove("WAYSIDE_TLS_CA").env_remove("WAYSIDE_TLS_CERT").env_remove("WAYSIDE_TLS_KEY");
        c.arg("--pss").arg(list.join(",")).args(args);
        c
    };
    let text = |o: &std::process::Output| {
        format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
    };

    let out = cli(&["status"])
        .arg("--tls-ca")
        .arg(files.ca.as_ref().unwrap())
        .arg("--tls-cert")
        .arg(files.cert.as_ref().unwrap())
        .arg("--tls-key")
        .arg(files.key.as_ref().unwrap())
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("leader"), "{}", text(&out));

    let block = dir.path().join("block");
    std::fs::write(&block, b"over tls").unwrap();
    let with_env = |args: &[&str]| {
        let mut c = cli(args);
        c.env("WAYSIDE_TLS_CA", files.ca.as_ref().unwrap())
            .env("WAYSIDE_TLS_CERT", files.cert.as_ref().unwrap())
            .env("WAYSIDE_TLS_KEY", files.key.as_ref().unwrap());
        c
    };
    let out =
        with_env(&["put", "cli-vol", "3", block.to_str().unwrap(), "--create-block-size", "4096"])
            .output()
            .await
            .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    let out = with_env(&["get", "cli-vol", "3"]).output().await.unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(out.stdout, b"over tls");

    // Plaintext: every node refuses it.
    let out = cli(&["status"]).output().await.unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("no PSS node answered"), "{}", text(&out));
    // A CA but no certificate: a warning, then the nodes refuse.
    let out = cli(&["status", "--tls-ca", files.ca.as_ref().unwrap().to_str().unwrap()])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("no --tls-cert"), "{}", text(&out));
    // A certificate without the CA: refused before dialling, naming the flag.
    let out = with_env(&["status"]).env_remove("WAYSIDE_TLS_CA").output().await.unwrap();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("--tls-ca"), "{}", text(&out));
    cluster.shutdown().await;
}

/// A caller that connects and never starts its TLS handshake is closed after
/// `tls_handshake_timeout_ms`, not held open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_tls_handshake_is_closed_after_the_handshake_timeout() {
    use tokio::io::AsyncReadExt as _;
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start_tls_with(1, dir.path(), |c| c.tls_handshake_timeout_ms = 300)
        .await
        .unwrap();
    let addr = cluster.endpoint(1).unwrap().authority().to_owned();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 64];
    let r = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("a stalled handshake was held open");
    // Closed (EOF) or reset; nothing was sent to it.
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    assert!(started.elapsed() >= Duration::from_millis(250), "{:?}", started.elapsed());
    cluster.shutdown().await;
}

/// A road caller that finishes its TLS handshake and then never speaks HTTP/2 (the TLS
/// handshake timeout is over, and hyper pings only once the preface is in) is closed after
/// `silent_connection_timeout_ms`, not held open with its connection slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_silent_after_its_tls_handshake_is_closed_after_the_silence_limit() {
    use tokio::io::AsyncReadExt as _;
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start_tls_with(1, dir.path(), |c| {
        c.http2_keepalive_interval_ms = 100;
        c.http2_keepalive_timeout_ms = 100;
        c.silent_connection_timeout_ms = 800;
    })
    .await
    .unwrap();
    let addr = cluster.endpoint(1).unwrap().authority().to_owned();
    let client = Tls::load(&cluster.tls().unwrap().client_files).unwrap().unwrap();
    let connector = tokio_rustls::TlsConnector::from(client.client_config().unwrap());
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let name = rustls_pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let mut tls = connector.connect(name, tcp).await.expect("a road caller's handshake");
    let handshaken = Instant::now();
    let mut sent = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(10), tls.read_to_end(&mut sent)).await;
    assert!(r.is_ok(), "a caller silent after its handshake was held open 10 s");
    let held = handshaken.elapsed();
    assert!(held >= Duration::from_millis(400), "closed after {held:?}, before the limit");
    cluster.shutdown().await;
}

/// (f) Joining over TLS: a new node with a road certificate is added, gets the data (a
/// joiner starts from a snapshot: `InstallSnapshot` over TLS) and votes; a node whose
/// certificate another CA signed is never reached (the leader does not trust it, nor it
/// the leader), so it cannot become a voter, gets nothing, and the cluster carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_road_node_joins_over_tls_and_a_foreign_one_cannot() {
    let dir = tempfile::tempdir().unwrap();
    let cluster =
        LocalCluster::start_tls_with(3, dir.path(), |c| c.learner_catch_up_timeout_ms = 2_000)
            .await
            .unwrap();
    let road = cluster.tls().unwrap();
    let epoch = volume_with_block_0(&cluster, "car-j").await;
    // Membership changes take a PSS node's certificate.
    let opts = ClientOptions { tls: Some(node_identity(&cluster)), ..ClientOptions::default() };
    let client = PssClient::new(cluster.endpoints(), opts);

    let (addr4, stop4, node4) =
        start_joiner(&cluster, 4, road.node_files.clone(), dir.path()).await;
    let members = client.add_node(4, &addr4, false).await.unwrap().members;
    assert!(members.iter().any(|m| m.id == 4 && m.role == pb::MemberRole::Voter as i32));
    let ep4 = Endpoint::parse(&addr4).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let req = pb::GetBlocksRequest {
            volume: "car-j".into(),
            blocks: vec![0],
            consistency: pb::ReadConsistency::Stale as i32,
        };
        let r = PssBlocksClient::new(cluster.channel(&ep4).unwrap()).get_blocks(req).await;
        if r.as_ref().is_ok_and(|r| r.get_ref().blocks[0].found) {
            assert_eq!(r.unwrap().into_inner().blocks[0].data, vec![1; 4096]);
            break;
        }
        assert!(Instant::now() < deadline, "node 4 never got the data: {r:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A node with a foreign certificate (trusting the road's CA, so it could dial).
    let other = pki::Ca::new("another road").unwrap();
    let (names, ips) = pki::loopback();
    let foreign = other.write_road(&dir.path().join("foreign"), &names, &ips).unwrap();
    let rogue = TlsFiles { ca: road.node_files.ca.clone(), ..foreign.clone() };
    let (addr5, stop5, node5) = start_joiner(&cluster, 5, rogue, dir.path()).await;
    let opts = ClientOptions {
        tls: cluster.client_tls(),
        deadline: Duration::from_secs(10),
        rpc_timeout: Duration::from_secs(5),
        ..ClientOptions::default()
    };
    let err = PssClient::new(cluster.endpoints(), opts).add_node(5, &addr5, false).await;
    assert!(err.is_err(), "a node no member can reach became a voter: {err:?}");
    let members = client.members().await.unwrap().members;
    assert!(
        !members.iter().any(|m| m.id == 5 && m.role == pb::MemberRole::Voter as i32),
        "{members:?}"
    );
    // The cluster carries on, node 4 voting.
    client.write_batch(put("car-j", epoch, "nms-a", 3, 2, vec![2; 4096])).await.unwrap();
    assert_eq!(
        client.get_blocks(&VolumeName::new("car-j").unwrap(), &[2]).await.unwrap()[0].data,
        vec![2; 4096]
    );
    // Node 5 got nothing: asked by a caller it accepts and trusts (a road certificate,
    // its own CA to check it by), it has applied no entry.
    let probe = TlsFiles { ca: foreign.ca.clone(), ..road.client_files.clone() };
    let probe = Tls::load(&probe).unwrap().unwrap();
    let e =
        wayside_proto::client::endpoint(&Endpoint::parse(&addr5).unwrap(), Some(&probe)).unwrap();
    let mut admin = pb::pss_admin_client::PssAdminClient::new(e.connect().await.unwrap());
    let st = admin.status(pb::StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(st.applied_index, 0, "node 5 applied entries: {st:?}");
    assert_eq!(st.leader_id, 0, "node 5 heard from a leader: {st:?}");

    stop5.cancel();
    stop4.cancel();
    let _ = node5.await;
    let _ = node4.await;
    cluster.shutdown().await;
}

/// A heartbeat from `from` to `to` in `term`, in an envelope.
fn forged_heartbeat(from: u64, to: u64, term: u64) -> pb::RaftEnvelope {
    let mut hb = raft::prelude::Message::default();
    hb.set_msg_type(raft::prelude::MessageType::MsgHeartbeat);
    hb.from = from;
    hb.to = to;
    hb.term = term;
    envelope(&hb)
}

/// `m` alone in an envelope from its sender to its receiver.
fn envelope(m: &raft::prelude::Message) -> pb::RaftEnvelope {
    use protobuf::Message as _;
    pb::RaftEnvelope { from: m.from, to: m.to, messages: vec![m.write_to_bytes().unwrap()] }
}

/// An `InstallSnapshot` to `ep` claiming to come from `from`: a `MsgSnapshot` of a far
/// later term and an empty file, dialled with `tls`.
async fn raft_snapshot(
    ep: &Endpoint,
    tls: &Tls,
    from: u64,
    to: u64,
    term: u64,
) -> Result<(), tonic::Status> {
    use protobuf::Message as _;
    let mut m = raft::prelude::Message::default();
    m.set_msg_type(raft::prelude::MessageType::MsgSnapshot);
    m.from = from;
    m.to = to;
    m.term = term;
    m.mut_snapshot().mut_metadata().index = 1_000_000;
    m.mut_snapshot().mut_metadata().term = term;
    let chunk = pb::SnapshotChunk {
        from,
        to,
        message: m.write_to_bytes().unwrap(),
        data: Vec::new(),
        last: true,
    };
    let e = wayside_proto::client::endpoint(ep, Some(tls)).unwrap();
    let mut c = RaftTransportClient::new(wayside_proto::client::connect_lazy(&e));
    let call = c.install_snapshot(futures::stream::iter([chunk]));
    match tokio::time::timeout(Duration::from_secs(10), call).await {
        Ok(r) => r.map(|_| ()),
        Err(_) => panic!("a snapshot install at {ep} hung"),
    }
}

/// A caller that holds a road certificate (signed by the road's CA, so it passes the TLS
/// handshake) but one that does not name the claimed peer's address cannot speak Raft as
/// that peer: the road-operator client certificate (it names no address) and a
/// certificate for another machine (10.9.9.9, like an NMS's) get PERMISSION_DENIED, naming
/// the claimed node and its address, for a heartbeat from a far later term and for a
/// snapshot install; an unknown sender id is refused even with a peer's certificate; a
/// stream cannot change its sender after its first envelope, nor a message inside an
/// envelope claim a sender other than the envelope's. No node's term moves, and
/// the cluster still replicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_road_certificate_not_naming_the_peer_cannot_send_raft_messages() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start_tls(3, dir.path()).await.unwrap();
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await.unwrap();
    let term = cluster.status(leader).await.unwrap().term;
    let leader_addr = cluster.endpoint(leader).unwrap().authority().to_owned();
    let forged = term + 100;

    let operator = cluster.client_tls().unwrap();
    let other = other_machine_identity(&cluster, &dir.path().join("other-machine"));
    for follower in (1..=3).filter(|id| *id != leader) {
        let ep = cluster.endpoint(follower).unwrap();
        for (who, tls) in [("road-operator", &operator), ("10.9.9.9", &other)] {
            let st = raft_send(&ep, tls, forged_heartbeat(leader, follower, forged))
                .await
                .expect_err("a forged heartbeat was accepted");
            assert_eq!(st.code(), Code::PermissionDenied, "{who} to node {follower}: {st:?}");
            assert!(
                st.message().contains(&format!("node {leader} ({leader_addr})")),
                "{who}: the refusal names the claimed node and its address: {st:?}"
            );
            let st = raft_snapshot(&ep, tls, leader, follower, forged)
                .await
                .expect_err("a forged snapshot was accepted");
            assert_eq!(st.code(), Code::PermissionDenied, "{who} snapshot: {st:?}");
        }
    }
    // The leader is not deposed by a "peer" either.
    let ep = cluster.endpoint(leader).unwrap();
    let claimed = (1..=3).find(|id| *id != leader).unwrap();
    let st = raft_send(&ep, &other, forged_heartbeat(claimed, leader, forged)).await.unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied, "{st:?}");

    // A sender the node has no address for: refused whatever the certificate.
    let peer = node_identity(&cluster);
    let follower = (1..=3).find(|id| *id != leader).unwrap();
    let ep = cluster.endpoint(follower).unwrap();
    let st = raft_send(&ep, &peer, forged_heartbeat(77, follower, forged)).await.unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied, "{st:?}");
    assert!(st.message().contains("node 77"), "{st:?}");

    // A stream proves its sender once: a later envelope claiming another node is refused.
    let e = wayside_proto::client::endpoint(&ep, Some(&peer)).unwrap();
    let mut c = RaftTransportClient::new(wayside_proto::client::connect_lazy(&e));
    let other_peer = (1..=3).find(|id| *id != leader && *id != follower).unwrap();
    let envs = [
        pb::RaftEnvelope { from: leader, to: follower, messages: Vec::new() },
        forged_heartbeat(other_peer, follower, forged),
    ];
    let st = tokio::time::timeout(Duration::from_secs(10), c.send(futures::stream::iter(envs)))
        .await
        .expect("hung")
        .unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied, "{st:?}");

    // Nor can a message inside a proven peer's envelope claim another sender.
    let mut inner = forged_heartbeat(other_peer, follower, forged);
    inner.from = leader;
    let st = raft_send(&ep, &peer, inner).await.unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied, "{st:?}");

    // No forged term reached any node, and the cluster carries on.
    for id in 1..=3 {
        let s = cluster.status(id).await.unwrap();
        assert!(s.term < forged, "node {id} took the forged term: {s:?}");
    }
    volume_with_block_0(&cluster, "car-peer").await;
    cluster.shutdown().await;
}

/// A node removed from the group is no member any more: Raft messages claiming to come
/// from it are refused (PERMISSION_DENIED, "not a member"), where a member's get through
/// to the service. (Its address stayed in the address book, so its certificate still
/// passed for it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_node_can_send_no_more_raft_messages() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = LocalCluster::start_tls(3, dir.path()).await.unwrap();
    let leader = cluster.wait_for_leader(Duration::from_secs(10)).await.unwrap();
    let removed = (1..=3).find(|id| *id != leader).unwrap();
    // (A membership change needs a PSS node's certificate.)
    let client = client_with(&cluster, Some(node_identity(&cluster)));
    let members = client.remove_node(removed).await.unwrap().members;
    assert!(members.iter().all(|m| m.id != removed), "{members:?}");
    let ep = cluster.endpoint(leader).unwrap();
    let peer = node_identity(&cluster);
    let from_removed = pb::RaftEnvelope { from: removed, to: leader, messages: Vec::new() };
    let st = raft_send(&ep, &peer, from_removed).await.unwrap_err();
    assert_eq!(st.code(), Code::PermissionDenied, "{st:?}");
    assert!(st.message().contains("not a member"), "{st:?}");
    // A member's (misaddressed, so the service itself answers) gets past the check.
    let member = (1..=3).find(|id| *id != leader && *id != removed).unwrap();
    let misaddressed = pb::RaftEnvelope { from: member, to: 99, messages: Vec::new() };
    let st = raft_send(&ep, &peer, misaddressed).await.unwrap_err();
    assert_eq!(st.code(), Code::FailedPrecondition, "{st:?}");
    cluster.shutdown().await;
}
