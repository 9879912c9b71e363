//! Every SEARCH key against a small mailbox where it matches a strict subset, so a key that
//! were ignored (matching everything) or mis-wired would fail its assertion.

mod common;

use common::*;
use mailsuite_proto::search_key::Key;
use mailsuite_proto::*;

fn k(key: Key) -> SearchKey {
    SearchKey { key: Some(key) }
}

fn date(op: DateOp, d: &str) -> DateQuery {
    DateQuery {
        op: op as i32,
        date: d.into(),
    }
}

fn header(name: &str, value: &str) -> Key {
    Key::Header(HeaderQuery {
        name: name.into(),
        value: value.into(),
    })
}

fn epoch(d: &str) -> i64 {
    chrono::NaiveDate::parse_from_str(d, "%Y-%m-%d")
        .unwrap()
        .and_hms_opt(12, 0, 0)
        .unwrap()
        .and_utc()
        .timestamp()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_search_key() {
    let s = store().await;
    let acc = s.account("alice@example.test").await;
    let mut mb = s.mailbox().await;
    let m1 = b"From: Alice <alice@a.test>\r\nTo: Bob <bob@b.test>\r\nSubject: Quarterly report\r\nDate: Sat, 10 Jan 2026 09:00:00 +0000\r\n\r\nbudget numbers attached\r\n".to_vec();
    let m2 = b"From: carol@c.test\r\nCc: dave@d.test\r\nSubject: Lunch\r\nDate: Sun, 15 Feb 2026 23:30:00 -0800\r\n\r\npizza tomorrow?\r\n".to_vec();
    let mut m3 = b"From: eve@e.test\r\nBcc: frank@f.test\r\nSubject: Re: Quarterly\r\nX-Custom: yes\r\nDate: Fri, 20 Mar 2026 10:00:00 +0000\r\n\r\nThis is unbelievable.\r\n".to_vec();
    m3.extend(std::iter::repeat_n(b'.', 3000));
    m3.extend_from_slice(b"\r\n");
    let m4 = b"From: gina@g.test\r\nIn-Reply-To: <x@y>\r\nContent-Type: multipart/alternative; boundary=q\r\n\r\n--q\r\nContent-Type: text/html\r\n\r\n<b>Zebra</b> crossing\r\n--q--\r\n".to_vec();
    let inbox = s.inbox(acc).await;
    append(&mut mb, acc, "INBOX", &["\\Seen"], epoch("2026-01-10"), &m1).await;
    append(
        &mut mb,
        acc,
        "INBOX",
        &["\\Flagged", "$Important"],
        epoch("2026-02-15"),
        &m2,
    )
    .await;
    append(
        &mut mb,
        acc,
        "INBOX",
        &["\\Answered", "\\Deleted"],
        epoch("2026-03-20"),
        &m3,
    )
    .await;
    // Select clears \Recent for the three so far; the fourth arrives after.
    mb.select(SelectRequest {
        account_id: acc,
        name: "INBOX".into(),
        read_only: false,
    })
    .await
    .unwrap();
    append(&mut mb, acc, "INBOX", &[], epoch("2026-04-01"), &m4).await;
    let st = mb
        .store_flags(StoreFlagsRequest {
            account_id: acc,
            mailbox_id: inbox,
            uids: Some(UidSet::from_uids([4])),
            mode: StoreMode::Add as i32,
            flags: vec!["$Later".into()],
            unchanged_since: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let m4_modseq = st.messages[0].modseq;

    let mut search = async |key: SearchKey| -> Vec<u32> {
        mb.search(SearchRequest {
            account_id: acc,
            mailbox_id: inbox,
            key: Some(key),
        })
        .await
        .unwrap()
        .into_inner()
        .uids
    };
    let cases: Vec<(&str, SearchKey, Vec<u32>)> = vec![
        ("ALL", k(Key::All(true)), vec![1, 2, 3, 4]),
        (
            "UID 2:3",
            k(Key::Uids(UidSet::from_ranges([(2, 3)]))),
            vec![2, 3],
        ),
        ("SEEN", k(Key::HasFlag("\\Seen".into())), vec![1]),
        ("UNSEEN", k(Key::LacksFlag("\\Seen".into())), vec![2, 3, 4]),
        ("FLAGGED", k(Key::HasFlag("\\flagged".into())), vec![2]),
        ("ANSWERED", k(Key::HasFlag("\\Answered".into())), vec![3]),
        ("DELETED", k(Key::HasFlag("\\Deleted".into())), vec![3]),
        (
            "UNDELETED",
            k(Key::LacksFlag("\\Deleted".into())),
            vec![1, 2, 4],
        ),
        (
            "KEYWORD $important",
            k(Key::HasFlag("$important".into())),
            vec![2],
        ),
        (
            "UNKEYWORD $Later",
            k(Key::LacksFlag("$Later".into())),
            vec![1, 2, 3],
        ),
        ("RECENT", k(Key::Recent(true)), vec![4]),
        ("OLD", k(Key::Recent(false)), vec![1, 2, 3]),
        (
            "BEFORE",
            k(Key::InternalDate(date(DateOp::Before, "2026-02-15"))),
            vec![1],
        ),
        (
            "ON",
            k(Key::InternalDate(date(DateOp::On, "2026-02-15"))),
            vec![2],
        ),
        (
            "SINCE",
            k(Key::InternalDate(date(DateOp::Since, "2026-03-20"))),
            vec![3, 4],
        ),
        // The Date: header's own calendar day counts, not UTC (m2 is the 16th in UTC).
        (
            "SENTBEFORE",
            k(Key::SentDate(date(DateOp::Before, "2026-02-15"))),
            vec![1],
        ),
        (
            "SENTON",
            k(Key::SentDate(date(DateOp::On, "2026-02-15"))),
            vec![2],
        ),
        (
            "SENTSINCE",
            k(Key::SentDate(date(DateOp::Since, "2026-03-01"))),
            vec![3],
        ),
        ("LARGER", k(Key::Larger(1000)), vec![3]),
        ("SMALLER", k(Key::Smaller(1000)), vec![1, 2, 4]),
        ("SUBJECT", k(header("Subject", "quarterly")), vec![1, 3]),
        ("FROM", k(header("From", "CAROL")), vec![2]),
        ("FROM name", k(header("from", "alice")), vec![1]),
        ("TO", k(header("To", "bob@")), vec![1]),
        ("CC", k(header("Cc", "dave")), vec![2]),
        ("BCC", k(header("Bcc", "frank")), vec![3]),
        ("HEADER X-Custom \"\"", k(header("X-Custom", "")), vec![3]),
        (
            "HEADER In-Reply-To",
            k(header("In-Reply-To", "x@y")),
            vec![4],
        ),
        ("BODY word", k(Key::Body("pizza".into())), vec![2]),
        ("BODY substring", k(Key::Body("BELIEV".into())), vec![3]),
        ("BODY html", k(Key::Body("zebra crossing".into())), vec![4]),
        ("BODY not header", k(Key::Body("Quarterly".into())), vec![]),
        // A substring match, as RFC 9051 §6.4.4 says: the words of "budget numbers" with a
        // comma between are not in the text (a word index used to match them anyway), and
        // a piece across two words is.
        (
            "BODY not a phrase",
            k(Key::Body("budget, numbers".into())),
            vec![],
        ),
        ("BODY across words", k(Key::Body("et numb".into())), vec![1]),
        ("TEXT header", k(Key::Text("quarterly".into())), vec![1, 3]),
        ("TEXT body", k(Key::Text("budget".into())), vec![1]),
        ("MODSEQ", k(Key::Modseq(m4_modseq)), vec![4]),
        (
            "NOT",
            k(Key::Not(Box::new(k(Key::HasFlag("\\Seen".into()))))),
            vec![2, 3, 4],
        ),
        (
            "OR",
            k(Key::Or(SearchKeys {
                keys: vec![k(Key::HasFlag("\\Seen".into())), k(Key::Larger(1000))],
            })),
            vec![1, 3],
        ),
        (
            "AND",
            k(Key::And(SearchKeys {
                keys: vec![
                    k(header("Subject", "quarterly")),
                    k(Key::HasFlag("\\Deleted".into())),
                ],
            })),
            vec![3],
        ),
    ];
    for (name, key, want) in cases {
        assert_eq!(search(key).await, want, "SEARCH {name}");
    }
    let r = mb
        .search(SearchRequest {
            account_id: acc,
            mailbox_id: inbox,
            key: Some(k(Key::HasFlag("$Later".into()))),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.highestmodseq, m4_modseq);
    // Bad dates are a protocol error, not a crash.
    let err = mb
        .search(SearchRequest {
            account_id: acc,
            mailbox_id: inbox,
            key: Some(k(Key::InternalDate(date(DateOp::On, "yesterday")))),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    // Another account cannot search this mailbox.
    let other = s.account("mallory@example.test").await;
    let err = mb
        .search(SearchRequest {
            account_id: other,
            mailbox_id: inbox,
            key: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
}

#[tokio::test(flavor = "multi_thread")]
async fn l3_too_many_search_keys_get_a_clear_invalid_argument() {
    let s = store().await;
    let acc = s.account("alice@example.test").await;
    let inbox = s.inbox(acc).await;
    let mut mb = s.mailbox().await;
    append(
        &mut mb,
        acc,
        "INBOX",
        &[],
        epoch("2026-01-10"),
        b"Subject: x\r\n\r\nneedle\r\n",
    )
    .await;
    let limits = mailsuite_mailbox_store::config::Limits::default();
    let or_of = |n: usize, key: &dyn Fn(usize) -> Key| {
        k(Key::Or(SearchKeys {
            keys: (0..n).map(|i| k(key(i))).collect(),
        }))
    };
    let search = |key: SearchKey| {
        let mut mb = mb.clone();
        async move {
            mb.search(SearchRequest {
                account_id: acc,
                mailbox_id: inbox,
                key: Some(key),
            })
            .await
        }
    };
    // At the limit: answered.
    let ok = search(or_of(limits.max_search_text_keys, &|i| {
        Key::Body(if i == 0 {
            "needle".into()
        } else {
            format!("hay{i}")
        })
    }))
    .await
    .expect("as many text keys as allowed");
    assert_eq!(ok.into_inner().uids, vec![1]);
    // One text key more (BODY, TEXT and HEADER values all count): refused, not run.
    let n = limits.max_search_text_keys + 1;
    for key in [
        or_of(n, &|i| Key::Body(format!("b{i}"))),
        or_of(n, &|i| Key::Text(format!("t{i}"))),
        or_of(n, &|i| header("subject", &format!("h{i}"))),
    ] {
        let err = search(key).await.expect_err("too many text keys");
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
        assert!(err.message().contains("too many text search keys"), "{err}");
    }
    // Too many keys of any kind.
    let err = search(or_of(limits.max_search_keys, &|i| Key::Larger(i as u64)))
        .await
        .expect_err("too many keys");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(err.message().contains("too many search keys"), "{err}");
}
