//! Wiring every service together in one process over loopback gRPC.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, Result};
use mailsuite_runtime::grpc::{GrpcChannel, InternalToken};
use mailsuite_runtime::{Shutdown, pg};
use serde::{Deserialize, Serialize};
use sqlx::{Connection, Executor};

/// `mailsuite up` configuration: one section per service, each the service's own config.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpConfig {
    /// PostgreSQL URL; empty = localhost:5432, else a private cluster (see README).
    pub database_url: String,
    /// How long sessions may take to finish after Ctrl-C before they are closed.
    pub grace_seconds: u64,
    /// The services' shared gRPC secret, given to every section (their own
    /// `internal_token` is overridden). Empty: the `mailsuite` binary reads or creates
    /// `<data-dir>/internal-token`; a library caller that leaves it empty runs without one.
    pub internal_token: InternalToken,
    pub store: mailsuite_mailbox_store::Config,
    pub queue: mailsuite_relay_queue::Config,
    pub smtp: mailsuite_smtp_ingress::Config,
    pub pop3: mailsuite_pop3_gateway::Config,
    pub imap: mailsuite_imap_gateway::Config,
}

impl Default for UpConfig {
    fn default() -> Self {
        let mut c = UpConfig {
            database_url: String::new(),
            grace_seconds: 10,
            internal_token: InternalToken::default(),
            store: Default::default(),
            queue: Default::default(),
            smtp: Default::default(),
            pop3: Default::default(),
            imap: Default::default(),
        };
        // Unprivileged loopback ports, so a normal user can run the demo.
        c.store.listen_grpc = "127.0.0.1:50051".into();
        c.store.listen_ops = String::new();
        c.queue.listen_grpc = "127.0.0.1:50052".into();
        c.queue.listen_ops = String::new();
        c.smtp.listen_smtp = "127.0.0.1:2525".into();
        c.smtp.listen_submission = "127.0.0.1:2587".into();
        c.smtp.listen_submissions = "127.0.0.1:2465".into();
        c.smtp.listen_ops = String::new();
        c.pop3.listen_pop3 = "127.0.0.1:2110".into();
        c.pop3.listen_pop3s = "127.0.0.1:2995".into();
        c.pop3.listen_ops = String::new();
        c.imap.listen_imap = "127.0.0.1:2143".into();
        c.imap.listen_imaps = "127.0.0.1:2993".into();
        c.imap.listen_ops = String::new();
        c
    }
}

impl UpConfig {
    /// Every listener on 127.0.0.1 port 0 and a fresh random internal token (tests).
    pub fn ephemeral() -> Self {
        let mut c = UpConfig {
            internal_token: InternalToken::random(),
            ..Default::default()
        };
        let any = "127.0.0.1:0".to_string();
        c.store.listen_grpc = any.clone();
        c.queue.listen_grpc = any.clone();
        c.smtp.listen_smtp = any.clone();
        c.smtp.listen_submission = any.clone();
        c.smtp.listen_submissions = any.clone();
        c.pop3.listen_pop3 = any.clone();
        c.pop3.listen_pop3s = any.clone();
        c.imap.listen_imap = any.clone();
        c.imap.listen_imaps = any;
        c
    }
}

/// The database to use, creating the `mailsuite` database (and, failing everything else, a
/// private cluster under `data_dir`) as needed. The cluster is returned so it can be stopped.
pub async fn database(
    cfg: &UpConfig,
    data_dir: &Path,
) -> Result<(String, Option<pg::PrivateCluster>)> {
    if !cfg.database_url.is_empty() {
        return Ok((cfg.database_url.clone(), None));
    }
    let (server, cluster) = if let Some(url) = pg::local_trusted_server() {
        (url, None)
    } else {
        eprintln!(
            "no PostgreSQL on 127.0.0.1:5432 that lets user postgres in without a password: \
             using a private cluster in {}",
            data_dir.join("postgres").display()
        );
        let c = pg::PrivateCluster::ensure(&data_dir.join("postgres"))?;
        (c.url(), Some(c))
    };
    let mut admin = sqlx::PgConnection::connect(&server)
        .await
        .with_context(|| {
            format!("connecting to {server} (set DATABASE_URL to use another server or user)")
        })?;
    let exists: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'mailsuite')")
            .fetch_one(&mut admin)
            .await?;
    if !exists {
        admin.execute("CREATE DATABASE mailsuite").await?;
    }
    let url = server.trim_end_matches("/postgres").to_string() + "/mailsuite";
    Ok((url, cluster))
}

