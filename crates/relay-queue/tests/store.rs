//! relay-queue with the real mailbox-store: DKIM keys come from Admin.ListDkimKeys, local
//! recipients land in their INBOX, and a bounce lands in the sender's INBOX as an RFC 3464
//! report.

mod common;

use std::time::Duration;

use base64::Engine as _;
use common::*;
use mailsuite_proto::admin_client::AdminClient;
use mailsuite_proto::mailbox_client::MailboxClient;
use mailsuite_proto::{
    AddAccountRequest, AddDomainRequest, DkimKey, FetchBodyRequest, Section, SelectRequest,
    SetDkimKeyRequest, UidSet,
};
use mailsuite_runtime::Shutdown;
use mailsuite_testkit::{TestDb, eventually};
use tonic::transport::Channel;

/// Every message in an account's INBOX, whole.
async fn inbox(mb: &mut MailboxClient<Channel>, account_id: i64) -> Vec<Vec<u8>> {
    let sel = mb
        .select(SelectRequest {
            account_id,
            name: "INBOX".into(),
            read_only: true,
        })
        .await
        .unwrap()
        .into_inner();
    if sel.uids.is_empty() {
        return vec![];
    }
    let mailbox_id = sel.mailbox.unwrap().id;
    let mut s = mb
        .fetch_body(FetchBodyRequest {
            account_id,
            mailbox_id,
            uids: Some(UidSet::from_uids(sel.uids.iter().copied())),
            sections: vec![Section::default()],
        })
        .await
        .unwrap()
        .into_inner();
    let mut out: Vec<Vec<u8>> = Vec::new();
    while let Some(c) = s.message().await.unwrap() {
        if c.first {
            out.push(Vec::new());
        }
        if let Some(last) = out.last_mut() {
            last.extend_from_slice(&c.data);
        }
    }
    out
}

