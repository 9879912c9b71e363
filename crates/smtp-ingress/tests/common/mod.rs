//! End-to-end harness: a real mailbox-store on a fresh database, an in-test Queue server that
//! records what it is given (relay-queue is a separate service), and smtp-ingress on port 0
//! with CA-signed test certificates. Plus a raw SMTP client for pipelined conversations.
#![allow(dead_code)]

pub mod budget;
pub mod dns;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mailsuite_proto::admin_client::AdminClient;
use mailsuite_proto::mailbox_client::MailboxClient;
use mailsuite_proto::queue_server::{Queue, QueueServer};
use mailsuite_proto::*;
use mailsuite_runtime::Shutdown;
use mailsuite_smtp_ingress::{Config, Started, Verifier};
use mailsuite_testkit::{TestCerts, TestDb};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

pub const PASSWORD: &str = "correct horse";

pub type Enqueued = Vec<(EnqueueHeader, Vec<u8>)>;

#[derive(Default, Clone)]
pub struct Recorded {
    pub enqueued: Arc<Mutex<Enqueued>>,
    pub flushed: Arc<Mutex<Vec<String>>>,
    /// Enqueue answers Unavailable while set.
    pub down: Arc<Mutex<bool>>,
}

#[tonic::async_trait]
impl Queue for Recorded {
    async fn enqueue(
        &self,
        req: Request<Streaming<EnqueueChunk>>,
    ) -> Result<Response<EnqueueResponse>, Status> {
        if *self.down.lock().unwrap() {
            return Err(Status::unavailable("queue down"));
        }
        let mut s = req.into_inner();
        let mut header = None;
        let mut body = Vec::new();
        while let Some(c) = s.message().await? {
            match c.part {
                Some(enqueue_chunk::Part::Header(h)) => header = Some(h),
                Some(enqueue_chunk::Part::Data(d)) => body.extend_from_slice(&d),
                None => {}
            }
        }
        let h = header.ok_or_else(|| Status::invalid_argument("no header"))?;
        let id = h.idempotency_key.clone();
        self.enqueued.lock().unwrap().push((h, body));
        Ok(Response::new(EnqueueResponse {
            queue_id: id,
            duplicate: false,
        }))
    }
    async fn get_message(
        &self,
        _: Request<GetMessageRequest>,
    ) -> Result<Response<QueuedMessage>, Status> {
        Err(Status::not_found("recorder"))
    }
    async fn list_messages(
        &self,
        _: Request<ListMessagesRequest>,
    ) -> Result<Response<ListMessagesResponse>, Status> {
        Ok(Response::new(ListMessagesResponse::default()))
    }
    async fn retry(&self, _: Request<RetryRequest>) -> Result<Response<RetryResponse>, Status> {
        Ok(Response::new(RetryResponse::default()))
    }
    async fn delete(&self, _: Request<DeleteRequest>) -> Result<Response<DeleteResponse>, Status> {
        Ok(Response::new(DeleteResponse::default()))
    }
    async fn flush(&self, req: Request<FlushRequest>) -> Result<Response<FlushResponse>, Status> {
        let d = req.into_inner().domain;
        self.flushed.lock().unwrap().push(d);
        Ok(Response::new(FlushResponse { recipients: 2 }))
    }
}

pub struct Env {
    pub db: TestDb,
    pub store: mailsuite_mailbox_store::Started,
    pub smtp: Started,
    pub shutdown: Shutdown,
    pub store_shutdown: Shutdown,
    pub certs: TestCerts,
    pub queue: Recorded,
    pub alice_id: i64,
    pub bob_id: i64,
}

/// DNS records every test environment serves (the verifier never asks real DNS for them).
pub const RECORDS: &[(&str, &str)] = &[
    ("remote.example", "v=spf1 ip4:127.0.0.0/8 -all"),
    ("_dmarc.remote.example", "v=DMARC1; p=none; psd=n"),
    ("evil.example", "v=spf1 ip4:192.0.2.1 -all"),
    ("_dmarc.evil.example", "v=DMARC1; p=reject; psd=n"),
];

