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
    let s = s.trim();
    if let Some(rest) = s.strip_prefix('[')
        && let Some((host, tail)) = rest.split_once(']')
    {
        let port = tail
            .strip_prefix(':')
            .and_then(|p| p.parse().ok())
            .unwrap_or(25);
        return (host.to_string(), port);
    }
    match s.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h.to_string(), p.parse().unwrap_or(25)),
        _ => (s.to_string(), 25),
    }
}

/// Resolve a configured route (no MX lookup).
pub async fn static_target(route: &str) -> Result<Target, RouteError> {
    let (host, port) = parse_host_port(route);
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
        let t = static_target("127.0.0.1:2525").await.unwrap();
        assert_eq!(t.addrs, vec!["127.0.0.1:2525".parse().unwrap()]);
    }
}
