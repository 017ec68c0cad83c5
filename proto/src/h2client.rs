//! A lean HTTP/2 client connection (RFC 9113) for gRPC: the transport under the vehicle's
//! client library (`nms::client`), in place of tonic's `Channel`.
//!
//! tonic's channel is a `tower::Buffer` (a task of its own that every call passes
//! through), hyper's client (a task per request body) and h2. Profiled at 16 clients of
//! unary 4 KiB reads, on one thread with the clients, it cost 24-25 us of CPU per call
//! (h2 17% of it, tokio's task switches 8%, `memmove` 9%), three times what the NMS spent
//! answering. This connection is the client half of [`crate::h2conn`]'s design, and shares
//! its parts (frame writer, request body, wake-ups, HPACK decoder):
//!
//! - [`Channel`] is a `tower::Service` that tonic's generated clients call. A call is queued
//!   for the connection's task and its response future waits on a slot of its own: one
//!   task switch there and one back, no task per call.
//! - The connection's task writes a call's HEADERS and its request body's DATA together; a
//!   body that ends at once (a unary call) ends with its DATA frame (END_STREAM), so the
//!   call leaves in one frame pair and one write with every other call of the turn.
//! - A response's DATA reaches its body as slices of the receive buffer, released to the
//!   peer's windows as the body consumes them; trailers end the body.
//! - Limits ([`ClientSettings`]): open streams (`max_open_streams`, or the peer's
//!   `MAX_CONCURRENT_STREAMS` when lower; calls past it wait in order), calls waiting
//!   (`max_waiting_calls`; more fail RESOURCE_EXHAUSTED), the windows, the frame size,
//!   `max_header_list_bytes`, the send buffer (`send_buffer_bytes`).
//! - Failures become gRPC statuses tonic passes on: a connection that ends fails its open
//!   calls UNAVAILABLE with the cause; a stream the peer resets fails as tonic maps the
//!   code (REFUSED_STREAM: UNAVAILABLE, CANCEL: CANCELLED, ...); calls past a peer's GOAWAY
//!   fail UNAVAILABLE (not processed) and the channel takes no more. A channel is one
//!   connection: it does not reconnect (the client library re-attaches, with its journal).
//! - A call whose response future or body is dropped early resets its stream (CANCEL).

use crate::h2conn::{
    code, code_name, data_frame, encode_int, encode_string, frame, frame_limit, grow_conn_window,
    next_frame, on_ping, parse_settings, proto_err, queue_for_window, reserve_read,
    send_buffer_limit, setting, window_increment, ConnError, Frame, HeaderBlocks, Keepalive, Out,
    RecvBody, RecvShared, RecvState, RecvWindow, StreamWaker, Wakeups, DEFAULT_MAX_FRAME_BYTES,
    DEFAULT_MAX_HELD_SLICES, DEFAULT_SEND_BUFFER_BYTES, DEFAULT_WINDOW, MAX_WINDOW, PREFACE,
    READ_ROOM_MIN_BYTES,
};
use bytes::{Bytes, BytesMut};
use http_body::Body as _;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake as _, Waker};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};

/// Rounds of reading, sending calls and writing in one poll of the connection before it
/// yields to the runtime's other tasks.
const TURNS_PER_POLL: usize = 16;
/// How long a closing connection tries to send its last frames, in milliseconds.
const CLOSE_FLUSH_MS: u64 = 1_000;
/// The highest stream id a client may open (RFC 9113 section 5.1.1).
const MAX_STREAM_ID: u32 = (1 << 31) - 1;

/// What a client connection advertises and enforces.
#[derive(Debug, Clone, Copy)]
pub struct ClientSettings {
    /// Response bytes the peer may have sent and the calls not consumed, over all
    /// streams.
    pub connection_window_bytes: u32,
    /// Response bytes the peer may have sent on one stream and its call not consumed.
    pub stream_window_bytes: u32,
    /// Largest frame the peer may send, in bytes.
    pub max_frame_bytes: u32,
    /// Largest response header block (encoded) and header list (decoded), in bytes.
    pub max_header_list_bytes: u32,
    /// Most calls open at once on the connection (the peer's `MAX_CONCURRENT_STREAMS`
    /// when lower); more wait for a stream, in calls.
    pub max_open_streams: usize,
    /// Most calls waiting for a stream (past `max_open_streams`, or not yet taken up by the
    /// connection's task); more fail at once with RESOURCE_EXHAUSTED, in calls.
    pub max_waiting_calls: usize,
    /// Frames queued to send past which no more request data is queued until the socket
    /// has taken them, in bytes (the connection reads on up to twice this; at least 16 KiB).
    pub send_buffer_bytes: usize,
    /// Most response DATA payloads held uncopied (as slices of receive buffers) at once;
    /// past it they are copied, in slices.
    pub max_held_slices: usize,
    /// A PING goes out once the server has sent nothing this long, in milliseconds (0, or
    /// a `keepalive_timeout_ms` of 0: never): a server gone silent (powered off, out of
    /// range, a link cut without a reset) is found out within this plus
    /// `keepalive_timeout_ms`, with calls open or none, rather than by each call's own
    /// deadline.
    pub keepalive_interval_ms: u64,
    /// A PING unanswered this long ends the connection, in milliseconds: its calls fail
    /// UNAVAILABLE ("no answer to a keepalive PING"), and the next call connects anew. The
    /// time counts only while the socket takes none of our bytes either (a slow uplink
    /// busy with a large upload is not taken for a dead server).
    pub keepalive_timeout_ms: u64,
}

/// Default [`ClientSettings::keepalive_interval_ms`], in milliseconds.
pub const DEFAULT_KEEPALIVE_INTERVAL_MS: u64 = 2_000;
/// Default [`ClientSettings::keepalive_timeout_ms`], in milliseconds: no shorter than the
/// client library's per-attempt `rpc_timeout` (5 s), since a server slow enough to answer a
/// call late (an NMS in a TCG VM on a loaded host) answers a PING late too, and a call that
/// would have been answered is not to be cut by the PING.
pub const DEFAULT_KEEPALIVE_TIMEOUT_MS: u64 = 5_000;

impl Default for ClientSettings {
    fn default() -> Self {
        Self {
            connection_window_bytes: 8 << 20,
            stream_window_bytes: 2 << 20,
            max_frame_bytes: crate::server::HTTP2_MAX_FRAME_BYTES,
            max_header_list_bytes: 16 * 1024,
            max_open_streams: 1024,
            max_waiting_calls: 1024,
            send_buffer_bytes: DEFAULT_SEND_BUFFER_BYTES,
            max_held_slices: DEFAULT_MAX_HELD_SLICES,
            keepalive_interval_ms: DEFAULT_KEEPALIVE_INTERVAL_MS,
            keepalive_timeout_ms: DEFAULT_KEEPALIVE_TIMEOUT_MS,
        }
    }
}

impl ClientSettings {
    fn our_max_frame(&self) -> u32 {
        frame_limit(self.max_frame_bytes)
    }

    fn stream_window(&self) -> i64 {
        i64::from(self.stream_window_bytes).clamp(1, MAX_WINDOW)
    }

    fn conn_window(&self) -> i64 {
        i64::from(self.connection_window_bytes).clamp(DEFAULT_WINDOW, MAX_WINDOW)
    }
}

/// What a call fails with: a [`tonic::Status`], boxed (tonic passes it on as it is).
pub type Error = Box<dyn std::error::Error + Send + Sync>;

/// The gRPC status tonic gives an HTTP/2 reset code (as it maps h2's reasons).
pub fn reset_status(c: u32) -> tonic::Status {
    let msg = format!("the call's stream was reset by the peer ({})", code_name(c));
    match c {
        code::REFUSED_STREAM => tonic::Status::unavailable(msg),
        code::CANCEL => tonic::Status::cancelled(msg),
        code::ENHANCE_YOUR_CALM => tonic::Status::resource_exhausted(msg),
        0xc => tonic::Status::permission_denied(msg),
        0x0..=0x4 | 0x9 | 0xa => tonic::Status::internal(msg),
        _ => tonic::Status::unknown(msg),
    }
}

// ---------------------------------------------------------------------------------------
// What callers and the connection's task share.

