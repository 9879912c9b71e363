//! Group commit of Deliver calls (crate::batch) against real PostgreSQL: concurrent calls share
//! transactions, a failing delivery leaves the others of its batch alone, deliveries to one
//! mailbox in one batch get distinct consecutive UIDs.
//!
//! Which calls share a transaction is observed two ways: the store's own counters
//! (`Started::deliveries`) and PostgreSQL itself (rows written by one transaction carry its xid
//! in `xmin`). Some tests make the batch deterministic: a test transaction holds the row lock
//! of a "blocker" account, so the single committer sits on a delivery to it while the others
//! queue behind it (observed with `BatchStats::queued`), and they all go in the next batch.

mod common;

use std::time::Duration;

use common::*;
use mailsuite_proto::*;
use mailsuite_runtime::ServiceError;
use sqlx::{PgPool, Postgres, Transaction};

const DEADLINE: Duration = Duration::from_secs(60);

/// Poll `f` until it is true (testkit's `eventually`); panics with `what` after the deadline.
async fn wait_for<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    mailsuite_testkit::eventually(DEADLINE, what, || {
        let fut = f();
        async move { fut.await.then_some(()) }
    })
    .await
}

/// Number of distinct transactions that inserted the entries of `address`, and how many
/// entries each wrote (largest first).
async fn commits_of(pool: &PgPool, address: &str) -> Vec<i64> {
    sqlx::query_scalar(
        "SELECT count(*) FROM mailbox.messages m
           JOIN mailbox.mailboxes mb ON mb.id = m.mailbox_id
           JOIN mailbox.accounts a ON a.id = mb.account_id
          WHERE a.address = $1
          GROUP BY m.xmin::text ORDER BY 1 DESC",
    )
    .bind(address)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// (uid, modseq) of the INBOX entries of `address`, by UID.
async fn entries_of(pool: &PgPool, address: &str) -> Vec<(i64, i64)> {
    sqlx::query_as(
        "SELECT m.uid, m.modseq FROM mailbox.messages m
           JOIN mailbox.mailboxes mb ON mb.id = m.mailbox_id AND mb.name = 'INBOX'
           JOIN mailbox.accounts a ON a.id = mb.account_id
          WHERE a.address = $1 ORDER BY m.uid",
    )
    .bind(address)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Lock the row of `address` in a transaction of the test's own: a delivery to it waits.
async fn hold_account(pool: &PgPool, address: &str) -> Transaction<'static, Postgres> {
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM mailbox.accounts WHERE address = $1 FOR UPDATE")
        .bind(address)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx
}

/// Start a delivery to the held blocker and wait until the committer waits on its lock.
async fn block_committer(s: &Store) -> tokio::task::JoinHandle<DeliverResponse> {
    let mut d = s.delivery().await;
    let blocked = tokio::spawn(async move {
        deliver(
            &mut d,
            "blocker-key",
            &["blocker@example.test"],
            &message("blocker", "held"),
        )
        .await
        .unwrap()
    });
    let pool = s.db.pool.clone();
    wait_for("the committer to wait on the blocker's row lock", || {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE datname = current_database() AND wait_event_type = 'Lock'",
            )
            .fetch_one(&pool)
            .await
            .unwrap()
                >= 1
        }
    })
    .await;
    blocked
}

