//! MIME → IMAP metadata, computed once at delivery: the ENVELOPE, the BODYSTRUCTURE tree with
//! each part's byte offsets in the raw message, the header fields and decoded text SEARCH
//! needs. Pure functions (no I/O) so gateways and tests can rely on the exact semantics.
//!
//! Field semantics (see common.proto):
//! - ENVELOPE strings are the raw header values (unfolded, RFC 2047 words left encoded as the
//!   IMAP client expects); address names that the parser had to decode are re-encoded with
//!   RFC 2047 when they are not ASCII. Sender and Reply-To default to From (RFC 9051 §7.5.2).
//! - `media_type`/`media_subtype` are as found in the header; absent or unparseable
//!   Content-Type gives "TEXT"/"PLAIN" with charset US-ASCII (RFC 2045 §5.2), except inside
//!   multipart/digest where the default is MESSAGE/RFC822.
//! - Parameters whose decoded value is not ASCII (RFC 2231 or raw 8-bit) are given back in
//!   RFC 2231 form `name*=utf-8''…`, which IMAP clients decode.
//! - `size` is the body's octet count in the raw message and `lines` its LF count.
//! - A message the parser cannot make sense of is described as one flat TEXT/PLAIN body.

use mail_parser::{
    Address, HeaderName, HeaderValue, Message, MessageParser, MessagePart, PartType,
};
use mailsuite_proto::{BodyDisposition, BodyParam, BodyPart, Envelope, EnvelopeAddress};

/// Everything parsed out of one raw message.
#[derive(Debug, Clone, Default)]
pub struct Parsed {
    pub envelope: Envelope,
    pub body: BodyPart,
    /// Top-level header fields: lowercase name, decoded value (for HEADER/FROM/... search).
    pub headers: Vec<(String, String)>,
    /// Decoded text of every text part (for BODY/TEXT search).
    pub text: String,
    /// The Date: header's calendar date in its own zone (SENTBEFORE/SENTON/SENTSINCE).
    pub sent_date: Option<chrono::NaiveDate>,
}

/// Text indexed per message is capped so one huge part cannot blow up the row.
pub const MAX_INDEXED_TEXT: usize = 512 * 1024;

/// Deepest multipart / message/rfc822 nesting described part by part. A part at this depth
/// that has children becomes one opaque APPLICATION/OCTET-STREAM leaf spanning its raw bytes.
/// The bound keeps every recursive walk of the structure (building it here, prost encode and
/// decode, `Drop`, the offset shifts) shallow: prost refuses to decode more than 100 nested
/// messages, and each level here costs one BodyPart level plus at most three below the deepest
/// (envelope → address, disposition → param). No real mail client nests anywhere near 32.
pub const MAX_MIME_DEPTH: usize = 32;

/// Stack of the threads that run `parse` (`crate::parse_pool`). mail-parser builds and drops nested
/// message/rfc822 levels of a base64-encoded message recursively (`into_owned`, `Drop`), which
/// `parse` cannot avoid: this is the defence in depth for that path, and costs only address
/// space until it is touched.
pub const PARSE_STACK_BYTES: usize = 256 * 1024 * 1024;

pub fn parse(raw: &[u8]) -> Parsed {
    let header_end = header_end(raw);
    let raw_headers = split_headers(&raw[..header_end]);
    // mail-parser 0.11.9 panics on some crafted nestings ("Invalid part ID, could not find
    // multipart", found by fuzz/mime): such a message is stored as one flat body instead of
    // failing its delivery.
    let parsed =
        std::panic::catch_unwind(|| MessageParser::default().parse(raw)).unwrap_or_default();
    let Some(msg) = parsed else {
        return flat(raw, header_end, &raw_headers);
    };
    if msg.parts.is_empty() {
        drop_flat(msg);
        return flat(raw, header_end, &raw_headers);
    }
    let envelope = envelope_of(&msg, &raw_headers);
    let mut seen = Seen::default();
    seen.first(&msg, 0);
    let mut body = part_structure(&msg, 0, raw, 0, false, 0, &mut seen);
    let start = body_start(raw, header_end) as u64;
    if start < body.body_start && body.parts.is_empty() && body.message.is_none() {
        // mail-parser read the lines after a non-header line as more header: they are body.
        body.body_start = start;
        body.size = body.body_end - start;
        if body.media_type.eq_ignore_ascii_case(b"text") {
            body.lines = count_lines(&raw[start as usize..body.body_end as usize]);
        }
    }
    let headers = msg
        .root_part()
        .headers
        .iter()
        .map(|h| {
            (
                h.name().to_ascii_lowercase(),
                header_text(h.value(), raw, h),
            )
        })
        .collect();
    let text = collect_text(&msg);
    let sent_date = msg
        .date()
        .and_then(|d| chrono::NaiveDate::from_ymd_opt(d.year.into(), d.month.into(), d.day.into()));
    drop_flat(msg);
    Parsed {
        envelope,
        body,
        headers,
        text,
        sent_date,
    }
}