struct Shared {
    queue: Mutex<Queue>,
    wakeups: Arc<Wakeups>,
    /// Live [`Channel`] handles: at none, the connection ends when its calls have.
    handles: AtomicUsize,
    max_waiting: usize,
}

struct Queue {
    new: VecDeque<NewCall>,
    next_id: u32,
    /// Why the connection takes no more calls.
    closed: Option<tonic::Status>,
}

impl Shared {
    fn closed(&self) -> Option<tonic::Status> {
        self.queue.lock().expect("call queue lock").closed.clone()
    }

    /// The channel takes no more calls (`why`, unless it had a reason already), and the
    /// calls waiting for a stream fail with `why`.
    fn close_queue(&self, why: &tonic::Status) {
        let new = {
            let mut q = self.queue.lock().expect("call queue lock");
            if q.closed.is_none() {
                q.closed = Some(why.clone());
            }
            std::mem::take(&mut q.new)
        };
        for c in new {
            c.slot.answer(Err(why.clone()));
        }
    }
}

struct NewCall {
    id: u32,
    req: http::Request<tonic::body::Body>,
    slot: Arc<Slot>,
}

/// Where a call's response (or failure) waits for its future.
struct Slot {
    id: u32,
    wakeups: Arc<Wakeups>,
    state: Mutex<SlotState>,
}

#[derive(Default)]
struct SlotState {
    answer: Option<Result<http::Response<ClientBody>, tonic::Status>>,
    waker: Option<Waker>,
    /// The answer was taken, or the future dropped.
    done: bool,
    /// The future was dropped before its answer: the stream is to be reset.
    cancelled: bool,
}

impl Slot {
    fn answer(&self, a: Result<http::Response<ClientBody>, tonic::Status>) {
        let waker = {
            let mut st = self.state.lock().expect("call slot lock");
            if st.done {
                return;
            }
            st.answer = Some(a);
            st.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    fn cancelled(&self) -> bool {
        self.state.lock().expect("call slot lock").cancelled
    }
}

/// A call's response: its headers, then its body.
pub struct ResponseFuture {
    inner: Result<Arc<Slot>, Option<tonic::Status>>,
}

impl Future for ResponseFuture {
    type Output = Result<http::Response<ClientBody>, Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let slot = match &mut self.inner {
            Ok(slot) => slot,
            Err(s) => return Poll::Ready(Err(s.take().expect("polled after it was ready").into())),
        };
        let mut st = slot.state.lock().expect("call slot lock");
        match st.answer.take() {
            Some(a) => {
                st.done = true;
                Poll::Ready(a.map_err(Into::into))
            }
            None => {
                if !st.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                    st.waker = Some(cx.waker().clone());
                }
                Poll::Pending
            }
        }
    }
}

impl Drop for ResponseFuture {
    fn drop(&mut self) {
        let Ok(slot) = &self.inner else { return };
        {
            let mut st = slot.state.lock().expect("call slot lock");
            if st.done {
                return;
            }
            st.done = true;
            st.cancelled = true;
            // A response that arrived meanwhile is dropped with its body (which resets).
            st.answer = None;
        }
        slot.wakeups.ids.lock().expect("wakeups lock").push(slot.id);
        slot.wakeups.wake_conn();
    }
}

/// A response's body: its DATA, uncopied, then its trailers. A stream reset fails it with
/// the status tonic would give; a lost connection with UNAVAILABLE and the cause.
pub struct ClientBody {
    body: RecvBody,
}

impl http_body::Body for ClientBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
        match Pin::new(&mut self.body).poll_frame(cx) {
            Poll::Ready(Some(Err(crate::h2conn::StreamReset(c)))) => {
                let e = self.body.shared.lock().error.clone();
                Poll::Ready(Some(Err(e.unwrap_or_else(|| reset_status(c)))))
            }
            Poll::Ready(Some(Ok(f))) => Poll::Ready(Some(Ok(f))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
}

impl Drop for ClientBody {
    /// The connection hears of it at once (the stream is reset if the response had not
    /// ended), whatever the body had read before.
    fn drop(&mut self) {
        let shared = &self.body.shared;
        {
            let mut st = shared.lock();
            st.dropped = true;
            st.released += st.clear(shared.held());
        }
        shared.stream.wake_by_ref();
    }
}

impl std::fmt::Debug for ClientBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.body.fmt(f)
    }
}

// ---------------------------------------------------------------------------------------
// The channel.

/// One HTTP/2 connection to a gRPC server, for tonic's generated clients
/// (`NmsClient::new(channel)`). Clones share the connection; it ends when the last clone
/// and the last call are gone, or the peer closes it.
pub struct Channel {
    shared: Arc<Shared>,
}

impl Clone for Channel {
    fn clone(&self) -> Self {
        self.shared.handles.fetch_add(1, Ordering::SeqCst);
        Self { shared: self.shared.clone() }
    }
}

impl Drop for Channel {
    fn drop(&mut self) {
        if self.shared.handles.fetch_sub(1, Ordering::SeqCst) == 1 {
            // Woken even while it polls (it may have looked at `handles` already).
            if let Some(w) = self.shared.wakeups.conn.lock().expect("wakeups lock").as_ref() {
                w.wake_by_ref();
            }
        }
    }
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("h2client::Channel").finish_non_exhaustive()
    }
}

impl Channel {
    /// Why the connection takes no more calls, once it does not.
    pub fn closed(&self) -> Option<tonic::Status> {
        self.shared.closed()
    }
}

impl tower::Service<http::Request<tonic::body::Body>> for Channel {
    type Response = http::Response<ClientBody>;
    type Error = Error;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        // Calls past the limits fail in `call`, with a status that says which.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> ResponseFuture {
        let fail = |s| ResponseFuture { inner: Err(Some(s)) };
        let slot = {
            let mut q = self.shared.queue.lock().expect("call queue lock");
            if let Some(s) = &q.closed {
                return fail(s.clone());
            }
            if q.new.len() >= self.shared.max_waiting {
                // Calls given up while they waited do not count.
                q.new.retain(|c| !c.slot.cancelled());
            }
            if q.new.len() >= self.shared.max_waiting {
                return fail(tonic::Status::resource_exhausted(format!(
                    "more than max_waiting_calls ({}) calls wait for a stream on this connection",
                    self.shared.max_waiting
                )));
            }
            let id = q.next_id;
            if id > MAX_STREAM_ID {
                let s = tonic::Status::unavailable("the connection has used up its stream ids");
                q.closed = Some(s.clone());
                return fail(s);
            }
            q.next_id += 2;
            let slot = Arc::new(Slot {
                id,
                wakeups: self.shared.wakeups.clone(),
                state: Mutex::new(SlotState::default()),
            });
            q.new.push_back(NewCall { id, req, slot: slot.clone() });
            slot
        };
        self.shared.wakeups.wake_conn();
        ResponseFuture { inner: Ok(slot) }
    }
}

/// Starts an HTTP/2 connection over `io` (TCP or TLS, already connected) to `authority`
/// (`host:port`, sent as `:authority`; `https` picks the `:scheme`), on a task of its own.
pub fn start<IO>(io: IO, authority: &str, https: bool, settings: ClientSettings) -> Channel
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue { new: VecDeque::new(), next_id: 1, closed: None }),
        wakeups: Arc::new(Wakeups::new(settings.max_held_slices, usize::MAX)),
        handles: AtomicUsize::new(1),
        max_waiting: settings.max_waiting_calls.max(1),
    });
    let conn = Conn::new(io, shared.clone(), authority, https, settings);
    tokio::spawn(conn.run());
    Channel { shared }
}

// ---------------------------------------------------------------------------------------
// The connection.

/// Ends a response body that still waits for its stream: it fails with `status` (the
/// first one given), after what it has not read when the response had ended.
fn fail_recv(recv: &RecvShared, c: u32, status: tonic::Status) {
    {
        let mut st = recv.lock();
        if st.error.is_none() {
            st.error = Some(status);
        }
    }
    recv.close(c);
}

