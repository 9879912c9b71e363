//! A pre-parser for the command forms imap-codec 2.0 alpha does not know: `SEARCH RETURN
//! (...)` (RFC 4731 ESEARCH / RFC 5182 SEARCHRES), `$` as a sequence set (RFC 5182) and the
//! extended LIST syntax (RFC 5258 LIST-EXTENDED, RFC 5819 LIST-STATUS, RFC 6154).
//!
//! It works on one complete client message as the `Fragmentizer` delivers it (literals
//! inline, final CRLF included). It tokenizes the message the way the IMAP grammar does
//! (atoms, quoted strings, literals, parentheses), so bytes inside quoted strings and literals
//! are never mistaken for syntax. What it recognizes is taken out of the message and returned
//! as [`Ext`]; the rest is handed to imap-codec unchanged:
//! - `RETURN (...)` right after `SEARCH` (or `SORT`, RFC 5267 ESORT) is removed;
//! - a `$` token in a sequence-set position is replaced by [`SAVED_MARKER`], a reversed range
//!   that the session recognizes (a client that writes the marker itself gets the same range
//!   in ascending order, which means the same);
//! - an extended LIST is parsed here completely and replaced by `LIST "" ""`;
//! - an APPEND of several messages (RFC 3502 MULTIAPPEND) is parsed here (each message's
//!   flags and date by imap-codec, on a one-message APPEND built for it) and replaced by an
//!   APPEND of one placeholder byte to the same mailbox; the messages are in [`Ext::append`].
//!
//! Pure: no I/O, no tokio. Anything it does not recognize is left for imap-codec to judge.

use bounded_static::IntoBoundedStatic;
use imap_codec::CommandCodec;
use imap_codec::decode::Decoder as _;
use imap_codec::imap_types::command::CommandBody;
use imap_codec::imap_types::datetime::DateTime;
use imap_codec::imap_types::flag::Flag;

/// What replaces `$`: the range 4294967295:4294967294 (see the module docs).
pub const SAVED_MARKER: &[u8] = b"4294967295:4294967294";
const SAVED_MARKER_ASC: &[u8] = b"4294967294:4294967295";
/// Bounds for the extended LIST syntax (patterns, options).
const MAX_LIST_ITEMS: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReturnOpt {
    Min,
    Max,
    All,
    Count,
    Save,
}

/// `STATUS` items a LIST-STATUS return option may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusItem {
    Messages,
    UidNext,
    UidValidity,
    Unseen,
    Deleted,
    Size,
    HighestModSeq,
    Recent,
}

/// An extended LIST command (RFC 5258), fully parsed. Patterns are the raw wire bytes
/// (modified UTF-7 or UTF-8 is the session's business).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ListExt {
    pub reference: Vec<u8>,
    pub patterns: Vec<Vec<u8>>,
    pub sel_subscribed: bool,
    pub sel_remote: bool,
    pub sel_recursive: bool,
    pub sel_special_use: bool,
    pub ret_subscribed: bool,
    pub ret_children: bool,
    pub ret_special_use: bool,
    pub ret_status: Option<Vec<StatusItem>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ext {
    /// `SEARCH RETURN (...)` options in the order given; `Some(empty)` for `RETURN ()`.
    pub search_return: Option<Vec<ReturnOpt>>,
    /// `SORT RETURN (...)` options (RFC 5267 ESORT); `Some(empty)` for `RETURN ()`.
    pub sort_return: Option<Vec<ReturnOpt>>,
    /// At least one `$` was replaced by [`SAVED_MARKER`].
    pub saved: bool,
    /// An extended LIST (the message handed on is `tag LIST "" ""`).
    pub list: Option<Box<ListExt>>,
    /// The messages of a MULTIAPPEND (the message handed on is `tag APPEND mailbox {1}x`,
    /// whose placeholder byte is not a message).
    pub append: Option<Vec<AppendMsg>>,
}