/// How deep `msg` nests (1 = a single part), counting multipart children and
/// message/rfc822 bodies, walked with an explicit stack. Used by tests and the fuzz target to
/// check that a structure stays within `MAX_MIME_DEPTH`.
pub fn structure_depth(root: &BodyPart) -> usize {
    let mut max = 0;
    let mut stack = vec![(root, 1usize)];
    while let Some((p, d)) = stack.pop() {
        max = max.max(d);
        stack.extend(p.parts.iter().map(|c| (c, d + 1)));
        if let Some(m) = &p.message {
            stack.push((m, d + 1));
        }
    }
    max
}

/// Drop a parsed message level by level: the derived `Drop` of nested message/rfc822 parts
/// recurses once per level and overflows the stack on a deeply nested message.
fn drop_flat(msg: Message<'_>) {
    let mut pending = vec![msg];
    while let Some(mut m) = pending.pop() {
        for part in &mut m.parts {
            if let PartType::Message(inner) = std::mem::take(&mut part.body) {
                pending.push(inner);
            }
        }
    }
}

/// The structure of a message nothing could be parsed from: one TEXT/PLAIN body.
fn flat(raw: &[u8], header_end: usize, raw_headers: &[(String, Vec<u8>)]) -> Parsed {
    let body_start = body_start(raw, header_end);
    let envelope = Envelope {
        date: raw_field(raw_headers, "date"),
        subject: raw_field(raw_headers, "subject"),
        message_id: raw_field(raw_headers, "message-id"),
        in_reply_to: raw_field(raw_headers, "in-reply-to"),
        ..Default::default()
    };
    let body = BodyPart {
        media_type: b"TEXT".to_vec(),
        media_subtype: b"PLAIN".to_vec(),
        params: vec![param("CHARSET", "US-ASCII")],
        encoding: b"7BIT".to_vec(),
        size: (raw.len() - body_start) as u64,
        lines: count_lines(&raw[body_start..]),
        header_start: 0,
        body_start: body_start as u64,
        body_end: raw.len() as u64,
        ..Default::default()
    };
    let headers = raw_headers
        .iter()
        .map(|(n, v)| (n.clone(), String::from_utf8_lossy(v).trim().to_string()))
        .collect();
    let text = String::from_utf8_lossy(&raw[body_start..]).into_owned();
    Parsed {
        envelope,
        body,
        headers,
        text: truncate(text),
        sent_date: None,
    }
}

