//! smtp-ingress configuration. Every limit is here with its default; an empty listen address
//! disables that listener.

use mailsuite_runtime::listener::ConnLimits;
use mailsuite_runtime::tls::TlsConfig;
use serde::{Deserialize, Serialize};

use crate::codec::BareLineEnd;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// MX: inbound mail for hosted domains (STARTTLS offered).
    pub listen_smtp: String,
    /// Submission with STARTTLS (RFC 6409).
    pub listen_submission: String,
    /// Submission over implicit TLS (RFC 8314).
    pub listen_submissions: String,
    /// HTTP /healthz /readyz /metrics.
    pub listen_ops: String,
    /// Our name in the greeting, EHLO, Received and Authentication-Results.
    pub hostname: String,
    pub store_url: String,
    pub queue_url: String,
    /// The services' shared gRPC secret, sent on every call to the store and the queue.
    pub internal_token: mailsuite_runtime::grpc::InternalToken,
    pub tls: TlsConfig,
    pub limits: Limits,
    pub auth: AuthConfig,
    pub policy: Policy,
    pub dns: DnsConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen_smtp: "0.0.0.0:25".into(),
            listen_submission: "0.0.0.0:587".into(),
            listen_submissions: "0.0.0.0:465".into(),
            listen_ops: "0.0.0.0:9025".into(),
            hostname: "localhost".into(),
            store_url: "http://127.0.0.1:50051".into(),
            queue_url: "http://127.0.0.1:50052".into(),
            internal_token: Default::default(),
            tls: TlsConfig::default(),
            limits: Limits::default(),
            auth: AuthConfig::default(),
            policy: Policy::default(),
            dns: DnsConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Longest command line accepted, without CRLF (RFC 5321 §4.5.3.1.4 asks for at least 510).
    pub max_line_length: usize,
    /// Largest message (SIZE, enforced during DATA/BDAT too).
    pub max_message_size: u64,
    /// Recipients per message (RFC 5321 §4.5.3.1.8: at least 100).
    pub max_recipients: usize,
    /// Messages per connection; then `421`.
    pub max_messages_per_session: u32,
    /// Protocol errors (5xx replies to bad or out-of-order commands) per connection; then `421`.
    pub max_errors: u32,
    /// Connections open at once, overall and per IP (per listener).
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// Messages accepted from one IP per minute (0 = unlimited); then `450 4.7.1`.
    pub max_messages_per_ip_per_minute: u32,
    /// AUTH failures from one IP per minute before `421`; each failure waits longer.
    pub max_auth_failures_per_ip_per_minute: u32,
    /// Delay added per recent AUTH failure of that IP, in milliseconds (capped at 5 s).
    pub auth_failure_delay_ms: u64,
    /// Waiting for a command (RFC 5321 §4.5.3.2: 5 minutes).
    pub command_timeout_secs: u64,
    /// Waiting for the next block of DATA (RFC 5321 §4.5.3.2.5: 3 minutes).
    pub data_timeout_secs: u64,
    /// The whole DATA/BDAT transfer of one message, against clients that trickle bytes.
    pub data_total_timeout_secs: u64,
    /// Lifetime of one connection, so no client can hold a task forever.
    pub session_timeout_secs: u64,
    /// One call to the store or the queue; past it the client gets a temporary failure.
    pub rpc_timeout_secs: u64,
    /// Writing one batch of replies; a client that stops reading is disconnected after this.
    pub write_timeout_secs: u64,
    /// Clients (IPv4 addresses, IPv6 /64s) whose per-minute rates are tracked at once.
    pub max_tracked_clients: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_line_length: 2048,
            max_message_size: 50 * 1024 * 1024,
            max_recipients: 100,
            max_messages_per_session: 100,
            max_errors: 10,
            max_connections: 10_000,
            max_connections_per_ip: 50,
            max_messages_per_ip_per_minute: 600,
            max_auth_failures_per_ip_per_minute: 10,
            auth_failure_delay_ms: 500,
            command_timeout_secs: 300,
            data_timeout_secs: 180,
            data_total_timeout_secs: 600,
            session_timeout_secs: 3600,
            rpc_timeout_secs: 60,
            write_timeout_secs: 60,
            max_tracked_clients: crate::limits::DEFAULT_CAPACITY,
        }
    }
}

