//! The `imap-gateway` binary: the shared service `main` (mailsuite_runtime::service) around `start`.

use std::time::Duration;

use mailsuite_runtime::service::Service;

const ABOUT: &str = "mailsuite IMAP gateway: IMAP on 143 (STARTTLS) and 993 (implicit TLS) in front of mailbox-store";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    Service::<mailsuite_imap_gateway::Config>::new("imap-gateway", Duration::from_secs(30))
        .with_renamed(mailsuite_imap_gateway::config::RENAMED)
        .main(
            ABOUT,
            env!("CARGO_PKG_VERSION"),
            mailsuite_imap_gateway::start,
        )
        .await
}
