//! M3: maildrop locks must not pin a PostgreSQL connection each. Every lock of a replica
//! lives on its one shared lock connection.

mod common;

use std::time::Duration;

use common::*;
use mailsuite_mailbox_store::start;
use mailsuite_proto::mailbox_client::MailboxClient;
use mailsuite_proto::{LockControl, LockEvent};
use mailsuite_runtime::Shutdown;
use mailsuite_testkit::{TestDb, eventually};
use sqlx::Connection;
use tokio::sync::mpsc;
use tonic::Streaming;
use tonic::transport::Channel;

const POOL: u32 = 4;
const LOCKS: i64 = 1000;

/// A held (or refused) lock: dropping both halves ends the stream and releases it.
struct Held {
    acquired: bool,
    _tx: mpsc::Sender<LockControl>,
    events: Streaming<LockEvent>,
}

async fn lock(mb: MailboxClient<Channel>, account_id: i64) -> Held {
    try_lock(mb, account_id)
        .await
        .expect("lock request answered")
}

async fn try_lock(mut mb: MailboxClient<Channel>, account_id: i64) -> Result<Held, tonic::Status> {
    let (tx, rx) = mpsc::channel(1);
    tx.send(LockControl {
        account_id,
        mailbox: String::new(),
    })
    .await
    .unwrap();
    let mut events = mb
        .lock_maildrop(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let ev = events.message().await.unwrap().expect("first event");
    Ok(Held {
        acquired: ev.acquired,
        _tx: tx,
        events,
    })
}

/// Backends of this database opened by the store (its pool, its LISTEN connection, its lock
/// connection); the test's own connections are not counted.
async fn store_backends(url: &str) -> i64 {
    let mut c = sqlx::PgConnection::connect(url).await.unwrap();
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
         WHERE datname = current_database() AND application_name LIKE 'mailsuite%'",
    )
    .fetch_one(&mut c)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn m3_thousand_maildrop_locks_share_one_connection() {
    let db = TestDb::new().await;
    let shutdown = Shutdown::new();
    let mut cfg = config(&db.url);
    cfg.db_max_connections = POOL;
    let started = start(cfg, shutdown.clone()).await.expect("store starts");
    // A few HTTP/2 connections, as a few POP3 gateway replicas would have.
    let mut clients = Vec::new();
    for _ in 0..10 {
        clients.push(MailboxClient::new(channel(started.grpc).await));
    }

    let tasks: Vec<_> = (1..=LOCKS)
        .map(|acc| tokio::spawn(lock(clients[acc as usize % clients.len()].clone(), acc)))
        .collect();
    let mut held = Vec::new();
    for t in tasks {
        held.push(t.await.unwrap());
    }
    assert!(held.iter().all(|h| h.acquired), "every maildrop locked");

    // Pool + the LISTEN connection + the one lock connection, however many locks are held.
    let backends = store_backends(&db.url).await;
    assert!(
        backends <= POOL as i64 + 2,
        "{backends} store backends for {LOCKS} held locks"
    );

    // Exclusive while held (a second session of the same replica is refused) ...
    let second = lock(clients[0].clone(), 1).await;
    assert!(!second.acquired, "maildrop 1 is already locked");
    drop(second);
    // ... and granted again once the holder's stream ends.
    drop(held.remove(0));
    eventually(Duration::from_secs(10), "maildrop 1 released", || {
        let mb = clients[0].clone();
        async move { lock(mb, 1).await.acquired.then_some(()) }
    })
    .await;
    // Another replica (its own lock connection) sees the lock too: hold maildrop 2 here,
    // try it from a second store on the same database.
    let other = start(config(&db.url), shutdown.clone()).await.unwrap();
    let from_other = lock(MailboxClient::new(channel(other.grpc).await), 2).await;
    assert!(!from_other.acquired, "locked across replicas");

    // The lock connection dies: every holder is told (its stream ends UNAVAILABLE), and new
    // locks work again on a fresh connection.
    let mut admin = sqlx::PgConnection::connect(&db.url).await.unwrap();
    let killed: i64 = sqlx::query_scalar(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
         WHERE datname = current_database() AND application_name = 'mailsuite-maildrop-locks'",
    )
    .fetch_one(&mut admin)
    .await
    .unwrap();
    assert!(killed >= 1);
    let h = &mut held[0];
    let end = tokio::time::timeout(Duration::from_secs(60), h.events.message())
        .await
        .expect("the holder hears about the lost lock");
    let status = end.expect_err("the stream ends with an error");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
    drop(held);
    eventually(
        Duration::from_secs(20),
        "locks work after reconnecting",
        || {
            let mb = clients[0].clone();
            async move { lock(mb, 3).await.acquired.then_some(()) }
        },
    )
    .await;
    assert!(shutdown.drain(Duration::from_secs(10)).await);
}

/// The backend of the store's lock connection, and how many advisory locks it holds.
async fn lock_backend(admin: &mut sqlx::PgConnection) -> Vec<(i32, i64)> {
    sqlx::query_as(
        "SELECT a.pid, (SELECT count(*) FROM pg_locks l
                        WHERE l.pid = a.pid AND l.locktype = 'advisory' AND l.granted)
         FROM pg_stat_activity a
         WHERE a.datname = current_database() AND a.application_name = 'mailsuite-maildrop-locks'",
    )
    .fetch_all(admin)
    .await
    .unwrap()
}

