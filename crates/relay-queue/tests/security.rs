//! Regression tests for the relay findings of the 2026-12-02 security review (issue 12):
//! H2 DKIM signing, H3 smarthost TLS, L5 BINARYMIME, L6 backscatter, L8 quoted local parts.
//! Each drives a real relay-queue (real PostgreSQL, real sockets) against a fake next hop.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use mailsuite_proto::DsnRet;
use mailsuite_relay_queue::config::SmarthostTls;
use mailsuite_runtime::Shutdown;
use mailsuite_testkit::{TestCerts, TestDb, eventually};

async fn recipient(pool: &sqlx::PgPool, queue_id: &str, addr: &str) -> (String, i32, String) {
    sqlx::query_as(
        "SELECT state, attempts, last_reply FROM relay.recipients
         WHERE message_id = $1::uuid AND address = $2",
    )
    .bind(queue_id)
    .bind(addr)
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Every message in the queue other than `original` (the DSNs it caused), as raw bytes.
async fn other_messages(pool: &sqlx::PgPool, original: &str) -> Vec<Vec<u8>> {
    sqlx::query_scalar("SELECT raw FROM relay.messages WHERE id <> $1::uuid ORDER BY created")
        .bind(original)
        .fetch_all(pool)
        .await
        .unwrap()
}

fn dkim_domains(bytes: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(bytes);
    let header = text.split("\r\n\r\n").next().unwrap_or("");
    // Unfold, then find d= in every DKIM-Signature field.
    let unfolded = header.replace("\r\n ", " ").replace("\r\n\t", " ");
    unfolded
        .split("\r\n")
        .filter(|l| l.to_ascii_lowercase().starts_with("dkim-signature:"))
        .filter_map(|l| {
            l.split(';')
                .map(str::trim)
                .find_map(|t| t.strip_prefix("d="))
                .map(|d| d.trim().to_ascii_lowercase())
        })
        .collect()
}

fn self_signed_server() -> Arc<rustls::ServerConfig> {
    mailsuite_runtime::tls::server_config(&mailsuite_runtime::tls::TlsConfig {
        cert: String::new(),
        key: String::new(),
        self_signed_names: vec!["localhost".into()],
    })
    .unwrap()
}

fn ca_signed_server(certs: &TestCerts) -> Arc<rustls::ServerConfig> {
    mailsuite_runtime::tls::server_config(&certs.tls_config()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_dkim_signs_only_the_submitters_own_from_domain() {
    let db = TestDb::new().await;
    let sd = Shutdown::new();
    let (_store, store_url) = FakeStore::start(&["alice@local.test"], &sd).await;
    let sink = Sink::start(&[]).await;
    let (ours, ours_txt) = dkim_key(HOSTED, "s1");
    let (tenant_b, _) = dkim_key("tenant-b.test", "s1");
    let mut c = config(&db.url, &store_url);
    c.transports.insert("remote.test".into(), sink.route());
    c.dkim = vec![ours, tenant_b];
    let started = mailsuite_relay_queue::start(c, sd.clone()).await.unwrap();
    let addr = started.grpc.unwrap();
    let body = |from: &str, subject: &str| {
        format!(
            "From: {from}\r\nTo: <ext@remote.test>\r\nSubject: {subject}\r\n\
             Message-ID: <{subject}@x>\r\n\r\nWire the money.\r\n"
        )
        .into_bytes()
    };
    // (a) alice, authenticated, writes another tenant's address into From:.
    enqueue(
        addr,
        header("h2-a", "alice@local.test", &["ext@remote.test"]),
        &body("CEO <ceo@tenant-b.test>", "spoofed-by-submitter"),
    )
    .await;
    // (b) unauthenticated MX mail forwarded through an alias, From: tenant-b.
    enqueue(
        addr,
        mx_header("h2-b", "attacker@evil.example", &["ext@remote.test"]),
        &body("CEO <ceo@tenant-b.test>", "forwarded-mx"),
    )
    .await;
    // (c) the legitimate case: alice sends as alice.
    enqueue(
        addr,
        header("h2-c", "alice@local.test", &["ext@remote.test"]),
        &body("Alice <alice@local.test>", "legit"),
    )
    .await;
    let got = sink.wait_for(3).await;
    let find = |subject: &str| {
        got.iter()
            .find(|m| String::from_utf8_lossy(&m.bytes).contains(&format!("Subject: {subject}")))
            .unwrap_or_else(|| panic!("{subject} not delivered"))
    };
    for subject in ["spoofed-by-submitter", "forwarded-mx"] {
        let d = dkim_domains(&find(subject).bytes);
        assert!(
            !d.iter().any(|d| d == "tenant-b.test"),
            "{subject}: signed with tenant-b's key: {d:?}"
        );
        assert!(d.is_empty(), "{subject}: no signature at all: {d:?}");
    }
    let legit = find("legit");
    assert_eq!(dkim_domains(&legit.bytes), vec![HOSTED.to_string()]);
    let out = run_py(
        "dkim_verify.py",
        &[legit.path.to_str().unwrap(), HOSTED, ours_txt.as_str()],
    );
    assert!(out.contains("verified 1"), "{out}");
    sd.drain(Duration::from_secs(10)).await;
}

/// The smarthost presents a certificate nobody vouches for (a MITM): the credentials must
/// never be sent, nothing is relayed, and the mail waits in the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h3_smarthost_with_unverifiable_certificate_never_sees_auth() {
    let db = TestDb::new().await;
    let sd = Shutdown::new();
    let (_store, store_url) = FakeStore::start(&[], &sd).await;
    let mitm = Scripted::start_with(
        Some(&["PIPELINING", "STARTTLS", "AUTH PLAIN"]),
        ScriptedTls::Starttls(self_signed_server()),
    )
    .await;
    let mut c = config(&db.url, &store_url);
    c.retry.schedule_secs = vec![3600];
    c.smarthost = mitm.route();
    c.smarthost_user = "relayuser".into();
    c.smarthost_password = "SmarthostS3cret".into();
    let started = mailsuite_relay_queue::start(c, sd.clone()).await.unwrap();
    let r = enqueue(
        started.grpc.unwrap(),
        header("h3-mitm", "alice@local.test", &["bob@anywhere.test"]),
        &message("alice@local.test", "bob@anywhere.test", "secret", "h3@x"),
    )
    .await;
    let (state, attempts, reply) = eventually(T, "the attempt recorded", || async {
        let r = recipient(&db.pool, &r.queue_id, "bob@anywhere.test").await;
        (r.1 >= 1).then_some(r)
    })
    .await;
    assert_eq!(state, "deferred", "kept for a retry, not lost: {reply}");
    assert_eq!(attempts, 1);
    assert!(reply.contains("TLS"), "{reply}");
    let cmds = mitm.commands();
    assert!(
        !cmds
            .iter()
            .any(|l| l.to_ascii_uppercase().starts_with("AUTH")),
        "credentials sent to an unverified server: {cmds:?}"
    );
    assert!(
        !cmds.iter().any(|l| l.starts_with("MAIL")),
        "mail sent to an unverified smarthost: {cmds:?}"
    );
    assert!(mitm.messages.lock().unwrap().is_empty());
    sd.drain(Duration::from_secs(10)).await;
}

/// The loudly named opt-out does what it says, and only that: TLS is still required, the
/// certificate is not checked, AUTH goes over it, and the attempt is recorded as unverified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h3_insecure_skip_verify_opt_out_still_requires_tls() {
    let db = TestDb::new().await;
    let sd = Shutdown::new();
    let (_store, store_url) = FakeStore::start(&[], &sd).await;
    let lab = Scripted::start_with(
        Some(&["PIPELINING", "STARTTLS", "AUTH PLAIN"]),
        ScriptedTls::Starttls(self_signed_server()),
    )
    .await;
    let mut c = config(&db.url, &store_url);
    c.smarthost = lab.route();
    c.smarthost_user = "relayuser".into();
    c.smarthost_password = "lab".into();
    c.smarthost_tls_insecure_skip_verify = true;
    let started = mailsuite_relay_queue::start(c, sd.clone()).await.unwrap();
    let r = enqueue(
        started.grpc.unwrap(),
        header("h3-lab", "alice@local.test", &["bob@anywhere.test"]),
        &message("alice@local.test", "bob@anywhere.test", "lab", "h3lab@x"),
    )
    .await;
    eventually(T, "delivered to the lab smarthost", || async {
        let r = recipient(&db.pool, &r.queue_id, "bob@anywhere.test").await;
        (r.0 == "delivered").then_some(())
    })
    .await;
    let cmds = lab.commands();
    let tls_at = cmds.iter().position(|l| l == "<TLS>").expect("TLS session");
    let auth_at = cmds
        .iter()
        .position(|l| l.starts_with("AUTH PLAIN "))
        .unwrap();
    assert!(tls_at < auth_at, "{cmds:?}");
    let verified: bool = sqlx::query_scalar(
        "SELECT a.tls_verified FROM relay.attempts a JOIN relay.recipients r
         ON r.id = a.recipient_id WHERE r.message_id = $1::uuid",
    )
    .bind(&r.queue_id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert!(!verified, "recorded as unverified");
    sd.drain(Duration::from_secs(10)).await;
}

/// A smarthost that does not offer STARTTLS gets nothing, credentials or not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h3_smarthost_without_starttls_gets_nothing() {
    let db = TestDb::new().await;
    let sd = Shutdown::new();
    let (_store, store_url) = FakeStore::start(&[], &sd).await;
    let plain = Scripted::start(Some(&["PIPELINING", "AUTH PLAIN"])).await;
    let mut c = config(&db.url, &store_url);
    c.retry.schedule_secs = vec![3600];
    c.smarthost = plain.route();
    let started = mailsuite_relay_queue::start(c, sd.clone()).await.unwrap();
    let r = enqueue(
        started.grpc.unwrap(),
        header("h3-plain", "alice@local.test", &["bob@anywhere.test"]),
        &message("alice@local.test", "bob@anywhere.test", "plain", "h3p@x"),
    )
    .await;
    let (state, _, reply) = eventually(T, "the attempt recorded", || async {
        let r = recipient(&db.pool, &r.queue_id, "bob@anywhere.test").await;
        (r.1 >= 1).then_some(r)
    })
    .await;
    assert_eq!(state, "deferred", "{reply}");
    assert!(reply.contains("STARTTLS"), "{reply}");
    assert!(
        !plain.commands().iter().any(|l| l.starts_with("MAIL")),
        "{:?}",
        plain.commands()
    );
    sd.drain(Duration::from_secs(10)).await;
}

/// With the smarthost's CA trusted (`smarthost_ca_file`), AUTH goes over the verified TLS
/// session and the mail is delivered; the same over implicit TLS (port 465 style).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h3_trusted_smarthost_gets_auth_over_starttls_and_implicit_tls() {
    let db = TestDb::new().await;
    let sd = Shutdown::new();
    let (_store, store_url) = FakeStore::start(&[], &sd).await;
    let certs = TestCerts::new();
    for (i, mode) in [SmarthostTls::Starttls, SmarthostTls::Implicit]
        .into_iter()
        .enumerate()
    {
        let tls = match mode {
            SmarthostTls::Starttls => ScriptedTls::Starttls(ca_signed_server(&certs)),
            SmarthostTls::Implicit => ScriptedTls::Implicit(ca_signed_server(&certs)),
        };
        let relay =
            Scripted::start_with(Some(&["PIPELINING", "STARTTLS", "AUTH PLAIN"]), tls).await;
        let mut c = config(&db.url, &store_url);
        c.smarthost = relay.route();
        c.smarthost_tls = mode;
        c.smarthost_ca_file = certs.ca_pem.to_str().unwrap().into();
        c.smarthost_user = "relayuser".into();
        c.smarthost_password = "SmarthostS3cret".into();
        let qsd = Shutdown::new();
        let started = mailsuite_relay_queue::start(c, qsd.clone()).await.unwrap();
        let to = format!("bob{i}@anywhere.test");
        let r = enqueue(
            started.grpc.unwrap(),
            header(&format!("h3-ok-{i}"), "alice@local.test", &[to.as_str()]),
            &message(
                "alice@local.test",
                &to,
                "via smarthost",
                &format!("h3ok{i}@x"),
            ),
        )
        .await;
        eventually(T, "delivered through the smarthost", || async {
            let r = recipient(&db.pool, &r.queue_id, &to).await;
            (r.0 == "delivered").then_some(())
        })
        .await;
        let cmds = relay.commands();
        let tls_at = cmds.iter().position(|l| l == "<TLS>").expect("TLS session");
        let auth_at = cmds
            .iter()
            .position(|l| l.starts_with("AUTH PLAIN "))
            .unwrap_or_else(|| panic!("{mode:?}: no AUTH: {cmds:?}"));
        assert!(tls_at < auth_at, "{mode:?}: AUTH only inside TLS: {cmds:?}");
        if mode == SmarthostTls::Implicit {
            assert_eq!(cmds[0], "<TLS>", "TLS from the first byte: {cmds:?}");
            assert!(!cmds.iter().any(|l| l == "STARTTLS"), "{cmds:?}");
        }
        assert_eq!(relay.messages.lock().unwrap().len(), 1);
        let verified: bool = sqlx::query_scalar(
            "SELECT a.tls_verified FROM relay.attempts a JOIN relay.recipients r
             ON r.id = a.recipient_id WHERE r.message_id = $1::uuid",
        )
        .bind(&r.queue_id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert!(verified, "{mode:?}");
        qsd.drain(Duration::from_secs(10)).await;
    }
    sd.drain(Duration::from_secs(10)).await;
}

/// A BINARYMIME body (bare CR, bare LF, NUL) reaches a server with BINARYMIME and CHUNKING
/// octet for octet through BDAT; a server without them gets nothing and the sender a 5.6.3
/// DSN (RFC 3030: never altered silently).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l5_binarymime_is_relayed_byte_exact_or_bounced_5_6_3() {
    let db = TestDb::new().await;
    let sd = Shutdown::new();
    let (store, store_url) = FakeStore::start(&["alice@local.test"], &sd).await;
    let binary_mx =
        Scripted::start(Some(&["PIPELINING", "8BITMIME", "BINARYMIME", "CHUNKING"])).await;
    let text_mx = Scripted::start(Some(&["PIPELINING", "8BITMIME"])).await;
    let mut c = config(&db.url, &store_url);
    c.transports.insert(
        "binary.test".into(),
        format!("127.0.0.1:{}", binary_mx.port),
    );
    c.transports
        .insert("text.test".into(), format!("127.0.0.1:{}", text_mx.port));
    let started = mailsuite_relay_queue::start(c, sd.clone()).await.unwrap();
    let mut body = b"From: alice@local.test\r\nSubject: blob\r\nMIME-Version: 1.0\r\n\
        Content-Type: application/octet-stream\r\n\r\n"
        .to_vec();
    body.extend_from_slice(b"bare\rCR bare\nLF NUL\0 \xff\xfe\r.\r\n.\n\r\n.\r\nend");
    for (key, to) in [("l5-bin", "bob@binary.test"), ("l5-text", "bob@text.test")] {
        let mut h = header(key, "alice@local.test", &[to]);
        h.body_8bit = true;
        h.binarymime = true;
        enqueue(started.grpc.unwrap(), h, &body).await;
    }
    let got = eventually(T, "the binary message at the BINARYMIME server", || async {
        let m = binary_mx.messages.lock().unwrap().clone();
        (!m.is_empty()).then_some(m)
    })
    .await;
    assert_eq!(got.len(), 1);
    assert!(
        got[0] == body,
        "altered in transit: {:?}",
        String::from_utf8_lossy(&got[0])
    );
    let cmds = binary_mx.commands();
    let mail = cmds.iter().find(|l| l.starts_with("MAIL FROM:")).unwrap();
    assert!(mail.contains("BODY=BINARYMIME"), "{mail}");
    assert!(
        cmds.contains(&format!("BDAT {} LAST", body.len())),
        "{cmds:?}"
    );
    assert!(!cmds.iter().any(|l| l == "DATA"), "{cmds:?}");

    let dsn = eventually(T, "a 5.6.3 DSN to alice", || async {
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
            "bob@text.test",
            "failed",
            "5.6.3",
            "blob",
        ],
    );
    let text = String::from_utf8_lossy(&dsn.bytes);
    assert!(
        text.contains("text/rfc822-headers") && !text.contains("NUL"),
        "a binary body is not carried inside the text report: {text}"
    );
    let tc = text_mx.commands();
    assert!(
        !tc.iter()
            .any(|l| l.starts_with("MAIL") || l == "DATA" || l.starts_with("BDAT")),
        "nothing sent to the server without BINARYMIME: {tc:?}"
    );
    assert!(text_mx.messages.lock().unwrap().is_empty());
    sd.drain(Duration::from_secs(10)).await;
}

