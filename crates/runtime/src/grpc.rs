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
        ClientTrace { inner, auth: None }
    }
}

#[derive(Clone, Debug)]
pub struct ClientTrace<S> {
    inner: S,
    /// `authorization: Bearer <internal token>`, sent on every call when set.
    auth: Option<http::HeaderValue>,
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
        if let Some(auth) = &self.auth {
            req.headers_mut()
                .insert(http::header::AUTHORIZATION, auth.clone());
        }
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

/// The secret the services share to authenticate gRPC calls to each other
/// (`internal_token` in every service's configuration, `MAILSUITE_INTERNAL_TOKEN` in the
/// environment). Debug output never shows it.
#[derive(Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct InternalToken(pub String);

impl InternalToken {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// 32 random bytes, hex: for `mailsuite up`, where one process starts every service.
    pub fn random() -> InternalToken {
        use rand::RngCore;
        let mut b = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut b);
        InternalToken(b.iter().map(|x| format!("{x:02x}")).collect())
    }
}

impl std::fmt::Debug for InternalToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_empty() { "(none)" } else { "(set)" })
    }
}

/// The channel type every gRPC client in mailsuite uses.
pub type GrpcChannel = ClientTrace<Channel>;

/// A channel that connects on first use and reconnects as needed (so services may start in
/// any order), sending no internal token.
pub fn connect_lazy(url: &str) -> Result<GrpcChannel, tonic::transport::Error> {
    connect_lazy_with_token(url, "")
}