pub async fn env() -> Env {
    env_with(|_| {}).await
}

/// The reverse name of the test client (127.0.0.1) in the default test DNS.
pub const CLIENT_PTR: &str = "client.remote.example";

/// The default test DNS: `CLIENT_PTR` has an A record of 127.0.0.1, so iprev of the test
/// client passes; every other question gets NXDOMAIN.
pub fn test_dns() -> dns::TestDns {
    dns::TestDns::new().addr(CLIENT_PTR, std::net::IpAddr::from([127, 0, 0, 1]))
}

pub async fn env_with(tweak: impl FnOnce(&mut Config)) -> Env {
    env_dns(tweak, test_dns(), CLIENT_PTR).await
}

/// `env_with` answering DNS questions from `dns`, with `loopback_ptr` pinned as the PTR of
/// 127.0.0.1 (hickory answers `localhost` for 127/8 itself, RFC 6761, so a test name server
/// is never asked for it); its A/AAAA records come from `dns`.
pub async fn env_dns(
    tweak: impl FnOnce(&mut Config),
    dns: dns::TestDns,
    loopback_ptr: &str,
) -> Env {
    let dns = dns.start().await;
    let db = TestDb::new().await;
    let store_shutdown = Shutdown::new();
    let sc = mailsuite_mailbox_store::Config {
        listen_grpc: "127.0.0.1:0".into(),
        listen_ops: String::new(),
        database_url: db.url.clone(),
        db_max_connections: 10,
        ..Default::default()
    };
    let store = mailsuite_mailbox_store::start(sc, store_shutdown.clone())
        .await
        .expect("store starts");

    let queue = Recorded::default();
    let ql = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let qaddr = ql.local_addr().unwrap();
    let qsvc = QueueServer::new(queue.clone());
    let qsd = store_shutdown.clone();
    store_shutdown.spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(qsvc)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(ql),
                async move { qsd.stopping().await },
            )
            .await;
    });

    let mut admin = AdminClient::new(channel(store.grpc).await);
    admin
        .add_domain(AddDomainRequest {
            name: "local.test".into(),
            catch_all: String::new(),
        })
        .await
        .unwrap();
    let mut add = async |address: &str, name: &str| {
        admin
            .add_account(AddAccountRequest {
                address: address.into(),
                password: PASSWORD.into(),
                display_name: name.into(),
                quota_bytes: 0,
                quota_messages: 0,
            })
            .await
            .expect("add account")
            .into_inner()
            .id
    };
    let alice_id = add("alice@local.test", "Alice Liddell").await;
    let bob_id = add("bob@local.test", "Bob").await;

    let certs = TestCerts::new();
    let mut config = Config {
        listen_smtp: "127.0.0.1:0".into(),
        listen_submission: "127.0.0.1:0".into(),
        listen_submissions: "127.0.0.1:0".into(),
        listen_ops: String::new(),
        hostname: "mx.local.test".into(),
        store_url: format!("http://{}", store.grpc),
        queue_url: format!("http://{qaddr}"),
        tls: certs.tls_config(),
        ..Config::default()
    };
    // Only the in-test name server is asked: no test depends on the machine's resolver.
    config.dns.nameservers = vec![dns.nameserver()];
    config.dns.timeout_secs = 1;
    tweak(&mut config);
    let verifier = if config.policy.verify_inbound {
        Some(
            Verifier::new(&config.dns, &config.hostname)
                .unwrap()
                .with_records(RECORDS.iter().copied())
                .unwrap()
                .with_ptr([127, 0, 0, 1].into(), &[loopback_ptr]),
        )
    } else {
        None
    };
    let backend = mailsuite_smtp_ingress::GrpcBackend::new(
        &config.store_url,
        &config.queue_url,
        "",
        Duration::from_secs(config.limits.store_timeout_secs),
    )
    .unwrap();
    let shutdown = Shutdown::new();
    let smtp = mailsuite_smtp_ingress::start_with(config, backend, verifier, shutdown.clone())
        .await
        .expect("smtp starts");
    Env {
        db,
        store,
        smtp,
        shutdown,
        store_shutdown,
        certs,
        queue,
        alice_id,
        bob_id,
    }
}

