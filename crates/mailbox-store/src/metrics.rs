//! Process-wide counters served as Prometheus text on the ops endpoint's `/metrics`.

use std::sync::atomic::{AtomicU64, Ordering};

pub static DELIVERIES: AtomicU64 = AtomicU64::new(0);
pub static DELIVERED_ENTRIES: AtomicU64 = AtomicU64::new(0);
pub static DELIVERED_BYTES: AtomicU64 = AtomicU64::new(0);
pub static DUPLICATE_DELIVERIES: AtomicU64 = AtomicU64::new(0);
pub static APPENDS: AtomicU64 = AtomicU64::new(0);
pub static EXPUNGED: AtomicU64 = AtomicU64::new(0);

pub fn inc(c: &AtomicU64, by: u64) {
    c.fetch_add(by, Ordering::Relaxed);
}

pub fn render() -> String {
    let rows = [
        (
            "mailsuite_store_deliveries_total",
            "Deliver calls committed",
            &DELIVERIES,
        ),
        (
            "mailsuite_store_delivered_entries_total",
            "Mailbox entries created by delivery",
            &DELIVERED_ENTRIES,
        ),
        (
            "mailsuite_store_delivered_bytes_total",
            "Message bytes received by Deliver",
            &DELIVERED_BYTES,
        ),
        (
            "mailsuite_store_duplicate_deliveries_total",
            "Deliver calls answered from the idempotency record",
            &DUPLICATE_DELIVERIES,
        ),
        (
            "mailsuite_store_appends_total",
            "Append calls committed",
            &APPENDS,
        ),
        (
            "mailsuite_store_expunged_total",
            "Entries removed by expunge or move",
            &EXPUNGED,
        ),
    ];
    let mut out = String::new();
    for (name, help, c) in rows {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}\n",
            c.load(Ordering::Relaxed)
        ));
    }
    out
}
