//! DKIM signing (RFC 6376; ed25519-sha256 per RFC 8463) with mail-auth. Keys come from the
//! configuration and from the store (Admin.ListDkimKeys). The signing domain is the one of the
//! From: header, so that the signature aligns for DMARC, but only when that domain is the
//! domain of the authenticated submitter (`signing_domain`): a signature is our word that the
//! domain's owner sent the message, so it must never be given for text someone else chose.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::{DkimSigner, Done};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;

/// Header fields covered by the signature when present (RFC 6376 §5.4.1).
const SIGNED_HEADERS: &[&str] = &[
    "From",
    "Sender",
    "Reply-To",
    "Subject",
    "Date",
    "Message-ID",
    "To",
    "Cc",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "In-Reply-To",
    "References",
    "List-Id",
    "List-Unsubscribe",
];

enum Signer {
    Rsa(DkimSigner<RsaKey<Sha256>, Done>),
    Ed25519(DkimSigner<Ed25519Key, Done>),
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("unsupported DKIM algorithm {0:?} (use rsa-sha256 or ed25519-sha256)")]
    Algorithm(String),
    #[error("bad private key for {domain}: {message}")]
    Key { domain: String, message: String },
}

/// One key as configured or stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySpec {
    pub domain: String,
    pub selector: String,
    pub algorithm: String,
    pub private_key_pem: String,
}

fn build(spec: &KeySpec) -> Result<Signer, KeyError> {
    let bad = |m: String| KeyError::Key {
        domain: spec.domain.clone(),
        message: m,
    };
    let der = PrivateKeyDer::from_pem_slice(spec.private_key_pem.as_bytes())
        .map_err(|e| bad(e.to_string()))?;
    let headers = SIGNED_HEADERS.iter().copied();
    match spec.algorithm.to_ascii_lowercase().as_str() {
        "rsa-sha256" | "rsa" => {
            let key = RsaKey::<Sha256>::from_key_der(der).map_err(|e| bad(e.to_string()))?;
            Ok(Signer::Rsa(
                DkimSigner::from_key(key)
                    .domain(spec.domain.clone())
                    .selector(spec.selector.clone())
                    .headers(headers),
            ))
        }
        "ed25519-sha256" | "ed25519" => {
            let PrivateKeyDer::Pkcs8(p8) = der else {
                return Err(bad("ed25519 keys must be PKCS#8".into()));
            };
            let key = Ed25519Key::from_pkcs8_maybe_unchecked_der(p8.secret_pkcs8_der())
                .map_err(|e| bad(e.to_string()))?;
            Ok(Signer::Ed25519(
                DkimSigner::from_key(key)
                    .domain(spec.domain.clone())
                    .selector(spec.selector.clone())
                    .headers(headers),
            ))
        }
        other => Err(KeyError::Algorithm(other.to_string())),
    }
}

/// Signers by domain, replaceable at run time (keys refreshed from the store).
#[derive(Clone, Default)]
pub struct Keyring {
    inner: Arc<RwLock<Inner>>,
}

#[derive(Default)]
struct Inner {
    specs: Vec<KeySpec>,
    by_domain: HashMap<String, Vec<Arc<Signer>>>,
}

impl Keyring {
    /// Replace the keys; invalid ones are reported and skipped.
    pub fn set(&self, specs: Vec<KeySpec>) -> Vec<KeyError> {
        let mut errors = Vec::new();
        let mut by_domain: HashMap<String, Vec<Arc<Signer>>> = HashMap::new();
        for s in &specs {
            match build(s) {
                Ok(signer) => by_domain
                    .entry(s.domain.to_ascii_lowercase())
                    .or_default()
                    .push(Arc::new(signer)),
                Err(e) => errors.push(e),
            }
        }
        let mut g = self.inner.write().unwrap_or_else(|e| e.into_inner());
        g.specs = specs;
        g.by_domain = by_domain;
        errors
    }

    pub fn specs(&self) -> Vec<KeySpec> {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .specs
            .clone()
    }

