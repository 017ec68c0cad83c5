//! The standard services every wayside gRPC server exposes: `grpc.health.v1.Health` and
//! `grpc.reflection.v1` (with every wayside service and the health service registered),
//! so grpcurl, grpc_health_probe and similar tools work against any node.

use crate::cork::CorkedIo;
use tonic_health::server::HealthReporter;

/// A health service and its reporter. The reporter sets each service's state; the
/// empty service name ("") stands for the whole server.
pub fn health() -> (
    HealthReporter,
    tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
) {
    let (reporter, server) = tonic_health::server::health_reporter();
    (reporter, server.max_decoding_message_size(SMALL_REQUEST_BYTES))
}

/// Largest request the health and reflection services take, in bytes (a service or file
/// name): they answer anyone, and tonic's default (4 MiB) let a caller with no credential
/// make each of a connection's streams buffer that much.
pub const SMALL_REQUEST_BYTES: usize = 64 * 1024;

/// The reflection service describing every wayside service.
pub fn reflection() -> tonic_reflection::server::v1::ServerReflectionServer<
    impl tonic_reflection::server::v1::ServerReflection,
> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the compiled-in descriptor sets are valid")
        .max_decoding_message_size(SMALL_REQUEST_BYTES)
}

/// The connection stream for a server bound by the caller (tests bind `127.0.0.1:0` and
/// pass the listener in), with TCP_NODELAY on every accepted socket and every socket
/// [corked](crate::cork) (a unary reply's frames leave in one system call). `Server::builder()
/// .tcp_nodelay()` does not reach sockets of a caller-supplied listener: without this,
/// small replies wait for the peer's delayed ACK (~40 ms per request). A connection past
/// `limit` is closed as soon as it is accepted, and one whose peer sends nothing for
/// `silence` (see [`silence_limit`]) is closed then.
pub fn incoming(
    listener: tokio::net::TcpListener,
    limit: ConnectionLimit,
    silence: Option<std::time::Duration>,
) -> impl tokio_stream::Stream<Item = std::io::Result<CorkedIo<tokio::net::TcpStream>>> {
    use tokio_stream::StreamExt as _;
    let keepalive = std::time::Duration::from_secs(TCP_KEEPALIVE_IDLE_S);
    tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(keepalive))
        .with_keepalive_interval(Some(keepalive))
        .filter_map(move |s| match s {
            Ok(s) => limit.admit(s.peer_addr().ok().map(|a| a.ip())).map(|slot| {
                let io = CorkedIo::new(s).holding(slot);
                Ok(match silence {
                    Some(t) => io.closed_when_silent(t),
                    None => io,
                })
            }),
            Err(e) => Some(Err(e)),
        })
}

/// Default of the tonic servers' (PSS, SMF) `silent_connection_timeout_ms`: a connection
/// whose peer has sent nothing this long is closed, in milliseconds. It ends callers that
/// connect and never speak HTTP/2 (hyper pings only once the preface is in); a live peer
/// answers the keepalive PINGs well within it.
pub const SILENT_CONNECTION_TIMEOUT_MS: u64 = 30_000;

/// The silence limit of `silent_ms` (0: none), checked against the keepalive settings: a
/// live peer that has no calls sends only its answers to the keepalive PINGs, one per
/// `keepalive_interval_ms`, so with keepalive on the limit must exceed the interval plus
/// the PING timeout (a dead peer is then closed by keepalive first). The error names the
/// settings.
pub fn silence_limit(
    silent_ms: u64,
    keepalive_interval_ms: u64,
    keepalive_timeout_ms: u64,
) -> Result<Option<std::time::Duration>, String> {
    if silent_ms == 0 {
        return Ok(None);
    }
    let live = keepalive_interval_ms.saturating_add(keepalive_timeout_ms);
    if keepalive_interval_ms > 0 && silent_ms <= live {
        return Err(format!(
            "silent_connection_timeout_ms ({silent_ms}) must exceed http2_keepalive_interval_ms \
             plus http2_keepalive_timeout_ms ({live}): an idle live peer is heard only when it \
             answers a PING (or set it to 0: never)"
        ));
    }
    Ok(Some(std::time::Duration::from_millis(silent_ms)))
}

