//! End-to-end harness: a real mailbox-store on a fresh database, the gateway on port 0 with
//! CA-signed test certificates, and a minimal raw IMAP client that returns the exact bytes
//! the server sent (tests assert on the wire format, not on our own parser).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use mailsuite_imap_gateway::{Config, Started};
use mailsuite_proto::admin_client::AdminClient;
use mailsuite_proto::delivery_client::DeliveryClient;
use mailsuite_proto::*;
use mailsuite_runtime::Shutdown;
use mailsuite_testkit::{TestCerts, TestDb};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tonic::transport::Channel;

pub const PASSWORD: &str = "secret password";

pub struct Env {
    pub db: TestDb,
    pub store_addr: SocketAddr,
    /// The store's ops listener (`/metrics`).
    pub store_ops: SocketAddr,
    pub store_shutdown: Shutdown,
    pub gw: Started,
    pub gw_shutdown: Shutdown,
    pub certs: TestCerts,
}

pub async fn env() -> Env {
    env_with(|_| {}).await
}

pub async fn env_with(tweak: impl FnOnce(&mut Config)) -> Env {
    let db = TestDb::new().await;
    let store_shutdown = Shutdown::new();
    let sc = mailsuite_mailbox_store::Config {
        listen_grpc: "127.0.0.1:0".into(),
        listen_ops: "127.0.0.1:0".into(),
        database_url: db.url.clone(),
        db_max_connections: 20,
        ..Default::default()
    };
    let store = mailsuite_mailbox_store::start(sc, store_shutdown.clone())
        .await
        .expect("store starts");
    let certs = TestCerts::new();
    let mut c = Config {
        listen_imap: "127.0.0.1:0".into(),
        listen_imaps: "127.0.0.1:0".into(),
        listen_ops: String::new(),
        store_url: format!("http://{}", store.grpc),
        hostname: "mail.test".into(),
        tls: certs.tls_config(),
        ..Config::default()
    };
    c.limits.auth_failure_delay_ms = 10;
    tweak(&mut c);
    let gw_shutdown = Shutdown::new();
    let gw = mailsuite_imap_gateway::start(c, gw_shutdown.clone())
        .await
        .expect("gateway starts");
    Env {
        db,
        store_addr: store.grpc,
        store_ops: store.ops.expect("store ops listener"),
        store_shutdown,
        gw,
        gw_shutdown,
        certs,
    }
}

impl Env {
    async fn channel(&self) -> Channel {
        tonic::transport::Endpoint::from_shared(format!("http://{}", self.store_addr))
            .unwrap()
            .connect()
            .await
            .expect("connect to store")
    }

    pub async fn account(&self, address: &str) -> i64 {
        self.account_with_quota(address, 0, 0).await
    }

    pub async fn account_with_quota(&self, address: &str, bytes: i64, messages: i64) -> i64 {
        let mut admin = AdminClient::new(self.channel().await);
        let domain = address.rsplit_once('@').unwrap().1;
        let _ = admin
            .add_domain(AddDomainRequest {
                name: domain.into(),
                catch_all: String::new(),
            })
            .await;
        admin
            .add_account(AddAccountRequest {
                address: address.into(),
                password: PASSWORD.into(),
                display_name: String::new(),
                quota_bytes: bytes,
                quota_messages: messages,
            })
            .await
            .expect("add account")
            .into_inner()
            .id
    }

    pub async fn deliver(&self, to: &str, data: &[u8]) {
        let mut d = DeliveryClient::new(self.channel().await);
        let header = DeliverHeader {
            idempotency_key: format!("k-{}", uuid_like()),
            return_path: "sender@remote.test".into(),
            recipients: vec![to.into()],
            ..Default::default()
        };
        let mut v = vec![DeliverChunk {
            part: Some(deliver_chunk::Part::Header(header)),
        }];
        for c in data.chunks(64 * 1024) {
            v.push(DeliverChunk {
                part: Some(deliver_chunk::Part::Data(c.to_vec().into())),
            });
        }
        let r = d
            .deliver(tokio_stream::iter(v))
            .await
            .expect("deliver")
            .into_inner();
        assert_eq!(
            r.results[0].status,
            RecipientStatus::Delivered as i32,
            "{r:?}"
        );
    }

    /// Wait until the gateway's Watch stream has registered the account, so that changes
    /// from now on are pushed to its sessions.
    pub async fn until_watched(&self, address: &str) {
        let m = mailsuite_proto::mailbox_client::MailboxClient::new(self.channel().await);
        mailsuite_testkit::eventually(TIMEOUT, "account watched", || {
            let mut m = m.clone();
            async move {
                m.alert(AlertRequest {
                    address: address.into(),
                    text: String::new(),
                    probe_only: true,
                })
                .await
                .expect("alert probe")
                .into_inner()
                .online
                .then_some(())
            }
        })
        .await;
    }

    pub async fn alert(&self, address: &str, text: &str) -> bool {
        let mut m = mailsuite_proto::mailbox_client::MailboxClient::new(self.channel().await);
        m.alert(AlertRequest {
            address: address.into(),
            text: text.into(),
            probe_only: false,
        })
        .await
        .expect("alert")
        .into_inner()
        .online
    }

    pub fn imap(&self) -> SocketAddr {
        self.gw.imap.unwrap()
    }

    pub fn imaps(&self) -> SocketAddr {
        self.gw.imaps.unwrap()
    }

    /// Plain connection, greeting consumed.
    pub async fn plain(&self) -> Client {
        let s = TcpStream::connect(self.imap()).await.unwrap();
        let mut c = Client::new(Box::new(s));
        let g = c.line().await;
        assert!(g.starts_with("* OK"), "{g}");
        c
    }

