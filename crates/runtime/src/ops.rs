//! The operations endpoint every service exposes: `GET /healthz` (alive), `GET /readyz`
//! (ready for traffic: a Kubernetes readiness probe) and `GET /metrics` (Prometheus text).
//! Minimal HTTP/1.1: one request per connection, bounded request size.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::Shutdown;

type MetricsFn = Arc<dyn Fn() -> String + Send + Sync>;

#[derive(Clone)]
pub struct Ops {
    ready: Arc<AtomicBool>,
    metrics: MetricsFn,
}

/// Serves the process's metrics registry (`crate::metrics`) at `/metrics`.
impl Default for Ops {
    fn default() -> Self {
        Ops {
            ready: Arc::new(AtomicBool::new(false)),
            metrics: Arc::new(crate::metrics::render_prometheus),
        }
    }
}

impl Ops {
    /// Serve `f()` at `/metrics` instead of the registry (append
    /// `crate::metrics::render_prometheus()` to keep the registry's metrics too).
    pub fn with_metrics(f: impl Fn() -> String + Send + Sync + 'static) -> Self {
        Ops {
            metrics: Arc::new(f),
            ..Default::default()
        }
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    fn respond(&self, request_line: &str) -> (u16, &'static str, String) {
        let path = request_line.split_whitespace().nth(1).unwrap_or("/");
        match path {
            "/healthz" | "/livez" => (200, "text/plain", "ok\n".into()),
            "/readyz" if self.is_ready() => (200, "text/plain", "ready\n".into()),
            "/readyz" => (503, "text/plain", "not ready\n".into()),
            "/metrics" => (200, "text/plain; version=0.0.4", (self.metrics)()),
            _ => (404, "text/plain", "not found\n".into()),
        }
    }

    /// Serve until shutdown begins; readiness turns false at once when it does.
    pub async fn serve(self, listener: TcpListener, shutdown: Shutdown) {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = shutdown.stopping() => { self.set_ready(false); return; }
            };
            let Ok((mut s, _)) = accepted else { continue };
            let me = self.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 2048];
                let mut n = 0;
                let read = tokio::time::timeout(Duration::from_secs(5), async {
                    while n < buf.len() {
                        let m = s.read(&mut buf[n..]).await?;
                        if m == 0 {
                            break;
                        }
                        n += m;
                        if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                            break;
                        }
                    }
                    Ok::<_, std::io::Error>(())
                })
                .await;
                if !matches!(read, Ok(Ok(()))) {
                    return;
                }
                let text = String::from_utf8_lossy(&buf[..n]);
                let line = text.lines().next().unwrap_or("");
                let (code, ctype, body) = me.respond(line);
                let reason = match code {
                    200 => "OK",
                    503 => "Service Unavailable",
                    _ => "Not Found",
                };
                let resp = format!(
                    "HTTP/1.1 {code} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let ops = Ops::with_metrics(|| "mailsuite_up 1\n".into());
        assert_eq!(ops.respond("GET /healthz HTTP/1.1").0, 200);
        assert_eq!(ops.respond("GET /readyz HTTP/1.1").0, 503);
        ops.set_ready(true);
        assert_eq!(ops.respond("GET /readyz HTTP/1.1").0, 200);
        assert_eq!(ops.respond("GET /metrics HTTP/1.1").2, "mailsuite_up 1\n");
        assert_eq!(ops.respond("GET /nope HTTP/1.1").0, 404);
    }

    #[test]
    fn default_serves_the_metrics_registry() {
        crate::metrics::counter("mailsuite_test_ops_default_total", &[]).inc();
        let body = Ops::default().respond("GET /metrics HTTP/1.1").2;
        assert!(
            body.contains("mailsuite_test_ops_default_total 1"),
            "{body}"
        );
    }

    #[tokio::test]
    async fn serves_over_tcp_and_stops() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let ops = Ops::default();
        ops.set_ready(true);
        let sd = Shutdown::new();
        let task = tokio::spawn(ops.clone().serve(l, sd.clone()));
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        sd.trigger();
        task.await.unwrap();
        assert!(!ops.is_ready());
    }
}
