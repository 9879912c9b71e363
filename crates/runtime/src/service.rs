//! The one `main` every service binary runs: the same flags, signal handlers installed before
//! anything else (a SIGTERM during start-up is not lost), logging and telemetry, the
//! configuration, `start`, then wait for a signal and drain with a grace period.
//!
//! Flag spellings are the same for every service. The spellings some services used before
//! (`--json-logs`, `--grace-seconds`) are still accepted for one release, with a warning.

use std::fmt::Debug;
use std::future::Future;
use std::time::Duration;

use anyhow::Context;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::config::{self, ConfigArgs};
use crate::{Shutdown, shutdown, telemetry};

/// Why a protocol gateway could not start: what binding its listeners, loading TLS and
/// setting up its clients can fail on.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("tls: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("grpc endpoint: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("{0}")]
    ProxyProtocol(#[from] crate::proxy_protocol::ProxyConfigError),
    /// Set-up of the service's own (a DNS resolver, say), with what it was.
    #[error("{0}")]
    Other(String),
}

/// Command-line flags every service binary takes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServiceArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Log lines as JSON.
    #[arg(long = "log-json", alias = "json-logs", env = "MAILSUITE_LOG_JSON")]
    pub log_json: bool,
    /// Seconds that open sessions and calls get to finish after SIGTERM/SIGINT before they
    /// are cut off [default: the service's own, see the README].
    #[arg(long = "grace-secs", alias = "grace-seconds", value_name = "SECONDS")]
    pub grace_secs: Option<u64>,
}

/// Old flag spellings still accepted, and the spelling that replaces each.
const RENAMED_FLAGS: &[(&str, &str)] = &[
    ("--json-logs", "--log-json"),
    ("--grace-seconds", "--grace-secs"),
];

/// The renamed flags among `argv`, as (old, new).
pub fn renamed_flags_in<I, S>(argv: I) -> Vec<(&'static str, &'static str)>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    let mut found = Vec::new();
    for a in argv {
        let flag = a.as_ref().split('=').next().unwrap_or_default();
        for &(old, new) in RENAMED_FLAGS {
            if flag == old && !found.contains(&(old, new)) {
                found.push((old, new));
            }
        }
    }
    found
}

/// What differs between the services' `main`s.
pub struct Service<C> {
    /// The service name: telemetry's `service.name` and the log lines'.
    pub name: &'static str,
    /// Grace period when neither the flag nor the configuration sets one.
    pub default_grace: Duration,
    /// A grace period the service's configuration sets, if it has such a key (the flag wins).
    pub config_grace: fn(&C) -> Option<Duration>,
    /// Configuration keys renamed in this release (read with a warning).
    pub renamed: &'static config::Renamed,
}

impl<C> Service<C> {
    pub fn new(name: &'static str, default_grace: Duration) -> Service<C> {
        Service {
            name,
            default_grace,
            config_grace: |_| None,
            renamed: &[],
        }
    }

    /// Read these old key spellings as their new names, with a warning.
    pub fn with_renamed(mut self, renamed: &'static config::Renamed) -> Service<C> {
        self.renamed = renamed;
        self
    }

    /// The grace period: the flag, else the configuration's, else the default.
    pub fn grace(&self, args: &ServiceArgs, config: &C) -> Duration {
        args.grace_secs
            .map(Duration::from_secs)
            .or_else(|| (self.config_grace)(config))
            .unwrap_or(self.default_grace)
    }

    /// A service binary's whole `main`: parse the command line (`about` and `version` are what
    /// `--help` and `--version` show), then [`Service::run`].
    pub async fn main<S, E, F, Fut>(
        self,
        about: &'static str,
        version: &'static str,
        start: F,
    ) -> anyhow::Result<()>
    where
        C: DeserializeOwned + Serialize + Default,
        S: Debug,
        E: std::error::Error + Send + Sync + 'static,
        F: FnOnce(C, Shutdown) -> Fut,
        Fut: Future<Output = Result<S, E>>,
    {
        let command = clap::Command::new(self.name).version(version).about(about);
        let matches = <ServiceArgs as clap::Args>::augment_args(command).get_matches();
        let args = <ServiceArgs as clap::FromArgMatches>::from_arg_matches(&matches)?;
        self.run(args, start).await
    }

