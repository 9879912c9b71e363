//! Test helpers shared by every crate: a fresh PostgreSQL database per test, TLS
//! certificates signed by a throw-away CA, and (in `suite`) the whole system on port 0.

pub mod certs;
pub mod db;
pub mod process;

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

#[cfg(feature = "suite")]
pub mod suite;
#[cfg(feature = "suite")]
pub use suite::TestSuite;
