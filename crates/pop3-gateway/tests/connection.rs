//! The connection driver over real sockets and real TLS, against an in-memory backend:
//! STLS, implicit TLS, limits, timers, shutdown, pipelining and streaming of large messages.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use mailsuite_pop3_gateway::backend::{Backend, BodyStream, Failure};
use mailsuite_pop3_gateway::config::Config;
use mailsuite_pop3_gateway::session::{LoginError, Maildrop, Message, Target};
use mailsuite_pop3_gateway::{Started, start_with};
use mailsuite_runtime::Shutdown;
use mailsuite_testkit::TestCerts;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const BIG_UID: u32 = 99;
const BIG_LINES: usize = 250_000; // 100 octets each: 25 MB
const LINE: usize = 100;
const BIG_HEADER: &str = "Subject: big\r\n\r\n";
const BIG_SIZE: usize = BIG_HEADER.len() + BIG_LINES * LINE;

#[derive(Default)]
struct State {
    messages: BTreeMap<u32, Vec<u8>>,
    big: bool,
    locked: bool,
    /// Successful logins (credentials checked and accepted).
    logins: usize,
    fail_body: bool,
    updates: Vec<(Vec<u32>, Vec<u32>)>,
    /// Every `body` call (one message each) and every `bodies` call (several at once).
    body_calls: Vec<u32>,
    bodies_calls: Vec<Vec<u32>>,
}

#[derive(Clone, Default)]
struct Mem {
    state: Arc<Mutex<State>>,
    /// Notified to make the store "lose" the session's maildrop lock.
    lose_lock: Arc<tokio::sync::Notify>,
    /// Octets of the big message handed to the gateway so far.
    pulled: Arc<AtomicUsize>,
}

struct MemLock(Mem);

impl Drop for MemLock {
    fn drop(&mut self) {
        self.0.state.lock().unwrap().locked = false;
    }
}

fn big_line(i: usize) -> String {
    // Every line starts with a dot, so every line must be byte-stuffed.
    format!(".{i:097}\r\n")
}

impl Backend for Mem {
    type Lock = MemLock;

    async fn lock_lost(lock: &mut MemLock) {
        lock.0.lose_lock.notified().await
    }

    async fn login(
        &self,
        user: &str,
        password: &str,
        _peer: IpAddr,
    ) -> Result<(Maildrop, MemLock), LoginError> {
        if (user, password) != ("alice", "secret") {
            return Err(LoginError::BadCredentials);
        }
        let mut s = self.state.lock().unwrap();
        if s.locked {
            return Err(LoginError::InUse);
        }
        s.locked = true;
        s.logins += 1;
        let mut messages: Vec<Message> = s
            .messages
            .iter()
            .map(|(uid, body)| Message {
                uid: *uid,
                size: body.len() as u64,
                deleted: false,
                retrieved: false,
            })
            .collect();
        if s.big {
            messages.push(Message {
                uid: BIG_UID,
                size: BIG_SIZE as u64,
                deleted: false,
                retrieved: false,
            });
        }
        Ok((
            Maildrop {
                account_id: 1,
                mailbox_id: 1,
                uidvalidity: 77,
                messages,
            },
            MemLock(self.clone()),
        ))
    }

    async fn body(&self, _target: Target, uid: u32) -> Result<BodyStream, Failure> {
        let mut s = self.state.lock().unwrap();
        s.body_calls.push(uid);
        if s.fail_body {
            return Err(Failure::Temporary("store down".into()));
        }
        if uid == BIG_UID {
            let pulled = self.pulled.clone();
            // Produced on demand, 640 lines per chunk, counting what the gateway pulls.
            let chunks = futures::stream::iter((0..BIG_LINES).step_by(640)).map(move |start| {
                let end = (start + 640).min(BIG_LINES);
                let mut chunk = if start == 0 {
                    BIG_HEADER.to_string()
                } else {
                    String::new()
                };
                chunk.extend((start..end).map(big_line));
                pulled.fetch_add(chunk.len(), Ordering::SeqCst);
                Ok(chunk.into_bytes().into())
            });
            return Ok(Box::pin(chunks));
        }
        let body = s.messages.get(&uid).cloned().ok_or(Failure::Gone)?;
        // Odd-sized chunks, so lines and dots straddle chunk boundaries.
        let chunks: Vec<Result<bytes::Bytes, Failure>> = body
            .chunks(7)
            .map(|c| Ok(bytes::Bytes::copy_from_slice(c)))
            .collect();
        Ok(Box::pin(futures::stream::iter(chunks)))
    }

