//! SEARCH: a `SearchKey` tree becomes one SQL condition over `m` (mailbox.messages) and `b`
//! (mailbox.blobs), with every value bound as a parameter.

use chrono::NaiveDate;
use mailsuite_proto::{DateOp, DateQuery, SearchKey, search_key::Key};
use mailsuite_runtime::ServiceError;

/// Nesting deeper than this is refused (a recursive key tree is client-controlled).
const MAX_DEPTH: usize = 64;

#[derive(Debug, Clone)]
pub enum Arg {
    I64(i64),
    Text(String),
    I64s(Vec<i64>),
    Date(NaiveDate),
}

pub struct Sql {
    pub cond: String,
    pub args: Vec<Arg>,
}

/// How much work one SEARCH may ask for (config `limits.max_search_keys`,
/// `limits.max_search_text_keys`).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_keys: usize,
    pub max_text_keys: usize,
}

struct Builder {
    base: usize,
    args: Vec<Arg>,
    limits: Limits,
    keys: usize,
    text_keys: usize,
}

impl Builder {
    fn bind(&mut self, a: Arg) -> String {
        self.args.push(a);
        format!("${}", self.base + self.args.len())
    }

    fn date(&mut self, q: &DateQuery, expr: &str) -> Result<String, ServiceError> {
        let d = NaiveDate::parse_from_str(q.date.trim(), "%Y-%m-%d")
            .map_err(|_| ServiceError::InvalidArgument(format!("bad date {:?}", q.date)))?;
        let p = self.bind(Arg::Date(d));
        let op = match DateOp::try_from(q.op).unwrap_or(DateOp::Before) {
            DateOp::Before => "<",
            DateOp::On => "=",
            DateOp::Since => ">=",
        };
        Ok(format!("({expr} {op} {p}::date)"))
    }

    /// One more text key: each is a substring scan of every candidate's text (up to
    /// MAX_INDEXED_TEXT), so a command of many ORed text keys is refused, not run.
    fn text_key(&mut self) -> Result<(), ServiceError> {
        self.text_keys += 1;
        if self.text_keys > self.limits.max_text_keys {
            return Err(ServiceError::InvalidArgument(format!(
                "too many text search keys (BODY, TEXT, HEADER): at most {}",
                self.limits.max_text_keys
            )));
        }
        Ok(())
    }

    fn body(&mut self, text: &str) -> String {
        let p = self.bind(Arg::Text(text.to_string()));
        // IMAP's BODY/TEXT is a substring match (RFC 9051 §6.4.4), which a word index cannot
        // answer: the scan is bounded to the candidates of one mailbox.
        format!("(strpos(lower(b.body_text), lower({p})) > 0)")
    }

