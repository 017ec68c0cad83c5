//! A user-space link shaper: a TCP forwarding proxy that adds one-way delay and emulated
//! loss to every connection through it (this machine's `tc` has no `netem`; `tbf` in
//! [`crate::netns`] does the rate).
//!
//! Each direction of each connection is a pipe: a reader takes chunks of at most
//! `chunk_bytes` from one socket, stamps each with a release time, and queues it; a writer
//! sends each chunk at its release time. The queue holds at most `buffer_bytes`, so a slow
//! receiver pushes back on the sender through TCP (bounded memory). Release times never go
//! backwards, so a late chunk holds up those behind it, as on a real TCP connection.
//!
//! **Loss.** TCP never loses bytes, so a lost packet shows up to the application as a
//! *retransmission stall*: the bytes arrive, late. We emulate that: with probability `loss`
//! per forwarded chunk (a seeded RNG per connection and direction, so runs are repeatable),
//! the chunk (and, through ordering, everything behind it) is held `loss_stall` longer, an
//! RTO-like delay (Linux's minimum RTO is 200 ms, the default here). A chunk is one read,
//! up to `chunk_bytes`, so the loss rate is per chunk, not per 1500-byte packet.
//!
//! **Delay.** Every chunk is released `delay` after it was read; connection set-up also
//! waits one round trip (2 x `delay`) before the upstream connect, like a SYN/SYN-ACK.
//! Throughput through a delayed pipe is at most `buffer_bytes / delay` (the queue is the
//! bandwidth-delay product), so size `buffer_bytes` >= rate x delay.
//!
//! **Rate** (optional; `tbf` normally does it): chunks leave no faster than
//! `rate_bits_per_s`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::{Rng as _, SeedableRng as _};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How a link behaves.
#[derive(Debug, Clone)]
pub struct ShaperConfig {
    /// Added to every byte, each direction.
    pub delay: Duration,
    /// Probability that a forwarded chunk is "lost" (held for `loss_stall`), 0..=1.
    pub loss: f64,
    /// Extra hold of a lost chunk: the retransmission timeout it stands for.
    pub loss_stall: Duration,
    /// Optional rate cap, bits per second (each direction).
    pub rate_bits_per_s: Option<u64>,
    /// Largest chunk read and forwarded at once, bytes.
    pub chunk_bytes: usize,
    /// Most bytes queued per direction per connection.
    pub buffer_bytes: usize,
    /// Most connections open at once; more wait in the listener's backlog.
    pub max_connections: usize,
    /// Longest an upstream connect may take.
    pub connect_timeout: Duration,
    /// Seed of the loss RNG (each connection and direction derives its own).
    pub seed: u64,
}

impl Default for ShaperConfig {
    fn default() -> Self {
        Self {
            delay: Duration::ZERO,
            loss: 0.0,
            loss_stall: Duration::from_millis(200),
            rate_bits_per_s: None,
            chunk_bytes: 16 << 10,
            buffer_bytes: 4 << 20,
            max_connections: 256,
            connect_timeout: Duration::from_secs(2),
            seed: 1,
        }
    }
}

impl ShaperConfig {
    /// Checks the limits; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.loss) {
            return Err(format!("loss {} must be within 0..=1", self.loss));
        }
        if self.chunk_bytes == 0 || self.buffer_bytes < self.chunk_bytes {
            return Err(format!(
                "chunk_bytes {} must be > 0 and <= buffer_bytes {}",
                self.chunk_bytes, self.buffer_bytes
            ));
        }
        if self.max_connections == 0 {
            return Err("max_connections must be > 0".into());
        }
        if self.rate_bits_per_s == Some(0) {
            return Err("rate_bits_per_s must be > 0 when set".into());
        }
        Ok(())
    }
}

/// Counters over every connection of one shaper.
#[derive(Debug, Default)]
pub struct ShaperStats {
    pub connections: AtomicU64,
    pub chunks: AtomicU64,
    /// Chunks held for `loss_stall` (emulated losses).
    pub stalled_chunks: AtomicU64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    pub upstream_connect_failures: AtomicU64,
}

