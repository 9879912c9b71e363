//! The outbound SMTP client: one transaction for a group of recipients of one message on one
//! host. Replies are parsed with smtp-proto; capabilities from its EHLO parser.
//!
//! Per RFC 5321 §4.5.3.2 every step has its own timeout. PIPELINING (RFC 2920) sends MAIL and
//! all RCPTs in one write when offered. The outcome is reported per recipient, because a
//! server may accept some recipients, defer others and refuse the rest in one session.

use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use smtp_proto::response::parser::ResponseReceiver;
use smtp_proto::{
    EXT_8BIT_MIME, EXT_BINARY_MIME, EXT_CHUNKING, EXT_PIPELINING, EXT_SIZE, EXT_SMTP_UTF8,
    EXT_START_TLS, EhloResponse,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::TimeoutConfig;

/// A reply: code, enhanced status and text (lines joined by a space).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub text: String,
}

impl Reply {
    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }
    pub fn is_permanent(&self) -> bool {
        (500..600).contains(&self.code)
    }
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.code, self.text)
    }
}

/// What became of one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Delivered(String),
    /// Temporary: try again later.
    Deferred(String),
    /// Permanent: bounce.
    Failed(String),
}

impl Outcome {
    pub fn text(&self) -> &str {
        match self {
            Outcome::Delivered(s) | Outcome::Deferred(s) | Outcome::Failed(s) => s,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("timeout waiting for {0}")]
    Timeout(&'static str),
    #[error("unparseable reply from server")]
    BadReply,
    #[error("reply too long")]
    ReplyTooLong,
    /// The server refused at session level (greeting, EHLO/HELO, MAIL FROM).
    #[error("{0}")]
    Refused(Reply),
    #[error("TLS: {0}")]
    Tls(String),
    /// The smarthost refused our credentials: a configuration problem, so the mail waits.
    #[error("authentication refused: {0}")]
    Auth(Reply),
    /// The message needs what the server lacks; permanent.
    #[error("{0}")]
    Unsupported(String),
}

impl SessionError {
    /// Does this failure apply permanently to every recipient?
    pub fn is_permanent(&self) -> bool {
        match self {
            SessionError::Refused(r) => r.is_permanent(),
            SessionError::Unsupported(_) => true,
            _ => false,
        }
    }
}

/// A server's reply stream over any transport; keeps unconsumed bytes between replies so
/// pipelined replies arriving in one packet are not lost.
struct Conn<S> {
    stream: S,
    buf: Vec<u8>,
    max_reply: usize,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    fn new(stream: S, max_reply: usize) -> Self {
        Conn {
            stream,
            buf: Vec::new(),
            max_reply,
        }
    }

    /// Read one complete reply (multi-line replies included) as raw bytes.
    async fn read_raw(&mut self) -> Result<Vec<u8>, SessionError> {
        loop {
            // A reply ends at the first line whose 4th byte is a space (or which is just a code).
            let mut start = 0;
            while let Some(nl) = self.buf[start..].iter().position(|&b| b == b'\n') {
                let line = &self.buf[start..start + nl + 1];
                let last = line.len() < 5 || line[3] != b'-';
                start += nl + 1;
                if last {
                    let rest = self.buf.split_off(start);
                    return Ok(std::mem::replace(&mut self.buf, rest));
                }
            }
            if self.buf.len() > self.max_reply {
                return Err(SessionError::ReplyTooLong);
            }
            let mut chunk = [0u8; 4096];
            let n = self.stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(SessionError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "connection closed by server",
                )));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    async fn read_reply(
        &mut self,
        timeout: Duration,
        what: &'static str,
    ) -> Result<Reply, SessionError> {
        let raw = tokio::time::timeout(timeout, self.read_raw())
            .await
            .map_err(|_| SessionError::Timeout(what))??;
        parse_reply(&raw)
    }

    async fn send(
        &mut self,
        data: &[u8],
        timeout: Duration,
        what: &'static str,
    ) -> Result<(), SessionError> {
        tokio::time::timeout(timeout, async {
            self.stream.write_all(data).await?;
            self.stream.flush().await
        })
        .await
        .map_err(|_| SessionError::Timeout(what))??;
        Ok(())
    }
}

pub fn parse_reply(raw: &[u8]) -> Result<Reply, SessionError> {
    let mut rx = ResponseReceiver::default();
    match rx.parse(&mut raw.iter()) {
        Ok(r) => {
            let esc = if r.esc[0] != 0 {
                format!("{}.{}.{} ", r.esc[0], r.esc[1], r.esc[2])
            } else {
                String::new()
            };
            let text = r.message.replace(['\r', '\n'], " ");
            Ok(Reply {
                code: r.code,
                text: format!("{esc}{}", text.trim()),
            })
        }
        Err(smtp_proto::Error::ResponseTooLong) => Err(SessionError::ReplyTooLong),
        Err(_) => Err(SessionError::BadReply),
    }
}

/// The message and envelope of one transaction.
pub struct Transaction<'a> {
    /// The reverse-path as it goes between `<` and `>` (already through `smtp_path`).
    pub return_path: &'a str,
    /// Forward-paths as they go between `<` and `>` (already through `smtp_path`).
    pub recipients: &'a [String],
    /// RFC 3461 per-recipient parameters, parallel to `recipients` (used when DSN is offered).
    pub rcpt_params: &'a [String],
    /// Message bytes, already signed; CRLF line endings unless `binarymime`.
    pub message: &'a [u8],
    pub body_8bit: bool,
    /// RFC 3030 BODY=BINARYMIME: opaque octets (bare CR, LF, NUL) that only BDAT can carry
    /// unchanged; a server without BINARYMIME and CHUNKING gets nothing (5.6.3).
    pub binarymime: bool,
    pub smtputf8: bool,
    pub envid: &'a str,
    pub ret: i32,
}

/// How to talk to one host.
#[derive(Clone)]
pub struct SessionParams {
    pub helo_name: String,
    /// The name the certificate must match (the MX host name or the route's host).
    pub tls_name: String,
    pub require_tls: bool,
    pub allow_invalid_opportunistic: bool,
    pub tls: TlsClients,
    pub timeouts: TimeoutConfig,
    pub max_reply: usize,
    /// AUTH PLAIN, sent only over TLS whose certificate verified (or with `insecure_tls`).
    pub auth: Option<(String, String)>,
    /// The smarthost: TLS is required and verified against `TlsClients::smarthost`.
    pub smarthost: bool,
    /// TLS from the first byte instead of STARTTLS (RFC 8314).
    pub implicit_tls: bool,
    /// The operator's explicit opt-out (`smarthost_tls_insecure_skip_verify`): any certificate
    /// is accepted, and AUTH goes over that unverified TLS.
    pub insecure_tls: bool,
}

/// Verified and lenient client configurations, built once.
#[derive(Clone)]
pub struct TlsClients {
    pub strict: Arc<rustls::ClientConfig>,
    pub lenient: Arc<rustls::ClientConfig>,
    pub verifier: Arc<dyn ServerCertVerifier>,
    /// The smarthost's: the strict roots plus `smarthost_ca_file`.
    pub smarthost: Arc<rustls::ClientConfig>,
}

impl TlsClients {
    /// System roots plus an optional PEM bundle; the smarthost also trusts `smarthost_ca_pem`.
    pub fn new(extra_roots_pem: &str, smarthost_ca_pem: &str) -> Result<TlsClients, String> {
        mailsuite_runtime::tls::install_crypto_provider();
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for c in native.certs {
            let _ = roots.add(c);
        }
        let add = |roots: &mut rustls::RootCertStore, pem: &str| -> Result<(), String> {
            if pem.is_empty() {
                return Ok(());
            }
            for c in mailsuite_runtime::tls::load_certs(std::path::Path::new(pem))
                .map_err(|e| e.to_string())?
            {
                roots.add(c).map_err(|e| e.to_string())?;
            }
            Ok(())
        };
        add(&mut roots, extra_roots_pem)?;
        let mut smarthost_roots = roots.clone();
        add(&mut smarthost_roots, smarthost_ca_pem)?;
        let verifier: Arc<dyn ServerCertVerifier> =
            rustls::client::WebPkiServerVerifier::builder(Arc::new(roots))
                .build()
                .map_err(|e| e.to_string())?;
        let strict = rustls::ClientConfig::builder()
            .dangerous()
            .with_custom_certificate_verifier(verifier.clone())
            .with_no_client_auth();
        let lenient = rustls::ClientConfig::builder()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny(verifier.clone())))
            .with_no_client_auth();
        let smarthost = rustls::ClientConfig::builder()
            .with_root_certificates(smarthost_roots)
            .with_no_client_auth();
        Ok(TlsClients {
            strict: Arc::new(strict),
            lenient: Arc::new(lenient),
            verifier,
            smarthost: Arc::new(smarthost),
        })
    }
}

