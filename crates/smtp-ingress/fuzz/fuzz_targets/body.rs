//! Fuzz the DATA and BDAT readers. Invariants: no panic; the kept body never exceeds the
//! limit; the reader never consumes past the end-of-data marker; under `Normalize` the kept
//! body has no bare CR or LF; a DATA body is the same whatever the chunking; the BDAT bare
//! CR/LF check agrees with its normalisation; giving up keeping the body midway (the memory
//! budget ran out) changes nothing but the kept body.
#![no_main]

#[path = "../../src/codec.rs"]
#[allow(dead_code)]
mod codec;

use codec::{BareLineEnd, BdatReader, DataReader};
use libfuzzer_sys::fuzz_target;

const MAX: u64 = 256;

fn read(input: &[u8], step: usize, policy: BareLineEnd) -> (Vec<u8>, Option<codec::BodyEnd>, usize) {
    let mut r = DataReader::new(MAX, policy);
    let mut used = 0;
    while used < input.len() {
        let end = (used + step).min(input.len());
        let (n, done) = r.feed(&input[used..end]);
        assert!(n <= end - used);
        used += n;
        if done.is_some() {
            return (r.take_body(), done, used);
        }
    }
    (r.take_body(), None, used)
}

fuzz_target!(|data: &[u8]| {
    let (step, input) = match data.split_first() {
        Some((s, rest)) => ((*s as usize % 16) + 1, rest),
        None => return,
    };
    for policy in [BareLineEnd::Reject, BareLineEnd::Normalize] {
        let (body, end, used) = read(input, step, policy);
        let (body1, end1, used1) = read(input, input.len().max(1), policy);
        assert_eq!((&body, &end, used), (&body1, &end1, used1), "chunking changed the result");
        assert!(body.len() as u64 <= MAX);
        if let Some(end) = &end {
            assert!(input[..used].ends_with(b"\r\n.\r\n") || used == 3 && input.starts_with(b".\r\n"));
            assert_eq!(end.too_large, end.size > MAX);
        }
        if policy == BareLineEnd::Normalize {
            for (i, b) in body.iter().enumerate() {
                if *b == b'\n' {
                    assert!(i > 0 && body[i - 1] == b'\r', "bare LF kept");
                }
                if *b == b'\r' && !(end.as_ref().is_some_and(|e| e.too_large)) {
                    assert!(body.get(i + 1).is_none_or(|n| *n == b'\n'), "bare CR kept");
                }
            }
        }
    }
    // Stop keeping after the first piece: same end and consumption, nothing kept.
    let (_, end_all, used_all) = read(input, step, BareLineEnd::Reject);
    let mut r = DataReader::new(MAX, BareLineEnd::Reject);
    let mut used = 0;
    let mut end = None;
    while used < input.len() && end.is_none() {
        let stop = (used + step).min(input.len());
        let (n, e) = r.feed(&input[used..stop]);
        used += n;
        end = e;
        r.stop_keeping();
        assert_eq!(r.kept(), 0);
    }
    assert_eq!((end, used), (end_all, used_all), "stop_keeping changed the result");
    assert!(r.take_body().is_empty());
    // BDAT: exactly `size` octets are taken, at most MAX kept.
    let size = input.len() as u64 / 2;
    let mut r = BdatReader::new(size);
    let mut body = Vec::new();
    let mut used = 0;
    while r.remaining() > 0 {
        let end = (used + step).min(input.len());
        let (n, _) = r.feed(&input[used..end], &mut body, MAX);
        used += n;
    }
    assert_eq!(used as u64, size);
    assert!(body.len() as u64 <= MAX);
    // The bare CR/LF policy of text BDAT bodies: Reject flags exactly the bodies Normalize
    // changes, and a normalised body is clean.
    use codec::{check_line_ends, LineEnds};
    match (check_line_ends(input, BareLineEnd::Reject), check_line_ends(input, BareLineEnd::Normalize)) {
        (LineEnds::Clean, LineEnds::Clean) => {}
        (LineEnds::Bare, LineEnds::Normalized(n)) => {
            assert!(n.len() > input.len() || n != input);
            assert_eq!(check_line_ends(&n, BareLineEnd::Reject), LineEnds::Clean, "normalised body not clean");
        }
        other => panic!("policies disagree: {other:?}"),
    }
});
