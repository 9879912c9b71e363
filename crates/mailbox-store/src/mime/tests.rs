//! A hand-written MIME corpus. Expected values were worked out by hand from RFC 9051 §7.5.2
//! (BODYSTRUCTURE: type, subtype, parameters, id, description, encoding, size in octets of
//! the body as transferred, lines for TEXT and MESSAGE/RFC822; ENVELOPE: date, subject, from,
//! sender, reply-to, to, cc, bcc, in-reply-to, message-id, with sender and reply-to defaulting
//! to from) and RFC 2045 §5.2 (absent or invalid Content-Type = text/plain; charset=us-ascii).

use super::*;
use mailsuite_proto::SectionKind;

fn s(b: &Option<Vec<u8>>) -> Option<&str> {
    b.as_deref().map(|v| std::str::from_utf8(v).unwrap())
}

fn t(b: &[u8]) -> &str {
    std::str::from_utf8(b).unwrap()
}

fn params(p: &BodyPart) -> Vec<(String, String)> {
    p.params
        .iter()
        .map(|x| (t(&x.name).to_ascii_uppercase(), t(&x.value).to_string()))
        .collect()
}

fn slice<'a>(raw: &'a [u8], p: &BodyPart) -> &'a str {
    t(&raw[p.body_start as usize..p.body_end as usize])
}

fn kind(p: &BodyPart) -> (String, String) {
    (
        t(&p.media_type).to_ascii_uppercase(),
        t(&p.media_subtype).to_ascii_uppercase(),
    )
}

#[test]
fn no_mime_message_is_text_plain_us_ascii() {
    let raw = b"From: a@b.test\r\nSubject: plain\r\n\r\nline one\r\nline two\r\n";
    let p = parse(raw);
    let b = &p.body;
    assert_eq!(kind(b), ("TEXT".into(), "PLAIN".into()));
    assert_eq!(params(b), vec![("CHARSET".into(), "US-ASCII".into())]);
    assert_eq!(t(&b.encoding).to_ascii_uppercase(), "7BIT");
    assert_eq!(b.size, 20);
    assert_eq!(b.lines, 2);
    assert_eq!(slice(raw, b), "line one\r\nline two\r\n");
    assert_eq!(b.header_start, 0);
    assert_eq!(b.body_start, 34);
    assert!(b.parts.is_empty());
    assert_eq!(s(&p.envelope.subject), Some("plain"));
}

#[test]
fn envelope_fields_and_defaults() {
    let raw = concat!(
        "Date: Wed, 17 Jul 1996 02:23:25 -0700 (PDT)\r\n",
        "From: Terry Gray <gray@cac.washington.edu>\r\n",
        "Subject: =?iso-8859-1?q?IMAP4rev2_caf=E9?=\r\n",
        "To: imap@cac.washington.edu, \"Ann\" <ann@x.test>\r\n",
        "Cc: minutes@CNRI.Reston.VA.US,\r\n John Klensin <KLENSIN@MIT.EDU>\r\n",
        "Bcc: Team: a@t.test, b@t.test;\r\n",
        "In-Reply-To: <parent@x.test>\r\n",
        "Message-Id: <B27397-0100000@cac.washington.edu>\r\n",
        "\r\n",
        "body\r\n"
    )
    .as_bytes();
    let e = parse(raw).envelope;
    assert_eq!(s(&e.date), Some("Wed, 17 Jul 1996 02:23:25 -0700 (PDT)"));
    // The subject is given as it is in the header (RFC 2047 left to the client).
    assert_eq!(s(&e.subject), Some("=?iso-8859-1?q?IMAP4rev2_caf=E9?="));
    assert_eq!(e.from.len(), 1);
    assert_eq!(s(&e.from[0].name), Some("Terry Gray"));
    assert_eq!(s(&e.from[0].mailbox), Some("gray"));
    assert_eq!(s(&e.from[0].host), Some("cac.washington.edu"));
    assert_eq!(e.from[0].adl, None);
    // Sender and Reply-To absent: both equal From.
    assert_eq!(e.sender, e.from);
    assert_eq!(e.reply_to, e.from);
    assert_eq!(e.to.len(), 2);
    assert_eq!(e.to[0].name, None);
    assert_eq!(s(&e.to[0].mailbox), Some("imap"));
    assert_eq!(s(&e.to[1].name), Some("Ann"));
    assert_eq!(e.cc.len(), 2);
    assert_eq!(s(&e.cc[1].name), Some("John Klensin"));
    assert_eq!(s(&e.cc[1].mailbox), Some("KLENSIN"));
    assert_eq!(s(&e.cc[1].host), Some("MIT.EDU"));
    // A group: start marker (NIL NIL "Team" NIL), members, end marker (NIL NIL NIL NIL).
    assert_eq!(e.bcc.len(), 4);
    assert_eq!(s(&e.bcc[0].mailbox), Some("Team"));
    assert_eq!(e.bcc[0].host, None);
    assert_eq!(s(&e.bcc[1].mailbox), Some("a"));
    assert_eq!(e.bcc[3], EnvelopeAddress::default());
    assert_eq!(s(&e.in_reply_to), Some("<parent@x.test>"));
    assert_eq!(
        s(&e.message_id),
        Some("<B27397-0100000@cac.washington.edu>")
    );
}

