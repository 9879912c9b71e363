//! The one client of mailbox-store's gRPC API that smtp-ingress, pop3-gateway, imap-gateway
//! and relay-queue share, so that each keeps only its protocol.
//!
//! - **One deadline.** Every unary call, and the start of every streamed reply, is bounded by
//!   the client's deadline. It travels as `grpc-timeout`, so the store gives up too, and a call
//!   past it fails as `ServiceError::Unavailable`: temporary, which each protocol answers with
//!   its "try again" (SMTP 451, IMAP `NO [UNAVAILABLE]`, POP3 `-ERR [SYS/TEMP]`).
//! - **No retries here.** A failed call is reported at once and the protocol's own client
//!   retries: every write carries an idempotency key or is safe to repeat at the protocol
//!   level, and a retry hidden here would double the wait of every session while the store is
//!   down.
//! - **One error mapping.** `tonic::Status` becomes `ServiceError` (mapped once, in
//!   mailsuite-runtime); each service maps `ServiceError` to its protocol's reply in one place.
//! - **Uploads** (Deliver, Append, Enqueue) go in chunks of at most [`CHUNK`] octets, each a
//!   slice of the message's own buffer.
//! - **Health.** [`StoreClient::ready`] asks the store's health service, and
//!   [`track_readiness`] keeps a service's `/readyz` in step with it.
#![forbid(unsafe_code)]

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use mailsuite_proto::delivery_client::DeliveryClient;
use mailsuite_proto::directory_client::DirectoryClient;
use mailsuite_proto::mailbox_client::MailboxClient;
use mailsuite_proto::{
    Account, AuthenticateRequest, DeliverChunk, DeliverHeader, DeliverResponse, ResolveRequest,
    ResolveResponse, deliver_chunk,
};
use mailsuite_runtime::grpc::{GrpcChannel, connect_lazy_with_token};
use mailsuite_runtime::ops::Ops;
use mailsuite_runtime::{ServiceError, Shutdown};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// Upload chunk size (docs/CONVENTIONS.md: at most 64 KiB per stream message).
pub const CHUNK: usize = 64 * 1024;

/// The service whose health decides readiness: the one every mailbox operation goes through.
const HEALTH_SERVICE: &str = "mailsuite.v1.Mailbox";

/// Largest reply message accepted from the store (a FETCH of many envelopes, a large SEARCH).
const MAX_REPLY: usize = 128 * 1024 * 1024;

pub type StoreResult<T> = Result<T, ServiceError>;

#[derive(Clone)]
pub struct StoreClient {
    directory: DirectoryClient<GrpcChannel>,
    mailbox: MailboxClient<GrpcChannel>,
    delivery: DeliveryClient<GrpcChannel>,
    health: HealthClient<GrpcChannel>,
    deadline: Duration,
}

impl StoreClient {
    /// A client of the store at `url` that connects on first use and reconnects as needed,
    /// sending the services' internal `token` (empty: none) with every call.
    pub fn connect(
        url: &str,
        token: &str,
        deadline: Duration,
    ) -> Result<StoreClient, tonic::transport::Error> {
        Ok(StoreClient::with_channel(
            connect_lazy_with_token(url, token)?,
            deadline,
        ))
    }

    pub fn with_channel(channel: GrpcChannel, deadline: Duration) -> StoreClient {
        StoreClient {
            directory: DirectoryClient::new(channel.clone()),
            mailbox: MailboxClient::new(channel.clone()).max_decoding_message_size(MAX_REPLY),
            delivery: DeliveryClient::new(channel.clone()),
            health: HealthClient::new(channel),
            deadline: deadline.max(Duration::from_millis(1)),
        }
    }

    pub fn deadline(&self) -> Duration {
        self.deadline
    }

    pub fn directory(&self) -> DirectoryClient<GrpcChannel> {
        self.directory.clone()
    }

    pub fn mailbox(&self) -> MailboxClient<GrpcChannel> {
        self.mailbox.clone()
    }

    pub fn delivery(&self) -> DeliveryClient<GrpcChannel> {
        self.delivery.clone()
    }

