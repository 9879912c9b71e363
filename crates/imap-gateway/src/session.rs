//! The IMAP session: state (RFC 9051 §3), which commands each state allows, the sequence
//! number map, and unsolicited updates held back where §7.5.1 requires. Replies are written
//! through `Out`, which encodes imap-types responses with imap-codec.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::{NonZeroU32, NonZeroU64};
use std::sync::Arc;
use std::time::Duration;

use imap_codec::ResponseCodec;
use imap_codec::encode::{Encoder, Fragment};
use imap_codec::imap_types::auth::AuthMechanism;
use imap_codec::imap_types::command::{
    Command, CommandBody, FetchModifier, SelectParameter, StoreModifier,
};
use imap_codec::imap_types::core::{AString, Charset, IString, QuotedChar, Tag, Vec1};
use imap_codec::imap_types::extensions::binary::LiteralOrLiteral8;
use imap_codec::imap_types::extensions::enable::CapabilityEnable;
use imap_codec::imap_types::extensions::namespace::Namespace;
use imap_codec::imap_types::extensions::quota::{QuotaGet, Resource};
use imap_codec::imap_types::extensions::sort::SortKey;
use imap_codec::imap_types::extensions::thread::ThreadingAlgorithm;
use imap_codec::imap_types::extensions::uidplus::{UidElement, UidSet as ImapUidSet};
use imap_codec::imap_types::extensions::utf8::Utf8Kind;
use imap_codec::imap_types::fetch::{
    Macro, MacroOrMessageDataItemNames, MessageDataItem, MessageDataItemName, Section,
};
use imap_codec::imap_types::flag::{
    Flag, FlagFetch, FlagNameAttribute, FlagPerm, StoreResponse, StoreType,
};
use imap_codec::imap_types::mailbox::{ListMailbox, Mailbox};
use imap_codec::imap_types::response::{
    Bye, Capability, Code, CommandContinuationRequest, Data, Response, Status, StatusBody,
    StatusKind, Tagged,
};
use imap_codec::imap_types::search::SearchKey;
use imap_codec::imap_types::sequence::{SeqOrUid, Sequence, SequenceSet};
use imap_codec::imap_types::status::{StatusDataItem, StatusDataItemName};
use mailsuite_proto as pb;
use mailsuite_runtime::ServiceError;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::authlimit::{AuthLimiter, Blocked};
use crate::convert;
use crate::esearch;
use crate::hub::{Hub, Subscription, is_resync};
use crate::mutf7;
use crate::preparse::{AppendMsg, Ext, ListExt, ReturnOpt, StatusItem};
use crate::seqmap::SeqMap;
use crate::sort;
use crate::store::{Listing, Store};
use crate::thread;

pub const DELIMITER: char = '/';

/// Buffered replies; flushed by the connection after each command, and during long
/// responses once the buffer grows.
pub struct Out<'w, W> {
    w: &'w mut W,
    /// Large fragments (a message literal, typically), in order, moved here as the encoder
    /// made them instead of being copied into `buf`; they go out before `buf`.
    queued: Vec<Vec<u8>>,
    buf: Vec<u8>,
}

const FLUSH_AT: usize = 64 * 1024;

impl<'w, W: AsyncWrite + Unpin> Out<'w, W> {
    pub fn new(w: &'w mut W) -> Self {
        Out {
            w,
            queued: Vec::new(),
            buf: Vec::new(),
        }
    }

    pub fn response(&mut self, r: &Response<'_>) {
        for fragment in ResponseCodec::default().encode(r) {
            let (Fragment::Line { data } | Fragment::Literal { data, .. }) = fragment;
            if data.len() >= FLUSH_AT {
                if !self.buf.is_empty() {
                    self.queued.push(std::mem::take(&mut self.buf));
                }
                self.queued.push(data);
            } else {
                self.buf.extend_from_slice(&data);
            }
        }
    }

    fn len(&self) -> usize {
        self.queued.iter().map(Vec::len).sum::<usize>() + self.buf.len()
    }

    pub fn data(&mut self, d: Data<'_>) {
        self.response(&Response::Data(d));
    }

    pub fn untagged(&mut self, kind: StatusKind, code: Option<Code<'_>>, text: &str) {
        self.response(&Response::Status(Status::Untagged(StatusBody {
            kind,
            code,
            text: text_of(text),
        })));
    }

    pub fn tagged(&mut self, tag: &Tag<'_>, kind: StatusKind, code: Option<Code<'_>>, text: &str) {
        self.response(&Response::Status(Status::Tagged(Tagged {
            tag: tag.clone(),
            body: StatusBody {
                kind,
                code,
                text: text_of(text),
            },
        })));
    }

    pub fn bye(&mut self, code: Option<Code<'_>>, text: &str) {
        self.response(&Response::Status(Status::Bye(Bye {
            code,
            text: text_of(text),
        })));
    }

    pub fn continuation(&mut self, text: &str) {
        match CommandContinuationRequest::basic(None, text) {
            Ok(c) => self.response(&Response::CommandContinuationRequest(c)),
            Err(_) => self.buf.extend_from_slice(b"+ \r\n"),
        }
    }

    pub fn raw(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    pub async fn flush(&mut self) -> std::io::Result<()> {
        for q in std::mem::take(&mut self.queued) {
            self.w.write_all(&q).await?;
        }
        if !self.buf.is_empty() {
            self.w.write_all(&self.buf).await?;
            self.buf.clear();
        }
        self.w.flush().await
    }

    async fn maybe_flush(&mut self) -> std::io::Result<()> {
        if self.len() >= FLUSH_AT {
            self.flush().await?;
        }
        Ok(())
    }

    pub fn inner(&mut self) -> &mut W {
        self.w
    }

    #[cfg(test)]
    pub fn take(&mut self) -> Vec<u8> {
        let mut all = std::mem::take(&mut self.queued).concat();
        all.append(&mut self.buf);
        all
    }
}

fn text_of(s: &str) -> imap_codec::imap_types::core::Text<'static> {
    let clean: String = s.chars().filter(|c| *c != '\r' && *c != '\n').collect();
    let clean = if clean.is_empty() {
        "ok".to_string()
    } else {
        clean
    };
    clean
        .clone()
        .try_into()
        .unwrap_or_else(|_| "error".to_string().try_into().expect("valid text"))
}

fn other_code(s: &str) -> Code<'static> {
    Code::Other(imap_codec::imap_types::response::CodeOther::unvalidated(
        s.as_bytes().to_vec(),
    ))
}

