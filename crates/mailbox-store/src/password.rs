//! argon2id password hashing. Verification runs on the blocking pool (it is deliberately
//! slow), and an unknown user is verified against a fixed dummy hash so that the answer takes
//! as long as for a real one.

use std::sync::Arc;

use argon2::Argon2;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use mailsuite_runtime::ServiceError;

#[derive(Clone)]
pub struct Hasher {
    dummy: Arc<String>,
}

impl Default for Hasher {
    fn default() -> Self {
        Self::new()
    }
}

impl Hasher {
    pub fn new() -> Self {
        let dummy = hash_blocking("mailsuite dummy password for unknown users").unwrap_or_default();
        Hasher {
            dummy: Arc::new(dummy),
        }
    }

    pub async fn hash(&self, password: &str) -> Result<String, ServiceError> {
        if password.is_empty() {
            return Err(ServiceError::InvalidArgument("empty password".into()));
        }
        let pw = password.to_string();
        tokio::task::spawn_blocking(move || hash_blocking(&pw))
            .await
            .map_err(|e| ServiceError::Internal(e.to_string()))?
    }

    /// `hash` None: the user does not exist; the dummy hash is checked to spend the same time.
    pub async fn verify(&self, password: &str, hash: Option<&str>) -> bool {
        let (h, real) = match hash {
            Some(h) => (h.to_string(), true),
            None => (self.dummy.as_str().to_string(), false),
        };
        let pw = password.to_string();
        let ok = tokio::task::spawn_blocking(move || {
            Argon2::default()
                .verify_password(pw.as_bytes(), h.as_str())
                .is_ok()
        })
        .await
        .unwrap_or(false);
        ok && real
    }
}

fn hash_blocking(password: &str) -> Result<String, ServiceError> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| ServiceError::Internal(format!("hashing password: {e}")))
}
