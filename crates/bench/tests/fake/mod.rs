//! A small in-test mail server (SMTP + IMAP + POP3 over one shared store) on loopback port 0,
//! so mailbench's clients and commands are exercised over real sockets and real TLS.

#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use rcgen::{CertificateParams, KeyPair};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

#[derive(Default)]
pub struct Store {
    pub mail: HashMap<String, Vec<Vec<u8>>>,
    /// Every SMTP transaction whose MAIL..DATA group arrived before any reply was sent.
    pub pipelined_groups: u64,
    pub auth_ok: u64,
    pub tls_sessions: u64,
}

#[derive(Clone)]
pub struct Behaviour {
    /// Refuse RCPT for addresses containing this with 550.
    pub reject_rcpt_containing: &'static str,
    /// Answer 451 to the end of data of every k-th message (0: never).
    pub temp_fail_every: u64,
    /// Do not answer MAIL before the whole MAIL/RCPT/DATA group has arrived: a client that
    /// waits for each reply deadlocks (and times out), so only real pipelining passes.
    pub require_pipelining: bool,
    pub advertise_pipelining: bool,
}

impl Default for Behaviour {
    fn default() -> Self {
        Behaviour {
            reject_rcpt_containing: "reject",
            temp_fail_every: 0,
            require_pipelining: false,
            advertise_pipelining: true,
        }
    }
}

pub struct Fake {
    pub smtp: SocketAddr,
    pub imap: SocketAddr,
    pub pop3: SocketAddr,
    pub store: Arc<Mutex<Store>>,
    pub cert_pem: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

struct Shared {
    store: Arc<Mutex<Store>>,
    changed: watch::Sender<u64>,
    tls: TlsAcceptor,
    behaviour: Behaviour,
    messages_seen: Mutex<u64>,
}

impl Fake {
    pub async fn start(behaviour: Behaviour) -> Fake {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cert_pem = dir.path().join("cert.pem");
        std::fs::write(&cert_pem, cert.pem()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![CertificateDer::from(cert.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .unwrap();
        let store = Arc::new(Mutex::new(Store::default()));
        let shared = Arc::new(Shared {
            store: store.clone(),
            changed: watch::channel(0).0,
            tls: TlsAcceptor::from(Arc::new(server)),
            behaviour,
            messages_seen: Mutex::new(0),
        });
        let smtp = listen(shared.clone(), |s, io| Box::pin(smtp_session(s, io, false))).await;
        let imap = listen(shared.clone(), |s, io| Box::pin(imap_session(s, io))).await;
        let pop3 = listen(shared.clone(), |s, io| Box::pin(pop3_session(s, io))).await;
        Fake {
            smtp,
            imap,
            pop3,
            store,
            cert_pem,
            _dir: dir,
        }
    }

    /// Puts `count` generated messages into `user`'s mailbox.
    pub fn fill(&self, user: &str, count: usize, size: usize) {
        let mut st = self.store.lock().unwrap();
        let mb = st.mail.entry(user.to_string()).or_default();
        for i in 0..count {
            let mut m =
                format!("Message-ID: <fill.{i}@x>\r\nSubject: invoice {i}\r\n\r\n").into_bytes();
            // A line starting with a dot exercises dot-stuffing in POP3.
            m.extend_from_slice(b".leading dot\r\n");
            while m.len() < size {
                m.extend_from_slice(b"lorem ipsum dolor sit amet\r\n");
            }
            mb.push(m);
        }
    }

    pub fn count(&self, user: &str) -> usize {
        self.store
            .lock()
            .unwrap()
            .mail
            .get(user)
            .map_or(0, Vec::len)
    }
}

type SessionFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<()>> + Send>>;

async fn listen(
    shared: Arc<Shared>,
    f: fn(Arc<Shared>, Box<dyn Io>) -> SessionFuture,
) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let sh = shared.clone();
            tokio::spawn(async move {
                let _ = f(sh, Box::new(s)).await;
            });
        }
    });
    addr
}

async fn line(r: &mut BufReader<Box<dyn Io>>) -> std::io::Result<Option<String>> {
    let mut s = String::new();
    if r.read_line(&mut s).await? == 0 {
        return Ok(None);
    }
    Ok(Some(s.trim_end_matches(['\r', '\n']).to_string()))
}

fn deliver(sh: &Shared, rcpts: &[String], msg: Vec<u8>) {
    {
        let mut st = sh.store.lock().unwrap();
        for r in rcpts {
            st.mail.entry(r.clone()).or_default().push(msg.clone());
        }
    }
    sh.changed.send_modify(|v| *v += 1);
}

