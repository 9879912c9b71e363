//! One `Mailbox.Watch` stream per gateway process, fanned out to the sessions of the watched
//! accounts through small in-process channels. A session costs a channel slot here, not a
//! database connection or a gRPC stream.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use mailsuite_proto as pb;
use mailsuite_runtime::Shutdown;
use tokio::sync::mpsc;

use crate::changes_cache::{CacheLimits, ChangeCache};
use crate::store::Store;

/// Events queued per session; when full, further events are dropped: the session already
/// has events waiting, which make it resynchronise from the change log anyway.
const SESSION_QUEUE: usize = 16;

#[derive(Default)]
struct Inner {
    subs: HashMap<i64, Vec<(u64, mpsc::Sender<pb::ChangeEvent>)>>,
    /// Control half of the current Watch stream, if one is open.
    control: Option<mpsc::UnboundedSender<pb::WatchControl>>,
}

#[derive(Clone)]
pub struct Hub {
    inner: Arc<Mutex<Inner>>,
    next_id: Arc<AtomicU64>,
    max_per_account: usize,
    /// Change polls shared by the sessions (one store call per mailbox change).
    changes: ChangeCache,
}

pub struct Subscription {
    hub: Hub,
    account_id: i64,
    id: u64,
    pub events: mpsc::Receiver<pb::ChangeEvent>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut inner = self.hub.lock();
        if let Some(v) = inner.subs.get_mut(&self.account_id) {
            v.retain(|(id, _)| *id != self.id);
            if v.is_empty() {
                inner.subs.remove(&self.account_id);
                if let Some(c) = &inner.control {
                    let _ = c.send(pb::WatchControl {
                        add_accounts: vec![],
                        remove_accounts: vec![self.account_id],
                    });
                }
            }
        }
    }
}

/// A change of kind UNSPECIFIED with mailbox 0 tells sessions that events may have been lost
/// (the Watch stream was re-opened): resynchronise whatever is selected.
pub fn is_resync(ev: &pb::ChangeEvent) -> bool {
    ev.kind == pb::ChangeKind::Unspecified as i32 && ev.mailbox_id == 0
}

impl Hub {
    pub fn new(max_per_account: usize) -> Hub {
        Hub::with_cache(max_per_account, CacheLimits::default())
    }

    pub fn with_cache(max_per_account: usize, cache: CacheLimits) -> Hub {
        Hub {
            inner: Arc::default(),
            next_id: Arc::default(),
            max_per_account,
            changes: ChangeCache::new(cache),
        }
    }

