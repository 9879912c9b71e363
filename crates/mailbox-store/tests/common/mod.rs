//! Shared test helpers: a store on port 0 over a fresh database, gRPC clients, and small
//! wrappers for delivering and reading messages.
#![allow(dead_code)]

use std::net::SocketAddr;

use mailsuite_mailbox_store::{Config, Started, start};
use mailsuite_proto::admin_client::AdminClient;
use mailsuite_proto::delivery_client::DeliveryClient;
use mailsuite_proto::directory_client::DirectoryClient;
use mailsuite_proto::mailbox_client::MailboxClient;
use mailsuite_proto::*;
use mailsuite_runtime::Shutdown;
use mailsuite_testkit::TestDb;
use tonic::transport::Channel;

pub struct Store {
    pub db: TestDb,
    pub started: Started,
    pub shutdown: Shutdown,
}

pub fn config(url: &str) -> Config {
    Config {
        listen_grpc: "127.0.0.1:0".into(),
        listen_ops: String::new(),
        database_url: url.to_string(),
        db_max_connections: 40,
        ..Default::default()
    }
}

pub async fn store() -> Store {
    let db = TestDb::new().await;
    let shutdown = Shutdown::new();
    let started = start(config(&db.url), shutdown.clone())
        .await
        .expect("store starts");
    Store {
        db,
        started,
        shutdown,
    }
}

pub async fn channel(addr: SocketAddr) -> Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .expect("connect to store")
}

impl Store {
    pub async fn admin(&self) -> AdminClient<Channel> {
        AdminClient::new(channel(self.started.grpc).await)
    }
    pub async fn directory(&self) -> DirectoryClient<Channel> {
        DirectoryClient::new(channel(self.started.grpc).await)
    }
    pub async fn delivery(&self) -> DeliveryClient<Channel> {
        DeliveryClient::new(channel(self.started.grpc).await)
    }
    pub async fn mailbox(&self) -> MailboxClient<Channel> {
        MailboxClient::new(channel(self.started.grpc).await)
            .max_decoding_message_size(64 * 1024 * 1024)
    }

    /// Adds the domain (if needed) and an account; returns the account id.
    pub async fn account(&self, address: &str) -> i64 {
        let mut admin = self.admin().await;
        let domain = address.rsplit_once('@').unwrap().1;
        let _ = admin
            .add_domain(AddDomainRequest {
                name: domain.into(),
                catch_all: String::new(),
            })
            .await;
        admin
            .add_account(AddAccountRequest {
                address: address.into(),
                password: "secret password".into(),
                display_name: String::new(),
                quota_bytes: 0,
                quota_messages: 0,
            })
            .await
            .expect("add account")
            .into_inner()
            .id
    }

    pub async fn inbox(&self, account_id: i64) -> i64 {
        self.mailbox_id(account_id, "INBOX").await
    }

    pub async fn mailbox_id(&self, account_id: i64, name: &str) -> i64 {
        self.mailbox()
            .await
            .status(StatusRequest {
                account_id,
                name: name.into(),
            })
            .await
            .expect("status")
            .into_inner()
            .id
    }
}

pub fn chunks(header: DeliverHeader, data: &[u8]) -> Vec<DeliverChunk> {
    let mut v = vec![DeliverChunk {
        part: Some(deliver_chunk::Part::Header(header)),
    }];
    for c in data.chunks(64 * 1024) {
        v.push(DeliverChunk {
            part: Some(deliver_chunk::Part::Data(c.to_vec().into())),
        });
    }
    v
}

pub async fn deliver(
    client: &mut DeliveryClient<Channel>,
    key: &str,
    rcpts: &[&str],
    data: &[u8],
) -> Result<DeliverResponse, tonic::Status> {
    let header = DeliverHeader {
        idempotency_key: key.into(),
        return_path: "sender@remote.test".into(),
        recipients: rcpts.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    client
        .deliver(tokio_stream::iter(chunks(header, data)))
        .await
        .map(|r| r.into_inner())
}

pub async fn append(
    client: &mut MailboxClient<Channel>,
    account_id: i64,
    mailbox: &str,
    flags: &[&str],
    date: i64,
    data: &[u8],
) -> AppendResponse {
    let mut v = vec![AppendChunk {
        part: Some(append_chunk::Part::Header(AppendHeader {
            account_id,
            mailbox: mailbox.into(),
            flags: flags.iter().map(|s| s.to_string()).collect(),
            internal_date: date,
            internal_date_offset: 0,
            size: data.len() as u64,
        })),
    }];
    for c in data.chunks(64 * 1024) {
        v.push(AppendChunk {
            part: Some(append_chunk::Part::Data(c.to_vec().into())),
        });
    }
    client
        .append(tokio_stream::iter(v))
        .await
        .expect("append")
        .into_inner()
}

/// Fetch one section of one message, reassembled; None when missing.
pub async fn fetch_section(
    client: &mut MailboxClient<Channel>,
    account_id: i64,
    mailbox_id: i64,
    uid: u32,
    section: Section,
) -> Option<Vec<u8>> {
    let mut s = client
        .fetch_body(FetchBodyRequest {
            account_id,
            mailbox_id,
            uids: Some(UidSet::from_uids([uid])),
            sections: vec![section],
        })
        .await
        .expect("fetch body")
        .into_inner();
    let mut out = Vec::new();
    let mut total = None;
    while let Some(c) = s.message().await.expect("chunk") {
        assert_eq!(c.uid, uid);
        assert!(c.data.len() <= 64 * 1024, "chunks are at most 64 KiB");
        if c.missing {
            return None;
        }
        if c.first {
            total = Some(c.total);
        }
        out.extend_from_slice(&c.data);
    }
    assert_eq!(
        total,
        Some(out.len() as u64),
        "total announced in the first chunk"
    );
    Some(out)
}

pub fn full() -> Section {
    Section::default()
}

pub async fn fetch_meta(
    client: &mut MailboxClient<Channel>,
    account_id: i64,
    mailbox_id: i64,
    uids: UidSet,
) -> Vec<MessageMeta> {
    let mut s = client
        .fetch(FetchRequest {
            account_id,
            mailbox_id,
            uids: Some(uids),
            envelope: true,
            body_structure: true,
            changed_since: 0,
        })
        .await
        .expect("fetch")
        .into_inner();
    let mut v = Vec::new();
    while let Some(m) = s.message().await.expect("meta") {
        v.push(m);
    }
    v
}

pub fn message(subject: &str, body: &str) -> Vec<u8> {
    format!(
        "From: Sender <sender@remote.test>\r\nTo: rcpt@example.test\r\nSubject: {subject}\r\nDate: Fri, 27 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{subject}@remote.test>\r\n\r\n{body}\r\n"
    )
    .into_bytes()
}

/// A store started with `tune` applied to the default test configuration.
pub async fn store_with(tune: impl FnOnce(&mut Config)) -> Store {
    let db = TestDb::new().await;
    let shutdown = Shutdown::new();
    let mut cfg = config(&db.url);
    tune(&mut cfg);
    let started = start(cfg, shutdown.clone()).await.expect("store starts");
    Store {
        db,
        started,
        shutdown,
    }
}
