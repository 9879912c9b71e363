//! WITHIN (RFC 5032): SEARCH OLDER / YOUNGER over real sockets against a real mailbox-store,
//! on messages APPENDed with internal dates two days, two hours and no time ago.

mod common;

use common::*;

fn msg(subject: &str) -> String {
    format!("From: a@remote.test\r\nTo: bob@example.test\r\nSubject: {subject}\r\n\r\nbody\r\n")
}

/// An RFC 3501 date-time `secs` seconds before now.
fn ago(secs: i64) -> String {
    (chrono::Utc::now() - chrono::Duration::seconds(secs))
        .format("%d-%b-%Y %H:%M:%S +0000")
        .to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn older_and_younger_select_by_internal_date_age() {
    let env = env().await;
    env.account("bob@example.test").await;
    let mut c = env.login("bob@example.test").await;
    let caps = c.cmd("CAPABILITY").await;
    assert!(caps.contains(" WITHIN"), "{caps}");
    for (subject, date) in [
        ("two days", Some(ago(2 * 86400))),
        ("two hours", Some(ago(2 * 3600))),
        ("now", None),
    ] {
        let m = msg(subject);
        let date = date.map(|d| format!(" \"{d}\"")).unwrap_or_default();
        let r = c
            .cmd(&format!("APPEND INBOX{date} {{{}+}}\r\n{m}", m.len()))
            .await;
        assert!(tagged(&r).contains(" OK "), "{subject}: {r}");
    }
    let r = c.cmd("SELECT INBOX").await;
    assert!(r.contains("* 3 EXISTS"), "{r}");
    let table = [
        ("SEARCH OLDER 86400", "* SEARCH 1"),
        ("SEARCH OLDER 3600", "* SEARCH 1 2"),
        ("SEARCH YOUNGER 3600", "* SEARCH 3"),
        ("SEARCH YOUNGER 259200", "* SEARCH 1 2 3"),
        ("SEARCH OLDER 3600 YOUNGER 10800", "* SEARCH 2"),
        ("SEARCH NOT YOUNGER 10800", "* SEARCH 1"),
        ("SEARCH OR OLDER 86400 YOUNGER 60", "* SEARCH 1 3"),
        ("UID SEARCH OLDER 3600", "* SEARCH 1 2"),
    ];
    for (cmd, want) in table {
        let r = c.cmd(cmd).await;
        assert!(tagged(&r).contains(" OK "), "{cmd}: {r}");
        let got: Vec<&str> = r
            .split("\r\n")
            .filter(|l| l.starts_with("* SEARCH"))
            .collect();
        assert_eq!(got, [want], "{cmd}: {r}");
    }
    let r = c.cmd("SEARCH RETURN (COUNT) OLDER 3600").await;
    assert!(r.contains("COUNT 2"), "{r}");
    // The interval is a non-zero number (RFC 5032 nz-number).
    for bad in ["SEARCH OLDER 0", "SEARCH YOUNGER x"] {
        let r = c.cmd(bad).await;
        assert!(tagged(&r).contains(" BAD "), "{bad}: {r}");
    }
}
