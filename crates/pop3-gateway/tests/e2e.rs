//! End to end: Python's poplib against pop3-gateway in front of a real mailbox-store on a
//! fresh PostgreSQL database, over STLS and over implicit TLS. Two store replicas and two
//! gateways share the database, so the maildrop lock is shown to hold across replicas.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use mailsuite_proto::admin_client::AdminClient;
use mailsuite_proto::delivery_client::DeliveryClient;
use mailsuite_proto::mailbox_client::MailboxClient;
use mailsuite_proto::*;
use mailsuite_runtime::Shutdown;
use mailsuite_testkit::{TestCerts, TestDb};
use serde_json::{Value, json};
use tonic::transport::Channel;

const USER: &str = "alice@example.test";
const PASSWORD: &str = "correct horse battery";

struct Env {
    _db: TestDb,
    certs: TestCerts,
    stores: Vec<SocketAddr>,
    pops: Vec<mailsuite_pop3_gateway::Started>,
    shutdowns: Vec<Shutdown>,
    dir: tempfile::TempDir,
    account: i64,
    messages: Vec<PathBuf>,
}

impl Drop for Env {
    fn drop(&mut self) {
        for s in &self.shutdowns {
            s.trigger();
        }
    }
}

async fn channel(addr: SocketAddr) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect to store")
}

/// Messages as SMTP would hand them over: CRLF lines, dots at line starts, one larger than
/// a fetch window many times over.
fn corpus() -> Vec<Vec<u8>> {
    let first = b"From: Bob <bob@remote.test>\r\nTo: alice@example.test\r\nSubject: dots\r\n\r\n\
.leading dot\r\n..two dots\r\n.\r\nmiddle . dot\r\nlast line\r\n"
        .to_vec();
    let mut second =
        b"From: carol@remote.test\r\nTo: alice@example.test\r\nSubject: lines\r\n\r\n".to_vec();
    for i in 1..=12 {
        second.extend_from_slice(format!("body line {i}\r\n").as_bytes());
    }
    let mut third =
        b"From: dave@remote.test\r\nSubject: large\r\nMIME-Version: 1.0\r\n\r\n".to_vec();
    for i in 0..4000 {
        third.extend_from_slice(format!(".{i:05} {}\r\n", "x".repeat(i % 70)).as_bytes());
    }
    vec![first, second, third]
}

