//! Issue 13: one delivery to an account with many IDLE sessions must cost the store one
//! `Mailbox.Changes` call per mailbox change, not one per session (the gateway computes the
//! changes once and fans them out). Counted on the store's own ops page; the metrics
//! registry is per process, so this file holds a single test.

mod common;

use common::*;
use futures::StreamExt;

const MSG: &[u8] = b"From: a@remote.test\r\nTo: bob@example.test\r\nSubject: hi\r\n\r\nhello\r\n";

const SESSIONS: usize = 1000;
/// The other shape: many accounts with a few sessions each.
const ACCOUNTS: usize = 20;
const PER_ACCOUNT: usize = 10;

/// A plain loopback session of `user`, INBOX selected (holding `exists` messages), in IDLE.
async fn idling(env: &Env, user: &str, exists: u32) -> Client {
    let mut c = env.plain().await;
    let r = c.cmd(&format!("LOGIN {user} \"{PASSWORD}\"")).await;
    assert!(tagged(&r).contains(" OK "), "{r}");
    let r = c.cmd("SELECT INBOX").await;
    assert!(r.contains(&format!("* {exists} EXISTS")), "{r}");
    c.send(b"i IDLE\r\n").await;
    assert_eq!(c.line().await, "+ idling\r\n");
    c
}

/// Read lines until one starts with `want` (IDLE may interleave other untagged data).
async fn until_line(c: &mut Client, want: &str) {
    loop {
        let l = c.line().await;
        if l.starts_with(want) {
            return;
        }
        assert!(l.starts_with("* "), "unexpected during IDLE: {l}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_fanout_one_changes_call_per_mailbox_change() {
    let env = env_with(|c| {
        c.auth.allow_plaintext_loopback = true;
        c.limits.connections.max_per_ip = 0;
        c.limits.connections.max_connections = 0;
        c.limits.idle_timeout_secs = 3600;
        c.limits.max_sessions_per_account = 0;
    })
    .await;
    let ops = env.store_ops;
    env.account("bob@example.test").await;
    env.deliver("bob@example.test", MSG).await;

    // SESSIONS plain connections on loopback, each logged in, INBOX selected, IDLE.
    let env_ref = &env;
    let mut clients: Vec<Client> = futures::stream::iter(0..SESSIONS)
        .map(|_| idling(env_ref, "bob@example.test", 1))
        .buffer_unordered(4)
        .collect()
        .await;
    env.until_watched("bob@example.test").await;

    // One delivery: every session hears of it, and the store computed the change once.
    let before = store_calls(ops, "Changes").await;
    env.deliver("bob@example.test", MSG).await;
    for c in clients.iter_mut() {
        until_line(c, "* 2 EXISTS\r\n").await;
    }
    let calls = store_calls(ops, "Changes").await - before;
    eprintln!("{calls} Changes calls for one delivery to {SESSIONS} IDLE sessions");
    assert!(
        (1..=2).contains(&calls),
        "{calls} Changes calls for one delivery to {SESSIONS} IDLE sessions"
    );

    // A flag change made by another session reaches every IDLE session, again computed once
    // (plus at most the writer's own poll).
    let mut w = env.plain().await;
    let r = w
        .cmd(&format!("LOGIN bob@example.test \"{PASSWORD}\""))
        .await;
    assert!(tagged(&r).contains(" OK "), "{r}");
    w.cmd("SELECT INBOX").await;
    let before = store_calls(ops, "Changes").await;
    let r = w.cmd("STORE 1 +FLAGS.SILENT (\\Flagged)").await;
    assert!(tagged(&r).contains(" OK "), "{r}");
    for c in clients.iter_mut() {
        until_line(c, "* 1 FETCH (FLAGS (\\Flagged").await;
    }
    let calls = store_calls(ops, "Changes").await - before;
    eprintln!("{calls} Changes calls for one flag change");
    assert!(
        (1..=3).contains(&calls),
        "{calls} Changes calls for one flag change seen by {SESSIONS} IDLE sessions"
    );

    // And an expunge.
    let before = store_calls(ops, "Changes").await;
    w.cmd("STORE 1 +FLAGS.SILENT (\\Deleted)").await;
    let r = w.cmd("EXPUNGE").await;
    assert!(r.contains("* 1 EXPUNGE"), "{r}");
    for c in clients.iter_mut() {
        until_line(c, "* 1 EXPUNGE\r\n").await;
    }
    let calls = store_calls(ops, "Changes").await - before;
    eprintln!("{calls} Changes calls for a flag change and an expunge");
    assert!(
        (1..=4).contains(&calls),
        "{calls} Changes calls for one flag change and one expunge seen by {SESSIONS} IDLE sessions"
    );
    drop(clients);

    // ACCOUNTS accounts with PER_ACCOUNT IDLE sessions each, one delivery to every account:
    // one poll per account (mailbox), not per session.
    let users: Vec<String> = (0..ACCOUNTS)
        .map(|i| format!("u{i}@example.test"))
        .collect();
    for u in &users {
        env.account(u).await;
    }
    let mut groups = Vec::new();
    for u in &users {
        let g: Vec<Client> = futures::stream::iter(0..PER_ACCOUNT)
            .map(|_| idling(env_ref, u, 0))
            .buffer_unordered(4)
            .collect()
            .await;
        env.until_watched(u).await;
        groups.push(g);
    }
    let before = store_calls(ops, "Changes").await;
    for u in &users {
        env.deliver(u, MSG).await;
    }
    for c in groups.iter_mut().flatten() {
        until_line(c, "* 1 EXISTS\r\n").await;
    }
    let calls = store_calls(ops, "Changes").await - before;
    eprintln!(
        "{calls} Changes calls for one delivery to each of {ACCOUNTS} accounts x {PER_ACCOUNT} IDLE sessions"
    );
    assert!(
        (ACCOUNTS as u64..=2 * ACCOUNTS as u64).contains(&calls),
        "{calls} Changes calls for {ACCOUNTS} deliveries"
    );
    env.stop().await;
}
