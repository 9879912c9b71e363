//! Mailbox.AppendMulti (MULTIAPPEND, RFC 3502): all messages in one transaction or none.

mod common;

use common::*;
use mailsuite_proto::*;

/// (mailbox, message) per message of one call.
type Batch<'a> = Vec<(&'a str, Vec<u8>)>;

fn batch(acc: i64, msgs: &[(&str, Vec<u8>)]) -> Vec<AppendChunk> {
    let mut v = Vec::new();
    for (mailbox, data) in msgs {
        v.push(AppendChunk {
            part: Some(append_chunk::Part::Header(AppendHeader {
                account_id: acc,
                mailbox: (*mailbox).into(),
                flags: vec!["\\Seen".into()],
                size: data.len() as u64,
                ..Default::default()
            })),
        });
        // Two data chunks per message: the store joins them.
        let (a, b) = data.split_at(data.len() / 2);
        for part in [a, b] {
            v.push(AppendChunk {
                part: Some(append_chunk::Part::Data(part.to_vec().into())),
            });
        }
    }
    v
}

async fn messages(s: &Store, acc: i64) -> u32 {
    s.mailbox()
        .await
        .status(StatusRequest {
            account_id: acc,
            name: "INBOX".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .messages
}

#[tokio::test(flavor = "multi_thread")]
async fn append_multi_is_all_or_none() {
    let s = store_with(|c| {
        c.limits.max_message_bytes = 1000;
        c.limits.max_append_multi_bytes = 1500;
        c.limits.max_append_multi_messages = 3;
    })
    .await;
    let acc = s.account("alice@example.test").await;
    let mut mb = s.mailbox().await;
    let m = |i: usize| message(&format!("m{i}"), "body");
    let r = mb
        .append_multi(tokio_stream::iter(batch(
            acc,
            &[("INBOX", m(1)), ("inbox", m(2)), ("INBOX", m(3))],
        )))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.uids, vec![1, 2, 3]);
    assert_eq!(r.mailbox_id, s.inbox(acc).await);
    let meta = fetch_meta(&mut mb, acc, r.mailbox_id, UidSet::from_uids([1, 2, 3])).await;
    assert_eq!(meta.len(), 3);
    assert!(meta.iter().all(|x| x.flags.contains(&"\\Seen".to_string())));
    assert_eq!(messages(&s, acc).await, 3);

    let big = message("big", &"x".repeat(1200));
    let cases: Vec<(Batch, tonic::Code)> = vec![
        // Another mailbox in the same call.
        (
            vec![("INBOX", m(4)), ("Sent", m(5))],
            tonic::Code::InvalidArgument,
        ),
        // The last message over max_message_bytes.
        (
            vec![("INBOX", m(4)), ("INBOX", big)],
            tonic::Code::OutOfRange,
        ),
        // Over max_append_multi_messages.
        (
            (0..4).map(|i| ("INBOX", m(10 + i))).collect(),
            tonic::Code::OutOfRange,
        ),
        // Over max_append_multi_bytes together.
        (
            vec![
                ("INBOX", message("a", &"a".repeat(700))),
                ("INBOX", message("b", &"b".repeat(700))),
            ],
            tonic::Code::OutOfRange,
        ),
        // An empty message last.
        (
            vec![("INBOX", m(4)), ("INBOX", Vec::new())],
            tonic::Code::InvalidArgument,
        ),
        // No such mailbox.
        (
            vec![("Nowhere", m(4)), ("Nowhere", m(5))],
            tonic::Code::NotFound,
        ),
    ];
    for (msgs, code) in cases {
        let err = mb
            .append_multi(tokio_stream::iter(batch(acc, &msgs)))
            .await
            .unwrap_err();
        assert_eq!(err.code(), code, "{err:?}");
        assert_eq!(messages(&s, acc).await, 3);
    }
    // UIDs go on where they were: nothing was allocated by the refused calls.
    let r = mb
        .append_multi(tokio_stream::iter(batch(acc, &[("INBOX", m(6))])))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.uids, vec![4]);
}
