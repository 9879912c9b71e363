//! Command decoding, literals included: arbitrary bytes fed in arbitrary chunkings must never
//! panic, must stay within the configured memory bounds, and must decode to the same inputs
//! however they are split.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../src/codec.rs"]
#[allow(dead_code)]
mod codec;
// codec.rs uses the pre-parser as `crate::preparse`.
#[path = "../../src/preparse.rs"]
#[allow(dead_code)]
mod preparse;

use codec::{Decoder, DecoderLimits, Input, Mode};

const LIMITS: DecoderLimits = DecoderLimits {
    max_line: 512,
    max_command: 2048,
    max_message_bytes: 8192,
    max_multiappend: 16384,
    max_preauth_literal: 1024,
};

/// Decode `data` fed in pieces of `chunk` bytes. Mode switches follow what the connection
/// does: AUTHENTICATE without initial response and IDLE change what the next line is, and
/// LOGIN / AUTHENTICATE are taken to succeed (the pre-login literal limits end there).
fn run(data: &[u8], chunk: usize, mut authenticated: bool) -> Vec<String> {
    let mut d = Decoder::new(LIMITS);
    d.set_authenticated(authenticated);
    let mut out = Vec::new();
    for piece in data.chunks(chunk.max(1)) {
        d.feed(piece);
        while let Some(input) = d.next_input() {
            let next_mode = match &input {
                Input::Command(c, _) => match c.body.name() {
                    "AUTHENTICATE" => Mode::AuthenticateData,
                    "IDLE" => Mode::IdleDone,
                    _ => Mode::Command,
                },
                _ => Mode::Command,
            };
            if let Input::Command(c, _) = &input
                && matches!(c.body.name(), "LOGIN" | "AUTHENTICATE")
            {
                authenticated = true;
            }
            let stop = matches!(
                input,
                Input::LineTooLong | Input::PreauthLiteralTooBig { .. } | Input::UnexpectedLiteral
            );
            out.push(format!("{input:?}"));
            d.set_mode(next_mode);
            d.set_authenticated(authenticated);
            if stop {
                return out;
            }
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    // Bit 0x20 of the first byte: start logged in (a lower-case first letter does).
    let authenticated = first & 0x20 != 0;
    let whole = run(rest, rest.len(), authenticated);
    let split = run(rest, (first as usize % 16) + 1, authenticated);
    assert_eq!(whole, split, "chunking changed the decoding");
});