    async fn bodies(
        &self,
        _target: Target,
        uids: Vec<u32>,
        max_bytes: u64,
    ) -> Result<Vec<(u32, Vec<u8>)>, Failure> {
        let mut s = self.state.lock().unwrap();
        s.bodies_calls.push(uids.clone());
        let found: Vec<(u32, Vec<u8>)> = uids
            .iter()
            .filter_map(|u| s.messages.get(u).map(|b| (*u, b.clone())))
            .collect();
        assert!(found.iter().map(|(_, b)| b.len() as u64).sum::<u64>() <= max_bytes);
        Ok(found)
    }

    async fn update(&self, _target: Target, deleted: &[u32], seen: &[u32]) -> Result<(), Failure> {
        let mut s = self.state.lock().unwrap();
        s.updates.push((deleted.to_vec(), seen.to_vec()));
        for uid in deleted {
            s.messages.remove(uid);
        }
        Ok(())
    }
}

struct Server {
    mem: Mem,
    started: Started,
    shutdown: Shutdown,
    certs: TestCerts,
}

impl Server {
    async fn start(tweak: impl FnOnce(&mut Config)) -> Server {
        let certs = TestCerts::new();
        let mut cfg = Config {
            listen_pop3: "127.0.0.1:0".into(),
            listen_pop3s: "127.0.0.1:0".into(),
            listen_ops: String::new(),
            tls: certs.tls_config(),
            hostname: "pop.test".into(),
            ..Config::default()
        };
        cfg.limits.auth_failure_delay_ms = 20;
        tweak(&mut cfg);
        let mem = Mem::default();
        {
            let mut s = mem.state.lock().unwrap();
            s.messages.insert(
                3,
                b"From: a@b.test\r\nSubject: one\r\n\r\nline 1\r\n.dotted\r\nline 3\r\n".to_vec(),
            );
            s.messages
                .insert(5, b"Subject: two\r\n\r\nshort\r\n".to_vec());
        }
        let shutdown = Shutdown::new();
        let started = start_with(mem.clone(), cfg, shutdown.clone())
            .await
            .unwrap();
        Server {
            mem,
            started,
            shutdown,
            certs,
        }
    }

    async fn plain(&self) -> Client<TcpStream> {
        let s = TcpStream::connect(self.started.pop3.unwrap())
            .await
            .unwrap();
        let mut c = Client::new(s);
        assert!(c.line().await.starts_with("+OK pop.test"), "greeting");
        c
    }

    async fn tls(&self) -> Client<tokio_rustls::client::TlsStream<TcpStream>> {
        let s = TcpStream::connect(self.started.pop3s.unwrap())
            .await
            .unwrap();
        let s = self.handshake(s).await;
        let mut c = Client::new(s);
        assert!(c.line().await.starts_with("+OK pop.test"), "greeting");
        c
    }

    async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        s: S,
    ) -> tokio_rustls::client::TlsStream<S> {
        let connector = tokio_rustls::TlsConnector::from(self.certs.client_config());
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        connector.connect(name, s).await.expect("TLS handshake")
    }

    async fn stls(&self) -> Client<tokio_rustls::client::TlsStream<TcpStream>> {
        let mut c = self.plain().await;
        assert_eq!(c.cmd("STLS").await, "+OK begin TLS negotiation");
        let s = c.into_inner();
        Client::new(self.handshake(s).await)
    }
}

struct Client<S> {
    io: BufReader<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Client<S> {
    fn new(s: S) -> Self {
        Client {
            io: BufReader::new(s),
        }
    }

    fn into_inner(self) -> S {
        assert!(
            self.io.buffer().is_empty(),
            "nothing may follow the STLS reply"
        );
        self.io.into_inner()
    }

    async fn send(&mut self, raw: &[u8]) {
        self.io.get_mut().write_all(raw).await.unwrap();
        self.io.get_mut().flush().await.unwrap();
    }

    /// The next line without CRLF; "" at end of stream.
    async fn line(&mut self) -> String {
        let mut l = Vec::new();
        tokio::time::timeout(Duration::from_secs(20), self.io.read_until(b'\n', &mut l))
            .await
            .expect("a reply within 20 s")
            .unwrap();
        let s = String::from_utf8(l).unwrap();
        s.strip_suffix("\r\n").unwrap_or(&s).to_string()
    }

    async fn cmd(&mut self, c: &str) -> String {
        self.send(format!("{c}\r\n").as_bytes()).await;
        self.line().await
    }

    /// The lines of a multi-line body up to the terminating ".", still stuffed.
    async fn multi(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let l = self.line().await;
            if l == "." {
                return lines;
            }
            assert!(!l.is_empty() || lines.len() < 1_000_000, "unterminated");
            lines.push(l);
        }
    }

