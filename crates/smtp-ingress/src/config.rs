//! smtp-ingress configuration. Every limit is here with its default; an empty listen address
//! disables that listener.

use mailsuite_runtime::listener::ConnLimits;
pub use mailsuite_runtime::net::{BadClientNet, ClientNet};
use mailsuite_runtime::proxy_protocol::ProxyProtocolConfig;
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
    /// PROXY protocol (v1/v2) from trusted load balancers, per listener (README
    /// "Configuration"); off by default.
    pub proxy_protocol: ProxyProtocolConfig,
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
            proxy_protocol: ProxyProtocolConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Longest command line, counting its CRLF (RFC 5321 §4.5.3.1.4: 512). A longer line is
    /// skipped up to its end, never kept, and answered `500 5.5.2 Line too long`.
    pub max_line_length: usize,
    /// Longest MAIL or RCPT line, counting its CRLF: the 512 of a command line plus the 2000
    /// octets RFC 1869 lets extension parameters add (DSN's ORCPT alone may be 500 octets of
    /// xtext, ENVID 100, RFC 3461 §4).
    pub max_mail_rcpt_line_length: usize,
    /// Longest AUTH line (with its initial response) and answer to a 334 challenge, counting
    /// its CRLF: RFC 4954 §4 asks for 12288; longer is `500 5.5.6`.
    pub max_auth_line_length: usize,
    /// Largest message (SIZE, enforced during DATA/BDAT too).
    pub max_message_bytes: u64,
    /// Recipients per message (RFC 5321 §4.5.3.1.8: at least 100).
    pub max_recipients: usize,
    /// Messages per connection; then `421`.
    pub max_messages_per_session: u32,
    /// Protocol errors (5xx replies to bad or out-of-order commands) per connection; then `421`.
    pub max_errors: u32,
    /// Connections open at once per listener, overall and per client (IPv4 address, IPv6 /64):
    /// `connections.max_connections` (10,000), `connections.max_per_ip` (50).
    pub connections: ConnLimits,
    /// Messages accepted from one IP per minute (0 = unlimited); then `450 4.7.1`.
    pub max_messages_per_ip_per_minute: u32,
    /// AUTH failures from one client within `auth_failure_window_secs` before `421`; each
    /// failure waits longer.
    pub max_auth_failures_per_ip: u32,
    /// The window over which `max_auth_failures_per_ip` counts (default 60).
    pub auth_failure_window_secs: u64,
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
    pub store_timeout_secs: u64,
    /// How often the store's gRPC health is checked for `/readyz` (each check bounded by
    /// `store_timeout_secs`).
    pub store_health_interval_secs: u64,
    /// Writing one batch of replies; a client that stops reading is disconnected after this.
    pub write_timeout_secs: u64,
    /// Clients (IPv4 addresses, IPv6 /64s) whose per-minute rates are tracked at once, per
    /// rate (messages, AUTH failures, ETRN); when full, the least recently active tenth goes.
    pub max_tracked_clients: usize,
    /// ETRN commands one client (IPv4 address, IPv6 /64) may give per minute (0 = unlimited);
    /// then `458 4.7.0`. Each one makes the queue retry a whole domain at once.
    pub max_etrn_per_ip_per_minute: u32,
    /// Message body bytes all sessions of this process may hold in memory at once (DATA and
    /// BDAT, from the first octet to the hand-off). A transaction that would go past it is
    /// answered `452 4.3.1` (RFC 3463: insufficient system storage; the client retries) and
    /// gives its bytes back; the others go on. The default, 512 MiB, holds ten messages of
    /// the largest size at once, or thousands of ordinary ones; the process needs somewhat
    /// more than this (the hand-off copies one chunk at a time). Keep it at least
    /// `max_message_bytes`, or a message of that size can never be accepted.
    pub max_body_bytes_in_flight: u64,
    /// The part of `max_body_bytes_in_flight` one client (IPv4 address, IPv6 /64) may hold
    /// with all its connections together; past it that client's transaction gets `452 4.3.1`
    /// while other clients still have the rest. Without it one client trickling a few large
    /// bodies holds the whole budget and starves everybody, submission included. The
    /// default, 64 MiB, is an eighth of the default budget; keep it at least
    /// `max_message_bytes`.
    pub max_body_bytes_in_flight_per_ip: u64,
    /// Addresses in the header `From:` and `Sender:` of one authenticated submission, each
    /// checked against the account like MAIL FROM; a message with more is refused with
    /// `550 5.7.1`.
    pub max_header_sender_addresses: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_line_length: 512,
            max_mail_rcpt_line_length: 2512,
            max_auth_line_length: 12288,
            max_message_bytes: 50 * 1024 * 1024,
            max_recipients: 100,
            max_messages_per_session: 100,
            max_errors: 10,
            connections: ConnLimits {
                max_connections: 10_000,
                max_per_ip: 50,
            },
            max_messages_per_ip_per_minute: 600,
            max_auth_failures_per_ip: 10,
            auth_failure_window_secs: 60,
            auth_failure_delay_ms: 500,
            command_timeout_secs: 300,
            data_timeout_secs: 180,
            data_total_timeout_secs: 600,
            session_timeout_secs: 3600,
            store_timeout_secs: 60,
            store_health_interval_secs: 5,
            write_timeout_secs: 60,
            max_tracked_clients: crate::limits::DEFAULT_CAPACITY,
            max_etrn_per_ip_per_minute: 10,
            max_body_bytes_in_flight: 512 * 1024 * 1024,
            max_body_bytes_in_flight_per_ip: 64 * 1024 * 1024,
            max_header_sender_addresses: 20,
        }
    }
}

