//! smtp-ingress: the ESMTP server of mailsuite for MX (25), submission with STARTTLS (587)
//! and submission over implicit TLS (465). Stateless: lookups go to mailbox-store's
//! Directory, accepted mail to Delivery (only local recipients) or relay-queue's Queue.
//!
//! Layers: `codec` (bytes → commands, DATA/BDAT readers) → `session` (state machine) →
//! `connection` (I/O, TLS, timeouts, shutdown); `reply` maps service errors to SMTP replies.

pub mod backend;
pub mod budget;
pub mod codec;
pub mod config;
pub mod connection;
pub mod domains;
pub mod limits;
pub mod reply;
pub mod session;
pub mod verify;

use std::net::SocketAddr;
use std::sync::Arc;

use mailsuite_runtime::Shutdown;
use mailsuite_runtime::listener::{self, LimitedListener};
use mailsuite_runtime::stream::{MailStream, TLS_HANDSHAKE_TIMEOUT};
use tokio_rustls::TlsAcceptor;

pub use backend::{Backend, GrpcBackend};
pub use config::Config;
use session::{Port, Session, Shared};
pub use verify::Verifier;

/// Why smtp-ingress could not start.
pub use mailsuite_runtime::service::StartError as Error;

impl From<verify::VerifyError> for Error {
    fn from(e: verify::VerifyError) -> Error {
        Error::Other(format!("dns: {e}"))
    }
}

/// The listeners by the names `proxy_protocol.listeners` uses: MX, submission with STARTTLS,
/// submission over implicit TLS.
pub const LISTENERS: [&str; 3] = ["smtp", "submission", "submissions"];

/// The bound address of every listener; `None` where disabled.
#[derive(Debug, Clone, Copy)]
pub struct Started {
    pub smtp: Option<SocketAddr>,
    pub submission: Option<SocketAddr>,
    pub submissions: Option<SocketAddr>,
    pub ops: Option<SocketAddr>,
}

/// Start with the gRPC backend named in the config and a DNS verifier from `config.dns`.
pub async fn start(config: Config, shutdown: Shutdown) -> Result<Started, Error> {
    let backend = GrpcBackend::new(
        &config.store_url,
        &config.queue_url,
        config.internal_token.as_str(),
        std::time::Duration::from_secs(config.limits.store_timeout_secs.max(1)),
    )?;
    let verifier = if config.policy.verify_inbound {
        Some(Verifier::new(&config.dns, &config.hostname)?)
    } else {
        None
    };
    start_with(config, backend, verifier, shutdown).await
}

