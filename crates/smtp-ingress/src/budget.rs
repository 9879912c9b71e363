//! The process-wide budget of message body bytes held in memory (`limits.max_body_bytes_in_flight`),
//! and each client's share of it (`limits.max_body_bytes_in_flight_per_ip`).
//!
//! Every connection may hold up to `max_message_bytes` of body, so without a global bound
//! `max_connections × max_message_bytes` (terabytes) is reachable by anyone on port 25. Bytes are
//! reserved from one semaphore as a transaction's kept body grows and given back when the
//! transaction ends in any way (hand-off done, refused, RSET, connection dropped mid-DATA),
//! because the reservation is owned by the transaction and released on drop.
//!
//! The global bound alone is one shared pool: a single client with a handful of connections
//! trickling large bodies holds all of it and every other client, submission included, gets
//! `452`. So each client (`runtime::limiter::client_key`: an IPv4 address, an IPv6 /64) may
//! hold at most its share; the map has an entry only while that client holds bytes, so it is
//! bounded by the connection limits.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

use mailsuite_runtime::limiter::{ClientKey, client_key};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bytes currently reserved by all transactions (`mailsuite_smtp_body_bytes_in_flight`).
fn in_flight() -> mailsuite_runtime::metrics::UpDown {
    mailsuite_runtime::metrics::up_down("mailsuite_smtp_body_bytes_in_flight", &[])
}

/// Which bound a reservation ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exhausted {
    /// `limits.max_body_bytes_in_flight`: everybody's bytes together.
    Total,
    /// `limits.max_body_bytes_in_flight_per_ip`: this client's own bytes.
    Client,
}

#[derive(Debug)]
struct Inner {
    total: Arc<Semaphore>,
    per_client: u64,
    held: Mutex<HashMap<ClientKey, u64>>,
}

/// The shared budget; one per server.
#[derive(Debug, Clone)]
pub struct BodyBudget(Arc<Inner>);

impl BodyBudget {
    pub fn new(bytes: u64, per_client: u64) -> Self {
        let permits = usize::try_from(bytes)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        BodyBudget(Arc::new(Inner {
            total: Arc::new(Semaphore::new(permits)),
            per_client,
            held: Mutex::new(HashMap::new()),
        }))
    }

    /// Bytes not reserved by anyone right now.
    pub fn available(&self) -> u64 {
        self.0.total.available_permits() as u64
    }

    /// Bytes the client (by its `client_key`) holds right now.
    pub fn held_by(&self, ip: IpAddr) -> u64 {
        let held = self.0.held.lock().unwrap_or_else(|e| e.into_inner());
        held.get(&client_key(ip)).copied().unwrap_or(0)
    }
}

/// The bytes one transaction holds; given back when dropped.
#[derive(Debug, Default)]
pub struct Reservation {
    permit: Option<OwnedSemaphorePermit>,
    /// Whose share the bytes count against, to give them back there.
    client: Option<(Arc<Inner>, ClientKey)>,
}

impl Reservation {
    pub fn bytes(&self) -> u64 {
        self.permit.as_ref().map_or(0, |p| p.num_permits() as u64)
    }

    /// Grow the reservation of `client`'s transaction to cover `total` bytes. Refused when
    /// either the client's share or the whole budget cannot: then nothing more is reserved
    /// (what is held stays held until `release`).
    pub fn cover(
        &mut self,
        budget: &BodyBudget,
        client: IpAddr,
        total: u64,
    ) -> Result<(), Exhausted> {
        let held = self.bytes();
        if total <= held {
            return Ok(());
        }
        let key = client_key(client);
        let Ok(more) = u32::try_from(total - held) else {
            return Err(Exhausted::Total);
        };
        // The share is checked and charged under one lock, so two connections of the same
        // client cannot both pass the check with the last bytes of the share.
        let mut shares = budget.0.held.lock().unwrap_or_else(|e| e.into_inner());
        let share = shares.get(&key).copied().unwrap_or(0);
        if share.saturating_add(u64::from(more)) > budget.0.per_client {
            return Err(Exhausted::Client);
        }
        let p = budget
            .0
            .total
            .clone()
            .try_acquire_many_owned(more)
            .map_err(|_| Exhausted::Total)?;
        *shares.entry(key).or_insert(0) += u64::from(more);
        drop(shares);
        in_flight().add(i64::from(more));
        match &mut self.permit {
            Some(h) => h.merge(p),
            None => self.permit = Some(p),
        }
        self.client = Some((budget.0.clone(), key));
        Ok(())
    }

    /// Give everything back now.
    pub fn release(&mut self) {
        let Some(p) = self.permit.take() else {
            return;
        };
        let n = p.num_permits() as u64;
        if let Some((inner, key)) = self.client.take() {
            let mut shares = inner.held.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(v) = shares.get_mut(&key) {
                *v = v.saturating_sub(n);
                if *v == 0 {
                    shares.remove(&key);
                }
            }
        }
        drop(p);
        in_flight().add(-(n as i64));
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

    const A: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 2));

    #[test]
    fn reservations_grow_fail_at_the_budget_and_give_back_on_drop() {
        let b = BodyBudget::new(100, 100);
        let mut r1 = Reservation::default();
        assert_eq!(r1.cover(&b, A, 40), Ok(()));
        assert_eq!(r1.cover(&b, A, 30), Ok(()), "already covered");
        assert_eq!(r1.cover(&b, A, 70), Ok(()));
        assert_eq!((r1.bytes(), b.available()), (70, 30));
        let mut r2 = Reservation::default();
        assert_eq!(r2.cover(&b, B, 31), Err(Exhausted::Total));
        assert_eq!(r2.bytes(), 0);
        assert_eq!(r2.cover(&b, B, 30), Ok(()));
        drop(r1);
        assert_eq!(b.available(), 70);
        r2.release();
        assert_eq!(b.available(), 100);
        assert!(Reservation::default().cover(&b, A, u64::MAX).is_err());
        assert_eq!(b.available(), 100);
    }

    /// L4: one client's connections together get at most their share; another client still
    /// gets the rest, and the share comes back with the bytes.
    #[test]
    fn l4_body_budget_per_ip_share() {
        let b = BodyBudget::new(100, 40);
        let mut a1 = Reservation::default();
        let mut a2 = Reservation::default();
        assert_eq!(a1.cover(&b, A, 30), Ok(()));
        assert_eq!(a2.cover(&b, A, 11), Err(Exhausted::Client));
        assert_eq!(a2.cover(&b, A, 10), Ok(()));
        assert_eq!(b.held_by(A), 40);
        let mut other = Reservation::default();
        assert_eq!(other.cover(&b, B, 40), Ok(()));
        assert_eq!(b.available(), 20);
        // An IPv6 client is one client per /64.
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        let b6 = BodyBudget::new(100, 40);
        let mut c1 = Reservation::default();
        let mut c2 = Reservation::default();
        assert_eq!(c1.cover(&b6, v6("2001:db8::1"), 30), Ok(()));
        assert_eq!(c2.cover(&b6, v6("2001:db8::2"), 20), Err(Exhausted::Client));
        assert_eq!(c2.cover(&b6, v6("2001:db8:0:1::2"), 20), Ok(()));
        drop(a1);
        assert_eq!(b.held_by(A), 10);
        assert_eq!(a2.cover(&b, A, 40), Ok(()));
        drop((a2, other, c1, c2));
        assert_eq!((b.available(), b.held_by(A), b.held_by(B)), (100, 0, 0));
        assert!(b.0.held.lock().unwrap().is_empty(), "no entry left behind");
    }
}
