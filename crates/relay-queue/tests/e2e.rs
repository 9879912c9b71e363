//! End-to-end: relay-queue on real sockets with a real PostgreSQL, delivering to an
//! independent SMTP server (Python aiosmtpd) and to a stand-in mailbox-store over gRPC.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use base64::Engine as _;
use common::*;
use mailsuite_proto::{
    DeleteRequest, FlushRequest, GetMessageRequest, ListMessagesRequest, RecipientState,
};
use mailsuite_relay_queue::config::DkimKeyConfig;
use mailsuite_runtime::Shutdown;
use mailsuite_testkit::{TestDb, eventually};

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

/// (config entry, selector=TXT argument for the verifier)
fn dkim_keys() -> Vec<(DkimKeyConfig, String)> {
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let ed = mail_auth::common::crypto::Ed25519Key::generate_pkcs8().unwrap();
    let ed_pub = mail_auth::common::crypto::Ed25519Key::from_pkcs8_der(&ed)
        .unwrap()
        .public_key();
    let rsa = mail_auth::dkim::generate::DkimKeyPair::generate_rsa(2048).unwrap();
    vec![
        (
            DkimKeyConfig {
                domain: HOSTED.into(),
                selector: "ed".into(),
                algorithm: "ed25519-sha256".into(),
                private_key_pem: pem("PRIVATE KEY", &ed),
                private_key_file: String::new(),
            },
            format!("ed=v=DKIM1; k=ed25519; p={}", b64(&ed_pub)),
        ),
        (
            DkimKeyConfig {
                domain: HOSTED.into(),
                selector: "rsa".into(),
                algorithm: "rsa-sha256".into(),
                private_key_pem: pem("RSA PRIVATE KEY", rsa.private_key()),
                private_key_file: String::new(),
            },
            format!("rsa=v=DKIM1; k=rsa; p={}", b64(rsa.public_key())),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_delivery_is_byte_identical_and_dkim_signed() {
    let db = TestDb::new().await;
    let sd = Shutdown::new();
    let (_store, store_url) = FakeStore::start(&["alice@local.test"], &sd).await;
    let sink = Sink::start(&[]).await;
    let keys = dkim_keys();
    let mut c = config(&db.url, &store_url);
    c.transports.insert("remote.test".into(), sink.route());
    c.dkim = keys.iter().map(|(k, _)| k.clone()).collect();
    let started = mailsuite_relay_queue::start(c, sd.clone()).await.unwrap();
    let addr = started.grpc.unwrap();

    let original = message(
        "alice@local.test",
        "bob@remote.test",
        "DKIM test",
        "m1@local.test",
    );
    let h = header("key-1", "alice@local.test", &["bob@remote.test"]);
    let first = enqueue(addr, h.clone(), &original).await;
    assert!(!first.duplicate);
    let again = enqueue(addr, h, &original).await;
    assert!(again.duplicate, "same idempotency key");
    assert_eq!(again.queue_id, first.queue_id);

    let got = sink.wait_for(1).await;
    assert_eq!(got.len(), 1, "delivered once despite the repeated Enqueue");
    let m = &got[0];
    assert_eq!(m.meta["mail_from"], "alice@local.test");
    assert_eq!(m.meta["rcpt_tos"], serde_json::json!(["bob@remote.test"]));
    assert_eq!(m.meta["helo"], "mx.local.test");
    assert!(
        m.bytes.ends_with(&original),
        "original bytes intact after the added headers"
    );
    let added = String::from_utf8(m.bytes[..m.bytes.len() - original.len()].to_vec()).unwrap();
    let fields: Vec<&str> = added
        .split("\r\n")
        .filter(|l| !l.is_empty() && !l.starts_with([' ', '\t']))
        .collect();
    assert_eq!(fields.len(), 2, "one signature per key: {added}");
    assert!(
        fields.iter().all(|f| f.starts_with("DKIM-Signature:")),
        "{added}"
    );

    let path = m.path.to_str().unwrap();
    let out = run_py(
        "dkim_verify.py",
        &[path, HOSTED, keys[0].1.as_str(), keys[1].1.as_str()],
    );
    assert!(out.contains("verified 2"), "{out}");
    // And a tampered copy must not verify: the verifier really checks.
    let tampered = m.bytes.clone();
    let tampered = String::from_utf8(tampered)
        .unwrap()
        .replace("Hello Bob", "Hello Eve");
    let tf = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tf.path(), tampered).unwrap();
    let st = std::process::Command::new("python3")
        .arg(py("dkim_verify.py"))
        .args([
            tf.path().to_str().unwrap(),
            HOSTED,
            keys[0].1.as_str(),
            keys[1].1.as_str(),
        ])
        .output()
        .unwrap();
    assert!(
        !st.status.success(),
        "a tampered body must fail verification"
    );

    let st = eventually(T, "recipient recorded as delivered", || async {
        let s = states(&db.pool, &first.queue_id).await;
        (s[0].1 == "delivered").then_some(s)
    })
    .await;
    assert_eq!(st[0].2, 1, "one attempt");
    sd.drain(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn temporary_failure_is_retried_then_delivered() {
    let db = TestDb::new().await;
    let sd = Shutdown::new();
    let (_store, store_url) = FakeStore::start(&[], &sd).await;
    let sink = Sink::start(&["--tempfail-first", "1"]).await;
    let mut c = config(&db.url, &store_url);
    c.transports.insert("remote.test".into(), sink.route());
    let started = mailsuite_relay_queue::start(c, sd.clone()).await.unwrap();
    let addr = started.grpc.unwrap();
    let r = enqueue(
        addr,
        header("k451", "alice@local.test", &["bob@remote.test"]),
        &message(
            "alice@local.test",
            "bob@remote.test",
            "retry",
            "m451@local.test",
        ),
    )
    .await;
    let got = sink.wait_for(1).await;
    assert_eq!(got[0].meta["data_commands"], 2, "the first DATA got 451");
    let m = eventually(T, "delivered after a retry", || async {
        let m = client(addr)
            .await
            .get_message(GetMessageRequest {
                queue_id: r.queue_id.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        (m.recipients[0].state() == RecipientState::Delivered).then_some(m)
    })
    .await;
    assert_eq!(m.recipients[0].attempts, 2);
    let outcomes: Vec<(String, String)> = sqlx::query_as(
        "SELECT a.outcome, a.reply FROM relay.attempts a JOIN relay.recipients r ON r.id = a.recipient_id
         WHERE r.message_id = $1::uuid ORDER BY a.id",
    )
    .bind(&r.queue_id)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert_eq!(outcomes.len(), 2);
    assert_eq!(outcomes[0].0, "deferred");
    assert!(outcomes[0].1.starts_with("451 4.3.0"), "{:?}", outcomes[0]);
    assert_eq!(outcomes[1].0, "delivered");
    assert_eq!(sink.messages().len(), 1);
    let ops = started.ops.unwrap();
    let metrics = eventually(T, "queue gauges refreshed", || async {
        let m = http_get(ops, "/metrics").await;
        m.contains("relay_queue_recipients{state=\"delivered\"} 1")
            .then_some(m)
    })
    .await;
    assert!(
        metrics.contains("relay_deliveries_total{outcome=\"deferred\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("relay_deliveries_total{outcome=\"delivered\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("relay_queue_recipients{state=\"deferred\"} 0"),
        "{metrics}"
    );
    // The same page carries the OpenTelemetry registry (process-wide, so other tests of this
    // binary may have added to it: at least, not exactly).
    let otel = |result| {
        mailsuite_runtime::metrics::value_in(
            &metrics,
            "mailsuite_queue_deliveries_total",
            &[("result", result)],
        )
    };
    assert!(
        otel("deferred") >= 1.0 && otel("delivered") >= 1.0,
        "{metrics}"
    );
    assert!(
        metrics.contains("# TYPE mailsuite_queue_depth gauge"),
        "{metrics}"
    );
    assert_eq!(http_get(ops, "/readyz").await.trim(), "ready");
    sd.drain(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failure_returns_an_rfc3464_dsn_to_the_sender() {
    let db = TestDb::new().await;
    let sd = Shutdown::new();
    let (store, store_url) = FakeStore::start(&["alice@local.test"], &sd).await;
    let sink = Sink::start(&["--reject", "bob@remote.test"]).await;
    let mut c = config(&db.url, &store_url);
    c.transports.insert("remote.test".into(), sink.route());
    let started = mailsuite_relay_queue::start(c, sd.clone()).await.unwrap();
    let addr = started.grpc.unwrap();
    let mut h = header(
        "k550",
        "alice@local.test",
        &["bob@remote.test", "carol@remote.test"],
    );
    h.envid = "ENV-550".into();
    h.recipients[0].orcpt = "rfc822;bob@remote.test".into();
    let original = message(
        "alice@local.test",
        "bob@remote.test",
        "will bounce",
        "m550@local.test",
    );
    let r = enqueue(addr, h, &original).await;

    let got = sink.wait_for(1).await;
    assert_eq!(
        got[0].meta["rcpt_tos"],
        serde_json::json!(["carol@remote.test"])
    );
    let dsn = eventually(T, "a DSN in alice's mailbox", || async {
        store
            .stored()
            .into_iter()
            .find(|s| s.recipients == ["alice@local.test"])
    })
    .await;
    assert_eq!(dsn.return_path, "", "DSNs come from the null reverse-path");
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), &dsn.bytes).unwrap();
    let out = run_py(
        "dsn_check.py",
        &[
            f.path().to_str().unwrap(),
            "bob@remote.test",
            "failed",
            "5.1.1",
            "will bounce",
        ],
    );
    assert!(out.contains("1 recipient block"), "only bob failed: {out}");
    let text = String::from_utf8_lossy(&dsn.bytes);
    assert!(text.contains("Original-Envelope-Id: ENV-550"), "{text}");
    assert!(
        text.contains("Original-Recipient: rfc822;bob@remote.test"),
        "{text}"
    );
    assert!(text.contains("Diagnostic-Code: smtp; 550 5.1.1"), "{text}");

    let st = states(&db.pool, &r.queue_id).await;
    assert_eq!(st[0].1, "failed");
    assert_eq!(st[1].1, "delivered");
    // The DSN itself was delivered and will never produce another DSN.
    eventually(T, "the DSN recorded as delivered", || async {
        let dsn_rows: Vec<(String, String)> = sqlx::query_as(
            "SELECT m.return_path, r.state FROM relay.messages m JOIN relay.recipients r ON r.message_id = m.id
             WHERE m.id <> $1::uuid",
        )
        .bind(&r.queue_id)
        .fetch_all(&db.pool)
        .await
        .unwrap();
        (dsn_rows == vec![(String::new(), "delivered".to_string())]).then_some(())
    })
    .await;
    sd.drain(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_local_and_remote_recipients_reach_both() {
    let db = TestDb::new().await;
    let sd = Shutdown::new();
    let (store, store_url) = FakeStore::start(&["dave@local.test"], &sd).await;
    let sink = Sink::start(&[]).await;
    let mut c = config(&db.url, &store_url);
    c.transports.insert("remote.test".into(), sink.route());
    let started = mailsuite_relay_queue::start(c, sd.clone()).await.unwrap();
    let original = message(
        "alice@local.test",
        "bob@remote.test",
        "mixed",
        "mix@local.test",
    );
    let mut h = header(
        "kmix",
        "alice@local.test",
        &["dave@local.test", "bob@remote.test", "nobody@local.test"],
    );
    h.recipients[2].notify = vec!["NEVER".into()];
    let r = enqueue(started.grpc.unwrap(), h, &original).await;
    let got = sink.wait_for(1).await;
    assert_eq!(
        got[0].meta["rcpt_tos"],
        serde_json::json!(["bob@remote.test"])
    );
    let local = eventually(T, "local delivery", || async {
        store
            .stored()
            .into_iter()
            .find(|s| s.recipients == ["dave@local.test"])
    })
    .await;
    assert_eq!(
        local.bytes, original,
        "local copy unchanged (the store adds its own headers)"
    );
    assert_eq!(local.return_path, "alice@local.test");
    let st = eventually(T, "all recipients final", || async {
        let s = states(&db.pool, &r.queue_id).await;
        s.iter()
            .all(|x| x.1 == "delivered" || x.1 == "failed")
            .then_some(s)
    })
    .await;
    let by: Vec<(&str, &str)> = st.iter().map(|s| (s.0.as_str(), s.1.as_str())).collect();
    assert_eq!(
        by,
        vec![
            ("dave@local.test", "delivered"),
            ("bob@remote.test", "delivered"),
            ("nobody@local.test", "failed"),
        ]
    );
    // NOTIFY=NEVER: no DSN for the unknown local user.
    let msgs: i64 = sqlx::query_scalar("SELECT count(*) FROM relay.messages")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(msgs, 1, "no DSN queued");
    sd.drain(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_deliver_every_message_exactly_once() {
    let db = TestDb::new().await;
    let sd = Shutdown::new();
    let (_store, store_url) = FakeStore::start(&[], &sd).await;
    let sink = Sink::start(&[]).await;
    let mut c = config(&db.url, &store_url);
    c.transports.insert("remote.test".into(), sink.route());
    c.workers.batch = 3;
    c.workers.count = 3;
    let a = mailsuite_relay_queue::start(c.clone(), sd.clone())
        .await
        .unwrap();
    let b = mailsuite_relay_queue::start(c, sd.clone()).await.unwrap();
    const N: usize = 40;
    for i in 0..N {
        let addr = if i % 2 == 0 { a.grpc } else { b.grpc }.unwrap();
        enqueue(
            addr,
            header(&format!("k{i}"), "alice@local.test", &["bob@remote.test"]),
            &message(
                "alice@local.test",
                "bob@remote.test",
                "many",
                &format!("n{i}@local.test"),
            ),
        )
        .await;
    }
    sink.wait_for(N).await;
    eventually(T, "every recipient recorded delivered", || async {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM relay.recipients WHERE state = 'delivered'")
                .fetch_one(&db.pool)
                .await
                .unwrap();
        (n == N as i64).then_some(())
    })
    .await;
    let got = sink.messages();
    assert_eq!(got.len(), N, "no duplicates");
    let ids: BTreeSet<String> = got
        .iter()
        .map(|m| {
            let t = String::from_utf8_lossy(&m.bytes);
            t.lines()
                .find(|l| l.starts_with("Message-ID:"))
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(ids.len(), N, "each message exactly once");
    let workers: i64 = sqlx::query_scalar("SELECT count(DISTINCT worker) FROM relay.attempts")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(workers >= 2, "work was shared ({workers} workers)");
    sd.drain(Duration::from_secs(10)).await;
}

/// An SMTP server that accepts everything up to the end of DATA and then never answers,
/// signalling the test at that moment.
async fn black_hole() -> (u16, tokio::sync::mpsc::Receiver<()>) {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let (r, mut w) = s.into_split();
                let mut r = BufReader::new(r);
                w.write_all(b"220 hole.test ESMTP\r\n").await.unwrap();
                let mut line = String::new();
                let mut in_data = false;
                loop {
                    line.clear();
                    if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    if in_data {
                        if line == ".\r\n" {
                            let _ = tx.send(()).await;
                            // Hold the connection open without replying.
                            let mut rest = String::new();
                            let _ = r.read_line(&mut rest).await;
                            return;
                        }
                        continue;
                    }
                    let up = line.to_ascii_uppercase();
                    let reply: &[u8] = if up.starts_with("EHLO") {
                        b"250-hole.test\r\n250 PIPELINING\r\n"
                    } else if up.starts_with("DATA") {
                        in_data = true;
                        b"354 go on\r\n"
                    } else {
                        b"250 ok\r\n"
                    };
                    w.write_all(reply).await.unwrap();
                }
            });
        }
    });
    (port, rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_transaction_is_replaced_after_its_lease_expires() {
    let db = TestDb::new().await;
    let sd_store = Shutdown::new();
    let (_store, store_url) = FakeStore::start(&[], &sd_store).await;
    let (hole, mut at_end_of_data) = black_hole().await;
    let mut c = config(&db.url, &store_url);
    c.workers.lease_secs = 2;
    c.workers.count = 1;
    c.transports
        .insert("remote.test".into(), format!("127.0.0.1:{hole}"));
    let sd_a = Shutdown::new();
    let a = mailsuite_relay_queue::start(c.clone(), sd_a.clone())
        .await
        .unwrap();
    let r = enqueue(
        a.grpc.unwrap(),
        header("kill", "alice@local.test", &["bob@remote.test"]),
        &message(
            "alice@local.test",
            "bob@remote.test",
            "survivor",
            "kill@local.test",
        ),
    )
    .await;
    tokio::time::timeout(T, at_end_of_data.recv())
        .await
        .unwrap();
    // Kill the worker while it waits for the reply to the end of data.
    sd_a.drain(Duration::ZERO).await;
    let (state, owner, attempts): (String, Option<uuid::Uuid>, i64) = sqlx::query_as(
        "SELECT r.state, r.lease_owner, (SELECT count(*) FROM relay.attempts a WHERE a.recipient_id = r.id)
         FROM relay.recipients r WHERE r.message_id = $1::uuid",
    )
    .bind(&r.queue_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(state, "delivering", "claimed and abandoned");
    assert!(owner.is_some(), "still leased to the dead worker");
    assert_eq!(attempts, 0, "nothing recorded");

    let sink = Sink::start(&[]).await;
    c.transports.insert("remote.test".into(), sink.route());
    let sd_b = Shutdown::new();
    let _b = mailsuite_relay_queue::start(c, sd_b.clone()).await.unwrap();
    let got = sink.wait_for(1).await;
    assert!(String::from_utf8_lossy(&got[0].bytes).contains("Subject: survivor"));
    eventually(T, "recorded as delivered", || async {
        let s = states(&db.pool, &r.queue_id).await;
        (s[0].1 == "delivered").then_some(())
    })
    .await;
    sd_b.drain(Duration::from_secs(10)).await;
    sd_store.drain(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_survives_a_restart_and_admin_operations_work() {
    let db = TestDb::new().await;
    let sd_store = Shutdown::new();
    let (store, store_url) = FakeStore::start(&["alice@local.test"], &sd_store).await;
    // A port where nothing listens: connections are refused, so delivery is deferred.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut c = config(&db.url, &store_url);
    c.retry.schedule_secs = vec![3600];
    c.transports
        .insert("remote.test".into(), format!("127.0.0.1:{closed}"));
    c.transports
        .insert("gone.test".into(), format!("127.0.0.1:{closed}"));
    let sd_a = Shutdown::new();
    let a = mailsuite_relay_queue::start(c.clone(), sd_a.clone())
        .await
        .unwrap();
    let keep = enqueue(
        a.grpc.unwrap(),
        header("keep", "alice@local.test", &["bob@remote.test"]),
        &message(
            "alice@local.test",
            "bob@remote.test",
            "kept",
            "keep@local.test",
        ),
    )
    .await;
    let drop_me = enqueue(
        a.grpc.unwrap(),
        header("drop", "alice@local.test", &["x@gone.test"]),
        &message(
            "alice@local.test",
            "x@gone.test",
            "dropped",
            "drop@local.test",
        ),
    )
    .await;
    eventually(T, "both deferred", || async {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM relay.recipients WHERE state = 'deferred'")
                .fetch_one(&db.pool)
                .await
                .unwrap();
        (n == 2).then_some(())
    })
    .await;
    let mut cl = client(a.grpc.unwrap()).await;
    let listed = cl
        .list_messages(ListMessagesRequest {
            domain: "remote.test".into(),
            limit: 10,
        })
        .await
        .unwrap()
        .into_inner()
        .messages;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].queue_id, keep.queue_id);
    assert_eq!(listed[0].recipients[0].state(), RecipientState::Deferred);
    assert!(
        listed[0].recipients[0].last_reply.contains("127.0.0.1"),
        "{:?}",
        listed[0].recipients[0]
    );
    // Delete with a bounce: the sender gets a DSN, the message is gone.
    cl.delete(DeleteRequest {
        queue_id: drop_me.queue_id.clone(),
        bounce: true,
    })
    .await
    .unwrap();
    let err = cl
        .get_message(GetMessageRequest {
            queue_id: drop_me.queue_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let dsn = eventually(T, "DSN for the deleted message", || async {
        store
            .stored()
            .into_iter()
            .find(|s| s.recipients == ["alice@local.test"])
    })
    .await;
    assert!(String::from_utf8_lossy(&dsn.bytes).contains("Final-Recipient: rfc822; x@gone.test"));

    // Restart relay-queue with the route now working; ETRN-style Flush makes it due now
    // (the schedule would wait an hour).
    sd_a.drain(Duration::from_secs(10)).await;
    let sink = Sink::start(&[]).await;
    c.transports.insert("remote.test".into(), sink.route());
    let sd_b = Shutdown::new();
    let b = mailsuite_relay_queue::start(c, sd_b.clone()).await.unwrap();
    let mut cl = client(b.grpc.unwrap()).await;
    let flushed = cl
        .flush(FlushRequest {
            domain: "remote.test".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(flushed.recipients, 1);
    let got = sink.wait_for(1).await;
    assert!(String::from_utf8_lossy(&got[0].bytes).contains("Subject: kept"));
    let flushed = cl
        .flush(FlushRequest {
            domain: "nothing.test".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(flushed.recipients, 0);
    sd_b.drain(Duration::from_secs(10)).await;
    sd_store.drain(Duration::from_secs(10)).await;
}