/// The token file of `mailsuite up`: read it, or create it (owner-only) with a random token.
pub fn token_file(data_dir: &Path) -> Result<(InternalToken, std::path::PathBuf)> {
    let path = data_dir.join("internal-token");
    if let Ok(t) = std::fs::read_to_string(&path) {
        let t = t.trim();
        if !t.is_empty() {
            // A token others could read may already be known to them: refuse it, as ssh
            // refuses a private key with loose permissions, instead of using it silently.
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(&path)?.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    anyhow::bail!(
                        "{} is readable or writable by others (mode {mode:o}): \
                         `chmod 600` it, or delete it to have a new token made",
                        path.display()
                    );
                }
            }
            return Ok((InternalToken(t.to_string()), path));
        }
    }
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let token = InternalToken::random();
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts
        .open(&path)
        .with_context(|| format!("creating {}", path.display()))?;
    std::io::Write::write_all(&mut f, format!("{}\n", token.as_str()).as_bytes())?;
    Ok((token, path))
}

/// Addresses of everything that was started.
#[derive(Debug, Clone)]
pub struct Running {
    pub database_url: String,
    /// What every gRPC client of the store and the queue must send.
    pub internal_token: InternalToken,
    /// Where that token is kept for mailctl (set by the binary).
    pub token_file: Option<std::path::PathBuf>,
    pub store: mailsuite_mailbox_store::Started,
    pub queue: mailsuite_relay_queue::Started,
    pub smtp: mailsuite_smtp_ingress::Started,
    pub pop3: mailsuite_pop3_gateway::Started,
    pub imap: mailsuite_imap_gateway::Started,
}

fn show(a: &Option<SocketAddr>) -> String {
    a.map(|a| a.to_string()).unwrap_or_else(|| "off".into())
}

impl Running {
    pub fn store_url(&self) -> String {
        format!("http://{}", self.store.grpc)
    }

    /// A channel to the store that sends the internal token.
    pub fn store_channel(&self) -> GrpcChannel {
        mailsuite_runtime::grpc::connect_lazy_with_token(
            &self.store_url(),
            self.internal_token.as_str(),
        )
        .expect("the store URL is valid")
    }

    /// A channel to the queue that sends the internal token.
    pub fn queue_channel(&self) -> Option<GrpcChannel> {
        let addr = self.queue.grpc?;
        mailsuite_runtime::grpc::connect_lazy_with_token(
            &format!("http://{addr}"),
            self.internal_token.as_str(),
        )
        .ok()
    }

    pub fn table(&self) -> String {
        let mut t = String::new();
        let rows = [
            ("SMTP (MX, port 25 role)", show(&self.smtp.smtp)),
            ("submission (STARTTLS + AUTH)", show(&self.smtp.submission)),
            ("submissions (implicit TLS)", show(&self.smtp.submissions)),
            ("POP3 (STLS)", show(&self.pop3.pop3)),
            ("POP3S", show(&self.pop3.pop3s)),
            ("IMAP (STARTTLS)", show(&self.imap.imap)),
            ("IMAPS", show(&self.imap.imaps)),
            ("gRPC mailbox-store", self.store.grpc.to_string()),
            ("gRPC relay-queue", show(&self.queue.grpc)),
        ];
        let _ = writeln!(t, "\nmailsuite is up.\n");
        let _ = writeln!(t, "  {:<32} address", "listener");
        for (name, addr) in rows {
            let _ = writeln!(t, "  {name:<32} {addr}");
        }
        let _ = writeln!(t, "\n  database: {}", redact(&self.database_url));
        let store = self.store_url();
        let store = match &self.token_file {
            Some(f) => format!("{store} --token-file {}", f.display()),
            None => store,
        };
        if let Some(f) = &self.token_file {
            let _ = writeln!(t, "  internal gRPC token: {} (owner-only)", f.display());
        }
        let _ = writeln!(
            t,
            "\nAdd a domain and a user (in another terminal):\n\n  \
             cargo run -p mailctl -- --store {store} domain add example.test\n  \
             echo 'a good password' | cargo run -p mailctl -- --store {store} account add alice@example.test --password-stdin\n\n\
             Then point a mail client at the IMAP/SMTP ports above (TLS uses a self-signed \
             certificate unless tls.cert/tls.key are set). Ctrl-C stops everything."
        );
        t
    }
}

/// The URL with its secrets hidden: the password in the authority
/// (`postgres://user:***@host`) and any `password=` query parameter (libpq accepts one).
fn redact(url: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let mut out = match (base.find("://"), base.rfind('@')) {
        (Some(s), Some(at)) if at > s => match base[s + 3..at].split_once(':') {
            Some((user, _)) => format!("{}{}:***{}", &base[..s + 3], user, &base[at..]),
            None => base.to_string(),
        },
        _ => base.to_string(),
    };
    if let Some(q) = query {
        let params: Vec<String> = q
            .split('&')
            .map(|p| match p.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                _ => p.to_string(),
            })
            .collect();
        out.push('?');
        out.push_str(&params.join("&"));
    }
    out
}

