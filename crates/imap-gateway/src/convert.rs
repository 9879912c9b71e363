//! Conversions between the store's protobuf messages and imap-types values.

use std::num::NonZeroU32;

use chrono::{FixedOffset, TimeZone};
use imap_codec::imap_types::body::{
    BasicFields, Body, BodyStructure, Disposition, Language, Location, MultiPartExtensionData,
    SinglePartExtensionData, SpecificFields,
};
use imap_codec::imap_types::core::{AString, Atom, IString, Literal, NString, Vec1};
use imap_codec::imap_types::datetime::DateTime;
use imap_codec::imap_types::envelope::{Address, Envelope};
use imap_codec::imap_types::fetch::{Part, Section};
use imap_codec::imap_types::flag::{Flag, FlagFetch};
use mailsuite_proto as pb;

pub fn istring(bytes: &[u8]) -> IString<'static> {
    IString::try_from(bytes.to_vec()).unwrap_or_else(|_| {
        // Only NUL is invalid in a literal: drop it rather than fail the whole response.
        let clean: Vec<u8> = bytes.iter().copied().filter(|b| *b != 0).collect();
        IString::try_from(clean).unwrap_or_else(|_| IString::try_from("").expect("empty"))
    })
}

pub fn nstring(bytes: Option<&[u8]>) -> NString<'static> {
    NString(bytes.map(istring))
}

/// A body literal for BODY[...]/RFC822 data.
pub fn nstring_data(data: Option<Vec<u8>>) -> NString<'static> {
    // Message data always goes as a literal: byte-exact, and what clients expect.
    NString(data.map(|d| match Literal::try_from(nul_to_0x80(d)) {
        Ok(l) => IString::Literal(l),
        // Unreachable once NULs are gone (a literal takes any other octet); an empty string
        // here would silently hand the client nothing.
        Err(_) => istring(&[]),
    }))
}

/// A non-BINARY literal may not carry NUL (RFC 9051 CHAR8), yet messages appended with
/// BINARY or delivered raw can hold one. Like Dovecot, send 0x80 in its place: the length
/// stays the same, so RFC822.SIZE, BODYSTRUCTURE sizes and partial origins still agree with
/// what is sent; BINARY[...] is the way to get the exact bytes.
pub fn nul_to_0x80(mut data: Vec<u8>) -> Vec<u8> {
    for b in data.iter_mut().filter(|b| **b == 0) {
        *b = 0x80;
    }
    data
}

fn addresses(list: &[pb::EnvelopeAddress]) -> Vec<Address<'static>> {
    list.iter()
        .map(|a| Address {
            name: nstring(a.name.as_deref()),
            adl: nstring(a.adl.as_deref()),
            mailbox: nstring(a.mailbox.as_deref()),
            host: nstring(a.host.as_deref()),
        })
        .collect()
}

pub fn envelope(e: &pb::Envelope) -> Envelope<'static> {
    Envelope {
        date: nstring(e.date.as_deref()),
        subject: nstring(e.subject.as_deref()),
        from: addresses(&e.from),
        sender: addresses(&e.sender),
        reply_to: addresses(&e.reply_to),
        to: addresses(&e.to),
        cc: addresses(&e.cc),
        bcc: addresses(&e.bcc),
        in_reply_to: nstring(e.in_reply_to.as_deref()),
        message_id: nstring(e.message_id.as_deref()),
    }
}

fn params(list: &[pb::BodyParam]) -> Vec<(IString<'static>, IString<'static>)> {
    list.iter()
        .map(|p| (istring(&p.name), istring(&p.value)))
        .collect()
}

fn disposition_tail(p: &pb::BodyPart) -> Option<Disposition<'static>> {
    Some(Disposition {
        disposition: p
            .disposition
            .as_ref()
            .map(|d| (istring(&d.kind), params(&d.params))),
        tail: Some(Language {
            language: p.language.iter().map(|l| istring(l)).collect(),
            tail: Some(Location {
                location: nstring(p.location.as_deref()),
                extensions: vec![],
            }),
        }),
    })
}

