//! pop3-gateway: POP3 (RFC 1939) with CAPA (RFC 2449), STLS (RFC 2595), AUTH PLAIN (RFC 5034)
//! and implicit TLS on 995, in front of mailbox-store. Stateless: the maildrop lock lives in
//! PostgreSQL (through the store), so any number of replicas may run.
//!
//! Layers: `codec` (lines → commands, replies → bytes, message byte-stuffing) → `session`
//! (the RFC 1939 state machine, no I/O) → `connection` (sockets, TLS, timers, shutdown);
//! `store` is the mailbox-store client behind the `backend::Backend` trait.

pub mod backend;
pub mod codec;
pub mod config;
pub mod connection;
pub mod session;
pub mod store;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mailsuite_runtime::Shutdown;
use mailsuite_runtime::listener::{self, LimitedListener};
use mailsuite_runtime::metrics;
use tokio_rustls::TlsAcceptor;

pub use backend::Backend;
pub use config::Config;
use connection::Shared;
pub use store::StoreBackend;

/// Why the gateway could not start.
pub use mailsuite_runtime::service::StartError as Error;

/// The listeners by the names `proxy_protocol.listeners` uses: STARTTLS, implicit TLS.
pub const LISTENERS: [&str; 2] = ["pop3", "pop3s"];

/// The bound address of every listener (`None`: disabled by an empty listen address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Started {
    pub pop3: Option<SocketAddr>,
    pub pop3s: Option<SocketAddr>,
    pub ops: Option<SocketAddr>,
}

/// Bind every listener, then serve POP3 against the mailbox-store at `config.store_url`
/// until `shutdown`.
pub async fn start(config: Config, shutdown: Shutdown) -> Result<Started, Error> {
    let backend = StoreBackend::connect(
        &config.store_url,
        config.internal_token.as_str(),
        Duration::from_secs(config.limits.store_timeout_secs.max(1)),
        config.limits.fetch_window_bytes,
    )?;
    start_with(backend, config, shutdown).await
}

/// `start` with any backend (tests use an in-memory one).
pub async fn start_with<B: Backend>(
    backend: B,
    config: Config,
    shutdown: Shutdown,
) -> Result<Started, Error> {
    if config.limits.idle_timeout_secs < 600 {
        tracing::warn!(
            idle_timeout_secs = config.limits.idle_timeout_secs,
            "RFC 1939 requires an auto-logout timer of at least 10 minutes"
        );
    }
    let acceptor = TlsAcceptor::from(mailsuite_runtime::tls::server_config(&config.tls)?);
    let ([pop3, pop3s], ops) = LimitedListener::bind_all(
        [&config.listen_pop3, &config.listen_pop3s],
        &LISTENERS,
        config.limits.connections,
        &config.proxy_protocol,
        &config.listen_ops,
    )
    .await?;
    let started = Started {
        pop3: pop3.as_ref().map(|l| l.local_addr()).transpose()?,
        pop3s: pop3s.as_ref().map(|l| l.local_addr()).transpose()?,
        ops: ops.as_ref().map(|l| l.local_addr()).transpose()?,
    };

    let shared = Arc::new(Shared::new(backend, config, acceptor, shutdown.clone()));
    if let Some(l) = pop3 {
        shutdown.spawn(accept_loop(shared.clone(), l, false));
    }
    if let Some(l) = pop3s {
        shutdown.spawn(accept_loop(shared.clone(), l, true));
    }
    if let Some(l) = ops {
        let ops = metrics::ops();
        shutdown.spawn(watch_store(shared.clone(), ops.clone()));
        shutdown.spawn(ops.serve(l, shutdown.clone()));
    }
    tracing::info!(?started, "pop3-gateway listening");
    Ok(started)
}

/// Keep `/readyz` in step with the store's health (see `mailsuite_store_client`).
async fn watch_store<B: Backend>(shared: Arc<Shared<B>>, ops: mailsuite_runtime::ops::Ops) {
    let limits = &shared.config.limits;
    let interval = Duration::from_secs(limits.store_health_interval_secs.max(1));
    let deadline = Duration::from_secs(limits.store_timeout_secs.max(1));
    let shutdown = shared.shutdown.clone();
    let check = move || {
        let shared = shared.clone();
        async move { shared.backend.ready().await }
    };
    mailsuite_store_client::track_readiness(check, ops, shutdown, interval, deadline).await
}

async fn accept_loop<B: Backend>(shared: Arc<Shared<B>>, listener: LimitedListener, tls: bool) {
    let refusal: &'static [u8] = b"-ERR [SYS/TEMP] too many connections\r\n";
    listener::accept_loop(
        listener,
        shared.shutdown.clone(),
        "mailsuite_pop3_connections_total",
        LISTENERS[usize::from(tls)],
        (!tls).then_some(refusal),
        move |stream, peer| connection::handle(shared.clone(), stream, peer, tls),
    )
    .await
}
