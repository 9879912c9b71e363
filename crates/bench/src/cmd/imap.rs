//! `mailbench imap`: C clients, each logged in to one of U seeded accounts, repeat one kind of
//! command for a fixed time or request count.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{Common, Security, Users};
use crate::imap::{self, Client};
use crate::procfs::CpuMeter;
use crate::report::{Report, Tally};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// `FETCH a:b (ENVELOPE)`; counts envelopes.
    Envelope,
    /// `FETCH n BODY.PEEK[]`; counts full bodies.
    Body,
    /// `UID SEARCH SUBJECT word`; counts searches.
    Search,
    /// `STORE a:b +FLAGS.SILENT / -FLAGS.SILENT (\Flagged)`; counts messages updated.
    Flags,
}

#[derive(Clone, Debug, clap::Args)]
pub struct ImapArgs {
    /// IMAP server, host:port.
    #[arg(long, default_value = "127.0.0.1:143")]
    pub server: String,
    #[command(flatten)]
    pub security: Security,
    #[command(flatten)]
    pub users: Users,
    /// Concurrent clients (client i logs in as account i mod U + 1).
    #[arg(long, short = 'c', default_value_t = 10)]
    pub clients: u64,
    #[arg(long, value_enum, default_value_t = Mode::Envelope)]
    pub mode: Mode,
    /// Messages per FETCH/STORE command (default: 50 for envelope and flags, 1 for body).
    #[arg(long)]
    pub batch: Option<u64>,
    /// Run for this many seconds.
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Stop after this many commands in total (whichever comes first).
    #[arg(long)]
    pub requests: Option<u64>,
    #[arg(long, default_value = "INBOX")]
    pub mailbox: String,
}

struct Shared {
    args: ImapArgs,
    implicit: Option<crate::net::Tls>,
    upgrade: Option<crate::net::Tls>,
    timeout: Duration,
    deadline: Instant,
    requests_left: AtomicU64,
    pb: indicatif::ProgressBar,
}

