//! Delivery: one message to N local recipients in one transaction (blob stored once, one
//! entry per mailbox), idempotent by key, replying only after commit.

use std::collections::BTreeMap;

use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt};
use mailsuite_proto::delivery_server::Delivery;
use mailsuite_proto::{
    AddressKind, DeliverChunk, DeliverHeader, DeliverResponse, RecipientResult, RecipientStatus,
    deliver_chunk,
};
use mailsuite_runtime::ServiceError;
use prost::Message as _;
use tonic::{Request, Response, Status, Streaming};

use crate::Ctx;
use crate::batch::{Outcome, Prepared};
use crate::directory;
use crate::metrics;
use crate::store::{self, INBOX};

pub struct DeliverySvc(pub Ctx);

fn st(e: impl Into<ServiceError>) -> Status {
    e.into().into()
}

/// Read a header chunk followed by data chunks, bounded by `max` bytes.
///
/// The data chunks are `Bytes` slices of the frames tonic received (the proto's body fields
/// are `Bytes`, see crates/proto/build.rs). A message that came in one chunk is returned as
/// that chunk, not copied; a longer one is copied once, chunk by chunk as they arrive, into
/// one buffer sized by `hint` (the header's announced size, bounded by `max`; it grows if the
/// announcement was short), so the message is never re-assembled through a growing `Vec`.
pub async fn read_upload<H, C>(
    stream: &mut (impl Stream<Item = Result<C, Status>> + Unpin),
    max: u64,
    split: impl Fn(C) -> Option<Result<H, Bytes>>,
    hint: impl Fn(&H) -> u64,
) -> Result<(H, Bytes), ServiceError> {
    let first = stream
        .next()
        .await
        .ok_or_else(|| ServiceError::InvalidArgument("empty stream".into()))?
        .map_err(|s| ServiceError::InvalidArgument(s.message().to_string()))?;
    let header = match split(first) {
        Some(Ok(h)) => h,
        _ => {
            return Err(ServiceError::InvalidArgument(
                "the first chunk must be the header".into(),
            ));
        }
    };
    let mut len = 0u64;
    // The only data chunk so far, kept as received.
    let mut single: Option<Bytes> = None;
    // Two or more chunks: the one copy of the message.
    let mut joined: Option<BytesMut> = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|s| ServiceError::InvalidArgument(s.message().to_string()))?;
        match split(chunk) {
            Some(Err(bytes)) => {
                len += bytes.len() as u64;
                if len > max {
                    return Err(ServiceError::TooLarge(format!(
                        "message larger than {max} bytes"
                    )));
                }
                if bytes.is_empty() {
                    continue;
                }
                if let Some(buf) = &mut joined {
                    buf.extend_from_slice(&bytes);
                } else if let Some(one) = single.take() {
                    let cap = hint(&header).min(max).max(len) as usize;
                    let mut buf = BytesMut::with_capacity(cap);
                    buf.extend_from_slice(&one);
                    buf.extend_from_slice(&bytes);
                    joined = Some(buf);
                } else {
                    single = Some(bytes);
                }
            }
            _ => {
                return Err(ServiceError::InvalidArgument(
                    "a second header chunk".into(),
                ));
            }
        }
    }
    let data = match joined {
        Some(buf) => buf.freeze(),
        None => single.unwrap_or_default(),
    };
    Ok((header, data))
}

pub fn internal_date(secs: i64) -> chrono::DateTime<chrono::Utc> {
    if secs == 0 {
        chrono::Utc::now()
    } else {
        chrono::DateTime::from_timestamp(secs, 0).unwrap_or_else(chrono::Utc::now)
    }
}

