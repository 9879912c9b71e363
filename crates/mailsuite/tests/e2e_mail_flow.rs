//! The whole system with independent clients: Python's smtplib, imaplib and poplib talk to
//! the services started in-process on ephemeral ports (TLS with a test CA).

use std::process::Command;
use std::time::Duration;

use mailsuite_proto::admin_client::AdminClient;
use mailsuite_proto::{AddAccountRequest, AddDomainRequest};
use mailsuite_testkit::TestSuite;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtp_in_imap_and_pop3_out_submission_between_users() {
    let suite = TestSuite::start().await;
    let r = &suite.running;
    let channel = r.store_channel();
    let mut admin = AdminClient::new(channel);
    admin
        .add_domain(AddDomainRequest {
            name: "flow.test".into(),
            catch_all: String::new(),
        })
        .await
        .unwrap();
    for who in ["alice", "bob"] {
        admin
            .add_account(AddAccountRequest {
                address: format!("{who}@flow.test"),
                password: format!("{who}-secret-pw"),
                display_name: who.into(),
                quota_bytes: 0,
                quota_messages: 0,
            })
            .await
            .unwrap();
    }

    let port = |a: Option<std::net::SocketAddr>| a.expect("listener enabled").port().to_string();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/mail_flow.py");
    let out = tokio::task::spawn_blocking({
        let args = vec![
            script.to_string(),
            port(r.smtp.smtp),
            port(r.smtp.submission),
            port(r.imap.imap),
            port(r.pop3.pop3),
            suite.certs.ca_pem.display().to_string(),
            "alice@flow.test".into(),
            "alice-secret-pw".into(),
            "bob@flow.test".into(),
            "bob-secret-pw".into(),
        ];
        move || Command::new("python3").args(args).output().unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("ALL OK"),
        "python clients failed:\n{stdout}\n{stderr}"
    );
    assert!(suite.stop(Duration::from_secs(10)).await);
}
