//! Shared pieces of the relay-queue end-to-end tests: an independent SMTP sink (Python
//! aiosmtpd), a stand-in mailbox-store (Directory + Delivery over real gRPC) that records
//! what it is given, and a relay-queue on port 0.

#![allow(dead_code)]

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mailsuite_proto::delivery_server::{Delivery, DeliveryServer};
use mailsuite_proto::directory_server::{Directory, DirectoryServer};
use mailsuite_proto::queue_client::QueueClient;
use mailsuite_proto::{
    AddressKind, AuthenticateRequest, AuthenticateResponse, CheckSenderRequest,
    CheckSenderResponse, DeliverChunk, DeliverResponse, EnqueueChunk, EnqueueHeader,
    EnqueueResponse, EnvelopeRecipient, ExpandRequest, ExpandResponse, RecipientResult,
    RecipientStatus, ResolveRequest, ResolveResponse, deliver_chunk, enqueue_chunk,
};
use mailsuite_relay_queue::Config;
use mailsuite_runtime::Shutdown;
use tokio::io::{AsyncBufReadExt, BufReader};
use tonic::{Request, Response, Status, Streaming};

pub const T: Duration = Duration::from_secs(60);

pub fn py(script: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/py")
        .join(script)
}

/// A Python aiosmtpd server, killed when dropped.
pub struct Sink {
    _child: tokio::process::Child,
    pub port: u16,
    pub dir: tempfile::TempDir,
}

pub struct Received {
    pub bytes: Vec<u8>,
    pub meta: serde_json::Value,
    pub path: PathBuf,
}

impl Sink {
    pub async fn start(args: &[&str]) -> Sink {
        let dir = tempfile::tempdir().unwrap();
        let mut child = tokio::process::Command::new("python3")
            .arg(py("sink.py"))
            .arg(dir.path())
            .args(args)
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 with aiosmtpd (pip install -r .ci/requirements.txt)");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        tokio::time::timeout(T, out.read_line(&mut line))
            .await
            .expect("sink start")
            .unwrap();
        let port = line
            .trim()
            .strip_prefix("PORT ")
            .unwrap_or_else(|| panic!("sink said {line:?}"))
            .parse()
            .unwrap();
        Sink {
            _child: child,
            port,
            dir,
        }
    }

    pub fn route(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn messages(&self) -> Vec<Received> {
        let mut names: Vec<PathBuf> = std::fs::read_dir(self.dir.path())
            .unwrap()
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        names.sort();
        names
            .into_iter()
            .map(|json| {
                let eml = json.with_extension("eml");
                Received {
                    bytes: std::fs::read(&eml).unwrap(),
                    meta: serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap(),
                    path: eml,
                }
            })
            .collect()
    }

    pub async fn wait_for(&self, n: usize) -> Vec<Received> {
        mailsuite_testkit::eventually(T, &format!("{n} message(s) at the sink"), || async {
            let m = self.messages();
            (m.len() >= n).then_some(m)
        })
        .await
    }
}

#[derive(Debug, Clone)]
pub struct Stored {
    pub return_path: String,
    pub recipients: Vec<String>,
    pub bytes: Vec<u8>,
    pub key: String,
}

/// A stand-in for mailbox-store: hosts `local.test` with the given users.
#[derive(Clone, Default)]
pub struct FakeStore {
    pub users: Arc<BTreeSet<String>>,
    pub delivered: Arc<Mutex<Vec<Stored>>>,
    keys: Arc<Mutex<HashMap<String, DeliverResponse>>>,
}

pub const HOSTED: &str = "local.test";

impl FakeStore {
    pub async fn start(users: &[&str], shutdown: &Shutdown) -> (FakeStore, String) {
        let store = FakeStore {
            users: Arc::new(users.iter().map(|u| u.to_string()).collect()),
            ..Default::default()
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let s = store.clone();
        let sd = shutdown.clone();
        shutdown.spawn(async move {
            tonic::transport::Server::builder()
                .add_service(DirectoryServer::new(s.clone()))
                .add_service(DeliveryServer::new(s))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::TcpListenerStream::new(listener),
                    async move { sd.stopping().await },
                )
                .await
                .unwrap();
        });
        (store, format!("http://{addr}"))
    }

    pub fn stored(&self) -> Vec<Stored> {
        self.delivered.lock().unwrap().clone()
    }

