//! Metrics: OpenTelemetry instruments behind a tiny API, exported two ways at once — pulled as
//! Prometheus text from each service's ops endpoint (`GET /metrics`) and pushed over OTLP/gRPC
//! when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
//!
//! ```
//! use mailsuite_runtime::metrics;
//! // a counter: the name is the Prometheus name, ending in `_total`
//! metrics::counter("mailsuite_smtp_messages_received_total", &[("result", "accepted")]).inc();
//! // a gauge that goes up and down with the number of open sessions
//! let _session = metrics::up_down("mailsuite_sessions_active", &[("protocol", "imap")]).guard();
//! // a value set from outside (e.g. read from the database)
//! metrics::gauge("mailsuite_queue_depth", &[]).set(42.0);
//! // a latency histogram, recorded when the timer is dropped
//! let _t = metrics::histogram("mailsuite_db_duration_seconds", &[("db.operation.name", "deliver")]).start_timer();
//! assert!(metrics::render_prometheus().contains("mailsuite_smtp_messages_received_total"));
//! ```
//!
//! Shared instrumentation for the services: [`Session`] (active sessions per protocol, and
//! TLS vs plaintext when a session ends), [`auth_failure`], [`db_timer`]; the gRPC layers in
//! `crate::grpc` record `mailsuite_grpc_{server,client}_duration_seconds` themselves.
//!
//! Naming: Prometheus conventions (`mailsuite_<area>_<what>_<unit>`, counters end in
//! `_total`). A histogram named `*_seconds` gets latency buckets (0.5 ms … 60 s), `*_bytes`
//! gets size buckets (1 KiB … 64 MiB). Label values must come from small fixed sets (a result,
//! a reason, a protocol): never an address, a user name or a message id.
//!
//! One registry serves the whole process, so `mailsuite up` (every service in one process)
//! renders every service's metrics from each ops port; each metric's name says which service
//! it belongs to. Instruments are created on first use and cached: recording costs a map
//! lookup and a few atomic operations.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Meter, MeterProvider as _};
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};

/// Bucket bounds for `*_seconds` histograms.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// Bucket bounds for `*_bytes` histograms.
pub const SIZE_BUCKETS: &[f64] = &[
    1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0, 16777216.0, 67108864.0,
];

/// How often metrics are pushed over OTLP (the Prometheus endpoint is always current).
pub const OTLP_INTERVAL: Duration = Duration::from_secs(15);

type Labels<'a> = &'a [(&'static str, &'a str)];

struct Registry {
    provider: SdkMeterProvider,
    prometheus: prometheus::Registry,
    meter: Meter,
    otlp: bool,
    counters: RwLock<HashMap<&'static str, opentelemetry::metrics::Counter<u64>>>,
    up_downs: RwLock<HashMap<&'static str, opentelemetry::metrics::UpDownCounter<i64>>>,
    gauges: RwLock<HashMap<&'static str, opentelemetry::metrics::Gauge<f64>>>,
    histograms: RwLock<HashMap<&'static str, opentelemetry::metrics::Histogram<f64>>>,
}

static REGISTRY: OnceLock<Registry> = OnceLock::new();
/// Serialises `init` against the lazy default so the OTLP reader is never silently lost to a
/// race between start-up and a first recording.
static INIT: Mutex<()> = Mutex::new(());

fn build(service: &str, otlp: Option<opentelemetry_otlp::MetricExporter>) -> Registry {
    let prometheus = prometheus::Registry::new();
    let mut builder = SdkMeterProvider::builder().with_resource(
        opentelemetry_sdk::Resource::builder()
            .with_service_name(service.to_string())
            .build(),
    );
    match opentelemetry_prometheus::exporter()
        .with_registry(prometheus.clone())
        // Names already carry their unit and `_total`; scope labels would only add noise.
        .without_units()
        .scope_info_enabled(false)
        .build()
    {
        Ok(reader) => builder = builder.with_reader(reader),
        Err(e) => tracing::warn!(error = %e, "Prometheus metrics endpoint disabled"),
    }
    let has_otlp = otlp.is_some();
    if let Some(exporter) = otlp {
        builder = builder.with_reader(
            PeriodicReader::builder(exporter)
                .with_interval(OTLP_INTERVAL)
                .build(),
        );
    }
    let provider = builder.build();
    let meter = provider.meter("mailsuite");
    Registry {
        provider,
        prometheus,
        meter,
        otlp: has_otlp,
        counters: RwLock::default(),
        up_downs: RwLock::default(),
        gauges: RwLock::default(),
        histograms: RwLock::default(),
    }
}