    /// `msg` as a request carrying the deadline (`grpc-timeout`).
    pub fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(self.deadline);
        r
    }

    /// Await a call made with [`StoreClient::request`], within the deadline.
    pub async fn call<T>(
        &self,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> StoreResult<T> {
        within(self.deadline, async { Ok(call.await?.into_inner()) }).await
    }

    /// Check credentials. `Ok(None)`: the store refused them (a wrong password, an unknown,
    /// disabled or moved account: the client learns no more than that). A refused internal
    /// token is this service's misconfiguration, not the user's: it is an `Err`, and must not
    /// count against the client's auth-failure limits (`ServiceError` tells the two apart).
    pub async fn authenticate(
        &self,
        username: &str,
        password: &str,
        remote_ip: &str,
        protocol: &str,
    ) -> StoreResult<Option<Account>> {
        let r = self
            .call(
                self.directory()
                    .authenticate(self.request(AuthenticateRequest {
                        username: username.into(),
                        password: password.into(),
                        remote_ip: remote_ip.into(),
                        protocol: protocol.into(),
                    })),
            )
            .await;
        match r {
            Ok(r) => Ok(if r.ok { r.account } else { None }),
            Err(ServiceError::Unauthenticated) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn resolve(&self, address: &str) -> StoreResult<ResolveResponse> {
        self.call(self.directory().resolve(self.request(ResolveRequest {
            address: address.into(),
        })))
        .await
    }

    /// Deliver `body` under `header` (its idempotency key makes a retry safe).
    pub async fn deliver(
        &self,
        header: DeliverHeader,
        body: Bytes,
    ) -> StoreResult<DeliverResponse> {
        let header = DeliverChunk {
            part: Some(deliver_chunk::Part::Header(header)),
        };
        let msgs = std::iter::once(header).chain(chunks(body, |b| DeliverChunk {
            part: Some(deliver_chunk::Part::Data(b)),
        }));
        self.call(
            self.delivery()
                .deliver(self.request(tokio_stream::iter(msgs))),
        )
        .await
    }

    /// Whether the store serves mailbox operations now.
    pub async fn ready(&self) -> bool {
        let mut health = self.health.clone();
        let check = health.check(self.request(HealthCheckRequest {
            service: HEALTH_SERVICE.into(),
        }));
        match within(self.deadline, async { Ok(check.await?.into_inner()) }).await {
            Ok(r) => r.status() == ServingStatus::Serving,
            Err(e) => {
                tracing::debug!(error = %e, "store health check failed");
                false
            }
        }
    }
}

/// `fut` within `deadline`; past it, the store counts as unavailable.
pub async fn within<T>(
    deadline: Duration,
    fut: impl Future<Output = Result<T, tonic::Status>>,
) -> StoreResult<T> {
    match tokio::time::timeout(deadline, fut).await {
        Ok(r) => r.map_err(ServiceError::from),
        Err(_) => Err(ServiceError::Unavailable(format!(
            "the mail store did not answer within {deadline:?}"
        ))),
    }
}

/// `body` as a lazy sequence of upload messages of at most [`CHUNK`] octets, each a slice of
/// `body` (shared, not copied), so a hand-off never holds a second copy of the message.
pub fn chunks<T>(body: Bytes, wrap: impl Fn(Bytes) -> T) -> impl Iterator<Item = T> {
    (0..body.len())
        .step_by(CHUNK)
        .map(move |at| wrap(body.slice(at..(at + CHUNK).min(body.len()))))
}

/// Keep `/readyz` in step with the store's health, so a load balancer stops sending clients
/// to a service whose store is gone: one `check` per `interval`, whatever the probe rate,
/// each bounded by `deadline`.
pub async fn track_readiness<F, Fut>(
    check: F,
    ops: Ops,
    shutdown: Shutdown,
    interval: Duration,
    deadline: Duration,
) where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    let interval = interval.max(Duration::from_millis(10));
    let deadline = deadline.min(interval);
    loop {
        let ready = tokio::select! {
            biased;
            _ = shutdown.stopping() => return,
            r = tokio::time::timeout(deadline, check()) => r.unwrap_or(false),
        };
        if ready != ops.is_ready() {
            tracing::info!(ready, "store readiness changed");
        }
        ops.set_ready(ready);
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.stopping() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uploads_are_chunked_under_64k_and_share_the_message_buffer() {
        let body = Bytes::from(vec![7u8; 3 * CHUNK + 5]);
        let parts: Vec<Bytes> = chunks(body.clone(), |b| b).collect();
        assert_eq!(
            parts.iter().map(Bytes::len).collect::<Vec<_>>(),
            [CHUNK, CHUNK, CHUNK, 5]
        );
        for (i, p) in parts.iter().enumerate() {
            assert_eq!(
                p.as_ptr(),
                body[i * CHUNK..].as_ptr(),
                "chunk {i} was copied"
            );
        }
        assert_eq!(chunks(Bytes::new(), |b| b).count(), 0);
    }

    async fn until(ops: &Ops, ready: bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while ops.is_ready() != ready {
            assert!(std::time::Instant::now() < deadline, "never became {ready}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn readiness_follows_the_check_both_ways_and_stops_at_shutdown() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
        let healthy = Arc::new(AtomicBool::new(true));
        let checks = Arc::new(AtomicU32::new(0));
        let (ops, shutdown) = (Ops::default(), Shutdown::new());
        let (h, n) = (healthy.clone(), checks.clone());
        let task = tokio::spawn(track_readiness(
            move || {
                let (h, n) = (h.clone(), n.clone());
                async move {
                    n.fetch_add(1, Ordering::SeqCst);
                    h.load(Ordering::SeqCst)
                }
            },
            ops.clone(),
            shutdown.clone(),
            Duration::from_millis(10),
            Duration::from_secs(1),
        ));
        until(&ops, true).await;
        healthy.store(false, Ordering::SeqCst);
        until(&ops, false).await;
        healthy.store(true, Ordering::SeqCst);
        until(&ops, true).await;
        shutdown.trigger();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("stops at shutdown")
            .unwrap();
        assert!(checks.load(Ordering::SeqCst) >= 3);
    }

    #[tokio::test]
    async fn a_check_that_hangs_counts_as_not_ready() {
        let (ops, shutdown) = (Ops::default(), Shutdown::new());
        ops.set_ready(true);
        let task = tokio::spawn(track_readiness(
            std::future::pending::<bool>,
            ops.clone(),
            shutdown.clone(),
            Duration::from_millis(50),
            Duration::from_millis(20),
        ));
        until(&ops, false).await;
        shutdown.trigger();
        task.await.unwrap();
    }
}
