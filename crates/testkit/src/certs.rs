//! `TestCerts`: a throw-away CA and a server certificate for localhost / 127.0.0.1, as PEM
//! files (for services configured by path) and as a rustls client config trusting the CA.

use std::path::PathBuf;
use std::sync::Arc;

use mailsuite_runtime::tls::TlsConfig;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls_pki_types::CertificateDer;

pub struct TestCerts {
    _dir: tempfile::TempDir,
    pub ca_pem: PathBuf,
    pub cert_pem: PathBuf,
    pub key_pem: PathBuf,
    ca_der: CertificateDer<'static>,
}

impl TestCerts {
    pub fn new() -> TestCerts {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_key = KeyPair::generate().expect("ca key");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "mailsuite test CA");
        let ca_cert = ca_params.self_signed(&ca_key).expect("ca cert");
        let issuer = Issuer::new(ca_params, ca_key);

        let key = KeyPair::generate().expect("server key");
        let params = CertificateParams::new(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "mail.test".to_string(),
        ])
        .expect("server params");
        let cert = params.signed_by(&key, &issuer).expect("server cert");

        let ca_pem = dir.path().join("ca.pem");
        let cert_pem = dir.path().join("cert.pem");
        let key_pem = dir.path().join("key.pem");
        std::fs::write(&ca_pem, ca_cert.pem()).expect("write ca");
        std::fs::write(&cert_pem, cert.pem()).expect("write cert");
        std::fs::write(&key_pem, key.serialize_pem()).expect("write key");
        TestCerts {
            ca_der: ca_cert.der().clone(),
            _dir: dir,
            ca_pem,
            cert_pem,
            key_pem,
        }
    }

    /// Server TLS settings using the CA-signed certificate.
    pub fn tls_config(&self) -> TlsConfig {
        TlsConfig {
            cert: self.cert_pem.display().to_string(),
            key: self.key_pem.display().to_string(),
            self_signed_names: vec![],
        }
    }

    /// A client configuration that trusts only the test CA.
    pub fn client_config(&self) -> Arc<rustls::ClientConfig> {
        mailsuite_runtime::tls::install_crypto_provider();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).expect("add ca");
        Arc::new(
            rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }
}

impl Default for TestCerts {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn handshake_with_ca_signed_certificate() {
        let certs = TestCerts::new();
        let server = mailsuite_runtime::tls::server_config(&certs.tls_config()).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(server);
        let connector = tokio_rustls::TlsConnector::from(certs.client_config());
        let (a, b) = tokio::io::duplex(64 * 1024);
        let srv = tokio::spawn(async move {
            let mut s = acceptor.accept(a).await.unwrap();
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).await.unwrap();
            s.write_all(&buf).await.unwrap();
            s.flush().await.unwrap();
        });
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let mut c = connector.connect(name, b).await.unwrap();
        c.write_all(b"hello").await.unwrap();
        let mut buf = [0u8; 5];
        c.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");
        srv.await.unwrap();
    }
}