    fn is_hosted(addr: &str) -> bool {
        addr.rsplit_once('@')
            .is_some_and(|(_, d)| d.eq_ignore_ascii_case(HOSTED))
    }
}

#[tonic::async_trait]
impl Directory for FakeStore {
    async fn resolve(
        &self,
        r: Request<ResolveRequest>,
    ) -> Result<Response<ResolveResponse>, Status> {
        let a = r.into_inner().address.to_ascii_lowercase();
        let kind = if !Self::is_hosted(&a) {
            AddressKind::Remote
        } else if self.users.contains(&a) {
            AddressKind::Account
        } else {
            AddressKind::Unknown
        };
        Ok(Response::new(ResolveResponse {
            kind: kind as i32,
            canonical: a,
            ..Default::default()
        }))
    }
    async fn authenticate(
        &self,
        _: Request<AuthenticateRequest>,
    ) -> Result<Response<AuthenticateResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn expand(&self, _: Request<ExpandRequest>) -> Result<Response<ExpandResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
    async fn check_sender(
        &self,
        _: Request<CheckSenderRequest>,
    ) -> Result<Response<CheckSenderResponse>, Status> {
        Err(Status::unimplemented("fake"))
    }
}

#[tonic::async_trait]
impl Delivery for FakeStore {
    async fn deliver(
        &self,
        r: Request<Streaming<DeliverChunk>>,
    ) -> Result<Response<DeliverResponse>, Status> {
        let mut s = r.into_inner();
        let Some(DeliverChunk {
            part: Some(deliver_chunk::Part::Header(h)),
        }) = s.message().await?
        else {
            return Err(Status::invalid_argument("header first"));
        };
        let mut bytes = Vec::new();
        while let Some(c) = s.message().await? {
            if let Some(deliver_chunk::Part::Data(d)) = c.part {
                bytes.extend_from_slice(&d);
            }
        }
        if let Some(first) = self.keys.lock().unwrap().get(&h.idempotency_key) {
            let mut again = first.clone();
            again.duplicate = true;
            return Ok(Response::new(again));
        }
        let mut results = Vec::new();
        let mut accepted = Vec::new();
        for rcpt in &h.recipients {
            let known = self.users.contains(&rcpt.to_ascii_lowercase());
            results.push(RecipientResult {
                recipient: rcpt.clone(),
                status: if known {
                    RecipientStatus::Delivered
                } else {
                    RecipientStatus::Unknown
                } as i32,
                delivered_to: if known { vec![rcpt.clone()] } else { vec![] },
                remote_targets: vec![],
            });
            if known {
                accepted.push(rcpt.clone());
            }
        }
        if !accepted.is_empty() {
            self.delivered.lock().unwrap().push(Stored {
                return_path: h.return_path.clone(),
                recipients: accepted,
                bytes: bytes.clone(),
                key: h.idempotency_key.clone(),
            });
        }
        let resp = DeliverResponse {
            results,
            size: bytes.len() as u64,
            ..Default::default()
        };
        self.keys
            .lock()
            .unwrap()
            .insert(h.idempotency_key.clone(), resp.clone());
        Ok(Response::new(resp))
    }
}

/// A configuration for tests: loopback, short timers, no store-side DKIM keys.
pub fn config(database_url: &str, store_url: &str) -> Config {
    let mut c = Config {
        listen_grpc: "127.0.0.1:0".into(),
        listen_ops: "127.0.0.1:0".into(),
        database_url: database_url.into(),
        store_url: store_url.into(),
        hostname: "mx.local.test".into(),
        migrate_on_start: false,
        dkim_from_store: false,
        ..Default::default()
    };
    c.workers.count = 2;
    c.workers.poll_interval_ms = 200;
    c.workers.lease_secs = 30;
    c.workers.metrics_interval_secs = 1;
    c.retry.schedule_secs = vec![1];
    c.timeouts.connect = 5;
    c.timeouts.greeting = 10;
    c.timeouts.ehlo = 10;
    c.timeouts.starttls = 10;
    c.timeouts.mail = 10;
    c.timeouts.rcpt = 10;
    c.timeouts.data_init = 10;
    c.timeouts.data_block = 10;
    c.timeouts.data_term = 10;
    c.timeouts.rpc = 10;
    c
}

pub async fn client(addr: SocketAddr) -> QueueClient<tonic::transport::Channel> {
    QueueClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

pub fn rcpt(a: &str) -> EnvelopeRecipient {
    EnvelopeRecipient {
        address: a.into(),
        notify: vec![],
        orcpt: String::new(),
    }
}

/// An authenticated submission by `from` (smtp-ingress sets `submitter` to the account for
/// mail submitted on 587/465; the only way to relay to remote domains). Forwarded MX mail has
/// no submitter: see `mx_header`.
pub fn header(key: &str, from: &str, to: &[&str]) -> EnqueueHeader {
    EnqueueHeader {
        idempotency_key: key.into(),
        return_path: from.into(),
        recipients: to.iter().map(|a| rcpt(a)).collect(),
        submitter: from.into(),
        ..Default::default()
    }
}

/// Mail that arrived on the MX port (unauthenticated) and is forwarded through an alias.
pub fn mx_header(key: &str, from: &str, to: &[&str]) -> EnqueueHeader {
    EnqueueHeader {
        submitter: String::new(),
        ..header(key, from, to)
    }
}

/// An ed25519 DKIM key for `domain` and the `selector=TXT` argument of dkim_verify.py.
pub fn dkim_key(
    domain: &str,
    selector: &str,
) -> (mailsuite_relay_queue::config::DkimKeyConfig, String) {
    use base64::Engine as _;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let der = mail_auth::common::crypto::Ed25519Key::generate_pkcs8().unwrap();
    let public = mail_auth::common::crypto::Ed25519Key::from_pkcs8_der(&der)
        .unwrap()
        .public_key();
    let body = b64(&der);
    let lines: Vec<&str> = body
        .as_bytes()
        .chunks(64)
        .map(|c| std::str::from_utf8(c).unwrap())
        .collect();
    (
        mailsuite_relay_queue::config::DkimKeyConfig {
            domain: domain.into(),
            selector: selector.into(),
            algorithm: "ed25519-sha256".into(),
            private_key_pem: format!(
                "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
                lines.join("\n")
            ),
            private_key_file: String::new(),
        },
        format!("{selector}=v=DKIM1; k=ed25519; p={}", b64(&public)),
    )
}

pub async fn enqueue(addr: SocketAddr, h: EnqueueHeader, body: &[u8]) -> EnqueueResponse {
    let mut chunks = vec![EnqueueChunk {
        part: Some(enqueue_chunk::Part::Header(h)),
    }];
    for c in body.chunks(1000) {
        chunks.push(EnqueueChunk {
            part: Some(enqueue_chunk::Part::Data(c.to_vec().into())),
        });
    }
    client(addr)
        .await
        .enqueue(tokio_stream::iter(chunks))
        .await
        .unwrap()
        .into_inner()
}

pub fn message(from: &str, to: &str, subject: &str, id: &str) -> Vec<u8> {
    format!(
        "From: Alice <{from}>\r\nTo: <{to}>\r\nSubject: {subject}\r\nDate: Sat, 28 Nov 2026 01:00:00 +0000\r\nMessage-ID: <{id}>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHello Bob,\r\n.a line starting with a dot\r\n\r\n-- \r\nAlice\r\n"
    )
    .into_bytes()
}

/// Run a Python script from tests/py; returns its stdout, panicking with its output on failure.
pub fn run_py(script: &str, args: &[&str]) -> String {
    let out = std::process::Command::new("python3")
        .arg(py(script))
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{script} failed: {text}");
    text
}

/// The state names of a message's recipients, from the database.
pub async fn states(pool: &sqlx::PgPool, queue_id: &str) -> Vec<(String, String, i32)> {
    sqlx::query_as(
        "SELECT address, state, attempts FROM relay.recipients WHERE message_id = $1::uuid ORDER BY id",
    )
    .bind(queue_id)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// TLS of a `Scripted` server.
#[derive(Clone)]
pub enum ScriptedTls {
    None,
    /// STARTTLS with this certificate (add "STARTTLS" to the EHLO capabilities to offer it).
    Starttls(Arc<rustls::ServerConfig>),
    /// TLS from the first byte.
    Implicit(Arc<rustls::ServerConfig>),
}

/// A scripted SMTP server in the test: answers EHLO with `ehlo` (multi-line, CRLF-joined
/// capability lines after the greeting line; `None` refuses EHLO with 502 so the client must
/// fall back to HELO), accepts everything else (AUTH, DATA, BDAT), and records each command
/// line ("<TLS>" when a TLS session starts), each message and each connection.
pub struct Scripted {
    pub port: u16,
    pub commands: Arc<Mutex<Vec<String>>>,
    pub messages: Arc<Mutex<Vec<Vec<u8>>>>,
    pub connections: Arc<std::sync::atomic::AtomicUsize>,
}

struct ScriptedState {
    ehlo: Option<Vec<String>>,
    commands: Arc<Mutex<Vec<String>>>,
    messages: Arc<Mutex<Vec<Vec<u8>>>>,
}

/// What one pass over a stream ended with.
enum Served<S> {
    Closed,
    /// The client asked for STARTTLS and got 220: continue on TLS over this stream.
    Upgrade(S),
}

impl ScriptedState {
    fn ehlo_reply(&self, tls: bool) -> String {
        let Some(caps) = &self.ehlo else {
            return "502 5.5.1 EHLO not implemented\r\n".into();
        };
        let mut lines = vec!["scripted.test".to_string()];
        lines.extend(
            caps.iter()
                .filter(|c| !(tls && c.eq_ignore_ascii_case("STARTTLS")))
                .cloned(),
        );
        let n = lines.len();
        lines
            .iter()
            .enumerate()
            .map(|(i, l)| format!("250{}{l}\r\n", if i + 1 == n { ' ' } else { '-' }))
            .collect()
    }

    async fn serve<S>(&self, s: S, tls: bool) -> Served<S>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut r = BufReader::new(s);
        let mut line = String::new();
        let mut bdat = Vec::new();
        loop {
            line.clear();
            if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                return Served::Closed;
            }
            self.commands
                .lock()
                .unwrap()
                .push(line.trim_end().to_string());
            let up = line.to_ascii_uppercase();
            let reply = if up.starts_with("EHLO") {
                self.ehlo_reply(tls)
            } else if up.starts_with("STARTTLS") && !tls {
                if r.write_all(b"220 2.0.0 go ahead\r\n").await.is_err() {
                    return Served::Closed;
                }
                return Served::Upgrade(r.into_inner());
            } else if up.starts_with("AUTH") {
                "235 2.7.0 authenticated\r\n".into()
            } else if up.starts_with("BDAT") {
                let mut words = up.split_whitespace().skip(1);
                let n: usize = words.next().and_then(|n| n.parse().ok()).unwrap_or(0);
                let last = words.next() == Some("LAST");
                let mut chunk = vec![0u8; n];
                if r.read_exact(&mut chunk).await.is_err() {
                    return Served::Closed;
                }
                bdat.extend_from_slice(&chunk);
                if last {
                    self.messages
                        .lock()
                        .unwrap()
                        .push(std::mem::take(&mut bdat));
                    "250 2.0.0 accepted\r\n".into()
                } else {
                    "250 2.0.0 chunk ok\r\n".into()
                }
            } else if up.starts_with("DATA") {
                if r.write_all(b"354 go on\r\n").await.is_err() {
                    return Served::Closed;
                }
                let mut body = Vec::new();
                loop {
                    let mut l = Vec::new();
                    if r.read_until(b'\n', &mut l).await.unwrap_or(0) == 0 {
                        return Served::Closed;
                    }
                    if l == b".\r\n" {
                        break;
                    }
                    body.extend_from_slice(l.strip_prefix(b".").unwrap_or(&l));
                }
                self.messages.lock().unwrap().push(body);
                "250 2.0.0 accepted\r\n".into()
            } else if up.starts_with("QUIT") {
                let _ = r.write_all(b"221 2.0.0 bye\r\n").await;
                return Served::Closed;
            } else {
                "250 2.0.0 ok\r\n".into()
            };
            if r.write_all(reply.as_bytes()).await.is_err() {
                return Served::Closed;
            }
        }
    }
}

impl Scripted {
    pub async fn start(ehlo: Option<&[&str]>) -> Scripted {
        Scripted::start_with(ehlo, ScriptedTls::None).await
    }

