//! The SMTP state machine: (state, command) → reply + what the connection must do next.
//! Every sequence rule (RCPT before MAIL, AUTH before MAIL on submission, STARTTLS before
//! AUTH ...) lives here, in one place. Lookups and the hand-off go through `Backend`, so the
//! whole table is tested without sockets.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use mailsuite_proto::{
    AddressKind, DeliverHeader, DsnRet, EnqueueHeader, EnvelopeRecipient, RecipientStatus,
    ResolvedRecipient,
};
use smtp_proto as sp;

use crate::backend::Backend;
use crate::budget::{BodyBudget, Exhausted, Reservation};
use crate::codec::{BodyEnd, Command, CommandError, MailFrom, RcptTo, Terminal, xtext_encode};
use crate::config::Config;
use crate::config::IprevPolicy;
use crate::limits::RateLimiter;
use crate::reply::{Reply, lookup_error, service_error};
use crate::verify::{Iprev, IprevStatus, Verifier};

/// Which listener the connection came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    /// 25: inbound for hosted domains.
    Mx,
    /// 587: STARTTLS, then AUTH, then MAIL.
    Submission,
    /// 465: implicit TLS.
    Submissions,
}

/// The TLS parameters of the connection, for the Received header.
pub use mailsuite_runtime::stream::TlsInfo;

/// State shared by all sessions of a server.
pub struct Shared<B> {
    pub config: Config,
    pub backend: B,
    pub rates: RateLimiter,
    pub verifier: Option<Verifier>,
    pub tls_available: bool,
    /// Body bytes all sessions may hold at once (`limits.max_body_bytes_in_flight`).
    pub body_budget: BodyBudget,
    /// Which sender domains are ours (`policy.local_domain_cache_secs`).
    pub local_domains: crate::domains::DomainCache,
}

/// What the connection does after sending the reply (if any).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    Continue,
    /// Send the reply, then close.
    Close,
    /// Send the reply, drop any pipelined input, then run the TLS handshake.
    StartTls,
    /// Send the 354, then read a DATA body and call `data_end`.
    Data,
    /// Read `size` octets (no reply yet), then call `bdat_end`.
    Bdat {
        size: u64,
        last: bool,
    },
    /// Send the 334 challenge, then read one line and call `auth_line`.
    AuthLine,
    /// Wait this long before sending the reply (AUTH failure back-off).
    Delay(Duration),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub reply: Option<Reply>,
    pub next: Next,
}