/// Opportunistic TLS (RFC 3207 §4.1 practice): encrypt even when the certificate cannot be
/// verified; the handshake signatures are still checked, and the verification result is
/// computed separately and recorded.
#[derive(Debug)]
struct AcceptAny(Arc<dyn ServerCertVerifier>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The result of a session that got as far as MAIL FROM.
#[derive(Debug, Clone)]
pub struct SessionReport {
    pub outcomes: Vec<Outcome>,
    /// "none", "unverified" or "verified".
    pub tls: &'static str,
}

/// Run one transaction against `addr`.
pub async fn deliver(
    addr: std::net::SocketAddr,
    params: &SessionParams,
    tx: &Transaction<'_>,
) -> Result<SessionReport, SessionError> {
    let t = &params.timeouts;
    let tcp = tokio::time::timeout(secs(t.connect), TcpStream::connect(addr))
        .await
        .map_err(|_| SessionError::Timeout("connect"))??;
    let _ = tcp.set_nodelay(true);
    if params.implicit_tls {
        let (tls, verified) = upgrade(tcp, params).await?;
        let mut conn = Conn::new(tls, params.max_reply);
        greet(&mut conn, params).await?;
        let ehlo = say_ehlo(&mut conn, params).await?;
        let level = if verified { "verified" } else { "unverified" };
        return transact(&mut conn, params, ehlo.as_ref(), tx, level).await;
    }
    let mut conn = Conn::new(tcp, params.max_reply);
    greet(&mut conn, params).await?;
    let ehlo = say_ehlo(&mut conn, params).await?;
    let offers_tls = ehlo
        .as_ref()
        .is_some_and(|e| e.capabilities & EXT_START_TLS != 0);
    if offers_tls {
        conn.send(b"STARTTLS\r\n", secs(t.starttls), "STARTTLS")
            .await?;
        let r = conn.read_reply(secs(t.starttls), "STARTTLS").await?;
        if r.code == 220 {
            if !conn.buf.is_empty() {
                // Bytes after the 220 would be a plain-text injection into the TLS session.
                return Err(SessionError::Tls("data after STARTTLS reply".into()));
            }
            let (tls, verified) = upgrade(conn.stream, params).await?;
            let mut conn = Conn::new(tls, params.max_reply);
            let ehlo = say_ehlo(&mut conn, params).await?;
            let level = if verified { "verified" } else { "unverified" };
            return transact(&mut conn, params, ehlo.as_ref(), tx, level).await;
        } else if params.require_tls {
            return Err(SessionError::Tls(format!("STARTTLS refused: {r}")));
        }
    } else if params.require_tls {
        return Err(SessionError::Tls("server does not offer STARTTLS".into()));
    }
    transact(&mut conn, params, ehlo.as_ref(), tx, "none").await
}

async fn greet<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    params: &SessionParams,
) -> Result<(), SessionError> {
    let greeting = conn
        .read_reply(secs(params.timeouts.greeting), "greeting")
        .await?;
    if greeting.code != 220 {
        return Err(SessionError::Refused(greeting));
    }
    Ok(())
}

