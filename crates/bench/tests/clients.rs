//! mailbench's protocol clients and commands against an in-test server over real loopback
//! sockets (and real TLS). Every load is bounded in count and time.

mod fake;

use std::time::Duration;

use fake::{Behaviour, Fake};
use mailsuite_bench::cmd::{Common, Security, Users};
use mailsuite_bench::corpus::{self, SizeDist};
use mailsuite_bench::net::TlsArgs;
use mailsuite_bench::{cmd, imap, pop3, smtp};

fn common(tls: TlsArgs) -> Common {
    Common {
        json: true,
        pids: vec![],
        timeout: 10.0,
        tls,
    }
}

fn insecure() -> TlsArgs {
    TlsArgs {
        insecure: true,
        ca: None,
        server_name: None,
    }
}

fn users(n: u64) -> Users {
    Users {
        users: n,
        user_template: "bench{n}@mailbench.test".into(),
        login_template: None,
        password: "password".into(),
    }
}

fn no_tls() -> Security {
    Security {
        tls: false,
        starttls: false,
    }
}

fn opts(fake: &Fake, pipelining: bool) -> smtp::Options {
    smtp::Options {
        server: fake.smtp.to_string(),
        helo: "client.test".into(),
        implicit_tls: None,
        starttls: None,
        auth: None,
        pipelining,
        timeout: Duration::from_secs(5),
    }
}

fn transport(fake: &Fake, connections: u64) -> cmd::smtp::Transport {
    cmd::smtp::Transport {
        server: fake.smtp.to_string(),
        connections,
        security: no_tls(),
        auth: None,
        pipelining: true,
        from: "mailbench@mailbench.test".into(),
        helo: "mailbench.test".into(),
        messages_per_connection: 0,
        max_duration: 60.0,
        rate: None,
        ramp_up: 0.0,
        seed: 1,
    }
}

#[tokio::test]
async fn smtp_pipelined_send_delivers_exact_bytes_and_reports_refused_recipients() {
    let fake = Fake::start(Behaviour {
        require_pipelining: true,
        ..Default::default()
    })
    .await;
    let t = &corpus::corpus(SizeDist::Fixed(3000), "r1", 1, 1)[0];
    let mut c = smtp::Client::connect(&opts(&fake, true)).await.unwrap();
    assert!(c.caps.pipelining);
    let rcpts = vec!["a@x.test".to_string(), "reject@x.test".to_string()];
    let sent = c.send("me@x.test", &rcpts, &t.parts("r1.7")).await.unwrap();
    assert_eq!(sent.reply.unwrap().code, 250);
    assert_eq!(sent.rcpt_refused, vec![550]);
    c.quit().await;
    let st = fake.store.lock().unwrap();
    assert_eq!(st.pipelined_groups, 1);
    assert_eq!(st.mail["a@x.test"][0], t.message("r1.7"));
    assert!(!st.mail.contains_key("reject@x.test"));
}

#[tokio::test]
async fn smtp_without_pipelining_waits_for_each_reply() {
    // A pipelining-only server cannot be satisfied by a lock-step client; the ordinary fake is.
    let fake = Fake::start(Behaviour {
        advertise_pipelining: false,
        ..Default::default()
    })
    .await;
    let t = &corpus::corpus(SizeDist::Fixed(1500), "r2", 1, 1)[0];
    // Asked to pipeline, the client must not when the server does not advertise it.
    let mut c = smtp::Client::connect(&opts(&fake, true)).await.unwrap();
    let only_rejected = vec!["reject@x.test".to_string()];
    let sent = c
        .send("me@x.test", &only_rejected, &t.parts("r2.1"))
        .await
        .unwrap();
    assert!(sent.reply.is_none());
    assert_eq!(sent.rcpt_refused, vec![550]);
    let ok = vec!["b@x.test".to_string()];
    let sent = c.send("me@x.test", &ok, &t.parts("r2.2")).await.unwrap();
    assert_eq!(sent.reply.unwrap().code, 250);
    assert_eq!(fake.count("b@x.test"), 1);
    assert_eq!(fake.store.lock().unwrap().pipelined_groups, 0);
}

