//! MX routing against a real DNS server (Python dnslib): preference order with fallback to
//! the next MX host, implicit MX (address records only), null MX (RFC 7505) and NXDOMAIN.

mod common;

use std::time::Duration;

use common::*;
use mailsuite_runtime::Shutdown;
use mailsuite_testkit::{TestDb, eventually};
use tokio::io::{AsyncBufReadExt, BufReader};

struct Dns {
    _child: tokio::process::Child,
    _zone: tempfile::NamedTempFile,
    port: u16,
}

async fn dns(zone: &str) -> Dns {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), zone).unwrap();
    let mut child = tokio::process::Command::new("python3")
        .arg(py("dns_server.py"))
        .arg(f.path())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 with dnslib");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    tokio::time::timeout(T, out.read_line(&mut line))
        .await
        .unwrap()
        .unwrap();
    let port = line.trim().strip_prefix("PORT ").unwrap().parse().unwrap();
    Dns {
        _child: child,
        _zone: f,
        port,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mx_implicit_mx_null_mx_and_nxdomain() {
    let db = TestDb::new().await;
    let sd = Shutdown::new();
    let (store, store_url) = FakeStore::start(&["alice@local.test"], &sd).await;
    let sink = Sink::start(&[]).await;
    // 127.0.0.2 is loopback too, but the sink only listens on 127.0.0.1: the preferred MX
    // refuses connections and delivery must go on to the next one.
    let server = dns("
mx.test.            60 IN MX 10 primary.mx.test.
mx.test.            60 IN MX 20 backup.mx.test.
primary.mx.test.    60 IN A 127.0.0.2
backup.mx.test.     60 IN A 127.0.0.1
implicit.test.      60 IN A 127.0.0.1
nullmx.test.        60 IN MX 0 .
")
    .await;
    let mut c = config(&db.url, &store_url);
    c.dns_servers = vec![format!("127.0.0.1:{}", server.port)];
    c.mx_port = sink.port;
    // The lab's MX hosts are on loopback, which production refuses (see l11_ below).
    c.allow_private_mx_addresses = true;
    let started = mailsuite_relay_queue::start(c, sd.clone()).await.unwrap();
    let r = enqueue(
        started.grpc.unwrap(),
        header(
            "mx",
            "alice@local.test",
            &[
                "bob@mx.test",
                "bob@implicit.test",
                "bob@nullmx.test",
                "bob@nx.test",
            ],
        ),
        &message(
            "alice@local.test",
            "bob@mx.test",
            "routing",
            "mx@local.test",
        ),
    )
    .await;

    let got = sink.wait_for(2).await;
    let mut rcpts: Vec<String> = got
        .iter()
        .map(|m| m.meta["rcpt_tos"][0].as_str().unwrap().to_string())
        .collect();
    rcpts.sort();
    assert_eq!(rcpts, vec!["bob@implicit.test", "bob@mx.test"]);

    let st = eventually(T, "every recipient final", || async {
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
            ("bob@mx.test", "delivered"),
            ("bob@implicit.test", "delivered"),
            ("bob@nullmx.test", "failed"),
            ("bob@nx.test", "failed"),
        ]
    );
    let dsns = eventually(T, "two DSNs to alice", || async {
        let d: Vec<Stored> = store
            .stored()
            .into_iter()
            .filter(|s| s.recipients == ["alice@local.test"])
            .collect();
        (d.len() >= 2).then_some(d)
    })
    .await;
    let texts: Vec<String> = dsns
        .iter()
        .map(|d| String::from_utf8_lossy(&d.bytes).into_owned())
        .collect();
    assert!(
        texts
            .iter()
            .any(|t| t.contains("Final-Recipient: rfc822; bob@nullmx.test")
                && t.contains("Status: 5.1.10")),
        "null MX is a permanent failure: {texts:?}"
    );
    assert!(
        texts
            .iter()
            .any(|t| t.contains("Final-Recipient: rfc822; bob@nx.test")
                && t.contains("Status: 5.1.2")),
        "NXDOMAIN is a permanent failure: {texts:?}"
    );
    let mx_host: String = sqlx::query_scalar(
        "SELECT remote_mta FROM relay.recipients WHERE message_id = $1::uuid AND address = 'bob@mx.test'",
    )
    .bind(&r.queue_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(mx_host, "backup.mx.test", "fell back to the second MX");
    sd.drain(Duration::from_secs(10)).await;
}

/// An MX record pointing into our own network (loopback here; private ranges alike) is not
/// followed by default: nothing connects, the recipient is deferred with a clear reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l11_mx_on_loopback_is_not_contacted_by_default() {
    let db = TestDb::new().await;
    let sd = Shutdown::new();
    let (_store, store_url) = FakeStore::start(&["alice@local.test"], &sd).await;
    let internal = Scripted::start(Some(&["PIPELINING"])).await;
    let server = dns("
ssrf.test.          60 IN MX 10 mx.ssrf.test.
mx.ssrf.test.       60 IN A 127.0.0.1
mixed.test.         60 IN MX 10 mx.mixed.test.
mx.mixed.test.      60 IN A 10.0.0.1
mx.mixed.test.      60 IN AAAA ::1
")
    .await;
    let mut c = config(&db.url, &store_url);
    c.dns_servers = vec![format!("127.0.0.1:{}", server.port)];
    c.mx_port = internal.port;
    c.retry.schedule_secs = vec![3600];
    assert!(!c.allow_private_mx_addresses, "off by default");
    let started = mailsuite_relay_queue::start(c, sd.clone()).await.unwrap();
    let r = enqueue(
        started.grpc.unwrap(),
        header(
            "ssrf",
            "alice@local.test",
            &["bob@ssrf.test", "eve@mixed.test"],
        ),
        &message(
            "alice@local.test",
            "bob@ssrf.test",
            "ssrf",
            "ssrf@local.test",
        ),
    )
    .await;
    let st = eventually(T, "both attempts recorded", || async {
        let s: Vec<(String, String, i32, String)> = sqlx::query_as(
            "SELECT address, state, attempts, last_reply FROM relay.recipients
             WHERE message_id = $1::uuid ORDER BY id",
        )
        .bind(&r.queue_id)
        .fetch_all(&db.pool)
        .await
        .unwrap();
        s.iter().all(|x| x.2 >= 1).then_some(s)
    })
    .await;
    for (addr, state, _, reply) in &st {
        assert_eq!(state, "deferred", "{addr}: {reply}");
        assert!(
            reply.starts_with("4.4.4") && reply.contains("allow_private_mx_addresses"),
            "{addr}: {reply}"
        );
    }
    assert!(st[0].3.contains("127.0.0.1"), "{}", st[0].3);
    assert_eq!(
        internal
            .connections
            .load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the internal server was never contacted"
    );
    sd.drain(Duration::from_secs(10)).await;
}
