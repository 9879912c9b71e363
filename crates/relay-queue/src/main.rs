//! The relay-queue binary: configuration, telemetry, `start`, wait for a signal, drain.

use std::time::Duration;

use clap::Parser;
use mailsuite_runtime::config::ConfigArgs;

/// mailsuite relay-queue: durable outbound queue, MX delivery, retries, DSNs and DKIM.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    /// Log lines as JSON.
    #[arg(long, env = "MAILSUITE_LOG_JSON")]
    log_json: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut signals = mailsuite_runtime::shutdown::Signals::install()?;
    let config: mailsuite_relay_queue::Config =
        mailsuite_runtime::config::load(&args.config.sources())?;
    let _telemetry = mailsuite_runtime::telemetry::init("relay-queue", args.log_json);
    let shutdown = mailsuite_runtime::Shutdown::new();
    let grace = Duration::from_secs(config.shutdown_grace_secs);
    let started = mailsuite_relay_queue::start(config, shutdown.clone()).await?;
    tracing::info!(grpc = ?started.grpc, ops = ?started.ops, "relay-queue started");
    signals.recv().await;
    tracing::info!("shutting down");
    shutdown.drain(grace).await;
    Ok(())
}
