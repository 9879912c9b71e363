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
use mailsuite_runtime::listener::{Admission, LimitedListener};
use tokio::io::AsyncWriteExt;
use tokio_rustls::TlsAcceptor;

pub use backend::{Backend, GrpcBackend};
pub use config::Config;
use session::{Port, Session, Shared};
pub use verify::Verifier;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("tls: {0}")]
    Tls(#[from] mailsuite_runtime::tls::TlsError),
    #[error("grpc endpoint: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("dns: {0}")]
    Verify(#[from] verify::VerifyError),
}

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
    )?
    .with_timeout(std::time::Duration::from_secs(
        config.limits.rpc_timeout_secs.max(1),
    ));
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
    let bind = |addr: String| async move {
        if addr.is_empty() {
            Ok::<_, std::io::Error>(None)
        } else {
            Ok(Some(LimitedListener::bind(&addr, limits).await?))
        }
    };
    let smtp = bind(config.listen_smtp.clone()).await?;
    let submission = bind(config.listen_submission.clone()).await?;
    let submissions = bind(config.listen_submissions.clone()).await?;
    let ops = if config.listen_ops.is_empty() {
        None
    } else {
        Some(mailsuite_runtime::grpc::bind(&config.listen_ops).await?)
    };
    let started = Started {
        smtp: smtp.as_ref().map(|l| l.local_addr()).transpose()?,
        submission: submission.as_ref().map(|l| l.local_addr()).transpose()?,
        submissions: submissions.as_ref().map(|l| l.local_addr()).transpose()?,
        ops: ops.as_ref().map(|o| o.1),
    };
    let rates = limits::RateLimiter::new(&config.limits);
    let l = &config.limits;
    if l.max_body_bytes_in_flight < l.max_message_size {
        tracing::warn!(
            max_body_bytes_in_flight = l.max_body_bytes_in_flight,
            max_message_size = l.max_message_size,
            "limits.max_body_bytes_in_flight is below limits.max_message_size: \
             messages near the size limit will always get 452"
        );
    }
    if l.max_body_bytes_in_flight_per_ip < l.max_message_size {
        tracing::warn!(
            max_body_bytes_in_flight_per_ip = l.max_body_bytes_in_flight_per_ip,
            max_message_size = l.max_message_size,
            "limits.max_body_bytes_in_flight_per_ip is below limits.max_message_size: \
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
    for (listener, port) in [
        (smtp, Port::Mx),
        (submission, Port::Submission),
        (submissions, Port::Submissions),
    ] {
        if let Some(l) = listener {
            shutdown.spawn(accept_loop(
                l,
                port,
                shared.clone(),
                tls.clone(),
                shutdown.clone(),
            ));
        }
    }
    if let Some((listener, _)) = ops {
        let o = mailsuite_runtime::metrics::ops();
        o.set_ready(true);
        shutdown.spawn(o.serve(listener, shutdown.clone()));
    }
    tracing::info!(?started, "smtp-ingress listening");
    Ok(started)
}

async fn accept_loop<B: Backend>(
    listener: LimitedListener,
    port: Port,
    shared: Arc<Shared<B>>,
    tls: TlsAcceptor,
    shutdown: Shutdown,
) {
    let listener_port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    loop {
        let admission = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.stopping() => return,
        };
        match admission {
            Ok(Admission::Accepted {
                stream,
                peer,
                guard,
            }) => {
                let shared = shared.clone();
                let tls = tls.clone();
                let sd = shutdown.clone();
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
                shutdown.spawn(tracing::Instrument::instrument(async move {
                    let _guard = guard;
                    let (io, info): (Box<dyn connection::Io>, _) = if port == Port::Submissions {
                        match connection::into_tls(stream, &tls).await {
                            Ok((io, info)) => (io, Some(info)),
                            Err(e) => {
                                tracing::debug!(%peer, error = %e, "implicit TLS handshake failed");
                                return;
                            }
                        }
                    } else {
                        (Box::new(stream), None)
                    };
                    let session = Session::new(shared.clone(), port, peer, info);
                    connection::serve(io, session, shared, Some(tls), sd).await;
                }, span));
            }
            Ok(Admission::Refused {
                mut stream, reason, ..
            }) => {
                let which = match reason {
                    mailsuite_runtime::listener::RefuseReason::TooManyFromIp => "per_ip",
                    mailsuite_runtime::listener::RefuseReason::TooManyConnections => "total",
                };
                mailsuite_runtime::metrics::counter(
                    "mailsuite_smtp_connections_refused_total",
                    &[("reason", which)],
                )
                .inc();
                if port == Port::Submissions {
                    // Implicit TLS: a plaintext 421 would be garbage to the client's TLS stack,
                    // and a handshake just to refuse is what a flood wants us to spend. Close.
                    drop(stream);
                    continue;
                }
                shutdown.spawn(async move {
                    let text =
                        format!("421 4.7.0 Too many connections ({reason:?}), try again later\r\n");
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                        let _ = stream.write_all(text.as_bytes()).await;
                        let _ = stream.shutdown().await;
                    })
                    .await;
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                // Out of file descriptors and similar: back off instead of spinning.
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_millis(50)) => {}
                    _ = shutdown.stopping() => return,
                }
            }
        }
    }
}
