//! The gRPC clients of mailbox-store, with `tonic::Status` turned into `ServiceError` (the
//! one mapping lives in mailsuite-runtime) and streams collected with bounded sizes.

use futures::StreamExt;
use mailsuite_proto as pb;
use mailsuite_proto::directory_client::DirectoryClient;
use mailsuite_proto::mailbox_client::MailboxClient;
use mailsuite_runtime::ServiceError;
use mailsuite_runtime::grpc::GrpcChannel;

pub type StoreResult<T> = Result<T, ServiceError>;

/// The account's mailboxes and its subscriptions, which are names that need not exist.
pub struct Listing {
    pub boxes: Vec<pb::MailboxInfo>,
    pub subscribed: std::collections::HashSet<String>,
}

/// Every call has a deadline, so a stuck store turns into `NO [UNAVAILABLE]`/`[SERVERBUG]`
/// replies instead of sessions that hang. (It bounds the wait for the reply's headers: a
/// unary reply, or the start of a stream.)
type Channel = tower::timeout::Timeout<GrpcChannel>;

#[derive(Clone)]
pub struct Store {
    mailbox: MailboxClient<Channel>,
    directory: DirectoryClient<Channel>,
}

/// APPEND data goes to the store in chunks of this size (CONVENTIONS: at most 64 KiB).
const CHUNK: usize = 64 * 1024;

impl Store {
    pub fn connect(
        url: &str,
        token: &str,
        timeout: std::time::Duration,
    ) -> Result<Store, tonic::transport::Error> {
        let channel = tower::timeout::Timeout::new(
            mailsuite_runtime::grpc::connect_lazy_with_token(url, token)?,
            timeout,
        );
        Ok(Store {
            mailbox: MailboxClient::new(channel.clone())
                .max_decoding_message_size(128 * 1024 * 1024),
            directory: DirectoryClient::new(channel),
        })
    }

    pub fn mailbox(&self) -> MailboxClient<Channel> {
        self.mailbox.clone()
    }

    /// `Ok(None)` for wrong credentials.
    pub async fn authenticate(
        &self,
        username: &str,
        password: &str,
        remote_ip: &str,
    ) -> StoreResult<Option<pb::Account>> {
        let r = self
            .directory
            .clone()
            .authenticate(pb::AuthenticateRequest {
                username: username.into(),
                password: password.into(),
                remote_ip: remote_ip.into(),
                protocol: "imap".into(),
            })
            .await;
        match r {
            Ok(r) => {
                let r = r.into_inner();
                Ok(if r.ok { r.account } else { None })
            }
            Err(s) => match ServiceError::from(s) {
                ServiceError::Unauthenticated | ServiceError::PermissionDenied(_) => Ok(None),
                e => Err(e),
            },
        }
    }

    pub async fn list(&self, account_id: i64, with_status: bool) -> StoreResult<Listing> {
        let r = self
            .mailbox()
            .list_mailboxes(pb::ListMailboxesRequest {
                account_id,
                with_status,
            })
            .await?
            .into_inner();
        let subscribed = if r.subscriptions_listed {
            r.subscriptions.into_iter().collect()
        } else {
            // A store of the previous release knows only subscribed mailboxes that exist.
            r.mailboxes
                .iter()
                .filter(|b| b.subscribed)
                .map(|b| b.name.clone())
                .collect()
        };
        Ok(Listing {
            boxes: r.mailboxes,
            subscribed,
        })
    }

    pub async fn create(&self, account_id: i64, name: &str) -> StoreResult<pb::MailboxInfo> {
        Ok(self
            .mailbox()
            .create_mailbox(pb::CreateMailboxRequest {
                account_id,
                name: name.into(),
                special_use: pb::SpecialUse::None as i32,
            })
            .await?
            .into_inner())
    }

    pub async fn delete(&self, account_id: i64, name: &str) -> StoreResult<()> {
        self.mailbox()
            .delete_mailbox(pb::DeleteMailboxRequest {
                account_id,
                name: name.into(),
            })
            .await?;
        Ok(())
    }

