//! Relay throughput: messages per second from Enqueue to a local SMTP sink (one recipient
//! each, through the real queue in PostgreSQL, the claim/lease workers and the SMTP client).
//! The sink is in-process and does no I/O besides the socket, so the figure is the queue's.
//!
//! `cargo bench -p mailsuite-relay-queue --bench throughput [-- MESSAGES [BYTES]]`

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mailsuite_proto::enqueue_chunk::Part;
use mailsuite_proto::queue_client::QueueClient;
use mailsuite_proto::{EnqueueChunk, EnqueueHeader, EnvelopeRecipient};
use mailsuite_runtime::Shutdown;
use mailsuite_testkit::TestDb;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// A minimal SMTP receiver counting the messages it accepted.
async fn sink(received: Arc<AtomicUsize>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let received = received.clone();
            tokio::spawn(async move {
                let (r, mut w) = stream.into_split();
                let mut r = BufReader::new(r);
                let _ = w.write_all(b"220 sink ESMTP\r\n").await;
                let mut line = Vec::new();
                let mut in_data = false;
                loop {
                    line.clear();
                    match r.read_until(b'\n', &mut line).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    if in_data {
                        if line == b".\r\n" {
                            in_data = false;
                            received.fetch_add(1, Ordering::Relaxed);
                            let _ = w.write_all(b"250 2.0.0 ok\r\n").await;
                        }
                        continue;
                    }
                    let verb = line.get(..4).unwrap_or(&[]).to_ascii_uppercase();
                    let reply: &[u8] = match &verb[..] {
                        b"EHLO" => b"250-sink\r\n250-PIPELINING\r\n250 8BITMIME\r\n",
                        b"DATA" => {
                            in_data = true;
                            b"354 go\r\n"
                        }
                        b"QUIT" => {
                            let _ = w.write_all(b"221 bye\r\n").await;
                            return;
                        }
                        _ => b"250 ok\r\n",
                    };
                    if w.write_all(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let n: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(2000);
    let size: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(2048);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(run(n, size));
}

async fn run(n: usize, size: usize) {
    let db = TestDb::new().await;
    let received = Arc::new(AtomicUsize::new(0));
    let port = sink(received.clone()).await;
    let sd = Shutdown::new();
    let mut c = mailsuite_relay_queue::Config {
        listen_grpc: "127.0.0.1:0".into(),
        listen_ops: String::new(),
        database_url: db.url.clone(),
        // No local recipients here: the transport route answers before the store is asked.
        store_url: "http://127.0.0.1:9".into(),
        hostname: "mx.bench.test".into(),
        migrate_on_start: false,
        dkim_from_store: false,
        ..Default::default()
    };
    c.transports
        .insert("sink.test".into(), format!("127.0.0.1:{port}"));
    let started = mailsuite_relay_queue::start(c, sd.clone()).await.unwrap();
    let url = format!("http://{}", started.grpc.unwrap());
    let client = QueueClient::connect(url).await.unwrap();

    let mut body = b"From: bench@bench.test\r\nSubject: bench\r\n\r\n".to_vec();
    while body.len() < size {
        body.extend_from_slice(b"the quick brown fox jumps over the lazy dog 0123456789\r\n");
    }
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    let senders = 16;
    for s in 0..senders {
        let mut client = client.clone();
        let body = body.clone();
        tasks.spawn(async move {
            for i in (s..n).step_by(senders) {
                let chunks = vec![
                    EnqueueChunk {
                        part: Some(Part::Header(EnqueueHeader {
                            idempotency_key: format!("bench-{i}"),
                            return_path: "bench@bench.test".into(),
                            recipients: vec![EnvelopeRecipient {
                                address: format!("r{i}@sink.test"),
                                ..Default::default()
                            }],
                            size_hint: body.len() as u64,
                            ..Default::default()
                        })),
                    },
                    EnqueueChunk {
                        part: Some(Part::Data(body.clone().into())),
                    },
                ];
                client.enqueue(tokio_stream::iter(chunks)).await.unwrap();
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let enqueued = start.elapsed();
    let deadline = start + Duration::from_secs(600);
    while received.load(Ordering::Relaxed) < n {
        assert!(
            Instant::now() < deadline,
            "only {} of {n} messages arrived",
            received.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let total = start.elapsed();
    println!(
        "relay-queue: {n} messages of {} bytes, enqueued in {:.2} s ({:.0}/s), \
         delivered to the sink in {:.2} s: {:.0} messages/s end to end",
        body.len(),
        enqueued.as_secs_f64(),
        n as f64 / enqueued.as_secs_f64(),
        total.as_secs_f64(),
        n as f64 / total.as_secs_f64()
    );
    sd.drain(Duration::from_secs(10)).await;
}
