//! Storage primitives shared by the services: names, flags, blobs, UID allocation, entry
//! insertion and removal. Every function works inside the caller's transaction.

use bytes::Bytes;
use mailsuite_proto::{BodyPart, ChangeEvent, ChangeKind, Envelope, SpecialUse};
use mailsuite_runtime::ServiceError;
use prost::Message as _;
use sha2::Digest;
use sqlx::{PgConnection, Postgres, Row, Transaction};

use crate::mime;
use crate::notify;

pub type Tx<'a> = Transaction<'a, Postgres>;

pub const INBOX: &str = "INBOX";

/// Mailboxes every new account gets, with their SPECIAL-USE attribute (RFC 6154).
pub const DEFAULT_MAILBOXES: &[(&str, SpecialUse)] = &[
    (INBOX, SpecialUse::None),
    ("Drafts", SpecialUse::Drafts),
    ("Sent", SpecialUse::Sent),
    ("Trash", SpecialUse::Trash),
    ("Junk", SpecialUse::Junk),
    ("Archive", SpecialUse::Archive),
];

/// `local@domain`, lowercased and trimmed (angle brackets removed).
pub fn split_address(address: &str) -> Option<(String, String)> {
    let a = address
        .trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .to_ascii_lowercase();
    let (l, d) = a.rsplit_once('@')?;
    if l.is_empty() || d.is_empty() || d.contains(['<', '>', ' ', ',']) {
        return None;
    }
    Some((l.to_string(), d.to_string()))
}

pub fn normalize_address(address: &str) -> Result<String, ServiceError> {
    split_address(address)
        .map(|(l, d)| format!("{l}@{d}"))
        .ok_or_else(|| ServiceError::InvalidArgument(format!("not an address: {address:?}")))
}

/// Mailbox names: `/`-separated, no empty components; INBOX (any case) is "INBOX".
pub fn normalize_mailbox(name: &str) -> Result<String, ServiceError> {
    let bad = || ServiceError::InvalidArgument(format!("bad mailbox name {name:?}"));
    if name.is_empty() || name.len() > 1000 || name.chars().any(|c| c.is_control()) {
        return Err(bad());
    }
    let mut parts: Vec<&str> = name.split('/').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(bad());
    }
    if parts[0].eq_ignore_ascii_case(INBOX) {
        parts[0] = INBOX;
    }
    Ok(parts.join("/"))
}

/// System flags get their canonical spelling; keywords are kept; duplicates removed.
pub fn normalize_flags(flags: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for f in flags {
        let f = f.trim();
        if f.is_empty() || f.eq_ignore_ascii_case("\\recent") {
            continue;
        }
        let canon = match f.to_ascii_lowercase().as_str() {
            "\\seen" => "\\Seen".to_string(),
            "\\answered" => "\\Answered".to_string(),
            "\\flagged" => "\\Flagged".to_string(),
            "\\deleted" => "\\Deleted".to_string(),
            "\\draft" => "\\Draft".to_string(),
            _ => f.to_string(),
        };
        if !out.iter().any(|o| o.eq_ignore_ascii_case(&canon)) {
            out.push(canon);
        }
    }
    out
}

pub fn uidset_pairs(set: Option<&mailsuite_proto::UidSet>) -> (Vec<i64>, Vec<i64>) {
    let mut starts = Vec::new();
    let mut ends = Vec::new();
    if let Some(s) = set {
        for r in &s.ranges {
            starts.push(r.start.min(r.end) as i64);
            ends.push(r.start.max(r.end) as i64);
        }
    }
    (starts, ends)
}

/// SQL fragment matching `uid` against unnest($a::bigint[], $b::bigint[]).
///
/// The plain bounds (lowest start, highest end) come first: they are what the planner can use
/// as index conditions on `(mailbox_id, uid)`, so `FETCH 7` reads one row instead of scanning
/// the mailbox up to it and testing every row against the set.
pub fn uid_in_ranges(col: &str, a: usize, b: usize) -> String {
    format!(
        "{col} >= (SELECT min(s) FROM unnest(${a}::bigint[]) AS s)
         AND {col} <= (SELECT max(e) FROM unnest(${b}::bigint[]) AS e)
         AND EXISTS (SELECT 1 FROM unnest(${a}::bigint[], ${b}::bigint[]) AS r(s, e) WHERE {col} BETWEEN r.s AND r.e)"
    )
}

