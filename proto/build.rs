//! Compiles `wayside/v1/*.proto` with protox (pure Rust: no system `protoc`) and
//! generates prost messages and tonic clients/servers from the descriptor set.
use prost::Message;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "wayside/v1/common.proto",
        "wayside/v1/nms.proto",
        "wayside/v1/migration.proto",
        "wayside/v1/pss.proto",
        "wayside/v1/smf.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // Served by gRPC reflection so generic tools (grpcurl, grpc_cli) can talk to us.
    std::fs::write(out.join("wayside_descriptor.bin"), fds.encode_to_vec())?;
    // Block data as `Bytes`: the source of a migration hands its cached buffers to the
    // encoder without copying each 4 KiB block into a Vec first; an NMS read reply does the
    // same; a decoded write's data is a slice of the receive buffer, not a copy of it.
    // (The PSS's own messages keep `Vec<u8>`.)
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .bytes(".wayside.v1.MigratedBlock.data")
        .bytes(".wayside.v1.WriteOp.data")
        .bytes(".wayside.v1.ReadReply.data")
        // prost, with the message's length reserved before encoding (see src/codec.rs).
        .codec_path("crate::codec::WaysideCodec")
        .compile_fds(fds)?;
    Ok(())
}
