//! Delivery: one message to N local recipients in one transaction (blob stored once, one
//! entry per mailbox), idempotent by key, replying only after commit.

use std::collections::BTreeMap;

use futures::StreamExt;
use mailsuite_proto::delivery_server::Delivery;
use mailsuite_proto::{
    AddressKind, ChangeKind, DeliverChunk, DeliverHeader, DeliverResponse, RecipientResult,
    RecipientStatus, deliver_chunk,
};
use mailsuite_runtime::ServiceError;
use prost::Message as _;
use sqlx::Row;
use tonic::{Request, Response, Status, Streaming};

use crate::Ctx;
use crate::directory;
use crate::metrics;
use crate::store::{self, INBOX, NewEntry};

pub struct DeliverySvc(pub Ctx);

fn st(e: impl Into<ServiceError>) -> Status {
    e.into().into()
}

/// Read a header chunk followed by data chunks, bounded by `max` bytes.
pub async fn read_upload<H, C>(
    stream: &mut Streaming<C>,
    max: u64,
    split: impl Fn(C) -> Option<Result<H, Vec<u8>>>,
) -> Result<(H, Vec<u8>), ServiceError>
where
    C: Send + 'static,
{
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
    let mut data = Vec::new();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|s| ServiceError::InvalidArgument(s.message().to_string()))?;
        match split(chunk) {
            Some(Err(bytes)) => {
                if (data.len() + bytes.len()) as u64 > max {
                    return Err(ServiceError::TooLarge(format!(
                        "message larger than {max} bytes"
                    )));
                }
                data.extend_from_slice(&bytes);
            }
            _ => {
                return Err(ServiceError::InvalidArgument(
                    "a second header chunk".into(),
                ));
            }
        }
    }
    Ok((header, data))
}

