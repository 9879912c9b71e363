//! mailbox-store configuration (see docs/CONVENTIONS.md for how it is loaded).

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// gRPC listener (Directory, Delivery, Mailbox, Admin, health). Empty disables it.
    pub listen_grpc: String,
    /// Ops HTTP listener (/healthz, /readyz, /metrics). Empty disables it.
    pub listen_ops: String,
    pub database_url: String,
    pub db_max_connections: u32,
    /// A second pool for the delivery path (group commit and recipient resolution), whose
    /// connections plan each statement once; holds `limits.delivery_committers` of them
    /// while deliveries are committing.
    pub db_delivery_connections: u32,
    /// PostgreSQL `statement_timeout` of every pool connection, in milliseconds (0 = none):
    /// no single query (a SEARCH over a large mailbox, say) may hold a pool connection longer.
    pub db_statement_timeout_ms: u64,
    /// Apply the embedded migrations at start-up (under sqlx's advisory lock).
    pub migrate_on_start: bool,
    /// The services' shared gRPC secret, required of every caller but gRPC health.
    /// Empty = no check (a single trusted host only).
    pub internal_token: mailsuite_runtime::grpc::InternalToken,
    /// Serve gRPC without an internal token on a non-loopback address. Off: such a
    /// configuration refuses to start (every caller would be trusted).
    pub allow_unauthenticated_grpc: bool,
    pub limits: Limits,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest message Deliver/Append accept, in bytes.
    pub max_message_bytes: u64,
    /// Most message bytes of one AppendMulti call (MULTIAPPEND), all messages together;
    /// each message is also held to `max_message_bytes`.
    pub max_append_multi_bytes: u64,
    /// Most messages of one AppendMulti call.
    pub max_append_multi_messages: usize,
    /// Most recipients of one Deliver call.
    pub max_recipients: usize,
    /// Alias/list expansion depth (loops are cut regardless).
    pub max_alias_depth: usize,
    /// Most targets one address may expand to.
    pub max_expansion: usize,
    /// Largest gRPC request frame (chunks are ≤ 64 KiB, so this only bounds abuse).
    pub max_grpc_frame_bytes: usize,
    /// How long a Watch presence lease lives without being refreshed, in seconds.
    pub presence_lease_secs: u64,
    /// Most UID ranges one call may carry (a UID set is client-controlled).
    pub max_uid_ranges: usize,
    /// Change log entries older than this many days are pruned (QRESYNC then resyncs fully).
    pub changelog_days: u32,
    /// Most argon2 verifications/hashes running at once (each holds ~19 MiB and a blocking
    /// thread, so an AUTH flood must not fan out unbounded). Default: 2 × cores, at least 2.
    pub max_concurrent_password_checks: usize,
    /// How long a password check waits for a free slot before answering UNAVAILABLE, in ms.
    pub password_check_wait_ms: u64,
    /// Most maildrop (POP3) locks this replica holds at once; all of them share one
    /// PostgreSQL connection. Beyond it a lock request gets UNAVAILABLE. Each one is an
    /// entry in PostgreSQL's shared lock table, which has room for
    /// `max_locks_per_transaction × (max_connections + max_prepared_transactions)` entries
    /// across all backends and replicas (64 × 100 = 6,400 with PostgreSQL's defaults); keep
    /// the sum over replicas well below it (start-up warns above half), or raise
    /// `max_locks_per_transaction`. When the table is full, lock requests fail UNAVAILABLE
    /// and the locks already held are kept.
    pub max_maildrop_locks: usize,
    /// Most keys (every node of the tree, ANDs/ORs/NOTs included) in one SEARCH.
    pub max_search_keys: usize,
    /// Most text keys (BODY, TEXT, HEADER with a value) in one SEARCH: each one is a
    /// substring scan of every candidate message's text.
    pub max_search_text_keys: usize,
    /// Tasks committing Deliver calls in groups (each holds one pool connection while it
    /// stores a group). Concurrent deliveries queue while a group commits and go together
    /// in the next one.
    pub delivery_committers: usize,
    /// Most Deliver calls stored in one transaction.
    pub delivery_batch_max: usize,
    /// Most message bytes in one delivery transaction (a larger single message goes alone).
    pub delivery_batch_max_bytes: u64,
}

fn default_password_checks() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    (2 * cores).max(2)
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 64 * 1024 * 1024,
            max_append_multi_bytes: 128 * 1024 * 1024,
            max_append_multi_messages: 1000,
            max_recipients: 1000,
            max_alias_depth: 8,
            max_expansion: 1000,
            max_grpc_frame_bytes: 4 * 1024 * 1024,
            presence_lease_secs: 60,
            max_uid_ranges: 10_000,
            changelog_days: 90,
            max_concurrent_password_checks: default_password_checks(),
            password_check_wait_ms: 2000,
            max_maildrop_locks: 2_000,
            max_search_keys: 1000,
            max_search_text_keys: 32,
            delivery_committers: 3,
            delivery_batch_max: 64,
            delivery_batch_max_bytes: 32 * 1024 * 1024,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen_grpc: "0.0.0.0:50051".into(),
            listen_ops: "0.0.0.0:9051".into(),
            database_url: "postgres://postgres@127.0.0.1:5432/mailsuite".into(),
            db_max_connections: 32,
            db_delivery_connections: 8,
            db_statement_timeout_ms: 30_000,
            migrate_on_start: true,
            internal_token: Default::default(),
            allow_unauthenticated_grpc: false,
            limits: Limits::default(),
        }
    }
}
