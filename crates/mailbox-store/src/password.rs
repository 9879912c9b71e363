//! argon2id password hashing. Verification runs on the blocking pool (it is deliberately
//! slow), and an unknown user is verified against a fixed dummy hash so that the answer takes
//! as long as for a real one.
//!
//! Every argon2 run holds ~19 MiB, so runs are capped by a semaphore: an AUTH flood then gets
//! prompt UNAVAILABLE answers (a temporary failure at the gateways) instead of growing the
//! process by gigabytes. They run on a fixed set of threads of their own, not on tokio's
//! blocking pool: every thread that ever ran one keeps a malloc arena holding its ~19 MiB, and
//! the blocking pool cycles through many threads (10,000 IMAP logins left the store at
//! ~900 MiB RSS); a fixed set bounds that to one arena per slot.

use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use argon2::Argon2;
use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use mailsuite_runtime::ServiceError;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

#[derive(Clone)]
pub struct Hasher {
    dummy: Arc<String>,
    slots: Arc<Semaphore>,
    wait: Duration,
    pool: Pool,
}

type Job = Box<dyn FnOnce() + Send>;

/// `n` threads running jobs one at a time; they end when the last `Pool` clone is dropped.
#[derive(Clone)]
struct Pool {
    tx: mpsc::Sender<Job>,
}

impl Pool {
    fn new(n: usize) -> Pool {
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..n.max(1) {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("argon2-{i}"))
                .spawn(move || {
                    loop {
                        // The lock is held only while waiting for the next job.
                        let job = match rx.lock() {
                            Ok(r) => r.recv(),
                            Err(_) => return,
                        };
                        match job {
                            // A panicking job must not shrink the pool; its caller sees the
                            // dropped reply as an Internal error.
                            Ok(job) => {
                                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                            }
                            Err(_) => return,
                        }
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a password-check thread");
            }
        }
        Pool { tx }
    }

    /// Run `f` on a pool thread. The caller holds a semaphore slot, so jobs never queue up
    /// beyond the number of slots.
    async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ServiceError> {
        let (done, result) = tokio::sync::oneshot::channel();
        self.tx
            .send(Box::new(move || {
                let _ = done.send(f());
            }))
            .map_err(|_| ServiceError::Internal("password-check threads are gone".into()))?;
        result
            .await
            .map_err(|_| ServiceError::Internal("a password check did not finish".into()))
    }
}

impl Hasher {
    /// `max_concurrent` argon2 runs at once (0 is treated as 1); a caller waits at most `wait`
    /// for a slot.
    pub fn new(max_concurrent: usize, wait: Duration) -> Self {
        let dummy = hash_blocking("mailsuite dummy password for unknown users").unwrap_or_default();
        Hasher {
            dummy: Arc::new(dummy),
            slots: Arc::new(Semaphore::new(max_concurrent.max(1))),
            wait,
            pool: Pool::new(max_concurrent.max(1)),
        }
    }

    async fn slot(&self) -> Result<OwnedSemaphorePermit, ServiceError> {
        let busy = || ServiceError::Unavailable("too many password checks in progress".into());
        // try_acquire first: with a zero wait, timeout() would still poll once, but being
        // explicit keeps the zero-wait answer independent of the timer.
        if let Ok(p) = self.slots.clone().try_acquire_owned() {
            return Ok(p);
        }
        if self.wait.is_zero() {
            return Err(busy());
        }
        match tokio::time::timeout(self.wait, self.slots.clone().acquire_owned()).await {
            Ok(Ok(p)) => Ok(p),
            _ => Err(busy()),
        }
    }

    pub async fn hash(&self, password: &str) -> Result<String, ServiceError> {
        if password.is_empty() {
            return Err(ServiceError::InvalidArgument("empty password".into()));
        }
        let permit = self.slot().await?;
        let pw = password.to_string();
        self.pool
            .run(move || {
                let _permit = permit;
                hash_blocking(&pw)
            })
            .await?
    }

    /// `hash` None: the user does not exist; the dummy hash is checked to spend the same time.
    /// Err(Unavailable) when no verification slot frees up within the configured wait.
    pub async fn verify(&self, password: &str, hash: Option<&str>) -> Result<bool, ServiceError> {
        let (h, real) = match hash {
            Some(h) => (h.to_string(), true),
            None => (self.dummy.as_str().to_string(), false),
        };
        let permit = self.slot().await?;
        let pw = password.to_string();
        // The permit moves into the job: if the caller is cancelled, the argon2 run still
        // holds its slot (and its memory) until it really ends.
        let ok = self
            .pool
            .run(move || {
                let _permit = permit;
                Argon2::default()
                    .verify_password(pw.as_bytes(), h.as_str())
                    .is_ok()
            })
            .await
            .unwrap_or(false);
        Ok(ok && real)
    }
}

fn hash_blocking(password: &str) -> Result<String, ServiceError> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| ServiceError::Internal(format!("hashing password: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// However many checks run, they run on the pool's own threads and no others.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn checks_run_on_a_fixed_set_of_threads() {
        let pool = Pool::new(3);
        let mut tasks = Vec::new();
        for _ in 0..64 {
            let p = pool.clone();
            tasks.push(tokio::spawn(async move {
                p.run(|| std::thread::current().name().unwrap_or("").to_string())
                    .await
                    .unwrap()
            }));
        }
        let mut names = std::collections::BTreeSet::new();
        for t in tasks {
            names.insert(t.await.unwrap());
        }
        assert!(names.len() <= 3, "{names:?}");
        assert!(names.iter().all(|n| n.starts_with("argon2-")), "{names:?}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn saturated_checks_are_refused_not_queued() {
        let h = Hasher::new(1, Duration::ZERO);
        let hash = h.hash("secret").await.unwrap();
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let (h, hash) = (h.clone(), hash.clone());
            tasks.push(tokio::spawn(async move {
                h.verify("secret", Some(&hash)).await
            }));
        }
        let (mut ok, mut busy) = (0, 0);
        for t in tasks {
            match t.await.expect("no panic") {
                Ok(true) => ok += 1,
                Err(ServiceError::Unavailable(_)) => busy += 1,
                other => panic!("unexpected answer {other:?}"),
            }
        }
        assert!(ok >= 1, "at least the first check runs");
        assert!(busy >= 1, "the rest must be refused, got ok={ok}");

        let h = Hasher::new(32, Duration::from_secs(30));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (h, hash) = (h.clone(), hash.clone());
            tasks.push(tokio::spawn(async move {
                h.verify("secret", Some(&hash)).await
            }));
        }
        for t in tasks {
            assert!(t.await.unwrap().unwrap());
        }
    }
}
