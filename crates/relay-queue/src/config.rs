//! relay-queue configuration. Every limit and timer is a field with a documented default.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// gRPC `Queue` service; empty disables it.
    pub listen_grpc: String,
    /// HTTP `/healthz` `/readyz` `/metrics`; empty disables it.
    pub listen_ops: String,
    pub database_url: String,
    /// mailbox-store (Directory + Delivery) for hosted-domain recipients.
    pub store_url: String,
    /// The services' shared gRPC secret: required of callers of `Queue`, sent to the store.
    /// Empty = none (a single host or a trusted network only).
    pub internal_token: mailsuite_runtime::grpc::InternalToken,
    /// Serve gRPC without an internal token on a non-loopback address. Off: such a
    /// configuration refuses to start (every caller would be trusted).
    pub allow_unauthenticated_grpc: bool,
    /// Our name in EHLO, Received: and DSNs.
    pub hostname: String,
    /// Apply the migrations at start-up (under sqlx's advisory lock).
    pub migrate_on_start: bool,
    /// On SIGTERM, how long deliveries in progress may finish before they are dropped (their
    /// recipients are retried by another worker once the lease expires).
    pub shutdown_grace_secs: u64,
    /// Per-domain routes, `domain = "host:port"`, checked before MX lookup. A leading `[`
    /// is not needed: the host is used as is, without MX lookup.
    pub transports: BTreeMap<String, String>,
    /// Relay every remote message through this `host:port` instead of MX lookup. The port
    /// defaults to 25 with `smarthost_tls = "starttls"` and to 465 with `"implicit"`.
    pub smarthost: String,
    /// AUTH PLAIN credentials for the smarthost, sent only over TLS whose certificate verified
    /// for the smarthost's name (see `smarthost_tls_insecure_skip_verify`).
    pub smarthost_user: String,
    pub smarthost_password: String,
    /// How the smarthost connection is encrypted: `"starttls"` (STARTTLS required; a server
    /// that does not offer it gets nothing) or `"implicit"` (TLS from the first byte, RFC 8314,
    /// usually port 465). Either way the certificate must verify, and mail waits otherwise.
    pub smarthost_tls: SmarthostTls,
    /// Extra PEM roots trusted for the smarthost's certificate (in addition to the system
    /// roots and `tls_extra_roots`), e.g. a private CA. Empty = none.
    pub smarthost_ca_file: String,
    /// DANGEROUS: accept any smarthost certificate (still TLS, still required, but anyone on
    /// the network path can pose as the smarthost and read the credentials and all mail).
    /// Logged as a warning at start-up. Only for a lab smarthost with a throw-away certificate.
    pub smarthost_tls_insecure_skip_verify: bool,
    /// DNS servers (`ip:port`) for MX and address lookups; empty = the system's resolv.conf.
    pub dns_servers: Vec<String>,
    /// The SMTP port of MX hosts (25; other values only make sense in a lab).
    pub mx_port: u16,
    /// Domains whose delivery must use verified TLS (never fall back to plain text).
    pub require_tls_domains: Vec<String>,
    /// Extra PEM roots trusted for STARTTLS verification (in addition to the webpki roots).
    pub tls_extra_roots: String,
    /// Opportunistic STARTTLS to MX hosts with an unverifiable certificate: go on in TLS
    /// (true, like most MTAs; the result is recorded) or refuse and defer (false). Never
    /// applies to the smarthost, whose certificate must always verify.
    pub tls_allow_invalid_opportunistic: bool,
    /// Connect to MX hosts whose addresses are loopback, private (RFC 1918), shared (RFC 6598),
    /// link-local, unique-local (fc00::/7), unspecified, multicast or broadcast. Off, such
    /// addresses are skipped and a domain with no other address is deferred: otherwise anyone
    /// can make the relay open SMTP connections into our own network by publishing an MX
    /// record. `transports` and `smarthost` are the operator's own choice and always allowed.
    pub allow_private_mx_addresses: bool,
    /// DKIM keys from configuration (in addition to the store's Admin.ListDkimKeys).
    pub dkim: Vec<DkimKeyConfig>,
    /// Ask the store for DKIM keys (Admin.ListDkimKeys) every `dkim_refresh_secs`.
    pub dkim_from_store: bool,
    pub dkim_refresh_secs: u64,
    pub retry: RetryConfig,
    pub workers: WorkerConfig,
    pub timeouts: TimeoutConfig,
    pub limits: Limits,
}

