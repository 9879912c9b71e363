//! Graceful shutdown over real sockets with the runtime's building blocks (LimitedListener +
//! Shutdown), the way every protocol service uses them: on `stop` the listener closes, an
//! idle session gets its goodbye at once, a busy one finishes its command first; after the
//! grace period `force` ends the rest.

use std::time::Duration;

use mailsuite_runtime::Shutdown;
use mailsuite_runtime::listener::{Admission, ConnLimits, LimitedListener};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// A toy line protocol: "BUSY" starts a long command that ends with a "DONE" line.
async fn session(stream: TcpStream, shutdown: Shutdown) {
    let (r, mut w) = stream.into_split();
    let mut lines = BufReader::new(r).lines();
    let _ = w.write_all(b"HELLO\r\n").await;
    loop {
        let line = tokio::select! {
            l = lines.next_line() => l,
            _ = shutdown.stopping() => {
                let _ = w.write_all(b"BYE shutting down\r\n").await;
                return;
            }
        };
        match line {
            Ok(Some(l)) if l == "BUSY" => {
                // A command in progress is allowed to finish, unless forced.
                let _ = w.write_all(b"WORKING\r\n").await;
                tokio::select! {
                    l = lines.next_line() => {
                        if matches!(l, Ok(Some(ref d)) if d == "DONE") {
                            let _ = w.write_all(b"OK done\r\n").await;
                        }
                    }
                    _ = shutdown.forced() => {
                        let _ = w.write_all(b"BYE forced\r\n").await;
                        return;
                    }
                }
            }
            Ok(Some(_)) => {
                let _ = w.write_all(b"OK\r\n").await;
            }
            _ => return,
        }
    }
}

async fn serve(listener: LimitedListener, shutdown: Shutdown) {
    loop {
        let adm = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.stopping() => return,
        };
        if let Ok(Admission::Accepted { stream, guard, .. }) = adm {
            let sd = shutdown.clone();
            shutdown.spawn(async move {
                session(stream, sd).await;
                drop(guard);
            });
        }
    }
}

async fn start() -> (std::net::SocketAddr, Shutdown) {
    let l = LimitedListener::bind("127.0.0.1:0", ConnLimits::default())
        .await
        .unwrap();
    let addr = l.local_addr().unwrap();
    let sd = Shutdown::new();
    sd.spawn(serve(l, sd.clone()));
    (addr, sd)
}

async fn read_line(r: &mut tokio::io::Lines<BufReader<tokio::net::tcp::OwnedReadHalf>>) -> String {
    tokio::time::timeout(Duration::from_secs(5), r.next_line())
        .await
        .expect("line within 5s")
        .unwrap()
        .unwrap_or_default()
}

#[tokio::test]
async fn busy_session_finishes_then_idle_ones_get_goodbye() {
    let (addr, sd) = start().await;
    let (r, mut w) = TcpStream::connect(addr).await.unwrap().into_split();
    let mut r = BufReader::new(r).lines();
    assert_eq!(read_line(&mut r).await, "HELLO");
    w.write_all(b"BUSY\r\n").await.unwrap();
    assert_eq!(read_line(&mut r).await, "WORKING");

    let (idle_r, _idle_w) = TcpStream::connect(addr).await.unwrap().into_split();
    let mut idle_r = BufReader::new(idle_r).lines();
    assert_eq!(read_line(&mut idle_r).await, "HELLO");

    let drain = tokio::spawn({
        let sd = sd.clone();
        async move { sd.drain(Duration::from_secs(10)).await }
    });
    assert_eq!(read_line(&mut idle_r).await, "BYE shutting down");
    // The busy session is still alive and completes its command.
    w.write_all(b"DONE\r\n").await.unwrap();
    assert_eq!(read_line(&mut r).await, "OK done");
    assert_eq!(read_line(&mut r).await, "BYE shutting down");
    assert!(drain.await.unwrap(), "drained within the grace period");
    assert!(
        TcpStream::connect(addr).await.is_err(),
        "listener closed after shutdown"
    );
}

#[tokio::test]
async fn stuck_session_is_forced_after_grace() {
    let (addr, sd) = start().await;
    let (r, mut w) = TcpStream::connect(addr).await.unwrap().into_split();
    let mut r = BufReader::new(r).lines();
    assert_eq!(read_line(&mut r).await, "HELLO");
    w.write_all(b"BUSY\r\n").await.unwrap();
    assert_eq!(read_line(&mut r).await, "WORKING");
    let clean = sd.drain(Duration::from_millis(200)).await;
    assert!(!clean);
    assert_eq!(read_line(&mut r).await, "BYE forced");
}