async fn upgrade(
    tcp: TcpStream,
    params: &SessionParams,
) -> Result<(tokio_rustls::client::TlsStream<TcpStream>, bool), SessionError> {
    let name = ServerName::try_from(params.tls_name.clone())
        .map_err(|e| SessionError::Tls(format!("bad TLS name {}: {e}", params.tls_name)))?;
    // A configuration that verifies makes a completed handshake proof of the right server.
    let (config, verifies) = if params.smarthost && !params.insecure_tls {
        (params.tls.smarthost.clone(), true)
    } else if params.require_tls && !params.insecure_tls {
        (params.tls.strict.clone(), true)
    } else {
        (params.tls.lenient.clone(), false)
    };
    let stream = tokio::time::timeout(
        secs(params.timeouts.starttls),
        tokio_rustls::TlsConnector::from(config).connect(name.clone(), tcp),
    )
    .await
    .map_err(|_| SessionError::Timeout("TLS handshake"))?
    .map_err(|e| SessionError::Tls(e.to_string()))?;
    let verified = verifies || {
        let (_, session) = stream.get_ref();
        match session.peer_certificates() {
            Some([end, rest @ ..]) => params
                .tls
                .verifier
                .verify_server_cert(end, rest, &name, &[], UnixTime::now())
                .is_ok(),
            _ => false,
        }
    };
    if !verified && !params.allow_invalid_opportunistic && !params.insecure_tls {
        return Err(SessionError::Tls(format!(
            "certificate of {} not verified",
            params.tls_name
        )));
    }
    Ok((stream, verified))
}

