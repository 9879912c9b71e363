//! PostgreSQL pool and the embedded migrations. Migrations run under sqlx's advisory lock,
//! so any number of replicas may start at once.

use std::time::Duration;

use sqlx::migrate::{MigrateError, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

pub static MIGRATOR: Migrator = sqlx::migrate!("../../migrations");

/// Connect a pool with `synchronous_commit = on`: an acknowledged message must survive a
/// crash.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    let opts: PgConnectOptions = url.parse()?;
    // Set explicitly: a server or role default of `off` would make a crash lose mail that
    // was already acknowledged with 250 / OK.
    let opts = opts
        .application_name("mailsuite")
        .options([("synchronous_commit", "on")])
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

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn pool_commits_synchronously_even_if_the_role_says_otherwise() {
        let server = crate::pg::locate(&std::env::temp_dir().join("mailsuite-testkit-pg"))
            .expect("a PostgreSQL server")
            .0;
        // A client-side default of `off` (as a role or database setting would give).
        let url = if server.contains('?') {
            format!("{server}&options=-c%20synchronous_commit%3Doff")
        } else {
            format!("{server}?options=-c%20synchronous_commit%3Doff")
        };
        let pool = super::connect(&url, 1).await.unwrap();
        let v: String = sqlx::query_scalar("SHOW synchronous_commit")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(v, "on");
    }
}
