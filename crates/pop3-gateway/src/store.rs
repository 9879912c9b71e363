//! The [`Backend`] over mailbox-store's gRPC API (Directory, Mailbox). The one place where
//! store errors become POP3 outcomes: credentials → `[AUTH]`, lock held → `[IN-USE]`,
//! temporary trouble → `[SYS/TEMP]`, the rest → `[SYS/PERM]`.

use std::net::IpAddr;
use std::time::Duration;

use futures::StreamExt;
use mailsuite_proto::directory_client::DirectoryClient;
use mailsuite_proto::mailbox_client::MailboxClient;
use mailsuite_proto::{
    AuthenticateRequest, ExpungeRequest, FetchBodyRequest, FetchRequest, LockControl, LockEvent,
    Section, SelectRequest, StoreFlagsRequest, StoreMode, UidSet,
};
use mailsuite_runtime::ServiceError;
use mailsuite_runtime::grpc::GrpcChannel;
use tonic::{Code, Status, Streaming};

use crate::backend::{Backend, BodyStream, Failure};
use crate::session::{LoginError, Maildrop, Message, Target};

/// The maildrop is POP3's view of the INBOX (RFC 1939 has one maildrop per user).
pub const MAILDROP: &str = "INBOX";

#[derive(Clone)]
pub struct StoreBackend {
    directory: DirectoryClient<GrpcChannel>,
    mailbox: MailboxClient<GrpcChannel>,
    timeout: Duration,
}

/// Holds a `LockMaildrop` stream open; the store releases the lock when it closes, and
/// PostgreSQL does when the store's connection dies.
pub struct MaildropLock {
    _events: Streaming<LockEvent>,
}

impl StoreBackend {
    /// `timeout` bounds each unary call and the wait for the lock.
    pub fn connect(url: &str, timeout: Duration) -> Result<Self, tonic::transport::Error> {
        let channel = mailsuite_runtime::grpc::connect_lazy(url)?;
        Ok(StoreBackend {
            directory: DirectoryClient::new(channel.clone()),
            mailbox: MailboxClient::new(channel),
            timeout,
        })
    }

    fn unary<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(self.timeout);
        r
    }

    async fn lock(&self, account_id: i64) -> Result<MaildropLock, LoginError> {
        let control = LockControl {
            account_id,
            mailbox: MAILDROP.into(),
        };
        // The request stream stays open (pending) for as long as the lock is wanted: the RPC
        // ends when the response stream is dropped.
        let requests = futures::stream::iter([control]).chain(futures::stream::pending());
        let mut mailbox = self.mailbox.clone();
        let acquire = async move {
            let mut events = mailbox.lock_maildrop(requests).await?.into_inner();
            let first = events.message().await?;
            Ok::<_, Status>((first, events))
        };
        match tokio::time::timeout(self.timeout, acquire).await {
            Err(_) => Err(LoginError::Temporary(
                "timed out waiting for the maildrop lock".into(),
            )),
            Ok(Err(status)) => Err(login_error(status, "locking the maildrop")),
            Ok(Ok((Some(ev), events))) if ev.acquired => Ok(MaildropLock { _events: events }),
            Ok(Ok((Some(_), _))) => Err(LoginError::InUse),
            Ok(Ok((None, _))) => Err(LoginError::Temporary(
                "the mail store closed the lock stream".into(),
            )),
        }
    }
}

/// A store error as a login outcome. The client sees a short generic text; the details go
/// to the log.
fn login_error(status: Status, during: &str) -> LoginError {
    if status.code() == Code::Unauthenticated {
        return LoginError::BadCredentials;
    }
    match failure(status, during) {
        Failure::Temporary(m) => LoginError::Temporary(m),
        Failure::Permanent(m) => LoginError::Permanent(m),
        Failure::Gone => LoginError::Permanent("the maildrop does not exist".into()),
    }
}

fn failure(status: Status, during: &str) -> Failure {
    let e = ServiceError::from(status);
    tracing::warn!(error = %e, "mail store failed {during}");
    match e {
        ServiceError::NotFound(_) => Failure::Gone,
        e if e.is_temporary() => Failure::Temporary("mail store temporarily unavailable".into()),
        _ => Failure::Permanent(format!("mail store refused {during}")),
    }
}

impl Backend for StoreBackend {
    type Lock = MaildropLock;