fn registry() -> &'static Registry {
    if let Some(r) = REGISTRY.get() {
        return r;
    }
    let _g = INIT.lock().unwrap_or_else(|e| e.into_inner());
    REGISTRY.get_or_init(|| build("mailsuite", None))
}

/// Flushes pending OTLP metrics when dropped (at the end of `main`).
#[must_use = "metrics are flushed when the guard is dropped"]
pub struct MetricsGuard {
    active: bool,
}

impl Drop for MetricsGuard {
    fn drop(&mut self) {
        if self.active
            && let Some(r) = REGISTRY.get()
        {
            let _ = r.provider.force_flush();
            let _ = r.provider.shutdown();
        }
    }
}

/// Set the process's metrics up for `service`: the Prometheus registry always, plus an OTLP
/// push exporter when `OTEL_EXPORTER_OTLP_ENDPOINT` is set. Call once at start-up, inside the
/// tokio runtime and before anything records (`telemetry::init` does it); a later call, or a
/// call after the first recording, keeps the existing registry and returns an inert guard.
pub fn init(service: &str) -> MetricsGuard {
    let _g = INIT.lock().unwrap_or_else(|e| e.into_inner());
    if REGISTRY.get().is_some() {
        return MetricsGuard { active: false };
    }
    let otlp = match std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT") {
        Ok(ep) if !ep.is_empty() => match opentelemetry_otlp::MetricExporter::builder()
            .with_tonic()
            .build()
        {
            Ok(exp) => Some(exp),
            Err(e) => {
                eprintln!("OTLP metrics exporter disabled: {e}");
                None
            }
        },
        _ => None,
    };
    let active = otlp.is_some();
    let r = REGISTRY.get_or_init(|| build(service, otlp));
    opentelemetry::global::set_meter_provider(r.provider.clone());
    MetricsGuard { active }
}

/// True when metrics are also pushed over OTLP.
pub fn otlp_enabled() -> bool {
    REGISTRY.get().is_some_and(|r| r.otlp)
}

fn attrs(labels: Labels<'_>) -> Vec<KeyValue> {
    labels
        .iter()
        .map(|(k, v)| KeyValue::new(*k, v.to_string()))
        .collect()
}

fn cached<T: Clone>(
    map: &RwLock<HashMap<&'static str, T>>,
    name: &'static str,
    make: impl FnOnce() -> T,
) -> T {
    if let Some(i) = map.read().unwrap_or_else(|e| e.into_inner()).get(name) {
        return i.clone();
    }
    map.write()
        .unwrap_or_else(|e| e.into_inner())
        .entry(name)
        .or_insert_with(make)
        .clone()
}

/// The OpenTelemetry name of a Prometheus counter: the exporter appends `_total` itself.
fn otel_counter_name(name: &'static str) -> Cow<'static, str> {
    Cow::Borrowed(name.strip_suffix("_total").unwrap_or(name))
}

/// A monotonic counter with fixed labels.
#[derive(Clone)]
pub struct Counter {
    inner: opentelemetry::metrics::Counter<u64>,
    attrs: Vec<KeyValue>,
}

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.inner.add(n, &self.attrs);
    }
}

/// A counter named `name` (ending in `_total`) with these labels.
pub fn counter(name: &'static str, labels: Labels<'_>) -> Counter {
    let r = registry();
    let inner = cached(&r.counters, name, || {
        r.meter.u64_counter(otel_counter_name(name)).build()
    });
    Counter {
        inner,
        attrs: attrs(labels),
    }
}

