//! Measurement and the final report: latency histograms, throughput, error tallies, CPU and
//! memory of the server processes. Everything here is pure so the arithmetic is unit-tested.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Latencies in microseconds, 1 µs to 1 hour at 3 significant digits (0.1 % error).
#[derive(Clone, Debug)]
pub struct Latency(Histogram<u64>);

impl Default for Latency {
    fn default() -> Self {
        Latency(Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("static histogram bounds"))
    }
}

impl Latency {
    pub fn record(&mut self, d: Duration) {
        let us = (d.as_micros() as u64).clamp(1, 3_600_000_000);
        self.0
            .record(us)
            .expect("value clamped into the histogram bounds");
    }

    pub fn merge(&mut self, other: &Latency) {
        self.0
            .add(&other.0)
            .expect("histograms with identical bounds");
    }

    pub fn count(&self) -> u64 {
        self.0.len()
    }

    pub fn summary(&self) -> LatencySummary {
        let ms = |us: u64| us as f64 / 1000.0;
        if self.0.is_empty() {
            return LatencySummary::default();
        }
        LatencySummary {
            count: self.0.len(),
            min_ms: ms(self.0.min()),
            mean_ms: self.0.mean() / 1000.0,
            p50_ms: ms(self.0.value_at_quantile(0.50)),
            p90_ms: ms(self.0.value_at_quantile(0.90)),
            p99_ms: ms(self.0.value_at_quantile(0.99)),
            max_ms: ms(self.0.max()),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub min_ms: f64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// What one worker measured; workers own one each and they are merged at the end, so the
/// hot path takes no lock.
#[derive(Clone, Debug, Default)]
pub struct Tally {
    pub ops: u64,
    pub bytes: u64,
    pub latency: BTreeMap<&'static str, Latency>,
    pub errors: BTreeMap<String, u64>,
}

impl Tally {
    pub fn latency(&mut self, name: &'static str, d: Duration) {
        self.latency.entry(name).or_default().record(d);
    }

    /// Errors are keyed by what a server operator can act on: the reply code
    /// (`550`, `451`, `NO`, `-ERR`) or the failure class (`io`, `timeout`, `connect`).
    pub fn error(&mut self, key: impl Into<String>) {
        *self.errors.entry(key.into()).or_default() += 1;
    }

    pub fn merge(&mut self, other: &Tally) {
        self.ops += other.ops;
        self.bytes += other.bytes;
        for (k, v) in &other.latency {
            self.latency.entry(k).or_default().merge(v);
        }
        for (k, v) in &other.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
    }

    pub fn error_total(&self) -> u64 {
        self.errors.values().sum()
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct CpuUsage {
    pub name: String,
    pub pid: u32,
    pub cpu_seconds: f64,
    /// CPU milliseconds per counted operation (message, fetch, ...); `None` with zero ops.
    pub cpu_ms_per_op: Option<f64>,
    /// Share of one core over the run (1.0 = one core busy the whole time).
    pub cores: f64,
    /// Resident memory at the start and its peak during the run (single processes only).
    pub rss_start_kib: Option<u64>,
    pub rss_peak_kib: Option<u64>,
}

impl CpuUsage {
    pub fn new(
        name: &str,
        pid: u32,
        ticks: u64,
        clk_tck: u64,
        ops: u64,
        elapsed: Duration,
    ) -> Self {
        let cpu_seconds = ticks as f64 / clk_tck.max(1) as f64;
        let secs = elapsed.as_secs_f64();
        CpuUsage {
            name: name.to_string(),
            pid,
            cpu_seconds,
            cpu_ms_per_op: (ops > 0).then(|| cpu_seconds * 1000.0 / ops as f64),
            cores: if secs > 0.0 { cpu_seconds / secs } else { 0.0 },
            rss_start_kib: None,
            rss_peak_kib: None,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Memory {
    pub pid: u32,
    pub sessions: u64,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub pss_before_kib: u64,
    pub pss_after_kib: u64,
    /// (after − before) / sessions; the baseline is taken before the first connection.
    pub rss_per_session_kib: f64,
    pub pss_per_session_kib: f64,
}

impl Memory {
    pub fn new(
        pid: u32,
        sessions: u64,
        before: crate::procfs::Smaps,
        after: crate::procfs::Smaps,
    ) -> Self {
        let per = |a: u64, b: u64| {
            if sessions == 0 {
                0.0
            } else {
                a.saturating_sub(b) as f64 / sessions as f64
            }
        };
        Memory {
            pid,
            sessions,
            rss_before_kib: before.rss_kib,
            rss_after_kib: after.rss_kib,
            pss_before_kib: before.pss_kib,
            pss_after_kib: after.pss_kib,
            rss_per_session_kib: per(after.rss_kib, before.rss_kib),
            pss_per_session_kib: per(after.pss_kib, before.pss_kib),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub command: String,
    /// What `ops` counts: "messages", "fetches", "bodies", "searches", ...
    pub unit: String,
    pub ops: u64,
    pub bytes: u64,
    pub elapsed_secs: f64,
    pub ops_per_sec: f64,
    pub mib_per_sec: f64,
    pub latency: BTreeMap<String, LatencySummary>,
    pub errors: BTreeMap<String, u64>,
    pub error_total: u64,
    pub cpu: Vec<CpuUsage>,
    pub memory: Option<Memory>,
    /// Command-specific facts (verification counts, settings) shown verbatim.
    pub notes: BTreeMap<String, serde_json::Value>,
}

pub fn rate(count: u64, elapsed: Duration) -> f64 {
    let s = elapsed.as_secs_f64();
    if s > 0.0 { count as f64 / s } else { 0.0 }
}

impl Report {
    pub fn new(command: &str, unit: &str, tally: &Tally, elapsed: Duration) -> Self {
        Report {
            command: command.to_string(),
            unit: unit.to_string(),
            ops: tally.ops,
            bytes: tally.bytes,
            elapsed_secs: elapsed.as_secs_f64(),
            ops_per_sec: rate(tally.ops, elapsed),
            mib_per_sec: rate(tally.bytes, elapsed) / (1024.0 * 1024.0),
            latency: tally
                .latency
                .iter()
                .map(|(k, v)| (k.to_string(), v.summary()))
                .collect(),
            errors: tally.errors.clone(),
            error_total: tally.error_total(),
            cpu: Vec::new(),
            memory: None,
            notes: BTreeMap::new(),
        }
    }

    pub fn note(&mut self, key: &str, value: impl Into<serde_json::Value>) {
        self.notes.insert(key.to_string(), value.into());
    }

    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "mailbench {}: {} {} in {:.3} s = {:.1} {}/s ({:.2} MiB/s)",
            self.command,
            self.ops,
            self.unit,
            self.elapsed_secs,
            self.ops_per_sec,
            self.unit,
            self.mib_per_sec
        );
        if !self.latency.is_empty() {
            let _ = writeln!(
                s,
                "  {:<20} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
                "latency (ms)", "count", "mean", "p50", "p90", "p99", "max"
            );
            for (name, l) in &self.latency {
                let _ = writeln!(
                    s,
                    "  {:<20} {:>9} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
                    name, l.count, l.mean_ms, l.p50_ms, l.p90_ms, l.p99_ms, l.max_ms
                );
            }
        }
        if self.errors.is_empty() {
            let _ = writeln!(s, "  errors: none");
        } else {
            let list: Vec<String> = self
                .errors
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            let _ = writeln!(s, "  errors: {} ({})", self.error_total, list.join(" "));
        }
        for c in &self.cpu {
            let per = c
                .cpu_ms_per_op
                .map(|v| format!("{v:.3} ms"))
                .unwrap_or_else(|| "-".into());
            let _ = writeln!(
                s,
                "  cpu {:<18} pid {:<7} {:>8.2} s  {:>5.2} cores  {} per {}",
                c.name,
                c.pid,
                c.cpu_seconds,
                c.cores,
                per,
                self.unit.trim_end_matches('s')
            );
            if let (Some(start), Some(peak)) = (c.rss_start_kib, c.rss_peak_kib) {
                let _ = writeln!(
                    s,
                    "      rss {start} KiB at start, peak {peak} KiB (+{} KiB)",
                    peak.saturating_sub(start)
                );
            }
        }
        if let Some(m) = &self.memory {
            let _ = writeln!(
                s,
                "  memory pid {}: {} sessions, RSS {} -> {} KiB ({:.1} KiB/session), PSS {} -> {} KiB ({:.1} KiB/session)",
                m.pid,
                m.sessions,
                m.rss_before_kib,
                m.rss_after_kib,
                m.rss_per_session_kib,
                m.pss_before_kib,
                m.pss_after_kib,
                m.pss_per_session_kib
            );
        }
        for (k, v) in &self.notes {
            let _ = writeln!(s, "  {k}: {v}");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= b.abs() * 0.002 + 1e-9
    }

    #[test]
    fn percentiles_of_a_uniform_sample() {
        let mut l = Latency::default();
        for v in 1..=1000 {
            l.record(ms(v));
        }
        let s = l.summary();
        assert_eq!(s.count, 1000);
        assert!(close(s.p50_ms, 500.0), "{s:?}");
        assert!(close(s.p90_ms, 900.0), "{s:?}");
        assert!(close(s.p99_ms, 990.0), "{s:?}");
        assert!(close(s.max_ms, 1000.0), "{s:?}");
        assert!(close(s.min_ms, 1.0), "{s:?}");
        assert!(close(s.mean_ms, 500.5), "{s:?}");
    }

    #[test]
    fn a_single_outlier_is_the_max_but_not_the_p99() {
        let mut l = Latency::default();
        for _ in 0..999 {
            l.record(ms(2));
        }
        l.record(ms(5000));
        let s = l.summary();
        assert!(close(s.p99_ms, 2.0), "{s:?}");
        assert!(close(s.max_ms, 5000.0), "{s:?}");
    }

    #[test]
    fn empty_histogram_reports_zeros() {
        assert_eq!(Latency::default().summary(), LatencySummary::default());
    }

    #[test]
    fn sub_microsecond_and_huge_values_are_clamped_not_dropped() {
        let mut l = Latency::default();
        l.record(Duration::from_nanos(10));
        l.record(Duration::from_secs(100_000));
        assert_eq!(l.count(), 2);
        assert!(l.summary().max_ms >= 3_600_000.0 * 0.999);
    }

    #[test]
    fn merged_tallies_add_ops_bytes_errors_and_latency() {
        let mut a = Tally {
            ops: 3,
            bytes: 300,
            ..Default::default()
        };
        a.error("550");
        a.error("io");
        a.latency("transaction", ms(10));
        let mut b = Tally {
            ops: 2,
            bytes: 50,
            ..Default::default()
        };
        b.error("550");
        b.error("451");
        b.latency("transaction", ms(30));
        b.latency("data_end", ms(5));
        a.merge(&b);
        assert_eq!(a.ops, 5);
        assert_eq!(a.bytes, 350);
        assert_eq!(a.errors.get("550"), Some(&2));
        assert_eq!(a.errors.get("451"), Some(&1));
        assert_eq!(a.errors.get("io"), Some(&1));
        assert_eq!(a.error_total(), 4);
        assert_eq!(a.latency["transaction"].count(), 2);
        assert_eq!(a.latency["data_end"].count(), 1);
        assert!(close(a.latency["transaction"].summary().max_ms, 30.0));
    }

    #[test]
    fn rates_and_throughput() {
        assert_eq!(rate(1000, Duration::from_secs(4)), 250.0);
        assert_eq!(rate(10, Duration::ZERO), 0.0);
        let t = Tally {
            ops: 500,
            bytes: 2 * 1024 * 1024,
            ..Default::default()
        };
        let r = Report::new("smtp", "messages", &t, Duration::from_millis(500));
        assert_eq!(r.ops_per_sec, 1000.0);
        assert_eq!(r.mib_per_sec, 4.0);
    }

    #[test]
    fn cpu_accounting_per_operation() {
        // 250 ticks at 100 Hz = 2.5 s of CPU for 1000 messages in 5 s.
        let c = CpuUsage::new("smtp", 42, 250, 100, 1000, Duration::from_secs(5));
        assert_eq!(c.cpu_seconds, 2.5);
        assert_eq!(c.cpu_ms_per_op, Some(2.5));
        assert_eq!(c.cores, 0.5);
        let none = CpuUsage::new("idle", 1, 10, 100, 0, Duration::from_secs(1));
        assert_eq!(none.cpu_ms_per_op, None);
    }

    #[test]
    fn memory_per_session_uses_the_baseline_and_never_goes_negative() {
        use crate::procfs::Smaps;
        let m = Memory::new(
            7,
            1000,
            Smaps {
                rss_kib: 10_000,
                pss_kib: 9_000,
            },
            Smaps {
                rss_kib: 42_000,
                pss_kib: 8_000,
            },
        );
        assert_eq!(m.rss_per_session_kib, 32.0);
        assert_eq!(m.pss_per_session_kib, 0.0);
        assert_eq!(
            Memory::new(1, 0, Smaps::default(), Smaps::default()).rss_per_session_kib,
            0.0
        );
    }

    #[test]
    fn text_and_json_carry_the_same_figures() {
        let mut t = Tally {
            ops: 10,
            ..Default::default()
        };
        t.error("550");
        t.latency("transaction", ms(4));
        let mut r = Report::new("smtp", "messages", &t, Duration::from_secs(2));
        r.cpu.push(CpuUsage::new(
            "store",
            9,
            100,
            100,
            10,
            Duration::from_secs(2),
        ));
        let text = r.to_text();
        assert!(
            text.contains("10 messages in 2.000 s = 5.0 messages/s"),
            "{text}"
        );
        assert!(text.contains("550=1"), "{text}");
        assert!(text.contains("100.000 ms per message"), "{text}");
        let json: serde_json::Value = serde_json::to_value(&r).unwrap();
        assert_eq!(json["ops"], 10);
        assert_eq!(json["errors"]["550"], 1);
        assert_eq!(json["cpu"][0]["cpu_ms_per_op"], 100.0);
        assert_eq!(json["latency"]["transaction"]["count"], 1);
    }
}
