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
