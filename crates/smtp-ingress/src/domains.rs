//! Which mail domains are hosted here, remembered for a short while.
//!
//! Every unauthenticated MAIL FROM on the MX port asks whether the sender's domain is one of
//! ours (`policy.reject_unauthenticated_local_sender`): without a memory that is one store
//! call and one query per incoming message, for an answer that changes only when an operator
//! adds or removes a domain. So the answer is kept `policy.local_domain_cache_secs`; the
//! table is bounded (`MAX_DOMAINS`), dropping expired answers first and everything if that
//! is not enough, so a sender cycling through random domains cannot grow it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Domains remembered at most; one entry is a short string and a flag.
pub const MAX_DOMAINS: usize = 10_000;

#[derive(Debug)]
pub struct DomainCache {
    ttl: Duration,
    max: usize,
    known: Mutex<HashMap<String, (bool, Instant)>>,
}

impl DomainCache {
    /// `ttl` zero: nothing is remembered.
    pub fn new(ttl: Duration, max: usize) -> Self {
        DomainCache {
            ttl,
            max,
            known: Mutex::new(HashMap::new()),
        }
    }

    /// Whether `domain` is hosted here, if that was learnt less than the TTL ago.
    pub fn hosted(&self, domain: &str) -> Option<bool> {
        let known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        let (hosted, at) = known.get(&domain.to_ascii_lowercase())?;
        (at.elapsed() < self.ttl).then_some(*hosted)
    }

    pub fn learn(&self, domain: &str, hosted: bool) {
        if self.ttl.is_zero() || self.max == 0 {
            return;
        }
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        if known.len() >= self.max {
            let ttl = self.ttl;
            known.retain(|_, (_, at)| at.elapsed() < ttl);
            if known.len() >= self.max {
                known.clear();
            }
        }
        known.insert(domain.to_ascii_lowercase(), (hosted, Instant::now()));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.known.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_kept_case_insensitively_and_bounded() {
        let c = DomainCache::new(Duration::from_secs(60), 3);
        assert_eq!(c.hosted("local.test"), None);
        c.learn("Local.Test", true);
        c.learn("remote.example", false);
        assert_eq!(c.hosted("LOCAL.test"), Some(true));
        assert_eq!(c.hosted("remote.example"), Some(false));
        c.learn("a.example", false);
        c.learn("b.example", false);
        assert!(c.len() <= 3, "bounded: {}", c.len());
        assert_eq!(c.hosted("b.example"), Some(false));
    }

    #[test]
    fn a_zero_ttl_remembers_nothing() {
        let c = DomainCache::new(Duration::ZERO, 10);
        c.learn("local.test", true);
        assert_eq!(c.hosted("local.test"), None);
    }
}
