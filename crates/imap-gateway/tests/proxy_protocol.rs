//! PROXY protocol (issue 16) on imap-gateway: behind a trusted balancer the per-address
//! login-failure limit and the per-IP connection limit count the client the header names,
//! not the balancer; implicit TLS starts after the header; a trusted peer without a header
//! gets no greeting; an untrusted peer is a direct client.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use mailsuite_imap_gateway::Config;
use mailsuite_runtime::proxy_protocol::ProxyProtocolConfig;
use mailsuite_testkit::proxy::{assert_closed_silently, connect_from, proxied_connect};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

fn behind_balancer(c: &mut Config) {
    c.proxy_protocol = ProxyProtocolConfig {
        trusted: vec!["127.0.0.1".parse().unwrap()],
        listeners: vec!["imap".into(), "imaps".into()],
        header_timeout_secs: 5,
    };
}

/// IMAP over implicit TLS through the balancer for the client `src`, greeting read.
async fn imaps_as(e: &Env, src: &str) -> Client {
    let tcp = proxied_connect(e.imaps(), src).await;
    let connector = tokio_rustls::TlsConnector::from(e.certs.client_config());
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.expect("tls handshake");
    let mut c = Client::new(Box::new(tls));
    let g = c.line().await;
    assert!(g.starts_with("* OK"), "{g}");
    c
}

/// Plain IMAP through the balancer for `src`: the first line the server sends.
async fn imap_as(addr: SocketAddr, src: &str) -> (Client, String) {
    let mut c = Client::new(Box::new(proxied_connect(addr, src).await));
    let g = c.line().await;
    (c, g)
}

#[tokio::test(flavor = "multi_thread")]
async fn login_failures_lock_out_the_proxied_client_not_everyone_behind_the_balancer() {
    let e = env_with(|c| {
        behind_balancer(c);
        c.limits.max_auth_failures_per_ip = 2;
    })
    .await;
    e.account("alice@example.test").await;
    let mut a = imaps_as(&e, "203.0.113.10:4000").await;
    for _ in 0..2 {
        let r = a.cmd("LOGIN alice@example.test \"wrong\"").await;
        assert!(tagged(&r).contains(" NO "), "{r}");
    }
    // Client A is locked out, the right password included, on any connection...
    let mut a2 = imaps_as(&e, "203.0.113.10:4001").await;
    let r = a2
        .cmd(&format!("LOGIN alice@example.test \"{PASSWORD}\""))
        .await;
    assert!(tagged(&r).contains("NO [UNAVAILABLE]"), "{r}");
    // ...while client B, through the same balancer (same TCP peer), logs in.
    let mut b = imaps_as(&e, "203.0.113.20:4000").await;
    let r = b
        .cmd(&format!("LOGIN alice@example.test \"{PASSWORD}\""))
        .await;
    assert!(tagged(&r).contains(" OK "), "{r}");
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn per_ip_connection_limit_counts_proxied_clients_not_the_balancer() {
    let e = env_with(|c| {
        behind_balancer(c);
        c.limits.connections.max_per_ip = 1;
    })
    .await;
    let (a1, g) = imap_as(e.imap(), "203.0.113.1:1000").await;
    assert!(g.starts_with("* OK"), "{g}");
    let (_b, g) = imap_as(e.imap(), "203.0.113.2:1000").await;
    assert!(
        g.starts_with("* OK"),
        "another client has its own allowance: {g}"
    );
    let (_a2, g) = imap_as(e.imap(), "203.0.113.1:1001").await;
    assert_eq!(g, "* BYE [UNAVAILABLE] Too many connections\r\n");
    drop(a1);
    mailsuite_testkit::eventually(Duration::from_secs(10), "A's slot freed", || async {
        let (_c, g) = imap_as(e.imap(), "203.0.113.1:1002").await;
        g.starts_with("* OK").then_some(())
    })
    .await;
    e.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn trusted_peer_needs_the_header_and_untrusted_peers_are_direct() {
    let e = env_with(behind_balancer).await;
    for addr in [e.imap(), e.imaps()] {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"a1 CAPABILITY\r\n").await.unwrap();
        assert_closed_silently(s, Duration::from_secs(10)).await;
    }
    let s = connect_from("127.0.0.2".parse().unwrap(), e.imap()).await;
    let mut c = Client::new(Box::new(s));
    let g = c.line().await;
    assert!(g.starts_with("* OK"), "greeted at once: {g}");
    let r = c.cmd("CAPABILITY").await;
    assert!(tagged(&r).contains(" OK "), "{r}");
    e.stop().await;
}