fn truncate(mut s: String) -> String {
    if s.len() > MAX_INDEXED_TEXT {
        let mut cut = MAX_INDEXED_TEXT;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// The decoded text of every text part, nested messages included, in order (explicit stack:
/// the nesting is attacker-controlled).
fn collect_text(msg: &Message<'_>) -> String {
    let mut out = String::new();
    let mut stack = vec![msg.parts.iter()];
    while let Some(parts) = stack.last_mut() {
        if out.len() >= MAX_INDEXED_TEXT {
            break;
        }
        let Some(part) = parts.next() else {
            stack.pop();
            continue;
        };
        match &part.body {
            PartType::Text(t) => {
                out.push_str(t);
                out.push('\n');
            }
            PartType::Html(h) => {
                out.push_str(&strip_html(h));
                out.push('\n');
            }
            PartType::Message(m) => stack.push(m.parts.iter()),
            _ => {}
        }
    }
    truncate(out)
}

/// Tags removed, white space collapsed as a browser shows it, entities for the common
/// characters resolved: what SEARCH BODY/TEXT matches substrings against, so
/// `<b>Zebra</b> crossing` must read `Zebra crossing`.
fn strip_html(h: &str) -> String {
    let mut out = String::with_capacity(h.len());
    let mut in_tag = false;
    let space = |out: &mut String| {
        if !out.ends_with(' ') {
            out.push(' ');
        }
    };
    // A non-breaking space collapses with the white space around it, as shown.
    for c in h.replace("&nbsp;", " ").chars() {
        match c {
            '<' => in_tag = true,
            // A tag may separate words (`<br>`, `<p>`): one space, never a run.
            '>' if in_tag => {
                in_tag = false;
                space(&mut out);
            }
            _ if in_tag => {}
            c if c.is_whitespace() => space(&mut out),
            _ => out.push(c),
        }
    }
    out.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&amp;", "&")
}

/// Offset just past the header block: at the empty line that ends it, at the first line that
/// is neither a header field nor a continuation (RFC 5322 has no other way to end a header, so
/// such a line starts the body, as Dovecot reads it), or at the end of the message.
pub fn header_end(raw: &[u8]) -> usize {
    let mut line = 0;
    while line < raw.len() {
        let end = raw[line..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(raw.len(), |i| line + i + 1);
        let text = &raw[line..end];
        let text = text.strip_suffix(b"\n").unwrap_or(text);
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        let continuation = line > 0 && matches!(text.first(), Some(b' ' | b'\t'));
        if text.is_empty() || !(continuation || is_field_line(text)) {
            return line;
        }
        line = end;
    }
    raw.len()
}

/// `name: value`, where the name is printable ASCII without spaces (white space before the
/// colon is the obsolete syntax RFC 5322 §4.5 still reads).
fn is_field_line(line: &[u8]) -> bool {
    let Some(colon) = line.iter().position(|&b| b == b':') else {
        return false;
    };
    let name = &line[..colon];
    let name = &name[..name
        .iter()
        .rposition(|&b| b != b' ' && b != b'\t')
        .map_or(0, |i| i + 1)];
    !name.is_empty() && name.iter().all(|&b| b.is_ascii_graphic())
}

/// Offset of the body: after the empty line that ends the header.
fn body_start(raw: &[u8], header_end: usize) -> usize {
    if raw[header_end..].starts_with(b"\r\n") {
        header_end + 2
    } else if raw[header_end..].starts_with(b"\n") {
        header_end + 1
    } else {
        header_end
    }
}

/// Header fields as (lowercase name, raw unfolded value without the leading space).
pub fn split_headers(block: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    for line in block.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        if line[0] == b' ' || line[0] == b'\t' {
            if let Some(last) = out.last_mut() {
                last.1.extend_from_slice(line);
            }
            continue;
        }
        if let Some(colon) = line.iter().position(|&b| b == b':') {
            let name = String::from_utf8_lossy(&line[..colon])
                .trim()
                .to_ascii_lowercase();
            out.push((name, line[colon + 1..].to_vec()));
        }
    }
    for (_, v) in &mut out {
        let t = trim_bytes(v).to_vec();
        *v = t;
    }
    out
}

fn trim_bytes(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &v[start..end.max(start)]
}

fn raw_field(headers: &[(String, Vec<u8>)], name: &str) -> Option<Vec<u8>> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.clone())
}

fn header_text(v: &HeaderValue<'_>, raw: &[u8], h: &mail_parser::Header<'_>) -> String {
    match v {
        HeaderValue::Text(t) => t.to_string(),
        HeaderValue::TextList(l) => l.join(" "),
        HeaderValue::Address(a) => address_text(a),
        _ => {
            let s = h.offset_start as usize;
            let e = (h.offset_end as usize).min(raw.len());
            String::from_utf8_lossy(&raw[s.min(e)..e])
                .replace(['\r', '\n'], "")
                .trim()
                .to_string()
        }
    }
}

fn address_text(a: &Address<'_>) -> String {
    fn one(ad: &mail_parser::Addr<'_>) -> String {
        let mut s = String::new();
        if let Some(n) = &ad.name {
            s.push_str(n);
            s.push(' ');
        }
        if let Some(x) = &ad.address {
            s.push('<');
            s.push_str(x);
            s.push('>');
        }
        s
    }
    match a {
        Address::List(l) => l.iter().map(one).collect::<Vec<_>>().join(", "),
        // A group keeps its name in the text (`name: a <x>, b <y>;`), so SEARCH TO finds the
        // group by name as well as by its members (imaptest search-addresses).
        Address::Group(groups) => groups
            .iter()
            .map(|g| {
                let members = g.addresses.iter().map(one).collect::<Vec<_>>().join(", ");
                match &g.name {
                    Some(name) => format!("{name}: {members};"),
                    None => members,
                }
            })
            .collect::<Vec<_>>()
            .join(", "),
    }
}