/// Start every service; the gRPC clients point at the store and queue just bound.
pub async fn start(mut cfg: UpConfig, database_url: &str, shutdown: Shutdown) -> Result<Running> {
    let token = cfg.internal_token.clone();
    cfg.store.internal_token = token.clone();
    cfg.queue.internal_token = token.clone();
    cfg.smtp.internal_token = token.clone();
    cfg.pop3.internal_token = token.clone();
    cfg.imap.internal_token = token.clone();
    cfg.store.database_url = database_url.to_string();
    let store = mailsuite_mailbox_store::start(cfg.store, shutdown.clone())
        .await
        .context("starting mailbox-store")?;
    let store_url = format!("http://{}", store.grpc);

    cfg.queue.database_url = database_url.to_string();
    cfg.queue.store_url = store_url.clone();
    let queue = mailsuite_relay_queue::start(cfg.queue, shutdown.clone())
        .await
        .context("starting relay-queue")?;
    let queue_addr = queue
        .grpc
        .context("relay-queue needs its gRPC listener (queue.listen_grpc) in mailsuite up")?;
    let queue_url = format!("http://{queue_addr}");

    cfg.smtp.store_url = store_url.clone();
    cfg.smtp.queue_url = queue_url;
    let smtp = mailsuite_smtp_ingress::start(cfg.smtp, shutdown.clone())
        .await
        .context("starting smtp-ingress")?;

    cfg.pop3.store_url = store_url.clone();
    let pop3 = mailsuite_pop3_gateway::start(cfg.pop3, shutdown.clone())
        .await
        .context("starting pop3-gateway")?;

    cfg.imap.store_url = store_url;
    let imap = mailsuite_imap_gateway::start(cfg.imap, shutdown.clone())
        .await
        .context("starting imap-gateway")?;

    Ok(Running {
        database_url: database_url.to_string(),
        internal_token: token,
        token_file: None,
        store,
        queue,
        smtp,
        pop3,
        imap,
    })
}

/// The services' renamed keys under their `mailsuite up` tables (`smtp.`, `pop3.`, `imap.`).
pub fn renamed() -> &'static mailsuite_runtime::config::Renamed {
    static RENAMED: std::sync::LazyLock<Vec<(&'static str, &'static str)>> =
        std::sync::LazyLock::new(|| {
            let under = |table: &str, keys: &mailsuite_runtime::config::Renamed| {
                keys.iter()
                    .map(|(old, new)| {
                        let leak = |k: &str| -> &'static str {
                            Box::leak(format!("{table}.{k}").into_boxed_str())
                        };
                        (leak(old), leak(new))
                    })
                    .collect::<Vec<_>>()
            };
            [
                under("smtp", mailsuite_smtp_ingress::config::RENAMED),
                under("pop3", mailsuite_pop3_gateway::config::RENAMED),
                under("imap", mailsuite_imap_gateway::config::RENAMED),
            ]
            .concat()
        });
    &RENAMED
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_services_renamed_keys_hold_under_their_tables() {
        mailsuite_runtime::config::check_renamed::<UpConfig>(renamed()).unwrap();
        assert!(renamed().contains(&(
            "smtp.limits.max_message_size",
            "smtp.limits.max_message_bytes"
        )));
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            redact("postgres://u@h/db?sslmode=require&password=secret"),
            "postgres://u@h/db?sslmode=require&password=***"
        );
        assert_eq!(
            redact("postgres://u:p@ss@h/db?PASSWORD=x"),
            "postgres://u:***@h/db?PASSWORD=***"
        );
    }

    /// L9: a token file others can read is refused, not silently reused.
    #[cfg(unix)]
    #[test]
    fn l9_token_file_readable_by_others_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (made, path) = token_file(dir.path()).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (again, _) = token_file(dir.path()).unwrap();
        assert_eq!(made, again, "an owner-only file is reused");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = token_file(dir.path()).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
    }

    #[test]
    fn default_ports_are_unprivileged_loopback() {
        let c = UpConfig::default();
        for a in [
            &c.smtp.listen_smtp,
            &c.smtp.listen_submission,
            &c.smtp.listen_submissions,
            &c.pop3.listen_pop3,
            &c.pop3.listen_pop3s,
            &c.imap.listen_imap,
            &c.imap.listen_imaps,
        ] {
            let addr: SocketAddr = a.parse().unwrap();
            assert!(addr.ip().is_loopback() && addr.port() > 1024, "{a}");
        }
    }
}
