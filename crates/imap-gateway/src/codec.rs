//! Bytes → client messages. Pure: no I/O, no tokio. Framing (lines and literals) is done by
//! imap-codec's `Fragmentizer`, parsing by its `CommandCodec` / `AuthenticateDataCodec` /
//! `IdleDoneCodec`; this layer adds what a server must decide itself: when to send a
//! continuation request for a synchronizing literal, and the size limits (RFC 7888 `[TOOBIG]`).

use bounded_static::IntoBoundedStatic;
use imap_codec::decode::Decoder as _;
use imap_codec::fragmentizer::{DecodeMessageError, FragmentInfo, Fragmentizer};
use imap_codec::imap_types::auth::AuthenticateData;
use imap_codec::imap_types::command::Command;
use imap_codec::imap_types::core::{LiteralMode, Tag};
use imap_codec::{AuthenticateDataCodec, CommandCodec, IdleDoneCodec};

use crate::preparse::{Ext, Pre, preparse};

/// What the next complete client message is expected to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Command,
    /// A line answering an AUTHENTICATE continuation request.
    AuthenticateData,
    /// `DONE` ending IDLE.
    IdleDone,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Input {
    /// A command, with what the pre-parser took out of it (`preparse`).
    Command(Box<Command<'static>>, Ext),
    AuthenticateData(AuthenticateData<'static>),
    IdleDone,
    /// The client announced a synchronizing literal within the limits: send `+ ...`.
    ContinueLiteral,
    /// Unparsable message (answer BAD; the connection lives on).
    Bad {
        tag: Option<Tag<'static>>,
    },
    /// A literal or command over the limits. `append`: the command was APPEND (answer NO
    /// [TOOBIG] per RFC 9051), else BAD [TOOBIG].
    TooBig {
        tag: Option<Tag<'static>>,
        append: bool,
    },
    /// A line longer than `max_line`: its end cannot be found without buffering it, so the
    /// connection must end.
    LineTooLong,
    /// APPEND before login, refused before any literal byte is asked for or buffered
    /// (answer BAD, as for any command in the wrong state; the connection lives on).
    NotAuthenticated {
        tag: Option<Tag<'static>>,
    },
    /// A non-synchronizing literal over the pre-login limit: the client sends it without
    /// waiting, and skipping it would mean reading all of it for someone not logged in, so
    /// the connection must end (RFC 7888 §4 allows closing it).
    PreauthLiteralTooBig {
        tag: Option<Tag<'static>>,
    },
    /// A non-synchronizing literal in AUTHENTICATE data or DONE, where no literal is allowed:
    /// its bytes follow without waiting and would have to be read to be skipped, so the
    /// connection must end (as for `PreauthLiteralTooBig`; AUTHENTICATE data comes before
    /// login).
    UnexpectedLiteral,
}

#[derive(Debug, Clone, Copy)]
pub struct DecoderLimits {
    pub max_line: u32,
    pub max_command: u32,
    /// Largest literal of an APPEND (one message).
    pub max_message_bytes: u32,
    /// Largest APPEND command, all literals together (MULTIAPPEND); at least `max_message_bytes`.
    pub max_multiappend: u32,
    /// Largest command with literals before login (`Decoder::set_authenticated`).
    pub max_preauth_literal: u32,
}

pub struct Decoder {
    frag: Fragmentizer,
    mode: Mode,
    limits: DecoderLimits,
    /// Where the fragment being parsed started (to measure a partial line).
    fragment_start: usize,
    in_literal: bool,
    /// The current message announced an over-limit literal.
    too_big: Option<bool>,
    /// The current message is an APPEND before login (its non-synchronizing literals are
    /// consumed within the pre-login limit, then the command is refused).
    refused: bool,
    /// Whether the session is logged in: before, literals are held to `max_preauth_literal`
    /// and APPEND is refused.
    authenticated: bool,
}

impl Decoder {
    pub fn new(limits: DecoderLimits) -> Self {
        // The fragmentizer keeps at most this much of one message; anything beyond is dropped
        // (and the message rejected), so memory per connection is bounded.
        let cap = limits
            .max_message_bytes
            .max(limits.max_multiappend)
            .saturating_add(limits.max_command)
            .saturating_add(limits.max_line);
        Decoder {
            frag: Fragmentizer::new(cap),
            mode: Mode::Command,
            limits,
            fragment_start: 0,
            in_literal: false,
            too_big: None,
            refused: false,
            authenticated: false,
        }
    }

    /// Tell the decoder the session's state; it applies to literals announced from now on.
    pub fn set_authenticated(&mut self, yes: bool) {
        self.authenticated = yes;
    }

    pub fn set_mode(&mut self, mode: Mode) {
        self.mode = mode;
    }

    /// Part of a command line (not literal data) has arrived and its end has not.
    pub fn partial_line(&self) -> bool {
        !self.in_literal && self.frag.message_bytes().len() > self.fragment_start
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        self.frag.enqueue_bytes(bytes);
    }

    /// The next decision, or `None` when more bytes are needed.
    pub fn next_input(&mut self) -> Option<Input> {
        loop {
            let Some(fragment) = self.frag.progress() else {
                if !self.in_literal {
                    let partial = self.frag.message_bytes().len() - self.fragment_start;
                    // The same bound as for a complete line (`max_line` plus CRLF): without
                    // its LF a line is at least one byte longer than what has arrived. A
                    // tighter bound here made the verdict depend on how input was split.
                    if partial > self.limits.max_line as usize + 1 {
                        return Some(Input::LineTooLong);
                    }
                }
                return None;
            };
            match fragment {
                FragmentInfo::Line {
                    end, announcement, ..
                } => {
                    self.fragment_start = end;
                    if end - fragment.range().start > self.limits.max_line as usize + 2 {
                        return Some(Input::LineTooLong);
                    }
                    if let Some(a) = announcement {
                        self.in_literal = true;
                        if self.mode != Mode::Command {
                            // Literals are never part of AUTHENTICATE data or DONE, and this
                            // mode is reachable before login: consuming the literal (even to
                            // discard it) would make the fragmentizer store it up to its cap
                            // of `max_message_bytes`, whatever the login state.
                            return Some(match a.mode {
                                LiteralMode::Sync => {
                                    // No "+": the client does not send the literal.
                                    self.frag.skip_message();
                                    self.reset_message();
                                    Input::Bad { tag: None }
                                }
                                LiteralMode::NonSync => Input::UnexpectedLiteral,
                            });
                        }
                        let append = self.is_append();
                        let limit = if !self.authenticated {
                            self.limits.max_preauth_literal
                        } else if append {
                            self.limits.max_message_bytes
                        } else {
                            self.limits.max_command
                        };
                        let total = self.frag.message_bytes().len() as u64 + a.length as u64;
                        // An APPEND may carry several messages (MULTIAPPEND): each literal is
                        // held to `max_message_bytes`, the whole command to `max_multiappend`.
                        let over = if append && self.authenticated {
                            let whole = self.limits.max_multiappend.max(limit);
                            a.length as u64 > limit as u64 || total > whole as u64
                        } else {
                            total > limit as u64
                        };
                        if !self.authenticated && (append || over) {
                            let tag = || self.frag.decode_tag().map(|t| t.into_static());
                            let refuse = |tag| {
                                if append {
                                    Input::NotAuthenticated { tag }
                                } else {
                                    Input::TooBig { tag, append }
                                }
                            };
                            match a.mode {
                                LiteralMode::Sync => {
                                    // No "+": the client does not send the literal.
                                    let tag = tag();
                                    self.frag.skip_message();
                                    self.reset_message();
                                    return Some(refuse(tag));
                                }
                                LiteralMode::NonSync if over => {
                                    return Some(Input::PreauthLiteralTooBig { tag: tag() });
                                }
                                LiteralMode::NonSync => {
                                    self.refused = true;
                                    self.frag.poison_message();
                                    continue;
                                }
                            }
                        }
                        if over {
                            match a.mode {
                                LiteralMode::Sync => {
                                    // The client waits for our "+": refusing means it will not
                                    // send the literal, so the message ends here.
                                    let tag = self.frag.decode_tag().map(|t| t.into_static());
                                    self.frag.skip_message();
                                    self.reset_message();
                                    return Some(Input::TooBig { tag, append });
                                }
                                LiteralMode::NonSync => {
                                    self.too_big = Some(append);
                                    self.frag.poison_message();
                                    continue;
                                }
                            }
                        }
                        if a.mode == LiteralMode::Sync && self.too_big.is_none() && !self.refused {
                            return Some(Input::ContinueLiteral);
                        }
                        continue;
                    }
                }
                FragmentInfo::Literal { end, .. } => {
                    self.fragment_start = end;
                    self.in_literal = false;
                    continue;
                }
            }
            // A line without announcement completes the message.
            debug_assert!(self.frag.is_message_complete());
            let input = self.decode();
            self.reset_message();
            return Some(input);
        }
    }

    fn reset_message(&mut self) {
        self.fragment_start = 0;
        self.in_literal = false;
        self.too_big = None;
        self.refused = false;
    }

    fn is_append(&self) -> bool {
        let bytes = self.frag.message_bytes();
        let mut words = bytes.split(|b| *b == b' ');
        let _tag = words.next();
        let verb = words.next().unwrap_or_default();
        let verb = if verb.eq_ignore_ascii_case(b"UID") {
            words.next().unwrap_or_default()
        } else {
            verb
        };
        verb.eq_ignore_ascii_case(b"APPEND")
    }

    fn decode_plain(&mut self) -> Input {
        match self.frag.decode_message(&CommandCodec::default()) {
            Ok(cmd) => Input::Command(Box::new(cmd.into_static()), Ext::default()),
            Err(DecodeMessageError::MessageTooLong { .. }) => Input::TooBig {
                tag: self.frag.decode_tag().map(|t| t.into_static()),
                append: self.is_append(),
            },
            Err(_) => Input::Bad {
                tag: self.frag.decode_tag().map(|t| t.into_static()),
            },
        }
    }

    fn decode(&mut self) -> Input {
        if self.refused {
            let tag = self.frag.decode_tag().map(|t| t.into_static());
            return Input::NotAuthenticated { tag };
        }
        if let Some(append) = self.too_big {
            let tag = self.frag.decode_tag().map(|t| t.into_static());
            return Input::TooBig { tag, append };
        }
        match self.mode {
            Mode::Command => {
                // Forms imap-codec does not know (ESEARCH, SEARCHRES, LIST-EXTENDED) first.
                if !self.frag.is_message_poisoned() && !self.frag.is_max_message_size_exceeded() {
                    match preparse(self.frag.message_bytes()) {
                        Pre::Unchanged => {}
                        Pre::Bad(_) => {
                            return Input::Bad {
                                tag: self.frag.decode_tag().map(|t| t.into_static()),
                            };
                        }
                        Pre::Rewritten(bytes, ext) => {
                            return match CommandCodec::default().decode(&bytes) {
                                Ok((b"", cmd)) => Input::Command(Box::new(cmd.into_static()), ext),
                                _ => Input::Bad {
                                    tag: self.frag.decode_tag().map(|t| t.into_static()),
                                },
                            };
                        }
                    }
                }
                self.decode_plain()
            }
            Mode::AuthenticateData => {
                match self.frag.decode_message(&AuthenticateDataCodec::default()) {
                    Ok(data) => Input::AuthenticateData(data.into_static()),
                    Err(_) => Input::Bad { tag: None },
                }
            }
            Mode::IdleDone => match self.frag.decode_message(&IdleDoneCodec::default()) {
                Ok(_) => Input::IdleDone,
                Err(_) => Input::Bad { tag: None },
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use imap_codec::imap_types::command::CommandBody;

    fn limits() -> DecoderLimits {
        DecoderLimits {
            max_line: 200,
            max_command: 1000,
            max_message_bytes: 5000,
            max_multiappend: 8000,
            max_preauth_literal: 300,
        }
    }

    /// Feed `input` in chunks of `chunk` bytes, collecting every decision.
    fn run_as(
        authenticated: bool,
        input: &[u8],
        chunk: usize,
        modes: &[(usize, Mode)],
    ) -> Vec<Input> {
        let mut d = Decoder::new(limits());
        d.set_authenticated(authenticated);
        let mut out = Vec::new();
        for piece in input.chunks(chunk) {
            d.feed(piece);
            while let Some(i) = d.next_input() {
                // These end the connection: nothing after them is ever decoded.
                let end = matches!(
                    i,
                    Input::LineTooLong
                        | Input::PreauthLiteralTooBig { .. }
                        | Input::UnexpectedLiteral
                );
                out.push(i);
                if end {
                    return out;
                }
                if let Some((_, m)) = modes.iter().find(|(n, _)| *n == out.len()) {
                    d.set_mode(*m);
                }
            }
        }
        out
    }

    fn same_in_all_chunkings(input: &[u8], modes: &[(usize, Mode)]) -> Vec<Input> {
        same_in_all_chunkings_as(true, input, modes)
    }

    fn same_in_all_chunkings_as(
        authenticated: bool,
        input: &[u8],
        modes: &[(usize, Mode)],
    ) -> Vec<Input> {
        let whole = run_as(authenticated, input, input.len().max(1), modes);
        for chunk in [1, 2, 3, 4, 7, 8, 16, 64] {
            assert_eq!(
                run_as(authenticated, input, chunk, modes),
                whole,
                "chunk size {chunk}"
            );
        }
        whole
    }

    #[test]
    fn m1_append_before_login_is_refused_without_continuation() {
        let login = |out: &Input| matches!(out, Input::Command(c, _) if c.name() == "LOGIN");
        let noop = |out: &Input| matches!(out, Input::Command(c, _) if c.name() == "NOOP");
        // Synchronizing: refused at once, no "+", the next command decodes.
        let out =
            same_in_all_chunkings_as(false, b"a1 APPEND INBOX {62914560}\r\na2 NOOP\r\n", &[]);
        assert_eq!(out[0], Input::NotAuthenticated { tag: tag("a1") });
        assert!(noop(&out[1]), "{out:?}");
        assert_eq!(out.len(), 2);
        let out = same_in_all_chunkings_as(false, b"a1 UID APPEND INBOX {5}\r\n", &[]);
        assert_eq!(out, vec![Input::NotAuthenticated { tag: tag("a1") }]);
        // Non-synchronizing and small: consumed (bounded), then refused.
        let out =
            same_in_all_chunkings_as(false, b"a1 APPEND INBOX {5+}\r\nhello\r\na2 NOOP\r\n", &[]);
        assert_eq!(out[0], Input::NotAuthenticated { tag: tag("a1") });
        assert!(noop(&out[1]), "{out:?}");
        // Non-synchronizing and large: the connection must end, nothing is buffered.
        let mut d = Decoder::new(limits());
        d.feed(b"a1 APPEND INBOX {62914560+}\r\n");
        d.feed(&[b'x'; 4096]);
        assert_eq!(
            d.next_input(),
            Some(Input::PreauthLiteralTooBig { tag: tag("a1") })
        );
        assert!(d.frag.message_bytes().len() < 100);
        let mut d = Decoder::new(limits());
        d.feed(b"a1 LOGIN {400+}\r\n");
        assert_eq!(
            d.next_input(),
            Some(Input::PreauthLiteralTooBig { tag: tag("a1") })
        );
        // LOGIN with literals within the pre-login limit works; beyond it is TOOBIG.
        let out = same_in_all_chunkings_as(false, b"a1 LOGIN {5}\r\nalice {3}\r\npw1\r\n", &[]);
        assert_eq!(out[0], Input::ContinueLiteral);
        assert_eq!(out[1], Input::ContinueLiteral);
        assert!(login(&out[2]), "{out:?}");
        let out = same_in_all_chunkings_as(false, b"a1 LOGIN alice {400}\r\na2 NOOP\r\n", &[]);
        assert_eq!(
            out[0],
            Input::TooBig {
                tag: tag("a1"),
                append: false
            }
        );
        assert!(noop(&out[1]), "{out:?}");
        // Logged in, the APPEND limit applies again.
        let mut d = Decoder::new(limits());
        d.feed(b"a1 APPEND INBOX {62914560}\r\n");
        assert_eq!(
            d.next_input(),
            Some(Input::NotAuthenticated { tag: tag("a1") })
        );
        d.set_authenticated(true);
        d.feed(b"a2 APPEND INBOX {4000}\r\n");
        assert_eq!(d.next_input(), Some(Input::ContinueLiteral));
    }

    #[test]
    fn m1_literal_in_authenticate_data_or_done_is_never_buffered() {
        // `a AUTHENTICATE PLAIN` puts the connection in data mode before any credentials;
        // a literal there used to be poisoned but still stored up to the fragmentizer cap.
        for authenticated in [false, true] {
            for (verb, mode) in [
                ("a1 AUTHENTICATE PLAIN", Mode::AuthenticateData),
                ("a1 IDLE", Mode::IdleDone),
            ] {
                let is_verb = |i: &Input| matches!(i, Input::Command(..));
                // Synchronizing, of any size: refused with no "+", nothing stored, and the
                // next line is a command again (the connection switches back on BAD).
                for size in [5u64, 4_000, 67_000_000] {
                    let input = format!("{verb}\r\nx {{{size}}}\r\na2 NOOP\r\n");
                    let out = same_in_all_chunkings_as(
                        authenticated,
                        input.as_bytes(),
                        &[(1, mode), (2, Mode::Command)],
                    );
                    assert!(is_verb(&out[0]), "{out:?}");
                    assert_eq!(out[1], Input::Bad { tag: None }, "{verb} {size}");
                    assert!(
                        matches!(&out[2], Input::Command(c, _) if c.name() == "NOOP"),
                        "{out:?}"
                    );
                    assert_eq!(out.len(), 3);
                }
                // Non-synchronizing, of any size: the connection ends before the literal.
                for size in [5u64, 4_000, 67_000_000] {
                    let mut input = format!("{verb}\r\nx {{{size}+}}\r\n").into_bytes();
                    input.extend(std::iter::repeat_n(b'x', 6_000));
                    let out = same_in_all_chunkings_as(authenticated, &input, &[(1, mode)]);
                    assert!(is_verb(&out[0]), "{out:?}");
                    assert_eq!(out[1], Input::UnexpectedLiteral, "{verb} {size}");
                    assert_eq!(out.len(), 2);
                }
                // What the decoder holds after the attack's first megabyte: the line only.
                let mut d = Decoder::new(limits());
                d.set_authenticated(authenticated);
                d.feed(format!("{verb}\r\n").as_bytes());
                assert!(is_verb(&d.next_input().unwrap()));
                d.set_mode(mode);
                d.feed(b"x {67000000+}\r\n");
                let mut got = None;
                for _ in 0..256 {
                    d.feed(&[b'x'; 4096]);
                    if let Some(i) = d.next_input() {
                        got = Some(i);
                        break;
                    }
                }
                assert_eq!(got, Some(Input::UnexpectedLiteral));
                assert!(d.frag.message_bytes().len() < 100);
            }
        }
    }

    fn tag(t: &str) -> Option<Tag<'static>> {
        Some(Tag::try_from(t.to_string()).unwrap())
    }

    #[test]
    fn pipelined_commands_decode_identically_in_any_chunking() {
        let out = same_in_all_chunkings(b"a1 NOOP\r\na2 CAPABILITY\r\na3 LOGOUT\r\n", &[]);
        let names: Vec<&str> = out
            .iter()
            .map(|i| match i {
                Input::Command(c, _) => c.name(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(names, ["NOOP", "CAPABILITY", "LOGOUT"]);
    }

    #[test]
    fn sync_literal_asks_for_continuation_then_decodes() {
        let out = same_in_all_chunkings(b"a1 LOGIN {5}\r\nalice {3}\r\npw1\r\na2 NOOP\r\n", &[]);
        assert_eq!(out[0], Input::ContinueLiteral);
        assert_eq!(out[1], Input::ContinueLiteral);
        match &out[2] {
            Input::Command(c, _) => match &c.body {
                CommandBody::Login { username, .. } => {
                    assert_eq!(username.as_ref(), b"alice")
                }
                other => panic!("{other:?}"),
            },
            other => panic!("{other:?}"),
        }
        assert!(matches!(&out[3], Input::Command(c, _) if c.name() == "NOOP"));
        assert_eq!(out.len(), 4);
    }

    #[test]
    fn non_sync_literal_needs_no_continuation() {
        let out =
            same_in_all_chunkings(b"a1 APPEND INBOX {11+}\r\nSubject: x\n\r\na2 NOOP\r\n", &[]);
        assert_eq!(out.len(), 2, "{out:?}");
        match &out[0] {
            Input::Command(c, _) => assert_eq!(c.name(), "APPEND"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn literal_bytes_are_never_taken_for_commands() {
        // The literal contains something that looks like a command.
        let out = same_in_all_chunkings(b"a1 LOGIN {10+}\r\nx LOGOUT\r\n pw\r\n", &[]);
        assert_eq!(out.len(), 1);
        assert!(matches!(&out[0], Input::Command(c, _) if c.name() == "LOGIN"));
    }

    #[test]
    fn bad_syntax_is_reported_with_its_tag_and_decoding_continues() {
        let out = same_in_all_chunkings(b"a1 FROB x\r\na2 NOOP\r\n* bad\r\n", &[]);
        assert_eq!(out[0], Input::Bad { tag: tag("a1") });
        assert!(matches!(&out[1], Input::Command(c, _) if c.name() == "NOOP"));
        assert_eq!(out[2], Input::Bad { tag: None });
    }

    #[test]
    fn oversized_sync_literal_is_refused_without_continuation() {
        let out = same_in_all_chunkings(b"a1 LOGIN {5000}\r\na2 NOOP\r\n", &[]);
        assert_eq!(
            out[0],
            Input::TooBig {
                tag: tag("a1"),
                append: false
            }
        );
        assert!(matches!(&out[1], Input::Command(c, _) if c.name() == "NOOP"));
        let out = same_in_all_chunkings(b"a1 APPEND INBOX {5001}\r\n", &[]);
        assert_eq!(
            out,
            vec![Input::TooBig {
                tag: tag("a1"),
                append: true
            }]
        );
    }

    #[test]
    fn oversized_non_sync_literal_is_consumed_and_refused() {
        let mut input = b"a1 APPEND INBOX {6000+}\r\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', 6000));
        input.extend(b"\r\na2 NOOP\r\n");
        let out = same_in_all_chunkings(&input, &[]);
        assert_eq!(
            out[0],
            Input::TooBig {
                tag: tag("a1"),
                append: true
            }
        );
        assert!(matches!(&out[1], Input::Command(c, _) if c.name() == "NOOP"));
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn a_line_at_the_limit_is_judged_alike_in_any_chunking() {
        // max_line 200: 200 bytes plus CRLF is allowed, one more is not.
        for (len, too_long) in [(200, false), (201, true)] {
            let mut input = b"a1 LOGIN x ".to_vec();
            input.resize(len, b'y');
            input.extend(b"\r\na2 NOOP\r\n");
            let out = same_in_all_chunkings(&input, &[]);
            assert_eq!(out[0] == Input::LineTooLong, too_long, "{len}: {out:?}");
        }
    }

    #[test]
    fn overlong_line_ends_the_connection_without_buffering_it() {
        let mut d = Decoder::new(limits());
        d.feed(b"a1 NOOP ");
        assert_eq!(d.next_input(), None);
        d.feed(&[b'x'; 300]);
        assert_eq!(d.next_input(), Some(Input::LineTooLong));
    }

    #[test]
    fn authenticate_data_and_idle_done_modes() {
        let input = b"a1 AUTHENTICATE PLAIN\r\nAGFsaWNlAHB3\r\na2 IDLE\r\nDONE\r\na3 NOOP\r\n";
        let out = same_in_all_chunkings(
            input,
            &[
                (1, Mode::AuthenticateData),
                (2, Mode::Command),
                (3, Mode::IdleDone),
                (4, Mode::Command),
            ],
        );
        assert!(matches!(&out[0], Input::Command(c, _) if c.name() == "AUTHENTICATE"));
        match &out[1] {
            Input::AuthenticateData(AuthenticateData::Continue(d)) => {
                assert_eq!(d.declassify().as_ref(), b"\0alice\0pw")
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(&out[2], Input::Command(c, _) if c.name() == "IDLE"));
        assert_eq!(out[3], Input::IdleDone);
        assert!(matches!(&out[4], Input::Command(c, _) if c.name() == "NOOP"));
    }

    #[test]
    fn search_return_dollar_and_extended_list_decode_in_any_chunking() {
        use crate::preparse::ReturnOpt;
        use imap_codec::imap_types::search::SearchKey;
        use imap_codec::imap_types::sequence::{SeqOrUid, Sequence};
        let input = b"a1 UID SEARCH RETURN (SAVE MIN) SUBJECT {3}\r\n$ x\r\n\
a2 FETCH $ FLAGS\r\n\
a3 SEARCH RETURN (BOGUS) ALL\r\n\
a4 LIST (SUBSCRIBED) \"\" (INBOX {4+}\r\nSe%t) RETURN (STATUS (MESSAGES))\r\n\
a5 LIST \"\" * RETURN (NOPE)\r\n\
a6 NOOP\r\n";
        let out = same_in_all_chunkings(input, &[]);
        assert_eq!(out[0], Input::ContinueLiteral);
        match &out[1] {
            Input::Command(c, ext) => {
                assert_eq!(
                    ext.search_return,
                    Some(vec![ReturnOpt::Save, ReturnOpt::Min])
                );
                assert!(!ext.saved);
                match &c.body {
                    CommandBody::Search { criteria, uid, .. } => {
                        assert!(*uid);
                        assert!(
                            matches!(criteria.as_ref(), [SearchKey::Subject(s)] if s.as_ref() == b"$ x"),
                            "{criteria:?}"
                        );
                    }
                    other => panic!("{other:?}"),
                }
            }
            other => panic!("{other:?}"),
        }
        match &out[2] {
            Input::Command(c, ext) => {
                assert!(ext.saved);
                match &c.body {
                    CommandBody::Fetch { sequence_set, .. } => assert!(matches!(
                        sequence_set.0.as_ref(),
                        [Sequence::Range(SeqOrUid::Value(a), SeqOrUid::Value(b))]
                            if a.get() == u32::MAX && b.get() == u32::MAX - 1
                    )),
                    other => panic!("{other:?}"),
                }
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(out[3], Input::Bad { tag: tag("a3") });
        match &out[4] {
            Input::Command(c, ext) => {
                assert_eq!(c.name(), "LIST");
                let l = ext.list.as_ref().expect("extended LIST");
                assert!(l.sel_subscribed);
                assert_eq!(l.patterns, vec![b"INBOX".to_vec(), b"Se%t".to_vec()]);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(out[5], Input::Bad { tag: tag("a5") });
        assert!(
            matches!(&out[6], Input::Command(c, e) if c.name() == "NOOP" && *e == Ext::default())
        );
        assert_eq!(out.len(), 7);
    }

    #[test]
    fn multiappend_decodes_in_any_chunking_with_limits_per_literal_and_per_command() {
        use imap_codec::imap_types::flag::Flag;
        // Three messages: a continuation for each synchronizing literal, then one command.
        let input = b"a1 APPEND INBOX (\\Seen) {3}\r\none \"14-Jul-2021 02:44:25 +0200\" {3+}\r\ntwo ~{5}\r\nth\0ee\r\na2 NOOP\r\n";
        let out = same_in_all_chunkings(input, &[]);
        assert_eq!(out[0], Input::ContinueLiteral);
        assert_eq!(out[1], Input::ContinueLiteral);
        match &out[2] {
            Input::Command(c, ext) => {
                assert!(matches!(&c.body, CommandBody::Append { .. }), "{c:?}");
                let msgs = ext.append.as_ref().expect("several messages");
                assert_eq!(msgs.len(), 3);
                assert_eq!(msgs[0].flags, vec![Flag::Seen]);
                assert_eq!(msgs[0].data, b"one");
                assert!(msgs[0].date.is_none());
                assert!(msgs[1].flags.is_empty());
                assert!(msgs[1].date.is_some());
                assert_eq!(msgs[1].data, b"two");
                assert_eq!(msgs[2].data, b"th\0ee");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(&out[3], Input::Command(c, _) if c.name() == "NOOP"));
        assert_eq!(out.len(), 4);
        // One message stays imap-codec's alone.
        let out = same_in_all_chunkings(b"a1 APPEND INBOX {3+}\r\none\r\n", &[]);
        assert!(matches!(&out[0], Input::Command(_, e) if e.append.is_none()));
        // NUL in a plain literal, bad options of a later message, garbage after a message.
        for bad in [
            &b"a1 APPEND INBOX {3+}\r\none {3+}\r\nt\0o\r\n"[..],
            b"a1 APPEND INBOX {3+}\r\none (\\Seen \"x\") {3+}\r\ntwo\r\n",
            b"a1 APPEND INBOX {3+}\r\none {3+}\r\ntwo x\r\n",
        ] {
            assert_eq!(
                same_in_all_chunkings(bad, &[]),
                vec![Input::Bad { tag: tag("a1") }]
            );
        }
        // max_message_bytes (5000) per literal: the third message is refused before its "+".
        let out = same_in_all_chunkings(
            b"a1 APPEND INBOX {3+}\r\none {3+}\r\ntwo {5001}\r\na2 NOOP\r\n",
            &[],
        );
        assert_eq!(
            out[0],
            Input::TooBig {
                tag: tag("a1"),
                append: true
            }
        );
        assert!(matches!(&out[1], Input::Command(c, _) if c.name() == "NOOP"));
        // max_multiappend (8000) for the whole command: each literal fits, all do not.
        let mut input = b"a1 APPEND INBOX {4000+}\r\n".to_vec();
        input.extend(std::iter::repeat_n(b'x', 4000));
        input.extend(b" {4000}\r\n");
        let out = same_in_all_chunkings(&input, &[]);
        assert_eq!(
            out,
            vec![Input::TooBig {
                tag: tag("a1"),
                append: true
            }]
        );
    }

    #[test]
    fn authenticate_cancel_and_garbage_instead_of_done() {
        let out = same_in_all_chunkings(b"*\r\n", &[]);
        assert_eq!(out, vec![Input::Bad { tag: None }]);
        let mut d = Decoder::new(limits());
        d.set_mode(Mode::AuthenticateData);
        d.feed(b"*\r\n");
        assert_eq!(
            d.next_input(),
            Some(Input::AuthenticateData(AuthenticateData::Cancel))
        );
        d.set_mode(Mode::IdleDone);
        d.feed(b"NOOP\r\n");
        assert_eq!(d.next_input(), Some(Input::Bad { tag: None }));
    }
}
