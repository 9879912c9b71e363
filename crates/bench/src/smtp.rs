//! A small SMTP client (RFC 5321) with ESMTP PIPELINING (RFC 2920), STARTTLS (RFC 3207) and
//! AUTH PLAIN (RFC 4954): just enough to push messages as fast as a server takes them.

use std::time::{Duration, Instant};

use base64::Engine as _;

use crate::net::{Conn, Tls};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    pub fn is_positive(&self) -> bool {
        (200..400).contains(&self.code)
    }
    pub fn text(&self) -> String {
        self.lines.join(" / ")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SmtpError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("server replied {code} to {stage}: {text}")]
    Reply {
        stage: &'static str,
        code: u16,
        text: String,
    },
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl SmtpError {
    /// Error-tally key: the reply code, or the I/O failure class.
    pub fn key(&self) -> String {
        match self {
            SmtpError::Io(e) => crate::net::io_key(e).to_string(),
            SmtpError::Reply { code, .. } => code.to_string(),
            SmtpError::Protocol(_) => "protocol".to_string(),
        }
    }
}

/// One reply line: `(code, is_last, text)`. `250-x` continues, `250 x` or `250` ends.
pub fn parse_reply_line(line: &[u8]) -> Result<(u16, bool, &str), SmtpError> {
    let bad = || {
        SmtpError::Protocol(format!(
            "bad reply line {:?}",
            String::from_utf8_lossy(line)
        ))
    };
    if line.len() < 3 || !line[..3].iter().all(u8::is_ascii_digit) {
        return Err(bad());
    }
    let code = std::str::from_utf8(&line[..3])
        .map_err(|_| bad())?
        .parse()
        .map_err(|_| bad())?;
    let (last, text) = match line.get(3) {
        None => (true, &[][..]),
        Some(b' ') => (true, &line[4..]),
        Some(b'-') => (false, &line[4..]),
        Some(_) => return Err(bad()),
    };
    Ok((
        code,
        last,
        std::str::from_utf8(text).unwrap_or("<non-utf8>"),
    ))
}

/// Limits what a misbehaving server can make us buffer in one reply.
const MAX_REPLY_LINES: usize = 512;

pub async fn read_reply(conn: &mut Conn) -> Result<Reply, SmtpError> {
    let mut lines = Vec::new();
    loop {
        let line = conn.read_line().await?;
        let (code, last, text) = parse_reply_line(&line)?;
        lines.push(text.to_string());
        if last {
            return Ok(Reply { code, lines });
        }
        if lines.len() > MAX_REPLY_LINES {
            return Err(SmtpError::Protocol("reply with too many lines".into()));
        }
    }
}

/// Dot-stuffs a message body and guarantees it ends with CRLF, ready for `.\r\n`.
pub fn dot_stuff(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + data.len() / 64 + 3);
    let mut at_line_start = true;
    for &b in data {
        if at_line_start && b == b'.' {
            out.push(b'.');
        }
        out.push(b);
        at_line_start = b == b'\n';
    }
    if !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Caps {
    pub pipelining: bool,
    pub starttls: bool,
    pub auth_plain: bool,
    pub size: Option<u64>,
}

pub fn parse_ehlo(reply: &Reply) -> Caps {
    let mut caps = Caps::default();
    for line in reply.lines.iter().skip(1) {
        let mut words = line.split_whitespace();
        let kw = words.next().unwrap_or("").to_ascii_uppercase();
        match kw.as_str() {
            "PIPELINING" => caps.pipelining = true,
            "STARTTLS" => caps.starttls = true,
            "AUTH" => caps.auth_plain = words.any(|w| w.eq_ignore_ascii_case("PLAIN")),
            "SIZE" => caps.size = words.next().and_then(|v| v.parse().ok()),
            _ => {}
        }
    }
    caps
}

#[derive(Clone)]
pub struct Options {
    pub server: String,
    pub helo: String,
    /// TLS from the first byte (port 465).
    pub implicit_tls: Option<Tls>,
    /// STARTTLS after EHLO.
    pub starttls: Option<Tls>,
    pub auth: Option<(String, String)>,
    pub pipelining: bool,
    pub timeout: Duration,
}

