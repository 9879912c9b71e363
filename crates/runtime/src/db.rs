//! PostgreSQL pool and the embedded migrations. Migrations run under sqlx's advisory lock,
//! so any number of replicas may start at once.

use std::time::Duration;

use sqlx::migrate::{MigrateError, Migrator};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

pub static MIGRATOR: Migrator = sqlx::migrate!("../../migrations");

/// A statement that runs longer than this is cancelled, so one query cannot hold a pool
/// connection (and a PostgreSQL backend) indefinitely.
pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a pooled connection may sit idle before it is pinged on acquire.
pub const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

/// What a pool is opened with besides its URL.
#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    pub max_connections: u32,
    /// PostgreSQL `statement_timeout` of every connection; zero disables it.
    pub statement_timeout: Duration,
    /// `plan_cache_mode = force_generic_plan`: each prepared statement is planned once per
    /// connection instead of on every execution. For a pool that runs only fixed-shape
    /// statements whose best plan does not depend on the values (the delivery path), where
    /// planning cost more than executing.
    pub generic_plans: bool,
    /// A pooled connection idle at least this long is pinged before it is handed out
    /// ([`PING_IF_IDLE_FOR`] unless a test says otherwise).
    pub ping_if_idle_for: Duration,
}

/// Connect a pool with `synchronous_commit = on`: an acknowledged message must survive a
/// crash. Statements time out after `DEFAULT_STATEMENT_TIMEOUT`.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, sqlx::Error> {
    connect_with(
        url,
        PoolSettings {
            max_connections,
            statement_timeout: DEFAULT_STATEMENT_TIMEOUT,
            generic_plans: false,
            ping_if_idle_for: PING_IF_IDLE_FOR,
        },
    )
    .await
}

