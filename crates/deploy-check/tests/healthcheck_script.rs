//! deploy/healthcheck.sh (the images' HEALTHCHECK, with no curl in the image) judges a real
//! ops endpoint correctly: healthy only while /readyz answers 200.

use std::process::Command;

use mailsuite_deploy_check::repo_root;
use mailsuite_runtime::Shutdown;
use mailsuite_runtime::ops::Ops;

fn run(port: u16, path: Option<&str>) -> std::process::Output {
    let mut cmd = Command::new("bash");
    cmd.arg(repo_root().join("deploy/healthcheck.sh"))
        .arg(port.to_string());
    if let Some(p) = path {
        cmd.arg(p);
    }
    cmd.output().expect("bash runs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_only_when_ready() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let ops = Ops::default();
    let shutdown = Shutdown::new();
    let server = tokio::spawn(ops.clone().serve(listener, shutdown.clone()));

    let out = tokio::task::spawn_blocking(move || run(port, None))
        .await
        .unwrap();
    assert!(!out.status.success(), "not ready yet must be unhealthy");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("503"),
        "{out:?}"
    );

    // Alive (the liveness path) even while not ready.
    let out = tokio::task::spawn_blocking(move || run(port, Some("/healthz")))
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    ops.set_ready(true);
    let out = tokio::task::spawn_blocking(move || run(port, None))
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    shutdown.trigger();
    server.await.unwrap();
    let out = tokio::task::spawn_blocking(move || run(port, None))
        .await
        .unwrap();
    assert!(!out.status.success(), "a stopped service is unhealthy");
}