pub struct Client {
    conn: Conn,
    pub caps: Caps,
    pipelining: bool,
}

/// What happened to one message.
#[derive(Debug, Default)]
pub struct Sent {
    /// Final reply to the data (`250` when accepted).
    pub reply: Option<Reply>,
    /// Codes of refused recipients.
    pub rcpt_refused: Vec<u16>,
    /// When the end-of-data dot was flushed, and when its reply arrived.
    pub data_end_at: Option<Instant>,
    pub replied_at: Option<Instant>,
}

impl Client {
    pub async fn connect(opts: &Options) -> Result<Client, SmtpError> {
        let mut conn =
            Conn::connect(&opts.server, opts.implicit_tls.as_ref(), opts.timeout).await?;
        let greeting = read_reply(&mut conn).await?;
        if greeting.code != 220 {
            return Err(SmtpError::Reply {
                stage: "greeting",
                code: greeting.code,
                text: greeting.text(),
            });
        }
        let mut c = Client {
            conn,
            caps: Caps::default(),
            pipelining: false,
        };
        c.ehlo(&opts.helo).await?;
        if let Some(tls) = &opts.starttls {
            if !c.caps.starttls {
                return Err(SmtpError::Protocol("server does not offer STARTTLS".into()));
            }
            c.expect(b"STARTTLS\r\n", "STARTTLS", 220).await?;
            let Client { conn, .. } = c;
            c = Client {
                conn: conn.upgrade(tls).await?,
                caps: Caps::default(),
                pipelining: false,
            };
            c.ehlo(&opts.helo).await?;
        }
        if let Some((user, pass)) = &opts.auth {
            let token = b64(format!("\0{user}\0{pass}").as_bytes());
            c.expect(format!("AUTH PLAIN {token}\r\n").as_bytes(), "AUTH", 235)
                .await?;
        }
        c.pipelining = opts.pipelining && c.caps.pipelining;
        Ok(c)
    }

    async fn ehlo(&mut self, helo: &str) -> Result<(), SmtpError> {
        let r = self.command(format!("EHLO {helo}\r\n").as_bytes()).await?;
        if r.code != 250 {
            return Err(SmtpError::Reply {
                stage: "EHLO",
                code: r.code,
                text: r.text(),
            });
        }
        self.caps = parse_ehlo(&r);
        Ok(())
    }

    pub async fn command(&mut self, cmd: &[u8]) -> Result<Reply, SmtpError> {
        self.conn.write_all(cmd).await?;
        read_reply(&mut self.conn).await
    }

    async fn expect(
        &mut self,
        cmd: &[u8],
        stage: &'static str,
        code: u16,
    ) -> Result<Reply, SmtpError> {
        let r = self.command(cmd).await?;
        if r.code != code {
            return Err(SmtpError::Reply {
                stage,
                code: r.code,
                text: r.text(),
            });
        }
        Ok(r)
    }

