//! The I/O driver of one SMTP connection: reads with timeouts, frames lines, feeds the session,
//! streams DATA/BDAT bodies through their bounded readers, upgrades to TLS on STARTTLS, and
//! says goodbye (`421 4.3.2`) when the server shuts down.
//!
//! Pipelining (RFC 2920): replies are collected while complete commands remain in the input
//! buffer and flushed when it runs dry, so a pipelined batch costs one write.

use std::sync::Arc;
use std::time::Duration;

use mailsuite_runtime::Shutdown;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, timeout_at};
use tokio_rustls::TlsAcceptor;

use crate::backend::Backend;
use crate::codec::{BdatReader, DataReader, Line, LineLimits, LineReader, parse_command};
use crate::reply::Reply;
use crate::session::{Next, Outcome, Session};
use mailsuite_runtime::stream::{MailStream, TLS_HANDSHAKE_TIMEOUT};

/// Room in the DATA buffer, beyond the declared SIZE=, for the trace fields put in front of
/// the body (Received:, Authentication-Results:), so adding them does not reallocate.
const TRACE_ROOM: u64 = 4096;

/// At most this much is reserved up front from SIZE=: a larger message grows its buffer from
/// there (a few doublings), so a client that declares 50 MB and sends nothing does not
/// reserve 50 MB per connection.
const MAX_RESERVE: u64 = 8 * 1024 * 1024;

/// Any byte stream a session can run on (TCP, TLS over TCP, an in-memory pipe in tests).
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

const READ_CHUNK: usize = 16 * 1024;
/// Room for the next command(s) while waiting between commands.
const IDLE_READ_CHUNK: usize = 2 * 1024;
/// The session's stream: plain or TLS over the boxed transport (TCP, or a pipe in tests).
pub type Stream = MailStream<Box<dyn Io>>;

enum Stop {
    /// The peer closed, or an I/O error: nothing more to say.
    Gone,
    /// Say this and close.
    Say(Reply),
}

struct Driver<B: Backend> {
    io: Stream,
    session: Session<B>,
    input: Vec<u8>,
    output: Vec<u8>,
    shutdown: Shutdown,
    session_deadline: Instant,
    command_timeout: Duration,
    data_timeout: Duration,
    data_total: Duration,
    write_timeout: Duration,
    lines: LineLimits,
    bare: crate::codec::BareLineEnd,
}

