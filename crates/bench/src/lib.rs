//! mailbench: a load generator for any SMTP, IMAP or POP3 server. It speaks the protocols
//! itself over real sockets (optionally TLS) and depends on no mailsuite internals, so the same
//! run can be pointed at mailsuite, Postfix + Dovecot, or anything else.

pub mod cmd;
pub mod corpus;
pub mod imap;
pub mod net;
pub mod pop3;
pub mod procfs;
pub mod report;
pub mod smtp;
