//! Test helpers shared by every crate: a fresh PostgreSQL database per test, TLS
//! certificates signed by a throw-away CA, and (in `suite`) the whole system on port 0.

pub mod certs;
pub mod db;
pub mod process;
pub mod proxy;

pub use certs::TestCerts;
pub use db::TestDb;

/// Poll `check` until it returns `Some`, or panic after `timeout`. Tests wait for states
/// this way, never with a fixed sleep.
pub async fn eventually<T, F, Fut>(timeout: std::time::Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// GET `path` from an HTTP endpoint (a service's ops page): the whole response, status line,
/// headers and body. Panics if it cannot connect or the answer takes over 10 s.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), exchange)
        .await
        .unwrap_or_else(|_| panic!("no answer from http://{addr}{path} within 10 s"))
}

#[cfg(feature = "suite")]
pub mod suite;
#[cfg(feature = "suite")]
pub use suite::TestSuite;

/// Add `address`'s domain (if it is not there yet) and the account itself, through the store's
/// Admin API at `store_url` (`http://host:port`).
pub async fn add_account(store_url: &str, address: &str, password: &str) {
    use mailsuite_proto::admin_client::AdminClient;
    let channel = tonic::transport::Endpoint::from_shared(store_url.to_string())
        .expect("store url")
        .connect()
        .await
        .expect("connect to the store");
    let mut admin = AdminClient::new(channel);
    let domain = address.rsplit_once('@').expect("an address").1;
    let added = admin
        .add_domain(mailsuite_proto::AddDomainRequest {
            name: domain.into(),
            catch_all: String::new(),
        })
        .await;
    if let Err(s) = added {
        assert_eq!(
            s.code(),
            tonic::Code::AlreadyExists,
            "add domain {domain}: {s}"
        );
    }
    admin
        .add_account(mailsuite_proto::AddAccountRequest {
            address: address.into(),
            password: password.into(),
            ..Default::default()
        })
        .await
        .expect("add account");
}