impl<B: Backend> Driver<B> {
    /// Write out the queued replies. A client that pipelines and never reads would otherwise
    /// pin this task (and its buffers) forever: past the write timeout, or on a forced
    /// shutdown, the connection is dropped without another word, since nothing more can be
    /// delivered to it anyway.
    async fn flush(&mut self) -> Result<(), Stop> {
        if self.output.is_empty() {
            return Ok(());
        }
        let out = std::mem::take(&mut self.output);
        let io = &mut self.io;
        let write = async {
            io.write_all(&out).await?;
            io.flush().await
        };
        tokio::select! {
            r = tokio::time::timeout(self.write_timeout, write) => match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(_)) | Err(_) => Err(Stop::Gone),
            },
            _ = self.shutdown.forced() => Err(Stop::Gone),
        }
    }

    fn queue(&mut self, r: &Reply) {
        if !r.is_positive() {
            count_rejection(r);
        }
        self.output.extend_from_slice(&r.serialize());
    }

    fn timeout_reply(&self) -> Reply {
        Reply::new(421, "4.4.2", "Timeout exceeded, closing connection")
    }

    /// Read more input. `idle`: we are between commands, so shutdown ends the session.
    async fn fill(&mut self, deadline: Instant, idle: bool) -> Result<(), Stop> {
        self.flush().await?;
        let deadline = deadline.min(self.session_deadline);
        // Straight into the input buffer (no chunk array in this future: it would be part of
        // every connection's task). Between commands a small read does; a body is read in
        // large ones, and the room it took is given back once the session is idle again.
        let chunk = if idle { IDLE_READ_CHUNK } else { READ_CHUNK };
        if idle && self.input.is_empty() && self.input.capacity() > 2 * IDLE_READ_CHUNK {
            self.input = Vec::new();
        }
        self.input.reserve(chunk);
        let (io, input) = (&mut self.io, &mut self.input);
        let read = async {
            tokio::select! {
                r = timeout_at(deadline, io.read_buf(input)) => Some(r),
                _ = self.shutdown.stopping(), if idle => None,
                _ = self.shutdown.forced() => None,
            }
        };
        match read.await {
            None => Err(Stop::Say(self.session.shutdown_reply())),
            Some(Err(_)) => Err(Stop::Say(self.timeout_reply())),
            Some(Ok(Ok(0))) | Some(Ok(Err(_))) => Err(Stop::Gone),
            Some(Ok(Ok(_))) => Ok(()),
        }
    }

    async fn next_line(&mut self, lines: &mut LineReader) -> Result<Line, Stop> {
        loop {
            if !self.input.is_empty() {
                let (n, line) = lines.feed(&self.input);
                self.input.drain(..n);
                if let Some(l) = line {
                    return Ok(l);
                }
                continue;
            }
            let idle = lines.pending() == 0;
            let deadline = Instant::now() + self.command_timeout;
            self.fill(deadline, idle).await?;
        }
    }

    /// Run a session step, abandoning it only when shutdown is forced.
    /// Run one session step unless a forced shutdown comes first. Callers box the step's
    /// future: held inline, the largest step's state (a Deliver, an AUTH) would be part of
    /// every connection's task, idle or not.
    async fn step<F: std::future::Future<Output = Outcome>>(
        shutdown: &Shutdown,
        fut: F,
    ) -> Result<Outcome, Stop> {
        tokio::select! {
            o = fut => Ok(o),
            _ = shutdown.forced() => Err(Stop::Gone),
        }
    }

    async fn read_data(&mut self) -> Result<(Vec<u8>, crate::codec::BodyEnd), Stop> {
        let mut reader = DataReader::new(self.session.max_message_bytes(), self.bare);
        // Room for the declared SIZE (RFC 1870), so the body is not copied as it grows; capped,
        // because SIZE is only the client's word and a reservation per connection adds up.
        if let Some(n) = self.session.declared_size().checked_add(TRACE_ROOM)
            && n > TRACE_ROOM
        {
            reader.reserve(n.min(MAX_RESERVE) as usize);
        }
        let total = Instant::now() + self.data_total;
        loop {
            if !self.input.is_empty() {
                let (n, end) = reader.feed(&self.input);
                self.input.drain(..n);
                // What the reader keeps is reserved from the process-wide budget as it
                // grows; past the budget it keeps nothing more and the message gets a 452.
                if !self.session.reserve_body(reader.kept() as u64) {
                    reader.stop_keeping();
                }
                if let Some(end) = end {
                    return Ok((reader.take_body(), end));
                }
                continue;
            }
            let deadline = (Instant::now() + self.data_timeout).min(total);
            self.fill(deadline, false).await?;
        }
    }

    async fn read_bdat(&mut self, size: u64) -> Result<(), Stop> {
        let mut reader = BdatReader::new(size);
        let max = self.session.max_message_bytes();
        let total = Instant::now() + self.data_total;
        let mut scratch = Vec::new();
        while reader.remaining() > 0 {
            if self.input.is_empty() {
                let deadline = (Instant::now() + self.data_timeout).min(total);
                self.fill(deadline, false).await?;
                continue;
            }
            let (n, _) = match self.session.bdat_sink() {
                Some(body) => reader.feed(&self.input, body, max),
                None => {
                    scratch.clear();
                    reader.feed(&self.input, &mut scratch, 0)
                }
            };
            self.input.drain(..n);
            if let Some(kept) = self.session.bdat_sink().map(|b| b.len() as u64) {
                // A false answer makes the session drop the body and the sink.
                self.session.reserve_body(kept);
            }
        }
        Ok(())
    }

    async fn run(
        &mut self,
        tls: Option<&TlsAcceptor>,
        metric: &mut mailsuite_runtime::metrics::Session,
    ) -> Result<(), Stop> {
        let greeting = self.session.greeting();
        self.queue(&greeting);
        let mut lines = LineReader::new(self.lines);
        loop {
            let outcome = match self.next_line(&mut lines).await? {
                Line::TooLong => self
                    .session
                    .bad_command(crate::codec::CommandError::LineTooLong),
                Line::AuthTooLong => self
                    .session
                    .bad_command(crate::codec::CommandError::AuthLineTooLong),
                Line::Complete(l) => match parse_command(&l) {
                    Ok(cmd) => {
                        Self::step(&self.shutdown, Box::pin(self.session.command(cmd))).await?
                    }
                    Err(e) => self.session.bad_command(e),
                },
            };
            let mut outcome = outcome;
            // Follow-up steps (AUTH challenges, bodies) until the session is back at a command.
            loop {
                let Outcome { reply, next } = outcome;
                match next {
                    Next::Continue => {
                        if let Some(r) = reply {
                            self.queue(&r);
                        }
                        break;
                    }
                    Next::Delay(d) => {
                        self.flush().await?;
                        tokio::select! {
                            _ = tokio::time::sleep(d) => {}
                            _ = self.shutdown.forced() => return Err(Stop::Gone),
                        }
                        if let Some(r) = reply {
                            self.queue(&r);
                        }
                        break;
                    }
                    Next::Close => {
                        if let Some(r) = reply {
                            self.queue(&r);
                        }
                        self.flush().await?;
                        return Ok(());
                    }
                    Next::StartTls => {
                        if let Some(r) = reply {
                            self.queue(&r);
                        }
                        self.flush().await?;
                        // Anything pipelined after STARTTLS was sent in plaintext and could
                        // have been injected (CVE-2011-0411): it is dropped, never executed.
                        self.input.clear();
                        lines = LineReader::new(self.lines);
                        let Some(acceptor) = tls else {
                            return Err(Stop::Gone);
                        };
                        let plain = std::mem::replace(
                            &mut self.io,
                            MailStream::Plain(Box::new(tokio::io::empty())),
                        );
                        self.io = Box::pin(plain.into_tls(acceptor, TLS_HANDSHAKE_TIMEOUT))
                            .await
                            .map_err(|_| Stop::Gone)?;
                        let Some(info) = self.io.tls_info() else {
                            return Err(Stop::Gone);
                        };
                        self.session.tls_established(info);
                        metric.tls_upgraded();
                        break;
                    }
                    Next::AuthLine => {
                        if let Some(r) = reply {
                            self.queue(&r);
                        }
                        lines.expect_auth_response(true);
                        let line = self.next_line(&mut lines).await;
                        lines.expect_auth_response(false);
                        outcome = match line? {
                            Line::Complete(l) => {
                                Self::step(&self.shutdown, Box::pin(self.session.auth_line(&l)))
                                    .await?
                            }
                            Line::TooLong | Line::AuthTooLong => self.session.auth_line_too_long(),
                        };
                    }
                    Next::Data => {
                        if let Some(r) = reply {
                            self.queue(&r);
                        }
                        let (body, end) = self.read_data().await?;
                        outcome =
                            Self::step(&self.shutdown, Box::pin(self.session.data_end(body, end)))
                                .await?;
                    }
                    Next::Bdat { size, last } => {
                        if let Some(r) = reply {
                            self.queue(&r);
                        }
                        self.read_bdat(size).await?;
                        outcome =
                            Self::step(&self.shutdown, Box::pin(self.session.bdat_end(size, last)))
                                .await?;
                    }
                }
            }
            if self.shutdown.is_stopping() && self.input.is_empty() {
                let r = self.session.shutdown_reply();
                self.queue(&r);
                self.flush().await?;
                return Ok(());
            }
        }
    }
}

