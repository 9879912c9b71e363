//! Per-IP rates shared by all connections of this process: messages per minute and AUTH
//! failures per minute (fixed one-minute windows). Memory is bounded: at most `MAX_IPS`
//! addresses are tracked, and expired windows are swept when that is reached.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(60);
const MAX_IPS: usize = 100_000;

#[derive(Default)]
struct Window {
    start: Option<Instant>,
    messages: u32,
    auth_failures: u32,
}

impl Window {
    fn current(&mut self, now: Instant) -> &mut Self {
        if self.start.is_none_or(|s| now.duration_since(s) >= WINDOW) {
            *self = Window {
                start: Some(now),
                ..Window::default()
            };
        }
        self
    }
}

#[derive(Default)]
pub struct RateLimiter {
    ips: Mutex<HashMap<IpAddr, Window>>,
}

impl RateLimiter {
    fn with<T>(&self, ip: IpAddr, f: impl FnOnce(&mut Window) -> T) -> T {
        let now = Instant::now();
        let mut ips = self.ips.lock().unwrap_or_else(|p| p.into_inner());
        if ips.len() >= MAX_IPS && !ips.contains_key(&ip) {
            ips.retain(|_, w| w.start.is_some_and(|s| now.duration_since(s) < WINDOW));
            if ips.len() >= MAX_IPS {
                ips.clear();
            }
        }
        f(ips.entry(ip).or_default().current(now))
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
}
