//! Realistic test messages: plain text, multipart/alternative, and mixed with attachments,
//! from 1 KB to 1 MB. Messages are built once as templates (MIME by mail-builder), and each
//! sent copy gets its own Message-ID spliced in, so no two messages are byte-identical (a
//! server deduplicating blobs must not get an unfair advantage) and the hot loop allocates
//! nothing per message beyond the ID.

use mail_builder::MessageBuilder;
use mail_builder::headers::raw::Raw;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::smtp::dot_stuff;

const MARK: &str = "MAILBENCHMARK";

const WORDS: &[&str] = &[
    "invoice",
    "meeting",
    "report",
    "quarterly",
    "project",
    "schedule",
    "budget",
    "review",
    "deadline",
    "proposal",
    "contract",
    "customer",
    "release",
    "feedback",
    "agenda",
    "summary",
    "server",
    "backup",
    "holiday",
    "travel",
    "lunch",
    "update",
    "security",
    "password",
    "network",
    "design",
    "draft",
    "planning",
    "launch",
    "support",
    "ticket",
    "shipment",
    "the",
    "and",
    "with",
    "for",
    "about",
    "please",
    "attached",
    "regards",
    "thanks",
    "tomorrow",
];

/// Words that appear in subjects, for `imap --mode search`.
pub fn search_words() -> &'static [&'static str] {
    &WORDS[..32]
}

fn words(rng: &mut StdRng, bytes: usize, line_len: usize) -> String {
    let mut s = String::with_capacity(bytes + 16);
    let mut col = 0;
    while s.len() < bytes {
        let w = WORDS[rng.gen_range(0..WORDS.len())];
        if col + w.len() + 1 > line_len {
            s.push_str("\r\n");
            col = 0;
        } else if col > 0 {
            s.push(' ');
            col += 1;
        }
        s.push_str(w);
        col += w.len();
    }
    s.push_str("\r\n");
    s
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Plain,
    Alternative,
    Attachment,
}

/// A message with a hole for its Message-ID; `head` and `tail` are already dot-stuffed.
#[derive(Clone, Debug)]
pub struct Template {
    pub kind: Kind,
    head: Vec<u8>,
    tail: Vec<u8>,
}

impl Template {
    pub fn len(&self) -> usize {
        self.head.len() + self.tail.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The parts of a message with id `<id@mailbench>`, ready for SMTP DATA.
    pub fn parts<'a>(&'a self, id: &'a str) -> [&'a [u8]; 3] {
        [&self.head, id.as_bytes(), &self.tail]
    }

    /// Un-stuffed bytes of one message (for tests and checks).
    pub fn message(&self, id: &str) -> Vec<u8> {
        let mut v = Vec::new();
        for p in self.parts(id) {
            v.extend_from_slice(p);
        }
        let mut out = Vec::with_capacity(v.len());
        let mut at_start = true;
        let mut i = 0;
        while i < v.len() {
            if at_start && v[i] == b'.' {
                i += 1;
                if i == v.len() {
                    break;
                }
            }
            at_start = v[i] == b'\n';
            out.push(v[i]);
            i += 1;
        }
        out
    }
}

/// Message-ID local part for message `seq` of run `run`: `<run.seq@mailbench>`.
pub fn message_id(run: &str, seq: u64) -> String {
    format!("{run}.{seq}")
}