/// EHLO, falling back to HELO (RFC 5321 §3.2) when EHLO is refused. `None` = HELO session.
async fn say_ehlo<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    params: &SessionParams,
) -> Result<Option<EhloResponse<String>>, SessionError> {
    let t = secs(params.timeouts.ehlo);
    conn.send(
        format!("EHLO {}\r\n", params.helo_name).as_bytes(),
        t,
        "EHLO",
    )
    .await?;
    let raw = tokio::time::timeout(t, conn.read_raw())
        .await
        .map_err(|_| SessionError::Timeout("EHLO"))??;
    let reply = parse_reply(&raw)?;
    if reply.code == 250 {
        return EhloResponse::parse(&mut raw.iter())
            .map(Some)
            .map_err(|_| SessionError::BadReply);
    }
    if reply.code == 421 || !reply.is_permanent() {
        return Err(SessionError::Refused(reply));
    }
    conn.send(
        format!("HELO {}\r\n", params.helo_name).as_bytes(),
        t,
        "HELO",
    )
    .await?;
    let reply = conn.read_reply(t, "HELO").await?;
    if reply.code != 250 {
        return Err(SessionError::Refused(reply));
    }
    Ok(None)
}

async fn transact<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    params: &SessionParams,
    ehlo: Option<&EhloResponse<String>>,
    tx: &Transaction<'_>,
    tls: &'static str,
) -> Result<SessionReport, SessionError> {
    let t = &params.timeouts;
    let caps = ehlo.map(|e| e.capabilities).unwrap_or(0);
    let has = |c: u32| caps & c != 0;
    let dsn = has(smtp_proto::EXT_DSN);
    if tx.smtputf8 && !has(EXT_SMTP_UTF8) {
        return Err(SessionError::Unsupported(
            "5.6.7 the destination does not support SMTPUTF8, required by this message".into(),
        ));
    }
    if tx.binarymime && !(has(EXT_BINARY_MIME) && has(EXT_CHUNKING)) {
        // RFC 3030 §3: binary content may not be altered to fit; without a conversion we
        // can do losslessly, the message is returned instead of corrupted.
        return Err(SessionError::Unsupported(
            "5.6.3 conversion required but not supported: the destination does not offer \
             BINARYMIME and CHUNKING, required by this binary message"
                .into(),
        ));
    }
    if !tx.binarymime && tx.body_8bit && !has(EXT_8BIT_MIME) {
        return Err(SessionError::Unsupported(
            "5.6.3 the destination does not support 8BITMIME, required by this message".into(),
        ));
    }
    if let Some(e) = ehlo
        && has(EXT_SIZE)
        && e.size > 0
        && tx.message.len() > e.size
    {
        return Err(SessionError::Unsupported(format!(
            "5.3.4 message size {} exceeds the destination's limit {}",
            tx.message.len(),
            e.size
        )));
    }
    if let Some((user, pass)) = &params.auth {
        // Credentials over TLS to a server we could not authenticate go to whoever sits on
        // the path: only a verified certificate (or the operator's explicit opt-out) will do.
        let acceptable = tls == "verified" || (params.insecure_tls && tls != "none");
        if !acceptable {
            let _ = quit(conn, params).await;
            return Err(SessionError::Tls(format!(
                "refusing AUTH: TLS is {tls}, credentials are sent only over verified TLS"
            )));
        }
        use base64::Engine;
        let token = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{pass}"));
        conn.send(
            format!("AUTH PLAIN {token}\r\n").as_bytes(),
            secs(t.mail),
            "AUTH",
        )
        .await?;
        let r = conn.read_reply(secs(t.mail), "AUTH").await?;
        if r.code != 235 {
            let _ = quit(conn, params).await;
            return Err(SessionError::Auth(r));
        }
    }

    let mut mail = format!("MAIL FROM:<{}>", tx.return_path);
    if has(EXT_SIZE) {
        mail.push_str(&format!(" SIZE={}", tx.message.len()));
    }
    if tx.binarymime {
        mail.push_str(" BODY=BINARYMIME");
    } else if tx.body_8bit {
        mail.push_str(" BODY=8BITMIME");
    }
    if tx.smtputf8 {
        mail.push_str(" SMTPUTF8");
    }
    if dsn {
        match tx.ret {
            1 => mail.push_str(" RET=FULL"),
            2 => mail.push_str(" RET=HDRS"),
            _ => {}
        }
        if !tx.envid.is_empty() {
            mail.push_str(&format!(" ENVID={}", tx.envid));
        }
    }
    mail.push_str("\r\n");
    let rcpts: Vec<String> = tx
        .recipients
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let p = tx.rcpt_params.get(i).filter(|p| dsn && !p.is_empty());
            match p {
                Some(p) => format!("RCPT TO:<{r}> {p}\r\n"),
                None => format!("RCPT TO:<{r}>\r\n"),
            }
        })
        .collect();

    let mut replies = Vec::with_capacity(rcpts.len());
    let mail_reply;
    if has(EXT_PIPELINING) {
        let mut batch = mail.into_bytes();
        for r in &rcpts {
            batch.extend_from_slice(r.as_bytes());
        }
        conn.send(&batch, secs(t.mail), "MAIL").await?;
        mail_reply = conn.read_reply(secs(t.mail), "MAIL").await?;
        for _ in &rcpts {
            replies.push(conn.read_reply(secs(t.rcpt), "RCPT").await?);
        }
    } else {
        conn.send(mail.as_bytes(), secs(t.mail), "MAIL").await?;
        mail_reply = conn.read_reply(secs(t.mail), "MAIL").await?;
        if mail_reply.code == 250 {
            for r in &rcpts {
                conn.send(r.as_bytes(), secs(t.rcpt), "RCPT").await?;
                replies.push(conn.read_reply(secs(t.rcpt), "RCPT").await?);
            }
        }
    }
    if mail_reply.code != 250 {
        let _ = quit(conn, params).await;
        return Err(SessionError::Refused(mail_reply));
    }
    let mut outcomes: Vec<Outcome> = replies
        .iter()
        .map(|r| {
            if r.is_positive() {
                Outcome::Delivered(r.to_string())
            } else if r.is_permanent() {
                Outcome::Failed(r.to_string())
            } else {
                Outcome::Deferred(r.to_string())
            }
        })
        .collect();
    if !outcomes.iter().any(|o| matches!(o, Outcome::Delivered(_))) {
        conn.send(b"RSET\r\n", secs(t.mail), "RSET").await.ok();
        let _ = conn.read_reply(secs(t.mail), "RSET").await;
        let _ = quit(conn, params).await;
        return Ok(SessionReport { outcomes, tls });
    }

    if tx.binarymime {
        // One chunk: the octets exactly as received, no dot-stuffing, no line-end changes.
        conn.send(
            format!("BDAT {} LAST\r\n", tx.message.len()).as_bytes(),
            secs(t.data_init),
            "BDAT",
        )
        .await?;
        for block in tx.message.chunks(64 * 1024) {
            conn.send(block, secs(t.data_block), "BDAT block").await?;
        }
    } else {
        conn.send(b"DATA\r\n", secs(t.data_init), "DATA").await?;
        let r = conn.read_reply(secs(t.data_init), "DATA").await?;
        if r.code != 354 {
            settle_accepted(&mut outcomes, &r);
            let _ = quit(conn, params).await;
            return Ok(SessionReport { outcomes, tls });
        }
        let stuffed = dot_stuff(tx.message);
        for block in stuffed.chunks(64 * 1024) {
            conn.send(block, secs(t.data_block), "DATA block").await?;
        }
    }
    let r = conn.read_reply(secs(t.data_term), "end of data").await?;
    if r.code == 250 {
        for o in outcomes.iter_mut() {
            if matches!(o, Outcome::Delivered(_)) {
                *o = Outcome::Delivered(r.to_string());
            }
        }
    } else {
        settle_accepted(&mut outcomes, &r);
    }
    let _ = quit(conn, params).await;
    Ok(SessionReport { outcomes, tls })
}

