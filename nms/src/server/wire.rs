//! The NMS's HTTP/2 service: the vehicle's block calls (`Nms/Read`, `Nms/Write`,
//! `Nms/Stream`, `Nms/StreamBatches`) served by hand, every other call by tonic's routes.
//!
//! Requests are decoded without copying ([`Messages`]: a write's data is a slice of the
//! received DATA chunk until the cache copies it in). Their replies are encoded here rather than by tonic so that a read's block data
//! (a `Bytes` shared with the cache) is never copied: each reply's fields are encoded into
//! a small header buffer with the data field written last (protobuf allows fields in any
//! order), and the data follows as a chunk of its own ([`ChunkBuf`]). The bytes on the wire
//! decode to the same messages as tonic's encoding of them (the tests decode them back).
//! A hand-served call's `grpc-timeout` is its deadline, for a stream as for a unary call:
//! when it passes the call's work is dropped and the call ends with DEADLINE_EXCEEDED.
//! Calls routed to tonic have their response bounded by it, as tonic's server does.

use super::rpc::{batch_inbound, stream_inbound};
use super::Node;
use bytes::{BufMut as _, Bytes, BytesMut};
use futures::future::{BoxFuture, Either, FutureExt as _};
use futures::StreamExt as _;
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};
use prost::Message as _;
use std::convert::Infallible;
use std::sync::Arc;
use tonic::Status;
use wayside_proto::h2serve::{grpc_timeout, ChunkBuf, GrpcBody, Messages, ReplyStream};
use wayside_proto::pb;

/// `StreamReply.result.read`'s field number (nms.proto).
const STREAM_REPLY_READ: u32 = 2;
/// `ReadReply.data`'s field number.
const READ_REPLY_DATA: u32 = 2;
/// `StreamResults.results`' field number.
const STREAM_RESULTS_RESULTS: u32 = 1;

/// The 5-byte prefix of every gRPC message: not compressed, then the length.
const GRPC_PREFIX_BYTES: usize = 5;

/// One reply ready to encode: the reply with a read's data taken out, that data, the
/// encoded length of the read reply with its data put back (0 without data), and the
/// encoded length of the whole reply (data included).
struct Split {
    reply: pb::StreamReply,
    data: Bytes,
    read_len: usize,
    len: usize,
}

impl Split {
    fn new(mut reply: pb::StreamReply) -> Self {
        let data = match &mut reply.result {
            Some(pb::stream_reply::Result::Read(r)) => std::mem::take(&mut r.data),
            _ => Bytes::new(),
        };
        let (read_len, len) = match (&reply.result, data.is_empty()) {
            (Some(pb::stream_reply::Result::Read(r)), false) => {
                let read_len = Self::read_len(r, &data);
                let len = tag_len(reply.tag)
                    + key_len(STREAM_REPLY_READ)
                    + encoded_len_varint(read_len as u64)
                    + read_len;
                (read_len, len)
            }
            _ => (0, reply.encoded_len()),
        };
        Self { reply, data, read_len, len }
    }

    /// The encoded length of read reply `r` (its data taken out) with `data` put back.
    fn read_len(r: &pb::ReadReply, data: &Bytes) -> usize {
        r.encoded_len()
            + key_len(READ_REPLY_DATA)
            + encoded_len_varint(data.len() as u64)
            + data.len()
    }

    /// Encodes the reply: its fields into `hdr`, then (a read with data) the data's field
    /// key and length, and the data itself as a chunk of `out` after what `hdr` holds.
    fn put(self, hdr: &mut BytesMut, out: &mut ChunkBuf) {
        let r = match (self.reply.result, self.data.is_empty()) {
            (Some(pb::stream_reply::Result::Read(r)), false) => r,
            (result, _) => {
                let reply = pb::StreamReply { tag: self.reply.tag, result };
                reply.encode(hdr).expect("a BytesMut grows");
                return;
            }
        };
        if self.reply.tag != 0 {
            encode_key(1, WireType::Varint, hdr);
            encode_varint(self.reply.tag, hdr);
        }
        encode_key(STREAM_REPLY_READ, WireType::LengthDelimited, hdr);
        encode_varint(self.read_len as u64, hdr);
        put_read(&r, self.data, hdr, out);
    }
}

