//! POP3 wire format (RFC 1939, RFC 2449, RFC 5034): command lines in, replies out, and the
//! streaming encoder for message content (byte-stuffing, CRLF line ends, TOP truncation).
//! Pure: no I/O, no tokio. Every piece accepts its input in arbitrary chunks.

use std::fmt;

/// Splits the input into lines, each bounded by `max_line` octets including its line end.
/// A longer line is reported once and skipped up to its end, so a flood without line ends
/// never accumulates in memory.
#[derive(Debug)]
pub struct LineDecoder {
    buf: Vec<u8>,
    max_line: usize,
    discarding: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineError {
    TooLong,
}

impl LineDecoder {
    pub fn new(max_line: usize) -> Self {
        LineDecoder {
            buf: Vec::new(),
            max_line: max_line.max(8),
            discarding: false,
        }
    }

    pub fn feed(&mut self, mut data: &[u8]) {
        if self.discarding {
            match data.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    self.discarding = false;
                    data = &data[i + 1..];
                }
                None => return,
            }
        }
        self.buf.extend_from_slice(data);
    }

    /// The next complete line without its CRLF (a bare LF is accepted as a line end too),
    /// `None` when more input is needed.
    pub fn next_line(&mut self) -> Option<Result<Vec<u8>, LineError>> {
        match self.buf.iter().position(|&b| b == b'\n') {
            Some(i) => {
                let too_long = i + 1 > self.max_line;
                let mut line: Vec<u8> = self.buf.drain(..=i).collect();
                if too_long {
                    return Some(Err(LineError::TooLong));
                }
                line.pop();
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                Some(Ok(line))
            }
            None if self.buf.len() >= self.max_line => {
                self.buf.clear();
                self.discarding = true;
                Some(Err(LineError::TooLong))
            }
            None => None,
        }
    }

    /// Bytes received but not yet returned as a line.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Forget buffered input (after STLS, plaintext sent ahead of the handshake must not be
    /// taken as if it came over TLS).
    pub fn clear(&mut self) {
        self.buf.clear();
        self.discarding = false;
    }
}

/// A parsed client command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Capa,
    Stls,
    /// `AUTH` alone lists the mechanisms; `AUTH mech [initial-response]` starts one.
    Auth {
        mechanism: Option<String>,
        initial: Option<String>,
    },
    User(String),
    Pass(String),
    Apop {
        name: String,
        digest: String,
    },
    Stat,
    List(Option<u32>),
    Retr(u32),
    Dele(u32),
    Noop,
    Rset,
    Quit,
    Top(u32, u32),
    Uidl(Option<u32>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParseError {
    Empty,
    Unknown(String),
    BadArguments(&'static str),
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::Empty => write!(f, "empty command"),
            ParseError::Unknown(k) => write!(f, "unknown command {k}"),
            ParseError::BadArguments(usage) => write!(f, "syntax: {usage}"),
        }
    }
}

