//! RFC 5256 SORT and RFC 5957 SORT=DISPLAY: the sort keys of a message (base subject, sent
//! date, address keys) and the ordering itself. Pure, table-tested; the session gathers the
//! metadata (ENVELOPE, size, internal date) and calls [`sort`].
//!
//! ENVELOPE strings from the store are raw header values (RFC 2047 words still encoded), so
//! the decoding happens here.

use std::cmp::Ordering;

use base64::Engine;
use mailsuite_proto as pb;

/// One sort key of a SORT command; `reverse` is kept beside it by the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    Arrival,
    Cc,
    Date,
    From,
    Size,
    Subject,
    To,
    DisplayFrom,
    DisplayTo,
}

/// What the sort keys of one message are made of.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SortMsg {
    /// The number reported (sequence number or UID); ascending = mailbox order.
    pub num: u32,
    pub size: u64,
    /// INTERNALDATE, seconds since the epoch.
    pub arrival: i64,
    /// Sent date (UTC seconds), the internal date when the Date header is missing or bad.
    pub date: i64,
    /// Base subject (RFC 5256 §2.1), upper-cased for comparison (as Dovecot does: `[` and `_` sort after letters).
    pub subject: String,
    pub from: String,
    pub to: String,
    pub cc: String,
    pub display_from: String,
    pub display_to: String,
}

impl SortMsg {
    /// The keys of a message from its ENVELOPE (absent: every key empty).
    pub fn new(num: u32, size: u64, arrival: i64, env: Option<&pb::Envelope>) -> SortMsg {
        let empty = pb::Envelope::default();
        let env = env.unwrap_or(&empty);
        SortMsg {
            num,
            size,
            arrival,
            date: env.date.as_deref().and_then(parse_date).unwrap_or(arrival),
            subject: env
                .subject
                .as_deref()
                .map(|s| base_subject(s).0)
                .unwrap_or_default(),
            from: addr_key(&env.from),
            to: addr_key(&env.to),
            cc: addr_key(&env.cc),
            display_from: display_key(&env.from),
            display_to: display_key(&env.to),
        }
    }
}

/// Sort `msgs` by the criteria, ties broken by ascending `num` (RFC 5256 §3). Returns the
/// numbers in the resulting order.
pub fn sort(mut msgs: Vec<SortMsg>, criteria: &[(Key, bool)]) -> Vec<u32> {
    msgs.sort_by(|a, b| {
        for (k, reverse) in criteria {
            let o = compare(a, b, *k);
            let o = if *reverse { o.reverse() } else { o };
            if o != Ordering::Equal {
                return o;
            }
        }
        a.num.cmp(&b.num)
    });
    msgs.into_iter().map(|m| m.num).collect()
}

fn compare(a: &SortMsg, b: &SortMsg, k: Key) -> Ordering {
    match k {
        Key::Arrival => a.arrival.cmp(&b.arrival),
        Key::Date => a.date.cmp(&b.date),
        Key::Size => a.size.cmp(&b.size),
        Key::Subject => a.subject.cmp(&b.subject),
        Key::From => a.from.cmp(&b.from),
        Key::To => a.to.cmp(&b.to),
        Key::Cc => a.cc.cmp(&b.cc),
        Key::DisplayFrom => a.display_from.cmp(&b.display_from),
        Key::DisplayTo => a.display_to.cmp(&b.display_to),
    }
}

/// The FROM/TO/CC key: the mailbox (local part) of the first address, case-folded. A group's
/// first "address" is its name (as Dovecot sorts it).
pub fn addr_key(addrs: &[pb::EnvelopeAddress]) -> String {
    addrs
        .first()
        .and_then(|a| a.mailbox.as_deref())
        .map(|m| decode_2047(m).to_uppercase())
        .unwrap_or_default()
}