/// Encodes read reply `r` (its data taken out) with `data` last: the fields into `hdr`,
/// the data as a chunk of `out` after what `hdr` holds.
fn put_read(r: &pb::ReadReply, data: Bytes, hdr: &mut BytesMut, out: &mut ChunkBuf) {
    r.encode(hdr).expect("a BytesMut grows");
    if data.is_empty() {
        return;
    }
    encode_key(READ_REPLY_DATA, WireType::LengthDelimited, hdr);
    encode_varint(data.len() as u64, hdr);
    out.push(hdr.split().freeze());
    out.push(data);
}

/// A unary `Read`'s reply: one message, the block uncopied.
pub(super) fn encode_read(mut r: pb::ReadReply, max: usize) -> Result<ChunkBuf, Status> {
    let data = std::mem::take(&mut r.data);
    let len = if data.is_empty() { r.encoded_len() } else { Split::read_len(&r, &data) };
    check_len(len, max)?;
    let mut hdr = header_buffer(1);
    let mut out = ChunkBuf::with_capacity(3);
    put_prefix(&mut hdr, len);
    put_read(&r, data, &mut hdr, &mut out);
    out.push(hdr.freeze());
    Ok(out)
}

/// A unary reply of a small message (no block data).
fn encode_small(m: &impl prost::Message, max: usize) -> Result<ChunkBuf, Status> {
    let len = m.encoded_len();
    check_len(len, max)?;
    let mut hdr = BytesMut::with_capacity(GRPC_PREFIX_BYTES + len);
    put_prefix(&mut hdr, len);
    m.encode(&mut hdr).expect("a BytesMut grows");
    let mut out = ChunkBuf::with_capacity(1);
    out.push(hdr.freeze());
    Ok(out)
}

/// `StreamReply.tag`'s encoded length (proto3: a zero is not sent).
fn tag_len(tag: u64) -> usize {
    if tag == 0 {
        0
    } else {
        key_len(1) + encoded_len_varint(tag)
    }
}

/// A message of `len` bytes longer than `max` cannot be sent (as tonic's encoder says).
fn check_len(len: usize, max: usize) -> Result<(), Status> {
    if len > max || u32::try_from(len).is_err() {
        return Err(Status::out_of_range(format!(
            "a reply of {len} bytes exceeds max_message_size_bytes ({max})"
        )));
    }
    Ok(())
}

fn put_prefix(hdr: &mut BytesMut, len: usize) {
    hdr.put_u8(0);
    hdr.put_u32(len as u32);
}

/// A header buffer for `n` replies (fields, keys and lengths: a few dozen bytes each).
fn header_buffer(n: usize) -> BytesMut {
    BytesMut::with_capacity(48 * n + GRPC_PREFIX_BYTES)
}

/// `Stream`'s replies: one gRPC message each, all in one DATA frame.
pub(super) fn encode_replies(
    replies: Vec<pb::StreamReply>,
    max: usize,
) -> Result<ChunkBuf, Status> {
    let mut hdr = header_buffer(replies.len() * 2);
    let mut out = ChunkBuf::with_capacity(2 * replies.len() + 1);
    for r in replies {
        let s = Split::new(r);
        check_len(s.len, max)?;
        put_prefix(&mut hdr, s.len);
        s.put(&mut hdr, &mut out);
    }
    out.push(hdr.freeze());
    Ok(out)
}

