//! The `imap-gateway` binary: the shared service `main` (mailsuite_runtime::service) around `start`.

use std::time::Duration;

use clap::Parser;
use mailsuite_runtime::service::{Service, ServiceArgs};

/// mailsuite IMAP gateway: IMAP on 143 (STARTTLS) and 993 (implicit TLS) in front of mailbox-store.
#[derive(Debug, Parser)]
#[command(name = "imap-gateway", version, about)]
struct Args {
    #[command(flatten)]
    service: ServiceArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    Service::<mailsuite_imap_gateway::Config>::new("imap-gateway", Duration::from_secs(30))
        .with_renamed(mailsuite_imap_gateway::config::RENAMED)
        .run(args.service, mailsuite_imap_gateway::start)
        .await
}