/// TCP keepalive of every accepted socket: probes after this long without traffic, and
/// as long between probes (Linux gives up after 9), in seconds. A backstop under HTTP/2
/// keepalive (which may be turned off): a peer gone without closing (out of range, powered
/// off) gives its connection slot back within ~5 minutes whatever the settings.
pub const TCP_KEEPALIVE_IDLE_S: u64 = 30;

/// Sets TCP keepalive ([`TCP_KEEPALIVE_IDLE_S`]) on `s`.
fn set_tcp_keepalive(s: &tokio::net::TcpStream) {
    let t = std::time::Duration::from_secs(TCP_KEEPALIVE_IDLE_S);
    let ka = socket2::TcpKeepalive::new().with_time(t).with_interval(t);
    if let Err(e) = socket2::SockRef::from(s).set_tcp_keepalive(&ka) {
        tracing::debug!(error = %e, "TCP keepalive not set");
    }
}

/// Descriptors a server keeps for other than its connections (listeners, data and log
/// files, its own client connections), in descriptors.
pub const OTHER_DESCRIPTORS: u64 = 256;

/// Raises this process's soft open-file limit to its hard limit, so `max_connections`
/// connections can be accepted (the usual soft limit is 1024), and warns when
/// `max_connections` plus [`OTHER_DESCRIPTORS`] still exceed it: connections past it would
/// fail to be accepted (EMFILE) before the connection limit closes them. Returns the soft
/// limit now in force (`None` if it cannot be read).
pub fn raise_open_file_limit(max_connections: usize) -> Option<u64> {
    let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct they are given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } != 0 {
        return None;
    }
    if l.rlim_cur < l.rlim_max {
        let raised = libc::rlimit { rlim_cur: l.rlim_max, rlim_max: l.rlim_max };
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            l = raised;
        }
    }
    let soft: u64 = l.rlim_cur;
    let needed = max_connections as u64 + OTHER_DESCRIPTORS;
    if needed > soft {
        tracing::warn!(
            max_connections,
            open_file_limit = soft,
            "max_connections plus {OTHER_DESCRIPTORS} other descriptors exceed the open-file \
             limit (ulimit -n): connections past it fail to be accepted; raise the limit or \
             lower max_connections"
        );
    }
    Some(soft)
}

/// Default of every server's `max_connections`, in connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// Default of the PSS's `max_connections_per_source`: half its `max_connections`, so one
/// host (a runaway NMS, a scanner) leaves the other half to the road, in connections.
pub const DEFAULT_MAX_CONNECTIONS_PER_SOURCE: usize = DEFAULT_MAX_CONNECTIONS / 2;
/// Least time between two warnings that connections were refused, in seconds.
const REFUSED_WARN_INTERVAL_S: u64 = 10;

/// The most connections a server holds open at once (`max_connections`), and from one
/// source address (`max_connections_per_source`; an IPv6 source is its /64): every
/// accepted connection takes a
/// [`ConnectionSlot`], held by its [`CorkedIo`] until the connection is dropped; one
/// accepted past either limit is closed at once (its caller sees the connection close and
/// retries), so callers that connect and idle, or many at once, cost at most this many
/// sockets, tasks and receive buffers, and no one host can take every slot from the rest
/// of the road (vehicles, peers, migrations). A refusal is logged at debug level, and a
/// warning naming the limit and the count goes out at most every
/// [`REFUSED_WARN_INTERVAL_S`].
#[derive(Debug, Clone)]
pub struct ConnectionLimit {
    slots: std::sync::Arc<tokio::sync::Semaphore>,
    max: usize,
    per_source: usize,
    sources: Sources,
    /// Refusals since the last warning, and when that was.
    refused: std::sync::Arc<std::sync::Mutex<(u64, Option<std::time::Instant>)>>,
}