    /// Run the service until SIGTERM/SIGINT, then drain.
    pub async fn run<S, E, F, Fut>(self, args: ServiceArgs, start: F) -> anyhow::Result<()>
    where
        C: DeserializeOwned + Serialize + Default,
        S: Debug,
        E: std::error::Error + Send + Sync + 'static,
        F: FnOnce(C, Shutdown) -> Fut,
        Fut: Future<Output = Result<S, E>>,
    {
        let mut signals = shutdown::Signals::install()?;
        let _telemetry = telemetry::init(self.name, args.log_json);
        for (old, new) in renamed_flags_in(std::env::args().skip(1)) {
            tracing::warn!("{old} is the old spelling of {new} and will go in the next release");
        }
        crate::tls::install_crypto_provider();
        let config: C =
            config::load_renamed(&args.config.sources(), self.renamed).context("configuration")?;
        let grace = self.grace(&args, &config);
        let sd = Shutdown::new();
        let started = start(config, sd.clone())
            .await
            .with_context(|| format!("starting {}", self.name))?;
        tracing::info!(
            ?started,
            grace_secs = grace.as_secs(),
            "{} started",
            self.name
        );
        signals.recv().await;
        tracing::info!(grace_secs = grace.as_secs(), "shutting down");
        sd.drain(grace).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        service: ServiceArgs,
    }

    #[derive(Default)]
    struct Conf {
        grace: Option<u64>,
    }

    fn parse(argv: &[&str]) -> ServiceArgs {
        Cli::try_parse_from(std::iter::once("svc").chain(argv.iter().copied()))
            .unwrap()
            .service
    }

    #[test]
    fn old_and_new_spellings_parse_the_same() {
        // MAILSUITE_LOG_JSON in the test environment would turn log_json on for both.
        for argv in [&["--grace-secs", "7"][..], &["--grace-seconds=7"][..]] {
            assert_eq!(parse(argv).grace_secs, Some(7), "{argv:?}");
        }
        assert!(parse(&["--json-logs"]).log_json);
        assert!(parse(&["--log-json"]).log_json);
        assert!(Cli::try_parse_from(["svc", "--grace-secs", "x"]).is_err());
    }

    #[test]
    fn renamed_flags_are_named_once_each() {
        assert_eq!(
            renamed_flags_in([
                "--json-logs",
                "--grace-seconds=3",
                "--json-logs",
                "--set",
                "a=b"
            ]),
            vec![
                ("--json-logs", "--log-json"),
                ("--grace-seconds", "--grace-secs")
            ]
        );
        assert!(renamed_flags_in(["--log-json", "--grace-secs", "3"]).is_empty());
    }

    #[test]
    fn grace_is_the_flag_then_the_configuration_then_the_default() {
        let svc = Service::<Conf> {
            name: "t",
            default_grace: Duration::from_secs(30),
            config_grace: |c| c.grace.map(Duration::from_secs),
            renamed: &[],
        };
        let with = Conf { grace: Some(12) };
        let without = Conf::default();
        assert_eq!(
            svc.grace(&parse(&["--grace-secs", "5"]), &with),
            Duration::from_secs(5)
        );
        assert_eq!(svc.grace(&parse(&[]), &with), Duration::from_secs(12));
        assert_eq!(svc.grace(&parse(&[]), &without), Duration::from_secs(30));
        let plain = Service::<Conf>::new("t", Duration::from_secs(10));
        assert_eq!(plain.grace(&parse(&[]), &with), Duration::from_secs(10));
    }
}
