//! PostgreSQL pool and the embedded migrations. Migrations run under sqlx's advisory lock,
//! so any number of replicas may start at once.

use std::time::Duration;

use sqlx::migrate::{MigrateError, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

pub static MIGRATOR: Migrator = sqlx::migrate!("../../migrations");

/// Connect a pool. `synchronous_commit` is left at the server's default (on): an
/// acknowledged message must survive a crash.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    let opts: PgConnectOptions = url.parse()?;
    let opts = opts
        .application_name("mailsuite")
        .disable_statement_logging();
    PgPoolOptions::new()
        .max_connections(max_connections.max(1))
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(opts)
        .await
}

pub async fn migrate(pool: &PgPool) -> Result<(), MigrateError> {
    MIGRATOR.run(pool).await
}