impl Limits {
    pub fn conn_limits(&self) -> ConnLimits {
        self.connections
    }
}

/// Keys renamed so that every service spells a setting the same way; the old names are read,
/// with a warning, until the next release (README "Configuration").
pub const RENAMED: &mailsuite_runtime::config::Renamed = &[
    ("limits.max_message_size", "limits.max_message_bytes"),
    (
        "limits.max_connections",
        "limits.connections.max_connections",
    ),
    (
        "limits.max_connections_per_ip",
        "limits.connections.max_per_ip",
    ),
    (
        "limits.max_auth_failures_per_ip_per_minute",
        "limits.max_auth_failures_per_ip",
    ),
    ("limits.rpc_timeout_secs", "limits.store_timeout_secs"),
];

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
    /// ETRN (RFC 1985), for authenticated sessions and `etrn_allowed_clients` only.
    pub etrn: bool,
    /// Clients (addresses or networks: `192.0.2.7`, `192.0.2.0/24`, `2001:db8::/48`) that may
    /// use ETRN without authenticating, e.g. the MX hosts this server is a backup for.
    /// Anyone else gets `459 4.7.1`.
    pub etrn_allowed_clients: Vec<ClientNet>,
    /// Where `RCPT TO:<postmaster>` (no domain, RFC 5321 §4.5.1) goes. Empty: the first of
    /// `postmaster@<hostname>`, `postmaster@<hostname's parent domain>` ... (down to two
    /// labels) that is a local address.
    pub postmaster: String,
    /// Refuse an unauthenticated MAIL FROM in one of our own domains on the MX port.
    pub reject_unauthenticated_local_sender: bool,
    /// How long the answer to "is this sender domain one of ours?" is remembered (that
    /// check would otherwise cost a store call per incoming message); a domain added or
    /// removed is seen by this check at most this many seconds later. 0: ask every time.
    pub local_domain_cache_secs: u64,
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
            etrn_allowed_clients: Vec::new(),
            postmaster: String::new(),
            reject_unauthenticated_local_sender: true,
            local_domain_cache_secs: 30,
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

    #[test]
    fn renamed_keys_lead_from_old_names_to_real_keys() {
        mailsuite_runtime::config::check_renamed::<Config>(RENAMED).unwrap();
        assert!(!RENAMED.is_empty());
    }
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

        assert_eq!(c.limits.max_line_length, 512);
        assert_eq!(c.limits.max_mail_rcpt_line_length, 2512);
        assert_eq!(c.limits.max_auth_line_length, 12288);
        assert_eq!(c.limits.max_etrn_per_ip_per_minute, 10);
        assert_eq!(c.limits.max_body_bytes_in_flight, 512 << 20);
        assert_eq!(c.limits.max_body_bytes_in_flight_per_ip, 64 << 20);

        let toml = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            toml.path(),
            "[policy]\netrn_allowed_clients = [\"192.0.2.0/24\", \"2001:db8::1\"]\n",
        )
        .unwrap();
        let src = ConfigSources {
            file: Some(toml.path().to_path_buf()),
            ..Default::default()
        };
        let c: Config = load(&src).unwrap();
        let nets = &c.policy.etrn_allowed_clients;
        assert!(nets[0].contains("192.0.2.77".parse().unwrap()));
        assert!(nets[0].contains("::ffff:192.0.2.77".parse().unwrap()));
        assert!(!nets[0].contains("192.0.3.1".parse().unwrap()));
        assert!(nets[1].contains("2001:db8::1".parse().unwrap()));
        assert!(!nets[1].contains("2001:db8::2".parse().unwrap()));
        assert!("192.0.2.0/33".parse::<ClientNet>().is_err());
        assert!("mx.example".parse::<ClientNet>().is_err());

        for bad in ["limits.nope=1", "policy.iprev=maybe", "policy.iprev_nope=1"] {
            let bad = ConfigSources {
                overrides: vec![bad.into()],
                ..Default::default()
            };
            assert!(load::<Config>(&bad).is_err(), "{bad:?}");
        }
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
