//! `exec`: measure a load generator that is not mailbench (Postfix's `smtp-source`, …) the
//! same way mailbench measures itself, so the same figures come out for any server.
//!
//! Such tools report no throughput of their own, and what they count as sent is not what the
//! server kept. So the operations are counted on the server side: a shell command that prints
//! a number (a SQL count of stored messages, a `find | wc -l` of a Maildir) runs before and
//! after, and the difference is what the run did.

use std::process::Stdio;
use std::time::Instant;

use anyhow::{Context, bail};

use crate::procfs::{CpuMeter, clk_tck, read_stat};
use crate::report::{CpuUsage, Report, Tally};

use super::Common;

#[derive(Clone, Debug, clap::Args)]
pub struct ExecArgs {
    /// Shell command that prints the number of completed operations, e.g.
    /// `psql -tAc "select count(*) from mailbox.messages"`; run before and after the load.
    #[arg(long, value_name = "SHELL")]
    pub count: String,
    /// What the count counts (for the report).
    #[arg(long, default_value = "messages")]
    pub unit: String,
    /// The load generator and its arguments (after `--`).
    #[arg(trailing_var_arg = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// The number a count command printed (its last non-empty line).
pub fn parse_count(out: &str) -> Option<u64> {
    out.lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .and_then(|l| l.parse().ok())
}

async fn count(shell: &str) -> anyhow::Result<u64> {
    let out = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(shell)
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("running the count command {shell:?}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "the count command {shell:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse_count(&text)
        .with_context(|| format!("the count command {shell:?} printed no number: {text:?}"))
}

pub async fn run(a: ExecArgs, common: &Common) -> anyhow::Result<(Report, bool)> {
    let (program, args) = a.command.split_first().context("no command")?;
    let before = count(&a.count).await?;
    let meter = CpuMeter::start(&common.pids)?;
    let children_before = read_stat(std::process::id())
        .map(|s| s.children_ticks)
        .unwrap_or(0);
    let started = Instant::now();
    // The tool's own output goes to stderr, so stdout stays the report (and valid JSON).
    let status = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::io::stderr())
        .status()
        .await
        .with_context(|| format!("starting {program:?}"))?;
    let elapsed = started.elapsed();
    let children_after = read_stat(std::process::id())
        .map(|s| s.children_ticks)
        .unwrap_or(0);
    let after = count(&a.count).await?;
    let ops = after.saturating_sub(before);

    let mut tally = Tally {
        ops,
        ..Tally::default()
    };
    if !status.success() {
        tally.error(format!("exit:{}", status.code().unwrap_or(-1)));
    }
    let mut report = Report::new("exec", &a.unit, &tally, elapsed);
    let mut cpu = meter.finish(ops, elapsed);
    // The load generator ran as our child: its CPU is the client's, reported apart.
    cpu.push(CpuUsage::new(
        &format!("{program} (client)"),
        0,
        children_after.saturating_sub(children_before),
        clk_tck(),
        ops,
        elapsed,
    ));
    let server: f64 = cpu
        .iter()
        .filter(|c| !c.name.ends_with("(client)"))
        .map(|c| c.cpu_seconds)
        .sum();
    if ops > 0 && !common.pids.is_empty() {
        report.note(
            "server_cpu_ms_per_op",
            (server * 1000.0 / ops as f64 * 1000.0).round() / 1000.0,
        );
    }
    report.cpu = cpu;
    report.note("count_before", before);
    report.note("count_after", after);
    report.note("command", a.command.join(" "));
    Ok((report, status.success()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_is_the_last_number_printed() {
        assert_eq!(parse_count(" 42\n"), Some(42));
        assert_eq!(parse_count("NOTICE: x\n7\n\n"), Some(7));
        assert_eq!(parse_count(""), None);
        assert_eq!(parse_count("count\n-----\nabc\n"), None);
    }
}
