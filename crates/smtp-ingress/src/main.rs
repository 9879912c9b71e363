//! The `smtp-ingress` binary: the shared service `main` (mailsuite_runtime::service) around `start`.

use std::time::Duration;

use mailsuite_runtime::service::Service;

const ABOUT: &str =
    "mailsuite smtp-ingress: ESMTP for MX (25), submission (587, STARTTLS) and submissions (465)";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    Service::<mailsuite_smtp_ingress::Config>::new("smtp-ingress", Duration::from_secs(30))
        .with_renamed(mailsuite_smtp_ingress::config::RENAMED)
        .main(
            ABOUT,
            env!("CARGO_PKG_VERSION"),
            mailsuite_smtp_ingress::start,
        )
        .await
}
