//! imap-gateway: IMAP4rev1 (RFC 3501, with the RFC 9051 rules that apply to it) in front of
//! mailbox-store, STARTTLS on 143 and implicit TLS on 993. Stateless: every durable fact lives
//! in the store, so any number of replicas may run.
//!
//! Layers: `codec` (bytes → commands, literals and limits; imap-codec underneath) →
//! `session` (states, sequence numbers, replies) → `connection` (sockets, TLS, IDLE, timers,
//! shutdown). `hub` fans one Mailbox.Watch stream out to all sessions of the process, and
//! `changes_cache` shares one Changes poll per mailbox change among them.

pub mod authlimit;
pub mod changes_cache;
pub mod codec;
pub mod config;
pub mod connection;
pub mod convert;
pub mod esearch;
pub mod hub;
pub mod mutf7;
pub mod preparse;
pub mod seqmap;
pub mod session;
pub mod sort;
pub mod store;
pub mod thread;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mailsuite_runtime::Shutdown;
use mailsuite_runtime::listener::{self, LimitedListener};
use mailsuite_runtime::metrics;
use tokio_rustls::TlsAcceptor;

pub use config::Config;
use connection::Shared;

/// Why the gateway could not start.
pub use mailsuite_runtime::service::StartError as Error;

/// The listeners by the names `proxy_protocol.listeners` uses: STARTTLS, implicit TLS.
pub const LISTENERS: [&str; 2] = ["imap", "imaps"];

/// The bound address of every listener (`None`: disabled by an empty listen address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Started {
    pub imap: Option<SocketAddr>,
    pub imaps: Option<SocketAddr>,
    pub ops: Option<SocketAddr>,
}

/// Bind every listener, then serve IMAP against the mailbox-store at `config.store_url`
/// until `shutdown`.
pub async fn start(config: Config, shutdown: Shutdown) -> Result<Started, Error> {
    if config.limits.idle_timeout_secs < 30 * 60 {
        tracing::warn!(
            idle_timeout_secs = config.limits.idle_timeout_secs,
            "RFC 9051 requires an autologout timer of at least 30 minutes"
        );
    }
    let store = store::Store::connect(
        &config.store_url,
        config.internal_token.as_str(),
        Duration::from_secs(config.limits.store_timeout_secs.max(1)),
    )?;
    let acceptor = TlsAcceptor::from(mailsuite_runtime::tls::server_config(&config.tls)?);
    let ([imap, imaps], ops) = LimitedListener::bind_all(
        [&config.listen_imap, &config.listen_imaps],
        &LISTENERS,
        config.limits.connections,
        &config.proxy_protocol,
        &config.listen_ops,
    )
    .await?;
    let started = Started {
        imap: imap.as_ref().map(|l| l.local_addr()).transpose()?,
        imaps: imaps.as_ref().map(|l| l.local_addr()).transpose()?,
        ops: ops.as_ref().map(|l| l.local_addr()).transpose()?,
    };
    let hub = hub::Hub::with_cache(
        config.limits.max_sessions_per_account,
        changes_cache::CacheLimits {
            mailboxes: config.limits.changes_cache_mailboxes,
            entries: config.limits.changes_cache_entries,
        },
    );
    shutdown.spawn(hub.clone().run(store.clone(), shutdown.clone()));
    let auth_limiter = Arc::new(
        authlimit::AuthLimiter::new(
            config.limits.max_auth_failures_per_ip,
            std::time::Duration::from_secs(config.limits.auth_failure_window_secs),
            config.limits.max_tracked_clients,
        )
        .with_account_limit(
            config.limits.max_auth_failures_per_account,
            std::time::Duration::from_secs(config.limits.account_auth_failure_window_secs),
        ),
    );
    let shared = Arc::new(Shared {
        auth_limiter,
        config,
        store,
        hub,
        tls: Some(acceptor),
        shutdown: shutdown.clone(),
    });
    if let Some(l) = imap {
        shutdown.spawn(accept_loop(shared.clone(), l, false));
    }
    if let Some(l) = imaps {
        shutdown.spawn(accept_loop(shared.clone(), l, true));
    }
    if let Some(l) = ops {
        let ops = metrics::ops();
        let l_ = &shared.config.limits;
        let (interval, deadline) = (
            Duration::from_secs(l_.store_health_interval_secs.max(1)),
            Duration::from_secs(l_.store_timeout_secs.max(1)),
        );
        let store = shared.store.client().clone();
        shutdown.spawn(mailsuite_store_client::track_readiness(
            move || {
                let s = store.clone();
                async move { s.ready().await }
            },
            ops.clone(),
            shutdown.clone(),
            interval,
            deadline,
        ));
        shutdown.spawn(ops.serve(l, shutdown.clone()));
    }
    tracing::info!(?started, "imap-gateway listening");
    Ok(started)
}

async fn accept_loop(shared: Arc<Shared>, listener: LimitedListener, tls: bool) {
    let refusal: &'static [u8] = b"* BYE [UNAVAILABLE] Too many connections\r\n";
    listener::accept_loop(
        listener,
        shared.shutdown.clone(),
        "mailsuite_imap_connections_total",
        LISTENERS[usize::from(tls)],
        (!tls).then_some(refusal),
        move |stream, peer| connection::handle(shared.clone(), stream, peer, tls),
    )
    .await
}
