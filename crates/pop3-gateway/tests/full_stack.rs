//! The whole system (`mailsuite_testkit::TestSuite`: every service in-process on port 0):
//! mail in over SMTP, read and deleted over POP3 with Python's poplib, checked over IMAP with
//! imaplib, and against the store's own view.

use std::time::Duration;

use mailsuite_proto::admin_client::AdminClient;
use mailsuite_proto::mailbox_client::MailboxClient;
use mailsuite_proto::{AddAccountRequest, AddDomainRequest, SelectRequest};
use mailsuite_testkit::TestSuite;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_in_pop3_dele_quit_gone_in_imap() {
    let suite = TestSuite::start().await;
    let r = &suite.running;
    let channel = r.store_channel();
    AdminClient::new(channel.clone())
        .add_domain(AddDomainRequest {
            name: "pop.flow.test".into(),
            catch_all: String::new(),
        })
        .await
        .unwrap();
    let account = AdminClient::new(channel.clone())
        .add_account(AddAccountRequest {
            address: "erin@pop.flow.test".into(),
            password: "erin-pw-123456".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .id;

    let port = |a: Option<std::net::SocketAddr>| a.expect("listener enabled").port();
    let args = json!({
        "smtp": port(r.smtp.smtp),
        "pop3": port(r.pop3.pop3),
        "pop3s": port(r.pop3.pop3s),
        "imap": port(r.imap.imap),
        "ca": suite.certs.ca_pem,
        "user": "erin@pop.flow.test",
        "password": "erin-pw-123456",
    });
    let out = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new("python3")
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/py/pop3_client.py"
            ))
            .arg("smtp_pop3_imap")
            .arg(args.to_string())
            .output(),
    )
    .await
    .expect("python finishes")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "poplib/imaplib flow failed:\n{}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );

    // UIDL values are the store's uidvalidity.uid of what is left.
    let out: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let inbox = MailboxClient::new(channel)
        .select(SelectRequest {
            account_id: account,
            name: "INBOX".into(),
            read_only: true,
        })
        .await
        .unwrap()
        .into_inner();
    let uidvalidity = inbox.mailbox.unwrap().uidvalidity;
    let left: Vec<String> = inbox
        .uids
        .iter()
        .map(|u| format!("{uidvalidity}.{u}"))
        .collect();
    let uidl: Vec<&str> = out["uidl"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        uidl[1..],
        left,
        "the first was deleted, the rest kept their UIDL"
    );
    assert!(suite.stop(Duration::from_secs(10)).await);
}