/// `connect` with explicit settings.
pub async fn connect_with(url: &str, settings: PoolSettings) -> Result<PgPool, sqlx::Error> {
    let opts: PgConnectOptions = url.parse()?;
    let timeout = format!("{}ms", settings.statement_timeout.as_millis());
    // Set explicitly: a server or role default of `off` would make a crash lose mail that
    // was already acknowledged with 250 / OK. The timeout is a startup option so it holds
    // for every connection the pool ever opens, and RESET returns to it.
    let mut opts = opts
        .application_name("mailsuite")
        .options([
            ("synchronous_commit", "on"),
            ("statement_timeout", timeout.as_str()),
        ])
        .disable_statement_logging();
    if settings.generic_plans {
        opts = opts.options([("plan_cache_mode", "force_generic_plan")]);
    }
    PgPoolOptions::new()
        .max_connections(settings.max_connections.max(1))
        .acquire_timeout(Duration::from_secs(10))
        // sqlx pings every connection it hands out, a round trip on every acquire (two per
        // delivered message). A connection that was in use moments ago is as good as the
        // statement that follows can tell; one idle longer may have been cut (a restarted
        // server, a middlebox), so only those are pinged. sqlx still pings on release.
        .test_before_acquire(false)
        .before_acquire(move |conn, meta| {
            let ping_after = settings.ping_if_idle_for;
            Box::pin(async move {
                if meta.idle_for >= ping_after {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
        .connect_with(opts)
        .await
}

/// Migrations may legitimately run longer than the pool's statement timeout (an index on a
/// large table): they run on one connection with the timeout off, restored afterwards.
pub async fn migrate(pool: &PgPool) -> Result<(), MigrateError> {
    let mut conn = pool.acquire().await?;
    sqlx::query("SET statement_timeout = 0")
        .execute(&mut *conn)
        .await?;
    let result = MIGRATOR.run(&mut *conn).await;
    // RESET goes back to the connection's startup value (the pool's timeout).
    if sqlx::query("RESET statement_timeout")
        .execute(&mut *conn)
        .await
        .is_err()
    {
        conn.detach();
    }
    result
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

    #[tokio::test]
    async fn l3_every_pool_connection_has_the_statement_timeout() {
        let server = crate::pg::locate(&std::env::temp_dir().join("mailsuite-testkit-pg"))
            .expect("a PostgreSQL server")
            .0;
        let settings = super::PoolSettings {
            max_connections: 2,
            statement_timeout: std::time::Duration::from_millis(1234),
            generic_plans: false,
            ping_if_idle_for: super::PING_IF_IDLE_FOR,
        };
        let pool = super::connect_with(&server, settings).await.unwrap();
        // Both connections of the pool, not only the first.
        let mut a = pool.acquire().await.unwrap();
        let mut b = pool.acquire().await.unwrap();
        for c in [&mut *a, &mut *b] {
            let v: String = sqlx::query_scalar("SHOW statement_timeout")
                .fetch_one(c)
                .await
                .unwrap();
            assert_eq!(v, "1234ms");
        }
        let err = sqlx::query("SELECT pg_sleep(5)")
            .execute(&mut *a)
            .await
            .expect_err("cancelled by the timeout");
        assert_eq!(
            err.as_database_error().and_then(|e| e.code()).as_deref(),
            Some("57014"),
            "query_canceled: {err}"
        );
        drop((a, b));
        let default = super::connect(&server, 1).await.unwrap();
        let v: String = sqlx::query_scalar("SHOW statement_timeout")
            .fetch_one(&default)
            .await
            .unwrap();
        assert_eq!(v, "30s");
    }

    fn server() -> String {
        crate::pg::locate(&std::env::temp_dir().join("mailsuite-testkit-pg"))
            .expect("a PostgreSQL server")
            .0
    }

    fn settings(generic_plans: bool, ping_if_idle_for: std::time::Duration) -> super::PoolSettings {
        super::PoolSettings {
            max_connections: 1,
            statement_timeout: super::DEFAULT_STATEMENT_TIMEOUT,
            generic_plans,
            ping_if_idle_for,
        }
    }

    #[tokio::test]
    async fn a_generic_plans_pool_plans_each_statement_once() {
        let hot = super::connect_with(&server(), settings(true, super::PING_IF_IDLE_FOR))
            .await
            .unwrap();
        let mode: String = sqlx::query_scalar("SHOW plan_cache_mode")
            .fetch_one(&hot)
            .await
            .unwrap();
        assert_eq!(mode, "force_generic_plan");
        let plain = super::connect(&server(), 1).await.unwrap();
        let mode: String = sqlx::query_scalar("SHOW plan_cache_mode")
            .fetch_one(&plain)
            .await
            .unwrap();
        assert_eq!(mode, "auto");
    }

    /// The pool's only connection is cut by the server while idle in the pool; returns what
    /// the next statement on the pool gave.
    async fn statement_after_idle_cut(
        ping_if_idle_for: std::time::Duration,
    ) -> Result<i32, sqlx::Error> {
        let pool = super::connect_with(&server(), settings(false, ping_if_idle_for))
            .await
            .unwrap();
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&pool)
            .await
            .unwrap();
        // sqlx returns a connection to the pool after a ping of its own; cut it only once it
        // is back, idle.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while pool.num_idle() < 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "connection never returned"
            );
            tokio::task::yield_now().await;
        }
        let admin = super::connect(&server(), 1).await.unwrap();
        let cut: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .fetch_one(&admin)
            .await
            .unwrap();
        assert!(cut);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let alive: bool =
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)")
                    .bind(pid)
                    .fetch_one(&admin)
                    .await
                    .unwrap();
            if !alive {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "backend {pid} still alive"
            );
            tokio::task::yield_now().await;
        }
        sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&pool)
            .await
    }

    #[tokio::test]
    async fn a_connection_idle_past_the_threshold_is_pinged_and_replaced_when_cut() {
        let pid = statement_after_idle_cut(std::time::Duration::ZERO).await;
        assert!(pid.is_ok(), "the dead connection was handed out: {pid:?}");
    }

    #[tokio::test]
    async fn a_connection_used_moments_ago_is_handed_out_without_a_ping() {
        // The round trip saved on every acquire: a connection cut within the threshold
        // reaches the caller, whose statement fails (and is retried as any database error).
        let r = statement_after_idle_cut(std::time::Duration::from_secs(3600)).await;
        assert!(r.is_err(), "expected the cut connection to fail, got {r:?}");
    }
}
