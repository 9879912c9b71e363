//! Keeps `deploy/` honest without a Docker engine or a Kubernetes cluster: parses the
//! Dockerfile, `docker-compose.yml` and the kustomizations under `deploy/k8s` (rendering them
//! with a small kustomize of its own, cross-checked against `kubectl kustomize` where that is
//! installed), and checks them against the workspace (binary names from `cargo metadata`) and
//! against the conventions every service follows (ports, probes, drain period).
//!
//! Each `check_*` function returns the list of problems found, empty when all is well, so a
//! test can both assert the real files are clean and show that a broken copy is caught.

pub mod compose;
pub mod dockerfile;
pub mod k8s;
pub mod kustomize;
pub mod workspace;
pub mod yaml;

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("cargo metadata: {0}")]
    Cargo(String),
}

impl Error {
    pub(crate) fn invalid(path: &Path, message: impl Into<String>) -> Self {
        Error::Invalid {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
}

pub(crate) fn read(path: &Path) -> Result<String, Error> {
    std::fs::read_to_string(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The repository root (this crate lives in `crates/deploy-check`).
pub fn repo_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent()
        .and_then(Path::parent)
        .unwrap_or(here)
        .to_path_buf()
}

/// One service as docs/CONVENTIONS.md defines it.
#[derive(Debug, Clone, Copy)]
pub struct ServiceSpec {
    /// Binary, image, compose service and Deployment name.
    pub name: &'static str,
    /// Ops HTTP endpoint (`/healthz`, `/readyz`, `/metrics`).
    pub ops_port: u16,
    pub grpc_port: Option<u16>,
    /// Public mail ports.
    pub mail_ports: &'static [u16],
    /// Has a HorizontalPodAutoscaler.
    pub autoscaled: bool,
}

pub const SERVICES: &[ServiceSpec] = &[
    ServiceSpec {
        name: "mailbox-store",
        ops_port: 9051,
        grpc_port: Some(50051),
        mail_ports: &[],
        autoscaled: false,
    },
    ServiceSpec {
        name: "relay-queue",
        ops_port: 9052,
        grpc_port: Some(50052),
        mail_ports: &[],
        autoscaled: true,
    },
    ServiceSpec {
        name: "smtp-ingress",
        ops_port: 9025,
        grpc_port: None,
        mail_ports: &[25, 587, 465],
        autoscaled: true,
    },
    ServiceSpec {
        name: "pop3-gateway",
        ops_port: 9110,
        grpc_port: None,
        mail_ports: &[110, 995],
        autoscaled: true,
    },
    ServiceSpec {
        name: "imap-gateway",
        ops_port: 9143,
        grpc_port: None,
        mail_ports: &[143, 993],
        autoscaled: true,
    },
];

/// Binaries that get an image besides the services.
pub const TOOLS: &[&str] = &["mailctl", "mailsuite"];

/// Every public mail port.
pub const MAIL_PORTS: &[u16] = &[25, 587, 465, 110, 995, 143, 993];

pub fn service(name: &str) -> Option<&'static ServiceSpec> {
    SERVICES.iter().find(|s| s.name == name)
}