struct CallStream {
    /// Until the response's headers are handed over.
    slot: Option<Arc<Slot>>,
    /// The request body, until it ended.
    body: Option<Pin<Box<tonic::body::Body>>>,
    /// Request data that waits for window, and whether it ends the request.
    pending: Option<(Bytes, bool)>,
    /// Request data polled and not yet sent: sent with END_STREAM if the body ends next.
    held: Option<Bytes>,
    /// We sent END_STREAM (or stopped sending).
    send_closed: bool,
    recv: Arc<RecvShared>,
    waker: Waker,
    /// The response's headers arrived.
    got_headers: bool,
    /// The peer sent END_STREAM.
    recv_closed: bool,
    /// Counted against the peer's MAX_CONCURRENT_STREAMS (until both sides ended).
    active: bool,
    recv_win: RecvWindow,
    recv_held: usize,
    send_window: i64,
    window_queued: bool,
    out_queued: bool,
}

struct Conn<IO> {
    io: IO,
    shared: Arc<Shared>,
    settings: ClientSettings,
    /// `:scheme` and `:authority`, encoded once.
    head: Vec<u8>,
    rbuf: BytesMut,
    out: Out,
    hpack: crate::hpack::Decoder,
    block: Vec<u8>,
    streams: HashMap<u32, CallStream>,
    /// Streams counted against the peer's limit.
    active: usize,
    ready: Vec<u32>,
    window_blocked: VecDeque<u32>,
    out_blocked: Vec<u32>,
    settings_seen: bool,
    /// Header blocks being received.
    blocks: HeaderBlocks,
    /// The peer sends large frames (reads go into larger buffers).
    large_frames: bool,
    /// The highest stream id opened.
    last_opened: u32,
    peer_max_frame: usize,
    peer_initial_window: i64,
    /// Streams we may have open: the peer's `MAX_CONCURRENT_STREAMS` and ours, the lower.
    peer_max_streams: usize,
    send_window: i64,
    recv_win: RecvWindow,
    /// The peer sent GOAWAY.
    goaway: bool,
    keepalive: Option<Keepalive>,
}

impl<IO: AsyncRead + AsyncWrite + Unpin> Conn<IO> {
    fn new(
        io: IO,
        shared: Arc<Shared>,
        authority: &str,
        https: bool,
        mut settings: ClientSettings,
    ) -> Self {
        settings.send_buffer_bytes = send_buffer_limit(settings.send_buffer_bytes);
        // Past it a server's header list of many distinct names would panic `HeaderMap`.
        settings.max_header_list_bytes =
            settings.max_header_list_bytes.min(crate::h2conn::MAX_HEADER_LIST_BYTES);
        let mut out = Out::default();
        out.small(PREFACE);
        let ours = [
            (setting::ENABLE_PUSH, 0),
            (setting::INITIAL_WINDOW_SIZE, settings.stream_window() as u32),
            (setting::MAX_FRAME_SIZE, settings.our_max_frame()),
            (setting::MAX_HEADER_LIST_SIZE, settings.max_header_list_bytes),
        ];
        out.header(ours.len() * 6, frame::SETTINGS, 0, 0);
        for (id, v) in ours {
            out.small(&id.to_be_bytes());
            out.small(&v.to_be_bytes());
        }
        let conn_window = settings.conn_window();
        if conn_window > DEFAULT_WINDOW {
            out.window_update(0, (conn_window - DEFAULT_WINDOW) as u32);
        }
        // :scheme from the static table (entries 6 and 7); :authority a literal with its
        // static name (entry 1).
        let mut head = vec![if https { 0x87 } else { 0x86 }];
        encode_int(&mut head, 0, 4, 1);
        encode_string(&mut head, authority.as_bytes());
        Self {
            io,
            shared,
            settings,
            head,
            rbuf: BytesMut::new(),
            out,
            hpack: crate::hpack::Decoder::new(4096),
            block: Vec::new(),
            streams: HashMap::new(),
            active: 0,
            ready: Vec::new(),
            window_blocked: VecDeque::new(),
            out_blocked: Vec::new(),
            settings_seen: false,
            blocks: HeaderBlocks::new(settings.max_header_list_bytes as usize),
            large_frames: false,
            last_opened: 0,
            peer_max_frame: DEFAULT_MAX_FRAME_BYTES,
            peer_initial_window: DEFAULT_WINDOW,
            peer_max_streams: settings.max_open_streams.max(1),
            send_window: DEFAULT_WINDOW,
            recv_win: RecvWindow::new(conn_window),
            goaway: false,
            keepalive: Keepalive::new(
                (settings.keepalive_interval_ms > 0 && settings.keepalive_timeout_ms > 0)
                    .then(|| Duration::from_millis(settings.keepalive_interval_ms)),
                Duration::from_millis(settings.keepalive_timeout_ms),
            ),
        }
    }

    async fn run(mut self) {
        let r = std::future::poll_fn(|cx| self.poll(cx)).await;
        if let Err(ConnError::Protocol { code, .. }) = &r {
            self.out.goaway(0, *code);
        }
        // The cause as the status's source: callers tell a lost connection by it (the
        // client library names it, and hints at TLS for a plaintext caller).
        let cause: Arc<dyn std::error::Error + Send + Sync> = match r {
            Ok(()) => Arc::new(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the server closed the connection",
            )),
            Err(e) => Arc::new(e),
        };
        tracing::debug!(cause = %cause, "client connection ended");
        let mut why = tonic::Status::unavailable("the connection to the server ended");
        why.set_source(cause);
        self.fail_all(why);
        let flush = async {
            std::future::poll_fn(|cx| self.out.poll_write(&mut self.io, cx)).await?;
            std::future::poll_fn(|cx| Pin::new(&mut self.io).poll_flush(cx)).await?;
            std::future::poll_fn(|cx| Pin::new(&mut self.io).poll_shutdown(cx)).await
        };
        let _ = tokio::time::timeout(Duration::from_millis(CLOSE_FLUSH_MS), flush).await;
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ConnError>> {
        {
            let mut w = self.shared.wakeups.conn.lock().expect("wakeups lock");
            if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *w = Some(cx.waker().clone());
            }
        }
        self.shared.wakeups.polling.store(true, Ordering::SeqCst);
        let r = self.turns(cx);
        self.shared.wakeups.polling.store(false, Ordering::SeqCst);
        match r {
            Poll::Pending if self.has_work() => {
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            r => r,
        }
    }

    /// Woken streams or new calls wait.
    fn has_work(&self) -> bool {
        !self.shared.wakeups.ids.lock().expect("wakeups lock").is_empty()
            || (self.active < self.peer_max_streams
                && self.out.len < self.settings.send_buffer_bytes
                && !self.shared.queue.lock().expect("call queue lock").new.is_empty())
    }

    fn turns(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ConnError>> {
        for _ in 0..TURNS_PER_POLL {
            let mut busy = false;
            // Read even with the send buffer full (of our requests, bounded by the high
            // water mark): a peer that waits for us to read its replies before it reads
            // our requests must not deadlock with us. Only a peer that makes us queue
            // control frames (PING and SETTINGS acks) it never reads is not read past
            // twice the mark.
            if self.out.len < 2 * self.settings.send_buffer_bytes {
                reserve_read(&mut self.rbuf, self.large_frames);
                match tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.rbuf) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Ok(())),
                    Poll::Ready(Ok(_)) => {
                        busy = true;
                        if let Some(k) = &mut self.keepalive {
                            k.heard();
                        }
                        self.handle_frames()?;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                    Poll::Pending => {}
                }
            }
            if let Some(k) = &mut self.keepalive {
                k.poll(&mut self.out, cx)?;
            }
            busy |= self.open_calls();
            busy |= self.poll_streams();
            if self.out.len > 0 {
                let before = self.out.len;
                match self.out.poll_write(&mut self.io, cx) {
                    Poll::Ready(Ok(())) => busy = true,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                    Poll::Pending => busy |= self.out.len < before,
                }
                if self.out.len < self.settings.send_buffer_bytes {
                    for id in std::mem::take(&mut self.out_blocked) {
                        if let Some(s) = self.streams.get_mut(&id) {
                            s.out_queued = false;
                            self.ready.push(id);
                        }
                    }
                }
            }
            if self.out.len == 0 {
                if let Poll::Ready(Err(e)) = Pin::new(&mut self.io).poll_flush(cx) {
                    return Poll::Ready(Err(e.into()));
                }
            }
            // Done: nothing open or waiting, and no one to call again (or the peer goes
            // away). What is still unsent is given `CLOSE_FLUSH_MS`.
            let idle = self.streams.is_empty()
                && self.shared.queue.lock().expect("call queue lock").new.is_empty();
            if idle && (self.goaway || self.shared.handles.load(Ordering::SeqCst) == 0) {
                return Poll::Ready(Ok(()));
            }
            if !busy && self.ready.is_empty() && !self.has_work() {
                return Poll::Pending;
            }
        }
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    // -- sending ---------------------------------------------------------------------------