    pub async fn rename(&self, account_id: i64, from: &str, to: &str) -> StoreResult<()> {
        self.mailbox()
            .rename_mailbox(pb::RenameMailboxRequest {
                account_id,
                from: from.into(),
                to: to.into(),
            })
            .await?;
        Ok(())
    }

    pub async fn subscribe(&self, account_id: i64, name: &str, on: bool) -> StoreResult<()> {
        self.mailbox()
            .set_subscribed(pb::SetSubscribedRequest {
                account_id,
                name: name.into(),
                subscribed: on,
            })
            .await?;
        Ok(())
    }

    pub async fn status(&self, account_id: i64, name: &str) -> StoreResult<pb::MailboxInfo> {
        Ok(self
            .mailbox()
            .status(pb::StatusRequest {
                account_id,
                name: name.into(),
            })
            .await?
            .into_inner())
    }

    pub async fn select(
        &self,
        account_id: i64,
        name: &str,
        read_only: bool,
    ) -> StoreResult<pb::SelectResponse> {
        Ok(self
            .mailbox()
            .select(pb::SelectRequest {
                account_id,
                name: name.into(),
                read_only,
            })
            .await?
            .into_inner())
    }

    pub async fn fetch(&self, req: pb::FetchRequest) -> StoreResult<Vec<pb::MessageMeta>> {
        let mut stream = self.mailbox().fetch(req).await?.into_inner();
        let mut out = Vec::new();
        while let Some(m) = stream.next().await {
            out.push(m?);
        }
        Ok(out)
    }

    /// One FetchBody call for every message of `uids`: the returned stream yields each
    /// message's sections as soon as that message has arrived, in ascending UID order (the
    /// store's contract: for each uid, for each section, its chunks). A message that no
    /// longer exists is simply absent. `max_total` bounds the bytes held for one message.
    pub async fn fetch_bodies(
        &self,
        account_id: i64,
        mailbox_id: i64,
        uids: pb::UidSet,
        sections: Vec<pb::Section>,
        max_total: u64,
    ) -> StoreResult<BodyStream> {
        let n = sections.len();
        let stream = self
            .mailbox()
            .fetch_body(pb::FetchBodyRequest {
                account_id,
                mailbox_id,
                uids: Some(uids),
                sections,
            })
            .await?
            .into_inner();
        Ok(BodyStream {
            stream,
            sections: n,
            max_total,
            pending: None,
        })
    }

    pub async fn store_flags(
        &self,
        req: pb::StoreFlagsRequest,
    ) -> StoreResult<pb::StoreFlagsResponse> {
        Ok(self.mailbox().store_flags(req).await?.into_inner())
    }

    pub async fn copy(&self, req: pb::CopyRequest) -> StoreResult<pb::CopyResponse> {
        Ok(self.mailbox().copy(req).await?.into_inner())
    }

    pub async fn expunge(&self, req: pb::ExpungeRequest) -> StoreResult<pb::ExpungeResponse> {
        Ok(self.mailbox().expunge(req).await?.into_inner())
    }

    pub async fn append(
        &self,
        header: pb::AppendHeader,
        data: Vec<u8>,
    ) -> StoreResult<pb::AppendResponse> {
        let mut chunks = vec![pb::AppendChunk {
            part: Some(pb::append_chunk::Part::Header(header)),
        }];
        // Slices of the one buffer (the body fields are `Bytes`), not a copy per chunk.
        let data = bytes::Bytes::from(data);
        for at in (0..data.len()).step_by(CHUNK) {
            chunks.push(pb::AppendChunk {
                part: Some(pb::append_chunk::Part::Data(
                    data.slice(at..(at + CHUNK).min(data.len())),
                )),
            });
        }
        Ok(self
            .mailbox()
            .append(futures::stream::iter(chunks))
            .await?
            .into_inner())
    }