    pub async fn start_with(ehlo: Option<&[&str]>, tls: ScriptedTls) -> Scripted {
        use tokio::io::AsyncWriteExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let state = Arc::new(ScriptedState {
            ehlo: ehlo.map(|caps| caps.iter().map(|c| c.to_string()).collect()),
            commands: Arc::new(Mutex::new(Vec::new())),
            messages: Arc::new(Mutex::new(Vec::new())),
        });
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (st, conns) = (state.clone(), connections.clone());
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                conns.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let (st, tls) = (st.clone(), tls.clone());
                tokio::spawn(async move {
                    let tls_start = |config: Arc<rustls::ServerConfig>, s| async move {
                        tokio_rustls::TlsAcceptor::from(config).accept(s).await.ok()
                    };
                    match tls {
                        ScriptedTls::Implicit(config) => {
                            let Some(mut s) = tls_start(config, s).await else {
                                return;
                            };
                            st.commands.lock().unwrap().push("<TLS>".into());
                            if s.write_all(b"220 scripted.test ESMTP\r\n").await.is_ok() {
                                st.serve(s, true).await;
                            }
                        }
                        ScriptedTls::Starttls(config) => {
                            let mut s = s;
                            if s.write_all(b"220 scripted.test ESMTP\r\n").await.is_err() {
                                return;
                            }
                            if let Served::Upgrade(s) = st.serve(s, false).await
                                && let Some(s) = tls_start(config, s).await
                            {
                                st.commands.lock().unwrap().push("<TLS>".into());
                                st.serve(s, true).await;
                            }
                        }
                        ScriptedTls::None => {
                            let mut s = s;
                            if s.write_all(b"220 scripted.test ESMTP\r\n").await.is_ok() {
                                st.serve(s, false).await;
                            }
                        }
                    }
                });
            }
        });
        Scripted {
            port,
            commands: state.commands.clone(),
            messages: state.messages.clone(),
            connections,
        }
    }

    pub fn commands(&self) -> Vec<String> {
        self.commands.lock().unwrap().clone()
    }

    /// `127.0.0.1:port`: TestCerts certificates carry that address, and `localhost` may
    /// also resolve to ::1, where nothing listens.
    pub fn route(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// GET a path from an ops endpoint; the body.
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default()
}