impl Command {
    pub fn parse(line: &[u8]) -> Result<Command, ParseError> {
        let (keyword, rest) = match line.iter().position(|&b| b == b' ') {
            Some(i) => (&line[..i], Some(&line[i + 1..])),
            None => (line, None),
        };
        if keyword.is_empty() {
            return Err(ParseError::Empty);
        }
        // RFC 2449 §3: keywords are at most 4 printable characters.
        if keyword.len() > 4 || !keyword.iter().all(u8::is_ascii_alphabetic) {
            let shown: String = String::from_utf8_lossy(&keyword[..keyword.len().min(16)])
                .chars()
                .map(|c| if c.is_ascii_graphic() { c } else { '?' })
                .collect();
            return Err(ParseError::Unknown(shown));
        }
        let kw = keyword.to_ascii_uppercase();
        let args: Vec<&[u8]> = rest
            .map(|r| r.split(|&b| b == b' ').filter(|a| !a.is_empty()).collect())
            .unwrap_or_default();
        let none = |cmd: Command, usage: &'static str| {
            if args.is_empty() {
                Ok(cmd)
            } else {
                Err(ParseError::BadArguments(usage))
            }
        };
        match kw.as_slice() {
            b"CAPA" => none(Command::Capa, "CAPA"),
            b"STLS" => none(Command::Stls, "STLS"),
            b"STAT" => none(Command::Stat, "STAT"),
            b"NOOP" => none(Command::Noop, "NOOP"),
            b"RSET" => none(Command::Rset, "RSET"),
            b"QUIT" => none(Command::Quit, "QUIT"),
            b"AUTH" => match args.as_slice() {
                [] => Ok(Command::Auth {
                    mechanism: None,
                    initial: None,
                }),
                [m] => Ok(Command::Auth {
                    mechanism: Some(text(m, "AUTH mechanism [initial-response]")?),
                    initial: None,
                }),
                [m, i] => Ok(Command::Auth {
                    mechanism: Some(text(m, "AUTH mechanism [initial-response]")?),
                    initial: Some(text(i, "AUTH mechanism [initial-response]")?),
                }),
                _ => Err(ParseError::BadArguments(
                    "AUTH mechanism [initial-response]",
                )),
            },
            b"USER" => match args.as_slice() {
                [name] => Ok(Command::User(text(name, "USER name")?)),
                _ => Err(ParseError::BadArguments("USER name")),
            },
            // The password is the rest of the line: it may contain spaces.
            b"PASS" => match rest {
                Some(r) if !r.is_empty() => Ok(Command::Pass(text(r, "PASS password")?)),
                _ => Err(ParseError::BadArguments("PASS password")),
            },
            b"APOP" => match args.as_slice() {
                [name, digest] => Ok(Command::Apop {
                    name: text(name, "APOP name digest")?,
                    digest: text(digest, "APOP name digest")?,
                }),
                _ => Err(ParseError::BadArguments("APOP name digest")),
            },
            b"LIST" => optional_number(&args, "LIST [msg]").map(Command::List),
            b"UIDL" => optional_number(&args, "UIDL [msg]").map(Command::Uidl),
            b"RETR" => one_number(&args, "RETR msg").map(Command::Retr),
            b"DELE" => one_number(&args, "DELE msg").map(Command::Dele),
            b"TOP" => match args.as_slice() {
                [m, n] => Ok(Command::Top(
                    number(m, "TOP msg lines")?,
                    number(n, "TOP msg lines")?,
                )),
                _ => Err(ParseError::BadArguments("TOP msg lines")),
            },
            _ => Err(ParseError::Unknown(
                String::from_utf8_lossy(&kw).into_owned(),
            )),
        }
    }

    /// The keyword, for logs and metrics (never the arguments: they may hold a password).
    pub fn keyword(&self) -> &'static str {
        match self {
            Command::Capa => "CAPA",
            Command::Stls => "STLS",
            Command::Auth { .. } => "AUTH",
            Command::User(_) => "USER",
            Command::Pass(_) => "PASS",
            Command::Apop { .. } => "APOP",
            Command::Stat => "STAT",
            Command::List(_) => "LIST",
            Command::Retr(_) => "RETR",
            Command::Dele(_) => "DELE",
            Command::Noop => "NOOP",
            Command::Rset => "RSET",
            Command::Quit => "QUIT",
            Command::Top(..) => "TOP",
            Command::Uidl(_) => "UIDL",
        }
    }
}

fn text(arg: &[u8], usage: &'static str) -> Result<String, ParseError> {
    match std::str::from_utf8(arg) {
        Ok(s) if !s.chars().any(char::is_control) => Ok(s.to_string()),
        _ => Err(ParseError::BadArguments(usage)),
    }
}

/// A non-negative decimal number; values beyond u32 saturate (they name no message and
/// mean "all lines" for TOP, which is what the client asked for).
fn number(arg: &[u8], usage: &'static str) -> Result<u32, ParseError> {
    if arg.is_empty() || !arg.iter().all(u8::is_ascii_digit) {
        return Err(ParseError::BadArguments(usage));
    }
    let mut n: u64 = 0;
    for &d in arg {
        n = (n * 10 + u64::from(d - b'0')).min(u64::from(u32::MAX));
    }
    Ok(n as u32)
}

