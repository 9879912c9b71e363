//! The `imap-gateway` binary: --help, config from flags, readiness, greeting, SIGTERM.

use mailsuite_testkit::process::{check_service_binary, free_addr};

#[tokio::test]
async fn binary_starts_greets_and_exits_on_sigterm() {
    let (imap, ops) = (free_addr(), free_addr());
    let settings = [
        ("listen_imap", imap.clone()),
        ("listen_imaps", free_addr()),
        ("listen_ops", ops.clone()),
        ("store_url", format!("http://{}", free_addr())),
    ];
    check_service_binary(
        env!("CARGO_BIN_EXE_imap-gateway"),
        &settings,
        &[],
        &ops,
        Some((&imap, "* OK")),
    )
    .await;
}
