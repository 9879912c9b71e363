//! The gRPC trace layers also time every call: `mailsuite_grpc_{server,client}_duration_seconds`
//! by service, method and status, visible in the Prometheus rendering.

use mailsuite_runtime::{grpc, metrics};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

fn count(metric: &str, code: &str) -> f64 {
    metrics::value(
        metric,
        &[
            ("rpc_service", "grpc.health.v1.Health"),
            ("rpc_method", "Check"),
            ("code", code),
        ],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_are_timed_on_both_sides_with_their_status() {
    let (reporter, health) = grpc::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let (listener, addr) = grpc::bind("127.0.0.1:0").await.unwrap();
    let shutdown = mailsuite_runtime::Shutdown::new();
    let stop = shutdown.stop_token();
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .layer(grpc::ServerTraceLayer)
            .add_service(health)
            .serve_with_incoming_shutdown(grpc::incoming(listener), async move {
                stop.cancelled().await
            }),
    );
    let server_hist = "mailsuite_grpc_server_duration_seconds_count";
    let client_hist = "mailsuite_grpc_client_duration_seconds_count";
    let before = (
        count(server_hist, "OK"),
        count(client_hist, "OK"),
        count(server_hist, "NOT_FOUND"),
        count(client_hist, "NOT_FOUND"),
    );

    let mut client = HealthClient::new(grpc::connect_lazy(&format!("http://{addr}")).unwrap());
    client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap();
    let err = client
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    assert_eq!(count(server_hist, "OK") - before.0, 1.0);
    assert_eq!(count(client_hist, "OK") - before.1, 1.0);
    assert_eq!(count(server_hist, "NOT_FOUND") - before.2, 1.0);
    assert_eq!(count(client_hist, "NOT_FOUND") - before.3, 1.0);
    let text = metrics::render_prometheus();
    assert!(
        text.contains("mailsuite_grpc_server_duration_seconds_bucket{code=\"OK\",rpc_method=\"Check\",rpc_service=\"grpc.health.v1.Health\",le=\"0.0005\"}"),
        "{text}"
    );

    shutdown.trigger();
    server.await.unwrap().unwrap();
}
