//! What the session needs from the rest of the system, as a trait (so the state machine is
//! tested without sockets), and its implementation over gRPC: mailbox-store through the shared
//! `StoreClient` (one deadline, one error mapping, chunked uploads), and relay-queue's Queue
//! under the same deadline.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use mailsuite_proto::queue_client::QueueClient;
use mailsuite_proto::{
    Account, AlertRequest, CheckSenderRequest, DeliverHeader, DeliverResponse, EnqueueChunk,
    EnqueueHeader, EnqueueResponse, ExpandRequest, ExpandResponse, FlushRequest, ResolveResponse,
    enqueue_chunk,
};
use mailsuite_runtime::ServiceError;
use mailsuite_runtime::grpc::{GrpcChannel, connect_lazy_with_token};
use mailsuite_store_client::{StoreClient, chunks};

pub type BResult<T> = Result<T, ServiceError>;

pub trait Backend: Send + Sync + 'static {
    /// Whether the store can serve requests now (drives `/readyz`).
    fn ready(&self) -> impl Future<Output = bool> + Send {
        async { true }
    }
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
    store: StoreClient,
    queue: QueueClient<GrpcChannel>,
}

impl GrpcBackend {
    /// `token`: the services' shared internal token (empty = none). Every call is bounded by
    /// `deadline`: a hung store or queue becomes a temporary failure (451), never a session
    /// that waits forever.
    pub fn new(
        store_url: &str,
        queue_url: &str,
        token: &str,
        deadline: Duration,
    ) -> Result<Self, tonic::transport::Error> {
        Ok(GrpcBackend {
            store: StoreClient::connect(store_url, token, deadline)?,
            queue: QueueClient::new(connect_lazy_with_token(queue_url, token)?),
        })
    }

    pub fn store(&self) -> &StoreClient {
        &self.store
    }
}

impl Backend for GrpcBackend {
    async fn ready(&self) -> bool {
        self.store.ready().await
    }

    async fn resolve(&self, address: &str) -> BResult<ResolveResponse> {
        self.store.resolve(address).await
    }

    async fn authenticate(
        &self,
        username: &str,
        password: &str,
        remote_ip: &str,
    ) -> BResult<Option<Account>> {
        self.store
            .authenticate(username, password, remote_ip, "smtp")
            .await
    }

    async fn check_sender(&self, account_id: i64, address: &str) -> BResult<bool> {
        let st = &self.store;
        let r = st
            .call(st.directory().check_sender(st.request(CheckSenderRequest {
                account_id,
                address: address.to_string(),
            })))
            .await?;
        Ok(r.allowed)
    }

    async fn expand(&self, address: &str) -> BResult<ExpandResponse> {
        let st = &self.store;
        st.call(st.directory().expand(st.request(ExpandRequest {
            address: address.to_string(),
        })))
        .await
    }

    async fn deliver(&self, header: DeliverHeader, body: Bytes) -> BResult<DeliverResponse> {
        self.store.deliver(header, body).await
    }

    async fn enqueue(&self, header: EnqueueHeader, body: Bytes) -> BResult<EnqueueResponse> {
        let header = EnqueueChunk {
            part: Some(enqueue_chunk::Part::Header(header)),
        };
        let msgs = std::iter::once(header).chain(chunks(body, |b| EnqueueChunk {
            part: Some(enqueue_chunk::Part::Data(b)),
        }));
        let st = &self.store;
        st.call(
            self.queue
                .clone()
                .enqueue(st.request(tokio_stream::iter(msgs))),
        )
        .await
    }

    async fn alert(&self, address: &str, text: &str) -> BResult<bool> {
        let st = &self.store;
        let r = st
            .call(st.mailbox().alert(st.request(AlertRequest {
                address: address.to_string(),
                text: text.to_string(),
                probe_only: false,
            })))
            .await?;
        Ok(r.online)
    }

    async fn online(&self, address: &str) -> BResult<bool> {
        let st = &self.store;
        let r = st
            .call(st.mailbox().alert(st.request(AlertRequest {
                address: address.to_string(),
                probe_only: true,
                ..Default::default()
            })))
            .await?;
        Ok(r.online)
    }

    async fn flush(&self, domain: &str) -> BResult<u32> {
        let st = &self.store;
        let r = st
            .call(self.queue.clone().flush(st.request(FlushRequest {
                domain: domain.to_string(),
            })))
            .await?;
        Ok(r.recipients)
    }
}