/// One message of a MULTIAPPEND.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppendMsg {
    pub flags: Vec<Flag<'static>>,
    pub date: Option<DateTime>,
    pub data: Vec<u8>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Pre {
    /// Nothing to do: decode the original message.
    Unchanged,
    /// Decode these bytes instead and apply `Ext`.
    Rewritten(Vec<u8>, Ext),
    /// Recognized but malformed: answer BAD with this text.
    Bad(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok {
    Atom,
    Quoted,
    /// Literal data (the span is the data only; `start_all` in `Token` covers `{n}\r\n`).
    Literal,
    Open,
    Close,
    Space,
    End,
}

#[derive(Debug, Clone, Copy)]
struct Token {
    kind: Tok,
    /// Where the token starts in the message (the `{` of a literal).
    start: usize,
    /// The value: atom text, quoted content (escaped), literal data.
    vs: usize,
    ve: usize,
    /// One past the token.
    end: usize,
}

/// At most this many tokens are looked at; a longer command is left to imap-codec as it is
/// (so memory stays a small multiple of the command, whatever its shape).
const MAX_TOKENS: usize = 4096;

/// Split a complete message into tokens. `None` when it is not tokenizable (left to
/// imap-codec, which will reject it) or too long to bother.
fn tokenize(msg: &[u8]) -> Option<Vec<Token>> {
    let mut toks = Vec::new();
    let mut i = 0;
    while i < msg.len() {
        if toks.len() >= MAX_TOKENS {
            return None;
        }
        let start = i;
        let b = msg[i];
        let tok = match b {
            b'\r' if msg.get(i + 1) == Some(&b'\n') && i + 2 == msg.len() => {
                toks.push(Token {
                    kind: Tok::End,
                    start,
                    vs: i,
                    ve: i,
                    end: msg.len(),
                });
                return Some(toks);
            }
            b'\r' | b'\n' => return None,
            b' ' => {
                i += 1;
                Token {
                    kind: Tok::Space,
                    start,
                    vs: start,
                    ve: i,
                    end: i,
                }
            }
            b'(' | b')' => {
                i += 1;
                Token {
                    kind: if b == b'(' { Tok::Open } else { Tok::Close },
                    start,
                    vs: start,
                    ve: i,
                    end: i,
                }
            }
            b'"' => {
                i += 1;
                loop {
                    match msg.get(i)? {
                        b'\\' => i += 2,
                        b'"' => break,
                        b'\r' | b'\n' => return None,
                        _ => i += 1,
                    }
                }
                i += 1;
                Token {
                    kind: Tok::Quoted,
                    start,
                    vs: start + 1,
                    ve: i - 1,
                    end: i,
                }
            }
            b'{' | b'~' => {
                if b == b'~' {
                    i += 1;
                    if msg.get(i) != Some(&b'{') {
                        return None;
                    }
                }
                i += 1;
                let digits = i;
                while msg.get(i).is_some_and(u8::is_ascii_digit) {
                    i += 1;
                }
                if i == digits || i - digits > 10 {
                    return None;
                }
                let n: usize = std::str::from_utf8(&msg[digits..i]).ok()?.parse().ok()?;
                if matches!(msg.get(i), Some(b'+') | Some(b'-')) {
                    i += 1;
                }
                if msg.get(i..i + 3) != Some(b"}\r\n") {
                    return None;
                }
                i += 3;
                let vs = i;
                let ve = vs.checked_add(n)?;
                if ve > msg.len() {
                    return None;
                }
                i = ve;
                Token {
                    kind: Tok::Literal,
                    start,
                    vs,
                    ve,
                    end: i,
                }
            }
            _ => {
                while i < msg.len() && !matches!(msg[i], b' ' | b'(' | b')' | b'"' | b'\r' | b'\n')
                {
                    // A literal announcement ends an atom only at its start; `{` inside an
                    // atom is invalid and left to imap-codec.
                    i += 1;
                }
                Token {
                    kind: Tok::Atom,
                    start,
                    vs: start,
                    ve: i,
                    end: i,
                }
            }
        };
        toks.push(tok);
    }
    None
}

/// Cursor over tokens with the message at hand.
struct P<'m> {
    msg: &'m [u8],
    toks: Vec<Token>,
    i: usize,
}

impl<'m> P<'m> {
    fn peek(&self) -> Option<&Token> {
        self.toks.get(self.i)
    }
    fn text(&self, t: &Token) -> &'m [u8] {
        &self.msg[t.vs..t.ve]
    }
    fn is_atom(&self, word: &str) -> bool {
        self.peek().is_some_and(|t| {
            t.kind == Tok::Atom && self.text(t).eq_ignore_ascii_case(word.as_bytes())
        })
    }
    fn space(&mut self) -> bool {
        if self.peek().is_some_and(|t| t.kind == Tok::Space) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn kind(&self) -> Option<Tok> {
        self.peek().map(|t| t.kind)
    }
    fn next(&mut self) -> Option<Token> {
        let t = self.toks.get(self.i).copied();
        self.i += 1;
        t
    }
    /// The value of a string token (quoted unescaped, literal, or atom).
    fn string(&mut self) -> Option<Vec<u8>> {
        let t = self.next()?;
        match t.kind {
            Tok::Atom | Tok::Literal => Some(self.text(&t).to_vec()),
            Tok::Quoted => Some(unescape(self.text(&t))),
            _ => None,
        }
    }
}

fn unescape(q: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(q.len());
    let mut esc = false;
    for &b in q {
        if !esc && b == b'\\' {
            esc = true;
            continue;
        }
        esc = false;
        out.push(b);
    }
    out
}

/// Rewrites: byte ranges of the message replaced by new bytes (sorted, disjoint).
#[derive(Default)]
struct Edits(Vec<(usize, usize, Vec<u8>)>);

impl Edits {
    fn apply(self, msg: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(msg.len());
        let mut at = 0;
        for (s, e, with) in self.0 {
            out.extend_from_slice(&msg[at..s]);
            out.extend_from_slice(&with);
            at = e;
        }
        out.extend_from_slice(&msg[at..]);
        out
    }
}

/// Pre-parse one complete client message.
pub fn preparse(msg: &[u8]) -> Pre {
    // Only a few commands can hold these forms: look at the verb before tokenizing.
    let mut words = msg.splitn(4, |b| *b == b' ' || *b == b'\r');
    let _tag = words.next();
    let mut verb = words.next().unwrap_or_default();
    if verb.eq_ignore_ascii_case(b"UID") {
        verb = words.next().unwrap_or_default();
    }
    let interesting = [
        &b"FETCH"[..],
        b"STORE",
        b"COPY",
        b"MOVE",
        b"EXPUNGE",
        b"SEARCH",
        b"SORT",
        b"LIST",
        b"APPEND",
    ]
    .iter()
    .any(|v| verb.eq_ignore_ascii_case(v));
    if !interesting {
        return Pre::Unchanged;
    }
    let Some(toks) = tokenize(msg) else {
        return Pre::Unchanged;
    };
    let mut p = P { msg, toks, i: 0 };
    // tag SP verb
    let Some(tag) = p.next() else {
        return Pre::Unchanged;
    };
    if tag.kind != Tok::Atom || !p.space() {
        return Pre::Unchanged;
    }
    let mut uid = false;
    if p.is_atom("UID") {
        p.i += 1;
        if !p.space() {
            return Pre::Unchanged;
        }
        uid = true;
    }
    let Some(verb) = p.peek().copied().filter(|t| t.kind == Tok::Atom) else {
        return Pre::Unchanged;
    };
    let verb = p.text(&verb).to_ascii_uppercase();
    p.i += 1;
    let mut ext = Ext::default();
    let mut edits = Edits::default();
    match verb.as_slice() {
        b"FETCH" | b"STORE" | b"COPY" | b"MOVE" if p.space() => {
            seq_token(&mut p, &mut ext, &mut edits);
        }
        b"EXPUNGE" if uid && p.space() => {
            seq_token(&mut p, &mut ext, &mut edits);
        }
        b"SEARCH" => {
            if let Err(m) = search(&mut p, &mut ext, &mut edits) {
                return Pre::Bad(m);
            }
        }
        b"APPEND" if !uid => {
            return match multiappend(&mut p) {
                Ok(None) => Pre::Unchanged,
                Ok(Some((mailbox, msgs))) => {
                    let mut bytes = msg[..tag.end].to_vec();
                    bytes.extend_from_slice(b" APPEND ");
                    bytes.extend_from_slice(&msg[mailbox.start..mailbox.end]);
                    bytes.extend_from_slice(b" {1}\r\nx\r\n");
                    ext.append = Some(msgs);
                    Pre::Rewritten(bytes, ext)
                }
                Err(m) => Pre::Bad(m),
            };
        }
        b"SORT" => match sort_return(&mut p, &mut edits) {
            Ok(r) => ext.sort_return = r,
            Err(m) => return Pre::Bad(m),
        },
        b"LIST" if !uid => match list(&mut p) {
            Ok(None) => return Pre::Unchanged,
            Ok(Some(l)) => {
                let mut bytes = msg[..tag.end].to_vec();
                bytes.extend_from_slice(b" LIST \"\" \"\"\r\n");
                ext.list = Some(Box::new(l));
                return Pre::Rewritten(bytes, ext);
            }
            Err(m) => return Pre::Bad(m),
        },
        _ => {}
    }
    if edits.0.is_empty() && ext == Ext::default() {
        Pre::Unchanged
    } else {
        Pre::Rewritten(edits.apply(msg), ext)
    }
}

/// A sequence-set position: `$` becomes the marker; the marker written by the client is
/// made ascending so it cannot be taken for `$`.
fn seq_token(p: &mut P<'_>, ext: &mut Ext, edits: &mut Edits) {
    let Some(t) = p.peek().copied() else {
        return;
    };
    if t.kind != Tok::Atom {
        return;
    }
    let text = p.text(&t);
    if text == b"$" {
        ext.saved = true;
        edits.0.push((t.start, t.end, SAVED_MARKER.to_vec()));
    } else if text == SAVED_MARKER {
        edits.0.push((t.start, t.end, SAVED_MARKER_ASC.to_vec()));
    }
    p.i += 1;
}

fn search(p: &mut P<'_>, ext: &mut Ext, edits: &mut Edits) -> Result<(), &'static str> {
    let before = p.i;
    if !p.space() {
        return Ok(());
    }
    if p.is_atom("RETURN") {
        let start = p.toks[before].start;
        p.i += 1;
        if !p.space() || p.kind() != Some(Tok::Open) {
            return Err("RETURN needs a list of options");
        }
        p.i += 1;
        let mut opts = Vec::new();
        for a in atoms_in_parens(p)? {
            let o = match a.to_ascii_uppercase().as_slice() {
                b"MIN" => ReturnOpt::Min,
                b"MAX" => ReturnOpt::Max,
                b"ALL" => ReturnOpt::All,
                b"COUNT" => ReturnOpt::Count,
                b"SAVE" => ReturnOpt::Save,
                _ => return Err("Unknown RETURN option"),
            };
            if !opts.contains(&o) {
                opts.push(o);
            }
        }
        // `RETURN (...)` and the space before it go; the space after stays as the separator.
        let end = p.toks[p.i - 1].end;
        if p.kind() != Some(Tok::Space) {
            return Err("Search criteria missing");
        }
        edits.0.push((start, end, Vec::new()));
        ext.search_return = Some(opts);
        p.space();
    } else {
        p.i = before + 1;
    }
    if p.is_atom("CHARSET") {
        p.i += 1;
        if !p.space() {
            return Ok(());
        }
        p.next();
        if !p.space() {
            return Ok(());
        }
    }
    search_keys(p, ext, edits);
    Ok(())
}

/// `SORT RETURN (...)` (RFC 5267): the options, the clause taken out of the message.
fn sort_return(p: &mut P<'_>, edits: &mut Edits) -> Result<Option<Vec<ReturnOpt>>, &'static str> {
    let before = p.i;
    if !p.space() || !p.is_atom("RETURN") {
        return Ok(None);
    }
    let start = p.toks[before].start;
    p.i += 1;
    if !p.space() || p.kind() != Some(Tok::Open) {
        return Err("RETURN needs a list of options");
    }
    p.i += 1;
    let mut opts = Vec::new();
    for a in atoms_in_parens(p)? {
        let o = match a.to_ascii_uppercase().as_slice() {
            b"MIN" => ReturnOpt::Min,
            b"MAX" => ReturnOpt::Max,
            b"ALL" => ReturnOpt::All,
            b"COUNT" => ReturnOpt::Count,
            _ => return Err("Unknown RETURN option"),
        };
        if !opts.contains(&o) {
            opts.push(o);
        }
    }
    let end = p.toks[p.i - 1].end;
    if p.kind() != Some(Tok::Space) {
        return Err("Sort criteria missing");
    }
    edits.0.push((start, end, Vec::new()));
    Ok(Some(opts))
}

/// Walk search keys (leaving validation to imap-codec), replacing `$` where a key or a
/// UID argument is expected.
fn search_keys(p: &mut P<'_>, ext: &mut Ext, edits: &mut Edits) {
    while let Some(t) = p.peek().copied() {
        match t.kind {
            Tok::End => return,
            // Grouping and separators; a string where a key belongs is left to imap-codec.
            Tok::Space | Tok::Open | Tok::Close | Tok::Quoted | Tok::Literal => p.i += 1,
            Tok::Atom => {
                let word = p.text(&t).to_ascii_uppercase();
                // A sequence set where a key belongs: `$`, or the client's own marker text
                // (made ascending by `seq_token`).
                if word == b"$" || word == SAVED_MARKER {
                    seq_token(p, ext, edits);
                    continue;
                }
                p.i += 1;
                let args = match word.as_slice() {
                    b"UID" => {
                        if p.space() {
                            seq_token(p, ext, edits);
                        }
                        continue;
                    }
                    b"BCC" | b"BEFORE" | b"BODY" | b"CC" | b"FROM" | b"KEYWORD" | b"LARGER"
                    | b"ON" | b"SENTBEFORE" | b"SENTON" | b"SENTSINCE" | b"SINCE" | b"SMALLER"
                    | b"SUBJECT" | b"TEXT" | b"TO" | b"UNKEYWORD" => 1,
                    b"HEADER" => 2,
                    b"MODSEQ" => {
                        // MODSEQ [entry-name entry-type] value: an entry name is a string.
                        let at = p.i;
                        let entry =
                            p.space() && matches!(p.kind(), Some(Tok::Quoted) | Some(Tok::Literal));
                        p.i = at;
                        if entry { 3 } else { 1 }
                    }
                    _ => 0,
                };
                for _ in 0..args {
                    if !p.space() {
                        return;
                    }
                    match p.kind() {
                        Some(Tok::Atom) | Some(Tok::Quoted) | Some(Tok::Literal) => p.i += 1,
                        _ => return,
                    }
                }
            }
        }
    }
}

/// MULTIAPPEND (RFC 3502 §6): `APPEND SP mailbox 1*(append-opts SP literal)`, with
/// `append-opts = [SP flag-list] [SP date-time]`. `Ok(None)`: one message (or a form this
/// does not know), left to imap-codec. Returns the mailbox token and the messages.
fn multiappend(p: &mut P<'_>) -> Result<Option<(Token, Vec<AppendMsg>)>, &'static str> {
    if !p.space() {
        return Ok(None);
    }
    let Some(mailbox) = p.next() else {
        return Ok(None);
    };
    if !matches!(mailbox.kind, Tok::Atom | Tok::Quoted | Tok::Literal) {
        return Ok(None);
    }
    // (start of the options, the literal token) per message
    let mut found: Vec<(usize, Token)> = Vec::new();
    loop {
        if p.kind() == Some(Tok::End) {
            break;
        }
        if !p.space() {
            return Ok(None);
        }
        let opts = p.peek().map_or(0, |t| t.start);
        if p.kind() == Some(Tok::Open) {
            while let Some(t) = p.next() {
                if t.kind == Tok::Close {
                    break;
                }
            }
            if !p.space() {
                return Ok(None);
            }
        }
        if p.kind() == Some(Tok::Quoted) {
            p.i += 1;
            if !p.space() {
                return Ok(None);
            }
        }
        match p.next() {
            Some(t) if t.kind == Tok::Literal => found.push((opts, t)),
            _ => return Ok(None),
        }
    }
    if found.len() < 2 {
        return Ok(None);
    }
    let mut msgs = Vec::with_capacity(found.len());
    for (opts, lit) in found {
        // The options are judged by imap-codec on a one-message APPEND with a placeholder.
        let mut one = b"a APPEND INBOX ".to_vec();
        one.extend_from_slice(&p.msg[opts..lit.start]);
        one.extend_from_slice(b"{1}\r\nx\r\n");
        let (flags, date) = match CommandCodec::default().decode(&one) {
            Ok((b"", cmd)) => match cmd.body {
                CommandBody::Append { flags, date, .. } => (flags.into_static(), date),
                _ => return Err("Bad APPEND message options"),
            },
            _ => return Err("Bad APPEND message options"),
        };
        let data = p.text(&lit);
        // A literal (not literal8, `~{n}`) holds no NUL (RFC 3501 CHAR8), as imap-codec says.
        let literal8 = p.msg[lit.start] == b'~';
        if !literal8 && data.contains(&0) {
            return Err("NUL in a literal");
        }
        msgs.push(AppendMsg {
            flags,
            date,
            data: data.to_vec(),
        });
    }
    Ok(Some((mailbox, msgs)))
}

/// Extended LIST (RFC 5258 §6):
/// `LIST [SP list-select-opts] SP mailbox SP mbox-or-pat [SP list-return-opts]`.
/// `Ok(None)`: the basic form, left to imap-codec.
fn list(p: &mut P<'_>) -> Result<Option<ListExt>, &'static str> {
    let mut l = ListExt::default();
    if !p.space() {
        return Ok(None);
    }
    let mut extended = false;
    if p.kind() == Some(Tok::Open) {
        extended = true;
        p.i += 1;
        let mut base = false;
        for opt in atoms_in_parens(p)? {
            match opt.to_ascii_uppercase().as_slice() {
                b"SUBSCRIBED" => {
                    l.sel_subscribed = true;
                    base = true;
                }
                b"REMOTE" => l.sel_remote = true,
                b"RECURSIVEMATCH" => l.sel_recursive = true,
                b"SPECIAL-USE" => {
                    l.sel_special_use = true;
                    base = true;
                }
                _ => return Err("Unknown LIST selection option"),
            }
        }
        // RECURSIVEMATCH alone would be meaningless (RFC 5258 §3).
        if l.sel_recursive && !base {
            return Err("RECURSIVEMATCH needs another selection option");
        }
        if !p.space() {
            return Err("LIST needs a reference name");
        }
    }
    l.reference = p.string().ok_or("Bad reference name")?;
    if !p.space() {
        return Err("LIST needs a mailbox pattern");
    }
    if p.kind() == Some(Tok::Open) {
        extended = true;
        p.i += 1;
        loop {
            match p.kind() {
                Some(Tok::Close) if !l.patterns.is_empty() => {
                    p.i += 1;
                    break;
                }
                Some(Tok::Space) if !l.patterns.is_empty() => p.i += 1,
                Some(Tok::Atom) | Some(Tok::Quoted) | Some(Tok::Literal) => {
                    if l.patterns.len() >= MAX_LIST_ITEMS {
                        return Err("Too many patterns");
                    }
                    l.patterns.push(p.string().ok_or("Bad pattern")?);
                }
                _ => return Err("Bad pattern list"),
            }
        }
    } else {
        l.patterns.push(p.string().ok_or("Bad pattern")?);
    }
    if p.space() {
        if !p.is_atom("RETURN") {
            return Err("Expected RETURN");
        }
        extended = true;
        p.i += 1;
        if !p.space() || p.kind() != Some(Tok::Open) {
            return Err("RETURN needs a list of options");
        }
        p.i += 1;
        loop {
            match p.next().map(|t| (t.kind, t)) {
                Some((Tok::Close, _)) => break,
                Some((Tok::Space, _)) => continue,
                Some((Tok::Atom, t)) => match p.text(&t).to_ascii_uppercase().as_slice() {
                    b"SUBSCRIBED" => l.ret_subscribed = true,
                    b"CHILDREN" => l.ret_children = true,
                    b"SPECIAL-USE" => l.ret_special_use = true,
                    b"STATUS" => {
                        if !p.space() || p.kind() != Some(Tok::Open) || l.ret_status.is_some() {
                            return Err("Bad STATUS return option");
                        }
                        p.i += 1;
                        let mut items = Vec::new();
                        for a in atoms_in_parens(p)? {
                            let it = match a.to_ascii_uppercase().as_slice() {
                                b"MESSAGES" => StatusItem::Messages,
                                b"UIDNEXT" => StatusItem::UidNext,
                                b"UIDVALIDITY" => StatusItem::UidValidity,
                                b"UNSEEN" => StatusItem::Unseen,
                                b"DELETED" => StatusItem::Deleted,
                                b"SIZE" => StatusItem::Size,
                                b"HIGHESTMODSEQ" => StatusItem::HighestModSeq,
                                b"RECENT" => StatusItem::Recent,
                                _ => return Err("Unknown STATUS item"),
                            };
                            if !items.contains(&it) {
                                items.push(it);
                            }
                        }
                        if items.is_empty() {
                            return Err("STATUS needs items");
                        }
                        l.ret_status = Some(items);
                    }
                    _ => return Err("Unknown LIST return option"),
                },
                _ => return Err("Bad LIST return options"),
            }
        }
    }
    if p.kind() != Some(Tok::End) {
        return Err("Unexpected text after LIST");
    }
    Ok(extended.then_some(l))
}

/// Atoms up to the closing parenthesis (the opening one is consumed), space-separated.
fn atoms_in_parens(p: &mut P<'_>) -> Result<Vec<Vec<u8>>, &'static str> {
    let mut v = Vec::new();
    loop {
        match p.next() {
            Some(t) if t.kind == Tok::Close => return Ok(v),
            Some(t) if t.kind == Tok::Space && !v.is_empty() => {
                if p.kind() != Some(Tok::Atom) {
                    return Err("Bad option list");
                }
            }
            Some(t) if t.kind == Tok::Atom => {
                if v.len() >= MAX_LIST_ITEMS {
                    return Err("Too many options");
                }
                v.push(p.text(&t).to_vec());
                if !matches!(p.kind(), Some(Tok::Space) | Some(Tok::Close)) {
                    return Err("Bad option list");
                }
            }
            _ => return Err("Bad option list"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rw(s: &[u8]) -> (String, Ext) {
        match preparse(s) {
            Pre::Rewritten(b, e) => (String::from_utf8(b).unwrap(), e),
            other => panic!("{other:?} for {}", String::from_utf8_lossy(s)),
        }
    }

    #[test]
    fn plain_commands_are_untouched() {
        for c in [
            &b"a NOOP\r\n"[..],
            b"a FETCH 1:* FLAGS\r\n",
            b"a UID SEARCH ALL\r\n",
            b"a SEARCH KEYWORD $ HEADER $ $\r\n",
            b"a LIST \"\" *\r\n",
            b"a LIST \"\" {1}\r\n*\r\n",
            b"a LOGIN {6}\r\nRETURN \"x\"\r\n",
            b"a SEARCH SUBJECT \"RETURN (ALL)\"\r\n",
            b"a SEARCH SUBJECT {12}\r\nRETURN (ALL)\r\n",
            b"garbage",
            b"",
        ] {
            assert_eq!(
                preparse(c),
                Pre::Unchanged,
                "{}",
                String::from_utf8_lossy(c)
            );
        }
    }

    #[test]
    fn search_return_is_taken_out() {
        let (b, e) = rw(b"a1 UID SEARCH RETURN (MIN max COUNT) UNSEEN\r\n");
        assert_eq!(b, "a1 UID SEARCH UNSEEN\r\n");
        assert_eq!(
            e.search_return,
            Some(vec![ReturnOpt::Min, ReturnOpt::Max, ReturnOpt::Count])
        );
        let (b, e) = rw(b"a1 SEARCH RETURN () CHARSET UTF-8 SUBJECT {3}\r\n\xc3\xa9x\r\n");
        assert_eq!(
            b.as_bytes(),
            b"a1 SEARCH CHARSET UTF-8 SUBJECT {3}\r\n\xc3\xa9x\r\n"
        );
        assert_eq!(e.search_return, Some(vec![]));
        assert!(!e.saved);
    }

    #[test]
    fn dollar_is_replaced_only_where_a_sequence_set_belongs() {
        let (b, e) = rw(b"a SEARCH RETURN (SAVE) KEYWORD $ $ NOT $ OR $ UID $ HEADER $ $\r\n");
        assert_eq!(
            b,
            "a SEARCH KEYWORD $ 4294967295:4294967294 NOT 4294967295:4294967294 OR \
             4294967295:4294967294 UID 4294967295:4294967294 HEADER $ $\r\n"
        );
        assert!(e.saved);
        let (b, _) = rw(b"a UID FETCH $ (FLAGS)\r\n");
        assert_eq!(b, "a UID FETCH 4294967295:4294967294 (FLAGS)\r\n");
        for verb in ["STORE", "COPY", "MOVE", "UID EXPUNGE", "UID MOVE"] {
            let (b, e) = rw(format!("t {verb} $ x\r\n").as_bytes());
            assert_eq!(b, format!("t {verb} 4294967295:4294967294 x\r\n"));
            assert!(e.saved);
        }
        // A client's own marker is made ascending, so it never means `$`.
        let (b, e) = rw(b"a FETCH 4294967295:4294967294 FLAGS\r\n");
        assert_eq!(b, "a FETCH 4294967294:4294967295 FLAGS\r\n");
        assert!(!e.saved);
        // `$` in a string or literal is data.
        assert_eq!(preparse(b"a SEARCH SUBJECT \"$\"\r\n"), Pre::Unchanged);
        assert_eq!(preparse(b"a SEARCH SUBJECT {1}\r\n$\r\n"), Pre::Unchanged);
        let (b, _) = rw(b"a SEARCH MODSEQ \"/flags/\\\\draft\" all 5 $\r\n");
        assert_eq!(
            b,
            "a SEARCH MODSEQ \"/flags/\\\\draft\" all 5 4294967295:4294967294\r\n"
        );
        let (b, _) = rw(b"a SEARCH MODSEQ 5 $\r\n");
        assert_eq!(b, "a SEARCH MODSEQ 5 4294967295:4294967294\r\n");
        let (b, _) = rw(b"a SEARCH ($ (UID $))\r\n");
        assert_eq!(
            b,
            "a SEARCH (4294967295:4294967294 (UID 4294967295:4294967294))\r\n"
        );
    }

    #[test]
    fn client_marker_in_search_keys_never_means_dollar() {
        let (b, e) = rw(b"a SEARCH 4294967295:4294967294 $\r\n");
        assert_eq!(
            b,
            "a SEARCH 4294967294:4294967295 4294967295:4294967294\r\n"
        );
        assert!(e.saved);
    }

    /// Mutations of valid commands (a small deterministic fuzz run that CI always does; the
    /// cargo-fuzz target goes further): never a panic, and a rewrite never grows a message
    /// by more than the `$` replacements can.
    #[test]
    fn mutated_commands_never_panic() {
        let seeds: [&[u8]; 6] = [
            b"a1 UID SEARCH RETURN (MIN MAX ALL COUNT SAVE) CHARSET UTF-8 OR $ UID $ SUBJECT {3}\r\nabc\r\n",
            b"a2 UID FETCH $ (FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])\r\n",
            b"a3 LIST (SUBSCRIBED RECURSIVEMATCH) \"\" (\"INBOX\" {2+}\r\n%x) RETURN (STATUS (MESSAGES SIZE) CHILDREN)\r\n",
            b"a4 SEARCH MODSEQ \"/flags/\\\\seen\" all 5 NOT (HEADER x $ $)\r\n",
            b"a5 UID EXPUNGE $\r\n",
            b"a6 MOVE $ Trash\r\n",
        ];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = |n: usize| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % n.max(1) as u64) as usize
        };
        let alphabet = b" ()\"{}+$\\\r\n*%~0123456789ARSUL";
        for _ in 0..20_000 {
            let mut m = seeds[rnd(seeds.len())].to_vec();
            for _ in 0..1 + rnd(4) {
                let at = rnd(m.len() + 1);
                match rnd(3) {
                    0 if at < m.len() => {
                        m.remove(at);
                    }
                    1 if at < m.len() => m[at] = alphabet[rnd(alphabet.len())],
                    _ => m.insert(at, alphabet[rnd(alphabet.len())]),
                }
            }
            if let Pre::Rewritten(out, _) = preparse(&m) {
                let dollars = m.iter().filter(|b| **b == b'$').count();
                assert!(
                    out.len() <= m.len() + dollars * SAVED_MARKER.len(),
                    "{}",
                    String::from_utf8_lossy(&m)
                );
            }
        }
    }

    #[test]
    fn huge_commands_are_left_to_imap_codec() {
        let mut m = b"a SEARCH RETURN (ALL)".to_vec();
        for _ in 0..MAX_TOKENS {
            m.extend_from_slice(b" ALL");
        }
        m.extend_from_slice(b"\r\n");
        assert_eq!(preparse(&m), Pre::Unchanged);
        assert_eq!(preparse(b"a APPEND INBOX {3+}\r\n$ $\r\n"), Pre::Unchanged);
    }

    #[test]
    fn sort_return_is_taken_out() {
        let (m, e) = rw(b"a UID SORT RETURN (MIN count) (DATE) UTF-8 ALL\r\n");
        assert_eq!(m, "a UID SORT (DATE) UTF-8 ALL\r\n");
        assert_eq!(e.sort_return, Some(vec![ReturnOpt::Min, ReturnOpt::Count]));
        let (m, e) = rw(b"a SORT RETURN () (DATE) UTF-8 ALL\r\n");
        assert_eq!(m, "a SORT (DATE) UTF-8 ALL\r\n");
        assert_eq!(e.sort_return, Some(vec![]));
        assert_eq!(preparse(b"a SORT (DATE) UTF-8 ALL\r\n"), Pre::Unchanged);
        assert_eq!(
            preparse(b"a SORT RETURN (SAVE) (DATE) UTF-8 ALL\r\n"),
            Pre::Bad("Unknown RETURN option")
        );
    }

    #[test]
    fn bad_return_clauses() {
        for c in [
            &b"a SEARCH RETURN (FOO) ALL\r\n"[..],
            b"a SEARCH RETURN MIN ALL\r\n",
            b"a SEARCH RETURN (MIN\r\n",
            b"a SEARCH RETURN (MIN)\r\n",
            b"a SEARCH RETURN (MIN  MAX) ALL\r\n",
            b"a SEARCH RETURN (MIN)ALL\r\n",
            b"a SEARCH RETURN ( MIN) ALL\r\n",
        ] {
            assert!(
                matches!(preparse(c), Pre::Bad(_)),
                "{}",
                String::from_utf8_lossy(c)
            );
        }
    }

    #[test]
    fn extended_list() {
        let (b, e) = rw(b"a LIST (SUBSCRIBED RECURSIVEMATCH) \"\" (\"INBOX\" Sent* {2}\r\n\xc3\xa9) RETURN (CHILDREN STATUS (MESSAGES UNSEEN) SPECIAL-USE)\r\n");
        assert_eq!(b, "a LIST \"\" \"\"\r\n");
        let l = e.list.unwrap();
        assert!(l.sel_subscribed && l.sel_recursive && !l.sel_remote);
        assert_eq!(
            l.patterns,
            vec![b"INBOX".to_vec(), b"Sent*".to_vec(), vec![0xc3, 0xa9]]
        );
        assert!(l.ret_children && l.ret_special_use && !l.ret_subscribed);
        assert_eq!(
            l.ret_status,
            Some(vec![StatusItem::Messages, StatusItem::Unseen])
        );
        let (_, e) = rw(b"a LIST \"\" % RETURN (SUBSCRIBED)\r\n");
        assert!(e.list.unwrap().ret_subscribed);
        let (_, e) = rw(b"a LIST () \"\" %\r\n");
        assert_eq!(e.list.unwrap().patterns, vec![b"%".to_vec()]);
        for c in [
            &b"a LIST (RECURSIVEMATCH) \"\" *\r\n"[..],
            b"a LIST (FOO) \"\" *\r\n",
            b"a LIST \"\" * RETURN (FOO)\r\n",
            b"a LIST \"\" () \r\n",
            b"a LIST \"\" * RETURN (STATUS ())\r\n",
            b"a LIST \"\" * RETURN (STATUS (BOGUS))\r\n",
            b"a LIST \"\" * FOO\r\n",
            b"a LIST (SUBSCRIBED)\"\" *\r\n",
        ] {
            assert!(
                matches!(preparse(c), Pre::Bad(_)),
                "{}",
                String::from_utf8_lossy(c)
            );
        }
    }
}
