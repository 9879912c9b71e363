//! PROXY protocol (issue 16) on pop3-gateway: behind a trusted balancer the per-address
//! login-failure limit counts the client the header names, not the balancer, so one
//! client's guessing does not lock out the others; implicit TLS starts after the header.

use std::time::Duration;

use mailsuite_proto::admin_client::AdminClient;
use mailsuite_proto::*;
use mailsuite_runtime::Shutdown;
use mailsuite_runtime::proxy_protocol::ProxyProtocolConfig;
use mailsuite_testkit::proxy::{assert_closed_silently, connect_from, proxied_connect};
use mailsuite_testkit::{TestCerts, TestDb};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const USER: &str = "alice@example.test";
const PASSWORD: &str = "correct horse battery";

struct Env {
    _db: TestDb,
    certs: TestCerts,
    pop: mailsuite_pop3_gateway::Started,
    shutdowns: Vec<Shutdown>,
}

impl Drop for Env {
    fn drop(&mut self) {
        for s in &self.shutdowns {
            s.trigger();
        }
    }
}

async fn env() -> Env {
    let db = TestDb::new().await;
    let certs = TestCerts::new();
    let store_sd = Shutdown::new();
    let store = mailsuite_mailbox_store::start(
        mailsuite_mailbox_store::Config {
            listen_grpc: "127.0.0.1:0".into(),
            listen_ops: String::new(),
            database_url: db.url.clone(),
            db_max_connections: 10,
            ..Default::default()
        },
        store_sd.clone(),
    )
    .await
    .expect("store starts");
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", store.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut admin = AdminClient::new(channel);
    admin
        .add_domain(AddDomainRequest {
            name: "example.test".into(),
            catch_all: String::new(),
        })
        .await
        .unwrap();
    admin
        .add_account(AddAccountRequest {
            address: USER.into(),
            password: PASSWORD.into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut c = mailsuite_pop3_gateway::Config {
        listen_pop3: "127.0.0.1:0".into(),
        listen_pop3s: "127.0.0.1:0".into(),
        listen_ops: String::new(),
        store_url: format!("http://{}", store.grpc),
        tls: certs.tls_config(),
        ..Default::default()
    };
    c.limits.auth_failure_delay_ms = 10;
    c.limits.auth_failure_delay_max_ms = 20;
    c.limits.max_auth_failures_per_ip = 2;
    c.proxy_protocol = ProxyProtocolConfig {
        trusted: vec!["127.0.0.1".parse().unwrap()],
        listeners: vec!["pop3".into(), "pop3s".into()],
        header_timeout_secs: 5,
    };
    let sd = Shutdown::new();
    let pop = mailsuite_pop3_gateway::start(c, sd.clone())
        .await
        .expect("pop3 starts");
    Env {
        _db: db,
        certs,
        pop,
        shutdowns: vec![sd, store_sd],
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

struct Pop(BufReader<Box<dyn Io>>);

impl Pop {
    /// One line, "" at EOF.
    async fn line(&mut self) -> String {
        let mut l = String::new();
        tokio::time::timeout(Duration::from_secs(20), self.0.read_line(&mut l))
            .await
            .expect("answer within 20 s")
            .unwrap_or(0);
        l
    }

    async fn cmd(&mut self, line: &str) -> String {
        let s = self.0.get_mut();
        s.write_all(format!("{line}\r\n").as_bytes()).await.unwrap();
        s.flush().await.unwrap();
        self.line().await
    }
}

impl Env {
    /// POP3 over implicit TLS through the balancer for the client `src`, greeting read.
    async fn pop3s_as(&self, src: &str) -> Pop {
        let tcp = proxied_connect(self.pop.pop3s.unwrap(), src).await;
        let connector = tokio_rustls::TlsConnector::from(self.certs.client_config());
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let tls = connector.connect(name, tcp).await.expect("tls handshake");
        let mut p = Pop(BufReader::new(Box::new(tls)));
        let g = p.line().await;
        assert!(g.starts_with("+OK"), "{g}");
        p
    }

    async fn login(&self, src: &str, password: &str) -> String {
        let mut p = self.pop3s_as(src).await;
        let u = p.cmd(&format!("USER {USER}")).await;
        assert!(u.starts_with("+OK"), "{u}");
        p.cmd(&format!("PASS {password}")).await
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn login_failures_lock_out_the_proxied_client_not_everyone_behind_the_balancer() {
    let e = env().await;
    // Client A guesses twice (max_auth_failures_per_ip = 2).
    for _ in 0..2 {
        let r = e.login("203.0.113.10:4000", "wrong").await;
        assert!(r.starts_with("-ERR"), "{r}");
    }
    // A is locked out now, even with the right password...
    let r = e.login("203.0.113.10:4001", PASSWORD).await;
    assert!(r.starts_with("-ERR [LOGIN-DELAY]"), "{r}");
    // ...while B, through the same balancer (same TCP peer), logs in.
    let r = e.login("203.0.113.20:4000", PASSWORD).await;
    assert!(r.starts_with("+OK"), "{r}");
}

#[tokio::test(flavor = "multi_thread")]
async fn trusted_peer_needs_the_header_and_untrusted_peers_are_direct() {
    let e = env().await;
    for addr in [e.pop.pop3.unwrap(), e.pop.pop3s.unwrap()] {
        // From the balancer without a header (POP3 straight away): closed, no greeting.
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"USER alice@example.test\r\n").await.unwrap();
        assert_closed_silently(s, Duration::from_secs(10)).await;
    }
    // From 127.0.0.2, not trusted: greeted at once, no header expected.
    let s = connect_from("127.0.0.2".parse().unwrap(), e.pop.pop3.unwrap()).await;
    let mut p = Pop(BufReader::new(Box::new(s)));
    let g = p.line().await;
    assert!(g.starts_with("+OK"), "{g}");
    let r = p.cmd("CAPA").await;
    assert!(r.starts_with("+OK"), "{r}");
}