/// Recipients accepted at RCPT share the fate of the DATA reply.
fn settle_accepted(outcomes: &mut [Outcome], reply: &Reply) {
    for o in outcomes.iter_mut() {
        if matches!(o, Outcome::Delivered(_)) {
            *o = if reply.is_permanent() {
                Outcome::Failed(reply.to_string())
            } else {
                Outcome::Deferred(reply.to_string())
            };
        }
    }
}

async fn quit<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    params: &SessionParams,
) -> Result<(), SessionError> {
    conn.send(b"QUIT\r\n", secs(params.timeouts.mail), "QUIT")
        .await?;
    let _ = conn.read_reply(secs(params.timeouts.mail), "QUIT").await;
    let _ = conn.stream.shutdown().await;
    Ok(())
}

/// The message with every bare CR and bare LF turned into CRLF, borrowed when there is none.
/// DKIM must sign these bytes: `dot_stuff` normalises on the wire anyway, and a signature over
/// the bare form would no longer verify.
pub fn crlf_normalised(message: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    let clean = message.iter().enumerate().all(|(i, &b)| match b {
        b'\r' => message.get(i + 1) == Some(&b'\n'),
        b'\n' => i > 0 && message[i - 1] == b'\r',
        _ => true,
    });
    if clean {
        return std::borrow::Cow::Borrowed(message);
    }
    let mut out = Vec::with_capacity(message.len() + 16);
    let mut i = 0;
    while i < message.len() {
        match message[i] {
            b'\r' | b'\n' => {
                if message[i] == b'\r' && message.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
                out.extend_from_slice(b"\r\n");
            }
            b => out.push(b),
        }
        i += 1;
    }
    std::borrow::Cow::Owned(out)
}

