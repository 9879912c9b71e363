//! Mailbox: everything IMAP and POP3 sessions do to stored mail.

use std::collections::HashSet;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use mailsuite_proto::mailbox_server::Mailbox;
use mailsuite_proto::*;
use mailsuite_runtime::ServiceError;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};
use tokio::sync::broadcast::error::RecvError;
use tonic::{Request, Response, Status, Streaming};

use crate::Ctx;
use crate::body::{self, CHUNK, Stored};
use crate::delivery::{internal_date, read_upload};
use crate::metrics;
use crate::notify;
use crate::search::{self, Arg};
use crate::store::{self, INBOX, NewEntry, normalize_mailbox};

pub struct MailboxSvc(pub Ctx);

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn st(e: impl Into<ServiceError>) -> Status {
    e.into().into()
}

/// Rows fetched per round trip when streaming a large UID set.
const PAGE: i64 = 500;

/// Messages per FetchBody query. Blobs up to [`body::INLINE`] come with the row, so a page
/// holds at most `BODY_PAGE × INLINE` bytes of content.
const BODY_PAGE: i64 = 50;

/// The ownership condition of the first pages: `$n` is the account that must own mailbox $1.
fn owned_by(n: usize) -> String {
    format!("EXISTS (SELECT 1 FROM mailbox.mailboxes mb WHERE mb.id = $1 AND mb.account_id = ${n})")
}

/// The rows of one Fetch page: $1 mailbox, $2/$3 the UID ranges, $4 the last UID sent, $5/$6
/// whether to read the envelope/structure, $7 CHANGEDSINCE, $8 the owning account.
pub fn fetch_sql() -> String {
    format!(
        "SELECT m.uid, m.modseq, m.flags, m.recent, m.internal_date, m.date_offset, m.size,
                m.blob_id, length(m.prefix) AS plen,
                CASE WHEN $5 THEN b.envelope END AS envelope,
                CASE WHEN $6 THEN b.body END AS body
           FROM mailbox.messages m JOIN mailbox.blobs b ON b.id = m.blob_id
          WHERE m.mailbox_id = $1 AND m.uid > $4 AND m.modseq > $7 AND {} AND {}
          ORDER BY m.uid LIMIT {PAGE}",
        store::uid_in_ranges("m.uid", 2, 3),
        owned_by(8)
    )
}

/// The rows of one FetchBody page: $1 mailbox, $2/$3 the UID ranges, $4 the last UID sent,
/// $5 the largest blob read with the row (larger ones are read by range, per section), $6 the
/// owning account.
pub fn fetch_body_sql() -> String {
    format!(
        "SELECT m.uid, m.size, m.blob_id, m.prefix, b.body,
                CASE WHEN b.size <= $5 THEN b.data END AS data
           FROM mailbox.messages m JOIN mailbox.blobs b ON b.id = m.blob_id
          WHERE m.mailbox_id = $1 AND m.uid > $4 AND {} AND {}
          ORDER BY m.uid LIMIT {BODY_PAGE}",
        store::uid_in_ranges("m.uid", 2, 3),
        owned_by(6)
    )
}

const INFO_SELECT: &str =
    "SELECT mb.id, mb.name, mb.special_use, mb.uidvalidity, mb.uidnext, mb.highestmodseq,
        EXISTS (SELECT 1 FROM mailbox.subscriptions s WHERE s.account_id = mb.account_id
                 AND s.name = mb.name) AS subscribed,
        EXISTS (SELECT 1 FROM mailbox.mailboxes c WHERE c.account_id = mb.account_id
                 AND left(c.name, length(mb.name) + 1) = mb.name || '/') AS has_children";

const STATUS_COLUMNS: &str = ", s.messages, s.unseen, s.recent, s.size, s.deleted
   FROM mailbox.mailboxes mb, LATERAL (
     SELECT count(*) AS messages,
            count(*) FILTER (WHERE NOT ('\\Seen' = ANY(flags))) AS unseen,
            count(*) FILTER (WHERE recent) AS recent,
            coalesce(sum(size), 0)::bigint AS size,
            count(*) FILTER (WHERE '\\Deleted' = ANY(flags)) AS deleted
       FROM mailbox.messages WHERE mailbox_id = mb.id) s";

fn info_from(r: &PgRow, with_status: bool) -> MailboxInfo {
    let mut i = MailboxInfo {
        id: r.get("id"),
        name: r.get("name"),
        special_use: r.get::<i16, _>("special_use") as i32,
        subscribed: r.get("subscribed"),
        has_children: r.get("has_children"),
        uidvalidity: r.get::<i64, _>("uidvalidity") as u32,
        uidnext: r.get::<i64, _>("uidnext") as u32,
        highestmodseq: r.get::<i64, _>("highestmodseq") as u64,
        ..Default::default()
    };
    if with_status {
        i.messages = r.get::<i64, _>("messages") as u32;
        i.unseen = r.get::<i64, _>("unseen") as u32;
        i.recent = r.get::<i64, _>("recent") as u32;
        i.size = r.get::<i64, _>("size") as u64;
        i.deleted = r.get::<i64, _>("deleted") as u32;
    }
    i
}

async fn info_by_name(
    conn: &mut PgConnection,
    account_id: i64,
    name: &str,
) -> Result<MailboxInfo, ServiceError> {
    let name = normalize_mailbox(name)?;
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "{INFO_SELECT}{STATUS_COLUMNS} WHERE mb.account_id = $1 AND mb.name = $2"
    )))
    .bind(account_id)
    .bind(&name)
    .fetch_optional(&mut *conn)
    .await?
    .ok_or_else(|| ServiceError::NotFound(format!("mailbox {name}")))?;
    Ok(info_from(&row, true))
}

/// Changes in one statement (one snapshot, one round trip): the function of migration
/// 20261128010003 ($1 mailbox, $2 owning account, $3 since), which keeps one generic plan. The
/// first row (`head`) holds the mailbox's state (a = highestmodseq, b = uidnext, n = entries
/// as kept on the mailbox row, log_floor, the expunged UIDs); the others are the entries
/// changed since (a = uid, b = modseq, flags, recent), by UID. No head row: not this
/// account's mailbox.
pub const CHANGES_SQL: &str = "SELECT * FROM mailbox.changes($1, $2, $3)";

/// The mailbox must belong to the account; returns its name.
async fn owned(
    conn: &mut PgConnection,
    account_id: i64,
    mailbox_id: i64,
) -> Result<String, ServiceError> {
    sqlx::query_scalar("SELECT name FROM mailbox.mailboxes WHERE id = $1 AND account_id = $2")
        .bind(mailbox_id)
        .bind(account_id)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or_else(|| ServiceError::NotFound(format!("mailbox {mailbox_id}")))
}

