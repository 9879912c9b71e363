//! `TestSuite`: every service in-process on 127.0.0.1 port 0, on a fresh database, with a
//! shutdown that waits for all of them.

use std::time::Duration;

use mailsuite::up::{Running, UpConfig};
use mailsuite_runtime::Shutdown;

use crate::{TestCerts, TestDb};

pub struct TestSuite {
    pub db: TestDb,
    pub certs: TestCerts,
    pub running: Running,
    shutdown: Shutdown,
}

impl TestSuite {
    /// Start everything with the defaults of `UpConfig::ephemeral()`.
    pub async fn start() -> TestSuite {
        Self::start_with(|_| {}).await
    }

    /// Start everything after `tweak` adjusted the configuration (limits, policies ...).
    /// TLS uses `TestCerts` (a throw-away CA) on every listener.
    pub async fn start_with(tweak: impl FnOnce(&mut UpConfig)) -> TestSuite {
        let db = TestDb::new().await;
        let certs = TestCerts::new();
        let mut cfg = UpConfig::ephemeral();
        cfg.smtp.tls = certs.tls_config();
        cfg.pop3.tls = certs.tls_config();
        cfg.imap.tls = certs.tls_config();
        tweak(&mut cfg);
        let shutdown = Shutdown::new();
        let running = mailsuite::up::start(cfg, &db.url, shutdown.clone())
            .await
            .expect("starting the suite");
        TestSuite {
            db,
            certs,
            running,
            shutdown,
        }
    }

    pub fn shutdown(&self) -> &Shutdown {
        &self.shutdown
    }

    /// Stop every service and wait for all tasks; true when they ended within `grace`.
    pub async fn stop(self, grace: Duration) -> bool {
        self.shutdown.drain(grace).await
    }
}