/// Connections open per source address (only sources with one open: at most
/// `max_connections` entries).
type Sources = std::sync::Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>;

/// One connection's place in a [`ConnectionLimit`], given back when dropped.
#[derive(Debug)]
pub struct ConnectionSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
    /// Its source address and the counts it is one of.
    source: Option<(std::net::IpAddr, Sources)>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        if let Some((ip, sources)) = self.source.take() {
            let mut sources = sources.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = sources.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    sources.remove(&ip);
                }
            }
        }
    }
}

/// The source a connection from `ip` counts against: the address itself for IPv4 (and
/// IPv4-mapped IPv6, and the IPv4 address inside a NAT64 one, `64:ff9b::/96`), its /64 for
/// other IPv6: a host or site is given a whole /64 and may connect from any of its 2^64
/// addresses, each of which would otherwise be a source of its own. (A link-local address
/// keeps its whole self: every peer on every link shares `fe80::/64`.) The vehicles of one
/// RSU cell numbered from its /64 share one source's limit.
pub(crate) fn source_key(ip: std::net::IpAddr) -> std::net::IpAddr {
    use std::net::{IpAddr, Ipv4Addr};
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            if v6.segments()[0] & 0xffc0 == 0xfe80 {
                return IpAddr::V6(v6);
            }
            if bits >> 32 == 0x0064_ff9b_0000_0000_0000_0000 {
                return IpAddr::V4(Ipv4Addr::from(bits as u32));
            }
            IpAddr::V6((bits & !((1u128 << 64) - 1)).into())
        }
        v4 => v4,
    }
}

impl ConnectionLimit {
    /// At most `max` connections (at least 1), as many from one source.
    pub fn new(max: usize) -> Self {
        Self::with_per_source(max, max)
    }

    /// At most `max` connections (at least 1), and `per_source` (at least 1, at most
    /// `max`) from any one source address.
    pub fn with_per_source(max: usize, per_source: usize) -> Self {
        let max = max.clamp(1, tokio::sync::Semaphore::MAX_PERMITS);
        Self {
            slots: std::sync::Arc::new(tokio::sync::Semaphore::new(max)),
            max,
            per_source: per_source.clamp(1, max),
            sources: Default::default(),
            refused: Default::default(),
        }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.max - self.slots.available_permits()
    }

    /// A slot for a connection just accepted from `source` (`None`: its address is not
    /// known, counted against `max_connections` only), or `None` (logged) when the server
    /// or that source has no slot left.
    pub fn admit(&self, source: Option<std::net::IpAddr>) -> Option<ConnectionSlot> {
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            self.refused("max_connections", None);
            return None;
        };
        let Some(ip) = source.map(source_key) else {
            return Some(ConnectionSlot { _permit: permit, source: None });
        };
        {
            let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
            let n = sources.entry(ip).or_insert(0);
            if *n < self.per_source {
                *n += 1;
                let counted = Some((ip, self.sources.clone()));
                return Some(ConnectionSlot { _permit: permit, source: counted });
            }
        }
        self.refused("max_connections_per_source", Some(ip));
        None
    }

    fn refused(&self, limit: &'static str, source: Option<std::net::IpAddr>) {
        let (max, per_source) = (self.max, self.per_source);
        tracing::debug!(max, per_source, ?source, "a connection past {limit} closed");
        let mut r = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        r.0 += 1;
        let now = std::time::Instant::now();
        let due = r.1.is_none_or(|last| {
            now.duration_since(last) >= std::time::Duration::from_secs(REFUSED_WARN_INTERVAL_S)
        });
        if due {
            tracing::warn!(
                max_connections = max,
                max_connections_per_source = per_source,
                refused = r.0,
                last_refused_by = limit,
                ?source,
                "connections refused: max_connections connections are open, or \
                 max_connections_per_source from one source (an address; an IPv6 /64)"
            );
            *r = (0, Some(now));
        }
    }
}

