//! DKIM signing (RFC 6376; ed25519-sha256 per RFC 8463) with mail-auth. Keys come from the
//! configuration and from the store (Admin.ListDkimKeys); the signing domain is the one of
//! the From: header, so that the signature aligns for DMARC.

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
    /// key of the From: domain; empty when there is no key for it.
    pub fn sign(&self, message: &[u8], fallback_domain: &str) -> Vec<u8> {
        let domain = from_domain(message).unwrap_or_else(|| fallback_domain.to_ascii_lowercase());
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
        assert!(ring.sign(b"From: x@a.test\r\n\r\nhi\r\n", "").is_empty());
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
