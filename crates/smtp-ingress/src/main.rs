use clap::Parser;
use mailsuite_runtime::config::{ConfigArgs, load};
use mailsuite_runtime::{Shutdown, shutdown, telemetry};

/// mailsuite smtp-ingress: ESMTP for MX (25), submission (587, STARTTLS) and submissions (465).
#[derive(Parser)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    config: ConfigArgs,
    /// Log as JSON lines (`--json-logs` is the old spelling).
    #[arg(long = "log-json", alias = "json-logs", env = "MAILSUITE_LOG_JSON")]
    json_logs: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut signals = shutdown::Signals::install()?;
    let config: mailsuite_smtp_ingress::Config = load(&args.config.sources())?;
    let _telemetry = telemetry::init("smtp-ingress", args.json_logs);
    let sd = Shutdown::new();
    let started = mailsuite_smtp_ingress::start(config, sd.clone()).await?;
    tracing::info!(?started, "smtp-ingress started");
    signals.recv().await;
    sd.drain(std::time::Duration::from_secs(30)).await;
    Ok(())
}