/// HTTP/2 connection window for bulk streams (migration, Raft, batched writes), in bytes.
/// The 64 KiB default costs a round trip per 64 KiB in flight.
pub const HTTP2_CONNECTION_WINDOW_BYTES: u32 = 64 * 1024 * 1024;
/// HTTP/2 per-stream window for bulk streams, in bytes.
pub const HTTP2_STREAM_WINDOW_BYTES: u32 = 16 * 1024 * 1024;
/// Largest HTTP/2 frame a wayside endpoint accepts, in bytes (the protocol's default is
/// 16 KiB). h2 writes each DATA frame with its own `writev`, so a 64 KiB batch reply took
/// four system calls and four TCP sends at the default; one frame of up to 256 KiB is
/// still short enough (~2 ms at 1 Gbit/s) not to hold up the connection's other streams long.
pub const HTTP2_MAX_FRAME_BYTES: u32 = 256 * 1024;

/// Default of every server's `http2_keepalive_interval_ms`: a connection with calls open
/// and nothing heard from the peer this long is sent an HTTP/2 PING, in milliseconds.
pub const HTTP2_KEEPALIVE_INTERVAL_MS: u64 = 10_000;
/// Default of every server's `http2_keepalive_timeout_ms`: an unanswered PING closes the
/// connection after this long, in milliseconds.
pub const HTTP2_KEEPALIVE_TIMEOUT_MS: u64 = 10_000;

/// A server builder with HTTP/2 keepalive (`interval_ms` 0: none): a peer gone without
/// closing its connection (a crashed VM, a cut link, a vehicle out of range) loses its
/// calls after `interval_ms + timeout_ms`, and a graceful shutdown, which waits for every
/// open call, is not held up until TCP gives up.
pub fn with_keepalive(
    builder: tonic::transport::Server,
    interval_ms: u64,
    timeout_ms: u64,
) -> tonic::transport::Server {
    let interval = (interval_ms > 0).then(|| std::time::Duration::from_millis(interval_ms));
    builder
        .http2_keepalive_interval(interval)
        .http2_keepalive_timeout(Some(std::time::Duration::from_millis(timeout_ms.max(1))))
}

/// Most accepted connections queued for one serving thread before the acceptor waits.
const SHARD_QUEUE_CONNECTIONS: usize = 64;

/// The connections one serving thread of [`serve_sharded`] is handed.
pub struct ShardIncoming {
    /// Handed over as std sockets: a tokio socket stays registered with the reactor of
    /// the runtime that made it, whose thread would then wake this one for every event.
    rx: tokio::sync::mpsc::Receiver<(std::net::TcpStream, ConnectionSlot)>,
}

impl tokio_stream::Stream for ShardIncoming {
    type Item = std::io::Result<CorkedIo<tokio::net::TcpStream>>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        // Registered here, with this thread's runtime.
        self.rx.poll_recv(cx).map(|s| {
            s.map(|(s, slot)| {
                tokio::net::TcpStream::from_std(s).map(|s| CorkedIo::new(s).holding(slot))
            })
        })
    }
}

