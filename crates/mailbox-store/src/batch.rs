//! Group commit for Deliver: concurrent deliveries, prepared before any transaction (recipients
//! resolved, message hashed and parsed), queue here; a few committer tasks each take whatever
//! is queued and store it in ONE transaction with a fixed number of statements (arrays and
//! `unnest`), commit once, and only then answer every caller. PostgreSQL's commit flush is
//! then paid once per batch instead of once per message.
//!
//! Lock order inside a batch, as everywhere: idempotency keys (sorted), account rows in id
//! order, mailbox rows in id order, blob rows in id order.
//!
//! Everything a single delivery may fail on is decided in Rust from the locked rows before
//! anything is written (key already claimed, over quota, no INBOX, all_or_nothing), so one
//! such delivery is simply left out of the batch's statements and the others go on. A
//! statement that still fails (unexpected: a constraint, the UID space, a blob that vanished)
//! rolls the whole batch back and each of its deliveries is then stored alone, in its own
//! transaction, so the failure reaches only the delivery that causes it. This replaces a
//! SAVEPOINT per delivery, which would cost two round trips each on the common path.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use bytes::Bytes;
use mailsuite_proto::{ChangeKind, DeliverResponse, RecipientResult, RecipientStatus};
use mailsuite_runtime::{ServiceError, Shutdown};
use prost::Message as _;
use sqlx::{PgConnection, PgPool, Row};
use tokio::sync::{Mutex, mpsc, oneshot};

use crate::metrics;
use crate::notify;
use crate::store::{self, PreparedBlob};

/// One delivery, ready to be written: everything that needs no lock was done.
pub struct Prepared {
    pub key: String,
    pub data: Bytes,
    /// None when no recipient resolved to a local account.
    pub blob: Option<PreparedBlob>,
    pub results: Vec<RecipientResult>,
    /// Local account address → indexes of the recipients (in `results`) it serves.
    pub targets: BTreeMap<String, Vec<usize>>,
    /// The normalized mailbox name asked for (INBOX when it does not exist).
    pub mailbox: String,
    pub flags: Vec<String>,
    pub internal_date: chrono::DateTime<chrono::Utc>,
    pub add_delivery_headers: bool,
    pub return_path: String,
    pub all_or_nothing: bool,
    /// The caller's span: the batch's transaction span links to it (follows_from), so each
    /// Deliver's trace leads to the transaction that stored it.
    pub span: tracing::Span,
}

/// What a delivery came to once its batch committed.
pub enum Outcome {
    /// Stored (or, with all_or_nothing, rolled back) by this call.
    Done(DeliverResponse, u64),
    /// Another call holds (or held) the idempotency key: answer from its record.
    NotClaimed,
}

type Reply = oneshot::Sender<Result<Outcome, ServiceError>>;

struct Job {
    d: Prepared,
    reply: Reply,
}

/// Queue of prepared deliveries in front of the committer tasks.
#[derive(Clone)]
pub struct DeliveryBatcher {
    tx: mpsc::Sender<Job>,
    stats: BatchStats,
}

/// Counters of one store instance's group commit (the process-wide ones are in `metrics`).
#[derive(Clone, Debug, Default)]
pub struct BatchStats(Arc<StatsInner>);

#[derive(Debug, Default)]
struct StatsInner {
    batches: AtomicU64,
    batched: AtomicU64,
    largest: AtomicU64,
    /// Counted up after a job is in the queue and down when a committer takes it, so it
    /// may dip below the true length for a moment but never exceeds it.
    queued: AtomicI64,
}

impl BatchStats {
    /// Delivery transactions committed.
    pub fn batches(&self) -> u64 {
        self.0.batches.load(Ordering::Relaxed)
    }
    /// Deliver calls those transactions stored.
    pub fn batched(&self) -> u64 {
        self.0.batched.load(Ordering::Relaxed)
    }
    /// The most Deliver calls one transaction stored.
    pub fn largest(&self) -> u64 {
        self.0.largest.load(Ordering::Relaxed)
    }
    /// Deliver calls waiting in the queue for a committer now.
    pub fn queued(&self) -> u64 {
        self.0.queued.load(Ordering::Relaxed).max(0) as u64
    }
    fn committed(&self, n: usize) {
        self.0.batches.fetch_add(1, Ordering::Relaxed);
        self.0.batched.fetch_add(n as u64, Ordering::Relaxed);
        self.0.largest.fetch_max(n as u64, Ordering::Relaxed);
        metrics::inc(&metrics::DELIVERY_BATCHES, 1);
        metrics::inc(&metrics::DELIVERY_BATCHED, n as u64);
    }
}

