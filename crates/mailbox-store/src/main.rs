//! `mailbox-store`: the store service binary.

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use mailsuite_mailbox_store::Config;
use mailsuite_runtime::config::{self, ConfigArgs};
use mailsuite_runtime::{Shutdown, shutdown, telemetry};

/// mailsuite mailbox-store: accounts, mailboxes and messages in PostgreSQL, served over gRPC.
#[derive(Parser, Debug)]
#[command(name = "mailbox-store", version)]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
    /// Log lines as JSON (`--json-logs` is the old spelling).
    #[arg(long = "log-json", alias = "json-logs", env = "MAILSUITE_LOG_JSON")]
    json_logs: bool,
    /// Seconds to let open calls finish after SIGTERM.
    #[arg(long, default_value_t = 10)]
    grace_seconds: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut signals = shutdown::Signals::install()?;
    let _telemetry = telemetry::init("mailbox-store", cli.json_logs);
    mailsuite_runtime::tls::install_crypto_provider();
    let cfg: Config = config::load(&cli.config.sources()).context("loading configuration")?;
    let sd = Shutdown::new();
    let started = mailsuite_mailbox_store::start(cfg, sd.clone())
        .await
        .context("starting mailbox-store")?;
    eprintln!("mailbox-store: gRPC on {}", started.grpc);
    signals.recv().await;
    sd.drain(Duration::from_secs(cli.grace_seconds)).await;
    Ok(())
}