async fn env() -> Env {
    let db = TestDb::new().await;
    let certs = TestCerts::new();
    let mut shutdowns = Vec::new();
    let mut stores = Vec::new();
    for _ in 0..2 {
        let c = mailsuite_mailbox_store::Config {
            listen_grpc: "127.0.0.1:0".into(),
            listen_ops: String::new(),
            database_url: db.url.clone(),
            db_max_connections: 10,
            ..Default::default()
        };
        let sd = Shutdown::new();
        let started = mailsuite_mailbox_store::start(c, sd.clone())
            .await
            .expect("store starts");
        stores.push(started.grpc);
        shutdowns.push(sd);
    }

    let mut admin = AdminClient::new(channel(stores[0]).await);
    admin
        .add_domain(AddDomainRequest {
            name: "example.test".into(),
            catch_all: String::new(),
        })
        .await
        .unwrap();
    let account = admin
        .add_account(AddAccountRequest {
            address: USER.into(),
            password: PASSWORD.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .id;

    let dir = tempfile::tempdir().unwrap();
    let mut delivery = DeliveryClient::new(channel(stores[1]).await);
    let mut messages = Vec::new();
    for (i, m) in corpus().into_iter().enumerate() {
        let header = DeliverHeader {
            idempotency_key: format!("pop3-e2e-{i}"),
            return_path: "bob@remote.test".into(),
            recipients: vec![USER.into()],
            ..Default::default()
        };
        let mut chunks = vec![DeliverChunk {
            part: Some(deliver_chunk::Part::Header(header)),
        }];
        chunks.extend(m.chunks(64 * 1024).map(|c| DeliverChunk {
            part: Some(deliver_chunk::Part::Data(c.to_vec().into())),
        }));
        let r = delivery
            .deliver(tokio_stream::iter(chunks))
            .await
            .expect("deliver")
            .into_inner();
        assert_eq!(r.results[0].status(), RecipientStatus::Delivered);
        let path = dir.path().join(format!("m{i}.eml"));
        std::fs::write(&path, &m).unwrap();
        messages.push(path);
    }

    let mut pops = Vec::new();
    for store in &stores {
        let mut c = mailsuite_pop3_gateway::Config {
            listen_pop3: "127.0.0.1:0".into(),
            listen_pop3s: "127.0.0.1:0".into(),
            listen_ops: "127.0.0.1:0".into(),
            store_url: format!("http://{store}"),
            tls: certs.tls_config(),
            ..Default::default()
        };
        c.limits.auth_failure_delay_ms = 10;
        c.limits.store_health_interval_secs = 1;
        // Windows that cut lines and chunks at odd places.
        c.limits.fetch_window_bytes = 3001;
        let sd = Shutdown::new();
        pops.push(
            mailsuite_pop3_gateway::start(c, sd.clone())
                .await
                .expect("pop3 starts"),
        );
        shutdowns.push(sd);
    }
    Env {
        _db: db,
        certs,
        stores,
        pops,
        shutdowns,
        dir,
        account,
        messages,
    }
}

impl Env {
    fn args(&self, extra: Value) -> Value {
        let mut a = json!({
            "pop3": self.pops[0].pop3.unwrap().port(),
            "pop3s": self.pops[0].pop3s.unwrap().port(),
            "other_pop3s": self.pops[1].pop3s.unwrap().port(),
            "ca": self.certs.ca_pem,
            "user": USER,
            "password": PASSWORD,
            "messages": self.messages,
        });
        for (k, v) in extra.as_object().unwrap() {
            a[k] = v.clone();
        }
        a
    }

    async fn python(&self, scenario: &str, extra: Value) -> Value {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/pop3_client.py");
        let out = tokio::time::timeout(
            Duration::from_secs(120),
            tokio::process::Command::new("python3")
                .arg(script)
                .arg(scenario)
                .arg(self.args(extra).to_string())
                .current_dir(self.dir.path())
                .output(),
        )
        .await
        .expect("poplib scenario finishes")
        .expect("python3 runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "{scenario} failed:\n{stderr}\n{stdout}"
        );
        serde_json::from_str(&stdout).expect("JSON from the script")
    }

    /// The store's view of the INBOX (what IMAP sees): uidvalidity and UIDs.
    async fn inbox(&self) -> (u32, Vec<u32>) {
        let r = MailboxClient::new(channel(self.stores[0]).await)
            .select(SelectRequest {
                account_id: self.account,
                name: "INBOX".into(),
                read_only: true,
            })
            .await
            .unwrap()
            .into_inner();
        (r.mailbox.unwrap().uidvalidity, r.uids)
    }

    async fn flags(&self, uid: u32) -> Vec<String> {
        let mut client = MailboxClient::new(channel(self.stores[0]).await);
        let mailbox_id = client
            .status(StatusRequest {
                account_id: self.account,
                name: "INBOX".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .id;
        let mut s = client
            .fetch(FetchRequest {
                account_id: self.account,
                mailbox_id,
                uids: Some(UidSet::from_uids([uid])),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        s.message().await.unwrap().expect("message").flags
    }
}

fn uidls(v: &Value) -> Vec<String> {
    v["uidl"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u.as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stls_session_reads_everything_and_dele_quit_removes() {
    let env = env().await;
    let (uidvalidity, uids) = env.inbox().await;
    assert_eq!(uids.len(), 3);
    let out = env
        .python("maildrop", json!({"via": "stls", "delete": [2]}))
        .await;
    let expected: Vec<String> = uids.iter().map(|u| format!("{uidvalidity}.{u}")).collect();
    assert_eq!(
        uidls(&out),
        expected,
        "UIDL is derived from uidvalidity and UID"
    );
    assert!(out["quit"].as_str().unwrap().contains("(2 messages left)"));

    // Gone from the store, i.e. from IMAP too; exactly that one.
    let (_, after) = env.inbox().await;
    assert_eq!(after, vec![uids[0], uids[2]]);
    // Retrieved messages read as seen in IMAP.
    assert!(env.flags(uids[0]).await.contains(&"\\Seen".to_string()));

    // A new session: numbering starts over, UIDL values stay what they were.
    let out = env
        .python(
            "maildrop",
            json!({"via": "ssl", "messages": [&env.messages[0], &env.messages[2]]}),
        )
        .await;
    assert_eq!(uidls(&out), vec![expected[0].clone(), expected[2].clone()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connection_removes_nothing_and_releases_the_lock() {
    let env = env().await;
    let (_, uids) = env.inbox().await;
    env.python(
        "maildrop",
        json!({"via": "ssl", "login": "plain", "delete": [1, 3], "drop": true}),
    )
    .await;
    // The next session can log in (the lock died with the connection) and sees all three.
    let env = &env;
    let out =
        mailsuite_testkit::eventually(Duration::from_secs(20), "lock released", || async move {
            let out = tokio::process::Command::new("python3")
                .arg(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/tests/py/pop3_client.py"
                ))
                .arg("maildrop")
                .arg(env.args(json!({"via": "ssl"})).to_string())
                .output()
                .await
                .unwrap();
            out.status.success().then_some(out)
        })
        .await;
    assert!(String::from_utf8_lossy(&out.stdout).contains("3 messages left"));
    assert_eq!(env.inbox().await.1, uids, "nothing was removed");
    assert!(
        !env.flags(uids[0]).await.contains(&"\\Deleted".to_string()),
        "not even flagged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_session_on_another_replica_gets_in_use() {
    let env = env().await;
    let out = env.python("in_use", json!({})).await;
    assert!(out["in_use"].as_str().unwrap().starts_with("-ERR [IN-USE]"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_get_auth_code_and_ops_endpoint_counts_them() {
    let env = env().await;
    let out = env.python("bad_login", json!({})).await;
    assert_eq!(
        out["user_pass"].as_str().unwrap(),
        "-ERR [AUTH] authentication failed"
    );
    let ops = env.pops[0].ops.unwrap();
    let body = mailsuite_testkit::http_get(ops, "/metrics").await;
    assert!(
        body.contains("mailsuite_pop3_logins_total"),
        "metrics exported: {body}"
    );
}

async fn http_status(addr: SocketAddr, path: &str) -> u16 {
    let response = mailsuite_testkit::http_get(addr, path).await;
    response.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// `/readyz` follows the store: ready while it serves, not ready once it is gone (the
/// gateway itself stays alive).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_store() {
    let env = env().await;
    let ops = [env.pops[0].ops.unwrap(), env.pops[1].ops.unwrap()];
    for addr in ops {
        mailsuite_testkit::eventually(Duration::from_secs(20), "gateway ready", || async move {
            (http_status(addr, "/readyz").await == 200).then_some(())
        })
        .await;
    }
    // Store 0, behind gateway 0, goes away.
    assert!(env.shutdowns[0].drain(Duration::from_secs(10)).await);
    let gone = ops[0];
    mailsuite_testkit::eventually(
        Duration::from_secs(20),
        "gateway 0 not ready",
        || async move { (http_status(gone, "/readyz").await == 503).then_some(()) },
    )
    .await;
    assert_eq!(http_status(ops[0], "/healthz").await, 200, "still alive");
    assert_eq!(
        http_status(ops[1], "/readyz").await,
        200,
        "its store still serves"
    );
}

/// With the mail store unreachable, a login gets `-ERR [SYS/TEMP]` promptly, not a hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_store_is_a_temporary_error() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let certs = TestCerts::new();
    let sd = Shutdown::new();
    let started = mailsuite_pop3_gateway::start(
        mailsuite_pop3_gateway::Config {
            listen_pop3: "127.0.0.1:0".into(),
            listen_pop3s: String::new(),
            listen_ops: "127.0.0.1:0".into(),
            store_url: format!("http://{dead_addr}"),
            tls: certs.tls_config(),
            auth: mailsuite_pop3_gateway::config::AuthConfig {
                allow_plaintext_loopback: true,
            },
            ..Default::default()
        },
        sd.clone(),
    )
    .await
    .unwrap();
    assert_eq!(
        started.pop3s, None,
        "an empty address disables the listener"
    );
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let s = tokio::net::TcpStream::connect(started.pop3.unwrap())
        .await
        .unwrap();
    let mut s = BufReader::new(s);
    let mut line = String::new();
    s.read_line(&mut line).await.unwrap();
    assert!(line.starts_with("+OK"));
    s.get_mut()
        .write_all(b"USER alice@example.test\r\nPASS pw\r\n")
        .await
        .unwrap();
    let mut replies = String::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        while !replies.contains("-ERR") {
            s.read_line(&mut replies).await.unwrap();
        }
    })
    .await
    .expect("an answer, not a hang");
    assert!(
        replies.ends_with("-ERR [SYS/TEMP] mail store temporarily unavailable\r\n"),
        "{replies}"
    );
    let ops = started.ops.unwrap();
    assert_eq!(http_status(ops, "/healthz").await, 200);
    assert_eq!(
        http_status(ops, "/readyz").await,
        503,
        "no store, not ready"
    );
    assert!(sd.drain(Duration::from_secs(10)).await);
}

/// L11: a gateway whose internal token the store refuses is misconfigured; its users get a
/// temporary error, not "[AUTH] authentication failed" (which would also count against
/// their address in the auth-failure limits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l11_refused_internal_token_is_a_temporary_error_not_bad_credentials() {
    let db = TestDb::new().await;
    let certs = TestCerts::new();
    let store_sd = Shutdown::new();
    let store = mailsuite_mailbox_store::start(
        mailsuite_mailbox_store::Config {
            listen_grpc: "127.0.0.1:0".into(),
            listen_ops: String::new(),
            database_url: db.url.clone(),
            db_max_connections: 4,
            internal_token: mailsuite_runtime::grpc::InternalToken("the-right-one".into()),
            ..Default::default()
        },
        store_sd.clone(),
    )
    .await
    .expect("store starts");
    let sd = Shutdown::new();
    let started = mailsuite_pop3_gateway::start(
        mailsuite_pop3_gateway::Config {
            listen_pop3: "127.0.0.1:0".into(),
            listen_pop3s: String::new(),
            listen_ops: String::new(),
            store_url: format!("http://{}", store.grpc),
            internal_token: mailsuite_runtime::grpc::InternalToken("a-wrong-one".into()),
            tls: certs.tls_config(),
            auth: mailsuite_pop3_gateway::config::AuthConfig {
                allow_plaintext_loopback: true,
            },
            ..Default::default()
        },
        sd.clone(),
    )
    .await
    .unwrap();
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let s = tokio::net::TcpStream::connect(started.pop3.unwrap())
        .await
        .unwrap();
    let mut s = BufReader::new(s);
    let mut line = String::new();
    s.read_line(&mut line).await.unwrap();
    assert!(line.starts_with("+OK"), "{line}");
    s.get_mut()
        .write_all(b"USER alice@example.test\r\nPASS pw\r\n")
        .await
        .unwrap();
    let mut replies = String::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        while !replies.contains("-ERR") {
            s.read_line(&mut replies).await.unwrap();
        }
    })
    .await
    .expect("an answer, not a hang");
    let last = replies.lines().last().unwrap_or_default();
    assert!(last.starts_with("-ERR [SYS/TEMP]"), "{replies}");
    assert!(sd.drain(Duration::from_secs(10)).await);
    assert!(store_sd.drain(Duration::from_secs(10)).await);
}
