//! mailbox-store: accounts, mailboxes and messages (with their MIME metadata) in PostgreSQL,
//! served over gRPC as the Directory, Delivery, Mailbox and Admin services.
//!
//! Every durable change happens in one PostgreSQL transaction and is acknowledged only after
//! it commits. UIDs and modseqs are allocated by `UPDATE mailboxes ... RETURNING` inside that
//! transaction: the row lock serialises allocation per mailbox across any number of replicas.
//! Changes are published with NOTIFY in the same transaction (so only committed changes are
//! seen) and fanned out by every replica to its `Watch` streams.
//!
//! Contract details the .proto files leave open, as implemented here:
//! - Deliver: a recipient whose every local account is over quota gets `OVER_QUOTA`; when no
//!   recipient at all could be delivered because of quota the call fails with
//!   `ServiceError::OverQuota` (`permanent` when the message is larger than the whole quota:
//!   552, else 452). `mailbox` naming a mailbox that does not exist delivers to INBOX.
//!   Idempotency records are kept 7 days. Return-Path:/Delivered-To: are stored per entry in
//!   front of the shared blob; sizes, offsets and BODY[HEADER] include them.
//! - Select: `first_unseen_uid` carries the *sequence number* of the first unseen message.
//!   Selecting read-write clears \Recent (reported as a flag until then).
//! - Watch: ends when the client closes its request stream or the server shuts down. An event
//!   with kind UNSPECIFIED (and only `account_id` set) means events may have been lost:
//!   resynchronise that account with `Changes`. A change touching more than 500 UIDs is
//!   published with `uids` empty.
//! - LockMaildrop: the lock is held from the first `acquired: true` until the client closes
//!   its request stream, the call is dropped, or the server shuts down.
//! - Errors: NotFound for a mailbox is what IMAP answers with [TRYCREATE] (COPY, APPEND).

pub mod admin;
pub mod batch;
pub mod body;
pub mod config;
pub mod delivery;
pub mod directory;
pub mod locks;
pub mod mailbox;
pub mod metrics;
pub mod mime;
pub mod notify;
pub mod parse_pool;
pub mod password;
pub mod search;
pub mod store;

use std::net::SocketAddr;
use std::sync::Arc;

use mailsuite_proto::admin_server::AdminServer;
use mailsuite_proto::delivery_server::DeliveryServer;
use mailsuite_proto::directory_server::DirectoryServer;
use mailsuite_proto::mailbox_server::MailboxServer;
use mailsuite_runtime::Shutdown;
use mailsuite_runtime::ops::Ops;
use sqlx::PgPool;

pub use config::Config;

