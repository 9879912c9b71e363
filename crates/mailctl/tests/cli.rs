//! mailctl against a real store: the binary is run as a user would run it.

use std::io::Write;
use std::process::{Command, Stdio};

use mailsuite_proto::AuthenticateRequest;
use mailsuite_proto::directory_client::DirectoryClient;
use mailsuite_runtime::Shutdown;
use mailsuite_testkit::TestDb;

fn mailctl(store: &str, args: &[&str], stdin: Option<&str>) -> (bool, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mailctl"))
        .env_remove("MAILSUITE_INTERNAL_TOKEN")
        .env_remove("MAILSUITE_INTERNAL_TOKEN_FILE")
        .arg("--store")
        .arg(store)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run mailctl");
    {
        let mut si = child.stdin.take().unwrap();
        if let Some(s) = stdin {
            si.write_all(s.as_bytes()).unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn manage_domains_accounts_aliases() {
    let db = TestDb::new().await;
    let sd = Shutdown::new();
    let cfg = mailsuite_mailbox_store::Config {
        listen_grpc: "127.0.0.1:0".into(),
        listen_ops: String::new(),
        database_url: db.url.clone(),
        ..Default::default()
    };
    let started = mailsuite_mailbox_store::start(cfg, sd.clone())
        .await
        .unwrap();
    let url = format!("http://{}", started.grpc);
    let u = url.clone();
    let run = move |args: Vec<&'static str>, stdin: Option<&'static str>| {
        let u = u.clone();
        tokio::task::spawn_blocking(move || mailctl(&u, &args, stdin))
    };

    let (ok, out, err) = run(vec!["domain", "add", "Example.Test"], None)
        .await
        .unwrap();
    assert!(ok, "{err}");
    assert!(out.contains("example.test"), "{out}");
    let (ok, out, _) = run(vec!["--json", "domain", "list"], None).await.unwrap();
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["name"], "example.test");

    let (ok, _, err) = run(
        vec![
            "account",
            "add",
            "bob@example.test",
            "--password-stdin",
            "--quota-bytes",
            "1M",
        ],
        Some("correct horse\n"),
    )
    .await
    .unwrap();
    assert!(ok, "{err}");
    let (ok, out, _) = run(vec!["--json", "account", "list"], None).await.unwrap();
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v[0]["address"], "bob@example.test");
    assert_eq!(v[0]["quota_bytes"], 1024 * 1024);

    // The password given on stdin is the one that authenticates.
    let mut dir = DirectoryClient::new(
        tonic::transport::Endpoint::from_shared(url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let auth = |pw: &str| AuthenticateRequest {
        username: "bob@example.test".into(),
        password: pw.into(),
        ..Default::default()
    };
    assert!(
        dir.authenticate(auth("correct horse"))
            .await
            .unwrap()
            .into_inner()
            .ok
    );
    assert!(
        !dir.authenticate(auth("wrong"))
            .await
            .unwrap()
            .into_inner()
            .ok
    );

    let (ok, _, _) = run(
        vec!["account", "passwd", "bob@example.test", "--password-stdin"],
        Some("battery staple\n"),
    )
    .await
    .unwrap();
    assert!(ok);
    assert!(
        dir.authenticate(auth("battery staple"))
            .await
            .unwrap()
            .into_inner()
            .ok
    );
    assert!(
        !dir.authenticate(auth("correct horse"))
            .await
            .unwrap()
            .into_inner()
            .ok
    );

    let (ok, out, _) = run(
        vec![
            "account",
            "quota",
            "bob@example.test",
            "--bytes",
            "2M",
            "--messages",
            "10",
        ],
        None,
    )
    .await
    .unwrap();
    assert!(ok);
    assert!(out.contains("2097152"), "{out}");

    let (ok, _, err) = run(
        vec![
            "alias",
            "add",
            "team@example.test",
            "bob@example.test",
            "x@remote.test",
            "--list",
        ],
        None,
    )
    .await
    .unwrap();
    assert!(ok, "{err}");
    let (ok, out, _) = run(vec!["alias", "list"], None).await.unwrap();
    assert!(ok);
    assert!(
        out.contains("team@example.test") && out.contains("list") && out.contains("x@remote.test"),
        "{out}"
    );

    // Errors are reported with a non-zero exit.
    let (ok, _, err) = run(vec!["domain", "remove", "example.test"], None)
        .await
        .unwrap();
    assert!(!ok);
    assert!(err.contains("account"), "{err}");
    let (ok, _, _) = run(vec!["alias", "remove", "team@example.test"], None)
        .await
        .unwrap();
    assert!(ok);
    let (ok, _, _) = run(vec!["account", "remove", "bob@example.test"], None)
        .await
        .unwrap();
    assert!(ok);
    let (ok, _, err) = run(vec!["domain", "remove", "example.test"], None)
        .await
        .unwrap();
    assert!(ok, "{err}");
    let (ok, out, _) = run(vec!["--json", "domain", "list"], None).await.unwrap();
    assert!(ok);
    assert_eq!(out.trim(), "[]");

    // migrate is idempotent on an already migrated database.
    let (ok, _, err) = tokio::task::spawn_blocking({
        let dburl = db.url.clone();
        move || {
            let out = Command::new(env!("CARGO_BIN_EXE_mailctl"))
                .args(["migrate", "--database-url", &dburl])
                .output()
                .unwrap();
            (
                out.status.success(),
                String::new(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
    })
    .await
    .unwrap();
    assert!(ok, "{err}");
    sd.drain(std::time::Duration::from_secs(5)).await;
}

/// A store that requires the internal token: mailctl without it is refused (and says so),
/// with it from the environment or from a file it works.
#[tokio::test(flavor = "multi_thread")]
async fn internal_token_is_required_and_sent() {
    let db = TestDb::new().await;
    let sd = Shutdown::new();
    let cfg = mailsuite_mailbox_store::Config {
        listen_grpc: "127.0.0.1:0".into(),
        listen_ops: String::new(),
        database_url: db.url.clone(),
        internal_token: mailsuite_runtime::grpc::InternalToken("t0ken-for-the-test".into()),
        ..Default::default()
    };
    let started = mailsuite_mailbox_store::start(cfg, sd.clone())
        .await
        .unwrap();
    let url = format!("http://{}", started.grpc);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, "t0ken-for-the-test\n").unwrap();
    let run = move |env: Vec<(&'static str, String)>| {
        let url = url.clone();
        tokio::task::spawn_blocking(move || {
            let out = Command::new(env!("CARGO_BIN_EXE_mailctl"))
                .env_remove("MAILSUITE_INTERNAL_TOKEN")
                .env_remove("MAILSUITE_INTERNAL_TOKEN_FILE")
                .envs(env)
                .args(["--store", &url, "domain", "list"])
                .output()
                .unwrap();
            (
                out.status.success(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        })
    };
    let (ok, err) = run(vec![]).await.unwrap();
    assert!(!ok);
    assert!(err.to_lowercase().contains("token"), "{err}");
    let (ok, _) = run(vec![("MAILSUITE_INTERNAL_TOKEN", "wrong".into())])
        .await
        .unwrap();
    assert!(!ok);
    let (ok, err) = run(vec![(
        "MAILSUITE_INTERNAL_TOKEN",
        "t0ken-for-the-test".into(),
    )])
    .await
    .unwrap();
    assert!(ok, "{err}");
    let (ok, err) = run(vec![(
        "MAILSUITE_INTERNAL_TOKEN_FILE",
        file.display().to_string(),
    )])
    .await
    .unwrap();
    assert!(ok, "{err}");
    sd.drain(std::time::Duration::from_secs(5)).await;
}
