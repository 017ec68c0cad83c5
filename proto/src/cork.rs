//! [`CorkedIo`]: a socket wrapper that lets the frames one connection task produces in
//! one turn leave in one system call.
//!
//! h2 keeps at most one large DATA payload queued for a vectored write; the frame after
//! it (a unary reply's trailers, the next stream's reply) is encoded only once that write
//! is done. A 4 KiB unary reply so cost two `writev`s, and on loopback every `writev` is
//! a whole TCP send plus the peer's wake-up. `CorkedIo` copies what h2 writes into a
//! buffer and, at the first flush, yields the task once (it wakes itself and returns
//! `Pending`), so h2 encodes whatever else is ready; the second flush writes it all with
//! one `write`. It is TCP_CORK in user space, bounded two ways:
//!
//! - **time**: data waits for one yield of its own task, and one more after each DATA
//!   payload the task adds (see [`CHAINED_PAYLOAD_BYTES`]: h2 flushes after every payload
//!   it chains, so a reply of several DATA frames would otherwise leave in one `write` per
//!   frame; a 64 KiB batch reply to a peer with 16 KiB frames cost 4-5, its trailers one
//!   more), never for the peer;
//! - **memory**: more than [`CORK_MAX_BYTES`] pending is written at once, and a write
//!   larger than that goes straight through (after what is pending).
//!
//! A vectored write of at least [`WRITE_THROUGH_BYTES`] (h2's frame header chained with a
//! large DATA payload: a 64 KiB batch reply to a peer with large frames, a migration
//! frame) is not copied: it leaves at once, behind what is pending, in one vectored call.
//! Copying it cost about as much CPU as encoding the reply (6% of a batched-read run's
//! serving thread).

use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Most bytes a [`CorkedIo`] holds back before writing them out, in bytes.
pub const CORK_MAX_BYTES: usize = 256 * 1024;

/// A vectored write of at least this many bytes goes to the socket at once, uncopied,
/// with what is pending before it (when the socket takes vectored writes), in bytes.
pub const WRITE_THROUGH_BYTES: usize = 32 * 1024;

/// Most pieces of a caller's vectored write passed on in one call, the rest left for the
/// caller's next call. h2 passes its buffer and the chained payload's chunks: one for a
/// payload tonic encoded, two per reply for a hand-encoded one (its fields, then the block
/// shared with the cache: [`crate::h2serve::ChunkBuf`]), 64 at most; [`crate::h2conn`]
/// passes a whole turn's replies, two pieces per block ([`crate::h2conn::WRITE_PIECES`]).
const WRITE_THROUGH_PIECES: usize = crate::h2conn::WRITE_PIECES;

/// A write of more than this many bytes, or of more than one piece (h2's buffer with a
/// DATA payload chained to it), is taken for a DATA payload, and the flush after it yields
/// once more. (h2 chains payloads of 256 bytes and more when the writer is vectored, after
/// copying their first bytes into its buffer, so the chained piece may be short.)
const CHAINED_PAYLOAD_BYTES: usize = 256;

/// A connection whose small writes are gathered until the task yields once (see the
/// module docs).
#[derive(Debug)]
pub struct CorkedIo<T> {
    inner: T,
    /// Bytes accepted from the caller and not yet written to `inner`...
    buf: Vec<u8>,
    /// ...from this offset (a partial write leaves the rest).
    sent: usize,
    /// The task has yielded once since the first flush found bytes pending.
    yielded: bool,
    /// The last write ended with a large payload: more frames may follow at once.
    chained: bool,
    /// A flush writes at once, without yielding first (the writer gathers its frames).
    at_once: bool,
    /// The server's connection slot this connection holds (see
    /// [`crate::server::ConnectionLimit`]): given back when the connection is dropped.
    slot: Option<crate::server::ConnectionSlot>,
    /// Closes a connection that sends nothing for too long ([`CorkedIo::closed_when_silent`]).
    silence: Option<Silence>,
}

/// The silence limit of a [`CorkedIo`]: when its peer last sent a byte, and the timer.
#[derive(Debug)]
struct Silence {
    limit: std::time::Duration,
    last_heard: tokio::time::Instant,
    timer: Pin<Box<tokio::time::Sleep>>,
}

