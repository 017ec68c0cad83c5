//! Helpers for tests of moves and failures (here so the NMS's and the testbed's tests share
//! them): an NMS served in the test's process, and a vehicle that writes without pause and
//! remembers what was acknowledged.

use crate::client::VolumeClient;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// A vehicle writing continuously through a [`VolumeClient`]: write `n` (from 1) puts
/// `data(block, n)` at block `n % blocks`, offset 0; every write must succeed (it panics
/// otherwise, failing the test at [`Writer::stop`]).
pub struct Writer {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Written>,
}

/// What a [`Writer`] had acknowledged when it stopped.
#[derive(Debug, Default)]
pub struct Written {
    /// Each block's last acknowledged write, by `n`.
    pub acked: HashMap<u64, u64>,
    /// Writes acknowledged.
    pub writes: u64,
    /// The longest a write took.
    pub worst: Duration,
}

impl Writer {
    pub fn spawn(c: VolumeClient, blocks: u64, data: fn(u64, u64) -> Vec<u8>) -> Self {
        assert!(blocks > 0, "a writer needs at least one block");
        let stop = CancellationToken::new();
        let s = stop.clone();
        let task = tokio::spawn(async move {
            let mut w = Written::default();
            while !s.is_cancelled() {
                let n = w.writes + 1;
                let blk = n % blocks;
                let t = Instant::now();
                if let Err(e) = c.write(blk, 0, data(blk, n)).await {
                    panic!("write {n} (block {blk}) failed: {e}");
                }
                w.worst = w.worst.max(t.elapsed());
                w.acked.insert(blk, n);
                w.writes = n;
            }
            w
        });
        Self { stop, task }
    }

    /// Stops after the write under way and returns what was acknowledged.
    pub async fn stop(self) -> Written {
        self.stop.cancel();
        self.task.await.expect("a write failed (see the panic above)")
    }
}

/// An NMS served in this process on a free loopback port, for tests; `stop` shuts it down.
pub struct LocalNms {
    pub ep: wayside_proto::types::Endpoint,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl LocalNms {
    /// Starts NMS `name` against the PSS nodes `pss` (`adjust` changes its configuration:
    /// a 1 MiB block pool by default, as every test NMS faults its pool in) and waits until
    /// it answers health checks.
    pub async fn start(
        name: &str,
        pss: &[wayside_proto::types::Endpoint],
        adjust: impl FnOnce(&mut crate::config::Config),
    ) -> LocalNms {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("a free port");
        let addr = listener.local_addr().expect("bound").to_string();
        let ep = wayside_proto::types::Endpoint::parse(&addr).expect("a loopback address");
        let mut cfg = crate::config::Config {
            listen: ep.authority().to_owned(),
            node_id: name.into(),
            pss: pss.iter().map(|e| e.authority().to_owned()).collect(),
            block_pool_bytes: 1 << 20,
            ..crate::config::Config::default()
        };
        adjust(&mut cfg);
        let stop = CancellationToken::new();
        let task = tokio::spawn(crate::server::run(cfg, listener, stop.clone()));
        wait_healthy(&ep).await;
        LocalNms { ep, stop, task }
    }

    /// Shuts it down (flushing what is dirty) and waits, at most 20 s, for it to end.
    pub async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("NMS stops on shutdown")
            .expect("the NMS task did not panic")
            .expect("the NMS ended cleanly");
    }

    /// Waits, at most 20 s, for it to end by itself (an admin Shutdown), and returns how.
    pub async fn exited(self) -> anyhow::Result<()> {
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("the NMS exits")
            .expect("the NMS task did not panic")
    }

    /// A plain gRPC client of its vehicle API.
    pub async fn raw(&self) -> wayside_proto::pb::nms_client::NmsClient<tonic::transport::Channel> {
        let ch = tonic::transport::Endpoint::from_shared(self.ep.uri().to_owned())
            .expect("a valid URI")
            .connect()
            .await
            .expect("the NMS accepts connections");
        wayside_proto::pb::nms_client::NmsClient::new(ch)
    }
}

/// Polls the NMS's gRPC health check until it serves (at most 20 s; no sleeping for
/// readiness).
pub async fn wait_healthy(ep: &wayside_proto::types::Endpoint) {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let uri = ep.uri().to_owned();
        if let Ok(ch) = tonic::transport::Endpoint::from_shared(uri).expect("URI").connect().await {
            let r = HealthClient::new(ch)
                .check(HealthCheckRequest { service: "wayside.v1.Nms".into() })
                .await;
            if r.is_ok_and(|r| r.into_inner().status == 1) {
                return;
            }
        }
        assert!(Instant::now() < deadline, "NMS at {ep} not healthy in time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
