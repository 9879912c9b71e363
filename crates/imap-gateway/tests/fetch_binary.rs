//! FETCH BODY/BINARY of the messages of Dovecot's imaptest scripts `append-binary`,
//! `fetch-binary-mime-base64` and `fetch-binary-mime-qp` (RFC 3516, RFC 9051), appended
//! byte for byte as imaptest sends them, with the exact reply bytes asserted.

mod common;

use common::*;

/// imaptest `append-binary`: a binary part with a NUL, an 8-bit byte and bare LFs.
const APPEND_BINARY: &[u8] = b"From: user@domain.org\r\n\
Date: Sat, 24 Mar 2007 23:00:00 +0200\r\n\
Mime-Version: 1.0\r\n\
Content-Type: application/octet-stream\r\n\
Content-Transfer-Encoding: binary\r\n\
\r\n\
\x00-\xe4\n\r\n\n";

/// imaptest `fetch-binary-mime-base64.mbox`, with the CRLF line ends imaptest appends it with.
const BASE64: &[u8] = b"From: user@domain.org\r\n\
Date: Sat, 24 Mar 2007 23:00:00 +0200\r\n\
Mime-Version: 1.0\r\n\
Content-Type: multipart/mixed; boundary=\"foo\r\n bar\"\r\n\
\r\n\
Root MIME prologue\r\n\
\r\n\
--foo bar\r\n\
Content-Type: text/x-myown; charset=us-ascii\r\n\
Content-Transfer-Encoding: base64\r\n\
\r\n\
\r\n\
aGVs\r\n\
bG8gd29y\r\n\
bGQ=\r\n\
\r\n\
--foo bar\r\n\
Content-Type: text/x-myown; charset=us-ascii\r\n\
Content-Transfer-Encoding: base64\r\n\
\r\n\
  aGVs    \r\n\
 bG8g  \r\n\
   d29y  \t \r\n\
    bGQ= \r\n\
\r\n\
\r\n\
--foo bar\r\n\
Content-Type: text/x-myown; charset=us-ascii\r\n\
Content-Transfer-Encoding: base64\r\n\
\r\n\
aGVsbG8g\r\n\
dG8geW91IHRv\r\n\
bw==\r\n\
\r\n\
--foo bar\r\n\
Content-Type: text/x-myown; charset=us-ascii\r\n\
Content-Transfer-Encoding: base64\r\n\
\r\n\
aGVsbG8gdG8gZXZlcnlvbmUh\r\n\
--foo bar\r\n\
Content-Type: text/x-myown; charset=us-ascii\r\n\
Content-Transfer-Encoding: base64\r\n\
\r\n\
YWJjZGVmZw1oaWprbA0KbW5vCnBxcnN0dXZxeHl6\r\n\
\r\n\
--foo bar--\r\n\
Root MIME epilogue\r\n";

/// Part 5 of [`BASE64`] decoded: a bare CR, a CRLF and a bare LF that must all survive.
const BASE64_PART5: &[u8] = b"abcdefg\rhijkl\r\nmno\npqrstuvqxyz";

/// imaptest `fetch-binary-mime-qp.mbox`, with CRLF line ends.
const QP: &[u8] = b"From: user@domain.org\r\n\
Date: Sat, 24 Mar 2007 23:00:00 +0200\r\n\
Mime-Version: 1.0\r\n\
Content-Type: multipart/mixed; boundary=\"foo\r\n bar\"\r\n\
\r\n\
Root MIME prologue\r\n\
\r\n\
--foo bar\r\n\
Content-Type: text/x-myown; charset=us-ascii\r\n\
Content-Transfer-Encoding: quoted-printable\r\n\
\r\n\
hello  \r\n\
bar=\r\n\
\r\n\
foo\t=\r\n\
bar\r\n\
foo\t \t= \r\n\
=62\r\n\
foo = \t\r\n\
bar\r\n\
foo =\r\n\
=62\r\n\
foo  \r\n\
bar=\r\n\
\r\n\
foo_bar\r\n\
\r\n\
--foo bar--\r\n\
Root MIME epilogue\r\n";

/// Part 1 of [`QP`] decoded, as the imaptest script spells it out.
const QP_PART1: &[u8] =
    b"hello\r\nbar\r\nfoo\tbar\r\nfoo\t \tb\r\nfoo bar\r\nfoo b\r\nfoo\r\nbar\r\nfoo_bar\r\n";