/// RFC 5321 §4.5.2 transparency with the terminating `.` line. Every bare CR and bare LF
/// becomes CRLF: receivers disagree on whether a lone CR or LF ends a line, so passing one on
/// would let `\r.\r` or `\n.\n` end the DATA early at some MTAs (SMTP smuggling). Only a
/// BDAT/BINARYMIME transfer could carry them unchanged, and this client never uses one.
pub fn dot_stuff(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + message.len() / 64 + 5);
    let mut at_line_start = true;
    let mut i = 0;
    while i < message.len() {
        let b = message[i];
        i += 1;
        match b {
            b'\r' => {
                if message.get(i) == Some(&b'\n') {
                    i += 1;
                }
                out.extend_from_slice(b"\r\n");
                at_line_start = true;
            }
            b'\n' => {
                out.extend_from_slice(b"\r\n");
                at_line_start = true;
            }
            _ => {
                if at_line_start && b == b'.' {
                    out.push(b'.');
                }
                out.push(b);
                at_line_start = false;
            }
        }
    }
    if !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// Why an address cannot be written into MAIL FROM or RCPT TO.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("control character (CR, LF, NUL ...) in the address")]
    Control,
    #[error("no domain in the address")]
    NoDomain,
    #[error("bad character in the domain")]
    Domain,
}

