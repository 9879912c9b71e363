//! What the session needs from the rest of the system, as a trait (so the state machine is
//! tested without sockets), and its implementation over gRPC: Directory, Delivery and
//! Mailbox of mailbox-store, Queue of relay-queue.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use mailsuite_proto::delivery_client::DeliveryClient;
use mailsuite_proto::directory_client::DirectoryClient;
use mailsuite_proto::mailbox_client::MailboxClient;
use mailsuite_proto::queue_client::QueueClient;
use mailsuite_proto::{
    Account, AlertRequest, AuthenticateRequest, CheckSenderRequest, DeliverChunk, DeliverHeader,
    DeliverResponse, EnqueueChunk, EnqueueHeader, EnqueueResponse, ExpandRequest, ExpandResponse,
    FlushRequest, ResolveRequest, ResolveResponse, deliver_chunk, enqueue_chunk,
};
use mailsuite_runtime::ServiceError;
use mailsuite_runtime::grpc::{GrpcChannel, connect_lazy_with_token};

/// Streamed message chunks stay under the 64 KiB frame rule.
const CHUNK: usize = 64 * 1024;

pub type BResult<T> = Result<T, ServiceError>;

pub trait Backend: Send + Sync + 'static {
    fn resolve(&self, address: &str) -> impl Future<Output = BResult<ResolveResponse>> + Send;
    /// `Ok(None)` for a wrong user name or password.
    fn authenticate(
        &self,
        username: &str,
        password: &str,
        remote_ip: &str,
    ) -> impl Future<Output = BResult<Option<Account>>> + Send;
    fn check_sender(
        &self,
        account_id: i64,
        address: &str,
    ) -> impl Future<Output = BResult<bool>> + Send;
    fn expand(&self, address: &str) -> impl Future<Output = BResult<ExpandResponse>> + Send;
    fn deliver(
        &self,
        header: DeliverHeader,
        body: Bytes,
    ) -> impl Future<Output = BResult<DeliverResponse>> + Send;
    fn enqueue(
        &self,
        header: EnqueueHeader,
        body: Bytes,
    ) -> impl Future<Output = BResult<EnqueueResponse>> + Send;
    /// Returns whether the user had an open session.
    fn alert(&self, address: &str, text: &str) -> impl Future<Output = BResult<bool>> + Send;
    /// Is a session of `address` open (an Alert probe that shows nothing)?
    fn online(&self, address: &str) -> impl Future<Output = BResult<bool>> + Send;
    /// ETRN: recipients made due.
    fn flush(&self, domain: &str) -> impl Future<Output = BResult<u32>> + Send;
}

#[derive(Clone)]
pub struct GrpcBackend {
    directory: DirectoryClient<GrpcChannel>,
    delivery: DeliveryClient<GrpcChannel>,
    mailbox: MailboxClient<GrpcChannel>,
    queue: QueueClient<GrpcChannel>,
    timeout: Duration,
}

impl GrpcBackend {
    /// `token`: the services' shared internal token (empty = none).
    pub fn new(
        store_url: &str,
        queue_url: &str,
        token: &str,
    ) -> Result<Self, tonic::transport::Error> {
        let store = connect_lazy_with_token(store_url, token)?;
        let queue = connect_lazy_with_token(queue_url, token)?;
        Ok(GrpcBackend {
            directory: DirectoryClient::new(store.clone()),
            delivery: DeliveryClient::new(store.clone()),
            mailbox: MailboxClient::new(store),
            queue: QueueClient::new(queue),
            timeout: Duration::from_secs(60),
        })
    }

    /// Bound every call: a hung store or queue becomes a temporary failure (451), never a
    /// session that waits forever.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    async fn bounded<T>(
        &self,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> BResult<T> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(r) => Ok(r?.into_inner()),
            Err(_) => Err(ServiceError::Unavailable("call timed out".into())),
        }
    }
}

/// The body as a lazy sequence of chunk messages, each a slice of `body` (shared, not copied:
/// the proto's body fields are `Bytes`), so a hand-off never holds a second copy of the body;
/// the only copy is tonic encoding each chunk into its frame.
fn chunks<T>(body: Bytes, wrap: impl Fn(Bytes) -> T) -> impl Iterator<Item = T> {
    (0..body.len())
        .step_by(CHUNK)
        .map(move |at| wrap(body.slice(at..(at + CHUNK).min(body.len()))))
}

