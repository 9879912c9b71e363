//! The `relay-queue` binary: the shared service `main` (mailsuite_runtime::service) around `start`.

use std::time::Duration;

use clap::Parser;
use mailsuite_runtime::service::{Service, ServiceArgs};

/// mailsuite relay-queue: durable outbound queue, MX delivery, retries, DSNs and DKIM.
#[derive(Debug, Parser)]
#[command(name = "relay-queue", version, about)]
struct Args {
    #[command(flatten)]
    service: ServiceArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    Service {
        config_grace: |c: &mailsuite_relay_queue::Config| {
            Some(Duration::from_secs(c.shutdown_grace_secs))
        },
        ..Service::<mailsuite_relay_queue::Config>::new("relay-queue", Duration::from_secs(10))
    }
    .run(args.service, mailsuite_relay_queue::start)
    .await
}