/// An address as it goes between `<` and `>` in MAIL FROM / RCPT TO (RFC 5321 §4.1.2).
///
/// Addresses are stored unquoted (smtp-proto removes the quotes of `"john doe"@x`), so a local
/// part that is not a dot-atom is quoted again here; sent bare, `"a@b"@c` would become the
/// different address `a@b@c`, and `>` or a space could end the path early. Control characters
/// cannot be quoted safely (CR LF would end the command), so such an address is refused. The
/// empty string is the null reverse-path.
pub fn smtp_path(addr: &str) -> Result<String, PathError> {
    if addr.is_empty() {
        return Ok(String::new());
    }
    if addr.chars().any(char::is_control) {
        return Err(PathError::Control);
    }
    let (local, domain) = addr.rsplit_once('@').ok_or(PathError::NoDomain)?;
    if !valid_domain(domain) {
        return Err(if domain.is_empty() {
            PathError::NoDomain
        } else {
            PathError::Domain
        });
    }
    if is_dot_atom(local) {
        return Ok(addr.to_string());
    }
    let mut out = String::with_capacity(addr.len() + 4);
    out.push('"');
    for c in local.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out.push('@');
    out.push_str(domain);
    Ok(out)
}

/// RFC 5322 dot-atom, with RFC 6531's UTF-8 in atext (only sent with SMTPUTF8 anyway).
fn is_dot_atom(s: &str) -> bool {
    let atext =
        |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii();
    !s.is_empty() && s.split('.').all(|a| !a.is_empty() && a.chars().all(atext))
}

