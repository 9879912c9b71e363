//! Change polls shared between the sessions of a gateway (issue 13).
//!
//! A change event wakes every session that has the mailbox selected, and each needs the
//! changes since its own modseq. Asking the store once per session made one delivery to an
//! account with 10,000 IDLE sessions 10,000 `Mailbox.Changes` calls over the one HTTP/2
//! connection. Here the store is asked once per (mailbox, change) and the answer is shared:
//!
//! - A poll in flight for a mailbox is joined by every session whose modseq is at least the
//!   poll's `since` (single flight); the answer lives behind an `Arc`, and each session keeps
//!   only what lies above its own modseq (see [`Snapshot`]).
//! - The last answer per mailbox is kept until the next change event for that mailbox (or
//!   until evicted), so sessions that wake up after the poll finished use it too.
//! - Freshness: every change event bumps the mailbox's generation *before* the hub hands the
//!   event to any session. A poll remembers the generation current when it started; a session
//!   only uses a poll whose generation is at least the one current when it asks. The event
//!   reached the hub after the store committed the change, so such a poll was sent after the
//!   commit and sees it: a session never takes a stale answer for the event that woke it.
//! - A session whose modseq is below the shared poll's `since`, or for which a shared answer
//!   says "log truncated" while its own `since` differs, asks the store itself, as before.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use mailsuite_proto as pb;
use mailsuite_runtime::ServiceError;
use tokio::sync::watch;

use crate::store::{Store, StoreResult};

/// One `Changes` answer: everything after `since` up to `resp.highestmodseq`.
///
/// For a session at modseq `s >= since` the changes are the entries of `resp.changed` with
/// `modseq > s`, exactly what the store would answer for `s`. `resp.expunged` carries no
/// modseq, so it may also hold UIDs expunged in `(since, s]`; the session already learnt of
/// those (its modseq covers them) and no longer has them in its view, or holds them as
/// pending expunges, so they change nothing (`Selected::apply_changes` only acts on UIDs still
/// in the view and not yet pending). UIDs are never reused within a UIDVALIDITY.
#[derive(Debug)]
pub struct Snapshot {
    pub since: u64,
    pub resp: pb::ChangesResponse,
}

impl Snapshot {
    /// The changed entries a session at `modseq` has not seen yet.
    pub fn changed_after(&self, modseq: u64) -> impl Iterator<Item = &pb::MessageFlags> {
        self.resp.changed.iter().filter(move |m| m.modseq > modseq)
    }

    fn size(&self) -> usize {
        self.resp.changed.len() + self.resp.expunged.len() + 1
    }
}

type Outcome = Result<Arc<Snapshot>, ServiceError>;

/// Bounds of the cache of last answers (polls in flight are never evicted).
#[derive(Debug, Clone, Copy)]
pub struct CacheLimits {
    /// Mailboxes whose last answer is kept.
    pub mailboxes: usize,
    /// Changed entries plus expunged UIDs kept over all mailboxes; a larger answer is still
    /// shared by the sessions waiting for it, but not kept afterwards.
    pub entries: usize,
}

impl Default for CacheLimits {
    fn default() -> Self {
        CacheLimits {
            mailboxes: 10_000,
            entries: 100_000,
        }
    }
}

type Key = (i64, i64);

struct Inflight {
    id: u64,
    since: u64,
    generation: u64,
    rx: watch::Receiver<Option<Outcome>>,
}

#[derive(Default)]
struct Entry {
    /// Bumped by every change event of the mailbox.
    generation: u64,
    inflight: Option<Inflight>,
    /// The last answer, the generation its poll started at, and its eviction tick.
    last: Option<(u64, Arc<Snapshot>, u64)>,
}

impl Entry {
    fn is_empty(&self) -> bool {
        self.inflight.is_none() && self.last.is_none()
    }
}

#[derive(Default)]
struct Inner {
    entries: HashMap<Key, Entry>,
    /// Kept answers in the order they were stored: (key, tick). Records whose tick no longer
    /// matches the entry's are stale and skipped.
    order: VecDeque<(Key, u64)>,
    /// Answers kept and their total size.
    kept: usize,
    kept_size: usize,
    next_id: u64,
}

/// Shared change polls of one gateway; cheap to clone.
#[derive(Clone, Default)]
pub struct ChangeCache {
    inner: Arc<Mutex<Inner>>,
    limits: CacheLimits,
}

/// Where a session's poll was answered from.
enum Plan {
    Ready(Arc<Snapshot>),
    Wait(watch::Receiver<Option<Outcome>>),
}