    async fn login(&mut self) {
        assert_eq!(self.cmd("USER alice").await, "+OK send PASS");
        let r = self.cmd("PASS secret").await;
        assert!(r.starts_with("+OK maildrop locked and ready"), "{r}");
    }

    /// True when the server closed the connection without sending anything more.
    async fn closed(&mut self) -> bool {
        let mut rest = Vec::new();
        let n = tokio::time::timeout(Duration::from_secs(20), self.io.read_to_end(&mut rest))
            .await
            .expect("closed within 20 s")
            .unwrap_or(0);
        n == 0
    }
}

#[tokio::test]
async fn stls_upgrades_and_only_then_allows_login() {
    let srv = Server::start(|_| {}).await;
    let mut c = srv.plain().await;
    c.send(b"CAPA\r\n").await;
    assert!(c.line().await.starts_with("+OK"));
    let caps = c.multi().await;
    assert!(caps.contains(&"STLS".to_string()), "{caps:?}");
    assert!(
        !caps.contains(&"USER".to_string()),
        "no USER before TLS: {caps:?}"
    );
    assert!(c.cmd("USER alice").await.starts_with("-ERR [AUTH]"));
    assert!(
        c.cmd("AUTH PLAIN AGFsaWNlAHNlY3JldA==")
            .await
            .starts_with("-ERR [AUTH]")
    );
    drop(c);

    let mut c = srv.stls().await;
    c.send(b"CAPA\r\n").await;
    assert!(c.line().await.starts_with("+OK"));
    let caps = c.multi().await;
    assert!(!caps.contains(&"STLS".to_string()), "{caps:?}");
    for cap in [
        "USER",
        "SASL PLAIN",
        "TOP",
        "UIDL",
        "PIPELINING",
        "RESP-CODES",
        "AUTH-RESP-CODE",
    ] {
        assert!(caps.contains(&cap.to_string()), "{cap} in {caps:?}");
    }
    assert_eq!(
        c.cmd("STLS").await,
        "-ERR command not permitted when TLS active"
    );
    c.login().await;
    assert_eq!(c.cmd("STAT").await, format!("+OK 2 {}", 57 + 23));
    assert!(c.cmd("QUIT").await.starts_with("+OK"));
    assert!(c.closed().await);
}

#[tokio::test]
async fn plaintext_pipelined_after_stls_is_discarded() {
    let srv = Server::start(|_| {}).await;
    let mut c = srv.plain().await;
    // CVE-2011-0411 style injection: the USER must not survive into the TLS session.
    c.send(b"STLS\r\nUSER alice\r\n").await;
    assert_eq!(c.line().await, "+OK begin TLS negotiation");
    let mut c = Client::new(srv.handshake(c.into_inner()).await);
    assert_eq!(c.cmd("PASS secret").await, "-ERR USER first");
}

#[tokio::test]
async fn implicit_tls_auth_plain_retr_top_and_uidl() {
    let srv = Server::start(|_| {}).await;
    let mut c = srv.tls().await;
    c.send(b"CAPA\r\n").await;
    c.line().await;
    assert!(
        !c.multi().await.contains(&"STLS".to_string()),
        "no STLS on 995"
    );
    assert_eq!(c.cmd("AUTH PLAIN").await, "+ ");
    let r = c.cmd("AGFsaWNlAHNlY3JldA==").await;
    assert!(r.starts_with("+OK maildrop locked"), "{r}");
    assert_eq!(c.cmd("RETR 1").await, "+OK 57 octets");
    assert_eq!(
        c.multi().await,
        [
            "From: a@b.test",
            "Subject: one",
            "",
            "line 1",
            "..dotted",
            "line 3"
        ]
    );
    assert_eq!(c.cmd("TOP 1 1").await, "+OK top of message follows");
    assert_eq!(
        c.multi().await,
        ["From: a@b.test", "Subject: one", "", "line 1"]
    );
    c.send(b"UIDL\r\n").await;
    assert!(c.line().await.starts_with("+OK"));
    assert_eq!(c.multi().await, ["1 77.3", "2 77.5"]);
    assert_eq!(c.cmd("UIDL 2").await, "+OK 2 77.5");
}

