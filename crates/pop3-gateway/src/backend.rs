//! What a POP3 session needs from the mail store, as a trait: the gRPC client in `store`
//! implements it for production, tests may implement it in memory.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;

use futures::Stream;

use crate::session::{LoginError, Maildrop, Target};

/// Why the store could not do what was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Retrying later may work (`-ERR [SYS/TEMP]`).
    Temporary(String),
    /// It will not work (`-ERR [SYS/PERM]`).
    Permanent(String),
    /// The message was expunged meanwhile (by IMAP, or an administrator).
    Gone,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Temporary(m) | Failure::Permanent(m) => f.write_str(m),
            Failure::Gone => f.write_str("message no longer exists"),
        }
    }
}

/// A message's content in order, in chunks of any size (`Bytes`: the chunks the store sent,
/// passed on without a copy).
pub type BodyStream = Pin<Box<dyn Stream<Item = Result<bytes::Bytes, Failure>> + Send>>;

pub trait Backend: Send + Sync + 'static {
    /// Held for the whole session: exclusive access to the maildrop (RFC 1939 §8) ends when
    /// it is dropped.
    type Lock: Send + 'static;

    /// Resolves once `lock` is no longer held (the store lost it, or went away): another
    /// session may then open the maildrop, so this one must end without UPDATE. Must be
    /// cancel-safe (it is raced against every read). Default: a lock that cannot be lost.
    fn lock_lost(lock: &mut Self::Lock) -> impl Future<Output = ()> + Send {
        let _ = lock;
        std::future::pending()
    }

    /// Whether the store can serve requests now (drives `/readyz`).
    fn ready(&self) -> impl Future<Output = bool> + Send {
        async { true }
    }

    /// Check the credentials, take the maildrop lock, and list the maildrop.
    fn login(
        &self,
        user: &str,
        password: &str,
        peer: IpAddr,
    ) -> impl Future<Output = Result<(Maildrop, Self::Lock), LoginError>> + Send;

    /// The stored content of message `uid`, streamed in order (line ends as stored: the
    /// encoder makes them CRLF).
    fn body(
        &self,
        target: Target,
        uid: u32,
    ) -> impl Future<Output = Result<BodyStream, Failure>> + Send;

    /// Several small messages at once, for pipelined RETRs: the whole stored content of
    /// each uid that still exists (line ends as stored), in any order; uids that are gone
    /// are simply left out. At most `max_bytes` in total: a backend that would exceed it
    /// returns what fits. The default reads nothing ahead, so every RETR goes through
    /// [`Backend::body`].
    fn bodies(
        &self,
        target: Target,
        uids: Vec<u32>,
        max_bytes: u64,
    ) -> impl Future<Output = Result<Vec<(u32, Vec<u8>)>, Failure>> + Send {
        let _ = (target, uids, max_bytes);
        async { Ok(Vec::new()) }
    }

    /// The UPDATE state: mark `seen` \Seen, remove exactly the `deleted` messages.
    fn update(
        &self,
        target: Target,
        deleted: &[u32],
        seen: &[u32],
    ) -> impl Future<Output = Result<(), Failure>> + Send;
}
