//! Delivery end to end over gRPC against real PostgreSQL.

mod common;

use common::*;
use mailsuite_proto::*;

#[tokio::test(flavor = "multi_thread")]
async fn deliver_then_select_fetch_and_read_back() {
    let s = store().await;
    let alice = s.account("alice@example.test").await;
    let mut d = s.delivery().await;
    let raw = message("hello", "Hi Alice,\r\nthis is the body.");
    let r = deliver(&mut d, "k1", &["Alice@Example.test"], &raw)
        .await
        .unwrap();
    assert_eq!(r.results[0].status, RecipientStatus::Delivered as i32);
    assert_eq!(
        r.results[0].delivered_to,
        vec!["alice@example.test".to_string()]
    );
    assert!(!r.duplicate);

    let mut mb = s.mailbox().await;
    let sel = mb
        .select(SelectRequest {
            account_id: alice,
            name: "inbox".into(),
            read_only: false,
        })
        .await
        .unwrap()
        .into_inner();
    let info = sel.mailbox.unwrap();
    assert_eq!(info.name, "INBOX");
    assert_eq!(info.messages, 1);
    assert_eq!(info.recent, 1);
    assert_eq!(info.unseen, 1);
    assert_eq!(sel.uids, vec![1]);
    assert_eq!(info.uidnext, 2);

    let meta = fetch_meta(&mut mb, alice, info.id, UidSet::all()).await;
    assert_eq!(meta.len(), 1);
    assert_eq!(meta[0].size, raw.len() as u64);
    let env = meta[0].envelope.clone().unwrap();
    assert_eq!(env.subject.as_deref(), Some(&b"hello"[..]));
    let body = fetch_section(&mut mb, alice, info.id, 1, full())
        .await
        .unwrap();
    assert_eq!(body, raw);

    // Default mailboxes with SPECIAL-USE.
    let list = mb
        .list_mailboxes(ListMailboxesRequest {
            account_id: alice,
            with_status: true,
        })
        .await
        .unwrap()
        .into_inner();
    let names: Vec<(String, i32)> = list
        .mailboxes
        .iter()
        .map(|m| (m.name.clone(), m.special_use))
        .collect();
    assert_eq!(names[0], ("INBOX".to_string(), SpecialUse::None as i32));
    for (n, su) in [
        ("Drafts", SpecialUse::Drafts),
        ("Sent", SpecialUse::Sent),
        ("Trash", SpecialUse::Trash),
        ("Junk", SpecialUse::Junk),
        ("Archive", SpecialUse::Archive),
    ] {
        assert!(
            names.contains(&(n.to_string(), su as i32)),
            "{n} missing: {names:?}"
        );
    }
    s.shutdown.drain(std::time::Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_deliveries_get_distinct_gap_free_uids() {
    let s = store().await;
    let alice = s.account("alice@example.test").await;
    let mut tasks = Vec::new();
    for i in 0..200 {
        let mut d = s.delivery().await;
        tasks.push(tokio::spawn(async move {
            let raw = message(&format!("m{i}"), &format!("message number {i}"));
            deliver(&mut d, &format!("key-{i}"), &["alice@example.test"], &raw)
                .await
                .unwrap()
        }));
    }
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.results[0].status, RecipientStatus::Delivered as i32);
    }
    let mut mb = s.mailbox().await;
    let sel = mb
        .select(SelectRequest {
            account_id: alice,
            name: "INBOX".into(),
            read_only: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sel.uids, (1..=200).collect::<Vec<u32>>());
    let info = sel.mailbox.unwrap();
    assert_eq!(info.uidnext, 201);
    // Each delivery got its own modseq, all distinct and above the initial one.
    let metas = fetch_meta(&mut mb, alice, info.id, UidSet::all()).await;
    let mut modseqs: Vec<u64> = metas.iter().map(|m| m.modseq).collect();
    modseqs.sort_unstable();
    modseqs.dedup();
    assert_eq!(modseqs.len(), 200);
    assert_eq!(info.highestmodseq, *modseqs.last().unwrap());
    // UID order is commit order of the allocation: the modseq grows with the UID.
    let by_uid: Vec<u64> = metas.iter().map(|m| m.modseq).collect();
    assert!(by_uid.windows(2).all(|w| w[0] < w[1]));
}

#[tokio::test(flavor = "multi_thread")]
async fn one_message_to_fifty_recipients_is_stored_once() {
    let s = store().await;
    let mut rcpts = Vec::new();
    for i in 0..50 {
        let a = format!("user{i}@example.test");
        s.account(&a).await;
        rcpts.push(a);
    }
    let refs: Vec<&str> = rcpts.iter().map(String::as_str).collect();
    let raw = message("to everyone", "one copy only");
    let mut d = s.delivery().await;
    let mut h = DeliverHeader {
        idempotency_key: "fifty".into(),
        return_path: "sender@remote.test".into(),
        recipients: refs.iter().map(|s| s.to_string()).collect(),
        add_delivery_headers: true,
        ..Default::default()
    };
    h.size_hint = raw.len() as u64;
    let r = d
        .deliver(tokio_stream::iter(chunks(h, &raw)))
        .await
        .unwrap()
        .into_inner();
    assert!(
        r.results
            .iter()
            .all(|x| x.status == RecipientStatus::Delivered as i32)
    );
    let blobs: i64 = sqlx::query_scalar("SELECT count(*) FROM mailbox.blobs")
        .fetch_one(&s.db.pool)
        .await
        .unwrap();
    let refcount: i64 = sqlx::query_scalar("SELECT refcount FROM mailbox.blobs")
        .fetch_one(&s.db.pool)
        .await
        .unwrap();
    let entries: i64 = sqlx::query_scalar("SELECT count(*) FROM mailbox.messages")
        .fetch_one(&s.db.pool)
        .await
        .unwrap();
    assert_eq!((blobs, refcount, entries), (1, 50, 50));

    // Each copy still reads back with its own trace fields in front.
    let user7 = sqlx::query_scalar::<_, i64>(
        "SELECT id FROM mailbox.accounts WHERE address = 'user7@example.test'",
    )
    .fetch_one(&s.db.pool)
    .await
    .unwrap();
    let inbox = s.inbox(user7).await;
    let mut mb = s.mailbox().await;
    let got = fetch_section(&mut mb, user7, inbox, 1, full())
        .await
        .unwrap();
    let expect_prefix =
        b"Return-Path: <sender@remote.test>\r\nDelivered-To: user7@example.test\r\n";
    assert!(
        got.starts_with(expect_prefix),
        "{}",
        String::from_utf8_lossy(&got)
    );
    assert_eq!(&got[expect_prefix.len()..], &raw[..]);
    let meta = fetch_meta(&mut mb, user7, inbox, UidSet::all()).await;
    assert_eq!(meta[0].size, got.len() as u64);
    // The structure is shifted by the prefix: the body still slices correctly.
    let text = fetch_section(
        &mut mb,
        user7,
        inbox,
        1,
        Section {
            part: vec![1],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(text, b"one copy only\r\n");
    let hdr = fetch_section(
        &mut mb,
        user7,
        inbox,
        1,
        Section {
            kind: SectionKind::Header as i32,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(hdr.starts_with(b"Return-Path:") && hdr.ends_with(b"\r\n\r\n"));
}

#[tokio::test(flavor = "multi_thread")]
async fn retried_delivery_with_same_key_creates_nothing() {
    let s = store().await;
    s.account("alice@example.test").await;
    let mut d = s.delivery().await;
    let raw = message("once", "only once");
    let first = deliver(&mut d, "same-key", &["alice@example.test"], &raw)
        .await
        .unwrap();
    assert!(!first.duplicate);
    // Concurrent retries too.
    let mut tasks = Vec::new();
    for _ in 0..5 {
        let mut d = s.delivery().await;
        let raw = raw.clone();
        tasks.push(tokio::spawn(async move {
            deliver(&mut d, "same-key", &["alice@example.test"], &raw)
                .await
                .unwrap()
        }));
    }
    for t in tasks {
        let again = t.await.unwrap();
        assert!(again.duplicate);
        assert_eq!(again.results, first.results);
        assert_eq!(again.blob_id, first.blob_id);
    }
    let entries: i64 = sqlx::query_scalar("SELECT count(*) FROM mailbox.messages")
        .fetch_one(&s.db.pool)
        .await
        .unwrap();
    assert_eq!(entries, 1);
    let other = deliver(&mut d, "other-key", &["alice@example.test"], &raw)
        .await
        .unwrap();
    assert!(!other.duplicate);
    let entries: i64 = sqlx::query_scalar("SELECT count(*) FROM mailbox.messages")
        .fetch_one(&s.db.pool)
        .await
        .unwrap();
    assert_eq!(entries, 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn large_message_round_trips_and_parts_are_sliced() {
    let s = store().await;
    let alice = s.account("alice@example.test").await;
    // 25 MB: a text part and a large base64 attachment.
    let mut raw = Vec::new();
    raw.extend_from_slice(b"From: a@remote.test\r\nSubject: big\r\nContent-Type: multipart/mixed; boundary=BB\r\n\r\n--BB\r\nContent-Type: text/plain\r\n\r\nsee attachment\r\n--BB\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n");
    let line = b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAx\r\n";
    let att_start = raw.len();
    while raw.len() < 25 * 1024 * 1024 {
        raw.extend_from_slice(line);
    }
    let att_end = raw.len() - 2;
    raw.extend_from_slice(b"--BB--\r\n");
    let mut d = s.delivery().await;
    d = d.max_encoding_message_size(1024 * 1024);
    let r = deliver(&mut d, "big", &["alice@example.test"], &raw)
        .await
        .unwrap();
    assert_eq!(r.size, raw.len() as u64);
    let inbox = s.inbox(alice).await;
    let mut mb = s.mailbox().await;
    let got = fetch_section(&mut mb, alice, inbox, 1, full())
        .await
        .unwrap();
    assert!(got == raw, "25 MB message differs after the round trip");
    let meta = fetch_meta(&mut mb, alice, inbox, UidSet::all()).await;
    let bs = meta[0].body_structure.clone().unwrap();
    assert_eq!(bs.parts[1].body_start as usize, att_start);
    assert_eq!(bs.parts[1].body_end as usize, att_end);
    let text = fetch_section(
        &mut mb,
        alice,
        inbox,
        1,
        Section {
            part: vec![1],
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(text, b"see attachment");
    let part = fetch_section(
        &mut mb,
        alice,
        inbox,
        1,
        Section {
            part: vec![2],
            has_partial: true,
            offset: 1000,
            length: 100,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(part, &raw[att_start + 1000..att_start + 1100]);
    // BINARY: the decoded attachment.
    let decoded = fetch_section(
        &mut mb,
        alice,
        inbox,
        1,
        Section {
            part: vec![2],
            decode: true,
            has_partial: true,
            offset: 0,
            length: 26,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(decoded, b"ABCDEFGHIJKLMNOPQRSTUVWXYZ");
}

#[tokio::test(flavor = "multi_thread")]
async fn crlf_conversion_and_missing_sections() {
    let s = store().await;
    let alice = s.account("alice@example.test").await;
    let mut d = s.delivery().await;
    let raw = b"Subject: lf\nFrom: a@remote.test\n\nline1\nline2\n".to_vec();
    deliver(&mut d, "lf", &["alice@example.test"], &raw)
        .await
        .unwrap();
    let inbox = s.inbox(alice).await;
    let mut mb = s.mailbox().await;
    let got = fetch_section(
        &mut mb,
        alice,
        inbox,
        1,
        Section {
            crlf: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        got,
        b"Subject: lf\r\nFrom: a@remote.test\r\n\r\nline1\r\nline2\r\n"
    );
    assert_eq!(
        fetch_section(
            &mut mb,
            alice,
            inbox,
            1,
            Section {
                part: vec![3],
                ..Default::default()
            }
        )
        .await,
        None
    );
    let fields = fetch_section(
        &mut mb,
        alice,
        inbox,
        1,
        Section {
            kind: SectionKind::HeaderFields as i32,
            fields: vec!["FROM".into()],
            crlf: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(fields, b"From: a@remote.test\r\n\r\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn quota_is_enforced() {
    let s = store().await;
    let mut admin = s.admin().await;
    admin
        .add_domain(AddDomainRequest {
            name: "example.test".into(),
            catch_all: String::new(),
        })
        .await
        .unwrap();
    let small = admin
        .add_account(AddAccountRequest {
            address: "small@example.test".into(),
            password: "pw".into(),
            quota_bytes: 1000,
            quota_messages: 0,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    s.account("big@example.test").await;
    let mut d = s.delivery().await;
    let m = message("fits", &"x".repeat(300));
    let r = deliver(&mut d, "q1", &["small@example.test"], &m)
        .await
        .unwrap();
    assert_eq!(r.results[0].status, RecipientStatus::Delivered as i32);
    let r = deliver(&mut d, "q2", &["small@example.test"], &m)
        .await
        .unwrap();
    assert_eq!(r.results[0].status, RecipientStatus::Delivered as i32);
    // The third would pass 1000 bytes: refused for this recipient, others still get it.
    let r = deliver(
        &mut d,
        "q3",
        &["small@example.test", "big@example.test"],
        &m,
    )
    .await
    .unwrap();
    assert_eq!(r.results[0].status, RecipientStatus::OverQuota as i32);
    assert_eq!(r.results[1].status, RecipientStatus::Delivered as i32);
    // Alone, it is a distinct error: temporary (452) since the message fits an empty box.
    let err = deliver(&mut d, "q4", &["small@example.test"], &m)
        .await
        .unwrap_err();
    let se = mailsuite_runtime::ServiceError::from(err);
    assert!(
        matches!(
            se,
            mailsuite_runtime::ServiceError::OverQuota {
                permanent: false,
                ..
            }
        ),
        "{se:?}"
    );
    // Larger than the whole quota: permanent (552).
    let huge = message("huge", &"y".repeat(2000));
    let err = deliver(&mut d, "q5", &["small@example.test"], &huge)
        .await
        .unwrap_err();
    let se = mailsuite_runtime::ServiceError::from(err);
    assert!(
        matches!(
            se,
            mailsuite_runtime::ServiceError::OverQuota {
                permanent: true,
                ..
            }
        ),
        "{se:?}"
    );

    let mut mb = s.mailbox().await;
    let q = mb
        .get_quota(GetQuotaRequest {
            account_id: small.id,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(q.used_messages, 2);
    assert_eq!(q.used_bytes, 2 * m.len() as u64);
    assert_eq!(q.limit_bytes, 1000);
    // Resolve reports it for an early 452 at RCPT time... only once full.
    let mut dir = s.directory().await;
    let res = dir
        .resolve(ResolveRequest {
            address: "small@example.test".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!res.over_quota);
    // Append is bound by the same quota.
    let inbox = s.inbox(small.id).await;
    let mut v = vec![AppendChunk {
        part: Some(append_chunk::Part::Header(AppendHeader {
            account_id: small.id,
            mailbox: "INBOX".into(),
            ..Default::default()
        })),
    }];
    v.push(AppendChunk {
        part: Some(append_chunk::Part::Data(m.clone().into())),
    });
    let err = mb.append(tokio_stream::iter(v)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted);
    // Expunging frees the space again.
    mb.store_flags(StoreFlagsRequest {
        account_id: small.id,
        mailbox_id: inbox,
        uids: Some(UidSet::from_uids([1])),
        mode: StoreMode::Add as i32,
        flags: vec!["\\Deleted".into()],
        unchanged_since: 0,
    })
    .await
    .unwrap();
    mb.expunge(ExpungeRequest {
        account_id: small.id,
        mailbox_id: inbox,
        uids: None,
    })
    .await
    .unwrap();
    let r = deliver(&mut d, "q6", &["small@example.test"], &m)
        .await
        .unwrap();
    assert_eq!(r.results[0].status, RecipientStatus::Delivered as i32);
}

/// With `all_or_nothing`, a partial result (one recipient over quota) stores nothing at all,
/// so the caller can hand the whole message to the queue instead of losing that recipient.
#[tokio::test(flavor = "multi_thread")]
async fn all_or_nothing_rolls_back_a_partial_delivery() {
    let s = store().await;
    let mut admin = s.admin().await;
    admin
        .add_domain(AddDomainRequest {
            name: "example.test".into(),
            catch_all: String::new(),
        })
        .await
        .unwrap();
    admin
        .add_account(AddAccountRequest {
            address: "tiny@example.test".into(),
            password: "pw".into(),
            quota_bytes: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    let roomy = s.account("roomy@example.test").await;
    let mut d = s.delivery().await;
    let m = message("too big for tiny", &"z".repeat(500));
    let header = DeliverHeader {
        idempotency_key: "aon-1".into(),
        return_path: "sender@remote.test".into(),
        recipients: vec!["tiny@example.test".into(), "roomy@example.test".into()],
        all_or_nothing: true,
        ..Default::default()
    };
    let r = d
        .deliver(tokio_stream::iter(chunks(header.clone(), &m)))
        .await
        .unwrap()
        .into_inner();
    assert!(r.rolled_back, "partial delivery must roll back");
    assert_eq!(r.results[0].status, RecipientStatus::OverQuota as i32);
    assert_eq!(r.results[1].status, RecipientStatus::Delivered as i32);
    let inbox = s.inbox(roomy).await;
    let mut mb = s.mailbox().await;
    let st = mb
        .status(StatusRequest {
            account_id: roomy,
            name: "INBOX".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((st.id, st.messages), (inbox, 0), "nothing stored for roomy");

    // The key was not consumed: the same key without the flag now delivers to roomy.
    let header = DeliverHeader {
        recipients: vec!["roomy@example.test".into()],
        all_or_nothing: false,
        ..header
    };
    let r = d
        .deliver(tokio_stream::iter(chunks(header, &m)))
        .await
        .unwrap()
        .into_inner();
    assert!(!r.rolled_back && !r.duplicate);
    assert_eq!(r.results[0].status, RecipientStatus::Delivered as i32);
}

/// The caller's RCPT-time resolution, one per recipient, is used as given (the store does
/// not look the recipients up again); the accounts are still checked when they are locked.
#[tokio::test]
async fn a_resolution_passed_by_the_caller_is_used_not_redone() {
    let s = store().await;
    let alice = s.account("alice@example.test").await;
    let bob = s.account("bob@example.test").await;
    let mut d = s.delivery().await;
    let m = message("resolved by the caller", "hello");
    let resolved = |local: &[&str]| ResolvedRecipient {
        kind: AddressKind::Alias as i32,
        local_targets: local.iter().map(|a| a.to_string()).collect(),
        remote_targets: vec![],
    };
    // "team@" exists nowhere in the directory: only the given resolution can deliver it.
    let header = DeliverHeader {
        idempotency_key: "given-1".into(),
        return_path: "sender@remote.test".into(),
        recipients: vec!["team@example.test".into(), "ghost@example.test".into()],
        resolved: vec![
            resolved(&["alice@example.test", "bob@example.test"]),
            resolved(&["nobody@example.test"]),
        ],
        ..Default::default()
    };
    let r = d
        .deliver(tokio_stream::iter(chunks(header.clone(), &m)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.results[0].status, RecipientStatus::Delivered as i32);
    assert_eq!(
        r.results[0].delivered_to,
        vec!["alice@example.test", "bob@example.test"]
    );
    // A target with no account is not delivered, whatever the caller said.
    assert_eq!(r.results[1].status, RecipientStatus::Unknown as i32);
    let mut mb = s.mailbox().await;
    for acc in [alice, bob] {
        let st = mb
            .status(StatusRequest {
                account_id: acc,
                name: "INBOX".into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(st.messages, 1);
    }

    // Without one resolution per recipient the store resolves them itself: "team@" is unknown.
    let header = DeliverHeader {
        idempotency_key: "given-2".into(),
        resolved: vec![resolved(&["alice@example.test"])],
        ..header
    };
    let r = d
        .deliver(tokio_stream::iter(chunks(header, &m)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.results[0].status, RecipientStatus::Unknown as i32);
}

/// A large message that is already stored is looked up before it is parsed and then only
/// referenced: the batch's known-blob path. Two deliveries, one blob with two references.
#[tokio::test(flavor = "multi_thread")]
async fn a_large_message_delivered_again_references_the_stored_copy() {
    let s = store().await;
    s.account("alice@example.test").await;
    s.account("bob@example.test").await;
    let mut d = s.delivery().await;
    // Above the store's probe threshold (256 KiB), so the second delivery finds it known.
    let raw = message(
        "big",
        &"0123456789abcdef0123456789abcdef\r\n".repeat(12_000),
    );
    assert!(raw.len() > 256 * 1024);
    for (key, to) in [
        ("big-1", "alice@example.test"),
        ("big-2", "bob@example.test"),
    ] {
        let r = deliver(&mut d, key, &[to], &raw).await.unwrap();
        assert_eq!(
            r.results[0].status,
            RecipientStatus::Delivered as i32,
            "{key}"
        );
    }
    let (blobs, refcount, entries): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM mailbox.blobs), (SELECT sum(refcount)::bigint FROM mailbox.blobs),
                (SELECT count(*) FROM mailbox.messages)",
    )
    .fetch_one(&s.db.pool)
    .await
    .unwrap();
    assert_eq!((blobs, refcount, entries), (1, 2, 2));
}
