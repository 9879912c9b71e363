//! The `pop3-gateway` binary: the shared service `main` (mailsuite_runtime::service) around `start`.

use std::time::Duration;

use clap::Parser;
use mailsuite_runtime::service::{Service, ServiceArgs};

/// mailsuite POP3 gateway: POP3 on 110 (STLS) and 995 (implicit TLS) in front of mailbox-store.
#[derive(Debug, Parser)]
#[command(name = "pop3-gateway", version, about)]
struct Args {
    #[command(flatten)]
    service: ServiceArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    Service::<mailsuite_pop3_gateway::Config>::new("pop3-gateway", Duration::from_secs(30))
        .with_renamed(mailsuite_pop3_gateway::config::RENAMED)
        .run(args.service, mailsuite_pop3_gateway::start)
        .await
}
