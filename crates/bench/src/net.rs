//! A buffered line/byte connection over TCP or TLS, with an in-place STARTTLS upgrade.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// How a client secures its connection.
#[derive(Clone)]
pub struct Tls {
    pub config: Arc<ClientConfig>,
    pub server_name: ServerName<'static>,
}

#[derive(Clone, Debug, Default, clap::Args)]
pub struct TlsArgs {
    /// Accept any server certificate (self-signed dev servers). Signatures are still checked.
    #[arg(long, global = true)]
    pub insecure: bool,
    /// Trust this PEM CA bundle instead of the system roots.
    #[arg(long, global = true, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Name to verify and send as SNI (default: the host part of --server).
    #[arg(long, global = true)]
    pub server_name: Option<String>,
}

impl TlsArgs {
    pub fn build(&self, server: &str) -> anyhow::Result<Tls> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?;
        let config = if self.insecure {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
                .with_no_client_auth()
        } else {
            let mut roots = rustls::RootCertStore::empty();
            match &self.ca {
                Some(path) => {
                    for c in CertificateDer::pem_file_iter(path)? {
                        roots.add(c?)?;
                    }
                }
                None => {
                    for c in rustls_native_certs::load_native_certs().certs {
                        let _ = roots.add(c);
                    }
                }
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        };
        let host = match &self.server_name {
            Some(n) => n.clone(),
            None => host_of(server).to_string(),
        };
        Ok(Tls {
            config: Arc::new(config),
            server_name: ServerName::try_from(host)?,
        })
    }
}

/// `host:port` → host, with IPv6 brackets removed.
pub fn host_of(server: &str) -> &str {
    let host = server.rsplit_once(':').map(|(h, _)| h).unwrap_or(server);
    host.trim_start_matches('[').trim_end_matches(']')
}

#[derive(Debug)]
struct AnyCert(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCert {
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
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Longest line accepted from a server; a longer one is a protocol error, not a memory leak.
pub const MAX_LINE: usize = 64 * 1024;

pub struct Conn {
    io: Box<dyn Io>,
    buf: Vec<u8>,
    pos: usize,
    pub timeout: Duration,
}

fn timed_out() -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, "timed out")
}

impl Conn {
    pub fn new(io: Box<dyn Io>, timeout: Duration) -> Self {
        Conn {
            io,
            buf: Vec::with_capacity(8192),
            pos: 0,
            timeout,
        }
    }

    /// Connects, with TLS from the first byte when `tls` is given.
    pub async fn connect(server: &str, tls: Option<&Tls>, timeout: Duration) -> io::Result<Conn> {
        let tcp = tokio::time::timeout(timeout, TcpStream::connect(server))
            .await
            .map_err(|_| timed_out())??;
        tcp.set_nodelay(true)?;
        let conn = Conn::new(Box::new(tcp), timeout);
        match tls {
            Some(t) => conn.upgrade(t).await,
            None => Ok(conn),
        }
    }

    /// Wraps the stream in TLS (STARTTLS / STLS). Bytes the server sent before the handshake
    /// would be plaintext injected into the secure session, so they are an error.
    pub async fn upgrade(self, tls: &Tls) -> io::Result<Conn> {
        if self.pos < self.buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "data received before the TLS handshake",
            ));
        }
        let connector = TlsConnector::from(tls.config.clone());
        let stream = tokio::time::timeout(
            self.timeout,
            connector.connect(tls.server_name.clone(), self.io),
        )
        .await
        .map_err(|_| timed_out())??;
        Ok(Conn::new(Box::new(stream), self.timeout))
    }

    async fn fill(&mut self) -> io::Result<()> {
        if self.pos > 0 && self.pos == self.buf.len() {
            self.buf.clear();
            self.pos = 0;
        } else if self.pos > 32 * 1024 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        let n = tokio::time::timeout(self.timeout, self.io.read_buf(&mut self.buf))
            .await
            .map_err(|_| timed_out())??;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed by server",
            ));
        }
        Ok(())
    }

    /// Next line without its CRLF (a bare LF is accepted too).
    pub async fn read_line(&mut self) -> io::Result<Vec<u8>> {
        // Offset from `pos` already searched; `fill` may move the buffer but keeps it relative.
        let mut scanned = 0;
        loop {
            let start = self.pos + scanned;
            if let Some(i) = self.buf[start..].iter().position(|b| *b == b'\n') {
                let end = start + i;
                let mut line = self.buf[self.pos..end].to_vec();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                self.pos = end + 1;
                return Ok(line);
            }
            scanned = self.buf.len() - self.pos;
            if scanned > MAX_LINE {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "server line too long",
                ));
            }
            self.fill().await?;
        }
    }

    /// Exactly `n` bytes (an IMAP literal), appended to `out`.
    pub async fn read_exact_into(&mut self, n: usize, out: &mut Vec<u8>) -> io::Result<()> {
        let mut left = n;
        while left > 0 {
            if self.pos == self.buf.len() {
                self.fill().await?;
            }
            let take = left.min(self.buf.len() - self.pos);
            out.extend_from_slice(&self.buf[self.pos..self.pos + take]);
            self.pos += take;
            left -= take;
        }
        Ok(())
    }

    pub async fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        tokio::time::timeout(self.timeout, async {
            self.io.write_all(data).await?;
            self.io.flush().await
        })
        .await
        .map_err(|_| timed_out())?
    }

    /// Writes several buffers as one batch (a pipelined command group), then flushes.
    pub async fn write_parts(&mut self, parts: &[&[u8]]) -> io::Result<()> {
        tokio::time::timeout(self.timeout, async {
            for p in parts {
                self.io.write_all(p).await?;
            }
            self.io.flush().await
        })
        .await
        .map_err(|_| timed_out())?
    }
}

