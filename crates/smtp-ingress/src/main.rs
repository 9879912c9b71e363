//! The `smtp-ingress` binary: the shared service `main` (mailsuite_runtime::service) around `start`.

use std::time::Duration;

use clap::Parser;
use mailsuite_runtime::service::{Service, ServiceArgs};

/// mailsuite smtp-ingress: ESMTP for MX (25), submission (587, STARTTLS) and submissions (465).
#[derive(Debug, Parser)]
#[command(name = "smtp-ingress", version, about)]
struct Args {
    #[command(flatten)]
    service: ServiceArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    Service::<mailsuite_smtp_ingress::Config>::new("smtp-ingress", Duration::from_secs(30))
        .with_renamed(mailsuite_smtp_ingress::config::RENAMED)
        .run(args.service, mailsuite_smtp_ingress::start)
        .await
}
