//! The PROXY protocol header (HAProxy's spec, v1 text and v2 binary) that a load balancer
//! sends before the client's first byte, so the service sees the client's address instead of
//! the balancer's (per-client limits, SPF, iprev, logs). Parsing is `ppp`'s; what is ours is
//! reading exactly the header from the stream and not one byte of the client's protocol after
//! it, with a time limit, and turning it into the client's address.
//!
//! Only connections from trusted balancers may send it: from anyone else a PROXY header would
//! let the client claim any address. The caller checks the TCP peer against the trusted list
//! before calling [`read_header`].

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::net::ClientNet;

/// The `proxy_protocol` table of every service with client listeners (smtp-ingress,
/// pop3-gateway, imap-gateway): which listeners sit behind a balancer that sends a PROXY
/// header, and which peers are those balancers.
///
/// On a listed listener, a connection from a `trusted` peer must start with a PROXY header
/// (v1 or v2) within `header_timeout_secs`, or it is closed without a greeting; the client
/// address in the header is then the connection's address for every limit, check and log.
/// A connection from any other peer is served as a direct one with its own address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyProtocolConfig {
    /// The balancers: addresses or networks (`172.16.0.0/12`, `10.0.0.5`, `fd00::/8`).
    pub trusted: Vec<ClientNet>,
    /// The listeners that expect the header, by name (smtp-ingress: `smtp`, `submission`,
    /// `submissions`; pop3-gateway: `pop3`, `pop3s`; imap-gateway: `imap`, `imaps`).
    /// Empty: none.
    pub listeners: Vec<String>,
    /// How long a trusted peer has to send the whole header.
    pub header_timeout_secs: u64,
}

impl Default for ProxyProtocolConfig {
    fn default() -> Self {
        ProxyProtocolConfig {
            trusted: Vec::new(),
            listeners: Vec::new(),
            header_timeout_secs: 5,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProxyConfigError {
    #[error("proxy_protocol.listeners: {0:?} is not a listener of this service (known: {1})")]
    UnknownListener(String, String),
    #[error(
        "proxy_protocol.listeners is set but proxy_protocol.trusted is empty: \
         no peer would be allowed to send the PROXY header"
    )]
    NoTrustedPeers,
}

impl ProxyProtocolConfig {
    /// Refuse listener names the service does not have (`known`), and listeners without
    /// any trusted peer (a setting that would silently do nothing).
    pub fn validate(&self, known: &[&str]) -> Result<(), ProxyConfigError> {
        if let Some(bad) = self.listeners.iter().find(|l| !known.contains(&l.as_str())) {
            return Err(ProxyConfigError::UnknownListener(
                bad.clone(),
                known.join(", "),
            ));
        }
        if !self.listeners.is_empty() && self.trusted.is_empty() {
            return Err(ProxyConfigError::NoTrustedPeers);
        }
        Ok(())
    }

    /// The policy of the listener called `listener`, if it expects the header.
    pub fn policy(&self, listener: &str) -> Option<ProxyPolicy> {
        self.listeners
            .iter()
            .any(|l| l == listener)
            .then(|| ProxyPolicy {
                trusted: self.trusted.iter().map(ClientNet::net).collect(),
                header_timeout: Duration::from_secs(self.header_timeout_secs.max(1)),
            })
    }
}

/// What one PROXY-enabled listener does: who may send the header, and how long they have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyPolicy {
    pub trusted: Vec<ipnet::IpNet>,
    pub header_timeout: Duration,
}

impl ProxyPolicy {
    /// Must a connection from `peer` start with a PROXY header?
    pub fn trusts(&self, peer: IpAddr) -> bool {
        trusted(peer, &self.trusted)
    }
}

/// What a v1 header can be at most, CRLF included (the spec's 107 octets).
const V1_MAX: usize = 107;
/// Enough to tell v1 from v2: v2's signature is 12 octets; the shortest v1 header
/// (`PROXY UNKNOWN\r\n`) is 15.
const PROBE: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("reading the PROXY header: {0}")]
    Io(#[from] std::io::Error),
    #[error("no PROXY header within {0:?}")]
    Timeout(Duration),
    #[error("the connection does not start with a PROXY header")]
    Missing,
    /// Closed before sending a single byte: typically a balancer's TCP health check.
    #[error("closed before sending anything")]
    Closed,
    #[error("malformed PROXY header: {0}")]
    Malformed(String),
}

