//! Fuzz the command side of the codec: line framing with a small limit, then command parsing.
//! Invariants: no panic, no line longer than the limit, memory held stays bounded, and the
//! framing consumes every byte it is given.
#![no_main]

#[path = "../../src/codec.rs"]
#[allow(dead_code)]
mod codec;

use codec::{Line, LineReader, parse_command};
use libfuzzer_sys::fuzz_target;

const MAX: usize = 64;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the chunk size, so the same input is also fed in pieces.
    let (step, input) = match data.split_first() {
        Some((s, rest)) => ((*s as usize % 16) + 1, rest),
        None => return,
    };
    let mut reader = LineReader::new(MAX);
    let mut pos = 0;
    while pos < input.len() {
        let end = (pos + step).min(input.len());
        let mut piece = &input[pos..end];
        while !piece.is_empty() {
            let (n, line) = reader.feed(piece);
            assert!(n > 0 && n <= piece.len());
            piece = &piece[n..];
            assert!(reader.pending() <= MAX + 2);
            if let Some(Line::Complete(l)) = line {
                assert!(l.len() <= MAX);
                let _ = parse_command(&l);
            }
        }
        pos = end;
    }
    // Whole input as one command line, unframed.
    let _ = parse_command(input);
});
