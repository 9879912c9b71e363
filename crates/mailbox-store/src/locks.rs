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
//! If the lock connection fails (a query error or the periodic probe), every lock it held is
//! gone: each holder's `lost` token fires (its stream ends with UNAVAILABLE) and the next
//! request opens a new connection.

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

    /// The connection (and so every lock on it) is gone: tell every holder, start afresh.
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
