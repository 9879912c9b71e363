//! Fuzz the command side of the codec: line framing with small limits (commands, MAIL/RCPT,
//! AUTH), then command parsing. Invariants: no panic, no line longer than the limit of its
//! kind, memory held stays bounded, and the framing consumes every byte it is given.
#![no_main]

#[path = "../../src/codec.rs"]
#[allow(dead_code)]
mod codec;

use codec::{Line, LineLimits, LineReader, parse_command};
use libfuzzer_sys::fuzz_target;

const LIMITS: LineLimits = LineLimits {
    command: 64,
    mail_rcpt: 96,
    auth: 128,
};

/// The limit of a complete line (without its line end, so two less at most).
fn limit_of(line: &[u8]) -> usize {
    let head = &line[..line.len().min(5)];
    if head.eq_ignore_ascii_case(b"MAIL ") || head.eq_ignore_ascii_case(b"RCPT ") {
        LIMITS.mail_rcpt
    } else if head.eq_ignore_ascii_case(b"AUTH ") {
        LIMITS.auth
    } else {
        LIMITS.command
    }
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the chunk size, so the same input is also fed in pieces.
    let (step, input) = match data.split_first() {
        Some((s, rest)) => ((*s as usize % 16) + 1, rest),
        None => return,
    };
    let mut reader = LineReader::new(LIMITS);
    let mut pos = 0;
    while pos < input.len() {
        let end = (pos + step).min(input.len());
        let mut piece = &input[pos..end];
        while !piece.is_empty() {
            let (n, line) = reader.feed(piece);
            assert!(n > 0 && n <= piece.len());
            piece = &piece[n..];
            assert!(reader.pending() <= LIMITS.auth);
            if let Some(Line::Complete(l)) = line {
                assert!(l.len() < limit_of(&l));
                let _ = parse_command(&l);
            }
        }
        pos = end;
    }
    // Whole input as one command line, unframed.
    let _ = parse_command(input);
});
