//! gRPC plumbing shared by every service: W3C trace-context propagation (a tower layer on
//! each side, so one SMTP transaction is one trace across services), the health service, and
//! lazily connecting channels.

use std::net::SocketAddr;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use opentelemetry::propagation::{Extractor, Injector};
use tokio::net::TcpListener;
use tonic::transport::{Channel, Endpoint};
use tower::{Layer, Service};
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

pub use tonic_health::server::{HealthReporter, health_reporter};

struct HeaderInjector<'a>(&'a mut http::HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            http::header::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(k, v);
        }
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// `/pkg.Service/Method` → ("pkg.Service", "Method").
fn rpc_parts(path: &str) -> (String, String) {
    let mut it = path.trim_start_matches('/').splitn(2, '/');
    let svc = it.next().unwrap_or("").to_string();
    let method = it.next().unwrap_or("").to_string();
    (svc, method)
}

/// Server side: continue the caller's trace (from `traceparent`) in a `grpc.server` span.
#[derive(Clone, Copy, Debug, Default)]
pub struct ServerTraceLayer;

impl<S> Layer<S> for ServerTraceLayer {
    type Service = ServerTrace<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ServerTrace { inner }
    }
}

#[derive(Clone, Debug)]
pub struct ServerTrace<S> {
    inner: S,
}

impl<S, B, RB> Service<http::Request<B>> for ServerTrace<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let parent = opentelemetry::global::get_text_map_propagator(|p| {
            p.extract(&HeaderExtractor(req.headers()))
        });
        let (svc, method) = rpc_parts(req.uri().path());
        let span = tracing::info_span!(
            "grpc.server",
            otel.name = format!("{svc}/{method}"),
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = svc,
            rpc.method = method,
            rpc.grpc.status_code = tracing::field::Empty,
        );
        let _ = span.set_parent(parent);
        let fut = self.inner.call(req);
        let timing = Timing::start("mailsuite_grpc_server_duration_seconds", svc, method);
        let recorded = span.clone();
        Box::pin(
            async move {
                let res = fut.await;
                timing.finish(&recorded, res.as_ref().map(|r| r.headers()).ok());
                res
            }
            .instrument(span),
        )
    }
}

/// Client side: a `grpc.client` span whose context is sent as `traceparent`.
#[derive(Clone, Copy, Debug, Default)]
pub struct ClientTraceLayer;

impl<S> Layer<S> for ClientTraceLayer {
    type Service = ClientTrace<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ClientTrace { inner }
    }
}

#[derive(Clone, Debug)]
pub struct ClientTrace<S> {
    inner: S,
}

impl<S, B, RB> Service<http::Request<B>> for ClientTrace<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let (svc, method) = rpc_parts(req.uri().path());
        let span = tracing::info_span!(
            "grpc.client",
            otel.name = format!("{svc}/{method}"),
            otel.kind = "client",
            rpc.system = "grpc",
            rpc.service = svc,
            rpc.method = method,
            rpc.grpc.status_code = tracing::field::Empty,
        );
        let cx = span.context();
        opentelemetry::global::get_text_map_propagator(|p| {
            p.inject_context(&cx, &mut HeaderInjector(req.headers_mut()))
        });
        let fut = self.inner.call(req);
        let timing = Timing::start("mailsuite_grpc_client_duration_seconds", svc, method);
        let recorded = span.clone();
        Box::pin(
            async move {
                let res = fut.await;
                timing.finish(&recorded, res.as_ref().map(|r| r.headers()).ok());
                res
            }
            .instrument(span),
        )
    }
}

/// Latency of one call until its response headers, by service, method and gRPC status. The
/// status is known here when the call failed before any message (a "trailers-only" response,
/// which is how tonic answers a handler's `Err(Status)`); a status sent in trailers after a
/// streamed body counts as OK.
struct Timing {
    metric: &'static str,
    service: String,
    method: String,
    start: std::time::Instant,
}

impl Timing {
    fn start(metric: &'static str, service: String, method: String) -> Timing {
        Timing {
            metric,
            service,
            method,
            start: std::time::Instant::now(),
        }
    }

    fn finish(self, span: &tracing::Span, headers: Option<&http::HeaderMap>) {
        let code = match headers {
            None => "UNAVAILABLE",
            Some(h) => match h.get("grpc-status").and_then(|v| v.to_str().ok()) {
                None | Some("0") => "OK",
                Some(c) => grpc_code_name(c),
            },
        };
        span.record("rpc.grpc.status_code", code);
        crate::metrics::histogram(
            self.metric,
            &[
                ("rpc_service", self.service.as_str()),
                ("rpc_method", self.method.as_str()),
                ("code", code),
            ],
        )
        .observe_duration(self.start.elapsed());
    }
}

/// gRPC status number → its canonical name (a bounded label set).
fn grpc_code_name(code: &str) -> &'static str {
    match code {
        "0" => "OK",
        "1" => "CANCELLED",
        "2" => "UNKNOWN",
        "3" => "INVALID_ARGUMENT",
        "4" => "DEADLINE_EXCEEDED",
        "5" => "NOT_FOUND",
        "6" => "ALREADY_EXISTS",
        "7" => "PERMISSION_DENIED",
        "8" => "RESOURCE_EXHAUSTED",
        "9" => "FAILED_PRECONDITION",
        "10" => "ABORTED",
        "11" => "OUT_OF_RANGE",
        "12" => "UNIMPLEMENTED",
        "13" => "INTERNAL",
        "14" => "UNAVAILABLE",
        "15" => "DATA_LOSS",
        "16" => "UNAUTHENTICATED",
        _ => "UNKNOWN",
    }
}

/// The channel type every gRPC client in mailsuite uses.
pub type GrpcChannel = ClientTrace<Channel>;

/// A channel that connects on first use and reconnects as needed (so services may start in
/// any order).
pub fn connect_lazy(url: &str) -> Result<GrpcChannel, tonic::transport::Error> {
    let ep = Endpoint::from_shared(url.to_string())?
        .connect_timeout(std::time::Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(std::time::Duration::from_secs(30))
        .keep_alive_while_idle(true);
    Ok(ClientTraceLayer.layer(ep.connect_lazy()))
}

/// Turn a bound listener into the incoming stream tonic serves from.
///
/// Accepted sockets get TCP_NODELAY: tonic does not apply its own `tcp_nodelay` on this path,
/// and without it every small reply waits for the peer's delayed ACK (~40 ms per call).
pub fn incoming(
    listener: TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> + Send + 'static {
    use futures::StreamExt;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|accepted| {
        accepted.inspect(|s| {
            let _ = s.set_nodelay(true);
        })
    })
}

/// Bind a gRPC listener, naming the address in the error.
pub async fn bind(addr: &str) -> std::io::Result<(TcpListener, SocketAddr)> {
    let l = TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
    let a = l.local_addr()?;
    Ok((l, a))
}

#[cfg(test)]
mod tests {
    #[test]
    fn rpc_parts_split() {
        assert_eq!(
            super::rpc_parts("/mailsuite.v1.Delivery/Deliver"),
            ("mailsuite.v1.Delivery".to_string(), "Deliver".to_string())
        );
        assert_eq!(super::rpc_parts("/"), (String::new(), String::new()));
    }
}