fn envelope_of(msg: &Message<'_>, raw_headers: &[(String, Vec<u8>)]) -> Envelope {
    // A field that occurs several times (two Cc: lines) contributes all its addresses.
    let addrs = |name: HeaderName<'static>| -> Vec<EnvelopeAddress> {
        msg.root_part()
            .headers
            .iter()
            .filter(|h| h.name == name)
            .flat_map(|h| match &h.value {
                HeaderValue::Address(a) => envelope_addresses(a),
                _ => Vec::new(),
            })
            .collect()
    };
    let from = addrs(HeaderName::From);
    let mut sender = addrs(HeaderName::Sender);
    if sender.is_empty() {
        sender = from.clone();
    }
    let mut reply_to = addrs(HeaderName::ReplyTo);
    if reply_to.is_empty() {
        reply_to = from.clone();
    }
    Envelope {
        date: raw_field(raw_headers, "date"),
        subject: raw_field(raw_headers, "subject"),
        from,
        sender,
        reply_to,
        to: addrs(HeaderName::To),
        cc: addrs(HeaderName::Cc),
        bcc: addrs(HeaderName::Bcc),
        in_reply_to: raw_field(raw_headers, "in-reply-to"),
        message_id: raw_field(raw_headers, "message-id"),
    }
}

fn envelope_addresses(a: &Address<'_>) -> Vec<EnvelopeAddress> {
    let mut out = Vec::new();
    match a {
        Address::List(list) => out.extend(list.iter().map(envelope_address)),
        Address::Group(groups) => {
            for g in groups {
                // A group without a name is how the parser holds plain addresses.
                match &g.name {
                    Some(name) => {
                        out.push(EnvelopeAddress {
                            mailbox: Some(encode_word(name)),
                            ..Default::default()
                        });
                        // mail-parser turns a comment inside a group (`g: (foo) ;`) into a
                        // member with a name and no address: not an address, so not listed.
                        out.extend(
                            g.addresses
                                .iter()
                                .filter(|a| a.address.is_some())
                                .map(envelope_address),
                        );
                        out.push(EnvelopeAddress::default());
                    }
                    None => out.extend(g.addresses.iter().map(envelope_address)),
                }
            }
        }
    }
    out
}

fn envelope_address(a: &mail_parser::Addr<'_>) -> EnvelopeAddress {
    // An obsolete source route (`<@route:user@domain>`, RFC 5322 §4.4) is the ENVELOPE's adl.
    let (adl, address) = match a.address.as_deref() {
        Some(addr) if addr.starts_with('@') && addr.contains(':') => {
            let (route, rest) = addr.split_once(':').unwrap_or((addr, ""));
            (Some(route.as_bytes().to_vec()), Some(rest))
        }
        other => (None, other),
    };
    let (mailbox, host) = match address {
        Some(addr) => match addr.rsplit_once('@') {
            Some((l, h)) => (Some(l.as_bytes().to_vec()), Some(h.as_bytes().to_vec())),
            None => (Some(addr.as_bytes().to_vec()), None),
        },
        None => (None, None),
    };
    EnvelopeAddress {
        name: a.name.as_deref().filter(|n| !n.is_empty()).map(encode_word),
        adl,
        mailbox,
        host,
    }
}

/// RFC 2047 B-encoding for non-ASCII text; ASCII is returned as is.
pub fn encode_word(s: &str) -> Vec<u8> {
    if s.is_ascii() {
        return s.as_bytes().to_vec();
    }
    use base64::Engine;
    format!(
        "=?utf-8?b?{}?=",
        base64::engine::general_purpose::STANDARD.encode(s.as_bytes())
    )
    .into_bytes()
}

fn param(name: &str, value: &str) -> BodyParam {
    BodyParam {
        name: name.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
    }
}