fn flags_of(r: &PgRow) -> Vec<String> {
    let mut f: Vec<String> = r.get("flags");
    if r.try_get::<bool, _>("recent").unwrap_or(false) {
        f.push("\\Recent".into());
    }
    f
}

fn apply_flags(mode: StoreMode, current: &[String], given: &[String]) -> Vec<String> {
    match mode {
        StoreMode::Replace => given.to_vec(),
        StoreMode::Add => {
            let mut v = current.to_vec();
            for g in given {
                if !v.iter().any(|c| c.eq_ignore_ascii_case(g)) {
                    v.push(g.clone());
                }
            }
            v
        }
        StoreMode::Remove => current
            .iter()
            .filter(|c| !given.iter().any(|g| g.eq_ignore_ascii_case(c)))
            .cloned()
            .collect(),
    }
}

fn same_flags(a: &[String], b: &[String]) -> bool {
    a.len() == b.len()
        && a.iter()
            .all(|x| b.iter().any(|y| y.eq_ignore_ascii_case(x)))
}

impl MailboxSvc {
    fn limit_uids(&self, set: Option<&UidSet>) -> Result<(Vec<i64>, Vec<i64>), ServiceError> {
        let (s, e) = store::uidset_pairs(set);
        if s.len() > self.0.config.limits.max_uid_ranges {
            return Err(ServiceError::InvalidArgument("too many UID ranges".into()));
        }
        Ok((s, e))
    }

