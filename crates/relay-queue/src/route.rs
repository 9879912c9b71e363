//! Where a remote domain's mail goes: a transport-map entry, the smarthost, or its MX hosts
//! (RFC 5321 §5.1: by preference, the implicit MX of the domain's A/AAAA when there is no MX,
//! and RFC 7505 null MX = the domain accepts no mail).

use std::net::SocketAddr;

use hickory_resolver::TokioResolver;

/// One host to try, with the name its certificate must carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub name: String,
    pub addrs: Vec<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    /// Permanent: the domain does not exist or publishes a null MX.
    Permanent(String),
    /// Temporary: DNS failure or timeout.
    Temporary(String),
}

/// A configured `host:port` (or `[host]:port`); port 25 when absent.
pub fn parse_host_port(s: &str) -> (String, u16) {
    parse_host_port_or(s, 25)
}

/// A configured `host:port` (or `[host]:port`); `default_port` when absent.
pub fn parse_host_port_or(s: &str, default_port: u16) -> (String, u16) {
    let s = s.trim();
    if let Some(rest) = s.strip_prefix('[')
        && let Some((host, tail)) = rest.split_once(']')
    {
        let port = tail
            .strip_prefix(':')
            .and_then(|p| p.parse().ok())
            .unwrap_or(default_port);
        return (host.to_string(), port);
    }
    match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h.to_string(), p.parse().unwrap_or(default_port)),
        _ => (s.to_string(), default_port),
    }
}

/// Resolve a configured route (no MX lookup); `default_port` when it names none.
pub async fn static_target(route: &str, default_port: u16) -> Result<Target, RouteError> {
    let (host, port) = parse_host_port_or(route, default_port);
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|e| RouteError::Temporary(format!("4.4.3 cannot resolve {host}: {e}")))?
        .collect();
    if addrs.is_empty() {
        return Err(RouteError::Temporary(format!(
            "4.4.3 no address for {host}"
        )));
    }
    Ok(Target { name: host, addrs })
}

/// A resolver using the given `ip:port` servers, or the system configuration when empty.
pub fn resolver(servers: &[String]) -> Result<TokioResolver, String> {
    use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
    use hickory_resolver::net::runtime::TokioRuntimeProvider;
    if servers.is_empty() {
        return TokioResolver::builder_tokio()
            .and_then(|b| b.build())
            .map_err(|e| e.to_string());
    }
    let mut ns = Vec::new();
    for s in servers {
        let addr: SocketAddr = s
            .parse()
            .map_err(|_| format!("bad DNS server {s:?} (want ip:port)"))?;
        let conns = [ConnectionConfig::udp(), ConnectionConfig::tcp()]
            .into_iter()
            .map(|mut c| {
                c.port = addr.port();
                c
            })
            .collect();
        ns.push(NameServerConfig::new(addr.ip(), true, conns));
    }
    TokioResolver::builder_with_config(
        ResolverConfig::from_name_servers(ns),
        TokioRuntimeProvider::default(),
    )
    .build()
    .map_err(|e| e.to_string())
}

/// MX hosts of `domain` in preference order, each resolved, at most `max_hosts`.
pub async fn mx_targets(
    resolver: &TokioResolver,
    domain: &str,
    max_hosts: usize,
    port: u16,
) -> Result<Vec<Target>, RouteError> {
    use hickory_resolver::proto::rr::RData;
    let fqdn = format!("{}.", domain.trim_end_matches('.'));
    let mut exchanges: Vec<(u16, String)> = match resolver.mx_lookup(fqdn.as_str()).await {
        Ok(lookup) => lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::MX(mx) => Some((mx.preference, mx.exchange.to_ascii())),
                _ => None,
            })
            .collect(),
        Err(e) if e.is_nx_domain() => {
            return Err(RouteError::Permanent(format!(
                "5.1.2 domain {domain} does not exist"
            )));
        }
        Err(e) if e.is_no_records_found() => Vec::new(),
        Err(e) => {
            return Err(RouteError::Temporary(format!(
                "4.4.3 MX lookup for {domain}: {e}"
            )));
        }
    };
    if exchanges.len() == 1 && (exchanges[0].1 == "." || exchanges[0].1.is_empty()) {
        return Err(RouteError::Permanent(format!(
            "5.1.10 domain {domain} accepts no mail (null MX)"
        )));
    }
    exchanges.retain(|(_, h)| h != "." && !h.is_empty());
    if exchanges.is_empty() {
        // Implicit MX (RFC 5321 §5.1): the domain's own address records.
        exchanges.push((0, fqdn.clone()));
    }
    exchanges.sort_by_key(|(p, _)| *p);
    let mut targets = Vec::new();
    let mut last_err = None;
    for (_, host) in exchanges.into_iter().take(max_hosts.max(1)) {
        match resolver.lookup_ip(host.as_str()).await {
            Ok(ips) => {
                let addrs: Vec<SocketAddr> =
                    ips.iter().map(|ip| SocketAddr::new(ip, port)).collect();
                if !addrs.is_empty() {
                    targets.push(Target {
                        name: host.trim_end_matches('.').to_string(),
                        addrs,
                    });
                }
            }
            Err(e) => last_err = Some(format!("{host}: {e}")),
        }
    }
    if targets.is_empty() {
        return Err(RouteError::Temporary(format!(
            "4.4.3 no usable MX host for {domain}{}",
            last_err.map(|e| format!(" ({e})")).unwrap_or_default()
        )));
    }
    Ok(targets)
}

