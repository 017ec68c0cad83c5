//! Serving gRPC on wayside's own HTTP/2 server connection ([`crate::h2conn`]), for a
//! server that answers some calls by hand: the NMS's vehicle block calls, whose replies
//! carry cached blocks and whose requests carry blocks to write.
//!
//! tonic's server takes only response bodies of `Bytes` frames, so every reply is encoded
//! into one buffer: each 4 KiB block read from the cache was copied once more there (13%
//! of a streamed-read run's serving thread). Here a reply body may yield a [`ChunkBuf`]
//! instead: the encoded fields and the block data as separate chunks. The connection
//! queues the chunks as pieces of its vectored write, and [`CorkedIo`] hands a large
//! vectored write to the socket uncopied, so block data goes from the cache to `writev`
//! without a copy. [`Messages`] decodes a request's messages from slices of the received
//! DATA chunks, likewise without a copy. Every other call goes to tonic's routes unchanged
//! ([`GrpcBody::tonic`]).
//!
//! [`serve_http2`] is the accept loop tonic's `Server::serve_with_incoming_shutdown` runs
//! (services are still `hyper::service::Service`s), with the same HTTP/2 settings
//! (windows, frame size, keepalive, concurrent streams) and the same graceful shutdown: on
//! the signal every connection is asked to close (GOAWAY) and the call returns when the
//! last one has.

use crate::cork::CorkedIo;
use crate::h2conn::{ConnSettings, RecvBody};
use bytes::{Buf, BufMut as _, Bytes, BytesMut};
use http_body::Frame;
use std::collections::VecDeque;
use std::future::Future as _;
use std::io::IoSlice;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio_stream::{Stream, StreamExt as _};
use tonic::Status;

/// Bytes to send as a list of chunks (encoded message fields, block data shared with the
/// cache), never copied into one buffer.
#[derive(Debug, Default)]
pub struct ChunkBuf {
    /// No chunk is empty.
    chunks: VecDeque<Bytes>,
    remaining: usize,
}

impl ChunkBuf {
    pub fn with_capacity(chunks: usize) -> Self {
        Self { chunks: VecDeque::with_capacity(chunks), remaining: 0 }
    }

    /// Appends `b` (an empty chunk is dropped).
    pub fn push(&mut self, b: Bytes) {
        if !b.is_empty() {
            self.remaining += b.len();
            self.chunks.push_back(b);
        }
    }

    /// The bytes left, in order, copied into one buffer (for tests).
    pub fn to_vec(&self) -> Vec<u8> {
        self.chunks.iter().flat_map(|c| c.iter().copied()).collect()
    }

    /// How many chunks are left.
    pub fn chunk_count(&self) -> usize {
        self.chunks.len()
    }
}

impl Buf for ChunkBuf {
    fn remaining(&self) -> usize {
        self.remaining
    }

    fn chunk(&self) -> &[u8] {
        self.chunks.front().map_or(&[], |c| c.as_ref())
    }

    fn advance(&mut self, mut cnt: usize) {
        assert!(cnt <= self.remaining, "advance past the end of a ChunkBuf");
        self.remaining -= cnt;
        while cnt > 0 {
            let front = self.chunks.front_mut().expect("remaining counts the chunks' bytes");
            if cnt < front.len() {
                front.advance(cnt);
                return;
            }
            cnt -= front.len();
            self.chunks.pop_front();
        }
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        for (d, c) in dst.iter_mut().zip(&self.chunks) {
            *d = IoSlice::new(c);
            n += 1;
        }
        n
    }

    fn copy_to_bytes(&mut self, len: usize) -> Bytes {
        match self.chunks.front_mut() {
            Some(front) if front.len() >= len => {
                let b = front.split_to(len);
                if front.is_empty() {
                    self.chunks.pop_front();
                }
                self.remaining -= len;
                b
            }
            _ => {
                assert!(len <= self.remaining, "copy_to_bytes past the end of a ChunkBuf");
                let mut out = bytes::BytesMut::with_capacity(len);
                for c in &self.chunks {
                    let take = c.len().min(len - out.len());
                    out.extend_from_slice(&c[..take]);
                    if out.len() == len {
                        break;
                    }
                }
                self.advance(len);
                out.freeze()
            }
        }
    }
}

/// The bytes of a request body received and not yet decoded. A DATA chunk of at least
/// `copy_below` bytes is kept as received (a slice of h2's receive buffer, never copied);
/// a smaller one is copied onto `tail`. Kept as received, every chunk costs its handle
/// (a 32-byte `Bytes` in a list) and holds on to the receive buffer it was cut from, so a
/// message sent as 1-byte DATA frames (each with a 9-byte frame header) held tens of times
/// its size until it was whole (its handles alone 33x), bounded only by the message limit
/// and the streams per connection. Copied, small chunks cost their bytes (and `tail`'s
/// spare capacity).
struct RecvBuf {
    /// The bytes before `tail`'s (no chunk shorter than `copy_below`, but for copied
    /// runs of `tail` cut off when a long chunk arrived after them).
    chunks: ChunkBuf,
    /// The small chunks received after `chunks`, copied.
    tail: BytesMut,
    copy_below: usize,
    /// Bytes pushed so far (what is no longer `remaining` has been consumed).
    pushed: u64,
    /// Where each chunk kept as a counted slice ([`RecvBuf::push_counted`]) ends in the
    /// bytes pushed, oldest first: one consumed up to its end is no longer held here.
    counted_ends: VecDeque<u64>,
}

impl RecvBuf {
    fn new(copy_below: usize) -> Self {
        Self {
            chunks: ChunkBuf::default(),
            tail: BytesMut::new(),
            copy_below,
            pushed: 0,
            counted_ends: VecDeque::new(),
        }
    }

    /// Keeps `data` (a chunk of at least `copy_below` bytes) as received, counted as a
    /// slice of a receive buffer until it is consumed ([`RecvBuf::counted`]).
    fn push_counted(&mut self, data: Bytes) {
        self.push(data);
        self.counted_ends.push_back(self.pushed);
    }

    /// Copies `data` onto `tail` whatever its length.
    fn push_copied(&mut self, data: &[u8]) {
        self.pushed += data.len() as u64;
        self.tail.extend_from_slice(data);
    }

    /// The chunks kept by [`RecvBuf::push_counted`] not yet consumed.
    fn counted(&mut self) -> usize {
        let consumed = self.pushed - self.remaining() as u64;
        while self.counted_ends.front().is_some_and(|&end| end <= consumed) {
            self.counted_ends.pop_front();
        }
        self.counted_ends.len()
    }

    fn push(&mut self, data: Bytes) {
        self.pushed += data.len() as u64;
        if data.len() < self.copy_below {
            self.tail.extend_from_slice(&data);
            return;
        }
        if !self.tail.is_empty() {
            // (`split` leaves `tail` the rest of its buffer: the next small chunks are
            // copied there, not into a new one.)
            self.chunks.push(self.tail.split().freeze());
        }
        self.chunks.push(data);
    }

    /// Drops what is held (nothing more is decoded).
    fn clear(&mut self) {
        self.chunks = ChunkBuf::default();
        self.tail = BytesMut::new();
        self.counted_ends.clear();
    }

    /// The first `N` bytes (`None`: fewer have arrived).
    fn peek<const N: usize>(&self) -> Option<[u8; N]> {
        if self.remaining() < N {
            return None;
        }
        let mut out = [0u8; N];
        let mut n = 0;
        for c in self.chunks.chunks.iter().map(|c| &c[..]).chain([&self.tail[..]]) {
            let take = c.len().min(N - n);
            out[n..n + take].copy_from_slice(&c[..take]);
            n += take;
            if n == N {
                break;
            }
        }
        Some(out)
    }

