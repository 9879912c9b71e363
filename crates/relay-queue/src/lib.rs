//! relay-queue: the durable outbound queue. Accepts messages over gRPC (`Queue.Enqueue`,
//! replying only after the commit), delivers hosted-domain recipients through mailbox-store
//! and remote ones over SMTP (transport map, smarthost or MX), retries temporary failures on a
//! schedule, returns RFC 3464 DSNs, and DKIM-signs outbound mail.

pub mod config;
pub mod db;
pub mod dkim;
pub mod dsn;
pub mod route;
pub mod service;
pub mod smtp;
pub mod worker;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use mailsuite_proto::admin_client::AdminClient;
use mailsuite_proto::queue_server::QueueServer;
use mailsuite_runtime::{Shutdown, grpc};

pub use config::Config;

use crate::dkim::{KeySpec, Keyring};
use crate::service::QueueService;
use crate::worker::Engine;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("configuration: {0}")]
    Config(String),
    #[error("gRPC client: {0}")]
    Grpc(#[from] tonic::transport::Error),
}

/// The bound address of every listener (absent when disabled).
#[derive(Debug, Clone)]
pub struct Started {
    pub grpc: Option<SocketAddr>,
    pub ops: Option<SocketAddr>,
    /// The delivery engine (metrics; tests use it to wake the workers).
    pub engine: Arc<Engine>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").finish_non_exhaustive()
    }
}

fn config_keys(config: &Config) -> Result<Vec<KeySpec>, Error> {
    config
        .dkim
        .iter()
        .map(|k| {
            let pem = if k.private_key_pem.is_empty() {
                std::fs::read_to_string(&k.private_key_file).map_err(|e| {
                    Error::Config(format!("dkim key file {:?}: {e}", k.private_key_file))
                })?
            } else {
                k.private_key_pem.clone()
            };
            Ok(KeySpec {
                domain: k.domain.to_ascii_lowercase(),
                selector: k.selector.clone(),
                algorithm: k.algorithm.clone(),
                private_key_pem: pem,
            })
        })
        .collect()
}