    async fn login(
        &self,
        user: &str,
        password: &str,
        peer: IpAddr,
    ) -> Result<(Maildrop, MaildropLock), LoginError> {
        let auth = self
            .directory
            .clone()
            .authenticate(self.unary(AuthenticateRequest {
                username: user.to_string(),
                password: password.to_string(),
                remote_ip: peer.to_string(),
                protocol: "pop3".into(),
            }))
            .await
            .map_err(|s| login_error(s, "authenticating"))?
            .into_inner();
        let account = match auth.account {
            Some(a) if auth.ok => a,
            _ => return Err(LoginError::BadCredentials),
        };
        if !account.enabled {
            return Err(LoginError::Permanent("account disabled".into()));
        }

        let lock = self.lock(account.id).await?;

        let mut mailbox = self.mailbox.clone();
        let selected = mailbox
            .select(self.unary(SelectRequest {
                account_id: account.id,
                name: MAILDROP.into(),
                // POP3 must not take \Recent away from IMAP clients.
                read_only: true,
            }))
            .await
            .map_err(|s| login_error(s, "opening the maildrop"))?
            .into_inner();
        let info = selected.mailbox.unwrap_or_default();
        let mut messages = Vec::with_capacity(selected.uids.len());
        if !selected.uids.is_empty() {
            let fetch = async {
                let mut metas = mailbox
                    .fetch(FetchRequest {
                        account_id: account.id,
                        mailbox_id: info.id,
                        uids: Some(UidSet::from_uids(selected.uids.iter().copied())),
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                let mut sizes = Vec::with_capacity(selected.uids.len());
                while let Some(m) = metas.message().await? {
                    sizes.push((m.uid, m.size));
                }
                Ok::<_, Status>(sizes)
            };
            let mut sizes = match tokio::time::timeout(self.timeout, fetch).await {
                Err(_) => {
                    return Err(LoginError::Temporary(
                        "timed out listing the maildrop".into(),
                    ));
                }
                Ok(r) => r.map_err(|s| login_error(s, "listing the maildrop"))?,
            };
            sizes.sort_unstable();
            // Only what Select saw: the numbering is fixed as of that moment; a message
            // expunged in between simply is not part of this session.
            for uid in &selected.uids {
                if let Ok(i) = sizes.binary_search_by_key(uid, |(u, _)| *u) {
                    messages.push(Message {
                        uid: *uid,
                        size: sizes[i].1,
                        deleted: false,
                        retrieved: false,
                    });
                }
            }
        }
        Ok((
            Maildrop {
                account_id: account.id,
                mailbox_id: info.id,
                uidvalidity: info.uidvalidity,
                messages,
            },
            lock,
        ))
    }

    async fn body(&self, target: Target, uid: u32) -> Result<BodyStream, Failure> {
        // No gRPC deadline: a large message to a slow client may take long; the connection
        // bounds the wait for each chunk instead.
        let chunks = self
            .mailbox
            .clone()
            .fetch_body(FetchBodyRequest {
                account_id: target.account_id,
                mailbox_id: target.mailbox_id,
                uids: Some(UidSet::from_uids([uid])),
                sections: vec![Section {
                    crlf: true,
                    ..Default::default()
                }],
            })
            .await
            .map_err(|s| failure(s, "reading a message"))?
            .into_inner();
        Ok(Box::pin(chunks.map(|r| match r {
            Ok(c) if c.missing => Err(Failure::Gone),
            Ok(c) => Ok(c.data),
            Err(s) => Err(failure(s, "reading a message")),
        })))
    }

    async fn update(&self, target: Target, deleted: &[u32], seen: &[u32]) -> Result<(), Failure> {
        let mut mailbox = self.mailbox.clone();
        let flags = |uids: &[u32], flag: &str| StoreFlagsRequest {
            account_id: target.account_id,
            mailbox_id: target.mailbox_id,
            uids: Some(UidSet::from_uids(uids.iter().copied())),
            mode: StoreMode::Add as i32,
            flags: vec![flag.to_string()],
            unchanged_since: 0,
        };
        if !seen.is_empty() {
            // Only a courtesy to IMAP clients of the same mailbox: never a reason to keep
            // messages the user asked to delete.
            if let Err(s) = mailbox.store_flags(self.unary(flags(seen, "\\Seen"))).await {
                failure(s, "marking messages seen");
            }
        }
        if deleted.is_empty() {
            return Ok(());
        }
        mailbox
            .store_flags(self.unary(flags(deleted, "\\Deleted")))
            .await
            .map_err(|s| failure(s, "marking messages deleted"))?;
        // Exactly our messages: others that IMAP marked \Deleted stay until IMAP expunges.
        mailbox
            .expunge(self.unary(ExpungeRequest {
                account_id: target.account_id,
                mailbox_id: target.mailbox_id,
                uids: Some(UidSet::from_uids(deleted.iter().copied())),
            }))
            .await
            .map_err(|s| failure(s, "removing messages"))?;
        Ok(())
    }
}
