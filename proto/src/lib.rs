//! wayside's wire protocol and the vocabulary every crate shares.
//!
//! - [`pb`]: the generated prost messages and tonic clients/servers for every surface
//!   (vehicle block API, NMS admin, NMS-to-NMS migration, PSS block/admin/Raft transport, SMF).
//! - [`types`]: validated domain types (volume names, block sizes, epochs, request ids, faults).
//! - [`convert`]: the one place where wire messages become domain types and back;
//!   invalid input is rejected there with a [`convert::ConvertError`].
//! - [`error`]: typed faults (redirect, not owner, not leader, stale epoch, limit) carried in
//!   gRPC status details, so clients act on them instead of parsing strings.
//! - [`server`]: the standard services every wayside server exposes (health, reflection).
//! - [`codec`]: the prost codec every generated client and server uses.
//! - [`h2serve`]: gRPC on [`h2conn`] (tonic's routes behind it), for calls answered by
//!   hand with replies whose block data is never copied into one buffer.
//! - [`cork`]: the socket wrapper that sends the frames of one task turn in one system call.
//! - [`client`]: tonic client channels over corked TCP (a unary call leaves in one write),
//!   and `connect_h2`, which dials [`h2client`].
//! - [`h2client`]: wayside's own HTTP/2 client connection, the vehicle client library's
//!   transport under tonic's generated clients.
//! - [`h2conn`]: wayside's own HTTP/2 server connection (the NMS's vehicle port), and
//!   [`hpack`], its header decoder.
//! - [`tls`]: TLS on every hop: a node's `[tls]` files, rustls and tonic configs, a road's CA.
//! - [`config`]: TOML config loading shared by the binaries (unknown keys rejected).
//! - [`telemetry`]: `tracing` set-up shared by the binaries.

pub mod client;
pub mod codec;
pub mod config;
pub mod convert;
pub mod cork;
pub mod error;
pub mod h2client;
pub mod h2conn;
pub mod h2serve;
pub mod hpack;
pub mod server;
pub mod telemetry;
pub mod tls;
pub mod token;
pub mod types;

/// Generated protobuf messages and gRPC services of package `wayside.v1`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod pb {
    tonic::include_proto!("wayside.v1");

    /// The encoded `FileDescriptorSet` of every wayside `.proto`, for gRPC reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/wayside_descriptor.bin"));
}
