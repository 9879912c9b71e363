//! Load generator: how much memory do IDLE sessions cost?
//!
//! Starts a mailbox-store on a fresh test database and the gateway in this process, opens N
//! plaintext loopback sessions that log in, SELECT INBOX and IDLE, then reports the growth of
//! the process's resident memory per session. Client sockets live in the same process, so the
//! figure is an upper bound for the gateway alone.
//!
//! `cargo run -p mailsuite-imap-gateway --example idle_memory -- 2000`

use std::time::{Duration, Instant};

use mailsuite_proto::admin_client::AdminClient;
use mailsuite_proto::{AddAccountRequest, AddDomainRequest};
use mailsuite_runtime::Shutdown;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|v| v.parse().unwrap_or(0)))
        })
        .unwrap_or(0)
}

async fn until(r: &mut BufReader<TcpStream>, prefix: &str) {
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).await.unwrap() == 0 {
            panic!("connection closed");
        }
        if line.starts_with(prefix) {
            return;
        }
    }
}

async fn idle_session(addr: std::net::SocketAddr) -> BufReader<TcpStream> {
    let s = TcpStream::connect(addr).await.unwrap();
    let mut r = BufReader::with_capacity(512, s);
    until(&mut r, "* OK").await;
    r.get_mut()
        .write_all(b"a LOGIN user@bench.test pw\r\nb SELECT INBOX\r\nc IDLE\r\n")
        .await
        .unwrap();
    until(&mut r, "a OK").await;
    until(&mut r, "b OK").await;
    until(&mut r, "+ ").await;
    r
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2000);
    let db = mailsuite_testkit::TestDb::new().await;
    let sd = Shutdown::new();
    let store = mailsuite_mailbox_store::start(
        mailsuite_mailbox_store::Config {
            listen_grpc: "127.0.0.1:0".into(),
            listen_ops: String::new(),
            database_url: db.url.clone(),
            ..Default::default()
        },
        sd.clone(),
    )
    .await
    .unwrap();
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", store.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut admin = AdminClient::new(ch);
    admin
        .add_domain(AddDomainRequest {
            name: "bench.test".into(),
            catch_all: String::new(),
        })
        .await
        .unwrap();
    admin
        .add_account(AddAccountRequest {
            address: "user@bench.test".into(),
            password: "pw".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut cfg = mailsuite_imap_gateway::Config {
        listen_imap: "127.0.0.1:0".into(),
        listen_imaps: String::new(),
        listen_ops: String::new(),
        store_url: format!("http://{}", store.grpc),
        ..Default::default()
    };
    cfg.auth.allow_plaintext_loopback = true;
    cfg.limits.connections.max_per_ip = 0;
    cfg.limits.connections.max_connections = 0;
    cfg.limits.max_sessions_per_account = 0;
    cfg.limits.commands_per_second = 0;
    let gw = mailsuite_imap_gateway::start(cfg, sd.clone()).await.unwrap();
    let addr = gw.imap.unwrap();

    // Warm up allocator pools, the gRPC channel and the watch stream.
    let mut sessions = vec![idle_session(addr).await];
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib();
    let t0 = Instant::now();
    let mut pending = Vec::new();
    for _ in 1..n {
        pending.push(tokio::spawn(idle_session(addr)));
        if pending.len() == 16 {
            for p in pending.drain(..) {
                sessions.push(p.await.unwrap());
            }
        }
    }
    for p in pending.drain(..) {
        sessions.push(p.await.unwrap());
    }
    let after = rss_kib();
    println!(
        "{} IDLE sessions open in {:.1?}; RSS {} MiB -> {} MiB: {:.1} KiB per session (client sockets included)",
        sessions.len(),
        t0.elapsed(),
        before / 1024,
        after / 1024,
        (after.saturating_sub(before)) as f64 / (n.max(2) - 1) as f64
    );
    drop(sessions);
    sd.drain(Duration::from_secs(5)).await;
}