#[test]
fn non_ascii_display_name_is_rfc2047_encoded() {
    let raw = "From: =?utf-8?q?J=C3=BCrgen?= <j@x.test>\r\nSender: s@x.test\r\nReply-To: r@x.test\r\n\r\nx".as_bytes();
    let e = parse(raw).envelope;
    let name = s(&e.from[0].name).unwrap().to_string();
    assert!(name.starts_with("=?utf-8?b?"), "{name}");
    assert_eq!(s(&e.sender[0].mailbox), Some("s"));
    assert_eq!(s(&e.reply_to[0].mailbox), Some("r"));
}

const MIXED: &str = concat!(
    "From: a@b.test\r\n",
    "MIME-Version: 1.0\r\n",
    "Content-Type: multipart/mixed; boundary=\"outer\"\r\n",
    "\r\n",
    "preamble\r\n",
    "--outer\r\n",
    "Content-Type: multipart/alternative; boundary=inner\r\n",
    "\r\n",
    "--inner\r\n",
    "Content-Type: text/plain; charset=utf-8\r\n",
    "Content-Transfer-Encoding: 8bit\r\n",
    "\r\n",
    "Grüße\r\n",
    "--inner\r\n",
    "Content-Type: text/html; charset=\"iso-8859-1\"\r\n",
    "Content-Transfer-Encoding: quoted-printable\r\n",
    "\r\n",
    "<p>Gr=FC=DFe</p>\r\n",
    "--inner--\r\n",
    "--outer\r\n",
    "Content-Type: application/pdf; name=\"=?utf-8?q?r=C3=A9sum=C3=A9.pdf?=\"\r\n",
    "Content-Disposition: attachment; filename*=utf-8''%E2%82%AC%20rates.pdf\r\n",
    "Content-Transfer-Encoding: base64\r\n",
    "Content-ID: <pdf1@x.test>\r\n",
    "Content-Description: the rates\r\n",
    "Content-Language: en, de\r\n",
    "\r\n",
    "JVBERi0xLjQK\r\n",
    "--outer\r\n",
    "Content-Type: message/rfc822\r\n",
    "\r\n",
    "From: inner@x.test\r\n",
    "Subject: forwarded\r\n",
    "\r\n",
    "inner body\r\n",
    "two\r\n",
    "--outer\r\n",
    "\r\n",
    "no content type here\r\n",
    "--outer\r\n",
    "Content-Type: application/octet-stream\r\n",
    "Content-Transfer-Encoding: binary\r\n",
    "\r\n",
    "\x01\x02\x03\r\n",
    "--outer--\r\n",
    "epilogue\r\n"
);

