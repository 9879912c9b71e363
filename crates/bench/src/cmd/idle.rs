//! `mailbench idle`: hold N logged-in IDLE sessions, measure the server's memory per session
//! (RSS/PSS of `--server-pid`, baseline taken before the first connection), then deliver
//! messages over SMTP and time how long each takes to reach every watcher.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, mpsc};

use super::{Common, Security, Users};
use crate::corpus::{self, SizeDist};
use crate::imap::{self, Client};
use crate::procfs::{CpuMeter, read_smaps};
use crate::report::{Latency, Memory, Report, Tally};

#[derive(Clone, Debug, clap::Args)]
pub struct IdleArgs {
    /// IMAP server, host:port.
    #[arg(long, default_value = "127.0.0.1:143")]
    pub server: String,
    #[command(flatten)]
    pub security: Security,
    #[command(flatten)]
    pub users: Users,
    /// IDLE sessions to hold (session i watches account i mod U + 1).
    #[arg(long, short = 'n', default_value_t = 100)]
    pub connections: u64,
    /// Sessions being set up at once.
    #[arg(long, default_value_t = 100)]
    pub ramp: usize,
    /// Process id of the IMAP server, for RSS/PSS per session from /proc/PID/smaps_rollup.
    #[arg(long)]
    pub server_pid: Option<u32>,
    /// SMTP server that delivers the test messages (host:port); without it only memory is
    /// measured.
    #[arg(long, value_name = "HOST:PORT")]
    pub smtp: Option<String>,
    /// Messages to deliver, one after the other, each to every watched account.
    #[arg(long, default_value_t = 3)]
    pub deliveries: u64,
    #[arg(long, default_value = "loadgen@mailbench.example")]
    pub from: String,
    /// Seconds to wait for a delivery to reach all watchers.
    #[arg(long, default_value_t = 30.0)]
    pub notify_timeout: f64,
}

pub async fn run(args: IdleArgs, common: &Common) -> anyhow::Result<(Report, bool)> {
    let (implicit, upgrade) = args.security.resolve(common, &args.server)?;
    let n = args.connections.max(1);
    let before = match args.server_pid {
        Some(pid) => {
            Some(read_smaps(pid).map_err(|e| anyhow::anyhow!("smaps_rollup of {pid}: {e}"))?)
        }
        None => None,
    };
    let pb = common.progress(n, "sessions");
    let (tx, mut rx) = mpsc::unbounded_channel::<(u64, Instant)>();
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel::<Result<(), String>>();
    let gate = Arc::new(Semaphore::new(args.ramp.max(1)));
    let setup_start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..n {
        let account = i % args.users.count() + 1;
        let (login, pass) = (args.users.login(account), args.users.pass(account));
        let (server, implicit, upgrade) = (args.server.clone(), implicit.clone(), upgrade.clone());
        let (tx, ready_tx, gate, timeout) =
            (tx.clone(), ready_tx.clone(), gate.clone(), common.timeout());
        tasks.push(tokio::spawn(async move {
            let permit = gate.acquire_owned().await;
            let setup = async {
                let mut c =
                    Client::connect(&server, implicit.as_ref(), upgrade.as_ref(), timeout).await?;
                c.login(&login, &pass).await?;
                let (exists, _) = c.select("INBOX", true).await?;
                c.idle(|_| {}).await?;
                Ok::<_, imap::ImapError>((c, exists))
            };
            let (mut c, mut exists) = match setup.await {
                Ok(v) => v,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.key()));
                    return;
                }
            };
            drop(permit);
            let _ = ready_tx.send(Ok(()));
            // Idle sessions are quiet by design: no read timeout, the run aborts this task.
            c.set_timeout(Duration::from_secs(24 * 3600));
            while let Ok(r) = c.idle_next().await {
                if let Some(e) = imap::untagged_number(&r, "EXISTS")
                    && e > exists
                {
                    exists = e;
                    let _ = tx.send((i, Instant::now()));
                }
            }
        }));
    }
    drop(ready_tx);
    let mut tally = Tally::default();
    let mut idling = 0u64;
    while let Some(r) = ready_rx.recv().await {
        match r {
            Ok(()) => idling += 1,
            Err(k) => tally.error(format!("setup:{k}")),
        }
        pb.inc(1);
        if idling + tally.error_total() == n {
            break;
        }
    }
    let setup_time = setup_start.elapsed();
    pb.finish_and_clear();
    let memory = match (args.server_pid, before) {
        (Some(pid), Some(b)) => Some(Memory::new(pid, idling, b, read_smaps(pid)?)),
        _ => None,
    };

    let meter = CpuMeter::start(&common.pids)?;
    let start = Instant::now();
    let mut ok = idling == n;
    let mut notify = Latency::default();
    let mut all = Latency::default();
    if let Some(smtp_addr) = &args.smtp {
        let run_id = super::run_id();
        let template = &corpus::corpus(SizeDist::Fixed(4096), &run_id, 1, 1)[0];
        let opts = crate::smtp::Options {
            server: smtp_addr.clone(),
            helo: "mailbench.test".into(),
            implicit_tls: None,
            starttls: None,
            auth: None,
            pipelining: true,
            timeout: common.timeout(),
        };
        let mut smtp = crate::smtp::Client::connect(&opts).await?;
        let watched: Vec<String> = (1..=args.users.count().min(n))
            .map(|a| args.users.address(a))
            .collect();
        for d in 0..args.deliveries {
            let id = corpus::message_id(&run_id, d);
            let mut t0 = None;
            // Stay within common per-message recipient limits.
            for chunk in watched.chunks(100) {
                let sent = smtp.send(&args.from, chunk, &template.parts(&id)).await?;
                t0.get_or_insert(sent.data_end_at.unwrap_or_else(Instant::now));
                for c in sent.rcpt_refused {
                    tally.error(c.to_string());
                }
            }
            let t0 = t0.expect("at least one chunk");
            let deadline =
                tokio::time::Instant::now() + Duration::from_secs_f64(args.notify_timeout);
            let mut seen = vec![false; n as usize];
            let mut got = 0u64;
            let mut last = t0;
            while got < idling {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some((i, at))) => {
                        if !seen[i as usize] {
                            seen[i as usize] = true;
                            got += 1;
                            notify.record(at.saturating_duration_since(t0));
                            last = last.max(at);
                        }
                    }
                    _ => break,
                }
            }
            tally.ops += got;
            if got < idling {
                tally.error("not-notified");
                ok = false;
            } else {
                all.record(last - t0);
            }
        }
        smtp.quit().await;
    }
    let elapsed = start.elapsed();
    for t in &tasks {
        t.abort();
    }
    let mut report = Report::new("idle", "notifications", &tally, elapsed);
    report
        .latency
        .insert("notify_each".into(), notify.summary());
    report.latency.insert("notify_all".into(), all.summary());
    report.memory = memory;
    report.cpu = meter.finish(tally.ops, elapsed);
    report.note("sessions_requested", n);
    report.note("sessions_idling", idling);
    report.note("setup_secs", setup_time.as_secs_f64());
    report.note(
        "deliveries",
        if args.smtp.is_some() {
            args.deliveries
        } else {
            0
        },
    );
    Ok((report, ok))
}