    async fn append_inner(
        &self,
        h: &AppendHeader,
        data: &Bytes,
    ) -> Result<AppendResponse, ServiceError> {
        let name = normalize_mailbox(&h.mailbox)?;
        let flags = store::normalize_flags(&h.flags);
        // Hash and parse before the transaction: no locks held meanwhile.
        let prepared = store::prepare_blob(&self.0.pool, data).await?;
        let mut tx = self.0.pool.begin().await?;
        store::check_quota(&mut tx, h.account_id, data.len() as i64, 1).await?;
        let mb: i64 = sqlx::query_scalar(
            "SELECT id FROM mailbox.mailboxes WHERE account_id = $1 AND name = $2",
        )
        .bind(h.account_id)
        .bind(&name)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| ServiceError::NotFound(format!("mailbox {name}")))?;
        store::insert_blob(&mut tx, &prepared, data, 1).await?;
        let blob = prepared.id.clone();
        let (uid, modseq, uidvalidity) = store::alloc_uids(&mut tx, mb, 1).await?;
        store::insert_entry(
            &mut tx,
            &NewEntry {
                mailbox_id: mb,
                uid,
                modseq,
                flags: &flags,
                internal_date: internal_date(h.internal_date),
                date_offset: h.internal_date_offset,
                size: data.len() as i64,
                blob_id: &blob,
                prefix: &[],
            },
        )
        .await?;
        store::add_usage(&mut tx, h.account_id, data.len() as i64, 1).await?;
        store::publish(
            &mut tx,
            &notify::event(
                h.account_id,
                mb,
                ChangeKind::New,
                vec![uid as u32],
                modseq as u64,
            ),
        )
        .await?;
        tx.commit().await?;
        metrics::inc(&metrics::APPENDS, 1);
        Ok(AppendResponse {
            mailbox_id: mb,
            uidvalidity: uidvalidity as u32,
            uid: uid as u32,
        })
    }

    /// MULTIAPPEND: every message into one mailbox in one transaction (all or none), with one
    /// quota check for all of them, consecutive UIDs and one modseq.
    async fn append_multi_inner(
        &self,
        msgs: &[(AppendHeader, Bytes)],
    ) -> Result<AppendMultiResponse, ServiceError> {
        let Some((first, _)) = msgs.first() else {
            return Err(ServiceError::InvalidArgument("no messages".into()));
        };
        let account_id = first.account_id;
        let name = normalize_mailbox(&first.mailbox)?;
        for (h, data) in msgs {
            if h.account_id != account_id || normalize_mailbox(&h.mailbox)? != name {
                return Err(ServiceError::InvalidArgument(
                    "every message of AppendMulti must go to the same mailbox".into(),
                ));
            }
            if data.is_empty() {
                return Err(ServiceError::InvalidArgument("empty message".into()));
            }
        }
        // Hash and parse before the transaction: no locks held meanwhile.
        let mut prepared = Vec::with_capacity(msgs.len());
        for (_, data) in msgs {
            prepared.push(store::prepare_blob(&self.0.pool, data).await?);
        }
        let n = msgs.len() as i64;
        let bytes: i64 = msgs.iter().map(|(_, d)| d.len() as i64).sum();
        let mut tx = self.0.pool.begin().await?;
        store::check_quota(&mut tx, account_id, bytes, n).await?;
        let mb: i64 = sqlx::query_scalar(
            "SELECT id FROM mailbox.mailboxes WHERE account_id = $1 AND name = $2",
        )
        .bind(account_id)
        .bind(&name)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| ServiceError::NotFound(format!("mailbox {name}")))?;
        let (uid0, modseq, uidvalidity) = store::alloc_uids(&mut tx, mb, n).await?;
        let mut uids = Vec::with_capacity(msgs.len());
        for (i, ((h, data), blob)) in msgs.iter().zip(&prepared).enumerate() {
            store::insert_blob(&mut tx, blob, data, 1).await?;
            let flags = store::normalize_flags(&h.flags);
            let uid = uid0 + i as i64;
            store::insert_entry(
                &mut tx,
                &NewEntry {
                    mailbox_id: mb,
                    uid,
                    modseq,
                    flags: &flags,
                    internal_date: internal_date(h.internal_date),
                    date_offset: h.internal_date_offset,
                    size: data.len() as i64,
                    blob_id: &blob.id,
                    prefix: &[],
                },
            )
            .await?;
            uids.push(uid as u32);
        }
        store::add_usage(&mut tx, account_id, bytes, n).await?;
        store::publish(
            &mut tx,
            &notify::event(account_id, mb, ChangeKind::New, uids.clone(), modseq as u64),
        )
        .await?;
        tx.commit().await?;
        metrics::inc(&metrics::APPENDS, uids.len() as u64);
        Ok(AppendMultiResponse {
            mailbox_id: mb,
            uidvalidity: uidvalidity as u32,
            uids,
        })
    }

    async fn store_inner(
        &self,
        req: StoreFlagsRequest,
    ) -> Result<StoreFlagsResponse, ServiceError> {
        let (s, e) = self.limit_uids(req.uids.as_ref())?;
        let mode = StoreMode::try_from(req.mode).unwrap_or(StoreMode::Replace);
        let given = store::normalize_flags(&req.flags);
        let mut tx = self.0.pool.begin().await?;
        owned(&mut tx, req.account_id, req.mailbox_id).await?;
        // The mailbox row lock orders concurrent stores and gives one modseq per operation.
        let current: i64 = sqlx::query_scalar(
            "SELECT highestmodseq FROM mailbox.mailboxes WHERE id = $1 FOR UPDATE",
        )
        .bind(req.mailbox_id)
        .fetch_one(&mut *tx)
        .await?;
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT uid, modseq, flags, recent FROM mailbox.messages m
             WHERE mailbox_id = $1 AND {} ORDER BY uid",
            store::uid_in_ranges("m.uid", 2, 3)
        )))
        .bind(req.mailbox_id)
        .bind(&s)
        .bind(&e)
        .fetch_all(&mut *tx)
        .await?;
        let mut modified = Vec::new();
        let mut changes: Vec<(i64, Vec<String>)> = Vec::new();
        for r in &rows {
            let uid: i64 = r.get("uid");
            let modseq: i64 = r.get("modseq");
            let flags: Vec<String> = r.get("flags");
            if req.unchanged_since > 0 && modseq as u64 > req.unchanged_since {
                modified.push(uid as u32);
                continue;
            }
            let new = apply_flags(mode, &flags, &given);
            if !same_flags(&new, &flags) {
                changes.push((uid, new));
            }
        }
        let mut highest = current;
        if !changes.is_empty() {
            highest = store::bump_modseq(&mut tx, req.mailbox_id).await?;
            let uids: Vec<i64> = changes.iter().map(|c| c.0).collect();
            let flag_json: Vec<serde_json::Value> =
                changes.iter().map(|c| serde_json::json!(c.1)).collect();
            sqlx::query(
                "UPDATE mailbox.messages m SET modseq = $2,
                        flags = ARRAY(SELECT jsonb_array_elements_text(c.f))
                   FROM unnest($3::bigint[], $4::jsonb[]) AS c(uid, f)
                  WHERE m.mailbox_id = $1 AND m.uid = c.uid",
            )
            .bind(req.mailbox_id)
            .bind(highest)
            .bind(&uids)
            .bind(&flag_json)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "INSERT INTO mailbox.changelog (mailbox_id, modseq, kind, uid)
                 SELECT $1, $2, 2, u FROM unnest($3::bigint[]) u",
            )
            .bind(req.mailbox_id)
            .bind(highest)
            .bind(&uids)
            .execute(&mut *tx)
            .await?;
            store::publish(
                &mut tx,
                &notify::event(
                    req.account_id,
                    req.mailbox_id,
                    ChangeKind::Flags,
                    uids.iter().map(|&u| u as u32).collect(),
                    highest as u64,
                ),
            )
            .await?;
        }
        let after = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT uid, modseq, flags, recent FROM mailbox.messages m
             WHERE mailbox_id = $1 AND {} ORDER BY uid",
            store::uid_in_ranges("m.uid", 2, 3)
        )))
        .bind(req.mailbox_id)
        .bind(&s)
        .bind(&e)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(StoreFlagsResponse {
            messages: after
                .iter()
                .map(|r| MessageFlags {
                    uid: r.get::<i64, _>("uid") as u32,
                    flags: flags_of(r),
                    modseq: r.get::<i64, _>("modseq") as u64,
                })
                .collect(),
            modified,
            highestmodseq: highest as u64,
        })
    }

    async fn copy_inner(&self, req: CopyRequest) -> Result<CopyResponse, ServiceError> {
        let (s, e) = self.limit_uids(req.uids.as_ref())?;
        let dest_name = normalize_mailbox(&req.destination)?;
        let mut tx = self.0.pool.begin().await?;
        owned(&mut tx, req.account_id, req.mailbox_id).await?;
        let dest: i64 = sqlx::query_scalar(
            "SELECT id FROM mailbox.mailboxes WHERE account_id = $1 AND name = $2",
        )
        .bind(req.account_id)
        .bind(&dest_name)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| ServiceError::NotFound(format!("mailbox {dest_name}")))?;
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT uid, flags, internal_date, date_offset, size, blob_id, prefix FROM mailbox.messages m
             WHERE mailbox_id = $1 AND {} ORDER BY uid",
            store::uid_in_ranges("m.uid", 2, 3)
        )))
        .bind(req.mailbox_id)
        .bind(&s)
        .bind(&e)
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            let uidvalidity: i64 =
                sqlx::query_scalar("SELECT uidvalidity FROM mailbox.mailboxes WHERE id = $1")
                    .bind(dest)
                    .fetch_one(&mut *tx)
                    .await?;
            return Ok(CopyResponse {
                uidvalidity: uidvalidity as u32,
                ..Default::default()
            });
        }
        let bytes: i64 = rows.iter().map(|r| r.get::<i64, _>("size")).sum();
        let n = rows.len() as i64;
        // Account row first (quota), then mailbox rows in id order.
        if req.r#move {
            sqlx::query("SELECT 1 FROM mailbox.accounts WHERE id = $1 FOR UPDATE")
                .bind(req.account_id)
                .execute(&mut *tx)
                .await?;
        } else {
            store::check_quota(&mut tx, req.account_id, bytes, n).await?;
        }
        let mut order = [req.mailbox_id, dest];
        order.sort_unstable();
        for id in order {
            sqlx::query("SELECT 1 FROM mailbox.mailboxes WHERE id = $1 FOR UPDATE")
                .bind(id)
                .execute(&mut *tx)
                .await?;
        }
        let (first, modseq, uidvalidity) = store::alloc_uids(&mut tx, dest, n).await?;
        let mut src_uids = Vec::new();
        let mut dst_uids = Vec::new();
        for (i, r) in rows.iter().enumerate() {
            let uid = first + i as i64;
            let flags: Vec<String> = r.get("flags");
            let blob: Vec<u8> = r.get("blob_id");
            let prefix: Vec<u8> = r.get("prefix");
            store::insert_entry(
                &mut tx,
                &NewEntry {
                    mailbox_id: dest,
                    uid,
                    modseq,
                    flags: &flags,
                    internal_date: r.get("internal_date"),
                    date_offset: r.get("date_offset"),
                    size: r.get("size"),
                    blob_id: &blob,
                    prefix: &prefix,
                },
            )
            .await?;
            src_uids.push(r.get::<i64, _>("uid"));
            dst_uids.push(uid as u32);
        }
        // The new entries reference the same blobs.
        sqlx::query(
            "UPDATE mailbox.blobs b SET refcount = refcount + c.n
               FROM (SELECT blob_id, count(*) AS n FROM mailbox.messages
                      WHERE mailbox_id = $1 AND uid >= $2 AND uid < $3 GROUP BY blob_id) c
              WHERE b.id = c.blob_id",
        )
        .bind(dest)
        .bind(first)
        .bind(first + n)
        .execute(&mut *tx)
        .await?;
        store::add_usage(&mut tx, req.account_id, bytes, n).await?;
        store::publish(
            &mut tx,
            &notify::event(
                req.account_id,
                dest,
                ChangeKind::New,
                dst_uids.clone(),
                modseq as u64,
            ),
        )
        .await?;
        if req.r#move {
            store::remove_entries(&mut tx, req.account_id, req.mailbox_id, &src_uids, true).await?;
        }
        tx.commit().await?;
        Ok(CopyResponse {
            uidvalidity: uidvalidity as u32,
            source_uids: src_uids.iter().map(|&u| u as u32).collect(),
            destination_uids: dst_uids,
        })
    }

    async fn expunge_inner(&self, req: ExpungeRequest) -> Result<ExpungeResponse, ServiceError> {
        let mut tx = self.0.pool.begin().await?;
        owned(&mut tx, req.account_id, req.mailbox_id).await?;
        sqlx::query("SELECT 1 FROM mailbox.accounts WHERE id = $1 FOR UPDATE")
            .bind(req.account_id)
            .execute(&mut *tx)
            .await?;
        let current: i64 = sqlx::query_scalar(
            "SELECT highestmodseq FROM mailbox.mailboxes WHERE id = $1 FOR UPDATE",
        )
        .bind(req.mailbox_id)
        .fetch_one(&mut *tx)
        .await?;
        let (s, e) = self.limit_uids(req.uids.as_ref())?;
        let uids: Vec<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT uid FROM mailbox.messages m WHERE mailbox_id = $1 AND '\\Deleted' = ANY(flags)
               AND ($2 OR {}) ORDER BY uid",
            store::uid_in_ranges("m.uid", 3, 4)
        )))
        .bind(req.mailbox_id)
        .bind(req.uids.is_none())
        .bind(&s)
        .bind(&e)
        .fetch_all(&mut *tx)
        .await?;
        let (expunged, modseq) =
            store::remove_entries(&mut tx, req.account_id, req.mailbox_id, &uids, true).await?;
        tx.commit().await?;
        Ok(ExpungeResponse {
            expunged,
            highestmodseq: if modseq > 0 { modseq } else { current } as u64,
        })
    }

    async fn delete_inner(&self, req: DeleteMailboxRequest) -> Result<(), ServiceError> {
        let name = normalize_mailbox(&req.name)?;
        if name == INBOX {
            return Err(ServiceError::Cannot("INBOX cannot be deleted".into()));
        }
        let mut tx = self.0.pool.begin().await?;
        sqlx::query("SELECT 1 FROM mailbox.accounts WHERE id = $1 FOR UPDATE")
            .bind(req.account_id)
            .execute(&mut *tx)
            .await?;
        let id: i64 = sqlx::query_scalar(
            "SELECT id FROM mailbox.mailboxes WHERE account_id = $1 AND name = $2 FOR UPDATE",
        )
        .bind(req.account_id)
        .bind(&name)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| ServiceError::NotFound(format!("mailbox {name}")))?;
        let uids: Vec<i64> =
            sqlx::query_scalar("SELECT uid FROM mailbox.messages WHERE mailbox_id = $1")
                .bind(id)
                .fetch_all(&mut *tx)
                .await?;
        store::remove_entries(&mut tx, req.account_id, id, &uids, false).await?;
        sqlx::query("DELETE FROM mailbox.mailboxes WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        store::publish(
            &mut tx,
            &notify::event(
                req.account_id,
                id,
                ChangeKind::MailboxDeleted,
                Vec::new(),
                0,
            ),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn rename_inner(&self, req: RenameMailboxRequest) -> Result<(), ServiceError> {
        let from = normalize_mailbox(&req.from)?;
        let to = normalize_mailbox(&req.to)?;
        if to == INBOX || to.starts_with("INBOX/") && from == INBOX {
            return Err(ServiceError::Cannot("cannot rename to INBOX".into()));
        }
        let mut tx = self.0.pool.begin().await?;
        let exists: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM mailbox.mailboxes WHERE account_id = $1 AND name = $2)",
        )
        .bind(req.account_id)
        .bind(&to)
        .fetch_one(&mut *tx)
        .await?;
        if exists {
            return Err(ServiceError::AlreadyExists(format!("mailbox {to}")));
        }
        let id: i64 = sqlx::query_scalar(
            "SELECT id FROM mailbox.mailboxes WHERE account_id = $1 AND name = $2 FOR UPDATE",
        )
        .bind(req.account_id)
        .bind(&from)
        .fetch_optional(&mut *tx)
        .await?
        .ok_or_else(|| ServiceError::NotFound(format!("mailbox {from}")))?;
        create_parents(&mut tx, req.account_id, &to).await?;
        if from == INBOX {
            // RFC 9051 §6.3.6: renaming INBOX moves its messages to a new mailbox; INBOX stays.
            let new_id =
                store::create_mailbox(&mut tx, req.account_id, &to, SpecialUse::None).await?;
            let uids: Vec<i64> = sqlx::query_scalar(
                "SELECT uid FROM mailbox.messages WHERE mailbox_id = $1 ORDER BY uid",
            )
            .bind(id)
            .fetch_all(&mut *tx)
            .await?;
            if !uids.is_empty() {
                let n = uids.len() as i64;
                let (first, modseq, _) = store::alloc_uids(&mut tx, new_id, n).await?;
                sqlx::query(
                    "UPDATE mailbox.messages m SET mailbox_id = $2, uid = $3 + x.i - 1, modseq = $4
                       FROM unnest($5::bigint[]) WITH ORDINALITY AS x(uid, i)
                      WHERE m.mailbox_id = $1 AND m.uid = x.uid",
                )
                .bind(id)
                .bind(new_id)
                .bind(first)
                .bind(modseq)
                .bind(&uids)
                .execute(&mut *tx)
                .await?;
                let m = store::bump_modseq(&mut tx, id).await?;
                sqlx::query(
                    "INSERT INTO mailbox.changelog (mailbox_id, modseq, kind, uid)
                     SELECT $1, $2, 3, u FROM unnest($3::bigint[]) u",
                )
                .bind(id)
                .bind(m)
                .bind(&uids)
                .execute(&mut *tx)
                .await?;
            }
        } else {
            sqlx::query(
                "UPDATE mailbox.mailboxes SET name = $3 || substr(name, length($2) + 1)
                  WHERE account_id = $1 AND (name = $2 OR left(name, length($2) + 1) = $2 || '/')",
            )
            .bind(req.account_id)
            .bind(&from)
            .bind(&to)
            .execute(&mut *tx)
            .await?;
        }
        store::publish(
            &mut tx,
            &notify::event(
                req.account_id,
                id,
                ChangeKind::MailboxRenamed,
                Vec::new(),
                0,
            ),
        )
        .await?;
        tx.commit().await?;
        Ok(())
    }
}

