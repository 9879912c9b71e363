//! Regressions found by Dovecot's imaptest (issue 14), each named after its imaptest group:
//! the gateway over real sockets against a real mailbox-store on a fresh PostgreSQL database.

mod common;

use common::*;

/// A store with bob@example.test holding one message in INBOX.
async fn bob_with_one_message() -> Env {
    let env = env().await;
    env.account("bob@example.test").await;
    env.deliver(
        "bob@example.test",
        b"From: a@remote.test\r\nSubject: one\r\n\r\nbody\r\n",
    )
    .await;
    env
}

/// imaptest `atoms`: LIST with every atom character in the pattern is a valid command. The
/// `&` makes it invalid modified UTF-7, which used to be answered `BAD Bad pattern` (and then
/// imaptest hung up); it is matched as written, so nothing matches.
#[tokio::test(flavor = "multi_thread")]
async fn atoms_list_with_every_atom_char_is_ok() {
    let env = env().await;
    env.account("bob@example.test").await;
    let mut c = env.login("bob@example.test").await;
    for cmd in [
        "LIST \"\" !#$&'+,-.0123456789:;<=>?@^_`|[}%*",
        "LIST (SUBSCRIBED) \"\" !#$&'+,-.0123456789:;<=>?@^_`|[}%*",
    ] {
        let r = c.cmd(cmd).await;
        assert!(tagged(&r).contains(" OK"), "{cmd}: {r}");
        assert!(!r.contains("* LIST"), "{cmd}: {r}");
    }
    // A valid modified UTF-7 pattern still decodes.
    let r = c.cmd("CREATE Entw&APw-rfe").await;
    assert!(tagged(&r).contains(" OK"), "{r}");
    let r = c.cmd("LIST \"\" Entw&APw-*").await;
    assert!(r.contains("\"/\" Entw&APw-rfe\r\n"), "{r}");
    env.stop().await;
}

/// imaptest `esearch-condstore`: `FETCH 1 MODSEQ` is a CONDSTORE-enabling command; the first
/// one while a mailbox is selected gets `* OK [HIGHESTMODSEQ n]` (RFC 7162 §3.1), later ones
/// do not repeat it. The same holds for ENABLE CONDSTORE.
#[tokio::test(flavor = "multi_thread")]
async fn esearch_condstore_first_enabling_command_reports_highestmodseq() {
    let env = bob_with_one_message().await;
    let mut c = env.login("bob@example.test").await;
    let r = c.cmd("SELECT INBOX").await;
    assert!(!r.contains("HIGHESTMODSEQ"), "not enabled yet: {r}");
    let r = c.cmd("FETCH 1 MODSEQ").await;
    let hms: Vec<&str> = r
        .split("\r\n")
        .filter(|l| l.starts_with("* OK [HIGHESTMODSEQ "))
        .collect();
    assert_eq!(hms.len(), 1, "{r}");
    // The mailbox's highest modseq, the one the message has (its only change).
    let modseq = r
        .split("MODSEQ (")
        .nth(1)
        .and_then(|x| x.split(')').next())
        .unwrap();
    assert_eq!(
        hms[0],
        format!("* OK [HIGHESTMODSEQ {modseq}] Highest"),
        "{r}"
    );
    let r = c.cmd("FETCH 1 MODSEQ").await;
    assert!(!r.contains("[HIGHESTMODSEQ"), "only the first time: {r}");
    let r = c.cmd("ENABLE CONDSTORE").await;
    assert!(!r.contains("[HIGHESTMODSEQ"), "already enabled: {r}");

    // ENABLE CONDSTORE in a fresh session with a mailbox selected does it too.
    let mut d = env.login("bob@example.test").await;
    d.cmd("EXAMINE INBOX").await;
    let r = d.cmd("ENABLE CONDSTORE").await;
    assert!(r.contains(&format!("* OK [HIGHESTMODSEQ {modseq}]")), "{r}");
    env.stop().await;
}