impl DeliverySvc {
    async fn deliver_inner(
        &self,
        header: &DeliverHeader,
        data: &Bytes,
    ) -> Result<DeliverResponse, ServiceError> {
        let ctx = &self.0;
        let lim = &ctx.config.limits;
        if header.recipients.is_empty() {
            return Err(ServiceError::InvalidArgument("no recipients".into()));
        }
        if header.recipients.len() > lim.max_recipients {
            return Err(ServiceError::InvalidArgument(format!(
                "more than {} recipients",
                lim.max_recipients
            )));
        }
        if header.idempotency_key.is_empty() {
            return Err(ServiceError::InvalidArgument(
                "an idempotency key is required".into(),
            ));
        }
        // A retry is answered from the idempotency record when its key claim (in its batch,
        // crate::batch) finds the key taken.

        // Resolve every recipient before the transaction (read-only, no locks held), unless
        // the caller passes its own resolution of each (smtp-ingress did it at RCPT time):
        // then no connection is taken for it at all.
        let given = (header.resolved.len() == header.recipients.len()
            && header
                .resolved
                .iter()
                .all(|g| g.local_targets.len() + g.remote_targets.len() <= lim.max_expansion))
        .then_some(&header.resolved);
        let mut results = Vec::new();
        let mut targets: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        {
            let mut conn = None;
            for (i, rcpt) in header.recipients.iter().enumerate() {
                let mut res = RecipientResult {
                    recipient: rcpt.clone(),
                    ..Default::default()
                };
                let resolved = match given {
                    Some(g) => Some((
                        g[i].kind(),
                        g[i].local_targets.clone(),
                        g[i].remote_targets.clone(),
                    )),
                    None => {
                        let c = match &mut conn {
                            Some(c) => c,
                            None => conn.insert(ctx.hot.acquire().await?),
                        };
                        directory::resolve(c, rcpt, lim.max_alias_depth, lim.max_expansion)
                            .await
                            .ok()
                            .map(|r| (r.kind, r.local, r.remote))
                    }
                };
                match resolved {
                    Some((kind, local, remote)) => {
                        res.status = match kind {
                            AddressKind::Account | AddressKind::Alias | AddressKind::List
                                if !local.is_empty() =>
                            {
                                for a in local {
                                    targets.entry(a).or_default().push(i);
                                }
                                RecipientStatus::Delivered
                            }
                            AddressKind::Alias | AddressKind::List | AddressKind::Remote
                                if !remote.is_empty() =>
                            {
                                RecipientStatus::Remote
                            }
                            AddressKind::Disabled | AddressKind::Moved => RecipientStatus::Disabled,
                            _ => RecipientStatus::Unknown,
                        } as i32;
                        res.remote_targets = remote;
                    }
                    None => res.status = RecipientStatus::Unknown as i32,
                }
                results.push(res);
            }
        }
        // Hash and parse the message before the transaction (and with no pool connection).
        let blob = if targets.is_empty() {
            None
        } else {
            Some(store::prepare_blob(&ctx.pool, data).await?)
        };

        let want = if header.mailbox.is_empty() {
            INBOX.to_string()
        } else {
            store::normalize_mailbox(&header.mailbox).unwrap_or_else(|_| INBOX.to_string())
        };
        let prepared = Prepared {
            key: header.idempotency_key.clone(),
            data: data.clone(),
            blob,
            results,
            targets,
            mailbox: want,
            flags: store::normalize_flags(&header.flags),
            internal_date: internal_date(header.internal_date),
            add_delivery_headers: header.add_delivery_headers,
            return_path: header.return_path.clone(),
            all_or_nothing: header.all_or_nothing,
            span: tracing::Span::current(),
        };
        // Stored with whatever other deliveries are queued, in one transaction; answered
        // only after it committed.
        match ctx.deliveries.deliver(prepared).await? {
            Outcome::Done(response, entries) => {
                if !response.rolled_back {
                    metrics::inc(&metrics::DELIVERIES, 1);
                    metrics::inc(&metrics::DELIVERED_ENTRIES, entries);
                    metrics::inc(&metrics::DELIVERED_BYTES, data.len() as u64);
                }
                Ok(response)
            }
            // A concurrent call with the same key committed first (or is still at it).
            Outcome::NotClaimed => previous(ctx, &header.idempotency_key)
                .await?
                .ok_or_else(|| ServiceError::Conflict("delivery with this key in progress".into())),
        }
    }
}

async fn previous(ctx: &Ctx, key: &str) -> Result<Option<DeliverResponse>, ServiceError> {
    let prev: Option<Option<Vec<u8>>> =
        sqlx::query_scalar("SELECT response FROM mailbox.deliveries WHERE idempotency_key = $1")
            .bind(key)
            .fetch_optional(&ctx.pool)
            .await?;
    Ok(prev.flatten().map(|b| {
        let mut r = DeliverResponse::decode(b.as_slice()).unwrap_or_default();
        r.duplicate = true;
        metrics::inc(&metrics::DUPLICATE_DELIVERIES, 1);
        r
    }))
}

