//! The `mailbox-store` binary: --help, serving, and a clean exit 0 on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use mailsuite_testkit::TestDb;

#[test]
fn help_lists_the_config_options() {
    let out = Command::new(env!("CARGO_BIN_EXE_mailbox-store"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("--config") && text.contains("--set"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn serves_then_exits_zero_on_sigterm() {
    let db = TestDb::new().await;
    let mut child = Command::new(env!("CARGO_BIN_EXE_mailbox-store"))
        .args([
            "--set",
            "listen_grpc=127.0.0.1:0",
            "--set",
            "listen_ops=127.0.0.1:0",
        ])
        .env("DATABASE_URL", &db.url)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(addr) = line.strip_prefix("mailbox-store: gRPC on ") {
                let _ = tx.send(addr.trim().to_string());
            }
        }
    });
    let addr = tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(30)))
        .await
        .unwrap()
        .expect("the binary reports its gRPC address");
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut admin = mailsuite_proto::admin_client::AdminClient::new(ch);
    let domains = admin
        .list_domains(mailsuite_proto::ListDomainsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(domains.domains.is_empty());

    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(status.code(), Some(0));
}