/// imaptest `copy`: a session that has the mailbox selected learns of messages another
/// session copied in with `* N EXISTS` followed by `* N RECENT` (RFC 3501 §7.3.2); an
/// IMAP4rev2 session gets no RECENT (RFC 9051 dropped it).
#[tokio::test(flavor = "multi_thread")]
async fn copy_new_messages_are_announced_with_recent() {
    let env = env().await;
    env.account("bob@example.test").await;
    let mut a = env.login("bob@example.test").await;
    let r = a.cmd("CREATE Other").await;
    assert!(tagged(&r).contains(" OK"), "{r}");
    for i in 0..3 {
        let m = format!("From: a@remote.test\r\nSubject: {i}\r\n\r\nbody\r\n");
        let r = a
            .cmd(&format!("APPEND Other {{{}+}}\r\n{m}", m.len()))
            .await;
        assert!(tagged(&r).contains(" OK"), "{r}");
    }
    let mut b = env.login("bob@example.test").await;
    let r = b.cmd("SELECT INBOX").await;
    assert!(
        r.contains("* 0 EXISTS\r\n") && r.contains("* 0 RECENT\r\n"),
        "{r}"
    );
    let mut rev2 = env.login("bob@example.test").await;
    rev2.cmd("ENABLE IMAP4rev2").await;
    rev2.cmd("SELECT INBOX").await;

    a.cmd("SELECT Other").await;
    let r = a.cmd("COPY 1:3 INBOX").await;
    assert!(tagged(&r).contains(" OK"), "{r}");
    let r = b.cmd("NOOP").await;
    assert!(r.contains("* 3 EXISTS\r\n* 3 RECENT\r\n"), "{r}");
    let r = rev2.cmd("NOOP").await;
    assert!(r.contains("* 3 EXISTS\r\n"), "{r}");
    assert!(!r.contains("RECENT"), "{r}");
    // Each command completes in its own name.
    let r = b.cmd("CHECK").await;
    assert!(tagged(&r).ends_with(" OK CHECK completed"), "{r}");
    env.stop().await;
}

/// imaptest (copy, nil, search-flags, store: "Keyword used without being in FLAGS"): a keyword
/// is announced in `* FLAGS` and `* OK [PERMANENTFLAGS]` before any FETCH shows it, in the
/// session that set it and in the others (RFC 9051 §7.3.5 / §7.1).
#[tokio::test(flavor = "multi_thread")]
async fn new_keywords_are_announced_before_a_fetch_shows_them() {
    let env = bob_with_one_message().await;
    let mut a = env.login("bob@example.test").await;
    let mut b = env.login("bob@example.test").await;
    let r = a.cmd("SELECT INBOX").await;
    assert!(!r.contains("$kw1"), "{r}");
    b.cmd("SELECT INBOX").await;

    let r = b.cmd("STORE 1 +FLAGS ($kw1)").await;
    let flags = r.find("* FLAGS (").expect(&r);
    let perm = r.find("* OK [PERMANENTFLAGS (").expect(&r);
    let fetch = r.find("* 1 FETCH (FLAGS (").expect(&r);
    assert!(flags < fetch && perm < fetch, "{r}");
    assert!(
        r[flags..].split("\r\n").next().unwrap().contains("$kw1"),
        "{r}"
    );
    assert!(
        r[perm..]
            .split("\r\n")
            .next()
            .unwrap()
            .contains("$kw1 \\*)"),
        "{r}"
    );

    let r = a.cmd("NOOP").await;
    let flags = r.find("* FLAGS (").expect(&r);
    let fetch = r.find("* 1 FETCH (FLAGS (").expect(&r);
    assert!(flags < fetch, "{r}");
    // Announced once: FETCH FLAGS afterwards needs no new FLAGS response.
    let r = a.cmd("FETCH 1 FLAGS").await;
    assert!(r.contains("$kw1") && !r.contains("* FLAGS"), "{r}");
    // A keyword the session already knows is not announced again by a second one's STORE.
    let r = b.cmd("STORE 1 +FLAGS ($kw2)").await;
    assert_eq!(r.matches("* FLAGS (").count(), 1, "{r}");
    assert!(r.contains("$kw2"), "{r}");
    env.stop().await;
}