/// The bound addresses of every listener.
#[derive(Debug, Clone)]
pub struct Started {
    pub grpc: SocketAddr,
    pub ops: Option<SocketAddr>,
    /// This instance's group-commit counters (Deliver calls per transaction).
    pub deliveries: batch::BatchStats,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// State shared by the four gRPC services.
#[derive(Clone)]
pub struct Ctx {
    pub pool: PgPool,
    /// The delivery path's pool (group commit, recipient resolution): its statements have a
    /// fixed shape and were planned on every execution at a cost above their execution, so
    /// its connections plan each once (`PoolSettings::generic_plans`).
    pub hot: PgPool,
    pub config: Arc<Config>,
    pub hub: notify::Hub,
    pub shutdown: Shutdown,
    pub passwords: password::Hasher,
    pub locks: locks::MaildropLocks,
    /// Group commit of Deliver calls.
    pub deliveries: batch::DeliveryBatcher,
}

pub async fn start(config: Config, shutdown: Shutdown) -> Result<Started, Error> {
    if config.listen_grpc.is_empty() {
        return Err(Error::Config("listen_grpc must not be empty".into()));
    }
    let pool = mailsuite_runtime::db::connect_with(
        &config.database_url,
        mailsuite_runtime::db::PoolSettings {
            max_connections: config.db_max_connections,
            statement_timeout: std::time::Duration::from_millis(config.db_statement_timeout_ms),
            generic_plans: false,
            ping_if_idle_for: mailsuite_runtime::db::PING_IF_IDLE_FOR,
        },
    )
    .await?;
    let hot = mailsuite_runtime::db::connect_with(
        &config.database_url,
        mailsuite_runtime::db::PoolSettings {
            max_connections: config.db_delivery_connections,
            statement_timeout: std::time::Duration::from_millis(config.db_statement_timeout_ms),
            generic_plans: true,
            ping_if_idle_for: mailsuite_runtime::db::PING_IF_IDLE_FOR,
        },
    )
    .await?;
    if config.migrate_on_start {
        mailsuite_runtime::db::migrate(&pool).await?;
    }
    let hub = notify::Hub::start(&pool, &shutdown).await?;
    // Advisory only: a server that hides its settings must not keep the store from starting.
    if let Err(e) = locks::check_lock_table(&pool, config.limits.max_maildrop_locks).await {
        tracing::warn!(error = %e, "could not read PostgreSQL's lock table size");
    }
    let ctx = Ctx {
        pool: pool.clone(),
        hot: hot.clone(),
        config: Arc::new(config.clone()),
        hub,
        shutdown: shutdown.clone(),
        passwords: password::Hasher::new(
            config.limits.max_concurrent_password_checks,
            std::time::Duration::from_millis(config.limits.password_check_wait_ms),
        ),
        locks: locks::MaildropLocks::start(
            (*pool.connect_options()).clone(),
            config.limits.max_maildrop_locks,
            &shutdown,
        ),
        deliveries: batch::DeliveryBatcher::start(
            hot.clone(),
            config.limits.delivery_committers,
            config.limits.delivery_batch_max,
            config.limits.delivery_batch_max_bytes,
            &shutdown,
        ),
    };
    notify::spawn_maintenance(ctx.clone());

    let (listener, grpc_addr) = mailsuite_runtime::grpc::bind(&config.listen_grpc).await?;
    mailsuite_runtime::grpc::check_exposure(
        "mailbox-store",
        grpc_addr,
        &config.internal_token,
        config.allow_unauthenticated_grpc,
    )
    .map_err(Error::Config)?;
    let ops_addr = if config.listen_ops.is_empty() {
        None
    } else {
        let (l, a) = mailsuite_runtime::grpc::bind(&config.listen_ops).await?;
        let ops = Ops::with_metrics(metrics::render);
        ops.set_ready(true);
        shutdown.spawn(ops.serve(l, shutdown.clone()));
        Some(a)
    };

    let (health, health_service) = mailsuite_runtime::grpc::health_reporter();
    health
        .set_serving::<DirectoryServer<directory::DirectorySvc>>()
        .await;
    health
        .set_serving::<DeliveryServer<delivery::DeliverySvc>>()
        .await;
    health
        .set_serving::<MailboxServer<mailbox::MailboxSvc>>()
        .await;
    health.set_serving::<AdminServer<admin::AdminSvc>>().await;

    let frame = config.limits.max_grpc_frame_bytes;
    let router = tonic::transport::Server::builder()
        .layer(mailsuite_runtime::grpc::ServerTraceLayer)
        .layer(mailsuite_runtime::grpc::ServerAuthLayer::new(
            config.internal_token.as_str(),
        ))
        .add_service(health_service)
        .add_service(
            DirectoryServer::new(directory::DirectorySvc(ctx.clone()))
                .max_decoding_message_size(frame),
        )
        .add_service(
            DeliveryServer::new(delivery::DeliverySvc(ctx.clone()))
                .max_decoding_message_size(frame),
        )
        .add_service(
            MailboxServer::new(mailbox::MailboxSvc(ctx.clone()))
                .max_decoding_message_size(frame)
                // Select answers with every UID of a mailbox in one message.
                .max_encoding_message_size(256 * 1024 * 1024),
        )
        .add_service(
            AdminServer::new(admin::AdminSvc(ctx.clone())).max_decoding_message_size(frame),
        );
    let sd = shutdown.clone();
    shutdown.spawn(async move {
        let stop = sd.clone();
        let result = router
            .serve_with_incoming_shutdown(mailsuite_runtime::grpc::incoming(listener), async move {
                stop.stopping().await;
            })
            .await;
        if let Err(e) = result {
            tracing::error!("gRPC server: {e}");
        }
        pool.close().await;
        hot.close().await;
    });
    tracing::info!(grpc = %grpc_addr, ops = ?ops_addr, "mailbox-store started");
    Ok(Started {
        grpc: grpc_addr,
        ops: ops_addr,
        deliveries: ctx.deliveries.stats(),
    })
}