/// PostgreSQL's shared lock table full (SQLSTATE 53200 "out of shared memory") must fail only
/// the new lock request: the lock connection, and every lock already held on it, stay.
#[tokio::test(flavor = "multi_thread")]
async fn m3_lock_table_full_fails_only_the_new_lock_and_keeps_held_ones() {
    const TABLE: i64 = 3;
    let db = TestDb::new().await;
    let mut admin = sqlx::PgConnection::connect(&db.url).await.unwrap();
    // A lock table with room for TABLE advisory locks per backend: a pg_try_advisory_lock
    // found before pg_catalog's raises what the real one raises when the table is full.
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        r#"CREATE SCHEMA locktable;
        CREATE FUNCTION locktable.pg_try_advisory_lock(k bigint) RETURNS boolean
        LANGUAGE plpgsql AS $$
        BEGIN
            IF (SELECT count(*) FROM pg_catalog.pg_locks
                WHERE pid = pg_catalog.pg_backend_pid() AND locktype = 'advisory') >= {TABLE} THEN
                RAISE EXCEPTION 'out of shared memory' USING ERRCODE = '53200',
                    HINT = 'You might need to increase max_locks_per_transaction.';
            END IF;
            RETURN pg_catalog.pg_try_advisory_lock(k);
        END $$;
        DO $$ BEGIN
            EXECUTE format('ALTER DATABASE %I SET search_path = public, locktable, pg_catalog',
                           current_database());
        END $$;"#
    )))
    .execute(&mut admin)
    .await
    .unwrap();

    let shutdown = Shutdown::new();
    let started = start(config(&db.url), shutdown.clone())
        .await
        .expect("store starts");
    let mb = MailboxClient::new(channel(started.grpc).await);
    let mut held = Vec::new();
    for acc in 1..=TABLE {
        let h = lock(mb.clone(), acc).await;
        assert!(h.acquired, "maildrop {acc} locked");
        held.push(h);
    }
    let before = lock_backend(&mut admin).await;
    assert_eq!(before.len(), 1, "one lock connection: {before:?}");
    assert_eq!(before[0].1, TABLE, "{before:?}");

    // The table is full: this request fails, UNAVAILABLE, saying why.
    let status = match try_lock(mb.clone(), TABLE + 1).await {
        Err(s) => s,
        Ok(h) => panic!(
            "a lock past the full table answered acquired={}",
            h.acquired
        ),
    };
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
    assert!(
        status.message().contains("out of shared memory"),
        "{status}"
    );

    // The same lock connection still holds every lock, and the holders' streams are open.
    assert_eq!(lock_backend(&mut admin).await, before);
    for h in &mut held {
        assert!(
            futures::FutureExt::now_or_never(h.events.message()).is_none(),
            "a holder's stream ended"
        );
    }
    let other = start(config(&db.url), shutdown.clone()).await.unwrap();
    let from_other = lock(MailboxClient::new(channel(other.grpc).await), 1).await;
    assert!(
        !from_other.acquired,
        "maildrop 1 still locked for other replicas"
    );

    // Room again once a holder leaves, on the same connection.
    drop(held.pop());
    // A deadline, not a wait: 10 s was once too short on a 2-core machine running three builds.
    eventually(
        Duration::from_secs(30),
        "a lock after one is released",
        || {
            let mb = mb.clone();
            async move {
                match try_lock(mb, TABLE + 1).await {
                    Ok(h) if h.acquired => Some(h),
                    _ => None,
                }
            }
        },
    )
    .await;
    assert_eq!(lock_backend(&mut admin).await[0].0, before[0].0);
    for h in &mut held {
        assert!(futures::FutureExt::now_or_never(h.events.message()).is_none());
    }
    drop(held);
    assert!(shutdown.drain(Duration::from_secs(10)).await);
}