    /// The memory this buffer accounts for, in bytes: the chunks kept as received (their
    /// bytes and handles) and the copy buffer's capacity. (A kept chunk may also hold on to
    /// more of h2's receive buffer than its own bytes; only chunks of at least
    /// `copy_below` bytes are kept, so that is bounded by the bytes received.)
    fn held_bytes(&self) -> usize {
        self.chunks.remaining()
            + self.chunks.chunk_count() * std::mem::size_of::<Bytes>()
            + self.tail.capacity()
    }
}

impl Buf for RecvBuf {
    fn remaining(&self) -> usize {
        self.chunks.remaining() + self.tail.len()
    }

    fn chunk(&self) -> &[u8] {
        if self.chunks.remaining() > 0 {
            self.chunks.chunk()
        } else {
            &self.tail
        }
    }

    fn advance(&mut self, cnt: usize) {
        let before = cnt.min(self.chunks.remaining());
        self.chunks.advance(before);
        assert!(cnt - before <= self.tail.len(), "advance past the end of a RecvBuf");
        self.tail.advance(cnt - before);
    }

    fn copy_to_bytes(&mut self, len: usize) -> Bytes {
        let before = self.chunks.remaining();
        if len <= before {
            return self.chunks.copy_to_bytes(len);
        }
        assert!(len <= self.remaining(), "copy_to_bytes past the end of a RecvBuf");
        if before == 0 {
            // Shares the copy buffer: copied once, on arrival.
            return self.tail.split_to(len).freeze();
        }
        let mut out = BytesMut::with_capacity(len);
        out.put((&mut *self).take(len));
        out.freeze()
    }
}

/// Default of [`Messages::copy_below`] (the NMS's `request_copy_below_bytes`), in bytes: a
/// kept chunk's handle is then at most ~6% of the bytes it holds, and a 4 KiB block
/// arriving in one DATA frame (or a batch in 16 KiB frames) is never copied.
pub const DEFAULT_COPY_BELOW_BYTES: usize = 1024;

/// DATA chunks shorter than this (and at least [`Messages::copy_below`]) that a call's
/// reader keeps as received count against the connection's `max_held_slices` (see
/// `Messages::take_chunk`), in bytes: the receive buffer such a chunk keeps alive is up
/// to 256 times its size; a longer one's at most 16 times.
const COUNTED_SLICE_BELOW_BYTES: usize = 16 * 1024;

/// The gRPC messages of a request body, decoded without copying: a message that lies in
/// one DATA chunk (the usual case) is decoded from a slice of that chunk, so its `bytes`
/// fields share the chunk (tonic's `Streaming` copies every chunk into a buffer of its own
/// first: 4% of a batched-write run's serving thread). A message split across chunks is
/// decoded from them in place too: only a `bytes` field cut by a chunk's edge is copied.
/// DATA chunks shorter than [`Messages::copy_below`] are the exception: they are copied
/// into one buffer on arrival, so a body of tiny frames is held in memory proportional to
/// its bytes (see `RecvBuf`).
/// A compressed message is refused (INTERNAL, as tonic's decoder does when no
/// `grpc-encoding` was agreed), one longer than `max` bytes is OUT_OF_RANGE, and a body
/// that ends inside a message is INTERNAL.
pub struct Messages<M> {
    body: crate::h2conn::RecvBody,
    /// Received and not yet decoded.
    pending: RecvBuf,
    /// The most `pending` has held (`RecvBuf::held_bytes`).
    peak_held_bytes: usize,
    max: usize,
    /// The body has ended (or failed: nothing more is decoded).
    done: bool,
    /// What the connection was last told: `pending` holds the start of a message and
    /// waits for its rest (`RecvBody::set_mid_message`).
    mid: bool,
    /// Bytes of `pending` taken from the connection's budget (`RecvBody::hold_bytes`).
    charged: usize,
    /// Chunks of `pending` counted in the connection's held slices
    /// (`RecvBody::hold_slices`).
    slices: usize,
    _m: std::marker::PhantomData<fn() -> M>,
}

/// A gRPC message's prefix: the compressed flag and the length.
const MESSAGE_PREFIX_BYTES: usize = 5;

impl<M: prost::Message + Default> Messages<M> {
    /// The messages of `body`, each at most `max` bytes long.
    pub fn new(body: crate::h2conn::RecvBody, max: usize) -> Self {
        Self {
            body,
            pending: RecvBuf::new(DEFAULT_COPY_BELOW_BYTES),
            peak_held_bytes: 0,
            max,
            done: false,
            mid: false,
            charged: 0,
            slices: 0,
            _m: std::marker::PhantomData,
        }
    }

    /// DATA chunks shorter than `bytes` are copied on arrival into one buffer rather than
    /// kept as received (0: none is; default [`DEFAULT_COPY_BELOW_BYTES`]).
    pub fn copy_below(mut self, bytes: usize) -> Self {
        self.pending.copy_below = bytes;
        self
    }

    /// The most memory the received, undecoded bytes have held at once so far, in bytes:
    /// the chunks kept as received, their handles, and the copy buffer's capacity.
    pub fn peak_held_bytes(&self) -> usize {
        self.peak_held_bytes
    }
}

/// Takes the next whole gRPC message out of `pending` and decodes it (`None`: not all of it
/// has arrived).
fn decode_one<M: prost::Message + Default>(
    pending: &mut RecvBuf,
    max: usize,
) -> Result<Option<M>, Status> {
    let Some(prefix) = pending.peek::<MESSAGE_PREFIX_BYTES>() else { return Ok(None) };
    match prefix[0] {
        0 => {}
        1 => {
            return Err(Status::internal(
                "protocol error: received message with compressed-flag but no grpc-encoding was specified",
            ))
        }
        f => {
            return Err(Status::internal(format!(
                "protocol error: received message with invalid compression flag: {f} (valid flags are 0 and 1)"
            )))
        }
    }
    let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
    if len > max {
        return Err(Status::out_of_range(format!(
            "Error, decoded message length too large: found {len} bytes, the limit is: {max} bytes"
        )));
    }
    if pending.remaining() < MESSAGE_PREFIX_BYTES + len {
        return Ok(None);
    }
    pending.advance(MESSAGE_PREFIX_BYTES);
    let decoded = if pending.chunk().len() >= len {
        // The whole message in one chunk (the usual case): decoded from a slice of it,
        // which prost reads twice as fast as the chunked buffer (a 16-read batch: 0.7
        // against 1.45 us). Its bytes fields are slices of the chunk all the same.
        M::decode(pending.copy_to_bytes(len))
    } else {
        // Decoded from the chunks in place: a bytes field within one chunk is a slice of it,
        // one split across chunks is copied alone; the message is never gathered into one
        // buffer first (a client sending 16 KiB frames, as gRPC's C core and Go do, splits
        // every 64 KiB batch: that copy was 5% of a batched-write run's serving thread).
        M::decode((&mut *pending).take(len))
    };
    // A message that fails to decode ends the stream (its rest, and all after it, is
    // dropped by the caller).
    decoded.map(Some).map_err(|e| Status::internal(format!("decoding a message: {e}")))
}

impl<M: prost::Message + Default> Messages<M> {
    /// Tells the connection whether the start of a message is here and its rest awaited
    /// (`RecvBody::set_mid_message`: it holds the reply's HEADERS back meanwhile, so they
    /// leave with the reply), when that changed. Only a poll that waits (`pending`) for
    /// the rest of a message says so: one that yields a message, an error or the end
    /// does not, even with bytes left over (the caller may not poll again soon).
    fn tell_mid(&mut self, pending: bool) {
        let mid = pending && !self.done && self.pending.remaining() > 0;
        if mid != self.mid {
            self.mid = mid;
            self.body.set_mid_message(mid);
        }
    }