/// The DISPLAYFROM/DISPLAYTO key (RFC 5957): the decoded display name of the first address
/// when it is not empty, else its `mailbox@host` (a group: its name; no host: the mailbox
/// alone, as Dovecot sorts them), case-folded.
pub fn display_key(addrs: &[pb::EnvelopeAddress]) -> String {
    let Some(a) = addrs.first() else {
        return String::new();
    };
    let name = a.name.as_deref().map(decode_2047).unwrap_or_default();
    let name = name.trim();
    if !name.is_empty() {
        return name.to_uppercase();
    }
    let mut s = a
        .mailbox
        .as_deref()
        .map(|m| String::from_utf8_lossy(m).into_owned())
        .unwrap_or_default();
    if let Some(h) = a.host.as_deref() {
        s.push('@');
        s.push_str(&String::from_utf8_lossy(h));
    }
    s.to_uppercase()
}

/// Parse an RFC 5322 date (obsolete forms and a trailing comment tolerated) to UTC seconds.
pub fn parse_date(raw: &[u8]) -> Option<i64> {
    let s = String::from_utf8_lossy(raw);
    let mut s = s.trim().to_string();
    // Trailing comments such as "(PST)".
    while s.ends_with(')') {
        let open = s.rfind('(')?;
        s.truncate(open);
        s = s.trim_end().to_string();
    }
    chrono::DateTime::parse_from_rfc2822(&s)
        .ok()
        .map(|d| d.timestamp())
}

/// Decode RFC 2047 encoded words to UTF-8 (undecodable words stay as written; whitespace
/// between adjacent encoded words is dropped).
pub fn decode_2047(raw: &[u8]) -> String {
    let s = String::from_utf8_lossy(raw);
    let mut out = String::new();
    let mut pending_ws = String::new();
    let mut last_was_word = false;
    let mut rest: &str = &s;
    while !rest.is_empty() {
        if rest.starts_with("=?")
            && let Some((text, len)) = encoded_word(rest)
        {
            if !last_was_word {
                out.push_str(&pending_ws);
            }
            pending_ws.clear();
            out.push_str(&text);
            last_was_word = true;
            rest = &rest[len..];
            continue;
        }
        let c = rest.chars().next().expect("non-empty");
        if c == ' ' || c == '\t' || c == '\r' || c == '\n' {
            pending_ws.push(c);
        } else {
            out.push_str(&pending_ws);
            pending_ws.clear();
            out.push(c);
            last_was_word = false;
        }
        rest = &rest[c.len_utf8()..];
    }
    out.push_str(&pending_ws);
    out
}

/// One encoded word at the start of `s`: its text and its length in `s`.
fn encoded_word(s: &str) -> Option<(String, usize)> {
    let body = &s[2..];
    let q1 = body.find('?')?;
    let charset = &body[..q1];
    let rest = &body[q1 + 1..];
    let q2 = rest.find('?')?;
    let enc = &rest[..q2];
    let data_all = &rest[q2 + 1..];
    let end = data_all.find("?=")?;
    let data = &data_all[..end];
    if data.contains(' ') || charset.is_empty() {
        return None;
    }
    let bytes = match enc {
        "B" | "b" => base64::engine::general_purpose::STANDARD
            .decode(data.trim_end_matches('='))
            .or_else(|_| base64::engine::general_purpose::STANDARD.decode(data))
            .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(data))
            .ok()?,
        "Q" | "q" => {
            let mut v = Vec::new();
            let b = data.as_bytes();
            let mut i = 0;
            while i < b.len() {
                match b[i] {
                    b'_' => v.push(b' '),
                    b'=' if i + 2 < b.len() => {
                        let h = std::str::from_utf8(&b[i + 1..i + 3]).ok()?;
                        v.push(u8::from_str_radix(h, 16).ok()?);
                        i += 2;
                    }
                    c => v.push(c),
                }
                i += 1;
            }
            v
        }
        _ => return None,
    };
    // RFC 2231 language suffix: charset*lang.
    let charset = charset.split('*').next().unwrap_or(charset);
    let text = match charset.to_ascii_lowercase().as_str() {
        "utf-8" | "utf8" | "us-ascii" => String::from_utf8_lossy(&bytes).into_owned(),
        "iso-8859-1" | "latin1" | "iso8859-1" | "windows-1252" => {
            bytes.iter().map(|b| *b as char).collect()
        }
        _ => return None,
    };
    Some((text, 2 + q1 + 1 + q2 + 1 + end + 2))
}

