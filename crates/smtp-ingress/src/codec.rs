//! Bytes → SMTP commands, and the DATA / BDAT body readers. Pure: no I/O, no tokio. Every
//! reader is fed arbitrary chunks and keeps only bounded state, so a client that never sends
//! a line end or sends an endless message cannot make us buffer more than the configured limit.
//!
//! Command arguments (MAIL/RCPT parameters, AUTH mechanisms, BDAT sizes) are parsed by
//! `smtp-proto`; this module frames the lines, adds the RFC 821 commands that crate does not
//! know (SEND/SOML/SAML/TURN) and implements the end-of-data rules, which are where SMTP
//! smuggling happens.

pub use smtp_proto::{MailFrom, RcptTo};

/// One parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Helo(String),
    Ehlo(String),
    Mail(MailFrom<String>),
    Rcpt(RcptTo<String>),
    Data,
    Bdat {
        size: u64,
        last: bool,
    },
    Rset,
    Noop,
    Quit,
    Help(String),
    Vrfy(String),
    Expn(String),
    /// RFC 821 SEND / SOML / SAML: deliver to the user's terminal (see `session`).
    Send(Terminal, MailFrom<String>),
    Turn,
    Etrn(String),
    StartTls,
    Auth {
        mechanism: u64,
        initial: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Terminal {
    /// SEND: display only.
    Send,
    /// SOML: display if the user is online, else mail.
    Soml,
    /// SAML: display and mail.
    Saml,
}

/// Why a command line was refused; the session maps each to its reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandError {
    /// 500 5.5.2
    Unknown,
    /// 501 5.5.4, with the expected syntax.
    Syntax(&'static str),
    /// 501 5.1.7 / 5.1.3
    BadSender,
    BadRecipient,
    /// 555 5.5.4: a MAIL/RCPT parameter we do not support.
    UnsupportedParameter(String),
    /// 500 5.5.2: longer than the line limit (RFC 5321 §4.5.3.1.4).
    LineTooLong,
    /// 500 5.5.6: an AUTH line longer than the AUTH limit (RFC 4954 §6).
    AuthLineTooLong,
}

/// Parse one command line (with or without its trailing CRLF).
pub fn parse_command(line: &[u8]) -> Result<Command, CommandError> {
    let line = trim_eol(line);
    let verb_end = line.iter().position(|b| *b == b' ').unwrap_or(line.len());
    let verb = &line[..verb_end];
    let terminal = if verb.eq_ignore_ascii_case(b"SEND") {
        Some(Terminal::Send)
    } else if verb.eq_ignore_ascii_case(b"SOML") {
        Some(Terminal::Soml)
    } else if verb.eq_ignore_ascii_case(b"SAML") {
        Some(Terminal::Saml)
    } else {
        None
    };
    if let Some(t) = terminal {
        // Same argument grammar as MAIL: let smtp-proto parse it as one.
        let mut rewritten = Vec::with_capacity(line.len() + 2);
        rewritten.extend_from_slice(b"MAIL");
        rewritten.extend_from_slice(&line[verb_end..]);
        rewritten.extend_from_slice(b"\r\n");
        return match parse_proto(&rewritten)? {
            Command::Mail(from) => Ok(Command::Send(t, from)),
            _ => Err(CommandError::Syntax("SEND FROM:<reverse-path>")),
        };
    }
    if verb.eq_ignore_ascii_case(b"TURN") {
        return if verb_end == line.len() {
            Ok(Command::Turn)
        } else {
            Err(CommandError::Syntax("TURN"))
        };
    }
    let mut buf = Vec::with_capacity(line.len() + 2);
    buf.extend_from_slice(line);
    buf.extend_from_slice(b"\r\n");
    let mut cmd = parse_proto(&buf)?;
    if let Command::Rcpt(to) = &mut cmd
        && to.address.is_empty()
    {
        // smtp-proto reads both `<>` and `<Postmaster>` as an empty path. Only the second is
        // a forward-path (RFC 5321 §4.1.1.3), and it must be accepted (§4.5.1); the session
        // decides whose mailbox it is.
        if !is_postmaster_path(line) {
            return Err(CommandError::BadRecipient);
        }
        to.address = "postmaster".into();
    }
    Ok(cmd)
}

/// The path of a RCPT line is `<postmaster>`, in any case.
fn is_postmaster_path(line: &[u8]) -> bool {
    let Some(open) = line.iter().position(|b| *b == b'<') else {
        return false;
    };
    let rest = &line[open + 1..];
    rest.iter()
        .position(|b| *b == b'>')
        .is_some_and(|close| rest[..close].eq_ignore_ascii_case(b"postmaster"))
}

fn trim_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn parse_proto(buf: &[u8]) -> Result<Command, CommandError> {
    use smtp_proto::Error as E;
    use smtp_proto::Request as R;
    let req = R::parse(&mut buf.iter()).map_err(|e| match e {
        E::UnknownCommand => CommandError::Unknown,
        E::InvalidSenderAddress => CommandError::BadSender,
        E::InvalidRecipientAddress => CommandError::BadRecipient,
        E::SyntaxError { syntax } => CommandError::Syntax(syntax),
        E::InvalidParameter { param } => CommandError::Syntax(param),
        E::UnsupportedParameter { param } => CommandError::UnsupportedParameter(param),
        E::NeedsMoreData { .. } | E::ResponseTooLong | E::InvalidResponse { .. } => {
            CommandError::Syntax("command")
        }
    })?;
    Ok(match req {
        R::Ehlo { host } => Command::Ehlo(host.into_owned()),
        R::Helo { host } => Command::Helo(host.into_owned()),
        R::Mail { from } => Command::Mail(from.into_owned()),
        R::Rcpt { to } => Command::Rcpt(to.into_owned()),
        R::Bdat {
            chunk_size,
            is_last,
        } => Command::Bdat {
            size: chunk_size as u64,
            last: is_last,
        },
        R::Auth {
            mechanism,
            initial_response,
        } => Command::Auth {
            mechanism,
            initial: initial_response.into_owned(),
        },
        R::Noop { .. } => Command::Noop,
        R::Vrfy { value } => Command::Vrfy(value.into_owned()),
        R::Expn { value } => Command::Expn(value.into_owned()),
        R::Help { value } => Command::Help(value.into_owned()),
        R::Etrn { name } => Command::Etrn(name.into_owned()),
        R::StartTls => Command::StartTls,
        R::Data => Command::Data,
        R::Rset => Command::Rset,
        R::Quit => Command::Quit,
        // LMTP, ATRN and BURL are not offered on an SMTP port.
        R::Lhlo { .. } | R::Atrn { .. } | R::Burl { .. } => return Err(CommandError::Unknown),
    })
}

/// Line limits in octets, each counting the line end as RFC 5321 §4.5.3.1.4 does (512 for a
/// command line "including the command word and the <CRLF>").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineLimits {
    /// Any command line.
    pub command: usize,
    /// MAIL and RCPT lines: their extension parameters may make them longer (RFC 5321
    /// §4.5.3.1.4 "SMTP extensions may be used to increase this limit"; RFC 1869 lets
    /// parameters add up to 2000 octets).
    pub mail_rcpt: usize,
    /// An AUTH line with its initial response, and each answer to a 334 challenge: RFC 4954
    /// §4 wants the largest response of a supported mechanism handled (12288 octets).
    pub auth: usize,
}

