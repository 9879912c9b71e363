//! The cost of one `Mailbox.Changes` call as IDLE fan-out makes it: a mailbox of N messages
//! (with a change log of the same length and a few expunges), one new delivery, then many
//! sessions asking `Changes(since = the modseq before that delivery)`.
//!
//!   cargo bench -p mailsuite-mailbox-store --bench changes
//!   BENCH_SIZES=1000,10000 BENCH_CALLS=4000 BENCH_CALLERS=8 cargo bench -p mailsuite-mailbox-store --bench changes
//!
//! Per size it prints the serial latency (1 caller), the throughput with BENCH_CALLERS callers,
//! the CPU per call of the PostgreSQL backends serving the test database (from /proc, so the
//! server must run on this host) and of this process (store and gRPC client together). When
//! the server has pg_stat_statements (a private cluster: see crates/bench/scripts/
//! bench-body-fetch.sh; point DATABASE_URL at it), the statements of the concurrent run are
//! listed too. BENCH_DIRECT=1 adds the statement alone on a pool of its own, with and
//! without sqlx's ping before each pool acquire (`test_before_acquire`).

use std::time::{Duration, Instant};

use mailsuite_proto::admin_client::AdminClient;
use mailsuite_proto::delivery_client::DeliveryClient;
use mailsuite_proto::mailbox_client::MailboxClient;
use mailsuite_proto::*;
use mailsuite_runtime::Shutdown;
use mailsuite_testkit::TestDb;
use sqlx::{PgPool, Row};
use tonic::transport::Channel;

