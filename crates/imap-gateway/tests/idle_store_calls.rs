//! How many `Mailbox.Changes` calls IDLE makes, counted on the store's own ops page. One
//! delivery wakes every IDLE session of the account; each re-IDLE must not add a poll of its
//! own (10,000 sessions made ~7.5 calls per notification when it did). The metrics registry is
//! per process, so this file holds a single test.

mod common;

use common::*;

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
    let before = store_calls(ops, "Changes").await;
    for _ in 0..5 {
        idle_and_done(&mut c).await;
    }
    assert_eq!(
        store_calls(ops, "Changes").await - before,
        0,
        "re-IDLE without a change"
    );

    // A delivery during IDLE is reported at once, through one Changes call.
    let before = store_calls(ops, "Changes").await;
    let tag = c.next_tag();
    c.send(format!("{tag} IDLE\r\n").as_bytes()).await;
    let l = c.line().await;
    assert!(l.starts_with("+ "), "{l}");
    env.deliver("bob@example.test", MSG).await;
    let l = c.line().await;
    assert_eq!(l, "* 2 EXISTS\r\n");
    // The message was delivered after this (read-write) session selected INBOX: it is recent.
    let l = c.line().await;
    assert_eq!(l, "* 2 RECENT\r\n");
    c.send(b"DONE\r\n").await;
    let l = c.line().await;
    assert!(l.starts_with(&format!("{tag} OK")), "{l}");
    let calls = store_calls(ops, "Changes").await - before;
    assert!(
        (1..=2).contains(&calls),
        "{calls} Changes calls for one delivery"
    );
    // And the next IDLE does not ask again.
    let before = store_calls(ops, "Changes").await;
    idle_and_done(&mut c).await;
    assert_eq!(store_calls(ops, "Changes").await - before, 0);
    env.stop().await;
}
