//! A TCP listener that enforces a global and a per-IP connection limit. Connections over a
//! limit are handed back as `Refused`, so the protocol can send its own refusal (SMTP 421,
//! POP3 -ERR, IMAP BYE) before closing.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::limiter::{ClientKey, client_key};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ConnLimits {
    /// Connections open at once on this listener; 0 = unlimited.
    pub max_connections: usize,
    /// Connections open at once from one IP address; 0 = unlimited.
    pub max_per_ip: usize,
}

impl Default for ConnLimits {
    fn default() -> Self {
        ConnLimits {
            max_connections: 10_000,
            max_per_ip: 50,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefuseReason {
    TooManyConnections,
    TooManyFromIp,
}

#[derive(Default, Debug)]
struct Counts {
    total: usize,
    /// By `client_key`, so that one host cannot take every slot with the addresses of its /64.
    per_ip: HashMap<ClientKey, usize>,
}

/// Held by an accepted connection; releases its slot when dropped.
#[derive(Debug)]
pub struct ConnGuard {
    counts: Arc<Mutex<Counts>>,
    ip: ClientKey,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.per_ip.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.per_ip.remove(&self.ip);
            }
        }
    }
}

pub enum Admission {
    Accepted {
        stream: TcpStream,
        peer: SocketAddr,
        guard: ConnGuard,
    },
    Refused {
        stream: TcpStream,
        peer: SocketAddr,
        reason: RefuseReason,
    },
}

pub struct LimitedListener {
    inner: TcpListener,
    limits: ConnLimits,
    counts: Arc<Mutex<Counts>>,
}

impl LimitedListener {
    pub async fn bind(addr: &str, limits: ConnLimits) -> std::io::Result<Self> {
        let inner = TcpListener::bind(addr)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
        Ok(Self::from_listener(inner, limits))
    }

