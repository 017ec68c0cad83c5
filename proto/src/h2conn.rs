//! A lean HTTP/2 server connection (RFC 9113) for gRPC: what [`crate::h2serve::serve_http2`]
//! runs on each connection of the NMS's vehicle port.
//!
//! hyper and h2 served that port before. Profiled at 16 clients of unary 4 KiB reads, the
//! serving thread spent 13 us of CPU per call, 7.3 of them in user space and most of that
//! inside h2 and hyper (h2's stream store and its by-value moves of frames and stream
//! state: 20% of the thread, `memmove` 7% more, hyper's and tokio's per-call tasks and
//! wake-ups 7%), against redis's 8.5 us for a whole call. This connection does only what a
//! gRPC server needs, in one task and with no per-call task:
//!
//! - Frames are parsed from one receive buffer; a DATA payload is a slice of it, handed to
//!   the call's body uncopied (as h2 does).
//! - A call's service future and response body are polled inside the connection's task,
//!   each with a waker of its own that queues its stream to be polled again. A call the
//!   service answers at once (a cache hit, an accepted write) is answered in the same turn
//!   its request arrived in: its reply's frames go out with every other frame of the turn
//!   in one vectored write.
//! - Request headers are decoded by [`crate::hpack`] (the dynamic table, Huffman); replies
//!   are encoded as literals without indexing, so the connection keeps no encoder state.
//! - Flow control both ways: a call's received and unconsumed bytes are bounded by the
//!   stream window (released as its body consumes them), the connection's by the
//!   connection window; replies wait for the peer's windows. Frames to send are bounded by
//!   `send_buffer_bytes`: past it, neither the socket is read nor replies polled.
//! - Limits: `max_concurrent_streams` (more are refused with REFUSED_STREAM), the frame
//!   size, `max_header_list_bytes` (a longer header block closes the connection; a longer
//!   decoded list is answered RESOURCE_EXHAUSTED), keepalive PINGs.
//! - A protocol error closes the connection with GOAWAY and its code; a stream error resets
//!   only its stream. A graceful stop sends GOAWAY, lets the open calls finish and refuses
//!   new ones.

use bytes::{Buf, BufMut as _, Bytes, BytesMut};
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io::IoSlice;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};

pub(crate) const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
pub(crate) const FRAME_HEADER_BYTES: usize = 9;
/// The protocol's initial window and largest frame, before SETTINGS say otherwise.
pub(crate) const DEFAULT_WINDOW: i64 = 65_535;
pub(crate) const DEFAULT_MAX_FRAME_BYTES: usize = 16_384;
pub(crate) const MAX_WINDOW: i64 = (1 << 31) - 1;
pub(crate) const MAX_FRAME_BYTES_LIMIT: u32 = (1 << 24) - 1;

/// Default send buffer (`send_buffer_bytes`): frames queued to send past which a server
/// connection neither reads nor polls replies, and a client connection sends no more
/// request data, until the socket has taken them, in bytes.
pub const DEFAULT_SEND_BUFFER_BYTES: usize = 256 * 1024;
/// Payloads shorter than this are copied into the send buffer rather than queued as a
/// piece of their own, in bytes.
const SMALL_PIECE_BYTES: usize = 256;
/// Room a connection reads into, in bytes.
const READ_BUF_BYTES: usize = 64 * 1024;
/// Room a connection that receives large frames reads into, in bytes: more than a batch
/// of 16 blocks and its framing (65.6 KiB), so such a frame seldom straddles the end of a
/// receive buffer, where its received part is copied into the next one (with 64 KiB that
/// copy was 2.8% of the serving thread on batched writes). (Giving an idle connection's
/// buffer back cost a client 45% more CPU per streamed read: every turn then touched a
/// fresh buffer.)
const LARGE_READ_BUF_BYTES: usize = 256 * 1024;
/// A frame at least this long makes its connection read into `LARGE_READ_BUF_BYTES`; less
/// room than this left in the receive buffer makes a new one be reserved, in bytes.
pub(crate) const READ_ROOM_MIN_BYTES: usize = 16 * 1024;

/// Makes room in `rbuf` for the next read (`large`: the connection receives large frames).
pub(crate) fn reserve_read(rbuf: &mut BytesMut, large: bool) {
    if rbuf.capacity() - rbuf.len() < READ_ROOM_MIN_BYTES {
        rbuf.reserve(if large { LARGE_READ_BUF_BYTES } else { READ_BUF_BYTES });
    }
}

/// Most pieces handed to one vectored write: a turn's replies leave in one `writev` (at
/// two pieces per block, 16 clients' 16-block batch replies are 512; Linux takes 1024).
pub const WRITE_PIECES: usize = 512;
/// Rounds of reading, polling calls and writing in one poll of the connection before it
/// yields to the runtime's other tasks.
const TURNS_PER_POLL: usize = 16;
/// How long a closing connection tries to send its last frames (GOAWAY), in milliseconds.
const CLOSE_FLUSH_MS: u64 = 1_000;
/// A DATA payload of at least this many bytes reaches its call as a slice of the receive
/// buffer (uncopied); a shorter one is copied (after the call's other short ones), so a
/// peer's tiny frames never each hold on to a receive buffer, in bytes.
const DATA_SLICE_MIN_BYTES: usize = 1024;
/// Default `max_held_slices`: most DATA payloads held as slices of receive buffers
/// (received and not yet decoded: waiting in a call's body, or kept by its reader with the
/// start of a message awaiting its rest) per connection; past it payloads are copied. Each may keep
/// a whole receive buffer (64 or 256 KiB, or its frame) alive, so this bounds what a peer
/// that sends short DATA frames between long frames of other kinds can pin beyond the
/// window's bytes, in slices.
pub const DEFAULT_MAX_HELD_SLICES: usize = 256;
/// The largest `max_header_list_bytes` a connection takes, in bytes.
pub const MAX_HEADER_LIST_BYTES: u32 = 256 * 1024;

/// Default `max_resets_per_s`: most streams a peer may reset (or make us reset by breaking
/// the protocol on them) while their calls run, per second, before the connection closes
/// (ENHANCE_YOUR_CALM): every reset call costs the work begun for it (CVE-2023-44487,
/// "Rapid Reset"). A change of INITIAL_WINDOW_SIZE while streams are open counts as one
/// (it costs a pass over every stream).
pub const DEFAULT_MAX_RESETS_PER_S: u32 = 1_000;
/// A header block may decode to at most this many times `max_header_list_bytes`
/// (RFC 7541's count) before the connection closes; up to it, a list past the limit is
/// answered RESOURCE_EXHAUSTED. Bounds the decoder's copying for a hostile block.
const DECODED_LIST_FACTOR: usize = 4;

pub(crate) mod frame {
    pub const DATA: u8 = 0;
    pub const HEADERS: u8 = 1;
    pub const PRIORITY: u8 = 2;
    pub const RST_STREAM: u8 = 3;
    pub const SETTINGS: u8 = 4;
    pub const PUSH_PROMISE: u8 = 5;
    pub const PING: u8 = 6;
    pub const GOAWAY: u8 = 7;
    pub const WINDOW_UPDATE: u8 = 8;
    pub const CONTINUATION: u8 = 9;

    pub const END_STREAM: u8 = 0x1;
    pub const ACK: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;
    pub const PADDED: u8 = 0x8;
    pub const PRIORITY_FLAG: u8 = 0x20;
}

/// HTTP/2 error codes (RFC 9113 section 7).
pub mod code {
    pub const NO_ERROR: u32 = 0x0;
    pub const PROTOCOL_ERROR: u32 = 0x1;
    pub const INTERNAL_ERROR: u32 = 0x2;
    pub const FLOW_CONTROL_ERROR: u32 = 0x3;
    pub const STREAM_CLOSED: u32 = 0x5;
    pub const FRAME_SIZE_ERROR: u32 = 0x6;
    pub const REFUSED_STREAM: u32 = 0x7;
    pub const CANCEL: u32 = 0x8;
    pub const COMPRESSION_ERROR: u32 = 0x9;
    pub const ENHANCE_YOUR_CALM: u32 = 0xb;
}

pub(crate) mod setting {
    pub const HEADER_TABLE_SIZE: u16 = 0x1;
    pub const ENABLE_PUSH: u16 = 0x2;
    pub const MAX_CONCURRENT_STREAMS: u16 = 0x3;
    pub const INITIAL_WINDOW_SIZE: u16 = 0x4;
    pub const MAX_FRAME_SIZE: u16 = 0x5;
    pub const MAX_HEADER_LIST_SIZE: u16 = 0x6;
}

/// What a connection advertises and enforces.
#[derive(Debug, Clone, Copy)]
pub struct ConnSettings {
    /// Most calls (streams) open at once; more are refused (REFUSED_STREAM).
    pub max_concurrent_streams: u32,
    /// Bytes the peer may have sent and the calls not consumed, over all streams.
    pub connection_window_bytes: u32,
    /// Bytes the peer may have sent on one stream and its call not consumed.
    pub stream_window_bytes: u32,
    /// Largest frame the peer may send, in bytes.
    pub max_frame_bytes: u32,
    /// Largest header block (HEADERS and its CONTINUATIONs, encoded) and decoded header
    /// list, in bytes.
    pub max_header_list_bytes: u32,
    /// A connection silent this long is sent a PING (`None`: never).
    pub keepalive_interval: Option<Duration>,
    /// An unanswered PING closes the connection after this long.
    pub keepalive_timeout: Duration,
    /// Frames queued to send past which the connection neither reads nor polls replies
    /// until the socket has taken them, in bytes ([`DEFAULT_SEND_BUFFER_BYTES`]; at least
    /// 16 KiB).
    pub send_buffer_bytes: usize,
    /// Most DATA payloads held uncopied (as slices of receive buffers) at once, in slices
    /// ([`DEFAULT_MAX_HELD_SLICES`]).
    pub max_held_slices: usize,
    /// Most streams reset while their calls run per second before the connection closes
    /// ([`DEFAULT_MAX_RESETS_PER_S`]; at least 1).
    pub max_resets_per_s: u32,
}

impl ConnSettings {
    /// The largest frame we let the peer send (`max_frame_bytes` within the protocol's
    /// bounds), in bytes.
    fn our_max_frame(&self) -> u32 {
        frame_limit(self.max_frame_bytes)
    }
}

/// A configured send buffer within bounds: room for a whole frame of the protocol's default
/// size (a smaller one would never let a connection read or send), and small enough that
/// twice it cannot overflow, in bytes.
pub(crate) fn send_buffer_limit(send_buffer_bytes: usize) -> usize {
    send_buffer_bytes.clamp(DEFAULT_MAX_FRAME_BYTES, usize::MAX / 4)
}

/// Queues stream `id` to wait for connection window in `queue`, first dropping the ids of
/// streams no longer `waiting` (ended while waiting) once they outnumber the open streams:
/// a peer that withholds window while its streams end would otherwise grow the queue
/// without bound.
pub(crate) fn queue_for_window<T>(
    queue: &mut VecDeque<u32>,
    streams: &HashMap<u32, T>,
    id: u32,
    waiting: impl Fn(&T) -> bool,
) {
    if queue.len() > 2 * streams.len() + 16 {
        queue.retain(|i| streams.get(i).is_some_and(&waiting));
    }
    queue.push_back(id);
}

/// The largest frame we let a peer send for a configured `max_frame_bytes`: within the
/// protocol's bounds, in bytes.
pub(crate) fn frame_limit(max_frame_bytes: u32) -> u32 {
    max_frame_bytes.clamp(DEFAULT_MAX_FRAME_BYTES as u32, MAX_FRAME_BYTES_LIMIT)
}

/// Why a connection ended other than by a clean close.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    #[error("connection i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("the peer broke HTTP/2 ({}): {reason}", code_name(*code))]
    Protocol { code: u32, reason: &'static str },
    #[error("no answer to a keepalive PING within {0:?}")]
    KeepaliveTimeout(Duration),
}

pub(crate) fn code_name(code: u32) -> &'static str {
    match code {
        code::NO_ERROR => "NO_ERROR",
        code::PROTOCOL_ERROR => "PROTOCOL_ERROR",
        code::INTERNAL_ERROR => "INTERNAL_ERROR",
        code::FLOW_CONTROL_ERROR => "FLOW_CONTROL_ERROR",
        code::STREAM_CLOSED => "STREAM_CLOSED",
        code::FRAME_SIZE_ERROR => "FRAME_SIZE_ERROR",
        code::REFUSED_STREAM => "REFUSED_STREAM",
        code::CANCEL => "CANCEL",
        code::COMPRESSION_ERROR => "COMPRESSION_ERROR",
        code::ENHANCE_YOUR_CALM => "ENHANCE_YOUR_CALM",
        _ => "an error code",
    }
}

pub(crate) fn proto_err(code: u32, reason: &'static str) -> ConnError {
    ConnError::Protocol { code, reason }
}

/// The error a request body yields when its stream was reset (by the peer, or because the
/// connection closed) before the request ended.
#[derive(Debug, thiserror::Error)]
#[error("the request's stream was reset ({})", code_name(*.0))]
pub struct StreamReset(pub u32);

/// Strips a PADDED frame's padding: the payload and how many bytes were padding.
pub(crate) fn unpad(flags: u8, mut payload: BytesMut) -> Result<(BytesMut, usize), ConnError> {
    if flags & frame::PADDED == 0 {
        return Ok((payload, 0));
    }
    let Some(&pad) = payload.first() else {
        return Err(proto_err(code::PROTOCOL_ERROR, "a padded frame without its pad length"));
    };
    let pad = usize::from(pad);
    if pad + 1 > payload.len() {
        return Err(proto_err(code::PROTOCOL_ERROR, "padding longer than the frame"));
    }
    payload.advance(1);
    payload.truncate(payload.len() - pad);
    Ok((payload, pad + 1))
}

// ---------------------------------------------------------------------------------------
// Frame parsing both sides share (`h2client` is the client side).

/// A frame read from a receive buffer.
pub(crate) struct Frame {
    pub(crate) ty: u8,
    pub(crate) flags: u8,
    pub(crate) id: u32,
    pub(crate) payload: BytesMut,
}

/// Splits the next whole frame off `rbuf`, if one is there (else reserves room for the
/// rest of it). The peer's first frame must be SETTINGS (`first_seen` is set once it was;
/// `not_first` says why not), and no frame may be longer than `max_frame`.
pub(crate) fn next_frame(
    rbuf: &mut BytesMut,
    max_frame: usize,
    first_seen: &mut bool,
    not_first: &'static str,
) -> Result<Option<Frame>, ConnError> {
    if rbuf.len() < FRAME_HEADER_BYTES {
        return Ok(None);
    }
    let h = &rbuf[..FRAME_HEADER_BYTES];
    let len = (usize::from(h[0]) << 16) | (usize::from(h[1]) << 8) | usize::from(h[2]);
    let (ty, flags) = (h[3], h[4]);
    let id = u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff;
    // (Before the length: what is not HTTP/2, a TLS alert say, reads as a huge frame.)
    if !*first_seen && (ty != frame::SETTINGS || flags & frame::ACK != 0) {
        return Err(proto_err(code::PROTOCOL_ERROR, not_first));
    }
    if len > max_frame {
        return Err(proto_err(code::FRAME_SIZE_ERROR, "a frame larger than our MAX_FRAME_SIZE"));
    }
    if rbuf.len() < FRAME_HEADER_BYTES + len {
        rbuf.reserve(FRAME_HEADER_BYTES + len - rbuf.len());
        return Ok(None);
    }
    rbuf.advance(FRAME_HEADER_BYTES);
    *first_seen = true;
    Ok(Some(Frame { ty, flags, id, payload: rbuf.split_to(len) }))
}