pub async fn start(config: Config, shutdown: Shutdown) -> Result<Started, Error> {
    mailsuite_runtime::tls::install_crypto_provider();
    let pool =
        mailsuite_runtime::db::connect(&config.database_url, (config.workers.count as u32) * 2 + 8)
            .await?;
    if config.migrate_on_start {
        mailsuite_runtime::db::migrate(&pool).await?;
    }
    let keyring = Keyring::default();
    let static_keys = config_keys(&config)?;
    if let Some(e) = keyring.set(static_keys.clone()).into_iter().next() {
        return Err(Error::Config(e.to_string()));
    }
    let store = grpc::connect_lazy_with_token(&config.store_url, config.internal_token.as_str())?;
    let tls = smtp::TlsClients::new(&config.tls_extra_roots, &config.smarthost_ca_file)
        .map_err(Error::Config)?;
    if config.smarthost_tls_insecure_skip_verify && !config.smarthost.is_empty() {
        tracing::warn!(
            smarthost = %config.smarthost,
            "smarthost_tls_insecure_skip_verify is on: the smarthost's certificate is NOT \
             verified, so anyone on the network path can pose as it and read the smarthost \
             credentials and every relayed message"
        );
    }
    if !config.allow_private_mx_addresses {
        tracing::debug!("MX hosts with loopback/private addresses are refused");
    }

    // Bind everything before spawning anything.
    let grpc_listener = if config.listen_grpc.is_empty() {
        None
    } else {
        let (l, addr) = grpc::bind(&config.listen_grpc).await?;
        grpc::check_exposure(
            "relay-queue",
            addr,
            &config.internal_token,
            config.allow_unauthenticated_grpc,
        )
        .map_err(Error::Config)?;
        Some((l, addr))
    };
    let ops_listener = if config.listen_ops.is_empty() {
        None
    } else {
        Some(grpc::bind(&config.listen_ops).await?)
    };

    let engine = Engine::new(
        config.clone(),
        db::Db { pool },
        keyring.clone(),
        store.clone(),
        tls,
    );
    engine.spawn(&shutdown);
    shutdown.spawn(queue_gauges(engine.db.pool.clone(), shutdown.clone()));

    if config.dkim_from_store {
        let sd = shutdown.clone();
        let every = Duration::from_secs(config.dkim_refresh_secs.max(5));
        shutdown.spawn(async move {
            let mut admin = AdminClient::new(store);
            loop {
                match admin
                    .list_dkim_keys(mailsuite_proto::ListDkimKeysRequest {
                        domain: String::new(),
                        include_private: true,
                    })
                    .await
                {
                    Ok(r) => {
                        let mut specs = static_keys.clone();
                        specs.extend(r.into_inner().keys.into_iter().map(|k| KeySpec {
                            domain: k.domain.to_ascii_lowercase(),
                            selector: k.selector,
                            algorithm: k.algorithm,
                            private_key_pem: k.private_key_pem,
                        }));
                        if specs != keyring.specs() {
                            for e in keyring.set(specs) {
                                tracing::warn!("DKIM key from the store skipped: {e}");
                            }
                        }
                    }
                    Err(e) => tracing::debug!("DKIM keys from the store: {e}"),
                }
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = sd.stopping() => return,
                }
            }
        });
    }

    let grpc_addr = if let Some((listener, addr)) = grpc_listener {
        let (reporter, health) = grpc::health_reporter();
        reporter.set_serving::<QueueServer<QueueService>>().await;
        let svc = QueueServer::new(QueueService {
            engine: engine.clone(),
        })
        .max_decoding_message_size(4 * 1024 * 1024);
        let sd = shutdown.clone();
        let forced = shutdown.force_token();
        let auth = grpc::ServerAuthLayer::new(config.internal_token.as_str());
        shutdown.spawn(async move {
            let serve = tonic::transport::Server::builder()
                .layer(grpc::ServerTraceLayer)
                .layer(auth)
                .add_service(health)
                .add_service(svc)
                .serve_with_incoming_shutdown(grpc::incoming(listener), async move {
                    sd.stopping().await
                });
            // A graceful stop waits for clients to close their connections; one that never
            // does must not keep the process alive past the grace period.
            tokio::select! {
                r = serve => {
                    if let Err(e) = r {
                        tracing::error!("queue gRPC server: {e}");
                    }
                }
                _ = forced.cancelled() => {}
            }
        });
        tracing::info!(%addr, "relay-queue gRPC listening");
        Some(addr)
    } else {
        None
    };

    let ops_addr = if let Some((listener, addr)) = ops_listener {
        let e = engine.clone();
        let ops = mailsuite_runtime::ops::Ops::with_metrics(move || {
            let m = &e.metrics;
            let mut out = format!(
                "# HELP relay_deliveries_total Delivery attempts of this process, by outcome.\n\
                 # TYPE relay_deliveries_total counter\n\
                 relay_deliveries_total{{outcome=\"delivered\"}} {}\n\
                 relay_deliveries_total{{outcome=\"deferred\"}} {}\n\
                 relay_deliveries_total{{outcome=\"failed\"}} {}\n\
                 # HELP relay_queue_recipients Recipients in the queue (all replicas), by state.\n\
                 # TYPE relay_queue_recipients gauge\n",
                m.delivered.load(Ordering::Relaxed),
                m.deferred.load(Ordering::Relaxed),
                m.failed.load(Ordering::Relaxed),
            );
            let counts = m.queue.lock().unwrap_or_else(|e| e.into_inner()).clone();
            for state in ["pending", "delivering", "deferred", "delivered", "failed"] {
                let n = counts
                    .iter()
                    .find(|(s, _)| s == state)
                    .map(|(_, n)| *n)
                    .unwrap_or(0);
                out.push_str(&format!(
                    "relay_queue_recipients{{state=\"{state}\"}} {n}\n"
                ));
            }
            // The process registry: OpenTelemetry metrics shared with OTLP export.
            out.push_str(&mailsuite_runtime::metrics::render_prometheus());
            out
        });
        ops.set_ready(true);
        shutdown.spawn(ops.serve(listener, shutdown.clone()));
        Some(addr)
    } else {
        None
    };

    Ok(Started {
        grpc: grpc_addr,
        ops: ops_addr,
        engine,
    })
}

/// `mailsuite_queue_depth` (recipients waiting or in flight) and
/// `mailsuite_queue_oldest_age_seconds` (how long the oldest of their messages has waited),
/// refreshed every few seconds from the database, which every replica shares.
async fn queue_gauges(pool: sqlx::PgPool, shutdown: Shutdown) {
    let depth = mailsuite_runtime::metrics::gauge("mailsuite_queue_depth", &[]);
    let oldest = mailsuite_runtime::metrics::gauge("mailsuite_queue_oldest_age_seconds", &[]);
    loop {
        let row: Result<(i64, f64), sqlx::Error> = {
            let _t = mailsuite_runtime::metrics::db_timer("relay_queue_depth");
            sqlx::query_as(
                "SELECT count(*),
                        COALESCE(EXTRACT(EPOCH FROM now() - min(m.created)), 0)::float8
                 FROM relay.recipients r JOIN relay.messages m ON m.id = r.message_id
                 WHERE r.state IN ('pending', 'deferred', 'delivering')",
            )
            .fetch_one(&pool)
            .await
        };
        match row {
            Ok((n, age)) => {
                depth.set(n as f64);
                oldest.set(age);
            }
            Err(e) => tracing::debug!("queue depth: {e}"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            _ = shutdown.stopping() => return,
        }
    }
}
