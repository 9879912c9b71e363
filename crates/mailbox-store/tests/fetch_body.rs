//! FetchBody: what one fetch reads (index bounds on the UID set, small blobs read with their
//! rows) and that every section comes out byte-exact whichever way the blob was read.

mod common;

use common::*;
use mailsuite_mailbox_store::body::INLINE;
use mailsuite_mailbox_store::mailbox::fetch_body_sql;
use mailsuite_proto::*;
use sqlx::Row;

/// Rows the scans of `relation` produced plus the rows they read and threw away, summed over
/// the plan (per loop counts multiplied by the loops).
fn rows_touched(plan: &serde_json::Value, relation: &str) -> f64 {
    let mut n = 0.0;
    if plan["Relation Name"] == relation {
        let loops = plan["Actual Loops"].as_f64().unwrap_or(1.0);
        n += loops
            * (plan["Actual Rows"].as_f64().unwrap_or(0.0)
                + plan["Rows Removed by Filter"].as_f64().unwrap_or(0.0)
                + plan["Rows Removed by Index Recheck"]
                    .as_f64()
                    .unwrap_or(0.0));
    }
    if let Some(children) = plan["Plans"].as_array() {
        for c in children {
            n += rows_touched(c, relation);
        }
    }
    n
}

async fn explain_fetch(
    db: &sqlx::PgPool,
    mode: &str,
    account_id: i64,
    mailbox_id: i64,
    starts: &[i64],
    ends: &[i64],
) -> serde_json::Value {
    let mut conn = db.acquire().await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("SET plan_cache_mode = {mode}")))
        .execute(&mut *conn)
        .await
        .unwrap();
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "EXPLAIN (ANALYZE, FORMAT JSON) {}",
        fetch_body_sql()
    )))
    .bind(mailbox_id)
    .bind(starts)
    .bind(ends)
    .bind(0i64)
    .bind(INLINE as i64)
    .bind(account_id)
    .fetch_one(&mut *conn)
    .await
    .unwrap();
    let v: serde_json::Value = row.get(0);
    v[0]["Plan"].clone()
}

#[tokio::test(flavor = "multi_thread")]
async fn fetching_one_message_reads_one_row_not_the_mailbox() {
    let s = store().await;
    let acc = s.account("rows@example.test").await;
    let mut mb = s.mailbox().await;
    for i in 0..300 {
        append(
            &mut mb,
            acc,
            "INBOX",
            &[],
            0,
            &message(&format!("m{i}"), &format!("body {i}")),
        )
        .await;
    }
    let inbox = s.inbox(acc).await;
    sqlx::query("ANALYZE mailbox.messages")
        .execute(&s.db.pool)
        .await
        .unwrap();
    // Both the plan for these values and the generic plan a prepared statement ends up with.
    for mode in ["force_custom_plan", "force_generic_plan"] {
        let plan = explain_fetch(&s.db.pool, mode, acc, inbox, &[250], &[250]).await;
        assert_eq!(
            plan["Actual Rows"].as_f64(),
            Some(1.0),
            "{mode}: one message: {plan:#}"
        );
        let touched = rows_touched(&plan, "messages");
        assert!(
            touched <= 1.0,
            "{mode}: FETCH of one UID read {touched} message rows of 300: {plan:#}"
        );
        // A range reads what it names (plus nothing beyond it).
        let plan = explain_fetch(&s.db.pool, mode, acc, inbox, &[100, 120], &[104, 121]).await;
        assert_eq!(plan["Actual Rows"].as_f64(), Some(7.0), "{mode}: {plan:#}");
        let touched = rows_touched(&plan, "messages");
        assert!(
            touched <= 22.0,
            "{mode}: 100:104,120:121 read {touched} message rows: {plan:#}"
        );
    }
    s.shutdown.trigger();
}

fn big_message(n: usize) -> Vec<u8> {
    let mut m = b"From: big@example.test\r\nSubject: big\r\nMIME-Version: 1.0\r\n\
Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\n\
first part\r\n--b\r\nContent-Type: application/octet-stream\r\n\
Content-Transfer-Encoding: base64\r\n\r\n"
        .to_vec();
    for _ in 0..n {
        m.extend_from_slice(
            b"QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVphYmNkZWZnaGlqa2xtbm9wcXJzdHV2d3h5ejAxMjM0\r\n",
        );
    }
    m.extend_from_slice(b"--b--\r\n");
    m
}

fn section(kind: SectionKind, part: &[u32]) -> Section {
    Section {
        kind: kind as i32,
        part: part.to_vec(),
        ..Default::default()
    }
}

