//! `TestDb`: a fresh database per test with every migration applied, dropped afterwards.
//!
//! Databases are cloned from a template that holds the migrated schema (named after a hash
//! of the migrations, built once under an advisory lock), so a new database costs one
//! `CREATE DATABASE ... TEMPLATE`, not a migration run.

use std::sync::OnceLock;

use sqlx::{Connection, Executor, PgConnection, PgPool};

use mailsuite_runtime::pg;

static SERVER: OnceLock<Result<String, String>> = OnceLock::new();

/// Superuser URL of the server tests use (see `pg::locate`), found once per process.
pub fn server_url() -> &'static str {
    let r = SERVER.get_or_init(|| {
        let dir = std::env::temp_dir().join("mailsuite-testkit-pg");
        pg::locate(&dir)
            .map(|(url, _cluster)| url)
            .map_err(|e| e.to_string())
    });
    match r {
        Ok(u) => u,
        Err(e) => panic!("testkit: no PostgreSQL for tests: {e}"),
    }
}

/// `url` with its database name replaced.
pub fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    // postgres://user@host:port/dbname
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match base[scheme_end..].find('/') {
        Some(i) => &base[..scheme_end + i],
        None => base,
    };
    match query {
        Some(q) => format!("{base}/{db}?{q}"),
        None => format!("{base}/{db}"),
    }
}

fn migrations_hash() -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for m in mailsuite_runtime::db::MIGRATOR.iter() {
        m.version.hash(&mut h);
        m.checksum.hash(&mut h);
    }
    format!("{:016x}", h.finish())
}

async fn ensure_template(admin: &mut PgConnection) -> Result<String, sqlx::Error> {
    let name = format!("mailsuite_tmpl_{}", migrations_hash());
    // Serialise template creation across concurrently running test binaries.
    admin.execute("SELECT pg_advisory_lock(727274001)").await?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
            .bind(&name)
            .fetch_one(&mut *admin)
            .await?;
    let result = async {
        if !exists {
            let building = format!("{name}_building");
            admin
                .execute(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {building} WITH (FORCE)"
                )))
                .await?;
            admin
                .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {building}")))
                .await?;
            let pool = PgPool::connect(&with_database(server_url(), &building)).await?;
            mailsuite_runtime::db::migrate(&pool)
                .await
                .map_err(|e| sqlx::Error::Protocol(format!("migrations: {e}")))?;
            pool.close().await;
            admin
                .execute(sqlx::AssertSqlSafe(format!(
                    "ALTER DATABASE {building} RENAME TO {name}"
                )))
                .await?;
        }
        Ok::<_, sqlx::Error>(())
    }
    .await;
    admin
        .execute("SELECT pg_advisory_unlock(727274001)")
        .await?;
    result.map(|_| name)
}

/// A database of its own for one test. Dropped (with FORCE) when the value is dropped.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub pool: PgPool,
}

impl TestDb {
    pub async fn new() -> TestDb {
        Self::try_new()
            .await
            .expect("testkit: creating a test database")
    }

    pub async fn try_new() -> Result<TestDb, sqlx::Error> {
        let admin_url = server_url();
        let mut admin = PgConnection::connect(admin_url).await?;
        let template = ensure_template(&mut admin).await?;
        let name = format!("mailsuite_test_{}", uuid::Uuid::new_v4().simple());
        // Retry briefly: the template may be in use by a concurrent clone.
        let mut tries = 0;
        loop {
            match admin
                .execute(sqlx::AssertSqlSafe(format!(
                    "CREATE DATABASE {name} TEMPLATE {template}"
                )))
                .await
            {
                Ok(_) => break,
                Err(e) if tries < 50 => {
                    tries += 1;
                    tracing::debug!("create database retry: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(20 * tries)).await;
                }
                Err(e) => return Err(e),
            }
        }
        let _ = admin.close().await;
        let url = with_database(admin_url, &name);
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(20)
            .connect(&url)
            .await?;
        Ok(TestDb { name, url, pool })
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // The pool's sockets belong to the test's runtime, which this thread blocks: do not
        // touch them. DROP ... WITH (FORCE) ends their server sessions instead.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(rt) = rt {
                rt.block_on(async move {
                    if let Ok(mut admin) = PgConnection::connect(server_url()).await {
                        let _ = admin
                            .execute(sqlx::AssertSqlSafe(format!(
                                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                            )))
                            .await;
                    }
                });
            }
        })
        .join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_name_replaced() {
        assert_eq!(
            with_database("postgres://u@h:5432/postgres", "x"),
            "postgres://u@h:5432/x"
        );
        assert_eq!(
            with_database("postgres://u@h:5432/postgres?sslmode=disable", "x"),
            "postgres://u@h:5432/x?sslmode=disable"
        );
        assert_eq!(with_database("postgres://u@h", "x"), "postgres://u@h/x");
    }

    #[tokio::test]
    async fn fresh_database_has_schemas_and_is_dropped() {
        let db = TestDb::new().await;
        let schemas: Vec<String> = sqlx::query_scalar(
            "SELECT nspname::text FROM pg_namespace WHERE nspname IN ('mailbox','relay') ORDER BY 1",
        )
        .fetch_all(&db.pool)
        .await
        .unwrap();
        assert_eq!(schemas, vec!["mailbox".to_string(), "relay".to_string()]);
        sqlx::query("CREATE TABLE mailbox.scratch (x int)")
            .execute(&db.pool)
            .await
            .unwrap();

        // A second database does not see the first one's changes.
        let other = TestDb::new().await;
        assert_ne!(other.name, db.name);
        let seen: Option<String> =
            sqlx::query_scalar("SELECT to_regclass('mailbox.scratch')::text")
                .fetch_one(&other.pool)
                .await
                .unwrap();
        assert_eq!(seen, None);

        let name = db.name.clone();
        drop(db);
        let mut admin = PgConnection::connect(server_url()).await.unwrap();
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)")
                .bind(&name)
                .fetch_one(&mut admin)
                .await
                .unwrap();
        assert!(!exists, "dropped with the TestDb");
    }
}
