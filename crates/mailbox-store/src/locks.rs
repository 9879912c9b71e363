//! Maildrop locks (RFC 1939 §8: one POP3 session per maildrop) held by one store replica.
//!
//! Every lock of the replica is a PostgreSQL session-level advisory lock on ONE shared lock
//! connection, owned by one task that takes lock and unlock requests in turn. Chosen over a
//! lease table because:
//! - a replica that dies releases its locks the moment PostgreSQL notices its connection is
//!   gone, with no expiry to tune and no refresh writes per held lock (a lease table needs a
//!   heartbeat per session, or a long expiry that keeps a crashed replica's users locked out);
//! - it interoperates with replicas still running the one-connection-per-lock code during a
//!   rolling upgrade (same `hashtextextended` key).
//!
//! Advisory locks are re-entrant per connection, so two sessions of this replica would both
//! "get" the same lock from PostgreSQL: the in-memory `held` set is what refuses the second.
//! If the lock connection fails (a connection error on a query, or the periodic probe), every
//! lock it held is gone: each holder's `lost` token fires (its stream ends with UNAVAILABLE)
//! and the next request opens a new connection. A lock query that fails while the connection
//! is fine (PostgreSQL's shared lock table full, SQLSTATE 53200, is the expected one) fails
//! only that request: dropping the connection for it would cancel every POP3 session of the
//! replica to no end, as the locks it still holds are what fills the table.
//!
//! Every advisory lock is an entry in PostgreSQL's shared lock table, which holds about
//! `max_locks_per_transaction × (max_connections + max_prepared_transactions)` entries for
//! ALL backends (6,400 with the defaults); `limits.max_maildrop_locks` must stay well below
//! that, and [`lock_table_warning`] says so at start-up when it does not.

use std::collections::HashSet;
use std::time::Duration;

use mailsuite_runtime::{ServiceError, Shutdown};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgConnection};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// How often a lock connection that holds locks is checked: a dead one is noticed within
/// this time even when no session asks for anything.
const PROBE_EVERY: Duration = Duration::from_secs(10);

enum Cmd {
    Acquire {
        key: String,
        reply: oneshot::Sender<Result<Option<Granted>, ServiceError>>,
    },
    Release {
        key: String,
        generation: u64,
    },
}

struct Granted {
    generation: u64,
    lost: CancellationToken,
}

/// The replica's lock table; cheap to clone.
#[derive(Clone)]
pub struct MaildropLocks {
    tx: mpsc::UnboundedSender<Cmd>,
}

/// A held maildrop lock, released when dropped.
pub struct Lease {
    key: String,
    generation: u64,
    lost: CancellationToken,
    tx: mpsc::UnboundedSender<Cmd>,
}

impl Lease {
    /// Completes when the lock was lost with its connection (the maildrop may now be locked
    /// by someone else).
    pub async fn lost(&self) {
        self.lost.cancelled().await
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let _ = self.tx.send(Cmd::Release {
            key: std::mem::take(&mut self.key),
            generation: self.generation,
        });
    }
}

impl MaildropLocks {
    /// `max`: most locks held at once by this replica (beyond it, UNAVAILABLE).
    pub fn start(options: PgConnectOptions, max: usize, shutdown: &Shutdown) -> MaildropLocks {
        let (tx, rx) = mpsc::unbounded_channel();
        let actor = Actor {
            options: options.application_name("mailsuite-maildrop-locks"),
            conn: None,
            generation: 0,
            lost: CancellationToken::new(),
            held: HashSet::new(),
            max: max.max(1),
        };
        shutdown.spawn(actor.run(rx, shutdown.clone()));
        MaildropLocks { tx }
    }

    /// Try to take the lock `key`: `None` when another session (of any replica) holds it.
    pub async fn try_lock(&self, key: String) -> Result<Option<Lease>, ServiceError> {
        let (reply, rx) = oneshot::channel();
        let gone = || ServiceError::Unavailable("maildrop lock service stopped".into());
        self.tx
            .send(Cmd::Acquire {
                key: key.clone(),
                reply,
            })
            .map_err(|_| gone())?;
        Ok(rx.await.map_err(|_| gone())??.map(|g| Lease {
            key,
            generation: g.generation,
            lost: g.lost,
            tx: self.tx.clone(),
        }))
    }
}