/// Forwarded MX mail (no authenticated submitter) with a forged sender asking for every
/// report with the full message: no success or delay DSN, a failure DSN with headers only,
/// and the next hop is not asked for SUCCESS/DELAY or RET=FULL either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l6_forwarded_mx_mail_gets_no_success_or_delay_dsn_and_no_reflected_body() {
    let db = TestDb::new().await;
    let sd = Shutdown::new();
    let (_store, store_url) = FakeStore::start(&["victim@local.test"], &sd).await;
    let dsn_mx = Scripted::start(Some(&["PIPELINING", "DSN"])).await;
    let rejecting = Sink::start(&["--reject", "x@remote.test"]).await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut c = config(&db.url, &store_url);
    c.transports
        .insert("dsn.test".into(), format!("127.0.0.1:{}", dsn_mx.port));
    c.transports.insert("remote.test".into(), rejecting.route());
    c.transports
        .insert("slow.test".into(), format!("127.0.0.1:{closed}"));
    c.retry.schedule_secs = vec![1];
    c.retry.delay_warning_secs = 1;
    let started = mailsuite_relay_queue::start(c, sd.clone()).await.unwrap();
    let mut h = mx_header(
        "l6",
        "victim@local.test",
        &["ok@dsn.test", "x@remote.test", "late@slow.test"],
    );
    h.ret = DsnRet::Full as i32;
    h.envid = "L6".into();
    for r in &mut h.recipients {
        r.notify = vec!["SUCCESS".into(), "FAILURE".into(), "DELAY".into()];
    }
    let payload = "REFLECTED-PAYLOAD: buy cheap pills at spam.example";
    let body = format!("From: someone@evil.example\r\nSubject: reflect\r\n\r\n{payload}\r\n");
    let r = enqueue(started.grpc.unwrap(), h, body.as_bytes()).await;
    eventually(T, "delivered, failed and delay-warned", || async {
        let ok = recipient(&db.pool, &r.queue_id, "ok@dsn.test").await.0 == "delivered";
        let x = recipient(&db.pool, &r.queue_id, "x@remote.test").await.0 == "failed";
        // The delay warning is decided, and any DSN for it queued, in the same transaction
        // that sets this flag.
        let warned: bool = sqlx::query_scalar(
            "SELECT delay_warned FROM relay.recipients WHERE message_id = $1::uuid
             AND address = 'late@slow.test'",
        )
        .bind(&r.queue_id)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        (ok && x && warned).then_some(())
    })
    .await;
    let dsns = other_messages(&db.pool, &r.queue_id).await;
    assert_eq!(
        dsns.len(),
        1,
        "only the failure DSN, no success or delay report: {:?}",
        dsns.iter()
            .map(|d| String::from_utf8_lossy(d).into_owned())
            .collect::<Vec<_>>()
    );
    let text = String::from_utf8_lossy(&dsns[0]);
    assert!(
        text.contains("Final-Recipient: rfc822; x@remote.test"),
        "{text}"
    );
    assert!(text.contains("Action: failed"), "{text}");
    assert!(text.contains("text/rfc822-headers"), "{text}");
    assert!(!text.contains("message/rfc822"), "{text}");
    assert!(!text.contains(payload), "the body is not reflected: {text}");

    let cmds = dsn_mx.commands();
    let mail = cmds.iter().find(|l| l.starts_with("MAIL FROM:")).unwrap();
    assert!(
        mail.contains("RET=HDRS") && !mail.contains("RET=FULL"),
        "{mail}"
    );
    let rcpt = cmds.iter().find(|l| l.starts_with("RCPT TO:")).unwrap();
    assert_eq!(rcpt, "RCPT TO:<ok@dsn.test> NOTIFY=FAILURE");
    sd.drain(Duration::from_secs(10)).await;
}