    pub fn from_listener(inner: TcpListener, limits: ConnLimits) -> Self {
        LimitedListener {
            inner,
            limits,
            counts: Arc::default(),
        }
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    /// Open connections right now.
    pub fn open_connections(&self) -> usize {
        self.counts.lock().map(|c| c.total).unwrap_or(0)
    }

    pub async fn accept(&self) -> std::io::Result<Admission> {
        let (stream, peer) = self.inner.accept().await?;
        let _ = stream.set_nodelay(true);
        Ok(match self.admit(peer.ip()) {
            Ok(guard) => Admission::Accepted {
                stream,
                peer,
                guard,
            },
            Err(reason) => Admission::Refused {
                stream,
                peer,
                reason,
            },
        })
    }

    /// Take a slot for a connection from `ip` (counted under its `client_key`), or say which
    /// limit it is over.
    fn admit(&self, ip: IpAddr) -> Result<ConnGuard, RefuseReason> {
        let ip = client_key(ip);
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if self.limits.max_connections > 0 && c.total >= self.limits.max_connections {
            return Err(RefuseReason::TooManyConnections);
        }
        let from_ip = c.per_ip.get(&ip).copied().unwrap_or(0);
        if self.limits.max_per_ip > 0 && from_ip >= self.limits.max_per_ip {
            return Err(RefuseReason::TooManyFromIp);
        }
        c.total += 1;
        *c.per_ip.entry(ip).or_insert(0) += 1;
        Ok(ConnGuard {
            counts: self.counts.clone(),
            ip,
        })
    }
}

/// Serve a listener until shutdown begins: each admitted connection runs `handle` as a task
/// that shutdown waits for (its slot is released when it ends); a connection over a limit
/// gets `refusal` (if any, within 5 s) and is closed; accept errors (typically out of file
/// descriptors) pause instead of spinning. Counts `metric{listener, result}`.
///
/// `refusal` must be `None` on implicit-TLS listeners: plaintext there is garbage to the client.
pub async fn accept_loop<H, Fut>(
    listener: LimitedListener,
    shutdown: crate::Shutdown,
    metric: &'static str,
    listener_name: &'static str,
    refusal: Option<&'static [u8]>,
    handle: H,
) where
    H: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    use tokio::io::AsyncWriteExt;
    let count = |result| {
        crate::metrics::counter(metric, &[("listener", listener_name), ("result", result)]).inc()
    };
    loop {
        let admission = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.stopping() => return,
        };
        match admission {
            Ok(Admission::Accepted {
                stream,
                peer,
                guard,
            }) => {
                count("accepted");
                let session = handle(stream, peer);
                shutdown.spawn(async move {
                    session.await;
                    drop(guard);
                });
            }
            Ok(Admission::Refused {
                mut stream,
                peer,
                reason,
            }) => {
                count("refused");
                tracing::info!(%peer, ?reason, "connection refused");
                if let Some(text) = refusal {
                    shutdown.spawn(async move {
                        let _ = tokio::time::timeout(
                            std::time::Duration::from_secs(5),
                            stream.write_all(text),
                        )
                        .await;
                    });
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
                    _ = shutdown.stopping() => return,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn bind(max_connections: usize, max_per_ip: usize) -> LimitedListener {
        let limits = ConnLimits {
            max_connections,
            max_per_ip,
        };
        LimitedListener::bind("127.0.0.1:0", limits).await.unwrap()
    }

    async fn admit(l: &LimitedListener, addr: SocketAddr) -> (TcpStream, Admission) {
        let client = TcpStream::connect(addr).await.unwrap();
        (client, l.accept().await.unwrap())
    }

    #[tokio::test]
    async fn per_ip_limit_refuses_and_releases() {
        let l = bind(100, 2).await;
        let addr = l.local_addr().unwrap();
        let (_c1, a1) = admit(&l, addr).await;
        let (_c2, a2) = admit(&l, addr).await;
        let (_c3, a3) = admit(&l, addr).await;
        assert!(matches!(a1, Admission::Accepted { .. }));
        assert!(matches!(a2, Admission::Accepted { .. }));
        assert!(matches!(
            a3,
            Admission::Refused {
                reason: RefuseReason::TooManyFromIp,
                ..
            }
        ));
        assert_eq!(l.open_connections(), 2);
        drop(a1);
        assert_eq!(l.open_connections(), 1);
        let (_c4, a4) = admit(&l, addr).await;
        assert!(
            matches!(a4, Admission::Accepted { .. }),
            "slot freed by the closed connection"
        );
    }

    #[tokio::test]
    async fn global_limit_refuses() {
        let l = bind(1, 0).await;
        let addr = l.local_addr().unwrap();
        let (_c1, a1) = admit(&l, addr).await;
        let (_c2, a2) = admit(&l, addr).await;
        assert!(matches!(a1, Admission::Accepted { .. }));
        assert!(matches!(
            a2,
            Admission::Refused {
                reason: RefuseReason::TooManyConnections,
                ..
            }
        ));
    }

    /// M4: one host holding a /64 must not get a fresh per-IP allowance for every address in
    /// it; the per-IP limit applies to the whole /64, and a slot is released to the /64.
    #[tokio::test]
    async fn m4_ipv6_per_ip_limit_counts_the_whole_64() {
        let l = bind(100, 2).await;
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let g1 = l.admit(ip("2001:db8:0:1::1")).expect("first address");
        let _g2 = l.admit(ip("2001:db8:0:1::2")).expect("second address");
        assert_eq!(
            l.admit(ip("2001:db8:0:1:dead:beef:0:3")).err(),
            Some(RefuseReason::TooManyFromIp),
            "a third address of the same /64 is over the per-IP limit"
        );
        assert!(
            l.admit(ip("2001:db8:0:2::1")).is_ok(),
            "another /64 has its own allowance"
        );
        drop(g1);
        assert!(
            l.admit(ip("2001:db8:0:1::9")).is_ok(),
            "the released slot belongs to the /64"
        );
    }

    /// A dual-stack socket reports an IPv4 client as IPv4-mapped IPv6: it is still the one
    /// IPv4 client and shares that address's allowance.
    #[tokio::test]
    async fn ipv4_mapped_clients_share_the_ipv4_allowance() {
        let l = bind(100, 1).await;
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let _g = l.admit(ip("192.0.2.7")).expect("first connection");
        assert_eq!(
            l.admit(ip("::ffff:192.0.2.7")).err(),
            Some(RefuseReason::TooManyFromIp)
        );
        assert!(l.admit(ip("192.0.2.8")).is_ok());
    }
}
