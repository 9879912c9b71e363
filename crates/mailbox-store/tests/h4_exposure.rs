//! H4: the standalone binary refuses to serve gRPC on a non-loopback address without the
//! internal token (it used to listen on 0.0.0.0 and trust every caller), and says why.

use std::time::Duration;

use mailsuite_testkit::TestDb;
use mailsuite_testkit::process::run_to_exit;

#[tokio::test(flavor = "multi_thread")]
async fn h4_no_token_on_a_public_address_refuses_to_start() {
    let db = TestDb::new().await;
    let url = db.url.clone();
    let (status, err) = tokio::task::spawn_blocking(move || {
        run_to_exit(
            env!("CARGO_BIN_EXE_mailbox-store"),
            &["--set", "listen_grpc=0.0.0.0:0", "--set", "listen_ops="],
            &[("DATABASE_URL", &url)],
            Duration::from_secs(60),
        )
    })
    .await
    .unwrap();
    assert!(!status.success(), "exit status {status}");
    assert!(
        err.contains("refusing to serve gRPC") && err.contains("internal_token"),
        "{err}"
    );
}
