//! pop3-gateway: POP3 (RFC 1939) with CAPA (RFC 2449), STLS (RFC 2595), AUTH PLAIN (RFC 5034)
//! and implicit TLS on 995, in front of mailbox-store. Stateless: the maildrop lock lives in
//! PostgreSQL (through the store), so any number of replicas may run.

pub mod codec;
pub mod config;
pub mod session;