    /// Opens the calls that wait, as far as the peer's stream limit allows; whether any.
    fn open_calls(&mut self) -> bool {
        let mut any = false;
        while self.active < self.peer_max_streams && self.out.len < self.settings.send_buffer_bytes
        {
            let Some(c) = self.shared.queue.lock().expect("call queue lock").new.pop_front() else {
                break;
            };
            any = true;
            if c.slot.cancelled() {
                continue;
            }
            self.open(c);
        }
        any
    }

    fn open(&mut self, c: NewCall) {
        let (parts, body) = c.req.into_parts();
        let mut block = std::mem::take(&mut self.block);
        block.clear();
        // :method POST (static entry 3), then :scheme and :authority.
        block.push(0x83);
        block.extend_from_slice(&self.head);
        // :path, a literal with its static name (entry 4).
        encode_int(&mut block, 0, 4, 4);
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        encode_string(&mut block, path.as_bytes());
        for (name, value) in &parts.headers {
            block.push(0);
            encode_string(&mut block, name.as_str().as_bytes());
            encode_string(&mut block, value.as_bytes());
        }
        let end = http_body::Body::is_end_stream(&body);
        self.out.headers(c.id, &block, end, self.peer_max_frame);
        self.block = block;
        self.last_opened = c.id;
        let waker = Arc::new(StreamWaker {
            wakeups: self.shared.wakeups.clone(),
            id: c.id,
            queued: AtomicBool::new(false),
        });
        let recv = Arc::new(RecvShared {
            state: Mutex::new(RecvState::new(false)),
            stream: waker.clone(),
        });
        self.active += 1;
        self.streams.insert(
            c.id,
            CallStream {
                slot: Some(c.slot),
                body: (!end).then(|| Box::pin(body)),
                pending: None,
                held: None,
                send_closed: end,
                recv,
                waker: Waker::from(waker),
                got_headers: false,
                recv_closed: false,
                active: true,
                recv_win: RecvWindow::new(self.settings.stream_window()),
                recv_held: 0,
                send_window: self.peer_initial_window,
                window_queued: false,
                out_queued: false,
            },
        );
        if !end {
            self.ready.push(c.id);
        }
    }

    fn poll_streams(&mut self) -> bool {
        let mut ids = self.shared.wakeups.take_woken(&mut self.ready);
        let mut any = !ids.is_empty();
        for id in ids.drain(..) {
            self.poll_stream(id);
        }
        if self.ready.is_empty() {
            self.ready = ids;
        }
        while self.send_window > 0 {
            let Some(id) = self.window_blocked.pop_front() else { break };
            let Some(s) = self.streams.get_mut(&id) else { continue };
            s.window_queued = false;
            any = true;
            self.poll_stream(id);
        }
        any
    }

    fn poll_stream(&mut self, id: u32) {
        let Some(s) = self.streams.get_mut(&id) else { return };
        s.recv.stream.queued.store(false, Ordering::SeqCst);
        // One look at the body's state: whether it was dropped, and what it released.
        let (dropped, released) = {
            let mut st = s.recv.lock();
            (st.dropped, std::mem::take(&mut st.released))
        };
        if dropped || s.slot.as_ref().is_some_and(|slot| slot.cancelled()) {
            // The caller gave up on the response (its future or its body).
            if !(s.send_closed && s.recv_closed) {
                self.out.rst_stream(id, code::CANCEL);
            }
            return self.remove(id, code::CANCEL, tonic::Status::cancelled("the call was dropped"));
        }
        let waker = s.waker.clone();
        if released > 0 {
            self.release(id, released);
        }
        let mut cx = Context::from_waker(&waker);
        self.send_body(id, &mut cx);
        self.maybe_done(id);
    }

    /// Sends the request body as far as it goes now.
    fn send_body(&mut self, id: u32, cx: &mut Context<'_>) {
        loop {
            let Some(s) = self.streams.get_mut(&id) else { return };
            if s.send_closed {
                return;
            }
            if let Some((data, end)) = s.pending.take() {
                if !self.send_data(id, data, end) {
                    return;
                }
                continue;
            }
            if self.out.len >= self.settings.send_buffer_bytes {
                if !s.out_queued {
                    s.out_queued = true;
                    self.out_blocked.push(id);
                }
                return;
            }
            let Some(body) = s.body.as_mut() else { return };
            match body.as_mut().poll_frame(cx) {
                Poll::Pending => {
                    if let Some(data) = s.held.take() {
                        if !self.send_data(id, data, false) {
                            return;
                        }
                        continue;
                    }
                    return;
                }
                Poll::Ready(None) => {
                    s.body = None;
                    let data = s.held.take().unwrap_or_default();
                    self.send_data(id, data, true);
                    return;
                }
                Poll::Ready(Some(Ok(f))) => match f.into_data() {
                    Ok(data) => {
                        // Held until the body says whether more follows, so a request
                        // that ends here ends with this frame.
                        if let Some(prev) = s.held.replace(data) {
                            if !self.send_data(id, prev, false) {
                                return;
                            }
                        }
                    }
                    Err(_) => {
                        // Request trailers (gRPC requests carry none) are not sent: the
                        // request ends with its data.
                        s.body = None;
                        let data = s.held.take().unwrap_or_default();
                        self.send_data(id, data, true);
                        return;
                    }
                },
                Poll::Ready(Some(Err(e))) => {
                    // The request could not be made (tonic's encoder failed: a message
                    // too large, say): the call fails with its status.
                    let e: Error = e.into();
                    let status = match e.downcast::<tonic::Status>() {
                        Ok(s) => *s,
                        Err(e) => tonic::Status::internal(format!("the request body failed: {e}")),
                    };
                    return self.reset_stream(id, code::CANCEL, status);
                }
            }
        }
    }

    /// Queues `data` as DATA frames as far as the windows allow (END_STREAM on the last
    /// when `end`); `false` when some waits for window.
    fn send_data(&mut self, id: u32, mut data: Bytes, end: bool) -> bool {
        let max_frame = self.peer_max_frame;
        let Some(s) = self.streams.get_mut(&id) else { return false };
        loop {
            let n = data.len().min(max_frame);
            if n > 0 && self.out.len >= self.settings.send_buffer_bytes {
                // The send buffer is full: on once the socket has taken some.
                if !s.out_queued {
                    s.out_queued = true;
                    self.out_blocked.push(id);
                }
                s.pending = Some((data, end));
                return false;
            }
            let n = n.min(self.settings.send_buffer_bytes - self.out.len);
            let room = s.send_window.min(self.send_window);
            if n > 0 && room <= 0 {
                s.pending = Some((data, end));
                if self.send_window <= 0 && !s.window_queued {
                    s.window_queued = true;
                    queue_for_window(&mut self.window_blocked, &self.streams, id, |s| {
                        s.window_queued
                    });
                }
                return false;
            }
            let n = n.min(room.max(0) as usize);
            s.send_window -= n as i64;
            self.send_window -= n as i64;
            let last = n == data.len();
            let flags = if last && end { frame::END_STREAM } else { 0 };
            self.out.header(n, frame::DATA, flags, id);
            self.out.piece(data.split_to(n));
            if last {
                if end {
                    s.send_closed = true;
                }
                return true;
            }
        }
    }

    /// Forgets a stream that ended both ways and whose body took all it holds.
    fn maybe_done(&mut self, id: u32) {
        let Some(s) = self.streams.get_mut(&id) else { return };
        if s.send_closed && s.recv_closed && s.active {
            s.active = false;
            self.active -= 1;
        }
        if s.send_closed && s.recv_closed && s.recv_held == 0 {
            self.streams.remove(&id);
        }
    }

    /// Drops a stream: whatever it still counted against the connection window is free,
    /// and its body (if still waiting) fails with `status`.
    fn remove(&mut self, id: u32, c: u32, status: tonic::Status) {
        if let Some(s) = self.streams.remove(&id) {
            if s.active {
                self.active -= 1;
            }
            fail_recv(&s.recv, c, status);
            self.release_conn(s.recv_held);
        }
    }

