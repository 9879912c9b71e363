//! A minimal IMAP4rev1 client (RFC 3501): LOGIN, SELECT, FETCH, SEARCH, STORE, IDLE (RFC 2177),
//! STARTTLS. Responses are read as raw lines with literals inlined; callers pick out what they
//! measure, so nothing is parsed that a benchmark does not need.

use std::time::Duration;

use crate::net::{Conn, Tls};

#[derive(Debug, thiserror::Error)]
pub enum ImapError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("server replied {status} to {command}: {text}")]
    Status {
        command: String,
        status: String,
        text: String,
    },
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl ImapError {
    pub fn key(&self) -> String {
        match self {
            ImapError::Io(e) => crate::net::io_key(e).to_string(),
            ImapError::Status { status, text, .. } => match crate::net::resp_code(text) {
                Some(code) => format!("{status} [{code}]"),
                None => status.clone(),
            },
            ImapError::Protocol(_) => "protocol".to_string(),
        }
    }
}

/// `{123}` or `{123+}` at the end of a line: the size of the literal that follows.
pub fn literal_len(line: &[u8]) -> Option<usize> {
    let line = line.strip_suffix(b"}")?;
    let open = line.iter().rposition(|b| *b == b'{')?;
    let digits = &line[open + 1..];
    let digits = digits.strip_suffix(b"+").unwrap_or(digits);
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// An IMAP quoted string, or `None` when the value needs a literal (CR, LF, 8-bit).
pub fn quote(s: &str) -> Option<String> {
    if s.bytes()
        .any(|b| b == b'\r' || b == b'\n' || b >= 0x80 || b == 0)
    {
        return None;
    }
    Some(format!(
        "\"{}\"",
        s.replace('\\', "\\\\").replace('"', "\\\"")
    ))
}

/// The number in `* <n> <WORD>` (e.g. `EXISTS`, `FETCH`).
pub fn untagged_number(resp: &[u8], word: &str) -> Option<u64> {
    let rest = resp.strip_prefix(b"* ")?;
    let sp = rest.iter().position(|b| *b == b' ')?;
    let n = std::str::from_utf8(&rest[..sp]).ok()?.parse().ok()?;
    let after = &rest[sp + 1..];
    let w = word.as_bytes();
    (after.len() >= w.len()
        && after[..w.len()].eq_ignore_ascii_case(w)
        && after.get(w.len()).is_none_or(|b| *b == b' '))
    .then_some(n)
}

/// The value after `KEY ` in a response, e.g. `UID 17` or `[UIDNEXT 5]`.
pub fn number_after(resp: &[u8], key: &str) -> Option<u64> {
    let k = key.as_bytes();
    let i = resp
        .windows(k.len() + 1)
        .position(|w| w[..k.len()].eq_ignore_ascii_case(k) && w[k.len()] == b' ')?;
    let rest = &resp[i + k.len() + 1..];
    let end = rest
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(rest.len());
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

pub struct Client {
    conn: Conn,
    next_tag: u32,
    pub capabilities: Vec<String>,
    /// Largest literal accepted from the server.
    pub max_literal: usize,
}

#[derive(Debug)]
pub struct Done {
    pub status: String,
    pub text: String,
}

impl Client {
    pub async fn connect(
        server: &str,
        implicit_tls: Option<&Tls>,
        starttls: Option<&Tls>,
        timeout: Duration,
    ) -> Result<Client, ImapError> {
        let conn = Conn::connect(server, implicit_tls, timeout).await?;
        let mut c = Client {
            conn,
            next_tag: 1,
            capabilities: Vec::new(),
            max_literal: 256 << 20,
        };
        let greeting = c.read_response().await?;
        if !greeting.starts_with(b"* OK") && !greeting.starts_with(b"* PREAUTH") {
            return Err(ImapError::Protocol(format!(
                "greeting {:?}",
                String::from_utf8_lossy(&greeting)
            )));
        }
        if let Some(tls) = starttls {
            c.run("STARTTLS", |_| {}).await?;
            let Client {
                conn,
                next_tag,
                max_literal,
                ..
            } = c;
            c = Client {
                conn: conn.upgrade(tls).await?,
                next_tag,
                capabilities: Vec::new(),
                max_literal,
            };
        }
        Ok(c)
    }

    /// One response line with its literals inlined.
    async fn read_response(&mut self) -> Result<Vec<u8>, ImapError> {
        let mut resp = self.conn.read_line().await?;
        while let Some(n) = literal_len(&resp) {
            if n > self.max_literal {
                return Err(ImapError::Protocol(format!(
                    "literal of {n} bytes exceeds the limit"
                )));
            }
            resp.extend_from_slice(b"\r\n");
            self.conn.read_exact_into(n, &mut resp).await?;
            let more = self.conn.read_line().await?;
            resp.extend_from_slice(&more);
        }
        Ok(resp)
    }

    /// Sends `command` and hands every untagged response to `on_untagged`; `OK` is success.
    pub async fn run(
        &mut self,
        command: &str,
        mut on_untagged: impl FnMut(&[u8]),
    ) -> Result<Done, ImapError> {
        let tag = self.send(command).await?;
        self.finish(&tag, command, &mut on_untagged).await
    }

    async fn send(&mut self, command: &str) -> Result<String, ImapError> {
        let tag = format!("b{}", self.next_tag);
        self.next_tag += 1;
        self.conn
            .write_all(format!("{tag} {command}\r\n").as_bytes())
            .await?;
        Ok(tag)
    }

    async fn finish(
        &mut self,
        tag: &str,
        command: &str,
        on_untagged: &mut impl FnMut(&[u8]),
    ) -> Result<Done, ImapError> {
        loop {
            let resp = self.read_response().await?;
            if resp.starts_with(b"* ") {
                if resp.len() >= 5 && resp[2..5].eq_ignore_ascii_case(b"BYE") {
                    return Err(ImapError::Status {
                        command: verb(command),
                        status: "BYE".into(),
                        text: String::from_utf8_lossy(&resp).into_owned(),
                    });
                }
                on_untagged(&resp);
                continue;
            }
            if resp.starts_with(b"+") {
                return Err(ImapError::Protocol(
                    "unexpected continuation request".into(),
                ));
            }
            let Some(rest) = resp
                .strip_prefix(tag.as_bytes())
                .and_then(|r| r.strip_prefix(b" "))
            else {
                return Err(ImapError::Protocol(format!(
                    "unexpected {:?}",
                    String::from_utf8_lossy(&resp)
                )));
            };
            let text = String::from_utf8_lossy(rest).into_owned();
            let (status, text) = text.split_once(' ').unwrap_or((&text, ""));
            let status = status.to_ascii_uppercase();
            if status != "OK" {
                return Err(ImapError::Status {
                    command: verb(command),
                    status,
                    text: text.to_string(),
                });
            }
            return Ok(Done {
                status,
                text: text.to_string(),
            });
        }
    }

    pub async fn capability(&mut self) -> Result<(), ImapError> {
        let mut caps = Vec::new();
        self.run("CAPABILITY", |r| {
            if let Some(rest) = r.strip_prefix(b"* CAPABILITY ") {
                caps.extend(
                    String::from_utf8_lossy(rest)
                        .split_whitespace()
                        .map(|s| s.to_ascii_uppercase()),
                );
            }
        })
        .await?;
        self.capabilities = caps;
        Ok(())
    }

    pub fn has(&self, cap: &str) -> bool {
        self.capabilities
            .iter()
            .any(|c| c.eq_ignore_ascii_case(cap))
    }

    pub async fn login(&mut self, user: &str, pass: &str) -> Result<(), ImapError> {
        let (Some(u), Some(p)) = (quote(user), quote(pass)) else {
            return Err(ImapError::Protocol(
                "user or password not representable as a quoted string".into(),
            ));
        };
        self.run(&format!("LOGIN {u} {p}"), |_| {}).await?;
        Ok(())
    }

    /// Selects (or EXAMINEs) a mailbox; returns (EXISTS, UIDNEXT).
    pub async fn select(
        &mut self,
        mailbox: &str,
        read_only: bool,
    ) -> Result<(u64, Option<u64>), ImapError> {
        let m = quote(mailbox).ok_or_else(|| ImapError::Protocol("mailbox name".into()))?;
        let mut exists = 0;
        let mut uidnext = None;
        let cmd = if read_only { "EXAMINE" } else { "SELECT" };
        self.run(&format!("{cmd} {m}"), |r| {
            if let Some(n) = untagged_number(r, "EXISTS") {
                exists = n;
            }
            if let Some(n) = number_after(r, "[UIDNEXT") {
                uidnext = Some(n);
            }
        })
        .await?;
        Ok((exists, uidnext))
    }

    /// Enters IDLE and waits for the server's continuation; untagged responses that come
    /// before it (an `EXISTS` among them, perhaps) go to `on_untagged`.
    pub async fn idle(&mut self, mut on_untagged: impl FnMut(&[u8])) -> Result<String, ImapError> {
        let tag = self.send("IDLE").await?;
        loop {
            let resp = self.read_response().await?;
            if resp.starts_with(b"+") {
                return Ok(tag);
            }
            if resp.starts_with(tag.as_bytes()) {
                return Err(ImapError::Status {
                    command: "IDLE".into(),
                    status: "NO".into(),
                    text: String::from_utf8_lossy(&resp).into_owned(),
                });
            }
            on_untagged(&resp);
        }
    }

    /// Next untagged response while idling.
    pub async fn idle_next(&mut self) -> Result<Vec<u8>, ImapError> {
        let resp = self.read_response().await?;
        if resp.len() >= 5 && resp.starts_with(b"* ") && resp[2..5].eq_ignore_ascii_case(b"BYE") {
            return Err(ImapError::Status {
                command: "IDLE".into(),
                status: "BYE".into(),
                text: String::from_utf8_lossy(&resp).into_owned(),
            });
        }
        Ok(resp)
    }

    /// Ends IDLE (`DONE`), handing remaining untagged responses to `on_untagged`.
    pub async fn idle_done(
        &mut self,
        tag: &str,
        mut on_untagged: impl FnMut(&[u8]),
    ) -> Result<(), ImapError> {
        self.conn.write_all(b"DONE\r\n").await?;
        self.finish(tag, "IDLE", &mut on_untagged).await?;
        Ok(())
    }

    pub async fn logout(mut self) {
        let _ = self.run("LOGOUT", |_| {}).await;
    }

    pub fn set_timeout(&mut self, t: Duration) {
        self.conn.timeout = t;
    }
}

fn verb(command: &str) -> String {
    command
        .split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals() {
        assert_eq!(literal_len(b"* 1 FETCH (BODY[] {42}"), Some(42));
        assert_eq!(literal_len(b"a LOGIN {5+}"), Some(5));
        assert_eq!(literal_len(b"* OK {x}"), None);
        assert_eq!(literal_len(b"* OK {}"), None);
        assert_eq!(literal_len(b"* OK no literal"), None);
    }

    #[test]
    fn quoting() {
        assert_eq!(quote("a\"b\\c").unwrap(), r#""a\"b\\c""#);
        assert_eq!(quote("bad\r\n"), None);
        assert_eq!(quote("é"), None);
    }

    #[test]
    fn untagged_numbers() {
        assert_eq!(untagged_number(b"* 12 EXISTS", "EXISTS"), Some(12));
        assert_eq!(untagged_number(b"* 3 FETCH (UID 9)", "FETCH"), Some(3));
        assert_eq!(untagged_number(b"* 3 FETCHX", "FETCH"), None);
        assert_eq!(untagged_number(b"* OK [UIDNEXT 5]", "EXISTS"), None);
        assert_eq!(
            number_after(b"* OK [UIDNEXT 57] next", "[UIDNEXT"),
            Some(57)
        );
        assert_eq!(
            number_after(b"* 3 FETCH (FLAGS () UID 17)", "UID"),
            Some(17)
        );
        assert_eq!(number_after(b"* 3 FETCH (FLAGS ())", "UID"), None);
    }
}