/// What the connection must do after a command.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    Continue,
    StartTls(Tag<'static>),
    /// AUTHENTICATE PLAIN without an initial response: ask for it.
    AuthContinue(Tag<'static>),
    Idle(Tag<'static>),
    Logout,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateKind {
    NotAuthenticated,
    Authenticated,
    Selected,
    Logout,
}

pub struct Selected {
    pub mailbox_id: i64,
    pub name: String,
    pub read_only: bool,
    pub uidvalidity: u32,
    pub seq: SeqMap,
    /// Highest modseq whose changes this session has seen.
    pub modseq: u64,
    /// A change event arrived: poll the change log at the next opportunity.
    pub dirty: bool,
    /// This session changed the mailbox itself (APPEND): its next poll must be sent after
    /// that, not be a shared one (`changes_cache`) that may have started before.
    pub own_change: bool,
    /// Expunges learnt while they could not be announced (§7.5.1).
    pub pending_expunges: Vec<u32>,
    /// Keywords announced in FLAGS / PERMANENTFLAGS: a FETCH may show no other (RFC 9051
    /// §7.3.5: a new keyword is announced before it is used).
    pub keywords: Vec<String>,
    /// Flag states this session already reported, so its own STOREs are not echoed twice.
    pub reported: HashMap<u32, u64>,
    /// Messages with this UID or above are \Recent in this session (RFC 3501): those the
    /// store reported as recent at SELECT (the newest) and everything that arrives later.
    pub recent_from: u32,
    /// IMAP4rev2 session: no \Recent at all (RFC 9051 Appendix E).
    pub no_recent: bool,
}

impl Selected {
    /// Apply a batch of changes from the store (or a resync diff) to the session's view and
    /// report them: EXPUNGE (if allowed now), then EXISTS, then FETCH FLAGS.
    /// The changes are borrowed: an answer shared by many sessions (`changes_cache`) is
    /// not copied per session. Expunged UIDs outside the view, or already pending, are
    /// ignored.
    fn apply_changes<'a, W: AsyncWrite + Unpin>(
        &mut self,
        expunged: &[u32],
        changed: impl IntoIterator<Item = &'a pb::MessageFlags>,
        highest: u64,
        allow_expunge: bool,
        condstore: bool,
        out: &mut Out<'_, W>,
    ) {
        for &u in expunged {
            if self.seq.seq(u).is_some() && !self.pending_expunges.contains(&u) {
                self.pending_expunges.push(u);
            }
        }
        let mut added = false;
        let mut changed: Vec<&pb::MessageFlags> = changed.into_iter().collect();
        changed.sort_by_key(|m| m.uid);
        let mut flag_updates = Vec::new();
        for m in changed {
            if self.pending_expunges.contains(&m.uid) {
                continue;
            }
            if self.seq.seq(m.uid).is_some() {
                if self.reported.get(&m.uid).is_some_and(|&ms| ms >= m.modseq) {
                    continue;
                }
                flag_updates.push(m);
            } else {
                // New arrivals have UIDs above all known ones; anything else is a
                // message this session already saw expunged.
                added |= self.seq.push(m.uid);
            }
        }
        self.modseq = self.modseq.max(highest);
        self.reported.clear();
        if allow_expunge {
            for u in std::mem::take(&mut self.pending_expunges) {
                if let Some(s) = self.seq.remove(u) {
                    out.data(Data::Expunge(nz(s)));
                }
            }
        }
        // Announced after the EXPUNGEs whenever something arrived, even if the total is
        // unchanged (one expunge + one arrival): the client counts EXPUNGEs itself and
        // would otherwise believe the mailbox shrank.
        if added {
            out.data(Data::Exists(self.seq.len()));
            // RFC 3501 §7.3.2: the number of \Recent messages changed too (not in IMAP4rev2).
            if !self.no_recent {
                out.data(Data::Recent(self.seq.count_from(self.recent_from)));
            }
        }
        for m in flag_updates {
            let Some(seq) = self.seq.seq(m.uid) else {
                continue;
            };
            self.announce_keywords(&m.flags, out);
            let mut items = vec![
                MessageDataItem::Flags(self.flags(m.uid, &m.flags)),
                MessageDataItem::Uid(nz(m.uid)),
            ];
            if condstore && let Some(ms) = NonZeroU64::new(m.modseq) {
                items.push(MessageDataItem::ModSeq(ms));
            }
            out.data(Data::Fetch {
                seq: nz(seq),
                items: Vec1::try_from(items).expect("non-empty"),
            });
        }
    }

    /// Announce with `* FLAGS` and `* OK [PERMANENTFLAGS]` the keywords among `flags` this
    /// session has not announced yet; called before the FETCH that shows them.
    fn announce_keywords<W: AsyncWrite + Unpin>(&mut self, flags: &[String], out: &mut Out<'_, W>) {
        let mut new = false;
        for f in flags {
            if is_keyword(f) && !self.keywords.iter().any(|k| k.eq_ignore_ascii_case(f)) {
                self.keywords.push(f.clone());
                new = true;
            }
        }
        if new {
            flags_responses(&self.keywords, self.read_only, out);
        }
    }

    fn is_recent(&self, uid: u32) -> bool {
        !self.no_recent && uid >= self.recent_from
    }

    fn flags(&self, uid: u32, flags: &[String]) -> Vec<FlagFetch<'static>> {
        let mut f = convert::flags_fetch(flags);
        if self.is_recent(uid) {
            f.push(FlagFetch::Recent);
        }
        f
    }
}

#[derive(Debug, Clone)]
pub struct SessionLimits {
    pub max_auth_failures: u32,
    /// Elements (numbers and ranges) one sequence set may have.
    pub max_sequence_set: usize,
    /// Bytes of LIST patterns (reference included) in one command.
    pub max_list_pattern: usize,
    pub auth_failure_delay: Duration,
    pub fetch_batch: u32,
    pub fetch_buffer_bytes: u64,
    pub max_fetch_bytes: u64,
}

pub struct Session {
    store: Store,
    hub: Hub,
    limits: SessionLimits,
    pub tls: bool,
    /// LOGIN/AUTHENTICATE allowed without TLS (loopback and configured so).
    pub plaintext_ok: bool,
    pub tls_available: bool,
    pub remote_ip: String,
    /// The gateway-wide failed-login table and this client's address.
    pub auth_limiter: Option<(Arc<AuthLimiter>, IpAddr)>,
    state: StateKind,
    account: Option<pb::Account>,
    pub selected: Option<Box<Selected>>,
    pub subscription: Option<Subscription>,
    pub condstore: bool,
    pub utf8: bool,
    /// `ENABLE IMAP4rev2` was given (RFC 9051 rules from then on).
    pub rev2: bool,
    /// The SEARCHRES saved result (RFC 5182): UIDs, ascending.
    saved: Vec<u32>,
    /// The command being handled used `$` (the pre-parser's marker stands for `saved`).
    uses_saved: bool,
    auth_failures: u32,
}

type Res<T> = Result<T, ServiceError>;

/// The IMAP reply for a store error (RFC 5530 response codes).
fn error_reply(e: &ServiceError) -> (StatusKind, Option<Code<'static>>, String) {
    let (code, text): (Option<Code<'static>>, String) = match e {
        ServiceError::NotFound(_) => (Some(other_code("NONEXISTENT")), "No such mailbox".into()),
        ServiceError::AlreadyExists(_) => (
            Some(other_code("ALREADYEXISTS")),
            "Mailbox already exists".into(),
        ),
        ServiceError::OverQuota { .. } => (Some(Code::OverQuota), "Quota exceeded".into()),
        ServiceError::TooLarge(_) => (Some(Code::TooBig), "Too large".into()),
        ServiceError::Cannot(m) => (Some(other_code("CANNOT")), m.clone()),
        ServiceError::InvalidArgument(m) => (Some(other_code("CANNOT")), m.clone()),
        ServiceError::PermissionDenied(_) => {
            (Some(other_code("NOPERM")), "Permission denied".into())
        }
        ServiceError::Conflict(_) => (Some(other_code("INUSE")), "Try again".into()),
        ServiceError::Unavailable(_) => (Some(other_code("UNAVAILABLE")), "Try again later".into()),
        ServiceError::Unauthenticated => (
            Some(other_code("AUTHENTICATIONFAILED")),
            "Authentication failed".into(),
        ),
        ServiceError::Internal(_) => (Some(other_code("SERVERBUG")), "Internal error".into()),
    };
    (StatusKind::No, code, text)
}

fn flag_strings(flags: &[Flag<'_>]) -> Vec<String> {
    flags.iter().map(convert::flag_name).collect()
}

/// APPEND's date-time as seconds since the epoch and the offset in minutes (0/0: now).
fn append_date(date: Option<imap_codec::imap_types::datetime::DateTime>) -> (i64, i32) {
    date.map(|d| {
        let dt: &chrono::DateTime<chrono::FixedOffset> = d.as_ref();
        (dt.timestamp(), dt.offset().local_minus_utc() / 60)
    })
    .unwrap_or((0, 0))
}

/// UIDs as an IMAP uid-set (`5:7,9`), in the order given, runs of +1 joined.
fn uid_set_text(uids: &[u32]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < uids.len() {
        let start = uids[i];
        let mut end = start;
        while i + 1 < uids.len() && uids[i + 1] == end.wrapping_add(1) {
            i += 1;
            end = uids[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if start == end {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}:{end}"));
        }
        i += 1;
    }
    out
}

fn nz(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)
}

fn imap_uid_set(uids: &[u32]) -> Option<ImapUidSet> {
    let set = pb::UidSet::from_uids(uids.iter().copied());
    let elems: Vec<UidElement> = set
        .ranges
        .iter()
        .filter(|r| r.start > 0)
        .map(|r| {
            if r.start == r.end {
                UidElement::Single(nz(r.start))
            } else {
                UidElement::Range(nz(r.start), nz(r.end))
            }
        })
        .collect();
    Vec1::try_from(elems).ok().map(ImapUidSet)
}

/// The pre-parser's stand-in for `$` (`preparse::SAVED_MARKER`).
fn is_saved_marker(set: &SequenceSet) -> bool {
    matches!(
        set.0.as_ref(),
        [Sequence::Range(SeqOrUid::Value(a), SeqOrUid::Value(b))]
            if a.get() == u32::MAX && b.get() == u32::MAX - 1
    )
}

fn sequence_set_of(nums: &[u32]) -> Option<SequenceSet> {
    let set = pb::UidSet::from_uids(nums.iter().copied());
    let seqs: Vec<Sequence> = set
        .ranges
        .iter()
        .filter(|r| r.start > 0)
        .map(|r| {
            if r.start == r.end {
                Sequence::Single(SeqOrUid::Value(nz(r.start)))
            } else {
                Sequence::Range(SeqOrUid::Value(nz(r.start)), SeqOrUid::Value(nz(r.end)))
            }
        })
        .collect();
    Vec1::try_from(seqs).ok().map(SequenceSet)
}

/// A LIST pattern (`*` any, `%` any except the delimiter), compiled once per command.
///
/// Matching runs the pattern as a set of positions over the name, one character at a time,
/// so a name of n characters costs O(n·m) for a pattern of m tokens however the wildcards are
/// placed; a backtracking matcher is exponential in the wildcards (`*a*a*a…b` against a long
/// name pinned a runtime worker for minutes).
pub struct ListPattern {
    toks: Vec<PatTok>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PatTok {
    Lit(char),
    Star,
    Pct,
}

impl ListPattern {
    pub fn new(pattern: &str) -> Self {
        let mut toks: Vec<PatTok> = Vec::new();
        for c in pattern.chars() {
            let t = match c {
                '*' => PatTok::Star,
                '%' => PatTok::Pct,
                c => PatTok::Lit(c),
            };
            // Adjacent wildcards are one: `**`, `*%` and `%*` are `*`, `%%` is `%`. This
            // keeps the epsilon step below a single pass.
            match (toks.last_mut(), t) {
                (Some(last @ (PatTok::Star | PatTok::Pct)), PatTok::Star | PatTok::Pct) => {
                    if t == PatTok::Star {
                        *last = PatTok::Star;
                    }
                }
                _ => toks.push(t),
            }
        }
        ListPattern { toks }
    }

    pub fn matches(&self, name: &str) -> bool {
        self.matches_counting(name).0
    }

    /// Whether `name` matches, and the work done: state updates, at most
    /// 2·(n+1)·(m+1) for n characters of name and m of pattern.
    pub fn matches_counting(&self, name: &str) -> (bool, u64) {
        let toks = &self.toks;
        let m = toks.len();
        // INBOX is case-insensitive (RFC 9051 §5.1).
        let fold = name == "INBOX";
        let mut steps = 0u64;
        // cur[j]: the first j tokens match the name read so far.
        let mut cur = vec![false; m + 1];
        let mut next = vec![false; m + 1];
        let close = |v: &mut [bool], steps: &mut u64| {
            // A wildcard may match nothing. Adjacent wildcards were merged, so one
            // ascending pass reaches every such position.
            for j in 0..m {
                if v[j] && matches!(toks[j], PatTok::Star | PatTok::Pct) {
                    v[j + 1] = true;
                }
            }
            *steps += m as u64 + 1;
        };
        cur[0] = true;
        close(&mut cur, &mut steps);
        for c in name.chars() {
            next.fill(false);
            let mut alive = false;
            for j in 0..m {
                if !cur[j] {
                    continue;
                }
                let to = match toks[j] {
                    PatTok::Star => Some(j),
                    PatTok::Pct => (c != DELIMITER).then_some(j),
                    PatTok::Lit(p) => {
                        (p == c || (fold && p.to_ascii_uppercase() == c)).then_some(j + 1)
                    }
                };
                if let Some(to) = to {
                    next[to] = true;
                    alive = true;
                }
            }
            steps += m as u64 + 1;
            if !alive {
                return (false, steps);
            }
            close(&mut next, &mut steps);
            std::mem::swap(&mut cur, &mut next);
        }
        (cur[m], steps)
    }
}

/// Does `name` match the LIST pattern? (One-off; LIST compiles a `ListPattern` once.)
pub fn pattern_matches(pattern: &str, name: &str) -> bool {
    ListPattern::new(pattern).matches(name)
}

/// Matcher steps after which a LIST hands its worker back to the runtime (a few ms of work).
const LIST_YIELD_STEPS: u64 = 1 << 20;

/// Which of `names` any of `patterns` matches, in order. One name costs at most name length
/// × pattern length steps, but a user chooses how many names (and ancestors of deep names)
/// there are, so the whole LIST is not bounded by the caps alone: it yields to the runtime
/// every `LIST_YIELD_STEPS` steps, so that one expensive LIST never stalls the other
/// sessions on its worker.
async fn match_names(patterns: &[ListPattern], names: &[&str]) -> Vec<bool> {
    let mut since_yield = 0u64;
    let mut out = Vec::with_capacity(names.len());
    for &name in names {
        let mut hit = false;
        for p in patterns {
            let (m, steps) = p.matches_counting(name);
            since_yield += steps;
            if m {
                hit = true;
                break;
            }
        }
        out.push(hit);
        if since_yield >= LIST_YIELD_STEPS {
            since_yield = 0;
            tokio::task::yield_now().await;
        }
    }
    out
}

/// The elements of a sequence set as closed intervals (`*` standing for `star`), sorted and
/// merged where they overlap or touch. Space is O(elements), whatever the intervals span.
pub fn merged_intervals(set: &SequenceSet, star: u32) -> Vec<(u32, u32)> {
    let v = |x: &SeqOrUid| match x {
        SeqOrUid::Value(n) => n.get(),
        SeqOrUid::Asterisk => star,
    };
    let mut iv: Vec<(u32, u32)> = set
        .0
        .as_ref()
        .iter()
        .map(|s| match s {
            Sequence::Single(x) => (v(x), v(x)),
            Sequence::Range(x, y) => (v(x).min(v(y)), v(x).max(v(y))),
        })
        .collect();
    iv.sort_unstable();
    let mut merged: Vec<(u32, u32)> = Vec::with_capacity(iv.len().min(64));
    for (a, b) in iv {
        match merged.last_mut() {
            Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    merged
}

/// The pure sort module's key for imap-codec's.
fn sort_key(k: &SortKey) -> sort::Key {
    match k {
        SortKey::Arrival => sort::Key::Arrival,
        SortKey::Cc => sort::Key::Cc,
        SortKey::Date => sort::Key::Date,
        SortKey::From => sort::Key::From,
        SortKey::Size => sort::Key::Size,
        SortKey::Subject => sort::Key::Subject,
        SortKey::To => sort::Key::To,
        SortKey::DisplayFrom => sort::Key::DisplayFrom,
        SortKey::DisplayTo => sort::Key::DisplayTo,
    }
}

/// Sequence set elements in a search key, nested keys included.
fn set_elements(k: &SearchKey<'_>) -> usize {
    match k {
        SearchKey::SequenceSet(s) | SearchKey::Uid(s) => s.0.as_ref().len(),
        SearchKey::And(v) => v.as_ref().iter().map(set_elements).sum(),
        SearchKey::Or(a, b) => set_elements(a) + set_elements(b),
        SearchKey::Not(a) => set_elements(a),
        _ => 0,
    }
}

/// The parents of a hierarchical name, nearest first: `a/b/c` gives `a/b`, then `a`.
fn ancestors(name: &str) -> impl Iterator<Item = &str> {
    let mut n = name;
    std::iter::from_fn(move || {
        let i = n.rfind(DELIMITER)?;
        n = &n[..i];
        Some(n)
    })
}

fn special_use_attr(su: i32) -> Option<&'static str> {
    Some(match pb::SpecialUse::try_from(su).ok()? {
        pb::SpecialUse::None => return None,
        pb::SpecialUse::All => "\\All",
        pb::SpecialUse::Archive => "\\Archive",
        pb::SpecialUse::Drafts => "\\Drafts",
        pb::SpecialUse::Flagged => "\\Flagged",
        pb::SpecialUse::Junk => "\\Junk",
        pb::SpecialUse::Sent => "\\Sent",
        pb::SpecialUse::Trash => "\\Trash",
    })
}

fn attr(s: &str) -> FlagNameAttribute<'static> {
    let name = s.trim_start_matches('\\');
    match name.to_ascii_lowercase().as_str() {
        "noselect" => FlagNameAttribute::Noselect,
        "noinferiors" => FlagNameAttribute::Noinferiors,
        "marked" => FlagNameAttribute::Marked,
        "unmarked" => FlagNameAttribute::Unmarked,
        _ => FlagNameAttribute::from(
            imap_codec::imap_types::core::Atom::try_from(name.to_string()).unwrap_or_else(|_| {
                imap_codec::imap_types::core::Atom::try_from("X").expect("atom")
            }),
        ),
    }
}

const SYSTEM_FLAGS: [Flag<'static>; 5] = [
    Flag::Answered,
    Flag::Flagged,
    Flag::Deleted,
    Flag::Seen,
    Flag::Draft,
];

/// A keyword (not a `\` system flag) that can go on the wire as a flag atom.
fn is_keyword(f: &str) -> bool {
    !f.starts_with('\\') && convert::flag(f).is_some()
}

/// `* FLAGS (...)` and `* OK [PERMANENTFLAGS (...)]` for the system flags and `keywords`
/// (PERMANENTFLAGS empty on a read-only mailbox, else with `\*`: new keywords may be made).
fn flags_responses<W: AsyncWrite + Unpin>(
    keywords: &[String],
    read_only: bool,
    out: &mut Out<'_, W>,
) {
    let mut flags: Vec<Flag<'static>> = SYSTEM_FLAGS.to_vec();
    for k in keywords {
        if let Some(f) = convert::flag(k)
            && !flags.contains(&f)
        {
            flags.push(f);
        }
    }
    out.data(Data::Flags(flags.clone()));
    let mut perm: Vec<FlagPerm<'static>> = if read_only {
        vec![]
    } else {
        flags.into_iter().map(FlagPerm::Flag).collect()
    };
    if !read_only {
        perm.push(FlagPerm::Asterisk);
    }
    out.untagged(
        StatusKind::Ok,
        Some(Code::PermanentFlags(perm)),
        "Flags permitted",
    );
}

impl Session {
    pub fn new(store: Store, hub: Hub, limits: SessionLimits) -> Session {
        Session {
            store,
            hub,
            limits,
            tls: false,
            plaintext_ok: false,
            tls_available: true,
            remote_ip: String::new(),
            auth_limiter: None,
            state: StateKind::NotAuthenticated,
            account: None,
            selected: None,
            subscription: None,
            condstore: false,
            utf8: false,
            rev2: false,
            saved: Vec::new(),
            uses_saved: false,
            auth_failures: 0,
        }
    }

    pub fn state(&self) -> StateKind {
        self.state
    }

    pub fn account_id(&self) -> i64 {
        self.account.as_ref().map(|a| a.id).unwrap_or(0)
    }

    pub fn capabilities(&self) -> Vec<Capability<'static>> {
        let c = |s: &'static str| Capability::try_from(s).expect("capability atom");
        let mut caps = vec![Capability::Imap4Rev1, c("IMAP4rev2")];
        if self.state == StateKind::NotAuthenticated {
            if !self.tls && self.tls_available {
                caps.push(Capability::StartTls);
            }
            if self.tls || self.plaintext_ok {
                caps.push(Capability::Auth(AuthMechanism::Plain));
            } else {
                caps.push(Capability::LoginDisabled);
            }
            caps.push(Capability::SaslIr);
        }
        caps.extend([
            Capability::LiteralPlus,
            Capability::Id,
            Capability::Enable,
            Capability::Idle,
            Capability::Namespace,
            Capability::Unselect,
            Capability::UidPlus,
            Capability::Move,
            c("SPECIAL-USE"),
            c("CHILDREN"),
            Capability::CondStore,
            Capability::Binary,
            Capability::Quota,
            Capability::QuotaRes(Resource::Storage),
            Capability::QuotaRes(Resource::Message),
            Capability::StatusSize,
            Capability::Utf8(Utf8Kind::Accept),
            c("ESEARCH"),
            c("SEARCHRES"),
            c("LIST-EXTENDED"),
            c("LIST-STATUS"),
            c("MULTIAPPEND"),
            Capability::Within,
        ]);
        if self.state != StateKind::NotAuthenticated {
            caps.extend([
                c("SORT"),
                c("SORT=DISPLAY"),
                c("ESORT"),
                c("THREAD=ORDEREDSUBJECT"),
                c("THREAD=REFERENCES"),
            ]);
        }
        caps
    }

    fn capability_code(&self) -> Code<'static> {
        Code::Capability(Vec1::try_from(self.capabilities()).expect("non-empty"))
    }

    pub fn greeting<W: AsyncWrite + Unpin>(&self, out: &mut Out<'_, W>, hostname: &str) {
        out.untagged(
            StatusKind::Ok,
            Some(self.capability_code()),
            &format!("{hostname} IMAP ready"),
        );
    }

    /// Mailbox name from the wire: modified UTF-7 unless UTF-8 was enabled.
    fn name_in(&self, m: &Mailbox<'_>) -> Option<String> {
        match m {
            Mailbox::Inbox => Some("INBOX".into()),
            Mailbox::Other(o) => {
                let s = std::str::from_utf8(o.as_ref()).ok()?;
                let s = if self.utf8 {
                    s.to_string()
                } else {
                    mutf7::decode(s)?
                };
                let s = s.trim_end_matches(DELIMITER).to_string();
                // "inbox/x" names the child of INBOX.
                // Bytes, not `str` slicing: byte 6 may fall inside a multi-byte character.
                if s.len() > 6 && s.as_bytes()[..6].eq_ignore_ascii_case(b"inbox/") {
                    return Some(format!("INBOX{}", &s[5..]));
                }
                (!s.is_empty()).then_some(s)
            }
        }
    }

    fn name_out(&self, name: &str) -> Mailbox<'static> {
        if name.eq_ignore_ascii_case("INBOX") {
            return Mailbox::Inbox;
        }
        let wire = if self.utf8 {
            name.to_string()
        } else {
            mutf7::encode(name)
        };
        Mailbox::try_from(wire).unwrap_or(Mailbox::Inbox)
    }

    /// Turn CONDSTORE on. The first CONDSTORE-enabling command while a mailbox is selected
    /// gets `* OK [HIGHESTMODSEQ n]` (RFC 7162 §3.1), so the client learns where it stands.
    fn enable_condstore<W: AsyncWrite + Unpin>(&mut self, out: &mut Out<'_, W>) {
        if std::mem::replace(&mut self.condstore, true) {
            return;
        }
        if let Some(m) = self
            .selected
            .as_ref()
            .and_then(|s| NonZeroU64::new(s.modseq))
        {
            out.untagged(StatusKind::Ok, Some(Code::HighestModSeq(m)), "Highest");
        }
    }

    fn list_pattern(&self, m: &ListMailbox<'_>) -> Option<String> {
        let bytes: Vec<u8> = match m {
            ListMailbox::Token(t) => t.as_ref().to_vec(),
            ListMailbox::String(s) => s.as_ref().to_vec(),
        };
        let s = String::from_utf8(bytes).ok()?;
        if self.utf8 {
            Some(s)
        } else {
            Some(pattern_from_mutf7(s))
        }
    }

    /// Handle one command. Replies go to `out`; the connection flushes.
    pub async fn handle<W: AsyncWrite + Unpin>(
        &mut self,
        cmd: Command<'static>,
        out: &mut Out<'_, W>,
    ) -> std::io::Result<Next> {
        self.handle_ext(cmd, Ext::default(), out).await
    }

    /// Handle one command with what the pre-parser took out of it (`preparse::Ext`).
    pub async fn handle_ext<W: AsyncWrite + Unpin>(
        &mut self,
        cmd: Command<'static>,
        ext: Ext,
        out: &mut Out<'_, W>,
    ) -> std::io::Result<Next> {
        let tag = cmd.tag.clone();
        let name = cmd.body.name();
        if !self.allowed(&cmd.body) {
            let text = match self.state {
                StateKind::NotAuthenticated => format!("{name} requires authentication"),
                StateKind::Authenticated | StateKind::Selected => match &cmd.body {
                    CommandBody::Login { .. }
                    | CommandBody::Authenticate { .. }
                    | CommandBody::StartTLS => "Already authenticated".to_string(),
                    _ => format!("{name} requires a selected mailbox"),
                },
                _ => format!("{name} not allowed now"),
            };
            out.tagged(&tag, StatusKind::Bad, None, &text);
            return Ok(Next::Continue);
        }
        // Expunges may not be sent during FETCH, STORE and SEARCH (RFC 9051 §7.5.1); the UID
        // forms are allowed to, but holding them back is simpler and equally correct.
        let allow_expunge = !matches!(
            cmd.body,
            CommandBody::Fetch { .. }
                | CommandBody::Store { .. }
                | CommandBody::Search { .. }
                | CommandBody::Sort { .. }
                | CommandBody::Thread { .. }
        );
        // Commands that change the selected mailbox themselves also ask the store when they
        // end, rather than wait for the change event: another session's EXPUNGE of the same
        // message, or the copy a MOVE/COPY into this mailbox made, must be in this reply
        // (imaptest expunge and move failed about half the time without it).
        let poll_always = matches!(
            cmd.body,
            CommandBody::Noop
                | CommandBody::Check
                | CommandBody::Idle
                | CommandBody::Expunge
                | CommandBody::ExpungeUid { .. }
                | CommandBody::Copy { .. }
                | CommandBody::Move { .. }
        );
        // The command name only: arguments may hold passwords or message text.
        let span = tracing::info_span!("imap.command", imap.command = %name);
        self.uses_saved = ext.saved;
        let next = tracing::Instrument::instrument(self.dispatch(cmd, ext, out), span).await?;
        self.uses_saved = false;
        if self.state == StateKind::Selected && next == Next::Continue {
            // Unsolicited updates go before the tagged reply, which dispatch put last: move it.
            let tagged_at = find_tagged_start(&out.buf, &tag);
            let tail = tagged_at.map(|i| out.buf.split_off(i));
            self.sync(out, allow_expunge, poll_always).await?;
            if let Some(t) = tail {
                out.buf.extend(t);
            }
        }
        Ok(next)
    }

    fn allowed(&self, body: &CommandBody<'_>) -> bool {
        use CommandBody as C;
        let any = matches!(body, C::Capability | C::Noop | C::Logout | C::Id { .. });
        if any {
            return true;
        }
        let not_auth = matches!(body, C::StartTLS | C::Authenticate { .. } | C::Login { .. });
        let auth = matches!(
            body,
            C::Select { .. }
                | C::Examine { .. }
                | C::Create { .. }
                | C::Delete { .. }
                | C::Rename { .. }
                | C::Subscribe { .. }
                | C::Unsubscribe { .. }
                | C::List { .. }
                | C::Lsub { .. }
                | C::Status { .. }
                | C::Append { .. }
                | C::Namespace
                | C::Enable { .. }
                | C::Idle
                | C::GetQuota { .. }
                | C::GetQuotaRoot { .. }
                | C::SetQuota { .. }
        );
        let selected = matches!(
            body,
            C::Check
                | C::Close
                | C::Unselect
                | C::Expunge
                | C::ExpungeUid { .. }
                | C::Search { .. }
                | C::Sort { .. }
                | C::Thread { .. }
                | C::Fetch { .. }
                | C::Store { .. }
                | C::Copy { .. }
                | C::Move { .. }
        );
        match self.state {
            StateKind::NotAuthenticated => not_auth,
            StateKind::Authenticated => auth,
            StateKind::Selected => auth || selected,
            StateKind::Logout => false,
        }
    }

    async fn dispatch<W: AsyncWrite + Unpin>(
        &mut self,
        cmd: Command<'static>,
        ext: Ext,
        out: &mut Out<'_, W>,
    ) -> std::io::Result<Next> {
        let tag = cmd.tag;
        use CommandBody as C;
        match cmd.body {
            C::Capability => {
                out.data(Data::Capability(
                    Vec1::try_from(self.capabilities()).expect("non-empty"),
                ));
                out.tagged(&tag, StatusKind::Ok, None, "CAPABILITY completed");
            }
            C::Noop => out.tagged(&tag, StatusKind::Ok, None, "NOOP completed"),
            C::Check => out.tagged(&tag, StatusKind::Ok, None, "CHECK completed"),
            C::Logout => {
                out.bye(None, "Logging out");
                out.tagged(&tag, StatusKind::Ok, None, "LOGOUT completed");
                self.state = StateKind::Logout;
                return Ok(Next::Logout);
            }
            C::Id { .. } => {
                let params = vec![
                    (
                        IString::try_from("name").expect("quoted"),
                        convert::nstring(Some(b"mailsuite")),
                    ),
                    (
                        IString::try_from("version").expect("quoted"),
                        convert::nstring(Some(env!("CARGO_PKG_VERSION").as_bytes())),
                    ),
                ];
                out.data(Data::Id {
                    parameters: Some(params),
                });
                out.tagged(&tag, StatusKind::Ok, None, "ID completed");
            }
            C::StartTLS => {
                if self.tls || !self.tls_available {
                    out.tagged(&tag, StatusKind::Bad, None, "TLS already active");
                } else {
                    return Ok(Next::StartTls(tag));
                }
            }
            C::Login { username, password } => {
                let user = String::from_utf8_lossy(username.as_ref()).into_owned();
                let pass = String::from_utf8_lossy(password.declassify().as_ref()).into_owned();
                return self.login(&tag, &user, &pass, out).await;
            }
            C::Authenticate {
                mechanism,
                initial_response,
            } => {
                if mechanism != AuthMechanism::Plain {
                    out.tagged(&tag, StatusKind::No, None, "Unsupported mechanism");
                } else if !(self.tls || self.plaintext_ok) {
                    out.tagged(
                        &tag,
                        StatusKind::No,
                        Some(other_code("PRIVACYREQUIRED")),
                        "Use STARTTLS first",
                    );
                } else if let Some(ir) = initial_response {
                    return self.auth_plain(&tag, ir.declassify(), out).await;
                } else {
                    return Ok(Next::AuthContinue(tag));
                }
            }
            C::Enable { capabilities } => {
                let mut enabled = Vec::new();
                for c in capabilities.as_ref() {
                    match c {
                        CapabilityEnable::CondStore => {
                            self.enable_condstore(out);
                            enabled.push(CapabilityEnable::CondStore);
                        }
                        // RFC 6855: mailbox names in UTF-8 from now on, not modified UTF-7.
                        CapabilityEnable::Utf8(Utf8Kind::Accept) => {
                            self.utf8 = true;
                            enabled.push(CapabilityEnable::Utf8(Utf8Kind::Accept));
                        }
                        // RFC 9051: rev2 rules from now on (ESEARCH only, no \Recent, UTF-8
                        // mailbox names, LIST in SELECT, CLOSED).
                        CapabilityEnable::Other(_)
                            if !self.rev2 && c.to_string().eq_ignore_ascii_case("IMAP4rev2") =>
                        {
                            self.rev2 = true;
                            self.utf8 = true;
                            if let Some(sel) = self.selected.as_mut() {
                                sel.no_recent = true;
                            }
                            enabled.push(c.clone());
                        }
                        _ => {}
                    }
                }
                out.data(Data::Enabled {
                    capabilities: enabled,
                });
                out.tagged(&tag, StatusKind::Ok, None, "ENABLE completed");
            }
            C::Namespace => {
                out.data(Data::Namespace {
                    personal: vec![Namespace {
                        prefix: IString::try_from("").expect("quoted"),
                        delimiter: Some(QuotedChar::try_from(DELIMITER).expect("quoted char")),
                        extensions: vec![],
                    }],
                    other: vec![],
                    shared: vec![],
                });
                out.tagged(&tag, StatusKind::Ok, None, "NAMESPACE completed");
            }
            C::Select {
                mailbox,
                parameters,
            } => {
                let cs = parameters
                    .iter()
                    .any(|p| matches!(p, SelectParameter::CondStore));
                self.select(&tag, &mailbox, false, cs, out).await?;
            }
            C::Examine {
                mailbox,
                parameters,
            } => {
                let cs = parameters
                    .iter()
                    .any(|p| matches!(p, SelectParameter::CondStore));
                self.select(&tag, &mailbox, true, cs, out).await?;
            }
            C::Create { mailbox } => {
                let r = match self.name_in(&mailbox) {
                    Some(n) if n == "INBOX" => Err(ServiceError::AlreadyExists("INBOX".into())),
                    Some(n) => self.store.create(self.account_id(), &n).await.map(|_| ()),
                    None => Err(ServiceError::InvalidArgument("Bad mailbox name".into())),
                };
                self.simple_reply(&tag, r, "CREATE completed", out);
            }
            C::Delete { mailbox } => {
                let r = match self.name_in(&mailbox) {
                    Some(n) => {
                        let r = self.store.delete(self.account_id(), &n).await;
                        if r.is_ok() && self.selected.as_ref().is_some_and(|s| s.name == n) {
                            self.saved.clear();
                            self.selected = None;
                            self.state = StateKind::Authenticated;
                        }
                        r
                    }
                    None => Err(ServiceError::NotFound(String::new())),
                };
                self.simple_reply(&tag, r, "DELETE completed", out);
            }
            C::Rename { from, to } => {
                let r = match (self.name_in(&from), self.name_in(&to)) {
                    (Some(f), Some(t)) => self.store.rename(self.account_id(), &f, &t).await,
                    _ => Err(ServiceError::InvalidArgument("Bad mailbox name".into())),
                };
                self.simple_reply(&tag, r, "RENAME completed", out);
            }
            C::Subscribe { mailbox } => {
                let r = match self.name_in(&mailbox) {
                    Some(n) => self.store.subscribe(self.account_id(), &n, true).await,
                    None => Err(ServiceError::NotFound(String::new())),
                };
                self.simple_reply(&tag, r, "SUBSCRIBE completed", out);
            }
            C::Unsubscribe { mailbox } => {
                let r = match self.name_in(&mailbox) {
                    Some(n) => self.store.subscribe(self.account_id(), &n, false).await,
                    None => Err(ServiceError::NotFound(String::new())),
                };
                self.simple_reply(&tag, r, "UNSUBSCRIBE completed", out);
            }
            C::List { .. } if ext.list.is_some() => {
                let l = ext.list.expect("checked");
                self.list_extended(&tag, &l, out).await?
            }
            C::List {
                reference,
                mailbox_wildcard,
            } => {
                self.list(&tag, &reference, &mailbox_wildcard, false, out)
                    .await?
            }
            C::Lsub {
                reference,
                mailbox_wildcard,
            } => {
                self.list(&tag, &reference, &mailbox_wildcard, true, out)
                    .await?
            }
            C::Status {
                mailbox,
                item_names,
            } => self.status(&tag, &mailbox, &item_names, out).await?,
            C::Append { mailbox, .. } if ext.append.is_some() => {
                let msgs = ext.append.expect("checked");
                self.multiappend(&tag, &mailbox, msgs, out).await?
            }
            C::Append {
                mailbox,
                flags,
                date,
                message,
            } => {
                self.append(&tag, &mailbox, &flags, date, message, out)
                    .await?
            }
            C::Idle => {
                return Ok(Next::Idle(tag));
            }
            C::GetQuota { root } => {
                if root.as_ref().is_empty() {
                    self.quota(&tag, None, out).await?
                } else {
                    out.tagged(
                        &tag,
                        StatusKind::No,
                        Some(other_code("NONEXISTENT")),
                        "No such quota root",
                    );
                }
            }
            C::GetQuotaRoot { mailbox } => match self.name_in(&mailbox) {
                Some(name) => self.quota(&tag, Some(name), out).await?,
                None => out.tagged(
                    &tag,
                    StatusKind::No,
                    Some(other_code("NONEXISTENT")),
                    "No such mailbox",
                ),
            },
            C::SetQuota { .. } => out.tagged(
                &tag,
                StatusKind::No,
                Some(other_code("NOPERM")),
                "Quotas are set by the administrator",
            ),
            C::Close => {
                self.saved.clear();
                if let Some(sel) = self.selected.take()
                    && !sel.read_only
                {
                    let _ = self
                        .store
                        .expunge(pb::ExpungeRequest {
                            account_id: self.account_id(),
                            mailbox_id: sel.mailbox_id,
                            uids: None,
                        })
                        .await;
                }
                self.state = StateKind::Authenticated;
                out.tagged(&tag, StatusKind::Ok, None, "CLOSE completed");
            }
            C::Unselect => {
                self.saved.clear();
                self.selected = None;
                self.state = StateKind::Authenticated;
                out.tagged(&tag, StatusKind::Ok, None, "UNSELECT completed");
            }
            C::Expunge => self.expunge(&tag, None, out).await?,
            C::ExpungeUid { sequence_set } => self.expunge(&tag, Some(sequence_set), out).await?,
            C::Search {
                charset,
                criteria,
                uid,
            } => {
                self.search(&tag, charset, criteria, uid, ext.search_return, out)
                    .await?
            }
            C::Sort {
                sort_criteria,
                charset,
                search_criteria,
                uid,
            } => {
                let criteria: Vec<(sort::Key, bool)> = sort_criteria
                    .as_ref()
                    .iter()
                    .map(|c| (sort_key(&c.key), c.reverse))
                    .collect();
                self.sort_cmd(
                    &tag,
                    &criteria,
                    charset,
                    search_criteria,
                    uid,
                    ext.sort_return,
                    out,
                )
                .await?
            }
            C::Thread {
                algorithm,
                charset,
                search_criteria,
                uid,
            } => {
                self.thread_cmd(&tag, algorithm, charset, search_criteria, uid, out)
                    .await?
            }
            C::Fetch {
                sequence_set,
                macro_or_item_names,
                uid,
                modifiers,
            } => {
                self.fetch(&tag, sequence_set, macro_or_item_names, uid, modifiers, out)
                    .await?
            }
            C::Store {
                sequence_set,
                kind,
                response,
                flags,
                uid,
                modifiers,
            } => {
                self.store_cmd(
                    &tag,
                    sequence_set,
                    kind,
                    response,
                    flags,
                    uid,
                    modifiers,
                    out,
                )
                .await?
            }
            C::Copy {
                sequence_set,
                mailbox,
                uid,
            } => {
                self.copy(&tag, sequence_set, &mailbox, uid, false, out)
                    .await?
            }
            C::Move {
                sequence_set,
                mailbox,
                uid,
            } => {
                self.copy(&tag, sequence_set, &mailbox, uid, true, out)
                    .await?
            }
            other => {
                out.tagged(
                    &tag,
                    StatusKind::Bad,
                    None,
                    &format!("{} is not supported", other.name()),
                );
            }
        }
        Ok(Next::Continue)
    }

    fn simple_reply<W: AsyncWrite + Unpin>(
        &self,
        tag: &Tag<'_>,
        r: Res<()>,
        ok: &str,
        out: &mut Out<'_, W>,
    ) {
        match r {
            Ok(()) => out.tagged(tag, StatusKind::Ok, None, ok),
            Err(e) => {
                let (k, c, t) = error_reply(&e);
                out.tagged(tag, k, c, &t);
            }
        }
    }

    fn fail<W: AsyncWrite + Unpin>(&self, tag: &Tag<'_>, e: &ServiceError, out: &mut Out<'_, W>) {
        let (k, c, t) = error_reply(e);
        out.tagged(tag, k, c, &t);
    }

    async fn login<W: AsyncWrite + Unpin>(
        &mut self,
        tag: &Tag<'static>,
        user: &str,
        pass: &str,
        out: &mut Out<'_, W>,
    ) -> std::io::Result<Next> {
        if !(self.tls || self.plaintext_ok) {
            out.tagged(
                tag,
                StatusKind::No,
                Some(other_code("PRIVACYREQUIRED")),
                "LOGIN is disabled before STARTTLS",
            );
            return Ok(Next::Continue);
        }
        // Counted as a failure before the store is asked, so parallel connections cannot all
        // get a guess in before the first failure is recorded; given back unless it failed.
        let limiter = self.auth_limiter.clone();
        let attempt = match &limiter {
            Some((limiter, ip)) => match limiter.begin(*ip, user) {
                Ok(a) => Some(a),
                Err(why) => {
                    // Refused without asking the store: the password is not even checked.
                    let text = match why {
                        Blocked::Address => {
                            "Too many failed logins from your address; try again later"
                        }
                        Blocked::Account => {
                            "Too many failed logins for this account; try again later"
                        }
                    };
                    out.tagged(tag, StatusKind::No, Some(other_code("UNAVAILABLE")), text);
                    return Ok(Next::Continue);
                }
            },
            None => None,
        };
        let result = self.store.authenticate(user, pass, &self.remote_ip).await;
        if let Some(a) = attempt {
            match result {
                Ok(None) => a.fail(),
                Ok(Some(_)) | Err(_) => a.release(),
            }
        }
        match result {
            Ok(Some(account)) => {
                let Some(sub) = self.hub.subscribe(account.id) else {
                    out.tagged(
                        tag,
                        StatusKind::No,
                        Some(other_code("LIMIT")),
                        "Too many sessions for this account",
                    );
                    return Ok(Next::Continue);
                };
                self.subscription = Some(sub);
                self.account = Some(account);
                self.state = StateKind::Authenticated;
                out.tagged(
                    tag,
                    StatusKind::Ok,
                    Some(self.capability_code()),
                    "Logged in",
                );
                Ok(Next::Continue)
            }
            Ok(None) => {
                self.auth_failures += 1;
                mailsuite_runtime::metrics::auth_failure("imap");
                // A growing delay makes password guessing slow.
                let delay = self
                    .limits
                    .auth_failure_delay
                    .saturating_mul(1 << self.auth_failures.min(6).saturating_sub(1));
                out.flush().await?;
                tokio::time::sleep(delay).await;
                if self.auth_failures >= self.limits.max_auth_failures {
                    out.bye(None, "Too many authentication failures");
                    out.tagged(
                        tag,
                        StatusKind::No,
                        Some(other_code("AUTHENTICATIONFAILED")),
                        "Authentication failed",
                    );
                    return Ok(Next::Logout);
                }
                out.tagged(
                    tag,
                    StatusKind::No,
                    Some(other_code("AUTHENTICATIONFAILED")),
                    "Authentication failed",
                );
                Ok(Next::Continue)
            }
            Err(e) => {
                self.fail(tag, &e, out);
                Ok(Next::Continue)
            }
        }
    }

    /// SASL PLAIN (RFC 4616): `authzid NUL authcid NUL password`.
    pub async fn auth_plain<W: AsyncWrite + Unpin>(
        &mut self,
        tag: &Tag<'static>,
        data: &[u8],
        out: &mut Out<'_, W>,
    ) -> std::io::Result<Next> {
        let parts: Vec<&[u8]> = data.split(|b| *b == 0).collect();
        if parts.len() != 3 {
            out.tagged(tag, StatusKind::Bad, None, "Malformed PLAIN response");
            return Ok(Next::Continue);
        }
        let authz = String::from_utf8_lossy(parts[0]).into_owned();
        let user = String::from_utf8_lossy(parts[1]).into_owned();
        let pass = String::from_utf8_lossy(parts[2]).into_owned();
        if !authz.is_empty() && authz != user {
            out.tagged(
                tag,
                StatusKind::No,
                Some(other_code("AUTHORIZATIONFAILED")),
                "Cannot act as another user",
            );
            return Ok(Next::Continue);
        }
        self.login(tag, &user, &pass, out).await
    }

    async fn select<W: AsyncWrite + Unpin>(
        &mut self,
        tag: &Tag<'static>,
        mailbox: &Mailbox<'_>,
        read_only: bool,
        condstore: bool,
        out: &mut Out<'_, W>,
    ) -> std::io::Result<()> {
        // Selecting anything deselects the current mailbox first, even if it fails.
        self.saved.clear();
        if self.selected.take().is_some() && (self.condstore || self.rev2) {
            out.untagged(
                StatusKind::Ok,
                Some(Code::Closed),
                "Previous mailbox closed",
            );
        }
        self.state = StateKind::Authenticated;
        if condstore {
            self.condstore = true;
        }
        let Some(name) = self.name_in(mailbox) else {
            out.tagged(
                tag,
                StatusKind::No,
                Some(other_code("NONEXISTENT")),
                "No such mailbox",
            );
            return Ok(());
        };
        let r = match self.store.select(self.account_id(), &name, read_only).await {
            Ok(r) => r,
            Err(e) => {
                self.fail(tag, &e, out);
                return Ok(());
            }
        };
        let info = r.mailbox.unwrap_or_default();
        let seq = SeqMap::from_uids(&r.uids);
        let keywords: Vec<String> = r
            .keywords
            .iter()
            .filter(|k| is_keyword(k))
            .cloned()
            .collect();
        flags_responses(&keywords, read_only, out);
        out.data(Data::Exists(seq.len()));
        if self.rev2 {
            // RFC 9051 §6.3.2: the mailbox's LIST line; no RECENT, no UNSEEN code.
            out.data(Data::List {
                items: vec![],
                delimiter: Some(QuotedChar::try_from(DELIMITER).expect("quoted char")),
                mailbox: self.name_out(&info.name),
            });
        } else {
            out.data(Data::Recent(info.recent));
        }
        // Despite its name the field carries the sequence number (see mailbox.proto).
        if !self.rev2 && r.first_unseen_uid > 0 && r.first_unseen_uid <= seq.len() {
            out.untagged(
                StatusKind::Ok,
                Some(Code::Unseen(nz(r.first_unseen_uid))),
                "First unseen",
            );
        }
        out.untagged(
            StatusKind::Ok,
            Some(Code::UidValidity(nz(info.uidvalidity))),
            "UIDs valid",
        );
        out.untagged(
            StatusKind::Ok,
            Some(Code::UidNext(nz(info.uidnext))),
            "Predicted next UID",
        );
        if self.condstore {
            match NonZeroU64::new(info.highestmodseq) {
                Some(m) => out.untagged(StatusKind::Ok, Some(Code::HighestModSeq(m)), "Highest"),
                None => out.untagged(StatusKind::Ok, Some(Code::NoModSeq), "No modseq"),
            }
        }
        let recent_from = match info.recent {
            0 => info.uidnext.max(seq.max_uid().map_or(1, |m| m + 1)),
            r => seq
                .uid(seq.len().saturating_sub(r) + 1)
                .unwrap_or(info.uidnext),
        };
        self.selected = Some(Box::new(Selected {
            recent_from,
            no_recent: self.rev2,
            mailbox_id: info.id,
            name: info.name.clone(),
            read_only,
            uidvalidity: info.uidvalidity,
            seq,
            modseq: info.highestmodseq,
            dirty: false,
            own_change: false,
            pending_expunges: vec![],
            keywords,
            reported: HashMap::new(),
        }));
        self.state = StateKind::Selected;
        let (code, verb) = if read_only {
            (Code::ReadOnly, "EXAMINE completed")
        } else {
            (Code::ReadWrite, "SELECT completed")
        };
        out.tagged(tag, StatusKind::Ok, Some(code), verb);
        Ok(())
    }

    async fn list<W: AsyncWrite + Unpin>(
        &mut self,
        tag: &Tag<'static>,
        reference: &Mailbox<'_>,
        pattern: &ListMailbox<'_>,
        lsub: bool,
        out: &mut Out<'_, W>,
    ) -> std::io::Result<()> {
        let reference = match reference {
            Mailbox::Inbox => "INBOX".to_string(),
            Mailbox::Other(o) => {
                let s = String::from_utf8_lossy(o.as_ref()).into_owned();
                if self.utf8 {
                    s
                } else {
                    mutf7::decode(&s).unwrap_or(s)
                }
            }
        };
        let Some(pattern) = self.list_pattern(pattern) else {
            out.tagged(tag, StatusKind::Bad, None, "Bad pattern");
            return Ok(());
        };
        let delim = QuotedChar::try_from(DELIMITER).expect("quoted char");
        if pattern.is_empty() && !lsub {
            // The hierarchy delimiter and root (RFC 9051 §6.3.9).
            out.data(Data::List {
                items: vec![FlagNameAttribute::Noselect],
                delimiter: Some(delim),
                mailbox: Mailbox::try_from("").unwrap_or(Mailbox::Inbox),
            });
            out.tagged(tag, StatusKind::Ok, None, "LIST completed");
            return Ok(());
        }
        let full = format!("{reference}{pattern}");
        if full.len() > self.limits.max_list_pattern {
            out.tagged(tag, StatusKind::Bad, Some(Code::TooBig), "Pattern too long");
            return Ok(());
        }
        let pat = ListPattern::new(&full);
        let listing = match self.store.list(self.account_id(), false).await {
            Ok(b) => b,
            Err(e) => {
                self.fail(tag, &e, out);
                return Ok(());
            }
        };
        if lsub {
            return self.lsub(tag, &full, &listing, out).await;
        }
        let pats = std::slice::from_ref(&pat);
        let boxes = &listing.boxes;
        let names: std::collections::HashSet<&str> =
            boxes.iter().map(|b| b.name.as_str()).collect();
        // Everything about the hierarchy in one pass over the mailboxes (each matched once):
        // a per-mailbox scan of all the others made a LIST quadratic in the mailbox count.
        let box_names: Vec<&str> = boxes.iter().map(|b| b.name.as_str()).collect();
        let matched = match_names(pats, &box_names).await;
        let mut with_children = std::collections::HashSet::new();
        let mut with_matching_child = std::collections::HashSet::new();
        // Parents that do not exist themselves.
        let mut parents = std::collections::BTreeSet::new();
        for (b, m) in boxes.iter().zip(&matched) {
            for a in ancestors(&b.name) {
                with_children.insert(a);
                if *m {
                    with_matching_child.insert(a);
                }
                if !names.contains(a) {
                    parents.insert(a);
                }
            }
        }
        for (b, m) in boxes.iter().zip(&matched) {
            if *m {
                let mut items = vec![];
                let has_children = b.has_children || with_children.contains(b.name.as_str());
                items.push(attr(if has_children {
                    "\\HasChildren"
                } else {
                    "\\HasNoChildren"
                }));
                if let Some(su) = special_use_attr(b.special_use) {
                    items.push(attr(su));
                }
                out.data(Data::List {
                    items,
                    delimiter: Some(delim),
                    mailbox: self.name_out(&b.name),
                });
            }
        }
        // Parents that do not exist themselves but have matching-level children are listed
        // as \Noselect when the pattern stops at their level (e.g. `%` with only `a/b`).
        let parent_names: Vec<&str> = parents.iter().copied().collect();
        let parents_matched = match_names(pats, &parent_names).await;
        for (p, m) in parents.into_iter().zip(parents_matched) {
            if m && !with_matching_child.contains(p) {
                // RFC 9051 §7.3.1: a name that does not exist is \NonExistent in rev2.
                let missing = if self.rev2 {
                    attr("\\NonExistent")
                } else {
                    FlagNameAttribute::Noselect
                };
                out.data(Data::List {
                    items: vec![missing, attr("\\HasChildren")],
                    delimiter: Some(delim),
                    mailbox: self.name_out(p),
                });
            }
        }
        out.tagged(tag, StatusKind::Ok, None, "LIST completed");
        Ok(())
    }

    /// LSUB (RFC 3501 §6.3.9) lists subscribed names, whether or not they exist, and the
    /// unsubscribed parents at which a `%` stopped short of a subscribed name. Only
    /// \Noselect is reported: children attributes describe mailboxes, not subscriptions, and
    /// on an unsubscribed parent they made clients take it for a subscribed folder.
    async fn lsub<W: AsyncWrite + Unpin>(
        &mut self,
        tag: &Tag<'static>,
        pattern: &str,
        listing: &Listing,
        out: &mut Out<'_, W>,
    ) -> std::io::Result<()> {
        let exists: std::collections::HashSet<&str> =
            listing.boxes.iter().map(|b| b.name.as_str()).collect();
        let mut subs: Vec<&str> = listing.subscribed.iter().map(String::as_str).collect();
        subs.sort_unstable();
        let pats = [ListPattern::new(pattern)];
        let matched = match_names(&pats, &subs).await;
        // A name the pattern misses only because a `%` does not cross the delimiter: with
        // `*` in its place it matches. (`*test` must not list `imaptest` for
        // `imaptest/test3/test3`, `imaptest/%` must list `imaptest/test3`.)
        let missed: Vec<&str> = subs
            .iter()
            .zip(&matched)
            .filter_map(|(s, m)| (!m).then_some(*s))
            .collect();
        let deeper = [ListPattern::new(&pattern.replace('%', "*"))];
        let reached = if pattern.contains('%') {
            match_names(&deeper, &missed).await
        } else {
            vec![false; missed.len()]
        };
        // name -> \Noselect
        let mut lines = std::collections::BTreeMap::new();
        for (&s, m) in subs.iter().zip(matched) {
            if m {
                lines.insert(s, !exists.contains(s));
            }
        }
        let mut parents = std::collections::BTreeSet::new();
        for (s, r) in missed.into_iter().zip(reached) {
            if r {
                parents.extend(ancestors(s).filter(|a| !listing.subscribed.contains(*a)));
            }
        }
        let parent_names: Vec<&str> = parents.into_iter().collect();
        let parents_matched = match_names(&pats, &parent_names).await;
        for (p, m) in parent_names.into_iter().zip(parents_matched) {
            if m {
                lines.insert(p, true);
            }
        }
        let delim = QuotedChar::try_from(DELIMITER).expect("quoted char");
        let mut lines: Vec<(&str, bool)> = lines.into_iter().collect();
        // INBOX first, as LIST has it.
        lines.sort_by_key(|(n, _)| (*n != "INBOX", *n));
        for (name, noselect) in lines {
            let items = if noselect {
                vec![FlagNameAttribute::Noselect]
            } else {
                vec![]
            };
            out.data(Data::Lsub {
                items,
                delimiter: Some(delim),
                mailbox: self.name_out(name),
            });
            out.maybe_flush().await?;
        }
        out.tagged(tag, StatusKind::Ok, None, "LSUB completed");
        Ok(())
    }

    /// LIST-EXTENDED (RFC 5258) with LIST-STATUS (RFC 5819) and RFC 6154 SPECIAL-USE.
    async fn list_extended<W: AsyncWrite + Unpin>(
        &mut self,
        tag: &Tag<'static>,
        l: &ListExt,
        out: &mut Out<'_, W>,
    ) -> std::io::Result<()> {
        let decode = |b: &[u8]| -> Option<String> {
            let s = String::from_utf8(b.to_vec()).ok()?;
            if self.utf8 {
                Some(s)
            } else {
                Some(pattern_from_mutf7(s))
            }
        };
        let Some(reference) = decode(&l.reference) else {
            out.tagged(tag, StatusKind::Bad, None, "Bad reference name");
            return Ok(());
        };
        let mut patterns = Vec::new();
        for p in &l.patterns {
            match decode(p) {
                Some(p) if !p.is_empty() => patterns.push(format!("{reference}{p}")),
                Some(_) => {}
                None => {
                    out.tagged(tag, StatusKind::Bad, None, "Bad pattern");
                    return Ok(());
                }
            }
        }
        // All patterns together: each name is matched against every one of them.
        if patterns.iter().map(String::len).sum::<usize>() > self.limits.max_list_pattern {
            out.tagged(
                tag,
                StatusKind::Bad,
                Some(Code::TooBig),
                "Patterns too long",
            );
            return Ok(());
        }
        let patterns: Vec<ListPattern> = patterns.iter().map(|p| ListPattern::new(p)).collect();
        let delim = QuotedChar::try_from(DELIMITER).expect("quoted char");
        let no_selection = !l.sel_subscribed && !l.sel_special_use;
        if patterns.is_empty() {
            // Only empty patterns: the hierarchy delimiter, as for the basic form.
            if no_selection {
                out.data(Data::List {
                    items: vec![FlagNameAttribute::Noselect],
                    delimiter: Some(delim),
                    mailbox: Mailbox::try_from("").unwrap_or(Mailbox::Inbox),
                });
            }
            out.tagged(tag, StatusKind::Ok, None, "LIST completed");
            return Ok(());
        }
        let status_items: Option<Vec<StatusDataItemName>> = l.ret_status.as_ref().map(|v| {
            v.iter()
                .map(|i| match i {
                    StatusItem::Messages => StatusDataItemName::Messages,
                    StatusItem::UidNext => StatusDataItemName::UidNext,
                    StatusItem::UidValidity => StatusDataItemName::UidValidity,
                    StatusItem::Unseen => StatusDataItemName::Unseen,
                    StatusItem::Deleted => StatusDataItemName::Deleted,
                    StatusItem::Size => StatusDataItemName::Size,
                    StatusItem::HighestModSeq => StatusDataItemName::HighestModSeq,
                    StatusItem::Recent => StatusDataItemName::Recent,
                })
                .collect()
        });
        let listing = match self
            .store
            .list(self.account_id(), status_items.is_some())
            .await
        {
            Ok(b) => b,
            Err(e) => {
                self.fail(tag, &e, out);
                return Ok(());
            }
        };
        let boxes = &listing.boxes;
        let subs = &listing.subscribed;
        let by_name: std::collections::BTreeMap<&str, &pb::MailboxInfo> =
            boxes.iter().map(|b| (b.name.as_str(), b)).collect();
        // Every name to consider: the mailboxes and their (possibly missing) ancestors.
        let mut names: std::collections::BTreeSet<&str> = std::collections::BTreeSet::new();
        for b in boxes {
            names.insert(b.name.as_str());
            names.extend(ancestors(&b.name));
        }
        // RFC 5258 §3.1: SUBSCRIBED lists subscribed names that no longer exist too (as
        // \NonExistent), and they count for their parents' CHILDINFO.
        if l.sel_subscribed {
            for s in subs {
                names.insert(s.as_str());
                names.extend(ancestors(s));
            }
        }
        // Does this name satisfy the selection options? Without SUBSCRIBED only existing
        // mailboxes can.
        let meets_selection = |name: &str| {
            let info = by_name.get(name);
            (info.is_some() || l.sel_subscribed)
                && (!l.sel_subscribed || subs.contains(name))
                && (!l.sel_special_use
                    || info.is_some_and(|b| special_use_attr(b.special_use).is_some()))
        };
        // Each name is matched once, and what its descendants are is gathered in one pass
        // over the names: a scan of all mailboxes per name made LIST quadratic.
        let all_names: Vec<&str> = names.iter().copied().collect();
        let hits = match_names(&patterns, &all_names).await;
        let matched: std::collections::HashSet<&str> = all_names
            .iter()
            .zip(hits)
            .filter_map(|(n, m)| m.then_some(*n))
            .collect();
        let mut with_children = std::collections::HashSet::new();
        let mut with_matching_child = std::collections::HashSet::new();
        for b in boxes {
            let m = matched.contains(b.name.as_str());
            for a in ancestors(&b.name) {
                with_children.insert(a);
                if m {
                    with_matching_child.insert(a);
                }
            }
        }
        let mut with_unmatched_selected_child = std::collections::HashSet::new();
        if l.sel_recursive {
            for &n in &names {
                if !matched.contains(n) && meets_selection(n) {
                    with_unmatched_selected_child.extend(ancestors(n));
                }
            }
        }
        let mut childinfo = Vec::new();
        if l.sel_subscribed {
            childinfo.push("\"SUBSCRIBED\"");
        }
        if l.sel_special_use {
            childinfo.push("\"SPECIAL-USE\"");
        }
        for &name in &names {
            if !matched.contains(name) {
                continue;
            }
            let info = by_name.get(name).copied();
            let meets = meets_selection(name);
            // RECURSIVEMATCH: a descendant that meets the selection but not the patterns.
            let child_meets = l.sel_recursive && with_unmatched_selected_child.contains(name);
            let has_children = with_children.contains(name) || info.is_some_and(|b| b.has_children);
            if !(meets || child_meets) {
                // Without selection options, a missing name is listed only as the parent of
                // mailboxes the pattern does not reach (as the basic LIST does).
                let missing_parent =
                    no_selection && info.is_none() && !with_matching_child.contains(name);
                if !missing_parent {
                    continue;
                }
            }
            let mut items = vec![];
            if (l.ret_subscribed || l.sel_subscribed) && subs.contains(name) {
                items.push(attr("\\Subscribed"));
            }
            match info {
                None => items.push(attr("\\NonExistent")),
                Some(b) => {
                    if let Some(su) = special_use_attr(b.special_use) {
                        items.push(attr(su));
                    }
                }
            }
            if has_children {
                items.push(attr("\\HasChildren"));
            } else if info.is_some() {
                // A name that does not exist has no children to speak of.
                items.push(attr("\\HasNoChildren"));
            }
            let mut line = ResponseCodec::default()
                .encode(&Response::Data(Data::List {
                    items,
                    delimiter: Some(delim),
                    mailbox: self.name_out(name),
                }))
                .dump();
            if child_meets && !childinfo.is_empty() {
                // Extended data (RFC 5258 §4): the line without its CRLF, then the item.
                line.truncate(line.len().saturating_sub(2));
                line.extend_from_slice(
                    format!(" (\"CHILDINFO\" ({}))\r\n", childinfo.join(" ")).as_bytes(),
                );
            }
            out.raw(&line);
            // LIST-STATUS: right after the LIST line, only for selectable mailboxes.
            if let (Some(items), Some(b)) = (&status_items, info) {
                let values = self.status_values(b, items);
                out.data(Data::Status {
                    mailbox: self.name_out(&b.name),
                    items: values.into(),
                });
            }
            out.maybe_flush().await?;
        }
        out.tagged(tag, StatusKind::Ok, None, "LIST completed");
        Ok(())
    }

    async fn status<W: AsyncWrite + Unpin>(
        &mut self,
        tag: &Tag<'static>,
        mailbox: &Mailbox<'_>,
        items: &[StatusDataItemName],
        out: &mut Out<'_, W>,
    ) -> std::io::Result<()> {
        let Some(name) = self.name_in(mailbox) else {
            out.tagged(
                tag,
                StatusKind::No,
                Some(other_code("NONEXISTENT")),
                "No such mailbox",
            );
            return Ok(());
        };
        let info = match self.store.status(self.account_id(), &name).await {
            Ok(i) => i,
            Err(e) => {
                self.fail(tag, &e, out);
                return Ok(());
            }
        };
        let values = self.status_values(&info, items);
        out.data(Data::Status {
            mailbox: self.name_out(&info.name),
            items: values.into(),
        });
        out.tagged(tag, StatusKind::Ok, None, "STATUS completed");
        Ok(())
    }

    /// The STATUS items asked for, from a mailbox's counts.
    fn status_values(
        &self,
        info: &pb::MailboxInfo,
        items: &[StatusDataItemName],
    ) -> Vec<StatusDataItem> {
        let mut values = Vec::new();
        for i in items {
            values.push(match i {
                StatusDataItemName::Messages => StatusDataItem::Messages(info.messages),
                // Not part of IMAP4rev2.
                StatusDataItemName::Recent if self.rev2 => continue,
                StatusDataItemName::Recent => StatusDataItem::Recent(info.recent),
                StatusDataItemName::UidNext => StatusDataItem::UidNext(nz(info.uidnext)),
                StatusDataItemName::UidValidity => {
                    StatusDataItem::UidValidity(nz(info.uidvalidity))
                }
                StatusDataItemName::Unseen => StatusDataItem::Unseen(info.unseen),
                StatusDataItemName::Deleted => StatusDataItem::Deleted(info.deleted),
                // The store does not track it; inventing 0 would mislead the client.
                StatusDataItemName::DeletedStorage => continue,
                StatusDataItemName::Size => StatusDataItem::Size(info.size),
                StatusDataItemName::HighestModSeq => {
                    StatusDataItem::HighestModSeq(info.highestmodseq)
                }
            });
        }
        values
    }

    async fn append<W: AsyncWrite + Unpin>(
        &mut self,
        tag: &Tag<'static>,
        mailbox: &Mailbox<'_>,
        flags: &[Flag<'_>],
        date: Option<imap_codec::imap_types::datetime::DateTime>,
        message: LiteralOrLiteral8<'_>,
        out: &mut Out<'_, W>,
    ) -> std::io::Result<()> {
        let Some(name) = self.name_in(mailbox) else {
            out.tagged(
                tag,
                StatusKind::No,
                Some(Code::TryCreate),
                "No such mailbox",
            );
            return Ok(());
        };
        let data: Vec<u8> = match message {
            LiteralOrLiteral8::Literal(l) => l.data().to_vec(),
            LiteralOrLiteral8::Literal8(l) => l.data.to_vec(),
        };
        let (secs, offset) = append_date(date);
        let header = pb::AppendHeader {
            account_id: self.account_id(),
            mailbox: name.clone(),
            flags: flag_strings(flags),
            internal_date: secs,
            internal_date_offset: offset,
            size: data.len() as u64,
        };
        match self.store.append(header, data).await {
            Ok(r) => {
                if let Some(sel) = self.selected.as_mut()
                    && sel.mailbox_id == r.mailbox_id
                {
                    sel.dirty = true;
                    sel.own_change = true;
                }
                out.tagged(
                    tag,
                    StatusKind::Ok,
                    Some(Code::AppendUid {
                        uid_validity: nz(r.uidvalidity),
                        uid: nz(r.uid),
                    }),
                    "APPEND completed",
                );
            }
            Err(ServiceError::NotFound(_)) => out.tagged(
                tag,
                StatusKind::No,
                Some(Code::TryCreate),
                "No such mailbox",
            ),
            Err(e) => self.fail(tag, &e, out),
        }
        Ok(())
    }

    /// MULTIAPPEND (RFC 3502): every message in one store transaction, all or none; the
    /// tagged OK (with every UID in APPENDUID) only after it committed.
    async fn multiappend<W: AsyncWrite + Unpin>(
        &mut self,
        tag: &Tag<'static>,
        mailbox: &Mailbox<'_>,
        msgs: Vec<AppendMsg>,
        out: &mut Out<'_, W>,
    ) -> std::io::Result<()> {
        let Some(name) = self.name_in(mailbox) else {
            out.tagged(
                tag,
                StatusKind::No,
                Some(Code::TryCreate),
                "No such mailbox",
            );
            return Ok(());
        };
        let account_id = self.account_id();
        let batch = msgs
            .into_iter()
            .map(|m| {
                let (secs, offset) = append_date(m.date);
                let header = pb::AppendHeader {
                    account_id,
                    mailbox: name.clone(),
                    flags: flag_strings(&m.flags),
                    internal_date: secs,
                    internal_date_offset: offset,
                    size: m.data.len() as u64,
                };
                (header, m.data)
            })
            .collect();
        match self.store.append_multi(batch).await {
            Ok(r) => {
                if let Some(sel) = self.selected.as_mut()
                    && sel.mailbox_id == r.mailbox_id
                {
                    sel.dirty = true;
                    sel.own_change = true;
                }
                // Consecutive (one allocation): `first:last`.
                let uids = uid_set_text(&r.uids);
                out.tagged(
                    tag,
                    StatusKind::Ok,
                    Some(other_code(&format!(
                        "APPENDUID {} {}",
                        nz(r.uidvalidity),
                        uids
                    ))),
                    "APPEND completed",
                );
            }
            Err(ServiceError::NotFound(_)) => out.tagged(
                tag,
                StatusKind::No,
                Some(Code::TryCreate),
                "No such mailbox",
            ),
            Err(e) => self.fail(tag, &e, out),
        }
        Ok(())
    }

    /// GETQUOTA "" and GETQUOTAROOT: one quota root, "", for the whole account (RFC 9208).
    async fn quota<W: AsyncWrite + Unpin>(
        &mut self,
        tag: &Tag<'static>,
        mailbox: Option<String>,
        out: &mut Out<'_, W>,
    ) -> std::io::Result<()> {
        if let Some(name) = &mailbox
            && let Err(e) = self.store.status(self.account_id(), name).await
        {
            self.fail(tag, &e, out);
            return Ok(());
        }
        match self.store.quota(self.account_id()).await {
            Ok(q) => {
                if let Some(name) = &mailbox {
                    out.data(Data::QuotaRoot {
                        mailbox: self.name_out(name),
                        roots: vec![AString::try_from("").expect("empty string")],
                    });
                }
                let mut quotas = vec![];
                if q.limit_bytes > 0 {
                    quotas.push(QuotaGet {
                        resource: Resource::Storage,
                        usage: q.used_bytes / 1024,
                        limit: q.limit_bytes / 1024,
                    });
                }
                if q.limit_messages > 0 {
                    quotas.push(QuotaGet {
                        resource: Resource::Message,
                        usage: q.used_messages,
                        limit: q.limit_messages,
                    });
                }
                if let Ok(quotas) = Vec1::try_from(quotas) {
                    out.data(Data::Quota {
                        root: AString::try_from("").expect("empty string"),
                        quotas,
                    });
                }
                out.tagged(
                    tag,
                    StatusKind::Ok,
                    None,
                    if mailbox.is_some() {
                        "GETQUOTAROOT completed"
                    } else {
                        "GETQUOTA completed"
                    },
                );
            }
            Err(e) => self.fail(tag, &e, out),
        }
        Ok(())
    }

    /// Resolve a sequence set (or UID set) against the session's map: `(seq, uid)` pairs,
    /// ascending. Message numbers beyond the mailbox are an error for sequence sets.
    ///
    /// The set is merged into disjoint intervals before anything is expanded, so the result
    /// holds each message once however often the set names it (`1:*,1:*,…` expanded per
    /// element turned a 64 KiB line into gigabytes).
    fn resolve(&self, set: &SequenceSet, uid: bool) -> Result<Vec<(u32, u32)>, &'static str> {
        let sel = self.selected.as_ref().ok_or("No mailbox selected")?;
        if set.0.as_ref().len() > self.limits.max_sequence_set {
            return Err("Too many elements in the sequence set");
        }
        if self.uses_saved && is_saved_marker(set) {
            // `$` (RFC 5182): the saved UIDs still in the mailbox, for UID and message
            // number commands alike; an empty result names nothing.
            return Ok(self
                .saved
                .iter()
                .filter_map(|u| sel.seq.seq(*u).map(|q| (q, *u)))
                .collect());
        }
        let mut out: Vec<(u32, u32)> = Vec::new();
        if uid {
            let max = sel.seq.max_uid().unwrap_or(0);
            for (a, b) in merged_intervals(set, max) {
                out.extend(sel.seq.uids_in(a, b));
            }
        } else {
            let n = sel.seq.len();
            let star = set.0.as_ref().iter().any(|s| match s {
                Sequence::Single(v) => *v == SeqOrUid::Asterisk,
                Sequence::Range(a, b) => *a == SeqOrUid::Asterisk || *b == SeqOrUid::Asterisk,
            });
            // "1:*" in an empty mailbox names nothing rather than an invalid number:
            // clients send it blindly right after SELECT.
            if n == 0 && star {
                return Ok(vec![]);
            }
            let intervals = merged_intervals(set, n);
            if intervals.iter().any(|&(a, b)| a == 0 || b > n) {
                return Err("Invalid message sequence number");
            }
            for (a, b) in intervals {
                for q in a.max(1)..=b.min(n) {
                    if let Some(u) = sel.seq.uid(q) {
                        out.push((q, u));
                    }
                }
            }
        }
        Ok(out)
    }

    fn sel(&self) -> &Selected {
        self.selected.as_ref().expect("selected state")
    }

    async fn expunge<W: AsyncWrite + Unpin>(
        &mut self,
        tag: &Tag<'static>,
        set: Option<SequenceSet>,
        out: &mut Out<'_, W>,
    ) -> std::io::Result<()> {
        if self.sel().read_only {
            out.tagged(
                tag,
                StatusKind::No,
                Some(other_code("CANNOT")),
                "Mailbox is read-only",
            );
            return Ok(());
        }
        let uids = match &set {
            Some(s) => match self.resolve(s, true) {
                Ok(v) => {
                    if v.is_empty() {
                        out.tagged(tag, StatusKind::Ok, None, "EXPUNGE completed");
                        return Ok(());
                    }
                    Some(pb::UidSet::from_uids(v.into_iter().map(|(_, u)| u)))
                }
                Err(m) => {
                    out.tagged(tag, StatusKind::Bad, None, m);
                    return Ok(());
                }
            },
            None => None,
        };
        let req = pb::ExpungeRequest {
            account_id: self.account_id(),
            mailbox_id: self.sel().mailbox_id,
            uids,
        };
        match self.store.expunge(req).await {
            Ok(r) => {
                let sel = self.selected.as_mut().expect("selected");
                for u in r.expunged {
                    if let Some(s) = sel.seq.remove(u) {
                        out.data(Data::Expunge(nz(s)));
                    }
                }
                let code = if self.condstore {
                    NonZeroU64::new(r.highestmodseq).map(Code::HighestModSeq)
                } else {
                    None
                };
                out.tagged(tag, StatusKind::Ok, code, "EXPUNGE completed");
            }
            Err(e) => self.fail(tag, &e, out),
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn fetch<W: AsyncWrite + Unpin>(
        &mut self,
        tag: &Tag<'static>,
        set: SequenceSet,
        items: MacroOrMessageDataItemNames<'static>,
        uid: bool,
        modifiers: Vec<FetchModifier>,
        out: &mut Out<'_, W>,
    ) -> std::io::Result<()> {
        let targets = match self.resolve(&set, uid) {
            Ok(t) => t,
            Err(m) => {
                out.tagged(tag, StatusKind::Bad, None, m);
                return Ok(());
            }
        };
        let mut names: Vec<MessageDataItemName<'static>> = match items {
            MacroOrMessageDataItemNames::Macro(m) => {
                let mut v = vec![
                    MessageDataItemName::Flags,
                    MessageDataItemName::InternalDate,
                    MessageDataItemName::Rfc822Size,
                ];
                match m {
                    Macro::Fast => {}
                    Macro::All => v.push(MessageDataItemName::Envelope),
                    Macro::Full => {
                        v.push(MessageDataItemName::Envelope);
                        v.push(MessageDataItemName::Body);
                    }
                    _ => {}
                }
                v
            }
            MacroOrMessageDataItemNames::MessageDataItemNames(v) => v,
        };
        let mut changed_since = 0u64;
        for m in &modifiers {
            match m {
                FetchModifier::ChangedSince(n) => changed_since = n.get(),
                FetchModifier::Vanished => {
                    out.tagged(tag, StatusKind::Bad, None, "QRESYNC is not enabled");
                    return Ok(());
                }
            }
        }
        if changed_since > 0 {
            self.enable_condstore(out);
        }
        if uid && !names.contains(&MessageDataItemName::Uid) {
            names.insert(0, MessageDataItemName::Uid);
        }
        if self.condstore && changed_since > 0 && !names.contains(&MessageDataItemName::ModSeq) {
            names.push(MessageDataItemName::ModSeq);
        }
        if names.contains(&MessageDataItemName::ModSeq) {
            self.enable_condstore(out);
        }
        let sets_seen = !self.sel().read_only
            && names.iter().any(|n| {
                matches!(
                    n,
                    MessageDataItemName::BodyExt { peek: false, .. }
                        | MessageDataItemName::Binary { peek: false, .. }
                        | MessageDataItemName::Rfc822
                        | MessageDataItemName::Rfc822Text
                )
            });
        if sets_seen && !names.contains(&MessageDataItemName::Flags) {
            names.push(MessageDataItemName::Flags);
        }
        let want_env = names.contains(&MessageDataItemName::Envelope);
        let want_bs = names.iter().any(|n| {
            matches!(
                n,
                MessageDataItemName::Body | MessageDataItemName::BodyStructure
            )
        });
        let binary_origins: Vec<Option<u32>> = names.iter().map(binary_origin).collect();
        // Which body sections to fetch, in item order.
        let mut sections: Vec<pb::Section> = Vec::new();
        for n in &names {
            match n {
                MessageDataItemName::BodyExt {
                    section, partial, ..
                } => sections.push(convert::section(section.as_ref(), *partial, false)),
                MessageDataItemName::Binary {
                    section, partial, ..
                } => sections.push(binary_section(section, *partial)),
                MessageDataItemName::BinarySize { section } => {
                    sections.push(binary_section(section, None))
                }
                MessageDataItemName::Rfc822 => sections.push(convert::section(None, None, false)),
                MessageDataItemName::Rfc822Header => {
                    sections.push(convert::section(Some(&Section::Header(None)), None, false))
                }
                MessageDataItemName::Rfc822Text => {
                    sections.push(convert::section(Some(&Section::Text(None)), None, false))
                }
                _ => {}
            }
        }
        // The metadata call is needed only for items the body stream cannot answer: a
        // command asking for body sections and UIDs alone (e.g. `FETCH n BODY.PEEK[]`) is
        // one FetchBody call per chunk; a message absent from that stream is expunged.
        let need_meta = changed_since > 0
            || sections.is_empty()
            || names.iter().any(|n| {
                !matches!(
                    n,
                    MessageDataItemName::Uid
                        | MessageDataItemName::BodyExt { .. }
                        | MessageDataItemName::Binary { .. }
                        | MessageDataItemName::BinarySize { .. }
                        | MessageDataItemName::Rfc822
                        | MessageDataItemName::Rfc822Header
                        | MessageDataItemName::Rfc822Text
                )
            });
        let account_id = self.account_id();
        let mailbox_id = self.sel().mailbox_id;
        let batch = self.limits.fetch_batch.max(1) as usize;
        // The body stream comes in ascending UID order; so do the targets (sequence numbers
        // and UIDs grow together), which the loop below relies on.
        let mut targets = targets;
        targets.sort_unstable();
        targets.dedup();
        for chunk in targets.chunks(batch) {
            let uids: Vec<u32> = chunk.iter().map(|(_, u)| *u).collect();
            if sets_seen {
                let r = self
                    .store
                    .store_flags(pb::StoreFlagsRequest {
                        account_id,
                        mailbox_id,
                        uids: Some(pb::UidSet::from_uids(uids.iter().copied())),
                        mode: pb::StoreMode::Add as i32,
                        flags: vec!["\\Seen".into()],
                        unchanged_since: 0,
                    })
                    .await;
                if let Ok(r) = r
                    && let Some(sel) = self.selected.as_mut()
                {
                    for m in r.messages {
                        sel.reported.insert(m.uid, m.modseq);
                    }
                }
            }
            let meta_req = pb::FetchRequest {
                account_id,
                mailbox_id,
                uids: Some(pb::UidSet::from_uids(uids.iter().copied())),
                envelope: want_env,
                body_structure: want_bs,
                changed_since,
            };
            let max_bytes = self.limits.max_fetch_bytes;
            let budget = self.limits.fetch_buffer_bytes.max(1);
            // One FetchBody call for `uids`, read ahead to the budget.
            let read_bodies = |uids: Vec<u32>| {
                let store = &self.store;
                let sections = sections.clone();
                async move {
                    store
                        .fetch_bodies(
                            account_id,
                            mailbox_id,
                            pb::UidSet::from_uids(uids),
                            sections,
                            max_bytes,
                        )
                        .await?
                        .read_ahead(budget)
                        .await
                }
            };
            // Bodies read so far, in UID order; every UID up to `covered` that the store has
            // is among them (or was already written), unless `complete`.
            let mut buffered: std::collections::VecDeque<crate::store::MessageBody> =
                Default::default();
            let mut covered = 0u32;
            let mut complete = sections.is_empty();
            let metas = if !need_meta {
                None
            } else if sections.is_empty() || changed_since > 0 {
                // (With CHANGEDSINCE, bodies only of the messages it leaves in: read below.)
                Some(self.store.fetch(meta_req).await)
            } else {
                // Both calls at once; the body stream is read while the metadata arrives.
                let (m, b) = tokio::join!(self.store.fetch(meta_req), read_bodies(uids.clone()));
                match b {
                    Ok((msgs, done)) => {
                        covered = msgs.last().map_or(0, |(u, _)| *u);
                        buffered.extend(msgs);
                        complete = done;
                    }
                    Err(e) => {
                        self.fail(tag, &e, out);
                        return Ok(());
                    }
                }
                Some(m)
            };
            let metas = match metas.transpose() {
                Ok(m) => m,
                Err(e) => {
                    self.fail(tag, &e, out);
                    return Ok(());
                }
            };
            let by_uid: Option<HashMap<u32, &pb::MessageMeta>> = metas
                .as_ref()
                .map(|v| v.iter().map(|m| (m.uid, m)).collect());
            // The messages whose bodies are wanted, in UID order.
            let body_uids: Vec<u32> = match &metas {
                Some(m) if changed_since > 0 => m.iter().map(|m| m.uid).collect(),
                _ => uids.clone(),
            };
            for (seq, uid) in chunk {
                let bare;
                let meta = match &by_uid {
                    Some(map) => match map.get(uid) {
                        Some(m) => *m,
                        // Expunged meanwhile, or unchanged since CHANGEDSINCE.
                        None => continue,
                    },
                    None => {
                        bare = pb::MessageMeta {
                            uid: *uid,
                            ..Default::default()
                        };
                        &bare
                    }
                };
                let bodies = if sections.is_empty() {
                    vec![]
                } else {
                    if !complete && *uid > covered {
                        // Nothing is read ahead for this one yet: the next call, for it and
                        // the rest of the chunk.
                        let rest: Vec<u32> =
                            body_uids.iter().copied().filter(|u| u >= uid).collect();
                        match read_bodies(rest).await {
                            Ok((msgs, done)) => {
                                covered = msgs.last().map_or(covered, |(u, _)| *u);
                                buffered.extend(msgs);
                                complete = done;
                            }
                            Err(e) => {
                                self.fail(tag, &e, out);
                                return Ok(());
                            }
                        }
                    }
                    while buffered.front().is_some_and(|(u, _)| u < uid) {
                        buffered.pop_front();
                    }
                    match buffered.pop_front_if(|(u, _)| *u == *uid) {
                        Some((_, b)) => b,
                        // Expunged meanwhile: without metadata there is nothing to say.
                        None if by_uid.is_none() => continue,
                        None => vec![None; sections.len()],
                    }
                };
                let recent = self.sel().is_recent(*uid);
                if names.contains(&MessageDataItemName::Flags)
                    && let Some(sel) = self.selected.as_mut()
                {
                    sel.announce_keywords(&meta.flags, out);
                }
                let items = build_items(&names, meta, bodies, recent);
                if binary_origins.iter().any(Option::is_some) {
                    out.raw(&fetch_with_binary_origins(nz(*seq), items, &binary_origins));
                } else if let Ok(items) = Vec1::try_from(items) {
                    out.data(Data::Fetch {
                        seq: nz(*seq),
                        items,
                    });
                }
                out.maybe_flush().await?;
            }
        }
        out.tagged(tag, StatusKind::Ok, None, "FETCH completed");
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn store_cmd<W: AsyncWrite + Unpin>(
        &mut self,
        tag: &Tag<'static>,
        set: SequenceSet,
        kind: StoreType,
        response: StoreResponse,
        flags: Vec<Flag<'static>>,
        uid: bool,
        modifiers: Vec<StoreModifier>,
        out: &mut Out<'_, W>,
    ) -> std::io::Result<()> {
        if self.sel().read_only {
            out.tagged(
                tag,
                StatusKind::No,
                Some(other_code("CANNOT")),
                "Mailbox is read-only",
            );
            return Ok(());
        }
        let targets = match self.resolve(&set, uid) {
            Ok(t) => t,
            Err(m) => {
                out.tagged(tag, StatusKind::Bad, None, m);
                return Ok(());
            }
        };
        let mut unchanged_since = 0;
        let mut conditional = false;
        for m in &modifiers {
            let StoreModifier::UnchangedSince(n) = m;
            unchanged_since = *n;
            conditional = true;
            self.enable_condstore(out);
        }
        if targets.is_empty() {
            out.tagged(tag, StatusKind::Ok, None, "STORE completed");
            return Ok(());
        }
        let mode = match kind {
            StoreType::Replace => pb::StoreMode::Replace,
            StoreType::Add => pb::StoreMode::Add,
            StoreType::Remove => pb::StoreMode::Remove,
        };
        let req = pb::StoreFlagsRequest {
            account_id: self.account_id(),
            mailbox_id: self.sel().mailbox_id,
            uids: Some(pb::UidSet::from_uids(targets.iter().map(|(_, u)| *u))),
            mode: mode as i32,
            flags: flag_strings(&flags),
            // UNCHANGEDSINCE 0 fails for every message (RFC 7162 §3.2): modseqs start at 1,
            // so ask the store for "unchanged since 0" as a condition that cannot hold.
            unchanged_since: if conditional && unchanged_since == 0 {
                u64::MAX
            } else {
                unchanged_since
            },
        };
        let r = match self.store.store_flags(req).await {
            Ok(r) => r,
            Err(e) => {
                self.fail(tag, &e, out);
                return Ok(());
            }
        };
        let condstore = self.condstore;
        let sel = self.selected.as_mut().expect("selected");
        let modified: Vec<u32> = r.modified.clone();
        for m in &r.messages {
            if modified.contains(&m.uid) {
                continue;
            }
            sel.reported.insert(m.uid, m.modseq);
            let Some(seq) = sel.seq.seq(m.uid) else {
                continue;
            };
            if response == StoreResponse::Silent && !conditional {
                continue;
            }
            let mut items = vec![];
            if response == StoreResponse::Answer {
                sel.announce_keywords(&m.flags, out);
                items.push(MessageDataItem::Flags(sel.flags(m.uid, &m.flags)));
            }
            if uid {
                items.push(MessageDataItem::Uid(nz(m.uid)));
            }
            if condstore && let Some(ms) = NonZeroU64::new(m.modseq) {
                items.push(MessageDataItem::ModSeq(ms));
            }
            if let Ok(items) = Vec1::try_from(items) {
                out.data(Data::Fetch {
                    seq: nz(seq),
                    items,
                });
            }
        }
        let code = if modified.is_empty() {
            None
        } else {
            let nums: Vec<u32> = if uid {
                modified.clone()
            } else {
                modified.iter().filter_map(|u| sel.seq.seq(*u)).collect()
            };
            sequence_set_of(&nums).map(Code::Modified)
        };
        out.tagged(tag, StatusKind::Ok, code, "STORE completed");
        Ok(())
    }

    async fn copy<W: AsyncWrite + Unpin>(
        &mut self,
        tag: &Tag<'static>,
        set: SequenceSet,
        mailbox: &Mailbox<'_>,
        uid: bool,
        is_move: bool,
        out: &mut Out<'_, W>,
    ) -> std::io::Result<()> {
        if is_move && self.sel().read_only {
            out.tagged(
                tag,
                StatusKind::No,
                Some(other_code("CANNOT")),
                "Mailbox is read-only",
            );
            return Ok(());
        }
        let targets = match self.resolve(&set, uid) {
            Ok(t) => t,
            Err(m) => {
                out.tagged(tag, StatusKind::Bad, None, m);
                return Ok(());
            }
        };
        let verb = if is_move {
            "MOVE completed"
        } else {
            "COPY completed"
        };
        let Some(dest) = self.name_in(mailbox) else {
            out.tagged(
                tag,
                StatusKind::No,
                Some(Code::TryCreate),
                "No such mailbox",
            );
            return Ok(());
        };
        if targets.is_empty() {
            out.tagged(tag, StatusKind::Ok, None, verb);
            return Ok(());
        }
        let req = pb::CopyRequest {
            account_id: self.account_id(),
            mailbox_id: self.sel().mailbox_id,
            uids: Some(pb::UidSet::from_uids(targets.iter().map(|(_, u)| *u))),
            destination: dest,
            r#move: is_move,
        };
        let r = match self.store.copy(req).await {
            Ok(r) => r,
            Err(ServiceError::NotFound(_)) => {
                out.tagged(
                    tag,
                    StatusKind::No,
                    Some(Code::TryCreate),
                    "No such mailbox",
                );
                return Ok(());
            }
            Err(e) => {
                self.fail(tag, &e, out);
                return Ok(());
            }
        };
        let code = match (
            imap_uid_set(&r.source_uids),
            imap_uid_set(&r.destination_uids),
        ) {
            (Some(source), Some(destination)) => Some(Code::CopyUid {
                uid_validity: nz(r.uidvalidity),
                source,
                destination,
            }),
            _ => None,
        };
        if is_move {
            if let Some(c) = code {
                out.untagged(StatusKind::Ok, Some(c), "Moved");
            }
            let sel = self.selected.as_mut().expect("selected");
            for u in &r.source_uids {
                if let Some(s) = sel.seq.remove(*u) {
                    out.data(Data::Expunge(nz(s)));
                }
            }
            out.tagged(tag, StatusKind::Ok, None, verb);
        } else {
            out.tagged(tag, StatusKind::Ok, code, verb);
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn search<W: AsyncWrite + Unpin>(
        &mut self,
        tag: &Tag<'static>,
        charset: Option<Charset<'static>>,
        criteria: Vec1<SearchKey<'static>>,
        uid: bool,
        ret: Option<Vec<ReturnOpt>>,
        out: &mut Out<'_, W>,
    ) -> std::io::Result<()> {
        let save = ret.as_ref().is_some_and(|o| o.contains(&ReturnOpt::Save));
        let r = self.search_uids(tag, charset, criteria, out).await;
        let Some((uids, modseq)) = r else {
            // A failed SEARCH ... SAVE leaves an empty saved result (RFC 5182 §2.1).
            if save {
                self.saved.clear();
            }
            return Ok(());
        };
        let sel = self.sel();
        let nums: Vec<u32> = if uid {
            uids.clone()
        } else {
            uids.iter().filter_map(|u| sel.seq.seq(*u)).collect()
        };
        if ret.is_some() || self.rev2 {
            // ESEARCH (RFC 4731); IMAP4rev2 answers every SEARCH so, ALL by default.
            let opts = ret.unwrap_or_default();
            if save {
                self.saved = esearch::saved(&opts, &uids);
            }
            if esearch::responds(&opts) {
                let mut modseq = modseq;
                if modseq.is_some() && esearch::modseq_of_min_max_only(&opts) {
                    // RFC 4731 §3.2: MODSEQ is then that of the MIN/MAX messages only.
                    let ends = esearch::saved(&opts, &uids);
                    match self.highest_modseq_of(&ends).await {
                        Ok(m) => modseq = Some(m),
                        Err(e) => {
                            self.fail(tag, &e, out);
                            return Ok(());
                        }
                    }
                }
                let result = esearch::compute(&opts, &nums, modseq);
                out.raw(&esearch::serialize(tag.as_ref(), uid, &result));
            }
        } else {
            let modseq = modseq
                .filter(|_| !nums.is_empty())
                .and_then(NonZeroU64::new);
            out.data(Data::Search(nums.into_iter().map(nz).collect(), modseq));
        }
        out.tagged(tag, StatusKind::Ok, None, "SEARCH completed");
        Ok(())
    }

    /// SORT / UID SORT (RFC 5256), SORT=DISPLAY keys (RFC 5957), with `RETURN (...)` the
    /// ESORT answer (RFC 5267).
    #[allow(clippy::too_many_arguments)]
    async fn sort_cmd<W: AsyncWrite + Unpin>(
        &mut self,
        tag: &Tag<'static>,
        criteria: &[(sort::Key, bool)],
        charset: Charset<'static>,
        search_criteria: Vec1<SearchKey<'static>>,
        uid: bool,
        ret: Option<Vec<ReturnOpt>>,
        out: &mut Out<'_, W>,
    ) -> std::io::Result<()> {
        let Some((uids, _)) = self
            .search_uids(tag, Some(charset), search_criteria, out)
            .await
        else {
            return Ok(());
        };
        let metas = match self.sort_metadata(&uids).await {
            Ok(m) => m,
            Err(e) => {
                self.fail(tag, &e, out);
                return Ok(());
            }
        };
        let sel = self.sel();
        let msgs: Vec<sort::SortMsg> = metas
            .iter()
            .filter_map(|m| {
                let num = if uid { m.uid } else { sel.seq.seq(m.uid)? };
                Some(sort::SortMsg::new(
                    num,
                    m.size,
                    m.internal_date,
                    m.envelope.as_ref(),
                ))
            })
            .collect();
        let nums = sort::sort(msgs, criteria);
        match ret {
            Some(opts) => {
                // ESORT: MIN/MAX are the first and last in sort order, ALL is in sort order.
                let result = esearch::compute(&opts, &nums, None);
                out.raw(&esearch::serialize(tag.as_ref(), uid, &result));
            }
            None => {
                let mut line = String::from("* SORT");
                for n in &nums {
                    line.push_str(&format!(" {n}"));
                }
                line.push_str("\r\n");
                out.raw(line.as_bytes());
            }
        }
        out.tagged(tag, StatusKind::Ok, None, "SORT completed");
        Ok(())
    }

    /// THREAD / UID THREAD (RFC 5256): ORDEREDSUBJECT and REFERENCES.
    async fn thread_cmd<W: AsyncWrite + Unpin>(
        &mut self,
        tag: &Tag<'static>,
        algorithm: ThreadingAlgorithm<'static>,
        charset: Charset<'static>,
        search_criteria: Vec1<SearchKey<'static>>,
        uid: bool,
        out: &mut Out<'_, W>,
    ) -> std::io::Result<()> {
        let refs = match algorithm {
            ThreadingAlgorithm::OrderedSubject => false,
            ThreadingAlgorithm::References => true,
            ThreadingAlgorithm::Other(_) => {
                out.tagged(
                    tag,
                    StatusKind::Bad,
                    None,
                    "Unsupported threading algorithm",
                );
                return Ok(());
            }
        };
        let Some((uids, _)) = self
            .search_uids(tag, Some(charset), search_criteria, out)
            .await
        else {
            return Ok(());
        };
        let metas = match self.sort_metadata(&uids).await {
            Ok(m) => m,
            Err(e) => {
                self.fail(tag, &e, out);
                return Ok(());
            }
        };
        let mut references: HashMap<u32, Vec<u8>> = HashMap::new();
        if refs && !uids.is_empty() {
            match self.references_of(&uids).await {
                Ok(r) => references = r,
                Err(e) => {
                    self.fail(tag, &e, out);
                    return Ok(());
                }
            }
        }
        let sel = self.sel();
        let msgs: Vec<thread::ThreadMsg> = metas
            .iter()
            .filter_map(|m| {
                let num = if uid { m.uid } else { sel.seq.seq(m.uid)? };
                let env = m.envelope.clone().unwrap_or_default();
                let (subject, reply) =
                    sort::base_subject(env.subject.as_deref().unwrap_or_default());
                Some(thread::ThreadMsg {
                    num,
                    date: env
                        .date
                        .as_deref()
                        .and_then(sort::parse_date)
                        .unwrap_or(m.internal_date),
                    subject,
                    reply,
                    message_id: env.message_id.unwrap_or_default(),
                    in_reply_to: env.in_reply_to.unwrap_or_default(),
                    references: references.remove(&m.uid).unwrap_or_default(),
                })
            })
            .collect();
        let threads = if refs {
            thread::references(&msgs)
        } else {
            thread::ordered_subject(&msgs)
        };
        out.raw(&thread::serialize(&threads));
        out.tagged(tag, StatusKind::Ok, None, "THREAD completed");
        Ok(())
    }

    /// Size, internal date and ENVELOPE of these UIDs of the selected mailbox, in one store
    /// call (the UIDs are a search result, so bounded by the mailbox).
    async fn sort_metadata(&self, uids: &[u32]) -> Res<Vec<pb::MessageMeta>> {
        if uids.is_empty() {
            return Ok(Vec::new());
        }
        self.store
            .fetch(pb::FetchRequest {
                account_id: self.account_id(),
                mailbox_id: self.sel().mailbox_id,
                uids: Some(pb::UidSet::from_uids(uids.iter().copied())),
                envelope: true,
                body_structure: false,
                changed_since: 0,
            })
            .await
    }

    /// The raw `References` header value of each of these UIDs (absent when the message has
    /// none), in one FetchBody call.
    async fn references_of(&self, uids: &[u32]) -> Res<HashMap<u32, Vec<u8>>> {
        const MAX_REFERENCES: u64 = 1 << 20;
        let mut stream = self
            .store
            .fetch_bodies(
                self.account_id(),
                self.sel().mailbox_id,
                pb::UidSet::from_uids(uids.iter().copied()),
                vec![pb::Section {
                    kind: pb::SectionKind::HeaderFields as i32,
                    fields: vec!["References".into()],
                    ..Default::default()
                }],
                MAX_REFERENCES,
            )
            .await?;
        let mut out = HashMap::new();
        while let Some((uid, mut sections)) = stream.next_message().await? {
            if let Some(block) = sections.pop().flatten()
                && let Some(colon) = block.iter().position(|b| *b == b':')
            {
                out.insert(uid, block[colon + 1..].to_vec());
            }
        }
        Ok(out)
    }

    /// The highest modseq among these UIDs of the selected mailbox (0 for none).
    async fn highest_modseq_of(&self, uids: &[u32]) -> Res<u64> {
        if uids.is_empty() {
            return Ok(0);
        }
        let r = self
            .store
            .search(pb::SearchRequest {
                account_id: self.account_id(),
                mailbox_id: self.sel().mailbox_id,
                key: Some(pb::SearchKey {
                    key: Some(pb::search_key::Key::Uids(pb::UidSet::from_uids(
                        uids.iter().copied(),
                    ))),
                }),
            })
            .await?;
        Ok(r.highestmodseq)
    }

    /// Run a search: the matching UIDs still in the session's view (ascending) and, when a
    /// MODSEQ key was used, the highest modseq of the matches. `None`: the tagged failure
    /// has been written.
    async fn search_uids<W: AsyncWrite + Unpin>(
        &mut self,
        tag: &Tag<'static>,
        charset: Option<Charset<'static>>,
        criteria: Vec1<SearchKey<'static>>,
        out: &mut Out<'_, W>,
    ) -> Option<(Vec<u32>, Option<u64>)> {
        if let Some(c) = &charset {
            let c = c.as_ref();
            if !c.eq_ignore_ascii_case("UTF-8") && !c.eq_ignore_ascii_case("US-ASCII") {
                out.tagged(
                    tag,
                    StatusKind::No,
                    Some(Code::BadCharset {
                        allowed: vec![
                            Charset::try_from("US-ASCII").expect("atom"),
                            Charset::try_from("UTF-8").expect("atom"),
                        ],
                    }),
                    "Unsupported charset",
                );
                return None;
            }
        }
        // The cap on sequence set elements holds for the whole command: each set is
        // resolved on its own, so many `1:*` keys would each expand the mailbox.
        let elements: usize = criteria.as_ref().iter().map(set_elements).sum();
        if elements > self.limits.max_sequence_set {
            out.tagged(
                tag,
                StatusKind::Bad,
                None,
                "Too many elements in the sequence set",
            );
            return None;
        }
        let mut uses_modseq = false;
        let keys = match self.search_keys(criteria.as_ref(), &mut uses_modseq) {
            Ok(k) => k,
            Err(m) => {
                out.tagged(tag, StatusKind::Bad, None, m);
                return None;
            }
        };
        if uses_modseq {
            self.enable_condstore(out);
        }
        let key = pb::SearchKey {
            key: Some(pb::search_key::Key::And(pb::SearchKeys { keys })),
        };
        let r = match self
            .store
            .search(pb::SearchRequest {
                account_id: self.account_id(),
                mailbox_id: self.sel().mailbox_id,
                key: Some(key),
            })
            .await
        {
            Ok(r) => r,
            Err(e) => {
                self.fail(tag, &e, out);
                return None;
            }
        };
        let sel = self.sel();
        let mut uids: Vec<u32> = r
            .uids
            .into_iter()
            .filter(|u| sel.seq.seq(*u).is_some())
            .collect();
        uids.sort_unstable();
        uids.dedup();
        Some((uids, uses_modseq.then_some(r.highestmodseq)))
    }

    /// The store's keys for a SEARCH. Their size is bounded by the command, not by the
    /// mailbox: every sequence set becomes at most as many UID intervals as it has elements
    /// (capped for the whole command above), except `$`, the saved result, which may be
    /// copied whole once; beyond that, copies of it count against `max_sequence_set`.
    fn search_keys(
        &self,
        criteria: &[SearchKey<'_>],
        modseq: &mut bool,
    ) -> Result<Vec<pb::SearchKey>, &'static str> {
        let mut budget = self
            .limits
            .max_sequence_set
            .saturating_add(self.saved.len());
        criteria
            .iter()
            .map(|k| self.search_key(k, modseq, &mut budget))
            .collect()
    }

    fn search_key(
        &self,
        k: &SearchKey<'_>,
        modseq: &mut bool,
        budget: &mut usize,
    ) -> Result<pb::SearchKey, &'static str> {
        use pb::search_key::Key as K;
        let s = |a: &AString<'_>| String::from_utf8_lossy(a.as_ref()).into_owned();
        let has = |f: &str| K::HasFlag(f.into());
        let lacks = |f: &str| K::LacksFlag(f.into());
        let date =
            |op: pb::DateOp, d: &imap_codec::imap_types::datetime::NaiveDate| pb::DateQuery {
                op: op as i32,
                date: d.as_ref().format("%Y-%m-%d").to_string(),
            };
        let header = |name: &str, v: &AString<'_>| {
            K::Header(pb::HeaderQuery {
                name: name.into(),
                value: s(v),
            })
        };
        fn uidset(budget: &mut usize, ranges: Vec<(u32, u32)>) -> Result<K, &'static str> {
            *budget = budget
                .checked_sub(ranges.len())
                .ok_or("Too many elements in the sequence set")?;
            Ok(K::Uids(pb::UidSet::from_ranges(ranges)))
        }
        let key = match k {
            SearchKey::All => K::All(true),
            SearchKey::And(v) => K::And(pb::SearchKeys {
                keys: v
                    .as_ref()
                    .iter()
                    .map(|k| self.search_key(k, modseq, budget))
                    .collect::<Result<_, _>>()?,
            }),
            SearchKey::Or(a, b) => K::Or(pb::SearchKeys {
                keys: vec![
                    self.search_key(a, modseq, budget)?,
                    self.search_key(b, modseq, budget)?,
                ],
            }),
            SearchKey::Not(a) => K::Not(Box::new(self.search_key(a, modseq, budget)?)),
            SearchKey::SequenceSet(set) => uidset(budget, self.search_ranges(set, false)?)?,
            SearchKey::Uid(set) => uidset(budget, self.search_ranges(set, true)?)?,
            SearchKey::Answered => has("\\Answered"),
            SearchKey::Deleted => has("\\Deleted"),
            SearchKey::Draft => has("\\Draft"),
            SearchKey::Flagged => has("\\Flagged"),
            SearchKey::Seen => has("\\Seen"),
            SearchKey::Unanswered => lacks("\\Answered"),
            SearchKey::Undeleted => lacks("\\Deleted"),
            SearchKey::Undraft => lacks("\\Draft"),
            SearchKey::Unflagged => lacks("\\Flagged"),
            SearchKey::Unseen => lacks("\\Seen"),
            SearchKey::Keyword(a) => has(a.as_ref()),
            SearchKey::Unkeyword(a) => lacks(a.as_ref()),
            // \Recent is this session's state (see `Selected::recent_from`).
            SearchKey::Recent | SearchKey::New | SearchKey::Old if self.rev2 => {
                return Err("RECENT, NEW and OLD are not IMAP4rev2");
            }
            SearchKey::Recent => self.recent_key(),
            SearchKey::New => K::And(pb::SearchKeys {
                keys: vec![
                    pb::SearchKey {
                        key: Some(self.recent_key()),
                    },
                    pb::SearchKey {
                        key: Some(lacks("\\Seen")),
                    },
                ],
            }),
            SearchKey::Old => K::Not(Box::new(pb::SearchKey {
                key: Some(self.recent_key()),
            })),
            SearchKey::Before(d) => K::InternalDate(date(pb::DateOp::Before, d)),
            SearchKey::On(d) => K::InternalDate(date(pb::DateOp::On, d)),
            SearchKey::Since(d) => K::InternalDate(date(pb::DateOp::Since, d)),
            SearchKey::SentBefore(d) => K::SentDate(date(pb::DateOp::Before, d)),
            SearchKey::SentOn(d) => K::SentDate(date(pb::DateOp::On, d)),
            SearchKey::SentSince(d) => K::SentDate(date(pb::DateOp::Since, d)),
            SearchKey::Larger(n) => K::Larger(*n as u64),
            SearchKey::Smaller(n) => K::Smaller(*n as u64),
            SearchKey::From(v) => header("From", v),
            SearchKey::To(v) => header("To", v),
            SearchKey::Cc(v) => header("Cc", v),
            SearchKey::Bcc(v) => header("Bcc", v),
            SearchKey::Subject(v) => header("Subject", v),
            SearchKey::Header(n, v) => header(&s(n), v),
            SearchKey::Body(v) => K::Body(s(v)),
            SearchKey::Text(v) => K::Text(s(v)),
            SearchKey::Older(n) => K::OlderThanSecs(u64::from(n.get())),
            SearchKey::Younger(n) => K::YoungerThanSecs(u64::from(n.get())),
            SearchKey::ModSequence { modseq: m, .. } => {
                *modseq = true;
                K::Modseq(*m)
            }
        };
        Ok(pb::SearchKey { key: Some(key) })
    }

    fn recent_key(&self) -> pb::search_key::Key {
        let from = self.sel().recent_from;
        pb::search_key::Key::Uids(pb::UidSet::from_ranges([(from.max(1), u32::MAX)]))
    }

    /// A SEARCH sequence set (or UID set) as UID intervals, ascending; message numbers
    /// beyond the mailbox simply match nothing. Never expanded message by message: a
    /// SEARCH may hold thousands of `1:*` keys, each resolved on its own. The intervals may
    /// hold UIDs outside the session's view; `search_uids` drops those from the result, and
    /// for a message in the view membership is the same (UIDs ascend with message numbers).
    fn search_ranges(&self, set: &SequenceSet, uid: bool) -> Result<Vec<(u32, u32)>, &'static str> {
        let sel = self.selected.as_ref().ok_or("No mailbox selected")?;
        if set.0.as_ref().len() > self.limits.max_sequence_set {
            return Err("Too many elements in the sequence set");
        }
        if self.uses_saved && is_saved_marker(set) {
            let present = self
                .saved
                .iter()
                .copied()
                .filter(|u| sel.seq.seq(*u).is_some());
            return Ok(pb::UidSet::from_uids(present)
                .ranges
                .into_iter()
                .map(|r| (r.start, r.end))
                .collect());
        }
        if uid {
            return Ok(merged_intervals(set, sel.seq.max_uid().unwrap_or(0)));
        }
        let n = sel.seq.len();
        let mut out = Vec::new();
        for (a, b) in merged_intervals(set, n) {
            let (a, b) = (a.max(1), b.min(n));
            if let (true, Some(lo), Some(hi)) = (a <= b, sel.seq.uid(a), sel.seq.uid(b)) {
                out.push((lo, hi));
            }
        }
        Ok(out)
    }

    /// React to a change event: alerts are written at once, mailbox changes mark the
    /// selected mailbox for a poll. Returns true when the selected mailbox is affected.
    pub fn on_event<W: AsyncWrite + Unpin>(
        &mut self,
        ev: &pb::ChangeEvent,
        out: &mut Out<'_, W>,
    ) -> bool {
        if ev.kind == pb::ChangeKind::Alert as i32 {
            out.untagged(StatusKind::Ok, Some(Code::Alert), &ev.text);
            return false;
        }
        let Some(sel) = self.selected.as_mut() else {
            return false;
        };
        if is_resync(ev) || ev.mailbox_id == sel.mailbox_id {
            sel.dirty = true;
            return true;
        }
        false
    }

    /// Bring the session's view of the selected mailbox up to date and report the
    /// differences: EXPUNGE (if allowed now), EXISTS, FETCH FLAGS.
    pub async fn sync<W: AsyncWrite + Unpin>(
        &mut self,
        out: &mut Out<'_, W>,
        allow_expunge: bool,
        force: bool,
    ) -> std::io::Result<()> {
        let account_id = self.account_id();
        let condstore = self.condstore;
        let Some(sel) = self.selected.as_mut() else {
            return Ok(());
        };
        if sel.dirty || force {
            sel.dirty = false;
            // A forced poll (NOOP, CHECK) or one after the session's own change asks the
            // store itself; an event's poll is shared with every session of the gateway
            // waiting for the same mailbox's changes.
            let own_poll = force || sel.own_change;
            let cache = self.hub.changes();
            let r = match cache
                .changes(
                    &self.store,
                    account_id,
                    sel.mailbox_id,
                    sel.modseq,
                    own_poll,
                    !sel.read_only,
                )
                .await
            {
                Ok(r) => r,
                Err(ServiceError::NotFound(_)) => {
                    out.bye(None, "Selected mailbox was deleted");
                    self.state = StateKind::Logout;
                    return Ok(());
                }
                Err(e) => {
                    tracing::debug!(error = %e, "change poll failed");
                    sel.dirty = true;
                    return Ok(());
                }
            };
            sel.own_change = false;
            if r.resp.truncated {
                match self.store.select(account_id, &sel.name, true).await {
                    Ok(s) => {
                        let (gone, new) = resync_diff(&sel.seq, &s.uids);
                        let hms = s.mailbox.map(|m| m.highestmodseq).unwrap_or(sel.modseq);
                        sel.apply_changes(&gone, &new, hms, allow_expunge, condstore, out);
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "resync failed");
                        sel.dirty = true;
                    }
                }
                return Ok(());
            }
            let changed = r.changed_after(sel.modseq);
            let highest = r.resp.highestmodseq;
            sel.apply_changes(
                &r.resp.expunged,
                changed,
                highest,
                allow_expunge,
                condstore,
                out,
            );
            return Ok(());
        }
        if allow_expunge && !sel.pending_expunges.is_empty() {
            for u in std::mem::take(&mut sel.pending_expunges) {
                if let Some(s) = sel.seq.remove(u) {
                    out.data(Data::Expunge(nz(s)));
                }
            }
        }
        Ok(())
    }

    #[cfg(test)]
    pub fn force_state(&mut self, state: StateKind, selected: Option<Selected>) {
        self.state = state;
        if state != StateKind::NotAuthenticated {
            self.account = Some(pb::Account {
                id: 1,
                ..Default::default()
            });
        }
        self.selected = selected.map(Box::new);
    }
}