impl LineLimits {
    /// The RFC values: 512, 512 + 2000 and 12288.
    pub const RFC: LineLimits = LineLimits {
        command: 512,
        mail_rcpt: 2512,
        auth: 12288,
    };

    /// No limit below 8 octets (a verb and its CRLF), and the longer kinds never shorter than
    /// a plain command.
    fn sane(self) -> Self {
        let command = self.command.max(8);
        LineLimits {
            command,
            mail_rcpt: self.mail_rcpt.max(command),
            auth: self.auth.max(command),
        }
    }
}

/// Frames CRLF-terminated lines out of a byte stream, holding at most the limit of the line's
/// kind (known from its first five octets): the rest of an over-long line is skipped up to its
/// LF without being kept.
#[derive(Debug)]
pub struct LineReader {
    buf: Vec<u8>,
    limits: LineLimits,
    /// The next lines answer an AUTH challenge: all base64, under the AUTH limit.
    auth_response: bool,
    /// Discarding the rest of an over-long line; `true` when it was an AUTH exchange line.
    overflow: Option<bool>,
}

/// What `LineReader::next_line` found.
#[derive(Debug, PartialEq, Eq)]
pub enum Line {
    /// A whole line, without its line end.
    Complete(Vec<u8>),
    /// A command line longer than its limit was discarded up to its end.
    TooLong,
    /// An AUTH command or challenge answer longer than the AUTH limit was discarded.
    AuthTooLong,
}

