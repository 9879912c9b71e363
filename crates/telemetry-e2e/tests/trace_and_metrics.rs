//! Observability end to end, with every service in this process (`TestSuite`): one message
//! delivered over SMTP is one trace from smtp-ingress's session through the gRPC hop into
//! mailbox-store, no span carries the body or a secret, and the metrics on the ops endpoints
//! move with the delivery.
//!
//! One test per binary: it installs the process-wide tracing subscriber.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use mailsuite_proto::admin_client::AdminClient;
use mailsuite_proto::{AddAccountRequest, AddDomainRequest};
use mailsuite_runtime::metrics;
use mailsuite_testkit::{TestSuite, eventually};
use opentelemetry::trace::{SpanKind, TraceId, TracerProvider as _};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SpanData};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tracing_subscriber::layer::SubscriberExt;

/// Log lines written by the JSON formatter, as the services' `--log-json` writes them.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

impl Captured {
    fn lines(&self) -> Vec<serde_json::Value> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

const BODY_MARKER: &str = "body-marker-7f3a9c";
const PASSWORD: &str = "obs-secret-pw-51d2";

/// Send one reply-checked SMTP command; returns the final reply line.
async fn command<S>(conn: &mut BufReader<S>, line: &str, expect: &str) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if !line.is_empty() {
        conn.get_mut()
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .unwrap();
    }
    loop {
        let mut reply = String::new();
        let n = tokio::time::timeout(Duration::from_secs(30), conn.read_line(&mut reply))
            .await
            .expect("reply in time")
            .unwrap();
        assert!(n > 0, "connection closed after {line:?}");
        if reply.as_bytes().get(3) != Some(&b'-') {
            assert!(reply.starts_with(expect), "{line:?} got {reply:?}");
            return reply;
        }
    }
}

/// Send one IMAP command (or nothing, for the greeting) and read up to the line starting
/// with `expect` (the tagged reply); returns everything read.
async fn imap_command<S>(conn: &mut BufReader<S>, line: &str, expect: &str) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if !line.is_empty() {
        conn.get_mut()
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .unwrap();
    }
    let mut all = String::new();
    loop {
        let mut reply = String::new();
        let n = tokio::time::timeout(Duration::from_secs(30), conn.read_line(&mut reply))
            .await
            .expect("reply in time")
            .unwrap();
        assert!(n > 0, "connection closed after {line:?}: {all}");
        all.push_str(&reply);
        if reply.starts_with(expect) {
            return all;
        }
        let tag = expect.split(' ').next().unwrap_or("");
        assert!(
            tag == "*" || !reply.starts_with(&format!("{tag} ")),
            "{line:?} got {reply:?}"
        );
    }
}