    /// MULTIAPPEND: every message in one store transaction, all or none.
    pub async fn append_multi(
        &self,
        msgs: Vec<(pb::AppendHeader, Vec<u8>)>,
    ) -> StoreResult<pb::AppendMultiResponse> {
        let chunks = msgs.into_iter().flat_map(|(header, data)| {
            let head = pb::AppendChunk {
                part: Some(pb::append_chunk::Part::Header(header)),
            };
            // Slices of each message's one buffer, as for APPEND.
            let data = bytes::Bytes::from(data);
            let body: Vec<pb::AppendChunk> = (0..data.len())
                .step_by(CHUNK)
                .map(|at| pb::AppendChunk {
                    part: Some(pb::append_chunk::Part::Data(
                        data.slice(at..(at + CHUNK).min(data.len())),
                    )),
                })
                .collect();
            std::iter::once(head).chain(body)
        });
        Ok(self
            .mailbox()
            .append_multi(futures::stream::iter(chunks))
            .await?
            .into_inner())
    }

    pub async fn search(&self, req: pb::SearchRequest) -> StoreResult<pb::SearchResponse> {
        Ok(self.mailbox().search(req).await?.into_inner())
    }

    pub async fn changes(
        &self,
        account_id: i64,
        mailbox_id: i64,
        since_modseq: u64,
        claim_recent: bool,
    ) -> StoreResult<pb::ChangesResponse> {
        Ok(self
            .mailbox()
            .changes(pb::ChangesRequest {
                account_id,
                mailbox_id,
                since_modseq,
                claim_recent,
            })
            .await?
            .into_inner())
    }

    pub async fn quota(&self, account_id: i64) -> StoreResult<pb::QuotaInfo> {
        Ok(self
            .mailbox()
            .get_quota(pb::GetQuotaRequest { account_id })
            .await?
            .into_inner())
    }
}

/// The messages of one FetchBody stream, one at a time (see [`Store::fetch_bodies`]).
pub struct BodyStream {
    stream: tonic::Streaming<pb::BodyChunk>,
    sections: usize,
    max_total: u64,
    /// The first chunk of the next message, read while finishing the previous one.
    pending: Option<pb::BodyChunk>,
}

/// One message of a [`BodyStream`]: its UID and its sections in request order, `None` for a
/// section the message does not have.
pub type MessageBody = (u32, Vec<Option<Vec<u8>>>);

impl BodyStream {
    /// Read messages until the stream ends (`true`) or at least `budget` bytes of them have
    /// been read (`false`: the call is cancelled when `self` is dropped, and the messages
    /// after the last one returned must be asked for again). Never waits for anything but
    /// the store, so the data in flight on the shared connection is consumed promptly.
    pub async fn read_ahead(mut self, budget: u64) -> StoreResult<(Vec<MessageBody>, bool)> {
        let mut out = Vec::new();
        let mut bytes = 0u64;
        while let Some(m) = self.next_message().await? {
            bytes += m.1.iter().flatten().map(|b| b.len() as u64).sum::<u64>();
            out.push(m);
            if bytes >= budget {
                return Ok((out, false));
            }
        }
        Ok((out, true))
    }

    /// The next message, or `None` at the end of the stream.
    pub async fn next_message(&mut self) -> StoreResult<Option<MessageBody>> {
        let first = match self.pending.take() {
            Some(c) => c,
            None => match self.stream.next().await {
                Some(c) => c?,
                None => return Ok(None),
            },
        };
        let uid = first.uid;
        let mut out: Vec<Option<Vec<u8>>> = vec![None; self.sections];
        let mut total = 0u64;
        let mut chunk = first;
        loop {
            if let Some(slot) = out.get_mut(chunk.section as usize) {
                if chunk.missing {
                    *slot = None;
                } else {
                    total += chunk.data.len() as u64;
                    if total > self.max_total {
                        return Err(ServiceError::TooLarge("fetched sections too large".into()));
                    }
                    let buf = slot.get_or_insert_with(|| {
                        Vec::with_capacity(chunk.total.min(self.max_total) as usize)
                    });
                    buf.extend_from_slice(&chunk.data);
                }
            }
            match self.stream.next().await {
                None => break,
                Some(c) => {
                    let c = c?;
                    if c.uid != uid {
                        self.pending = Some(c);
                        break;
                    }
                    chunk = c;
                }
            }
        }
        Ok(Some((uid, out)))
    }
}
