//! Compiles the .proto contracts with protox (pure Rust): building needs no system protoc.

const PROTOS: &[&str] = &[
    "mailsuite/v1/common.proto",
    "mailsuite/v1/directory.proto",
    "mailsuite/v1/delivery.proto",
    "mailsuite/v1/mailbox.proto",
    "mailsuite/v1/admin.proto",
    "mailsuite/v1/queue.proto",
];

/// The fields that carry message content are `bytes::Bytes`, not `Vec<u8>`: a chunk decoded by
/// tonic is then a slice of the received frame (no copy), and a sender hands over slices of
/// the message it holds (`Bytes::slice`, no copy) instead of a fresh `Vec` per chunk. The
/// other `bytes` fields (envelope and structure parts of a few bytes each) stay `Vec<u8>`.
const BODY_FIELDS: &[&str] = &[
    ".mailsuite.v1.DeliverChunk.data",
    ".mailsuite.v1.AppendChunk.data",
    ".mailsuite.v1.EnqueueChunk.data",
    ".mailsuite.v1.BodyChunk.data",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = "../../proto";
    println!("cargo:rerun-if-changed={root}");
    let fds = protox::compile(PROTOS, [root])?;
    let mut build = tonic_prost_build::configure()
        .build_server(true)
        .build_client(true);
    for field in BODY_FIELDS {
        build = build.bytes(field);
    }
    build.compile_fds(fds)?;
    Ok(())
}