#[tokio::test]
async fn pipelined_commands_are_answered_in_order() {
    let srv = Server::start(|c| c.auth.allow_plaintext_loopback = true).await;
    let mut c = srv.plain().await;
    c.send(b"USER alice\r\nPASS secret\r\nSTAT\r\nLIST 2\r\nDELE 1\r\nSTAT\r\nNOOP\r\nBOGUS\r\nRSET\r\nQUIT\r\n")
        .await;
    assert_eq!(c.line().await, "+OK send PASS");
    assert!(c.line().await.starts_with("+OK maildrop locked"));
    assert_eq!(c.line().await, "+OK 2 80");
    assert_eq!(c.line().await, "+OK 2 23");
    assert_eq!(c.line().await, "+OK message 1 deleted");
    assert_eq!(c.line().await, "+OK 1 23");
    assert_eq!(c.line().await, "+OK");
    assert_eq!(c.line().await, "-ERR unknown command BOGUS");
    assert_eq!(c.line().await, "+OK maildrop has 2 messages (80 octets)");
    assert!(
        c.line()
            .await
            .starts_with("+OK pop.test mailsuite POP3 server signing off")
    );
    assert!(c.closed().await);
    assert!(
        srv.mem.state.lock().unwrap().updates.is_empty(),
        "RSET undid the DELE"
    );
}

#[tokio::test]
async fn dele_is_applied_only_after_quit() {
    let srv = Server::start(|_| {}).await;
    let mut c = srv.tls().await;
    c.login().await;
    assert_eq!(c.cmd("DELE 2").await, "+OK message 2 deleted");
    // The connection drops without QUIT: nothing is removed, the lock is released.
    drop(c);
    mailsuite_testkit::eventually(Duration::from_secs(10), "lock released", || async {
        (!srv.mem.state.lock().unwrap().locked).then_some(())
    })
    .await;
    assert!(srv.mem.state.lock().unwrap().updates.is_empty());

    let mut c = srv.tls().await;
    c.login().await;
    assert_eq!(c.cmd("RETR 1").await, "+OK 57 octets");
    c.multi().await;
    assert_eq!(c.cmd("DELE 2").await, "+OK message 2 deleted");
    let r = c.cmd("QUIT").await;
    assert_eq!(
        r,
        "+OK pop.test mailsuite POP3 server signing off (1 messages left)"
    );
    assert!(c.closed().await);
    let s = srv.mem.state.lock().unwrap();
    assert_eq!(s.updates, vec![(vec![5], vec![3])]);
    assert!(!s.locked);
}

/// M3 follow-up: when the store loses the maildrop lock (its lock connection died), the
/// session ends at once with a temporary error and without UPDATE, because another session
/// may hold the maildrop now.
#[tokio::test]
async fn m3_a_lost_maildrop_lock_ends_the_session_without_update() {
    let srv = Server::start(|_| {}).await;
    let mut c = srv.tls().await;
    c.login().await;
    assert_eq!(c.cmd("DELE 2").await, "+OK message 2 deleted");
    srv.mem.lose_lock.notify_one();
    let r = c.line().await;
    assert_eq!(
        r,
        "-ERR [SYS/TEMP] the maildrop lock was lost; nothing was removed, log in again"
    );
    assert!(c.closed().await);
    {
        let s = srv.mem.state.lock().unwrap();
        assert!(s.updates.is_empty(), "no UPDATE after a lost lock");
        assert!(!s.locked, "the session's lock handle is dropped");
    }
}

#[tokio::test]
async fn second_session_gets_in_use() {
    let srv = Server::start(|_| {}).await;
    let mut a = srv.tls().await;
    a.login().await;
    let mut b = srv.tls().await;
    b.cmd("USER alice").await;
    assert_eq!(
        b.cmd("PASS secret").await,
        "-ERR [IN-USE] maildrop is locked by another session"
    );
    assert!(a.cmd("QUIT").await.starts_with("+OK"));
    assert!(a.closed().await);
    b.login().await;
}