pub async fn create_mailbox(
    conn: &mut PgConnection,
    account_id: i64,
    name: &str,
    special_use: SpecialUse,
) -> Result<i64, ServiceError> {
    let id: Option<i64> = sqlx::query_scalar(
        "INSERT INTO mailbox.mailboxes (account_id, name, special_use, uidvalidity)
         VALUES ($1, $2, $3, nextval('mailbox.uidvalidity'))
         ON CONFLICT (account_id, name) DO NOTHING RETURNING id",
    )
    .bind(account_id)
    .bind(name)
    .bind(special_use as i16)
    .fetch_optional(&mut *conn)
    .await?;
    id.ok_or_else(|| ServiceError::AlreadyExists(format!("mailbox {name}")))
}

/// Subscriptions are names (migration 20261203020001): the mailbox need not exist.
pub async fn subscribe(
    conn: &mut PgConnection,
    account_id: i64,
    name: &str,
) -> Result<(), ServiceError> {
    sqlx::query(
        "INSERT INTO mailbox.subscriptions (account_id, name) VALUES ($1, $2)
         ON CONFLICT DO NOTHING",
    )
    .bind(account_id)
    .bind(name)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

pub fn hex_id(id: &[u8]) -> String {
    hex::encode(id)
}

const PROBE_ABOVE: usize = 256 * 1024;

/// What storing a blob needs, computed before the transaction (no locks held meanwhile): the
/// SHA-256 id and, unless the content is already stored, the parsed MIME metadata.
pub struct PreparedBlob {
    pub id: Vec<u8>,
    pub size: i64,
    /// None: the content was already stored when prepared (large messages are looked up
    /// before they are parsed); `insert_blob` then only adds references.
    pub meta: Option<BlobMeta>,
}

/// The MIME metadata of a blob, encoded for its row.
pub struct BlobMeta {
    pub envelope: Vec<u8>,
    pub body: Vec<u8>,
    pub headers: serde_json::Value,
    pub text: String,
    pub sent_date: Option<chrono::NaiveDate>,
}

/// Hash and parse `raw` for `insert_blob`. Run it before `BEGIN`: the parse is the slow part
/// of storing a message and must not hold row locks, a transaction or a pool connection.
pub async fn prepare_blob(pool: &sqlx::PgPool, raw: &Bytes) -> Result<PreparedBlob, ServiceError> {
    let id = sha2::Sha256::digest(raw).to_vec();
    // Most content is new: parsing a small message costs less than a round trip to look for
    // it first. Large ones are looked up before they are parsed.
    if raw.len() > PROBE_ABOVE {
        let known: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM mailbox.blobs WHERE id = $1)")
                .bind(&id)
                .fetch_one(pool)
                .await?;
        if known {
            return Ok(PreparedBlob {
                id,
                size: raw.len() as i64,
                meta: None,
            });
        }
    }
    Ok(PreparedBlob {
        id,
        size: raw.len() as i64,
        meta: Some(blob_meta(raw).await?),
    })
}

/// Parse `raw` (on its own big-stack thread) and encode the metadata columns.
pub async fn blob_meta(raw: &Bytes) -> Result<BlobMeta, ServiceError> {
    // On a big-stack parser thread (see mime::PARSE_STACK_BYTES and crate::parse_pool); the
    // thread gets a shared handle on the message, not a copy of it.
    let parsed = crate::parse_pool::parse(raw.clone())
        .await
        .map_err(|e| ServiceError::Internal(format!("parsing the message structure: {e}")))?;
    if mime::structure_depth(&parsed.body) >= mime::MAX_MIME_DEPTH {
        tracing::info!(
            max_depth = mime::MAX_MIME_DEPTH,
            "MIME nesting too deep: the deepest levels are stored as one opaque part"
        );
    }
    let headers = serde_json::to_value(
        parsed
            .headers
            .iter()
            .map(|(n, v)| [strip_nul(n), strip_nul(v)])
            .collect::<Vec<_>>(),
    )
    .unwrap_or_default();
    Ok(BlobMeta {
        envelope: parsed.envelope.encode_to_vec(),
        body: parsed.body.encode_to_vec(),
        headers,
        text: strip_nul(&parsed.text),
        sent_date: parsed.sent_date,
    })
}

