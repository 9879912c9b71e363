//! `mailctl dkim`: make DKIM signing keys, store them in mailbox-store (relay-queue picks
//! them up from Admin.ListDkimKeys), and print the DNS TXT record to publish.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use clap::{Subcommand, ValueEnum};
use mailsuite_proto::admin_client::AdminClient;
use mailsuite_proto::{DkimKey, ListDkimKeysRequest, SetDkimKeyRequest};

use crate::Output;

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Algorithm {
    /// rsa-sha256 (RFC 6376), understood by every verifier.
    Rsa,
    /// ed25519-sha256 (RFC 8463): small keys; publish it next to an RSA key.
    Ed25519,
}

#[derive(Subcommand, Debug)]
pub enum DkimCmd {
    /// Generate a key for a domain, store it and print the DNS record to publish.
    Generate {
        domain: String,
        #[arg(long, default_value = "mailsuite")]
        selector: String,
        #[arg(long, value_enum, default_value = "rsa")]
        algorithm: Algorithm,
        /// RSA modulus size.
        #[arg(long, default_value_t = 2048)]
        bits: usize,
        /// Do not store the key in mailbox-store; write the private key to --out instead.
        #[arg(long)]
        no_store: bool,
        /// Where to write the private key (PKCS#8 PEM) with --no-store.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// List the stored keys and their DNS records.
    List {
        #[arg(long, default_value = "")]
        domain: String,
    },
}

/// A generated key: PKCS#8 PEM private key and the TXT record value.
pub struct Generated {
    pub algorithm: &'static str,
    pub private_key_pem: String,
    pub dns_record: String,
}

fn der_len(n: usize) -> Vec<u8> {
    if n < 0x80 {
        vec![n as u8]
    } else {
        let bytes: Vec<u8> = n
            .to_be_bytes()
            .iter()
            .copied()
            .skip_while(|b| *b == 0)
            .collect();
        let mut v = vec![0x80 | bytes.len() as u8];
        v.extend(bytes);
        v
    }
}

fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend(der_len(content.len()));
    v.extend_from_slice(content);
    v
}

/// AlgorithmIdentifier { rsaEncryption, NULL }.
const RSA_ALG_ID: &[u8] = &[
    0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
];

/// PKCS#1 RSAPrivateKey → PKCS#8 PrivateKeyInfo (RFC 5208).
fn rsa_pkcs8(pkcs1: &[u8]) -> Vec<u8> {
    let mut body = tlv(0x02, &[0x00]);
    body.extend_from_slice(RSA_ALG_ID);
    body.extend(tlv(0x04, pkcs1));
    tlv(0x30, &body)
}

/// PKCS#1 RSAPublicKey → SubjectPublicKeyInfo, the form RFC 6376 §3.6.1 publishes in p=.
fn rsa_spki(pkcs1: &[u8]) -> Vec<u8> {
    let mut bits = vec![0x00];
    bits.extend_from_slice(pkcs1);
    let mut body = RSA_ALG_ID.to_vec();
    body.extend(tlv(0x03, &bits));
    tlv(0x30, &body)
}

pub fn pem(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut s = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        s.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        s.push('\n');
    }
    s.push_str(&format!("-----END {label}-----\n"));
    s
}

pub fn generate(algorithm: Algorithm, bits: usize) -> Result<Generated> {
    use mail_auth::dkim::generate::DkimKeyPair;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    match algorithm {
        Algorithm::Rsa => {
            if !(2048..=4096).contains(&bits) {
                bail!("RSA keys must have 2048 to 4096 bits (RFC 8301)");
            }
            let k = DkimKeyPair::generate_rsa(bits).map_err(|e| anyhow::anyhow!("{e}"))?;
            Ok(Generated {
                algorithm: "rsa-sha256",
                private_key_pem: pem("PRIVATE KEY", &rsa_pkcs8(k.private_key())),
                dns_record: format!("v=DKIM1; k=rsa; p={}", b64(&rsa_spki(k.public_key()))),
            })
        }
        Algorithm::Ed25519 => {
            let k = DkimKeyPair::generate_ed25519().map_err(|e| anyhow::anyhow!("{e}"))?;
            Ok(Generated {
                algorithm: "ed25519-sha256",
                private_key_pem: pem("PRIVATE KEY", k.private_key()),
                dns_record: format!("v=DKIM1; k=ed25519; p={}", b64(k.public_key())),
            })
        }
    }
}

/// The record in zone-file syntax, split into strings of at most 255 octets (RFC 1035).
pub fn zone_line(domain: &str, selector: &str, record: &str) -> String {
    let parts: Vec<String> = record
        .as_bytes()
        .chunks(255)
        .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
        .collect();
    format!(
        "{selector}._domainkey.{domain}. IN TXT ( {} )",
        parts.join(" ")
    )
}

