//! Table tests of the state machine against an in-memory backend.

use std::collections::HashMap;
use std::sync::Mutex;

use mailsuite_proto::{
    Account, DeliverResponse, EnqueueResponse, ExpandResponse, ExpandedMember, RecipientResult,
    ResolveResponse,
};
use mailsuite_runtime::ServiceError;

use super::*;
use crate::backend::BResult;
use crate::codec::{BareLineEnd, DataReader, parse_command};

#[derive(Default)]
struct Fake {
    /// address → (kind, moved_to, remote_targets)
    dir: HashMap<String, (AddressKind, String, Vec<String>)>,
    online: Vec<String>,
    delivered: Mutex<Vec<(DeliverHeader, Vec<u8>)>>,
    enqueued: Mutex<Vec<(EnqueueHeader, Vec<u8>)>>,
    alerts: Mutex<Vec<(String, String)>>,
    /// Fail the next N deliveries with Unavailable.
    fail_deliver: Mutex<u32>,
    /// Every address asked of `resolve`, in order.
    resolved: Mutex<Vec<String>>,
}

fn fake() -> Fake {
    let mut f = Fake::default();
    let mut add = |a: &str, k: AddressKind, m: &str, r: &[&str]| {
        f.dir.insert(
            a.to_string(),
            (k, m.to_string(), r.iter().map(|s| s.to_string()).collect()),
        );
    };
    add("alice@local.test", AddressKind::Account, "", &[]);
    add("bob@local.test", AddressKind::Account, "", &[]);
    add("nobody@local.test", AddressKind::Unknown, "", &[]);
    add(
        "gone@local.test",
        AddressKind::Moved,
        "carol@elsewhere.example",
        &[],
    );
    add("off@local.test", AddressKind::Disabled, "", &[]);
    add(
        "fwd@local.test",
        AddressKind::Alias,
        "",
        &["x@remote.example"],
    );
    add("staff@local.test", AddressKind::List, "", &[]);
    f.online.push("bob@local.test".into());
    f
}

impl Backend for Fake {
    async fn resolve(&self, address: &str) -> BResult<ResolveResponse> {
        self.resolved.lock().unwrap().push(address.to_string());
        let mut r = ResolveResponse::default();
        match self.dir.get(address) {
            Some((k, moved, remote)) => {
                r.set_kind(*k);
                r.moved_to = moved.clone();
                r.remote_targets = remote.clone();
                r.canonical = address.to_string();
                r.display_name = "Alice Example".into();
            }
            None if address.ends_with("@local.test") => r.set_kind(AddressKind::Unknown),
            None => r.set_kind(AddressKind::Remote),
        }
        Ok(r)
    }
    async fn authenticate(&self, u: &str, p: &str, _: &str) -> BResult<Option<Account>> {
        Ok((u == "alice@local.test" && p == "secret").then(|| Account {
            id: 1,
            address: u.to_string(),
            ..Default::default()
        }))
    }
    async fn check_sender(&self, id: i64, a: &str) -> BResult<bool> {
        Ok(id == 1 && a == "alice@local.test")
    }
    async fn expand(&self, a: &str) -> BResult<ExpandResponse> {
        let mut r = ExpandResponse::default();
        if a == "staff@local.test" {
            r.set_kind(AddressKind::List);
            r.members = vec![
                ExpandedMember {
                    address: "alice@local.test".into(),
                    display_name: "Alice".into(),
                },
                ExpandedMember {
                    address: "bob@local.test".into(),
                    display_name: String::new(),
                },
            ];
        }
        Ok(r)
    }
    async fn deliver(&self, h: DeliverHeader, body: Bytes) -> BResult<DeliverResponse> {
        {
            let mut f = self.fail_deliver.lock().unwrap();
            if *f > 0 {
                *f -= 1;
                return Err(ServiceError::Unavailable("down".into()));
            }
        }
        let results = h
            .recipients
            .iter()
            .map(|r| RecipientResult {
                recipient: r.clone(),
                status: RecipientStatus::Delivered as i32,
                ..Default::default()
            })
            .collect();
        self.delivered.lock().unwrap().push((h, body.to_vec()));
        Ok(DeliverResponse {
            results,
            ..Default::default()
        })
    }
    async fn enqueue(&self, h: EnqueueHeader, body: Bytes) -> BResult<EnqueueResponse> {
        self.enqueued.lock().unwrap().push((h, body.to_vec()));
        Ok(EnqueueResponse::default())
    }
    async fn alert(&self, a: &str, t: &str) -> BResult<bool> {
        self.alerts.lock().unwrap().push((a.into(), t.into()));
        Ok(self.online.iter().any(|o| o == a))
    }
    async fn online(&self, a: &str) -> BResult<bool> {
        Ok(self.online.iter().any(|o| o == a))
    }
    async fn flush(&self, d: &str) -> BResult<u32> {
        if d == "down.example" {
            Err(ServiceError::Unavailable("queue".into()))
        } else {
            Ok(3)
        }
    }
}

fn config() -> Config {
    let mut c = Config {
        hostname: "mx.local.test".into(),
        ..Config::default()
    };
    c.limits.max_recipients = 3;
    c.limits.max_errors = 50;
    c.limits.auth_failure_delay_ms = 1;
    c
}

fn session_with(port: Port, tls: bool, config: Config, backend: Fake) -> Session<Fake> {
    let shared = shared_with(config, backend);
    let tls = tls.then(|| TlsInfo {
        version: "TLSv1.3".into(),
        cipher: "TLS13_AES_128_GCM_SHA256".into(),
    });
    Session::new(shared, port, "192.0.2.9:4000".parse().unwrap(), tls)
}

fn shared_with(config: Config, backend: Fake) -> Arc<Shared<Fake>> {
    Arc::new(Shared {
        rates: RateLimiter::new(&config.limits),
        config,
        backend,
        verifier: None,
        tls_available: true,
        body_budget: crate::budget::BodyBudget::new(1 << 30, 1 << 30),
        local_domains: crate::domains::DomainCache::new(
            std::time::Duration::from_secs(30),
            crate::domains::MAX_DOMAINS,
        ),
    })
}

fn session(port: Port, tls: bool) -> Session<Fake> {
    session_with(port, tls, config(), fake())
}

/// Feed a command line; returns the reply code (0 when none) and the outcome.
async fn line(s: &mut Session<Fake>, l: &str) -> (u16, Outcome) {
    let o = match parse_command(l.as_bytes()) {
        Ok(c) => s.command(c).await,
        Err(e) => s.bad_command(e),
    };
    (o.reply.as_ref().map_or(0, |r| r.code), o)
}

async fn code(s: &mut Session<Fake>, l: &str) -> u16 {
    line(s, l).await.0
}

async fn send_body(s: &mut Session<Fake>, data: &[u8]) -> Outcome {
    let mut r = DataReader::new(s.max_message_bytes(), BareLineEnd::Reject);
    let (_, end) = r.feed(data);
    s.data_end(r.take_body(), end.expect("complete body")).await
}