    /// Gives back to the connection's budget what `pending` no longer holds.
    fn uncharge(&mut self) {
        let now = self.pending.remaining();
        if now < self.charged {
            self.body.release_bytes(self.charged - now);
            self.charged = now;
        }
    }

    /// Takes `data`, a DATA chunk received, into `pending`. One of `copy_below` bytes or
    /// more, shorter than [`COUNTED_SLICE_BELOW_BYTES`], is kept as received only while the
    /// connection's held slices (`max_held_slices`) allow, counted there until it is
    /// decoded, as it was while it waited in the body; past the limit it is copied (once).
    /// Kept with the start of an unfinished message, such a chunk may keep a whole receive
    /// buffer (up to 256 KiB) alive: a peer leaving 1 KiB starts of messages on many
    /// streams, each cut from another receive buffer, pinned 256 times the bytes
    /// `hold_bytes` counts. Longer chunks are kept uncounted (at most 16 times their bytes,
    /// and a large message's frames lie side by side in one buffer).
    fn take_chunk(&mut self, data: Bytes) {
        if data.len() < self.pending.copy_below || data.len() >= COUNTED_SLICE_BELOW_BYTES {
            self.pending.push(data);
        } else if self.body.hold_slices(1) {
            self.slices += 1;
            self.pending.push_counted(data);
        } else {
            self.pending.push_copied(&data);
        }
    }

    /// Gives back the held slices of the chunks `pending` no longer holds.
    fn uncount_slices(&mut self) {
        let kept = self.pending.counted();
        if kept < self.slices {
            self.body.release_slices(self.slices - kept);
            self.slices = kept;
        }
    }

    fn poll_message(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<M, Status>>> {
        let r = self.poll_message_inner(cx);
        self.uncharge();
        self.uncount_slices();
        r
    }

    fn poll_message_inner(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<M, Status>>> {
        use http_body::Body as _;
        loop {
            match decode_one::<M>(&mut self.pending, self.max) {
                Ok(Some(m)) => return Poll::Ready(Some(Ok(m))),
                Ok(None) => {}
                Err(s) => {
                    self.done = true;
                    self.pending.clear();
                    return Poll::Ready(Some(Err(s)));
                }
            }
            if self.done {
                if self.pending.remaining() > 0 {
                    self.pending.clear();
                    return Poll::Ready(Some(Err(Status::internal(
                        "the request ended inside a message",
                    ))));
                }
                return Poll::Ready(None);
            }
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    // (Request trailers carry nothing a wayside call uses.)
                    if let Ok(data) = frame.into_data() {
                        // Held undecoded from here on, counted against the connection's
                        // budget (its receive window: flow control counts it no more).
                        if !self.body.hold_bytes(data.len()) {
                            self.done = true;
                            self.pending.clear();
                            return Poll::Ready(Some(Err(Status::resource_exhausted(
                                "the connection's calls hold more undecoded request bytes \
                                 than its receive window (http2_connection_window_bytes)",
                            ))));
                        }
                        self.charged += data.len();
                        self.take_chunk(data);
                        self.peak_held_bytes = self.peak_held_bytes.max(self.pending.held_bytes());
                    }
                }
                Some(Err(e)) => {
                    self.done = true;
                    self.pending.clear();
                    return Poll::Ready(Some(Err(Status::from_error(Box::new(e)))));
                }
                None => self.done = true,
            }
        }
    }
}

impl<M> Drop for Messages<M> {
    fn drop(&mut self) {
        self.body.release_bytes(self.charged);
        self.body.release_slices(self.slices);
    }
}

impl<M: prost::Message + Default> Stream for Messages<M> {
    type Item = Result<M, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let me = &mut *self;
        let r = me.poll_message(cx);
        me.tell_mid(r.is_pending());
        r
    }
}

/// The data of a [`GrpcBody`] frame: tonic's one buffer, or a hand-encoded reply's chunks.
#[derive(Debug)]
pub enum OutBuf {
    Bytes(Bytes),
    Chunks(ChunkBuf),
}

impl Buf for OutBuf {
    fn remaining(&self) -> usize {
        match self {
            Self::Bytes(b) => b.remaining(),
            Self::Chunks(c) => c.remaining(),
        }
    }

    fn chunk(&self) -> &[u8] {
        match self {
            Self::Bytes(b) => b.chunk(),
            Self::Chunks(c) => c.chunk(),
        }
    }

    fn advance(&mut self, cnt: usize) {
        match self {
            Self::Bytes(b) => b.advance(cnt),
            Self::Chunks(c) => c.advance(cnt),
        }
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [IoSlice<'a>]) -> usize {
        match self {
            Self::Bytes(b) => b.chunks_vectored(dst),
            Self::Chunks(c) => c.chunks_vectored(dst),
        }
    }

    fn copy_to_bytes(&mut self, len: usize) -> Bytes {
        match self {
            Self::Bytes(b) => b.copy_to_bytes(len),
            Self::Chunks(c) => c.copy_to_bytes(len),
        }
    }
}

/// The encoded gRPC messages of a hand-served call's reply, each item one DATA frame; an
/// error ends the call with its status.
pub type ReplyStream = Pin<Box<dyn Stream<Item = Result<ChunkBuf, Status>> + Send>>;

/// A response body: a call tonic served, or a hand-served call's replies and then its
/// trailers (`grpc-status` 0 when the replies end, the error's status when one fails).
pub struct GrpcBody(Inner);

enum Inner {
    Tonic(tonic::body::Body),
    Replies {
        /// `None` once the trailers are sent.
        replies: Option<ReplyStream>,
        /// The call's deadline ([`grpc_timeout`]): when it passes first, the replies are
        /// dropped (and with them the work producing them) and the call ends with
        /// DEADLINE_EXCEEDED.
        deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    },
}

impl GrpcBody {
    pub fn tonic(body: tonic::body::Body) -> Self {
        Self(Inner::Tonic(body))
    }

    /// A hand-served call's replies, ended with DEADLINE_EXCEEDED if they are still
    /// running `timeout` from now (the call's [`grpc_timeout`]; `None`: no deadline).
    pub fn replies(replies: ReplyStream, timeout: Option<Duration>) -> Self {
        Self(Inner::Replies {
            replies: Some(replies),
            deadline: timeout.map(|t| Box::pin(tokio::time::sleep(t))),
        })
    }
}

/// The most a `grpc-timeout` header can ask for: 8 digits of hours, far past anything
/// [`tokio::time::sleep`] needs to represent.
const GRPC_TIMEOUT_MAX_DIGITS: usize = 8;

/// The timeout a call's `grpc-timeout` header asks for (gRPC's format: 1 to 8 digits and a
/// unit, `H`, `M`, `S`, `m`, `u` or `n`). `None` without the header, or when it is
/// malformed: the call then runs without a deadline, as tonic's server treats it.
pub fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty()
        || digits.len() > GRPC_TIMEOUT_MAX_DIGITS
        || !digits.bytes().all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The trailers carrying `status`.
/// Most bytes of a `grpc-message` the hand-served calls send (its header is percent-
/// encoded, up to 3x this, well within a client's 16 KiB header list).
pub const MAX_STATUS_MESSAGE_BYTES: usize = 2048;

pub fn status_trailers(status: &Status) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    // A message past what a client takes in its header list (16 KiB by default here)
    // would close the caller's whole connection: cut short (on a character boundary; the
    // details, a fault the client acts on, are kept whole).
    let cut;
    let status = if status.message().len() > MAX_STATUS_MESSAGE_BYTES {
        let m = status.message();
        let mut end = MAX_STATUS_MESSAGE_BYTES;
        while !m.is_char_boundary(end) {
            end -= 1;
        }
        cut = Status::with_details(status.code(), &m[..end], status.details().to_vec().into());
        &cut
    } else {
        status
    };
    if status.add_header(&mut h).is_err() {
        // Only a message that cannot be a header value gets here.
        h.clear();
        let _ = Status::new(status.code(), "the error's message is not a valid header")
            .add_header(&mut h);
    }
    h
}