/// `Return-Path:` and `Delivered-To:` lines for one recipient (RFC 5321 §4.4).
fn trace_prefix(return_path: &str, delivered_to: &str) -> Vec<u8> {
    let clean = |s: &str| s.replace(['\r', '\n', '<', '>'], "");
    format!(
        "Return-Path: <{}>\r\nDelivered-To: {}\r\n",
        clean(return_path),
        clean(delivered_to)
    )
    .into_bytes()
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
        data: &[u8],
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
        // A retry is answered from the idempotency record when the claim below conflicts.

        // Resolve every recipient before the transaction (read-only, no locks held).
        let mut results = Vec::new();
        let mut targets: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        let mut prepared = None;
        {
            let mut conn = ctx.pool.acquire().await?;
            for (i, rcpt) in header.recipients.iter().enumerate() {
                let mut res = RecipientResult {
                    recipient: rcpt.clone(),
                    ..Default::default()
                };
                match directory::resolve(&mut conn, rcpt, lim.max_alias_depth, lim.max_expansion)
                    .await
                {
                    Ok(r) => {
                        res.remote_targets = r.remote.clone();
                        res.status = match r.kind {
                            AddressKind::Account | AddressKind::Alias | AddressKind::List
                                if !r.local.is_empty() =>
                            {
                                for a in &r.local {
                                    targets.entry(a.clone()).or_default().push(i);
                                }
                                RecipientStatus::Delivered
                            }
                            AddressKind::Alias | AddressKind::List | AddressKind::Remote
                                if !r.remote.is_empty() =>
                            {
                                RecipientStatus::Remote
                            }
                            AddressKind::Disabled | AddressKind::Moved => RecipientStatus::Disabled,
                            _ => RecipientStatus::Unknown,
                        } as i32;
                    }
                    Err(_) => res.status = RecipientStatus::Unknown as i32,
                }
                results.push(res);
            }
            // Hash and parse the message before the transaction: no locks held meanwhile.
            if !targets.is_empty() {
                prepared = Some(store::prepare_blob(&mut conn, data).await?);
            }
        }

        let mut tx = ctx.pool.begin().await?;
        let claimed: Option<String> = sqlx::query_scalar(
            "INSERT INTO mailbox.deliveries (idempotency_key) VALUES ($1)
             ON CONFLICT DO NOTHING RETURNING idempotency_key",
        )
        .bind(&header.idempotency_key)
        .fetch_optional(&mut *tx)
        .await?;
        if claimed.is_none() {
            // A concurrent call with the same key committed first.
            drop(tx);
            return previous(ctx, &header.idempotency_key)
                .await?
                .ok_or_else(|| {
                    ServiceError::Conflict("delivery with this key in progress".into())
                });
        }

        // Accounts in id order: every writer locks account rows before mailbox rows.
        let addrs: Vec<String> = targets.keys().cloned().collect();
        let rows = sqlx::query(
            "SELECT a.id, a.address, a.quota_bytes, a.quota_messages, a.used_bytes, a.used_messages
             FROM mailbox.accounts a WHERE a.address = ANY($1) AND a.enabled ORDER BY a.id FOR UPDATE",
        )
        .bind(&addrs)
        .fetch_all(&mut *tx)
        .await?;

        let want = if header.mailbox.is_empty() {
            INBOX.to_string()
        } else {
            store::normalize_mailbox(&header.mailbox).unwrap_or_else(|_| INBOX.to_string())
        };
        let flags = store::normalize_flags(&header.flags);
        let date = internal_date(header.internal_date);
        let mut accepted: Vec<(i64, String, Vec<u8>)> = Vec::new();
        let mut over: Vec<(String, bool)> = Vec::new();
        for r in &rows {
            let (id, address): (i64, String) = (r.get(0), r.get(1));
            let prefix = if header.add_delivery_headers {
                trace_prefix(&header.return_path, &address)
            } else {
                Vec::new()
            };
            let size = (data.len() + prefix.len()) as i64;
            match store::quota_verdict(r.get(2), r.get(3), r.get(4), r.get(5), size, 1) {
                Ok(()) => accepted.push((id, address, prefix)),
                Err(ServiceError::OverQuota { permanent, .. }) => over.push((address, permanent)),
                Err(e) => return Err(e),
            }
        }
        for (address, _) in &over {
            for &i in &targets[address] {
                if results[i].delivered_to.is_empty() {
                    results[i].status = RecipientStatus::OverQuota as i32;
                }
            }
        }
        if accepted.is_empty() && !over.is_empty() {
            return Err(ServiceError::OverQuota {
                message: "every recipient is over quota".into(),
                permanent: over.iter().all(|(_, p)| *p),
            });
        }

        let mut blob_id = Vec::new();
        if let (false, Some(blob)) = (accepted.is_empty(), &prepared) {
            store::insert_blob(&mut tx, blob, data, accepted.len() as i64).await?;
            blob_id = blob.id.clone();
        }
        // Mailboxes in id order too, so deliveries to overlapping recipients cannot deadlock.
        let ids: Vec<i64> = accepted.iter().map(|a| a.0).collect();
        let boxes = sqlx::query(
            "SELECT a.id, coalesce(m.id, i.id) FROM unnest($1::bigint[]) AS a(id)
             JOIN mailbox.mailboxes i ON i.account_id = a.id AND i.name = 'INBOX'
             LEFT JOIN mailbox.mailboxes m ON m.account_id = a.id AND m.name = $2",
        )
        .bind(&ids)
        .bind(&want)
        .fetch_all(&mut *tx)
        .await?;
        let mut plan: Vec<(i64, i64, String, Vec<u8>)> = Vec::new();
        for (id, address, prefix) in accepted {
            let mb = boxes
                .iter()
                .find(|r| r.get::<i64, _>(0) == id)
                .map(|r| r.get::<i64, _>(1))
                .ok_or_else(|| ServiceError::Internal(format!("{address} has no INBOX")))?;
            plan.push((mb, id, address, prefix));
        }
        plan.sort_by_key(|p| p.0);
        for (mb, account, address, prefix) in &plan {
            let (uid, modseq, _) = store::alloc_uids(&mut tx, *mb, 1).await?;
            let size = (data.len() + prefix.len()) as i64;
            store::insert_entry(
                &mut tx,
                &NewEntry {
                    mailbox_id: *mb,
                    uid,
                    modseq,
                    flags: &flags,
                    internal_date: date,
                    date_offset: 0,
                    size,
                    blob_id: &blob_id,
                    prefix,
                },
            )
            .await?;
            store::add_usage(&mut tx, *account, size, 1).await?;
            store::publish(
                &mut tx,
                &crate::notify::event(
                    *account,
                    *mb,
                    ChangeKind::New,
                    vec![uid as u32],
                    modseq as u64,
                ),
            )
            .await?;
            for &i in &targets[address] {
                results[i].delivered_to.push(address.clone());
                results[i].status = RecipientStatus::Delivered as i32;
            }
        }
        // A local target that vanished or was disabled since resolution got nothing.
        for r in &mut results {
            if r.status == RecipientStatus::Delivered as i32 && r.delivered_to.is_empty() {
                r.status = if r.remote_targets.is_empty() {
                    RecipientStatus::Unknown
                } else {
                    RecipientStatus::Remote
                } as i32;
            }
        }
        if header.all_or_nothing
            && results.iter().any(|r| {
                r.status != RecipientStatus::Delivered as i32 || !r.remote_targets.is_empty()
            })
        {
            // Dropping the transaction rolls back the entries, the blob and the claimed key,
            // so the caller may hand the message elsewhere (or retry) under the same key.
            drop(tx);
            return Ok(DeliverResponse {
                results,
                blob_id: String::new(),
                duplicate: false,
                size: data.len() as u64,
                rolled_back: true,
            });
        }
        let response = DeliverResponse {
            results,
            blob_id: store::hex_id(&blob_id),
            duplicate: false,
            size: data.len() as u64,
            rolled_back: false,
        };
        sqlx::query("UPDATE mailbox.deliveries SET response = $2 WHERE idempotency_key = $1")
            .bind(&header.idempotency_key)
            .bind(response.encode_to_vec())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        metrics::inc(&metrics::DELIVERIES, 1);
        metrics::inc(&metrics::DELIVERED_ENTRIES, plan.len() as u64);
        metrics::inc(&metrics::DELIVERED_BYTES, data.len() as u64);
        Ok(response)
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
        let (header, data) = read_upload(&mut stream, max, |c: DeliverChunk| match c.part? {
            deliver_chunk::Part::Header(h) => Some(Ok(h)),
            deliver_chunk::Part::Data(d) => Some(Err(d)),
        })
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
            // The delivery transaction, as a span in the caller's trace and a latency sample.
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
