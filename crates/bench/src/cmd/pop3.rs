//! `mailbench pop3`: download whole maildrops (up to N messages each), C accounts at a time,
//! timing connect-to-QUIT of each download.

use std::time::{Duration, Instant};

use super::{Common, Security, Users};
use crate::pop3::{Client, Pop3Error};
use crate::procfs::CpuMeter;
use crate::report::{Report, Tally};

#[derive(Clone, Debug, clap::Args)]
pub struct Pop3Args {
    /// POP3 server, host:port.
    #[arg(long, default_value = "127.0.0.1:110")]
    pub server: String,
    #[command(flatten)]
    pub security: Security,
    #[command(flatten)]
    pub users: Users,
    /// Messages to download per maildrop (RETR 1..N); fewer present is an error.
    #[arg(long, short = 'n', default_value_t = 1000)]
    pub messages: u64,
    /// Concurrent downloads (download k of slot s uses account (k * C + s) mod U + 1).
    #[arg(long, short = 'c', default_value_t = 1)]
    pub connections: u64,
    /// Downloads per connection slot.
    #[arg(long, default_value_t = 3)]
    pub iterations: u64,
    /// RETR commands in flight when the server offers PIPELINING.
    #[arg(long, default_value_t = 32)]
    pub window: usize,
}

pub async fn run(args: Pop3Args, common: &Common) -> anyhow::Result<(Report, bool)> {
    let (implicit, upgrade) = args.security.resolve(common, &args.server)?;
    let slots = args.connections.max(1);
    let pb = common.progress(slots * args.iterations.max(1), "maildrops");
    let meter = CpuMeter::start(&common.pids)?;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for slot in 0..slots {
        let (args, implicit, upgrade, pb) =
            (args.clone(), implicit.clone(), upgrade.clone(), pb.clone());
        let timeout = common.timeout();
        tasks.push(tokio::spawn(async move {
            let mut tally = Tally::default();
            for k in 0..args.iterations.max(1) {
                // Successive downloads rotate over the accounts: a server may keep a maildrop
                // locked for a moment after QUIT, and that is not what this measures.
                let account = (k * slots + slot) % args.users.count() + 1;
                let t0 = Instant::now();
                match download(&args, implicit.as_ref(), upgrade.as_ref(), timeout, account).await {
                    Ok((msgs, bytes)) => {
                        tally.latency("maildrop", t0.elapsed());
                        tally.ops += msgs;
                        tally.bytes += bytes;
                    }
                    Err(e) => tally.error(e.key()),
                }
                pb.inc(1);
            }
            tally
        }));
    }
    let mut tally = Tally::default();
    for t in tasks {
        tally.merge(&t.await?);
    }
    let elapsed = start.elapsed();
    pb.finish_and_clear();
    let mut report = Report::new("pop3", "messages", &tally, elapsed);
    report.cpu = meter.finish(tally.ops, elapsed);
    report.note("messages_per_maildrop", args.messages);
    report.note("connections", slots);
    Ok((report, tally.error_total() == 0))
}

async fn download(
    a: &Pop3Args,
    implicit: Option<&crate::net::Tls>,
    upgrade: Option<&crate::net::Tls>,
    timeout: Duration,
    account: u64,
) -> Result<(u64, u64), Pop3Error> {
    let mut c = Client::connect(&a.server, implicit, upgrade, timeout).await?;
    c.capa().await?;
    c.login(&a.users.login(account), &a.users.pass(account))
        .await?;
    let (count, _) = c.stat().await?;
    if count < a.messages {
        return Err(Pop3Error::Protocol(format!(
            "maildrop of {} has {count} messages, fewer than --messages {}",
            a.users.login(account),
            a.messages
        )));
    }
    let numbers: Vec<u64> = (1..=a.messages).collect();
    let mut bytes = 0u64;
    c.retr_many(&numbers, a.window, |_, size| bytes += size as u64)
        .await?;
    c.quit().await?;
    Ok((a.messages, bytes))
}
