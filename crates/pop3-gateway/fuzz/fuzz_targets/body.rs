//! Fuzz the RETR/TOP body encoder. Invariants, whatever the chunking: every LF is preceded
//! by CR, the reply ends in CRLF "." CRLF, and undoing the byte-stuffing gives back the input
//! with CRLF line ends (for TOP: a prefix of it, cut at a line end).
#![no_main]

#[path = "../../src/codec.rs"]
#[allow(dead_code)]
mod codec;

use codec::BodyEncoder;
use libfuzzer_sys::fuzz_target;

fn normalise(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut prev = 0u8;
    for &b in input {
        if b == b'\n' && prev != b'\r' {
            out.push(b'\r');
        }
        out.push(b);
        prev = b;
    }
    if !out.is_empty() && !out.ends_with(b"\r\n") {
        if out.ends_with(b"\r") {
            out.push(b'\n');
        } else {
            out.extend_from_slice(b"\r\n");
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&cfg, input)) = data.split_first() else {
        return;
    };
    let step = (cfg as usize % 32) + 1;
    let top = (cfg & 0x80 != 0).then_some(u32::from(cfg & 0x07));
    let mut enc = top.map_or_else(BodyEncoder::full, BodyEncoder::top);
    let mut out = Vec::new();
    for piece in input.chunks(step) {
        enc.push(piece, &mut out);
    }
    enc.finish(&mut out);

    assert!(out.ends_with(b".\r\n"));
    for (i, &b) in out.iter().enumerate() {
        if b == b'\n' {
            assert!(i > 0 && out[i - 1] == b'\r', "bare LF at {i}");
        }
    }
    let body = &out[..out.len() - 3];
    assert!(body.is_empty() || body.ends_with(b"\r\n"));
    let mut unstuffed = Vec::new();
    for line in body.split_inclusive(|&b| b == b'\n') {
        let line = match line.first() {
            Some(b'.') => {
                assert!(line.starts_with(b".."), "a dot line left unstuffed");
                &line[1..]
            }
            _ => line,
        };
        unstuffed.extend_from_slice(line);
    }
    let expected = normalise(input);
    match top {
        None => assert_eq!(unstuffed, expected),
        Some(_) => assert!(expected.starts_with(&unstuffed)),
    }
});
