//! Deliveries per second of 4 KB messages through the gRPC Delivery service against the
//! local PostgreSQL, with 1 and with 32 concurrent callers.
//!
//!   cargo bench -p mailsuite-mailbox-store --bench deliver
//!   BENCH_MESSAGES=5000 cargo bench -p mailsuite-mailbox-store --bench deliver
//!   BENCH_CALLERS=1,32,50 cargo bench -p mailsuite-mailbox-store --bench deliver
//!
//! It also prints the store's group-commit counters (transactions, Deliver calls per
//! transaction) of each run.
//!
//! Every message is distinct (no blob deduplication helps) and goes to one of 32 accounts.

use std::time::{Duration, Instant};

use mailsuite_proto::admin_client::AdminClient;
use mailsuite_proto::delivery_client::DeliveryClient;
use mailsuite_proto::*;
use mailsuite_runtime::Shutdown;
use mailsuite_testkit::TestDb;

const ACCOUNTS: usize = 32;

fn message(n: usize) -> Vec<u8> {
    let mut m = format!(
        "From: bench@remote.test\r\nTo: user@example.test\r\nSubject: benchmark {n}\r\nMessage-ID: <{n}@bench>\r\nDate: Fri, 27 Nov 2026 10:00:00 +0000\r\n\r\n"
    )
    .into_bytes();
    let line =
        b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor.\r\n";
    while m.len() < 4096 - line.len() {
        m.extend_from_slice(line);
    }
    m.extend_from_slice(format!("{n:>width$}\r\n", width = 4096 - m.len() - 2).as_bytes());
    m
}

async fn run(url: &str, callers: usize, total: usize, offset: usize) -> (Duration, Vec<Duration>) {
    let per = total / callers;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..callers {
        let url = url.to_string();
        tasks.push(tokio::spawn(async move {
            let ch = tonic::transport::Endpoint::from_shared(url)
                .unwrap()
                .connect()
                .await
                .unwrap();
            let mut d = DeliveryClient::new(ch);
            let mut lat = Vec::with_capacity(per);
            for i in 0..per {
                let n = offset + c * per + i;
                let data = message(n);
                let header = DeliverHeader {
                    idempotency_key: format!("bench-{n}"),
                    return_path: "bench@remote.test".into(),
                    recipients: vec![format!("user{}@example.test", n % ACCOUNTS)],
                    add_delivery_headers: true,
                    size_hint: data.len() as u64,
                    ..Default::default()
                };
                let chunks = vec![
                    DeliverChunk {
                        part: Some(deliver_chunk::Part::Header(header)),
                    },
                    DeliverChunk {
                        part: Some(deliver_chunk::Part::Data(data.into())),
                    },
                ];
                let t = Instant::now();
                let r = d
                    .deliver(tokio_stream::iter(chunks))
                    .await
                    .expect("deliver")
                    .into_inner();
                lat.push(t.elapsed());
                assert_eq!(r.results[0].status, RecipientStatus::Delivered as i32);
            }
            lat
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    (start.elapsed(), lat)
}

fn pct(lat: &mut [Duration], p: f64) -> Duration {
    lat.sort_unstable();
    lat[((lat.len() as f64 - 1.0) * p) as usize]
}

#[tokio::main]
async fn main() {
    let total: usize = std::env::var("BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let db = TestDb::new().await;
    let sd = Shutdown::new();
    let cfg = mailsuite_mailbox_store::Config {
        listen_grpc: "127.0.0.1:0".into(),
        listen_ops: String::new(),
        database_url: db.url.clone(),
        db_max_connections: 40,
        ..Default::default()
    };
    let started = mailsuite_mailbox_store::start(cfg, sd.clone())
        .await
        .unwrap();
    let url = format!("http://{}", started.grpc);
    let mut admin = AdminClient::new(
        tonic::transport::Endpoint::from_shared(url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    admin
        .add_domain(AddDomainRequest {
            name: "example.test".into(),
            catch_all: String::new(),
        })
        .await
        .unwrap();
    for i in 0..ACCOUNTS {
        admin
            .add_account(AddAccountRequest {
                address: format!("user{i}@example.test"),
                password: "bench".into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    // Warm up connections and caches.
    run(&url, 4, 100, 10_000_000).await;
    // BENCH_CALLERS=1,32,50: the concurrent callers of each run.
    let callers: Vec<usize> = std::env::var("BENCH_CALLERS")
        .ok()
        .map(|v| v.split(',').filter_map(|c| c.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 32]);
    for (i, callers) in callers.into_iter().enumerate() {
        let n = total - total % callers;
        let stats = &started.deliveries;
        let before = (stats.batches(), stats.batched());
        let (elapsed, mut lat) = run(&url, callers, n, i * 1_000_000).await;
        let batches = stats.batches() - before.0;
        println!(
            "deliver 4 KB, {callers:>2} caller(s): {n} messages in {:.2?} = {:.0} deliveries/s (p50 {:.2?}, p99 {:.2?}); {batches} transactions, {:.1} deliveries each",
            elapsed,
            n as f64 / elapsed.as_secs_f64(),
            pct(&mut lat, 0.5),
            pct(&mut lat, 0.99),
            (stats.batched() - before.1) as f64 / batches.max(1) as f64,
        );
    }
    sd.drain(Duration::from_secs(5)).await;
}
