//! The one place where service errors become `tonic::Status` and back. A machine-readable
//! reason travels in the `x-mailsuite-reason` metadata so that gateways can pick the right
//! protocol reply (e.g. over-quota → SMTP 552 / IMAP [OVERQUOTA]) without parsing messages.

use tonic::{Code, Status};

const REASON_KEY: &str = "x-mailsuite-reason";

/// The reason a server's internal-token check gives: a misconfigured *service*, which
/// callers must not mistake for a user's bad credentials (that would count against the
/// user's client in the auth-failure limits and tell them their password is wrong).
const INTERNAL_TOKEN_REASON: &str = "internal-token";

/// The status the internal-token check answers a call without the right token with.
pub fn internal_token_refused() -> Status {
    let mut status = Status::unauthenticated("missing or wrong internal token");
    status.metadata_mut().insert(
        REASON_KEY,
        tonic::metadata::MetadataValue::from_static(INTERNAL_TOKEN_REASON),
    );
    status
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    #[error("not found: {0}")]
    NotFound(String),
    #[error("already exists: {0}")]
    AlreadyExists(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    #[error("authentication failed")]
    Unauthenticated,
    /// Over quota. `permanent`: the message can never fit (552) versus not now (452).
    #[error("over quota: {message}")]
    OverQuota { message: String, permanent: bool },
    #[error("too large: {0}")]
    TooLarge(String),
    /// The operation cannot be done in the current state (e.g. deleting INBOX).
    #[error("cannot: {0}")]
    Cannot(String),
    /// A conflicting concurrent change; retrying may succeed.
    #[error("conflict: {0}")]
    Conflict(String),
    /// A dependency (database, another service) is unavailable; retry later.
    #[error("unavailable: {0}")]
    Unavailable(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl ServiceError {
    fn reason(&self) -> &'static str {
        match self {
            ServiceError::NotFound(_) => "not-found",
            ServiceError::AlreadyExists(_) => "already-exists",
            ServiceError::InvalidArgument(_) => "invalid-argument",
            ServiceError::PermissionDenied(_) => "permission-denied",
            ServiceError::Unauthenticated => "unauthenticated",
            ServiceError::OverQuota {
                permanent: true, ..
            } => "over-quota-permanent",
            ServiceError::OverQuota { .. } => "over-quota",
            ServiceError::TooLarge(_) => "too-large",
            ServiceError::Cannot(_) => "cannot",
            ServiceError::Conflict(_) => "conflict",
            ServiceError::Unavailable(_) => "unavailable",
            ServiceError::Internal(_) => "internal",
        }
    }

    fn code(&self) -> Code {
        match self {
            ServiceError::NotFound(_) => Code::NotFound,
            ServiceError::AlreadyExists(_) => Code::AlreadyExists,
            ServiceError::InvalidArgument(_) => Code::InvalidArgument,
            ServiceError::PermissionDenied(_) => Code::PermissionDenied,
            ServiceError::Unauthenticated => Code::Unauthenticated,
            ServiceError::OverQuota { .. } => Code::ResourceExhausted,
            ServiceError::TooLarge(_) => Code::OutOfRange,
            ServiceError::Cannot(_) => Code::FailedPrecondition,
            ServiceError::Conflict(_) => Code::Aborted,
            ServiceError::Unavailable(_) => Code::Unavailable,
            ServiceError::Internal(_) => Code::Internal,
        }
    }

    fn message(&self) -> String {
        match self {
            ServiceError::NotFound(m)
            | ServiceError::AlreadyExists(m)
            | ServiceError::InvalidArgument(m)
            | ServiceError::PermissionDenied(m)
            | ServiceError::TooLarge(m)
            | ServiceError::Cannot(m)
            | ServiceError::Conflict(m)
            | ServiceError::Unavailable(m)
            | ServiceError::Internal(m) => m.clone(),
            ServiceError::OverQuota { message, .. } => message.clone(),
            ServiceError::Unauthenticated => "authentication failed".into(),
        }
    }

    /// Is retrying the same request later reasonable (a temporary failure)?
    pub fn is_temporary(&self) -> bool {
        matches!(
            self,
            ServiceError::Unavailable(_)
                | ServiceError::Conflict(_)
                | ServiceError::Internal(_)
                | ServiceError::OverQuota {
                    permanent: false,
                    ..
                }
        )
    }
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Status {
        let mut status = Status::new(e.code(), e.message());
        if let Ok(v) = e.reason().parse() {
            status.metadata_mut().insert(REASON_KEY, v);
        }
        status
    }
}

impl From<Status> for ServiceError {
    fn from(s: Status) -> ServiceError {
        let reason = s
            .metadata()
            .get(REASON_KEY)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let m = s.message().to_string();
        match (reason, s.code()) {
            (INTERNAL_TOKEN_REASON, _) => ServiceError::Internal(format!(
                "the called service refused this service's internal token \
                 (internal_token must be the same in every service): {m}"
            )),
            ("over-quota-permanent", _) => ServiceError::OverQuota {
                message: m,
                permanent: true,
            },
            ("over-quota", _) | (_, Code::ResourceExhausted) => ServiceError::OverQuota {
                message: m,
                permanent: false,
            },
            ("too-large", _) | (_, Code::OutOfRange) => ServiceError::TooLarge(m),
            ("cannot", _) | (_, Code::FailedPrecondition) => ServiceError::Cannot(m),
            (_, Code::NotFound) => ServiceError::NotFound(m),
            (_, Code::AlreadyExists) => ServiceError::AlreadyExists(m),
            (_, Code::InvalidArgument) => ServiceError::InvalidArgument(m),
            (_, Code::PermissionDenied) => ServiceError::PermissionDenied(m),
            (_, Code::Unauthenticated) => ServiceError::Unauthenticated,
            (_, Code::Aborted) => ServiceError::Conflict(m),
            (_, Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled) => {
                ServiceError::Unavailable(m)
            }
            _ => ServiceError::Internal(m),
        }
    }
}

/// sqlx errors by SQLSTATE: unique violation → AlreadyExists, serialization failure or
/// deadlock → Conflict (retry), connection trouble → Unavailable.
impl From<sqlx::Error> for ServiceError {
    fn from(e: sqlx::Error) -> ServiceError {
        match &e {
            sqlx::Error::RowNotFound => ServiceError::NotFound("no such row".into()),
            sqlx::Error::Database(db) => match db.code().as_deref() {
                Some("23505") => ServiceError::AlreadyExists(db.message().to_string()),
                Some("23503") | Some("23514") | Some("22001") | Some("22P02") => {
                    ServiceError::InvalidArgument(db.message().to_string())
                }
                Some("40001") | Some("40P01") | Some("55P03") => {
                    ServiceError::Conflict(db.message().to_string())
                }
                Some(c) if c.starts_with("08") || c.starts_with("57") || c.starts_with("53") => {
                    ServiceError::Unavailable(db.message().to_string())
                }
                _ => ServiceError::Internal(db.message().to_string()),
            },
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_) => ServiceError::Unavailable(e.to_string()),
            _ => ServiceError::Internal(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_internal_token_is_not_a_users_bad_credentials() {
        let e = ServiceError::from(internal_token_refused());
        assert!(
            matches!(e, ServiceError::Internal(ref m) if m.contains("internal token")),
            "{e:?}"
        );
        assert!(e.is_temporary());
        // A user's wrong password still reads as Unauthenticated.
        assert_eq!(
            ServiceError::from(Status::from(ServiceError::Unauthenticated)),
            ServiceError::Unauthenticated
        );
    }

    #[test]
    fn round_trips_through_status() {
        let cases = [
            ServiceError::NotFound("a".into()),
            ServiceError::AlreadyExists("b".into()),
            ServiceError::InvalidArgument("c".into()),
            ServiceError::PermissionDenied("d".into()),
            ServiceError::Unauthenticated,
            ServiceError::OverQuota {
                message: "e".into(),
                permanent: true,
            },
            ServiceError::OverQuota {
                message: "f".into(),
                permanent: false,
            },
            ServiceError::TooLarge("g".into()),
            ServiceError::Cannot("h".into()),
            ServiceError::Conflict("i".into()),
            ServiceError::Unavailable("j".into()),
            ServiceError::Internal("k".into()),
        ];
        for e in cases {
            let status: Status = e.clone().into();
            assert_eq!(ServiceError::from(status), e);
        }
    }

    #[test]
    fn temporary_classification() {
        assert!(ServiceError::Unavailable("x".into()).is_temporary());
        assert!(!ServiceError::NotFound("x".into()).is_temporary());
        assert!(
            !ServiceError::OverQuota {
                message: "x".into(),
                permanent: true
            }
            .is_temporary()
        );
    }
}
