//! The queue in PostgreSQL (schema `relay`): durable enqueue, claims under a lease, results
//! with their DSNs recorded in one transaction, and the admin operations.

use std::time::Duration;

use chrono::{DateTime, Utc};
use mailsuite_proto::{EnqueueHeader, QueuedMessage, QueuedRecipient, RecipientState};
use mailsuite_runtime::ServiceError;
use sqlx::{PgPool, Postgres, Row, Transaction};
use uuid::Uuid;

use crate::config::RetryConfig;
use crate::dsn::{self, Action, RecipientReport};
use crate::smtp::Outcome;

/// Channel for LISTEN/NOTIFY wake-ups across replicas.
pub const WAKE_CHANNEL: &str = "relay_queue_wake";

#[derive(Clone)]
pub struct Db {
    pub pool: PgPool,
}

/// A recipient claimed by a worker.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: i64,
    pub message_id: Uuid,
    pub address: String,
    pub domain: String,
    pub notify: String,
    pub orcpt: String,
    pub attempts: i32,
}

#[derive(Debug, Clone)]
pub struct MessageRow {
    pub id: Uuid,
    pub return_path: String,
    pub envid: String,
    pub ret: i32,
    pub body_8bit: bool,
    pub binarymime: bool,
    pub smtputf8: bool,
    /// The authenticated account that submitted it; empty for mail that came in on the MX
    /// port (forwarded through an alias), whose envelope sender nobody vouches for.
    pub submitter: String,
    pub traceparent: String,
    pub raw: Vec<u8>,
    pub created: DateTime<Utc>,
}

impl MessageRow {
    /// Forwarded MX mail: its sender may be forged, so reports to it are kept to what a
    /// bounce needs (failures, headers only) — otherwise anyone could have us mail arbitrary
    /// content to a third party (backscatter, reflection).
    pub fn unauthenticated(&self) -> bool {
        self.submitter.is_empty()
    }

    /// Does this recipient's NOTIFY ask for `action`, as far as we honour it for this message?
    pub fn wants_report(&self, notify: &str, action: Action) -> bool {
        dsn::wants(notify, action) && (action == Action::Failed || !self.unauthenticated())
    }

    /// RFC 3461 RET asked of the next hop: never the whole message back to a sender nobody
    /// vouched for.
    pub fn report_ret_onward(&self) -> i32 {
        if self.unauthenticated() { 2 } else { self.ret }
    }

    /// RFC 3461 RET for our DSNs: the whole message only when the sender is authenticated and
    /// the body is text (a binary one cannot travel inside a text report).
    pub fn report_ret(&self) -> i32 {
        if self.unauthenticated() || self.binarymime {
            2
        } else {
            self.ret
        }
    }
}

/// One recipient's result, for `record`.
#[derive(Debug, Clone)]
pub struct Result1 {
    pub rcpt: Claimed,
    pub outcome: Outcome,
    pub host: String,
    /// "none", "unverified" or "verified".
    pub tls: &'static str,
}

/// What `record` needs to decide retries and write DSNs.
pub struct Policy<'a> {
    pub retry: &'a RetryConfig,
    pub hostname: &'a str,
    pub max_full_bytes: usize,
}

fn domain_of(addr: &str) -> String {
    addr.rsplit_once('@')
        .map(|(_, d)| d)
        .unwrap_or("")
        .trim_end_matches('>')
        .to_ascii_lowercase()
}

fn state_name(s: &str) -> RecipientState {
    match s {
        "pending" => RecipientState::Pending,
        "delivering" => RecipientState::Delivering,
        "delivered" => RecipientState::Delivered,
        "deferred" => RecipientState::Deferred,
        "failed" => RecipientState::Failed,
        _ => RecipientState::Unspecified,
    }
}

pub fn parse_id(id: &str) -> Result<Uuid, ServiceError> {
    Uuid::parse_str(id.trim())
        .map_err(|_| ServiceError::InvalidArgument(format!("bad queue id {id:?}")))
}

