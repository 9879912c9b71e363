//! Subcommands. Each builds a `Report`; `main` prints it as text or JSON.

pub mod exec;
pub mod idle;
pub mod imap;
pub mod pop3;
pub mod smtp;

use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::net::TlsArgs;
use crate::procfs::Watched;

#[derive(Clone, Debug, clap::Args)]
pub struct Common {
    /// Print the report as JSON on stdout (the progress bar is hidden).
    #[arg(long, global = true)]
    pub json: bool,
    /// Measure the CPU time of a server process: `name=PID`, or `name=PID+` to include its
    /// descendants (e.g. a PostgreSQL postmaster and its backends). Repeatable.
    #[arg(long = "pid", value_name = "NAME=PID", global = true)]
    pub pids: Vec<Watched>,
    /// Per-operation network timeout, seconds.
    #[arg(long, default_value_t = 30.0, global = true)]
    pub timeout: f64,
    #[command(flatten)]
    pub tls: TlsArgs,
}

impl Common {
    pub fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.timeout.max(0.001))
    }

    pub fn progress(&self, total: u64, unit: &str) -> ProgressBar {
        if self.json {
            return ProgressBar::hidden();
        }
        let pb = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        pb.set_style(
            ProgressStyle::with_template(&format!(
                "{{elapsed_precise}} [{{bar:40}}] {{pos}}/{{len}} {unit} {{per_sec}} {{msg}}"
            ))
            .expect("static template")
            .progress_chars("=> "),
        );
        pb
    }
}

/// Accounts addressed as `--user-template` with the placeholder `{n}` = 1..=users.
#[derive(Clone, Debug, clap::Args)]
pub struct Users {
    /// Number of accounts; the `n` placeholder in the templates runs from 1 to this.
    #[arg(long, default_value_t = 1)]
    pub users: u64,
    /// Address of account n.
    #[arg(long, default_value = "bench{n}@mailbench.test")]
    pub user_template: String,
    /// Login name of account n (default: its address).
    #[arg(long)]
    pub login_template: Option<String>,
    /// Password of account n (may contain the `n` placeholder too).
    #[arg(long, default_value = "password")]
    pub password: String,
}

impl Users {
    pub fn count(&self) -> u64 {
        self.users.max(1)
    }
    pub fn address(&self, n: u64) -> String {
        self.user_template.replace("{n}", &n.to_string())
    }
    pub fn login(&self, n: u64) -> String {
        self.login_template
            .as_deref()
            .unwrap_or(&self.user_template)
            .replace("{n}", &n.to_string())
    }
    pub fn pass(&self, n: u64) -> String {
        self.password.replace("{n}", &n.to_string())
    }
}

/// Which TLS a client uses: none, implicit (`--tls`) or an upgrade (`--starttls`).
#[derive(Clone, Debug, clap::Args)]
pub struct Security {
    /// TLS from the first byte (ports 465, 993, 995).
    #[arg(long, conflicts_with = "starttls")]
    pub tls: bool,
    /// Upgrade with STARTTLS / STLS.
    #[arg(long)]
    pub starttls: bool,
}

impl Security {
    /// (implicit, upgrade) TLS settings.
    pub fn resolve(
        &self,
        common: &Common,
        server: &str,
    ) -> anyhow::Result<(Option<crate::net::Tls>, Option<crate::net::Tls>)> {
        if !self.tls && !self.starttls {
            return Ok((None, None));
        }
        let t = common.tls.build(server)?;
        Ok(if self.tls {
            (Some(t), None)
        } else {
            (None, Some(t))
        })
    }
}

/// A short random run id that tags every message of one run.
pub fn run_id() -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    format!("mb{:08x}", rng.r#gen::<u32>())
}