/// `StreamBatches`' reply: one `StreamResults` message, or several when the replies
/// together pass `max` (each message within it; the client gathers a batch's replies by
/// tag). Only a single reply past `max` is refused.
pub(super) fn encode_results(
    replies: Vec<pb::StreamReply>,
    max: usize,
) -> Result<ChunkBuf, Status> {
    let n = replies.len();
    // (message length, its replies)
    let mut messages: Vec<(usize, Vec<Split>)> = vec![(0, Vec::new())];
    for r in replies {
        let s = Split::new(r);
        let field = key_len(STREAM_RESULTS_RESULTS) + encoded_len_varint(s.len as u64) + s.len;
        check_len(field, max)?;
        let last = messages.last_mut().expect("never empty");
        if !last.1.is_empty() && last.0 + field > max {
            messages.push((field, vec![s]));
        } else {
            last.0 += field;
            last.1.push(s);
        }
    }
    let mut hdr = header_buffer(n + messages.len());
    let mut out = ChunkBuf::with_capacity(2 * n + 1);
    for (len, splits) in messages {
        put_prefix(&mut hdr, len);
        for s in splits {
            encode_key(STREAM_RESULTS_RESULTS, WireType::LengthDelimited, &mut hdr);
            encode_varint(s.len as u64, &mut hdr);
            s.put(&mut hdr, &mut out);
        }
    }
    out.push(hdr.freeze());
    Ok(out)
}

/// A call's request compression, which must be none (wayside clients never compress).
fn check_encoding(headers: &http::HeaderMap) -> Result<(), Status> {
    match headers.get("grpc-encoding") {
        None => Ok(()),
        Some(v) if v == "identity" => Ok(()),
        Some(v) => Err(Status::unimplemented(format!(
            "request compression {:?} is not supported (send uncompressed messages)",
            v.to_str().unwrap_or("(not text)")
        ))),
    }
}

/// The calls served here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Read,
    Write,
    Stream,
    StreamBatches,
}

/// The one request message of a unary call, taken once the request has ended: a missing
/// message, a second one, or a request that ends inside one is INTERNAL, and the call does
/// not run. (tonic's server also reads the request to its end before the call runs, and
/// refuses a cut message so; it ignores a second one. Answered at its first message, a
/// unary write followed by a cut message was applied and answered OK.) Clients end the
/// request with the message's DATA frame or just after it, so this seldom waits.
async fn unary_request<M: prost::Message + Default + Send + 'static>(
    mut inbound: Messages<M>,
) -> Result<M, Status> {
    let m = inbound
        .next()
        .await
        .unwrap_or_else(|| Err(Status::internal("Missing request message.")))?;
    match inbound.next().await {
        None => Ok(m),
        Some(Err(s)) => Err(s),
        Some(Ok(_)) => {
            Err(Status::internal("a unary call's request carries more than one message"))
        }
    }
}

impl Node {
    /// The request messages of a call (`max_message_size_bytes`, `request_copy_below_bytes`).
    fn messages<M: prost::Message + Default>(
        &self,
        body: wayside_proto::h2conn::RecvBody,
    ) -> Messages<M> {
        Messages::new(body, self.cfg.max_message_size_bytes)
            .copy_below(self.cfg.request_copy_below_bytes)
    }

    /// Answers a unary `Read` or `Write` call: its one reply (a read's block uncopied),
    /// then its trailers.
    fn unary_call(
        self: &Arc<Self>,
        req: http::Request<wayside_proto::h2conn::RecvBody>,
        call: Call,
    ) -> GrpcBody {
        let max = self.cfg.max_message_size_bytes;
        let node = self.clone();
        let checked = check_encoding(req.headers());
        let timeout = grpc_timeout(req.headers());
        let body = req.into_body();
        let counted = self.clone();
        let reply = async move {
            checked?;
            if call == Call::Read {
                let r = unary_request::<pb::ReadRequest>(node.messages(body)).await?;
                encode_read(node.read_call(r).await?, max)
            } else {
                let r = unary_request::<pb::WriteRequest>(node.messages(body)).await?;
                encode_small(&node.write_call(r).await?, max)
            }
        };
        counted.reply_body(Box::pin(futures::stream::once(reply)), timeout)
    }