/// RFC 5256 §2.1 base subject, case-folded, and whether the subject marked a reply or a
/// forward (`Re:`, `Fwd:`, `(fwd)`, `[fwd: ...]`), as the REFERENCES algorithm needs.
pub fn base_subject(raw: &[u8]) -> (String, bool) {
    // (1) decode, whitespace to single spaces.
    let decoded = decode_2047(raw);
    let mut s = String::with_capacity(decoded.len());
    for c in decoded.chars() {
        let c = if c.is_whitespace() { ' ' } else { c };
        if c == ' ' && s.ends_with(' ') {
            continue;
        }
        s.push(c);
    }
    let mut reply = false;
    loop {
        // (2) trailing "(fwd)" and whitespace.
        loop {
            let t = s.trim_end_matches(' ');
            let lower = t.to_ascii_lowercase();
            if lower.ends_with("(fwd)") {
                s = t[..t.len() - 5].to_string();
                reply = true;
            } else {
                s = t.to_string();
                break;
            }
        }
        // (3)-(5) leaders and blobs.
        loop {
            let mut changed = false;
            // (3) subj-leader: *subj-blob subj-refwd, or WSP.
            loop {
                if let Some(r) = s.strip_prefix(' ') {
                    s = r.to_string();
                    changed = true;
                    continue;
                }
                if let Some(n) = refwd_leader(&s) {
                    s = s[n..].to_string();
                    reply = true;
                    changed = true;
                    continue;
                }
                break;
            }
            // (4) a leading blob, when something remains after it.
            if let Some(n) = blob(&s, 0)
                && n < s.len()
            {
                s = s[n..].to_string();
                changed = true;
            }
            if !changed {
                break;
            }
        }
        // (6) [fwd: ...]
        let lower = s.to_ascii_lowercase();
        if lower.starts_with("[fwd:") && s.ends_with(']') {
            s = s[5..s.len() - 1].to_string();
            reply = true;
            continue;
        }
        break;
    }
    (s.to_uppercase(), reply)
}

/// `subj-blob = "[" *BLOBCHAR "]" *WSP` at `at`: the end offset.
fn blob(s: &str, at: usize) -> Option<usize> {
    let b = s.as_bytes();
    if b.get(at) != Some(&b'[') {
        return None;
    }
    let mut i = at + 1;
    while i < b.len() && b[i] != b']' {
        if b[i] == b'[' {
            return None;
        }
        i += 1;
    }
    if i >= b.len() {
        return None;
    }
    i += 1;
    while i < b.len() && b[i] == b' ' {
        i += 1;
    }
    Some(i)
}

/// `*subj-blob subj-refwd` at the start: its length.
/// `subj-refwd = ("re" / ("fw" ["d"])) *WSP [subj-blob] ":"`.
fn refwd_leader(s: &str) -> Option<usize> {
    let b = s.as_bytes();
    let mut i = 0;
    loop {
        if let Some(n) = refwd(s, i) {
            return Some(n);
        }
        match blob(s, i) {
            Some(n) if n > i => i = n,
            _ => return None,
        }
        if i >= b.len() {
            return None;
        }
    }
}