/// A logged-in session with `msg` appended (as a LITERAL+ literal8, like imaptest) and
/// INBOX selected.
async fn with_message(env: &Env, msg: &[u8]) -> Client {
    env.account("bob@example.test").await;
    let mut c = env.login("bob@example.test").await;
    let mut raw = format!(
        "a1 APPEND INBOX \"22-Feb-2008 17:06:23 +0000\" ~{{{}+}}\r\n",
        msg.len()
    )
    .into_bytes();
    raw.extend_from_slice(msg);
    raw.extend_from_slice(b"\r\n");
    c.send(&raw).await;
    let r = String::from_utf8_lossy(&c.until_tag("a1").await).into_owned();
    assert!(tagged(&r).contains("OK [APPENDUID "), "{r}");
    let r = c.cmd("SELECT INBOX").await;
    assert!(r.contains("* 1 EXISTS"), "{r}");
    c
}

/// The untagged part of a FETCH command's reply, which must be OK.
async fn fetch(c: &mut Client, items: &str) -> Vec<u8> {
    let r = c.cmd_bytes(format!("FETCH 1 {items}").as_bytes()).await;
    let t = tagged(&String::from_utf8_lossy(&r)).len();
    let (untagged, status) = r.split_at(r.len() - t - 2);
    assert!(
        status.windows(4).any(|w| w == b" OK "),
        "{}",
        String::from_utf8_lossy(&r)
    );
    untagged.to_vec()
}

/// `NAME {n}\r\n<data>` (or `~{n}` for BINARY).
fn literal(name: &str, tilde: bool, data: &[u8]) -> Vec<u8> {
    let t = if tilde { "~" } else { "" };
    let mut v = format!("{name} {t}{{{}}}\r\n", data.len()).into_bytes();
    v.extend_from_slice(data);
    v
}

/// `* 1 FETCH (<items joined by spaces>)\r\n`.
fn fetch_line(items: &[Vec<u8>]) -> Vec<u8> {
    let mut v = b"* 1 FETCH (".to_vec();
    v.extend_from_slice(&items.join(&b' '));
    v.extend_from_slice(b")\r\n");
    v
}

#[track_caller]
fn same(got: &[u8], want: &[u8]) {
    assert_eq!(
        String::from_utf8_lossy(got),
        String::from_utf8_lossy(want),
        "raw: {got:?}"
    );
    assert_eq!(got, want);
}