struct Queue {
    rx: mpsc::Receiver<Job>,
    stats: BatchStats,
    /// A job taken from the queue that did not fit the previous batch's byte budget.
    carry: Option<Job>,
}

impl DeliveryBatcher {
    /// Start `committers` tasks taking at most `batch_max` deliveries (and, beyond the first,
    /// at most `batch_max_bytes` of message data) per transaction. They end when every
    /// handle is dropped or on forced shutdown.
    pub fn start(
        pool: PgPool,
        committers: usize,
        batch_max: usize,
        batch_max_bytes: u64,
        shutdown: &Shutdown,
    ) -> DeliveryBatcher {
        let committers = committers.max(1);
        let batch_max = batch_max.max(1);
        let (tx, rx) = mpsc::channel(batch_max * committers * 2);
        let stats = BatchStats::default();
        let queue = Arc::new(Mutex::new(Queue {
            rx,
            stats: stats.clone(),
            carry: None,
        }));
        for _ in 0..committers {
            let queue = queue.clone();
            let pool = pool.clone();
            let forced = shutdown.force_token();
            let stats = stats.clone();
            tokio::spawn(async move {
                loop {
                    let batch = tokio::select! {
                        b = next_batch(&queue, batch_max, batch_max_bytes) => b,
                        _ = forced.cancelled() => break,
                    };
                    let Some(batch) = batch else { break };
                    run(&pool, &stats, batch).await;
                }
            });
        }
        DeliveryBatcher { tx, stats }
    }

    pub fn stats(&self) -> BatchStats {
        self.stats.clone()
    }

    /// Queue `d` and wait for its batch to commit (or fail).
    pub async fn deliver(&self, d: Prepared) -> Result<Outcome, ServiceError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job { d, reply })
            .await
            .map_err(|_| ServiceError::Unavailable("the store is shutting down".into()))?;
        self.stats.0.queued.fetch_add(1, Ordering::Relaxed);
        rx.await
            .map_err(|_| ServiceError::Unavailable("the delivery was abandoned".into()))?
    }
}

/// Wait for one job, then take whatever else is queued, within the limits.
async fn next_batch(queue: &Mutex<Queue>, max: usize, max_bytes: u64) -> Option<Vec<Job>> {
    let mut q = queue.lock().await;
    let (first, carried) = match q.carry.take() {
        Some(j) => (j, true),
        None => (q.rx.recv().await?, false),
    };
    let mut bytes = first.d.data.len() as u64;
    let mut batch = vec![first];
    while batch.len() < max {
        let Ok(j) = q.rx.try_recv() else { break };
        bytes += j.d.data.len() as u64;
        if bytes > max_bytes {
            q.carry = Some(j);
            break;
        }
        batch.push(j);
    }
    // The carried job was counted out when it was first taken.
    let taken = batch.len() as i64 + i64::from(q.carry.is_some()) - i64::from(carried);
    q.stats.0.queued.fetch_sub(taken, Ordering::Relaxed);
    Some(batch)
}