#[tokio::test]
async fn smtp_starttls_and_auth_plain_with_ca_and_insecure_verification() {
    let fake = Fake::start(Behaviour::default()).await;
    let t = &corpus::corpus(SizeDist::Fixed(1024), "r3", 1, 1)[0];
    let server = fake.smtp.to_string();
    // Trusting the server's own certificate as CA, under the name in the certificate.
    let by_ca = TlsArgs {
        insecure: false,
        ca: Some(fake.cert_pem.clone()),
        server_name: Some("localhost".into()),
    };
    for tls in [by_ca, insecure()] {
        let mut o = opts(&fake, true);
        o.starttls = Some(tls.build(&server).unwrap());
        o.auth = Some(("user".into(), "secret".into()));
        let mut c = smtp::Client::connect(&o).await.unwrap();
        let sent = c
            .send("me@x.test", &["tls@x.test".to_string()], &t.parts("r3.1"))
            .await
            .unwrap();
        assert_eq!(sent.reply.unwrap().code, 250);
        c.quit().await;
    }
    // Without trusting the self-signed certificate the handshake must fail.
    let mut o = opts(&fake, true);
    o.starttls = Some(
        TlsArgs {
            insecure: false,
            ca: None,
            server_name: None,
        }
        .build(&server)
        .unwrap(),
    );
    assert!(smtp::Client::connect(&o).await.is_err());
    // Wrong credentials are a 535, not a success.
    let mut o = opts(&fake, true);
    o.auth = Some(("user".into(), "wrong".into()));
    match smtp::Client::connect(&o).await {
        Err(e) => assert_eq!(e.key(), "535"),
        Ok(_) => panic!("bad credentials accepted"),
    }
    let st = fake.store.lock().unwrap();
    assert_eq!(st.tls_sessions, 2);
    assert_eq!(st.auth_ok, 2);
    assert_eq!(st.mail["tls@x.test"].len(), 2);
}

#[tokio::test]
async fn smtp_command_counts_250s_and_tallies_temporary_failures() {
    let fake = Fake::start(Behaviour {
        temp_fail_every: 10,
        ..Default::default()
    })
    .await;
    let args = cmd::smtp::SmtpArgs {
        transport: transport(&fake, 4),
        messages: 60,
        size: 2048,
        size_dist: None,
        recipients: 2,
        users: users(3),
        verify: cmd::smtp::Verify {
            verify_imap: None,
            verify_imap_tls: false,
            verify_timeout: 10.0,
        },
    };
    let (report, ok) = cmd::smtp::run(args, &common(insecure())).await.unwrap();
    assert!(ok);
    assert_eq!(report.ops, 54, "{}", report.to_text());
    assert_eq!(report.errors.get("451"), Some(&6));
    assert_eq!(report.error_total, 6);
    assert_eq!(report.latency["transaction"].count, 54);
    assert_eq!(report.latency["data_end_to_reply"].count, 54);
    let delivered: usize = (1..=3)
        .map(|n| fake.count(&format!("bench{n}@mailbench.test")))
        .sum();
    assert_eq!(delivered, 108);
    assert!(report.cpu.iter().any(|c| c.name == "mailbench (client)"));
}

#[tokio::test]
async fn smtp_command_with_verify_imap_sees_every_message() {
    let fake = Fake::start(Behaviour::default()).await;
    let mut t = transport(&fake, 3);
    t.ramp_up = 0.2;
    let args = cmd::smtp::SmtpArgs {
        transport: t,
        messages: 30,
        size: 4096,
        size_dist: None,
        recipients: 1,
        users: users(2),
        verify: cmd::smtp::Verify {
            verify_imap: Some(fake.imap.to_string()),
            verify_imap_tls: false,
            verify_timeout: 20.0,
        },
    };
    let (report, ok) = cmd::smtp::run(args, &common(insecure())).await.unwrap();
    assert!(ok, "{}", report.to_text());
    assert_eq!(report.notes["verify_expected"], 30);
    assert_eq!(report.notes["verify_visible"], 30);
    assert_eq!(report.latency["accept_to_visible"].count, 30);
}

#[tokio::test]
async fn verify_imap_fails_when_messages_do_not_arrive() {
    // Accounts 1..2 receive mail but the verifier logs in with a template that points at
    // mailboxes nothing is delivered to, so nothing becomes visible.
    let fake = Fake::start(Behaviour::default()).await;
    let mut u = users(2);
    u.login_template = Some("elsewhere{n}@mailbench.test".into());
    let args = cmd::smtp::SmtpArgs {
        transport: transport(&fake, 2),
        messages: 4,
        size: 1024,
        size_dist: None,
        recipients: 1,
        users: u,
        verify: cmd::smtp::Verify {
            verify_imap: Some(fake.imap.to_string()),
            verify_imap_tls: false,
            verify_timeout: 0.5,
        },
    };
    let (report, ok) = cmd::smtp::run(args, &common(insecure())).await.unwrap();
    assert!(!ok);
    assert_eq!(report.notes["verify_missing"], 4);
}

