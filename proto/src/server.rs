//! The standard services every wayside gRPC server exposes: `grpc.health.v1.Health` and
//! `grpc.reflection.v1` (with every wayside service and the health service registered),
//! so grpcurl, grpc_health_probe and similar tools work against any node.

use tonic_health::server::HealthReporter;

/// A health service and its reporter. The reporter sets each service's state; the
/// empty service name ("") stands for the whole server.
pub fn health() -> (
    HealthReporter,
    tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
) {
    tonic_health::server::health_reporter()
}

/// The reflection service describing every wayside service.
pub fn reflection() -> tonic_reflection::server::v1::ServerReflectionServer<
    impl tonic_reflection::server::v1::ServerReflection,
> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the compiled-in descriptor sets are valid")
}

/// The connection stream for a server bound by the caller (tests bind `127.0.0.1:0` and
/// pass the listener in), with TCP_NODELAY on every accepted socket. `Server::builder()
/// .tcp_nodelay()` does not reach sockets of a caller-supplied listener: without this,
/// small replies wait for the peer's delayed ACK (~40 ms per request).
pub fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
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
