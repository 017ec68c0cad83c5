//! gRPC client connections whose frames of one turn leave in one write, like the servers'.
//!
//! tonic's client (hyper over h2) writes a unary call's HEADERS when the call starts and its
//! DATA once the body's task has run: two `writev`s, so the server reads the call in two
//! segments and polls its connection twice (1.65 reads and 1.65 sends per unary call at the
//! NMS, against 1 and 1 from h2load, which writes a call at once). [`connect`] and
//! [`connect_lazy`] give tonic TCP connections wrapped in [`CorkedIo`], which holds what one
//! turn of the connection's task writes until it yields, so a call leaves in one write: the
//! bench's tonic unary calls went from 56-69k to 78-88k/s, 33 to 23 us of CPU per write.

use crate::cork::CorkedIo;
use hyper_util::rt::TokioIo;
use std::io;

/// The tonic endpoint for `ep`: over TLS when `tls` is given, whatever scheme `ep` was
/// written with (a process set up for TLS never dials plaintext, so neither a config file
/// nor a redirect can downgrade a hop), plaintext otherwise; an `https://` address without
/// TLS set up is refused rather than dialled with guessed trust roots. Pass the result to
/// [`connect`] or [`connect_lazy`] after setting its timeouts.
pub fn endpoint(
    ep: &crate::types::Endpoint,
    tls: Option<&crate::tls::Tls>,
) -> Result<tonic::transport::Endpoint, crate::tls::TlsError> {
    let bad = |e: tonic::transport::Error| crate::tls::TlsError::Config(format!("{ep}: {e}"));
    match tls {
        Some(tls) => tonic::transport::Endpoint::from_shared(ep.https().uri().to_owned())
            .map_err(bad)?
            .tls_config(tls.tonic_client()?)
            .map_err(bad),
        None if ep.is_https() => Err(crate::tls::TlsError::HttpsWithoutTls(ep.to_string())),
        None => tonic::transport::Endpoint::from_shared(ep.uri().to_owned()).map_err(bad),
    }
}

/// Connects `endpoint` (`http://host:port`, with its connect timeout and other settings;
/// TCP_NODELAY is always set) over TCP through a [`CorkedIo`].
pub async fn connect(
    endpoint: &tonic::transport::Endpoint,
) -> Result<tonic::transport::Channel, tonic::transport::Error> {
    endpoint.connect_with_connector(tower::service_fn(corked_tcp)).await
}

/// [`connect`], connecting at the first call (and again after the connection is lost, as
/// every tonic channel does).
pub fn connect_lazy(endpoint: &tonic::transport::Endpoint) -> tonic::transport::Channel {
    endpoint.connect_with_connector_lazy(tower::service_fn(corked_tcp))
}

/// Why [`connect_h2`] could not connect.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("connecting to {addr}")]
    Io {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("connecting to {addr}: no connection within {timeout:?}")]
    Timeout { addr: String, timeout: std::time::Duration },
    #[error("connecting to {addr}: no TLS handshake within {timeout:?}")]
    HandshakeTimeout { addr: String, timeout: std::time::Duration },
}

/// Connects to `ep` with wayside's own HTTP/2 client ([`crate::h2client`]): over TLS when
/// `tls` is given, whatever scheme `ep` was written with, plaintext otherwise (an
/// `https://` address without TLS set up is refused), as [`endpoint`] decides for tonic.
/// `timeout` bounds the TCP connect (an unreachable host is found out that soon) and
/// `handshake_timeout` the TLS handshake after it (a reachable host slow to answer, a busy
/// one, gets longer). A TLS handshake's failure is the `rustls::Error` inside the error's
/// `io::Error`.
pub async fn connect_h2(
    ep: &crate::types::Endpoint,
    tls: Option<&crate::tls::Tls>,
    timeout: std::time::Duration,
    handshake_timeout: std::time::Duration,
    settings: crate::h2client::ClientSettings,
) -> Result<crate::h2client::Channel, ConnectError> {
    let config = match tls {
        Some(tls) => Some(tls.client_config()?),
        None if ep.is_https() => {
            return Err(crate::tls::TlsError::HttpsWithoutTls(ep.to_string()).into())
        }
        None => None,
    };
    let authority = ep.authority().to_owned();
    let io_err = |source| ConnectError::Io { addr: ep.to_string(), source };
    let uri: http::Uri = ep
        .uri()
        .parse()
        .map_err(|e| io_err(io::Error::new(io::ErrorKind::InvalidInput, format!("{ep}: {e}"))))?;
    let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
    let name = rustls_pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| io_err(io::Error::new(io::ErrorKind::InvalidInput, format!("{host}: {e}"))))?;
    let tcp = tokio::time::timeout(timeout, tcp(uri))
        .await
        .map_err(|_| ConnectError::Timeout { addr: ep.to_string(), timeout })?
        .map_err(io_err)?;
    Ok(match config {
        Some(config) => {
            let handshake = tokio_rustls::TlsConnector::from(config).connect(name, tcp);
            let tls = tokio::time::timeout(handshake_timeout, handshake)
                .await
                .map_err(|_| ConnectError::HandshakeTimeout {
                    addr: ep.to_string(),
                    timeout: handshake_timeout,
                })?
                .map_err(io_err)?;
            crate::h2client::start(tls, &authority, true, settings)
        }
        None => crate::h2client::start(tcp, &authority, false, settings),
    })
}

