//! Changes (what every IDLE session asks on new mail): one snapshot for its state, entries and
//! expunges; the entry count kept on the mailbox row agrees with the entries after every kind
//! of write, also when deliveries, expunges, moves and copies run at once; ownership.

mod common;

use std::collections::BTreeSet;

use common::*;
use mailsuite_proto::mailbox_client::MailboxClient;
use mailsuite_proto::*;
use tonic::transport::Channel;

async fn changes(
    mb: &mut MailboxClient<Channel>,
    acc: i64,
    id: i64,
    since: u64,
) -> ChangesResponse {
    mb.changes(ChangesRequest {
        account_id: acc,
        mailbox_id: id,
        since_modseq: since,
        claim_recent: false,
    })
    .await
    .expect("changes")
    .into_inner()
}

async fn select(mb: &mut MailboxClient<Channel>, acc: i64, name: &str) -> SelectResponse {
    mb.select(SelectRequest {
        account_id: acc,
        name: name.into(),
        read_only: true,
    })
    .await
    .expect("select")
    .into_inner()
}

/// The kept count of every mailbox against a count of its entries.
async fn assert_counts_kept(s: &Store) {
    let wrong: Vec<(i64, i64, i64)> = sqlx::query_as(
        "SELECT mb.id, mb.message_count, (SELECT count(*) FROM mailbox.messages m WHERE m.mailbox_id = mb.id)
           FROM mailbox.mailboxes mb
          WHERE mb.message_count <> (SELECT count(*) FROM mailbox.messages m WHERE m.mailbox_id = mb.id)",
    )
    .fetch_all(&s.db.pool)
    .await
    .unwrap();
    assert!(wrong.is_empty(), "(mailbox, kept, counted): {wrong:?}");
}

