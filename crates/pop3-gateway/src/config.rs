//! Configuration of the POP3 gateway. Every limit is a field here with its default documented.

use mailsuite_runtime::listener::ConnLimits;
use mailsuite_runtime::proxy_protocol::ProxyProtocolConfig;
use mailsuite_runtime::tls::TlsConfig;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Plain POP3 with STLS (RFC 2595). Empty string disables it.
    pub listen_pop3: String,
    /// POP3 over implicit TLS. Empty string disables it.
    pub listen_pop3s: String,
    /// HTTP `/healthz`, `/readyz`, `/metrics`. Empty string disables it.
    pub listen_ops: String,
    /// The mailbox-store gRPC endpoint.
    pub store_url: String,
    /// The services' shared gRPC secret, sent on every store call (empty = none).
    pub internal_token: mailsuite_runtime::grpc::InternalToken,
    /// Shown in the greeting.
    pub hostname: String,
    pub tls: TlsConfig,
    pub limits: Limits,
    pub auth: AuthConfig,
    /// RFC 2449 EXPIRE capability (e.g. "NEVER" or a number of days). Advertised only: the
    /// retention policy itself is enforced elsewhere. Empty = not advertised.
    pub expire: String,
    /// RFC 2449 LOGIN-DELAY in seconds: advertised, and a login of the same account sooner
    /// than this on this replica is refused with `[LOGIN-DELAY]`. 0 = not advertised.
    pub login_delay: u64,
    /// PROXY protocol (v1/v2) from trusted load balancers, per listener (README
    /// "Configuration"); off by default.
    pub proxy_protocol: ProxyProtocolConfig,
}

/// Keys renamed so that every service spells a setting the same way; the old names are read,
/// with a warning, until the next release (README "Configuration").
pub const RENAMED: &mailsuite_runtime::config::Renamed = &[
    ("limits.ip_auth_failures", "limits.max_auth_failures_per_ip"),
    (
        "limits.ip_auth_failure_window_secs",
        "limits.auth_failure_window_secs",
    ),
    ("limits.ip_table_capacity", "limits.max_tracked_clients"),
];

impl Default for Config {
    fn default() -> Self {
        Config {
            listen_pop3: "0.0.0.0:110".into(),
            listen_pop3s: "0.0.0.0:995".into(),
            listen_ops: "0.0.0.0:9110".into(),
            store_url: "http://127.0.0.1:50051".into(),
            internal_token: Default::default(),
            hostname: "localhost".into(),
            tls: TlsConfig::default(),
            limits: Limits::default(),
            auth: AuthConfig::default(),
            expire: String::new(),
            login_delay: 0,
            proxy_protocol: ProxyProtocolConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Accept USER/PASS and AUTH without TLS from loopback peers (tests, local tools).
    /// Connections from any other address always need TLS first.
    pub allow_plaintext_loopback: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Connections per listener and per client IP (over the limit: `-ERR [SYS/TEMP]`).
    pub connections: ConnLimits,
    /// Longest accepted command line, CRLF included (default 1024; RFC 2449 bounds client
    /// commands to 255 octets, but SASL responses may be longer).
    pub max_line: usize,
    /// RFC 1939 §3 auto-logout timer in seconds (default 600; the RFC requires at least 10
    /// minutes, lower values are for tests).
    pub idle_timeout_secs: u64,
    /// Absolute deadline from accept to a successful login, whatever the client sends
    /// meanwhile (default 60): the idle timer alone restarts on every byte, so without this
    /// a client trickling bytes would hold an unauthenticated connection forever.
    pub login_timeout_secs: u64,
    /// Once the first byte of a command line has arrived, the whole line must arrive within
    /// this many seconds (default 30).
    pub line_timeout_secs: u64,
    /// Give up on a client that does not read its response for this long (default 300).
    pub write_timeout_secs: u64,
    /// TLS handshake deadline, for both STLS and port 995 (default 30).
    pub tls_handshake_timeout_secs: u64,
    /// Delay before answering a failed login; doubles with every further failure in the
    /// same connection (default 1000 ms) ...
    pub auth_failure_delay_ms: u64,
    /// ... up to this much (default 16000 ms).
    pub auth_failure_delay_max_ms: u64,
    /// Failed logins after which the connection is closed (default 5).
    pub max_auth_failures: u32,
    /// Failed logins per client address (IPv4, or IPv6 /64), counted over all connections to
    /// this gateway process within `auth_failure_window_secs` (default 20). Past it, every
    /// login from that address is refused with `[LOGIN-DELAY]` after a growing delay,
    /// without asking the store, and the connection is closed. 0 = unlimited.
    pub max_auth_failures_per_ip: u32,
    /// The window over which `max_auth_failures_per_ip` counts (default 300).
    pub auth_failure_window_secs: u64,
    /// Client addresses tracked by the per-address limiter (default 100000); when full,
    /// the least recently active tenth goes, expired entries first.
    pub max_tracked_clients: usize,
    /// Unknown, malformed or out-of-state commands after which the connection is closed
    /// (default 20).
    pub max_bad_commands: u32,
    /// Deadline for one call to mailbox-store, and for each chunk of a streamed message
    /// (default 30).
    pub store_timeout_secs: u64,
    /// `/readyz` reports ready only while the store's gRPC health service answers SERVING;
    /// it is asked this often, in seconds (default 5).
    pub store_health_interval_secs: u64,
    /// RETR/TOP read a message from the store in windows of this many octets, so memory
    /// per transfer stays bounded whatever the message size (default 1 MiB).
    pub fetch_window_bytes: u64,
    /// Pipelined RETRs read ahead together: when a RETR is executed while more RETRs are
    /// already waiting in the input, the messages of up to this many of them are read from
    /// the store in one call (default 32; 0 or 1 = one store call per RETR) ...
    pub prefetch_messages: usize,
    /// ... as long as each is at most `prefetch_message_bytes` (default 64 KiB; larger ones
    /// are streamed in windows as usual) and together they hold at most `prefetch_bytes`
    /// (default 1 MiB): the memory a connection may hold for messages not yet sent.
    pub prefetch_message_bytes: u64,
    pub prefetch_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connections: ConnLimits::default(),
            max_line: 1024,
            idle_timeout_secs: 600,
            login_timeout_secs: 60,
            line_timeout_secs: 30,
            write_timeout_secs: 300,
            tls_handshake_timeout_secs: 30,
            auth_failure_delay_ms: 1000,
            auth_failure_delay_max_ms: 16_000,
            max_auth_failures: 5,
            max_auth_failures_per_ip: 20,
            auth_failure_window_secs: 300,
            max_tracked_clients: 100_000,
            max_bad_commands: 20,
            store_health_interval_secs: 5,
            store_timeout_secs: 30,
            fetch_window_bytes: 1 << 20,
            prefetch_messages: 32,
            prefetch_message_bytes: 64 * 1024,
            prefetch_bytes: 1 << 20,
        }
    }
}

