//! Fault tests with real `pss` processes: kill -9 the leader under load, kill and
//! restart everything, a minority that cannot commit, and the CLI against a cluster.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wayside_proto::pb;
use wayside_proto::pb::pss_admin_client::PssAdminClient;
use wayside_proto::types::{Endpoint, VolumeName};
use wayside_pss::client::{ClientOptions, PssClient};

const PSS: &str = env!("CARGO_BIN_EXE_pss");

struct Node {
    id: u64,
    addr: String,
    dir: PathBuf,
    peers: String,
    child: Option<Child>,
}

impl Node {
    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.with_extension("log"))
            .unwrap();
        let child = Command::new(PSS)
            .args(["serve", "--id", &self.id.to_string(), "--listen", &self.addr])
            .args(["--peers", &self.peers, "--data-dir"])
            .arg(&self.dir)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// SIGKILL: no chance to flush anything.
    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint::parse(&self.addr).unwrap()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn free_port() -> u16 {
    // Bound then released right away: the port is free when the node binds it.
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn cluster(dir: &Path) -> Vec<Node> {
    let addrs: Vec<String> = (0..3).map(|_| format!("127.0.0.1:{}", free_port())).collect();
    let peers = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{}={a}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    let mut nodes: Vec<Node> = addrs
        .into_iter()
        .enumerate()
        .map(|(i, addr)| Node {
            id: i as u64 + 1,
            addr,
            dir: dir.join(format!("node-{}", i + 1)),
            peers: peers.clone(),
            child: None,
        })
        .collect();
    for n in &mut nodes {
        n.start();
    }
    nodes
}

async fn status(ep: &Endpoint) -> Option<pb::StatusReply> {
    let ch = tonic::transport::Endpoint::from_shared(ep.uri().to_owned())
        .ok()?
        .connect_timeout(Duration::from_millis(300));
    let mut c = PssAdminClient::new(ch.connect().await.ok()?);
    let r = tokio::time::timeout(Duration::from_secs(1), c.status(pb::StatusRequest {})).await;
    r.ok()?.ok().map(|r| r.into_inner())
}

/// Polls the given nodes until one is leader (a health check with a deadline).
async fn leader(nodes: &[Node], timeout: Duration) -> u64 {
    let deadline = Instant::now() + timeout;
    loop {
        for n in nodes.iter().filter(|n| n.child.is_some()) {
            if let Some(s) = status(&n.endpoint()).await {
                if s.role == pb::RaftRole::Leader as i32 {
                    return s.id;
                }
            }
        }
        assert!(Instant::now() < deadline, "no leader within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn client(nodes: &[Node]) -> PssClient {
    let opts = ClientOptions { deadline: Duration::from_secs(30), ..Default::default() };
    PssClient::new(nodes.iter().map(Node::endpoint).collect(), opts)
}

fn data(writer: u64, n: u64) -> Vec<u8> {
    let mut d = vec![0u8; 4096];
    d[..8].copy_from_slice(&writer.to_be_bytes());
    d[8..16].copy_from_slice(&n.to_be_bytes());
    d
}

async fn check_all(client: &PssClient, vol: &VolumeName, acked: &HashMap<u64, Vec<u8>>) {
    let keys: Vec<u64> = acked.keys().copied().collect();
    for chunk in keys.chunks(256) {
        let got = client.get_blocks(vol, chunk).await.unwrap();
        for b in got {
            assert!(b.found, "acknowledged block {} lost", b.block);
            assert_eq!(&b.data, &acked[&b.block], "acknowledged block {} differs", b.block);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_leader_under_load_then_full_restart_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = cluster(dir.path());
    let first = leader(&nodes, Duration::from_secs(20)).await;
    let c = client(&nodes);
    let vol = VolumeName::new("load").unwrap();
    let req = pb::AcquireVolumeRequest {
        volume: "load".into(),
        owner_node: "nms".into(),
        owner_address: String::new(),
        owner_session: 0,
        expected_epoch: 0,
        create: Some(pb::CreateSpec { block_size: 4096, credential_hash: vec![] }),
        request_id: Some(pb::RequestId { client_id: "acq".into(), seq: 1 }),
    };
    let epoch = c.acquire_volume(req).await.unwrap().meta.unwrap().epoch;

    let acked: Arc<Mutex<HashMap<u64, Vec<u8>>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..8u64 {
        let (c, acked, stop) = (c.clone(), acked.clone(), stop.clone());
        writers.spawn(async move {
            let mut failed = 0u64;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let block = w * 1_000_000 + n;
                let req = pb::WriteBatchRequest {
                    volume: "load".into(),
                    epoch,
                    request_id: Some(pb::RequestId { client_id: format!("w{w}"), seq: n }),
                    ops: vec![pb::PssBlockOp {
                        block,
                        data: data(w, n),
                        delete: false,
                        version: 0,
                    }],
                    persisted_lsn: 0,
                };
                match c.write_batch(req).await {
                    Ok(_) => {
                        acked.lock().unwrap().insert(block, data(w, n));
                    }
                    Err(_) => failed += 1,
                }
            }
            failed
        });
    }
    let count = |a: &Arc<Mutex<HashMap<u64, Vec<u8>>>>| a.lock().unwrap().len();
    let wait_count = |target: usize, what: &'static str| {
        let acked = acked.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            while count(&acked) < target {
                assert!(Instant::now() < deadline, "{what}: only {} acked", count(&acked));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait_count(300, "load before the kill").await;
    let at_kill = count(&acked);
    let killed_at = Instant::now();
    nodes[first as usize - 1].kill9();
    let second = leader(&nodes, Duration::from_secs(20)).await;
    assert_ne!(second, first);
    wait_count(at_kill + 300, "writes resume after the new leader").await;
    eprintln!(
        "writes resumed {:?} after kill -9 of leader {first}; new leader {second}",
        killed_at.elapsed()
    );
    stop.store(true, Ordering::Relaxed);
    let mut failed = 0;
    while let Some(r) = writers.join_next().await {
        failed += r.unwrap();
    }
    let acked = Arc::try_unwrap(acked).unwrap().into_inner().unwrap();
    eprintln!("{} writes acknowledged, {failed} failed (not acknowledged)", acked.len());
    check_all(&c, &vol, &acked).await;

    // The killed node comes back with its data dir and rejoins.
    nodes[first as usize - 1].start();
    // Then everything is killed at once and restarted: every acknowledged write is there.
    for n in &mut nodes {
        n.kill9();
    }
    for n in &mut nodes {
        n.start();
    }
    leader(&nodes, Duration::from_secs(20)).await;
    check_all(&c, &vol, &acked).await;
    // And it takes writes again.
    let req = pb::WriteBatchRequest {
        volume: "load".into(),
        epoch,
        request_id: Some(pb::RequestId { client_id: "after".into(), seq: 1 }),
        ops: vec![pb::PssBlockOp { block: 7, data: vec![7; 7], delete: false, version: 0 }],
        persisted_lsn: 0,
    };
    c.write_batch(req).await.unwrap();
}

fn cli(nodes: &[Node], args: &[&str]) -> std::process::Output {
    let list = nodes.iter().map(|n| n.addr.clone()).collect::<Vec<_>>().join(",");
    Command::new(PSS).arg("--pss").arg(list).args(args).output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_works_and_a_minority_cannot_commit() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = cluster(dir.path());
    let l = leader(&nodes, Duration::from_secs(20)).await;

    // CLI: put / get / status / members / bad ids.
    let file = dir.path().join("block.bin");
    std::fs::write(&file, b"hello from the cli").unwrap();
    let out = cli(
        &nodes,
        &["put", "cli-vol", "3", file.to_str().unwrap(), "--create-block-size", "4096"],
    );
    assert!(out.status.success(), "put: {}", String::from_utf8_lossy(&out.stderr));
    let out = cli(&nodes, &["get", "cli-vol", "3"]);
    assert!(out.status.success(), "get: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.stdout, b"hello from the cli");
    let out = cli(&nodes, &["get", "cli-vol", "4"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("never been written"));
    let out = cli(&nodes, &["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("leader") && text.matches("follower").count() == 2,
        "{text}"
    );
    let out = cli(&nodes, &["members"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("voter").count(), 3, "{text}");
    let out = cli(&nodes, &["remove-node", "42"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("node 42 is not a member"), "{out:?}");
    let big = dir.path().join("big.bin");
    std::fs::write(&big, vec![1u8; 5000]).unwrap();
    let out = cli(&nodes, &["put", "cli-vol", "5", big.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("5000 bytes"), "{out:?}");
    let out = cli(&nodes, &["put", "", "5", file.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("volume name is empty"), "{out:?}");

    // Leadership transfer through the CLI.
    let to = (1..=3).find(|id| *id != l).unwrap();
    let out = cli(&nodes, &["transfer-leader", &to.to_string()]);
    assert!(out.status.success(), "transfer: {}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("leader is now node {to}")),
        "{out:?}"
    );
    // (The CLI saw `to` lead; an election under load may have moved leadership since.)
    let l = leader(&nodes, Duration::from_secs(10)).await;

    // Minority: the leader alone (both followers killed) cannot commit.
    for n in nodes.iter_mut().filter(|n| n.id != l) {
        n.kill9();
    }
    let alone = PssClient::new(
        vec![nodes[l as usize - 1].endpoint()],
        ClientOptions {
            deadline: Duration::from_secs(3),
            rpc_timeout: Duration::from_secs(2),
            ..Default::default()
        },
    );
    let vol = VolumeName::new("cli-vol").unwrap();
    let epoch = alone.get_volume(&vol).await.map(|m| m.epoch);
    assert!(epoch.is_err(), "a linearizable read needs a quorum too");
    let req = pb::WriteBatchRequest {
        volume: "cli-vol".into(),
        epoch: 1,
        request_id: Some(pb::RequestId { client_id: "minority".into(), seq: 1 }),
        ops: vec![pb::PssBlockOp { block: 9, data: vec![9; 9], delete: false, version: 0 }],
        persisted_lsn: 0,
    };
    let err = alone.write_batch(req.clone()).await.unwrap_err();
    eprintln!("write on a minority: {err}");
    // Check-quorum: the isolated leader steps down.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = status(&nodes[l as usize - 1].endpoint()).await.unwrap();
        if s.role != pb::RaftRole::Leader as i32 {
            break;
        }
        assert!(Instant::now() < deadline, "isolated leader kept leading");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // With the majority back, the same request commits (once).
    for n in nodes.iter_mut().filter(|n| n.id != l) {
        n.start();
    }
    leader(&nodes, Duration::from_secs(20)).await;
    let c = client(&nodes);
    c.write_batch(req).await.unwrap();
    assert_eq!(c.get_blocks(&vol, &[9]).await.unwrap()[0].data, vec![9; 9]);
}

#[test]
fn serve_rejects_bad_flags_with_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(PSS)
            .arg("serve")
            .args(args)
            .arg("--data-dir")
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = run(&["--id", "1", "--listen", "127.0.0.1:0", "--peers", "1=127.0.0.1"]);
    assert!(e.contains("--peers") && e.contains("127.0.0.1"), "{e}");
    let e = run(&["--id", "1", "--listen", "127.0.0.1:0", "--peers", "one=127.0.0.1:5"]);
    assert!(e.contains("ID=HOST:PORT"), "{e}");
    let e = run(&["--id", "5", "--listen", "127.0.0.1:0", "--peers", "1=127.0.0.1:5"]);
    assert!(e.contains("node's id 5 is not in the peer list"), "{e}");
    let e = run(&["--id", "0", "--listen", "127.0.0.1:0", "--peers", "1=127.0.0.1:5"]);
    assert!(e.contains("id must be > 0"), "{e}");
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "id = 1\nlisten_addr = \"127.0.0.1:0\"\n").unwrap();
    let out = Command::new(PSS).arg("serve").arg("--config").arg(&cfg).output().unwrap();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("listen_addr"), "unknown config key named: {e}");
    let out = Command::new(PSS).arg("--print-default-config").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("dedupe_table_entries") && text.contains("max_batch_ops"), "{text}");
}