    /// A call's reply body, each error reply counted in `calls_failed`.
    fn reply_body(
        self: Arc<Self>,
        replies: ReplyStream,
        timeout: Option<std::time::Duration>,
    ) -> GrpcBody {
        let counted: ReplyStream = Box::pin(replies.inspect(move |r| {
            if r.is_err() {
                self.calls_failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }));
        GrpcBody::replies(counted, timeout)
    }

    /// Answers a `Stream` (`batches`: `StreamBatches`) call: its replies, encoded as
    /// [`encode_replies`] (or [`encode_results`]), then its trailers.
    fn stream_call(
        &self,
        req: http::Request<wayside_proto::h2conn::RecvBody>,
        batches: bool,
    ) -> GrpcBody {
        let max = self.cfg.max_message_size_bytes;
        let timeout = grpc_timeout(req.headers());
        // An operation refused inside a stream counts as a failed call too.
        let node = self.self_arc();
        let count = move |rs: &Vec<pb::StreamReply>| {
            let failed = rs
                .iter()
                .filter(|r| matches!(r.result, Some(pb::stream_reply::Result::Error(_))))
                .count();
            if failed > 0 {
                node.calls_failed.fetch_add(failed as u64, std::sync::atomic::Ordering::Relaxed);
            }
        };
        let replies: ReplyStream = match check_encoding(req.headers()) {
            Err(s) => Box::pin(futures::stream::iter([Err(s)])),
            Ok(()) if batches => {
                let inbound = self.messages::<pb::StreamBatch>(req.into_body());
                let out = self.serve_ops(batch_inbound(inbound, self.cfg.max_stream_batch_ops));
                Box::pin(out.map(move |r| {
                    r.and_then(|rs| {
                        count(&rs);
                        encode_results(rs, max)
                    })
                }))
            }
            Ok(()) => {
                let inbound = self.messages::<pb::StreamRequest>(req.into_body());
                let out = self.serve_ops(stream_inbound(inbound));
                Box::pin(out.map(move |r| {
                    r.and_then(|rs| {
                        count(&rs);
                        encode_replies(rs, max)
                    })
                }))
            }
        };
        self.self_arc().reply_body(replies, timeout)
    }
}

/// The NMS's HTTP/2 service (see the module docs).
#[derive(Clone)]
pub(super) struct NmsHttp {
    node: Arc<Node>,
    routes: tonic::service::Routes,
}

impl NmsHttp {
    pub(super) fn new(node: Arc<Node>, routes: tonic::service::Routes) -> Self {
        Self { node, routes }
    }
}

/// The method a path names on the vehicle service (`/wayside.v1.Nms/Stream`: `Stream`).
fn nms_method(path: &str) -> Option<&str> {
    path.strip_prefix('/')?.strip_prefix(pb::nms_server::SERVICE_NAME)?.strip_prefix('/')
}

type Reply = Result<http::Response<GrpcBody>, Infallible>;

impl hyper::service::Service<http::Request<wayside_proto::h2conn::RecvBody>> for NmsHttp {
    type Response = http::Response<GrpcBody>;
    type Error = Infallible;
    type Future = Either<std::future::Ready<Reply>, BoxFuture<'static, Reply>>;

