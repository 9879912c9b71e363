//! The POP3 session state machine (RFC 1939 §3-§6, RFC 2449 CAPA, RFC 2595 STLS, RFC 5034
//! AUTH PLAIN): AUTHORIZATION → TRANSACTION → UPDATE. Every sequence rule lives here. It does
//! no I/O: a command yields an [`Action`], either a reply or an effect that the connection
//! carries out and reports back (`login_done`, `update_done`).

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;

use crate::codec::{Command, LineError, Reply, RespCode};

/// What the session needs to know about its connection and configuration.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub hostname: String,
    /// STLS may be offered (a plain listener with TLS configured).
    pub stls_available: bool,
    /// USER/PASS and AUTH PLAIN are allowed before TLS (loopback peer, explicitly enabled).
    pub plaintext_ok: bool,
    /// RFC 2449 EXPIRE value to advertise, if any.
    pub expire: Option<String>,
    /// RFC 2449 LOGIN-DELAY seconds to advertise, if any.
    pub login_delay: Option<u64>,
    pub max_auth_failures: u32,
    pub max_bad_commands: u32,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            hostname: "localhost".into(),
            stls_available: true,
            plaintext_ok: false,
            expire: None,
            login_delay: None,
            max_auth_failures: 5,
            max_bad_commands: 20,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub uid: u32,
    /// Octets as sent by RETR, CRLF line ends, before byte-stuffing.
    pub size: u64,
    pub deleted: bool,
    pub retrieved: bool,
}

/// The maildrop as seen at login: its numbering stays fixed for the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Maildrop {
    pub account_id: i64,
    pub mailbox_id: i64,
    pub uidvalidity: u32,
    pub messages: Vec<Message>,
}

impl Maildrop {
    fn live(&self) -> impl Iterator<Item = (usize, &Message)> {
        self.messages
            .iter()
            .enumerate()
            .filter(|(_, m)| !m.deleted)
            .map(|(i, m)| (i + 1, m))
    }

    fn totals(&self) -> (usize, u64) {
        self.live()
            .fold((0, 0), |(n, s), (_, m)| (n + 1, s + m.size))
    }

    /// The UIDL value: unique per maildrop and stable across sessions (RFC 1939 §7), built
    /// from characters 0x21..0x7E only.
    pub fn unique_id(&self, uid: u32) -> String {
        format!("{}.{}", self.uidvalidity, uid)
    }

    /// The message a command names, unless it does not exist or is marked deleted.
    fn get(&self, n: u32) -> Result<&Message, Reply> {
        match (n as usize)
            .checked_sub(1)
            .and_then(|i| self.messages.get(i))
        {
            None => Err(Reply::err("no such message")),
            Some(m) if m.deleted => Err(Reply::err(format!("message {n} already deleted"))),
            Some(m) => Ok(m),
        }
    }
}