/// The real mailbox-store on `db`, with the hosted domain and the accounts alice and dave:
/// its URL, a channel to it, and the two account ids.
async fn real_store(db: &TestDb, sd: &Shutdown) -> (String, Channel, Vec<i64>) {
    let store = mailsuite_mailbox_store::start(
        mailsuite_mailbox_store::Config {
            listen_grpc: "127.0.0.1:0".into(),
            listen_ops: String::new(),
            database_url: db.url.clone(),
            ..Default::default()
        },
        sd.clone(),
    )
    .await
    .unwrap();
    let store_url = format!("http://{}", store.grpc);
    let ch = Channel::from_shared(store_url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut admin = AdminClient::new(ch.clone());
    admin
        .add_domain(AddDomainRequest {
            name: HOSTED.into(),
            catch_all: String::new(),
        })
        .await
        .unwrap();
    let mut ids = Vec::new();
    for a in ["alice@local.test", "dave@local.test"] {
        let acc = admin
            .add_account(AddAccountRequest {
                address: a.into(),
                password: "a long enough password".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        ids.push(acc.id);
    }
    (store_url, ch, ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_real_store_keys_local_delivery_and_bounce_to_inbox() {
    let db = TestDb::new().await;
    let sd = Shutdown::new();
    let (store_url, ch, ids) = real_store(&db, &sd).await;
    let mut admin = AdminClient::new(ch.clone());
    let ed = mail_auth::common::crypto::Ed25519Key::generate_pkcs8().unwrap();
    let public = mail_auth::common::crypto::Ed25519Key::from_pkcs8_der(&ed)
        .unwrap()
        .public_key();
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let record = format!("v=DKIM1; k=ed25519; p={}", b64(&public));
    admin
        .set_dkim_key(SetDkimKeyRequest {
            key: Some(DkimKey {
                domain: HOSTED.into(),
                selector: "store".into(),
                algorithm: "ed25519-sha256".into(),
                private_key_pem: format!(
                    "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
                    b64(&ed)
                ),
                dns_record: record.clone(),
            }),
        })
        .await
        .unwrap();

    let sink = Sink::start(&["--reject", "bob@remote.test"]).await;
    let mut c = config(&db.url, &store_url);
    c.dkim_from_store = true;
    c.transports.insert("remote.test".into(), sink.route());
    let started = mailsuite_relay_queue::start(c, sd.clone()).await.unwrap();
    eventually(T, "DKIM key loaded from the store", || async {
        (!started.engine.keyring.specs().is_empty()).then_some(())
    })
    .await;

    let original = message(
        "alice@local.test",
        "carol@remote.test",
        "to everyone",
        "all@local.test",
    );
    enqueue(
        started.grpc.unwrap(),
        header(
            "all",
            "alice@local.test",
            &["bob@remote.test", "carol@remote.test", "dave@local.test"],
        ),
        &original,
    )
    .await;

    let got = sink.wait_for(1).await;
    assert_eq!(
        got[0].meta["rcpt_tos"],
        serde_json::json!(["carol@remote.test"])
    );
    let selector_arg = format!("store={record}");
    let out = run_py(
        "dkim_verify.py",
        &[got[0].path.to_str().unwrap(), HOSTED, selector_arg.as_str()],
    );
    assert!(out.contains("verified 1"), "{out}");

    let mb = MailboxClient::new(ch);
    let (alice_id, dave_id) = (ids[0], ids[1]);
    let dave = eventually(T, "message in dave's INBOX", || {
        let mut mb = mb.clone();
        async move {
            let m = inbox(&mut mb, dave_id).await;
            (!m.is_empty()).then_some(m)
        }
    })
    .await;
    assert_eq!(dave.len(), 1);
    assert!(
        dave[0].ends_with(&original),
        "the store only prepends trace headers"
    );

    let alice = eventually(T, "bounce in alice's INBOX", || {
        let mut mb = mb.clone();
        async move {
            let m = inbox(&mut mb, alice_id).await;
            (!m.is_empty()).then_some(m)
        }
    })
    .await;
    assert_eq!(alice.len(), 1, "one DSN, for bob only");
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), &alice[0]).unwrap();
    let out = run_py(
        "dsn_check.py",
        &[
            f.path().to_str().unwrap(),
            "bob@remote.test",
            "failed",
            "5.1.1",
            "to everyone",
        ],
    );
    assert!(out.contains("1 recipient block"), "{out}");
    let text = String::from_utf8_lossy(&alice[0]);
    assert!(
        text.contains("Return-Path: <>"),
        "delivered from the null sender: {text}"
    );
    sd.drain(Duration::from_secs(10)).await;
}

/// Review finding: the local-delivery idempotency key depended on how a claim grouped the
/// recipients. A lease that expires after Deliver committed (the state update was lost) lets
/// another worker re-claim a recipient in a different grouping; it must not be stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reclaim_in_a_different_grouping_does_not_deliver_twice() {
    let db = TestDb::new().await;
    let sd = Shutdown::new();
    let (store_url, ch, ids) = real_store(&db, &sd).await;
    let started = mailsuite_relay_queue::start(config(&db.url, &store_url), sd.clone())
        .await
        .unwrap();
    let original = message(
        "carol@remote.test",
        "alice@local.test",
        "regroup",
        "regroup@remote.test",
    );
    enqueue(
        started.grpc.unwrap(),
        header(
            "regroup",
            "carol@remote.test",
            &["alice@local.test", "dave@local.test"],
        ),
        &original,
    )
    .await;
    let attempts = |address: &'static str| {
        let pool = db.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM relay.attempts a
                   JOIN relay.recipients r ON r.id = a.recipient_id
                  WHERE r.address = $1 AND a.outcome = 'delivered'",
            )
            .bind(address)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    for a in ["alice@local.test", "dave@local.test"] {
        eventually(T, "first delivery recorded", || async {
            (attempts(a).await == 1).then_some(())
        })
        .await;
    }

    // Dave alone, as if his lease had run out before the worker recorded the delivery.
    sqlx::query(
        "UPDATE relay.recipients
            SET state = 'delivering', lease_until = now() - interval '1 second'
          WHERE address = 'dave@local.test'",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    eventually(T, "dave re-claimed and delivered again", || async {
        (attempts("dave@local.test").await == 2).then_some(())
    })
    .await;

    let mut mb = MailboxClient::new(ch);
    let dave = inbox(&mut mb, ids[1]).await;
    assert_eq!(dave.len(), 1, "the re-claim must not store a second copy");
    assert!(dave[0].ends_with(&original));
    assert_eq!(inbox(&mut mb, ids[0]).await.len(), 1);
    sd.drain(Duration::from_secs(10)).await;
}