/// Header blocks being received: HEADERS and its CONTINUATIONs, at most `max` bytes.
pub(crate) struct HeaderBlocks {
    /// HEADERS without END_HEADERS: the stream, END_STREAM, the block so far.
    pending: Option<(u32, bool, BytesMut)>,
    max: usize,
}

impl HeaderBlocks {
    pub(crate) fn new(max: usize) -> Self {
        Self { pending: None, max }
    }

    /// A block is open: only its CONTINUATIONs may come.
    pub(crate) fn open(&self) -> bool {
        self.pending.is_some()
    }

    fn check_len(&self, len: usize) -> Result<(), ConnError> {
        if len > self.max {
            // It cannot be skipped (the decoder's table must see it): the connection ends.
            return Err(proto_err(
                code::PROTOCOL_ERROR,
                "a header block longer than max_header_list_bytes",
            ));
        }
        Ok(())
    }

    /// A HEADERS frame: its whole block and END_STREAM when it ends the block.
    pub(crate) fn headers(
        &mut self,
        id: u32,
        flags: u8,
        payload: BytesMut,
    ) -> Result<Option<(bool, BytesMut)>, ConnError> {
        let (mut block, _) = unpad(flags, payload)?;
        if flags & frame::PRIORITY_FLAG != 0 {
            if block.len() < 5 {
                return Err(proto_err(
                    code::FRAME_SIZE_ERROR,
                    "HEADERS too short for its priority",
                ));
            }
            block.advance(5);
        }
        let end_stream = flags & frame::END_STREAM != 0;
        self.check_len(block.len())?;
        if flags & frame::END_HEADERS == 0 {
            self.pending = Some((id, end_stream, block));
            return Ok(None);
        }
        Ok(Some((end_stream, block)))
    }

    /// A CONTINUATION frame: the whole block and END_STREAM when it ends the block.
    pub(crate) fn continuation(
        &mut self,
        id: u32,
        flags: u8,
        payload: BytesMut,
    ) -> Result<Option<(bool, BytesMut)>, ConnError> {
        let Some((cid, end_stream, mut block)) = self.pending.take() else {
            return Err(proto_err(code::PROTOCOL_ERROR, "CONTINUATION without HEADERS"));
        };
        if cid != id {
            return Err(proto_err(code::PROTOCOL_ERROR, "CONTINUATION on another stream"));
        }
        self.check_len(block.len() + payload.len())?;
        block.extend_from_slice(&payload);
        if flags & frame::END_HEADERS == 0 {
            self.pending = Some((id, end_stream, block));
            return Ok(None);
        }
        Ok(Some((end_stream, block)))
    }
}

/// What a peer's SETTINGS frame set (each `None` when not in it).
#[derive(Default)]
pub(crate) struct PeerSettings {
    /// The last INITIAL_WINDOW_SIZE (applied once, after the others).
    pub(crate) initial_window: Option<i64>,
    pub(crate) max_frame: Option<usize>,
    pub(crate) max_streams: Option<u32>,
    pub(crate) enable_push: Option<u32>,
}

/// A SETTINGS frame, checked; `None` for an ACK.
pub(crate) fn parse_settings(
    id: u32,
    flags: u8,
    payload: &[u8],
) -> Result<Option<PeerSettings>, ConnError> {
    if id != 0 {
        return Err(proto_err(code::PROTOCOL_ERROR, "SETTINGS on a stream"));
    }
    if flags & frame::ACK != 0 {
        if !payload.is_empty() {
            return Err(proto_err(code::FRAME_SIZE_ERROR, "a SETTINGS ACK with a payload"));
        }
        return Ok(None);
    }
    if !payload.len().is_multiple_of(6) {
        return Err(proto_err(code::FRAME_SIZE_ERROR, "SETTINGS not a multiple of 6 bytes"));
    }
    let mut p = PeerSettings::default();
    for s in payload.chunks_exact(6) {
        let key = u16::from_be_bytes([s[0], s[1]]);
        let v = u32::from_be_bytes([s[2], s[3], s[4], s[5]]);
        match key {
            setting::ENABLE_PUSH if v > 1 => {
                return Err(proto_err(code::PROTOCOL_ERROR, "ENABLE_PUSH neither 0 nor 1"))
            }
            setting::ENABLE_PUSH => p.enable_push = Some(v),
            setting::INITIAL_WINDOW_SIZE => {
                if i64::from(v) > MAX_WINDOW {
                    return Err(proto_err(
                        code::FLOW_CONTROL_ERROR,
                        "INITIAL_WINDOW_SIZE past 2^31-1",
                    ));
                }
                p.initial_window = Some(i64::from(v));
            }
            setting::MAX_FRAME_SIZE => {
                if !(DEFAULT_MAX_FRAME_BYTES as u32..=MAX_FRAME_BYTES_LIMIT).contains(&v) {
                    return Err(proto_err(code::PROTOCOL_ERROR, "MAX_FRAME_SIZE out of range"));
                }
                p.max_frame = Some(v as usize);
            }
            setting::MAX_CONCURRENT_STREAMS => p.max_streams = Some(v),
            // What we send uses no dynamic table.
            setting::HEADER_TABLE_SIZE => {}
            // Unknown settings are ignored (RFC 9113 section 6.5.2).
            _ => {}
        }
    }
    Ok(Some(p))
}

/// What a peer may still send us on a stream or the connection, and the bytes consumed
/// since it was last told.
pub(crate) struct RecvWindow {
    left: i64,
    unannounced: usize,
}

impl RecvWindow {
    pub(crate) fn new(size: i64) -> Self {
        Self { left: size, unannounced: 0 }
    }

    /// `n` bytes arrived: `false` when they overran the window.
    pub(crate) fn take(&mut self, n: usize) -> bool {
        self.left -= n as i64;
        self.left >= 0
    }

    /// `n` bytes were consumed (or discarded): once at least `threshold` are unannounced,
    /// or at least as many as the peer may still send, and `open` (the peer may still
    /// send), the peer is told in a WINDOW_UPDATE on `id`. (With only the threshold, bytes
    /// other streams hold unread past the window's other half would leave the stream being
    /// read unable ever to reach it: no update, and every stream stalled.)
    pub(crate) fn release(
        &mut self,
        out: &mut Out,
        id: u32,
        n: usize,
        threshold: usize,
        open: bool,
    ) {
        self.unannounced += n;
        let due = threshold.min(self.left.max(0) as usize).max(1);
        if open && n > 0 && self.unannounced >= due {
            let k = std::mem::take(&mut self.unannounced);
            self.left += k as i64;
            out.window_update(id, k as u32);
        }
    }
}

/// A DATA frame's checks that come before its stream's (not stream 0, within the
/// connection window `conn`): its data, padding and flow-controlled length.
pub(crate) fn data_frame(
    conn: &mut RecvWindow,
    id: u32,
    flags: u8,
    payload: BytesMut,
) -> Result<(BytesMut, usize, usize), ConnError> {
    if id == 0 {
        return Err(proto_err(code::PROTOCOL_ERROR, "DATA on stream 0"));
    }
    let flow = payload.len();
    if !conn.take(flow) {
        return Err(proto_err(code::FLOW_CONTROL_ERROR, "DATA past the connection window"));
    }
    let (data, pad) = unpad(flags, payload)?;
    Ok((data, pad, flow))
}

/// A connection WINDOW_UPDATE of `n` applied to our send `window`.
pub(crate) fn grow_conn_window(window: &mut i64, n: i64) -> Result<(), ConnError> {
    if n == 0 {
        return Err(proto_err(code::PROTOCOL_ERROR, "a WINDOW_UPDATE of 0"));
    }
    *window += n;
    if *window > MAX_WINDOW {
        return Err(proto_err(code::FLOW_CONTROL_ERROR, "the connection window past 2^31-1"));
    }
    Ok(())
}

/// HTTP/2 keepalive, for both ends of a connection: a PING goes out once the peer has been
/// silent for `interval`, and the connection fails ([`ConnError::KeepaliveTimeout`]) when
/// nothing at all is heard within `timeout` of it (any bytes count as an answer) and no
/// byte of ours has reached the socket meanwhile either. The PING is queued behind what is
/// already to be sent, so on a slow link a large upload (the peer silent while it takes it
/// in) would otherwise outlast the timeout; a peer that is gone stops taking our bytes once
/// the socket's buffer is full, and is found out then.
pub(crate) struct Keepalive {
    interval: Duration,
    timeout: Duration,
    last_heard: Instant,
    /// When the unanswered PING was sent, or bytes queued ahead of it last reached the
    /// socket.
    ping_sent: Option<Instant>,
    /// [`Out::written`] when `ping_sent` was last set.
    written: u64,
    /// [`Out::written`] once every byte queued ahead of the PING has been written: bytes
    /// past it (the PING's own, or later calls') say nothing of the peer while the socket
    /// has room (it takes them into its buffer whether the peer is there or not), so they
    /// restart no clock, unless the socket pushed back since the PING (then room for them
    /// was made by the peer acknowledging: a large upload on a slow link).
    ahead_of_ping: u64,
    /// [`Out::pushed_back`] when the PING was queued.
    pushed_back_at_ping: u64,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl Keepalive {
    /// Keepalive every `interval` (`None`: none); each at least 1 ms.
    pub(crate) fn new(interval: Option<Duration>, timeout: Duration) -> Option<Self> {
        let interval = interval?.max(Duration::from_millis(1));
        Some(Self {
            interval,
            timeout: timeout.max(Duration::from_millis(1)),
            last_heard: Instant::now(),
            ping_sent: None,
            written: 0,
            ahead_of_ping: 0,
            pushed_back_at_ping: 0,
            timer: Box::pin(tokio::time::sleep(interval)),
        })
    }

    /// Bytes came from the peer.
    pub(crate) fn heard(&mut self) {
        self.last_heard = Instant::now();
        if self.ping_sent.take().is_some() {
            // The timer was set for the PING's timeout: the next PING is due an interval
            // from now, not then (the poll that follows every read registers it).
            let next = self.last_heard + self.interval;
            self.timer.as_mut().reset(tokio::time::Instant::from_std(next));
        }
    }

    /// Queues a PING in `out` when one is due; fails when the last went unanswered.
    pub(crate) fn poll(&mut self, out: &mut Out, cx: &mut Context<'_>) -> Result<(), ConnError> {
        if self.timer.as_mut().poll(cx).is_pending() {
            return Ok(());
        }
        let now = Instant::now();
        let peer_took =
            self.written < self.ahead_of_ping || out.pushed_back > self.pushed_back_at_ping;
        if self.ping_sent.is_some() && peer_took && out.written != self.written {
            // Our bytes are still being taken, by the peer: its side is alive, only busy.
            self.ping_sent = Some(now);
            self.written = out.written;
        }
        let next = match self.ping_sent {
            Some(sent) if now.duration_since(sent) >= self.timeout => {
                return Err(ConnError::KeepaliveTimeout(self.timeout));
            }
            Some(sent) => sent + self.timeout,
            None if now.duration_since(self.last_heard) >= self.interval => {
                self.ahead_of_ping = out.written + out.len as u64;
                self.pushed_back_at_ping = out.pushed_back;
                out.header(8, frame::PING, 0, 0);
                out.small(&[0x77; 8]);
                self.ping_sent = Some(now);
                self.written = out.written;
                now + self.timeout
            }
            None => self.last_heard + self.interval,
        };
        self.timer.as_mut().reset(tokio::time::Instant::from_std(next));
        // Registers the timer's waker for the new deadline.
        let _ = self.timer.as_mut().poll(cx);
        Ok(())
    }
}

/// A PING frame: answered (unless it is an answer).
pub(crate) fn on_ping(out: &mut Out, id: u32, flags: u8, payload: &[u8]) -> Result<(), ConnError> {
    if payload.len() != 8 {
        return Err(proto_err(code::FRAME_SIZE_ERROR, "PING not 8 bytes long"));
    }
    if id != 0 {
        return Err(proto_err(code::PROTOCOL_ERROR, "PING on a stream"));
    }
    if flags & frame::ACK == 0 {
        out.header(8, frame::PING, frame::ACK, 0);
        out.small(payload);
    }
    Ok(())
}

/// A WINDOW_UPDATE frame's increment (0 is the caller's to refuse, as a stream or a
/// connection error).
pub(crate) fn window_increment(payload: &[u8]) -> Result<i64, ConnError> {
    if payload.len() != 4 {
        return Err(proto_err(code::FRAME_SIZE_ERROR, "WINDOW_UPDATE not 4 bytes long"));
    }
    Ok(i64::from(
        u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]) & 0x7fff_ffff,
    ))
}

// ---------------------------------------------------------------------------------------
// Wake-ups: a stream's waker queues its id for the connection's task.

pub(crate) struct Wakeups {
    pub(crate) ids: Mutex<Vec<u32>>,
    pub(crate) conn: Mutex<Option<Waker>>,
    /// The connection's task is polling: it looks at `ids` again before it waits, so a
    /// waker need not wake it.
    pub(crate) polling: AtomicBool,
    /// DATA payloads held as slices of receive buffers...
    pub(crate) held_slices: std::sync::atomic::AtomicUsize,
    /// ...and the most there may be (`max_held_slices`).
    pub(crate) max_held_slices: usize,
    /// Request bytes the connection's calls hold taken from their bodies and not yet
    /// decoded (the start of a message awaiting its rest; see `RecvBody::hold_bytes`)...
    pub(crate) call_bytes: std::sync::atomic::AtomicUsize,
    /// ...and the most there may be: the connection's receive window. Flow control counts
    /// a byte only until a call takes it, so without this a peer could leave a message
    /// unfinished on every stream, each up to the largest message.
    pub(crate) max_call_bytes: usize,
}

impl Wakeups {
    pub(crate) fn new(max_held_slices: usize, max_call_bytes: usize) -> Self {
        Self {
            ids: Mutex::new(Vec::new()),
            conn: Mutex::new(None),
            polling: AtomicBool::new(false),
            held_slices: std::sync::atomic::AtomicUsize::new(0),
            max_held_slices,
            call_bytes: std::sync::atomic::AtomicUsize::new(0),
            max_call_bytes,
        }
    }

    /// The streams to poll: `ready` (taken), then those woken since the last look.
    pub(crate) fn take_woken(&self, ready: &mut Vec<u32>) -> Vec<u32> {
        let mut ids = std::mem::take(ready);
        let mut woken = self.ids.lock().expect("wakeups lock");
        if ids.is_empty() {
            std::mem::swap(&mut ids, &mut *woken);
        } else {
            ids.append(&mut woken);
        }
        ids
    }

    pub(crate) fn wake_conn(&self) {
        if !self.polling.load(Ordering::SeqCst) {
            if let Some(w) = self.conn.lock().expect("wakeups lock").as_ref() {
                w.wake_by_ref();
            }
        }
    }
}