fn one_number(args: &[&[u8]], usage: &'static str) -> Result<u32, ParseError> {
    match args {
        [n] => number(n, usage),
        _ => Err(ParseError::BadArguments(usage)),
    }
}

fn optional_number(args: &[&[u8]], usage: &'static str) -> Result<Option<u32>, ParseError> {
    match args {
        [] => Ok(None),
        [n] => number(n, usage).map(Some),
        _ => Err(ParseError::BadArguments(usage)),
    }
}

/// RFC 2449 §8 extended response codes (plus RFC 3206 `AUTH` and `SYS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RespCode {
    InUse,
    LoginDelay,
    SysTemp,
    SysPerm,
    Auth,
}

impl RespCode {
    pub fn as_str(self) -> &'static str {
        match self {
            RespCode::InUse => "IN-USE",
            RespCode::LoginDelay => "LOGIN-DELAY",
            RespCode::SysTemp => "SYS/TEMP",
            RespCode::SysPerm => "SYS/PERM",
            RespCode::Auth => "AUTH",
        }
    }
}

/// One server reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Ok(String),
    Err(Option<RespCode>, String),
    /// `+OK text`, then the lines (byte-stuffed here), then the terminating `.`.
    Multi(String, Vec<String>),
    /// A SASL challenge: `+ ` and the base64 text (RFC 5034 §4).
    Continue(String),
}

impl Reply {
    pub fn ok(text: impl Into<String>) -> Reply {
        Reply::Ok(text.into())
    }

    pub fn err(text: impl Into<String>) -> Reply {
        Reply::Err(None, text.into())
    }

    pub fn err_code(code: RespCode, text: impl Into<String>) -> Reply {
        Reply::Err(Some(code), text.into())
    }

    pub fn is_ok(&self) -> bool {
        !matches!(self, Reply::Err(..))
    }

    pub fn serialize(&self, out: &mut Vec<u8>) {
        fn status(out: &mut Vec<u8>, head: &str, text: &str) {
            out.extend_from_slice(head.as_bytes());
            if !text.is_empty() {
                out.push(b' ');
                out.extend_from_slice(text.as_bytes());
            }
            out.extend_from_slice(b"\r\n");
        }
        match self {
            Reply::Ok(t) => status(out, "+OK", t),
            Reply::Err(None, t) => status(out, "-ERR", t),
            Reply::Err(Some(code), t) => {
                out.extend_from_slice(b"-ERR [");
                out.extend_from_slice(code.as_str().as_bytes());
                out.push(b']');
                status(out, "", t);
            }
            Reply::Multi(t, lines) => {
                status(out, "+OK", t);
                for l in lines {
                    if l.starts_with('.') {
                        out.push(b'.');
                    }
                    out.extend_from_slice(l.as_bytes());
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b".\r\n");
            }
            Reply::Continue(t) => {
                out.extend_from_slice(b"+ ");
                out.extend_from_slice(t.as_bytes());
                out.extend_from_slice(b"\r\n");
            }
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.serialize(&mut v);
        v
    }
}

/// Turns stored message bytes, arriving in chunks, into the body of a RETR or TOP reply:
/// every line ends in CRLF (a stored bare LF gets its CR), a line starting with `.` gets a
/// second one (RFC 1939 §3), and for TOP only the header, the blank line and the first
/// `n` body lines pass. `finish` closes the last line and writes the terminating `.`.
#[derive(Debug)]
pub struct BodyEncoder {
    at_line_start: bool,
    prev_cr: bool,
    line_len: usize,
    first_cr: bool,
    top: Option<TopState>,
    done: bool,
}

#[derive(Debug)]
struct TopState {
    in_header: bool,
    lines_left: u32,
}

impl BodyEncoder {
    pub fn full() -> Self {
        BodyEncoder {
            at_line_start: true,
            prev_cr: false,
            line_len: 0,
            first_cr: false,
            top: None,
            done: false,
        }
    }