    /// DKIM-Signature header fields (each ending in CRLF) to prepend to `message`, one per
    /// key of `domain`; empty when there is no key for it. The caller decides the domain with
    /// `signing_domain`.
    pub fn sign(&self, message: &[u8], domain: &str) -> Vec<u8> {
        let domain = domain.to_ascii_lowercase();
        let signers = {
            let g = self.inner.read().unwrap_or_else(|e| e.into_inner());
            g.by_domain.get(&domain).cloned().unwrap_or_default()
        };
        let mut out = Vec::new();
        for s in signers {
            let sig = match &*s {
                Signer::Rsa(k) => k.sign(message),
                Signer::Ed25519(k) => k.sign(message),
            };
            match sig {
                Ok(sig) => out.extend_from_slice(sig.to_header().as_bytes()),
                Err(e) => tracing::warn!(%domain, "DKIM signing failed: {e}"),
            }
        }
        out
    }
}

/// The domain whose keys may sign `message` submitted by `submitter` (the authenticated
/// account, empty for mail that arrived on the MX port and is being forwarded), or `None`.
///
/// Signs only when the message has exactly one From: field, every address in it is in the
/// submitter's own domain, and there is a submitter at all. Forwarded MX mail is left unsigned:
/// its From: is whatever the unauthenticated sender wrote, and the forwarding alias is not
/// recorded per recipient, so there is no domain we could honestly vouch for.
pub fn signing_domain(message: &[u8], submitter: &str) -> Option<String> {
    let (_, own) = submitter.rsplit_once('@')?;
    let own = own.trim_end_matches('.').to_ascii_lowercase();
    if own.is_empty() {
        return None;
    }
    let parsed = mail_parser::MessageParser::new().parse_headers(message)?;
    let mut froms = parsed.header_values(mail_parser::HeaderName::From);
    let from = froms.next()?.as_address()?;
    if froms.next().is_some() {
        return None;
    }
    let mut any = false;
    for a in from.iter() {
        let d = a.address()?.rsplit_once('@')?.1;
        if !d.trim_end_matches('.').eq_ignore_ascii_case(&own) {
            return None;
        }
        any = true;
    }
    any.then_some(own)
}

/// The lower-cased domain of the first address in From:.
pub fn from_domain(message: &[u8]) -> Option<String> {
    let parsed = mail_parser::MessageParser::new().parse_headers(message)?;
    let addr = parsed.from()?.first()?.address()?.to_string();
    let (_, d) = addr.rsplit_once('@')?;
    Some(d.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_algorithm_and_bad_key_are_reported() {
        let ring = Keyring::default();
        let errs = ring.set(vec![
            KeySpec {
                domain: "a.test".into(),
                selector: "s".into(),
                algorithm: "dsa".into(),
                private_key_pem: String::new(),
            },
            KeySpec {
                domain: "b.test".into(),
                selector: "s".into(),
                algorithm: "rsa-sha256".into(),
                private_key_pem: "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
                    .into(),
            },
        ]);
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(
            ring.sign(b"From: x@a.test\r\n\r\nhi\r\n", "a.test")
                .is_empty()
        );
    }

    #[test]
    fn h2_signing_domain_only_for_the_submitters_own_from_domain() {
        let m = |from: &str| format!("{from}Subject: x\r\n\r\nbody\r\n").into_bytes();
        let cases: &[(&str, &str, Option<&str>)] = &[
            (
                "From: Alice <alice@A.test>\r\n",
                "alice@a.test",
                Some("a.test"),
            ),
            ("From: bob@a.test\r\n", "alice@a.test", Some("a.test")),
            ("From: CEO <ceo@tenant-b.test>\r\n", "alice@a.test", None),
            ("From: ceo@tenant-b.test\r\n", "", None),
            ("From: alice@a.test\r\n", "", None),
            (
                "From: alice@a.test, ceo@tenant-b.test\r\n",
                "alice@a.test",
                None,
            ),
            (
                "From: alice@a.test\r\nFrom: ceo@tenant-b.test\r\n",
                "alice@a.test",
                None,
            ),
            ("From: alice@sub.a.test\r\n", "alice@a.test", None),
            ("", "alice@a.test", None),
            ("From: not an address\r\n", "alice@a.test", None),
        ];
        for (from, submitter, want) in cases {
            assert_eq!(
                signing_domain(&m(from), submitter).as_deref(),
                *want,
                "From {from:?} submitter {submitter:?}"
            );
        }
    }

    #[test]
    fn from_domain_is_taken_from_the_header() {
        assert_eq!(
            from_domain(b"Subject: x\r\nFrom: Alice <alice@Example.TEST>\r\n\r\nbody\r\n"),
            Some("example.test".into())
        );
        assert_eq!(from_domain(b"Subject: x\r\n\r\nbody\r\n"), None);
    }
}
