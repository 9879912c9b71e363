//! L7: the failed-login limit per address was check-then-act, so parallel connections from
//! one address each got a guess in before the first failure was recorded. Counted on the
//! store's own ops page (`Directory.Authenticate`); the metrics registry is per process, so
//! this file holds a single test.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread")]
async fn l7_parallel_logins_from_one_address_reach_the_store_at_most_limit_times() {
    const LIMIT: u32 = 3;
    const PARALLEL: usize = 24;
    let env = env_with(|c| {
        c.limits.max_auth_failures = 100;
        c.limits.max_auth_failures_per_ip = LIMIT;
        c.limits.auth_failure_delay_ms = 1;
    })
    .await;
    env.account("bob@example.test").await;
    let ops = env.store_ops;
    let before = service_calls(ops, "mailsuite.v1.Directory", "Authenticate").await;
    let mut clients = Vec::new();
    for _ in 0..PARALLEL {
        clients.push(env.tls().await);
    }
    // Every LOGIN is on the wire before any answer is read.
    for c in &mut clients {
        c.send(b"p1 LOGIN bob@example.test wrong\r\n").await;
    }
    let replies = futures::future::join_all(
        clients
            .iter_mut()
            .map(|c| async move { String::from_utf8(c.until_tag("p1").await).unwrap() }),
    )
    .await;
    let failed = replies
        .iter()
        .filter(|r| tagged(r).contains("NO [AUTHENTICATIONFAILED]"))
        .count();
    let refused = replies
        .iter()
        .filter(|r| tagged(r).contains("NO [UNAVAILABLE]"))
        .count();
    assert_eq!(failed + refused, PARALLEL, "{replies:?}");
    assert!(failed <= LIMIT as usize, "{failed} guesses got through");
    let calls = service_calls(ops, "mailsuite.v1.Directory", "Authenticate").await - before;
    assert!(
        calls <= LIMIT as u64,
        "{calls} Authenticate calls reached the store"
    );
    // The right password from that address is refused too, for now.
    let mut c = env.tls().await;
    let r = c
        .cmd(&format!("LOGIN bob@example.test \"{PASSWORD}\""))
        .await;
    assert!(tagged(&r).contains("NO [UNAVAILABLE]"), "{r}");
    env.stop().await;
}
