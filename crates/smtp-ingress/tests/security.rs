//! Regression tests for the security review of 2026-12-02 (issue 12), each named after its
//! finding and run over real sockets against a real mailbox-store.

mod common;

use common::*;
use mailsuite_proto::admin_client::AdminClient;
use mailsuite_proto::*;
use tokio::io::BufReader;

const ALICE_PLAIN: &str = "AUTH PLAIN AGFsaWNlQGxvY2FsLnRlc3QAY29ycmVjdCBob3JzZQ==";

fn args(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
}

/// alice@local.test submits over STARTTLS on 587 with smtplib, to a local and a remote
/// recipient, with the given header fields.
fn submit(e: &Env, header_from: &str, header_sender: Option<&str>) -> serde_json::Value {
    let ca = e.certs.ca_pem.display().to_string();
    let sub = e.smtp.submission.unwrap().port().to_string();
    let mut a = args(&[
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
        "--to",
        "x@remote.example",
        "--header-from",
        header_from,
    ]);
    if let Some(s) = header_sender {
        a.extend(args(&["--header-sender", s]));
    }
    json(&python("smtp_client.py", &a))
}

async fn add_alias(e: &Env, address: &str, targets: &[&str]) {
    AdminClient::new(channel(e.store.grpc).await)
        .add_alias(AddAliasRequest {
            address: address.into(),
            targets: targets.iter().map(|t| t.to_string()).collect(),
            kind: AliasKind::Alias as i32,
        })
        .await
        .expect("add alias");
}

async fn add_domain(e: &Env, name: &str) {
    AdminClient::new(channel(e.store.grpc).await)
        .add_domain(AddDomainRequest {
            name: name.into(),
            catch_all: String::new(),
        })
        .await
        .expect("add domain");
}

fn enqueued(e: &Env) -> usize {
    e.queue.enqueued.lock().unwrap().len()
}

fn assert_refused_5_7_1(v: &serde_json::Value, what: &str) {
    assert_eq!(
        (v["ok"].clone(), v["code"].clone()),
        (false.into(), 550.into()),
        "{what}: {v}"
    );
    let text = v["text"].as_str().unwrap();
    assert!(text.starts_with("5.7.1"), "{what}: {v}");
}

/// An authenticated user may not put someone else's address in the header `From:` or
/// `Sender:` (the relay signs with the From: domain's DKIM key): refused after DATA with
/// `550 5.7.1`, nothing stored or queued.
#[tokio::test(flavor = "multi_thread")]
async fn h2_header_from_and_sender_must_belong_to_the_authenticated_user() {
    let e = env_with(|c| c.policy.verify_inbound = false).await;
    add_domain(&e, "tenant-b.test").await;
    add_alias(&e, "ally@local.test", &["alice@local.test"]).await;

    for (from, sender, what) in [
        ("CEO <ceo@tenant-b.test>", None, "another tenant's address"),
        (
            "Bob <bob@local.test>",
            None,
            "another user of the same domain",
        ),
        (
            "Alice <alice@local.test>, CEO <ceo@tenant-b.test>",
            None,
            "several From addresses, one foreign",
        ),
        (
            "Alice <alice@local.test>",
            Some("Bob <bob@local.test>"),
            "a Sender of another user",
        ),
        ("someone@remote.example", None, "a remote address"),
    ] {
        let v = submit(&e, from, sender);
        assert_refused_5_7_1(&v, what);
    }
    assert_eq!(enqueued(&e), 0, "nothing queued");
    assert!(e.inbox(e.bob_id).await.is_empty(), "nothing stored");

    // Her own address (display name, case, +detail), an alias of hers, and a Sender of her own.
    for (from, sender) in [
        ("Alice <alice@local.test>", None),
        ("\"Alice L.\" <ALICE@Local.Test>", None),
        ("alice+lists@local.test", None),
        ("Ally <ally@local.test>", None),
        (
            "Alice <alice@local.test>, Ally <ally@local.test>",
            Some("alice@local.test"),
        ),
    ] {
        let v = submit(&e, from, sender);
        assert_eq!(v["ok"], true, "{from} / {sender:?}: {v}");
    }
    assert_eq!(enqueued(&e), 5);
    e.stop().await;
}

