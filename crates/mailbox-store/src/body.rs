//! FETCH BODY[...] / BINARY[...]: resolve a section against the stored structure, read only
//! those bytes, convert (HEADER.FIELDS filter, content decoding, CRLF) and cut the partial.

use bytes::Bytes;
use mailsuite_proto::{BodyPart, Section, SectionKind};
use mailsuite_runtime::ServiceError;
use sqlx::PgConnection;

use crate::mime::{self, SectionRange};
use crate::store;

/// Gateways write at most this much per chunk (CONVENTIONS: ≤ 64 KiB per frame).
pub const CHUNK: usize = 64 * 1024;

/// Blobs up to this size are read with the message row (one statement per page of messages);
/// larger ones are read per section, by byte range, so a big message is never loaded whole
/// for a small section.
pub const INLINE: u64 = 64 * 1024;

pub struct Stored<'a> {
    pub blob_id: &'a [u8],
    pub prefix: Bytes,
    /// The whole blob when it was read with the row (at most [`INLINE`] bytes).
    pub data: Option<Bytes>,
    pub size: u64,
    pub structure: &'a BodyPart,
}

/// A plain section is read and sent in windows of this size: the store never holds more of a
/// large message than this per FetchBody stream, however large the section.
pub const WINDOW: u64 = 1024 * 1024;

/// Bytes [start, end) of the entry (prefix followed by the blob), as at most two pieces (of
/// the prefix, of the blob) that share the buffers they were read into: sliced from the blob
/// read with the row when there is one, otherwise read from the database by range.
pub async fn read(
    conn: &mut PgConnection,
    msg: &Stored<'_>,
    start: u64,
    end: u64,
) -> Result<Vec<Bytes>, ServiceError> {
    let Some(blob) = &msg.data else {
        return store::read_range(conn, msg.blob_id, &msg.prefix, start, end).await;
    };
    let plen = msg.prefix.len() as u64;
    let mut out = Vec::with_capacity(2);
    if start < plen {
        out.push(msg.prefix.slice(start as usize..end.min(plen) as usize));
    }
    if end > plen {
        let bs = (start.max(plen) - plen).min(blob.len() as u64) as usize;
        let be = ((end - plen) as usize).min(blob.len());
        if be > bs {
            out.push(blob.slice(bs..be));
        }
    }
    Ok(out)
}

/// What a section is made of.
#[derive(Debug, PartialEq, Eq)]
pub enum Output {
    /// Bytes [start, end) of the entry, unchanged (BODY[], BODY[TEXT], BODY[HEADER], their
    /// partials): the caller reads them with [`read`], in windows, without a copy of its own.
    Range(u64, u64),
    /// The section converted (header fields filtered, content decoded, line ends changed).
    Converted(Vec<u8>),
}

/// What one section is, or None when the message has no such section.
pub async fn render(
    conn: &mut PgConnection,
    msg: &Stored<'_>,
    section: &Section,
) -> Result<Option<Output>, ServiceError> {
    let kind = SectionKind::try_from(section.kind).unwrap_or(SectionKind::Full);
    let (start, end, part) = match mime::section_range(msg.structure, msg.size, &section.part, kind)
    {
        SectionRange::Bytes { start, end, part } => (start, end.min(msg.size), part),
        SectionRange::Missing => return Ok(None),
    };
    // Only the range (of the partial) is read when nothing changes the length of the output.
    let plain = !section.decode
        && !section.crlf
        && matches!(
            kind,
            SectionKind::Full | SectionKind::Text | SectionKind::Header | SectionKind::Mime
        );
    if plain {
        if !section.has_partial {
            return Ok(Some(Output::Range(start, end.max(start))));
        }
        let s = (start + section.offset).min(end);
        let e = if section.length == 0 {
            end
        } else {
            (s + section.length).min(end)
        };
        return Ok(Some(Output::Range(s, e)));
    }
    let data = read(conn, msg, start, end.max(start)).await?.concat();
    shape(data, section, kind, part).map(|d| Some(Output::Converted(d)))
}

