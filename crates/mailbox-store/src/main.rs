//! The `mailbox-store` binary: the shared service `main` (mailsuite_runtime::service) around `start`.

use std::time::Duration;

use mailsuite_runtime::service::Service;

const ABOUT: &str =
    "mailsuite mailbox-store: accounts, mailboxes and messages in PostgreSQL, served over gRPC";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    Service::<mailsuite_mailbox_store::Config>::new("mailbox-store", Duration::from_secs(10))
        .main(
            ABOUT,
            env!("CARGO_PKG_VERSION"),
            mailsuite_mailbox_store::start,
        )
        .await
}