/// Where the messages of a session live in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub account_id: i64,
    pub mailbox_id: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginError {
    BadCredentials,
    InUse,
    LoginDelay,
    Temporary(String),
    Permanent(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Reply(Reply),
    /// Send the reply, then close the connection.
    Close(Reply),
    /// Send the reply (`+OK`), then run the TLS handshake.
    StartTls(Reply),
    /// Check the credentials and open the maildrop; report with `login_done`.
    Login {
        user: String,
        password: String,
    },
    /// A failed login: wait the growing delay, then send the reply (and close if asked).
    AuthFailed {
        reply: Reply,
        close: bool,
    },
    /// Send `reply` (the `+OK` line), then the message `uid` (whole, or its header and `top`
    /// body lines), byte-stuffed and terminated. `reply` is sent only if the content can be
    /// read; otherwise the connection answers `-ERR` itself.
    Send {
        reply: Reply,
        target: Target,
        uid: u32,
        top: Option<u32>,
    },
    /// The UPDATE state: remove `deleted`, mark `seen` as \Seen; report with `update_done`.
    Update {
        target: Target,
        deleted: Vec<u32>,
        seen: Vec<u32>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    Authorization {
        user: Option<String>,
    },
    /// AUTH PLAIN without initial response: the next line is the client's response.
    SaslPlain,
    /// A login is being checked by the connection.
    LoggingIn,
    Transaction(Maildrop),
    Update,
    Closed,
}

#[derive(Debug)]
pub struct Session {
    cfg: SessionConfig,
    tls: bool,
    state: State,
    auth_failures: u32,
    bad_commands: u32,
    /// Messages that remain after the UPDATE in progress (for the sign-off line).
    pending_left: usize,
}

impl Session {
    pub fn new(cfg: SessionConfig, tls_active: bool) -> Self {
        Session {
            cfg,
            tls: tls_active,
            state: State::Authorization { user: None },
            auth_failures: 0,
            bad_commands: 0,
            pending_left: 0,
        }
    }

    pub fn greeting(&self) -> Reply {
        Reply::ok(format!("{} mailsuite POP3 server ready", self.cfg.hostname))
    }

    pub fn state_name(&self) -> &'static str {
        match self.state {
            State::Authorization { .. } | State::SaslPlain | State::LoggingIn => "AUTHORIZATION",
            State::Transaction(_) => "TRANSACTION",
            State::Update => "UPDATE",
            State::Closed => "CLOSED",
        }
    }

    pub fn is_tls(&self) -> bool {
        self.tls
    }

    pub fn auth_failures(&self) -> u32 {
        self.auth_failures
    }

    /// Without changing anything: the uid and size of the message that `line` would send if
    /// it were executed now, when it is a RETR of an existing, undeleted message in the
    /// TRANSACTION state. Lets the connection read pipelined RETRs ahead.
    pub fn peek_retr(&self, line: &Result<Vec<u8>, LineError>) -> Option<(u32, u64)> {
        let (State::Transaction(md), Ok(line)) = (&self.state, line) else {
            return None;
        };
        match Command::parse(line) {
            Ok(Command::Retr(i)) => md.get(i).ok().map(|m| (m.uid, m.size)),
            _ => None,
        }
    }

    pub fn maildrop(&self) -> Option<&Maildrop> {
        match &self.state {
            State::Transaction(m) => Some(m),
            _ => None,
        }
    }

    /// The TLS handshake after STLS succeeded; the client starts over with CAPA.
    pub fn tls_started(&mut self) {
        self.tls = true;
        self.state = State::Authorization { user: None };
    }

    fn plaintext_ok(&self) -> bool {
        self.tls || self.cfg.plaintext_ok
    }

    pub fn capabilities(&self) -> Vec<String> {
        let mut caps = vec!["TOP".to_string(), "UIDL".to_string()];
        if self.plaintext_ok() {
            caps.push("USER".into());
            caps.push("SASL PLAIN".into());
        }
        caps.push("RESP-CODES".into());
        caps.push("AUTH-RESP-CODE".into());
        caps.push("PIPELINING".into());
        if !self.tls && self.cfg.stls_available && matches!(self.state, State::Authorization { .. })
        {
            caps.push("STLS".into());
        }
        if let Some(e) = &self.cfg.expire {
            caps.push(format!("EXPIRE {e}"));
        }
        if let Some(d) = self.cfg.login_delay {
            caps.push(format!("LOGIN-DELAY {d}"));
        }
        caps.push(format!(
            "IMPLEMENTATION mailsuite-{}",
            env!("CARGO_PKG_VERSION")
        ));
        caps
    }

    fn bad(&mut self, reply: Reply) -> Action {
        self.bad_commands += 1;
        if self.bad_commands > self.cfg.max_bad_commands {
            self.state = State::Closed;
            return Action::Close(Reply::err("too many bad commands, closing connection"));
        }
        Action::Reply(reply)
    }

    /// One input line (or the codec's verdict that it was too long).
    pub fn handle_line(&mut self, line: Result<Vec<u8>, LineError>) -> Action {
        let line = match line {
            Ok(l) => l,
            Err(LineError::TooLong) => {
                if self.state == State::SaslPlain {
                    self.state = State::Authorization { user: None };
                }
                return self.bad(Reply::err("line too long"));
            }
        };
        if self.state == State::SaslPlain {
            self.state = State::Authorization { user: None };
            if line == b"*" {
                return Action::Reply(Reply::err("authentication cancelled"));
            }
            return self.sasl_plain(&line);
        }
        match Command::parse(&line) {
            Ok(cmd) => self.handle(cmd),
            Err(e) => self.bad(Reply::err(e.to_string())),
        }
    }

    pub fn handle(&mut self, cmd: Command) -> Action {
        if cmd == Command::Capa {
            return Action::Reply(Reply::Multi(
                "capability list follows".into(),
                self.capabilities(),
            ));
        }
        match std::mem::replace(&mut self.state, State::Closed) {
            State::Authorization { user } => self.authorization(user, cmd),
            State::Transaction(md) => self.transaction(md, cmd),
            other => {
                // A command while an effect is outstanding or after the end: the connection
                // never feeds one, but a wrong caller must not corrupt the state.
                self.state = other;
                self.bad(Reply::err("command not valid now"))
            }
        }
    }

    fn authorization(&mut self, user: Option<String>, cmd: Command) -> Action {
        self.state = State::Authorization { user: None };
        match cmd {
            Command::Quit => {
                self.state = State::Closed;
                Action::Close(Reply::ok(format!(
                    "{} mailsuite POP3 server signing off",
                    self.cfg.hostname
                )))
            }
            Command::Stls if self.tls => {
                Action::Reply(Reply::err("command not permitted when TLS active"))
            }
            Command::Stls if !self.cfg.stls_available => {
                Action::Reply(Reply::err("STLS not available"))
            }
            Command::Stls => Action::StartTls(Reply::ok("begin TLS negotiation")),
            Command::User(_)
            | Command::Auth {
                mechanism: Some(_), ..
            } if !self.plaintext_ok() => Action::Reply(Reply::err_code(
                RespCode::Auth,
                "plaintext authentication is only allowed over TLS (use STLS)",
            )),
            Command::User(name) => {
                self.state = State::Authorization { user: Some(name) };
                Action::Reply(Reply::ok("send PASS"))
            }
            Command::Pass(password) => match user {
                Some(user) => {
                    self.state = State::LoggingIn;
                    Action::Login { user, password }
                }
                None => self.bad(Reply::err("USER first")),
            },
            Command::Auth {
                mechanism: None, ..
            } => {
                let mechs = if self.plaintext_ok() {
                    vec!["PLAIN".to_string()]
                } else {
                    vec![]
                };
                Action::Reply(Reply::Multi("SASL mechanisms follow".into(), mechs))
            }
            Command::Auth {
                mechanism: Some(m),
                initial,
            } => {
                if !m.eq_ignore_ascii_case("PLAIN") {
                    // Not echoed: the name is the client's and may be long.
                    return Action::Reply(Reply::err("unsupported authentication mechanism"));
                }
                match initial {
                    // RFC 5034 §4: "=" is an empty initial response.
                    Some(i) if i == "=" => self.sasl_plain(b""),
                    Some(i) => self.sasl_plain(i.as_bytes()),
                    None => {
                        self.state = State::SaslPlain;
                        Action::Reply(Reply::Continue(String::new()))
                    }
                }
            }
            // APOP needs a plaintext-equivalent secret, and the store keeps only argon2id
            // hashes: the greeting carries no timestamp, so no client tries it.
            Command::Apop { .. } => Action::Reply(Reply::err("APOP not supported")),
            other => self.bad(Reply::err(format!(
                "{} not permitted in AUTHORIZATION state",
                other.keyword()
            ))),
        }
    }

    fn sasl_plain(&mut self, b64: &[u8]) -> Action {
        let Ok(raw) = B64.decode(b64) else {
            self.state = State::Authorization { user: None };
            return self.bad(Reply::err("invalid base64 in SASL response"));
        };
        // authzid NUL authcid NUL passwd (RFC 4616).
        let parts: Vec<&[u8]> = raw.split(|&b| b == 0).collect();
        let parsed = match parts.as_slice() {
            [authz, authc, pass] => match (
                std::str::from_utf8(authz),
                std::str::from_utf8(authc),
                std::str::from_utf8(pass),
            ) {
                (Ok(z), Ok(c), Ok(p)) if !c.is_empty() && (z.is_empty() || z == c) => {
                    Some((c.to_string(), p.to_string()))
                }
                _ => None,
            },
            _ => None,
        };
        match parsed {
            Some((user, password)) => {
                self.state = State::LoggingIn;
                Action::Login { user, password }
            }
            None => self.auth_failed(),
        }
    }

    fn auth_failed(&mut self) -> Action {
        self.state = State::Authorization { user: None };
        self.auth_failures += 1;
        let close = self.auth_failures >= self.cfg.max_auth_failures;
        if close {
            self.state = State::Closed;
        }
        Action::AuthFailed {
            reply: Reply::err_code(RespCode::Auth, "authentication failed"),
            close,
        }
    }

    /// The result of an [`Action::Login`].
    pub fn login_done(&mut self, result: Result<Maildrop, LoginError>) -> Action {
        if self.state != State::LoggingIn {
            return Action::Reply(Reply::err("no login in progress"));
        }
        self.state = State::Authorization { user: None };
        let reply = match result {
            Ok(md) => {
                let (n, size) = md.totals();
                self.state = State::Transaction(md);
                Reply::ok(format!(
                    "maildrop locked and ready, {n} messages ({size} octets)"
                ))
            }
            Err(LoginError::BadCredentials) => return self.auth_failed(),
            Err(LoginError::InUse) => {
                Reply::err_code(RespCode::InUse, "maildrop is locked by another session")
            }
            Err(LoginError::LoginDelay) => Reply::err_code(
                RespCode::LoginDelay,
                "minimum time between logins has not elapsed",
            ),
            Err(LoginError::Temporary(m)) => Reply::err_code(RespCode::SysTemp, m),
            Err(LoginError::Permanent(m)) => Reply::err_code(RespCode::SysPerm, m),
        };
        Action::Reply(reply)
    }

    fn transaction(&mut self, mut md: Maildrop, cmd: Command) -> Action {
        let target = Target {
            account_id: md.account_id,
            mailbox_id: md.mailbox_id,
        };
        let action = match cmd {
            Command::Stat => {
                let (n, size) = md.totals();
                Action::Reply(Reply::ok(format!("{n} {size}")))
            }
            Command::List(None) => {
                let (n, size) = md.totals();
                let lines = md.live().map(|(i, m)| format!("{i} {}", m.size)).collect();
                Action::Reply(Reply::Multi(format!("{n} messages ({size} octets)"), lines))
            }
            Command::List(Some(i)) => match md.get(i) {
                Ok(m) => Action::Reply(Reply::ok(format!("{i} {}", m.size))),
                Err(r) => Action::Reply(r),
            },
            Command::Uidl(None) => {
                let lines = md
                    .live()
                    .map(|(i, m)| format!("{i} {}", md.unique_id(m.uid)))
                    .collect();
                Action::Reply(Reply::Multi("unique-id listing follows".into(), lines))
            }
            Command::Uidl(Some(i)) => match md.get(i) {
                Ok(m) => Action::Reply(Reply::ok(format!("{i} {}", md.unique_id(m.uid)))),
                Err(r) => Action::Reply(r),
            },
            Command::Retr(i) => match md.get(i) {
                Ok(m) => {
                    let (uid, size) = (m.uid, m.size);
                    md.messages[i as usize - 1].retrieved = true;
                    Action::Send {
                        reply: Reply::ok(format!("{size} octets")),
                        target,
                        uid,
                        top: None,
                    }
                }
                Err(r) => Action::Reply(r),
            },
            Command::Top(i, n) => match md.get(i) {
                Ok(m) => Action::Send {
                    reply: Reply::ok("top of message follows"),
                    target,
                    uid: m.uid,
                    top: Some(n),
                },
                Err(r) => Action::Reply(r),
            },
            Command::Dele(i) => match md.get(i) {
                Ok(_) => {
                    md.messages[i as usize - 1].deleted = true;
                    Action::Reply(Reply::ok(format!("message {i} deleted")))
                }
                Err(r) => Action::Reply(r),
            },
            Command::Noop => Action::Reply(Reply::ok("")),
            Command::Rset => {
                for m in &mut md.messages {
                    m.deleted = false;
                }
                let (n, size) = md.totals();
                Action::Reply(Reply::ok(format!(
                    "maildrop has {n} messages ({size} octets)"
                )))
            }
            Command::Quit => {
                let deleted: Vec<u32> = md
                    .messages
                    .iter()
                    .filter(|m| m.deleted)
                    .map(|m| m.uid)
                    .collect();
                let seen: Vec<u32> = md
                    .messages
                    .iter()
                    .filter(|m| m.retrieved && !m.deleted)
                    .map(|m| m.uid)
                    .collect();
                let left = md.totals().0;
                if deleted.is_empty() && seen.is_empty() {
                    self.state = State::Closed;
                    return Action::Close(self.sign_off(left));
                }
                self.state = State::Update;
                self.pending_left = left;
                return Action::Update {
                    target,
                    deleted,
                    seen,
                };
            }
            other => {
                self.state = State::Transaction(md);
                return self.bad(Reply::err(format!(
                    "{} not permitted in TRANSACTION state",
                    other.keyword()
                )));
            }
        };
        self.state = State::Transaction(md);
        action
    }

    fn sign_off(&self, left: usize) -> Reply {
        Reply::ok(format!(
            "{} mailsuite POP3 server signing off ({left} messages left)",
            self.cfg.hostname
        ))
    }

    /// The result of an [`Action::Update`]: the session ends either way.
    pub fn update_done(&mut self, result: Result<(), String>) -> Action {
        let left = self.pending_left;
        self.state = State::Closed;
        match result {
            Ok(()) => Action::Close(self.sign_off(left)),
            Err(m) => Action::Close(Reply::err_code(
                RespCode::SysTemp,
                format!("some deleted messages not removed: {m}"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn maildrop() -> Maildrop {
        Maildrop {
            account_id: 7,
            mailbox_id: 9,
            uidvalidity: 1234,
            messages: [(3, 120), (5, 200), (8, 1000)]
                .into_iter()
                .map(|(uid, size)| Message {
                    uid,
                    size,
                    deleted: false,
                    retrieved: false,
                })
                .collect(),
        }
    }

    fn cfg(plaintext_ok: bool) -> SessionConfig {
        SessionConfig {
            plaintext_ok,
            ..SessionConfig::default()
        }
    }

    /// A compact, comparable rendering of an action.
    fn show(a: &Action) -> String {
        let text = |r: &Reply| {
            String::from_utf8(r.to_bytes())
                .unwrap()
                .replace("\r\n", "|")
        };
        match a {
            Action::Reply(r) => text(r),
            Action::Close(r) => format!("CLOSE {}", text(r)),
            Action::StartTls(r) => format!("STARTTLS {}", text(r)),
            Action::Login { user, password } => format!("LOGIN {user} {password}"),
            Action::AuthFailed { reply, close } => format!(
                "AUTHFAIL{} {}",
                if *close { "+CLOSE" } else { "" },
                text(reply)
            ),
            Action::Send {
                reply, uid, top, ..
            } => format!("SEND {uid} {top:?} {}", text(reply)),
            Action::Update { deleted, seen, .. } => format!("UPDATE {deleted:?} {seen:?}"),
        }
    }

    fn run(s: &mut Session, line: &str) -> String {
        show(&s.handle_line(Ok(line.as_bytes().to_vec())))
    }

    fn logged_in() -> Session {
        let mut s = Session::new(cfg(false), true);
        assert_eq!(run(&mut s, "USER alice"), "+OK send PASS|");
        assert_eq!(run(&mut s, "PASS secret"), "LOGIN alice secret");
        let r = show(&s.login_done(Ok(maildrop())));
        assert_eq!(
            r,
            "+OK maildrop locked and ready, 3 messages (1320 octets)|"
        );
        assert_eq!(s.state_name(), "TRANSACTION");
        s
    }

    /// Every command in each state: (command, AUTHORIZATION over TLS, TRANSACTION).
    #[test]
    fn every_command_in_every_state() {
        let table: &[(&str, &str, &str)] = &[
            (
                "STAT",
                "-ERR STAT not permitted in AUTHORIZATION state|",
                "+OK 3 1320|",
            ),
            (
                "LIST",
                "-ERR LIST not permitted in AUTHORIZATION state|",
                "+OK 3 messages (1320 octets)|1 120|2 200|3 1000|.|",
            ),
            (
                "LIST 2",
                "-ERR LIST not permitted in AUTHORIZATION state|",
                "+OK 2 200|",
            ),
            (
                "LIST 4",
                "-ERR LIST not permitted in AUTHORIZATION state|",
                "-ERR no such message|",
            ),
            (
                "LIST 0",
                "-ERR LIST not permitted in AUTHORIZATION state|",
                "-ERR no such message|",
            ),
            (
                "UIDL",
                "-ERR UIDL not permitted in AUTHORIZATION state|",
                "+OK unique-id listing follows|1 1234.3|2 1234.5|3 1234.8|.|",
            ),
            (
                "UIDL 3",
                "-ERR UIDL not permitted in AUTHORIZATION state|",
                "+OK 3 1234.8|",
            ),
            (
                "RETR 1",
                "-ERR RETR not permitted in AUTHORIZATION state|",
                "SEND 3 None +OK 120 octets|",
            ),
            (
                "RETR 9",
                "-ERR RETR not permitted in AUTHORIZATION state|",
                "-ERR no such message|",
            ),
            (
                "TOP 2 5",
                "-ERR TOP not permitted in AUTHORIZATION state|",
                "SEND 5 Some(5) +OK top of message follows|",
            ),
            (
                "DELE 1",
                "-ERR DELE not permitted in AUTHORIZATION state|",
                "+OK message 1 deleted|",
            ),
            (
                "NOOP",
                "-ERR NOOP not permitted in AUTHORIZATION state|",
                "+OK|",
            ),
            (
                "RSET",
                "-ERR RSET not permitted in AUTHORIZATION state|",
                "+OK maildrop has 3 messages (1320 octets)|",
            ),
            (
                "USER bob",
                "+OK send PASS|",
                "-ERR USER not permitted in TRANSACTION state|",
            ),
            (
                "PASS x",
                "-ERR USER first|",
                "-ERR PASS not permitted in TRANSACTION state|",
            ),
            (
                "APOP bob 0123",
                "-ERR APOP not supported|",
                "-ERR APOP not permitted in TRANSACTION state|",
            ),
            (
                "AUTH",
                "+OK SASL mechanisms follow|PLAIN|.|",
                "-ERR AUTH not permitted in TRANSACTION state|",
            ),
            (
                "AUTH PLAIN",
                "+ |",
                "-ERR AUTH not permitted in TRANSACTION state|",
            ),
            (
                "AUTH CRAM-MD5",
                "-ERR unsupported authentication mechanism|",
                "-ERR AUTH not permitted in TRANSACTION state|",
            ),
            (
                "STLS",
                "-ERR command not permitted when TLS active|",
                "-ERR STLS not permitted in TRANSACTION state|",
            ),
            (
                "QUIT",
                "CLOSE +OK localhost mailsuite POP3 server signing off|",
                "CLOSE +OK localhost mailsuite POP3 server signing off (3 messages left)|",
            ),
            (
                "XTND",
                "-ERR unknown command XTND|",
                "-ERR unknown command XTND|",
            ),
            ("RETR", "-ERR syntax: RETR msg|", "-ERR syntax: RETR msg|"),
        ];
        for (cmd, in_auth, in_trans) in table {
            let mut s = Session::new(cfg(false), true);
            assert_eq!(run(&mut s, cmd), *in_auth, "{cmd} in AUTHORIZATION");
            let mut s = logged_in();
            assert_eq!(run(&mut s, cmd), *in_trans, "{cmd} in TRANSACTION");
        }
        // CAPA is valid everywhere.
        let mut s = Session::new(cfg(false), true);
        assert!(run(&mut s, "CAPA").starts_with("+OK capability list follows|TOP|UIDL|USER|"));
        let mut s = logged_in();
        assert!(run(&mut s, "capa").ends_with(".|"));
    }

    #[test]
    fn commands_while_an_effect_is_outstanding_are_refused() {
        let mut s = Session::new(cfg(false), true);
        run(&mut s, "USER a");
        assert_eq!(run(&mut s, "PASS b"), "LOGIN a b");
        assert_eq!(run(&mut s, "STAT"), "-ERR command not valid now|");
        assert_eq!(
            show(&s.login_done(Err(LoginError::InUse))),
            "-ERR [IN-USE] maildrop is locked by another session|"
        );
        assert_eq!(
            show(&s.login_done(Ok(maildrop()))),
            "-ERR no login in progress|",
            "no stray login"
        );
        assert_eq!(s.state_name(), "AUTHORIZATION");
    }

    #[test]
    fn plaintext_is_refused_before_tls_and_stls_offered() {
        let mut s = Session::new(cfg(false), false);
        let capa = run(&mut s, "CAPA");
        assert!(capa.contains("|STLS|"), "{capa}");
        assert!(!capa.contains("|USER|") && !capa.contains("SASL"), "{capa}");
        assert_eq!(
            run(&mut s, "USER alice"),
            "-ERR [AUTH] plaintext authentication is only allowed over TLS (use STLS)|"
        );
        assert_eq!(run(&mut s, "PASS secret"), "-ERR USER first|");
        assert!(run(&mut s, "AUTH PLAIN AGEAYg==").starts_with("-ERR [AUTH]"));
        assert_eq!(run(&mut s, "AUTH"), "+OK SASL mechanisms follow|.|");
        assert_eq!(run(&mut s, "STLS"), "STARTTLS +OK begin TLS negotiation|");
        s.tls_started();
        let capa = run(&mut s, "CAPA");
        assert!(
            !capa.contains("STLS") && capa.contains("|USER|") && capa.contains("|SASL PLAIN|"),
            "{capa}"
        );
        assert_eq!(
            run(&mut s, "STLS"),
            "-ERR command not permitted when TLS active|"
        );
        assert_eq!(run(&mut s, "USER alice"), "+OK send PASS|");

        // Explicitly allowed (loopback): no TLS needed.
        let mut s = Session::new(cfg(true), false);
        assert_eq!(run(&mut s, "USER alice"), "+OK send PASS|");
        // No STLS without TLS configured (e.g. implicit-TLS listener).
        let mut s = Session::new(
            SessionConfig {
                stls_available: false,
                ..cfg(true)
            },
            false,
        );
        assert!(!run(&mut s, "CAPA").contains("STLS"));
        assert_eq!(run(&mut s, "STLS"), "-ERR STLS not available|");
    }

    #[test]
    fn capa_advertises_rfc2449_extensions() {
        let s = Session::new(
            SessionConfig {
                expire: Some("NEVER".into()),
                login_delay: Some(300),
                ..cfg(false)
            },
            true,
        );
        let caps = s.capabilities();
        for c in [
            "TOP",
            "UIDL",
            "USER",
            "SASL PLAIN",
            "RESP-CODES",
            "AUTH-RESP-CODE",
            "PIPELINING",
            "EXPIRE NEVER",
            "LOGIN-DELAY 300",
        ] {
            assert!(caps.iter().any(|x| x == c), "{c} missing from {caps:?}");
        }
        assert!(caps.iter().any(|x| x.starts_with("IMPLEMENTATION ")));
        assert!(
            !Session::new(cfg(false), true)
                .capabilities()
                .iter()
                .any(|c| c.starts_with("EXPIRE") || c.starts_with("LOGIN-DELAY"))
        );
    }

    #[test]
    fn auth_plain_with_and_without_initial_response() {
        let b64 = |s: &[u8]| B64.encode(s);
        let mut s = Session::new(cfg(false), true);
        assert_eq!(
            run(
                &mut s,
                &format!("AUTH PLAIN {}", b64(b"\0alice\0pw with space"))
            ),
            "LOGIN alice pw with space"
        );
        let mut s = Session::new(cfg(false), true);
        assert_eq!(
            run(&mut s, &format!("auth plain {}", b64(b"alice\0alice\0pw"))),
            "LOGIN alice pw",
            "authzid = authcid"
        );
        let mut s = Session::new(cfg(false), true);
        assert_eq!(run(&mut s, "AUTH PLAIN"), "+ |");
        assert_eq!(run(&mut s, &b64(b"\0bob\0pw")), "LOGIN bob pw");
        let mut s = Session::new(cfg(false), true);
        assert_eq!(run(&mut s, "AUTH PLAIN"), "+ |");
        assert_eq!(run(&mut s, "*"), "-ERR authentication cancelled|");
        assert_eq!(
            run(&mut s, "NOOP"),
            "-ERR NOOP not permitted in AUTHORIZATION state|",
            "back to commands"
        );
        let mut s = Session::new(cfg(false), true);
        run(&mut s, "AUTH PLAIN");
        assert_eq!(run(&mut s, "!!!"), "-ERR invalid base64 in SASL response|");
        // Proxy authorisation as someone else, or a malformed message: an auth failure.
        let mut s = Session::new(cfg(false), true);
        assert_eq!(
            run(&mut s, &format!("AUTH PLAIN {}", b64(b"root\0alice\0pw"))),
            "AUTHFAIL -ERR [AUTH] authentication failed|"
        );
        assert_eq!(
            run(&mut s, "AUTH PLAIN ="),
            "AUTHFAIL -ERR [AUTH] authentication failed|"
        );
        assert_eq!(s.auth_failures(), 2);
    }

    #[test]
    fn failed_logins_count_and_close_at_the_limit() {
        let mut s = Session::new(
            SessionConfig {
                max_auth_failures: 3,
                ..cfg(false)
            },
            true,
        );
        for n in 1..=3 {
            run(&mut s, "USER alice");
            assert_eq!(run(&mut s, "PASS wrong"), "LOGIN alice wrong");
            let a = show(&s.login_done(Err(LoginError::BadCredentials)));
            if n < 3 {
                assert_eq!(a, "AUTHFAIL -ERR [AUTH] authentication failed|");
            } else {
                assert_eq!(a, "AUTHFAIL+CLOSE -ERR [AUTH] authentication failed|");
            }
            assert_eq!(s.auth_failures(), n);
        }
        let mut s = Session::new(cfg(false), true);
        run(&mut s, "USER a");
        run(&mut s, "PASS b");
        assert_eq!(
            show(&s.login_done(Err(LoginError::Temporary("store down".into())))),
            "-ERR [SYS/TEMP] store down|"
        );
        run(&mut s, "USER a");
        run(&mut s, "PASS b");
        assert_eq!(
            show(&s.login_done(Err(LoginError::Permanent("disabled".into())))),
            "-ERR [SYS/PERM] disabled|"
        );
        run(&mut s, "USER a");
        run(&mut s, "PASS b");
        assert_eq!(
            show(&s.login_done(Err(LoginError::LoginDelay))),
            "-ERR [LOGIN-DELAY] minimum time between logins has not elapsed|"
        );
        assert_eq!(s.auth_failures(), 0, "only bad credentials count");
    }

    #[test]
    fn dele_hides_messages_and_rset_restores_them() {
        let mut s = logged_in();
        assert_eq!(run(&mut s, "DELE 2"), "+OK message 2 deleted|");
        assert_eq!(run(&mut s, "DELE 2"), "-ERR message 2 already deleted|");
        assert_eq!(run(&mut s, "RETR 2"), "-ERR message 2 already deleted|");
        assert_eq!(run(&mut s, "TOP 2 0"), "-ERR message 2 already deleted|");
        assert_eq!(run(&mut s, "LIST 2"), "-ERR message 2 already deleted|");
        assert_eq!(run(&mut s, "UIDL 2"), "-ERR message 2 already deleted|");
        assert_eq!(run(&mut s, "STAT"), "+OK 2 1120|");
        assert_eq!(
            run(&mut s, "LIST"),
            "+OK 2 messages (1120 octets)|1 120|3 1000|.|",
            "numbers stay fixed"
        );
        assert_eq!(
            run(&mut s, "UIDL"),
            "+OK unique-id listing follows|1 1234.3|3 1234.8|.|"
        );
        assert_eq!(
            run(&mut s, "RSET"),
            "+OK maildrop has 3 messages (1320 octets)|"
        );
        assert_eq!(run(&mut s, "LIST 2"), "+OK 2 200|");
    }

    #[test]
    fn quit_enters_update_with_exactly_the_deleted_uids() {
        let mut s = logged_in();
        run(&mut s, "RETR 1");
        run(&mut s, "RETR 3");
        run(&mut s, "DELE 3");
        run(&mut s, "DELE 2");
        assert_eq!(run(&mut s, "QUIT"), "UPDATE [5, 8] [3]");
        assert_eq!(s.state_name(), "UPDATE");
        assert_eq!(run(&mut s, "NOOP"), "-ERR command not valid now|");
        assert_eq!(
            show(&s.update_done(Ok(()))),
            "CLOSE +OK localhost mailsuite POP3 server signing off (1 messages left)|"
        );

        let mut s = logged_in();
        run(&mut s, "DELE 1");
        run(&mut s, "QUIT");
        assert_eq!(
            show(&s.update_done(Err("store down".into()))),
            "CLOSE -ERR [SYS/TEMP] some deleted messages not removed: store down|"
        );

        // Nothing to do: no UPDATE round trip at all.
        let mut s = logged_in();
        assert!(run(&mut s, "QUIT").starts_with("CLOSE +OK"));
    }

    #[test]
    fn bad_commands_and_long_lines_are_limited() {
        let mut s = Session::new(
            SessionConfig {
                max_bad_commands: 2,
                ..cfg(false)
            },
            true,
        );
        assert_eq!(
            show(&s.handle_line(Err(LineError::TooLong))),
            "-ERR line too long|"
        );
        assert_eq!(run(&mut s, ""), "-ERR empty command|");
        assert_eq!(
            run(&mut s, "BOGUS"),
            "CLOSE -ERR too many bad commands, closing connection|"
        );
        // A long line during AUTH PLAIN cancels the exchange.
        let mut s = Session::new(cfg(false), true);
        run(&mut s, "AUTH PLAIN");
        assert_eq!(
            show(&s.handle_line(Err(LineError::TooLong))),
            "-ERR line too long|"
        );
        assert_eq!(run(&mut s, "USER a"), "+OK send PASS|");
    }

    #[test]
    fn greeting_has_no_apop_timestamp() {
        let g = Session::new(cfg(false), false).greeting().to_bytes();
        assert!(
            g.starts_with(b"+OK ") && !g.contains(&b'<'),
            "{}",
            String::from_utf8_lossy(&g)
        );
    }
}
