//! The `imap-gateway` binary: --help, config from flags, readiness, greeting, SIGTERM.

use mailsuite_testkit::process::{check_service_binary, free_addr, store_health_standin};

#[tokio::test]
async fn binary_starts_greets_and_exits_on_sigterm() {
    // Readiness follows the store's gRPC health: a health service reporting the Mailbox
    // service SERVING stands in for the store.
    let (store, server) = store_health_standin().await;
    let (imap, ops) = (free_addr(), free_addr());
    let settings = [
        ("listen_imap", imap.clone()),
        ("listen_imaps", free_addr()),
        ("listen_ops", ops.clone()),
        ("store_url", store),
    ];
    check_service_binary(
        env!("CARGO_BIN_EXE_imap-gateway"),
        &settings,
        &[],
        &ops,
        Some((&imap, "* OK")),
    )
    .await;
    server.abort();
}
