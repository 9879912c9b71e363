//! Failed logins per client address and per user name, shared by all connections of the
//! gateway: a guesser that reconnects after each connection's failure limit is still slowed
//! down, and so is one spread over many addresses. IPv6 clients are keyed by their /64 (one
//! host usually owns the whole prefix).
//!
//! An attempt is counted as a failure *before* the password is checked (`begin`) and given
//! back if it was not one (`Attempt::release`): checking first and counting afterwards let
//! every one of 50 parallel connections get a guess in before the first failure was
//! recorded.

use std::collections::HashMap;
use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hash};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct AuthLimiter {
    by_ip: Limit<IpAddr>,
    /// Keyed by a keyed hash of the lower-cased user name: bounded size whatever is sent.
    by_account: Limit<u64>,
    hasher: RandomState,
}

struct Limit<K> {
    max_failures: u32,
    window: Duration,
    capacity: usize,
    table: Mutex<Table<K>>,
}

struct Table<K> {
    entries: HashMap<K, Entry>,
    /// Recency order of failures (an Instant can repeat on coarse clocks).
    tick: u64,
}

struct Entry {
    failures: u32,
    since: Instant,
    last: u64,
}

/// The address an entry is kept under (IPv6 by /64), as every per-client limit keys it.
pub use mailsuite_runtime::listener::client_key as key;

/// A login attempt counted as a failure in advance. Dropping it (or `fail`) keeps it
/// counted; `release` gives it back.
#[must_use = "an attempt is a failure unless released"]
pub struct Attempt<'a> {
    limiter: &'a AuthLimiter,
    ip: Option<(IpAddr, Instant)>,
    account: Option<(u64, Instant)>,
}

impl Attempt<'_> {
    /// The attempt was not a failed guess (it succeeded, or the store could not tell).
    pub fn release(self) {
        if let Some((k, since)) = self.ip {
            self.limiter.by_ip.release(&k, since);
        }
        if let Some((k, since)) = self.account {
            self.limiter.by_account.release(&k, since);
        }
    }

    /// The attempt failed: it stays counted.
    pub fn fail(self) {}
}

/// Why an attempt was refused without checking the password.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blocked {
    Address,
    Account,
}

