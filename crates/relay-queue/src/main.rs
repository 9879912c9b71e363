//! The `relay-queue` binary: the shared service `main` (mailsuite_runtime::service) around `start`.

use std::time::Duration;

use mailsuite_runtime::service::Service;

const ABOUT: &str =
    "mailsuite relay-queue: durable outbound queue, MX delivery, retries, DSNs and DKIM";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    Service {
        config_grace: |c: &mailsuite_relay_queue::Config| {
            Some(Duration::from_secs(c.shutdown_grace_secs))
        },
        ..Service::<mailsuite_relay_queue::Config>::new("relay-queue", Duration::from_secs(10))
    }
    .main(
        ABOUT,
        env!("CARGO_PKG_VERSION"),
        mailsuite_relay_queue::start,
    )
    .await
}