#[tokio::test]
async fn seed_delivers_a_realistic_mix_to_every_user() {
    let fake = Fake::start(Behaviour::default()).await;
    let args = cmd::smtp::SeedArgs {
        transport: transport(&fake, 2),
        users: users(3),
        per_user: 5,
        size: None,
        verify: cmd::smtp::Verify {
            verify_imap: None,
            verify_imap_tls: false,
            verify_timeout: 1.0,
        },
    };
    let (report, ok) = cmd::smtp::seed(args, &common(insecure())).await.unwrap();
    assert!(ok);
    assert_eq!(report.ops, 15);
    for n in 1..=3 {
        assert_eq!(fake.count(&format!("bench{n}@mailbench.test")), 5);
    }
}

#[tokio::test]
async fn imap_client_reads_literals_and_the_imap_command_counts_fetches() {
    let fake = Fake::start(Behaviour::default()).await;
    fake.fill("bench1@mailbench.test", 20, 3000);
    let mut c = imap::Client::connect(&fake.imap.to_string(), None, None, Duration::from_secs(5))
        .await
        .unwrap();
    c.capability().await.unwrap();
    assert!(c.has("IDLE"));
    assert!(c.login("bench1@mailbench.test", "wrong").await.is_err());
    c.login("bench1@mailbench.test", "password").await.unwrap();
    assert_eq!(c.select("INBOX", true).await.unwrap(), (20, Some(21)));
    let mut bodies = Vec::new();
    c.run("FETCH 3 BODY.PEEK[]", |r| bodies.push(r.to_vec()))
        .await
        .unwrap();
    assert_eq!(bodies.len(), 1);
    assert!(bodies[0].starts_with(b"* 3 FETCH (BODY[] {"));
    assert!(bodies[0].ends_with(b")"));
    assert!(bodies[0].len() > 3000);
    c.logout().await;

    let cases: [(cmd::imap::Mode, Option<u64>, u64, Option<u64>); 4] = [
        (cmd::imap::Mode::Body, None, 25, Some(25)),
        (cmd::imap::Mode::Envelope, Some(5), 10, None),
        (cmd::imap::Mode::Search, None, 12, Some(12)),
        (cmd::imap::Mode::Flags, Some(4), 6, None),
    ];
    for (mode, batch, requests, expect_ops) in cases {
        let args = cmd::imap::ImapArgs {
            server: fake.imap.to_string(),
            security: no_tls(),
            users: users(1),
            clients: 2,
            mode,
            batch,
            duration: 30.0,
            requests: Some(requests),
            mailbox: "INBOX".into(),
        };
        let (report, _) = cmd::imap::run(args, &common(insecure())).await.unwrap();
        assert_eq!(report.error_total, 0, "{mode:?}: {}", report.to_text());
        assert_eq!(report.latency["command"].count, requests, "{mode:?}");
        match expect_ops {
            Some(n) => assert_eq!(report.ops, n, "{mode:?}"),
            // Ranges are clipped at the end of the mailbox: between 1 and batch per command.
            None => assert!(report.ops >= requests && report.ops <= requests * batch.unwrap()),
        }
    }
}

#[tokio::test]
async fn imap_command_refuses_an_empty_mailbox() {
    let fake = Fake::start(Behaviour::default()).await;
    let args = cmd::imap::ImapArgs {
        server: fake.imap.to_string(),
        security: no_tls(),
        users: users(1),
        clients: 1,
        mode: cmd::imap::Mode::Envelope,
        batch: None,
        duration: 1.0,
        requests: Some(1),
        mailbox: "INBOX".into(),
    };
    let e = cmd::imap::run(args, &common(insecure())).await.unwrap_err();
    assert!(e.to_string().contains("could log in"), "{e}");
}

#[tokio::test]
async fn idle_command_measures_memory_and_notification_of_every_watcher() {
    let fake = Fake::start(Behaviour::default()).await;
    let args = cmd::idle::IdleArgs {
        server: fake.imap.to_string(),
        security: no_tls(),
        users: users(3),
        connections: 30,
        ramp: 10,
        // This test process hosts the fake server, so its own memory stands in for a gateway's.
        server_pid: Some(std::process::id()),
        smtp: Some(fake.smtp.to_string()),
        deliveries: 2,
        from: "mailbench@mailbench.test".into(),
        notify_timeout: 20.0,
    };
    let (report, ok) = cmd::idle::run(args, &common(insecure())).await.unwrap();
    assert!(ok, "{}", report.to_text());
    assert_eq!(report.notes["sessions_idling"], 30);
    assert_eq!(report.ops, 60);
    assert_eq!(report.latency["notify_each"].count, 60);
    assert_eq!(report.latency["notify_all"].count, 2);
    let m = report.memory.unwrap();
    assert_eq!(m.sessions, 30);
    assert!(m.rss_before_kib > 0 && m.rss_after_kib > 0);
    for n in 1..=3 {
        assert_eq!(fake.count(&format!("bench{n}@mailbench.test")), 2);
    }
}

