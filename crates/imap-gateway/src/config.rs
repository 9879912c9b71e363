//! Configuration of the IMAP gateway. Every limit has a documented default.

use mailsuite_runtime::listener::ConnLimits;
use mailsuite_runtime::proxy_protocol::ProxyProtocolConfig;
use mailsuite_runtime::tls::TlsConfig;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// IMAP with STARTTLS; empty disables it.
    pub listen_imap: String,
    /// IMAP over implicit TLS; empty disables it.
    pub listen_imaps: String,
    /// HTTP `/healthz`, `/readyz`, `/metrics`; empty disables it.
    pub listen_ops: String,
    /// The mailbox-store gRPC endpoint.
    pub store_url: String,
    /// The services' shared gRPC secret, sent on every store call (empty = none).
    pub internal_token: mailsuite_runtime::grpc::InternalToken,
    /// Announced in the greeting.
    pub hostname: String,
    pub tls: TlsConfig,
    pub limits: Limits,
    pub auth: AuthConfig,
    /// PROXY protocol (v1/v2) from trusted load balancers, per listener (README
    /// "Configuration"); off by default.
    pub proxy_protocol: ProxyProtocolConfig,
}

/// Keys renamed so that every service spells a setting the same way; the old names are read,
/// with a warning, until the next release (README "Configuration").
pub const RENAMED: &mailsuite_runtime::config::Renamed = &[
    ("limits.max_append", "limits.max_message_bytes"),
    ("limits.auth_failure_table", "limits.max_tracked_clients"),
];

