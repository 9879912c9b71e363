//! Fuzz the MIME metadata builder and the section resolver. Invariants: no panic (and no stack
//! overflow, however deep the nesting); the structure is at most `MAX_MIME_DEPTH` deep; every
//! part's offsets are ordered (header ≤ body ≤ end) and inside the message; every section
//! range that resolves is ordered and inside the message.
#![no_main]

#[path = "../../src/mime.rs"]
#[allow(dead_code)]
mod mime;

use libfuzzer_sys::fuzz_target;
use mailsuite_proto::{BodyPart, SectionKind};

fn ranges(p: &BodyPart, total: u64, depth: usize, paths: &mut Vec<Vec<u32>>, path: Vec<u32>) {
    assert!(
        p.header_start <= p.body_start && p.body_start <= p.body_end && p.body_end <= total,
        "part {path:?}: {}..{}..{} outside 0..{total}",
        p.header_start,
        p.body_start,
        p.body_end
    );
    paths.push(path.clone());
    if depth > 8 {
        return;
    }
    for (i, c) in p.parts.iter().enumerate() {
        let mut q = path.clone();
        q.push(i as u32 + 1);
        ranges(c, total, depth + 1, paths, q);
    }
    if let Some(m) = &p.message {
        let mut q = path.clone();
        q.push(1);
        ranges(m, total, depth + 1, paths, q);
    }
}

// libfuzzer-sys's hook aborts on every panic, even one `mime::parse` catches (mail-parser
// panics on some inputs; parse falls back to a flat body). The default hook is restored so
// only panics that escape to libfuzzer's own catch_unwind abort.
fuzz_target!(init: drop(std::panic::take_hook()), |raw: &[u8]| {
    let parsed = mime::parse(raw);
    let total = raw.len() as u64;
    let depth = mime::structure_depth(&parsed.body);
    assert!(depth <= mime::MAX_MIME_DEPTH, "structure {depth} deep");
    let mut paths = Vec::new();
    ranges(&parsed.body, total, 0, &mut paths, Vec::new());
    paths.push(vec![9, 9]);
    for path in &paths {
        for k in [
            SectionKind::Full,
            SectionKind::Header,
            SectionKind::HeaderFields,
            SectionKind::Text,
            SectionKind::Mime,
        ] {
            if let mime::SectionRange::Bytes { start, end, .. } =
                mime::section_range(&parsed.body, total, path, k)
            {
                assert!(start <= end && end <= total, "{path:?} {k:?}: {start}..{end}");
            }
        }
    }
});