/// Serves gRPC on `listener`. `serve(incoming)` builds and runs one server (a tonic
/// `Router::serve_with_incoming_shutdown`, or [`crate::h2serve::serve_http2`]) over the
/// connections it is handed; the caller's task accepts them (TCP_NODELAY set, corked: [`CorkedIo`]),
/// closing at once any past `limit`.
///
/// - `threads == 0`: one server, on the caller's runtime (its workers share every
///   connection: best for a few bulk streams, such as a migration, on few cores).
/// - `threads > 0`: that many threads, each with a current-thread runtime and a server
///   of its own; connections are handed to them in turn and each stays on its thread for
///   its whole life (I/O, HTTP/2 and request handling). On a multi-thread runtime a unary
///   request hopped between workers, a futex wake-up and a context switch per request:
///   ~30 us of CPU per 4 KiB read on two cores against ~21 us on one thread. `serve` is
///   then called on each thread.
///
/// Returns when every server has returned (each stops on its own shutdown signal, which
/// `serve` gives it) and the acceptor has stopped (`stop`), with the first error.
pub async fn serve_sharded<S, F, E>(
    listener: tokio::net::TcpListener,
    threads: usize,
    limit: ConnectionLimit,
    stop: impl std::future::Future<Output = ()>,
    serve: S,
) -> Result<(), E>
where
    S: Fn(ShardIncoming) -> F + Send + Sync + 'static,
    F: std::future::Future<Output = Result<(), E>> + 'static,
    E: Send + 'static,
{
    if threads == 0 {
        let (tx, rx) = tokio::sync::mpsc::channel(SHARD_QUEUE_CONNECTIONS);
        let server = serve(ShardIncoming { rx });
        let accept = async move {
            accept_into(listener, vec![Some(tx)], limit, stop).await;
        };
        let (r, ()) = tokio::join!(server, accept);
        return r;
    }
    let serve = std::sync::Arc::new(serve);
    let mut txs = Vec::new();
    let mut shards = Vec::new();
    for i in 0..threads {
        let (tx, rx) = tokio::sync::mpsc::channel(SHARD_QUEUE_CONNECTIONS);
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let serve = serve.clone();
        let span = tracing::Span::current();
        let thread = std::thread::Builder::new()
            .name(format!("grpc-{i}"))
            .spawn(move || {
                let _g = span.enter();
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(error = %e, "could not start a serving thread's runtime");
                        return;
                    }
                };
                let r = rt.block_on(serve(ShardIncoming { rx }));
                // Tasks the handlers left (streams being torn down) end with the runtime.
                drop(rt);
                let _ = done_tx.send(r);
            })
            .expect("spawning a serving thread");
        txs.push(Some(tx));
        shards.push((done_rx, thread));
    }
    accept_into(listener, txs, limit, stop).await;
    let mut result = Ok(());
    for (done, thread) in shards {
        let r = done.await;
        let _ = thread.join();
        if let (Ok(Err(e)), Ok(())) = (r, &result) {
            result = Err(e);
        }
    }
    result
}