impl<K: Hash + Eq + Copy> Limit<K> {
    fn new(max_failures: u32, window: Duration, capacity: usize) -> Self {
        Limit {
            max_failures,
            window,
            capacity: capacity.max(1),
            table: Mutex::new(Table {
                entries: HashMap::new(),
                tick: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table<K>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn blocked(&self, k: &K) -> bool {
        if self.max_failures == 0 {
            return false;
        }
        let now = Instant::now();
        self.lock().entries.get(k).is_some_and(|e| {
            now.duration_since(e.since) < self.window && e.failures >= self.max_failures
        })
    }

    /// Count one failure for `k` unless it is at its limit already; returns the window the
    /// failure was counted in (to release it later), `Err` when blocked, `Ok(None)` when
    /// this limit is off.
    fn reserve(&self, k: K, enforce: bool) -> Result<Option<Instant>, ()> {
        if self.max_failures == 0 {
            return Ok(None);
        }
        let now = Instant::now();
        let mut guard = self.lock();
        guard.tick += 1;
        let tick = guard.tick;
        if let Some(e) = guard.entries.get(&k)
            && enforce
            && now.duration_since(e.since) < self.window
            && e.failures >= self.max_failures
        {
            return Err(());
        }
        let t = &mut guard.entries;
        if !t.contains_key(&k) && t.len() >= self.capacity {
            // Full: drop expired entries; if none, the least recently active one. Never the
            // whole table, which would pardon every attacker at once.
            t.retain(|_, e| now.duration_since(e.since) < self.window);
            if t.len() >= self.capacity
                && let Some(oldest) = t.iter().min_by_key(|(_, e)| e.last).map(|(k, _)| *k)
            {
                t.remove(&oldest);
            }
        }
        let e = t.entry(k).or_insert(Entry {
            failures: 0,
            since: now,
            last: tick,
        });
        if now.duration_since(e.since) >= self.window {
            e.failures = 0;
            e.since = now;
        }
        e.failures = e.failures.saturating_add(1);
        e.last = tick;
        Ok(Some(e.since))
    }

    fn release(&self, k: &K, since: Instant) {
        let mut guard = self.lock();
        // Only within the window it was counted in: a newer window holds newer failures.
        if let Some(e) = guard.entries.get_mut(k)
            && e.since == since
        {
            e.failures = e.failures.saturating_sub(1);
        }
    }
}

impl AuthLimiter {
    /// Per address: at most `max_failures` failed logins per `window` (0 disables).
    pub fn new(max_failures: u32, window: Duration, capacity: usize) -> Self {
        AuthLimiter {
            by_ip: Limit::new(max_failures, window, capacity),
            by_account: Limit::new(0, window, capacity),
            hasher: RandomState::new(),
        }
    }

    /// Also at most `max_failures` failed logins per user name per `window` (0 disables).
    pub fn with_account_limit(mut self, max_failures: u32, window: Duration) -> Self {
        let capacity = self.by_ip.capacity;
        self.by_account = Limit::new(max_failures, window, capacity);
        self
    }

    fn account_key(&self, user: &str) -> u64 {
        self.hasher.hash_one(user.trim().to_lowercase())
    }

    /// Whether logins from `ip` are refused for now.
    pub fn blocked(&self, ip: IpAddr) -> bool {
        self.by_ip.blocked(&key(ip))
    }

    /// Start a login attempt by `user` from `ip`: refused if either is at its limit,
    /// otherwise counted as a failure until released.
    pub fn begin(&self, ip: IpAddr, user: &str) -> Result<Attempt<'_>, Blocked> {
        let ip_key = key(ip);
        let ip = self
            .by_ip
            .reserve(ip_key, true)
            .map_err(|()| Blocked::Address)?
            .map(|since| (ip_key, since));
        let account_key = self.account_key(user);
        let account = match self.by_account.reserve(account_key, true) {
            Ok(since) => since.map(|s| (account_key, s)),
            Err(()) => {
                // This attempt never reaches the store: it is not a guess at the password,
                // so the address is not charged for it.
                if let Some((k, since)) = ip {
                    self.by_ip.release(&k, since);
                }
                return Err(Blocked::Account);
            }
        };
        Ok(Attempt {
            limiter: self,
            ip,
            account,
        })
    }

    /// Count a failure from `ip` without an attempt (e.g. a malformed exchange).
    pub fn record_failure(&self, ip: IpAddr) {
        let _ = self.by_ip.reserve(key(ip), false);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_ip.lock().entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn blocks_after_the_limit_per_address_and_ipv6_prefix() {
        let l = AuthLimiter::new(3, Duration::from_secs(60), 100);
        for _ in 0..2 {
            l.record_failure(ip("2001:db8:1:2::1"));
        }
        assert!(!l.blocked(ip("2001:db8:1:2::1")));
        l.record_failure(ip("2001:db8:1:2:ffff::9"));
        assert!(l.blocked(ip("2001:db8:1:2::1")), "same /64");
        assert!(!l.blocked(ip("2001:db8:1:3::1")), "other /64");
        assert!(!l.blocked(ip("192.0.2.1")));
        for _ in 0..3 {
            l.record_failure(ip("::ffff:192.0.2.1"));
        }
        assert!(l.blocked(ip("192.0.2.1")), "v4-mapped is the v4 address");
    }

    #[test]
    fn failures_expire_with_the_window() {
        let l = AuthLimiter::new(1, Duration::from_millis(1), 100);
        l.record_failure(ip("192.0.2.1"));
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(2) {
            std::hint::spin_loop();
        }
        assert!(!l.blocked(ip("192.0.2.1")));
    }

    #[test]
    fn a_full_table_evicts_one_entry_not_all() {
        let l = AuthLimiter::new(1, Duration::from_secs(60), 3);
        for a in ["192.0.2.1", "192.0.2.2", "192.0.2.3"] {
            l.record_failure(ip(a));
        }
        l.record_failure(ip("192.0.2.2"));
        l.record_failure(ip("192.0.2.4"));
        assert_eq!(l.len(), 3);
        assert!(!l.blocked(ip("192.0.2.1")), "least recently active evicted");
        for a in ["192.0.2.2", "192.0.2.3", "192.0.2.4"] {
            assert!(l.blocked(ip(a)), "{a} kept");
        }
    }
    #[test]
    fn m4_ipv6_clients_are_keyed_by_their_64() {
        assert_eq!(key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(
            key(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")),
            ip("2001:db8:1:2::")
        );
        assert_ne!(key(ip("2001:db8:1:3::1")), key(ip("2001:db8:1:2::1")));
        assert_eq!(key(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(key(ip("192.0.2.7")), ip("192.0.2.7"));
        // A whole /64 shares one budget of attempts.
        let l = AuthLimiter::new(2, Duration::from_secs(60), 100);
        l.begin(ip("2001:db8:1:2::1"), "a").unwrap().fail();
        l.begin(ip("2001:db8:1:2:ffff::2"), "b").unwrap().fail();
        assert_eq!(
            l.begin(ip("2001:db8:1:2:1234::3"), "c").err(),
            Some(Blocked::Address)
        );
        assert!(l.begin(ip("2001:db8:1:3::1"), "c").is_ok(), "other /64");
    }

    #[test]
    fn l7_parallel_attempts_are_counted_before_the_check_completes() {
        let l = std::sync::Arc::new(AuthLimiter::new(5, Duration::from_secs(60), 100));
        // 50 attempts in flight at once, none finished: only 5 may proceed.
        let held: Vec<Attempt<'_>> = (0..50)
            .filter_map(|_| l.begin(ip("192.0.2.1"), "bob").ok())
            .collect();
        assert_eq!(held.len(), 5);
        for a in held {
            a.fail();
        }
        assert!(l.blocked(ip("192.0.2.1")));
        // The same from 50 threads.
        let l = std::sync::Arc::new(AuthLimiter::new(5, Duration::from_secs(60), 100));
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(50));
        let got: usize = (0..50)
            .map(|_| {
                let (l, barrier) = (l.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    let a = l.begin(ip("192.0.2.1"), "bob");
                    let ok = a.is_ok();
                    // Keep it counted (a failed guess).
                    if let Ok(a) = a {
                        a.fail();
                    }
                    ok as usize
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .sum();
        assert_eq!(got, 5);
    }

    #[test]
    fn l7_a_released_attempt_is_not_a_failure() {
        let l = AuthLimiter::new(2, Duration::from_secs(60), 100);
        for _ in 0..10 {
            l.begin(ip("192.0.2.1"), "bob").unwrap().release();
        }
        assert!(!l.blocked(ip("192.0.2.1")));
        l.begin(ip("192.0.2.1"), "bob").unwrap().fail();
        l.begin(ip("192.0.2.1"), "bob").unwrap().fail();
        assert!(l.blocked(ip("192.0.2.1")));
    }

    #[test]
    fn l7_failures_per_account_are_limited_across_addresses() {
        let l = AuthLimiter::new(0, Duration::from_secs(60), 100)
            .with_account_limit(3, Duration::from_secs(60));
        for i in 1..=3 {
            l.begin(ip(&format!("192.0.2.{i}")), "Bob@Example.test")
                .unwrap()
                .fail();
        }
        assert_eq!(
            l.begin(ip("198.51.100.1"), " bob@example.TEST").err(),
            Some(Blocked::Account),
            "user names compare case-insensitively"
        );
        assert!(l.begin(ip("198.51.100.1"), "alice@example.test").is_ok());
        // A refusal for the account does not charge the address.
        let l = AuthLimiter::new(1, Duration::from_secs(60), 100)
            .with_account_limit(1, Duration::from_secs(60));
        l.begin(ip("192.0.2.1"), "bob").unwrap().fail();
        assert_eq!(
            l.begin(ip("192.0.2.2"), "bob").err(),
            Some(Blocked::Account)
        );
        assert!(!l.blocked(ip("192.0.2.2")));
    }
}
