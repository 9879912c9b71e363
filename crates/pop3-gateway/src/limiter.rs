//! Failed logins per client address, shared by every connection of this gateway process, so
//! that opening many connections does not multiply the number of guesses a client gets.
//!
//! A client is an IPv4 address or an IPv6 /64: one host usually owns a whole /64, so keying by
//! the full IPv6 address would let it start afresh with every source address it picks.
//!
//! Memory is bounded: at most `capacity` clients are tracked. When the table is full, expired
//! windows go first; if that frees nothing, the least active tenth goes (fewest failures, then
//! oldest window). Active offenders have the highest counts, so a flood of new addresses
//! cannot wipe the counters that block them, and the table is never cleared wholesale.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mailsuite_runtime::listener::client_key;

#[derive(Clone, Copy)]
struct Entry {
    start: Instant,
    failures: u32,
}

pub struct AuthLimiter {
    entries: Mutex<HashMap<IpAddr, Entry>>,
    window: Duration,
    capacity: usize,
}

impl AuthLimiter {
    pub fn new(window: Duration, capacity: usize) -> Self {
        AuthLimiter {
            entries: Mutex::new(HashMap::new()),
            window: window.max(Duration::from_secs(1)),
            capacity: capacity.max(1),
        }
    }

    fn live(&self, e: &Entry, now: Instant) -> bool {
        now.duration_since(e.start) < self.window
    }

    /// Record a failed login from `ip`; returns the failures of its client in the window.
    pub fn failed(&self, ip: IpAddr) -> u32 {
        let key = client_key(ip);
        let now = Instant::now();
        let mut map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= self.capacity && !map.contains_key(&key) {
            map.retain(|_, e| now.duration_since(e.start) < self.window);
            if map.len() >= self.capacity {
                // Evicting a tenth at once keeps the O(n) selection amortised O(1) per insert.
                let n = (self.capacity / 10).max(1);
                let mut order: Vec<(u32, Instant, IpAddr)> =
                    map.iter().map(|(k, e)| (e.failures, e.start, *k)).collect();
                if n < order.len() {
                    order.select_nth_unstable(n - 1);
                }
                for (_, _, k) in order.into_iter().take(n) {
                    map.remove(&k);
                }
            }
        }
        let e = map.entry(key).or_insert(Entry {
            start: now,
            failures: 0,
        });
        if now.duration_since(e.start) >= self.window {
            *e = Entry {
                start: now,
                failures: 0,
            };
        }
        e.failures = e.failures.saturating_add(1);
        e.failures
    }

    /// The failures of `ip`'s client in the current window.
    pub fn failures(&self, ip: IpAddr) -> u32 {
        let now = Instant::now();
        let map = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&client_key(ip))
            .filter(|e| self.live(e, now))
            .map_or(0, |e| e.failures)
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.entries.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_accumulate_per_client() {
        let l = AuthLimiter::new(Duration::from_secs(60), 100);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert_eq!(l.failures(a), 0);
        assert_eq!(l.failed(a), 1);
        assert_eq!(l.failed(a), 2);
        assert_eq!(l.failures(a), 2);
        assert_eq!(l.failures(b), 0);
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(l.failed(mapped), 3, "IPv4-mapped is the same client");
    }

    #[test]
    fn ipv6_is_counted_per_64() {
        let l = AuthLimiter::new(Duration::from_secs(60), 100);
        l.failed("2001:db8:1:2::1".parse().unwrap());
        l.failed("2001:db8:1:2:ffff:1234:5678:9abc".parse().unwrap());
        assert_eq!(l.failures("2001:db8:1:2::99".parse().unwrap()), 2);
        assert_eq!(l.failures("2001:db8:1:3::1".parse().unwrap()), 0);
    }

    #[test]
    fn a_full_table_keeps_the_offenders_counters() {
        let l = AuthLimiter::new(Duration::from_secs(60), 100);
        let attacker: IpAddr = "198.51.100.7".parse().unwrap();
        for _ in 0..5 {
            l.failed(attacker);
        }
        for i in 0..5_000u32 {
            l.failed(IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i)));
            assert!(l.tracked() <= 100, "bounded");
        }
        assert_eq!(l.failures(attacker), 5, "the attacker survives the flood");
    }
}
