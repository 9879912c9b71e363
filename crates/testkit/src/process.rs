//! Running a service *binary* as an operator would: pick free ports, spawn it, wait until it
//! reports ready (ops `/readyz` or gRPC health), and stop it with SIGTERM.

use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

pub fn free_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// Run `bin` to its exit (a start-up that must fail), with `env` set and
/// `MAILSUITE_INTERNAL_TOKEN` removed; its exit status and standard error. Panics (after
/// killing it) if it is still running after `timeout`.
pub fn run_to_exit(
    bin: &str,
    args: &[&str],
    env: &[(&str, &str)],
    timeout: Duration,
) -> (ExitStatus, String) {
    let mut c = Command::new(bin);
    c.args(args)
        .env_remove("MAILSUITE_INTERNAL_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c.spawn().unwrap_or_else(|e| panic!("spawn {bin}: {e}"));
    // Drained on its own thread so a chatty child cannot block on a full pipe.
    let mut stderr = child.stderr.take().expect("piped stderr");
    let reader = std::thread::spawn(move || {
        let mut err = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut err);
        err
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{bin} {args:?} was still running after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status, reader.join().unwrap_or_default())
}

pub struct ServiceProcess {
    child: Option<Child>,
    pub name: String,
}

impl ServiceProcess {
    pub fn spawn(bin: &str, args: &[String], env: &[(&str, &str)]) -> ServiceProcess {
        let mut c = Command::new(bin);
        c.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .env("MAILSUITE_LOG", "warn");
        for (k, v) in env {
            c.env(k, v);
        }
        let child = c.spawn().unwrap_or_else(|e| panic!("spawn {bin}: {e}"));
        ServiceProcess {
            child: Some(child),
            name: bin.to_string(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Panics if the process already exited (a crash at start-up).
    pub fn assert_running(&mut self) {
        if let Some(c) = self.child.as_mut()
            && let Ok(Some(status)) = c.try_wait()
        {
            panic!("{} exited early: {status:?}", self.name);
        }
    }

    /// Send SIGTERM and wait (bounded) for the exit status. Async so that the caller's
    /// runtime keeps driving its own connections (e.g. a gRPC client closing) meanwhile.
    pub async fn terminate(mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("child");
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = child.try_wait().expect("wait") {
                return s;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                panic!("{} did not exit within {timeout:?} of SIGTERM", self.name);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// GET `path` on `addr` until it answers 200, or panic after `timeout`.
pub async fn wait_http_ok(proc_: &mut ServiceProcess, addr: &str, path: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        proc_.assert_running();
        if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
            let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            if s.write_all(req.as_bytes()).await.is_ok() {
                let mut out = String::new();
                let _ =
                    tokio::time::timeout(Duration::from_secs(2), s.read_to_string(&mut out)).await;
                if out.starts_with("HTTP/1.1 200") {
                    return;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "{} not ready at http://{addr}{path} within {timeout:?}",
            proc_.name
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Wait until the gRPC health service at `addr` reports SERVING for `service` ("" = overall).
pub async fn wait_grpc_serving(
    proc_: &mut ServiceProcess,
    addr: &str,
    service: &str,
    timeout: Duration,
) {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let deadline = Instant::now() + timeout;
    let url = format!("http://{addr}");
    loop {
        proc_.assert_running();
        if let Ok(ch) = tonic::transport::Endpoint::from_shared(url.clone())
            .expect("url")
            .connect()
            .await
        {
            let mut c = HealthClient::new(ch);
            if let Ok(r) = c
                .check(HealthCheckRequest {
                    service: service.to_string(),
                })
                .await
                && r.into_inner().status == 1
            {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{} gRPC health not SERVING at {addr} within {timeout:?}",
            proc_.name
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `bin --help` exits 0 and documents the common flags.
pub fn assert_help(bin: &str) {
    let out = Command::new(bin)
        .arg("--help")
        .output()
        .expect("run --help");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{bin} --help failed: {out:?}");
    assert!(
        text.contains("--config") && text.contains("--set"),
        "{bin} --help lacks --config/--set:\n{text}"
    );
}

/// Read the first bytes a server sends on connect.
pub async fn read_greeting(addr: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    let mut buf = vec![0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("greeting within 10 s")
        .expect("read greeting");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// The life of a service binary: `--help`; start with `--set key=value` for each setting;
/// ready on its ops endpoint (`/readyz`); the protocol greeting on `greeting.0` starts with
/// `greeting.1`; SIGTERM → exit status 0 within 30 s.
pub async fn check_service_binary(
    bin: &str,
    settings: &[(&str, String)],
    env: &[(&str, &str)],
    ops_addr: &str,
    greeting: Option<(&str, &str)>,
) {
    assert_help(bin);
    let args: Vec<String> = settings
        .iter()
        .flat_map(|(k, v)| ["--set".to_string(), format!("{k}={v}")])
        .collect();
    let mut p = ServiceProcess::spawn(bin, &args, env);
    wait_http_ok(&mut p, ops_addr, "/readyz", Duration::from_secs(60)).await;
    if let Some((addr, prefix)) = greeting {
        let g = read_greeting(addr).await;
        assert!(g.starts_with(prefix), "{bin}: greeting {g:?}");
    }
    let status = p.terminate(Duration::from_secs(30)).await;
    assert!(status.success(), "{bin}: exit on SIGTERM: {status:?}");
}

/// H4 (security review 2026-12-02): the service binary `bin`, given a database but no
/// internal token, must refuse to serve gRPC on a non-loopback address, and say why.
pub async fn assert_refuses_public_grpc_without_token(bin: &'static str) {
    let db = crate::TestDb::new().await;
    let url = db.url.clone();
    let (status, err) = tokio::task::spawn_blocking(move || {
        run_to_exit(
            bin,
            &["--set", "listen_grpc=0.0.0.0:0", "--set", "listen_ops="],
            &[("DATABASE_URL", &url)],
            Duration::from_secs(60),
        )
    })
    .await
    .expect("run_to_exit");
    assert!(!status.success(), "exit status {status}");
    assert!(
        err.contains("refusing to serve gRPC") && err.contains("internal_token"),
        "{err}"
    );
}

/// A gRPC health service reporting `mailsuite.v1.Mailbox` SERVING, standing in for the store
/// whose health a gateway's `/readyz` follows. Returns its `http://` URL; dropping the handle
/// leaves it running until the test's runtime ends (abort it to take the "store" away).
pub async fn store_health_standin() -> (String, tokio::task::JoinHandle<()>) {
    let (reporter, health) = mailsuite_runtime::grpc::health_reporter();
    reporter
        .set_service_status("mailsuite.v1.Mailbox", tonic_health::ServingStatus::Serving)
        .await;
    let (listener, addr) = mailsuite_runtime::grpc::bind("127.0.0.1:0")
        .await
        .expect("bind the health stand-in");
    let server = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(health)
            .serve_with_incoming(mailsuite_runtime::grpc::incoming(listener))
            .await;
    });
    (format!("http://{addr}"), server)
}