#[tokio::test]
async fn failed_logins_are_delayed_more_each_time_then_cut_off() {
    let srv = Server::start(|c| {
        c.limits.auth_failure_delay_ms = 150;
        c.limits.max_auth_failures = 3;
    })
    .await;
    let mut c = srv.tls().await;
    let mut took = Vec::new();
    for n in 1..=3u32 {
        c.cmd("USER alice").await;
        let t = Instant::now();
        assert_eq!(
            c.cmd("PASS wrong").await,
            "-ERR [AUTH] authentication failed"
        );
        took.push(t.elapsed());
        // Lower bounds only: 150, 300, 600 ms (a busy machine only adds time).
        assert!(
            took[n as usize - 1] >= Duration::from_millis(150 << (n - 1)),
            "failure {n} took {took:?}"
        );
    }
    // The delay grows: the third waits 450 ms longer than the first by design, so only a
    // constant delay (or scheduling noise of that size) makes them equal.
    assert!(took[2] > took[0], "{took:?}");
    assert!(c.closed().await, "closed after the third failure");
}

#[tokio::test]
async fn long_lines_and_garbage_get_errors_and_never_hang() {
    let srv = Server::start(|c| {
        c.limits.max_line = 64;
        c.limits.max_bad_commands = 5;
        c.auth.allow_plaintext_loopback = true;
    })
    .await;
    let mut c = srv.plain().await;
    c.send(&[b'A'; 100_000]).await;
    c.send(b"\r\n").await;
    assert_eq!(c.line().await, "-ERR line too long");
    assert_eq!(
        c.cmd("NOOP").await,
        "-ERR NOOP not permitted in AUTHORIZATION state"
    );
    assert!(
        c.cmd("\u{1}\u{2}\u{3}")
            .await
            .starts_with("-ERR unknown command")
    );
    assert_eq!(c.cmd("RETR x").await, "-ERR syntax: RETR msg");
    c.login().await;
    assert_eq!(c.cmd("RETR 0").await, "-ERR no such message");
    assert_eq!(c.cmd("RETR 4294967295").await, "-ERR no such message");
    assert_eq!(
        c.cmd("TOP 1 99999999999999").await,
        "+OK top of message follows"
    );
    assert_eq!(c.multi().await.len(), 6);
    assert_eq!(c.cmd("FOO").await, "-ERR unknown command FOO");
    assert_eq!(
        c.cmd("BAR").await,
        "-ERR too many bad commands, closing connection"
    );
    assert!(c.closed().await);
    // Nothing was removed by the abrupt end.
    assert!(srv.mem.state.lock().unwrap().updates.is_empty());
}

#[tokio::test]
async fn store_failure_on_retr_is_a_temporary_error() {
    let srv = Server::start(|_| {}).await;
    let mut c = srv.tls().await;
    c.login().await;
    srv.mem.state.lock().unwrap().fail_body = true;
    assert_eq!(c.cmd("RETR 1").await, "-ERR [SYS/TEMP] store down");
    srv.mem.state.lock().unwrap().fail_body = false;
    assert_eq!(c.cmd("RETR 2").await, "+OK 23 octets");
    assert_eq!(c.multi().await, ["Subject: two", "", "short"]);
}

#[tokio::test]
async fn auto_logout_closes_silently() {
    let srv = Server::start(|c| c.limits.idle_timeout_secs = 1).await;
    let mut c = srv.tls().await;
    c.login().await;
    assert_eq!(c.cmd("DELE 1").await, "+OK message 1 deleted");
    assert!(c.closed().await, "no response on auto-logout");
    assert!(
        srv.mem.state.lock().unwrap().updates.is_empty(),
        "no UPDATE"
    );
}

#[tokio::test]
async fn shutdown_says_goodbye_to_idle_sessions() {
    let srv = Server::start(|_| {}).await;
    let mut plain = srv.plain().await;
    let mut tls = srv.tls().await;
    tls.login().await;
    tls.cmd("DELE 1").await;
    assert!(srv.shutdown.drain(Duration::from_secs(10)).await);
    assert_eq!(plain.line().await, "-ERR [SYS/TEMP] server shutting down");
    assert_eq!(tls.line().await, "-ERR [SYS/TEMP] server shutting down");
    assert!(srv.mem.state.lock().unwrap().updates.is_empty());
    assert!(TcpStream::connect(srv.started.pop3.unwrap()).await.is_err());
}

#[tokio::test]
async fn connections_per_ip_are_limited() {
    let srv = Server::start(|c| c.limits.connections.max_per_ip = 1).await;
    let _first = srv.plain().await;
    let s = TcpStream::connect(srv.started.pop3.unwrap()).await.unwrap();
    let mut second = Client::new(s);
    assert_eq!(second.line().await, "-ERR [SYS/TEMP] too many connections");
}

