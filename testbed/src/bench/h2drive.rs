//! A lean driver for the NMS's streaming calls (`Stream`, `StreamBatches`): the `h2` crate
//! directly, without tonic's client stack, on one thread of its own. It is to these calls
//! what h2load is to the unary ones and redis-benchmark to redis: every request message is
//! encoded once before the run, so the figure is the server's. The single operations one
//! turn sends (reads, 4 KiB writes) share a DATA frame, as tonic's client encodes them and
//! as redis-benchmark writes its pipeline (a frame per 4 KiB write cost the NMS 3.4-4.4 us
//! per streamed write against 2.4-2.6); a batch leaves as it is, uncopied. It still reads
//! every reply: each message is decoded, each result must be a read or write result (a
//! `StreamError` fails the run), the count must match what was sent, and the call must end
//! with grpc-status 0 in its trailers.
//!
//! Each client is one HTTP/2 connection with one call, keeping `window` messages of
//! `ops_per_message` operations in flight: streamed is `window` = depth of 1-op messages,
//! batched is one message of depth operations at a time (like a redis pipeline).

use anyhow::{bail, Context as _};
use prost::bytes::{Buf as _, Bytes, BytesMut};
use prost::Message as _;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wayside_proto::pb;

/// HTTP/2 receive window the driver grants per stream and per connection, in bytes.
const WINDOW_BYTES: u32 = 4 << 20;

/// What one client sends.
#[derive(Debug, Clone)]
pub struct ClientPlan {
    /// The call's first message (it carries the volume's credentials), gRPC-framed.
    pub first: Bytes,
    /// Messages sent after it, in turn, gRPC-framed.
    pub cycle: Vec<Bytes>,
}

/// A run's shape.
#[derive(Debug, Clone)]
pub struct Plan {
    pub addr: std::net::SocketAddr,
    /// `Stream` (replies are `StreamReply`) or `StreamBatches` (replies are `StreamResults`).
    pub batched: bool,
    pub ops_per_message: usize,
    pub window: usize,
    pub clients: Vec<ClientPlan>,
    pub duration: Duration,
    /// Over TLS with this client config (the NMS's address must be in its certificate).
    pub tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
    /// The CPU the driver's thread is pinned to (`--pin`), if any.
    pub cpu: Option<usize>,
}

/// What a run measured.
#[derive(Debug)]
pub struct Outcome {
    /// Each operation's latency (its message's round trip), in microseconds.
    pub lat_us: Vec<u32>,
    /// From the first request to the moment the clients were told to stop.
    pub elapsed: Duration,
    /// CPU time the driver's thread used, all of it (connecting included).
    pub driver_cpu: Duration,
}

/// Runs `plan` on a thread of its own (its own single-threaded runtime, pinned to
/// `plan.cpu` if given) and waits for it.
pub async fn run(plan: Plan) -> anyhow::Result<Outcome> {
    // The whole thread's CPU (its connections and handshakes too, as a load generator's
    // process CPU includes its own), not only the measured window's.
    let ((lat_us, elapsed), driver_cpu) =
        super::on_thread("bench-h2-driver", plan.cpu, move || drive(plan)).await?;
    Ok(Outcome { lat_us, elapsed, driver_cpu })
}

/// Connects every client, runs them for the plan's duration; returns every operation's
/// latency (microseconds) and the time they ran.
async fn drive(plan: Plan) -> anyhow::Result<(Vec<u32>, Duration)> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut conns = Vec::new();
    for c in &plan.clients {
        let tcp = tokio::net::TcpStream::connect(plan.addr).await?;
        tcp.set_nodelay(true)?;
        // Corked as the NMS's own connections are: the frames (or TLS records) one turn
        // produces leave in one write, not a write per 4 KiB message (h2 flushes after each).
        let io = wayside_proto::cork::CorkedIo::new(tcp);
        let h2 = match &plan.tls {
            None => h2_over(io).await?,
            Some(cfg) => {
                let name =
                    tokio_rustls::rustls::pki_types::ServerName::IpAddress(plan.addr.ip().into());
                let tls = tokio_rustls::TlsConnector::from(cfg.clone())
                    .connect(name, io)
                    .await
                    .context("TLS handshake with the NMS")?;
                h2_over(tls).await?
            }
        };
        conns.push((h2, c.clone()));
    }
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for (h2, c) in conns {
        tasks.spawn(client(h2, c, plan.clone(), stop.clone()));
    }
    tokio::time::sleep(plan.duration).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed();
    let mut lat_us = Vec::new();
    while let Some(r) = tasks.join_next().await {
        lat_us.extend(r??);
    }
    Ok((lat_us, elapsed))
}

