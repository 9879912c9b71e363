//! Delivery status notifications (RFC 3464 multipart/report, RFC 3461 NOTIFY/RET/ENVID/ORCPT).
//! A DSN is itself queued from the null reverse-path `<>`, so it is never bounced again.

use chrono::{DateTime, Utc};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Failed,
    Delayed,
    Delivered,
}

impl Action {
    fn as_str(self) -> &'static str {
        match self {
            Action::Failed => "failed",
            Action::Delayed => "delayed",
            Action::Delivered => "delivered",
        }
    }

    /// The RFC 3461 NOTIFY keyword that asks for this kind of report.
    pub fn notify_keyword(self) -> &'static str {
        match self {
            Action::Failed => "FAILURE",
            Action::Delayed => "DELAY",
            Action::Delivered => "SUCCESS",
        }
    }
}

/// Does the recipient's NOTIFY (comma-separated, empty = default) ask for `action`?
/// The default is FAILURE and DELAY (RFC 3461 §4.1 leaves DELAY to the MTA; we send it).
pub fn wants(notify: &str, action: Action) -> bool {
    let words: Vec<String> = notify
        .split(',')
        .map(|w| w.trim().to_ascii_uppercase())
        .filter(|w| !w.is_empty())
        .collect();
    if words.is_empty() {
        return action != Action::Delivered;
    }
    if words.iter().any(|w| w == "NEVER") {
        return false;
    }
    words.iter().any(|w| w == action.notify_keyword())
}

#[derive(Debug, Clone)]
pub struct RecipientReport {
    pub address: String,
    /// "rfc822;addr" as given with ORCPT, or empty.
    pub orcpt: String,
    pub action: Action,
    /// The SMTP reply or local diagnostic, e.g. "550 5.1.1 no such user".
    pub diagnostic: String,
    pub remote_mta: String,
    pub last_attempt: DateTime<Utc>,
    pub will_retry_until: Option<DateTime<Utc>>,
}

pub struct Report<'a> {
    pub reporting_mta: &'a str,
    pub return_path: &'a str,
    pub envid: &'a str,
    /// 1 FULL, 2 HDRS, 0 unspecified.
    pub ret: i32,
    pub arrival: DateTime<Utc>,
    pub original: &'a [u8],
    pub recipients: &'a [RecipientReport],
    /// Above this size the original is returned as headers only, whatever RET says.
    pub max_full_bytes: usize,
}

/// The RFC 3463 status in a reply ("550 5.1.1 ..." → "5.1.1"), or a generic one by class.
pub fn status_of(action: Action, diagnostic: &str) -> String {
    let code = diagnostic.split_whitespace().next().unwrap_or("");
    // "550 5.1.1 text" from a server, or "4.4.1 text" from us.
    for esc in diagnostic.split_whitespace().take(2) {
        let parts: Vec<&str> = esc.split('.').collect();
        if parts.len() == 3
            && matches!(parts[0], "2" | "4" | "5")
            && parts[1..]
                .iter()
                .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
        {
            return esc.to_string();
        }
    }
    match (action, code.as_bytes().first()) {
        (Action::Delivered, _) => "2.0.0".into(),
        (Action::Delayed, _) => "4.0.0".into(),
        (Action::Failed, Some(b'4')) => "4.0.0".into(),
        (Action::Failed, _) => "5.0.0".into(),
    }
}

fn header_end(msg: &[u8]) -> usize {
    msg.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
        .or_else(|| msg.windows(2).position(|w| w == b"\n\n").map(|p| p + 2))
        .unwrap_or(msg.len())
}

/// Remove CR/LF so a value cannot start a new header field.
fn one_line(s: &str) -> String {
    s.replace(['\r', '\n'], " ")
}