    /// The gateway's shared change polls.
    pub fn changes(&self) -> &ChangeCache {
        &self.changes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Register a session of `account_id`; `None` when the account has too many sessions.
    pub fn subscribe(&self, account_id: i64) -> Option<Subscription> {
        let (tx, rx) = mpsc::channel(SESSION_QUEUE);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut inner = self.lock();
        let list = inner.subs.entry(account_id).or_default();
        if self.max_per_account > 0 && list.len() >= self.max_per_account {
            return None;
        }
        let first = list.is_empty();
        list.push((id, tx));
        if first && let Some(c) = &inner.control {
            let _ = c.send(pb::WatchControl {
                add_accounts: vec![account_id],
                remove_accounts: vec![],
            });
        }
        drop(inner);
        Some(Subscription {
            hub: self.clone(),
            account_id,
            id,
            events: rx,
        })
    }

    pub fn sessions(&self) -> usize {
        self.lock().subs.values().map(Vec::len).sum()
    }

    fn dispatch(&self, ev: &pb::ChangeEvent) {
        // Before any session sees the event: polls started earlier are stale for it.
        if is_resync(ev) {
            self.changes.on_resync();
        } else if ev.kind != pb::ChangeKind::Alert as i32 {
            self.changes.on_event(ev.account_id, ev.mailbox_id);
        }
        let inner = self.lock();
        if is_resync(ev) {
            for tx in inner.subs.values().flatten().map(|(_, t)| t) {
                let _ = tx.try_send(ev.clone());
            }
        } else if let Some(list) = inner.subs.get(&ev.account_id) {
            for (_, tx) in list {
                let _ = tx.try_send(ev.clone());
            }
        }
    }

    /// Keep a Watch stream open until shutdown, re-opening it (with backoff) when it fails.
    pub async fn run(self, store: Store, shutdown: Shutdown) {
        let mut backoff = Duration::from_millis(100);
        let mut opened_before = false;
        loop {
            if shutdown.is_stopping() {
                break;
            }
            let (tx, rx) = mpsc::unbounded_channel();
            {
                let mut inner = self.lock();
                let accounts: Vec<i64> = inner.subs.keys().copied().collect();
                let _ = tx.send(pb::WatchControl {
                    add_accounts: accounts,
                    remove_accounts: vec![],
                });
                inner.control = Some(tx);
            }
            let requests = tokio_stream::wrappers::UnboundedReceiverStream::new(rx);
            let mut client = store.mailbox();
            // Only the opening is bounded: the stream itself lives as long as the gateway.
            let deadline = store.client().deadline();
            let opened = tokio::select! {
                r = tokio::time::timeout(deadline, client.watch(requests)) => r.unwrap_or_else(|_| {
                    Err(tonic::Status::deadline_exceeded("the mail store did not open Watch in time"))
                }),
                _ = shutdown.stopping() => break,
            };
            match opened {
                Ok(resp) => {
                    if opened_before {
                        self.dispatch(&pb::ChangeEvent::default());
                    }
                    opened_before = true;
                    backoff = Duration::from_millis(100);
                    let mut events = resp.into_inner();
                    loop {
                        let ev = tokio::select! {
                            ev = events.next() => ev,
                            _ = shutdown.stopping() => None,
                        };
                        match ev {
                            Some(Ok(ev)) => self.dispatch(&ev),
                            Some(Err(e)) => {
                                tracing::warn!(error = %e, "watch stream failed");
                                break;
                            }
                            None => break,
                        }
                    }
                }
                Err(e) => tracing::debug!(error = %e, "cannot open watch stream"),
            }
            self.lock().control = None;
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.stopping() => break,
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
        self.lock().control = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(account_id: i64, mailbox_id: i64) -> pb::ChangeEvent {
        pb::ChangeEvent {
            account_id,
            mailbox_id,
            kind: pb::ChangeKind::New as i32,
            ..Default::default()
        }
    }

    #[test]
    fn events_reach_only_the_accounts_sessions_and_limits_hold() {
        let hub = Hub::new(2);
        let mut a1 = hub.subscribe(1).unwrap();
        let mut a2 = hub.subscribe(1).unwrap();
        assert!(hub.subscribe(1).is_none(), "per-account limit");
        let mut b = hub.subscribe(2).unwrap();
        hub.dispatch(&ev(1, 10));
        assert_eq!(a1.events.try_recv().unwrap().mailbox_id, 10);
        assert_eq!(a2.events.try_recv().unwrap().mailbox_id, 10);
        assert!(b.events.try_recv().is_err());
        hub.dispatch(&pb::ChangeEvent::default());
        assert!(is_resync(&b.events.try_recv().unwrap()));
        drop(a1);
        assert_eq!(hub.sessions(), 2);
        assert!(hub.subscribe(1).is_some(), "slot freed");
    }

    #[test]
    fn control_messages_follow_first_and_last_session() {
        let hub = Hub::new(0);
        let (tx, mut rx) = mpsc::unbounded_channel();
        hub.lock().control = Some(tx);
        let s1 = hub.subscribe(7).unwrap();
        let s2 = hub.subscribe(7).unwrap();
        assert_eq!(rx.try_recv().unwrap().add_accounts, vec![7]);
        assert!(rx.try_recv().is_err(), "second session adds nothing");
        drop(s1);
        assert!(rx.try_recv().is_err());
        drop(s2);
        assert_eq!(rx.try_recv().unwrap().remove_accounts, vec![7]);
    }

    #[test]
    fn a_full_session_queue_drops_instead_of_blocking() {
        let hub = Hub::new(0);
        let mut s = hub.subscribe(1).unwrap();
        for _ in 0..100 {
            hub.dispatch(&ev(1, 1));
        }
        let mut n = 0;
        while s.events.try_recv().is_ok() {
            n += 1;
        }
        assert_eq!(n, SESSION_QUEUE);
    }
}