/// [`connect_lazy`] that authenticates every call with the services' shared internal token
/// (see [`ServerAuthLayer`]); an empty token sends none.
pub fn connect_lazy_with_token(
    url: &str,
    token: &str,
) -> Result<GrpcChannel, tonic::transport::Error> {
    let ep = Endpoint::from_shared(url.to_string())?
        .connect_timeout(std::time::Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(std::time::Duration::from_secs(30))
        .keep_alive_while_idle(true);
    let mut channel = ClientTraceLayer.layer(ep.connect_lazy());
    channel.auth = bearer(token);
    Ok(channel)
}

fn bearer(token: &str) -> Option<http::HeaderValue> {
    if token.is_empty() {
        return None;
    }
    let mut v = http::HeaderValue::from_str(&format!("Bearer {token}")).ok()?;
    v.set_sensitive(true);
    Some(v)
}

/// Server side: every call but the health service's must carry
/// `authorization: Bearer <token>`, else it fails with `UNAUTHENTICATED` before reaching a
/// handler. An empty token disables the check (a single host or a trusted network only).
///
/// Why a shared token and not mTLS: it needs no certificate authority in compose or
/// Kubernetes (one Secret), and health stays open for probes that cannot send headers.
#[derive(Clone, Debug, Default)]
pub struct ServerAuthLayer {
    expected: Option<std::sync::Arc<[u8]>>,
}

impl ServerAuthLayer {
    pub fn new(token: &str) -> Self {
        ServerAuthLayer {
            expected: (!token.is_empty()).then(|| format!("Bearer {token}").into_bytes().into()),
        }
    }
}

impl<S> Layer<S> for ServerAuthLayer {
    type Service = ServerAuth<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ServerAuth {
            inner,
            expected: self.expected.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct ServerAuth<S> {
    inner: S,
    expected: Option<std::sync::Arc<[u8]>>,
}

/// Equal-length comparison that does not stop at the first differing byte.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl<S, B, RB> Service<http::Request<B>> for ServerAuth<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    RB: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if let Some(expected) = &self.expected {
            let open = req.uri().path().starts_with("/grpc.health.v1.Health/");
            let given = req
                .headers()
                .get(http::header::AUTHORIZATION)
                .map(|v| v.as_bytes())
                .unwrap_or_default();
            if !open && !same_secret(given, expected) {
                crate::metrics::counter("mailsuite_grpc_unauthenticated_total", &[]).inc();
                let res = crate::error::internal_token_refused().into_http::<RB>();
                return Box::pin(async move { Ok(res) });
            }
        }
        Box::pin(self.inner.call(req))
    }
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

/// Whether a gRPC server may serve on `bound` with `token`: refused when the token is empty
/// and the address is reachable from other hosts, unless `allow_unauthenticated` says the
/// operator wants exactly that. Without a token every caller is trusted, so an exposed
/// store would hand out every mailbox and DKIM key (review finding H4): fail closed, and
/// say loudly when an operator opts out.
pub fn check_exposure(
    service: &str,
    bound: SocketAddr,
    token: &InternalToken,
    allow_unauthenticated: bool,
) -> Result<(), String> {
    if !token.is_empty() {
        tracing::info!(%service, %bound, "gRPC calls require the internal token");
        return Ok(());
    }
    if bound.ip().is_loopback() {
        tracing::info!(
            %service, %bound,
            "gRPC without an internal token: allowed because the listener is loopback only"
        );
        return Ok(());
    }
    if allow_unauthenticated {
        tracing::warn!(
            %service, %bound,
            "gRPC WITHOUT AUTHENTICATION on a non-loopback address \
             (allow_unauthenticated_grpc = true): anyone who can reach it can read all mail"
        );
        return Ok(());
    }
    Err(format!(
        "{service}: refusing to serve gRPC on {bound} without an internal token: set \
         internal_token (MAILSUITE_INTERNAL_TOKEN) to the secret every service shares, listen \
         on a loopback address, or set allow_unauthenticated_grpc = true on a trusted network"
    ))
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

    /// The auth layer in front of a handler that always answers OK: which requests reach it.
    #[tokio::test]
    async fn internal_token_is_required_except_for_health() {
        use tower::{Layer, ServiceExt};
        let handler = tower::service_fn(|_req: http::Request<()>| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(String::from("handled")))
        });
        let call = |layer: super::ServerAuthLayer, path: &str, auth: Option<&str>| {
            let svc = layer.layer(handler);
            let mut req = http::Request::builder().uri(path);
            if let Some(a) = auth {
                req = req.header(http::header::AUTHORIZATION, a);
            }
            let req = req.body(()).unwrap();
            async move {
                let res = svc.oneshot(req).await.unwrap();
                let status = res
                    .headers()
                    .get("grpc-status")
                    .map(|v| v.to_str().unwrap().to_string());
                (status, res.into_body())
            }
        };
        let on = || super::ServerAuthLayer::new("s3cret");
        let rpc = "/mailsuite.v1.Admin/ListDomains";
        let handled = (None, "handled".to_string());
        let refused = (Some("16".to_string()), String::new());
        assert_eq!(call(on(), rpc, Some("Bearer s3cret")).await, handled);
        assert_eq!(call(on(), rpc, None).await, refused);
        assert_eq!(call(on(), rpc, Some("Bearer s3cre")).await, refused);
        assert_eq!(call(on(), rpc, Some("Bearer s3cret2")).await, refused);
        assert_eq!(call(on(), rpc, Some("s3cret")).await, refused);
        // Probes cannot send headers: health stays open.
        let health = "/grpc.health.v1.Health/Check";
        assert_eq!(call(on(), health, None).await, handled);
        // An empty token switches the check off.
        let off = super::ServerAuthLayer::new("");
        assert_eq!(call(off, rpc, None).await, handled);
    }

    #[test]
    fn h4_no_token_is_refused_off_loopback() {
        use super::{InternalToken, check_exposure};
        let none = InternalToken::default();
        let some = InternalToken("t".into());
        let any: std::net::SocketAddr = "0.0.0.0:50051".parse().unwrap();
        let lan: std::net::SocketAddr = "[2001:db8::1]:50051".parse().unwrap();
        let lo4: std::net::SocketAddr = "127.0.0.1:50051".parse().unwrap();
        let lo6: std::net::SocketAddr = "[::1]:50051".parse().unwrap();
        let e = check_exposure("mailbox-store", any, &none, false).unwrap_err();
        assert!(e.contains("internal_token"), "{e}");
        assert!(check_exposure("s", lan, &none, false).is_err());
        assert!(check_exposure("s", lo4, &none, false).is_ok());
        assert!(check_exposure("s", lo6, &none, false).is_ok());
        assert!(check_exposure("s", any, &some, false).is_ok());
        assert!(
            check_exposure("s", any, &none, true).is_ok(),
            "explicit opt-out"
        );
    }

    #[test]
    fn token_is_never_in_debug_output_and_random_ones_differ() {
        let t = super::InternalToken::random();
        assert_eq!(t.as_str().len(), 64);
        assert_ne!(t, super::InternalToken::random());
        assert!(!format!("{t:?}").contains(t.as_str()));
    }

    #[test]
    fn client_sends_the_bearer_only_with_a_token() {
        assert!(super::bearer("").is_none());
        let v = super::bearer("abc").unwrap();
        assert_eq!(v.as_bytes(), b"Bearer abc");
        assert!(
            v.is_sensitive(),
            "kept out of debug output and HPACK tables"
        );
    }
}