impl Limits {
    /// How long to wait before answering the `failures`-th failed login (1-based).
    pub fn auth_failure_delay(&self, failures: u32) -> std::time::Duration {
        let shift = failures.saturating_sub(1).min(20);
        let ms = self
            .auth_failure_delay_ms
            .saturating_mul(1u64 << shift)
            .min(
                self.auth_failure_delay_max_ms
                    .max(self.auth_failure_delay_ms),
            );
        std::time::Duration::from_millis(ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renamed_keys_lead_from_old_names_to_real_keys() {
        mailsuite_runtime::config::check_renamed::<Config>(RENAMED).unwrap();
        assert!(!RENAMED.is_empty());
    }
    use mailsuite_runtime::config::{ConfigSources, load};
    use std::time::Duration;

    #[test]
    fn defaults_and_overrides() {
        let c: Config = load(&ConfigSources::default()).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.listen_pop3, "0.0.0.0:110");
        assert_eq!(c.listen_pop3s, "0.0.0.0:995");
        assert_eq!(c.listen_ops, "0.0.0.0:9110");
        assert!(
            c.limits.idle_timeout_secs >= 600,
            "RFC 1939: at least 10 minutes"
        );

        let c: Config = load(&ConfigSources {
            overrides: vec![
                "listen_pop3=".into(),
                "limits.max_line=300".into(),
                "auth.allow_plaintext_loopback=true".into(),
                "limits.connections.max_per_ip=3".into(),
            ],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(c.listen_pop3, "");
        assert_eq!(c.limits.max_line, 300);
        assert!(c.auth.allow_plaintext_loopback);
        assert_eq!(c.limits.connections.max_per_ip, 3);

        let err = load::<Config>(&ConfigSources {
            overrides: vec!["limits.max_lines=3".into()],
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("max_lines"), "{err}");
    }

    #[test]
    fn auth_delay_grows_and_is_capped() {
        let l = Limits {
            auth_failure_delay_ms: 100,
            auth_failure_delay_max_ms: 1000,
            ..Limits::default()
        };
        let d: Vec<Duration> = (1..=6).map(|n| l.auth_failure_delay(n)).collect();
        assert_eq!(
            d,
            [100, 200, 400, 800, 1000, 1000].map(Duration::from_millis)
        );
        assert_eq!(l.auth_failure_delay(u32::MAX), Duration::from_millis(1000));
    }

    /// Every spelling an operator may use: one variable per key with comma lists (docker
    /// compose), TOML arrays; unknown keys refused.
    #[test]
    fn proxy_protocol_from_the_environment() {
        mailsuite_testkit::proxy::assert_proxy_protocol_spellings::<Config>(
            &crate::LISTENERS,
            |c| &c.proxy_protocol,
        );
    }
}
