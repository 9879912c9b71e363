//! Finding a PostgreSQL server: `DATABASE_URL`, else localhost:5432, else a private cluster
//! started with `initdb`/`pg_ctl` (found on PATH or under /usr/lib/postgresql/*/bin). The
//! same logic serves `mailsuite up` (a cluster under ./var) and the test kit (a cluster in
//! the system temp dir, kept running and reused by later test binaries).

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error(
        "no PostgreSQL server is reachable and no PostgreSQL binaries (initdb, pg_ctl) were found.\n\
         Install PostgreSQL (Debian/Ubuntu: `apt-get install postgresql`; macOS: `brew install postgresql`)\n\
         or set DATABASE_URL to a server you have."
    )]
    NoBinaries,
    #[error("{step} failed: {message}")]
    Command { step: String, message: String },
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

/// Directory holding `initdb` and `pg_ctl`.
pub fn find_bindir() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if dir.join("initdb").is_file() && dir.join("pg_ctl").is_file() {
                return Some(dir);
            }
        }
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|p| p.join("initdb").is_file())
        .collect();
    versions.sort();
    versions.pop()
}

/// Is something accepting TCP connections at host:port?
pub fn port_open(host: &str, port: u16) -> bool {
    use std::net::ToSocketAddrs;
    let Ok(addrs) = (host, port).to_socket_addrs() else {
        return false;
    };
    addrs
        .into_iter()
        .any(|a| TcpStream::connect_timeout(&a, Duration::from_millis(500)).is_ok())
}

/// The superuser URL of a server on 127.0.0.1:5432 that lets `postgres` in without a
/// password (a developer's or CI's server with trust authentication), if there is one.
/// A packaged cluster that asks for a password over TCP (Debian's `postgresql` does) is
/// passed over with a note, so that callers fall back to a private cluster instead of
/// failing on authentication.
pub fn local_trusted_server() -> Option<String> {
    const URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
    if !port_open("127.0.0.1", 5432) {
        return None;
    }
    // Callers may be inside a runtime already (tests, `mailsuite up`): probe on a thread
    // of our own with a runtime of its own.
    let probe = std::thread::spawn(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async {
            use sqlx::Connection;
            match tokio::time::timeout(Duration::from_secs(5), sqlx::PgConnection::connect(URL))
                .await
            {
                Ok(Ok(c)) => {
                    let _ = c.close().await;
                    Ok(())
                }
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("no answer within 5 s".to_string()),
            }
        })
    });
    match probe.join() {
        Ok(Ok(())) => Some(URL.to_string()),
        Ok(Err(e)) => {
            eprintln!(
                "PostgreSQL on 127.0.0.1:5432 does not let user postgres in without a password \
                 ({e}): using a private cluster instead (set DATABASE_URL to use that server)"
            );
            None
        }
        Err(_) => None,
    }
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // /proc/self is owned by the process's effective user.
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// initdb refuses to run as root: run the PostgreSQL tools as the `postgres` user then.
fn pg_command(bindir: &Path, tool: &str, as_postgres: bool) -> Command {
    if as_postgres {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bindir.join(tool));
        c
    } else {
        Command::new(bindir.join(tool))
    }
}

fn run(step: &str, mut c: Command) -> Result<(), PgError> {
    let out = c.output().map_err(|e| PgError::Command {
        step: step.into(),
        message: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(PgError::Command {
            step: step.into(),
            message: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        });
    }
    Ok(())
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A private cluster in `dir`, created if needed and started if not running. Returns a
/// superuser URL for it (trust auth on 127.0.0.1 only).
pub struct PrivateCluster {
    pub dir: PathBuf,
    pub port: u16,
    bindir: PathBuf,
    as_postgres: bool,
}

impl PrivateCluster {
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn ensure(dir: &Path) -> Result<PrivateCluster, PgError> {
        let bindir = find_bindir().ok_or(PgError::NoBinaries)?;
        let as_postgres = is_root();
        std::fs::create_dir_all(dir)?;
        // The server runs in its data directory: relative paths would break.
        let dir = &std::fs::canonicalize(dir)?;
        let data = dir.join("data");
        let port_file = dir.join("port");
        if as_postgres {
            // The directory itself only: initdb (run as postgres) owns what it creates, and a
            // recursive chown of a running cluster races with the server deleting files (a
            // dropped test database), which failed test start-ups with "No such file".
            run("chown", {
                let mut c = Command::new("chown");
                c.arg("postgres:postgres").arg(dir);
                c
            })?;
        }
        if !data.join("PG_VERSION").exists() {
            let mut c = pg_command(&bindir, "initdb", as_postgres);
            c.arg("-D").arg(&data).args([
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
            ]);
            run("initdb", c)?;
        }
        let port = match std::fs::read_to_string(&port_file)
            .ok()
            .and_then(|s| s.trim().parse::<u16>().ok())
        {
            Some(p) if port_open("127.0.0.1", p) => {
                return Ok(PrivateCluster {
                    dir: dir.into(),
                    port: p,
                    bindir,
                    as_postgres,
                });
            }
            _ => free_port()?,
        };
        std::fs::write(&port_file, port.to_string())?;
        let mut c = pg_command(&bindir, "pg_ctl", as_postgres);
        c.arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(dir.join("postgres.log"))
            .args(["-w", "-t", "60", "-o"])
            .arg(format!(
                // TCP on loopback only; no Unix socket (its path length is limited and the
                // services connect over TCP anyway).
                "-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' \
                 -c max_connections=300 -c fsync=on"
            ))
            .arg("start");
        run("pg_ctl start", c)?;
        Ok(PrivateCluster {
            dir: dir.into(),
            port,
            bindir,
            as_postgres,
        })
    }

    pub fn stop(&self) -> Result<(), PgError> {
        let mut c = pg_command(&self.bindir, "pg_ctl", self.as_postgres);
        c.arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "fast", "-w", "stop"]);
        run("pg_ctl stop", c)
    }
}

/// A superuser URL for some server: DATABASE_URL, else localhost:5432, else a private
/// cluster in `private_dir`. The second value is the cluster when one was started.
pub fn locate(private_dir: &Path) -> Result<(String, Option<PrivateCluster>), PgError> {
    if let Ok(url) = std::env::var("DATABASE_URL")
        && !url.is_empty()
    {
        return Ok((url, None));
    }
    if let Some(url) = local_trusted_server() {
        return Ok((url, None));
    }
    let c = PrivateCluster::ensure(private_dir)?;
    Ok((c.url(), Some(c)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_cluster_starts_serves_and_stops() {
        if find_bindir().is_none() {
            // The DESIGN requires a clear error in that case; that is what we check then.
            let dir = tempfile::tempdir().unwrap();
            let err = PrivateCluster::ensure(dir.path()).err().unwrap();
            assert!(err.to_string().contains("Install PostgreSQL"));
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let cluster = PrivateCluster::ensure(dir.path()).expect("private cluster");
        assert!(port_open("127.0.0.1", cluster.port));
        assert!(cluster.url().contains(&cluster.port.to_string()));
        // A second ensure reuses the running cluster.
        let again = PrivateCluster::ensure(dir.path()).unwrap();
        assert_eq!(again.port, cluster.port);
        cluster.stop().unwrap();
        assert!(!port_open("127.0.0.1", cluster.port));
    }
}
