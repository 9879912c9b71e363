//! One gRPC hop continues the caller's trace: the server span created by `ServerTraceLayer`
//! has the client span (from `ClientTraceLayer`) as parent, in the same trace.

use mailsuite_runtime::grpc;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::InMemorySpanExporter;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use tracing::Instrument;
use tracing_subscriber::layer::SubscriberExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_span_continues_client_trace() {
    mailsuite_runtime::telemetry::install_propagator();
    let exporter = InMemorySpanExporter::default();
    let provider =
        mailsuite_runtime::telemetry::provider_with(exporter.clone(), "trace-test", false);
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
    tracing::subscriber::set_global_default(subscriber).unwrap();

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

    let channel = grpc::connect_lazy(&format!("http://{addr}")).unwrap();
    let mut client = HealthClient::new(channel);
    let reply = client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .instrument(tracing::info_span!("test.root"))
        .await
        .unwrap();
    assert_eq!(reply.into_inner().status, 1, "SERVING");

    let _ = provider.force_flush();
    let spans = exporter.get_finished_spans().unwrap();
    let find = |name: &str| {
        spans
            .iter()
            .find(|s| s.name.starts_with(name) || s.name.contains(name))
            .unwrap_or_else(|| {
                panic!(
                    "no span {name}: {:?}",
                    spans.iter().map(|s| s.name.to_string()).collect::<Vec<_>>()
                )
            })
            .clone()
    };
    let root = find("test.root");
    let client_span = spans
        .iter()
        .find(|s| s.span_kind == opentelemetry::trace::SpanKind::Client)
        .expect("client span")
        .clone();
    let server_span = spans
        .iter()
        .find(|s| s.span_kind == opentelemetry::trace::SpanKind::Server)
        .expect("server span")
        .clone();
    assert_eq!(server_span.name, "grpc.health.v1.Health/Check");
    assert_eq!(
        client_span.span_context.trace_id(),
        root.span_context.trace_id()
    );
    assert_eq!(
        server_span.span_context.trace_id(),
        client_span.span_context.trace_id(),
        "server continues the client's trace"
    );
    assert_eq!(
        server_span.parent_span_id,
        client_span.span_context.span_id(),
        "server span's parent is the client span"
    );

    shutdown.trigger();
    server.await.unwrap().unwrap();
}
