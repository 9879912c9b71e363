//! Per-client rates shared by all connections of this process: messages, AUTH failures and
//! ETRN commands per minute (fixed one-minute windows).
//!
//! A client is an IPv4 address or an IPv6 /64: one host usually owns a whole /64, so keying by
//! the full IPv6 address would let it start afresh with every source address it picks.
//!
//! Memory is bounded: at most `capacity` clients are tracked. When the table is full, expired
//! windows go first; if that frees nothing, the least active tenth goes (fewest counted events,
//! then oldest window). Active offenders are the entries with the highest counts, so a flood of
//! new addresses cannot wipe the counters that block them.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(60);

/// Default number of clients tracked (about 5 MiB at most).
pub const DEFAULT_CAPACITY: usize = 100_000;

#[derive(Default)]
struct Window {
    start: Option<Instant>,
    messages: u32,
    auth_failures: u32,
    etrn: u32,
}

impl Window {
    fn current(&mut self, now: Instant) -> &mut Self {
        if !self.live(now) {
            *self = Window {
                start: Some(now),
                ..Window::default()
            };
        }
        self
    }

    fn live(&self, now: Instant) -> bool {
        self.start.is_some_and(|s| now.duration_since(s) < WINDOW)
    }

    fn activity(&self) -> u64 {
        u64::from(self.messages) + u64::from(self.auth_failures) + u64::from(self.etrn)
    }
}

/// The key a client is counted under (IPv6 by /64), as every per-client limit keys it.
pub use mailsuite_runtime::listener::client_key;

pub struct RateLimiter {
    ips: Mutex<HashMap<IpAddr, Window>>,
    capacity: usize,
}

impl Default for RateLimiter {
    fn default() -> Self {
        RateLimiter::new(DEFAULT_CAPACITY)
    }
}

impl RateLimiter {
    pub fn new(capacity: usize) -> Self {
        RateLimiter {
            ips: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
        }
    }

    fn with<T>(&self, ip: IpAddr, f: impl FnOnce(&mut Window) -> T) -> T {
        let key = client_key(ip);
        let now = Instant::now();
        let mut ips = self.ips.lock().unwrap_or_else(|p| p.into_inner());
        if ips.len() >= self.capacity && !ips.contains_key(&key) {
            ips.retain(|_, w| w.live(now));
            if ips.len() >= self.capacity {
                // Evicting a tenth at once keeps the O(n) selection amortised O(1) per insert.
                let n = (self.capacity / 10).max(1);
                let mut order: Vec<(u64, Option<Instant>, IpAddr)> = ips
                    .iter()
                    .map(|(k, w)| (w.activity(), w.start, *k))
                    .collect();
                if n < order.len() {
                    order.select_nth_unstable(n - 1);
                }
                for (_, _, k) in order.into_iter().take(n) {
                    ips.remove(&k);
                }
            }
        }
        f(ips.entry(key).or_default().current(now))
    }

    /// Count one message from `ip`; false when over `max` this minute (0 = unlimited).
    pub fn message_allowed(&self, ip: IpAddr, max: u32) -> bool {
        if max == 0 {
            return true;
        }
        self.with(ip, |w| {
            if w.messages >= max {
                false
            } else {
                w.messages += 1;
                true
            }
        })
    }

    /// Count one ETRN from `ip`; false when over `max` this minute (0 = unlimited).
    pub fn etrn_allowed(&self, ip: IpAddr, max: u32) -> bool {
        if max == 0 {
            return true;
        }
        self.with(ip, |w| {
            if w.etrn >= max {
                false
            } else {
                w.etrn += 1;
                true
            }
        })
    }

    /// Record an AUTH failure; returns the failures of this IP in the current minute.
    pub fn auth_failed(&self, ip: IpAddr) -> u32 {
        self.with(ip, |w| {
            w.auth_failures += 1;
            w.auth_failures
        })
    }

    /// Has `ip` already failed more than `max` times this minute (0 = unlimited)?
    pub fn auth_blocked(&self, ip: IpAddr, max: u32) -> bool {
        max > 0 && self.with(ip, |w| w.auth_failures > max)
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.ips.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_rate_is_per_ip() {
        let r = RateLimiter::default();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(r.message_allowed(a, 2));
        assert!(r.message_allowed(a, 2));
        assert!(!r.message_allowed(a, 2));
        assert!(r.message_allowed(b, 2));
        assert!(r.message_allowed(a, 0), "0 = unlimited");
    }

    #[test]
    fn auth_failures_accumulate() {
        let r = RateLimiter::default();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(r.auth_failed(a), 1);
        assert_eq!(r.auth_failed(a), 2);
        assert!(!r.auth_blocked(a, 2));
        r.auth_failed(a);
        assert!(r.auth_blocked(a, 2));
        assert!(!r.auth_blocked(a, 0));
    }

    #[test]
    fn a_full_table_keeps_the_offenders_counters() {
        let r = RateLimiter::new(100);
        let attacker: IpAddr = "198.51.100.7".parse().unwrap();
        for _ in 0..5 {
            r.auth_failed(attacker);
        }
        assert!(r.auth_blocked(attacker, 3));
        // A flood of fresh addresses, many times the capacity.
        for i in 0..5_000u32 {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            assert!(r.message_allowed(ip, 10));
            assert!(r.tracked() <= 100, "bounded");
        }
        assert!(
            r.auth_blocked(attacker, 3),
            "the attacker's failures survive the flood"
        );
    }

    /// M4: every counter of this limiter keys an IPv6 client by its /64 (one host usually
    /// owns a whole /64 and picks source addresses from it at will).
    #[test]
    fn m4_ipv6_clients_are_keyed_by_64() {
        let r = RateLimiter::default();
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff:1234:5678:9abc".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert!(r.message_allowed(a, 2));
        assert!(r.message_allowed(b, 2));
        assert!(!r.message_allowed(a, 2), "same /64 shares the budget");
        assert!(r.message_allowed(other, 2), "another /64 does not");
        r.auth_failed(a);
        r.auth_failed(b);
        assert!(r.auth_blocked("2001:db8:1:2::99".parse().unwrap(), 1));

        assert!(r.etrn_allowed(a, 1));
        assert!(!r.etrn_allowed(b, 1), "ETRN too");
        assert!(r.etrn_allowed(other, 1));
        assert_eq!(
            client_key("2001:db8:1:2:ffff::1".parse().unwrap()),
            "2001:db8:1:2::".parse::<IpAddr>().unwrap()
        );

        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(client_key(mapped), "192.0.2.1".parse::<IpAddr>().unwrap());
    }
}
