//! CPU time and memory of server processes from Linux `/proc`.

use std::collections::HashMap;
use std::time::Duration;

use crate::report::CpuUsage;

/// utime + stime (and cutime + cstime, the CPU of waited-for children) in clock ticks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StatTimes {
    pub ppid: u32,
    pub self_ticks: u64,
    pub children_ticks: u64,
}

/// Parses `/proc/PID/stat`. The command name may hold spaces and parentheses, so fields are
/// counted from the *last* `)`.
pub fn parse_stat(s: &str) -> Option<StatTimes> {
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state(3) ppid(4) ... utime(14) stime(15) cutime(16) cstime(17).
    let field = |n: usize| f.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    Some(StatTimes {
        ppid: field(4)? as u32,
        self_ticks: field(14)? + field(15)?,
        children_ticks: field(16)? + field(17)?,
    })
}

pub fn read_stat(pid: u32) -> std::io::Result<StatTimes> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat(&s).ok_or_else(|| std::io::Error::other(format!("unparsable /proc/{pid}/stat")))
}

/// CPU ticks of `pid` and all its live descendants, each with the time of the children it
/// reaped: a PostgreSQL postmaster's backends, including ones that came and went.
pub fn tree_ticks(root: u32) -> std::io::Result<u64> {
    let mut all: HashMap<u32, StatTimes> = HashMap::new();
    for entry in std::fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // Processes exit while we scan; a vanished one is simply not counted.
        if let Ok(st) = read_stat(pid) {
            all.insert(pid, st);
        }
    }
    sum_tree(root, &all).ok_or_else(|| std::io::Error::other(format!("no process {root}")))
}

pub fn sum_tree(root: u32, all: &HashMap<u32, StatTimes>) -> Option<u64> {
    all.get(&root)?;
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for (pid, st) in all {
        children.entry(st.ppid).or_default().push(*pid);
    }
    let mut total = 0;
    let mut stack = vec![root];
    while let Some(p) = stack.pop() {
        if let Some(st) = all.get(&p) {
            total += st.self_ticks + st.children_ticks;
        }
        if let Some(c) = children.get(&p) {
            stack.extend(c.iter().copied().filter(|c| *c != p));
        }
    }
    Some(total)
}

/// Clock ticks per second for /proc times (USER_HZ); `getconf` avoids an unsafe sysconf call.
pub fn clk_tck() -> u64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

/// One watched process: `name=PID` (the process alone) or `name=PID+` (with descendants).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Watched {
    pub name: String,
    pub pid: u32,
    pub tree: bool,
}

impl std::str::FromStr for Watched {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, pid) = s
            .split_once('=')
            .ok_or_else(|| format!("expected name=PID or name=PID+, got {s:?}"))?;
        let (pid, tree) = match pid.strip_suffix('+') {
            Some(p) => (p, true),
            None => (pid, false),
        };
        let pid = pid.parse().map_err(|_| format!("bad pid in {s:?}"))?;
        if name.is_empty() {
            return Err(format!("empty name in {s:?}"));
        }
        Ok(Watched {
            name: name.to_string(),
            pid,
            tree,
        })
    }
}

impl Watched {
    fn ticks(&self) -> std::io::Result<u64> {
        if self.tree {
            tree_ticks(self.pid)
        } else {
            read_stat(self.pid).map(|s| s.self_ticks)
        }
    }
}

/// CPU snapshot of the watched processes (plus mailbench itself) taken at the start of the
/// measured phase.
pub struct CpuMeter {
    watched: Vec<(Watched, u64, Option<u64>)>,
    own: u64,
    clk_tck: u64,
}

impl CpuMeter {
    pub fn start(watched: &[Watched]) -> anyhow::Result<Self> {
        let mut w = Vec::new();
        for p in watched {
            let t = p.ticks().map_err(|e| {
                anyhow::anyhow!("cannot read CPU time of {}={}: {e}", p.name, p.pid)
            })?;
            // Resetting the kernel's peak-RSS mark makes VmHWM at the end the peak of this run.
            let rss = if p.tree {
                None
            } else {
                let _ = std::fs::write(format!("/proc/{}/clear_refs", p.pid), "5");
                read_status_kib(p.pid, "VmRSS:")
            };
            w.push((p.clone(), t, rss));
        }
        Ok(CpuMeter {
            watched: w,
            own: read_stat(std::process::id())
                .map(|s| s.self_ticks)
                .unwrap_or(0),
            clk_tck: clk_tck(),
        })
    }

    pub fn finish(&self, ops: u64, elapsed: Duration) -> Vec<CpuUsage> {
        let mut out = Vec::new();
        for (p, before, rss) in &self.watched {
            // A process that died during the run reports nothing rather than a wrong figure.
            if let Ok(after) = p.ticks() {
                let name = if p.tree {
                    format!("{}+", p.name)
                } else {
                    p.name.clone()
                };
                let mut u = CpuUsage::new(
                    &name,
                    p.pid,
                    after.saturating_sub(*before),
                    self.clk_tck,
                    ops,
                    elapsed,
                );
                if rss.is_some() {
                    u.rss_start_kib = *rss;
                    u.rss_peak_kib = read_status_kib(p.pid, "VmHWM:");
                }
                out.push(u);
            }
        }
        let own = read_stat(std::process::id())
            .map(|s| s.self_ticks)
            .unwrap_or(0);
        out.push(CpuUsage::new(
            "mailbench (client)",
            std::process::id(),
            own.saturating_sub(self.own),
            self.clk_tck,
            ops,
            elapsed,
        ));
        out
    }
}