/// How the connection to the smarthost is encrypted.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum SmarthostTls {
    /// Plain TCP, then STARTTLS, which must be offered and must succeed.
    #[default]
    Starttls,
    /// TLS from the first byte (RFC 8314 "submissions", port 465).
    Implicit,
}

impl SmarthostTls {
    /// The port used when `smarthost` names none.
    pub fn default_port(self) -> u16 {
        match self {
            SmarthostTls::Starttls => 25,
            SmarthostTls::Implicit => 465,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct DkimKeyConfig {
    pub domain: String,
    pub selector: String,
    /// "rsa-sha256" or "ed25519-sha256".
    pub algorithm: String,
    /// PKCS#8 (or PKCS#1 for RSA) PEM, inline.
    pub private_key_pem: String,
    /// Or a path to it.
    pub private_key_file: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Delays (seconds) after the 1st, 2nd, ... failed attempt; the last one repeats.
    pub schedule_secs: Vec<u64>,
    /// A recipient still undelivered this long after it was queued fails with a DSN.
    pub max_lifetime_secs: u64,
    /// Send a "delayed" DSN (NOTIFY=DELAY) once a recipient has waited this long; 0 = never.
    pub delay_warning_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Claiming loops in this process.
    pub count: usize,
    /// How often a worker looks for due recipients when nothing wakes it.
    pub poll_interval_ms: u64,
    /// How long a claim is held; a worker that dies is replaced after this.
    pub lease_secs: u64,
    /// Recipients claimed per round.
    pub batch: i64,
    /// Concurrent SMTP transactions to one destination (domain or route) per process.
    pub per_destination: usize,
    /// Concurrent deliveries per process.
    pub max_in_flight: usize,
    /// Finished messages (every recipient delivered or failed) stay visible this long.
    pub keep_finished_secs: u64,
    /// How often the queue-size gauges of /metrics are refreshed.
    pub metrics_interval_secs: u64,
}

/// RFC 5321 §4.5.3.2 timeouts, in seconds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutConfig {
    pub connect: u64,
    pub greeting: u64,
    pub ehlo: u64,
    pub starttls: u64,
    pub mail: u64,
    pub rcpt: u64,
    pub data_init: u64,
    /// Per block of data written.
    pub data_block: u64,
    pub data_term: u64,
    /// Local delivery (gRPC) and DNS.
    pub rpc: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_message_bytes: u64,
    pub max_recipients: usize,
    /// Messages with more Received: headers than this are looping and fail.
    pub max_received_headers: usize,
    pub max_reply_bytes: usize,
    /// MX hosts tried per attempt.
    pub max_mx_hosts: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen_grpc: "0.0.0.0:50052".into(),
            listen_ops: "0.0.0.0:9052".into(),
            database_url: "postgres://postgres@127.0.0.1:5432/mailsuite".into(),
            store_url: "http://127.0.0.1:50051".into(),
            internal_token: Default::default(),
            allow_unauthenticated_grpc: false,
            hostname: "localhost".into(),
            migrate_on_start: true,
            shutdown_grace_secs: 10,
            transports: BTreeMap::new(),
            smarthost: String::new(),
            smarthost_user: String::new(),
            smarthost_password: String::new(),
            smarthost_tls: SmarthostTls::Starttls,
            smarthost_ca_file: String::new(),
            smarthost_tls_insecure_skip_verify: false,
            require_tls_domains: Vec::new(),
            dns_servers: Vec::new(),
            mx_port: 25,
            tls_extra_roots: String::new(),
            tls_allow_invalid_opportunistic: true,
            allow_private_mx_addresses: false,
            dkim: Vec::new(),
            dkim_from_store: true,
            dkim_refresh_secs: 300,
            retry: RetryConfig::default(),
            workers: WorkerConfig::default(),
            timeouts: TimeoutConfig::default(),
            limits: Limits::default(),
        }
    }
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            schedule_secs: vec![300, 600, 1800, 3600, 7200, 14400],
            max_lifetime_secs: 5 * 24 * 3600,
            delay_warning_secs: 4 * 3600,
        }
    }
}