fn params_of(attrs: Option<&[mail_parser::Attribute<'_>]>) -> Vec<BodyParam> {
    attrs
        .unwrap_or_default()
        .iter()
        .map(|a| {
            if a.value.is_ascii() {
                param(&a.name, &a.value)
            } else {
                BodyParam {
                    name: format!("{}*", a.name).into_bytes(),
                    value: format!("utf-8''{}", percent_encode(&a.value)).into_bytes(),
                }
            }
        })
        .collect()
}

/// The parameters of a Content-Type / Content-Disposition value exactly as sent, when any
/// uses RFC 2231 syntax (`title*=us-ascii'en'...`, `name*0=...`). mail-parser decodes those
/// into new names (`title-language`); RFC 3501 §7.4.2 hands the client the parameters as they
/// are in the header, to decode itself. None when there is no such parameter or the value
/// cannot be read: the caller then uses mail-parser's reading.
fn extended_params(value: &[u8]) -> Option<Vec<BodyParam>> {
    let mut out = Vec::new();
    let mut i = value.iter().position(|&b| b == b';')? + 1;
    let skip_cfws = |mut i: usize| {
        let mut depth = 0usize;
        while i < value.len() {
            match value[i] {
                b'(' => depth += 1,
                b')' if depth > 0 => depth -= 1,
                b' ' | b'\t' | b'\r' | b'\n' => {}
                _ if depth > 0 => {}
                _ => break,
            }
            i += 1;
        }
        i
    };
    loop {
        i = skip_cfws(i);
        if i >= value.len() {
            break;
        }
        if value[i] == b';' {
            i += 1;
            continue;
        }
        let name_end = i + value[i..].iter().position(|&b| b == b'=')?;
        let name = trim_bytes(&value[i..name_end]);
        if name.is_empty() || !name.iter().all(|b| b.is_ascii_graphic()) {
            return None;
        }
        i = skip_cfws(name_end + 1);
        let mut v = Vec::new();
        if value.get(i) == Some(&b'"') {
            i += 1;
            loop {
                match value.get(i) {
                    None => return None,
                    Some(b'"') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') => {
                        v.extend(value.get(i + 1));
                        i += 2;
                    }
                    Some(&b) => {
                        v.push(b);
                        i += 1;
                    }
                }
            }
        } else {
            let end = value[i..]
                .iter()
                .position(|&b| b == b';' || b == b' ' || b == b'\t' || b == b'(')
                .map_or(value.len(), |e| i + e);
            v.extend_from_slice(&value[i..end]);
            i = end;
        }
        out.push(BodyParam {
            name: name.to_vec(),
            value: v,
        });
    }
    out.iter().any(|p| p.name.contains(&b'*')).then_some(out)
}

fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"!#$&+-.^_`|~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn count_lines(body: &[u8]) -> u64 {
    body.iter().filter(|&&b| b == b'\n').count() as u64
}

fn raw_header_of(part: &MessagePart<'_>, raw: &[u8], name: &str) -> Option<Vec<u8>> {
    let s = (part.offset_header as usize).min(raw.len());
    let e = (part.offset_body as usize).clamp(s, raw.len());
    let hs = split_headers(&raw[s..e]);
    raw_field(&hs, name)
}

/// Parts already described, by (message, part id). mail-parser can list one part id under
/// several multiparts of a crafted message; walked as a tree that shared structure repeats
/// exponentially with the depth (found by fuzz/mime: a 4 KB message took gigabytes), so each
/// part is described once, under the first multipart that lists it.
#[derive(Default)]
struct Seen(std::collections::HashSet<(usize, usize)>);

impl Seen {
    fn first(&mut self, msg: &Message<'_>, id: usize) -> bool {
        self.0.insert((std::ptr::from_ref(msg) as usize, id))
    }
}

