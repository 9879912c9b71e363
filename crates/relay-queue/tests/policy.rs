//! STARTTLS (verified, opportunistic, required), SMTPUTF8 refusal, delay warnings, maximum
//! lifetime and loop detection — against the aiosmtpd sink and a stand-in store.

mod common;

use std::time::Duration;

use common::*;
use mailsuite_runtime::Shutdown;
use mailsuite_testkit::{TestCerts, TestDb, eventually};

async fn attempt_tls(pool: &sqlx::PgPool, queue_id: &str) -> Vec<(String, bool, bool)> {
    sqlx::query_as(
        "SELECT a.outcome, a.tls, a.tls_verified FROM relay.attempts a
         JOIN relay.recipients r ON r.id = a.recipient_id
         WHERE r.message_id = $1::uuid ORDER BY a.id",
    )
    .bind(queue_id)
    .fetch_all(pool)
    .await
    .unwrap()
}

async fn last_reply(pool: &sqlx::PgPool, queue_id: &str) -> (String, String) {
    sqlx::query_as("SELECT state, last_reply FROM relay.recipients WHERE message_id = $1::uuid")
        .bind(queue_id)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_verified_opportunistic_and_required() {
    let db = TestDb::new().await;
    let sd = Shutdown::new();
    let (_store, store_url) = FakeStore::start(&[], &sd).await;
    let ours = TestCerts::new();
    let strangers = TestCerts::new();
    let tls_arg = |c: &TestCerts| {
        vec![
            "--tls".to_string(),
            c.cert_pem.to_str().unwrap().to_string(),
            c.key_pem.to_str().unwrap().to_string(),
        ]
    };
    let trusted = Sink::start(
        &tls_arg(&ours)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    )
    .await;
    let untrusted = Sink::start(
        &tls_arg(&strangers)
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    )
    .await;
    let plain = Sink::start(&[]).await;
    let mut c = config(&db.url, &store_url);
    c.tls_extra_roots = ours.ca_pem.to_str().unwrap().into();
    c.retry.schedule_secs = vec![3600];
    let route = |s: &Sink| format!("localhost:{}", s.port);
    c.transports.insert("trusted.test".into(), route(&trusted));
    c.transports
        .insert("opportunistic.test".into(), route(&untrusted));
    c.transports
        .insert("required-untrusted.test".into(), route(&untrusted));
    c.transports
        .insert("required-plain.test".into(), route(&plain));
    c.require_tls_domains = vec![
        "required-untrusted.test".into(),
        "required-plain.test".into(),
    ];
    let started = mailsuite_relay_queue::start(c, sd.clone()).await.unwrap();
    let addr = started.grpc.unwrap();
    let mut ids = Vec::new();
    for d in [
        "trusted.test",
        "opportunistic.test",
        "required-untrusted.test",
        "required-plain.test",
    ] {
        let to = format!("bob@{d}");
        let r = enqueue(
            addr,
            header(d, "alice@local.test", &[to.as_str()]),
            &message("alice@local.test", &to, d, &format!("{d}@local.test")),
        )
        .await;
        ids.push(r.queue_id);
    }
    let got = trusted.wait_for(1).await;
    assert_eq!(got[0].meta["tls"], true, "the sink saw STARTTLS");
    let got = untrusted.wait_for(1).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].meta["tls"], true);
    assert_eq!(
        got[0].meta["rcpt_tos"],
        serde_json::json!(["bob@opportunistic.test"])
    );

    let all_done = eventually(T, "every attempt recorded", || async {
        let mut v = Vec::new();
        for id in &ids {
            let a = attempt_tls(&db.pool, id).await;
            if a.is_empty() {
                return None;
            }
            v.push(a[0].clone());
        }
        Some(v)
    })
    .await;
    assert_eq!(
        all_done[0],
        ("delivered".into(), true, true),
        "verified TLS"
    );
    assert_eq!(
        all_done[1],
        ("delivered".into(), true, false),
        "encrypted, unverified, recorded"
    );
    assert_eq!(
        all_done[2].0, "deferred",
        "required TLS refuses an unverifiable certificate"
    );
    assert_eq!(
        all_done[3].0, "deferred",
        "required TLS refuses a server without STARTTLS"
    );
    let (_, reply) = last_reply(&db.pool, &ids[2]).await;
    assert!(reply.contains("TLS"), "{reply}");
    let (_, reply) = last_reply(&db.pool, &ids[3]).await;
    assert!(reply.contains("STARTTLS"), "{reply}");
    assert!(plain.messages().is_empty(), "never sent in clear text");
    assert_eq!(untrusted.messages().len(), 1, "only the opportunistic one");
    sd.drain(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtputf8_message_to_a_server_without_it_bounces() {
    let db = TestDb::new().await;
    let sd = Shutdown::new();
    let (store, store_url) = FakeStore::start(&["alice@local.test"], &sd).await;
    let sink = Sink::start(&["--no-smtputf8"]).await;
    let mut c = config(&db.url, &store_url);
    c.transports.insert("remote.test".into(), sink.route());
    let started = mailsuite_relay_queue::start(c, sd.clone()).await.unwrap();
    let mut h = header("utf8", "alice@local.test", &["bob@remote.test"]);
    h.smtputf8 = true;
    let r = enqueue(
        started.grpc.unwrap(),
        h,
        "From: alice@local.test\r\nTo: Jürgen <bob@remote.test>\r\nSubject: utf8\r\n\r\nGrüße\r\n"
            .as_bytes(),
    )
    .await;
    let dsn = eventually(T, "a DSN to alice", || async {
        store
            .stored()
            .into_iter()
            .find(|s| s.recipients == ["alice@local.test"])
    })
    .await;
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), &dsn.bytes).unwrap();
    run_py(
        "dsn_check.py",
        &[
            f.path().to_str().unwrap(),
            "bob@remote.test",
            "failed",
            "5.6.7",
            "utf8",
        ],
    );
    assert_eq!(last_reply(&db.pool, &r.queue_id).await.0, "failed");
    assert!(sink.messages().is_empty());
    sd.drain(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_warning_then_expiry_and_loop_detection() {
    let db = TestDb::new().await;
    let sd = Shutdown::new();
    let (store, store_url) = FakeStore::start(&["alice@local.test"], &sd).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut c = config(&db.url, &store_url);
    c.transports
        .insert("remote.test".into(), format!("127.0.0.1:{closed}"));
    c.retry.schedule_secs = vec![1];
    c.retry.delay_warning_secs = 1;
    c.retry.max_lifetime_secs = 4;
    let started = mailsuite_relay_queue::start(c, sd.clone()).await.unwrap();
    let addr = started.grpc.unwrap();
    let r = enqueue(
        addr,
        header("slow", "alice@local.test", &["bob@remote.test"]),
        &message(
            "alice@local.test",
            "bob@remote.test",
            "slow",
            "slow@local.test",
        ),
    )
    .await;
    let mut looping = String::new();
    for i in 0..51 {
        looping.push_str(&format!(
            "Received: from hop{i}.test by hop{}.test; Sat, 28 Nov 2026 01:00:00 +0000\r\n",
            i + 1
        ));
    }
    looping.push_str("From: alice@local.test\r\nSubject: loop\r\n\r\nround and round\r\n");
    let lr = enqueue(
        addr,
        header("loop", "alice@local.test", &["carol@remote.test"]),
        looping.as_bytes(),
    )
    .await;

    let dsns = eventually(T, "delay warning, loop failure and expiry DSNs", || async {
        let d: Vec<Stored> = store
            .stored()
            .into_iter()
            .filter(|s| s.recipients == ["alice@local.test"])
            .collect();
        (d.len() >= 3).then_some(d)
    })
    .await;
    let check = |bytes: &[u8], rcpt: &str, action: &str, status: &str, subject: &str| {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), bytes).unwrap();
        std::process::Command::new("python3")
            .arg(py("dsn_check.py"))
            .args([f.path().to_str().unwrap(), rcpt, action, status, subject])
            .status()
            .unwrap()
            .success()
    };
    let delayed = dsns
        .iter()
        .filter(|d| check(&d.bytes, "bob@remote.test", "delayed", "4.4.1", "slow"))
        .count();
    let expired = dsns
        .iter()
        .filter(|d| check(&d.bytes, "bob@remote.test", "failed", "4.4.1", "slow"))
        .count();
    let looped = dsns
        .iter()
        .filter(|d| check(&d.bytes, "carol@remote.test", "failed", "5.4.6", "loop"))
        .count();
    assert_eq!(
        (delayed, expired, looped),
        (1, 1, 1),
        "exactly one DSN of each kind"
    );
    let (state, reply) = last_reply(&db.pool, &r.queue_id).await;
    assert_eq!(state, "failed");
    assert!(reply.contains("gave up"), "{reply}");
    let (state, reply) = last_reply(&db.pool, &lr.queue_id).await;
    assert_eq!(state, "failed");
    assert!(reply.starts_with("5.4.6"), "{reply}");
    sd.drain(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_recipient_replies_size_limit_and_success_notification() {
    let db = TestDb::new().await;
    let sd = Shutdown::new();
    let (store, store_url) = FakeStore::start(&["alice@local.test"], &sd).await;
    let sink = Sink::start(&[
        "--reject",
        "x@remote.test",
        "--tempfail-rcpt",
        "y@remote.test",
    ])
    .await;
    let small = Sink::start(&["--size-limit", "100"]).await;
    let mut c = config(&db.url, &store_url);
    c.retry.schedule_secs = vec![3600];
    c.transports.insert("remote.test".into(), sink.route());
    c.transports.insert("small.test".into(), small.route());
    let started = mailsuite_relay_queue::start(c, sd.clone()).await.unwrap();
    let addr = started.grpc.unwrap();
    let mut h = header(
        "mixed-replies",
        "alice@local.test",
        &["ok@remote.test", "x@remote.test", "y@remote.test"],
    );
    h.recipients[0].notify = vec!["SUCCESS".into(), "FAILURE".into()];
    let r = enqueue(
        addr,
        h,
        &message(
            "alice@local.test",
            "ok@remote.test",
            "replies",
            "rep@local.test",
        ),
    )
    .await;
    let big = enqueue(
        addr,
        header("big", "alice@local.test", &["bob@small.test"]),
        &message(
            "alice@local.test",
            "bob@small.test",
            "too big",
            "big@local.test",
        ),
    )
    .await;

    let got = sink.wait_for(1).await;
    assert_eq!(
        got[0].meta["rcpt_tos"],
        serde_json::json!(["ok@remote.test"])
    );
    assert_eq!(
        got[0].meta["rcpt_options"],
        serde_json::json!([]),
        "no NOTIFY to a server that does not offer DSN"
    );
    let st = eventually(T, "one session, three outcomes", || async {
        let s = states(&db.pool, &r.queue_id).await;
        s.iter()
            .all(|x| x.1 != "pending" && x.1 != "delivering")
            .then_some(s)
    })
    .await;
    let by: Vec<(&str, &str)> = st.iter().map(|s| (s.0.as_str(), s.1.as_str())).collect();
    assert_eq!(
        by,
        vec![
            ("ok@remote.test", "delivered"),
            ("x@remote.test", "failed"),
            ("y@remote.test", "deferred"),
        ]
    );
    let reply = eventually(T, "the oversized message failed", || async {
        let (state, reply) = last_reply(&db.pool, &big.queue_id).await;
        (state == "failed").then_some(reply)
    })
    .await;
    assert!(
        reply.starts_with("5.3.4"),
        "SIZE checked before sending: {reply}"
    );
    assert!(small.messages().is_empty());

    let dsns = eventually(T, "success, failure and size DSNs", || async {
        let d: Vec<Stored> = store
            .stored()
            .into_iter()
            .filter(|s| s.recipients == ["alice@local.test"])
            .collect();
        (d.len() >= 3).then_some(d)
    })
    .await;
    assert_eq!(dsns.len(), 3, "nothing for the deferred recipient yet");
    let ok = |rcpt: &str, action: &str, status: &str, subject: &str| {
        dsns.iter().any(|d| {
            let f = tempfile::NamedTempFile::new().unwrap();
            std::fs::write(f.path(), &d.bytes).unwrap();
            std::process::Command::new("python3")
                .arg(py("dsn_check.py"))
                .args([f.path().to_str().unwrap(), rcpt, action, status, subject])
                .output()
                .unwrap()
                .status
                .success()
        })
    };
    assert!(
        ok("ok@remote.test", "delivered", "2.0.0", "replies"),
        "NOTIFY=SUCCESS honoured"
    );
    assert!(ok("x@remote.test", "failed", "5.1.1", "replies"));
    assert!(ok("bob@small.test", "failed", "5.3.4", "too big"));
    sd.drain(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smarthost_with_auth_over_starttls() {
    let db = TestDb::new().await;
    let sd = Shutdown::new();
    let (_store, store_url) = FakeStore::start(&[], &sd).await;
    let certs = TestCerts::new();
    let relay = Sink::start(&[
        "--tls",
        certs.cert_pem.to_str().unwrap(),
        certs.key_pem.to_str().unwrap(),
        "--auth",
        "relayuser:relay secret",
    ])
    .await;
    let mut c = config(&db.url, &store_url);
    c.tls_extra_roots = certs.ca_pem.to_str().unwrap().into();
    c.smarthost = format!("localhost:{}", relay.port);
    c.smarthost_user = "relayuser".into();
    c.smarthost_password = "relay secret".into();
    let started = mailsuite_relay_queue::start(c, sd.clone()).await.unwrap();
    enqueue(
        started.grpc.unwrap(),
        header("smart", "alice@local.test", &["bob@anywhere.test"]),
        &message(
            "alice@local.test",
            "bob@anywhere.test",
            "via smarthost",
            "sh@local.test",
        ),
    )
    .await;
    let got = relay.wait_for(1).await;
    assert_eq!(got[0].meta["auth"], "relayuser", "authenticated");
    assert_eq!(got[0].meta["tls"], true, "credentials only over TLS");
    assert_eq!(
        got[0].meta["rcpt_tos"],
        serde_json::json!(["bob@anywhere.test"])
    );
    sd.drain(Duration::from_secs(10)).await;
}