/// Store a prepared blob once (by SHA-256) and add `refs` references to it.
pub async fn insert_blob(
    tx: &mut PgConnection,
    blob: &PreparedBlob,
    raw: &Bytes,
    refs: i64,
) -> Result<(), ServiceError> {
    let parsed_now;
    let meta = match &blob.meta {
        Some(m) => m,
        None => {
            let updated =
                sqlx::query("UPDATE mailbox.blobs SET refcount = refcount + $2 WHERE id = $1")
                    .bind(&blob.id)
                    .bind(refs)
                    .execute(&mut *tx)
                    .await?;
            if updated.rows_affected() == 1 {
                return Ok(());
            }
            // Its last reference went away since it was looked up (rare): parse it here.
            parsed_now = blob_meta(raw).await?;
            &parsed_now
        }
    };
    // A concurrent first delivery of the same content may insert it meanwhile: add to it.
    sqlx::query(
        "INSERT INTO mailbox.blobs (id, size, refcount, data, envelope, body, headers, body_text, sent_date)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
         ON CONFLICT (id) DO UPDATE SET refcount = mailbox.blobs.refcount + EXCLUDED.refcount",
    )
    .bind(&blob.id)
    .bind(blob.size)
    .bind(refs)
    .bind(&raw[..])
    .bind(&meta.envelope)
    .bind(&meta.body)
    .bind(&meta.headers)
    .bind(&meta.text)
    .bind(meta.sent_date)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// PostgreSQL text cannot hold NUL.
fn strip_nul(s: &str) -> String {
    if s.contains('\0') {
        s.replace('\0', " ")
    } else {
        s.to_string()
    }
}

/// Allocate `n` UIDs and one modseq in a mailbox (row lock until commit). Returns (first uid,
/// modseq, uidvalidity).
pub async fn alloc_uids(
    tx: &mut PgConnection,
    mailbox_id: i64,
    n: i64,
) -> Result<(i64, i64, i64), ServiceError> {
    let row = sqlx::query(
        "UPDATE mailbox.mailboxes SET uidnext = uidnext + $2, highestmodseq = highestmodseq + 1
         WHERE id = $1 RETURNING uidnext - $2, highestmodseq, uidvalidity",
    )
    .bind(mailbox_id)
    .bind(n)
    .fetch_optional(&mut *tx)
    .await?
    .ok_or_else(|| ServiceError::NotFound(format!("mailbox {mailbox_id}")))?;
    let first: i64 = row.get(0);
    if first + n > u32::MAX as i64 {
        return Err(ServiceError::Cannot("mailbox UID space exhausted".into()));
    }
    Ok((first, row.get(1), row.get(2)))
}

/// Bump a mailbox's modseq once (for flag changes and expunges).
pub async fn bump_modseq(tx: &mut PgConnection, mailbox_id: i64) -> Result<i64, ServiceError> {
    sqlx::query_scalar(
        "UPDATE mailbox.mailboxes SET highestmodseq = highestmodseq + 1 WHERE id = $1 RETURNING highestmodseq",
    )
    .bind(mailbox_id)
    .fetch_optional(&mut *tx)
    .await?
    .ok_or_else(|| ServiceError::NotFound(format!("mailbox {mailbox_id}")))
}

pub struct NewEntry<'a> {
    pub mailbox_id: i64,
    pub uid: i64,
    pub modseq: i64,
    pub flags: &'a [String],
    pub internal_date: chrono::DateTime<chrono::Utc>,
    pub date_offset: i32,
    pub size: i64,
    pub blob_id: &'a [u8],
    pub prefix: &'a [u8],
}

pub async fn insert_entry(tx: &mut PgConnection, e: &NewEntry<'_>) -> Result<(), ServiceError> {
    sqlx::query(
        "WITH m AS (
            INSERT INTO mailbox.messages (mailbox_id, uid, modseq, flags, internal_date, date_offset, size, blob_id, prefix)
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) RETURNING mailbox_id, modseq, uid)
         INSERT INTO mailbox.changelog (mailbox_id, modseq, kind, uid) SELECT mailbox_id, modseq, 1, uid FROM m",
    )
    .bind(e.mailbox_id)
    .bind(e.uid)
    .bind(e.modseq)
    .bind(e.flags)
    .bind(e.internal_date)
    .bind(e.date_offset)
    .bind(e.size)
    .bind(e.blob_id)
    .bind(e.prefix)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Lock the quota row of an account and check that `bytes`/`messages` more fit.