impl Default for Config {
    fn default() -> Self {
        Config {
            listen_imap: "0.0.0.0:143".into(),
            listen_imaps: "0.0.0.0:993".into(),
            listen_ops: "0.0.0.0:9143".into(),
            store_url: "http://127.0.0.1:50051".into(),
            internal_token: Default::default(),
            hostname: "localhost".into(),
            tls: TlsConfig::default(),
            limits: Limits::default(),
            auth: AuthConfig::default(),
            proxy_protocol: ProxyProtocolConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Allow LOGIN / AUTHENTICATE without TLS from loopback addresses (tests, local tools).
    pub allow_plaintext_loopback: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Connections per listener and per client IP.
    pub connections: ConnLimits,
    /// Longest command line (without literals), bytes. Default 64 KiB; longer lines end the
    /// connection with `* BYE [TOOBIG]` because their end cannot be found safely.
    pub max_line: u32,
    /// Largest command other than APPEND, literals included, bytes. Default 1 MiB.
    pub max_command: u32,
    /// Largest message APPEND accepts, bytes. Default 64 MiB.
    pub max_message_bytes: u32,
    /// Largest APPEND command, all its messages (MULTIAPPEND, RFC 3502) and command bytes
    /// together; each message is also held to `max_message_bytes`, and a smaller value than
    /// `max_message_bytes` counts as `max_message_bytes`. Default 64 MiB: what one connection may make the
    /// gateway buffer stays what it was before MULTIAPPEND.
    pub max_multiappend: u32,
    /// Largest command with literals accepted before login, literals included, bytes.
    /// Default 8 KiB: enough for LOGIN, and what an unauthenticated client can make the
    /// gateway buffer. Before login APPEND is refused without a continuation request, and a
    /// larger non-synchronizing literal ends the connection (its bytes are not read).
    pub max_preauth_literal: u32,
    /// Elements (numbers and ranges, e.g. `1:5,7`) one sequence set may have; more is
    /// `BAD`. Default 10000.
    pub max_sequence_set: u32,
    /// Longest LIST pattern, reference name included, bytes; LIST-EXTENDED counts its
    /// patterns together. Longer is `BAD [TOOBIG]`. Matching costs names × pattern length,
    /// so this bounds the work of one LIST. Default 1024.
    pub max_list_pattern: u32,
    /// Seconds a client may stay silent before the connection is closed (also during IDLE).
    /// RFC 9051 requires at least 30 minutes once authenticated.
    pub idle_timeout_secs: u64,
    /// Seconds a write to the client may make no progress before the connection is closed
    /// (a client that stops reading). Default 300.
    pub write_timeout_secs: u64,
    /// Seconds from connecting within which a client must log in, however busy it keeps the
    /// connection (slowloris). Default 60.
    pub login_timeout_secs: u64,
    /// Seconds a command line (literal data excluded) may take to arrive once its first byte
    /// has; literal data only has to keep flowing (idle timeout). Default 60.
    pub line_timeout_secs: u64,
    /// Failed logins allowed per connection before it is closed.
    pub max_auth_failures: u32,
    /// Failed logins from one client address (IPv6: its /64), over all connections, after
    /// which logins from it are refused until the window has passed; 0 = unlimited. Default 30.
    pub max_auth_failures_per_ip: u32,
    /// Seconds over which failed logins per address are counted. Default 900.
    pub auth_failure_window_secs: u64,
    /// Failed logins for one user name, from any address, after which logins to it are
    /// refused until the window has passed; 0 = unlimited. Default 50. This slows a guesser
    /// spread over many addresses, at the price that such a guesser can lock the account
    /// out for the window.
    pub max_auth_failures_per_account: u32,
    /// Seconds over which failed logins per user name are counted. Default 900.
    pub account_auth_failure_window_secs: u64,
    /// Addresses (and, separately, user names) tracked at once; when full, the least recently
    /// active tenth is evicted, expired entries first. Default 16384.
    pub max_tracked_clients: usize,
    /// First delay after a failed login, milliseconds; doubles with each further failure.
    pub auth_failure_delay_ms: u64,
    /// Commands per second a connection may sustain (token bucket with a burst of 10x);
    /// 0 = unlimited.
    pub commands_per_second: u32,
    /// Sessions one account may have open on this gateway at once; 0 = unlimited.
    pub max_sessions_per_account: usize,
    /// Messages per FETCH round trip to the store (bounds memory per command).
    pub fetch_batch: u32,
    /// Body bytes of a FETCH read ahead from the store before they are written to the
    /// client. The store's stream is always read to this bound (or its end) without waiting
    /// for the client, so a slow reader never holds the shared gRPC connection's flow-control
    /// window; the rest of the messages is asked for again afterwards. A message larger than
    /// this is still read whole. Default 1 MiB.
    pub fetch_buffer_bytes: u64,
    /// Seconds to wait for the store to answer a call.
    pub store_timeout_secs: u64,
    /// How often the store's gRPC health is checked for `/readyz` (each check bounded by
    /// `store_timeout_secs`).
    pub store_health_interval_secs: u64,
    /// Mailboxes whose last `Changes` answer the gateway keeps for the sessions that wake up
    /// after it arrived (one store call per mailbox change, not one per session); an answer
    /// is dropped at the mailbox's next change anyway. 0 keeps none (polls in flight are
    /// still shared). Default 10000.
    pub changes_cache_mailboxes: usize,
    /// Changed messages plus expunged UIDs kept over all those answers; a larger answer is
    /// shared by the sessions already waiting for it but not kept. Default 100000.
    pub changes_cache_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connections: ConnLimits::default(),
            max_line: 64 * 1024,
            max_command: 1024 * 1024,
            max_message_bytes: 64 * 1024 * 1024,
            max_multiappend: 64 * 1024 * 1024,
            max_preauth_literal: 8 * 1024,
            max_sequence_set: 10_000,
            max_list_pattern: 1024,
            idle_timeout_secs: 30 * 60,
            write_timeout_secs: 300,
            login_timeout_secs: 60,
            line_timeout_secs: 60,
            max_auth_failures: 5,
            max_auth_failures_per_ip: 30,
            auth_failure_window_secs: 900,
            max_auth_failures_per_account: 50,
            account_auth_failure_window_secs: 900,
            max_tracked_clients: 16384,
            auth_failure_delay_ms: 500,
            commands_per_second: 200,
            max_sessions_per_account: 100,
            fetch_batch: 256,
            fetch_buffer_bytes: 1024 * 1024,
            store_timeout_secs: 60,
            store_health_interval_secs: 5,
            changes_cache_mailboxes: 10_000,
            changes_cache_entries: 100_000,
        }
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