impl Backend for GrpcBackend {
    async fn resolve(&self, address: &str) -> BResult<ResolveResponse> {
        self.bounded(self.directory.clone().resolve(ResolveRequest {
            address: address.to_string(),
        }))
        .await
    }

    async fn authenticate(
        &self,
        username: &str,
        password: &str,
        remote_ip: &str,
    ) -> BResult<Option<Account>> {
        let r = self
            .bounded(self.directory.clone().authenticate(AuthenticateRequest {
                username: username.to_string(),
                password: password.to_string(),
                remote_ip: remote_ip.to_string(),
                protocol: "smtp".into(),
            }))
            .await;
        match r {
            Ok(r) => Ok(if r.ok { r.account } else { None }),
            Err(ServiceError::Unauthenticated | ServiceError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn check_sender(&self, account_id: i64, address: &str) -> BResult<bool> {
        let r = self
            .bounded(self.directory.clone().check_sender(CheckSenderRequest {
                account_id,
                address: address.to_string(),
            }))
            .await?;
        Ok(r.allowed)
    }

    async fn expand(&self, address: &str) -> BResult<ExpandResponse> {
        self.bounded(self.directory.clone().expand(ExpandRequest {
            address: address.to_string(),
        }))
        .await
    }

    async fn deliver(&self, header: DeliverHeader, body: Bytes) -> BResult<DeliverResponse> {
        let header = DeliverChunk {
            part: Some(deliver_chunk::Part::Header(header)),
        };
        let msgs = std::iter::once(header).chain(chunks(body, |b| DeliverChunk {
            part: Some(deliver_chunk::Part::Data(b)),
        }));
        self.bounded(self.delivery.clone().deliver(tokio_stream::iter(msgs)))
            .await
    }

    async fn enqueue(&self, header: EnqueueHeader, body: Bytes) -> BResult<EnqueueResponse> {
        let header = EnqueueChunk {
            part: Some(enqueue_chunk::Part::Header(header)),
        };
        let msgs = std::iter::once(header).chain(chunks(body, |b| EnqueueChunk {
            part: Some(enqueue_chunk::Part::Data(b)),
        }));
        self.bounded(self.queue.clone().enqueue(tokio_stream::iter(msgs)))
            .await
    }

    async fn alert(&self, address: &str, text: &str) -> BResult<bool> {
        let r = self
            .bounded(self.mailbox.clone().alert(AlertRequest {
                address: address.to_string(),
                text: text.to_string(),
                probe_only: false,
            }))
            .await?;
        Ok(r.online)
    }

    async fn online(&self, address: &str) -> BResult<bool> {
        let r = self
            .bounded(self.mailbox.clone().alert(AlertRequest {
                address: address.to_string(),
                probe_only: true,
                ..Default::default()
            }))
            .await?;
        Ok(r.online)
    }

    async fn flush(&self, domain: &str) -> BResult<u32> {
        let r = self
            .bounded(self.queue.clone().flush(FlushRequest {
                domain: domain.to_string(),
            }))
            .await?;
        Ok(r.recipients)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_chunked_under_64k() {
        let body = Bytes::from(vec![7u8; CHUNK * 2 + 5]);
        let c: Vec<usize> = chunks(body, |b| b.len()).collect();
        assert_eq!(c, vec![CHUNK, CHUNK, 5]);
        assert_eq!(chunks(Bytes::new(), |b| b.len()).count(), 0);
    }

    /// The chunk messages carry slices of the message buffer, not copies of its bytes: every
    /// chunk points into the one buffer, in order, and together they are the message.
    #[test]
    fn chunks_share_the_message_buffer() {
        let body = Bytes::from((0..CHUNK * 3 + 100).map(|i| i as u8).collect::<Vec<u8>>());
        let base = body.as_ptr() as usize;
        let parts: Vec<Bytes> = chunks(body.clone(), |b| {
            match (DeliverChunk {
                part: Some(deliver_chunk::Part::Data(b)),
            })
            .part
            {
                Some(deliver_chunk::Part::Data(d)) => d,
                _ => unreachable!(),
            }
        })
        .collect();
        for (i, p) in parts.iter().enumerate() {
            assert_eq!(
                p.as_ptr() as usize,
                base + i * CHUNK,
                "chunk {i} is a slice"
            );
        }
        assert_eq!(parts.concat(), body);
    }
}