/// The BODYSTRUCTURE node of part `id` of `msg`. `raw` is the buffer the part's offsets refer
/// to; `base` is added to every offset (non-zero when `raw` is a decoded nested message that
/// has no place in the stored bytes, see `detached`). `in_digest`: the parent is
/// multipart/digest. `depth`: how many levels are above this part (0 for the root); the
/// recursion stops at `MAX_MIME_DEPTH`, so this and every walk of its result is shallow.
fn part_structure(
    msg: &Message<'_>,
    id: usize,
    raw: &[u8],
    base: u64,
    in_digest: bool,
    depth: usize,
    seen: &mut Seen,
) -> BodyPart {
    let Some(part) = msg.parts.get(id) else {
        return BodyPart::default();
    };
    let hs = (part.offset_header as usize).min(raw.len());
    let bs = (part.offset_body as usize).clamp(hs, raw.len());
    let be = (part.offset_end as usize).clamp(bs, raw.len());

    let ct = part.headers.iter().find_map(|h| match (&h.name, &h.value) {
        (HeaderName::ContentType, HeaderValue::ContentType(ct)) => Some(ct),
        _ => None,
    });
    let valid_ct = ct.filter(|c| {
        !c.c_type.is_empty()
            && c.c_subtype.as_deref().is_some_and(|s| !s.is_empty())
            && c.c_type.bytes().all(|b| b.is_ascii_graphic())
    });
    let is_multipart = matches!(part.body, PartType::Multipart(_));
    let (media_type, media_subtype, mut params) = match valid_ct {
        Some(c) => (
            c.c_type.as_bytes().to_vec(),
            c.c_subtype.as_deref().unwrap_or("").as_bytes().to_vec(),
            raw_header_of(part, raw, "content-type")
                .and_then(|v| extended_params(&v))
                .unwrap_or_else(|| params_of(c.attributes.as_deref())),
        ),
        None if is_multipart => (
            b"MULTIPART".to_vec(),
            b"MIXED".to_vec(),
            params_of(ct.and_then(|c| c.attributes.as_deref())),
        ),
        None if in_digest => (b"MESSAGE".to_vec(), b"RFC822".to_vec(), Vec::new()),
        None => (
            b"TEXT".to_vec(),
            b"PLAIN".to_vec(),
            vec![param("CHARSET", "US-ASCII")],
        ),
    };
    let is_text = media_type.eq_ignore_ascii_case(b"text");
    if is_text && valid_ct.is_some() && params.is_empty() {
        // RFC 2045 §5.2: text without a charset is US-ASCII.
        params.push(param("CHARSET", "US-ASCII"));
    }

    let disposition = part.headers.iter().find_map(|h| match (&h.name, &h.value) {
        (HeaderName::ContentDisposition, HeaderValue::ContentType(d)) => Some(BodyDisposition {
            kind: d.c_type.as_bytes().to_vec(),
            params: raw_header_of(part, raw, "content-disposition")
                .and_then(|v| extended_params(&v))
                .unwrap_or_else(|| params_of(d.attributes.as_deref())),
        }),
        _ => None,
    });
    let language = match raw_header_of(part, raw, "content-language") {
        Some(v) => String::from_utf8_lossy(&v)
            .split(',')
            .map(|s| s.trim().as_bytes().to_vec())
            .filter(|s| !s.is_empty())
            .collect(),
        None => Vec::new(),
    };

    let mut node = BodyPart {
        media_type,
        media_subtype,
        params,
        id: raw_header_of(part, raw, "content-id"),
        description: raw_header_of(part, raw, "content-description"),
        encoding: raw_header_of(part, raw, "content-transfer-encoding")
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| b"7BIT".to_vec()),
        size: (be - bs) as u64,
        lines: 0,
        md5: raw_header_of(part, raw, "content-md5"),
        disposition,
        language,
        location: raw_header_of(part, raw, "content-location"),
        envelope: None,
        message: None,
        parts: Vec::new(),
        header_start: base + hs as u64,
        body_start: base + bs as u64,
        body_end: base + be as u64,
    };

    let nested = matches!(part.body, PartType::Multipart(_) | PartType::Message(_));
    if nested && depth + 1 >= MAX_MIME_DEPTH {
        // Too deep to describe: one leaf over this part's raw bytes, so its MIME header and
        // body (and everything it contains) stay fetchable byte for byte. A multipart with
        // no children would not be valid BODYSTRUCTURE, hence not "keep the multipart".
        node.media_type = b"APPLICATION".to_vec();
        node.media_subtype = b"OCTET-STREAM".to_vec();
        node.params = Vec::new();
        return node;
    }

    match &part.body {
        PartType::Multipart(children) => {
            let digest = node.media_subtype.eq_ignore_ascii_case(b"digest");
            node.parts = children
                .iter()
                .filter_map(|&c| {
                    let c = c as usize;
                    seen.first(msg, c)
                        .then(|| part_structure(msg, c, raw, base, digest, depth + 1, seen))
                })
                .collect();
            if node.parts.is_empty() {
                // A multipart with no parts is not expressible in BODYSTRUCTURE.
                node.parts
                    .push(empty_text(node.body_start, node.body_start));
            }
        }
        PartType::Message(inner) => {
            let inner_raw: &[u8] = inner.raw_message.as_ref();
            // An unencoded nested message is parsed in place: its offsets are those of the
            // stored bytes. A base64/QP-encoded one was parsed from decoded bytes, which exist
            // nowhere in storage: describe it, but point all its offsets at this part's body.
            let in_place =
                inner_raw.len() == raw.len() && part.encoding == mail_parser::Encoding::None;
            let inner_hend = header_end(
                &inner_raw[(inner.root_part().offset_header as usize).min(inner_raw.len())..],
            ) + inner.root_part().offset_header as usize;
            let inner_headers = split_headers(
                &inner_raw[(inner.root_part().offset_header as usize).min(inner_hend)..inner_hend],
            );
            node.envelope = Some(envelope_of(inner, &inner_headers));
            seen.first(inner, 0);
            let mut sub = part_structure(
                inner,
                0,
                inner_raw,
                if in_place { base } else { 0 },
                false,
                depth + 1,
                seen,
            );
            if in_place {
                // The nested root's end is the end of its container's body. A crafted
                // message can put the nested body's start past that end: clamp so the
                // ranges stay ordered (header ≤ body ≤ end) and inside the container.
                sub.body_end = node.body_end;
                sub.body_start = sub.body_start.clamp(node.body_start, sub.body_end);
                sub.header_start = sub.header_start.clamp(node.body_start, sub.body_start);
                sub.size = sub.body_end - sub.body_start;
                if sub.parts.is_empty() && sub.message.is_none() {
                    sub.lines = count_lines(sub_slice(raw, base, sub.body_start, sub.body_end));
                }
            } else {
                detach(&mut sub, node.body_start, node.body_end);
            }
            node.message = Some(Box::new(sub));
            node.lines = count_lines(&raw[bs..be]);
        }
        _ if node.media_type.eq_ignore_ascii_case(b"multipart") => {
            // Declared multipart but no delimiter line was found: body-type-mpart needs at
            // least one part, so it gets one empty text/plain part (as Dovecot answers).
            node.parts
                .push(empty_text(node.body_start, node.body_start));
        }
        _ => {
            if is_text || node.media_type.eq_ignore_ascii_case(b"message") {
                node.lines = count_lines(&raw[bs..be]);
            }
        }
    }
    node
}