fn u32_sat(v: u64) -> u32 {
    v.min(u32::MAX as u64) as u32
}

/// BODYSTRUCTURE (`extended`) or BODY (not extended).
pub fn body_structure(p: &pb::BodyPart, extended: bool) -> BodyStructure<'static> {
    let is_multi = p.media_type.eq_ignore_ascii_case(b"multipart");
    if is_multi && !p.parts.is_empty() {
        let bodies: Vec<BodyStructure<'static>> = p
            .parts
            .iter()
            .map(|c| body_structure(c, extended))
            .collect();
        return BodyStructure::Multi {
            bodies: Vec1::try_from(bodies).expect("non-empty"),
            subtype: istring(&p.media_subtype),
            extension_data: extended.then(|| MultiPartExtensionData {
                parameter_list: params(&p.params),
                tail: disposition_tail(p),
            }),
        };
    }
    let basic = BasicFields {
        parameter_list: params(&p.params),
        id: nstring(p.id.as_deref()),
        description: nstring(p.description.as_deref()),
        content_transfer_encoding: istring(if p.encoding.is_empty() {
            b"7BIT"
        } else {
            &p.encoding
        }),
        size: u32_sat(p.size),
    };
    let specific = if p.media_type.eq_ignore_ascii_case(b"text") {
        SpecificFields::Text {
            subtype: istring(&p.media_subtype),
            number_of_lines: u32_sat(p.lines),
        }
    } else if p.media_type.eq_ignore_ascii_case(b"message")
        && (p.media_subtype.eq_ignore_ascii_case(b"rfc822")
            || p.media_subtype.eq_ignore_ascii_case(b"global"))
        && p.message.is_some()
    {
        let inner = p.message.as_deref().expect("checked");
        SpecificFields::Message {
            envelope: Box::new(envelope(&p.envelope.clone().unwrap_or_default())),
            body_structure: Box::new(body_structure(inner, extended)),
            number_of_lines: u32_sat(p.lines),
        }
    } else {
        SpecificFields::Basic {
            r#type: istring(if p.media_type.is_empty() {
                b"APPLICATION"
            } else {
                &p.media_type
            }),
            subtype: istring(if p.media_subtype.is_empty() {
                b"OCTET-STREAM"
            } else {
                &p.media_subtype
            }),
        }
    };
    BodyStructure::Single {
        body: Body { basic, specific },
        extension_data: extended.then(|| SinglePartExtensionData {
            md5: nstring(p.md5.as_deref()),
            tail: disposition_tail(p),
        }),
    }
}

/// A flag or keyword from its store spelling (`\Seen`, `$Forwarded`).
pub fn flag(s: &str) -> Option<Flag<'static>> {
    if let Some(name) = s.strip_prefix('\\') {
        let f = match name.to_ascii_lowercase().as_str() {
            "answered" => Flag::Answered,
            "deleted" => Flag::Deleted,
            "draft" => Flag::Draft,
            "flagged" => Flag::Flagged,
            "seen" => Flag::Seen,
            _ => Flag::system(Atom::try_from(name.to_string()).ok()?),
        };
        Some(f)
    } else {
        Some(Flag::Keyword(Atom::try_from(s.to_string()).ok()?))
    }
}

pub fn flag_name(f: &Flag<'_>) -> String {
    f.to_string()
}

pub fn flags_fetch(list: &[String]) -> Vec<FlagFetch<'static>> {
    list.iter()
        .filter(|f| !f.eq_ignore_ascii_case("\\recent"))
        .filter_map(|f| flag(f).map(FlagFetch::Flag))
        .collect()
}