fn attr_text(s: &SpanData) -> String {
    s.attributes
        .iter()
        .map(|kv| format!("{}={}", kv.key, kv.value))
        .chain(s.events.iter().flat_map(|e| {
            e.attributes
                .iter()
                .map(|kv| format!("{}={}", kv.key, kv.value))
        }))
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_message_is_one_trace_and_moves_the_metrics() {
    mailsuite_runtime::telemetry::install_propagator();
    let exporter = InMemorySpanExporter::default();
    let provider = mailsuite_runtime::telemetry::provider_with(exporter.clone(), "e2e", false);
    let logs = Captured::default();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_subscriber::EnvFilter::new("info"))
        .with(
            tracing_subscriber::fmt::layer()
                .json()
                .with_current_span(false)
                .with_writer(logs.clone()),
        )
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("e2e")));
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let suite = TestSuite::start_with(|c| {
        // No DNS here: SPF/DKIM/DMARC verification would only time out.
        c.smtp.policy.verify_inbound = false;
        c.smtp.listen_ops = "127.0.0.1:0".into();
        c.store.listen_ops = "127.0.0.1:0".into();
        c.imap.auth.allow_plaintext_loopback = true;
    })
    .await;
    let r = &suite.running;
    let mut admin = AdminClient::new(r.store_channel());
    admin
        .add_domain(AddDomainRequest {
            name: "obs.test".into(),
            catch_all: String::new(),
        })
        .await
        .unwrap();
    admin
        .add_account(AddAccountRequest {
            address: "carol@obs.test".into(),
            password: PASSWORD.into(),
            display_name: "Carol".into(),
            quota_bytes: 0,
            quota_messages: 0,
        })
        .await
        .unwrap();

    let accepted = || {
        metrics::value(
            "mailsuite_smtp_messages_received_total",
            &[("result", "accepted")],
        )
    };
    let stored = || metrics::value("mailsuite_store_deliveries_total", &[]);
    let sessions = || {
        metrics::value(
            "mailsuite_sessions_total",
            &[("protocol", "smtp"), ("tls", "none")],
        )
    };
    let deliver_rpcs = || {
        metrics::value(
            "mailsuite_grpc_server_duration_seconds_count",
            &[
                ("rpc_service", "mailsuite.v1.Delivery"),
                ("rpc_method", "Deliver"),
            ],
        )
    };
    let before = (accepted(), stored(), sessions(), deliver_rpcs());

    // One message from a remote sender to a local user on the MX port.
    let tcp = TcpStream::connect(r.smtp.smtp.expect("smtp listener"))
        .await
        .unwrap();
    let mut conn = BufReader::new(tcp);
    command(&mut conn, "", "220").await;
    command(&mut conn, "EHLO client.example", "250").await;
    command(&mut conn, "MAIL FROM:<dave@remote.example>", "250").await;
    command(&mut conn, "RCPT TO:<carol@obs.test>", "250").await;
    command(&mut conn, "DATA", "354").await;
    let msg = format!(
        "From: dave@remote.example\r\nTo: carol@obs.test\r\nSubject: traced\r\nMessage-ID: <obs-1@remote.example>\r\n\r\n{BODY_MARKER}\r\n."
    );
    command(&mut conn, &msg, "250").await;
    command(&mut conn, "QUIT", "221").await;
    drop(conn);

    // The user reads it over IMAP: a session span with one child span per command.
    let tcp = TcpStream::connect(r.imap.imap.expect("imap listener"))
        .await
        .unwrap();
    let mut imap = BufReader::new(tcp);
    imap_command(&mut imap, "", "*").await;
    imap_command(
        &mut imap,
        &format!("a1 LOGIN carol@obs.test {PASSWORD}"),
        "a1 OK",
    )
    .await;
    imap_command(&mut imap, "a2 SELECT INBOX", "a2 OK").await;
    let fetched = imap_command(&mut imap, "a3 FETCH 1 BODY[]", "a3 OK").await;
    assert!(fetched.contains(BODY_MARKER), "{fetched}");
    imap_command(&mut imap, "a4 LOGOUT", "a4 OK").await;
    drop(imap);

    // Spans end when the session tasks finish, just after QUIT / LOGOUT.
    let spans = eventually(Duration::from_secs(10), "the session spans", || {
        let exporter = exporter.clone();
        async move {
            let spans = exporter.get_finished_spans().ok()?;
            (spans.iter().any(|s| s.name == "smtp.session")
                && spans.iter().any(|s| s.name == "imap.session"))
            .then_some(spans)
        }
    })
    .await;
    let imap_session = spans
        .iter()
        .find(|s| s.name == "imap.session")
        .expect("imap.session span");
    let imap_commands: Vec<String> = spans
        .iter()
        .filter(|s| s.name == "imap.command")
        .inspect(|s| {
            assert_eq!(
                s.parent_span_id,
                imap_session.span_context.span_id(),
                "IMAP command spans are children of the session span"
            )
        })
        .map(attr_text)
        .collect();
    for cmd in ["LOGIN", "SELECT", "FETCH", "LOGOUT"] {
        assert!(
            imap_commands
                .iter()
                .any(|a| a.contains(&format!("imap.command={cmd}"))),
            "no imap.command span for {cmd}: {imap_commands:?}"
        );
    }
    let names: Vec<String> = spans.iter().map(|s| s.name.to_string()).collect();
    let find = |pred: &dyn Fn(&SpanData) -> bool, what: &str| -> SpanData {
        spans
            .iter()
            .find(|s| pred(s))
            .unwrap_or_else(|| panic!("no {what} span among {names:?}"))
            .clone()
    };
    let session = find(&|s| s.name == "smtp.session", "smtp.session");
    let message = find(&|s| s.name == "smtp.message", "smtp.message");
    let client = find(
        &|s| s.name == "mailsuite.v1.Delivery/Deliver" && s.span_kind == SpanKind::Client,
        "Deliver client",
    );
    let server = find(
        &|s| s.name == "mailsuite.v1.Delivery/Deliver" && s.span_kind == SpanKind::Server,
        "Deliver server",
    );
    let trace: TraceId = session.span_context.trace_id();
    for (what, s) in [
        ("message", &message),
        ("grpc client", &client),
        ("grpc server (mailbox-store)", &server),
    ] {
        assert_eq!(
            s.span_context.trace_id(),
            trace,
            "{what} span is in the session's trace"
        );
    }
    assert_eq!(message.parent_span_id, session.span_context.span_id());
    assert_eq!(server.parent_span_id, client.span_context.span_id());
    // The store's work (its database transaction) happens inside that trace too.
    let db = find(
        &|s| attr_text(s).contains("db.system.name=postgresql"),
        "database transaction",
    );
    assert_eq!(
        db.span_context.trace_id(),
        trace,
        "the store's transaction is in the trace"
    );
    // Semantic-convention attributes, and nothing private.
    let session_attrs = attr_text(&session);
    assert!(
        session_attrs.contains("network.peer.address=127.0.0.1"),
        "{session_attrs}"
    );
    assert!(attr_text(&server).contains("rpc.system=grpc"));
    for s in &spans {
        let text = attr_text(s);
        assert!(
            !text.contains(BODY_MARKER),
            "span {} carries the body: {text}",
            s.name
        );
        assert!(
            !text.contains(PASSWORD),
            "span {} carries a password: {text}",
            s.name
        );
    }

    // The mail log: one JSON line for the transaction, carrying the trace id.
    let lines = logs.lines();
    let tx: Vec<&serde_json::Value> = lines
        .iter()
        .filter(|l| l["fields"]["message"] == "smtp transaction")
        .collect();
    assert_eq!(tx.len(), 1, "one transaction line: {lines:#?}");
    let f = &tx[0]["fields"];
    assert_eq!(f["result"], "accepted", "{f}");
    assert_eq!(f["trace_id"], trace.to_string(), "{f}");
    assert_eq!(f["client_ip"], "127.0.0.1", "{f}");
    assert_eq!(f["from"], "dave@remote.example", "{f}");
    assert_eq!(f["to"], "carol@obs.test", "{f}");
    assert_eq!(f["route"], "local", "{f}");
    assert!(f["queue_id"].as_str().is_some_and(|q| !q.is_empty()), "{f}");
    assert!(
        f["size"]
            .as_u64()
            .is_some_and(|n| n > BODY_MARKER.len() as u64),
        "{f}"
    );
    assert!(
        f["reply"].as_str().is_some_and(|r| r.starts_with("250")),
        "{f}"
    );
    for l in &lines {
        assert!(
            !l.to_string().contains(BODY_MARKER),
            "a log line carries the body: {l}"
        );
    }

    // Metrics moved, in the registry and on both ops endpoints.
    assert_eq!(accepted() - before.0, 1.0);
    assert_eq!(stored() - before.1, 1.0);
    assert_eq!(sessions() - before.2, 1.0);
    assert_eq!(deliver_rpcs() - before.3, 1.0);
    for ops in [r.smtp.ops, r.store.ops] {
        let page = mailsuite_testkit::http_get(ops.expect("ops listener"), "/metrics").await;
        assert!(page.starts_with("HTTP/1.1 200"), "{page}");
        assert!(
            page.contains("mailsuite_smtp_messages_received_total{result=\"accepted\"}"),
            "{page}"
        );
        assert!(
            page.contains("mailsuite_grpc_server_duration_seconds_bucket"),
            "{page}"
        );
    }

    assert!(suite.stop(Duration::from_secs(10)).await);
}
