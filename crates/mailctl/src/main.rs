//! `mailctl`: administration of a mailsuite installation over gRPC (and `migrate` directly
//! against PostgreSQL). Each command group lives in its own module; add a group by adding a
//! variant to `Command` and a module with a `run` function.

mod accounts;
mod dkim;
mod output;
mod queue;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use mailsuite_runtime::grpc::GrpcChannel;

pub use output::Output;

#[derive(Parser, Debug)]
#[command(
    name = "mailctl",
    version,
    about = "Administer mailsuite: domains, accounts, aliases"
)]
pub struct Cli {
    /// The mailbox-store gRPC endpoint.
    #[arg(
        long,
        global = true,
        env = "MAILSUITE_STORE_URL",
        default_value = "http://127.0.0.1:50051"
    )]
    pub store: String,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// A file holding the services' internal gRPC token (`mailsuite up` writes
    /// `<data-dir>/internal-token`). The environment variable MAILSUITE_INTERNAL_TOKEN gives
    /// the token itself and wins; there is no flag for the token, to keep it out of `ps`.
    #[arg(long, global = true, env = "MAILSUITE_INTERNAL_TOKEN_FILE")]
    pub token_file: Option<std::path::PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Apply the database migrations (the same ones services apply at start-up).
    Migrate {
        /// PostgreSQL URL.
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
    },
    /// Hosted domains.
    #[command(subcommand)]
    Domain(accounts::DomainCmd),
    /// Accounts (mail users).
    #[command(subcommand)]
    Account(accounts::AccountCmd),
    /// Aliases and distribution lists.
    #[command(subcommand)]
    Alias(accounts::AliasCmd),
    /// The outbound queue of relay-queue.
    Queue(queue::QueueArgs),
    /// DKIM signing keys.
    #[command(subcommand)]
    Dkim(dkim::DkimCmd),
}

/// The internal token every gRPC call sends, resolved once in `main`.
static TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();

fn resolve_token(file: Option<&std::path::Path>) -> Result<String> {
    if let Ok(t) = std::env::var("MAILSUITE_INTERNAL_TOKEN") {
        return Ok(t.trim().to_string());
    }
    match file {
        Some(f) => Ok(std::fs::read_to_string(f)
            .with_context(|| format!("reading the token file {}", f.display()))?
            .trim()
            .to_string()),
        None => Ok(String::new()),
    }
}

/// A channel to a service, authenticated with the internal token when one is set.
pub fn channel(url: &str, what: &str) -> Result<GrpcChannel> {
    let token = TOKEN.get().map(String::as_str).unwrap_or("");
    mailsuite_runtime::grpc::connect_lazy_with_token(url, token)
        .with_context(|| format!("bad {what} URL {url:?}"))
}

pub fn store_channel(url: &str) -> Result<GrpcChannel> {
    channel(url, "store")
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let out = Output { json: cli.json };
    match resolve_token(cli.token_file.as_deref()) {
        Ok(t) => {
            let _ = TOKEN.set(t);
        }
        Err(e) => {
            eprintln!("mailctl: {e:#}");
            std::process::exit(1);
        }
    }
    if let Err(e) = run(cli, &out).await {
        eprintln!("mailctl: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli, out: &Output) -> Result<()> {
    match cli.command {
        Command::Migrate { database_url } => {
            let pool = mailsuite_runtime::db::connect(&database_url, 2)
                .await
                .context("connecting to PostgreSQL")?;
            mailsuite_runtime::db::migrate(&pool)
                .await
                .context("applying migrations")?;
            out.message("migrations applied");
            Ok(())
        }
        Command::Domain(c) => accounts::domain(&cli.store, c, out).await,
        Command::Account(c) => accounts::account(&cli.store, c, out).await,
        Command::Alias(c) => accounts::alias(&cli.store, c, out).await,
        Command::Queue(a) => queue::run(a, out).await,
        Command::Dkim(c) => dkim::run(&cli.store, c, out).await,
    }
}
