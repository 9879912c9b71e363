//! Workers: claim due recipients, group them per (message, destination domain) into one
//! delivery each, deliver (locally through mailbox-store, remotely over SMTP), and record
//! the results. Any number of workers in any number of replicas share one queue: claims use
//! `FOR UPDATE SKIP LOCKED`, and a lease that is not renewed (its worker died) expires.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_resolver::TokioResolver;
use mailsuite_proto::{AddressKind, DeliverHeader, RecipientStatus};
use mailsuite_runtime::grpc::GrpcChannel;
use mailsuite_runtime::{ServiceError, Shutdown};
use mailsuite_store_client::StoreClient;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use uuid::Uuid;

use crate::config::{Config, SmarthostTls};
use crate::db::{Claimed, Db, MessageRow, Policy, Result1};
use crate::dkim::{self, Keyring};
use crate::route::{self, RouteError, Target};
use crate::smtp::{self, Outcome, SessionError, SessionParams, TlsClients, Transaction};

/// Everything a delivery needs, shared by the workers of one process.
pub struct Engine {
    pub config: Config,
    pub db: Db,
    pub keyring: Keyring,
    /// mailbox-store, for local recipients (deadline `timeouts.rpc`).
    pub store: StoreClient,
    pub tls: TlsClients,
    resolver: Mutex<Option<Arc<TokioResolver>>>,
    in_flight: Arc<Semaphore>,
    per_destination: Mutex<HashMap<String, Arc<Semaphore>>>,
    wakers: Vec<Arc<Notify>>,
    pub metrics: Metrics,
}

#[derive(Default)]
pub struct Metrics {
    pub delivered: std::sync::atomic::AtomicU64,
    pub deferred: std::sync::atomic::AtomicU64,
    pub failed: std::sync::atomic::AtomicU64,
    /// Recipients per state in the whole queue (all replicas), refreshed periodically.
    pub queue: Mutex<Vec<(String, i64)>>,
}

impl Engine {
    pub fn new(
        config: Config,
        db: Db,
        keyring: Keyring,
        store: GrpcChannel,
        tls: TlsClients,
    ) -> Arc<Engine> {
        let workers = config.workers.count.max(1);
        Arc::new(Engine {
            in_flight: Arc::new(Semaphore::new(config.workers.max_in_flight.max(1))),
            store: StoreClient::with_channel(
                store,
                Duration::from_secs(config.timeouts.rpc.max(1)),
            ),
            config,
            db,
            keyring,
            tls,
            resolver: Mutex::new(None),
            per_destination: Mutex::new(HashMap::new()),
            wakers: (0..workers).map(|_| Arc::new(Notify::new())).collect(),
            metrics: Metrics::default(),
        })
    }

    /// Make every worker of this process look for due work now.
    pub fn wake(&self) {
        for w in &self.wakers {
            w.notify_one();
        }
    }