async fn corked_tcp(uri: http::Uri) -> io::Result<TokioIo<CorkedIo<tokio::net::TcpStream>>> {
    Ok(TokioIo::new(CorkedIo::new(tcp(uri).await?)))
}

/// A TCP connection to `uri`'s host and port (80 if none), with TCP_NODELAY.
async fn tcp(uri: http::Uri) -> io::Result<tokio::net::TcpStream> {
    let host = uri
        .host()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("no host in {uri}")))?
        // An IPv6 literal comes bracketed.
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = uri.port_u16().unwrap_or(80);
    let s = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll};
    use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

    /// A client socket that records what each write sent.
    struct Recorded {
        inner: tokio::net::TcpStream,
        writes: Arc<Mutex<Vec<Vec<u8>>>>,
    }

    impl AsyncRead for Recorded {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for Recorded {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            b: &[u8],
        ) -> Poll<io::Result<usize>> {
            let r = Pin::new(&mut self.inner).poll_write(cx, b);
            if let Poll::Ready(Ok(n)) = r {
                self.writes.lock().unwrap().push(b[..n].to_vec());
            }
            r
        }
        fn poll_write_vectored(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
            if let Poll::Ready(Ok(n)) = r {
                let all: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).take(n).collect();
                self.writes.lock().unwrap().push(all);
            }
            r
        }
        fn is_write_vectored(&self) -> bool {
            self.inner.is_write_vectored()
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    /// The frames (type, flags) in `writes` (after the client's preface), each with the
    /// index of the write that carried its first byte.
    fn frames(writes: &[Vec<u8>]) -> Vec<(u8, u8, usize)> {
        let all: Vec<u8> = writes.concat();
        let starts: Vec<usize> = writes
            .iter()
            .scan(0, |at, w| {
                let s = *at;
                *at += w.len();
                Some(s)
            })
            .collect();
        let write_of = |pos: usize| starts.iter().rposition(|s| *s <= pos).unwrap();
        let mut out = Vec::new();
        let mut at = 24;
        while at + 9 <= all.len() {
            let len = u32::from_be_bytes([0, all[at], all[at + 1], all[at + 2]]) as usize;
            out.push((all[at + 3], all[at + 4], write_of(at)));
            at += 9 + len;
        }
        out
    }

    /// One unary call to a hyper HTTP/2 server over a connection recording its writes,
    /// through a [`CorkedIo`] as [`connect`] makes them, or not; returns the writes' frames.
    async fn one_call(corked: bool) -> Vec<(u8, u8, usize)> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let svc = hyper::service::service_fn(|_req| async {
                // Trailers-only: the call ends here, UNIMPLEMENTED.
                let r = http::Response::builder()
                    .header("content-type", "application/grpc")
                    .header("grpc-status", "12")
                    .body(tonic::body::Body::empty())
                    .unwrap();
                Ok::<_, std::convert::Infallible>(r)
            });
            let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(TokioIo::new(s), svc)
                .await;
        });
        let writes = Arc::new(Mutex::new(Vec::new()));
        let w = writes.clone();
        let connector = tower::service_fn(move |uri: http::Uri| {
            let writes = w.clone();
            async move {
                let s = Recorded { inner: tcp(uri).await?, writes };
                Ok::<_, io::Error>(if corked {
                    TokioIo::new(tokio_util::either::Either::Left(CorkedIo::new(s)))
                } else {
                    TokioIo::new(tokio_util::either::Either::Right(s))
                })
            }
        });
        let e = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap();
        let ch = e.connect_with_connector(connector).await.unwrap();
        let mut c = crate::pb::nms_client::NmsClient::new(ch);
        let r = c.stat(crate::pb::StatRequest { auth: None }).await;
        assert_eq!(r.unwrap_err().code(), tonic::Code::Unimplemented);
        let writes = writes.lock().unwrap().clone();
        frames(&writes)
    }

    /// The writes that carried the call's HEADERS and its DATA with END_STREAM.
    fn call_writes(f: &[(u8, u8, usize)]) -> (usize, usize) {
        let h = f.iter().find(|f| f.0 == 1).expect("a HEADERS frame");
        let d = f.iter().find(|f| f.0 == 0 && f.1 & 1 == 1).expect("DATA with END_STREAM");
        (h.2, d.2)
    }

    #[tokio::test]
    async fn a_unary_call_leaves_in_one_write() {
        let (h, d) = call_writes(&one_call(true).await);
        assert_eq!(h, d, "corked, the call's HEADERS and DATA leave in one write");
        // What the cork is for: over a plain socket tonic writes them apart.
        let (h, d) = call_writes(&one_call(false).await);
        assert_ne!(h, d, "uncorked, tonic writes a call's HEADERS and DATA apart");
    }
}