#[tokio::test]
async fn pop3_pipelined_download_unstuffs_and_counts() {
    let fake = Fake::start(Behaviour::default()).await;
    fake.fill("bench1@mailbench.test", 40, 2000);
    let mut c = pop3::Client::connect(&fake.pop3.to_string(), None, None, Duration::from_secs(5))
        .await
        .unwrap();
    c.capa().await.unwrap();
    assert!(c.pipelining);
    c.login("bench1@mailbench.test", "password").await.unwrap();
    let (count, size) = c.stat().await.unwrap();
    assert_eq!(count, 40);
    let mut sizes = Vec::new();
    c.retr_many(&(1..=40).collect::<Vec<_>>(), 8, |n, s| sizes.push((n, s)))
        .await
        .unwrap();
    assert_eq!(sizes.len(), 40);
    assert_eq!(sizes.iter().map(|(_, s)| *s as u64).sum::<u64>(), size);
    assert!(
        sizes
            .iter()
            .enumerate()
            .all(|(i, (n, _))| *n == i as u64 + 1)
    );
    assert!(matches!(
        c.simple("RETR 99").await,
        Err(pop3::Pop3Error::Err { .. })
    ));
    c.quit().await.unwrap();

    let args = cmd::pop3::Pop3Args {
        server: fake.pop3.to_string(),
        security: no_tls(),
        users: users(1),
        messages: 40,
        connections: 2,
        iterations: 2,
        window: 16,
    };
    let (report, ok) = cmd::pop3::run(args.clone(), &common(insecure()))
        .await
        .unwrap();
    assert!(ok, "{}", report.to_text());
    assert_eq!(report.ops, 160);
    assert_eq!(report.bytes, size * 4);
    assert_eq!(report.latency["maildrop"].count, 4);

    let short = cmd::pop3::Pop3Args {
        messages: 41,
        iterations: 1,
        connections: 1,
        ..args
    };
    let (report, ok) = cmd::pop3::run(short, &common(insecure())).await.unwrap();
    assert!(!ok);
    assert_eq!(report.errors.get("protocol"), Some(&1));
}

/// Interop with an independent server implementation: Python's aiosmtpd.
#[tokio::test]
async fn smtp_command_against_aiosmtpd() {
    use std::io::{BufRead, BufReader, Read};
    use std::process::{Command, Stdio};

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/aiosmtpd_sink.py");
    let mut child = Command::new("python3")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut port = String::new();
    out.read_line(&mut port).unwrap();
    let port: u16 = port
        .trim()
        .parse()
        .expect("aiosmtpd_sink.py prints its port");

    let t = cmd::smtp::Transport {
        server: format!("127.0.0.1:{port}"),
        connections: 3,
        security: no_tls(),
        auth: None,
        pipelining: true,
        from: "loadgen@mailbench.example".into(),
        helo: "mailbench.test".into(),
        messages_per_connection: 4,
        max_duration: 60.0,
        rate: None,
        ramp_up: 0.0,
        seed: 2,
    };
    let mut u = users(4);
    u.user_template = "user{n}@sink.test".into();
    let args = cmd::smtp::SmtpArgs {
        transport: t,
        messages: 25,
        size: 5000,
        size_dist: Some("real".into()),
        recipients: 2,
        users: u,
        verify: cmd::smtp::Verify {
            verify_imap: None,
            verify_imap_tls: false,
            verify_timeout: 1.0,
        },
    };
    let result = cmd::smtp::run(args, &common(insecure())).await;
    drop(child.stdin.take());
    let mut rest = String::new();
    out.read_to_string(&mut rest).unwrap();
    assert!(child.wait().unwrap().success());
    let (report, ok) = result.unwrap();
    assert!(ok);
    assert_eq!(report.ops, 25, "{}", report.to_text());
    assert_eq!(report.error_total, 0, "{}", report.to_text());
    let got: serde_json::Value = serde_json::from_str(rest.trim()).unwrap();
    let ids = got["messages"].as_array().unwrap();
    assert_eq!(ids.len(), 25);
    let run = report.notes["run"].as_str().unwrap();
    let mut seqs: Vec<u64> = ids
        .iter()
        .map(|id| {
            corpus::parse_seq(id.as_str().unwrap().as_bytes(), run).expect("a mailbench Message-ID")
        })
        .collect();
    seqs.sort();
    assert_eq!(seqs, (0..25).collect::<Vec<_>>());
    assert_eq!(got["rcpts"].as_array().unwrap().len(), 50);
    // The realistic mix reached the server intact: some messages are far above 5000 bytes.
    assert!(
        got["sizes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s.as_u64().unwrap() > 16_384)
    );
}
