//! Regression tests for the security review of 2026-12-02 (issue 12), each reproducing the
//! attack over a real socket against a real store and asserting the safe behaviour.

mod common;

use common::*;

const MSG: &[u8] = b"From: a@remote.test\r\nTo: bob@example.test\r\nSubject: hi\r\n\r\nhello\r\n";

/// H1: a backtracking LIST matcher took minutes for `*a*a*…b` against a long name, pinning
/// a runtime worker. The answer must be right (and arrive within the client's timeout).
#[tokio::test(flavor = "multi_thread")]
async fn h1_list_wildcard_pattern_against_a_long_name_answers_correctly() {
    let env = env().await;
    env.account("bob@example.test").await;
    let mut c = env.login("bob@example.test").await;
    let plain = "a".repeat(1000);
    let hit = format!("{}ab", "a".repeat(998));
    for name in [&plain, &hit] {
        let r = c.cmd(&format!("CREATE {name}")).await;
        assert!(tagged(&r).contains(" OK"), "{r}");
    }
    // Another user's session stays responsive meanwhile (checked after).
    env.account("carol@example.test").await;
    let mut other = env.login("carol@example.test").await;
    let pattern = "*a*a*a*a*a*a*a*ab";
    let r = c.cmd(&format!("LIST \"\" \"{pattern}\"")).await;
    let lists: Vec<&str> = r.lines().filter(|l| l.starts_with("* LIST")).collect();
    assert_eq!(lists.len(), 1, "{r}");
    assert!(lists[0].ends_with(&format!(" {hit}")), "{r}");
    assert!(tagged(&r).contains(" OK "), "{r}");
    // The extended form, several patterns, same answer.
    let r = c
        .cmd(&format!(
            "LIST (SUBSCRIBED) \"\" (\"{pattern}\" \"%b\" \"*x*y*z\")"
        ))
        .await;
    assert!(tagged(&r).contains(" OK "), "{r}");
    let r = c.cmd(&format!("LIST \"\" (\"{pattern}\" \"%b\")")).await;
    let lists: Vec<&str> = r.lines().filter(|l| l.starts_with("* LIST")).collect();
    assert_eq!(lists.len(), 1, "{r}");
    // A pattern over the cap is refused, not run.
    let long = "*a".repeat(600);
    let r = c.cmd(&format!("LIST \"\" \"{long}\"")).await;
    assert!(tagged(&r).contains(" BAD [TOOBIG]"), "{r}");
    let r = c.cmd(&format!("LIST \"\" (\"{long}\" \"%\")")).await;
    assert!(tagged(&r).contains(" BAD [TOOBIG]"), "{r}");
    let r = other.cmd("NOOP").await;
    assert!(tagged(&r).contains(" OK "), "{r}");
    env.stop().await;
}