/// A 25 MB message streams through with every line stuffed, and the gateway never runs far
/// ahead of the client: it is not buffered whole. TOP reads only what it sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_message_is_streamed_not_buffered() {
    let srv = Server::start(|_| {}).await;
    srv.mem.state.lock().unwrap().big = true;
    let mut c = srv.tls().await;
    c.login().await;
    assert_eq!(c.cmd("LIST 3").await, format!("+OK 3 {BIG_SIZE}"));
    assert_eq!(c.cmd("RETR 3").await, format!("+OK {BIG_SIZE} octets"));
    assert_eq!(c.line().await, "Subject: big");
    assert_eq!(c.line().await, "");
    let mut max_ahead = 0;
    for i in 0..BIG_LINES {
        let l = c.line().await;
        if l != format!(".{}", &big_line(i)[..LINE - 2]) {
            panic!("line {i}: {l:?}");
        }
        let read = BIG_HEADER.len() + (i + 1) * LINE;
        max_ahead = max_ahead.max(srv.mem.pulled.load(Ordering::SeqCst).saturating_sub(read));
    }
    assert_eq!(c.line().await, ".");
    assert_eq!(srv.mem.pulled.load(Ordering::SeqCst), BIG_SIZE);
    assert!(
        max_ahead < BIG_SIZE / 2,
        "the gateway ran {max_ahead} octets ahead of the client"
    );

    let before = srv.mem.pulled.load(Ordering::SeqCst);
    assert_eq!(c.cmd("TOP 3 2").await, "+OK top of message follows");
    let lines = c.multi().await;
    assert_eq!(lines.len(), 4, "{lines:?}");
    assert_eq!(lines[3], format!(".{}", &big_line(1)[..LINE - 2]));
    let pulled = srv.mem.pulled.load(Ordering::SeqCst) - before;
    assert!(pulled < 1 << 20, "TOP 3 2 pulled {pulled} octets");
}

#[tokio::test]
async fn login_delay_is_advertised_and_enforced() {
    let srv = Server::start(|c| c.login_delay = 3600).await;
    let mut c = srv.tls().await;
    c.send(b"CAPA\r\n").await;
    c.line().await;
    assert!(c.multi().await.contains(&"LOGIN-DELAY 3600".to_string()));
    c.login().await;
    assert!(c.cmd("QUIT").await.starts_with("+OK"));
    let mut c = srv.tls().await;
    c.cmd("USER alice").await;
    assert_eq!(
        c.cmd("PASS secret").await,
        "-ERR [LOGIN-DELAY] minimum time between logins has not elapsed"
    );
    assert!(
        !srv.mem.state.lock().unwrap().locked,
        "the refused login holds no lock"
    );
}

/// Shutdown lets a RETR in progress finish, then says goodbye.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_a_busy_retr_finish() {
    let srv = Server::start(|_| {}).await;
    srv.mem.state.lock().unwrap().big = true;
    let mut c = srv.tls().await;
    c.login().await;
    assert_eq!(c.cmd("RETR 3").await, format!("+OK {BIG_SIZE} octets"));
    let drain = tokio::spawn({
        let sd = srv.shutdown.clone();
        async move { sd.drain(Duration::from_secs(60)).await }
    });
    let lines = c.multi().await;
    assert_eq!(lines.len(), 2 + BIG_LINES, "the whole message arrived");
    assert_eq!(c.line().await, "-ERR [SYS/TEMP] server shutting down");
    assert!(c.closed().await);
    assert!(drain.await.unwrap(), "ended within the grace period");
    assert!(srv.mem.state.lock().unwrap().updates.is_empty());
}

/// A client that stops reading in the middle of a RETR is cut off when shutdown is forced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_shutdown_ends_a_stuck_transfer() {
    let srv = Server::start(|_| {}).await;
    srv.mem.state.lock().unwrap().big = true;
    let mut c = srv.tls().await;
    c.login().await;
    c.send(b"RETR 3\r\n").await;
    // Wait until the gateway is blocked on the client rather than done.
    mailsuite_testkit::eventually(Duration::from_secs(20), "transfer under way", || async {
        (srv.mem.pulled.load(Ordering::SeqCst) > 0).then_some(())
    })
    .await;
    let clean = tokio::time::timeout(
        Duration::from_secs(20),
        srv.shutdown.drain(Duration::from_millis(300)),
    )
    .await
    .expect("forced shutdown does not hang");
    assert!(!clean, "the stuck transfer needed forcing");
    assert!(srv.mem.pulled.load(Ordering::SeqCst) < BIG_SIZE);
    assert!(!srv.mem.state.lock().unwrap().locked, "lock released");
}

