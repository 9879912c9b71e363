//! Graceful shutdown in two steps: `stop` (stop accepting; idle sessions say goodbye, busy
//! ones finish what they are doing) and, after a grace period, `force` (every session says
//! goodbye now). Tasks are tracked so the caller can wait until all of them have ended.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    stop: CancellationToken,
    force: CancellationToken,
    tracker: TaskTracker,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Begin shutting down: listeners stop accepting, idle sessions end.
    pub fn trigger(&self) {
        self.stop.cancel();
    }

    pub fn is_stopping(&self) -> bool {
        self.stop.is_cancelled()
    }

    /// Resolves once shutdown has begun.
    pub fn stopping(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.stop.cancelled()
    }

    /// Resolves once the grace period is over and sessions must end at once.
    pub fn forced(&self) -> tokio_util::sync::WaitForCancellationFuture<'_> {
        self.force.cancelled()
    }

    pub fn is_forced(&self) -> bool {
        self.force.is_cancelled()
    }

    /// Owned token, for futures that must be `'static`.
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    pub fn force_token(&self) -> CancellationToken {
        self.force.clone()
    }

    /// Spawn a task that shutdown waits for.
    pub fn spawn<F>(&self, fut: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(fut)
    }

    /// Trigger shutdown, give tasks `grace` to finish, then force the rest and wait for them.
    /// Returns true when everything ended within the grace period.
    pub async fn drain(&self, grace: Duration) -> bool {
        self.trigger();
        self.tracker.close();
        let clean = tokio::time::timeout(grace, self.tracker.wait())
            .await
            .is_ok();
        if !clean {
            self.force.cancel();
            self.tracker.wait().await;
        }
        clean
    }

    pub fn active_tasks(&self) -> usize {
        self.tracker.len()
    }
}

/// SIGTERM and SIGINT (Ctrl-C) handlers, installed when this value is made.
///
/// Make it first thing in `main`: a signal that arrives before a handler exists kills the
/// process with the default action, skipping the drain, and a caller that announces readiness
/// (a banner, a `/readyz`) before installing handlers invites exactly that.
pub struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    pub fn install() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Self {
                term: signal(SignalKind::terminate())?,
                int: signal(SignalKind::interrupt())?,
            })
        }
        #[cfg(not(unix))]
        {
            Ok(Self {})
        }
    }

    /// Resolves at the next SIGTERM or SIGINT.
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.term.recv() => {}
                _ = self.int.recv() => {}
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_waits_for_tasks_and_forces_stragglers() {
        let sd = Shutdown::new();
        let s1 = sd.clone();
        // A well-behaved task that ends when asked to stop.
        let polite = sd.spawn(async move {
            s1.stopping().await;
            "polite"
        });
        let s2 = sd.clone();
        // A task that only ends when forced.
        let stubborn = sd.spawn(async move {
            s2.forced().await;
            "forced"
        });
        let clean = sd.drain(Duration::from_millis(50)).await;
        assert!(!clean, "the stubborn task needed forcing");
        assert_eq!(polite.await.unwrap(), "polite");
        assert_eq!(stubborn.await.unwrap(), "forced");
        assert_eq!(sd.active_tasks(), 0);
    }

    #[tokio::test]
    async fn drain_is_clean_when_tasks_finish() {
        let sd = Shutdown::new();
        let s = sd.clone();
        sd.spawn(async move { s.stopping().await });
        assert!(sd.drain(Duration::from_secs(5)).await);
        assert!(!sd.is_forced());
    }
}
