//! The I/O driver of one POP3 connection: reads lines under the auto-logout timer, runs the
//! session's actions against the [`Backend`], streams messages, upgrades to TLS on STLS (the
//! stream type is generic, so the same loop runs before and after), and says goodbye on
//! shutdown.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{FutureExt, StreamExt};
use mailsuite_runtime::Shutdown;
use mailsuite_runtime::limiter::{ClientWindows, client_key};
use mailsuite_runtime::metrics;
use mailsuite_runtime::stream::MailStream;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tracing::Instrument;

use crate::backend::{Backend, Failure};
use crate::codec::{BodyEncoder, LineDecoder, LineError, Reply, RespCode};
use crate::config::Config;
use crate::session::{Action, LoginError, Maildrop, Session, SessionConfig, Target};

/// Output is written to the socket whenever this much is buffered while streaming.
const WRITE_CHUNK: usize = 64 * 1024;
const READ_BUF: usize = 8 * 1024;

/// What every connection of a gateway shares.
pub struct Shared<B> {
    pub backend: B,
    pub config: Config,
    pub acceptor: TlsAcceptor,
    pub shutdown: Shutdown,
    /// Last successful login per account, for LOGIN-DELAY (this replica only).
    login_times: Mutex<HashMap<i64, Instant>>,
    /// Failed logins per client address, across connections (max: `max_auth_failures_per_ip`).
    auth_limiter: ClientWindows,
}

impl<B: Backend> Shared<B> {
    pub fn new(backend: B, config: Config, acceptor: TlsAcceptor, shutdown: Shutdown) -> Self {
        Shared {
            backend,
            acceptor,
            shutdown,
            login_times: Mutex::default(),
            auth_limiter: ClientWindows::new(
                // A zero window would forget every failure at once.
                Duration::from_secs(config.limits.auth_failure_window_secs)
                    .max(Duration::from_secs(1)),
                config.limits.max_auth_failures_per_ip,
                config.limits.max_tracked_clients,
            ),
            config,
        }
    }

    /// Record a login of `account`; false if the previous one was less than LOGIN-DELAY ago.
    fn login_allowed(&self, account: i64) -> bool {
        let delay = Duration::from_secs(self.config.login_delay);
        if delay.is_zero() {
            return true;
        }
        let now = Instant::now();
        let mut times = self.login_times.lock().unwrap_or_else(|p| p.into_inner());
        if times
            .get(&account)
            .is_some_and(|t| now.duration_since(*t) < delay)
        {
            return false;
        }
        if times.len() >= 4096 {
            times.retain(|_, t| now.duration_since(*t) < delay);
        }
        times.insert(account, now);
        true
    }
}

enum Flow {
    Continue,
    /// Send what is buffered, then close.
    Close,
    StartTls,
    /// Drop the connection at once (I/O failure, broken stream).
    Abort,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Expiry {
    Idle,
    Login,
    Line,
}

enum Next<S> {
    Closed,
    StartTls(S),
}

struct Conn<B: Backend> {
    shared: Arc<Shared<B>>,
    session: Session,
    decoder: LineDecoder,
    /// Complete command lines taken out of the decoder early, to look for pipelined RETRs;
    /// they are executed before anything else the decoder holds.
    pending: VecDeque<Result<Vec<u8>, LineError>>,
    /// Messages read ahead for pipelined RETRs (uid → stored content), bounded by
    /// `limits.prefetch_bytes`; dropped once the pipelined batch has been answered.
    ahead: HashMap<u32, Vec<u8>>,
    out: Vec<u8>,
    peer: SocketAddr,
    lock: Option<B::Lock>,
    /// Until a login succeeds, the connection must not outlive this.
    login_deadline: tokio::time::Instant,
}

/// Serve one accepted connection until it ends (or shutdown forces it to).
pub async fn handle<B: Backend>(
    shared: Arc<Shared<B>>,
    tcp: TcpStream,
    peer: SocketAddr,
    implicit_tls: bool,
) {
    let span = tracing::info_span!(
        "pop3.session",
        otel.kind = "server",
        network.transport = "tcp",
        network.peer.address = %peer.ip(),
        network.peer.port = peer.port(),
        server.port = tcp.local_addr().map(|a| a.port()).unwrap_or(0),
        tls = implicit_tls,
    );
    let forced = shared.shutdown.force_token();
    let _active = metrics::up_down("mailsuite_pop3_sessions_active", &[]).guard();
    let mut session_metrics = metrics::Session::start("pop3", implicit_tls);
    tokio::select! {
        _ = forced.cancelled() => tracing::debug!(parent: &span, "ended by forced shutdown"),
        _ = serve(shared, tcp, peer, implicit_tls, &mut session_metrics).instrument(span.clone()) => {}
    }
}

/// The command keyword of a raw line, for the command's span: never its arguments (PASS,
/// AUTH data), and a fixed set of names.
fn keyword_of(line: &Result<Vec<u8>, LineError>) -> &'static str {
    const KNOWN: &[&str] = &[
        "CAPA", "STLS", "AUTH", "USER", "PASS", "APOP", "STAT", "LIST", "RETR", "DELE", "NOOP",
        "RSET", "QUIT", "TOP", "UIDL", "UTF8", "LANG",
    ];
    let Ok(line) = line else { return "INVALID" };
    let word = line.split(|b| *b == b' ').next().unwrap_or_default();
    KNOWN
        .iter()
        .find(|k| word.eq_ignore_ascii_case(k.as_bytes()))
        .copied()
        .unwrap_or("OTHER")
}