impl Outcome {
    fn reply(r: Reply) -> Outcome {
        Outcome {
            reply: Some(r),
            next: Next::Continue,
        }
    }
    fn then(r: Reply, next: Next) -> Outcome {
        Outcome {
            reply: Some(r),
            next,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Authenticated {
    pub id: i64,
    pub address: String,
}

#[derive(Debug, Clone)]
struct Recipient {
    address: String,
    notify: Vec<String>,
    orcpt: String,
    remote: bool,
    /// What the directory said at RCPT, handed to the store so it need not ask again.
    resolved: ResolvedRecipient,
}

#[derive(Debug)]
struct Transaction {
    from: MailFrom<String>,
    terminal: Option<Terminal>,
    rcpts: Vec<Recipient>,
    /// BDAT chunks received so far.
    bdat: Option<Vec<u8>>,
    bdat_total: u64,
    /// The body bytes held from the process-wide budget, until the transaction ends.
    reservation: Reservation,
    /// The budget ran out during this body: nothing more is kept, and it ends with `452`.
    over_budget: bool,
}

#[derive(Debug, Clone)]
enum AuthStep {
    PlainResponse,
    LoginUser,
    LoginPass(String),
}

pub struct Session<B> {
    shared: Arc<Shared<B>>,
    port: Port,
    peer: SocketAddr,
    tls: Option<TlsInfo>,
    helo: Option<(String, bool)>,
    auth: Option<Authenticated>,
    /// The iprev check of the client, done at the first MAIL on the MX port and kept for
    /// the connection (STARTTLS does not change the peer).
    iprev: Option<Iprev>,
    tx: Option<Transaction>,
    auth_step: Option<AuthStep>,
    /// A BDAT chunk that will be refused once read.
    bdat_refusal: Option<Reply>,
    messages: u32,
    errors: u32,
    queue_seq: u32,
    session_id: String,
}

const HELP: &str = "Commands: HELO EHLO MAIL RCPT DATA BDAT RSET NOOP QUIT HELP VRFY EXPN \
                    SEND SOML SAML TURN ETRN STARTTLS AUTH";

impl<B: Backend> Session<B> {
    pub fn new(shared: Arc<Shared<B>>, port: Port, peer: SocketAddr, tls: Option<TlsInfo>) -> Self {
        Session {
            shared,
            port,
            peer,
            tls,
            helo: None,
            auth: None,
            iprev: None,
            tx: None,
            auth_step: None,
            bdat_refusal: None,
            messages: 0,
            errors: 0,
            queue_seq: 0,
            // The queue id (session id + sequence) is the idempotency key of the hand-off:
            // it must be unique across sessions and replicas, so all 122 random bits.
            session_id: uuid::Uuid::new_v4().simple().to_string().to_uppercase(),
        }
    }

    fn cfg(&self) -> &Config {
        &self.shared.config
    }

    pub fn greeting(&self) -> Reply {
        Reply::raw(
            220,
            vec![format!("{} ESMTP mailsuite ready", self.cfg().hostname)],
        )
    }

    /// After a successful STARTTLS handshake: everything learnt before it is forgotten
    /// (RFC 3207 §4.2).
    pub fn tls_established(&mut self, info: TlsInfo) {
        self.tls = Some(info);
        self.helo = None;
        self.auth = None;
        self.tx = None;
        self.auth_step = None;
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    pub fn authenticated(&self) -> Option<&Authenticated> {
        self.auth.as_ref()
    }

    pub fn max_message_bytes(&self) -> u64 {
        self.cfg().limits.max_message_bytes
    }

    /// The body size the client declared with MAIL FROM's SIZE= (RFC 1870), within the
    /// limit; 0 when it declared none. The DATA reader sizes its buffer by it, plus room for
    /// the trace fields put in front, so the body is not re-copied as the buffer grows.
    pub fn declared_size(&self) -> u64 {
        let declared = self.tx.as_ref().map_or(0, |t| t.from.size as u64);
        declared.min(self.max_message_bytes())
    }

    /// A protocol error: counted, and past the limit the connection ends with `421`.
    fn error(&mut self, r: Reply) -> Outcome {
        self.errors += 1;
        if self.errors > self.cfg().limits.max_errors {
            return Outcome::then(
                Reply::new(421, "4.7.0", "Too many errors, closing connection"),
                Next::Close,
            );
        }
        Outcome::reply(r)
    }

    fn bad_sequence(&mut self, text: &str) -> Outcome {
        self.error(Reply::new(503, "5.5.1", text))
    }

    /// A line the codec could not turn into a command.
    pub fn bad_command(&mut self, e: CommandError) -> Outcome {
        let r = match e {
            CommandError::Unknown => Reply::new(500, "5.5.2", "Command not recognized"),
            CommandError::Syntax(s) => Reply::new(501, "5.5.4", format!("Syntax: {s}")),
            CommandError::BadSender => Reply::new(501, "5.1.7", "Bad sender address syntax"),
            CommandError::BadRecipient => Reply::new(501, "5.1.3", "Bad recipient address syntax"),
            CommandError::UnsupportedParameter(p) => {
                Reply::new(555, "5.5.4", format!("Unsupported parameter {p}"))
            }
            CommandError::LineTooLong => Reply::new(500, "5.5.2", "Line too long"),
            CommandError::AuthLineTooLong => {
                Reply::new(500, "5.5.6", "Authentication Exchange line is too long")
            }
        };
        self.error(r)
    }

    /// The answer to a 334 challenge was longer than the AUTH line limit: the exchange is
    /// over (RFC 4954 §6, `500 5.5.6`).
    pub fn auth_line_too_long(&mut self) -> Outcome {
        self.auth_step = None;
        self.bad_command(CommandError::AuthLineTooLong)
    }

    /// The goodbye for a server shutting down.
    pub fn shutdown_reply(&self) -> Reply {
        Reply::new(
            421,
            "4.3.2",
            format!("{} Service shutting down", self.cfg().hostname),
        )
    }

    fn tls_offered(&self) -> bool {
        self.shared.tls_available && self.tls.is_none()
    }

    fn auth_allowed(&self) -> bool {
        self.tls.is_some()
            || (self.shared.config.auth.allow_plaintext_loopback && self.peer.ip().is_loopback())
    }

    fn ehlo_reply(&self, host: &str) -> Reply {
        let l = &self.cfg().limits;
        let mut lines = vec![
            format!("{} Hello {host} [{}]", self.cfg().hostname, self.peer.ip()),
            "PIPELINING".into(),
            format!("SIZE {}", l.max_message_bytes),
            "8BITMIME".into(),
            "SMTPUTF8".into(),
            "ENHANCEDSTATUSCODES".into(),
            "CHUNKING".into(),
            "BINARYMIME".into(),
            "DSN".into(),
            "HELP".into(),
        ];
        if self.cfg().policy.etrn && self.etrn_permitted() {
            lines.push("ETRN".into());
        }
        if self.cfg().policy.vrfy {
            lines.push("VRFY".into());
        }
        if self.cfg().policy.expn {
            lines.push("EXPN".into());
        }
        if self.tls_offered() {
            lines.push("STARTTLS".into());
        }
        if self.is_submission() && self.auth_allowed() && self.auth.is_none() {
            lines.push("AUTH PLAIN LOGIN".into());
        }
        Reply::raw(250, lines)
    }

    /// Handle one command.
    pub async fn command(&mut self, cmd: Command) -> Outcome {
        match cmd {
            Command::Helo(host) => {
                self.helo = Some((host.clone(), false));
                self.tx = None;
                Outcome::reply(Reply::raw(
                    250,
                    vec![format!("{} Hello {host}", self.cfg().hostname)],
                ))
            }
            Command::Ehlo(host) => {
                let r = self.ehlo_reply(&host);
                self.helo = Some((host, true));
                self.tx = None;
                Outcome::reply(r)
            }
            Command::Rset => {
                self.tx = None;
                Outcome::reply(Reply::new(250, "2.0.0", "OK"))
            }
            Command::Noop => Outcome::reply(Reply::new(250, "2.0.0", "OK")),
            Command::Quit => Outcome::then(
                Reply::new(
                    221,
                    "2.0.0",
                    format!("{} closing connection", self.cfg().hostname),
                ),
                Next::Close,
            ),
            // RFC 5321's 211 "system status": the state of this session, nothing about others.
            Command::Help(arg) if arg.trim().eq_ignore_ascii_case("STATUS") => {
                Outcome::reply(Reply::multi(
                    211,
                    "2.0.0",
                    [
                        format!("{} status", self.cfg().hostname),
                        format!("TLS: {}", if self.tls.is_some() { "yes" } else { "no" }),
                        format!(
                            "Authenticated: {}",
                            if self.auth.is_some() { "yes" } else { "no" }
                        ),
                        format!("Messages accepted in this session: {}", self.messages),
                    ],
                ))
            }
            Command::Help(_) => Outcome::reply(Reply::multi(
                214,
                "2.0.0",
                [
                    HELP.to_string(),
                    "HELP STATUS shows this session's state".to_string(),
                ],
            )),
            Command::Turn => self.error(Reply::new(
                502,
                "5.5.1",
                "TURN is not supported (RFC 2645: unauthenticated role reversal)",
            )),
            Command::StartTls => self.starttls(),
            Command::Auth { mechanism, initial } => self.auth_start(mechanism, initial).await,
            Command::Mail(from) => self.mail(from, None).await,
            Command::Send(t, from) => self.mail(from, Some(t)).await,
            Command::Rcpt(to) => self.rcpt(to).await,
            Command::Data => self.data(),
            Command::Bdat { size, last } => self.bdat(size, last),
            Command::Vrfy(v) => self.vrfy(&v).await,
            Command::Expn(v) => self.expn(&v).await,
            Command::Etrn(d) => self.etrn(&d).await,
        }
    }

    fn starttls(&mut self) -> Outcome {
        if self.tls.is_some() {
            return self.bad_sequence("Already in TLS");
        }
        if !self.shared.tls_available {
            return self.error(Reply::new(454, "4.7.0", "TLS not available"));
        }
        if self.tx.is_some() {
            return self.bad_sequence("STARTTLS not allowed in a mail transaction");
        }
        Outcome::then(
            Reply::new(220, "2.0.0", "Ready to start TLS"),
            Next::StartTls,
        )
    }

    async fn auth_start(&mut self, mechanism: u64, initial: String) -> Outcome {
        // AUTH exists only for submission (RFC 6409 §3.1 keeps MX and submission apart): on
        // the MX port it is not advertised, so the command is out of place there (RFC 4954 §4
        // leaves the unadvertised case to the server; Postfix answers the same).
        if !self.is_submission() {
            return self.bad_sequence("Authentication not enabled on this port; use submission");
        }
        if self.helo.as_ref().is_none_or(|h| !h.1) {
            return self.bad_sequence("Send EHLO first");
        }
        if self.auth.is_some() {
            return self.bad_sequence("Already authenticated");
        }
        if self.tx.is_some() {
            return self.bad_sequence("AUTH not allowed in a mail transaction");
        }
        if !self.auth_allowed() {
            return self.error(Reply::new(
                538,
                "5.7.11",
                "Encryption required for requested authentication mechanism",
            ));
        }
        match mechanism {
            sp::AUTH_PLAIN => {
                if initial.is_empty() {
                    self.auth_step = Some(AuthStep::PlainResponse);
                    Outcome::then(Reply::raw(334, vec![String::new()]), Next::AuthLine)
                } else if initial == "=" {
                    self.auth_plain(b"").await
                } else {
                    match B64.decode(initial.as_bytes()) {
                        Ok(d) => self.auth_plain(&d).await,
                        Err(_) => self.error(Reply::new(501, "5.5.2", "Invalid base64")),
                    }
                }
            }
            sp::AUTH_LOGIN => {
                if initial.is_empty() {
                    self.auth_step = Some(AuthStep::LoginUser);
                    Outcome::then(
                        Reply::raw(334, vec![B64.encode("Username:")]),
                        Next::AuthLine,
                    )
                } else {
                    match B64.decode(initial.as_bytes()).map(String::from_utf8) {
                        Ok(Ok(u)) => {
                            self.auth_step = Some(AuthStep::LoginPass(u));
                            Outcome::then(
                                Reply::raw(334, vec![B64.encode("Password:")]),
                                Next::AuthLine,
                            )
                        }
                        _ => self.error(Reply::new(501, "5.5.2", "Invalid base64")),
                    }
                }
            }
            _ => self.error(Reply::new(504, "5.5.4", "Unrecognized authentication type")),
        }
    }

    /// The client's answer to a 334 challenge.
    pub async fn auth_line(&mut self, line: &[u8]) -> Outcome {
        let Some(step) = self.auth_step.take() else {
            return self.bad_sequence("No AUTH in progress");
        };
        if line == b"*" {
            return self.error(Reply::new(501, "5.0.0", "Authentication cancelled"));
        }
        let Ok(decoded) = B64.decode(line) else {
            return self.error(Reply::new(501, "5.5.2", "Invalid base64"));
        };
        match step {
            AuthStep::PlainResponse => self.auth_plain(&decoded).await,
            AuthStep::LoginUser => match String::from_utf8(decoded) {
                Ok(u) => {
                    self.auth_step = Some(AuthStep::LoginPass(u));
                    Outcome::then(
                        Reply::raw(334, vec![B64.encode("Password:")]),
                        Next::AuthLine,
                    )
                }
                Err(_) => self.error(Reply::new(501, "5.5.2", "Invalid user name")),
            },
            AuthStep::LoginPass(user) => match String::from_utf8(decoded) {
                Ok(p) => self.auth_check(&user, &p).await,
                Err(_) => self.error(Reply::new(501, "5.5.2", "Invalid password encoding")),
            },
        }
    }

    async fn auth_plain(&mut self, msg: &[u8]) -> Outcome {
        // authzid NUL authcid NUL passwd (RFC 4616)
        let mut parts = msg.split(|b| *b == 0);
        let (Some(authz), Some(user), Some(pass), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return self.error(Reply::new(501, "5.5.2", "Malformed PLAIN response"));
        };
        let (Ok(authz), Ok(user), Ok(pass)) = (
            std::str::from_utf8(authz),
            std::str::from_utf8(user),
            std::str::from_utf8(pass),
        ) else {
            return self.error(Reply::new(501, "5.5.2", "Malformed PLAIN response"));
        };
        if !authz.is_empty() && !authz.eq_ignore_ascii_case(user) {
            return self.error(Reply::new(
                535,
                "5.7.8",
                "Authorization identity not allowed",
            ));
        }
        self.auth_check(user, pass).await
    }

    async fn auth_check(&mut self, user: &str, pass: &str) -> Outcome {
        let ip = self.peer.ip();
        let limits = &self.shared.config.limits;
        if self.shared.rates.auth_blocked(ip) {
            return Outcome::then(
                Reply::new(421, "4.7.0", "Too many authentication failures"),
                Next::Close,
            );
        }
        match self
            .shared
            .backend
            .authenticate(user, pass, &ip.to_string())
            .await
        {
            Ok(Some(acct)) => {
                self.auth = Some(Authenticated {
                    id: acct.id,
                    address: acct.address,
                });
                Outcome::reply(Reply::new(235, "2.7.0", "Authentication successful"))
            }
            Ok(None) => {
                mailsuite_runtime::metrics::auth_failure("smtp");
                let n = self.shared.rates.auth_failed(ip);
                self.errors += 1;
                let delay = Duration::from_millis(
                    (limits.auth_failure_delay_ms.saturating_mul(n as u64)).min(5000),
                );
                if n > limits.max_auth_failures_per_ip {
                    return Outcome::then(
                        Reply::new(421, "4.7.0", "Too many authentication failures"),
                        Next::Close,
                    );
                }
                Outcome {
                    reply: Some(Reply::new(
                        535,
                        "5.7.8",
                        "Authentication credentials invalid",
                    )),
                    next: Next::Delay(delay),
                }
            }
            Err(e) => Outcome::reply(Reply::new(
                454,
                "4.7.0",
                format!("Temporary authentication failure ({})", short(&e)),
            )),
        }
    }

    fn is_submission(&self) -> bool {
        self.port != Port::Mx
    }

    async fn mail(&mut self, from: MailFrom<String>, terminal: Option<Terminal>) -> Outcome {
        if let Some(_t) = terminal
            && (!self.cfg().policy.terminal_commands
                || !self.is_submission()
                || self.auth.is_none())
        {
            return self.error(Reply::new(
                502,
                "5.5.1",
                "SEND/SOML/SAML only for authenticated submission",
            ));
        }
        if self.helo.is_none() {
            return self.bad_sequence("Send HELO/EHLO first");
        }
        if self.tx.is_some() {
            return self.bad_sequence("Nested MAIL command");
        }
        if self.port == Port::Submission && self.tls.is_none() && !self.auth_allowed() {
            return self.error(Reply::new(
                530,
                "5.7.0",
                "Must issue a STARTTLS command first",
            ));
        }
        if self.is_submission() && self.auth.is_none() {
            return self.error(Reply::new(530, "5.7.0", "Authentication required"));
        }
        if let Some(r) = self.check_iprev().await {
            return Outcome::reply(r);
        }
        let limits = &self.shared.config.limits;
        if self.messages >= limits.max_messages_per_session {
            return Outcome::then(
                Reply::new(421, "4.7.0", "Too many messages in this session"),
                Next::Close,
            );
        }
        if from.size as u64 > limits.max_message_bytes {
            return Outcome::reply(Reply::new(552, "5.3.4", "Message size exceeds fixed limit"));
        }
        if !self.shared.rates.message_allowed(self.peer.ip()) {
            return Outcome::reply(Reply::new(450, "4.7.1", "Rate limit exceeded, try later"));
        }
        let esmtp = self.helo.as_ref().is_some_and(|h| h.1);
        if !esmtp && (from.flags != 0 || from.size != 0 || from.env_id.is_some()) {
            return self.error(Reply::new(555, "5.5.4", "Parameters require EHLO"));
        }
        if !from.address.is_ascii() && from.flags & sp::MAIL_SMTPUTF8 == 0 {
            return Outcome::reply(Reply::new(
                553,
                "5.6.7",
                "Non-ASCII address requires SMTPUTF8",
            ));
        }
        if let Some(auth) = &self.auth {
            if from.address.is_empty() {
                // The null reverse-path is what a user's MUA or filter uses for bounces,
                // MDNs (RFC 8098 §2.1) and vacation replies: allowed, and logged because no
                // ownership check applies to it.
                tracing::info!(
                    account = auth.id,
                    user = %auth.address,
                    peer = %self.peer.ip(),
                    "authenticated submission with the null reverse-path MAIL FROM:<>"
                );
            } else {
                match self
                    .shared
                    .backend
                    .check_sender(auth.id, &from.address)
                    .await
                {
                    Ok(true) => {}
                    Ok(false) => {
                        return Outcome::reply(Reply::new(
                            553,
                            "5.7.1",
                            format!("Sender address <{}> not owned by you", from.address),
                        ));
                    }
                    Err(e) => return Outcome::reply(lookup_error(&e)),
                }
            }
        } else if self.cfg().policy.reject_unauthenticated_local_sender && !from.address.is_empty()
        {
            let domain = from.address.rsplit_once('@').map(|(_, d)| d);
            let known = domain.and_then(|d| self.shared.local_domains.hosted(d));
            let hosted = match known {
                Some(h) => h,
                None => match self.shared.backend.resolve(&from.address).await {
                    // Remote means exactly: the domain is not hosted here.
                    Ok(r) => {
                        let h = r.kind() != AddressKind::Remote;
                        if let Some(d) = domain {
                            self.shared.local_domains.learn(d, h);
                        }
                        h
                    }
                    Err(e) => return Outcome::reply(lookup_error(&e)),
                },
            };
            if hosted {
                return Outcome::reply(Reply::new(
                    553,
                    "5.7.1",
                    "Sender address of a local domain requires authentication",
                ));
            }
        }
        self.tx = Some(Transaction {
            from,
            terminal,
            rcpts: Vec::new(),
            bdat: None,
            bdat_total: 0,
            reservation: Reservation::default(),
            over_budget: false,
        });
        Outcome::reply(Reply::new(250, "2.1.0", "Sender OK"))
    }

    /// iprev for an unauthenticated MX client, once per connection, and what the policy makes
    /// of a failure (RFC 7372: `4.7.25` / `5.7.25`). `None`: go on.
    async fn check_iprev(&mut self) -> Option<Reply> {
        if self.port != Port::Mx || self.auth.is_some() {
            return None;
        }
        let v = self.shared.verifier.as_ref()?;
        if self.iprev.is_none() {
            let iprev = v.iprev(self.peer.ip()).await;
            let result = match iprev.status() {
                IprevStatus::Pass => "pass",
                IprevStatus::Fail => "fail",
                IprevStatus::TempError => "temperror",
                IprevStatus::PermError => "permerror",
            };
            mailsuite_runtime::metrics::counter(
                "mailsuite_smtp_iprev_total",
                &[("result", result)],
            )
            .inc();
            tracing::debug!(peer = %self.peer.ip(), result = ?iprev.status(), name = ?iprev.name, "iprev");
            self.iprev = Some(iprev);
        }
        let status = self.iprev.as_ref()?.status();
        match (self.cfg().policy.iprev, status) {
            (IprevPolicy::Record, _) | (_, IprevStatus::Pass) => None,
            (IprevPolicy::Reject, IprevStatus::Fail | IprevStatus::PermError) => Some(Reply::new(
                550,
                "5.7.25",
                format!("Reverse DNS validation failed for {}", self.peer.ip()),
            )),
            (_, IprevStatus::TempError) => Some(Reply::new(
                450,
                "4.7.25",
                format!(
                    "Reverse DNS validation of {} failed temporarily, try again later",
                    self.peer.ip()
                ),
            )),
            (IprevPolicy::Tempfail, _) => Some(Reply::new(
                450,
                "4.7.25",
                format!("Reverse DNS validation failed for {}", self.peer.ip()),
            )),
        }
    }

    async fn rcpt(&mut self, to: RcptTo<String>) -> Outcome {
        let Some(tx) = &self.tx else {
            return self.bad_sequence("Need MAIL before RCPT");
        };
        if tx.bdat.is_some() {
            return self.bad_sequence("RCPT not allowed during BDAT");
        }
        let terminal = tx.terminal;
        if !to.address.is_ascii() && tx.from.flags & sp::MAIL_SMTPUTF8 == 0 {
            return Outcome::reply(Reply::new(
                553,
                "5.6.7",
                "Non-ASCII address requires SMTPUTF8",
            ));
        }
        if tx.rcpts.len() >= self.cfg().limits.max_recipients {
            return Outcome::reply(Reply::new(452, "4.5.3", "Too many recipients"));
        }
        let esmtp = self.helo.as_ref().is_some_and(|h| h.1);
        if !esmtp && (to.flags != 0 || to.orcpt.is_some()) {
            return self.error(Reply::new(555, "5.5.4", "Parameters require EHLO"));
        }
        let mut to = to;
        if to.address == "postmaster" {
            match self.postmaster().await {
                Ok(Some(a)) => to.address = a,
                Ok(None) => {
                    tracing::warn!(
                        hostname = %self.cfg().hostname,
                        "RCPT TO:<postmaster> but no postmaster address: set policy.postmaster"
                    );
                    return Outcome::reply(Reply::new(550, "5.1.1", "<postmaster>: no such user"));
                }
                Err(e) => return Outcome::reply(lookup_error(&e)),
            }
        }
        let r = match self.shared.backend.resolve(&to.address).await {
            Ok(r) => r,
            Err(e) => return Outcome::reply(lookup_error(&e)),
        };
        let addr = &to.address;
        let mut reply = Reply::new(250, "2.1.5", format!("Recipient <{addr}> OK"));
        let remote = match r.kind() {
            AddressKind::Account => {
                if r.over_quota {
                    return Outcome::reply(Reply::new(452, "4.2.2", "Mailbox full"));
                }
                false
            }
            AddressKind::Alias | AddressKind::List => {
                if let Some(t) = r.remote_targets.first()
                    && r.local_targets.is_empty()
                    && r.remote_targets.len() == 1
                {
                    reply = Reply::new(
                        251,
                        "2.1.5",
                        format!("User not local; will forward to <{t}>"),
                    );
                }
                !r.remote_targets.is_empty()
            }
            AddressKind::Unknown | AddressKind::Unspecified => {
                return Outcome::reply(Reply::new(550, "5.1.1", format!("<{addr}>: no such user")));
            }
            AddressKind::Disabled => {
                return Outcome::reply(Reply::new(550, "5.2.1", "Mailbox disabled"));
            }
            AddressKind::Moved => {
                return Outcome::reply(Reply::new(
                    551,
                    "5.1.6",
                    format!("User not local; please try <{}>", r.moved_to),
                ));
            }
            AddressKind::Remote => {
                // Relaying needs an authenticated submission session; the MX never relays,
                // whatever the session state (AUTH is refused there anyway).
                if self.auth.is_none() || !self.is_submission() {
                    return Outcome::reply(Reply::new(554, "5.7.1", "Relay access denied"));
                }
                true
            }
        };
        if terminal.is_some() && (remote || r.kind() != AddressKind::Account) {
            return Outcome::reply(Reply::new(
                550,
                "5.7.1",
                "SEND/SOML/SAML only to local users",
            ));
        }
        // SEND only displays, so a recipient with no open session cannot take it (RFC 821
        // §3.4: 450 to the RCPT); SOML/SAML mail instead. Presence can change before the end of data,
        // which is checked again there.
        if terminal == Some(Terminal::Send) {
            match self.shared.backend.online(addr).await {
                Ok(true) => {}
                Ok(false) => {
                    return Outcome::reply(Reply::new(
                        450,
                        "4.2.1",
                        format!("<{addr}> is not logged in"),
                    ));
                }
                Err(e) => return Outcome::reply(lookup_error(&e)),
            }
        }
        let mut notify = Vec::new();
        for (flag, name) in [
            (sp::RCPT_NOTIFY_NEVER, "NEVER"),
            (sp::RCPT_NOTIFY_SUCCESS, "SUCCESS"),
            (sp::RCPT_NOTIFY_FAILURE, "FAILURE"),
            (sp::RCPT_NOTIFY_DELAY, "DELAY"),
        ] {
            if to.flags & flag != 0 {
                notify.push(name.to_string());
            }
        }
        let orcpt = to
            .orcpt
            .as_deref()
            .map(|o| format!("rfc822;{}", xtext_encode(o)))
            .unwrap_or_default();
        if let Some(tx) = &mut self.tx {
            tx.rcpts.push(Recipient {
                address: to.address,
                notify,
                orcpt,
                remote,
                resolved: ResolvedRecipient {
                    kind: r.kind,
                    local_targets: r.local_targets,
                    remote_targets: r.remote_targets,
                },
            });
        }
        Outcome::reply(reply)
    }

    /// Whose mailbox `RCPT TO:<postmaster>` is (RFC 5321 §4.5.1): `policy.postmaster`, else
    /// the first local `postmaster@` of the hostname and its parent domains (mx.example.org,
    /// then example.org), the way the store resolves any address.
    async fn postmaster(&self) -> Result<Option<String>, mailsuite_runtime::ServiceError> {
        let configured = &self.cfg().policy.postmaster;
        if !configured.is_empty() {
            return Ok(Some(configured.clone()));
        }
        let mut domain = self.cfg().hostname.trim_end_matches('.');
        while domain.contains('.') {
            let candidate = format!("postmaster@{domain}");
            let r = self.shared.backend.resolve(&candidate).await?;
            if !matches!(
                r.kind(),
                AddressKind::Remote | AddressKind::Unknown | AddressKind::Unspecified
            ) {
                return Ok(Some(candidate));
            }
            domain = domain.split_once('.').map_or("", |(_, parent)| parent);
        }
        Ok(None)
    }

    fn data(&mut self) -> Outcome {
        let Some(tx) = &self.tx else {
            return self.bad_sequence("Need MAIL before DATA");
        };
        if tx.rcpts.is_empty() {
            return self.bad_sequence("Need RCPT before DATA");
        }
        if tx.bdat.is_some() {
            return self.bad_sequence("DATA not allowed after BDAT");
        }
        if tx.from.flags & sp::MAIL_BODY_BINARYMIME != 0 {
            return self.bad_sequence("BODY=BINARYMIME requires BDAT");
        }
        Outcome::then(
            Reply::new(354, "2.0.0", "Start mail input; end with <CRLF>.<CRLF>"),
            Next::Data,
        )
    }

    fn bdat(&mut self, size: u64, last: bool) -> Outcome {
        self.bdat_refusal = match &self.tx {
            None => Some(Reply::new(503, "5.5.1", "Need MAIL before BDAT")),
            Some(tx) if tx.rcpts.is_empty() => {
                Some(Reply::new(503, "5.5.1", "Need RCPT before BDAT"))
            }
            Some(_) => None,
        };
        if self.bdat_refusal.is_none()
            && let Some(tx) = &mut self.tx
            && tx.bdat.is_none()
        {
            tx.bdat = Some(Vec::new());
        }
        Outcome {
            reply: None,
            next: Next::Bdat { size, last },
        }
    }

    /// Where the octets of the current BDAT chunk go (None: they are discarded), and the
    /// room left under the size limit.
    pub fn bdat_sink(&mut self) -> Option<&mut Vec<u8>> {
        if self.bdat_refusal.is_some() {
            return None;
        }
        self.tx
            .as_mut()
            .filter(|t| !t.over_budget)
            .and_then(|t| t.bdat.as_mut())
    }

    /// The transaction now keeps `kept` body octets (the DATA reader's body, or the BDAT
    /// body so far): reserve them from the process-wide budget. False when the budget is
    /// exhausted: the transaction gives back what it held, keeps nothing more (the caller
    /// drops what it read), and ends with `452 4.3.1`; other sessions are unaffected.
    pub fn reserve_body(&mut self, kept: u64) -> bool {
        let budget = &self.shared.body_budget;
        let Some(tx) = self.tx.as_mut() else {
            return true;
        };
        if tx.over_budget {
            return false;
        }
        let Err(exhausted) = tx.reservation.cover(budget, self.peer.ip(), kept) else {
            return true;
        };
        tx.over_budget = true;
        tx.reservation.release();
        if let Some(b) = &mut tx.bdat {
            *b = Vec::new();
        }
        let key = match exhausted {
            Exhausted::Total => "limits.max_body_bytes_in_flight",
            Exhausted::Client => "limits.max_body_bytes_in_flight_per_ip",
        };
        mailsuite_runtime::metrics::counter("mailsuite_smtp_body_budget_exhausted_total", &[])
            .inc();
        tracing::warn!(
            peer = %self.peer.ip(),
            "message body budget ({key}) exhausted; answering 452"
        );
        false
    }

    /// A BDAT chunk of `size` octets has been read.
    pub async fn bdat_end(&mut self, size: u64, last: bool) -> Outcome {
        if let Some(r) = self.bdat_refusal.take() {
            return self.error(r);
        }
        let max = self.max_message_bytes();
        let policy = self.cfg().policy.bare_line_end;
        let Some(tx) = &mut self.tx else {
            return self.bad_sequence("Need MAIL before BDAT");
        };
        tx.bdat_total = tx.bdat_total.saturating_add(size);
        if tx.bdat_total > max {
            self.tx = None;
            return Outcome::reply(Reply::new(552, "5.3.4", "Message size exceeds fixed limit"));
        }
        if tx.over_budget {
            // Like the size limit above: the transaction is over (RFC 3030 §3: no more BDAT
            // after a failed chunk; pipelined ones are read and discarded with a 503).
            self.tx = None;
            return Outcome::reply(insufficient_storage());
        }
        if !last {
            return Outcome::reply(Reply::new(250, "2.0.0", format!("{size} octets received")));
        }
        let mut body = tx.bdat.take().unwrap_or_default();
        let mut bare_line_end = false;
        // BINARYMIME bodies are opaque octets; any other BDAT body is a text message and gets
        // the same bare CR/LF policy as DATA, or BDAT would be a way around it (smuggling).
        if tx.from.flags & sp::MAIL_BODY_BINARYMIME == 0 {
            match crate::codec::check_line_ends(&body, policy) {
                crate::codec::LineEnds::Clean => {}
                crate::codec::LineEnds::Bare => bare_line_end = true,
                crate::codec::LineEnds::Normalized(b) => body = b,
            }
        }
        let n = body.len() as u64;
        self.finish_message(
            body,
            BodyEnd {
                size: n,
                too_large: n > max,
                bare_line_end,
            },
        )
        .await
    }

    /// The DATA body has been read to `<CRLF>.<CRLF>`.
    pub async fn data_end(&mut self, body: Vec<u8>, end: BodyEnd) -> Outcome {
        self.finish_message(body, end).await
    }

    /// One message: the `smtp.message` span around the hand-off (the gRPC call into
    /// mailbox-store or relay-queue joins the session's trace), the message metrics, and the
    /// mail log line operators grep: `smtp transaction`, one per message, with the queue id,
    /// the trace id, the client, the envelope, the size and the result.
    async fn finish_message(&mut self, body: Vec<u8>, end: BodyEnd) -> Outcome {
        use tracing::Instrument;
        let started = std::time::Instant::now();
        let size = body.len() as u64;
        let seq_before = self.queue_seq;
        let (from, to, route) = match &self.tx {
            Some(tx) => (
                tx.from.address.clone(),
                tx.rcpts
                    .iter()
                    .map(|r| r.address.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
                if tx.rcpts.iter().any(|r| r.remote) {
                    "relay"
                } else {
                    "local"
                },
            ),
            None => (String::new(), String::new(), ""),
        };
        let span = tracing::info_span!(
            "smtp.message",
            otel.kind = "server",
            size = body.len(),
            code = tracing::field::Empty,
            smtp.route = route,
            smtp.queue_id = tracing::field::Empty,
        );
        let o = self
            .finish_message_inner(body, end)
            .instrument(span.clone())
            .await;
        let queue_id = if self.queue_seq != seq_before {
            format!("{}{:04X}", self.session_id, self.queue_seq)
        } else {
            String::new()
        };
        span.record("smtp.queue_id", queue_id.as_str());
        let accepted = o.reply.as_ref().is_some_and(|r| r.is_positive());
        if accepted {
            mailsuite_runtime::metrics::histogram("mailsuite_smtp_message_size_bytes", &[])
                .record(size as f64);
        }
        let reply = o
            .reply
            .as_ref()
            .map(|r| {
                format!(
                    "{} {}",
                    r.code,
                    r.lines.first().map(String::as_str).unwrap_or("")
                )
            })
            .unwrap_or_default();
        tracing::info!(
            parent: &span,
            queue_id = %queue_id,
            trace_id = %mailsuite_runtime::telemetry::trace_id(&span),
            client_ip = %self.peer.ip(),
            helo = self.helo.as_ref().map(|h| h.0.as_str()).unwrap_or(""),
            tls = self.tls.is_some(),
            auth = self.auth.as_ref().map(|a| a.address.as_str()).unwrap_or(""),
            from = %from,
            to = %to,
            route,
            size,
            result = if accepted { "accepted" } else { "rejected" },
            reply = %reply,
            duration_ms = started.elapsed().as_millis() as u64,
            "smtp transaction"
        );
        if let Some(r) = &o.reply {
            span.record("code", r.code);
            let result = match r.code {
                200..=299 => "accepted",
                400..=499 => "tempfail",
                _ => "rejected",
            };
            mailsuite_runtime::metrics::counter(
                "mailsuite_smtp_messages_received_total",
                &[("result", result)],
            )
            .inc();
        }
        o
    }

    async fn finish_message_inner(&mut self, body: Vec<u8>, end: BodyEnd) -> Outcome {
        let Some(tx) = self.tx.take() else {
            return self.bad_sequence("No transaction");
        };
        if end.too_large {
            return Outcome::reply(Reply::new(552, "5.3.4", "Message size exceeds fixed limit"));
        }
        if tx.over_budget {
            return Outcome::reply(insufficient_storage());
        }
        if end.bare_line_end {
            return Outcome::reply(Reply::new(
                550,
                "5.6.0",
                "Bare CR or LF not allowed in message; use CRLF line endings",
            ));
        }
        // H2: our trace fields go in front of the body, so a first line that starts with
        // white space would become a folded continuation of them: text the client chose
        // inside our Received:/Authentication-Results:, and header fields below it that a
        // parser of the body alone never saw. RFC 5322 §2.2: a header section starts with a
        // field name, so this is malformed content (5.6.0), refused on every port.
        if body.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
            return Outcome::reply(Reply::new(
                550,
                "5.6.0",
                "Message header section must not begin with white space",
            ));
        }
        self.messages += 1;
        self.queue_seq += 1;
        let queue_id = format!("{}{:04X}", self.session_id, self.queue_seq);

        let mut headers = String::new();
        let mut dmarc_reject = false;
        if self.port == Port::Mx && self.auth.is_none() {
            if let Some(v) = &self.shared.verifier {
                let helo = self.helo.as_ref().map(|h| h.0.as_str()).unwrap_or("");
                let out = v
                    .verify(
                        self.peer.ip(),
                        helo,
                        &tx.from.address,
                        &body,
                        self.iprev.as_ref(),
                    )
                    .await;
                headers.push_str(&out.header);
                dmarc_reject = out.dmarc_reject;
            }
        } else if let Some(a) = &self.auth {
            headers.push_str(&format!(
                "Authentication-Results: {}; auth=pass smtp.auth={}\r\n",
                self.cfg().hostname,
                a.address
            ));
        }
        if dmarc_reject && self.cfg().policy.dmarc_reject {
            return Outcome::reply(Reply::new(
                550,
                "5.7.1",
                "Message rejected by the sender domain's DMARC policy",
            ));
        }
        // One buffer for the whole message, up to the hand-off: the trace fields are put in
        // front of the body in place instead of copying the body into a new buffer, and the
        // hand-off streams slices of it.
        let mut prefix = self.received(&tx, &queue_id).into_bytes();
        prefix.extend_from_slice(headers.as_bytes());
        let stripped = match strip_our_auth_results(&body, &self.cfg().hostname) {
            std::borrow::Cow::Owned(b) => Some(b),
            std::borrow::Cow::Borrowed(_) => None,
        };
        let mut msg = stripped.unwrap_or(body);
        let prefix_len = prefix.len();
        msg.reserve_exact(prefix_len);
        msg.splice(0..0, prefix);
        let msg = Bytes::from(msg);
        // Checked on the exact bytes that are stored and relayed, as relay-queue's
        // signing_domain sees them, not on the body as submitted.
        if let Some(a) = &self.auth
            && let Err(r) = self.check_header_senders(a.id, &msg).await
        {
            return Outcome::reply(r);
        }

        if let Some(t) = tx.terminal {
            let body = msg.slice(prefix_len..);
            return self.terminal(t, &tx, &body, msg, &queue_id).await;
        }
        let any_remote = tx.rcpts.iter().any(|r| r.remote);
        let result = if any_remote {
            self.enqueue(&tx, msg, &queue_id).await
        } else {
            let addrs: Vec<String> = tx.rcpts.iter().map(|r| r.address.clone()).collect();
            self.deliver(&tx, addrs, msg, &queue_id).await
        };
        match result {
            Ok(()) => Outcome::reply(Reply::new(250, "2.0.0", format!("OK queued as {queue_id}"))),
            Err(r) => Outcome::reply(r),
        }
    }

    /// H2: receivers show the header `From:` (and `Sender:`), and relay-queue signs with the
    /// DKIM key of the From: domain, so on an authenticated submission every address in
    /// every `From:` and `Sender:` field must pass the same ownership check as MAIL FROM
    /// (own addresses and aliases, +detail and case allowed). A field without any usable
    /// address cannot be attributed, so it is refused too. No From: at all is let through
    /// as before: there is nothing to show or sign.
    ///
    /// `msg` is the whole message with our trace fields in front, so it always has a header
    /// section; one that still does not parse is refused rather than waved through, since
    /// the check could not see what the receivers will.
    async fn check_header_senders(&self, account: i64, msg: &[u8]) -> Result<(), Reply> {
        let refuse = |text: String| Err(Reply::new(550, "5.7.1", text));
        let Some(parsed) = mail_parser::MessageParser::new().parse_headers(msg) else {
            return refuse("Message header section could not be parsed".into());
        };
        let mut addresses: Vec<String> = Vec::new();
        for (field, name) in [
            (mail_parser::HeaderName::From, "From"),
            (mail_parser::HeaderName::Sender, "Sender"),
        ] {
            for value in parsed.header_values(field) {
                let list: Vec<Option<&str>> = value
                    .as_address()
                    .map(|a| a.iter().map(|x| x.address()).collect())
                    .unwrap_or_default();
                if list.is_empty() || list.iter().any(Option::is_none) {
                    return refuse(format!("Header {name}: must name your address"));
                }
                addresses.extend(list.into_iter().flatten().map(str::to_string));
            }
        }
        addresses.sort_by_key(|a| a.to_lowercase());
        addresses.dedup_by(|a, b| a.eq_ignore_ascii_case(b));
        if addresses.len() > self.cfg().limits.max_header_sender_addresses {
            return refuse("Too many header From:/Sender: addresses".into());
        }
        for a in &addresses {
            match self.shared.backend.check_sender(account, a).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::info!(
                        account,
                        peer = %self.peer.ip(),
                        header_address = %a,
                        "authenticated submission refused: header From:/Sender: not owned"
                    );
                    return refuse(format!(
                        "Header From:/Sender: address <{a}> not owned by you"
                    ));
                }
                Err(e) => return Err(lookup_error(&e)),
            }
        }
        Ok(())
    }

    async fn deliver(
        &self,
        tx: &Transaction,
        recipients: Vec<String>,
        msg: Bytes,
        queue_id: &str,
    ) -> Result<(), Reply> {
        // Each recipient's RCPT-time resolution, when every one has its own.
        let resolved = recipients
            .iter()
            .filter_map(|a| tx.rcpts.iter().find(|r| &r.address == a))
            .map(|r| r.resolved.clone())
            .collect();
        let header = DeliverHeader {
            idempotency_key: queue_id.to_string(),
            return_path: tx.from.address.clone(),
            recipients,
            resolved,
            size_hint: msg.len() as u64,
            add_delivery_headers: true,
            all_or_nothing: true,
            ..Default::default()
        };
        let b = &self.shared.backend;
        let mut r = b.deliver(header.clone(), msg.clone()).await;
        if let Err(mailsuite_runtime::ServiceError::Unavailable(_)) = &r {
            r = b.deliver(header, msg.clone()).await;
        }
        let resp = r.map_err(|e| service_error(&e))?;
        let deliverable = resp.results.iter().any(|x| {
            matches!(
                x.status(),
                RecipientStatus::Delivered | RecipientStatus::Remote
            )
        });
        if resp.rolled_back && deliverable {
            // Some recipients could not take it now (quota, an alias with remote targets):
            // the store stored nothing, so the queue becomes the one owner; it retries and
            // bounces per recipient. Still exactly one commit before the 250.
            return self.enqueue(tx, msg, queue_id).await;
        }
        if (deliverable && !resp.rolled_back) || resp.results.is_empty() || resp.duplicate {
            return Ok(());
        }
        // Nobody could take it: say why, from the first recipient.
        Err(match resp.results[0].status() {
            RecipientStatus::OverQuota => Reply::new(452, "4.2.2", "Mailbox full"),
            RecipientStatus::Disabled => Reply::new(550, "5.2.1", "Mailbox disabled"),
            _ => Reply::new(550, "5.1.1", "No such user"),
        })
    }

    async fn enqueue(&self, tx: &Transaction, msg: Bytes, queue_id: &str) -> Result<(), Reply> {
        let f = &tx.from;
        let header = EnqueueHeader {
            idempotency_key: queue_id.to_string(),
            return_path: f.address.clone(),
            recipients: tx
                .rcpts
                .iter()
                .map(|r| EnvelopeRecipient {
                    address: r.address.clone(),
                    notify: r.notify.clone(),
                    orcpt: r.orcpt.clone(),
                })
                .collect(),
            envid: f.env_id.clone().unwrap_or_default(),
            ret: if f.flags & sp::MAIL_RET_FULL != 0 {
                DsnRet::Full as i32
            } else if f.flags & sp::MAIL_RET_HDRS != 0 {
                DsnRet::Hdrs as i32
            } else {
                DsnRet::Unspecified as i32
            },
            submitter: self
                .auth
                .as_ref()
                .map(|a| a.address.clone())
                .unwrap_or_default(),
            body_8bit: f.flags & (sp::MAIL_BODY_8BITMIME | sp::MAIL_BODY_BINARYMIME) != 0,
            binarymime: f.flags & sp::MAIL_BODY_BINARYMIME != 0,
            smtputf8: f.flags & sp::MAIL_SMTPUTF8 != 0,
            size_hint: msg.len() as u64,
            traceparent: mailsuite_runtime::telemetry::current_traceparent(),
        };
        let b = &self.shared.backend;
        let mut r = b.enqueue(header.clone(), msg.clone()).await;
        if let Err(mailsuite_runtime::ServiceError::Unavailable(_)) = &r {
            r = b.enqueue(header, msg).await;
        }
        r.map(|_| ()).map_err(|e| service_error(&e))
    }

    /// SEND / SOML / SAML: the subject and sender are shown in the recipient's open IMAP
    /// sessions; SOML mails when nobody is online, SAML always mails too.
    async fn terminal(
        &self,
        t: Terminal,
        tx: &Transaction,
        body: &[u8],
        msg: Bytes,
        queue_id: &str,
    ) -> Outcome {
        let parsed = mail_parser::MessageParser::new().parse_headers(body);
        let subject = parsed
            .as_ref()
            .and_then(|m| m.subject())
            .unwrap_or("(no subject)")
            .to_string();
        let sender = if tx.from.address.is_empty() {
            "<>".to_string()
        } else {
            tx.from.address.clone()
        };
        let text = format!("Message from {sender}: {subject}");
        let mut to_mail = Vec::new();
        let mut online_any = false;
        for r in &tx.rcpts {
            let online = match self.shared.backend.alert(&r.address, &text).await {
                Ok(o) => o,
                Err(e) => return Outcome::reply(service_error(&e)),
            };
            online_any |= online;
            match t {
                Terminal::Send => {}
                Terminal::Soml if online => {}
                Terminal::Soml | Terminal::Saml => to_mail.push(r.address.clone()),
            }
        }
        if t == Terminal::Send && !online_any {
            return Outcome::reply(Reply::new(450, "4.2.1", "Recipient is not logged in"));
        }
        if !to_mail.is_empty()
            && let Err(r) = self.deliver(tx, to_mail, msg, queue_id).await
        {
            return Outcome::reply(r);
        }
        Outcome::reply(Reply::new(250, "2.0.0", format!("OK {queue_id}")))
    }

    /// The trace header of RFC 5321 §4.4, with the TLS parameters in a comment.
    fn received(&self, tx: &Transaction, queue_id: &str) -> String {
        let helo = self
            .helo
            .as_ref()
            .map(|h| h.0.as_str())
            .unwrap_or("unknown");
        let mut ip = match self.peer.ip() {
            IpAddr::V4(a) => format!("[{a}]"),
            IpAddr::V6(a) => format!("[IPv6:{a}]"),
        };
        // RFC 5321 §4.4 TCP-info: the reverse name, only when iprev confirmed it.
        if let Some(name) = self.iprev.as_ref().and_then(|i| i.name.as_deref()) {
            ip = format!("{name} {ip}");
        }
        let esmtp = self.helo.as_ref().is_some_and(|h| h.1);
        let utf8 = tx.from.flags & sp::MAIL_SMTPUTF8 != 0;
        let mut with = String::from(match (esmtp, utf8) {
            (false, _) => "SMTP",
            (true, false) => "ESMTP",
            (true, true) => "UTF8SMTP",
        });
        if esmtp && self.tls.is_some() {
            with.push('S');
        }
        if esmtp && self.auth.is_some() {
            with.push('A');
        }
        let tls = self
            .tls
            .as_ref()
            .map(|t| format!("\r\n\t(version={} cipher={})", t.version, t.cipher))
            .unwrap_or_default();
        let for_ = if tx.rcpts.len() == 1 {
            format!("\r\n\tfor <{}>", tx.rcpts[0].address)
        } else {
            String::new()
        };
        format!(
            "Received: from {} ({ip})\r\n\tby {} (mailsuite) with {with} id {queue_id}{tls}{for_};\r\n\t{}\r\n",
            sanitize(helo),
            self.cfg().hostname,
            chrono::Utc::now().to_rfc2822()
        )
    }

    async fn vrfy(&mut self, arg: &str) -> Outcome {
        let arg = arg.trim().trim_start_matches('<').trim_end_matches('>');
        let truthful = self.cfg().policy.vrfy && self.is_submission() && self.auth.is_some();
        if !truthful {
            return Outcome::reply(Reply::new(
                252,
                "2.1.5",
                "Cannot VRFY user, but will accept message and attempt delivery",
            ));
        }
        if !arg.contains('@') {
            return Outcome::reply(Reply::new(553, "5.1.4", "Ambiguous: give the full address"));
        }
        match self.shared.backend.resolve(arg).await {
            Ok(r) if r.kind() == AddressKind::Account => {
                let addr = if r.canonical.is_empty() {
                    arg.to_string()
                } else {
                    r.canonical
                };
                let text = if r.display_name.is_empty() {
                    format!("<{addr}>")
                } else {
                    format!("{} <{addr}>", r.display_name)
                };
                Outcome::reply(Reply::new(250, "2.1.5", text))
            }
            Ok(r) if matches!(r.kind(), AddressKind::Alias | AddressKind::List) => {
                let n = r.local_targets.len() + r.remote_targets.len();
                if n == 1 {
                    let t = r.local_targets.first().or(r.remote_targets.first());
                    Outcome::reply(Reply::new(
                        250,
                        "2.1.5",
                        format!("<{}>", t.cloned().unwrap_or_default()),
                    ))
                } else {
                    Outcome::reply(Reply::new(553, "5.1.4", "Ambiguous: a list, use EXPN"))
                }
            }
            Ok(r) if r.kind() == AddressKind::Moved => Outcome::reply(Reply::new(
                551,
                "5.1.6",
                format!("User not local; please try <{}>", r.moved_to),
            )),
            Ok(_) => Outcome::reply(Reply::new(550, "5.1.1", "No such user")),
            Err(e) => Outcome::reply(lookup_error(&e)),
        }
    }

    async fn expn(&mut self, arg: &str) -> Outcome {
        if !self.cfg().policy.expn {
            return self.error(Reply::new(502, "5.5.1", "EXPN not available"));
        }
        if self.auth.is_none() {
            return Outcome::reply(Reply::new(550, "5.7.1", "EXPN requires authentication"));
        }
        let arg = arg.trim().trim_start_matches('<').trim_end_matches('>');
        match self.shared.backend.expand(arg).await {
            Ok(r)
                if matches!(r.kind(), AddressKind::List | AddressKind::Alias)
                    && !r.members.is_empty() =>
            {
                let lines = r.members.iter().map(|m| {
                    if m.display_name.is_empty() {
                        format!("<{}>", m.address)
                    } else {
                        format!("{} <{}>", m.display_name, m.address)
                    }
                });
                Outcome::reply(Reply::multi(250, "2.1.5", lines))
            }
            Ok(_) => Outcome::reply(Reply::new(550, "5.1.1", "No such list")),
            Err(e) => Outcome::reply(lookup_error(&e)),
        }
    }

    /// ETRN for authenticated sessions and the configured client networks only.
    fn etrn_permitted(&self) -> bool {
        let ip = self.peer.ip();
        self.auth.is_some()
            || self
                .cfg()
                .policy
                .etrn_allowed_clients
                .iter()
                .any(|n| n.contains(ip))
    }

    async fn etrn(&mut self, arg: &str) -> Outcome {
        if !self.cfg().policy.etrn {
            return self.error(Reply::new(502, "5.5.1", "ETRN not available"));
        }
        if self.helo.is_none() {
            return self.bad_sequence("Send HELO/EHLO first");
        }
        if self.tx.is_some() {
            return self.bad_sequence("ETRN not allowed in a mail transaction");
        }
        // L2: ETRN makes the queue retry every deferred recipient of a domain at once, which
        // defeats the retry schedule and can be aimed at a third party's MX. RFC 1985 has one
        // code for refusing it by policy, 459 ("node not allowed: reason"); it is a 4yz, so
        // a legitimate poller that was just not yet configured retries later.
        if !self.etrn_permitted() {
            return self.error(Reply::new(
                459,
                "4.7.1",
                format!("{arg}: node not allowed: ETRN requires authentication"),
            ));
        }
        // Options '@' (subdomains) and '#' (queue names) of RFC 1985 are not offered.
        let valid = !arg.is_empty()
            && arg.len() <= 255
            && arg
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
        if !valid {
            return Outcome::reply(Reply::new(459, "4.7.1", format!("{arg}: node not allowed")));
        }
        if !self.shared.rates.etrn_allowed(self.peer.ip()) {
            return Outcome::reply(Reply::new(
                458,
                "4.7.0",
                format!("Unable to queue messages for node {arg}: too many ETRN, try later"),
            ));
        }
        match self.shared.backend.flush(arg).await {
            Ok(n) => Outcome::reply(Reply::new(
                250,
                "2.0.0",
                format!("Queuing for node {arg} started ({n} recipients)"),
            )),
            Err(_) => Outcome::reply(Reply::new(
                458,
                "4.3.0",
                format!("Unable to queue messages for node {arg}"),
            )),
        }
    }
}

/// Remove `Authentication-Results:` fields that claim to come from us (RFC 8601 §5): only the
/// ones we add may carry our authserv-id.
fn strip_our_auth_results<'a>(msg: &'a [u8], authserv_id: &str) -> std::borrow::Cow<'a, [u8]> {
    const NAME: &[u8] = b"authentication-results:";
    // Made (with what came before) only at the first field dropped: a message with nothing
    // to strip, nearly every one, is not copied.
    let mut out: Option<Vec<u8>> = None;
    let mut pos = 0;
    let mut dropping = false;
    while pos < msg.len() {
        let end = msg[pos..]
            .iter()
            .position(|b| *b == b'\n')
            .map_or(msg.len(), |i| pos + i + 1);
        let line = &msg[pos..end];
        if line == b"\r\n" || line == b"\n" {
            if let Some(out) = &mut out {
                out.extend_from_slice(&msg[pos..]);
            }
            break;
        }
        let continuation = line.first().is_some_and(|b| *b == b' ' || *b == b'\t');
        if !continuation {
            dropping =
                line.len() > NAME.len() && line[..NAME.len()].eq_ignore_ascii_case(NAME) && {
                    let v = String::from_utf8_lossy(&line[NAME.len()..]);
                    let id = v
                        .trim_start()
                        .split([';', ' ', '\t', '\r'])
                        .next()
                        .unwrap_or("");
                    id.eq_ignore_ascii_case(authserv_id)
                };
        }
        match (&mut out, dropping) {
            (None, true) => out = Some(msg[..pos].to_vec()),
            (Some(out), false) => out.extend_from_slice(line),
            _ => {}
        }
        pos = end;
    }
    match out {
        Some(out) => std::borrow::Cow::Owned(out),
        None => std::borrow::Cow::Borrowed(msg),
    }
}

/// L4: the process-wide body budget is exhausted (RFC 3463 X.3.1, a temporary condition).
fn insufficient_storage() -> Reply {
    Reply::new(452, "4.3.1", "Insufficient system storage, try again later")
}

fn sanitize(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control() && *c != '(' && *c != ')')
        .take(255)
        .collect()
}

fn short(e: &mailsuite_runtime::ServiceError) -> &'static str {
    if e.is_temporary() {
        "try again later"
    } else {
        "refused"
    }
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