/// Parses the sequence number back out of a Message-ID of run `run`.
pub fn parse_seq(header: &[u8], run: &str) -> Option<u64> {
    let needle = format!("<{run}.");
    let i = header
        .windows(needle.len())
        .position(|w| w == needle.as_bytes())?;
    let rest = &header[i + needle.len()..];
    let end = rest.iter().position(|b| !b.is_ascii_digit())?;
    if !rest[end..].starts_with(b"@mailbench>") {
        return None;
    }
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

fn build(rng: &mut StdRng, kind: Kind, run: &str, body_bytes: usize) -> Vec<u8> {
    let subject = format!(
        "{} {} {}",
        WORDS[rng.gen_range(0..32)],
        WORDS[rng.gen_range(0..32)],
        WORDS[rng.gen_range(0..32)]
    );
    let b = MessageBuilder::new()
        .from(("Load Generator", "loadgen@mailbench.example"))
        .to(("Bench Recipient", "recipient@mailbench.test"))
        .subject(subject)
        .message_id(format!("{MARK}@mailbench"))
        .header("X-Mailbench-Run", Raw::new(run.to_string()))
        .date(1_764_288_000i64);
    let b = match kind {
        Kind::Plain => b.text_body(words(rng, body_bytes, 72)),
        Kind::Alternative => {
            let text = words(rng, body_bytes * 2 / 5, 72);
            let html = format!(
                "<html><body><p>{}</p></body></html>",
                words(rng, body_bytes * 3 / 5, 72)
            );
            b.text_body(text).html_body(html)
        }
        Kind::Attachment => {
            let text = words(rng, 600.min(body_bytes / 4), 72);
            // Base64 grows binary by 4/3 plus line breaks.
            let bin_len = (body_bytes.saturating_sub(text.len())) * 3 / 4;
            let mut bin = vec![0u8; bin_len];
            rng.fill(&mut bin[..]);
            let (ct, name) = if rng.gen_bool(0.5) {
                ("application/pdf", "report.pdf")
            } else {
                ("image/jpeg", "photo.jpg")
            };
            b.text_body(text).attachment(ct, name, bin)
        }
    };
    b.write_to_vec().expect("writing to a Vec cannot fail")
}

/// A template of `kind` whose serialized size is within a few bytes of `size`.
pub fn template(rng: &mut StdRng, kind: Kind, run: &str, size: usize) -> Template {
    let mut body = size.saturating_sub(600).max(16);
    let mut raw = build(rng, kind, run, body);
    // The MIME overhead depends on the body, so correct twice towards the target.
    for _ in 0..2 {
        let diff = size as i64 - raw.len() as i64;
        if diff.abs() < 64 {
            break;
        }
        body = (body as i64 + diff).max(16) as usize;
        raw = build(rng, kind, run, body);
    }
    let stuffed = dot_stuff(&raw);
    let at = stuffed
        .windows(MARK.len())
        .position(|w| w == MARK.as_bytes())
        .expect("the marker is in the Message-ID header");
    Template {
        kind,
        head: stuffed[..at].to_vec(),
        tail: stuffed[at + MARK.len()..].to_vec(),
    }
}

/// How message sizes are chosen.
#[derive(Clone, Copy, Debug)]
pub enum SizeDist {
    Fixed(usize),
    /// A mailbox-like mix: mostly small text, some HTML, a tail of attachments up to 1 MB.
    Real,
}

/// (share of messages, min size, max size, kind) of the realistic mix.
const REAL: &[(f64, usize, usize, Kind)] = &[
    (0.40, 1_024, 4_096, Kind::Plain),
    (0.25, 4_096, 16_384, Kind::Alternative),
    (0.15, 16_384, 65_536, Kind::Alternative),
    (0.12, 65_536, 262_144, Kind::Attachment),
    (0.08, 262_144, 1_048_576, Kind::Attachment),
];

/// Builds `count` templates; messages cycle through them.
pub fn corpus(dist: SizeDist, run: &str, count: usize, seed: u64) -> Vec<Template> {
    let mut rng = StdRng::seed_from_u64(seed);
    match dist {
        SizeDist::Fixed(size) => {
            let count = count.clamp(1, 8);
            (0..count)
                .map(|_| template(&mut rng, Kind::Plain, run, size))
                .collect()
        }
        SizeDist::Real => (0..count.max(1))
            .map(|_| {
                let mut x: f64 = rng.r#gen();
                let mut pick = REAL[REAL.len() - 1];
                for b in REAL {
                    if x < b.0 {
                        pick = *b;
                        break;
                    }
                    x -= b.0;
                }
                // Log-uniform within the bucket: small sizes are more common than large.
                let (lo, hi) = ((pick.1 as f64).ln(), (pick.2 as f64).ln());
                let size = rng.gen_range(lo..hi).exp() as usize;
                template(&mut rng, pick.3, run, size)
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_size_is_close_to_the_target() {
        for size in [1_024, 4_096, 100_000] {
            let t = &corpus(SizeDist::Fixed(size), "r1", 1, 7)[0];
            let m = t.message(&message_id("r1", 1));
            let diff = (m.len() as i64 - size as i64).abs();
            assert!(diff < 128, "size {size}: got {}", m.len());
        }
    }

    #[test]
    fn messages_are_unique_and_carry_their_sequence() {
        let t = &corpus(SizeDist::Fixed(2048), "run9", 1, 1)[0];
        let a = t.message(&message_id("run9", 1));
        let b = t.message(&message_id("run9", 2));
        assert_ne!(a, b);
        assert_eq!(parse_seq(&a, "run9"), Some(1));
        assert_eq!(parse_seq(&b, "run9"), Some(2));
        assert_eq!(parse_seq(&b, "other"), None);
        let text = String::from_utf8_lossy(&a);
        assert!(text.contains("X-Mailbench-Run: run9\r\n"), "{text}");
        assert!(
            text.contains("Message-ID: <run9.1@mailbench>\r\n"),
            "{text}"
        );
    }

    #[test]
    fn realistic_mix_has_every_kind_and_range() {
        let c = corpus(SizeDist::Real, "r", 200, 3);
        for kind in [Kind::Plain, Kind::Alternative, Kind::Attachment] {
            assert!(c.iter().any(|t| t.kind == kind), "{kind:?} missing");
        }
        let min = c.iter().map(Template::len).min().unwrap();
        let max = c.iter().map(Template::len).max().unwrap();
        assert!((900..4_096).contains(&min), "min {min}");
        assert!(max > 262_144 && max <= 1_100_000, "max {max}");
        let alt = c
            .iter()
            .find(|t| t.kind == Kind::Alternative)
            .unwrap()
            .message("x");
        assert!(String::from_utf8_lossy(&alt).contains("multipart/alternative"));
        let att = c
            .iter()
            .find(|t| t.kind == Kind::Attachment)
            .unwrap()
            .message("x");
        assert!(String::from_utf8_lossy(&att).contains("Content-Disposition: attachment"));
    }

    #[test]
    fn templates_are_dot_stuffed_and_crlf_terminated() {
        let t = &corpus(SizeDist::Fixed(3000), "r", 1, 5)[0];
        let mut all = Vec::new();
        for p in t.parts("r.1") {
            all.extend_from_slice(p);
        }
        assert!(all.ends_with(b"\r\n"));
        assert!(!all.windows(5).any(|w| w == b"\r\n.\r\n"));
    }
}
