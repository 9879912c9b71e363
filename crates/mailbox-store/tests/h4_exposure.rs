//! H4: the standalone binary refuses to serve gRPC on a non-loopback address without the
//! internal token (it used to listen on 0.0.0.0 and trust every caller), and says why.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mailsuite_testkit::TestDb;

fn run_until_exit(args: &[&str], db_url: &str) -> (std::process::ExitStatus, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mailbox-store"))
        .args(args)
        .env("DATABASE_URL", db_url)
        .env_remove("MAILSUITE_INTERNAL_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
            return (status, err);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("mailbox-store kept running on 0.0.0.0 without an internal token");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn h4_no_token_on_a_public_address_refuses_to_start() {
    let db = TestDb::new().await;
    let url = db.url.clone();
    let (status, err) = tokio::task::spawn_blocking(move || {
        run_until_exit(
            &["--set", "listen_grpc=0.0.0.0:0", "--set", "listen_ops="],
            &url,
        )
    })
    .await
    .unwrap();
    assert!(!status.success(), "exit status {status}");
    assert!(
        err.contains("refusing to serve gRPC") && err.contains("internal_token"),
        "{err}"
    );
}
