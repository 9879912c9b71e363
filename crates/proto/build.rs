//! Compiles the .proto contracts with protox (pure Rust): building needs no system protoc.

const PROTOS: &[&str] = &[
    "mailsuite/v1/common.proto",
    "mailsuite/v1/directory.proto",
    "mailsuite/v1/delivery.proto",
    "mailsuite/v1/mailbox.proto",
    "mailsuite/v1/admin.proto",
    "mailsuite/v1/queue.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = "../../proto";
    println!("cargo:rerun-if-changed={root}");
    let fds = protox::compile(PROTOS, [root])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
