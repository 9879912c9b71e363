//! Change fan-out across replicas: every committed change is published with `pg_notify`
//! inside its transaction; each replica LISTENs on one connection and re-broadcasts the
//! events in-process to its `Watch` streams. Presence leases (for `Alert`) are rows in
//! `mailbox.presence`, refreshed by the Watch streams and expired by time, so a crashed
//! replica's sessions stop counting as online on their own.

use std::time::Duration;

use mailsuite_proto::{ChangeEvent, ChangeKind};
use mailsuite_runtime::Shutdown;
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgListener;
use sqlx::{PgPool, Postgres, Transaction};
use tokio::sync::broadcast;

pub const CHANNEL: &str = "mailsuite_mailbox_changes";

/// NOTIFY payloads are limited to 8000 bytes: a change touching more UIDs than this is
/// published without them (`uids` empty = "several; ask Changes").
const MAX_NOTIFY_UIDS: usize = 500;

#[derive(Serialize, Deserialize, Debug)]
struct Wire {
    a: i64,
    m: i64,
    k: i32,
    #[serde(default)]
    u: Vec<u32>,
    #[serde(default)]
    s: u64,
    #[serde(default)]
    t: String,
}

#[derive(Clone)]
pub struct Hub {
    tx: broadcast::Sender<ChangeEvent>,
}

impl Hub {
    /// LISTEN before returning, so every change committed after `start` returns is seen.
    pub async fn start(pool: &PgPool, shutdown: &Shutdown) -> Result<Hub, sqlx::Error> {
        let (tx, _) = broadcast::channel(4096);
        let mut listener = PgListener::connect_with(pool).await?;
        listener.listen(CHANNEL).await?;
        let hub = Hub { tx: tx.clone() };
        let sd = shutdown.clone();
        shutdown.spawn(async move {
            loop {
                let n = tokio::select! {
                    n = listener.recv() => n,
                    _ = sd.stopping() => break,
                };
                match n {
                    Ok(n) => match serde_json::from_str::<Wire>(n.payload()) {
                        Ok(w) => {
                            let _ = tx.send(ChangeEvent {
                                account_id: w.a,
                                mailbox_id: w.m,
                                kind: w.k,
                                uids: w.u,
                                modseq: w.s,
                                text: w.t,
                            });
                        }
                        Err(e) => tracing::warn!("bad change notification: {e}"),
                    },
                    Err(e) => {
                        // PgListener reconnects by itself on the next recv; notifications
                        // sent meanwhile are lost, so tell every watcher to resynchronise.
                        tracing::warn!("change listener: {e}");
                        let _ = tx.send(ChangeEvent {
                            account_id: 0,
                            kind: ChangeKind::Unspecified as i32,
                            ..Default::default()
                        });
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                            _ = sd.stopping() => break,
                        }
                    }
                }
            }
        });
        Ok(hub)
    }

    pub fn subscribe(&self) -> broadcast::Receiver<ChangeEvent> {
        self.tx.subscribe()
    }
}

/// Publish `ev` when `tx` commits.
pub async fn publish(
    tx: &mut Transaction<'_, Postgres>,
    ev: &ChangeEvent,
) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANNEL)
        .bind(payload(ev))
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// The NOTIFY payload of one event.
pub(crate) fn payload(ev: &ChangeEvent) -> String {
    let w = Wire {
        a: ev.account_id,
        m: ev.mailbox_id,
        k: ev.kind,
        u: if ev.uids.len() > MAX_NOTIFY_UIDS {
            Vec::new()
        } else {
            ev.uids.clone()
        },
        s: ev.modseq,
        t: ev.text.chars().take(1000).collect(),
    };
    serde_json::to_string(&w).unwrap_or_default()
}

pub fn event(
    account_id: i64,
    mailbox_id: i64,
    kind: ChangeKind,
    uids: Vec<u32>,
    modseq: u64,
) -> ChangeEvent {
    ChangeEvent {
        account_id,
        mailbox_id,
        kind: kind as i32,
        uids,
        modseq,
        text: String::new(),
    }
}

/// Periodic clean-up: expired presence leases, finished idempotency records and old change
/// log entries.
pub fn spawn_maintenance(ctx: crate::Ctx) {
    let sd = ctx.shutdown.clone();
    ctx.shutdown.clone().spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(300));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = sd.stopping() => break,
            }
            if let Err(e) = maintain(&ctx.pool, ctx.config.limits.changelog_days).await {
                tracing::warn!("maintenance: {e}");
            }
        }
    });
}

pub async fn maintain(pool: &PgPool, changelog_days: u32) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM mailbox.presence WHERE expires_at < now()")
        .execute(pool)
        .await?;
    sqlx::query("DELETE FROM mailbox.deliveries WHERE created_at < now() - interval '7 days'")
        .execute(pool)
        .await?;
    let days = changelog_days as i32;
    // Raise each mailbox's floor to what is pruned so Changes can say "truncated".
    sqlx::query(
        "WITH gone AS (
            DELETE FROM mailbox.changelog
             WHERE at < now() - make_interval(days => $1)
         RETURNING mailbox_id, modseq)
         UPDATE mailbox.mailboxes mb SET log_floor = g.m
           FROM (SELECT mailbox_id, max(modseq) AS m FROM gone GROUP BY mailbox_id) g
          WHERE mb.id = g.mailbox_id AND mb.log_floor < g.m",
    )
    .bind(days)
    .execute(pool)
    .await?;
    Ok(())
}
