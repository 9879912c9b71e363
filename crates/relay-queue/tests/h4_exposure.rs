//! H4: the standalone binary refuses to serve gRPC on a non-loopback address without the
//! internal token (it used to listen on 0.0.0.0 and trust every caller), and says why.

#[tokio::test(flavor = "multi_thread")]
async fn h4_no_token_on_a_public_address_refuses_to_start() {
    mailsuite_testkit::process::assert_refuses_public_grpc_without_token(env!(
        "CARGO_BIN_EXE_relay-queue"
    ))
    .await;
}
