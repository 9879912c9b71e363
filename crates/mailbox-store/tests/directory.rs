//! Directory and Admin: address classes, expansion, sub-addressing, catch-all, moved and
//! disabled accounts, authentication, sender checks, DKIM key storage.

mod common;

use common::*;
use mailsuite_proto::*;

#[tokio::test(flavor = "multi_thread")]
async fn resolve_every_kind_of_address() {
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
        .add_domain(AddDomainRequest {
            name: "catch.test".into(),
            catch_all: "bob@example.test".into(),
        })
        .await
        .unwrap();
    s.account("alice@example.test").await;
    s.account("bob@example.test").await;
    s.account("carol@example.test").await;
    admin
        .add_alias(AddAliasRequest {
            address: "postmaster@example.test".into(),
            targets: vec!["alice@example.test".into()],
            kind: AliasKind::Alias as i32,
        })
        .await
        .unwrap();
    admin
        .add_alias(AddAliasRequest {
            address: "team@example.test".into(),
            targets: vec![
                "alice@example.test".into(),
                "postmaster@example.test".into(),
                "bob+lists@example.test".into(),
                "ext@remote.test".into(),
                "team@example.test".into(),
            ],
            kind: AliasKind::List as i32,
        })
        .await
        .unwrap();
    admin
        .update_account(UpdateAccountRequest {
            address: "carol@example.test".into(),
            display_name: None,
            enabled: None,
            moved_to: Some("carol@new.test".into()),
        })
        .await
        .unwrap();
    s.account("dan@example.test").await;
    admin
        .update_account(UpdateAccountRequest {
            address: "dan@example.test".into(),
            display_name: Some("Dan".into()),
            enabled: Some(false),
            moved_to: None,
        })
        .await
        .unwrap();

    let mut dir = s.directory().await;
    let mut resolve = async |a: &str| {
        dir.resolve(ResolveRequest { address: a.into() })
            .await
            .unwrap()
            .into_inner()
    };
    let r = resolve("Alice@EXAMPLE.test").await;
    assert_eq!(r.kind, AddressKind::Account as i32);
    assert_eq!(r.canonical, "alice@example.test");
    let r = resolve("alice+news@example.test").await;
    assert_eq!(r.kind, AddressKind::Account as i32);
    assert_eq!(r.canonical, "alice@example.test", "+detail is removed");
    assert_eq!(r.local_targets, vec!["alice@example.test".to_string()]);
    let r = resolve("postmaster@example.test").await;
    assert_eq!(r.kind, AddressKind::Alias as i32);
    assert_eq!(r.local_targets, vec!["alice@example.test".to_string()]);
    let r = resolve("team@example.test").await;
    assert_eq!(r.kind, AddressKind::List as i32);
    // Recursive, deduplicated, loop cut, +detail targets resolved, remote kept apart.
    assert_eq!(
        r.local_targets,
        vec![
            "alice@example.test".to_string(),
            "bob@example.test".to_string()
        ]
    );
    assert_eq!(r.remote_targets, vec!["ext@remote.test".to_string()]);
    let r = resolve("nobody@example.test").await;
    assert_eq!(r.kind, AddressKind::Unknown as i32);
    let r = resolve("someone@remote.test").await;
    assert_eq!(r.kind, AddressKind::Remote as i32);
    let r = resolve("anything@catch.test").await;
    assert_eq!(r.kind, AddressKind::Alias as i32);
    assert_eq!(r.local_targets, vec!["bob@example.test".to_string()]);
    let r = resolve("carol@example.test").await;
    assert_eq!(r.kind, AddressKind::Moved as i32);
    assert_eq!(r.moved_to, "carol@new.test");
    let r = resolve("dan@example.test").await;
    assert_eq!(r.kind, AddressKind::Disabled as i32);
    let err = dir
        .resolve(ResolveRequest {
            address: "no at sign".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    // Delivery follows the same resolution: one copy per account, remote targets reported.
    let mut d = s.delivery().await;
    let r = deliver(
        &mut d,
        "k",
        &[
            "team@example.test",
            "alice+x@example.test",
            "nobody@example.test",
            "dan@example.test",
        ],
        &message("hi", "x"),
    )
    .await
    .unwrap();
    assert_eq!(r.results[0].status, RecipientStatus::Delivered as i32);
    assert_eq!(
        r.results[0].delivered_to,
        vec![
            "alice@example.test".to_string(),
            "bob@example.test".to_string()
        ]
    );
    assert_eq!(
        r.results[0].remote_targets,
        vec!["ext@remote.test".to_string()]
    );
    assert_eq!(r.results[1].status, RecipientStatus::Delivered as i32);
    assert_eq!(r.results[2].status, RecipientStatus::Unknown as i32);
    assert_eq!(r.results[3].status, RecipientStatus::Disabled as i32);
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM mailbox.messages m JOIN mailbox.mailboxes b ON b.id = m.mailbox_id
          JOIN mailbox.accounts a ON a.id = b.account_id WHERE a.address = 'alice@example.test'",
    )
    .fetch_one(&s.db.pool)
    .await
    .unwrap();
    assert_eq!(
        n, 1,
        "alice is reached twice in one message but gets one copy"
    );

    let e = dir
        .expand(ExpandRequest {
            address: "team@example.test".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(e.kind, AddressKind::List as i32);
    let members: Vec<&str> = e.members.iter().map(|m| m.address.as_str()).collect();
    assert_eq!(
        members,
        vec!["alice@example.test", "bob@example.test", "ext@remote.test"]
    );
    let e = dir
        .expand(ExpandRequest {
            address: "dan@example.test".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(e.kind, AddressKind::Disabled as i32);
    assert!(e.members.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn authenticate_and_check_sender() {
    let s = store().await;
    let alice = s.account("alice@example.test").await;
    let mut admin = s.admin().await;
    admin
        .add_alias(AddAliasRequest {
            address: "sales@example.test".into(),
            targets: vec!["alice@example.test".into()],
            kind: AliasKind::Alias as i32,
        })
        .await
        .unwrap();
    admin
        .add_alias(AddAliasRequest {
            address: "all@example.test".into(),
            targets: vec!["alice@example.test".into()],
            kind: AliasKind::List as i32,
        })
        .await
        .unwrap();
    s.account("bob@example.test").await;
    let mut dir = s.directory().await;
    let auth = |u: &str, p: &str| AuthenticateRequest {
        username: u.into(),
        password: p.into(),
        remote_ip: "127.0.0.1".into(),
        protocol: "imap".into(),
    };
    let ok = dir
        .authenticate(auth("ALICE@example.test", "secret password"))
        .await
        .unwrap()
        .into_inner();
    assert!(ok.ok);
    assert_eq!(ok.account.unwrap().id, alice);
    let bad = dir
        .authenticate(auth("alice@example.test", "wrong"))
        .await
        .unwrap()
        .into_inner();
    assert!(!bad.ok && bad.account.is_none());
    let unknown = dir
        .authenticate(auth("ghost@example.test", "secret password"))
        .await
        .unwrap()
        .into_inner();
    assert!(!unknown.ok);
    admin
        .update_account(UpdateAccountRequest {
            address: "alice@example.test".into(),
            enabled: Some(false),
            ..Default::default()
        })
        .await
        .unwrap();
    let disabled = dir
        .authenticate(auth("alice@example.test", "secret password"))
        .await
        .unwrap()
        .into_inner();
    assert!(!disabled.ok, "a disabled account cannot log in");
    admin
        .update_account(UpdateAccountRequest {
            address: "alice@example.test".into(),
            enabled: Some(true),
            ..Default::default()
        })
        .await
        .unwrap();

    let mut check = async |a: &str| {
        dir.check_sender(CheckSenderRequest {
            account_id: alice,
            address: a.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .allowed
    };
    assert!(check("alice@example.test").await);
    assert!(check("Alice+tag@example.test").await);
    assert!(check("sales@example.test").await);
    assert!(
        !check("all@example.test").await,
        "list members do not send as the list"
    );
    assert!(!check("bob@example.test").await);
    assert!(!check("alice@remote.test").await);
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_rules_and_dkim_keys() {
    let s = store().await;
    let mut admin = s.admin().await;
    let err = admin
        .add_account(AddAccountRequest {
            address: "x@nothosted.test".into(),
            password: "p".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    s.account("alice@example.test").await;
    let err = admin
        .add_account(AddAccountRequest {
            address: "alice@example.test".into(),
            password: "p".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists);
    let err = admin
        .add_alias(AddAliasRequest {
            address: "alice@example.test".into(),
            targets: vec!["b@example.test".into()],
            kind: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists);
    let err = admin
        .add_account(AddAccountRequest {
            address: "a+b@example.test".into(),
            password: "p".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = admin
        .add_domain(AddDomainRequest {
            name: "bad domain".into(),
            catch_all: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = admin
        .add_account(AddAccountRequest {
            address: "e@example.test".into(),
            password: String::new(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    let key = DkimKey {
        domain: "Example.test".into(),
        selector: "s1".into(),
        algorithm: "ed25519-sha256".into(),
        private_key_pem: "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n".into(),
        dns_record: "v=DKIM1; k=ed25519; p=AAAA".into(),
    };
    let stored = admin
        .set_dkim_key(SetDkimKeyRequest {
            key: Some(key.clone()),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stored.domain, "example.test");
    assert!(stored.private_key_pem.is_empty());
    let l = admin
        .list_dkim_keys(ListDkimKeysRequest {
            domain: "example.test".into(),
            include_private: false,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(l.keys.len(), 1);
    assert!(l.keys[0].private_key_pem.is_empty());
    assert_eq!(l.keys[0].dns_record, key.dns_record);
    let l = admin
        .list_dkim_keys(ListDkimKeysRequest {
            domain: String::new(),
            include_private: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(l.keys[0].private_key_pem, key.private_key_pem);
    let err = admin
        .set_dkim_key(SetDkimKeyRequest {
            key: Some(DkimKey {
                algorithm: "md5".into(),
                ..key
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread")]
async fn unparseable_messages_are_stored_not_refused() {
    let s = store().await;
    let acc = s.account("alice@example.test").await;
    let mut d = s.delivery().await;
    let garbage: Vec<u8> = (0..5000u32).map(|i| (i * 7919 % 256) as u8).collect();
    let r = deliver(&mut d, "g", &["alice@example.test"], &garbage)
        .await
        .unwrap();
    assert_eq!(r.results[0].status, RecipientStatus::Delivered as i32);
    let inbox = s.inbox(acc).await;
    let mut mb = s.mailbox().await;
    assert_eq!(
        fetch_section(&mut mb, acc, inbox, 1, full()).await.unwrap(),
        garbage
    );
    let meta = fetch_meta(&mut mb, acc, inbox, UidSet::all()).await;
    assert!(meta[0].body_structure.is_some());
    // Empty and header-only messages too.
    deliver(
        &mut d,
        "h",
        &["alice@example.test"],
        b"Subject: only a header\r\n",
    )
    .await
    .unwrap();
    let err = deliver(&mut d, "e", &[], b"x").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

/// Fires `n` concurrent Authenticate calls for a valid login; returns (accepted, UNAVAILABLE).
async fn auth_flood(s: &Store, n: usize) -> (usize, usize) {
    let mut calls = Vec::new();
    for _ in 0..n {
        let mut dir = s.directory().await;
        calls.push(tokio::spawn(async move {
            dir.authenticate(AuthenticateRequest {
                username: "alice@example.test".into(),
                password: "secret password".into(),
                remote_ip: "127.0.0.1".into(),
                protocol: "imap".into(),
            })
            .await
        }));
    }
    let (mut ok, mut busy) = (0, 0);
    for c in calls {
        match c.await.expect("client task") {
            Ok(r) => {
                assert!(r.into_inner().ok, "a valid login is never answered 'wrong'");
                ok += 1;
            }
            Err(st) if st.code() == tonic::Code::Unavailable => busy += 1,
            Err(st) => panic!("unexpected status {st:?}"),
        }
    }
    (ok, busy)
}

#[tokio::test(flavor = "multi_thread")]
async fn password_checks_are_capped_under_an_auth_flood() {
    // One argon2 slot and no waiting: while one verification runs, the others must be
    // refused at once with UNAVAILABLE (a temporary failure), not queued on the blocking pool.
    let s = store_with(|c| {
        c.limits.max_concurrent_password_checks = 1;
        c.limits.password_check_wait_ms = 0;
    })
    .await;
    s.account("alice@example.test").await;
    let (ok, busy) = auth_flood(&s, 12).await;
    assert_eq!(ok + busy, 12);
    assert!(ok >= 1, "the check holding the slot succeeds");
    assert!(busy >= 1, "the flood is refused, not piled up (ok={ok})");

    // A generous cap and wait: every login of the same flood succeeds.
    let s = store_with(|c| {
        c.limits.max_concurrent_password_checks = 16;
        c.limits.password_check_wait_ms = 60_000;
    })
    .await;
    s.account("alice@example.test").await;
    assert_eq!(auth_flood(&s, 12).await, (12, 0));
}