    /// Implicit TLS connection, greeting consumed.
    pub async fn tls(&self) -> Client {
        let s = TcpStream::connect(self.imaps()).await.unwrap();
        let connector = tokio_rustls::TlsConnector::from(self.certs.client_config());
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let s = connector.connect(name, s).await.expect("tls handshake");
        let mut c = Client::new(Box::new(s));
        let g = c.line().await;
        assert!(g.starts_with("* OK"), "{g}");
        c
    }

    /// Implicit TLS, logged in.
    pub async fn login(&self, user: &str) -> Client {
        let mut c = self.tls().await;
        let r = c.cmd(&format!("LOGIN {user} \"{PASSWORD}\"")).await;
        assert!(tagged(&r).contains(" OK "), "{r}");
        c
    }

    pub async fn stop(self) {
        assert!(self.gw_shutdown.drain(Duration::from_secs(5)).await);
        self.store_shutdown.drain(Duration::from_secs(5)).await;
    }
}

fn uuid_like() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

pub struct Client {
    pub s: BufReader<Box<dyn Io>>,
    n: u32,
}

pub const TIMEOUT: Duration = Duration::from_secs(10);

impl Client {
    pub fn new(s: Box<dyn Io>) -> Client {
        Client {
            s: BufReader::new(s),
            n: 0,
        }
    }

    pub fn into_inner(self) -> Box<dyn Io> {
        self.s.into_inner()
    }

    pub async fn send(&mut self, raw: &[u8]) {
        self.s.get_mut().write_all(raw).await.unwrap();
        self.s.get_mut().flush().await.unwrap();
    }

    /// One line including CRLF, with any literal it announces appended.
    pub async fn line(&mut self) -> String {
        String::from_utf8_lossy(&self.line_bytes().await).into_owned()
    }

    pub async fn line_bytes(&mut self) -> Vec<u8> {
        tokio::time::timeout(TIMEOUT, self.read_response())
            .await
            .expect("server answered in time")
    }

    async fn read_response(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let start = out.len();
            let n = self.s.read_until(b'\n', &mut out).await.unwrap();
            assert!(
                n > 0,
                "connection closed; got so far: {}",
                String::from_utf8_lossy(&out)
            );
            let line = &out[start..];
            // A literal announced at the end of the line: read it and keep going.
            if line.ends_with(b"}\r\n")
                && let Some(open) = line.iter().rposition(|b| *b == b'{')
            {
                let digits = &line[open + 1..line.len() - 3];
                if let Ok(len) = std::str::from_utf8(digits).unwrap_or("x").parse::<usize>() {
                    let mut lit = vec![0u8; len];
                    self.s.read_exact(&mut lit).await.unwrap();
                    out.extend_from_slice(&lit);
                    continue;
                }
            }
            return out;
        }
    }

    pub fn next_tag(&mut self) -> String {
        self.n += 1;
        format!("t{}", self.n)
    }

    /// Run a command; returns every response up to and including the tagged one.
    pub async fn cmd(&mut self, text: &str) -> String {
        String::from_utf8_lossy(&self.cmd_bytes(text.as_bytes()).await).into_owned()
    }

    pub async fn cmd_bytes(&mut self, text: &[u8]) -> Vec<u8> {
        let tag = self.next_tag();
        let mut line = format!("{tag} ").into_bytes();
        line.extend_from_slice(text);
        line.extend_from_slice(b"\r\n");
        self.send(&line).await;
        self.until_tag(&tag).await
    }

    pub async fn until_tag(&mut self, tag: &str) -> Vec<u8> {
        let mut all = Vec::new();
        loop {
            let l = self.line_bytes().await;
            let done = l.starts_with(format!("{tag} ").as_bytes());
            all.extend(l);
            if done {
                return all;
            }
        }
    }

    /// Upgrade with STARTTLS (the server's OK already read by the caller).
    pub async fn upgrade(self, certs: &TestCerts) -> Client {
        let inner = self.s.into_inner();
        let connector = tokio_rustls::TlsConnector::from(certs.client_config());
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let s = connector.connect(name, inner).await.expect("tls handshake");
        Client::new(Box::new(s))
    }
}

/// The tagged status line of a response block.
pub fn tagged(resp: &str) -> &str {
    resp.trim_end().rsplit("\r\n").next().unwrap_or("")
}

pub fn client_config(certs: &TestCerts) -> Arc<rustls::ClientConfig> {
    certs.client_config()
}

/// Completed calls of `method` on the store's Mailbox service so far, from the store's ops
/// `/metrics` page (`mailsuite_grpc_server_duration_seconds_count`, summed over status codes).
/// The registry is per process: a test counting calls must be alone in its binary.
pub async fn store_calls(ops: SocketAddr, method: &str) -> u64 {
    let page = mailsuite_testkit::http_get(ops, "/metrics").await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    let label = format!("rpc_method=\"{method}\"");
    page.lines()
        .filter(|l| l.starts_with("mailsuite_grpc_server_duration_seconds_count{"))
        .filter(|l| l.contains(&label) && l.contains("rpc_service=\"mailsuite.v1.Mailbox\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

/// Completed calls of `method` on any store gRPC `service` (e.g. `mailsuite.v1.Directory`),
/// from the store's ops `/metrics` page; same caveat as `store_calls`.
pub async fn service_calls(ops: SocketAddr, service: &str, method: &str) -> u64 {
    let page = mailsuite_testkit::http_get(ops, "/metrics").await;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    let method = format!("rpc_method=\"{method}\"");
    let service = format!("rpc_service=\"{service}\"");
    page.lines()
        .filter(|l| l.starts_with("mailsuite_grpc_server_duration_seconds_count{"))
        .filter(|l| l.contains(&method) && l.contains(&service))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}