struct Actor {
    options: PgConnectOptions,
    conn: Option<PgConnection>,
    /// Counts lock connections; a release for an older one is a no-op (its locks are gone).
    generation: u64,
    lost: CancellationToken,
    held: HashSet<String>,
    max: usize,
}

impl Actor {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Cmd>, shutdown: Shutdown) {
        let mut probe = tokio::time::interval(PROBE_EVERY);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                // Sessions end on shutdown themselves; closing the connection releases all.
                _ = shutdown.stopping() => break,
                cmd = rx.recv() => match cmd {
                    Some(Cmd::Acquire { key, reply }) => {
                        let r = self.acquire(key).await;
                        let _ = reply.send(r);
                    }
                    Some(Cmd::Release { key, generation }) => self.release(key, generation).await,
                    None => break,
                },
                _ = probe.tick(), if !self.held.is_empty() => self.probe().await,
            }
        }
        if let Some(conn) = self.conn.take() {
            let _ = conn.close().await;
        }
    }

    async fn acquire(&mut self, key: String) -> Result<Option<Granted>, ServiceError> {
        if self.held.contains(&key) {
            return Ok(None);
        }
        if self.held.len() >= self.max {
            return Err(ServiceError::Unavailable(format!(
                "this replica holds its maximum of {} maildrop locks",
                self.max
            )));
        }
        // One retry: a connection that died while idle is only found out by using it, and
        // losing it (with nothing held on it, or everything already reported lost) is not the
        // caller's problem.
        for attempt in 0..2 {
            let conn = match self.conn.as_mut() {
                Some(c) => c,
                None => {
                    let c = self.options.connect().await.map_err(|e| {
                        ServiceError::Unavailable(format!("maildrop lock connection: {e}"))
                    })?;
                    self.conn.insert(c)
                }
            };
            match sqlx::query_scalar::<_, bool>(
                "SELECT pg_try_advisory_lock(hashtextextended($1, 0))",
            )
            .bind(&key)
            .fetch_one(conn)
            .await
            {
                Ok(true) => {
                    self.held.insert(key);
                    return Ok(Some(Granted {
                        generation: self.generation,
                        lost: self.lost.clone(),
                    }));
                }
                Ok(false) => return Ok(None),
                Err(e) if !connection_broken(&e) => {
                    tracing::warn!(error = %e, locks = self.held.len(), "maildrop lock refused; the locks held are kept");
                    return Err(ServiceError::Unavailable(format!("maildrop lock: {e}")));
                }
                Err(e) => {
                    self.lose(&e);
                    if attempt == 1 {
                        return Err(ServiceError::Unavailable(format!(
                            "maildrop lock connection: {e}"
                        )));
                    }
                }
            }
        }
        unreachable!("the loop returns on its second attempt")
    }

    async fn release(&mut self, key: String, generation: u64) {
        if generation != self.generation || !self.held.remove(&key) {
            return;
        }
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        if let Err(e) = sqlx::query("SELECT pg_advisory_unlock(hashtextextended($1, 0))")
            .bind(&key)
            .execute(conn)
            .await
        {
            // Not unlocked means still locked: only dropping the connection releases it.
            self.lose(&e);
        }
    }

    async fn probe(&mut self) {
        let Some(conn) = self.conn.as_mut() else {
            return;
        };
        if let Err(e) = conn.ping().await {
            self.lose(&e);
        }
    }

    /// The connection (and so every lock on it) is gone, or must go because a lock on it
    /// could not be released: tell every holder, start afresh.
    fn lose(&mut self, e: &sqlx::Error) {
        if !self.held.is_empty() {
            tracing::warn!(error = %e, locks = self.held.len(), "maildrop lock connection lost; its locks are released");
        }
        self.conn = None;
        self.held.clear();
        self.generation += 1;
        self.lost.cancel();
        self.lost = CancellationToken::new();
    }
}

/// Whether `e` means the lock connection (and every lock on it) is gone or unusable, as
/// opposed to one statement failing on a healthy connection. Class 08 is connection
/// exceptions; 57P01..57P05 are the server ending the session (admin/crash shutdown, cannot
/// connect now, database dropped, idle session timeout). 57014 (statement timeout or cancel)
/// leaves the session and its locks intact, so it is not one of them.
pub(crate) fn connection_broken(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db
            .code()
            .is_some_and(|c| c.starts_with("08") || c.starts_with("57P")),
        _ => false,
    }
}