/// All sections of every message in one call, reassembled per (uid, section).
async fn fetch_all(
    s: &Store,
    acc: i64,
    inbox: i64,
    uids: &[u32],
    sections: &[Section],
) -> std::collections::BTreeMap<(u32, u32), Option<Vec<u8>>> {
    let mut stream = s
        .mailbox()
        .await
        .fetch_body(FetchBodyRequest {
            account_id: acc,
            mailbox_id: inbox,
            uids: Some(UidSet::from_uids(uids.iter().copied())),
            sections: sections.to_vec(),
        })
        .await
        .expect("fetch body")
        .into_inner();
    let mut out = std::collections::BTreeMap::new();
    while let Some(c) = stream.message().await.expect("chunk") {
        let slot = out.entry((c.uid, c.section)).or_insert(Some(Vec::new()));
        if c.missing {
            *slot = None;
        } else if let Some(b) = slot {
            b.extend_from_slice(&c.data);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn sections_are_the_same_whether_the_blob_comes_with_the_row_or_by_range() {
    let s = store().await;
    let acc = s.account("sections@example.test").await;
    let small = big_message(10);
    let big = big_message(3000);
    assert!((small.len() as u64) < INLINE && (big.len() as u64) > INLINE);
    // Delivered: each entry gets its own Return-Path/Delivered-To prefix before the blob.
    let mut d = s.delivery().await;
    for (key, raw) in [("k-small", &small), ("k-big", &big)] {
        let header = DeliverHeader {
            idempotency_key: key.into(),
            return_path: "sender@remote.test".into(),
            recipients: vec!["sections@example.test".into()],
            add_delivery_headers: true,
            ..Default::default()
        };
        d.deliver(tokio_stream::iter(chunks(header, raw)))
            .await
            .expect("deliver");
    }
    let inbox = s.inbox(acc).await;
    let sections = vec![
        Section::default(),
        section(SectionKind::Header, &[]),
        section(SectionKind::Text, &[]),
        section(SectionKind::Full, &[1]),
        section(SectionKind::Mime, &[2]),
        Section {
            has_partial: true,
            offset: 5,
            length: 40,
            ..Default::default()
        },
        Section {
            decode: true,
            ..section(SectionKind::Full, &[2])
        },
        section(SectionKind::Full, &[7]),
    ];
    let got = fetch_all(&s, acc, inbox, &[1, 2], &sections).await;
    for (uid, raw) in [(1u32, &small), (2u32, &big)] {
        let full = got[&(uid, 0)].clone().expect("full message");
        // The prefix comes first, then the delivered bytes unchanged.
        assert!(
            full.starts_with(b"Return-Path: <sender@remote.test>\r\n"),
            "uid {uid}: {:?}",
            String::from_utf8_lossy(&full[..full.len().min(120)])
        );
        assert!(
            full.ends_with(raw),
            "uid {uid}: the stored bytes follow the prefix"
        );
        let plen = full.len() - raw.len();
        let header_end = full.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        assert_eq!(
            got[&(uid, 1)].as_deref(),
            Some(&full[..header_end]),
            "uid {uid} HEADER"
        );
        assert_eq!(
            got[&(uid, 2)].as_deref(),
            Some(&full[header_end..]),
            "uid {uid} TEXT"
        );
        assert_eq!(
            got[&(uid, 3)].as_deref(),
            Some(&b"first part"[..]),
            "uid {uid} part 1"
        );
        let mime = got[&(uid, 4)].clone().unwrap();
        assert!(
            mime.starts_with(b"Content-Type: application/octet-stream\r\n")
                && mime.ends_with(b"\r\n\r\n"),
            "uid {uid} 2.MIME: {:?}",
            String::from_utf8_lossy(&mime)
        );
        assert_eq!(
            got[&(uid, 5)].as_deref(),
            Some(&full[5..45]),
            "uid {uid} <5.40>"
        );
        let decoded = got[&(uid, 6)].clone().unwrap();
        assert!(
            decoded.starts_with(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"),
            "uid {uid} decoded part 2"
        );
        assert_eq!(got[&(uid, 7)], None, "uid {uid} has no part 7");
        assert!(plen > 0);
    }
    s.shutdown.trigger();
}

#[tokio::test(flavor = "multi_thread")]
async fn another_accounts_mailbox_is_refused_even_with_messages_in_it() {
    let s = store().await;
    let owner = s.account("owner@example.test").await;
    let other = s.account("other@example.test").await;
    let mut mb = s.mailbox().await;
    append(&mut mb, owner, "INBOX", &[], 0, &message("mine", "private")).await;
    let inbox = s.inbox(owner).await;
    // The owner sees the message through both calls.
    assert_eq!(
        fetch_meta(&mut mb, owner, inbox, UidSet::from_uids([1]))
            .await
            .len(),
        1
    );
    assert!(
        fetch_section(&mut mb, owner, inbox, 1, full())
            .await
            .is_some()
    );
    // Another account naming the same mailbox id gets an error, never the message.
    let meta = mb
        .fetch(FetchRequest {
            account_id: other,
            mailbox_id: inbox,
            uids: Some(UidSet::from_uids([1])),
            envelope: true,
            ..Default::default()
        })
        .await;
    assert_eq!(meta.err().map(|e| e.code()), Some(tonic::Code::NotFound));
    let body = mb
        .fetch_body(FetchBodyRequest {
            account_id: other,
            mailbox_id: inbox,
            uids: Some(UidSet::from_uids([1])),
            sections: vec![full()],
        })
        .await;
    assert_eq!(body.err().map(|e| e.code()), Some(tonic::Code::NotFound));
    // The owner asking for UIDs that do not exist gets an empty answer, not an error.
    let mut none = mb
        .fetch_body(FetchBodyRequest {
            account_id: owner,
            mailbox_id: inbox,
            uids: Some(UidSet::from_uids([5])),
            sections: vec![full()],
        })
        .await
        .expect("owner's mailbox")
        .into_inner();
    assert!(none.message().await.expect("end of stream").is_none());
    assert!(
        fetch_meta(&mut mb, owner, inbox, UidSet::from_uids([5]))
            .await
            .is_empty()
    );
    s.shutdown.trigger();
}