/// `raw[start - base .. end - base]`, empty when the range is not inside `raw`.
fn sub_slice(raw: &[u8], base: u64, start: u64, end: u64) -> &[u8] {
    let (Some(s), Some(e)) = (start.checked_sub(base), end.checked_sub(base)) else {
        return &[];
    };
    usize::try_from(s)
        .ok()
        .zip(usize::try_from(e).ok())
        .and_then(|(s, e)| raw.get(s..e))
        .unwrap_or(&[])
}

/// Recursive, but only as deep as `part_structure` builds (`MAX_MIME_DEPTH`).
fn detach(p: &mut BodyPart, start: u64, end: u64) {
    p.header_start = start;
    p.body_start = start;
    p.body_end = end;
    for c in &mut p.parts {
        detach(c, start, end);
    }
    if let Some(m) = &mut p.message {
        detach(m, start, end);
    }
}

fn empty_text(start: u64, end: u64) -> BodyPart {
    BodyPart {
        media_type: b"TEXT".to_vec(),
        media_subtype: b"PLAIN".to_vec(),
        params: vec![param("CHARSET", "US-ASCII")],
        encoding: b"7BIT".to_vec(),
        header_start: start,
        body_start: start,
        body_end: end,
        size: end.saturating_sub(start),
        ..Default::default()
    }
}

/// Where a FETCH section points inside the raw message.
#[derive(Debug, Clone, PartialEq)]
pub enum SectionRange<'a> {
    /// [start, end) of the raw message; `part` is the addressed body part, if any.
    Bytes {
        start: u64,
        end: u64,
        part: Option<&'a BodyPart>,
    },
    /// The section does not exist in this message.
    Missing,
}

