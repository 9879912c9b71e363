//! L4 (security review 2026-12-02), follow-up: `limits.max_body_bytes_in_flight` was one
//! shared pool, so one client trickling a few large bodies held all of it and starved every
//! other client, authenticated submission included. Its own test binary: the in-flight gauge
//! and the exhaustion counter are per process.

mod common;

use common::budget::*;
use common::*;
use tokio::io::BufReader;

const BUDGET: u64 = 100_000;
const PER_IP: u64 = 45_000;
const ALICE_PLAIN: &str = "AUTH PLAIN AGFsaWNlQGxvY2FsLnRlc3QAY29ycmVjdCBob3JzZQ==";

#[tokio::test(flavor = "multi_thread")]
async fn l4_body_budget_per_ip_share_keeps_submission_from_starving() {
    let e = env_with(|c| {
        c.policy.verify_inbound = false;
        c.limits.max_body_bytes_in_flight = BUDGET;
        c.limits.max_body_bytes_in_flight_per_ip = PER_IP;
    })
    .await;

    // One client (127.0.0.1) holds its whole share over two connections, mid-DATA.
    let mut a1 = open_data(&e).await;
    a1.send(&text("a1", 30_000)).await;
    let mut a2 = open_data(&e).await;
    a2.send(&text("a2", 10_000)).await;
    wait_for("the client's share reserved", || in_flight() >= 39_000.0).await;

    // A third connection of the same client trickles 30 kB more: over its share (the pool
    // has room), so nothing more is kept. Before the share existed it held them.
    let before = exhausted();
    let mut a3 = open_data(&e).await;
    a3.send(&text("a3", 30_000)).await;
    wait_for("a3 refused or held", || {
        exhausted() > before || in_flight() >= 69_000.0
    })
    .await;
    assert!(in_flight() < 41_000.0, "a3 holds nothing: {}", in_flight());

    // Another client (127.0.0.2), authenticated on 465, still gets a 35 kB message through (its own share).
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let tcp = sock.connect(e.smtp.submissions.unwrap()).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = e.tls_connector().connect(name, tcp).await.unwrap();
    let mut v = Client {
        io: BufReader::new(tls),
    };
    assert_eq!(v.reply().await.0, 220);
    v.expect("EHLO client.example", 250).await;
    v.expect(ALICE_PLAIN, 235).await;
    v.expect("MAIL FROM:<alice@local.test>", 250).await;
    v.expect("RCPT TO:<bob@local.test>", 250).await;
    v.expect("DATA", 354).await;
    v.send(&format!("{}.\r\n", text("submitted", 35_000))).await;
    let (code, t) = v.reply().await;
    assert_eq!(code, 250, "{t}");

    // The over-share transaction ends with 452 4.3.1 and its session goes on.
    a3.send(".\r\n").await;
    let (code, t) = a3.reply().await;
    assert_eq!(code, 452, "{t}");
    assert!(t.starts_with("4.3.1"), "{t}");
    a3.expect("NOOP", 250).await;

    // The client's own transactions are not harmed, and its share comes back with them.
    for c in [&mut a1, &mut a2] {
        c.send(".\r\n").await;
        assert_eq!(c.reply().await.0, 250);
    }
    wait_for("all bytes given back", || in_flight() == 0.0).await;
    a3.expect("MAIL FROM:<p@remote.example>", 250).await;
    a3.expect("RCPT TO:<alice@local.test>", 250).await;
    a3.expect("DATA", 354).await;
    a3.send(&format!("{}.\r\n", text("a3 again", 35_000))).await;
    assert_eq!(a3.reply().await.0, 250);

    assert_eq!(e.inbox(e.bob_id).await.len(), 1, "the submission arrived");
    assert_eq!(e.inbox(e.alice_id).await.len(), 3);
    e.stop().await;
}
