//! A real network partition: three `pss serve` processes, each in its own network
//! namespace, joined by two bridges in a hub namespace: a replication network
//! (10.201.1.0/24, the Raft peer addresses) and a client network (10.201.2.0/24). The
//! test cuts the leader's replication link (`ip link set ... down`), so the old leader
//! is alone but still reachable by clients, then heals it.
//!
//! Needs root (network namespaces); without them it prints "SKIP: ..." and returns.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::Code;
use wayside_proto::error::fault_of;
use wayside_proto::pb;
use wayside_proto::pb::pss_admin_client::PssAdminClient;
use wayside_proto::pb::pss_blocks_client::PssBlocksClient;
use wayside_proto::types::{Endpoint, Fault, VolumeName};
use wayside_pss::client::{ClientOptions, PssClient};

const PSS: &str = env!("CARGO_BIN_EXE_pss");
const PORT: u16 = 7400;

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// The namespaces and the node processes; dropping it (also while a failed assertion
/// unwinds) kills the nodes and deletes the namespaces, which deletes their links.
struct Net {
    hub: String,
    nodes: Vec<String>,
    children: Vec<Option<Child>>,
}

impl Drop for Net {
    fn drop(&mut self) {
        for c in self.children.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in self.nodes.iter().chain([&self.hub]) {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

fn raft_addr(id: u64) -> String {
    format!("10.201.1.{id}:{PORT}")
}

fn client_ep(id: u64) -> Endpoint {
    Endpoint::parse(&format!("10.201.2.{id}:{PORT}")).unwrap()
}

impl Net {
    /// Builds the hub with its two bridges and three node namespaces, each with a
    /// replication link `r` and a client link `c`.
    fn build() -> Result<Self, String> {
        let tag = format!("wsp{}", std::process::id());
        let net = Net {
            hub: format!("{tag}hub"),
            nodes: (1..=3).map(|i| format!("{tag}n{i}")).collect(),
            children: Vec::new(),
        };
        ip(&["netns", "add", &net.hub])?;
        let hub = net.hub.clone();
        let h = |args: &[&str]| {
            let mut all = vec!["-n", &hub];
            all.extend_from_slice(args);
            ip(&all)
        };
        h(&["link", "set", "dev", "lo", "up"])?;
        for (br, addr) in [("brr", "10.201.1.254/24"), ("brc", "10.201.2.254/24")] {
            h(&["link", "add", "dev", br, "type", "bridge"])?;
            h(&["addr", "add", addr, "dev", br])?;
            h(&["link", "set", "dev", br, "up"])?;
        }
        for (i, ns) in net.nodes.clone().iter().enumerate() {
            let id = i + 1;
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "dev", "lo", "up"])?;
            for (kind, br, subnet) in [("r", "brr", 1), ("c", "brc", 2)] {
                let hub_end = format!("{kind}{id}");
                h(&[
                    "link", "add", "dev", &hub_end, "type", "veth", "peer", "name", kind, "netns",
                    ns,
                ])?;
                h(&["link", "set", "dev", &hub_end, "master", br])?;
                h(&["link", "set", "dev", &hub_end, "up"])?;
                let addr = format!("10.201.{subnet}.{id}/24");
                ip(&["-n", ns, "addr", "add", &addr, "dev", kind])?;
                ip(&["-n", ns, "link", "set", "dev", kind, "up"])?;
            }
        }
        Ok(net)
    }

    /// Starts node `id` in its namespace, listening on both networks.
    fn start(&mut self, id: u64, dir: &Path, config: &Path) {
        let peers = (1..=3).map(|i| format!("{i}={}", raft_addr(i))).collect::<Vec<_>>();
        let log = std::fs::File::create(dir.join(format!("node-{id}.log"))).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.nodes[id as usize - 1], PSS, "serve"])
            .arg("--config")
            .arg(config)
            .args(["--id", &id.to_string(), "--listen", &format!("0.0.0.0:{PORT}")])
            .args(["--peers", &peers.join(","), "--data-dir"])
            .arg(dir.join(format!("node-{id}")))
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.children.push(Some(child));
    }

    /// Cuts (`up == false`) or heals node `id`'s replication link.
    fn replication_link(&self, id: u64, up: bool) {
        let state = if up { "up" } else { "down" };
        ip(&["-n", &self.hub, "link", "set", "dev", &format!("r{id}"), state]).unwrap();
    }
}

