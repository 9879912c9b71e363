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

async fn lock(mut mb: MailboxClient<Channel>, account_id: i64) -> Held {
    let (tx, rx) = mpsc::channel(1);
    tx.send(LockControl {
        account_id,
        mailbox: String::new(),
    })
    .await
    .unwrap();
    let mut events = mb
        .lock_maildrop(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("lock request answered")
        .into_inner();
    let ev = events.message().await.unwrap().expect("first event");
    Held {
        acquired: ev.acquired,
        _tx: tx,
        events,
    }
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