/// What the header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proxied {
    /// A proxied TCP connection: the client's address and the address it connected to.
    Tcp {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// The balancer's own connection (v2 LOCAL, e.g. a health check) or an address family
    /// that is not TCP (v1 UNKNOWN, UNIX sockets): use the TCP peer's address.
    Local,
}

impl Proxied {
    /// The client's address: the proxied source, else `peer`.
    pub fn client(&self, peer: SocketAddr) -> SocketAddr {
        match self {
            Proxied::Tcp { source, .. } => *source,
            Proxied::Local => peer,
        }
    }
}

/// Is `peer` one of the balancers allowed to send a PROXY header?
pub fn trusted(peer: IpAddr, balancers: &[ipnet::IpNet]) -> bool {
    let peer = match peer {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(peer, IpAddr::V4),
        v4 => v4,
    };
    balancers.iter().any(|n| n.contains(&peer))
}

/// Read one PROXY header (v1 or v2) from the start of `stream` within `limit`, consuming
/// exactly its bytes.
pub async fn read_header<S: AsyncRead + Unpin>(
    stream: &mut S,
    limit: Duration,
) -> Result<Proxied, ProxyError> {
    tokio::time::timeout(limit, read(stream))
        .await
        .map_err(|_| ProxyError::Timeout(limit))?
}

async fn read<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Proxied, ProxyError> {
    let mut buf = vec![0u8; PROBE];
    // No header is shorter than the probe, so this never takes a byte past the header.
    let first = stream.read(&mut buf).await?;
    if first == 0 {
        return Err(ProxyError::Closed);
    }
    stream.read_exact(&mut buf[first..]).await?;
    if buf == ppp::v2::PROTOCOL_PREFIX {
        let mut fixed = [0u8; 4];
        stream.read_exact(&mut fixed).await?;
        buf.extend_from_slice(&fixed);
        // At most 65,535 octets by construction (a u16 length).
        let len = u16::from_be_bytes([fixed[2], fixed[3]]) as usize;
        let start = buf.len();
        buf.resize(start + len, 0);
        stream.read_exact(&mut buf[start..]).await?;
        let h = ppp::v2::Header::try_from(buf.as_slice())
            .map_err(|e| ProxyError::Malformed(e.to_string()))?;
        return Ok(match (h.command, h.addresses) {
            (ppp::v2::Command::Proxy, ppp::v2::Addresses::IPv4(a)) => tcp4(a),
            (ppp::v2::Command::Proxy, ppp::v2::Addresses::IPv6(a)) => tcp6(a),
            _ => Proxied::Local,
        });
    }
    if !buf.starts_with(b"PROXY ") {
        return Err(ProxyError::Missing);
    }
    // v1: one line; read it a byte at a time so nothing after the CRLF is taken.
    while !buf.ends_with(b"\r\n") {
        if buf.len() >= V1_MAX {
            return Err(ProxyError::Malformed("v1 header over 107 octets".into()));
        }
        buf.push(stream.read_u8().await?);
    }
    let h = ppp::v1::Header::try_from(buf.as_slice())
        .map_err(|e| ProxyError::Malformed(e.to_string()))?;
    Ok(match h.addresses {
        ppp::v1::Addresses::Tcp4(a) => tcp4(a),
        ppp::v1::Addresses::Tcp6(a) => tcp6(a),
        ppp::v1::Addresses::Unknown => Proxied::Local,
    })
}

/// A proxied TCP connection from what either header version says of IPv4 or IPv6 (`ppp`
/// uses the same address types for both).
fn tcp4(a: ppp::v1::IPv4) -> Proxied {
    Proxied::Tcp {
        source: SocketAddr::new(a.source_address.into(), a.source_port),
        destination: SocketAddr::new(a.destination_address.into(), a.destination_port),
    }
}