/// Resolve a section path (`[]` = whole message, `[1, 2]` = part 1.2) and kind.
pub fn section_range<'a>(
    root: &'a BodyPart,
    total: u64,
    path: &[u32],
    kind: mailsuite_proto::SectionKind,
) -> SectionRange<'a> {
    use mailsuite_proto::SectionKind as K;
    // `msg`: the message whose part numbers the next step counts (the root, or the
    // encapsulated message of a MESSAGE/RFC822 part); `cur`: the addressed part.
    let mut msg: Option<&BodyPart> = Some(root);
    let mut cur: Option<&BodyPart> = None;
    for &n in path {
        if n == 0 {
            return SectionRange::Missing;
        }
        let container = match (msg, cur) {
            (Some(m), _) => m,
            (None, Some(c)) => match c.message.as_deref() {
                Some(inner) => inner,
                None if !c.parts.is_empty() => c,
                None => return SectionRange::Missing,
            },
            (None, None) => return SectionRange::Missing,
        };
        let next = if !container.parts.is_empty() {
            container.parts.get(n as usize - 1)
        } else if n == 1 && (msg.is_some() || cur.is_some_and(|c| c.message.is_some())) {
            Some(container)
        } else {
            None
        };
        let Some(next) = next else {
            return SectionRange::Missing;
        };
        msg = None;
        cur = Some(next);
    }
    // Stored structures come from crafted input too: never hand out a range that is reversed
    // or reaches past the message.
    let bytes = |start: u64, end: u64, part: Option<&'a BodyPart>| {
        let end = end.min(total);
        SectionRange::Bytes {
            start: start.min(end),
            end,
            part,
        }
    };
    match (msg, cur) {
        (Some(m), _) => match kind {
            K::Full => bytes(0, total, None),
            K::Header | K::HeaderFields | K::HeaderFieldsNot => bytes(0, m.body_start, None),
            K::Text => bytes(m.body_start, total, None),
            K::Mime => SectionRange::Missing,
        },
        (None, Some(p)) => match kind {
            K::Full => bytes(p.body_start, p.body_end, Some(p)),
            K::Mime => bytes(p.header_start, p.body_start, None),
            K::Header | K::HeaderFields | K::HeaderFieldsNot => match p.message.as_deref() {
                Some(inner) => bytes(inner.header_start, inner.body_start, None),
                None => SectionRange::Missing,
            },
            K::Text => match p.message.as_deref() {
                Some(inner) => bytes(inner.body_start, p.body_end, None),
                None => SectionRange::Missing,
            },
        },
        (None, None) => SectionRange::Missing,
    }
}

/// HEADER.FIELDS / HEADER.FIELDS.NOT: the matching fields of a header block, folded lines
/// kept, followed by the empty line.
pub fn filter_header_fields(block: &[u8], fields: &[String], keep: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let mut include = false;
    for line in block.split_inclusive(|&b| b == b'\n') {
        let bare = line.strip_suffix(b"\n").unwrap_or(line);
        let bare = bare.strip_suffix(b"\r").unwrap_or(bare);
        if bare.is_empty() {
            continue;
        }
        if bare[0] != b' ' && bare[0] != b'\t' {
            let name = bare
                .iter()
                .position(|&b| b == b':')
                .map(|c| String::from_utf8_lossy(&bare[..c]).trim().to_string())
                .unwrap_or_default();
            let listed = fields.iter().any(|f| f.eq_ignore_ascii_case(&name));
            include = listed == keep;
        }
        if include {
            out.extend_from_slice(line);
            if !line.ends_with(b"\n") {
                out.extend_from_slice(b"\r\n");
            }
        }
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Bare LF → CRLF.
pub fn to_crlf(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + data.len() / 32);
    let mut prev = 0u8;
    for &b in data {
        if b == b'\n' && prev != b'\r' {
            out.push(b'\r');
        }
        out.push(b);
        prev = b;
    }
    out
}

/// Undo a Content-Transfer-Encoding (BINARY fetch); unknown encodings pass through.
pub fn decode_transfer(encoding: &[u8], data: &[u8]) -> Option<Vec<u8>> {
    if encoding.eq_ignore_ascii_case(b"base64") {
        mail_parser::decoders::base64::base64_decode(data)
    } else if encoding.eq_ignore_ascii_case(b"quoted-printable") {
        mail_parser::decoders::quoted_printable::quoted_printable_decode(data)
    } else {
        Some(data.to_vec())
    }
}

#[cfg(test)]
mod tests;
