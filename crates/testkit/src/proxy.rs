//! The client side of the PROXY protocol (HAProxy's spec), written out by hand so tests do
//! not check the services' parser (`ppp`) against itself: what a load balancer sends before
//! the client's first byte.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// The v2 signature (spec §2.2).
const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// A v2 PROXY header for a TCP connection from `src` to `dst` (same address family), with a
/// NOOP TLV as balancers add (the reader must skip it).
pub fn proxy_v2(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let mut addrs = Vec::new();
    let family = match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            addrs.extend_from_slice(&s.octets());
            addrs.extend_from_slice(&d.octets());
            0x11 // AF_INET, STREAM
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            addrs.extend_from_slice(&s.octets());
            addrs.extend_from_slice(&d.octets());
            0x21 // AF_INET6, STREAM
        }
        _ => panic!("proxy_v2: {src} and {dst} are of different families"),
    };
    addrs.extend_from_slice(&src.port().to_be_bytes());
    addrs.extend_from_slice(&dst.port().to_be_bytes());
    // PP2_TYPE_NOOP (0x04), two octets of padding.
    addrs.extend_from_slice(&[0x04, 0x00, 0x02, 0x00, 0x00]);
    let mut h = V2_SIGNATURE.to_vec();
    h.push(0x21); // version 2, command PROXY
    h.push(family);
    h.extend_from_slice(&(addrs.len() as u16).to_be_bytes());
    h.extend_from_slice(&addrs);
    h
}

/// A v1 (text) PROXY header for a TCP connection from `src` to `dst`.
pub fn proxy_v1(src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    let proto = if src.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {proto} {} {} {} {}\r\n",
        src.ip(),
        dst.ip(),
        src.port(),
        dst.port()
    )
    .into_bytes()
}

/// A connection to `addr` that starts with a v2 header naming `client` as the source: what
/// a balancer on this host (127.0.0.1) sends for a client at `client`.
pub async fn proxied_connect(addr: SocketAddr, client: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(&proxy_v2(client.parse().expect("client address"), addr))
        .await
        .expect("write PROXY header");
    s
}

/// A connection to `addr` from the local address `from` (any of 127.0.0.0/8 on Linux), to
/// be a peer other than 127.0.0.1.
pub async fn connect_from(from: IpAddr, addr: SocketAddr) -> TcpStream {
    let socket = if from.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .expect("socket");
    socket
        .bind(SocketAddr::new(from, 0))
        .expect("bind the local address");
    socket.connect(addr).await.expect("connect")
}

/// Assert that the server closes `s` without sending a single byte (no greeting), within
/// `within`.
pub async fn assert_closed_silently(mut s: TcpStream, within: Duration) {
    let mut got = Vec::new();
    let r = tokio::time::timeout(within, s.read_to_end(&mut got))
        .await
        .unwrap_or_else(|_| panic!("the server did not close the connection within {within:?}"));
    // A reset (the server closed with our bytes unread) is a close too.
    if let Err(e) = r {
        assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
    }
    assert!(
        got.is_empty(),
        "closed without a greeting, but got {:?}",
        String::from_utf8_lossy(&got)
    );
}

/// A service's `proxy_protocol` table read in every spelling an operator may use: off by
/// default; one environment variable per key with comma-separated lists (docker compose);
/// TOML arrays in `--set`; unknown keys and bad networks refused. `listeners` are the
/// service's listener names (at least two); `get` finds the table in its configuration.
pub fn assert_proxy_protocol_spellings<C>(
    listeners: &[&str],
    get: fn(&C) -> &mailsuite_runtime::proxy_protocol::ProxyProtocolConfig,
) where
    C: serde::de::DeserializeOwned + serde::Serialize + Default,
{
    use mailsuite_runtime::config::{ConfigSources, load};
    let c: C = load(&ConfigSources::default()).unwrap();
    assert!(get(&c).listeners.is_empty(), "off by default");
    assert_eq!(get(&c).header_timeout_secs, 5);
    let env = [
        (
            "MAILSUITE_PROXY_PROTOCOL__TRUSTED",
            "172.16.0.0/12, 10.0.0.5".to_string(),
        ),
        ("MAILSUITE_PROXY_PROTOCOL__LISTENERS", listeners.join(",")),
        (
            "MAILSUITE_PROXY_PROTOCOL__HEADER_TIMEOUT_SECS",
            "3".to_string(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let c: C = load(&ConfigSources {
        env,
        ..Default::default()
    })
    .unwrap();
    let p = get(&c);
    assert_eq!(p.listeners, listeners);
    assert_eq!(p.header_timeout_secs, 3);
    for name in listeners {
        let policy = p.policy(name).expect("enabled");
        assert!(policy.trusts("172.20.0.9".parse().unwrap()));
        assert!(policy.trusts("10.0.0.5".parse().unwrap()));
        assert!(!policy.trusts("10.0.0.6".parse().unwrap()));
    }
    let c: C = load(&ConfigSources {
        overrides: vec![
            "proxy_protocol.trusted=[\"fd00::/8\"]".into(),
            format!("proxy_protocol.listeners=[\"{}\"]", listeners[0]),
        ],
        ..Default::default()
    })
    .unwrap();
    assert!(get(&c).policy(listeners[0]).is_some());
    assert!(get(&c).policy(listeners[1]).is_none());
    for bad in ["proxy_protocol.nope=1", "proxy_protocol.trusted=not-a-net"] {
        let bad = ConfigSources {
            overrides: vec![bad.into()],
            ..Default::default()
        };
        assert!(load::<C>(&bad).is_err(), "{bad:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v2_layout() {
        let h = proxy_v2(
            "203.0.113.7:40000".parse().unwrap(),
            "10.0.0.2:25".parse().unwrap(),
        );
        assert_eq!(&h[..12], &V2_SIGNATURE);
        assert_eq!(h[12], 0x21);
        assert_eq!(h[13], 0x11);
        assert_eq!(u16::from_be_bytes([h[14], h[15]]) as usize, h.len() - 16);
        assert_eq!(&h[16..20], &[203, 0, 113, 7]);
        assert_eq!(
            proxy_v1(
                "192.0.2.1:1234".parse().unwrap(),
                "10.0.0.2:25".parse().unwrap()
            ),
            b"PROXY TCP4 192.0.2.1 10.0.0.2 1234 25\r\n"
        );
    }
}
