//! End-to-end: the gateway over real sockets and real TLS, against a real mailbox-store on a
//! fresh PostgreSQL database, with messages delivered through Delivery.Deliver.

mod common;

use std::time::{Duration, Instant};

use common::*;
use mailsuite_testkit::eventually;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SIMPLE: &[u8] = b"From: Alice <alice@remote.test>\r\nTo: bob@example.test\r\nSubject: hello\r\nDate: Mon, 7 Feb 1994 21:52:25 -0800\r\nMessage-ID: <1@remote.test>\r\n\r\nHello Bob.\r\n";

fn nested() -> Vec<u8> {
    b"From: =?UTF-8?Q?J=C3=B6rg?= <joerg@remote.test>\r\n\
To: bob@example.test, carol@example.test\r\n\
Subject: =?UTF-8?B?R3LDvMOfZQ==?=\r\n\
Date: Tue, 8 Feb 1994 10:00:00 +0000\r\n\
MIME-Version: 1.0\r\n\
Content-Type: multipart/mixed; boundary=\"outer\"\r\n\
\r\n\
preamble\r\n\
--outer\r\n\
Content-Type: text/plain; charset=utf-8\r\n\
\r\n\
first part\r\n\
--outer\r\n\
Content-Type: message/rfc822\r\n\
\r\n\
From: inner@remote.test\r\n\
Subject: inner subject\r\n\
\r\n\
inner body\r\n\
--outer\r\n\
Content-Type: application/octet-stream; name=\"=?UTF-8?Q?r=C3=A9sum=C3=A9.bin?=\"\r\n\
Content-Disposition: attachment; filename=\"resume.bin\"\r\n\
Content-Transfer-Encoding: base64\r\n\
\r\n\
AAECAw==\r\n\
--outer--\r\n"
        .to_vec()
}

