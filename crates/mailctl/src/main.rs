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

pub fn store_channel(url: &str) -> Result<GrpcChannel> {
    mailsuite_runtime::grpc::connect_lazy(url).with_context(|| format!("bad store URL {url:?}"))
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let out = Output { json: cli.json };
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
