//! L4 (security review 2026-12-02): one process-wide budget for the DATA/BDAT bytes held in
//! memory. Its own test binary: the in-flight gauge is per process, so no other test's
//! sessions may add to it.

mod common;

use common::budget::*;
use common::*;

const BUDGET: u64 = 100_000;

#[tokio::test(flavor = "multi_thread")]
async fn l4_body_budget_refuses_with_452_and_gives_the_bytes_back() {
    let e = env_with(|c| {
        c.policy.verify_inbound = false;
        c.limits.max_body_bytes_in_flight = BUDGET;
    })
    .await;
    assert_eq!(in_flight(), 0.0);

    // A holds 60 kB in the middle of DATA.
    let mut a = open_data(&e).await;
    a.send(&text("a", 60_000)).await;
    wait_for("A's body reserved", || in_flight() >= 59_000.0).await;
    let held_by_a = in_flight();

    // B's 60 kB do not fit next to it: 452 4.3.1, B's bytes are given back at once, and
    // B's session goes on.
    let mut b = open_data(&e).await;
    b.send(&format!("{}.\r\n", text("b", 60_000))).await;
    let (code, t) = b.reply().await;
    assert_eq!(code, 452, "{t}");
    assert!(t.starts_with("4.3.1"), "{t}");
    assert_eq!(in_flight(), held_by_a, "B holds nothing");
    b.expect("NOOP", 250).await;
    // A small message still fits in what is left.
    b.expect("MAIL FROM:<p@remote.example>", 250).await;
    b.expect("RCPT TO:<alice@local.test>", 250).await;
    b.expect("DATA", 354).await;
    b.send(&format!("{}.\r\n", text("b small", 2_000))).await;
    assert_eq!(b.reply().await.0, 250);

    // BDAT is held to the same budget.
    b.expect("MAIL FROM:<p@remote.example>", 250).await;
    b.expect("RCPT TO:<alice@local.test>", 250).await;
    let big = text("bdat", 120_000);
    b.send(&format!("BDAT {} LAST\r\n{big}", big.len())).await;
    let (code, t) = b.reply().await;
    assert_eq!(code, 452, "{t}");
    assert!(t.starts_with("4.3.1"), "{t}");
    b.expect("NOOP", 250).await;
    // A failed chunk ends the transaction (RFC 3030 §3); a chunk already pipelined after
    // it is read and discarded, and a new transaction can start.
    b.expect("MAIL FROM:<p@remote.example>", 250).await;
    b.expect("RCPT TO:<alice@local.test>", 250).await;
    b.send(&format!("BDAT {}\r\n{big}BDAT 5 LAST\r\nhello", big.len()))
        .await;
    assert_eq!(b.reply().await.0, 452);
    assert_eq!(b.reply().await.0, 503);
    b.expect("MAIL FROM:<p@remote.example>", 250).await;
    b.expect("RSET", 250).await;
    assert_eq!(in_flight(), held_by_a);

    // A finishes: accepted, and its bytes come back.
    a.send(".\r\n").await;
    let (code, t) = a.reply().await;
    assert_eq!(code, 250, "{t}");
    wait_for("A's bytes given back", || in_flight() == 0.0).await;

    // Now a 60 kB message fits again.
    let mut c = open_data(&e).await;
    c.send(&format!("{}.\r\n", text("c", 60_000))).await;
    assert_eq!(c.reply().await.0, 250);

    // A client that drops its connection in the middle of DATA gives its bytes back too.
    let mut d = open_data(&e).await;
    d.send(&text("d", 60_000)).await;
    wait_for("D's body reserved", || in_flight() >= 59_000.0).await;
    drop(d);
    wait_for("D's bytes given back", || in_flight() == 0.0).await;
    let mut f = open_data(&e).await;
    f.send(&format!("{}.\r\n", text("f", 60_000))).await;
    assert_eq!(f.reply().await.0, 250);

    let subjects: Vec<String> = e
        .inbox_text(e.alice_id)
        .await
        .iter()
        .filter_map(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("Subject: ").map(str::to_string))
        })
        .collect();
    assert_eq!(subjects, ["b small", "a", "c", "f"]);
    assert_eq!(in_flight(), 0.0);
    e.stop().await;
}
