//! End-to-end tests of ESEARCH (RFC 4731), SEARCHRES (RFC 5182), IMAP4rev2 (RFC 9051) and
//! LIST-EXTENDED / LIST-STATUS (RFC 5258 / 5819): the gateway over real sockets against a
//! real mailbox-store on a fresh PostgreSQL database.

mod common;

use common::*;

fn msg(subject: &str) -> Vec<u8> {
    format!(
        "From: Alice <alice@remote.test>\r\nTo: bob@example.test\r\nSubject: {subject}\r\n\
         Date: Mon, 7 Feb 1994 21:52:25 -0800\r\n\r\nbody of {subject}\r\n"
    )
    .into_bytes()
}

/// The untagged lines of a response block starting with `prefix`.
fn lines<'a>(r: &'a str, prefix: &str) -> Vec<&'a str> {
    r.split("\r\n").filter(|l| l.starts_with(prefix)).collect()
}

/// Sequence numbers of the `* n FETCH` lines.
fn fetched(r: &str) -> Vec<u32> {
    r.split("\r\n")
        .filter(|l| l.starts_with("* ") && l.contains(" FETCH "))
        .filter_map(|l| l.split(' ').nth(1)?.parse().ok())
        .collect()
}

async fn four_messages(env: &Env) -> Client {
    env.account("bob@example.test").await;
    for s in ["one", "two", "three", "four"] {
        env.deliver("bob@example.test", &msg(s)).await;
    }
    let mut c = env.login("bob@example.test").await;
    let r = c.cmd("SELECT INBOX").await;
    assert!(r.contains("* 4 EXISTS"), "{r}");
    let r = c.cmd("STORE 2,4 +FLAGS.SILENT (\\Flagged)").await;
    assert!(tagged(&r).contains("OK"), "{r}");
    c
}

