//! SORT, SORT=DISPLAY, ESORT (RFC 5256, 5957, 5267) and THREAD (RFC 5256) over real sockets
//! against a real mailbox-store on a fresh PostgreSQL database, on a small constructed
//! mailbox.

mod common;

use common::*;

/// bob's INBOX: five messages (sequence numbers = UIDs 1..5) with known subjects, dates,
/// senders, recipients, sizes and references.
async fn bob_with_mailbox() -> Env {
    let env = env().await;
    env.account("bob@example.test").await;
    let msgs: [&str; 5] = [
        // 1
        "From: Zoe <zoe@a.test>\r\nTo: carl@b.test\r\nSubject: banana\r\n\
         Date: Mon, 2 Jan 2023 10:00:00 +0000\r\nMessage-ID: <1@t>\r\n\r\nshort\r\n",
        // 2
        "From: adam@a.test\r\nTo: Bea <bea@b.test>\r\nSubject: Re: apple\r\n\
         Date: Mon, 2 Jan 2023 09:00:00 +0000\r\nMessage-ID: <2@t>\r\n\
         References: <0@t>\r\n\r\na somewhat longer body than the others, by far\r\n",
        // 3
        "From: =?UTF-8?Q?Mik=C3=A9?= <mike@a.test>\r\nTo: Al <zed@b.test>\r\n\
         Subject: [list] Fwd: banana\r\nDate: Mon, 2 Jan 2023 11:00:00 +0000\r\n\
         Message-ID: <3@t>\r\nIn-Reply-To: <1@t>\r\n\r\nmid\r\n",
        // 4
        "From: Bob <bob@a.test>\r\nTo: x@b.test\r\nSubject: cherry\r\n\
         Date: Mon, 2 Jan 2023 08:00:00 +0100\r\nMessage-ID: <4@t>\r\n\r\nmedium body, a little longer\r\n",
        // 5
        "From: carl@a.test\r\nTo: y@b.test\r\nSubject: apple\r\n\
         Date: Mon, 2 Jan 2023 12:00:00 +0000\r\nMessage-ID: <5@t>\r\n\
         References: <0@t>\r\n\r\nx\r\n",
    ];
    for m in msgs {
        env.deliver("bob@example.test", m.as_bytes()).await;
    }
    env
}

