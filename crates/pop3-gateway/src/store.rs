//! The [`Backend`] over mailbox-store's gRPC API, through the shared `StoreClient` (one
//! deadline, one error mapping, store health). The one place where store errors become POP3
//! outcomes: credentials → `[AUTH]`, lock held → `[IN-USE]`,
//! temporary trouble → `[SYS/TEMP]`, the rest → `[SYS/PERM]`.

use std::net::IpAddr;
use std::time::Duration;

use mailsuite_proto::mailbox_client::MailboxClient;
use mailsuite_proto::{
    BodyChunk, ExpungeRequest, FetchBodyRequest, FetchRequest, LockControl, LockEvent, Section,
    SelectRequest, StoreFlagsRequest, StoreMode, UidSet,
};
use mailsuite_runtime::ServiceError;
use mailsuite_runtime::grpc::GrpcChannel;
use mailsuite_store_client::StoreClient;
use tonic::{Status, Streaming};

use crate::backend::{Backend, BodyStream, Failure};
use crate::session::{LoginError, Maildrop, Message, Target};

/// The maildrop is POP3's view of the INBOX (RFC 1939 has one maildrop per user).
pub const MAILDROP: &str = "INBOX";

#[derive(Clone)]
pub struct StoreBackend {
    store: StoreClient,
    mailbox: MailboxClient<GrpcChannel>,
    timeout: Duration,
    window: u64,
}

struct WindowReader {
    mailbox: MailboxClient<GrpcChannel>,
    target: Target,
    uid: u32,
    window: u64,
    offset: u64,
    current: Option<Streaming<BodyChunk>>,
    /// Octets received in the current window, and whether it answered at all.
    got: u64,
    any: bool,
    done: bool,
}

impl WindowReader {
    async fn next(&mut self) -> Option<Result<bytes::Bytes, Failure>> {
        loop {
            if self.done {
                return None;
            }
            let current = match &mut self.current {
                Some(c) => c,
                None => {
                    let request = FetchBodyRequest {
                        account_id: self.target.account_id,
                        mailbox_id: self.target.mailbox_id,
                        uids: Some(UidSet::from_uids([self.uid])),
                        sections: vec![Section {
                            has_partial: true,
                            offset: self.offset,
                            length: self.window,
                            ..Default::default()
                        }],
                    };
                    match self.mailbox.fetch_body(request).await {
                        Ok(r) => {
                            self.got = 0;
                            self.any = false;
                            self.current.insert(r.into_inner())
                        }
                        Err(s) => {
                            self.done = true;
                            return Some(Err(failure(s, "reading a message")));
                        }
                    }
                }
            };
            match current.message().await {
                Ok(Some(c)) if c.missing => {
                    self.done = true;
                    return Some(Err(Failure::Gone));
                }
                Ok(Some(c)) => {
                    self.any = true;
                    self.got += c.data.len() as u64;
                    return Some(Ok(c.data));
                }
                Ok(None) => {
                    self.current = None;
                    if !self.any {
                        // Expunged meanwhile: an error, never a silently short message.
                        self.done = true;
                        return Some(Err(Failure::Gone));
                    }
                    if self.got < self.window {
                        self.done = true;
                        return None;
                    }
                    self.offset += self.window;
                }
                Err(s) => {
                    self.done = true;
                    return Some(Err(failure(s, "reading a message")));
                }
            }
        }
    }
}

/// Holds a `LockMaildrop` stream open; the store releases the lock when it closes, and
/// PostgreSQL does when the store's connection dies.
pub struct MaildropLock {
    _release: tokio::sync::mpsc::Sender<LockControl>,
    /// The store ends this stream (UNAVAILABLE) when it loses the lock.
    events: Streaming<LockEvent>,
}

impl StoreBackend {
    /// `timeout` bounds each unary call and the wait for the lock; messages are read in
    /// windows of `window` octets.
    pub fn connect(
        url: &str,
        token: &str,
        timeout: Duration,
        window: u64,
    ) -> Result<Self, tonic::transport::Error> {
        let store = StoreClient::connect(url, token, timeout)?;
        Ok(StoreBackend {
            mailbox: store.mailbox(),
            store,
            timeout,
            window: window.max(1),
        })
    }

    fn unary<T>(&self, msg: T) -> tonic::Request<T> {
        self.store.request(msg)
    }

    async fn lock(&self, account_id: i64) -> Result<MaildropLock, LoginError> {
        let control = LockControl {
            account_id,
            mailbox: MAILDROP.into(),
        };
        // The request stream stays open as long as the lock's sender lives: dropping the lock
        // ends it, which tells the store to release. (Dropping only the response stream
        // would not end the HTTP/2 stream while its request side is still open.)
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let _ = tx.try_send(control);
        let requests = tokio_stream::wrappers::ReceiverStream::new(rx);
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
            Ok(Ok((Some(ev), events))) if ev.acquired => Ok(MaildropLock {
                _release: tx,
                events,
            }),
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
    login_error_of(ServiceError::from(status), during)
}

fn login_error_of(e: ServiceError, during: &str) -> LoginError {
    // Only the store's own "authentication failed" is the user's bad password; a refused
    // internal token (also UNAUTHENTICATED on the wire) is this gateway's misconfiguration,
    // which must not count against the client's auth-failure limit (ServiceError tells them
    // apart by the reason metadata).
    if e == ServiceError::Unauthenticated {
        return LoginError::BadCredentials;
    }
    match failure_of(e, during) {
        Failure::Temporary(m) => LoginError::Temporary(m),
        Failure::Permanent(m) => LoginError::Permanent(m),
        Failure::Gone => LoginError::Permanent("the maildrop does not exist".into()),
    }
}

fn failure(status: Status, during: &str) -> Failure {
    failure_of(ServiceError::from(status), during)
}

fn failure_of(e: ServiceError, during: &str) -> Failure {
    tracing::warn!(error = %e, "mail store failed {during}");
    match e {
        ServiceError::NotFound(_) => Failure::Gone,
        e if e.is_temporary() => Failure::Temporary("mail store temporarily unavailable".into()),
        _ => Failure::Permanent(format!("mail store refused {during}")),
    }
}

impl Backend for StoreBackend {
    type Lock = MaildropLock;

