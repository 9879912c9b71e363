//! Addresses and networks as written in configuration files.

use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An IP address or network in CIDR notation, as written in the configuration
/// (`192.0.2.7`, `192.0.2.0/24`, `2001:db8::/48`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ClientNet(ipnet::IpNet);

#[derive(Debug, thiserror::Error)]
#[error("{0:?} is neither an IP address nor a network (192.0.2.0/24, 2001:db8::/48)")]
pub struct BadClientNet(String);

impl ClientNet {
    pub fn contains(&self, ip: IpAddr) -> bool {
        // A v4 client on a dual-stack socket shows up as ::ffff:a.b.c.d.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.0.contains(&ip)
    }

    pub fn net(&self) -> ipnet::IpNet {
        self.0
    }
}

impl FromStr for ClientNet {
    type Err = BadClientNet;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        s.parse::<ipnet::IpNet>()
            .or_else(|_| s.parse::<IpAddr>().map(ipnet::IpNet::from))
            .map(ClientNet)
            .map_err(|_| BadClientNet(s.to_string()))
    }
}

impl TryFrom<String> for ClientNet {
    type Error = BadClientNet;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<ClientNet> for String {
    fn from(n: ClientNet) -> String {
        n.0.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_networks() {
        let n: ClientNet = "192.0.2.0/24".parse().unwrap();
        assert!(n.contains("192.0.2.77".parse().unwrap()));
        assert!(n.contains("::ffff:192.0.2.77".parse().unwrap()));
        assert!(!n.contains("192.0.3.1".parse().unwrap()));
        let one: ClientNet = " 2001:db8::1 ".parse().unwrap();
        assert!(one.contains("2001:db8::1".parse().unwrap()));
        assert!(!one.contains("2001:db8::2".parse().unwrap()));
        assert!("192.0.2.0/33".parse::<ClientNet>().is_err());
        assert!("mx.example".parse::<ClientNet>().is_err());
    }
}
