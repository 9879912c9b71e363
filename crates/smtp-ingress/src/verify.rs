//! SPF, DKIM and DMARC for inbound mail on the MX port, with `mail-auth` over hickory DNS.
//! The outcome is an `Authentication-Results:` header (RFC 8601) and whether the sender
//! domain's DMARC policy says reject.
//!
//! TXT records can be injected (`Verifier::with_records`): they are served from mail-auth's
//! resolver-cache hook before any DNS query, which is how tests supply their own SPF, DKIM
//! and DMARC records, and how an operator can pin a record.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use mail_auth::common::parse::TxtRecordParser;
use mail_auth::common::resolver::ToFqdn;
use mail_auth::dmarc::Dmarc;
use mail_auth::dmarc::Policy;
use mail_auth::hickory_resolver::config::{
    NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use mail_auth::spf::Spf;
use mail_auth::{
    AuthenticatedMessage, AuthenticationResults, DmarcResult, DnsError, DnssecStatus, IprevOutput,
    IprevResult, MessageAuthenticator, Parameters, RecordSet, ResolverCache, Txt,
    common::verify::DomainKey, dmarc::verify::DmarcParameters, spf::verify::SpfParameters,
};

use crate::config::DnsConfig;

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("dns resolver: {0}")]
    Resolver(String),
    #[error("bad nameserver {0:?}: expected an IP address")]
    Nameserver(String),
    #[error("bad TXT record for {name}: {message}")]
    Record { name: String, message: String },
}

/// Pinned records (TXT, PTR, A, AAAA), consulted before DNS.
#[derive(Clone)]
struct Pinned<K, V>(HashMap<K, V>);

impl<K, V> Default for Pinned<K, V> {
    fn default() -> Self {
        Pinned(HashMap::new())
    }
}

impl<K: Hash + Eq, V: Clone> ResolverCache<K, V> for Pinned<K, V> {
    fn get<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.0.get(name).cloned()
    }
    fn remove<Q>(&self, _: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        None
    }
    fn insert(&self, _: K, _: V, _: std::time::Instant) {}
}

fn record_set<T>(v: Vec<T>) -> RecordSet<T> {
    RecordSet {
        rrset: v.into(),
        dnssec_status: DnssecStatus::Indeterminate,
    }
}

/// The MX cache stays empty.
struct Empty;

impl<K, V> ResolverCache<K, V> for Empty {
    fn get<Q>(&self, _: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        None
    }
    fn remove<Q>(&self, _: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        None
    }
    fn insert(&self, _: K, _: V, _: std::time::Instant) {}
}

type PinnedTxt = Pinned<Box<str>, Txt>;
type PinnedPtr = Pinned<IpAddr, RecordSet<Box<str>>>;
type PinnedV4 = Pinned<Box<str>, RecordSet<Ipv4Addr>>;
type PinnedV6 = Pinned<Box<str>, RecordSet<Ipv6Addr>>;

pub struct Verifier {
    auth: MessageAuthenticator,
    pinned: Arc<PinnedTxt>,
    ptr: PinnedPtr,
    ipv4: PinnedV4,
    ipv6: PinnedV6,
    hostname: String,
    /// Bound on one iprev check (a PTR query and up to two forward queries).
    iprev_timeout: Duration,
}

pub struct Verdict {
    /// The complete `Authentication-Results:` header line(s), CRLF-terminated.
    pub header: String,
    /// DMARC failed and the domain publishes `p=reject`.
    pub dmarc_reject: bool,
}

/// The outcome of one iprev check (RFC 8601 §3): forward-confirmed reverse DNS of a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Iprev {
    pub ip: IpAddr,
    pub result: IprevResult,
    /// The reverse name whose forward lookup contains the IP; only when the result is `pass`.
    pub name: Option<String>,
}

/// The iprev result in the four words of RFC 8601 §2.7.3.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IprevStatus {
    Pass,
    /// PTR names exist but none resolves back to the IP.
    Fail,
    /// A DNS error that may go away (timeout, SERVFAIL).
    TempError,
    /// No PTR record (or a forward name that does not exist).
    PermError,
}