#[derive(Clone, Copy, Debug)]
enum State {
    Fresh,
    Greeted,
    Mail,
    Rcpt,
}

async fn in_state(st: State) -> Session<Fake> {
    let mut s = session(Port::Mx, false);
    let prefix: &[&str] = match st {
        State::Fresh => &[],
        State::Greeted => &["EHLO client.example"],
        State::Mail => &["EHLO client.example", "MAIL FROM:<x@remote.example>"],
        State::Rcpt => &[
            "EHLO client.example",
            "MAIL FROM:<x@remote.example>",
            "RCPT TO:<alice@local.test>",
        ],
    };
    for p in prefix {
        let c = code(&mut s, p).await;
        assert!(c < 400, "{p} → {c}");
    }
    s
}

#[tokio::test]
async fn command_by_state_table() {
    use State::*;
    let table: &[(&str, [u16; 4])] = &[
        // command                           Fresh Greeted Mail Rcpt
        ("HELO c.example", [250, 250, 250, 250]),
        ("EHLO c.example", [250, 250, 250, 250]),
        ("MAIL FROM:<y@remote.example>", [503, 250, 503, 503]),
        ("RCPT TO:<alice@local.test>", [503, 503, 250, 250]),
        ("DATA", [503, 503, 503, 354]),
        ("RSET", [250, 250, 250, 250]),
        ("NOOP", [250, 250, 250, 250]),
        ("HELP", [214, 214, 214, 214]),
        ("HELP STATUS", [211, 211, 211, 211]),
        ("VRFY alice@local.test", [252, 252, 252, 252]),
        ("EXPN staff@local.test", [550, 550, 550, 550]),
        ("TURN", [502, 502, 502, 502]),
        // Unauthenticated and not allow-listed (L2).
        ("ETRN remote.example", [503, 459, 503, 503]),
        ("ETRN #queue", [503, 459, 503, 503]),
        ("STARTTLS", [220, 220, 503, 503]),
        (
            "AUTH PLAIN AGFsaWNlQGxvY2FsLnRlc3QAc2VjcmV0",
            [503, 503, 503, 503],
        ),
        ("SEND FROM:<y@remote.example>", [502, 502, 502, 502]),
        ("SOML FROM:<y@remote.example>", [502, 502, 502, 502]),
        ("SAML FROM:<y@remote.example>", [502, 502, 502, 502]),
        ("QUIT", [221, 221, 221, 221]),
        ("FOO", [500, 500, 500, 500]),
        ("MAIL FROM:<y@remote.example> FOO=BAR", [555, 555, 555, 555]),
        ("MAIL FROM:y", [501, 501, 501, 501]),
    ];
    for (cmd, codes) in table {
        for (st, want) in [Fresh, Greeted, Mail, Rcpt].into_iter().zip(codes) {
            let mut s = in_state(st).await;
            let got = code(&mut s, cmd).await;
            assert_eq!(got, *want, "{cmd:?} in {st:?}");
        }
    }
}

/// L2: ETRN for allow-listed clients (the session's peer is 192.0.2.9) and authenticated
/// sessions only, at `limits.max_etrn_per_ip_per_minute`.
#[tokio::test]
async fn l2_etrn_allow_list_and_rate() {
    let mut c = config();
    c.policy.etrn_allowed_clients = vec!["192.0.2.0/28".parse().unwrap()];
    c.limits.max_etrn_per_ip_per_minute = 3;
    let mut s = session_with(Port::Mx, false, c, fake());
    let (_, o) = line(&mut s, "EHLO client.example").await;
    assert!(o.reply.unwrap().lines.iter().any(|l| l == "ETRN"));
    assert_eq!(code(&mut s, "ETRN remote.example").await, 250);
    assert_eq!(code(&mut s, "ETRN down.example").await, 458);
    assert_eq!(code(&mut s, "ETRN #queue").await, 459);
    assert_eq!(code(&mut s, "ETRN remote.example").await, 250);
    let (c, o) = line(&mut s, "ETRN remote.example").await;
    assert_eq!(c, 458, "rate limited");
    assert!(o.reply.unwrap().lines[0].starts_with("4.7.0"));

    let mut c = config();
    c.policy.etrn_allowed_clients = vec!["192.0.2.16/28".parse().unwrap()];
    let mut s = session_with(Port::Mx, false, c, fake());
    let (_, o) = line(&mut s, "EHLO client.example").await;
    assert!(!o.reply.unwrap().lines.iter().any(|l| l == "ETRN"));
    let (c, o) = line(&mut s, "ETRN remote.example").await;
    assert_eq!(c, 459);
    assert!(o.reply.unwrap().lines[0].starts_with("4.7.1"));

    let mut s = session(Port::Submission, true);
    assert_eq!(code(&mut s, "EHLO client.example").await, 250);
    assert_eq!(code(&mut s, "ETRN remote.example").await, 459);
    assert_eq!(
        code(&mut s, "AUTH PLAIN AGFsaWNlQGxvY2FsLnRlc3QAc2VjcmV0").await,
        235
    );
    assert_eq!(code(&mut s, "ETRN remote.example").await, 250);
}

#[tokio::test]
async fn quit_closes_and_starttls_upgrades() {
    let mut s = in_state(State::Greeted).await;
    assert_eq!(line(&mut s, "QUIT").await.1.next, Next::Close);
    let mut s = in_state(State::Greeted).await;
    assert_eq!(line(&mut s, "STARTTLS").await.1.next, Next::StartTls);
    s.tls_established(TlsInfo {
        version: "TLSv1.3".into(),
        cipher: "X".into(),
    });
    // RFC 3207: the client must greet again.
    assert_eq!(code(&mut s, "MAIL FROM:<y@remote.example>").await, 503);
    assert_eq!(code(&mut s, "EHLO c").await, 250);
    assert_eq!(code(&mut s, "STARTTLS").await, 503, "already TLS");
}

#[tokio::test]
async fn ehlo_advertises_extensions() {
    let mut s = session(Port::Submission, true);
    let (_, o) = line(&mut s, "EHLO c.example").await;
    let text = o.reply.unwrap().lines.join("\n");
    for ext in [
        "PIPELINING",
        "SIZE ",
        "8BITMIME",
        "SMTPUTF8",
        "ENHANCEDSTATUSCODES",
        "CHUNKING",
        "BINARYMIME",
        "DSN",
        "AUTH PLAIN LOGIN",
    ] {
        assert!(text.contains(ext), "{ext} missing in {text}");
    }
    assert!(!text.contains("STARTTLS"), "not offered inside TLS");
    let mut s = session(Port::Submission, false);
    let (_, o) = line(&mut s, "EHLO c.example").await;
    let text = o.reply.unwrap().lines.join("\n");
    assert!(
        text.contains("STARTTLS") && !text.contains("AUTH"),
        "{text}"
    );
}

