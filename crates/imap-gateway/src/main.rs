use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use mailsuite_imap_gateway::Config;
use mailsuite_runtime::config::{ConfigArgs, load};
use mailsuite_runtime::{Shutdown, shutdown, telemetry};

/// mailsuite IMAP gateway: IMAP on 143 (STARTTLS) and 993 (implicit TLS) in front of
/// mailbox-store.
#[derive(Debug, Parser)]
#[command(name = "imap-gateway", version, about)]
struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    /// Log as JSON lines.
    #[arg(long, env = "MAILSUITE_LOG_JSON")]
    log_json: bool,
    /// Seconds that busy sessions get to finish on SIGTERM before they are cut off.
    #[arg(long, default_value_t = 30)]
    grace_secs: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut signals = shutdown::Signals::install()?;
    let config: Config = load(&args.config.sources()).context("configuration")?;
    let _telemetry = telemetry::init("imap-gateway", args.log_json);
    let sd = Shutdown::new();
    let started = mailsuite_imap_gateway::start(config, sd.clone())
        .await
        .context("starting imap-gateway")?;
    tracing::info!(?started, "imap-gateway started");
    signals.recv().await;
    tracing::info!("shutting down");
    sd.drain(Duration::from_secs(args.grace_secs)).await;
    Ok(())
}