impl Limits {
    pub fn conn_limits(&self) -> ConnLimits {
        ConnLimits {
            max_connections: self.max_connections,
            max_per_ip: self.max_connections_per_ip,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Allow AUTH without TLS from loopback addresses (tests only).
    pub allow_plaintext_loopback: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    /// Bare CR/LF inside DATA: `reject` (550 5.6.0) or `normalize`.
    pub bare_line_end: BareLineEnd,
    /// Refuse a DMARC `p=reject` failure with `550 5.7.1` (else only record it).
    pub dmarc_reject: bool,
    /// Verify SPF, DKIM and DMARC on the MX port.
    pub verify_inbound: bool,
    /// VRFY answers truthfully for authenticated submission sessions (else always `252`).
    pub vrfy: bool,
    /// EXPN lists members for authenticated sessions (else `502`).
    pub expn: bool,
    /// SEND/SOML/SAML for authenticated submission sessions (else `502`).
    pub terminal_commands: bool,
    /// ETRN (RFC 1985).
    pub etrn: bool,
    /// Refuse an unauthenticated MAIL FROM in one of our own domains on the MX port.
    pub reject_unauthenticated_local_sender: bool,
    /// What a failed iprev check (forward-confirmed reverse DNS, RFC 8601 §3) of an MX
    /// client does at MAIL: `record` (default: only the Authentication-Results header),
    /// `tempfail` (`450 4.7.25`, RFC 7372) or `reject` (`550 5.7.25`; a DNS temperror still
    /// gets `450 4.7.25`). Needs `verify_inbound`; submission sessions are never checked.
    pub iprev: IprevPolicy,
}

/// See `Policy::iprev`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IprevPolicy {
    #[default]
    Record,
    Tempfail,
    Reject,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            bare_line_end: BareLineEnd::Reject,
            dmarc_reject: true,
            verify_inbound: true,
            vrfy: true,
            expn: true,
            terminal_commands: true,
            etrn: true,
            reject_unauthenticated_local_sender: true,
            iprev: IprevPolicy::Record,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DnsConfig {
    /// Name servers as `ip` (port 53) or `ip:port` (`[v6]:port`), then the only source of
    /// answers (no /etc/hosts); empty = the system configuration (/etc/resolv.conf).
    pub nameservers: Vec<String>,
    /// Per-query timeout.
    pub timeout_secs: u64,
}

impl Default for DnsConfig {
    fn default() -> Self {
        DnsConfig {
            nameservers: Vec::new(),
            timeout_secs: 5,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mailsuite_runtime::config::{ConfigSources, load};

    #[test]
    fn defaults_overrides_and_unknown_keys() {
        let c: Config = load(&ConfigSources::default()).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.listen_smtp, "0.0.0.0:25");
        assert_eq!(c.listen_submission, "0.0.0.0:587");
        assert_eq!(c.listen_submissions, "0.0.0.0:465");
        assert_eq!(c.listen_ops, "0.0.0.0:9025");
        assert!(!c.auth.allow_plaintext_loopback);
        assert_eq!(c.limits.command_timeout_secs, 300);
        assert_eq!(c.policy.iprev, IprevPolicy::Record);

        let src = ConfigSources {
            overrides: vec![
                "listen_submissions=".into(),
                "limits.max_recipients=7".into(),
                "policy.bare_line_end=normalize".into(),
                "policy.iprev=reject".into(),
            ],
            env: [("MAILSUITE_HOSTNAME".to_string(), "mx.example".to_string())].into(),
            ..Default::default()
        };
        let c: Config = load(&src).unwrap();
        assert_eq!(c.listen_submissions, "");
        assert_eq!(c.limits.max_recipients, 7);
        assert_eq!(c.policy.bare_line_end, BareLineEnd::Normalize);
        assert_eq!(c.policy.iprev, IprevPolicy::Reject);
        assert_eq!(c.hostname, "mx.example");

        for bad in ["limits.nope=1", "policy.iprev=maybe", "policy.iprev_nope=1"] {
            let bad = ConfigSources {
                overrides: vec![bad.into()],
                ..Default::default()
            };
            assert!(load::<Config>(&bad).is_err(), "{bad:?}");
        }
    }
}