/// The same check on BDAT, on the implicit-TLS port, and the session stays usable after the
/// refusal; a message without From: goes through as before (there is nothing to sign).
#[tokio::test(flavor = "multi_thread")]
async fn h2_header_from_checked_on_bdat_and_implicit_tls() {
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
    c.expect(ALICE_PLAIN, 235).await;

    // Two From: fields, the second one foreign.
    let spoof =
        "From: alice@local.test\r\nFrom: CEO <ceo@tenant-b.test>\r\nSubject: x\r\n\r\nhi\r\n";
    c.expect("MAIL FROM:<alice@local.test>", 250).await;
    c.expect("RCPT TO:<bob@local.test>", 250).await;
    c.send(&format!("BDAT {} LAST\r\n{spoof}", spoof.len()))
        .await;
    let (code, text) = c.reply().await;
    assert_eq!(code, 550, "{text}");
    assert!(text.starts_with("5.7.1"), "{text}");

    // A From: with no address at all cannot be attributed: refused too.
    c.expect("MAIL FROM:<alice@local.test>", 250).await;
    c.expect("RCPT TO:<bob@local.test>", 250).await;
    c.expect("DATA", 354).await;
    c.send("From: undisclosed-senders:;\r\nSubject: x\r\n\r\nhi\r\n.\r\n")
        .await;
    let (code, text) = c.reply().await;
    assert_eq!(code, 550, "{text}");

    let ok = "From: Alice <alice@local.test>\r\nSubject: ok\r\n\r\nhi\r\n";
    c.expect("MAIL FROM:<alice@local.test>", 250).await;
    c.expect("RCPT TO:<bob@local.test>", 250).await;
    c.send(&format!("BDAT {} LAST\r\n{ok}", ok.len())).await;
    let (code, text) = c.reply().await;
    assert_eq!(code, 250, "{text}");

    c.expect("MAIL FROM:<alice@local.test>", 250).await;
    c.expect("RCPT TO:<bob@local.test>", 250).await;
    c.expect("DATA", 354).await;
    c.send("Subject: no from\r\n\r\nhi\r\n.\r\n").await;
    let (code, text) = c.reply().await;
    assert_eq!(code, 250, "{text}");

    let inbox = e.inbox_text(e.bob_id).await;
    assert_eq!(inbox.len(), 2, "only the two clean messages");
    assert!(inbox.iter().all(|m| !m.contains("tenant-b")), "{inbox:?}");
    e.stop().await;
}

/// A first line of white space hid the header section from the From:/Sender: check (a
/// parser of the body alone ends the headers there), yet once Received: and
/// Authentication-Results: are put in front it is a folded continuation and the From:
/// below it a real field to every receiver. On 587 after STARTTLS, by DATA and by BDAT:
/// `550 5.6.0`, nothing stored or queued, and the session goes on.
#[tokio::test(flavor = "multi_thread")]
async fn h2_leading_whitespace_line_cannot_hide_a_foreign_from() {
    let e = env_with(|c| c.policy.verify_inbound = false).await;
    add_domain(&e, "tenant-b.test").await;
    let mut c = connect(e.smtp.submission.unwrap()).await;
    c.expect("EHLO client.example", 250).await;
    c.expect("STARTTLS", 220).await;
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = e
        .tls_connector()
        .connect(name, c.io.into_inner())
        .await
        .expect("handshake");
    let mut c = Client {
        io: BufReader::new(tls),
    };
    c.expect("EHLO client.example", 250).await;
    c.expect(ALICE_PLAIN, 235).await;

    for (first, what) in [(" ", "space"), ("\t", "tab"), (" x", "space and text")] {
        let spoof = format!("{first}\r\nFrom: CEO <ceo@tenant-b.test>\r\nSubject: x\r\n\r\nhi\r\n");
        c.expect("MAIL FROM:<alice@local.test>", 250).await;
        c.expect("RCPT TO:<bob@local.test>", 250).await;
        c.expect("RCPT TO:<x@remote.example>", 250).await;
        c.expect("DATA", 354).await;
        c.send(&format!("{spoof}.\r\n")).await;
        let (code, text) = c.reply().await;
        assert_eq!(code, 550, "DATA, {what}: {text}");
        assert!(text.starts_with("5.6.0"), "DATA, {what}: {text}");

        c.expect("MAIL FROM:<alice@local.test>", 250).await;
        c.expect("RCPT TO:<bob@local.test>", 250).await;
        c.send(&format!("BDAT {} LAST\r\n{spoof}", spoof.len()))
            .await;
        let (code, text) = c.reply().await;
        assert_eq!(code, 550, "BDAT, {what}: {text}");
        assert!(text.starts_with("5.6.0"), "BDAT, {what}: {text}");
    }

    // The session is still usable, and an empty header section keeps the From: in the body.
    let ok = "\r\nFrom: CEO <ceo@tenant-b.test>\r\n\r\nhi\r\n";
    c.expect("MAIL FROM:<alice@local.test>", 250).await;
    c.expect("RCPT TO:<bob@local.test>", 250).await;
    c.send(&format!("BDAT {} LAST\r\n{ok}", ok.len())).await;
    let (code, text) = c.reply().await;
    assert_eq!(code, 250, "{text}");

    assert_eq!(enqueued(&e), 0, "nothing queued");
    let inbox = e.inbox(e.bob_id).await;
    assert_eq!(inbox.len(), 1, "only the message without a header From:");
    let parsed = mail_parser::MessageParser::new()
        .parse_headers(&inbox[0][..])
        .unwrap();
    assert!(
        parsed.from().is_none(),
        "{:?}",
        String::from_utf8_lossy(&inbox[0])
    );
    e.stop().await;
}

