//! The store's counters, kept in the process-wide OpenTelemetry registry
//! (`mailsuite_runtime::metrics`): served as Prometheus text on the ops endpoint's `/metrics`
//! and pushed over OTLP when that is configured.

/// A counter of the store, by its Prometheus name.
pub struct Counter(pub &'static str);

pub static DELIVERIES: Counter = Counter("mailsuite_store_deliveries_total");
pub static DELIVERED_ENTRIES: Counter = Counter("mailsuite_store_delivered_entries_total");
pub static DELIVERED_BYTES: Counter = Counter("mailsuite_store_delivered_bytes_total");
pub static DUPLICATE_DELIVERIES: Counter = Counter("mailsuite_store_duplicate_deliveries_total");
/// Delivery transactions committed (each holds one or more Deliver calls).
pub static DELIVERY_BATCHES: Counter = Counter("mailsuite_store_delivery_batches_total");
/// Deliver calls stored by those transactions (batched / batches = mean batch size).
pub static DELIVERY_BATCHED: Counter = Counter("mailsuite_store_delivery_batched_total");
pub static APPENDS: Counter = Counter("mailsuite_store_appends_total");
pub static EXPUNGED: Counter = Counter("mailsuite_store_expunged_total");

pub fn inc(c: &Counter, by: u64) {
    mailsuite_runtime::metrics::counter(c.0, &[]).add(by);
}

/// Every metric of the process (the store's, gRPC and database latency ...).
pub fn render() -> String {
    mailsuite_runtime::metrics::render_prometheus()
}