/// Accepts connections until `stop`, handing them to the servers behind `txs` in turn
/// (skipping one whose server has ended) with a slot of `limit` each (one accepted with
/// none left is closed); drops the senders when done.
async fn accept_into(
    listener: tokio::net::TcpListener,
    mut txs: Vec<Option<tokio::sync::mpsc::Sender<(std::net::TcpStream, ConnectionSlot)>>>,
    limit: ConnectionLimit,
    stop: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(stop);
    let mut next = 0usize;
    loop {
        let accepted = tokio::select! {
            () = &mut stop => break,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors or a connection reset before accept: not fatal.
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                continue;
            }
        };
        let Some(slot) = limit.admit(Some(peer.ip())) else { continue };
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
        set_tcp_keepalive(&stream);
        let mut stream = match stream.into_std() {
            Ok(s) => Some((s, slot)),
            Err(e) => {
                tracing::warn!(error = %e, "an accepted connection could not be handed over");
                continue;
            }
        };
        for _ in 0..txs.len() {
            next = (next + 1) % txs.len();
            let Some(tx) = &txs[next] else { continue };
            match tx.send(stream.take().expect("sent at most once")).await {
                Ok(()) => break,
                Err(back) => {
                    stream = Some(back.0);
                    txs[next] = None;
                }
            }
        }
        if stream.is_some() {
            tracing::warn!("no server is left to take connections; the acceptor stops");
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_limit_hands_out_its_slots_and_takes_them_back() {
        let limit = ConnectionLimit::new(2);
        let a = limit.admit(None).expect("a first slot");
        let b = limit.admit(None).expect("a second slot");
        assert_eq!(limit.open(), 2);
        assert!(limit.admit(None).is_none(), "a third connection past max_connections 2");
        assert!(limit.admit(None).is_none(), "refused again");
        drop(a);
        assert_eq!(limit.open(), 1);
        let _c = limit.admit(None).expect("the freed slot");
        drop(b);
        assert_eq!(limit.open(), 1);
        assert_eq!(ConnectionLimit::new(0).slots.available_permits(), 1, "at least one");
    }

    #[test]
    fn one_source_gets_at_most_its_share_and_the_others_the_rest() {
        let (x, y): (std::net::IpAddr, std::net::IpAddr) =
            ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let limit = ConnectionLimit::with_per_source(4, 2);
        let x1 = limit.admit(Some(x)).expect("x's first");
        let _x2 = limit.admit(Some(x)).expect("x's second");
        assert!(limit.admit(Some(x)).is_none(), "x past max_connections_per_source 2");
        assert_eq!(limit.open(), 2, "a refusal holds no slot");
        let _y1 = limit.admit(Some(y)).expect("y is served meanwhile");
        drop(x1);
        let _x3 = limit.admit(Some(x)).expect("x's freed place");
        let _unknown = limit.admit(None).expect("an unknown source counts against the total");
        assert!(limit.admit(Some(y)).is_none(), "the total, 4, is reached");
        assert_eq!(limit.sources.lock().unwrap().len(), 2);
        drop((_x2, _x3, _y1));
        assert!(limit.sources.lock().unwrap().is_empty(), "no entry outlives its connections");
        // IPv6 sources count by their /64 (any of 2^64 addresses is the same host or
        // site); an IPv4-mapped address counts as its IPv4 one.
        let limit = ConnectionLimit::with_per_source(8, 2);
        let ip = |s: &str| -> std::net::IpAddr { s.parse().unwrap() };
        let _a = limit.admit(Some(ip("2001:db8:1:2::1"))).expect("the /64's first");
        let _b = limit.admit(Some(ip("2001:db8:1:2:ffff::9"))).expect("its second");
        assert!(limit.admit(Some(ip("2001:db8:1:2::77"))).is_none(), "the same /64, past 2");
        let _c = limit.admit(Some(ip("2001:db8:1:3::1"))).expect("another /64");
        let _d = limit.admit(Some(ip("10.0.0.9"))).expect("an IPv4 source");
        let _e = limit.admit(Some(ip("::ffff:10.0.0.9"))).expect("the same, mapped");
        assert!(limit.admit(Some(ip("10.0.0.9"))).is_none(), "10.0.0.9 past 2");
        // Link-local peers are each their own; NAT64 counts the IPv4 address inside.
        assert_eq!(source_key(ip("fe80::1")), ip("fe80::1"));
        assert_ne!(source_key(ip("fe80::1")), source_key(ip("fe80::2")));
        assert_eq!(source_key(ip("64:ff9b::a00:9")), ip("10.0.0.9"));
        assert_eq!(source_key(ip("2001:db8:1:2::1")), ip("2001:db8:1:2::"));
        assert_eq!(ConnectionLimit::with_per_source(4, 9).per_source, 4, "at most max");
        assert_eq!(ConnectionLimit::with_per_source(4, 0).per_source, 1, "at least one");
    }

    #[test]
    fn the_open_file_limit_is_raised_to_the_hard_limit() {
        let soft = raise_open_file_limit(16).expect("the limit can be read");
        let mut l = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: getrlimit only writes the struct it is given.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) }, 0);
        assert_eq!((l.rlim_cur, l.rlim_cur), (soft, l.rlim_max));
    }
}