/// RFC 5321 §4.5.3.1.4: a command line is at most 512 octets with its CRLF. A longer one is
/// answered `500 5.5.2 Line too long` on every port and the session goes on.
#[tokio::test(flavor = "multi_thread")]
async fn command_line_over_512_octets_is_500_on_every_port() {
    let e = env_with(|c| c.policy.verify_inbound = false).await;
    // 510 octets + CRLF = 512: still a command.
    let fits = format!("NOOP {}", "x".repeat(505));
    let long = format!("NOOP {}", "x".repeat(1995));
    let check = async |c: &mut Client<_>| {
        let t = c.expect(&long, 500).await;
        assert_eq!(t, "5.5.2 Line too long");
        c.expect(&fits, 250).await;
        // A long line split over several writes is still one line.
        c.send(&format!("NOOP {}", "y".repeat(3000))).await;
        c.send(&format!("{}\r\n", "z".repeat(3000))).await;
        assert_eq!(c.reply().await.0, 500);
        c.expect("NOOP", 250).await;
    };

    let mut mx = connect(e.smtp.smtp.unwrap()).await;
    mx.expect("EHLO client.example", 250).await;
    check(&mut mx).await;
    mx.expect("MAIL FROM:<p@remote.example>", 250).await;
    // MAIL/RCPT may carry DSN parameters beyond 512 (RFC 1869 lets extensions add up to
    // 2000 octets to them): an xtext ORCPT of 500 octets is legal (RFC 3461 §4.2).
    let orcpt = format!(
        "RCPT TO:<alice@local.test> NOTIFY=FAILURE ORCPT=rfc822;a{}@local.test",
        "+2B".repeat(160)
    );
    assert!(orcpt.len() > 512);
    mx.expect(&orcpt, 250).await;
    let t = mx
        .expect(
            &format!(
                "RCPT TO:<bob@local.test> ORCPT=rfc822;{}@l.test",
                "o".repeat(3000)
            ),
            500,
        )
        .await;
    assert!(t.starts_with("5.5.2"), "{t}");
    mx.expect("DATA", 354).await;
    mx.send("Subject: after long lines\r\n\r\nx\r\n.\r\n").await;
    assert_eq!(mx.reply().await.0, 250);

    let mut sub = connect(e.smtp.submission.unwrap()).await;
    sub.expect("EHLO client.example", 250).await;
    check(&mut sub).await;

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
    let t = c.expect(&long, 500).await;
    assert_eq!(t, "5.5.2 Line too long");
    // AUTH PLAIN with long credentials (RFC 4954 §4: responses up to 12288 octets) still works:
    // a wrong but long password is a 535, not a 500.
    use base64::Engine;
    let cred = format!("\0alice@local.test\0{}", "p".repeat(3000));
    let b64 = base64::engine::general_purpose::STANDARD.encode(cred);
    let t = c.expect(&format!("AUTH PLAIN {b64}"), 535).await;
    assert!(t.starts_with("5.7.8"), "{t}");
    assert_eq!(c.cmd("AUTH PLAIN").await.0, 334);
    c.expect(&b64, 535).await;
    // Past RFC 4954's 12288 octets: 500 5.5.6, the exchange is over, the session goes on.
    assert_eq!(c.cmd("AUTH PLAIN").await.0, 334);
    let t = c.expect(&"QUFB".repeat(4000), 500).await;
    assert!(t.starts_with("5.5.6"), "{t}");
    c.expect("NOOP", 250).await;
    c.expect(ALICE_PLAIN, 235).await;
    e.stop().await;
}