    /// Resets a stream on our side (RST_STREAM with `c`); its call fails with `status`.
    fn reset_stream(&mut self, id: u32, c: u32, status: tonic::Status) {
        self.out.rst_stream(id, c);
        if let Some(slot) = self.streams.get_mut(&id).and_then(|s| s.slot.take()) {
            slot.answer(Err(status.clone()));
        }
        self.remove(id, c, status);
    }

    fn release(&mut self, id: u32, n: usize) {
        let half = (self.settings.stream_window() / 2) as usize;
        if let Some(s) = self.streams.get_mut(&id) {
            s.recv_held = s.recv_held.saturating_sub(n);
            s.recv_win.release(&mut self.out, id, n, half, !s.recv_closed);
        }
        self.release_conn(n);
    }

    fn release_conn(&mut self, n: usize) {
        let half = (self.settings.conn_window() / 2) as usize;
        self.recv_win.release(&mut self.out, 0, n, half, true);
    }

    // -- receiving ------------------------------------------------------------------------

    fn handle_frames(&mut self) -> Result<(), ConnError> {
        let max_frame = self.settings.our_max_frame() as usize;
        while let Some(Frame { ty, flags, id, payload }) = next_frame(
            &mut self.rbuf,
            max_frame,
            &mut self.settings_seen,
            "the server's first frame is not SETTINGS (is it an HTTP/2 server, and not one \
             that serves TLS only?)",
        )? {
            self.large_frames |= payload.len() >= READ_ROOM_MIN_BYTES;
            if self.blocks.open() && ty != frame::CONTINUATION {
                return Err(proto_err(code::PROTOCOL_ERROR, "a frame inside a header block"));
            }
            match ty {
                frame::DATA => self.on_data(id, flags, payload)?,
                frame::HEADERS => self.on_headers(id, flags, payload)?,
                frame::CONTINUATION => self.on_continuation(id, flags, payload)?,
                frame::PRIORITY if id == 0 => {
                    return Err(proto_err(code::PROTOCOL_ERROR, "PRIORITY on stream 0"));
                }
                frame::PRIORITY if payload.len() != 5 => {
                    return Err(proto_err(code::FRAME_SIZE_ERROR, "PRIORITY not 5 bytes long"));
                }
                frame::RST_STREAM => self.on_rst_stream(id, &payload)?,
                frame::SETTINGS => self.on_settings(id, flags, &payload)?,
                frame::PUSH_PROMISE => {
                    return Err(proto_err(code::PROTOCOL_ERROR, "PUSH_PROMISE, which we disabled"))
                }
                frame::PING => on_ping(&mut self.out, id, flags, &payload)?,
                frame::GOAWAY => self.on_goaway(id, &payload)?,
                frame::WINDOW_UPDATE => self.on_window_update(id, &payload)?,
                _ => {}
            }
        }
        Ok(())
    }

    fn on_data(&mut self, id: u32, flags: u8, payload: BytesMut) -> Result<(), ConnError> {
        let (data, pad, flow) = data_frame(&mut self.recv_win, id, flags, payload)?;
        let Some(s) = self.streams.get_mut(&id) else {
            if id > self.last_opened {
                return Err(proto_err(code::PROTOCOL_ERROR, "DATA on a stream never opened"));
            }
            self.release_conn(flow);
            return Ok(());
        };
        if s.recv_closed || !s.got_headers {
            let why = if s.recv_closed { "DATA after END_STREAM" } else { "DATA before HEADERS" };
            self.release_conn(flow);
            self.reset_stream(id, code::PROTOCOL_ERROR, tonic::Status::internal(why));
            return Ok(());
        }
        if !s.recv_win.take(flow) {
            self.release_conn(flow);
            self.reset_stream(
                id,
                code::FLOW_CONTROL_ERROR,
                tonic::Status::internal("the server sent past the stream window"),
            );
            return Ok(());
        }
        s.recv_held += flow;
        let end = flags & frame::END_STREAM != 0;
        let discard = s.recv.deliver(data, pad, end);
        if end {
            s.recv_closed = true;
        }
        if discard > 0 {
            self.release(id, discard);
        }
        if end {
            self.maybe_done(id);
        }
        Ok(())
    }

    fn on_headers(&mut self, id: u32, flags: u8, payload: BytesMut) -> Result<(), ConnError> {
        if id == 0 || id.is_multiple_of(2) {
            return Err(proto_err(code::PROTOCOL_ERROR, "HEADERS on a stream we did not open"));
        }
        match self.blocks.headers(id, flags, payload)? {
            Some((end_stream, block)) => self.header_block(id, end_stream, &block),
            None => Ok(()),
        }
    }

    fn on_continuation(&mut self, id: u32, flags: u8, payload: BytesMut) -> Result<(), ConnError> {
        match self.blocks.continuation(id, flags, payload)? {
            Some((end_stream, block)) => self.header_block(id, end_stream, &block),
            None => Ok(()),
        }
    }

    fn header_block(&mut self, id: u32, end_stream: bool, block: &[u8]) -> Result<(), ConnError> {
        let max = self.settings.max_header_list_bytes as usize;
        let mut head = ResponseHead::default();
        self.hpack.decode(block, max, |n, v| head.field(n, v)).map_err(|e| match e {
            crate::hpack::HpackError::ListTooLong(_) => proto_err(
                code::PROTOCOL_ERROR,
                "a response header list longer than max_header_list_bytes",
            ),
            _ => proto_err(code::COMPRESSION_ERROR, "an undecodable header block"),
        })?;
        let Some(s) = self.streams.get_mut(&id) else {
            if id > self.last_opened {
                return Err(proto_err(code::PROTOCOL_ERROR, "HEADERS on a stream never opened"));
            }
            return Ok(());
        };
        if s.recv_closed {
            self.reset_stream(
                id,
                code::STREAM_CLOSED,
                tonic::Status::internal("HEADERS after END_STREAM"),
            );
            return Ok(());
        }
        if s.got_headers {
            // Trailers: they end the response.
            if !end_stream || head.status.is_some() || head.malformed.is_some() {
                self.reset_stream(
                    id,
                    code::PROTOCOL_ERROR,
                    tonic::Status::internal("malformed trailers in the response"),
                );
                return Ok(());
            }
            s.recv_closed = true;
            let waker = {
                let mut st = s.recv.lock();
                st.trailers = Some(head.headers);
                st.end = true;
                st.waker.take()
            };
            if let Some(w) = waker {
                w.wake();
            }
            self.maybe_done(id);
            return Ok(());
        }
        let status = match (head.status, head.malformed) {
            (Some(st), None) => st,
            (_, why) => {
                let why = why.unwrap_or("a response without :status");
                self.reset_stream(
                    id,
                    code::PROTOCOL_ERROR,
                    tonic::Status::internal(format!("the server's response is malformed: {why}")),
                );
                return Ok(());
            }
        };
        if status.is_informational() {
            if end_stream {
                self.reset_stream(
                    id,
                    code::PROTOCOL_ERROR,
                    tonic::Status::internal("an informational response that ends the stream"),
                );
            }
            return Ok(());
        }
        s.got_headers = true;
        if end_stream {
            s.recv_closed = true;
            s.recv.lock().end = true;
        }
        let mut resp =
            http::Response::new(ClientBody { body: RecvBody { shared: s.recv.clone() } });
        *resp.status_mut() = status;
        *resp.version_mut() = http::Version::HTTP_2;
        *resp.headers_mut() = head.headers;
        if let Some(slot) = s.slot.take() {
            slot.answer(Ok(resp));
        }
        if end_stream {
            self.maybe_done(id);
        }
        Ok(())
    }

    fn on_rst_stream(&mut self, id: u32, payload: &[u8]) -> Result<(), ConnError> {
        if payload.len() != 4 {
            return Err(proto_err(code::FRAME_SIZE_ERROR, "RST_STREAM not 4 bytes long"));
        }
        if id == 0 {
            return Err(proto_err(code::PROTOCOL_ERROR, "RST_STREAM on stream 0"));
        }
        if id > self.last_opened {
            return Err(proto_err(code::PROTOCOL_ERROR, "RST_STREAM on a stream never opened"));
        }
        let c = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
        let Some(s) = self.streams.get_mut(&id) else { return Ok(()) };
        if s.recv_closed && c == code::NO_ERROR {
            // The response is complete: the server asks us to stop sending (RFC 9113
            // section 8.1); what the body has not read yet stays for it.
            s.body = None;
            s.pending = None;
            s.held = None;
            s.send_closed = true;
            self.maybe_done(id);
            return Ok(());
        }
        if let Some(slot) = s.slot.take() {
            slot.answer(Err(reset_status(c)));
        }
        self.remove(id, c, reset_status(c));
        Ok(())
    }