/// A NUL must not empty the section: non-BINARY fetches send it as 0x80 (as Dovecot does),
/// same length, so RFC822.SIZE, literal sizes and partial offsets keep agreeing; BINARY
/// sends the bytes as stored, bare LFs included.
#[tokio::test(flavor = "multi_thread")]
async fn append_binary_nul_is_0x80_outside_binary_and_exact_inside() {
    let env = env().await;
    let mut c = with_message(&env, APPEND_BINARY).await;
    let part = b"\x00-\xe4\n\r\n\n";
    let part_80 = b"\x80-\xe4\n\r\n\n";
    let whole_80: Vec<u8> = APPEND_BINARY
        .iter()
        .map(|&b| if b == 0 { 0x80 } else { b })
        .collect();

    same(
        &fetch(&mut c, "(BODY.PEEK[1])").await,
        &fetch_line(&[literal("BODY[1]", false, part_80)]),
    );
    same(
        &fetch(&mut c, "(BINARY.SIZE[1] BINARY.PEEK[1])").await,
        &fetch_line(&[
            b"BINARY.SIZE[1] 7".to_vec(),
            literal("BINARY[1]", true, part),
        ]),
    );
    same(
        &fetch(&mut c, "(RFC822.SIZE BODY.PEEK[])").await,
        &fetch_line(&[
            format!("RFC822.SIZE {}", APPEND_BINARY.len()).into_bytes(),
            literal("BODY[]", false, &whole_80),
        ]),
    );
    same(
        &fetch(&mut c, "(BINARY.SIZE[] BINARY.PEEK[])").await,
        &fetch_line(&[
            format!("BINARY.SIZE[] {}", APPEND_BINARY.len()).into_bytes(),
            literal("BINARY[]", true, APPEND_BINARY),
        ]),
    );
    let at = APPEND_BINARY.len() - part.len() - 1;
    same(
        &fetch(&mut c, &format!("(BODY.PEEK[]<{at}.4> BODY.PEEK[TEXT])")).await,
        &fetch_line(&[
            literal(&format!("BODY[]<{at}>"), false, &whole_80[at..at + 4]),
            literal("BODY[TEXT]", false, part_80),
        ]),
    );
    // RFC822 sets \Seen, so last.
    let r = fetch(&mut c, "(RFC822.TEXT)").await;
    let want = literal("RFC822.TEXT", false, part_80);
    assert!(
        r.windows(want.len()).any(|w| w == want),
        "{}",
        String::from_utf8_lossy(&r)
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn base64_parts_decode_exactly_and_partials_carry_their_origin() {
    let env = env().await;
    let mut c = with_message(&env, BASE64).await;
    same(
        &fetch(&mut c, "(BINARY.SIZE[1] BINARY.SIZE[5])").await,
        &fetch_line(&[b"BINARY.SIZE[1] 11".to_vec(), b"BINARY.SIZE[5] 30".to_vec()]),
    );
    same(
        &fetch(
            &mut c,
            "(BINARY.PEEK[1] BINARY.PEEK[2] BINARY.PEEK[3] BINARY.PEEK[4] BINARY.PEEK[5])",
        )
        .await,
        &fetch_line(&[
            literal("BINARY[1]", true, b"hello world"),
            literal("BINARY[2]", true, b"hello world"),
            literal("BINARY[3]", true, b"hello to you too"),
            literal("BINARY[4]", true, b"hello to everyone!"),
            literal("BINARY[5]", true, BASE64_PART5),
        ]),
    );
    same(
        &fetch(&mut c, "(BINARY.SIZE[2] BINARY.SIZE[3] BINARY.SIZE[4])").await,
        &fetch_line(&[
            b"BINARY.SIZE[2] 11".to_vec(),
            b"BINARY.SIZE[3] 16".to_vec(),
            b"BINARY.SIZE[4] 18".to_vec(),
        ]),
    );
    for (origin, len, want) in [
        (0, 7, &b"abcdefg"[..]),
        (0, 8, b"abcdefg\r"),
        (0, 10, b"abcdefg\rhi"),
        (10, 10, b"jkl\r\nmno\np"),
        (5, 10, b"fg\rhijkl\r\n"),
        (15, 100, b"mno\npqrstuvqxyz"),
    ] {
        same(
            &fetch(&mut c, &format!("(BINARY.PEEK[5]<{origin}.{len}>)")).await,
            &fetch_line(&[literal(&format!("BINARY[5]<{origin}>"), true, want)]),
        );
    }
    // The origin goes with its own item only, among others encoded as usual.
    same(
        &fetch(
            &mut c,
            "(UID BINARY.PEEK[5]<2.3> BINARY.PEEK[1] BODY.PEEK[1]<0.4>)",
        )
        .await,
        &fetch_line(&[
            b"UID 1".to_vec(),
            literal("BINARY[5]<2>", true, b"cde"),
            literal("BINARY[1]", true, b"hello world"),
            literal("BODY[1]<0>", false, b"\r\naG"),
        ]),
    );
    env.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn quoted_printable_part_decodes_exactly_and_partials_carry_their_origin() {
    let env = env().await;
    let mut c = with_message(&env, QP).await;
    assert_eq!(QP_PART1.len(), 65);
    same(
        &fetch(&mut c, "(BINARY.SIZE[1])").await,
        &fetch_line(&[b"BINARY.SIZE[1] 65".to_vec()]),
    );
    same(
        &fetch(&mut c, "(BINARY.PEEK[1])").await,
        &fetch_line(&[literal("BINARY[1]", true, QP_PART1)]),
    );
    for (origin, len) in [(0, 10), (10, 10), (20, 10), (15, 10), (40, 100)] {
        let want = &QP_PART1[origin..(origin + len).min(QP_PART1.len())];
        same(
            &fetch(&mut c, &format!("(BINARY.PEEK[1]<{origin}.{len}>)")).await,
            &fetch_line(&[literal(&format!("BINARY[1]<{origin}>"), true, want)]),
        );
    }
    env.stop().await;
}