/// The response code that opens a POP3/IMAP status text (`[IN-USE] locked` → `IN-USE`),
/// which tells an operator more than the bare `-ERR`/`NO`.
pub fn resp_code(text: &str) -> Option<&str> {
    let rest = text.trim_start().strip_prefix('[')?;
    let code = &rest[..rest.find(']')?];
    let code = code.split_whitespace().next()?;
    (!code.is_empty() && code.len() <= 32).then_some(code)
}

/// Maps an I/O failure to an error-tally key.
pub fn io_key(e: &io::Error) -> &'static str {
    match e.kind() {
        io::ErrorKind::TimedOut => "timeout",
        io::ErrorKind::ConnectionRefused => "connect-refused",
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::BrokenPipe => "closed",
        io::ErrorKind::InvalidData => "protocol",
        _ => "io",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn pair(server_bytes: &'static [u8]) -> Conn {
        let (a, mut b) = tokio::io::duplex(64);
        tokio::spawn(async move {
            // Dribble the bytes in tiny writes so lines span many reads.
            for chunk in server_bytes.chunks(3) {
                if b.write_all(chunk).await.is_err() {
                    return;
                }
            }
        });
        Conn::new(Box::new(a), Duration::from_secs(5))
    }

    #[tokio::test]
    async fn lines_and_literals_across_chunk_boundaries() {
        let mut c = pair(b"220 hello\r\nbare lf\n{5}\r\nabcdeline after\r\n").await;
        assert_eq!(c.read_line().await.unwrap(), b"220 hello");
        assert_eq!(c.read_line().await.unwrap(), b"bare lf");
        assert_eq!(c.read_line().await.unwrap(), b"{5}");
        let mut out = Vec::new();
        c.read_exact_into(5, &mut out).await.unwrap();
        assert_eq!(out, b"abcde");
        assert_eq!(c.read_line().await.unwrap(), b"line after");
        let e = c.read_line().await.unwrap_err();
        assert_eq!(io_key(&e), "closed");
    }

    #[tokio::test]
    async fn endless_line_is_an_error_not_unbounded_memory() {
        let (a, mut b) = tokio::io::duplex(4096);
        tokio::spawn(async move {
            let junk = vec![b'x'; 4096];
            for _ in 0..64 {
                if b.write_all(&junk).await.is_err() {
                    return;
                }
            }
        });
        let mut c = Conn::new(Box::new(a), Duration::from_secs(5));
        let e = c.read_line().await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }

    #[tokio::test]
    async fn silent_server_times_out() {
        let (a, _b) = tokio::io::duplex(64);
        let mut c = Conn::new(Box::new(a), Duration::from_millis(50));
        let e = c.read_line().await.unwrap_err();
        assert_eq!(io_key(&e), "timeout");
    }

    #[test]
    fn response_codes() {
        assert_eq!(resp_code("[IN-USE] maildrop is locked"), Some("IN-USE"));
        assert_eq!(resp_code("[UIDNEXT 5] next"), Some("UIDNEXT"));
        assert_eq!(resp_code("no code"), None);
        assert_eq!(resp_code("[unterminated"), None);
    }

    #[test]
    fn host_part() {
        assert_eq!(host_of("127.0.0.1:25"), "127.0.0.1");
        assert_eq!(host_of("[::1]:143"), "::1");
        assert_eq!(host_of("localhost"), "localhost");
    }
}