async fn smtp_session(sh: Arc<Shared>, io: Box<dyn Io>, secured: bool) -> std::io::Result<()> {
    let mut r = BufReader::new(io);
    if !secured {
        r.get_mut().write_all(b"220 fake ESMTP\r\n").await?;
    }
    let mut rcpts: Vec<String> = Vec::new();
    let mut have_mail = false;
    loop {
        let Some(cmd) = line(&mut r).await? else {
            return Ok(());
        };
        let upper = cmd.to_ascii_uppercase();
        let reply: String = if upper.starts_with("EHLO") {
            let mut s = String::from("250-fake\r\n");
            if sh.behaviour.advertise_pipelining {
                s.push_str("250-PIPELINING\r\n");
            }
            if !secured {
                s.push_str("250-STARTTLS\r\n");
            }
            s.push_str("250 AUTH PLAIN\r\n");
            s
        } else if upper == "STARTTLS" {
            r.get_mut().write_all(b"220 go ahead\r\n").await?;
            let io = r.into_inner();
            let tls = sh.tls.accept(io).await?;
            sh.store.lock().unwrap().tls_sessions += 1;
            return Box::pin(smtp_session(sh, Box::new(tls), true)).await;
        } else if let Some(token) = cmd.strip_prefix("AUTH PLAIN ") {
            // "\0user\0password" in base64; the fake accepts exactly user:secret.
            if token == "AHVzZXIAc2VjcmV0" {
                sh.store.lock().unwrap().auth_ok += 1;
                "235 ok\r\n".into()
            } else {
                "535 5.7.8 bad credentials\r\n".into()
            }
        } else if upper.starts_with("MAIL FROM:") {
            if sh.behaviour.require_pipelining {
                // Everything up to DATA must already be here, without any reply sent.
                let mut group = Vec::new();
                loop {
                    let Some(l) =
                        tokio::time::timeout(std::time::Duration::from_secs(2), line(&mut r))
                            .await
                            .ok()
                            .and_then(|l| l.ok())
                            .flatten()
                    else {
                        r.get_mut().write_all(b"421 not pipelined\r\n").await?;
                        return Ok(());
                    };
                    let done = l.eq_ignore_ascii_case("DATA");
                    group.push(l);
                    if done {
                        break;
                    }
                }
                sh.store.lock().unwrap().pipelined_groups += 1;
                let mut out = String::from("250 ok\r\n");
                rcpts.clear();
                for l in &group[..group.len() - 1] {
                    out.push_str(&rcpt_reply(&sh, l, &mut rcpts));
                }
                out.push_str(if rcpts.is_empty() {
                    "554 no valid recipients\r\n"
                } else {
                    "354 go\r\n"
                });
                r.get_mut().write_all(out.as_bytes()).await?;
                if rcpts.is_empty() {
                    continue;
                }
                let reply = data(&sh, &mut r, &rcpts).await?;
                r.get_mut().write_all(reply.as_bytes()).await?;
                continue;
            }
            have_mail = true;
            rcpts.clear();
            "250 ok\r\n".into()
        } else if upper.starts_with("RCPT TO:") {
            if have_mail {
                rcpt_reply(&sh, &cmd, &mut rcpts)
            } else {
                "503 need MAIL\r\n".into()
            }
        } else if upper == "DATA" {
            if rcpts.is_empty() {
                "554 no valid recipients\r\n".into()
            } else {
                r.get_mut().write_all(b"354 go\r\n").await?;
                have_mail = false;
                data(&sh, &mut r, &rcpts).await?
            }
        } else if upper == "RSET" {
            have_mail = false;
            rcpts.clear();
            "250 ok\r\n".into()
        } else if upper == "QUIT" {
            r.get_mut().write_all(b"221 bye\r\n").await?;
            return Ok(());
        } else {
            "500 unknown\r\n".into()
        };
        r.get_mut().write_all(reply.as_bytes()).await?;
    }
}

fn rcpt_reply(sh: &Shared, cmd: &str, rcpts: &mut Vec<String>) -> String {
    let addr = cmd
        .split_once('<')
        .and_then(|(_, a)| a.split_once('>'))
        .map(|(a, _)| a.to_string())
        .unwrap_or_default();
    if addr.contains(sh.behaviour.reject_rcpt_containing) {
        "550 5.1.1 no such user\r\n".into()
    } else {
        rcpts.push(addr);
        "250 ok\r\n".into()
    }
}