/// Review I3: a client that keeps the connection busy with commands but never logs in is
/// closed at the login deadline, though the idle timer never expires.
#[tokio::test]
async fn login_deadline_is_absolute_not_reset_by_activity() {
    let srv = Server::start(|c| {
        c.limits.login_timeout_secs = 2;
        c.auth.allow_plaintext_loopback = true;
    })
    .await;
    let mut c = srv.plain().await;
    let t = Instant::now();
    let last = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let r = c.cmd("USER alice").await;
            if r != "+OK send PASS" {
                return r;
            }
            // The client's pace (well inside the idle timer), not a wait for server state.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await
    .expect("closed by the login deadline, not kept alive by activity");
    assert_eq!(last, "-ERR login time exceeded, closing connection");
    assert!(
        t.elapsed() >= Duration::from_millis(1900),
        "{:?}",
        t.elapsed()
    );
    assert!(c.closed().await);

    // A logged-in session is not subject to it.
    let mut c = srv.plain().await;
    c.login().await;
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(2500) {
        assert_eq!(c.cmd("NOOP").await, "+OK");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(c.cmd("STAT").await, "+OK 2 80");
}

/// Review I3: one byte at a time, never finishing the line, is cut off at the line deadline.
#[tokio::test]
async fn a_trickled_command_line_is_cut_off() {
    let srv = Server::start(|c| {
        c.limits.line_timeout_secs = 1;
        c.auth.allow_plaintext_loopback = true;
    })
    .await;
    let mut c = srv.plain().await;
    c.login().await;
    let t = Instant::now();
    let got = tokio::time::timeout(Duration::from_secs(15), async {
        // Partially read bytes stay in `l` when a read times out.
        let mut l = Vec::new();
        for b in b"USER abcdefghijklmnopqrstuvwxyz".iter().cycle() {
            if c.io.get_mut().write_all(&[*b]).await.is_err() {
                break;
            }
            // Writing and reading share the client: one byte, then a short look for a reply.
            let read = c.io.read_until(b'\n', &mut l);
            if let Ok(r) = tokio::time::timeout(Duration::from_millis(100), read).await {
                r.unwrap();
                break;
            }
        }
        if !l.ends_with(b"\n") {
            c.io.read_until(b'\n', &mut l).await.unwrap();
        }
        String::from_utf8(l).unwrap()
    })
    .await
    .expect("cut off at the line deadline, not kept alive by trickling");
    assert_eq!(
        got,
        "-ERR command line not completed in time, closing connection\r\n"
    );
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    assert!(
        srv.mem.state.lock().unwrap().updates.is_empty(),
        "no UPDATE"
    );
}

/// Review I4: failures are counted per client address across connections. Once over the
/// limit, even the right password is refused (the store is not asked), with a delay that
/// grows with every further attempt, and the connection is closed.
#[tokio::test]
async fn failed_logins_are_limited_per_address_across_connections() {
    let srv = Server::start(|c| {
        c.limits.max_auth_failures_per_ip = 4;
        c.limits.max_auth_failures = 3;
        c.limits.auth_failure_delay_ms = 50;
        c.limits.auth_failure_delay_max_ms = 5000;
    })
    .await;
    // Two connections at once, each under its own limit of 3.
    let mut a = srv.tls().await;
    let mut b = srv.tls().await;
    for c in [&mut a, &mut b] {
        c.cmd("USER alice").await;
        assert_eq!(
            c.cmd("PASS wrong").await,
            "-ERR [AUTH] authentication failed"
        );
    }
    a.cmd("USER alice").await;
    assert_eq!(
        a.cmd("PASS wrong").await,
        "-ERR [AUTH] authentication failed"
    );
    // The fourth failure from this address closes the connection, though the connection
    // itself has failed only twice.
    b.cmd("USER alice").await;
    assert_eq!(
        b.cmd("PASS wrong").await,
        "-ERR [AUTH] authentication failed"
    );
    assert!(b.closed().await, "closed at the address limit");

    for n in 1..=2u32 {
        let mut c = srv.tls().await;
        c.cmd("USER alice").await;
        let t = Instant::now();
        assert_eq!(
            c.cmd("PASS secret").await,
            "-ERR [LOGIN-DELAY] too many failed logins from your address, try again later"
        );
        let took = t.elapsed();
        // Lower bounds only: 100, 200 ms (growth itself is asserted above).
        assert!(
            took >= Duration::from_millis(50 << n),
            "attempt {n} took {took:?}"
        );
        assert!(c.closed().await);
    }
    assert_eq!(
        srv.mem.state.lock().unwrap().logins,
        0,
        "the store was never asked about the right password"
    );
    // The open connection is refused too.
    a.cmd("USER alice").await;
    assert!(a.cmd("PASS secret").await.starts_with("-ERR [LOGIN-DELAY]"));
}

#[tokio::test]
async fn pipelined_retrs_are_read_from_the_store_together() {
    // Message 1 (uid 3, 57 octets) is over the per-message read-ahead bound.
    let srv = Server::start(|c| {
        c.auth.allow_plaintext_loopback = true;
        c.limits.prefetch_message_bytes = 30;
    })
    .await;
    srv.mem
        .state
        .lock()
        .unwrap()
        .messages
        .insert(7, b"S: 3\r\n\r\n.dot\r\n".to_vec());
    let mut c = srv.plain().await;
    c.login().await;
    // One write: every command is in the gateway's input when RETR 1 is executed.
    c.send(
        b"RETR 1\r\nRETR 2\r\nDELE 3\r\nRETR 3\r\nRETR 9\r\nRETR 2\r\nRSET\r\nRETR 3\r\nNOOP\r\n",
    )
    .await;
    assert_eq!(c.line().await, "+OK 57 octets");
    assert_eq!(
        c.multi().await,
        [
            "From: a@b.test",
            "Subject: one",
            "",
            "line 1",
            "..dotted",
            "line 3"
        ]
    );
    assert_eq!(c.line().await, "+OK 23 octets");
    assert_eq!(c.multi().await, ["Subject: two", "", "short"]);
    assert_eq!(c.line().await, "+OK message 3 deleted");
    // Read ahead or not, a deleted or unknown message is refused in order.
    assert_eq!(c.line().await, "-ERR message 3 already deleted");
    assert_eq!(c.line().await, "-ERR no such message");
    assert_eq!(c.line().await, "+OK 23 octets");
    assert_eq!(c.multi().await, ["Subject: two", "", "short"]);
    assert!(
        c.line().await.starts_with("+OK maildrop has 3 messages"),
        "RSET"
    );
    assert_eq!(c.line().await, "+OK 14 octets");
    assert_eq!(c.multi().await, ["S: 3", "", "..dot"]);
    assert_eq!(c.line().await, "+OK");
    let s = srv.mem.state.lock().unwrap();
    // The two small pipelined messages in one store call; the big one, and the second RETR
    // of message 2 (already sent from the batch), each on its own.
    assert_eq!(s.bodies_calls, vec![vec![5, 7]]);
    assert_eq!(s.body_calls, vec![3, 5]);
}

#[tokio::test]
async fn read_ahead_can_be_turned_off() {
    let srv = Server::start(|c| {
        c.auth.allow_plaintext_loopback = true;
        c.limits.prefetch_messages = 1;
    })
    .await;
    let mut c = srv.plain().await;
    c.login().await;
    c.send(b"RETR 1\r\nRETR 2\r\n").await;
    assert_eq!(c.line().await, "+OK 57 octets");
    c.multi().await;
    assert_eq!(c.line().await, "+OK 23 octets");
    assert_eq!(c.multi().await, ["Subject: two", "", "short"]);
    let s = srv.mem.state.lock().unwrap();
    assert!(s.bodies_calls.is_empty());
    assert_eq!(s.body_calls, vec![3, 5]);
}

/// Every connection's task holds its whole future, idle or not: a command's state held
/// inline (a login or a RETR through the real store client) would cost every open
/// connection that much memory. Commands and the TLS handshakes are boxed.
#[tokio::test]
async fn an_idle_connection_future_stays_small() {
    let certs = TestCerts::new();
    let acceptor = tokio_rustls::TlsAcceptor::from(
        mailsuite_runtime::tls::server_config(&certs.tls_config()).unwrap(),
    );
    let backend = mailsuite_pop3_gateway::StoreBackend::connect(
        "http://127.0.0.1:9",
        "",
        Duration::from_secs(1),
        64 * 1024,
    )
    .unwrap();
    let shared = Arc::new(mailsuite_pop3_gateway::connection::Shared::new(
        backend,
        Config::default(),
        acceptor,
        Shutdown::new(),
    ));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let peer = "192.0.2.1:110".parse().unwrap();
    let fut = mailsuite_pop3_gateway::connection::handle(shared, c, peer, false);
    let size = std::mem::size_of_val(&fut);
    assert!(size < 4096, "the connection future is {size} bytes");
}