    fn policy(&self) -> Policy<'_> {
        Policy {
            retry: &self.config.retry,
            hostname: &self.config.hostname,
            max_full_bytes: 10 * 1024 * 1024,
        }
    }

    fn resolver(&self) -> Result<Arc<TokioResolver>, RouteError> {
        let mut g = self.resolver.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = &*g {
            return Ok(r.clone());
        }
        let r = route::resolver(&self.config.dns_servers)
            .map_err(|e| RouteError::Temporary(format!("4.4.3 DNS resolver: {e}")))?;
        let r = Arc::new(r);
        *g = Some(r.clone());
        Ok(r)
    }

    fn destination_slot(&self, key: &str) -> Arc<Semaphore> {
        let mut g = self
            .per_destination
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        g.entry(key.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(self.config.workers.per_destination.max(1))))
            .clone()
    }

    /// Spawn the workers (and the wake-up listener) under `shutdown`.
    pub fn spawn(self: &Arc<Self>, shutdown: &Shutdown) {
        for i in 0..self.wakers.len() {
            let me = self.clone();
            let sd = shutdown.clone();
            shutdown.spawn(async move { me.run_worker(i, sd).await });
        }
        let me = self.clone();
        let sd = shutdown.clone();
        shutdown.spawn(async move { me.listen_for_wakeups(sd).await });
        let me = self.clone();
        let sd = shutdown.clone();
        shutdown.spawn(async move { me.count_queue(sd).await });
    }

    /// Keep the queue-size gauges of /metrics fresh.
    async fn count_queue(self: Arc<Self>, shutdown: Shutdown) {
        let every = Duration::from_secs(self.config.workers.metrics_interval_secs.max(1));
        loop {
            match self.db.count_by_state().await {
                Ok(v) => *self.metrics.queue.lock().unwrap_or_else(|e| e.into_inner()) = v,
                Err(e) => tracing::debug!("counting the queue: {e}"),
            }
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = shutdown.stopping() => return,
            }
        }
    }

    /// Replicas wake each other through PostgreSQL NOTIFY (sent in the enqueue transaction).
    async fn listen_for_wakeups(self: Arc<Self>, shutdown: Shutdown) {
        loop {
            let listener = async {
                let mut l = sqlx::postgres::PgListener::connect_with(&self.db.pool).await?;
                l.listen(crate::db::WAKE_CHANNEL).await?;
                loop {
                    l.recv().await?;
                    self.wake();
                }
                #[allow(unreachable_code)]
                Ok::<(), sqlx::Error>(())
            };
            tokio::select! {
                r = listener => {
                    if let Err(e) = r {
                        tracing::debug!("wake-up listener: {e}");
                    }
                }
                _ = shutdown.stopping() => return,
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = shutdown.stopping() => return,
            }
        }
    }

    async fn run_worker(self: Arc<Self>, index: usize, shutdown: Shutdown) {
        let worker = Uuid::new_v4();
        let waker = self.wakers[index].clone();
        let lease = Duration::from_secs(self.config.workers.lease_secs.max(1));
        let poll = Duration::from_millis(self.config.workers.poll_interval_ms.max(10));
        let mut jobs: JoinSet<()> = JoinSet::new();
        let mut last_purge = tokio::time::Instant::now();
        tracing::debug!(%worker, "relay worker started");
        loop {
            if shutdown.is_stopping() {
                break;
            }
            let mut full = false;
            if jobs.len() < self.config.workers.max_in_flight.max(1) {
                match self
                    .db
                    .claim(worker, lease, self.config.workers.batch)
                    .await
                {
                    Ok(claimed) => {
                        full = claimed.len() as i64 >= self.config.workers.batch;
                        let mut groups: BTreeMap<(Uuid, String), Vec<Claimed>> = BTreeMap::new();
                        for c in claimed {
                            groups
                                .entry((c.message_id, c.domain.clone()))
                                .or_default()
                                .push(c);
                        }
                        for ((msg, domain), rcpts) in groups {
                            let me = self.clone();
                            jobs.spawn(async move { me.job(worker, msg, domain, rcpts).await });
                        }
                    }
                    Err(e) => tracing::warn!("claiming work: {e}"),
                }
            }
            if index == 0 && last_purge.elapsed() > Duration::from_secs(60) {
                last_purge = tokio::time::Instant::now();
                if let Err(e) = self
                    .db
                    .purge(Duration::from_secs(self.config.workers.keep_finished_secs))
                    .await
                {
                    tracing::warn!("purging finished messages: {e}");
                }
            }
            if full && jobs.len() < self.config.workers.max_in_flight.max(1) {
                continue;
            }
            tokio::select! {
                _ = waker.notified() => {}
                _ = tokio::time::sleep(poll) => {}
                Some(_) = jobs.join_next(), if !jobs.is_empty() => {}
                _ = shutdown.stopping() => break,
            }
        }
        // Deliveries in progress finish their transaction; when forced, they are dropped and
        // their recipients come back after the lease expires.
        tokio::select! {
            _ = async { while jobs.join_next().await.is_some() {} } => {}
            _ = shutdown.forced() => jobs.abort_all(),
        }
    }

    /// Deliver one message to the claimed recipients of one domain, renewing the lease
    /// while it runs, then record the results.
    async fn job(self: Arc<Self>, worker: Uuid, msg_id: Uuid, domain: String, rcpts: Vec<Claimed>) {
        let ids: Vec<i64> = rcpts.iter().map(|r| r.id).collect();
        let lease = Duration::from_secs(self.config.workers.lease_secs.max(1));
        let renew = async {
            loop {
                tokio::time::sleep(lease / 3).await;
                if let Err(e) = self.db.renew(worker, &ids, lease).await {
                    tracing::warn!("renewing lease: {e}");
                }
            }
        };
        // A trace of its own (attempts happen long after the accepting transaction), linked
        // back to the transaction's trace through the stored traceparent.
        let span = tracing::info_span!(
            parent: None,
            "relay.delivery",
            otel.kind = "client",
            queue_id = %msg_id,
            domain = %domain,
            recipients = rcpts.len(),
        );
        let link_to = span.clone();
        let work = async {
            let _slot = self.in_flight.clone().acquire_owned().await;
            let msg = match self.db.load_message(msg_id).await {
                Ok(Some(m)) => m,
                Ok(None) => return, // deleted meanwhile
                Err(e) => {
                    tracing::warn!(%msg_id, "loading message: {e}");
                    return;
                }
            };
            mailsuite_runtime::telemetry::link_to_traceparent(&link_to, &msg.traceparent);
            let results = self.deliver(&msg, &domain, rcpts).await;
            for r in &results {
                let m = match r.outcome {
                    Outcome::Delivered(_) => &self.metrics.delivered,
                    Outcome::Deferred(_) => &self.metrics.deferred,
                    Outcome::Failed(_) => &self.metrics.failed,
                };
                m.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let result = match r.outcome {
                    Outcome::Delivered(_) => "delivered",
                    Outcome::Deferred(_) => "deferred",
                    Outcome::Failed(_) => "bounced",
                };
                mailsuite_runtime::metrics::counter(
                    "mailsuite_queue_deliveries_total",
                    &[("result", result)],
                )
                .inc();
                tracing::info!(queue_id = %msg.id, rcpt = %r.rcpt.address, host = %r.host,
                    tls = r.tls, outcome = ?r.outcome, "delivery attempt");
            }
            // Mail already handed over must not be sent twice because the database blinked:
            // retry the bookkeeping while the lease lasts (after that, another worker owns
            // the recipients and will deliver again — at least once, never lost).
            let mut pause = Duration::from_millis(250);
            let started = tokio::time::Instant::now();
            loop {
                let recorded = {
                    let _t = mailsuite_runtime::metrics::db_timer("relay_record");
                    self.db.record(worker, &msg, &results, &self.policy()).await
                };
                match recorded {
                    Ok(dsns) => {
                        if dsns > 0 {
                            self.wake();
                        }
                        break;
                    }
                    Err(e) if e.is_temporary() && started.elapsed() + pause < lease / 2 => {
                        tracing::warn!(%msg_id, "recording results (will retry): {e}");
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(5));
                    }
                    Err(e) => {
                        tracing::error!(%msg_id, "recording results: {e}");
                        break;
                    }
                }
            }
        };
        tokio::select! {
            _ = tracing::Instrument::instrument(work, span) => {}
            _ = renew => {}
        }
    }

    async fn deliver(&self, msg: &MessageRow, domain: &str, rcpts: Vec<Claimed>) -> Vec<Result1> {
        let all = |o: Outcome, host: &str, rcpts: Vec<Claimed>| -> Vec<Result1> {
            rcpts
                .into_iter()
                .map(|rcpt| Result1 {
                    rcpt,
                    outcome: o.clone(),
                    host: host.to_string(),
                    tls: "none",
                })
                .collect()
        };
        let received = count_received(&msg.raw);
        if received > self.config.limits.max_received_headers {
            return all(
                Outcome::Failed(format!(
                    "5.4.6 routing loop detected ({received} Received: header fields)"
                )),
                "",
                rcpts,
            );
        }
        // A configured route wins; otherwise ask the store whether we host the domain.
        if let Some(route) = self.config.transports.get(domain) {
            return self
                .deliver_remote_static(msg, domain, route, false, rcpts)
                .await;
        }
        match self.is_local(&rcpts[0].address).await {
            Ok(true) => return self.deliver_local(msg, rcpts).await,
            Ok(false) => {}
            Err(e) => {
                return all(
                    Outcome::Deferred(format!("4.4.3 directory unavailable: {e}")),
                    "",
                    rcpts,
                );
            }
        }
        if !self.config.smarthost.is_empty() {
            let route = self.config.smarthost.clone();
            return self
                .deliver_remote_static(msg, domain, &route, true, rcpts)
                .await;
        }
        let resolver = match self.resolver() {
            Ok(r) => r,
            Err(RouteError::Temporary(e)) | Err(RouteError::Permanent(e)) => {
                return all(Outcome::Deferred(e), "", rcpts);
            }
        };
        let rpc = Duration::from_secs(self.config.timeouts.rpc.max(1));
        let targets = match tokio::time::timeout(
            rpc,
            route::mx_targets(
                &resolver,
                domain,
                self.config.limits.max_mx_hosts,
                self.config.mx_port,
            ),
        )
        .await
        {
            Ok(Ok(t)) if self.config.allow_private_mx_addresses => t,
            Ok(Ok(t)) => match route::public_only(domain, t) {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(%domain, "MX refused: {e}");
                    return all(Outcome::Deferred(e), "", rcpts);
                }
            },
            Ok(Err(RouteError::Permanent(e))) => return all(Outcome::Failed(e), "", rcpts),
            Ok(Err(RouteError::Temporary(e))) => return all(Outcome::Deferred(e), "", rcpts),
            Err(_) => {
                return all(
                    Outcome::Deferred(format!("4.4.3 DNS timeout for {domain}")),
                    "",
                    rcpts,
                );
            }
        };
        self.deliver_smtp(msg, domain, &targets, false, rcpts).await
    }

    async fn deliver_remote_static(
        &self,
        msg: &MessageRow,
        domain: &str,
        route: &str,
        is_smarthost: bool,
        rcpts: Vec<Claimed>,
    ) -> Vec<Result1> {
        let default_port = if is_smarthost {
            self.config.smarthost_tls.default_port()
        } else {
            25
        };
        match route::static_target(route, default_port).await {
            Ok(t) => {
                self.deliver_smtp(msg, domain, &[t], is_smarthost, rcpts)
                    .await
            }
            Err(RouteError::Temporary(e)) | Err(RouteError::Permanent(e)) => rcpts
                .into_iter()
                .map(|rcpt| Result1 {
                    rcpt,
                    outcome: Outcome::Deferred(e.clone()),
                    host: route.to_string(),
                    tls: "none",
                })
                .collect(),
        }
    }

    async fn is_local(&self, address: &str) -> Result<bool, ServiceError> {
        Ok(self.store.resolve(address).await?.kind() != AddressKind::Remote)
    }

    /// One Deliver call per recipient, keyed by (message, recipient address): the key must not
    /// depend on how a claim happened to group recipients, or a re-claim after an expired lease
    /// (Deliver committed, our state update lost) could store the message a second time.
    async fn deliver_local(&self, msg: &MessageRow, rcpts: Vec<Claimed>) -> Vec<Result1> {
        let host = "mailbox-store";
        let mut out = Vec::with_capacity(rcpts.len());
        let mut remote_targets = Vec::new();
        for rcpt in rcpts {
            let (outcome, targets) = self.deliver_local_one(msg, &rcpt).await;
            remote_targets.extend(targets);
            out.push(Result1 {
                rcpt,
                outcome,
                host: host.into(),
                tls: "none",
            });
        }
        if !remote_targets.is_empty() {
            // Aliases pointing outside: relay those targets as new recipients of this message.
            // If that fails, retry all: the store's idempotency key makes the local part a no-op.
            if let Err(e) = self.db.add_recipients(msg.id, &remote_targets).await {
                for r in out.iter_mut() {
                    r.outcome = Outcome::Deferred(format!("4.3.0 queueing alias targets: {e}"));
                }
            }
        }
        out
    }

    async fn deliver_local_one(&self, msg: &MessageRow, rcpt: &Claimed) -> (Outcome, Vec<String>) {
        let header = DeliverHeader {
            idempotency_key: local_delivery_key(msg.id, &rcpt.address),
            return_path: msg.return_path.clone(),
            recipients: vec![rcpt.address.clone()],
            size_hint: msg.raw.len() as u64,
            add_delivery_headers: true,
            ..Default::default()
        };
        let body = bytes::Bytes::copy_from_slice(&msg.raw);
        let resp = match self.store.deliver(header, body).await {
            Ok(r) => r,
            Err(e) => {
                let o = match &e {
                    ServiceError::OverQuota {
                        permanent: true, ..
                    }
                    | ServiceError::TooLarge(_) => Outcome::Failed(format!("5.2.2 {e}")),
                    // A deadline passed is ServiceError::Unavailable: retried later, as any
                    // temporary trouble.
                    _ => Outcome::Deferred(format!("4.3.0 local delivery: {e}")),
                };
                return (o, Vec::new());
            }
        };
        let wanted = rcpt.address.to_ascii_lowercase();
        let Some(r) = resp
            .results
            .into_iter()
            .find(|r| r.recipient.to_ascii_lowercase() == wanted)
        else {
            return (
                Outcome::Deferred("4.3.0 no result from the mailbox store".into()),
                Vec::new(),
            );
        };
        match r.status() {
            RecipientStatus::Delivered => {
                let o = Outcome::Delivered(format!(
                    "250 2.0.0 delivered to {}",
                    if r.delivered_to.is_empty() {
                        rcpt.address.clone()
                    } else {
                        r.delivered_to.join(", ")
                    }
                ));
                (o, r.remote_targets)
            }
            RecipientStatus::Unknown => (
                Outcome::Failed("550 5.1.1 no such user here".into()),
                Vec::new(),
            ),
            RecipientStatus::OverQuota => (
                Outcome::Deferred("452 4.2.2 mailbox full".into()),
                Vec::new(),
            ),
            RecipientStatus::Disabled => (
                Outcome::Failed("550 5.2.1 mailbox disabled".into()),
                Vec::new(),
            ),
            RecipientStatus::Remote => {
                let o = Outcome::Delivered(format!(
                    "250 2.1.5 forwarded to {}",
                    r.remote_targets.join(", ")
                ));
                (o, r.remote_targets)
            }
            RecipientStatus::Unspecified => (
                Outcome::Deferred("4.3.0 unexpected result from the mailbox store".into()),
                Vec::new(),
            ),
        }
    }

    async fn deliver_smtp(
        &self,
        msg: &MessageRow,
        domain: &str,
        targets: &[Target],
        smarthost: bool,
        rcpts: Vec<Claimed>,
    ) -> Vec<Result1> {
        let dest = if smarthost {
            "smarthost".to_string()
        } else {
            domain.to_string()
        };
        let _slot = self.destination_slot(&dest).acquire_owned().await;
        let fail_all = |rcpts: Vec<Claimed>, text: String| -> Vec<Result1> {
            rcpts
                .into_iter()
                .map(|rcpt| Result1 {
                    rcpt,
                    outcome: Outcome::Failed(text.clone()),
                    host: String::new(),
                    tls: "none",
                })
                .collect()
        };
        let return_path = match smtp::smtp_path(&msg.return_path) {
            Ok(p) => p,
            Err(e) => return fail_all(rcpts, format!("5.1.7 bad sender address: {e}")),
        };
        // An address that cannot be written safely fails alone; the others go on.
        let mut refused = Vec::new();
        let mut sendable = Vec::with_capacity(rcpts.len());
        let mut addrs = Vec::with_capacity(rcpts.len());
        for r in rcpts {
            match smtp::smtp_path(&r.address) {
                Ok(p) => {
                    addrs.push(p);
                    sendable.push(r);
                }
                Err(e) => refused.push(Result1 {
                    rcpt: r,
                    outcome: Outcome::Failed(format!("5.1.3 bad recipient address: {e}")),
                    host: String::new(),
                    tls: "none",
                }),
            }
        }
        if sendable.is_empty() {
            return refused;
        }
        let envelope = Envelope {
            return_path,
            paths: addrs,
            rcpts: sendable,
        };
        let mut results = self
            .deliver_envelope(msg, domain, targets, smarthost, envelope)
            .await;
        results.extend(refused);
        results
    }

    async fn deliver_envelope(
        &self,
        msg: &MessageRow,
        domain: &str,
        targets: &[Target],
        smarthost: bool,
        envelope: Envelope,
    ) -> Vec<Result1> {
        let Envelope {
            return_path,
            paths: addrs,
            rcpts,
        } = envelope;
        // A binary body is relayed octet for octet (BDAT); any other is sent with CRLF line
        // ends, and the signature must cover exactly the bytes sent.
        let body: std::borrow::Cow<'_, [u8]> = if msg.binarymime {
            std::borrow::Cow::Borrowed(&msg.raw)
        } else {
            smtp::crlf_normalised(&msg.raw)
        };
        let mut signed = match dkim::signing_domain(&body, &msg.submitter) {
            Some(d) => self.keyring.sign(&body, &d),
            None => Vec::new(),
        };
        signed.extend_from_slice(&body);
        let unauthenticated = msg.unauthenticated();
        let params: Vec<String> = rcpts
            .iter()
            .map(|r| rcpt_params(r, unauthenticated))
            .collect();
        let envid = xtext(&msg.envid);
        let tx = Transaction {
            return_path: &return_path,
            recipients: &addrs,
            rcpt_params: &params,
            message: &signed,
            body_8bit: msg.body_8bit,
            binarymime: msg.binarymime,
            smtputf8: msg.smtputf8,
            envid: &envid,
            ret: msg.report_ret_onward(),
        };
        // The smarthost gets our credentials and all our mail: TLS always, verified always.
        let require_tls = smarthost
            || self
                .config
                .require_tls_domains
                .iter()
                .any(|d| d.eq_ignore_ascii_case(domain));
        let auth = (smarthost && !self.config.smarthost_user.is_empty()).then(|| {
            (
                self.config.smarthost_user.clone(),
                self.config.smarthost_password.clone(),
            )
        });
        let mut last_err = String::from("4.4.1 no host to try");
        let mut last_host = String::new();
        for t in targets {
            for addr in &t.addrs {
                let p = SessionParams {
                    helo_name: self.config.hostname.clone(),
                    tls_name: t.name.clone(),
                    require_tls,
                    allow_invalid_opportunistic: self.config.tls_allow_invalid_opportunistic,
                    tls: self.tls.clone(),
                    timeouts: self.config.timeouts.clone(),
                    max_reply: self.config.limits.max_reply_bytes,
                    auth: auth.clone(),
                    smarthost,
                    implicit_tls: smarthost && self.config.smarthost_tls == SmarthostTls::Implicit,
                    insecure_tls: smarthost && self.config.smarthost_tls_insecure_skip_verify,
                };
                last_host = format!("{} ({})", t.name, addr);
                match smtp::deliver(*addr, &p, &tx).await {
                    Ok(report) => {
                        return rcpts
                            .into_iter()
                            .zip(report.outcomes)
                            .map(|(rcpt, outcome)| Result1 {
                                rcpt,
                                outcome,
                                host: t.name.clone(),
                                tls: report.tls,
                            })
                            .collect();
                    }
                    Err(e) if e.is_permanent() => {
                        let text = match &e {
                            SessionError::Refused(r) => r.to_string(),
                            other => other.to_string(),
                        };
                        return rcpts
                            .into_iter()
                            .map(|rcpt| Result1 {
                                rcpt,
                                outcome: Outcome::Failed(text.clone()),
                                host: t.name.clone(),
                                tls: "none",
                            })
                            .collect();
                    }
                    Err(e) => {
                        tracing::info!(host = %last_host, "delivery attempt failed: {e}");
                        last_err = match e {
                            SessionError::Refused(r) => r.to_string(),
                            other => format!("4.4.1 {}: {other}", t.name),
                        };
                    }
                }
            }
        }
        rcpts
            .into_iter()
            .map(|rcpt| Result1 {
                rcpt,
                outcome: Outcome::Deferred(last_err.clone()),
                host: last_host.clone(),
                tls: "none",
            })
            .collect()
    }
}