impl<T> CorkedIo<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            buf: Vec::new(),
            sent: 0,
            yielded: false,
            chained: false,
            at_once: false,
            slot: None,
            silence: None,
        }
    }

    /// Reads fail with `TimedOut` once the peer has sent nothing for `limit` (counted from
    /// now, then from each byte received), so the server drops the connection and gives
    /// its slot back. A caller that connects and never speaks (no HTTP/2 preface, or
    /// silence after its TLS handshake) would otherwise hold a slot for good: HTTP/2
    /// keepalive PINGs start only once the preface is in, and TCP keepalive is answered
    /// by the caller's kernel. A live peer answers the server's PINGs, so a limit above
    /// the keepalive interval plus its timeout never closes one.
    pub fn closed_when_silent(mut self, limit: std::time::Duration) -> Self {
        let last_heard = tokio::time::Instant::now();
        let timer = Box::pin(tokio::time::sleep_until(last_heard + limit));
        self.silence = Some(Silence { limit, last_heard, timer });
        self
    }

    /// This connection holds `slot` of its server's connection limit until it is dropped.
    pub fn holding(mut self, slot: crate::server::ConnectionSlot) -> Self {
        self.slot = Some(slot);
        self
    }

    /// This connection's writer gathers each turn's frames itself (the lean HTTP/2 server,
    /// [`crate::h2conn`]): a flush writes what is pending at once, without yielding first.
    /// Writes are still gathered until the flush (a TLS stream writes each record apart).
    pub fn flush_at_once(mut self) -> Self {
        self.at_once = true;
        self
    }

    pub fn get_ref(&self) -> &T {
        &self.inner
    }

    fn pending(&self) -> usize {
        self.buf.len() - self.sent
    }
}

impl<T: AsyncWrite + Unpin> CorkedIo<T> {
    /// Writes out everything pending.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.buf.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.buf[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.buf.clear();
        self.sent = 0;
        self.yielded = false;
        self.chained = false;
        Poll::Ready(Ok(()))
    }

    /// Writes what is pending and then `bufs`, without copying `bufs`, in as few vectored
    /// calls as the socket allows; returns how many of `bufs`' bytes it took (at least 1).
    fn poll_write_through(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let k = bufs.len().min(WRITE_THROUGH_PIECES);
        loop {
            let pending = self.pending();
            let n = if pending == 0 {
                ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, &bufs[..k]))?
            } else {
                let mut all = [io::IoSlice::new(&[]); WRITE_THROUGH_PIECES + 1];
                all[0] = io::IoSlice::new(&self.buf[self.sent..]);
                all[1..=k].copy_from_slice(&bufs[..k]);
                ready!(Pin::new(&mut self.inner).poll_write_vectored(cx, &all[..=k]))?
            };
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            if n < pending {
                self.sent += n;
                continue;
            }
            if pending > 0 {
                self.buf.clear();
                self.sent = 0;
                self.yielded = false;
                self.chained = false;
            }
            if n > pending {
                return Poll::Ready(Ok(n - pending));
            }
        }
    }

    /// Takes `len` more bytes: `Ok(true)` when they should be copied into the buffer,
    /// `Ok(false)` when they are too large and go straight to `inner` (nothing pending).
    fn poll_room(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<bool>> {
        if self.pending() + len > CORK_MAX_BYTES {
            ready!(self.poll_drain(cx))?;
        }
        Poll::Ready(Ok(len <= CORK_MAX_BYTES))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CorkedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        if !ready!(me.poll_room(cx, data.len()))? {
            return Pin::new(&mut me.inner).poll_write(cx, data);
        }
        me.buf.extend_from_slice(data);
        me.chained = data.len() > CHAINED_PAYLOAD_BYTES;
        Poll::Ready(Ok(data.len()))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        let len = bufs.iter().map(|b| b.len()).sum();
        if len >= WRITE_THROUGH_BYTES && me.inner.is_write_vectored() {
            return me.poll_write_through(cx, bufs);
        }
        if !ready!(me.poll_room(cx, len))? {
            return Pin::new(&mut me.inner).poll_write_vectored(cx, bufs);
        }
        for b in bufs {
            me.buf.extend_from_slice(b);
        }
        me.chained =
            bufs.iter().filter(|b| !b.is_empty()).count() > 1 || len > CHAINED_PAYLOAD_BYTES;
        Poll::Ready(Ok(len))
    }

    /// Every write but a large vectored one is taken whole into the buffer, so it costs no
    /// system call (h2 chains large DATA payloads only for vectored writers).
    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if me.pending() > 0 {
            if !me.at_once && (!me.yielded || me.chained) {
                // Let the task's other ready frames join these: it is polled again at
                // once (it woke itself), and the flush that finds no new payload writes
                // everything.
                me.yielded = true;
                me.chained = false;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            ready!(me.poll_drain(cx))?;
        }
        Pin::new(&mut me.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        ready!(me.poll_drain(cx))?;
        Pin::new(&mut me.inner).poll_shutdown(cx)
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for CorkedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut me.inner).poll_read(cx, buf);
        let Some(s) = me.silence.as_mut() else { return r };
        match r {
            Poll::Ready(Ok(())) if buf.filled().len() > before => {
                s.last_heard = tokio::time::Instant::now();
                Poll::Ready(Ok(()))
            }
            Poll::Pending => loop {
                if s.timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                let due = s.last_heard + s.limit;
                if due <= tokio::time::Instant::now() {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("the peer sent nothing for {:?}", s.limit),
                    )));
                }
                s.timer.as_mut().reset(due);
            },
            r => r,
        }
    }
}

impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected for CorkedIo<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::task::Wake;
    use tokio::io::AsyncWriteExt as _;

    /// A writer that records each write call.
    #[derive(Default)]
    struct Calls {
        writes: Vec<Vec<u8>>,
        /// Accept at most this many bytes per call (0: all).
        limit: usize,
        /// Takes vectored writes whole (as a socket does); otherwise only their first piece.
        vectored: bool,
    }

    impl AsyncWrite for Calls {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            let n = if self.limit == 0 { data.len() } else { data.len().min(self.limit) };
            self.get_mut().writes.push(data[..n].to_vec());
            Poll::Ready(Ok(n))
        }
        fn poll_write_vectored(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            if !self.vectored {
                let first = bufs.iter().find(|b| !b.is_empty()).map_or(&[][..], |b| &**b);
                return self.poll_write(cx, first);
            }
            let all: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            self.poll_write(cx, &all)
        }
        fn is_write_vectored(&self) -> bool {
            self.vectored
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    struct Count(std::sync::atomic::AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// A waker that counts its wakes.
    fn counting_waker() -> (Arc<Count>, std::task::Waker) {
        let wakes = Arc::new(Count(0.into()));
        (wakes.clone(), std::task::Waker::from(wakes))
    }

    #[test]
    fn writes_between_the_first_flush_and_the_second_leave_in_one_call() {
        let (wakes, waker) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        let mut io = CorkedIo::new(Calls::default());
        let mut p = Pin::new(&mut io);
        assert!(matches!(p.as_mut().poll_write(&mut cx, b"head"), Poll::Ready(Ok(4))));
        let v = [io::IoSlice::new(b"da"), io::IoSlice::new(b"ta")];
        assert!(matches!(p.as_mut().poll_write_vectored(&mut cx, &v), Poll::Ready(Ok(4))));
        // First flush: nothing written yet, the task is woken to come back.
        assert!(p.as_mut().poll_flush(&mut cx).is_pending());
        assert_eq!(wakes.0.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(p.as_ref().get_ref().get_ref().writes.is_empty());
        assert!(matches!(p.as_mut().poll_write(&mut cx, b"trailers"), Poll::Ready(Ok(8))));
        // Second flush: one write of everything.
        assert!(matches!(p.as_mut().poll_flush(&mut cx), Poll::Ready(Ok(()))));
        assert_eq!(io.get_ref().writes, vec![b"headdatatrailers".to_vec()]);
        // Nothing pending: a flush is immediate, and the next burst yields once again.
        let mut p = Pin::new(&mut io);
        assert!(matches!(p.as_mut().poll_flush(&mut cx), Poll::Ready(Ok(()))));
        assert!(matches!(p.as_mut().poll_write(&mut cx, b"x"), Poll::Ready(Ok(1))));
        assert!(p.as_mut().poll_flush(&mut cx).is_pending());
        assert!(matches!(p.as_mut().poll_flush(&mut cx), Poll::Ready(Ok(()))));
        assert_eq!(io.get_ref().writes.len(), 2);
    }

    #[test]
    fn a_reply_of_several_large_data_frames_leaves_in_one_write() {
        let (wakes, waker) = counting_waker();
        let mut cx = Context::from_waker(&waker);
        let mut io = CorkedIo::new(Calls::default());
        let mut p = Pin::new(&mut io);
        let payload = vec![7u8; 16 * 1024];
        // As h2 does: a frame header chained with a large payload, then a flush, per frame.
        for frame in 0..4u8 {
            let header = [frame; 9];
            let v = [io::IoSlice::new(&header), io::IoSlice::new(&payload)];
            assert!(matches!(p.as_mut().poll_write_vectored(&mut cx, &v), Poll::Ready(Ok(_))));
            assert!(p.as_mut().poll_flush(&mut cx).is_pending(), "frame {frame} yields");
        }
        assert!(p.as_ref().get_ref().get_ref().writes.is_empty());
        // The last frame's payload is short; h2 still hands it over chained to its buffer.
        let (head, tail) = (vec![8u8; 256], vec![8u8; 110]);
        let v = [io::IoSlice::new(&head), io::IoSlice::new(&tail)];
        assert!(matches!(p.as_mut().poll_write_vectored(&mut cx, &v), Poll::Ready(Ok(366))));
        assert!(p.as_mut().poll_flush(&mut cx).is_pending(), "the last frame yields too");
        // Small frames (trailers) do not make the flush after them wait again...
        assert!(matches!(p.as_mut().poll_write(&mut cx, b"trailers"), Poll::Ready(Ok(8))));
        assert!(matches!(p.as_mut().poll_flush(&mut cx), Poll::Ready(Ok(()))));
        assert_eq!(wakes.0.load(std::sync::atomic::Ordering::SeqCst), 5);
        let writes = &io.get_ref().writes;
        assert_eq!(writes.len(), 1, "one write for the whole reply");
        assert_eq!(writes[0].len(), 4 * (9 + payload.len()) + 366 + 8);
        // ...and a flush with nothing new since a yield writes at once.
        let mut p = Pin::new(&mut io);
        let v = [io::IoSlice::new(&payload)];
        assert!(matches!(p.as_mut().poll_write_vectored(&mut cx, &v), Poll::Ready(Ok(_))));
        assert!(p.as_mut().poll_flush(&mut cx).is_pending());
        assert!(matches!(p.as_mut().poll_flush(&mut cx), Poll::Ready(Ok(()))));
        assert_eq!(io.get_ref().writes.len(), 2);
    }

    #[test]
    fn more_than_the_limit_is_written_at_once_and_partial_writes_resume() {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut io = CorkedIo::new(Calls { limit: 100_000, ..Default::default() });
        let mut p = Pin::new(&mut io);
        let small = vec![1u8; CORK_MAX_BYTES - 10];
        assert!(matches!(p.as_mut().poll_write(&mut cx, &small), Poll::Ready(Ok(_))));
        assert!(p.as_ref().get_ref().get_ref().writes.is_empty());
        // 20 more would pass the limit: what is pending is written first (in pieces).
        assert!(matches!(p.as_mut().poll_write(&mut cx, &[2u8; 20]), Poll::Ready(Ok(20))));
        let written: usize = p.as_ref().get_ref().get_ref().writes.iter().map(Vec::len).sum();
        assert_eq!(written, small.len());
        // A write over the limit goes straight through once the 20 bytes are out.
        let big = vec![3u8; CORK_MAX_BYTES + 1];
        let n = match p.as_mut().poll_write(&mut cx, &big) {
            Poll::Ready(Ok(n)) => n,
            other => panic!("{other:?}"),
        };
        assert_eq!(n, 100_000, "the inner writer's own partial write is reported");
        let all: Vec<u8> = io.get_ref().writes.concat();
        assert_eq!(all.len(), small.len() + 20 + 100_000);
        assert_eq!(&all[small.len()..small.len() + 20], &[2u8; 20]);
    }

    #[test]
    fn a_large_vectored_write_leaves_at_once_behind_what_is_pending() {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut io = CorkedIo::new(Calls { vectored: true, ..Default::default() });
        let mut p = Pin::new(&mut io);
        assert!(matches!(p.as_mut().poll_write(&mut cx, b"head"), Poll::Ready(Ok(4))));
        let payload = vec![5u8; WRITE_THROUGH_BYTES];
        let v = [io::IoSlice::new(b"frame-hdr"), io::IoSlice::new(&payload)];
        let n = 9 + payload.len();
        assert!(
            matches!(p.as_mut().poll_write_vectored(&mut cx, &v), Poll::Ready(Ok(m)) if m == n)
        );
        // One call, pending bytes first, nothing left pending: a flush writes nothing more.
        assert!(matches!(p.as_mut().poll_flush(&mut cx), Poll::Ready(Ok(()))));
        let writes = &io.get_ref().writes;
        assert_eq!(writes.len(), 1);
        assert_eq!(&writes[0][..13], b"headframe-hdr");
        assert_eq!(writes[0].len(), 4 + n);
        // Just under the threshold: copied and corked as before.
        let mut p = Pin::new(&mut io);
        let v = [io::IoSlice::new(&payload[1..])];
        assert!(matches!(p.as_mut().poll_write_vectored(&mut cx, &v), Poll::Ready(Ok(_))));
        assert_eq!(p.as_ref().get_ref().get_ref().writes.len(), 1);
        assert!(p.as_mut().poll_flush(&mut cx).is_pending());
        assert!(matches!(p.as_mut().poll_flush(&mut cx), Poll::Ready(Ok(()))));
        assert_eq!(io.get_ref().writes.len(), 2);
    }

    #[test]
    fn a_write_through_that_the_socket_takes_in_pieces_keeps_every_byte_in_order() {
        let waker = std::task::Waker::noop();
        let mut cx = Context::from_waker(waker);
        let mut io = CorkedIo::new(Calls { vectored: true, limit: 3000, ..Default::default() });
        let pending: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        let payload: Vec<u8> = (0..WRITE_THROUGH_BYTES as u32).map(|i| (i * 7) as u8).collect();
        let mut p = Pin::new(&mut io);
        assert!(matches!(p.as_mut().poll_write(&mut cx, &pending), Poll::Ready(Ok(5000))));
        // The socket takes 3000 bytes a call: pending goes out in two calls, the second
        // carrying 1000 of the payload, which is what the caller is told was taken.
        let v = [io::IoSlice::new(&payload)];
        assert!(matches!(p.as_mut().poll_write_vectored(&mut cx, &v), Poll::Ready(Ok(1000))));
        // The rest is under the threshold now: corked, and written by the second flush.
        let v = [io::IoSlice::new(&payload[1000..])];
        let rest = payload.len() - 1000;
        assert!(
            matches!(p.as_mut().poll_write_vectored(&mut cx, &v), Poll::Ready(Ok(m)) if m == rest)
        );
        assert!(p.as_mut().poll_flush(&mut cx).is_pending());
        assert!(matches!(p.as_mut().poll_flush(&mut cx), Poll::Ready(Ok(()))));
        let all = io.get_ref().writes.concat();
        assert_eq!(all, [pending, payload].concat());
    }

    #[tokio::test]
    async fn shutdown_writes_what_is_pending() {
        let mut io = CorkedIo::new(Calls::default());
        io.write_all(b"bye").await.unwrap();
        io.shutdown().await.unwrap();
        assert_eq!(io.get_ref().writes, vec![b"bye".to_vec()]);
    }

    /// A silence limit counts from the last byte received: bytes keep the connection
    /// open past the limit, and silence as long as the limit fails the read with
    /// `TimedOut` (the server then drops the connection).
    #[tokio::test]
    async fn a_connection_silent_for_its_limit_fails_its_read() {
        use std::time::Duration;
        use tokio::io::AsyncReadExt as _;
        let limit = Duration::from_millis(150);
        let (ours, mut theirs) = tokio::io::duplex(1024);
        let mut io = CorkedIo::new(ours).closed_when_silent(limit);
        let started = tokio::time::Instant::now();
        let talker = tokio::spawn(async move {
            for _ in 0..3 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                theirs.write_all(b"x").await.unwrap();
            }
            theirs // kept open, silent
        });
        let mut got = 0;
        let mut buf = [0u8; 8];
        let e = loop {
            match io.read(&mut buf).await {
                Ok(n) => got += n,
                Err(e) => break e,
            }
        };
        let silent_for = started.elapsed();
        assert_eq!(got, 3, "every byte sent was read first");
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        // The last byte came at ~300 ms, so the limit ran out at ~450 ms, not at 150.
        assert!(silent_for >= Duration::from_millis(440), "failed after {silent_for:?}");
        drop(talker.await.unwrap());
        // Without a limit the same silence only waits.
        let (ours, _theirs) = tokio::io::duplex(1024);
        let mut io = CorkedIo::new(ours);
        let r = tokio::time::timeout(limit * 2, io.read(&mut buf)).await;
        assert!(r.is_err(), "a connection with no limit ended: {r:?}");
    }
}