pub async fn check_quota(
    tx: &mut PgConnection,
    account_id: i64,
    bytes: i64,
    messages: i64,
) -> Result<(), ServiceError> {
    let row = sqlx::query(
        "SELECT quota_bytes, quota_messages, used_bytes, used_messages
         FROM mailbox.accounts WHERE id = $1 FOR UPDATE",
    )
    .bind(account_id)
    .fetch_optional(&mut *tx)
    .await?
    .ok_or_else(|| ServiceError::NotFound(format!("account {account_id}")))?;
    let (qb, qm, ub, um): (i64, i64, i64, i64) = (row.get(0), row.get(1), row.get(2), row.get(3));
    quota_verdict(qb, qm, ub, um, bytes, messages)
}

pub fn quota_verdict(
    qb: i64,
    qm: i64,
    ub: i64,
    um: i64,
    bytes: i64,
    messages: i64,
) -> Result<(), ServiceError> {
    if qb > 0 && ub + bytes > qb {
        return Err(ServiceError::OverQuota {
            message: format!("mailbox full: {ub} of {qb} bytes used"),
            // A message larger than the whole quota can never be delivered.
            permanent: bytes > qb,
        });
    }
    if qm > 0 && um + messages > qm {
        return Err(ServiceError::OverQuota {
            message: format!("mailbox full: {um} of {qm} messages"),
            permanent: messages > qm,
        });
    }
    Ok(())
}

pub async fn add_usage(
    tx: &mut PgConnection,
    account_id: i64,
    bytes: i64,
    messages: i64,
) -> Result<(), ServiceError> {
    sqlx::query(
        "UPDATE mailbox.accounts SET used_bytes = greatest(used_bytes + $2, 0),
                used_messages = greatest(used_messages + $3, 0) WHERE id = $1",
    )
    .bind(account_id)
    .bind(bytes)
    .bind(messages)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Remove entries (expunge, move source, mailbox deletion): blob references dropped (and
/// unreferenced blobs deleted), usage lowered, expunges logged and published. Returns the
/// removed UIDs ascending and the new modseq (0 when nothing was removed).
pub async fn remove_entries(
    tx: &mut Tx<'_>,
    account_id: i64,
    mailbox_id: i64,
    uids: &[i64],
    log: bool,
) -> Result<(Vec<u32>, i64), ServiceError> {
    if uids.is_empty() {
        return Ok((Vec::new(), 0));
    }
    let rows = sqlx::query(
        "DELETE FROM mailbox.messages WHERE mailbox_id = $1 AND uid = ANY($2)
         RETURNING uid, size, blob_id",
    )
    .bind(mailbox_id)
    .bind(uids)
    .fetch_all(&mut **tx)
    .await?;
    if rows.is_empty() {
        return Ok((Vec::new(), 0));
    }
    let mut removed: Vec<u32> = rows.iter().map(|r| r.get::<i64, _>(0) as u32).collect();
    crate::metrics::inc(&crate::metrics::EXPUNGED, removed.len() as u64);
    removed.sort_unstable();
    let bytes: i64 = rows.iter().map(|r| r.get::<i64, _>(1)).sum();
    let mut blobs: Vec<Vec<u8>> = rows.iter().map(|r| r.get::<Vec<u8>, _>(2)).collect();
    blobs.sort();
    // Lock order: the account row before blob rows, as in delivery.
    add_usage(tx, account_id, -bytes, -(rows.len() as i64)).await?;
    let mut counts: Vec<(Vec<u8>, i64)> = Vec::new();
    for b in blobs {
        match counts.last_mut() {
            Some((id, n)) if *id == b => *n += 1,
            _ => counts.push((b, 1)),
        }
    }
    for (id, n) in &counts {
        // The last reference takes the blob with it; DELETE re-checks refcount after taking
        // the row lock, so a concurrent new reference keeps it alive.
        let gone = sqlx::query("DELETE FROM mailbox.blobs WHERE id = $1 AND refcount <= $2")
            .bind(id)
            .bind(n)
            .execute(&mut **tx)
            .await?;
        if gone.rows_affected() == 0 {
            sqlx::query("UPDATE mailbox.blobs SET refcount = refcount - $2 WHERE id = $1")
                .bind(id)
                .bind(n)
                .execute(&mut **tx)
                .await?;
        }
    }
    let modseq = if log {
        let m = bump_modseq(tx, mailbox_id).await?;
        let as_i64: Vec<i64> = removed.iter().map(|&u| u as i64).collect();
        sqlx::query(
            "INSERT INTO mailbox.changelog (mailbox_id, modseq, kind, uid)
             SELECT $1, $2, 3, u FROM unnest($3::bigint[]) u",
        )
        .bind(mailbox_id)
        .bind(m)
        .bind(&as_i64)
        .execute(&mut **tx)
        .await?;
        notify::publish(
            tx,
            &notify::event(
                account_id,
                mailbox_id,
                ChangeKind::Expunge,
                removed.clone(),
                m as u64,
            ),
        )
        .await?;
        m
    } else {
        0
    };
    Ok((removed, modseq))
}

pub async fn publish(tx: &mut Tx<'_>, ev: &ChangeEvent) -> Result<(), ServiceError> {
    notify::publish(tx, ev).await.map_err(Into::into)
}

/// The stored structure, shifted by the length of the entry's prefix (Return-Path: and
/// Delivered-To: lines live in front of the shared blob and belong to the top header).
pub fn decode_structure(body: &[u8], prefix_len: u64) -> BodyPart {
    // Every stored structure is at most mime::MAX_MIME_DEPTH deep, well inside prost's decode
    // recursion limit: a failure here is corrupt data (or an old row from before the bound),
    // and is loud instead of silently describing the message as empty.
    let mut b = match BodyPart::decode(body) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "stored BODYSTRUCTURE does not decode");
            debug_assert!(false, "stored BODYSTRUCTURE does not decode: {e}");
            BodyPart::default()
        }
    };
    shift(&mut b, prefix_len, true);
    b
}