fn env_or<T: std::str::FromStr>(k: &str, d: T) -> T {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

/// CPU seconds (user + system) of a process, from /proc.
fn cpu_of(pid: i32) -> f64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let rest = &s[s.rfind(')').map(|i| i + 2).unwrap_or(0)..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap_or(0.0) + f[12].parse::<f64>().unwrap_or(0.0);
    ticks / 100.0
}

/// CPU seconds of every backend connected to the bench database.
async fn backends_cpu(pool: &PgPool, db: &str) -> f64 {
    let pids: Vec<i32> = sqlx::query_scalar("SELECT pid FROM pg_stat_activity WHERE datname = $1")
        .bind(db)
        .fetch_all(pool)
        .await
        .unwrap();
    pids.into_iter().map(cpu_of).sum()
}

async fn channel(url: &str) -> Channel {
    tonic::transport::Endpoint::from_shared(url.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn message(n: usize) -> Vec<u8> {
    let mut m = format!(
        "From: bench@remote.test\r\nTo: user@example.test\r\nSubject: changes {n}\r\nMessage-ID: <{n}@changes>\r\nDate: Fri, 27 Nov 2026 10:00:00 +0000\r\n\r\n"
    )
    .into_bytes();
    while m.len() < 4000 {
        m.extend_from_slice(b"Lorem ipsum dolor sit amet, consectetur adipiscing elit.\r\n");
    }
    m
}

async fn deliver(d: &mut DeliveryClient<Channel>, to: &str, n: usize) {
    let data = message(n);
    let header = DeliverHeader {
        idempotency_key: format!("changes-{to}-{n}"),
        return_path: "bench@remote.test".into(),
        recipients: vec![to.into()],
        size_hint: data.len() as u64,
        ..Default::default()
    };
    let r = d
        .deliver(tokio_stream::iter(vec![
            DeliverChunk {
                part: Some(deliver_chunk::Part::Header(header)),
            },
            DeliverChunk {
                part: Some(deliver_chunk::Part::Data(data.into())),
            },
        ]))
        .await
        .expect("deliver")
        .into_inner();
    assert_eq!(r.results[0].status, RecipientStatus::Delivered as i32);
}

/// `calls` Changes calls over `callers` connections; returns the wall time and latencies.
async fn run(
    url: &str,
    req: ChangesRequest,
    expect_messages: u32,
    callers: usize,
    calls: usize,
) -> (Duration, Vec<Duration>) {
    let mut clients = Vec::new();
    for _ in 0..callers {
        clients.push(MailboxClient::new(channel(url).await));
    }
    let per = calls / callers;
    let start = Instant::now();
    let mut tasks = Vec::new();
    for mut c in clients {
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per);
            for _ in 0..per {
                let t = Instant::now();
                let r = c.changes(req).await.expect("changes").into_inner();
                lat.push(t.elapsed());
                assert_eq!(r.changed.len(), 1);
                assert_eq!(r.messages, expect_messages);
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

/// The Changes statement alone, `calls` times from `callers` tasks on a pool of its own, with
/// or without sqlx's liveness ping before each acquire: PostgreSQL CPU per call.
async fn direct(
    url: &str,
    db: &str,
    watch: &PgPool,
    req: ChangesRequest,
    ping: bool,
    callers: usize,
    calls: usize,
) -> f64 {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(callers as u32)
        .min_connections(callers as u32)
        .test_before_acquire(ping)
        .connect(url)
        .await
        .unwrap();
    let once = move |pool: PgPool| async move {
        let rows = sqlx::query(mailsuite_mailbox_store::mailbox::CHANGES_SQL)
            .bind(req.mailbox_id)
            .bind(req.account_id)
            .bind(req.since_modseq as i64)
            .fetch_all(&pool)
            .await
            .unwrap();
        assert_eq!(rows.len(), 2);
    };
    for _ in 0..(callers * 20) {
        once(pool.clone()).await;
    }
    let per = calls / callers;
    let pg0 = backends_cpu(watch, db).await;
    let mut tasks = Vec::new();
    for _ in 0..callers {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            for _ in 0..per {
                once(pool.clone()).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let pg1 = backends_cpu(watch, db).await;
    pool.close().await;
    (pg1 - pg0) * 1000.0 / (per * callers) as f64
}

fn pct(lat: &mut [Duration], p: f64) -> Duration {
    lat.sort_unstable();
    lat[((lat.len() as f64 - 1.0) * p) as usize]
}

#[tokio::main]
async fn main() {
    let sizes: Vec<usize> = std::env::var("BENCH_SIZES")
        .unwrap_or_else(|_| "1000,10000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let calls: usize = env_or("BENCH_CALLS", 4000);
    let callers: usize = env_or("BENCH_CALLERS", 8);
    let db = TestDb::new().await;
    let sd = Shutdown::new();
    let cfg = mailsuite_mailbox_store::Config {
        listen_grpc: "127.0.0.1:0".into(),
        listen_ops: String::new(),
        database_url: db.url.clone(),
        db_max_connections: 16,
        ..Default::default()
    };
    let started = mailsuite_mailbox_store::start(cfg, sd.clone())
        .await
        .unwrap();
    let url = format!("http://{}", started.grpc);
    let mut admin = AdminClient::new(channel(&url).await);
    let mut delivery = DeliveryClient::new(channel(&url).await);
    let mut mailbox = MailboxClient::new(channel(&url).await);
    admin
        .add_domain(AddDomainRequest {
            name: "example.test".into(),
            catch_all: String::new(),
        })
        .await
        .unwrap();
    // pg_stat_statements, when the server has it (in its maintenance database).
    let pgss = PgPool::connect(&mailsuite_testkit::db::with_database(
        mailsuite_testkit::db::server_url(),
        "postgres",
    ))
    .await
    .ok();
    let pgss = match pgss {
        Some(p) => sqlx::query("SELECT 1 FROM pg_stat_statements LIMIT 1")
            .execute(&p)
            .await
            .ok()
            .map(|_| p),
        None => None,
    };
    let me = std::process::id() as i32;

    for &size in &sizes {
        let address = format!("user{size}@example.test");
        let account_id = admin
            .add_account(AddAccountRequest {
                address: address.clone(),
                password: "bench".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .id;
        let mb = mailbox
            .status(StatusRequest {
                account_id,
                name: "INBOX".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .id;
        // One real delivery, then size - 1 copies of its entry (and their change-log rows)
        // written directly: seeding 10,000 messages through Deliver would take minutes.
        deliver(&mut delivery, &address, 0).await;
        let mut tx = db.pool.begin().await.unwrap();
        sqlx::query(
            "INSERT INTO mailbox.messages (mailbox_id, uid, modseq, flags, internal_date, date_offset, size, blob_id, prefix, recent)
             SELECT m.mailbox_id, g, g, CASE WHEN g % 3 = 0 THEN '{\\Seen}'::text[] ELSE '{}' END,
                    m.internal_date, 0, m.size, m.blob_id, m.prefix, false
               FROM mailbox.messages m, generate_series(2, $2::bigint) g
              WHERE m.mailbox_id = $1 AND m.uid = 1",
        )
        .bind(mb)
        .bind(size as i64)
        .execute(&mut *tx)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO mailbox.changelog (mailbox_id, modseq, kind, uid)
             SELECT $1, g, 1, g FROM generate_series(2, $2::bigint) g",
        )
        .bind(mb)
        .bind(size as i64)
        .execute(&mut *tx)
        .await
        .unwrap();
        sqlx::query(
            "UPDATE mailbox.mailboxes SET uidnext = $2 + 1, highestmodseq = $2 + 1 WHERE id = $1",
        )
        .bind(mb)
        .bind(size as i64)
        .execute(&mut *tx)
        .await
        .unwrap();
        sqlx::query(
            "UPDATE mailbox.blobs SET refcount = refcount + $2
              WHERE id = (SELECT blob_id FROM mailbox.messages WHERE mailbox_id = $1 AND uid = 1)",
        )
        .bind(mb)
        .bind(size as i64 - 1)
        .execute(&mut *tx)
        .await
        .unwrap();
        tx.commit().await.unwrap();
        // A few expunges, through the service, so the change log holds some.
        let uids = UidSet::from_ranges([(2, 11)]);
        mailbox
            .store_flags(StoreFlagsRequest {
                account_id,
                mailbox_id: mb,
                uids: Some(uids.clone()),
                mode: StoreMode::Add as i32,
                flags: vec!["\\Deleted".into()],
                unchanged_since: 0,
            })
            .await
            .unwrap();
        mailbox
            .expunge(ExpungeRequest {
                account_id,
                mailbox_id: mb,
                uids: Some(uids),
            })
            .await
            .unwrap();
        sqlx::query("ANALYZE mailbox.messages, mailbox.changelog, mailbox.mailboxes")
            .execute(&db.pool)
            .await
            .unwrap();
        // The new mail every IDLE session is told about.
        let since = mailbox
            .changes(ChangesRequest {
                account_id,
                mailbox_id: mb,
                since_modseq: u64::MAX >> 1,
                claim_recent: false,
            })
            .await
            .unwrap()
            .into_inner()
            .highestmodseq;
        deliver(&mut delivery, &address, 1).await;
        let expect = (size - 10 + 1) as u32;
        let req = ChangesRequest {
            account_id,
            mailbox_id: mb,
            since_modseq: since,
            claim_recent: false,
        };

        run(&url, req, expect, callers, 400).await; // warm up
        let (elapsed, mut lat) = run(&url, req, expect, 1, calls / 4).await;
        println!(
            "changes, {size:>6} messages, 1 caller: {} calls in {:.2?}, p50 {:.3?}, p99 {:.3?}",
            calls / 4,
            elapsed,
            pct(&mut lat, 0.5),
            pct(&mut lat, 0.99)
        );

        if let Some(p) = &pgss {
            sqlx::query("SELECT pg_stat_statements_reset()")
                .execute(p)
                .await
                .unwrap();
        }
        let pg0 = backends_cpu(&db.pool, &db.name).await;
        let me0 = cpu_of(me);
        let (elapsed, mut lat) = run(&url, req, expect, callers, calls).await;
        let pg1 = backends_cpu(&db.pool, &db.name).await;
        let me1 = cpu_of(me);
        let n = (calls - calls % callers) as f64;
        println!(
            "changes, {size:>6} messages, {callers} callers: {:.0} calls/s, p50 {:.3?}, p99 {:.3?}; CPU per call: PostgreSQL {:.3} ms, store+client {:.3} ms",
            n / elapsed.as_secs_f64(),
            pct(&mut lat, 0.5),
            pct(&mut lat, 0.99),
            (pg1 - pg0) * 1000.0 / n,
            (me1 - me0) * 1000.0 / n,
        );
        if std::env::var("BENCH_DIRECT").is_ok_and(|v| v == "1") {
            let with = direct(&db.url, &db.name, &db.pool, req, true, callers, calls).await;
            let without = direct(&db.url, &db.name, &db.pool, req, false, callers, calls).await;
            println!(
                "changes statement alone, {size:>6} messages, {callers} callers: PostgreSQL CPU per call {with:.3} ms with sqlx's ping before each acquire, {without:.3} ms without"
            );
        }
        if let Some(p) = &pgss {
            let rows = sqlx::query(
                "SELECT calls, total_exec_time, shared_blks_hit + shared_blks_read AS blks,
                        left(regexp_replace(query, '\\s+', ' ', 'g'), 110) AS q
                   FROM pg_stat_statements
                  WHERE dbid = (SELECT oid FROM pg_database WHERE datname = $1)
                  ORDER BY total_exec_time DESC LIMIT 8",
            )
            .bind(&db.name)
            .fetch_all(p)
            .await
            .unwrap();
            for r in rows {
                let c: i64 = r.get("calls");
                let t: f64 = r.get("total_exec_time");
                let b: i64 = r.get("blks");
                println!(
                    "    {c:>6} calls {:>8.4} ms/call {:>7.1} buffers/call  {}",
                    t / c.max(1) as f64,
                    b as f64 / c.max(1) as f64,
                    r.get::<String, _>("q")
                );
            }
        }
    }
    sd.drain(Duration::from_secs(5)).await;
}