async fn serve<B: Backend>(
    shared: Arc<Shared<B>>,
    tcp: TcpStream,
    peer: SocketAddr,
    implicit_tls: bool,
    session_metrics: &mut metrics::Session,
) {
    let cfg = &shared.config;
    let session_cfg = SessionConfig {
        hostname: cfg.hostname.clone(),
        stls_available: !implicit_tls,
        plaintext_ok: cfg.auth.allow_plaintext_loopback && peer.ip().is_loopback(),
        expire: (!cfg.expire.is_empty()).then(|| cfg.expire.clone()),
        login_delay: (cfg.login_delay > 0).then_some(cfg.login_delay),
        max_auth_failures: cfg.limits.max_auth_failures.max(1),
        max_bad_commands: cfg.limits.max_bad_commands,
    };
    let handshake = Duration::from_secs(cfg.limits.tls_handshake_timeout_secs.max(1));
    let login_deadline =
        tokio::time::Instant::now() + Duration::from_secs(cfg.limits.login_timeout_secs.max(1));
    // The handshake counts against the login deadline too.
    let handshake_deadline = (tokio::time::Instant::now() + handshake).min(login_deadline);
    let mut conn = Conn {
        login_deadline,
        decoder: LineDecoder::new(cfg.limits.max_line),
        pending: VecDeque::new(),
        ahead: HashMap::new(),
        session: Session::new(session_cfg, implicit_tls),
        out: Vec::new(),
        peer,
        lock: None,
        shared: shared.clone(),
    };
    if implicit_tls {
        let within = handshake_deadline.saturating_duration_since(tokio::time::Instant::now());
        let tls = match Box::pin(MailStream::accept(tcp, &shared.acceptor, within)).await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "TLS handshake failed");
                return;
            }
        };
        conn.session.greeting().serialize(&mut conn.out);
        conn.run(tls).await;
        return;
    }
    conn.session.greeting().serialize(&mut conn.out);
    if let Next::StartTls(tcp) = conn.run(tcp).await {
        let handshake_deadline = (tokio::time::Instant::now() + handshake).min(login_deadline);
        let within = handshake_deadline.saturating_duration_since(tokio::time::Instant::now());
        match Box::pin(MailStream::Plain(tcp).into_tls(&shared.acceptor, within)).await {
            Ok(tls) => {
                conn.session.tls_started();
                session_metrics.tls_upgraded();
                tracing::debug!("STLS complete");
                // The TLS layer cannot start TLS again: the session refuses a second STLS.
                let _ = conn.run(tls).await;
            }
            Err(e) => tracing::debug!(error = %e, "STLS handshake failed"),
        }
    }
}

impl<B: Backend> Conn<B> {
    fn limits(&self) -> &crate::config::Limits {
        &self.shared.config.limits
    }