/// A value that goes up and down by deltas (sessions open, requests in flight).
#[derive(Clone)]
pub struct UpDown {
    inner: opentelemetry::metrics::UpDownCounter<i64>,
    attrs: Vec<KeyValue>,
}

impl UpDown {
    pub fn add(&self, delta: i64) {
        self.inner.add(delta, &self.attrs);
    }
    /// +1 now and −1 when the guard is dropped, however the scope ends.
    pub fn guard(self) -> UpDownGuard {
        self.add(1);
        UpDownGuard(self)
    }
}

pub struct UpDownGuard(UpDown);

impl Drop for UpDownGuard {
    fn drop(&mut self) {
        self.0.add(-1);
    }
}

pub fn up_down(name: &'static str, labels: Labels<'_>) -> UpDown {
    let r = registry();
    let inner = cached(&r.up_downs, name, || {
        r.meter.i64_up_down_counter(name).build()
    });
    UpDown {
        inner,
        attrs: attrs(labels),
    }
}

/// A value measured elsewhere and set as a whole (queue depth, oldest message age).
#[derive(Clone)]
pub struct Gauge {
    inner: opentelemetry::metrics::Gauge<f64>,
    attrs: Vec<KeyValue>,
}

impl Gauge {
    pub fn set(&self, value: f64) {
        self.inner.record(value, &self.attrs);
    }
}

pub fn gauge(name: &'static str, labels: Labels<'_>) -> Gauge {
    let r = registry();
    let inner = cached(&r.gauges, name, || r.meter.f64_gauge(name).build());
    Gauge {
        inner,
        attrs: attrs(labels),
    }
}

/// A distribution (latency in seconds, sizes in bytes).
#[derive(Clone)]
pub struct Histogram {
    inner: opentelemetry::metrics::Histogram<f64>,
    attrs: Vec<KeyValue>,
}

impl Histogram {
    pub fn record(&self, value: f64) {
        self.inner.record(value, &self.attrs);
    }
    pub fn observe_duration(&self, d: Duration) {
        self.record(d.as_secs_f64());
    }
    /// Records the elapsed time in seconds when dropped.
    pub fn start_timer(self) -> Timer {
        Timer {
            histogram: self,
            start: Instant::now(),
        }
    }
}

pub struct Timer {
    histogram: Histogram,
    start: Instant,
}

impl Drop for Timer {
    fn drop(&mut self) {
        self.histogram.observe_duration(self.start.elapsed());
    }
}

pub fn histogram(name: &'static str, labels: Labels<'_>) -> Histogram {
    let r = registry();
    let inner = cached(&r.histograms, name, || {
        let b = r.meter.f64_histogram(name);
        let b = if name.ends_with("_seconds") {
            b.with_boundaries(LATENCY_BUCKETS.to_vec())
        } else if name.ends_with("_bytes") {
            b.with_boundaries(SIZE_BUCKETS.to_vec())
        } else {
            b
        };
        b.build()
    });
    Histogram {
        inner,
        attrs: attrs(labels),
    }
}

/// How a session's bytes travelled, for `mailsuite_sessions_total{tls}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// TLS from the first byte (465, 993, 995).
    Implicit,
    /// Upgraded by STARTTLS / STLS.
    Starttls,
    /// Plaintext throughout.
    None,
}

impl TlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Implicit => "implicit",
            TlsMode::Starttls => "starttls",
            TlsMode::None => "none",
        }
    }
}

/// The session metrics of one client connection: `mailsuite_sessions_active{protocol}` while
/// it lives, and `mailsuite_sessions_total{protocol, tls}` (how it ended up protected) when it
/// is dropped, however the connection ends.
pub struct Session {
    protocol: &'static str,
    tls: TlsMode,
    _active: UpDownGuard,
}

impl Session {
    pub fn start(protocol: &'static str, implicit_tls: bool) -> Session {
        Session {
            protocol,
            tls: if implicit_tls {
                TlsMode::Implicit
            } else {
                TlsMode::None
            },
            _active: up_down("mailsuite_sessions_active", &[("protocol", protocol)]).guard(),
        }
    }