/// Store one batch and answer its callers.
async fn run(pool: &PgPool, stats: &BatchStats, batch: Vec<Job>) {
    let n = batch.len();
    let (ds, replies): (Vec<Prepared>, Vec<Reply>) =
        batch.into_iter().map(|j| (j.d, j.reply)).unzip();
    match attempt(pool, &ds).await {
        Ok(outcomes) => {
            stats.committed(n);
            for (reply, o) in replies.into_iter().zip(outcomes) {
                let _ = reply.send(o);
            }
        }
        // The commit's outcome is unknown: every caller gets the error and retries under
        // its idempotency key, which is safe whichever way it went.
        Err(Failed::Commit(e)) => {
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
        // Alone, or the database is unreachable: storing one by one would not help.
        Err(Failed::Statement(e)) if n == 1 || matches!(e, ServiceError::Unavailable(_)) => {
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
        Err(Failed::Statement(e)) => {
            tracing::debug!(
                deliveries = n,
                "delivery batch failed, storing one by one: {e}"
            );
            for (d, reply) in ds.iter().zip(replies) {
                let one = match attempt(pool, std::slice::from_ref(d)).await {
                    Ok(mut o) => {
                        stats.committed(1);
                        o.pop()
                            .unwrap_or_else(|| Err(ServiceError::Internal("no outcome".into())))
                    }
                    Err(Failed::Commit(e) | Failed::Statement(e)) => Err(e),
                };
                let _ = reply.send(one);
            }
        }
    }
}

enum Failed {
    /// Before COMMIT: the transaction was rolled back, nothing of the batch is stored.
    Statement(ServiceError),
    /// COMMIT itself failed: stored or not, unknown.
    Commit(ServiceError),
}

async fn attempt(
    pool: &PgPool,
    ds: &[Prepared],
) -> Result<Vec<Result<Outcome, ServiceError>>, Failed> {
    // The transaction belongs to the trace of the batch's first delivery (a lone delivery's
    // trace thus shows its transaction); the others link to it.
    let parent = ds.first().and_then(|d| d.span.id());
    let span = tracing::info_span!(
        parent: parent,
        "db.transaction",
        otel.name = "deliver batch",
        otel.kind = "client",
        db.system.name = "postgresql",
        db.operation.name = "deliver",
        mailsuite.deliveries = ds.len(),
    );
    for d in ds.iter().skip(1) {
        span.follows_from(d.span.id());
    }
    let timer = mailsuite_runtime::metrics::db_timer("deliver_batch");
    let r = tracing::Instrument::instrument(attempt_inner(pool, ds), span).await;
    drop(timer);
    r
}

/// A batch with more message data than this gives its connection's buffers back afterwards.
const SHRINK_ABOVE: usize = 1024 * 1024;

async fn attempt_inner(
    pool: &PgPool,
    ds: &[Prepared],
) -> Result<Vec<Result<Outcome, ServiceError>>, Failed> {
    let mut tx = pool
        .begin()
        .await
        .map_err(|e| Failed::Statement(e.into()))?;
    let outcomes = match write(&mut tx, ds).await {
        Ok(o) => o,
        Err(e) => {
            let _ = tx.rollback().await;
            return Err(Failed::Statement(e));
        }
    };
    // The connection's write buffer grew to hold the batch's blobs; a pooled connection would
    // keep that capacity for good (one per connection, the size of the largest batch ever).
    if ds.iter().map(|d| d.data.len()).sum::<usize>() > SHRINK_ABOVE {
        sqlx::Connection::shrink_buffers(&mut *tx);
    }
    tx.commit().await.map_err(|e| Failed::Commit(e.into()))?;
    Ok(outcomes)
}

/// One entry to insert.
struct Entry {
    job: usize,
    account: i64,
    mailbox: i64,
    prefix: Vec<u8>,
    size: i64,
}

/// The batch's statements. A per-delivery failure becomes that delivery's outcome; an Err
/// fails the batch.
async fn write(
    tx: &mut PgConnection,
    ds: &[Prepared],
) -> Result<Vec<Result<Outcome, ServiceError>>, ServiceError> {
    let mut out: Vec<Option<Result<Outcome, ServiceError>>> = (0..ds.len()).map(|_| None).collect();

    // 1+2. ONE statement (a round trip each cost more than its work): claim the idempotency
    // keys, sorted (concurrent batches wait on each other's keys in the same order; a key
    // twice in one batch: the first call claims it); then lock every target account of the
    // batch in id order and find the mailbox of each (account, asked name) it is asked for
    // (the one asked for, else INBOX; NULL when the account has no INBOX); then lock those
    // mailboxes in id order and read their UID and modseq counters. Each step's input is an
    // InitPlan over the one before, so the locks are taken in the documented order. Accounts
    // of deliveries whose key turns out taken are locked too: rare, and harmless.
    let mut keys: Vec<&str> = ds.iter().map(|d| d.key.as_str()).collect();
    keys.sort_unstable();
    keys.dedup();
    let mut pairs: Vec<(&str, &str)> = ds
        .iter()
        .flat_map(|d| {
            d.targets
                .keys()
                .map(move |a| (a.as_str(), d.mailbox.as_str()))
        })
        .collect();
    pairs.sort_unstable();
    pairs.dedup();
    let mut addrs: Vec<&str> = pairs.iter().map(|p| p.0).collect();
    addrs.dedup();
    let wanted_by: Vec<&str> = pairs.iter().map(|p| p.0).collect();
    let wants: Vec<&str> = pairs.iter().map(|p| p.1).collect();
    let row = sqlx::query(
        "WITH k AS (
            INSERT INTO mailbox.deliveries (idempotency_key)
            SELECT k FROM unnest($1::text[]) WITH ORDINALITY AS t(k, i) ORDER BY i
            ON CONFLICT DO NOTHING RETURNING idempotency_key),
         kc AS MATERIALIZED (SELECT coalesce(array_agg(idempotency_key), '{}') AS keys FROM k),
         a AS MATERIALIZED (
            SELECT id, address, quota_bytes, quota_messages, used_bytes, used_messages
              FROM mailbox.accounts
             WHERE address = ANY($2) AND enabled AND (SELECT cardinality(keys) >= 0 FROM kc)
             ORDER BY id FOR UPDATE),
         w AS MATERIALIZED (
            SELECT a.*, w.want, coalesce(m.id, i.id) AS mbox
              FROM a
              JOIN unnest($3::text[], $4::text[]) AS w(address, want) ON w.address = a.address
              LEFT JOIN mailbox.mailboxes i ON i.account_id = a.id AND i.name = 'INBOX'
              LEFT JOIN mailbox.mailboxes m ON m.account_id = a.id AND m.name = w.want),
         l AS MATERIALIZED (
            SELECT id, uidnext, highestmodseq FROM mailbox.mailboxes
             WHERE id = ANY (ARRAY(SELECT mbox FROM w WHERE mbox IS NOT NULL))
             ORDER BY id FOR UPDATE)
         SELECT (SELECT keys FROM kc),
                (SELECT array_agg(id) FROM w), (SELECT array_agg(address) FROM w),
                (SELECT array_agg(quota_bytes) FROM w), (SELECT array_agg(quota_messages) FROM w),
                (SELECT array_agg(used_bytes) FROM w), (SELECT array_agg(used_messages) FROM w),
                (SELECT array_agg(want) FROM w), (SELECT array_agg(mbox) FROM w),
                (SELECT array_agg(id) FROM l), (SELECT array_agg(uidnext) FROM l),
                (SELECT array_agg(highestmodseq) FROM l)",
    )
    .bind(&keys)
    .bind(&addrs)
    .bind(&wanted_by)
    .bind(&wants)
    .fetch_one(&mut *tx)
    .await?;
    let claimed: Vec<String> = row.get(0);
    let mut claimed: HashMap<String, ()> = claimed.into_iter().map(|k| (k, ())).collect();
    let mut live = Vec::new();
    for (j, d) in ds.iter().enumerate() {
        if claimed.remove(&d.key).is_some() {
            live.push(j);
        } else {
            out[j] = Some(Ok(Outcome::NotClaimed));
        }
    }
    let column = |i: usize| -> Vec<i64> { row.get::<Option<Vec<i64>>, _>(i).unwrap_or_default() };
    let (ids, quota_bytes, quota_messages, used_bytes, used_messages) =
        (column(1), column(3), column(4), column(5), column(6));
    let addresses: Vec<String> = row.get::<Option<Vec<String>>, _>(2).unwrap_or_default();
    let asked: Vec<String> = row.get::<Option<Vec<String>>, _>(7).unwrap_or_default();
    let mboxes: Vec<Option<i64>> = row
        .get::<Option<Vec<Option<i64>>>, _>(8)
        .unwrap_or_default();
    let mut accounts: HashMap<String, Account> = HashMap::new();
    let mut boxes: HashMap<(i64, String), i64> = HashMap::new();
    for (i, (address, want)) in addresses.into_iter().zip(asked).enumerate() {
        let id = ids[i];
        if let Some(mailbox) = mboxes[i] {
            boxes.insert((id, want), mailbox);
        }
        accounts.entry(address).or_insert_with(|| Account {
            id,
            quota_bytes: quota_bytes[i],
            quota_messages: quota_messages[i],
            used_bytes: used_bytes[i],
            used_messages: used_messages[i],
        });
    }
    let counters: HashMap<i64, (i64, i64)> = column(9)
        .into_iter()
        .zip(column(10).into_iter().zip(column(11)))
        .collect();

    // 3. Decide each delivery in Rust, in queue order, against the running usage.
    let mut entries: Vec<Entry> = Vec::new();
    let mut responses: Vec<(usize, DeliverResponse)> = Vec::new();
    let mut release: Vec<&str> = Vec::new();
    for &j in &live {
        let d = &ds[j];
        match decide(d, &mut accounts, &boxes, j, &mut entries) {
            Ok(resp) if resp.rolled_back => {
                release.push(&d.key);
                out[j] = Some(Ok(Outcome::Done(resp, 0)));
            }
            Ok(resp) => responses.push((j, resp)),
            Err(e) => {
                release.push(&d.key);
                out[j] = Some(Err(e));
            }
        }
    }

    // 4. UIDs and modseqs from the locked counters: each entry gets its own, consecutive per
    // mailbox; the counters are written back in step 6.
    let (uids, modseqs, counters) = allocate_uids(&counters, &entries)?;

    // 5. Blobs, once per content, sorted by id: new ones inserted (or referenced when a
    // concurrent delivery inserted them meanwhile), known ones referenced.
    let mut blobs: BTreeMap<&[u8], (usize, i64)> = BTreeMap::new();
    for e in &entries {
        let b = ds[e.job]
            .blob
            .as_ref()
            .ok_or_else(|| ServiceError::Internal("a delivery with entries has no blob".into()))?;
        let slot = blobs.entry(b.id.as_slice()).or_insert((e.job, 0));
        slot.1 += 1;
        if b.meta.is_some() && ds[slot.0].blob.as_ref().is_some_and(|x| x.meta.is_none()) {
            slot.0 = e.job;
        }
    }
    let blobs = BlobRows::of(ds, &blobs);

    // The stored deliveries' responses, kept for retries under the same key.
    for (j, r) in &mut responses {
        r.blob_id = ds[*j].blob.as_ref().map_or(String::new(), |b| {
            if r.results.iter().any(|x| !x.delivered_to.is_empty()) {
                store::hex_id(&b.id)
            } else {
                String::new()
            }
        });
    }

    // 6. Everything else in ONE statement (a round trip each cost more than its work): blobs,
    // entries and their change log rows, usage (accounts already locked), one change event
    // per entry as a single delivery publishes it, the responses of the stored deliveries and
    // the release of the keys of those that stored nothing. The sub-statements touch disjoint
    // rows; the entries' foreign keys are checked at the end of the statement, when the new
    // blobs are there.
    if !entries.is_empty() || !responses.is_empty() || !release.is_empty() {
        let mb: Vec<i64> = entries.iter().map(|e| e.mailbox).collect();
        let flags: Vec<String> = entries
            .iter()
            .map(|e| serde_json::to_string(&ds[e.job].flags).unwrap_or_else(|_| "[]".into()))
            .collect();
        let dates: Vec<chrono::DateTime<chrono::Utc>> =
            entries.iter().map(|e| ds[e.job].internal_date).collect();
        let sizes: Vec<i64> = entries.iter().map(|e| e.size).collect();
        let blob_ids: Vec<&[u8]> = entries
            .iter()
            .map(|e| ds[e.job].blob.as_ref().map_or(&[][..], |b| b.id.as_slice()))
            .collect();
        let prefixes: Vec<&[u8]> = entries.iter().map(|e| e.prefix.as_slice()).collect();

        let mut usage: BTreeMap<i64, (i64, i64)> = BTreeMap::new();
        for e in &entries {
            let u = usage.entry(e.account).or_default();
            u.0 += e.size;
            u.1 += 1;
        }
        let usage_ids: Vec<i64> = usage.keys().copied().collect();
        let usage_bytes: Vec<i64> = usage.values().map(|u| u.0).collect();
        let usage_msgs: Vec<i64> = usage.values().map(|u| u.1).collect();

        let events: Vec<String> = entries
            .iter()
            .zip(uids.iter().zip(&modseqs))
            .map(|(e, (&uid, &modseq))| {
                notify::payload(&notify::event(
                    e.account,
                    e.mailbox,
                    ChangeKind::New,
                    vec![uid as u32],
                    modseq as u64,
                ))
            })
            .collect();

        let response_keys: Vec<&str> = responses.iter().map(|(j, _)| ds[*j].key.as_str()).collect();
        let response_bytes: Vec<Vec<u8>> =
            responses.iter().map(|(_, r)| r.encode_to_vec()).collect();

        let known_updated: i64 = sqlx::query_scalar(
            "WITH nb AS (
                INSERT INTO mailbox.blobs (id, size, refcount, data, envelope, body, headers, body_text, sent_date)
                SELECT id, sz, n, data, env, body, h::jsonb, txt, sd
                  FROM unnest($1::bytea[], $2::bigint[], $3::bigint[], $4::bytea[], $5::bytea[], $6::bytea[],
                              $7::text[], $8::text[], $9::date[])
                       WITH ORDINALITY AS t(id, sz, n, data, env, body, h, txt, sd, i)
                 ORDER BY i
                ON CONFLICT (id) DO UPDATE SET refcount = mailbox.blobs.refcount + EXCLUDED.refcount
                RETURNING 1),
             kb AS (
                UPDATE mailbox.blobs b SET refcount = b.refcount + c.n
                  FROM (SELECT id, n FROM unnest($10::bytea[], $11::bigint[]) AS u(id, n) ORDER BY id) c
                 WHERE b.id = c.id
                RETURNING 1),
             m AS (
                INSERT INTO mailbox.messages (mailbox_id, uid, modseq, flags, internal_date, date_offset, size, blob_id, prefix)
                SELECT mb, uid, modseq, ARRAY(SELECT jsonb_array_elements_text(f::jsonb)), d, 0, sz, b, p
                  FROM unnest($12::bigint[], $13::bigint[], $14::bigint[], $15::text[], $16::timestamptz[],
                              $17::bigint[], $18::bytea[], $19::bytea[]) AS t(mb, uid, modseq, f, d, sz, b, p)
                RETURNING mailbox_id, modseq, uid),
             cl AS (
                INSERT INTO mailbox.changelog (mailbox_id, modseq, kind, uid)
                SELECT mailbox_id, modseq, 1, uid FROM m),
             us AS (
                UPDATE mailbox.accounts a SET used_bytes = greatest(a.used_bytes + c.b, 0),
                       used_messages = greatest(a.used_messages + c.n, 0)
                  FROM unnest($20::bigint[], $21::bigint[], $22::bigint[]) AS c(id, b, n)
                 WHERE a.id = c.id),
             rs AS (
                UPDATE mailbox.deliveries d SET response = c.r
                  FROM unnest($23::text[], $24::bytea[]) AS c(k, r) WHERE d.idempotency_key = c.k),
             rl AS (
                DELETE FROM mailbox.deliveries WHERE idempotency_key = ANY($25::text[])),
             ev AS (
                SELECT pg_notify($26, p) FROM unnest($27::text[]) WITH ORDINALITY AS t(p, i) ORDER BY i),
             mu AS (
                UPDATE mailbox.mailboxes mb SET uidnext = c.u, highestmodseq = c.h
                  FROM unnest($28::bigint[], $29::bigint[], $30::bigint[]) AS c(id, u, h)
                 WHERE mb.id = c.id)
             SELECT (SELECT count(*) FROM kb) + 0 * (SELECT count(*) FROM ev)",
        )
        .bind(&blobs.new_ids)
        .bind(&blobs.sizes)
        .bind(&blobs.new_refs)
        .bind(&blobs.datas)
        .bind(&blobs.envs)
        .bind(&blobs.bodies)
        .bind(&blobs.headers)
        .bind(&blobs.texts)
        .bind(&blobs.dates)
        .bind(&blobs.known_ids)
        .bind(&blobs.known_refs)
        .bind(&mb)
        .bind(&uids)
        .bind(&modseqs)
        .bind(&flags)
        .bind(&dates)
        .bind(&sizes)
        .bind(&blob_ids)
        .bind(&prefixes)
        .bind(&usage_ids)
        .bind(&usage_bytes)
        .bind(&usage_msgs)
        .bind(&response_keys)
        .bind(&response_bytes)
        .bind(&release)
        .bind(notify::CHANNEL)
        .bind(&events)
        .bind(&counters.0)
        .bind(&counters.1)
        .bind(&counters.2)
        .fetch_one(&mut *tx)
        .await?;
        if known_updated != blobs.known_ids.len() as i64 {
            // Its last reference went away since it was looked up: the caller's retry
            // prepares (parses) it again.
            return Err(ServiceError::Conflict(
                "a stored message vanished meanwhile".into(),
            ));
        }
    }
    let mut entries_of: HashMap<usize, u64> = HashMap::new();
    for e in &entries {
        *entries_of.entry(e.job).or_default() += 1;
    }
    for (j, r) in responses {
        out[j] = Some(Ok(Outcome::Done(
            r,
            entries_of.get(&j).copied().unwrap_or(0),
        )));
    }
    Ok(out
        .into_iter()
        .map(|o| o.unwrap_or_else(|| Err(ServiceError::Internal("no outcome".into()))))
        .collect())
}

