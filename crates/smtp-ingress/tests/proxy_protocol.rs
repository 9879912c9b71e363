//! PROXY protocol (issue 16): behind a trusted balancer the client address in the header is
//! the session's address (Received, SPF, iprev, EHLO, per-IP limits); a trusted peer without
//! a header gets nothing; an untrusted peer is an ordinary direct client; listeners not
//! listed behave as before. Real sockets, real store on a fresh database.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use mailsuite_runtime::proxy_protocol::ProxyProtocolConfig;
use mailsuite_smtp_ingress::Config;
use mailsuite_testkit::eventually;
use mailsuite_testkit::proxy::{
    assert_closed_silently, connect_from, proxied_connect, proxy_v1, proxy_v2,
};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// The balancer is this host's 127.0.0.1; MX and implicit-TLS submission expect the header,
/// STARTTLS submission does not.
fn behind_balancer(c: &mut Config) {
    c.proxy_protocol = ProxyProtocolConfig {
        trusted: vec!["127.0.0.1".parse().unwrap()],
        listeners: vec!["smtp".into(), "submissions".into()],
        header_timeout_secs: 1,
    };
}

fn client(s: TcpStream) -> Tcp {
    Client {
        io: BufReader::new(s),
    }
}

/// A proxied connection for `src`, greeting read (220 expected).
async fn proxied(addr: SocketAddr, src: &str) -> Tcp {
    let mut c = client(proxied_connect(addr, src).await);
    let (code, t) = c.reply().await;
    assert_eq!(code, 220, "{t}");
    c
}

