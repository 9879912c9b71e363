//! The `relay-queue` binary: --help, config from flags, gRPC health, readiness, SIGTERM.

use mailsuite_testkit::TestDb;
use mailsuite_testkit::process::{
    ServiceProcess, check_service_binary, free_addr, wait_grpc_serving,
};
use std::time::Duration;

#[tokio::test]
async fn binary_starts_serves_health_and_exits_on_sigterm() {
    let db = TestDb::new().await;
    let bin = env!("CARGO_BIN_EXE_relay-queue");
    let (grpc, ops) = (free_addr(), free_addr());
    let settings = [
        ("listen_grpc", grpc.clone()),
        ("listen_ops", ops.clone()),
        ("store_url", format!("http://{}", free_addr())),
    ];
    check_service_binary(bin, &settings, &[("DATABASE_URL", &db.url)], &ops, None).await;

    let args: Vec<String> = settings
        .iter()
        .flat_map(|(k, v)| ["--set".to_string(), format!("{k}={v}")])
        .collect();
    let mut p = ServiceProcess::spawn(bin, &args, &[("DATABASE_URL", &db.url)]);
    wait_grpc_serving(&mut p, &grpc, "", Duration::from_secs(60)).await;
    assert!(p.terminate(Duration::from_secs(30)).await.success());
}