#[tokio::test]
async fn mx_recipient_policy() {
    let mut s = in_state(State::Mail).await;
    let cases = [
        ("RCPT TO:<alice@local.test>", 250),
        ("RCPT TO:<nobody@local.test>", 550),
        ("RCPT TO:<whoever@local.test>", 550),
        ("RCPT TO:<gone@local.test>", 551),
        ("RCPT TO:<off@local.test>", 550),
        ("RCPT TO:<fwd@local.test>", 251),
        ("RCPT TO:<someone@remote.example>", 554),
    ];
    for (c, want) in cases {
        let (got, o) = line(&mut s, c).await;
        assert_eq!(got, want, "{c}: {o:?}");
    }
    let (_, o) = line(&mut s, "RCPT TO:<gone@local.test>").await;
    assert!(o.reply.unwrap().lines[0].contains("carol@elsewhere.example"));
}

#[tokio::test]
async fn too_many_recipients() {
    let mut s = in_state(State::Rcpt).await;
    assert_eq!(code(&mut s, "RCPT TO:<bob@local.test>").await, 250);
    assert_eq!(code(&mut s, "RCPT TO:<alice@local.test>").await, 250);
    let (c, o) = line(&mut s, "RCPT TO:<bob@local.test>").await;
    assert_eq!(c, 452);
    assert!(o.reply.unwrap().lines[0].starts_with("4.5.3"));
}

/// Whether a sender's domain is ours is asked once per domain, not once per message.
#[tokio::test]
async fn sender_domain_check_is_remembered_per_domain() {
    let mut s = in_state(State::Greeted).await;
    for from in [
        "MAIL FROM:<a@remote.example>",
        "MAIL FROM:<b@Remote.Example>",
    ] {
        assert_eq!(code(&mut s, from).await, 250);
        assert_eq!(code(&mut s, "RSET").await, 250);
    }
    assert_eq!(code(&mut s, "MAIL FROM:<alice@local.test>").await, 553);
    assert_eq!(code(&mut s, "MAIL FROM:<forged@LOCAL.test>").await, 553);
    assert_eq!(
        *s.shared.backend.resolved.lock().unwrap(),
        vec!["a@remote.example", "alice@local.test"]
    );
}

#[tokio::test]
async fn spoofed_local_sender_refused_on_mx() {
    let mut s = in_state(State::Greeted).await;
    assert_eq!(code(&mut s, "MAIL FROM:<alice@local.test>").await, 553);
    assert_eq!(code(&mut s, "MAIL FROM:<>").await, 250);
}

#[tokio::test]
async fn submission_requires_tls_then_auth_then_owned_sender() {
    let mut s = session(Port::Submission, false);
    code(&mut s, "EHLO c").await;
    assert_eq!(code(&mut s, "MAIL FROM:<alice@local.test>").await, 530);
    assert_eq!(
        code(&mut s, "AUTH PLAIN AGFsaWNlQGxvY2FsLnRlc3QAc2VjcmV0").await,
        538
    );
    let mut s = session(Port::Submission, true);
    code(&mut s, "EHLO c").await;
    assert_eq!(code(&mut s, "MAIL FROM:<alice@local.test>").await, 530);
    let (c, o) = line(&mut s, "AUTH PLAIN AGFsaWNlQGxvY2FsLnRlc3QAd3Jvbmc=").await;
    assert_eq!(c, 535);
    assert!(matches!(o.next, Next::Delay(_)));
    assert_eq!(
        code(&mut s, "AUTH PLAIN AGFsaWNlQGxvY2FsLnRlc3QAc2VjcmV0").await,
        235
    );
    assert_eq!(
        code(&mut s, "AUTH PLAIN AGFsaWNlQGxvY2FsLnRlc3QAc2VjcmV0").await,
        503
    );
    assert_eq!(code(&mut s, "MAIL FROM:<bob@local.test>").await, 553);
    assert_eq!(code(&mut s, "MAIL FROM:<alice@local.test>").await, 250);
    // Authenticated: relaying is allowed.
    assert_eq!(code(&mut s, "RCPT TO:<x@remote.example>").await, 250);
}

#[tokio::test]
async fn auth_login_and_plain_challenge() {
    let mut s = session(Port::Submissions, true);
    code(&mut s, "EHLO c").await;
    let (c, o) = line(&mut s, "AUTH LOGIN").await;
    assert_eq!((c, o.next), (334, Next::AuthLine));
    let o = s.auth_line(B64.encode("alice@local.test").as_bytes()).await;
    assert_eq!(o.reply.unwrap().code, 334);
    let o = s.auth_line(B64.encode("secret").as_bytes()).await;
    assert_eq!(o.reply.unwrap().code, 235);
    assert!(s.authenticated().is_some());

    let mut s = session(Port::Submissions, true);
    code(&mut s, "EHLO c").await;
    assert_eq!(code(&mut s, "AUTH PLAIN").await, 334);
    assert_eq!(s.auth_line(b"*").await.reply.unwrap().code, 501);
    assert_eq!(code(&mut s, "AUTH CRAM-MD5").await, 504);
    assert_eq!(code(&mut s, "AUTH PLAIN").await, 334);
    assert_eq!(s.auth_line(b"!!notbase64").await.reply.unwrap().code, 501);
}

#[tokio::test]
async fn plaintext_auth_on_loopback_only_when_allowed() {
    let mut cfg = config();
    cfg.auth.allow_plaintext_loopback = true;
    let shared = Arc::new(Shared {
        rates: RateLimiter::new(&cfg.limits),
        config: cfg,
        backend: fake(),
        verifier: None,
        tls_available: true,
        body_budget: crate::budget::BodyBudget::new(1 << 30, 1 << 30),
        local_domains: crate::domains::DomainCache::new(
            std::time::Duration::from_secs(30),
            crate::domains::MAX_DOMAINS,
        ),
    });
    let mut s = Session::new(
        shared.clone(),
        Port::Submission,
        "127.0.0.1:1".parse().unwrap(),
        None,
    );
    code(&mut s, "EHLO c").await;
    assert_eq!(
        code(&mut s, "AUTH PLAIN AGFsaWNlQGxvY2FsLnRlc3QAc2VjcmV0").await,
        235
    );
    let mut s = Session::new(
        shared,
        Port::Submission,
        "192.0.2.1:1".parse().unwrap(),
        None,
    );
    code(&mut s, "EHLO c").await;
    assert_eq!(
        code(&mut s, "AUTH PLAIN AGFsaWNlQGxvY2FsLnRlc3QAc2VjcmV0").await,
        538
    );
}