fn shift(p: &mut BodyPart, by: u64, root: bool) {
    if by == 0 {
        return;
    }
    if !root {
        p.header_start += by;
    }
    p.body_start += by;
    p.body_end += by;
    for c in &mut p.parts {
        shift(c, by, false);
    }
    if let Some(m) = &mut p.message {
        shift(m, by, false);
    }
}

pub fn decode_envelope(b: &[u8]) -> Envelope {
    Envelope::decode(b).unwrap_or_default()
}

/// Bytes [start, end) of an entry (prefix followed by the blob), reading only that range, as
/// at most two pieces: a slice of `prefix` and the range of the blob as read (not copied
/// again into one buffer with the prefix).
pub async fn read_range(
    conn: &mut PgConnection,
    blob_id: &[u8],
    prefix: &Bytes,
    start: u64,
    end: u64,
) -> Result<Vec<Bytes>, ServiceError> {
    let plen = prefix.len() as u64;
    let mut out = Vec::with_capacity(2);
    if start < plen {
        out.push(prefix.slice(start as usize..end.min(plen) as usize));
    }
    if end > plen {
        let bs = start.max(plen) - plen;
        let be = end - plen;
        if be > bs {
            let chunk: Option<Vec<u8>> = sqlx::query_scalar(
                "SELECT substring(data FROM $2::int FOR $3::int) FROM mailbox.blobs WHERE id = $1",
            )
            .bind(blob_id)
            .bind((bs + 1) as i64)
            .bind((be - bs) as i64)
            .fetch_optional(&mut *conn)
            .await?;
            out.push(Bytes::from(
                chunk.ok_or_else(|| ServiceError::Internal("blob missing".into()))?,
            ));
        }
    }
    Ok(out)
}

/// Resolve an account address to its id (for Alert and admin calls).
pub async fn account_id(conn: &mut PgConnection, address: &str) -> Result<i64, ServiceError> {
    let a = normalize_address(address)?;
    sqlx::query_scalar("SELECT id FROM mailbox.accounts WHERE address = $1")
        .bind(&a)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| ServiceError::NotFound(format!("account {a}")))
}
