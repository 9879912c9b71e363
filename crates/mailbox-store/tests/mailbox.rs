//! Mailbox operations: flags with CONDSTORE, Changes (QRESYNC), copy/move with UIDPLUS
//! mappings, expunge, mailbox create/rename/delete, Watch across two replicas, Alert and
//! the POP3 maildrop lock.

mod common;

use std::time::Duration;

use common::*;
use mailsuite_proto::*;
use mailsuite_testkit::eventually;

async fn seed(s: &Store, acc: i64, n: usize) -> i64 {
    let mut mb = s.mailbox().await;
    for i in 0..n {
        append(
            &mut mb,
            acc,
            "INBOX",
            &[],
            0,
            &message(&format!("s{i}"), &format!("body {i}")),
        )
        .await;
    }
    s.inbox(acc).await
}

fn store_req(
    acc: i64,
    mbox: i64,
    uids: &[u32],
    mode: StoreMode,
    flags: &[&str],
    since: u64,
) -> StoreFlagsRequest {
    StoreFlagsRequest {
        account_id: acc,
        mailbox_id: mbox,
        uids: Some(UidSet::from_uids(uids.iter().copied())),
        mode: mode as i32,
        flags: flags.iter().map(|s| s.to_string()).collect(),
        unchanged_since: since,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn flags_condstore_and_changes() {
    let s = store().await;
    let acc = s.account("alice@example.test").await;
    let inbox = seed(&s, acc, 3).await;
    let mut mb = s.mailbox().await;
    // \Recent is reported until a session selects the mailbox.
    let metas = fetch_meta(&mut mb, acc, inbox, UidSet::all()).await;
    assert!(
        metas
            .iter()
            .all(|m| m.flags == vec!["\\Recent".to_string()])
    );
    mb.select(SelectRequest {
        account_id: acc,
        name: "INBOX".into(),
        read_only: false,
    })
    .await
    .unwrap();
    let before = mb
        .status(StatusRequest {
            account_id: acc,
            name: "INBOX".into(),
        })
        .await
        .unwrap()
        .into_inner();

    let r = mb
        .store_flags(store_req(
            acc,
            inbox,
            &[1, 2],
            StoreMode::Add,
            &["\\seen", "$Work"],
            0,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.messages.len(), 2);
    assert!(
        r.messages
            .iter()
            .all(|m| m.flags.contains(&"\\Seen".to_string())
                && m.flags.contains(&"$Work".to_string()))
    );
    assert!(r.highestmodseq > before.highestmodseq);
    let after_add = r.highestmodseq;

    // UNCHANGEDSINCE older than message 1's modseq: 1 is reported MODIFIED, 3 is changed.
    let r = mb
        .store_flags(store_req(
            acc,
            inbox,
            &[1, 3],
            StoreMode::Replace,
            &["\\Flagged"],
            before.highestmodseq,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.modified, vec![1]);
    let m1 = r.messages.iter().find(|m| m.uid == 1).unwrap();
    assert!(
        m1.flags.contains(&"\\Seen".to_string()),
        "message 1 untouched"
    );
    let m3 = r.messages.iter().find(|m| m.uid == 3).unwrap();
    assert_eq!(m3.flags, vec!["\\Flagged".to_string()]);

    let r = mb
        .store_flags(store_req(
            acc,
            inbox,
            &[2],
            StoreMode::Remove,
            &["$work"],
            0,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.messages[0].flags, vec!["\\Seen".to_string()]);

    // Storing what is already there changes nothing and costs no modseq.
    let same = mb
        .store_flags(store_req(acc, inbox, &[2], StoreMode::Add, &["\\Seen"], 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(same.highestmodseq, r.highestmodseq);

    let ch = mb
        .changes(ChangesRequest {
            account_id: acc,
            mailbox_id: inbox,
            since_modseq: after_add,
            claim_recent: false,
        })
        .await
        .unwrap()
        .into_inner();
    let uids: Vec<u32> = ch.changed.iter().map(|c| c.uid).collect();
    assert_eq!(uids, vec![2, 3]);
    assert!(ch.expunged.is_empty());
    assert_eq!(ch.messages, 3);
    assert_eq!(ch.uidnext, 4);
    assert!(!ch.truncated);

    // Expunge: only \Deleted, only within the UID set when one is given.
    mb.store_flags(store_req(
        acc,
        inbox,
        &[1, 2, 3],
        StoreMode::Add,
        &["\\Deleted"],
        0,
    ))
    .await
    .unwrap();
    let mark = mb
        .status(StatusRequest {
            account_id: acc,
            name: "INBOX".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(mark.deleted, 3);
    let ex = mb
        .expunge(ExpungeRequest {
            account_id: acc,
            mailbox_id: inbox,
            uids: Some(UidSet::from_uids([2, 3])),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ex.expunged, vec![2, 3]);
    let ch = mb
        .changes(ChangesRequest {
            account_id: acc,
            mailbox_id: inbox,
            since_modseq: mark.highestmodseq,
            claim_recent: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ch.expunged, vec![2, 3]);
    assert_eq!(ch.messages, 1);
    assert_eq!(ch.highestmodseq, ex.highestmodseq);
    let ex = mb
        .expunge(ExpungeRequest {
            account_id: acc,
            mailbox_id: inbox,
            uids: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ex.expunged, vec![1]);
    let blobs: i64 = sqlx::query_scalar("SELECT count(*) FROM mailbox.blobs")
        .fetch_one(&s.db.pool)
        .await
        .unwrap();
    assert_eq!(blobs, 0, "unreferenced blobs are removed");
    let q = mb
        .get_quota(GetQuotaRequest { account_id: acc })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((q.used_bytes, q.used_messages), (0, 0));
}

#[tokio::test(flavor = "multi_thread")]
async fn copy_and_move_return_uid_mappings() {
    let s = store().await;
    let acc = s.account("alice@example.test").await;
    let inbox = seed(&s, acc, 4).await;
    let mut mb = s.mailbox().await;
    mb.store_flags(store_req(
        acc,
        inbox,
        &[2],
        StoreMode::Add,
        &["\\Flagged"],
        0,
    ))
    .await
    .unwrap();
    let archive = s.mailbox_id(acc, "Archive").await;
    let arch_info = mb
        .status(StatusRequest {
            account_id: acc,
            name: "Archive".into(),
        })
        .await
        .unwrap()
        .into_inner();

    let c = mb
        .copy(CopyRequest {
            account_id: acc,
            mailbox_id: inbox,
            uids: Some(UidSet::from_uids([2, 4])),
            destination: "Archive".into(),
            r#move: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(c.source_uids, vec![2, 4]);
    assert_eq!(c.destination_uids, vec![1, 2]);
    assert_eq!(c.uidvalidity, arch_info.uidvalidity);
    let metas = fetch_meta(&mut mb, acc, archive, UidSet::all()).await;
    assert!(
        metas[0].flags.contains(&"\\Flagged".to_string()),
        "flags are copied"
    );
    let q = mb
        .get_quota(GetQuotaRequest { account_id: acc })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(q.used_messages, 6);

    let m = mb
        .copy(CopyRequest {
            account_id: acc,
            mailbox_id: inbox,
            uids: Some(UidSet::from_ranges([(1, 3)])),
            destination: "Archive".into(),
            r#move: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(m.source_uids, vec![1, 2, 3]);
    assert_eq!(m.destination_uids, vec![3, 4, 5]);
    let sel = mb
        .select(SelectRequest {
            account_id: acc,
            name: "INBOX".into(),
            read_only: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sel.uids, vec![4]);
    let sel = mb
        .select(SelectRequest {
            account_id: acc,
            name: "Archive".into(),
            read_only: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sel.uids, vec![1, 2, 3, 4, 5]);
    let q = mb
        .get_quota(GetQuotaRequest { account_id: acc })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(q.used_messages, 6, "a move does not change usage");
    let moved = fetch_section(&mut mb, acc, archive, 4, full())
        .await
        .unwrap();
    assert_eq!(moved, message("s1", "body 1"));

    let err = mb
        .copy(CopyRequest {
            account_id: acc,
            mailbox_id: inbox,
            uids: Some(UidSet::all()),
            destination: "Nope".into(),
            r#move: false,
        })
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::NotFound,
        "the gateway answers [TRYCREATE]"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn mailbox_create_rename_delete() {
    let s = store().await;
    let acc = s.account("alice@example.test").await;
    seed(&s, acc, 2).await;
    let mut mb = s.mailbox().await;
    let info = mb
        .create_mailbox(CreateMailboxRequest {
            account_id: acc,
            name: "Projects/2026/Q1".into(),
            special_use: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.name, "Projects/2026/Q1");
    let list = mb
        .list_mailboxes(ListMailboxesRequest {
            account_id: acc,
            with_status: false,
        })
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = list.mailboxes.iter().map(|m| m.name.as_str()).collect();
    assert!(
        names.contains(&"Projects") && names.contains(&"Projects/2026"),
        "{names:?}"
    );
    assert!(
        list.mailboxes
            .iter()
            .find(|m| m.name == "Projects")
            .unwrap()
            .has_children
    );
    assert!(
        !list
            .mailboxes
            .iter()
            .find(|m| m.name == "Projects/2026/Q1")
            .unwrap()
            .has_children
    );
    let err = mb
        .create_mailbox(CreateMailboxRequest {
            account_id: acc,
            name: "projects//x".into(),
            special_use: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = mb
        .create_mailbox(CreateMailboxRequest {
            account_id: acc,
            name: "inbox".into(),
            special_use: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists);

    mb.rename_mailbox(RenameMailboxRequest {
        account_id: acc,
        from: "Projects".into(),
        to: "Work".into(),
    })
    .await
    .unwrap();
    let list = mb
        .list_mailboxes(ListMailboxesRequest {
            account_id: acc,
            with_status: false,
        })
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = list.mailboxes.iter().map(|m| m.name.as_str()).collect();
    assert!(
        names.contains(&"Work/2026/Q1") && !names.iter().any(|n| n.starts_with("Projects")),
        "{names:?}"
    );

    // Renaming INBOX moves its messages; INBOX remains, empty.
    mb.rename_mailbox(RenameMailboxRequest {
        account_id: acc,
        from: "INBOX".into(),
        to: "Old".into(),
    })
    .await
    .unwrap();
    let old = mb
        .status(StatusRequest {
            account_id: acc,
            name: "Old".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(old.messages, 2);
    let inbox = mb
        .status(StatusRequest {
            account_id: acc,
            name: "INBOX".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(inbox.messages, 0);

    let err = mb
        .delete_mailbox(DeleteMailboxRequest {
            account_id: acc,
            name: "INBOX".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    mb.delete_mailbox(DeleteMailboxRequest {
        account_id: acc,
        name: "Old".into(),
    })
    .await
    .unwrap();
    let q = mb
        .get_quota(GetQuotaRequest { account_id: acc })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(q.used_messages, 0);
    // A re-created mailbox gets a new UIDVALIDITY.
    let again = mb
        .create_mailbox(CreateMailboxRequest {
            account_id: acc,
            name: "Old".into(),
            special_use: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(again.uidvalidity, old.uidvalidity);

    mb.set_subscribed(SetSubscribedRequest {
        account_id: acc,
        name: "Old".into(),
        subscribed: false,
    })
    .await
    .unwrap();
    let st = mb
        .status(StatusRequest {
            account_id: acc,
            name: "Old".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!st.subscribed);
}

/// RFC 9051 §6.3.4/§6.3.6/§6.3.7: a subscription is a name, not a property of a mailbox.
/// CREATE does not add one, DELETE and RENAME leave it where it is, and UNSUBSCRIBE still
/// removes it after the mailbox is gone.
#[tokio::test(flavor = "multi_thread")]
async fn subscriptions_are_names_independent_of_mailboxes() {
    let s = store().await;
    let acc = s.account("alice@example.test").await;
    let mut mb = s.mailbox().await;
    use mailsuite_proto::mailbox_client::MailboxClient;
    use tonic::transport::Channel;
    async fn subs(mb: &mut MailboxClient<Channel>, acc: i64) -> (Vec<String>, Vec<String>) {
        let l = mb
            .list_mailboxes(ListMailboxesRequest {
                account_id: acc,
                with_status: false,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(l.subscriptions_listed);
        let flagged = l
            .mailboxes
            .into_iter()
            .filter(|m| m.subscribed)
            .map(|m| m.name)
            .collect();
        (l.subscriptions, flagged)
    }
    async fn set(
        mb: &mut MailboxClient<Channel>,
        acc: i64,
        name: &str,
        on: bool,
    ) -> Result<(), tonic::Code> {
        mb.set_subscribed(SetSubscribedRequest {
            account_id: acc,
            name: name.into(),
            subscribed: on,
        })
        .await
        .map(|_| ())
        .map_err(|e| e.code())
    }
    let defaults = ["Archive", "Drafts", "INBOX", "Junk", "Sent", "Trash"];
    // A new account's default folders start subscribed, deliberately (admin.rs).
    let (names, flagged) = subs(&mut mb, acc).await;
    assert_eq!(names, defaults);
    assert_eq!(flagged.len(), defaults.len());

    for name in ["probe/a/b", "probe/c"] {
        let info = mb
            .create_mailbox(CreateMailboxRequest {
                account_id: acc,
                name: name.into(),
                special_use: 0,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(!info.subscribed, "{name}");
    }
    assert_eq!(
        subs(&mut mb, acc).await.0,
        defaults,
        "CREATE subscribes nothing"
    );

    assert_eq!(
        set(&mut mb, acc, "nope", true).await,
        Err(tonic::Code::NotFound)
    );
    set(&mut mb, acc, "probe/c", true).await.unwrap();
    set(&mut mb, acc, "probe/a", true).await.unwrap();
    mb.delete_mailbox(DeleteMailboxRequest {
        account_id: acc,
        name: "probe/c".into(),
    })
    .await
    .unwrap();
    mb.rename_mailbox(RenameMailboxRequest {
        account_id: acc,
        from: "probe/a".into(),
        to: "probe/z".into(),
    })
    .await
    .unwrap();
    let (names, flagged) = subs(&mut mb, acc).await;
    assert_eq!(
        names,
        [
            "Archive", "Drafts", "INBOX", "Junk", "Sent", "Trash", "probe/a", "probe/c"
        ],
        "kept through DELETE and RENAME, not moved to probe/z"
    );
    assert!(
        !flagged.iter().any(|n| n.starts_with("probe")),
        "{flagged:?}"
    );

    set(&mut mb, acc, "probe/c", false).await.unwrap();
    assert_eq!(
        set(&mut mb, acc, "probe/c", false).await,
        Err(tonic::Code::NotFound),
        "neither a subscription nor a mailbox"
    );
    set(&mut mb, acc, "probe/z", false)
        .await
        .expect("unsubscribing an existing mailbox that is not subscribed is fine");
    assert_eq!(subs(&mut mb, acc).await.0.last().unwrap(), "probe/a");
}

/// Migration 20261203020001 on a database of the previous release: the subscribed flags
/// become rows, and while replicas of that release still run, their SUBSCRIBE/UNSUBSCRIBE
/// (an UPDATE of the flag) reach the table.
#[tokio::test(flavor = "multi_thread")]
async fn subscriptions_migration_copies_flags_and_follows_the_old_release() {
    let s = store().await;
    let acc = s.account("alice@example.test").await;
    let mut mb = s.mailbox().await;
    for name in ["Old1", "Old2"] {
        mb.create_mailbox(CreateMailboxRequest {
            account_id: acc,
            name: name.into(),
            special_use: 0,
        })
        .await
        .unwrap();
    }
    let pool = &s.db.pool;
    sqlx::raw_sql(
        "DROP TRIGGER mailboxes_subscribed_flag_carry ON mailbox.mailboxes;
         DROP FUNCTION mailbox.subscribed_flag_carry();
         DROP TABLE mailbox.subscriptions;
         ALTER TABLE mailbox.mailboxes ALTER COLUMN subscribed SET DEFAULT true;",
    )
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "UPDATE mailbox.mailboxes SET subscribed = name IN ('INBOX', 'Old1') WHERE account_id = $1",
    )
    .bind(acc)
    .execute(pool)
    .await
    .unwrap();
    sqlx::raw_sql(include_str!(
        "../../../migrations/20261203020001_mailbox_subscriptions.sql"
    ))
    .execute(pool)
    .await
    .unwrap();
    let subs = || async {
        sqlx::query_scalar::<_, String>(
            "SELECT name FROM mailbox.subscriptions WHERE account_id = $1 ORDER BY name",
        )
        .bind(acc)
        .fetch_all(pool)
        .await
        .unwrap()
    };
    assert_eq!(subs().await, ["INBOX", "Old1"]);
    let old_release = |name: &'static str, on: bool| async move {
        sqlx::query(
            "UPDATE mailbox.mailboxes SET subscribed = $3 WHERE account_id = $1 AND name = $2",
        )
        .bind(acc)
        .bind(name)
        .bind(on)
        .execute(pool)
        .await
        .unwrap();
    };
    old_release("Old1", false).await;
    old_release("Old2", true).await;
    assert_eq!(subs().await, ["INBOX", "Old2"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_sees_deliveries_made_through_another_replica() {
    let s = store().await;
    let acc = s.account("alice@example.test").await;
    let other_acc = s.account("bob@example.test").await;
    // A second store process on the same database.
    let sd2 = mailsuite_runtime::Shutdown::new();
    let b = mailsuite_mailbox_store::start(config(&s.db.url), sd2.clone())
        .await
        .unwrap();

    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut watcher = mailsuite_proto::mailbox_client::MailboxClient::new(channel(b.grpc).await);
    let mut events = watcher
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(WatchControl {
        add_accounts: vec![acc],
        remove_accounts: vec![],
    })
    .await
    .unwrap();

    // Presence is registered (through replica B) before we deliver through replica A.
    let mut a_mb = s.mailbox().await;
    eventually(Duration::from_secs(5), "watch registered", || {
        let mut a_mb = a_mb.clone();
        async move {
            let r = a_mb
                .alert(AlertRequest {
                    address: "alice@example.test".into(),
                    text: "ping".into(),
                    probe_only: false,
                })
                .await
                .ok()?;
            r.into_inner().online.then_some(())
        }
    })
    .await;
    let first = tokio::time::timeout(Duration::from_secs(2), events.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(first.kind, ChangeKind::Alert as i32);
    assert_eq!(first.text, "ping");

    let mut d = s.delivery().await;
    deliver(
        &mut d,
        "bob-1",
        &["bob@example.test"],
        &message("for bob", "x"),
    )
    .await
    .unwrap();
    let started = std::time::Instant::now();
    deliver(
        &mut d,
        "alice-1",
        &["alice@example.test"],
        &message("for alice", "x"),
    )
    .await
    .unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(1), events.message())
        .await
        .expect("within 1 s")
        .unwrap()
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(
        ev.account_id, acc,
        "bob's delivery is not sent to alice's watcher"
    );
    assert_eq!(ev.kind, ChangeKind::New as i32);
    assert_eq!(ev.uids, vec![1]);
    assert_eq!(ev.mailbox_id, s.inbox(acc).await);
    let _ = other_acc;

    // Flag changes and expunges are published too.
    let inbox = s.inbox(acc).await;
    a_mb.store_flags(store_req(
        acc,
        inbox,
        &[1],
        StoreMode::Add,
        &["\\Deleted"],
        0,
    ))
    .await
    .unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(1), events.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(ev.kind, ChangeKind::Flags as i32);
    a_mb.expunge(ExpungeRequest {
        account_id: acc,
        mailbox_id: inbox,
        uids: None,
    })
    .await
    .unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(1), events.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(ev.kind, ChangeKind::Expunge as i32);
    assert_eq!(ev.uids, vec![1]);

    // Closing the stream ends presence: the account is offline again.
    drop(tx);
    drop(events);
    eventually(Duration::from_secs(5), "presence removed", || {
        let mut a_mb = a_mb.clone();
        async move {
            let r = a_mb
                .alert(AlertRequest {
                    address: "alice@example.test".into(),
                    text: "x".into(),
                    probe_only: false,
                })
                .await
                .ok()?;
            (!r.into_inner().online).then_some(())
        }
    })
    .await;

    // Shutdown ends open Watch streams so the server can stop.
    let (_tx2, rx2) = tokio::sync::mpsc::channel::<WatchControl>(1);
    let mut w2 = watcher
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx2))
        .await
        .unwrap()
        .into_inner();
    assert!(
        tokio::time::timeout(Duration::from_secs(10), sd2.drain(Duration::from_secs(5)))
            .await
            .unwrap(),
        "drained cleanly"
    );
    let end = tokio::time::timeout(Duration::from_secs(5), w2.message())
        .await
        .unwrap();
    assert!(matches!(end, Ok(None) | Err(_)));
}

#[tokio::test(flavor = "multi_thread")]
async fn maildrop_lock_is_exclusive_and_released_with_the_stream() {
    let s = store().await;
    let acc = s.account("alice@example.test").await;
    let mut mb = s.mailbox().await;
    let lock =
        |mb: &mut mailsuite_proto::mailbox_client::MailboxClient<tonic::transport::Channel>| {
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            let mut mb = mb.clone();
            async move {
                tx.send(LockControl {
                    account_id: acc,
                    mailbox: String::new(),
                })
                .await
                .unwrap();
                let mut s = mb
                    .lock_maildrop(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await
                    .unwrap()
                    .into_inner();
                let ev = s.message().await.unwrap().unwrap();
                (ev.acquired, tx, s)
            }
        };
    let (held, tx1, s1) = lock(&mut mb).await;
    assert!(held);
    let (second, _tx2, _s2) = lock(&mut mb).await;
    assert!(
        !second,
        "a second session is refused while the first holds the lock"
    );
    drop(tx1);
    drop(s1);
    eventually(Duration::from_secs(5), "lock released", || {
        let mut mb = mb.clone();
        async move {
            let (ok, tx, s) = lock(&mut mb).await;
            drop((tx, s));
            ok.then_some(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pruned_change_log_is_reported_as_truncated() {
    let s = store().await;
    let acc = s.account("alice@example.test").await;
    let inbox = seed(&s, acc, 2).await;
    let mut mb = s.mailbox().await;
    mb.store_flags(store_req(
        acc,
        inbox,
        &[1],
        StoreMode::Add,
        &["\\Deleted"],
        0,
    ))
    .await
    .unwrap();
    let ex = mb
        .expunge(ExpungeRequest {
            account_id: acc,
            mailbox_id: inbox,
            uids: None,
        })
        .await
        .unwrap()
        .into_inner();
    let ch = mb
        .changes(ChangesRequest {
            account_id: acc,
            mailbox_id: inbox,
            since_modseq: 1,
            claim_recent: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ch.expunged, vec![1]);
    assert!(!ch.truncated);
    sqlx::query("UPDATE mailbox.changelog SET at = now() - interval '100 days'")
        .execute(&s.db.pool)
        .await
        .unwrap();
    mailsuite_mailbox_store::notify::maintain(&s.db.pool, 90)
        .await
        .unwrap();
    let ch = mb
        .changes(ChangesRequest {
            account_id: acc,
            mailbox_id: inbox,
            since_modseq: 1,
            claim_recent: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(ch.truncated, "the log no longer reaches back to modseq 1");
    let ch = mb
        .changes(ChangesRequest {
            account_id: acc,
            mailbox_id: inbox,
            since_modseq: ex.highestmodseq,
            claim_recent: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!ch.truncated);
}

#[tokio::test(flavor = "multi_thread")]
async fn size_limit_and_ops_metrics() {
    let db = mailsuite_testkit::TestDb::new().await;
    let mut cfg = config(&db.url);
    cfg.limits.max_message_bytes = 1000;
    cfg.listen_ops = "127.0.0.1:0".into();
    let sd = mailsuite_runtime::Shutdown::new();
    let started = mailsuite_mailbox_store::start(cfg, sd.clone())
        .await
        .unwrap();
    let s = Store {
        db,
        started,
        shutdown: sd,
    };
    s.account("alice@example.test").await;
    let mut d = s.delivery().await;
    let err = deliver(&mut d, "big", &["alice@example.test"], &vec![b'x'; 2000])
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange);
    deliver(
        &mut d,
        "small",
        &["alice@example.test"],
        &message("s", "small"),
    )
    .await
    .unwrap();

    let ops = s.started.ops.unwrap();
    let body = mailsuite_testkit::http_get(ops, "/metrics").await;
    assert!(body.contains("mailsuite_store_deliveries_total"), "{body}");
    // The shared registry: gRPC and database latency of the calls above.
    assert!(
        body.contains(
            "mailsuite_grpc_server_duration_seconds_bucket{code=\"OK\",rpc_method=\"Deliver\""
        ),
        "{body}"
    );
    assert!(
        body.contains("mailsuite_db_duration_seconds_count{operation=\"deliver\"}"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn alert_probe_reports_presence_without_publishing() {
    let s = store().await;
    let acc = s.account("alice@example.test").await;
    s.account("bob@example.test").await;
    let mut mb = s.mailbox().await;
    let probe = |address: &str| AlertRequest {
        address: address.into(),
        text: "probe".into(),
        probe_only: true,
    };
    let online = |r: tonic::Response<AlertResponse>| r.into_inner().online;
    assert!(!online(
        mb.alert(probe("alice@example.test")).await.unwrap()
    ));

    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let mut events = mb
        .watch(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    tx.send(WatchControl {
        add_accounts: vec![acc],
        remove_accounts: vec![],
    })
    .await
    .unwrap();
    eventually(Duration::from_secs(5), "alice online", || {
        let mut mb = mb.clone();
        async move {
            let r = mb.alert(probe("alice@example.test")).await.ok()?;
            r.into_inner().online.then_some(())
        }
    })
    .await;
    assert!(!online(mb.alert(probe("bob@example.test")).await.unwrap()));

    // The probes published nothing: the first alert the watcher sees is the real one.
    let r = mb
        .alert(AlertRequest {
            address: "alice@example.test".into(),
            text: "hello".into(),
            probe_only: false,
        })
        .await
        .unwrap();
    assert!(online(r));
    let ev = loop {
        let ev = tokio::time::timeout(Duration::from_secs(10), events.message())
            .await
            .expect("alert event")
            .unwrap()
            .unwrap();
        if ev.kind == ChangeKind::Alert as i32 {
            break ev;
        }
    };
    assert_eq!(ev.text, "hello");
    drop(tx);
}