#[tokio::test(flavor = "multi_thread")]
async fn starttls_is_required_before_login_and_lists_special_use_mailboxes() {
    let env = env().await;
    env.account("bob@example.test").await;
    let mut c = env.plain().await;
    let caps = c.cmd("CAPABILITY").await;
    assert!(
        caps.contains("STARTTLS") && caps.contains("LOGINDISABLED"),
        "{caps}"
    );
    assert!(!caps.contains("AUTH=PLAIN"), "{caps}");
    let r = c
        .cmd(&format!("LOGIN bob@example.test \"{PASSWORD}\""))
        .await;
    assert!(tagged(&r).contains("NO [PRIVACYREQUIRED]"), "{r}");
    let r = c.cmd("STARTTLS").await;
    assert!(tagged(&r).contains("OK"), "{r}");
    let mut c = c.upgrade(&env.certs).await;
    let caps = c.cmd("CAPABILITY").await;
    assert!(
        caps.contains("AUTH=PLAIN") && !caps.contains("STARTTLS"),
        "{caps}"
    );
    let r = c
        .cmd(&format!("LOGIN bob@example.test \"{PASSWORD}\""))
        .await;
    assert!(
        tagged(&r)
            .to_ascii_uppercase()
            .contains("OK [CAPABILITY IMAP4REV1"),
        "{r}"
    );
    let list = c.cmd("LIST \"\" \"*\"").await;
    for (attr, name) in [
        ("\\Sent", "Sent"),
        ("\\Drafts", "Drafts"),
        ("\\Trash", "Trash"),
        ("\\Junk", "Junk"),
    ] {
        let line = list
            .lines()
            .find(|l| l.ends_with(&format!("\"/\" {name}")))
            .unwrap_or_else(|| panic!("{name} missing: {list}"));
        assert!(line.contains(attr), "{line}");
        assert!(line.contains("\\HasNoChildren"), "{line}");
    }
    assert!(
        list.contains("* LIST (\\HasNoChildren) \"/\" INBOX"),
        "{list}"
    );
    let r = c.cmd("LOGOUT").await;
    assert!(r.starts_with("* BYE"), "{r}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn implicit_tls_authenticate_plain_with_and_without_initial_response() {
    let env = env().await;
    env.account("bob@example.test").await;
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut c = env.tls().await;
    let ir = b64.encode(format!("\0bob@example.test\0{PASSWORD}"));
    let r = c.cmd(&format!("AUTHENTICATE PLAIN {ir}")).await;
    assert!(tagged(&r).contains("OK"), "{r}");
    let mut c = env.tls().await;
    c.send(b"a1 AUTHENTICATE PLAIN\r\n").await;
    assert_eq!(c.line().await, "+ \r\n");
    let bad = b64.encode("\0bob@example.test\0wrong");
    c.send(format!("{bad}\r\n").as_bytes()).await;
    let r = String::from_utf8(c.until_tag("a1").await).unwrap();
    assert!(r.contains("NO [AUTHENTICATIONFAILED]"), "{r}");
    c.send(b"a2 AUTHENTICATE PLAIN\r\n").await;
    assert_eq!(c.line().await, "+ \r\n");
    c.send(b"*\r\n").await;
    let r = String::from_utf8(c.until_tag("a2").await).unwrap();
    assert!(r.contains("a2 BAD"), "cancelled: {r}");
    let r = c.cmd("NOOP").await;
    assert!(tagged(&r).contains("OK"), "connection lives: {r}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn fetch_is_byte_exact_for_whole_message_and_parts() {
    let env = env().await;
    env.account("bob@example.test").await;
    let msg = nested();
    env.deliver("bob@example.test", &msg).await;
    let mut c = env.login("bob@example.test").await;
    let r = c.cmd("SELECT INBOX").await;
    assert!(r.contains("* 1 EXISTS"), "{r}");
    assert!(r.contains("[UIDVALIDITY "), "{r}");
    assert!(tagged(&r).contains("OK [READ-WRITE]"), "{r}");

    let r = c.cmd_bytes(b"FETCH 1 (RFC822.SIZE BODY.PEEK[])").await;
    let head = format!(
        "* 1 FETCH (RFC822.SIZE {} BODY[] {{{}}}\r\n",
        msg.len(),
        msg.len()
    );
    let mut expected = head.into_bytes();
    expected.extend_from_slice(&msg);
    expected.extend_from_slice(b")\r\n");
    assert_eq!(
        String::from_utf8_lossy(&r[..expected.len()]),
        String::from_utf8_lossy(&expected)
    );
    assert_eq!(&r[..expected.len()], &expected[..]);

    let r = c
        .cmd("FETCH 1 (BODY.PEEK[1] BODY.PEEK[2.HEADER] BODY.PEEK[3]<0.4>)")
        .await;
    assert!(r.contains("BODY[1] {10}\r\nfirst part"), "{r}");
    assert!(
        r.contains(
            "BODY[2.HEADER] {51}\r\nFrom: inner@remote.test\r\nSubject: inner subject\r\n\r\n"
        ),
        "{r}"
    );
    assert!(r.contains("BODY[3]<0> {4}\r\nAAEC"), "{r}");
    let r = c.cmd("FETCH 1 (BODY.PEEK[HEADER.FIELDS (SUBJECT)])").await;
    assert!(
        r.contains(
            "BODY[HEADER.FIELDS (SUBJECT)] {37}\r\nSubject: =?UTF-8?B?R3LDvMOfZQ==?=\r\n\r\n"
        ),
        "{r}"
    );
    let r = c
        .cmd_bytes(b"FETCH 1 (BINARY.PEEK[3] BINARY.SIZE[3])")
        .await;
    let s = String::from_utf8_lossy(&r);
    assert!(s.contains("BINARY.SIZE[3] 4"), "{s}");
    let needle = b"BINARY[3] ~{4}\r\n\x00\x01\x02\x03";
    assert!(r.windows(needle.len()).any(|w| w == needle), "{s}");
    // Not PEEK: sets \Seen and reports it.
    let r = c.cmd("FETCH 1 (BODY[1])").await;
    assert!(r.contains("\\Seen"), "{r}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bodystructure_and_envelope_follow_the_rfc() {
    let env = env().await;
    env.account("bob@example.test").await;
    env.deliver("bob@example.test", &nested()).await;
    env.deliver("bob@example.test", SIMPLE).await;
    let mut c = env.login("bob@example.test").await;
    c.cmd("EXAMINE INBOX").await;
    let r = c.cmd("FETCH 2 (ENVELOPE)").await;
    assert!(
        r.contains("* 2 FETCH (ENVELOPE (\"Mon, 7 Feb 1994 21:52:25 -0800\" \"hello\" ((\"Alice\" NIL \"alice\" \"remote.test\")) ((\"Alice\" NIL \"alice\" \"remote.test\")) ((\"Alice\" NIL \"alice\" \"remote.test\")) ((NIL NIL \"bob\" \"example.test\")) NIL NIL NIL \"<1@remote.test>\"))"),
        "{r}"
    );
    let r = c.cmd("FETCH 1 (ENVELOPE BODYSTRUCTURE)").await;
    // Encoded words stay encoded in ENVELOPE (RFC 9051 §7.5.2).
    assert!(r.contains("\"=?UTF-8?B?R3LDvMOfZQ==?=\""), "{r}");
    assert!(
        r.contains("((NIL NIL \"bob\" \"example.test\")(NIL NIL \"carol\" \"example.test\"))"),
        "{r}"
    );
    let bs = &r[r.find("BODYSTRUCTURE").expect("bodystructure")..];
    assert!(
        bs.to_ascii_uppercase()
            .contains("(\"TEXT\" \"PLAIN\" (\"CHARSET\" \"UTF-8\") NIL NIL \"7BIT\" 10 0"),
        "{bs}"
    );
    assert!(
        bs.to_ascii_uppercase().contains("\"MESSAGE\" \"RFC822\""),
        "{bs}"
    );
    assert!(bs.contains("\"inner subject\""), "{bs}");
    assert!(bs.to_ascii_uppercase().contains("\"BASE64\" 8"), "{bs}");
    assert!(bs.contains("\"resume.bin\""), "{bs}");
    assert!(
        bs.to_ascii_uppercase()
            .contains("\"MIXED\" (\"BOUNDARY\" \"OUTER\")"),
        "{bs}"
    );
    // EXAMINE is read-only: a non-PEEK fetch must not set \Seen.
    c.cmd("FETCH 1 (BODY[1])").await;
    let r = c.cmd("FETCH 1 (FLAGS)").await;
    assert!(!r.contains("\\Seen"), "{r}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn delivery_appears_during_idle_within_one_second() {
    let env = env().await;
    env.account("bob@example.test").await;
    let mut c = env.login("bob@example.test").await;
    let r = c.cmd("SELECT INBOX").await;
    assert!(r.contains("* 0 EXISTS"), "{r}");
    c.send(b"i1 IDLE\r\n").await;
    assert_eq!(c.line().await, "+ idling\r\n");
    env.until_watched("bob@example.test").await;
    // Deliver returns after the commit; from then on the clock runs.
    env.deliver("bob@example.test", SIMPLE).await;
    let line = tokio::time::timeout(Duration::from_secs(1), c.line())
        .await
        .expect("EXISTS within 1 s of the delivery");
    assert_eq!(line, "* 1 EXISTS\r\n");
    c.send(b"DONE\r\n").await;
    let r = String::from_utf8(c.until_tag("i1").await).unwrap();
    assert!(r.ends_with("i1 OK IDLE terminated\r\n"), "{r}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn alert_reaches_the_accounts_sessions() {
    let env = env().await;
    env.account("bob@example.test").await;
    let mut c = env.login("bob@example.test").await;
    c.cmd("SELECT INBOX").await;
    c.send(b"i1 IDLE\r\n").await;
    assert_eq!(c.line().await, "+ idling\r\n");
    env.until_watched("bob@example.test").await;
    assert!(
        env.alert("bob@example.test", "Message from the postmaster")
            .await
    );
    let line = c.line().await;
    assert_eq!(line, "* OK [ALERT] Message from the postmaster\r\n");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn store_copy_move_expunge_with_uidplus() {
    let env = env().await;
    env.account("bob@example.test").await;
    for _ in 0..4 {
        env.deliver("bob@example.test", SIMPLE).await;
    }
    let mut c = env.login("bob@example.test").await;
    let sel = c.cmd("SELECT INBOX").await;
    let uidvalidity: u32 = sel
        .split("[UIDVALIDITY ")
        .nth(1)
        .and_then(|s| s.split(']').next())
        .and_then(|s| s.parse().ok())
        .expect("uidvalidity");
    let r = c.cmd("STORE 1:2 +FLAGS (\\Flagged $Work)").await;
    assert!(
        r.contains("* 1 FETCH (FLAGS (\\Flagged $Work \\Recent))"),
        "{r}"
    );
    assert!(
        r.contains("* 2 FETCH (FLAGS (\\Flagged $Work \\Recent))"),
        "{r}"
    );
    let r = c.cmd("STORE 2 -FLAGS.SILENT (\\Flagged)").await;
    assert!(!r.contains("FETCH"), "silent: {r}");
    let r = c.cmd("UID STORE 3 FLAGS (\\Seen)").await;
    assert!(
        r.contains("* 3 FETCH (FLAGS (\\Seen \\Recent) UID 3)"),
        "{r}"
    );
    let r = c.cmd("COPY 1:2 Nonexistent").await;
    assert!(tagged(&r).contains("NO [TRYCREATE]"), "{r}");
    let r = c.cmd("COPY 1:2 Trash").await;
    let (code_vals, _) = r.split_once("] ").unwrap();
    assert!(code_vals.contains("[COPYUID "), "{r}");
    assert!(r.contains(" 1:2 1:2]"), "{r}");
    let r = c.cmd("UID MOVE 3 Trash").await;
    assert!(r.contains("* OK [COPYUID ") && r.contains(" 3 3]"), "{r}");
    assert!(r.contains("* 3 EXPUNGE\r\n"), "{r}");
    let r = c.cmd("STORE 1 +FLAGS.SILENT (\\Deleted)").await;
    assert!(tagged(&r).contains("OK"), "{r}");
    let r = c.cmd("EXPUNGE").await;
    assert_eq!(
        r.lines()
            .filter(|l| l.contains("EXPUNGE") && l.starts_with('*'))
            .count(),
        1,
        "{r}"
    );
    assert!(r.contains("* 1 EXPUNGE\r\n"), "{r}");
    let r = c.cmd("UID FETCH 1:* (UID FLAGS)").await;
    assert!(
        r.contains("* 1 FETCH (UID 2 FLAGS ($Work \\Recent))"),
        "{r}"
    );
    assert!(r.contains("* 2 FETCH (UID 4 FLAGS (\\Recent))"), "{r}");
    c.cmd("UID STORE 2,4 +FLAGS.SILENT (\\Deleted)").await;
    let r = c.cmd("UID EXPUNGE 4").await;
    assert!(r.starts_with("* 2 EXPUNGE\r\n"), "only UID 4 goes: {r}");
    assert!(tagged(&r).contains("OK"), "{r}");
    let r = c.cmd("STATUS Trash (MESSAGES UIDNEXT UIDVALIDITY)").await;
    assert!(
        r.contains("* STATUS Trash (MESSAGES 3 UIDNEXT 4 UIDVALIDITY "),
        "{r}"
    );
    let _ = uidvalidity;
    // APPEND with LITERAL+ and flags: APPENDUID.
    let msg = b"Subject: appended\r\n\r\nbody\r\n";
    let mut raw = format!("a9 APPEND INBOX (\\Seen) {{{}+}}\r\n", msg.len()).into_bytes();
    raw.extend_from_slice(msg);
    raw.extend_from_slice(b"\r\n");
    c.send(&raw).await;
    let r = String::from_utf8(c.until_tag("a9").await).unwrap();
    assert!(
        r.contains(&format!("a9 OK [APPENDUID {uidvalidity} 5]")),
        "{r}"
    );
    assert!(
        r.contains("* 2 EXISTS"),
        "appended to the selected mailbox: {r}"
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn search_keys() {
    let env = env().await;
    env.account("bob@example.test").await;
    env.deliver("bob@example.test", SIMPLE).await;
    env.deliver("bob@example.test", &nested()).await;
    env.deliver(
        "bob@example.test",
        b"From: x@y.test\r\nSubject: big one\r\n\r\nlorem ipsum dolor\r\n",
    )
    .await;
    let mut c = env.login("bob@example.test").await;
    c.cmd("SELECT INBOX").await;
    c.cmd("STORE 2 +FLAGS (\\Flagged)").await;
    let cases = [
        ("SEARCH ALL", "* SEARCH 1 2 3"),
        ("SEARCH FLAGGED", "* SEARCH 2"),
        ("SEARCH UNFLAGGED", "* SEARCH 1 3"),
        ("SEARCH SUBJECT hello", "* SEARCH 1"),
        ("SEARCH FROM alice", "* SEARCH 1"),
        ("SEARCH BODY ipsum", "* SEARCH 3"),
        ("SEARCH OR FLAGGED SUBJECT big", "* SEARCH 2 3"),
        ("SEARCH NOT FLAGGED 2:3", "* SEARCH 3"),
        ("UID SEARCH UID 2:*", "* SEARCH 2 3"),
        ("SEARCH SENTBEFORE 1-Jan-2000", "* SEARCH 1 2"),
        ("SEARCH CHARSET UTF-8 TEXT lorem", "* SEARCH 3"),
        ("SEARCH LARGER 400", "* SEARCH 2"),
    ];
    for (q, want) in cases {
        let r = c.cmd(q).await;
        assert!(r.contains(&format!("{want}\r\n")), "{q}: {r}");
        assert!(tagged(&r).contains("OK"), "{q}: {r}");
    }
    let r = c.cmd("SEARCH CHARSET KOI8-R ALL").await;
    assert!(tagged(&r).contains("NO [BADCHARSET"), "{r}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn two_sessions_see_each_others_changes_with_expunge_held_back_during_fetch() {
    let env = env().await;
    env.account("bob@example.test").await;
    for _ in 0..3 {
        env.deliver("bob@example.test", SIMPLE).await;
    }
    let mut a = env.login("bob@example.test").await;
    let mut b = env.login("bob@example.test").await;
    a.cmd("SELECT INBOX").await;
    b.cmd("SELECT INBOX").await;
    b.cmd("STORE 1 +FLAGS (\\Answered)").await;
    let r = a.cmd("NOOP").await;
    assert!(
        r.contains("* 1 FETCH (FLAGS (\\Answered \\Recent) UID 1)"),
        "{r}"
    );
    b.cmd("STORE 2 +FLAGS.SILENT (\\Deleted)").await;
    let r = b.cmd("EXPUNGE").await;
    assert!(r.contains("* 2 EXPUNGE"), "{r}");
    env.until_watched("bob@example.test").await;
    env.deliver("bob@example.test", SIMPLE).await;
    // A FETCH may not announce the expunge (RFC 9051 §7.5.1), but may announce the new mail.
    let deadline = Instant::now() + Duration::from_secs(5);
    let r = loop {
        let r = a.cmd("FETCH 1:3 (UID)").await;
        if r.contains("EXISTS") {
            break r;
        }
        assert!(
            Instant::now() < deadline,
            "new message never announced: {r}"
        );
    };
    assert!(!r.contains("EXPUNGE"), "{r}");
    assert!(r.contains("* 4 EXISTS"), "{r}");
    assert!(
        r.contains("* 3 FETCH (UID 3)"),
        "numbers do not shift before EXPUNGE: {r}"
    );
    let r = a.cmd("NOOP").await;
    assert!(r.contains("* 2 EXPUNGE"), "{r}");
    let r = a.cmd("FETCH 1:* (UID)").await;
    assert!(r.contains("* 3 FETCH (UID 4)"), "{r}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_expunge_and_an_arrival_in_one_poll_announce_both() {
    let env = env().await;
    env.account("bob@example.test").await;
    for _ in 0..3 {
        env.deliver("bob@example.test", SIMPLE).await;
    }
    let mut a = env.login("bob@example.test").await;
    let mut b = env.login("bob@example.test").await;
    a.cmd("SELECT INBOX").await;
    b.cmd("SELECT INBOX").await;
    b.cmd("STORE 2 +FLAGS.SILENT (\\Deleted)").await;
    let r = b.cmd("EXPUNGE").await;
    assert!(r.contains("* 2 EXPUNGE"), "{r}");
    // Both changes are committed before A asks: its NOOP sees them in one poll of the
    // change log, where the message count is unchanged (3 - 1 + 1).
    env.deliver("bob@example.test", SIMPLE).await;
    let r = a.cmd("NOOP").await;
    let expunge = r
        .find("* 2 EXPUNGE\r\n")
        .unwrap_or_else(|| panic!("no EXPUNGE: {r}"));
    let exists = r
        .find("* 3 EXISTS\r\n")
        .unwrap_or_else(|| panic!("no EXISTS: {r}"));
    assert!(expunge < exists, "EXISTS must follow the EXPUNGE: {r}");
    let r = a.cmd("FETCH 1:* (UID)").await;
    let uids: Vec<&str> = r.lines().filter(|l| l.starts_with("* ")).collect();
    assert_eq!(
        uids,
        [
            "* 1 FETCH (UID 1)",
            "* 2 FETCH (UID 3)",
            "* 3 FETCH (UID 4)"
        ],
        "{r}"
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn condstore_changedsince_and_unchangedsince() {
    let env = env().await;
    env.account("bob@example.test").await;
    for _ in 0..3 {
        env.deliver("bob@example.test", SIMPLE).await;
    }
    let mut c = env.login("bob@example.test").await;
    let r = c.cmd("ENABLE CONDSTORE").await;
    assert!(r.contains("* ENABLED CONDSTORE"), "{r}");
    let r = c.cmd("SELECT INBOX").await;
    let hms: u64 = r
        .split("[HIGHESTMODSEQ ")
        .nth(1)
        .and_then(|s| s.split(']').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("HIGHESTMODSEQ: {r}"));
    let r = c.cmd("STORE 2 +FLAGS (\\Seen)").await;
    assert!(
        r.contains("* 2 FETCH (FLAGS (\\Seen \\Recent) MODSEQ ("),
        "{r}"
    );
    let r = c
        .cmd(&format!("FETCH 1:* (FLAGS) (CHANGEDSINCE {hms})"))
        .await;
    assert!(
        r.contains("* 2 FETCH (FLAGS (\\Seen \\Recent) MODSEQ ("),
        "{r}"
    );
    assert!(!r.contains("* 1 FETCH") && !r.contains("* 3 FETCH"), "{r}");
    let r = c
        .cmd(&format!(
            "STORE 1:2 (UNCHANGEDSINCE {hms}) +FLAGS (\\Flagged)"
        ))
        .await;
    assert!(tagged(&r).contains("OK [MODIFIED 2]"), "{r}");
    assert!(
        r.contains("* 1 FETCH (FLAGS (\\Flagged \\Recent) MODSEQ ("),
        "{r}"
    );
    let r = c.cmd("STATUS INBOX (HIGHESTMODSEQ)").await;
    assert!(r.contains("HIGHESTMODSEQ "), "{r}");
    let r = c.cmd(&format!("SEARCH MODSEQ {}", hms + 1)).await;
    assert!(r.contains("* SEARCH 1 2 (MODSEQ "), "{r}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hierarchies_are_created_renamed_and_deleted() {
    let env = env().await;
    env.account("bob@example.test").await;
    let mut c = env.login("bob@example.test").await;
    let r = c.cmd("CREATE Projects/2026/Q1").await;
    assert!(tagged(&r).contains("OK"), "{r}");
    let r = c.cmd("CREATE Projects/2026/Q1").await;
    assert!(tagged(&r).contains("NO [ALREADYEXISTS]"), "{r}");
    let r = c.cmd("LIST \"\" \"Projects/%\"").await;
    assert!(
        r.contains("* LIST (\\HasChildren) \"/\" Projects/2026\r\n"),
        "{r}"
    );
    let r = c.cmd("RENAME Projects Work").await;
    assert!(tagged(&r).contains("OK"), "{r}");
    let r = c.cmd("LIST \"\" \"*\"").await;
    assert!(r.contains("\"/\" Work/2026/Q1\r\n"), "{r}");
    assert!(!r.contains("Projects"), "{r}");
    let r = c.cmd("CREATE Entwürfe").await;
    assert!(
        tagged(&r).contains("BAD") || tagged(&r).contains("NO"),
        "8-bit name in rev1: {r}"
    );
    let r = c.cmd("CREATE Entw&APw-rfe").await;
    assert!(tagged(&r).contains("OK"), "{r}");
    let r = c.cmd("LIST \"\" Entw*").await;
    assert!(
        r.contains("\"/\" Entw&APw-rfe\r\n"),
        "modified UTF-7 on the wire: {r}"
    );
    let r = c.cmd("SUBSCRIBE Work/2026").await;
    assert!(tagged(&r).contains("OK"), "{r}");
    let r = c.cmd("LSUB \"\" \"*\"").await;
    assert!(r.contains("\"/\" Work/2026\r\n"), "{r}");
    let r = c.cmd("DELETE Work/2026/Q1").await;
    assert!(tagged(&r).contains("OK"), "{r}");
    let r = c.cmd("SELECT Work/2026/Q1").await;
    assert!(tagged(&r).contains("NO [NONEXISTENT]"), "{r}");
    let r = c.cmd("DELETE INBOX").await;
    assert!(tagged(&r).contains("NO"), "{r}");
    let r = c.cmd("LIST \"\" \"\"").await;
    assert!(r.contains("* LIST (\\Noselect) \"/\" \"\""), "{r}");
    let r = c.cmd("NAMESPACE").await;
    assert!(r.contains("* NAMESPACE ((\"\" \"/\")) NIL NIL"), "{r}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_syntax_gets_bad_and_the_connection_lives() {
    let env = env_with(|c| {
        c.limits.max_command = 4096;
        c.limits.max_message_bytes = 8192;
    })
    .await;
    env.account("bob@example.test").await;
    let mut c = env.login("bob@example.test").await;
    for bad in ["FROB", "FETCH", "SELECT", "FETCH 1 (BODY[", "LOGIN a"] {
        let r = c.cmd(bad).await;
        assert!(tagged(&r).contains(" BAD "), "{bad}: {r}");
    }
    c.send(b"garbage without tag\r\n").await;
    let l = c.line().await;
    assert!(
        l.starts_with("* BAD") || l.starts_with("garbage BAD"),
        "{l}"
    );
    let r = c.cmd("FETCH 1 (FLAGS)").await;
    assert!(tagged(&r).contains(" BAD "), "no mailbox selected: {r}");
    c.cmd("SELECT INBOX").await;
    let r = c.cmd("FETCH 5 (FLAGS)").await;
    assert!(tagged(&r).contains(" BAD "), "no such message: {r}");
    // Oversized literal: refused without a continuation, then life goes on.
    c.send(b"big APPEND INBOX {100000}\r\n").await;
    let l = c.line().await;
    assert_eq!(l, "big NO [TOOBIG] Too large\r\n");
    // Synchronizing literal within limits: continuation then OK.
    c.send(b"lit LOGIN {3}\r\n").await;
    assert!(c.line().await.starts_with("+ "));
    c.send(b"abc x\r\n").await;
    let r = String::from_utf8(c.until_tag("lit").await).unwrap();
    assert!(r.contains("lit BAD"), "already authenticated: {r}");
    let r = c.cmd("NOOP").await;
    assert!(tagged(&r).contains("OK"), "{r}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn commands_in_the_wrong_state_are_refused() {
    let env = env_with(|c| c.auth.allow_plaintext_loopback = true).await;
    env.account("bob@example.test").await;
    let mut c = env.plain().await;
    let caps = c.cmd("CAPABILITY").await;
    assert!(
        caps.contains("AUTH=PLAIN") && !caps.contains("LOGINDISABLED"),
        "{caps}"
    );
    for cmd in [
        "SELECT INBOX",
        "LIST \"\" *",
        "FETCH 1 FLAGS",
        "IDLE",
        "ENABLE CONDSTORE",
    ] {
        let r = c.cmd(cmd).await;
        assert!(tagged(&r).contains(" BAD "), "{cmd}: {r}");
    }
    let r = c
        .cmd(&format!("LOGIN bob@example.test \"{PASSWORD}\""))
        .await;
    assert!(tagged(&r).contains("OK"), "loopback plaintext allowed: {r}");
    for cmd in ["FETCH 1 FLAGS", "EXPUNGE", "CLOSE", "LOGIN a b", "STARTTLS"] {
        let r = c.cmd(cmd).await;
        assert!(tagged(&r).contains(" BAD "), "{cmd}: {r}");
    }
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_says_bye_to_idle_sessions() {
    let env = env().await;
    env.account("bob@example.test").await;
    let mut c = env.login("bob@example.test").await;
    c.cmd("SELECT INBOX").await;
    c.send(b"i IDLE\r\n").await;
    assert_eq!(c.line().await, "+ idling\r\n");
    let mut d = env.plain().await;
    env.gw_shutdown.trigger();
    assert_eq!(c.line().await, "* BYE Server shutting down\r\n");
    assert_eq!(d.line().await, "* BYE Server shutting down\r\n");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn python_imaplib_full_session() {
    let env = env().await;
    env.account("bob@example.test").await;
    env.deliver("bob@example.test", SIMPLE).await;
    let dir = tempfile::tempdir().unwrap();
    let msg = dir.path().join("message.eml");
    std::fs::write(&msg, SIMPLE).unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/imaplib_client.py");
    let args = [
        script.to_string(),
        "127.0.0.1".into(),
        env.imap().port().to_string(),
        env.imaps().port().to_string(),
        env.certs.ca_pem.display().to_string(),
        "bob@example.test".into(),
        PASSWORD.into(),
        msg.display().to_string(),
    ];
    let out = tokio::process::Command::new("python3")
        .args(&args)
        .output()
        .await
        .expect("python3 runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("imaplib: all checks passed"), "{stdout}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn quota_and_status_size() {
    let env = env().await;
    env.account_with_quota("bob@example.test", 1024 * 1024, 2)
        .await;
    env.deliver("bob@example.test", SIMPLE).await;
    let mut c = env.login("bob@example.test").await;
    let caps = c.cmd("CAPABILITY").await;
    assert!(
        caps.contains("QUOTA QUOTA=RES-STORAGE QUOTA=RES-MESSAGE"),
        "{caps}"
    );
    let r = c.cmd("GETQUOTAROOT INBOX").await;
    assert!(r.contains("* QUOTAROOT INBOX \"\"\r\n"), "{r}");
    assert!(
        r.contains("* QUOTA \"\" (STORAGE 0 1024 MESSAGE 1 2)\r\n"),
        "{r}"
    );
    let r = c.cmd("GETQUOTA \"\"").await;
    assert!(r.contains("MESSAGE 1 2"), "{r}");
    let r = c.cmd("GETQUOTAROOT Nope").await;
    assert!(tagged(&r).contains("NO [NONEXISTENT]"), "{r}");
    let r = c.cmd("STATUS INBOX (MESSAGES SIZE)").await;
    assert!(
        r.contains(&format!(
            "* STATUS INBOX (MESSAGES 1 SIZE {})",
            SIMPLE.len()
        )),
        "{r}"
    );
    let msg = b"Subject: a\r\n\r\nb\r\n";
    let append = |tag: &str| {
        let mut raw = format!("{tag} APPEND INBOX {{{}+}}\r\n", msg.len()).into_bytes();
        raw.extend_from_slice(msg);
        raw.extend_from_slice(b"\r\n");
        raw
    };
    c.send(&append("a1")).await;
    let r = String::from_utf8(c.until_tag("a1").await).unwrap();
    assert!(r.contains("a1 OK [APPENDUID"), "{r}");
    c.send(&append("a2")).await;
    let r = String::from_utf8(c.until_tag("a2").await).unwrap();
    assert!(r.contains("a2 NO [OVERQUOTA]"), "{r}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_stops_reading_is_disconnected_by_the_write_timeout() {
    let env = env_with(|c| {
        c.limits.write_timeout_secs = 1;
        c.limits.max_sessions_per_account = 1;
    })
    .await;
    env.account("bob@example.test").await;
    let mut big = b"Subject: big\r\n\r\n".to_vec();
    while big.len() < 256 * 1024 {
        big.extend_from_slice(&[b'x'; 998]);
        big.extend_from_slice(b"\r\n");
    }
    env.deliver("bob@example.test", &big).await;
    let mut stuck = env.login("bob@example.test").await;
    stuck.cmd("SELECT INBOX").await;
    // ~50 MB of replies: far more than the socket buffers hold, and never read.
    let fetches = 200;
    let mut pipelined = Vec::new();
    for i in 0..fetches {
        pipelined.extend_from_slice(format!("f{i} FETCH 1 BODY.PEEK[]\r\n").as_bytes());
    }
    stuck.send(&pipelined).await;
    // The session (one per account) is released only when the gateway gives up on writing.
    eventually(
        Duration::from_secs(20),
        "the stuck session to end",
        || async {
            let mut c = env.tls().await;
            let r = c
                .cmd(&format!("LOGIN bob@example.test \"{PASSWORD}\""))
                .await;
            tagged(&r).contains(" OK ").then_some(())
        },
    )
    .await;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(TIMEOUT, stuck.s.read_to_end(&mut rest))
        .await
        .expect("the gateway closed the connection");
    assert!(
        rest.len() < fetches * big.len(),
        "only part of the replies was sent: {}",
        rest.len()
    );
    env.stop().await;
}

/// Connect on the plain port and write `drip` every 200 ms until the gateway hangs up;
/// returns everything the gateway sent and how long the connection lasted.
async fn trickle(env: &Env, first: &[u8], drip: &'static [u8]) -> (String, Duration) {
    let started = Instant::now();
    let s = tokio::net::TcpStream::connect(env.imap()).await.unwrap();
    let (mut r, mut w) = s.into_split();
    w.write_all(first).await.unwrap();
    let writer = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tick.tick().await;
            if w.write_all(drip).await.is_err() {
                return;
            }
        }
    });
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), r.read_to_end(&mut got))
        .await
        .expect("the gateway hung up on the trickling client");
    writer.abort();
    (
        String::from_utf8_lossy(&got).into_owned(),
        started.elapsed(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_busy_client_must_still_log_in_within_the_login_timeout() {
    let env = env_with(|c| {
        c.limits.login_timeout_secs = 2;
        c.auth.allow_plaintext_loopback = true;
    })
    .await;
    // A command every 200 ms keeps an idle timer from ever firing.
    let (got, lasted) = trickle(&env, b"", b"n NOOP\r\n").await;
    assert!(got.contains("n OK"), "{got}");
    assert!(
        got.ends_with("* BYE Autologout; idle for too long\r\n"),
        "{got}"
    );
    assert!(lasted >= Duration::from_secs(2), "{lasted:?}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_command_line_must_arrive_within_the_line_timeout() {
    let env = env_with(|c| {
        c.limits.line_timeout_secs = 1;
        c.auth.allow_plaintext_loopback = true;
    })
    .await;
    env.account("bob@example.test").await;
    let login = format!("l LOGIN bob@example.test \"{PASSWORD}\"\r\nx SEARCH TEXT ");
    // One byte every 200 ms: the line never ends, the idle timer never fires.
    let (got, lasted) = trickle(&env, login.as_bytes(), b"y").await;
    assert!(got.contains("l OK"), "{got}");
    assert!(
        got.ends_with("* BYE Command line took too long\r\n"),
        "{got}"
    );
    assert!(lasted >= Duration::from_secs(1), "{lasted:?}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn login_failures_are_limited_per_address_across_connections() {
    let env = env_with(|c| {
        c.limits.max_auth_failures = 2;
        c.limits.max_auth_failures_per_ip = 4;
        c.limits.auth_failure_delay_ms = 1;
    })
    .await;
    env.account("bob@example.test").await;
    // Two connections each use up their own limit: four failures from 127.0.0.1.
    for _ in 0..2 {
        let mut c = env.tls().await;
        let r = c.cmd("LOGIN bob@example.test wrong").await;
        assert!(tagged(&r).contains("NO [AUTHENTICATIONFAILED]"), "{r}");
        let r = c.cmd("LOGIN bob@example.test wrong").await;
        assert!(r.starts_with("* BYE"), "{r}");
    }
    // A fresh connection is refused even with the right password.
    let mut c = env.tls().await;
    let r = c
        .cmd(&format!("LOGIN bob@example.test \"{PASSWORD}\""))
        .await;
    assert!(tagged(&r).contains("NO [UNAVAILABLE]"), "{r}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn repeated_login_failures_end_the_connection() {
    let env = env_with(|c| c.limits.max_auth_failures = 3).await;
    env.account("bob@example.test").await;
    let mut c = env.tls().await;
    for _ in 0..2 {
        let r = c.cmd("LOGIN bob@example.test wrong").await;
        assert!(tagged(&r).contains("NO [AUTHENTICATIONFAILED]"), "{r}");
    }
    let r = c.cmd("LOGIN bob@example.test wrong").await;
    assert!(r.starts_with("* BYE"), "{r}");
    let mut rest = Vec::new();
    let n = tokio::time::timeout(TIMEOUT, c.s.read_to_end(&mut rest))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "connection closed after BYE");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn connection_and_session_limits() {
    let env = env_with(|c| {
        c.limits.connections.max_per_ip = 2;
        c.limits.max_sessions_per_account = 1;
        c.limits.login_timeout_secs = 1;
        c.auth.allow_plaintext_loopback = true;
    })
    .await;
    env.account("bob@example.test").await;
    let mut a = env.plain().await;
    let r = a
        .cmd(&format!("LOGIN bob@example.test \"{PASSWORD}\""))
        .await;
    assert!(tagged(&r).contains("OK"), "{r}");
    let mut b = env.plain().await;
    let r = b
        .cmd(&format!("LOGIN bob@example.test \"{PASSWORD}\""))
        .await;
    assert!(
        tagged(&r).contains("NO [LIMIT]"),
        "one session per account: {r}"
    );
    // A third connection from this IP is refused with BYE on the plain port.
    let mut s = tokio::net::TcpStream::connect(env.imap()).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(TIMEOUT, s.read_to_end(&mut buf))
        .await
        .expect("closed in time")
        .unwrap();
    assert_eq!(buf, b"* BYE [UNAVAILABLE] Too many connections\r\n");
    // The unauthenticated session is logged out by the login timer.
    let l = b.line().await;
    assert_eq!(l, "* BYE Autologout; idle for too long\r\n");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn utf8_accept_switches_mailbox_names_to_utf8() {
    let env = env().await;
    env.account("bob@example.test").await;
    let mut c = env.login("bob@example.test").await;
    let r = c.cmd("CREATE Entw&APw-rfe").await;
    assert!(tagged(&r).contains("OK"), "{r}");
    let r = c.cmd("ENABLE UTF8=ACCEPT").await;
    assert!(r.contains("* ENABLED UTF8=ACCEPT"), "{r}");
    let r = c.cmd("LIST \"\" Entw*").await;
    assert!(r.contains("Entwürfe"), "UTF-8 on the wire: {r}");
    assert!(!r.contains("&APw-"), "{r}");
    let r = c.cmd("CREATE \"Überblick\"").await;
    assert!(tagged(&r).contains("OK"), "{r}");
    let r = c.cmd("STATUS \"Überblick\" (MESSAGES)").await;
    assert!(r.contains("(MESSAGES 0)"), "{r}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn pipelined_commands_with_literals_and_byte_at_a_time_input() {
    let env = env().await;
    env.account("bob@example.test").await;
    env.deliver("bob@example.test", SIMPLE).await;
    let mut c = env.login("bob@example.test").await;
    c.send(b"p1 SELECT INBOX\r\np2 FETCH 1 (UID)\r\np3 APPEND INBOX {5+}\r\nhello\r\np4 STATUS INBOX (MESSAGES)\r\np5 NOOP\r\n")
        .await;
    let r = String::from_utf8(c.until_tag("p5").await).unwrap();
    let pos = |t: &str| {
        r.find(&format!("{t} OK"))
            .unwrap_or_else(|| panic!("{t}: {r}"))
    };
    assert!(
        pos("p1") < pos("p2")
            && pos("p2") < pos("p3")
            && pos("p3") < pos("p4")
            && pos("p4") < pos("p5"),
        "{r}"
    );
    assert!(r.contains("* 1 FETCH (UID 1)"), "{r}");
    // One byte per write, a synchronizing literal in the middle.
    for b in b"b1 FETCH 2 (BODY.PEEK[HEADER.FIELDS (X)])\r\n" {
        c.send(&[*b]).await;
    }
    let r = String::from_utf8(c.until_tag("b1").await).unwrap();
    assert!(tagged(&r).contains("b1 OK"), "{r}");
    for b in b"b2 LIST \"\" {5}\r\n" {
        c.send(&[*b]).await;
    }
    assert!(c.line().await.starts_with("+ "));
    for b in b"INBOX\r\n" {
        c.send(&[*b]).await;
    }
    let r = String::from_utf8(c.until_tag("b2").await).unwrap();
    assert!(r.contains("* LIST (\\HasNoChildren) \"/\" INBOX"), "{r}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rename_inbox_moves_its_messages_and_leaves_an_empty_inbox() {
    let env = env().await;
    env.account("bob@example.test").await;
    env.deliver("bob@example.test", SIMPLE).await;
    env.deliver("bob@example.test", SIMPLE).await;
    let mut c = env.login("bob@example.test").await;
    let r = c.cmd("RENAME INBOX \"Old Mail\"").await;
    assert!(tagged(&r).contains("OK"), "{r}");
    let r = c.cmd("STATUS INBOX (MESSAGES)").await;
    assert!(r.contains("* STATUS INBOX (MESSAGES 0)"), "{r}");
    let r = c.cmd("STATUS \"Old Mail\" (MESSAGES)").await;
    assert!(r.contains("* STATUS \"Old Mail\" (MESSAGES 2)"), "{r}");
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn commands_pipelined_after_starttls_are_discarded() {
    let env = env().await;
    let mut c = env.plain().await;
    // The injected NOOP arrives in the same segment as STARTTLS, in plaintext.
    c.send(b"a STARTTLS\r\nb NOOP\r\n").await;
    let l = c.line().await;
    assert_eq!(l, "a OK Begin TLS negotiation now\r\n");
    let inner = c.into_inner();
    let connector = tokio_rustls::TlsConnector::from(env.certs.client_config());
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    // Either the server dropped the plaintext and TLS works, or it read it as a broken
    // handshake; it must never execute it.
    if let Ok(tls) = connector.connect(name, inner).await {
        let mut c = Client::new(Box::new(tls));
        let r = c.cmd("NOOP").await;
        assert!(
            r.starts_with("t1 OK"),
            "no reply to the injected command: {r}"
        );
    }
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn recent_belongs_to_the_first_session_that_selects() {
    let env = env().await;
    env.account("bob@example.test").await;
    env.deliver("bob@example.test", SIMPLE).await;
    env.deliver("bob@example.test", SIMPLE).await;
    let mut a = env.login("bob@example.test").await;
    let r = a.cmd("SELECT INBOX").await;
    assert!(r.contains("* 2 RECENT"), "{r}");
    let r = a.cmd("FETCH 1:* (FLAGS)").await;
    assert!(r.contains("* 1 FETCH (FLAGS (\\Recent))"), "{r}");
    let r = a.cmd("SEARCH RECENT").await;
    assert!(r.contains("* SEARCH 1 2\r\n"), "{r}");
    let mut b = env.login("bob@example.test").await;
    let r = b.cmd("SELECT INBOX").await;
    assert!(r.contains("* 0 RECENT"), "{r}");
    let r = b.cmd("FETCH 1 (FLAGS)").await;
    assert!(r.contains("* 1 FETCH (FLAGS ())"), "{r}");
    let r = b.cmd("SEARCH NEW").await;
    assert!(r.contains("* SEARCH\r\n"), "{r}");
    let r = b.cmd("SEARCH OLD").await;
    assert!(r.contains("* SEARCH 1 2\r\n"), "{r}");
    env.stop().await;
}

/// A FETCH of many messages (one batched body stream per chunk, read alongside the metadata)
/// writes exactly what FETCHes of each message alone write: literal sizes, item order,
/// partial ranges, BINARY, several sections, sections a message does not have.
#[tokio::test(flavor = "multi_thread")]
async fn multi_message_fetch_is_byte_identical_to_single_fetches() {
    let env = env_with(|c| c.limits.fetch_batch = 2).await;
    env.account("bob@example.test").await;
    let msgs = [
        nested(),
        SIMPLE.to_vec(),
        nested(),
        SIMPLE.to_vec(),
        nested(),
    ];
    for m in &msgs {
        env.deliver("bob@example.test", m).await;
    }
    let mut c = env.login("bob@example.test").await;
    let r = c.cmd("EXAMINE INBOX").await;
    assert!(r.contains("* 5 EXISTS"), "{r}");
    for items in [
        "(UID BODY.PEEK[1] BODY.PEEK[3]<1.3> BINARY.PEEK[3] BINARY.SIZE[3] BODY.PEEK[7])",
        "(BODY.PEEK[TEXT]<2.10> RFC822.SIZE BODY.PEEK[2.HEADER] FLAGS)",
        "(ENVELOPE BODY.PEEK[] BODYSTRUCTURE)",
        "(RFC822.HEADER BODY.PEEK[HEADER.FIELDS (SUBJECT FROM)])",
        "BODY.PEEK[9.1]",
        "BINARY.PEEK[]",
    ] {
        let all = c.cmd_bytes(format!("FETCH 1:5 {items}").as_bytes()).await;
        let mut singles = Vec::new();
        for n in 1..=5 {
            let one = c.cmd_bytes(format!("FETCH {n} {items}").as_bytes()).await;
            let tagged_at = one.len() - tagged(&String::from_utf8_lossy(&one)).len() - 2;
            assert!(
                one.starts_with(format!("* {n} FETCH (").as_bytes()),
                "{items}: {}",
                String::from_utf8_lossy(&one)
            );
            singles.extend_from_slice(&one[..tagged_at]);
        }
        let untagged = &all[..all.len() - tagged(&String::from_utf8_lossy(&all)).len() - 2];
        assert_eq!(
            String::from_utf8_lossy(untagged),
            String::from_utf8_lossy(&singles),
            "{items}"
        );
    }
    // Sizes announced are sizes sent: the whole message of each, in order.
    let r = c.cmd_bytes(b"FETCH 1:5 BINARY.PEEK[]").await;
    let mut want = Vec::new();
    for (k, m) in msgs.iter().enumerate() {
        want.extend_from_slice(
            format!("* {} FETCH (BINARY[] ~{{{}}}\r\n", k + 1, m.len()).as_bytes(),
        );
        want.extend_from_slice(m);
        want.extend_from_slice(b")\r\n");
    }
    assert_eq!(&r[..want.len()], &want[..]);
    env.stop().await;
}

/// CHANGEDSINCE with body sections: only the changed messages, each with its own body.
#[tokio::test(flavor = "multi_thread")]
async fn changedsince_with_body_sections_returns_changed_messages_only() {
    let env = env().await;
    env.account("bob@example.test").await;
    env.deliver("bob@example.test", SIMPLE).await;
    env.deliver("bob@example.test", &nested()).await;
    env.deliver("bob@example.test", SIMPLE).await;
    let mut c = env.login("bob@example.test").await;
    c.cmd("ENABLE CONDSTORE").await;
    let r = c.cmd("SELECT INBOX").await;
    let hms: u64 = r
        .split("[HIGHESTMODSEQ ")
        .nth(1)
        .and_then(|s| s.split(']').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("HIGHESTMODSEQ: {r}"));
    let r = c.cmd("STORE 2 +FLAGS.SILENT (\\Flagged)").await;
    assert!(tagged(&r).contains("OK"), "{r}");
    let r = c
        .cmd(&format!("FETCH 1:* (BODY.PEEK[1]) (CHANGEDSINCE {hms})"))
        .await;
    assert!(
        r.starts_with("* 2 FETCH (BODY[1] {10}\r\nfirst part MODSEQ ("),
        "{r}"
    );
    assert!(!r.contains("* 1 FETCH") && !r.contains("* 3 FETCH"), "{r}");
    env.stop().await;
}

/// Clients that ask for many large bodies and then stop reading must not stall everyone
/// else: the gateway reads each store stream ahead to a bound without waiting for its client,
/// so the flow-control window of the gRPC connection all sessions share is never left full.
#[tokio::test(flavor = "multi_thread")]
async fn clients_that_stop_reading_do_not_stall_other_sessions() {
    let env = env().await;
    env.account("bob@example.test").await;
    let line = format!("{}\r\n", "abcdefghij".repeat(7));
    let big = format!(
        "From: a@remote.test\r\nTo: bob@example.test\r\nSubject: big\r\n\r\n{}",
        line.repeat(400 * 1024 / line.len())
    );
    for _ in 0..40 {
        env.deliver("bob@example.test", big.as_bytes()).await;
    }
    // Three sessions each ask for 16 MB and read none of it.
    let mut stalled = Vec::new();
    for _ in 0..3 {
        let mut c = env.login("bob@example.test").await;
        let r = c.cmd("EXAMINE INBOX").await;
        assert!(r.contains("* 40 EXISTS"), "{r}");
        c.send(b"s1 FETCH 1:* BODY.PEEK[]\r\n").await;
        stalled.push(c);
    }
    // Another session is served, whole mailbox and all, while they sit there.
    let mut c = env.login("bob@example.test").await;
    c.cmd("EXAMINE INBOX").await;
    for _ in 0..2 {
        let r = c.cmd_bytes(b"FETCH 1:* BODY.PEEK[]").await;
        let s = String::from_utf8_lossy(&r);
        assert_eq!(s.matches(" FETCH (BODY[] {").count(), 40);
        assert!(tagged(&s).contains("OK"), "{}", tagged(&s));
        let r = c.cmd("FETCH 7 BODY.PEEK[HEADER.FIELDS (SUBJECT)]").await;
        assert!(r.contains("Subject: big"), "{r}");
    }
    drop(stalled);
    env.stop().await;
}

/// Log in as `user`, select `mailbox` (asserting its size), and enter IDLE.
async fn idling(env: &Env, user: &str, mailbox: &str, exists: u32) -> Client {
    let mut c = env.login(user).await;
    let r = c.cmd(&format!("SELECT {mailbox}")).await;
    assert!(r.contains(&format!("* {exists} EXISTS")), "{r}");
    c.send(b"i IDLE\r\n").await;
    assert_eq!(c.line().await, "+ idling\r\n");
    c
}

/// Issue 13: IDLE sessions share one `Changes` poll per mailbox change (the gateway's change
/// cache); each session must still get exactly its own mailbox's changes, each once: arrivals,
/// flag changes and expunges, with sessions on another mailbox of the account and on another
/// account seeing nothing of them, and a session left far behind catching up in one go.
#[tokio::test(flavor = "multi_thread")]
async fn shared_change_polls_give_each_idle_session_exactly_its_own_changes() {
    let env = env().await;
    env.account("bob@example.test").await;
    env.account("carol@example.test").await;
    env.deliver("bob@example.test", SIMPLE).await;
    let mut w = env.login("bob@example.test").await;
    assert!(tagged(&w.cmd("CREATE Work").await).contains(" OK "));
    // Selected now, never idle: its modseq stays below every shared poll's.
    let mut behind = env.login("bob@example.test").await;
    let r = behind.cmd("SELECT INBOX").await;
    assert!(r.contains("* 1 EXISTS"), "{r}");
    let mut inbox = Vec::new();
    let mut work = Vec::new();
    let mut carol = Vec::new();
    for _ in 0..3 {
        inbox.push(idling(&env, "bob@example.test", "INBOX", 1).await);
        work.push(idling(&env, "bob@example.test", "Work", 0).await);
        carol.push(idling(&env, "carol@example.test", "INBOX", 0).await);
    }
    env.until_watched("bob@example.test").await;
    env.until_watched("carol@example.test").await;

    env.deliver("bob@example.test", SIMPLE).await;
    for c in &mut inbox {
        assert_eq!(c.line().await, "* 2 EXISTS\r\n");
        // How many are \Recent depends on which session selected first.
        let recent = c.line().await;
        assert!(
            recent.starts_with("* ") && recent.ends_with(" RECENT\r\n"),
            "{recent}"
        );
    }
    let mut append = format!("APPEND Work {{{}+}}\r\n", SIMPLE.len()).into_bytes();
    append.extend_from_slice(SIMPLE);
    let r = String::from_utf8(w.cmd_bytes(&append).await).unwrap();
    assert!(tagged(&r).contains(" OK "), "{r}");
    for c in &mut work {
        assert_eq!(c.line().await, "* 1 EXISTS\r\n");
        // How many are \Recent depends on which session selected first.
        let recent = c.line().await;
        assert!(
            recent.starts_with("* ") && recent.ends_with(" RECENT\r\n"),
            "{recent}"
        );
    }
    env.deliver("carol@example.test", SIMPLE).await;
    for c in &mut carol {
        assert_eq!(c.line().await, "* 1 EXISTS\r\n");
        // How many are \Recent depends on which session selected first.
        let recent = c.line().await;
        assert!(
            recent.starts_with("* ") && recent.ends_with(" RECENT\r\n"),
            "{recent}"
        );
    }

    w.cmd("SELECT INBOX").await;
    let r = w.cmd("STORE 2 +FLAGS.SILENT (\\Flagged)").await;
    assert!(tagged(&r).contains(" OK "), "{r}");
    for c in &mut inbox {
        assert_eq!(
            c.line().await,
            "* 2 FETCH (FLAGS (\\Flagged \\Recent) UID 2)\r\n"
        );
    }
    w.cmd("STORE 1 +FLAGS.SILENT (\\Deleted)").await;
    let r = w.cmd("EXPUNGE").await;
    assert!(r.contains("* 1 EXPUNGE"), "{r}");
    for c in &mut inbox {
        // The \Deleted flag may be reported first, unless one poll saw it with the expunge.
        loop {
            let l = c.line().await;
            if l == "* 1 EXPUNGE\r\n" {
                break;
            }
            assert!(l.starts_with("* 1 FETCH (FLAGS (\\Deleted"), "{l}");
        }
    }

    // Nothing left to report anywhere: no change twice, none of another mailbox or account.
    for c in inbox.iter_mut().chain(&mut work).chain(&mut carol) {
        c.send(b"DONE\r\n").await;
        let r = String::from_utf8(c.until_tag("i").await).unwrap();
        assert_eq!(r, "i OK IDLE terminated\r\n");
    }

    // The session left behind learns it all once, through a poll of its own range (not
    // NOOP, which always polls the store itself): the expunge, then the arrival.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut seen = String::new();
    while !seen.contains("EXISTS") {
        assert!(Instant::now() < deadline, "never caught up: {seen}");
        seen.push_str(&behind.cmd("NAMESPACE").await);
    }
    assert_eq!(
        seen.matches("* 1 EXPUNGE\r\n* 1 EXISTS\r\n").count(),
        1,
        "{seen}"
    );
    assert!(!seen.contains("FETCH"), "{seen}");
    let r = behind.cmd("FETCH 1 (UID FLAGS)").await;
    assert!(r.contains("UID 2") && r.contains("\\Flagged"), "{r}");
    env.stop().await;
}

/// A session's own APPEND to its selected mailbox is reported in the APPEND's reply even
/// though the gateway keeps a shared `Changes` answer for that mailbox which predates the
/// APPEND (its change event has not necessarily arrived yet): the poll after an own change
/// is the session's own, never a shared one. Found by imaplib's APPEND + UID MOVE.
#[tokio::test(flavor = "multi_thread")]
async fn append_to_the_selected_mailbox_is_reported_despite_a_kept_shared_answer() {
    let env = env().await;
    env.account("bob@example.test").await;
    env.deliver("bob@example.test", SIMPLE).await;
    let mut a = env.login("bob@example.test").await;
    assert!(a.cmd("SELECT INBOX").await.contains("* 1 EXISTS"));
    let mut b = idling(&env, "bob@example.test", "INBOX", 1).await;
    env.until_watched("bob@example.test").await;
    // A delivery: both sessions learn of it through the shared poll, whose answer is kept.
    env.deliver("bob@example.test", SIMPLE).await;
    assert_eq!(b.line().await, "* 2 EXISTS\r\n");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if a.cmd("NAMESPACE").await.contains("* 2 EXISTS") {
            break;
        }
        assert!(Instant::now() < deadline, "delivery never announced");
    }
    let mut append = format!("APPEND INBOX {{{}+}}\r\n", SIMPLE.len()).into_bytes();
    append.extend_from_slice(SIMPLE);
    let r = String::from_utf8(a.cmd_bytes(&append).await).unwrap();
    assert!(tagged(&r).contains(" OK [APPENDUID "), "{r}");
    assert!(r.contains("* 3 EXISTS\r\n"), "{r}");
    let r = a.cmd("UID MOVE 3 Trash").await;
    assert!(r.contains("* 3 EXPUNGE\r\n"), "{r}");
    drop(b);
    env.stop().await;
}
