//! Helpers of the body-budget tests (`l4_*`), each its own binary because the in-flight
//! gauge and the exhaustion counter are per process.

use std::time::Duration;

use super::{Env, Tcp, connect};

/// Bytes reserved by all transactions now (`mailsuite_smtp_body_bytes_in_flight`).
pub fn in_flight() -> f64 {
    mailsuite_runtime::metrics::value("mailsuite_smtp_body_bytes_in_flight", &[])
}

/// Transactions refused for the budget so far.
pub fn exhausted() -> f64 {
    mailsuite_runtime::metrics::value("mailsuite_smtp_body_budget_exhausted_total", &[])
}

/// Poll `ok` until it holds (20 s deadline).
pub async fn wait_for(what: &str, ok: impl Fn() -> bool) {
    let ok = &ok;
    mailsuite_testkit::eventually(Duration::from_secs(20), what, || async move {
        ok().then_some(())
    })
    .await;
}

/// `n` octets of message text: a header, then 80-octet lines.
pub fn text(subject: &str, n: usize) -> String {
    let mut s = format!("Subject: {subject}\r\n\r\n");
    while s.len() + 80 <= n {
        s.push_str(&"x".repeat(78));
        s.push_str("\r\n");
    }
    s
}

/// A port-25 transaction from 127.0.0.1, left at the start of its body.
pub async fn open_data(e: &Env) -> Tcp {
    let mut c = connect(e.smtp.smtp.unwrap()).await;
    c.expect("EHLO client.example", 250).await;
    c.expect("MAIL FROM:<p@remote.example>", 250).await;
    c.expect("RCPT TO:<alice@local.test>", 250).await;
    c.expect("DATA", 354).await;
    c
}