#[tokio::test]
async fn auth_failures_per_ip_end_in_421() {
    let mut cfg = config();
    cfg.limits.max_auth_failures_per_ip = 2;
    let mut s = session_with(Port::Submissions, true, cfg, fake());
    code(&mut s, "EHLO c").await;
    let mut delays = Vec::new();
    for _ in 0..2 {
        let (c, o) = line(&mut s, "AUTH PLAIN AGFsaWNlQGxvY2FsLnRlc3QAd3Jvbmc=").await;
        assert_eq!(c, 535);
        let Next::Delay(d) = o.next else { panic!() };
        delays.push(d);
    }
    assert!(delays[1] > delays[0], "the delay grows: {delays:?}");
    let (c, o) = line(&mut s, "AUTH PLAIN AGFsaWNlQGxvY2FsLnRlc3QAd3Jvbmc=").await;
    assert_eq!((c, o.next), (421, Next::Close));
}

#[tokio::test]
async fn data_is_delivered_with_trace_headers() {
    let mut s = in_state(State::Rcpt).await;
    code(&mut s, "DATA").await;
    let o = send_body(&mut s, b"Subject: hi\r\n\r\nbody\r\n.\r\n").await;
    let r = o.reply.unwrap();
    assert_eq!(r.code, 250, "{r:?}");
    let d = s.shared.backend.delivered.lock().unwrap();
    let (h, body) = &d[0];
    assert_eq!(h.recipients, vec!["alice@local.test"]);
    // The RCPT-time resolution goes along, so the store need not resolve again.
    assert_eq!(h.resolved.len(), 1);
    assert_eq!(h.resolved[0].kind(), AddressKind::Account);
    assert_eq!(h.return_path, "x@remote.example");
    assert!(h.add_delivery_headers);
    assert!(r.lines[0].contains(&h.idempotency_key));
    let text = String::from_utf8_lossy(body);
    assert!(text.starts_with("Received: from client.example ([192.0.2.9])\r\n\tby mx.local.test (mailsuite) with ESMTP id "), "{text}");
    assert!(text.contains("for <alice@local.test>;"), "{text}");
    assert!(text.ends_with("Subject: hi\r\n\r\nbody\r\n"));
}

#[tokio::test]
async fn deliver_is_retried_once_then_451() {
    let f = fake();
    *f.fail_deliver.lock().unwrap() = 1;
    let mut s = session_with(Port::Mx, false, config(), f);
    for l in [
        "EHLO c",
        "MAIL FROM:<x@remote.example>",
        "RCPT TO:<alice@local.test>",
        "DATA",
    ] {
        code(&mut s, l).await;
    }
    assert_eq!(
        send_body(&mut s, b"x\r\n.\r\n").await.reply.unwrap().code,
        250
    );
    let keys: Vec<String> = vec![
        s.shared.backend.delivered.lock().unwrap()[0]
            .0
            .idempotency_key
            .clone(),
    ];
    assert_eq!(keys.len(), 1);

    let f = fake();
    *f.fail_deliver.lock().unwrap() = 2;
    let mut s = session_with(Port::Mx, false, config(), f);
    for l in [
        "EHLO c",
        "MAIL FROM:<x@remote.example>",
        "RCPT TO:<alice@local.test>",
        "DATA",
    ] {
        code(&mut s, l).await;
    }
    let r = send_body(&mut s, b"x\r\n.\r\n").await.reply.unwrap();
    assert_eq!(r.code, 451);
    assert!(r.lines[0].starts_with("4.3.0"));
    assert!(s.shared.backend.delivered.lock().unwrap().is_empty());
}

#[tokio::test]
async fn bare_lf_and_oversize_refused() {
    let mut s = in_state(State::Rcpt).await;
    code(&mut s, "DATA").await;
    let r = send_body(&mut s, b"a\n.\nb\r\n.\r\n").await.reply.unwrap();
    assert_eq!(r.code, 550);
    assert!(r.lines[0].starts_with("5.6.0"));
    assert!(s.shared.backend.delivered.lock().unwrap().is_empty());

    let mut cfg = config();
    cfg.limits.max_message_bytes = 10;
    let mut s = session_with(Port::Mx, false, cfg, fake());
    code(&mut s, "EHLO c").await;
    assert_eq!(
        code(&mut s, "MAIL FROM:<x@remote.example> SIZE=11").await,
        552
    );
    assert_eq!(
        code(&mut s, "MAIL FROM:<x@remote.example> SIZE=10").await,
        250
    );
    code(&mut s, "RCPT TO:<alice@local.test>").await;
    code(&mut s, "DATA").await;
    let r = send_body(&mut s, b"0123456789abc\r\n.\r\n")
        .await
        .reply
        .unwrap();
    assert_eq!(r.code, 552);
}

#[tokio::test]
async fn bdat_chunks_and_binarymime() {
    let mut s = in_state(State::Greeted).await;
    code(&mut s, "MAIL FROM:<x@remote.example> BODY=BINARYMIME").await;
    code(&mut s, "RCPT TO:<alice@local.test>").await;
    assert_eq!(code(&mut s, "DATA").await, 503, "BINARYMIME needs BDAT");
    let (c, o) = line(&mut s, "BDAT 5").await;
    assert_eq!(
        (c, o.next),
        (
            0,
            Next::Bdat {
                size: 5,
                last: false
            }
        )
    );
    s.bdat_sink().unwrap().extend_from_slice(b"ab\ncd");
    assert_eq!(s.bdat_end(5, false).await.reply.unwrap().code, 250);
    line(&mut s, "BDAT 3 LAST").await;
    s.bdat_sink().unwrap().extend_from_slice(b"\x00\r\n");
    assert_eq!(s.bdat_end(3, true).await.reply.unwrap().code, 250);
    {
        let d = s.shared.backend.delivered.lock().unwrap();
        assert!(d[0].1.ends_with(b"ab\ncd\x00\r\n"));
    }
    // BDAT without a transaction: the chunk is read and refused.
    line(&mut s, "BDAT 2 LAST").await;
    assert!(s.bdat_sink().is_none());
    assert_eq!(s.bdat_end(2, true).await.reply.unwrap().code, 503);
}

#[tokio::test]
async fn dsn_parameters_go_to_the_queue() {
    let mut s = session(Port::Submissions, true);
    code(&mut s, "EHLO c").await;
    code(&mut s, "AUTH PLAIN AGFsaWNlQGxvY2FsLnRlc3QAc2VjcmV0").await;
    assert_eq!(
        code(
            &mut s,
            "MAIL FROM:<alice@local.test> RET=HDRS ENVID=abc123 BODY=8BITMIME"
        )
        .await,
        250
    );
    assert_eq!(
        code(
            &mut s,
            "RCPT TO:<x@remote.example> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;x@remote.example"
        )
        .await,
        250
    );
    assert_eq!(
        code(&mut s, "RCPT TO:<bob@local.test> NOTIFY=NEVER").await,
        250
    );
    code(&mut s, "DATA").await;
    assert_eq!(
        send_body(&mut s, b"x\r\n.\r\n").await.reply.unwrap().code,
        250
    );
    let q = s.shared.backend.enqueued.lock().unwrap();
    let (h, body) = &q[0];
    assert_eq!(h.envid, "abc123");
    assert_eq!(h.ret, DsnRet::Hdrs as i32);
    assert!(h.body_8bit);
    assert_eq!(h.submitter, "alice@local.test");
    assert_eq!(h.recipients[0].notify, vec!["SUCCESS", "DELAY"]);
    assert_eq!(h.recipients[0].orcpt, "rfc822;x@remote.example");
    assert_eq!(h.recipients[1].notify, vec!["NEVER"]);
    let text = String::from_utf8_lossy(body);
    assert!(text.contains("with ESMTPSA id"), "{text}");
    assert!(
        text.contains("(version=TLSv1.3 cipher=TLS13_AES_128_GCM_SHA256)"),
        "{text}"
    );
    assert!(
        text.contains(
            "Authentication-Results: mx.local.test; auth=pass smtp.auth=alice@local.test"
        )
    );
    assert!(
        s.shared.backend.delivered.lock().unwrap().is_empty(),
        "one owner: the queue"
    );
}