/// The SMTP envelope of one transaction, every address already checked and quoted for the
/// wire (`smtp::smtp_path`); `paths` is parallel to `rcpts`.
struct Envelope {
    return_path: String,
    paths: Vec<String>,
    rcpts: Vec<Claimed>,
}

/// RFC 3461 NOTIFY/ORCPT parameters to pass on. For unauthenticated (forwarded MX) mail the
/// next hop is not asked for SUCCESS or DELAY reports either: they would go to a sender
/// nobody vouched for, just as ours would.
fn rcpt_params(r: &Claimed, unauthenticated: bool) -> String {
    let mut p = Vec::new();
    let notify = if unauthenticated {
        onward_notify_unauthenticated(&r.notify)
    } else {
        r.notify.clone()
    };
    if !notify.is_empty() {
        p.push(format!("NOTIFY={notify}"));
    }
    if !r.orcpt.is_empty() {
        p.push(format!("ORCPT={}", r.orcpt));
    }
    p.join(" ")
}

/// NOTIFY without SUCCESS and DELAY; what asked only for those now asks for nothing (NEVER).
fn onward_notify_unauthenticated(notify: &str) -> String {
    if notify.is_empty() {
        return String::new();
    }
    let kept: Vec<&str> = notify
        .split(',')
        .map(str::trim)
        .filter(|w| w.eq_ignore_ascii_case("FAILURE") || w.eq_ignore_ascii_case("NEVER"))
        .collect();
    if kept.is_empty() {
        "NEVER".into()
    } else {
        kept.join(",")
    }
}