impl http_body::Body for GrpcBody {
    type Data = OutBuf;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<OutBuf>, Status>>> {
        match &mut self.0 {
            Inner::Tonic(b) => {
                Pin::new(b).poll_frame(cx).map(|f| f.map(|f| f.map(|f| f.map_data(OutBuf::Bytes))))
            }
            Inner::Replies { replies, deadline } => {
                let Some(stream) = replies else { return Poll::Ready(None) };
                let expired = deadline.as_mut().is_some_and(|d| d.as_mut().poll(cx).is_ready());
                let trailers = if expired {
                    status_trailers(&Status::deadline_exceeded(
                        "the call's grpc-timeout passed before it finished",
                    ))
                } else {
                    match ready!(stream.as_mut().poll_next(cx)) {
                        Some(Ok(data)) => {
                            return Poll::Ready(Some(Ok(Frame::data(OutBuf::Chunks(data)))))
                        }
                        Some(Err(s)) => status_trailers(&s),
                        None => status_trailers(&Status::ok("")),
                    }
                };
                *replies = None;
                *deadline = None;
                Poll::Ready(Some(Ok(Frame::trailers(trailers))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.0 {
            Inner::Tonic(b) => b.is_end_stream(),
            Inner::Replies { replies, .. } => replies.is_none(),
        }
    }
}

/// The HTTP/2 settings of a [`serve_http2`] server.
#[derive(Debug, Clone, Copy)]
pub struct Http2Settings {
    /// Most concurrent calls (HTTP/2 streams) per connection.
    pub max_concurrent_streams: u32,
    /// Longest request header block (encoded) and header list (decoded) per call, in bytes.
    pub max_header_list_bytes: u32,
    /// See [`crate::server::with_keepalive`] (0: no keepalive), in milliseconds.
    pub keepalive_interval_ms: u64,
    /// In milliseconds.
    pub keepalive_timeout_ms: u64,
    /// How long a connection has to finish its TLS handshake (served over TLS only), in
    /// milliseconds: a caller that connects and stalls holds nothing past it.
    pub tls_handshake_timeout_ms: u64,
    /// Most TLS handshakes under way at once (served over TLS only): a connection past it
    /// is closed at once, so callers that connect and stall (or make the server sign a
    /// handshake each) hold at most this many tasks and sockets.
    pub max_tls_handshakes: usize,
    /// Most of those from one source address (served over TLS only): one host that
    /// connects and stalls takes at most this many of `max_tls_handshakes`.
    pub max_tls_handshakes_per_source: usize,
    /// Bytes a caller may have sent and its calls not consumed, over all its calls.
    pub connection_window_bytes: u32,
    /// Bytes a caller may have sent on one call and the call not consumed.
    pub stream_window_bytes: u32,
    /// Largest frame a caller may send, in bytes (16 KiB to 16 MiB - 1).
    pub max_frame_bytes: u32,
    /// See [`ConnSettings::send_buffer_bytes`], in bytes.
    pub send_buffer_bytes: usize,
    /// See [`ConnSettings::max_held_slices`], in slices.
    pub max_held_slices: usize,
    /// See [`ConnSettings::max_resets_per_s`], in resets per second.
    pub max_resets_per_s: u32,
    /// How long open calls get to finish after the stop signal before their connections
    /// are closed, in milliseconds (a live caller holding a call open, its request never
    /// ended, would otherwise keep the server from ever returning).
    pub shutdown_grace_ms: u64,
}

/// Serves `svc` on every connection `incoming` yields until `signal`, then shuts every
/// connection down gracefully (GOAWAY: open calls finish, new ones are refused) and
/// returns when the last has closed, or once `shutdown_grace_ms` has passed, closing those
/// left. Connections run as tasks of the caller's runtime.
/// With `tls`, each connection is served over TLS once its handshake (in the connection's
/// task, within `tls_handshake_timeout_ms`) succeeds; TLS writes go to the socket through
/// its [`CorkedIo`], so the records of one turn still leave in one write.
pub async fn serve_http2<I, S, B>(
    incoming: I,
    svc: S,
    settings: Http2Settings,
    tls: Option<tokio_rustls::TlsAcceptor>,
    signal: impl std::future::Future<Output = ()>,
) -> std::io::Result<()>
where
    I: Stream<Item = std::io::Result<CorkedIo<tokio::net::TcpStream>>>,
    S: hyper::service::Service<http::Request<RecvBody>, Response = http::Response<B>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = ConnSettings {
        max_concurrent_streams: settings.max_concurrent_streams,
        connection_window_bytes: settings.connection_window_bytes,
        stream_window_bytes: settings.stream_window_bytes,
        max_frame_bytes: settings.max_frame_bytes,
        max_header_list_bytes: settings.max_header_list_bytes,
        keepalive_interval: (settings.keepalive_interval_ms > 0)
            .then(|| Duration::from_millis(settings.keepalive_interval_ms)),
        keepalive_timeout: Duration::from_millis(settings.keepalive_timeout_ms.max(1)),
        send_buffer_bytes: settings.send_buffer_bytes,
        max_held_slices: settings.max_held_slices,
        max_resets_per_s: settings.max_resets_per_s,
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(());
    // Past the grace: every connection left is closed (its task ends).
    let (hard_tx, hard_rx) = tokio::sync::watch::channel(false);
    let handshakes = std::sync::Arc::new(tokio::sync::Semaphore::new(settings.max_tls_handshakes));
    let per_source = SourceCounts::default();
    {
        // Dropped when accepting stops.
        let incoming = incoming;
        tokio::pin!(incoming, signal);
        loop {
            let io = tokio::select! {
                () = &mut signal => break,
                io = incoming.next() => match io {
                    Some(Ok(io)) => io,
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "a connection could not be set up");
                        continue;
                    }
                    None => break,
                },
            };
            let (svc, mut stop, mut hard) = (svc.clone(), stop_rx.clone(), hard_rx.clone());
            // This server gathers each turn's frames itself: the socket need not wait.
            let io = io.flush_at_once();
            let tls = tls.clone();
            let permit = match &tls {
                Some(_) => {
                    let source = io.get_ref().peer_addr().ok().map(|a| a.ip());
                    let max = settings.max_tls_handshakes_per_source.max(1);
                    let Some(slot) = per_source.take(source, max) else {
                        tracing::debug!(
                            ?source,
                            max,
                            "max_tls_handshakes_per_source under way: a new connection closed"
                        );
                        continue;
                    };
                    match handshakes.clone().try_acquire_owned() {
                        Ok(p) => Some((p, slot)),
                        Err(_) => {
                            tracing::debug!(
                                max = settings.max_tls_handshakes,
                                "max_tls_handshakes under way: a new connection closed"
                            );
                            continue;
                        }
                    }
                }
                None => None,
            };
            let handshake = Duration::from_millis(settings.tls_handshake_timeout_ms.max(1));
            tokio::spawn(async move {
                let closed = async move {
                    let _ = hard.wait_for(|h| *h).await;
                };
                tokio::pin!(closed);
                let r = match tls {
                    None => tokio::select! {
                        r = crate::h2conn::serve(io, svc, conn, &mut stop) => r,
                        () = &mut closed => return,
                    },
                    Some(tls) => {
                        let peer = io.get_ref().peer_addr().ok();
                        let tls_io = tokio::select! {
                            r = tokio::time::timeout(handshake, tls.accept(io)) => r,
                            // A handshake under way when the server stops is dropped.
                            _ = stop.changed() => return,
                        };
                        drop(permit);
                        // Failed handshakes are anyone's to cause: debug, not a log flood.
                        match tls_io {
                            Ok(Ok(io)) => {
                                // Verified against the road's CA during the handshake.
                                let certs = io.get_ref().1.peer_certificates().map(|c| {
                                    crate::tls::PeerCertificates(c.iter().cloned().collect())
                                });
                                let svc = WithPeerCertificates { svc, certs };
                                tokio::select! {
                                    r = crate::h2conn::serve(io, svc, conn, &mut stop) => r,
                                    () = &mut closed => return,
                                }
                            }
                            Ok(Err(e)) => {
                                tracing::debug!(?peer, error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(?peer, ?handshake, "TLS handshake timed out");
                                return;
                            }
                        }
                    }
                };
                if let Err(e) = r {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                drop(stop);
            });
        }
    }
    let _ = stop_tx.send(());
    drop(stop_rx);
    let grace = Duration::from_millis(settings.shutdown_grace_ms);
    if tokio::time::timeout(grace, stop_tx.closed()).await.is_err() {
        tracing::warn!(?grace, "shutdown: closing the connections whose calls are still open");
        let _ = hard_tx.send(true);
        stop_tx.closed().await;
    }
    Ok(())
}

/// TLS handshakes under way per source address (`max_tls_handshakes_per_source`).
#[derive(Clone, Default)]
struct SourceCounts(
    std::sync::Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
);

/// One handshake of a source counted in [`SourceCounts`]; given back when dropped.
struct SourceSlot {
    counts: SourceCounts,
    source: Option<std::net::IpAddr>,
}

impl SourceCounts {
    /// A slot for one more handshake from `source`, unless it has `max` under way (a
    /// source unknown is not counted).
    fn take(&self, source: Option<std::net::IpAddr>, max: usize) -> Option<SourceSlot> {
        // (Counted as the connection limits count a source: an IPv6 one by its /64.)
        let source = source.map(crate::server::source_key);
        if let Some(ip) = source {
            let mut counts = self.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let n = counts.entry(ip).or_default();
            if *n >= max {
                return None;
            }
            *n += 1;
        }
        Some(SourceSlot { counts: self.clone(), source })
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        if let Some(ip) = self.source {
            let mut counts =
                self.counts.0.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(n) = counts.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    // (Bounded: the map holds only sources with a handshake under way.)
                    counts.remove(&ip);
                }
            }
        }
    }
}

/// `svc` with the certificates a TLS connection's caller presented put in every request's
/// extensions (for [`crate::tls::road_certified`]).
#[derive(Clone)]
struct WithPeerCertificates<S> {
    svc: S,
    certs: Option<crate::tls::PeerCertificates>,
}

impl<S> hyper::service::Service<http::Request<RecvBody>> for WithPeerCertificates<S>
where
    S: hyper::service::Service<http::Request<RecvBody>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, mut req: http::Request<RecvBody>) -> Self::Future {
        if let Some(c) = &self.certs {
            req.extensions_mut().insert(c.clone());
        }
        self.svc.call(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buf(parts: &[&[u8]]) -> ChunkBuf {
        let mut b = ChunkBuf::default();
        for p in parts {
            b.push(Bytes::copy_from_slice(p));
        }
        b
    }

    #[test]
    fn a_chunk_buf_reads_back_its_chunks_in_order_across_their_edges() {
        let mut b = buf(&[b"abc", b"", b"defg", b"h"]);
        assert_eq!(b.remaining(), 8);
        assert_eq!(b.chunk_count(), 3, "the empty chunk is dropped");
        {
            let mut io = [IoSlice::new(&[]); 8];
            assert_eq!(b.chunks_vectored(&mut io), 3);
            assert_eq!(&*io[1], b"defg");
        }
        b.advance(2);
        assert_eq!(b.chunk(), b"c");
        assert_eq!(b.copy_to_bytes(3), Bytes::from_static(b"cde"), "across an edge");
        assert_eq!(b.copy_to_bytes(2), Bytes::from_static(b"fg"), "within one chunk");
        assert_eq!(b.remaining(), 1);
        b.advance(1);
        assert_eq!(b.remaining(), 0);
        assert_eq!(b.chunk(), b"");
        assert_eq!(b.chunks_vectored(&mut [IoSlice::new(&[]); 2]), 0);
    }

    #[test]
    #[should_panic(expected = "advance past the end")]
    fn advancing_a_chunk_buf_past_its_end_panics() {
        buf(&[b"ab"]).advance(3);
    }

    #[test]
    fn a_chunk_buf_fills_no_more_slices_than_it_is_given() {
        let b = buf(&[b"a", b"b", b"c"]);
        let mut io = [IoSlice::new(&[]); 2];
        assert_eq!(b.chunks_vectored(&mut io), 2);
        assert_eq!((&*io[0], &*io[1]), (&b"a"[..], &b"b"[..]));
    }

    /// `msgs` gRPC-framed, then cut into chunks at `cuts`, each kept as received.
    fn framed(msgs: &[&[u8]], cuts: &[usize]) -> RecvBuf {
        framed_copying(0, msgs, cuts)
    }

    /// [`framed`], the chunks shorter than `copy_below` copied.
    fn framed_copying(copy_below: usize, msgs: &[&[u8]], cuts: &[usize]) -> RecvBuf {
        let mut all = Vec::new();
        for m in msgs {
            all.push(0u8);
            all.extend_from_slice(&(m.len() as u32).to_be_bytes());
            all.extend_from_slice(m);
        }
        let mut b = RecvBuf::new(copy_below);
        let mut at = 0;
        for &c in cuts.iter().chain([&all.len()]) {
            b.push(Bytes::copy_from_slice(&all[at..c]));
            at = c;
        }
        b
    }

    #[test]
    fn messages_decode_whole_and_across_chunk_edges() {
        use prost::Message as _;
        let a = crate::pb::FlushReply { persisted_lsn: 300 }.encode_to_vec();
        let b = crate::pb::FlushReply { persisted_lsn: 7 }.encode_to_vec();
        let whole = framed(&[&a, &b], &[]);
        let lsns = |mut p: RecvBuf| {
            let mut out = Vec::new();
            while let Some(m) = decode_one::<crate::pb::FlushReply>(&mut p, 64).unwrap() {
                out.push(m.persisted_lsn);
            }
            (out, p.remaining())
        };
        assert_eq!(lsns(whole), (vec![300, 7], 0));
        // Cut inside the first prefix, inside the first body, and between the two; the
        // chunks kept, copied, or the short one copied after the long one kept.
        let total = 5 + a.len() + 5 + b.len();
        for cut in 1..total {
            for copy_below in [0, 1024, cut.max(total - cut)] {
                let p = framed_copying(copy_below, &[&a, &b], &[cut]);
                assert_eq!(lsns(p), (vec![300, 7], 0), "cut at {cut}, copy below {copy_below}");
            }
        }
        // Every byte a chunk of its own, copied.
        let cuts: Vec<usize> = (1..total).collect();
        assert_eq!(lsns(framed_copying(2, &[&a, &b], &cuts)), (vec![300, 7], 0));
        // Part of a message (of its prefix, of its body): nothing yet, nothing lost.
        let whole = framed(&[&a], &[]).chunks.to_vec();
        for n in [4, 6] {
            let mut part = RecvBuf::new(0);
            part.push(Bytes::copy_from_slice(&whole[..n]));
            assert_eq!(lsns(part), (vec![], n));
        }
    }

    #[test]
    fn a_message_within_one_chunk_shares_it() {
        use prost::Message as _;
        let data = Bytes::from(vec![9u8; 4096]);
        let m = crate::pb::WriteOp { block: 1, data: data.clone(), ..Default::default() };
        // (A 4 KiB chunk is long enough to be kept as received by default.)
        let mut p = framed_copying(DEFAULT_COPY_BELOW_BYTES, &[&m.encode_to_vec()], &[]);
        let front = p.chunk().as_ptr_range();
        let got = decode_one::<crate::pb::WriteOp>(&mut p, 1 << 20).unwrap().unwrap();
        assert_eq!(got.data, data);
        assert!(front.contains(&got.data.as_ptr()), "the data is a slice of the received chunk");
    }

    #[test]
    fn a_message_split_across_chunks_is_decoded_in_place() {
        use crate::pb::{stream_request::Op, StreamBatch, StreamRequest, WriteOp};
        use prost::Message as _;
        // A batch of 16 4 KiB writes cut into 16 KiB chunks, as a client sending 16 KiB
        // DATA frames delivers it.
        let data: Vec<Bytes> = (0..16u8).map(|i| Bytes::from(vec![i; 4096])).collect();
        let ops = data.iter().enumerate().map(|(i, d)| StreamRequest {
            tag: i as u64,
            op: Some(Op::Write(WriteOp { block: i as u64, data: d.clone(), ..Default::default() })),
            ..Default::default()
        });
        let encoded = StreamBatch { ops: ops.collect(), ..Default::default() }.encode_to_vec();
        let cuts: Vec<usize> = (1..=encoded.len() / 16_384).map(|k| k * 16_384).collect();
        let mut p = framed(&[&encoded], &cuts);
        let chunks: Vec<std::ops::Range<*const u8>> =
            p.chunks.chunks.iter().map(|c| c.as_ptr_range()).collect();
        assert!(chunks.len() >= 5);
        let got = decode_one::<StreamBatch>(&mut p, 1 << 20).unwrap().unwrap();
        assert_eq!(p.remaining(), 0);
        let mut shared = 0;
        for (i, (op, want)) in got.ops.iter().zip(&data).enumerate() {
            let Some(Op::Write(w)) = &op.op else { panic!("op {i}: {op:?}") };
            assert_eq!((op.tag, w.block, &w.data), (i as u64, i as u64, want));
            shared += usize::from(chunks.iter().any(|c| c.contains(&w.data.as_ptr())));
        }
        // Only a block cut by a chunk's edge is copied: most are slices of the chunks.
        assert!(shared >= 16 - cuts.len(), "{shared} of 16 blocks share the received chunks");
    }

    #[test]
    fn bad_messages_are_refused_with_tonics_codes() {
        let mut compressed = RecvBuf::new(0);
        compressed.push(Bytes::from_static(&[1, 0, 0, 0, 0]));
        let e = decode_one::<crate::pb::FlushReply>(&mut compressed, 64).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Internal);
        let mut long = framed(&[&[0u8; 65]], &[]);
        let e = decode_one::<crate::pb::FlushReply>(&mut long, 64).unwrap_err();
        assert_eq!(e.code(), tonic::Code::OutOfRange);
        let mut garbage = framed(&[&[0xff, 0xff, 0xff]], &[]);
        let e = decode_one::<crate::pb::FlushReply>(&mut garbage, 64).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Internal);
    }

