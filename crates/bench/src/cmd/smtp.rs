//! `mailbench smtp` and `mailbench seed`: C sessions share a counter of N messages; a message
//! counts when its final `250` arrives. With `--verify-imap`, one IMAP IDLE watcher per
//! recipient account sees each message arrive, so accept-to-visible latency is measured and a
//! missing message fails the run.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::{Common, Security, Users};
use crate::corpus::{self, SizeDist, Template};
use crate::imap;
use crate::procfs::CpuMeter;
use crate::report::{Latency, Report, Tally};
use crate::smtp::{self, Client, Options};

#[derive(Clone, Debug, clap::Args)]
pub struct Transport {
    /// SMTP server, host:port.
    #[arg(long, default_value = "127.0.0.1:25")]
    pub server: String,
    /// Concurrent SMTP sessions.
    #[arg(long, short = 'c', default_value_t = 10)]
    pub connections: u64,
    #[command(flatten)]
    pub security: Security,
    /// AUTH PLAIN credentials, user:pass.
    #[arg(long)]
    pub auth: Option<String>,
    /// Send MAIL, RCPT and DATA as one group when the server offers PIPELINING.
    #[arg(long)]
    pub pipelining: bool,
    #[arg(long, default_value = "loadgen@mailbench.example")]
    pub from: String,
    #[arg(long, default_value = "mailbench.test")]
    pub helo: String,
    /// Start a new session after this many messages (0: keep sessions for the whole run).
    #[arg(long, default_value_t = 0)]
    pub messages_per_connection: u64,
    /// Stop taking new messages after this many seconds.
    #[arg(long, default_value_t = 600.0)]
    pub max_duration: f64,
    /// Offered load in messages per second (default: as fast as the server accepts).
    #[arg(long)]
    pub rate: Option<f64>,
    /// Spread the start of the sessions evenly over this many seconds.
    #[arg(long, default_value_t = 0.0)]
    pub ramp_up: f64,
    /// Seed of the corpus generator.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

#[derive(Clone, Debug, clap::Args)]
pub struct Verify {
    /// After sending, check over IMAP (server host:port) that every accepted message is
    /// visible to its recipients, measuring accept-to-visible latency.
    #[arg(long, value_name = "HOST:PORT")]
    pub verify_imap: Option<String>,
    /// Use TLS from the first byte for the verifying IMAP sessions.
    #[arg(long)]
    pub verify_imap_tls: bool,
    /// How long to wait for the last message to become visible, seconds.
    #[arg(long, default_value_t = 60.0)]
    pub verify_timeout: f64,
}

#[derive(Clone, Debug, clap::Args)]
pub struct SmtpArgs {
    #[command(flatten)]
    pub transport: Transport,
    /// Messages to send.
    #[arg(long, short = 'n', default_value_t = 1000)]
    pub messages: u64,
    /// Message size in bytes (plain text).
    #[arg(long, default_value_t = 4096)]
    pub size: usize,
    /// `real`: a realistic mix of plain, multipart/alternative and attachments, 1 KB–1 MB.
    #[arg(long, value_parser = ["real"])]
    pub size_dist: Option<String>,
    /// Recipients per message, spread round-robin over the accounts.
    #[arg(long, default_value_t = 1)]
    pub recipients: u64,
    #[command(flatten)]
    pub users: Users,
    #[command(flatten)]
    pub verify: Verify,
}

#[derive(Clone, Debug, clap::Args)]
pub struct SeedArgs {
    #[command(flatten)]
    pub transport: Transport,
    #[command(flatten)]
    pub users: Users,
    /// Messages delivered to each account.
    #[arg(long, default_value_t = 100)]
    pub per_user: u64,
    /// Fixed message size instead of the realistic 1 KB–1 MB mix.
    #[arg(long)]
    pub size: Option<usize>,
    #[command(flatten)]
    pub verify: Verify,
}

struct Plan {
    transport: Transport,
    users: Users,
    verify: Verify,
    messages: u64,
    recipients: u64,
    dist: SizeDist,
    command: &'static str,
}

pub async fn run(a: SmtpArgs, common: &Common) -> anyhow::Result<(Report, bool)> {
    let dist = match a.size_dist {
        Some(_) => SizeDist::Real,
        None => SizeDist::Fixed(a.size),
    };
    let recipients = a.recipients.clamp(1, a.users.count());
    execute(
        Plan {
            transport: a.transport,
            users: a.users,
            verify: a.verify,
            messages: a.messages,
            recipients,
            dist,
            command: "smtp",
        },
        common,
    )
    .await
}

pub async fn seed(a: SeedArgs, common: &Common) -> anyhow::Result<(Report, bool)> {
    let dist = match a.size {
        Some(s) => SizeDist::Fixed(s),
        None => SizeDist::Real,
    };
    execute(
        Plan {
            messages: a.per_user * a.users.count(),
            transport: a.transport,
            users: a.users,
            verify: a.verify,
            recipients: 1,
            dist,
            command: "seed",
        },
        common,
    )
    .await
}

/// Accounts (1-based) receiving message `seq`.
pub fn recipients_of(seq: u64, per_message: u64, users: u64) -> impl Iterator<Item = u64> {
    (0..per_message).map(move |j| (seq * per_message + j) % users + 1)
}

struct Shared {
    plan: Plan,
    templates: Vec<Template>,
    run: String,
    opts: Options,
    next: AtomicU64,
    start: Instant,
    deadline: Instant,
    /// Microseconds after `start` at which message `seq` was accepted (0: not accepted).
    accepted_at: Vec<AtomicU64>,
    /// Accepted (message, recipient) pairs: what the verifier must find.
    expected: AtomicU64,
    stopped_by_deadline: AtomicBool,
    pb: indicatif::ProgressBar,
}

async fn execute(plan: Plan, common: &Common) -> anyhow::Result<(Report, bool)> {
    let t = &plan.transport;
    let (implicit, upgrade) = t.security.resolve(common, &t.server)?;
    let auth = match &t.auth {
        Some(s) => {
            let (u, p) = s
                .split_once(':')
                .ok_or_else(|| anyhow::anyhow!("--auth expects user:pass"))?;
            Some((u.to_string(), p.to_string()))
        }
        None => None,
    };
    let opts = Options {
        server: t.server.clone(),
        helo: t.helo.clone(),
        implicit_tls: implicit,
        starttls: upgrade,
        auth,
        pipelining: t.pipelining,
        timeout: common.timeout(),
    };
    let run = super::run_id();
    let n_templates = match plan.dist {
        SizeDist::Fixed(_) => 1,
        // More distinct templates than messages would only cost start-up time.
        SizeDist::Real => plan.messages.clamp(1, 200) as usize,
    };
    let templates = corpus::corpus(plan.dist, &run, n_templates, t.seed);
    let verifying = plan.verify.verify_imap.is_some();
    let accepted_at = if verifying {
        (0..plan.messages).map(|_| AtomicU64::new(0)).collect()
    } else {
        Vec::new()
    };

    // Watchers first, so they are idling before the first message is sent.
    let mut watchers = None;
    if let Some(addr) = &plan.verify.verify_imap {
        let involved = plan
            .users
            .count()
            .min(plan.messages.saturating_mul(plan.recipients))
            .max(1);
        watchers = Some(start_watchers(addr, &plan, involved, &run, common).await?);
    }

    let pb = common.progress(plan.messages, "msgs");
    let meter = CpuMeter::start(&common.pids)?;
    let start = Instant::now();
    let shared = Arc::new(Shared {
        deadline: start + Duration::from_secs_f64(plan.transport.max_duration.max(0.0)),
        plan,
        templates,
        run: run.clone(),
        opts,
        next: AtomicU64::new(0),
        start,
        accepted_at,
        expected: AtomicU64::new(0),
        stopped_by_deadline: AtomicBool::new(false),
        pb: pb.clone(),
    });
    let mut tasks = Vec::new();
    for w in 0..shared.plan.transport.connections.max(1) {
        let s = shared.clone();
        tasks.push(tokio::spawn(async move { worker(w, s).await }));
    }
    let mut tally = Tally::default();
    for t in tasks {
        tally.merge(&t.await?);
    }
    let elapsed = start.elapsed();
    pb.finish_and_clear();
    let mut report = Report::new(shared.plan.command, "messages", &tally, elapsed);
    report.cpu = meter.finish(tally.ops, elapsed);
    report.note("run", run.clone());
    report.note("connections", shared.plan.transport.connections);
    report.note("recipients_per_message", shared.plan.recipients);
    report.note(
        "message_bytes_mean",
        tally.bytes.checked_div(tally.ops).unwrap_or(0),
    );
    if let Some(r) = shared.plan.transport.rate {
        report.note("offered_rate", r);
    }
    if shared.stopped_by_deadline.load(Ordering::Relaxed) {
        report.note(
            "stopped",
            "--max-duration reached before all messages were sent",
        );
    }
    let mut ok = true;
    if let Some(w) = watchers {
        let expected = shared.expected.load(Ordering::Relaxed);
        let timeout = Duration::from_secs_f64(shared.plan.verify.verify_timeout.max(0.0));
        let v = w.collect(expected, &shared, timeout).await;
        report.note("verify_expected", expected);
        report.note("verify_visible", v.visible);
        report.note("verify_unknown", v.unknown);
        if v.visible < expected {
            report.note("verify_missing", expected - v.visible);
            ok = false;
        }
        report
            .latency
            .insert("accept_to_visible".to_string(), v.latency.summary());
    }
    Ok((report, ok))
}

async fn worker(w: u64, s: Arc<Shared>) -> Tally {
    let mut tally = Tally::default();
    let ramp = s.plan.transport.ramp_up;
    if ramp > 0.0 {
        let delay = ramp * w as f64 / s.plan.transport.connections.max(1) as f64;
        tokio::time::sleep(Duration::from_secs_f64(delay)).await;
    }
    let mut client: Option<Client> = None;
    let mut on_this_conn = 0u64;
    let mut consecutive_failures = 0u32;
    let per_conn = s.plan.transport.messages_per_connection;
    loop {
        if Instant::now() >= s.deadline {
            s.stopped_by_deadline.store(true, Ordering::Relaxed);
            break;
        }
        let seq = s.next.fetch_add(1, Ordering::Relaxed);
        if seq >= s.plan.messages {
            break;
        }
        if let Some(rate) = s.plan.transport.rate.filter(|r| *r > 0.0) {
            let due = s.start + Duration::from_secs_f64(seq as f64 / rate);
            tokio::time::sleep_until(due.into()).await;
        }
        if client.is_none() {
            match Client::connect(&s.opts).await {
                Ok(c) => {
                    client = Some(c);
                    on_this_conn = 0;
                }
                Err(e) => {
                    tally.error(format!("connect:{}", e.key()));
                    s.pb.inc(1);
                    consecutive_failures += 1;
                    // A server that keeps refusing us is down; stop instead of spinning.
                    if consecutive_failures >= 20 {
                        break;
                    }
                    continue;
                }
            }
        }
        let c = client.as_mut().expect("connected above");
        let template = &s.templates[(seq % s.templates.len() as u64) as usize];
        let id = corpus::message_id(&s.run, seq);
        let rcpts: Vec<String> = recipients_of(seq, s.plan.recipients, s.plan.users.count())
            .map(|n| s.plan.users.address(n))
            .collect();
        let t0 = Instant::now();
        match c
            .send(&s.plan.transport.from, &rcpts, &template.parts(&id))
            .await
        {
            Ok(sent) => {
                consecutive_failures = 0;
                for code in &sent.rcpt_refused {
                    tally.error(code.to_string());
                }
                if let (Some(_), Some(end), Some(done)) =
                    (&sent.reply, sent.data_end_at, sent.replied_at)
                {
                    tally.ops += 1;
                    tally.bytes += template.len() as u64;
                    tally.latency("transaction", done - t0);
                    tally.latency("data_end_to_reply", done - end);
                    let accepted = rcpts.len() - sent.rcpt_refused.len();
                    s.expected.fetch_add(accepted as u64, Ordering::Relaxed);
                    if let Some(slot) = s.accepted_at.get(seq as usize) {
                        slot.store(
                            (done - s.start).as_micros().max(1) as u64,
                            Ordering::Relaxed,
                        );
                    }
                }
            }
            Err(e) => {
                tally.error(e.key());
                // 421 closes the session (e.g. a per-session message limit): reconnect.
                if matches!(
                    e,
                    smtp::SmtpError::Io(_)
                        | smtp::SmtpError::Protocol(_)
                        | smtp::SmtpError::Reply { code: 421, .. }
                ) {
                    client = None;
                    consecutive_failures += 1;
                    if consecutive_failures >= 20 {
                        s.pb.inc(1);
                        break;
                    }
                }
            }
        }
        s.pb.inc(1);
        on_this_conn += 1;
        if per_conn > 0
            && on_this_conn >= per_conn
            && let Some(c) = client.take()
        {
            c.quit().await;
        }
    }
    if let Some(c) = client {
        c.quit().await;
    }
    tally
}

struct Watchers {
    events: mpsc::UnboundedReceiver<Event>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

enum Event {
    /// Message `seq` of this run became visible to an account.
    Visible(u64, Instant),
    /// A watcher failed; its account's messages will be missing.
    Failed(String),
}

struct Verified {
    visible: u64,
    unknown: u64,
    latency: Latency,
}

async fn start_watchers(
    addr: &str,
    plan: &Plan,
    involved: u64,
    run: &str,
    common: &Common,
) -> anyhow::Result<Watchers> {
    let tls = if plan.verify.verify_imap_tls {
        Some(common.tls.build(addr)?)
    } else {
        None
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    let mut ready = Vec::new();
    for n in 1..=involved {
        let (login, pass) = (plan.users.login(n), plan.users.pass(n));
        let (addr, tls, run, tx) = (addr.to_string(), tls.clone(), run.to_string(), tx.clone());
        let timeout = common.timeout();
        let (rtx, rrx) = tokio::sync::oneshot::channel();
        ready.push((n, rrx));
        tasks.push(tokio::spawn(async move {
            if let Err(e) = watch(&addr, tls.as_ref(), &login, &pass, &run, timeout, rtx, &tx).await
            {
                let _ = tx.send(Event::Failed(format!("{login}: {e}")));
            }
        }));
    }
    for (n, r) in ready {
        match r.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => anyhow::bail!("verify watcher for {}: {e}", plan.users.login(n)),
            Err(_) => anyhow::bail!("verify watcher for {} ended early", plan.users.login(n)),
        }
    }
    Ok(Watchers { events: rx, tasks })
}

#[allow(clippy::too_many_arguments)]
async fn watch(
    addr: &str,
    tls: Option<&crate::net::Tls>,
    login: &str,
    pass: &str,
    run: &str,
    timeout: Duration,
    ready: tokio::sync::oneshot::Sender<Result<(), String>>,
    tx: &mpsc::UnboundedSender<Event>,
) -> Result<(), imap::ImapError> {
    let setup = async {
        let mut c = imap::Client::connect(addr, tls, None, timeout).await?;
        c.capability().await?;
        c.login(login, pass).await?;
        c.capability().await?;
        let (exists, uidnext) = c.select("INBOX", true).await?;
        let mut last_uid = uidnext.map(|u| u.saturating_sub(1)).unwrap_or(0);
        if uidnext.is_none() && exists > 0 {
            c.run(&format!("FETCH {exists} (UID)"), |r| {
                if let Some(u) = imap::number_after(r, "UID") {
                    last_uid = u;
                }
            })
            .await?;
        }
        Ok::<_, imap::ImapError>((c, last_uid, exists))
    };
    let (mut c, mut last_uid, exists) = match setup.await {
        Ok(v) => v,
        Err(e) => {
            let _ = ready.send(Err(e.to_string()));
            return Ok(());
        }
    };
    let idle = c.has("IDLE");
    let _ = ready.send(Ok(()));
    // `known`: the largest EXISTS the server announced; `have`: messages accounted for. An
    // EXISTS may arrive in any response (FETCH, DONE, before IDLE's continuation), and each
    // must lead to a fetch, or the last messages of a run would never be seen.
    let mut known = exists;
    let mut have = exists;
    let note = |known: &mut u64, r: &[u8]| {
        if let Some(n) = imap::untagged_number(r, "EXISTS") {
            *known = (*known).max(n);
        }
    };
    loop {
        if known <= have {
            if idle {
                // Messages may take longer than one network timeout to arrive; idling is
                // bounded by the caller's verify timeout instead (it aborts this task).
                c.set_timeout(Duration::from_secs(3600));
                let tag = c.idle(|r| note(&mut known, r)).await?;
                while known <= have {
                    let r = c.idle_next().await?;
                    note(&mut known, &r);
                }
                c.set_timeout(timeout);
                c.idle_done(&tag, |r| note(&mut known, r)).await?;
            } else {
                c.run("NOOP", |r| note(&mut known, r)).await?;
                if known <= have {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            }
        }
        let mut seen = Vec::new();
        c.run(
            &format!(
                "UID FETCH {}:* (UID BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])",
                last_uid + 1
            ),
            |r| {
                note(&mut known, r);
                if let Some(uid) = imap::number_after(r, "UID")
                    && uid > last_uid
                {
                    seen.push((uid, corpus::parse_seq(r, run)));
                }
            },
        )
        .await?;
        if seen.is_empty() {
            // EXISTS counted something we cannot fetch (e.g. an expunge in between): resync
            // rather than spin.
            have = known;
        }
        have += seen.len() as u64;
        let now = Instant::now();
        for (uid, seq) in seen {
            last_uid = last_uid.max(uid);
            if let Some(seq) = seq {
                let _ = tx.send(Event::Visible(seq, now));
            }
        }
    }
}

impl Watchers {
    async fn collect(mut self, expected: u64, s: &Shared, timeout: Duration) -> Verified {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut v = Verified {
            visible: 0,
            unknown: 0,
            latency: Latency::default(),
        };
        let mut counted: HashMap<u64, u64> = HashMap::new();
        while v.visible < expected {
            let ev = match tokio::time::timeout_at(deadline, self.events.recv()).await {
                Ok(Some(ev)) => ev,
                _ => break,
            };
            match ev {
                Event::Visible(seq, at) => {
                    let accepted = s
                        .accepted_at
                        .get(seq as usize)
                        .map(|a| a.load(Ordering::Relaxed))
                        .unwrap_or(0);
                    if accepted == 0 {
                        // Stored but never acknowledged with 250 (e.g. a timeout): not expected.
                        v.unknown += 1;
                        continue;
                    }
                    let per_msg = counted.entry(seq).or_default();
                    if *per_msg >= s.plan.recipients {
                        v.unknown += 1;
                        continue;
                    }
                    *per_msg += 1;
                    v.visible += 1;
                    let visible_us = (at - s.start).as_micros() as u64;
                    v.latency
                        .record(Duration::from_micros(visible_us.saturating_sub(accepted)));
                }
                Event::Failed(e) => {
                    eprintln!("verify: watcher failed: {e}");
                }
            }
        }
        for t in &self.tasks {
            t.abort();
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipients_spread_round_robin() {
        let r: Vec<u64> = recipients_of(0, 3, 5).collect();
        assert_eq!(r, vec![1, 2, 3]);
        let r: Vec<u64> = recipients_of(1, 3, 5).collect();
        assert_eq!(r, vec![4, 5, 1]);
        // One recipient per message over U users gives every user the same share.
        let mut per_user = [0u32; 4];
        for seq in 0..400 {
            for u in recipients_of(seq, 1, 4) {
                per_user[(u - 1) as usize] += 1;
            }
        }
        assert_eq!(per_user, [100; 4]);
    }
}