async fn terminal_session() -> Session<Fake> {
    let mut s = session(Port::Submissions, true);
    code(&mut s, "EHLO c").await;
    code(&mut s, "AUTH PLAIN AGFsaWNlQGxvY2FsLnRlc3QAc2VjcmV0").await;
    s
}

#[tokio::test]
async fn send_soml_saml() {
    // SEND to an online user: alert only.
    let mut s = terminal_session().await;
    assert_eq!(code(&mut s, "SEND FROM:<alice@local.test>").await, 250);
    assert_eq!(
        code(&mut s, "RCPT TO:<x@remote.example>").await,
        550,
        "local users only"
    );
    assert_eq!(code(&mut s, "RCPT TO:<bob@local.test>").await, 250);
    code(&mut s, "DATA").await;
    let r = send_body(&mut s, b"Subject: lunch?\r\n\r\nnow\r\n.\r\n")
        .await
        .reply
        .unwrap();
    assert_eq!(r.code, 250);
    assert_eq!(
        s.shared.backend.alerts.lock().unwrap()[0],
        (
            "bob@local.test".to_string(),
            "Message from alice@local.test: lunch?".to_string()
        )
    );
    assert!(s.shared.backend.delivered.lock().unwrap().is_empty());

    // SEND to an offline user: 450 4.2.1 at RCPT, before any text is sent.
    let mut s = terminal_session().await;
    code(&mut s, "SEND FROM:<alice@local.test>").await;
    let (c, o) = line(&mut s, "RCPT TO:<alice@local.test>").await;
    assert_eq!(c, 450);
    assert!(o.reply.unwrap().lines[0].starts_with("4.2.1"));
    assert_eq!(code(&mut s, "DATA").await, 503, "no recipient was taken");
    assert!(s.shared.backend.alerts.lock().unwrap().is_empty());
    // With an online recipient beside it, the offline one is still refused.
    assert_eq!(code(&mut s, "RCPT TO:<bob@local.test>").await, 250);
    // SOML and SAML take offline recipients (they are mailed).
    let mut s = terminal_session().await;
    code(&mut s, "SOML FROM:<alice@local.test>").await;
    assert_eq!(code(&mut s, "RCPT TO:<alice@local.test>").await, 250);
    let mut s = terminal_session().await;
    code(&mut s, "SAML FROM:<alice@local.test>").await;
    assert_eq!(code(&mut s, "RCPT TO:<alice@local.test>").await, 250);

    // SOML: online → alert only; offline → mail.
    let mut s = terminal_session().await;
    code(&mut s, "SOML FROM:<alice@local.test>").await;
    code(&mut s, "RCPT TO:<bob@local.test>").await;
    code(&mut s, "RCPT TO:<alice@local.test>").await;
    code(&mut s, "DATA").await;
    assert_eq!(
        send_body(&mut s, b"Subject: x\r\n\r\n.\r\n")
            .await
            .reply
            .unwrap()
            .code,
        250
    );
    {
        let d = s.shared.backend.delivered.lock().unwrap();
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].0.recipients, vec!["alice@local.test"]);
    }

    // SAML: alert and mail.
    let mut s = terminal_session().await;
    code(&mut s, "SAML FROM:<alice@local.test>").await;
    code(&mut s, "RCPT TO:<bob@local.test>").await;
    code(&mut s, "DATA").await;
    assert_eq!(
        send_body(&mut s, b"Subject: x\r\n\r\n.\r\n")
            .await
            .reply
            .unwrap()
            .code,
        250
    );
    assert_eq!(s.shared.backend.alerts.lock().unwrap().len(), 1);
    assert_eq!(
        s.shared.backend.delivered.lock().unwrap()[0].0.recipients,
        vec!["bob@local.test"]
    );

    // Disabled by configuration.
    let mut cfg = config();
    cfg.policy.terminal_commands = false;
    let mut s = session_with(Port::Submissions, true, cfg, fake());
    code(&mut s, "EHLO c").await;
    code(&mut s, "AUTH PLAIN AGFsaWNlQGxvY2FsLnRlc3QAc2VjcmV0").await;
    assert_eq!(code(&mut s, "SEND FROM:<alice@local.test>").await, 502);
}

#[tokio::test]
async fn vrfy_and_expn_for_authenticated_users() {
    let mut s = terminal_session().await;
    let (c, o) = line(&mut s, "VRFY alice@local.test").await;
    assert_eq!(c, 250);
    assert_eq!(
        o.reply.unwrap().lines[0],
        "2.1.5 Alice Example <alice@local.test>"
    );
    assert_eq!(code(&mut s, "VRFY nobody@local.test").await, 550);
    assert_eq!(code(&mut s, "VRFY alice").await, 553);
    let (c, o) = line(&mut s, "EXPN staff@local.test").await;
    assert_eq!(c, 250);
    assert_eq!(
        o.reply.unwrap().lines,
        vec!["2.1.5 Alice <alice@local.test>", "2.1.5 <bob@local.test>"]
    );
    assert_eq!(code(&mut s, "EXPN alice@local.test").await, 550);

    let mut cfg = config();
    cfg.policy.expn = false;
    let mut s = session_with(Port::Mx, false, cfg, fake());
    assert_eq!(code(&mut s, "EXPN staff@local.test").await, 502);
}

