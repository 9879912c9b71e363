//! A minimal POP3 client (RFC 1939) with STLS (RFC 2595) and command pipelining (RFC 2449).

use std::time::Duration;

use crate::net::{Conn, Tls};

#[derive(Debug, thiserror::Error)]
pub enum Pop3Error {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("server replied -ERR to {command}: {text}")]
    Err { command: String, text: String },
    #[error("protocol error: {0}")]
    Protocol(String),
}

impl Pop3Error {
    pub fn key(&self) -> String {
        match self {
            Pop3Error::Io(e) => crate::net::io_key(e).to_string(),
            Pop3Error::Err { text, .. } => match crate::net::resp_code(text) {
                Some(code) => format!("-ERR [{code}]"),
                None => "-ERR".to_string(),
            },
            Pop3Error::Protocol(_) => "protocol".to_string(),
        }
    }
}

pub struct Client {
    conn: Conn,
    pub pipelining: bool,
    /// Largest multi-line response accepted.
    pub max_response: usize,
}

/// `+OK rest` → `Ok(rest)`, `-ERR rest` → `Err`.
pub fn status(line: &[u8], command: &str) -> Result<String, Pop3Error> {
    let text = String::from_utf8_lossy(line);
    if let Some(rest) = text.strip_prefix("+OK") {
        return Ok(rest.trim_start().to_string());
    }
    if let Some(rest) = text.strip_prefix("-ERR") {
        return Err(Pop3Error::Err {
            command: command.to_string(),
            text: rest.trim_start().to_string(),
        });
    }
    Err(Pop3Error::Protocol(format!("bad status line {text:?}")))
}

impl Client {
    pub async fn connect(
        server: &str,
        implicit_tls: Option<&Tls>,
        stls: Option<&Tls>,
        timeout: Duration,
    ) -> Result<Client, Pop3Error> {
        let conn = Conn::connect(server, implicit_tls, timeout).await?;
        let mut c = Client {
            conn,
            pipelining: false,
            max_response: 256 << 20,
        };
        let greeting = c.conn.read_line().await?;
        status(&greeting, "greeting")?;
        if let Some(tls) = stls {
            c.simple("STLS").await?;
            let Client {
                conn, max_response, ..
            } = c;
            c = Client {
                conn: conn.upgrade(tls).await?,
                pipelining: false,
                max_response,
            };
        }
        Ok(c)
    }

    pub async fn simple(&mut self, command: &str) -> Result<String, Pop3Error> {
        self.conn
            .write_all(format!("{command}\r\n").as_bytes())
            .await?;
        let line = self.conn.read_line().await?;
        status(&line, command.split_whitespace().next().unwrap_or(""))
    }

    /// CAPA; sets `pipelining` when the server offers PIPELINING. Servers without CAPA are fine.
    pub async fn capa(&mut self) -> Result<Vec<String>, Pop3Error> {
        self.conn.write_all(b"CAPA\r\n").await?;
        let line = self.conn.read_line().await?;
        if status(&line, "CAPA").is_err() {
            return Ok(Vec::new());
        }
        let mut caps = Vec::new();
        self.read_multiline(|l| caps.push(String::from_utf8_lossy(l).to_ascii_uppercase()))
            .await?;
        self.pipelining = caps.iter().any(|c| c == "PIPELINING");
        Ok(caps)
    }

    pub async fn login(&mut self, user: &str, pass: &str) -> Result<(), Pop3Error> {
        if user.contains(['\r', '\n']) || pass.contains(['\r', '\n']) {
            return Err(Pop3Error::Protocol("CR/LF in credentials".into()));
        }
        self.simple(&format!("USER {user}")).await?;
        self.simple(&format!("PASS {pass}")).await?;
        Ok(())
    }

    /// (message count, maildrop size).
    pub async fn stat(&mut self) -> Result<(u64, u64), Pop3Error> {
        let rest = self.simple("STAT").await?;
        let mut it = rest.split_whitespace().map(|v| v.parse::<u64>());
        match (it.next(), it.next()) {
            (Some(Ok(n)), Some(Ok(s))) => Ok((n, s)),
            _ => Err(Pop3Error::Protocol(format!("bad STAT reply {rest:?}"))),
        }
    }

    /// Reads a dot-terminated body, un-stuffing lines; returns its size in bytes (CRLF incl.).
    async fn read_multiline(&mut self, mut on_line: impl FnMut(&[u8])) -> Result<usize, Pop3Error> {
        let mut total = 0usize;
        loop {
            let line = self.conn.read_line().await?;
            if line == b"." {
                return Ok(total);
            }
            let line = line.strip_prefix(b".").unwrap_or(&line);
            total += line.len() + 2;
            if total > self.max_response {
                return Err(Pop3Error::Protocol(
                    "multi-line response exceeds the limit".into(),
                ));
            }
            on_line(line);
        }
    }

    /// RETR of messages `numbers`; with pipelining up to `window` commands are in flight.
    /// Calls `on_message(number, size)` as each one completes.
    pub async fn retr_many(
        &mut self,
        numbers: &[u64],
        window: usize,
        mut on_message: impl FnMut(u64, usize),
    ) -> Result<(), Pop3Error> {
        let window = if self.pipelining { window.max(1) } else { 1 };
        let mut sent = 0;
        let mut done = 0;
        while done < numbers.len() {
            if sent < numbers.len() && sent - done < window {
                let end = (done + window).min(numbers.len());
                let mut batch = Vec::new();
                for n in &numbers[sent..end] {
                    batch.extend_from_slice(format!("RETR {n}\r\n").as_bytes());
                }
                self.conn.write_all(&batch).await?;
                sent = end;
            }
            let line = self.conn.read_line().await?;
            status(&line, "RETR")?;
            let size = self.read_multiline(|_| {}).await?;
            on_message(numbers[done], size);
            done += 1;
        }
        Ok(())
    }

    pub async fn quit(mut self) -> Result<(), Pop3Error> {
        self.simple("QUIT").await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(status(b"+OK 2 320", "STAT").unwrap(), "2 320");
        assert_eq!(status(b"+OK", "NOOP").unwrap(), "");
        assert!(matches!(
            status(b"-ERR no such message", "RETR"),
            Err(Pop3Error::Err { .. })
        ));
        assert!(matches!(status(b"HELLO", "X"), Err(Pop3Error::Protocol(_))));
    }
}
