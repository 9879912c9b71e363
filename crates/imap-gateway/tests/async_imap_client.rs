//! An independent Rust IMAP client (async-imap, over imap-proto) against the gateway:
//! implicit TLS, synchronizing literals (APPEND), IDLE, and the usual mailbox operations.

mod common;

use std::time::Duration;

use common::*;
use futures::TryStreamExt;

const MSG: &[u8] = b"From: Alice <alice@remote.test>\r\nTo: bob@example.test\r\nSubject: async hello\r\n\r\nBody line.\r\n";

#[tokio::test(flavor = "multi_thread")]
async fn async_imap_session() {
    let env = env().await;
    env.account("bob@example.test").await;
    env.deliver("bob@example.test", MSG).await;

    let tcp = tokio::net::TcpStream::connect(env.imaps()).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(env.certs.client_config());
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    let mut client = async_imap::Client::new(tls);
    let greeting = client.read_response().await.unwrap();
    assert!(greeting.is_some());
    let mut session = client
        .login("bob@example.test", PASSWORD)
        .await
        .map_err(|(e, _)| e)
        .expect("login");

    let caps = session.capabilities().await.unwrap();
    for c in ["IDLE", "UIDPLUS", "MOVE", "SPECIAL-USE", "CONDSTORE"] {
        assert!(caps.has_str(c), "{c}");
    }
    let names: Vec<_> = session
        .list(Some(""), Some("*"))
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let list: Vec<String> = names.iter().map(|n| n.name().to_string()).collect();
    for want in ["INBOX", "Sent", "Drafts", "Trash"] {
        assert!(list.iter().any(|n| n == want), "{want} in {list:?}");
    }

    let mb = session.select("INBOX").await.unwrap();
    assert_eq!(mb.exists, 1);
    assert!(mb.uid_validity.is_some() && mb.uid_next == Some(2));

    let fetched: Vec<_> = session
        .fetch("1", "(RFC822 ENVELOPE FLAGS)")
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(fetched.len(), 1);
    assert_eq!(fetched[0].body(), Some(MSG));
    let env_subject = fetched[0].envelope().and_then(|e| e.subject.as_deref());
    assert_eq!(env_subject, Some(&b"async hello"[..]));
    assert!(
        fetched[0]
            .flags()
            .any(|f| f == async_imap::types::Flag::Seen),
        "RFC822 sets \\Seen"
    );

    // APPEND uses a synchronizing literal: the server must send a continuation request.
    session
        .append(
            "Drafts",
            Some("(\\Draft)"),
            None,
            b"Subject: draft\r\n\r\nx\r\n",
        )
        .await
        .expect("append");
    let st = session.status("Drafts", "(MESSAGES)").await.unwrap();
    assert_eq!(st.exists, 1);

    let found = session.search("SUBJECT async").await.unwrap();
    assert_eq!(found.into_iter().collect::<Vec<_>>(), vec![1]);

    // IDLE: a delivery arrives as new data.
    env.until_watched("bob@example.test").await;
    let mut idle = session.idle();
    idle.init().await.unwrap();
    let (wait, _stop) = idle.wait_with_timeout(Duration::from_secs(10));
    let deliver = env.deliver("bob@example.test", MSG);
    let (resp, ()) = tokio::join!(wait, deliver);
    match resp.unwrap() {
        async_imap::extensions::idle::IdleResponse::NewData(d) => {
            let s = format!("{:?}", d.parsed());
            assert!(s.contains("Exists(2)"), "{s}");
        }
        other => panic!("{other:?}"),
    }
    let mut session = idle.done().await.unwrap();

    session.uid_mv("2", "Trash").await.expect("uid move");
    let _: Vec<_> = session
        .store("1", "+FLAGS (\\Deleted)")
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let expunged: Vec<_> = session
        .expunge()
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    assert_eq!(expunged, vec![1]);
    let mb = session.examine("Trash").await.unwrap();
    assert_eq!(mb.exists, 1);
    session.logout().await.unwrap();
    env.stop().await;
}