    async fn lock_lost(lock: &mut MaildropLock) {
        // `message()` keeps its partial-frame state in the stream, so dropping this future
        // between reads loses nothing.
        while let Ok(Some(_)) = lock.events.message().await {}
    }

    async fn ready(&self) -> bool {
        self.store.ready().await
    }

    async fn login(
        &self,
        user: &str,
        password: &str,
        peer: IpAddr,
    ) -> Result<(Maildrop, MaildropLock), LoginError> {
        let account = self
            .store
            .authenticate(user, password, &peer.to_string(), "pop3")
            .await
            .map_err(|e| login_error_of(e, "authenticating"))?
            .ok_or(LoginError::BadCredentials)?;
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
        // Consecutive byte windows of the raw message. A partial section without conversion
        // is read by the store as just that range of the blob, so neither side ever holds
        // more than a window of a large message; CRLF is made by the gateway's encoder.
        // No gRPC deadline: the connection bounds the wait for each chunk instead.
        let reader = WindowReader {
            mailbox: self.mailbox.clone(),
            target,
            uid,
            window: self.window,
            offset: 0,
            current: None,
            got: 0,
            any: false,
            done: false,
        };
        Ok(Box::pin(futures::stream::unfold(
            reader,
            |mut r| async move {
                let item = r.next().await?;
                Some((item, r))
            },
        )))
    }

    async fn bodies(
        &self,
        target: Target,
        uids: Vec<u32>,
        max_bytes: u64,
    ) -> Result<Vec<(u32, Vec<u8>)>, Failure> {
        if uids.is_empty() {
            return Ok(Vec::new());
        }
        // One FetchBody for all of them: the store reads small messages with their rows, a
        // page of messages per statement.
        let request = self.unary(FetchBodyRequest {
            account_id: target.account_id,
            mailbox_id: target.mailbox_id,
            uids: Some(UidSet::from_uids(uids)),
            sections: vec![Section::default()],
        });
        let read = async {
            let mut stream = self
                .mailbox
                .clone()
                .fetch_body(request)
                .await
                .map_err(|s| failure(s, "reading messages ahead"))?
                .into_inner();
            let mut out: Vec<(u32, Vec<u8>)> = Vec::new();
            let mut current: Option<(u32, Vec<u8>)> = None;
            let mut total = 0u64;
            while let Some(c) = stream
                .message()
                .await
                .map_err(|s| failure(s, "reading messages ahead"))?
            {
                if c.missing {
                    current = None;
                    continue;
                }
                total += c.data.len() as u64;
                if total > max_bytes {
                    // What is complete so far; the rest is read one RETR at a time.
                    break;
                }
                let buf = match &mut current {
                    Some((uid, buf)) if *uid == c.uid && !c.first => buf,
                    _ => {
                        &mut current
                            .insert((c.uid, Vec::with_capacity(c.total.min(max_bytes) as usize)))
                            .1
                    }
                };
                buf.extend_from_slice(&c.data);
                if c.last {
                    out.extend(current.take());
                }
            }
            Ok(out)
        };
        match tokio::time::timeout(self.timeout, read).await {
            Ok(r) => r,
            Err(_) => Err(Failure::Temporary("mail store timed out".into())),
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_errors_map_to_pop3_outcomes() {
        assert_eq!(
            login_error(Status::unauthenticated("no"), "x"),
            LoginError::BadCredentials
        );
        assert!(matches!(
            login_error(Status::unavailable("db down"), "x"),
            LoginError::Temporary(_)
        ));
        assert!(matches!(
            login_error(Status::permission_denied("no"), "x"),
            LoginError::Permanent(_)
        ));
        assert!(matches!(
            login_error(Status::not_found("no inbox"), "x"),
            LoginError::Permanent(_)
        ));
        assert_eq!(failure(Status::not_found("uid"), "x"), Failure::Gone);
        assert!(matches!(
            failure(Status::deadline_exceeded("slow"), "x"),
            Failure::Temporary(_)
        ));
        assert!(matches!(
            failure(Status::invalid_argument("bad"), "x"),
            Failure::Permanent(_)
        ));
        // Internal details stay in the log, not in the reply to the client.
        let Failure::Temporary(m) = failure(Status::unavailable("secret dsn host:5432"), "x")
        else {
            panic!()
        };
        assert!(!m.contains("5432"), "{m}");
    }
}
