//! `mailsuite up`: every service in one process, talking gRPC over loopback — for a laptop,
//! a demo, or a small installation. Each service is the same library the standalone binaries
//! run; only the wiring differs.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use mailsuite::up;
use mailsuite_runtime::config::{self, ConfigArgs};
use mailsuite_runtime::{Shutdown, shutdown, telemetry};

#[derive(Parser, Debug)]
#[command(name = "mailsuite", version, about = "The mailsuite mail system")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run every service in this process (SMTP, submission, POP3, IMAP, store, queue).
    Up {
        #[command(flatten)]
        config: ConfigArgs,
        /// Where a private PostgreSQL cluster lives when no server is reachable.
        #[arg(long, default_value = "./var")]
        data_dir: PathBuf,
        /// Log lines as JSON (`--json-logs` is the old spelling).
        #[arg(long = "log-json", alias = "json-logs", env = "MAILSUITE_LOG_JSON")]
        json_logs: bool,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let mut signals = shutdown::Signals::install()?;
    match cli.command {
        Command::Up {
            config: args,
            data_dir,
            json_logs,
        } => {
            let _telemetry = telemetry::init("mailsuite", json_logs);
            let cfg: up::UpConfig = config::load_renamed(&args.sources(), up::renamed())
                .context("loading configuration")?;
            let shutdown = Shutdown::new();
            let mut cfg = cfg;
            let token_file = if cfg.internal_token.is_empty() {
                let (token, path) = up::token_file(&data_dir)?;
                cfg.internal_token = token;
                Some(path)
            } else {
                None
            };
            let (database_url, cluster) = up::database(&cfg, &data_dir).await?;
            let grace = Duration::from_secs(cfg.grace_seconds);
            let result = async {
                let mut running = up::start(cfg, &database_url, shutdown.clone()).await?;
                running.token_file = token_file;
                println!("{}", running.table());
                signals.recv().await;
                eprintln!("shutting down (grace {grace:?}) ...");
                Ok::<_, anyhow::Error>(())
            }
            .await;
            shutdown.drain(grace).await;
            if let Some(c) = cluster {
                eprintln!("stopping the private PostgreSQL in {}", c.dir.display());
                if let Err(e) = c.stop() {
                    eprintln!("warning: {e}");
                }
            }
            result
        }
    }
}