#[tokio::test(flavor = "multi_thread")]
async fn esearch_return_options() {
    let env = env().await;
    let mut c = four_messages(&env).await;
    let caps = c.cmd("CAPABILITY").await;
    assert!(
        caps.contains(" ESEARCH") && caps.contains(" SEARCHRES"),
        "{caps}"
    );
    // (command, tag number, expected ESEARCH line without "* ESEARCH (TAG "tN")")
    let cases = [
        (
            "SEARCH RETURN (MIN MAX ALL COUNT) FLAGGED",
            " MIN 2 MAX 4 ALL 2,4 COUNT 2",
        ),
        ("UID SEARCH RETURN () ALL", " UID ALL 1:4"),
        ("SEARCH RETURN (ALL) UNFLAGGED", " ALL 1,3"),
        ("SEARCH RETURN (COUNT) SUBJECT nomatch", " COUNT 0"),
        // No MIN/MAX/ALL item for an empty result.
        ("SEARCH RETURN (MIN MAX ALL) SUBJECT nomatch", ""),
        ("UID SEARCH RETURN (max) NOT FLAGGED", " UID MAX 3"),
        ("SEARCH RETURN (COUNT) CHARSET UTF-8 TEXT three", " COUNT 1"),
    ];
    for (q, want) in cases {
        let tag = format!("t{}", 5 + cases.iter().position(|x| x.0 == q).unwrap());
        let r = c.cmd(q).await;
        assert!(tagged(&r).contains("OK"), "{q}: {r}");
        let es = lines(&r, "* ESEARCH");
        assert_eq!(
            es,
            vec![format!("* ESEARCH (TAG \"{tag}\"){want}")],
            "{q}: {r}"
        );
        assert!(lines(&r, "* SEARCH").is_empty(), "{q}: {r}");
    }
    // A rev1 SEARCH without RETURN still answers `* SEARCH`.
    let r = c.cmd("SEARCH FLAGGED").await;
    assert!(
        r.contains("* SEARCH 2 4\r\n") && !r.contains("ESEARCH"),
        "{r}"
    );
    // CONDSTORE: MODSEQ result item when the search used MODSEQ (RFC 7162 §3.1.5).
    let r = c.cmd("SEARCH RETURN (COUNT) MODSEQ 1").await;
    let es = lines(&r, "* ESEARCH");
    assert!(es.len() == 1 && es[0].contains(" COUNT 4 MODSEQ "), "{r}");
    let r = c.cmd("SEARCH RETURN (COUNT) ALL").await;
    assert!(!r.contains("MODSEQ"), "{r}");
    // MIN/MAX alone: MODSEQ of those messages, not of every match (RFC 4731 §3.2).
    let modseq_of = |r: &str| -> u64 {
        let i = r.find("MODSEQ (").unwrap_or_else(|| panic!("{r}")) + 8;
        r[i..].split(')').next().unwrap().parse().unwrap()
    };
    let m1 = modseq_of(&c.cmd("FETCH 1 (MODSEQ)").await);
    let m4 = modseq_of(&c.cmd("FETCH 4 (MODSEQ)").await);
    assert!(m1 < m4, "message 4 was flagged after 1 arrived: {m1} {m4}");
    let r = c.cmd("SEARCH RETURN (MIN) MODSEQ 1").await;
    assert!(r.contains(&format!(" MIN 1 MODSEQ {m1}\r\n")), "{r}");
    let r = c.cmd("SEARCH RETURN (MIN ALL) MODSEQ 1").await;
    assert!(
        r.contains(&format!(" MIN 1 ALL 1:4 MODSEQ {m4}\r\n")),
        "{r}"
    );
    // Bad RETURN syntax: BAD, the connection lives.
    for bad in [
        "SEARCH RETURN (BOGUS) ALL",
        "SEARCH RETURN MIN ALL",
        "SEARCH RETURN (MIN)",
        "UID SEARCH RETURN (MIN  MAX) ALL",
        "FETCH $$ FLAGS",
        "SEARCH RETURN (SAVE) FROBNICATE",
    ] {
        let r = c.cmd(bad).await;
        assert!(tagged(&r).contains(" BAD "), "{bad}: {r}");
    }
    let r = c.cmd("NOOP").await;
    assert!(tagged(&r).contains("OK"), "{r}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn searchres_saves_uids_for_dollar() {
    let env = env().await;
    let mut c = four_messages(&env).await;
    // SAVE alone: no ESEARCH response at all.
    let r = c.cmd("SEARCH RETURN (SAVE) FLAGGED").await;
    assert!(tagged(&r).contains("OK") && !r.contains("ESEARCH"), "{r}");
    let r = c.cmd("FETCH $ (FLAGS)").await;
    assert_eq!(fetched(&r), vec![2, 4], "{r}");
    let r = c.cmd("UID FETCH $ (FLAGS)").await;
    assert_eq!(fetched(&r), vec![2, 4], "{r}");
    let r = c.cmd("SEARCH $").await;
    assert!(r.contains("* SEARCH 2 4\r\n"), "{r}");
    let r = c.cmd("SEARCH RETURN (ALL) NOT $").await;
    assert!(r.contains(" ALL 1,3\r\n"), "{r}");
    let r = c.cmd("UID SEARCH RETURN (COUNT) UID $").await;
    assert!(r.contains(" UID COUNT 2\r\n"), "{r}");
    // SAVE with MIN only keeps the minimum (RFC 5182 §2.4), and reports it.
    let r = c.cmd("SEARCH RETURN (SAVE MIN) ALL").await;
    assert!(r.contains(" MIN 1\r\n"), "{r}");
    let r = c.cmd("UID STORE $ +FLAGS (\\Seen)").await;
    assert_eq!(fetched(&r), vec![1], "{r}");
    let r = c.cmd("SEARCH SEEN").await;
    assert!(r.contains("* SEARCH 1\r\n"), "{r}");
    let r = c.cmd("COPY $ Trash").await;
    assert!(tagged(&r).contains("OK"), "{r}");
    let r = c.cmd("STATUS Trash (MESSAGES)").await;
    assert!(r.contains("MESSAGES 1)"), "{r}");
    // The saved result is UIDs: after an expunge it still names the same messages.
    let r = c.cmd("SEARCH RETURN (SAVE) UID 3:4").await;
    assert!(tagged(&r).contains("OK"), "{r}");
    c.cmd("STORE 1 +FLAGS.SILENT (\\Deleted)").await;
    let r = c.cmd("EXPUNGE").await;
    assert!(r.contains("* 1 EXPUNGE"), "{r}");
    let r = c.cmd("UID FETCH $ (UID)").await;
    assert!(
        r.contains("* 2 FETCH (UID 3)") && r.contains("* 3 FETCH (UID 4)"),
        "{r}"
    );
    // MOVE $ moves exactly those.
    let r = c.cmd("MOVE $ Junk").await;
    assert!(tagged(&r).contains("OK"), "{r}");
    let r = c.cmd("STATUS Junk (MESSAGES)").await;
    assert!(r.contains("MESSAGES 2)"), "{r}");
    let r = c.cmd("SEARCH ALL").await;
    assert!(r.contains("* SEARCH 1\r\n"), "{r}");
    // A failed SEARCH ... SAVE empties the saved result: `$` then names nothing.
    let r = c.cmd("SEARCH RETURN (SAVE) ALL").await;
    assert!(tagged(&r).contains("OK"), "{r}");
    let r = c.cmd("SEARCH RETURN (SAVE) CHARSET KOI8-R ALL").await;
    assert!(tagged(&r).contains("NO [BADCHARSET"), "{r}");
    let r = c.cmd("FETCH $ (FLAGS)").await;
    assert!(tagged(&r).contains("OK") && fetched(&r).is_empty(), "{r}");
    // SELECT resets it too.
    c.cmd("SEARCH RETURN (SAVE) ALL").await;
    let r = c.cmd("FETCH $ (FLAGS)").await;
    assert_eq!(fetched(&r), vec![1], "{r}");
    c.cmd("SELECT INBOX").await;
    let r = c.cmd("FETCH $ (FLAGS)").await;
    assert!(tagged(&r).contains("OK") && fetched(&r).is_empty(), "{r}");
    let r = c.cmd("UID EXPUNGE $").await;
    assert!(
        tagged(&r).contains("OK") && !r.contains("EXPUNGE\r\n* "),
        "{r}"
    );
    // `$` in a quoted string is a string.
    let r = c.cmd("SEARCH SUBJECT \"$\"").await;
    assert!(r.contains("* SEARCH\r\n"), "{r}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn imap4rev2_enable_switches_the_session_rules() {
    let env = env().await;
    env.account("bob@example.test").await;
    env.deliver("bob@example.test", &msg("one")).await;
    env.deliver("bob@example.test", &msg("two")).await;

    // A rev1 client first: unchanged behaviour.
    let mut old = env.login("bob@example.test").await;
    let caps = old.cmd("CAPABILITY").await;
    assert!(caps.contains("IMAP4REV1 IMAP4rev2 "), "{caps}");
    let r = old.cmd("EXAMINE INBOX").await;
    assert!(r.contains("* 2 RECENT") || r.contains("* 0 RECENT"), "{r}");
    assert!(!r.contains("* LIST"), "{r}");
    let r = old.cmd("SEARCH ALL").await;
    assert!(r.contains("* SEARCH 1 2\r\n"), "{r}");
    let r = old.cmd("STATUS INBOX (MESSAGES RECENT)").await;
    assert!(r.contains("RECENT"), "{r}");

    let mut c = env.login("bob@example.test").await;
    let r = c.cmd("ENABLE IMAP4rev2").await;
    assert!(r.contains("* ENABLED IMAP4rev2\r\n"), "{r}");
    let r = c.cmd("SELECT INBOX").await;
    assert!(r.contains("* 2 EXISTS\r\n"), "{r}");
    assert!(r.contains("* LIST () \"/\" INBOX\r\n"), "{r}");
    assert!(!r.contains("RECENT") && !r.contains("[UNSEEN"), "{r}");
    assert!(!r.contains("[CLOSED]"), "nothing was selected before: {r}");
    let r = c.cmd("FETCH 1:* (FLAGS)").await;
    assert!(!r.contains("\\Recent"), "{r}");
    // SEARCH answers with ESEARCH only.
    let r = c.cmd("SEARCH ALL").await;
    let es = lines(&r, "* ESEARCH (TAG \"t");
    assert!(es.len() == 1 && es[0].ends_with("\") ALL 1:2"), "{r}");
    assert!(!r.contains("* SEARCH"), "{r}");
    let r = c.cmd("UID SEARCH SUBJECT nomatch").await;
    let es = lines(&r, "* ESEARCH (TAG \"t");
    assert!(es.len() == 1 && es[0].ends_with("\") UID"), "{r}");
    let r = c.cmd("SEARCH RECENT").await;
    assert!(tagged(&r).contains(" BAD "), "{r}");
    // STATUS: DELETED and SIZE, no RECENT.
    c.cmd("STORE 1 +FLAGS.SILENT (\\Deleted)").await;
    let r = c.cmd("STATUS INBOX (MESSAGES DELETED SIZE RECENT)").await;
    let st = lines(&r, "* STATUS");
    assert!(
        st.len() == 1
            && st[0].contains("MESSAGES 2")
            && st[0].contains("DELETED 1")
            && st[0].contains("SIZE ")
            && !st[0].contains("RECENT"),
        "{r}"
    );
    // Replacing the selection says CLOSED first.
    let r = c.cmd("EXAMINE INBOX").await;
    assert!(r.starts_with("* OK [CLOSED]"), "{r}");
    // Mailbox names are UTF-8, not modified UTF-7.
    let r = c.cmd("CREATE \"Entwürfe/Ärger\"").await;
    assert!(tagged(&r).contains("OK"), "{r}");
    let r = c.cmd("LIST \"\" \"Entw*\"").await;
    assert!(r.contains("Entwürfe/Ärger\r\n"), "{r}");
    assert!(!r.contains("&A"), "{r}");
    // The rev1 session sees the same mailbox in modified UTF-7.
    let r = old.cmd("LIST \"\" \"Entw*\"").await;
    assert!(r.contains("Entw&APw-rfe/&AMQ-rger"), "{r}");
    // A name that only exists as a parent (its mailbox deleted, the child kept):
    // \NonExistent for rev2, \Noselect for rev1.
    c.cmd("CREATE \"p/q\"").await;
    let r = c.cmd("DELETE p").await;
    assert!(tagged(&r).contains("OK"), "{r}");
    let rev2 = c.cmd("LIST \"\" \"%\"").await;
    let rev1 = old.cmd("LIST \"\" \"%\"").await;
    assert!(
        rev2.contains("* LIST (\\NonExistent \\HasChildren) \"/\" p\r\n"),
        "{rev2}"
    );
    assert!(
        rev1.contains("* LIST (\\Noselect \\HasChildren) \"/\" p\r\n"),
        "{rev1}"
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn python_imaplib_esearch_and_rev2() {
    let env = env().await;
    env.account("bob@example.test").await;
    for s in ["one", "two", "three"] {
        env.deliver("bob@example.test", &msg(s)).await;
    }
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/imaplib_ext.py");
    let out = tokio::process::Command::new("python3")
        .args([
            script.to_string(),
            "127.0.0.1".into(),
            env.imaps().port().to_string(),
            env.certs.ca_pem.display().to_string(),
            "bob@example.test".into(),
            PASSWORD.into(),
        ])
        .output()
        .await
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    assert!(
        stdout.contains("imaplib ext: all checks passed"),
        "{stdout}"
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn list_extended_selection_return_options_and_status() {
    let env = env().await;
    env.account("bob@example.test").await;
    env.deliver("bob@example.test", &msg("one")).await;
    env.deliver("bob@example.test", &msg("two")).await;
    let mut c = env.login("bob@example.test").await;
    let caps = c.cmd("CAPABILITY").await;
    assert!(
        caps.contains(" LIST-EXTENDED") && caps.contains(" LIST-STATUS"),
        "{caps}"
    );
    for m in ["Fruit/Apple", "Fruit/Banana", "Veg"] {
        let r = c.cmd(&format!("CREATE {m}")).await;
        assert!(tagged(&r).contains("OK"), "{r}");
    }
    for m in ["Fruit", "Fruit/Apple", "Veg"] {
        c.cmd(&format!("UNSUBSCRIBE {m}")).await;
    }
    let r = c.cmd("SUBSCRIBE Fruit/Banana").await;
    assert!(tagged(&r).contains("OK"), "{r}");

    // SUBSCRIBED selection: only subscribed names, marked \Subscribed.
    let r = c.cmd("LIST (SUBSCRIBED) \"\" \"Fruit*\"").await;
    assert_eq!(
        lines(&r, "* LIST"),
        vec!["* LIST (\\Subscribed \\HasNoChildren) \"/\" Fruit/Banana"],
        "{r}"
    );
    // RECURSIVEMATCH: the unsubscribed parent with CHILDINFO.
    let r = c.cmd("LIST (SUBSCRIBED RECURSIVEMATCH) \"\" \"%\"").await;
    let l = lines(&r, "* LIST");
    assert!(
        l.contains(&"* LIST (\\HasChildren) \"/\" Fruit (\"CHILDINFO\" (\"SUBSCRIBED\"))"),
        "{r}"
    );
    assert!(!l.iter().any(|x| x.ends_with(" Veg")), "{r}");
    assert!(tagged(&r).contains("OK"), "{r}");

    // Several patterns (one a literal), STATUS right after each LIST line.
    c.send(
        b"s1 LIST \"\" (\"INBOX\" {4+}\r\nFru%) RETURN (STATUS (MESSAGES UNSEEN) SUBSCRIBED)\r\n",
    )
    .await;
    let r = String::from_utf8(c.until_tag("s1").await).unwrap();
    let all: Vec<&str> = r.split("\r\n").collect();
    let inbox = all
        .iter()
        .position(|x| x.starts_with("* LIST") && x.ends_with(" INBOX"))
        .unwrap_or_else(|| panic!("{r}"));
    assert_eq!(
        all[inbox + 1],
        "* STATUS INBOX (MESSAGES 2 UNSEEN 2)",
        "{r}"
    );
    let fruit = all
        .iter()
        .position(|x| x.starts_with("* LIST") && x.ends_with(" Fruit"))
        .unwrap_or_else(|| panic!("{r}"));
    assert_eq!(
        all[fruit + 1],
        "* STATUS Fruit (MESSAGES 0 UNSEEN 0)",
        "{r}"
    );
    assert_eq!(lines(&r, "* LIST").len(), 2, "{r}");
    assert!(tagged(&r).starts_with("s1 OK"), "{r}");

    // SPECIAL-USE selection (RFC 6154): only special-use mailboxes.
    let r = c.cmd("LIST (SPECIAL-USE) \"\" \"*\"").await;
    let l = lines(&r, "* LIST");
    assert!(
        l.iter()
            .any(|x| x.contains("\\Sent") && x.ends_with(" Sent")),
        "{r}"
    );
    assert!(
        !l.iter()
            .any(|x| x.ends_with(" INBOX") || x.ends_with(" Veg")),
        "{r}"
    );
    let r = c.cmd("LIST \"\" \"S*\" RETURN (SPECIAL-USE)").await;
    assert!(
        lines(&r, "* LIST").iter().any(|x| x.contains("\\Sent")),
        "{r}"
    );

    // A parent without its mailbox: \NonExistent and no STATUS for it.
    c.cmd("CREATE x/y").await;
    let r = c.cmd("DELETE x").await;
    assert!(tagged(&r).contains("OK"), "{r}");
    let r = c.cmd("LIST \"\" \"%\" RETURN (STATUS (MESSAGES))").await;
    let all: Vec<&str> = r.split("\r\n").collect();
    let x = all
        .iter()
        .position(|l| *l == "* LIST (\\NonExistent \\HasChildren) \"/\" x")
        .unwrap_or_else(|| panic!("{r}"));
    assert!(!all[x + 1].starts_with("* STATUS"), "{r}");
    assert!(r.contains("* STATUS Veg (MESSAGES 0)"), "{r}");
    // Bad extended syntax: BAD, and the connection lives.
    for bad in [
        "LIST (BOGUS) \"\" *",
        "LIST (RECURSIVEMATCH) \"\" *",
        "LIST \"\" * RETURN (STATUS ())",
        "LIST \"\" * RETURN (NOPE)",
        "LIST \"\" () RETURN (CHILDREN)",
        "LIST \"\" * RETURN",
    ] {
        let r = c.cmd(bad).await;
        assert!(tagged(&r).contains(" BAD "), "{bad}: {r}");
    }
    let r = c.cmd("LIST \"\" INBOX").await;
    assert!(
        r.contains("* LIST (\\HasNoChildren) \"/\" INBOX\r\n"),
        "{r}"
    );

    // UTF-8 patterns once IMAP4rev2 is enabled.
    c.cmd("ENABLE IMAP4rev2").await;
    c.cmd("CREATE \"Straße\"").await;
    let r = c
        .cmd("LIST \"\" (\"Stra*\") RETURN (STATUS (MESSAGES))")
        .await;
    assert!(
        r.contains("Straße\r\n* STATUS ") && r.contains("(MESSAGES 0)"),
        "{r}"
    );
    env.stop().await;
}

/// Runs each command and asserts its exact untagged `prefix` lines and a tagged OK.
async fn expect_lines(c: &mut Client, prefix: &str, cases: &[(&str, &[&str])]) {
    for (cmd, want) in cases {
        let r = c.cmd(cmd).await;
        assert!(tagged(&r).contains(" OK "), "{cmd}: {r}");
        assert_eq!(lines(&r, prefix), *want, "{cmd}: {r}");
    }
}

/// RFC 9051 §6.3.4/§6.3.5/§6.3.6: CREATE subscribes nothing (not the implied parents
/// either); DELETE and RENAME leave subscriptions alone, so a deleted subscribed name is
/// `\Subscribed \NonExistent` to LIST (SUBSCRIBED) and `\Noselect` to LSUB.
#[tokio::test(flavor = "multi_thread")]
async fn subscriptions_survive_delete_and_rename_and_create_adds_none() {
    let env = env().await;
    env.account("bob@example.test").await;
    let mut c = env.login("bob@example.test").await;
    for m in ["probe/a/b", "probe/c"] {
        let r = c.cmd(&format!("CREATE {m}")).await;
        assert!(tagged(&r).contains("OK"), "{r}");
    }
    expect_lines(
        &mut c,
        "* LSUB",
        &[
            ("LSUB \"\" probe*", &[]),
            // The account's default folders are subscribed when the store creates them.
            (
                "LSUB \"\" *",
                &[
                    "* LSUB () \"/\" INBOX",
                    "* LSUB () \"/\" Archive",
                    "* LSUB () \"/\" Drafts",
                    "* LSUB () \"/\" Junk",
                    "* LSUB () \"/\" Sent",
                    "* LSUB () \"/\" Trash",
                ],
            ),
        ],
    )
    .await;
    expect_lines(&mut c, "* LIST", &[("LIST (SUBSCRIBED) \"\" probe*", &[])]).await;

    for cmd in [
        "SUBSCRIBE probe/c",
        "SUBSCRIBE probe/a",
        "DELETE probe/c",
        "RENAME probe/a probe/z",
    ] {
        let r = c.cmd(cmd).await;
        assert!(tagged(&r).contains("OK"), "{cmd}: {r}");
    }
    expect_lines(
        &mut c,
        "* LSUB",
        &[(
            "LSUB \"\" probe*",
            &[
                "* LSUB (\\Noselect) \"/\" probe/a",
                "* LSUB (\\Noselect) \"/\" probe/c",
            ],
        )],
    )
    .await;
    expect_lines(
        &mut c,
        "* LIST",
        &[
            (
                "LIST (SUBSCRIBED) \"\" probe*",
                &[
                    "* LIST (\\Subscribed \\NonExistent) \"/\" probe/a",
                    "* LIST (\\Subscribed \\NonExistent) \"/\" probe/c",
                ],
            ),
            (
                "LIST \"\" probe/% RETURN (SUBSCRIBED)",
                &["* LIST (\\HasChildren) \"/\" probe/z"],
            ),
        ],
    )
    .await;

    let r = c.cmd("UNSUBSCRIBE probe/c").await;
    assert!(
        tagged(&r).contains("OK"),
        "a deleted name can be unsubscribed: {r}"
    );
    let r = c.cmd("UNSUBSCRIBE probe/c").await;
    assert!(tagged(&r).contains("NO [NONEXISTENT]"), "{r}");
    expect_lines(
        &mut c,
        "* LSUB",
        &[("LSUB \"\" probe*", &["* LSUB (\\Noselect) \"/\" probe/a"])],
    )
    .await;
    env.stop().await;
}

/// imaptest's `subscribe` script: with `%`, an unsubscribed parent of a subscribed name the
/// pattern does not reach is `\Noselect` (RFC 3501 §6.3.9); with `*` it is not listed.
#[tokio::test(flavor = "multi_thread")]
async fn lsub_percent_gives_unsubscribed_parents_as_noselect() {
    let env = env().await;
    env.account("bob@example.test").await;
    let mut c = env.login("bob@example.test").await;
    for cmd in [
        "CREATE imaptest/test",
        "CREATE imaptest/test2/test",
        "CREATE imaptest/test3/test3",
        "SUBSCRIBE imaptest/test",
        "SUBSCRIBE imaptest/test2/test",
        "SUBSCRIBE imaptest/test3/test3",
    ] {
        let r = c.cmd(cmd).await;
        assert!(tagged(&r).contains("OK"), "{cmd}: {r}");
    }
    expect_lines(
        &mut c,
        "* LSUB",
        &[
            (
                "LSUB \"\" imaptest/%",
                &[
                    "* LSUB () \"/\" imaptest/test",
                    "* LSUB (\\Noselect) \"/\" imaptest/test2",
                    "* LSUB (\\Noselect) \"/\" imaptest/test3",
                ],
            ),
            (
                "LSUB \"\" *test",
                &[
                    "* LSUB () \"/\" imaptest/test",
                    "* LSUB () \"/\" imaptest/test2/test",
                ],
            ),
        ],
    )
    .await;
    for cmd in [
        "UNSUBSCRIBE imaptest/test",
        "UNSUBSCRIBE imaptest/test2/test",
    ] {
        let r = c.cmd(cmd).await;
        assert!(tagged(&r).contains("OK"), "{cmd}: {r}");
    }
    expect_lines(
        &mut c,
        "* LSUB",
        &[
            (
                "LSUB \"\" imaptest/%",
                &["* LSUB (\\Noselect) \"/\" imaptest/test3"],
            ),
            (
                "LSUB \"\" imaptest/*",
                &["* LSUB () \"/\" imaptest/test3/test3"],
            ),
        ],
    )
    .await;
    let r = c.cmd("UNSUBSCRIBE imaptest/test3/test3").await;
    assert!(tagged(&r).contains("OK"), "{r}");
    expect_lines(&mut c, "* LSUB", &[("LSUB \"\" imaptest/%", &[])]).await;
    env.stop().await;
}

/// imaptest's `listext` script (RFC 5258): the SUBSCRIBED selection, RETURN (SUBSCRIBED)
/// and RECURSIVEMATCH's CHILDINFO, with subscriptions independent of CREATE and DELETE.
#[tokio::test(flavor = "multi_thread")]
async fn list_extended_subscribed_as_imaptest_listext_expects() {
    let env = env().await;
    env.account("bob@example.test").await;
    let mut c = env.login("bob@example.test").await;
    for m in [
        "test1",
        "test2/test1",
        "test3",
        "test4/test5",
        "test4/test52",
        "test6",
        "test7/test7",
        "test8/test8",
        "test8/test9",
    ] {
        let r = c.cmd(&format!("CREATE imaptest/{m}")).await;
        assert!(tagged(&r).contains("OK"), "{r}");
    }
    for m in [
        "test1",
        "test2/test1",
        "test6",
        "test7/test7",
        "test8/test8",
        "test8/test9",
    ] {
        let r = c.cmd(&format!("SUBSCRIBE imaptest/{m}")).await;
        assert!(tagged(&r).contains("OK"), "{r}");
    }
    let r = c.cmd("DELETE imaptest/test6").await;
    assert!(tagged(&r).contains("OK"), "{r}");
    let childinfo = " (\"CHILDINFO\" (\"SUBSCRIBED\"))";
    let test2 = format!("* LIST (\\HasChildren) \"/\" imaptest/test2{childinfo}");
    let test8 = format!("* LIST (\\HasChildren) \"/\" imaptest/test8{childinfo}");
    expect_lines(
        &mut c,
        "* LIST",
        &[
            (
                "LIST (SUBSCRIBED) \"\" imaptest/*",
                &[
                    "* LIST (\\Subscribed \\HasNoChildren) \"/\" imaptest/test1",
                    "* LIST (\\Subscribed \\HasNoChildren) \"/\" imaptest/test2/test1",
                    "* LIST (\\Subscribed \\NonExistent) \"/\" imaptest/test6",
                    "* LIST (\\Subscribed \\HasNoChildren) \"/\" imaptest/test7/test7",
                    "* LIST (\\Subscribed \\HasNoChildren) \"/\" imaptest/test8/test8",
                    "* LIST (\\Subscribed \\HasNoChildren) \"/\" imaptest/test8/test9",
                ],
            ),
            (
                "LIST (SUBSCRIBED RECURSIVEMATCH) \"\" imaptest/test2% RETURN (CHILDREN)",
                &[test2.as_str()],
            ),
            (
                "LIST \"\" imaptest/% RETURN (CHILDREN SUBSCRIBED)",
                &[
                    "* LIST (\\Subscribed \\HasNoChildren) \"/\" imaptest/test1",
                    "* LIST (\\HasChildren) \"/\" imaptest/test2",
                    "* LIST (\\HasNoChildren) \"/\" imaptest/test3",
                    "* LIST (\\HasChildren) \"/\" imaptest/test4",
                    "* LIST (\\HasChildren) \"/\" imaptest/test7",
                    "* LIST (\\HasChildren) \"/\" imaptest/test8",
                ],
            ),
            // The subscribed child matches too, so the parent is not listed for it.
            (
                "LIST (SUBSCRIBED RECURSIVEMATCH) \"\" imaptest*test7",
                &["* LIST (\\Subscribed \\HasNoChildren) \"/\" imaptest/test7/test7"],
            ),
            (
                "LIST (SUBSCRIBED RECURSIVEMATCH) \"\" imaptest*test8",
                &[
                    test8.as_str(),
                    "* LIST (\\Subscribed \\HasNoChildren) \"/\" imaptest/test8/test8",
                ],
            ),
            (
                "LIST (SUBSCRIBED RECURSIVEMATCH) \"\" (imaptest/test2)",
                &[test2.as_str()],
            ),
            (
                "LIST (SUBSCRIBED RECURSIVEMATCH) \"\" (imaptest/test2 imaptest/test2/test1)",
                &["* LIST (\\Subscribed \\HasNoChildren) \"/\" imaptest/test2/test1"],
            ),
        ],
    )
    .await;
    env.stop().await;
}