/// The change log no longer reaches back far enough: diff the session's UIDs against the
/// store's current list. Returns the UIDs gone and the arrivals (above every known UID).
fn resync_diff(seq: &SeqMap, fresh: &[u32]) -> (Vec<u32>, Vec<pb::MessageFlags>) {
    let present: std::collections::HashSet<u32> = fresh.iter().copied().collect();
    let gone = seq
        .iter()
        .map(|(_, u)| u)
        .filter(|u| !present.contains(u))
        .collect();
    let max = seq.max_uid().unwrap_or(0);
    let new = fresh
        .iter()
        .filter(|u| **u > max)
        .map(|&uid| pb::MessageFlags {
            uid,
            ..Default::default()
        })
        .collect();
    (gone, new)
}

fn binary_section(section: &[NonZeroU32], partial: Option<(u32, NonZeroU32)>) -> pb::Section {
    let part = Vec1::try_from(section.to_vec())
        .ok()
        .map(|p| Section::Part(imap_codec::imap_types::fetch::Part(p)));
    convert::section(part.as_ref(), partial, true)
}

/// The `<origin>` a partial BINARY item's response carries (RFC 3516 §4.2, RFC 9051
/// `msg-att-static`).
fn binary_origin(name: &MessageDataItemName<'_>) -> Option<u32> {
    match name {
        MessageDataItemName::Binary {
            partial: Some((origin, _)),
            ..
        } => Some(*origin),
        _ => None,
    }
}