/// Decide one delivery against the locked accounts: its response, and its entries appended
/// to `entries` (none when it fails or rolls back). Usage of the accepted accounts is
/// counted in `accounts` so later deliveries of the batch see it.
fn decide(
    d: &Prepared,
    accounts: &mut HashMap<String, Account>,
    boxes: &HashMap<(i64, String), i64>,
    job: usize,
    entries: &mut Vec<Entry>,
) -> Result<DeliverResponse, ServiceError> {
    let mut results = d.results.clone();
    let mut accepted: Vec<(&str, i64, i64, Vec<u8>)> = Vec::new();
    let mut over: Vec<(&str, bool)> = Vec::new();
    let data_len = d.data.len();
    // Targets by account id, the order the single-delivery path used.
    let mut found: Vec<(i64, &str)> = d
        .targets
        .keys()
        .filter_map(|a| accounts.get(a).map(|acc| (acc.id, a.as_str())))
        .collect();
    found.sort_unstable();
    for (id, address) in found {
        let prefix = if d.add_delivery_headers {
            trace_prefix(&d.return_path, address)
        } else {
            Vec::new()
        };
        let size = (data_len + prefix.len()) as i64;
        let acc = &accounts[address];
        match acc.verdict(size) {
            Ok(()) => {
                let mb = boxes
                    .get(&(id, d.mailbox.clone()))
                    .copied()
                    .ok_or_else(|| ServiceError::Internal(format!("{address} has no INBOX")))?;
                accepted.push((address, id, mb, prefix));
            }
            Err(ServiceError::OverQuota { permanent, .. }) => over.push((address, permanent)),
            Err(e) => return Err(e),
        }
    }
    for (address, _) in &over {
        for &i in &d.targets[*address] {
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
    for (address, ..) in &accepted {
        for &i in &d.targets[*address] {
            results[i].delivered_to.push(address.to_string());
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
    if d.all_or_nothing
        && results
            .iter()
            .any(|r| r.status != RecipientStatus::Delivered as i32 || !r.remote_targets.is_empty())
    {
        // Nothing is written and the key is released, so the caller may hand the message
        // elsewhere (or retry) under the same key.
        return Ok(DeliverResponse {
            results,
            blob_id: String::new(),
            duplicate: false,
            size: data_len as u64,
            rolled_back: true,
        });
    }
    // Entries by mailbox id, as the single-delivery path allocated them.
    accepted.sort_by_key(|a| a.2);
    for (address, id, mb, prefix) in accepted {
        let size = (data_len + prefix.len()) as i64;
        if let Some(acc) = accounts.get_mut(address) {
            acc.add(size);
        }
        entries.push(Entry {
            job,
            account: id,
            mailbox: mb,
            prefix,
            size,
        });
    }
    Ok(DeliverResponse {
        results,
        blob_id: String::new(),
        duplicate: false,
        size: data_len as u64,
        rolled_back: false,
    })
}

/// Step 4: the UIDs and modseqs of `entries`, in their order, from the locked mailboxes'
/// counters (id → (uidnext, highestmodseq)); and each used mailbox's new counters, as
/// (ids, uidnexts, highestmodseqs).
#[allow(clippy::type_complexity)]
fn allocate_uids(
    counters: &HashMap<i64, (i64, i64)>,
    entries: &[Entry],
) -> Result<(Vec<i64>, Vec<i64>, (Vec<i64>, Vec<i64>, Vec<i64>)), ServiceError> {
    let mut per_box: BTreeMap<i64, i64> = BTreeMap::new();
    for e in entries {
        *per_box.entry(e.mailbox).or_default() += 1;
    }
    let mut next: HashMap<i64, (i64, i64)> = HashMap::new();
    let mut updated = (Vec::new(), Vec::new(), Vec::new());
    for (&id, &n) in &per_box {
        let &(uidnext, modseq) = counters
            .get(&id)
            .ok_or_else(|| ServiceError::NotFound(format!("mailbox {id}")))?;
        if uidnext + n > u32::MAX as i64 {
            return Err(ServiceError::Cannot("mailbox UID space exhausted".into()));
        }
        next.insert(id, (uidnext, modseq + 1));
        updated.0.push(id);
        updated.1.push(uidnext + n);
        updated.2.push(modseq + n);
    }
    let mut uids = Vec::with_capacity(entries.len());
    let mut modseqs = Vec::with_capacity(entries.len());
    for e in entries {
        let n = next
            .get_mut(&e.mailbox)
            .ok_or_else(|| ServiceError::NotFound(format!("mailbox {}", e.mailbox)))?;
        uids.push(n.0);
        modseqs.push(n.1);
        n.0 += 1;
        n.1 += 1;
    }
    Ok((uids, modseqs, updated))
}

/// The batch's blobs as statement parameters: new contents (with their parsed metadata) to
/// insert, known ones to reference.
#[derive(Default)]
struct BlobRows<'a> {
    new_ids: Vec<&'a [u8]>,
    new_refs: Vec<i64>,
    sizes: Vec<i64>,
    datas: Vec<&'a [u8]>,
    envs: Vec<&'a [u8]>,
    bodies: Vec<&'a [u8]>,
    headers: Vec<String>,
    texts: Vec<&'a str>,
    dates: Vec<Option<chrono::NaiveDate>>,
    known_ids: Vec<&'a [u8]>,
    known_refs: Vec<i64>,
}

impl<'a> BlobRows<'a> {
    fn of(ds: &'a [Prepared], blobs: &BTreeMap<&'a [u8], (usize, i64)>) -> BlobRows<'a> {
        let mut r = BlobRows::default();
        for (id, (job, refs)) in blobs {
            let d = &ds[*job];
            match d
                .blob
                .as_ref()
                .and_then(|b| b.meta.as_ref().map(|m| (b, m)))
            {
                Some((b, m)) => {
                    r.new_ids.push(id);
                    r.new_refs.push(*refs);
                    r.sizes.push(b.size);
                    r.datas.push(&d.data[..]);
                    r.envs.push(&m.envelope);
                    r.bodies.push(&m.body);
                    r.headers.push(m.headers.to_string());
                    r.texts.push(&m.text);
                    r.dates.push(m.sent_date);
                }
                None => {
                    r.known_ids.push(id);
                    r.known_refs.push(*refs);
                }
            }
        }
        r
    }
}

/// A locked account row, with the usage of the batch's deliveries decided so far.
struct Account {
    id: i64,
    quota_bytes: i64,
    quota_messages: i64,
    used_bytes: i64,
    used_messages: i64,
}

impl Account {
    fn verdict(&self, bytes: i64) -> Result<(), ServiceError> {
        store::quota_verdict(
            self.quota_bytes,
            self.quota_messages,
            self.used_bytes,
            self.used_messages,
            bytes,
            1,
        )
    }

    fn add(&mut self, bytes: i64) {
        self.used_bytes += bytes;
        self.used_messages += 1;
    }
}

/// `Return-Path:` and `Delivered-To:` lines for one recipient (RFC 5321 §4.4).
pub fn trace_prefix(return_path: &str, delivered_to: &str) -> Vec<u8> {
    let clean = |s: &str| s.replace(['\r', '\n', '<', '>'], "");
    format!(
        "Return-Path: <{}>\r\nDelivered-To: {}\r\n",
        clean(return_path),
        clean(delivered_to)
    )
    .into_bytes()
}
