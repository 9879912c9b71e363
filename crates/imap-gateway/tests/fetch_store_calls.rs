//! How many store calls a FETCH makes, counted on the store's own ops page
//! (`mailsuite_grpc_server_duration_seconds_count` per gRPC method). The metrics registry is
//! per process, so this file holds a single test: nothing else in this binary calls the store.

mod common;

use std::net::SocketAddr;

use common::*;

/// Messages per FETCH chunk in this test: 20 messages are 3 chunks.
const BATCH: u32 = 8;

/// (Fetch, FetchBody, StoreFlags) calls so far.
async fn counts(ops: SocketAddr) -> (u64, u64, u64) {
    (
        store_calls(ops, "Fetch").await,
        store_calls(ops, "FetchBody").await,
        store_calls(ops, "StoreFlags").await,
    )
}

async fn delta(ops: SocketAddr, before: (u64, u64, u64)) -> (u64, u64, u64) {
    let now = counts(ops).await;
    (now.0 - before.0, now.1 - before.1, now.2 - before.2)
}

fn message(i: usize) -> Vec<u8> {
    // Sizes differ so that a body written under the wrong message number would show.
    format!(
        "From: a@remote.test\r\nTo: bob@example.test\r\nSubject: number {i}\r\n\
         Message-ID: <{i}@remote.test>\r\n\r\nbody of message {i}\r\n{}\r\n",
        "x".repeat(i * 37)
    )
    .into_bytes()
}

/// The exact bytes of `* seq FETCH (<prefix>BODY[] {n}\r\n<msg>)\r\n` for every message.
fn expected_bodies(msgs: &[Vec<u8>], prefix: impl Fn(usize) -> String) -> Vec<u8> {
    let mut v = Vec::new();
    for (k, m) in msgs.iter().enumerate() {
        v.extend_from_slice(
            format!("* {} FETCH ({}BODY[] {{{}}}\r\n", k + 1, prefix(k), m.len()).as_bytes(),
        );
        v.extend_from_slice(m);
        v.extend_from_slice(b")\r\n");
    }
    v
}

#[tokio::test(flavor = "multi_thread")]
async fn fetch_makes_one_body_call_per_chunk_and_skips_metadata_it_does_not_need() {
    let env = env_with(|c| c.limits.fetch_batch = BATCH).await;
    let ops = env.store_ops;
    env.account("bob@example.test").await;
    let msgs: Vec<Vec<u8>> = (1..=20).map(message).collect();
    for m in &msgs {
        env.deliver("bob@example.test", m).await;
    }
    let mut c = env.login("bob@example.test").await;
    let r = c.cmd("SELECT INBOX").await;
    assert!(r.contains("* 20 EXISTS"), "{r}");

    // Bodies only: one FetchBody per chunk of 8, no metadata call, bytes exact and in order.
    let before = counts(ops).await;
    let r = c.cmd_bytes(b"FETCH 1:20 BODY.PEEK[]").await;
    let want = expected_bodies(&msgs, |_| String::new());
    assert_eq!(
        String::from_utf8_lossy(&r[..want.len().min(r.len())]),
        String::from_utf8_lossy(&want)
    );
    let rest = String::from_utf8_lossy(&r[want.len()..]);
    assert!(
        rest.starts_with('t') && rest.contains(" OK FETCH"),
        "{rest}"
    );
    assert_eq!(
        delta(ops, before).await,
        (0, 3, 0),
        "Fetch, FetchBody, StoreFlags"
    );

    // One message: one call.
    let before = counts(ops).await;
    let r = c.cmd("FETCH 7 BODY.PEEK[]").await;
    assert!(
        r.starts_with(&format!("* 7 FETCH (BODY[] {{{}}}\r\n", msgs[6].len())),
        "{r}"
    );
    assert_eq!(delta(ops, before).await, (0, 1, 0));

    // UID FETCH: the UID comes from the body stream too.
    let before = counts(ops).await;
    let r = c.cmd_bytes(b"UID FETCH 1:* BODY.PEEK[]").await;
    let want = expected_bodies(&msgs, |k| format!("UID {} ", k + 1));
    assert_eq!(
        String::from_utf8_lossy(&r[..want.len().min(r.len())]),
        String::from_utf8_lossy(&want)
    );
    assert_eq!(delta(ops, before).await, (0, 3, 0));

    // Items only the metadata has: both calls, once per chunk.
    let before = counts(ops).await;
    let r = c
        .cmd("FETCH 1:20 (RFC822.SIZE BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        .await;
    for (k, m) in msgs.iter().enumerate() {
        let subject = format!("Subject: number {}\r\n\r\n", k + 1);
        let line = format!(
            "* {} FETCH (RFC822.SIZE {} BODY[HEADER.FIELDS (SUBJECT)] {{{}}}\r\n{subject})\r\n",
            k + 1,
            m.len(),
            subject.len()
        );
        assert!(r.contains(&line), "{line:?} in {r}");
    }
    assert_eq!(delta(ops, before).await, (3, 3, 0));

    // Not PEEK: \Seen is stored first, then FLAGS are read with the bodies.
    let before = counts(ops).await;
    let r = c.cmd_bytes(b"FETCH 1:20 BODY[]").await;
    let want = expected_bodies(&msgs, |_| String::new());
    let s = String::from_utf8_lossy(&r);
    // (\Recent too: this session is the first to see them.)
    assert_eq!(
        s.matches(" FLAGS (\\Seen \\Recent))\r\n").count(),
        20,
        "{s}"
    );
    // The same bodies, each with the FLAGS item after it.
    let plain = s.replace(" FLAGS (\\Seen \\Recent))", ")");
    assert_eq!(&plain[..want.len()], String::from_utf8_lossy(&want));
    assert_eq!(delta(ops, before).await, (3, 3, 3));
    env.stop().await;

    // Read-ahead bounded to ~3 messages: a call ends once that much has been read, and the
    // rest of the chunk is asked for again; the output is the same.
    const BUDGET: u64 = 1500;
    let env = env_with(|c| {
        c.limits.fetch_batch = BATCH;
        c.limits.fetch_buffer_bytes = BUDGET;
    })
    .await;
    let ops = env.store_ops;
    env.account("bob@example.test").await;
    for m in &msgs {
        env.deliver("bob@example.test", m).await;
    }
    let mut c = env.login("bob@example.test").await;
    c.cmd("EXAMINE INBOX").await;
    let mut expected_calls = 0;
    for chunk in msgs.chunks(BATCH as usize) {
        let mut read = 0u64;
        for (k, m) in chunk.iter().enumerate() {
            if k == 0 || read >= BUDGET {
                expected_calls += 1;
                read = 0;
            }
            read += m.len() as u64;
        }
    }
    assert!(expected_calls > 6, "{expected_calls}");
    let before = counts(ops).await;
    let r = c.cmd_bytes(b"FETCH 1:20 BODY.PEEK[]").await;
    let want = expected_bodies(&msgs, |_| String::new());
    assert_eq!(
        String::from_utf8_lossy(&r[..want.len().min(r.len())]),
        String::from_utf8_lossy(&want)
    );
    assert_eq!(delta(ops, before).await, (0, expected_calls, 0));
    env.stop().await;
}