/// A FETCH response whose BINARY items get the `<origin>` of `origins` (one per item):
/// imap-codec's `MessageDataItem::Binary` has no field for it. Each item is encoded alone by
/// imap-codec and the origin put after the first `]`, which ends `BINARY[section]` before
/// any of the item's data; the rest is byte for byte what imap-codec writes for the whole.
fn fetch_with_binary_origins(
    seq: NonZeroU32,
    items: Vec<MessageDataItem<'static>>,
    origins: &[Option<u32>],
) -> Vec<u8> {
    let head = format!("* {seq} FETCH (");
    let mut out = head.clone().into_bytes();
    for (i, (item, origin)) in items.into_iter().zip(origins).enumerate() {
        let one = ResponseCodec::default()
            .encode(&Response::Data(Data::Fetch {
                seq,
                items: Vec1::from(item),
            }))
            .dump();
        let mut body = one[head.len()..one.len() - b")\r\n".len()].to_vec();
        if let Some(origin) = origin
            && let Some(close) = body.iter().position(|b| *b == b']')
        {
            body.splice(close + 1..close + 1, format!("<{origin}>").into_bytes());
        }
        if i > 0 {
            out.push(b' ');
        }
        out.extend_from_slice(&body);
    }
    out.extend_from_slice(b")\r\n");
    out
}