fn refwd(s: &str, at: usize) -> Option<usize> {
    let b = s.as_bytes();
    let lower = |i: usize| b.get(i).map(|c| c.to_ascii_lowercase());
    let mut i = at;
    if lower(i) == Some(b'r') && lower(i + 1) == Some(b'e') {
        i += 2;
    } else if lower(i) == Some(b'f') && lower(i + 1) == Some(b'w') {
        i += 2;
        if lower(i) == Some(b'd') {
            i += 1;
        }
    } else {
        return None;
    }
    while b.get(i) == Some(&b' ') {
        i += 1;
    }
    if let Some(n) = blob(s, i) {
        i = n;
    }
    (b.get(i) == Some(&b':')).then_some(i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(name: Option<&str>, mailbox: &str, host: &str) -> pb::EnvelopeAddress {
        pb::EnvelopeAddress {
            name: name.map(|n| n.as_bytes().to_vec()),
            adl: None,
            mailbox: Some(mailbox.as_bytes().to_vec()),
            host: Some(host.as_bytes().to_vec()),
        }
    }

    #[test]
    fn base_subjects() {
        let table: &[(&str, &str, bool)] = &[
            ("Hello", "hello", false),
            ("Re: Hello", "hello", true),
            ("RE:  Re: hello", "hello", true),
            ("Fwd: hello", "hello", true),
            ("fw: hello", "hello", true),
            ("Re[2]: hello", "hello", true),
            ("[list] Re: hello", "hello", true),
            ("[list] hello", "hello", false),
            ("[list]", "[list]", false),
            ("hello (fwd)", "hello", true),
            ("hello (FWD) (fwd)  ", "hello", true),
            ("[Fwd: Re: hello]", "hello", true),
            ("  hello\t  world ", "hello world", false),
            ("=?UTF-8?Q?Gr=C3=BC=C3=9Fe?=", "grüße", false),
            ("Re: =?ISO-8859-1?B?5GJj?=", "äbc", true),
            ("=?utf-8?q?a?= =?utf-8?q?b?= c", "ab c", false),
            ("Re", "re", false),
            ("re: ", "", true),
            ("[a][b] x", "x", false),
        ];
        for (raw, want, reply) in table {
            assert_eq!(
                base_subject(raw.as_bytes()),
                (want.to_uppercase(), *reply),
                "{raw:?}"
            );
        }
    }

    #[test]
    fn dates() {
        let table: &[(&str, Option<i64>)] = &[
            ("Thu, 1 Jan 1970 00:00:10 +0000", Some(10)),
            ("1 Jan 1970 01:00:10 +0100", Some(10)),
            ("Thu, 1 Jan 1970 00:00:10 GMT (UTC)", Some(10)),
            ("garbage", None),
            ("", None),
        ];
        for (raw, want) in table {
            assert_eq!(parse_date(raw.as_bytes()), *want, "{raw:?}");
        }
        let env = pb::Envelope {
            date: Some(b"nonsense".to_vec()),
            ..Default::default()
        };
        assert_eq!(SortMsg::new(1, 0, 99, Some(&env)).date, 99);
    }

    #[test]
    fn address_keys() {
        let group = pb::EnvelopeAddress {
            mailbox: Some(b"undisclosed".to_vec()),
            ..Default::default()
        };
        let table: Vec<(Vec<pb::EnvelopeAddress>, &str, &str)> = vec![
            (vec![], "", ""),
            (vec![addr(Some("Zed"), "Alice", "b.test")], "alice", "zed"),
            (vec![addr(None, "Alice", "B.test")], "alice", "alice@b.test"),
            (vec![addr(Some(" "), "al", "b")], "al", "al@b"),
            (
                vec![addr(Some("=?utf-8?q?=C3=84rger?="), "x", "y")],
                "x",
                "ärger",
            ),
            (
                vec![group, addr(None, "m", "h")],
                "undisclosed",
                "undisclosed",
            ),
        ];
        for (addrs, key, display) in table {
            assert_eq!(addr_key(&addrs), key.to_uppercase(), "{addrs:?}");
            assert_eq!(display_key(&addrs), display.to_uppercase(), "{addrs:?}");
        }
    }

    #[test]
    fn ordering() {
        let m = |num, size, arrival, subject: &str| SortMsg {
            num,
            size,
            arrival,
            date: arrival,
            subject: subject.into(),
            ..Default::default()
        };
        let msgs = vec![m(1, 30, 5, "b"), m(2, 10, 3, "a"), m(3, 30, 4, "b")];
        type Case<'a> = (&'a [(Key, bool)], &'a [u32]);
        let table: &[Case<'_>] = &[
            (&[(Key::Arrival, false)], &[2, 3, 1]),
            (&[(Key::Size, false)], &[2, 1, 3]),
            // Ties keep mailbox order even when reversed.
            (&[(Key::Size, true)], &[1, 3, 2]),
            (&[(Key::Subject, false), (Key::Date, true)], &[2, 1, 3]),
            (&[(Key::To, false)], &[1, 2, 3]),
        ];
        for (criteria, want) in table {
            assert_eq!(sort(msgs.clone(), criteria), *want, "{criteria:?}");
        }
    }
}
