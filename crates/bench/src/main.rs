use clap::{Parser, Subcommand};
use mailsuite_bench::cmd::{self, Common};

/// mailbench: drive an SMTP, IMAP or POP3 server over real sockets and report throughput,
/// latency percentiles, errors by reply code and the CPU cost per message of server processes.
#[derive(Parser)]
#[command(name = "mailbench", version)]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Deliver N messages over C concurrent SMTP sessions.
    Smtp(cmd::smtp::SmtpArgs),
    /// Deliver a realistic corpus (plain, multipart/alternative, attachments, 1 KB–1 MB) to many users.
    Seed(cmd::smtp::SeedArgs),
    /// Load an IMAP server with ENVELOPE/BODY fetches, SEARCH or STORE from C clients.
    Imap(cmd::imap::ImapArgs),
    /// Hold N IDLE sessions; measure server memory per session and delivery-to-watchers latency.
    Idle(cmd::idle::IdleArgs),
    /// Download POP3 maildrops.
    Pop3(cmd::pop3::Pop3Args),
    /// Run another load generator (e.g. Postfix's smtp-source) and measure it: operations
    /// counted by a server-side command before and after, CPU of the watched processes.
    Exec(cmd::exec::ExecArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let common = cli.common;
    let (report, ok) = match cli.command {
        Command::Smtp(a) => cmd::smtp::run(a, &common).await?,
        Command::Seed(a) => cmd::smtp::seed(a, &common).await?,
        Command::Imap(a) => cmd::imap::run(a, &common).await?,
        Command::Idle(a) => cmd::idle::run(a, &common).await?,
        Command::Pop3(a) => cmd::pop3::run(a, &common).await?,
        Command::Exec(a) => cmd::exec::run(a, &common).await?,
    };
    if common.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.to_text());
    }
    if !ok {
        // Verification failed (messages missing, sessions lost): the figures are not valid.
        std::process::exit(2);
    }
    Ok(())
}