fn tcp6(a: ppp::v1::IPv6) -> Proxied {
    Proxied::Tcp {
        source: SocketAddr::new(a.source_address.into(), a.source_port),
        destination: SocketAddr::new(a.destination_address.into(), a.destination_port),
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    const T: Duration = Duration::from_secs(5);

    fn v2(src: &str, dst: &str, command: ppp::v2::Command) -> Vec<u8> {
        let addrs: ppp::v2::Addresses = (
            src.parse::<SocketAddr>().unwrap(),
            dst.parse::<SocketAddr>().unwrap(),
        )
            .into();
        ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | command,
            ppp::v2::Protocol::Stream,
            addrs,
        )
        // A TLV the reader must skip as part of the header (HAProxy sends some).
        .write_tlv(ppp::v2::Type::NoOp, [0u8; 3].as_slice())
        .unwrap()
        .build()
        .unwrap()
    }

    /// Feed `input` in chunks of `step` bytes; what `read_header` returns and what is left.
    async fn fed(input: &[u8], step: usize) -> (Result<Proxied, ProxyError>, Vec<u8>) {
        let (mut w, mut r) = tokio::io::duplex(64);
        let input = input.to_vec();
        let writer = tokio::spawn(async move {
            for c in input.chunks(step) {
                if w.write_all(c).await.is_err() {
                    break;
                }
            }
        });
        let got = read_header(&mut r, T).await;
        let mut rest = Vec::new();
        if got.is_ok() {
            r.read_to_end(&mut rest).await.unwrap();
        }
        // After an error the writer may be blocked on a full pipe: closing ends it.
        drop(r);
        writer.await.unwrap();
        (got, rest)
    }

    const STEPS: [usize; 6] = [1, 2, 3, 4, 16, 4096];

    #[tokio::test]
    async fn v2_ipv4_and_ipv6_give_the_client_address_and_leave_the_rest() {
        for (src, dst) in [
            ("203.0.113.7:40000", "10.0.0.2:25"),
            ("[2001:db8::7]:40000", "[2001:db8::1]:993"),
        ] {
            let mut input = v2(src, dst, ppp::v2::Command::Proxy);
            input.extend_from_slice(b"EHLO client\r\n");
            for step in STEPS {
                let (got, rest) = fed(&input, step).await;
                let got = got.unwrap();
                assert_eq!(
                    got,
                    Proxied::Tcp {
                        source: src.parse().unwrap(),
                        destination: dst.parse().unwrap()
                    },
                    "step {step}"
                );
                assert_eq!(rest, b"EHLO client\r\n", "step {step}");
                assert_eq!(
                    got.client("192.0.2.1:1".parse().unwrap()),
                    src.parse().unwrap()
                );
            }
        }
    }

    #[tokio::test]
    async fn v2_local_keeps_the_peer_address() {
        let mut input = v2("10.0.0.9:1", "10.0.0.2:25", ppp::v2::Command::Local);
        input.extend_from_slice(b"QUIT\r\n");
        let (got, rest) = fed(&input, 1).await;
        let got = got.unwrap();
        assert_eq!(got, Proxied::Local);
        let peer: SocketAddr = "10.0.0.9:5555".parse().unwrap();
        assert_eq!(got.client(peer), peer);
        assert_eq!(rest, b"QUIT\r\n");
    }

    #[tokio::test]
    async fn v1_tcp4_tcp6_and_unknown() {
        let cases: [(&[u8], Proxied); 3] = [
            (
                b"PROXY TCP4 198.51.100.22 10.0.0.2 35646 143\r\n",
                Proxied::Tcp {
                    source: "198.51.100.22:35646".parse().unwrap(),
                    destination: "10.0.0.2:143".parse().unwrap(),
                },
            ),
            (
                b"PROXY TCP6 2001:db8::22 2001:db8::1 35646 110\r\n",
                Proxied::Tcp {
                    source: "[2001:db8::22]:35646".parse().unwrap(),
                    destination: "[2001:db8::1]:110".parse().unwrap(),
                },
            ),
            (b"PROXY UNKNOWN\r\n", Proxied::Local),
        ];
        for (header, want) in cases {
            let mut input = header.to_vec();
            input.extend_from_slice(b"a1 CAPABILITY\r\n");
            for step in STEPS {
                let (got, rest) = fed(&input, step).await;
                assert_eq!(got.unwrap(), want, "step {step}");
                assert_eq!(rest, b"a1 CAPABILITY\r\n");
            }
        }
    }

    #[tokio::test]
    async fn bad_input_is_a_clear_error_never_a_hang() {
        // Not a PROXY header at all: a client talking SMTP straight away.
        let (got, _) = fed(b"EHLO client.example\r\n", 1).await;
        assert!(matches!(got, Err(ProxyError::Missing)), "{got:?}");
        // A v1 line that never ends: refused at 107 octets, not read forever.
        let mut long = b"PROXY TCP4 ".to_vec();
        long.extend(std::iter::repeat_n(b'1', 200));
        let (got, _) = fed(&long, 7).await;
        assert!(matches!(got, Err(ProxyError::Malformed(_))), "{got:?}");
        // Garbage addresses.
        let (got, _) = fed(b"PROXY TCP4 nonsense here 1 2\r\n", 4).await;
        assert!(matches!(got, Err(ProxyError::Malformed(_))), "{got:?}");
        // A v2 header cut short: the connection closes mid-header.
        let full = v2("203.0.113.7:1", "10.0.0.2:25", ppp::v2::Command::Proxy);
        let (got, _) = fed(&full[..full.len() - 3], 2).await;
        assert!(matches!(got, Err(ProxyError::Io(_))), "{got:?}");
        // Closed at once, as a balancer's TCP health check does.
        let (got, _) = fed(b"", 1).await;
        assert!(matches!(got, Err(ProxyError::Closed)), "{got:?}");
        // Silence: the time limit ends the wait.
        let (_w, mut r) = tokio::io::duplex(64);
        let got = read_header(&mut r, Duration::from_millis(50)).await;
        assert!(matches!(got, Err(ProxyError::Timeout(_))), "{got:?}");
    }

    #[test]
    fn config_policy_per_listener_and_validation() {
        let c = ProxyProtocolConfig {
            trusted: vec![
                "172.16.0.0/12".parse().unwrap(),
                "10.0.0.5".parse().unwrap(),
            ],
            listeners: vec!["smtp".into(), "submissions".into()],
            header_timeout_secs: 0,
        };
        assert_eq!(c.validate(&["smtp", "submission", "submissions"]), Ok(()));
        let p = c.policy("smtp").expect("smtp expects the header");
        assert!(p.trusts("172.20.0.3".parse().unwrap()));
        assert!(p.trusts("::ffff:10.0.0.5".parse().unwrap()));
        assert!(!p.trusts("10.0.0.6".parse().unwrap()));
        assert_eq!(
            p.header_timeout,
            Duration::from_secs(1),
            "0 is at least 1 s"
        );
        assert!(c.policy("submission").is_none());
        assert!(matches!(
            c.validate(&["pop3", "pop3s"]),
            Err(ProxyConfigError::UnknownListener(l, _)) if l == "smtp"
        ));
        let untrusted = ProxyProtocolConfig {
            trusted: vec![],
            ..c.clone()
        };
        assert_eq!(
            untrusted.validate(&["smtp", "submissions"]),
            Err(ProxyConfigError::NoTrustedPeers)
        );
        assert_eq!(ProxyProtocolConfig::default().validate(&[]), Ok(()));
        assert!(ProxyProtocolConfig::default().policy("smtp").is_none());
    }

    #[test]
    fn only_trusted_balancers() {
        let nets: Vec<ipnet::IpNet> =
            vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()];
        assert!(trusted("10.1.2.3".parse().unwrap(), &nets));
        assert!(trusted("::ffff:10.1.2.3".parse().unwrap(), &nets));
        assert!(trusted("fd12::1".parse().unwrap(), &nets));
        assert!(!trusted("192.0.2.1".parse().unwrap(), &nets));
        assert!(!trusted("2001:db8::1".parse().unwrap(), &[]));
    }
}