/// Where the tagged reply for `tag` begins in `buf`, if it is there.
fn find_tagged_start(buf: &[u8], tag: &Tag<'_>) -> Option<usize> {
    let prefix = format!("{} ", tag.inner());
    let p = prefix.as_bytes();
    let mut line_start = 0;
    let mut last = None;
    let mut i = 0;
    while i < buf.len() {
        if i == line_start && buf[i..].starts_with(p) {
            last = Some(i);
        }
        if buf[i] == b'\n' {
            line_start = i + 1;
        }
        i += 1;
    }
    // A literal could contain "tag " at a line start; the tagged reply is always the final
    // line, so only accept a match that ends the buffer.
    last.filter(|&s| buf[s..].iter().filter(|b| **b == b'\n').count() == 1)
}

fn build_items(
    names: &[MessageDataItemName<'static>],
    meta: &pb::MessageMeta,
    bodies: Vec<Option<Vec<u8>>>,
    recent: bool,
) -> Vec<MessageDataItem<'static>> {
    let mut bodies = bodies.into_iter();
    let mut items = Vec::with_capacity(names.len());
    for n in names {
        let item = match n {
            MessageDataItemName::Flags => {
                let mut f = convert::flags_fetch(&meta.flags);
                if recent {
                    f.push(FlagFetch::Recent);
                }
                MessageDataItem::Flags(f)
            }
            MessageDataItemName::Uid => MessageDataItem::Uid(nz(meta.uid)),
            MessageDataItemName::InternalDate => MessageDataItem::InternalDate(
                convert::internal_date(meta.internal_date, meta.internal_date_offset),
            ),
            MessageDataItemName::Rfc822Size => {
                MessageDataItem::Rfc822Size(meta.size.min(u32::MAX as u64) as u32)
            }
            MessageDataItemName::Envelope => MessageDataItem::Envelope(convert::envelope(
                &meta.envelope.clone().unwrap_or_default(),
            )),
            MessageDataItemName::Body => MessageDataItem::Body(convert::body_structure(
                &meta.body_structure.clone().unwrap_or_default(),
                false,
            )),
            MessageDataItemName::BodyStructure => MessageDataItem::BodyStructure(
                convert::body_structure(&meta.body_structure.clone().unwrap_or_default(), true),
            ),
            MessageDataItemName::ModSeq => {
                MessageDataItem::ModSeq(NonZeroU64::new(meta.modseq).unwrap_or(NonZeroU64::MIN))
            }
            MessageDataItemName::BodyExt {
                section, partial, ..
            } => {
                let data = bodies.next().flatten();
                MessageDataItem::BodyExt {
                    section: section.clone(),
                    origin: partial.map(|(o, _)| o),
                    data: convert::nstring_data(Some(data.unwrap_or_default())),
                }
            }
            MessageDataItemName::Binary { section, .. } => {
                let data = bodies.next().flatten().unwrap_or_default();
                MessageDataItem::Binary {
                    section: section.clone(),
                    value: imap_codec::imap_types::core::NString8::Literal8(
                        imap_codec::imap_types::extensions::binary::Literal8 {
                            data: data.into(),
                            mode: imap_codec::imap_types::core::LiteralMode::Sync,
                        },
                    ),
                }
            }
            MessageDataItemName::BinarySize { section } => {
                let data = bodies.next().flatten().unwrap_or_default();
                MessageDataItem::BinarySize {
                    section: section.clone(),
                    size: data.len() as u32,
                }
            }
            MessageDataItemName::Rfc822 => {
                MessageDataItem::Rfc822(convert::nstring_data(bodies.next().flatten()))
            }
            MessageDataItemName::Rfc822Header => {
                MessageDataItem::Rfc822Header(convert::nstring_data(bodies.next().flatten()))
            }
            MessageDataItemName::Rfc822Text => {
                MessageDataItem::Rfc822Text(convert::nstring_data(bodies.next().flatten()))
            }
        };
        items.push(item);
    }
    items
}

