//! The `mailbox-store` binary: --help, serving, and a clean exit 0 on SIGTERM.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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
    let addr = mailsuite_testkit::process::free_addr();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mailbox-store"))
        .args([
            "--set",
            &format!("listen_grpc={addr}"),
            "--set",
            "listen_ops=127.0.0.1:0",
        ])
        .env("DATABASE_URL", &db.url)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap();
    // Migrations run before the listener binds: connect until it answers.
    let deadline = Instant::now() + Duration::from_secs(30);
    let ch = loop {
        match endpoint.connect().await {
            Ok(ch) => break ch,
            Err(e) if Instant::now() < deadline => {
                assert!(
                    child.try_wait().unwrap().is_none(),
                    "mailbox-store exited: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("mailbox-store never served gRPC on {addr}: {e}"),
        }
    };
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

/// The flag spellings the store used before the services shared one `main` still work for a
/// release, and each says what replaces it.
#[test]
fn old_flag_spellings_are_accepted_with_a_warning() {
    // A start-up that fails on purpose (no database), after the flags were read.
    let (status, err) = mailsuite_testkit::process::run_to_exit(
        env!("CARGO_BIN_EXE_mailbox-store"),
        &[
            "--json-logs",
            "--grace-seconds",
            "3",
            "--set",
            "listen_grpc=127.0.0.1:0",
        ],
        &[
            ("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none"),
            ("MAILSUITE_LOG", "warn"),
        ],
        Duration::from_secs(60),
    );
    assert!(!status.success(), "{err}");
    for (old, new) in [
        ("--json-logs", "--log-json"),
        ("--grace-seconds", "--grace-secs"),
    ] {
        assert!(
            err.contains(&format!("{old} is the old spelling of {new}")),
            "{err}"
        );
    }
    // --json-logs took effect: the warnings are JSON lines.
    assert!(err.lines().any(|l| l.starts_with('{')), "{err}");
}
