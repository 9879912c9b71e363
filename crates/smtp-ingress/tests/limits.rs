//! Every configurable limit over real sockets, and the reply codes that need directory state
//! (251 forwarding alias, 551 moved account, 452 over quota).

mod common;

use std::time::{Duration, Instant};

use common::*;
use mailsuite_proto::admin_client::AdminClient;
use mailsuite_proto::*;
use tokio::io::{AsyncBufReadExt, BufReader};

async fn greeted(e: &Env) -> Tcp {
    let mut c = connect(e.smtp.smtp.unwrap()).await;
    c.expect("EHLO client.example", 250).await;
    c
}

fn no_verify(c: &mut mailsuite_smtp_ingress::Config) {
    c.policy.verify_inbound = false;
}

#[tokio::test(flavor = "multi_thread")]
async fn line_length_limit() {
    let e = env_with(|c| {
        no_verify(c);
        c.limits.max_line_length = 100;
    })
    .await;
    let mut c = greeted(&e).await;
    let long = format!("NOOP {}", "x".repeat(5000));
    let t = c.expect(&long, 500).await;
    assert!(t.starts_with("5.5.2"), "{t}");
    c.expect("NOOP", 250).await;
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn message_size_limit_in_size_and_during_data() {
    let e = env_with(|c| {
        no_verify(c);
        c.limits.max_message_bytes = 1000;
    })
    .await;
    let mut c = greeted(&e).await;
    let t = c
        .expect("MAIL FROM:<a@remote.example> SIZE=1001", 552)
        .await;
    assert!(t.starts_with("5.3.4"));
    // SIZE lies: enforced while reading; memory stays bounded and the session stays in sync.
    c.expect("MAIL FROM:<a@remote.example> SIZE=10", 250).await;
    c.expect("RCPT TO:<alice@local.test>", 250).await;
    c.expect("DATA", 354).await;
    let big = format!("Subject: big\r\n\r\n{}\r\n.\r\n", "y".repeat(200_000));
    c.send(&big).await;
    let (code, t) = c.reply().await;
    assert_eq!(code, 552, "{t}");
    // And with BDAT.
    c.expect("MAIL FROM:<a@remote.example>", 250).await;
    c.expect("RCPT TO:<alice@local.test>", 250).await;
    c.send(&format!("BDAT 2000 LAST\r\n{}", "z".repeat(2000)))
        .await;
    assert_eq!(c.reply().await.0, 552);
    c.expect("NOOP", 250).await;
    assert!(e.inbox(e.alice_id).await.is_empty());
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn recipients_per_message_limit() {
    let e = env_with(|c| {
        no_verify(c);
        c.limits.max_recipients = 2;
    })
    .await;
    let mut c = greeted(&e).await;
    c.expect("MAIL FROM:<a@remote.example>", 250).await;
    c.expect("RCPT TO:<alice@local.test>", 250).await;
    c.expect("RCPT TO:<bob@local.test>", 250).await;
    let t = c.expect("RCPT TO:<alice+x@local.test>", 452).await;
    assert!(t.starts_with("4.5.3"), "{t}");
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_per_session_limit() {
    let e = env_with(|c| {
        no_verify(c);
        c.limits.max_messages_per_session = 1;
    })
    .await;
    let mut c = greeted(&e).await;
    c.expect("MAIL FROM:<a@remote.example>", 250).await;
    c.expect("RCPT TO:<alice@local.test>", 250).await;
    c.expect("DATA", 354).await;
    c.send("Subject: one\r\n\r\n.\r\n").await;
    assert_eq!(c.reply().await.0, 250);
    c.expect("MAIL FROM:<a@remote.example>", 421).await;
    assert_eq!(c.reply().await.0, 0, "closed");
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn connection_limits_overall_and_per_ip() {
    let e = env_with(|c| {
        no_verify(c);
        c.limits.connections.max_per_ip = 2;
    })
    .await;
    let _a = greeted(&e).await;
    let b = greeted(&e).await;
    let s = tokio::net::TcpStream::connect(e.smtp.smtp.unwrap())
        .await
        .unwrap();
    let mut c = Client {
        io: BufReader::new(s),
    };
    let (code, t) = c.reply().await;
    assert_eq!(code, 421, "{t}");
    // A closed connection frees its slot.
    drop(b);
    mailsuite_testkit::eventually(Duration::from_secs(10), "slot freed", || async {
        let s = tokio::net::TcpStream::connect(e.smtp.smtp.unwrap())
            .await
            .ok()?;
        let mut c = Client {
            io: BufReader::new(s),
        };
        (c.reply().await.0 == 220).then_some(())
    })
    .await;
    e.stop().await;

    let e = env_with(|c| {
        no_verify(c);
        c.limits.connections.max_connections = 1;
        c.limits.connections.max_per_ip = 0;
    })
    .await;
    let _a = greeted(&e).await;
    let s = tokio::net::TcpStream::connect(e.smtp.smtp.unwrap())
        .await
        .unwrap();
    let mut c = Client {
        io: BufReader::new(s),
    };
    assert_eq!(c.reply().await.0, 421);
    e.stop().await;
}

/// On the implicit-TLS port a refused connection is closed without a byte: a plaintext 421
/// there is garbage to the client's TLS stack.
#[tokio::test(flavor = "multi_thread")]
async fn refusal_on_implicit_tls_port_sends_no_plaintext() {
    use tokio::io::AsyncReadExt;
    let e = env_with(|c| {
        no_verify(c);
        c.limits.connections.max_per_ip = 1;
    })
    .await;
    let addr = e.smtp.submissions.unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = e.tls_connector().connect(name, tcp).await.unwrap();
    let mut first = Client {
        io: BufReader::new(tls),
    };
    assert_eq!(first.reply().await.0, 220, "the first connection is served");
    let mut over = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), over.read_to_end(&mut got))
        .await
        .expect("the refused connection is closed")
        .unwrap();
    assert!(got.is_empty(), "no plaintext on 465: {got:?}");
    // The plaintext MX port still explains itself with a 421.
    let _mx = greeted(&e).await;
    let s = tokio::net::TcpStream::connect(e.smtp.smtp.unwrap())
        .await
        .unwrap();
    let mut c = Client {
        io: BufReader::new(s),
    };
    assert_eq!(c.reply().await.0, 421);
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn messages_per_ip_per_minute() {
    let e = env_with(|c| {
        no_verify(c);
        c.limits.max_messages_per_ip_per_minute = 2;
    })
    .await;
    let mut c = greeted(&e).await;
    for _ in 0..2 {
        c.expect("MAIL FROM:<a@remote.example>", 250).await;
        c.expect("RSET", 250).await;
    }
    // Across connections of the same address too.
    let mut c = greeted(&e).await;
    let t = c.expect("MAIL FROM:<a@remote.example>", 450).await;
    assert!(t.starts_with("4.7.1"), "{t}");
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn auth_failures_are_delayed_then_cut_off() {
    let e = env_with(|c| {
        no_verify(c);
        c.auth.allow_plaintext_loopback = true;
        c.limits.max_auth_failures_per_ip = 3;
        c.limits.auth_failure_delay_ms = 200;
    })
    .await;
    let mut c = connect(e.smtp.submission.unwrap()).await;
    let ehlo = c.expect("EHLO client.example", 250).await;
    assert!(
        ehlo.contains("AUTH PLAIN LOGIN"),
        "allowed on loopback: {ehlo}"
    );
    let wrong = "AUTH PLAIN AGFsaWNlQGxvY2FsLnRlc3QAd3Jvbmc=";
    let mut took = Vec::new();
    for _ in 0..3 {
        let t0 = Instant::now();
        c.expect(wrong, 535).await;
        took.push(t0.elapsed());
    }
    assert!(took[0] >= Duration::from_millis(200), "{took:?}");
    assert!(
        took[2] >= Duration::from_millis(600),
        "the delay grows: {took:?}"
    );
    c.expect(wrong, 421).await;
    // The IP stays blocked for the minute, even with the right password.
    let mut c = connect(e.smtp.submission.unwrap()).await;
    c.expect("EHLO client.example", 250).await;
    c.expect(
        "AUTH PLAIN AGFsaWNlQGxvY2FsLnRlc3QAY29ycmVjdCBob3JzZQ==",
        421,
    )
    .await;
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn protocol_errors_per_session() {
    let e = env_with(|c| {
        no_verify(c);
        c.limits.max_errors = 3;
    })
    .await;
    let mut c = greeted(&e).await;
    c.expect("RCPT TO:<alice@local.test>", 503).await;
    c.expect("BOGUS", 500).await;
    c.expect("MAIL FROM:nobracket", 501).await;
    let t = c.expect("DATA", 421).await;
    assert!(t.starts_with("4.7.0"), "{t}");
    assert_eq!(c.reply().await.0, 0);
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn command_and_data_timeouts() {
    let e = env_with(|c| {
        no_verify(c);
        c.limits.command_timeout_secs = 1;
        c.limits.data_timeout_secs = 1;
    })
    .await;
    // Idle at the command prompt.
    let mut c = greeted(&e).await;
    let (code, t) = c.reply().await;
    assert_eq!(code, 421, "{t}");
    assert!(t.starts_with("4.4.2"), "{t}");
    // Silent in the middle of DATA.
    let mut c = greeted(&e).await;
    c.expect("MAIL FROM:<a@remote.example>", 250).await;
    c.expect("RCPT TO:<alice@local.test>", 250).await;
    c.expect("DATA", 354).await;
    c.send("Subject: partial\r\n").await;
    assert_eq!(c.reply().await.0, 421);
    assert!(e.inbox(e.alice_id).await.is_empty());
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn trickling_client_hits_the_data_total_timeout() {
    let e = env_with(|c| {
        no_verify(c);
        c.limits.data_timeout_secs = 5;
        c.limits.data_total_timeout_secs = 1;
    })
    .await;
    let mut c = greeted(&e).await;
    c.expect("MAIL FROM:<a@remote.example>", 250).await;
    c.expect("RCPT TO:<alice@local.test>", 250).await;
    c.expect("DATA", 354).await;
    let t0 = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    // One byte per tick: each read comes well within the per-block timeout.
    let code = loop {
        ticker.tick().await;
        c.send("x").await;
        // fill_buf is cancel-safe: a partly received reply stays buffered.
        if let Ok(Ok(buf)) = tokio::time::timeout(Duration::from_millis(1), c.io.fill_buf()).await {
            if buf.is_empty() {
                break 0;
            }
            break c.reply().await.0;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "never cut off");
    };
    assert_eq!(code, 421);
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn forwarding_alias_moved_account_and_quota() {
    let e = env_with(no_verify).await;
    let mut admin = AdminClient::new(channel(e.store.grpc).await);
    admin
        .add_alias(AddAliasRequest {
            address: "fwd@local.test".into(),
            targets: vec!["carol@remote.example".into()],
            kind: AliasKind::Alias as i32,
        })
        .await
        .unwrap();
    admin
        .update_account(UpdateAccountRequest {
            address: "bob@local.test".into(),
            moved_to: Some("bob@new.example".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    admin
        .set_quota(SetQuotaRequest {
            address: "alice@local.test".into(),
            quota_bytes: 0,
            quota_messages: 1,
        })
        .await
        .unwrap();
    let mut c = greeted(&e).await;
    c.expect("MAIL FROM:<a@remote.example>", 250).await;
    let t = c.expect("RCPT TO:<fwd@local.test>", 251).await;
    assert!(t.contains("carol@remote.example"), "{t}");
    let t = c.expect("RCPT TO:<bob@local.test>", 551).await;
    assert!(t.contains("bob@new.example"), "{t}");
    c.expect("DATA", 354).await;
    c.send("Subject: fwd\r\n\r\n.\r\n").await;
    assert_eq!(c.reply().await.0, 250);
    // The forward makes it a relayed message: one hand-off, to the queue.
    assert_eq!(e.queue.enqueued.lock().unwrap().len(), 1);

    // One message fills Alice's quota; the next is refused at RCPT.
    c.expect("MAIL FROM:<a@remote.example>", 250).await;
    c.expect("RCPT TO:<alice@local.test>", 250).await;
    c.expect("DATA", 354).await;
    c.send("Subject: q\r\n\r\n.\r\n").await;
    assert_eq!(c.reply().await.0, 250);
    c.expect("MAIL FROM:<a@remote.example>", 250).await;
    let t = c.expect("RCPT TO:<alice@local.test>", 452).await;
    assert!(t.starts_with("4.2.2"), "{t}");
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn session_lifetime_bounds_a_chatty_client() {
    let e = env_with(|c| {
        no_verify(c);
        c.limits.session_timeout_secs = 1;
    })
    .await;
    let mut c = greeted(&e).await;
    let t0 = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(100));
    // Every NOOP is answered, but the connection as a whole has a deadline.
    let (code, text) = loop {
        ticker.tick().await;
        let r = c.cmd("NOOP").await;
        if r.0 != 250 {
            break r;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "never cut off");
    };
    assert_eq!(code, 421, "{text}");
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hung_queue_is_a_temporary_failure_not_a_hang() {
    // A "queue" that accepts connections and never answers.
    let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hole_addr = hole.local_addr().unwrap();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hole.accept().await {
            held.push(s);
        }
    });
    let e = env_with(|c| {
        no_verify(c);
        c.auth.allow_plaintext_loopback = true;
        c.queue_url = format!("http://{hole_addr}");
        c.limits.store_timeout_secs = 1;
    })
    .await;
    let mut c = connect(e.smtp.submission.unwrap()).await;
    c.expect("EHLO client.example", 250).await;
    c.expect(
        "AUTH PLAIN AGFsaWNlQGxvY2FsLnRlc3QAY29ycmVjdCBob3JzZQ==",
        235,
    )
    .await;
    c.expect("MAIL FROM:<alice@local.test>", 250).await;
    c.expect("RCPT TO:<x@remote.example>", 250).await;
    c.expect("DATA", 354).await;
    c.send("Subject: stuck\r\n\r\n.\r\n").await;
    let (code, text) = c.reply().await;
    assert_eq!(code, 451, "{text}");
    assert!(text.starts_with("4.3.0"), "{text}");
    c.expect("NOOP", 250).await;
    holder.abort();
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_never_reads_is_dropped_after_the_write_timeout() {
    let e = env_with(|c| {
        no_verify(c);
        c.limits.write_timeout_secs = 1;
    })
    .await;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    // A small receive window so the replies back up quickly; the server's own send buffer
    // still has to fill, which takes a few MiB of pipelined NOOPs.
    sock.set_recv_buffer_size(4096).unwrap();
    let mut s = sock.connect(e.smtp.smtp.unwrap()).await.unwrap();
    let batch = "NOOP\r\n".repeat(10_000).into_bytes();
    let mut sent = 0usize;
    let ended = tokio::time::timeout(Duration::from_secs(60), async {
        use tokio::io::AsyncWriteExt;
        loop {
            if let Err(err) = s.write_all(&batch).await {
                return err;
            }
            sent += batch.len();
        }
    })
    .await;
    // Without a write timeout the server blocks on its write forever, stops reading, and
    // this client's writes block too: the 60 s bound above fails the test.
    let err = ended.expect("the server must drop a client that never reads");
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        ),
        "{err:?} after {sent} bytes"
    );
    // Other clients are unaffected.
    let mut c = greeted(&e).await;
    c.expect("NOOP", 250).await;
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn auth_is_refused_on_the_mx_port() {
    let e = env_with(|c| {
        no_verify(c);
        // Would allow plaintext AUTH from loopback on submission; the MX still refuses it.
        c.auth.allow_plaintext_loopback = true;
    })
    .await;
    let mut c = connect(e.smtp.smtp.unwrap()).await;
    let ehlo = c.expect("EHLO client.example", 250).await;
    assert!(!ehlo.contains("AUTH"), "{ehlo}");
    let t = c
        .expect(
            "AUTH PLAIN AGFsaWNlQGxvY2FsLnRlc3QAY29ycmVjdCBob3JzZQ==",
            503,
        )
        .await;
    assert!(t.starts_with("5.5.1"), "{t}");
    c.expect("MAIL FROM:<a@remote.example>", 250).await;
    let t = c.expect("RCPT TO:<someone@elsewhere.example>", 554).await;
    assert!(t.starts_with("5.7.1"), "{t}");
    e.stop().await;
}