/// RFC 3461 §4 xtext for ENVID.
fn xtext(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (33..=126).contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

/// Received: fields in the header section (loop detection).
pub fn count_received(raw: &[u8]) -> usize {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .or_else(|| raw.windows(2).position(|w| w == b"\n\n"))
        .unwrap_or(raw.len());
    let header = &raw[..end];
    let mut n = 0;
    let mut at_start = true;
    for (i, &b) in header.iter().enumerate() {
        if at_start && header.len() - i >= 9 && header[i..i + 9].eq_ignore_ascii_case(b"received:")
        {
            n += 1;
        }
        at_start = b == b'\n';
    }
    n
}

/// The store's idempotency key for one local recipient of a queued message; addresses compare
/// case-insensitively, like the store's own recipient matching.
pub(crate) fn local_delivery_key(message: Uuid, address: &str) -> String {
    format!("relay:{message}:{}", address.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn received_fields_are_counted_in_the_header_only() {
        let m =
            b"Received: a\r\nreceived: b\r\n\tcontinued\r\nSubject: x\r\n\r\nReceived: body\r\n";
        assert_eq!(count_received(m), 2);
    }

    #[test]
    fn l6_onward_notify_of_unauthenticated_mail_keeps_only_failure() {
        assert_eq!(onward_notify_unauthenticated(""), "");
        assert_eq!(onward_notify_unauthenticated("SUCCESS"), "NEVER");
        assert_eq!(onward_notify_unauthenticated("SUCCESS,DELAY"), "NEVER");
        assert_eq!(
            onward_notify_unauthenticated("SUCCESS,FAILURE,DELAY"),
            "FAILURE"
        );
        assert_eq!(onward_notify_unauthenticated("NEVER"), "NEVER");
    }

    #[test]
    fn xtext_encodes_specials() {
        assert_eq!(xtext("a+b=c d"), "a+2Bb+3Dc+20d");
    }
}