/// A LIST pattern as sent in modified UTF-7. A pattern that is not valid modified UTF-7 (a
/// bare `&`, as in imaptest's `atoms` test with every atom character) is matched as the
/// characters it has, as Dovecot does, rather than refused: it simply matches no encoded name.
fn pattern_from_mutf7(s: String) -> String {
    mutf7::decode(&s).unwrap_or(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bounded_static::IntoBoundedStatic;
    use imap_codec::CommandCodec;
    use imap_codec::decode::Decoder as _;

    fn session() -> Session {
        let store = Store::connect("http://127.0.0.1:1", "", Duration::from_secs(5)).unwrap();
        Session::new(
            store,
            Hub::new(0),
            SessionLimits {
                max_auth_failures: 3,
                max_sequence_set: 100,
                max_list_pattern: 1024,
                auth_failure_delay: Duration::from_millis(1),
                fetch_batch: 10,
                fetch_buffer_bytes: 1 << 20,
                max_fetch_bytes: 1 << 20,
            },
        )
    }

    fn selected() -> Selected {
        Selected {
            mailbox_id: 1,
            name: "INBOX".into(),
            read_only: false,
            uidvalidity: 7,
            seq: SeqMap::from_uids(&[3, 5, 6, 9]),
            modseq: 1,
            dirty: false,
            own_change: false,
            pending_expunges: vec![],
            keywords: vec![],
            reported: HashMap::new(),
            recent_from: 9,
            no_recent: false,
        }
    }

    fn cmd(text: &str) -> Command<'static> {
        let line = format!("t {text}\r\n");
        let (rest, c) = CommandCodec::default()
            .decode(line.as_bytes())
            .unwrap_or_else(|e| panic!("{text}: {e:?}"));
        assert!(rest.is_empty());
        c.into_static()
    }

    async fn run(s: &mut Session, text: &str) -> String {
        let mut sink: Vec<u8> = Vec::new();
        let mut out = Out::new(&mut sink);
        s.handle(cmd(text), &mut out).await.unwrap();
        out.flush().await.unwrap();
        drop(out);
        String::from_utf8(sink).unwrap()
    }

    fn arrival(uid: u32) -> pb::MessageFlags {
        pb::MessageFlags {
            uid,
            ..Default::default()
        }
    }

    fn applied(
        sel: &mut Selected,
        expunged: Vec<u32>,
        new: Vec<pb::MessageFlags>,
        allow: bool,
    ) -> String {
        let mut sink: Vec<u8> = Vec::new();
        let mut out = Out::new(&mut sink);
        sel.apply_changes(&expunged, &new, 2, allow, false, &mut out);
        String::from_utf8(out.take()).unwrap()
    }

    #[test]
    fn one_expunge_and_one_arrival_announce_exists_after_the_expunge() {
        let mut sel = selected();
        let r = applied(&mut sel, vec![5], vec![arrival(10)], true);
        // UIDs 9 and 10 are at or above recent_from (9).
        assert_eq!(r, "* 2 EXPUNGE\r\n* 4 EXISTS\r\n* 2 RECENT\r\n");
        assert_eq!(
            sel.seq.iter().map(|(_, u)| u).collect::<Vec<_>>(),
            [3, 6, 9, 10]
        );
        // Expunges held back (during FETCH): EXISTS counts the held-back message too.
        let mut sel = selected();
        let r = applied(&mut sel, vec![5], vec![arrival(10)], false);
        assert_eq!(r, "* 5 EXISTS\r\n* 2 RECENT\r\n");
        assert_eq!(sel.pending_expunges, [5]);
        // Nothing arrived: no EXISTS, however the count moved.
        let mut sel = selected();
        assert_eq!(
            applied(&mut sel, vec![3, 9], vec![], true),
            "* 1 EXPUNGE\r\n* 3 EXPUNGE\r\n"
        );
    }

    #[test]
    fn truncated_resync_reports_expunges_then_exists() {
        let mut sel = selected();
        let (gone, new) = resync_diff(&sel.seq, &[3, 6, 9, 10]);
        assert_eq!(gone, [5]);
        assert_eq!(new.iter().map(|m| m.uid).collect::<Vec<_>>(), [10]);
        let r = applied(&mut sel, gone, new, true);
        assert_eq!(r, "* 2 EXPUNGE\r\n* 4 EXISTS\r\n* 2 RECENT\r\n");
        // Two gone, one new: the total shrinks yet the arrival must still be announced.
        let mut sel = selected();
        let (gone, new) = resync_diff(&sel.seq, &[3, 9, 11]);
        let r = applied(&mut sel, gone, new, true);
        assert_eq!(
            r,
            "* 2 EXPUNGE\r\n* 2 EXPUNGE\r\n* 3 EXISTS\r\n* 2 RECENT\r\n"
        );
        // Everything was expunged before the resync.
        let mut sel = selected();
        let (gone, new) = resync_diff(&sel.seq, &[12]);
        assert_eq!(gone, [3, 5, 6, 9]);
        let r = applied(&mut sel, gone, new, true);
        assert!(r.ends_with("* 1 EXISTS\r\n* 1 RECENT\r\n"), "{r}");
        assert_eq!(sel.seq.iter().map(|(_, u)| u).collect::<Vec<_>>(), [12]);
    }

    const ANY: &[&str] = &["CAPABILITY", "NOOP", "LOGOUT", "ID NIL"];
    const NOT_AUTH: &[&str] = &["STARTTLS", "AUTHENTICATE PLAIN", "LOGIN a b"];
    const AUTH: &[&str] = &[
        "SELECT INBOX",
        "EXAMINE INBOX",
        "CREATE x",
        "DELETE x",
        "RENAME x y",
        "SUBSCRIBE x",
        "UNSUBSCRIBE x",
        "LIST \"\" *",
        "LSUB \"\" *",
        "NAMESPACE",
        "STATUS INBOX (MESSAGES)",
        "APPEND INBOX {1+}\r\nx",
        "IDLE",
        "ENABLE CONDSTORE",
        "GETQUOTAROOT INBOX",
    ];
    const SELECTED: &[&str] = &[
        "CHECK",
        "CLOSE",
        "UNSELECT",
        "EXPUNGE",
        "UID EXPUNGE 3",
        "SEARCH ALL",
        "FETCH 1 FLAGS",
        "UID FETCH 1:* FLAGS",
        "STORE 1 +FLAGS (\\Seen)",
        "COPY 1 x",
        "MOVE 1 x",
    ];

    fn refused_for_state(reply: &str) -> bool {
        let last = reply.trim_end().rsplit("\r\n").next().unwrap_or("");
        last.starts_with("t BAD")
            && (last.contains("requires") || last.contains("Already authenticated"))
    }

    #[tokio::test]
    async fn every_command_in_every_state() {
        for (state, allowed) in [
            (StateKind::NotAuthenticated, vec![ANY, NOT_AUTH]),
            (StateKind::Authenticated, vec![ANY, AUTH]),
            (StateKind::Selected, vec![ANY, AUTH, SELECTED]),
        ] {
            for group in [ANY, NOT_AUTH, AUTH, SELECTED] {
                for text in group {
                    let mut s = session();
                    let sel = (state == StateKind::Selected).then(selected);
                    s.force_state(state, sel);
                    let reply = run(&mut s, text).await;
                    let ok = allowed.iter().any(|g| std::ptr::eq(*g, group));
                    assert_eq!(!refused_for_state(&reply), ok, "{state:?} {text}: {reply}");
                    // STARTTLS, AUTHENTICATE without initial response and IDLE hand over to
                    // the connection, which writes their continuation.
                    assert!(
                        reply.ends_with("\r\n")
                            || (reply.is_empty()
                                && ["STARTTLS", "AUTHENTICATE PLAIN", "IDLE"].contains(text)),
                        "{state:?} {text}: {reply:?}"
                    );
                }
            }
        }
    }

    #[tokio::test]
    async fn login_needs_tls_unless_allowed_and_capabilities_say_so() {
        let mut s = session();
        let caps = run(&mut s, "CAPABILITY").await;
        assert!(
            caps.contains("STARTTLS") && caps.contains("LOGINDISABLED"),
            "{caps}"
        );
        let r = run(&mut s, "LOGIN a b").await;
        assert!(r.starts_with("t NO [PRIVACYREQUIRED]"), "{r}");
        let r = run(&mut s, "AUTHENTICATE PLAIN AGEAYg==").await;
        assert!(r.starts_with("t NO [PRIVACYREQUIRED]"), "{r}");
        s.tls = true;
        let caps = run(&mut s, "CAPABILITY").await;
        assert!(
            caps.contains("AUTH=PLAIN") && !caps.contains("STARTTLS"),
            "{caps}"
        );
        let r = run(&mut s, "STARTTLS").await;
        assert!(r.starts_with("t BAD"), "{r}");
        let r = run(&mut s, "AUTHENTICATE CRAM-MD5").await;
        assert!(r.starts_with("t NO"), "{r}");
        let mut s = session();
        let next = {
            let mut sink = Vec::new();
            let mut out = Out::new(&mut sink);
            s.handle(cmd("STARTTLS"), &mut out).await.unwrap()
        };
        assert!(matches!(next, Next::StartTls(_)));
        s.plaintext_ok = true;
        let mut sink = Vec::new();
        let mut out = Out::new(&mut sink);
        let next = s.handle(cmd("AUTHENTICATE PLAIN"), &mut out).await.unwrap();
        assert!(matches!(next, Next::AuthContinue(_)));
    }

    #[tokio::test]
    async fn malformed_plain_response_is_bad() {
        let mut s = session();
        s.tls = true;
        // base64("no-nuls")
        let r = run(&mut s, "AUTHENTICATE PLAIN bm8tbnVscw==").await;
        assert!(r.starts_with("t BAD"), "{r}");
        // authzid differs from authcid
        let r = run(&mut s, "AUTHENTICATE PLAIN YQBiAGM=").await;
        assert!(r.starts_with("t NO [AUTHORIZATIONFAILED]"), "{r}");
    }

    #[tokio::test]
    async fn store_errors_become_rfc5530_codes_not_disconnects() {
        let mut s = session();
        s.force_state(StateKind::Selected, Some(selected()));
        let r = run(&mut s, "FETCH 1:* FLAGS").await;
        assert!(r.starts_with("t NO [UNAVAILABLE]"), "{r}");
        let r = run(&mut s, "FETCH 5 FLAGS").await;
        assert!(r.starts_with("t BAD"), "beyond the mailbox: {r}");
        assert_eq!(s.state(), StateKind::Selected);
        let r = run(&mut s, "UNSELECT").await;
        assert!(r.starts_with("t OK"), "{r}");
        assert_eq!(s.state(), StateKind::Authenticated);
    }

    #[tokio::test]
    async fn sequence_sets_resolve_against_the_map() {
        let mut s = session();
        s.force_state(StateKind::Selected, Some(selected()));
        let set = |t: &str| SequenceSet::try_from(t).unwrap();
        assert_eq!(
            s.resolve(&set("2:*"), false).unwrap(),
            vec![(2, 5), (3, 6), (4, 9)]
        );
        assert_eq!(s.resolve(&set("*:3"), false).unwrap(), vec![(3, 6), (4, 9)]);
        assert!(s.resolve(&set("5"), false).is_err());
        assert_eq!(s.resolve(&set("4:6"), true).unwrap(), vec![(2, 5), (3, 6)]);
        // UID n:* includes the highest UID even when n is above it (RFC 9051 §6.4.8).
        assert_eq!(s.resolve(&set("100:*"), true).unwrap(), vec![(4, 9)]);
        assert_eq!(s.resolve(&set("1,1,3"), true).unwrap(), vec![(1, 3)]);
        assert_eq!(s.resolve(&set("7"), true).unwrap(), vec![]);
        let mut empty = session();
        let mut sel = selected();
        sel.seq = SeqMap::default();
        empty.force_state(StateKind::Selected, Some(sel));
        assert_eq!(empty.resolve(&set("1:*"), false).unwrap(), vec![]);
        assert!(empty.resolve(&set("1"), false).is_err());
    }

    #[tokio::test]
    async fn the_saved_marker_resolves_to_saved_uids_still_present() {
        let mut s = session();
        s.force_state(StateKind::Selected, Some(selected()));
        let marker =
            SequenceSet::try_from(std::str::from_utf8(crate::preparse::SAVED_MARKER).unwrap())
                .unwrap();
        assert!(is_saved_marker(&marker));
        assert!(!is_saved_marker(
            &SequenceSet::try_from("4294967294:4294967295").unwrap()
        ));
        // UID 4 was expunged since it was saved: ignored.
        s.saved = vec![3, 4, 9];
        // Only a command that used `$` sees the marker as the saved result.
        assert_eq!(s.resolve(&marker, true).unwrap(), vec![]);
        s.uses_saved = true;
        assert_eq!(s.resolve(&marker, true).unwrap(), vec![(1, 3), (4, 9)]);
        assert_eq!(s.resolve(&marker, false).unwrap(), vec![(1, 3), (4, 9)]);
        s.saved.clear();
        assert_eq!(s.resolve(&marker, false).unwrap(), vec![]);
    }

    #[tokio::test]
    async fn enable_imap4rev2_changes_capabilities_flags_and_names() {
        let mut s = session();
        s.force_state(StateKind::Selected, Some(selected()));
        assert!(s.sel().is_recent(9));
        let caps = run(&mut s, "CAPABILITY").await;
        for c in [
            "IMAP4rev2",
            "ESEARCH",
            "SEARCHRES",
            "LIST-EXTENDED",
            "LIST-STATUS",
        ] {
            assert!(caps.contains(&format!(" {c}")), "{caps}");
        }
        let r = run(&mut s, "ENABLE IMAP4rev2").await;
        assert!(r.starts_with("* ENABLED IMAP4rev2\r\n"), "{r}");
        assert!(s.rev2 && s.utf8);
        assert!(!s.sel().is_recent(9), "no \\Recent in rev2");
        // Enabling twice lists nothing the second time (RFC 5161).
        let r = run(&mut s, "ENABLE IMAP4rev2").await;
        assert!(r.starts_with("* ENABLED\r\n"), "{r}");
        assert_eq!(
            s.name_out("Entwürfe"),
            Mailbox::try_from("Entwürfe".to_string()).unwrap()
        );
    }

    #[test]
    fn list_patterns() {
        assert!(pattern_matches("*", "a/b/c"));
        assert!(pattern_matches("%", "a"));
        assert!(!pattern_matches("%", "a/b"));
        assert!(pattern_matches("a/%", "a/b"));
        assert!(!pattern_matches("a/%", "a/b/c"));
        assert!(pattern_matches("a/*", "a/b/c"));
        assert!(pattern_matches("inbox", "INBOX"));
        assert!(!pattern_matches("inbox", "Inbox2"));
        assert!(pattern_matches("S%t", "Sent"));
        assert!(!pattern_matches("x", "xy"));
    }

    #[test]
    fn h1_list_wildcard_matcher_semantics() {
        // (pattern, name, matches)
        let table: &[(&str, &str, bool)] = &[
            ("", "", true),
            ("", "a", false),
            ("*", "", true),
            ("%", "", true),
            ("*", "a/b/c", true),
            ("%", "a", true),
            ("%", "a/b", false),
            ("%/%", "a/b", true),
            ("%/%", "a/b/c", false),
            ("a/%", "a/b", true),
            ("a/%", "a/", true),
            ("a/%", "a/b/c", false),
            ("a/*", "a/b/c", true),
            ("a*", "a", true),
            ("a*c", "abc/xyzc", true),
            ("a%c", "abc/xyzc", false),
            ("a%c", "abxc", true),
            ("%c", "c", true),
            ("a%%c", "abxc", true),
            ("a%*c", "ab/xc", true),
            ("a*%c", "ab/xc", true),
            ("*/", "a/b/", true),
            ("%/", "a/b/", false),
            ("S%t", "Sent", true),
            ("S%t", "Sen/t", false),
            ("x", "xy", false),
            ("xy", "x", false),
            ("*x", "yyy", false),
            // INBOX is case-insensitive, other names are not.
            ("inbox", "INBOX", true),
            ("iNbO%", "INBOX", true),
            ("inbox", "Inbox2", false),
            ("inbox/%", "INBOX/a", false),
            ("sent", "Sent", false),
            // Non-ASCII names compare by character.
            ("Entw%rfe", "Entwürfe", true),
            ("Entw?rfe", "Entwürfe", false),
            ("*a*a*a*a*a*a*a*ab", &"a".repeat(200), false),
            (
                "*a*a*a*a*a*a*a*a*a*b",
                &format!("{}b", "a".repeat(200)),
                true,
            ),
        ];
        for (p, n, want) in table {
            assert_eq!(pattern_matches(p, n), *want, "{p:?} vs {n:?}");
        }
    }

    /// H1: however many (deep) names a user made, an expensive LIST hands the worker back
    /// to other sessions instead of holding it to the end (on a current-thread runtime the
    /// spawned task can only have run if the matching yielded).
    #[tokio::test]
    async fn h1_a_costly_list_yields_to_other_sessions() {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicBool, Ordering};
        let pattern = ListPattern::new("*a*a*a*a*a*a*a*ab");
        let name = "a".repeat(1000);
        let ran = Arc::new(AtomicBool::new(false));
        let r = ran.clone();
        tokio::spawn(async move { r.store(true, Ordering::SeqCst) });
        let few = match_names(std::slice::from_ref(&pattern), &["a/b", "c"]).await;
        assert_eq!(few, vec![false, false]);
        assert!(!ran.load(Ordering::SeqCst), "cheap matching does not yield");
        let names: Vec<String> = (0..200).map(|i| format!("{name}{i}")).collect();
        let refs: Vec<&str> = names.iter().map(|n| n.as_str()).collect();
        let many = match_names(std::slice::from_ref(&pattern), &refs).await;
        assert!(many.iter().all(|m| !m));
        assert!(
            ran.load(Ordering::SeqCst),
            "the other task ran during the LIST"
        );
    }

    #[test]
    fn h1_list_wildcard_matcher_work_is_bounded_by_name_times_pattern() {
        let pattern = "*a*a*a*a*a*a*a*ab";
        let m = pattern.chars().count() as u64;
        let p = ListPattern::new(pattern);
        for name in [
            "a".repeat(1000),
            format!("{}b", "a".repeat(999)),
            format!("{}b", "a/".repeat(499)),
            "ab".repeat(500),
        ] {
            let n = name.chars().count() as u64;
            let (matched, steps) = p.matches_counting(&name);
            assert_eq!(matched, name.ends_with("ab"), "{name}");
            assert!(
                steps <= 2 * (n + 1) * (m + 1),
                "{steps} steps for n={n} m={m}"
            );
        }
        // A literal prefix that does not fit ends the work at once.
        let (matched, steps) = ListPattern::new("Archive/*").matches_counting(&"x".repeat(1000));
        assert!(!matched);
        assert!(steps <= 4 * 11, "{steps}");
    }

    #[test]
    fn m2_sequence_set_merge_holds_only_the_intervals() {
        let set = |t: &str| SequenceSet::try_from(t).unwrap();
        let many = vec!["1:*"; 16_000].join(",");
        assert_eq!(merged_intervals(&set(&many), 3000), vec![(1, 3000)]);
        assert_eq!(
            merged_intervals(&set("9,1:3,4,7:6,20:*,2"), 30),
            vec![(1, 4), (6, 7), (9, 9), (20, 30)]
        );
        assert_eq!(
            merged_intervals(&set("4294967295,1:4294967295"), 5),
            vec![(1, u32::MAX)]
        );
    }

    #[tokio::test]
    async fn m2_sequence_sets_resolve_each_message_once_and_are_capped() {
        let mut s = session();
        s.limits.max_sequence_set = 20_000;
        let mut sel = selected();
        let uids: Vec<u32> = (1..=3000).map(|u| u * 2).collect();
        sel.seq = SeqMap::from_uids(&uids);
        s.force_state(StateKind::Selected, Some(sel));
        let set = |t: &str| SequenceSet::try_from(t).unwrap();
        let many = vec!["1:*"; 16_000].join(",");
        for uid in [false, true] {
            let r = s.resolve(&set(&many), uid).unwrap();
            assert_eq!(r.len(), 3000, "each message once");
            assert_eq!(r.first(), Some(&(1, 2)));
            assert_eq!(r.last(), Some(&(3000, 6000)));
            let first = if uid { 1 } else { 2 };
            assert_eq!(
                s.search_ranges(&set(&many), uid).unwrap(),
                vec![(first, 6000)]
            );
        }
        // SEARCH is lenient about numbers beyond the mailbox, FETCH is not.
        assert_eq!(
            s.search_ranges(&set("2999:5000"), false).unwrap(),
            vec![(5998, 6000)]
        );
        assert!(s.resolve(&set("2999:5000"), false).is_err());
        s.limits.max_sequence_set = 10;
        let eleven = ["1"; 11].join(",");
        assert!(s.resolve(&set(&eleven), false).is_err());
        assert!(s.search_ranges(&set(&eleven), true).is_err());
        let r = run(&mut s, &format!("FETCH {eleven} (UID)")).await;
        assert!(r.starts_with("t BAD"), "{r}");
        let r = run(&mut s, &format!("SEARCH UID {eleven}")).await;
        assert!(r.starts_with("t BAD") || r.starts_with("t NO"), "{r}");
    }

    /// UID intervals held by the store keys of one SEARCH, nested keys included.
    fn key_ranges(keys: &[pb::SearchKey]) -> usize {
        use pb::search_key::Key as K;
        keys.iter()
            .map(|k| match k.key.as_ref() {
                Some(K::Uids(u)) => u.ranges.len(),
                Some(K::And(v) | K::Or(v)) => key_ranges(&v.keys),
                Some(K::Not(a)) => key_ranges(std::slice::from_ref(a.as_ref())),
                _ => 0,
            })
            .sum()
    }

    #[tokio::test]
    async fn m2_search_with_thousands_of_set_keys_holds_one_interval_per_key() {
        let mut s = session();
        s.limits.max_sequence_set = 10_000;
        // Gappy: every message its own UID interval, the worst case for expansion.
        let mut sel = selected();
        let uids: Vec<u32> = (1..=3000).map(|u| u * 2).collect();
        sel.seq = SeqMap::from_uids(&uids);
        s.force_state(StateKind::Selected, Some(sel));
        let set = |t: &str| SequenceSet::try_from(t).unwrap();
        // `SEARCH 1:* 1:* …` and `SEARCH OR UID 1:* 1:* …`: each key resolved on its own
        // expanded to 3000 intervals (2000 keys: 6 million), now it is one.
        let mut criteria: Vec<SearchKey> = (0..2000)
            .map(|_| SearchKey::SequenceSet(set("1:*")))
            .collect();
        criteria.extend((0..500).map(|_| {
            SearchKey::Or(
                Box::new(SearchKey::Uid(set("1:*"))),
                Box::new(SearchKey::Not(Box::new(SearchKey::SequenceSet(set(
                    "2,4:6,2999:*",
                ))))),
            )
        }));
        let keys = s.search_keys(&criteria, &mut false).unwrap();
        assert_eq!(key_ranges(&keys), 2000 + 500 * 4);
        // The intervals name the same messages of the view as the expansion did.
        assert_eq!(
            s.search_ranges(&set("2,4:6,2999:*"), false).unwrap(),
            vec![(4, 4), (8, 12), (5998, 6000)]
        );
        assert_eq!(s.search_ranges(&set("5:3"), true).unwrap(), vec![(3, 5)]);
        assert_eq!(
            s.search_ranges(&set("3001:*"), false).unwrap(),
            vec![(6000, 6000)]
        );
        assert_eq!(s.search_ranges(&set("3001:3005"), false).unwrap(), vec![]);
        // `$` is the one set that may name the whole mailbox: one copy is free, further
        // copies count against the element cap.
        s.saved = uids.iter().copied().step_by(2).collect();
        s.uses_saved = true;
        let marker =
            SequenceSet::try_from(std::str::from_utf8(crate::preparse::SAVED_MARKER).unwrap())
                .unwrap();
        let saved = |n: usize| -> Vec<SearchKey> {
            (0..n).map(|_| SearchKey::Uid(marker.clone())).collect()
        };
        let keys = s.search_keys(&saved(1), &mut false).unwrap();
        assert_eq!(key_ranges(&keys), 1500);
        s.limits.max_sequence_set = 3000;
        assert!(s.search_keys(&saved(3), &mut false).is_ok());
        assert_eq!(
            s.search_keys(&saved(4), &mut false),
            Err("Too many elements in the sequence set")
        );
    }

    #[tokio::test]
    async fn l1_non_ascii_mailbox_name_with_a_multibyte_char_at_byte_six() {
        let s = session();
        // "abcdeé" in modified UTF-7: byte 6 falls inside "é".
        let m = Mailbox::try_from("abcde&AOk-".to_string()).unwrap();
        assert_eq!(s.name_in(&m).as_deref(), Some("abcdeé"));
        let m = Mailbox::try_from("inbox/x".to_string()).unwrap();
        assert_eq!(s.name_in(&m).as_deref(), Some("INBOX/x"));
    }

    #[test]
    fn tagged_reply_is_found_only_as_the_last_line() {
        let t = Tag::try_from("a1").unwrap();
        let buf = b"* 1 FETCH (BODY[] {6}\r\na1 OK\r\n)\r\na1 OK done\r\n";
        assert_eq!(find_tagged_start(buf, &t), Some(33));
        assert_eq!(find_tagged_start(b"* OK x\r\n", &t), None);
    }

    #[tokio::test]
    async fn alerts_and_change_events() {
        let mut s = session();
        s.force_state(StateKind::Selected, Some(selected()));
        let mut sink = Vec::new();
        let mut out = Out::new(&mut sink);
        let alert = pb::ChangeEvent {
            account_id: 1,
            kind: pb::ChangeKind::Alert as i32,
            text: "Disk\r\nfull".into(),
            ..Default::default()
        };
        assert!(!s.on_event(&alert, &mut out));
        let other = pb::ChangeEvent {
            account_id: 1,
            mailbox_id: 2,
            kind: pb::ChangeKind::New as i32,
            ..Default::default()
        };
        assert!(!s.on_event(&other, &mut out));
        let mine = pb::ChangeEvent {
            mailbox_id: 1,
            ..other
        };
        assert!(s.on_event(&mine, &mut out));
        assert!(s.selected.as_ref().unwrap().dirty);
        assert_eq!(out.take(), b"* OK [ALERT] Diskfull\r\n");
    }

    #[test]
    fn error_codes() {
        let code = |e: ServiceError| {
            let (_, c, _) = error_reply(&e);
            let mut sink = Vec::new();
            let mut out = Out::new(&mut sink);
            out.untagged(StatusKind::No, c, "x");
            String::from_utf8(out.take()).unwrap()
        };
        assert!(code(ServiceError::NotFound("x".into())).contains("[NONEXISTENT]"));
        assert!(code(ServiceError::AlreadyExists("x".into())).contains("[ALREADYEXISTS]"));
        assert!(
            code(ServiceError::OverQuota {
                message: "x".into(),
                permanent: false
            })
            .contains("[OVERQUOTA]")
        );
        assert!(code(ServiceError::Cannot("x".into())).contains("[CANNOT]"));
        assert!(code(ServiceError::Unavailable("x".into())).contains("[UNAVAILABLE]"));
    }

    fn binary_item(section: u32, data: &[u8]) -> MessageDataItem<'static> {
        MessageDataItem::Binary {
            section: vec![nz(section)],
            value: imap_codec::imap_types::core::NString8::Literal8(
                imap_codec::imap_types::extensions::binary::Literal8 {
                    data: data.to_vec().into(),
                    mode: imap_codec::imap_types::core::LiteralMode::Sync,
                },
            ),
        }
    }

    #[test]
    fn partial_binary_items_carry_their_origin() {
        let items = vec![
            MessageDataItem::Uid(nz(4)),
            // Data that looks like a section end must not move the origin.
            binary_item(5, b"]x]"),
            binary_item(1, b"hello"),
            MessageDataItem::BinarySize {
                section: vec![nz(5)],
                size: 30,
            },
        ];
        let got = fetch_with_binary_origins(nz(3), items, &[None, Some(10), None, None]);
        assert_eq!(
            String::from_utf8(got).unwrap(),
            "* 3 FETCH (UID 4 BINARY[5]<10> ~{3}\r\n]x] BINARY[1] ~{5}\r\nhello BINARY.SIZE[5] 30)\r\n"
        );
    }

    #[test]
    fn without_origins_the_response_is_imap_codecs() {
        let items = || {
            vec![
                MessageDataItem::Uid(nz(4)),
                binary_item(2, b"a\x00b"),
                MessageDataItem::Rfc822Size(7),
            ]
        };
        let mut out_buf = Vec::new();
        let mut out = Out::new(&mut out_buf);
        out.data(Data::Fetch {
            seq: nz(9),
            items: Vec1::try_from(items()).unwrap(),
        });
        assert_eq!(
            fetch_with_binary_origins(nz(9), items(), &[None, None, None]),
            out.take()
        );
    }

    #[test]
    fn only_partial_binary_names_have_an_origin() {
        let name = |partial| MessageDataItemName::Binary {
            section: vec![nz(5)],
            partial,
            peek: true,
        };
        assert_eq!(binary_origin(&name(Some((0, nz(7))))), Some(0));
        assert_eq!(binary_origin(&name(Some((15, nz(100))))), Some(15));
        assert_eq!(binary_origin(&name(None)), None);
        assert_eq!(
            binary_origin(&MessageDataItemName::BodyExt {
                section: None,
                partial: Some((3, nz(4))),
                peek: true,
            }),
            None
        );
    }
}