/// Is `ip` an address anyone on the Internet may make us connect to? Not loopback, private
/// (RFC 1918), shared (RFC 6598), link-local, unique-local (fc00::/7), unspecified, multicast,
/// broadcast, "this network" (0/8), nor an IPv4-mapped or -compatible form of one of those.
pub fn is_public(ip: std::net::IpAddr) -> bool {
    use std::net::IpAddr;
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || o[0] == 0
                || (o[0] == 100 && (o[1] & 0xc0) == 64))
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let seg = v6.segments();
            // ::a.b.c.d (deprecated IPv4-compatible) reaches the same IPv4 host on some stacks.
            if seg[..6].iter().all(|&x| x == 0) && !v6.is_loopback() && !v6.is_unspecified() {
                return is_public(IpAddr::V4(std::net::Ipv4Addr::new(
                    (seg[6] >> 8) as u8,
                    seg[6] as u8,
                    (seg[7] >> 8) as u8,
                    seg[7] as u8,
                )));
            }
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || v6.is_unique_local()
                || v6.is_unicast_link_local())
        }
    }
}

/// The MX targets without their non-public addresses (see `is_public`); a deferral reason
/// when nothing is left.
pub fn public_only(domain: &str, targets: Vec<Target>) -> Result<Vec<Target>, String> {
    let mut refused = Vec::new();
    let kept: Vec<Target> = targets
        .into_iter()
        .filter_map(|mut t| {
            t.addrs.retain(|a| {
                let ok = is_public(a.ip());
                if !ok {
                    refused.push(format!("{} ({})", t.name, a.ip()));
                }
                ok
            });
            (!t.addrs.is_empty()).then_some(t)
        })
        .collect();
    if kept.is_empty() {
        return Err(format!(
            "4.4.4 refusing to deliver to {domain}: its MX hosts have only loopback/private \
             addresses ({}); allow_private_mx_addresses is off",
            refused.join(", ")
        ));
    }
    Ok(kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_forms() {
        assert_eq!(
            parse_host_port("127.0.0.1:2525"),
            ("127.0.0.1".into(), 2525)
        );
        assert_eq!(parse_host_port("mx.test"), ("mx.test".into(), 25));
        assert_eq!(parse_host_port("[::1]:26"), ("::1".into(), 26));
        assert_eq!(parse_host_port("[mx.test]"), ("mx.test".into(), 25));
    }

    #[tokio::test]
    async fn static_target_resolves_literals() {
        let t = static_target("127.0.0.1:2525", 25).await.unwrap();
        assert_eq!(t.addrs, vec!["127.0.0.1:2525".parse().unwrap()]);
        let t = static_target("127.0.0.1", 465).await.unwrap();
        assert_eq!(t.addrs, vec!["127.0.0.1:465".parse().unwrap()]);
    }

    #[test]
    fn l11_private_loopback_and_special_addresses_are_not_public() {
        let private = [
            "127.0.0.1",
            "127.1.2.3",
            "10.0.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "0.1.2.3",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "fc00::1",
            "fd12:3456::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.1.1.1",
            "::127.0.0.1",
        ];
        for a in private {
            assert!(!is_public(a.parse().unwrap()), "{a} must not be public");
        }
        for a in [
            "192.0.2.1",
            "8.8.8.8",
            "172.32.0.1",
            "100.128.0.1",
            "2001:db8::1",
            "2a00:1450::1",
        ] {
            assert!(is_public(a.parse().unwrap()), "{a} is public");
        }
        let t = |name: &str, addrs: &[&str]| Target {
            name: name.into(),
            addrs: addrs
                .iter()
                .map(|a| SocketAddr::new(a.parse().unwrap(), 25))
                .collect(),
        };
        let kept = public_only(
            "d.test",
            vec![t("a", &["127.0.0.1"]), t("b", &["10.0.0.1", "192.0.2.7"])],
        )
        .unwrap();
        assert_eq!(kept, vec![t("b", &["192.0.2.7"])]);
        let e = public_only("d.test", vec![t("a", &["127.0.0.1", "::1"])]).unwrap_err();
        assert!(e.starts_with("4.4.4") && e.contains("127.0.0.1"), "{e}");
    }
}
