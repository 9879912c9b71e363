//! `mailsuite up` as a user runs it: the real binary, its printed table of listeners, a real
//! SMTP/POP3/IMAP greeting on each, and a clean exit on SIGINT.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mailsuite_testkit::TestDb;

fn greeting(addr: &str) -> String {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).expect("greeting");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn up_serves_every_protocol_and_stops_on_sigint() {
    let db = TestDb::new().await;
    let data = tempfile::tempdir().unwrap();
    let any = "127.0.0.1:0";
    let mut child = Command::new(env!("CARGO_BIN_EXE_mailsuite"))
        .arg("up")
        .args(["--data-dir", &data.path().display().to_string()])
        .args(["--set", &format!("store.listen_grpc={any}")])
        .args(["--set", &format!("queue.listen_grpc={any}")])
        .args(["--set", &format!("smtp.listen_smtp={any}")])
        .args(["--set", &format!("smtp.listen_submission={any}")])
        .args(["--set", &format!("smtp.listen_submissions={any}")])
        .args(["--set", &format!("pop3.listen_pop3={any}")])
        .args(["--set", &format!("pop3.listen_pop3s={any}")])
        .args(["--set", &format!("imap.listen_imap={any}")])
        .args(["--set", &format!("imap.listen_imaps={any}")])
        .env("DATABASE_URL", &db.url)
        .env("MAILSUITE_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn mailsuite up");

    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let started = Instant::now();
    let mut table = Vec::new();
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30).saturating_sub(started.elapsed()))
            .expect("mailsuite up printed its table within 30 s");
        let done = line.contains("Ctrl-C stops everything");
        table.push(line);
        if done {
            break;
        }
    }
    let addr_of = |label: &str| -> String {
        table
            .iter()
            .find(|l| l.trim_start().starts_with(label))
            .and_then(|l| l.split_whitespace().last().map(str::to_owned))
            .unwrap_or_else(|| panic!("no {label} row in {table:#?}"))
    };
    let smtp = addr_of("SMTP (MX");
    let pop3 = addr_of("POP3 (STLS)");
    let imap = addr_of("IMAP (STARTTLS)");
    assert!(greeting(&smtp).starts_with("220 "), "SMTP greeting");
    assert!(greeting(&pop3).starts_with("+OK"), "POP3 greeting");
    assert!(greeting(&imap).starts_with("* OK"), "IMAP greeting");

    // The internal gRPC token: created owner-only in the data directory, required by the
    // store, and what the printed mailctl commands point at.
    let token_path = data.path().join("internal-token");
    let token = std::fs::read_to_string(&token_path).unwrap();
    let token = token.trim();
    assert_eq!(token.len(), 64, "a 32-byte random token");
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&token_path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "owner-only");
    }
    assert!(
        table
            .iter()
            .any(|l| l.contains(&format!("--token-file {}", token_path.display()))),
        "{table:#?}"
    );
    let store = format!("http://{}", addr_of("gRPC mailbox-store"));
    let list = |token: &str| {
        let ch = mailsuite_runtime::grpc::connect_lazy_with_token(&store, token).unwrap();
        async move {
            mailsuite_proto::admin_client::AdminClient::new(ch)
                .list_domains(mailsuite_proto::ListDomainsRequest::default())
                .await
        }
    };
    assert_eq!(
        list("").await.unwrap_err().code(),
        tonic::Code::Unauthenticated
    );
    assert_eq!(
        list("not-the-token").await.unwrap_err().code(),
        tonic::Code::Unauthenticated
    );
    list(token)
        .await
        .expect("the token from the file is accepted");

    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "mailsuite up did not stop on SIGINT"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "clean exit on SIGINT: {exit:?}");
    assert!(
        std::net::TcpStream::connect(&smtp).is_err(),
        "listeners closed after exit"
    );
}

/// With nothing on 127.0.0.1:5432 (a private network namespace hides the system server),
/// `mailsuite up` creates, uses and finally stops its own cluster under `--data-dir`.
#[test]
fn up_without_a_server_runs_a_private_cluster_and_stops_it() {
    let unshare_ok = Command::new("unshare")
        .args(["-n", "true"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !unshare_ok || mailsuite_runtime::pg::find_bindir().is_none() {
        eprintln!("skipped: needs root (unshare -n) and PostgreSQL binaries");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("var");
    let bin = env!("CARGO_BIN_EXE_mailsuite");
    let script = format!(
        "ip link set lo up && exec {bin} up --data-dir {} \
         --set store.listen_grpc=127.0.0.1:0 --set queue.listen_grpc=127.0.0.1:0",
        data.display()
    );
    let mut child = Command::new("unshare")
        .args(["-n", "sh", "-c", &script])
        .env_remove("DATABASE_URL")
        .env("MAILSUITE_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let started = Instant::now();
    let mut db_line = None;
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60).saturating_sub(started.elapsed()))
            .expect("mailsuite up started on a private cluster within 60 s");
        if line.trim_start().starts_with("database:") {
            db_line = Some(line.clone());
        }
        if line.contains("Ctrl-C stops everything") {
            break;
        }
    }
    let db_line = db_line.expect("database row");
    assert!(
        !db_line.contains(":5432/") && db_line.ends_with("/mailsuite"),
        "{db_line}"
    );
    assert!(data.join("postgres/data/PG_VERSION").exists());

    // `sh` exec'd into mailsuite, so the child's pid is mailsuite's.
    Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let exit = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "did not stop on SIGINT");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(exit.success(), "{exit:?}");
    let log = std::fs::read_to_string(data.join("postgres/postgres.log")).unwrap();
    assert!(
        log.contains("database system is shut down"),
        "private cluster stopped: {log}"
    );
    let leftover = Command::new("pgrep")
        .args(["-f", &data.display().to_string()])
        .output()
        .unwrap();
    assert!(
        leftover.stdout.is_empty(),
        "no process left running from the private cluster"
    );
}
