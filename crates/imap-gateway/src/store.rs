//! mailbox-store as IMAP uses it, over the shared `StoreClient` (one deadline, one error
//! mapping into `ServiceError`, chunked uploads), with streams collected with bounded sizes.

use futures::StreamExt;
use mailsuite_proto as pb;
use mailsuite_proto::mailbox_client::MailboxClient;
use mailsuite_runtime::ServiceError;
use mailsuite_runtime::grpc::GrpcChannel;
use mailsuite_store_client::{StoreClient, chunks};

pub use mailsuite_store_client::StoreResult;

/// The account's mailboxes and its subscriptions, which are names that need not exist.
pub struct Listing {
    pub boxes: Vec<pb::MailboxInfo>,
    pub subscribed: std::collections::HashSet<String>,
}

/// Every call has the client's deadline, so a stuck store turns into `NO [UNAVAILABLE]`
/// replies instead of sessions that hang. (For a streamed reply it bounds the wait for the
/// stream to start.)
#[derive(Clone)]
pub struct Store {
    c: StoreClient,
}

impl Store {
    pub fn connect(
        url: &str,
        token: &str,
        timeout: std::time::Duration,
    ) -> Result<Store, tonic::transport::Error> {
        Ok(Store {
            c: StoreClient::connect(url, token, timeout)?,
        })
    }

    pub fn client(&self) -> &StoreClient {
        &self.c
    }

    /// For the long-lived Watch stream, which has no deadline.
    pub fn mailbox(&self) -> MailboxClient<GrpcChannel> {
        self.c.mailbox()
    }

    fn req<T>(&self, msg: T) -> tonic::Request<T> {
        self.c.request(msg)
    }

    /// `Ok(None)` for wrong credentials.
    pub async fn authenticate(
        &self,
        username: &str,
        password: &str,
        remote_ip: &str,
    ) -> StoreResult<Option<pb::Account>> {
        self.c
            .authenticate(username, password, remote_ip, "imap")
            .await
    }

    pub async fn list(&self, account_id: i64, with_status: bool) -> StoreResult<Listing> {
        let r = self
            .c
            .call(
                self.mailbox()
                    .list_mailboxes(self.req(pb::ListMailboxesRequest {
                        account_id,
                        with_status,
                    })),
            )
            .await?;
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
        self.c
            .call(
                self.mailbox()
                    .create_mailbox(self.req(pb::CreateMailboxRequest {
                        account_id,
                        name: name.into(),
                        special_use: pb::SpecialUse::None as i32,
                    })),
            )
            .await
    }

    pub async fn delete(&self, account_id: i64, name: &str) -> StoreResult<()> {
        self.c
            .call(
                self.mailbox()
                    .delete_mailbox(self.req(pb::DeleteMailboxRequest {
                        account_id,
                        name: name.into(),
                    })),
            )
            .await?;
        Ok(())
    }

    pub async fn rename(&self, account_id: i64, from: &str, to: &str) -> StoreResult<()> {
        self.c
            .call(
                self.mailbox()
                    .rename_mailbox(self.req(pb::RenameMailboxRequest {
                        account_id,
                        from: from.into(),
                        to: to.into(),
                    })),
            )
            .await?;
        Ok(())
    }

    pub async fn subscribe(&self, account_id: i64, name: &str, on: bool) -> StoreResult<()> {
        self.c
            .call(
                self.mailbox()
                    .set_subscribed(self.req(pb::SetSubscribedRequest {
                        account_id,
                        name: name.into(),
                        subscribed: on,
                    })),
            )
            .await?;
        Ok(())
    }

    pub async fn status(&self, account_id: i64, name: &str) -> StoreResult<pb::MailboxInfo> {
        self.c
            .call(self.mailbox().status(self.req(pb::StatusRequest {
                account_id,
                name: name.into(),
            })))
            .await
    }

    pub async fn select(
        &self,
        account_id: i64,
        name: &str,
        read_only: bool,
    ) -> StoreResult<pb::SelectResponse> {
        self.c
            .call(self.mailbox().select(self.req(pb::SelectRequest {
                account_id,
                name: name.into(),
                read_only,
            })))
            .await
    }

    pub async fn fetch(&self, req: pb::FetchRequest) -> StoreResult<Vec<pb::MessageMeta>> {
        let mut stream = self.c.call(self.mailbox().fetch(self.req(req))).await?;
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
            .c
            .call(self.mailbox().fetch_body(self.req(pb::FetchBodyRequest {
                account_id,
                mailbox_id,
                uids: Some(uids),
                sections,
            })))
            .await?;
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
        self.c.call(self.mailbox().store_flags(self.req(req))).await
    }

    pub async fn copy(&self, req: pb::CopyRequest) -> StoreResult<pb::CopyResponse> {
        self.c.call(self.mailbox().copy(self.req(req))).await
    }

    pub async fn expunge(&self, req: pb::ExpungeRequest) -> StoreResult<pb::ExpungeResponse> {
        self.c.call(self.mailbox().expunge(self.req(req))).await
    }

    pub async fn append(
        &self,
        header: pb::AppendHeader,
        data: Vec<u8>,
    ) -> StoreResult<pb::AppendResponse> {
        let head = pb::AppendChunk {
            part: Some(pb::append_chunk::Part::Header(header)),
        };
        let msgs = std::iter::once(head).chain(append_chunks(data));
        self.c
            .call(self.mailbox().append(self.req(futures::stream::iter(msgs))))
            .await
    }

    /// MULTIAPPEND: every message in one store transaction, all or none.
    pub async fn append_multi(
        &self,
        msgs: Vec<(pb::AppendHeader, Vec<u8>)>,
    ) -> StoreResult<pb::AppendMultiResponse> {
        let msgs = msgs.into_iter().flat_map(|(header, data)| {
            let head = pb::AppendChunk {
                part: Some(pb::append_chunk::Part::Header(header)),
            };
            std::iter::once(head).chain(append_chunks(data))
        });
        self.c
            .call(
                self.mailbox()
                    .append_multi(self.req(futures::stream::iter(msgs))),
            )
            .await
    }

    pub async fn search(&self, req: pb::SearchRequest) -> StoreResult<pb::SearchResponse> {
        self.c.call(self.mailbox().search(self.req(req))).await
    }

    pub async fn changes(
        &self,
        account_id: i64,
        mailbox_id: i64,
        since_modseq: u64,
        claim_recent: bool,
    ) -> StoreResult<pb::ChangesResponse> {
        self.c
            .call(self.mailbox().changes(self.req(pb::ChangesRequest {
                account_id,
                mailbox_id,
                since_modseq,
                claim_recent,
            })))
            .await
    }

    pub async fn quota(&self, account_id: i64) -> StoreResult<pb::QuotaInfo> {
        self.c
            .call(
                self.mailbox()
                    .get_quota(self.req(pb::GetQuotaRequest { account_id })),
            )
            .await
    }
}

/// A message's data chunks: slices of its one buffer, not a copy per chunk.
fn append_chunks(data: Vec<u8>) -> impl Iterator<Item = pb::AppendChunk> {
    chunks(bytes::Bytes::from(data), |b| pb::AppendChunk {
        part: Some(pb::append_chunk::Part::Data(b)),
    })
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
