//! The `mailbox-store` binary: the shared service `main` (mailsuite_runtime::service) around `start`.

use std::time::Duration;

use clap::Parser;
use mailsuite_runtime::service::{Service, ServiceArgs};

/// mailsuite mailbox-store: accounts, mailboxes and messages in PostgreSQL, served over gRPC.
#[derive(Debug, Parser)]
#[command(name = "mailbox-store", version, about)]
struct Args {
    #[command(flatten)]
    service: ServiceArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    Service::<mailsuite_mailbox_store::Config>::new("mailbox-store", Duration::from_secs(10))
        .run(args.service, mailsuite_mailbox_store::start)
        .await
}
