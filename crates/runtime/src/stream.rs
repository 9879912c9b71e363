//! The byte stream every protocol session runs on: plain or TLS over any transport (TCP, an
//! in-memory pipe in tests), upgraded in place by `into_tls` (STARTTLS, STLS) or accepted as
//! TLS from the first byte (465, 993, 995), with writes that cannot stall forever.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// How long a client gets to complete a TLS handshake.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// What was negotiated, for `Received:` headers and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsInfo {
    /// `TLSv1.3`, `TLSv1.2`.
    pub version: String,
    /// The IANA name of the cipher suite.
    pub cipher: String,
}

/// Plain or TLS, one type for the whole session.
pub enum MailStream<S> {
    Plain(S),
    Tls(Box<TlsStream<S>>),
}

impl<S: AsyncRead + AsyncWrite + Unpin> MailStream<S> {
    /// TLS from the first byte (implicit TLS), the handshake bounded by `timeout`.
    pub async fn accept(
        stream: S,
        acceptor: &TlsAcceptor,
        timeout: Duration,
    ) -> io::Result<MailStream<S>> {
        let tls = tokio::time::timeout(timeout, acceptor.accept(stream))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        Ok(MailStream::Tls(Box::new(tls)))
    }

    /// STARTTLS / STLS: the plain stream becomes TLS. Anything the client sent after the
    /// command and before the handshake is the caller's to discard (it came in plaintext).
    /// A stream that is already TLS cannot start it again.
    pub async fn into_tls(self, acceptor: &TlsAcceptor, timeout: Duration) -> io::Result<Self> {
        match self {
            MailStream::Plain(s) => MailStream::accept(s, acceptor, timeout).await,
            MailStream::Tls(_) => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "TLS is already active",
            )),
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, MailStream::Tls(_))
    }

    /// The negotiated protocol and cipher (`None` on a plain stream).
    pub fn tls_info(&self) -> Option<TlsInfo> {
        let MailStream::Tls(tls) = self else {
            return None;
        };
        let conn = tls.get_ref().1;
        Some(TlsInfo {
            version: conn
                .protocol_version()
                .and_then(|v| v.as_str())
                .unwrap_or("TLS")
                .replace('_', "."),
            cipher: conn
                .negotiated_cipher_suite()
                .and_then(|c| c.suite().as_str())
                .unwrap_or("unknown")
                .to_string(),
        })
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for MailStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MailStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            MailStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for MailStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MailStream::Plain(s) => Pin::new(s).poll_write(cx, data),
            MailStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, data),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            MailStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            MailStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            MailStream::Plain(s) => s.is_write_vectored(),
            MailStream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MailStream::Plain(s) => Pin::new(s).poll_flush(cx),
            MailStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            MailStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            MailStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Fails a write, flush or shutdown that makes no progress for `timeout`: a client that
/// stops reading must not pin the connection (and the buffers behind it) forever. Wrap the
/// transport beneath TLS, so that TLS records and the goodbye are bounded too.
pub struct WriteTimeout<S> {
    inner: S,
    timeout: Duration,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> WriteTimeout<S> {
    pub fn new(inner: S, timeout: Duration) -> Self {
        WriteTimeout {
            inner,
            timeout,
            deadline: None,
        }
    }

    fn guard<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if r.is_ready() {
            self.deadline = None;
            return r;
        }
        let timeout = self.timeout;
        let deadline = self
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.deadline = None;
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "client stopped reading: write timed out",
                )))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteTimeout<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteTimeout<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        self.guard(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.guard(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.guard(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.guard(cx, r)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    fn tls() -> (TlsAcceptor, std::sync::Arc<rustls::ClientConfig>) {
        crate::tls::install_crypto_provider();
        let cert = rcgen::generate_simple_self_signed(vec!["mail.test".into()]).unwrap();
        let der = cert.cert.der().clone();
        let key = rustls_pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
        let server = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![der.clone()], key)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der).unwrap();
        let client = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (
            TlsAcceptor::from(std::sync::Arc::new(server)),
            std::sync::Arc::new(client),
        )
    }

    #[tokio::test]
    async fn starttls_upgrades_in_place_and_only_once() {
        let (acceptor, client_cfg) = tls();
        let (server_end, client_end) = tokio::io::duplex(64 * 1024);
        let client = tokio::spawn(async move {
            let mut c = client_end;
            c.write_all(b"plain\n").await.unwrap();
            let connector = tokio_rustls::TlsConnector::from(client_cfg);
            let name = rustls_pki_types::ServerName::try_from("mail.test").unwrap();
            let mut t = connector.connect(name, c).await.unwrap();
            t.write_all(b"secret\n").await.unwrap();
            let mut back = [0u8; 3];
            t.read_exact(&mut back).await.unwrap();
            back
        });
        let mut s = MailStream::Plain(server_end);
        let mut line = [0u8; 6];
        s.read_exact(&mut line).await.unwrap();
        assert_eq!(&line, b"plain\n");
        assert!(!s.is_tls() && s.tls_info().is_none());
        let mut s = s.into_tls(&acceptor, TLS_HANDSHAKE_TIMEOUT).await.unwrap();
        assert!(s.is_tls());
        let info = s.tls_info().unwrap();
        assert!(info.version.starts_with("TLSv1."), "{info:?}");
        let mut secret = [0u8; 7];
        s.read_exact(&mut secret).await.unwrap();
        assert_eq!(&secret, b"secret\n");
        s.write_all(b"ok\n").await.unwrap();
        s.flush().await.unwrap();
        assert_eq!(&client.await.unwrap(), b"ok\n");
        let again = s.into_tls(&acceptor, TLS_HANDSHAKE_TIMEOUT).await;
        assert_eq!(again.err().unwrap().kind(), io::ErrorKind::InvalidInput);
    }

    #[tokio::test]
    async fn a_client_that_never_handshakes_times_out() {
        let (acceptor, _) = tls();
        let (server_end, _client_end) = tokio::io::duplex(1024);
        let r = MailStream::accept(server_end, &acceptor, Duration::from_millis(50)).await;
        assert_eq!(r.err().unwrap().kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn a_write_the_peer_never_reads_fails_after_the_timeout() {
        let (server_end, _client_end) = tokio::io::duplex(16);
        let mut s = WriteTimeout::new(server_end, Duration::from_millis(50));
        let r = s.write_all(&[b'x'; 1024]).await;
        assert_eq!(r.unwrap_err().kind(), io::ErrorKind::TimedOut);
    }
}