/// A `kB` field of `/proc/PID/status`, e.g. `VmRSS:` or `VmHWM:`.
pub fn parse_status_kib(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

pub fn read_status_kib(pid: u32, key: &str) -> Option<u64> {
    parse_status_kib(
        &std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?,
        key,
    )
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Smaps {
    pub rss_kib: u64,
    pub pss_kib: u64,
}

pub fn parse_smaps_rollup(s: &str) -> Option<Smaps> {
    let mut rss = None;
    let mut pss = None;
    for line in s.lines() {
        let mut it = line.split_whitespace();
        let key = it.next();
        let val = it.next().and_then(|v| v.parse::<u64>().ok());
        match key {
            Some("Rss:") => rss = val,
            Some("Pss:") => pss = val,
            _ => {}
        }
    }
    Some(Smaps {
        rss_kib: rss?,
        pss_kib: pss?,
    })
}

pub fn read_smaps(pid: u32) -> std::io::Result<Smaps> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    parse_smaps_rollup(&s)
        .ok_or_else(|| std::io::Error::other(format!("unparsable /proc/{pid}/smaps_rollup")))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Both meter tests watch this very process and reset its peak-RSS mark.
    static METER_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn stat_with_parentheses_and_spaces_in_the_name() {
        let s =
            "1234 (my (odd) proc) S 1 1234 1234 0 -1 4194560 500 0 0 0 150 50 7 3 20 0 4 0 100 0 0";
        let t = parse_stat(s).unwrap();
        assert_eq!(t.ppid, 1);
        assert_eq!(t.self_ticks, 200);
        assert_eq!(t.children_ticks, 10);
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) S 1 2"), None);
    }

    #[test]
    fn own_process_is_readable() {
        let t = read_stat(std::process::id()).unwrap();
        assert!(t.ppid > 0);
    }

    #[test]
    fn tree_sums_descendants_and_reaped_children_only() {
        let mut all = HashMap::new();
        let st = |ppid, s, c| StatTimes {
            ppid,
            self_ticks: s,
            children_ticks: c,
        };
        all.insert(10, st(1, 100, 40)); // postmaster, 40 ticks of reaped backends
        all.insert(11, st(10, 30, 0)); // backend
        all.insert(12, st(11, 5, 0)); // grandchild
        all.insert(20, st(1, 999, 999)); // unrelated
        assert_eq!(sum_tree(10, &all), Some(175));
        assert_eq!(sum_tree(11, &all), Some(35));
        assert_eq!(sum_tree(99, &all), None);
    }

    #[test]
    fn watched_syntax() {
        assert_eq!(
            "store=42".parse::<Watched>().unwrap(),
            Watched {
                name: "store".into(),
                pid: 42,
                tree: false
            }
        );
        assert!("postgres=7+".parse::<Watched>().unwrap().tree);
        assert!("store".parse::<Watched>().is_err());
        assert!("store=x".parse::<Watched>().is_err());
        assert!("=5".parse::<Watched>().is_err());
    }

    #[test]
    fn smaps_rollup() {
        let s = "55d0-7ffd ---p 00000000 00:00 0 [rollup]\nRss:   123456 kB\nPss:   100000 kB\nPss_Anon: 5 kB\n";
        assert_eq!(
            parse_smaps_rollup(s),
            Some(Smaps {
                rss_kib: 123456,
                pss_kib: 100000
            })
        );
        assert_eq!(parse_smaps_rollup("Rss: 1 kB\n"), None);
        let own = read_smaps(std::process::id()).unwrap();
        assert!(own.rss_kib > 0);
    }

    #[test]
    fn status_fields() {
        let s = "Name:\tx\nVmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\n";
        assert_eq!(parse_status_kib(s, "VmHWM:"), Some(2048));
        assert_eq!(parse_status_kib(s, "VmRSS:"), Some(1024));
        assert_eq!(parse_status_kib(s, "VmSwap:"), None);
    }

    #[test]
    fn peak_rss_of_a_watched_process_sees_a_transient_allocation() {
        let _one_at_a_time = METER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let me = Watched {
            name: "me".into(),
            pid: std::process::id(),
            tree: false,
        };
        let m = CpuMeter::start(std::slice::from_ref(&me)).unwrap();
        // Touch 64 MiB and free it again: only the peak remembers it.
        let big = vec![1u8; 64 << 20];
        std::hint::black_box(&big);
        drop(big);
        let u = &m.finish(1, Duration::from_secs(1))[0];
        let (start, peak) = (u.rss_start_kib.unwrap(), u.rss_peak_kib.unwrap());
        assert!(peak >= start + 60 * 1024, "start {start} peak {peak}");
    }

    #[test]
    fn cpu_meter_counts_this_process() {
        let _one_at_a_time = METER_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        let me = Watched {
            name: "me".into(),
            pid: std::process::id(),
            tree: false,
        };
        let m = CpuMeter::start(std::slice::from_ref(&me)).unwrap();
        // Burn measurable CPU until the kernel has charged at least 60 ms of it to this
        // process (wall time is no measure on a loaded machine), within a generous deadline.
        let ticks = |s: StatTimes| s.self_ticks;
        let before = ticks(read_stat(std::process::id()).unwrap());
        let want = (clk_tck() * 6).div_ceil(100);
        let mut x = 0u64;
        let t = std::time::Instant::now();
        while ticks(read_stat(std::process::id()).unwrap()) < before + want {
            assert!(t.elapsed() < Duration::from_secs(60), "no CPU time charged");
            for i in 0..100_000u64 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(i);
            }
        }
        std::hint::black_box(x);
        let u = m.finish(10, t.elapsed());
        assert_eq!(u.len(), 2);
        assert_eq!(u[0].name, "me");
        assert!(u[0].cpu_seconds >= 0.02, "{u:?}");
        assert!(u[0].cpu_ms_per_op.unwrap() >= 2.0, "{u:?}");
    }
}