    pub fn top(lines: u32) -> Self {
        BodyEncoder {
            top: Some(TopState {
                in_header: true,
                lines_left: lines,
            }),
            ..Self::full()
        }
    }

    /// True once TOP has all it needs: the rest of the message may be left unread.
    pub fn is_done(&self) -> bool {
        self.done
    }

    pub fn push(&mut self, mut data: &[u8], out: &mut Vec<u8>) {
        while !data.is_empty() && !self.done {
            if self.at_line_start {
                if data[0] == b'.' {
                    out.push(b'.');
                }
                self.at_line_start = false;
                self.line_len = 0;
                self.first_cr = data[0] == b'\r';
            }
            match data.iter().position(|&b| b == b'\n') {
                Some(j) => {
                    out.extend_from_slice(&data[..j]);
                    let had_cr = if j > 0 {
                        data[j - 1] == b'\r'
                    } else {
                        self.prev_cr
                    };
                    if !had_cr {
                        out.push(b'\r');
                    }
                    out.push(b'\n');
                    self.line_len += j;
                    self.end_line();
                    data = &data[j + 1..];
                }
                None => {
                    out.extend_from_slice(data);
                    self.prev_cr = data.last() == Some(&b'\r');
                    self.line_len += data.len();
                    data = &[];
                }
            }
        }
    }

    fn end_line(&mut self) {
        let blank = self.line_len == 0 || (self.line_len == 1 && self.first_cr);
        self.at_line_start = true;
        self.prev_cr = false;
        if let Some(t) = &mut self.top {
            if t.in_header {
                if blank {
                    t.in_header = false;
                    self.done = t.lines_left == 0;
                }
            } else {
                t.lines_left -= 1;
                self.done = t.lines_left == 0;
            }
        }
    }

    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if !self.at_line_start {
            if !self.prev_cr {
                out.push(b'\r');
            }
            out.push(b'\n');
            self.at_line_start = true;
        }
        out.extend_from_slice(b".\r\n");
        self.done = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHUNKS: [usize; 8] = [1, 2, 3, 4, 7, 16, 64, 4096];

    fn decode_chunked(input: &[u8], max: usize, chunk: usize) -> Vec<Result<Vec<u8>, LineError>> {
        let mut d = LineDecoder::new(max);
        let mut out = Vec::new();
        for c in input.chunks(chunk) {
            d.feed(c);
            while let Some(l) = d.next_line() {
                out.push(l);
            }
        }
        out
    }

    #[test]
    fn lines_are_the_same_whatever_the_chunking() {
        let long = format!("USER {}\r\n", "x".repeat(100));
        let input = [
            b"CAPA\r\nUSER alice\r\n".as_slice(),
            long.as_bytes(),
            b"bare lf\nNOOP\r\n\r\nQUIT\r\npartial",
        ]
        .concat();
        let expected: Vec<Result<Vec<u8>, LineError>> = vec![
            Ok(b"CAPA".to_vec()),
            Ok(b"USER alice".to_vec()),
            Err(LineError::TooLong),
            Ok(b"bare lf".to_vec()),
            Ok(b"NOOP".to_vec()),
            Ok(b"".to_vec()),
            Ok(b"QUIT".to_vec()),
        ];
        for chunk in CHUNKS {
            assert_eq!(decode_chunked(&input, 64, chunk), expected, "chunk {chunk}");
        }
    }

    #[test]
    fn line_limit_is_exact_and_memory_stays_bounded() {
        // 8 octets including CRLF is allowed with max 8; 9 is not.
        for chunk in CHUNKS {
            let r = decode_chunked(b"ABCDEF\r\nABCDEFG\r\nOK\r\n", 8, chunk);
            assert_eq!(
                r,
                vec![
                    Ok(b"ABCDEF".to_vec()),
                    Err(LineError::TooLong),
                    Ok(b"OK".to_vec())
                ],
                "chunk {chunk}"
            );
        }
        let mut d = LineDecoder::new(16);
        let mut errors = 0;
        for _ in 0..10_000 {
            d.feed(&[b'a'; 100]);
            while let Some(l) = d.next_line() {
                assert_eq!(l, Err(LineError::TooLong));
                errors += 1;
            }
            assert!(d.buffered() <= 116, "buffer grew to {}", d.buffered());
        }
        assert_eq!(errors, 1, "one error per overlong line, not per chunk");
        d.feed(b"aaa\r\nNOOP\r\n");
        assert_eq!(d.next_line(), Some(Ok(b"NOOP".to_vec())));
    }