async fn data(
    sh: &Shared,
    r: &mut BufReader<Box<dyn Io>>,
    rcpts: &[String],
) -> std::io::Result<String> {
    let mut msg = Vec::new();
    loop {
        let mut l = Vec::new();
        if r.read_until(b'\n', &mut l).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if l == b".\r\n" {
            break;
        }
        let l = l.strip_prefix(b".").unwrap_or(&l);
        msg.extend_from_slice(l);
    }
    let n = {
        let mut seen = sh.messages_seen.lock().unwrap();
        *seen += 1;
        *seen
    };
    let k = sh.behaviour.temp_fail_every;
    if k > 0 && n % k == 0 {
        return Ok("451 4.3.0 try later\r\n".into());
    }
    deliver(sh, rcpts, msg);
    Ok("250 2.0.0 queued\r\n".into())
}

fn mailbox(sh: &Shared, user: &str) -> Vec<Vec<u8>> {
    sh.store
        .lock()
        .unwrap()
        .mail
        .get(user)
        .cloned()
        .unwrap_or_default()
}

fn header_field(msg: &[u8], name: &str) -> String {
    let text = String::from_utf8_lossy(msg);
    for l in text.split("\r\n") {
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':')
            && k.eq_ignore_ascii_case(name)
        {
            return format!("{k}:{v}\r\n");
        }
    }
    String::new()
}

async fn imap_session(sh: Arc<Shared>, io: Box<dyn Io>) -> std::io::Result<()> {
    let mut r = BufReader::new(io);
    r.get_mut().write_all(b"* OK fake IMAP ready\r\n").await?;
    let mut user: Option<String> = None;
    let mut changes = sh.changed.subscribe();
    // Like a real server, new messages are announced once, in whichever response comes next
    // (a FETCH, NOOP, or during IDLE).
    let mut announced = 0usize;
    loop {
        let Some(l) = line(&mut r).await? else {
            return Ok(());
        };
        let (tag, rest) = l.split_once(' ').unwrap_or((&l, ""));
        let (verb, args) = rest.split_once(' ').unwrap_or((rest, ""));
        let verb = verb.to_ascii_uppercase();
        let mut out = Vec::<u8>::new();
        match verb.as_str() {
            "CAPABILITY" => out.extend_from_slice(b"* CAPABILITY IMAP4rev1 IDLE\r\n"),
            "LOGIN" => {
                let parts: Vec<&str> = args.split('"').filter(|s| !s.trim().is_empty()).collect();
                if parts.len() == 2 && parts[1] == "password" {
                    user = Some(parts[0].to_string());
                } else {
                    r.get_mut()
                        .write_all(format!("{tag} NO [AUTHENTICATIONFAILED] bad\r\n").as_bytes())
                        .await?;
                    continue;
                }
            }
            "SELECT" | "EXAMINE" => {
                let n = mailbox(&sh, user.as_deref().unwrap_or("")).len();
                announced = n;
                out.extend_from_slice(
                    format!("* {n} EXISTS\r\n* OK [UIDNEXT {}] next\r\n", n + 1).as_bytes(),
                );
            }
            "NOOP" | "STORE" => {}
            "FETCH" => {
                let mb = mailbox(&sh, user.as_deref().unwrap_or(""));
                let (set, items) = args.split_once(' ').unwrap_or((args, ""));
                let (a, b) = set.split_once(':').unwrap_or((set, set));
                let (a, b): (usize, usize) = (
                    a.parse().unwrap_or(1),
                    b.parse().unwrap_or(a.parse().unwrap_or(1)),
                );
                for i in a..=b.min(mb.len()) {
                    if items.contains("BODY.PEEK[]") {
                        let m = &mb[i - 1];
                        out.extend_from_slice(
                            format!("* {i} FETCH (BODY[] {{{}}}\r\n", m.len()).as_bytes(),
                        );
                        out.extend_from_slice(m);
                        out.extend_from_slice(b")\r\n");
                    } else {
                        out.extend_from_slice(
                            format!("* {i} FETCH (ENVELOPE (NIL \"subject {i}\" NIL NIL NIL NIL NIL NIL NIL NIL))\r\n")
                                .as_bytes(),
                        );
                    }
                }
            }
            "UID" => {
                let mb = mailbox(&sh, user.as_deref().unwrap_or(""));
                if args.to_ascii_uppercase().starts_with("SEARCH") {
                    out.extend_from_slice(b"* SEARCH 1 2\r\n");
                } else {
                    // UID FETCH from:* (UID BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)]); UID = seq.
                    let from: usize = args
                        .split_whitespace()
                        .nth(1)
                        .and_then(|s| s.split(':').next())
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(1);
                    for uid in from.max(1)..=mb.len() {
                        let h = format!("{}\r\n", header_field(&mb[uid - 1], "Message-ID"));
                        out.extend_from_slice(
                            format!("* {uid} FETCH (UID {uid} BODY[HEADER.FIELDS (MESSAGE-ID)] {{{}}}\r\n{h})\r\n", h.len())
                                .as_bytes(),
                        );
                    }
                }
            }
            "IDLE" => {
                r.get_mut().write_all(b"+ idling\r\n").await?;
                let me = user.clone().unwrap_or_default();
                let now = mailbox(&sh, &me).len();
                if now > announced {
                    announced = now;
                    r.get_mut()
                        .write_all(format!("* {now} EXISTS\r\n").as_bytes())
                        .await?;
                }
                loop {
                    let mut buf = String::new();
                    tokio::select! {
                        n = r.read_line(&mut buf) => {
                            if n? == 0 { return Ok(()); }
                            break;
                        }
                        c = changes.changed() => {
                            if c.is_err() { return Ok(()); }
                            let now = mailbox(&sh, &me).len();
                            if now > announced {
                                announced = now;
                                r.get_mut().write_all(format!("* {now} EXISTS\r\n").as_bytes()).await?;
                            }
                        }
                    }
                }
            }
            "LOGOUT" => {
                r.get_mut()
                    .write_all(format!("* BYE bye\r\n{tag} OK done\r\n").as_bytes())
                    .await?;
                return Ok(());
            }
            _ => {
                r.get_mut()
                    .write_all(format!("{tag} BAD unknown\r\n").as_bytes())
                    .await?;
                continue;
            }
        }
        if let Some(u) = &user {
            let now = mailbox(&sh, u).len();
            if now > announced && verb != "SELECT" && verb != "EXAMINE" {
                announced = now;
                out.extend_from_slice(format!("* {now} EXISTS\r\n").as_bytes());
            }
        }
        out.extend_from_slice(format!("{tag} OK done\r\n").as_bytes());
        r.get_mut().write_all(&out).await?;
    }
}

