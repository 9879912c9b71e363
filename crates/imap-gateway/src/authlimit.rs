//! Failed logins per client address, shared by all connections of the gateway: a guesser
//! that reconnects after each connection's failure limit is still slowed down. IPv6 clients
//! are keyed by their /64 (one host usually owns the whole prefix).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct AuthLimiter {
    max_failures: u32,
    window: Duration,
    capacity: usize,
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    entries: HashMap<IpAddr, Entry>,
    /// Recency order of failures (an Instant can repeat on coarse clocks).
    tick: u64,
}

struct Entry {
    failures: u32,
    since: Instant,
    last: u64,
}

/// The address an entry is kept under.
pub fn key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
    }
}

impl AuthLimiter {
    /// `max_failures` 0 disables the limiter.
    pub fn new(max_failures: u32, window: Duration, capacity: usize) -> Self {
        AuthLimiter {
            max_failures,
            window,
            capacity: capacity.max(1),
            table: Mutex::new(Table::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether logins from `ip` are refused for now.
    pub fn blocked(&self, ip: IpAddr) -> bool {
        if self.max_failures == 0 {
            return false;
        }
        let now = Instant::now();
        self.lock().entries.get(&key(ip)).is_some_and(|e| {
            now.duration_since(e.since) < self.window && e.failures >= self.max_failures
        })
    }

    pub fn record_failure(&self, ip: IpAddr) {
        if self.max_failures == 0 {
            return;
        }
        let now = Instant::now();
        let k = key(ip);
        let mut guard = self.lock();
        guard.tick += 1;
        let tick = guard.tick;
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
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().entries.len()
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
}
