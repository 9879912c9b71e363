//! Failed logins per client address and per user name, shared by all connections of the
//! gateway: a guesser that reconnects after each connection's failure limit is still slowed
//! down, and so is one spread over many addresses. Both are `ClientWindows` of the runtime's
//! limiter (clients by `client_key`: IPv6 by /64).
//!
//! An attempt is counted as a failure *before* the password is checked (`begin`) and given
//! back if it was not one (`Attempt::release`): checking first and counting afterwards let
//! every one of 50 parallel connections get a guess in before the first failure was
//! recorded.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use mailsuite_runtime::limiter::{ClientKey, ClientWindows, Counted, client_key};

pub struct AuthLimiter {
    by_ip: ClientWindows,
    /// Keyed by a keyed hash of the lower-cased user name: bounded size whatever is sent.
    by_account: ClientWindows<u64>,
    hasher: RandomState,
}

/// A login attempt counted as a failure in advance. Dropping it (or `fail`) keeps it
/// counted; `release` gives it back.
#[must_use = "an attempt is a failure unless released"]
pub struct Attempt<'a> {
    limiter: &'a AuthLimiter,
    ip: (ClientKey, Counted),
    account: (u64, Counted),
}

impl Attempt<'_> {
    /// The attempt was not a failed guess (it succeeded, or the store could not tell).
    pub fn release(self) {
        self.limiter.by_ip.release(self.ip.0, self.ip.1);
        self.limiter
            .by_account
            .release(self.account.0, self.account.1);
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

impl AuthLimiter {
    /// Per address: at most `max_failures` failed logins per `window` (0 disables).
    pub fn new(max_failures: u32, window: Duration, capacity: usize) -> Self {
        AuthLimiter {
            by_ip: ClientWindows::new(window, max_failures, capacity),
            by_account: ClientWindows::new(window, 0, capacity),
            hasher: RandomState::new(),
        }
    }

    /// Also at most `max_failures` failed logins per user name per `window` (0 disables).
    pub fn with_account_limit(mut self, max_failures: u32, window: Duration) -> Self {
        self.by_account = ClientWindows::new(window, max_failures, self.by_ip.capacity());
        self
    }

    fn account_key(&self, user: &str) -> u64 {
        self.hasher.hash_one(user.trim().to_lowercase())
    }

    /// Whether logins from `ip` are refused for now.
    pub fn blocked(&self, ip: IpAddr) -> bool {
        !self.by_ip.check(client_key(ip), Instant::now())
    }

    /// Start a login attempt by `user` from `ip`: refused if either is at its limit,
    /// otherwise counted as a failure until released.
    pub fn begin(&self, ip: IpAddr, user: &str) -> Result<Attempt<'_>, Blocked> {
        let now = Instant::now();
        let ip_key = client_key(ip);
        let ip = self.by_ip.try_record(ip_key, now).ok_or(Blocked::Address)?;
        let account_key = self.account_key(user);
        let Some(account) = self.by_account.try_record(account_key, now) else {
            // This attempt never reaches the store: it is not a guess at the password, so
            // the address is not charged for it.
            self.by_ip.release(ip_key, ip);
            return Err(Blocked::Account);
        };
        Ok(Attempt {
            limiter: self,
            ip: (ip_key, ip),
            account: (account_key, account),
        })
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_ip.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn fail(l: &AuthLimiter, from: &str) {
        if let Ok(a) = l.begin(ip(from), "bob") {
            a.fail();
        }
    }

    #[test]
    fn blocks_after_the_limit_per_address_and_ipv6_prefix() {
        let l = AuthLimiter::new(3, Duration::from_secs(60), 100);
        for _ in 0..2 {
            fail(&l, "2001:db8:1:2::1");
        }
        assert!(!l.blocked(ip("2001:db8:1:2::1")));
        fail(&l, "2001:db8:1:2:ffff::9");
        assert!(l.blocked(ip("2001:db8:1:2::1")), "same /64");
        assert!(!l.blocked(ip("2001:db8:1:3::1")), "other /64");
        assert!(!l.blocked(ip("192.0.2.1")));
        for _ in 0..3 {
            fail(&l, "::ffff:192.0.2.1");
        }
        assert!(l.blocked(ip("192.0.2.1")), "v4-mapped is the v4 address");
    }

    // Expiry of the window: runtime::limiter::tests::a_window_expires_with_injected_time.

    #[test]
    fn a_full_table_evicts_the_least_recent_not_all() {
        // Capacity 3: a tenth rounds up to one entry. (Recency rather than insertion order:
        // runtime::limiter::tests::a_full_table_evicts_the_least_recently_active_tenth.)
        let l = AuthLimiter::new(2, Duration::from_secs(60), 3);
        for a in ["192.0.2.1", "192.0.2.2", "192.0.2.3"] {
            fail(&l, a);
            fail(&l, a);
        }
        fail(&l, "192.0.2.4");
        assert_eq!(l.len(), 3);
        fail(&l, "192.0.2.4");
        assert!(!l.blocked(ip("192.0.2.1")), "least recently active evicted");
        for a in ["192.0.2.2", "192.0.2.3", "192.0.2.4"] {
            assert!(l.blocked(ip(a)), "{a} kept");
        }
    }

    #[test]
    fn m4_ipv6_clients_are_keyed_by_their_64() {
        // The key itself: runtime::limiter::tests. A whole /64 shares one budget of attempts.
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