pub async fn channel(addr: SocketAddr) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect")
}

impl Env {
    pub async fn mailbox(&self) -> MailboxClient<Channel> {
        MailboxClient::new(channel(self.store.grpc).await).max_decoding_message_size(64 << 20)
    }

    /// Every message in the account's INBOX, raw.
    pub async fn inbox(&self, account_id: i64) -> Vec<Vec<u8>> {
        let mut mb = self.mailbox().await;
        let sel = mb
            .select(SelectRequest {
                account_id,
                name: "INBOX".into(),
                read_only: true,
            })
            .await
            .expect("select")
            .into_inner();
        let id = sel.mailbox.unwrap().id;
        let mut out = Vec::new();
        for uid in sel.uids {
            let mut s = mb
                .fetch_body(FetchBodyRequest {
                    account_id,
                    mailbox_id: id,
                    uids: Some(UidSet::from_uids([uid])),
                    sections: vec![Section::default()],
                })
                .await
                .expect("fetch body")
                .into_inner();
            let mut body = Vec::new();
            while let Some(c) = s.message().await.expect("chunk") {
                body.extend_from_slice(&c.data);
            }
            out.push(body);
        }
        out
    }

    pub async fn inbox_text(&self, account_id: i64) -> Vec<String> {
        self.inbox(account_id)
            .await
            .into_iter()
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .collect()
    }

    pub async fn stop(self) {
        self.shutdown.drain(Duration::from_secs(5)).await;
        self.store_shutdown.drain(Duration::from_secs(5)).await;
    }

    pub fn tls_connector(&self) -> tokio_rustls::TlsConnector {
        tokio_rustls::TlsConnector::from(self.certs.client_config())
    }
}

/// A raw SMTP client: write bytes, read whole replies.
pub struct Client<S> {
    pub io: BufReader<S>,
}

pub type Tcp = Client<TcpStream>;

pub async fn connect(addr: SocketAddr) -> Tcp {
    let s = TcpStream::connect(addr).await.expect("connect");
    let mut c = Client {
        io: BufReader::new(s),
    };
    let (code, _) = c.reply().await;
    assert_eq!(code, 220);
    c
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    pub async fn send(&mut self, data: &str) {
        self.send_bytes(data.as_bytes()).await;
    }

    pub async fn send_bytes(&mut self, data: &[u8]) {
        self.io.get_mut().write_all(data).await.expect("write");
        self.io.get_mut().flush().await.expect("flush");
    }

    /// One reply: its code and all its lines (code and separator removed). (0, "") at EOF.
    pub async fn reply(&mut self) -> (u16, String) {
        let mut text = String::new();
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(Duration::from_secs(20), self.io.read_line(&mut line))
                .await
                .expect("reply within 20 s")
                .unwrap_or(0);
            if n == 0 {
                return (0, text);
            }
            assert!(
                line.ends_with("\r\n"),
                "reply line ends with CRLF: {line:?}"
            );
            let code: u16 = line[..3].parse().expect("reply code");
            text.push_str(line[4..].trim_end());
            if line.as_bytes()[3] == b' ' {
                return (code, text);
            }
            text.push('\n');
        }
    }

    /// Send a command and return its reply.
    pub async fn cmd(&mut self, line: &str) -> (u16, String) {
        self.send(&format!("{line}\r\n")).await;
        self.reply().await
    }

    pub async fn expect(&mut self, line: &str, code: u16) -> String {
        let (c, t) = self.cmd(line).await;
        assert_eq!(c, code, "{line} → {c} {t}");
        t
    }
}

/// Run a Python script from tests/py with the given arguments; returns stdout.
pub fn python(script: &str, args: &[String]) -> String {
    let path = format!("{}/tests/py/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new("python3")
        .arg(&path)
        .args(args)
        .output()
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{script} {args:?} failed:\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}
