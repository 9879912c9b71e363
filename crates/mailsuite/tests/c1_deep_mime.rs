//! C1: a message nested 100,000 levels deep (alternating multipart/mixed and message/rfc822)
//! used to overflow mailbox-store's stack and abort the whole process. Delivered on the MX port
//! (smtplib), APPENDed over IMAP (imaplib) and delivered locally by relay-queue, it is now
//! stored, its BODYSTRUCTURE is cut at the depth limit, and every copy reads back byte-exact —
//! with everything still running (an abort would end this test process).

use std::process::Command;
use std::time::Duration;

use mailsuite_proto::admin_client::AdminClient;
use mailsuite_proto::mailbox_client::MailboxClient;
use mailsuite_proto::queue_client::QueueClient;
use mailsuite_proto::{
    AddAccountRequest, AddDomainRequest, EnqueueChunk, EnqueueHeader, EnvelopeRecipient,
    StatusRequest, enqueue_chunk,
};
use mailsuite_testkit::{TestSuite, eventually};

const LEVELS: usize = 100_000;

/// `levels` nested containers, alternating multipart/mixed and message/rfc822, around one
/// text part; `tag` makes each copy distinct content (blobs are stored once per content).
fn deep_nested(levels: usize, tag: &str) -> Vec<u8> {
    let mut m = format!(
        "From: sender@outside.example\r\nSubject: deep {tag}\r\nMessage-ID: <{tag}@c1.test>\r\n"
    )
    .into_bytes();
    for i in 0..levels {
        if i % 2 == 0 {
            m.extend_from_slice(
                format!("Content-Type: multipart/mixed; boundary=\"b{i}\"\r\n\r\n--b{i}\r\n")
                    .as_bytes(),
            );
        } else {
            m.extend_from_slice(b"Content-Type: message/rfc822\r\n\r\n");
        }
    }
    m.extend_from_slice(b"Content-Type: text/plain\r\n\r\ninnermost\r\n");
    for i in (0..levels).rev() {
        if i % 2 == 0 {
            m.extend_from_slice(format!("--b{i}--\r\n").as_bytes());
        }
    }
    m
}

async fn python(args: Vec<String>) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/c1_deep_mime.py");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(script)
            .args(args)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "python clients failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c1_deeply_nested_mime_via_smtp_append_and_relay_is_stored_and_readable() {
    let suite = TestSuite::start().await;
    let r = &suite.running;
    let store = r.store_channel();
    let mut admin = AdminClient::new(store.clone());
    admin
        .add_domain(AddDomainRequest {
            name: "c1.test".into(),
            catch_all: String::new(),
        })
        .await
        .unwrap();
    let alice = admin
        .add_account(AddAccountRequest {
            address: "alice@c1.test".into(),
            password: "alice-secret-pw".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();

    let dir = tempfile::tempdir().unwrap();
    let files: Vec<_> = ["smtp", "append", "relay"]
        .iter()
        .map(|tag| {
            let path = dir.path().join(format!("{tag}.eml"));
            std::fs::write(&path, deep_nested(LEVELS, tag)).unwrap();
            path.display().to_string()
        })
        .collect();
    let port = |a: Option<std::net::SocketAddr>| a.expect("listener enabled").port().to_string();
    let ca = suite.certs.ca_pem.display().to_string();
    let (user, password) = ("alice@c1.test".to_string(), "alice-secret-pw".to_string());

    // (a) the MX port and (b) IMAP APPEND.
    let out = python(vec![
        "send".into(),
        port(r.smtp.smtp),
        port(r.imap.imap),
        ca.clone(),
        user.clone(),
        password.clone(),
        files[0].clone(),
        files[1].clone(),
    ])
    .await;
    assert!(out.contains("SENT"), "{out}");

    // (c) relay-queue's local delivery (it hands local recipients to the store's Deliver).
    let mut queue = QueueClient::new(r.queue_channel().expect("queue running"));
    let relay_raw = std::fs::read(&files[2]).unwrap();
    let mut chunks = vec![EnqueueChunk {
        part: Some(enqueue_chunk::Part::Header(EnqueueHeader {
            idempotency_key: "c1-relay-1".into(),
            return_path: "sender@outside.example".into(),
            recipients: vec![EnvelopeRecipient {
                address: user.clone(),
                ..Default::default()
            }],
            size_hint: relay_raw.len() as u64,
            ..Default::default()
        })),
    }];
    chunks.extend(relay_raw.chunks(64 * 1024).map(|c| EnqueueChunk {
        part: Some(enqueue_chunk::Part::Data(c.to_vec().into())),
    }));
    queue
        .enqueue(tokio_stream::iter(chunks))
        .await
        .expect("enqueued");

    let mb = MailboxClient::new(store);
    eventually(
        Duration::from_secs(120),
        "the relayed copy is delivered",
        || {
            let mut mb = mb.clone();
            async move {
                let st = mb
                    .status(StatusRequest {
                        account_id: alice.id,
                        name: "INBOX".into(),
                    })
                    .await
                    .ok()?
                    .into_inner();
                (st.messages == 3).then_some(())
            }
        },
    )
    .await;

    let mut args = vec!["check".into(), port(r.imap.imap), ca, user, password];
    args.extend(files.iter().cloned());
    let out = python(args).await;
    assert!(out.contains("ALL OK"), "{out}");
    assert!(suite.stop(Duration::from_secs(10)).await);
}