fn untagged<'a>(r: &'a str, prefix: &str) -> Vec<&'a str> {
    r.split("\r\n").filter(|l| l.starts_with(prefix)).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn sort_orders_by_each_key_and_is_advertised() {
    let env = bob_with_mailbox().await;
    let mut c = env.login("bob@example.test").await;
    let r = c.cmd("CAPABILITY").await;
    for cap in [
        " SORT ",
        " SORT=DISPLAY ",
        " ESORT ",
        " THREAD=ORDEREDSUBJECT ",
        " THREAD=REFERENCES",
    ] {
        assert!(r.contains(cap), "{cap}: {r}");
    }
    c.cmd("SELECT INBOX").await;
    let table = [
        ("SORT (SUBJECT) UTF-8 ALL", "* SORT 2 5 1 3 4"),
        ("SORT (REVERSE SUBJECT) UTF-8 ALL", "* SORT 4 1 3 2 5"),
        // 4 is 07:00 UTC: the zone counts.
        ("SORT (DATE) US-ASCII ALL", "* SORT 4 2 1 3 5"),
        ("SORT (SIZE) UTF-8 ALL", "* SORT 1 5 4 3 2"),
        ("SORT (FROM) UTF-8 ALL", "* SORT 2 4 5 3 1"),
        ("SORT (TO) UTF-8 ALL", "* SORT 2 1 4 5 3"),
        // Display names first (Miké decoded), else the address.
        ("SORT (DISPLAYFROM) UTF-8 ALL", "* SORT 2 4 5 3 1"),
        ("SORT (DISPLAYTO) UTF-8 ALL", "* SORT 3 2 1 4 5"),
        ("SORT (ARRIVAL) UTF-8 ALL", "* SORT 1 2 3 4 5"),
        ("SORT (SUBJECT DATE) UTF-8 2:5", "* SORT 2 5 3 4"),
        ("SORT (SUBJECT) UTF-8 SUBJECT nothing-matches", "* SORT"),
    ];
    for (cmd, want) in table {
        let r = c.cmd(cmd).await;
        assert!(tagged(&r).contains(" OK "), "{cmd}: {r}");
        assert_eq!(untagged(&r, "* SORT"), [want], "{cmd}: {r}");
    }
    let r = c.cmd("SORT (SUBJECT) ISO-2022-JP ALL").await;
    assert!(tagged(&r).contains(" NO [BADCHARSET"), "{r}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn uid_sort_reports_uids_after_an_expunge() {
    let env = bob_with_mailbox().await;
    let mut c = env.login("bob@example.test").await;
    c.cmd("SELECT INBOX").await;
    let r = c.cmd("STORE 2 +FLAGS (\\Deleted)").await;
    assert!(tagged(&r).contains(" OK "), "{r}");
    let r = c.cmd("EXPUNGE").await;
    assert!(tagged(&r).contains(" OK "), "{r}");
    let r = c.cmd("UID SORT (SUBJECT) UTF-8 ALL").await;
    assert_eq!(untagged(&r, "* SORT"), ["* SORT 5 1 3 4"], "{r}");
    // Sequence numbers moved down by one after message 2.
    let r = c.cmd("SORT (SUBJECT) UTF-8 ALL").await;
    assert_eq!(untagged(&r, "* SORT"), ["* SORT 4 1 2 3"], "{r}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn esort_returns_esearch_in_sort_order() {
    let env = bob_with_mailbox().await;
    let mut c = env.login("bob@example.test").await;
    c.cmd("SELECT INBOX").await;
    let r = c
        .cmd("SORT RETURN (MIN MAX COUNT ALL) (SUBJECT) UTF-8 ALL")
        .await;
    assert!(tagged(&r).contains(" OK "), "{r}");
    assert!(!r.contains("* SORT"), "{r}");
    let tag = tagged(&r).split(' ').next().unwrap().to_string();
    assert_eq!(
        untagged(&r, "* ESEARCH"),
        [format!(
            "* ESEARCH (TAG \"{tag}\") MIN 2 MAX 4 ALL 2,5,1,3:4 COUNT 5"
        )],
        "{r}"
    );
    let r = c.cmd("UID SORT RETURN (COUNT) (DATE) UTF-8 1:3").await;
    let tag = tagged(&r).split(' ').next().unwrap().to_string();
    assert_eq!(
        untagged(&r, "* ESEARCH"),
        [format!("* ESEARCH (TAG \"{tag}\") UID COUNT 3")],
        "{r}"
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn thread_orderedsubject_and_references() {
    let env = bob_with_mailbox().await;
    let mut c = env.login("bob@example.test").await;
    c.cmd("SELECT INBOX").await;
    let table = [
        // Groups by base subject ordered by their first date; children by date.
        ("THREAD ORDEREDSUBJECT UTF-8 ALL", "* THREAD (4)(2 5)(1 3)"),
        // 3 replies to 1; 2 and 5 share the missing parent <0@t> (a dummy).
        ("THREAD REFERENCES UTF-8 ALL", "* THREAD (4)((2)(5))(1 3)"),
        ("UID THREAD REFERENCES UTF-8 3:5", "* THREAD (4)(3)(5)"),
    ];
    for (cmd, want) in table {
        let r = c.cmd(cmd).await;
        assert!(tagged(&r).contains(" OK "), "{cmd}: {r}");
        assert_eq!(untagged(&r, "* THREAD"), [want], "{cmd}: {r}");
    }
    let r = c.cmd("THREAD NOSUCH UTF-8 ALL").await;
    assert!(tagged(&r).contains(" BAD "), "{r}");
    env.stop().await;
}