/// imaptest `expunge` and `move` (about half the runs failed): a command that changes the
/// selected mailbox reports every change in its own reply, not only once the change event
/// arrives: another session's expunge of the same message, and the copy MOVE made into this
/// very mailbox.
#[tokio::test(flavor = "multi_thread")]
async fn expunge_and_move_report_all_changes_in_their_reply() {
    let env = env().await;
    env.account("bob@example.test").await;
    for i in 0..2 {
        let m = format!("From: a@remote.test\r\nSubject: {i}\r\n\r\nbody\r\n");
        env.deliver("bob@example.test", m.as_bytes()).await;
    }
    let mut a = env.login("bob@example.test").await;
    let mut b = env.login("bob@example.test").await;
    a.cmd("SELECT INBOX").await;
    b.cmd("SELECT INBOX").await;
    // Ten rounds: the event and the poll race, so one lucky pass proves little.
    for round in 0..10 {
        let r = a.cmd("STORE 1 +FLAGS.SILENT (\\Deleted)").await;
        assert!(tagged(&r).contains(" OK"), "{r}");
        let r = b.cmd("STORE 1 +FLAGS.SILENT (\\Deleted)").await;
        assert!(tagged(&r).contains(" OK"), "{r}");
        let r = a.cmd("EXPUNGE").await;
        assert!(r.contains("* 1 EXPUNGE\r\n"), "round {round}: {r}");
        let r = b.cmd("EXPUNGE").await;
        assert!(r.contains("* 1 EXPUNGE\r\n"), "round {round}: {r}");
        // MOVE into the selected mailbox itself: the original goes, the copy arrives.
        let r = a.cmd("MOVE 1 INBOX").await;
        assert!(r.contains("* 1 EXPUNGE\r\n"), "round {round}: {r}");
        assert!(r.contains("* 1 EXISTS\r\n"), "round {round}: {r}");
        assert!(tagged(&r).contains(" OK"), "{r}");
        // Keep two messages for the next round; b catches up.
        let m = format!("From: a@remote.test\r\nSubject: r{round}\r\n\r\nbody\r\n");
        env.deliver("bob@example.test", m.as_bytes()).await;
        a.cmd("NOOP").await;
        b.cmd("NOOP").await;
    }
    env.stop().await;
}

/// imaptest `append`: two sessions have the mailbox selected read-write and one of them
/// appends; once a selected session has reported the new message, it is no longer \Recent for
/// anyone else, so a third session's STATUS says RECENT 0 (RFC 3501 §2.3.2, §6.3.10).
#[tokio::test(flavor = "multi_thread")]
async fn append_status_recent_counts_no_message_a_selected_session_was_told_of() {
    let env = env().await;
    env.account("bob@example.test").await;
    let mut one = env.login("bob@example.test").await;
    let mut two = env.login("bob@example.test").await;
    let mut three = env.login("bob@example.test").await;
    one.cmd("SELECT INBOX").await;
    two.cmd("SELECT INBOX").await;
    let m = "From: a@remote.test\r\nSubject: one\r\n\r\nbody\r\n";
    let r = one
        .cmd(&format!("APPEND INBOX (\\Seen) {{{}+}}\r\n{m}", m.len()))
        .await;
    assert!(r.contains("* 1 EXISTS\r\n"), "{r}");
    let r = two.cmd("NOOP").await;
    assert!(r.contains("* 1 EXISTS\r\n"), "{r}");
    let r = three.cmd("STATUS INBOX (MESSAGES UNSEEN RECENT)").await;
    assert!(
        r.contains("* STATUS INBOX (MESSAGES 1 UNSEEN 0 RECENT 0)"),
        "{r}"
    );
    // EXAMINE claims nothing: a message delivered now stays \Recent for the next session.
    one.cmd("EXAMINE INBOX").await;
    two.cmd("UNSELECT").await;
    env.deliver("bob@example.test", m.as_bytes()).await;
    one.cmd("NOOP").await;
    let r = three.cmd("STATUS INBOX (MESSAGES RECENT)").await;
    assert!(r.contains("* STATUS INBOX (MESSAGES 2 RECENT 1)"), "{r}");
    env.stop().await;
}
