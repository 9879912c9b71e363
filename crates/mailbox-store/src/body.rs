//! FETCH BODY[...] / BINARY[...]: resolve a section against the stored structure, read only
//! those bytes, convert (HEADER.FIELDS filter, content decoding, CRLF) and cut the partial.

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
    pub prefix: &'a [u8],
    /// The whole blob when it was read with the row (at most [`INLINE`] bytes).
    pub data: Option<&'a [u8]>,
    pub size: u64,
    pub structure: &'a BodyPart,
}

/// Bytes [start, end) of the entry (prefix followed by the blob): sliced from the blob read
/// with the row when there is one, otherwise read from the database by range.
async fn read(
    conn: &mut PgConnection,
    msg: &Stored<'_>,
    start: u64,
    end: u64,
) -> Result<Vec<u8>, ServiceError> {
    let Some(blob) = msg.data else {
        return store::read_range(conn, msg.blob_id, msg.prefix, start, end).await;
    };
    let plen = msg.prefix.len() as u64;
    let mut out = Vec::with_capacity(end.saturating_sub(start) as usize);
    if start < plen {
        out.extend_from_slice(&msg.prefix[start as usize..end.min(plen) as usize]);
    }
    if end > plen {
        let bs = (start.max(plen) - plen).min(blob.len() as u64) as usize;
        let be = ((end - plen) as usize).min(blob.len());
        if be > bs {
            out.extend_from_slice(&blob[bs..be]);
        }
    }
    Ok(out)
}

/// The bytes of one section, or None when the message has no such section.
pub async fn render(
    conn: &mut PgConnection,
    msg: &Stored<'_>,
    section: &Section,
) -> Result<Option<Vec<u8>>, ServiceError> {
    let kind = SectionKind::try_from(section.kind).unwrap_or(SectionKind::Full);
    let (start, end, part) = match mime::section_range(msg.structure, msg.size, &section.part, kind)
    {
        SectionRange::Bytes { start, end, part } => (start, end.min(msg.size), part),
        SectionRange::Missing => return Ok(None),
    };
    // Read only what the partial needs when nothing changes the length of the output.
    let plain = !section.decode
        && !section.crlf
        && matches!(
            kind,
            SectionKind::Full | SectionKind::Text | SectionKind::Header | SectionKind::Mime
        );
    if plain && section.has_partial {
        let s = (start + section.offset).min(end);
        let e = if section.length == 0 {
            end
        } else {
            (s + section.length).min(end)
        };
        return Ok(Some(read(conn, msg, s, e).await?));
    }
    let mut data = read(conn, msg, start, end.max(start)).await?;
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
    if section.crlf {
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
    Ok(Some(data))
}