/// RFC 5321 §4.5.1: `RCPT TO:<postmaster>` (no domain) must be accepted; it goes to the
/// postmaster of the hostname's domain, or to `policy.postmaster`.
#[tokio::test(flavor = "multi_thread")]
async fn l11_rcpt_to_unqualified_postmaster_is_accepted() {
    let e = env_with(|c| c.policy.verify_inbound = false).await;
    add_alias(&e, "postmaster@local.test", &["alice@local.test"]).await;
    let mut c = connect(e.smtp.smtp.unwrap()).await;
    c.expect("EHLO client.example", 250).await;
    c.expect("MAIL FROM:<p@remote.example>", 250).await;
    c.expect("RCPT TO:<>", 501).await;
    let t = c.expect("RCPT TO:<Postmaster>", 250).await;
    assert!(t.starts_with("2.1.5"), "{t}");
    c.expect("DATA", 354).await;
    c.send("Subject: to the postmaster\r\n\r\nx\r\n.\r\n").await;
    assert_eq!(c.reply().await.0, 250);
    let inbox = e.inbox_text(e.alice_id).await;
    assert_eq!(inbox.len(), 1);
    assert!(inbox[0].contains("to the postmaster"), "{}", inbox[0]);
    e.stop().await;

    // Configured explicitly.
    let e = env_with(|c| {
        c.policy.verify_inbound = false;
        c.policy.postmaster = "bob@local.test".into();
    })
    .await;
    let mut c = connect(e.smtp.smtp.unwrap()).await;
    c.expect("HELO client.example", 250).await;
    c.expect("MAIL FROM:<p@remote.example>", 250).await;
    c.expect("RCPT TO:<postmaster>", 250).await;
    c.expect("DATA", 354).await;
    c.send("Subject: pm\r\n\r\nx\r\n.\r\n").await;
    assert_eq!(c.reply().await.0, 250);
    assert_eq!(e.inbox(e.bob_id).await.len(), 1);
    e.stop().await;
}

/// RFC 1985 ETRN makes the queue retry a domain now: only authenticated sessions and
/// allow-listed clients may, at a bounded rate; others get `459` and the queue is untouched.
#[tokio::test(flavor = "multi_thread")]
async fn l2_etrn_needs_auth_or_an_allowed_client_and_is_rate_limited() {
    let e = env_with(|c| {
        c.policy.verify_inbound = false;
        c.limits.max_etrn_per_ip_per_minute = 2;
    })
    .await;
    let mut c = connect(e.smtp.smtp.unwrap()).await;
    let ehlo = c.expect("EHLO client.example", 250).await;
    assert!(!ehlo.contains("ETRN"), "not offered to this client: {ehlo}");
    for _ in 0..3 {
        let t = c.expect("ETRN remote.example", 459).await;
        assert!(t.starts_with("4.7.1"), "{t}");
    }
    assert!(
        e.queue.flushed.lock().unwrap().is_empty(),
        "queue untouched"
    );

    // Authenticated (implicit TLS submission): allowed, up to the rate.
    let tcp = tokio::net::TcpStream::connect(e.smtp.submissions.unwrap())
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = e.tls_connector().connect(name, tcp).await.unwrap();
    let mut s = Client {
        io: BufReader::new(tls),
    };
    assert_eq!(s.reply().await.0, 220);
    s.expect("EHLO client.example", 250).await;
    s.expect("ETRN remote.example", 459).await;
    s.expect(ALICE_PLAIN, 235).await;
    let ehlo = s.expect("EHLO client.example", 250).await;
    assert!(ehlo.contains("ETRN"), "{ehlo}");
    s.expect("ETRN remote.example", 250).await;
    s.expect("ETRN other.example", 250).await;
    let t = s.expect("ETRN remote.example", 458).await;
    assert!(t.starts_with("4.7.0"), "{t}");
    assert_eq!(
        *e.queue.flushed.lock().unwrap(),
        ["remote.example", "other.example"]
    );
    e.stop().await;

    // An allow-listed client network, unauthenticated on port 25.
    let e = env_with(|c| {
        c.policy.verify_inbound = false;
        c.policy.etrn_allowed_clients = vec![
            "192.0.2.0/24".parse().unwrap(),
            "127.0.0.1".parse().unwrap(),
        ];
    })
    .await;
    let mut c = connect(e.smtp.smtp.unwrap()).await;
    let ehlo = c.expect("EHLO client.example", 250).await;
    assert!(ehlo.contains("ETRN"), "{ehlo}");
    c.expect("ETRN remote.example", 250).await;
    assert_eq!(*e.queue.flushed.lock().unwrap(), ["remote.example"]);
    e.stop().await;
}