impl LineReader {
    pub fn new(limits: LineLimits) -> Self {
        LineReader {
            buf: Vec::new(),
            limits: limits.sane(),
            auth_response: false,
            overflow: None,
        }
    }

    /// Switch to (or back from) reading answers to AUTH challenges.
    pub fn expect_auth_response(&mut self, on: bool) {
        self.auth_response = on;
    }

    /// The limit of the line whose first octets are `head` (at most five), and whether it
    /// is an AUTH exchange line.
    fn limit(&self, head: &[u8]) -> (usize, bool) {
        if self.auth_response {
            return (self.limits.auth, true);
        }
        let is = |verb: &[u8]| head.len() == 5 && head.eq_ignore_ascii_case(verb);
        if is(b"MAIL ") || is(b"RCPT ") {
            (self.limits.mail_rcpt, false)
        } else if is(b"AUTH ") {
            (self.limits.auth, true)
        } else {
            (self.limits.command, false)
        }
    }

    /// Take bytes from the front of `input` up to and including the next LF. Returns the
    /// number of bytes consumed and the line when one is complete.
    pub fn feed(&mut self, input: &[u8]) -> (usize, Option<Line>) {
        let (chunk, done) = match input.iter().position(|b| *b == b'\n') {
            Some(i) => (&input[..=i], true),
            None => (input, false),
        };
        if self.overflow.is_none() {
            let mut head = [0u8; 5];
            let held = self.buf.len().min(5);
            head[..held].copy_from_slice(&self.buf[..held]);
            let more = (5 - held).min(chunk.len());
            head[held..held + more].copy_from_slice(&chunk[..more]);
            let (limit, auth) = self.limit(&head[..held + more]);
            if self.buf.len() + chunk.len() > limit {
                self.overflow = Some(auth);
                self.buf = Vec::new();
            } else {
                self.buf.extend_from_slice(chunk);
            }
        }
        if !done {
            return (chunk.len(), None);
        }
        if let Some(auth) = self.overflow.take() {
            let l = if auth {
                Line::AuthTooLong
            } else {
                Line::TooLong
            };
            return (chunk.len(), Some(l));
        }
        let mut line = std::mem::take(&mut self.buf);
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        (chunk.len(), Some(Line::Complete(line)))
    }

    /// Bytes of an incomplete line held right now.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

/// What to do with a bare CR or LF inside DATA (the SMTP smuggling vector).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BareLineEnd {
    /// Read to the real end of data, then refuse the message with `550 5.6.0`.
    #[default]
    Reject,
    /// Store it as CRLF; it still never counts as a line end for end-of-data.
    Normalize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DState {
    LineStart,
    Dot,
    DotCr,
    Mid,
    Cr,
}

/// The end of a DATA or BDAT body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BodyEnd {
    /// Octets the client sent for the body (after dot-unstuffing), even beyond the limit.
    pub size: u64,
    /// More than the size limit arrived; the kept body is truncated.
    pub too_large: bool,
    /// A bare CR or LF was seen (only set under `BareLineEnd::Reject`).
    pub bare_line_end: bool,
}

/// Reads a DATA body: dot-unstuffing, ends only at `<CRLF>.<CRLF>`, keeps at most `max` bytes.
#[derive(Debug)]
pub struct DataReader {
    state: DState,
    body: Vec<u8>,
    size: u64,
    max: u64,
    policy: BareLineEnd,
    bare: bool,
    /// False once the caller gave up keeping the body (the memory budget ran out): the
    /// reader still finds the end of data and counts the size.
    keep: bool,
}