/// `mailsuite_smtp_rejections_total{reason}`: the reply's enhanced status code says why
/// (5.1.1 unknown user, 5.7.1 relaying denied or policy, 4.7.0 rate limit, 5.5.x syntax ...),
/// a small fixed set; the basic code stands in for a reply without one.
fn count_rejection(r: &Reply) {
    let first = r.lines.first().map(String::as_str).unwrap_or("");
    let enhanced = first.split(' ').next().unwrap_or("");
    let parts: Vec<&str> = enhanced.split('.').collect();
    let is_enhanced = enhanced.len() <= 11
        && parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    let code = r.code.to_string();
    let reason = if is_enhanced { enhanced } else { code.as_str() };
    mailsuite_runtime::metrics::counter("mailsuite_smtp_rejections_total", &[("reason", reason)])
        .inc();
}

/// Run one SMTP session to its end. `implicit_tls` has already been applied by the caller
/// when the session starts with TLS (`session` then knows it).
pub async fn serve<B: Backend>(
    io: Stream,
    session: Session<B>,
    shared: Arc<crate::session::Shared<B>>,
    tls: Option<TlsAcceptor>,
    shutdown: Shutdown,
) {
    let mut metric = mailsuite_runtime::metrics::Session::start("smtp", session.is_tls());
    let config = &shared.config;
    let l = &config.limits;
    let mut d = Driver {
        io,
        session,
        input: Vec::new(),
        output: Vec::new(),
        shutdown,
        session_deadline: Instant::now() + Duration::from_secs(l.session_timeout_secs.max(1)),
        command_timeout: Duration::from_secs(l.command_timeout_secs.max(1)),
        data_timeout: Duration::from_secs(l.data_timeout_secs.max(1)),
        data_total: Duration::from_secs(l.data_total_timeout_secs.max(1)),
        write_timeout: Duration::from_secs(l.write_timeout_secs.max(1)),
        lines: LineLimits {
            command: l.max_line_length,
            mail_rcpt: l.max_mail_rcpt_line_length,
            auth: l.max_auth_line_length,
        },
        bare: config.policy.bare_line_end,
    };
    let result = d.run(tls.as_ref(), &mut metric).await;
    if let Err(Stop::Say(r)) = result {
        d.queue(&r);
        // The goodbye is a courtesy: a peer that is not reading does not get to delay closing.
        d.write_timeout = d.write_timeout.min(Duration::from_secs(5));
        let _ = d.flush().await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(5), d.io.shutdown()).await;
}