impl Iprev {
    pub fn status(&self) -> IprevStatus {
        match &self.result {
            IprevResult::Pass => IprevStatus::Pass,
            IprevResult::Fail(_) => IprevStatus::Fail,
            IprevResult::TempError(_) => IprevStatus::TempError,
            IprevResult::PermError(_) | IprevResult::None => IprevStatus::PermError,
        }
    }

    fn add_to<'a>(&self, ar: AuthenticationResults<'a>) -> String {
        let out = IprevOutput {
            result: self.result.clone(),
            ptr: None,
        };
        let mut s = ar.with_iprev_result(&out, self.ip).to_string();
        if let Some(name) = &self.name {
            s.push_str(&format!(" ({name})"));
        }
        s
    }
}

/// A DNS name as it may appear inside a header comment.
fn comment_safe(name: &str) -> Option<String> {
    let name = name.trim_end_matches('.');
    (!name.is_empty()
        && name.len() <= 255
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_'))
    .then(|| name.to_ascii_lowercase())
}

fn parse_nameserver(s: &str) -> Result<NameServerConfig, VerifyError> {
    let (ip, port) = match s.parse::<IpAddr>() {
        Ok(ip) => (ip, None),
        Err(_) => match s.parse::<SocketAddr>() {
            Ok(sa) => (sa.ip(), Some(sa.port())),
            Err(_) => return Err(VerifyError::Nameserver(s.to_string())),
        },
    };
    let mut ns = NameServerConfig::udp_and_tcp(ip);
    if let Some(port) = port {
        for c in &mut ns.connections {
            c.port = port;
        }
    }
    Ok(ns)
}

impl Verifier {
    pub fn new(dns: &DnsConfig, hostname: &str) -> Result<Verifier, VerifyError> {
        let auth = if dns.nameservers.is_empty() {
            MessageAuthenticator::new_system_conf()
                .or_else(|_| MessageAuthenticator::new_cloudflare())
                .map_err(|e| VerifyError::Resolver(e.to_string()))?
        } else {
            let servers = dns
                .nameservers
                .iter()
                .map(|s| parse_nameserver(s))
                .collect::<Result<Vec<_>, _>>()?;
            let mut opts = ResolverOpts::default();
            opts.timeout = Duration::from_secs(dns.timeout_secs.max(1));
            // Configured name servers are the only source: no /etc/hosts answers.
            opts.use_hosts_file = ResolveHosts::Never;
            MessageAuthenticator::new(ResolverConfig::from_name_servers(servers), opts)
                .map_err(|e| VerifyError::Resolver(e.to_string()))?
        };
        Ok(Verifier {
            auth,
            pinned: Arc::default(),
            ptr: Pinned::default(),
            ipv4: Pinned::default(),
            ipv6: Pinned::default(),
            hostname: hostname.to_string(),
            iprev_timeout: Duration::from_secs(dns.timeout_secs.max(1) * 3),
        })
    }

    /// Serve these TXT records (name → record text) without asking DNS. The kind of record
    /// is taken from the name: `_dmarc.` DMARC, `._domainkey.` DKIM key, else SPF.
    pub fn with_records<'a>(
        mut self,
        records: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Verifier, VerifyError> {
        let mut map = HashMap::new();
        for (name, value) in records {
            let err = |e: mail_auth::Error| VerifyError::Record {
                name: name.to_string(),
                message: e.to_string(),
            };
            let txt: Txt = if name.starts_with("_dmarc.") {
                Dmarc::parse(value.as_bytes()).map_err(err)?.into()
            } else if name.contains("._domainkey.") {
                DomainKey::parse(value.as_bytes()).map_err(err)?.into()
            } else {
                Spf::parse(value.as_bytes()).map_err(err)?.into()
            };
            map.insert(name.to_fqdn().into_owned().into_boxed_str(), txt);
        }
        self.pinned = Arc::new(Pinned(map));
        Ok(self)
    }

    /// Serve this PTR record set for `ip` without asking DNS.
    pub fn with_ptr(mut self, ip: IpAddr, names: &[&str]) -> Verifier {
        let rrset: Vec<Box<str>> = names
            .iter()
            .map(|n| n.to_fqdn().into_owned().into_boxed_str())
            .collect();
        self.ptr.0.insert(ip, record_set(rrset));
        self
    }

    /// Serve these A / AAAA records for `name` without asking DNS.
    pub fn with_addresses(mut self, name: &str, ips: &[IpAddr]) -> Verifier {
        let key = || name.to_fqdn().into_owned().into_boxed_str();
        let v4: Vec<Ipv4Addr> = ips
            .iter()
            .filter_map(|ip| match ip {
                IpAddr::V4(a) => Some(*a),
                IpAddr::V6(_) => None,
            })
            .collect();
        let v6: Vec<Ipv6Addr> = ips
            .iter()
            .filter_map(|ip| match ip {
                IpAddr::V6(a) => Some(*a),
                IpAddr::V4(_) => None,
            })
            .collect();
        self.ipv4.0.insert(key(), record_set(v4));
        self.ipv6.0.insert(key(), record_set(v6));
        self
    }

    fn params<P>(
        &self,
        p: P,
    ) -> Parameters<'_, P, PinnedTxt, Empty, PinnedV4, PinnedV6, PinnedPtr> {
        Parameters {
            params: p,
            cache_txt: Some(&*self.pinned),
            cache_mx: None::<&Empty>,
            cache_ptr: Some(&self.ptr),
            cache_ipv4: Some(&self.ipv4),
            cache_ipv6: Some(&self.ipv6),
        }
    }

    /// Forward-confirmed reverse DNS of `ip` with mail-auth's iprev: the PTR names (at most
    /// two are tried) and their A/AAAA records. Bounded by three DNS timeouts in all; past
    /// that the result is `temperror`.
    pub async fn iprev(&self, ip: IpAddr) -> Iprev {
        let check = async {
            let out = self.auth.verify_iprev(self.params(ip)).await;
            let name = match (&out.result, &out.ptr) {
                (IprevResult::Pass, Some(ptr)) => self.confirmed_name(ip, ptr).await,
                _ => None,
            };
            Iprev {
                ip,
                result: out.result,
                name,
            }
        };
        match tokio::time::timeout(self.iprev_timeout, check).await {
            Ok(iprev) => iprev,
            Err(_) => Iprev {
                ip,
                result: IprevResult::TempError(mail_auth::Error::Dns(DnsError::Resolver(
                    "iprev timed out".into(),
                ))),
                name: None,
            },
        }
    }

    /// Which of the (at most two) PTR names mail-auth tried resolves back to `ip`. With one
    /// name that is the one; with two, the first is asked again (answered from the resolver's
    /// cache or the pinned records).
    async fn confirmed_name(&self, ip: IpAddr, ptr: &[Box<str>]) -> Option<String> {
        let tried = &ptr[..ptr.len().min(2)];
        let name = match tried {
            [] => return None,
            [one] => one,
            [first, second, ..] => {
                let first_matches = match ip {
                    IpAddr::V4(a) => self
                        .auth
                        .ipv4_lookup(first.as_ref(), Some(&self.ipv4))
                        .await
                        .is_ok_and(|r| r.rrset.contains(&a)),
                    IpAddr::V6(a) => self
                        .auth
                        .ipv6_lookup(first.as_ref(), Some(&self.ipv6))
                        .await
                        .is_ok_and(|r| r.rrset.contains(&a)),
                };
                if first_matches { first } else { second }
            }
        };
        comment_safe(name)
    }

    /// SPF, DKIM and DMARC for one message; `iprev`, the session's cached check, is added to
    /// the same header.
    pub async fn verify(
        &self,
        ip: IpAddr,
        helo: &str,
        mail_from: &str,
        message: &[u8],
        iprev: Option<&Iprev>,
    ) -> Verdict {
        let header = |ar: AuthenticationResults<'_>| match iprev {
            Some(i) => format!("Authentication-Results: {}\r\n", i.add_to(ar)),
            None => format!("Authentication-Results: {ar}\r\n"),
        };
        let host = self.hostname.as_str();
        let helo_domain = if helo.is_empty() { "unknown" } else { helo };
        let spf = self
            .auth
            .verify_spf(self.params(SpfParameters::verify_mail_from(
                ip,
                helo_domain,
                host,
                if mail_from.is_empty() {
                    helo_domain
                } else {
                    mail_from
                },
            )))
            .await;
        let Some(msg) = AuthenticatedMessage::parse(message) else {
            let ar = AuthenticationResults::new(host).with_spf_mailfrom_result(
                &spf,
                ip,
                mail_from,
                helo_domain,
            );
            return Verdict {
                header: header(ar),
                dmarc_reject: false,
            };
        };
        let dkim = self.auth.verify_dkim(self.params(&msg)).await;
        let mail_from_domain = mail_from
            .rsplit_once('@')
            .map(|(_, d)| d)
            .unwrap_or(helo_domain);
        let dmarc = self
            .auth
            .verify_dmarc(self.params(DmarcParameters::new(&msg, &dkim, mail_from_domain, &spf)))
            .await;
        let header_from = msg.from();
        let ar = AuthenticationResults::new(host)
            .with_dkim_results(&dkim, header_from)
            .with_spf_mailfrom_result(&spf, ip, mail_from, helo_domain)
            .with_dmarc_result(&dmarc);
        let failed = matches!(dmarc.result(), DmarcResult::Fail(_));
        Verdict {
            header: header(ar),
            dmarc_reject: failed && dmarc.policy() == Policy::Reject,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verifier() -> Verifier {
        let dns = DnsConfig {
            nameservers: vec!["127.0.0.1".into()],
            timeout_secs: 1,
        };
        Verifier::new(&dns, "mx.test")
            .unwrap()
            .with_records([
                ("good.example", "v=spf1 ip4:192.0.2.0/24 -all"),
                ("_dmarc.good.example", "v=DMARC1; p=reject; psd=n"),
            ])
            .unwrap()
    }

    const MSG: &[u8] = b"From: a@good.example\r\nSubject: x\r\n\r\nbody\r\n";

    #[tokio::test]
    async fn spf_pass_aligns_dmarc() {
        let v = verifier()
            .verify(
                "192.0.2.7".parse().unwrap(),
                "h.good.example",
                "a@good.example",
                MSG,
                None,
            )
            .await;
        assert!(
            v.header.starts_with("Authentication-Results: mx.test;"),
            "{}",
            v.header
        );
        assert!(v.header.contains("spf=pass"), "{}", v.header);
        assert!(v.header.contains("dmarc=pass"), "{}", v.header);
        assert!(!v.dmarc_reject);
    }

    #[tokio::test]
    async fn spf_fail_with_p_reject_is_a_reject() {
        let v = verifier()
            .verify(
                "198.51.100.1".parse().unwrap(),
                "h.bad.example",
                "a@good.example",
                MSG,
                None,
            )
            .await;
        assert!(v.header.contains("spf=fail"), "{}", v.header);
        assert!(v.header.contains("dmarc=fail"), "{}", v.header);
        assert!(v.dmarc_reject, "{}", v.header);
    }

    #[test]
    fn bad_records_and_nameservers_are_named() {
        let dns = DnsConfig {
            nameservers: vec!["not-an-ip".into()],
            timeout_secs: 1,
        };
        assert!(matches!(
            Verifier::new(&dns, "h"),
            Err(VerifyError::Nameserver(_))
        ));
    }
}

#[cfg(test)]
mod dkim_tests {
    use super::*;
    use base64::Engine;
    use mail_auth::common::crypto::Ed25519Key;
    use mail_auth::common::headers::HeaderWriter;
    use mail_auth::dkim::DkimSigner;

    #[tokio::test]
    async fn dkim_signature_is_verified_against_the_published_key() {
        let key = Ed25519Key::from_pkcs8_der(&Ed25519Key::generate_pkcs8().unwrap()).unwrap();
        let record = format!(
            "v=DKIM1; k=ed25519; p={}",
            base64::engine::general_purpose::STANDARD.encode(key.public_key())
        );
        let msg = b"From: a@signed.example\r\nTo: b@mx.test\r\nSubject: signed\r\n\r\nbody\r\n";
        let sig = DkimSigner::from_key(key)
            .domain("signed.example")
            .selector("s1")
            .headers(["From", "To", "Subject"])
            .sign(msg)
            .unwrap();
        let mut signed = sig.to_header().into_bytes();
        signed.extend_from_slice(msg);
        let dns = DnsConfig {
            nameservers: vec!["127.0.0.1".into()],
            timeout_secs: 1,
        };
        let v = Verifier::new(&dns, "mx.test")
            .unwrap()
            .with_records([
                ("s1._domainkey.signed.example", record.as_str()),
                // SPF fails: DMARC passes on the aligned DKIM signature alone.
                ("signed.example", "v=spf1 -all"),
                ("_dmarc.signed.example", "v=DMARC1; p=reject; psd=n"),
            ])
            .unwrap();
        let ip = "198.51.100.1".parse().unwrap();
        let out = v
            .verify(ip, "h.example", "a@signed.example", &signed, None)
            .await;
        assert!(out.header.contains("dkim=pass"), "{}", out.header);
        assert!(
            out.header.contains("header.d=signed.example"),
            "{}",
            out.header
        );
        assert!(out.header.contains("dmarc=pass"), "{}", out.header);
        assert!(!out.dmarc_reject);

        // The same message altered in transit: the signature fails, and so does DMARC.
        let mut tampered = signed.clone();
        let n = tampered.len();
        tampered[n - 3] = b'X';
        let out = v
            .verify(ip, "h.example", "a@signed.example", &tampered, None)
            .await;
        assert!(!out.header.contains("dkim=pass"), "{}", out.header);
        assert!(out.dmarc_reject, "{}", out.header);
    }
}

#[cfg(test)]
#[path = "../tests/common/dns.rs"]
pub(crate) mod test_dns;

#[cfg(test)]
mod iprev_tests {
    use super::*;
    use mail_auth::hickory_resolver::proto::op::ResponseCode;
    use test_dns::TestDns;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// A verifier whose unpinned questions go to the test name server `dns`.
    fn verifier(dns: &TestDns) -> Verifier {
        let dns = DnsConfig {
            nameservers: vec![dns.nameserver()],
            timeout_secs: 2,
        };
        Verifier::new(&dns, "mx.test")
            .unwrap()
            .with_records([("good.example", "v=spf1 ip4:192.0.2.0/24 -all")])
            .unwrap()
    }

    /// A name server that knows nothing (NXDOMAIN), for the pinned-record tests.
    async fn empty_dns() -> TestDns {
        TestDns::new().start().await
    }

    async fn header(v: &Verifier, iprev: &Iprev) -> String {
        v.verify(
            iprev.ip,
            "h.good.example",
            "a@good.example",
            b"From: a@good.example\r\n\r\nx\r\n",
            Some(iprev),
        )
        .await
        .header
    }

    #[tokio::test]
    async fn pinned_ptr_confirmed_by_a_is_a_pass_with_the_name() {
        let v = verifier(&empty_dns().await)
            .with_ptr(ip("192.0.2.7"), &["Mail.Good.Example."])
            .with_addresses("mail.good.example", &[ip("192.0.2.1"), ip("192.0.2.7")]);
        let i = v.iprev(ip("192.0.2.7")).await;
        assert_eq!(i.status(), IprevStatus::Pass, "{i:?}");
        assert_eq!(i.name.as_deref(), Some("mail.good.example"));
        let h = header(&v, &i).await;
        assert!(
            h.contains("iprev=pass policy.iprev=192.0.2.7 (mail.good.example)"),
            "{h}"
        );
        assert!(h.contains("spf=pass"), "{h}");
        assert!(
            h.ends_with("\r\n") && !h[..h.len() - 2].contains("\r\n\r\n"),
            "{h}"
        );
    }

    #[tokio::test]
    async fn ipv6_pass_and_the_second_ptr_name_is_the_confirmed_one() {
        let v = verifier(&empty_dns().await)
            .with_ptr(ip("2001:db8::25"), &["stale.example", "mx6.good.example"])
            .with_addresses("stale.example", &[ip("2001:db8::99")])
            .with_addresses("mx6.good.example", &[ip("2001:db8::25")]);
        let i = v.iprev(ip("2001:db8::25")).await;
        assert_eq!(i.status(), IprevStatus::Pass, "{i:?}");
        assert_eq!(i.name.as_deref(), Some("mx6.good.example"));
        let h = header(&v, &i).await;
        assert!(
            h.contains("iprev=pass policy.iprev=\"2001:db8::25\" (mx6.good.example)"),
            "{h}"
        );
    }

    #[tokio::test]
    async fn ptr_without_a_matching_a_record_is_a_fail() {
        let v = verifier(&empty_dns().await)
            .with_ptr(ip("198.51.100.9"), &["liar.example"])
            .with_addresses("liar.example", &[ip("203.0.113.5")]);
        let i = v.iprev(ip("198.51.100.9")).await;
        assert_eq!(i.status(), IprevStatus::Fail, "{i:?}");
        assert_eq!(i.name, None);
        let h = header(&v, &i).await;
        assert!(h.contains("iprev=fail"), "{h}");
        assert!(h.contains("policy.iprev=198.51.100.9"), "{h}");
        assert!(!h.contains("liar.example"), "{h}");
    }

    #[tokio::test]
    async fn over_real_dns_pass_fail_and_no_ptr() {
        let dns = TestDns::new()
            .ptr(ip("192.0.2.7"), "mail.good.example")
            .addr("mail.good.example", ip("192.0.2.7"))
            .ptr(ip("192.0.2.8"), "liar.example")
            .addr("liar.example", ip("203.0.113.5"))
            .start()
            .await;
        let v = verifier(&dns);

        let pass = v.iprev(ip("192.0.2.7")).await;
        assert_eq!(pass.status(), IprevStatus::Pass, "{pass:?}");
        assert_eq!(pass.name.as_deref(), Some("mail.good.example"));

        let fail = v.iprev(ip("192.0.2.8")).await;
        assert_eq!(fail.status(), IprevStatus::Fail, "{fail:?}");

        // NXDOMAIN for the PTR: permerror (RFC 8601 §2.7.3).
        let none = v.iprev(ip("192.0.2.9")).await;
        assert_eq!(none.status(), IprevStatus::PermError, "{none:?}");
        assert_eq!(none.name, None);
        let h = header(&v, &none).await;
        assert!(h.contains("iprev=permerror"), "{h}");
        assert!(h.contains("policy.iprev=192.0.2.9"), "{h}");
    }

    #[tokio::test]
    async fn a_failing_name_server_is_a_temperror() {
        let dns = TestDns::new()
            .otherwise(ResponseCode::ServFail)
            .start()
            .await;
        let v = verifier(&dns);
        let i = v.iprev(ip("192.0.2.10")).await;
        assert_eq!(i.status(), IprevStatus::TempError, "{i:?}");
        assert!(header(&v, &i).await.contains("iprev=temperror"));
    }

    #[tokio::test]
    async fn a_silent_name_server_is_a_temperror_not_a_hang() {
        let dns = TestDns::new().silent().start().await;
        let cfg = DnsConfig {
            nameservers: vec![dns.nameserver()],
            timeout_secs: 1,
        };
        let v = Verifier::new(&cfg, "mx.test").unwrap();
        // The test harness' own bound: far beyond the three DNS timeouts iprev may use.
        let i = tokio::time::timeout(Duration::from_secs(60), v.iprev(ip("192.0.2.11")))
            .await
            .expect("iprev is bounded by the DNS timeouts");
        assert_eq!(i.status(), IprevStatus::TempError, "{i:?}");
        assert_eq!(i.name, None);
    }

    #[test]
    fn nameservers_take_an_optional_port() {
        for ok in ["127.0.0.1", "127.0.0.1:5353", "::1", "[::1]:5353"] {
            assert!(parse_nameserver(ok).is_ok(), "{ok}");
        }
        let ns = parse_nameserver("127.0.0.1:5353").unwrap();
        assert!(ns.connections.iter().all(|c| c.port == 5353));
        assert!(matches!(
            parse_nameserver("dns.example:53"),
            Err(VerifyError::Nameserver(_))
        ));
    }

    #[test]
    fn only_plain_names_go_into_the_comment() {
        assert_eq!(
            comment_safe("Mail.Example.").as_deref(),
            Some("mail.example")
        );
        assert_eq!(comment_safe("a(b).example"), None);
        assert_eq!(comment_safe("a\\010b.example"), None);
        assert_eq!(comment_safe(""), None);
    }
}
