//! Per-client event counts over a time window, the one table behind every per-client rate
//! limit of the gateways (AUTH failures, messages, ETRN per client and window).
//!
//! A client is an IPv4 address or an IPv6 /64: one host usually owns a whole /64, so keying by
//! the full IPv6 address would let it start afresh with every source address it picks.
//!
//! Windows are fixed: a key's window starts with its first event and the count starts over
//! with the first event after it ends. Time is passed in, so callers and tests decide what
//! "now" is.
//!
//! Memory is bounded: at most `capacity` keys are held. Inserting into a full table drops the
//! least recently active tenth (expired windows first) in one pass, so the O(n) selection
//! costs O(1) per insert amortised and the table is never cleared wholesale, which would
//! pardon every offender at once. Evicting an offender takes a tenth of the capacity of newer
//! keys, each of which had its own allowance, so a flood buys no extra attempts.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The key per-client limits count under; see [`client_key`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientKey(IpAddr);

impl ClientKey {
    /// The IPv4 address, or the first address of the IPv6 /64.
    pub fn addr(self) -> IpAddr {
        self.0
    }
}

impl fmt::Display for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V4(a) => write!(f, "{a}"),
            IpAddr::V6(a) => write!(f, "{a}/64"),
        }
    }
}

/// An IPv4 address as it is, an IPv6 address by its /64 (one subscriber or host usually holds
/// a whole /64, so per-address counting would let it take every slot), an IPv4-mapped IPv6
/// address as the IPv4 address (dual-stack sockets report IPv4 clients that way).
pub fn client_key(ip: IpAddr) -> ClientKey {
    ClientKey(match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(a) => match a.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(a) & !((1u128 << 64) - 1)).into()),
        },
    })
}

/// One event counted by [`ClientWindows::record`] or [`ClientWindows::try_record`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counted {
    /// Events of the key in its window, this one included (0 when the table has no limit
    /// and `try_record` counted nothing).
    pub count: u32,
    /// The window it was counted in; `release` only gives it back to that window, since a
    /// newer one holds newer events.
    window: Option<Instant>,
}

struct Entry {
    start: Instant,
    count: u32,
    /// Recency of the last event; a tick rather than an Instant, which can repeat on coarse
    /// clocks (and does with injected time).
    last: u64,
}

struct Table<K> {
    entries: HashMap<K, Entry>,
    tick: u64,
}

/// Events per key in a window of `window`, at most `max` of them (0 = no limit), for at most
/// `capacity` keys. Shared by all connections of a process, hence the lock inside.
pub struct ClientWindows<K = ClientKey> {
    window: Duration,
    max: u32,
    capacity: usize,
    table: Mutex<Table<K>>,
}

impl<K: Hash + Eq + Copy> ClientWindows<K> {
    pub fn new(window: Duration, max: u32, capacity: usize) -> Self {
        ClientWindows {
            window,
            max,
            capacity: capacity.max(1),
            table: Mutex::new(Table {
                entries: HashMap::new(),
                tick: 0,
            }),
        }
    }

    pub fn max(&self) -> u32 {
        self.max
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    fn lock(&self) -> MutexGuard<'_, Table<K>> {
        // A panic elsewhere while holding the lock leaves counts that are still usable.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn live(&self, e: &Entry, now: Instant) -> bool {
        now.saturating_duration_since(e.start) < self.window
    }

    /// Events of `key` in its current window.
    pub fn count(&self, key: K, now: Instant) -> u32 {
        self.lock()
            .entries
            .get(&key)
            .filter(|e| self.live(e, now))
            .map_or(0, |e| e.count)
    }

    /// Whether one more event of `key` is within `max` (always, when `max` is 0).
    pub fn check(&self, key: K, now: Instant) -> bool {
        self.max == 0 || self.count(key, now) < self.max
    }

    /// Count an event of `key` whatever the limit.
    pub fn record(&self, key: K, now: Instant) -> Counted {
        let mut t = self.lock();
        self.count_in(&mut t, key, now)
    }

    /// Count an event of `key` if it is within `max`, in one step so that concurrent callers
    /// cannot all pass the check before any of them is counted. `None`: over the limit. With
    /// no limit (`max` 0) nothing is counted.
    pub fn try_record(&self, key: K, now: Instant) -> Option<Counted> {
        if self.max == 0 {
            return Some(Counted {
                count: 0,
                window: None,
            });
        }
        let mut t = self.lock();
        if t.entries
            .get(&key)
            .is_some_and(|e| self.live(e, now) && e.count >= self.max)
        {
            return None;
        }
        Some(self.count_in(&mut t, key, now))
    }