#[test]
fn nested_multipart_structure_and_offsets() {
    let raw = MIXED.as_bytes();
    let p = parse(raw);
    let root = &p.body;
    assert_eq!(kind(root), ("MULTIPART".into(), "MIXED".into()));
    assert_eq!(params(root), vec![("BOUNDARY".into(), "outer".into())]);
    assert_eq!(root.parts.len(), 5);

    let alt = &root.parts[0];
    assert_eq!(kind(alt), ("MULTIPART".into(), "ALTERNATIVE".into()));
    assert_eq!(alt.parts.len(), 2);
    let plain = &alt.parts[0];
    assert_eq!(kind(plain), ("TEXT".into(), "PLAIN".into()));
    assert_eq!(params(plain), vec![("CHARSET".into(), "utf-8".into())]);
    assert_eq!(t(&plain.encoding).to_ascii_uppercase(), "8BIT");
    // The CRLF before a boundary belongs to the boundary (RFC 2046 §5.1.1).
    assert_eq!(slice(raw, plain), "Grüße");
    assert_eq!(plain.size, "Grüße".len() as u64);
    assert_eq!(plain.lines, 0);
    assert_eq!(
        t(&raw[plain.header_start as usize..plain.body_start as usize]),
        "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    );
    let html = &alt.parts[1];
    assert_eq!(kind(html), ("TEXT".into(), "HTML".into()));
    assert_eq!(params(html), vec![("CHARSET".into(), "iso-8859-1".into())]);
    assert_eq!(t(&html.encoding).to_ascii_uppercase(), "QUOTED-PRINTABLE");
    assert_eq!(slice(raw, html), "<p>Gr=FC=DFe</p>");

    let pdf = &root.parts[1];
    assert_eq!(kind(pdf), ("APPLICATION".into(), "PDF".into()));
    // RFC 2047 inside a parameter is decoded by the parser; non-ASCII goes out as RFC 2231.
    assert_eq!(
        params(pdf),
        vec![("NAME*".into(), "utf-8''r%C3%A9sum%C3%A9.pdf".into())]
    );
    let disp = pdf.disposition.as_ref().unwrap();
    assert_eq!(t(&disp.kind).to_ascii_lowercase(), "attachment");
    assert_eq!(t(&disp.params[0].name), "filename*");
    assert_eq!(t(&disp.params[0].value), "utf-8''%E2%82%AC%20rates.pdf");
    assert_eq!(s(&pdf.id), Some("<pdf1@x.test>"));
    assert_eq!(s(&pdf.description), Some("the rates"));
    assert_eq!(pdf.language, vec![b"en".to_vec(), b"de".to_vec()]);
    assert_eq!(t(&pdf.encoding).to_ascii_uppercase(), "BASE64");
    assert_eq!(slice(raw, pdf), "JVBERi0xLjQK");
    assert_eq!(pdf.size, 12);
    assert_eq!(pdf.lines, 0, "lines only for TEXT and MESSAGE/RFC822");

    let msg = &root.parts[2];
    assert_eq!(kind(msg), ("MESSAGE".into(), "RFC822".into()));
    assert_eq!(
        slice(raw, msg),
        "From: inner@x.test\r\nSubject: forwarded\r\n\r\ninner body\r\ntwo"
    );
    assert_eq!(msg.lines, 4);
    let env = msg.envelope.as_ref().unwrap();
    assert_eq!(s(&env.subject), Some("forwarded"));
    assert_eq!(s(&env.from[0].mailbox), Some("inner"));
    let inner = msg.message.as_ref().unwrap();
    assert_eq!(kind(inner), ("TEXT".into(), "PLAIN".into()));
    assert_eq!(slice(raw, inner), "inner body\r\ntwo");
    assert_eq!(inner.header_start, msg.body_start);

    let untyped = &root.parts[3];
    assert_eq!(kind(untyped), ("TEXT".into(), "PLAIN".into()));
    assert_eq!(params(untyped), vec![("CHARSET".into(), "US-ASCII".into())]);
    assert_eq!(slice(raw, untyped), "no content type here");

    let bin = &root.parts[4];
    assert_eq!(kind(bin), ("APPLICATION".into(), "OCTET-STREAM".into()));
    assert_eq!(t(&bin.encoding).to_ascii_uppercase(), "BINARY");
    assert_eq!(bin.size, 3);

    // Searchable text includes the decoded text parts and the nested message.
    assert!(p.text.contains("Grüße"), "{}", p.text);
    assert!(p.text.contains("inner body"));
}

#[test]
fn sections_resolve_by_imap_part_numbers() {
    let raw = MIXED.as_bytes();
    let p = parse(raw);
    let total = raw.len() as u64;
    let get = |path: &[u32], k: SectionKind| match section_range(&p.body, total, path, k) {
        SectionRange::Bytes { start, end, .. } => {
            Some(t(&raw[start as usize..end as usize]).to_string())
        }
        SectionRange::Missing => None,
    };
    assert_eq!(get(&[], SectionKind::Full).unwrap(), MIXED);
    assert!(
        get(&[], SectionKind::Header)
            .unwrap()
            .ends_with("boundary=\"outer\"\r\n\r\n")
    );
    assert!(get(&[], SectionKind::Text).unwrap().starts_with("preamble"));
    assert_eq!(get(&[1, 1], SectionKind::Full).unwrap(), "Grüße");
    assert_eq!(get(&[1, 2], SectionKind::Full).unwrap(), "<p>Gr=FC=DFe</p>");
    assert!(
        get(&[1, 2], SectionKind::Mime)
            .unwrap()
            .starts_with("Content-Type: text/html")
    );
    assert_eq!(get(&[2], SectionKind::Full).unwrap(), "JVBERi0xLjQK");
    assert_eq!(
        get(&[3, 1], SectionKind::Full).unwrap(),
        "inner body\r\ntwo"
    );
    assert_eq!(
        get(&[3], SectionKind::Header).unwrap(),
        "From: inner@x.test\r\nSubject: forwarded\r\n\r\n"
    );
    assert_eq!(get(&[3], SectionKind::Text).unwrap(), "inner body\r\ntwo");
    assert_eq!(get(&[6], SectionKind::Full), None);
    assert_eq!(get(&[2, 1], SectionKind::Full), None);
    assert_eq!(
        get(&[2], SectionKind::Header),
        None,
        "HEADER only for MESSAGE/RFC822"
    );
    assert_eq!(get(&[0], SectionKind::Full), None);

    // A single-part message has exactly part 1: its body.
    let single = b"Subject: x\r\n\r\nhello\r\n";
    let ps = parse(single);
    let r = section_range(&ps.body, single.len() as u64, &[1], SectionKind::Full);
    assert!(
        matches!(
            r,
            SectionRange::Bytes {
                start: 14,
                end: 21,
                ..
            }
        ),
        "{r:?}"
    );
    assert_eq!(
        section_range(&ps.body, 21, &[2], SectionKind::Full),
        SectionRange::Missing
    );
}

#[test]
fn broken_content_type_falls_back_to_text_plain() {
    let raw = b"Content-Type: garbage\r\n\r\nsome text\r\n";
    let b = parse(raw).body;
    assert_eq!(kind(&b), ("TEXT".into(), "PLAIN".into()));
    assert_eq!(params(&b), vec![("CHARSET".into(), "US-ASCII".into())]);
    assert_eq!(slice(raw, &b), "some text\r\n");
}

#[test]
fn digest_parts_default_to_message_rfc822() {
    let raw = concat!(
        "Content-Type: multipart/digest; boundary=d\r\n",
        "\r\n",
        "--d\r\n",
        "\r\n",
        "Subject: one\r\n",
        "\r\n",
        "first\r\n",
        "--d--\r\n"
    )
    .as_bytes();
    let b = parse(raw).body;
    assert_eq!(kind(&b), ("MULTIPART".into(), "DIGEST".into()));
    assert_eq!(kind(&b.parts[0]), ("MESSAGE".into(), "RFC822".into()));
}

#[test]
fn unterminated_multipart_and_garbage_never_panic() {
    let cases: Vec<&[u8]> = vec![
        b"",
        b"\r\n",
        b"no header at all",
        b"Content-Type: multipart/mixed; boundary=x\r\n\r\n--x\r\nContent-Type: text/plain\r\n\r\nunterminated",
        b"Content-Type: multipart/mixed\r\n\r\nno boundary parameter\r\n",
        b"Content-Type: message/rfc822\r\n\r\n",
        b"Content-Type: text/plain; charset=\"unterminated\r\n\r\nbody",
        b"\xff\xfe\x00binary\x00\r\n\r\n\x00\x01",
        b"Subject: x\nFrom: bare-lf@x.test\n\nbare LF body\n",
    ];
    for raw in cases {
        let p = parse(raw);
        assert!(p.body.body_end as usize <= raw.len());
        assert!(p.body.body_start <= p.body.body_end);
        fn check(b: &BodyPart, len: u64) {
            assert!(
                b.header_start <= b.body_start && b.body_start <= b.body_end && b.body_end <= len
            );
            b.parts.iter().for_each(|c| check(c, len));
            if let Some(m) = &b.message {
                check(m, len);
            }
        }
        check(&p.body, raw.len() as u64);
    }
}

#[test]
fn bare_lf_message_offsets() {
    let raw = b"Subject: x\nFrom: a@b.test\n\nbody line\n";
    let p = parse(raw);
    assert_eq!(s(&p.envelope.subject), Some("x"));
    assert_eq!(slice(raw, &p.body), "body line\n");
    assert_eq!(p.body.lines, 1);
}

#[test]
fn header_fields_filter_and_crlf() {
    let block = b"Subject: a\r\nX-Long: one\r\n two\r\nFrom: f@x\r\n\r\n";
    let only = filter_header_fields(block, &["subject".into(), "X-LONG".into()], true);
    assert_eq!(t(&only), "Subject: a\r\nX-Long: one\r\n two\r\n\r\n");
    let not = filter_header_fields(block, &["subject".into()], false);
    assert_eq!(t(&not), "X-Long: one\r\n two\r\nFrom: f@x\r\n\r\n");
    assert_eq!(to_crlf(b"a\nb\r\nc\n"), b"a\r\nb\r\nc\r\n");
    assert_eq!(
        decode_transfer(b"BASE64", b"aGVsbG8=\r\n").unwrap(),
        b"hello"
    );
    assert_eq!(
        decode_transfer(b"quoted-printable", b"caf=C3=A9").unwrap(),
        "café".as_bytes()
    );
}

#[test]
fn encoded_message_rfc822_points_at_its_container() {
    let raw = concat!(
        "Content-Type: multipart/mixed; boundary=b\r\n",
        "\r\n",
        "--b\r\n",
        "Content-Type: message/rfc822\r\n",
        "Content-Transfer-Encoding: base64\r\n",
        "\r\n",
        "U3ViamVjdDogaW5uZXIKCmhlbGxvCg==\r\n",
        "--b--\r\n"
    )
    .as_bytes();
    let b = parse(raw).body;
    let m = &b.parts[0];
    assert_eq!(kind(m), ("MESSAGE".into(), "RFC822".into()));
    let inner = m.message.as_ref().expect("described");
    assert!(inner.body_start >= m.body_start && inner.body_end <= m.body_end);
}

/// Every offset in the tree is ordered (header ≤ body ≤ end) and inside the message.
fn assert_ranges_within(p: &BodyPart, total: u64) {
    assert!(
        p.header_start <= p.body_start && p.body_start <= p.body_end && p.body_end <= total,
        "range {}..{}..{} outside 0..{total}",
        p.header_start,
        p.body_start,
        p.body_end
    );
    // (`size` is not checked: a part inside an encoded message/rfc822 reports its decoded
    // size while its offsets point at the container's body.)
    for c in &p.parts {
        assert_ranges_within(c, total);
    }
    if let Some(m) = &p.message {
        assert_ranges_within(m, total);
    }
}

/// Resolves every section (up to depth 3, every kind) and checks the range is in the message.
fn assert_sections_within(root: &BodyPart, total: u64) {
    let kinds = [
        SectionKind::Full,
        SectionKind::Header,
        SectionKind::HeaderFields,
        SectionKind::Text,
        SectionKind::Mime,
    ];
    let mut paths: Vec<Vec<u32>> = vec![vec![]];
    for a in 1..=3 {
        paths.push(vec![a]);
        for b in 1..=3 {
            paths.push(vec![a, b]);
            for c in 1..=2 {
                paths.push(vec![a, b, c]);
            }
        }
    }
    for path in &paths {
        for k in kinds {
            if let SectionRange::Bytes { start, end, .. } = section_range(root, total, path, k) {
                assert!(
                    start <= end && end <= total,
                    "{path:?} {k:?}: {start}..{end}"
                );
            }
        }
    }
}

fn check(raw: &[u8]) {
    let p = parse(raw);
    assert_ranges_within(&p.body, raw.len() as u64);
    assert_sections_within(&p.body, raw.len() as u64);
}

#[test]
fn nested_body_past_container_end_does_not_panic() {
    // A message/rfc822 part whose encapsulated header never ends before the boundary: the
    // nested parse starts its body beyond the container's body end.
    let crafted: &[&[u8]] = &[
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: message/rfc822\r\n\r\nSubject: x\r\nX: y\r\n--b--\r\n\r\nafter\r\n",
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: message/rfc822\r\n\r\nSubject: x\r\n--b\r\n\r\n--b--\r\nZ: 1\r\n\r\nbody\r\n",
        b"Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: message/rfc822\n\nContent-Type: multipart/mixed; boundary=c\n--b--\n\n--c\n\ninner\n--c--\n",
        b"Content-Type: message/rfc822\r\n\r\nSubject: x",
        b"Content-Type: message/rfc822\r\n\r\n",
    ];
    for raw in crafted {
        check(raw);
    }
}

/// xorshift64*: a fixed seed keeps the run reproducible without a PRNG dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

#[test]
fn random_and_mutated_mime_never_panics_and_stays_in_range() {
    let seeds: &[&[u8]] = &[
        b"From: a@b\r\nSubject: s\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\npre\r\n--b\r\nContent-Type: text/plain\r\n\r\nhello\r\n--b\r\nContent-Type: message/rfc822\r\n\r\nSubject: inner\r\nContent-Type: multipart/alternative; boundary=c\r\n\r\n--c\r\n\r\none\r\n--c\r\nContent-Type: text/html\r\n\r\n<b>two</b>\r\n--c--\r\n--b\r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\nU3ViamVjdDogZW5jCgpib2R5Cg==\r\n--b--\r\nepilogue\r\n",
        b"Content-Type: multipart/digest; boundary=d\n\n--d\n\nSubject: one\n\nbody\n--d\n\nSubject: two\n\n--d--\n",
        b"Subject: plain\r\n\r\nline\r\nline\r\n",
    ];
    let tokens: &[&[u8]] = &[
        b"\r\n",
        b"\n",
        b"\r\n\r\n",
        b"--b\r\n",
        b"--b--\r\n",
        b"--c\r\n",
        b"Content-Type: message/rfc822\r\n",
        b"Content-Type: multipart/mixed; boundary=b\r\n",
        b"Content-Transfer-Encoding: quoted-printable\r\n",
        b"Content-Transfer-Encoding: base64\r\n",
        b":",
        b"=?utf-8?q?x?=",
    ];
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for _ in 0..3000 {
        let mut m = seeds[rng.below(seeds.len())].to_vec();
        for _ in 0..1 + rng.below(8) {
            let at = rng.below(m.len() + 1);
            match rng.below(5) {
                0 => {
                    let t = tokens[rng.below(tokens.len())];
                    m.splice(at..at, t.iter().copied());
                }
                1 => {
                    let end = (at + rng.below(32)).min(m.len());
                    m.drain(at..end);
                }
                2 if at < m.len() => m[at] = rng.next() as u8,
                3 => m.truncate(at),
                _ => {
                    // Splice a random slice of the message into itself (nesting, repeats).
                    let s = rng.below(m.len() + 1);
                    let e = (s + rng.below(64)).min(m.len());
                    let piece = m[s..e].to_vec();
                    m.splice(at..at, piece);
                }
            }
        }
        check(&m);
    }
    // Pure noise as well.
    let alphabet = b"-\r\n:b=;\" aZ";
    for _ in 0..500 {
        let len = rng.below(256);
        let m: Vec<u8> = (0..len)
            .map(|_| alphabet[rng.below(alphabet.len())])
            .collect();
        check(&m);
    }
}

#[test]
fn parser_panic_on_crafted_nesting_gives_a_flat_body() {
    // Found by `cargo fuzz run mime`: mail-parser itself panics on this input.
    let raw: &[u8] = b"From: a@b\x0d\x0aContent-Type: multipart/mixed; boundary=b\x0d\x0a\x0d\x0a--b\x0d\x0aContent-Type: text/plain\x0d\x0a\x0d\x0ahi\x0d\x0a--b\x0d\x0aContent-Type: message/rfc822\x0d\x0a\x0d\x0aSubject: in\x0d\x0aContent-TypOntent-Type: message/rfc822-b\x0d\x0aContent-Type: message/rfc822\x0d\x0a\x0d\x0aSubject: in\x0d\x0aContent-TypOnte\x0d\x0arfcy=bt-Transre-Efncoding: base64\x0d\x0a\x0d\x0aU3ViamVjdDogZW5jCgpib2R5Cg==\x0d\x0a--b--\x0d\x0a";
    let p = parse(raw);
    assert_eq!(t(&p.body.media_type), "TEXT");
    assert!(p.body.parts.is_empty());
    check(raw);
}

/// `levels` nested containers, alternating multipart/mixed (even levels) and message/rfc822
/// (odd levels), around one text part. Also used (as a copy) by the end-to-end C1 tests.
fn deep_nested(levels: usize) -> Vec<u8> {
    let mut m = b"From: a@b.test\r\nSubject: deep\r\n".to_vec();
    for i in 0..levels {
        if i % 2 == 0 {
            m.extend_from_slice(
                format!("Content-Type: multipart/mixed; boundary=\"b{i}\"\r\n\r\n--b{i}\r\n")
                    .as_bytes(),
            );
        } else {
            m.extend_from_slice(b"Content-Type: message/rfc822\r\n\r\n");
        }
    }
    m.extend_from_slice(b"Content-Type: text/plain\r\n\r\ninnermost\r\n");
    for i in (0..levels).rev() {
        if i % 2 == 0 {
            m.extend_from_slice(format!("--b{i}--\r\n").as_bytes());
        }
    }
    m
}

#[test]
fn c1_deeply_nested_mime_parse_is_depth_bounded_at_100k_levels() {
    use prost::Message as _;
    let raw = deep_nested(100_000);
    // On the caller's (test thread's) stack: the fix must not depend on the big stack for
    // unencoded nesting.
    let p = parse(&raw);
    let depth = structure_depth(&p.body);
    assert_eq!(depth, MAX_MIME_DEPTH, "cut exactly at the limit");
    // Every part's offsets are inside the message and ordered; the opaque leaf at the bottom
    // covers the rest of the nesting, raw.
    let mut stack = vec![&p.body];
    let mut leaf = None;
    while let Some(b) = stack.pop() {
        assert!(b.header_start <= b.body_start && b.body_start <= b.body_end);
        assert!(b.body_end <= raw.len() as u64);
        stack.extend(b.parts.iter());
        stack.extend(b.message.as_deref());
        if b.parts.is_empty() && b.message.is_none() {
            leaf = Some(b);
        }
    }
    let leaf = leaf.expect("a leaf");
    assert_eq!(kind(leaf), ("APPLICATION".into(), "OCTET-STREAM".into()));
    let cut = &raw[leaf.body_start as usize..leaf.body_end as usize];
    assert!(
        cut.windows(9).any(|w| w == b"innermost"),
        "the deep content is inside the leaf"
    );
    // BODY[1] of the top multipart is the nested message, sliced from the raw bytes.
    match section_range(&p.body, raw.len() as u64, &[1], SectionKind::Full) {
        SectionRange::Bytes { start, end, .. } => {
            assert!(
                raw[start as usize..end as usize]
                    .starts_with(b"Content-Type: multipart/mixed; boundary=\"b2\"")
            )
        }
        SectionRange::Missing => panic!("BODY[1] missing"),
    }
    // The structure survives prost (whose decode recursion limit is 100).
    let bytes = p.body.encode_to_vec();
    let back = BodyPart::decode(bytes.as_slice()).expect("decodes");
    assert_eq!(back, p.body);
    assert!(p.text.is_empty() || p.text.contains("innermost"));
}

#[test]
fn c1_deeply_nested_message_rfc822_only_is_depth_bounded() {
    let mut raw = b"From: a@b.test\r\n".to_vec();
    for _ in 0..100_000 {
        raw.extend_from_slice(b"Content-Type: message/rfc822\r\n\r\n");
    }
    raw.extend_from_slice(b"Subject: inner\r\n\r\nhello\r\n");
    let p = parse(&raw);
    assert!(structure_depth(&p.body) <= MAX_MIME_DEPTH);
    assert_eq!(p.body.body_end, raw.len() as u64);
}

#[test]
fn c1_nesting_within_the_limit_is_described_fully() {
    let raw = deep_nested(MAX_MIME_DEPTH - 2);
    let p = parse(&raw);
    assert_eq!(structure_depth(&p.body), MAX_MIME_DEPTH - 1);
    assert!(p.text.contains("innermost"));
}

/// On the threads production parses with (`crate::parse_pool`), whose stacks this needs.
#[tokio::test]
async fn c1_base64_wrapped_deep_nesting_parses_on_the_big_stack() {
    use base64::Engine;
    let inner = deep_nested(20_000);
    let mut raw = b"From: a@b.test\r\nContent-Type: multipart/mixed; boundary=\"top\"\r\n\r\n--top\r\nContent-Type: message/rfc822\r\nContent-Transfer-Encoding: base64\r\n\r\n".to_vec();
    let b64 = base64::engine::general_purpose::STANDARD.encode(&inner);
    for line in b64.as_bytes().chunks(76) {
        raw.extend_from_slice(line);
        raw.extend_from_slice(b"\r\n");
    }
    raw.extend_from_slice(b"--top--\r\n");
    let p = crate::parse_pool::parse(raw.clone()).await.expect("parsed");
    assert!(structure_depth(&p.body) <= MAX_MIME_DEPTH);
    assert!(p.body.body_end <= raw.len() as u64);
}

#[test]
fn c1_part_ids_shared_between_multiparts_are_described_once() {
    // Found by fuzz/mime: mail-parser lists the same part under several multiparts of this
    // 4 KB message, and describing each listing again grew exponentially with the depth.
    for raw in [
        &include_bytes!("../../fuzz/seeds/shared_part_ids_oom.eml")[..],
        &include_bytes!("../../fuzz/seeds/shared_part_ids_slow.eml")[..],
    ] {
        let p = parse(raw);
        let mut nodes = 0;
        let mut stack = vec![&p.body];
        while let Some(b) = stack.pop() {
            nodes += 1;
            stack.extend(b.parts.iter());
            stack.extend(b.message.as_deref());
        }
        // At most one node per MIME header (plus an empty placeholder or two): a
        // structure larger than the message cannot be honest.
        assert!(
            nodes <= raw.len() / 8,
            "{nodes} nodes for {} bytes",
            raw.len()
        );
        assert!(structure_depth(&p.body) <= MAX_MIME_DEPTH);
    }
}

#[test]
fn html_text_reads_as_shown() {
    assert_eq!(
        super::strip_html("<b>Zebra</b> crossing,\r\n  <i>now</i>&nbsp;&amp; <br>then"),
        " Zebra crossing, now & then"
    );
    assert_eq!(super::strip_html("a<p>b"), "a b");
}

#[test]
fn multipart_without_any_delimiter_has_one_empty_text_part() {
    // RFC 9051 body-type-mpart needs at least one part: answer one empty text/plain part.
    let raw = b"Content-Type: multipart/mixed; boundary=xyz\r\n\r\nno delimiter here\r\n";
    let b = parse(raw).body;
    assert_eq!(kind(&b), ("MULTIPART".into(), "MIXED".into()));
    assert_eq!(b.parts.len(), 1);
    let p = &b.parts[0];
    assert_eq!(kind(p), ("TEXT".into(), "PLAIN".into()));
    assert_eq!(params(p), vec![("CHARSET".into(), "US-ASCII".into())]);
    assert_eq!(t(&p.encoding), "7BIT");
    assert_eq!((p.size, p.lines), (0, 0));
    // Sections stay valid: part 1 is empty, the whole body is still the multipart's.
    assert_eq!(slice(raw, p), "");
    assert_eq!(slice(raw, &b), "no delimiter here\r\n");
}

#[test]
fn repeated_address_fields_keep_every_address() {
    let raw = concat!(
        "From: a@b.test\r\n",
        "To: t1@x.test\r\n",
        "Cc: one@x.test\r\n",
        "Cc: two@x.test, three@x.test\r\n",
        "To: t2@x.test\r\n",
        "\r\n",
        "body\r\n"
    )
    .as_bytes();
    let e = parse(raw).envelope;
    let boxes = |l: &[EnvelopeAddress]| -> Vec<String> {
        l.iter()
            .map(|a| format!("{}@{}", s(&a.mailbox).unwrap(), s(&a.host).unwrap()))
            .collect()
    };
    assert_eq!(boxes(&e.to), ["t1@x.test", "t2@x.test"]);
    assert_eq!(boxes(&e.cc), ["one@x.test", "two@x.test", "three@x.test"]);
    assert_eq!(boxes(&e.from), ["a@b.test"]);
}

#[test]
fn rfc2231_parameters_are_passed_through_as_sent() {
    // RFC 2231 §4 example; RFC 3501 §7.4.2: the parameters as they are in the header.
    let raw = concat!(
        "Content-Type: application/x-stuff;\r\n",
        " title*=us-ascii'en-us'This%20is%20%2A%2A%2Afun%2A%2A%2A; name=\"a \\\"q\\\" b\"\r\n",
        "Content-Disposition: attachment; filename*0*=us-ascii'en'caf; filename*1=e.txt\r\n",
        "\r\n",
        "x\r\n"
    )
    .as_bytes();
    let b = parse(raw).body;
    assert_eq!(
        params(&b),
        vec![
            (
                "TITLE*".into(),
                "us-ascii'en-us'This%20is%20%2A%2A%2Afun%2A%2A%2A".into()
            ),
            ("NAME".into(), "a \"q\" b".into()),
        ]
    );
    let d = b.disposition.as_ref().unwrap();
    assert_eq!(t(&d.kind).to_ascii_lowercase(), "attachment");
    let dp: Vec<(&str, &str)> = d.params.iter().map(|p| (t(&p.name), t(&p.value))).collect();
    assert_eq!(
        dp,
        [("filename*0*", "us-ascii'en'caf"), ("filename*1", "e.txt")]
    );
    // Without RFC 2231 syntax nothing changes: plain parameters as before.
    let plain = parse(b"Content-Type: text/plain; charset=utf-8; format=flowed\r\n\r\nx\r\n").body;
    assert_eq!(
        params(&plain),
        vec![
            ("CHARSET".into(), "utf-8".into()),
            ("FORMAT".into(), "flowed".into())
        ]
    );
}

#[test]
fn a_non_header_line_ends_the_header_and_starts_the_body() {
    // No empty line: the first line that is neither a field nor a continuation is body.
    let raw = b"From: a@b.test\r\nSubject: s\r\n folded\r\nthis is not a header\r\nmore\r\n";
    let p = parse(raw);
    assert_eq!(slice(raw, &p.body), "this is not a header\r\nmore\r\n");
    assert_eq!((p.body.size, p.body.lines), (28, 2));
    assert_eq!(s(&p.envelope.subject), Some("s folded"));
    assert_eq!(header_end(raw), 37);
    // A field name with a space inside is not a field either; white space before the colon
    // (RFC 5322 obsolete syntax) is.
    assert_eq!(header_end(b"Subject : x\r\nBad Name: y\r\n"), 13);
    assert_eq!(header_end(b"Subject: x\r\n\r\nbody"), 12);
    assert_eq!(header_end(b"Subject: x\r\n"), 12);
    assert_eq!(header_end(b"\r\nbody"), 0);
    assert_eq!(header_end(b"just text\r\n"), 0);
}

/// ENVELOPE address lists as imaptest's fetch-envelope expects them (RFC 9051 §7.5.2: a group
/// is a start marker with the group name as mailbox and NIL host, its members, and an end
/// marker of four NILs; an obsolete route is the adl).
#[test]
fn groups_comments_and_routes_in_envelope() {
    let raw = concat!(
        "From: <@route:user@domain>\r\n",
        "To: group: g1@d1.org, g2@d2.org;, group2: g3@d3.org;\r\n",
        "Cc: group:;, group2: (foo) ;\r\n",
        "\r\n",
        "body\r\n"
    )
    .as_bytes();
    let e = parse(raw).envelope;
    let show = |l: &[EnvelopeAddress]| -> Vec<String> {
        l.iter()
            .map(|a| {
                format!(
                    "{:?} {:?} {:?} {:?}",
                    s(&a.name),
                    s(&a.adl),
                    s(&a.mailbox),
                    s(&a.host)
                )
            })
            .collect()
    };
    let group = |n: &str| format!("None None Some({n:?}) None");
    let addr = |m: &str, h: &str| format!("None None Some({m:?}) Some({h:?})");
    let end = "None None None None".to_string();
    assert_eq!(
        show(&e.to),
        [
            group("group"),
            addr("g1", "d1.org"),
            addr("g2", "d2.org"),
            end.clone(),
            group("group2"),
            addr("g3", "d3.org"),
            end.clone()
        ]
    );
    assert_eq!(
        show(&e.cc),
        [group("group"), end.clone(), group("group2"), end]
    );
    assert_eq!(
        show(&e.from),
        [r#"None Some("@route") Some("user") Some("domain")"#]
    );
}

/// SEARCH TO/CC match the stored header text: a group's name must be in it.
#[test]
fn group_names_are_in_the_searchable_header_text() {
    let raw = concat!(
        "To: groupname: groupuser1@domain.org, groupuser2@domain.org;,\r\n",
        "  groupname2: groupuser3@domain.org;\r\n",
        "Cc: empty:;\r\n",
        "\r\n",
        "body\r\n"
    )
    .as_bytes();
    let headers = parse(raw).headers;
    let text = |n: &str| {
        headers
            .iter()
            .find(|(k, _)| k == n)
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    let to = text("to");
    for needle in [
        "groupname:",
        "groupname2:",
        "groupuser1@domain.org",
        "groupuser3@domain.org",
    ] {
        assert!(to.contains(needle), "{needle} in {to:?}");
    }
    assert!(text("cc").contains("empty:"), "{:?}", text("cc"));
}
