//! A TCP listener that enforces a global and a per-IP connection limit. Connections over a
//! limit are handed back as `Refused`, so the protocol can send its own refusal (SMTP 421,
//! POP3 -ERR, IMAP BYE) before closing.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::limiter::{ClientKey, client_key};
use crate::proxy_protocol::{ProxyError, ProxyPolicy, read_header};
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
    /// `None` while a proxied connection's client is not known yet (it holds only a slot of
    /// the listener's total then).
    ip: Option<ClientKey>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        c.total = c.total.saturating_sub(1);
        if let Some(ip) = self.ip
            && let Some(n) = c.per_ip.get_mut(&ip)
        {
            *n -= 1;
            if *n == 0 {
                c.per_ip.remove(&ip);
            }
        }
    }
}

pub enum Admission {
    /// `peer` is the client: the TCP peer, or on a PROXY listener the address the balancer's
    /// header gave.
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
    /// A connection from a trusted balancer on a PROXY listener. It holds a slot of the
    /// listener's total; [`Pending::admit`] reads the PROXY header and applies the per-IP
    /// limit to the client address in it. Not read by `accept` itself, so that one slow
    /// balancer connection does not hold up the accept loop.
    Pending(Pending),
}

/// See [`Admission::Pending`].
pub struct Pending {
    stream: TcpStream,
    peer: SocketAddr,
    guard: ConnGuard,
    max_per_ip: usize,
    header_timeout: Duration,
}

/// A connection from a trusted balancer without a valid PROXY header in time; closed
/// (dropped) without a word.
#[derive(Debug)]
pub struct ProxyRejected {
    /// The balancer.
    pub peer: SocketAddr,
    pub error: ProxyError,
}

impl Pending {
    /// The balancer's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Read the PROXY header within the listener's time limit, then take a per-IP slot for
    /// the client it names (the balancer's own address for LOCAL/UNKNOWN). Never returns
    /// `Pending`. On error the connection is closed.
    pub async fn admit(mut self) -> Result<Admission, ProxyRejected> {
        let proxied = read_header(&mut self.stream, self.header_timeout)
            .await
            .map_err(|error| ProxyRejected {
                peer: self.peer,
                error,
            })?;
        let client = proxied.client(self.peer);
        let Pending {
            stream,
            mut guard,
            max_per_ip,
            ..
        } = self;
        Ok(match guard.add_ip(client.ip(), max_per_ip) {
            Ok(()) => Admission::Accepted {
                stream,
                peer: client,
                guard,
            },
            Err(reason) => Admission::Refused {
                stream,
                peer: client,
                reason,
            },
        })
    }
}

impl ConnGuard {
    /// Count this connection (which holds only a slot of the total) for `ip` too.
    fn add_ip(&mut self, ip: IpAddr, max_per_ip: usize) -> Result<(), RefuseReason> {
        let ip = client_key(ip);
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let from_ip = c.per_ip.get(&ip).copied().unwrap_or(0);
        if max_per_ip > 0 && from_ip >= max_per_ip {
            return Err(RefuseReason::TooManyFromIp);
        }
        *c.per_ip.entry(ip).or_insert(0) += 1;
        self.ip = Some(ip);
        Ok(())
    }
}

pub struct LimitedListener {
    inner: TcpListener,
    limits: ConnLimits,
    counts: Arc<Mutex<Counts>>,
    proxy: Option<ProxyPolicy>,
}

impl LimitedListener {
    pub async fn bind(addr: &str, limits: ConnLimits) -> std::io::Result<Self> {
        let inner = TcpListener::bind(addr)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
        Ok(Self::from_listener(inner, limits))
    }

    /// A configured listener: bound at `addr` with `limits`, expecting PROXY headers as `proxy`
    /// says; `None` when `addr` is empty (the listener is disabled).
    pub async fn bind_configured(
        addr: &str,
        limits: ConnLimits,
        proxy: Option<ProxyPolicy>,
    ) -> std::io::Result<Option<Self>> {
        if addr.is_empty() {
            return Ok(None);
        }
        Ok(Some(Self::bind(addr, limits).await?.with_proxy(proxy)))
    }