#[tokio::test]
async fn errors_and_messages_per_session_limits() {
    let mut cfg = config();
    cfg.limits.max_errors = 2;
    let mut s = session_with(Port::Mx, false, cfg, fake());
    assert_eq!(code(&mut s, "FOO").await, 500);
    assert_eq!(code(&mut s, "BAR").await, 500);
    let (c, o) = line(&mut s, "BAZ").await;
    assert_eq!((c, o.next), (421, Next::Close));

    let mut cfg = config();
    cfg.limits.max_messages_per_session = 1;
    let mut s = session_with(Port::Mx, false, cfg, fake());
    for l in [
        "EHLO c",
        "MAIL FROM:<x@remote.example>",
        "RCPT TO:<alice@local.test>",
        "DATA",
    ] {
        code(&mut s, l).await;
    }
    send_body(&mut s, b"x\r\n.\r\n").await;
    let (c, o) = line(&mut s, "MAIL FROM:<x@remote.example>").await;
    assert_eq!((c, o.next), (421, Next::Close));

    let mut cfg = config();
    cfg.limits.max_messages_per_ip_per_minute = 1;
    let mut s = session_with(Port::Mx, false, cfg, fake());
    code(&mut s, "EHLO c").await;
    assert_eq!(code(&mut s, "MAIL FROM:<x@remote.example>").await, 250);
    code(&mut s, "RSET").await;
    let (c, o) = line(&mut s, "MAIL FROM:<x@remote.example>").await;
    assert_eq!(c, 450);
    assert!(o.reply.unwrap().lines[0].starts_with("4.7.1"));
}

#[tokio::test]
async fn line_too_long_is_500() {
    let mut s = session(Port::Mx, false);
    let o = s.bad_command(crate::codec::CommandError::LineTooLong);
    assert_eq!(o.reply.unwrap().serialize(), b"500 5.5.2 Line too long\r\n");
    let o = s.bad_command(crate::codec::CommandError::AuthLineTooLong);
    assert_eq!(
        o.reply.unwrap().serialize(),
        b"500 5.5.6 Authentication Exchange line is too long\r\n"
    );
    assert_eq!(s.shutdown_reply().code, 421);
    assert!(s.shutdown_reply().lines[0].starts_with("4.3.2"));
}

#[test]
fn forged_authentication_results_are_removed() {
    let msg = b"Authentication-Results: mx.local.test; spf=pass\r\n\tdkim=pass\r\nAuthentication-Results: other.example; spf=fail\r\nSubject: x\r\n\r\nAuthentication-Results: mx.local.test; body text\r\n";
    let out = strip_our_auth_results(msg, "mx.local.test");
    assert_eq!(
        &out[..],
        &b"Authentication-Results: other.example; spf=fail\r\nSubject: x\r\n\r\nAuthentication-Results: mx.local.test; body text\r\n"[..]
    );
    let clean = b"Subject: y\r\n\r\nz";
    assert!(matches!(
        strip_our_auth_results(clean, "mx.local.test"),
        std::borrow::Cow::Borrowed(_)
    ));
}

#[tokio::test]
async fn smtputf8_addresses_need_the_parameter() {
    let mut s = in_state(State::Greeted).await;
    assert_eq!(code(&mut s, "MAIL FROM:<josé@remote.example>").await, 553);
    assert_eq!(code(&mut s, "MAIL FROM:<x@remote.example>").await, 250);
    assert_eq!(code(&mut s, "RCPT TO:<zoë@local.test>").await, 553);
    code(&mut s, "RSET").await;
    assert_eq!(
        code(&mut s, "MAIL FROM:<josé@remote.example> SMTPUTF8").await,
        250
    );
    assert_eq!(code(&mut s, "RCPT TO:<alice@local.test>").await, 250);
    code(&mut s, "DATA").await;
    assert_eq!(
        send_body(&mut s, "Subject: é\r\n\r\n.\r\n".as_bytes())
            .await
            .reply
            .unwrap()
            .code,
        250
    );
    let d = s.shared.backend.delivered.lock().unwrap();
    let text = String::from_utf8_lossy(&d[0].1);
    assert!(text.contains("with UTF8SMTP id"), "{text}");
    assert_eq!(d[0].0.return_path, "josé@remote.example");
}

#[tokio::test]
async fn no_auth_and_no_relay_on_the_mx_port() {
    // Even over TLS, where submission would offer it.
    let mut s = session(Port::Mx, true);
    let (_, o) = line(&mut s, "EHLO c.example").await;
    let ehlo = o.reply.unwrap().lines.join("\n");
    assert!(!ehlo.contains("AUTH"), "{ehlo}");
    for cmd in [
        "AUTH PLAIN AGFsaWNlQGxvY2FsLnRlc3QAc2VjcmV0",
        "AUTH LOGIN",
        "AUTH PLAIN",
    ] {
        let (c, o) = line(&mut s, cmd).await;
        assert_eq!(c, 503, "{cmd}");
        assert!(o.reply.unwrap().lines[0].starts_with("5.5.1"));
        assert_eq!(o.next, Next::Continue, "no 334 challenge on 25");
    }
    assert!(s.authenticated().is_none());
    code(&mut s, "MAIL FROM:<x@remote.example>").await;
    let (c, o) = line(&mut s, "RCPT TO:<y@elsewhere.example>").await;
    assert_eq!(c, 554);
    assert!(o.reply.unwrap().lines[0].starts_with("5.7.1"));
    assert_eq!(code(&mut s, "RCPT TO:<alice@local.test>").await, 250);

    // Plaintext loopback AUTH (tests) does not reach the MX port either.
    let mut cfg = config();
    cfg.auth.allow_plaintext_loopback = true;
    let shared = Arc::new(Shared {
        rates: RateLimiter::new(&cfg.limits),
        config: cfg,
        backend: fake(),
        verifier: None,
        tls_available: true,
        body_budget: crate::budget::BodyBudget::new(1 << 30, 1 << 30),
        local_domains: crate::domains::DomainCache::new(
            std::time::Duration::from_secs(30),
            crate::domains::MAX_DOMAINS,
        ),
    });
    let mut s = Session::new(shared, Port::Mx, "127.0.0.1:4000".parse().unwrap(), None);
    code(&mut s, "EHLO c.example").await;
    assert_eq!(
        code(&mut s, "AUTH PLAIN AGFsaWNlQGxvY2FsLnRlc3QAc2VjcmV0").await,
        503
    );
}

#[tokio::test]
async fn null_sender_allowed_for_authenticated_submission() {
    let mut s = session(Port::Submissions, true);
    code(&mut s, "EHLO c").await;
    code(&mut s, "AUTH PLAIN AGFsaWNlQGxvY2FsLnRlc3QAc2VjcmV0").await;
    assert_eq!(code(&mut s, "MAIL FROM:<>").await, 250);
    assert_eq!(code(&mut s, "RCPT TO:<y@remote.example>").await, 250);
    code(&mut s, "DATA").await;
    let r = send_body(&mut s, b"Subject: MDN\r\n\r\nread\r\n.\r\n")
        .await
        .reply
        .unwrap();
    assert_eq!(r.code, 250);
    let q = s.shared.backend.enqueued.lock().unwrap();
    assert_eq!(q[0].0.return_path, "", "null reverse-path kept");
    assert_eq!(q[0].0.submitter, "alice@local.test");
}

