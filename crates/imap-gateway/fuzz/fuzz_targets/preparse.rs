//! The pre-parser for ESEARCH / SEARCHRES / LIST-EXTENDED forms on arbitrary complete
//! messages: never a panic, a rewrite grows a message only by the `$` replacements, and
//! whatever it hands on decodes (or fails) in imap-codec without a panic either.
#![no_main]

use imap_codec::CommandCodec;
use imap_codec::decode::Decoder;
use libfuzzer_sys::fuzz_target;

#[path = "../../src/preparse.rs"]
#[allow(dead_code)]
mod preparse;

use preparse::{Pre, SAVED_MARKER, preparse};

fuzz_target!(|data: &[u8]| {
    // Messages as the Fragmentizer hands them over end in CRLF.
    let mut msg = data.to_vec();
    msg.extend_from_slice(b"\r\n");
    if let Pre::Rewritten(out, ext) = preparse(&msg) {
        let dollars = msg.iter().filter(|b| **b == b'$').count();
        assert!(out.len() <= msg.len() + dollars * SAVED_MARKER.len());
        if let Some(l) = &ext.list {
            assert!(!l.patterns.is_empty());
        }
        let _ = CommandCodec::default().decode(&out);
    }
});