impl Db {
    /// Store a message and its recipients; with a known idempotency key, return the first
    /// message's id and `true` instead. Commits before returning.
    pub async fn enqueue(
        &self,
        h: &EnqueueHeader,
        raw: &[u8],
    ) -> Result<(Uuid, bool), ServiceError> {
        let mut tx = self.pool.begin().await?;
        let r = insert_message(&mut tx, h, raw).await?;
        if !r.1 {
            sqlx::query("SELECT pg_notify($1, '')")
                .bind(WAKE_CHANNEL)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(r)
    }

    pub async fn get(&self, id: Uuid) -> Result<QueuedMessage, ServiceError> {
        let row = sqlx::query(
            "SELECT id, return_path, size, created, envid FROM relay.messages WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| ServiceError::NotFound(format!("queue id {id}")))?;
        let mut m = message_from_row(&row)?;
        m.recipients = self.recipients_of(id).await?;
        Ok(m)
    }

    async fn recipients_of(&self, id: Uuid) -> Result<Vec<QueuedRecipient>, ServiceError> {
        let rows = sqlx::query(
            "SELECT address, state, attempts, next_attempt, last_reply FROM relay.recipients
             WHERE message_id = $1 ORDER BY id",
        )
        .bind(id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(QueuedRecipient {
                    address: r.try_get("address")?,
                    state: state_name(r.try_get::<String, _>("state")?.as_str()) as i32,
                    attempts: r.try_get::<i32, _>("attempts")?.max(0) as u32,
                    next_attempt: r.try_get::<DateTime<Utc>, _>("next_attempt")?.timestamp(),
                    last_reply: r.try_get("last_reply")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// Messages with undelivered recipients (optionally for one domain), oldest first.
    pub async fn list(&self, domain: &str, limit: u32) -> Result<Vec<QueuedMessage>, ServiceError> {
        let limit = if limit == 0 { 100 } else { limit.min(10_000) } as i64;
        let rows = sqlx::query(
            "SELECT m.id, m.return_path, m.size, m.created, m.envid FROM relay.messages m
             WHERE EXISTS (SELECT 1 FROM relay.recipients r WHERE r.message_id = m.id
                           AND r.state IN ('pending', 'deferred', 'delivering')
                           AND ($1 = '' OR r.domain = $1))
             ORDER BY m.created, m.id LIMIT $2",
        )
        .bind(domain.to_ascii_lowercase())
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            let mut m = message_from_row(row)?;
            m.recipients = self.recipients_of(parse_id(&m.queue_id)?).await?;
            out.push(m);
        }
        Ok(out)
    }

    /// Make waiting recipients due now: of one message, of one domain, or all.
    pub async fn make_due(
        &self,
        id: Option<Uuid>,
        domain: Option<&str>,
    ) -> Result<u32, ServiceError> {
        let mut tx = self.pool.begin().await?;
        let n = sqlx::query(
            "UPDATE relay.recipients SET next_attempt = now(), updated = now()
             WHERE state IN ('pending', 'deferred')
               AND ($1::uuid IS NULL OR message_id = $1)
               AND ($2::text IS NULL OR domain = $2)",
        )
        .bind(id)
        .bind(domain.map(str::to_ascii_lowercase))
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if n > 0 {
            sqlx::query("SELECT pg_notify($1, '')")
                .bind(WAKE_CHANNEL)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        if n == 0
            && let Some(id) = id
        {
            let exists: bool =
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM relay.messages WHERE id = $1)")
                    .bind(id)
                    .fetch_one(&self.pool)
                    .await?;
            if !exists {
                return Err(ServiceError::NotFound(format!("queue id {id}")));
            }
        }
        Ok(n as u32)
    }

    /// Remove a message; with `bounce`, its unfinished recipients are reported to the sender
    /// as failed first (in the same transaction).
    pub async fn delete(
        &self,
        id: Uuid,
        bounce: bool,
        policy: &Policy<'_>,
    ) -> Result<(), ServiceError> {
        let mut tx = self.pool.begin().await?;
        let Some(msg) = load_message_tx(&mut tx, id, true).await? else {
            return Err(ServiceError::NotFound(format!("queue id {id}")));
        };
        if bounce {
            let rows = sqlx::query(
                "SELECT address, notify, orcpt FROM relay.recipients
                 WHERE message_id = $1 AND state IN ('pending', 'deferred', 'delivering')
                 ORDER BY id",
            )
            .bind(id)
            .fetch_all(&mut *tx)
            .await?;
            let mut reports = Vec::new();
            for r in &rows {
                let notify: String = r.try_get("notify")?;
                if msg.wants_report(&notify, Action::Failed) {
                    reports.push(RecipientReport {
                        address: r.try_get("address")?,
                        orcpt: r.try_get("orcpt")?,
                        action: Action::Failed,
                        diagnostic: "5.3.0 removed from the queue by the administrator".into(),
                        remote_mta: String::new(),
                        last_attempt: Utc::now(),
                        will_retry_until: None,
                    });
                }
            }
            queue_dsn(&mut tx, &msg, &reports, policy).await?;
        }
        sqlx::query("DELETE FROM relay.messages WHERE id = $1")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Claim up to `batch` due recipients (and those whose lease expired) for `worker`.
    pub async fn claim(
        &self,
        worker: Uuid,
        lease: Duration,
        batch: i64,
    ) -> Result<Vec<Claimed>, ServiceError> {
        let rows = sqlx::query(
            "WITH due AS (
                SELECT id FROM relay.recipients
                WHERE (state IN ('pending', 'deferred') AND next_attempt <= now())
                   OR (state = 'delivering' AND lease_until < now())
                ORDER BY next_attempt, id
                LIMIT $3
                FOR UPDATE SKIP LOCKED)
             UPDATE relay.recipients r
                SET state = 'delivering', lease_owner = $1,
                    lease_until = now() + make_interval(secs => $2), updated = now()
               FROM due WHERE r.id = due.id
             RETURNING r.id, r.message_id, r.address, r.domain, r.notify, r.orcpt, r.attempts",
        )
        .bind(worker)
        .bind(lease.as_secs_f64())
        .bind(batch.max(1))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Claimed {
                    id: r.try_get("id")?,
                    message_id: r.try_get("message_id")?,
                    address: r.try_get("address")?,
                    domain: r.try_get("domain")?,
                    notify: r.try_get("notify")?,
                    orcpt: r.try_get("orcpt")?,
                    attempts: r.try_get("attempts")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(Into::into)
    }

    /// Extend the lease of recipients this worker still holds.
    pub async fn renew(
        &self,
        worker: Uuid,
        ids: &[i64],
        lease: Duration,
    ) -> Result<u64, ServiceError> {
        Ok(sqlx::query(
            "UPDATE relay.recipients SET lease_until = now() + make_interval(secs => $3)
             WHERE id = ANY($2) AND lease_owner = $1 AND state = 'delivering'",
        )
        .bind(worker)
        .bind(ids)
        .bind(lease.as_secs_f64())
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    pub async fn load_message(&self, id: Uuid) -> Result<Option<MessageRow>, ServiceError> {
        let mut conn = self.pool.acquire().await?;
        let row = sqlx::query(
            "SELECT id, return_path, envid, ret, body_8bit, binarymime, smtputf8, submitter,
                    traceparent, raw, created
             FROM relay.messages WHERE id = $1",
        )
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?;
        row.map(|r| message_row(&r)).transpose().map_err(Into::into)
    }

    /// Add recipients to a queued message (remote targets of a local alias).
    pub async fn add_recipients(&self, id: Uuid, addrs: &[String]) -> Result<(), ServiceError> {
        let domains: Vec<String> = addrs.iter().map(|a| domain_of(a)).collect();
        sqlx::query(
            "INSERT INTO relay.recipients (message_id, address, domain)
             SELECT $1, a, d FROM unnest($2::text[], $3::text[]) AS t(a, d)
             ON CONFLICT (message_id, address) DO NOTHING",
        )
        .bind(id)
        .bind(addrs)
        .bind(&domains)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Record the results of one attempt, decide retries, and queue the DSNs asked for, all
    /// in one transaction. Results for recipients whose lease this worker lost are ignored:
    /// another worker owns them now. Returns how many DSNs were queued.
    pub async fn record(
        &self,
        worker: Uuid,
        msg: &MessageRow,
        results: &[Result1],
        policy: &Policy<'_>,
    ) -> Result<usize, ServiceError> {
        let mut tx = self.pool.begin().await?;
        let now = Utc::now();
        let age = (now - msg.created).to_std().unwrap_or_default();
        let lifetime = Duration::from_secs(policy.retry.max_lifetime_secs);
        let mut reports: [Vec<RecipientReport>; 3] = Default::default();
        for r in results {
            let attempts = r.rcpt.attempts + 1;
            let (state, reply, next, action) = match &r.outcome {
                Outcome::Delivered(s) => ("delivered", s.clone(), now, Some(Action::Delivered)),
                Outcome::Failed(s) => ("failed", s.clone(), now, Some(Action::Failed)),
                Outcome::Deferred(s) if age >= lifetime => (
                    "failed",
                    format!("{s} (gave up after {} s in the queue)", age.as_secs()),
                    now,
                    Some(Action::Failed),
                ),
                Outcome::Deferred(s) => {
                    let delay = policy.retry.delay_after(attempts.max(1) as u32);
                    let next = now + chrono::Duration::from_std(delay).unwrap_or_default();
                    (
                        "deferred",
                        s.clone(),
                        next.min(
                            msg.created + chrono::Duration::from_std(lifetime).unwrap_or_default(),
                        ),
                        None,
                    )
                }
            };
            let warn_delay = state == "deferred"
                && policy.retry.delay_warning_secs > 0
                && age >= Duration::from_secs(policy.retry.delay_warning_secs);
            let row = sqlx::query(
                "WITH old AS (SELECT id, delay_warned FROM relay.recipients
                              WHERE id = $1 AND lease_owner = $2 AND state = 'delivering'
                              FOR UPDATE)
                 UPDATE relay.recipients r
                    SET state = $3, attempts = $4, last_reply = $5, next_attempt = $6,
                        remote_mta = $7, lease_owner = NULL, lease_until = NULL, updated = now(),
                        delay_warned = r.delay_warned OR $8
                   FROM old WHERE r.id = old.id
                 RETURNING old.delay_warned AS was_warned",
            )
            .bind(r.rcpt.id)
            .bind(worker)
            .bind(state)
            .bind(attempts)
            .bind(&reply)
            .bind(next)
            .bind(&r.host)
            .bind(warn_delay)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(row) = row else {
                tracing::warn!(
                    rcpt = r.rcpt.id,
                    "lease lost before recording; result dropped"
                );
                continue;
            };
            let was_warned: bool = row.try_get("was_warned")?;
            sqlx::query(
                "INSERT INTO relay.attempts
                    (recipient_id, worker, host, tls, tls_verified, outcome, reply)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
            )
            .bind(r.rcpt.id)
            .bind(worker)
            .bind(&r.host)
            .bind(r.tls != "none")
            .bind(r.tls == "verified")
            .bind(state)
            .bind(&reply)
            .execute(&mut *tx)
            .await?;
            let action = match action {
                Some(a) => Some(a),
                None if warn_delay && !was_warned => Some(Action::Delayed),
                None => None,
            };
            if let Some(action) = action
                && msg.wants_report(&r.rcpt.notify, action)
            {
                let idx = match action {
                    Action::Failed => 0,
                    Action::Delayed => 1,
                    Action::Delivered => 2,
                };
                reports[idx].push(RecipientReport {
                    address: r.rcpt.address.clone(),
                    orcpt: r.rcpt.orcpt.clone(),
                    action,
                    diagnostic: reply.clone(),
                    remote_mta: r.host.clone(),
                    last_attempt: now,
                    will_retry_until: (action == Action::Delayed).then(|| {
                        msg.created + chrono::Duration::from_std(lifetime).unwrap_or_default()
                    }),
                });
            }
        }
        let mut queued = 0;
        for rep in reports.iter().filter(|r| !r.is_empty()) {
            if queue_dsn(&mut tx, msg, rep, policy).await? {
                queued += 1;
            }
        }
        tx.commit().await?;
        Ok(queued)
    }

    /// Recipients per state.
    pub async fn count_by_state(&self) -> Result<Vec<(String, i64)>, ServiceError> {
        Ok(sqlx::query_as(
            "SELECT state, count(*) FROM relay.recipients GROUP BY state ORDER BY state",
        )
        .fetch_all(&self.pool)
        .await?)
    }

    /// Forget finished messages (every recipient delivered or failed) older than `keep`.
    pub async fn purge(&self, keep: Duration) -> Result<u64, ServiceError> {
        Ok(sqlx::query(
            "DELETE FROM relay.messages m
             WHERE m.created < now() - make_interval(secs => $1)
               AND NOT EXISTS (SELECT 1 FROM relay.recipients r WHERE r.message_id = m.id
                               AND r.state IN ('pending', 'deferred', 'delivering'))",
        )
        .bind(keep.as_secs_f64())
        .execute(&self.pool)
        .await?
        .rows_affected())
    }
}

async fn insert_message(
    tx: &mut Transaction<'_, Postgres>,
    h: &EnqueueHeader,
    raw: &[u8],
) -> Result<(Uuid, bool), ServiceError> {
    let key = (!h.idempotency_key.is_empty()).then_some(h.idempotency_key.as_str());
    let id = Uuid::now_v7();
    let inserted: Option<Uuid> = sqlx::query_scalar(
        "INSERT INTO relay.messages
            (id, idempotency_key, return_path, envid, ret, submitter, traceparent, body_8bit,
             smtputf8, size, raw, binarymime)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
         ON CONFLICT (idempotency_key) DO NOTHING
         RETURNING id",
    )
    .bind(id)
    .bind(key)
    .bind(&h.return_path)
    .bind(&h.envid)
    .bind(h.ret as i16)
    .bind(&h.submitter)
    .bind(&h.traceparent)
    .bind(h.body_8bit)
    .bind(h.smtputf8)
    .bind(raw.len() as i64)
    .bind(raw)
    .bind(h.binarymime)
    .fetch_optional(&mut **tx)
    .await?;
    let Some(id) = inserted else {
        let first: Uuid =
            sqlx::query_scalar("SELECT id FROM relay.messages WHERE idempotency_key = $1")
                .bind(key)
                .fetch_one(&mut **tx)
                .await?;
        return Ok((first, true));
    };
    let addrs: Vec<String> = h.recipients.iter().map(|r| r.address.clone()).collect();
    let domains: Vec<String> = addrs.iter().map(|a| domain_of(a)).collect();
    let notify: Vec<String> = h
        .recipients
        .iter()
        .map(|r| r.notify.join(",").to_ascii_uppercase())
        .collect();
    let orcpt: Vec<String> = h.recipients.iter().map(|r| r.orcpt.clone()).collect();
    sqlx::query(
        "INSERT INTO relay.recipients (message_id, address, domain, notify, orcpt)
         SELECT $1, a, d, n, o FROM unnest($2::text[], $3::text[], $4::text[], $5::text[])
                AS t(a, d, n, o)
         ON CONFLICT (message_id, address) DO NOTHING",
    )
    .bind(id)
    .bind(&addrs)
    .bind(&domains)
    .bind(&notify)
    .bind(&orcpt)
    .execute(&mut **tx)
    .await?;
    Ok((id, false))
}

/// Queue a DSN about `msg` to its sender; never for the null reverse-path.
async fn queue_dsn(
    tx: &mut Transaction<'_, Postgres>,
    msg: &MessageRow,
    reports: &[RecipientReport],
    policy: &Policy<'_>,
) -> Result<bool, ServiceError> {
    if msg.return_path.is_empty() || reports.is_empty() {
        return Ok(false);
    }
    let message_id = format!("{}@{}", Uuid::new_v4().simple(), policy.hostname);
    let bytes = dsn::build(
        &dsn::Report {
            reporting_mta: policy.hostname,
            return_path: &msg.return_path,
            envid: &msg.envid,
            ret: msg.report_ret(),
            arrival: msg.created,
            original: &msg.raw,
            recipients: reports,
            max_full_bytes: policy.max_full_bytes,
        },
        &message_id,
    );
    let header = EnqueueHeader {
        idempotency_key: format!("dsn:{message_id}"),
        return_path: String::new(),
        recipients: vec![mailsuite_proto::EnvelopeRecipient {
            address: msg.return_path.clone(),
            notify: vec![],
            orcpt: String::new(),
        }],
        body_8bit: msg.body_8bit,
        smtputf8: msg.smtputf8,
        // The report is ours: its From: is MAILER-DAEMON@hostname, so it may be signed with
        // the hostname's own key (dkim::signing_domain), and nothing else.
        submitter: format!("MAILER-DAEMON@{}", policy.hostname),
        traceparent: mailsuite_runtime::telemetry::current_traceparent(),
        ..Default::default()
    };
    insert_message(tx, &header, &bytes).await?;
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(WAKE_CHANNEL)
        .execute(&mut **tx)
        .await?;
    Ok(true)
}

async fn load_message_tx(
    tx: &mut Transaction<'_, Postgres>,
    id: Uuid,
    lock: bool,
) -> Result<Option<MessageRow>, ServiceError> {
    let sql = if lock {
        "SELECT id, return_path, envid, ret, body_8bit, binarymime, smtputf8, submitter,
                traceparent, raw, created
         FROM relay.messages WHERE id = $1 FOR UPDATE"
    } else {
        "SELECT id, return_path, envid, ret, body_8bit, binarymime, smtputf8, submitter,
                traceparent, raw, created
         FROM relay.messages WHERE id = $1"
    };
    let row = sqlx::query(sql).bind(id).fetch_optional(&mut **tx).await?;
    row.map(|r| message_row(&r)).transpose().map_err(Into::into)
}

fn message_row(r: &sqlx::postgres::PgRow) -> Result<MessageRow, sqlx::Error> {
    Ok(MessageRow {
        id: r.try_get("id")?,
        return_path: r.try_get("return_path")?,
        envid: r.try_get("envid")?,
        ret: r.try_get::<i16, _>("ret")? as i32,
        body_8bit: r.try_get("body_8bit")?,
        binarymime: r.try_get("binarymime")?,
        smtputf8: r.try_get("smtputf8")?,
        submitter: r.try_get("submitter")?,
        traceparent: r.try_get("traceparent")?,
        raw: r.try_get("raw")?,
        created: r.try_get("created")?,
    })
}

fn message_from_row(r: &sqlx::postgres::PgRow) -> Result<QueuedMessage, ServiceError> {
    let id: Uuid = r.try_get("id")?;
    Ok(QueuedMessage {
        queue_id: id.to_string(),
        return_path: r.try_get("return_path")?,
        size: r.try_get::<i64, _>("size")?.max(0) as u64,
        created: r.try_get::<DateTime<Utc>, _>("created")?.timestamp(),
        recipients: vec![],
        envid: r.try_get("envid")?,
    })
}
