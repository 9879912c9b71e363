//! Per-destination concurrency: a slow destination never sees more simultaneous sessions from
//! one relay-queue than `workers.per_destination`, while the limit is actually used.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;
use mailsuite_runtime::Shutdown;
use mailsuite_testkit::{TestDb, eventually};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

struct Slow {
    port: u16,
    active: Arc<AtomicUsize>,
    max_active: Arc<AtomicUsize>,
    delivered: Arc<AtomicUsize>,
}

/// An SMTP server that takes `pause` to accept each message (a busy remote MX).
async fn slow_server(pause: Duration) -> Slow {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let s = Slow {
        port: l.local_addr().unwrap().port(),
        active: Arc::default(),
        max_active: Arc::default(),
        delivered: Arc::default(),
    };
    let (active, max_active, delivered) =
        (s.active.clone(), s.max_active.clone(), s.delivered.clone());
    tokio::spawn(async move {
        while let Ok((sock, _)) = l.accept().await {
            let (active, max_active, delivered) =
                (active.clone(), max_active.clone(), delivered.clone());
            tokio::spawn(async move {
                let now = active.fetch_add(1, Ordering::SeqCst) + 1;
                max_active.fetch_max(now, Ordering::SeqCst);
                let (r, mut w) = sock.into_split();
                let mut r = BufReader::new(r);
                let _ = w.write_all(b"220 slow.test\r\n").await;
                let mut line = String::new();
                let mut in_data = false;
                let mut counted = true;
                loop {
                    line.clear();
                    if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                        break;
                    }
                    let reply: &[u8] = if in_data {
                        if line != ".\r\n" {
                            continue;
                        }
                        in_data = false;
                        tokio::time::sleep(pause).await;
                        delivered.fetch_add(1, Ordering::SeqCst);
                        b"250 2.0.0 ok\r\n"
                    } else if line.to_ascii_uppercase().starts_with("DATA") {
                        in_data = true;
                        b"354 go on\r\n"
                    } else if line.to_ascii_uppercase().starts_with("QUIT") {
                        // The session ends for the client when it reads 221, and it may open
                        // the next one at once: count this one closed before replying, or the
                        // two overlap here although they never overlapped for the client.
                        active.fetch_sub(1, Ordering::SeqCst);
                        counted = false;
                        let _ = w.write_all(b"221 bye\r\n").await;
                        break;
                    } else {
                        b"250 ok\r\n"
                    };
                    if w.write_all(reply).await.is_err() {
                        break;
                    }
                }
                if counted {
                    active.fetch_sub(1, Ordering::SeqCst);
                }
            });
        }
    });
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_per_destination_are_limited() {
    let db = TestDb::new().await;
    let sd = Shutdown::new();
    let (_store, store_url) = FakeStore::start(&[], &sd).await;
    let slow = slow_server(Duration::from_millis(300)).await;
    let mut c = config(&db.url, &store_url);
    c.workers.count = 2;
    c.workers.per_destination = 2;
    c.transports
        .insert("slow.test".into(), format!("127.0.0.1:{}", slow.port));
    let started = mailsuite_relay_queue::start(c, sd.clone()).await.unwrap();
    const N: usize = 8;
    for i in 0..N {
        enqueue(
            started.grpc.unwrap(),
            header(&format!("slow{i}"), "alice@local.test", &["bob@slow.test"]),
            &message(
                "alice@local.test",
                "bob@slow.test",
                "slow",
                &format!("s{i}@local.test"),
            ),
        )
        .await;
    }
    eventually(T, "all delivered", || async {
        (slow.delivered.load(Ordering::SeqCst) == N).then_some(())
    })
    .await;
    assert_eq!(
        slow.max_active.load(Ordering::SeqCst),
        2,
        "at most (and, with a backlog, exactly) per_destination sessions at once"
    );
    sd.drain(Duration::from_secs(10)).await;
}