/// Start with a given backend and verifier (tests inject DNS records through the verifier).
pub async fn start_with<B: Backend>(
    config: Config,
    backend: B,
    verifier: Option<Verifier>,
    shutdown: Shutdown,
) -> Result<Started, Error> {
    let tls = TlsAcceptor::from(mailsuite_runtime::tls::server_config(&config.tls)?);
    let limits = config.limits.conn_limits();
    let ([smtp, submission, submissions], ops) = LimitedListener::bind_all(
        [
            &config.listen_smtp,
            &config.listen_submission,
            &config.listen_submissions,
        ],
        &LISTENERS,
        limits,
        &config.proxy_protocol,
        &config.listen_ops,
    )
    .await?;
    let started = Started {
        smtp: smtp.as_ref().map(|l| l.local_addr()).transpose()?,
        submission: submission.as_ref().map(|l| l.local_addr()).transpose()?,
        submissions: submissions.as_ref().map(|l| l.local_addr()).transpose()?,
        ops: ops.as_ref().map(|l| l.local_addr()).transpose()?,
    };
    let rates = limits::RateLimiter::new(&config.limits);
    let l = &config.limits;
    if l.max_body_bytes_in_flight < l.max_message_bytes {
        tracing::warn!(
            max_body_bytes_in_flight = l.max_body_bytes_in_flight,
            max_message_bytes = l.max_message_bytes,
            "limits.max_body_bytes_in_flight is below limits.max_message_bytes: \
             messages near the size limit will always get 452"
        );
    }
    if l.max_body_bytes_in_flight_per_ip < l.max_message_bytes {
        tracing::warn!(
            max_body_bytes_in_flight_per_ip = l.max_body_bytes_in_flight_per_ip,
            max_message_bytes = l.max_message_bytes,
            "limits.max_body_bytes_in_flight_per_ip is below limits.max_message_bytes: \
             messages near the size limit will always get 452"
        );
    }
    let body_budget = budget::BodyBudget::new(
        l.max_body_bytes_in_flight,
        l.max_body_bytes_in_flight_per_ip,
    );
    let config_local_domain_ttl = config.policy.local_domain_cache_secs;
    let shared = Arc::new(Shared {
        config,
        backend,
        rates,
        verifier,
        tls_available: true,
        body_budget,
        local_domains: domains::DomainCache::new(
            std::time::Duration::from_secs(config_local_domain_ttl),
            domains::MAX_DOMAINS,
        ),
    });
    for (listener, port, name) in [
        (smtp, Port::Mx, LISTENERS[0]),
        (submission, Port::Submission, LISTENERS[1]),
        (submissions, Port::Submissions, LISTENERS[2]),
    ] {
        if let Some(l) = listener {
            shutdown.spawn(accept_loop(
                l,
                port,
                name,
                shared.clone(),
                tls.clone(),
                shutdown.clone(),
            ));
        }
    }
    if let Some(listener) = ops {
        let o = mailsuite_runtime::metrics::ops();
        let l = &shared.config.limits;
        let (interval, deadline) = (
            std::time::Duration::from_secs(l.store_health_interval_secs.max(1)),
            std::time::Duration::from_secs(l.store_timeout_secs.max(1)),
        );
        let backend = shared.clone();
        shutdown.spawn(mailsuite_store_client::track_readiness(
            move || {
                let b = backend.clone();
                async move { b.backend.ready().await }
            },
            o.clone(),
            shutdown.clone(),
            interval,
            deadline,
        ));
        shutdown.spawn(o.serve(listener, shutdown.clone()));
    }
    tracing::info!(?started, "smtp-ingress listening");
    Ok(started)
}

/// Serve one listener on the runtime's accept loop (connection limits, PROXY header,
/// refusals, shutdown). `peer` is the client: on a PROXY listener the address the trusted
/// balancer's header gave, read before the TLS handshake of the implicit-TLS port.
async fn accept_loop<B: Backend>(
    listener: LimitedListener,
    port: Port,
    name: &'static str,
    shared: Arc<Shared<B>>,
    tls: TlsAcceptor,
    shutdown: Shutdown,
) {
    let listener_port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    // Implicit TLS: a plaintext 421 would be garbage to the client's TLS stack, and a
    // handshake just to refuse is what a flood wants us to spend. Close.
    let refusal: Option<&'static [u8]> = (port != Port::Submissions)
        .then_some(b"421 4.7.0 Too many connections, try again later\r\n");
    let sd = shutdown.clone();
    listener::accept_loop(
        listener,
        shutdown,
        "mailsuite_smtp_connections_total",
        name,
        refusal,
        move |stream, peer| {
            let (shared, tls, sd) = (shared.clone(), tls.clone(), sd.clone());
            // The root of every message's trace; OpenTelemetry semantic conventions for
            // the connection (never addresses or content).
            let span = tracing::info_span!(
                "smtp.session",
                otel.kind = "server",
                network.transport = "tcp",
                network.peer.address = %peer.ip(),
                network.peer.port = peer.port(),
                server.port = listener_port,
                port = ?port,
            );
            tracing::Instrument::instrument(
                async move {
                    let stream: Box<dyn connection::Io> = Box::new(stream);
                    let io = if port == Port::Submissions {
                        match MailStream::accept(stream, &tls, TLS_HANDSHAKE_TIMEOUT).await {
                            Ok(io) => io,
                            Err(e) => {
                                tracing::debug!(%peer, error = %e, "implicit TLS handshake failed");
                                return;
                            }
                        }
                    } else {
                        MailStream::Plain(stream)
                    };
                    let session = Session::new(shared.clone(), port, peer, io.tls_info());
                    connection::serve(io, session, shared, Some(tls), sd).await;
                },
                span,
            )
        },
    )
    .await
}