    /// Every listener of a protocol gateway, by name: `addrs[i]` is bound as `names[i]`
    /// (`None` where the address is empty), each with `limits` and the PROXY policy `proxy`
    /// gives that name (unknown names in `proxy` are refused first); and the ops listener at
    /// `ops` (`None` when empty).
    pub async fn bind_all<const N: usize>(
        addrs: [&str; N],
        names: &[&str; N],
        limits: ConnLimits,
        proxy: &crate::proxy_protocol::ProxyProtocolConfig,
        ops: &str,
    ) -> Result<([Option<Self>; N], Option<TcpListener>), crate::service::StartError> {
        proxy.validate(names)?;
        let mut bound: [Option<Self>; N] = std::array::from_fn(|_| None);
        for (i, addr) in addrs.iter().enumerate() {
            bound[i] = Self::bind_configured(addr, limits, proxy.policy(names[i])).await?;
        }
        let ops = if ops.is_empty() {
            None
        } else {
            Some(crate::grpc::bind(ops).await?.0)
        };
        Ok((bound, ops))
    }

    pub fn from_listener(inner: TcpListener, limits: ConnLimits) -> Self {
        LimitedListener {
            inner,
            limits,
            counts: Arc::default(),
            proxy: None,
        }
    }

    /// Expect a PROXY header from the peers `proxy` trusts (`None`: from nobody, the default).
    pub fn with_proxy(mut self, proxy: Option<ProxyPolicy>) -> Self {
        self.proxy = proxy;
        self
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
        let proxy = self.proxy.as_ref().filter(|p| p.trusts(peer.ip()));
        // From a balancer only the total counts now; its clients are counted once known.
        Ok(match self.admit(proxy.is_none().then_some(peer.ip())) {
            Ok(guard) => match proxy {
                Some(p) => Admission::Pending(Pending {
                    stream,
                    peer,
                    guard,
                    max_per_ip: self.limits.max_per_ip,
                    header_timeout: p.header_timeout,
                }),
                None => Admission::Accepted {
                    stream,
                    peer,
                    guard,
                },
            },
            Err(reason) => Admission::Refused {
                stream,
                peer,
                reason,
            },
        })
    }

    /// Take a slot for a connection, counted under the `client_key` of `ip` if given, or say
    /// which limit it is over.
    fn admit(&self, ip: Option<IpAddr>) -> Result<ConnGuard, RefuseReason> {
        let ip = ip.map(client_key);
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if self.limits.max_connections > 0 && c.total >= self.limits.max_connections {
            return Err(RefuseReason::TooManyConnections);
        }
        if let Some(ip) = ip {
            let from_ip = c.per_ip.get(&ip).copied().unwrap_or(0);
            if self.limits.max_per_ip > 0 && from_ip >= self.limits.max_per_ip {
                return Err(RefuseReason::TooManyFromIp);
            }
            *c.per_ip.entry(ip).or_insert(0) += 1;
        }
        c.total += 1;
        Ok(ConnGuard {
            counts: self.counts.clone(),
            ip,
        })
    }
}