    /// Give back an event counted earlier (it turned out not to be one), unless its window
    /// has ended since.
    pub fn release(&self, key: K, counted: Counted) {
        let Some(window) = counted.window else {
            return;
        };
        if let Some(e) = self.lock().entries.get_mut(&key)
            && e.start == window
        {
            e.count = e.count.saturating_sub(1);
        }
    }

    fn count_in(&self, t: &mut Table<K>, key: K, now: Instant) -> Counted {
        t.tick += 1;
        let tick = t.tick;
        if t.entries.len() >= self.capacity && !t.entries.contains_key(&key) {
            self.evict(t, now);
        }
        let e = t.entries.entry(key).or_insert(Entry {
            start: now,
            count: 0,
            last: tick,
        });
        if !self.live(e, now) {
            e.start = now;
            e.count = 0;
        }
        e.count = e.count.saturating_add(1);
        e.last = tick;
        Counted {
            count: e.count,
            window: Some(e.start),
        }
    }

    /// Drop the least recently active tenth, expired windows counting as least active.
    fn evict(&self, t: &mut Table<K>, now: Instant) {
        let n = (self.capacity / 10).max(1);
        let mut order: Vec<(bool, u64, K)> = t
            .entries
            .iter()
            .map(|(k, e)| (self.live(e, now), e.last, *k))
            .collect();
        if n < order.len() {
            order.select_nth_unstable_by_key(n - 1, |&(live, last, _)| (live, last));
        }
        for (_, _, k) in order.into_iter().take(n) {
            t.entries.remove(&k);
        }
    }

