//! The `mailbox-store` binary killed with SIGKILL in the middle of concurrent deliveries:
//! every Deliver that returned success is stored exactly once after a restart, and retrying
//! every call (the ones that failed with the kill, and the ones that succeeded) under its
//! key never duplicates anything.

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use mailsuite_proto::admin_client::AdminClient;
use mailsuite_proto::delivery_client::DeliveryClient;
use mailsuite_proto::*;
use mailsuite_testkit::TestDb;
use mailsuite_testkit::process::{ServiceProcess, free_addr, wait_grpc_serving};
use tonic::transport::Channel;

const ACCOUNTS: usize = 4;
const CALLERS: usize = 30;
/// Successful deliveries before the kill.
const BEFORE_KILL: usize = 150;

async fn spawn_store(db: &TestDb) -> (ServiceProcess, String) {
    let grpc = free_addr();
    let mut p = ServiceProcess::spawn(
        env!("CARGO_BIN_EXE_mailbox-store"),
        &[
            "--set".into(),
            format!("listen_grpc={grpc}"),
            "--set".into(),
            "listen_ops=".into(),
        ],
        &[
            ("DATABASE_URL", db.url.as_str()),
            ("MAILSUITE_INTERNAL_TOKEN", ""),
        ],
    );
    wait_grpc_serving(&mut p, &grpc, "", Duration::from_secs(60)).await;
    (p, format!("http://{grpc}"))
}

async fn channel(url: &str) -> Channel {
    tonic::transport::Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn message(key: &str) -> Vec<u8> {
    format!(
        "From: crash@remote.test\r\nTo: user@example.test\r\nSubject: {key}\r\nMessage-ID: <{key}@crash>\r\n\r\nbody of {key}\r\n"
    )
    .into_bytes()
}

fn recipient(key_no: usize) -> String {
    format!("user{}@example.test", key_no % ACCOUNTS)
}

async fn deliver(
    d: &mut DeliveryClient<Channel>,
    key: &str,
    to: &str,
) -> Result<DeliverResponse, tonic::Status> {
    let data = message(key);
    let chunks = vec![
        DeliverChunk {
            part: Some(deliver_chunk::Part::Header(DeliverHeader {
                idempotency_key: key.into(),
                return_path: "crash@remote.test".into(),
                recipients: vec![to.into()],
                size_hint: data.len() as u64,
                ..Default::default()
            })),
        },
        DeliverChunk {
            part: Some(deliver_chunk::Part::Data(data.into())),
        },
    ];
    d.deliver(tokio_stream::iter(chunks))
        .await
        .map(|r| r.into_inner())
}

/// Entries holding the message of `key` (its blob is the raw message: no trace fields).
async fn copies(db: &TestDb, key: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM mailbox.messages WHERE blob_id = sha256($1)")
        .bind(message(key))
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_mid_load_loses_no_acknowledged_delivery_and_retries_never_duplicate() {
    let db = TestDb::new().await;
    let (first, url) = spawn_store(&db).await;
    let mut admin = AdminClient::new(channel(&url).await);
    admin
        .add_domain(AddDomainRequest {
            name: "example.test".into(),
            catch_all: String::new(),
        })
        .await
        .unwrap();
    for a in 0..ACCOUNTS {
        admin
            .add_account(AddAccountRequest {
                address: format!("user{a}@example.test"),
                password: "secret password".into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }

    // CALLERS loops, each delivering one message after the other until a call fails.
    let ok = Arc::new(AtomicUsize::new(0));
    let (enough_tx, mut enough_rx) = tokio::sync::mpsc::channel::<()>(1);
    let mut tasks = Vec::new();
    for c in 0..CALLERS {
        let url = url.clone();
        let ok = ok.clone();
        let enough = enough_tx.clone();
        tasks.push(tokio::spawn(async move {
            let mut d = DeliveryClient::new(channel(&url).await);
            let mut acknowledged = Vec::new();
            for i in 0.. {
                let n = c * 1_000_000 + i;
                let key = format!("crash-{n}");
                match deliver(&mut d, &key, &recipient(n)).await {
                    Ok(r) => {
                        assert_eq!(r.results[0].status, RecipientStatus::Delivered as i32);
                        acknowledged.push(n);
                        if ok.fetch_add(1, Ordering::SeqCst) + 1 == BEFORE_KILL {
                            let _ = enough.try_send(());
                        }
                    }
                    // The call in flight when the store died: outcome unknown to the caller.
                    Err(_) => return (acknowledged, Some(n)),
                }
            }
            unreachable!()
        }));
    }
    drop(enough_tx);
    enough_rx
        .recv()
        .await
        .expect("enough deliveries before the kill");
    let pid = first.pid().to_string();
    assert!(
        Command::new("kill")
            .args(["-KILL", &pid])
            .status()
            .unwrap()
            .success()
    );
    drop(first); // reaps it

    let mut acknowledged = Vec::new();
    let mut unknown = Vec::new();
    for t in tasks {
        let (a, u) = t.await.unwrap();
        acknowledged.extend(a);
        unknown.extend(u);
    }
    assert!(acknowledged.len() >= BEFORE_KILL);
    assert_eq!(
        unknown.len(),
        CALLERS,
        "every caller ended with a failed call"
    );

    // After a restart: every acknowledged delivery is there exactly once.
    let (second, url) = spawn_store(&db).await;
    for &n in &acknowledged {
        assert_eq!(copies(&db, &format!("crash-{n}")).await, 1, "crash-{n}");
    }
    // Those cut off are there at most once (committed or not); retried under their keys
    // they end up there exactly once.
    let mut d = DeliveryClient::new(channel(&url).await);
    let mut were_committed = 0;
    for &n in &unknown {
        let key = format!("crash-{n}");
        let before = copies(&db, &key).await;
        assert!(before <= 1, "{key}: {before} copies");
        let r = deliver(&mut d, &key, &recipient(n)).await.unwrap();
        assert_eq!(r.results[0].status, RecipientStatus::Delivered as i32);
        assert_eq!(r.duplicate, before == 1, "{key}");
        were_committed += before;
        assert_eq!(copies(&db, &key).await, 1, "{key} after its retry");
    }
    // Retrying acknowledged ones only answers from the record.
    for &n in acknowledged.iter().take(20) {
        let key = format!("crash-{n}");
        let r = deliver(&mut d, &key, &recipient(n)).await.unwrap();
        assert!(r.duplicate, "{key}");
        assert_eq!(copies(&db, &key).await, 1, "{key}");
    }
    eprintln!(
        "{} acknowledged before the kill, {} cut off ({} of them had committed)",
        acknowledged.len(),
        unknown.len(),
        were_committed
    );

    // Nothing else was stored, and the counters agree with the entries.
    let all: BTreeSet<usize> = acknowledged.iter().chain(&unknown).copied().collect();
    let entries: i64 = sqlx::query_scalar("SELECT count(*) FROM mailbox.messages")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(entries, all.len() as i64);
    let mismatched: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM mailbox.accounts a
          WHERE a.used_messages <> (SELECT count(*) FROM mailbox.messages m
                                      JOIN mailbox.mailboxes mb ON mb.id = m.mailbox_id
                                     WHERE mb.account_id = a.id)
             OR (SELECT sum(message_count) FROM mailbox.mailboxes mb WHERE mb.account_id = a.id)
                <> a.used_messages",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(mismatched, 0);
    second.terminate(Duration::from_secs(30)).await;
}