/// Addresses are stored unquoted; on the wire a local part that is not a dot-atom is quoted
/// again, and one with a control character (an alias target straight from the store, which
/// Enqueue's validation never saw) fails alone instead of injecting a command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l8_quoted_local_parts_are_requoted_and_control_characters_bounce() {
    let db = TestDb::new().await;
    let sd = Shutdown::new();
    let (_store, store_url) = FakeStore::start(&[], &sd).await;
    let mx = Scripted::start(Some(&["PIPELINING"])).await;
    let mut c = config(&db.url, &store_url);
    c.transports
        .insert("x.test".into(), format!("127.0.0.1:{}", mx.port));
    let started = mailsuite_relay_queue::start(c, sd.clone()).await.unwrap();
    let quoted = enqueue(
        started.grpc.unwrap(),
        header(
            "l8",
            "john doe@local.test",
            &["john doe@x.test", "a@b@x.test", "say \"hi\"@x.test"],
        ),
        b"From: x@local.test\r\nSubject: quoted\r\n\r\nhi\r\n",
    )
    .await;
    // As the store's alias expansion adds targets: straight into the queue, no Enqueue.
    let queue = mailsuite_relay_queue::db::Db {
        pool: db.pool.clone(),
    };
    let evil = "v\r\nRSET\r\nRCPT TO:<w@x.test";
    let evil_addr = format!("{evil}@x.test");
    let (injected, _) = queue
        .enqueue(
            &mx_header(
                "l8-ctl",
                "alice@local.test",
                &[evil_addr.as_str(), "ok@x.test"],
            ),
            b"From: x@local.test\r\nSubject: control\r\n\r\nhi\r\n",
        )
        .await
        .unwrap();
    started.engine.wake();
    let (state, _, reply) = eventually(T, "the control-character recipient failed", || async {
        let r = recipient(&db.pool, &injected.to_string(), &evil_addr).await;
        (r.0 == "failed").then_some(r)
    })
    .await;
    assert_eq!(state, "failed");
    assert!(reply.starts_with("5.1.3"), "{reply}");
    // Every deliverable recipient of both messages delivered. Counted by recipient, not by
    // transactions at the MX: the two workers may split one message's recipients over two
    // connections (seen once in eight runs), which is allowed.
    eventually(T, "both messages delivered", || async {
        let quoted = states(&db.pool, &quoted.queue_id).await;
        let ok = recipient(&db.pool, &injected.to_string(), "ok@x.test").await;
        (quoted.iter().all(|s| s.1 == "delivered") && ok.0 == "delivered").then_some(())
    })
    .await;
    assert!(mx.messages.lock().unwrap().len() >= 2);
    let cmds = mx.commands();
    for want in [
        "MAIL FROM:<\"john doe\"@local.test>",
        "RCPT TO:<\"john doe\"@x.test>",
        "RCPT TO:<\"a@b\"@x.test>",
        "RCPT TO:<\"say \\\"hi\\\"\"@x.test>",
        "RCPT TO:<ok@x.test>",
    ] {
        assert!(cmds.iter().any(|l| l == want), "no {want:?} in {cmds:?}");
    }
    assert!(
        !cmds.iter().any(|l| l == "RSET" || l.contains("w@x.test")),
        "command injected: {cmds:?}"
    );
    let st = states(&db.pool, &quoted.queue_id).await;
    assert!(st.iter().all(|s| s.1 == "delivered"), "{st:?}");
    sd.drain(Duration::from_secs(10)).await;
}
