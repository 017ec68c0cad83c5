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
    /// Its address: `https://` when it serves TLS (its `[tls]` has a certificate).
    pub ep: wayside_proto::types::Endpoint,
    /// Its `[tls]` loaded (the road's CA and its certificate), for clients of it.
    tls: Option<wayside_proto::tls::Tls>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl LocalNms {
    /// Starts NMS `name` against the PSS nodes `pss` (`adjust` changes its configuration:
    /// a 1 MiB block pool by default, as every test NMS faults its pool in) and waits until
    /// it answers health checks (over TLS when `adjust` sets `tls`).
    pub async fn start(
        name: &str,
        pss: &[wayside_proto::types::Endpoint],
        adjust: impl FnOnce(&mut crate::config::Config),
    ) -> LocalNms {
        Self::start_on(name, pss, None, adjust).await
    }

    /// [`LocalNms::start`] over `store` instead of a PSS (an in-memory
    /// [`crate::store::MemStore`], shared by the NMSs of a test to move volumes between).
    pub async fn start_with_store(
        name: &str,
        store: std::sync::Arc<dyn crate::store::Store>,
        adjust: impl FnOnce(&mut crate::config::Config),
    ) -> LocalNms {
        Self::start_on(name, &[], Some(store), adjust).await
    }

    async fn start_on(
        name: &str,
        pss: &[wayside_proto::types::Endpoint],
        store: Option<std::sync::Arc<dyn crate::store::Store>>,
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
        if store.is_some() {
            // Not dialled: the store stands in for the PSS.
            cfg.pss = vec!["127.0.0.1:1".into()];
        }
        adjust(&mut cfg);
        let tls = wayside_proto::tls::Tls::load(&cfg.tls).expect("the test's [tls] loads");
        let ep = match &tls {
            Some(t) if t.has_identity() => ep.https(),
            _ => ep,
        };
        let stop = CancellationToken::new();
        let task = match store {
            Some(store) => {
                tokio::spawn(crate::server::run_with_store(cfg, listener, stop.clone(), store))
            }
            None => tokio::spawn(crate::server::run(cfg, listener, stop.clone())),
        };
        wait_healthy_tls(&ep, tls.as_ref()).await;
        LocalNms { ep, tls, stop, task }
    }

    /// Its `[tls]` loaded (the road's CA, for a client of it), if it has one.
    pub fn tls(&self) -> Option<&wayside_proto::tls::Tls> {
        self.tls.as_ref()
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

    /// A plain gRPC client of its vehicle API (over TLS when it serves TLS).
    pub async fn raw(&self) -> wayside_proto::pb::nms_client::NmsClient<tonic::transport::Channel> {
        let ch = wayside_proto::client::endpoint(&self.ep, self.tls.as_ref())
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
    wait_healthy_tls(ep, None).await;
}

/// [`wait_healthy`] over TLS with `tls` (the road's CA) when given.
pub async fn wait_healthy_tls(
    ep: &wayside_proto::types::Endpoint,
    tls: Option<&wayside_proto::tls::Tls>,
) {
    use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
    let deadline = Instant::now() + Duration::from_secs(20);
    let endpoint = wayside_proto::client::endpoint(ep, tls)
        .expect("an address the client can dial")
        .connect_timeout(Duration::from_secs(2));
    loop {
        if let Ok(ch) = endpoint.connect().await {
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

/// The types of the whole HTTP/2 frames in `bytes` (what a raw test peer was sent), in
/// order: 0x4 SETTINGS, 0x6 PING, 0x7 GOAWAY and so on.
pub fn frame_types(bytes: &[u8]) -> Vec<u8> {
    let mut types = Vec::new();
    let mut at = 0;
    while at + 9 <= bytes.len() {
        types.push(bytes[at + 3]);
        let len = usize::from(bytes[at]) << 16
            | usize::from(bytes[at + 1]) << 8
            | usize::from(bytes[at + 2]);
        at += 9 + len;
    }
    types
}
