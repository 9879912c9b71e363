//! How many `Mailbox.Changes` calls IDLE makes, counted on the store's own ops page. One
//! delivery wakes every IDLE session of the account; each re-IDLE must not add a poll of its
//! own (10,000 sessions made ~7.5 calls per notification when it did). The metrics registry is
//! per process, so this file holds a single test.

mod common;

use std::net::SocketAddr;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn changes_calls(ops: SocketAddr) -> u64 {
    let mut s = tokio::net::TcpStream::connect(ops).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: store\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut page = String::new();
    tokio::time::timeout(TIMEOUT, s.read_to_string(&mut page))
        .await
        .expect("metrics page in time")
        .unwrap();
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    page.lines()
        .filter(|l| l.starts_with("mailsuite_grpc_server_duration_seconds_count{"))
        .filter(|l| {
            l.contains("rpc_method=\"Changes\"")
                && l.contains("rpc_service=\"mailsuite.v1.Mailbox\"")
        })
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

const MSG: &[u8] = b"From: a@remote.test\r\nTo: bob@example.test\r\nSubject: hi\r\n\r\nhello\r\n";

/// IDLE, then DONE, and the tagged OK.
async fn idle_and_done(c: &mut Client) {
    let tag = c.next_tag();
    c.send(format!("{tag} IDLE\r\n").as_bytes()).await;
    let l = c.line().await;
    assert!(l.starts_with("+ "), "{l}");
    c.send(b"DONE\r\n").await;
    let l = c.line().await;
    assert!(l.starts_with(&format!("{tag} OK")), "{l}");
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_polls_the_store_only_when_something_changed() {
    let env = env().await;
    let ops = env.store_ops;
    env.account("bob@example.test").await;
    env.deliver("bob@example.test", MSG).await;
    let mut c = env.login("bob@example.test").await;
    let r = c.cmd("SELECT INBOX").await;
    assert!(r.contains("* 1 EXISTS"), "{r}");
    env.until_watched("bob@example.test").await;

    // Nothing changes: entering and leaving IDLE five times asks the store nothing.
    let before = changes_calls(ops).await;
    for _ in 0..5 {
        idle_and_done(&mut c).await;
    }
    assert_eq!(
        changes_calls(ops).await - before,
        0,
        "re-IDLE without a change"
    );

    // A delivery during IDLE is reported at once, through one Changes call.
    let before = changes_calls(ops).await;
    let tag = c.next_tag();
    c.send(format!("{tag} IDLE\r\n").as_bytes()).await;
    let l = c.line().await;
    assert!(l.starts_with("+ "), "{l}");
    env.deliver("bob@example.test", MSG).await;
    let l = c.line().await;
    assert_eq!(l, "* 2 EXISTS\r\n");
    c.send(b"DONE\r\n").await;
    let l = c.line().await;
    assert!(l.starts_with(&format!("{tag} OK")), "{l}");
    let calls = changes_calls(ops).await - before;
    assert!(
        (1..=2).contains(&calls),
        "{calls} Changes calls for one delivery"
    );
    // And the next IDLE does not ask again.
    let before = changes_calls(ops).await;
    idle_and_done(&mut c).await;
    assert_eq!(changes_calls(ops).await - before, 0);
    env.stop().await;
}
