//! rustls configuration: certificates from PEM files, or a self-signed one made at start for
//! development. Exactly one crypto provider (ring) is installed: two make rustls panic.

use std::path::Path;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading {path}: {message}")]
    Pem { path: String, message: String },
    #[error("no certificate in {0}")]
    NoCertificate(String),
    #[error("certificate generation: {0}")]
    Generate(String),
    #[error("tls configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// TLS settings of a service. Empty paths = a self-signed certificate for `self_signed_names`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: String,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: String,
    /// Names for the self-signed certificate made when no files are given.
    pub self_signed_names: Vec<String>,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert: String::new(),
            key: String::new(),
            self_signed_names: vec!["localhost".into()],
        }
    }
}

/// Install ring as the process-wide crypto provider (idempotent).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_err(path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| pem_err(path, e))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.display().to_string()));
    }
    Ok(certs)
}

pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| pem_err(path, e))
}

fn pem_err(path: &Path, e: impl std::fmt::Display) -> TlsError {
    TlsError::Pem {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

/// A self-signed certificate and its key, for development.
pub fn self_signed(
    names: &[String],
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let ck = rcgen::generate_simple_self_signed(names.to_vec())
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    let key = PrivateKeyDer::try_from(ck.signing_key.serialize_der())
        .map_err(|e| TlsError::Generate(e.to_string()))?;
    Ok((vec![ck.cert.der().clone()], key))
}

/// A server configuration from the given settings.
pub fn server_config(cfg: &TlsConfig) -> Result<Arc<ServerConfig>, TlsError> {
    install_crypto_provider();
    let (certs, key) = if cfg.cert.is_empty() {
        // Clients cannot verify this certificate, so an attacker in the path could present
        // their own: fine for a laptop or a test, not for users. Say so every time.
        tracing::warn!(
            names = ?cfg.self_signed_names,
            "tls.cert is not set: serving a SELF-SIGNED certificate that clients cannot \
             verify; set tls.cert and tls.key for production"
        );
        self_signed(&cfg.self_signed_names)?
    } else {
        let key_path = if cfg.key.is_empty() {
            &cfg.cert
        } else {
            &cfg.key
        };
        (
            load_certs(Path::new(&cfg.cert))?,
            load_key(Path::new(key_path))?,
        )
    };
    let config = ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)?;
    Ok(Arc::new(config))
}

/// A client configuration trusting exactly the given PEM roots.
pub fn client_config_with_roots(roots_pem: &Path) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(roots_pem)? {
        roots.add(c)?;
    }
    Ok(Arc::new(
        rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_signed_config_builds() {
        let cfg = server_config(&TlsConfig::default()).unwrap();
        assert!(cfg.alpn_protocols.is_empty());
    }

    #[test]
    fn files_are_loaded_and_errors_named() {
        let (certs, _key) = self_signed(&["mail.test".into()]).unwrap();
        let ck = rcgen::generate_simple_self_signed(vec!["mail.test".to_string()]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("cert.pem");
        let key = dir.path().join("key.pem");
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
        let cfg = TlsConfig {
            cert: cert.display().to_string(),
            key: key.display().to_string(),
            self_signed_names: vec![],
        };
        server_config(&cfg).unwrap();
        assert_eq!(certs.len(), 1);

        let missing = TlsConfig {
            cert: dir.path().join("nope.pem").display().to_string(),
            ..cfg
        };
        let err = server_config(&missing).unwrap_err().to_string();
        assert!(err.contains("nope.pem"), "{err}");
    }
}
