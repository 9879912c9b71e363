//! The `pop3-gateway` binary: the shared service `main` (mailsuite_runtime::service) around `start`.

use std::time::Duration;

use mailsuite_runtime::service::Service;

const ABOUT: &str =
    "mailsuite POP3 gateway: POP3 on 110 (STLS) and 995 (implicit TLS) in front of mailbox-store";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    Service::<mailsuite_pop3_gateway::Config>::new("pop3-gateway", Duration::from_secs(30))
        .with_renamed(mailsuite_pop3_gateway::config::RENAMED)
        .main(
            ABOUT,
            env!("CARGO_PKG_VERSION"),
            mailsuite_pop3_gateway::start,
        )
        .await
}
