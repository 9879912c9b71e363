//! Load generator: how much memory do IDLE sessions cost?
//!
//! Starts a mailbox-store on a fresh test database in this process and the gateway binary as
//! a separate process, opens N plaintext loopback sessions that log in, SELECT INBOX and IDLE,
//! then reports the gateway process's resident memory growth per session. With `tls` as the
//! second argument the sessions use implicit TLS (port 993 style) instead.
//!
//! `cargo build -p mailsuite-imap-gateway --bins --examples &&
//!  target/debug/examples/idle_memory 2000 [tls]`

use std::time::{Duration, Instant};

use mailsuite_proto::admin_client::AdminClient;
use mailsuite_proto::{AddAccountRequest, AddDomainRequest};
use mailsuite_runtime::Shutdown;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|v| v.parse().unwrap_or(0)))
        })
        .unwrap_or(0)
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

async fn until(r: &mut BufReader<Box<dyn Io>>, prefix: &str) {
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

async fn idle_session(
    addr: std::net::SocketAddr,
    tls: Option<tokio_rustls::TlsConnector>,
) -> BufReader<Box<dyn Io>> {
    let s = TcpStream::connect(addr).await.unwrap();
    let io: Box<dyn Io> = match tls {
        Some(c) => {
            let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
            Box::new(c.connect(name, s).await.unwrap())
        }
        None => Box::new(s),
    };
    let mut r = BufReader::with_capacity(512, io);
    until(&mut r, "* OK").await;
    r.get_mut()
        .write_all(b"a LOGIN user@bench.test pw\r\nb SELECT INBOX\r\nc IDLE\r\n")
        .await
        .unwrap();
    r.get_mut().flush().await.unwrap();
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
    let use_tls = std::env::args().nth(2).as_deref() == Some("tls");
    let certs = mailsuite_testkit::TestCerts::new();
    let connector = use_tls.then(|| tokio_rustls::TlsConnector::from(certs.client_config()));
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
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("imap-gateway"))
        .expect("target dir");
    let mut child = std::process::Command::new(&bin)
        .args([
            "--set",
            &if use_tls {
                format!("listen_imaps=\"127.0.0.1:{port}\"")
            } else {
                format!("listen_imap=\"127.0.0.1:{port}\"")
            },
            "--set",
            if use_tls {
                "listen_imap=\"\""
            } else {
                "listen_imaps=\"\""
            },
            "--set",
            &format!("tls.cert=\"{}\"", certs.cert_pem.display()),
            "--set",
            &format!("tls.key=\"{}\"", certs.key_pem.display()),
            "--set",
            "listen_ops=\"\"",
            "--set",
            &format!("store_url=\"http://{}\"", store.grpc),
            "--set",
            "auth.allow_plaintext_loopback=true",
            "--set",
            "limits.connections.max_per_ip=0",
            "--set",
            "limits.connections.max_connections=0",
            "--set",
            "limits.max_sessions_per_account=0",
            "--set",
            "limits.commands_per_second=0",
        ])
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap_or_else(|e| panic!("{}: {e} (build it with --bins)", bin.display()));
    let pid = child.id();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "gateway did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Warm up allocator pools, the gRPC channel and the watch stream.
    let mut sessions = vec![idle_session(addr, connector.clone()).await];
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(pid);
    let t0 = Instant::now();
    let mut pending = Vec::new();
    for _ in 1..n {
        pending.push(tokio::spawn(idle_session(addr, connector.clone())));
        if pending.len() == 16 {
            for p in pending.drain(..) {
                sessions.push(p.await.unwrap());
            }
        }
    }
    for p in pending.drain(..) {
        sessions.push(p.await.unwrap());
    }
    let after = rss_kib(pid);
    println!(
        "{} IDLE sessions ({}) open in {:.1?}; RSS {} MiB -> {} MiB: {:.1} KiB per session (gateway process)",
        sessions.len(),
        if use_tls { "TLS" } else { "plaintext" },
        t0.elapsed(),
        before / 1024,
        after / 1024,
        (after.saturating_sub(before)) as f64 / (n.max(2) - 1) as f64
    );
    drop(sessions);
    let _ = child.kill();
    let _ = child.wait();
    sd.drain(Duration::from_secs(5)).await;
}