    /// STARTTLS / STLS completed.
    pub fn tls_upgraded(&mut self) {
        if self.tls == TlsMode::None {
            self.tls = TlsMode::Starttls;
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        counter(
            "mailsuite_sessions_total",
            &[("protocol", self.protocol), ("tls", self.tls.as_str())],
        )
        .inc();
    }
}

/// One failed AUTH / USER+PASS / LOGIN.
pub fn auth_failure(protocol: &'static str) {
    counter("mailsuite_auth_failures_total", &[("protocol", protocol)]).inc();
}

/// Times one database operation into `mailsuite_db_duration_seconds{operation}` when dropped.
pub fn db_timer(operation: &'static str) -> Timer {
    histogram("mailsuite_db_duration_seconds", &[("operation", operation)]).start_timer()
}

/// Every metric of the process in the Prometheus text exposition format (version 0.0.4).
pub fn render_prometheus() -> String {
    use prometheus::Encoder as _;
    let families = registry().prometheus.gather();
    let mut out = Vec::new();
    if let Err(e) = prometheus::TextEncoder::new().encode(&families, &mut out) {
        tracing::warn!(error = %e, "rendering metrics");
    }
    String::from_utf8(out).unwrap_or_default()
}

/// An ops endpoint that serves this registry at `/metrics` (the same as `Ops::default()`).
pub fn ops() -> crate::ops::Ops {
    crate::ops::Ops::default()
}

/// The current value of one series, read back from the Prometheus rendering: the sum over
/// every series of `name` whose labels include all of `labels` (0 when none match). For
/// histograms, ask for `<name>_count` or `<name>_sum`. Meant for tests and diagnostics.
pub fn value(name: &str, labels: &[(&str, &str)]) -> f64 {
    value_in(&render_prometheus(), name, labels)
}

/// [`value`] over any Prometheus text, e.g. a `/metrics` page fetched from another process.
pub fn value_in(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(parse_sample)
        .filter(|(n, ls, _)| {
            *n == name
                && labels
                    .iter()
                    .all(|(k, v)| ls.iter().any(|(lk, lv)| lk == k && lv == v))
        })
        .map(|(_, _, v)| v)
        .sum()
}

type Sample<'a> = (&'a str, Vec<(&'a str, String)>, f64);

/// `name{k="v",...} value` → parts; label values are unescaped.
fn parse_sample(line: &str) -> Option<Sample<'_>> {
    let (head, value) = line.rsplit_once(' ')?;
    let value: f64 = value.parse().ok()?;
    let Some((name, rest)) = head.split_once('{') else {
        return Some((head, Vec::new(), value));
    };
    let mut labels = Vec::new();
    let mut rest = rest.strip_suffix('}')?;
    while !rest.is_empty() {
        let (k, after) = rest.split_once("=\"")?;
        let mut v = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (_, '\\') => match chars.next()?.1 {
                    'n' => v.push('\n'),
                    c => v.push(c),
                },
                (i, '"') => break i,
                (_, c) => v.push(c),
            }
        };
        labels.push((k, v));
        rest = after[end + 1..].trim_start_matches(',');
    }
    Some((name, labels, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_renders_with_total_and_labels() {
        let before = value(
            "mailsuite_test_things_total",
            &[("result", "ok"), ("kind", "a")],
        );
        counter(
            "mailsuite_test_things_total",
            &[("result", "ok"), ("kind", "a")],
        )
        .inc();
        counter(
            "mailsuite_test_things_total",
            &[("result", "ok"), ("kind", "a")],
        )
        .add(2);
        counter(
            "mailsuite_test_things_total",
            &[("result", "bad"), ("kind", "a")],
        )
        .inc();
        let text = render_prometheus();
        assert!(
            text.contains("# TYPE mailsuite_test_things_total counter"),
            "{text}"
        );
        assert!(!text.contains("_total_total"), "{text}");
        assert!(!text.contains("otel_scope_name"), "{text}");
        assert_eq!(
            value(
                "mailsuite_test_things_total",
                &[("result", "ok"), ("kind", "a")]
            ) - before,
            3.0
        );
        assert!(value("mailsuite_test_things_total", &[("kind", "a")]) >= 4.0);
    }

    #[test]
    fn up_down_guard_returns_to_zero() {
        let u = up_down("mailsuite_test_sessions_active", &[("protocol", "pop3")]);
        let g1 = u.clone().guard();
        let g2 = u.guard();
        assert_eq!(
            value("mailsuite_test_sessions_active", &[("protocol", "pop3")]),
            2.0
        );
        drop(g1);
        assert_eq!(
            value("mailsuite_test_sessions_active", &[("protocol", "pop3")]),
            1.0
        );
        drop(g2);
        assert_eq!(
            value("mailsuite_test_sessions_active", &[("protocol", "pop3")]),
            0.0
        );
        assert!(render_prometheus().contains("# TYPE mailsuite_test_sessions_active gauge"));
    }

    #[test]
    fn gauge_keeps_last_value() {
        let g = gauge("mailsuite_test_depth", &[]);
        g.set(7.0);
        g.set(3.5);
        assert_eq!(value("mailsuite_test_depth", &[]), 3.5);
    }

    #[test]
    fn seconds_histogram_uses_latency_buckets() {
        let h = histogram("mailsuite_test_op_duration_seconds", &[("op", "x")]);
        h.record(0.003);
        h.clone().start_timer();
        let text = render_prometheus();
        assert!(
            text.contains("mailsuite_test_op_duration_seconds_bucket{op=\"x\",le=\"0.0025\"}"),
            "{text}"
        );
        assert_eq!(
            value("mailsuite_test_op_duration_seconds_count", &[("op", "x")]),
            2.0
        );
        assert!(value("mailsuite_test_op_duration_seconds_sum", &[("op", "x")]) >= 0.003);
    }

    #[test]
    fn session_counts_active_and_final_tls_state() {
        let total = |tls| {
            value(
                "mailsuite_sessions_total",
                &[("protocol", "test"), ("tls", tls)],
            )
        };
        let active = || value("mailsuite_sessions_active", &[("protocol", "test")]);
        let (none0, starttls0, implicit0) = (total("none"), total("starttls"), total("implicit"));
        let plain = Session::start("test", false);
        let mut upgraded = Session::start("test", false);
        let implicit = Session::start("test", true);
        assert_eq!(active(), 3.0);
        upgraded.tls_upgraded();
        drop((plain, upgraded, implicit));
        assert_eq!(active(), 0.0);
        assert_eq!(total("none") - none0, 1.0);
        assert_eq!(total("starttls") - starttls0, 1.0);
        assert_eq!(total("implicit") - implicit0, 1.0);
        auth_failure("test");
        assert_eq!(
            value("mailsuite_auth_failures_total", &[("protocol", "test")]),
            1.0
        );
        drop(db_timer("test_op"));
        assert_eq!(
            value(
                "mailsuite_db_duration_seconds_count",
                &[("operation", "test_op")]
            ),
            1.0
        );
    }

    #[test]
    fn parses_escaped_label_values() {
        let text = "# HELP x y\nm{a=\"q\\\"uote\",b=\"2\"} 5\nm{a=\"other\"} 1\nn 4\n";
        assert_eq!(value_in(text, "m", &[("a", "q\"uote")]), 5.0);
        assert_eq!(value_in(text, "m", &[]), 6.0);
        assert_eq!(value_in(text, "n", &[]), 4.0);
        assert_eq!(value_in(text, "m", &[("b", "3")]), 0.0);
    }

    #[tokio::test]
    async fn ops_endpoint_serves_registry() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        counter("mailsuite_test_ops_total", &[]).inc();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let sd = crate::Shutdown::new();
        let task = tokio::spawn(ops().serve(l, sd.clone()));
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").await.unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).await.unwrap();
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(out.contains("\nmailsuite_test_ops_total 1\n"), "{out}");
        sd.trigger();
        task.await.unwrap();
    }
}