    fn on_settings(&mut self, id: u32, flags: u8, payload: &[u8]) -> Result<(), ConnError> {
        let Some(p) = parse_settings(id, flags, payload)? else { return Ok(()) };
        if p.enable_push.is_some_and(|v| v != 0) {
            return Err(proto_err(code::PROTOCOL_ERROR, "a server's ENABLE_PUSH not 0"));
        }
        if let Some(v) = p.max_frame {
            self.peer_max_frame = v;
        }
        if let Some(v) = p.max_streams {
            self.peer_max_streams = (v as usize).min(self.settings.max_open_streams.max(1));
        }
        if let Some(v) = p.initial_window {
            let delta = v - self.peer_initial_window;
            self.peer_initial_window = v;
            for st in self.streams.values_mut() {
                let before = st.send_window;
                st.send_window += delta;
                if st.send_window > MAX_WINDOW {
                    return Err(proto_err(code::FLOW_CONTROL_ERROR, "a stream window past 2^31-1"));
                }
                if before <= 0 && st.send_window > 0 && st.pending.is_some() {
                    st.recv.stream.wake_by_ref();
                }
            }
        }
        self.out.header(0, frame::SETTINGS, frame::ACK, 0);
        Ok(())
    }

    fn on_goaway(&mut self, id: u32, payload: &[u8]) -> Result<(), ConnError> {
        if id != 0 {
            return Err(proto_err(code::PROTOCOL_ERROR, "GOAWAY on a stream"));
        }
        if payload.len() < 8 {
            return Err(proto_err(code::FRAME_SIZE_ERROR, "GOAWAY shorter than 8 bytes"));
        }
        let last =
            u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) & !(1 << 31);
        let c = u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]]);
        self.goaway = true;
        let why = tonic::Status::unavailable(format!(
            "the server is closing the connection (GOAWAY, {}): the call was not processed",
            code_name(c)
        ));
        self.shared.close_queue(&why);
        // Streams past `last` were never processed: they fail, to be retried elsewhere.
        let refused: Vec<u32> = self.streams.keys().copied().filter(|&s| s > last).collect();
        for s in refused {
            if let Some(slot) = self.streams.get_mut(&s).and_then(|st| st.slot.take()) {
                slot.answer(Err(why.clone()));
            }
            self.remove(s, code::REFUSED_STREAM, why.clone());
        }
        Ok(())
    }

    fn on_window_update(&mut self, id: u32, payload: &[u8]) -> Result<(), ConnError> {
        let n = window_increment(payload)?;
        if id == 0 {
            return grow_conn_window(&mut self.send_window, n);
        }
        let Some(s) = self.streams.get_mut(&id) else {
            if id > self.last_opened {
                return Err(proto_err(
                    code::PROTOCOL_ERROR,
                    "WINDOW_UPDATE on a stream never opened",
                ));
            }
            return Ok(());
        };
        if n == 0 {
            self.reset_stream(
                id,
                code::PROTOCOL_ERROR,
                tonic::Status::internal("a WINDOW_UPDATE of 0 on the call's stream"),
            );
            return Ok(());
        }
        let before = s.send_window;
        s.send_window += n;
        if s.send_window > MAX_WINDOW {
            self.reset_stream(
                id,
                code::FLOW_CONTROL_ERROR,
                tonic::Status::internal("the call's stream window past 2^31-1"),
            );
            return Ok(());
        }
        if before <= 0 && s.send_window > 0 && s.pending.is_some() {
            s.recv.stream.wake_by_ref();
        }
        Ok(())
    }
}

impl<IO> Conn<IO> {
    /// The connection is done: every call waiting or open fails with `why` (bodies too),
    /// and the channel takes no more.
    fn fail_all(&mut self, why: tonic::Status) {
        self.shared.close_queue(&why);
        for (_, s) in self.streams.drain() {
            if let Some(slot) = &s.slot {
                slot.answer(Err(why.clone()));
            }
            fail_recv(&s.recv, code::CANCEL, why.clone());
        }
    }
}

impl<IO> Drop for Conn<IO> {
    /// However the connection's task ends (even dropped with its runtime), its calls fail
    /// rather than wait.
    fn drop(&mut self) {
        self.fail_all(tonic::Status::unavailable("the connection's task ended"));
    }
}

/// A response's decoded header block.
#[derive(Default)]
struct ResponseHead {
    status: Option<http::StatusCode>,
    headers: http::HeaderMap,
    malformed: Option<&'static str>,
}

impl ResponseHead {
    fn field(&mut self, name: &[u8], value: &[u8]) {
        if self.malformed.is_some() {
            return;
        }
        if name == b":status" {
            if self.status.is_some() || !self.headers.is_empty() {
                self.malformed = Some(":status twice, or after a regular header");
                return;
            }
            match http::StatusCode::from_bytes(value) {
                Ok(s) => self.status = Some(s),
                Err(_) => self.malformed = Some("an invalid :status"),
            }
            return;
        }
        if name.first() == Some(&b':') {
            self.malformed = Some("a pseudo-header other than :status");
            return;
        }
        match (http::HeaderName::from_bytes(name), http::HeaderValue::from_bytes(value)) {
            (Ok(n), Ok(v)) => {
                self.headers.append(n, v);
            }
            _ => self.malformed = Some("an invalid header name or value"),
        }
    }
}

#[cfg(test)]
mod tests {
    //! Against real sockets: the `h2` crate's server where a test needs a peer that
    //! misbehaves on cue, raw frames where it checks what we put on the wire.
    use super::*;
    use http_body_util::BodyExt as _;
    use std::net::SocketAddr;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tower::Service as _;