impl DataReader {
    pub fn new(max: u64, policy: BareLineEnd) -> Self {
        DataReader {
            state: DState::LineStart,
            body: Vec::new(),
            size: 0,
            max,
            policy,
            bare: false,
            keep: true,
        }
    }

    /// Room for `n` more octets of body, allocated now (the size declared with SIZE=). The
    /// budget counts what is kept, not this capacity.
    pub fn reserve(&mut self, n: usize) {
        if self.keep {
            self.body.reserve_exact(n);
        }
    }

    /// Octets of body kept so far.
    pub fn kept(&self) -> usize {
        self.body.len()
    }

    /// Drop what was kept and keep nothing more; the end of data is still found.
    pub fn stop_keeping(&mut self) {
        self.keep = false;
        self.body = Vec::new();
    }

    fn emit(&mut self, bytes: &[u8]) {
        self.size += bytes.len() as u64;
        if self.keep && self.size <= self.max {
            self.body.extend_from_slice(bytes);
        }
    }

    fn bare(&mut self, byte: u8) {
        match self.policy {
            BareLineEnd::Reject => {
                self.bare = true;
                self.emit(&[byte]);
            }
            BareLineEnd::Normalize => self.emit(b"\r\n"),
        }
        self.state = DState::Mid;
    }

    /// Consume from `input`; returns the bytes used and, at the end of data, the result.
    pub fn feed(&mut self, input: &[u8]) -> (usize, Option<BodyEnd>) {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            i += 1;
            match self.state {
                DState::LineStart => match b {
                    b'.' => self.state = DState::Dot,
                    b'\r' => self.state = DState::Cr,
                    b'\n' => self.bare(b),
                    _ => {
                        self.emit(&[b]);
                        self.state = DState::Mid;
                    }
                },
                DState::Dot => match b {
                    b'\r' => self.state = DState::DotCr,
                    // The leading dot of a stuffed line is dropped (RFC 5321 §4.5.2).
                    b'\n' => self.bare(b),
                    _ => {
                        self.emit(&[b]);
                        self.state = DState::Mid;
                    }
                },
                DState::DotCr => {
                    if b == b'\n' {
                        return (i, Some(self.finish()));
                    }
                    self.bare(b'\r');
                    i -= 1;
                }
                DState::Mid => match b {
                    b'\r' => self.state = DState::Cr,
                    b'\n' => self.bare(b),
                    _ => self.emit(&[b]),
                },
                DState::Cr => {
                    if b == b'\n' {
                        self.emit(b"\r\n");
                        self.state = DState::LineStart;
                    } else {
                        self.bare(b'\r');
                        i -= 1;
                    }
                }
            }
        }
        (i, None)
    }

    fn finish(&mut self) -> BodyEnd {
        BodyEnd {
            size: self.size,
            too_large: self.size > self.max,
            bare_line_end: self.bare,
        }
    }

    /// The body read so far (complete once `feed` returned the end).
    pub fn take_body(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.body)
    }
}

/// Whether a whole (BDAT) body has bare CR or LF, under a policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineEnds {
    /// Every CR and LF is part of a CRLF pair.
    Clean,
    /// A bare CR or LF, under `BareLineEnd::Reject`.
    Bare,
    /// Bare CRs and LFs, each turned into CRLF as the DATA reader does.
    Normalized(Vec<u8>),
}

/// Apply the bare CR/LF policy to a complete body (BDAT has no dot-stuffing, so unlike DATA
/// the whole body is known before the check and chunk boundaries do not matter).
pub fn check_line_ends(body: &[u8], policy: BareLineEnd) -> LineEnds {
    let bare_at = |i: usize| match body[i] {
        b'\r' => body.get(i + 1) != Some(&b'\n'),
        b'\n' => i == 0 || body[i - 1] != b'\r',
        _ => false,
    };
    let Some(first) = (0..body.len()).find(|&i| bare_at(i)) else {
        return LineEnds::Clean;
    };
    if policy == BareLineEnd::Reject {
        return LineEnds::Bare;
    }
    let mut out = Vec::with_capacity(body.len() + 16);
    out.extend_from_slice(&body[..first]);
    for (i, &b) in body.iter().enumerate().skip(first) {
        if bare_at(i) {
            out.extend_from_slice(b"\r\n");
        } else {
            out.push(b);
        }
    }
    LineEnds::Normalized(out)
}