/// Share of PostgreSQL's shared lock table one replica's maildrop locks may take before
/// start-up warns: the rest is for every other backend (and replica) of the cluster.
const LOCK_TABLE_SHARE: u64 = 2;

/// A warning when `max_locks` maildrop locks could take more than half of PostgreSQL's
/// shared lock table (`max_locks_per_transaction × (max_connections +
/// max_prepared_transactions)` entries): past the table's size lock queries of every backend
/// fail with "out of shared memory".
pub fn lock_table_warning(
    max_locks: usize,
    max_locks_per_transaction: u64,
    max_connections: u64,
    max_prepared_transactions: u64,
) -> Option<String> {
    let table = max_locks_per_transaction
        .saturating_mul(max_connections.saturating_add(max_prepared_transactions));
    ((max_locks as u64).saturating_mul(LOCK_TABLE_SHARE) > table).then(|| {
        format!(
            "limits.max_maildrop_locks = {max_locks} could take more than 1/{LOCK_TABLE_SHARE} of \
             PostgreSQL's shared lock table ({table} entries = max_locks_per_transaction \
             {max_locks_per_transaction} x (max_connections {max_connections} + \
             max_prepared_transactions {max_prepared_transactions})); when it is full, lock \
             requests of every backend fail with \"out of shared memory\": lower the limit or \
             raise max_locks_per_transaction"
        )
    })
}

/// Reads the lock table's size from the server and logs [`lock_table_warning`] if any.
pub async fn check_lock_table(pool: &sqlx::PgPool, max_locks: usize) -> Result<(), sqlx::Error> {
    let (per_tx, conns, prepared): (i64, i64, i64) = sqlx::query_as(
        "SELECT current_setting('max_locks_per_transaction')::bigint,
                current_setting('max_connections')::bigint,
                current_setting('max_prepared_transactions')::bigint",
    )
    .fetch_one(pool)
    .await?;
    let n = |v: i64| u64::try_from(v).unwrap_or(0);
    if let Some(w) = lock_table_warning(max_locks, n(per_tx), n(conns), n(prepared)) {
        tracing::warn!("{w}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mailsuite_testkit::TestDb;

    /// The error PostgreSQL raises for `sqlstate`, from a real server.
    async fn pg_error(conn: &mut PgConnection, sqlstate: &str) -> sqlx::Error {
        let sql =
            format!("DO $$ BEGIN RAISE EXCEPTION 'provoked' USING ERRCODE = '{sqlstate}'; END $$");
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(conn)
            .await
            .expect_err("the DO block raises")
    }

    #[tokio::test]
    async fn m3_only_connection_errors_drop_the_lock_connection() {
        let db = TestDb::new().await;
        let mut conn = PgConnection::connect(&db.url).await.unwrap();
        // The lock table full, a statement timeout, anything else a healthy session reports.
        for code in ["53200", "53100", "57014", "55P03", "XX000", "42883"] {
            let e = pg_error(&mut conn, code).await;
            assert!(!connection_broken(&e), "{code}: {e}");
        }
        // The connection or the session is gone.
        for code in ["08006", "08003", "57P01", "57P02", "57P05"] {
            let e = pg_error(&mut conn, code).await;
            assert!(connection_broken(&e), "{code}: {e}");
        }
        let io = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert!(connection_broken(&io));
        assert!(connection_broken(&sqlx::Error::Protocol("bad".into())));
        assert!(connection_broken(&sqlx::Error::PoolClosed));
        assert!(!connection_broken(&sqlx::Error::RowNotFound));
    }

    #[test]
    fn m3_default_maildrop_locks_fit_postgres_default_lock_table() {
        let default = crate::config::Limits::default().max_maildrop_locks;
        // PostgreSQL's defaults: 64 × (100 + 0).
        assert_eq!(lock_table_warning(default, 64, 100, 0), None);
        let w = lock_table_warning(10_000, 64, 100, 0).expect("10,000 locks warn");
        assert!(
            w.contains("6400") && w.contains("max_locks_per_transaction"),
            "{w}"
        );
        assert_eq!(lock_table_warning(10_000, 256, 100, 0), None);
    }
}