/// Changes since 0 lists every entry: it must agree with Select taken at rest.
async fn assert_agrees_with_select(mb: &mut MailboxClient<Channel>, acc: i64, id: i64, name: &str) {
    let ch = changes(mb, acc, id, 0).await;
    let sel = select(mb, acc, name).await;
    let info = sel.mailbox.unwrap();
    let uids: Vec<u32> = ch.changed.iter().map(|m| m.uid).collect();
    assert_eq!(uids, sel.uids, "{name}: entries");
    assert_eq!(ch.messages, info.messages, "{name}: count");
    assert_eq!(ch.messages as usize, sel.uids.len(), "{name}: count");
    assert_eq!(ch.uidnext, info.uidnext, "{name}: uidnext");
    assert_eq!(
        ch.highestmodseq, info.highestmodseq,
        "{name}: highestmodseq"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn count_follows_every_kind_of_write() {
    let s = store().await;
    let acc = s.account("count@example.test").await;
    let mut d = s.delivery().await;
    let mut mb = s.mailbox().await;
    for i in 0..3 {
        deliver(
            &mut d,
            &format!("k{i}"),
            &["count@example.test"],
            &message("d", &format!("{i}")),
        )
        .await
        .unwrap();
    }
    append(
        &mut mb,
        acc,
        "INBOX",
        &["\\Seen"],
        0,
        &message("a", "appended"),
    )
    .await;
    let inbox = s.inbox(acc).await;
    assert_eq!(changes(&mut mb, acc, inbox, 0).await.messages, 4);
    mb.create_mailbox(CreateMailboxRequest {
        account_id: acc,
        name: "Other".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let other = s.mailbox_id(acc, "Other").await;
    // COPY two, MOVE one, EXPUNGE one.
    for (uids, mv) in [(vec![1u32, 2], false), (vec![3], true)] {
        mb.copy(CopyRequest {
            account_id: acc,
            mailbox_id: inbox,
            uids: Some(UidSet::from_uids(uids)),
            destination: "Other".into(),
            r#move: mv,
        })
        .await
        .unwrap();
    }
    mb.store_flags(StoreFlagsRequest {
        account_id: acc,
        mailbox_id: inbox,
        uids: Some(UidSet::from_uids([4])),
        mode: StoreMode::Add as i32,
        flags: vec!["\\Deleted".into()],
        unchanged_since: 0,
    })
    .await
    .unwrap();
    mb.expunge(ExpungeRequest {
        account_id: acc,
        mailbox_id: inbox,
        uids: None,
    })
    .await
    .unwrap();
    assert_eq!(changes(&mut mb, acc, inbox, 0).await.messages, 2);
    assert_eq!(changes(&mut mb, acc, other, 0).await.messages, 3);
    assert_counts_kept(&s).await;
    assert_agrees_with_select(&mut mb, acc, inbox, "INBOX").await;
    assert_agrees_with_select(&mut mb, acc, other, "Other").await;

    // RENAME INBOX moves its entries to a new mailbox (an UPDATE of their mailbox).
    mb.rename_mailbox(RenameMailboxRequest {
        account_id: acc,
        from: "INBOX".into(),
        to: "Old".into(),
    })
    .await
    .unwrap();
    let old = s.mailbox_id(acc, "Old").await;
    assert_eq!(changes(&mut mb, acc, inbox, 0).await.messages, 0);
    assert_eq!(changes(&mut mb, acc, old, 0).await.messages, 2);
    assert_counts_kept(&s).await;
    assert_agrees_with_select(&mut mb, acc, old, "Old").await;

    // Deleting a mailbox and removing an account leave no other count wrong.
    mb.delete_mailbox(DeleteMailboxRequest {
        account_id: acc,
        name: "Other".into(),
    })
    .await
    .unwrap();
    assert_counts_kept(&s).await;
    let acc2 = s.account("second@example.test").await;
    deliver(
        &mut d,
        "k-second",
        &["second@example.test"],
        &message("x", "y"),
    )
    .await
    .unwrap();
    s.admin()
        .await
        .remove_account(RemoveAccountRequest {
            address: "count@example.test".into(),
        })
        .await
        .unwrap();
    assert_counts_kept(&s).await;
    let inbox2 = s.inbox(acc2).await;
    assert_eq!(changes(&mut mb, acc2, inbox2, 0).await.messages, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn changes_is_one_snapshot_under_concurrent_writes() {
    let s = store().await;
    let addr = "busy@example.test";
    let acc = s.account(addr).await;
    let mut mb = s.mailbox().await;
    for i in 0..20 {
        append(
            &mut mb,
            acc,
            "INBOX",
            &[],
            0,
            &message("seed", &format!("{i}")),
        )
        .await;
    }
    mb.create_mailbox(CreateMailboxRequest {
        account_id: acc,
        name: "Stash".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let inbox = s.inbox(acc).await;
    let archive = s.mailbox_id(acc, "Stash").await;
    let before = changes(&mut mb, acc, inbox, 0).await;
    let uids_before: BTreeSet<u32> = before.changed.iter().map(|m| m.uid).collect();

    const ROUNDS: usize = 15;
    let mut tasks = Vec::new();
    // Deliveries into INBOX.
    for t in 0..3 {
        let mut d = s.delivery().await;
        tasks.push(tokio::spawn(async move {
            for i in 0..ROUNDS {
                let body = format!("{t} {i}");
                deliver(
                    &mut d,
                    &format!("c{t}-{i}"),
                    &[addr],
                    &message("new", &body),
                )
                .await
                .expect("deliver");
            }
        }));
    }
    // Expunges of the seeded entries, two at a time.
    {
        let mut m = s.mailbox().await;
        tasks.push(tokio::spawn(async move {
            for i in 0..5u32 {
                let uids = UidSet::from_uids([2 * i + 1, 2 * i + 2]);
                m.store_flags(StoreFlagsRequest {
                    account_id: acc,
                    mailbox_id: inbox,
                    uids: Some(uids.clone()),
                    mode: StoreMode::Add as i32,
                    flags: vec!["\\Deleted".into()],
                    unchanged_since: 0,
                })
                .await
                .expect("store");
                m.expunge(ExpungeRequest {
                    account_id: acc,
                    mailbox_id: inbox,
                    uids: Some(uids),
                })
                .await
                .expect("expunge");
            }
        }));
    }
    // Moves of other seeded entries to Stash, and copies back.
    {
        let mut m = s.mailbox().await;
        tasks.push(tokio::spawn(async move {
            for i in 0..5u32 {
                m.copy(CopyRequest {
                    account_id: acc,
                    mailbox_id: inbox,
                    uids: Some(UidSet::from_uids([11 + i])),
                    destination: "Stash".into(),
                    r#move: true,
                })
                .await
                .expect("move");
                m.copy(CopyRequest {
                    account_id: acc,
                    mailbox_id: archive,
                    uids: Some(UidSet::from_ranges([(1, u32::MAX)])),
                    destination: "INBOX".into(),
                    r#move: false,
                })
                .await
                .expect("copy");
            }
        }));
    }
    // Meanwhile: every Changes answer must be one consistent state. Since 0 it lists every
    // entry, so the count must equal the entries listed; every UID is below uidnext and every
    // modseq at most highestmodseq; the state never goes backwards.
    let mut reader = s.mailbox().await;
    let mut last = before.clone();
    let mut reads = 0;
    while !tasks.iter().all(|t| t.is_finished()) || reads < 5 {
        for (id, _) in [(inbox, "INBOX"), (archive, "Stash")] {
            let ch = changes(&mut reader, acc, id, 0).await;
            assert_eq!(
                ch.messages as usize,
                ch.changed.len(),
                "count vs entries: {ch:?}"
            );
            assert!(ch.changed.iter().all(|m| m.uid < ch.uidnext), "{ch:?}");
            assert!(
                ch.changed.iter().all(|m| m.modseq <= ch.highestmodseq),
                "{ch:?}"
            );
            assert!(ch.changed.windows(2).all(|w| w[0].uid < w[1].uid), "{ch:?}");
            if id == inbox {
                assert!(ch.highestmodseq >= last.highestmodseq && ch.uidnext >= last.uidnext);
                last = ch;
            }
        }
        reads += 1;
    }
    for t in tasks {
        t.await.unwrap();
    }

    // At rest: Changes agrees with Select and with a count of the entries.
    assert_counts_kept(&s).await;
    assert_agrees_with_select(&mut mb, acc, inbox, "INBOX").await;
    assert_agrees_with_select(&mut mb, acc, archive, "Stash").await;
    let now = select(&mut mb, acc, "INBOX").await;
    // 20 seeded, 10 expunged, 5 moved out, 1 + 2 + .. + 5 copied back, and the deliveries.
    assert_eq!(now.uids.len(), 20 - 10 - 5 + 15 + 3 * ROUNDS);
    // What an IDLE session that last saw `before` is told: every entry gone since is expunged,
    // every entry new since is changed, and they add up to the count.
    let since = changes(&mut mb, acc, inbox, before.highestmodseq).await;
    let now_uids: BTreeSet<u32> = now.uids.iter().copied().collect();
    let expunged: BTreeSet<u32> = since.expunged.iter().copied().collect();
    let changed: BTreeSet<u32> = since.changed.iter().map(|m| m.uid).collect();
    assert_eq!(
        expunged,
        uids_before.difference(&now_uids).copied().collect(),
        "expunged since"
    );
    assert!(changed.is_superset(&now_uids.difference(&uids_before).copied().collect()));
    assert_eq!(
        uids_before.len() - expunged.len() + now_uids.difference(&uids_before).count(),
        since.messages as usize
    );
    assert!(!since.truncated);
}

#[tokio::test(flavor = "multi_thread")]
async fn changes_of_a_mailbox_not_owned_is_not_found() {
    let s = store().await;
    let alice = s.account("alice@example.test").await;
    let bob = s.account("bob@example.test").await;
    let mut mb = s.mailbox().await;
    append(&mut mb, alice, "INBOX", &[], 0, &message("a", "b")).await;
    let inbox = s.inbox(alice).await;
    assert_eq!(changes(&mut mb, alice, inbox, 0).await.changed.len(), 1);
    for (acc, id) in [(bob, inbox), (alice, inbox + 1000)] {
        let e = mb
            .changes(ChangesRequest {
                account_id: acc,
                mailbox_id: id,
                since_modseq: 0,
                claim_recent: false,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound, "{acc} {id}");
    }
}

/// The migration counts the entries already stored: undo it on a fresh database, store
/// entries the way the previous release did (no count kept), and apply it again.
#[tokio::test(flavor = "multi_thread")]
async fn migration_counts_existing_entries() {
    let s = store().await;
    let acc = s.account("old@example.test").await;
    let mut mb = s.mailbox().await;
    mb.create_mailbox(CreateMailboxRequest {
        account_id: acc,
        name: "Empty".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    sqlx::raw_sql(
        "DROP TRIGGER messages_count_insert ON mailbox.messages;
         DROP TRIGGER messages_count_delete ON mailbox.messages;
         DROP TRIGGER messages_count_move ON mailbox.messages;
         DROP FUNCTION mailbox.message_count_insert(), mailbox.message_count_delete(),
                       mailbox.message_count_move();
         ALTER TABLE mailbox.mailboxes DROP COLUMN message_count;",
    )
    .execute(&s.db.pool)
    .await
    .unwrap();
    let pool = &s.db.pool;
    let mut d = s.delivery().await;
    for i in 0..4 {
        deliver(
            &mut d,
            &format!("old{i}"),
            &["old@example.test"],
            &message("o", &format!("{i}")),
        )
        .await
        .unwrap();
    }
    sqlx::raw_sql(include_str!(
        "../../../migrations/20261128010002_mailbox_message_count.sql"
    ))
    .execute(pool)
    .await
    .unwrap();
    let counts: Vec<(String, i64)> = sqlx::query_as(
        "SELECT name, message_count FROM mailbox.mailboxes WHERE account_id = $1 ORDER BY name",
    )
    .bind(acc)
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(counts.contains(&("INBOX".to_string(), 4)), "{counts:?}");
    assert!(counts.contains(&("Empty".to_string(), 0)), "{counts:?}");
    assert_counts_kept(&s).await;
}
