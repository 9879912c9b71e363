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
use std::future::Future;
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

struct Entry {
    /// Set from the cache-wide counter when the entry is made and at every change event of
    /// the mailbox, so a poll from before an entry was dropped never matches a new one's.
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
    /// Source of generations, poll ids and eviction ticks: only ever grows.
    next_id: u64,
}

impl Inner {
    fn next(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
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
            inner.next_id += 1;
            e.generation = inner.next_id;
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
        inner.next_id += 1;
        for e in inner.entries.values_mut() {
            e.generation = inner.next_id;
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
    ///
    /// `claim_recent` (a read-write session's own poll only): the store takes the \Recent of
    /// what it reports away from everyone else. A shared poll never claims, so sessions woken
    /// together by one delivery do not all write.
    pub async fn changes(
        &self,
        store: &Store,
        account_id: i64,
        mailbox_id: i64,
        since: u64,
        own_poll: bool,
        claim_recent: bool,
    ) -> StoreResult<Arc<Snapshot>> {
        let store = store.clone();
        // Only an own poll claims: `changes_via` shares nothing when `own_poll` is set, and
        // its fallback from a truncated shared answer (`own_poll` unset) claims nothing.
        let claim = own_poll && claim_recent;
        let fetch = move |since: u64| {
            let store = store.clone();
            async move { store.changes(account_id, mailbox_id, since, claim).await }
        };
        self.changes_via((account_id, mailbox_id), since, own_poll, fetch)
            .await
    }

    async fn changes_via<F, Fut>(
        &self,
        key: Key,
        since: u64,
        own_poll: bool,
        fetch: F,
    ) -> StoreResult<Arc<Snapshot>>
    where
        F: Fn(u64) -> Fut,
        Fut: Future<Output = StoreResult<pb::ChangesResponse>> + Send + 'static,
    {
        if !own_poll {
            let shared = wait(self.plan(key, since, &fetch)).await?;
            if !shared.resp.truncated || shared.since == since {
                return Ok(shared);
            }
            // The log does not reach back to the shared poll's start; it may reach ours.
        }
        counter_calls("own");
        let resp = fetch(since).await?;
        Ok(Arc::new(Snapshot { since, resp }))
    }

    /// Use the kept answer, join the poll in flight, or start a poll (spawned, so it
    /// completes for everyone who joined it even if the session that started it goes away).
    fn plan<F, Fut>(&self, key: Key, since: u64, fetch: &F) -> Plan
    where
        F: Fn(u64) -> Fut,
        Fut: Future<Output = StoreResult<pb::ChangesResponse>> + Send + 'static,
    {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let fresh = inner.next();
        let e = inner.entries.entry(key).or_insert(Entry {
            generation: fresh,
            inflight: None,
            last: None,
        });
        let need = e.generation;
        if let Some((g, s, _)) = &e.last
            && *g >= need
            && s.since <= since
        {
            counter_shared("cached");
            return Plan::Ready(s.clone());
        }
        if let Some(f) = &e.inflight
            && f.generation >= need
            && f.since <= since
            && f.rx.has_changed().is_ok()
        {
            counter_shared("joined");
            return Plan::Wait(f.rx.clone());
        }
        // A new poll: current, and reaching back at least as far as a poll in flight that
        // this session could not use, so it replaces it for later sessions.
        let id = fresh;
        let (tx, rx) = watch::channel(None);
        e.inflight = Some(Inflight {
            id,
            since,
            generation: need,
            rx: rx.clone(),
        });
        counter_calls("shared");
        let call = fetch(since);
        let this = self.clone();
        tokio::spawn(async move {
            let r = call.await.map(|resp| Arc::new(Snapshot { since, resp }));
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
            let tick = inner.next_id + 1;
            inner.next_id = tick;
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

async fn wait(plan: Plan) -> Outcome {
    match plan {
        Plan::Ready(s) => Ok(s),
        Plan::Wait(mut rx) => match rx.wait_for(Option::is_some).await {
            Ok(v) => v.clone().expect("is_some"),
            Err(_) => Err(ServiceError::Unavailable("change poll abandoned".into())),
        },
    }
}

fn counter_calls(kind: &'static str) {
    mailsuite_runtime::metrics::counter("mailsuite_imap_changes_calls_total", &[("kind", kind)])
        .inc();
}

fn counter_shared(how: &'static str) {
    mailsuite_runtime::metrics::counter("mailsuite_imap_changes_shared_total", &[("how", how)])
        .inc();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::sync::Semaphore;

    /// A fake store: counts calls, answers only once the gate opens. The mailbox holds
    /// UID 1 changed at modseq 5 and UID 2 at modseq 8, UID 3 expunged; the log starts at 2.
    struct Fake {
        calls: Arc<AtomicUsize>,
        gate: Arc<Semaphore>,
    }

    impl Fake {
        fn new() -> Fake {
            Fake {
                calls: Arc::default(),
                gate: Arc::new(Semaphore::new(0)),
            }
        }

        fn open(&self) {
            self.gate.add_permits(Semaphore::MAX_PERMITS / 2);
        }

        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }

        fn fetch(
            &self,
        ) -> impl Fn(u64) -> futures::future::BoxFuture<'static, StoreResult<pb::ChangesResponse>>
        {
            let calls = self.calls.clone();
            let gate = self.gate.clone();
            move |since| {
                calls.fetch_add(1, Ordering::SeqCst);
                let gate = gate.clone();
                Box::pin(async move {
                    let _p = gate.acquire().await.expect("gate");
                    let all = [(1, 5), (2, 8)];
                    Ok(pb::ChangesResponse {
                        changed: all
                            .iter()
                            .filter(|(_, m)| *m > since)
                            .map(|&(uid, modseq)| pb::MessageFlags {
                                uid,
                                modseq,
                                ..Default::default()
                            })
                            .collect(),
                        expunged: if since < 6 { vec![3] } else { vec![] },
                        highestmodseq: 8,
                        truncated: since < 2,
                        ..Default::default()
                    })
                })
            }
        }
    }

    const K: Key = (1, 10);

    #[tokio::test]
    async fn one_poll_serves_every_session_at_or_above_its_since() {
        let cache = ChangeCache::default();
        let fake = Fake::new();
        let fetch = fake.fetch();
        let plans: Vec<Plan> = (0..1000).map(|_| cache.plan(K, 4, &fetch)).collect();
        let ahead = cache.plan(K, 6, &fetch);
        assert_eq!(fake.calls(), 1, "one poll in flight, joined by all");
        fake.open();
        let first = wait(cache.plan(K, 4, &fetch)).await.unwrap();
        for p in plans {
            assert!(
                Arc::ptr_eq(&wait(p).await.unwrap(), &first),
                "shared, not copied"
            );
        }
        let ahead = wait(ahead).await.unwrap();
        assert_eq!(ahead.since, 4);
        let uids: Vec<u32> = ahead.changed_after(6).map(|m| m.uid).collect();
        assert_eq!(uids, [2], "a session at modseq 6 sees only what is newer");
        // Kept: a session waking up after the poll finished asks nothing.
        let late = wait(cache.plan(K, 5, &fetch)).await.unwrap();
        assert!(Arc::ptr_eq(&late, &first));
        assert_eq!(fake.calls(), 1);
    }

    #[tokio::test]
    async fn a_session_behind_the_shared_poll_asks_for_its_own_range() {
        let cache = ChangeCache::default();
        let fake = Fake::new();
        let fetch = fake.fetch();
        let p = cache.plan(K, 6, &fetch);
        let behind = cache.plan(K, 4, &fetch);
        assert_eq!(fake.calls(), 2);
        // The wider poll replaced the narrower one for later sessions.
        let later = cache.plan(K, 7, &fetch);
        assert_eq!(fake.calls(), 2);
        fake.open();
        assert_eq!(wait(p).await.unwrap().since, 6);
        assert_eq!(wait(behind).await.unwrap().since, 4);
        assert_eq!(wait(later).await.unwrap().since, 4);
    }

    #[tokio::test]
    async fn an_event_makes_earlier_polls_and_answers_stale() {
        let cache = ChangeCache::default();
        let fake = Fake::new();
        let fetch = fake.fetch();
        let before = cache.plan(K, 4, &fetch);
        // The event for a change committed after that poll started.
        cache.on_event(K.0, K.1);
        let after = cache.plan(K, 4, &fetch);
        assert_eq!(fake.calls(), 2, "a poll older than the event is not joined");
        // Events of other mailboxes and accounts change nothing here.
        cache.on_event(K.0, 11);
        cache.on_event(2, K.1);
        let joined = cache.plan(K, 4, &fetch);
        assert_eq!(fake.calls(), 2);
        fake.open();
        wait(before).await.unwrap();
        let a = wait(after).await.unwrap();
        assert!(Arc::ptr_eq(&a, &wait(joined).await.unwrap()));
        // The answer is kept until the next event of the mailbox, then asked anew.
        assert!(matches!(cache.plan(K, 4, &fetch), Plan::Ready(_)));
        cache.on_event(K.0, K.1);
        wait(cache.plan(K, 4, &fetch)).await.unwrap();
        assert_eq!(fake.calls(), 3);
        // A resync makes everything stale.
        cache.on_resync();
        wait(cache.plan(K, 4, &fetch)).await.unwrap();
        assert_eq!(fake.calls(), 4);
        assert!(cache.lock().entries.len() == 1);
    }

    #[tokio::test]
    async fn a_slow_poll_from_before_an_entry_was_dropped_is_never_used() {
        use tokio::sync::oneshot;
        let cache = ChangeCache::default();
        let (senders, gates): (Vec<_>, VecDeque<_>) = (0..3).map(|_| oneshot::channel()).unzip();
        let gates = Arc::new(Mutex::new(gates));
        let calls = Arc::new(AtomicUsize::new(0));
        let fetch = {
            let calls = calls.clone();
            move |_since: u64| {
                let n = calls.fetch_add(1, Ordering::SeqCst) as u64 + 1;
                let gate: oneshot::Receiver<()> = gates.lock().unwrap().pop_front().unwrap();
                async move {
                    gate.await.unwrap();
                    Ok(pb::ChangesResponse {
                        highestmodseq: n,
                        ..Default::default()
                    })
                }
            }
        };
        let mut senders = senders.into_iter();
        let (s1, s2, s3) = (
            senders.next().unwrap(),
            senders.next().unwrap(),
            senders.next().unwrap(),
        );
        let p1 = cache.plan(K, 4, &fetch);
        cache.on_event(K.0, K.1);
        let p2 = cache.plan(K, 4, &fetch);
        s2.send(()).unwrap();
        assert_eq!(wait(p2).await.unwrap().resp.highestmodseq, 2);
        // The next event empties the entry, which goes; a session then starts a new one.
        cache.on_event(K.0, K.1);
        assert!(cache.lock().entries.is_empty());
        let p3 = cache.plan(K, 4, &fetch);
        // The first poll, started before both events, ends only now.
        s1.send(()).unwrap();
        assert_eq!(wait(p1).await.unwrap().resp.highestmodseq, 1);
        let p4 = cache.plan(K, 4, &fetch);
        assert!(matches!(p4, Plan::Wait(_)), "the stale answer is not kept");
        s3.send(()).unwrap();
        assert_eq!(wait(p4).await.unwrap().resp.highestmodseq, 3);
        assert_eq!(wait(p3).await.unwrap().resp.highestmodseq, 3);
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_truncated_shared_answer_sends_other_sessions_to_their_own_poll() {
        let cache = ChangeCache::default();
        let fake = Fake::new();
        fake.open();
        let s = cache.changes_via(K, 1, false, fake.fetch()).await.unwrap();
        assert!(s.resp.truncated && s.since == 1);
        let own = cache.changes_via(K, 3, false, fake.fetch()).await.unwrap();
        assert!(!own.resp.truncated && own.since == 3);
        assert_eq!(fake.calls(), 2);
        // A forced poll is always the session's own.
        cache.changes_via(K, 3, true, fake.fetch()).await.unwrap();
        assert_eq!(fake.calls(), 3);
    }

    #[tokio::test]
    async fn kept_answers_are_bounded() {
        let cache = ChangeCache::new(CacheLimits {
            mailboxes: 3,
            entries: 100,
        });
        let fake = Fake::new();
        fake.open();
        for mailbox in 0..50 {
            for _ in 0..3 {
                cache
                    .changes_via((1, mailbox), 4, false, fake.fetch())
                    .await
                    .unwrap();
                cache.on_event(1, mailbox % 7);
            }
        }
        {
            let inner = cache.lock();
            assert!(inner.kept <= 3, "{}", inner.kept);
            assert!(inner.entries.len() <= 3);
            assert!(inner.order.len() <= 2 * 3 + 64);
            let size: usize = inner
                .entries
                .values()
                .filter_map(|e| e.last.as_ref())
                .map(|l| l.1.size())
                .sum();
            assert_eq!(size, inner.kept_size);
        }
        // An answer larger than the whole budget is shared but not kept.
        let tiny = ChangeCache::new(CacheLimits {
            mailboxes: 3,
            entries: 2,
        });
        tiny.changes_via(K, 4, false, fake.fetch()).await.unwrap();
        assert!(tiny.lock().entries.is_empty());
    }
}