pub async fn run(store: &str, cmd: DkimCmd, out: &Output) -> Result<()> {
    match cmd {
        DkimCmd::Generate {
            domain,
            selector,
            algorithm,
            bits,
            no_store,
            out: path,
        } => {
            let domain = domain.trim().trim_end_matches('.').to_ascii_lowercase();
            if domain.is_empty() || selector.is_empty() {
                bail!("domain and selector are required");
            }
            let g = generate(algorithm, bits)?;
            if no_store {
                match &path {
                    Some(p) => write_private(p, &g.private_key_pem)?,
                    None => bail!("--no-store needs --out FILE for the private key"),
                }
            } else {
                let mut admin = AdminClient::new(crate::store_channel(store)?);
                admin
                    .set_dkim_key(SetDkimKeyRequest {
                        key: Some(DkimKey {
                            domain: domain.clone(),
                            selector: selector.clone(),
                            algorithm: g.algorithm.into(),
                            private_key_pem: g.private_key_pem.clone(),
                            dns_record: g.dns_record.clone(),
                        }),
                    })
                    .await
                    .context("storing the key (Admin.SetDkimKey)")?;
            }
            if out.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "domain": domain,
                        "selector": selector,
                        "algorithm": g.algorithm,
                        "name": format!("{selector}._domainkey.{domain}"),
                        "txt": g.dns_record,
                        "stored": !no_store,
                    })
                );
            } else {
                println!("; publish this record, then mail from {domain} is signed with it");
                println!("{}", zone_line(&domain, &selector, &g.dns_record));
            }
            Ok(())
        }
        DkimCmd::List { domain } => {
            let mut admin = AdminClient::new(crate::store_channel(store)?);
            let keys = admin
                .list_dkim_keys(ListDkimKeysRequest {
                    domain,
                    include_private: false,
                })
                .await
                .context("listing keys")?
                .into_inner()
                .keys;
            out.table(
                &["Domain", "Selector", "Algorithm", "TXT"],
                keys.into_iter()
                    .map(|k| vec![k.domain, k.selector, k.algorithm, k.dns_record])
                    .collect(),
            );
            Ok(())
        }
    }
}

fn write_private(path: &std::path::Path, pem: &str) -> Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(pem.as_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256};
    use mail_auth::common::headers::HeaderWriter;
    use mail_auth::dkim::DkimSigner;
    use rustls_pki_types::PrivateKeyDer;
    use rustls_pki_types::pem::PemObject;

    fn der(pem: &str) -> PrivateKeyDer<'static> {
        PrivateKeyDer::from_pem_slice(pem.as_bytes()).unwrap()
    }

    /// Sign with the generated private key and verify with dkimpy against the generated
    /// record: proves the key pair and the record belong together, independently of us.
    fn verify_with_dkimpy(signed: &[u8], record: &str) {
        let dir = tempfile::tempdir().unwrap();
        let msg = dir.path().join("m.eml");
        std::fs::write(&msg, signed).unwrap();
        let script = "import sys, dkim\n\
            msg = open(sys.argv[1], 'rb').read()\n\
            ok = dkim.verify(msg, dnsfunc=lambda name, timeout=5: sys.argv[2].encode())\n\
            sys.exit(0 if ok else 1)\n";
        let st = std::process::Command::new("python3")
            .args(["-c", script, msg.to_str().unwrap(), record])
            .status()
            .unwrap();
        assert!(st.success(), "dkimpy rejected the signature for {record}");
    }

    const MSG: &[u8] = b"From: a@example.test\r\nTo: b@example.org\r\nSubject: hi\r\n\r\nbody\r\n";

    #[test]
    fn rsa_key_signs_and_the_record_verifies() {
        let g = generate(Algorithm::Rsa, 2048).unwrap();
        assert!(
            g.dns_record.starts_with("v=DKIM1; k=rsa; p=MII"),
            "SPKI: {}",
            g.dns_record
        );
        let PrivateKeyDer::Pkcs8(_) = der(&g.private_key_pem) else {
            panic!("PKCS#8 expected")
        };
        let key = RsaKey::<Sha256>::from_key_der(der(&g.private_key_pem)).unwrap();
        let sig = DkimSigner::from_key(key)
            .domain("example.test")
            .selector("s")
            .headers(["From", "To", "Subject"])
            .sign(MSG)
            .unwrap();
        let mut signed = sig.to_header().into_bytes();
        signed.extend_from_slice(MSG);
        verify_with_dkimpy(&signed, &g.dns_record);
        assert!(generate(Algorithm::Rsa, 1024).is_err(), "weak keys refused");
    }

    #[test]
    fn ed25519_key_signs_and_the_record_verifies() {
        let g = generate(Algorithm::Ed25519, 0).unwrap();
        let PrivateKeyDer::Pkcs8(p8) = der(&g.private_key_pem) else {
            panic!("PKCS#8 expected")
        };
        let key = Ed25519Key::from_pkcs8_maybe_unchecked_der(p8.secret_pkcs8_der()).unwrap();
        let sig = DkimSigner::from_key(key)
            .domain("example.test")
            .selector("s")
            .headers(["From", "To", "Subject"])
            .sign(MSG)
            .unwrap();
        let mut signed = sig.to_header().into_bytes();
        signed.extend_from_slice(MSG);
        verify_with_dkimpy(&signed, &g.dns_record);
    }

    #[test]
    fn long_records_are_split_for_the_zone_file() {
        let rec = format!("v=DKIM1; k=rsa; p={}", "A".repeat(400));
        let line = zone_line("example.test", "s1", &rec);
        assert!(line.starts_with("s1._domainkey.example.test. IN TXT ( \""));
        let strings: Vec<&str> = line.split('"').skip(1).step_by(2).collect();
        assert_eq!(strings.len(), 2);
        assert!(strings.iter().all(|s| s.len() <= 255));
        assert_eq!(strings.concat(), rec);
    }
}