    #[test]
    fn trailers_carry_the_status() {
        let h = status_trailers(&Status::not_found("no such volume"));
        assert_eq!(h["grpc-status"], "5");
        assert_eq!(Status::from_header_map(&h).expect("a status").message(), "no such volume");
        assert_eq!(status_trailers(&Status::ok(""))["grpc-status"], "0");
    }

    fn headers(timeout: &str) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        h.insert("grpc-timeout", http::HeaderValue::from_str(timeout).unwrap());
        h
    }

    #[test]
    fn grpc_timeout_reads_every_unit_and_ignores_malformed_headers() {
        let t = |v: &str| grpc_timeout(&headers(v));
        assert_eq!(t("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(t("3M"), Some(Duration::from_secs(180)));
        assert_eq!(t("10S"), Some(Duration::from_secs(10)));
        assert_eq!(t("300m"), Some(Duration::from_millis(300)));
        assert_eq!(t("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(t("0n"), Some(Duration::ZERO));
        assert_eq!(t("99999999H"), Some(Duration::from_secs(99_999_999 * 3600)));
        for bad in ["", "m", "100", "100x", "123456789m", "-1S", "1.5S", " 1S", "1s"] {
            assert_eq!(t(bad), None, "{bad:?}");
        }
        assert_eq!(grpc_timeout(&http::HeaderMap::new()), None);
    }

    async fn next_frame(body: &mut GrpcBody) -> Option<Frame<OutBuf>> {
        std::future::poll_fn(|cx| http_body::Body::poll_frame(Pin::new(&mut *body), cx))
            .await
            .map(|f| f.expect("a frame"))
    }

    #[tokio::test]
    async fn a_reply_body_past_its_deadline_ends_with_deadline_exceeded() {
        // One reply, then a stream that never ends: the reply is sent, then at the
        // deadline (not before) the trailers say DEADLINE_EXCEEDED and the body ends.
        let replies = tokio_stream::iter([Ok(buf(&[b"reply"]))]).chain(tokio_stream::pending());
        let t = std::time::Instant::now();
        let mut body = GrpcBody::replies(Box::pin(replies), Some(Duration::from_millis(50)));
        let first = next_frame(&mut body).await.expect("the reply");
        let Ok(data) = first.into_data() else { panic!("a data frame first") };
        assert_eq!(data.remaining(), 5);
        let trailers = next_frame(&mut body).await.expect("trailers").into_trailers().ok();
        assert_eq!(trailers.expect("trailers")["grpc-status"], "4");
        assert!(t.elapsed() >= Duration::from_millis(50), "{:?}", t.elapsed());
        assert!(http_body::Body::is_end_stream(&body));
        assert!(next_frame(&mut body).await.is_none());
        // Replies that end in time end with OK.
        let replies = tokio_stream::iter([Ok(buf(&[b"a"])), Ok(buf(&[b"b"]))]);
        let mut body = GrpcBody::replies(Box::pin(replies), Some(Duration::from_secs(60)));
        assert!(next_frame(&mut body).await.expect("a").is_data());
        assert!(next_frame(&mut body).await.expect("b").is_data());
        let trailers = next_frame(&mut body).await.expect("trailers").into_trailers().ok();
        assert_eq!(trailers.expect("trailers")["grpc-status"], "0");
        assert!(next_frame(&mut body).await.is_none());
    }

    /// What the test service of [`serve_test`] saw of one request: the messages decoded,
    /// the receive buffer's peak ([`Messages::peak_held_bytes`]) and how the body ended.
    type Seen = (Vec<crate::pb::WriteOp>, usize, Result<(), Status>);

    /// A [`serve_http2`] server on 127.0.0.1 whose every call decodes its request's
    /// `WriteOp`s with [`Messages`] (copying chunks below [`DEFAULT_COPY_BELOW_BYTES`]),
    /// reports them on the channel returned, and ends with OK or the status decoding ended
    /// with. Returns its address and the channel.
    async fn serve_test() -> (std::net::SocketAddr, tokio::sync::mpsc::Receiver<Seen>) {
        serve_test_with(crate::server::HTTP2_CONNECTION_WINDOW_BYTES).await
    }

    /// [`serve_test`] with another connection window.
    async fn serve_test_with(
        connection_window_bytes: u32,
    ) -> (std::net::SocketAddr, tokio::sync::mpsc::Receiver<Seen>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (seen_tx, seen_rx) = tokio::sync::mpsc::channel(4);
        let svc = hyper::service::service_fn(move |req: http::Request<RecvBody>| {
            let seen_tx = seen_tx.clone();
            let (tx, rx) = tokio::sync::mpsc::channel::<Result<ChunkBuf, Status>>(1);
            tokio::spawn(async move {
                let mut msgs = Messages::<crate::pb::WriteOp>::new(req.into_body(), 1 << 20);
                let mut got = Vec::new();
                let end = loop {
                    match msgs.next().await {
                        Some(Ok(m)) => got.push(m),
                        Some(Err(s)) => break Err(s),
                        None => break Ok(()),
                    }
                };
                if let Err(s) = &end {
                    let _ = tx.send(Err(s.clone())).await;
                }
                let _ = seen_tx.send((got, msgs.peak_held_bytes(), end)).await;
            });
            let replies: ReplyStream = Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx));
            std::future::ready(Ok::<_, std::convert::Infallible>(http::Response::new(
                GrpcBody::replies(replies, None),
            )))
        });
        let settings = Http2Settings { connection_window_bytes, ..test_settings() };
        let incoming =
            crate::server::incoming(listener, crate::server::ConnectionLimit::new(64), None);
        tokio::spawn(serve_http2(incoming, svc, settings, None, std::future::pending()));
        (addr, seen_rx)
    }

    /// A live caller holds a call open (its request never ended, its connection answering
    /// as any HTTP/2 client does) when the server stops: the server closes it after
    /// `shutdown_grace_ms` and returns (it waited for that call for ever).
    #[tokio::test]
    async fn a_call_held_open_delays_the_stop_by_the_grace_at_most() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (called_tx, mut called) = tokio::sync::mpsc::channel::<()>(1);
        let svc = hyper::service::service_fn(move |_req: http::Request<RecvBody>| {
            let _ = called_tx.try_send(());
            let never: ReplyStream = Box::pin(tokio_stream::pending());
            std::future::ready(Ok::<_, std::convert::Infallible>(http::Response::new(
                GrpcBody::replies(never, None),
            )))
        });
        let settings = Http2Settings { shutdown_grace_ms: 300, ..test_settings() };
        let incoming =
            crate::server::incoming(listener, crate::server::ConnectionLimit::new(64), None);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve_http2(incoming, svc, settings, None, async move {
            let _ = stop_rx.await;
        }));
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (send, conn) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(conn);
        let mut send = send.ready().await.unwrap();
        let (_resp, _body) = send.send_request(write_request(addr), false).unwrap();
        called.recv().await.expect("the call reached the service");
        stop_tx.send(()).unwrap();
        let t = std::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the server returns once the grace has passed")
            .unwrap()
            .unwrap();
        assert!(t.elapsed() >= Duration::from_millis(250), "the call got its grace");
        drop(send);
    }

    #[test]
    fn a_long_status_message_is_cut_short_and_keeps_its_details() {
        let long = "é".repeat(MAX_STATUS_MESSAGE_BYTES);
        let st = Status::with_details(tonic::Code::NotFound, long, vec![1, 2, 3].into());
        let h = status_trailers(&st);
        let back = Status::from_header_map(&h).expect("a status");
        assert_eq!(back.code(), tonic::Code::NotFound);
        assert!(back.message().len() <= MAX_STATUS_MESSAGE_BYTES, "{}", back.message().len());
        assert!(back.message().starts_with('é'));
        assert_eq!(back.details(), &[1, 2, 3]);
        let short = status_trailers(&Status::internal("short"));
        assert_eq!(Status::from_header_map(&short).unwrap().message(), "short");
    }

    /// The servers' settings in these tests.
    fn test_settings() -> Http2Settings {
        Http2Settings {
            max_concurrent_streams: 16,
            max_header_list_bytes: 16 * 1024,
            keepalive_interval_ms: 0,
            keepalive_timeout_ms: 0,
            tls_handshake_timeout_ms: 1000,
            max_tls_handshakes: 16,
            max_tls_handshakes_per_source: 16,
            connection_window_bytes: crate::server::HTTP2_CONNECTION_WINDOW_BYTES,
            stream_window_bytes: crate::server::HTTP2_STREAM_WINDOW_BYTES,
            max_frame_bytes: crate::server::HTTP2_MAX_FRAME_BYTES,
            send_buffer_bytes: crate::h2conn::DEFAULT_SEND_BUFFER_BYTES,
            max_held_slices: crate::h2conn::DEFAULT_MAX_HELD_SLICES,
            max_resets_per_s: crate::h2conn::DEFAULT_MAX_RESETS_PER_S,
            shutdown_grace_ms: 10_000,
        }
    }

    /// The headers of a test `Write` call to `addr`.
    fn write_request(addr: std::net::SocketAddr) -> http::Request<()> {
        http::Request::post(format!("http://{addr}/test.Test/Write"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap()
    }

    /// Sends `body` to `addr` as one call, in DATA frames of at most `frame` bytes, and
    /// returns its `grpc-status`.
    async fn raw_call(addr: std::net::SocketAddr, body: &[u8], frame: usize) -> String {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (send, conn) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(conn);
        let mut send = send.ready().await.unwrap();
        let req = write_request(addr);
        let (resp, mut out) = send.send_request(req, false).unwrap();
        let pieces: Vec<&[u8]> = body.chunks(frame).collect();
        for (i, p) in pieces.iter().enumerate() {
            // (h2 sends each piece as a DATA frame of its own; it never merges them.)
            out.send_data(Bytes::copy_from_slice(p), i + 1 == pieces.len()).unwrap();
        }
        let resp = tokio::time::timeout(Duration::from_secs(20), resp).await.unwrap().unwrap();
        let mut status = resp.headers().get("grpc-status").cloned();
        let mut body = resp.into_body();
        while let Some(d) = body.data().await {
            let d = d.unwrap();
            body.flow_control().release_capacity(d.len()).unwrap();
        }
        if let Some(t) = body.trailers().await.unwrap() {
            status = t.get("grpc-status").cloned().or(status);
        }
        status.expect("a grpc-status").to_str().unwrap().to_owned()
    }

    /// `msgs` gRPC-framed.
    fn grpc_framed(msgs: &[crate::pb::WriteOp]) -> Vec<u8> {
        use prost::Message as _;
        let mut all = Vec::new();
        for m in msgs {
            all.push(0u8);
            all.extend_from_slice(&(m.encoded_len() as u32).to_be_bytes());
            m.encode(&mut all).unwrap();
        }
        all
    }

    /// A message sent as 1-byte DATA frames is held in memory proportional to its size
    /// (each frame kept as received cost ~33x its byte in handles alone, and its receive
    /// buffer besides) and decodes intact; one in a single frame is not copied at all.
    #[tokio::test]
    async fn a_message_of_one_byte_frames_is_held_in_memory_proportional_to_it() {
        let (addr, mut seen) = serve_test().await;
        let ops: Vec<crate::pb::WriteOp> = (0..2u64)
            .map(|i| crate::pb::WriteOp {
                block: i + 1,
                data: (0..4096u32).map(|b| (b % 251) as u8 + i as u8).collect::<Vec<u8>>().into(),
                ..Default::default()
            })
            .collect();
        let body = grpc_framed(&ops);
        assert_eq!(raw_call(addr, &body, 1).await, "0");
        let (got, peak, end) = seen.recv().await.unwrap();
        assert!(end.is_ok(), "{end:?}");
        assert_eq!(got, ops, "decoded intact");
        // At most one message (4 KiB and a few bytes) is received and not yet decoded; the
        // copy buffer's doubling may leave room for as much again.
        let one = body.len() / 2;
        println!("{peak} bytes held at most for {one}-byte messages in 1-byte frames");
        assert!(peak <= 3 * one, "held {peak} bytes for a {one}-byte message");
        // The same messages in one DATA frame: kept as received, never copied.
        assert_eq!(raw_call(addr, &body, body.len()).await, "0");
        let (got, peak, _) = seen.recv().await.unwrap();
        assert_eq!(got, ops);
        assert_eq!(peak, body.len() + std::mem::size_of::<Bytes>(), "one chunk, no copy");
    }

    /// Request bytes a connection's calls hold undecoded (messages begun and not finished)
    /// are bounded by its receive window, though flow control gives a byte back as soon as
    /// a call takes it: three streams each leaving 600 KiB of a 900 KiB message unfinished
    /// on a connection with a 1 MiB window get the one past it RESOURCE_EXHAUSTED (before,
    /// every stream could hold up to the largest message, 1024 streams a connection).
    #[tokio::test]
    async fn unfinished_messages_hold_no_more_than_the_connection_window() {
        let (addr, mut seen) = serve_test_with(1 << 20).await;
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (send, conn) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(conn);
        let mut calls = Vec::new();
        for _ in 0..3 {
            let mut send = send.clone().ready().await.unwrap();
            let req = write_request(addr);
            let (resp, mut out) = send.send_request(req, false).unwrap();
            let mut start = vec![0u8];
            start.extend_from_slice(&(900u32 << 10).to_be_bytes());
            out.send_data(Bytes::from(start), false).unwrap();
            for _ in 0..40 {
                out.send_data(Bytes::from(vec![0u8; 15 << 10]), false).unwrap();
            }
            calls.push((resp, out));
        }
        let (got, _, end) = tokio::time::timeout(Duration::from_secs(20), seen.recv())
            .await
            .expect("a call ended")
            .unwrap();
        assert!(got.is_empty());
        let e = end.expect_err("refused");
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e:?}");
        assert!(e.message().contains("http2_connection_window_bytes"), "{e:?}");
        drop(calls);
    }

    /// A request that ends inside a message (its prefix or its body cut short) ends the
    /// call with INTERNAL, as tonic's decoder does, never with OK: the messages before it
    /// are decoded, the cut one is not.
    #[tokio::test]
    async fn a_request_ending_inside_a_message_is_an_error() {
        let (addr, mut seen) = serve_test().await;
        let op = crate::pb::WriteOp { block: 3, data: vec![7u8; 100].into(), ..Default::default() };
        let body = grpc_framed(&[op.clone(), op.clone()]);
        let one = body.len() / 2;
        // Cut between the messages: a whole request of one.
        assert_eq!(raw_call(addr, &body[..one], 16).await, "0");
        let (got, _, end) = seen.recv().await.unwrap();
        assert_eq!((got, end.is_ok()), (vec![op.clone()], true));
        for cut in [one + 3, one + 5, body.len() - 1] {
            assert_eq!(raw_call(addr, &body[..cut], 16).await, "13", "cut at {cut}");
            let (got, _, end) = seen.recv().await.unwrap();
            assert_eq!(got, std::slice::from_ref(&op), "cut at {cut}");
            assert_eq!(end.unwrap_err().code(), tonic::Code::Internal, "cut at {cut}");
        }
    }

    /// A body of the connection `wakeups` belongs to (stream `id`), and its shared side to
    /// deliver DATA to as the connection does.
    fn test_body(
        wakeups: &std::sync::Arc<crate::h2conn::Wakeups>,
        id: u32,
    ) -> (std::sync::Arc<crate::h2conn::RecvShared>, RecvBody) {
        let shared = std::sync::Arc::new(crate::h2conn::RecvShared {
            state: std::sync::Mutex::new(crate::h2conn::RecvState::new(false)),
            stream: std::sync::Arc::new(crate::h2conn::StreamWaker {
                wakeups: wakeups.clone(),
                id,
                queued: false.into(),
            }),
        });
        (shared.clone(), RecvBody { shared })
    }

    /// The chunks a call's reader keeps with the start of an unfinished message count
    /// against the connection's `max_held_slices`, as they did while waiting in its body:
    /// past it they are copied, so a peer leaving message starts on many streams (each
    /// chunk possibly cut from a receive buffer of its own, up to 256 KiB) pins no more
    /// receive buffers than the limit. (They were let go of the count once taken: three
    /// streams kept three slices on a connection allowed two.) The messages then decode
    /// intact and the count comes back to zero.
    #[test]
    fn chunks_kept_for_unfinished_messages_count_against_the_held_slices() {
        use std::sync::atomic::Ordering::Relaxed;
        let wakeups = std::sync::Arc::new(crate::h2conn::Wakeups::new(2, usize::MAX));
        let op =
            crate::pb::WriteOp { block: 1, data: vec![5u8; 8000].into(), ..Default::default() };
        let body = grpc_framed(std::slice::from_ref(&op));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut poll = |m: &mut Messages<crate::pb::WriteOp>| Pin::new(m).poll_next(&mut cx);
        let mut streams = Vec::new();
        for id in 0..3u32 {
            let (shared, rb) = test_body(&wakeups, 2 * id + 1);
            let mut msgs = Messages::<crate::pb::WriteOp>::new(rb, 1 << 20);
            shared.deliver(BytesMut::from(&body[..2000]), 0, false);
            assert!(poll(&mut msgs).is_pending(), "the message is not whole yet");
            streams.push((shared, msgs));
        }
        let kept: usize = streams.iter().map(|(_, m)| m.pending.chunks.chunk_count()).sum();
        let held = wakeups.held_slices.load(Relaxed);
        assert!(kept <= 2, "{kept} chunks kept as received, the connection allows 2");
        assert_eq!(kept, held, "every kept chunk is counted");
        // A long chunk (a large message's frame) is kept as received, uncounted.
        let big =
            crate::pb::WriteOp { block: 2, data: vec![6u8; 40_000].into(), ..Default::default() };
        let big_body = grpc_framed(std::slice::from_ref(&big));
        let (shared, rb) = test_body(&wakeups, 7);
        let mut long = Messages::<crate::pb::WriteOp>::new(rb, 1 << 20);
        shared.deliver(BytesMut::from(&big_body[..20_000]), 0, false);
        assert!(poll(&mut long).is_pending());
        assert_eq!(long.pending.chunks.chunk_count(), 1, "kept as received");
        assert_eq!(wakeups.held_slices.load(Relaxed), held, "not counted");
        shared.deliver(BytesMut::from(&big_body[20_000..]), 0, true);
        let Poll::Ready(Some(got)) = poll(&mut long) else { panic!("whole now") };
        assert_eq!(got.unwrap(), big);
        for (shared, mut msgs) in streams {
            shared.deliver(BytesMut::from(&body[2000..]), 0, true);
            let Poll::Ready(Some(got)) = poll(&mut msgs) else { panic!("whole now") };
            assert_eq!(got.unwrap(), op, "decoded intact");
            assert!(matches!(poll(&mut msgs), Poll::Ready(None)), "ended");
        }
        assert_eq!(wakeups.held_slices.load(Relaxed), 0, "all given back");
    }
}
