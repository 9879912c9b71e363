//! A delivery attempt is a trace of its own that links back to the accepting transaction
//! (the `traceparent` given to Enqueue), and the DSN it causes carries the attempt's context.

mod common;

use std::time::Duration;

use common::*;
use mailsuite_runtime::Shutdown;
use mailsuite_testkit::{TestDb, eventually};
use opentelemetry::trace::TracerProvider as _;
use tracing_subscriber::layer::SubscriberExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_spans_link_to_the_accepting_trace() {
    mailsuite_runtime::telemetry::install_propagator();
    let exporter = opentelemetry_sdk::trace::InMemorySpanExporter::default();
    let provider =
        mailsuite_runtime::telemetry::provider_with(exporter.clone(), "relay-test", false);
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("relay-test")));
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let db = TestDb::new().await;
    let sd = Shutdown::new();
    let (_store, store_url) = FakeStore::start(&["alice@local.test"], &sd).await;
    let sink = Sink::start(&["--reject", "bob@remote.test"]).await;
    let mut c = config(&db.url, &store_url);
    c.transports.insert("remote.test".into(), sink.route());
    let started = mailsuite_relay_queue::start(c, sd.clone()).await.unwrap();
    let accepting_trace = "0af7651916cd43dd8448eb211c80319c";
    let accepting_span = "b7ad6b7169203331";
    let mut h = header("traced", "alice@local.test", &["bob@remote.test"]);
    h.traceparent = format!("00-{accepting_trace}-{accepting_span}-01");
    let r = enqueue(
        started.grpc.unwrap(),
        h,
        &message(
            "alice@local.test",
            "bob@remote.test",
            "traced",
            "t@local.test",
        ),
    )
    .await;
    eventually(T, "bounce delivered", || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM relay.recipients WHERE state IN ('delivered', 'failed')",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        (n == 2).then_some(())
    })
    .await;
    sd.drain(Duration::from_secs(10)).await;

    let spans = exporter.get_finished_spans().unwrap();
    let attempts: Vec<_> = spans
        .iter()
        .filter(|s| s.name == "relay.delivery")
        .collect();
    assert_eq!(attempts.len(), 2, "the bounced message and its DSN");
    let first = attempts
        .iter()
        .find(|s| {
            s.links.iter().any(|l| {
                l.span_context.trace_id().to_string() == accepting_trace
                    && l.span_context.span_id().to_string() == accepting_span
            })
        })
        .expect("an attempt linked to the accepting transaction");
    assert_ne!(
        first.span_context.trace_id().to_string(),
        accepting_trace,
        "attempts are traces of their own"
    );
    // The DSN was queued inside that attempt and its own delivery links back to it.
    let dsn_tp: String =
        sqlx::query_scalar("SELECT traceparent FROM relay.messages WHERE id <> $1::uuid")
            .bind(&r.queue_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(
        dsn_tp.contains(&first.span_context.trace_id().to_string()),
        "{dsn_tp}"
    );
    let dsn_attempt = attempts
        .iter()
        .find(|s| s.span_context != first.span_context)
        .unwrap();
    assert!(
        dsn_attempt
            .links
            .iter()
            .any(|l| l.span_context.trace_id() == first.span_context.trace_id()),
        "the DSN's delivery links to the attempt that caused it"
    );
}