    fn request(path: &str, body: &'static [u8]) -> http::Request<tonic::body::Body> {
        http::Request::post(format!("http://test{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(tonic::body::Body::new(http_body_util::Full::new(Bytes::from_static(body))))
            .unwrap()
    }

    async fn channel(addr: SocketAddr, settings: ClientSettings) -> Channel {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        start(tcp, &addr.to_string(), false, settings)
    }

    /// An `h2` server on loopback: each accepted connection's requests go to `on`, which
    /// answers them (or not) as the test needs; the connection's handshake `builder`.
    async fn h2_server<F, Fut>(builder: h2::server::Builder, on: F) -> SocketAddr
    where
        F: Fn(http::Request<h2::RecvStream>, h2::server::SendResponse<Bytes>) -> Fut
            + Clone
            + Send
            + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = l.accept().await {
                let (builder, on) = (builder.clone(), on.clone());
                tokio::spawn(async move {
                    let Ok(mut conn) = builder.handshake::<_, Bytes>(tcp).await else { return };
                    while let Some(Ok((req, resp))) = conn.accept().await {
                        tokio::spawn(on.clone()(req, resp));
                    }
                });
            }
        });
        addr
    }

    async fn body_of(mut body: h2::RecvStream) -> Vec<u8> {
        let mut all = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            body.flow_control().release_capacity(chunk.len()).unwrap();
            all.extend_from_slice(&chunk);
        }
        all
    }

    /// Echoes the request's body `times` times, then trailers `grpc-status: 0`.
    async fn echo(req: http::Request<h2::RecvStream>, mut resp: h2::server::SendResponse<Bytes>) {
        let times: usize = req.uri().path().trim_start_matches("/echo/").parse().unwrap_or(1);
        let body = body_of(req.into_body()).await;
        let mut send = resp.send_response(http::Response::new(()), false).unwrap();
        for _ in 0..times {
            send.reserve_capacity(body.len());
            send.send_data(Bytes::from(body.clone()), false).unwrap();
        }
        let mut t = http::HeaderMap::new();
        t.insert("grpc-status", http::HeaderValue::from_static("0"));
        send.send_trailers(t).unwrap();
    }

    #[tokio::test]
    async fn calls_round_trip_with_their_trailers_and_large_bodies_pass_both_windows() {
        // Small windows both ways: 1 MiB each way must flow through window updates.
        let mut b = h2::server::Builder::new();
        b.initial_window_size(16 * 1024).initial_connection_window_size(32 * 1024);
        let addr = h2_server(b, echo).await;
        let settings = ClientSettings {
            stream_window_bytes: 16 * 1024,
            connection_window_bytes: 64 * 1024,
            ..ClientSettings::default()
        };
        let mut ch = channel(addr, settings).await;
        let resp = ch.call(request("/echo/1", b"hello")).await.unwrap();
        assert_eq!(resp.status(), http::StatusCode::OK);
        let got = resp.into_body().collect().await.unwrap();
        assert_eq!(got.trailers().unwrap()["grpc-status"], "0");
        assert_eq!(&got.to_bytes()[..], b"hello");

        static BIG: [u8; 256 * 1024] = [7; 256 * 1024];
        // Several at once on one connection, each 256 KiB up and 1 MiB down.
        let calls = (0..4).map(|_| {
            let mut ch = ch.clone();
            async move {
                let resp = ch.call(request("/echo/4", &BIG)).await.unwrap();
                resp.into_body().collect().await.unwrap().to_bytes()
            }
        });
        for got in futures_join(calls).await {
            assert_eq!(got.len(), 4 * BIG.len());
            assert!(got.iter().all(|&b| b == 7));
        }
    }

    async fn futures_join<F: Future>(fs: impl Iterator<Item = F>) -> Vec<F::Output>
    where
        F::Output: Send,
    {
        let mut set = Vec::new();
        for f in fs {
            set.push(Box::pin(f));
        }
        let mut out = Vec::new();
        for f in set {
            out.push(f.await);
        }
        out
    }

    /// Reads one frame: (type, flags, stream, payload).
    async fn read_frame(tcp: &mut tokio::net::TcpStream) -> (u8, u8, u32, Vec<u8>) {
        let mut h = [0u8; 9];
        tcp.read_exact(&mut h).await.unwrap();
        let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
        let mut p = vec![0; len];
        tcp.read_exact(&mut p).await.unwrap();
        (h[3], h[4], u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff, p)
    }

    fn frame_bytes(ty: u8, flags: u8, id: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[ty, flags]);
        f.extend_from_slice(&id.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// A raw peer: accepts one connection, reads the preface and the client's SETTINGS,
    /// sends `settings` (id, value pairs).
    async fn raw_peer(
        settings: &[(u16, u32)],
    ) -> (SocketAddr, tokio::task::JoinHandle<tokio::net::TcpStream>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let mut payload = Vec::new();
        for (k, v) in settings {
            payload.extend_from_slice(&k.to_be_bytes());
            payload.extend_from_slice(&v.to_be_bytes());
        }
        let task = tokio::spawn(async move {
            let (mut tcp, _) = l.accept().await.unwrap();
            let mut preface = [0u8; 24];
            tcp.read_exact(&mut preface).await.unwrap();
            assert_eq!(&preface[..], PREFACE);
            let (ty, _, _, _) = read_frame(&mut tcp).await;
            assert_eq!(ty, frame::SETTINGS);
            tcp.write_all(&frame_bytes(frame::SETTINGS, 0, 0, &payload)).await.unwrap();
            tcp
        });
        (addr, task)
    }

    /// Skips SETTINGS, WINDOW_UPDATE and SETTINGS ACK frames; returns the next other one.
    async fn next_call_frame(tcp: &mut tokio::net::TcpStream) -> (u8, u8, u32, Vec<u8>) {
        loop {
            let f = read_frame(tcp).await;
            if !matches!(f.0, frame::SETTINGS | frame::WINDOW_UPDATE) {
                return f;
            }
        }
    }

    #[tokio::test]
    async fn a_unary_call_is_one_headers_and_one_data_frame_that_ends_the_stream() {
        let (addr, peer) = raw_peer(&[]).await;
        let mut ch = channel(addr, ClientSettings::default()).await;
        let call =
            tokio::spawn(async move { ch.call(request("/svc/M", b"abc")).await.map(|_| ()) });
        let mut tcp = peer.await.unwrap();
        let (ty, flags, id, _) = next_call_frame(&mut tcp).await;
        assert_eq!((ty, id), (frame::HEADERS, 1));
        assert_eq!(flags & frame::END_STREAM, 0, "the body follows");
        assert_ne!(flags & frame::END_HEADERS, 0);
        let (ty, flags, id, payload) = next_call_frame(&mut tcp).await;
        assert_eq!((ty, id, &payload[..]), (frame::DATA, 1, &b"abc"[..]));
        assert_ne!(flags & frame::END_STREAM, 0, "the request ends with its data");
        // The peer goes away without answering: the call fails UNAVAILABLE, naming why.
        drop(tcp);
        let e = call.await.unwrap().unwrap_err();
        let s = e.downcast::<tonic::Status>().unwrap();
        assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
        let cause = std::error::Error::source(&*s).expect("the cause is the source").to_string();
        assert!(cause.contains("closed the connection"), "{cause}");
    }

    /// Keepalive: a server silent for `keepalive_interval_ms` is sent a PING; an answer
    /// keeps the connection (and its open call); a PING left unanswered for
    /// `keepalive_timeout_ms` fails the call UNAVAILABLE, naming the PING.
    #[tokio::test]
    async fn a_server_that_stops_answering_pings_fails_the_open_calls() {
        let (addr, peer) = raw_peer(&[]).await;
        let settings = ClientSettings {
            keepalive_interval_ms: 200,
            keepalive_timeout_ms: 500,
            ..ClientSettings::default()
        };
        let mut ch = channel(addr, settings).await;
        let call = tokio::spawn(async move { ch.call(request("/svc/M", b"x")).await.map(|_| ()) });
        let mut tcp = peer.await.unwrap();
        let started = std::time::Instant::now();
        // Two PINGs answered: the call stays open past the timeout.
        for _ in 0..2 {
            let (ty, flags, _, payload) = loop {
                let f = next_call_frame(&mut tcp).await;
                if f.0 == frame::PING {
                    break f;
                }
            };
            assert_eq!((ty, flags & frame::ACK), (frame::PING, 0));
            tcp.write_all(&frame_bytes(frame::PING, frame::ACK, 0, &payload)).await.unwrap();
        }
        let last_answer = std::time::Instant::now();
        assert!(!call.is_finished(), "the call failed though its PINGs were answered");
        // Silence: the next PING goes unanswered.
        let e = call.await.unwrap().unwrap_err().downcast::<tonic::Status>().unwrap();
        let waited = started.elapsed();
        assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
        let cause = std::error::Error::source(&*e).unwrap().to_string();
        assert!(cause.contains("keepalive PING"), "{cause}");
        // Two answered intervals, then one more and the timeout (1.1 s; half of it here).
        assert!(waited >= std::time::Duration::from_millis(550), "failed after {waited:?}");
        // One interval and the timeout after the last answer (700 ms): the PING's own
        // bytes leaving are no sign of the peer (they restarted the timeout: 1.2 s).
        let silent = last_answer.elapsed();
        assert!(silent < Duration::from_millis(1000), "failed {silent:?} after the last answer");
    }

    #[tokio::test]
    async fn a_lost_connection_fails_open_and_later_calls_at_once() {
        let (addr, peer) = raw_peer(&[]).await;
        let mut ch = channel(addr, ClientSettings::default()).await;
        let mut ch2 = ch.clone();
        let open = tokio::spawn(async move { ch2.call(request("/svc/M", b"x")).await.map(|_| ()) });
        let mut tcp = peer.await.unwrap();
        let _ = next_call_frame(&mut tcp).await;
        // Garbage where a frame should be: the client closes the connection with GOAWAY.
        tcp.write_all(&frame_bytes(frame::PING, 0, 0, b"short")).await.unwrap();
        let e = open.await.unwrap().unwrap_err().downcast::<tonic::Status>().unwrap();
        assert_eq!(e.code(), tonic::Code::Unavailable);
        let cause = std::error::Error::source(&*e).unwrap().to_string();
        assert!(cause.contains("PING not 8 bytes"), "{cause}");
        loop {
            let (ty, _, _, p) = read_frame(&mut tcp).await;
            if ty == frame::GOAWAY {
                assert_eq!(u32::from_be_bytes([p[4], p[5], p[6], p[7]]), code::FRAME_SIZE_ERROR);
                break;
            }
        }
        let t = std::time::Instant::now();
        let e = ch.call(request("/svc/M", b"y")).await.unwrap_err();
        assert_eq!(e.downcast::<tonic::Status>().unwrap().code(), tonic::Code::Unavailable);
        assert!(t.elapsed() < Duration::from_millis(100));
        assert!(ch.closed().is_some());
    }

    #[tokio::test]
    async fn resets_and_goaway_fail_calls_with_the_status_tonic_would_give() {
        let (addr, peer) = raw_peer(&[]).await;
        let ch = channel(addr, ClientSettings::default()).await;
        let calls: Vec<_> = (0..3)
            .map(|_| {
                let mut ch = ch.clone();
                tokio::spawn(async move { ch.call(request("/svc/M", b"x")).await.map(|_| ()) })
            })
            .collect();
        let mut tcp = peer.await.unwrap();
        let mut ids = Vec::new();
        while ids.len() < 3 {
            let (ty, _, id, _) = next_call_frame(&mut tcp).await;
            if ty == frame::HEADERS {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        assert_eq!(ids, [1, 3, 5]);
        // Stream 1 refused, then a GOAWAY naming stream 3 as the last processed: 5 was not.
        tcp.write_all(&frame_bytes(frame::RST_STREAM, 0, 1, &code::REFUSED_STREAM.to_be_bytes()))
            .await
            .unwrap();
        let mut goaway = 3u32.to_be_bytes().to_vec();
        goaway.extend_from_slice(&code::NO_ERROR.to_be_bytes());
        tcp.write_all(&frame_bytes(frame::GOAWAY, 0, 0, &goaway)).await.unwrap();
        let mut results = Vec::new();
        for c in calls {
            // Which task got which id is the runtime's business: the codes tell.
            if let Ok(Err(e)) =
                tokio::time::timeout(Duration::from_millis(300), async { c.await.unwrap() }).await
            {
                let s = e.downcast::<tonic::Status>().unwrap();
                results.push((s.code(), s.message().to_owned()));
            }
        }
        // Stream 3 is still open (processed, no answer yet): its call waits.
        assert_eq!(results.len(), 2, "{results:?}");
        assert!(results.iter().all(|(c, _)| *c == tonic::Code::Unavailable), "{results:?}");
        assert!(results.iter().any(|(_, m)| m.contains("REFUSED_STREAM")), "{results:?}");
        assert!(results.iter().any(|(_, m)| m.contains("GOAWAY")), "{results:?}");
        // No new calls after a GOAWAY.
        let e = ch.clone().call(request("/svc/M", b"x")).await.unwrap_err();
        assert!(e.to_string().contains("GOAWAY"), "{e}");
    }

    #[tokio::test]
    async fn a_dropped_call_resets_its_stream_and_waiting_calls_are_bounded() {
        // One stream at a time: the second call waits for it, a third is one too many.
        let (addr, peer) = raw_peer(&[(setting::MAX_CONCURRENT_STREAMS, 1)]).await;
        let settings = ClientSettings { max_waiting_calls: 1, ..ClientSettings::default() };
        let mut ch = channel(addr, settings).await;
        let mut tcp = peer.await.unwrap();
        // Let the client take in the peer's SETTINGS before it opens calls.
        loop {
            let (ty, flags, _, _) = read_frame(&mut tcp).await;
            if (ty, flags) == (frame::SETTINGS, frame::ACK) {
                break;
            }
        }
        let mut first = Box::pin(ch.call(request("/svc/M", b"1")));
        assert!(futures_poll_once(first.as_mut()).await.is_pending());
        let (ty, _, id, _) = next_call_frame(&mut tcp).await;
        assert_eq!((ty, id), (frame::HEADERS, 1));
        let _ = next_call_frame(&mut tcp).await; // its DATA
        let mut second = Box::pin(ch.call(request("/svc/M", b"2")));
        assert!(futures_poll_once(second.as_mut()).await.is_pending());
        let third = ch.call(request("/svc/M", b"3")).await.unwrap_err();
        let s = third.downcast::<tonic::Status>().unwrap();
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        assert!(s.message().contains("max_waiting_calls"), "{s:?}");
        assert!(futures_poll_once(second.as_mut()).await.is_pending());
        // The first call's caller gives up: its stream is reset, and the second opens.
        drop(first);
        let (ty, _, id, p) = next_call_frame(&mut tcp).await;
        assert_eq!((ty, id), (frame::RST_STREAM, 1));
        assert_eq!(u32::from_be_bytes([p[0], p[1], p[2], p[3]]), code::CANCEL);
        let (ty, _, id, _) = next_call_frame(&mut tcp).await;
        assert_eq!((ty, id), (frame::HEADERS, 3));
    }

    /// `:status: 200` (static entry 8), and `grpc-status: 0` as a literal trailer.
    const STATUS_200: &[u8] = &[0x88];
    const GRPC_OK: &[u8] = b"\x00\x0bgrpc-status\x010";

    #[tokio::test]
    async fn a_whole_response_outlives_its_connection_and_a_dropped_body_resets_its_stream() {
        let (addr, peer) = raw_peer(&[]).await;
        let ch = channel(addr, ClientSettings::default()).await;
        let (mut a, mut b) = (ch.clone(), ch.clone());
        let first = tokio::spawn(async move { a.call(request("/svc/M", b"1")).await });
        let mut tcp = peer.await.unwrap();
        let (ty, _, one, _) = next_call_frame(&mut tcp).await;
        assert_eq!(ty, frame::HEADERS);
        let _ = next_call_frame(&mut tcp).await;
        // A response that never ends: the body is dropped after its first chunk.
        tcp.write_all(&frame_bytes(frame::HEADERS, frame::END_HEADERS, one, STATUS_200))
            .await
            .unwrap();
        tcp.write_all(&frame_bytes(frame::DATA, 0, one, b"part")).await.unwrap();
        let mut body = first.await.unwrap().unwrap().into_body();
        let chunk = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&chunk[..], b"part");
        // The connection takes in what the body released before the body goes (so the
        // drop releases nothing more, and must still be heard of).
        for _ in 0..3 {
            tokio::task::yield_now().await;
        }
        drop(body);
        let (ty, _, id, p) =
            tokio::time::timeout(Duration::from_secs(5), next_call_frame(&mut tcp))
                .await
                .expect("the dropped body's stream is reset");
        assert_eq!((ty, id), (frame::RST_STREAM, one), "the dropped body's stream is reset");
        assert_eq!(u32::from_be_bytes([p[0], p[1], p[2], p[3]]), code::CANCEL);

        // A whole response (headers, data, trailers), then the server closes at once: the
        // response is still read whole.
        let second = tokio::spawn(async move { b.call(request("/svc/M", b"2")).await });
        let (ty, _, two, _) = next_call_frame(&mut tcp).await;
        assert_eq!(ty, frame::HEADERS);
        let _ = next_call_frame(&mut tcp).await;
        let mut all = frame_bytes(frame::HEADERS, frame::END_HEADERS, two, STATUS_200);
        all.extend(frame_bytes(frame::DATA, 0, two, b"whole"));
        all.extend(frame_bytes(
            frame::HEADERS,
            frame::END_HEADERS | frame::END_STREAM,
            two,
            GRPC_OK,
        ));
        tcp.write_all(&all).await.unwrap();
        drop(tcp);
        let resp = second.await.unwrap().unwrap();
        let got = resp.into_body().collect().await.unwrap();
        assert_eq!(got.trailers().unwrap()["grpc-status"], "0");
        assert_eq!(&got.to_bytes()[..], b"whole");
        assert!(ch.closed().is_some(), "the connection ended");
    }

    #[tokio::test]
    async fn the_connection_ends_when_its_last_channel_is_dropped() {
        let (addr, peer) = raw_peer(&[]).await;
        let ch = channel(addr, ClientSettings::default()).await;
        let ch2 = ch.clone();
        let mut tcp = peer.await.unwrap();
        drop(ch);
        drop(ch2);
        // The client's frames, then its end of the connection.
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut rest))
            .await
            .expect("the connection ended")
            .unwrap();
    }

    async fn futures_poll_once<F: Future + Unpin>(mut f: F) -> Poll<F::Output> {
        std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut f).poll(cx))).await
    }
}