pub async fn run(args: ImapArgs, common: &Common) -> anyhow::Result<(Report, bool)> {
    let (implicit, upgrade) = args.security.resolve(common, &args.server)?;
    let pb = match args.requests {
        Some(n) => common.progress(n, "cmds"),
        None => common.progress((args.duration * 1000.0) as u64, "ms"),
    };
    let clients = args.clients.max(1);
    // Log in every client before the clock starts: the measurement is the steady state.
    let mut sessions = Vec::new();
    let mut login_failures = Tally::default();
    for i in 0..clients {
        let n = i % args.users.count() + 1;
        match open(
            &args,
            implicit.as_ref(),
            upgrade.as_ref(),
            common.timeout(),
            n,
        )
        .await
        {
            Ok(s) => sessions.push(s),
            Err(e) => {
                login_failures.error(format!("login:{}", e.key()));
                eprintln!("client {i}: {e}");
            }
        }
    }
    if sessions.is_empty() {
        anyhow::bail!("no IMAP client could log in and select {}", args.mailbox);
    }
    let meter = CpuMeter::start(&common.pids)?;
    let start = Instant::now();
    let shared = Arc::new(Shared {
        deadline: start + Duration::from_secs_f64(args.duration.max(0.0)),
        requests_left: AtomicU64::new(args.requests.unwrap_or(u64::MAX)),
        args,
        implicit,
        upgrade,
        timeout: common.timeout(),
        pb: pb.clone(),
    });
    let ticker = {
        let (pb, time_based) = (pb.clone(), shared.args.requests.is_none());
        tokio::spawn(async move {
            if time_based {
                loop {
                    pb.set_position(start.elapsed().as_millis() as u64);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        })
    };
    let mut tasks = Vec::new();
    for (i, s) in sessions.into_iter().enumerate() {
        let sh = shared.clone();
        tasks.push(tokio::spawn(async move { worker(i as u64, s, sh).await }));
    }
    let mut tally = login_failures;
    for t in tasks {
        tally.merge(&t.await?);
    }
    let elapsed = start.elapsed();
    ticker.abort();
    pb.finish_and_clear();
    let unit = match shared.args.mode {
        Mode::Envelope => "envelopes",
        Mode::Body => "bodies",
        Mode::Search => "searches",
        Mode::Flags => "stores",
    };
    let mut report = Report::new("imap", unit, &tally, elapsed);
    report.cpu = meter.finish(tally.ops, elapsed);
    report.note("mode", format!("{:?}", shared.args.mode).to_lowercase());
    report.note("clients", shared.args.clients);
    report.note("users", shared.args.users.count());
    report.note("batch", batch(&shared.args));
    Ok((report, true))
}

fn batch(a: &ImapArgs) -> u64 {
    a.batch
        .unwrap_or(match a.mode {
            Mode::Body | Mode::Search => 1,
            Mode::Envelope | Mode::Flags => 50,
        })
        .max(1)
}

struct Session {
    client: Client,
    exists: u64,
    account: u64,
}

async fn open(
    a: &ImapArgs,
    implicit: Option<&crate::net::Tls>,
    upgrade: Option<&crate::net::Tls>,
    timeout: Duration,
    n: u64,
) -> Result<Session, imap::ImapError> {
    let mut c = Client::connect(&a.server, implicit, upgrade, timeout).await?;
    c.login(&a.users.login(n), &a.users.pass(n)).await?;
    let (exists, _) = c.select(&a.mailbox, a.mode != Mode::Flags).await?;
    if exists == 0 {
        return Err(imap::ImapError::Protocol(format!(
            "{} of {} is empty: run `mailbench seed` first",
            a.mailbox,
            a.users.login(n)
        )));
    }
    Ok(Session {
        client: c,
        exists,
        account: n,
    })
}

async fn worker(i: u64, mut s: Session, sh: Arc<Shared>) -> Tally {
    let mut tally = Tally::default();
    let mut rng = StdRng::seed_from_u64(i);
    let batch = batch(&sh.args);
    let words = crate::corpus::search_words();
    let mut add = true;
    while Instant::now() < sh.deadline {
        if sh
            .requests_left
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1))
            .is_err()
        {
            break;
        }
        let first = rng.gen_range(1..=s.exists);
        let last = (first + batch - 1).min(s.exists);
        let cmd = match sh.args.mode {
            Mode::Envelope => format!("FETCH {first}:{last} (ENVELOPE)"),
            Mode::Body if first == last => format!("FETCH {first} BODY.PEEK[]"),
            Mode::Body => format!("FETCH {first}:{last} BODY.PEEK[]"),
            Mode::Search => format!(
                "UID SEARCH SUBJECT {}",
                words[rng.gen_range(0..words.len())]
            ),
            Mode::Flags => {
                add = !add;
                format!(
                    "STORE {first}:{last} {}FLAGS.SILENT (\\Flagged)",
                    if add { "+" } else { "-" }
                )
            }
        };
        let mut fetched = 0u64;
        let mut bytes = 0u64;
        let t0 = Instant::now();
        let r = s
            .client
            .run(&cmd, |resp| {
                bytes += resp.len() as u64;
                if imap::untagged_number(resp, "FETCH").is_some() {
                    fetched += 1;
                }
            })
            .await;
        let took = t0.elapsed();
        match r {
            Ok(_) => {
                tally.latency("command", took);
                tally.bytes += bytes;
                tally.ops += match sh.args.mode {
                    Mode::Envelope | Mode::Body => fetched,
                    Mode::Search => 1,
                    Mode::Flags => last - first + 1,
                };
            }
            Err(e) => {
                tally.error(e.key());
                if matches!(e, imap::ImapError::Io(_) | imap::ImapError::Protocol(_)) {
                    // Reconnect once; if that fails too this client is done.
                    match open(
                        &sh.args,
                        sh.implicit.as_ref(),
                        sh.upgrade.as_ref(),
                        sh.timeout,
                        s.account,
                    )
                    .await
                    {
                        Ok(n) => s = n,
                        Err(e) => {
                            tally.error(format!("login:{}", e.key()));
                            return tally;
                        }
                    }
                }
            }
        }
        if sh.args.requests.is_some() {
            sh.pb.inc(1);
        }
    }
    s.client.logout().await;
    tally
}