/// H2: the header From:/Sender: of an authenticated submission, field by field.
#[tokio::test]
async fn h2_header_senders_table() {
    let mut cfg = config();
    cfg.limits.max_header_sender_addresses = 3;
    let cases: &[(&str, &str)] = &[
        ("From: Alice <alice@local.test>\r\n", "250"),
        ("Subject: no from at all\r\n", "250"),
        (
            "From: alice@local.test\r\nSender: Alice <alice@local.test>\r\n",
            "250",
        ),
        // Folded over two lines, still parsed as one field.
        ("From: \"CEO\"\r\n <ceo@tenant-b.test>\r\n", "550 5.7.1"),
        ("FROM: ceo@tenant-b.test\r\n", "550 5.7.1"),
        ("From: alice@local.test, ceo@tenant-b.test\r\n", "550 5.7.1"),
        (
            "From: alice@local.test\r\nFrom: bob@local.test\r\n",
            "550 5.7.1",
        ),
        (
            "From: alice@local.test\r\nSender: bob@local.test\r\n",
            "550 5.7.1",
        ),
        (
            "From: friends: alice@local.test, bob@local.test;\r\n",
            "550 5.7.1",
        ),
        ("From: undisclosed:;\r\n", "550 5.7.1"),
        ("From:\r\n", "550 5.7.1"),
        ("From: Just A Name\r\n", "550 5.7.1"),
        (
            "From: a@x.test, b@x.test, c@x.test, d@x.test\r\n",
            "550 5.7.1",
        ),
        // A white-space first line: mail-parser alone sees no header section here, but
        // behind our Received:/Authentication-Results: it is a folded continuation and the
        // From: below it a real field.
        (" \r\nFrom: CEO <ceo@tenant-b.test>\r\n", "550 5.6.0"),
        ("\t\r\nFrom: CEO <ceo@tenant-b.test>\r\n", "550 5.6.0"),
        (" x\r\nFrom: alice@local.test\r\n", "550 5.6.0"),
        // An empty header section: the From: is body text, to us and to every receiver.
        ("\r\nFrom: CEO <ceo@tenant-b.test>\r\n", "250"),
    ];
    for (headers, want) in cases {
        let mut s = session_with(Port::Submissions, true, cfg.clone(), fake());
        code(&mut s, "EHLO c").await;
        code(&mut s, "AUTH PLAIN AGFsaWNlQGxvY2FsLnRlc3QAc2VjcmV0").await;
        assert_eq!(code(&mut s, "MAIL FROM:<alice@local.test>").await, 250);
        assert_eq!(code(&mut s, "RCPT TO:<bob@local.test>").await, 250);
        code(&mut s, "DATA").await;
        let body = format!("{headers}Subject: x\r\n\r\nbody\r\n.\r\n");
        let r = send_body(&mut s, body.as_bytes()).await.reply.unwrap();
        let got = format!("{} {}", r.code, r.lines[0]);
        assert!(got.starts_with(want), "{headers:?}: {r:?}");
        if r.code == 250 {
            // What the check passed is what the receivers get: no foreign From: field.
            let stored = s.shared.backend.delivered.lock().unwrap()[0].1.clone();
            let parsed = mail_parser::MessageParser::new()
                .parse_headers(&stored[..])
                .unwrap();
            assert!(
                parsed
                    .from()
                    .into_iter()
                    .flat_map(|f| f.iter())
                    .all(|a| a.address().is_some_and(|x| x.ends_with("@local.test"))),
                "{headers:?}"
            );
        } else {
            assert!(s.shared.backend.delivered.lock().unwrap().is_empty());
        }
    }
    // The MX port has no authenticated user: header From: is not its business here.
    let mut s = in_state(State::Rcpt).await;
    code(&mut s, "DATA").await;
    let r = send_body(&mut s, b"From: ceo@tenant-b.test\r\n\r\nx\r\n.\r\n")
        .await
        .reply
        .unwrap();
    assert_eq!(r.code, 250);
    // But a white-space first line would fold into our trace fields there too.
    let mut s = in_state(State::Rcpt).await;
    code(&mut s, "DATA").await;
    let r = send_body(&mut s, b" dkim=pass\r\nSubject: x\r\n\r\nx\r\n.\r\n")
        .await
        .reply
        .unwrap();
    assert_eq!((r.code, &r.lines[0][..5]), (550, "5.6.0"), "{r:?}");
}

async fn bdat_text(policy: BareLineEnd, mail: &str, chunks: &[&[u8]]) -> (Outcome, Session<Fake>) {
    let mut cfg = config();
    cfg.policy.bare_line_end = policy;
    let mut s = session_with(Port::Mx, false, cfg, fake());
    code(&mut s, "EHLO c").await;
    assert_eq!(code(&mut s, mail).await, 250);
    code(&mut s, "RCPT TO:<alice@local.test>").await;
    let mut last = None;
    for (i, c) in chunks.iter().enumerate() {
        let is_last = i + 1 == chunks.len();
        let cmd = format!("BDAT {}{}", c.len(), if is_last { " LAST" } else { "" });
        line(&mut s, &cmd).await;
        s.bdat_sink().unwrap().extend_from_slice(c);
        last = Some(s.bdat_end(c.len() as u64, is_last).await);
    }
    (last.unwrap(), s)
}

#[tokio::test]
async fn bdat_text_bodies_follow_the_bare_line_end_policy() {
    // A smuggling attempt split over two chunks: the bare LF is the first byte of the second.
    let chunks: &[&[u8]] = &[b"Subject: x\r\n\r\nhi\r", b"\n.\nMAIL FROM:<a@b>\r\n"];
    let (o, s) = bdat_text(BareLineEnd::Reject, "MAIL FROM:<x@remote.example>", chunks).await;
    let r = o.reply.unwrap();
    assert_eq!(r.code, 550);
    assert!(r.lines[0].starts_with("5.6.0"), "{r:?}");
    assert!(s.shared.backend.delivered.lock().unwrap().is_empty());

    let (o, s) = bdat_text(
        BareLineEnd::Normalize,
        "MAIL FROM:<x@remote.example> BODY=8BITMIME",
        chunks,
    )
    .await;
    assert_eq!(o.reply.unwrap().code, 250);
    let stored = s.shared.backend.delivered.lock().unwrap()[0].1.clone();
    assert!(
        stored.ends_with(b"hi\r\n.\r\nMAIL FROM:<a@b>\r\n"),
        "{:?}",
        String::from_utf8_lossy(&stored)
    );

    // Clean CRLF text split at the CR/LF boundary is not mistaken for a bare CR.
    let clean: &[&[u8]] = &[b"Subject: x\r", b"\n\r\nok\r\n"];
    let (o, _) = bdat_text(BareLineEnd::Reject, "MAIL FROM:<x@remote.example>", clean).await;
    assert_eq!(o.reply.unwrap().code, 250);

    // BINARYMIME bodies are opaque: kept byte for byte under either policy.
    let (o, s) = bdat_text(
        BareLineEnd::Reject,
        "MAIL FROM:<x@remote.example> BODY=BINARYMIME",
        chunks,
    )
    .await;
    assert_eq!(o.reply.unwrap().code, 250);
    assert!(
        s.shared.backend.delivered.lock().unwrap()[0]
            .1
            .ends_with(b"hi\r\n.\nMAIL FROM:<a@b>\r\n")
    );
}