pub(crate) struct StreamWaker {
    pub(crate) wakeups: Arc<Wakeups>,
    pub(crate) id: u32,
    pub(crate) queued: AtomicBool,
}

impl Wake for StreamWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.queued.swap(true, Ordering::SeqCst) {
            self.wakeups.ids.lock().expect("wakeups lock").push(self.id);
        }
        self.wakeups.wake_conn();
    }
}

// ---------------------------------------------------------------------------------------
// The request body.

pub(crate) struct RecvState {
    /// Received payloads in order: slices of a receive buffer (`true`: counted in
    /// `Wakeups::held_slices`) or copies.
    chunks: VecDeque<(Bytes, bool)>,
    /// Short payloads received after `chunks`, copied.
    tail: BytesMut,
    /// Trailers that ended the stream (a reply's, to a client), yielded after the data.
    pub(crate) trailers: Option<http::HeaderMap>,
    /// The request ended (END_STREAM).
    pub(crate) end: bool,
    /// The stream was reset before the request ended.
    pub(crate) reset: Option<u32>,
    /// Whoever polls the body.
    pub(crate) waker: Option<Waker>,
    /// Bytes the body took since the connection last looked.
    pub(crate) released: usize,
    /// The body was dropped: what arrives now is discarded.
    pub(crate) dropped: bool,
    /// What a client's response body fails with when reset (`None`: as the reset's code
    /// maps); unused by the server.
    pub(crate) error: Option<tonic::Status>,
    /// The body's reader holds the start of a message and waits for its rest
    /// ([`RecvBody::set_mid_message`]).
    pub(crate) mid_message: bool,
}

impl RecvState {
    pub(crate) fn new(end: bool) -> Self {
        Self {
            chunks: VecDeque::new(),
            tail: BytesMut::new(),
            trailers: None,
            end,
            reset: None,
            waker: None,
            released: 0,
            dropped: false,
            error: None,
            mid_message: false,
        }
    }

    pub(crate) fn push(
        &mut self,
        data: BytesMut,
        held: &std::sync::atomic::AtomicUsize,
        max_held: usize,
    ) {
        if data.len() >= DATA_SLICE_MIN_BYTES && held.load(Ordering::Relaxed) < max_held {
            held.fetch_add(1, Ordering::Relaxed);
            if !self.tail.is_empty() {
                self.chunks.push_back((self.tail.split().freeze(), false));
            }
            self.chunks.push_back((data.freeze(), true));
        } else {
            self.tail.extend_from_slice(&data);
        }
    }

    fn pop(&mut self, held: &std::sync::atomic::AtomicUsize) -> Option<Bytes> {
        if let Some((b, sliced)) = self.chunks.pop_front() {
            if sliced {
                held.fetch_sub(1, Ordering::Relaxed);
            }
            return Some(b);
        }
        (!self.tail.is_empty()).then(|| self.tail.split().freeze())
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.chunks.is_empty() && self.tail.is_empty()
    }

    /// Drops what is held; how many bytes that was.
    pub(crate) fn clear(&mut self, held: &std::sync::atomic::AtomicUsize) -> usize {
        let mut n = self.tail.len();
        for (b, sliced) in self.chunks.drain(..) {
            n += b.len();
            if sliced {
                held.fetch_sub(1, Ordering::Relaxed);
            }
        }
        self.tail = BytesMut::new();
        n
    }
}

pub(crate) struct RecvShared {
    pub(crate) state: Mutex<RecvState>,
    pub(crate) stream: Arc<StreamWaker>,
}

impl RecvShared {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, RecvState> {
        self.state.lock().expect("request body lock")
    }

    pub(crate) fn held(&self) -> &std::sync::atomic::AtomicUsize {
        &self.stream.wakeups.held_slices
    }

    /// A DATA payload (`pad` bytes of padding stripped) for the body; `end`: the stream's
    /// last. How many of the frame's bytes were discarded (the padding, and the data when
    /// the body is gone), to be released at once.
    pub(crate) fn deliver(&self, data: BytesMut, pad: usize, end: bool) -> usize {
        let flow = data.len() + pad;
        let mut st = self.lock();
        let mut discard = pad;
        if st.dropped {
            discard += data.len();
        } else if !data.is_empty() {
            st.push(data, self.held(), self.stream.wakeups.max_held_slices);
        }
        if end {
            st.end = true;
        }
        let waker = if end || discard < flow { st.waker.take() } else { None };
        drop(st);
        if let Some(w) = waker {
            w.wake();
        }
        discard
    }

