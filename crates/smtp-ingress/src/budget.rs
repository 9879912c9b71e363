//! The process-wide budget of message body bytes held in memory (`limits.max_body_bytes_in_flight`).
//!
//! Every connection may hold up to `max_message_size` of body, so without a global bound
//! `max_connections × max_message_size` (terabytes) is reachable by anyone on port 25. Bytes are
//! reserved from one semaphore as a transaction's kept body grows and given back when the
//! transaction ends in any way (hand-off done, refused, RSET, connection dropped mid-DATA),
//! because the reservation is owned by the transaction and released on drop.

use std::sync::Arc;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bytes currently reserved by all transactions (`mailsuite_smtp_body_bytes_in_flight`).
fn in_flight() -> mailsuite_runtime::metrics::UpDown {
    mailsuite_runtime::metrics::up_down("mailsuite_smtp_body_bytes_in_flight", &[])
}

/// The shared budget; one per server.
#[derive(Debug, Clone)]
pub struct BodyBudget(Arc<Semaphore>);

impl BodyBudget {
    pub fn new(bytes: u64) -> Self {
        let permits = usize::try_from(bytes)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        BodyBudget(Arc::new(Semaphore::new(permits)))
    }

    /// Bytes not reserved by anyone right now.
    pub fn available(&self) -> u64 {
        self.0.available_permits() as u64
    }
}

/// The bytes one transaction holds; given back when dropped.
#[derive(Debug, Default)]
pub struct Reservation(Option<OwnedSemaphorePermit>);

impl Reservation {
    pub fn bytes(&self) -> u64 {
        self.0.as_ref().map_or(0, |p| p.num_permits() as u64)
    }

    /// Grow the reservation to cover `total` bytes. False when the budget cannot: then
    /// nothing more is reserved (what is held stays held until `release`).
    pub fn cover(&mut self, budget: &BodyBudget, total: u64) -> bool {
        let held = self.bytes();
        if total <= held {
            return true;
        }
        let Ok(more) = u32::try_from(total - held) else {
            return false;
        };
        match budget.0.clone().try_acquire_many_owned(more) {
            Ok(p) => {
                in_flight().add(i64::from(more));
                match &mut self.0 {
                    Some(h) => h.merge(p),
                    None => self.0 = Some(p),
                }
                true
            }
            Err(_) => false,
        }
    }

    /// Give everything back now.
    pub fn release(&mut self) {
        if let Some(p) = self.0.take() {
            in_flight().add(-(p.num_permits() as i64));
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_grow_fail_at_the_budget_and_give_back_on_drop() {
        let b = BodyBudget::new(100);
        let mut r1 = Reservation::default();
        assert!(r1.cover(&b, 40));
        assert!(r1.cover(&b, 30), "already covered");
        assert!(r1.cover(&b, 70));
        assert_eq!((r1.bytes(), b.available()), (70, 30));
        let mut r2 = Reservation::default();
        assert!(!r2.cover(&b, 31));
        assert_eq!(r2.bytes(), 0);
        assert!(r2.cover(&b, 30));
        drop(r1);
        assert_eq!(b.available(), 70);
        r2.release();
        assert_eq!(b.available(), 100);
        assert!(!Reservation::default().cover(&b, u64::MAX));
        assert_eq!(b.available(), 100);
    }
}