impl ChangeCache {
    pub fn new(limits: CacheLimits) -> ChangeCache {
        ChangeCache {
            inner: Arc::default(),
            limits,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A change event for this mailbox arrived from the store: answers and polls started
    /// before it are stale for whoever it wakes. Must run before the event reaches any session.
    pub fn on_event(&self, account_id: i64, mailbox_id: i64) {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let key = (account_id, mailbox_id);
        if let Some(e) = inner.entries.get_mut(&key) {
            e.generation += 1;
            if let Some(l) = e.last.take() {
                inner.kept -= 1;
                inner.kept_size -= l.1.size();
            }
            if e.is_empty() {
                inner.entries.remove(&key);
            }
        }
    }

    /// Events may have been lost (the Watch stream was re-opened): everything is stale.
    pub fn on_resync(&self) {
        let mut inner = self.lock();
        let inner = &mut *inner;
        for e in inner.entries.values_mut() {
            e.generation += 1;
            e.last = None;
        }
        inner.kept = 0;
        inner.kept_size = 0;
        inner.order.clear();
        inner.entries.retain(|_, e| !e.is_empty());
    }

    /// The changes of `mailbox_id` after `since` as seen by a poll started after every change
    /// event announced so far: a shared answer whose `since` is at most `since` (filter it with
    /// [`Snapshot::changed_after`]), or the session's own when sharing is not possible or
    /// `own_poll` asks for everything committed before now (NOOP), announced or not.
    pub async fn changes(
        &self,
        store: &Store,
        account_id: i64,
        mailbox_id: i64,
        since: u64,
        own_poll: bool,
    ) -> StoreResult<Arc<Snapshot>> {
        if own_poll {
            return own(store, account_id, mailbox_id, since).await;
        }
        let plan = self.plan(store, account_id, mailbox_id, since);
        let shared = match plan {
            Plan::Ready(s) => {
                counter_shared("cached");
                s
            }
            Plan::Wait(mut rx) => match rx.wait_for(Option::is_some).await {
                Ok(v) => v.clone().expect("is_some")?,
                Err(_) => return Err(ServiceError::Unavailable("change poll abandoned".into())),
            },
        };
        if shared.resp.truncated && shared.since != since {
            // The log does not reach back to the shared poll's start; it may reach ours.
            return own(store, account_id, mailbox_id, since).await;
        }
        Ok(shared)
    }

    fn plan(&self, store: &Store, account_id: i64, mailbox_id: i64, since: u64) -> Plan {
        let key = (account_id, mailbox_id);
        let mut inner = self.lock();
        let inner = &mut *inner;
        let e = inner.entries.entry(key).or_default();
        let need = e.generation;
        if let Some((g, s, _)) = &e.last
            && *g >= need
            && s.since <= since
        {
            return Plan::Ready(s.clone());
        }
        if let Some(f) = &e.inflight
            && f.generation >= need
            && f.since <= since
        {
            counter_shared("joined");
            return Plan::Wait(f.rx.clone());
        }
        // A new poll: current, and reaching back at least as far as a poll in flight that
        // this session could not use, so it replaces it for later sessions.
        inner.next_id += 1;
        let id = inner.next_id;
        let (tx, rx) = watch::channel(None);
        e.inflight = Some(Inflight {
            id,
            since,
            generation: need,
            rx: rx.clone(),
        });
        let this = self.clone();
        let store = store.clone();
        // Spawned, so the poll completes for everyone who joined it even if the session that
        // started it goes away.
        tokio::spawn(async move {
            counter_calls("shared");
            let r = store
                .changes(account_id, mailbox_id, since)
                .await
                .map(|resp| Arc::new(Snapshot { since, resp }));
            this.finish(key, id, need, &r);
            let _ = tx.send(Some(r));
        });
        Plan::Wait(rx)
    }

    /// A poll finished: it is no longer in flight, and its answer is kept if still current.
    fn finish(&self, key: Key, id: u64, generation: u64, r: &Outcome) {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let Some(e) = inner.entries.get_mut(&key) else {
            return;
        };
        if e.inflight.as_ref().is_some_and(|f| f.id == id) {
            e.inflight = None;
        }
        if let Ok(s) = r
            && generation == e.generation
            && s.size() <= self.limits.entries
            && self.limits.mailboxes > 0
            && e.last
                .as_ref()
                .is_none_or(|l| l.0 < generation || s.since <= l.1.since)
        {
            if let Some(old) = e.last.take() {
                inner.kept -= 1;
                inner.kept_size -= old.1.size();
            }
            inner.next_id += 1;
            let tick = inner.next_id;
            e.last = Some((generation, s.clone(), tick));
            inner.kept += 1;
            inner.kept_size += s.size();
            inner.order.push_back((key, tick));
        }
        if e.is_empty() {
            inner.entries.remove(&key);
        }
        inner.evict(self.limits);
    }
}

impl Inner {
    /// Drop the oldest kept answers until within the limits.
    fn evict(&mut self, limits: CacheLimits) {
        while self.kept > limits.mailboxes || self.kept_size > limits.entries {
            let Some((key, tick)) = self.order.pop_front() else {
                break;
            };
            let Some(e) = self.entries.get_mut(&key) else {
                continue;
            };
            if e.last.as_ref().is_some_and(|l| l.2 == tick) {
                let l = e.last.take().expect("checked");
                self.kept -= 1;
                self.kept_size -= l.1.size();
                if e.is_empty() {
                    self.entries.remove(&key);
                }
            }
        }
        // Stale records pile up as answers are replaced or made stale by events.
        if self.order.len() > 2 * self.kept + 64 {
            let entries = &self.entries;
            self.order.retain(|(k, t)| {
                entries
                    .get(k)
                    .and_then(|e| e.last.as_ref())
                    .is_some_and(|l| l.2 == *t)
            });
        }
    }
}

/// The session's own poll, shared with nobody.
async fn own(
    store: &Store,
    account_id: i64,
    mailbox_id: i64,
    since: u64,
) -> StoreResult<Arc<Snapshot>> {
    counter_calls("own");
    let resp = store.changes(account_id, mailbox_id, since).await?;
    Ok(Arc::new(Snapshot { since, resp }))
}

fn counter_calls(kind: &'static str) {
    mailsuite_runtime::metrics::counter("mailsuite_imap_changes_calls_total", &[("kind", kind)])
        .inc();
}

fn counter_shared(how: &'static str) {
    mailsuite_runtime::metrics::counter("mailsuite_imap_changes_shared_total", &[("how", how)])
        .inc();
}