    /// The stream is gone: a body whose stream had not ended drops what is held and yields
    /// [`StreamReset`] with `c`; one that had ended keeps what it has not read yet (a
    /// client's whole response must outlive the connection that brought it).
    pub(crate) fn close(&self, c: u32) {
        let waker = {
            let mut st = self.lock();
            if !st.end {
                st.reset = Some(c);
                st.clear(self.held());
            }
            st.released = 0;
            st.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// A request's body: the DATA the peer sent on its stream, each chunk a slice of the
/// connection's receive buffer. What the body yields is released to the peer's window.
pub struct RecvBody {
    pub(crate) shared: Arc<RecvShared>,
}

impl http_body::Body for RecvBody {
    type Data = Bytes;
    type Error = StreamReset;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, StreamReset>>> {
        let mut st = self.shared.lock();
        if let Some(b) = st.pop(self.shared.held()) {
            st.released += b.len();
            // The connection learns of released bytes when the body has taken all it
            // holds (it is about to wait for more: the peer must be let send them).
            let tell = st.is_empty();
            drop(st);
            if tell {
                self.shared.stream.wake_by_ref();
            }
            return Poll::Ready(Some(Ok(http_body::Frame::data(b))));
        }
        if let Some(t) = st.trailers.take() {
            return Poll::Ready(Some(Ok(http_body::Frame::trailers(t))));
        }
        if let Some(c) = st.reset {
            return Poll::Ready(Some(Err(StreamReset(c))));
        }
        if st.end {
            return Poll::Ready(None);
        }
        if !st.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            st.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        let st = self.shared.lock();
        st.end && st.is_empty() && st.trailers.is_none()
    }
}

/// Adds `n` to `counter` unless that would pass `max` (`false`: nothing taken).
fn take_within(counter: &std::sync::atomic::AtomicUsize, n: usize, max: usize) -> bool {
    use std::sync::atomic::Ordering::Relaxed;
    counter
        .fetch_update(Relaxed, Relaxed, |cur| cur.checked_add(n).filter(|&next| next <= max))
        .is_ok()
}

impl RecvBody {
    /// Tells the connection (a server's) whether the body's reader holds the start of a
    /// request message and waits for its rest. While it does when the call answers, the
    /// reply's HEADERS are held back until the reply's first DATA, its end, or the reader
    /// no longer waiting (it has the message, or is gone): a client in the middle of a
    /// message sends the rest without waiting for them, and a reply then leaves with its
    /// HEADERS in one write instead of two. (A client sending a 64 KiB batch in 16 KiB
    /// frames got HEADERS alone in one write, then the reply: two wake-ups of it per call.)
    /// Only the reader can tell: the connection sees DATA frames, not messages.
    /// Takes `n` more bytes of the connection's budget for request bytes its calls hold
    /// undecoded (its receive window, `Wakeups::max_call_bytes`); `false`, taking nothing,
    /// past it. Given back with [`RecvBody::release_bytes`].
    pub fn hold_bytes(&self, n: usize) -> bool {
        let w = &self.shared.stream.wakeups;
        take_within(&w.call_bytes, n, w.max_call_bytes)
    }

    /// Gives back `n` bytes taken with [`RecvBody::hold_bytes`].
    pub fn release_bytes(&self, n: usize) {
        let w = &self.shared.stream.wakeups;
        w.call_bytes.fetch_sub(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Takes `n` more of the connection's held slices (`max_held_slices`) for payloads the
    /// body's reader keeps undecoded as received (each may keep a whole receive buffer
    /// alive); `false`, taking nothing, past the limit: the reader copies them then. Given
    /// back with [`RecvBody::release_slices`].
    pub fn hold_slices(&self, n: usize) -> bool {
        let w = &self.shared.stream.wakeups;
        take_within(&w.held_slices, n, w.max_held_slices)
    }

    /// Gives back `n` slices taken with [`RecvBody::hold_slices`].
    pub fn release_slices(&self, n: usize) {
        let w = &self.shared.stream.wakeups;
        w.held_slices.fetch_sub(n, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn set_mid_message(&self, mid: bool) {
        let mut st = self.shared.lock();
        if st.mid_message == mid {
            return;
        }
        st.mid_message = mid;
        drop(st);
        if !mid {
            // Headers held for it go out now.
            self.shared.stream.wake_by_ref();
        }
    }
}

impl Drop for RecvBody {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        st.dropped = true;
        st.released += st.clear(self.shared.held());
        // (A reader gone no longer waits for a message: HEADERS held for it go out.)
        let was_mid = std::mem::take(&mut st.mid_message);
        let tell = (st.released > 0 || was_mid) && st.reset.is_none();
        drop(st);
        if tell {
            self.shared.stream.wake_by_ref();
        }
    }
}

impl std::fmt::Debug for RecvBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecvBody").field("stream", &self.shared.stream.id).finish()
    }
}

// ---------------------------------------------------------------------------------------
// Frames to send.

#[derive(Default)]
pub(crate) struct Out {
    /// Pieces to write, in order, before `small`.
    queue: VecDeque<Bytes>,
    /// Small frames and payloads, copied, after `queue`.
    small: BytesMut,
    /// Bytes in `queue` and `small`.
    pub(crate) len: usize,
    /// Bytes written to the socket so far (progress: [`Keepalive`]).
    pub(crate) written: u64,
    /// Times the socket took no more (its buffer full): bytes it takes after that were
    /// made room for by the peer acknowledging earlier ones ([`Keepalive`]).
    pub(crate) pushed_back: u64,
}

impl Out {
    pub(crate) fn header(&mut self, len: usize, ty: u8, flags: u8, id: u32) {
        debug_assert!(len <= MAX_FRAME_BYTES_LIMIT as usize);
        self.small.reserve(FRAME_HEADER_BYTES);
        self.small.put_uint(len as u64, 3);
        self.small.put_u8(ty);
        self.small.put_u8(flags);
        self.small.put_u32(id & 0x7fff_ffff);
        self.len += FRAME_HEADER_BYTES;
    }

    pub(crate) fn small(&mut self, b: &[u8]) {
        self.small.extend_from_slice(b);
        self.len += b.len();
    }

    pub(crate) fn piece(&mut self, b: Bytes) {
        if b.len() < SMALL_PIECE_BYTES {
            return self.small(&b);
        }
        if !self.small.is_empty() {
            self.queue.push_back(self.small.split().freeze());
        }
        self.len += b.len();
        self.queue.push_back(b);
    }

    pub(crate) fn rst_stream(&mut self, id: u32, code: u32) {
        self.header(4, frame::RST_STREAM, 0, id);
        self.small(&code.to_be_bytes());
    }

    pub(crate) fn window_update(&mut self, id: u32, n: u32) {
        self.header(4, frame::WINDOW_UPDATE, 0, id);
        self.small(&n.to_be_bytes());
    }

    pub(crate) fn goaway(&mut self, last: u32, code: u32) {
        self.header(8, frame::GOAWAY, 0, 0);
        self.small(&last.to_be_bytes());
        self.small(&code.to_be_bytes());
    }

    /// A header block as HEADERS and, past `max_frame` bytes, CONTINUATIONs.
    pub(crate) fn headers(
        &mut self,
        id: u32,
        mut block: &[u8],
        end_stream: bool,
        max_frame: usize,
    ) {
        let mut ty = frame::HEADERS;
        let mut flags = if end_stream { frame::END_STREAM } else { 0 };
        loop {
            let n = block.len().min(max_frame);
            let last = n == block.len();
            if last {
                flags |= frame::END_HEADERS;
            }
            self.header(n, ty, flags, id);
            self.small(&block[..n]);
            block = &block[n..];
            if last {
                return;
            }
            ty = frame::CONTINUATION;
            flags = 0;
        }
    }

    /// Writes what is queued; `Ready(Ok)` once all of it is written.
    pub(crate) fn poll_write<IO: AsyncWrite + Unpin>(
        &mut self,
        io: &mut IO,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.small.is_empty() {
            self.queue.push_back(self.small.split().freeze());
        }
        while !self.queue.is_empty() {
            let n = if io.is_write_vectored() {
                let mut slices = [IoSlice::new(&[]); WRITE_PIECES];
                let k = self.queue.len().min(WRITE_PIECES);
                for (s, b) in slices.iter_mut().zip(&self.queue) {
                    *s = IoSlice::new(b);
                }
                match Pin::new(&mut *io).poll_write_vectored(cx, &slices[..k]) {
                    Poll::Ready(r) => r?,
                    Poll::Pending => {
                        self.pushed_back += 1;
                        return Poll::Pending;
                    }
                }
            } else {
                match Pin::new(&mut *io).poll_write(cx, &self.queue[0]) {
                    Poll::Ready(r) => r?,
                    Poll::Pending => {
                        self.pushed_back += 1;
                        return Poll::Pending;
                    }
                }
            };
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.len -= n;
            self.written += n as u64;
            let mut left = n;
            while left > 0 {
                let front = self.queue.front_mut().expect("written bytes were queued");
                if left < front.len() {
                    front.advance(left);
                    break;
                }
                left -= front.len();
                self.queue.pop_front();
            }
        }
        Poll::Ready(Ok(()))
    }
}

// ---------------------------------------------------------------------------------------
// HPACK: request headers decoded, reply headers encoded as literals.

pub(crate) fn encode_int(out: &mut Vec<u8>, first: u8, prefix_bits: u8, mut v: usize) {
    let max = (1usize << prefix_bits) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

pub(crate) fn encode_string(out: &mut Vec<u8>, s: &[u8]) {
    encode_int(out, 0, 7, s.len());
    out.extend_from_slice(s);
}

/// `:status` (when given) and `headers` as one header block of literals without indexing.
fn encode_headers(out: &mut Vec<u8>, status: Option<http::StatusCode>, headers: &http::HeaderMap) {
    match status {
        // Static table entry 8: `:status: 200`.
        Some(http::StatusCode::OK) => out.push(0x88),
        Some(s) => {
            // A literal with the static name `:status` (entry 8).
            encode_int(out, 0, 4, 8);
            encode_string(out, s.as_str().as_bytes());
        }
        None => {}
    }
    for (name, value) in headers {
        out.push(0);
        encode_string(out, name.as_str().as_bytes());
        encode_string(out, value.as_bytes());
    }
}

/// A request's decoded header block.
#[derive(Default)]
struct Decoded {
    method: Option<Vec<u8>>,
    scheme: Option<Vec<u8>>,
    authority: Option<Vec<u8>>,
    path: Option<Vec<u8>>,
    headers: http::HeaderMap,
    /// RFC 9113's size: names, values and 32 per field.
    list_bytes: usize,
    /// Why the request is malformed (a stream error).
    malformed: Option<&'static str>,
    /// Past `max_header_list_bytes`: nothing more was kept.
    too_long: bool,
}

impl Decoded {
    fn field(&mut self, name: &[u8], value: &[u8], max: usize) {
        self.list_bytes += name.len() + value.len() + 32;
        if self.list_bytes > max {
            self.too_long = true;
        }
        if self.too_long || self.malformed.is_some() {
            return;
        }
        if let Some(pseudo) = name.strip_prefix(b":") {
            if !self.headers.is_empty() {
                self.malformed = Some("a pseudo-header after a regular header");
                return;
            }
            let slot = match pseudo {
                b"method" => &mut self.method,
                b"scheme" => &mut self.scheme,
                b"authority" => &mut self.authority,
                b"path" => &mut self.path,
                _ => {
                    self.malformed = Some("an unknown pseudo-header");
                    return;
                }
            };
            if slot.is_some() {
                self.malformed = Some("a pseudo-header twice");
                return;
            }
            *slot = Some(value.to_vec());
            return;
        }
        if name.iter().any(u8::is_ascii_uppercase) {
            self.malformed = Some("an upper-case header name");
            return;
        }
        match name {
            b"connection" | b"keep-alive" | b"proxy-connection" | b"transfer-encoding"
            | b"upgrade" => {
                self.malformed = Some("a connection-specific header");
                return;
            }
            b"te" if value != b"trailers" => {
                self.malformed = Some("te other than trailers");
                return;
            }
            _ => {}
        }
        match (http::HeaderName::from_bytes(name), http::HeaderValue::from_bytes(value)) {
            (Ok(n), Ok(v)) => {
                self.headers.append(n, v);
            }
            _ => self.malformed = Some("an invalid header name or value"),
        }
    }

    fn into_request(self, body: RecvBody) -> Result<http::Request<RecvBody>, &'static str> {
        let (Some(method), Some(path)) = (self.method, self.path) else {
            return Err("a request without :method or :path");
        };
        if self.scheme.is_none() {
            return Err("a request without :scheme");
        }
        let method = http::Method::from_bytes(&method).map_err(|_| "an invalid :method")?;
        let mut parts = http::uri::Parts::default();
        parts.path_and_query = Some(
            http::uri::PathAndQuery::from_maybe_shared(Bytes::from(path))
                .map_err(|_| "an invalid :path")?,
        );
        if let (Some(scheme), Some(authority)) = (self.scheme, self.authority) {
            parts.scheme =
                Some(http::uri::Scheme::try_from(&scheme[..]).map_err(|_| "an invalid :scheme")?);
            parts.authority = Some(
                http::uri::Authority::from_maybe_shared(Bytes::from(authority))
                    .map_err(|_| "an invalid :authority")?,
            );
        }
        let uri = http::Uri::from_parts(parts).map_err(|_| "an invalid request URI")?;
        let mut req = http::Request::new(body);
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.version_mut() = http::Version::HTTP_2;
        *req.headers_mut() = self.headers;
        Ok(req)
    }
}

// ---------------------------------------------------------------------------------------
// Streams.

// (The request is held by value for the moment between its HEADERS and its stream's first
// poll; boxing it would cost every call an allocation.)
#[allow(clippy::large_enum_variant)]
enum Call<F, B> {
    /// The request, its service not called yet: it is called when the stream is first
    /// polled, after every frame read with its HEADERS was handled (so a call finds the
    /// DATA that arrived with it), and a panic in it resets this stream alone.
    New(Option<http::Request<RecvBody>>),
    /// The service has not answered yet.
    Waiting(Pin<Box<F>>),
    /// The reply's body is being sent (its headers sent, or held: `Stream::held_headers`).
    Replying(Pin<Box<B>>),
}

struct Stream<F, B: http_body::Body> {
    call: Call<F, B>,
    recv: Arc<RecvShared>,
    waker: Waker,
    /// The peer sent END_STREAM (or the stream was reset).
    recv_closed: bool,
    /// What the peer may still send on the stream.
    recv_win: RecvWindow,
    /// Bytes received on this stream and not yet released to the connection window.
    recv_held: usize,
    /// How many more bytes we may send.
    send_window: i64,
    /// Reply data that waits for window.
    pending: Option<B::Data>,
    /// In `Conn::window_blocked`.
    window_queued: bool,
    /// In `Conn::out_blocked`.
    out_queued: bool,
    /// The reply's status and headers, held back while the request's reader waits for
    /// the rest of a message ([`RecvBody::set_mid_message`]): sent before anything else
    /// of the reply, or once the reader stops waiting.
    held_headers: Option<(http::StatusCode, http::HeaderMap)>,
}

/// What the service answers a request with.
type Answer<B, E> = Result<http::Response<B>, E>;

/// Serves one connection with `svc` until the peer closes it, it breaks the protocol, or
/// `stop` changes (then gracefully: GOAWAY, the open calls finish, new ones are refused).
pub async fn serve<IO, S, B>(
    io: IO,
    svc: S,
    settings: ConnSettings,
    stop: &mut tokio::sync::watch::Receiver<()>,
) -> Result<(), ConnError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    S: hyper::service::Service<http::Request<RecvBody>, Response = http::Response<B>>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut conn = Conn::new(io, svc, settings);
    let r = {
        let stopped = stop.changed();
        tokio::pin!(stopped);
        std::future::poll_fn(|cx| {
            if !conn.stopping && stopped.as_mut().poll(cx).is_ready() {
                conn.stop();
            }
            conn.poll(cx)
        })
        .await
    };
    match &r {
        Err(ConnError::Protocol { code, .. }) => conn.out.goaway(conn.goaway_last(), *code),
        Err(ConnError::KeepaliveTimeout(_)) => conn.out.goaway(conn.goaway_last(), code::NO_ERROR),
        _ => {}
    }
    // What is left to send (a GOAWAY, replies of a connection that ended reading) goes out
    // within a bound: a peer that stopped reading holds nothing long.
    let flush = async {
        std::future::poll_fn(|cx| conn.out.poll_write(&mut conn.io, cx)).await?;
        std::future::poll_fn(|cx| Pin::new(&mut conn.io).poll_flush(cx)).await?;
        std::future::poll_fn(|cx| Pin::new(&mut conn.io).poll_shutdown(cx)).await
    };
    let _ = tokio::time::timeout(Duration::from_millis(CLOSE_FLUSH_MS), flush).await;
    r
}

struct Conn<IO, S: hyper::service::Service<http::Request<RecvBody>>, B: http_body::Body> {
    io: IO,
    svc: S,
    settings: ConnSettings,
    rbuf: BytesMut,
    out: Out,
    hpack: crate::hpack::Decoder,
    streams: HashMap<u32, Stream<S::Future, B>>,
    wakeups: Arc<Wakeups>,
    /// Streams to poll (besides the woken ones).
    ready: Vec<u32>,
    /// Streams with reply data waiting for the connection's window, in the order they
    /// began to wait (each once: `Stream::window_queued`).
    window_blocked: VecDeque<u32>,
    /// Streams not polled while `out` was full.
    out_blocked: Vec<u32>,
    preface_seen: bool,
    /// The first frame (the peer's SETTINGS) was seen.
    settings_seen: bool,
    last_stream_id: u32,
    /// Header blocks being received.
    blocks: HeaderBlocks,
    /// The peer sends large frames (`LARGE_READ_BUF_BYTES`).
    large_frames: bool,
    peer_max_frame: usize,
    peer_initial_window: i64,
    send_window: i64,
    recv_win: RecvWindow,
    /// We sent GOAWAY (graceful stop): new streams are refused, the connection closes
    /// when the last call has finished.
    stopping: bool,
    /// The last stream id our graceful GOAWAY named.
    goaway_id: Option<u32>,
    /// Streams reset while their calls ran, since `resets_since` (`max_resets_per_s`).
    resets: u32,
    resets_since: Instant,
    /// The peer sent GOAWAY: it opens no more streams (and may still send on open ones).
    peer_goaway: bool,
    keepalive: Option<Keepalive>,
    /// A scratch buffer for encoding header blocks.
    block: Vec<u8>,
}

impl<IO, S, B> Conn<IO, S, B>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    S: hyper::service::Service<http::Request<RecvBody>, Response = http::Response<B>>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn new(io: IO, svc: S, mut settings: ConnSettings) -> Self {
        settings.send_buffer_bytes = send_buffer_limit(settings.send_buffer_bytes);
        settings.max_resets_per_s = settings.max_resets_per_s.max(1);
        // A decoded list may reach 4x this, each field counting at least 32 bytes: at this
        // cap it stays within the 32768 fields an `http::HeaderMap` takes (past them it
        // panics).
        settings.max_header_list_bytes = settings.max_header_list_bytes.min(MAX_HEADER_LIST_BYTES);
        let mut out = Out::default();
        // Our SETTINGS, then the connection window past the protocol's 64 KiB.
        let ours = [
            (setting::MAX_CONCURRENT_STREAMS, settings.max_concurrent_streams),
            (setting::INITIAL_WINDOW_SIZE, settings.stream_window_bytes.min(MAX_WINDOW as u32)),
            (setting::MAX_FRAME_SIZE, settings.our_max_frame()),
            (setting::MAX_HEADER_LIST_SIZE, settings.max_header_list_bytes),
            (setting::ENABLE_PUSH, 0),
        ];
        out.header(ours.len() * 6, frame::SETTINGS, 0, 0);
        for (id, v) in ours {
            out.small(&id.to_be_bytes());
            out.small(&v.to_be_bytes());
        }
        let conn_window = i64::from(settings.connection_window_bytes).min(MAX_WINDOW);
        if conn_window > DEFAULT_WINDOW {
            out.window_update(0, (conn_window - DEFAULT_WINDOW) as u32);
        }
        // The protocol's default SETTINGS_HEADER_TABLE_SIZE (we advertise no other).
        let hpack = crate::hpack::Decoder::new(4096);
        let keepalive = Keepalive::new(settings.keepalive_interval, settings.keepalive_timeout);
        Self {
            io,
            svc,
            settings,
            rbuf: BytesMut::new(),
            out,
            hpack,
            streams: HashMap::new(),
            wakeups: Arc::new(Wakeups::new(
                settings.max_held_slices,
                conn_window.max(DEFAULT_WINDOW) as usize,
            )),
            ready: Vec::new(),
            window_blocked: VecDeque::new(),
            out_blocked: Vec::new(),
            preface_seen: false,
            settings_seen: false,
            last_stream_id: 0,
            blocks: HeaderBlocks::new(settings.max_header_list_bytes as usize),
            large_frames: false,
            peer_max_frame: DEFAULT_MAX_FRAME_BYTES,
            peer_initial_window: DEFAULT_WINDOW,
            send_window: DEFAULT_WINDOW,
            recv_win: RecvWindow::new(conn_window.max(DEFAULT_WINDOW)),
            stopping: false,
            goaway_id: None,
            resets: 0,
            resets_since: Instant::now(),
            peer_goaway: false,
            keepalive,
            block: Vec::new(),
        }
    }

    fn stream_window(&self) -> i64 {
        i64::from(self.settings.stream_window_bytes).min(MAX_WINDOW)
    }

    fn conn_window(&self) -> i64 {
        i64::from(self.settings.connection_window_bytes).clamp(DEFAULT_WINDOW, MAX_WINDOW)
    }

    /// A graceful stop: GOAWAY, then the open calls finish.
    fn stop(&mut self) {
        self.stopping = true;
        self.goaway_id = Some(self.last_stream_id);
        self.out.goaway(self.last_stream_id, code::NO_ERROR);
    }

    /// The last stream id a GOAWAY names now (never more than an earlier one named).
    fn goaway_last(&self) -> u32 {
        self.goaway_id.unwrap_or(self.last_stream_id).min(self.last_stream_id)
    }

    /// Counts a stream reset while its call ran: past `max_resets_per_s` in a second the
    /// connection ends.
    fn count_reset(&mut self) -> Result<(), ConnError> {
        let now = Instant::now();
        if now.duration_since(self.resets_since) >= Duration::from_secs(1) {
            self.resets_since = now;
            self.resets = 0;
        }
        self.resets += 1;
        if self.resets > self.settings.max_resets_per_s {
            return Err(proto_err(
                code::ENHANCE_YOUR_CALM,
                "more streams reset while their calls ran in a second than max_resets_per_s",
            ));
        }
        Ok(())
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ConnError>> {
        {
            let mut w = self.wakeups.conn.lock().expect("wakeups lock");
            if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *w = Some(cx.waker().clone());
            }
        }
        self.wakeups.polling.store(true, Ordering::SeqCst);
        let r = self.turns(cx);
        self.wakeups.polling.store(false, Ordering::SeqCst);
        match r {
            Poll::Pending if !self.wakeups.ids.lock().expect("wakeups lock").is_empty() => {
                // Woken while polling (after its last look): poll again.
                cx.waker().wake_by_ref();
                Poll::Pending
            }
            r => r,
        }
    }

    fn turns(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ConnError>> {
        for _ in 0..TURNS_PER_POLL {
            let mut busy = false;
            // Read and handle what arrived (unless replies are backed up).
            if self.out.len < self.settings.send_buffer_bytes {
                reserve_read(&mut self.rbuf, self.large_frames);
                match tokio_util::io::poll_read_buf(Pin::new(&mut self.io), cx, &mut self.rbuf) {
                    Poll::Ready(Ok(0)) => {
                        // The peer closed its side: its calls can never end properly.
                        self.abort_streams();
                        return Poll::Ready(Ok(()));
                    }
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
            // Poll the calls that are ready.
            busy |= self.poll_streams();
            if let Some(k) = &mut self.keepalive {
                k.poll(&mut self.out, cx)?;
            }
            // Send.
            if self.out.len > 0 {
                match self.out.poll_write(&mut self.io, cx) {
                    Poll::Ready(Ok(())) => {
                        busy = true;
                        for id in std::mem::take(&mut self.out_blocked) {
                            if let Some(s) = self.streams.get_mut(&id) {
                                s.out_queued = false;
                                self.ready.push(id);
                            }
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e.into())),
                    Poll::Pending => {}
                }
            }
            if self.out.len == 0 {
                if let Poll::Ready(Err(e)) = Pin::new(&mut self.io).poll_flush(cx) {
                    return Poll::Ready(Err(e.into()));
                }
                if (self.stopping || self.peer_goaway) && self.streams.is_empty() {
                    return Poll::Ready(Ok(()));
                }
            }
            if !busy
                && self.ready.is_empty()
                && self.wakeups.ids.lock().expect("wakeups lock").is_empty()
            {
                return Poll::Pending;
            }
        }
        // Still busy: let the runtime's other tasks run first.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    // -- receiving ------------------------------------------------------------------------

    fn handle_frames(&mut self) -> Result<(), ConnError> {
        if !self.preface_seen {
            if self.rbuf.len() < PREFACE.len() {
                return if PREFACE.starts_with(&self.rbuf) {
                    Ok(())
                } else {
                    Err(proto_err(code::PROTOCOL_ERROR, "not the HTTP/2 connection preface"))
                };
            }
            if &self.rbuf[..PREFACE.len()] != PREFACE {
                return Err(proto_err(code::PROTOCOL_ERROR, "not the HTTP/2 connection preface"));
            }
            self.rbuf.advance(PREFACE.len());
            self.preface_seen = true;
        }
        let max_frame = self.settings.our_max_frame() as usize;
        while let Some(Frame { ty, flags, id, payload }) = next_frame(
            &mut self.rbuf,
            max_frame,
            &mut self.settings_seen,
            "the first frame is not SETTINGS",
        )? {
            let len = payload.len();
            self.large_frames |= len >= READ_ROOM_MIN_BYTES;
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
                frame::PRIORITY if len != 5 => {
                    return Err(proto_err(code::FRAME_SIZE_ERROR, "PRIORITY not 5 bytes long"));
                }
                frame::RST_STREAM => self.on_rst_stream(id, &payload)?,
                frame::SETTINGS => self.on_settings(id, flags, &payload)?,
                frame::PUSH_PROMISE => {
                    return Err(proto_err(code::PROTOCOL_ERROR, "a client sent PUSH_PROMISE"))
                }
                frame::PING => on_ping(&mut self.out, id, flags, &payload)?,
                frame::GOAWAY => {
                    if id != 0 {
                        return Err(proto_err(code::PROTOCOL_ERROR, "GOAWAY on a stream"));
                    }
                    if len < 8 {
                        return Err(proto_err(
                            code::FRAME_SIZE_ERROR,
                            "GOAWAY shorter than 8 bytes",
                        ));
                    }
                    // The open calls finish; the peer starts no more.
                    self.peer_goaway = true;
                }
                frame::WINDOW_UPDATE => self.on_window_update(id, &payload)?,
                // Unknown frame types are ignored (RFC 9113 section 4.1).
                _ => {}
            }
        }
        Ok(())
    }

    fn on_data(&mut self, id: u32, flags: u8, payload: BytesMut) -> Result<(), ConnError> {
        let (data, pad, flow) = data_frame(&mut self.recv_win, id, flags, payload)?;
        let Some(s) = self.streams.get_mut(&id) else {
            if id > self.last_stream_id {
                return Err(proto_err(code::PROTOCOL_ERROR, "DATA on a stream never opened"));
            }
            // A stream already closed (reset, or its reply done): discarded.
            self.release_conn(flow);
            return Ok(());
        };
        if s.recv_closed {
            self.reset_stream(id, code::STREAM_CLOSED);
            self.release_conn(flow);
            return self.count_reset();
        }
        if !s.recv_win.take(flow) {
            self.reset_stream(id, code::FLOW_CONTROL_ERROR);
            self.release_conn(flow);
            return self.count_reset();
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
        Ok(())
    }

    fn on_headers(&mut self, id: u32, flags: u8, payload: BytesMut) -> Result<(), ConnError> {
        if id == 0 || id.is_multiple_of(2) {
            return Err(proto_err(
                code::PROTOCOL_ERROR,
                "HEADERS on a stream a client cannot open",
            ));
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
        let mut d = Decoded::default();
        // Always decoded: the decoder's dynamic table must follow the peer's encoder.
        self.hpack.decode(block, max * DECODED_LIST_FACTOR, |n, v| d.field(n, v, max)).map_err(
            |e| match e {
                crate::hpack::HpackError::ListTooLong(_) => proto_err(
                    code::ENHANCE_YOUR_CALM,
                    "a header block decoding to more than 4x max_header_list_bytes",
                ),
                _ => proto_err(code::COMPRESSION_ERROR, "an undecodable header block"),
            },
        )?;
        if id <= self.last_stream_id {
            // Trailers of an open request (they carry nothing a call uses), or a stream
            // already closed.
            if let Some(s) = self.streams.get_mut(&id) {
                if !end_stream || s.recv_closed {
                    self.reset_stream(id, code::PROTOCOL_ERROR);
                    return self.count_reset();
                }
                s.recv_closed = true;
                let waker = {
                    let mut st = s.recv.lock();
                    st.end = true;
                    st.waker.take()
                };
                if let Some(w) = waker {
                    w.wake();
                }
            }
            return Ok(());
        }
        self.last_stream_id = id;
        // Refused streams count with the resets (`max_resets_per_s`): each costs a decode
        // and a reply, and a flood of them would otherwise go unseen.
        if self.stopping {
            // Past our GOAWAY's last stream: never served.
            self.out.rst_stream(id, code::REFUSED_STREAM);
            return self.count_reset();
        }
        if self.streams.len() >= self.settings.max_concurrent_streams as usize {
            self.out.rst_stream(id, code::REFUSED_STREAM);
            return self.count_reset();
        }
        if d.too_long {
            let status = tonic::Status::resource_exhausted(format!(
                "the request's headers are longer than max_header_list_bytes ({max} bytes)"
            ));
            let mut h = crate::h2serve::status_trailers(&status);
            h.insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/grpc"),
            );
            self.send_headers(id, Some(http::StatusCode::OK), &h, true);
            if !end_stream {
                self.out.rst_stream(id, code::NO_ERROR);
            }
            // Counted with the resets: each costs a reply (and the decoding of up to 4x
            // the limit), and a flood of them in one read would otherwise queue replies
            // far past `send_buffer_bytes`.
            return self.count_reset();
        }
        if let Some(why) = d.malformed {
            tracing::debug!(stream = id, why, "a malformed request");
            self.out.rst_stream(id, code::PROTOCOL_ERROR);
            return self.count_reset();
        }
        let waker = Arc::new(StreamWaker {
            wakeups: self.wakeups.clone(),
            id,
            queued: AtomicBool::new(false),
        });
        let recv = Arc::new(RecvShared {
            state: Mutex::new(RecvState::new(end_stream)),
            stream: waker.clone(),
        });
        let req = match d.into_request(RecvBody { shared: recv.clone() }) {
            Ok(r) => r,
            Err(why) => {
                tracing::debug!(stream = id, why, "a malformed request");
                self.out.rst_stream(id, code::PROTOCOL_ERROR);
                return self.count_reset();
            }
        };
        self.streams.insert(
            id,
            Stream {
                call: Call::New(Some(req)),
                recv,
                waker: Waker::from(waker),
                recv_closed: end_stream,
                recv_win: RecvWindow::new(self.stream_window()),
                recv_held: 0,
                send_window: self.peer_initial_window,
                pending: None,
                window_queued: false,
                out_queued: false,
                held_headers: None,
            },
        );
        self.ready.push(id);
        Ok(())
    }

    fn on_rst_stream(&mut self, id: u32, payload: &[u8]) -> Result<(), ConnError> {
        if payload.len() != 4 {
            return Err(proto_err(code::FRAME_SIZE_ERROR, "RST_STREAM not 4 bytes long"));
        }
        if id == 0 {
            return Err(proto_err(code::PROTOCOL_ERROR, "RST_STREAM on stream 0"));
        }
        if id > self.last_stream_id {
            return Err(proto_err(code::PROTOCOL_ERROR, "RST_STREAM on a stream never opened"));
        }
        let c = u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
        if let Some(s) = self.streams.remove(&id) {
            // The call is dropped (and with it the work it was doing).
            self.close_recv(&s, c);
            self.count_reset()?;
        }
        Ok(())
    }

    fn on_settings(&mut self, id: u32, flags: u8, payload: &[u8]) -> Result<(), ConnError> {
        let Some(p) = parse_settings(id, flags, payload)? else { return Ok(()) };
        if let Some(v) = p.max_frame {
            self.peer_max_frame = v;
        }
        // (The peer's stream limit bounds pushes, which a server here never makes.)
        if let Some(v) = p.initial_window {
            let delta = v - self.peer_initial_window;
            self.peer_initial_window = v;
            if delta != 0 && !self.streams.is_empty() {
                // A pass over every open stream: a peer changing it back and forth in a
                // flood of SETTINGS made each frame cost `max_concurrent_streams` updates.
                // Counted with the resets (`max_resets_per_s`), as work a peer makes us do.
                self.count_reset()?;
            }
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

    fn on_window_update(&mut self, id: u32, payload: &[u8]) -> Result<(), ConnError> {
        let n = window_increment(payload)?;
        if id == 0 {
            // (The streams waiting for it are polled in order while it lasts.)
            return grow_conn_window(&mut self.send_window, n);
        }
        let Some(s) = self.streams.get_mut(&id) else {
            if id > self.last_stream_id {
                return Err(proto_err(
                    code::PROTOCOL_ERROR,
                    "WINDOW_UPDATE on a stream never opened",
                ));
            }
            return Ok(());
        };
        if n == 0 {
            self.reset_stream(id, code::PROTOCOL_ERROR);
            return self.count_reset();
        }
        let before = s.send_window;
        s.send_window += n;
        if s.send_window > MAX_WINDOW {
            self.reset_stream(id, code::FLOW_CONTROL_ERROR);
            return self.count_reset();
        }
        if before <= 0 && s.send_window > 0 && s.pending.is_some() {
            s.recv.stream.wake_by_ref();
        }
        Ok(())
    }

    /// Ends a stream's request side: its body yields [`StreamReset`] if it still waits.
    fn close_recv(&mut self, s: &Stream<S::Future, B>, c: u32) {
        s.recv.close(c);
        // Whatever the stream still counted against the connection window is free.
        self.release_conn(s.recv_held);
    }

    /// Resets a stream (RST_STREAM with `c`) and drops its call.
    fn reset_stream(&mut self, id: u32, c: u32) {
        self.out.rst_stream(id, c);
        if let Some(s) = self.streams.remove(&id) {
            self.close_recv(&s, c);
        }
    }

    /// `n` bytes of a stream's window are free again (its body took them, or they were
    /// discarded).
    fn release(&mut self, id: u32, n: usize) {
        let half = (self.stream_window() / 2) as usize;
        if let Some(s) = self.streams.get_mut(&id) {
            s.recv_held = s.recv_held.saturating_sub(n);
            s.recv_win.release(&mut self.out, id, n, half, !s.recv_closed);
        }
        self.release_conn(n);
    }

    fn release_conn(&mut self, n: usize) {
        let half = (self.conn_window() / 2) as usize;
        self.recv_win.release(&mut self.out, 0, n, half, true);
    }

    // -- sending ---------------------------------------------------------------------------

    fn send_headers(
        &mut self,
        id: u32,
        status: Option<http::StatusCode>,
        h: &http::HeaderMap,
        end: bool,
    ) {
        let mut block = std::mem::take(&mut self.block);
        block.clear();
        encode_headers(&mut block, status, h);
        self.out.headers(id, &block, end, self.peer_max_frame);
        self.block = block;
    }

    /// Polls the woken and ready calls; whether any was.
    fn poll_streams(&mut self) -> bool {
        let mut ids = self.wakeups.take_woken(&mut self.ready);
        let mut any = !ids.is_empty();
        for id in ids.drain(..) {
            self.poll_stream(id);
        }
        // (Kept for its capacity.)
        if self.ready.is_empty() {
            self.ready = ids;
        }
        // The streams waiting for the connection's window, in order, while it lasts.
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
        // A wake-up from here on queues the stream again (so bytes a body releases on
        // another thread after the look below are reported by the next poll).
        s.recv.stream.queued.store(false, Ordering::SeqCst);
        // Released request bytes first: the peer may send more.
        let released = std::mem::take(&mut s.recv.lock().released);
        let waker = s.waker.clone();
        if released > 0 {
            self.release(id, released);
        }
        let mut cx = Context::from_waker(&waker);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.step(id, &mut cx)));
        if r.is_err() {
            tracing::error!(stream = id, "a call panicked; its stream is reset");
            self.reset_stream(id, code::INTERNAL_ERROR);
        }
    }

    /// Drives one call as far as it goes now.
    fn step(&mut self, id: u32, cx: &mut Context<'_>) {
        loop {
            let Some(s) = self.streams.get_mut(&id) else { return };
            match &mut s.call {
                Call::New(req) => {
                    let req = req.take().expect("a new call's request is taken once");
                    s.call = Call::Waiting(Box::pin(self.svc.call(req)));
                }
                Call::Waiting(fut) => {
                    let answer: Answer<B, S::Error> = match fut.as_mut().poll(cx) {
                        Poll::Pending => return,
                        Poll::Ready(a) => a,
                    };
                    match answer {
                        Ok(resp) => {
                            let (parts, body) = resp.into_parts();
                            let end = body.is_end_stream();
                            s.call = Call::Replying(Box::pin(body));
                            if !end && s.recv.lock().mid_message {
                                s.held_headers = Some((parts.status, parts.headers));
                                continue;
                            }
                            self.send_headers(id, Some(parts.status), &parts.headers, end);
                            if end {
                                return self.finish(id);
                            }
                        }
                        Err(e) => {
                            let e: Box<dyn std::error::Error + Send + Sync> = e.into();
                            tracing::debug!(stream = id, error = %e, "the service failed a call");
                            return self.reset_stream(id, code::INTERNAL_ERROR);
                        }
                    }
                }
                Call::Replying(body) => {
                    if s.held_headers.is_some() && !s.recv.lock().mid_message {
                        self.send_held_headers(id);
                        continue;
                    }
                    if let Some(data) = s.pending.take() {
                        if !self.send_data(id, data) {
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
                    let polled = body.as_mut().poll_frame(cx);
                    if !matches!(polled, Poll::Pending | Poll::Ready(Some(Err(_)))) {
                        self.send_held_headers(id);
                    }
                    match polled {
                        Poll::Pending => return,
                        Poll::Ready(None) => {
                            self.out.header(0, frame::DATA, frame::END_STREAM, id);
                            return self.finish(id);
                        }
                        Poll::Ready(Some(Ok(f))) => match f.into_data() {
                            Ok(data) => {
                                if !self.send_data(id, data) {
                                    return;
                                }
                            }
                            Err(f) => {
                                if let Ok(t) = f.into_trailers() {
                                    self.send_headers(id, None, &t, true);
                                    return self.finish(id);
                                }
                            }
                        },
                        Poll::Ready(Some(Err(e))) => {
                            let e: Box<dyn std::error::Error + Send + Sync> = e.into();
                            tracing::debug!(stream = id, error = %e, "a reply body failed");
                            return self.reset_stream(id, code::INTERNAL_ERROR);
                        }
                    }
                }
            }
        }
    }

    /// Sends the reply's headers if they were held back (`Stream::held_headers`).
    fn send_held_headers(&mut self, id: u32) {
        let held = self.streams.get_mut(&id).and_then(|s| s.held_headers.take());
        if let Some((status, h)) = held {
            self.send_headers(id, Some(status), &h, false);
        }
    }

    /// Queues `data` as DATA frames as far as the windows allow; `false` when some waits
    /// for window (kept as the stream's pending data).
    fn send_data(&mut self, id: u32, mut data: B::Data) -> bool {
        let max_frame = self.peer_max_frame;
        let Some(s) = self.streams.get_mut(&id) else { return false };
        while data.has_remaining() {
            let room = s.send_window.min(self.send_window);
            if room <= 0 {
                s.pending = Some(data);
                if self.send_window <= 0 && !s.window_queued {
                    s.window_queued = true;
                    queue_for_window(&mut self.window_blocked, &self.streams, id, |s| {
                        s.window_queued
                    });
                }
                return false;
            }
            let n = data.remaining().min(max_frame).min(room as usize);
            s.send_window -= n as i64;
            self.send_window -= n as i64;
            self.out.header(n, frame::DATA, 0, id);
            let mut left = n;
            while left > 0 {
                let k = data.chunk().len().min(left);
                self.out.piece(data.copy_to_bytes(k));
                left -= k;
            }
        }
        true
    }

    /// The reply is complete: the stream closes (a request still being sent is told to
    /// stop, without error: RFC 9113 section 8.1).
    fn finish(&mut self, id: u32) {
        if let Some(s) = self.streams.remove(&id) {
            if !s.recv_closed {
                self.out.rst_stream(id, code::NO_ERROR);
            }
            self.close_recv(&s, code::CANCEL);
        }
    }
}

impl<IO, S, B> Drop for Conn<IO, S, B>
where
    S: hyper::service::Service<http::Request<RecvBody>>,
    B: http_body::Body,
{
    /// A connection that ends (closed, broken, or its task dropped) ends its calls: a
    /// body still waiting for its request (a call's task elsewhere) yields [`StreamReset`].
    fn drop(&mut self) {
        self.abort_streams();
    }
}

impl<IO, S, B> Conn<IO, S, B>
where
    S: hyper::service::Service<http::Request<RecvBody>>,
    B: http_body::Body,
{
    /// Ends every call: a body still waiting for the request yields [`StreamReset`].
    fn abort_streams(&mut self) {
        for (_, s) in self.streams.drain() {
            s.recv.close(code::CANCEL);
        }
    }
}

#[cfg(test)]
mod tests {
    //! Against two independent HTTP/2 implementations: the h2 crate's client (flow
    //! control, calls) and hand-made frames (protocol errors, limits, PING, GOAWAY).
    use super::*;
    use crate::h2serve::{ChunkBuf, GrpcBody, ReplyStream};
    use std::net::SocketAddr;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    /// A PING queued behind bytes the socket keeps taking (a slow link busy with an
    /// upload) does not time out; once the socket takes nothing more and nothing is heard,
    /// it does; anything heard answers it.
    /// A connection window of 100 bytes, its update due at 50 consumed: 60 bytes held
    /// unread by other streams, the 40 the peer could still send are read and consumed.
    /// The peer must be told (it could send nothing more: every stream would stall).
    #[test]
    fn bytes_held_elsewhere_do_not_stop_the_window_refilling() {
        let mut w = RecvWindow::new(100);
        let mut out = Out::default();
        assert!(w.take(60), "held by other streams, unread");
        assert!(w.take(40));
        for _ in 0..4 {
            w.release(&mut out, 0, 10, 50, true);
        }
        assert!(out.len > 0, "no WINDOW_UPDATE");
        assert_eq!(w.left, 40, "what was consumed is announced");
        // Unconstrained, updates still wait for the threshold (no update per frame).
        let (mut w, mut out) = (RecvWindow::new(100), Out::default());
        assert!(w.take(30));
        w.release(&mut out, 0, 30, 50, true);
        assert_eq!(out.len, 0, "30 consumed, 70 still open: not yet");
        assert!(w.take(30));
        w.release(&mut out, 0, 30, 50, true);
        assert_eq!((out.len, w.left), (FRAME_HEADER_BYTES + 4, 100));
    }

    #[tokio::test]
    async fn keepalive_counts_only_while_nothing_moves_either_way() {
        let (interval, timeout) = (Duration::from_millis(50), Duration::from_millis(200));
        let mut k = Keepalive::new(Some(interval), timeout).unwrap();
        let mut out = Out::default();
        let poll = |k: &mut Keepalive, out: &mut Out| {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            k.poll(out, &mut cx)
        };
        // An upload queued ahead of the PING (on a slow link).
        let ahead = 8 * 16 * 1024;
        out.len = ahead;
        tokio::time::sleep(interval + Duration::from_millis(10)).await;
        poll(&mut k, &mut out).unwrap();
        assert_eq!(out.len, ahead + FRAME_HEADER_BYTES + 8, "a PING after the interval");
        // Four timeouts long, the bytes ahead of the PING keep leaving: not dead.
        for _ in 0..8 {
            tokio::time::sleep(timeout / 2).await;
            out.written += 16 * 1024;
            poll(&mut k, &mut out).expect("the socket takes our bytes: alive");
        }
        // Nothing moves for a timeout: dead.
        tokio::time::sleep(timeout + Duration::from_millis(20)).await;
        let e = poll(&mut k, &mut out).unwrap_err();
        assert!(matches!(e, ConnError::KeepaliveTimeout(_)), "{e}");
        // Bytes written after the PING (its own, or later calls' a socket buffer takes in
        // whether the peer is there or not) are no sign of the peer.
        let (mut k, mut out) = (Keepalive::new(Some(interval), timeout).unwrap(), Out::default());
        tokio::time::sleep(interval + Duration::from_millis(10)).await;
        poll(&mut k, &mut out).unwrap();
        let mut failed = None;
        for _ in 0..4 {
            tokio::time::sleep(timeout / 2 + Duration::from_millis(10)).await;
            out.written += 16 * 1024;
            if let Err(e) = poll(&mut k, &mut out) {
                failed = Some(e);
                break;
            }
        }
        assert!(matches!(failed, Some(ConnError::KeepaliveTimeout(_))), "{failed:?}");
        // Unless the socket pushed back since the PING: then the room for them was made
        // by the peer acknowledging (a large upload on a slow link, its PING queued behind
        // a full socket buffer).
        let (mut k, mut out) = (Keepalive::new(Some(interval), timeout).unwrap(), Out::default());
        tokio::time::sleep(interval + Duration::from_millis(10)).await;
        poll(&mut k, &mut out).unwrap();
        out.pushed_back += 1;
        for _ in 0..8 {
            tokio::time::sleep(timeout / 2).await;
            out.written += 16 * 1024;
            poll(&mut k, &mut out).expect("the peer drains the socket: alive");
        }
        // Heard from the peer: no PING is due until another interval of silence.
        let mut k = Keepalive::new(Some(interval), timeout).unwrap();
        tokio::time::sleep(interval + Duration::from_millis(10)).await;
        poll(&mut k, &mut out).unwrap();
        k.heard();
        tokio::time::sleep(timeout + Duration::from_millis(20)).await;
        poll(&mut k, &mut out).expect("an answered PING never times out");
    }

    fn settings() -> ConnSettings {
        ConnSettings {
            max_concurrent_streams: 8,
            connection_window_bytes: 1 << 20,
            stream_window_bytes: 65_535,
            max_frame_bytes: 16_384,
            max_header_list_bytes: 4096,
            keepalive_interval: None,
            keepalive_timeout: Duration::from_secs(1),
            send_buffer_bytes: DEFAULT_SEND_BUFFER_BYTES,
            max_held_slices: DEFAULT_MAX_HELD_SLICES,
            max_resets_per_s: DEFAULT_MAX_RESETS_PER_S,
        }
    }

    /// What the test service saw.
    #[derive(Default)]
    struct Seen {
        /// Calls dropped before they ended ("/t/hang").
        dropped: tokio::sync::Notify,
        /// Lets "/t/noread" read its body only once told.
        read_now: tokio::sync::Notify,
        /// How "/t/spawned"'s task's read of its body ended.
        spawned: tokio::sync::Mutex<Option<SpawnedRead>>,
        /// Tells "/t/dropmid" to drop its reader.
        drop_reader: std::sync::Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    }

    type SpawnedRead = tokio::sync::oneshot::Receiver<Result<usize, StreamReset>>;

    struct DropGuard(Arc<Seen>);
    impl Drop for DropGuard {
        fn drop(&mut self) {
            self.0.dropped.notify_one();
        }
    }

    fn reply(chunks: Vec<Bytes>) -> http::Response<GrpcBody> {
        let mut b = ChunkBuf::default();
        for c in chunks {
            b.push(c);
        }
        grpc_reply(Box::pin(tokio_stream::iter([Ok(b)])))
    }

    /// A gRPC reply (`content-type: application/grpc`) of `replies`.
    fn grpc_reply(replies: ReplyStream) -> http::Response<GrpcBody> {
        let mut r = http::Response::new(GrpcBody::replies(replies, None));
        r.headers_mut()
            .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
        r
    }

    async fn read_all(mut body: RecvBody) -> Result<Vec<u8>, StreamReset> {
        use http_body::Body as _;
        let mut all = Vec::new();
        while let Some(f) = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            if let Ok(d) = f?.into_data() {
                all.extend_from_slice(&d);
            }
        }
        Ok(all)
    }

    type Served = tokio::sync::mpsc::UnboundedReceiver<Result<(), ConnError>>;

    /// A server of the test calls: `/t/echo` (the request back), `/t/big/N` (N bytes,
    /// from two chunks), `/t/hang` (never answers), `/t/noread` (reads its body only once
    /// told), `/t/panic`, `/t/refuse` (a trailers-only error), `/t/peek` (whether the
    /// request's DATA was there when the service was called), `/t/spawned` (a task of its
    /// own reads the body; the call never answers), `/t/msgs` (a reply per gRPC message
    /// of the request, `FlushReply`s read as the NMS's stream calls read theirs, the first
    /// in the call itself; none for one whose `persisted_lsn` is 0), `/t/dropmid` (reads
    /// as `/t/msgs` does, drops its reader when told, never answers).
    async fn start(
        settings: ConnSettings,
    ) -> (SocketAddr, Arc<Seen>, tokio::sync::watch::Sender<()>, Served) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Seen::default());
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(());
        let (done_tx, done_rx) = tokio::sync::mpsc::unbounded_channel();
        let s2 = seen.clone();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let seen = s2.clone();
                let svc = hyper::service::service_fn(move |mut req: http::Request<RecvBody>| {
                    let seen = seen.clone();
                    // Looked at in the call itself, before any await.
                    let peeked = (req.uri().path() == "/t/peek").then(|| {
                        use http_body::Body as _;
                        let mut cx = Context::from_waker(Waker::noop());
                        match Pin::new(req.body_mut()).poll_frame(&mut cx) {
                            Poll::Ready(Some(Ok(f))) => {
                                format!("ready:{}", f.into_data().unwrap().len())
                            }
                            _ => "empty".to_owned(),
                        }
                    });
                    async move {
                        let path = req.uri().path().to_owned();
                        let r = match path.as_str() {
                            "/t/echo" => {
                                reply(vec![read_all(req.into_body()).await.unwrap().into()])
                            }
                            "/t/hang" => {
                                let _g = DropGuard(seen.clone());
                                std::future::pending::<()>().await;
                                unreachable!()
                            }
                            "/t/noread" => {
                                let body = req.into_body();
                                seen.read_now.notified().await;
                                reply(vec![read_all(body).await.unwrap().len().to_string().into()])
                            }
                            "/t/panic" => panic!("a call's bug"),
                            "/t/peek" => reply(vec![peeked.unwrap().into()]),
                            "/t/spawned" => {
                                let (tx, rx) = tokio::sync::oneshot::channel();
                                *seen.spawned.lock().await = Some(rx);
                                let body = req.into_body();
                                tokio::spawn(async move {
                                    let _ = tx.send(read_all(body).await.map(|b| b.len()));
                                });
                                std::future::pending::<()>().await;
                                unreachable!()
                            }
                            "/t/msgs" => msgs_reply(req.into_body()),
                            "/t/dropmid" => {
                                let (tx, rx) = tokio::sync::oneshot::channel();
                                *seen.drop_reader.lock().unwrap() = Some(tx);
                                let mut reader = DropReader {
                                    msgs: Some(crate::h2serve::Messages::new(
                                        req.into_body(),
                                        1 << 20,
                                    )),
                                    drop_now: rx,
                                };
                                // The first read in the call itself, as `/t/msgs`' is.
                                let mut cx = Context::from_waker(Waker::noop());
                                let _ =
                                    tokio_stream::Stream::poll_next(Pin::new(&mut reader), &mut cx);
                                grpc_reply(Box::pin(reader))
                            }
                            "/t/refuse" => tonic::Status::not_found("no such thing")
                                .into_http()
                                .map(GrpcBody::tonic),
                            p => {
                                let n: usize = p.strip_prefix("/t/big/").unwrap().parse().unwrap();
                                let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
                                let data = Bytes::from(data);
                                reply(vec![data.slice(..n / 3), data.slice(n / 3..)])
                            }
                        };
                        Ok::<_, std::convert::Infallible>(r)
                    }
                });
                let mut stop = stop_rx.clone();
                let done = done_tx.clone();
                tokio::spawn(async move {
                    let _ = done.send(serve(tcp, svc, settings, &mut stop).await);
                });
            }
        });
        (addr, seen, stop_tx, done_rx)
    }

    /// `/t/dropmid`'s reply: reads its request (never whole in the test) until told to
    /// drop the reader; never yields.
    struct DropReader {
        msgs: Option<crate::h2serve::Messages<crate::pb::FlushReply>>,
        drop_now: tokio::sync::oneshot::Receiver<()>,
    }

    impl tokio_stream::Stream for DropReader {
        type Item = Result<ChunkBuf, tonic::Status>;

        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            let me = &mut *self;
            if me.msgs.is_some() && Pin::new(&mut me.drop_now).poll(cx).is_ready() {
                me.msgs = None;
            }
            if let Some(m) = me.msgs.as_mut() {
                assert!(Pin::new(m).poll_next(cx).is_pending(), "the message never completes");
            }
            Poll::Pending
        }
    }

    /// `/t/msgs`' reply (see [`start`]).
    fn msgs_reply(body: RecvBody) -> http::Response<GrpcBody> {
        use crate::h2serve::Messages;
        use tokio_stream::{Stream as _, StreamExt as _};
        let mut msgs = Messages::<crate::pb::FlushReply>::new(body, 1 << 20);
        let mut cx = Context::from_waker(Waker::noop());
        let first = match Pin::new(&mut msgs).poll_next(&mut cx) {
            Poll::Ready(Some(m)) => vec![m],
            _ => Vec::new(),
        };
        let replies = tokio_stream::iter(first).chain(msgs).filter_map(|m| match m {
            Err(s) => Some(Err(s)),
            Ok(m) if m.persisted_lsn == 0 => None,
            Ok(m) => {
                let mut out = ChunkBuf::default();
                out.push(grpc_message(m.persisted_lsn).into());
                Some(Ok(out))
            }
        });
        grpc_reply(Box::pin(replies))
    }

    async fn h2_client(
        addr: SocketAddr,
        builder: h2::client::Builder,
    ) -> h2::client::SendRequest<Bytes> {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (send, conn) = builder.handshake(tcp).await.unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        send.ready().await.unwrap()
    }

    fn post(path: &str) -> http::Request<()> {
        http::Request::post(format!("http://test{path}"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap()
    }

    /// The reply's data (releasing its window as it is read) and its `grpc-status`.
    async fn collect(resp: http::Response<h2::RecvStream>) -> (Vec<u8>, Option<String>) {
        let mut status = resp.headers().get("grpc-status").map(|v| v.to_str().unwrap().to_owned());
        let mut body = resp.into_body();
        let mut all = Vec::new();
        while let Some(d) = body.data().await {
            let d = d.unwrap();
            body.flow_control().release_capacity(d.len()).unwrap();
            all.extend_from_slice(&d);
        }
        if let Some(t) = body.trailers().await.unwrap() {
            status = t.get("grpc-status").map(|v| v.to_str().unwrap().to_owned()).or(status);
        }
        (all, status)
    }

    #[tokio::test]
    async fn replies_wait_for_a_small_peer_window_and_arrive_whole_in_its_frame_size() {
        let (addr, _seen, _stop, _served) = start(settings()).await;
        // The h2 client enforces its windows: a DATA frame past one is a FLOW_CONTROL_ERROR.
        let mut b = h2::client::Builder::new();
        b.initial_window_size(100).max_frame_size(16_384);
        let mut send = h2_client(addr, b).await;
        let n = 200_000;
        let (resp, _) = send.send_request(post(&format!("/t/big/{n}")), true).unwrap();
        let (data, status) = collect(resp.await.unwrap()).await;
        assert_eq!(status.as_deref(), Some("0"));
        assert_eq!(data.len(), n);
        assert!(data.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
        // Many calls at once on the connection, each echoed intact.
        let mut calls = Vec::new();
        for i in 0..6u8 {
            let (resp, mut out) = send.send_request(post("/t/echo"), false).unwrap();
            out.send_data(Bytes::from(vec![i; 30_000]), true).unwrap();
            calls.push((i, resp));
        }
        for (i, resp) in calls {
            let (data, status) = collect(resp.await.unwrap()).await;
            assert_eq!((data.len(), status.as_deref()), (30_000, Some("0")));
            assert!(data.iter().all(|b| *b == i));
        }
    }

    #[tokio::test]
    async fn a_call_that_does_not_read_holds_the_peer_to_its_stream_window() {
        let (addr, seen, _stop, _served) = start(settings()).await;
        let mut send = h2_client(addr, h2::client::Builder::new()).await;
        let (resp, mut out) = send.send_request(post("/t/noread"), false).unwrap();
        let window = settings().stream_window_bytes as usize;
        let mut sent = 0;
        // The peer may send the stream window and no more while the call does not read.
        out.reserve_capacity(4 * window);
        while sent < window {
            let cap = std::future::poll_fn(|cx| out.poll_capacity(cx)).await.unwrap().unwrap();
            out.send_data(Bytes::from(vec![7u8; cap]), false).unwrap();
            sent += cap;
        }
        assert_eq!(sent, window);
        let more = tokio::time::timeout(
            Duration::from_millis(300),
            std::future::poll_fn(|cx| out.poll_capacity(cx)),
        )
        .await;
        assert!(more.is_err(), "the server granted window its call had not consumed");
        // Once the call reads, its window is released and the rest goes.
        seen.read_now.notify_one();
        while sent < 3 * window {
            let cap = std::future::poll_fn(|cx| out.poll_capacity(cx)).await.unwrap().unwrap();
            let cap = cap.min(3 * window - sent);
            out.send_data(Bytes::from(vec![7u8; cap]), false).unwrap();
            sent += cap;
        }
        out.send_data(Bytes::new(), true).unwrap();
        let (data, status) = collect(resp.await.unwrap()).await;
        assert_eq!(status.as_deref(), Some("0"));
        assert_eq!(String::from_utf8(data).unwrap(), (3 * window).to_string());
    }

    #[tokio::test]
    async fn a_call_reset_by_the_peer_is_dropped_and_others_go_on() {
        let (addr, seen, _stop, _served) = start(settings()).await;
        let mut send = h2_client(addr, h2::client::Builder::new()).await;
        let (_resp, mut out) = send.send_request(post("/t/hang"), true).unwrap();
        // Something on the connection answered proves the call started.
        let (r, _) = send.send_request(post("/t/big/10"), true).unwrap();
        assert_eq!(collect(r.await.unwrap()).await.0.len(), 10);
        out.send_reset(h2::Reason::CANCEL);
        tokio::time::timeout(Duration::from_secs(10), seen.dropped.notified())
            .await
            .expect("the reset call was never dropped");
        // A panicking call is reset alone.
        let (r, _) = send.send_request(post("/t/panic"), true).unwrap();
        let e = r.await.unwrap_err();
        assert_eq!(e.reason(), Some(h2::Reason::INTERNAL_ERROR), "{e}");
        let (r, _) = send.send_request(post("/t/refuse"), true).unwrap();
        let r = r.await.unwrap();
        // A trailers-only reply: its headers end the stream.
        assert!(r.body().is_end_stream());
        assert_eq!(r.headers()["grpc-status"], "5");
        let (r, _) = send.send_request(post("/t/big/5"), true).unwrap();
        assert_eq!(collect(r.await.unwrap()).await.0.len(), 5);
    }

    // -- hand-made frames ------------------------------------------------------------------

    fn frame_bytes(ty: u8, flags: u8, id: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = Vec::with_capacity(9 + payload.len());
        f.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
        f.push(ty);
        f.push(flags);
        f.extend_from_slice(&id.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// A request's header block, literals without indexing.
    fn request_block(path: &str, extra: &[(&str, &str)]) -> Vec<u8> {
        let mut b = Vec::new();
        for (n, v) in
            [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "t")]
                .iter()
                .chain(extra)
        {
            b.push(0);
            encode_string(&mut b, n.as_bytes());
            encode_string(&mut b, v.as_bytes());
        }
        b
    }

    /// The error code (or last stream id) at the start of a frame's payload.
    fn code_in(p: &[u8]) -> u32 {
        u32::from_be_bytes(p[..4].try_into().unwrap())
    }

    struct Raw {
        tcp: tokio::net::TcpStream,
        buf: Vec<u8>,
    }

    impl Raw {
        async fn connect(addr: SocketAddr) -> Self {
            let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            tcp.write_all(PREFACE).await.unwrap();
            tcp.write_all(&frame_bytes(frame::SETTINGS, 0, 0, &[])).await.unwrap();
            Self { tcp, buf: Vec::new() }
        }

        async fn send(&mut self, ty: u8, flags: u8, id: u32, payload: &[u8]) {
            self.tcp.write_all(&frame_bytes(ty, flags, id, payload)).await.unwrap();
        }

        /// The next frame (type, flags, stream, payload); `None` at the end of the connection.
        async fn next(&mut self) -> Option<(u8, u8, u32, Vec<u8>)> {
            loop {
                if self.buf.len() >= 9 {
                    let len = (usize::from(self.buf[0]) << 16)
                        | (usize::from(self.buf[1]) << 8)
                        | usize::from(self.buf[2]);
                    if self.buf.len() >= 9 + len {
                        let f: Vec<u8> = self.buf.drain(..9 + len).collect();
                        let id = u32::from_be_bytes([f[5], f[6], f[7], f[8]]);
                        return Some((f[3], f[4], id, f[9..].to_vec()));
                    }
                }
                let mut chunk = [0u8; 65536];
                let n = tokio::time::timeout(Duration::from_secs(10), self.tcp.read(&mut chunk))
                    .await
                    .expect("the server went silent")
                    .unwrap_or(0);
                if n == 0 {
                    return None;
                }
                self.buf.extend_from_slice(&chunk[..n]);
            }
        }

        /// A whole request without a body (HEADERS with END_STREAM) on stream `id`.
        async fn call(&mut self, id: u32, path: &str) {
            let block = request_block(path, &[]);
            self.send(frame::HEADERS, frame::END_HEADERS | frame::END_STREAM, id, &block).await;
        }

        /// Frames until one of type `ty` (skipping SETTINGS, WINDOW_UPDATE and the like).
        async fn until(&mut self, ty: u8) -> Option<(u8, u32, Vec<u8>)> {
            while let Some((t, flags, id, p)) = self.next().await {
                if t == ty {
                    return Some((flags, id, p));
                }
            }
            None
        }

        /// The GOAWAY's error code, once the connection has ended.
        async fn goaway_code(&mut self) -> u32 {
            let (_, _, p) = self.until(frame::GOAWAY).await.expect("no GOAWAY");
            assert!(self.next().await.is_none(), "the connection goes on after GOAWAY");
            u32::from_be_bytes([p[4], p[5], p[6], p[7]])
        }
    }

    #[tokio::test]
    async fn protocol_errors_close_the_connection_with_goaway_and_their_code() {
        let (addr, _, _stop, mut served) = start(settings()).await;
        // A frame past our MAX_FRAME_SIZE.
        let mut c = Raw::connect(addr).await;
        c.send(frame::DATA, 0, 1, &vec![0; 16_385]).await;
        assert_eq!(c.goaway_code().await, code::FRAME_SIZE_ERROR);
        let e = served.recv().await.unwrap().unwrap_err();
        assert!(e.to_string().contains("FRAME_SIZE_ERROR"), "{e}");
        // Not HTTP/2 at all.
        let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
        let mut c = Raw { tcp, buf: Vec::new() };
        assert_eq!(c.goaway_code().await, code::PROTOCOL_ERROR);
        // A header block that does not decode.
        let mut c = Raw::connect(addr).await;
        c.send(frame::HEADERS, frame::END_HEADERS, 1, &[0xff, 0xff, 0xff, 0xff, 0x0f]).await;
        assert_eq!(c.goaway_code().await, code::COMPRESSION_ERROR);
        // A header block longer than max_header_list_bytes (in CONTINUATIONs).
        let mut c = Raw::connect(addr).await;
        let block = request_block("/t/echo", &[("x-big", &"a".repeat(3000))]);
        c.send(frame::HEADERS, 0, 1, &block).await;
        c.send(frame::CONTINUATION, 0, 1, &block).await;
        assert_eq!(c.goaway_code().await, code::PROTOCOL_ERROR);
        // A single HEADERS frame longer than max_header_list_bytes.
        let mut c = Raw::connect(addr).await;
        let block = request_block("/t/echo", &[("x-big", &"a".repeat(5000))]);
        c.send(frame::HEADERS, frame::END_HEADERS, 1, &block).await;
        assert_eq!(c.goaway_code().await, code::PROTOCOL_ERROR);
        // A frame other than CONTINUATION inside a header block.
        let mut c = Raw::connect(addr).await;
        c.send(frame::HEADERS, 0, 1, &request_block("/t/echo", &[])).await;
        c.send(frame::PING, 0, 0, &[0; 8]).await;
        assert_eq!(c.goaway_code().await, code::PROTOCOL_ERROR);
        // DATA past the stream window (a stream error: the connection goes on).
        let mut c = Raw::connect(addr).await;
        c.send(frame::HEADERS, frame::END_HEADERS, 1, &request_block("/t/noread", &[])).await;
        for _ in 0..5 {
            c.send(frame::DATA, 0, 1, &[1; 16_000]).await;
        }
        let (_, id, p) = c.until(frame::RST_STREAM).await.unwrap();
        assert_eq!((id, code_in(&p)), (1, code::FLOW_CONTROL_ERROR));
        c.send(frame::PING, 0, 0, b"stillsee").await;
        let (flags, _, p) = c.until(frame::PING).await.unwrap();
        assert_eq!((flags, &p[..]), (frame::ACK, &b"stillsee"[..]));
    }

    #[tokio::test]
    async fn limits_refuse_streams_and_long_header_lists_with_clear_answers() {
        let (addr, _seen, _stop, _served) = start(settings()).await;
        let mut c = Raw::connect(addr).await;
        // max_concurrent_streams calls that never end, then one more: refused.
        let max = settings().max_concurrent_streams;
        for i in 0..max {
            c.call(1 + 2 * i, "/t/hang").await;
        }
        let over = 1 + 2 * max;
        c.call(over, "/t/echo").await;
        let (_, id, p) = c.until(frame::RST_STREAM).await.unwrap();
        assert_eq!((id, code_in(&p)), (over, code::REFUSED_STREAM));
        // Reset one: a new call is served again.
        c.send(frame::RST_STREAM, 0, 1, &code::CANCEL.to_be_bytes()).await;
        let id = over + 2;
        c.call(id, "/t/big/3").await;
        let (flags, hid, _) = c.until(frame::HEADERS).await.unwrap();
        assert_eq!((hid, flags & frame::END_STREAM), (id, 0));
        // A header list longer than the limit (each field counts 32 more than its bytes),
        // in a block that is not: RESOURCE_EXHAUSTED, and the connection goes on.
        let mut c = Raw::connect(addr).await;
        let extra: Vec<(String, String)> =
            (0..80).map(|i| (format!("x-{i}"), String::new())).collect();
        let extra: Vec<(&str, &str)> =
            extra.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
        let mut block = request_block("/t/echo", &[]);
        // Indexed references to one dynamic-table entry: 1 byte each, 40 bytes listed each.
        block.push(0x40);
        encode_string(&mut block, b"x-r");
        encode_string(&mut block, b"y");
        block.extend(std::iter::repeat_n(0xbe, 200));
        assert!(block.len() < 4096 && extra.len() == 80);
        c.send(frame::HEADERS, frame::END_HEADERS | frame::END_STREAM, 1, &block).await;
        let (flags, _, p) = c.until(frame::HEADERS).await.unwrap();
        assert_ne!(flags & frame::END_STREAM, 0);
        let mut h = Vec::new();
        crate::hpack::Decoder::new(4096)
            .decode(&p, usize::MAX, |n, v| h.push((n.to_vec(), v.to_vec())))
            .unwrap();
        let get = |n: &str| {
            h.iter()
                .find(|(k, _)| k == n.as_bytes())
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        };
        assert_eq!(get("grpc-status").as_deref(), Some("8"));
        assert!(get("grpc-message").unwrap().contains("max_header_list_bytes"));
        c.call(3, "/t/big/2").await;
        let (_, id, _) = c.until(frame::DATA).await.unwrap();
        assert_eq!(id, 3);
    }

    #[tokio::test]
    async fn a_silent_peer_is_pinged_and_closed_when_it_never_answers() {
        let mut s = settings();
        s.keepalive_interval = Some(Duration::from_millis(100));
        s.keepalive_timeout = Duration::from_millis(100);
        let (addr, _, _stop, mut served) = start(s).await;
        let mut c = Raw::connect(addr).await;
        let (flags, _, _) = c.until(frame::PING).await.expect("no keepalive PING");
        assert_eq!(flags & frame::ACK, 0);
        // Never answered: the connection ends.
        while c.next().await.is_some() {}
        let e = served.recv().await.unwrap().unwrap_err();
        assert!(matches!(e, ConnError::KeepaliveTimeout(_)), "{e}");
    }

    #[tokio::test]
    async fn a_graceful_stop_finishes_open_calls_refuses_new_ones_and_closes() {
        let (addr, seen, stop, mut served) = start(settings()).await;
        let mut c = Raw::connect(addr).await;
        c.send(frame::HEADERS, frame::END_HEADERS, 1, &request_block("/t/noread", &[])).await;
        c.send(frame::DATA, frame::END_STREAM, 1, b"abc").await;
        // The server has seen stream 1 once it answers a PING sent after it.
        c.send(frame::PING, 0, 0, &[1; 8]).await;
        c.until(frame::PING).await.unwrap();
        stop.send(()).unwrap();
        let (_, _, p) = c.until(frame::GOAWAY).await.unwrap();
        assert_eq!(code_in(&p), 1, "last stream id");
        assert_eq!(u32::from_be_bytes(p[4..8].try_into().unwrap()), code::NO_ERROR);
        // A new call is refused; the open one finishes; then the connection closes.
        c.call(3, "/t/echo").await;
        let (_, id, p) = c.until(frame::RST_STREAM).await.unwrap();
        assert_eq!((id, code_in(&p)), (3, code::REFUSED_STREAM));
        seen.read_now.notify_one();
        let (_, id, p) = c.until(frame::DATA).await.unwrap();
        assert_eq!((id, &p[..]), (1, &b"3"[..]));
        let (flags, id, _) = c.until(frame::HEADERS).await.unwrap();
        assert_eq!((id, flags & frame::END_STREAM), (1, frame::END_STREAM));
        assert!(c.next().await.is_none(), "the connection stays open after its last call");
        served.recv().await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_call_finds_the_data_read_with_its_headers_and_a_dead_connection_resets_bodies() {
        let (addr, seen, _stop, mut served) = start(settings()).await;
        let mut c = Raw::connect(addr).await;
        // HEADERS and DATA in one write: the service is called after both are handled.
        let mut both =
            frame_bytes(frame::HEADERS, frame::END_HEADERS, 1, &request_block("/t/peek", &[]));
        both.extend(frame_bytes(frame::DATA, frame::END_STREAM, 1, b"hello"));
        c.tcp.write_all(&both).await.unwrap();
        let (_, id, p) = c.until(frame::DATA).await.unwrap();
        assert_eq!((id, &p[..]), (1, &b"ready:5"[..]));
        // A call whose body a task elsewhere reads, its request not ended: the connection
        // dies, and the task's read ends with a reset rather than waiting forever.
        c.send(frame::HEADERS, frame::END_HEADERS, 3, &request_block("/t/spawned", &[])).await;
        c.send(frame::DATA, 0, 3, b"part").await;
        c.send(frame::PING, 0, 0, &[2; 8]).await;
        c.until(frame::PING).await.unwrap();
        drop(c);
        served.recv().await.unwrap().unwrap();
        let rx = seen.spawned.lock().await.take().expect("the spawned call ran");
        let r =
            tokio::time::timeout(Duration::from_secs(10), rx).await.expect("the body never ended");
        assert!(matches!(r.unwrap(), Err(StreamReset(code::CANCEL))));
    }

    /// HEADERS (`block`) and a DATA frame (`flags`, `data`) on stream `id`, to send in one
    /// write.
    fn headers_and_data(id: u32, block: &[u8], flags: u8, data: &[u8]) -> Vec<u8> {
        let mut b = frame_bytes(frame::HEADERS, frame::END_HEADERS, id, block);
        b.extend(frame_bytes(frame::DATA, flags, id, data));
        b
    }

    /// A gRPC message: the prefix, then `FlushReply { persisted_lsn: lsn }`.
    fn grpc_message(lsn: u64) -> Vec<u8> {
        use prost::Message as _;
        let m = crate::pb::FlushReply { persisted_lsn: lsn }.encode_to_vec();
        let mut b = vec![0];
        b.extend_from_slice(&(m.len() as u32).to_be_bytes());
        b.extend(m);
        b
    }

    impl Raw {
        /// The frames the server sends until it answers a PING: everything it queued for
        /// what was sent before the PING (sent twice: a call's reply is queued after the
        /// frames read with it are handled, an answer to a PING among them included).
        async fn settled(&mut self) -> Vec<(u8, u8, u32, Vec<u8>)> {
            let mut seen = Vec::new();
            for ping in [[3u8; 8], [4; 8]] {
                self.send(frame::PING, 0, 0, &ping).await;
                loop {
                    let f = self.next().await.expect("the connection ended");
                    if f.0 == frame::PING && f.3 == ping {
                        break;
                    }
                    seen.push(f);
                }
            }
            seen
        }
    }

    /// A reply's HEADERS wait while the call's reader holds part of a message (the client
    /// sends its rest without them), then leave with the reply; when the message yields no
    /// reply, they leave once it is read: a client waiting for them before it sends more
    /// gets them.
    #[tokio::test]
    async fn reply_headers_wait_for_a_message_begun_but_never_for_more() {
        let (addr, _, _stop, _served) = start(settings()).await;
        let mut c = Raw::connect(addr).await;
        let block = request_block("/t/msgs", &[]);
        let on_stream = |fs: &[(u8, u8, u32, Vec<u8>)], id: u32| -> Vec<u8> {
            fs.iter().filter(|f| f.2 == id).map(|f| f.0).collect()
        };
        // HEADERS and the start of a message in one write (as clients send them), then
        // the rest of it: nothing of the reply before the rest.
        let m = grpc_message(300);
        c.tcp.write_all(&headers_and_data(1, &block, 0, &m[..3])).await.unwrap();
        let seen = c.settled().await;
        assert_eq!(on_stream(&seen, 1), Vec::<u8>::new(), "HEADERS held: {seen:?}");
        c.send(frame::DATA, 0, 1, &m[3..]).await;
        let seen = c.settled().await;
        assert_eq!(on_stream(&seen, 1), [frame::HEADERS, frame::DATA], "{seen:?}");
        let data = &seen.iter().find(|f| f.0 == frame::DATA).unwrap().3;
        assert_eq!(data, &m, "the reply echoes the message");
        // The message read, the request still open: no more HEADERS, the call goes on.
        c.send(frame::DATA, frame::END_STREAM, 1, &grpc_message(301)).await;
        let (flags, _, p) = c.until(frame::DATA).await.unwrap();
        assert_eq!((flags, p), (0, grpc_message(301)));
        // A message with no reply, sent in two parts: once it is whole and read, the
        // HEADERS leave though nothing else does (a client may wait for them to go on).
        let empty = grpc_message(0);
        c.tcp.write_all(&headers_and_data(3, &block, 0, &empty[..2])).await.unwrap();
        let seen = c.settled().await;
        assert_eq!(on_stream(&seen, 3), Vec::<u8>::new(), "HEADERS held: {seen:?}");
        c.send(frame::DATA, 0, 3, &empty[2..]).await;
        let (_, id, _) = c.until(frame::HEADERS).await.expect("the HEADERS after the message");
        assert_eq!(id, 3);
        // A call whose first message came whole with its HEADERS: answered at once.
        let both = headers_and_data(5, &block, frame::END_STREAM, &grpc_message(7));
        c.tcp.write_all(&both).await.unwrap();
        let seen = c.settled().await;
        assert_eq!(on_stream(&seen, 5), [frame::HEADERS, frame::DATA, frame::HEADERS]);
        // A call with no message yet: its HEADERS are not held (a client may wait for
        // them before it sends its first message, as tonic's client does).
        c.send(frame::HEADERS, frame::END_HEADERS, 7, &block).await;
        let seen = c.settled().await;
        assert_eq!(on_stream(&seen, 7), [frame::HEADERS], "{seen:?}");
    }

    /// HEADERS held for a reader that waits for the rest of a message leave when the
    /// reader is dropped (it waits no more), though the reply never comes.
    #[tokio::test]
    async fn held_reply_headers_leave_when_the_reader_is_dropped() {
        let (addr, seen, _stop, _served) = start(settings()).await;
        let mut c = Raw::connect(addr).await;
        let b = headers_and_data(1, &request_block("/t/dropmid", &[]), 0, &grpc_message(300)[..3]);
        c.tcp.write_all(&b).await.unwrap();
        let early = c.settled().await;
        assert!(early.iter().all(|f| f.2 != 1), "HEADERS held: {early:?}");
        let tell = seen.drop_reader.lock().unwrap().take().expect("the call ran");
        tell.send(()).unwrap();
        let (_, id, _) =
            c.until(frame::HEADERS).await.expect("the HEADERS once the reader is gone");
        assert_eq!(id, 1);
    }

    #[tokio::test]
    async fn rapid_resets_close_the_connection_with_enhance_your_calm() {
        // The configured limit holds (60 resets stay within the default's 1000).
        let s = ConnSettings { max_resets_per_s: 50, ..settings() };
        let (addr, _seen, _stop, _served) = start(s).await;
        let mut c = Raw::connect(addr).await;
        let mut burst = Vec::new();
        for i in 0..60 {
            let id = 1 + 2 * i;
            burst.extend(frame_bytes(
                frame::HEADERS,
                frame::END_HEADERS,
                id,
                &request_block("/t/hang", &[]),
            ));
            burst.extend(frame_bytes(frame::RST_STREAM, 0, id, &code::CANCEL.to_be_bytes()));
        }
        c.tcp.write_all(&burst).await.unwrap();
        assert_eq!(c.goaway_code().await, code::ENHANCE_YOUR_CALM);
    }

    /// A flood of SETTINGS changing INITIAL_WINDOW_SIZE back and forth while a call is open
    /// (each change a pass over every open stream) closes the connection like a flood of
    /// resets; the same value again costs nothing and counts nothing.
    #[tokio::test]
    async fn a_flood_of_window_size_changes_closes_the_connection() {
        let s = ConnSettings { max_resets_per_s: 50, ..settings() };
        let (addr, _seen, _stop, _served) = start(s).await;
        let setting = |v: u32| {
            let mut p = setting::INITIAL_WINDOW_SIZE.to_be_bytes().to_vec();
            p.extend_from_slice(&v.to_be_bytes());
            frame_bytes(frame::SETTINGS, 0, 0, &p)
        };
        let open = |c: &mut Vec<u8>| {
            c.extend(frame_bytes(
                frame::HEADERS,
                frame::END_HEADERS,
                1,
                &request_block("/t/hang", &[]),
            ));
        };
        // The same value a hundred times: served on.
        let mut c = Raw::connect(addr).await;
        let mut burst = Vec::new();
        open(&mut burst);
        for _ in 0..100 {
            burst.extend(setting(70_000));
        }
        burst.extend(frame_bytes(frame::PING, 0, 0, &[7; 8]));
        c.tcp.write_all(&burst).await.unwrap();
        let (_, id, payload) = c.until(frame::PING).await.expect("the connection lives");
        assert_eq!((id, payload), (0, vec![7; 8]));
        // Changed a hundred times: closed.
        let mut c = Raw::connect(addr).await;
        let mut burst = Vec::new();
        open(&mut burst);
        for i in 0..100u32 {
            burst.extend(setting(70_000 + i % 2));
        }
        c.tcp.write_all(&burst).await.unwrap();
        assert_eq!(c.goaway_code().await, code::ENHANCE_YOUR_CALM);
    }

    /// Requests refused for a header list past the limit count with the resets: a flood
    /// of them in one write (each a few bytes naming one big dynamic-table entry, each
    /// answered with a reply) closes the connection instead of queueing a reply apiece.
    #[tokio::test]
    async fn a_flood_of_overlong_header_lists_closes_the_connection() {
        let s = ConnSettings { max_resets_per_s: 50, ..settings() };
        let (addr, _seen, _stop, _served) = start(s).await;
        let mut c = Raw::connect(addr).await;
        let max = settings().max_header_list_bytes as usize;
        let mut burst = Vec::new();
        for i in 0..60u32 {
            let mut block = request_block("/t/echo", &[]);
            if i == 0 {
                // One entry of a third of the limit, then three references to it a request.
                block.push(0x40);
                encode_string(&mut block, b"x-big");
                encode_string(&mut block, &vec![b'v'; max / 3]);
            }
            block.extend([0xbe; 4]);
            burst.extend(frame_bytes(
                frame::HEADERS,
                frame::END_HEADERS | frame::END_STREAM,
                1 + 2 * i,
                &block,
            ));
        }
        c.tcp.write_all(&burst).await.unwrap();
        assert_eq!(c.goaway_code().await, code::ENHANCE_YOUR_CALM);
    }

    /// New streams refused past `max_concurrent_streams` count with the resets: a flood
    /// of them closes the connection instead of costing a decode and a reply apiece.
    #[tokio::test]
    async fn a_flood_of_refused_streams_closes_the_connection() {
        let s = ConnSettings { max_resets_per_s: 20, max_concurrent_streams: 0, ..settings() };
        let (addr, _seen, _stop, _served) = start(s).await;
        let mut c = Raw::connect(addr).await;
        let mut burst = Vec::new();
        for i in 0..40u32 {
            let block = request_block("/t/echo", &[]);
            let flags = frame::END_HEADERS | frame::END_STREAM;
            burst.extend(frame_bytes(frame::HEADERS, flags, 1 + 2 * i, &block));
        }
        c.tcp.write_all(&burst).await.unwrap();
        assert_eq!(c.goaway_code().await, code::ENHANCE_YOUR_CALM);
    }

    #[test]
    fn short_payloads_are_copied_together_and_slices_are_bounded_per_connection() {
        let held = std::sync::atomic::AtomicUsize::new(0);
        let mut st = RecvState::new(false);
        for _ in 0..100 {
            st.push(BytesMut::from(&b"x"[..]), &held, DEFAULT_MAX_HELD_SLICES);
        }
        // A hundred 1-byte frames: one copied chunk, no slice.
        assert_eq!((st.chunks.len(), held.load(Ordering::Relaxed)), (0, 0));
        st.push(BytesMut::from(&[7u8; 2000][..]), &held, DEFAULT_MAX_HELD_SLICES);
        assert_eq!((st.chunks.len(), held.load(Ordering::Relaxed)), (2, 1));
        assert_eq!(st.pop(&held).unwrap().len(), 100);
        assert_eq!(st.pop(&held).unwrap().len(), 2000);
        assert_eq!(held.load(Ordering::Relaxed), 0);
        // Past max_held_slices on the connection, long payloads are copied too.
        held.store(DEFAULT_MAX_HELD_SLICES, Ordering::Relaxed);
        st.push(BytesMut::from(&[7u8; 2000][..]), &held, DEFAULT_MAX_HELD_SLICES);
        assert_eq!((st.chunks.len(), st.tail.len()), (0, 2000));
        held.store(0, Ordering::Relaxed);
        st.push(BytesMut::from(&[8u8; 2000][..]), &held, DEFAULT_MAX_HELD_SLICES);
        assert_eq!(held.load(Ordering::Relaxed), 1);
        assert_eq!(st.clear(&held), 4000);
        assert_eq!(held.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn large_frames_read_into_larger_buffers() {
        let mut small = BytesMut::new();
        reserve_read(&mut small, false);
        assert!((READ_BUF_BYTES..LARGE_READ_BUF_BYTES).contains(&small.capacity()));
        let mut large = BytesMut::new();
        reserve_read(&mut large, true);
        assert!(large.capacity() >= LARGE_READ_BUF_BYTES);
        // Room enough left: no new buffer.
        let cap = large.capacity();
        large.extend_from_slice(&[1; 1024]);
        reserve_read(&mut large, true);
        assert_eq!(large.capacity(), cap);
    }

    #[test]
    fn integers_encode_across_their_prefix() {
        let mut out = Vec::new();
        encode_int(&mut out, 0, 7, 126);
        encode_int(&mut out, 0, 7, 127);
        encode_int(&mut out, 0, 7, 1337);
        assert_eq!(out, [126, 127, 0, 127, 0xba, 0x09]);
        // Encoded reply headers decode back (any value bytes, long values).
        let mut h = http::HeaderMap::new();
        h.insert("grpc-message", http::HeaderValue::from_bytes(&[b'x'; 300]).unwrap());
        h.insert("content-type", http::HeaderValue::from_static("application/grpc"));
        let mut block = Vec::new();
        encode_headers(&mut block, Some(http::StatusCode::NOT_FOUND), &h);
        let mut got = Vec::new();
        crate::hpack::Decoder::new(4096)
            .decode(&block, usize::MAX, |n, v| got.push((n.to_vec(), v.to_vec())))
            .unwrap();
        assert_eq!(got[0], (b":status".to_vec(), b"404".to_vec()));
        assert!(got.contains(&(b"grpc-message".to_vec(), vec![b'x'; 300])));
    }
}