/// Build the DSN message bytes (CRLF line endings).
pub fn build(r: &Report<'_>, message_id: &str) -> Vec<u8> {
    let now = Utc::now();
    let boundary = format!("dsn-{}", uuid::Uuid::new_v4().simple());
    let action = r
        .recipients
        .first()
        .map(|x| x.action)
        .unwrap_or(Action::Failed);
    let subject = match action {
        Action::Failed => "Undelivered Mail Returned to Sender",
        Action::Delayed => "Delayed Mail (still being retried)",
        Action::Delivered => "Successful Mail Delivery Report",
    };
    let mut m = String::new();
    m.push_str(&format!(
        "From: Mail Delivery System <MAILER-DAEMON@{}>\r\n",
        r.reporting_mta
    ));
    // Quoted like on the wire (`"john doe"@x`), so the field stays one valid address.
    let to = crate::smtp::smtp_path(r.return_path).unwrap_or_else(|_| one_line(r.return_path));
    m.push_str(&format!("To: <{to}>\r\n"));
    m.push_str(&format!("Subject: {subject}\r\n"));
    m.push_str(&format!("Date: {}\r\n", now.to_rfc2822()));
    m.push_str(&format!("Message-ID: <{message_id}>\r\n"));
    m.push_str("Auto-Submitted: auto-replied\r\n");
    m.push_str("MIME-Version: 1.0\r\n");
    m.push_str(&format!(
        "Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\"\r\n\r\n"
    ));
    m.push_str("This is a MIME-encapsulated message.\r\n\r\n");

    // Human-readable part.
    m.push_str(&format!(
        "--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    ));
    match action {
        Action::Failed => m.push_str(&format!(
            "This is the mail system at {}.\r\n\r\nYour message could not be delivered to one or more recipients.\r\nIt is attached below.\r\n\r\n",
            r.reporting_mta
        )),
        Action::Delayed => m.push_str(&format!(
            "This is the mail system at {}.\r\n\r\nYour message has not been delivered yet to the recipients below.\r\nDelivery will be retried; you do not need to resend it.\r\n\r\n",
            r.reporting_mta
        )),
        Action::Delivered => m.push_str(&format!(
            "This is the mail system at {}.\r\n\r\nYour message was delivered to the recipients below.\r\n\r\n",
            r.reporting_mta
        )),
    }
    for rc in r.recipients {
        m.push_str(&format!(
            "<{}>: {}\r\n",
            one_line(&rc.address),
            one_line(&rc.diagnostic)
        ));
    }
    m.push_str("\r\n");

    // Machine-readable part (RFC 3464 §2).
    m.push_str(&format!(
        "--{boundary}\r\nContent-Type: message/delivery-status\r\n\r\n"
    ));
    m.push_str(&format!("Reporting-MTA: dns; {}\r\n", r.reporting_mta));
    if !r.envid.is_empty() {
        m.push_str(&format!("Original-Envelope-Id: {}\r\n", one_line(r.envid)));
    }
    m.push_str(&format!("Arrival-Date: {}\r\n", r.arrival.to_rfc2822()));
    for rc in r.recipients {
        m.push_str("\r\n");
        if !rc.orcpt.is_empty() {
            m.push_str(&format!("Original-Recipient: {}\r\n", one_line(&rc.orcpt)));
        }
        m.push_str(&format!(
            "Final-Recipient: rfc822; {}\r\n",
            one_line(&rc.address)
        ));
        m.push_str(&format!("Action: {}\r\n", rc.action.as_str()));
        m.push_str(&format!(
            "Status: {}\r\n",
            status_of(rc.action, &rc.diagnostic)
        ));
        if !rc.remote_mta.is_empty() {
            m.push_str(&format!(
                "Remote-MTA: dns; {}\r\n",
                one_line(&rc.remote_mta)
            ));
        }
        if !rc.diagnostic.is_empty() {
            let kind = if rc
                .diagnostic
                .as_bytes()
                .first()
                .is_some_and(u8::is_ascii_digit)
            {
                "smtp"
            } else {
                "x-mailsuite"
            };
            m.push_str(&format!(
                "Diagnostic-Code: {kind}; {}\r\n",
                one_line(&rc.diagnostic)
            ));
        }
        m.push_str(&format!(
            "Last-Attempt-Date: {}\r\n",
            rc.last_attempt.to_rfc2822()
        ));
        if let Some(until) = rc.will_retry_until {
            m.push_str(&format!("Will-Retry-Until: {}\r\n", until.to_rfc2822()));
        }
    }
    m.push_str("\r\n");

    // The original: the whole message for RET=FULL (and by default for failures), else
    // its header only.
    let full = action == Action::Failed && r.ret != 2 && r.original.len() <= r.max_full_bytes;
    let mut out = m.into_bytes();
    if full {
        out.extend_from_slice(
            format!("--{boundary}\r\nContent-Type: message/rfc822\r\n\r\n").as_bytes(),
        );
        out.extend_from_slice(r.original);
        if !r.original.ends_with(b"\n") {
            out.extend_from_slice(b"\r\n");
        }
    } else {
        out.extend_from_slice(
            format!("--{boundary}\r\nContent-Type: text/rfc822-headers\r\n\r\n").as_bytes(),
        );
        let h = &r.original[..header_end(r.original)];
        out.extend_from_slice(h);
        if !h.ends_with(b"\n") {
            out.extend_from_slice(b"\r\n");
        }
    }
    out.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use mail_parser::MimeHeaders;

    #[test]
    fn notify_rules() {
        assert!(wants("", Action::Failed));
        assert!(wants("", Action::Delayed));
        assert!(!wants("", Action::Delivered));
        assert!(!wants("NEVER", Action::Failed));
        assert!(wants("SUCCESS,FAILURE", Action::Delivered));
        assert!(!wants("SUCCESS", Action::Failed));
        assert!(wants("delay", Action::Delayed));
    }

    #[test]
    fn status_from_reply() {
        assert_eq!(status_of(Action::Failed, "550 5.1.1 no such user"), "5.1.1");
        assert_eq!(status_of(Action::Failed, "550 no such user"), "5.0.0");
        assert_eq!(status_of(Action::Delayed, "451 try later"), "4.0.0");
        assert_eq!(status_of(Action::Failed, "connection refused"), "5.0.0");
        assert_eq!(status_of(Action::Delayed, "4.4.1 mx: refused"), "4.4.1");
    }

    #[test]
    fn report_structure_parses() {
        let original = b"From: a@x.test\r\nSubject: hi\r\n\r\nbody\r\n";
        let rcpts = vec![RecipientReport {
            address: "bob@remote.test".into(),
            orcpt: "rfc822;bob@remote.test".into(),
            action: Action::Failed,
            diagnostic: "550 5.1.1 unknown\r\nInjected: x".into(),
            remote_mta: "mx.remote.test".into(),
            last_attempt: Utc::now(),
            will_retry_until: None,
        }];
        let dsn = build(
            &Report {
                reporting_mta: "mx.local.test",
                return_path: "a@x.test",
                envid: "ENV1",
                ret: 2,
                arrival: Utc::now(),
                original,
                recipients: &rcpts,
                max_full_bytes: 1 << 20,
            },
            "id@mx.local.test",
        );
        let text = String::from_utf8(dsn.clone()).unwrap();
        assert!(
            !text.contains("\r\nInjected:"),
            "a reply cannot add header fields"
        );
        let msg = mail_parser::MessageParser::new().parse(&dsn).unwrap();
        assert_eq!(msg.content_type().unwrap().ctype(), "multipart");
        assert_eq!(msg.content_type().unwrap().subtype(), Some("report"));
        assert_eq!(
            msg.parts.len(),
            4,
            "root + text + delivery-status + headers"
        );
        assert!(text.contains("Status: 5.1.1\r\n"));
        assert!(text.contains("Original-Envelope-Id: ENV1\r\n"));
        assert!(text.contains("text/rfc822-headers"), "RET=HDRS honoured");
        assert!(!text.contains("\r\nbody\r\n"), "RET=HDRS omits the body");
    }
}
