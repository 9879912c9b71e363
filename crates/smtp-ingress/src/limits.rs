//! Per-client rates shared by all connections of this process: messages, AUTH failures and
//! ETRN commands per client (`mailsuite_runtime::limiter::client_key`: an IPv4 address, an
//! IPv6 /64) per minute, each in fixed one-minute windows of its own table of at most
//! `limits.max_tracked_clients` clients. Separate tables keep a flood of one kind of traffic
//! from evicting the counters of another (fresh clients sending mail cannot wipe the AUTH
//! failures of a guesser).

use std::net::IpAddr;
use std::time::{Duration, Instant};

use mailsuite_runtime::limiter::{ClientWindows, client_key};

use crate::config::Limits;

const WINDOW: Duration = Duration::from_secs(60);

/// Default number of clients tracked per rate.
pub const DEFAULT_CAPACITY: usize = 100_000;

pub struct RateLimiter {
    messages: ClientWindows,
    auth_failures: ClientWindows,
    etrn: ClientWindows,
}

impl RateLimiter {
    pub fn new(limits: &Limits) -> Self {
        let table = |max| ClientWindows::new(WINDOW, max, limits.max_tracked_clients);
        let auth_window = Duration::from_secs(limits.auth_failure_window_secs.max(1));
        RateLimiter {
            messages: table(limits.max_messages_per_ip_per_minute),
            auth_failures: ClientWindows::new(
                auth_window,
                limits.max_auth_failures_per_ip,
                limits.max_tracked_clients,
            ),
            etrn: table(limits.max_etrn_per_ip_per_minute),
        }
    }

    /// Count one message from `ip`; false when over `max_messages_per_ip_per_minute`.
    pub fn message_allowed(&self, ip: IpAddr) -> bool {
        self.messages
            .try_record(client_key(ip), Instant::now())
            .is_some()
    }

    /// Count one ETRN from `ip`; false when over `max_etrn_per_ip_per_minute`.
    pub fn etrn_allowed(&self, ip: IpAddr) -> bool {
        self.etrn
            .try_record(client_key(ip), Instant::now())
            .is_some()
    }

    /// Record an AUTH failure; returns the failures of this client in the current minute.
    pub fn auth_failed(&self, ip: IpAddr) -> u32 {
        self.auth_failures
            .record(client_key(ip), Instant::now())
            .count
    }

    /// Has `ip` already failed more than `max_auth_failures_per_ip` times this
    /// minute? The failure that goes past the limit closes its session, so "more than" lets
    /// every session of the client see the 421 it was promised, not a silent refusal.
    pub fn auth_blocked(&self, ip: IpAddr) -> bool {
        let max = self.auth_failures.max();
        max > 0 && self.auth_failures.count(client_key(ip), Instant::now()) > max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(messages: u32, auth: u32, etrn: u32, capacity: usize) -> Limits {
        Limits {
            max_messages_per_ip_per_minute: messages,
            max_auth_failures_per_ip: auth,
            max_etrn_per_ip_per_minute: etrn,
            max_tracked_clients: capacity,
            ..Limits::default()
        }
    }

    #[test]
    fn message_rate_is_per_ip() {
        let r = RateLimiter::new(&limits(2, 10, 10, 100));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(r.message_allowed(a));
        assert!(r.message_allowed(a));
        assert!(!r.message_allowed(a));
        assert!(r.message_allowed(b));
        let unlimited = RateLimiter::new(&limits(0, 0, 0, 100));
        for _ in 0..1000 {
            assert!(unlimited.message_allowed(a), "0 = unlimited");
            assert!(unlimited.etrn_allowed(a), "0 = unlimited");
        }
    }

    #[test]
    fn auth_failures_accumulate() {
        let r = RateLimiter::new(&limits(600, 2, 10, 100));
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        assert_eq!(r.auth_failed(a), 1);
        assert_eq!(r.auth_failed(a), 2);
        assert!(!r.auth_blocked(a));
        r.auth_failed(a);
        assert!(r.auth_blocked(a));
        let unlimited = RateLimiter::new(&limits(600, 0, 10, 100));
        unlimited.auth_failed(a);
        unlimited.auth_failed(a);
        assert!(!unlimited.auth_blocked(a), "0 = unlimited");
    }

    #[test]
    fn a_message_flood_keeps_the_offenders_auth_failures() {
        let r = RateLimiter::new(&limits(10, 3, 10, 100));
        let attacker: IpAddr = "198.51.100.7".parse().unwrap();
        for _ in 0..5 {
            r.auth_failed(attacker);
        }
        assert!(r.auth_blocked(attacker));
        // A flood of fresh addresses, many times the capacity.
        for i in 0..5_000u32 {
            let ip = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            assert!(r.message_allowed(ip));
            assert!(r.messages.len() <= 100, "bounded");
        }
        assert!(
            r.auth_blocked(attacker),
            "the attacker's failures survive the flood"
        );
    }

    /// M4: every counter of this limiter keys an IPv6 client by its /64 (one host usually
    /// owns a whole /64 and picks source addresses from it at will).
    #[test]
    fn m4_ipv6_clients_are_keyed_by_64() {
        let r = RateLimiter::new(&limits(2, 1, 1, 100));
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff:1234:5678:9abc".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert!(r.message_allowed(a));
        assert!(r.message_allowed(b));
        assert!(!r.message_allowed(a), "same /64 shares the budget");
        assert!(r.message_allowed(other), "another /64 does not");
        r.auth_failed(a);
        r.auth_failed(b);
        assert!(r.auth_blocked("2001:db8:1:2::99".parse().unwrap()));

        assert!(r.etrn_allowed(a));
        assert!(!r.etrn_allowed(b), "ETRN too");
        assert!(r.etrn_allowed(other));
    }
}