/// An HTTP/2 client connection over `io`, its connection task spawned.
async fn h2_over<IO>(io: IO) -> anyhow::Result<h2::client::SendRequest<Bytes>>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (h2, conn) = h2::client::Builder::new()
        .initial_window_size(WINDOW_BYTES)
        .initial_connection_window_size(WINDOW_BYTES)
        .max_frame_size(wayside_proto::server::HTTP2_MAX_FRAME_BYTES)
        .handshake::<_, Bytes>(io)
        .await
        .context("HTTP/2 handshake with the NMS")?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "bench h2 connection ended");
        }
    });
    Ok(h2)
}

/// One connection's call; returns its operations' latencies.
async fn client(
    h2: h2::client::SendRequest<Bytes>,
    c: ClientPlan,
    plan: Plan,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<Vec<u32>> {
    let method = if plan.batched { "StreamBatches" } else { "Stream" };
    let req = http::Request::post(format!("http://{}/wayside.v1.Nms/{method}", plan.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())?;
    let mut h2 = h2.ready().await?;
    let (resp, mut tx) = h2.send_request(req, false)?;
    // (sent at, results still due) per message in flight, oldest first.
    let mut inflight: VecDeque<(Instant, usize)> = VecDeque::with_capacity(plan.window);
    let mut next = c.cycle.iter().cycle();
    let mut out = Outbox::default();
    out.push(&mut tx, &c.first)?;
    inflight.push_back((Instant::now(), plan.ops_per_message));
    for _ in 1..plan.window {
        out.push(&mut tx, next.next().context("no messages to send")?)?;
        inflight.push_back((Instant::now(), plan.ops_per_message));
    }
    out.flush(&mut tx)?;
    let resp = resp.await.context("the NMS refused the call")?;
    if resp.status() != http::StatusCode::OK {
        bail!("HTTP status {}", resp.status());
    }
    if let Some(s) = resp.headers().get("grpc-status") {
        bail!(
            "the call failed at once: grpc-status {s:?} {:?}",
            resp.headers().get("grpc-message")
        );
    }
    let mut body = resp.into_body();
    let mut buf = BytesMut::new();
    let mut lat = Vec::with_capacity(1 << 16);
    let mut ended = false;
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        body.flow_control().release_capacity(chunk.len())?;
        buf.extend_from_slice(&chunk);
        while let Some(msg) = next_message(&mut buf)? {
            let results = count_results(msg, plan.batched)?;
            for _ in 0..results {
                let Some(front) = inflight.front_mut() else {
                    bail!("a result for an operation never sent");
                };
                front.1 -= 1;
                if front.1 > 0 {
                    continue;
                }
                let us = u32::try_from(front.0.elapsed().as_micros()).unwrap_or(u32::MAX);
                lat.extend(std::iter::repeat_n(us, plan.ops_per_message));
                inflight.pop_front();
                if !stop.load(Ordering::Relaxed) {
                    out.push(&mut tx, next.next().context("no messages to send")?)?;
                    inflight.push_back((Instant::now(), plan.ops_per_message));
                }
            }
        }
        out.flush(&mut tx)?;
        if inflight.is_empty() && !ended {
            tx.send_data(Bytes::new(), true)?;
            ended = true;
        }
    }
    if !inflight.is_empty() || !buf.is_empty() {
        bail!("the call ended with {} messages unanswered", inflight.len());
    }
    let trailers = body.trailers().await?.context("the call ended without trailers")?;
    match trailers.get("grpc-status").map(|s| s.as_bytes()) {
        Some(b"0") => Ok(lat),
        s => bail!("the call ended with grpc-status {s:?} {:?}", trailers.get("grpc-message")),
    }
}

/// Most bytes of request messages gathered into one DATA frame, in bytes.
const GATHER_BYTES: usize = 64 * 1024;

/// Messages of at least this many bytes (a batch of 16 writes) are not gathered, in bytes.
const GATHER_LARGEST_BYTES: usize = 16 * 1024;

/// The request messages one turn sends: single operations (reads, 4 KiB writes) are
/// gathered into one DATA frame, as a gRPC client's encoder does; batches of writes leave
/// as they are, uncopied.
#[derive(Default)]
struct Outbox {
    buf: BytesMut,
}

impl Outbox {
    fn push(&mut self, tx: &mut h2::SendStream<Bytes>, msg: &Bytes) -> anyhow::Result<()> {
        if msg.len() >= GATHER_LARGEST_BYTES {
            self.flush(tx)?;
            tx.send_data(msg.clone(), false)?;
        } else {
            if self.buf.len() + msg.len() > GATHER_BYTES {
                self.flush(tx)?;
            }
            self.buf.extend_from_slice(msg);
        }
        Ok(())
    }

    fn flush(&mut self, tx: &mut h2::SendStream<Bytes>) -> anyhow::Result<()> {
        if !self.buf.is_empty() {
            tx.send_data(self.buf.split().freeze(), false)?;
        }
        Ok(())
    }
}

/// Splits the next whole gRPC message off `buf` (flag byte, big-endian length, bytes).
fn next_message(buf: &mut BytesMut) -> anyhow::Result<Option<Bytes>> {
    if buf.len() < 5 {
        return Ok(None);
    }
    if buf[0] != 0 {
        bail!("a compressed reply (flag {})", buf[0]);
    }
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize;
    if buf.len() < 5 + len {
        return Ok(None);
    }
    buf.advance(5);
    Ok(Some(buf.split_to(len).freeze()))
}

/// Decodes one reply message; returns how many operation results it carries, failing on
/// any result that is not a read or write result.
fn count_results(msg: Bytes, batched: bool) -> anyhow::Result<usize> {
    let check = |r: &pb::StreamReply| match &r.result {
        Some(pb::stream_reply::Result::Read(_) | pb::stream_reply::Result::Write(_)) => Ok(()),
        other => bail!("operation {} failed: {other:?}", r.tag),
    };
    if batched {
        let m = pb::StreamResults::decode(msg)?;
        m.results.iter().try_for_each(check)?;
        Ok(m.results.len())
    } else {
        check(&pb::StreamReply::decode(msg)?)?;
        Ok(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(m: &impl prost::Message) -> Vec<u8> {
        let body = m.encode_to_vec();
        let mut out = vec![0];
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    #[test]
    fn replies_are_split_whole_and_failed_operations_are_errors() {
        let ok = pb::StreamResults {
            results: vec![
                pb::StreamReply {
                    tag: 1,
                    result: Some(pb::stream_reply::Result::Read(pb::ReadReply::default())),
                },
                pb::StreamReply {
                    tag: 2,
                    result: Some(pb::stream_reply::Result::Write(pb::WriteReply::default())),
                },
            ],
        };
        let wire = frame(&ok);
        let mut buf = BytesMut::from(&wire[..wire.len() - 1]);
        assert!(next_message(&mut buf).unwrap().is_none(), "not whole yet");
        buf.extend_from_slice(&wire[wire.len() - 1..]);
        buf.extend_from_slice(&wire[..3]);
        let m = next_message(&mut buf).unwrap().unwrap();
        assert_eq!(count_results(m, true).unwrap(), 2);
        assert_eq!(buf.len(), 3, "the next message's start stays");
        let failed = pb::StreamReply {
            tag: 9,
            result: Some(pb::stream_reply::Result::Error(pb::StreamError::default())),
        };
        let e = count_results(Bytes::from(failed.encode_to_vec()), false).unwrap_err();
        assert!(e.to_string().contains("operation 9 failed"), "{e}");
        let mut compressed = BytesMut::from(&[1u8, 0, 0, 0, 0][..]);
        assert!(next_message(&mut compressed).is_err());
    }
}
