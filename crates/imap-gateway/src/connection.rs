//! The I/O driver of one IMAP connection: greeting, reading with timeouts, literal
//! continuation, STARTTLS as an upgrade of the stream, AUTHENTICATE and IDLE exchanges,
//! unsolicited updates from the change feed, command rate limiting, and `* BYE` on shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument;

use imap_codec::imap_types::auth::AuthenticateData;
use imap_codec::imap_types::core::Tag;
use imap_codec::imap_types::response::{Code, CommandContinuationRequest, Response, StatusKind};
use mailsuite_proto as pb;
use mailsuite_runtime::Shutdown;
use mailsuite_runtime::stream::{MailStream, TLS_HANDSHAKE_TIMEOUT, WriteTimeout};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio_rustls::TlsAcceptor;

use crate::codec::{Decoder, DecoderLimits, Input, Mode};
use crate::config::Config;
use crate::hub::{Hub, Subscription};
use crate::session::{Next, Out, Session, SessionLimits, StateKind};
use crate::store::Store;

pub struct Shared {
    pub auth_limiter: Arc<crate::authlimit::AuthLimiter>,
    pub config: Config,
    pub store: Store,
    pub hub: Hub,
    pub tls: Option<TlsAcceptor>,
    pub shutdown: Shutdown,
}

impl Shared {
    fn session_limits(&self) -> SessionLimits {
        let l = &self.config.limits;
        SessionLimits {
            max_auth_failures: l.max_auth_failures.max(1),
            max_sequence_set: l.max_sequence_set as usize,
            max_list_pattern: l.max_list_pattern as usize,
            auth_failure_delay: Duration::from_millis(l.auth_failure_delay_ms),
            fetch_batch: l.fetch_batch,
            fetch_buffer_bytes: l.fetch_buffer_bytes,
            max_fetch_bytes: (l.max_message_bytes as u64).max(64 * 1024 * 1024) * 2,
        }
    }

    fn decoder_limits(&self) -> DecoderLimits {
        let l = &self.config.limits;
        DecoderLimits {
            max_line: l.max_line,
            max_command: l.max_command,
            max_message_bytes: l.max_message_bytes,
            max_multiappend: l.max_multiappend,
            max_preauth_literal: l.max_preauth_literal,
        }
    }
}

/// Commands per second with a burst allowance; excess commands are delayed, not refused.
struct RateLimit {
    per_sec: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    fn new(per_sec: u32) -> Self {
        let burst = (per_sec as f64 * 10.0).max(1.0);
        RateLimit {
            per_sec: per_sec as f64,
            burst,
            tokens: burst,
            last: Instant::now(),
        }
    }

    /// How long to wait before the next command may run.
    fn take(&mut self) -> Duration {
        if self.per_sec <= 0.0 {
            return Duration::ZERO;
        }
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.per_sec)
            .min(self.burst);
        self.last = now;
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.per_sec)
        }
    }
}

enum Wake {
    Read(std::io::Result<usize>),
    Event(Option<pb::ChangeEvent>),
    Timeout,
    Shutdown,
}

async fn next_event(sub: &mut Option<Subscription>) -> Option<pb::ChangeEvent> {
    match sub {
        Some(s) => s.events.recv().await,
        None => std::future::pending().await,
    }
}

/// Writes are bounded beneath TLS (`WriteTimeout`): a client that stops reading must not pin
/// the connection (and the FETCH buffers behind it) forever.
type Stream<S> = MailStream<WriteTimeout<S>>;

/// Serve one accepted connection to its end, as one `imap.session` span (commands are child
/// spans, see `Session::handle`).
pub async fn handle<S>(shared: Arc<Shared>, stream: S, peer: SocketAddr, implicit_tls: bool)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let span = tracing::info_span!(
        "imap.session",
        otel.kind = "server",
        network.transport = "tcp",
        network.peer.address = %peer.ip(),
        network.peer.port = peer.port(),
        tls = implicit_tls,
    );
    serve(shared, stream, peer, implicit_tls)
        .instrument(span)
        .await
}

