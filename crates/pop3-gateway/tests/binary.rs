//! The `pop3-gateway` binary: --help, config from flags, readiness, greeting, SIGTERM.

use mailsuite_runtime::grpc;
use mailsuite_testkit::process::{check_service_binary, free_addr};
use tonic_health::ServingStatus;

#[tokio::test]
async fn binary_starts_greets_and_exits_on_sigterm() {
    // Readiness follows the store's gRPC health: a health service reporting the Mailbox
    // service SERVING stands in for the store.
    let (reporter, health) = grpc::health_reporter();
    reporter
        .set_service_status("mailsuite.v1.Mailbox", ServingStatus::Serving)
        .await;
    let (listener, store) = grpc::bind("127.0.0.1:0").await.unwrap();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(grpc::incoming(listener)),
    );
    let (pop3, ops) = (free_addr(), free_addr());
    let settings = [
        ("listen_pop3", pop3.clone()),
        ("listen_pop3s", free_addr()),
        ("listen_ops", ops.clone()),
        ("store_url", format!("http://{store}")),
    ];
    check_service_binary(
        env!("CARGO_BIN_EXE_pop3-gateway"),
        &settings,
        &[],
        &ops,
        Some((&pop3, "+OK")),
    )
    .await;
    server.abort();
}
