//! Queue state survives a restart of PostgreSQL. The shared server is never touched: the test
//! runs its own private cluster (initdb/pg_ctl) behind a TCP forwarder, so relay-queue keeps
//! one database URL while the server goes away and comes back (on a new port).

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use common::*;
use mailsuite_runtime::Shutdown;
use mailsuite_runtime::pg::PrivateCluster;
use mailsuite_testkit::eventually;
use sqlx::{Connection, Executor};

struct Cluster(PrivateCluster);

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.0.stop();
    }
}

/// Forward 127.0.0.1:<returned port> to whatever port `target` holds at connect time.
async fn forwarder(target: Arc<AtomicU16>) -> u16 {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            let t = target.load(Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", t)).await {
                    let _ = tokio::io::copy_bidirectional(&mut c, &mut s).await;
                }
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_mail_survives_a_postgresql_restart() {
    if mailsuite_runtime::pg::find_bindir().is_none() {
        panic!("initdb/pg_ctl not found: install the PostgreSQL server binaries");
    }
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster(PrivateCluster::ensure(dir.path()).unwrap());
    let mut admin = sqlx::PgConnection::connect(&cluster.0.url()).await.unwrap();
    admin.execute("CREATE DATABASE relaytest").await.unwrap();
    admin.close().await.unwrap();
    let target = Arc::new(AtomicU16::new(cluster.0.port));
    let port = forwarder(target.clone()).await;
    let url = format!("postgres://postgres@127.0.0.1:{port}/relaytest");

    let sd = Shutdown::new();
    let (_store, store_url) = FakeStore::start(&[], &sd).await;
    let sink = Sink::start(&["--tempfail-first", "1"]).await;
    let mut c = config(&url, &store_url);
    c.migrate_on_start = true;
    c.retry.schedule_secs = vec![1];
    c.transports.insert("remote.test".into(), sink.route());
    let started = mailsuite_relay_queue::start(c, sd.clone()).await.unwrap();
    let addr = started.grpc.unwrap();
    let r = enqueue(
        addr,
        header("pg", "alice@local.test", &["bob@remote.test"]),
        &message(
            "alice@local.test",
            "bob@remote.test",
            "durable",
            "pg@local.test",
        ),
    )
    .await;
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    eventually(T, "first attempt deferred (451)", || async {
        let s = states(&pool, &r.queue_id).await;
        (s[0].1 == "deferred").then_some(())
    })
    .await;
    pool.close().await;

    // Stop the server. While it is down, Enqueue must not acknowledge anything.
    cluster.0.stop().unwrap();
    let mut cl = client(addr).await;
    let chunks = vec![
        mailsuite_proto::EnqueueChunk {
            part: Some(mailsuite_proto::enqueue_chunk::Part::Header(header(
                "pg-down",
                "alice@local.test",
                &["bob@remote.test"],
            ))),
        },
        mailsuite_proto::EnqueueChunk {
            part: Some(mailsuite_proto::enqueue_chunk::Part::Data(
                b"Subject: x\r\n\r\ny\r\n".to_vec().into(),
            )),
        },
    ];
    let err = cl.enqueue(tokio_stream::iter(chunks)).await.unwrap_err();
    assert!(
        matches!(err.code(), tonic::Code::Unavailable | tonic::Code::Internal),
        "{err:?}"
    );

    // Start it again (it picks a new port; the forwarder follows).
    let restarted = Cluster(PrivateCluster::ensure(dir.path()).unwrap());
    target.store(restarted.0.port, Ordering::SeqCst);
    std::mem::forget(cluster); // the same cluster: stopped once, by `restarted`

    let got = sink.wait_for(1).await;
    assert_eq!(
        got[0].meta["data_commands"], 2,
        "the deferred message was retried"
    );
    assert!(String::from_utf8_lossy(&got[0].bytes).contains("Subject: durable"));
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    eventually(T, "recorded delivered after the restart", || async {
        let s = states(&pool, &r.queue_id).await;
        (s[0].1 == "delivered" && s[0].2 == 2).then_some(())
    })
    .await;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM relay.messages")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 1, "the refused Enqueue left nothing behind");
    pool.close().await;
    sd.drain(Duration::from_secs(10)).await;
}