    async fn run<S>(&mut self, mut io: S) -> Next<S>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let mut buf = vec![0u8; READ_BUF];
        let idle = Duration::from_secs(self.limits().idle_timeout_secs.max(1));
        let line_timeout = Duration::from_secs(self.limits().line_timeout_secs.max(1));
        // When the first byte of the command line now being received arrived.
        let mut line_started: Option<tokio::time::Instant> = None;
        loop {
            while let Some(line) = self
                .pending
                .pop_front()
                .or_else(|| self.decoder.next_line())
            {
                let span = tracing::info_span!("pop3.command", pop3.command = keyword_of(&line));
                let action = span.in_scope(|| self.session.handle_line(line));
                // Boxed: a command's future (a login, a RETR streaming from the store) would
                // otherwise be part of every connection's task, idle or not.
                match Box::pin(self.perform(action, &mut io))
                    .instrument(span)
                    .await
                {
                    Flow::Continue => {}
                    Flow::Close => {
                        self.close(&mut io).await;
                        return Next::Closed;
                    }
                    Flow::Abort => return Next::Closed,
                    Flow::StartTls => {
                        if self.write(&mut io).await.is_err() {
                            return Next::Closed;
                        }
                        // Anything pipelined after STLS arrived in plaintext: it must not be
                        // executed as if it had come over TLS.
                        self.decoder.clear();
                        self.pending.clear();
                        return Next::StartTls(io);
                    }
                }
            }
            // Replies to a pipelined batch go out together, once the input is used up.
            self.ahead.clear();
            if self.write(&mut io).await.is_err() {
                return Next::Closed;
            }
            let now = tokio::time::Instant::now();
            if self.decoder.buffered() == 0 {
                line_started = None;
            } else if line_started.is_none() {
                line_started = Some(now);
            }
            // The earliest of: the auto-logout timer (restarts with every read), the login
            // deadline (fixed, until logged in) and the line deadline (fixed per line).
            let mut deadline = (now + idle, Expiry::Idle);
            if self.session.maildrop().is_none() && self.login_deadline < deadline.0 {
                deadline = (self.login_deadline, Expiry::Login);
            }
            if let Some(t) = line_started.map(|t| t + line_timeout)
                && t < deadline.0
            {
                deadline = (t, Expiry::Line);
            }
            let shutdown = self.shared.shutdown.clone();
            let read = tokio::select! {
                biased;
                _ = shutdown.stopping() => {
                    Reply::err_code(RespCode::SysTemp, "server shutting down").serialize(&mut self.out);
                    self.close(&mut io).await;
                    return Next::Closed;
                }
                _ = lock_lost::<B>(&mut self.lock) => {
                    // Another session may hold the maildrop now: end this one without
                    // UPDATE, so nothing is removed on the strength of a lost lock.
                    tracing::warn!("maildrop lock lost: ending the session without UPDATE");
                    metrics::counter("mailsuite_pop3_locks_lost_total", &[]).inc();
                    self.lock = None;
                    Reply::err_code(
                        RespCode::SysTemp,
                        "the maildrop lock was lost; nothing was removed, log in again",
                    )
                    .serialize(&mut self.out);
                    self.close(&mut io).await;
                    return Next::Closed;
                }
                r = tokio::time::timeout_at(deadline.0, io.read(&mut buf)) => r,
            };
            match read {
                // RFC 1939 §3: the auto-logout timer closes without a response, and without
                // entering UPDATE: nothing is removed.
                Err(_) if deadline.1 == Expiry::Idle => {
                    tracing::debug!(state = self.session.state_name(), "auto-logout");
                    return Next::Closed;
                }
                Err(_) => {
                    let (metric, text) = match deadline.1 {
                        Expiry::Login => ("login", "login time exceeded, closing connection"),
                        _ => (
                            "line",
                            "command line not completed in time, closing connection",
                        ),
                    };
                    tracing::info!(
                        state = self.session.state_name(),
                        "{metric} deadline passed"
                    );
                    metrics::counter("mailsuite_pop3_deadlines_total", &[("kind", metric)]).inc();
                    Reply::err(text).serialize(&mut self.out);
                    self.close(&mut io).await;
                    return Next::Closed;
                }
                Ok(Ok(0)) | Ok(Err(_)) => return Next::Closed,
                Ok(Ok(n)) => self.decoder.feed(&buf[..n]),
            }
        }
    }

    async fn perform<S>(&mut self, mut action: Action, io: &mut S) -> Flow
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        loop {
            match action {
                Action::Reply(r) => {
                    r.serialize(&mut self.out);
                    return Flow::Continue;
                }
                Action::Close(r) => {
                    r.serialize(&mut self.out);
                    return Flow::Close;
                }
                Action::StartTls(r) => {
                    r.serialize(&mut self.out);
                    return Flow::StartTls;
                }
                Action::Login { user, password } => {
                    let max = self.limits().max_auth_failures_per_ip;
                    let client = client_key(self.peer.ip());
                    if !self.shared.auth_limiter.check(client, Instant::now()) {
                        // Refused without asking the store, so guessing gets nowhere; counted,
                        // so the delay keeps growing while the client keeps trying.
                        let n = self
                            .shared
                            .auth_limiter
                            .record(client, Instant::now())
                            .count;
                        metrics::counter(
                            "mailsuite_pop3_logins_total",
                            &[("result", "ip_blocked")],
                        )
                        .inc();
                        tracing::info!(
                            failures = n,
                            "login refused: too many failures from this address"
                        );
                        let delay = self.limits().auth_failure_delay(n - max + 1);
                        let reply = Reply::err_code(
                            RespCode::LoginDelay,
                            "too many failed logins from your address, try again later",
                        );
                        return self.delayed(io, delay, reply, true).await;
                    }
                    let result = self.login(&user, &password).await;
                    action = self.session.login_done(result);
                }
                Action::AuthFailed { reply, close } => {
                    metrics::auth_failure("pop3");
                    metrics::counter("mailsuite_pop3_logins_total", &[("result", "failed")]).inc();
                    let ip_failures = self
                        .shared
                        .auth_limiter
                        .record(client_key(self.peer.ip()), Instant::now())
                        .count;
                    let max = self.limits().max_auth_failures_per_ip;
                    tracing::info!(
                        failures = self.session.auth_failures(),
                        ip_failures,
                        "authentication failed"
                    );
                    // The delay grows with the failures of this connection and of this
                    // address, whichever is more.
                    let delay = self
                        .limits()
                        .auth_failure_delay(self.session.auth_failures().max(ip_failures));
                    let close = close || (max > 0 && ip_failures >= max);
                    return self.delayed(io, delay, reply, close).await;
                }
                Action::Send {
                    reply,
                    target,
                    uid,
                    top,
                } => {
                    if top.is_none() {
                        self.read_ahead(target, uid).await;
                    }
                    return self.send(io, reply, target, uid, top).await;
                }
                Action::Update {
                    target,
                    deleted,
                    seen,
                } => {
                    let timeout = Duration::from_secs(self.limits().store_timeout_secs.max(1));
                    let lost = match self.lock.as_mut() {
                        Some(l) => B::lock_lost(l).now_or_never().is_some(),
                        None => true,
                    };
                    let result = if lost {
                        metrics::counter("mailsuite_pop3_locks_lost_total", &[]).inc();
                        Err("the maildrop lock was lost; nothing was removed".to_string())
                    } else {
                        match tokio::time::timeout(
                            timeout * 2,
                            self.shared.backend.update(target, &deleted, &seen),
                        )
                        .await
                        {
                            Ok(r) => r.map_err(|f| f.to_string()),
                            Err(_) => Err("mail store timed out".to_string()),
                        }
                    };
                    if result.is_ok() {
                        metrics::counter("mailsuite_pop3_messages_deleted_total", &[])
                            .add(deleted.len() as u64);
                    }
                    tracing::info!(deleted = deleted.len(), ok = result.is_ok(), "UPDATE");
                    // RFC 1939 §6: the lock is released once UPDATE is over.
                    self.lock = None;
                    action = self.session.update_done(result);
                }
            }
        }
    }

    /// Send earlier replies now, then `reply` after `delay` (and close if asked).
    async fn delayed<S>(&mut self, io: &mut S, delay: Duration, reply: Reply, close: bool) -> Flow
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        if self.write(io).await.is_err() {
            return Flow::Abort;
        }
        let shutdown = self.shared.shutdown.clone();
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.stopping() => {
                Reply::err_code(RespCode::SysTemp, "server shutting down").serialize(&mut self.out);
                return Flow::Close;
            }
        }
        reply.serialize(&mut self.out);
        if close { Flow::Close } else { Flow::Continue }
    }

    async fn login(&mut self, user: &str, password: &str) -> Result<Maildrop, LoginError> {
        let timeout = Duration::from_secs(self.limits().store_timeout_secs.max(1));
        // Several store calls (authenticate, lock, select, fetch), each bounded on its own.
        let result = match tokio::time::timeout(
            timeout * 4,
            self.shared.backend.login(user, password, self.peer.ip()),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(LoginError::Temporary("mail store timed out".into())),
        };
        let result = match result {
            Ok((md, _lock)) if !self.shared.login_allowed(md.account_id) => {
                Err(LoginError::LoginDelay)
            }
            Ok((md, lock)) => {
                self.lock = Some(lock);
                Ok(md)
            }
            Err(e) => Err(e),
        };
        let label = match &result {
            Ok(md) => {
                tracing::info!(
                    account = md.account_id,
                    messages = md.messages.len(),
                    "logged in"
                );
                "ok"
            }
            Err(LoginError::BadCredentials) => return result,
            Err(LoginError::InUse) => "in_use",
            Err(LoginError::LoginDelay) => "login_delay",
            Err(LoginError::Temporary(_) | LoginError::Permanent(_)) => "error",
        };
        metrics::counter("mailsuite_pop3_logins_total", &[("result", label)]).inc();
        result
    }

    /// Before RETR `uid`: when more RETRs are already waiting in the input, read this message
    /// and theirs from the store in one call (small ones only, bounded in count and bytes),
    /// instead of one serial store round trip per RETR. Only reads: every command is still
    /// executed by the session in order, so a DELE in between or an unknown number behaves
    /// exactly as without it. A failure here costs nothing but the attempt: each RETR then
    /// reads its message itself and reports its own error.
    async fn read_ahead(&mut self, target: Target, uid: u32) {
        let limits = self.limits();
        let (max_n, per_message, max_bytes) = (
            limits.prefetch_messages,
            limits.prefetch_message_bytes,
            limits.prefetch_bytes,
        );
        if max_n < 2 || self.ahead.contains_key(&uid) {
            return;
        }
        // The lines already received after this one (the decoder bounds what it holds).
        while self.pending.len() < max_n {
            match self.decoder.next_line() {
                Some(line) => self.pending.push_back(line),
                None => break,
            }
        }
        let Some(md) = self.session.maildrop() else {
            return;
        };
        let size_of = |uid: u32| {
            md.messages
                .binary_search_by_key(&uid, |m| m.uid)
                .ok()
                .map(|i| md.messages[i].size)
                .or_else(|| md.messages.iter().find(|m| m.uid == uid).map(|m| m.size))
        };
        let mut uids: Vec<u32> = Vec::new();
        let mut bytes = 0u64;
        let upcoming = self
            .pending
            .iter()
            .filter_map(|l| self.session.peek_retr(l));
        for (u, size) in size_of(uid).map(|s| (uid, s)).into_iter().chain(upcoming) {
            if uids.len() >= max_n {
                break;
            }
            if size <= per_message && bytes + size <= max_bytes && !uids.contains(&u) {
                uids.push(u);
                bytes += size;
            }
        }
        if uids.len() < 2 {
            return;
        }
        let timeout = Duration::from_secs(self.limits().store_timeout_secs.max(1));
        match tokio::time::timeout(timeout, self.shared.backend.bodies(target, uids, max_bytes))
            .await
        {
            // The previous batch goes: memory stays within one batch.
            Ok(Ok(found)) => self.ahead = found.into_iter().collect(),
            Ok(Err(f)) => tracing::debug!(error = %f, "reading pipelined RETRs ahead failed"),
            Err(_) => tracing::debug!("reading pipelined RETRs ahead timed out"),
        }
    }

    /// RETR and TOP: the `+OK` line goes out only once the first chunk is in hand, so a
    /// store failure can still be answered with `-ERR`. A failure later leaves the reply
    /// without its terminating `.` and closes the connection: the client cannot mistake a
    /// truncated message for a whole one.
    async fn send<S>(
        &mut self,
        io: &mut S,
        reply: Reply,
        target: Target,
        uid: u32,
        top: Option<u32>,
    ) -> Flow
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        if top.is_none()
            && let Some(data) = self.ahead.remove(&uid)
        {
            reply.serialize(&mut self.out);
            let mut enc = BodyEncoder::full();
            enc.push(&data, &mut self.out);
            enc.finish(&mut self.out);
            metrics::counter("mailsuite_pop3_messages_sent_total", &[("command", "RETR")]).inc();
            metrics::counter("mailsuite_pop3_messages_read_ahead_total", &[]).inc();
            if self.out.len() >= WRITE_CHUNK && self.write(io).await.is_err() {
                return Flow::Abort;
            }
            return Flow::Continue;
        }
        let timeout = Duration::from_secs(self.limits().store_timeout_secs.max(1));
        let backend = &self.shared.backend;
        let open = async {
            let mut stream = backend.body(target, uid).await?;
            let first = stream.next().await.unwrap_or(Err(Failure::Gone))?;
            Ok::<_, Failure>((stream, first))
        };
        let (mut stream, first) = match tokio::time::timeout(timeout, open).await {
            Ok(Ok(s)) => s,
            Ok(Err(f)) => {
                failure_reply(&f).serialize(&mut self.out);
                return Flow::Continue;
            }
            Err(_) => {
                Reply::err_code(RespCode::SysTemp, "mail store timed out").serialize(&mut self.out);
                return Flow::Continue;
            }
        };
        reply.serialize(&mut self.out);
        let mut enc = top.map_or_else(BodyEncoder::full, BodyEncoder::top);
        enc.push(&first, &mut self.out);
        while !enc.is_done() {
            if self.out.len() >= WRITE_CHUNK && self.write(io).await.is_err() {
                return Flow::Abort;
            }
            match tokio::time::timeout(timeout, stream.next()).await {
                Ok(Some(Ok(data))) => enc.push(&data, &mut self.out),
                Ok(None) => break,
                Ok(Some(Err(f))) => {
                    tracing::warn!(uid, error = %f, "message stream failed midway");
                    return Flow::Abort;
                }
                Err(_) => {
                    tracing::warn!(uid, "message stream stalled");
                    return Flow::Abort;
                }
            }
        }
        // TOP may stop early: dropping the stream cancels the rest of the transfer.
        drop(stream);
        enc.finish(&mut self.out);
        let command = if top.is_some() { "TOP" } else { "RETR" };
        metrics::counter(
            "mailsuite_pop3_messages_sent_total",
            &[("command", command)],
        )
        .inc();
        Flow::Continue
    }

    /// Write out what is buffered, under the write timeout.
    async fn write<S>(&mut self, io: &mut S) -> std::io::Result<()>
    where
        S: AsyncWrite + Unpin,
    {
        if self.out.is_empty() {
            return Ok(());
        }
        let timeout = Duration::from_secs(self.limits().write_timeout_secs.max(1));
        let r = tokio::time::timeout(timeout, async {
            io.write_all(&self.out).await?;
            io.flush().await
        })
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
        self.out.clear();
        r
    }

    async fn close<S>(&mut self, io: &mut S)
    where
        S: AsyncWrite + Unpin,
    {
        if self.write(io).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(5), io.shutdown()).await;
        }
    }
}

/// Resolves when the session's maildrop lock is lost; never while there is none.
async fn lock_lost<B: Backend>(lock: &mut Option<B::Lock>) {
    match lock {
        Some(l) => B::lock_lost(l).await,
        None => std::future::pending().await,
    }
}

fn failure_reply(f: &Failure) -> Reply {
    match f {
        Failure::Temporary(m) => Reply::err_code(RespCode::SysTemp, m.clone()),
        Failure::Permanent(m) => Reply::err_code(RespCode::SysPerm, m.clone()),
        Failure::Gone => Reply::err("message no longer exists"),
    }
}
