//! smtp-ingress end to end: real sockets, real TLS, a real mailbox-store on PostgreSQL, and
//! Python's smtplib as an independent client.

mod common;

use std::time::Duration;

use common::*;
use mailsuite_proto::*;
use tokio::io::BufReader;

fn args(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn mx_delivery_with_trace_and_authentication_results() {
    let e = env().await;
    let port = e.smtp.smtp.unwrap().port().to_string();
    let out = python(
        "smtp_client.py",
        &args(&[
            "--port",
            &port,
            "--sender",
            "someone@remote.example",
            "--to",
            "alice@local.test",
            "--subject",
            "inbound",
        ]),
    );
    let v = json(&out);
    assert_eq!(v["ok"], true, "{out}");
    for ext in [
        "pipelining",
        "size",
        "8bitmime",
        "smtputf8",
        "enhancedstatuscodes",
        "chunking",
        "dsn",
        "starttls",
    ] {
        assert!(
            v["esmtp"].as_array().unwrap().iter().any(|x| x == ext),
            "{ext}: {out}"
        );
    }
    let inbox = e.inbox_text(e.alice_id).await;
    assert_eq!(inbox.len(), 1);
    let m = &inbox[0];
    assert!(m.contains("Return-Path: <someone@remote.example>"), "{m}");
    // The reverse name iprev confirmed is in the TCP-info part (RFC 5321 §4.4).
    assert!(m.contains("Received: from client.remote.example (client.remote.example [127.0.0.1])\r\n\tby mx.local.test (mailsuite) with ESMTP id "), "{m}");
    assert!(
        m.contains("iprev=pass policy.iprev=127.0.0.1 (client.remote.example)"),
        "{m}"
    );
    assert!(m.contains("for <alice@local.test>;"), "{m}");
    assert!(m.contains("Authentication-Results: mx.local.test;"), "{m}");
    assert!(m.contains("spf=pass"), "{m}");
    assert!(m.contains("dmarc=pass"), "{m}");
    assert!(
        m.contains("\r\n.leading dot line\r\n"),
        "dot-unstuffed once: {m}"
    );
    e.stop().await;
}

/// 127.0.0.1's PTR (pinned) names a host whose A record (in DNS) is elsewhere: iprev fails.
const LIAR: &str = "liar.remote.example";
fn liar_dns() -> dns::TestDns {
    dns::TestDns::new().addr(LIAR, [192, 0, 2, 99].into())
}

fn mx_send(e: &Env) -> serde_json::Value {
    let port = e.smtp.smtp.unwrap().port().to_string();
    json(&python(
        "smtp_client.py",
        &args(&[
            "--port",
            &port,
            "--sender",
            "someone@remote.example",
            "--to",
            "alice@local.test",
        ]),
    ))
}

#[tokio::test(flavor = "multi_thread")]
async fn iprev_failure_is_only_recorded_by_default() {
    let e = env_dns(|_| {}, liar_dns(), LIAR).await;
    let v = mx_send(&e);
    assert_eq!(v["ok"], true, "{v}");
    let inbox = e.inbox_text(e.alice_id).await;
    assert_eq!(inbox.len(), 1);
    let m = &inbox[0];
    assert!(m.contains("iprev=fail"), "{m}");
    assert!(m.contains("policy.iprev=127.0.0.1"), "{m}");
    assert!(!m.contains("liar.remote.example"), "{m}");
    // No verified name: the TCP-info part is the address alone.
    assert!(
        m.contains("Received: from client.remote.example ([127.0.0.1])\r\n"),
        "{m}"
    );
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn iprev_tempfail_policy_answers_450_at_mail() {
    let e = env_dns(
        |c| c.policy.iprev = mailsuite_smtp_ingress::config::IprevPolicy::Tempfail,
        liar_dns(),
        LIAR,
    )
    .await;
    let v = mx_send(&e);
    assert_eq!(
        (v["ok"].clone(), v["code"].clone()),
        (false.into(), 450.into()),
        "{v}"
    );
    assert!(v["text"].as_str().unwrap().starts_with("4.7.25"), "{v}");

    // Cached for the session: a second MAIL gets the same answer; RCPT has no transaction.
    let mut c = connect(e.smtp.smtp.unwrap()).await;
    c.expect("EHLO client.remote.example", 250).await;
    let t = c.expect("MAIL FROM:<someone@remote.example>", 450).await;
    assert!(t.starts_with("4.7.25"), "{t}");
    c.expect("RCPT TO:<alice@local.test>", 503).await;
    c.expect("MAIL FROM:<someone@remote.example>", 450).await;
    c.expect("QUIT", 221).await;
    assert!(e.inbox(e.alice_id).await.is_empty());
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn iprev_reject_policy_answers_550_but_never_to_submission() {
    use mailsuite_smtp_ingress::config::IprevPolicy;
    // The PTR names a host that does not exist (NXDOMAIN for its A): permerror, refused.
    let e = env_dns(
        |c| c.policy.iprev = IprevPolicy::Reject,
        dns::TestDns::new(),
        "ghost.remote.example",
    )
    .await;
    let v = mx_send(&e);
    assert_eq!(
        (v["ok"].clone(), v["code"].clone()),
        (false.into(), 550.into()),
        "{v}"
    );
    assert!(v["text"].as_str().unwrap().starts_with("5.7.25"), "{v}");
    assert!(e.inbox(e.alice_id).await.is_empty());

    // The same client authenticated on submission is not subject to it.
    let ca = e.certs.ca_pem.display().to_string();
    let sub = e.smtp.submission.unwrap().port().to_string();
    let out = python(
        "smtp_client.py",
        &args(&[
            "--port",
            &sub,
            "--mode",
            "starttls",
            "--ca",
            &ca,
            "--user",
            "alice@local.test",
            "--password",
            PASSWORD,
            "--sender",
            "alice@local.test",
            "--to",
            "bob@local.test",
        ]),
    );
    assert_eq!(json(&out)["ok"], true, "{out}");
    let inbox = e.inbox_text(e.bob_id).await;
    assert_eq!(inbox.len(), 1);
    assert!(!inbox[0].contains("iprev="), "{}", inbox[0]);
    e.stop().await;

    // A name server that fails (SERVFAIL for the forward lookup) is a temperror:
    // `450 4.7.25` even under `reject`.
    let dns = dns::TestDns::new()
        .otherwise(mail_auth::hickory_resolver::proto::op::ResponseCode::ServFail);
    let e = env_dns(|c| c.policy.iprev = IprevPolicy::Reject, dns, CLIENT_PTR).await;
    let v = mx_send(&e);
    assert_eq!(
        (v["ok"].clone(), v["code"].clone()),
        (false.into(), 450.into()),
        "{v}"
    );
    assert!(v["text"].as_str().unwrap().starts_with("4.7.25"), "{v}");
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn submission_starttls_auth_plain_and_login_and_implicit_tls() {
    let e = env().await;
    let ca = e.certs.ca_pem.display().to_string();
    for (mode, port, mech) in [
        ("starttls", e.smtp.submission.unwrap().port(), "PLAIN"),
        ("starttls", e.smtp.submission.unwrap().port(), "LOGIN"),
        ("ssl", e.smtp.submissions.unwrap().port(), "PLAIN"),
    ] {
        let out = python(
            "smtp_client.py",
            &args(&[
                "--port",
                &port.to_string(),
                "--mode",
                mode,
                "--ca",
                &ca,
                "--user",
                "alice@local.test",
                "--password",
                PASSWORD,
                "--mech",
                mech,
                "--sender",
                "alice@local.test",
                "--to",
                "bob@local.test",
                "--to",
                "friend@remote.example",
                "--subject",
                mode,
            ]),
        );
        assert_eq!(json(&out)["ok"], true, "{mode} {mech}: {out}");
    }
    // Each had a remote recipient: one hand-off each, to the queue, with the local one too.
    let q = e.queue.enqueued.lock().unwrap().clone();
    assert_eq!(q.len(), 3);
    for (h, body) in &q {
        let rcpts: Vec<&str> = h.recipients.iter().map(|r| r.address.as_str()).collect();
        assert_eq!(rcpts, ["bob@local.test", "friend@remote.example"]);
        assert_eq!(h.submitter, "alice@local.test");
        let text = String::from_utf8_lossy(body);
        assert!(text.contains("with ESMTPSA id"), "{text}");
        assert!(text.contains("(version=TLSv1.3 cipher=TLS13_"), "{text}");
        assert!(
            text.contains("auth=pass smtp.auth=alice@local.test"),
            "{text}"
        );
    }
    assert!(
        e.inbox(e.bob_id).await.is_empty(),
        "the queue owns it, not Deliver"
    );
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn open_relay_and_spoofing_are_refused() {
    let e = env().await;
    let port = e.smtp.smtp.unwrap().port().to_string();
    let out = python(
        "smtp_client.py",
        &args(&[
            "--port",
            &port,
            "--sender",
            "a@remote.example",
            "--to",
            "victim@elsewhere.example",
        ]),
    );
    let v = json(&out);
    assert_eq!(
        (v["ok"].clone(), v["code"].clone()),
        (false.into(), 554.into()),
        "{out}"
    );
    assert!(v["text"].as_str().unwrap().starts_with("5.7.1"));

    // Unknown local user: refused at RCPT, never bounced later.
    let out = python(
        "smtp_client.py",
        &args(&[
            "--port",
            &port,
            "--sender",
            "a@remote.example",
            "--to",
            "nobody@local.test",
        ]),
    );
    assert_eq!(json(&out)["code"], 550, "{out}");

    // Pretending to be a local user without AUTH on the MX.
    let out = python(
        "smtp_client.py",
        &args(&[
            "--port",
            &port,
            "--sender",
            "alice@local.test",
            "--to",
            "bob@local.test",
        ]),
    );
    assert_eq!(json(&out)["code"], 553, "{out}");

    // Authenticated, but as someone else's address.
    let ca = e.certs.ca_pem.display().to_string();
    let sub = e.smtp.submission.unwrap().port().to_string();
    let out = python(
        "smtp_client.py",
        &args(&[
            "--port",
            &sub,
            "--mode",
            "starttls",
            "--ca",
            &ca,
            "--user",
            "alice@local.test",
            "--password",
            PASSWORD,
            "--sender",
            "bob@local.test",
            "--to",
            "x@remote.example",
        ]),
    );
    let v = json(&out);
    assert_eq!(v["code"], 553, "{out}");
    assert!(v["text"].as_str().unwrap().starts_with("5.7.1"));

    // Submission without AUTH, and AUTH before STARTTLS.
    let mut c = connect(e.smtp.submission.unwrap()).await;
    let ehlo = c.expect("EHLO c.example", 250).await;
    assert!(
        !ehlo.contains("AUTH"),
        "AUTH not offered before TLS: {ehlo}"
    );
    c.expect(
        "AUTH PLAIN AGFsaWNlQGxvY2FsLnRlc3QAY29ycmVjdCBob3JzZQ==",
        538,
    )
    .await;
    c.expect("MAIL FROM:<alice@local.test>", 530).await;
    assert!(e.queue.enqueued.lock().unwrap().is_empty());
    assert!(e.inbox(e.bob_id).await.is_empty());
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pipelined_conversation_in_one_write() {
    let e = env_with(|c| c.policy.verify_inbound = false).await;
    let mut c = connect(e.smtp.smtp.unwrap()).await;
    c.expect("EHLO client.example", 250).await;
    c.send(concat!(
        "MAIL FROM:<p@remote.example>\r\n",
        "RCPT TO:<alice@local.test>\r\n",
        "RCPT TO:<nobody@local.test>\r\n",
        "RCPT TO:<Bob@local.test>\r\n",
        "DATA\r\n",
    ))
    .await;
    let codes = [
        c.reply().await.0,
        c.reply().await.0,
        c.reply().await.0,
        c.reply().await.0,
        c.reply().await.0,
    ];
    assert_eq!(codes, [250, 250, 550, 250, 354]);
    c.send("Subject: pipelined\r\n\r\nbody\r\n.\r\nNOOP\r\nQUIT\r\n")
        .await;
    let (code, text) = c.reply().await;
    assert_eq!(code, 250, "{text}");
    assert!(text.starts_with("2.0.0 OK queued as "));
    assert_eq!(c.reply().await.0, 250);
    assert_eq!(c.reply().await.0, 221);
    assert_eq!(e.inbox(e.alice_id).await.len(), 1);
    assert_eq!(e.inbox(e.bob_id).await.len(), 1);
    // One registry per process, shared by parallel tests: at least ours is counted.
    let accepted = mailsuite_runtime::metrics::value(
        "mailsuite_smtp_messages_received_total",
        &[("result", "accepted")],
    );
    assert!(accepted >= 1.0, "{accepted}");
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn starttls_discards_pipelined_plaintext() {
    let e = env_with(|c| c.policy.verify_inbound = false).await;
    let mut c = connect(e.smtp.smtp.unwrap()).await;
    c.expect("EHLO client.example", 250).await;
    // CVE-2011-0411: a command injected after STARTTLS in the same packet.
    c.send("STARTTLS\r\nMAIL FROM:<injected@remote.example>\r\n")
        .await;
    assert_eq!(c.reply().await.0, 220);
    let tcp = c.io.into_inner();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = e
        .tls_connector()
        .connect(name, tcp)
        .await
        .expect("handshake");
    let mut c = Client {
        io: BufReader::new(tls),
    };
    let ehlo = c.expect("EHLO client.example", 250).await;
    assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
    // Had the injected MAIL run, this would be accepted.
    c.expect("RCPT TO:<alice@local.test>", 503).await;
    c.expect("MAIL FROM:<p@remote.example>", 250).await;
    c.expect("RCPT TO:<alice@local.test>", 250).await;
    c.expect("DATA", 354).await;
    c.send("Subject: tls\r\n\r\nx\r\n.\r\n").await;
    assert_eq!(c.reply().await.0, 250);
    let m = &e.inbox_text(e.alice_id).await[0];
    assert!(m.contains("with ESMTPS id"), "{m}");
    assert!(m.contains("version=TLSv1.3"), "{m}");
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn smtp_smuggling_is_refused() {
    let e = env_with(|c| c.policy.verify_inbound = false).await;
    let mut c = connect(e.smtp.smtp.unwrap()).await;
    c.expect("EHLO client.example", 250).await;
    c.expect("MAIL FROM:<p@remote.example>", 250).await;
    c.expect("RCPT TO:<alice@local.test>", 250).await;
    c.expect("DATA", 354).await;
    c.send(concat!(
        "Subject: outer\r\n\r\nhello\r\n",
        "\n.\n",
        "MAIL FROM:<admin@local.test>\r\nRCPT TO:<bob@local.test>\r\nDATA\r\n",
        "Subject: smuggled\r\n\r\nevil\r\n.\r\n",
    ))
    .await;
    let (code, text) = c.reply().await;
    assert_eq!(code, 550, "{text}");
    assert!(text.starts_with("5.6.0"), "{text}");
    // The session is still in sync: the smuggled commands were never commands.
    c.expect("NOOP", 250).await;
    assert!(e.inbox(e.alice_id).await.is_empty());
    assert!(e.inbox(e.bob_id).await.is_empty());
    e.stop().await;

    // Normalising instead: stored with CRLF, still only one message.
    let e = env_with(|c| {
        c.policy.verify_inbound = false;
        c.policy.bare_line_end = mailsuite_smtp_ingress::codec::BareLineEnd::Normalize;
    })
    .await;
    let mut c = connect(e.smtp.smtp.unwrap()).await;
    c.expect("EHLO client.example", 250).await;
    c.expect("MAIL FROM:<p@remote.example>", 250).await;
    c.expect("RCPT TO:<alice@local.test>", 250).await;
    c.expect("DATA", 354).await;
    c.send("Subject: outer\r\n\r\nhello\n.\nRCPT TO:<bob@local.test>\r\n.\r\n")
        .await;
    assert_eq!(c.reply().await.0, 250);
    let m = &e.inbox_text(e.alice_id).await[0];
    assert!(
        m.contains("hello\r\n.\r\nRCPT TO:<bob@local.test>\r\n"),
        "{m}"
    );
    assert!(e.inbox(e.bob_id).await.is_empty());
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bdat_chunks_with_binary_content() {
    let e = env_with(|c| c.policy.verify_inbound = false).await;
    let mut c = connect(e.smtp.smtp.unwrap()).await;
    c.expect("EHLO client.example", 250).await;
    c.expect("MAIL FROM:<p@remote.example> BODY=BINARYMIME", 250)
        .await;
    c.expect("RCPT TO:<alice@local.test>", 250).await;
    let part1 = b"Subject: bdat\r\nContent-Type: application/octet-stream\r\n\r\n";
    let part2 = b"\x00\x01.\r\n.\r\nnot the end\r\n";
    c.send_bytes(format!("BDAT {}\r\n", part1.len()).as_bytes())
        .await;
    c.send_bytes(part1).await;
    assert_eq!(c.reply().await.0, 250);
    let mut last = format!("BDAT {} LAST\r\n", part2.len()).into_bytes();
    last.extend_from_slice(part2);
    last.extend_from_slice(b"NOOP\r\n");
    c.send_bytes(&last).await;
    let (code, text) = c.reply().await;
    assert_eq!(code, 250, "{text}");
    assert_eq!(
        c.reply().await.0,
        250,
        "NOOP after the chunk is a command again"
    );
    let m = &e.inbox(e.alice_id).await[0];
    assert!(m.ends_with(part2), "{:?}", String::from_utf8_lossy(m));
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dsn_parameters_reach_the_queue() {
    let e = env().await;
    let tcp = tokio::net::TcpStream::connect(e.smtp.submissions.unwrap())
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = e
        .tls_connector()
        .connect(name, tcp)
        .await
        .expect("implicit TLS");
    let mut c = Client {
        io: BufReader::new(tls),
    };
    assert_eq!(c.reply().await.0, 220);
    let ehlo = c.expect("EHLO client.example", 250).await;
    assert!(ehlo.contains("AUTH PLAIN LOGIN"), "{ehlo}");
    c.expect(
        "AUTH PLAIN AGFsaWNlQGxvY2FsLnRlc3QAY29ycmVjdCBob3JzZQ==",
        235,
    )
    .await;
    c.expect(
        "MAIL FROM:<alice@local.test> RET=FULL ENVID=env+2Bid SMTPUTF8 BODY=8BITMIME",
        250,
    )
    .await;
    c.expect(
        "RCPT TO:<x@remote.example> NOTIFY=FAILURE,DELAY ORCPT=rfc822;x@remote.example",
        250,
    )
    .await;
    c.expect("RCPT TO:<bob@local.test> NOTIFY=NEVER", 250).await;
    c.expect("DATA", 354).await;
    c.send("Subject: dsn\r\n\r\nx\r\n.\r\n").await;
    assert_eq!(c.reply().await.0, 250);
    let q = e.queue.enqueued.lock().unwrap().clone();
    let (h, _) = &q[0];
    assert_eq!(h.envid, "env+id");
    assert_eq!(h.ret, DsnRet::Full as i32);
    assert!(h.smtputf8 && h.body_8bit);
    assert_eq!(h.recipients[0].notify, ["FAILURE", "DELAY"]);
    assert_eq!(h.recipients[0].orcpt, "rfc822;x@remote.example");
    assert_eq!(h.recipients[1].notify, ["NEVER"]);
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn queue_unavailable_gives_451_and_no_250() {
    let e = env().await;
    *e.queue.down.lock().unwrap() = true;
    let ca = e.certs.ca_pem.display().to_string();
    let sub = e.smtp.submission.unwrap().port().to_string();
    let out = python(
        "smtp_client.py",
        &args(&[
            "--port",
            &sub,
            "--mode",
            "starttls",
            "--ca",
            &ca,
            "--user",
            "alice@local.test",
            "--password",
            PASSWORD,
            "--sender",
            "alice@local.test",
            "--to",
            "x@remote.example",
        ]),
    );
    let v = json(&out);
    assert_eq!(v["code"], 451, "{out}");
    assert!(v["text"].as_str().unwrap().starts_with("4.3.0"));
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn send_soml_saml_through_the_store() {
    let e = env().await;
    let tcp = tokio::net::TcpStream::connect(e.smtp.submissions.unwrap())
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = e.tls_connector().connect(name, tcp).await.unwrap();
    let mut c = Client {
        io: BufReader::new(tls),
    };
    assert_eq!(c.reply().await.0, 220);
    c.expect("EHLO client.example", 250).await;
    c.expect(
        "AUTH PLAIN AGFsaWNlQGxvY2FsLnRlc3QAY29ycmVjdCBob3JzZQ==",
        235,
    )
    .await;

    // Bob has no open session: SEND is refused, SOML mails, SAML mails.
    c.expect("SEND FROM:<alice@local.test>", 250).await;
    let text = c.expect("RCPT TO:<bob@local.test>", 450).await;
    assert!(text.starts_with("4.2.1"), "{text}");
    c.expect("DATA", 503).await;
    c.expect("RSET", 250).await;
    assert!(e.inbox(e.bob_id).await.is_empty());
    for verb in ["SOML", "SAML"] {
        c.expect(&format!("{verb} FROM:<alice@local.test>"), 250)
            .await;
        c.expect("RCPT TO:<bob@local.test>", 250).await;
        c.expect("DATA", 354).await;
        c.send(&format!("Subject: {verb}\r\n\r\nx\r\n.\r\n")).await;
        assert_eq!(c.reply().await.0, 250, "{verb}");
    }
    assert_eq!(e.inbox(e.bob_id).await.len(), 2);

    // Bob opens a session (a gateway watching his account): SEND displays, SOML only
    // displays, SAML displays and mails.
    let mut mb = e.mailbox().await;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(WatchControl {
        add_accounts: vec![e.bob_id],
        remove_accounts: vec![],
    })
    .await
    .unwrap();
    let mut events = mb
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let bob_id = e.bob_id;
    let store = e.store.grpc;
    mailsuite_testkit::eventually(Duration::from_secs(10), "bob online", || async move {
        let _ = bob_id;
        let mut mb = mailsuite_proto::mailbox_client::MailboxClient::new(channel(store).await);
        let r = mb
            .alert(AlertRequest {
                address: "bob@local.test".into(),
                text: "probe".into(),
                probe_only: true,
            })
            .await
            .ok()?;
        r.into_inner().online.then_some(())
    })
    .await;
    let mut alerts = Vec::new();
    for verb in ["SEND", "SOML", "SAML"] {
        c.expect(&format!("{verb} FROM:<alice@local.test>"), 250)
            .await;
        c.expect("RCPT TO:<bob@local.test>", 250).await;
        c.expect("DATA", 354).await;
        c.send(&format!("Subject: hello {verb}\r\n\r\nx\r\n.\r\n"))
            .await;
        let (code, text) = c.reply().await;
        assert_eq!(code, 250, "{verb}: {text}");
        let ev = loop {
            let ev = tokio::time::timeout(Duration::from_secs(10), events.message())
                .await
                .expect("alert event")
                .unwrap()
                .unwrap();
            // Presence probes publish nothing, so every alert here comes from a message.
            if ev.kind == ChangeKind::Alert as i32 {
                break ev;
            }
        };
        alerts.push(ev.text);
    }
    assert_eq!(
        alerts,
        [
            "Message from alice@local.test: hello SEND",
            "Message from alice@local.test: hello SOML",
            "Message from alice@local.test: hello SAML",
        ]
    );
    // Only SAML added mail while Bob was online.
    assert_eq!(e.inbox(e.bob_id).await.len(), 3);
    drop(tx);
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn vrfy_expn_etrn_turn_help() {
    let e = env().await;
    let mut c = connect(e.smtp.smtp.unwrap()).await;
    c.expect("EHLO client.example", 250).await;
    let t = c.expect("VRFY alice@local.test", 252).await;
    assert!(t.starts_with("2.1.5"));
    c.expect("EXPN staff@local.test", 550).await;
    c.expect("TURN", 502).await;
    let t = c.expect("HELP", 214).await;
    assert!(t.contains("EHLO"));
    // Unauthenticated ETRN is refused (L2; tests/security.rs has the rest).
    c.expect("ETRN remote.example", 459).await;
    assert!(e.queue.flushed.lock().unwrap().is_empty());
    c.expect("QUIT", 221).await;

    let tcp = tokio::net::TcpStream::connect(e.smtp.submissions.unwrap())
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = e.tls_connector().connect(name, tcp).await.unwrap();
    let mut c = Client {
        io: BufReader::new(tls),
    };
    c.reply().await;
    c.expect("EHLO client.example", 250).await;
    c.expect(
        "AUTH PLAIN AGFsaWNlQGxvY2FsLnRlc3QAY29ycmVjdCBob3JzZQ==",
        235,
    )
    .await;
    let t = c.expect("VRFY alice@local.test", 250).await;
    assert_eq!(t, "2.1.5 Alice Liddell <alice@local.test>");
    let t = c.expect("ETRN remote.example", 250).await;
    assert!(t.contains("remote.example"));
    assert_eq!(*e.queue.flushed.lock().unwrap(), ["remote.example"]);
    c.expect("ETRN #queue", 459).await;
    let mut admin = mailsuite_proto::admin_client::AdminClient::new(channel(e.store.grpc).await);
    admin
        .add_alias(AddAliasRequest {
            address: "staff@local.test".into(),
            targets: vec!["alice@local.test".into(), "bob@local.test".into()],
            kind: AliasKind::List as i32,
        })
        .await
        .unwrap();
    let t = c.expect("EXPN staff@local.test", 250).await;
    assert!(
        t.contains("<alice@local.test>") && t.contains("<bob@local.test>"),
        "{t}"
    );
    assert_eq!(t.lines().count(), 2, "{t}");
    c.expect("EXPN alice@local.test", 550).await;
    c.expect("VRFY nobody@local.test", 550).await;
    c.expect("VRFY alice", 553).await;
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dmarc_reject_policy() {
    let e = env().await;
    let port = e.smtp.smtp.unwrap().port().to_string();
    let out = python(
        "smtp_client.py",
        &args(&[
            "--port",
            &port,
            "--sender",
            "ceo@evil.example",
            "--to",
            "alice@local.test",
        ]),
    );
    let v = json(&out);
    assert_eq!(v["code"], 550, "{out}");
    assert!(v["text"].as_str().unwrap().starts_with("5.7.1"));
    assert!(e.inbox(e.alice_id).await.is_empty());
    e.stop().await;

    // Switched off: accepted, the failure recorded.
    let e = env_with(|c| c.policy.dmarc_reject = false).await;
    let port = e.smtp.smtp.unwrap().port().to_string();
    let out = python(
        "smtp_client.py",
        &args(&[
            "--port",
            &port,
            "--sender",
            "ceo@evil.example",
            "--to",
            "alice@local.test",
        ]),
    );
    assert_eq!(json(&out)["ok"], true, "{out}");
    let m = &e.inbox_text(e.alice_id).await[0];
    assert!(m.contains("spf=fail"), "{m}");
    assert!(m.contains("dmarc=fail"), "{m}");
    assert!(m.contains("policy.dmarc=reject"), "{m}");
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_says_421_to_idle_sessions() {
    let e = env_with(|c| {
        c.policy.verify_inbound = false;
        c.listen_submissions = String::new();
    })
    .await;
    assert!(
        e.smtp.submissions.is_none(),
        "an empty address disables the listener"
    );
    let mut c = connect(e.smtp.smtp.unwrap()).await;
    c.expect("EHLO client.example", 250).await;
    e.shutdown.trigger();
    let (code, text) = c.reply().await;
    assert_eq!(code, 421, "{text}");
    assert!(text.starts_with("4.3.2"), "{text}");
    assert_eq!(c.reply().await.0, 0, "closed");
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_lets_a_busy_transfer_finish() {
    let e = env_with(|c| c.policy.verify_inbound = false).await;
    let mut c = connect(e.smtp.smtp.unwrap()).await;
    c.expect("EHLO client.example", 250).await;
    c.expect("MAIL FROM:<p@remote.example>", 250).await;
    c.expect("RCPT TO:<alice@local.test>", 250).await;
    c.expect("DATA", 354).await;
    c.send("Subject: in flight\r\n\r\nfirst half\r\n").await;
    e.shutdown.trigger();
    c.send("second half\r\n.\r\n").await;
    let (code, text) = c.reply().await;
    assert_eq!(code, 250, "the message in flight is accepted: {text}");
    let (code, text) = c.reply().await;
    assert_eq!(code, 421, "{text}");
    assert!(text.starts_with("4.3.2"), "{text}");
    assert_eq!(e.inbox(e.alice_id).await.len(), 1);
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn auth_challenges_without_initial_response() {
    let e = env_with(|c| c.policy.verify_inbound = false).await;
    let tcp = tokio::net::TcpStream::connect(e.smtp.submissions.unwrap())
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = e.tls_connector().connect(name, tcp).await.unwrap();
    let mut c = Client {
        io: BufReader::new(tls),
    };
    assert_eq!(c.reply().await.0, 220);
    c.expect("EHLO client.example", 250).await;
    // PLAIN with an empty challenge, then a wrong password.
    assert_eq!(c.cmd("AUTH PLAIN").await, (334, String::new()));
    c.expect("AGFsaWNlQGxvY2FsLnRlc3QAd3Jvbmc=", 535).await;
    // LOGIN step by step.
    let t = c.expect("AUTH LOGIN", 334).await;
    assert_eq!(t, "VXNlcm5hbWU6");
    let t = c.expect("YWxpY2VAbG9jYWwudGVzdA==", 334).await;
    assert_eq!(t, "UGFzc3dvcmQ6");
    let t = c.expect("Y29ycmVjdCBob3JzZQ==", 235).await;
    assert!(t.starts_with("2.7.0"), "{t}");
    c.expect("MAIL FROM:<alice@local.test>", 250).await;
    e.stop().await;
}