async fn wait_queued(s: &Store, n: u64) {
    let stats = s.started.deliveries.clone();
    wait_for(&format!("{n} deliveries queued"), || {
        let q = stats.queued();
        async move { q >= n }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn group_commit_fewer_commits_than_deliveries() {
    const N: usize = 64;
    const ACCOUNTS: usize = 8;
    let s = store().await;
    for a in 0..ACCOUNTS {
        s.account(&format!("user{a}@example.test")).await;
    }
    let stats = s.started.deliveries.clone();
    let before = (stats.batches(), stats.batched());
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(N));
    let mut tasks = Vec::new();
    for i in 0..N {
        let mut d = s.delivery().await;
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            let raw = message(&format!("m{i}"), &format!("message number {i}"));
            let to = format!("user{}@example.test", i % ACCOUNTS);
            barrier.wait().await;
            deliver(&mut d, &format!("key-{i}"), &[&to], &raw)
                .await
                .unwrap()
        }));
    }
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.results[0].status, RecipientStatus::Delivered as i32);
        assert!(!r.duplicate && !r.rolled_back);
    }
    let batches = stats.batches() - before.0;
    let batched = stats.batched() - before.1;
    let mut sizes = Vec::new();
    for a in 0..ACCOUNTS {
        let address = format!("user{a}@example.test");
        // Every account got its 8 messages as UIDs 1..=8, each with its own modseq rising
        // with the UID, however they were grouped.
        let e = entries_of(&s.db.pool, &address).await;
        assert_eq!(
            e.iter().map(|x| x.0).collect::<Vec<_>>(),
            (1..=(N / ACCOUNTS) as i64).collect::<Vec<_>>(),
            "{address}"
        );
        assert!(e.windows(2).all(|w| w[0].1 < w[1].1), "{address}: {e:?}");
        let (count, uidnext): (i64, i64) = sqlx::query_as(
            "SELECT mb.message_count, mb.uidnext FROM mailbox.mailboxes mb
               JOIN mailbox.accounts a ON a.id = mb.account_id
              WHERE a.address = $1 AND mb.name = 'INBOX'",
        )
        .bind(&address)
        .fetch_one(&s.db.pool)
        .await
        .unwrap();
        assert_eq!(
            (count, uidnext),
            ((N / ACCOUNTS) as i64, (N / ACCOUNTS) as i64 + 1)
        );
        sizes.extend(commits_of(&s.db.pool, &address).await);
    }
    // Transactions that wrote entries, as PostgreSQL saw them (across all accounts).
    let commits: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT xmin::text) FROM mailbox.messages")
            .fetch_one(&s.db.pool)
            .await
            .unwrap();
    eprintln!(
        "{N} deliveries: {batches} batch commits (store), {commits} writing transactions \
         (PostgreSQL xmin), largest batch {}, entries per (account, transaction): {sizes:?}",
        stats.largest()
    );
    assert_eq!(batched, N as u64);
    assert!(batches < N as u64, "{batches} commits for {N} deliveries");
    assert!(
        commits < N as i64,
        "{commits} transactions for {N} deliveries"
    );
    assert_eq!(commits as u64, batches);
    s.shutdown.drain(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_failing_delivery_in_a_batch_does_not_fail_the_others() {
    let s = store_with(|c| c.limits.delivery_committers = 1).await;
    s.account("blocker@example.test").await;
    s.account("ok@example.test").await;
    let mut admin = s.admin().await;
    admin
        .add_account(AddAccountRequest {
            address: "full@example.test".into(),
            password: "secret password".into(),
            quota_messages: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut d = s.delivery().await;
    deliver(
        &mut d,
        "fill",
        &["full@example.test"],
        &message("fill", "x"),
    )
    .await
    .unwrap();

    let lock = hold_account(&s.db.pool, "blocker@example.test").await;
    let blocked = block_committer(&s).await;
    let stats = s.started.deliveries.clone();
    let before = (stats.batches(), stats.batched());

    // Queued behind it: 10 good ones, one over quota, the same key twice.
    let mut good = Vec::new();
    for i in 0..10 {
        let mut d = s.delivery().await;
        good.push(tokio::spawn(async move {
            deliver(
                &mut d,
                &format!("good-{i}"),
                &["ok@example.test"],
                &message(&format!("good{i}"), "fine"),
            )
            .await
        }));
    }
    let mut d1 = s.delivery().await;
    let full = tokio::spawn(async move {
        deliver(
            &mut d1,
            "over",
            &["full@example.test"],
            &message("over", "no room"),
        )
        .await
    });
    let mut dups = Vec::new();
    for _ in 0..2 {
        let mut d = s.delivery().await;
        dups.push(tokio::spawn(async move {
            deliver(
                &mut d,
                "same-key",
                &["ok@example.test"],
                &message("dup", "once"),
            )
            .await
        }));
    }
    wait_queued(&s, 13).await;
    lock.rollback().await.unwrap();

    let b = blocked.await.unwrap();
    assert_eq!(b.results[0].status, RecipientStatus::Delivered as i32);
    for g in good {
        let r = g
            .await
            .unwrap()
            .expect("a good delivery of the batch succeeds");
        assert_eq!(r.results[0].status, RecipientStatus::Delivered as i32);
    }
    let err = full.await.unwrap().expect_err("over quota");
    assert!(
        matches!(ServiceError::from(err), ServiceError::OverQuota { .. }),
        "the full account's delivery fails alone"
    );
    let mut dup_results: Vec<DeliverResponse> = Vec::new();
    for t in dups {
        dup_results.push(
            t.await
                .unwrap()
                .expect("both calls with one key are answered"),
        );
    }
    dup_results.sort_by_key(|r| r.duplicate);
    assert!(!dup_results[0].duplicate && dup_results[1].duplicate);
    assert_eq!(dup_results[0].results, dup_results[1].results);

    // The 13 queued calls went in ONE transaction: the blocker's, then theirs.
    assert_eq!(stats.batches() - before.0, 2);
    assert_eq!(stats.batched() - before.1, 14);
    assert_eq!(commits_of(&s.db.pool, "ok@example.test").await, vec![11]);
    let uids: Vec<i64> = entries_of(&s.db.pool, "ok@example.test")
        .await
        .into_iter()
        .map(|e| e.0)
        .collect();
    assert_eq!(uids, (1..=11).collect::<Vec<_>>());
    // Nothing of the failed one: still the one message, and its key is free for a retry.
    assert_eq!(entries_of(&s.db.pool, "full@example.test").await.len(), 1);
    let keys: Vec<String> = sqlx::query_scalar(
        "SELECT idempotency_key FROM mailbox.deliveries WHERE idempotency_key IN ('over', 'same-key')",
    )
    .fetch_all(&s.db.pool)
    .await
    .unwrap();
    assert_eq!(keys, vec!["same-key".to_string()]);
    s.shutdown.drain(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_concurrent_deliveries_into_one_account_in_one_batch() {
    let s = store_with(|c| c.limits.delivery_committers = 1).await;
    s.account("blocker@example.test").await;
    let alice = s.account("alice@example.test").await;
    let lock = hold_account(&s.db.pool, "blocker@example.test").await;
    let blocked = block_committer(&s).await;
    let stats = s.started.deliveries.clone();
    let before = stats.batches();
    let mut tasks = Vec::new();
    let mut sizes = 0i64;
    for i in 0..10 {
        let raw = message(&format!("m{i}"), &"z".repeat(100 + i));
        sizes += raw.len() as i64;
        let mut d = s.delivery().await;
        tasks.push(tokio::spawn(async move {
            deliver(&mut d, &format!("one-{i}"), &["alice@example.test"], &raw)
                .await
                .unwrap()
        }));
    }
    wait_queued(&s, 10).await;
    lock.commit().await.unwrap();
    blocked.await.unwrap();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(r.results[0].status, RecipientStatus::Delivered as i32);
    }
    assert_eq!(
        stats.batches() - before,
        2,
        "the blocker's batch, then the ten"
    );
    assert_eq!(commits_of(&s.db.pool, "alice@example.test").await, vec![10]);
    let e = entries_of(&s.db.pool, "alice@example.test").await;
    assert_eq!(
        e.iter().map(|x| x.0).collect::<Vec<_>>(),
        (1..=10).collect::<Vec<_>>()
    );
    // One modseq each, consecutive and rising with the UID.
    assert!(e.windows(2).all(|w| w[1].1 == w[0].1 + 1), "{e:?}");
    let (count, uidnext, highest): (i64, i64, i64) = sqlx::query_as(
        "SELECT message_count, uidnext, highestmodseq FROM mailbox.mailboxes
          WHERE account_id = $1 AND name = 'INBOX'",
    )
    .bind(alice)
    .fetch_one(&s.db.pool)
    .await
    .unwrap();
    assert_eq!((count, uidnext, highest), (10, 11, e[9].1));
    let (used_bytes, used_messages): (i64, i64) =
        sqlx::query_as("SELECT used_bytes, used_messages FROM mailbox.accounts WHERE id = $1")
            .bind(alice)
            .fetch_one(&s.db.pool)
            .await
            .unwrap();
    assert_eq!((used_bytes, used_messages), (sizes, 10));
    let log: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM mailbox.changelog c JOIN mailbox.mailboxes mb ON mb.id = c.mailbox_id
          WHERE mb.account_id = $1 AND c.kind = 1",
    )
    .bind(alice)
    .fetch_one(&s.db.pool)
    .await
    .unwrap();
    assert_eq!(log, 10);
    s.shutdown.drain(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_statement_failing_in_a_batch_fails_only_its_delivery() {
    // A flag with a NUL passes every check made in Rust, and PostgreSQL refuses it when the
    // batch inserts its entries: the batch is rolled back and stored one delivery at a time.
    let s = store_with(|c| c.limits.delivery_committers = 1).await;
    s.account("blocker@example.test").await;
    s.account("ok@example.test").await;
    let lock = hold_account(&s.db.pool, "blocker@example.test").await;
    let blocked = block_committer(&s).await;
    let stats = s.started.deliveries.clone();
    let before = (stats.batches(), stats.batched());
    let mut good = Vec::new();
    for i in 0..5 {
        let mut d = s.delivery().await;
        good.push(tokio::spawn(async move {
            deliver(
                &mut d,
                &format!("fine-{i}"),
                &["ok@example.test"],
                &message(&format!("fine{i}"), "fine"),
            )
            .await
        }));
    }
    let mut d = s.delivery().await;
    let bad = tokio::spawn(async move {
        let header = DeliverHeader {
            idempotency_key: "nul-flag".into(),
            return_path: "sender@remote.test".into(),
            recipients: vec!["ok@example.test".into()],
            flags: vec!["bad\0flag".into()],
            ..Default::default()
        };
        d.deliver(tokio_stream::iter(chunks(
            header,
            &message("nul", "refused"),
        )))
        .await
    });
    wait_queued(&s, 6).await;
    lock.rollback().await.unwrap();
    blocked.await.unwrap();
    for g in good {
        let r = g
            .await
            .unwrap()
            .expect("the others of the batch are stored");
        assert_eq!(r.results[0].status, RecipientStatus::Delivered as i32);
    }
    bad.await.unwrap().expect_err("the NUL flag is refused");
    // The blocker's batch, then the six together (rolled back), then the five alone.
    assert_eq!(stats.batches() - before.0, 6);
    assert_eq!(stats.batched() - before.1, 6);
    let uids: Vec<i64> = entries_of(&s.db.pool, "ok@example.test")
        .await
        .into_iter()
        .map(|e| e.0)
        .collect();
    assert_eq!(uids, (1..=5).collect::<Vec<_>>());
    let key: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM mailbox.deliveries WHERE idempotency_key = 'nul-flag'",
    )
    .fetch_one(&s.db.pool)
    .await
    .unwrap();
    assert_eq!(key, 0, "the failed delivery's key stays free");
    s.shutdown.drain(Duration::from_secs(5)).await;
}