async fn serve<S>(shared: Arc<Shared>, stream: S, peer: SocketAddr, implicit_tls: bool)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let write_timeout = Duration::from_secs(shared.config.limits.write_timeout_secs.max(1));
    let stream = WriteTimeout::new(stream, write_timeout);
    let stream: Stream<S> = if implicit_tls {
        let Some(acceptor) = shared.tls.clone() else {
            return;
        };
        let handshake = MailStream::accept(stream, &acceptor, TLS_HANDSHAKE_TIMEOUT);
        match tokio::select! {
            r = handshake => r,
            _ = shared.shutdown.stopping() => return,
        } {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                return;
            }
        }
    } else {
        MailStream::Plain(stream)
    };
    if let Err(e) = drive(shared, stream, peer).await {
        tracing::debug!(%peer, error = %e, "connection ended");
    }
}

async fn drive<S>(
    shared: Arc<Shared>,
    mut stream: Stream<S>,
    peer: SocketAddr,
) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut metric = mailsuite_runtime::metrics::Session::start("imap", stream.is_tls());
    let mut session = Session::new(
        shared.store.clone(),
        shared.hub.clone(),
        shared.session_limits(),
    );
    session.tls = stream.is_tls();
    session.tls_available = shared.tls.is_some();
    session.plaintext_ok = shared.config.auth.allow_plaintext_loopback && peer.ip().is_loopback();
    session.remote_ip = peer.ip().to_string();
    session.auth_limiter = Some((shared.auth_limiter.clone(), peer.ip()));
    let mut decoder = Decoder::new(shared.decoder_limits());
    let mut rate = RateLimit::new(shared.config.limits.commands_per_second);
    // Small: an idle session should cost little; large literals just take more reads.
    let mut buf = vec![0u8; 4 * 1024];
    // The tag of the AUTHENTICATE or IDLE command in progress.
    let mut pending: Option<Tag<'static>> = None;
    {
        let mut out = Out::new(&mut stream);
        session.greeting(&mut out, &shared.config.hostname);
        out.flush().await?;
    }
    let limits = &shared.config.limits;
    let login_deadline =
        tokio::time::Instant::now() + Duration::from_secs(limits.login_timeout_secs.max(1));
    let mut line_started: Option<tokio::time::Instant> = None;
    loop {
        // Everything already received is handled before waiting for more.
        loop {
            // Literal limits follow the state the previous command left (a pipelined APPEND
            // right after a LOGIN is judged after that LOGIN).
            decoder.set_authenticated(matches!(
                session.state(),
                StateKind::Authenticated | StateKind::Selected
            ));
            let Some(input) = decoder.next_input() else {
                break;
            };
            let mut out = Out::new(&mut stream);
            match input {
                Input::Command(cmd, ext) => {
                    let wait = rate.take();
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                    let tag = cmd.tag.clone();
                    // Boxed: a command's future (SORT, FETCH, APPEND ... each hold large
                    // state across awaits) would otherwise be part of every connection's
                    // future, and so of every idle session's memory, not only while it runs.
                    let next = tokio::select! {
                        n = Box::pin(session.handle_ext(*cmd, ext, &mut out)) => n?,
                        _ = shared.shutdown.forced() => return Ok(()),
                    };
                    match next {
                        Next::Continue => {}
                        Next::Logout => {
                            out.flush().await?;
                            return Ok(());
                        }
                        Next::StartTls(tag) => {
                            let Some(acceptor) = shared.tls.clone() else {
                                out.tagged(&tag, StatusKind::Bad, None, "TLS not available");
                                out.flush().await?;
                                continue;
                            };
                            out.tagged(&tag, StatusKind::Ok, None, "Begin TLS negotiation now");
                            out.flush().await?;
                            drop(out);
                            stream =
                                Box::pin(stream.into_tls(&acceptor, TLS_HANDSHAKE_TIMEOUT)).await?;
                            session.tls = true;
                            metric.tls_upgraded();
                            // Bytes pipelined after STARTTLS came in plaintext: never act on
                            // them (command injection, CVE-2011-0411 class).
                            decoder = Decoder::new(shared.decoder_limits());
                            break;
                        }
                        Next::AuthContinue(tag) => {
                            out.response(&Response::CommandContinuationRequest(
                                CommandContinuationRequest::base64(Vec::new()),
                            ));
                            decoder.set_mode(Mode::AuthenticateData);
                            pending = Some(tag);
                        }
                        Next::Idle(tag) => {
                            out.continuation("idling");
                            decoder.set_mode(Mode::IdleDone);
                            pending = Some(tag);
                            // Report what is already known to have happened before IDLE
                            // began. No forced poll: every change reaches this session as a
                            // hub event (a lost event turns into a resync event), so a change
                            // not yet announced is reported during IDLE when it is. Polling
                            // here made every re-IDLE of every session a store call.
                            Box::pin(session.sync(&mut out, true, false)).await?;
                        }
                    }
                    let _ = tag;
                }
                Input::AuthenticateData(data) => {
                    decoder.set_mode(Mode::Command);
                    let tag = pending
                        .take()
                        .unwrap_or_else(|| Tag::try_from("*").expect("tag"));
                    let next = match data {
                        AuthenticateData::Cancel => {
                            out.tagged(&tag, StatusKind::Bad, None, "Authentication cancelled");
                            Next::Continue
                        }
                        AuthenticateData::Continue(d) => {
                            Box::pin(session.auth_plain(&tag, d.declassify(), &mut out)).await?
                        }
                    };
                    if next == Next::Logout {
                        out.flush().await?;
                        return Ok(());
                    }
                }
                Input::IdleDone => {
                    decoder.set_mode(Mode::Command);
                    if let Some(tag) = pending.take() {
                        Box::pin(session.sync(&mut out, true, false)).await?;
                        out.tagged(&tag, StatusKind::Ok, None, "IDLE terminated");
                    }
                }
                Input::ContinueLiteral => out.continuation("Ready for literal data"),
                Input::Bad { tag } => match decoder.mode() {
                    Mode::Command => match tag {
                        Some(t) => out.tagged(&t, StatusKind::Bad, None, "Syntax error"),
                        None => out.untagged(StatusKind::Bad, None, "Syntax error"),
                    },
                    Mode::AuthenticateData | Mode::IdleDone => {
                        decoder.set_mode(Mode::Command);
                        if let Some(t) = pending.take() {
                            out.tagged(&t, StatusKind::Bad, None, "Unexpected input");
                        }
                    }
                },
                Input::TooBig { tag, append } => {
                    let tag = tag.unwrap_or_else(|| Tag::try_from("*").expect("tag"));
                    let kind = if append {
                        StatusKind::No
                    } else {
                        StatusKind::Bad
                    };
                    out.tagged(&tag, kind, Some(Code::TooBig), "Too large");
                }
                Input::LineTooLong => {
                    out.bye(Some(Code::TooBig), "Line too long");
                    out.flush().await?;
                    return Ok(());
                }
                Input::NotAuthenticated { tag } => {
                    let tag = tag.unwrap_or_else(|| Tag::try_from("*").expect("tag"));
                    out.tagged(
                        &tag,
                        StatusKind::Bad,
                        None,
                        "APPEND requires authentication",
                    );
                }
                Input::UnexpectedLiteral => {
                    if let Some(t) = pending.take() {
                        out.tagged(&t, StatusKind::Bad, None, "Unexpected input");
                    }
                    out.bye(None, "Literal not allowed here");
                    out.flush().await?;
                    return Ok(());
                }
                Input::PreauthLiteralTooBig { tag } => {
                    let tag = tag.unwrap_or_else(|| Tag::try_from("*").expect("tag"));
                    out.tagged(&tag, StatusKind::Bad, Some(Code::TooBig), "Too large");
                    out.bye(Some(Code::TooBig), "Literal too large before login");
                    out.flush().await?;
                    return Ok(());
                }
            }
            out.flush().await?;
            if session.state() == StateKind::Logout {
                return Ok(());
            }
            if shared.shutdown.is_stopping() && decoder.mode() != Mode::AuthenticateData {
                out.bye(None, "Server shutting down");
                out.flush().await?;
                return Ok(());
            }
        }
        // Deadlines are absolute, not renewed by every byte: a client trickling input must
        // still log in, and finish each command line, in bounded time.
        if decoder.partial_line() {
            line_started.get_or_insert_with(tokio::time::Instant::now);
        } else {
            line_started = None;
        }
        let now = tokio::time::Instant::now();
        let mut deadline = if session.state() == StateKind::NotAuthenticated {
            login_deadline
        } else {
            now + Duration::from_secs(limits.idle_timeout_secs.max(1))
        };
        let mut why = "Autologout; idle for too long";
        if let Some(start) = line_started {
            let line_deadline = start + Duration::from_secs(limits.line_timeout_secs.max(1));
            if line_deadline < deadline {
                deadline = line_deadline;
                why = "Command line took too long";
            }
        }
        let wake = if deadline <= now {
            Wake::Timeout
        } else {
            tokio::select! {
                r = stream.read(&mut buf) => Wake::Read(r),
                ev = next_event(&mut session.subscription) => Wake::Event(ev),
                _ = tokio::time::sleep_until(deadline) => Wake::Timeout,
                _ = shared.shutdown.stopping() => Wake::Shutdown,
            }
        };
        let mut out = Out::new(&mut stream);
        match wake {
            Wake::Read(Ok(0)) => return Ok(()),
            Wake::Read(Ok(n)) => decoder.feed(&buf[..n]),
            Wake::Read(Err(e)) => return Err(e),
            Wake::Event(None) => session.subscription = None,
            Wake::Event(Some(ev)) => {
                let affected = session.on_event(&ev, &mut out);
                if affected && decoder.mode() == Mode::IdleDone {
                    Box::pin(session.sync(&mut out, true, false)).await?;
                }
                out.flush().await?;
                if session.state() == StateKind::Logout {
                    return Ok(());
                }
            }
            Wake::Timeout => {
                out.bye(None, why);
                out.flush().await?;
                return Ok(());
            }
            Wake::Shutdown => {
                out.bye(None, "Server shutting down");
                out.flush().await?;
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_allows_a_burst_then_paces() {
        let mut r = RateLimit::new(10);
        for _ in 0..100 {
            assert_eq!(r.take(), Duration::ZERO, "burst of 10x the rate");
        }
        let wait = r.take();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(110),
            "{wait:?}"
        );
        let mut unlimited = RateLimit::new(0);
        for _ in 0..10_000 {
            assert_eq!(unlimited.take(), Duration::ZERO);
        }
    }

    /// Every connection's task holds its whole future, idle or not: a command's state held
    /// inline (SORT, FETCH, APPEND, a store call) would cost every idle session that much
    /// memory (issue 13: < 32 KiB per IDLE session). Commands, syncs, login and the TLS
    /// upgrade are boxed so they cost only while they run.
    #[tokio::test]
    async fn an_idle_connection_future_stays_small() {
        let config = Config::default();
        let shared = Arc::new(Shared {
            auth_limiter: Arc::new(crate::authlimit::AuthLimiter::new(
                5,
                Duration::from_secs(60),
                16,
            )),
            store: Store::connect("http://127.0.0.1:9", "", Duration::from_secs(1)).unwrap(),
            hub: Hub::new(10),
            tls: None,
            shutdown: Shutdown::new(),
            config,
        });
        let (stream, _peer_end) = tokio::io::duplex(64);
        let fut = handle(shared, stream, "192.0.2.1:1143".parse().unwrap(), false);
        let size = std::mem::size_of_val(&fut);
        eprintln!("connection future: {size} bytes");
        assert!(size < 4096, "the connection future is {size} bytes");
    }
}