/// What a section's bytes become on the way out: the HEADER.FIELDS filter, content decoding
/// (BINARY), CRLF, then the partial range.
fn shape(
    mut data: Vec<u8>,
    section: &Section,
    kind: SectionKind,
    part: Option<&BodyPart>,
) -> Result<Vec<u8>, ServiceError> {
    match kind {
        SectionKind::HeaderFields => {
            data = mime::filter_header_fields(&data, &section.fields, true)
        }
        SectionKind::HeaderFieldsNot => {
            data = mime::filter_header_fields(&data, &section.fields, false)
        }
        _ => {}
    }
    if let (true, Some(p)) = (section.decode, part) {
        data = mime::decode_transfer(&p.encoding, &data).ok_or_else(|| {
            ServiceError::Cannot("the part's content-transfer-encoding cannot be decoded".into())
        })?;
    }
    // BINARY is the content exactly (RFC 3516): a decoded bare LF or CR is data, and
    // BINARY.SIZE must count what BINARY sends, so a request for both gets no conversion.
    if section.crlf && !section.decode {
        data = mime::to_crlf(&data);
    }
    if section.has_partial {
        let s = (section.offset as usize).min(data.len());
        let e = if section.length == 0 {
            data.len()
        } else {
            (s + section.length as usize).min(data.len())
        };
        data = data[s..e].to_vec();
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(encoding: &[u8]) -> BodyPart {
        BodyPart {
            encoding: encoding.to_vec(),
            ..Default::default()
        }
    }

    /// BINARY as the IMAP gateway used to ask for it: decoded, with `crlf` set.
    fn binary(partial: Option<(u64, u64)>) -> Section {
        Section {
            decode: true,
            crlf: true,
            has_partial: partial.is_some(),
            offset: partial.map_or(0, |p| p.0),
            length: partial.map_or(0, |p| p.1),
            ..Default::default()
        }
    }

    fn shaped(data: &[u8], section: &Section, encoding: &[u8]) -> Vec<u8> {
        shape(
            data.to_vec(),
            section,
            SectionKind::Full,
            Some(&part(encoding)),
        )
        .unwrap()
    }

    /// imaptest fetch-binary-mime-base64, part 5: a bare CR, a CRLF and a bare LF.
    #[test]
    fn decoded_base64_keeps_its_line_ends() {
        let body = b"YWJjZGVmZw1oaWprbA0KbW5vCnBxcnN0dXZxeHl6\r\n";
        let want = b"abcdefg\rhijkl\r\nmno\npqrstuvqxyz";
        assert_eq!(shaped(body, &binary(None), b"BASE64"), want);
        assert_eq!(
            shaped(body, &binary(Some((10, 10))), b"base64"),
            b"jkl\r\nmno\np"
        );
        assert_eq!(
            shaped(body, &binary(Some((15, 100))), b"base64"),
            b"mno\npqrstuvqxyz"
        );
    }

    /// imaptest fetch-binary-mime-qp: soft breaks, trailing white space, `=` + blanks.
    #[test]
    fn decoded_quoted_printable_is_the_scripts_65_octets() {
        let body = b"hello  \r\nbar=\r\n\r\nfoo\t=\r\nbar\r\nfoo\t \t= \r\n=62\r\nfoo = \t\r\nbar\r\nfoo =\r\n=62\r\nfoo  \r\nbar=\r\n\r\nfoo_bar\r\n";
        let want: &[u8] =
            b"hello\r\nbar\r\nfoo\tbar\r\nfoo\t \tb\r\nfoo bar\r\nfoo b\r\nfoo\r\nbar\r\nfoo_bar\r\n";
        assert_eq!(shaped(body, &binary(None), b"quoted-printable"), want);
        assert_eq!(
            shaped(body, &binary(Some((15, 10))), b"QUOTED-PRINTABLE"),
            &want[15..25]
        );
    }

    /// imaptest append-binary: an identity encoding is sent as stored, bare LFs included.
    #[test]
    fn identity_encodings_are_sent_as_stored() {
        let body = b"\x00-\xe4\n\r\n\n";
        for enc in [&b"binary"[..], b"8bit", b"7bit", b""] {
            assert_eq!(shaped(body, &binary(None), enc), body, "{enc:?}");
        }
    }

    #[test]
    fn crlf_still_applies_without_decode() {
        let s = Section {
            crlf: true,
            ..Default::default()
        };
        assert_eq!(shaped(b"a\nb\r\n", &s, b"7bit"), b"a\r\nb\r\n");
        let s = Section::default();
        assert_eq!(shaped(b"a\nb\r\n", &s, b"7bit"), b"a\nb\r\n");
    }
}