/// A running shaper; stops when its token is cancelled or it is dropped.
#[derive(Debug)]
pub struct Shaper {
    local: SocketAddr,
    upstream: SocketAddr,
    pub stats: Arc<ShaperStats>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl Shaper {
    /// Serves `listener`, forwarding every connection to `upstream` through the shaped pipes.
    pub fn start(
        listener: TcpListener,
        upstream: SocketAddr,
        cfg: ShaperConfig,
        stop: CancellationToken,
    ) -> Result<Self, String> {
        cfg.validate()?;
        let local = listener.local_addr().map_err(|e| e.to_string())?;
        let stats = Arc::new(ShaperStats::default());
        let tasks = TaskTracker::new();
        let stop = stop.child_token();
        tasks.spawn(accept_loop(
            listener,
            upstream,
            cfg,
            stats.clone(),
            stop.clone(),
            tasks.clone(),
        ));
        Ok(Self { local, upstream, stats, stop, tasks })
    }

    /// Where clients connect.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Stops accepting, closes every connection and waits for the tasks.
    pub async fn shutdown(&self) {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Emulated losses so far / chunks forwarded so far.
    pub fn stall_ratio(&self) -> f64 {
        let n = self.stats.chunks.load(Ordering::Relaxed);
        if n == 0 {
            return 0.0;
        }
        self.stats.stalled_chunks.load(Ordering::Relaxed) as f64 / n as f64
    }
}

impl Drop for Shaper {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: SocketAddr,
    cfg: ShaperConfig,
    stats: Arc<ShaperStats>,
    stop: CancellationToken,
    tasks: TaskTracker,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(cfg.max_connections));
    let mut n = 0u64;
    loop {
        let permit = tokio::select! {
            () = stop.cancelled() => return,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
        };
        let (down, _) = tokio::select! {
            () = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "shaper accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        n += 1;
        stats.connections.fetch_add(1, Ordering::Relaxed);
        let (cfg, stats, stop) = (cfg.clone(), stats.clone(), stop.clone());
        let conn = n;
        tasks.spawn(async move {
            let _permit = permit;
            tokio::select! {
                () = stop.cancelled() => {}
                () = connection(down, upstream, conn, cfg, stats) => {}
            }
        });
    }
}

async fn connection(
    down: TcpStream,
    upstream: SocketAddr,
    conn: u64,
    cfg: ShaperConfig,
    stats: Arc<ShaperStats>,
) {
    // The SYN and SYN-ACK cross the link too.
    tokio::time::sleep(cfg.delay * 2).await;
    let up = match tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(upstream)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            stats.upstream_connect_failures.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%upstream, error = %e, "shaper: upstream connect failed");
            return;
        }
        Err(_) => {
            stats.upstream_connect_failures.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let _ = down.set_nodelay(true);
    let _ = up.set_nodelay(true);
    let (dr, dw) = down.into_split();
    let (ur, uw) = up.into_split();
    let seed = cfg.seed ^ conn.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let a = pipe(dr, uw, cfg.clone(), seed, stats.clone(), true);
    let b = pipe(ur, dw, cfg, seed ^ 1, stats, false);
    // Both directions end independently (half-close); the connection ends when both have.
    tokio::join!(a, b);
}

struct Chunk {
    data: Vec<u8>,
    release: Instant,
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    cfg: ShaperConfig,
    seed: u64,
    stats: Arc<ShaperStats>,
    up: bool,
) {
    let depth = (cfg.buffer_bytes / cfg.chunk_bytes).max(1);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Chunk>(depth);
    let reader = {
        let cfg = cfg.clone();
        let stats = stats.clone();
        async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let mut last = Instant::now();
            let mut buf = vec![0u8; cfg.chunk_bytes];
            loop {
                let n = match from.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                let mut release = Instant::now() + cfg.delay;
                if cfg.loss > 0.0 && rng.gen_bool(cfg.loss) {
                    release += cfg.loss_stall;
                    stats.stalled_chunks.fetch_add(1, Ordering::Relaxed);
                }
                // In order: a stalled chunk holds up the ones behind it.
                release = release.max(last);
                last = release;
                stats.chunks.fetch_add(1, Ordering::Relaxed);
                if tx.send(Chunk { data: buf[..n].to_vec(), release }).await.is_err() {
                    break;
                }
            }
        }
    };
    let writer = async move {
        let mut next_free = Instant::now();
        while let Some(c) = rx.recv().await {
            let mut at = c.release;
            if let Some(rate) = cfg.rate_bits_per_s {
                at = at.max(next_free);
                next_free = at + Duration::from_secs_f64(c.data.len() as f64 * 8.0 / rate as f64);
            }
            tokio::time::sleep_until(at).await;
            if to.write_all(&c.data).await.is_err() {
                break;
            }
            let counter = if up { &stats.bytes_up } else { &stats.bytes_down };
            counter.fetch_add(c.data.len() as u64, Ordering::Relaxed);
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An upstream that echoes everything back.
    async fn echo_server() -> (SocketAddr, tokio::task::JoinHandle<()>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let h = tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.into_split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        (addr, h)
    }

    async fn shaper(upstream: SocketAddr, cfg: ShaperConfig) -> Shaper {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Shaper::start(l, upstream, cfg, CancellationToken::new()).unwrap()
    }

    #[tokio::test]
    async fn one_way_delay_is_at_least_the_configured_delay() {
        // An upstream that records when the message arrived.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up = l.local_addr().unwrap();
        let got = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut b = [0u8; 5];
            s.read_exact(&mut b).await.unwrap();
            Instant::now()
        });
        let delay = Duration::from_millis(40);
        let sh = shaper(up, ShaperConfig { delay, ..Default::default() }).await;
        let mut c = TcpStream::connect(sh.local_addr()).await.unwrap();
        let sent = Instant::now();
        c.write_all(b"hello").await.unwrap();
        let arrived = got.await.unwrap();
        let one_way = arrived - sent;
        // The byte waits `delay`; the connect behind it waited one more round trip.
        assert!(one_way >= delay, "one-way {one_way:?} < {delay:?}");
        assert!(one_way < delay * 3 + Duration::from_millis(500), "one-way {one_way:?}");
        // Round trip through an echo: at least 2 x delay.
        let (echo, _h) = echo_server().await;
        let sh = shaper(echo, ShaperConfig { delay, ..Default::default() }).await;
        let mut c = TcpStream::connect(sh.local_addr()).await.unwrap();
        c.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        c.read_exact(&mut b).await.unwrap(); // the first one also pays the connect
        let t = Instant::now();
        c.write_all(b"y").await.unwrap();
        c.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"y");
        assert!(t.elapsed() >= delay * 2, "rtt {:?}", t.elapsed());
        sh.shutdown().await;
    }

    #[tokio::test]
    async fn bytes_arrive_exactly_in_both_directions_with_small_buffers() {
        let (echo, _h) = echo_server().await;
        let cfg = ShaperConfig {
            delay: Duration::from_millis(2),
            loss: 0.05,
            loss_stall: Duration::from_millis(3),
            chunk_bytes: 1000,
            buffer_bytes: 8000,
            ..Default::default()
        };
        let sh = shaper(echo, cfg).await;
        let c = TcpStream::connect(sh.local_addr()).await.unwrap();
        let (mut r, mut w) = c.into_split();
        let total = 3 << 20;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let data: Vec<u8> = (0..total).map(|_| rng.gen()).collect();
        let send = data.clone();
        let writer = tokio::spawn(async move {
            w.write_all(&send).await.unwrap();
            w.shutdown().await.unwrap();
        });
        let mut back = Vec::new();
        r.read_to_end(&mut back).await.unwrap();
        writer.await.unwrap();
        assert_eq!(back.len(), data.len());
        assert!(back == data, "bytes differ");
        assert_eq!(sh.stats.bytes_up.load(Ordering::Relaxed), total as u64);
        assert_eq!(sh.stats.bytes_down.load(Ordering::Relaxed), total as u64);
        sh.shutdown().await;
    }

    #[tokio::test]
    async fn loss_stalls_happen_at_about_the_configured_rate() {
        let (echo, _h) = echo_server().await;
        let p = 0.1;
        let stall = Duration::from_millis(30);
        let cfg = ShaperConfig {
            loss: p,
            loss_stall: stall,
            chunk_bytes: 512,
            buffer_bytes: 1 << 20,
            seed: 42,
            ..Default::default()
        };
        let sh = shaper(echo, cfg).await;
        let mut c = TcpStream::connect(sh.local_addr()).await.unwrap();
        // Ping-pong 300 small messages: each is its own chunk up and down, and a stalled
        // one shows in its round trip.
        let mut slow = 0;
        let rounds = 300;
        for i in 0..rounds {
            let msg = [i as u8; 16];
            let t = Instant::now();
            c.write_all(&msg).await.unwrap();
            let mut b = [0u8; 16];
            c.read_exact(&mut b).await.unwrap();
            assert_eq!(b, msg);
            if t.elapsed() >= stall {
                slow += 1;
            }
        }
        let chunks = sh.stats.chunks.load(Ordering::Relaxed);
        let stalled = sh.stats.stalled_chunks.load(Ordering::Relaxed);
        assert!(chunks >= 2 * rounds as u64, "chunks {chunks}");
        let ratio = stalled as f64 / chunks as f64;
        // Binomial(600, 0.1): sd ~ 0.012; 4 sd either side.
        assert!((ratio - p).abs() < 0.05, "stalled {stalled} of {chunks} = {ratio}");
        // P(round trip stalled) = 1 - 0.9^2 = 0.19 of 300 = 57; each stall is visible. (A
        // round trip may also be slow from the scheduler on a loaded machine: some room.)
        assert!(slow as u64 <= stalled + 15 && slow >= 25, "slow {slow}, stalled {stalled}");
        sh.shutdown().await;
        // No loss configured: no stall.
        let (echo, _h2) = echo_server().await;
        let sh = shaper(echo, ShaperConfig::default()).await;
        let mut c = TcpStream::connect(sh.local_addr()).await.unwrap();
        for _ in 0..50 {
            c.write_all(b"ab").await.unwrap();
            let mut b = [0u8; 2];
            c.read_exact(&mut b).await.unwrap();
        }
        assert_eq!(sh.stats.stalled_chunks.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn bad_limits_are_named() {
        let e = ShaperConfig { loss: 1.5, ..Default::default() }.validate().unwrap_err();
        assert!(e.contains("loss"), "{e}");
        let e = ShaperConfig { chunk_bytes: 0, ..Default::default() }.validate().unwrap_err();
        assert!(e.contains("chunk_bytes"), "{e}");
    }
}