    fn call(&self, req: http::Request<wayside_proto::h2conn::RecvBody>) -> Self::Future {
        let call = match nms_method(req.uri().path()) {
            Some("Read") => Call::Read,
            Some("Write") => Call::Write,
            Some("Stream") => Call::Stream,
            Some("StreamBatches") => Call::StreamBatches,
            _ => {
                let mut routes = self.routes.clone();
                let timeout = grpc_timeout(req.headers());
                return Either::Right(
                    async move {
                        use tonic::codegen::Service;
                        type Incoming = http::Request<wayside_proto::h2conn::RecvBody>;
                        let call = async {
                            std::future::poll_fn(|cx| {
                                <tonic::service::Routes as Service<Incoming>>::poll_ready(
                                    &mut routes,
                                    cx,
                                )
                            })
                            .await?;
                            routes.call(req).await
                        };
                        // tonic's server bounds the call's response (not a stream's
                        // messages) by its grpc-timeout; so does this.
                        let r = match timeout {
                            None => call.await?,
                            Some(t) => match tokio::time::timeout(t, call).await {
                                Ok(r) => r?,
                                Err(_) => Status::deadline_exceeded(
                                    "the call's grpc-timeout passed before it answered",
                                )
                                .into_http(),
                            },
                        };
                        Ok(r.map(GrpcBody::tonic))
                    }
                    .boxed(),
                );
            }
        };
        let body = match call {
            Call::Read | Call::Write => self.node.unary_call(req, call),
            Call::Stream => self.node.stream_call(req, false),
            Call::StreamBatches => self.node.stream_call(req, true),
        };
        let mut r = http::Response::new(body);
        r.headers_mut()
            .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
        Either::Left(std::future::ready(Ok(r)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Buf as _;

    fn read(tag: u64, data: &'static [u8], found: bool) -> pb::StreamReply {
        pb::StreamReply {
            tag,
            result: Some(pb::stream_reply::Result::Read(pb::ReadReply {
                found,
                data: Bytes::from_static(data),
                version: tag.wrapping_add(7),
                persisted_lsn: 1 << (tag % 40),
            })),
        }
    }

    /// Replies of every kind, tags zero and large, data empty and large.
    fn replies() -> Vec<pb::StreamReply> {
        static BLOCK: [u8; 4096] = [0xa5; 4096];
        vec![
            read(1, &BLOCK, true),
            read(0, b"x", true),
            read(300, b"", false),
            read(u64::MAX, &BLOCK[..200], true),
            pb::StreamReply {
                tag: 5,
                result: Some(pb::stream_reply::Result::Write(pb::WriteReply {
                    lsn: 9,
                    version: 2,
                    persisted_lsn: 8,
                    duplicate: true,
                })),
            },
            pb::StreamReply {
                tag: 6,
                result: Some(pb::stream_reply::Result::Flush(pb::FlushReply { persisted_lsn: 3 })),
            },
            pb::StreamReply {
                tag: 8,
                result: Some(pb::stream_reply::Result::Error(pb::StreamError {
                    code: 5,
                    message: "no such volume".into(),
                    ..Default::default()
                })),
            },
            pb::StreamReply { tag: 9, result: None },
        ]
    }

    /// Splits `b` into gRPC messages, checking each prefix.
    fn messages(mut b: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while !b.is_empty() {
            assert_eq!(b.get_u8(), 0, "not compressed");
            let len = b.get_u32() as usize;
            out.push(b[..len].to_vec());
            b = &b[len..];
        }
        out
    }

    #[test]
    fn stream_replies_decode_to_what_was_encoded_with_the_data_uncopied() {
        let sent = replies();
        let buf = encode_replies(sent.clone(), 1 << 20).expect("encodes");
        let decoded: Vec<pb::StreamReply> = messages(&buf.to_vec())
            .iter()
            .map(|m| pb::StreamReply::decode(&m[..]).expect("decodes"))
            .collect();
        assert_eq!(decoded, sent);
        // The 4096- and 200-byte blocks are chunks of their own; so is the 1-byte one.
        assert_eq!(buf.chunk_count(), 7, "3 data chunks, each after a header chunk, + the tail");
    }

    #[test]
    fn a_batch_reply_decodes_to_the_results_encoded() {
        let sent = replies();
        let buf = encode_results(sent.clone(), 1 << 20).expect("encodes");
        let bytes = buf.to_vec();
        let msgs = messages(&bytes);
        assert_eq!(msgs.len(), 1, "one message per batch");
        let decoded = pb::StreamResults::decode(&msgs[0][..]).expect("decodes");
        assert_eq!(decoded.results, sent);
        // The same bytes as prost's own encoding, but for field order: same length.
        assert_eq!(msgs[0].len(), pb::StreamResults { results: sent }.encoded_len());
    }

    #[test]
    fn unary_replies_decode_to_what_was_encoded() {
        for r in replies() {
            if let Some(pb::stream_reply::Result::Read(read)) = r.result {
                let buf = encode_read(read.clone(), 1 << 20).expect("encodes");
                let msgs = messages(&buf.to_vec());
                assert_eq!(msgs.len(), 1);
                assert_eq!(pb::ReadReply::decode(&msgs[0][..]).expect("decodes"), read);
                assert_eq!(msgs[0].len(), read.encoded_len());
                let chunks = if read.data.is_empty() { 1 } else { 2 };
                assert_eq!(buf.chunk_count(), chunks, "prefix and fields, then the data");
            }
        }
        let w = pb::WriteReply { lsn: 300, version: 2, persisted_lsn: 1 << 40, duplicate: true };
        let msgs = messages(&encode_small(&w, 64).expect("encodes").to_vec());
        assert_eq!(pb::WriteReply::decode(&msgs[0][..]).expect("decodes"), w);
        assert_eq!(encode_small(&w, 4).expect_err("too long").code(), tonic::Code::OutOfRange);
    }

    #[test]
    fn an_empty_batch_is_an_empty_message() {
        let buf = encode_results(Vec::new(), 16).expect("encodes");
        assert_eq!(buf.to_vec(), [0, 0, 0, 0, 0]);
    }

    /// Replies that together pass the message limit go in several messages, each within
    /// it, in order.
    #[test]
    fn a_batch_reply_past_the_limit_is_split_into_messages() {
        let sent = replies();
        let one = encode_results(sent.clone(), 1 << 20).expect("encodes").to_vec();
        let max = messages(&one)[0].len() - 1;
        let bytes = encode_results(sent.clone(), max).expect("encodes").to_vec();
        let msgs = messages(&bytes);
        assert!(msgs.len() >= 2, "split");
        let mut got = Vec::new();
        for m in msgs {
            assert!(m.len() <= max, "{} > {max}", m.len());
            got.extend(pb::StreamResults::decode(&m[..]).expect("decodes").results);
        }
        assert_eq!(got, sent);
    }

    #[test]
    fn a_reply_over_the_message_limit_is_refused() {
        let sent = replies();
        let e = encode_results(sent.clone(), 4096).expect_err("over the limit");
        assert_eq!(e.code(), tonic::Code::OutOfRange);
        assert!(e.message().contains("max_message_size_bytes (4096)"), "{}", e.message());
        let e = encode_replies(sent, 4096).expect_err("the 4 KiB read is over it");
        assert_eq!(e.code(), tonic::Code::OutOfRange);
    }

    #[test]
    fn paths_name_the_vehicle_services_methods() {
        assert_eq!(nms_method("/wayside.v1.Nms/Stream"), Some("Stream"));
        assert_eq!(nms_method("/wayside.v1.Nms/StreamBatches"), Some("StreamBatches"));
        assert_eq!(nms_method("/wayside.v1.NmsAdmin/Shutdown"), None);
        assert_eq!(nms_method("/wayside.v1.Nms"), None);
    }

    #[test]
    fn compressed_requests_are_refused_as_unimplemented() {
        let mut h = http::HeaderMap::new();
        assert!(check_encoding(&h).is_ok());
        h.insert("grpc-encoding", http::HeaderValue::from_static("identity"));
        assert!(check_encoding(&h).is_ok());
        h.insert("grpc-encoding", http::HeaderValue::from_static("gzip"));
        assert_eq!(check_encoding(&h).expect_err("gzip").code(), tonic::Code::Unimplemented);
    }
}