    /// Keys held right now.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn key(s: &str) -> ClientKey {
        client_key(ip(s))
    }

    const MIN: Duration = Duration::from_secs(60);

    #[test]
    fn ipv4_is_keyed_per_address() {
        assert_eq!(key("192.0.2.7"), key("192.0.2.7"));
        assert_ne!(key("192.0.2.7"), key("192.0.2.8"));
        assert_eq!(key("192.0.2.7").addr(), ip("192.0.2.7"));
        assert_eq!(key("192.0.2.7").to_string(), "192.0.2.7");
    }

    #[test]
    fn ipv6_in_one_64_shares_a_key_and_another_64_does_not() {
        assert_eq!(
            key("2001:db8:1:2::1"),
            key("2001:db8:1:2:ffff:ffff:ffff:ffff")
        );
        assert_eq!(key("2001:db8:1:2:aaaa::1"), key("2001:db8:1:2:1234::3"));
        assert_eq!(key("2001:db8:1:2:aaaa::1").addr(), ip("2001:db8:1:2::"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db9:1:2::1"));
        assert_eq!(key("2001:db8:1:2::1").to_string(), "2001:db8:1:2::/64");
    }

    #[test]
    fn ipv4_mapped_ipv6_is_the_ipv4_address() {
        assert_eq!(key("::ffff:192.0.2.7"), key("192.0.2.7"));
        assert_eq!(key("::ffff:192.0.2.7").to_string(), "192.0.2.7");
        assert_ne!(key("::ffff:192.0.2.7"), key("::ffff:192.0.2.8"));
    }

    #[test]
    fn counts_per_key_up_to_max() {
        let w = ClientWindows::new(MIN, 2, 100);
        let t = Instant::now();
        let (a, b) = (key("192.0.2.1"), key("192.0.2.2"));
        assert_eq!(w.count(a, t), 0);
        assert!(w.try_record(a, t).is_some());
        assert_eq!(w.try_record(a, t).map(|c| c.count), Some(2));
        assert!(w.try_record(a, t).is_none(), "at max");
        assert_eq!(w.count(a, t), 2, "a refused event is not counted");
        assert!(!w.check(a, t));
        assert!(w.check(b, t));
        assert_eq!(w.record(a, t).count, 3, "record counts past max");
    }

    #[test]
    fn max_zero_is_no_limit() {
        let w = ClientWindows::new(MIN, 0, 100);
        let t = Instant::now();
        let a = key("192.0.2.1");
        for _ in 0..1000 {
            assert!(w.try_record(a, t).is_some());
        }
        assert!(w.is_empty(), "nothing counted without a limit");
        w.record(a, t);
        assert!(w.check(a, t));
    }

    #[test]
    fn a_window_expires_with_injected_time() {
        let w = ClientWindows::new(MIN, 1, 100);
        let t = Instant::now();
        let a = key("192.0.2.1");
        w.record(a, t);
        w.record(a, t + Duration::from_secs(30));
        assert!(!w.check(a, t + Duration::from_secs(59)));
        assert_eq!(w.count(a, t + Duration::from_secs(59)), 2);
        // Fixed from the first event: the second one does not extend it.
        assert_eq!(w.count(a, t + MIN), 0);
        assert!(w.check(a, t + MIN));
        assert_eq!(w.record(a, t + MIN).count, 1, "a new window starts");
    }

    #[test]
    fn release_gives_back_only_to_the_window_it_was_counted_in() {
        let w = ClientWindows::new(MIN, 2, 100);
        let t = Instant::now();
        let a = key("192.0.2.1");
        let c = w.try_record(a, t).unwrap();
        w.release(a, c);
        assert_eq!(w.count(a, t), 0);
        let old = w.try_record(a, t).unwrap();
        let later = t + MIN;
        w.record(a, later);
        w.release(a, old);
        assert_eq!(w.count(a, later), 1, "the new window keeps its event");
    }

    #[test]
    fn parallel_try_records_never_pass_max() {
        let w = std::sync::Arc::new(ClientWindows::new(MIN, 5, 100));
        let t = Instant::now();
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(50));
        let got: usize = (0..50)
            .map(|_| {
                let (w, barrier) = (w.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    usize::from(w.try_record(key("192.0.2.1"), t).is_some())
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .sum();
        assert_eq!(got, 5);
    }

    #[test]
    fn capacity_is_never_exceeded() {
        let w = ClientWindows::new(MIN, 10, 100);
        let t = Instant::now();
        for i in 0..5_000u32 {
            w.record(client_key(IpAddr::V4((0x0a00_0000 + i).into())), t);
            assert!(w.len() <= 100);
        }
        // A tenth goes at once, so the table refills for ten inserts before the next pass.
        assert!(w.len() > 90);
    }

    #[test]
    fn a_full_table_evicts_the_least_recently_active_tenth() {
        let w = ClientWindows::new(MIN, 1, 20);
        let t = Instant::now();
        let k = |i: u32| client_key(IpAddr::V4((0x0a00_0000 + i).into()));
        for i in 0..20 {
            w.record(k(i), t);
        }
        // 0 and 1 were first, but are the most recent now.
        w.record(k(0), t);
        w.record(k(1), t);
        w.record(k(100), t);
        assert_eq!(w.len(), 19, "two (a tenth) went, one came");
        assert_eq!(w.count(k(2), t), 0, "least recently active evicted");
        assert_eq!(w.count(k(3), t), 0, "least recently active evicted");
        for i in [0, 1, 4, 19, 100] {
            assert!(w.count(k(i), t) > 0, "{i} kept");
        }
    }

    #[test]
    fn expired_windows_go_before_live_ones() {
        let w = ClientWindows::new(MIN, 1, 10);
        let t = Instant::now();
        let k = |i: u32| client_key(IpAddr::V4((0x0a00_0000 + i).into()));
        for i in 0..9 {
            w.record(k(i), t + MIN);
        }
        // The most recently active, but its window, started at t, is over by the next insert.
        w.record(k(50), t);
        w.record(k(50), t + Duration::from_secs(59));
        w.record(k(100), t + MIN + Duration::from_secs(59));
        assert_eq!(w.count(k(0), t + MIN), 1, "oldest live entry kept");
        assert_eq!(w.len(), 10);
    }

    #[test]
    fn an_offender_that_keeps_trying_survives_a_flood() {
        let w = ClientWindows::new(MIN, 3, 100);
        let t = Instant::now();
        let attacker = key("198.51.100.7");
        for _ in 0..5 {
            w.record(attacker, t);
        }
        for i in 0..5_000u32 {
            w.record(client_key(IpAddr::V4((0x0a00_0000 + i).into())), t);
            if i % 50 == 0 {
                // Its blocked attempts are still counted, so it stays recent.
                w.record(attacker, t);
            }
            assert!(w.len() <= 100, "bounded");
        }
        assert!(!w.check(attacker, t), "the attacker is still blocked");
    }

    #[test]
    fn other_key_types_share_the_table() {
        let w: ClientWindows<u64> = ClientWindows::new(MIN, 1, 10);
        let t = Instant::now();
        assert!(w.try_record(7, t).is_some());
        assert!(w.try_record(7, t).is_none());
        assert!(w.try_record(8, t).is_some());
    }
}