async fn pop3_session(sh: Arc<Shared>, io: Box<dyn Io>) -> std::io::Result<()> {
    let mut r = BufReader::new(io);
    r.get_mut().write_all(b"+OK fake POP3\r\n").await?;
    let mut user = String::new();
    let mut drop: Vec<Vec<u8>> = Vec::new();
    loop {
        let Some(l) = line(&mut r).await? else {
            return Ok(());
        };
        let (verb, arg) = l.split_once(' ').unwrap_or((&l, ""));
        let out: Vec<u8> = match verb.to_ascii_uppercase().as_str() {
            "CAPA" => b"+OK\r\nUSER\r\nPIPELINING\r\n.\r\n".to_vec(),
            "USER" => {
                user = arg.to_string();
                b"+OK\r\n".to_vec()
            }
            "PASS" if arg == "password" => {
                drop = mailbox(&sh, &user);
                b"+OK\r\n".to_vec()
            }
            "PASS" => b"-ERR [AUTH] bad\r\n".to_vec(),
            "STAT" => {
                let size: usize = drop.iter().map(Vec::len).sum();
                format!("+OK {} {size}\r\n", drop.len()).into_bytes()
            }
            "RETR" => match arg
                .parse::<usize>()
                .ok()
                .and_then(|n| drop.get(n.wrapping_sub(1)))
            {
                Some(m) => {
                    let mut o = format!("+OK {} octets\r\n", m.len()).into_bytes();
                    for l in m.split_inclusive(|b| *b == b'\n') {
                        if l.starts_with(b".") {
                            o.push(b'.');
                        }
                        o.extend_from_slice(l);
                    }
                    o.extend_from_slice(b".\r\n");
                    o
                }
                None => b"-ERR no such message\r\n".to_vec(),
            },
            "QUIT" => {
                r.get_mut().write_all(b"+OK bye\r\n").await?;
                return Ok(());
            }
            _ => b"-ERR unknown\r\n".to_vec(),
        };
        r.get_mut().write_all(&out).await?;
    }
}
