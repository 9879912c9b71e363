//! The shared store client against a real mailbox-store and PostgreSQL, and against a peer
//! that never answers: the deadline, the Authenticate reading, chunked Deliver, health.

use std::time::{Duration, Instant};

use bytes::Bytes;
use mailsuite_proto::*;
use mailsuite_runtime::{ServiceError, Shutdown};
use mailsuite_store_client::{CHUNK, StoreClient};
use mailsuite_testkit::TestDb;

const USER: &str = "alice@example.test";
const PASSWORD: &str = "correct horse battery";

struct Store {
    _db: TestDb,
    url: String,
    shutdown: Shutdown,
}

impl Drop for Store {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

async fn store() -> Store {
    let db = TestDb::new().await;
    let shutdown = Shutdown::new();
    let started = mailsuite_mailbox_store::start(
        mailsuite_mailbox_store::Config {
            listen_grpc: "127.0.0.1:0".into(),
            listen_ops: String::new(),
            database_url: db.url.clone(),
            db_max_connections: 4,
            db_delivery_connections: 4,
            ..Default::default()
        },
        shutdown.clone(),
    )
    .await
    .expect("store starts");
    let url = format!("http://{}", started.grpc);
    mailsuite_testkit::add_account(&url, USER, PASSWORD).await;
    Store {
        _db: db,
        url,
        shutdown,
    }
}

/// A TCP peer that accepts and then says nothing (a hung store).
async fn silent_peer() -> (String, tokio::task::JoinHandle<()>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    (url, task)
}

#[tokio::test]
async fn authenticate_tells_wrong_credentials_from_a_right_login() {
    let s = store().await;
    let c = StoreClient::connect(&s.url, "", Duration::from_secs(10)).unwrap();
    let account = c
        .authenticate(USER, PASSWORD, "192.0.2.1", "imap")
        .await
        .unwrap()
        .expect("right password");
    assert_eq!(account.address, USER);
    for (user, password) in [(USER, "wrong"), ("nobody@example.test", PASSWORD)] {
        assert_eq!(
            c.authenticate(user, password, "192.0.2.1", "imap")
                .await
                .unwrap(),
            None,
            "{user} / {password}"
        );
    }
}

#[tokio::test]
async fn a_message_larger_than_a_chunk_is_delivered_whole() {
    let s = store().await;
    let c = StoreClient::connect(&s.url, "", Duration::from_secs(10)).unwrap();
    let resolved = c.resolve(USER).await.unwrap();
    assert_eq!(resolved.kind(), AddressKind::Account);
    let mut msg =
        b"From: bob@example.test\r\nTo: alice@example.test\r\nSubject: big\r\n\r\n".to_vec();
    while msg.len() < 3 * CHUNK + 17 {
        msg.extend_from_slice(
            b"0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrs\r\n",
        );
    }
    let r = c
        .deliver(
            DeliverHeader {
                idempotency_key: "store-client-test-1".into(),
                return_path: "bob@example.test".into(),
                recipients: vec![USER.into()],
                size_hint: msg.len() as u64,
                ..Default::default()
            },
            Bytes::from(msg.clone()),
        )
        .await
        .unwrap();
    assert_eq!(r.size, msg.len() as u64, "every chunk arrived");
    assert_eq!(r.results.len(), 1);
    assert_eq!(r.results[0].delivered_to, vec![USER.to_string()]);
}

#[tokio::test]
async fn a_store_that_never_answers_fails_temporarily_at_the_deadline() {
    let (url, _peer) = silent_peer().await;
    let deadline = Duration::from_millis(300);
    let c = StoreClient::connect(&url, "", deadline).unwrap();
    let t = Instant::now();
    let err = c.resolve(USER).await.expect_err("no answer");
    assert!(
        matches!(err, ServiceError::Unavailable(_)),
        "a temporary failure, got {err:?}"
    );
    assert!(err.is_temporary());
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "returned at the deadline, not at the transport's own timeout: {:?}",
        t.elapsed()
    );
    let t = Instant::now();
    assert_eq!(
        c.authenticate(USER, PASSWORD, "192.0.2.1", "smtp")
            .await
            .map_err(|e| e.is_temporary()),
        Err(true),
        "no answer is not a wrong password"
    );
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn health_follows_the_store() {
    let s = store().await;
    let c = StoreClient::connect(&s.url, "", Duration::from_secs(2)).unwrap();
    assert!(c.ready().await, "a running store is ready");
    let (url, _peer) = silent_peer().await;
    let hung = StoreClient::connect(&url, "", Duration::from_millis(300)).unwrap();
    assert!(!hung.ready().await, "a silent peer is not");
    let addr = mailsuite_testkit::process::free_addr();
    let gone = StoreClient::connect(&format!("http://{addr}"), "", Duration::from_secs(2)).unwrap();
    assert!(!gone.ready().await, "nothing listening is not");
}