/// A host name (letters, digits, `-`, `_`, `.`, UTF-8 labels) or an address literal `[...]`.
fn valid_domain(d: &str) -> bool {
    if let Some(lit) = d.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        return !lit.is_empty()
            && lit
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || ".:".contains(c));
    }
    !d.is_empty()
        && d.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c) || !c.is_ascii())
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_stuffing_and_line_endings() {
        assert_eq!(dot_stuff(b"a\r\n.b\r\n"), b"a\r\n..b\r\n.\r\n".to_vec());
        assert_eq!(dot_stuff(b".\nx"), b"..\r\nx\r\n.\r\n".to_vec());
        assert_eq!(dot_stuff(b""), b"\r\n.\r\n".to_vec());
        assert_eq!(dot_stuff(b"a\r\r\nb"), b"a\r\n\r\nb\r\n.\r\n".to_vec());
    }

    #[test]
    fn crlf_normalisation_borrows_clean_input() {
        assert!(matches!(
            crlf_normalised(b"a\r\nb\r\n"),
            std::borrow::Cow::Borrowed(_)
        ));
        assert_eq!(
            &*crlf_normalised(b"a\rb\nc\r\r\nd\n\r"),
            b"a\r\nb\r\nc\r\n\r\nd\r\n\r\n"
        );
        let m = b"x\r.\ry\n.\n";
        assert_eq!(dot_stuff(&crlf_normalised(m)), dot_stuff(m));
    }

    /// Every way a receiver might read a lone CR or LF as a line end must leave exactly one
    /// `<CRLF>.<CRLF>` on the wire: the terminator we append.
    #[test]
    fn smuggling_payloads_cannot_end_data_early() {
        let payloads: [&[u8]; 6] = [
            b"\n.\n", b"\r.\r", b"\r\n.\r", b"\n.\r\n", b"\r.\r\n", b"\r\n.\n",
        ];
        for p in payloads {
            let mut msg = b"Subject: x\r\n\r\nhello".to_vec();
            msg.extend_from_slice(p);
            msg.extend_from_slice(b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<v@y.test>\r\n");
            let wire = dot_stuff(&msg);
            assert!(
                !wire.iter().enumerate().any(|(i, &b)| {
                    (b == b'\r' && wire.get(i + 1) != Some(&b'\n'))
                        || (b == b'\n' && (i == 0 || wire[i - 1] != b'\r'))
                }),
                "bare CR or LF on the wire for {p:?}: {wire:?}"
            );
            let ends = wire.windows(5).filter(|w| w == b"\r\n.\r\n").count();
            assert_eq!(
                ends,
                1,
                "payload {p:?}: {:?}",
                String::from_utf8_lossy(&wire)
            );
            assert!(wire.ends_with(b"\r\n.\r\n"));
            assert!(
                wire.windows(5).any(|w| w == b"\r\n..\r"),
                "the smuggled dot is stuffed for {p:?}"
            );
        }
    }

    #[test]
    fn l8_local_parts_are_requoted_and_control_characters_refused() {
        let ok: &[(&str, &str)] = &[
            ("", ""),
            ("bob@remote.test", "bob@remote.test"),
            ("first.last+tag@remote.test", "first.last+tag@remote.test"),
            (
                "j\u{fc}rgen@b\u{fc}cher.test",
                "j\u{fc}rgen@b\u{fc}cher.test",
            ),
            ("john doe@x.test", "\"john doe\"@x.test"),
            ("a@b@c.test", "\"a@b\"@c.test"),
            ("a>b@x.test", "\"a>b\"@x.test"),
            ("x> NOTIFY=NEVER@y.test", "\"x> NOTIFY=NEVER\"@y.test"),
            ("say \"hi\"@x.test", "\"say \\\"hi\\\"\"@x.test"),
            ("back\\slash@x.test", "\"back\\\\slash\"@x.test"),
            (".lead@x.test", "\".lead\"@x.test"),
            ("two..dots@x.test", "\"two..dots\"@x.test"),
            ("trail.@x.test", "\"trail.\"@x.test"),
            ("@x.test", "\"\"@x.test"),
            ("a@[192.0.2.1]", "a@[192.0.2.1]"),
            ("a@[IPv6:2001:db8::1]", "a@[IPv6:2001:db8::1]"),
        ];
        for (addr, want) in ok {
            assert_eq!(smtp_path(addr).as_deref(), Ok(*want), "{addr:?}");
        }
        let bad: &[(&str, PathError)] = &[
            ("a\r\nRSET@x.test", PathError::Control),
            ("a@x.test\r\nDATA", PathError::Control),
            ("nul\0@x.test", PathError::Control),
            ("tab\t@x.test", PathError::Control),
            ("del\u{7f}@x.test", PathError::Control),
            ("postmaster", PathError::NoDomain),
            ("a@", PathError::NoDomain),
            ("a@x.test> NOTIFY=NEVER", PathError::Domain),
            ("a@x y.test", PathError::Domain),
        ];
        for (addr, want) in bad {
            assert_eq!(smtp_path(addr).as_ref(), Err(want), "{addr:?}");
        }
    }

    #[test]
    fn replies_parse_with_enhanced_codes() {
        let r = parse_reply(b"451-4.7.1 try\r\n451 4.7.1 later\r\n").unwrap();
        assert_eq!(r.code, 451);
        assert!(r.text.starts_with("4.7.1"), "{}", r.text);
        assert!(!r.is_permanent() && !r.is_positive());
        assert!(parse_reply(b"xyz\r\n").is_err());
    }

    #[tokio::test]
    async fn pipelined_replies_in_one_packet_are_all_read() {
        let (mut server, client) = tokio::io::duplex(1024);
        server
            .write_all(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 no\r\n")
            .await
            .unwrap();
        let mut c = Conn::new(client, 4096);
        let d = Duration::from_secs(1);
        assert_eq!(c.read_reply(d, "x").await.unwrap().code, 250);
        assert_eq!(c.read_reply(d, "x").await.unwrap().code, 250);
        assert_eq!(c.read_reply(d, "x").await.unwrap().code, 550);
    }

    #[tokio::test]
    async fn endless_reply_is_bounded() {
        let (mut server, client) = tokio::io::duplex(1 << 16);
        tokio::spawn(async move {
            let line = b"250-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\r\n";
            while server.write_all(line).await.is_ok() {}
        });
        let mut c = Conn::new(client, 8192);
        let e = c.read_reply(Duration::from_secs(5), "x").await.unwrap_err();
        assert!(matches!(e, SessionError::ReplyTooLong), "{e}");
    }
}
