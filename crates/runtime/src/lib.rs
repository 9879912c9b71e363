//! What every mailsuite service shares: configuration, telemetry, TLS, listeners with
//! connection limits, per-client rate windows, graceful shutdown, gRPC plumbing (health,
//! trace propagation, error mapping) and the database (pool + migrations).

pub mod config;
pub mod db;
pub mod error;
pub mod grpc;
pub mod limiter;
pub mod listener;
pub mod metrics;
pub mod net;
pub mod ops;
pub mod pg;
pub mod proxy_protocol;
pub mod service;
pub mod shutdown;
pub mod stream;
pub mod telemetry;
pub mod tls;

pub use error::ServiceError;
pub use shutdown::Shutdown;