    fn cond(&mut self, key: &SearchKey, depth: usize) -> Result<String, ServiceError> {
        if depth > MAX_DEPTH {
            return Err(ServiceError::InvalidArgument(
                "search key nested too deeply".into(),
            ));
        }
        self.keys += 1;
        if self.keys > self.limits.max_keys {
            return Err(ServiceError::InvalidArgument(format!(
                "too many search keys: at most {}",
                self.limits.max_keys
            )));
        }
        let Some(k) = &key.key else {
            return Ok("TRUE".into());
        };
        Ok(match k {
            Key::All(_) => "TRUE".into(),
            Key::And(keys) => {
                if keys.keys.is_empty() {
                    "TRUE".into()
                } else {
                    let parts = keys
                        .keys
                        .iter()
                        .map(|k| self.cond(k, depth + 1))
                        .collect::<Result<Vec<_>, _>>()?;
                    format!("({})", parts.join(" AND "))
                }
            }
            Key::Or(keys) => {
                if keys.keys.is_empty() {
                    "FALSE".into()
                } else {
                    let parts = keys
                        .keys
                        .iter()
                        .map(|k| self.cond(k, depth + 1))
                        .collect::<Result<Vec<_>, _>>()?;
                    format!("({})", parts.join(" OR "))
                }
            }
            Key::Not(k) => format!("(NOT {})", self.cond(k, depth + 1)?),
            // RFC 5032: "less recent than or equal to" / "more recent than or equal to" the
            // server's current time minus the interval.
            Key::OlderThanSecs(n) | Key::YoungerThanSecs(n) => {
                let secs = i64::try_from(*n).unwrap_or(i64::MAX).min(1 << 40);
                let p = self.bind(Arg::I64(secs));
                let op = if matches!(k, Key::OlderThanSecs(_)) { "<=" } else { ">=" };
                format!("(m.internal_date {op} now() - make_interval(secs => {p}::bigint))")
            }
            Key::Uids(set) => {
                let (s, e) = crate::store::uidset_pairs(Some(set));
                let a = self.bind(Arg::I64s(s));
                let b = self.bind(Arg::I64s(e));
                format!(
                    "EXISTS (SELECT 1 FROM unnest({a}::bigint[], {b}::bigint[]) AS r(s, e) WHERE m.uid BETWEEN r.s AND r.e)"
                )
            }
            Key::HasFlag(f) | Key::LacksFlag(f) => {
                let c = if f.eq_ignore_ascii_case("\\recent") {
                    "m.recent".to_string()
                } else {
                    let p = self.bind(Arg::Text(f.clone()));
                    format!("EXISTS (SELECT 1 FROM unnest(m.flags) f WHERE lower(f) = lower({p}))")
                };
                if matches!(k, Key::HasFlag(_)) {
                    c
                } else {
                    format!("(NOT {c})")
                }
            }
            Key::InternalDate(q) => self.date(
                q,
                "((m.internal_date AT TIME ZONE 'UTC') + make_interval(mins => m.date_offset))::date",
            )?,
            Key::SentDate(q) => format!("coalesce({}, FALSE)", self.date(q, "b.sent_date")?),
            Key::Larger(n) => {
                let p = self.bind(Arg::I64((*n).min(i64::MAX as u64) as i64));
                format!("(m.size > {p})")
            }
            Key::Smaller(n) => {
                let p = self.bind(Arg::I64((*n).min(i64::MAX as u64) as i64));
                format!("(m.size < {p})")
            }
            Key::Header(h) => {
                let n = self.bind(Arg::Text(h.name.trim().to_ascii_lowercase()));
                if h.value.is_empty() {
                    format!(
                        "EXISTS (SELECT 1 FROM jsonb_array_elements(b.headers) h WHERE h->>0 = {n})"
                    )
                } else {
                    self.text_key()?;
                    let v = self.bind(Arg::Text(h.value.clone()));
                    format!(
                        "EXISTS (SELECT 1 FROM jsonb_array_elements(b.headers) h
                          WHERE h->>0 = {n} AND strpos(lower(h->>1), lower({v})) > 0)"
                    )
                }
            }
            Key::Body(t) => {
                self.text_key()?;
                self.body(t)
            }
            Key::Text(t) => {
                self.text_key()?;
                let body = self.body(t);
                let p = self.bind(Arg::Text(t.clone()));
                format!(
                    "({body} OR EXISTS (SELECT 1 FROM jsonb_array_elements(b.headers) h
                      WHERE strpos(lower((h->>0) || ': ' || (h->>1)), lower({p})) > 0))"
                )
            }
            Key::Modseq(n) => {
                let p = self.bind(Arg::I64((*n).min(i64::MAX as u64) as i64));
                format!("(m.modseq >= {p})")
            }
            Key::Recent(r) => {
                if *r {
                    "m.recent".into()
                } else {
                    "(NOT m.recent)".into()
                }
            }
        })
    }
}

/// `base`: how many parameters the surrounding query already uses.
pub fn build(key: Option<&SearchKey>, base: usize, limits: Limits) -> Result<Sql, ServiceError> {
    let mut b = Builder {
        base,
        args: Vec::new(),
        limits,
        keys: 0,
        text_keys: 0,
    };
    let cond = match key {
        Some(k) => b.cond(k, 0)?,
        None => "TRUE".into(),
    };
    Ok(Sql { cond, args: b.args })
}
