//! The threads that parse message structure, started once and fed through a queue.
//!
//! A parse runs on a thread with a `mime::PARSE_STACK_BYTES` stack (see there why). Starting
//! such a thread for every message (mapping and unmapping the stack, clone, join) cost about
//! as much as parsing a small message, on the path every delivery and APPEND takes. A job's
//! panic is caught and reported to its caller; the thread goes on with the next job.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, OnceLock, mpsc};

use bytes::Bytes;

use crate::mime;

type Job = Box<dyn FnOnce() + Send>;

struct Pool {
    jobs: Mutex<mpsc::Sender<Job>>,
}

/// Threads in the pool: one per core (parsing is CPU work), at least two so one large
/// message does not hold up every other, at most eight.
fn threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(2, 8)
}

fn start() -> Result<Pool, String> {
    let (tx, rx) = mpsc::channel::<Job>();
    let rx = Arc::new(Mutex::new(rx));
    for i in 0..threads() {
        let rx = rx.clone();
        std::thread::Builder::new()
            .name(format!("mime-parse-{i}"))
            .stack_size(mime::PARSE_STACK_BYTES)
            .spawn(move || {
                loop {
                    // The lock is held only while waiting for the next job, not while running it.
                    let job = match rx.lock() {
                        Ok(rx) => rx.recv(),
                        Err(poisoned) => poisoned.into_inner().recv(),
                    };
                    match job {
                        Ok(job) => job(),
                        Err(_) => return,
                    }
                }
            })
            .map_err(|e| format!("starting the MIME parser threads: {e}"))?;
    }
    Ok(Pool {
        jobs: Mutex::new(tx),
    })
}

fn pool() -> std::io::Result<&'static Pool> {
    static POOL: OnceLock<Result<Pool, String>> = OnceLock::new();
    POOL.get_or_init(start)
        .as_ref()
        .map_err(|e| std::io::Error::other(e.clone()))
}

/// `mime::parse` of `raw` on one of the pool's big-stack threads (`raw` is shared with the
/// caller, not copied).
pub async fn parse(raw: impl Into<Bytes>) -> std::io::Result<mime::Parsed> {
    let raw: Bytes = raw.into();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job: Job = Box::new(move || {
        let parsed = std::panic::catch_unwind(AssertUnwindSafe(|| mime::parse(&raw)));
        let _ = tx.send(parsed.ok());
    });
    pool()?
        .jobs
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send(job)
        .map_err(|_| std::io::Error::other("the MIME parser threads are gone"))?;
    rx.await
        .ok()
        .flatten()
        .ok_or_else(|| std::io::Error::other("the MIME parser panicked"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn parses_concurrently_on_reused_threads() {
        let raw = |i: usize| format!("Subject: m{i}\r\n\r\nbody {i}\r\n").into_bytes();
        let parsed = futures::future::join_all((0..64).map(|i| parse(raw(i)))).await;
        for (i, p) in parsed.into_iter().enumerate() {
            let p = p.expect("parsed");
            assert_eq!(p.envelope.subject, Some(format!("m{i}").into_bytes()));
        }
    }
}