    #[test]
    fn clear_drops_pipelined_input() {
        let mut d = LineDecoder::new(64);
        d.feed(b"STLS\r\nUSER injected\r\n");
        assert_eq!(d.next_line(), Some(Ok(b"STLS".to_vec())));
        assert!(d.buffered() > 0);
        d.clear();
        assert_eq!(d.next_line(), None);
    }

    #[test]
    fn commands_parse_case_insensitively() {
        use Command::*;
        let cases: Vec<(&[u8], Command)> = vec![
            (b"capa", Capa),
            (b"StLs", Stls),
            (b"STAT", Stat),
            (b"noop", Noop),
            (b"RSET", Rset),
            (b"QUIT", Quit),
            (b"USER alice@example.org", User("alice@example.org".into())),
            (b"PASS pass with spaces ", Pass("pass with spaces ".into())),
            (b"LIST", List(None)),
            (b"LIST 2", List(Some(2))),
            (b"UIDL", Uidl(None)),
            (b"uidl 17", Uidl(Some(17))),
            (b"RETR 1", Retr(1)),
            (b"DELE 3", Dele(3)),
            (b"TOP 1 0", Top(1, 0)),
            (b"TOP 1 99999999999", Top(1, u32::MAX)),
            (b"RETR 99999999999999999999", Retr(u32::MAX)),
            (
                b"AUTH",
                Auth {
                    mechanism: None,
                    initial: None,
                },
            ),
            (
                b"AUTH plain",
                Auth {
                    mechanism: Some("plain".into()),
                    initial: None,
                },
            ),
            (
                b"AUTH PLAIN AGFsaWNlAHNlY3JldA==",
                Auth {
                    mechanism: Some("PLAIN".into()),
                    initial: Some("AGFsaWNlAHNlY3JldA==".into()),
                },
            ),
            (
                b"APOP mrose c4c9334bac560ecc979e58001b3e22fb",
                Apop {
                    name: "mrose".into(),
                    digest: "c4c9334bac560ecc979e58001b3e22fb".into(),
                },
            ),
        ];
        for (line, cmd) in cases {
            assert_eq!(
                Command::parse(line),
                Ok(cmd),
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn bad_commands_are_errors_not_panics() {
        let bad: &[&[u8]] = &[
            b"",
            b" STAT",
            b"FOOBAR",
            b"XYZ",
            b"\xff\xfe",
            b"RETR",
            b"RETR x",
            b"RETR -1",
            b"RETR +1",
            b"RETR 1 2",
            b"DELE",
            b"TOP 1",
            b"TOP 1 -2",
            b"LIST 1 2",
            b"STAT 1",
            b"QUIT now",
            b"USER",
            b"USER a b",
            b"USER \x01",
            b"PASS",
            b"PASS ",
            b"PASS \xff",
            b"APOP x",
            b"AUTH a b c",
        ];
        for line in bad {
            assert!(
                Command::parse(line).is_err(),
                "{:?} parsed",
                String::from_utf8_lossy(line)
            );
        }
        assert_eq!(
            Command::parse(b"HELO x"),
            Err(ParseError::Unknown("HELO".into()))
        );
    }

    #[test]
    fn replies_serialize() {
        assert_eq!(Reply::ok("").to_bytes(), b"+OK\r\n");
        assert_eq!(Reply::ok("2 320").to_bytes(), b"+OK 2 320\r\n");
        assert_eq!(
            Reply::err("no such message").to_bytes(),
            b"-ERR no such message\r\n"
        );
        assert_eq!(
            Reply::err_code(RespCode::InUse, "maildrop locked").to_bytes(),
            b"-ERR [IN-USE] maildrop locked\r\n"
        );
        assert_eq!(
            Reply::err_code(RespCode::SysTemp, "").to_bytes(),
            b"-ERR [SYS/TEMP]\r\n"
        );
        assert_eq!(Reply::Continue(String::new()).to_bytes(), b"+ \r\n");
        assert_eq!(
            Reply::Multi("list".into(), vec!["1 10".into(), ".hidden".into()]).to_bytes(),
            b"+OK list\r\n1 10\r\n..hidden\r\n.\r\n"
        );
        assert_eq!(
            Reply::Multi(String::new(), vec![]).to_bytes(),
            b"+OK\r\n.\r\n"
        );
    }

    fn encode(mut enc: BodyEncoder, input: &[u8], chunk: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for c in input.chunks(chunk) {
            enc.push(c, &mut out);
        }
        enc.finish(&mut out);
        out
    }

    #[test]
    fn body_is_stuffed_and_crlf_whatever_the_chunking() {
        let input = b".starts with dot\r\nbare lf\n..two dots\n\nmid.dot\r\n.\r\nlast no eol";
        let expected =
            b"..starts with dot\r\nbare lf\r\n...two dots\r\n\r\nmid.dot\r\n..\r\nlast no eol\r\n.\r\n";
        for chunk in CHUNKS {
            assert_eq!(
                String::from_utf8_lossy(&encode(BodyEncoder::full(), input, chunk)),
                String::from_utf8_lossy(expected),
                "chunk {chunk}"
            );
        }
        assert_eq!(encode(BodyEncoder::full(), b"", 1), b".\r\n");
        assert_eq!(encode(BodyEncoder::full(), b"a\r\n", 1), b"a\r\n.\r\n");
        assert_eq!(encode(BodyEncoder::full(), b"a\r", 1), b"a\r\n.\r\n");
        // A CR inside a line is content, not a line end.
        assert_eq!(encode(BodyEncoder::full(), b"a\rb\n", 1), b"a\rb\r\n.\r\n");
    }

    #[test]
    fn top_sends_header_blank_line_and_n_lines() {
        let msg = b"Subject: x\r\nFrom: a@b\r\n\r\nline1\r\n.line2\nline3\r\nline4\r\n";
        let cases: [(u32, &[u8]); 5] = [
            (0, b"Subject: x\r\nFrom: a@b\r\n\r\n.\r\n"),
            (1, b"Subject: x\r\nFrom: a@b\r\n\r\nline1\r\n.\r\n"),
            (
                2,
                b"Subject: x\r\nFrom: a@b\r\n\r\nline1\r\n..line2\r\n.\r\n",
            ),
            (
                4,
                b"Subject: x\r\nFrom: a@b\r\n\r\nline1\r\n..line2\r\nline3\r\nline4\r\n.\r\n",
            ),
            (
                u32::MAX,
                b"Subject: x\r\nFrom: a@b\r\n\r\nline1\r\n..line2\r\nline3\r\nline4\r\n.\r\n",
            ),
        ];
        for (n, expected) in cases {
            for chunk in CHUNKS {
                assert_eq!(
                    String::from_utf8_lossy(&encode(BodyEncoder::top(n), msg, chunk)),
                    String::from_utf8_lossy(expected),
                    "TOP {n} chunk {chunk}"
                );
            }
        }
        // Bare-LF header/body separator, and a message without a body.
        assert_eq!(
            encode(BodyEncoder::top(1), b"A: b\n\nbody\nmore\n", 1),
            b"A: b\r\n\r\nbody\r\n.\r\n"
        );
        assert_eq!(
            encode(BodyEncoder::top(3), b"A: b\r\nC: d", 2),
            b"A: b\r\nC: d\r\n.\r\n"
        );
        let mut enc = BodyEncoder::top(0);
        let mut out = Vec::new();
        enc.push(b"A: b\r\n\r\nrest", &mut out);
        assert!(enc.is_done(), "the rest of the message is not needed");
    }
}