/// RFC 9051 §6.3.4: creating `a/b/c` creates `a` and `a/b` when they are missing.
async fn create_parents(
    conn: &mut PgConnection,
    account_id: i64,
    name: &str,
) -> Result<(), ServiceError> {
    let parts: Vec<&str> = name.split('/').collect();
    for i in 1..parts.len() {
        let parent = parts[..i].join("/");
        match store::create_mailbox(conn, account_id, &parent, SpecialUse::None).await {
            Ok(_) | Err(ServiceError::AlreadyExists(_)) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn bind_args<'q>(
    mut q: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    args: &'q [Arg],
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    for a in args {
        q = match a {
            Arg::I64(v) => q.bind(*v),
            Arg::Text(v) => q.bind(v.as_str()),
            Arg::I64s(v) => q.bind(v.as_slice()),
            Arg::Date(d) => q.bind(*d),
        };
    }
    q
}

#[tonic::async_trait]
impl Mailbox for MailboxSvc {
    async fn list_mailboxes(
        &self,
        req: Request<ListMailboxesRequest>,
    ) -> Result<Response<ListMailboxesResponse>, Status> {
        let req = req.into_inner();
        let sql = if req.with_status {
            format!("{INFO_SELECT}{STATUS_COLUMNS} WHERE mb.account_id = $1 ORDER BY mb.name")
        } else {
            format!(
                "{INFO_SELECT} FROM mailbox.mailboxes mb WHERE mb.account_id = $1 ORDER BY mb.name"
            )
        };
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(req.account_id)
            .fetch_all(&self.0.pool)
            .await
            .map_err(st)?;
        let mut mailboxes: Vec<MailboxInfo> =
            rows.iter().map(|r| info_from(r, req.with_status)).collect();
        // INBOX first, as clients expect.
        mailboxes.sort_by_key(|m| (m.name != INBOX, m.name.clone()));
        let subscriptions: Vec<String> = sqlx::query_scalar(
            "SELECT name FROM mailbox.subscriptions WHERE account_id = $1 ORDER BY name",
        )
        .bind(req.account_id)
        .fetch_all(&self.0.pool)
        .await
        .map_err(st)?;
        Ok(Response::new(ListMailboxesResponse {
            mailboxes,
            subscriptions,
            subscriptions_listed: true,
        }))
    }

    async fn create_mailbox(
        &self,
        req: Request<CreateMailboxRequest>,
    ) -> Result<Response<MailboxInfo>, Status> {
        let req = req.into_inner();
        let name = normalize_mailbox(&req.name).map_err(st)?;
        let su = SpecialUse::try_from(req.special_use).unwrap_or(SpecialUse::None);
        let mut tx = self.0.pool.begin().await.map_err(st)?;
        create_parents(&mut tx, req.account_id, &name)
            .await
            .map_err(st)?;
        let id = store::create_mailbox(&mut tx, req.account_id, &name, su)
            .await
            .map_err(st)?;
        store::publish(
            &mut tx,
            &notify::event(
                req.account_id,
                id,
                ChangeKind::MailboxCreated,
                Vec::new(),
                0,
            ),
        )
        .await
        .map_err(st)?;
        let info = info_by_name(&mut tx, req.account_id, &name)
            .await
            .map_err(st)?;
        tx.commit().await.map_err(st)?;
        Ok(Response::new(info))
    }

    async fn delete_mailbox(
        &self,
        req: Request<DeleteMailboxRequest>,
    ) -> Result<Response<DeleteMailboxResponse>, Status> {
        self.delete_inner(req.into_inner()).await.map_err(st)?;
        Ok(Response::new(DeleteMailboxResponse {}))
    }

    async fn rename_mailbox(
        &self,
        req: Request<RenameMailboxRequest>,
    ) -> Result<Response<RenameMailboxResponse>, Status> {
        self.rename_inner(req.into_inner()).await.map_err(st)?;
        Ok(Response::new(RenameMailboxResponse {}))
    }

    async fn set_subscribed(
        &self,
        req: Request<SetSubscribedRequest>,
    ) -> Result<Response<SetSubscribedResponse>, Status> {
        let req = req.into_inner();
        let name = normalize_mailbox(&req.name).map_err(st)?;
        let exists: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM mailbox.mailboxes WHERE account_id = $1 AND name = $2)",
        )
        .bind(req.account_id)
        .bind(&name)
        .fetch_one(&self.0.pool)
        .await
        .map_err(st)?;
        // RFC 9051 §6.3.7 lets SUBSCRIBE insist on an existing mailbox (a typo is refused);
        // UNSUBSCRIBE must still remove a name whose mailbox was deleted since.
        if req.subscribed {
            if !exists {
                return Err(st(ServiceError::NotFound(format!("mailbox {name}"))));
            }
            let mut conn = self.0.pool.acquire().await.map_err(st)?;
            store::subscribe(&mut conn, req.account_id, &name)
                .await
                .map_err(st)?;
        } else {
            let removed = sqlx::query(
                "DELETE FROM mailbox.subscriptions WHERE account_id = $1 AND name = $2",
            )
            .bind(req.account_id)
            .bind(&name)
            .execute(&self.0.pool)
            .await
            .map_err(st)?
            .rows_affected();
            if removed == 0 && !exists {
                return Err(st(ServiceError::NotFound(format!("mailbox {name}"))));
            }
        }
        Ok(Response::new(SetSubscribedResponse {}))
    }

    async fn status(&self, req: Request<StatusRequest>) -> Result<Response<MailboxInfo>, Status> {
        let req = req.into_inner();
        let mut conn = self.0.pool.acquire().await.map_err(st)?;
        Ok(Response::new(
            info_by_name(&mut conn, req.account_id, &req.name)
                .await
                .map_err(st)?,
        ))
    }

    async fn select(
        &self,
        req: Request<SelectRequest>,
    ) -> Result<Response<SelectResponse>, Status> {
        let req = req.into_inner();
        let mut tx = self.0.pool.begin().await.map_err(st)?;
        let info = info_by_name(&mut tx, req.account_id, &req.name)
            .await
            .map_err(st)?;
        let rows = sqlx::query(
            "SELECT uid, '\\Seen' = ANY(flags) AS seen FROM mailbox.messages WHERE mailbox_id = $1 ORDER BY uid",
        )
        .bind(info.id)
        .fetch_all(&mut *tx)
        .await
        .map_err(st)?;
        let uids: Vec<u32> = rows.iter().map(|r| r.get::<i64, _>(0) as u32).collect();
        let first_unseen = rows
            .iter()
            .position(|r| !r.get::<bool, _>(1))
            .map_or(0, |p| p as u32 + 1);
        let keywords: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT f FROM mailbox.messages, unnest(flags) f WHERE mailbox_id = $1 AND f NOT LIKE '\\%' ORDER BY f",
        )
        .bind(info.id)
        .fetch_all(&mut *tx)
        .await
        .map_err(st)?;
        if !req.read_only && info.recent > 0 {
            sqlx::query(
                "UPDATE mailbox.messages SET recent = false WHERE mailbox_id = $1 AND recent",
            )
            .bind(info.id)
            .execute(&mut *tx)
            .await
            .map_err(st)?;
        }
        tx.commit().await.map_err(st)?;
        Ok(Response::new(SelectResponse {
            mailbox: Some(info),
            uids,
            keywords,
            first_unseen_uid: first_unseen,
        }))
    }

    type FetchStream = BoxStream<MessageMeta>;

    async fn fetch(
        &self,
        req: Request<FetchRequest>,
    ) -> Result<Response<Self::FetchStream>, Status> {
        let req = req.into_inner();
        let (s, e) = self.limit_uids(req.uids.as_ref()).map_err(st)?;
        let pool = self.0.pool.clone();
        let since = req.changed_since.min(i64::MAX as u64) as i64;
        let (mailbox_id, account_id, envelope, structure) = (
            req.mailbox_id,
            req.account_id,
            req.envelope,
            req.body_structure,
        );
        let page = move |last: i64| {
            sqlx::query(sqlx::AssertSqlSafe(fetch_sql()))
                .bind(mailbox_id)
                .bind(s.clone())
                .bind(e.clone())
                .bind(last)
                .bind(envelope)
                .bind(structure)
                .bind(since)
                .bind(account_id)
        };
        // The first page is read before answering, with the ownership condition in the same
        // statement; only an empty one needs the separate check (to tell "not yours / gone"
        // from "no such messages").
        let first = page(0).fetch_all(&pool).await.map_err(st)?;
        if first.is_empty() {
            let mut conn = pool.acquire().await.map_err(st)?;
            owned(&mut conn, req.account_id, req.mailbox_id)
                .await
                .map_err(st)?;
        }
        let stream = async_stream::try_stream! {
            let mut rows = first;
            loop {
                if rows.is_empty() {
                    break;
                }
                let mut last: i64 = 0;
                for r in &rows {
                    last = r.get("uid");
                    let date: chrono::DateTime<chrono::Utc> = r.get("internal_date");
                    let plen = r.get::<i32, _>("plen") as u64;
                    yield MessageMeta {
                        uid: last as u32,
                        modseq: r.get::<i64, _>("modseq") as u64,
                        flags: flags_of(r),
                        internal_date: date.timestamp(),
                        internal_date_offset: r.get("date_offset"),
                        size: r.get::<i64, _>("size") as u64,
                        envelope: r.get::<Option<Vec<u8>>, _>("envelope").map(|b| store::decode_envelope(&b)),
                        body_structure: r.get::<Option<Vec<u8>>, _>("body").map(|b| store::decode_structure(&b, plen)),
                        blob_id: store::hex_id(&r.get::<Vec<u8>, _>("blob_id")),
                    };
                }
                if (rows.len() as i64) < PAGE {
                    break;
                }
                rows = page(last).fetch_all(&pool).await.map_err(st)?;
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }

    type FetchBodyStream = BoxStream<BodyChunk>;

    async fn fetch_body(
        &self,
        req: Request<FetchBodyRequest>,
    ) -> Result<Response<Self::FetchBodyStream>, Status> {
        let req = req.into_inner();
        let (s, e) = self.limit_uids(req.uids.as_ref()).map_err(st)?;
        // One connection for the pages and the range reads of large blobs.
        let mut conn = self.0.pool.acquire().await.map_err(st)?;
        let (mailbox_id, account_id) = (req.mailbox_id, req.account_id);
        let page = move |last: i64| {
            sqlx::query(sqlx::AssertSqlSafe(fetch_body_sql()))
                .bind(mailbox_id)
                .bind(s.clone())
                .bind(e.clone())
                .bind(last)
                .bind(body::INLINE as i64)
                .bind(account_id)
        };
        // As in fetch: the first page carries the ownership condition.
        let first = page(0).fetch_all(&mut *conn).await.map_err(st)?;
        if first.is_empty() {
            owned(&mut conn, req.account_id, req.mailbox_id)
                .await
                .map_err(st)?;
        }
        let stream = async_stream::try_stream! {
            let mut rows = first;
            loop {
                if rows.is_empty() {
                    break;
                }
                let mut last: i64 = 0;
                for r in &rows {
                    last = r.get("uid");
                    let uid = last as u32;
                    let blob_id: Vec<u8> = r.get("blob_id");
                    let prefix = Bytes::from(r.get::<Vec<u8>, _>("prefix"));
                    let data: Option<Vec<u8>> = r.get("data");
                    let structure = store::decode_structure(&r.get::<Vec<u8>, _>("body"), prefix.len() as u64);
                    let stored = Stored {
                        blob_id: &blob_id,
                        prefix,
                        data: data.map(Bytes::from),
                        size: r.get::<i64, _>("size") as u64,
                        structure: &structure,
                    };
                    for (i, section) in req.sections.iter().enumerate() {
                        let out = body::render(&mut conn, &stored, section).await.map_err(st)?;
                        let (start, total, converted) = match out {
                            None => {
                                yield BodyChunk { uid, section: i as u32, first: true, last: true, missing: true, ..Default::default() };
                                continue;
                            }
                            Some(body::Output::Range(s, e)) => (s, e - s, None),
                            Some(body::Output::Converted(d)) => (0, d.len() as u64, Some(Bytes::from(d))),
                        };
                        if total == 0 {
                            yield BodyChunk { uid, section: i as u32, total, first: true, last: true, ..Default::default() };
                            continue;
                        }
                        // A window at a time (a large plain section is read from the database
                        // by range, never whole); each chunk a slice of what was read, at most
                        // CHUNK long.
                        let mut sent = 0u64;
                        while sent < total {
                            let n = (total - sent).min(body::WINDOW);
                            let pieces = match &converted {
                                Some(d) => vec![d.slice(sent as usize..(sent + n) as usize)],
                                None => body::read(&mut conn, &stored, start + sent, start + sent + n)
                                    .await
                                    .map_err(st)?,
                            };
                            if pieces.iter().map(|p| p.len() as u64).sum::<u64>() != n {
                                Err(st(ServiceError::Internal(format!(
                                    "message {uid} is shorter than its recorded size"
                                ))))?;
                            }
                            for piece in pieces {
                                for at in (0..piece.len()).step_by(CHUNK) {
                                    let data = piece.slice(at..(at + CHUNK).min(piece.len()));
                                    let first = sent == 0;
                                    sent += data.len() as u64;
                                    yield BodyChunk {
                                        uid,
                                        section: i as u32,
                                        total: if first { total } else { 0 },
                                        data,
                                        first,
                                        last: sent == total,
                                        missing: false,
                                    };
                                }
                            }
                        }
                    }
                }
                if (rows.len() as i64) < BODY_PAGE {
                    break;
                }
                rows = page(last).fetch_all(&mut *conn).await.map_err(st)?;
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }

    async fn store_flags(
        &self,
        req: Request<StoreFlagsRequest>,
    ) -> Result<Response<StoreFlagsResponse>, Status> {
        Ok(Response::new(
            self.store_inner(req.into_inner()).await.map_err(st)?,
        ))
    }

    async fn copy(&self, req: Request<CopyRequest>) -> Result<Response<CopyResponse>, Status> {
        Ok(Response::new(
            self.copy_inner(req.into_inner()).await.map_err(st)?,
        ))
    }

    async fn expunge(
        &self,
        req: Request<ExpungeRequest>,
    ) -> Result<Response<ExpungeResponse>, Status> {
        Ok(Response::new(
            self.expunge_inner(req.into_inner()).await.map_err(st)?,
        ))
    }

    async fn append(
        &self,
        req: Request<Streaming<AppendChunk>>,
    ) -> Result<Response<AppendResponse>, Status> {
        let mut stream = req.into_inner();
        let max = self.0.config.limits.max_message_bytes;
        let (header, data) = read_upload(
            &mut stream,
            max,
            |c: AppendChunk| match c.part? {
                append_chunk::Part::Header(h) => Some(Ok(h)),
                append_chunk::Part::Data(d) => Some(Err(d)),
            },
            |h| h.size,
        )
        .await
        .map_err(st)?;
        if data.is_empty() {
            return Err(st(ServiceError::InvalidArgument("empty message".into())));
        }
        Ok(Response::new(
            self.append_inner(&header, &data).await.map_err(st)?,
        ))
    }

    async fn append_multi(
        &self,
        req: Request<Streaming<AppendChunk>>,
    ) -> Result<Response<AppendMultiResponse>, Status> {
        let mut stream = req.into_inner();
        let lim = &self.0.config.limits;
        let mut msgs: Vec<(AppendHeader, Vec<u8>)> = Vec::new();
        let mut total: u64 = 0;
        while let Some(chunk) = stream.next().await {
            let chunk =
                chunk.map_err(|s| st(ServiceError::InvalidArgument(s.message().to_string())))?;
            match chunk.part {
                Some(append_chunk::Part::Header(h)) => {
                    if msgs.len() >= lim.max_append_multi_messages {
                        return Err(st(ServiceError::TooLarge(format!(
                            "more than {} messages",
                            lim.max_append_multi_messages
                        ))));
                    }
                    msgs.push((h, Vec::new()));
                }
                Some(append_chunk::Part::Data(d)) => {
                    let Some((_, data)) = msgs.last_mut() else {
                        return Err(st(ServiceError::InvalidArgument(
                            "the first chunk must be a header".into(),
                        )));
                    };
                    total += d.len() as u64;
                    if (data.len() + d.len()) as u64 > lim.max_message_bytes {
                        return Err(st(ServiceError::TooLarge(format!(
                            "message larger than {} bytes",
                            lim.max_message_bytes
                        ))));
                    }
                    if total > lim.max_append_multi_bytes {
                        return Err(st(ServiceError::TooLarge(format!(
                            "messages larger than {} bytes together",
                            lim.max_append_multi_bytes
                        ))));
                    }
                    data.extend_from_slice(&d);
                }
                None => {}
            }
        }
        let msgs: Vec<(AppendHeader, Bytes)> =
            msgs.into_iter().map(|(h, d)| (h, Bytes::from(d))).collect();
        Ok(Response::new(
            self.append_multi_inner(&msgs).await.map_err(st)?,
        ))
    }

    async fn search(
        &self,
        req: Request<SearchRequest>,
    ) -> Result<Response<SearchResponse>, Status> {
        let req = req.into_inner();
        let mut conn = self.0.pool.acquire().await.map_err(st)?;
        owned(&mut conn, req.account_id, req.mailbox_id)
            .await
            .map_err(st)?;
        let limits = &self.0.config.limits;
        let sql = search::build(
            req.key.as_ref(),
            1,
            search::Limits {
                max_keys: limits.max_search_keys,
                max_text_keys: limits.max_search_text_keys,
            },
        )
        .map_err(st)?;
        let q = format!(
            "SELECT m.uid, m.modseq FROM mailbox.messages m JOIN mailbox.blobs b ON b.id = m.blob_id
              WHERE m.mailbox_id = $1 AND {} ORDER BY m.uid",
            sql.cond
        );
        let rows = bind_args(
            sqlx::query(sqlx::AssertSqlSafe(q)).bind(req.mailbox_id),
            &sql.args,
        )
        .fetch_all(&mut *conn)
        .await
        .map_err(st)?;
        Ok(Response::new(SearchResponse {
            uids: rows.iter().map(|r| r.get::<i64, _>(0) as u32).collect(),
            highestmodseq: rows
                .iter()
                .map(|r| r.get::<i64, _>(1) as u64)
                .max()
                .unwrap_or(0),
        }))
    }

    async fn changes(
        &self,
        req: Request<ChangesRequest>,
    ) -> Result<Response<ChangesResponse>, Status> {
        let req = req.into_inner();
        let since = req.since_modseq.min(i64::MAX as u64) as i64;
        // One statement, so one snapshot for all of it, and one round trip.
        let rows = sqlx::query(CHANGES_SQL)
            .bind(req.mailbox_id)
            .bind(req.account_id)
            .bind(since)
            .fetch_all(&self.0.pool)
            .await
            .map_err(st)?;
        let Some(head) = rows.first().filter(|r| r.get::<bool, _>("head")) else {
            return Err(st(ServiceError::NotFound(format!(
                "mailbox {}",
                req.mailbox_id
            ))));
        };
        let expunged: Vec<i64> = head.get("expunged");
        if req.claim_recent && rows.len() > 1 {
            // The head row above proved the mailbox is the account's.
            sqlx::query(
                "UPDATE mailbox.messages SET recent = false
                  WHERE mailbox_id = $1 AND recent AND modseq > $2",
            )
            .bind(req.mailbox_id)
            .bind(since)
            .execute(&self.0.pool)
            .await
            .map_err(st)?;
        }
        Ok(Response::new(ChangesResponse {
            changed: rows[1..]
                .iter()
                .map(|r| MessageFlags {
                    uid: r.get::<i64, _>("a") as u32,
                    flags: flags_of(r),
                    modseq: r.get::<i64, _>("b") as u64,
                })
                .collect(),
            expunged: expunged.iter().map(|&u| u as u32).collect(),
            highestmodseq: head.get::<i64, _>("a") as u64,
            uidnext: head.get::<i64, _>("b") as u32,
            messages: head.get::<i64, _>("n") as u32,
            truncated: since < head.get::<i64, _>("log_floor"),
        }))
    }

    async fn get_quota(
        &self,
        req: Request<GetQuotaRequest>,
    ) -> Result<Response<QuotaInfo>, Status> {
        let id = req.into_inner().account_id;
        let r = sqlx::query(
            "SELECT used_bytes, quota_bytes, used_messages, quota_messages FROM mailbox.accounts WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.0.pool)
        .await
        .map_err(st)?
        .ok_or_else(|| st(ServiceError::NotFound(format!("account {id}"))))?;
        Ok(Response::new(QuotaInfo {
            used_bytes: r.get::<i64, _>(0) as u64,
            limit_bytes: r.get::<i64, _>(1) as u64,
            used_messages: r.get::<i64, _>(2) as u64,
            limit_messages: r.get::<i64, _>(3) as u64,
        }))
    }

    type WatchStream = BoxStream<ChangeEvent>;

    async fn watch(
        &self,
        req: Request<Streaming<WatchControl>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let mut control = req.into_inner();
        let mut events = self.0.hub.subscribe();
        let pool = self.0.pool.clone();
        let shutdown = self.0.shutdown.clone();
        let lease = Duration::from_secs(self.0.config.limits.presence_lease_secs.max(3));
        let stream_id = uuid::Uuid::new_v4();
        let stream = async_stream::try_stream! {
            let mut watched: HashSet<i64> = HashSet::new();
            let mut refresh = tokio::time::interval(lease / 3);
            let guard = PresenceGuard { pool: pool.clone(), stream_id };
            loop {
                tokio::select! {
                    _ = shutdown.stopping() => break,
                    c = control.next() => match c {
                        Some(Ok(c)) => {
                            for a in &c.remove_accounts {
                                watched.remove(a);
                            }
                            watched.extend(c.add_accounts.iter().copied());
                            if let Err(e) = presence(&pool, stream_id, &watched, lease).await {
                                tracing::warn!("presence update: {e}");
                            }
                        }
                        _ => break,
                    },
                    _ = refresh.tick() => {
                        if !watched.is_empty()
                            && let Err(e) = presence(&pool, stream_id, &watched, lease).await
                        {
                            tracing::warn!("presence refresh: {e}");
                        }
                    }
                    ev = events.recv() => match ev {
                        Ok(ev) if ev.account_id == 0 && ev.kind == ChangeKind::Unspecified as i32 => {
                            for &a in &watched {
                                yield ChangeEvent { account_id: a, ..Default::default() };
                            }
                        }
                        Ok(ev) => {
                            if watched.contains(&ev.account_id) {
                                yield ev;
                            }
                        }
                        Err(RecvError::Lagged(_)) => {
                            // Events were dropped: an UNSPECIFIED event tells the gateway to
                            // resynchronise the account with Changes.
                            for &a in &watched {
                                yield ChangeEvent { account_id: a, ..Default::default() };
                            }
                        }
                        Err(RecvError::Closed) => break,
                    },
                }
            }
            drop(guard);
        };
        Ok(Response::new(Box::pin(stream)))
    }

    async fn alert(&self, req: Request<AlertRequest>) -> Result<Response<AlertResponse>, Status> {
        let req = req.into_inner();
        let mut tx = self.0.pool.begin().await.map_err(st)?;
        let account = store::account_id(&mut tx, &req.address).await.map_err(st)?;
        let online: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM mailbox.presence WHERE account_id = $1 AND expires_at > now())",
        )
        .bind(account)
        .fetch_one(&mut *tx)
        .await
        .map_err(st)?;
        if online && !req.probe_only {
            let mut ev = notify::event(account, 0, ChangeKind::Alert, Vec::new(), 0);
            ev.text = req.text.replace(['\r', '\n'], " ");
            store::publish(&mut tx, &ev).await.map_err(st)?;
        }
        tx.commit().await.map_err(st)?;
        Ok(Response::new(AlertResponse { online }))
    }

    type LockMaildropStream = BoxStream<LockEvent>;

    async fn lock_maildrop(
        &self,
        req: Request<Streaming<LockControl>>,
    ) -> Result<Response<Self::LockMaildropStream>, Status> {
        let mut control = req.into_inner();
        let first = control
            .next()
            .await
            .ok_or_else(|| st(ServiceError::InvalidArgument("empty lock stream".into())))??;
        let mailbox = if first.mailbox.is_empty() {
            INBOX.to_string()
        } else {
            normalize_mailbox(&first.mailbox).map_err(st)?
        };
        // Held on the replica's shared lock connection (see locks.rs), not a connection of
        // its own: a POP3 session must not pin a PostgreSQL backend for its whole life.
        let key = format!("maildrop:{}:{}", first.account_id, mailbox);
        let lease = self.0.locks.try_lock(key).await.map_err(st)?;
        let shutdown = self.0.shutdown.clone();
        let stream = async_stream::try_stream! {
            yield LockEvent { acquired: lease.is_some() };
            if let Some(lease) = lease {
                let lost = loop {
                    tokio::select! {
                        _ = shutdown.stopping() => break false,
                        _ = lease.lost() => break true,
                        c = control.next() => match c {
                            Some(Ok(_)) => continue,
                            _ => break false,
                        },
                    }
                };
                if lost {
                    Err(Status::unavailable("the maildrop lock was lost; log in again"))?;
                }
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }
}

async fn presence(
    pool: &sqlx::PgPool,
    stream_id: uuid::Uuid,
    watched: &HashSet<i64>,
    lease: Duration,
) -> Result<(), ServiceError> {
    let ids: Vec<i64> = watched.iter().copied().collect();
    let mut tx = pool.begin().await?;
    sqlx::query("DELETE FROM mailbox.presence WHERE replica = $1 AND NOT (account_id = ANY($2))")
        .bind(stream_id)
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO mailbox.presence (account_id, replica, expires_at)
         SELECT a, $2, now() + make_interval(secs => $3) FROM unnest($1::bigint[]) a
         ON CONFLICT (account_id, replica) DO UPDATE SET expires_at = EXCLUDED.expires_at",
    )
    .bind(&ids)
    .bind(stream_id)
    .bind(lease.as_secs_f64())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Removes a Watch stream's presence rows when the stream ends, however it ends.
struct PresenceGuard {
    pool: sqlx::PgPool,
    stream_id: uuid::Uuid,
}

impl Drop for PresenceGuard {
    fn drop(&mut self) {
        let pool = self.pool.clone();
        let id = self.stream_id;
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = sqlx::query("DELETE FROM mailbox.presence WHERE replica = $1")
                    .bind(id)
                    .execute(&pool)
                    .await;
            });
        }
    }
}