pub fn internal_date(secs: i64, offset_minutes: i32) -> DateTime {
    let offset = FixedOffset::east_opt(offset_minutes.saturating_mul(60))
        .unwrap_or(FixedOffset::east_opt(0).expect("utc"));
    let dt = offset
        .timestamp_opt(secs.clamp(0, 253_402_300_799), 0)
        .single()
        .unwrap_or_else(|| offset.timestamp_opt(0, 0).single().expect("epoch"));
    DateTime::try_from(dt).unwrap_or_else(|_| {
        DateTime::try_from(offset.timestamp_opt(0, 0).single().expect("epoch")).expect("valid")
    })
}

/// The proto section for an IMAP BODY[section]; `partial` = `<offset.length>`.
pub fn section(
    s: Option<&Section<'_>>,
    partial: Option<(u32, NonZeroU32)>,
    decode: bool,
) -> pb::Section {
    let part_path = |p: Option<&Part>| -> Vec<u32> {
        p.map(|p| p.0.as_ref().iter().map(|n| n.get()).collect())
            .unwrap_or_default()
    };
    let names = |v: &Vec1<AString<'_>>| -> Vec<String> {
        v.as_ref()
            .iter()
            .map(|a| String::from_utf8_lossy(a.as_ref()).into_owned())
            .collect()
    };
    let (part, kind, fields) = match s {
        None => (vec![], pb::SectionKind::Full, vec![]),
        Some(Section::Part(p)) => (part_path(Some(p)), pb::SectionKind::Full, vec![]),
        Some(Section::Header(p)) => (part_path(p.as_ref()), pb::SectionKind::Header, vec![]),
        Some(Section::HeaderFields(p, f)) => (
            part_path(p.as_ref()),
            pb::SectionKind::HeaderFields,
            names(f),
        ),
        Some(Section::HeaderFieldsNot(p, f)) => (
            part_path(p.as_ref()),
            pb::SectionKind::HeaderFieldsNot,
            names(f),
        ),
        Some(Section::Text(p)) => (part_path(p.as_ref()), pb::SectionKind::Text, vec![]),
        Some(Section::Mime(p)) => (part_path(Some(p)), pb::SectionKind::Mime, vec![]),
    };
    pb::Section {
        part,
        kind: kind as i32,
        fields,
        decode,
        has_partial: partial.is_some(),
        offset: partial.map(|(o, _)| o as u64).unwrap_or(0),
        length: partial.map(|(_, l)| l.get() as u64).unwrap_or(0),
        // Never convert line ends: BINARY is the content exactly as decoded (RFC 3516), and
        // BODY[] must be the octets RFC822.SIZE, BODYSTRUCTURE sizes and partial origins
        // count, which are those stored.
        crlf: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imap_codec::ResponseCodec;
    use imap_codec::encode::Encoder;
    use imap_codec::imap_types::fetch::MessageDataItem;
    use imap_codec::imap_types::response::{Data, Response};

    fn encode_item(item: MessageDataItem<'static>) -> String {
        let r = Response::Data(Data::fetch(1, vec![item]).unwrap());
        String::from_utf8(ResponseCodec::default().encode(&r).dump()).unwrap()
    }

    fn text_part(sub: &[u8], size: u64, lines: u64) -> pb::BodyPart {
        pb::BodyPart {
            media_type: b"TEXT".to_vec(),
            media_subtype: sub.to_vec(),
            params: vec![pb::BodyParam {
                name: b"CHARSET".to_vec(),
                value: b"utf-8".to_vec(),
            }],
            encoding: b"7BIT".to_vec(),
            size,
            lines,
            ..Default::default()
        }
    }

    #[test]
    fn multipart_bodystructure_matches_rfc_syntax() {
        let mp = pb::BodyPart {
            media_type: b"MULTIPART".to_vec(),
            media_subtype: b"ALTERNATIVE".to_vec(),
            params: vec![pb::BodyParam {
                name: b"BOUNDARY".to_vec(),
                value: b"b1".to_vec(),
            }],
            parts: vec![text_part(b"PLAIN", 10, 1), text_part(b"HTML", 20, 2)],
            ..Default::default()
        };
        let body = encode_item(MessageDataItem::Body(body_structure(&mp, false)));
        assert_eq!(
            body,
            "* 1 FETCH (BODY ((\"TEXT\" \"PLAIN\" (\"CHARSET\" \"utf-8\") NIL NIL \"7BIT\" 10 1)(\"TEXT\" \"HTML\" (\"CHARSET\" \"utf-8\") NIL NIL \"7BIT\" 20 2) \"ALTERNATIVE\"))\r\n"
        );
        let bs = encode_item(MessageDataItem::BodyStructure(body_structure(&mp, true)));
        assert!(
            bs.contains("\"ALTERNATIVE\" (\"BOUNDARY\" \"b1\") NIL NIL NIL)"),
            "{bs}"
        );
    }

    #[test]
    fn message_rfc822_part_nests_envelope_and_body() {
        let inner = text_part(b"PLAIN", 5, 1);
        let part = pb::BodyPart {
            media_type: b"MESSAGE".to_vec(),
            media_subtype: b"RFC822".to_vec(),
            encoding: b"7BIT".to_vec(),
            size: 100,
            lines: 4,
            envelope: Some(pb::Envelope {
                subject: Some(b"inner".to_vec()),
                ..Default::default()
            }),
            message: Some(Box::new(inner)),
            ..Default::default()
        };
        let s = encode_item(MessageDataItem::Body(body_structure(&part, false)));
        assert_eq!(
            s,
            "* 1 FETCH (BODY (\"MESSAGE\" \"RFC822\" NIL NIL NIL \"7BIT\" 100 (NIL \"inner\" NIL NIL NIL NIL NIL NIL NIL NIL) (\"TEXT\" \"PLAIN\" (\"CHARSET\" \"utf-8\") NIL NIL \"7BIT\" 5 1) 4))\r\n"
        );
    }

    #[test]
    fn envelope_with_8bit_and_quotes() {
        let e = pb::Envelope {
            subject: Some("Grüße \"x\"".as_bytes().to_vec()),
            from: vec![pb::EnvelopeAddress {
                name: Some(b"A B".to_vec()),
                adl: None,
                mailbox: Some(b"a".to_vec()),
                host: Some(b"example.org".to_vec()),
            }],
            ..Default::default()
        };
        let s = encode_item(MessageDataItem::Envelope(envelope(&e)));
        assert!(
            s.contains("{11}\r\nGrüße \"x\""),
            "8-bit goes as a literal: {s}"
        );
        assert!(s.contains("((\"A B\" NIL \"a\" \"example.org\"))"), "{s}");
    }

    #[test]
    fn flags_and_dates() {
        assert_eq!(flag("\\Seen"), Some(Flag::Seen));
        assert_eq!(flag_name(&flag("$Forwarded").unwrap()), "$Forwarded");
        assert_eq!(flag("bad flag"), None);
        let d = internal_date(0, 120);
        let s = encode_item(MessageDataItem::InternalDate(d));
        assert_eq!(
            s,
            "* 1 FETCH (INTERNALDATE \"01-Jan-1970 02:00:00 +0200\")\r\n"
        );
    }

    #[test]
    fn nul_goes_as_0x80_in_a_literal_of_the_same_length() {
        assert_eq!(nul_to_0x80(b"\x00-\xe4\n\x00".to_vec()), b"\x80-\xe4\n\x80");
        let item = MessageDataItem::BodyExt {
            section: None,
            origin: None,
            data: nstring_data(Some(b"\x00-\xe4\n\r\n\n".to_vec())),
        };
        let r = Response::Data(Data::fetch(1, vec![item]).unwrap());
        let bytes = ResponseCodec::default().encode(&r).dump();
        assert_eq!(
            bytes,
            b"* 1 FETCH (BODY[] {7}\r\n\x80-\xe4\n\r\n\n)\r\n".to_vec()
        );
    }

    #[test]
    fn imap_sections_never_ask_for_crlf_conversion() {
        assert!(!section(None, None, false).crlf);
        assert!(!section(None, Some((0, NonZeroU32::MIN)), true).crlf);
    }
}