/// Moves the calling thread into network namespace `ns` (the client then lives on
/// the hub's bridges, next to the nodes).
fn enter_netns(ns: &str) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(format!("/var/run/netns/{ns}"))?;
    // SAFETY: setns on a valid namespace fd affects only the calling thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

async fn status(id: u64) -> Option<pb::StatusReply> {
    let ch = tonic::transport::Endpoint::from_shared(client_ep(id).uri().to_owned())
        .ok()?
        .connect_timeout(Duration::from_millis(300));
    let mut c = PssAdminClient::new(ch.connect().await.ok()?);
    let r = tokio::time::timeout(Duration::from_secs(1), c.status(pb::StatusRequest {})).await;
    r.ok()?.ok().map(|r| r.into_inner())
}

/// Polls `ids` until one of them leads (a status check with a deadline).
async fn leader_among(ids: &[u64], timeout: Duration) -> u64 {
    let deadline = Instant::now() + timeout;
    loop {
        for &id in ids {
            if let Some(s) = status(id).await {
                if s.role == pb::RaftRole::Leader as i32 {
                    return id;
                }
            }
        }
        assert!(Instant::now() < deadline, "none of {ids:?} leads within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn write(seq: u64, block: u64, data: Vec<u8>) -> pb::WriteBatchRequest {
    pb::WriteBatchRequest {
        volume: "part".into(),
        epoch: 1,
        request_id: Some(pb::RequestId { client_id: "partition-test".into(), seq }),
        ops: vec![pb::PssBlockOp { block, data, delete: false, version: 0 }],
        persisted_lsn: 0,
    }
}

async fn scenario(net: &Net) {
    let vol = VolumeName::new("part").unwrap();
    let all: Vec<u64> = vec![1, 2, 3];
    let old = leader_among(&all, Duration::from_secs(20)).await;
    let opts = ClientOptions { deadline: Duration::from_secs(20), ..Default::default() };
    let everyone = PssClient::new(all.iter().map(|&i| client_ep(i)).collect(), opts.clone());
    let acq = pb::AcquireVolumeRequest {
        volume: "part".into(),
        owner_node: "nms".into(),
        owner_address: String::new(),
        owner_session: 0,
        expected_epoch: 0,
        create: Some(pb::CreateSpec { block_size: 4096, credential_hash: vec![] }),
        request_id: Some(pb::RequestId { client_id: "partition-acq".into(), seq: 1 }),
    };
    assert_eq!(everyone.acquire_volume(acq).await.unwrap().meta.unwrap().epoch, 1);
    everyone.write_batch(write(1, 1, vec![1; 4096])).await.unwrap();

    // Cut the leader off the replication network; clients still reach it.
    net.replication_link(old, false);
    let cut_at = Instant::now();
    eprintln!("cut the replication link of leader {old}");

    // A write to the isolated old leader is not acknowledged: it fails within the
    // deadline (UNAVAILABLE: not leader, or outcome unknown when it steps down;
    // DEADLINE_EXCEEDED when the request times out waiting for a quorum).
    let mut alone = PssBlocksClient::connect(client_ep(old).uri().to_owned()).await.unwrap();
    let mut req = tonic::Request::new(write(2, 2, vec![2; 4096]));
    req.set_timeout(Duration::from_secs(8));
    let t = Instant::now();
    let st = alone.write_batch(req).await.unwrap_err();
    eprintln!("write to the isolated old leader: {:?} after {:?}", st.code(), t.elapsed());
    assert!(
        matches!(st.code(), Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled),
        "{st:?}"
    );
    assert!(t.elapsed() < Duration::from_secs(9));
    // Check-quorum: the isolated leader steps down, and then says so with a typed fault.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = status(old).await.expect("the old leader answers on the client network");
        if s.role != pb::RaftRole::Leader as i32 {
            break;
        }
        assert!(Instant::now() < deadline, "the isolated leader kept leading");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let st = alone.write_batch(write(3, 3, vec![3; 4096])).await.unwrap_err();
    assert_eq!(st.code(), Code::Unavailable, "{st:?}");
    assert!(matches!(fault_of(&st), Some(Fault::NotLeader { .. })), "{st:?}");

    // The majority elects a leader and commits.
    let majority: Vec<u64> = all.iter().copied().filter(|&i| i != old).collect();
    let new = leader_among(&majority, Duration::from_secs(20)).await;
    eprintln!("majority leader {new} elected {:?} after the cut", cut_at.elapsed());
    let two = PssClient::new(majority.iter().map(|&i| client_ep(i)).collect(), opts.clone());
    two.write_batch(write(4, 4, vec![4; 4096])).await.unwrap();
    let got = two.get_blocks(&vol, &[1, 2, 4]).await.unwrap();
    assert_eq!(got[0].data, vec![1; 4096]);
    assert!(!got[1].found, "a write only the isolated leader took was applied");
    assert_eq!(got[2].data, vec![4; 4096]);

    // Heal: the old leader rejoins as a follower of the majority's leader and gets its data.
    net.replication_link(old, true);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(s) = status(old).await {
            let leader_known = s.leader_id != 0 && s.leader_id != old;
            if s.role == pb::RaftRole::Follower as i32 && leader_known {
                let mut b =
                    PssBlocksClient::connect(client_ep(old).uri().to_owned()).await.unwrap();
                let stale = pb::GetBlocksRequest {
                    volume: "part".into(),
                    blocks: vec![1, 2, 4],
                    consistency: pb::ReadConsistency::Stale as i32,
                };
                if let Ok(r) = b.get_blocks(stale).await {
                    let r = r.into_inner().blocks;
                    if r[2].found {
                        assert_eq!(r[0].data, vec![1; 4096]);
                        assert!(!r[1].found, "the old leader kept its unacknowledged write");
                        assert_eq!(r[2].data, vec![4; 4096]);
                        break;
                    }
                }
            }
        }
        assert!(Instant::now() < deadline, "the old leader did not rejoin with the data");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("old leader {old} rejoined as a follower with the majority's data");

    // The refused write's request id was never applied: retried now, it applies once.
    let r = everyone.write_batch(write(2, 2, vec![2; 4096])).await.unwrap();
    assert!(!r.duplicate);
    assert_eq!(everyone.get_blocks(&vol, &[2]).await.unwrap()[0].data, vec![2; 4096]);
}

fn config(dir: &Path) -> PathBuf {
    let path = dir.join("pss.toml");
    let text = "tick_interval_ms = 50\nelection_timeout_ticks = 10\nheartbeat_interval_ticks = 2\n\
                request_timeout_ms = 5000\n";
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn leader_cut_off_by_a_real_link_cut_cannot_commit_and_rejoins_after_heal() {
    let mut net = match Net::build() {
        Ok(n) => n,
        Err(e) => {
            eprintln!("SKIP: network namespaces unavailable (needs root and iproute2): {e}");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path());
    for id in 1..=3 {
        net.start(id, dir.path(), &cfg);
    }
    let hub = net.hub.clone();
    let net_ref = &net;
    // The client runs on its own thread inside the hub namespace (a thread's network
    // namespace is its own; the runtime is current-thread so every socket is made there).
    let outcome = std::thread::scope(|s| {
        s.spawn(move || {
            enter_netns(&hub).expect("entering the hub namespace");
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(scenario(net_ref));
        })
        .join()
    });
    if let Err(panic) = outcome {
        for id in 1..=3 {
            let log = std::fs::read_to_string(dir.path().join(format!("node-{id}.log")));
            let log = log.unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            eprintln!("--- node {id} log (last lines, newest first) ---\n{}", tail.join("\n"));
        }
        std::panic::resume_unwind(panic);
    }
}