/// M1: before login, `APPEND INBOX {62914560}` got `+` and the gateway buffered up to 64 MiB
/// per connection. Now it is refused at the decoder without a continuation request, and the
/// connection stays usable.
#[tokio::test(flavor = "multi_thread")]
async fn m1_append_literal_before_login_is_refused_without_continuation() {
    let env = env().await;
    env.account("bob@example.test").await;
    // The plaintext port, which advertises LOGINDISABLED, as in the review.
    let mut c = env.plain().await;
    c.send(b"a1 APPEND INBOX {62914560}\r\n").await;
    let l = c.line().await;
    assert_eq!(l, "a1 BAD APPEND requires authentication\r\n");
    let r = c.cmd("NOOP").await;
    assert!(
        r.starts_with("t1 OK"),
        "no continuation was sent, the connection lives: {r}"
    );
    // Any other literal before login is held to the pre-login limit (8 KiB).
    c.send(b"a2 LOGIN bob {9000}\r\n").await;
    assert_eq!(c.line().await, "a2 BAD [TOOBIG] Too large\r\n");
    let r = c.cmd("NOOP").await;
    assert!(tagged(&r).contains(" OK "), "{r}");
    // A large non-synchronizing literal before login ends the connection cleanly, before
    // its bytes are read.
    c.send(b"a3 APPEND INBOX {62914560+}\r\n").await;
    assert_eq!(c.line().await, "a3 BAD [TOOBIG] Too large\r\n");
    assert!(c.line().await.starts_with("* BYE [TOOBIG]"));
    let mut rest = Vec::new();
    let n = tokio::time::timeout(
        TIMEOUT,
        tokio::io::AsyncReadExt::read_to_end(&mut c.s, &mut rest),
    )
    .await
    .expect("closed in time")
    .unwrap_or(0);
    assert_eq!(n, 0, "closed: {}", String::from_utf8_lossy(&rest));

    // LOGIN with synchronizing literals still works, and after it APPEND takes big literals.
    let mut c = env.tls().await;
    c.send(b"a1 APPEND INBOX {10}\r\n").await;
    assert_eq!(c.line().await, "a1 BAD APPEND requires authentication\r\n");
    let user = "bob@example.test";
    c.send(format!("a2 LOGIN {{{}}}\r\n", user.len()).as_bytes())
        .await;
    assert!(c.line().await.starts_with("+ "));
    c.send(format!("{user} {{{}}}\r\n", PASSWORD.len()).as_bytes())
        .await;
    assert!(c.line().await.starts_with("+ "));
    c.send(format!("{PASSWORD}\r\n").as_bytes()).await;
    let r = String::from_utf8(c.until_tag("a2").await).unwrap();
    assert!(tagged(&r).contains("a2 OK"), "{r}");
    let mut msg = MSG.to_vec();
    msg.extend(std::iter::repeat_n(b'x', 2 * 1024 * 1024));
    msg.extend(b"\r\n");
    c.send(format!("a3 APPEND INBOX {{{}}}\r\n", msg.len()).as_bytes())
        .await;
    assert!(c.line().await.starts_with("+ "));
    c.send(&msg).await;
    c.send(b"\r\n").await;
    let r = String::from_utf8(c.until_tag("a3").await).unwrap();
    assert!(tagged(&r).contains("a3 OK [APPENDUID"), "{r}");
    env.stop().await;
}

/// M1 bypass: `a AUTHENTICATE PLAIN` needs no credentials, and a literal in the data line
/// that follows got `+` (synchronizing) or was read and stored up to the 64 MiB message cap
/// (non-synchronizing): the pre-login limit only applied to commands. Now a literal there is
/// refused without `+`, or ends the connection before any of its bytes are read.
#[tokio::test(flavor = "multi_thread")]
async fn m1_literal_in_authenticate_data_is_not_buffered() {
    let env = env().await;
    env.account("bob@example.test").await;
    let mut c = env.tls().await;
    c.send(b"a1 AUTHENTICATE PLAIN\r\n").await;
    assert!(c.line().await.starts_with("+ "));
    c.send(b"x {67000000}\r\n").await;
    assert_eq!(c.line().await, "a1 BAD Unexpected input\r\n", "no \"+\"");
    let r = c.cmd("NOOP").await;
    assert!(r.starts_with("t1 OK"), "back in command mode: {r}");

    // Only the announcement is sent: the answer and the close must come without the literal.
    c.send(b"a2 AUTHENTICATE PLAIN\r\n").await;
    assert!(c.line().await.starts_with("+ "));
    c.send(b"x {67000000+}\r\n").await;
    assert_eq!(c.line().await, "a2 BAD Unexpected input\r\n");
    assert!(c.line().await.starts_with("* BYE "));
    let mut rest = Vec::new();
    let n = tokio::time::timeout(
        TIMEOUT,
        tokio::io::AsyncReadExt::read_to_end(&mut c.s, &mut rest),
    )
    .await
    .expect("closed in time")
    .unwrap_or(0);
    assert_eq!(n, 0, "closed: {}", String::from_utf8_lossy(&rest));

    // AUTHENTICATE itself still works.
    let mut c = env.tls().await;
    c.send(b"a1 AUTHENTICATE PLAIN\r\n").await;
    assert!(c.line().await.starts_with("+ "));
    let creds = format!("\0bob@example.test\0{PASSWORD}");
    let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, creds);
    c.send(format!("{b64}\r\n").as_bytes()).await;
    let r = String::from_utf8(c.until_tag("a1").await).unwrap();
    assert!(tagged(&r).contains("a1 OK"), "{r}");
    env.stop().await;
}