    /// Sends one message whose body is already dot-stuffed (`stuffed` parts concatenated).
    /// A refused MAIL or DATA is an `Err`; refused recipients are listed in `Sent`.
    pub async fn send(
        &mut self,
        from: &str,
        rcpts: &[String],
        stuffed: &[&[u8]],
    ) -> Result<Sent, SmtpError> {
        let mut sent = Sent::default();
        let mail = format!("MAIL FROM:<{from}>\r\n");
        let rcpt_cmds: Vec<String> = rcpts.iter().map(|r| format!("RCPT TO:<{r}>\r\n")).collect();
        let mut accepted = 0;
        let data_reply;
        let mail_reply;
        if self.pipelining {
            let mut batch = Vec::with_capacity(64 * (rcpts.len() + 2));
            batch.extend_from_slice(mail.as_bytes());
            for r in &rcpt_cmds {
                batch.extend_from_slice(r.as_bytes());
            }
            batch.extend_from_slice(b"DATA\r\n");
            self.conn.write_all(&batch).await?;
            mail_reply = read_reply(&mut self.conn).await?;
            for _ in rcpts {
                let r = read_reply(&mut self.conn).await?;
                if r.code / 100 == 2 {
                    accepted += 1;
                } else {
                    sent.rcpt_refused.push(r.code);
                }
            }
            data_reply = read_reply(&mut self.conn).await?;
        } else {
            mail_reply = self.command(mail.as_bytes()).await?;
            if mail_reply.code / 100 != 2 {
                return Err(SmtpError::Reply {
                    stage: "MAIL",
                    code: mail_reply.code,
                    text: mail_reply.text(),
                });
            }
            for r in &rcpt_cmds {
                let r = self.command(r.as_bytes()).await?;
                if r.code / 100 == 2 {
                    accepted += 1;
                } else {
                    sent.rcpt_refused.push(r.code);
                }
            }
            if accepted == 0 {
                self.command(b"RSET\r\n").await?;
                return Ok(sent);
            }
            data_reply = self.command(b"DATA\r\n").await?;
        }
        if data_reply.code != 354 {
            if mail_reply.code / 100 != 2 {
                return Err(SmtpError::Reply {
                    stage: "MAIL",
                    code: mail_reply.code,
                    text: mail_reply.text(),
                });
            }
            if accepted == 0 {
                return Ok(sent);
            }
            return Err(SmtpError::Reply {
                stage: "DATA",
                code: data_reply.code,
                text: data_reply.text(),
            });
        }
        if accepted == 0 {
            // RFC 2920 §3.1: a server may say 354 after refusing every recipient; the
            // transaction still has to be closed with an empty message.
            self.conn.write_all(b".\r\n").await?;
            read_reply(&mut self.conn).await?;
            return Ok(sent);
        }
        let mut parts: Vec<&[u8]> = stuffed.to_vec();
        parts.push(b".\r\n");
        self.conn.write_parts(&parts).await?;
        sent.data_end_at = Some(Instant::now());
        let r = read_reply(&mut self.conn).await?;
        sent.replied_at = Some(Instant::now());
        if r.code / 100 != 2 {
            return Err(SmtpError::Reply {
                stage: "end of data",
                code: r.code,
                text: r.text(),
            });
        }
        sent.reply = Some(r);
        Ok(sent)
    }

    pub async fn quit(mut self) {
        let _ = self.command(b"QUIT\r\n").await;
    }
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_lines() {
        assert_eq!(
            parse_reply_line(b"250-PIPELINING").unwrap(),
            (250, false, "PIPELINING")
        );
        assert_eq!(parse_reply_line(b"250 ok").unwrap(), (250, true, "ok"));
        assert_eq!(parse_reply_line(b"354").unwrap(), (354, true, ""));
        assert!(parse_reply_line(b"25").is_err());
        assert!(parse_reply_line(b"abc hi").is_err());
        assert!(parse_reply_line(b"250xok").is_err());
    }

    #[test]
    fn ehlo_capabilities() {
        let r = Reply {
            code: 250,
            lines: vec![
                "mx.test".into(),
                "PIPELINING".into(),
                "SIZE 1000".into(),
                "auth LOGIN PLAIN".into(),
                "STARTTLS".into(),
            ],
        };
        assert_eq!(
            parse_ehlo(&r),
            Caps {
                pipelining: true,
                starttls: true,
                auth_plain: true,
                size: Some(1000)
            }
        );
        assert_eq!(
            parse_ehlo(&Reply {
                code: 250,
                lines: vec!["x".into()]
            }),
            Caps::default()
        );
    }

    #[test]
    fn dot_stuffing() {
        assert_eq!(dot_stuff(b".a\r\nb\r\n..c\r\n"), b"..a\r\nb\r\n...c\r\n");
        assert_eq!(dot_stuff(b"no newline"), b"no newline\r\n");
        assert_eq!(dot_stuff(b"x.\r\n.\r\n"), b"x.\r\n..\r\n");
    }

    #[test]
    fn base64() {
        assert_eq!(b64(b"\0user\0pass"), "AHVzZXIAcGFzcw==");
        assert_eq!(b64(b"ab"), "YWI=");
        assert_eq!(b64(b"abc"), "YWJj");
        assert_eq!(b64(b""), "");
    }
}