#[tokio::test(flavor = "multi_thread")]
async fn mx_behind_balancer_uses_the_proxied_address_for_received_spf_and_iprev() {
    let e = env_with(behind_balancer).await;
    let mut c = proxied(e.smtp.smtp.unwrap(), "203.0.113.7:40000").await;
    let ehlo = c.expect("EHLO client.example", 250).await;
    assert!(
        ehlo.contains("Hello client.example [203.0.113.7]"),
        "{ehlo}"
    );
    c.expect("MAIL FROM:<someone@remote.example>", 250).await;
    c.expect("RCPT TO:<alice@local.test>", 250).await;
    c.expect("DATA", 354).await;
    c.send("Subject: via the balancer\r\n\r\nhello\r\n.\r\n")
        .await;
    assert_eq!(c.reply().await.0, 250);
    let inbox = e.inbox_text(e.alice_id).await;
    assert_eq!(inbox.len(), 1);
    let m = &inbox[0];
    // No PTR for the proxied address in the test DNS: no name in the TCP-info.
    assert!(
        m.contains("Received: from client.example ([203.0.113.7])\r\n"),
        "{m}"
    );
    // remote.example's SPF allows 127.0.0.0/8 only: from 203.0.113.7 it fails (the balancer,
    // 127.0.0.1, would have passed).
    assert!(m.contains("spf=fail"), "{m}");
    assert!(m.contains("policy.iprev=203.0.113.7"), "{m}");
    assert!(
        !m.contains("127.0.0.1"),
        "the balancer appears nowhere: {m}"
    );
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn implicit_tls_reads_the_header_before_the_handshake() {
    let e = env_with(behind_balancer).await;
    let tcp = proxied_connect(e.smtp.submissions.unwrap(), "198.51.100.9:5555").await;
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = e
        .tls_connector()
        .connect(name, tcp)
        .await
        .expect("handshake");
    let mut c = Client {
        io: BufReader::new(tls),
    };
    assert_eq!(c.reply().await.0, 220);
    let ehlo = c.expect("EHLO laptop.example", 250).await;
    assert!(ehlo.contains("[198.51.100.9]"), "{ehlo}");
    c.expect(
        "AUTH PLAIN AGFsaWNlQGxvY2FsLnRlc3QAY29ycmVjdCBob3JzZQ==",
        235,
    )
    .await;
    c.expect("MAIL FROM:<alice@local.test>", 250).await;
    c.expect("RCPT TO:<bob@local.test>", 250).await;
    c.expect("DATA", 354).await;
    c.send("From: alice@local.test\r\nSubject: s\r\n\r\nhi\r\n.\r\n")
        .await;
    assert_eq!(c.reply().await.0, 250);
    let inbox = e.inbox_text(e.bob_id).await;
    assert_eq!(inbox.len(), 1);
    assert!(
        inbox[0].contains("Received: from laptop.example ([198.51.100.9])\r\n"),
        "{}",
        inbox[0]
    );
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn per_ip_connection_limit_counts_proxied_clients_not_the_balancer() {
    let e = env_with(|c| {
        behind_balancer(c);
        c.policy.verify_inbound = false;
        c.limits.connections.max_per_ip = 1;
    })
    .await;
    let addr = e.smtp.smtp.unwrap();
    let mut a1 = proxied(addr, "203.0.113.1:1000").await;
    // Another client through the same balancer (same TCP peer) has its own allowance.
    let mut b = proxied(addr, "203.0.113.2:1000").await;
    b.expect("NOOP", 250).await;
    // The same client on a second connection shares it: over the limit.
    let mut a2 = client(proxied_connect(addr, "203.0.113.1:1001").await);
    let (code, t) = a2.reply().await;
    assert_eq!(code, 421, "{t}");
    // Its slot comes back when its connection ends.
    a1.expect("QUIT", 221).await;
    drop(a1);
    eventually(
        Duration::from_secs(10),
        "203.0.113.1's slot freed",
        || async {
            let mut c = client(proxied_connect(addr, "203.0.113.1:1002").await);
            (c.reply().await.0 == 220).then_some(())
        },
    )
    .await;
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn trusted_peer_without_a_header_is_closed_without_a_greeting() {
    let e = env_with(|c| {
        behind_balancer(c);
        c.policy.verify_inbound = false;
    })
    .await;
    // Talking SMTP straight away: not a PROXY header.
    let mut s = TcpStream::connect(e.smtp.smtp.unwrap()).await.unwrap();
    s.write_all(b"EHLO client.example\r\n").await.unwrap();
    assert_closed_silently(s, Duration::from_secs(10)).await;
    // Silence: closed once header_timeout_secs (1) is over; no greeting meanwhile.
    let s = TcpStream::connect(e.smtp.smtp.unwrap()).await.unwrap();
    assert_closed_silently(s, Duration::from_secs(10)).await;
    // The same on the implicit-TLS port: a ClientHello is not a PROXY header.
    let tcp = TcpStream::connect(e.smtp.submissions.unwrap())
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    assert!(
        e.tls_connector().connect(name, tcp).await.is_err(),
        "no TLS without the header"
    );
    // A listener not in proxy_protocol.listeners is as before: greeted at once.
    let mut c = connect(e.smtp.submission.unwrap()).await;
    let ehlo = c.expect("EHLO client.example", 250).await;
    assert!(ehlo.contains("[127.0.0.1]"), "{ehlo}");
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn untrusted_peer_is_a_direct_client_and_its_header_is_just_bad_input() {
    let e = env_with(|c| {
        behind_balancer(c);
        c.policy.verify_inbound = false;
    })
    .await;
    let addr = e.smtp.smtp.unwrap();
    // 127.0.0.2 is not in `trusted`: greeted at once, with its own address.
    let mut c = client(connect_from("127.0.0.2".parse().unwrap(), addr).await);
    assert_eq!(c.reply().await.0, 220);
    // A header from it claims nothing: it is an unknown command.
    let forged = proxy_v1("203.0.113.66:1".parse().unwrap(), addr);
    let forged = String::from_utf8(forged).unwrap();
    let (code, _) = c.cmd(forged.trim_end()).await;
    assert_eq!(
        code / 100,
        5,
        "a PROXY line from an untrusted peer is refused"
    );
    let ehlo = c.expect("EHLO client.example", 250).await;
    assert!(ehlo.contains("Hello client.example [127.0.0.2]"), "{ehlo}");
    // While the trusted balancer's clients get the header's address on the same listener.
    let mut p = proxied(addr, "192.0.2.44:7").await;
    let ehlo = p.expect("EHLO client.example", 250).await;
    assert!(ehlo.contains("[192.0.2.44]"), "{ehlo}");
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn v1_and_v2_ipv6_headers_work() {
    let e = env_with(|c| {
        behind_balancer(c);
        c.policy.verify_inbound = false;
    })
    .await;
    let addr = e.smtp.smtp.unwrap();
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&proxy_v1("192.0.2.77:40000".parse().unwrap(), addr))
        .await
        .unwrap();
    let mut c = client(s);
    assert_eq!(c.reply().await.0, 220);
    let ehlo = c.expect("EHLO client.example", 250).await;
    assert!(ehlo.contains("[192.0.2.77]"), "{ehlo}");

    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&proxy_v2(
        "[2001:db8::77]:40000".parse().unwrap(),
        "[2001:db8::1]:25".parse().unwrap(),
    ))
    .await
    .unwrap();
    let mut c = client(s);
    assert_eq!(c.reply().await.0, 220);
    let ehlo = c.expect("EHLO client.example", 250).await;
    assert!(ehlo.contains("[2001:db8::77]"), "{ehlo}");
    e.stop().await;
}
