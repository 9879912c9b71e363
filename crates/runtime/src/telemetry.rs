//! Logs and traces: a `tracing` subscriber (text or JSON), plus OpenTelemetry export over
//! OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT` is set. The W3C trace-context propagator is
//! always installed, so traces continue across services even when only some export. Metrics
//! (`crate::metrics`) are set up here too: OTLP push beside the Prometheus endpoint.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanExporter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Flushes and shuts the exporter down when dropped.
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
    _metrics: crate::metrics::MetricsGuard,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.force_flush();
            let _ = p.shutdown();
        }
    }
}

pub fn install_propagator() {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
}

/// A tracer provider sending every span to `exporter` as it ends (used by tests with an
/// in-memory exporter) or in batches (OTLP).
pub fn provider_with(
    exporter: impl SpanExporter + 'static,
    service: &str,
    batch: bool,
) -> SdkTracerProvider {
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service.to_string())
        .build();
    let b = SdkTracerProvider::builder().with_resource(resource);
    let b = if batch {
        b.with_batch_exporter(exporter)
    } else {
        b.with_simple_exporter(exporter)
    };
    b.build()
}

/// Install the global subscriber. `json` switches log lines to JSON. The service name comes
/// from `OTEL_SERVICE_NAME` when set.
pub fn init(service: &str, json: bool) -> TelemetryGuard {
    install_propagator();
    // Every binary honours MAILSUITE_LOG_JSON, whatever its own flag is called: compose and
    // Kubernetes switch JSON logs on through the environment.
    let json = json
        || std::env::var("MAILSUITE_LOG_JSON")
            .map(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes"))
            .unwrap_or(false);
    let filter = EnvFilter::try_from_env("MAILSUITE_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info,opentelemetry=warn,sqlx=warn"));
    let service = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| service.to_string());

    let provider = match std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT") {
        Ok(ep) if !ep.is_empty() => {
            match opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .build()
            {
                Ok(exp) => Some(provider_with(exp, &service, true)),
                Err(e) => {
                    eprintln!("OTLP exporter disabled: {e}");
                    None
                }
            }
        }
        _ => None,
    };
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("mailsuite"))
            .boxed()
    });
    let fmt = if json {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .json()
            .with_current_span(false)
            .boxed()
    } else {
        // Logs go to stderr: stdout is for what a command prints on purpose (mailsuite up's
        // table, mailctl's output).
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .compact()
            .boxed()
    };
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init();
    TelemetryGuard {
        provider,
        _metrics: crate::metrics::init(&service),
    }
}

/// The W3C `traceparent` of the current span (empty when there is none). Work that continues
/// later in another process (a queued message's delivery attempts) stores it and links back
/// with [`span_context_from_traceparent`].
pub fn current_traceparent() -> String {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let cx = tracing::Span::current().context();
    let mut carrier = std::collections::HashMap::new();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut carrier));
    carrier.remove("traceparent").unwrap_or_default()
}

/// The trace id of `span` as 32 hex digits (for log lines operators correlate with traces),
/// or an empty string when tracing is not recording it.
pub fn trace_id(span: &tracing::Span) -> String {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        sc.trace_id().to_string()
    } else {
        String::new()
    }
}

/// The span context a stored `traceparent` names, for a span link; `None` when it is empty
/// or malformed.
pub fn span_context_from_traceparent(
    traceparent: &str,
) -> Option<opentelemetry::trace::SpanContext> {
    use opentelemetry::trace::TraceContextExt;
    let carrier =
        std::collections::HashMap::from([("traceparent".to_string(), traceparent.to_string())]);
    let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(&carrier));
    let sc = cx.span().span_context().clone();
    sc.is_valid().then_some(sc)
}

/// Link `span` to the trace a stored `traceparent` names (no-op when it is empty or
/// malformed): a delivery attempt hours later points back at the accepting transaction.
pub fn link_to_traceparent(span: &tracing::Span, traceparent: &str) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    if let Some(sc) = span_context_from_traceparent(traceparent) {
        span.add_link(sc);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::layer::SubscriberExt;

    #[test]
    fn traceparent_round_trip() {
        install_propagator();
        let exporter = opentelemetry_sdk::trace::InMemorySpanExporter::default();
        let provider = provider_with(exporter.clone(), "tp-test", false);
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("t")));
        tracing::subscriber::with_default(subscriber, || {
            assert_eq!(current_traceparent(), "", "no span, no context");
            let span = tracing::info_span!("accepting");
            let _e = span.enter();
            let tp = current_traceparent();
            assert!(tp.starts_with("00-") && tp.len() == 55, "{tp}");
            assert_eq!(&tp[3..35], trace_id(&span));
            let sc = span_context_from_traceparent(&tp).expect("valid");
            use opentelemetry::trace::TraceContextExt;
            use tracing_opentelemetry::OpenTelemetrySpanExt;
            assert_eq!(
                sc.trace_id(),
                span.context().span().span_context().trace_id()
            );
            drop(_e);
            drop(span);
            // Later work, in a trace of its own, links back to the stored context.
            let later = tracing::info_span!(parent: None, "delivery attempt");
            link_to_traceparent(&later, &tp);
            drop(later);
        });
        let spans = exporter.get_finished_spans().unwrap();
        let accepting = spans.iter().find(|s| s.name == "accepting").unwrap();
        let later = spans.iter().find(|s| s.name == "delivery attempt").unwrap();
        assert_ne!(
            later.span_context.trace_id(),
            accepting.span_context.trace_id()
        );
        let links: Vec<_> = later.links.iter().collect();
        assert_eq!(links.len(), 1);
        assert_eq!(
            links[0].span_context.span_id(),
            accepting.span_context.span_id()
        );
        assert_eq!(trace_id(&tracing::Span::none()), "");
        link_to_traceparent(&tracing::Span::none(), "garbage");
        assert!(span_context_from_traceparent("").is_none());
        assert!(span_context_from_traceparent("00-zz-yy-01").is_none());
    }
}