impl RetryConfig {
    /// Delay before the next attempt after `attempts` failed ones (1-based).
    pub fn delay_after(&self, attempts: u32) -> Duration {
        let i = (attempts.max(1) as usize - 1).min(self.schedule_secs.len().saturating_sub(1));
        Duration::from_secs(self.schedule_secs.get(i).copied().unwrap_or(14400))
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            count: 2,
            poll_interval_ms: 5000,
            lease_secs: 600,
            batch: 100,
            per_destination: 4,
            max_in_flight: 32,
            keep_finished_secs: 24 * 3600,
            metrics_interval_secs: 15,
        }
    }
}

impl Default for TimeoutConfig {
    fn default() -> Self {
        TimeoutConfig {
            connect: 30,
            greeting: 300,
            ehlo: 300,
            starttls: 120,
            mail: 300,
            rcpt: 300,
            data_init: 120,
            data_block: 180,
            data_term: 600,
            rpc: 60,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 50 * 1024 * 1024,
            max_recipients: 1000,
            max_received_headers: 50,
            max_reply_bytes: 64 * 1024,
            max_mx_hosts: 5,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_repeats_last_step() {
        let r = RetryConfig::default();
        assert_eq!(r.delay_after(1), Duration::from_secs(300));
        assert_eq!(r.delay_after(2), Duration::from_secs(600));
        assert_eq!(r.delay_after(6), Duration::from_secs(14400));
        assert_eq!(r.delay_after(60), Duration::from_secs(14400));
    }

    #[test]
    fn loads_transport_map_from_file() {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            f.path(),
            "[transports]\n\"remote.test\" = \"127.0.0.1:2525\"\n[retry]\nschedule_secs = [1, 2]\n",
        )
        .unwrap();
        let c: Config =
            mailsuite_runtime::config::load(&mailsuite_runtime::config::ConfigSources {
                file: Some(f.path().to_path_buf()),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(c.transports["remote.test"], "127.0.0.1:2525");
        assert_eq!(c.retry.schedule_secs, vec![1, 2]);
        assert_eq!(c.workers, WorkerConfig::default());
    }

    #[test]
    fn security_keys_default_safe_and_load_from_file() {
        let d = Config::default();
        assert_eq!(d.smarthost_tls, SmarthostTls::Starttls);
        assert!(!d.smarthost_tls_insecure_skip_verify);
        assert!(!d.allow_private_mx_addresses);
        assert!(d.smarthost_ca_file.is_empty());
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            f.path(),
            "smarthost = \"relay.test\"\nsmarthost_tls = \"implicit\"\n\
             smarthost_ca_file = \"/etc/ca.pem\"\nallow_private_mx_addresses = true\n",
        )
        .unwrap();
        let c: Config =
            mailsuite_runtime::config::load(&mailsuite_runtime::config::ConfigSources {
                file: Some(f.path().to_path_buf()),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(c.smarthost_tls, SmarthostTls::Implicit);
        assert_eq!(c.smarthost_tls.default_port(), 465);
        assert_eq!(c.smarthost_ca_file, "/etc/ca.pem");
        assert!(c.allow_private_mx_addresses);
        std::fs::write(f.path(), "smarthost_tls = \"tls\"\n").unwrap();
        assert!(
            mailsuite_runtime::config::load::<Config>(&mailsuite_runtime::config::ConfigSources {
                file: Some(f.path().to_path_buf()),
                ..Default::default()
            })
            .is_err(),
            "an unknown TLS mode is refused, not defaulted"
        );
    }
}
