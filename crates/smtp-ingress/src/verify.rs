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
use std::net::IpAddr;
use std::sync::Arc;

use mail_auth::common::parse::TxtRecordParser;
use mail_auth::common::resolver::ToFqdn;
use mail_auth::dmarc::Dmarc;
use mail_auth::dmarc::Policy;
use mail_auth::hickory_resolver::config::{NameServerConfig, ResolverConfig, ResolverOpts};
use mail_auth::spf::Spf;
use mail_auth::{
    AuthenticatedMessage, AuthenticationResults, DmarcResult, MessageAuthenticator, Parameters,
    ResolverCache, Txt, common::verify::DomainKey, dmarc::verify::DmarcParameters,
    spf::verify::SpfParameters,
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

/// Pinned TXT records, consulted before DNS.
#[derive(Default)]
struct Pinned(HashMap<Box<str>, Txt>);

impl ResolverCache<Box<str>, Txt> for Pinned {
    fn get<Q>(&self, name: &Q) -> Option<Txt>
    where
        Box<str>: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.0.get(name).cloned()
    }
    fn remove<Q>(&self, _: &Q) -> Option<Txt>
    where
        Box<str>: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        None
    }
    fn insert(&self, _: Box<str>, _: Txt, _: std::time::Instant) {}
}

/// The other caches stay empty.
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

pub struct Verifier {
    auth: MessageAuthenticator,
    pinned: Arc<Pinned>,
    hostname: String,
}

pub struct Verdict {
    /// The complete `Authentication-Results:` header line(s), CRLF-terminated.
    pub header: String,
    /// DMARC failed and the domain publishes `p=reject`.
    pub dmarc_reject: bool,
}

impl Verifier {
    pub fn new(dns: &DnsConfig, hostname: &str) -> Result<Verifier, VerifyError> {
        let auth = if dns.nameservers.is_empty() {
            MessageAuthenticator::new_system_conf()
                .or_else(|_| MessageAuthenticator::new_cloudflare())
                .map_err(|e| VerifyError::Resolver(e.to_string()))?
        } else {
            let mut servers = Vec::new();
            for s in &dns.nameservers {
                let ip: IpAddr = s.parse().map_err(|_| VerifyError::Nameserver(s.clone()))?;
                servers.push(NameServerConfig::udp_and_tcp(ip));
            }
            let mut opts = ResolverOpts::default();
            opts.timeout = std::time::Duration::from_secs(dns.timeout_secs.max(1));
            MessageAuthenticator::new(ResolverConfig::from_name_servers(servers), opts)
                .map_err(|e| VerifyError::Resolver(e.to_string()))?
        };
        Ok(Verifier {
            auth,
            pinned: Arc::default(),
            hostname: hostname.to_string(),
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

    fn params<P>(&self, p: P) -> Parameters<'_, P, Pinned, Empty, Empty, Empty, Empty> {
        Parameters {
            params: p,
            cache_txt: Some(&*self.pinned),
            cache_mx: None::<&Empty>,
            cache_ptr: None::<&Empty>,
            cache_ipv4: None::<&Empty>,
            cache_ipv6: None::<&Empty>,
        }
    }

    pub async fn verify(&self, ip: IpAddr, helo: &str, mail_from: &str, message: &[u8]) -> Verdict {
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
                header: format!("Authentication-Results: {ar}\r\n"),
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
            header: format!("Authentication-Results: {ar}\r\n"),
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
        let out = v.verify(ip, "h.example", "a@signed.example", &signed).await;
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
            .verify(ip, "h.example", "a@signed.example", &tampered)
            .await;
        assert!(!out.header.contains("dkim=pass"), "{}", out.header);
        assert!(out.dmarc_reject, "{}", out.header);
    }
}
