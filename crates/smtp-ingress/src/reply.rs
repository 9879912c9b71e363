//! SMTP replies (RFC 5321 §4.2) with enhanced status codes (RFC 3463), and the one place where
//! a `ServiceError` from the store or the queue becomes an SMTP reply.

use mailsuite_runtime::ServiceError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    /// Text lines; each already carries its enhanced status code where one applies.
    pub lines: Vec<String>,
}

impl Reply {
    /// A one-line reply: `code enhanced text`.
    pub fn new(code: u16, enhanced: &str, text: impl AsRef<str>) -> Reply {
        Reply {
            code,
            lines: vec![format!("{enhanced} {}", clean(text.as_ref()))],
        }
    }

    /// A multi-line reply, each line prefixed with the enhanced code.
    pub fn multi(code: u16, enhanced: &str, lines: impl IntoIterator<Item = String>) -> Reply {
        let lines: Vec<String> = lines
            .into_iter()
            .map(|l| format!("{enhanced} {}", clean(&l)))
            .collect();
        Reply { code, lines }
    }

    /// Lines without enhanced codes (the EHLO keyword list, the greeting, AUTH challenges).
    pub fn raw(code: u16, lines: Vec<String>) -> Reply {
        Reply { code, lines }
    }

    pub fn is_positive(&self) -> bool {
        self.code < 400
    }

    /// The wire form: `code-text` for all but the last line, `code text` for the last.
    pub fn serialize(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let n = self.lines.len().max(1);
        for i in 0..n {
            let text = self.lines.get(i).map(String::as_str).unwrap_or("");
            let sep = if i + 1 == n { ' ' } else { '-' };
            out.extend_from_slice(format!("{}{}{}\r\n", self.code, sep, text).as_bytes());
        }
        out
    }
}

/// Never let a CR or LF from data (an address, a remote error text) split a reply.
fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c == '\r' || c == '\n' { ' ' } else { c })
        .collect()
}

/// What a failed RPC means for the client, at the point of accepting a message.
pub fn service_error(e: &ServiceError) -> Reply {
    match e {
        ServiceError::OverQuota {
            permanent: true, ..
        } => Reply::new(552, "5.2.2", "Mailbox full"),
        ServiceError::OverQuota { .. } => Reply::new(452, "4.2.2", "Mailbox full, try again later"),
        ServiceError::TooLarge(_) => Reply::new(552, "5.3.4", "Message too big"),
        ServiceError::NotFound(_) => Reply::new(550, "5.1.1", "No such user"),
        ServiceError::PermissionDenied(_) => Reply::new(550, "5.7.1", "Not allowed"),
        ServiceError::Unauthenticated => Reply::new(530, "5.7.0", "Authentication required"),
        ServiceError::InvalidArgument(_) => Reply::new(554, "5.6.0", "Message refused"),
        ServiceError::Cannot(_) => Reply::new(554, "5.7.0", "Transaction failed"),
        ServiceError::AlreadyExists(_)
        | ServiceError::Conflict(_)
        | ServiceError::Unavailable(_)
        | ServiceError::Internal(_) => Reply::new(
            451,
            "4.3.0",
            "Temporary failure, message not accepted: try again later",
        ),
    }
}

/// A directory lookup failed (at MAIL/RCPT/AUTH time): temporary unless clearly not.
pub fn lookup_error(e: &ServiceError) -> Reply {
    match e {
        ServiceError::NotFound(_) => Reply::new(550, "5.1.1", "No such user"),
        ServiceError::InvalidArgument(_) => Reply::new(501, "5.1.3", "Bad address syntax"),
        ServiceError::PermissionDenied(_) => Reply::new(550, "5.7.1", "Not allowed"),
        _ => Reply::new(451, "4.3.0", "Directory unavailable, try again later"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_single_and_multi_line() {
        assert_eq!(
            Reply::new(250, "2.0.0", "OK").serialize(),
            b"250 2.0.0 OK\r\n"
        );
        let r = Reply::raw(
            250,
            vec!["mx.test".into(), "PIPELINING".into(), "SIZE 10".into()],
        );
        assert_eq!(
            r.serialize(),
            b"250-mx.test\r\n250-PIPELINING\r\n250 SIZE 10\r\n".to_vec()
        );
        assert_eq!(Reply::raw(334, vec![]).serialize(), b"334 \r\n");
    }

    #[test]
    fn line_breaks_in_text_cannot_inject_replies() {
        let r = Reply::new(550, "5.1.1", "<a\r\n250 ok>");
        assert_eq!(r.serialize(), b"550 5.1.1 <a  250 ok>\r\n");
    }

    #[test]
    fn service_errors_map_to_replies() {
        let cases = [
            (ServiceError::Unavailable("db".into()), 451, "4.3.0"),
            (ServiceError::Internal("x".into()), 451, "4.3.0"),
            (ServiceError::Conflict("x".into()), 451, "4.3.0"),
            (
                ServiceError::OverQuota {
                    message: "q".into(),
                    permanent: false,
                },
                452,
                "4.2.2",
            ),
            (
                ServiceError::OverQuota {
                    message: "q".into(),
                    permanent: true,
                },
                552,
                "5.2.2",
            ),
            (ServiceError::TooLarge("x".into()), 552, "5.3.4"),
            (ServiceError::NotFound("x".into()), 550, "5.1.1"),
            (ServiceError::PermissionDenied("x".into()), 550, "5.7.1"),
        ];
        for (e, code, enh) in cases {
            let r = service_error(&e);
            assert_eq!(r.code, code, "{e:?}");
            assert!(r.lines[0].starts_with(enh), "{e:?}: {r:?}");
        }
        assert_eq!(
            lookup_error(&ServiceError::Unavailable("x".into())).code,
            451
        );
    }
}