/// M2: `FETCH 1:*,1:*,…` expanded every element before deduplicating (gigabytes from one
/// 64 KiB line). Now each message is fetched once, and too many elements are refused.
#[tokio::test(flavor = "multi_thread")]
async fn m2_repeated_sequence_set_elements_fetch_each_message_once() {
    let env = env().await;
    env.account("bob@example.test").await;
    for _ in 0..30 {
        env.deliver("bob@example.test", MSG).await;
    }
    let mut c = env.login("bob@example.test").await;
    let r = c.cmd("SELECT INBOX").await;
    assert!(r.contains("* 30 EXISTS"), "{r}");
    let set = vec!["1:*"; 9_000].join(",");
    let r = c.cmd(&format!("FETCH {set} (UID)")).await;
    assert!(tagged(&r).contains(" OK "), "{r}");
    let fetches: Vec<&str> = r.lines().filter(|l| l.contains(" FETCH (UID ")).collect();
    assert_eq!(fetches.len(), 30, "each message once: {r}");
    let r = c.cmd(&format!("UID SEARCH UID {set}")).await;
    assert!(tagged(&r).contains(" OK "), "{r}");
    // Over the element cap (default 10,000): a clear BAD, and the session goes on.
    let set = vec!["1:*"; 16_000].join(",");
    let r = c.cmd(&format!("FETCH {set} (UID)")).await;
    assert!(
        tagged(&r).contains(" BAD Too many elements in the sequence set"),
        "{r}"
    );
    let r = c.cmd(&format!("SEARCH {set}")).await;
    assert!(tagged(&r).contains(" BAD "), "{r}");
    // The cap is per command: many small sets in one SEARCH count together.
    let keys = vec!["1:*"; 12_000].join(" ");
    let r = c.cmd(&format!("SEARCH {keys}")).await;
    assert!(
        tagged(&r).contains(" BAD Too many elements in the sequence set"),
        "{r}"
    );
    // Set keys are sent to the store as intervals: many of them still answer right.
    let keys = vec!["1:*"; 50].join(" ");
    let r = c.cmd(&format!("SEARCH {keys} 2:4 NOT 3")).await;
    assert!(r.starts_with("* SEARCH 2 4\r\n"), "{r}");
    let r = c.cmd("SEARCH OR 29:40 1 NOT 2:30").await;
    assert!(r.starts_with("* SEARCH 1\r\n"), "{r}");
    let r = c.cmd("SEARCH 29:40").await;
    assert!(r.starts_with("* SEARCH 29 30\r\n"), "{r}");
    let r = c.cmd("FETCH 30 (UID)").await;
    assert!(tagged(&r).contains(" OK "), "{r}");
    env.stop().await;
}

/// L1: `SELECT "abcde&AOk-"` (abcdeé) sliced a `str` inside a character and panicked,
/// killing the session. Now it is an ordinary NO and the session goes on.
#[tokio::test(flavor = "multi_thread")]
async fn l1_select_non_ascii_name_gets_no_and_the_session_survives() {
    let env = env().await;
    env.account("bob@example.test").await;
    let mut c = env.login("bob@example.test").await;
    let r = c.cmd("SELECT \"abcde&AOk-\"").await;
    assert!(tagged(&r).contains(" NO "), "{r}");
    let r = c.cmd("NOOP").await;
    assert!(tagged(&r).contains(" OK "), "{r}");
    // The same name works once it exists.
    let r = c.cmd("CREATE \"abcde&AOk-\"").await;
    assert!(tagged(&r).contains(" OK "), "{r}");
    let r = c.cmd("SELECT \"abcde&AOk-\"").await;
    assert!(tagged(&r).contains(" OK "), "{r}");
    env.stop().await;
}
