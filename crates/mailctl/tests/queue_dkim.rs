//! `mailctl queue` against a real relay-queue and `mailctl dkim` against a real store, run as
//! a user would run the binary.

use std::process::Command;
use std::time::Duration;

use mailsuite_proto::{EnqueueChunk, EnqueueHeader, EnvelopeRecipient, enqueue_chunk};
use mailsuite_runtime::Shutdown;
use mailsuite_testkit::{TestDb, eventually};

fn mailctl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mailctl"))
        .args(args)
        .output()
        .expect("run mailctl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn run(args: Vec<String>) -> (bool, String, String) {
    tokio::task::spawn_blocking(move || {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        mailctl(&a)
    })
    .await
    .unwrap()
}

fn v(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn queue_and_dkim_commands() {
    let db = TestDb::new().await;
    let sd = Shutdown::new();
    let sc = mailsuite_mailbox_store::Config {
        listen_grpc: "127.0.0.1:0".into(),
        listen_ops: String::new(),
        database_url: db.url.clone(),
        ..Default::default()
    };
    let store = mailsuite_mailbox_store::start(sc, sd.clone())
        .await
        .unwrap();
    let store_url = format!("http://{}", store.grpc);

    // dkim generate stores the key and prints the record; dkim list shows it.
    let (ok, out, err) = run(v(&[
        "--store",
        &store_url,
        "dkim",
        "generate",
        "Example.Test",
        "--selector",
        "s1",
        "--algorithm",
        "ed25519",
    ]))
    .await;
    assert!(ok, "{err}");
    assert!(
        out.contains("s1._domainkey.example.test. IN TXT ( \"v=DKIM1; k=ed25519; p="),
        "{out}"
    );
    let (ok, out, err) = run(v(&["--store", &store_url, "--json", "dkim", "list"])).await;
    assert!(ok, "{err}");
    let keys: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(keys[0]["domain"], "example.test");
    assert_eq!(keys[0]["selector"], "s1");
    assert_eq!(keys[0]["algorithm"], "ed25519-sha256");

    // A message that cannot be delivered yet (nothing listens on the route).
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut qc = mailsuite_relay_queue::Config {
        listen_grpc: "127.0.0.1:0".into(),
        listen_ops: String::new(),
        database_url: db.url.clone(),
        store_url: store_url.clone(),
        migrate_on_start: false,
        ..Default::default()
    };
    qc.workers.poll_interval_ms = 200;
    qc.retry.schedule_secs = vec![3600];
    qc.transports
        .insert("far.test".into(), format!("127.0.0.1:{closed}"));
    let queue = mailsuite_relay_queue::start(qc, sd.clone()).await.unwrap();
    let queue_url = format!("http://{}", queue.grpc.unwrap());
    let mut client = mailsuite_proto::queue_client::QueueClient::connect(queue_url.clone())
        .await
        .unwrap();
    let chunks = vec![
        EnqueueChunk {
            part: Some(enqueue_chunk::Part::Header(EnqueueHeader {
                idempotency_key: "cli-1".into(),
                return_path: "".into(),
                recipients: vec![EnvelopeRecipient {
                    address: "zed@far.test".into(),
                    ..Default::default()
                }],
                ..Default::default()
            })),
        },
        EnqueueChunk {
            part: Some(enqueue_chunk::Part::Data(
                b"From: a@example.test\r\nSubject: q\r\n\r\nbody\r\n"
                    .to_vec()
                    .into(),
            )),
        },
    ];
    let id = client
        .enqueue(tokio_stream::iter(chunks))
        .await
        .unwrap()
        .into_inner()
        .queue_id;

    let q = |args: &[&str]| {
        let mut a = v(&["--queue", &queue_url]);
        a.insert(0, "queue".into());
        a.extend(v(args));
        run(a)
    };
    eventually(
        Duration::from_secs(30),
        "deferred in `queue show`",
        || async {
            let (ok, out, _) = q(&["show", &id]).await;
            (ok && out.contains("deferred")).then_some(())
        },
    )
    .await;
    let (ok, out, err) = q(&["list"]).await;
    assert!(ok, "{err}");
    assert!(
        out.contains(&id) && out.contains("<>") && out.contains("1/1"),
        "{out}"
    );
    let (ok, out, _) = q(&["list", "--domain", "elsewhere.test"]).await;
    assert!(ok && !out.contains(&id), "{out}");
    let (ok, out, err) = q(&["show", &id]).await;
    assert!(ok, "{err}");
    assert!(
        out.contains("zed@far.test") && out.contains("127.0.0.1"),
        "{out}"
    );
    let (ok, out, err) = q(&["flush", "far.test"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("1 recipient(s) for far.test"), "{out}");
    eventually(
        Duration::from_secs(30),
        "deferred again after the flush",
        || async {
            let (_, out, _) = q(&["show", &id]).await;
            out.lines()
                .any(|l| l.contains("zed@far.test") && l.contains("deferred"))
                .then_some(())
        },
    )
    .await;
    let (ok, out, err) = q(&["retry"]).await;
    assert!(ok, "{err}");
    assert!(out.contains("scheduled now"), "{out}");
    let (ok, out, err) = q(&["delete", &id]).await;
    assert!(ok, "{err}");
    assert!(out.contains("deleted"), "{out}");
    let (ok, _, err) = q(&["show", &id]).await;
    assert!(!ok, "gone after delete");
    assert!(err.contains("not found"), "{err}");
    sd.drain(Duration::from_secs(10)).await;
}