#[tonic::async_trait]
impl Delivery for DeliverySvc {
    async fn deliver(
        &self,
        req: Request<Streaming<DeliverChunk>>,
    ) -> Result<Response<DeliverResponse>, Status> {
        let mut stream = req.into_inner();
        let max = self.0.config.limits.max_message_bytes;
        let (header, data) = read_upload(
            &mut stream,
            max,
            |c: DeliverChunk| match c.part? {
                deliver_chunk::Part::Header(h) => Some(Ok(h)),
                deliver_chunk::Part::Data(d) => Some(Err(d)),
            },
            |h| h.size_hint,
        )
        .await
        .map_err(st)?;
        if header.size_hint > max {
            return Err(st(ServiceError::TooLarge(format!(
                "message larger than {max} bytes"
            ))));
        }
        // A deadlock or serialization failure is retried here rather than by every caller.
        let mut attempt = 0;
        loop {
            // The delivery (queued for its group commit, see crate::batch), as a span in the
            // caller's trace and a latency sample; the group's transaction has its own.
            let span = tracing::info_span!(
                "db.transaction",
                otel.name = "deliver",
                otel.kind = "client",
                db.system.name = "postgresql",
                db.operation.name = "deliver",
                mailsuite.recipients = header.recipients.len(),
                messaging.message.body.size = data.len(),
            );
            let timer = mailsuite_runtime::metrics::db_timer("deliver");
            let result =
                tracing::Instrument::instrument(self.deliver_inner(&header, &data), span).await;
            drop(timer);
            match result {
                Err(ServiceError::Conflict(m)) if attempt < 3 => {
                    attempt += 1;
                    tracing::debug!("delivery conflict, retrying: {m}");
                }
                r => return r.map(Response::new).map_err(st),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upload(hint: u64, parts: &[Bytes]) -> Vec<Result<DeliverChunk, Status>> {
        let header = DeliverChunk {
            part: Some(deliver_chunk::Part::Header(DeliverHeader {
                size_hint: hint,
                ..Default::default()
            })),
        };
        std::iter::once(header)
            .chain(parts.iter().map(|p| DeliverChunk {
                part: Some(deliver_chunk::Part::Data(p.clone())),
            }))
            .map(Ok)
            .collect()
    }

    async fn read(hint: u64, parts: &[Bytes], max: u64) -> Result<Bytes, ServiceError> {
        let mut s = futures::stream::iter(upload(hint, parts));
        let split = |c: DeliverChunk| match c.part? {
            deliver_chunk::Part::Header(h) => Some(Ok(h)),
            deliver_chunk::Part::Data(d) => Some(Err(d)),
        };
        read_upload(&mut s, max, split, |h| h.size_hint)
            .await
            .map(|(_, d)| d)
    }

    /// A message in one chunk is that chunk: the same buffer, not a copy of it.
    #[tokio::test]
    async fn one_chunk_is_kept_without_a_copy() {
        let chunk = Bytes::from(vec![b'a'; 1000]);
        let data = read(1000, std::slice::from_ref(&chunk), 1 << 20)
            .await
            .unwrap();
        assert_eq!(data, chunk);
        assert_eq!(data.as_ptr(), chunk.as_ptr(), "the received chunk itself");
        // Empty chunks around it change nothing.
        let parts = [Bytes::new(), chunk.clone(), Bytes::new()];
        let data = read(0, &parts, 1 << 20).await.unwrap();
        assert_eq!(data.as_ptr(), chunk.as_ptr());
    }

    /// Several chunks are copied once, in order, into one buffer, whatever the hint says.
    #[tokio::test]
    async fn chunks_are_joined_in_order_once() {
        let whole: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let whole = Bytes::from(whole);
        let parts: Vec<Bytes> = (0..whole.len())
            .step_by(64 * 1024)
            .map(|at| whole.slice(at..(at + 64 * 1024).min(whole.len())))
            .collect();
        for hint in [0, 10, whole.len() as u64, 1 << 40] {
            let data = read(hint, &parts, 1 << 20).await.unwrap();
            assert_eq!(data, whole, "hint {hint}");
        }
        assert!(matches!(
            read(0, &parts, 100_000).await,
            Err(ServiceError::TooLarge(_))
        ));
        assert!(read(0, &[], 10).await.unwrap().is_empty());
    }
}