/// Reads the octets of one BDAT chunk into a message body that is limited to `max` bytes.
#[derive(Debug)]
pub struct BdatReader {
    remaining: u64,
}

impl BdatReader {
    pub fn new(size: u64) -> Self {
        BdatReader { remaining: size }
    }

    /// Move chunk bytes from `input` to `body` (dropping those beyond `max`); returns the
    /// bytes used and whether the chunk is complete.
    pub fn feed(&mut self, input: &[u8], body: &mut Vec<u8>, max: u64) -> (usize, bool) {
        let n = (input.len() as u64).min(self.remaining) as usize;
        let room = max.saturating_sub(body.len() as u64) as usize;
        body.extend_from_slice(&input[..n.min(room)]);
        self.remaining -= n as u64;
        (n, self.remaining == 0)
    }

    pub fn remaining(&self) -> u64 {
        self.remaining
    }
}

/// RFC 3461 xtext encoding (smtp-proto decodes ORCPT/ENVID; the queue wants them encoded).
pub fn xtext_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunked<T>(
        input: &[u8],
        step: usize,
        mut f: impl FnMut(&[u8]) -> (usize, Option<T>),
    ) -> Vec<T> {
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < input.len() {
            let end = (pos + step).min(input.len());
            let mut piece = &input[pos..end];
            while !piece.is_empty() {
                let (n, r) = f(piece);
                piece = &piece[n..];
                pos += n;
                if let Some(r) = r {
                    out.push(r);
                }
            }
        }
        out
    }

    const STEPS: [usize; 7] = [1, 2, 3, 4, 8, 64, 4096];

    #[test]
    fn lines_are_framed_the_same_in_any_chunking() {
        let input = b"EHLO a\r\nMAIL FROM:<x@y>\r\n\r\nNOOP\n";
        for step in STEPS {
            let mut r = LineReader::new(LineLimits::RFC);
            let lines = chunked(input, step, |c| r.feed(c));
            assert_eq!(
                lines,
                vec![
                    Line::Complete(b"EHLO a".to_vec()),
                    Line::Complete(b"MAIL FROM:<x@y>".to_vec()),
                    Line::Complete(b"".to_vec()),
                    Line::Complete(b"NOOP".to_vec()),
                ],
                "step {step}"
            );
            assert_eq!(r.pending(), 0);
        }
    }

    fn line_of(prefix: &str, total: usize, end: &str) -> Vec<u8> {
        let mut l = prefix.as_bytes().to_vec();
        l.resize(total - end.len(), b'x');
        l.extend_from_slice(end.as_bytes());
        l
    }

    /// RFC 5321 §4.5.3.1.4: 512 octets with the CRLF for a command line; MAIL/RCPT may carry
    /// 2000 more for parameters; AUTH lines follow RFC 4954 (12288). Whatever the chunking,
    /// the same lines come out, an over-long line is one `TooLong` and never held whole.
    #[test]
    fn command_line_over_512_octets_is_too_long_in_any_chunking() {
        let ok = |l: &[u8]| {
            let s = String::from_utf8_lossy(l);
            Line::Complete(s.trim_end_matches(['\r', '\n']).as_bytes().to_vec())
        };
        let cases: Vec<(Vec<u8>, Line)> = vec![
            (
                line_of("NOOP ", 512, "\r\n"),
                ok(&line_of("NOOP ", 512, "\r\n")),
            ),
            (line_of("NOOP ", 513, "\r\n"), Line::TooLong),
            (line_of("NOOP ", 2000, "\r\n"), Line::TooLong),
            (
                line_of("noop ", 512, "\n"),
                ok(&line_of("noop ", 512, "\n")),
            ),
            (line_of("NOOP ", 513, "\n"), Line::TooLong),
            (line_of("EHLO ", 100_000, "\r\n"), Line::TooLong),
            // MAIL and RCPT get the parameter allowance, any case.
            (
                line_of("MAIL ", 2512, "\r\n"),
                ok(&line_of("MAIL ", 2512, "\r\n")),
            ),
            (
                line_of("rcpt ", 2000, "\r\n"),
                ok(&line_of("rcpt ", 2000, "\r\n")),
            ),
            (line_of("RCPT ", 2513, "\r\n"), Line::TooLong),
            // "MAILX" is not MAIL.
            (line_of("MAILX", 600, "\r\n"), Line::TooLong),
            // AUTH with a long initial response.
            (
                line_of("AUTH ", 12288, "\r\n"),
                ok(&line_of("AUTH ", 12288, "\r\n")),
            ),
            (line_of("AUTH ", 12289, "\r\n"), Line::AuthTooLong),
        ];
        let mut input = Vec::new();
        let mut want = Vec::new();
        for (line, result) in cases {
            input.extend_from_slice(&line);
            want.push(result);
            // After every line, a short one: the session stays in sync.
            input.extend_from_slice(b"NOOP\r\n");
            want.push(Line::Complete(b"NOOP".to_vec()));
        }
        for step in [1, 2, 4, 8, 16, 64, 511, 512, 513, 4096, 1 << 20] {
            let mut r = LineReader::new(LineLimits::RFC);
            let mut peak = 0;
            let lines = chunked(&input, step, |c| {
                let x = r.feed(c);
                peak = peak.max(r.pending());
                x
            });
            assert_eq!(lines.len(), want.len(), "step {step}");
            for (i, (got, want)) in lines.iter().zip(&want).enumerate() {
                assert_eq!(got, want, "step {step}, line {i}");
            }
            assert!(peak <= 12288, "step {step}: held {peak} bytes");
            assert_eq!(r.pending(), 0);
        }
    }

    #[test]
    fn auth_challenge_answers_use_the_auth_limit() {
        let mut r = LineReader::new(LineLimits::RFC);
        r.expect_auth_response(true);
        let long = line_of("", 5000, "\r\n");
        let (n, l) = r.feed(&long);
        assert_eq!(n, long.len());
        assert_eq!(l, Some(Line::Complete(long[..4998].to_vec())));
        let (_, l) = r.feed(&line_of("", 12289, "\r\n"));
        assert_eq!(l, Some(Line::AuthTooLong));
        r.expect_auth_response(false);
        let (_, l) = r.feed(&long);
        assert_eq!(l, Some(Line::TooLong));
    }

    #[test]
    fn overlong_line_is_discarded_with_bounded_memory() {
        let mut input = b"NOOP ".to_vec();
        input.extend(std::iter::repeat_n(b'x', 10_000));
        input.extend_from_slice(b"\r\nQUIT\r\n");
        let limits = LineLimits {
            command: 100,
            mail_rcpt: 100,
            auth: 100,
        };
        for step in STEPS {
            let mut r = LineReader::new(limits);
            let mut peak = 0;
            let lines = chunked(&input, step, |c| {
                let x = r.feed(c);
                peak = peak.max(r.pending());
                x
            });
            assert_eq!(lines, vec![Line::TooLong, Line::Complete(b"QUIT".to_vec())]);
            assert!(peak <= 100, "held {peak} bytes");
        }
    }

    #[test]
    fn commands_parse() {
        use Command as C;
        let cases: Vec<(&[u8], Result<Command, CommandError>)> = vec![
            (b"EHLO client.example", Ok(C::Ehlo("client.example".into()))),
            (b"helo x", Ok(C::Helo("x".into()))),
            (b"DATA", Ok(C::Data)),
            (b"RSET", Ok(C::Rset)),
            (b"NOOP", Ok(C::Noop)),
            (b"NOOP anything", Ok(C::Noop)),
            (b"QUIT", Ok(C::Quit)),
            (b"HELP", Ok(C::Help(String::new()))),
            (b"VRFY bob", Ok(C::Vrfy("bob".into()))),
            (b"EXPN staff", Ok(C::Expn("staff".into()))),
            (b"TURN", Ok(C::Turn)),
            (b"ETRN example.org", Ok(C::Etrn("example.org".into()))),
            (b"STARTTLS", Ok(C::StartTls)),
            (
                b"BDAT 10 LAST",
                Ok(C::Bdat {
                    size: 10,
                    last: true,
                }),
            ),
            (
                b"BDAT 7",
                Ok(C::Bdat {
                    size: 7,
                    last: false,
                }),
            ),
            (b"FOO", Err(CommandError::Unknown)),
            (b"RCPT TO:<>", Err(CommandError::BadRecipient)),
            (b"LHLO x", Err(CommandError::Unknown)),
            (b"EHLO", Err(CommandError::Syntax("EHLO domain"))),
            (
                b"BDAT x",
                Err(CommandError::Syntax("BDAT chunk-size [LAST]")),
            ),
        ];
        for (line, want) in cases {
            assert_eq!(
                parse_command(line),
                want,
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn mail_rcpt_and_terminal_commands_carry_parameters() {
        let c = parse_command(
            b"MAIL FROM:<a@b.example> SIZE=1000 BODY=8BITMIME RET=HDRS ENVID=QQ+2B1 SMTPUTF8",
        );
        let Ok(Command::Mail(f)) = c else {
            panic!("{c:?}")
        };
        assert_eq!(f.address, "a@b.example");
        assert_eq!(f.size, 1000);
        assert_ne!(f.flags & smtp_proto::MAIL_BODY_8BITMIME, 0);
        assert_ne!(f.flags & smtp_proto::MAIL_RET_HDRS, 0);
        assert_ne!(f.flags & smtp_proto::MAIL_SMTPUTF8, 0);
        assert_eq!(f.env_id.as_deref(), Some("QQ+1"));

        let r =
            parse_command(b"RCPT TO:<c@d.example> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;c@d.example");
        let Ok(Command::Rcpt(t)) = r else {
            panic!("{r:?}")
        };
        assert_eq!(t.address, "c@d.example");
        assert_ne!(t.flags & smtp_proto::RCPT_NOTIFY_SUCCESS, 0);
        assert_ne!(t.flags & smtp_proto::RCPT_NOTIFY_FAILURE, 0);
        assert_eq!(t.orcpt.as_deref(), Some("c@d.example"));

        let s = parse_command(b"SAML FROM:<a@b.example>");
        assert!(
            matches!(s, Ok(Command::Send(Terminal::Saml, ref f)) if f.address == "a@b.example"),
            "{s:?}"
        );
        assert!(matches!(
            parse_command(b"send from:<>"),
            Ok(Command::Send(Terminal::Send, _))
        ));
        assert!(parse_command(b"SOML TO:<x@y>").is_err());
        assert_eq!(
            parse_command(b"MAIL FROM:<> NOPE=1"),
            Err(CommandError::UnsupportedParameter("NOPE=1".into()))
        );
        assert!(parse_command(b"RCPT TO:").is_err());

        // L11: the unqualified postmaster (RFC 5321 §4.5.1), any case, with parameters.
        for l in [
            &b"RCPT TO:<postmaster>"[..],
            b"rcpt to:<PostMaster> NOTIFY=NEVER",
        ] {
            let r = parse_command(l);
            assert!(
                matches!(&r, Ok(Command::Rcpt(t)) if t.address == "postmaster"),
                "{r:?}"
            );
        }
    }

    fn read_data(
        input: &[u8],
        step: usize,
        policy: BareLineEnd,
        max: u64,
    ) -> (Vec<u8>, BodyEnd, usize) {
        let mut r = DataReader::new(max, policy);
        let mut used = 0;
        let mut end = None;
        let mut pos = 0;
        while pos < input.len() && end.is_none() {
            let stop = (pos + step).min(input.len());
            let (n, e) = r.feed(&input[pos..stop]);
            pos += n;
            used += n;
            end = e;
        }
        (r.take_body(), end.expect("end of data"), used)
    }

    #[test]
    fn data_ends_at_crlf_dot_crlf_and_unstuffs() {
        let input = b"Subject: x\r\n\r\n..leading dot\r\n.\r\nQUIT\r\n";
        for step in STEPS {
            let (body, end, used) = read_data(input, step, BareLineEnd::Reject, 1000);
            assert_eq!(body, b"Subject: x\r\n\r\n.leading dot\r\n");
            assert_eq!(used, input.len() - 6, "QUIT stays for the command reader");
            assert!(!end.bare_line_end && !end.too_large);
        }
    }

    #[test]
    fn bare_lf_dot_is_not_an_end_of_data() {
        // The SMTP smuggling payloads: <LF>.<LF>, <LF>.<CRLF>, <CR>.<CR>.
        for payload in [
            &b"a\n.\nMAIL FROM:<x@y>\r\n"[..],
            b"a\n.\r\nRSET\r\n",
            b"a\r.\rX\r\n",
        ] {
            let mut input = payload.to_vec();
            input.extend_from_slice(b"tail\r\n.\r\n");
            for step in STEPS {
                let (body, end, used) = read_data(&input, step, BareLineEnd::Reject, 1000);
                assert_eq!(used, input.len(), "swallowed up to the real end");
                assert!(end.bare_line_end);
                assert!(body.ends_with(b"tail\r\n"));
                let (body, end, _) = read_data(&input, step, BareLineEnd::Normalize, 1000);
                assert!(!end.bare_line_end);
                assert!(
                    !body.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r'),
                    "{body:?}"
                );
            }
        }
    }

    #[test]
    fn data_over_limit_is_counted_not_kept() {
        let mut input = std::iter::repeat_n(b'x', 5000).collect::<Vec<u8>>();
        input.extend_from_slice(b"\r\n.\r\n");
        let (body, end, _) = read_data(&input, 7, BareLineEnd::Reject, 100);
        assert!(end.too_large);
        assert_eq!(end.size, 5002);
        assert!(body.len() <= 100);
    }

    #[test]
    fn empty_body_ends_immediately() {
        let (body, _, used) = read_data(b".\r\n", 1, BareLineEnd::Reject, 10);
        assert!(body.is_empty());
        assert_eq!(used, 3);
    }

    #[test]
    fn bdat_takes_exactly_its_size() {
        for step in STEPS {
            let input = b"hello\nworld!BDAT";
            let mut r = BdatReader::new(12);
            let mut body = Vec::new();
            let mut pos = 0;
            let mut done = false;
            while !done {
                let stop = (pos + step).min(input.len());
                let (n, d) = r.feed(&input[pos..stop], &mut body, 1000);
                pos += n;
                done = d;
            }
            assert_eq!(body, b"hello\nworld!");
            assert_eq!(pos, 12);
        }
        let mut r = BdatReader::new(10);
        let mut body = b"12345".to_vec();
        let (n, done) = r.feed(b"abcdefghij", &mut body, 8);
        assert_eq!((n, done), (10, true));
        assert_eq!(body, b"12345abc");
    }

    #[test]
    fn xtext() {
        assert_eq!(xtext_encode("a+b=c d"), "a+2Bb+3Dc+20d");
        assert_eq!(xtext_encode("plain@x"), "plain@x");
    }

    #[test]
    fn bdat_body_line_ends() {
        use BareLineEnd::*;
        assert_eq!(check_line_ends(b"a\r\nb\r\n", Reject), LineEnds::Clean);
        assert_eq!(check_line_ends(b"", Reject), LineEnds::Clean);
        for bad in [&b"a\nb"[..], b"\n", b"a\rb", b"a\r", b"a\r\r\n"] {
            assert_eq!(check_line_ends(bad, Reject), LineEnds::Bare, "{bad:?}");
        }
        assert_eq!(
            check_line_ends(b"\na\rb\r\r\nc\r", Normalize),
            LineEnds::Normalized(b"\r\na\r\nb\r\n\r\nc\r\n".to_vec())
        );
        // Normalising gives what the DATA reader stores for the same text.
        let text = b"x\ny\rz\r\n";
        let mut dot = text.to_vec();
        dot.extend_from_slice(b".\r\n");
        let mut r = DataReader::new(1000, Normalize);
        assert!(r.feed(&dot).1.is_some());
        assert_eq!(
            check_line_ends(text, Normalize),
            LineEnds::Normalized(r.take_body())
        );
    }
}