mod iprev {
    use super::*;
    use crate::config::{DnsConfig, IprevPolicy};
    use crate::verify::test_dns::TestDns;
    use mail_auth::hickory_resolver::proto::op::ResponseCode;

    #[derive(Clone, Copy, Debug)]
    enum Dns {
        /// PTR mail.good.example, whose A is the client: pass.
        Pass,
        /// PTR liar.example, whose A is elsewhere: fail.
        Fail,
        /// No PTR (NXDOMAIN): permerror.
        NoPtr,
        /// SERVFAIL: temperror.
        Broken,
    }

    const CLIENT: &str = "192.0.2.9";

    async fn verifier(dns: Dns) -> Verifier {
        let server = match dns {
            Dns::Broken => TestDns::new().otherwise(ResponseCode::ServFail),
            _ => TestDns::new(),
        }
        .start()
        .await;
        let cfg = DnsConfig {
            nameservers: vec![server.nameserver()],
            timeout_secs: 2,
        };
        let ip: IpAddr = CLIENT.parse().unwrap();
        let v = Verifier::new(&cfg, "mx.local.test").unwrap();
        match dns {
            Dns::Pass => v
                .with_ptr(ip, &["mail.good.example"])
                .with_addresses("mail.good.example", &[ip]),
            Dns::Fail => v
                .with_ptr(ip, &["liar.example"])
                .with_addresses("liar.example", &["203.0.113.5".parse().unwrap()]),
            Dns::NoPtr | Dns::Broken => v,
        }
    }

    async fn session(port: Port, policy: IprevPolicy, dns: Dns) -> Session<Fake> {
        let mut cfg = config();
        cfg.policy.iprev = policy;
        let shared = Arc::new(Shared {
            rates: RateLimiter::new(&cfg.limits),
            config: cfg,
            backend: fake(),
            verifier: Some(verifier(dns).await),
            tls_available: true,
            body_budget: crate::budget::BodyBudget::new(1 << 30, 1 << 30),
            local_domains: crate::domains::DomainCache::new(
                std::time::Duration::from_secs(30),
                crate::domains::MAX_DOMAINS,
            ),
        });
        let tls = (port != Port::Mx).then(|| TlsInfo {
            version: "TLSv1.3".into(),
            cipher: "TLS13_AES_128_GCM_SHA256".into(),
        });
        Session::new(shared, port, format!("{CLIENT}:4000").parse().unwrap(), tls)
    }

    #[tokio::test]
    async fn policy_table_at_mail() {
        use IprevPolicy::*;
        let table = [
            (Record, [250, 250, 250, 250]),
            (Tempfail, [250, 450, 450, 450]),
            (Reject, [250, 550, 550, 450]),
        ];
        for (policy, codes) in table {
            for (dns, want) in [Dns::Pass, Dns::Fail, Dns::NoPtr, Dns::Broken]
                .into_iter()
                .zip(codes)
            {
                let mut s = session(Port::Mx, policy, dns).await;
                code(&mut s, "EHLO client.example").await;
                let (c, o) = line(&mut s, "MAIL FROM:<x@remote.example>").await;
                assert_eq!(c, want, "{policy:?} {dns:?}: {o:?}");
                if c != 250 {
                    let r = o.reply.unwrap();
                    assert_eq!(
                        r.lines[0].split(' ').next(),
                        Some(if c == 450 { "4.7.25" } else { "5.7.25" }),
                        "{r:?}"
                    );
                    // No transaction was opened, and the answer is the same the next time.
                    assert_eq!(code(&mut s, "RCPT TO:<alice@local.test>").await, 503);
                    assert_eq!(code(&mut s, "MAIL FROM:<x@remote.example>").await, want);
                }
            }
        }
    }

    #[tokio::test]
    async fn submission_is_never_checked() {
        let mut s = session(Port::Submission, IprevPolicy::Reject, Dns::Fail).await;
        code(&mut s, "EHLO client.example").await;
        assert_eq!(
            code(&mut s, "AUTH PLAIN AGFsaWNlQGxvY2FsLnRlc3QAc2VjcmV0").await,
            235
        );
        assert_eq!(code(&mut s, "MAIL FROM:<alice@local.test>").await, 250);
        assert!(s.iprev.is_none(), "no lookup at all on submission");
    }

    async fn deliver_one(s: &mut Session<Fake>) -> String {
        code(s, "EHLO client.example").await;
        assert_eq!(code(s, "MAIL FROM:<x@remote.example>").await, 250);
        assert_eq!(code(s, "RCPT TO:<alice@local.test>").await, 250);
        assert_eq!(code(s, "DATA").await, 354);
        let o = send_body(
            s,
            b"From: x@remote.example\r\nSubject: hi\r\n\r\nbody\r\n.\r\n",
        )
        .await;
        assert_eq!(o.reply.unwrap().code, 250);
        let d = s.shared.backend.delivered.lock().unwrap();
        String::from_utf8_lossy(&d[0].1).into_owned()
    }

    #[tokio::test]
    async fn received_and_authentication_results_carry_the_confirmed_name() {
        let mut s = session(Port::Mx, IprevPolicy::Record, Dns::Pass).await;
        let text = deliver_one(&mut s).await;
        assert!(
            text.starts_with("Received: from client.example (mail.good.example [192.0.2.9])\r\n"),
            "{text}"
        );
        assert!(
            text.contains("iprev=pass policy.iprev=192.0.2.9 (mail.good.example)"),
            "{text}"
        );

        // A name that does not resolve back is never shown as the client's.
        let mut s = session(Port::Mx, IprevPolicy::Record, Dns::Fail).await;
        let text = deliver_one(&mut s).await;
        assert!(
            text.starts_with("Received: from client.example ([192.0.2.9])\r\n"),
            "{text}"
        );
        assert!(text.contains("iprev=fail"), "{text}");
        assert!(!text.contains("liar.example"), "{text}");
    }
}

/// Every connection's task holds its whole future, idle or not: a read buffer or a step's
/// state (a Deliver, an AUTH) held inline would cost every open connection that much memory.
/// Steps and the TLS upgrade are boxed, and reads go straight into the input buffer.
#[tokio::test]
async fn an_idle_connection_future_stays_small() {
    let shared = shared_with(config(), fake());
    let s = Session::new(
        shared.clone(),
        Port::Mx,
        "192.0.2.9:4000".parse().unwrap(),
        None,
    );
    let (a, _b) = tokio::io::duplex(64);
    let io: crate::connection::Stream = mailsuite_runtime::stream::MailStream::Plain(Box::new(a));
    let fut = crate::connection::serve(io, s, shared, None, mailsuite_runtime::Shutdown::new());
    let size = std::mem::size_of_val(&fut);
    assert!(size < 4096, "the connection future is {size} bytes");
}
