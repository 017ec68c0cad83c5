//! Helpers for tests of moves and failures (here so the NMS's and the testbed's tests share
//! them): a vehicle that writes without pause and remembers what was acknowledged.

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
