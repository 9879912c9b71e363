//! Fuzz line framing, command parsing and the session state machine together. Invariants: no
//! panic, the decoder's memory stays bounded, and every reply is well formed: a status line
//! of at most 512 octets (RFC 2449 §4) with no CR or LF inside, multi-line bodies stuffed.
#![no_main]

#[path = "../../src/codec.rs"]
#[allow(dead_code)]
mod codec;
#[path = "../../src/session.rs"]
#[allow(dead_code)]
mod session;

use codec::{LineDecoder, Reply};
use libfuzzer_sys::fuzz_target;
use session::{Action, LoginError, Maildrop, Message, Session, SessionConfig};

const MAX: usize = 255;

fn check(r: &Reply) {
    let bytes = r.to_bytes();
    assert!(bytes.ends_with(b"\r\n"));
    let status_end = bytes.windows(2).position(|w| w == b"\r\n").unwrap();
    let status = &bytes[..status_end];
    assert!(status.len() + 2 <= 512, "status line too long");
    assert!(!status.contains(&b'\r') && !status.contains(&b'\n'));
    assert!(status.starts_with(b"+OK") || status.starts_with(b"-ERR") || status.starts_with(b"+ "));
    if let Reply::Multi(..) = r {
        assert!(bytes.ends_with(b"\r\n.\r\n"));
        let body = &bytes[status_end + 2..bytes.len() - 3];
        for line in body.split(|&b| b == b'\n') {
            assert!(line != b"." && line != b".\r", "unstuffed terminator");
        }
    }
}

fn maildrop() -> Maildrop {
    Maildrop {
        account_id: 1,
        mailbox_id: 1,
        uidvalidity: 42,
        messages: (1..=3)
            .map(|uid| Message {
                uid,
                size: 100 * uid as u64,
                deleted: false,
                retrieved: false,
            })
            .collect(),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&cfg, input)) = data.split_first() else {
        return;
    };
    let step = (cfg as usize % 16) + 1;
    let mut session = Session::new(
        SessionConfig {
            plaintext_ok: cfg & 0x10 != 0,
            max_bad_commands: 1000,
            max_auth_failures: 1000,
            ..SessionConfig::default()
        },
        cfg & 0x20 != 0,
    );
    let mut decoder = LineDecoder::new(MAX);
    let mut logins = 0u32;
    for piece in input.chunks(step) {
        decoder.feed(piece);
        assert!(decoder.buffered() <= MAX + step);
        while let Some(line) = decoder.next_line() {
            let mut action = session.handle_line(line);
            loop {
                action = match action {
                    Action::Login { .. } => {
                        logins += 1;
                        session.login_done(if logins % 2 == 1 {
                            Ok(maildrop())
                        } else {
                            Err(LoginError::BadCredentials)
                        })
                    }
                    Action::Update { .. } => session.update_done(Ok(())),
                    Action::StartTls(r) => {
                        check(&r);
                        decoder.clear();
                        session.tls_started();
                        break;
                    }
                    Action::Close(r) => {
                        check(&r);
                        return;
                    }
                    Action::Reply(r) | Action::AuthFailed { reply: r, .. } => {
                        check(&r);
                        break;
                    }
                    Action::Send { reply, .. } => {
                        check(&reply);
                        break;
                    }
                };
            }
        }
    }
});