/// Serve a listener until shutdown begins: each admitted connection runs `handle` as a task
/// that shutdown waits for (its slot is released when it ends); a connection over a limit
/// gets `refusal` (if any, within 5 s) and is closed; accept errors (typically out of file
/// descriptors) pause instead of spinning. Counts `metric{listener, result}` (`accepted`,
/// `refused`, and `proxy_rejected` for a trusted balancer's connection without a valid PROXY
/// header in time, which is closed without a word; `proxy_closed` when it closed before
/// sending anything, as TCP health checks do).
///
/// On a listener `with_proxy`, `handle` gets the client address from the PROXY header; the
/// header is read in the connection's own task, never in the loop.
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
    H: Fn(TcpStream, SocketAddr) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    use tokio::io::AsyncWriteExt;
    let count = move |result| {
        crate::metrics::counter(metric, &[("listener", listener_name), ("result", result)]).inc()
    };
    let refuse = move |mut stream: TcpStream, peer: SocketAddr, reason: RefuseReason| {
        count("refused");
        tracing::info!(%peer, ?reason, listener = listener_name, "connection refused");
        async move {
            if let Some(text) = refusal {
                let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                    let _ = stream.write_all(text).await;
                    let _ = stream.shutdown().await;
                })
                .await;
            }
        }
    };
    let handle = Arc::new(handle);
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
                stream,
                peer,
                reason,
            }) => {
                shutdown.spawn(refuse(stream, peer, reason));
            }
            Ok(Admission::Pending(pending)) => {
                let (handle, stopping) = (handle.clone(), shutdown.clone());
                shutdown.spawn(async move {
                    let admitted = tokio::select! {
                        a = pending.admit() => a,
                        _ = stopping.stopping() => return,
                    };
                    match admitted {
                        Ok(Admission::Accepted {
                            stream,
                            peer,
                            guard,
                        }) => {
                            count("accepted");
                            tracing::debug!(%peer, listener = listener_name, "proxied connection");
                            handle(stream, peer).await;
                            drop(guard);
                        }
                        Ok(Admission::Refused {
                            stream,
                            peer,
                            reason,
                        }) => refuse(stream, peer, reason).await,
                        // `admit` reads one header and never answers Pending.
                        Ok(Admission::Pending(_)) => {}
                        // A balancer's TCP health check: connect, close. Not worth a log
                        // line every few seconds.
                        Err(ProxyRejected {
                            peer,
                            error: ProxyError::Closed,
                        }) => {
                            count("proxy_closed");
                            tracing::debug!(balancer = %peer, "closed before the PROXY header");
                        }
                        Err(ProxyRejected { peer, error }) => {
                            count("proxy_rejected");
                            tracing::info!(
                                balancer = %peer,
                                listener = listener_name,
                                %error,
                                "trusted balancer sent no valid PROXY header: connection closed"
                            );
                        }
                    }
                });
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
        let g1 = l.admit(Some(ip("2001:db8:0:1::1"))).expect("first address");
        let _g2 = l
            .admit(Some(ip("2001:db8:0:1::2")))
            .expect("second address");
        assert_eq!(
            l.admit(Some(ip("2001:db8:0:1:dead:beef:0:3"))).err(),
            Some(RefuseReason::TooManyFromIp),
            "a third address of the same /64 is over the per-IP limit"
        );
        assert!(
            l.admit(Some(ip("2001:db8:0:2::1"))).is_ok(),
            "another /64 has its own allowance"
        );
        drop(g1);
        assert!(
            l.admit(Some(ip("2001:db8:0:1::9"))).is_ok(),
            "the released slot belongs to the /64"
        );
    }

    /// A dual-stack socket reports an IPv4 client as IPv4-mapped IPv6: it is still the one
    /// IPv4 client and shares that address's allowance.
    #[tokio::test]
    async fn ipv4_mapped_clients_share_the_ipv4_allowance() {
        let l = bind(100, 1).await;
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let _g = l.admit(Some(ip("192.0.2.7"))).expect("first connection");
        assert_eq!(
            l.admit(Some(ip("::ffff:192.0.2.7"))).err(),
            Some(RefuseReason::TooManyFromIp)
        );
        assert!(l.admit(Some(ip("192.0.2.8"))).is_ok());
    }

    fn v2_header(src: &str) -> Vec<u8> {
        let addrs: ppp::v2::Addresses = (
            src.parse::<SocketAddr>().unwrap(),
            "10.0.0.2:25".parse::<SocketAddr>().unwrap(),
        )
            .into();
        ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            addrs,
        )
        .build()
        .unwrap()
    }

    fn loopback_trusted() -> Option<ProxyPolicy> {
        Some(ProxyPolicy {
            trusted: vec!["127.0.0.0/8".parse().unwrap()],
            header_timeout: Duration::from_secs(5),
        })
    }

    /// A connection from a trusted balancer: `accept` holds only a slot of the total, and
    /// `admit` counts it for the client its header names.
    async fn proxied(l: &LimitedListener, addr: SocketAddr, src: &str) -> (TcpStream, Admission) {
        use tokio::io::AsyncWriteExt;
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(&v2_header(src)).await.unwrap();
        let Admission::Pending(p) = l.accept().await.unwrap() else {
            panic!("a trusted peer's connection waits for its header");
        };
        (client, p.admit().await.expect("valid header"))
    }

    #[tokio::test]
    async fn proxied_clients_are_counted_by_the_address_in_the_header() {
        let l = bind(100, 1).await.with_proxy(loopback_trusted());
        let addr = l.local_addr().unwrap();
        let (_c1, a1) = proxied(&l, addr, "203.0.113.7:4000").await;
        let Admission::Accepted { peer, .. } = &a1 else {
            panic!("first client accepted")
        };
        assert_eq!(*peer, "203.0.113.7:4000".parse().unwrap());
        // Another client through the same balancer has its own allowance...
        let (_c2, a2) = proxied(&l, addr, "203.0.113.8:4000").await;
        assert!(matches!(a2, Admission::Accepted { .. }));
        // ...while the same client on a second connection shares it.
        let (_c3, a3) = proxied(&l, addr, "203.0.113.7:4001").await;
        assert!(matches!(
            a3,
            Admission::Refused {
                reason: RefuseReason::TooManyFromIp,
                peer,
                ..
            } if peer.ip() == "203.0.113.7".parse::<IpAddr>().unwrap()
        ));
        assert_eq!(
            l.open_connections(),
            2,
            "the refused one gave its slot back"
        );
        drop(a1);
        let (_c4, a4) = proxied(&l, addr, "203.0.113.7:4002").await;
        assert!(matches!(a4, Admission::Accepted { .. }), "slot released");
    }

    #[tokio::test]
    async fn a_trusted_peer_without_a_header_is_rejected() {
        use tokio::io::AsyncWriteExt;
        let l = bind(100, 0).await.with_proxy(loopback_trusted());
        let addr = l.local_addr().unwrap();
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(b"EHLO client.example\r\n").await.unwrap();
        let Admission::Pending(p) = l.accept().await.unwrap() else {
            panic!("pending")
        };
        let err = p.admit().await.err().expect("no header");
        assert!(matches!(err.error, ProxyError::Missing), "{err:?}");
        assert_eq!(l.open_connections(), 0);
        // A health check: connect, close.
        drop(TcpStream::connect(addr).await.unwrap());
        let Admission::Pending(p) = l.accept().await.unwrap() else {
            panic!("pending")
        };
        let err = p.admit().await.err().expect("no header");
        assert!(matches!(err.error, ProxyError::Closed), "{err:?}");
        assert_eq!(l.open_connections(), 0);
    }

    #[tokio::test]
    async fn untrusted_peers_and_plain_listeners_are_direct() {
        let untrusted = Some(ProxyPolicy {
            trusted: vec!["192.0.2.0/24".parse().unwrap()],
            header_timeout: Duration::from_secs(5),
        });
        for proxy in [untrusted, None] {
            let l = bind(100, 1).await.with_proxy(proxy);
            let addr = l.local_addr().unwrap();
            let (_c1, a1) = admit(&l, addr).await;
            let Admission::Accepted { peer, .. } = a1 else {
                panic!("direct connection accepted at once")
            };
            assert!(peer.ip().is_loopback());
            let (_c2, a2) = admit(&l, addr).await;
            assert!(matches!(
                a2,
                Admission::Refused {
                    reason: RefuseReason::TooManyFromIp,
                    ..
                }
            ));
        }
    }
}
