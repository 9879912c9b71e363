//! The SMTP client against scripted servers: HELO fallback for a server without ESMTP, and
//! the ESMTP parameters (SIZE, BODY, RET/ENVID, NOTIFY/ORCPT) sent only when offered; and
//! the Enqueue contract a client must meet (an idempotency key).

mod common;

use std::time::Duration;

use common::*;
use mailsuite_proto::DsnRet;
use mailsuite_runtime::Shutdown;
use mailsuite_testkit::{TestDb, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helo_fallback_and_esmtp_parameters_only_when_offered() {
    let db = TestDb::new().await;
    let sd = Shutdown::new();
    let (_store, store_url) = FakeStore::start(&[], &sd).await;
    let old = Scripted::start(None).await;
    let modern = Scripted::start(Some(&["PIPELINING", "SIZE 1000000", "8BITMIME", "DSN"])).await;
    let mut c = config(&db.url, &store_url);
    c.transports
        .insert("old.test".into(), format!("127.0.0.1:{}", old.port));
    c.transports
        .insert("modern.test".into(), format!("127.0.0.1:{}", modern.port));
    let started = mailsuite_relay_queue::start(c, sd.clone()).await.unwrap();
    let addr = started.grpc.unwrap();
    let body =
        "From: alice@local.test\r\nSubject: caf\u{e9}\r\n\r\n8-bit caf\u{e9}\r\n.leading dot\r\n";
    for d in ["old.test", "modern.test"] {
        let to = format!("bob@{d}");
        let mut h = header(d, "alice@local.test", &[to.as_str()]);
        h.envid = "ENV 1".into();
        h.ret = DsnRet::Hdrs as i32;
        h.recipients[0].notify = vec!["FAILURE".into(), "DELAY".into()];
        h.recipients[0].orcpt = format!("rfc822;{to}");
        if d == "modern.test" {
            h.body_8bit = true;
        }
        enqueue(addr, h, body.as_bytes()).await;
    }
    // QUIT ends each session, after the message: wait for it so the transcripts are whole.
    eventually(T, "both sessions finished", || async {
        let done = |s: &Scripted| s.commands().iter().any(|l| l == "QUIT");
        (done(&old) && done(&modern)).then_some(())
    })
    .await;

    let oc = old.commands();
    assert!(oc[0].starts_with("EHLO mx.local.test"), "{oc:?}");
    assert!(
        oc[1].starts_with("HELO mx.local.test"),
        "fell back to HELO: {oc:?}"
    );
    assert!(
        oc.contains(&"MAIL FROM:<alice@local.test>".to_string()),
        "no ESMTP parameters to an SMTP server: {oc:?}"
    );
    assert!(oc.contains(&"RCPT TO:<bob@old.test>".to_string()), "{oc:?}");
    assert_eq!(
        old.messages.lock().unwrap()[0],
        body.as_bytes(),
        "dot-unstuffed back to the original"
    );

    let mc = modern.commands();
    let mail = mc.iter().find(|l| l.starts_with("MAIL FROM:")).unwrap();
    assert!(mail.contains(&format!("SIZE={}", body.len())), "{mail}");
    assert!(mail.contains("BODY=8BITMIME"), "{mail}");
    assert!(mail.contains("RET=HDRS"), "{mail}");
    assert!(mail.contains("ENVID=ENV+201"), "ENVID as xtext: {mail}");
    let rcpt = mc.iter().find(|l| l.starts_with("RCPT TO:")).unwrap();
    assert_eq!(
        rcpt,
        "RCPT TO:<bob@modern.test> NOTIFY=FAILURE,DELAY ORCPT=rfc822;bob@modern.test"
    );
    assert!(mc.iter().any(|l| l == "QUIT"), "{mc:?}");
    sd.drain(Duration::from_secs(10)).await;
}

/// A keyless Enqueue would be stored with a NULL key, so a client's retry queues it twice:
/// refused like the store's Deliver refuses it, and nothing is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_without_an_idempotency_key_is_refused() {
    let db = TestDb::new().await;
    let sd = Shutdown::new();
    let (_store, store_url) = FakeStore::start(&[], &sd).await;
    let started = mailsuite_relay_queue::start(config(&db.url, &store_url), sd.clone())
        .await
        .unwrap();
    let chunks = vec![
        mailsuite_proto::EnqueueChunk {
            part: Some(mailsuite_proto::enqueue_chunk::Part::Header(header(
                "",
                "alice@local.test",
                &["bob@remote.test"],
            ))),
        },
        mailsuite_proto::EnqueueChunk {
            part: Some(mailsuite_proto::enqueue_chunk::Part::Data(
                b"Subject: x\r\n\r\nbody\r\n".to_vec().into(),
            )),
        },
    ];
    let err = client(started.grpc.unwrap())
        .await
        .enqueue(tokio_stream::iter(chunks))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM relay.messages")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(stored, 0);
    sd.drain(Duration::from_secs(10)).await;
}
