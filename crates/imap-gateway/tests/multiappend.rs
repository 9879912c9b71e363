//! MULTIAPPEND (RFC 3502, issue 14): several messages in one APPEND, stored all or none in
//! one store transaction, over real sockets against a real mailbox-store on a fresh
//! PostgreSQL database.

mod common;

use common::*;

fn msg(subject: &str, pad: usize) -> String {
    format!(
        "From: a@remote.test\r\nSubject: {subject}\r\n\r\n{}\r\n",
        "x".repeat(pad)
    )
}

/// The `[APPENDUID v uids]` of a tagged OK: (uidvalidity, uid set text).
fn appenduid(r: &str) -> (String, String) {
    let t = tagged(r);
    let code = t
        .split("[APPENDUID ")
        .nth(1)
        .and_then(|x| x.split(']').next())
        .unwrap_or_else(|| panic!("no APPENDUID: {r}"));
    let (v, uids) = code.split_once(' ').unwrap();
    (v.to_string(), uids.to_string())
}

async fn messages_in(c: &mut Client, mailbox: &str) -> u32 {
    let r = c.cmd(&format!("STATUS {mailbox} (MESSAGES)")).await;
    assert!(tagged(&r).contains(" OK"), "{r}");
    r.split("(MESSAGES ")
        .nth(1)
        .and_then(|x| x.split(')').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{r}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn multiappend_of_three_gives_consecutive_appenduids_and_all_are_fetchable() {
    let env = env().await;
    env.account("bob@example.test").await;
    let mut c = env.login("bob@example.test").await;
    let caps = c.cmd("CAPABILITY").await;
    assert!(caps.contains(" MULTIAPPEND"), "{caps}");
    // One message first, so the batch does not start at UID 1.
    let one = msg("zero", 1);
    let r = c
        .cmd(&format!("APPEND INBOX {{{}+}}\r\n{one}", one.len()))
        .await;
    assert!(tagged(&r).contains(" OK [APPENDUID "), "{r}");

    // Synchronizing literals: a continuation request for each, then one tagged reply.
    let (m1, m2, m3) = (msg("one", 10), msg("two", 20), msg("three", 30));
    c.send(format!("m1 APPEND INBOX (\\Seen) {{{}}}\r\n", m1.len()).as_bytes())
        .await;
    assert!(c.line().await.starts_with("+ "));
    c.send(
        format!(
            "{m1} (\\Flagged $Label) \"14-Jul-2021 02:44:25 +0200\" {{{}}}\r\n",
            m2.len()
        )
        .as_bytes(),
    )
    .await;
    assert!(c.line().await.starts_with("+ "));
    c.send(format!("{m2} {{{}}}\r\n", m3.len()).as_bytes())
        .await;
    assert!(c.line().await.starts_with("+ "));
    c.send(format!("{m3}\r\n").as_bytes()).await;
    let r = String::from_utf8(c.until_tag("m1").await).unwrap();
    assert!(tagged(&r).starts_with("m1 OK [APPENDUID "), "{r}");
    let (_, uids) = appenduid(&r);
    assert_eq!(uids, "2:4", "{r}");

    let r = c.cmd("SELECT INBOX").await;
    assert!(r.contains("* 4 EXISTS"), "{r}");
    let r = c
        .cmd("UID FETCH 2:4 (UID FLAGS INTERNALDATE BODY.PEEK[])")
        .await;
    assert!(tagged(&r).contains(" OK"), "{r}");
    for (i, (m, flags)) in [(&m1, "\\Seen"), (&m2, "\\Flagged $Label"), (&m3, "")]
        .iter()
        .enumerate()
    {
        let uid = i + 2;
        let item = r
            .split("* ")
            .find(|x| x.contains(&format!("UID {uid} ")))
            .unwrap_or_else(|| panic!("UID {uid}: {r}"));
        assert!(item.contains(m.as_str()), "UID {uid}: {item}");
        assert!(
            item.contains(&format!("FLAGS ({flags}")),
            "UID {uid}: {item}"
        );
    }
    assert!(
        r.contains("INTERNALDATE \"14-Jul-2021 02:44:25 +0200\""),
        "{r}"
    );

    // Non-synchronizing literals and a literal8 in the same command work alike.
    let r = c
        .cmd(&format!(
            "APPEND INBOX {{{}+}}\r\n{m1} ~{{{}+}}\r\n{m2}",
            m1.len(),
            m2.len()
        ))
        .await;
    let (_, uids) = appenduid(&r);
    assert_eq!(uids, "5:6", "{r}");
    assert_eq!(messages_in(&mut c, "INBOX").await, 6);
    env.stop().await;
}

/// A MULTIAPPEND whose last message is over `max_message_bytes` (announced synchronizing: refused
/// before its bytes; or non-synchronizing: read and refused), or whose messages together
/// are over `max_multiappend`, appends none of its messages.
#[tokio::test(flavor = "multi_thread")]
async fn multiappend_with_a_message_over_the_size_limit_appends_none() {
    let env = env_with(|c| {
        c.limits.max_message_bytes = 4096;
        c.limits.max_multiappend = 10_000;
    })
    .await;
    env.account("bob@example.test").await;
    let mut c = env.login("bob@example.test").await;
    let (a, b) = (msg("a", 100), msg("b", 100));
    // Within the limits, the same shape is appended.
    let ok = msg("c", 3000);
    let r = c
        .cmd(&format!(
            "APPEND INBOX {{{}+}}\r\n{a} {{{}+}}\r\n{b} {{{}+}}\r\n{ok}",
            a.len(),
            b.len(),
            ok.len()
        ))
        .await;
    assert!(tagged(&r).contains(" OK [APPENDUID "), "{r}");
    assert_eq!(messages_in(&mut c, "INBOX").await, 3);

    // Last literal synchronizing and too big: NO [TOOBIG] instead of a continuation.
    let big = msg("big", 5000);
    c.send(
        format!(
            "s1 APPEND INBOX {{{}+}}\r\n{a} {{{}+}}\r\n{b} {{{}}}\r\n",
            a.len(),
            b.len(),
            big.len()
        )
        .as_bytes(),
    )
    .await;
    let l = c.line().await;
    assert_eq!(l, "s1 NO [TOOBIG] Too large\r\n");
    assert_eq!(messages_in(&mut c, "INBOX").await, 3);

    // Last literal non-synchronizing and too big: read, then NO [TOOBIG].
    let r = c
        .cmd(&format!(
            "APPEND INBOX {{{}+}}\r\n{a} {{{}+}}\r\n{b} {{{}+}}\r\n{big}",
            a.len(),
            b.len(),
            big.len()
        ))
        .await;
    assert!(tagged(&r).contains(" NO [TOOBIG]"), "{r}");
    assert_eq!(messages_in(&mut c, "INBOX").await, 3);

    // Each message within max_message_bytes, all together over max_multiappend.
    let (x, y, z) = (msg("x", 3500), msg("y", 3500), msg("z", 3500));
    let r = c
        .cmd(&format!(
            "APPEND INBOX {{{}+}}\r\n{x} {{{}+}}\r\n{y} {{{}+}}\r\n{z}",
            x.len(),
            y.len(),
            z.len()
        ))
        .await;
    assert!(tagged(&r).contains(" NO [TOOBIG]"), "{r}");
    assert_eq!(messages_in(&mut c, "INBOX").await, 3);
    env.stop().await;
}

/// Quota is checked for all messages together in the one transaction: a MULTIAPPEND whose
/// last message does not fit appends none; one that fits is appended whole.
#[tokio::test(flavor = "multi_thread")]
async fn multiappend_over_quota_appends_none() {
    let env = env().await;
    let (a, b, c3) = (msg("a", 200), msg("b", 200), msg("c", 200));
    let quota = (a.len() + b.len() + c3.len()) as i64 + 100;
    env.account_with_quota("bob@example.test", quota, 0).await;
    let mut c = env.login("bob@example.test").await;
    let r = c
        .cmd(&format!(
            "APPEND INBOX {{{}+}}\r\n{a} {{{}+}}\r\n{b}",
            a.len(),
            b.len()
        ))
        .await;
    assert!(tagged(&r).contains(" OK [APPENDUID "), "{r}");
    assert_eq!(messages_in(&mut c, "INBOX").await, 2);
    // The first message would fit alone; the second not: neither is appended.
    let r = c
        .cmd(&format!(
            "APPEND INBOX {{{}+}}\r\n{c3} {{{}+}}\r\n{a}",
            c3.len(),
            a.len()
        ))
        .await;
    assert!(tagged(&r).contains(" NO [OVERQUOTA]"), "{r}");
    assert_eq!(messages_in(&mut c, "INBOX").await, 2);
    // Nothing of the refused batch counts against the quota: the first message alone fits.
    let r = c
        .cmd(&format!("APPEND INBOX {{{}+}}\r\n{c3}", c3.len()))
        .await;
    assert!(tagged(&r).contains(" OK [APPENDUID "), "{r}");
    assert_eq!(messages_in(&mut c, "INBOX").await, 3);
    // A message the store refuses (empty) anywhere in the list: none is appended. (Small
    // messages: they fit in what is left of the quota.)
    let t = "Subject: t\r\n\r\nx\r\n";
    let r = c
        .cmd(&format!("APPEND INBOX {{{}+}}\r\n{t} {{0+}}\r\n", t.len()))
        .await;
    assert!(tagged(&r).contains(" NO [CANNOT]"), "{r}");
    assert_eq!(messages_in(&mut c, "INBOX").await, 3);
    // No such mailbox: TRYCREATE, nothing appended anywhere.
    let r = c
        .cmd(&format!(
            "APPEND Nowhere {{{}+}}\r\n{t} {{{}+}}\r\n{t}",
            t.len(),
            t.len()
        ))
        .await;
    assert!(tagged(&r).contains(" NO [TRYCREATE]"), "{r}");
    // Bad options of a later message: BAD, nothing appended.
    let r = c
        .cmd(&format!(
            "APPEND INBOX {{{}+}}\r\n{t} (\\Seen \"x\" {{{}+}}\r\n{t}",
            t.len(),
            t.len()
        ))
        .await;
    assert!(tagged(&r).contains(" BAD "), "{r}");
    assert_eq!(messages_in(&mut c, "INBOX").await, 3);
    env.stop().await;
}

/// A session with the mailbox selected learns of all the messages before the tagged OK.
#[tokio::test(flavor = "multi_thread")]
async fn multiappend_to_the_selected_mailbox_reports_exists() {
    let env = env().await;
    env.account("bob@example.test").await;
    let mut c = env.login("bob@example.test").await;
    c.cmd("SELECT INBOX").await;
    let (a, b) = (msg("a", 1), msg("b", 2));
    let r = c
        .cmd(&format!(
            "APPEND INBOX {{{}+}}\r\n{a} {{{}+}}\r\n{b}",
            a.len(),
            b.len()
        ))
        .await;
    assert!(r.contains("* 2 EXISTS\r\n"), "{r}");
    assert!(tagged(&r).contains(" OK [APPENDUID "), "{r}");
    env.stop().await;
}
